//! What operators see: metrics after a known scenario, stuck sagas, and the offline
//! admin tools on a real data directory.

use std::sync::Arc;
use std::time::Duration;

use sagaflow::admin::{Admin, ListFilter};
use sagaflow::machine::Repair;
use sagaflow::store::MemLog;
use sagaflow::{
    CommitMode, EngineOptions, Error, Phase, RetryPolicy, SagaDefinition, SagaOutcome, SagaStatus,
    StepKind, StepOptions, Timestamp, TokioClock,
};
use sagaflow_tests::*;
use serde_json::json;

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric `{line_start}` in:\n{text}"))
}

#[tokio::test]
async fn metrics_count_a_known_scenario() {
    let ledger = Ledger::new();
    ledger.script_tagged("ok", "payment", Phase::Action, [Outcome::Retryable]);
    ledger.script_tagged("undo", "order", Phase::Action, [Outcome::Rejected]);
    ledger.script_tagged("stuck", "order", Phase::Action, [Outcome::Rejected]);
    ledger.script_tagged("stuck", "payment", Phase::Compensation, [Outcome::Rejected]);
    let engine = memory_engine(checkout(&ledger)).await;
    for tag in ["ok", "undo", "stuck"] {
        let id = engine
            .start("checkout", json!({ "tag": tag }), None)
            .await
            .unwrap();
        engine.wait(id).await.unwrap();
    }
    let text = engine.metrics_text();
    let c = |s: &str| metric(&text, s);
    assert_eq!(
        c("sagaflow_sagas_started_total{definition=\"checkout\"}"),
        3.0
    );
    for outcome in ["completed", "compensated", "parked"] {
        let line =
            format!("sagaflow_sagas_ended_total{{definition=\"checkout\",outcome=\"{outcome}\"}}");
        assert_eq!(c(&line), 1.0, "{outcome}");
    }
    // payment: 2 attempts in "ok", 1 in each of the others.
    assert_eq!(
        c("sagaflow_step_attempts_total{definition=\"checkout\",step=\"payment\",phase=\"action\"}"),
        4.0
    );
    assert_eq!(
        c("sagaflow_step_failures_total{definition=\"checkout\",step=\"payment\",phase=\"action\",kind=\"retryable\"}"),
        1.0
    );
    assert_eq!(
        c("sagaflow_step_failures_total{definition=\"checkout\",step=\"order\",phase=\"action\",kind=\"rejected\"}"),
        2.0
    );
    assert_eq!(
        c("sagaflow_step_failures_total{definition=\"checkout\",step=\"payment\",phase=\"compensation\",kind=\"rejected\"}"),
        1.0
    );
    // Durations are observed for the two sagas that ended for good.
    assert_eq!(
        c("sagaflow_saga_duration_seconds_count{definition=\"checkout\"}"),
        2.0
    );
    assert_eq!(c("sagaflow_sagas_in_flight"), 0.0);
    assert!(c("sagaflow_group_commits_total") >= 1.0);
    // The parked saga is repaired: counted by action.
    let parked = engine
        .find(&ListFilter::default().status(SagaStatus::Parked))
        .unwrap();
    engine
        .repair(
            parked[0].id,
            Repair::MarkResolved,
            "ops",
            "refunded by hand",
        )
        .await
        .unwrap();
    let text = engine.metrics_text();
    assert_eq!(
        metric(
            &text,
            "sagaflow_repairs_total{definition=\"checkout\",outcome=\"mark_resolved\"}"
        ),
        1.0
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_saga_without_progress_is_flagged_stuck_and_a_waiting_one_is_not() {
    let ledger = Ledger::new();
    ledger.script_tagged("hangs", "payment", Phase::Action, [Outcome::Hang]);
    ledger.script_tagged(
        "waits",
        "payment",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(7200))],
    );
    let slow = StepOptions::default()
        .with_retry(RetryPolicy::default().with_attempt_timeout(Duration::from_secs(4 * 3600)));
    let def = SagaDefinition::builder("slow", 1)
        .step_with(
            "payment",
            StepKind::Compensatable,
            FakeStep {
                name: "payment",
                ledger: ledger.clone(),
            },
            slow,
        )
        .build()
        .unwrap();
    let clock = Arc::new(TokioClock::starting_at(Timestamp::from_millis(1_000_000)));
    let engine = builder()
        .clock(clock)
        // Commit on the runtime: with paused time, a commit thread would let virtual
        // time run on while the runtime waits for it.
        .options(
            EngineOptions::default()
                .with_stuck_after(Some(Duration::from_secs(600)))
                .with_commit_mode(CommitMode::RuntimeTask),
        )
        .register(def)
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let hangs = engine
        .start("slow", json!({"tag": "hangs"}), None)
        .await
        .unwrap();
    let waits = engine
        .start("slow", json!({"tag": "waits"}), None)
        .await
        .unwrap();
    ledger.wait_for_call(hangs, "payment", Phase::Action).await;
    ledger.wait_for_call(waits, "payment", Phase::Action).await;
    assert!(engine
        .find(&ListFilter::default().stuck_for(Duration::from_secs(600)))
        .unwrap()
        .is_empty());
    // Eleven virtual minutes later.
    tokio::time::sleep(Duration::from_secs(11 * 60)).await;
    let stuck = engine
        .find(&ListFilter::default().stuck_for(Duration::from_secs(600)))
        .unwrap();
    assert_eq!(stuck.iter().map(|m| m.id).collect::<Vec<_>>(), [hangs]);
    let text = engine.metrics_text();
    assert_eq!(metric(&text, "sagaflow_stuck_sagas"), 1.0);
    assert_eq!(metric(&text, "sagaflow_sagas_in_flight"), 2.0);
    assert!(metric(&text, "sagaflow_oldest_active_saga_age_seconds") >= 660.0);
    let stats = engine.stats(Duration::from_secs(600)).unwrap();
    assert_eq!(stats.stuck, 1);
    assert_eq!(stats.waiting_for_retry, 1);
    assert_eq!(stats.by_status["running"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_admin_lists_and_repairs_a_stopped_engine_directory() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::new();
    ledger.script("order", Phase::Action, [Outcome::Rejected]);
    ledger.script("inventory", Phase::Compensation, [Outcome::Rejected]);
    let engine = builder()
        .register(checkout(&ledger))
        .open(dir.path())
        .await
        .unwrap();
    let parked = engine.start("checkout", json!({}), None).await.unwrap();
    let done = engine
        .start("checkout", json!({"tag": "fine"}), None)
        .await
        .unwrap();
    engine.wait(parked).await.unwrap();
    engine.wait(done).await.unwrap();
    // While the engine runs, the directory is locked: talk to its API instead.
    let path = dir.path().to_path_buf();
    let locked = tokio::task::spawn_blocking(move || Admin::open(path).map(|_| ()))
        .await
        .unwrap();
    assert!(matches!(locked, Err(Error::Store(_))), "{locked:?}");
    engine.shutdown().await.unwrap();
    drop(engine); // lets go of the directory

    let path = dir.path().to_path_buf();
    let meta = tokio::task::spawn_blocking(move || {
        let admin = Admin::open(&path).unwrap();
        let listed = admin
            .list(&ListFilter::default().status(SagaStatus::Parked))
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(admin.stats(Duration::from_secs(60)).unwrap().total, 2);
        let err = admin
            .repair(
                parked,
                Repair::ForceCompensate,
                "gus",
                "already compensating",
            )
            .unwrap_err();
        assert!(matches!(err, Error::RepairRefused { .. }), "{err}");
        admin
            .repair(parked, Repair::Resume, "gus", "inventory fixed overnight")
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(meta.status, SagaStatus::Compensating);

    // The engine picks it up at its next start.
    let engine = builder()
        .register(checkout(&ledger))
        .open(dir.path())
        .await
        .unwrap();
    assert_eq!(engine.recovery().resumed, 1);
    assert!(matches!(
        engine.wait(parked).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    engine.shutdown().await.unwrap();
}
