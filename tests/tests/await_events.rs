//! Await steps and the inbox (G10): an event delivered before, during or after the wait,
//! twice, or never; across a crash; approvals; deliveries no saga waits for.

use std::sync::Arc;
use std::time::Duration;

use sagaflow::machine::Event;
use sagaflow::store::{Delivered, MemLog, SagaLog};
use sagaflow::{
    Await, Engine, EngineOptions, Error, FailureKind, OnTimeout, Phase, SagaDefinition,
    SagaOutcome, SagaStatus, Timestamp, TokioClock,
};
use sagaflow_tests::*;
use serde_json::json;

const T0: u64 = 1_700_000_000_000;

thread_local! {
    /// One virtual clock per test (each test has its own thread): an engine opened
    /// after a crash goes on from the time the crashed one stopped at.
    static CLOCK: Arc<TokioClock> = Arc::new(TokioClock::starting_at(Timestamp::from_millis(T0)));
}

async fn engine(store: Arc<MemLog>, ledger: &Arc<Ledger>, on_timeout: OnTimeout) -> Engine {
    let clock = CLOCK.with(Arc::clone);
    paused_builder(clock)
        .register(paid(ledger, on_timeout))
        .options(
            EngineOptions::default()
                .with_commit_mode(sagaflow::CommitMode::RuntimeTask)
                .with_inbox_retention(Some(Duration::from_secs(24 * 3600))),
        )
        .open_with(store)
        .await
        .unwrap()
}

fn received(engine: &Engine, id: sagaflow::SagaId) -> Vec<String> {
    engine
        .history(id)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            Event::EventReceived { delivery, .. } => Some(delivery),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn an_event_that_comes_first_waits_for_its_saga() {
    let ledger = Ledger::new();
    let e = engine(Arc::new(MemLog::new()), &ledger, OnTimeout::Rejected).await;
    assert_eq!(
        e.deliver("settlement/o1", "wh-1", json!({"settled": 500}))
            .await
            .unwrap(),
        Delivered::New
    );
    let id = e.start("paid", json!({"order": "o1"}), None).await.unwrap();
    let SagaOutcome::Completed { outputs } = e.wait(id).await.unwrap() else {
        panic!("not completed");
    };
    assert_eq!(outputs["settle"], json!({"settled": 500}));
    assert_eq!(outputs["ship"], json!({"shipped_after": {"settled": 500}}));
    assert_eq!(received(&e, id), ["wh-1"]);
    // The log records the key it waited on.
    assert!(e.history(id).unwrap().iter().any(|r| matches!(
        &r.event,
        Event::Awaiting { key, .. } if key == "settlement/o1"
    )));
    // Taken: listed with its saga; a repeat is a duplicate.
    let all = e.deliveries(None, 10).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].taken_by, Some(id));
    assert_eq!(
        e.deliver("settlement/o1", "wh-1", json!({"settled": 1}))
            .await
            .unwrap(),
        Delivered::Duplicate
    );
}

#[tokio::test(start_paused = true)]
async fn an_event_during_the_wait_is_taken_once_however_often_it_comes() {
    let ledger = Ledger::new();
    let e = engine(Arc::new(MemLog::new()), &ledger, OnTimeout::Rejected).await;
    let id = e.start("paid", json!({"order": "o2"}), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(e.status(id).unwrap().status, SagaStatus::Running);
    for _ in 0..3 {
        e.deliver("settlement/o2", "wh-2", json!({"settled": 700}))
            .await
            .unwrap();
    }
    assert!(matches!(
        e.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    assert_eq!(received(&e, id), ["wh-2"]);
    assert_eq!(e.deliveries(None, 10).await.unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn no_event_by_the_deadline_fails_the_step_as_the_definition_says() {
    // Rejected: nothing happened; the payment is refunded, the wait is not undone.
    let ledger = Ledger::new();
    let e = engine(Arc::new(MemLog::new()), &ledger, OnTimeout::Rejected).await;
    let id = e.start("paid", json!({"order": "o3"}), None).await.unwrap();
    assert!(matches!(
        e.wait(id).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    assert_eq!(ledger.calls_of(id, "payment", Phase::Compensation).len(), 1);
    assert!(ledger
        .calls_of(id, "settle", Phase::Compensation)
        .is_empty());
    let failed = e
        .history(id)
        .unwrap()
        .into_iter()
        .find_map(|r| match r.event {
            Event::StepFailed { step: 1, kind, .. } => Some((kind, r.at)),
            _ => None,
        });
    let (kind, at) = failed.unwrap();
    assert_eq!(kind, FailureKind::Rejected);
    assert!(at.as_millis() >= T0 + 3_600_000);

    // Unknown: the settlement may have happened; its undo runs too.
    let ledger = Ledger::new();
    let e = engine(Arc::new(MemLog::new()), &ledger, OnTimeout::Unknown).await;
    let id = e.start("paid", json!({"order": "o4"}), None).await.unwrap();
    assert!(matches!(
        e.wait(id).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    assert_eq!(ledger.calls_of(id, "settle", Phase::Compensation).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_wait_survives_a_crash_with_its_deadline_and_its_event() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    let e = engine(store.clone(), &ledger, OnTimeout::Rejected).await;
    let id = e.start("paid", json!({"order": "o5"}), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1800)).await;
    // Accepted, durable; then the process dies before the saga takes it.
    e.deliver("settlement/o5", "wh-5", json!({"settled": 1}))
        .await
        .unwrap();
    drop(e);
    store.crash();
    let e = engine(store.clone(), &ledger, OnTimeout::Rejected).await;
    assert!(matches!(
        e.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    assert_eq!(received(&e, id), ["wh-5"]);

    // A wait interrupted by a crash keeps its deadline: an hour from when it began,
    // not from the restart.
    let id = e.start("paid", json!({"order": "o6"}), None).await.unwrap();
    let began = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(1800)).await;
    drop(e);
    store.crash();
    let e = engine(store, &ledger, OnTimeout::Rejected).await;
    assert!(matches!(
        e.wait(id).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_secs(3600) && waited < Duration::from_secs(3700),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_approval_is_a_delivery_with_who_and_why() {
    let ledger = Ledger::new();
    let e = engine(Arc::new(MemLog::new()), &ledger, OnTimeout::Rejected).await;
    let id = e.start("paid", json!({"order": "o7"}), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Not an await step, or no such step: refused.
    assert!(matches!(
        e.approve(id, "payment", "ana", "looks fine").await,
        Err(Error::InvalidDelivery(_))
    ));
    assert!(matches!(
        e.approve(id, "nope", "ana", "looks fine").await,
        Err(Error::InvalidDelivery(_))
    ));
    assert_eq!(
        e.approve(id, "settle", "ana", "settled by phone")
            .await
            .unwrap(),
        Delivered::New
    );
    assert_eq!(
        e.approve(id, "settle", "ana", "again").await.unwrap(),
        Delivered::Duplicate
    );
    let SagaOutcome::Completed { outputs } = e.wait(id).await.unwrap() else {
        panic!("not completed");
    };
    assert_eq!(
        outputs["settle"],
        json!({"approved_by": "ana", "reason": "settled by phone"})
    );
}

#[tokio::test(start_paused = true)]
async fn an_event_nobody_waits_for_is_kept_for_a_while_and_visible() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    let e = engine(store.clone(), &ledger, OnTimeout::Rejected).await;
    e.deliver("settlement/unknown", "wh-9", json!({"settled": 3}))
        .await
        .unwrap();
    let listed = e.deliveries(None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].taken_by, None);
    // Kept a day (this engine's inbox retention), then purged by the retention task.
    tokio::time::sleep(Duration::from_secs(23 * 3600)).await;
    assert_eq!(e.deliveries(None, 10).await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
    assert!(e.deliveries(None, 10).await.unwrap().is_empty());
    assert!(store
        .inbox()
        .waiting("settlement/unknown")
        .unwrap()
        .is_empty());
}

#[tokio::test(start_paused = true)]
async fn bad_deliveries_are_refused_and_write_nothing() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    let e = engine(store.clone(), &ledger, OnTimeout::Rejected).await;
    assert!(matches!(
        e.deliver("", "id", json!(1)).await,
        Err(Error::InvalidDelivery(_))
    ));
    assert!(matches!(
        e.deliver("k", &"x".repeat(300), json!(1)).await,
        Err(Error::InvalidDelivery(_))
    ));
    assert!(matches!(
        e.deliver("k", "id", json!({"blob": "x".repeat(2 << 20)}))
            .await,
        Err(Error::PayloadTooLarge { .. })
    ));
    let mut deep = json!(1);
    for _ in 0..100 {
        deep = json!([deep]);
    }
    assert!(matches!(
        e.deliver("k", "id", deep).await,
        Err(Error::PayloadTooDeep { .. })
    ));
    assert!(e.deliveries(None, 10).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_saga_waiting_for_its_event_is_not_stuck() {
    let ledger = Ledger::new();
    let e = engine(Arc::new(MemLog::new()), &ledger, OnTimeout::Rejected).await;
    let id = e.start("paid", json!({"order": "o8"}), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(30 * 60)).await;
    let meta = e.status(id).unwrap();
    let awaiting = meta.awaiting.clone().expect("waiting for its event");
    assert_eq!(awaiting.key, "settlement/o8");
    assert_eq!(
        awaiting.until.as_millis(),
        meta.created_at.as_millis() + 3_600_000
    );
    // Half an hour without a transition, with a 15-minute threshold: waiting, not stuck.
    let now = Timestamp::from_millis(meta.created_at.as_millis() + 30 * 60_000);
    assert!(!sagaflow::admin::is_stuck(
        &meta,
        now,
        Duration::from_secs(15 * 60)
    ));
    // Past its deadline with nothing happening, it would be.
    let later = Timestamp::from_millis(awaiting.until.as_millis() + 20 * 60_000);
    assert!(sagaflow::admin::is_stuck(
        &meta,
        later,
        Duration::from_secs(15 * 60)
    ));
    e.deliver("settlement/o8", "wh-8", json!({})).await.unwrap();
    e.wait(id).await.unwrap();
    assert_eq!(e.status(id).unwrap().awaiting, None);
}

#[tokio::test(start_paused = true)]
async fn shutdown_does_not_wait_for_an_await_steps_deadline_and_the_wait_goes_on_after() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    let e = engine(store.clone(), &ledger, OnTimeout::Rejected).await;
    let id = e.start("paid", json!({"order": "o9"}), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let before = tokio::time::Instant::now();
    e.shutdown().await.unwrap();
    assert!(
        before.elapsed() < Duration::from_secs(5),
        "{:?}",
        before.elapsed()
    );
    drop(e);
    let e = engine(store, &ledger, OnTimeout::Rejected).await;
    e.deliver("settlement/o9", "wh-9", json!({"ok": 1}))
        .await
        .unwrap();
    assert!(matches!(
        e.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_saga_stops_waiting_at_once() {
    let ledger = Ledger::new();
    let e = engine(Arc::new(MemLog::new()), &ledger, OnTimeout::Rejected).await;
    let id = e
        .start("paid", json!({"order": "o10"}), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let asked = tokio::time::Instant::now();
    e.cancel(id, "ana", "the customer cancelled").await.unwrap();
    assert!(matches!(
        e.wait(id).await.unwrap(),
        SagaOutcome::Cancelled { .. }
    ));
    // Not an hour later, at the wait's deadline: a wait has nothing in flight to settle.
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(ledger.calls_of(id, "payment", Phase::Compensation).len(), 1);
    assert!(ledger
        .calls_of(id, "settle", Phase::Compensation)
        .is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_wait_beside_a_branch_that_failed_is_given_up_at_once() {
    let ledger = Ledger::new();
    ledger.script("card", Phase::Action, [Outcome::Rejected]);
    let def = SagaDefinition::builder("paired", 1)
        .parallel(|g| {
            g.step("card", fake("card", &ledger))
                .options(opts())
                .await_event(
                    "approval",
                    Await::new(Duration::from_secs(3600), |_| Ok("approval/x".into())),
                )
        })
        .build()
        .unwrap();
    let clock = CLOCK.with(Arc::clone);
    let e = paused_builder(clock)
        .register(def)
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let began = tokio::time::Instant::now();
    let id = e.start("paired", json!({}), None).await.unwrap();
    assert!(matches!(
        e.wait(id).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    assert!(
        began.elapsed() < Duration::from_secs(60),
        "{:?}",
        began.elapsed()
    );
    // The wait ended rejected (it took no event): nothing of it is undone.
    let kinds: Vec<FailureKind> = e
        .history(id)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            Event::StepFailed { kind, .. } => Some(kind),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, [FailureKind::Rejected, FailureKind::Rejected]);
}

#[tokio::test(start_paused = true)]
async fn an_approval_of_a_wait_that_ended_is_refused_but_a_repeat_is_a_duplicate() {
    let ledger = Ledger::new();
    let e = engine(Arc::new(MemLog::new()), &ledger, OnTimeout::Rejected).await;
    // Settled by its webhook: approving afterwards would leave an event for nobody.
    let id = e
        .start("paid", json!({"order": "o11"}), None)
        .await
        .unwrap();
    e.deliver("settlement/o11", "wh-11", json!({}))
        .await
        .unwrap();
    e.wait(id).await.unwrap();
    assert!(matches!(
        e.approve(id, "settle", "ana", "late").await,
        Err(Error::InvalidDelivery(_))
    ));
    // Approved and taken: approving again is answered as a duplicate.
    let id = e
        .start("paid", json!({"order": "o12"}), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    e.approve(id, "settle", "ana", "ok").await.unwrap();
    e.wait(id).await.unwrap();
    assert_eq!(
        e.approve(id, "settle", "ana", "ok").await.unwrap(),
        Delivered::Duplicate
    );
    assert_eq!(e.deliveries(None, 10).await.unwrap().len(), 2);
}
