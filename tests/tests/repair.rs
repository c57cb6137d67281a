//! Operator repairs: each is recorded with who and why, goes through the same checks
//! as everything else, and moves the saga on; a repair that would break a guarantee is
//! refused and writes nothing.

use std::sync::Arc;
use std::time::Duration;

use sagaflow::machine::{Event, Repair};
use sagaflow::store::MemLog;
use sagaflow::{Error, ParkKind, Phase, SagaOutcome, SagaStatus, Timestamp, TokioClock};
use sagaflow_tests::*;
use serde_json::json;

fn operator_actions(
    engine: &sagaflow::Engine,
    id: sagaflow::SagaId,
) -> Vec<(String, String, String)> {
    engine
        .history(id)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            Event::OperatorAction {
                action,
                operator,
                reason,
            } => Some((action.name().to_string(), operator, reason)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_parked_compensation_is_resumed_and_finishes() {
    let ledger = Ledger::new();
    ledger.script("order", Phase::Action, [Outcome::Rejected]);
    ledger.script("inventory", Phase::Compensation, [Outcome::Rejected]);
    let engine = memory_engine(checkout(&ledger)).await;
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    let SagaOutcome::Parked { reason } = engine.wait(id).await.unwrap() else {
        panic!("expected parked");
    };
    assert_eq!(reason.kind, ParkKind::CompensationFailed);

    let meta = engine
        .repair(id, Repair::Resume, "ana", "warehouse API fixed")
        .await
        .unwrap();
    assert_eq!(meta.status, SagaStatus::Compensating);
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    assert_eq!(
        operator_actions(&engine, id),
        [("resume".into(), "ana".into(), "warehouse API fixed".into())]
    );
    // The inventory compensation ran again under its one key, then payment's.
    let inv = ledger.calls_of(id, "inventory", Phase::Compensation);
    assert_eq!(inv.len(), 2);
    assert_eq!(inv[0].0, inv[1].0);
    assert_eq!(ledger.calls_of(id, "payment", Phase::Compensation).len(), 1);
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_step_after_the_pivot_is_skipped_or_resumed() {
    let ledger = Ledger::new();
    ledger.script(
        "notify",
        Phase::Action,
        [Outcome::Rejected, Outcome::Rejected],
    );
    let engine = memory_engine(checkout_with_pivot(&ledger)).await;
    // One saga is resumed (and fails again: parked again), then skipped.
    let id = engine
        .start("checkout-pivot", json!({}), None)
        .await
        .unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Parked { .. }
    ));
    engine
        .repair(id, Repair::Resume, "bo", "try once more")
        .await
        .unwrap();
    let SagaOutcome::Parked { reason } = engine.wait(id).await.unwrap() else {
        panic!("expected parked again");
    };
    assert_eq!(reason.kind, ParkKind::ForwardFailed);
    assert_eq!(ledger.calls_of(id, "notify", Phase::Action).len(), 2);
    // Skipping a step that is not the current one is refused.
    let err = engine
        .repair(id, Repair::SkipStep { step: 1 }, "bo", "wrong step")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RepairRefused { .. }), "{err}");
    let meta = engine
        .repair(
            id,
            Repair::SkipStep { step: 3 },
            "bo",
            "emailed the customer by hand",
        )
        .await
        .unwrap();
    assert_eq!(meta.status, SagaStatus::Running);
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    assert_eq!(
        ledger.calls_of(id, "notify", Phase::Action).len(),
        2,
        "skipped, not run"
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn compensation_cannot_be_forced_after_the_pivot() {
    let ledger = Ledger::new();
    ledger.script("notify", Phase::Action, [Outcome::Rejected]);
    let engine = memory_engine(checkout_with_pivot(&ledger)).await;
    let id = engine
        .start("checkout-pivot", json!({}), None)
        .await
        .unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Parked { .. }
    ));
    let before = engine.history(id).unwrap().len();
    let err = engine
        .repair(
            id,
            Repair::ForceCompensate,
            "cy",
            "customer asked to cancel",
        )
        .await
        .unwrap_err();
    let Error::RepairRefused { reason, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(
        reason,
        "step `order` (a pivot) has started: past the pivot a saga can only go forward"
    );
    assert_eq!(err.code(), "SAGA-0012");
    assert_eq!(engine.history(id).unwrap().len(), before, "nothing written");
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retry_now_and_force_compensation_reach_a_running_saga() {
    let ledger = Ledger::new();
    ledger.script(
        "inventory",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(3600))],
    );
    ledger.script(
        "order",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(3600))],
    );
    let clock = Arc::new(TokioClock::starting_at(Timestamp::from_millis(1_000_000)));
    let engine = paused_builder(clock.clone())
        .register(checkout(&ledger))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    ledger.wait_for_call(id, "inventory", Phase::Action).await;
    while engine.status(id).unwrap().due.is_none() {
        tokio::task::yield_now().await;
    }
    let due = engine.status(id).unwrap().due.unwrap();
    let err = engine
        .repair(id, Repair::RetryNow { step: None }, "di", "")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::RepairRefused { .. }),
        "a running saga too: {err}"
    );
    engine
        .repair(
            id,
            Repair::RetryNow { step: None },
            "di",
            "the 429 window is over",
        )
        .await
        .unwrap();
    ledger.wait_for_call(id, "order", Phase::Action).await;
    assert!(
        clock_now(&clock) < due,
        "retried before the timer would have fired"
    );
    // Now order waits an hour; the operator gives up on it.
    while engine.status(id).unwrap().due.is_none() {
        tokio::task::yield_now().await;
    }
    let err = engine
        .repair(id, Repair::Resume, "di", "not parked")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RepairRefused { .. }));
    let meta = engine
        .repair(
            id,
            Repair::ForceCompensate,
            "di",
            "order service is down for the day",
        )
        .await
        .unwrap();
    assert_eq!(meta.status, SagaStatus::Compensating);
    let SagaOutcome::Compensated { reason } = engine.wait(id).await.unwrap() else {
        panic!("expected compensated");
    };
    assert_eq!(reason, "forced by di: order service is down for the day");
    // order was started (it may have taken effect), so it is compensated too.
    assert_eq!(ledger.calls_of(id, "order", Phase::Compensation).len(), 1);
    assert_eq!(
        operator_actions(&engine, id)
            .into_iter()
            .map(|a| a.0)
            .collect::<Vec<_>>(),
        ["retry_now", "force_compensate"]
    );
    engine.shutdown().await.unwrap();
}

fn clock_now(clock: &TokioClock) -> Timestamp {
    use sagaflow::Clock;
    clock.now()
}

#[tokio::test]
async fn a_saga_marked_resolved_is_final_and_no_longer_driven() {
    let ledger = Ledger::new();
    ledger.script("order", Phase::Action, [Outcome::Rejected]);
    ledger.script("payment", Phase::Compensation, [Outcome::Rejected]);
    let store = Arc::new(MemLog::new());
    let engine = builder()
        .register(checkout(&ledger))
        .open_with(store.clone())
        .await
        .unwrap();
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Parked { .. }
    ));
    let err = engine
        .repair(id, Repair::MarkResolved, "ed", " ")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::RepairRefused { .. }),
        "a reason is required"
    );
    let meta = engine
        .repair(id, Repair::MarkResolved, "ed", "refunded by bank transfer")
        .await
        .unwrap();
    assert_eq!(meta.status, SagaStatus::Resolved);
    assert_eq!(
        meta.reason.as_deref(),
        Some("resolved by ed: refunded by bank transfer")
    );
    assert_eq!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Resolved {
            operator: "ed".into(),
            reason: "refunded by bank transfer".into()
        }
    );
    let err = engine
        .repair(id, Repair::Resume, "ed", "oops")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RepairRefused { .. }));
    assert!(engine.list(SagaStatus::Parked).unwrap().is_empty());
    assert_eq!(engine.list(SagaStatus::Resolved).unwrap().len(), 1);
    engine.shutdown().await.unwrap();
    // After a restart it stays resolved: nothing to resume.
    let engine = builder()
        .register(checkout(&ledger))
        .open_with(store)
        .await
        .unwrap();
    assert_eq!(engine.recovery().resumed, 0);
    assert_eq!(engine.state(id).unwrap().status, SagaStatus::Resolved);
    assert!(matches!(
        engine
            .repair(
                sagaflow::SagaId::from_bytes([9; 16]),
                Repair::Resume,
                "ed",
                "x"
            )
            .await,
        Err(Error::UnknownSaga(_))
    ));
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_saga_parked_for_its_definition_resumes_once_it_is_registered() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    let id = interrupted_checkout(store.clone(), &ledger).await;
    // Opened without the definition: parked.
    let engine = builder().open_with(store.clone()).await.unwrap();
    assert_eq!(engine.recovery().parked.len(), 1);
    let err = engine
        .repair(id, Repair::Resume, "fay", "deployed")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not registered"), "{err}");
    engine.shutdown().await.unwrap();
    // With it: resume.
    let engine = builder()
        .register(checkout(&ledger))
        .open_with(store)
        .await
        .unwrap();
    engine
        .repair(id, Repair::Resume, "fay", "deployed v1 again")
        .await
        .unwrap();
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    engine.shutdown().await.unwrap();
}
