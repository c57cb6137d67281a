//! Durable storage behind one small, synchronous trait.
//!
//! The engine's executor is the only caller. Writes are *appended* (visible to reads, not
//! yet durable) and then *synced*; nothing counts as durable before `sync` returns. The
//! group-commit writer appends everything that arrived while the previous sync ran, then
//! syncs once for all of it.
//!
//! Every store keeps the same keyed layout (see [`codec`]), big-endian so keys sort by
//! saga id (creation time) and lsn:
//!
//! | key | value |
//! | --- | --- |
//! | `L` saga-id lsn | one log record |
//! | `M` saga-id | the saga's summary ([`SagaMeta`]) |
//! | `S` status saga-id | empty: the status index |
//! | `T` due-time saga-id | empty: the durable retry timers |
//! | `K` start-key | saga id: the start-key index (G6) |

pub mod codec;
mod kv;
mod memory;
mod sled;
#[cfg(test)]
mod tests;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::ids::{Lsn, SagaId, StartKey};
use crate::machine::SagaStatus;

pub use memory::MemLog;
pub use sled::SledLog;

/// Errors from a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system refused a read, write or sync.
    #[error("storage i/o failed: {0}")]
    Io(#[from] std::io::Error),
    /// The storage backend reported an error.
    #[error("storage backend failed: {0}")]
    Backend(String),
    /// Another engine holds the data directory.
    #[error("data directory {path} is locked by another engine")]
    Locked {
        /// The directory.
        path: String,
    },
    /// A stored value does not decode.
    #[error("corrupt {what} of saga {saga}: {reason}")]
    Corrupt {
        /// The saga the value belongs to.
        saga: SagaId,
        /// What was being read ("log record 3", "summary").
        what: String,
        /// Why it does not decode.
        reason: String,
    },
    /// A store index entry does not decode (its saga is unknown).
    #[error("corrupt index entry: {0}")]
    CorruptIndex(String),
    /// A simulated failure injected by a test.
    #[error("injected fault: {0}")]
    Injected(String),
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A saga's summary, kept beside its log so that listing sagas does not replay logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaMeta {
    /// The saga.
    pub id: SagaId,
    /// Definition name.
    pub definition: String,
    /// Definition version.
    pub version: u32,
    /// Current status.
    pub status: SagaStatus,
    /// The start key, if the saga was started with one.
    pub start_key: Option<StartKey>,
    /// When it started.
    pub created_at: Timestamp,
    /// When its latest record was written (read from the log's tail: stores do not
    /// rewrite the summary on every transition).
    pub updated_at: Timestamp,
    /// The latest record's lsn (likewise).
    pub last_lsn: Lsn,
    /// When its next retry is due, while it waits for one.
    pub due: Option<Timestamp>,
    /// Why it was compensated or parked.
    pub reason: Option<String>,
}

impl SagaMeta {
    /// The summary of `state`.
    pub fn of(state: &crate::machine::SagaState) -> SagaMeta {
        let s = state;
        let reason = match s.status {
            SagaStatus::Parked => s.parked.as_ref().map(|p| p.message.clone()),
            SagaStatus::Compensating | SagaStatus::Compensated => s.compensation_reason.clone(),
            SagaStatus::Resolved => s
                .resolution
                .as_ref()
                .map(|(who, why)| format!("resolved by {who}: {why}")),
            _ => None,
        };
        SagaMeta {
            id: s.id,
            definition: s.definition.clone(),
            version: s.version,
            status: s.status,
            start_key: s.start_key.clone(),
            created_at: s.created_at,
            updated_at: s.updated_at,
            last_lsn: Lsn(s.next_lsn.0.saturating_sub(1)),
            due: s.next_timer(),
            reason,
        }
    }
}

/// One atomic transition of one saga: its new log records and every index they touch.
#[derive(Clone, Debug)]
pub struct Write {
    /// The saga.
    pub saga: SagaId,
    /// New log records, encoded with [`codec::encode_record`], in lsn order.
    pub records: Vec<(Lsn, Vec<u8>)>,
    /// The summary after these records.
    pub meta: SagaMeta,
    /// The summary before them (`None` for the saga's first write), so the store can
    /// drop index entries that no longer hold.
    pub previous: Option<SagaMeta>,
}

/// The storage of saga logs.
///
/// Implementations must make each [`Write`] atomic (all of it or none of it after a
/// crash) and keep writes in the order appended. Reads see appended writes at once,
/// durable or not.
pub trait SagaLog: Send + Sync + fmt::Debug + 'static {
    /// Applies `writes`, each atomically, in order. They are visible to reads at once and
    /// durable only after the next [`SagaLog::sync`] returns.
    ///
    /// # Errors
    ///
    /// An I/O or backend error; then none, some or all of `writes` may be applied, each
    /// whole or not at all.
    fn append(&self, writes: Vec<Write>) -> Result<()>;

    /// Makes every appended write durable: on stable storage, across a power loss.
    ///
    /// # Errors
    ///
    /// An I/O or backend error; then nothing appended since the last successful sync may
    /// be assumed durable.
    fn sync(&self) -> Result<()>;

    /// The saga's stored log values in lsn order, still encoded (decode them with
    /// [`codec::decode_log`]: one value may hold several records); empty if the saga is
    /// unknown.
    ///
    /// # Errors
    ///
    /// An I/O or backend error, or [`Error::Corrupt`] for a key that does not parse.
    fn read(&self, saga: SagaId) -> Result<Vec<(Lsn, Vec<u8>)>>;

    /// The saga's summary, or `None` if the saga is unknown.
    ///
    /// # Errors
    ///
    /// An I/O or backend error, or [`Error::Corrupt`] if the summary does not decode.
    fn meta(&self, saga: SagaId) -> Result<Option<SagaMeta>>;

    /// The ids of the sagas with `status`, oldest first.
    ///
    /// # Errors
    ///
    /// An I/O or backend error, or [`Error::CorruptIndex`].
    fn with_status(&self, status: SagaStatus) -> Result<Vec<SagaId>>;

    /// The saga started with `key`, if any.
    ///
    /// # Errors
    ///
    /// An I/O or backend error, or [`Error::CorruptIndex`].
    fn find_start_key(&self, key: &StartKey) -> Result<Option<SagaId>>;

    /// The retry timers due at or before `until`, earliest first.
    ///
    /// # Errors
    ///
    /// An I/O or backend error, or [`Error::CorruptIndex`].
    fn due(&self, until: Timestamp) -> Result<Vec<(Timestamp, SagaId)>>;

    /// Deletes a saga: its log, summary and index entries. Durable after the next sync.
    ///
    /// # Errors
    ///
    /// An I/O or backend error, or [`Error::Corrupt`] if its summary does not decode.
    fn remove(&self, saga: SagaId) -> Result<()>;

    /// The sagas the engine must drive: running or compensating.
    ///
    /// # Errors
    ///
    /// As [`SagaLog::with_status`].
    fn incomplete(&self) -> Result<Vec<SagaId>> {
        let mut ids = self.with_status(SagaStatus::Running)?;
        ids.extend(self.with_status(SagaStatus::Compensating)?);
        ids.sort();
        Ok(ids)
    }
}
