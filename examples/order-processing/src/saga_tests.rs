//! The order saga in-process, on a crashable in-memory store, against the fake
//! providers: one order completes, one is compensated.

use std::sync::{Arc, Mutex};

use sagaflow::store::MemLog;
use sagaflow::{Engine, SagaOutcome};

use crate::providers::{self, Faults};
use crate::saga::{definition, Integrations, OrderRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_completes_and_a_sold_out_one_is_compensated() {
    let dir = tempfile::tempdir().unwrap();
    let p = providers::start(
        dir.path(),
        Faults::default(),
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
    let ok = OrderRequest {
        customer: "ada".into(),
        sku: "widget".into(),
        quantity: 2,
        amount_cents: 4_200,
    };
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
    assert_eq!(
        p.payments
            .entries()
            .iter()
            .filter(|e| e.kind == "charge")
            .count(),
        1
    );
    assert_eq!(
        p.orders
            .entries()
            .iter()
            .filter(|e| e.kind == "order")
            .count(),
        1
    );
    engine.shutdown().await.unwrap();
}
