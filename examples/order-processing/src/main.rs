//! Order processing with Sagaflow: charge the card, reserve the stock, create the order.
//!
//! This first version runs in-process against fake providers that honour idempotency
//! keys; the HTTP service with real provider processes, kill -9 and reconciliation is
//! the next step for this example.
//!
//! Run it with:
//!
//! ```text
//! cargo run -p example-order-processing -- 20
//! ```
//! (the argument is the number of orders; every fifth order is out of stock and is
//! rolled back).

use std::sync::Arc;

use example_order_processing::{definition, Order, Providers};
use sagaflow::{Engine, SagaOutcome, StartKey};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let orders: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20);
    let dir = tempfile::tempdir()?;
    let providers = Arc::new(Providers::default());
    let engine = Engine::builder()
        .register(definition(providers.clone())?)
        .open(dir.path())
        .await?;
    let mut ids = Vec::new();
    for n in 0..orders {
        let order = Order {
            order_id: format!("order-{n}"),
            sku: if n % 5 == 4 {
                "sold-out".into()
            } else {
                "widget".into()
            },
            quantity: 1 + n % 3,
            cents: 1_000 + u64::from(n),
        };
        let key = StartKey::new(order.order_id.clone())?;
        ids.push(engine.start("order", &order, Some(key)).await?);
    }
    let (mut completed, mut compensated, mut parked) = (0, 0, 0);
    for id in ids {
        match engine.wait(id).await? {
            SagaOutcome::Completed { .. } => completed += 1,
            SagaOutcome::Compensated { .. } => compensated += 1,
            _ => parked += 1,
        }
    }
    let ledger = providers.reconcile();
    println!("completed {completed}, compensated {compensated}, parked {parked}");
    println!("{ledger:?}");
    engine.shutdown().await?;
    Ok(())
}
