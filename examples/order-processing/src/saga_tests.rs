//! The order saga in-process, on a crashable in-memory store, against the fake
//! providers: one order completes, a sold-out one and a declined one are compensated
//! (whatever the other branch of the group did is undone), and the reservation and the
//! charge run at the same time.

use std::sync::{Arc, Mutex};

use sagaflow::machine::Event;
use sagaflow::store::MemLog;
use sagaflow::{Engine, SagaId, SagaOutcome};

use crate::providers::{self, Faults, Ledger, Providers};
use crate::saga::{definition, Integrations, OrderRequest};

async fn world(faults: Faults) -> (tempfile::TempDir, Providers, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let p = providers::start(
        dir.path(),
        faults,
        1000,
        Arc::new(Mutex::new(None)),
        providers::ProviderSecrets::generate().unwrap(),
    )
    .await
    .unwrap();
    let engine = Engine::builder()
        .seed(3)
        .register(definition(&Integrations::new(&p.addresses, &p.secrets.client_secret)).unwrap())
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    (dir, p, engine)
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
    assert!(matches!(
        engine.wait(a).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    let SagaOutcome::Compensated { reason } = engine.wait(b).await.unwrap() else {
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
    let SagaOutcome::Compensated { reason } = engine.wait(id).await.unwrap() else {
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
        engine.wait(id).await.unwrap(),
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
