//! HTTP calls against a real server: headers, timeouts and the classification of every
//! kind of answer.

mod support;

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use sagaflow::StepError;
use sagaflow_steps::http::Integration;
use serde_json::{json, Value};
use support::*;

fn app() -> Router {
    Router::new()
        .route(
            "/echo",
            post(|headers: HeaderMap, Json(body): Json<Value>| async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                Json(json!({
                    "key": h("idempotency-key"),
                    "correlation": h("x-correlation-id"),
                    "body": body,
                }))
            }),
        )
        .route(
            "/429-seconds",
            get(|| async {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "2")],
                    "slow down",
                )
            }),
        )
        .route(
            "/429-date",
            get(|| async {
                let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(5));
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", at)],
                    "slow down",
                )
                    .into_response()
            }),
        )
        .route("/429-bare", get(|| async { StatusCode::TOO_MANY_REQUESTS }))
        .route(
            "/503",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", "7")],
                    "maintenance",
                )
            }),
        )
        .route(
            "/500",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        )
        .route(
            "/404",
            get(|| async { (StatusCode::NOT_FOUND, "no such order") }),
        )
        .route(
            "/422",
            get(|| async { (StatusCode::UNPROCESSABLE_ENTITY, "card declined") }),
        )
        .route("/408", get(|| async { StatusCode::REQUEST_TIMEOUT }))
        .route("/huge", get(|| async { "x".repeat(64 * 1024) }))
        .route("/409", get(|| async { StatusCode::CONFLICT }))
        .route("/425", get(|| async { StatusCode::TOO_EARLY }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route("/not-json", get(|| async { "<html>hello</html>" }))
        .route(
            "/429-u64-max",
            get(|| async {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "18446744073709551615")],
                    "slow down",
                )
            }),
        )
        .route(
            "/429-3170-years",
            get(|| async {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "99999999999")],
                    "slow down",
                )
            }),
        )
        .route(
            "/429-beyond-u64",
            get(|| async {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "99999999999999999999999")],
                    "slow down",
                )
            }),
        )
        .route(
            "/503-year-9999",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")],
                    "maintenance",
                )
            }),
        )
}

#[tokio::test]
async fn calls_carry_the_idempotency_key_and_the_correlation_id() {
    let api = Integration::new("echo", serve(app()).await);
    let c = ctx(1, "charge");
    let got: Value = api
        .post_json(&c, "/echo", &json!({"cents": 5}))
        .await
        .unwrap();
    assert_eq!(got["key"], c.idempotency_key().as_str());
    assert_eq!(got["correlation"], c.saga_id().to_string());
    assert_eq!(got["body"]["cents"], 5);
}

#[tokio::test]
async fn answers_are_classified_for_the_engine() {
    let base = serve(app()).await;
    let api = Integration::new("svc", base.clone());
    let c = ctx(2, "s");
    let err = |path: &'static str| {
        let api = &api;
        let c = c.clone();
        async move { api.get_json::<Value>(&c, path).await.unwrap_err() }
    };

    let e = err("/429-seconds").await;
    assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(2)), "{e}");
    let e = err("/429-date").await;
    let hint = e.retry_after_hint().expect("a hint");
    assert!(
        hint >= Duration::from_secs(3) && hint <= Duration::from_secs(5),
        "{hint:?}"
    );
    assert_eq!(
        err("/429-bare").await.retry_after_hint(),
        Some(Duration::from_secs(1))
    );
    assert_eq!(
        err("/503").await.retry_after_hint(),
        Some(Duration::from_secs(7))
    );

    // A 5xx may have done the work before failing: unknown.
    let e = err("/500").await;
    assert!(matches!(e, StepError::Unknown { .. }), "{e}");
    // A refusal: rejected, not compensated.
    let e = err("/404").await;
    assert!(
        matches!(&e, StepError::Rejected { message } if message.contains("404") && message.contains("no such order")),
        "{e}"
    );
    let e = err("/422").await;
    assert!(matches!(e, StepError::Rejected { .. }), "{e}");
    // An answer larger than the integration reads: not read further, outcome unknown.
    let small = Integration::new("small", base.clone()).with_max_response_bytes(1024);
    let e = small
        .get_json::<Value>(&ctx(2, "s"), "/huge")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StepError::Unknown { message } if message.contains("over 1024 bytes")),
        "{e}"
    );
    // The 4xx that ask for another try.
    for path in ["/408", "/409", "/425"] {
        let e = err(path).await;
        assert!(matches!(e, StepError::Retryable { .. }), "{path}: {e}");
    }
    // A 2xx whose answer cannot be recorded: it took effect, so unknown.
    let e = err("/not-json").await;
    assert!(
        matches!(&e, StepError::Unknown { message } if message.contains("does not decode as")),
        "{e}"
    );
}

#[tokio::test]
async fn a_slow_endpoint_is_an_unknown_timeout_and_a_dead_one_retryable() {
    let base = serve(app()).await;
    let api = Integration::new("slow", base).with_timeout(SHORT);
    let e = api
        .get_json::<Value>(&ctx(3, "s"), "/slow")
        .await
        .unwrap_err();
    // The request was sent; it may have taken effect.
    assert!(
        matches!(&e, StepError::Unknown { message } if message.contains("timed out")),
        "{e}"
    );

    // Nothing listens there: nothing was sent.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let e = Integration::new("dead", dead)
        .get_json::<Value>(&ctx(3, "s"), "/")
        .await
        .unwrap_err();
    assert!(matches!(e, StepError::Retryable { .. }), "{e}");
}

#[tokio::test]
async fn a_server_cannot_hand_over_a_retry_after_longer_than_the_maximum() {
    let base = serve(app()).await;
    let c = ctx(4, "s");
    let hour = Duration::from_secs(3600);
    assert_eq!(sagaflow_steps::http::DEFAULT_MAX_RETRY_AFTER, hour);
    for path in [
        "/429-u64-max",
        "/429-3170-years",
        "/429-beyond-u64",
        "/503-year-9999",
    ] {
        let e = Integration::new("svc", base.clone())
            .get_json::<Value>(&c, path)
            .await
            .unwrap_err();
        assert_eq!(e.retry_after_hint(), Some(hour), "{path}: {e}");
        assert!(
            e.message().contains("clamped to the maximum of 3600s"),
            "{path}: {e}"
        );
    }
    // A configured maximum wins; a hint under it is passed on unchanged and unmarked.
    let api = Integration::new("svc", base).with_max_retry_after(Duration::from_secs(30));
    let e = api.get_json::<Value>(&c, "/429-u64-max").await.unwrap_err();
    assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(30)), "{e}");
    let e = api.get_json::<Value>(&c, "/503").await.unwrap_err();
    assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(7)), "{e}");
    assert!(!e.message().contains("clamped"), "{e}");
}

/// Past the attempt's deadline nothing is sent: the engine may already have settled the
/// attempt and undone it, and a request sent now could land after its undo.
#[tokio::test]
async fn nothing_is_sent_once_the_attempts_deadline_has_passed() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    let app = Router::new().route(
        "/charge",
        post(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                Json(json!({"ok": true}))
            }
        }),
    );
    let api = Integration::new("late", serve(app).await);
    let late = ctx(1, "charge").with_deadline(sagaflow::Timestamp::from_millis(1));
    let got: Result<Value, StepError> = api.post_json(&late, "/charge", &json!({})).await;
    let e = got.unwrap_err();
    assert!(matches!(e, StepError::Retryable { .. }), "{e:?}");
    assert!(e.message().contains("deadline"), "{e:?}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "a request was sent after the deadline"
    );
    // The same call inside its deadline goes out.
    let _: Value = api
        .post_json(&ctx(1, "charge"), "/charge", &json!({}))
        .await
        .unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}
