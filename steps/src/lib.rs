//! Reusable pieces for saga steps that call real services.
//!
//! The integration modules (HTTP with failure classification, rate limits, circuit
//! breakers, OAuth token refresh, webhook verification, secrets) arrive one per module,
//! each behind its own Cargo feature. What every integration needs is here already: the
//! headers that carry a step's idempotency key and the saga's correlation id downstream.

#![warn(missing_docs)]

use sagaflow::StepContext;

/// The header that carries the step's idempotency key (G3).
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// The header that carries the saga id, so the downstream service's logs can be joined
/// with the saga's history.
pub const CORRELATION_ID_HEADER: &str = "X-Correlation-Id";

/// The headers every downstream call of a step should send: its idempotency key and the
/// saga id as correlation id.
///
/// ```
/// use sagaflow::{Phase, StepContext};
/// use sagaflow_steps::{correlation_headers, IDEMPOTENCY_KEY_HEADER};
///
/// let saga = "0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071".parse()?;
/// let ctx = StepContext::for_test(saga, "charge", Phase::Action, serde_json::Value::Null);
/// let headers = correlation_headers(&ctx);
/// assert_eq!(headers[0], (IDEMPOTENCY_KEY_HEADER, format!("{saga}/charge/action")));
/// assert_eq!(headers[1].1, saga.to_string());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn correlation_headers(ctx: &StepContext) -> [(&'static str, String); 2] {
    [
        (IDEMPOTENCY_KEY_HEADER, ctx.idempotency_key().to_string()),
        (CORRELATION_ID_HEADER, ctx.saga_id().to_string()),
    ]
}
