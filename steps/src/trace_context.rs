//! W3C trace context for downstream calls (feature `otel`).
//!
//! A saga's spans are exported as one trace (crate `sagaflow-otel`); a service a step
//! calls can join that trace if the call says where it comes from. [`headers`] gives the
//! `traceparent` header (and `tracestate`, if the trace carries one) of the current
//! `tracing` span, in the [W3C Trace Context] format, and [`crate::http::Integration`]
//! sends them on every request. Inside a step the current span is the engine's
//! `attempt` span, so the downstream service's spans become children of that attempt.
//!
//! The context is read from the OpenTelemetry layer of `tracing-opentelemetry` (the one
//! `sagaflow_otel::layer` builds). Without such a layer, or outside any span, there is
//! no trace to continue and no header is sent: the calls are exactly as without the
//! feature.
//!
//! [W3C Trace Context]: https://www.w3.org/TR/trace-context/

use opentelemetry::propagation::{Injector, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header that names the trace and the calling span.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The header that carries vendors' trace state along with [`TRACEPARENT_HEADER`].
pub const TRACESTATE_HEADER: &str = "tracestate";

/// The W3C trace context headers (name, value) of the current `tracing` span: empty
/// when it has no OpenTelemetry context.
///
/// ```
/// // No OpenTelemetry layer here, so nothing to propagate.
/// let span = tracing::info_span!("call");
/// let _in = span.enter();
/// assert!(sagaflow_steps::trace_context::headers().is_empty());
/// ```
pub fn headers() -> Vec<(String, String)> {
    headers_of(&tracing::Span::current())
}

/// The W3C trace context headers (name, value) of `span`: `traceparent` names `span` as
/// the parent of the call, `tracestate` follows if the trace has one. Empty when `span`
/// has no valid OpenTelemetry context.
pub fn headers_of(span: &tracing::Span) -> Vec<(String, String)> {
    let mut headers = Headers(Vec::new());
    TraceContextPropagator::new().inject_context(&span.context(), &mut headers);
    headers.0
}

struct Headers(Vec<(String, String)>);

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}
