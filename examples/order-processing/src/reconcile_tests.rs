//! The order saga's reconcile hooks against the fake providers, through the engine's
//! reconciler: drift injected into the providers' ledgers (a refund lost, an order made
//! outside any saga, an amount changed) is reported exactly, recorded on the sagas and
//! counted in the metric; a provider that cannot be asked is `unknown`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow::machine::{DriftKind, Expected};
use sagaflow::{
    Engine, EngineOptions, Finished, IdempotencyKey, Phase, Reconcile, SagaId, SagaOutcome, Verdict,
};
use sagaflow_steps::oauth::{ClientCredentials, TokenSource};
use sagaflow_steps::secrets::Secret;
use serde_json::json;

use crate::providers::{self, Addresses, Entry, Faults, ProviderSecrets, Providers};
use crate::reconcile::{reconcile_options, Charges, Lookups, Orders, Reservations, Shipments};
use crate::saga::{definition, Integrations, OrderRequest};
use crate::saga_tests::settle_and_wait;

async fn providers(dir: &std::path::Path, faults: Faults) -> Providers {
    providers::start(
        dir,
        faults,
        1000,
        Arc::new(Mutex::new(Vec::new())),
        ProviderSecrets::generate().unwrap(),
    )
    .await
    .unwrap()
}

fn order(customer: &str, sku: &str, amount_cents: u64) -> OrderRequest {
    OrderRequest {
        customer: customer.into(),
        sku: sku.into(),
        quantity: 2,
        amount_cents,
    }
}

fn key(saga: SagaId, step: &str, phase: Phase) -> String {
    IdempotencyKey::derive(saga, step, phase)
        .as_str()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_reports_exactly_the_drift_injected_into_the_ledgers() {
    let dir = tempfile::tempdir().unwrap();
    let p = providers(&dir.path().join("providers"), Faults::default()).await;
    let i = Integrations::new(&p.addresses, &p.secrets.client_secret);
    let engine = Engine::builder()
        .seed(17)
        .register(definition(&i).unwrap())
        .options(
            EngineOptions::default().with_reconciler(
                reconcile_options(&i)
                    .window(Duration::ZERO, Duration::from_secs(3600))
                    .every(Duration::from_secs(3600)),
            ),
        )
        .open(dir.path().join("data"))
        .await
        .unwrap();

    // Two orders complete; three are compensated: a customer the orders provider
    // refuses after the charge (charged, reserved, both undone), a declined card, a
    // sold-out item.
    let orders = [
        order("ada", "widget", 4_200),
        order("bob", "widget", 3_100),
        order("customer-13", "widget", 2_500),
        order("cy", "widget", 4_213),
        order("dee", "sold-out", 1_800),
    ];
    let mut ids = Vec::new();
    for o in &orders {
        ids.push(engine.start("order", o, None).await.unwrap());
    }
    let [changed, clean, refund_lost, ordered_outside, sold_out] = ids[..] else {
        unreachable!()
    };
    for &id in &ids[..2] {
        let outcome = settle_and_wait(&p, &engine, id).await;
        assert!(
            matches!(outcome, SagaOutcome::Completed { .. }),
            "{outcome:?}"
        );
    }
    for &id in &ids[2..] {
        let outcome = settle_and_wait(&p, &engine, id).await;
        assert!(
            matches!(outcome, SagaOutcome::Compensated { .. }),
            "{outcome:?}"
        );
    }
    let _ = (clean, sold_out);

    // Exactly three drifts, by hand, in the providers' ledgers.
    // 1. The refund of the refused customer's charge is lost.
    let refund = p
        .payments
        .remove(&key(refund_lost, "charge", Phase::Compensation))
        .unwrap();
    assert_eq!(refund.len(), 1, "{refund:?}");
    assert_eq!(refund[0].answer["refunded"], true);
    // 2. An order is made for the declined order's id, outside any saga.
    p.orders
        .record(Entry {
            kind: "order".into(),
            key: "backoffice/manual-1".into(),
            about: Some(ordered_outside.to_string()),
            answer: json!({ "order_number": "on_manual1" }),
        })
        .unwrap();
    // 3. The amount of a completed order's charge is changed.
    let amended = p
        .payments
        .amend(&key(changed, "charge", Phase::Action), |c| {
            c["amount_cents"] = json!(4_100)
        })
        .unwrap();
    assert!(amended);

    let report = engine.reconcile_now().await.unwrap();
    let found: BTreeSet<(SagaId, String, DriftKind)> = report
        .drifts
        .iter()
        .map(|d| (d.saga, d.step.clone(), d.kind))
        .collect();
    let expected: BTreeSet<(SagaId, String, DriftKind)> = [
        (refund_lost, "charge".to_string(), DriftKind::Unexpected),
        (
            ordered_outside,
            "create_order".to_string(),
            DriftKind::Unexpected,
        ),
        (changed, "charge".to_string(), DriftKind::Different),
    ]
    .into();
    assert_eq!(found, expected, "{report:#?}");
    assert_eq!(report.drifts.len(), 3, "{report:#?}");
    // Every finished saga was looked at, each step with a hook once: four each (the
    // await step `settle` has none), the provider answering every time.
    assert_eq!(report.sagas, 5, "{report:#?}");
    assert_eq!(report.skipped, 0, "{report:#?}");
    assert_eq!(report.lookups, 20, "{report:#?}");
    assert_eq!(report.matched, 17, "{report:#?}");
    // What the log said, and what the hook said it found.
    for d in &report.drifts {
        assert!(d.lsn.is_some(), "recorded: {d:?}");
        match (d.step.as_str(), d.kind) {
            ("charge", DriftKind::Unexpected) => {
                assert_eq!(d.expected, Expected::Undone);
                assert!(d.detail.contains("in force"), "{}", d.detail);
            }
            ("create_order", _) => {
                assert_eq!(d.expected, Expected::Absent);
                assert!(d.detail.contains("backoffice/manual-1"), "{}", d.detail);
            }
            _ => {
                assert_eq!(d.expected, Expected::Present);
                assert!(d.detail.contains("amount_cents is 4100"), "{}", d.detail);
                assert!(d.detail.contains("4200"), "{}", d.detail);
            }
        }
    }

    // Recorded on the sagas: the drift list of the store, and each saga's state.
    let listed: BTreeSet<(SagaId, String, DriftKind)> = engine
        .drifts(None, 100)
        .unwrap()
        .into_iter()
        .map(|e| {
            assert!(e.drift.handled.is_none());
            (e.saga, e.drift.step_name, e.drift.kind)
        })
        .collect();
    assert_eq!(listed, expected);
    for id in &ids {
        let on_saga: BTreeSet<(SagaId, String, DriftKind)> = engine
            .state(*id)
            .unwrap()
            .drifts
            .into_iter()
            .map(|d| (*id, d.step_name, d.kind))
            .collect();
        let want: BTreeSet<_> = expected.iter().filter(|d| d.0 == *id).cloned().collect();
        assert_eq!(on_saga, want, "saga {id}");
    }

    // Counted in the metric, by definition, step and kind.
    let metrics = engine.metrics_text();
    for (step, kind) in [
        ("charge", "unexpected"),
        ("create_order", "unexpected"),
        ("charge", "different"),
    ] {
        let line = format!(
            "sagaflow_reconcile_drift_total{{definition=\"order\",step=\"{step}\",kind=\"{kind}\"}} 1"
        );
        assert!(metrics.contains(&line), "no `{line}` in:\n{metrics}");
    }
    let drift_lines = metrics
        .lines()
        .filter(|l| l.starts_with("sagaflow_reconcile_drift_total{"))
        .count();
    assert_eq!(drift_lines, 3, "{metrics}");

    // The reconciler's place is kept: a second pass has nothing new to look at.
    let again = engine.reconcile_now().await.unwrap();
    assert_eq!(again.sagas, 0, "{again:#?}");
    assert!(again.drifts.is_empty(), "{again:#?}");
    engine.shutdown().await.unwrap();
}

/// Every step the order saga has a hook for.
fn hooks(l: &Lookups) -> Vec<(&'static str, Box<dyn Reconcile>)> {
    vec![
        ("reserve", Box::new(Reservations(l.inventory.clone()))),
        ("charge", Box::new(Charges(l.payments.clone()))),
        ("create_order", Box::new(Orders(l.orders.clone()))),
        ("book_shipping", Box::new(Shipments(l.orders.clone()))),
    ]
}

fn saga() -> SagaId {
    "0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071".parse().unwrap()
}

#[tokio::test]
async fn a_provider_that_cannot_be_reached_is_unknown() {
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let a = Addresses {
        payments: closed.clone(),
        inventory: closed.clone(),
        orders: closed.clone(),
    };
    let tokens = Arc::new(TokenSource::new(ClientCredentials::new(
        format!("{closed}/oauth/token"),
        "shop",
        Secret::new("cs_test"),
    )));
    for (step, hook) in hooks(&Lookups::new(&a, tokens)) {
        for expected in [Expected::Present, Expected::Undone, Expected::Absent] {
            let verdict = hook
                .reconcile(&Finished::for_test(saga(), step, expected, None))
                .await;
            assert_eq!(
                verdict.kind(),
                Some(DriftKind::Unknown),
                "{step}: {verdict:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_answers_errors_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let p = providers(
        dir.path(),
        Faults {
            fail_rate: 1.0,
            ..Faults::default()
        },
    )
    .await;
    let i = Integrations::new(&p.addresses, &p.secrets.client_secret);
    for (step, hook) in hooks(&i.lookups) {
        let verdict = hook
            .reconcile(&Finished::for_test(saga(), step, Expected::Absent, None))
            .await;
        let Verdict::Drift { kind, detail } = verdict else {
            panic!("{step}: matches, from a provider that fails every call");
        };
        assert_eq!(kind, DriftKind::Unknown, "{step}: {detail}");
        assert!(detail.contains("could not be asked"), "{step}: {detail}");
    }
}

/// What the hooks find that the engine cannot tell from its log alone: an effect
/// applied twice under one key, an undo done twice, an order for the order id beside
/// the saga's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_applied_or_undone_twice_are_different() {
    let dir = tempfile::tempdir().unwrap();
    let p = providers(dir.path(), Faults::default()).await;
    let i = Integrations::new(&p.addresses, &p.secrets.client_secret);
    let id = saga();
    let entry = |kind: &str, key: String, about: Option<String>, answer| Entry {
        kind: kind.into(),
        key,
        about,
        answer,
    };
    let charge_key = key(id, "charge", Phase::Action);
    let charge = json!({ "charge_id": "ch_1", "amount_cents": 500 });
    // A charge the log says stands, under its key twice.
    for _ in 0..2 {
        p.payments
            .record(entry("charge", charge_key.clone(), None, charge.clone()))
            .unwrap();
    }
    let f = Finished::for_test(id, "charge", Expected::Present, Some(charge.clone()));
    let v = Charges(i.lookups.payments.clone()).reconcile(&f).await;
    assert_eq!(v.kind(), Some(DriftKind::Different), "{v:?}");
    // A reservation the log says was released, released by two refunds' worth.
    let reserve_key = key(id, "reserve", Phase::Action);
    p.inventory
        .record(entry(
            "reserve",
            reserve_key.clone(),
            None,
            json!({ "reservation_id": "rs_1", "quantity": 2 }),
        ))
        .unwrap();
    for n in 0..2 {
        p.inventory
            .record(entry(
                "release",
                format!("elsewhere/{n}/compensation"),
                Some(reserve_key.clone()),
                json!({ "released": true }),
            ))
            .unwrap();
    }
    let f = Finished::for_test(id, "reserve", Expected::Undone, None);
    let v = Reservations(i.lookups.inventory.clone())
        .reconcile(&f)
        .await;
    assert_eq!(v.kind(), Some(DriftKind::Different), "{v:?}");
    // The saga's order, and another for its order id made outside it.
    let order = json!({ "order_number": "on_1" });
    p.orders
        .record(entry(
            "order",
            key(id, "create_order", Phase::Action),
            Some(id.to_string()),
            order.clone(),
        ))
        .unwrap();
    let f = Finished::for_test(id, "create_order", Expected::Present, Some(order));
    let hook = Orders(i.lookups.orders.clone());
    assert_eq!(hook.reconcile(&f).await, Verdict::Matches);
    p.orders
        .record(entry(
            "order",
            "backoffice/2".into(),
            Some(id.to_string()),
            json!({ "order_number": "on_2" }),
        ))
        .unwrap();
    let v = hook.reconcile(&f).await;
    assert_eq!(v.kind(), Some(DriftKind::Different), "{v:?}");
}
