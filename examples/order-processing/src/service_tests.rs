//! The service's HTTP contract, in-process on a memory store against the fake providers,
//! each service behind the real listener (`server::serve`) on 127.0.0.1.

use std::future::pending;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sagaflow::store::MemLog;
use sagaflow::Engine;
use sagaflow_admin::{Auth, Token};
use sagaflow_steps::secrets::Secret;
use serde_json::{json, Value};

use crate::providers::{self, Faults, ProviderSecrets, Providers};
use crate::saga::{definition, Integrations};
use crate::server::{self, ConnStats, Limits};
use crate::service::{app, run, webhook_secrets, Listeners, Service, ServiceSecrets};

/// An engine on a memory store and the providers.
pub(crate) struct Fixture {
    pub(crate) engine: Arc<Engine>,
    pub(crate) providers: Providers,
    /// Where the providers' ledgers are (removed when the fixture is dropped).
    pub(crate) _dir: tempfile::TempDir,
}

pub(crate) async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let providers = providers::start(
        &dir.path().join("p"),
        Faults::default(),
        1000,
        Arc::new(Mutex::new(Vec::new())),
        ProviderSecrets::generate().unwrap(),
    )
    .await
    .unwrap();
    let integrations = Integrations::new(&providers.addresses, &providers.secrets.client_secret);
    let engine = Engine::builder()
        .seed(5)
        .register(definition(&integrations).unwrap())
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    Fixture {
        engine: Arc::new(engine),
        providers,
        _dir: dir,
    }
}

impl Fixture {
    /// A new service instance over the fixture's engine.
    pub(crate) fn service(&self, webhook_secrets: Vec<Secret>) -> Arc<Service> {
        Service::new(self.engine.clone(), webhook_secrets).unwrap()
    }

    /// The engine's inbox: (key, delivery id) of each delivery.
    pub(crate) async fn deliveries(&self) -> Vec<(String, String)> {
        inbox(&self.engine).await
    }
}

async fn inbox(engine: &Engine) -> Vec<(String, String)> {
    engine
        .deliveries(None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.key, d.id))
        .collect()
}

/// Serves `svc` on a fresh port behind the real listener; returns its base URL.
pub(crate) async fn serve_public(
    svc: Arc<Service>,
    name: &'static str,
    limits: Limits,
) -> (String, Arc<ConnStats>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stats = Arc::new(ConnStats::default());
    let st = stats.clone();
    tokio::spawn(
        async move { server::serve(name, listener, app(svc), limits, st, pending()).await },
    );
    (base, stats)
}

async fn start() -> (String, Arc<Engine>, Fixture) {
    let f = fixture().await;
    let svc = f.service(vec![f.providers.secrets.webhook_secret.clone()]);
    let (base, _) = serve_public(svc, "t-contract", Limits::default()).await;
    // Payments settles each charge with a webhook to this service.
    *f.providers.webhook_urls.lock().unwrap() = vec![format!("{base}/webhooks/payments")];
    (base, f.engine.clone(), f)
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
    // The settlement webhook payments sent was delivered to the engine and taken by the
    // `settle` step: its event id is the delivery id.
    let received: Vec<&Value> = shown["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "event_received")
        .collect();
    assert_eq!(received.len(), 1, "{shown}");
    assert_eq!(received[0]["step"], "settle");
    let delivery = received[0]["detail"]["delivery"].as_str().unwrap();
    assert!(delivery.starts_with("evt_"), "{delivery}");
    assert!(events.contains(&"awaiting"), "{events:?}");
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

async fn post_as(base: &str, content_type: Option<&str>, body: &str) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .post(format!("{base}/orders"))
        .header("idempotency-key", "ct-1")
        .body(body.to_string());
    if let Some(ct) = content_type {
        r = r.header("content-type", ct);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_must_be_sent_as_json() {
    let (base, _engine, _f) = start().await;
    let order =
        json!({"customer": "ada", "sku": "widget", "quantity": 1, "amount_cents": 100}).to_string();
    let refused = json!({"error": "an order is sent as Content-Type: application/json"});
    for ct in [
        Some("text/plain"),
        Some("text/plain; charset=utf-8"),
        Some("application/x-www-form-urlencoded"),
        Some("application/jsonp"),
        None,
    ] {
        assert_eq!(
            post_as(&base, ct, &order).await,
            (415, refused.clone()),
            "{ct:?}"
        );
    }
    let (s, first) = post_as(&base, Some("application/json; charset=utf-8"), &order).await;
    assert_eq!(s, 202, "{first}");
    let (s, again) = post_as(&base, Some("Application/JSON"), &order).await;
    assert_eq!((s, &again["order_id"]), (202, &first["order_id"]));
}

async fn send_webhook(base: &str, secret: &Secret, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let sig = sagaflow_steps::webhook::sign(secret, SystemTime::now(), body.as_bytes());
    let r = reqwest::Client::new()
        .post(format!("{base}/webhooks/payments"))
        .header("signature", sig)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Sends a webhook signed with `secret` to the service's routes in-process; the router
/// (and with it the service and its engine) is dropped after.
async fn send_in_process(svc: Arc<Service>, secret: &Secret, body: &Value) -> (u16, Value) {
    use tower::ServiceExt;
    let body = body.to_string();
    let sig = sagaflow_steps::webhook::sign(secret, SystemTime::now(), body.as_bytes());
    let req = axum::http::Request::post("/webhooks/payments")
        .header("signature", sig)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .unwrap();
    let r = app(svc).oneshot(req).await.unwrap();
    let status = r.status().as_u16();
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A settlement is delivered to the engine's inbox, answered 2xx once durable; the same
/// event id again is a duplicate, also after the engine restarts on the same store (no
/// memory of event ids in the service).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_replayed_after_a_restart_is_a_duplicate() {
    let f = fixture().await;
    let secret = f.providers.secrets.webhook_secret.clone();
    let evt = |id: &str| json!({"id": id, "type": "charge.settled", "charge_id": format!("ch_{id}"), "settlement_id": "st"});
    let (new, duplicate) = (
        (202, json!({"delivery": "new"})),
        (200, json!({"delivery": "duplicate"})),
    );
    let store = Arc::new(MemLog::new());
    let open = || async {
        let integrations =
            Integrations::new(&f.providers.addresses, &f.providers.secrets.client_secret);
        Arc::new(
            Engine::builder()
                .register(definition(&integrations).unwrap())
                .open_with(store.clone())
                .await
                .unwrap(),
        )
    };
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);

    let engine = open().await;
    let first = Service::new(engine.clone(), vec![secret.clone()]).unwrap();
    assert_eq!(
        send_in_process(first.clone(), &secret, &evt("evt_1")).await,
        new
    );
    assert_eq!(
        send_in_process(first.clone(), &secret, &evt("evt_1")).await,
        duplicate
    );
    assert_eq!(
        (
            count(&first.webhooks_accepted),
            count(&first.webhooks_duplicate)
        ),
        (1, 1)
    );
    drop(first);
    Arc::try_unwrap(engine).unwrap().shutdown().await.unwrap();

    // The engine restarts on the same store, with a new service: the duplicate is known
    // from the store alone.
    let engine = open().await;
    let second = Service::new(engine.clone(), vec![secret.clone()]).unwrap();
    assert_eq!(
        send_in_process(second.clone(), &secret, &evt("evt_1")).await,
        duplicate
    );
    assert_eq!(
        send_in_process(second.clone(), &secret, &evt("evt_2")).await,
        new
    );
    assert_eq!(
        send_in_process(second.clone(), &secret, &evt("evt_2")).await,
        duplicate
    );
    assert_eq!(
        (
            count(&second.webhooks_accepted),
            count(&second.webhooks_duplicate)
        ),
        (1, 2)
    );
    // Recorded once each, under the key the `settle` step of the charge's order waits on.
    assert_eq!(
        inbox(&engine).await,
        [
            ("settlement/ch_evt_1".to_string(), "evt_1".to_string()),
            ("settlement/ch_evt_2".to_string(), "evt_2".to_string()),
        ]
    );
    // Only settlements are handled; one names its charge.
    let other = json!({"id": "evt_3", "type": "charge.refunded", "charge_id": "ch_3"});
    assert_eq!(
        send_in_process(second.clone(), &secret, &other).await.0,
        422
    );
    let no_charge = json!({"id": "evt_4", "type": "charge.settled"});
    assert_eq!(
        send_in_process(second.clone(), &secret, &no_charge).await,
        (400, json!({"error": "the event has no `charge_id`"}))
    );
    assert_eq!(inbox(&engine).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_signed_with_any_of_the_listed_secrets_are_accepted() {
    let f = fixture().await;
    let secrets = webhook_secrets(" whsec_new , whsec_old ").unwrap();
    assert_eq!(
        secrets.iter().map(Secret::expose).collect::<Vec<_>>(),
        ["whsec_new", "whsec_old"]
    );
    let (base, _) = serve_public(f.service(secrets), "t-rotate", Limits::default()).await;
    let evt = |id: &str| json!({"id": id, "type": "charge.settled", "charge_id": "ch_k"});
    let (old, new) = (Secret::new("whsec_old"), Secret::new("whsec_new"));
    assert_eq!(
        send_webhook(&base, &old, &evt("evt_a")).await,
        (202, json!({"delivery": "new"}))
    );
    assert_eq!(
        send_webhook(&base, &new, &evt("evt_b")).await,
        (202, json!({"delivery": "new"}))
    );
    assert_eq!(
        send_webhook(&base, &Secret::new("whsec_other"), &evt("evt_c")).await,
        (401, json!({"error": "bad signature"}))
    );
    assert_eq!(
        send_webhook(&base, &new, &json!({"type": "charge.settled"})).await,
        (400, json!({"error": "the event has no `id`"}))
    );
    assert_eq!(f.deliveries().await.len(), 2);

    for bad in ["", " , ", "a,,b", "a,"] {
        assert!(webhook_secrets(bad).is_err(), "{bad:?}");
    }
    let env = |webhook: &'static str| {
        move |var: &str| match var {
            "PAYMENTS_CLIENT_SECRET" => Some("cs".to_string()),
            "PAYMENTS_WEBHOOK_SECRET" => Some(webhook.to_string()),
            _ => None,
        }
    };
    let loaded = ServiceSecrets::from_lookup(env("whsec_new,whsec_old")).unwrap();
    assert_eq!(loaded.webhook_secrets, [new, old]);
    assert!(loaded.admin.is_none());
    let e = ServiceSecrets::from_lookup(env("")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "PAYMENTS_WEBHOOK_SECRET: no webhook secret: set it in the environment or in the --env-file"
    );
    assert!(!format!("{loaded:?}").contains("whsec_"), "{loaded:?}");
}

const ADMIN: &str = "admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_served_on_its_own_listener_only() {
    let f = fixture().await;
    let svc = f.service(vec![f.providers.secrets.webhook_secret.clone()]);
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public_url = format!("http://{}", public.local_addr().unwrap());
    let admin_url = format!("http://{}", admin.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(run(
        svc,
        f.engine.clone(),
        Listeners {
            public,
            admin: Some((admin, Auth::new(Token::new(ADMIN).unwrap()))),
            limits: Limits::default(),
            public_stats: Arc::default(),
        },
        async {
            let _ = stopped.await;
        },
    ));
    let c = reqwest::Client::new();
    let get = |url: String| c.get(url).bearer_auth(ADMIN).send();
    for path in ["/admin/v1/sagas", "/v1/sagas", "/metrics", "/admin/metrics"] {
        let r = get(format!("{public_url}{path}")).await.unwrap();
        assert_eq!(r.status(), 404, "{path} on the public listener");
    }
    let r = get(format!("{admin_url}/v1/sagas")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!([]));
    let r = get(format!("{admin_url}/v1/sagas?limit=0")).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = c.get(format!("{admin_url}/v1/sagas")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = get(format!(
        "{admin_url}/orders/01a211da-b34b-7c63-a822-20fc30493cca"
    ))
    .await
    .unwrap();
    assert_eq!(
        r.status(),
        404,
        "the orders API is not on the admin listener"
    );
    let r = c
        .get(format!(
            "{public_url}/orders/01a211da-b34b-7c63-a822-20fc30493cca"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "no such order"})
    );

    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    assert!(
        c.get(format!("{admin_url}/v1/sagas")).send().await.is_err(),
        "both listeners are closed after shutdown"
    );

    let e = ServiceSecrets::from_lookup(|var| match var {
        "SAGAFLOW_ADMIN_TOKEN" => Some("0123456789".to_string()),
        "SAGAFLOW_READ_TOKEN" => None,
        _ => Some("x".to_string()),
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "SAGAFLOW_ADMIN_TOKEN: a token needs at least 16 bytes, this one has 10; \
         set a random one (`openssl rand -hex 32`) or unset it"
    );
}
