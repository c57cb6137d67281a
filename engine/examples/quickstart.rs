//! Sagaflow in one screen: two checkout sagas on a sled directory.
//!
//! The first saga's inventory call fails once with a 429, is retried after the hinted
//! delay with the same idempotency key, and the saga completes. The second saga's
//! shipping call is rejected (no address: nothing was booked), so shipping is not
//! compensated, and the inventory reservation and the payment are, in reverse order.
//! Every transition of both sagas is printed from the durable log.
//!
//! Run it with:
//!
//! ```text
//! cargo run -p sagaflow --example quickstart
//! ```
//!
//! The store is in a temporary directory, deleted at the end. With `--dir PATH` it is in
//! PATH (created if missing) and kept, so that the `sagaflow` CLI can be tried on it:
//!
//! ```text
//! cargo run -p sagaflow --example quickstart -- --dir /tmp/quickstart
//! cargo run -p sagaflow-cli -- --data-dir /tmp/quickstart list
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sagaflow::machine::Event;
use sagaflow::{
    Compensate, Engine, RetryPolicy, SagaDefinition, SagaId, Step, StepContext, StepError,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    customer: String,
    cents: u64,
    address: String,
}

/// A stand-in for an external service: remembers which idempotency keys it has seen, so
/// a retry with the same key is answered without doing the work twice.
#[derive(Default)]
struct Service {
    seen: Mutex<HashSet<String>>,
    fail_once: Mutex<HashSet<String>>,
}

impl Service {
    fn apply(&self, ctx: &StepContext) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(ctx.idempotency_key().to_string())
    }
}

struct Payment(Arc<Service>);
struct Inventory(Arc<Service>);
struct Shipping;

#[derive(Serialize, Deserialize)]
struct Charge {
    charge_id: String,
}

#[async_trait]
impl Step for Payment {
    type Input = Order;
    type Output = Charge;

    async fn execute(&self, ctx: &StepContext, order: Order) -> Result<Charge, StepError> {
        self.0.apply(ctx);
        Ok(Charge {
            charge_id: format!("ch_{}_{}", order.customer, order.cents),
        })
    }
}

#[async_trait]
impl Compensate for Payment {
    async fn compensate(
        &self,
        ctx: &StepContext,
        _order: Order,
        charge: Option<Charge>,
    ) -> Result<(), StepError> {
        // A real refund would name the charge; without one, it refunds by key.
        let _ = charge.map(|c| c.charge_id);
        self.0.apply(ctx);
        Ok(())
    }
}

#[async_trait]
impl Step for Inventory {
    type Input = Order;
    type Output = ();

    async fn execute(&self, ctx: &StepContext, order: Order) -> Result<(), StepError> {
        let first_time = self
            .0
            .fail_once
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(order.customer.clone());
        if first_time && order.customer == "ada" {
            return Err(StepError::retry_after(
                Duration::from_millis(200),
                "429 too many requests",
            ));
        }
        self.0.apply(ctx);
        Ok(())
    }
}

#[async_trait]
impl Compensate for Inventory {
    async fn compensate(
        &self,
        ctx: &StepContext,
        _: Order,
        _: Option<()>,
    ) -> Result<(), StepError> {
        self.0.apply(ctx);
        Ok(())
    }
}

#[async_trait]
impl Step for Shipping {
    type Input = Order;
    type Output = String;

    async fn execute(&self, _ctx: &StepContext, order: Order) -> Result<String, StepError> {
        if order.address.is_empty() {
            // Refused before anything was booked: rejected, so never compensated.
            return Err(StepError::rejected("no shipping address"));
        }
        Ok(format!("parcel to {}", order.address))
    }
}

#[async_trait]
impl Compensate for Shipping {
    /// A step that failed with an unknown outcome (a timeout, say) is compensated too: it
    /// may have taken effect. Cancelling by the action's key is a no-op if nothing was
    /// booked.
    async fn compensate(
        &self,
        _: &StepContext,
        _: Order,
        _: Option<String>,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

/// A value's name as it is written in the log and in JSON (`retry_after`, not
/// `RetryAfter`).
fn json_name(v: &impl Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(e) => format!("<{e}>"),
    }
}

/// How a saga ended, as one line of JSON.
fn outcome_json(outcome: &sagaflow::SagaOutcome) -> String {
    serde_json::to_string(outcome).unwrap_or_else(|e| format!("(does not serialize: {e})"))
}

fn describe(steps: &[String], event: &Event) -> String {
    let name = |i: &u32| steps.get(*i as usize).map_or("?", String::as_str);
    match event {
        Event::Started {
            definition,
            version,
            ..
        } => format!("started ({definition} v{version})"),
        Event::StepAttemptStarted { step, attempt, .. } => {
            format!("{} attempt {attempt} started", name(step))
        }
        Event::StepSucceeded { step, output, .. } => format!("{} succeeded: {output}", name(step)),
        Event::StepFailed {
            step,
            attempt,
            kind,
            error,
            retry_at,
        } => format!(
            "{} attempt {attempt} failed ({}): {error}{}",
            name(step),
            json_name(kind),
            retry_at.map_or(String::from(", no retry"), |t| format!(", retry at {t}"))
        ),
        Event::CompensationBegan { reason } => format!("compensation began: {reason}"),
        Event::CompensationAttemptStarted { step, attempt, .. } => {
            format!("compensate {} attempt {attempt} started", name(step))
        }
        Event::CompensationSucceeded { step, .. } => format!("{} compensated", name(step)),
        Event::CompensationFailed { step, error, .. } => {
            format!("compensation of {} failed: {error}", name(step))
        }
        Event::Completed => "completed".into(),
        Event::Compensated => "compensated".into(),
        Event::Parked { reason } => format!("parked: {reason}"),
        other => other.name().to_string(),
    }
}

fn print_history(engine: &Engine, id: SagaId) -> sagaflow::Result<()> {
    let history = engine.history(id)?;
    let steps = match history.first().map(|r| &r.event) {
        Some(Event::Started { steps, .. }) => steps.clone(),
        _ => Vec::new(),
    };
    println!("saga {id}");
    for r in &history {
        println!("  #{:<2} {}  {}", r.lsn, r.at, describe(&steps, &r.event));
    }
    println!("  idempotency key of payment: {id}/payment/action\n");
    Ok(())
}

/// Where the sled store goes.
enum Store {
    /// `--dir PATH`: kept after the run.
    Kept(PathBuf),
    /// A temporary directory, deleted at the end.
    Temporary(tempfile::TempDir),
}

impl Store {
    /// From the command line: `--dir PATH` (or `--dir=PATH`), or nothing.
    fn from_args() -> std::io::Result<Store> {
        const USAGE: &str = "usage: quickstart [--dir PATH]\n  \
            --dir PATH  keep the sled store in PATH (created if missing), to try the \
            sagaflow CLI on it; without it, a temporary directory deleted at the end";
        let usage = |problem: &str| -> ! {
            eprintln!("{problem}\n{USAGE}");
            std::process::exit(2)
        };
        let mut args = std::env::args().skip(1);
        let mut dir = None;
        while let Some(arg) = args.next() {
            let value = match arg.as_str() {
                "--dir" => args.next(),
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => match other.strip_prefix("--dir=") {
                    Some(d) => Some(d.to_string()),
                    None => usage(&format!("unexpected argument `{other}`")),
                },
            };
            match value {
                Some(d) if !d.is_empty() => dir = Some(d),
                _ => usage("--dir needs a path"),
            }
        }
        match dir {
            Some(d) => {
                std::fs::create_dir_all(&d)?;
                Ok(Store::Kept(PathBuf::from(d)))
            }
            None => Ok(Store::Temporary(tempfile::tempdir()?)),
        }
    }

    fn path(&self) -> &Path {
        match self {
            Store::Kept(p) => p,
            Store::Temporary(t) => t.path(),
        }
    }
}

/// `path` as one shell word.
fn shell_word(path: &Path) -> String {
    let s = path.display().to_string();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:@%,".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = Store::from_args()?;
    let service = Arc::new(Service::default());
    let quick = RetryPolicy::default()
        .with_initial_backoff(Duration::from_millis(50))
        .with_attempt_timeout(Duration::from_secs(5));
    let checkout = SagaDefinition::builder("checkout", 1)
        .step("payment", Payment(service.clone()))
        .retry(quick.clone())
        .step("inventory", Inventory(service.clone()))
        .retry(quick.clone())
        .step("shipping", Shipping)
        .retry(quick)
        .build()?;

    let engine = Engine::builder()
        .register(checkout)
        .open(dir.path())
        .await?;
    match &dir {
        Store::Kept(p) => println!("sled store in {}\n", p.display()),
        Store::Temporary(t) => println!(
            "sled store in {} (deleted at the end; --dir PATH keeps it)\n",
            t.path().display()
        ),
    }

    let ada = Order {
        customer: "ada".into(),
        cents: 4_200,
        address: "12 Analytical Row".into(),
    };
    let bob = Order {
        customer: "bob".into(),
        cents: 999,
        address: String::new(),
    };
    let first = engine.start("checkout", &ada, None).await?;
    let second = engine.start("checkout", &bob, None).await?;
    println!("ada: {}", outcome_json(&engine.wait(first).await?));
    println!("bob: {}\n", outcome_json(&engine.wait(second).await?));
    print_history(&engine, first)?;
    print_history(&engine, second)?;
    let stats = engine.commit_stats();
    println!(
        "{} log records in {} atomic writes, made durable by {} syncs (group commit)",
        stats.records, stats.writes, stats.batches
    );
    engine.shutdown().await?;
    if let Store::Kept(path) = &dir {
        // The engine has stopped: the CLI may open the directory.
        let d = shell_word(path);
        println!(
            "\nthe store is kept in {}: try the CLI on it (install it with \
             `cargo install --path cli`,\nor put `cargo run -p sagaflow-cli --` in place of \
             `sagaflow`):\n  \
             sagaflow --data-dir {d} list\n  \
             sagaflow --data-dir {d} show {second}",
            path.display()
        );
    }
    Ok(())
}
