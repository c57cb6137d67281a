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
    Compensate, Engine, EngineBuilder, Idempotence, Phase, RetryPolicy, SagaDefinition, SagaId,
    Step, StepContext, StepError, StepKind, StepOptions,
};
use serde_json::{json, Value};

pub mod check;

/// A test's size or seed from the environment variable `name`, else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The next number of a splitmix64 sequence: a seeded schedule (of kills, pauses) that
/// a failing run can be replayed from.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
pub mod crash;
pub mod kill_ledger;
pub mod sim;

use crash::{CrashPlan, EffectFate};

/// What one attempt does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Takes effect and succeeds.
    Ok,
    /// Fails transiently, without effect.
    Retryable,
    /// Fails transiently with a retry-after hint, without effect.
    RetryAfter(Duration),
    /// Refuses, without effect (rejected).
    Rejected,
    /// Fails without effect, but says the outcome is unknown (a dropped connection
    /// before the request was sent, as far as the caller can tell).
    Unknown,
    /// Takes effect, then says the outcome is unknown (the reply was lost).
    ApplyThenUnknown,
    /// The request is on the wire: the step says the outcome is unknown at once (the
    /// connection dropped after sending), and the effect lands this long after the call,
    /// even if the engine that sent it has crashed meanwhile. The delays used stay
    /// inside the attempt's deadline, which is all the engine can promise about.
    Late(Duration),
    /// Panics, without effect.
    Panic,
    /// Never returns (until the attempt times out or the engine is dropped).
    Hang,
    /// Takes effect, then never returns: the reply is lost.
    ApplyThenHang,
    /// Returns an output of this many bytes.
    Big(usize),
}

impl Outcome {
    fn applies(self) -> bool {
        matches!(
            self,
            Outcome::Ok | Outcome::ApplyThenHang | Outcome::ApplyThenUnknown | Outcome::Big(_)
        )
    }
}

/// One call a fake service received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The saga's tag (its input's `tag` field), used to script per saga.
    pub tag: String,
    /// Step name.
    pub step: String,
    /// Action or compensation.
    pub phase: Phase,
    /// The idempotency key it carried.
    pub key: String,
    /// The attempt number it carried.
    pub attempt: u32,
    /// Whether it took effect.
    pub applied: bool,
    /// Whether this is the late landing of a request sent earlier ([`Outcome::Late`]),
    /// not a call the engine made at this point.
    pub late: bool,
}

/// A fake downstream service: records every call and every effect by idempotency key.
#[derive(Debug)]
pub struct Ledger {
    inner: Mutex<LedgerInner>,
    /// Bumped on every call, so a test can wait for one without sleeping.
    called: tokio::sync::watch::Sender<usize>,
    crash: Mutex<Option<Arc<CrashPlan>>>,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            inner: Mutex::default(),
            called: tokio::sync::watch::channel(0).0,
            crash: Mutex::new(None),
        }
    }
}

#[derive(Default, Debug, Clone)]
struct LedgerInner {
    calls: Vec<Call>,
    /// How many times each key *took effect*. A service that honours idempotency keys
    /// applies a key once; the count is how often it was asked to with success.
    effects: HashMap<String, u32>,
    /// Keys in the order they first took effect.
    order: Vec<(String, Phase, String)>,
    scripts: HashMap<(String, String, Phase), VecDeque<Outcome>>,
}

impl Ledger {
    /// A new, empty ledger.
    pub fn new() -> Arc<Self> {
        Arc::new(Ledger::default())
    }

    /// A copy of this ledger's books and scripts, as the outside world stood at one
    /// moment: two runs from one crashed state must see the same world.
    pub fn fork(&self) -> Arc<Self> {
        let inner = self.inner.lock().unwrap().clone();
        Arc::new(Ledger {
            inner: Mutex::new(inner),
            ..Ledger::default()
        })
    }

    /// Scripts the next attempts of `step`'s `phase` in every saga without a tag; once
    /// the script runs out, attempts succeed.
    pub fn script(&self, step: &str, phase: Phase, outcomes: impl IntoIterator<Item = Outcome>) {
        self.script_tagged("", step, phase, outcomes);
    }

    /// Scripts the next attempts of `step`'s `phase` in sagas whose input has `tag`.
    pub fn script_tagged(
        &self,
        tag: &str,
        step: &str,
        phase: Phase,
        outcomes: impl IntoIterator<Item = Outcome>,
    ) {
        self.inner
            .lock()
            .unwrap()
            .scripts
            .entry((tag.to_string(), step.to_string(), phase))
            .or_default()
            .extend(outcomes);
    }

    /// Makes the service consult `plan` on every call (to crash before or after an
    /// effect); `None` stops that.
    pub fn set_crash_plan(&self, plan: Option<Arc<CrashPlan>>) {
        *self.crash.lock().unwrap() = plan;
    }

    async fn perform(self: &Arc<Self>, ctx: &StepContext) -> Result<Value, StepError> {
        let plan = self.crash.lock().unwrap().clone();
        let fate = plan.as_ref().map_or(EffectFate::Proceed, |p| p.on_effect());
        if fate == EffectFate::Dead || fate == EffectFate::CrashBefore {
            // The process is gone before the request left it: nothing happens, ever.
            return std::future::pending().await;
        }
        let tag = ctx
            .saga_input()
            .get("tag")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let key = ctx.idempotency_key().as_str().to_string();
        let step = ctx.step_name().to_string();
        let phase = ctx.phase();
        let outcome = {
            let mut g = self.inner.lock().unwrap();
            let outcome = g
                .scripts
                .get_mut(&(tag.clone(), step.clone(), phase))
                .and_then(VecDeque::pop_front)
                .unwrap_or(Outcome::Ok);
            // A service that honours idempotency keys cannot refuse a key it has already
            // acted on: it answers with that key's result.
            let outcome = match outcome {
                Outcome::Rejected if g.effects.get(&key).is_some_and(|n| *n > 0) => Outcome::Ok,
                other => other,
            };
            let applied = outcome.applies();
            g.calls.push(Call {
                tag,
                step: step.clone(),
                phase,
                key: key.clone(),
                attempt: ctx.attempt().0,
                applied,
                late: false,
            });
            if applied {
                let n = g.effects.entry(key.clone()).or_default();
                *n += 1;
                if *n == 1 {
                    g.order.push((step.clone(), phase, key.clone()));
                }
            }
            outcome
        };
        self.called.send_modify(|n| *n += 1);
        if let Outcome::Late(after) = outcome {
            // Lands later, on the runtime rather than in the engine's tasks: a crash of
            // the engine does not stop a request already sent.
            let ledger = self.clone();
            let late = Call {
                tag: ctx
                    .saga_input()
                    .get("tag")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                step: step.clone(),
                phase,
                key: key.clone(),
                attempt: ctx.attempt().0,
                applied: true,
                late: true,
            };
            let sent = self.inner.lock().unwrap().calls.len();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                ledger.land(late, sent);
            });
            return Err(StepError::unknown(format!(
                "{step}: connection reset after sending"
            )));
        }
        if fate == EffectFate::CrashAfter {
            // The effect happened; the process died before hearing back.
            return std::future::pending().await;
        }
        match outcome {
            Outcome::Ok => Ok(json!({ "receipt": key })),
            Outcome::Retryable => Err(StepError::retryable("service unavailable")),
            Outcome::RetryAfter(d) => Err(StepError::retry_after(d, "429 too many requests")),
            Outcome::Rejected => Err(StepError::rejected(format!("{step} refused"))),
            // `Late` was answered above; the arm keeps the match whole.
            Outcome::Unknown | Outcome::ApplyThenUnknown | Outcome::Late(_) => {
                Err(StepError::unknown(format!("{step}: connection reset")))
            }
            Outcome::Panic => panic!("{step} blew up"),
            Outcome::Hang | Outcome::ApplyThenHang => std::future::pending().await,
            Outcome::Big(n) => Ok(json!({ "blob": "x".repeat(n) })),
        }
    }

    /// Records a request that arrives now, sent when the ledger had seen `sent` calls (a
    /// late request). Like a service that honours idempotency keys, it applies nothing
    /// if a call with the same key has been answered since: the key's answer is given.
    fn land(&self, mut call: Call, sent: usize) {
        let mut g = self.inner.lock().unwrap();
        let answered = g
            .calls
            .get(sent..)
            .unwrap_or_default()
            .iter()
            .any(|c| c.key == call.key && !c.late);
        if answered {
            call.applied = false;
            g.calls.push(call);
            drop(g);
            self.called.send_modify(|n| *n += 1);
            return;
        }
        let n = g.effects.entry(call.key.clone()).or_default();
        *n += 1;
        if *n == 1 {
            g.order
                .push((call.step.clone(), call.phase, call.key.clone()));
        }
        g.calls.push(call);
        drop(g);
        self.called.send_modify(|n| *n += 1);
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

    /// Every call, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// Calls of `step`'s `phase` in saga `saga`: (key, attempt).
    pub fn calls_of(&self, saga: SagaId, step: &str, phase: Phase) -> Vec<(String, u32)> {
        let prefix = format!("{saga}/");
        self.calls()
            .into_iter()
            .filter(|c| c.step == step && c.phase == phase && c.key.starts_with(&prefix))
            .map(|c| (c.key, c.attempt))
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

    /// How many times each key took effect (the service deduplicates; >1 means the
    /// engine asked twice, which is fine only with the same key).
    pub fn applications(&self) -> HashMap<String, u32> {
        self.inner.lock().unwrap().effects.clone()
    }
}

/// A step that consults the ledger's script and records its effects there.
#[derive(Debug)]
pub struct FakeStep {
    /// The step's name (checked against the context).
    pub name: &'static str,
    /// The service it calls.
    pub ledger: Arc<Ledger>,
}

#[async_trait]
impl Step for FakeStep {
    type Input = Value;
    type Output = Value;

    async fn execute(&self, ctx: &StepContext, _input: Value) -> Result<Value, StepError> {
        assert_eq!(ctx.step_name(), self.name);
        self.ledger.perform(ctx).await
    }
}

#[async_trait]
impl Compensate for FakeStep {
    async fn compensate(
        &self,
        ctx: &StepContext,
        _input: Value,
        _output: Option<Value>,
    ) -> Result<(), StepError> {
        self.ledger.perform(ctx).await.map(|_| ())
    }
}

/// Fast retries, so tests do not wait on real backoff.
#[allow(missing_docs)]
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

/// A fake step named `name` calling `ledger`.
pub fn fake(name: &'static str, ledger: &Arc<Ledger>) -> FakeStep {
    FakeStep {
        name,
        ledger: ledger.clone(),
    }
}

/// Starts a `checkout` saga on `store` whose payment never answers, waits until the
/// payment service was called, then drops the engine: the saga is left in flight, as a
/// crash would leave it.
///
/// # Panics
///
/// If the engine does not open or start (a test failure).
pub async fn interrupted_checkout(
    store: Arc<sagaflow::store::MemLog>,
    ledger: &Arc<Ledger>,
) -> SagaId {
    ledger.script("payment", Phase::Action, [Outcome::Hang]);
    let engine = builder()
        .register(checkout(ledger))
        .open_with(store)
        .await
        .expect("engine opens");
    let id = engine
        .start("checkout", json!({}), None)
        .await
        .expect("started");
    ledger.wait_for_call(id, "payment", Phase::Action).await;
    drop(engine);
    id
}

/// An engine on a fresh in-memory store, with `def` registered.
///
/// # Panics
///
/// If the engine does not open (a test failure).
pub async fn memory_engine(def: SagaDefinition) -> Engine {
    builder()
        .register(def)
        .open_with(std::sync::Arc::new(sagaflow::store::MemLog::new()))
        .await
        .expect("engine opens on a memory store")
}

/// A builder for tests under paused tokio time: `clock` is the virtual clock, and group
/// commit runs on the runtime (a commit thread would let virtual time run on while the
/// runtime waits for it).
pub fn paused_builder(clock: std::sync::Arc<dyn sagaflow::Clock>) -> EngineBuilder {
    builder().clock(clock).options(
        sagaflow::EngineOptions::default().with_commit_mode(sagaflow::CommitMode::RuntimeTask),
    )
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

/// The step after an await step in the await tests: reports what the settlement said.
#[derive(Debug)]
pub struct Ship;

#[async_trait]
impl Step for Ship {
    type Input = Value;
    type Output = Value;
    async fn execute(&self, ctx: &StepContext, _: Value) -> Result<Value, StepError> {
        let settled: Option<Value> = ctx.output_of("settle")?;
        Ok(json!({ "shipped_after": settled }))
    }
}

#[async_trait]
impl Compensate for Ship {
    async fn compensate(
        &self,
        _: &StepContext,
        _: Value,
        _: Option<Value>,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

/// payment → settle (await `settlement/<input.order>` for an hour, undone by the fake
/// `settle` step of `ledger`) → ship: the definition `paid` of the await tests.
pub fn paid(ledger: &Arc<Ledger>, on_timeout: sagaflow::OnTimeout) -> SagaDefinition {
    SagaDefinition::builder("paid", 1)
        .step("payment", fake("payment", ledger))
        .options(opts())
        .await_event(
            "settle",
            sagaflow::Await::new(Duration::from_secs(3600), |ctx| {
                ctx.saga_input()["order"]
                    .as_str()
                    .map(|o| format!("settlement/{o}"))
                    .ok_or_else(|| "the input has no order".to_string())
            })
            .on_timeout(on_timeout)
            .compensate_with(fake("settle", ledger)),
        )
        .step("ship", Ship)
        .build()
        .expect("valid definition")
}
