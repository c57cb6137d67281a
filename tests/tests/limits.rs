//! Payload and message limits (G8): what the engine writes it can always read back, and
//! nothing a step or caller hands over grows a record without bound.

use std::sync::Arc;

use async_trait::async_trait;
use sagaflow::machine::{Event, Repair};
use sagaflow::store::MemLog;
use sagaflow::{
    Compensate, Error, FailureKind, SagaDefinition, SagaOutcome, Step, StepContext, StepError,
    MAX_MESSAGE_BYTES,
};
use sagaflow_tests::*;
use serde_json::{json, Value};

fn nested(levels: usize) -> Value {
    let mut v = Value::Null;
    for _ in 0..levels {
        v = Value::Array(vec![v]);
    }
    v
}

/// Drops a value too deep for the recursive destructor on this test's stack.
fn dispose(v: Value) {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(a) => stack.extend(a),
            Value::Object(o) => stack.extend(o.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

/// A step whose output, error or panic is chosen by the saga input's `do`.
struct Hostile;

#[async_trait]
impl Step for Hostile {
    type Input = Value;
    type Output = Value;

    async fn execute(&self, _ctx: &StepContext, input: Value) -> Result<Value, StepError> {
        match input.get("do").and_then(Value::as_str) {
            Some("deep") => Ok(nested(120)),
            Some("huge-error") => Err(StepError::rejected("e".repeat(20 << 20))),
            Some("huge-panic") => panic!("{}", "p".repeat(1 << 20)),
            _ => Ok(json!("ok")),
        }
    }
}

#[async_trait]
impl Compensate for Hostile {
    async fn compensate(
        &self,
        _: &StepContext,
        _: Value,
        _: Option<Value>,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

fn def() -> SagaDefinition {
    SagaDefinition::builder("hostile", 1)
        .step("first", Hostile)
        .step("second", Hostile)
        .build()
        .unwrap()
}

#[tokio::test]
async fn inputs_too_deep_to_read_back_are_refused_before_anything_is_written() {
    let store = Arc::new(MemLog::new());
    let engine = builder()
        .register(def())
        .open_with(store.clone())
        .await
        .unwrap();
    for levels in [65, 150, 2_000] {
        // Not `json!`, which would copy the value through a recursive `to_value`.
        let mut input = json!({ "x": null });
        input["x"] = nested(levels);
        let err = engine.start("hostile", &input, None).await.unwrap_err();
        dispose(input);
        assert!(matches!(err, Error::PayloadTooDeep { limit: 64 }), "{err}");
        assert_eq!(err.code(), "SAGA-0013");
    }
    // 100,000 levels (built and dropped without recursion here): refused without the
    // serializer recursing that deep, which would overflow the stack.
    let mut deep = json!({ "x": null });
    deep["x"] = nested(100_000);
    let err = engine.start("hostile", &deep, None).await.unwrap_err();
    dispose(deep);
    assert!(matches!(err, Error::PayloadTooDeep { .. }), "{err}");
    assert!(store.dump().is_empty(), "nothing was written");

    // At the limit: accepted, and its log reads back after a reopen.
    let mut at_limit = json!({ "x": null });
    at_limit["x"] = nested(63);
    let id = engine.start("hostile", &at_limit, None).await.unwrap();
    engine.wait(id).await.unwrap();
    drop(engine);
    let engine = builder().register(def()).open_with(store).await.unwrap();
    assert!(engine.history(id).is_ok());
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_output_too_deep_fails_its_attempt_and_the_saga_compensates() {
    let engine = memory_engine(def()).await;
    let id = engine
        .start("hostile", json!({ "do": "deep" }), None)
        .await
        .unwrap();
    let outcome = engine.wait(id).await.unwrap();
    assert!(
        matches!(outcome, SagaOutcome::Compensated { .. }),
        "{outcome:?}"
    );
    let failed = engine
        .history(id)
        .unwrap()
        .into_iter()
        .find_map(|r| match r.event {
            Event::StepFailed { kind, error, .. } => Some((kind, error)),
            _ => None,
        })
        .unwrap();
    // The action ran; only its output cannot be recorded: unknown, so compensated.
    assert_eq!(failed.0, FailureKind::Unknown);
    assert!(failed.1.contains("deeper than 100 levels"), "{}", failed.1);
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn huge_error_and_panic_messages_are_stored_cut() {
    let engine = memory_engine(def()).await;
    for what in ["huge-error", "huge-panic"] {
        let id = engine
            .start("hostile", json!({ "do": what }), None)
            .await
            .unwrap();
        engine.wait(id).await.unwrap();
        let error = engine
            .history(id)
            .unwrap()
            .into_iter()
            .find_map(|r| match r.event {
                Event::StepFailed { error, .. } => Some(error),
                _ => None,
            })
            .unwrap();
        assert!(
            error.len() <= MAX_MESSAGE_BYTES,
            "{what}: {} bytes",
            error.len()
        );
        assert!(error.contains("bytes in all]"), "{what}");
    }
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_operator_reason_longer_than_the_limit_is_refused() {
    let ledger = Ledger::new();
    ledger.script("payment", sagaflow::Phase::Action, [Outcome::Rejected]);
    ledger.script(
        "payment",
        sagaflow::Phase::Compensation,
        [Outcome::Rejected; 10],
    );
    let engine = memory_engine(checkout(&ledger)).await;
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    engine.wait(id).await.unwrap();
    let err = engine
        .repair(id, Repair::MarkResolved, "ops", &"why".repeat(2_000))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RepairRefused { .. }), "{err}");
    engine.shutdown().await.unwrap();
}
