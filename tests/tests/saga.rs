//! Behaviour of one engine run: success, compensation, retries, pivot, parking, start keys.

use std::sync::Arc;
use std::time::Duration;

use sagaflow::machine::Event;
use sagaflow::store::MemLog;
use sagaflow::{
    Error, FailureKind, Idempotence, ParkKind, Phase, SagaOutcome, SagaStatus, StartKey, Started,
    Timestamp, TokioClock,
};
use sagaflow_tests::*;
use serde_json::json;

const STEPS: [&str; 3] = ["payment", "inventory", "order"];

#[tokio::test]
async fn all_steps_succeed() {
    let ledger = Ledger::new();
    let engine = memory_engine(checkout(&ledger)).await;
    let id = engine
        .start("checkout", json!({"cents": 500}), None)
        .await
        .unwrap();
    let outcome = engine.wait(id).await.unwrap();
    let SagaOutcome::Completed { outputs } = outcome else {
        panic!("expected completed, got {outcome:?}");
    };
    assert_eq!(outputs.len(), 3);
    assert_eq!(
        ledger.effects_of(id),
        STEPS.map(|s| (s.to_string(), Phase::Action)).to_vec()
    );
    assert_eq!(
        event_names(&engine, id),
        [
            "started",
            "step_attempt_started",
            "step_succeeded",
            "step_attempt_started",
            "step_succeeded",
            "step_attempt_started",
            "step_succeeded",
            "completed"
        ]
    );
    let meta = engine.status(id).unwrap();
    assert_eq!(meta.status, SagaStatus::Completed);
    assert_eq!(engine.list(SagaStatus::Completed).unwrap().len(), 1);
    assert!(engine.list(SagaStatus::Running).unwrap().is_empty());
    // Idempotency keys are derived from (saga, step, phase) only.
    for (step, _) in ledger.effects_of(id) {
        let calls = ledger.calls_of(id, &step, Phase::Action);
        assert_eq!(calls, vec![(format!("{id}/{step}/action"), 1)]);
    }
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rejected_step_is_not_compensated_the_steps_before_it_are_in_reverse() {
    for failing in 0..3 {
        let ledger = Ledger::new();
        ledger.script(STEPS[failing], Phase::Action, [Outcome::Rejected]);
        let engine = memory_engine(checkout(&ledger)).await;
        let id = engine.start("checkout", json!({}), None).await.unwrap();
        let outcome = engine.wait(id).await.unwrap();
        let SagaOutcome::Compensated { reason } = outcome else {
            panic!("step {failing}: expected compensated, got {outcome:?}");
        };
        assert!(reason.contains(STEPS[failing]), "{reason}");
        assert!(reason.contains("rejected"), "{reason}");
        // Forward effects of the steps before the failing one, then their compensations
        // in reverse; the rejected step took no effect and is not compensated.
        let mut expected: Vec<(String, Phase)> = STEPS[..failing]
            .iter()
            .map(|s| (s.to_string(), Phase::Action))
            .collect();
        expected.extend(
            STEPS[..failing]
                .iter()
                .rev()
                .map(|s| (s.to_string(), Phase::Compensation)),
        );
        assert_eq!(ledger.effects_of(id), expected, "failing step {failing}");
        assert!(ledger
            .calls_of(id, STEPS[failing], Phase::Compensation)
            .is_empty());
        // Steps after the failing one were never called at all.
        for s in &STEPS[failing + 1..] {
            assert!(ledger.calls_of(id, s, Phase::Action).is_empty());
            assert!(ledger.calls_of(id, s, Phase::Compensation).is_empty());
        }
        assert_eq!(engine.status(id).unwrap().status, SagaStatus::Compensated);
        engine.shutdown().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_step_whose_outcome_stays_unknown_is_compensated_itself_after_its_deadline() {
    for failing in 0..3 {
        let ledger = Ledger::new();
        // Four attempts (the policy's limit), each of unknown outcome.
        ledger.script(STEPS[failing], Phase::Action, [Outcome::Unknown; 4]);
        let clock = Arc::new(TokioClock::starting_at(Timestamp::from_millis(1_000_000)));
        let engine = paused_builder(clock.clone())
            .register(checkout(&ledger))
            .open_with(Arc::new(MemLog::new()))
            .await
            .unwrap();
        let id = engine.start("checkout", json!({}), None).await.unwrap();
        let outcome = engine.wait(id).await.unwrap();
        assert!(
            matches!(outcome, SagaOutcome::Compensated { .. }),
            "{outcome:?}"
        );
        // Every started step is undone, the failing one included, in reverse.
        let undone: Vec<String> = ledger
            .calls()
            .into_iter()
            .filter(|c| c.phase == Phase::Compensation)
            .map(|c| c.step)
            .collect();
        let want: Vec<String> = STEPS[..=failing]
            .iter()
            .rev()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(undone, want, "failing step {failing}");
        // Not before the last attempt's deadline: nothing it sent can land after its undo.
        let history = engine.history(id).unwrap();
        let deadline = history
            .iter()
            .rev()
            .find_map(|r| match r.event {
                Event::StepAttemptStarted { deadline, .. } => Some(deadline),
                _ => None,
            })
            .unwrap();
        let began = history
            .iter()
            .find(|r| matches!(r.event, Event::CompensationBegan { .. }))
            .unwrap();
        assert!(
            began.at >= deadline,
            "compensation began at {} before {deadline}",
            began.at
        );
        engine.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn transient_failures_retry_with_the_same_key() {
    let ledger = Ledger::new();
    ledger.script(
        "payment",
        Phase::Action,
        [Outcome::Retryable, Outcome::Retryable],
    );
    let engine = memory_engine(checkout(&ledger)).await;
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    let calls = ledger.calls_of(id, "payment", Phase::Action);
    let key = format!("{id}/payment/action");
    assert_eq!(
        calls,
        vec![(key.clone(), 1), (key.clone(), 2), (key.clone(), 3)]
    );
    assert_eq!(ledger.applications()[&key], 1);
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn exhausted_retries_compensate() {
    let ledger = Ledger::new();
    ledger.script("inventory", Phase::Action, [Outcome::Retryable; 4]);
    let engine = memory_engine(checkout(&ledger)).await;
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    assert_eq!(ledger.calls_of(id, "inventory", Phase::Action).len(), 4);
    let state = engine.state(id).unwrap();
    assert_eq!(state.steps[1].compensation.attempts(), 1);
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_respected_and_recorded() {
    let ledger = Ledger::new();
    ledger.script(
        "inventory",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(3600))],
    );
    let clock = Arc::new(TokioClock::starting_at(Timestamp::from_millis(
        1_700_000_000_000,
    )));
    let engine = paused_builder(clock)
        .register(checkout(&ledger))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    let history = engine.history(id).unwrap();
    let failed = history
        .iter()
        .find_map(|r| match &r.event {
            sagaflow::machine::Event::StepFailed { kind, retry_at, .. } => {
                Some((r.at, *kind, *retry_at))
            }
            _ => None,
        })
        .expect("a failure");
    assert_eq!(failed.1, FailureKind::RetryAfter);
    let retry_at = failed.2.expect("a retry was scheduled");
    assert!(retry_at.duration_since(failed.0) >= Duration::from_secs(3600));
    let second_start = history
        .iter()
        .filter(|r| {
            matches!(
                r.event,
                sagaflow::machine::Event::StepAttemptStarted { step: 1, .. }
            )
        })
        .nth(1)
        .expect("a second attempt");
    assert!(
        second_start.at >= retry_at,
        "retried at {} before {}",
        second_start.at,
        retry_at
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_waiting_retry_is_visible_as_a_durable_timer() {
    let ledger = Ledger::new();
    ledger.script(
        "payment",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(60))],
    );
    let clock = Arc::new(TokioClock::starting_at(Timestamp::from_millis(1_000_000)));
    let engine = paused_builder(clock.clone())
        .register(checkout(&ledger))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    // Let the first attempt fail; the saga then waits an hour of virtual time.
    while ledger.calls_of(id, "payment", Phase::Action).is_empty()
        || engine.status(id).unwrap().due.is_none()
    {
        tokio::task::yield_now().await;
    }
    let due = engine.status(id).unwrap().due.expect("due");
    assert_eq!(engine.scheduled(due).unwrap(), vec![(due, id)]);
    assert!(engine
        .scheduled(Timestamp::from_millis(due.as_millis() - 1))
        .unwrap()
        .is_empty());
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    assert!(engine
        .scheduled(Timestamp::from_millis(u64::MAX))
        .unwrap()
        .is_empty());
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn after_the_pivot_failures_retry_forward_and_never_compensate() {
    let ledger = Ledger::new();
    // notify is retriable: the fast policy allows 4 attempts; fail 3 times, then succeed.
    ledger.script(
        "notify",
        Phase::Action,
        [Outcome::Retryable, Outcome::Panic, Outcome::Retryable],
    );
    let engine = memory_engine(checkout_with_pivot(&ledger)).await;
    let id = engine
        .start("checkout-pivot", json!({}), None)
        .await
        .unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    assert_eq!(ledger.calls_of(id, "notify", Phase::Action).len(), 4);
    assert!(ledger
        .effects_of(id)
        .iter()
        .all(|(_, phase)| *phase == Phase::Action));
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_permanent_failure_after_the_pivot_parks_without_compensating() {
    let ledger = Ledger::new();
    ledger.script("notify", Phase::Action, [Outcome::Rejected]);
    let engine = memory_engine(checkout_with_pivot(&ledger)).await;
    let id = engine
        .start("checkout-pivot", json!({}), None)
        .await
        .unwrap();
    let SagaOutcome::Parked { reason } = engine.wait(id).await.unwrap() else {
        panic!("expected parked");
    };
    assert_eq!(reason.kind, ParkKind::ForwardFailed);
    assert!(reason.message.contains("notify"), "{}", reason.message);
    assert!(ledger
        .effects_of(id)
        .iter()
        .all(|(_, p)| *p == Phase::Action));
    assert_eq!(engine.list(SagaStatus::Parked).unwrap()[0].id, id);
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failed_pivot_compensates_the_steps_before_it_but_not_itself() {
    let ledger = Ledger::new();
    ledger.script("order", Phase::Action, [Outcome::Rejected]);
    let engine = memory_engine(checkout_with_pivot(&ledger)).await;
    let id = engine
        .start("checkout-pivot", json!({}), None)
        .await
        .unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    assert_eq!(
        ledger.effects_of(id),
        vec![
            ("payment".to_string(), Phase::Action),
            ("inventory".to_string(), Phase::Action),
            ("inventory".to_string(), Phase::Compensation),
            ("payment".to_string(), Phase::Compensation),
        ]
    );
    assert!(ledger.calls_of(id, "order", Phase::Compensation).is_empty());
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_compensation_that_fails_permanently_parks_with_a_readable_reason() {
    let ledger = Ledger::new();
    ledger.script("order", Phase::Action, [Outcome::Rejected]);
    ledger.script(
        "inventory",
        Phase::Compensation,
        [Outcome::Retryable, Outcome::Rejected],
    );
    let engine = memory_engine(checkout(&ledger)).await;
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    let SagaOutcome::Parked { reason } = engine.wait(id).await.unwrap() else {
        panic!("expected parked");
    };
    assert_eq!(reason.kind, ParkKind::CompensationFailed);
    assert_eq!(
        reason.message,
        "compensation of step `inventory` failed at attempt 2: inventory refused"
    );
    // It did not skip ahead: payment was never compensated.
    assert!(ledger
        .calls_of(id, "payment", Phase::Compensation)
        .is_empty());
    let meta = engine.status(id).unwrap();
    assert_eq!(meta.status, SagaStatus::Parked);
    assert_eq!(meta.reason.as_deref(), Some(reason.message.as_str()));
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_second_start_with_the_same_key_runs_nothing() {
    let ledger = Ledger::new();
    let engine = memory_engine(checkout(&ledger)).await;
    let key = StartKey::new("order-42").unwrap();
    // Concurrent starts with one key: one saga.
    let (a, b) = tokio::join!(
        engine.start("checkout", json!({}), Some(key.clone())),
        engine.start("checkout", json!({}), Some(key.clone()))
    );
    let id = a.unwrap();
    assert_eq!(b.unwrap(), id);
    engine.wait(id).await.unwrap();
    assert_eq!(
        engine
            .start("checkout", json!({}), Some(key))
            .await
            .unwrap(),
        id
    );
    engine.wait(id).await.unwrap();
    assert_eq!(ledger.calls().len(), 3, "one call per step, once");
    assert_eq!(engine.list(SagaStatus::Completed).unwrap().len(), 1);
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_start_key_reused_with_another_input_is_refused_and_the_caller_can_tell_new_from_existing(
) {
    let ledger = Ledger::new();
    let engine = memory_engine(checkout(&ledger)).await;
    let key = StartKey::new("order-7").unwrap();
    let first = engine
        .start_once("checkout", json!({"cents": 500, "sku": "a"}), key.clone())
        .await
        .unwrap();
    assert!(first.is_new());
    // The same input, keys in another order: the same request.
    let again = engine
        .start_once("checkout", json!({"sku": "a", "cents": 500}), key.clone())
        .await
        .unwrap();
    assert_eq!(again, Started::Existing(first.id()));
    let err = engine
        .start_once("checkout", json!({"cents": 900, "sku": "a"}), key.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::StartKeyConflict { existing, .. } if *existing == first.id()),
        "{err}"
    );
    assert_eq!(err.code(), "SAGA-0016");
    // `start` refuses it the same way.
    assert!(matches!(
        engine
            .start("checkout", json!({"cents": 900}), Some(key))
            .await,
        Err(Error::StartKeyConflict { .. })
    ));
    engine.wait(first.id()).await.unwrap();
    assert_eq!(ledger.calls().len(), 3, "one saga ran, once");
    assert_eq!(
        serde_json::to_value(first).unwrap(),
        json!({"started": "new", "id": first.id()})
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_engine_is_cheap_to_clone_and_any_clone_shuts_it_down() {
    let ledger = Ledger::new();
    let engine = memory_engine(checkout(&ledger)).await;
    let clones: Vec<_> = (0..4).map(|_| engine.clone()).collect();
    let mut handles = Vec::new();
    for (i, e) in clones.into_iter().enumerate() {
        handles.push(tokio::spawn(async move {
            let id = e.start("checkout", json!({ "n": i }), None).await.unwrap();
            e.wait(id).await.unwrap()
        }));
    }
    for h in handles {
        let outcome = h.await.unwrap();
        assert!(matches!(outcome, SagaOutcome::Completed { .. }));
        // Outcomes serialize with their kind.
        assert_eq!(
            serde_json::to_value(&outcome).unwrap()["outcome"],
            "completed"
        );
    }
    let other = engine.clone();
    other.shutdown().await.unwrap();
    assert!(matches!(
        engine.start("checkout", json!({}), None).await,
        Err(Error::ShuttingDown)
    ));
}

#[tokio::test]
async fn a_panicking_step_is_a_failed_attempt_not_a_crash() {
    let ledger = Ledger::new();
    ledger.script("payment", Phase::Action, [Outcome::Panic]);
    let engine = memory_engine(checkout(&ledger)).await;
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    let failure = engine
        .history(id)
        .unwrap()
        .into_iter()
        .find_map(|r| match r.event {
            sagaflow::machine::Event::StepFailed { kind, error, .. } => Some((kind, error)),
            _ => None,
        })
        .unwrap();
    assert_eq!(failure.0, FailureKind::Panic);
    assert_eq!(failure.1, "step panicked: payment blew up");
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_attempt_past_its_timeout_fails_and_is_retried() {
    let ledger = Ledger::new();
    ledger.script("order", Phase::Action, [Outcome::Hang]);
    let engine = paused_builder(Arc::new(TokioClock::starting_at(Timestamp::from_millis(0))))
        .register(checkout(&ledger))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    let kinds: Vec<_> = engine
        .history(id)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            sagaflow::machine::Event::StepFailed { kind, .. } => Some(kind),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, [FailureKind::Timeout]);
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_non_idempotent_step_that_times_out_is_compensated_not_retried() {
    let ledger = Ledger::new();
    ledger.script("inventory", Phase::Action, [Outcome::ApplyThenHang]);
    let engine = paused_builder(Arc::new(TokioClock::starting_at(Timestamp::from_millis(0))))
        .register(checkout_with(
            &ledger,
            [
                Idempotence::Idempotent,
                Idempotence::NotIdempotent,
                Idempotence::Idempotent,
            ],
        ))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    assert_eq!(ledger.calls_of(id, "inventory", Phase::Action).len(), 1);
    assert_eq!(
        ledger.calls_of(id, "inventory", Phase::Compensation).len(),
        1
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_output_too_large_fails_the_step_and_undoes_it() {
    let ledger = Ledger::new();
    ledger.script("inventory", Phase::Action, [Outcome::Big(4096)]);
    let engine = builder()
        .options(sagaflow::EngineOptions::default().with_max_payload_bytes(1024))
        .register(checkout(&ledger))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    let SagaOutcome::Compensated { reason } = engine.wait(id).await.unwrap() else {
        panic!("expected compensated");
    };
    assert!(
        reason.contains("exceeds the limit of 1024 bytes"),
        "{reason}"
    );
    assert_eq!(
        ledger.calls_of(id, "inventory", Phase::Compensation).len(),
        1
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_starts_get_typed_errors_and_write_nothing() {
    use async_trait::async_trait;
    use sagaflow::{SagaDefinition, Step, StepContext, StepError};

    #[derive(serde::Deserialize)]
    struct Order {
        #[allow(dead_code)]
        cents: u64,
    }
    struct Typed;
    #[async_trait]
    impl Step for Typed {
        type Input = Order;
        type Output = ();
        async fn execute(&self, _: &StepContext, _: Order) -> Result<(), StepError> {
            Ok(())
        }
    }
    let store = Arc::new(MemLog::new());
    let engine = builder()
        .options(sagaflow::EngineOptions::default().with_max_payload_bytes(100))
        .register(
            SagaDefinition::builder("typed", 1)
                .pivot("t", Typed)
                .build()
                .unwrap(),
        )
        .open_with(store.clone())
        .await
        .unwrap();
    let err = engine
        .start("typed", json!({"cents": "ten"}), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { step, .. } if step == "t"),
        "{err}"
    );
    assert_eq!(err.code(), "SAGA-0005");
    let err = engine
        .start("typed", json!({"cents": 1, "pad": "y".repeat(200)}), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::PayloadTooLarge { limit: 100, .. }),
        "{err}"
    );
    let err = engine.start("nope", json!({}), None).await.unwrap_err();
    assert!(matches!(err, Error::UnknownDefinition(ref n) if n == "nope"));
    assert!(matches!(
        engine.wait(sagaflow::SagaId::from_bytes([7; 16])).await,
        Err(Error::UnknownSaga(_))
    ));
    assert_eq!(store.syncs(), 0, "nothing was written");
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sagas_share_durable_writes() {
    let ledger = Ledger::new();
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(
        builder()
            .register(checkout(&ledger))
            .open(dir.path())
            .await
            .unwrap(),
    );
    let mut handles = Vec::new();
    for _ in 0..200 {
        let e = engine.clone();
        handles.push(tokio::spawn(async move {
            let id = e.start("checkout", json!({}), None).await.unwrap();
            e.wait(id).await.unwrap()
        }));
    }
    for h in handles {
        assert!(matches!(h.await.unwrap(), SagaOutcome::Completed { .. }));
    }
    let stats = engine.commit_stats();
    // 200 sagas x (started + first attempt, 2 more attempt starts, final) = 800 writes,
    // carrying 200 x 8 = 1600 records (each step's result rides with the next write).
    assert_eq!(stats.writes, 800);
    assert_eq!(stats.records, 1600);
    assert!(
        stats.batches < stats.writes,
        "group commit should share syncs: {stats:?}"
    );
    Arc::try_unwrap(engine).unwrap().shutdown().await.unwrap();
}
