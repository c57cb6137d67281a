//! Production pieces for saga steps that call real services.
//!
//! Each module answers a failure that naive integration code suffers, and each sits
//! behind its own Cargo feature (all on with `full`, the default):
//!
//! | module | feature | answers |
//! | --- | --- | --- |
//! | [`http`] | `http` | calls without timeouts, idempotency keys or a correlation id; errors the engine cannot act on (it needs retryable, retry-after, rejected or unknown) |
//! | [`rate_limit`] | `rate_limit` | 429 storms: one limiter and one concurrency cap per integration, shared by every saga; a server's Retry-After pauses the integration for everyone (at most an hour by default) |
//! | [`circuit_breaker`] | `circuit_breaker` | retry storms against a dead service: fail fast as "retry after" while it is open |
//! | [`oauth`] | `oauth` | expired tokens: cached client-credentials tokens (a day at most by default), refreshed before expiry by one caller, replayed once on a 401 |
//! | [`webhook`] | `webhook` | forged, stale, future-dated, replayed, id-less and oversized webhooks, and headers crafted to burn CPU |
//! | [`secrets`] | `secrets` | keys in source and in logs |
//! | `trace_context` | `otel` (not in `full`) | downstream services that cannot join the saga's trace: W3C `traceparent` and `tracestate` from the current span on every [`http`] call |
//!
//! Retries belong to the engine, which makes them durable: a piece here reports how a
//! call failed and never loops on its own.
//!
//! Every duration a server hands over (`Retry-After` in seconds or as a date, OAuth
//! `expires_in`) is clamped to a configured maximum before it becomes a step error, a
//! pause or a cache lifetime, with arithmetic that cannot overflow: no answer from a
//! server makes a piece here panic.

#![warn(missing_docs)]

#[cfg(feature = "circuit_breaker")]
pub mod circuit_breaker;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "oauth")]
pub mod oauth;
#[cfg(feature = "rate_limit")]
pub mod rate_limit;
#[cfg(feature = "secrets")]
pub mod secrets;
#[cfg(feature = "otel")]
pub mod trace_context;
#[cfg(feature = "webhook")]
pub mod webhook;

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

/// `now + d`, or the latest instant up to `d` later that the platform can represent:
/// never panics, whatever duration a server handed over.
#[cfg(any(feature = "rate_limit", feature = "oauth"))]
pub(crate) fn instant_after(
    now: tokio::time::Instant,
    d: std::time::Duration,
) -> tokio::time::Instant {
    let mut d = d;
    loop {
        if let Some(t) = now.checked_add(d) {
            return t;
        }
        // Halving reaches zero after at most 94 steps, and `now + 0` always exists.
        d /= 2;
    }
}

/// The pages of `docs/steps/`, compiled and run as doc tests so their examples stay
/// true.
#[cfg(doctest)]
mod doc_pages {
    #[doc = include_str!("../../docs/steps/http.md")]
    struct Http;
    #[doc = include_str!("../../docs/steps/rate_limit.md")]
    struct RateLimit;
    #[doc = include_str!("../../docs/steps/circuit_breaker.md")]
    struct CircuitBreaker;
    #[doc = include_str!("../../docs/steps/oauth.md")]
    struct OAuth;
    #[doc = include_str!("../../docs/steps/webhook.md")]
    struct Webhook;
    #[doc = include_str!("../../docs/steps/secrets.md")]
    struct Secrets;
}
