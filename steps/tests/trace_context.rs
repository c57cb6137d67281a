//! W3C trace context on HTTP calls (feature `otel`), against a real server that records
//! the headers it gets.

mod support;

use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::Context;
use opentelemetry_sdk::trace::SdkTracerProvider;
use sagaflow_steps::http::Integration;
use serde_json::{json, Value};
use support::*;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// Answers with the trace context headers of the request (empty strings if absent).
fn app() -> Router {
    Router::new().route(
        "/headers",
        get(|headers: HeaderMap| async move {
            let h = |n: &str| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            Json(json!({ "traceparent": h("traceparent"), "tracestate": h("tracestate") }))
        }),
    )
}

/// A subscriber with an OpenTelemetry layer, as `sagaflow_otel::layer` builds, but
/// exporting nowhere: the spans get real trace and span ids all the same.
fn subscriber(provider: &SdkTracerProvider) -> impl tracing::Subscriber + Send + Sync {
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
    tracing_subscriber::registry().with(layer)
}

/// `traceparent` split into (version, trace id, parent span id, flags).
fn parts(traceparent: &str) -> (String, String, String, String) {
    let p: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(p.len(), 4, "not a traceparent: {traceparent:?}");
    (p[0].into(), p[1].into(), p[2].into(), p[3].into())
}

#[tokio::test]
async fn a_call_inside_a_span_names_that_span_as_its_parent() {
    let provider = SdkTracerProvider::builder().build();
    let _default = tracing::subscriber::set_default(subscriber(&provider));
    let base = serve(app()).await;
    let payments = Integration::new("payments", base);

    let span = tracing::info_span!("attempt", step = "charge");
    let cx = span.context();
    let expected = cx.span().span_context().clone();
    assert!(
        expected.is_valid(),
        "the layer gives the span an OpenTelemetry context"
    );

    let got: Value = payments
        .get_json(&ctx(1, "charge"), "/headers")
        .instrument(span)
        .await
        .unwrap();
    let (version, trace, parent, flags) = parts(got["traceparent"].as_str().unwrap());
    assert_eq!(version, "00");
    assert_eq!(
        trace,
        expected.trace_id().to_string(),
        "the span's trace id"
    );
    assert_eq!(
        parent,
        expected.span_id().to_string(),
        "the span is the parent"
    );
    assert_eq!(flags, "01", "sampled");
    assert_eq!(got["tracestate"], "", "no trace state to pass on");
}

#[tokio::test]
async fn an_incoming_trace_and_its_state_are_passed_on() {
    let provider = SdkTracerProvider::builder().build();
    let _default = tracing::subscriber::set_default(subscriber(&provider));
    let base = serve(app()).await;
    let payments = Integration::new("payments", base);

    // The saga was started by a request that came with a trace of its own.
    let remote = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        "vendor=opaque".parse::<TraceState>().unwrap(),
    );
    let span = tracing::info_span!("attempt", step = "charge");
    span.set_parent(Context::new().with_remote_span_context(remote))
        .unwrap();
    let own = span.context().span().span_context().span_id();

    let got: Value = payments
        .get_json(&ctx(2, "charge"), "/headers")
        .instrument(span)
        .await
        .unwrap();
    let (_, trace, parent, _) = parts(got["traceparent"].as_str().unwrap());
    assert_eq!(
        trace, "4bf92f3577b34da6a3ce929d0e0e4736",
        "the incoming trace goes on"
    );
    assert_eq!(
        parent,
        own.to_string(),
        "with this span as the parent, not the remote one"
    );
    assert_eq!(got["tracestate"], "vendor=opaque");
}

#[tokio::test]
async fn without_an_opentelemetry_layer_no_header_is_sent() {
    let _default = tracing::subscriber::set_default(tracing_subscriber::registry());
    let base = serve(app()).await;
    let payments = Integration::new("payments", base);

    let got: Value = payments
        .get_json(&ctx(3, "charge"), "/headers")
        .instrument(tracing::info_span!("attempt"))
        .await
        .unwrap();
    assert_eq!(got, json!({ "traceparent": "", "tracestate": "" }));
}
