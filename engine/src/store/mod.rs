//! Durable storage behind one small, synchronous trait.
//!
//! The engine's executor is the only caller. Writes are *appended* (visible to reads, not
//! yet durable) and then *synced*; nothing counts as durable before `sync` returns. The
//! group-commit writer appends everything that arrived while the previous sync ran, then
//! syncs once for all of it.
//!
//! Every store keeps the same keyed layout (the `codec` module), big-endian so keys sort by
//! saga id (creation time) and lsn:
//!
//! | key | value |
//! | --- | --- |
//! | `L` saga-id lsn | one log record |
//! | `M` saga-id | the saga's summary ([`SagaMeta`]) |
//! | `S` status saga-id | empty: the status index |
//! | `T` due-time saga-id | empty: the durable retry timers |
//! | `K` start-key | saga id: the start-key index (G6) |
//! | `I` key-length key delivery-id | a delivered event ([`Inbox`]) |
//! | `J` key-length key delivery-id | saga id: the saga that took it |

mod check;
pub mod inbox;
// The byte layout is the stores' own business; tests that build damaged stores see it
// through the `test-support` feature.
#[cfg(feature = "test-support")]
pub mod codec;
#[cfg(not(feature = "test-support"))]
pub(crate) mod codec;
mod kv;
mod lease;
mod lease_table;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod sled;
#[cfg(test)]
mod tests;
mod witness;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::ids::{Lsn, SagaId, StartKey};
use crate::machine::SagaStatus;

pub use check::{Finding, Report as CheckReport};
pub use inbox::{Delivered, Delivery, Inbox, Taken};
pub use lease::{Answer, Changes, Fence, Lease, Leases, OwnerId, Refused, Request};
pub use memory::MemLog;
#[cfg(feature = "postgres")]
pub use postgres::{PgLog, PgOptions, SCHEMA_VERSION};
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
    /// A stored value was written by a newer engine: a format byte, an event type or a
    /// field value this engine does not know. Nothing is wrong with the data; this engine
    /// cannot read it.
    #[error("{what} of saga {saga} was written by a newer engine: {reason}")]
    NewerFormat {
        /// The saga the value belongs to.
        saga: SagaId,
        /// What was being read.
        what: String,
        /// What this engine does not know.
        reason: String,
    },
    /// A write would have replaced a log record already stored. Refused as a whole: a
    /// log is append-only, and an engine that computes an lsn already taken has misread
    /// the log.
    #[error("refusing to overwrite log record {lsn} of saga {saga}")]
    WouldOverwrite {
        /// The saga.
        saga: SagaId,
        /// The lsn already taken.
        lsn: Lsn,
    },
    /// Committed writes are missing from the store: it holds fewer group commits than
    /// its witness recorded as durable. The store is damaged (a flipped byte, a truncated
    /// file, a partial restore); the engine refuses to go on as if the lost sagas had
    /// never existed. Restore the directory from a backup.
    #[error(
        "store {path} lost committed writes: its witness records commit {witnessed} as durable, \
         the store holds only {found}; restore the directory from a backup (docs/errors/SAGA-0014.md)"
    )]
    LostWrites {
        /// The data directory.
        path: String,
        /// The last commit the witness recorded as durable.
        witnessed: u64,
        /// The last commit found in the store (0 if none).
        found: u64,
    },
    /// The witness file beside the store is missing or unreadable while the store holds
    /// commits, so the engine cannot tell whether committed writes were lost.
    #[error("store {path}: {problem} (docs/errors/SAGA-0014.md)")]
    WitnessDamaged {
        /// The data directory.
        path: String,
        /// What is wrong with it.
        problem: String,
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
    /// When its next retry is due, while it waits for one (or when its settle window
    /// ends, see `settling_until`).
    pub due: Option<Timestamp>,
    /// While the saga waits for an attempt whose outcome is unknown to reach its
    /// deadline before anything is undone (G4): until when. Shown as "settling until t".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settling_until: Option<Timestamp>,
    /// While an await step waits for its event: the key, and until when (the saga is
    /// waiting, not stuck). Shown as "event `key` until t".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting: Option<Awaiting>,
    /// A delayed start not yet begun: when its first step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<Timestamp>,
    /// Why it was compensated or parked.
    pub reason: Option<String>,
    /// When it finished (completed, compensated, cancelled or resolved): what retention
    /// counts from. `None` while it has not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Drifts the reconciler recorded on the finished saga that no operator has marked
    /// handled yet. A saga with any is in the drift index.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub open_drifts: u32,
    /// While parked: the kind of attention it needs (what an operator filters on).
    /// `None` in summaries written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub park_kind: Option<crate::machine::ParkKind>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What an await step waits for: see [`SagaMeta::awaiting`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Awaiting {
    /// The correlation key.
    pub key: String,
    /// Its deadline.
    pub until: Timestamp,
}

impl SagaMeta {
    /// The summary after one record (written at `lsn`, `now`) that moves a saga whose log
    /// cannot be folded to `status`: built from its stored summary `previous`, or from
    /// nothing if that is unreadable too. For parking a damaged saga and resolving one.
    pub(crate) fn over_unreadable_log(
        id: SagaId,
        previous: Option<&SagaMeta>,
        status: SagaStatus,
        lsn: Lsn,
        now: Timestamp,
        reason: String,
    ) -> SagaMeta {
        SagaMeta {
            id,
            definition: previous
                .map_or_else(|| "<unreadable>".to_string(), |m| m.definition.clone()),
            version: previous.map_or(0, |m| m.version),
            status,
            start_key: previous.and_then(|m| m.start_key.clone()),
            created_at: previous.map_or(now, |m| m.created_at),
            updated_at: now,
            last_lsn: lsn,
            due: None,
            settling_until: None,
            awaiting: None,
            starts_at: None,
            reason: Some(reason),
            finished_at: status.is_final().then_some(now),
            open_drifts: 0,
            park_kind: (status == SagaStatus::Parked)
                .then_some(crate::machine::ParkKind::CorruptLog),
        }
    }

    /// The summary of `state`.
    pub fn of(state: &crate::machine::SagaState) -> SagaMeta {
        let s = state;
        let reason = match s.status {
            SagaStatus::Parked => s.parked.as_ref().map(|p| p.message.clone()),
            SagaStatus::Compensating | SagaStatus::Compensated | SagaStatus::Cancelled => {
                s.compensation_reason.clone()
            }
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
            settling_until: s.settling_until(),
            awaiting: s.awaiting().map(|(key, until)| Awaiting { key, until }),
            starts_at: s
                .not_before
                .filter(|_| s.status == SagaStatus::Running)
                .filter(|_| s.steps.iter().all(|st| !st.action.started())),
            reason,
            // The end's time, not the latest record's: drift records and their handling
            // come after the end and must not move the saga in the finish-time index.
            finished_at: s.ended_at.filter(|_| s.status.is_final()),
            open_drifts: u32::try_from(s.open_drifts().count()).unwrap_or(u32::MAX),
            park_kind: s
                .parked
                .as_ref()
                .filter(|_| s.status == SagaStatus::Parked)
                .map(|p| p.kind),
        }
    }
}

/// One atomic transition of one saga: its new log records and every index they touch.
#[derive(Clone, Debug)]
pub struct Write {
    /// The saga.
    pub saga: SagaId,
    /// New log records, in lsn order: the store encodes them (a store may keep several
    /// written together as one value).
    pub records: Vec<crate::machine::LogRecord>,
    /// The summary after these records.
    pub meta: SagaMeta,
    /// The summary before them (`None` for the saga's first write), so the store can
    /// drop index entries that no longer hold.
    pub previous: Option<SagaMeta>,
    /// In a shared store, the writer's lease: the write is refused unless the saga is
    /// still at this epoch under this owner ([`Refused::Fenced`]). `None` in a store one
    /// process owns alone.
    pub fence: Option<Fence>,
    /// Deliveries from the inbox that these records take (an await step's event): taken
    /// in the same atomic write, so that an event is never lost nor applied twice.
    pub taken: Vec<Taken>,
}

/// How many sagas a store holds, by status and by definition, as its counters say (a
/// store keeps them with every write: stats never read every summary).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counts {
    /// By status.
    pub by_status: std::collections::BTreeMap<SagaStatus, u64>,
    /// By definition, then status.
    pub by_definition:
        std::collections::BTreeMap<String, std::collections::BTreeMap<SagaStatus, u64>>,
}

/// One saga as [`SagaLog::load`] reads it: its stored log values and its summary.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Loaded {
    /// The saga.
    pub saga: SagaId,
    /// Its log values in lsn order, as [`SagaLog::read`] gives them.
    pub log: Vec<(Lsn, Vec<u8>)>,
    /// Its summary; `None` if it has none or it does not decode.
    pub meta: Option<SagaMeta>,
}

/// What became of one write of a batch given to [`SagaLog::append_each`].
pub type WriteResult = std::result::Result<(), Refused>;

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

    /// As [`SagaLog::append`], with a result per write: in a shared store a write can be
    /// refused on its own (a stale epoch, a start key taken) while its batch-mates are
    /// applied. A store that refuses no single write uses this default.
    ///
    /// # Errors
    ///
    /// As [`SagaLog::append`]: then the whole batch failed.
    fn append_each(&self, writes: Vec<Write>) -> Result<Vec<WriteResult>> {
        let n = writes.len();
        self.append(writes)?;
        Ok(vec![Ok(()); n])
    }

    /// The store's inbox: events delivered for await steps (G10).
    fn inbox(&self) -> &dyn Inbox;

    /// The lease operations, in a store several engine processes share; `None` in a
    /// store one process owns alone.
    fn leases(&self) -> Option<&dyn Leases> {
        None
    }

    /// Whether calls cross a network (and may take milliseconds): the engine then makes
    /// them from threads of their own, never from its async runtime's.
    fn remote(&self) -> bool {
        false
    }

    /// Makes every appended write durable: on stable storage, across a power loss.
    ///
    /// # Errors
    ///
    /// An I/O or backend error; then nothing appended since the last successful sync may
    /// be assumed durable.
    fn sync(&self) -> Result<()>;

    /// The saga's stored log values in lsn order, still encoded as the store wrote them
    /// (one value may hold several records; the engine decodes them, and reads a log up to
    /// a value that does not decode); empty if the saga is unknown.
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

    /// Up to `limit` finished sagas, by finish time, that finished at or before `until`
    /// and after `after` (a cursor: the last one a previous call returned).
    ///
    /// # Errors
    ///
    /// An I/O or backend error, or [`Error::CorruptIndex`].
    fn finished_before(
        &self,
        until: Timestamp,
        after: Option<(Timestamp, SagaId)>,
        limit: usize,
    ) -> Result<Vec<(Timestamp, SagaId)>>;

    /// Deletes a saga: its log, summary and index entries. Durable after the next sync.
    ///
    /// # Errors
    ///
    /// An I/O or backend error, or [`Error::Corrupt`] if its summary does not decode.
    fn remove(&self, saga: SagaId) -> Result<()>;

    /// Checks every index entry against the summaries and logs it stands for, repairs
    /// what can be rebuilt (durably, before returning), and reports every inconsistency
    /// and every saga that cannot be driven as it is (see the `check` module). The
    /// engine calls it when it opens the store, before recovery.
    ///
    /// # Errors
    ///
    /// An I/O or backend error.
    fn check(&self) -> Result<CheckReport>;

    /// Deletes several sagas, as [`SagaLog::remove`] does each, in as few store writes as
    /// the store can (retention deletes in batches). Durable after the next sync.
    ///
    /// # Errors
    ///
    /// As [`SagaLog::remove`]; then some of them may be deleted.
    fn remove_batch(&self, sagas: &[SagaId]) -> Result<()> {
        for s in sagas {
            self.remove(*s)?;
        }
        Ok(())
    }

    /// A page of summaries: the sagas with `status` (every saga if `None`) in id order,
    /// which is creation order, strictly after the cursor `after` (or, `newest_first`,
    /// strictly before it, newest first), at most `limit`. Walks an index from the
    /// cursor: a page costs the same in a store of a million sagas as in one of ten.
    /// A summary that does not decode is skipped with a warning.
    ///
    /// The default reads the whole status index; every store of this crate does better.
    ///
    /// # Errors
    ///
    /// An I/O or backend error.
    fn page(
        &self,
        status: Option<SagaStatus>,
        after: Option<SagaId>,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<SagaMeta>> {
        let mut ids = Vec::new();
        for s in status.map_or(SagaStatus::ALL.to_vec(), |s| vec![s]) {
            ids.extend(self.with_status(s)?);
        }
        ids.sort();
        if newest_first {
            ids.reverse();
        }
        let mut out = Vec::new();
        for id in ids.into_iter().filter(|id| match after {
            None => true,
            Some(a) if newest_first => *id < a,
            Some(a) => *id > a,
        }) {
            if out.len() >= limit {
                break;
            }
            match self.meta(id) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => {}
                Err(e) => tracing::warn!(saga_id = %id, error = %e, "summary does not decode"),
            }
        }
        Ok(out)
    }

    /// Several sagas' logs and summaries at once: what recovery reads for a batch of
    /// claimed sagas, in as few round trips as the store can. In the order asked.
    ///
    /// # Errors
    ///
    /// An I/O or backend error.
    fn load(&self, sagas: &[SagaId]) -> Result<Vec<Loaded>> {
        sagas
            .iter()
            .map(|&saga| {
                Ok(Loaded {
                    saga,
                    log: self.read(saga)?,
                    meta: self.meta(saga).ok().flatten(),
                })
            })
            .collect()
    }

    /// The summaries of several sagas at once, in no particular order, in as few round
    /// trips as the store can (one on PostgreSQL): what the dashboard's activity reads
    /// for the sagas that finished in its window. An unknown saga is left out, and so is
    /// a summary that does not decode (with a warning), so that one bad saga does not
    /// hide the others.
    ///
    /// # Errors
    ///
    /// An I/O or backend error.
    fn metas(&self, sagas: &[SagaId]) -> Result<Vec<SagaMeta>> {
        let mut out = Vec::with_capacity(sagas.len());
        for &saga in sagas {
            match self.meta(saga) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => {}
                Err(e @ (Error::Corrupt { .. } | Error::NewerFormat { .. })) => {
                    tracing::warn!(saga_id = %saga, error = %e, "summary does not decode");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// How many sagas there are, by status and by definition.
    ///
    /// The default reads every summary; every store of this crate keeps counters.
    ///
    /// # Errors
    ///
    /// An I/O or backend error.
    fn counts(&self) -> Result<Counts> {
        let mut c = Counts::default();
        for m in self.page(None, None, usize::MAX, false)? {
            *c.by_status.entry(m.status).or_default() += 1;
            *c.by_definition
                .entry(m.definition)
                .or_default()
                .entry(m.status)
                .or_default() += 1;
        }
        Ok(c)
    }

    /// Up to `limit` summaries of sagas with open drifts (see [`SagaMeta::open_drifts`]),
    /// in id order after `after`: a walk of the drift index.
    ///
    /// The default reads every summary; every store of this crate keeps the index.
    ///
    /// # Errors
    ///
    /// An I/O or backend error.
    fn drifted(&self, after: Option<SagaId>, limit: usize) -> Result<Vec<SagaMeta>> {
        let mut out = Vec::new();
        let mut cursor = after;
        loop {
            let page = self.page(None, cursor, 1000, false)?;
            let Some(last) = page.last() else {
                return Ok(out);
            };
            cursor = Some(last.id);
            for m in page.into_iter().filter(|m| m.open_drifts > 0) {
                if out.len() >= limit {
                    return Ok(out);
                }
                out.push(m);
            }
        }
    }

    /// The position stored under `name` by [`SagaLog::set_position`]: where a walk of
    /// the finish-time index (the reconciler's) goes on after a restart.
    ///
    /// # Errors
    ///
    /// An I/O or backend error, or [`Error::CorruptIndex`] if it does not decode.
    fn position(&self, name: &str) -> Result<Option<(Timestamp, SagaId)>>;

    /// Stores `at` under `name`, unless a later position is stored there already (a
    /// position only moves forward, whoever writes it). Durable after the next
    /// [`SagaLog::sync`].
    ///
    /// # Errors
    ///
    /// An I/O or backend error.
    fn set_position(&self, name: &str, at: (Timestamp, SagaId)) -> Result<()>;

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
