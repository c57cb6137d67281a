//! OAuth2 client credentials against a real token endpoint: one fetch for 50
//! concurrent callers, and when the token expires mid-run, exactly one refresh.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use sagaflow_steps::http::Integration;
use sagaflow_steps::oauth::{ClientCredentials, TokenSource};
use sagaflow_steps::secrets::Secret;
use serde_json::{json, Value};
use support::*;

#[derive(Default)]
struct Auth {
    issued: AtomicUsize,
    /// The current token's number: earlier tokens are expired.
    current: AtomicUsize,
    expire_now: AtomicBool,
}

async fn token(
    State(a): State<Arc<Auth>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, Json<Value>) {
    // The client authenticates with HTTP basic: client id "shop", secret "s3cret".
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if basic != "Basic c2hvcDpzM2NyZXQ=" || !body.contains("grant_type=client_credentials") {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        );
    }
    // Slow enough that concurrent callers pile up behind the first refresh.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let n = a.issued.fetch_add(1, Ordering::SeqCst) + 1;
    a.current.store(n, Ordering::SeqCst);
    a.expire_now.store(false, Ordering::SeqCst);
    (
        StatusCode::OK,
        Json(
            json!({"access_token": format!("tok-{n}"), "token_type": "bearer", "expires_in": 3600}),
        ),
    )
}

async fn api(State(a): State<Arc<Auth>>, headers: HeaderMap) -> (StatusCode, Json<Value>) {
    let want = format!("Bearer tok-{}", a.current.load(Ordering::SeqCst));
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if got != want || a.expire_now.load(Ordering::SeqCst) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "expired"})));
    }
    (StatusCode::OK, Json(json!({"ok": true})))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refresh_for_many_callers_and_one_when_the_token_expires_mid_run() {
    let auth = Arc::new(Auth::default());
    let app = Router::new()
        .route("/token", post(token))
        .route("/charges", get(api))
        .with_state(auth.clone());
    let base = serve(app).await;
    let tokens = Arc::new(TokenSource::new(ClientCredentials::new(
        format!("{base}/token"),
        "shop",
        Secret::new("s3cret"),
    )));
    let payments = Arc::new(Integration::new("payments", base).with_tokens(tokens.clone()));
    let wave = || {
        let mut tasks = Vec::new();
        for n in 0..50u8 {
            let p = payments.clone();
            tasks.push(tokio::spawn(async move {
                p.get_json::<Value>(&ctx(n, "charge"), "/charges").await
            }));
        }
        tasks
    };
    for t in wave() {
        t.await.unwrap().unwrap();
    }
    assert_eq!(tokens.refreshes(), 1, "50 callers, one token fetch");
    assert_eq!(auth.issued.load(Ordering::SeqCst), 1);

    // The token expires server-side mid-run: every caller gets a 401 once.
    auth.expire_now.store(true, Ordering::SeqCst);
    for t in wave() {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        tokens.refreshes(),
        2,
        "exactly one refresh for the expired token"
    );
    assert_eq!(auth.issued.load(Ordering::SeqCst), 2);
    assert!(
        !format!("{tokens:?}").contains("tok-"),
        "tokens never print"
    );
}

#[tokio::test]
async fn refused_credentials_are_permanent() {
    let auth = Arc::new(Auth::default());
    let app = Router::new().route("/token", post(token)).with_state(auth);
    let base = serve(app).await;
    let tokens = TokenSource::new(ClientCredentials::new(
        format!("{base}/token"),
        "shop",
        Secret::new("wrong"),
    ));
    let e = tokens.token().await.unwrap_err();
    assert!(
        matches!(e.to_step_error(), sagaflow::StepError::Permanent { .. }),
        "{e}"
    );
}
