//! Sagaflow's traces, exported over OpenTelemetry (OTLP/HTTP).
//!
//! The engine already runs every saga inside a `tracing` span named `saga` (fields
//! `saga_id`, `definition`, `version`), each half of a step (action or compensation)
//! inside a child span named `step` (fields `step`, `phase`) that lasts from its first
//! attempt until it settles, and every attempt inside a child of that named `attempt`
//! (fields `step`, `phase`, `attempt`). This crate
//! turns those spans into OpenTelemetry spans and sends them, in batches, to an OTLP/HTTP
//! receiver (an OpenTelemetry Collector, Jaeger, Tempo...), as protobuf on
//! `POST <endpoint>/v1/traces`:
//!
//! - the span's name is the `tracing` span's name (`saga`, `step`, `attempt`);
//! - every field becomes an attribute of the same name (`saga_id`, `definition`,
//!   `version`, `step`, `phase`, `attempt`), and the `tracing` events inside a span
//!   become its span events;
//! - a `step` span is a child of its `saga` span, an `attempt` span of its `step` span:
//!   one saga run is one trace (or one subtree of the trace the saga was started from,
//!   such as an API request's);
//! - every span under a `saga` span also gets the saga's `saga_id` attribute, so that a
//!   back end that filters spans one by one (not whole traces) finds the attempts of a
//!   saga by its id too;
//! - the resource carries `service.name`, from [`Options::new`].
//!
//! It is a separate crate so that a program that does not export traces compiles none of
//! it. The HTTP transport is the exporter's blocking `reqwest` client on the SDK's own
//! batch thread: no gRPC stack, and no work on the program's tokio runtime. It speaks
//! plain `http://` only (the workspace builds no TLS stack): export to a collector on the
//! same host or network, which forwards over TLS if needed.
//!
//! To carry the trace on to the services a step calls, turn on the `otel` feature of
//! `sagaflow-steps`: its HTTP client then sends W3C `traceparent` (and `tracestate`)
//! headers taken from the current span.
//!
//! ```no_run
//! use sagaflow_otel::Options;
//! use tracing_subscriber::layer::SubscriberExt;
//! use tracing_subscriber::util::SubscriberInitExt;
//!
//! let options = Options::new("orders").with_endpoint("http://127.0.0.1:4318");
//! let (otel, guard) = sagaflow_otel::layer(&options)?;
//! tracing_subscriber::registry()
//!     .with(otel)
//!     .with(tracing_subscriber::fmt::layer())
//!     .init();
//! // ... open the engine, run sagas ...
//! guard.shutdown()?; // or drop it: the spans still in the queue are sent either way
//! # Ok::<(), sagaflow_otel::Error>(())
//! ```

#![warn(missing_docs)]

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use opentelemetry::trace::{Span as _, TraceContextExt as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SdkTracer, SdkTracerProvider, Span, SpanData, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tracing_subscriber::registry::LookupSpan;

/// The attribute (and `tracing` field) that carries the saga id.
pub const SAGA_ID: &str = "saga_id";

/// The path an OTLP/HTTP receiver takes traces on, appended to [`Options::with_endpoint`].
pub const TRACES_PATH: &str = "/v1/traces";

/// The layer [`layer`] returns: `tracing` spans in, OpenTelemetry spans out.
pub type ExportLayer<S> = tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>;

/// An error of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The exporter could not be built (an endpoint that is not a URL, for one).
    #[error("cannot build the OTLP exporter: {0}")]
    Build(#[source] opentelemetry_otlp::ExporterBuildError),
    /// Spans could not be flushed, or the pipeline could not be shut down in time.
    #[error("cannot flush the spans: {0}")]
    Flush(#[source] OTelSdkError),
}

/// The result of this crate's functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the spans go, and as which service.
///
/// ```
/// use std::time::Duration;
/// use sagaflow_otel::Options;
///
/// let options = Options::new("orders")
///     .with_endpoint("http://collector:4318")
///     .with_timeout(Duration::from_secs(5));
/// assert_eq!(options.service_name(), "orders");
/// assert_eq!(options.traces_url().as_deref(), Some("http://collector:4318/v1/traces"));
/// assert_eq!(Options::default().traces_url(), None); // from the environment
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Options {
    service_name: String,
    endpoint: Option<String>,
    timeout: Option<Duration>,
}

impl Default for Options {
    /// Service `sagaflow`, endpoint from the environment.
    fn default() -> Self {
        Options::new("sagaflow")
    }
}

impl Options {
    /// Spans of the service `service_name` (the resource's `service.name`), sent where
    /// the environment says: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it is), else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` followed by `/v1/traces`, else
    /// `http://localhost:4318/v1/traces`.
    pub fn new(service_name: impl Into<String>) -> Self {
        Options {
            service_name: service_name.into(),
            endpoint: None,
            timeout: None,
        }
    }

    /// Sends to the OTLP/HTTP receiver at `base_url` (as `OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// for example `http://127.0.0.1:4318`): spans are posted to `base_url/v1/traces`. A
    /// URL that already ends in `/v1/traces` is used as it is. An empty one leaves the
    /// choice to the environment, as [`Options::new`] says.
    pub fn with_endpoint(mut self, base_url: impl Into<String>) -> Self {
        let url: String = base_url.into();
        self.endpoint = (!url.trim().is_empty()).then_some(url);
        self
    }

    /// Gives up on one export after `timeout` (default: 10 s, or
    /// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The service name the spans are sent under.
    pub fn service_name(&self) -> &str {
        &self.service_name
    }

    /// The URL spans are posted to, or `None` if the environment decides.
    pub fn traces_url(&self) -> Option<String> {
        let base = self.endpoint.as_deref()?.trim();
        Some(if base.ends_with(TRACES_PATH) {
            base.to_string()
        } else {
            format!("{}{TRACES_PATH}", base.trim_end_matches('/'))
        })
    }
}

/// A layer that exports every span it sees over OTLP/HTTP as [`Options`] say, and the
/// guard that flushes the spans still queued when it is dropped.
///
/// Add the layer to a `tracing_subscriber` registry (see the crate's example). Spans are
/// sent in batches from a thread of the exporter's own, every few seconds and when a
/// batch is full; a span is sent once it has ended (a `saga` span when its saga's driver
/// ends: the saga finished, or this process handed it over or shut down). Only the spans
/// that reach the layer are exported: put a filter on it (`Layer::with_filter`) to keep
/// out other crates' spans.
///
/// Nothing is sent before the first span ends, so a receiver that is down is not an
/// error here: its failures are the exporter's to log, and spans it could not take are
/// dropped.
///
/// # Errors
///
/// [`Error::Build`] if the exporter cannot be built: an endpoint (given or from the
/// environment) that is not a URL, an unknown protocol in `OTEL_EXPORTER_OTLP_PROTOCOL`.
pub fn layer<S>(options: &Options) -> Result<(ExportLayer<S>, Guard)>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
    if let Some(url) = options.traces_url() {
        exporter = exporter.with_endpoint(url);
    }
    if let Some(timeout) = options.timeout {
        exporter = exporter.with_timeout(timeout);
    }
    let exporter = exporter.build().map_err(Error::Build)?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(SagaIds::new(BatchSpanProcessor::builder(exporter).build()))
        .with_resource(
            Resource::builder()
                .with_service_name(options.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("sagaflow");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Thread ids say nothing about a task that moves between tokio's workers.
        .with_threads(false);
    Ok((layer, Guard { provider }))
}

/// Keeps the export pipeline; flushes it and shuts it down when dropped.
///
/// Dropping it (or [`Guard::shutdown`]) waits, a few seconds at most, until the spans
/// still queued are sent: do it at the end of `main`, after the engine has shut down
/// (its sagas' spans end then).
#[derive(Debug)]
pub struct Guard {
    provider: SdkTracerProvider,
}

impl Guard {
    /// Sends every span that has ended and is still queued, and waits for the answer.
    /// It blocks: from async code, call it inside `tokio::task::spawn_blocking`.
    ///
    /// # Errors
    ///
    /// [`Error::Flush`] if an export failed or timed out, or the guard was shut down.
    pub fn flush(&self) -> Result<()> {
        self.provider.force_flush().map_err(Error::Flush)
    }

    /// Flushes, then stops the pipeline: spans that end later are not sent.
    ///
    /// # Errors
    ///
    /// [`Error::Flush`] if the last export failed or the pipeline did not stop in time.
    pub fn shutdown(self) -> Result<()> {
        self.provider.shutdown().map_err(Error::Flush)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // After `shutdown` this says "already shut down"; an export that failed was
        // reported by the exporter. Nothing is left to do about either here.
        let _ = self.provider.shutdown();
    }
}

/// Gives every span under a `saga` span that span's `saga_id` attribute, then hands
/// the spans on to `next`.
///
/// The saga id of each open span that has one (its own or inherited) is kept by span
/// id until the span ends; a span started under one of them inherits it. A span with a
/// `saga_id` of its own (a saga started from inside another saga's step) keeps its own.
#[derive(Debug)]
struct SagaIds<P> {
    open: Mutex<HashMap<opentelemetry::trace::SpanId, Value>>,
    next: P,
}

impl<P> SagaIds<P> {
    fn new(next: P) -> Self {
        SagaIds {
            open: Mutex::new(HashMap::new()),
            next,
        }
    }
}

impl<P: SpanProcessor> SpanProcessor for SagaIds<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        let own = span.exported_data().and_then(|data| {
            data.attributes
                .into_iter()
                .find(|kv| kv.key.as_str() == SAGA_ID)
                .map(|kv| kv.value)
        });
        let id = span.span_context().span_id();
        let parent = cx.span().span_context().span_id();
        {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            let saga_id = match own {
                Some(v) => Some(v),
                None => open.get(&parent).cloned().inspect(|v| {
                    span.set_attribute(KeyValue::new(SAGA_ID, v.clone()));
                }),
            };
            if let Some(v) = saga_id {
                open.insert(id, v);
            }
        }
        self.next.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&span.span_context.span_id());
        self.next.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.next.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.next.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.next.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use opentelemetry::trace::{SpanBuilder, Tracer as _};

    use super::*;

    /// Keeps the spans that ended.
    #[derive(Debug, Default)]
    struct Collect(Mutex<Vec<SpanData>>);

    impl SpanProcessor for Collect {
        fn on_start(&self, _: &mut Span, _: &Context) {}
        fn on_end(&self, span: SpanData) {
            self.0.lock().unwrap().push(span);
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    /// The processor under test, shared with the test so that it can look inside.
    #[derive(Debug)]
    struct Shared(Arc<SagaIds<Collect>>);

    impl SpanProcessor for Shared {
        fn on_start(&self, span: &mut Span, cx: &Context) {
            self.0.on_start(span, cx);
        }
        fn on_end(&self, span: SpanData) {
            self.0.on_end(span);
        }
        fn force_flush(&self) -> OTelSdkResult {
            self.0.force_flush()
        }
        fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
            self.0.shutdown_with_timeout(timeout)
        }
    }

    fn saga(id: &'static str) -> SpanBuilder {
        SpanBuilder::from_name("saga").with_attributes([KeyValue::new(SAGA_ID, id)])
    }

    #[test]
    fn children_inherit_the_saga_id_and_a_nested_saga_keeps_its_own() {
        let ids = Arc::new(SagaIds::new(Collect::default()));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Shared(ids.clone()))
            .build();
        let tracer = provider.tracer("test");

        let request = tracer.start("request");
        let cx = Context::current_with_span(request);
        let saga_a = cx.with_span(saga("a").start_with_context(&tracer, &cx));
        let attempt = saga_a.with_span(tracer.start_with_context("attempt", &saga_a));
        let call = tracer.start_with_context("call", &attempt);
        let saga_b = saga("b").start_with_context(&tracer, &attempt);
        let saga_b = attempt.with_span(saga_b);
        let inner = tracer.start_with_context("attempt-of-b", &saga_b);
        assert_eq!(
            ids.open.lock().unwrap().len(),
            5,
            "a, its attempt and call, b and its attempt"
        );
        drop((inner, saga_b, call, attempt, saga_a, cx));
        assert!(
            ids.open.lock().unwrap().is_empty(),
            "every span that ended is forgotten"
        );

        let spans = std::mem::take(&mut *ids.next.0.lock().unwrap());
        let ids_of = |name: &str| -> Vec<Vec<String>> {
            spans
                .iter()
                .filter(|s| s.name == name)
                .map(|s| {
                    s.attributes
                        .iter()
                        .filter(|kv| kv.key.as_str() == SAGA_ID)
                        .map(|kv| kv.value.to_string())
                        .collect()
                })
                .collect()
        };
        assert_eq!(spans.len(), 6);
        assert_eq!(ids_of("request"), vec![Vec::<String>::new()]);
        assert_eq!(ids_of("attempt"), vec![vec!["a".to_string()]]);
        assert_eq!(ids_of("call"), vec![vec!["a".to_string()]]);
        assert_eq!(ids_of("attempt-of-b"), vec![vec!["b".to_string()]]);
        let mut sagas = ids_of("saga");
        sagas.sort();
        assert_eq!(sagas, vec![vec!["a".to_string()], vec!["b".to_string()]]);
    }
}
