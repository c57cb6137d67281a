//! The order saga's reconcile hooks: once an order's saga has finished, the engine's
//! reconciler asks each provider for its view of each step, by the step's idempotency
//! key, and records every disagreement on the saga's log as a drift.
//!
//! | step | asks | in force | compared with the log |
//! | --- | --- | --- | --- |
//! | `reserve` | inventory `GET /reservations?key=` | a reservation not released | `quantity` (the order's), `reservation_id` (the step's output) |
//! | `charge` | payments `GET /charges?key=` (OAuth) | a charge not refunded | `amount_cents` (the order's), `charge_id` (the output) |
//! | `create_order` | orders `GET /orders?key=&order_id=` | an order under the key, or for the order id under any other key | `order_number` (the output); no other order for the order id |
//! | `book_shipping` | orders `GET /shipments?key=` | a shipment | `tracking` (the output) |
//!
//! `settle` has no hook: it waits for the settlement webhook and calls no system; the
//! settlement itself is checked against payments' outbox by the chaos run.
//!
//! Each hook also reports `different` when a provider holds two effects under one key
//! (applied twice) or undid one twice, and `unknown` when the provider cannot be asked (it cannot be
//! reached, times out, answers an error or something that does not parse): the
//! reconciler asks again before it records that.
//!
//! Lookups go through the steps toolkit's [`Integration`] (its timeouts, and payments'
//! OAuth tokens, the same [`TokenSource`] the steps use) but through no limiter or
//! breaker of their own: the engine paces them per integration with the limiter the
//! steps use ([`reconcile_options`]), and a breaker is the steps' business.

use std::sync::Arc;
use std::time::Duration;

use sagaflow::machine::Expected;
use sagaflow::{Finished, Phase, Reconcile, ReconcileOptions, StepContext, Verdict};
use sagaflow_steps::http::Integration;
use sagaflow_steps::oauth::TokenSource;
use serde_json::Value;

use crate::providers::Addresses;
use crate::saga::Integrations;

/// The steps of the order saga that have a reconcile hook.
pub const STEPS_WITH_HOOKS: [&str; 4] = ["reserve", "charge", "create_order", "book_shipping"];

/// The clients the hooks ask the providers with.
#[derive(Debug, Clone)]
pub struct Lookups {
    /// Payments, with the steps' OAuth tokens.
    pub payments: Arc<Integration>,
    /// Inventory.
    pub inventory: Arc<Integration>,
    /// Orders and shipping.
    pub orders: Arc<Integration>,
}

impl Lookups {
    /// Clients of the providers at `a`, authenticating to payments with `tokens`.
    pub fn new(a: &Addresses, tokens: Arc<TokenSource>) -> Self {
        let timeout = Duration::from_secs(3);
        Lookups {
            payments: Arc::new(
                Integration::new("payments", &a.payments)
                    .with_timeout(timeout)
                    .with_tokens(tokens),
            ),
            inventory: Arc::new(Integration::new("inventory", &a.inventory).with_timeout(timeout)),
            orders: Arc::new(Integration::new("orders", &a.orders).with_timeout(timeout)),
        }
    }
}

/// The reconciler's options for the order saga over `i`: inventory's lookups are paced
/// by the limiter its steps wait on (payments and orders have none), so checking
/// inventory never takes more from it than the shop is allowed. The window and the
/// rest are the defaults (sagas finished between 10 minutes and 7 days ago).
pub fn reconcile_options(i: &Integrations) -> ReconcileOptions {
    ReconcileOptions::default().limit("inventory", i.inventory_limiter.clone())
}

/// Percent-encodes `s` for a query string (keys are `<saga id>/<step>/<phase>`).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET path` at `provider`, the records in the answer's `field`; a provider that
/// cannot be asked is `Err(unknown)`.
async fn ask(
    provider: &Integration,
    name: &str,
    step: &Finished,
    path: &str,
    field: &str,
) -> Result<Vec<Value>, Verdict> {
    // The steps toolkit's client takes a step's context (its idempotency key and
    // correlation id go out as headers); the engine offers no other way to make one
    // outside an attempt than `for_test`. Its key is the step's action key, what the
    // lookup is about; its deadline is none, so the integration's timeout bounds it.
    let ctx = StepContext::for_test(step.saga, &step.step, Phase::Action, Value::Null);
    match provider.get_json::<Value>(&ctx, path).await {
        Ok(v) => match v.get(field).and_then(Value::as_array) {
            Some(records) => Ok(records.clone()),
            None => Err(Verdict::unknown(format!(
                "{name} answered without `{field}`: {}",
                sagaflow::bound_message(v.to_string())
            ))),
        },
        Err(e) => Err(Verdict::unknown(format!(
            "{name} could not be asked: {}",
            e.message()
        ))),
    }
}

/// The differences found, as one detail, or `None`.
fn differences(d: Vec<String>) -> Option<String> {
    (!d.is_empty()).then(|| d.join("; "))
}

/// Whether `found[field]` differs from `want` (ignored when the log holds no `want`).
fn differ(d: &mut Vec<String>, what: &str, found: &Value, want: Option<&Value>) {
    if let Some(w) = want.filter(|w| !w.is_null()) {
        if found != w {
            d.push(format!("{what} is {found}, the log says {w}"));
        }
    }
}

/// The records of an effect with an undo (a charge, a reservation): judged by those in
/// force (`undone` is not true). Two under one key, undone twice (`undos` over 1), or a
/// field that differs from the log, is `different`; `compare` names the fields: (field,
/// value in the saga's input or the step's output).
fn judge_undoable(
    step: &Finished,
    what: &str,
    records: &[Value],
    (undone, undos): (&str, &str),
    compare: &[(&str, Option<&Value>)],
) -> Verdict {
    let twice = records
        .iter()
        .map(|r| r[undos].as_u64().unwrap_or(0))
        .max()
        .filter(|n| *n > 1);
    if let (Some(n), true) = (twice, step.expected != Expected::Present) {
        // Nothing in force, as the log says, but undone more than once.
        return Verdict::different(format!(
            "the {what} under key {} was undone {n} times ({undos})",
            step.key
        ));
    }
    let in_force: Vec<&Value> = records
        .iter()
        .filter(|r| r[undone] != Value::Bool(true))
        .collect();
    match (step.expected == Expected::Present, in_force.first()) {
        (true, None) if !records.is_empty() => {
            return Verdict::missing(format!(
                "the {what} under key {} was undone ({undone}), where the log says it stands",
                step.key
            ))
        }
        (false, Some(r)) => {
            return Verdict::unexpected(format!(
                "{what} {} under key {} is in force (not {undone}), where the log says {}",
                sagaflow::bound_message(strip(r).to_string()),
                step.key,
                step.expected
            ))
        }
        _ => {}
    }
    step.judge(in_force.first().copied(), |r| {
        let mut d = Vec::new();
        if records.len() > 1 {
            d.push(format!(
                "{} {what}s under key {} (applied more than once)",
                records.len(),
                step.key
            ));
        }
        for (field, want) in compare {
            differ(&mut d, field, &r[*field], *want);
        }
        differences(d)
    })
}

/// A record without what the lookup added (its key, the undo flags): what the
/// provider answered when the effect was taken.
fn strip(r: &Value) -> Value {
    let mut r = r.clone();
    if let Some(o) = r.as_object_mut() {
        for k in [
            "key", "about", "refunded", "refunds", "released", "releases",
        ] {
            o.remove(k);
        }
    }
    r
}

/// The `charge` step's hook: payments' charges under the step's key.
#[derive(Debug, Clone)]
pub struct Charges(pub Arc<Integration>);

#[sagaflow::async_trait]
impl Reconcile for Charges {
    async fn reconcile(&self, step: &Finished) -> Verdict {
        let path = format!("/charges?key={}", encode(step.key.as_str()));
        let charges = match ask(&self.0, "payments", step, &path, "charges").await {
            Ok(c) => c,
            Err(unknown) => return unknown,
        };
        let output = step.output.as_ref();
        judge_undoable(
            step,
            "charge",
            &charges,
            ("refunded", "refunds"),
            &[
                ("amount_cents", step.input.get("amount_cents")),
                ("charge_id", output.and_then(|o| o.get("charge_id"))),
            ],
        )
    }
}

/// The `reserve` step's hook: inventory's reservations under the step's key.
#[derive(Debug, Clone)]
pub struct Reservations(pub Arc<Integration>);

#[sagaflow::async_trait]
impl Reconcile for Reservations {
    async fn reconcile(&self, step: &Finished) -> Verdict {
        let path = format!("/reservations?key={}", encode(step.key.as_str()));
        let reservations = match ask(&self.0, "inventory", step, &path, "reservations").await {
            Ok(r) => r,
            Err(unknown) => return unknown,
        };
        let output = step.output.as_ref();
        judge_undoable(
            step,
            "reservation",
            &reservations,
            ("released", "releases"),
            &[
                ("quantity", step.input.get("quantity")),
                (
                    "reservation_id",
                    output.and_then(|o| o.get("reservation_id")),
                ),
            ],
        )
    }
}

/// The `create_order` step's hook: the orders under the step's key, and every order
/// for the business order id (the saga's id), under whatever key: an order made outside
/// any saga for an order whose saga made none is `unexpected`, one beside the saga's own
/// is `different`.
#[derive(Debug, Clone)]
pub struct Orders(pub Arc<Integration>);

#[sagaflow::async_trait]
impl Reconcile for Orders {
    async fn reconcile(&self, step: &Finished) -> Verdict {
        let path = format!(
            "/orders?key={}&order_id={}",
            encode(step.key.as_str()),
            encode(&step.saga.to_string())
        );
        let orders = match ask(&self.0, "orders", step, &path, "orders").await {
            Ok(o) => o,
            Err(unknown) => return unknown,
        };
        let (own, others): (Vec<&Value>, Vec<&Value>) = orders
            .iter()
            .partition(|o| o["key"].as_str() == Some(step.key.as_str()));
        let describe = |o: &Value| format!("order {} under key {}", o["order_number"], o["key"]);
        if step.expected != Expected::Present {
            return match orders.first() {
                None => Verdict::Matches,
                Some(o) => Verdict::unexpected(format!(
                    "{} for order id {}, where the log says {}",
                    describe(o),
                    step.saga,
                    step.expected
                )),
            };
        }
        step.judge(own.first().copied(), |o| {
            let mut d = Vec::new();
            if own.len() > 1 {
                d.push(format!(
                    "{} orders under key {} (applied more than once)",
                    own.len(),
                    step.key
                ));
            }
            differ(
                &mut d,
                "order_number",
                &o["order_number"],
                step.output.as_ref().and_then(|out| out.get("order_number")),
            );
            if !others.is_empty() {
                let list: Vec<String> = others.iter().map(|o| describe(o)).collect();
                d.push(format!(
                    "also for order id {}, outside this saga: {}",
                    step.saga,
                    list.join(", ")
                ));
            }
            differences(d)
        })
    }
}

/// The `book_shipping` step's hook: the shipments under the step's key.
#[derive(Debug, Clone)]
pub struct Shipments(pub Arc<Integration>);

#[sagaflow::async_trait]
impl Reconcile for Shipments {
    async fn reconcile(&self, step: &Finished) -> Verdict {
        let path = format!("/shipments?key={}", encode(step.key.as_str()));
        let shipments = match ask(&self.0, "orders", step, &path, "shipments").await {
            Ok(s) => s,
            Err(unknown) => return unknown,
        };
        step.judge(shipments.first(), |s| {
            let mut d = Vec::new();
            if shipments.len() > 1 {
                d.push(format!(
                    "{} shipments under key {} (applied more than once)",
                    shipments.len(),
                    step.key
                ));
            }
            differ(
                &mut d,
                "tracking",
                &s["tracking"],
                step.output.as_ref().and_then(|out| out.get("tracking")),
            );
            differences(d)
        })
    }
}
