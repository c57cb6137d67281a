//! The rate limiter and concurrency cap under 200 concurrent callers, and a server's
//! Retry-After pausing the integration for everyone.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use sagaflow_steps::http::Integration;
use sagaflow_steps::rate_limit::{RateLimiter, DEFAULT_MAX_PAUSE};
use serde_json::Value;
use support::*;

#[derive(Default)]
struct Counters {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    calls: AtomicUsize,
    throttled_once: AtomicBool,
    arrivals: Mutex<Vec<Instant>>,
}

async fn work(State(c): State<Arc<Counters>>) -> impl IntoResponse {
    let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    c.max_in_flight.fetch_max(now, Ordering::SeqCst);
    c.calls.fetch_add(1, Ordering::SeqCst);
    c.arrivals.lock().unwrap().push(Instant::now());
    tokio::time::sleep(Duration::from_millis(5)).await;
    c.in_flight.fetch_sub(1, Ordering::SeqCst);
    "{}"
}

async fn throttle_once(State(c): State<Arc<Counters>>) -> axum::response::Response {
    c.arrivals.lock().unwrap().push(Instant::now());
    if !c.throttled_once.swap(true, Ordering::SeqCst) {
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], "").into_response();
    }
    "{}".into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limiter_holds_its_rate_and_cap_under_200_concurrent_callers() {
    let counters = Arc::new(Counters::default());
    let app = Router::new()
        .route("/work", get(work))
        .with_state(counters.clone());
    let limiter = Arc::new(
        RateLimiter::new("inventory")
            .per_second(200, 10)
            .max_concurrent(8),
    );
    let api = Arc::new(Integration::new("inventory", serve(app).await).with_limiter(limiter));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..200u32 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            api.get_json::<Value>(&ctx((n % 250) as u8, "reserve"), "/work")
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let took = start.elapsed();
    assert_eq!(
        counters.calls.load(Ordering::SeqCst),
        200,
        "nobody failed: they queued"
    );
    assert!(counters.max_in_flight.load(Ordering::SeqCst) <= 8);
    // 200 calls at 200/s with a burst of 10 need at least 0.95 s; generous bounds.
    let rate = 200.0 / took.as_secs_f64();
    assert!(took >= Duration::from_millis(800), "too fast: {took:?}");
    assert!(rate > 50.0, "far too slow: {rate:.0}/s");
    eprintln!("limiter: 200 calls in {took:?}: {rate:.0} calls/s (limit 200/s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_from_the_server_pauses_the_integration_for_everyone() {
    let counters = Arc::new(Counters::default());
    let app = Router::new()
        .route("/t", get(throttle_once))
        .with_state(counters.clone());
    let limiter = Arc::new(RateLimiter::new("inventory"));
    let api = Integration::new("inventory", serve(app).await).with_limiter(limiter.clone());
    let first = api
        .get_json::<Value>(&ctx(1, "reserve"), "/t")
        .await
        .unwrap_err();
    assert_eq!(first.retry_after_hint(), Some(Duration::from_secs(1)));
    // Another saga calls right away: it waits for the pause instead of hitting the server.
    api.get_json::<Value>(&ctx(2, "reserve"), "/t")
        .await
        .unwrap();
    let arrivals = counters.arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 2);
    let gap = arrivals[1] - arrivals[0];
    assert!(
        gap >= Duration::from_millis(900),
        "the second call came after {gap:?}"
    );
    assert_eq!(limiter.pauses(), 1);
}

async fn throttle_forever() -> axum::response::Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [("retry-after", "18446744073709551615")],
        "",
    )
        .into_response()
}

async fn throttle_3170_years() -> axum::response::Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [("retry-after", "99999999999")],
        "",
    )
        .into_response()
}

/// Asserts that `limiter` is paused for (`want` - 5 s, `want`].
fn assert_paused_for(limiter: &RateLimiter, want: Duration) {
    let left = limiter.pause_remaining().expect("paused");
    assert!(
        left <= want && left > want - Duration::from_secs(5),
        "paused for {left:?}, want {want:?}"
    );
}

#[tokio::test]
async fn an_endless_retry_after_pauses_the_integration_for_the_maximum_only() {
    let app = Router::new()
        .route("/forever", get(throttle_forever))
        .route("/3170-years", get(throttle_3170_years));
    let base = serve(app).await;
    let hour = Duration::from_secs(3600);
    assert_eq!(DEFAULT_MAX_PAUSE, hour);
    for path in ["/forever", "/3170-years"] {
        // `Retry-After: 18446744073709551615` panicked here (`Instant + Duration`).
        let limiter = Arc::new(RateLimiter::new("inventory"));
        let api = Integration::new("inventory", base.clone()).with_limiter(limiter.clone());
        let e = api
            .get_json::<Value>(&ctx(1, "reserve"), path)
            .await
            .unwrap_err();
        assert_eq!(e.retry_after_hint(), Some(hour), "{path}: {e}");
        assert_eq!(limiter.pauses(), 1);
        assert_paused_for(&limiter, hour);
    }
    // The limiter's own bound applies too, below the integration's.
    let limiter = Arc::new(RateLimiter::new("inventory").with_max_pause(Duration::from_secs(60)));
    let api = Integration::new("inventory", base).with_limiter(limiter.clone());
    let e = api
        .get_json::<Value>(&ctx(1, "reserve"), "/forever")
        .await
        .unwrap_err();
    assert_eq!(e.retry_after_hint(), Some(hour));
    assert_paused_for(&limiter, Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn a_clamped_pause_ends_when_the_maximum_is_up() {
    let hour = Duration::from_secs(3600);
    for asked in [
        Duration::MAX,
        Duration::from_secs(u64::MAX),
        Duration::from_secs(99_999_999_999),
    ] {
        let limiter = RateLimiter::new("inventory");
        let start = tokio::time::Instant::now();
        limiter.pause_for(asked);
        drop(limiter.acquire().await);
        let waited = start.elapsed();
        assert!(
            waited >= hour && waited < hour + Duration::from_millis(10),
            "{asked:?}: waited {waited:?}"
        );
        assert_eq!(limiter.pause_remaining(), None);
    }
    let limiter = RateLimiter::new("inventory").with_max_pause(Duration::from_secs(10));
    let start = tokio::time::Instant::now();
    limiter.pause_for(Duration::MAX);
    // A shorter pause later does not shorten the one in force.
    limiter.pause_for(Duration::from_secs(1));
    assert_eq!(limiter.pauses(), 1);
    drop(limiter.acquire().await);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_millis(10_010),
        "waited {waited:?}"
    );
}
