//! The order saga and its fake providers, shared by the binary and its tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;

use async_trait::async_trait;
use sagaflow::{SagaDefinition, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

/// An order as the shop submits it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Order {
    /// The shop's order id.
    pub order_id: String,
    /// What is bought.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Total price.
    pub cents: u64,
}

/// In-memory providers that apply each idempotency key at most once.
#[derive(Debug, Default)]
pub struct Providers {
    state: Mutex<Books>,
}

#[derive(Debug, Default)]
struct Books {
    charges: HashMap<String, u64>,
    refunds: HashMap<String, u64>,
    reservations: HashMap<String, u32>,
    releases: HashMap<String, u32>,
    orders: HashMap<String, String>,
}

/// What the providers' books say, for reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciliation {
    /// Charges taken.
    pub charges: usize,
    /// Charges refunded.
    pub refunds: usize,
    /// Reservations made.
    pub reservations: usize,
    /// Reservations released.
    pub releases: usize,
    /// Orders created.
    pub orders: usize,
}

impl Providers {
    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts what the providers hold.
    pub fn reconcile(&self) -> Reconciliation {
        let b = self.books();
        Reconciliation {
            charges: b.charges.len(),
            refunds: b.refunds.len(),
            reservations: b.reservations.len(),
            releases: b.releases.len(),
            orders: b.orders.len(),
        }
    }
}

struct Charge(Arc<Providers>);
struct Reserve(Arc<Providers>);
struct CreateOrder(Arc<Providers>);

#[async_trait]
impl Step for Charge {
    type Input = Order;
    type Output = String;

    async fn execute(&self, ctx: &StepContext, order: Order) -> Result<String, StepError> {
        let key = ctx.idempotency_key().to_string();
        self.0
            .books()
            .charges
            .entry(key.clone())
            .or_insert(order.cents);
        Ok(format!("ch_{key}"))
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        order: Order,
        _: Option<String>,
    ) -> Result<(), StepError> {
        // Refund what was charged under the action's key, if anything was.
        let charged = sagaflow::IdempotencyKey::derive(
            ctx.saga_id(),
            ctx.step_name(),
            sagaflow::Phase::Action,
        );
        let mut b = self.0.books();
        if b.charges.contains_key(charged.as_str()) {
            b.refunds.entry(charged.to_string()).or_insert(order.cents);
        }
        Ok(())
    }
}

#[async_trait]
impl Step for Reserve {
    type Input = Order;
    type Output = ();

    async fn execute(&self, ctx: &StepContext, order: Order) -> Result<(), StepError> {
        if order.sku == "sold-out" {
            return Err(StepError::permanent(format!(
                "{} is out of stock",
                order.sku
            )));
        }
        self.0
            .books()
            .reservations
            .entry(ctx.idempotency_key().to_string())
            .or_insert(order.quantity);
        Ok(())
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        order: Order,
        _: Option<()>,
    ) -> Result<(), StepError> {
        let reserved = sagaflow::IdempotencyKey::derive(
            ctx.saga_id(),
            ctx.step_name(),
            sagaflow::Phase::Action,
        );
        let mut b = self.0.books();
        if b.reservations.contains_key(reserved.as_str()) {
            b.releases
                .entry(reserved.to_string())
                .or_insert(order.quantity);
        }
        Ok(())
    }
}

#[async_trait]
impl Step for CreateOrder {
    type Input = Order;
    type Output = String;

    async fn execute(&self, ctx: &StepContext, order: Order) -> Result<String, StepError> {
        let charge: Option<String> = ctx.output_of("charge")?;
        let charge = charge.ok_or_else(|| StepError::permanent("no charge recorded"))?;
        self.0
            .books()
            .orders
            .entry(order.order_id.clone())
            .or_insert(charge);
        Ok(order.order_id)
    }
}

/// The order saga: charge → reserve → create the order (the pivot: once the order
/// exists, the saga only goes forward).
///
/// # Errors
///
/// Never in practice: the definition is valid.
pub fn definition(
    providers: Arc<Providers>,
) -> Result<SagaDefinition, sagaflow::definition::Error> {
    SagaDefinition::builder("order", 1)
        .step("charge", Charge(providers.clone()))
        .step("reserve", Reserve(providers.clone()))
        .pivot("create_order", CreateOrder(providers))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagaflow::store::MemLog;
    use sagaflow::{Engine, SagaOutcome};

    #[tokio::test]
    async fn an_order_completes_and_a_sold_out_one_is_refunded() {
        let providers = Arc::new(Providers::default());
        let engine = Engine::builder()
            .seed(1)
            .register(definition(providers.clone()).unwrap())
            .open_with(Arc::new(MemLog::new()))
            .await
            .unwrap();
        let ok = Order {
            order_id: "o1".into(),
            sku: "widget".into(),
            quantity: 2,
            cents: 500,
        };
        let sold_out = Order {
            order_id: "o2".into(),
            sku: "sold-out".into(),
            quantity: 1,
            cents: 700,
        };
        let a = engine.start("order", &ok, None).await.unwrap();
        let b = engine.start("order", &sold_out, None).await.unwrap();
        assert!(matches!(
            engine.wait(a).await.unwrap(),
            SagaOutcome::Completed { .. }
        ));
        assert!(matches!(
            engine.wait(b).await.unwrap(),
            SagaOutcome::Compensated { .. }
        ));
        assert_eq!(
            providers.reconcile(),
            Reconciliation {
                charges: 2,
                refunds: 1,
                reservations: 1,
                releases: 0,
                orders: 1
            }
        );
        engine.shutdown().await.unwrap();
    }
}
