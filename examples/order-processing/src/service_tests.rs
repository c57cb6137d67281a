//! The service's HTTP contract, in-process on a memory store against the fake providers.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sagaflow::store::MemLog;
use sagaflow::Engine;
use sagaflow_steps::secrets::Secret;
use serde_json::{json, Value};

use crate::providers::{self, Faults};
use crate::saga::{definition, Integrations};
use crate::service::{app, Service};

async fn start() -> (String, Arc<Engine>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let p = providers::start(
        &dir.path().join("p"),
        Faults::default(),
        1000,
        Arc::new(Mutex::new(None)),
    )
    .await
    .unwrap();
    let engine = Engine::builder()
        .seed(5)
        .register(definition(&Integrations::new(&p.addresses)).unwrap())
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let engine = Arc::new(engine);
    let svc = Service::new(
        engine.clone(),
        Secret::new(p.addresses.webhook_secret.clone()),
        dir.path(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app(svc)).await });
    (base, engine, dir)
}

async fn post(base: &str, key: Option<&str>, body: String) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .post(format!("{base}/orders"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = key {
        r = r.header("idempotency-key", k);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_validated_idempotent_and_shown() {
    let (base, engine, _dir) = start().await;
    let order = json!({"customer": "ada", "sku": "widget", "quantity": 2, "amount_cents": 4200})
        .to_string();

    let (s, v) = post(&base, None, order.clone()).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(&base, Some("k1"), "{not json".into()).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        &base,
        Some("k1"),
        json!({"customer": "ada", "sku": "w", "quantity": 0, "amount_cents": 1}).to_string(),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "quantity must be 1 to 100")
    );
    let (s, _) = post(
        &base,
        Some("k1"),
        json!({"customer": "x".repeat(20_000), "sku": "w", "quantity": 1, "amount_cents": 1})
            .to_string(),
    )
    .await;
    assert_eq!(s, 413);
    let (s, v) = post(
        &base,
        Some("k1"),
        json!({"customer": "ada", "sku": "w", "quantity": 1, "amount_cents": 1, "extra": true})
            .to_string(),
    )
    .await;
    assert_eq!(s, 400, "unknown fields are refused: {v}");

    let (s, first) = post(&base, Some("k1"), order.clone()).await;
    assert_eq!(s, 202, "{first}");
    let (s, again) = post(&base, Some("k1"), order.clone()).await;
    assert_eq!((s, &again["order_id"]), (202, &first["order_id"]));
    let other = json!({"customer": "ada", "sku": "widget", "quantity": 3, "amount_cents": 4200})
        .to_string();
    let (s, v) = post(&base, Some("k1"), other).await;
    assert_eq!(s, 422, "{v}");

    let id = first["order_id"].as_str().unwrap();
    engine.wait(id.parse().unwrap()).await.unwrap();
    let client = reqwest::Client::new();
    let shown: Value = client
        .get(format!("{base}/orders/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["status"], "completed", "{shown}");
    let events: Vec<&str> = shown["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events.first(), Some(&"started"));
    assert_eq!(events.last(), Some(&"completed"));
    assert_eq!(
        client
            .get(format!(
                "{base}/orders/01a211da-b34b-7c63-a822-20fc30493cca"
            ))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        client
            .get(format!("{base}/orders/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        400
    );

    // A webhook signed with another secret is refused.
    let body = json!({"id": "evt_x", "type": "charge.settled"}).to_string();
    let sig = sagaflow_steps::webhook::sign(
        &Secret::new("whsec_forged"),
        SystemTime::now(),
        body.as_bytes(),
    );
    let r = client
        .post(format!("{base}/webhooks/payments"))
        .header("signature", sig)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
