//! Ownership of sagas in a store that several engine processes share (G9).
//!
//! Each active saga in a shared store has a *lease*: the process that drives it (its
//! owner), an *epoch*, and an expiry measured by the store's own clock (the database's,
//! never a process's). Every write an engine makes carries the epoch it holds ([`Fence`]);
//! the store refuses a write whose epoch is no longer the saga's (the technique Temporal
//! uses for its shard ranges, here per saga). A process that stalled past its lease and
//! resumes (a zombie) therefore cannot write: its first write is refused as
//! [`Refused::Fenced`] and its driver stops. Another process claims expired leases,
//! which bumps the epoch, and recovers those sagas exactly as an engine recovers at open.
//!
//! Because an attempt's start is durable before its effect runs (G1), a process whose
//! lease was taken cannot start a new effect; an effect already in flight when the lease
//! went may still land, and the new owner's retry of it carries the same idempotency key.
//!
//! Requests (repairs and cancellations) for a saga another process drives are recorded
//! in the store; its owner picks them up, applies them and records the answer.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::ids::{SagaId, StartKey};
use crate::store::Result;

/// Identifies one engine process among those sharing a store: unique per process start
/// (a restarted process is a new owner).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OwnerId(String);

impl OwnerId {
    /// An owner id of your choosing (at most 200 bytes are kept).
    pub fn new(id: impl Into<String>) -> Self {
        let mut s: String = id.into();
        if s.len() > 200 {
            let mut cut = 200;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
        OwnerId(s)
    }

    /// A fresh id for this process: host name, process id and a random suffix, so a
    /// restarted process never reuses its predecessor's leases.
    pub fn generate() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".to_string());
        let mut b = [0u8; 6];
        // Without randomness, fall back to the address of a fresh allocation: the id
        // must only differ from the previous process's, which the pid almost
        // guarantees already.
        if getrandom::fill(&mut b).is_err() {
            let probe = Box::new(0u8);
            let addr = std::ptr::addr_of!(*probe) as usize as u64;
            b.copy_from_slice(&addr.to_le_bytes()[..6]);
        }
        let suffix: String = b.iter().map(|x| format!("{x:02x}")).collect();
        OwnerId::new(format!("{host}:{}:{suffix}", std::process::id()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a write to a shared store carries: who writes, under which epoch of the saga's
/// lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The writing process.
    pub owner: OwnerId,
    /// The epoch it holds. A saga's first write carries epoch 1 and creates its lease.
    pub epoch: u64,
}

/// Why a shared store refused one write of a batch (its batch-mates are unaffected).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// The saga's lease moved on: another process holds a newer epoch (or the saga was
    /// released). The writer must stop driving it.
    #[error("saga {saga} is fenced: the write carries epoch {carried}, the saga is at {current}")]
    Fenced {
        /// The saga.
        saga: SagaId,
        /// The epoch the write carried.
        carried: u64,
        /// The saga's epoch now (0 if it has no lease row).
        current: u64,
    },
    /// A saga's first write names a start key another saga already holds (G6).
    #[error("start key `{key}` is taken by saga {existing}")]
    StartKeyTaken {
        /// The key.
        key: StartKey,
        /// The saga that holds it.
        existing: SagaId,
    },
}

/// A lease a process holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The saga.
    pub saga: SagaId,
    /// The epoch held.
    pub epoch: u64,
}

/// A repair or cancellation asked of a saga that another process may drive, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The store's number for it.
    pub id: u64,
    /// The saga.
    pub saga: SagaId,
    /// What is asked, as JSON (the engine's own encoding of a repair or a cancel).
    pub action: String,
    /// Who asked.
    pub operator: String,
    /// Why.
    pub reason: String,
}

/// How the owner answered a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// Applied: the saga's summary afterwards, as JSON.
    Applied(String),
    /// Refused, with the engine's error as text.
    Refused(String),
    /// The owner does not drive the saga (any more): the asker applies it itself.
    NotDriven,
}

/// Wake-up hints from a shared store: bumped when another process recorded something
/// this one may be waiting for. Hints only: whoever waits still polls, so a lost hint
/// costs a poll interval, never correctness.
#[derive(Clone, Debug)]
pub struct Changes {
    /// A request (repair, cancellation) was recorded for some saga.
    pub requests: tokio::sync::watch::Receiver<u64>,
    /// A saga ended, or a request was answered.
    pub outcomes: tokio::sync::watch::Receiver<u64>,
}

/// The lease operations of a store shared by several engine processes. A store that
/// one process owns alone (sled's directory lock, memory) does not offer them.
///
/// Every time in here is the store's: a lease expires by the store's clock, so the
/// clocks of the processes do not have to agree.
pub trait Leases: Send + Sync + fmt::Debug {
    /// How long a lease lasts after it is taken or renewed.
    fn ttl(&self) -> Duration;

    /// Takes up to `limit` claimable sagas of the named `definitions` for `owner`,
    /// bumping each one's epoch: active sagas whose lease expired, and released sagas
    /// whose wake-up time has come. Sagas `owner` holds already are not claimed again
    /// (it renews them); sagas of other definitions are left to a process that knows
    /// them (a rolling deploy).
    ///
    /// # Errors
    ///
    /// A backend error; then nothing was claimed.
    fn claim(&self, owner: &OwnerId, limit: usize, definitions: &[String]) -> Result<Vec<Lease>>;

    /// Takes the lease of one saga, whatever its status, if nobody else holds it
    /// unexpired (or `owner` does), bumping its epoch: for applying a repair to a saga
    /// no process drives. `None`: another live process holds it.
    ///
    /// # Errors
    ///
    /// A backend error.
    fn acquire(&self, owner: &OwnerId, saga: SagaId) -> Result<Option<Lease>>;

    /// Extends every lease `owner` still holds, and returns them.
    ///
    /// # Errors
    ///
    /// A backend error; then no lease was extended.
    fn renew(&self, owner: &OwnerId) -> Result<Vec<Lease>>;

    /// Gives a lease up: the saga becomes claimable by any process at `wake_at` (its
    /// next timer), or at once with `None`. Refused silently if the epoch moved.
    ///
    /// # Errors
    ///
    /// A backend error.
    fn release(&self, owner: &OwnerId, lease: Lease, wake_at: Option<Timestamp>) -> Result<()>;

    /// Who holds the saga's lease unexpired, and under which epoch; `None` if nobody.
    ///
    /// # Errors
    ///
    /// A backend error.
    fn holder(&self, saga: SagaId) -> Result<Option<(OwnerId, u64)>>;

    /// Records a request for the owner of `saga` (durable on return) and returns its
    /// number.
    ///
    /// # Errors
    ///
    /// A backend error.
    fn request(&self, saga: SagaId, action: &str, operator: &str, reason: &str) -> Result<u64>;

    /// The unanswered requests for sagas `owner` holds, oldest first.
    ///
    /// # Errors
    ///
    /// A backend error.
    fn requests_for(&self, owner: &OwnerId) -> Result<Vec<Request>>;

    /// Records the answer to request `id` unless it has one: the first answer wins,
    /// so an asker that gave up ([`Answer::NotDriven`]) and an owner that applied it
    /// cannot both act. Whether this answer was recorded.
    ///
    /// # Errors
    ///
    /// A backend error.
    fn answer(&self, id: u64, answer: &Answer) -> Result<bool>;

    /// The answer to request `id`, once there is one.
    ///
    /// # Errors
    ///
    /// A backend error.
    fn answer_of(&self, id: u64) -> Result<Option<Answer>>;

    /// Wake-up hints (PostgreSQL's LISTEN/NOTIFY), if the store has them; `None`: poll.
    fn changes(&self) -> Option<Changes> {
        None
    }
}
