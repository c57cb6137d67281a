//! Saga lifecycle: cancellation by the caller, deadlines, delayed starts, retention of
//! finished sagas and purges. Under paused tokio time, so hours pass in microseconds.

use std::sync::Arc;
use std::time::Duration;

use sagaflow::admin::ListFilter;
use sagaflow::machine::{Event, Repair};
use sagaflow::store::MemLog;
use sagaflow::{
    Engine, EngineOptions, Error, ParkKind, Phase, Retention, SagaDefinition, SagaOutcome,
    SagaStatus, StartKey, StartOptions, Started, StepKind, Timestamp, TokioClock,
};
use sagaflow_tests::*;
use serde_json::json;

const T0: u64 = 1_700_000_000_000;

fn clock() -> Arc<TokioClock> {
    Arc::new(TokioClock::starting_at(Timestamp::from_millis(T0)))
}

fn at(ms_after_t0: u64) -> Timestamp {
    Timestamp::from_millis(T0 + ms_after_t0)
}

async fn engine_on(store: Arc<MemLog>, clock: Arc<TokioClock>, def: SagaDefinition) -> Engine {
    paused_builder(clock)
        .register(def)
        .open_with(store)
        .await
        .unwrap()
}

fn checkout_lifecycle(
    ledger: &Arc<Ledger>,
    deadline: Option<Duration>,
    keep: Retention,
) -> SagaDefinition {
    let mut b = SagaDefinition::builder("checkout", 1).retention(keep);
    for name in ["payment", "inventory", "order"] {
        b = b.step_with(name, StepKind::Compensatable, fake(name, ledger), opts());
    }
    if let Some(d) = deadline {
        b = b.deadline(d);
    }
    b.build().unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_cancel_lets_the_attempt_in_flight_settle_then_compensates_and_ends_cancelled() {
    let ledger = Ledger::new();
    // Inventory hangs until its attempt times out: the attempt in flight.
    ledger.script("inventory", Phase::Action, [Outcome::Hang]);
    let engine = engine_on(Arc::new(MemLog::new()), clock(), checkout(&ledger)).await;
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    ledger.wait_for_call(id, "inventory", Phase::Action).await;
    let meta = engine
        .cancel(id, "checkout-api", "customer cancelled")
        .await
        .unwrap();
    assert_eq!(
        meta.status,
        SagaStatus::Running,
        "recorded; compensation follows"
    );
    let outcome = engine.wait(id).await.unwrap();
    assert_eq!(
        outcome,
        SagaOutcome::Cancelled {
            operator: "checkout-api".into(),
            reason: "customer cancelled".into()
        }
    );
    // No new attempt after the cancel: inventory ran once (it timed out), the order never.
    assert_eq!(ledger.calls_of(id, "inventory", Phase::Action).len(), 1);
    assert!(ledger.calls_of(id, "order", Phase::Action).is_empty());
    // The attempt that timed out may have taken effect: it is undone, then payment.
    let undone: Vec<String> = ledger
        .calls()
        .into_iter()
        .filter(|c| c.phase == Phase::Compensation)
        .map(|c| c.step)
        .collect();
    assert_eq!(undone, ["inventory", "payment"]);
    let names = event_names(&engine, id);
    assert!(names.contains(&"cancel_requested".to_string()));
    assert_eq!(names.last().unwrap(), "cancelled");
    assert_eq!(engine.status(id).unwrap().status, SagaStatus::Cancelled);
    assert_eq!(
        engine
            .find(&ListFilter::default().status(SagaStatus::Cancelled))
            .unwrap()
            .len(),
        1
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_cancel_past_the_pivot_or_after_the_end_is_refused_and_writes_nothing() {
    let ledger = Ledger::new();
    ledger.script(
        "notify",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(600))],
    );
    let engine = engine_on(
        Arc::new(MemLog::new()),
        clock(),
        checkout_with_pivot(&ledger),
    )
    .await;
    let id = engine
        .start("checkout-pivot", json!({}), None)
        .await
        .unwrap();
    ledger.wait_for_call(id, "notify", Phase::Action).await;
    let before = engine.history(id).unwrap().len();
    let err = engine.cancel(id, "ops", "too late").await.unwrap_err();
    assert!(
        matches!(&err, Error::CancelRefused { reason, .. } if reason.contains("past the pivot")),
        "{err}"
    );
    assert_eq!(err.code(), "SAGA-0017");
    assert_eq!(engine.history(id).unwrap().len(), before, "nothing written");
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    let err = engine.cancel(id, "ops", "ended").await.unwrap_err();
    assert!(
        matches!(&err, Error::CancelRefused { reason, .. } if reason.contains("ended")),
        "{err}"
    );
    // Who and why are required, as for repairs.
    assert!(matches!(
        engine.cancel(id, "", "x").await,
        Err(Error::RepairRefused { .. })
    ));
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_deadline_cancels_a_waiting_saga_and_fires_after_a_restart() {
    let ledger = Ledger::new();
    ledger.script(
        "inventory",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(3600))],
    );
    let store = Arc::new(MemLog::new());
    let clock = clock();
    let def = || checkout_lifecycle(&ledger, Some(Duration::from_secs(60)), Retention::Forever);
    let engine = engine_on(store.clone(), clock.clone(), def()).await;
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    ledger.wait_for_call(id, "inventory", Phase::Action).await;
    // A crash while it waits an hour for its retry.
    drop(engine);
    let engine = engine_on(store.clone(), clock.clone(), def()).await;
    let outcome = engine.wait(id).await.unwrap();
    let SagaOutcome::Cancelled { operator, reason } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(operator, "deadline");
    assert!(reason.contains("deadline"), "{reason}");
    // It fired at the deadline, not at the retry an hour later.
    let history = engine.history(id).unwrap();
    let requested = history
        .iter()
        .find(|r| matches!(r.event, Event::CancelRequested { .. }))
        .unwrap();
    assert_eq!(requested.at, at(60_000));
    assert_eq!(ledger.calls_of(id, "inventory", Phase::Action).len(), 1);
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_deadline_past_the_pivot_parks_the_saga() {
    let ledger = Ledger::new();
    ledger.script(
        "notify",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(600))],
    );
    let engine = engine_on(
        Arc::new(MemLog::new()),
        clock(),
        checkout_with_pivot(&ledger),
    )
    .await;
    let id = engine
        .start_with(
            "checkout-pivot",
            json!({}),
            StartOptions::default().deadline(at(30_000)),
        )
        .await
        .unwrap()
        .id();
    let SagaOutcome::Parked { reason } = engine.wait(id).await.unwrap() else {
        panic!("expected parked");
    };
    assert_eq!(reason.kind, ParkKind::DeadlinePassed);
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_delayed_start_is_stored_at_once_and_begins_at_its_time_even_after_a_restart() {
    let ledger = Ledger::new();
    let store = Arc::new(MemLog::new());
    let clock = clock();
    let engine = engine_on(store.clone(), clock.clone(), checkout(&ledger)).await;
    let key = StartKey::new("later-1").unwrap();
    let options = StartOptions::default()
        .key(key.clone())
        .not_before(at(3_600_000));
    let first = engine
        .start_with("checkout", json!({}), options.clone())
        .await
        .unwrap();
    assert!(first.is_new());
    // Stored at once: the key deduplicates at once.
    let again = engine
        .start_with("checkout", json!({}), options)
        .await
        .unwrap();
    assert_eq!(again, Started::Existing(first.id()));
    let meta = engine.status(first.id()).unwrap();
    assert_eq!(meta.status, SagaStatus::Running);
    assert_eq!(meta.due, Some(at(3_600_000)), "its start time is its timer");
    assert_eq!(meta.starts_at, Some(at(3_600_000)), "and shown as such");
    assert!(ledger.calls().is_empty());
    drop(engine);

    let engine = engine_on(store, clock.clone(), checkout(&ledger)).await;
    assert!(matches!(
        engine.wait(first.id()).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    let history = engine.history(first.id()).unwrap();
    let first_attempt = history
        .iter()
        .find(|r| matches!(r.event, Event::StepAttemptStarted { .. }))
        .unwrap();
    assert!(
        first_attempt.at >= at(3_600_000),
        "began at {}",
        first_attempt.at
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retention_deletes_finished_sagas_only_and_only_after_their_retention() {
    let ledger = Ledger::new();
    // One saga parks (its compensation is refused), one waits ten days for its delayed
    // start (active all along), two finish.
    let store = Arc::new(MemLog::new());
    let engine = paused_builder(clock())
        .options(
            EngineOptions::default()
                .with_commit_mode(sagaflow::CommitMode::RuntimeTask)
                .with_retention_task(Some(Duration::from_secs(10)), 100),
        )
        .register(checkout_lifecycle(
            &ledger,
            None,
            Retention::For(Duration::from_secs(3600)),
        ))
        .open_with(store.clone())
        .await
        .unwrap();
    ledger.script_tagged("park", "order", Phase::Action, [Outcome::Rejected]);
    ledger.script_tagged(
        "park",
        "inventory",
        Phase::Compensation,
        [Outcome::Rejected],
    );
    let mut ids = Vec::new();
    for tag in ["done", "done", "park"] {
        ids.push(
            engine
                .start("checkout", json!({ "tag": tag }), None)
                .await
                .unwrap(),
        );
    }
    let later = StartOptions::default().not_before(at(10 * 24 * 3600 * 1000));
    ids.push(
        engine
            .start_with("checkout", json!({ "tag": "later" }), later)
            .await
            .unwrap()
            .id(),
    );
    for id in &ids[..3] {
        engine.wait(*id).await.unwrap();
    }
    // Half an hour on: nothing is old enough.
    tokio::time::sleep(Duration::from_secs(1800)).await;
    assert_eq!(engine.find(&ListFilter::default()).unwrap().len(), 4);
    // Two hours on: the two finished sagas are gone, with every key they had.
    tokio::time::sleep(Duration::from_secs(5400)).await;
    let left: Vec<_> = engine
        .find(&ListFilter::default())
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.status))
        .collect();
    assert_eq!(
        left,
        vec![(ids[2], SagaStatus::Parked), (ids[3], SagaStatus::Running)]
    );
    for id in &ids[..2] {
        assert!(matches!(engine.status(*id), Err(Error::UnknownSaga(_))));
        assert!(store
            .dump()
            .iter()
            .all(|(k, _)| !k.windows(16).any(|w| w == id.as_bytes())));
    }
    assert!(engine
        .metrics_text()
        .contains("sagaflow_sagas_deleted_total 2"));
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn forever_means_forever_and_purge_counts_before_it_deletes() {
    let ledger = Ledger::new();
    ledger.script_tagged("park", "order", Phase::Action, [Outcome::Rejected]);
    ledger.script_tagged(
        "park",
        "inventory",
        Phase::Compensation,
        [Outcome::Rejected],
    );
    let engine = paused_builder(clock())
        .options(
            EngineOptions::default()
                .with_commit_mode(sagaflow::CommitMode::RuntimeTask)
                .with_stuck_after(None)
                .with_retention_task(Some(Duration::from_secs(3600)), 100),
        )
        .register(checkout_lifecycle(&ledger, None, Retention::Forever))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for tag in ["a", "b", "park"] {
        let id = engine
            .start("checkout", json!({ "tag": tag }), None)
            .await
            .unwrap();
        engine.wait(id).await.unwrap();
        ids.push(id);
    }
    // Sixty days on, the retention task has deleted nothing.
    tokio::time::sleep(Duration::from_secs(60 * 24 * 3600)).await;
    assert_eq!(engine.find(&ListFilter::default()).unwrap().len(), 3);
    let now = at(61 * 24 * 3600 * 1000);
    let dry = engine.purge(now, true).await.unwrap();
    assert_eq!((dry.matched, dry.deleted), (2, 0));
    assert_eq!(engine.find(&ListFilter::default()).unwrap().len(), 3);
    let done = engine.purge(now, false).await.unwrap();
    assert_eq!((done.matched, done.deleted), (2, 2));
    let left = engine.find(&ListFilter::default()).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(
        left[0].status,
        SagaStatus::Parked,
        "a parked saga is never purged"
    );
    // A resolved saga is finished: purged like the others.
    engine
        .repair(ids[2], Repair::MarkResolved, "ops", "refunded by hand")
        .await
        .unwrap();
    let after = engine
        .purge(at(90 * 24 * 3600 * 1000), false)
        .await
        .unwrap();
    assert_eq!(after.deleted, 1);
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_cancel_wakes_a_saga_waiting_an_hour_for_its_retry_and_a_delayed_start_can_be_cancelled()
{
    let ledger = Ledger::new();
    ledger.script_tagged(
        "wait",
        "inventory",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(3600))],
    );
    let engine = engine_on(Arc::new(MemLog::new()), clock(), checkout(&ledger)).await;
    let waiting = engine
        .start("checkout", json!({"tag": "wait"}), None)
        .await
        .unwrap();
    ledger
        .wait_for_call(waiting, "inventory", Phase::Action)
        .await;
    let later = engine
        .start_with(
            "checkout",
            json!({"tag": "later"}),
            StartOptions::default().not_before(at(24 * 3600 * 1000)),
        )
        .await
        .unwrap()
        .id();
    engine
        .cancel(waiting, "api", "changed my mind")
        .await
        .unwrap();
    engine.cancel(later, "api", "never mind").await.unwrap();
    for id in [waiting, later] {
        assert!(matches!(
            engine.wait(id).await.unwrap(),
            SagaOutcome::Cancelled { .. }
        ));
    }
    // Neither waited for its timer: both ended within the first minute of virtual time.
    for id in [waiting, later] {
        let end = engine.history(id).unwrap().last().unwrap().at;
        assert!(end < at(60_000), "ended at {end}");
    }
    // The waiting one had charged: undone. The delayed one never ran a step.
    assert_eq!(
        ledger
            .calls_of(waiting, "payment", Phase::Compensation)
            .len(),
        1
    );
    assert!(ledger
        .calls()
        .iter()
        .all(|c| !c.key.starts_with(&later.to_string())));
    engine.shutdown().await.unwrap();
}
