//! A circuit breaker per integration: closed, open, half-open.
//!
//! It opens when, over the last `window` calls (and at least `min_calls` of them), the
//! share of failures reaches `failure_rate`. While open, calls fail fast as *retryable
//! after the remaining open time*, so the engine schedules a durable retry instead of
//! hammering a dead service. After `open_for` it lets `trial_calls` calls through
//! (half-open): if they all succeed it closes, if one fails it opens again. State
//! changes are logged and counted.
//!
//! Time comes from an injected [`sagaflow::Clock`], so tests can open and close a breaker
//! without waiting.
//!
//! ```
//! use std::sync::Arc;
//! use sagaflow_steps::circuit_breaker::{BreakerConfig, CallResult, CircuitBreaker, State};
//!
//! let breaker = CircuitBreaker::new("payments", BreakerConfig::default().with_min_calls(2));
//! for _ in 0..2 {
//!     let permit = breaker.permit().expect("closed");
//!     breaker.record(permit, CallResult::Failure);
//! }
//! assert_eq!(breaker.state(), State::Open);
//! let refused = breaker.permit().unwrap_err();
//! assert!(refused.retry_after_hint().is_some());
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sagaflow::{Clock, StepError, SystemClock, Timestamp};

/// When a breaker opens and how it recovers.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Share of failures (0 to 1) over the window that opens the breaker.
    pub failure_rate: f64,
    /// How many recent calls the rate is computed over.
    pub window: usize,
    /// Fewer calls than this never open the breaker.
    pub min_calls: usize,
    /// How long it stays open before trial calls.
    pub open_for: Duration,
    /// Trial calls let through while half-open; all must succeed to close.
    pub trial_calls: u32,
}

impl Default for BreakerConfig {
    /// Opens at 50 % failures over the last 20 calls (10 at least), for 30 s; 3 trials.
    fn default() -> Self {
        BreakerConfig {
            failure_rate: 0.5,
            window: 20,
            min_calls: 10,
            open_for: Duration::from_secs(30),
            trial_calls: 3,
        }
    }
}

impl BreakerConfig {
    /// Sets [`BreakerConfig::failure_rate`].
    pub fn with_failure_rate(mut self, r: f64) -> Self {
        self.failure_rate = r.clamp(0.0, 1.0);
        self
    }
    /// Sets [`BreakerConfig::window`] (at least 1).
    pub fn with_window(mut self, n: usize) -> Self {
        self.window = n.max(1);
        self
    }
    /// Sets [`BreakerConfig::min_calls`] (at least 1).
    pub fn with_min_calls(mut self, n: usize) -> Self {
        self.min_calls = n.max(1);
        self
    }
    /// Sets [`BreakerConfig::open_for`].
    pub fn with_open_for(mut self, d: Duration) -> Self {
        self.open_for = d;
        self
    }
    /// Sets [`BreakerConfig::trial_calls`] (at least 1).
    pub fn with_trial_calls(mut self, n: u32) -> Self {
        self.trial_calls = n.max(1);
        self
    }
}

/// A breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls fail fast.
    Open,
    /// A few trial calls go through.
    HalfOpen,
}

/// How a call went, as far as the breaker is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallResult {
    /// The service answered properly.
    Success,
    /// The service failed (5xx, timeout, connection refused).
    Failure,
    /// Says nothing about the service's health (a 4xx, a 429).
    Neutral,
}

/// Counts of state changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transitions {
    /// Times it opened.
    pub opened: u64,
    /// Times it went half-open.
    pub half_opened: u64,
    /// Times it closed again.
    pub closed: u64,
    /// Calls refused while open.
    pub rejected: u64,
}

#[derive(Debug)]
struct Inner {
    state: State,
    window: VecDeque<bool>,
    opened_at: Timestamp,
    trials_in_flight: u32,
    trial_successes: u32,
}

/// A circuit breaker; share one per integration (`Arc`).
#[derive(Debug)]
pub struct CircuitBreaker {
    name: String,
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
    opened: AtomicU64,
    half_opened: AtomicU64,
    closed: AtomicU64,
    rejected: AtomicU64,
}

/// Leave to make one call; give it back with [`CircuitBreaker::record`]. Dropped
/// without a record (the call was cancelled), it frees its trial slot and counts as
/// nothing.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    trial: bool,
    done: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.trial && !self.done {
            let mut g = self.breaker.lock();
            g.trials_in_flight = g.trials_in_flight.saturating_sub(1);
        }
    }
}

impl CircuitBreaker {
    /// A breaker on the system clock.
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Self {
        CircuitBreaker::with_clock(name, config, Arc::new(SystemClock))
    }

    /// A breaker on `clock`.
    pub fn with_clock(
        name: impl Into<String>,
        config: BreakerConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        CircuitBreaker {
            name: name.into(),
            config,
            clock,
            inner: Mutex::new(Inner {
                state: State::Closed,
                window: VecDeque::new(),
                opened_at: Timestamp::EPOCH,
                trials_in_flight: 0,
                trial_successes: 0,
            }),
            opened: AtomicU64::new(0),
            half_opened: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the state whole: a poisoned lock is consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state (an open breaker whose time is up reports half-open).
    pub fn state(&self) -> State {
        let mut g = self.lock();
        self.tick(&mut g);
        g.state
    }

    /// Counts of state changes so far.
    pub fn transitions(&self) -> Transitions {
        Transitions {
            opened: self.opened.load(Ordering::Relaxed),
            half_opened: self.half_opened.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }

    fn tick(&self, g: &mut Inner) {
        if g.state == State::Open
            && self.clock.now() >= g.opened_at.saturating_add(self.config.open_for)
        {
            g.state = State::HalfOpen;
            g.trials_in_flight = 0;
            g.trial_successes = 0;
            self.half_opened.fetch_add(1, Ordering::Relaxed);
            tracing::info!(integration = %self.name, "circuit half-open: letting trial calls through");
        }
    }

    fn open(&self, g: &mut Inner, why: &str) {
        g.state = State::Open;
        g.opened_at = self.clock.now();
        g.window.clear();
        self.opened.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(integration = %self.name, reason = why, open_for = ?self.config.open_for, "circuit opened");
    }

    /// Leave to call, or a retryable-after error while the breaker is open.
    ///
    /// # Errors
    ///
    /// [`StepError::RetryAfter`] with the remaining open time (or a short pause while
    /// half-open trials are all in flight).
    pub fn permit(&self) -> Result<Permit<'_>, StepError> {
        let mut g = self.lock();
        self.tick(&mut g);
        match g.state {
            State::Closed => Ok(Permit {
                breaker: self,
                trial: false,
                done: false,
            }),
            State::HalfOpen if g.trials_in_flight < self.config.trial_calls => {
                g.trials_in_flight += 1;
                Ok(Permit {
                    breaker: self,
                    trial: true,
                    done: false,
                })
            }
            state => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                let wait = match state {
                    State::Open => g
                        .opened_at
                        .saturating_add(self.config.open_for)
                        .duration_since(self.clock.now()),
                    _ => Duration::from_secs(1),
                };
                Err(StepError::retry_after(
                    wait.max(Duration::from_millis(1)),
                    format!("circuit for `{}` is {state:?}: failing fast", self.name),
                ))
            }
        }
    }

    /// Records how the call made under `permit` went.
    pub fn record(&self, mut permit: Permit<'_>, result: CallResult) {
        permit.done = true;
        let mut g = self.lock();
        if permit.trial {
            g.trials_in_flight = g.trials_in_flight.saturating_sub(1);
            if g.state != State::HalfOpen {
                return;
            }
            match result {
                CallResult::Failure => self.open(&mut g, "a trial call failed"),
                CallResult::Success => {
                    g.trial_successes += 1;
                    if g.trial_successes >= self.config.trial_calls {
                        g.state = State::Closed;
                        g.window.clear();
                        self.closed.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(integration = %self.name, "circuit closed: trial calls succeeded");
                    }
                }
                CallResult::Neutral => {}
            }
            return;
        }
        if g.state != State::Closed || result == CallResult::Neutral {
            return;
        }
        g.window.push_back(result == CallResult::Failure);
        while g.window.len() > self.config.window {
            g.window.pop_front();
        }
        let calls = g.window.len();
        let failures = g.window.iter().filter(|f| **f).count();
        if calls >= self.config.min_calls
            && failures as f64 / calls as f64 >= self.config.failure_rate
        {
            self.open(
                &mut g,
                &format!("{failures} of the last {calls} calls failed"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[derive(Debug, Default)]
    struct ManualClock(AtomicU64);

    impl Clock for ManualClock {
        fn now(&self) -> Timestamp {
            Timestamp::from_millis(self.0.load(Ordering::SeqCst))
        }
        fn sleep_until(&self, _: Timestamp) -> sagaflow::Sleep {
            Box::pin(std::future::pending())
        }
    }

    fn breaker(clock: &Arc<ManualClock>) -> CircuitBreaker {
        let cfg = BreakerConfig::default()
            .with_window(10)
            .with_min_calls(4)
            .with_failure_rate(0.5)
            .with_open_for(Duration::from_secs(10))
            .with_trial_calls(2);
        CircuitBreaker::with_clock("svc", cfg, clock.clone())
    }

    fn call(b: &CircuitBreaker, r: CallResult) {
        let p = b.permit().expect("permitted");
        b.record(p, r);
    }

    #[test]
    fn opens_on_rate_over_min_calls_then_half_opens_and_closes() {
        let clock = Arc::new(ManualClock::default());
        let b = breaker(&clock);
        call(&b, CallResult::Failure);
        call(&b, CallResult::Failure);
        call(&b, CallResult::Failure);
        assert_eq!(b.state(), State::Closed, "fewer than min_calls");
        call(&b, CallResult::Success);
        assert_eq!(b.state(), State::Open, "3 of 4 failed");
        let e = b.permit().unwrap_err();
        assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(10)));
        clock.0.store(4_000, Ordering::SeqCst);
        assert_eq!(
            b.permit().unwrap_err().retry_after_hint(),
            Some(Duration::from_secs(6))
        );
        clock.0.store(10_000, Ordering::SeqCst);
        assert_eq!(b.state(), State::HalfOpen);
        let t1 = b.permit().unwrap();
        let t2 = b.permit().unwrap();
        assert!(b.permit().is_err(), "only two trials at a time");
        b.record(t1, CallResult::Success);
        b.record(t2, CallResult::Success);
        assert_eq!(b.state(), State::Closed);
        let t = b.transitions();
        assert_eq!(
            (t.opened, t.half_opened, t.closed, t.rejected),
            (1, 1, 1, 3)
        );
    }

    #[test]
    fn a_failed_trial_reopens_and_a_cancelled_one_frees_its_slot() {
        let clock = Arc::new(ManualClock::default());
        let b = breaker(&clock);
        for _ in 0..4 {
            call(&b, CallResult::Failure);
        }
        clock.0.store(10_000, Ordering::SeqCst);
        drop(b.permit().unwrap());
        drop(b.permit().unwrap());
        let t = b.permit().unwrap();
        b.record(t, CallResult::Failure);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.transitions().opened, 2);
    }

    #[test]
    fn neutral_results_do_not_count() {
        let clock = Arc::new(ManualClock::default());
        let b = breaker(&clock);
        for _ in 0..10 {
            call(&b, CallResult::Neutral);
        }
        call(&b, CallResult::Failure);
        assert_eq!(b.state(), State::Closed);
    }
}
