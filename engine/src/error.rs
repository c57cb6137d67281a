//! The engine's error type.
//!
//! A failing *step* is not an engine error: it is an outcome the engine records and acts
//! on (retry, compensate, park). These errors are about the engine itself: a store that
//! fails, a call with bad arguments, data that does not decode.

use std::sync::Arc;

use crate::ids::SagaId;
use crate::store;

/// Errors from the engine.
///
/// Every variant has a stable code (see [`Error::code`]) with a page in `docs/errors/`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store failed. Shared, because one failed group commit fails every write in it.
    #[error("store failed: {0}")]
    Store(Arc<store::Error>),
    /// The store shows signs of having lost committed writes (or its witness is
    /// damaged): the engine refuses to open it rather than go on as if the lost sagas had
    /// never existed. Restore the directory from a backup.
    #[error("store damaged: {0}")]
    StoreDamaged(Arc<store::Error>),
    /// A log record or summary of this saga was written by a newer engine.
    #[error("saga {saga} was written by a newer engine: {reason}")]
    NewerFormat {
        /// The saga.
        saga: SagaId,
        /// What this engine does not know.
        reason: String,
    },
    /// A definition failed validation.
    #[error("invalid definition: {0}")]
    Definition(#[from] crate::definition::Error),
    /// Two definitions with the same name and version were registered.
    #[error("definition `{name}` version {version} is registered twice")]
    DuplicateDefinition {
        /// Name.
        name: String,
        /// Version.
        version: u32,
    },
    /// `start` named a definition that is not registered.
    #[error("no definition named `{0}` is registered")]
    UnknownDefinition(String),
    /// The saga input does not decode as what a step expects.
    #[error("input does not fit step `{step}`: {reason}")]
    InvalidInput {
        /// The step whose input type rejected it.
        step: String,
        /// The decoding error.
        reason: String,
    },
    /// The saga input serializes to more bytes than the engine accepts.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The saga input nests arrays and objects deeper than the engine accepts (it could
    /// not be read back from the log).
    #[error("payload nests deeper than the limit of {limit} levels")]
    PayloadTooDeep {
        /// The limit.
        limit: usize,
    },
    /// A start key that is empty or too long.
    #[error("start key of {len} bytes; it must have 1 to {max}")]
    InvalidStartKey {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A start key that names a saga started with another input (G6): the caller reused
    /// a key for a different request. Nothing was started.
    #[error("start key `{key}` was used for saga {existing} with another input")]
    StartKeyConflict {
        /// The key.
        key: crate::ids::StartKey,
        /// The saga it names.
        existing: SagaId,
    },
    /// A cancellation was refused: the saga is past its pivot (it can only go forward),
    /// already compensating, parked, or ended. Nothing was written.
    #[error("cancellation of saga {saga} refused: {reason}")]
    CancelRefused {
        /// The saga.
        saga: SagaId,
        /// Why.
        reason: String,
    },
    /// No saga with this id.
    #[error("no saga with id {0}")]
    UnknownSaga(SagaId),
    /// A log record or summary of this saga does not decode or does not fit its log.
    #[error("saga {saga} has a corrupt log: {reason}")]
    CorruptLog {
        /// The saga.
        saga: SagaId,
        /// What does not decode or fit, and why.
        reason: String,
    },
    /// The saga is neither finished nor driven by this engine (the engine stopped driving
    /// it after a store failure, or is shutting down); it resumes when an engine opens
    /// the store again.
    #[error("saga {0} is not running in this engine")]
    NotRunning(SagaId),
    /// The engine is shutting down and takes no new work.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// An operator's repair was refused; nothing was written.
    #[error("repair of saga {saga} refused: {reason}")]
    RepairRefused {
        /// The saga.
        saga: SagaId,
        /// Why.
        reason: String,
    },
    /// A delivery (or approval) that cannot be accepted: an empty or too long key or
    /// delivery id, a payload that does not serialize, or an approval of a step that does
    /// not wait for an event. Nothing was written.
    #[error("delivery refused: {0}")]
    InvalidDelivery(String),
    /// A bulk repair was refused as a whole before any saga was touched: it lacks who
    /// or why. (A saga the repair does not fit is counted in its report, not refused
    /// here.)
    #[error("bulk repair refused: {0}")]
    BulkRefused(String),
    /// In a store several engine processes share: this process no longer holds the
    /// saga's lease (it stalled past it, or lost the store for longer than the lease
    /// lasts), so its write was refused and it stopped driving the saga. The process
    /// that holds the lease now drives it; nothing is lost.
    #[error("saga {saga} is fenced: another engine process holds its lease now")]
    Fenced {
        /// The saga.
        saga: SagaId,
    },
}

impl Error {
    /// The stable code of this error, for logs, alerts and `docs/errors/<code>.md`.
    ///
    /// ```
    /// use sagaflow::Error;
    ///
    /// assert_eq!(Error::UnknownDefinition("x".into()).code(), "SAGA-0004");
    /// ```
    pub fn code(&self) -> &'static str {
        match self {
            Error::Store(_) => "SAGA-0001",
            Error::Definition(_) => "SAGA-0002",
            Error::DuplicateDefinition { .. } => "SAGA-0003",
            Error::UnknownDefinition(_) => "SAGA-0004",
            Error::InvalidInput { .. } => "SAGA-0005",
            Error::PayloadTooLarge { .. } => "SAGA-0006",
            Error::InvalidStartKey { .. } => "SAGA-0007",
            Error::UnknownSaga(_) => "SAGA-0008",
            Error::CorruptLog { .. } => "SAGA-0009",
            Error::NotRunning(_) => "SAGA-0010",
            Error::ShuttingDown => "SAGA-0011",
            Error::RepairRefused { .. } => "SAGA-0012",
            Error::PayloadTooDeep { .. } => "SAGA-0013",
            Error::StoreDamaged(_) => "SAGA-0014",
            Error::NewerFormat { .. } => "SAGA-0015",
            Error::StartKeyConflict { .. } => "SAGA-0016",
            Error::CancelRefused { .. } => "SAGA-0017",
            Error::Fenced { .. } => "SAGA-0018",
            Error::InvalidDelivery(_) => "SAGA-0019",
            Error::BulkRefused(_) => "SAGA-0020",
        }
    }
}

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::Corrupt { saga, what, reason } => Error::CorruptLog {
                saga,
                reason: format!("{what}: {reason}"),
            },
            store::Error::NewerFormat { saga, what, reason } => Error::NewerFormat {
                saga,
                reason: format!("{what}: {reason}"),
            },
            e @ (store::Error::LostWrites { .. } | store::Error::WitnessDamaged { .. }) => {
                Error::StoreDamaged(Arc::new(e))
            }
            other => Error::Store(Arc::new(other)),
        }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
