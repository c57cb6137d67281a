//! Rate-aware queuing per integration.
//!
//! One [`RateLimiter`] per integration, shared (`Arc`) by every saga that calls it:
//! calls wait their turn under a rate (governor's GCRA) and a concurrency cap instead of
//! failing, and a `Retry-After` from the server ([`RateLimiter::pause_for`]) holds back
//! every caller of that integration, not only the saga that saw it.
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

/// A rate limit and a concurrency cap for one integration.
#[derive(Debug)]
pub struct RateLimiter {
    name: String,
    rate: Option<DefaultDirectRateLimiter>,
    slots: Option<Arc<Semaphore>>,
    paused_until: Mutex<Option<Instant>>,
    pauses: AtomicU64,
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

    /// Holds back every caller of this integration for `d` (a server's Retry-After).
    /// A longer pause already in force is kept.
    pub fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut g = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none_or(|t| t < until) {
            *g = Some(until);
            self.pauses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(integration = %self.name, pause = ?d, "integration paused by the server's Retry-After");
        }
    }
}
