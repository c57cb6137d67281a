//! Time and randomness, injected.
//!
//! The engine never reads the wall clock or a global random source directly: every
//! decision is a pure function of the log, and the only inputs from the outside world
//! are the [`Clock`] and the [`Entropy`] given to the engine. A simulation swaps both for
//! deterministic ones, which is what makes a run replayable from its seed.

// The one module allowed to read the real clock and timers: everything else goes
// through `Clock` (engine/clippy.toml bans the direct calls elsewhere).
#![allow(clippy::disallowed_methods)]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time: milliseconds since the Unix epoch.
///
/// Log records carry timestamps in this form, so they are comparable across restarts and
/// machines (with the usual caveats about clock skew between machines).
///
/// ```
/// use std::time::Duration;
/// use sagaflow::Timestamp;
///
/// let t = Timestamp::from_millis(1_000);
/// assert_eq!(t.saturating_add(Duration::from_millis(500)).as_millis(), 1_500);
/// assert_eq!(Timestamp::from_millis(1_500).duration_since(t), Duration::from_millis(500));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch itself.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp from milliseconds since the Unix epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Timestamp(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// This timestamp plus `d`, saturating at the end of time rather than overflowing.
    pub fn saturating_add(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms))
    }

    /// How long after `earlier` this timestamp is; zero if it is not after it.
    pub fn duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0 / 1000;
        let ms = self.0 % 1000;
        // Civil date from days since the epoch (Howard Hinnant's algorithm), so that
        // histories print readable UTC times without pulling in a date crate.
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            rem / 3600,
            (rem / 60) % 60,
            rem % 60
        )
    }
}

/// A boxed future, as returned by [`Clock::sleep_until`].
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The source of time for an engine.
///
/// `now` stamps log records and decides whether a retry is due; `sleep_until` waits for
/// durable timers and per-attempt deadlines.
///
/// ```
/// use sagaflow::{Clock, SystemClock};
///
/// let clock = SystemClock;
/// assert!(clock.now().as_millis() > 0);
/// ```
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;

    /// A future that completes once [`Clock::now`] has reached `deadline`.
    fn sleep_until(&self, deadline: Timestamp) -> Sleep;
}

/// The wall clock, with tokio timers for waiting. The default for a real engine.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Timestamp(ms)
    }

    fn sleep_until(&self, deadline: Timestamp) -> Sleep {
        let wait = deadline.duration_since(self.now());
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock driven by tokio's timer, starting at a fixed timestamp.
///
/// Under `tokio::time::pause` (or `#[tokio::test(start_paused = true)]`) it is virtual:
/// time moves only when every task is idle, so a test of a one-hour retry-after runs in
/// microseconds and always sees the same timestamps. Pair it with
/// [`crate::CommitMode::RuntimeTask`]: with the default commit thread, the runtime is
/// idle while it waits for a sync, and virtual time runs on meanwhile.
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: Timestamp,
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock that reads `base` now and advances with tokio's time.
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime (tokio's `Instant::now` needs one when time
    /// is paused).
    pub fn starting_at(base: Timestamp) -> Self {
        TokioClock {
            base,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.base
            .saturating_add(tokio::time::Instant::now().duration_since(self.origin))
    }

    fn sleep_until(&self, deadline: Timestamp) -> Sleep {
        let at = self.origin + deadline.duration_since(self.base);
        Box::pin(tokio::time::sleep_until(at))
    }
}

/// The source of randomness for an engine: backoff jitter and saga ids.
///
/// Samples are keyed by what they are for (a saga, a step, an attempt) rather than drawn
/// from a shared stream, so the value for a given retry does not depend on how many other
/// sagas happened to draw before it. Replaying a log with the same seed gives the same
/// jitter whatever the interleaving.
pub trait Entropy: Send + Sync + fmt::Debug + 'static {
    /// A uniformly distributed value for the purpose named by `key`.
    fn sample(&self, key: &[u8]) -> u64;

    /// A fresh value; successive calls give different values.
    fn next(&self) -> u64;
}

/// Deterministic [`Entropy`] from a 64-bit seed.
///
/// ```
/// use sagaflow::{Entropy, SeededEntropy};
///
/// let a = SeededEntropy::new(7);
/// let b = SeededEntropy::new(7);
/// assert_eq!(a.sample(b"saga/step/3"), b.sample(b"saga/step/3"));
/// assert_ne!(a.sample(b"saga/step/3"), a.sample(b"saga/step/4"));
/// assert_eq!(a.next(), b.next());
/// ```
#[derive(Debug)]
pub struct SeededEntropy {
    seed: u64,
    counter: AtomicU64,
}

impl SeededEntropy {
    /// Entropy that always gives the same sequence for the same `seed`.
    pub fn new(seed: u64) -> Self {
        SeededEntropy {
            seed,
            counter: AtomicU64::new(0),
        }
    }

    /// The seed in `SAGA_SEED`, if it is set to a number: how a test run asks to be
    /// replayed. Engines use seeded entropy only when asked (this, or
    /// [`crate::EngineBuilder::seed`]): seeded ids are predictable.
    pub fn seed_from_environment() -> Option<u64> {
        std::env::var("SAGA_SEED")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// A seed from the wall clock and the process id: the fallback should the operating
    /// system's generator be unavailable.
    fn seed_from_clock() -> u64 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        splitmix64(nanos ^ u64::from(std::process::id()).rotate_left(32))
    }

    /// The seed this entropy was made from.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl Entropy for SeededEntropy {
    fn sample(&self, key: &[u8]) -> u64 {
        // FNV-1a over the key, then mixed with the seed: cheap, stable across Rust
        // versions (unlike `DefaultHasher`), and good enough for jitter.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        splitmix64(h ^ self.seed)
    }

    fn next(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        splitmix64(
            self.seed
                .wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        )
    }
}

/// [`Entropy`] from the operating system: the default, so that saga ids carry random bits
/// nobody can predict from an id seen before (G3's keys are derived from the id).
///
/// Jitter samples stay keyed, as with [`SeededEntropy`], under a secret seed drawn from
/// the operating system once; fresh values ([`Entropy::next`], used for ids) come from
/// the operating system every time.
///
/// ```
/// use sagaflow::{Entropy, OsEntropy};
///
/// let e = OsEntropy::new();
/// assert_ne!(e.next(), e.next());
/// assert_eq!(e.sample(b"k"), e.sample(b"k"));
/// ```
#[derive(Debug)]
pub struct OsEntropy {
    jitter: SeededEntropy,
}

impl OsEntropy {
    /// Entropy drawn from the operating system.
    pub fn new() -> Self {
        OsEntropy {
            jitter: SeededEntropy::new(os_u64().unwrap_or_else(SeededEntropy::seed_from_clock)),
        }
    }
}

impl Default for OsEntropy {
    fn default() -> Self {
        OsEntropy::new()
    }
}

impl Entropy for OsEntropy {
    fn sample(&self, key: &[u8]) -> u64 {
        self.jitter.sample(key)
    }

    fn next(&self) -> u64 {
        // The operating system's generator does not fail on Linux once booted; should it
        // ever, the secretly seeded stream still gives distinct values rather than none.
        os_u64().unwrap_or_else(|| self.jitter.next())
    }
}

fn os_u64() -> Option<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_displays_as_utc() {
        assert_eq!(Timestamp::EPOCH.to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp::from_millis(1_764_059_081_123).to_string(),
            "2025-11-25T08:24:41.123Z"
        );
    }

    #[test]
    fn duration_since_saturates() {
        let a = Timestamp::from_millis(10);
        let b = Timestamp::from_millis(20);
        assert_eq!(a.duration_since(b), Duration::ZERO);
        assert_eq!(
            Timestamp::from_millis(u64::MAX)
                .saturating_add(Duration::MAX)
                .as_millis(),
            u64::MAX
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_is_virtual_when_paused() {
        let clock = TokioClock::starting_at(Timestamp::from_millis(1_000));
        assert_eq!(clock.now(), Timestamp::from_millis(1_000));
        clock.sleep_until(Timestamp::from_millis(3_601_000)).await;
        assert_eq!(clock.now(), Timestamp::from_millis(3_601_000));
    }
}
