//! Drift over the admin API, against a real server on 127.0.0.1: the reconciler run on
//! request, open drifts listed a page of sagas at a time, one marked handled, token roles.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use sagaflow::machine::{DriftKind, Event, Expected, Repair};
use sagaflow::store::MemLog;
use sagaflow::{
    Engine, EngineOptions, Finished, Lsn, Reconcile, ReconcileOptions, SagaDefinition, SagaId,
    SagaMeta, SagaStatus, Verdict,
};
use sagaflow_admin::{router, ApiError, Auth, DriftPage, ReconcileSummary, SagaView, Token};
use sagaflow_tests::*;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-token-0123456789";

/// A system whose books disagree (with `kind`) on every saga started with
/// `{"drift": true}`, and agree on the others.
struct Books(DriftKind);

#[sagaflow::async_trait]
impl Reconcile for Books {
    async fn reconcile(&self, step: &Finished) -> Verdict {
        if step.input["drift"] == true {
            Verdict::drift(self.0, format!("the books disagree on {}", step.key))
        } else {
            Verdict::Matches
        }
    }
}

/// payment (its books miss the charge) → order (its books hold another amount).
fn checked(ledger: &Arc<Ledger>) -> SagaDefinition {
    SagaDefinition::builder("checked", 1)
        .step("payment", fake("payment", ledger))
        .options(opts())
        .reconcile("payments", Books(DriftKind::Missing))
        .step("order", fake("order", ledger))
        .options(opts())
        .reconcile("orders", Books(DriftKind::Different))
        .build()
        .unwrap()
}

struct Served {
    url: String,
    engine: Arc<Engine>,
    /// The sagas whose books disagree, in id order.
    drifted: Vec<SagaId>,
    /// The saga whose books agree.
    clean: SagaId,
}

/// An engine on a memory store with three completed sagas whose books disagree and one
/// whose books agree, served with both tokens; nothing reconciled yet.
async fn serve() -> Served {
    let ledger = Ledger::new();
    // Every finished saga is in the window at once; the background task waits an hour.
    let reconcile = ReconcileOptions::default()
        .window(Duration::ZERO, Duration::from_secs(3600))
        .every(Duration::from_secs(3600));
    let engine = builder()
        .register(checked(&ledger))
        .options(EngineOptions::default().with_reconciler(reconcile))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let mut drifted = Vec::new();
    for _ in 0..3 {
        let id = engine
            .start("checked", json!({"drift": true}), None)
            .await
            .unwrap();
        engine.wait(id).await.unwrap();
        drifted.push(id);
    }
    drifted.sort();
    let clean = engine
        .start("checked", json!({"drift": false}), None)
        .await
        .unwrap();
    engine.wait(clean).await.unwrap();
    let engine = Arc::new(engine);
    let auth = Auth::new(Token::new(ADMIN).unwrap()).with_read_token(Token::new(READ).unwrap());
    let app = router(engine.clone(), auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Served {
        url: format!("http://{addr}"),
        engine,
        drifted,
        clean,
    }
}

/// `GET /v1/drifts{query}` with the read token, as a page.
async fn page(c: &reqwest::Client, url: &str, query: &str) -> DriftPage {
    let r = c
        .get(format!("{url}/v1/drifts{query}"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{query}");
    r.json().await.unwrap()
}

/// The (saga, step name, kind) of each drift of a page, in its order.
fn listed(p: &DriftPage) -> Vec<(SagaId, String, DriftKind)> {
    p.drifts
        .iter()
        .map(|e| (e.saga, e.drift.step_name.clone(), e.drift.kind))
        .collect()
}

/// Every drift of the sagas `of`, payment's then order's per saga.
fn both(of: &[SagaId]) -> Vec<(SagaId, String, DriftKind)> {
    of.iter()
        .flat_map(|&s| {
            [
                (s, "payment".to_string(), DriftKind::Missing),
                (s, "order".to_string(), DriftKind::Different),
            ]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_runs_on_request_and_drifts_are_listed_a_page_of_sagas_at_a_time() {
    let Served {
        url,
        drifted,
        clean,
        ..
    } = serve().await;
    let c = reqwest::Client::new();
    let drifts = format!("{url}/v1/drifts");
    let reconcile = format!("{url}/v1/reconcile");

    assert_eq!(
        c.get(&drifts).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let before = page(&c, &url, "").await;
    assert!(before.drifts.is_empty() && before.next.is_none());

    // Running the reconciler writes drift records: the admin token only.
    let r = c.post(&reconcile).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c.post(&reconcile).bearer_auth(READ).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(page(&c, &url, "").await.drifts.is_empty(), "a 403 ran it");

    let r = c.post(&reconcile).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let ran: ReconcileSummary = r.json().await.unwrap();
    assert_eq!((ran.sagas, ran.skipped), (4, 0));
    assert_eq!(
        (ran.lookups, ran.matched),
        (8, 2),
        "the clean saga's two steps"
    );
    let mut found: Vec<_> = ran
        .drifts
        .iter()
        .map(|d| (d.saga, d.step.clone(), d.kind))
        .collect();
    found.sort();
    let mut want = both(&drifted);
    want.sort();
    assert_eq!(found, want);
    assert!(ran
        .drifts
        .iter()
        .all(|d| d.lsn.is_some() && d.expected == Expected::Present && d.definition == "checked"));
    assert!(ran.position.is_some());
    // The raw JSON names what the module docs say.
    let raw: Value = c
        .post(&reconcile)
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(raw["sagas"], 0, "caught up: nothing new to look at: {raw}");
    assert_eq!(raw["drifts"], json!([]), "{raw}");
    assert!(raw["position"]["saga"].is_string(), "{raw}");

    let all = page(&c, &url, "").await;
    assert_eq!(listed(&all), both(&drifted));
    assert_eq!(all.next, None);
    assert!(all.drifts.iter().all(|e| e.saga != clean));
    let first = &all.drifts[0];
    assert_eq!(
        (first.definition.as_str(), first.version, first.status),
        ("checked", 1, SagaStatus::Completed)
    );
    assert_eq!(first.drift.expected, Expected::Present);
    assert_eq!(first.drift.step, 0);
    assert_eq!(first.drift.handled, None);
    assert_eq!(
        first.drift.detail,
        format!("the books disagree on {}/payment/action", first.saga)
    );
    // The lsn the reconciler reported is the one listed.
    let reported = ran
        .drifts
        .iter()
        .find(|d| d.saga == first.saga && d.step == "payment")
        .unwrap();
    assert_eq!(reported.lsn, Some(first.drift.lsn));

    // Pages of sagas, each with all its drifts; `next` leads on, null on the last.
    let p1 = page(&c, &url, "?limit=2").await;
    assert_eq!(listed(&p1), both(&drifted[..2]));
    assert_eq!(p1.next, Some(drifted[1]));
    let p2 = page(&c, &url, &format!("?limit=2&after={}", drifted[1])).await;
    assert_eq!(listed(&p2), both(&drifted[2..]));
    assert_eq!(p2.next, None);
    let exact = page(&c, &url, "?limit=3").await;
    assert_eq!(listed(&exact), both(&drifted));
    assert_eq!(exact.next, None, "a full last page has nothing after it");
    let last = page(&c, &url, &format!("?after={}", drifted[2])).await;
    assert!(last.drifts.is_empty() && last.next.is_none());

    for bad in ["?limit=0", "?limit=1001", "?after=not-a-saga"] {
        let r = c
            .get(format!("{drifts}{bad}"))
            .bearer_auth(READ)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let r = c
        .get(format!("{drifts}?limit=0"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap();
    let e: ApiError = r.json().await.unwrap();
    assert_eq!(e.error, "limit must be 1 to 1000 (leave it out for 100)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drift_is_handled_once_with_the_admin_token_and_then_leaves_the_list() {
    let Served {
        url,
        engine,
        drifted,
        clean,
    } = serve().await;
    assert_eq!(engine.reconcile_now().await.unwrap().drifts.len(), 6);
    let c = reqwest::Client::new();
    let saga = drifted[0];
    let open = engine.drifts(None, 1).unwrap();
    assert_eq!(open.len(), 2);
    let (payment, order) = (open[0].drift.lsn, open[1].drift.lsn);
    assert_eq!(open[0].drift.step_name, "payment");
    let finished_at = engine.status(saga).unwrap().finished_at;
    let repair = format!("{url}/v1/sagas/{saga}/repair");
    let handle = |drift: Option<Lsn>, token: &'static str| {
        let mut body =
            json!({"action": "handle_drift", "operator": "ana", "reason": "refund booked by hand"});
        if let Some(l) = drift {
            body["drift"] = json!(l.0);
        }
        c.post(&repair).bearer_auth(token).json(&body).send()
    };

    let r = handle(Some(payment), READ).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = c
        .post(&repair)
        .json(
            &json!({"action": "handle_drift", "drift": payment.0, "operator": "a", "reason": "b"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = handle(None, ADMIN).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: ApiError = r.json().await.unwrap();
    assert!(
        e.error.contains("handle_drift needs `drift`"),
        "{}",
        e.error
    );

    // No drift at that lsn: the `started` record, one past the end.
    for lsn in [Lsn(0), Lsn(999)] {
        let r = handle(Some(lsn), ADMIN).await.unwrap();
        assert_eq!(r.status(), StatusCode::CONFLICT, "{lsn}");
        let e: ApiError = r.json().await.unwrap();
        assert_eq!(e.code.as_deref(), Some("SAGA-0012"));
        assert!(
            e.error
                .contains(&format!("no drift is recorded at lsn {lsn}")),
            "{}",
            e.error
        );
    }
    assert_eq!(engine.drifts(None, 1).unwrap(), open, "a refusal wrote");

    let r = handle(Some(payment), ADMIN).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let meta: SagaMeta = r.json().await.unwrap();
    assert_eq!((meta.status, meta.open_drifts), (SagaStatus::Completed, 1));
    assert_eq!(meta.finished_at, finished_at, "handling moved the end");

    let r = handle(Some(payment), ADMIN).await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let e: ApiError = r.json().await.unwrap();
    assert!(
        e.error
            .contains(&format!("the drift at lsn {payment} is already handled")),
        "{}",
        e.error
    );

    let left = page(&c, &url, "").await;
    let mut want = vec![(saga, "order".to_string(), DriftKind::Different)];
    want.extend(both(&drifted[1..]));
    assert_eq!(listed(&left), want);

    let r = handle(Some(order), ADMIN).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let meta: SagaMeta = r.json().await.unwrap();
    assert_eq!(meta.open_drifts, 0);
    let left = page(&c, &url, "").await;
    assert_eq!(listed(&left), both(&drifted[1..]), "the saga left the list");

    // Who and why are in the log, like any repair.
    let view: SagaView = c
        .get(format!("{url}/v1/sagas/{saga}"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let handled: Vec<Lsn> = view
        .history
        .iter()
        .filter_map(|r| match &r.event {
            Event::OperatorAction {
                action: Repair::HandleDrift { drift },
                operator,
                reason,
            } if operator == "ana" && reason == "refund booked by hand" => Some(*drift),
            _ => None,
        })
        .collect();
    assert_eq!(handled, [payment, order]);

    // A saga whose books agree has nothing to handle.
    let r = c
        .post(format!("{url}/v1/sagas/{clean}/repair"))
        .bearer_auth(ADMIN)
        .json(&json!({"action": "handle_drift", "drift": 1, "operator": "a", "reason": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
}
