//! The order saga: reserve the stock and charge the card at once (a parallel group of
//! two branches, each with its own compensation: release, refund), then wait for the
//! payment provider's settlement of the charge (an await step, `settle`: its signed
//! webhook, delivered to the engine by the service's `POST /webhooks/payments`), then
//! create the order (the pivot, which needs the answers), then book shipping. Every call goes through the
//! steps toolkit: per-call timeouts, idempotency keys, inventory's rate limit, payments'
//! breaker and OAuth tokens. Each step but `settle` has a reconcile hook
//! ([`crate::reconcile`]): once the saga has finished, the engine's reconciler can ask
//! the provider whether it holds what the log says.
//!
//! The reservation and the charge do not depend on each other (neither reads the other's
//! answer), so the saga waits for the slower of the two instead of their sum. The price:
//! when one of them fails for good the other may already have taken effect, so a sold-out
//! order can be charged and refunded, and a declined card can leave a reservation to
//! release; in a saga that ran them one after the other the second call was never made.
//! (A real shop would put a hold on the card here and capture it after the order exists;
//! the fake payments provider only takes charges.)

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sagaflow::{
    Await, Compensate, OnTimeout, RetryPolicy, SagaDefinition, Step, StepContext, StepError,
};
use sagaflow_steps::circuit_breaker::{BreakerConfig, CircuitBreaker};
use sagaflow_steps::http::Integration;
use sagaflow_steps::oauth::{ClientCredentials, TokenSource};
use sagaflow_steps::rate_limit::RateLimiter;
use sagaflow_steps::secrets::Secret;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::providers::Addresses;
use crate::reconcile::{Charges, Lookups, Orders, Reservations, Shipments};

/// An order as a client posts it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    /// Who orders.
    pub customer: String,
    /// What.
    pub sku: String,
    /// How many (1 to 100).
    pub quantity: u32,
    /// Total price in cents (more than 0).
    pub amount_cents: u64,
}

impl OrderRequest {
    /// What is wrong with it, if anything.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.customer.trim().is_empty() || self.customer.len() > 200 {
            p.push("customer must have 1 to 200 characters".to_string());
        }
        if self.sku.trim().is_empty() || self.sku.len() > 64 {
            p.push("sku must have 1 to 64 characters".to_string());
        }
        if !(1..=100).contains(&self.quantity) {
            p.push("quantity must be 1 to 100".to_string());
        }
        if self.amount_cents == 0 || self.amount_cents > 10_000_000 {
            p.push("amount_cents must be 1 to 10000000".to_string());
        }
        p
    }
}

/// The integrations the saga calls.
#[derive(Debug, Clone)]
pub struct Integrations {
    /// Payments: OAuth tokens and a circuit breaker.
    pub payments: Arc<Integration>,
    /// Inventory: a rate limit below the provider's.
    pub inventory: Arc<Integration>,
    /// Orders and shipping.
    pub orders: Arc<Integration>,
    /// The limiter inventory's calls wait on; the reconciler's inventory lookups are
    /// paced by it too ([`crate::reconcile::reconcile_options`]).
    pub inventory_limiter: Arc<RateLimiter>,
    /// The clients the reconcile hooks ask the providers with.
    pub lookups: Lookups,
}

impl Integrations {
    /// Integrations for the providers at `a`, authenticating to payments with
    /// `client_secret`.
    pub fn new(a: &Addresses, client_secret: &Secret) -> Self {
        let timeout = Duration::from_secs(3);
        let tokens = Arc::new(TokenSource::new(
            ClientCredentials::new(
                format!("{}/oauth/token", a.payments),
                "shop",
                client_secret.clone(),
            )
            .with_margin(Duration::from_secs(1)),
        ));
        let breaker = Arc::new(CircuitBreaker::new(
            "payments",
            BreakerConfig::default()
                .with_failure_rate(0.8)
                .with_min_calls(20)
                .with_open_for(Duration::from_secs(2)),
        ));
        let limiter = Arc::new(
            RateLimiter::new("inventory")
                .per_second(150, 20)
                .max_concurrent(32),
        );
        Integrations {
            payments: Arc::new(
                Integration::new("payments", &a.payments)
                    .with_timeout(timeout)
                    .with_tokens(tokens.clone())
                    .with_breaker(breaker),
            ),
            inventory: Arc::new(
                Integration::new("inventory", &a.inventory)
                    .with_timeout(timeout)
                    .with_limiter(limiter.clone()),
            ),
            orders: Arc::new(Integration::new("orders", &a.orders).with_timeout(timeout)),
            inventory_limiter: limiter,
            lookups: Lookups::new(a, tokens),
        }
    }
}

struct Reserve(Arc<Integration>);
struct Charge(Arc<Integration>);
struct CreateOrder(Arc<Integration>);
struct BookShipping(Arc<Integration>);

#[async_trait]
impl Step for Reserve {
    type Input = OrderRequest;
    type Output = Value;

    async fn execute(&self, ctx: &StepContext, o: OrderRequest) -> Result<Value, StepError> {
        self.0
            .post_json(
                ctx,
                "/reservations",
                &json!({ "sku": o.sku, "quantity": o.quantity }),
            )
            .await
    }
}

#[async_trait]
impl Compensate for Reserve {
    async fn compensate(
        &self,
        ctx: &StepContext,
        _: OrderRequest,
        _: Option<Value>,
    ) -> Result<(), StepError> {
        // Release by the reservation's own key: a no-op if it never happened.
        let body = json!({ "reservation_key": ctx.action_key() });
        self.0
            .post_json::<Value>(ctx, "/releases", &body)
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl Step for Charge {
    type Input = OrderRequest;
    type Output = Value;

    async fn execute(&self, ctx: &StepContext, o: OrderRequest) -> Result<Value, StepError> {
        self.0
            .post_json(
                ctx,
                "/charges",
                &json!({ "amount_cents": o.amount_cents, "customer": o.customer }),
            )
            .await
    }
}

#[async_trait]
impl Compensate for Charge {
    async fn compensate(
        &self,
        ctx: &StepContext,
        _: OrderRequest,
        _: Option<Value>,
    ) -> Result<(), StepError> {
        // Refund by the charge's key: a no-op if the charge never happened.
        let body = json!({ "charge_key": ctx.action_key() });
        self.0
            .post_json::<Value>(ctx, "/refunds", &body)
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl Step for CreateOrder {
    type Input = OrderRequest;
    type Output = Value;

    async fn execute(&self, ctx: &StepContext, o: OrderRequest) -> Result<Value, StepError> {
        let charge: Value = ctx.output_of("charge")?.unwrap_or(Value::Null);
        let reservation: Value = ctx.output_of("reserve")?.unwrap_or(Value::Null);
        let settlement: Value = ctx.output_of("settle")?.unwrap_or(Value::Null);
        self.0
            .post_json(
                ctx,
                "/orders",
                &json!({
                    // The business order id: the shop's order id is its saga's id.
                    "order_id": ctx.saga_id().to_string(),
                    "customer": o.customer,
                    "charge_id": charge["charge_id"],
                    "reservation_id": reservation["reservation_id"],
                    "settlement_id": settlement["settlement_id"],
                }),
            )
            .await
    }
}

#[async_trait]
impl Step for BookShipping {
    type Input = OrderRequest;
    type Output = Value;

    async fn execute(&self, ctx: &StepContext, o: OrderRequest) -> Result<Value, StepError> {
        let order: Value = ctx.output_of("create_order")?.unwrap_or(Value::Null);
        self.0
            .post_json(
                ctx,
                "/shipments",
                &json!({ "order_number": order["order_number"], "customer": o.customer }),
            )
            .await
    }
}

/// How long the `settle` step waits for the settlement webhook, from when it begins
/// waiting (the charge and the reservation done), across restarts: an hour. The fake
/// provider settles at once and retries its webhook until it is acknowledged, so only a
/// settlement that is truly lost (the provider gave up, or the service refuses it for
/// good, a wrong webhook secret say) lets it pass; a real provider's settlement may take
/// longer, and the deadline with it.
pub const SETTLEMENT_DEADLINE: Duration = Duration::from_secs(3600);

/// The correlation key the `settle` step waits on, and the service delivers a
/// `charge.settled` webhook to: `settlement/<charge id>`.
pub fn settlement_key(charge_id: &str) -> String {
    format!("settlement/{charge_id}")
}

/// The await step: the settlement of the saga's charge.
///
/// - Its key is [`settlement_key`] of the charge's `charge_id` (the charge step's output).
/// - Its event's payload (the webhook's body) is its output; `create_order` sends its
///   `settlement_id` to the orders provider.
/// - A timeout (no settlement within `within`) fails it **rejected**: the wait itself
///   took no effect, so it is not compensated; the steps before it are, so the charge is
///   refunded and the stock released, and no order is made. A settlement that comes
///   after that stays in the engine's inbox, taken by no saga (the money was refunded).
/// - It has **no compensation of its own**: what the settlement stands for (the money
///   received) is undone by refunding the charge, which the charge step's compensation
///   already does (a refund by the charge's key returns the settled money too). A second
///   refund here would refund twice. So when the saga compensates after the settlement
///   came (the orders provider refuses the customer), the charge is refunded once.
fn settlement(within: Duration) -> Await {
    Await::new(within, |ctx| {
        let charge: Value = ctx
            .output_of("charge")
            .map_err(|e| e.to_string())?
            .unwrap_or(Value::Null);
        charge["charge_id"]
            .as_str()
            .map(settlement_key)
            .ok_or_else(|| "the charge has no charge_id".to_string())
    })
    .on_timeout(OnTimeout::Rejected)
}

/// The order saga over `i`, waiting [`SETTLEMENT_DEADLINE`] for each settlement.
///
/// # Errors
///
/// Never in practice: the definition is valid.
pub fn definition(i: &Integrations) -> Result<SagaDefinition, sagaflow::definition::Error> {
    definition_with(i, SETTLEMENT_DEADLINE)
}

/// The order saga over `i`, waiting `settlement_within` for each settlement.
///
/// # Errors
///
/// Never in practice: the definition is valid.
pub fn definition_with(
    i: &Integrations,
    settlement_within: Duration,
) -> Result<SagaDefinition, sagaflow::definition::Error> {
    let retry = RetryPolicy::default()
        .with_max_attempts(8)
        .with_initial_backoff(Duration::from_millis(50))
        .with_max_backoff(Duration::from_secs(2))
        .with_attempt_timeout(Duration::from_secs(5));
    // The chaos run kills the service every couple of seconds while calls may wait that
    // long in the inventory limiter: an attempt can be in flight across many kills that
    // it did not cause. Crash-loop detection (a step that kills its own process) is
    // therefore set far above the default of 5 here.
    const KILLS_TOLERATED: u32 = 100;
    // The two branches run at once, each with its own retries, timeout and idempotency
    // key. If one fails for good, the other's attempt in flight settles, then whichever
    // may have taken effect is undone (both at once): released, refunded.
    let undo = retry.clone().with_unlimited_attempts();
    SagaDefinition::builder("order", 1)
        .parallel(|g| {
            g.step("reserve", Reserve(i.inventory.clone()))
                .retry(retry.clone())
                .compensation_retry(undo.clone())
                .max_interruptions(KILLS_TOLERATED)
                .reconcile("inventory", Reservations(i.lookups.inventory.clone()))
                .step("charge", Charge(i.payments.clone()))
                .retry(retry.clone())
                .compensation_retry(undo.clone())
                .max_interruptions(KILLS_TOLERATED)
                .reconcile("payments", Charges(i.lookups.payments.clone()))
        })
        .await_event("settle", settlement(settlement_within))
        .pivot("create_order", CreateOrder(i.orders.clone()))
        .retry(retry.clone())
        .max_interruptions(KILLS_TOLERATED)
        .reconcile("orders", Orders(i.lookups.orders.clone()))
        .retriable("book_shipping", BookShipping(i.orders.clone()))
        .retry(retry.with_unlimited_attempts())
        .max_interruptions(KILLS_TOLERATED)
        // The same provider as orders: one integration, one pace.
        .reconcile("orders", Shipments(i.lookups.orders.clone()))
        .build()
}
