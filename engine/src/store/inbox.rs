//! The inbox: events delivered for await steps, kept until a saga takes them (G10).
//!
//! A delivery is addressed by a correlation key (what an await step waits on) and
//! carries the sender's delivery id. It is durable before [`Inbox::deliver`] returns, so
//! a sender that was told "accepted" never loses it; a second delivery with the same key
//! and id is not recorded again and is answered as a duplicate, whatever its payload.
//! A saga takes a delivery in the same atomic write as the records it makes of it
//! ([`crate::store::Write::taken`]): either both are durable or neither, so a crash can
//! neither lose an event nor apply it twice. Taken deliveries stay (they keep answering
//! duplicates) until they are purged with the rest.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::Timestamp;
use crate::ids::SagaId;
use crate::store::Result;

/// The longest correlation key or delivery id accepted, in bytes.
pub const MAX_INBOX_ID_LEN: usize = 256;

/// Whether `v` can be a correlation key or delivery id (`what` names which): 1 to
/// [`MAX_INBOX_ID_LEN`] bytes, and no NUL, which not every store can keep. Every store
/// takes exactly what this accepts.
///
/// # Errors
///
/// Why not, as a sentence.
pub fn check_id(what: &str, v: &str) -> std::result::Result<(), String> {
    if v.is_empty() || v.len() > MAX_INBOX_ID_LEN {
        return Err(format!(
            "a {what} has 1 to {MAX_INBOX_ID_LEN} bytes, not {}",
            v.len()
        ));
    }
    if v.contains('\0') {
        return Err(format!("a {what} cannot hold a NUL character"));
    }
    Ok(())
}

/// One delivered event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Delivery {
    /// The correlation key it is addressed to.
    pub key: String,
    /// The sender's delivery id.
    pub id: String,
    /// What it says: the await step's output once a saga takes it.
    pub payload: Value,
    /// When the engine accepted it.
    pub received_at: Timestamp,
    /// The saga that took it, once one has.
    pub taken_by: Option<SagaId>,
}

/// What [`Inbox::deliver`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Delivered {
    /// Recorded now, durably.
    New,
    /// A delivery with this key and id was recorded before: nothing was written.
    Duplicate,
}

/// A delivery a saga takes, in the write that records what it made of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taken {
    /// The correlation key.
    pub key: String,
    /// The delivery id.
    pub id: String,
}

/// Where deliveries wait for their sagas. Every store keeps one.
pub trait Inbox: Send + Sync {
    /// Records a delivery of `payload` for `key` with id `id`, received at `at`, and
    /// returns once it is durable; a delivery with the same key and id already recorded
    /// is not written again.
    ///
    /// # Errors
    ///
    /// An I/O or backend error: nothing is acknowledged, and the sender retries.
    fn deliver(&self, key: &str, id: &str, payload: &Value, at: Timestamp) -> Result<Delivered>;

    /// The deliveries for `key` that no saga has taken, oldest first.
    ///
    /// # Errors
    ///
    /// An I/O error, or a stored delivery that does not decode.
    fn waiting(&self, key: &str) -> Result<Vec<Delivery>>;

    /// Every delivery (taken or not), after `after` (a key and an id), at most `limit`,
    /// in an order of the store's that is the same on every call, so that pages neither
    /// skip nor repeat: what operators list.
    ///
    /// # Errors
    ///
    /// As [`Inbox::waiting`].
    fn deliveries(&self, after: Option<(&str, &str)>, limit: usize) -> Result<Vec<Delivery>>;

    /// Deletes the deliveries received before `before`, taken or not, and returns how
    /// many: an event nobody waited for is kept only so long (and a taken one answers
    /// duplicates only so long).
    ///
    /// # Errors
    ///
    /// An I/O or backend error.
    fn purge(&self, before: Timestamp) -> Result<usize>;
}
