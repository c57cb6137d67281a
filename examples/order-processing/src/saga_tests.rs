//! The order saga in-process, on a crashable in-memory store, against the fake
//! providers: one order completes, a sold-out one and a declined one are compensated
//! (whatever the other branch of the group did is undone), and the reservation and the
//! charge run at the same time; the `settle` step takes the charge's settlement, one
//! that came first included, and a settlement that never comes refunds the charge.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow::machine::Event;
use sagaflow::store::MemLog;
use sagaflow::{Engine, SagaId, SagaOutcome};
use serde_json::json;

use crate::providers::{self, Faults, Ledger, Providers};
use crate::saga::{
    definition_with, settlement_key, Integrations, OrderRequest, SETTLEMENT_DEADLINE,
};

async fn world(faults: Faults) -> (tempfile::TempDir, Providers, Engine) {
    world_waiting(faults, SETTLEMENT_DEADLINE).await
}

async fn world_waiting(
    faults: Faults,
    settlement_within: Duration,
) -> (tempfile::TempDir, Providers, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let p = providers::start(
        dir.path(),
        faults,
        1000,
        Arc::new(Mutex::new(Vec::new())),
        providers::ProviderSecrets::generate().unwrap(),
    )
    .await
    .unwrap();
    let integrations = Integrations::new(&p.addresses, &p.secrets.client_secret);
    let engine = Engine::builder()
        .seed(3)
        .register(definition_with(&integrations, settlement_within).unwrap())
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    (dir, p, engine)
}

/// Delivers every settlement payments has in its outbox, as the service's webhook does
/// (no HTTP here): to the charge's key, with the event id as the delivery id.
async fn deliver_settlements(p: &Providers, engine: &Engine) {
    for e in p.settlements.entries() {
        if e.kind == "settlement" {
            let key = settlement_key(e.answer["charge_id"].as_str().unwrap());
            engine
                .deliver(&key, &e.key, e.answer.clone())
                .await
                .unwrap();
        }
    }
}

/// Waits for saga `id` to end, delivering settlements meanwhile.
pub(crate) async fn settle_and_wait(p: &Providers, engine: &Engine, id: SagaId) -> SagaOutcome {
    loop {
        deliver_settlements(p, engine).await;
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(50), engine.wait(id)).await {
            return r.unwrap();
        }
    }
}

/// The delivery ids saga `id` took (its `event_received` records).
fn received(engine: &Engine, id: SagaId) -> Vec<String> {
    engine
        .history(id)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            Event::EventReceived { delivery, .. } => Some(delivery),
            _ => None,
        })
        .collect()
}

fn order() -> OrderRequest {
    OrderRequest {
        customer: "ada".into(),
        sku: "widget".into(),
        quantity: 2,
        amount_cents: 4_200,
    }
}

/// The entries of `kind` in `ledger` made for saga `id` (keys are `saga/step/phase`).
fn of(ledger: &Ledger, id: SagaId, kind: &str) -> Vec<providers::Entry> {
    let prefix = format!("{id}/");
    ledger
        .entries()
        .into_iter()
        .filter(|e| e.kind == kind && e.key.starts_with(&prefix))
        .collect()
}

/// How many of `entries` undid something (a release or refund of what never happened
/// answers `false`).
fn undid(entries: &[providers::Entry], field: &str) -> usize {
    entries
        .iter()
        .filter(|e| e.answer[field] == serde_json::Value::Bool(true))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_completes_and_a_sold_out_one_is_compensated() {
    let (_dir, p, engine) = world(Faults::default()).await;
    let ok = order();
    let sold_out = OrderRequest {
        sku: "sold-out".into(),
        ..ok.clone()
    };
    let a = engine.start("order", &ok, None).await.unwrap();
    let b = engine.start("order", &sold_out, None).await.unwrap();
    let SagaOutcome::Completed { outputs } = settle_and_wait(&p, &engine, a).await else {
        panic!("expected the order to complete");
    };
    // It took its charge's settlement, once: the webhook's body is the step's output.
    let charge_id = outputs["charge"]["charge_id"].as_str().unwrap();
    assert_eq!(outputs["settle"]["charge_id"], charge_id);
    assert_eq!(
        received(&engine, a),
        [outputs["settle"]["id"].as_str().unwrap()]
    );
    let SagaOutcome::Compensated { reason } = settle_and_wait(&p, &engine, b).await else {
        panic!("expected the sold-out order to be compensated");
    };
    assert!(reason.contains("out of stock"), "{reason}");
    // The completed order: reserved, charged once, ordered; nothing undone.
    assert_eq!(of(&p.inventory, a, "reserve").len(), 1);
    assert_eq!(of(&p.payments, a, "charge").len(), 1);
    assert_eq!(of(&p.orders, a, "order").len(), 1);
    assert_eq!(undid(&of(&p.payments, a, "refund"), "refunded"), 0);
    // The sold-out one: no reservation, and no order. Its charge ran beside the
    // reservation, so it may have been taken; if it was, it was refunded.
    assert!(of(&p.inventory, b, "reserve").is_empty());
    assert!(of(&p.orders, b, "order").is_empty());
    let charged = of(&p.payments, b, "charge").len();
    assert_eq!(undid(&of(&p.payments, b, "refund"), "refunded"), charged);
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_releases_the_stock_reserved_beside_it() {
    let (_dir, p, engine) = world(Faults::default()).await;
    let declined = OrderRequest {
        amount_cents: 4_213,
        ..order()
    };
    let id = engine.start("order", &declined, None).await.unwrap();
    let SagaOutcome::Compensated { reason } = settle_and_wait(&p, &engine, id).await else {
        panic!("expected the declined order to be compensated");
    };
    assert!(reason.contains("card declined"), "{reason}");
    assert!(of(&p.payments, id, "charge").is_empty());
    assert!(of(&p.orders, id, "order").is_empty());
    let reserved = of(&p.inventory, id, "reserve").len();
    assert_eq!(
        undid(&of(&p.inventory, id, "release"), "released"),
        reserved
    );
    engine.shutdown().await.unwrap();
}

/// With every provider call taking 200 ms, the reservation and the charge are both
/// started before either has answered, and the order is created once both have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reservation_and_the_charge_run_at_the_same_time() {
    let (_dir, p, engine) = world(Faults {
        latency_ms: 200,
        ..Faults::default()
    })
    .await;
    let id = engine.start("order", &order(), None).await.unwrap();
    assert!(matches!(
        settle_and_wait(&p, &engine, id).await,
        SagaOutcome::Completed { .. }
    ));
    let history = engine.history(id).unwrap();
    let Some(Event::Started { steps, .. }) = history.first().map(|r| &r.event) else {
        panic!("no start record");
    };
    let index = |name: &str| steps.iter().position(|s| s == name).unwrap() as u32;
    let (reserve, charge, create) = (index("reserve"), index("charge"), index("create_order"));
    let at = |f: &dyn Fn(&Event) -> bool| history.iter().position(|r| f(&r.event)).unwrap();
    let started =
        |s: u32| at(&|e| matches!(e, Event::StepAttemptStarted { step, .. } if *step == s));
    let done = |s: u32| at(&|e| matches!(e, Event::StepSucceeded { step, .. } if *step == s));
    let first_done = done(reserve).min(done(charge));
    assert!(started(reserve) < first_done, "{history:?}");
    assert!(started(charge) < first_done, "{history:?}");
    assert!(
        started(create) > done(reserve).max(done(charge)),
        "{history:?}"
    );
    assert_eq!(of(&p.orders, id, "order").len(), 1);
    engine.shutdown().await.unwrap();
}

/// A settlement delivered before the saga waits for it (here before the charge has even
/// answered) is kept in the inbox and taken when the `settle` step begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_that_comes_first_is_taken_when_the_saga_gets_there() {
    let (_dir, _p, engine) = world(Faults {
        latency_ms: 300,
        ..Faults::default()
    })
    .await;
    let id = engine.start("order", &order(), None).await.unwrap();
    // The charge id payments will answer: `ch_` and the charge's idempotency key.
    let key: String = format!("{id}/charge/action")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(40)
        .collect();
    let early = json!({"id": "evt_early", "type": "charge.settled", "charge_id": format!("ch_{key}"), "settlement_id": "st_early"});
    engine
        .deliver(
            &settlement_key(&format!("ch_{key}")),
            "evt_early",
            early.clone(),
        )
        .await
        .unwrap();
    let SagaOutcome::Completed { outputs } = engine.wait(id).await.unwrap() else {
        panic!("expected the order to complete");
    };
    assert_eq!(outputs["settle"], early);
    assert_eq!(received(&engine, id), ["evt_early"]);
    engine.shutdown().await.unwrap();
}

/// No settlement within the deadline: the `settle` step fails rejected (the wait took no
/// effect), and the steps before it are undone: the charge refunded, the stock released;
/// no order is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_that_never_comes_refunds_the_charge() {
    let (_dir, p, engine) = world_waiting(Faults::default(), Duration::from_millis(500)).await;
    let id = engine.start("order", &order(), None).await.unwrap();
    let SagaOutcome::Compensated { reason } = engine.wait(id).await.unwrap() else {
        panic!("expected the order to be compensated");
    };
    assert!(reason.contains("settle"), "{reason}");
    assert!(reason.contains("no event for `settlement/ch_"), "{reason}");
    assert_eq!(of(&p.payments, id, "charge").len(), 1);
    assert_eq!(undid(&of(&p.payments, id, "refund"), "refunded"), 1);
    assert_eq!(of(&p.inventory, id, "reserve").len(), 1);
    assert_eq!(undid(&of(&p.inventory, id, "release"), "released"), 1);
    assert!(of(&p.orders, id, "order").is_empty());
    assert!(received(&engine, id).is_empty());
    // The settlement payments sent meanwhile (to nobody: no webhook address here) is
    // still in its outbox, never acknowledged.
    assert_eq!(p.settlements.entries().len(), 1);
    engine.shutdown().await.unwrap();
}
