//! JSON log lines carry the saga's correlation id, and no secret.

use std::io::Write;
use std::sync::{Arc, Mutex};

use sagaflow::store::MemLog;
use sagaflow::Phase;
use sagaflow_tests::*;
use serde_json::{json, Value};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `work` on a runtime of its own with JSON logs (with their spans) captured: its
/// result, and the log's text.
fn logged<T>(work: impl std::future::Future<Output = T>) -> (T, String) {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(true)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(work);
    let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    (result, out)
}

#[test]
fn every_line_of_a_saga_carries_its_id_definition_and_attempt() {
    let (id, out) = logged(async {
        let ledger = Ledger::new();
        ledger.script("inventory", Phase::Action, [Outcome::Retryable]);
        let engine = builder()
            .register(checkout(&ledger))
            .open_with(Arc::new(MemLog::new()))
            .await
            .unwrap();
        let id = engine
            .start("checkout", json!({"card": "4242-secret"}), None)
            .await
            .unwrap();
        engine.wait(id).await.unwrap();
        engine.shutdown().await.unwrap();
        id
    });
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let of_saga: Vec<&Value> = lines
        .iter()
        .filter(|l| l["span"]["saga_id"] == json!(id.to_string()))
        .collect();
    assert!(
        of_saga.iter().any(|l| l["message"] == "saga completed"),
        "{out}"
    );
    let failure = of_saga
        .iter()
        .find(|l| l["message"] == "attempt failed")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(failure["span"]["definition"], "checkout");
    assert_eq!(failure["step"], "inventory");
    assert_eq!(failure["attempt"], 1);
    assert!(!out.contains("4242-secret"), "the saga input is not logged");
}

/// What a step logs runs inside its attempt's span, inside its saga's span: the step's
/// own lines carry the saga's id too (each attempt runs in a task of its own).
#[test]
fn what_a_step_logs_carries_its_sagas_id() {
    use sagaflow::{async_trait, Compensate, SagaDefinition, Step, StepContext, StepError};

    struct Chatty;

    #[async_trait]
    impl Step for Chatty {
        type Input = Value;
        type Output = ();
        async fn execute(&self, _: &StepContext, _: Value) -> Result<(), StepError> {
            tracing::info!("inside the step");
            Ok(())
        }
    }

    #[async_trait]
    impl Compensate for Chatty {
        async fn compensate(
            &self,
            _: &StepContext,
            _: Value,
            _: Option<()>,
        ) -> Result<(), StepError> {
            Ok(())
        }
    }

    let (id, out) = logged(async {
        let def = SagaDefinition::builder("chatty", 1)
            .parallel(|g| g.step("a", Chatty).step("b", Chatty))
            .build()
            .unwrap();
        let engine = builder()
            .register(def)
            .open_with(Arc::new(MemLog::new()))
            .await
            .unwrap();
        let id = engine.start("chatty", json!({}), None).await.unwrap();
        engine.wait(id).await.unwrap();
        engine.shutdown().await.unwrap();
        id
    });
    let inside: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "inside the step")
        .collect();
    assert_eq!(inside.len(), 2, "{out}");
    for line in inside {
        let spans = line["spans"].as_array().cloned().unwrap_or_default();
        assert!(
            spans.iter().any(|s| s["saga_id"] == json!(id.to_string())),
            "{line}"
        );
        assert!(spans.iter().any(|s| s["name"] == "attempt"), "{line}");
    }
}
