//! # Sagaflow
//!
//! Durable sagas for Rust: a multi-step operation across services (charge a card,
//! reserve stock, create the order) declared as steps with compensating actions, run by
//! an engine that writes every transition to disk before acting on it, retries with
//! stable idempotency keys, and after a crash resumes or rolls back each saga
//! deterministically.
//!
//! ## Define
//!
//! A step is a type implementing [`Step`]: an async `execute`, an async `compensate`.
//! A [`SagaDefinition`] puts steps in order; one of them may be the *pivot*, the point
//! of no return.
//!
//! ```
//! use async_trait::async_trait;
//! use sagaflow::{SagaDefinition, Step, StepContext, StepError};
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
//!             return Err(StepError::permanent("nothing to charge"));
//!         }
//!         // Pass ctx.idempotency_key() to the payment API: a retry never charges twice.
//!         Ok(Charge { id: format!("ch-{}", ctx.idempotency_key()) })
//!     }
//!     async fn compensate(&self, _ctx: &StepContext, _o: Order, _c: Option<Charge>) -> Result<(), StepError> {
//!         Ok(()) // refund by idempotency key
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
//! # use async_trait::async_trait;
//! # use sagaflow::{SagaDefinition, Step, StepContext, StepError};
//! # struct Hello;
//! # #[async_trait]
//! # impl Step for Hello {
//! #     type Input = String;
//! #     type Output = String;
//! #     async fn execute(&self, _: &StepContext, who: String) -> Result<String, StepError> {
//! #         Ok(format!("hello, {who}"))
//! #     }
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
//! Open an engine on the same directory after a crash (or a drop, or a clean shutdown
//! in the middle of a saga) and every saga that had not ended continues: a step whose
//! attempt was started but has no result runs again with the same idempotency key, or,
//! if it is declared [`Idempotence::NotIdempotent`], is treated as "may have happened"
//! and compensated. [`Engine::recovery`] reports what was resumed and what was parked.
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

pub use clock::{
    Clock, Entropy, OsEntropy, SeededEntropy, Sleep, SystemClock, Timestamp, TokioClock,
};
pub use definition::{
    Idempotence, RetryPolicy, SagaDefinition, SagaDefinitionBuilder, Step, StepContext, StepError,
    StepKind, StepOptions,
};
pub use error::{Error, Result};
pub use executor::{CommitMode, CommitStats, Engine, EngineBuilder, EngineOptions, SagaOutcome};
pub use ids::{Attempt, IdempotencyKey, Lsn, Phase, SagaId, StartKey};
pub use machine::{FailureKind, LogRecord, ParkKind, ParkReason, SagaStatus};
pub use payload::{bound_message, MAX_MESSAGE_BYTES, MAX_PAYLOAD_DEPTH};
pub use recovery::RecoveryReport;
pub use store::SagaMeta;
