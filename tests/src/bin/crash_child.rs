//! The child process of the SIGKILL test (`tests/tests/sigkill.rs`).
//!
//! `sagaflow-crash-child <data-dir> <ledger-file> <sagas>` opens an engine on the sled
//! directory, starts (again) every saga `order-0 .. order-<sagas>` with its start key, and
//! waits for all of them. Its steps write their effects to the ledger file, a service
//! outside the process that survives the kills: `A <key>` for an action, `C <key>` for a
//! compensation. The parent kills it with SIGKILL at random moments and restarts it on
//! the same directory until a run finishes; it prints `DONE <completed> <compensated>
//! <parked>` then.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sagaflow::{
    Engine, RetryPolicy, SagaDefinition, SagaOutcome, StartKey, Step, StepContext, StepError,
    StepKind, StepOptions,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Order {
    n: u64,
}

/// A fake service that journals every effect to a file outside the process.
struct Service {
    ledger: Mutex<File>,
}

impl Service {
    fn record(&self, tag: char, ctx: &StepContext) -> Result<(), StepError> {
        let line = format!("{tag} {}\n", ctx.idempotency_key());
        let mut f = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        // One write(2) per line with O_APPEND: a kill cannot tear a line in two.
        f.write_all(line.as_bytes())
            .map_err(|e| StepError::retryable(format!("ledger write failed: {e}")))
    }
}

/// A pseudo-random delay per (key, attempt), so kills land in every phase.
fn pause(ctx: &StepContext) -> Duration {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ctx.idempotency_key().as_str().bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    Duration::from_millis(5 + (h ^ u64::from(ctx.attempt().0)) % 40)
}

struct Call {
    service: Arc<Service>,
    /// Fails permanently for orders with `n % fail_mod == fail_rem`.
    fail: Option<(u64, u64)>,
    /// Fails transiently on the first attempts for orders with `n % 4 == 0`.
    flaky_attempts: u32,
}

#[async_trait]
impl Step for Call {
    type Input = Order;
    type Output = ();

    async fn execute(&self, ctx: &StepContext, order: Order) -> Result<(), StepError> {
        tokio::time::sleep(pause(ctx)).await;
        if let Some((m, r)) = self.fail {
            if order.n % m == r {
                return Err(StepError::permanent("refused"));
            }
        }
        if order.n.is_multiple_of(4) && ctx.attempt().0 <= self.flaky_attempts {
            return Err(StepError::retryable("busy"));
        }
        self.service.record('A', ctx)
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _: Order,
        _: Option<()>,
    ) -> Result<(), StepError> {
        tokio::time::sleep(pause(ctx)).await;
        self.service.record('C', ctx)
    }
}

fn definition(service: &Arc<Service>) -> Result<SagaDefinition, sagaflow::definition::Error> {
    let opts = StepOptions::default().with_retry(
        RetryPolicy::default()
            .with_initial_backoff(Duration::from_millis(5))
            .with_max_backoff(Duration::from_millis(50))
            .with_attempt_timeout(Duration::from_secs(10)),
    );
    let call = |fail, flaky_attempts| Call {
        service: service.clone(),
        fail,
        flaky_attempts,
    };
    SagaDefinition::builder("kill", 1)
        .step_with(
            "reserve",
            StepKind::Compensatable,
            call(None, 1),
            opts.clone(),
        )
        .step_with(
            "charge",
            StepKind::Compensatable,
            call(Some((7, 3)), 0),
            opts.clone(),
        )
        .step_with(
            "ship",
            StepKind::Pivot,
            call(Some((11, 5)), 0),
            opts.clone(),
        )
        .step_with("notify", StepKind::Retriable, call(None, 2), opts)
        .build()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, ledger, sagas] = args.as_slice() else {
        return Err("usage: sagaflow-crash-child <data-dir> <ledger-file> <sagas>".into());
    };
    let sagas: u64 = sagas.parse()?;
    let service = Arc::new(Service {
        ledger: Mutex::new(OpenOptions::new().create(true).append(true).open(ledger)?),
    });
    let engine = Arc::new(
        Engine::builder()
            .register(definition(&service)?)
            .open(dir)
            .await?,
    );
    // At most 16 new sagas at a time, so a run lasts long enough to be killed often.
    let permits = Arc::new(tokio::sync::Semaphore::new(16));
    let mut waits = Vec::new();
    for n in 0..sagas {
        let permit = permits.clone().acquire_owned().await?;
        let id = engine
            .start(
                "kill",
                serde_json::json!({ "n": n }),
                Some(StartKey::new(format!("order-{n}"))?),
            )
            .await?;
        let e = engine.clone();
        waits.push(tokio::spawn(async move {
            let outcome = e.wait(id).await;
            drop(permit);
            outcome
        }));
    }
    let (mut completed, mut compensated, mut parked) = (0, 0, 0);
    for w in waits {
        match w.await?? {
            SagaOutcome::Completed { .. } => completed += 1,
            SagaOutcome::Compensated { .. } => compensated += 1,
            _ => parked += 1,
        }
    }
    println!("DONE {completed} {compensated} {parked}");
    Ok(())
}
