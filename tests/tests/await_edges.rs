//! Edges of await steps found in review: an event accepted in time but not yet seen at
//! the deadline, an event after the deadline found after a restart, compensation forced
//! while a saga waits, and a NUL byte in a key, refused alike by every store.

use std::sync::Arc;
use std::time::Duration;

use sagaflow::machine::{Event, Repair};
use sagaflow::store::{MemLog, OwnerId, SagaLog};
use sagaflow::{
    Clock, CommitMode, Engine, EngineOptions, FailureKind, OnTimeout, SagaOutcome, Timestamp,
    TokioClock,
};
use sagaflow_tests::*;
use serde_json::json;

const T0: u64 = 1_700_000_000_000;

fn clock() -> Arc<dyn Clock> {
    Arc::new(TokioClock::starting_at(Timestamp::from_millis(T0)))
}

async fn shared_engine(
    name: &str,
    store: Arc<MemLog>,
    clock: &Arc<dyn Clock>,
    ledger: &Arc<Ledger>,
) -> Engine {
    Engine::builder()
        .register(paid(ledger, OnTimeout::Rejected))
        .clock(clock.clone())
        .seed(7)
        .owner(OwnerId::new(name))
        .options(EngineOptions::default().with_commit_mode(CommitMode::RuntimeTask))
        .open_with(store)
        .await
        .unwrap()
}

async fn sleep_until(clock: &Arc<dyn Clock>, t: Timestamp) {
    let now = clock.now();
    if t > now {
        tokio::time::sleep(t.duration_since(now)).await;
    }
}

fn step_failures(e: &Engine, id: sagaflow::SagaId) -> Vec<FailureKind> {
    e.history(id)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            Event::StepFailed { kind, .. } => Some(kind),
            _ => None,
        })
        .collect()
}

/// An event acknowledged (durable) before the deadline by another process of a shared
/// store is not taken: the wait times out at its deadline without reading the inbox a
/// last time (it polls once per lease tick; the biased select picks the deadline).
#[tokio::test(start_paused = true)]
async fn an_event_acknowledged_before_the_deadline_elsewhere_is_taken() {
    let clock = clock();
    let store = Arc::new(MemLog::shared(clock.clone(), Duration::from_secs(10)));
    let ledger = Ledger::new();
    let a = shared_engine("a", store.clone(), &clock, &ledger).await;
    let b = shared_engine("b", store.clone(), &clock, &ledger).await;
    let id = a.start("paid", json!({"order": "o1"}), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let until = a.status(id).unwrap().awaiting.expect("waiting").until;
    sleep_until(&clock, Timestamp::from_millis(until.as_millis() - 300)).await;
    b.deliver("settlement/o1", "wh-1", json!({"settled": 1}))
        .await
        .unwrap();
    assert!(clock.now() < until);
    let out = a.wait(id).await.unwrap();
    assert!(
        matches!(out, SagaOutcome::Completed { .. }),
        "acknowledged at {} (deadline {until}) but: {out:?}; failures {:?}; inbox {:?}",
        until.as_millis() - 300,
        step_failures(&a, id),
        b.deliveries(None, 10).await.unwrap()
    );
}

/// A delivery received after the deadline is taken by the attempt after a restart (the
/// first inbox read comes before the deadline check): the step succeeds with an event
/// that came too late, where a live engine would have failed it at the deadline.
#[tokio::test(start_paused = true)]
async fn an_event_after_the_deadline_is_not_taken_after_a_restart() {
    let clock = clock();
    let store = Arc::new(MemLog::shared(clock.clone(), Duration::from_secs(10)));
    let ledger = Ledger::new();
    let a = shared_engine("a", store.clone(), &clock, &ledger).await;
    let b = shared_engine("b", store.clone(), &clock, &ledger).await;
    let id = a.start("paid", json!({"order": "o2"}), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let until = a.status(id).unwrap().awaiting.expect("waiting").until;
    sleep_until(&clock, Timestamp::from_millis(until.as_millis() - 1000)).await;
    drop(a); // a crash: the lease runs on for up to 10 s
    sleep_until(&clock, Timestamp::from_millis(until.as_millis() + 500)).await;
    b.deliver("settlement/o2", "wh-late", json!({"settled": 1}))
        .await
        .unwrap();
    let received_at = b.deliveries(None, 10).await.unwrap()[0].received_at;
    assert!(received_at > until);
    let out = b.wait(id).await.unwrap();
    let took: Vec<String> = b
        .history(id)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            Event::EventReceived { delivery, .. } => Some(delivery),
            _ => None,
        })
        .collect();
    assert!(
        took.is_empty(),
        "took {took:?} received at {received_at}, after the deadline {until}: {out:?}"
    );
}

/// Same, with a private store and one process: the engine is down past the deadline,
/// then comes back; a delivery accepted right after the restart is taken although the
/// deadline had passed before it arrived.
#[tokio::test(start_paused = true)]
async fn an_event_after_the_deadline_is_not_taken_after_a_restart_private_store() {
    let clock = clock();
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    let open = |store: Arc<MemLog>| {
        paused_builder(clock.clone())
            .register(paid(&ledger, OnTimeout::Rejected))
            .open_with(store)
    };
    let a = open(store.clone()).await.unwrap();
    let id = a.start("paid", json!({"order": "o3"}), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let until = a.status(id).unwrap().awaiting.expect("waiting").until;
    drop(a);
    store.crash();
    tokio::time::sleep(Duration::from_secs(7200)).await;
    let b = open(store.clone()).await.unwrap();
    b.deliver("settlement/o3", "wh-late", json!({"settled": 1}))
        .await
        .unwrap();
    let out = b.wait(id).await.unwrap();
    let received_at = b.deliveries(None, 10).await.unwrap()[0].received_at;
    assert!(
        !matches!(out, SagaOutcome::Completed { .. }),
        "completed with an event received at {received_at}, after the deadline {until}"
    );
}

/// A wait a crash interrupted, whose deadline passed while the process was down, then
/// closed because the saga's own deadline passed too: it had timed out first, so it ends
/// as its definition says a timeout ends. With `OnTimeout::Unknown` that is a timeout,
/// and the step is compensated (the payment may have settled); it used to be closed as
/// rejected, and not compensated. Found by the simulation (seed 10019184).
#[tokio::test(start_paused = true)]
async fn an_interrupted_wait_past_its_deadline_closed_by_a_cancel_times_out_as_defined() {
    let clock = clock();
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    let open = |store: Arc<MemLog>| {
        paused_builder(clock.clone())
            .register(paid(&ledger, OnTimeout::Unknown))
            .open_with(store)
    };
    let a = open(store.clone()).await.unwrap();
    // The wait lasts an hour; the saga must be done in ninety minutes.
    let deadline = clock.now().saturating_add(Duration::from_secs(90 * 60));
    let id = a
        .start_with(
            "paid",
            json!({"order": "o5"}),
            sagaflow::StartOptions::default().deadline(deadline),
        )
        .await
        .unwrap()
        .id();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(a.status(id).unwrap().awaiting.is_some(), "waiting");
    drop(a);
    store.crash();
    // Down for two hours: past the wait's deadline, then past the saga's.
    tokio::time::sleep(Duration::from_secs(7200)).await;
    let b = open(store.clone()).await.unwrap();
    let out = b.wait(id).await.unwrap();
    assert!(matches!(out, SagaOutcome::Cancelled { .. }), "{out:?}");
    assert_eq!(step_failures(&b, id), vec![FailureKind::Timeout]);
    assert!(
        ledger
            .effects_of(id)
            .contains(&("settle".to_string(), sagaflow::Phase::Compensation)),
        "the wait of unknown outcome was not compensated: {:?}",
        ledger.effects_of(id)
    );
}

/// A wait beside a branch that crash-loops: the stage runs nothing new and settles
/// before it parks, but the wait's deadline still fires in the meantime (G7): the wait
/// times out at its deadline, the stage fails, and the saga compensates. It used to sit
/// until the park, past its deadline. Found by the simulation (seed 20043675).
#[tokio::test(start_paused = true)]
async fn a_wait_beside_a_crash_looping_branch_still_times_out_at_its_deadline() {
    let clock = clock();
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    ledger.script("boom", sagaflow::Phase::Action, [Outcome::Hang; 4]);
    let definition = || {
        sagaflow::SagaDefinition::builder("looped", 1)
            .parallel(|g| {
                g.step("boom", fake("boom", &ledger))
                    .options(opts())
                    // Its attempt outlasts the wait: the stage settles after the wait's
                    // deadline.
                    .timeout(Duration::from_secs(120))
                    .max_interruptions(1)
                    .await_event(
                        "settle",
                        sagaflow::Await::new(Duration::from_secs(60), |_| {
                            Ok("settlement/looped".to_string())
                        })
                        .compensate_with(fake("settle", &ledger)),
                    )
            })
            .step("ship", fake("ship", &ledger))
            .build()
            .unwrap()
    };
    let open = |store: Arc<MemLog>| {
        paused_builder(clock.clone())
            .register(definition())
            .open_with(store)
    };
    let a = open(store.clone()).await.unwrap();
    let id = a.start("looped", json!({}), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let wait_deadline = a.status(id).unwrap().awaiting.expect("waiting").until;
    drop(a);
    store.crash();
    // Back at once: `boom` was interrupted once, which is its limit.
    let b = open(store.clone()).await.unwrap();
    let out = b.wait(id).await.unwrap();
    let wait_failed = b
        .history(id)
        .unwrap()
        .into_iter()
        .find_map(|r| match r.event {
            Event::StepFailed { step: 1, kind, .. } => Some((r.at, kind)),
            _ => None,
        });
    // At its deadline, as its definition's timeout (`Rejected`, the default).
    assert_eq!(
        wait_failed,
        Some((wait_deadline, FailureKind::Rejected)),
        "the wait did not time out at its deadline; the saga ended {out:?}"
    );
    assert!(matches!(out, SagaOutcome::Compensated { .. }), "{out:?}");
}

/// An operator's ForceCompensate while an await step waits: the wait is not withdrawn
/// (decide_backward holds the stage while an action runs, and withdraws nothing), so
/// compensation waits for the whole wait (an hour here, days in practice).
#[tokio::test(start_paused = true)]
async fn force_compensate_gives_up_a_wait_at_once() {
    let clock = clock();
    let ledger = Ledger::new();
    let e = paused_builder(clock.clone())
        .register(paid(&ledger, OnTimeout::Rejected))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let id = e.start("paid", json!({"order": "o4"}), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    e.repair(id, Repair::ForceCompensate, "ana", "customer gone")
        .await
        .unwrap();
    let asked = tokio::time::Instant::now();
    let out = e.wait(id).await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(60),
        "compensation waited {:?} for the await step's deadline: {out:?}",
        asked.elapsed()
    );
}

/// A correlation key or delivery id with a NUL byte: accepted by the memory and sled
/// stores, but PostgreSQL's `text` refuses it, so a PostgreSQL engine answers a store
/// error (retry!) instead of a refused delivery: the sender retries for ever.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_byte_in_a_key_is_refused_alike_by_every_store() {
    use sagaflow::store::{PgLog, PgOptions};
    let url = std::env::var("SAGAFLOW_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into());
    let schema = format!("review_nul_{}", std::process::id());
    let pg = match PgLog::connect(&url, PgOptions::default().schema(schema.clone())) {
        Ok(pg) => pg,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    let at = Timestamp::from_millis(T0);
    let mem = MemLog::new();
    let m = mem.inbox().deliver("a\0b", "id", &json!(1), at);
    let p = tokio::task::spawn_blocking(move || {
        let r = pg.inbox().deliver("a\0b", "id", &json!(1), at);
        let _ = pg.drop_schema();
        r
    })
    .await
    .unwrap();
    assert_eq!(
        m.is_ok(),
        p.is_ok(),
        "memory store: {m:?}; PostgreSQL store: {p:?}"
    );
}
