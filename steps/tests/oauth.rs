//! OAuth2 client credentials against a real token endpoint: one fetch for 50
//! concurrent callers, and when the token expires mid-run, exactly one refresh.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
        matches!(e.to_step_error(), sagaflow::StepError::Rejected { .. }),
        "{e}"
    );
}

/// A token endpoint that answers `expires_in` with whatever the test put in `Lifetime`.
#[derive(Default)]
struct Lifetime {
    expires_in: std::sync::Mutex<Value>,
    issued: AtomicUsize,
}

async fn token_with_lifetime(State(l): State<Arc<Lifetime>>) -> Json<Value> {
    let n = l.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let expires_in = l.expires_in.lock().unwrap().clone();
    Json(
        json!({"access_token": format!("tok-{n}"), "token_type": "bearer", "expires_in": expires_in}),
    )
}

async fn lifetime_server() -> (Arc<Lifetime>, String) {
    let l = Arc::new(Lifetime::default());
    let app = Router::new()
        .route("/token", post(token_with_lifetime))
        .with_state(l.clone());
    let base = serve(app).await;
    (l, format!("{base}/token"))
}

fn creds(url: &str) -> ClientCredentials {
    ClientCredentials::new(url, "shop", Secret::new("s3cret"))
}

/// Asserts that the cached token is refreshed within (`want` - 5 s, `want`].
fn assert_due_in(tokens: &TokenSource, want: Duration, what: &str) {
    let due = tokens
        .refresh_due_in()
        .unwrap_or_else(|| panic!("{what}: no fresh token"));
    assert!(
        due <= want && due > want.saturating_sub(Duration::from_secs(5)),
        "{what}: refresh due in {due:?}, want {want:?}"
    );
}

#[tokio::test]
async fn an_endless_expires_in_is_clamped_to_the_maximum_lifetime() {
    let (server, url) = lifetime_server().await;
    let day = Duration::from_secs(24 * 3600);
    let margin = Duration::from_secs(30);
    // u64::MAX panicked in `Instant + Duration`; the others are as long or longer.
    for huge in [
        json!(u64::MAX),
        json!(99_999_999_999u64),
        json!(1e300),
        json!("18446744073709551615"),
        json!("99999999999999999999999"),
    ] {
        *server.expires_in.lock().unwrap() = huge.clone();
        let tokens = TokenSource::new(creds(&url));
        let t = tokens.token().await.unwrap();
        assert_due_in(&tokens, day - margin, &huge.to_string());
        // Cached: the second call fetches nothing.
        assert_eq!(tokens.token().await.unwrap(), t);
        assert_eq!(tokens.refreshes(), 1);
    }
    // A configured maximum wins over the default.
    *server.expires_in.lock().unwrap() = json!(u64::MAX);
    let tokens = TokenSource::new(creds(&url).with_max_lifetime(Duration::from_secs(600)));
    tokens.token().await.unwrap();
    assert_due_in(&tokens, Duration::from_secs(570), "max_lifetime 600 s");
}

#[tokio::test]
async fn ordinary_and_odd_lifetimes() {
    let (server, url) = lifetime_server().await;
    let cases = [
        (json!(3600), Some(Duration::from_secs(3570))),
        (json!("3599"), Some(Duration::from_secs(3569))),
        (json!(3600.5), Some(Duration::from_millis(3_570_500))),
        (Value::Null, Some(Duration::from_secs(270))),
        // Shorter than the 30 s margin: refreshed halfway through its life.
        (json!(20), Some(Duration::from_secs(10))),
        // Already expired: used once, never cached.
        (json!(0), None),
        (json!(-5), None),
    ];
    for (expires_in, due) in cases {
        *server.expires_in.lock().unwrap() = expires_in.clone();
        let tokens = TokenSource::new(creds(&url));
        tokens.token().await.unwrap();
        match due {
            Some(d) => assert_due_in(&tokens, d, &expires_in.to_string()),
            None => assert_eq!(tokens.refresh_due_in(), None, "{expires_in}"),
        }
    }
    for bad in [json!("soon"), json!("-5"), json!({"s": 1}), json!([1])] {
        *server.expires_in.lock().unwrap() = bad.clone();
        let e = TokenSource::new(creds(&url)).token().await.unwrap_err();
        assert!(
            matches!(&e, sagaflow_steps::oauth::Error::Malformed(m) if m.contains("expires_in")),
            "{bad}: {e}"
        );
    }
}
