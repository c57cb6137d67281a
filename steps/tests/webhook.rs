//! Webhooks posted to a real receiver: forged, stale, replayed, malformed, and signed
//! with a rotated secret.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use sagaflow_steps::secrets::Secret;
use sagaflow_steps::webhook::{sign, Verifier, WebhookError};
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
    let id = headers
        .get("event-id")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    match v.verify(header, &body, id, SystemTime::now()) {
        Ok(()) => (StatusCode::NO_CONTENT, String::new()),
        Err(e) => {
            let kind = match e {
                WebhookError::Malformed(_) => "malformed",
                WebhookError::Stale { .. } => "stale",
                WebhookError::BadSignature => "bad_signature",
                WebhookError::Replayed => "replayed",
                _ => "other",
            };
            (StatusCode::BAD_REQUEST, kind.to_string())
        }
    }
}

async fn receiver(secrets: Vec<Secret>) -> String {
    let v = Arc::new(
        Verifier::new(secrets)
            .with_tolerance(Duration::from_secs(300))
            .with_memory(1000),
    );
    serve(
        Router::new()
            .route("/webhooks", post(receive))
            .with_state(v),
    )
    .await
}

async fn send(base: &str, header: &str, id: &str, body: &'static [u8]) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{base}/webhooks"))
        .header("signature", header)
        .header("event-id", id)
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
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
        (400, "stale".into())
    );
    for bad in ["", "t=abc,v1=00", "v1=00", "t=1", "t=1,v1=zz", "garbage"] {
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
