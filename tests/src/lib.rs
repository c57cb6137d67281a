//! The Sagaflow test harness: in-process fake services that count effects by
//! idempotency key, steps whose outcomes follow a script, and the definitions the
//! integration tests share (payment → inventory → order).
//!
//! Tests never sleep: a test that needs to know a step was called waits on
//! [`Ledger::wait_for_call`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sagaflow::{
    Engine, EngineBuilder, Idempotence, Phase, RetryPolicy, SagaDefinition, SagaId, Step,
    StepContext, StepError, StepKind, StepOptions,
};
use serde_json::{json, Value};

/// What one attempt does.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    Ok,
    Retryable,
    RetryAfter(Duration),
    Permanent,
    Panic,
    /// Never returns (until the attempt times out or the engine is dropped).
    Hang,
    /// Takes effect, then never returns.
    ApplyThenHang,
    /// Returns an output of this many bytes.
    Big(usize),
}

/// A fake downstream service: records every call and every effect by idempotency key.
#[derive(Debug)]
pub struct Ledger {
    inner: Mutex<LedgerInner>,
    /// Bumped on every call, so a test can wait for one without sleeping.
    called: tokio::sync::watch::Sender<usize>,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            inner: Mutex::default(),
            called: tokio::sync::watch::channel(0).0,
        }
    }
}

#[derive(Default, Debug)]
struct LedgerInner {
    /// Every call, in order: (step, phase, key, attempt).
    calls: Vec<(String, Phase, String, u32)>,
    /// Effects by key: how many times each key *took effect*. A service that honours
    /// idempotency keys applies a key once; the count is how often it was asked to.
    effects: HashMap<String, u32>,
    /// Keys in the order they first took effect.
    order: Vec<(String, Phase, String)>,
    scripts: HashMap<(String, Phase), VecDeque<Outcome>>,
}

impl Ledger {
    pub fn new() -> Arc<Self> {
        Arc::new(Ledger::default())
    }

    /// Scripts the next attempts of `step`'s `phase`; once the script runs out, attempts
    /// succeed.
    pub fn script(&self, step: &str, phase: Phase, outcomes: impl IntoIterator<Item = Outcome>) {
        self.inner
            .lock()
            .unwrap()
            .scripts
            .entry((step.to_string(), phase))
            .or_default()
            .extend(outcomes);
    }

    fn next(&self, step: &str, phase: Phase, key: &str, attempt: u32) -> Outcome {
        let mut g = self.inner.lock().unwrap();
        g.calls
            .push((step.to_string(), phase, key.to_string(), attempt));
        let outcome = g
            .scripts
            .get_mut(&(step.to_string(), phase))
            .and_then(VecDeque::pop_front)
            .unwrap_or(Outcome::Ok);
        drop(g);
        self.called.send_modify(|n| *n += 1);
        outcome
    }

    /// Waits until some call of `step`'s `phase` in `saga` has been made.
    pub async fn wait_for_call(&self, saga: SagaId, step: &str, phase: Phase) {
        let mut rx = self.called.subscribe();
        loop {
            if !self.calls_of(saga, step, phase).is_empty() {
                return;
            }
            rx.changed().await.expect("ledger alive");
        }
    }

    fn apply(&self, step: &str, phase: Phase, key: &str) {
        let mut g = self.inner.lock().unwrap();
        let n = g.effects.entry(key.to_string()).or_default();
        *n += 1;
        if *n == 1 {
            g.order.push((step.to_string(), phase, key.to_string()));
        }
    }

    /// All calls: (step, phase, key, attempt).
    pub fn calls(&self) -> Vec<(String, Phase, String, u32)> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// Calls of `step`'s `phase` in saga `saga`.
    pub fn calls_of(&self, saga: SagaId, step: &str, phase: Phase) -> Vec<(String, u32)> {
        let prefix = format!("{saga}/");
        self.calls()
            .into_iter()
            .filter(|(s, p, k, _)| s == step && *p == phase && k.starts_with(&prefix))
            .map(|(_, _, k, a)| (k, a))
            .collect()
    }

    /// Distinct keys that took effect for `saga`, in order: (step, phase).
    pub fn effects_of(&self, saga: SagaId) -> Vec<(String, Phase)> {
        let prefix = format!("{saga}/");
        self.inner
            .lock()
            .unwrap()
            .order
            .iter()
            .filter(|(_, _, k)| k.starts_with(&prefix))
            .map(|(s, p, _)| (s.clone(), *p))
            .collect()
    }

    /// How many times each key was applied (the service deduplicates; >1 means the
    /// engine asked twice, which is fine only with the same key).
    pub fn applications(&self) -> HashMap<String, u32> {
        self.inner.lock().unwrap().effects.clone()
    }
}

/// A step that consults the ledger's script and records its effects there.
#[derive(Debug)]
pub struct FakeStep {
    pub name: &'static str,
    pub ledger: Arc<Ledger>,
}

async fn perform(ledger: &Ledger, ctx: &StepContext) -> Result<Value, StepError> {
    let key = ctx.idempotency_key().as_str().to_string();
    let step = ctx.step_name().to_string();
    match ledger.next(&step, ctx.phase(), &key, ctx.attempt().0) {
        Outcome::Ok => {
            ledger.apply(&step, ctx.phase(), &key);
            Ok(json!({ "receipt": key }))
        }
        Outcome::Retryable => Err(StepError::retryable("service unavailable")),
        Outcome::RetryAfter(d) => Err(StepError::retry_after(d, "429 too many requests")),
        Outcome::Permanent => Err(StepError::permanent(format!("{step} refused"))),
        Outcome::Panic => panic!("{step} blew up"),
        Outcome::Hang => std::future::pending().await,
        Outcome::ApplyThenHang => {
            ledger.apply(&step, ctx.phase(), &key);
            std::future::pending().await
        }
        Outcome::Big(n) => Ok(json!({ "blob": "x".repeat(n) })),
    }
}

#[async_trait]
impl Step for FakeStep {
    type Input = Value;
    type Output = Value;

    async fn execute(&self, ctx: &StepContext, _input: Value) -> Result<Value, StepError> {
        assert_eq!(ctx.step_name(), self.name);
        perform(&self.ledger, ctx).await
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _input: Value,
        _output: Option<Value>,
    ) -> Result<(), StepError> {
        perform(&self.ledger, ctx).await.map(|_| ())
    }
}

/// Fast retries, so tests do not wait on real backoff.
pub fn fast() -> RetryPolicy {
    RetryPolicy::default()
        .with_max_attempts(4)
        .with_initial_backoff(Duration::from_millis(1))
        .with_max_backoff(Duration::from_millis(5))
        .with_attempt_timeout(Duration::from_secs(5))
}

pub fn opts() -> StepOptions {
    StepOptions::default()
        .with_retry(fast())
        .with_compensation_retry(fast())
}

/// payment → inventory → order, all compensatable.
pub fn checkout(ledger: &Arc<Ledger>) -> SagaDefinition {
    checkout_with(ledger, [Idempotence::Idempotent; 3])
}

pub fn checkout_with(ledger: &Arc<Ledger>, idem: [Idempotence; 3]) -> SagaDefinition {
    let mut b = SagaDefinition::builder("checkout", 1);
    for (name, i) in ["payment", "inventory", "order"].into_iter().zip(idem) {
        b = b.step_with(
            name,
            StepKind::Compensatable,
            FakeStep {
                name,
                ledger: ledger.clone(),
            },
            opts().with_idempotence(i),
        );
    }
    b.build().expect("valid definition")
}

/// payment → inventory → order (pivot) → notify (retriable).
pub fn checkout_with_pivot(ledger: &Arc<Ledger>) -> SagaDefinition {
    let step = |name| FakeStep {
        name,
        ledger: ledger.clone(),
    };
    SagaDefinition::builder("checkout-pivot", 1)
        .step_with("payment", StepKind::Compensatable, step("payment"), opts())
        .step_with(
            "inventory",
            StepKind::Compensatable,
            step("inventory"),
            opts(),
        )
        .step_with("order", StepKind::Pivot, step("order"), opts())
        .step_with("notify", StepKind::Retriable, step("notify"), opts())
        .build()
        .expect("valid definition")
}

pub fn builder() -> EngineBuilder {
    Engine::builder().seed(7)
}

/// The event names of a saga's history, for compact assertions.
pub fn event_names(engine: &Engine, id: SagaId) -> Vec<String> {
    engine
        .history(id)
        .expect("history")
        .into_iter()
        .map(|r| r.event.name().to_string())
        .collect()
}
