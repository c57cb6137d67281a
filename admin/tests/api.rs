//! The admin API's authentication and its answers, against a real server on 127.0.0.1.

use std::sync::Arc;

use reqwest::StatusCode;
use sagaflow::store::MemLog;
use sagaflow::{Phase, SagaMeta, SagaOutcome, SagaStatus};
use sagaflow_admin::{router, ApiError, Auth, SagaView, Token};
use sagaflow_tests::*;
use serde_json::json;

const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-token-0123456789";

async fn serve() -> (String, sagaflow::SagaId, Arc<Ledger>) {
    let ledger = Ledger::new();
    ledger.script("order", Phase::Action, [Outcome::Rejected]);
    ledger.script("inventory", Phase::Compensation, [Outcome::Rejected]);
    let engine = builder()
        .register(checkout(&ledger))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Parked { .. }
    ));
    let auth = Auth::new(Token::new(ADMIN).unwrap()).with_read_token(Token::new(READ).unwrap());
    let app = router(Arc::new(engine), auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), id, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_needs_a_valid_token_and_repairs_need_the_admin_one() {
    let (url, id, _ledger) = serve().await;
    let c = reqwest::Client::new();
    let list = format!("{url}/v1/sagas?status=parked");
    assert_eq!(
        c.get(&list).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let wrong = c
        .get(&list)
        .bearer_auth("admin-token-0123456788")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let basic = c
        .get(&list)
        .basic_auth("admin", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(
        basic.status(),
        StatusCode::UNAUTHORIZED,
        "only bearer tokens"
    );
    let ok = c.get(&list).bearer_auth(READ).send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let metas: Vec<SagaMeta> = ok.json().await.unwrap();
    assert_eq!(metas.len(), 1);
    assert_eq!(metas[0].id, id);

    let repair = format!("{url}/v1/sagas/{id}/repair");
    let body = json!({"action": "resume", "operator": "ana", "reason": "fixed"});
    let r = c
        .post(&repair)
        .bearer_auth(READ)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = c.post(&repair).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A repair that would break a guarantee: 409 with the engine's code.
    let refused = json!({"action": "retry_now", "operator": "ana", "reason": "x"});
    let r = c
        .post(&repair)
        .bearer_auth(ADMIN)
        .json(&refused)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let e: ApiError = r.json().await.unwrap();
    assert_eq!(e.code.as_deref(), Some("SAGA-0012"));
    assert!(e.error.contains("parked"), "{}", e.error);

    let r = c
        .post(&repair)
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let meta: SagaMeta = r.json().await.unwrap();
    assert_eq!(meta.status, SagaStatus::Compensating);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_answer_and_bad_requests_are_typed() {
    let (url, id, _ledger) = serve().await;
    let c = reqwest::Client::new();
    let get = |path: String| c.get(format!("{url}{path}")).bearer_auth(READ).send();
    let view: SagaView = get(format!("/v1/sagas/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view.summary.id, id);
    assert_eq!(view.history.last().unwrap().event.name(), "parked");
    let unknown = get("/v1/sagas/01a211a2-b615-786a-9e5b-8fc806097d67".into())
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let bad_id = get("/v1/sagas/not-a-uuid".into()).await.unwrap();
    assert_eq!(bad_id.status(), StatusCode::BAD_REQUEST);
    let bad_status = get("/v1/sagas?status=sleeping".into()).await.unwrap();
    assert_eq!(bad_status.status(), StatusCode::BAD_REQUEST);
    let stats: serde_json::Value = get("/v1/stats".into()).await.unwrap().json().await.unwrap();
    assert_eq!(stats["total"], 1);
    let metrics = get("/metrics".into()).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("sagaflow_sagas_started_total{definition=\"checkout\"} 1"),
        "{metrics}"
    );
    let bad_body = c
        .post(format!("{url}/v1/sagas/{id}/repair"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_body.status(), StatusCode::BAD_REQUEST);
    let unknown_action = c
        .post(format!("{url}/v1/sagas/{id}/repair"))
        .bearer_auth(ADMIN)
        .json(&json!({"action": "explode", "operator": "a", "reason": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_action.status(), StatusCode::BAD_REQUEST);
}

#[test]
fn tokens_never_show_and_short_ones_are_refused() {
    let t = Token::new(ADMIN).unwrap();
    assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    assert_eq!(t.to_string(), "<redacted>");
    assert!(!format!("{:?}", Auth::new(t)).contains(ADMIN));
    assert!(Token::new("short").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_zero_is_refused_and_a_limit_caps_the_list() {
    let ledger = Ledger::new();
    let engine = builder()
        .register(checkout(&ledger))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = engine.start("checkout", json!({}), None).await.unwrap();
        engine.wait(id).await.unwrap();
        ids.push(id);
    }
    // Listed in id order (ids are time-ordered; two in one millisecond by their random bits).
    ids.sort();
    let app = router(Arc::new(engine), Auth::new(Token::new(ADMIN).unwrap()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let c = reqwest::Client::new();
    let list = |q: &str| {
        c.get(format!("{url}/v1/sagas{q}"))
            .bearer_auth(ADMIN)
            .send()
    };

    let r = list("?limit=0").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: ApiError = r.json().await.unwrap();
    assert_eq!(
        e.error,
        "limit must be 1 or more (leave it out for no limit)"
    );
    assert_eq!(e.code, None);
    for (q, want) in [("?limit=1", 1), ("?limit=2", 2), ("?limit=9", 3), ("", 3)] {
        let r = list(q).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{q}");
        let metas: Vec<SagaMeta> = r.json().await.unwrap();
        let got: Vec<_> = metas.iter().map(|m| m.id).collect();
        assert_eq!(got, ids[..want].to_vec(), "{q}");
    }
}

#[test]
fn tokens_from_the_environment_are_refused_when_short_and_optional_when_unset() {
    let env = |admin: Option<&'static str>, read: Option<&'static str>| {
        Auth::from_lookup(move |var| match var {
            "SAGAFLOW_ADMIN_TOKEN" => admin.map(str::to_string),
            "SAGAFLOW_READ_TOKEN" => read.map(str::to_string),
            other => panic!("looked up {other}"),
        })
    };
    assert!(env(None, None).unwrap().is_none(), "unset: no admin API");
    assert!(
        env(Some(""), None).unwrap().is_none(),
        "empty counts as unset"
    );
    let e = env(Some("short-token"), None).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(
        e.to_string(),
        "SAGAFLOW_ADMIN_TOKEN: a token needs at least 16 bytes, this one has 11; \
         set a random one (`openssl rand -hex 32`) or unset it"
    );
    let e = env(Some(ADMIN), Some("read")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "SAGAFLOW_READ_TOKEN: a token needs at least 16 bytes, this one has 4; \
         set a random one (`openssl rand -hex 32`) or unset it"
    );
    let e = env(None, Some(READ)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "SAGAFLOW_READ_TOKEN is set but SAGAFLOW_ADMIN_TOKEN is not: the admin API needs an admin token"
    );
    let auth = env(Some(ADMIN), Some(READ)).unwrap().unwrap();
    let shown = format!("{auth:?}");
    assert!(!shown.contains(ADMIN) && !shown.contains(READ), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_purge_need_the_admin_token_and_answer_typed() {
    let (url, id, _ledger) = serve().await;
    let c = reqwest::Client::new();
    let cancel = format!("{url}/v1/sagas/{id}/cancel");
    let body = json!({"operator": "ana", "reason": "customer asked"});
    // The read token cannot cancel.
    let r = c
        .post(&cancel)
        .bearer_auth(READ)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // The saga is parked: a cancel is refused, typed, and writes nothing.
    let r = c
        .post(&cancel)
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let e: ApiError = r.json().await.unwrap();
    assert_eq!(e.code.as_deref(), Some("SAGA-0017"));
    assert!(e.error.contains("parked"), "{}", e.error);
    // A malformed body is a 400.
    let r = c
        .post(&cancel)
        .bearer_auth(ADMIN)
        .json(&json!({"who": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Purge: a dry run by default; the parked saga is never counted.
    let purge = format!("{url}/v1/purge");
    let r = c
        .post(&purge)
        .bearer_auth(ADMIN)
        .json(&json!({"finished_before_ms": u64::MAX}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let p: serde_json::Value = r.json().await.unwrap();
    assert_eq!(p["dry_run"], true);
    assert_eq!(p["matched"], 0);
    let r = c
        .post(&purge)
        .bearer_auth(READ)
        .json(&json!({"finished_before_ms": 0, "dry_run": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_repair_by_filter_needs_the_admin_token_and_counts_before_it_writes() {
    let (url, id, _ledger) = serve().await;
    let c = reqwest::Client::new();
    let bulk = format!("{url}/v1/bulk");
    let body = json!({
        "action": "resume",
        "status": "parked",
        "park_kind": "compensation_failed",
        "operator": "ana",
        "reason": "inventory fixed",
    });
    let r = c.post(&bulk).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let post =
        |token: &str, body: &serde_json::Value| c.post(&bulk).bearer_auth(token).json(body).send();
    let r = post(READ, &body).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // A dry run by default.
    let r = post(ADMIN, &body).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let dry: sagaflow::BulkReport = r.json().await.unwrap();
    assert!(dry.dry_run);
    assert_eq!((dry.matched, dry.applied, dry.refused_count), (1, 1, 0));
    let get = |path: String| c.get(format!("{url}{path}")).bearer_auth(READ).send();
    let view: SagaView = get(format!("/v1/sagas/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view.summary.status, SagaStatus::Parked, "nothing written");

    // Who and why are required; a bad action or filter is a 400.
    for (bad, code) in [
        (
            json!({"action": "resume", "operator": "ana", "reason": " "}),
            Some("SAGA-0020"),
        ),
        (
            json!({"action": "explode", "operator": "ana", "reason": "x"}),
            None,
        ),
        (
            json!({"action": "resume", "status": "asleep", "operator": "ana", "reason": "x"}),
            None,
        ),
        (
            json!({"action": "resume", "park_kind": "tired", "operator": "ana", "reason": "x"}),
            None,
        ),
    ] {
        let r = post(ADMIN, &bad).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        let e: ApiError = r.json().await.unwrap();
        assert_eq!(e.code.as_deref(), code, "{bad}");
    }

    // A confirmation that does not parse, or that another set of sagas would have
    // given, is refused.
    for confirm in [json!("yes"), json!("1-0000000000000000-none")] {
        let mut wrong = body.clone();
        wrong["confirm"] = confirm.clone();
        let r = post(ADMIN, &wrong).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{confirm}");
    }
    // A missing reason is refused like an empty one.
    let r = post(ADMIN, &json!({"action": "resume", "operator": "ana"}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: ApiError = r.json().await.unwrap();
    assert_eq!(e.code.as_deref(), Some("SAGA-0020"));
    // The dry run's confirmation is a string in JSON, sent back as it came.
    let raw: serde_json::Value = post(ADMIN, &body).await.unwrap().json().await.unwrap();
    assert!(raw["confirm"].is_string(), "{raw}");
    let mut apply = body.clone();
    apply["confirm"] = raw["confirm"].clone();
    let r = post(ADMIN, &apply).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let done: sagaflow::BulkReport = r.json().await.unwrap();
    assert!(!done.dry_run);
    assert_eq!((done.matched, done.applied), (1, 1));
    let view: SagaView = get(format!("/v1/sagas/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(view.summary.status, SagaStatus::Parked, "resumed");
}

/// Every route of the API, and any other path or method, answers 401 without a valid
/// bearer token (and writes nothing): the list below is the router's, route by route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_401_without_a_valid_token() {
    let (url, id, _ledger) = serve().await;
    let c = reqwest::Client::new();
    let routes: Vec<(reqwest::Method, String)> = [
        ("GET", "/v1/sagas".to_string()),
        ("GET", format!("/v1/sagas/{id}")),
        ("GET", "/v1/stats".to_string()),
        ("POST", format!("/v1/sagas/{id}/repair")),
        ("POST", format!("/v1/sagas/{id}/cancel")),
        ("POST", "/v1/purge".to_string()),
        ("POST", "/v1/deliveries".to_string()),
        ("GET", "/v1/deliveries".to_string()),
        ("POST", format!("/v1/sagas/{id}/approve")),
        ("GET", "/v1/drifts".to_string()),
        ("POST", "/v1/reconcile".to_string()),
        ("POST", "/v1/bulk".to_string()),
        ("GET", "/metrics".to_string()),
        ("DELETE", format!("/v1/sagas/{id}")),
        ("GET", "/v1/no-such-route".to_string()),
    ]
    .into_iter()
    .map(|(m, p)| (m.parse().unwrap(), p))
    .collect();
    let body = json!({"action": "resolve", "operator": "ana", "reason": "x"});
    for (method, path) in &routes {
        for token in [None, Some("admin-token-0123456788"), Some("")] {
            let mut r = c
                .request(method.clone(), format!("{url}{path}"))
                .json(&body);
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            let r = r.send().await.unwrap();
            assert_eq!(
                r.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
        }
    }
    // Nothing was written: the saga is still parked.
    let view: SagaView = c
        .get(format!("{url}/v1/sagas/{id}"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view.summary.status, SagaStatus::Parked);
}
