//! Webhooks posted to a real receiver: forged, stale, from the future, replayed,
//! malformed, id-less, oversized, with a thousand signatures, and signed with a rotated
//! secret.

mod support;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use sagaflow_steps::secrets::Secret;
use sagaflow_steps::webhook::{sign, Verifier, WebhookError, DEFAULT_MAX_SIGNATURES};
use support::*;

async fn receive(
    State(v): State<Arc<Verifier>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let header = headers
        .get("signature")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    // A missing event-id header is an id-less event: the verifier must refuse it.
    let id = headers
        .get("event-id")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    // Hashes bodies over 64 KiB on the blocking pool.
    match v.verify_async(header, body, id, SystemTime::now()).await {
        Ok(()) => (StatusCode::NO_CONTENT, String::new()),
        Err(e) => (StatusCode::BAD_REQUEST, kind(&e).to_string()),
    }
}

fn kind(e: &WebhookError) -> &'static str {
    match e {
        WebhookError::Malformed(_) => "malformed",
        WebhookError::BodyTooLarge { .. } => "body_too_large",
        WebhookError::TooManySignatures { .. } => "too_many_signatures",
        WebhookError::EmptySignature => "empty_signature",
        WebhookError::MalformedSignature(_) => "malformed_signature",
        WebhookError::Stale { .. } => "stale",
        WebhookError::FromTheFuture { .. } => "from_the_future",
        WebhookError::MissingEventId => "missing_event_id",
        WebhookError::EventIdTooLong { .. } => "event_id_too_long",
        WebhookError::BadSignature => "bad_signature",
        WebhookError::Replayed => "replayed",
        _ => "other",
    }
}

async fn serve_verifier(v: Verifier) -> String {
    serve(
        Router::new()
            .route("/webhooks", post(receive))
            .route("/ping", get(|| async { "pong" }))
            .with_state(Arc::new(v)),
    )
    .await
}

async fn receiver(secrets: Vec<Secret>) -> String {
    serve_verifier(
        Verifier::new(secrets)
            .with_tolerance(Duration::from_secs(300))
            .with_memory(1000),
    )
    .await
}

/// Posts `body` with `header`, and `id` as the event id if there is one.
async fn post_webhook(
    base: &str,
    header: &str,
    id: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/webhooks"))
        .header("signature", header)
        .body(body);
    if let Some(id) = id {
        req = req.header("event-id", id);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn send(base: &str, header: &str, id: &str, body: &'static [u8]) -> (u16, String) {
    post_webhook(base, header, Some(id), body).await
}

const BODY: &[u8] = br#"{"id":"evt_1","type":"charge.settled","charge":"ch_1"}"#;

#[tokio::test]
async fn each_refusal_is_its_own_error() {
    let old = Secret::new("whsec_old");
    let new = Secret::new("whsec_new");
    // Rotation: both secrets active.
    let base = receiver(vec![new.clone(), old.clone()]).await;
    let now = SystemTime::now();

    assert_eq!(
        send(&base, &sign(&new, now, BODY), "evt_1", BODY).await.0,
        204
    );
    assert_eq!(
        send(&base, &sign(&old, now, BODY), "evt_2", BODY).await.0,
        204,
        "the old secret still works during rotation"
    );
    assert_eq!(
        send(&base, &sign(&new, now, BODY), "evt_1", BODY).await,
        (400, "replayed".into())
    );
    let forged = Secret::new("whsec_attacker");
    assert_eq!(
        send(&base, &sign(&forged, now, BODY), "evt_3", BODY).await,
        (400, "bad_signature".into())
    );
    let tampered: &'static [u8] = br#"{"id":"evt_4","type":"charge.settled","charge":"ch_999"}"#;
    assert_eq!(
        send(&base, &sign(&new, now, BODY), "evt_4", tampered).await,
        (400, "bad_signature".into())
    );
    let stale = now - Duration::from_secs(600);
    assert_eq!(
        send(&base, &sign(&new, stale, BODY), "evt_5", BODY).await,
        (400, "stale".into())
    );
    let future = now + Duration::from_secs(600);
    assert_eq!(
        send(&base, &sign(&new, future, BODY), "evt_6", BODY).await,
        (400, "from_the_future".into())
    );
    for bad in [
        "",
        "t=abc,v1=00",
        "v1=00",
        "t=1",
        "garbage",
        "t=1,t=2,v1=00",
    ] {
        assert_eq!(
            send(&base, bad, "evt_7", BODY).await,
            (400, "malformed".into()),
            "{bad}"
        );
    }
    // Several signatures in one header (the sender signs with both while rotating).
    let both = format!(
        "{},{}",
        sign(&forged, now, BODY),
        sign(&new, now, BODY).split(',').nth(1).unwrap()
    );
    assert_eq!(send(&base, &both, "evt_8", BODY).await.0, 204);

    // After rotation the old secret is retired.
    let base = receiver(vec![new.clone()]).await;
    assert_eq!(
        send(&base, &sign(&old, now, BODY), "evt_9", BODY).await,
        (400, "bad_signature".into())
    );
}

#[test]
fn seen_ids_are_bounded() {
    let s = Secret::new("k");
    let v = Verifier::new(vec![s.clone()]).with_memory(2);
    let now = SystemTime::now();
    for id in ["a", "b", "c"] {
        v.verify(&sign(&s, now, b"x"), b"x", id, now).unwrap();
    }
    // "a" was forgotten (memory of 2); "c" is still remembered.
    assert!(v.verify(&sign(&s, now, b"x"), b"x", "a", now).is_ok());
    assert_eq!(
        v.verify(&sign(&s, now, b"x"), b"x", "c", now),
        Err(WebhookError::Replayed)
    );
}

/// A header with `n` entries `v1=<value>` after `t=`.
fn many_signatures(at: SystemTime, value: &str, n: usize) -> String {
    let t = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let mut h = format!("t={t}");
    for _ in 0..n {
        h.push_str(",v1=");
        h.push_str(value);
    }
    h
}

#[tokio::test]
async fn a_thousand_signatures_over_a_mebibyte_are_refused_before_any_hmac() {
    let secret = Secret::new("whsec_1");
    let base = receiver(vec![secret.clone()]).await;
    let now = SystemTime::now();
    let body = vec![b'x'; 1 << 20];
    let valid_looking = "ab".repeat(32);
    let hostile = [
        many_signatures(now, "", 1000),
        many_signatures(now, &valid_looking, 1000),
    ];
    // Two hostile requests and an unrelated GET at once, all on this test's one
    // runtime thread (the server too). Before the fix each request cost 1,000 HMACs of
    // the whole body (35 s of CPU in a debug build) and the GET waited behind them.
    let start = Instant::now();
    let client = reqwest::Client::new();
    let (a, b, ping) = tokio::join!(
        post_webhook(&base, &hostile[0], Some("evt_a"), body.clone()),
        post_webhook(&base, &hostile[1], Some("evt_b"), body.clone()),
        async {
            let r = client.get(format!("{base}/ping")).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        },
    );
    let took = start.elapsed();
    assert_eq!(a, (400, "too_many_signatures".into()));
    assert_eq!(b, (400, "too_many_signatures".into()));
    assert_eq!(ping, (200, "pong".into()));
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // The limit is exact: 8 signatures with the valid one last are accepted, 9 refused.
    let good = sign(&secret, now, &body);
    let good_sig = good.split_once(",v1=").unwrap().1;
    let mut eight = many_signatures(now, &valid_looking, DEFAULT_MAX_SIGNATURES - 1);
    eight.push_str(&format!(",v1={good_sig}"));
    assert_eq!(
        post_webhook(&base, &eight, Some("evt_8"), body.clone())
            .await
            .0,
        204
    );
    let mut nine = many_signatures(now, &valid_looking, DEFAULT_MAX_SIGNATURES);
    nine.push_str(&format!(",v1={good_sig}"));
    assert_eq!(
        post_webhook(&base, &nine, Some("evt_9"), body.clone()).await,
        (400, "too_many_signatures".into())
    );
}

#[test]
fn the_signature_limit_is_configurable_and_counts_only_v1() {
    let s = Secret::new("k");
    let now = SystemTime::now();
    let v = Verifier::new(vec![s.clone()]).with_max_signatures(2);
    let good = sign(&s, now, b"x");
    let other = "00".repeat(32);
    let three = format!("{good},v1={other},v1={other}");
    assert_eq!(
        v.verify(&three, b"x", "a", now),
        Err(WebhookError::TooManySignatures { max: 2 })
    );
    // Other schemes do not count (nor are they checked).
    let with_v0 = format!("{good},v1={other},v0=,v0=zz");
    assert_eq!(v.verify(&with_v0, b"x", "a", now), Ok(()));
}

#[tokio::test]
async fn empty_and_non_hex_signatures_are_refused() {
    let secret = Secret::new("whsec_1");
    let base = receiver(vec![secret.clone()]).await;
    let now = SystemTime::now();
    let good = sign(&secret, now, BODY);
    let t = good.split_once(',').unwrap().0;
    assert_eq!(
        send(&base, &format!("{t},v1="), "evt_1", BODY).await,
        (400, "empty_signature".into())
    );
    // An empty candidate refuses the header even beside a valid signature.
    assert_eq!(
        send(&base, &format!("{good},v1="), "evt_2", BODY).await,
        (400, "empty_signature".into())
    );
    for bad in [
        "zz",
        "00",
        &"0".repeat(63),
        &"0".repeat(66),
        &"g".repeat(64),
    ] {
        assert_eq!(
            send(&base, &format!("{t},v1={bad}"), "evt_3", BODY).await,
            (400, "malformed_signature".into()),
            "{bad}"
        );
    }
    // None of those was remembered: the genuine event is still accepted.
    assert_eq!(send(&base, &good, "evt_1", BODY).await.0, 204);
}

#[tokio::test]
async fn id_less_events_are_refused_as_such_not_as_replays() {
    let secret = Secret::new("whsec_1");
    let base = receiver(vec![secret.clone()]).await;
    let now = SystemTime::now();
    let header = sign(&secret, now, BODY);
    // Two id-less events: both "missing event id", neither a replay of the other.
    for _ in 0..2 {
        assert_eq!(
            post_webhook(&base, &header, None, BODY).await,
            (400, "missing_event_id".into())
        );
    }
    assert_eq!(
        send(&base, &header, "   ", BODY).await,
        (400, "missing_event_id".into())
    );
    assert_eq!(
        send(&base, &header, &"e".repeat(257), BODY).await,
        (400, "event_id_too_long".into())
    );
    assert_eq!(send(&base, &header, &"e".repeat(256), BODY).await.0, 204);
    assert_eq!(send(&base, &header, "evt_1", BODY).await.0, 204);
}

#[tokio::test]
async fn timestamps_beyond_the_future_skew_are_refused() {
    let secret = Secret::new("whsec_1");
    let base = receiver(vec![secret.clone()]).await;
    let now = SystemTime::now();
    let at = |secs: i64| {
        if secs >= 0 {
            now + Duration::from_secs(secs as u64)
        } else {
            now - Duration::from_secs(secs.unsigned_abs())
        }
    };
    // 30 s of skew by default, against 300 s of tolerance into the past.
    assert_eq!(
        send(&base, &sign(&secret, at(20), BODY), "evt_1", BODY)
            .await
            .0,
        204
    );
    assert_eq!(
        send(&base, &sign(&secret, at(-290), BODY), "evt_2", BODY)
            .await
            .0,
        204
    );
    for (secs, id) in [(60, "evt_3"), (290, "evt_4"), (86_400 * 365, "evt_5")] {
        assert_eq!(
            send(&base, &sign(&secret, at(secs), BODY), id, BODY).await,
            (400, "from_the_future".into()),
            "+{secs} s"
        );
    }
    let far = format!("t={},v1={}", u64::MAX, "00".repeat(32));
    assert_eq!(
        send(&base, &far, "evt_6", BODY).await,
        (400, "from_the_future".into())
    );
}

#[test]
fn the_future_skew_boundary_is_exact_and_configurable() {
    let s = Secret::new("k");
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let v = Verifier::new(vec![s.clone()]);
    let h = |ahead: u64| sign(&s, now + Duration::from_secs(ahead), b"x");
    assert_eq!(v.verify(&h(30), b"x", "a", now), Ok(()));
    assert_eq!(
        v.verify(&h(31), b"x", "b", now),
        Err(WebhookError::FromTheFuture {
            ahead_secs: 31,
            skew_secs: 30
        })
    );
    let v = Verifier::new(vec![s.clone()]).with_future_skew(Duration::from_secs(5));
    assert_eq!(v.verify(&h(5), b"x", "a", now), Ok(()));
    assert_eq!(
        v.verify(&h(6), b"x", "b", now),
        Err(WebhookError::FromTheFuture {
            ahead_secs: 6,
            skew_secs: 5
        })
    );
    // The past keeps its own, larger tolerance.
    let old = sign(&s, now - Duration::from_secs(301), b"x");
    assert_eq!(
        v.verify(&old, b"x", "c", now),
        Err(WebhookError::Stale {
            age_secs: 301,
            tolerance_secs: 300
        })
    );
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_before_hashing() {
    let secret = Secret::new("whsec_1");
    let base = serve_verifier(Verifier::new(vec![secret.clone()]).with_max_body(1024)).await;
    let now = SystemTime::now();
    let at_limit = vec![b'x'; 1024];
    let over = vec![b'x'; 1025];
    assert_eq!(
        post_webhook(&base, &sign(&secret, now, &over), Some("evt_1"), over).await,
        (400, "body_too_large".into())
    );
    assert_eq!(
        post_webhook(
            &base,
            &sign(&secret, now, &at_limit),
            Some("evt_1"),
            at_limit
        )
        .await
        .0,
        204
    );
    let v = Verifier::new(vec![secret.clone()]).with_max_body(1024);
    assert_eq!(
        v.verify("garbage", &[0; 4096], "evt_1", now),
        Err(WebhookError::BodyTooLarge {
            len: 4096,
            max: 1024
        }),
        "the size is checked first"
    );
}

/// Drives `verify_async` by hand on this test's single runtime thread and counts the
/// polls that found it still pending: a hash on the runtime's thread finishes inside
/// the first poll (zero), a hash on the blocking pool leaves the thread free meanwhile.
async fn pending_polls(v: &Verifier, header: &str, body: Vec<u8>, id: &str) -> (usize, bool) {
    let mut fut = pin!(v.verify_async(header, body, id, SystemTime::now()));
    let mut pending = 0;
    loop {
        let polled = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
        match polled {
            Poll::Ready(r) => return (pending, r.is_ok()),
            Poll::Pending => {
                pending += 1;
                tokio::task::yield_now().await;
            }
        }
    }
}

#[tokio::test]
async fn large_bodies_are_hashed_off_the_runtime_thread() {
    let secret = Secret::new("whsec_1");
    // Eight active secrets: the body is hashed eight times, once per secret.
    let mut secrets: Vec<Secret> = (0..7).map(|i| Secret::new(format!("old_{i}"))).collect();
    secrets.push(secret.clone());
    let v = Verifier::new(secrets);
    let now = SystemTime::now();

    let big = vec![b'x'; 1 << 20];
    let (pending, ok) = pending_polls(&v, &sign(&secret, now, &big), big, "evt_big").await;
    assert!(ok, "the large webhook is genuine");
    assert!(
        pending > 0,
        "a 1 MiB body must be hashed on the blocking pool"
    );

    let small = vec![b'x'; 1024];
    let (pending, ok) = pending_polls(&v, &sign(&secret, now, &small), small, "evt_small").await;
    assert!(ok);
    assert_eq!(pending, 0, "a small body is hashed in place");

    // A forged large body is refused the same way.
    let big = vec![b'y'; 1 << 20];
    let forged = sign(&Secret::new("whsec_attacker"), now, &big);
    assert_eq!(
        v.verify_async(&forged, big, "evt_forged", now).await,
        Err(WebhookError::BadSignature)
    );
}
