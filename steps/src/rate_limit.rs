//! Rate-aware queuing per integration.
//!
//! One [`RateLimiter`] per integration, shared (`Arc`) by every saga that calls it:
//! calls wait their turn under a rate (governor's GCRA) and a concurrency cap instead of
//! failing, and a `Retry-After` from the server ([`RateLimiter::pause_for`]) holds back
//! every caller of that integration, not only the saga that saw it.
//!
//! A pause is what a server asked for, so it is bounded: at most
//! [`DEFAULT_MAX_PAUSE`] (one hour) unless [`RateLimiter::with_max_pause`] says
//! otherwise. A longer request (`Retry-After: 18446744073709551615`) pauses the
//! integration for the maximum, is logged as clamped, and never overflows.
//!
//! ```
//! # async fn demo() {
//! use std::time::Duration;
//! use sagaflow_steps::rate_limit::RateLimiter;
//!
//! let inventory = RateLimiter::new("inventory").per_second(50, 10).max_concurrent(8);
//! let permit = inventory.acquire().await; // waits for a slot, then for the rate
//! // ... call the service; on a 429 with Retry-After: 2
//! inventory.pause_for(Duration::from_secs(2));
//! drop(permit);
//! # }
//! ```

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The longest a server's `Retry-After` pauses an integration unless
/// [`RateLimiter::with_max_pause`] sets another bound: one hour.
pub const DEFAULT_MAX_PAUSE: Duration = Duration::from_secs(3600);

/// A rate limit and a concurrency cap for one integration.
#[derive(Debug)]
pub struct RateLimiter {
    name: String,
    rate: Option<DefaultDirectRateLimiter>,
    slots: Option<Arc<Semaphore>>,
    paused_until: Mutex<Option<Instant>>,
    pauses: AtomicU64,
    max_pause: Duration,
}

/// The reconciler's lookups of an integration are paced by the limiter its steps use,
/// so that checking a provider never takes more from it than calling it may:
/// `ReconcileOptions::limit("payments", limiter.clone())`.
#[sagaflow::async_trait]
impl sagaflow::Pace for RateLimiter {
    async fn admit(&self) -> Box<dyn Send> {
        Box::new(self.acquire().await)
    }
}

/// Held for the duration of one call: it keeps a concurrency slot.
#[derive(Debug)]
pub struct LimitPermit {
    _slot: Option<OwnedSemaphorePermit>,
}

impl RateLimiter {
    /// A limiter with no limits yet.
    pub fn new(name: impl Into<String>) -> Self {
        RateLimiter {
            name: name.into(),
            rate: None,
            slots: None,
            paused_until: Mutex::new(None),
            pauses: AtomicU64::new(0),
            max_pause: DEFAULT_MAX_PAUSE,
        }
    }

    /// At most `per_second` calls a second, with bursts of up to `burst` (both at least 1).
    pub fn per_second(mut self, per_second: u32, burst: u32) -> Self {
        let n = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let b = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        self.rate = Some(DefaultDirectRateLimiter::direct(
            Quota::per_second(n).allow_burst(b),
        ));
        self
    }

    /// At most `n` calls in flight at once (at least 1).
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.slots = Some(Arc::new(Semaphore::new(n.max(1))));
        self
    }

    /// Bounds every pause a server asks for (default [`DEFAULT_MAX_PAUSE`]): a longer
    /// `Retry-After` pauses the integration for `max` only.
    pub fn with_max_pause(mut self, max: Duration) -> Self {
        self.max_pause = max;
        self
    }

    /// The bound on pauses (see [`RateLimiter::with_max_pause`]).
    pub fn max_pause(&self) -> Duration {
        self.max_pause
    }

    /// How long the pause in force still lasts, if there is one.
    pub fn pause_remaining(&self) -> Option<Duration> {
        self.paused()
            .map(|until| until.saturating_duration_since(Instant::now()))
    }

    /// The integration's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many times the server asked the integration to pause.
    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    fn paused(&self) -> Option<Instant> {
        let g = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        g.filter(|t| *t > Instant::now())
    }

    /// Waits for the integration's turn: past any pause, a free slot, then the rate.
    pub async fn acquire(&self) -> LimitPermit {
        // A pause can be extended while we wait: look again after each one.
        while let Some(until) = self.paused() {
            tokio::time::sleep_until(until).await;
        }
        let slot = match &self.slots {
            // The semaphore is never closed, so acquiring cannot fail.
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        if let Some(rate) = &self.rate {
            rate.until_ready().await;
        }
        while let Some(until) = self.paused() {
            tokio::time::sleep_until(until).await;
        }
        LimitPermit { _slot: slot }
    }

    /// Holds back every caller of this integration for `d` (a server's Retry-After),
    /// but never longer than [`RateLimiter::max_pause`]: any `d`, up to
    /// [`Duration::MAX`], is safe. A longer pause already in force is kept.
    pub fn pause_for(&self, d: Duration) {
        let pause = d.min(self.max_pause);
        if pause < d {
            tracing::warn!(integration = %self.name, asked = ?d, pause = ?pause, "the server's Retry-After is longer than the maximum pause: clamped");
        }
        let until = crate::instant_after(Instant::now(), pause);
        let mut g = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none_or(|t| t < until) {
            *g = Some(until);
            self.pauses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(integration = %self.name, pause = ?pause, "integration paused by the server's Retry-After");
        }
    }
}
