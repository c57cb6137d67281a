//! Deliveries, approvals and the inbox over the admin API, against a real server on
//! 127.0.0.1: answered once durable, duplicates, refusals with their codes, token roles.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use sagaflow::store::{Delivered, Delivery, MemLog};
use sagaflow::{Await, Engine, EngineOptions, SagaDefinition, SagaId, SagaOutcome};
use sagaflow_admin::{router, ApiError, Auth, DeliverResponse, Token};
use sagaflow_tests::*;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-token-0123456789";

/// payment → settle (await `settlement/<order>` for an hour) → order.
fn settled(ledger: &Arc<Ledger>) -> SagaDefinition {
    SagaDefinition::builder("settled", 1)
        .step("payment", fake("payment", ledger))
        .options(opts())
        .await_event(
            "settle",
            Await::new(Duration::from_secs(3600), |ctx| {
                ctx.saga_input()["order"]
                    .as_str()
                    .map(|o| format!("settlement/{o}"))
                    .ok_or_else(|| "no order".to_string())
            }),
        )
        .step("order", fake("order", ledger))
        .options(opts())
        .build()
        .unwrap()
}

/// An engine (payloads up to 256 bytes) on a memory store, served with both tokens.
async fn serve() -> (String, Arc<Engine>) {
    let ledger = Ledger::new();
    let engine = builder()
        .register(settled(&ledger))
        .options(EngineOptions::default().with_max_payload_bytes(256))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let engine = Arc::new(engine);
    let auth = Auth::new(Token::new(ADMIN).unwrap()).with_read_token(Token::new(READ).unwrap());
    let app = router(engine.clone(), auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), engine)
}

/// Waits until saga `id` waits for its event (its summary names the key).
async fn until_awaiting(engine: &Engine, id: SagaId) -> String {
    for _ in 0..1000 {
        if let Some(a) = engine.status(id).unwrap().awaiting {
            return a.key;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("saga {id} never began waiting");
}

async fn error(r: reqwest::Response) -> ApiError {
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_answered_new_then_duplicate_and_its_saga_takes_it() {
    let (url, engine) = serve().await;
    let c = reqwest::Client::new();
    let post = |body: Value| {
        c.post(format!("{url}/v1/deliveries"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    let body = json!({"key": "settlement/o1", "id": "wh-1", "payload": {"settled": 500}});
    let r = post(body.clone()).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let d: DeliverResponse = r.json().await.unwrap();
    assert_eq!(d.delivered, Delivered::New);
    // Acknowledged means recorded: the engine lists it at once, not yet taken.
    let listed = engine.deliveries(None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].payload, json!({"settled": 500}));
    // The same key and id again, even with another payload: a duplicate, nothing written.
    let again = json!({"key": "settlement/o1", "id": "wh-1", "payload": {"settled": 1}});
    let r = post(again).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let raw: Value = r.json().await.unwrap();
    assert_eq!(raw, json!({"delivered": "duplicate"}));
    assert_eq!(engine.deliveries(None, 10).await.unwrap(), listed);

    // The event came first: the saga takes it when it gets to the step.
    let id = engine
        .start("settled", json!({"order": "o1"}), None)
        .await
        .unwrap();
    let SagaOutcome::Completed { outputs } = engine.wait(id).await.unwrap() else {
        panic!("not completed");
    };
    assert_eq!(outputs["settle"], json!({"settled": 500}));
    let r = c
        .get(format!("{url}/v1/deliveries"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let all: Vec<Delivery> = r.json().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].taken_by, Some(id));
    // Taken, it still answers duplicates.
    assert_eq!(post(body).await.unwrap().status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_deliveries_are_typed_and_write_nothing() {
    let (url, engine) = serve().await;
    let c = reqwest::Client::new();
    let post = |body: String| {
        c.post(format!("{url}/v1/deliveries"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // An empty key, a key over 256 bytes: 422, SAGA-0019.
    for body in [
        json!({"key": "", "id": "wh-1", "payload": null}),
        json!({"key": "k".repeat(257), "id": "wh-1", "payload": null}),
        json!({"key": "settlement/o1", "id": "", "payload": null}),
    ] {
        let r = post(body.to_string()).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let e = error(r).await;
        assert_eq!(e.code.as_deref(), Some("SAGA-0019"), "{}", e.error);
        assert!(e.error.starts_with("delivery refused: "), "{}", e.error);
    }
    // A payload over the engine's limit (256 bytes here): 413, SAGA-0006.
    let big = json!({"key": "settlement/o1", "id": "wh-2", "payload": "x".repeat(300)});
    let r = post(big.to_string()).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error(r).await.code.as_deref(), Some("SAGA-0006"));
    // Nested deeper than the engine's limit (64 levels): 413, SAGA-0013.
    let deep = format!(
        r#"{{"key": "settlement/o1", "id": "wh-3", "payload": {}1{}}}"#,
        "[".repeat(70),
        "]".repeat(70)
    );
    let r = post(deep).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error(r).await.code.as_deref(), Some("SAGA-0013"));
    // A body over axum's 2 MB: 413 before the engine sees it.
    let huge = json!({"key": "k", "id": "i", "payload": "x".repeat(3 << 20)});
    let r = post(huge.to_string()).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Malformed JSON, a missing payload: 400.
    for body in [
        "{not json".to_string(),
        json!({"key": "k", "id": "i"}).to_string(),
    ] {
        let r = post(body.clone()).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
    }
    assert!(engine.deliveries(None, 10).await.unwrap().is_empty());

    // A stopping engine takes no delivery: 503, SAGA-0011.
    engine.shutdown().await.unwrap();
    let r = post(json!({"key": "k", "id": "i", "payload": 1}).to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error(r).await.code.as_deref(), Some("SAGA-0011"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_and_approvals_need_the_admin_token_and_the_list_the_read_one() {
    let (url, engine) = serve().await;
    let c = reqwest::Client::new();
    let delivery = json!({"key": "settlement/o1", "id": "wh-1", "payload": 1});
    let deliveries = format!("{url}/v1/deliveries");
    let approve = format!("{url}/v1/sagas/01a211a2-b615-786a-9e5b-8fc806097d67/approve");
    let approval = json!({"step": "settle", "operator": "ana", "reason": "ok"});
    for (path, body) in [(&deliveries, &delivery), (&approve, &approval)] {
        let r = c.post(path).json(body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        let r = c
            .post(path)
            .bearer_auth("admin-token-0123456788")
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        let r = c
            .post(path)
            .bearer_auth(READ)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
    }
    assert!(engine.deliveries(None, 10).await.unwrap().is_empty());
    let r = c.get(&deliveries).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for token in [READ, ADMIN] {
        let r = c.get(&deliveries).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let listed: Vec<Delivery> = r.json().await.unwrap();
        assert!(listed.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_is_delivered_to_the_key_the_step_waits_on_once() {
    let (url, engine) = serve().await;
    let c = reqwest::Client::new();
    let id = engine
        .start("settled", json!({"order": "o7"}), None)
        .await
        .unwrap();
    assert_eq!(until_awaiting(&engine, id).await, "settlement/o7");
    let approve = |id: &str, body: Value| {
        c.post(format!("{url}/v1/sagas/{id}/approve"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    let sid = id.to_string();

    // Refused, nothing written: a step that does not wait for an event, a step the
    // saga does not have, no who or why (422, SAGA-0019); an unknown
    // saga (404); a bad id or body (400).
    for step in ["payment", "shipping"] {
        let r = approve(
            &sid,
            json!({"step": step, "operator": "ana", "reason": "ok"}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{step}");
        let e = error(r).await;
        assert_eq!(e.code.as_deref(), Some("SAGA-0019"), "{}", e.error);
        assert!(e.error.contains(&format!("`{step}`")), "{}", e.error);
    }
    let r = approve(
        &sid,
        json!({"step": "settle", "operator": "ana", "reason": " "}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error(r).await.code.as_deref(), Some("SAGA-0019"));
    let r = approve(
        "01a211a2-b615-786a-9e5b-8fc806097d67",
        json!({"step": "settle", "operator": "ana", "reason": "ok"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error(r).await.code.as_deref(), Some("SAGA-0008"));
    let r = approve(
        "not-an-id",
        json!({"step": "settle", "operator": "a", "reason": "b"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = approve(&sid, json!({"step": "settle"})).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(engine.deliveries(None, 10).await.unwrap().is_empty());

    let body = json!({"step": "settle", "operator": "ana", "reason": "checked the bank statement"});
    let r = approve(&sid, body.clone()).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"delivered": "new"})
    );
    let SagaOutcome::Completed { outputs } = engine.wait(id).await.unwrap() else {
        panic!("not completed");
    };
    assert_eq!(
        outputs["settle"],
        json!({"approved_by": "ana", "reason": "checked the bank statement"})
    );
    // Its delivery id names the saga and the step; approving again is a duplicate.
    let listed = engine.deliveries(None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, "settlement/o7");
    assert_eq!(listed[0].id, format!("approval/{id}/settle"));
    assert_eq!(listed[0].taken_by, Some(id));
    let r = approve(&sid, body).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"delivered": "duplicate"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_is_listed_a_page_at_a_time() {
    let (url, engine) = serve().await;
    for (key, id) in [("a", "2"), ("b", "1"), ("a", "1"), ("c", "9")] {
        assert_eq!(
            engine.deliver(key, id, json!(id)).await.unwrap(),
            Delivered::New
        );
    }
    let c = reqwest::Client::new();
    let list = |q: &str| {
        c.get(format!("{url}/v1/deliveries{q}"))
            .bearer_auth(READ)
            .send()
    };
    let page = |r: reqwest::Response| async move {
        assert_eq!(r.status(), StatusCode::OK);
        let v: Vec<Delivery> = r.json().await.unwrap();
        v.into_iter()
            .map(|d| format!("{}/{}", d.key, d.id))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        page(list("").await.unwrap()).await,
        ["a/1", "a/2", "b/1", "c/9"]
    );
    assert_eq!(page(list("?limit=2").await.unwrap()).await, ["a/1", "a/2"]);
    assert_eq!(
        page(list("?limit=2&after_key=a&after_id=2").await.unwrap()).await,
        ["b/1", "c/9"]
    );
    assert!(page(list("?after_key=c&after_id=9").await.unwrap())
        .await
        .is_empty());
    for q in [
        "?limit=0",
        "?limit=1001",
        "?after_key=a",
        "?after_id=1",
        "?limit=x",
    ] {
        let r = list(q).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{q}");
    }
    let e = error(list("?after_key=a").await.unwrap()).await;
    assert_eq!(
        e.error,
        "after_key and after_id go together (the last delivery of the previous page)"
    );
}
