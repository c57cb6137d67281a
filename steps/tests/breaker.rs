//! A burst of 500s opens the breaker; calls then fail fast without reaching the server;
//! after the open time, trial calls to a recovered server close it.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use sagaflow::{Clock, StepError, Timestamp};
use sagaflow_steps::circuit_breaker::{BreakerConfig, CircuitBreaker, State as Breaker};
use sagaflow_steps::http::Integration;
use serde_json::Value;
use support::*;

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

#[derive(Default)]
struct Server {
    healthy: AtomicBool,
    calls: AtomicUsize,
}

#[tokio::test]
async fn bursts_of_500s_open_the_breaker_and_recovery_closes_it() {
    let server = Arc::new(Server::default());
    let app = Router::new()
        .route(
            "/pay",
            get(|State(s): State<Arc<Server>>| async move {
                s.calls.fetch_add(1, Ordering::SeqCst);
                if s.healthy.load(Ordering::SeqCst) {
                    (StatusCode::OK, "{}")
                } else {
                    (StatusCode::INTERNAL_SERVER_ERROR, "down")
                }
            }),
        )
        .with_state(server.clone());
    let clock = Arc::new(ManualClock(AtomicU64::new(1_000_000)));
    let breaker = Arc::new(CircuitBreaker::with_clock(
        "payments",
        BreakerConfig::default()
            .with_window(10)
            .with_min_calls(5)
            .with_failure_rate(0.5)
            .with_open_for(Duration::from_secs(30))
            .with_trial_calls(2),
        clock.clone(),
    ));
    let api = Integration::new("payments", serve(app).await).with_breaker(breaker.clone());
    let c = ctx(7, "charge");
    for _ in 0..5 {
        let e = api.get_json::<Value>(&c, "/pay").await.unwrap_err();
        // A 5xx may have taken effect: unknown (the engine retries it with the same key).
        assert!(matches!(e, StepError::Unknown { .. }), "{e}");
    }
    assert_eq!(breaker.state(), Breaker::Open);
    // Fails fast: the server sees nothing, the engine is told when to come back.
    let e = api.get_json::<Value>(&c, "/pay").await.unwrap_err();
    assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(30)), "{e}");
    assert_eq!(server.calls.load(Ordering::SeqCst), 5);

    // Thirty seconds later the service is back: two trial calls close the breaker.
    server.healthy.store(true, Ordering::SeqCst);
    clock.0.fetch_add(30_000, Ordering::SeqCst);
    assert_eq!(breaker.state(), Breaker::HalfOpen);
    api.get_json::<Value>(&c, "/pay").await.unwrap();
    api.get_json::<Value>(&c, "/pay").await.unwrap();
    assert_eq!(breaker.state(), Breaker::Closed);
    let t = breaker.transitions();
    assert_eq!(
        (t.opened, t.half_opened, t.closed, t.rejected),
        (1, 1, 1, 1)
    );
}
