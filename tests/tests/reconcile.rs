//! The reconciler against a fake provider whose books a test can damage: what the log
//! expects of each step, exactly the drifts that were injected and no others, drift on
//! the saga's log and in the index, handling with a reason, a durable position across
//! restarts, no drift recorded twice, systems that cannot be asked, and a shared store.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow::machine::{DriftKind, Event, Expected, Repair};
use sagaflow::store::{MemLog, OwnerId, SagaLog, SledLog};
use sagaflow::{
    async_trait, Compensate, Engine, EngineOptions, Finished, Pace, Reconcile, ReconcileOptions,
    SagaDefinition, SagaId, SagaOutcome, Step, StepContext, StepError, Verdict,
};
use serde_json::{json, Value};

/// A provider's books: what is in force under each idempotency key, and for how much.
#[derive(Debug, Default)]
struct Books {
    entries: Mutex<BTreeMap<String, (u64, bool)>>,
}

impl Books {
    fn in_force(&self, key: &str) -> Option<u64> {
        self.entries
            .lock()
            .unwrap()
            .get(key)
            .filter(|(_, undone)| !undone)
            .map(|(amount, _)| *amount)
    }

    fn set(&self, key: &str, amount: u64, undone: bool) {
        self.entries
            .lock()
            .unwrap()
            .insert(key.to_string(), (amount, undone));
    }

    fn forget(&self, key: &str) {
        self.entries.lock().unwrap().remove(key);
    }
}

/// Books `amount` from the input under its key; refuses when the input's `refuse`
/// names it; its undo marks the entry undone.
struct Book {
    name: &'static str,
    books: Arc<Books>,
}

#[async_trait]
impl Step for Book {
    type Input = Value;
    type Output = Value;
    async fn execute(&self, ctx: &StepContext, input: Value) -> Result<Value, StepError> {
        if input["refuse"] == self.name {
            return Err(StepError::rejected("refused"));
        }
        let amount = input["amount"].as_u64().unwrap_or(0);
        self.books
            .set(ctx.idempotency_key().as_str(), amount, false);
        Ok(json!({ "amount": amount }))
    }
}

#[async_trait]
impl Compensate for Book {
    async fn compensate(
        &self,
        ctx: &StepContext,
        input: Value,
        _: Option<Value>,
    ) -> Result<(), StepError> {
        let key =
            sagaflow::IdempotencyKey::derive(ctx.saga_id(), self.name, sagaflow::Phase::Action);
        let amount = input["amount"].as_u64().unwrap_or(0);
        if self.books.in_force(key.as_str()).is_some() {
            self.books.set(key.as_str(), amount, true);
        }
        Ok(())
    }
}

/// Asks the books, by key; `down` makes it answer unknown that many times.
struct Check {
    books: Arc<Books>,
    asked: Arc<AtomicU32>,
    down: Arc<AtomicU32>,
}

#[async_trait]
impl Reconcile for Check {
    async fn reconcile(&self, step: &Finished) -> Verdict {
        self.asked.fetch_add(1, Ordering::SeqCst);
        if self
            .down
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Verdict::unknown("503 from the provider");
        }
        let logged = step.output.as_ref().and_then(|o| o["amount"].as_u64());
        step.judge(self.books.in_force(step.key.as_str()), |amount| {
            (Some(*amount) != logged).then(|| format!("{amount} in the books, {logged:?} logged"))
        })
    }
}

struct World {
    books: Arc<Books>,
    asked: Arc<AtomicU32>,
    down: Arc<AtomicU32>,
}

impl World {
    fn new() -> World {
        World {
            books: Arc::new(Books::default()),
            asked: Arc::new(AtomicU32::new(0)),
            down: Arc::new(AtomicU32::new(0)),
        }
    }

    fn check(&self) -> Check {
        Check {
            books: self.books.clone(),
            asked: self.asked.clone(),
            down: self.down.clone(),
        }
    }

    fn book(&self, name: &'static str) -> Book {
        Book {
            name,
            books: self.books.clone(),
        }
    }

    /// pay → (reserve | ship) → order, each with a hook; `note` without one.
    fn definition(&self) -> SagaDefinition {
        SagaDefinition::builder("shop", 1)
            .step("pay", self.book("pay"))
            .reconcile("payments", self.check())
            .parallel(|g| {
                g.step("reserve", self.book("reserve"))
                    .reconcile("inventory", self.check())
                    .step("note", self.book("note"))
            })
            .step("order", self.book("order"))
            .reconcile("orders", self.check())
            .build()
            .unwrap()
    }
}

fn now_window() -> ReconcileOptions {
    ReconcileOptions::default()
        .window(Duration::ZERO, Duration::from_secs(3600))
        .unknown(3, Duration::from_millis(1))
}

async fn engine_on(world: &World, store: Arc<dyn SagaLog>, opts: ReconcileOptions) -> Engine {
    Engine::builder()
        .register(world.definition())
        .seed(7)
        .options(EngineOptions::default().with_reconciler(opts.every(Duration::from_secs(3600))))
        .open_with(store)
        .await
        .unwrap()
}

async fn run(engine: &Engine, input: Value) -> (SagaId, SagaOutcome) {
    let id = engine.start("shop", input, None).await.unwrap();
    (id, engine.wait(id).await.unwrap())
}

fn key(id: SagaId, step: &str) -> String {
    sagaflow::IdempotencyKey::derive(id, step, sagaflow::Phase::Action)
        .as_str()
        .to_string()
}

fn kinds(report: &sagaflow::ReconcileReport) -> Vec<(SagaId, String, DriftKind, Expected)> {
    let mut v: Vec<_> = report
        .drifts
        .iter()
        .map(|d| (d.saga, d.step.clone(), d.kind, d.expected))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn the_reconciler_reports_exactly_the_drift_injected_and_records_it_on_the_saga() {
    let world = World::new();
    let store = Arc::new(MemLog::new());
    let engine = engine_on(&world, store.clone(), now_window()).await;
    let (done, outcome) = run(&engine, json!({ "amount": 500 })).await;
    assert!(
        matches!(outcome, SagaOutcome::Completed { .. }),
        "{outcome:?}"
    );
    let (undone, outcome) = run(&engine, json!({ "amount": 300, "refuse": "order" })).await;
    assert!(
        matches!(outcome, SagaOutcome::Compensated { .. }),
        "{outcome:?}"
    );
    let (early, outcome) = run(&engine, json!({ "amount": 200, "refuse": "pay" })).await;
    assert!(
        matches!(outcome, SagaOutcome::Compensated { .. }),
        "{outcome:?}"
    );
    let (clean, _) = run(&engine, json!({ "amount": 100 })).await;

    // Damage the books: an amount changed, a refund lost, an order made outside any
    // saga under the key of one that never got that far.
    world.books.set(&key(done, "pay"), 450, false);
    world.books.set(&key(undone, "reserve"), 300, false);
    world.books.set(&key(early, "order"), 200, false);

    let report = engine.reconcile_now().await.unwrap();
    assert_eq!(report.sagas, 4);
    assert_eq!(
        kinds(&report),
        {
            let mut want = vec![
                (
                    done,
                    "pay".to_string(),
                    DriftKind::Different,
                    Expected::Present,
                ),
                (
                    undone,
                    "reserve".to_string(),
                    DriftKind::Unexpected,
                    Expected::Undone,
                ),
                (
                    early,
                    "order".to_string(),
                    DriftKind::Unexpected,
                    Expected::Absent,
                ),
            ];
            want.sort();
            want
        },
        "exactly the injected drift: {:?}",
        report.drifts
    );
    // Three hooked steps of four sagas, one lookup each.
    assert_eq!(report.lookups, 12);
    assert_eq!(report.matched, 9);

    // On the saga's log and in its summary, without moving its end.
    let state = engine.state(done).unwrap();
    assert_eq!(state.drifts.len(), 1);
    assert_eq!(state.drifts[0].step_name, "pay");
    assert!(
        state.drifts[0].detail.contains("450"),
        "{:?}",
        state.drifts[0]
    );
    let meta = engine.status(done).unwrap();
    assert_eq!(meta.open_drifts, 1);
    assert_eq!(meta.finished_at, state.ended_at);
    assert!(engine.status(clean).unwrap().open_drifts == 0);
    let listed: Vec<SagaId> = engine
        .drifts(None, 10)
        .unwrap()
        .iter()
        .map(|d| d.saga)
        .collect();
    let mut want = vec![done, undone, early];
    want.sort();
    assert_eq!(listed, want);
    // Paged by saga.
    let first = engine.drifts(None, 1).unwrap();
    assert_eq!(first.len(), 1);
    let rest = engine.drifts(Some(first[0].saga), 10).unwrap();
    assert_eq!(rest.len(), 2);

    // The metric, by definition, step and kind.
    let text = engine.metrics_text();
    assert!(
        text.contains(
            r#"sagaflow_reconcile_drift_total{definition="shop",step="pay",kind="different"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"sagaflow_reconcile_lookups_total{integration="payments"} 4"#));

    // An operator handles one, with a reason; it leaves the list and the index.
    let lsn = state.drifts[0].lsn;
    let e = engine
        .repair(done, Repair::HandleDrift { drift: lsn }, "", "")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("who"), "{e}");
    engine
        .repair(
            done,
            Repair::HandleDrift { drift: lsn },
            "ana",
            "refunded 50 by hand",
        )
        .await
        .unwrap();
    let again = engine
        .repair(done, Repair::HandleDrift { drift: lsn }, "ana", "twice")
        .await
        .unwrap_err();
    assert!(again.to_string().contains("already handled"), "{again}");
    let nowhere = engine
        .repair(
            done,
            Repair::HandleDrift {
                drift: sagaflow::Lsn(1),
            },
            "ana",
            "x",
        )
        .await
        .unwrap_err();
    assert!(nowhere.to_string().contains("no drift"), "{nowhere}");
    // Other repairs stay refused on a finished saga.
    assert!(engine
        .repair(done, Repair::Resume, "ana", "x")
        .await
        .is_err());
    let state = engine.state(done).unwrap();
    let handled = state.drifts[0].handled.as_ref().unwrap();
    assert_eq!(
        (handled.operator.as_str(), handled.reason.as_str()),
        ("ana", "refunded 50 by hand")
    );
    assert_eq!(engine.status(done).unwrap().open_drifts, 0);
    assert!(engine
        .drifts(None, 10)
        .unwrap()
        .iter()
        .all(|d| d.saga != done));
    // The store's own check agrees with the index it keeps.
    assert!(store.check().unwrap().findings.is_empty());
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_position_is_durable_and_no_drift_is_recorded_twice() {
    let world = World::new();
    let dir = tempfile::tempdir().unwrap();
    let (a, b);
    {
        let store = Arc::new(SledLog::open(dir.path()).unwrap());
        let engine = engine_on(&world, store, now_window()).await;
        a = run(&engine, json!({ "amount": 1 })).await.0;
        world.books.forget(&key(a, "order"));
        let r = engine.reconcile_now().await.unwrap();
        assert_eq!(
            kinds(&r),
            vec![(a, "order".into(), DriftKind::Missing, Expected::Present)]
        );
        // Caught up: nothing more to look at.
        let r = engine.reconcile_now().await.unwrap();
        assert_eq!((r.sagas, r.lookups), (0, 0));
        engine.shutdown().await.unwrap();
    }
    {
        // After a restart it goes on after the last saga it looked at.
        let store = Arc::new(SledLog::open(dir.path()).unwrap());
        let engine = engine_on(&world, store.clone(), now_window()).await;
        b = run(&engine, json!({ "amount": 2 })).await.0;
        let asked = world.asked.load(Ordering::SeqCst);
        let r = engine.reconcile_now().await.unwrap();
        assert_eq!(r.sagas, 1, "only the saga that finished since");
        assert_eq!(world.asked.load(Ordering::SeqCst) - asked, 3);
        assert!(r.drifts.is_empty());

        // As after a crash between recording a batch's drift and moving the position:
        // the batch is looked at again, and the drift is not recorded a second time.
        // A position only moves forward: the crash is made by taking it away.
        store
            .delete_raw(&sagaflow::store::codec::position_key("reconciler/shop@1"))
            .unwrap();
        store.sync().unwrap();
        let r = engine.reconcile_now().await.unwrap();
        assert_eq!(r.sagas, 2);
        assert_eq!(
            kinds(&r),
            vec![(a, "order".into(), DriftKind::Missing, Expected::Present)]
        );
        assert_eq!(r.drifts[0].lsn, None, "found again, not recorded again");
        let drifts = engine
            .history(a)
            .unwrap()
            .into_iter()
            .filter(|r| matches!(r.event, Event::Drift { .. }))
            .count();
        assert_eq!(drifts, 1);
        assert!(engine.state(b).unwrap().drifts.is_empty());
        engine.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_system_that_cannot_be_asked_is_asked_again_then_recorded_unknown() {
    let world = World::new();
    let engine = engine_on(&world, Arc::new(MemLog::new()), now_window()).await;
    let (a, _) = run(&engine, json!({ "amount": 1 })).await;
    // Down twice, then it answers: three lookups ask four times, nothing recorded.
    world.down.store(2, Ordering::SeqCst);
    let r = engine.reconcile_now().await.unwrap();
    assert_eq!((r.lookups, r.matched), (5, 3));
    assert!(r.drifts.is_empty(), "{:?}", r.drifts);

    // Down for good: after three tries each, `unknown`.
    let (b, _) = run(&engine, json!({ "amount": 1 })).await;
    world.down.store(u32::MAX, Ordering::SeqCst);
    let r = engine.reconcile_now().await.unwrap();
    assert_eq!(r.lookups, 9);
    assert_eq!(r.drifts.len(), 3);
    assert!(r
        .drifts
        .iter()
        .all(|d| d.saga == b && d.kind == DriftKind::Unknown && d.detail.contains("503")));
    assert!(engine.state(a).unwrap().drifts.is_empty());
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn sagas_that_finished_within_the_minimum_age_wait_for_a_later_pass() {
    let world = World::new();
    let opts =
        ReconcileOptions::default().window(Duration::from_secs(600), Duration::from_secs(3600));
    let clock: Arc<dyn sagaflow::Clock> = Arc::new(sagaflow::TokioClock::starting_at(
        sagaflow::Timestamp::from_millis(1_700_000_000_000),
    ));
    let engine = sagaflow_tests::paused_builder(clock)
        .register(world.definition())
        .options(
            EngineOptions::default()
                .with_commit_mode(sagaflow::CommitMode::RuntimeTask)
                .with_reconciler(opts.every(Duration::from_secs(3 * 3600))),
        )
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let (a, _) = run(&engine, json!({ "amount": 1 })).await;
    world.books.forget(&key(a, "pay"));
    let r = engine.reconcile_now().await.unwrap();
    assert_eq!(
        (r.sagas, r.lookups),
        (0, 0),
        "finished a moment ago: left for later"
    );
    assert!(engine.state(a).unwrap().drifts.is_empty());
    // Ten minutes on, it is looked at.
    tokio::time::sleep(Duration::from_secs(601)).await;
    let r = engine.reconcile_now().await.unwrap();
    assert_eq!(
        kinds(&r),
        vec![(a, "pay".into(), DriftKind::Missing, Expected::Present)]
    );
    engine.shutdown().await.unwrap();
}

/// Counts admissions: the reconciler asks its integration's pace before each lookup.
#[derive(Clone, Default)]
struct Counted(Arc<AtomicU32>);

#[async_trait]
impl Pace for Counted {
    async fn admit(&self) -> Box<dyn Send> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::new(())
    }
}

#[tokio::test]
async fn each_lookup_is_admitted_by_its_integrations_pace_and_a_shared_store_takes_drift_under_a_lease(
) {
    let world = World::new();
    let payments = Counted::default();
    let orders = Counted::default();
    let opts = now_window()
        .limit("payments", payments.clone())
        .limit("orders", orders.clone());
    let clock: Arc<dyn sagaflow::Clock> = Arc::new(sagaflow::SystemClock);
    let store = Arc::new(MemLog::shared(clock, Duration::from_secs(5)));
    let engine = Engine::builder()
        .register(world.definition())
        .seed(7)
        .owner(OwnerId::new("one"))
        .options(EngineOptions::default().with_reconciler(opts.every(Duration::from_secs(3600))))
        .open_with(store.clone())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for amount in 1..=5 {
        ids.push(run(&engine, json!({ "amount": amount })).await.0);
    }
    world.books.set(&key(ids[2], "order"), 99, false);
    let r = engine.reconcile_now().await.unwrap();
    assert_eq!(payments.0.load(Ordering::SeqCst), 5);
    assert_eq!(orders.0.load(Ordering::SeqCst), 5);
    assert_eq!(
        kinds(&r),
        vec![(
            ids[2],
            "order".into(),
            DriftKind::Different,
            Expected::Present
        )]
    );
    // Written under a fence, like every write to a shared store.
    assert!(store.refused_writes().is_empty());
    assert_eq!(engine.status(ids[2]).unwrap().open_drifts, 1);
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retention_keeps_a_saga_with_open_drift_until_it_is_handled() {
    let world = World::new();
    let clock: Arc<dyn sagaflow::Clock> = Arc::new(sagaflow::TokioClock::starting_at(
        sagaflow::Timestamp::from_millis(1_700_000_000_000),
    ));
    let def = SagaDefinition::builder("kept", 1)
        .step("pay", world.book("pay"))
        .reconcile("payments", world.check())
        .retention(sagaflow::Retention::For(Duration::from_secs(60)))
        .build()
        .unwrap();
    let store = Arc::new(MemLog::new());
    let engine = sagaflow_tests::paused_builder(clock)
        .register(def)
        .options(
            EngineOptions::default()
                .with_commit_mode(sagaflow::CommitMode::RuntimeTask)
                .with_retention_task(Some(Duration::from_secs(10)), 100)
                .with_reconciler(now_window().every(Duration::from_secs(3600))),
        )
        .open_with(store.clone())
        .await
        .unwrap();
    let drifted = engine
        .start("kept", json!({ "amount": 1 }), None)
        .await
        .unwrap();
    engine.wait(drifted).await.unwrap();
    let clean = engine
        .start("kept", json!({ "amount": 2 }), None)
        .await
        .unwrap();
    engine.wait(clean).await.unwrap();
    world.books.forget(&key(drifted, "pay"));
    assert_eq!(engine.reconcile_now().await.unwrap().drifts.len(), 1);
    // Past the retention: the clean saga goes, the one with open drift stays.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(store.meta(clean).unwrap().is_none());
    assert!(store.meta(drifted).unwrap().is_some());
    let lsn = engine.state(drifted).unwrap().drifts[0].lsn;
    engine
        .repair(
            drifted,
            Repair::HandleDrift { drift: lsn },
            "ana",
            "charged again by hand",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        store.meta(drifted).unwrap().is_none(),
        "handled: deleted at the next pass"
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn verify_finds_a_summary_whose_drift_disagrees_with_its_log() {
    use sagaflow::store::codec;
    let world = World::new();
    let store = Arc::new(MemLog::new());
    let engine = engine_on(&world, store.clone(), now_window()).await;
    let (a, _) = run(&engine, json!({ "amount": 1 })).await;
    world.books.forget(&key(a, "order"));
    engine.reconcile_now().await.unwrap();
    engine.shutdown().await.unwrap();
    let sound = sagaflow::admin::verify(&*store, Vec::new()).unwrap();
    assert!(sound.is_sound(), "{sound:?}");
    // A summary that lost its open drift (a restore of an older copy, say).
    let mut meta = store.meta(a).unwrap().unwrap();
    meta.open_drifts = 0;
    store.put_raw(&codec::meta_key(a), &codec::encode_meta(&meta).unwrap());
    let v = sagaflow::admin::verify(&*store, Vec::new()).unwrap();
    assert!(!v.is_sound());
    assert_eq!(v.disagreeing.len(), 1, "{v:?}");
    assert_eq!(v.disagreeing[0].0, a);
    assert!(
        v.disagreeing[0].1.contains("0 open drifts (the log: 1)"),
        "{v:?}"
    );
}
