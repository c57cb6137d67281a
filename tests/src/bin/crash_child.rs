//! The child process of the SIGKILL test (`tests/tests/sigkill.rs`).
//!
//! `sagaflow-crash-child <data-dir> <ledger-file> <sagas> [abort]` opens an engine on the
//! sled directory, starts (again) every saga `order-0 .. order-<sagas>` with its start
//! key, and waits for all of them. Its steps write their effects to the ledger file, a
//! service outside the process that survives the kills: `A <key>` for an action, `C <key>`
//! for a compensation. The parent kills it with SIGKILL at random moments and restarts it
//! on the same directory until a run finishes; it prints `DONE <completed> <compensated>
//! <parked>` then.
//!
//! Late arrivals: for one order in five, the non-idempotent `charge` behaves like a
//! request whose connection dropped after it was sent: the step answers "unknown" at
//! once, and a separate process (which outlives this one if it is killed) writes the
//! charge to the ledger up to a second later, well inside the attempt's 2 s deadline.
//! The ledger does not remember refunds: only the engine's settle window (no undo before
//! the attempt's deadline) keeps a refund from landing before its charge.
//!
//! Even orders run definition `kill`: `reserve`, `charge`, the pivot `ship`, `notify`.
//! Odd orders run `kill-group`, with parallel groups: `reserve`, then `charge`, `hold`
//! and `points` at once, the pivot `ship`, then `notify` and `receipt` at once. A charge
//! refused or delivered late, or a hold refused, fails the group: its siblings settle and
//! the branches that took effect are undone concurrently, then `reserve`; a refused ship
//! undoes the whole group. Kills land during the fan-out and during those undos.
//!
//! With `abort`, the `reserve` step aborts the process (SIGABRT) every time it runs: a
//! step that crash-loops the engine, which must park its saga after 5 interruptions.
//!
//! With `SAGAFLOW_CHILD_DATABASE_URL` set (and the `postgres` feature), the engine opens
//! on that PostgreSQL database instead, in schema `SAGAFLOW_CHILD_SCHEMA`, as owner
//! `SAGAFLOW_CHILD_OWNER`, with leases of `SAGAFLOW_CHILD_LEASE_MS`: several children then
//! share the sagas (`tests/tests/pg_processes.rs`); `<data-dir>` is ignored.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sagaflow::{
    Compensate, Engine, RetryPolicy, SagaDefinition, SagaOutcome, StartKey, Step, StepContext,
    StepError,
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
    /// Where the ledger is, for late deliveries written by another process.
    ledger: String,
    /// Delivers one action in five late, from another process.
    late: bool,
    /// Aborts the process whenever it runs.
    abort: bool,
    /// Fails permanently for orders with `n % fail_mod == fail_rem`.
    fail: Option<(u64, u64)>,
    /// Fails transiently on the first attempts for orders with `n % 4 == flaky_rem`.
    flaky_attempts: u32,
    flaky_rem: u64,
}

#[async_trait]
impl Step for Call {
    type Input = Order;
    type Output = ();

    async fn execute(&self, ctx: &StepContext, order: Order) -> Result<(), StepError> {
        if self.abort {
            std::process::abort();
        }
        tokio::time::sleep(pause(ctx)).await;
        if self.late && order.n % 5 == 1 && ctx.attempt().0 == 1 {
            // The request is on the wire: it lands 0.1 to 1 s from now, whatever happens
            // to this process; the caller only sees the connection drop.
            let delay = 0.1 + (pause(ctx).as_millis() % 40) as f64 * 0.0225;
            let script = format!(
                "sleep {delay:.3}; printf 'A %s\\n' '{}' >> '{}'",
                ctx.idempotency_key(),
                self.ledger
            );
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .stdin(std::process::Stdio::null())
                .spawn()
                .map_err(|e| StepError::retryable(format!("cannot send: {e}")))?;
            return Err(StepError::unknown(
                "connection reset after the request was sent",
            ));
        }
        if let Some((m, r)) = self.fail {
            if order.n % m == r {
                return Err(StepError::rejected("refused"));
            }
        }
        if order.n % 4 == self.flaky_rem && ctx.attempt().0 <= self.flaky_attempts {
            return Err(StepError::retryable("busy"));
        }
        self.service.record('A', ctx)
    }
}

#[async_trait]
impl Compensate for Call {
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

fn definitions(
    service: &Arc<Service>,
    ledger: &str,
    abort: bool,
) -> Result<[SagaDefinition; 2], sagaflow::definition::Error> {
    let retry = RetryPolicy::default()
        .with_initial_backoff(Duration::from_millis(5))
        .with_max_backoff(Duration::from_millis(50))
        .with_attempt_timeout(Duration::from_secs(2));
    let call = |fail, flaky_attempts, flaky_rem, late, abort| Call {
        service: service.clone(),
        ledger: ledger.to_string(),
        late,
        abort,
        fail,
        flaky_attempts,
        flaky_rem,
    };
    let plain = SagaDefinition::builder("kill", 1)
        .step("reserve", call(None, 1, 0, false, abort))
        .retry(retry.clone())
        // A charge must not run twice: an attempt of unknown outcome is compensated, and
        // only once its deadline has passed.
        .step("charge", call(Some((7, 3)), 0, 0, true, false))
        .retry(retry.clone())
        .not_idempotent()
        .pivot("ship", call(Some((11, 5)), 0, 0, false, false))
        .retry(retry.clone())
        .retriable("notify", call(None, 2, 0, false, false))
        .retry(retry.clone())
        .build()?;
    let grouped = SagaDefinition::builder("kill-group", 1)
        .step("reserve", call(None, 1, 1, false, false))
        .retry(retry.clone())
        .parallel(|g| {
            g.step("charge", call(Some((7, 3)), 0, 1, true, false))
                .retry(retry.clone())
                .not_idempotent()
                .step("hold", call(Some((13, 1)), 1, 3, false, false))
                .retry(retry.clone())
                .step("points", call(None, 2, 1, false, false))
                .retry(retry.clone())
        })
        .pivot("ship", call(Some((11, 5)), 0, 1, false, false))
        .retry(retry.clone())
        .parallel(|g| {
            g.retriable("notify", call(None, 2, 3, false, false))
                .retry(retry.clone())
                .retriable("receipt", call(None, 1, 1, false, false))
                .retry(retry.clone())
        })
        .build()?;
    Ok([plain, grouped])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Errors (a driver that stopped, a saga recovery could not resume) go to stderr,
    // which the kill test shows when a run fails. Attempts fail all the time here, by
    // design: their warnings would bury them.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::ERROR)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let (dir, ledger, sagas, abort) = match args.as_slice() {
        [_, dir, ledger, sagas] => (dir, ledger, sagas, false),
        [_, dir, ledger, sagas, mode] if mode == "abort" => (dir, ledger, sagas, true),
        _ => {
            return Err(
                "usage: sagaflow-crash-child <data-dir> <ledger-file> <sagas> [abort]".into(),
            )
        }
    };
    let sagas: u64 = sagas.parse()?;
    let service = Arc::new(Service {
        ledger: Mutex::new(OpenOptions::new().create(true).append(true).open(ledger)?),
    });
    let [plain, grouped] = definitions(&service, ledger, abort)?;
    let builder = Engine::builder().register(plain).register(grouped);
    let engine = Arc::new(match std::env::var("SAGAFLOW_CHILD_DATABASE_URL") {
        #[cfg(feature = "postgres")]
        Ok(url) => {
            let env = |k: &str| std::env::var(k).unwrap_or_default();
            let lease = env("SAGAFLOW_CHILD_LEASE_MS").parse().unwrap_or(1000);
            builder
                .owner(sagaflow::store::OwnerId::new(env("SAGAFLOW_CHILD_OWNER")))
                .options(
                    sagaflow::EngineOptions::default().with_lease_tick(Duration::from_millis(100)),
                )
                .open_postgres(
                    &url,
                    sagaflow::store::PgOptions::default()
                        .schema(env("SAGAFLOW_CHILD_SCHEMA"))
                        .lease_ttl(Duration::from_millis(lease)),
                )
                .await?
        }
        #[cfg(not(feature = "postgres"))]
        Ok(_) => return Err("built without the postgres feature".into()),
        Err(_) => builder.open(dir).await?,
    });
    // At most 16 new sagas at a time, so a run lasts long enough to be killed often.
    let permits = Arc::new(tokio::sync::Semaphore::new(16));
    let mut waits = Vec::new();
    for n in 0..sagas {
        let permit = permits.clone().acquire_owned().await?;
        let id = engine
            .start(
                if n % 2 == 0 { "kill" } else { "kill-group" },
                serde_json::json!({ "n": n }),
                Some(StartKey::new(format!("order-{n}"))?),
            )
            .await
            .map_err(|e| format!("start order-{n}: {e:?}"))?;
        let e = engine.clone();
        waits.push(tokio::spawn(async move {
            let outcome = e
                .wait(id)
                .await
                .map_err(|e| format!("wait for order-{n} ({id}): {e:?}"));
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
