//! Identifiers and counters, each its own type so that a step index is never passed
//! where an attempt number was meant.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::{Entropy, Timestamp};

/// The id of a saga instance: a UUID v7, so ids sort by creation time.
///
/// ```
/// use sagaflow::SagaId;
///
/// let id: SagaId = "0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071".parse()?;
/// assert_eq!(id.to_string(), "0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SagaId(Uuid);

impl SagaId {
    /// A new time-ordered id for a saga created at `now`, with its random part drawn from
    /// `entropy` (so a seeded simulation creates the same ids every run).
    pub fn generate(now: Timestamp, entropy: &dyn Entropy) -> Self {
        let mut bytes = [0u8; 10];
        bytes[..8].copy_from_slice(&entropy.next().to_be_bytes());
        bytes[8..].copy_from_slice(&entropy.next().to_be_bytes()[..2]);
        SagaId(uuid::Builder::from_unix_timestamp_millis(now.as_millis(), &bytes).into_uuid())
    }

    /// The id from its 16 raw bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        SagaId(Uuid::from_bytes(bytes))
    }

    /// The 16 raw bytes, big-endian, as used in store keys (so keys sort by time).
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for SagaId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(SagaId)
    }
}

/// The position of a record in one saga's log, starting at 0 for `Started`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An attempt number of a step action or compensation, starting at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Attempt(pub u32);

impl Attempt {
    /// The first attempt.
    pub const FIRST: Attempt = Attempt(1);

    /// The attempt after this one.
    pub fn next(self) -> Attempt {
        Attempt(self.0.saturating_add(1))
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which half of a step an attempt belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The step's forward action.
    Action,
    /// The step's compensating action.
    Compensation,
}

impl Phase {
    /// The phase as it appears in idempotency keys and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Action => "action",
            Phase::Compensation => "compensation",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The idempotency key of one step action or compensation (G3).
///
/// Derived from (saga id, step name, phase) only, so it is the same on every attempt and
/// after every restart. Pass it to the downstream service (for example as an
/// `Idempotency-Key` header): at-least-once execution then has exactly-once effect.
///
/// ```
/// use sagaflow::{IdempotencyKey, Phase, SagaId};
///
/// let saga: SagaId = "0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071".parse()?;
/// let key = IdempotencyKey::derive(saga, "charge", Phase::Action);
/// assert_eq!(key.as_str(), "0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071/charge/action");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The key for `step`'s `phase` in saga `saga`.
    pub fn derive(saga: SagaId, step: &str, phase: Phase) -> Self {
        IdempotencyKey(format!("{saga}/{step}/{phase}"))
    }

    /// The key as a string (at most 36 + 1 + 64 + 1 + 12 = 114 bytes, within what common
    /// payment APIs accept).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A caller-chosen key that makes `start` idempotent (G6): a second start with the same
/// key returns the saga the first one created.
///
/// ```
/// use sagaflow::StartKey;
///
/// let key = StartKey::new("order-42")?;
/// assert_eq!(key.as_str(), "order-42");
/// assert!(StartKey::new("").is_err());
/// # Ok::<(), sagaflow::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StartKey(String);

impl StartKey {
    /// The longest start key accepted, in bytes.
    pub const MAX_LEN: usize = 512;

    /// A start key.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidStartKey`] if `key` is empty or longer than
    /// [`StartKey::MAX_LEN`] bytes.
    pub fn new(key: impl Into<String>) -> crate::Result<Self> {
        let key = key.into();
        if key.is_empty() || key.len() > Self::MAX_LEN {
            return Err(crate::Error::InvalidStartKey {
                len: key.len(),
                max: Self::MAX_LEN,
            });
        }
        Ok(StartKey(key))
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StartKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SeededEntropy;

    #[test]
    fn ids_sort_by_time_and_replay_from_seed() {
        let e1 = SeededEntropy::new(1);
        let e2 = SeededEntropy::new(1);
        let a = SagaId::generate(Timestamp::from_millis(1_000), &e1);
        let b = SagaId::generate(Timestamp::from_millis(2_000), &e1);
        assert!(a < b);
        assert_eq!(a, SagaId::generate(Timestamp::from_millis(1_000), &e2));
        assert_eq!(a.as_uuid().get_version_num(), 7);
    }
}
