//! # Sagaflow
//!
//! Durable sagas for Rust: a multi-step operation across services (charge a card,
//! reserve stock, create the order) declared as steps with compensating actions, run by
//! an engine that writes every transition to disk before acting on it, retries with
//! stable idempotency keys, and after a crash resumes or rolls back each saga
//! deterministically.
//!
//! ## Add it
//!
//! ```toml
//! [dependencies]
//! sagaflow = "0.1"
//! serde = { version = "1", features = ["derive"] }
//! serde_json = "1"
//! tokio = { version = "1", features = ["rt-multi-thread", "macros"] }
//! ```
//!
//! `sagaflow::async_trait` is re-exported: no other dependency is needed to write steps.
//!
//! ## Define
//!
//! A step is a type implementing [`Step`] (an async `execute`); a step that can be undone
//! also implements [`Compensate`] (an async `compensate`), and only such a step can be
//! placed before the pivot. A [`SagaDefinition`] puts steps in order; one of them may be
//! the *pivot*, the point of no return. A step tells how it failed: retryable,
//! rejected (no effect: it is not compensated) or unknown (it may have taken effect: it
//! is compensated); see [`StepError`].
//!
//! ```
//! use sagaflow::{async_trait, Compensate, SagaDefinition, Step, StepContext, StepError};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Order { cents: u64 }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Charge { id: String }
//!
//! struct ChargeCard;
//!
//! #[async_trait]
//! impl Step for ChargeCard {
//!     type Input = Order;
//!     type Output = Charge;
//!     async fn execute(&self, ctx: &StepContext, order: Order) -> Result<Charge, StepError> {
//!         if order.cents == 0 {
//!             // Refused before anything happened: nothing to undo.
//!             return Err(StepError::rejected("nothing to charge"));
//!         }
//!         // Pass ctx.idempotency_key() to the payment API: a retry never charges twice.
//!         Ok(Charge { id: format!("ch-{}", ctx.idempotency_key()) })
//!     }
//! }
//!
//! #[async_trait]
//! impl Compensate for ChargeCard {
//!     async fn compensate(&self, ctx: &StepContext, _o: Order, _c: Option<Charge>) -> Result<(), StepError> {
//!         let _refund_by = ctx.action_key(); // the key the charge was made with
//!         Ok(())
//!     }
//! }
//!
//! struct CreateOrder;
//!
//! #[async_trait]
//! impl Step for CreateOrder {
//!     type Input = serde_json::Value;
//!     type Output = u64;
//!     async fn execute(&self, ctx: &StepContext, _: serde_json::Value) -> Result<u64, StepError> {
//!         let charge: Option<Charge> = ctx.output_of("charge")?;
//!         Ok(charge.map_or(0, |c| c.id.len() as u64))
//!     }
//! }
//!
//! let checkout = SagaDefinition::builder("checkout", 1)
//!     .step("charge", ChargeCard)
//!     .not_idempotent() // options chain onto the step added last
//!     .pivot("create_order", CreateOrder)
//!     .build()?;
//! # Ok::<(), sagaflow::definition::Error>(())
//! ```
//!
//! ## Run
//!
//! Register definitions, open the engine on a directory, start sagas and wait for them.
//!
//! ```
//! # use sagaflow::{async_trait, Compensate, SagaDefinition, Step, StepContext, StepError};
//! # struct Hello;
//! # #[async_trait]
//! # impl Step for Hello {
//! #     type Input = String;
//! #     type Output = String;
//! #     async fn execute(&self, _: &StepContext, who: String) -> Result<String, StepError> {
//! #         Ok(format!("hello, {who}"))
//! #     }
//! # }
//! # #[async_trait]
//! # impl Compensate for Hello {
//! #     async fn compensate(&self, _: &StepContext, _: String, _: Option<String>) -> Result<(), StepError> { Ok(()) }
//! # }
//! use sagaflow::{Engine, SagaOutcome, StartKey};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let def = SagaDefinition::builder("greet", 1).step("hello", Hello).build()?;
//! let engine = Engine::builder().register(def).open(dir.path()).await?;
//!
//! let key = StartKey::new("greeting-1")?;
//! let id = engine.start("greet", "world", Some(key.clone())).await?;
//! // The same start key gives the same saga (G6).
//! assert_eq!(engine.start("greet", "world", Some(key)).await?, id);
//!
//! match engine.wait(id).await? {
//!     SagaOutcome::Completed { outputs } => assert_eq!(outputs["hello"], "hello, world"),
//!     other => panic!("unexpected {other:?}"),
//! }
//! engine.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! ## Recover
//!
//! Open an engine on the same store after a crash (or a drop, or a clean shutdown in the
//! middle of a saga) and every saga that had not ended continues: a step whose attempt
//! was started but has no result runs again with the same idempotency key, or, if it is
//! declared not idempotent, is treated as "may have happened": compensated once that
//! attempt's deadline has passed. [`Engine::recovery`] reports what was resumed and what
//! was parked, by id.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use sagaflow::{async_trait, Compensate, Engine, SagaDefinition, SagaOutcome, Step, StepContext, StepError};
//! use sagaflow::store::MemLog;
//!
//! /// Hangs on its first call, as if the process died during it; succeeds afterwards.
//! struct Flaky(Arc<AtomicBool>);
//! #[async_trait]
//! impl Step for Flaky {
//!     type Input = serde_json::Value;
//!     type Output = String;
//!     async fn execute(&self, ctx: &StepContext, _: serde_json::Value) -> Result<String, StepError> {
//!         if !self.0.swap(true, Ordering::SeqCst) {
//!             std::future::pending::<()>().await;
//!         }
//!         Ok(format!("done with key {}", ctx.idempotency_key()))
//!     }
//! }
//! #[async_trait]
//! impl Compensate for Flaky {
//!     async fn compensate(&self, _: &StepContext, _: serde_json::Value, _: Option<String>) -> Result<(), StepError> { Ok(()) }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let called = Arc::new(AtomicBool::new(false));
//! let def = || SagaDefinition::builder("job", 1).step("work", Flaky(called.clone())).build();
//! let store = Arc::new(MemLog::new()); // or a directory, with `open`
//!
//! let engine = Engine::builder().register(def()?).open_with(store.clone()).await?;
//! let id = engine.start("job", serde_json::json!({}), None).await?;
//! drop(engine); // a crash: the attempt of `work` is in the log, without a result
//!
//! let engine = Engine::builder().register(def()?).open_with(store).await?;
//! assert_eq!(engine.recovery().resumed_ids, vec![id]);
//! assert!(matches!(engine.wait(id).await?, SagaOutcome::Completed { .. }));
//! engine.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! ## Layers
//!
//! - [`definition`]: steps, definitions, retry policies.
//! - [`machine`]: the pure core: events, state (a fold of the log), `decide`.
//! - [`store`]: the [`store::SagaLog`] trait, [`store::MemLog`] and [`store::SledLog`].
//! - the executor ([`Engine`]): the only part with I/O; group commit; recovery.
//!
//! See `docs/ARCHITECTURE.md` and `docs/durability.md` in the repository.

#![warn(missing_docs)]

pub mod admin;
mod clock;
pub mod definition;
mod error;
mod executor;
mod ids;
pub mod machine;
mod metrics;
mod payload;
mod recovery;
pub mod store;

/// Re-exported so that a step can be written with `#[sagaflow::async_trait]` without a
/// dependency of its own.
pub use async_trait::async_trait;
pub use clock::{
    Clock, Entropy, OsEntropy, SeededEntropy, Sleep, SystemClock, Timestamp, TokioClock,
};
pub use definition::{
    Await, Compensate, GroupBuilder, Idempotence, OnTimeout, Retention, RetryPolicy,
    SagaDefinition, SagaDefinitionBuilder, Step, StepContext, StepError, StepKind, StepOptions,
};
pub use definition::{Finished, Reconcile, Verdict};
pub use error::{Error, Result};
pub use executor::{
    BulkAction, BulkConfirm, BulkReport, CommitMode, CommitStats, Engine, EngineBuilder,
    EngineOptions, FoundDrift, Pace, ReconcileOptions, ReconcileReport, SagaOutcome, StartOptions,
    Started, BULK_MAX,
};
pub use ids::{Attempt, IdempotencyKey, Lsn, Phase, SagaId, StartKey};
pub use machine::{FailureKind, LogRecord, ParkKind, ParkReason, SagaStatus};
pub use payload::{bound_message, MAX_MESSAGE_BYTES, MAX_PAYLOAD_DEPTH};
pub use recovery::RecoveryReport;
pub use store::{Awaiting, SagaMeta};
