//! Retry policies: how many attempts, how long between them, how long each may take.
//!
//! Backoff is exponential with *full jitter* (a uniformly random delay between zero and
//! the exponential bound): under contention it spreads retries best of the common
//! schemes, so a fleet of sagas that failed together does not retry together. The random
//! draw comes from the engine's injected [`crate::Entropy`], and the resulting time is
//! written to the log, so a replay or a restart sees the same schedule (G7).

use std::time::Duration;

use crate::clock::Timestamp;

/// How a step action or a compensation is retried.
///
/// ```
/// use std::time::Duration;
/// use sagaflow::RetryPolicy;
///
/// let policy = RetryPolicy::default()
///     .with_max_attempts(3)
///     .with_initial_backoff(Duration::from_millis(50))
///     .with_max_backoff(Duration::from_secs(2))
///     .with_attempt_timeout(Duration::from_secs(5));
/// assert_eq!(policy.max_attempts, Some(3));
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included; `None` retries until success or an operator
    /// acts (the default for retriable steps after the pivot).
    pub max_attempts: Option<u32>,
    /// Upper bound of the delay before the second attempt.
    pub initial_backoff: Duration,
    /// Growth of the bound per attempt.
    pub multiplier: f64,
    /// The bound never grows past this.
    pub max_backoff: Duration,
    /// How long one attempt may run before it counts as a retryable failure.
    pub attempt_timeout: Duration,
    /// The longest "retry after" hint honoured (G7): a step (or a server behind it)
    /// asking for more waits this long, not years.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    /// Five attempts, 100 ms doubling to at most 30 s, 30 s per attempt, retry-after
    /// hints honoured up to an hour.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: Some(5),
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(3600),
        }
    }
}

impl RetryPolicy {
    /// The default policy for compensations: more patient than actions (ten attempts, up
    /// to five minutes apart), because a compensation that gives up parks the saga.
    pub fn compensation_default() -> Self {
        RetryPolicy {
            max_attempts: Some(10),
            max_backoff: Duration::from_secs(300),
            ..RetryPolicy::default()
        }
    }

    /// The default for retriable steps after the pivot: unlimited attempts.
    pub fn forever() -> Self {
        RetryPolicy {
            max_attempts: None,
            max_backoff: Duration::from_secs(300),
            ..RetryPolicy::default()
        }
    }

    /// Sets [`RetryPolicy::max_retry_after`].
    pub fn with_max_retry_after(mut self, d: Duration) -> Self {
        self.max_retry_after = d;
        self
    }

    /// Sets [`RetryPolicy::max_attempts`] (at least 1).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts.max(1));
        self
    }

    /// Retry without limit.
    pub fn with_unlimited_attempts(mut self) -> Self {
        self.max_attempts = None;
        self
    }

    /// Sets [`RetryPolicy::initial_backoff`].
    pub fn with_initial_backoff(mut self, d: Duration) -> Self {
        self.initial_backoff = d;
        self
    }

    /// Sets [`RetryPolicy::multiplier`] (values below 1 are taken as 1).
    pub fn with_multiplier(mut self, m: f64) -> Self {
        self.multiplier = if m.is_finite() { m.max(1.0) } else { 1.0 };
        self
    }

    /// Sets [`RetryPolicy::max_backoff`].
    pub fn with_max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// Sets [`RetryPolicy::attempt_timeout`].
    pub fn with_attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = d;
        self
    }

    /// Whether attempt number `attempt` (1-based) may be followed by another.
    pub fn allows_another(&self, attempt: u32) -> bool {
        self.max_attempts.is_none_or(|max| attempt < max)
    }

    /// The exponential bound for the delay after attempt `attempt`, before jitter.
    pub fn backoff_bound(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(63) as i32;
        let secs = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        let cap = self.max_backoff.as_secs_f64();
        Duration::from_secs_f64(if secs.is_finite() { secs.min(cap) } else { cap })
    }

    /// When the attempt after `attempt` is due, or `None` if the policy allows no more.
    ///
    /// `jitter` is a uniform random 64-bit value; the delay is `bound * jitter / 2^64`
    /// (full jitter). A `retry_after` hint from the failure (a 429's Retry-After) is a
    /// lower bound: the next attempt is never earlier than it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sagaflow::{RetryPolicy, Timestamp};
    ///
    /// let p = RetryPolicy::default().with_max_attempts(2);
    /// let now = Timestamp::from_millis(0);
    /// let next = p.next_attempt_at(1, now, u64::MAX, None).unwrap();
    /// assert!(next.as_millis() <= 100);
    /// let hinted = p.next_attempt_at(1, now, 0, Some(Duration::from_secs(7))).unwrap();
    /// assert_eq!(hinted.as_millis(), 7_000);
    /// assert_eq!(p.next_attempt_at(2, now, 0, None), None);
    /// ```
    pub fn next_attempt_at(
        &self,
        attempt: u32,
        now: Timestamp,
        jitter: u64,
        retry_after: Option<Duration>,
    ) -> Option<Timestamp> {
        if !self.allows_another(attempt) {
            return None;
        }
        let bound = self.backoff_bound(attempt);
        let fraction = (jitter >> 11) as f64 / (1u64 << 53) as f64;
        let delay = Duration::from_secs_f64(bound.as_secs_f64() * fraction);
        let delay = match retry_after {
            Some(hint) => delay.max(hint.min(self.max_retry_after)),
            None => delay,
        };
        Some(now.saturating_add(delay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bound_grows_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff_bound(1), Duration::from_millis(100));
        assert_eq!(p.backoff_bound(2), Duration::from_millis(200));
        assert_eq!(p.backoff_bound(4), Duration::from_millis(800));
        assert_eq!(p.backoff_bound(40), Duration::from_secs(30));
        assert_eq!(p.backoff_bound(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn unlimited_policy_always_allows_another() {
        let p = RetryPolicy::forever();
        assert!(p
            .next_attempt_at(1_000_000, Timestamp::EPOCH, 5, None)
            .is_some());
    }

    proptest! {
        #[test]
        fn delay_is_within_bound_or_hint(attempt in 1u32..40, jitter: u64, hint_ms in proptest::option::of(0u64..10_000_000)) {
            let p = RetryPolicy::default().with_unlimited_attempts();
            let now = Timestamp::from_millis(1_000);
            let hint = hint_ms.map(Duration::from_millis);
            let at = p.next_attempt_at(attempt, now, jitter, hint).expect("unlimited");
            let delay = at.duration_since(now);
            let hint = hint.map(|h| h.min(p.max_retry_after));
            let bound = p.backoff_bound(attempt).max(hint.unwrap_or_default());
            prop_assert!(delay <= bound + Duration::from_millis(1));
            if let Some(h) = hint { prop_assert!(delay >= h); }
        }

        #[test]
        fn a_hint_is_clamped_to_the_policy(hint_s in 3_601u64..u64::MAX / 2) {
            let p = RetryPolicy::default();
            let now = Timestamp::from_millis(1_000);
            let at = p.next_attempt_at(1, now, 0, Some(Duration::from_secs(hint_s))).unwrap();
            prop_assert_eq!(at.duration_since(now), p.max_retry_after);
        }
    }
}
