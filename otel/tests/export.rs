//! A real engine's spans, exported over OTLP/HTTP to a receiver on 127.0.0.1 and
//! decoded there as protobuf, as a collector would.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use sagaflow::store::MemLog;
use sagaflow::{
    async_trait, Compensate, Engine, RetryPolicy, SagaDefinition, SagaOutcome, Step, StepContext,
    StepError,
};
use sagaflow_otel::Options;
use serde_json::Value;
use tracing_subscriber::layer::SubscriberExt as _;

/// An OTLP/HTTP receiver on its own thread and runtime (the test's thread blocks in
/// `flush` while the exporter talks to it): keeps the body of every `POST /v1/traces`.
struct Receiver {
    url: String,
    bodies: Arc<Mutex<Vec<Bytes>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Self {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = Router::new().route(
                    "/v1/traces",
                    post(move |body: Bytes| async move {
                        kept.lock().unwrap().push(body);
                        // An empty ExportTraceServiceResponse: everything accepted.
                        ([(CONTENT_TYPE, "application/x-protobuf")], Vec::<u8>::new())
                    }),
                );
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Receiver {
            url: format!("http://{addr}"),
            bodies,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Every span received so far, with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let mut spans = Vec::new();
        for body in self.bodies.lock().unwrap().iter() {
            let request = ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
            for rs in request.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| attr(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        spans.push((service.clone(), span));
                    }
                }
            }
        }
        spans
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The value of attribute `key`, as text.
fn attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    Some(match value.value.as_ref()? {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

struct Reserve;

#[async_trait]
impl Step for Reserve {
    type Input = Value;
    type Output = String;
    async fn execute(&self, ctx: &StepContext, _: Value) -> Result<String, StepError> {
        Ok(format!("reserved by {}", ctx.idempotency_key()))
    }
}

#[async_trait]
impl Compensate for Reserve {
    async fn compensate(
        &self,
        _: &StepContext,
        _: Value,
        _: Option<String>,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

/// Fails its first attempt (retryable), succeeds after.
struct Charge(AtomicU32);

#[async_trait]
impl Step for Charge {
    type Input = Value;
    type Output = u32;
    async fn execute(&self, _: &StepContext, _: Value) -> Result<u32, StepError> {
        match self.0.fetch_add(1, Ordering::SeqCst) {
            0 => Err(StepError::retryable("the card service is busy")),
            n => Ok(n),
        }
    }
}

#[test]
fn saga_and_attempt_spans_arrive_with_the_saga_id_in_one_trace() {
    let receiver = Receiver::start();
    let options = Options::new("sagaflow-otel-test").with_endpoint(&receiver.url);
    let (layer, guard) = sagaflow_otel::layer(&options).unwrap();
    let subscriber = tracing_subscriber::registry().with(layer);

    // The engine runs on a current-thread runtime on this thread, so every span it makes
    // reaches this thread's subscriber.
    let id = tracing::subscriber::with_default(subscriber, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let def = SagaDefinition::builder("checkout", 3)
                .step("reserve", Reserve)
                .pivot("charge", Charge(AtomicU32::new(0)))
                .retry(
                    RetryPolicy::default()
                        .with_initial_backoff(Duration::from_millis(1))
                        .with_max_backoff(Duration::from_millis(5)),
                )
                .build()
                .unwrap();
            let engine = Engine::builder()
                .register(def)
                .open_with(Arc::new(MemLog::new()))
                .await
                .unwrap();
            let id = engine
                .start("checkout", serde_json::json!({"cents": 500}), None)
                .await
                .unwrap();
            let outcome = engine.wait(id).await.unwrap();
            assert!(
                matches!(outcome, SagaOutcome::Completed { .. }),
                "{outcome:?}"
            );
            engine.shutdown().await.unwrap();
            id
        })
        // The runtime is dropped here: every driver task, and so every span, has ended.
    });
    guard.flush().unwrap();

    let spans = receiver.spans();
    let saga_id = id.to_string();
    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "sagaflow-otel-test"),
        "service.name on every span"
    );
    let sagas: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "saga")
        .collect();
    assert!(!sagas.is_empty(), "no saga span among {spans:#?}");
    for saga in &sagas {
        assert_eq!(
            attr(&saga.attributes, "saga_id").as_deref(),
            Some(&*saga_id)
        );
        assert_eq!(
            attr(&saga.attributes, "definition").as_deref(),
            Some("checkout")
        );
        assert_eq!(attr(&saga.attributes, "version").as_deref(), Some("3"));
        assert_eq!(saga.trace_id.len(), 16);
    }

    let attempts: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "attempt")
        .collect();
    let mut seen: Vec<(String, String, String)> = attempts
        .iter()
        .map(|a| {
            (
                attr(&a.attributes, "step").unwrap_or_default(),
                attr(&a.attributes, "phase").unwrap_or_default(),
                attr(&a.attributes, "attempt").unwrap_or_default(),
            )
        })
        .collect();
    seen.sort();
    let expected = [("charge", "1"), ("charge", "2"), ("reserve", "1")];
    assert_eq!(seen.len(), expected.len(), "{seen:?}");
    for ((step, phase, attempt), (want_step, want_attempt)) in seen.iter().zip(expected) {
        assert_eq!(phase, "action", "{seen:?}");
        assert_eq!(
            (step.as_str(), attempt.as_str()),
            (want_step, want_attempt),
            "{seen:?}"
        );
    }
    // A `step` span per step (its retries under one), child of the saga span.
    let steps: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "step")
        .collect();
    let mut step_names: Vec<String> = steps
        .iter()
        .map(|s| attr(&s.attributes, "step").unwrap_or_default())
        .collect();
    step_names.sort();
    assert_eq!(step_names, ["charge", "reserve"], "one step span per step");
    for step in &steps {
        assert_eq!(
            attr(&step.attributes, "saga_id").as_deref(),
            Some(&*saga_id),
            "a step span carries its saga's id"
        );
        let saga = sagas
            .iter()
            .find(|s| s.span_id == step.parent_span_id)
            .unwrap_or_else(|| panic!("the parent of {step:?} is not a saga span"));
        assert_eq!(step.trace_id, saga.trace_id, "one trace per saga run");
    }
    for attempt in &attempts {
        assert_eq!(
            attr(&attempt.attributes, "saga_id").as_deref(),
            Some(&*saga_id),
            "an attempt span carries its saga's id"
        );
        let parent = steps
            .iter()
            .find(|s| s.span_id == attempt.parent_span_id)
            .unwrap_or_else(|| panic!("the parent of {attempt:?} is not a step span"));
        assert_eq!(
            attr(&parent.attributes, "step"),
            attr(&attempt.attributes, "step"),
            "an attempt under its own step"
        );
        assert_eq!(attempt.trace_id, parent.trace_id, "one trace per saga run");
    }
}
