//! Edges of the reconciler found in review (issue 17): a saga only another process can
//! check, a hook that panics, steps that changed under one definition version, and one
//! slow integration beside a fast one. Each failed before its fix.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow::machine::DriftKind;
use sagaflow::store::{MemLog, OwnerId, SledLog};
use sagaflow::{
    async_trait, Compensate, Engine, EngineOptions, Finished, Pace, Reconcile, ReconcileOptions,
    SagaDefinition, SagaId, Step, StepContext, StepError, Verdict,
};
use serde_json::{json, Value};

/// A provider's books: the amount in force under each idempotency key.
#[derive(Debug, Default)]
struct Books(Mutex<BTreeMap<String, u64>>);

impl Books {
    fn in_force(&self, key: &str) -> Option<u64> {
        self.0.lock().unwrap().get(key).copied()
    }
    fn forget(&self, key: &str) {
        self.0.lock().unwrap().remove(key);
    }
}

/// Books the input's amount under its key; its undo removes it.
struct Book(Arc<Books>);

#[async_trait]
impl Step for Book {
    type Input = Value;
    type Output = Value;
    async fn execute(&self, ctx: &StepContext, input: Value) -> Result<Value, StepError> {
        let amount = input["amount"].as_u64().unwrap_or(0);
        self.0
             .0
            .lock()
            .unwrap()
            .insert(ctx.idempotency_key().as_str().to_string(), amount);
        Ok(json!({ "amount": amount }))
    }
}

#[async_trait]
impl Compensate for Book {
    async fn compensate(
        &self,
        _: &StepContext,
        _: Value,
        _: Option<Value>,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

/// Asks the books by key; counts the questions, by step name.
#[derive(Clone)]
struct Check {
    books: Arc<Books>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl Check {
    fn new(books: &Arc<Books>) -> Check {
        Check {
            books: books.clone(),
            asked: Arc::default(),
        }
    }
}

#[async_trait]
impl Reconcile for Check {
    async fn reconcile(&self, step: &Finished) -> Verdict {
        self.asked.lock().unwrap().push(step.step.clone());
        step.judge(self.books.in_force(step.key.as_str()), |_| None)
    }
}

fn key(id: SagaId, step: &str) -> String {
    sagaflow::IdempotencyKey::derive(id, step, sagaflow::Phase::Action)
        .as_str()
        .to_string()
}

fn now_window() -> ReconcileOptions {
    ReconcileOptions::default()
        .window(Duration::ZERO, Duration::from_secs(3600))
        .unknown(1, Duration::from_millis(1))
        .every(Duration::from_secs(3600))
}

async fn run(engine: &Engine, name: &str, input: Value) -> SagaId {
    let id = engine.start(name, input, None).await.unwrap();
    engine.wait(id).await.unwrap();
    id
}

/// The position is shared by every process of a shared store (docs/reconciliation.md,
/// "Several processes"), but what a process can check depends on the definitions it has
/// registered. A process without definition `other` skips its sagas and moves the shared
/// position past them, so the process that has `other` never looks at them: their drift
/// is never found (G2's "never silently", issue 17 item 2).
#[tokio::test]
async fn a_saga_only_another_process_can_check_is_still_checked_by_that_process() {
    let books = Arc::new(Books::default());
    let check = Check::new(&books);
    let shop = || {
        SagaDefinition::builder("shop", 1)
            .step("pay", Book(books.clone()))
            .reconcile("payments", check.clone())
            .build()
            .unwrap()
    };
    let other = SagaDefinition::builder("other", 1)
        .step("pay", Book(books.clone()))
        .reconcile("payments", check.clone())
        .build()
        .unwrap();
    let clock: Arc<dyn sagaflow::Clock> = Arc::new(sagaflow::SystemClock);
    let store = Arc::new(MemLog::shared(clock, Duration::from_secs(5)));
    let open = |name: &'static str, defs: Vec<SagaDefinition>| {
        let store = store.clone();
        async move {
            let mut b = Engine::builder().seed(7).owner(OwnerId::new(name));
            for d in defs {
                b = b.register(d);
            }
            b.options(EngineOptions::default().with_reconciler(now_window()))
                .open_with(store)
                .await
                .unwrap()
        }
    };
    let a = open("a", vec![shop()]).await;
    let b = open("b", vec![shop(), other]).await;
    let id = run(&b, "other", json!({ "amount": 5 })).await;
    books.forget(&key(id, "pay"));

    // Process a passes first: it cannot check `other` and says so.
    let ra = a.reconcile_now().await.unwrap();
    assert_eq!((ra.skipped, ra.elsewhere), (0, 1));
    // Process b can: it must find the missing payment.
    let rb = b.reconcile_now().await.unwrap();
    let found: Vec<_> = ra
        .drifts
        .iter()
        .chain(&rb.drifts)
        .map(|d| (d.saga, d.kind))
        .collect();
    assert_eq!(
        found,
        vec![(id, DriftKind::Missing)],
        "the saga was skipped by one process and never looked at by the other"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Panics for the saga whose input says so.
#[derive(Clone)]
struct Panicky(Arc<Books>);

#[async_trait]
impl Reconcile for Panicky {
    async fn reconcile(&self, step: &Finished) -> Verdict {
        if step.input["boom"] == true {
            panic!("a hook that unwraps a field this one saga lacks");
        }
        step.judge(self.0.in_force(step.key.as_str()), |_| None)
    }
}

/// G8: "one bad saga never stops the others". A hook that panics on one saga's data
/// fails the whole pass (reconciler.rs, the JoinError is returned with `?`), the
/// position never moves past that batch, and every later pass asks the providers about
/// the same batch again and fails again: nothing after it is ever checked.
#[tokio::test]
async fn a_hook_that_panics_on_one_saga_does_not_stop_the_others_from_being_checked() {
    let books = Arc::new(Books::default());
    let def = SagaDefinition::builder("shop", 1)
        .step("pay", Book(books.clone()))
        .reconcile("payments", Panicky(books.clone()))
        .build()
        .unwrap();
    let engine = Engine::builder()
        .register(def)
        .seed(7)
        .options(EngineOptions::default().with_reconciler(now_window()))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let _bad = run(&engine, "shop", json!({ "amount": 1, "boom": true })).await;
    let good = run(&engine, "shop", json!({ "amount": 2 })).await;
    books.forget(&key(good, "pay"));
    // The background task would try every minute; try a few times.
    for _ in 0..3 {
        let _ = engine.reconcile_now().await;
    }
    let drifts = engine.state(good).unwrap().drifts;
    assert_eq!(
        drifts.iter().map(|d| d.kind).collect::<Vec<_>>(),
        vec![DriftKind::Missing],
        "the other saga's missing payment is never recorded"
    );
    engine.shutdown().await.unwrap();
}

/// G8: a definition whose steps changed under the same name and version is refused
/// (the engine parks an active saga with `definition_mismatch`). The reconciler does not
/// check: it pairs hooks with the log's steps by index, so the payments hook is asked
/// about the order step's key and its verdict is recorded as drift of that step.
#[tokio::test]
async fn a_hook_is_never_asked_about_another_step_after_the_definition_changed() {
    let books = Arc::new(Books::default());
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let def = SagaDefinition::builder("shop", 1)
            .step("order", Book(books.clone()))
            .step("pay", Book(books.clone()))
            .build()
            .unwrap();
        let engine = Engine::builder()
            .register(def)
            .seed(7)
            .open_with(Arc::new(SledLog::open(dir.path()).unwrap()))
            .await
            .unwrap();
        let id = run(&engine, "shop", json!({ "amount": 4 })).await;
        engine.shutdown().await.unwrap();
        id
    };
    // Same name and version, steps swapped; the payments hook on `pay`.
    let check = Check::new(&books);
    let def = SagaDefinition::builder("shop", 1)
        .step("pay", Book(books.clone()))
        .reconcile("payments", check.clone())
        .step("order", Book(books.clone()))
        .build()
        .unwrap();
    let engine = Engine::builder()
        .register(def)
        .seed(7)
        .options(EngineOptions::default().with_reconciler(now_window()))
        .open_with(Arc::new(SledLog::open(dir.path()).unwrap()))
        .await
        .unwrap();
    let r = engine.reconcile_now().await.unwrap();
    let asked = check.asked.lock().unwrap().clone();
    assert!(
        asked.iter().all(|s| s == "pay"),
        "the payments hook was asked about steps {asked:?}; recorded: {:?}",
        engine.state(id).unwrap().drifts
    );
    assert!(r.drifts.is_empty(), "{:?}", r.drifts);
    engine.shutdown().await.unwrap();
}

/// An integration's pace that admits nobody until released.
#[derive(Clone)]
struct Gate(Arc<tokio::sync::Semaphore>);

#[async_trait]
impl Pace for Gate {
    async fn admit(&self) -> Box<dyn Send> {
        let p = self.0.clone().acquire_owned().await;
        Box::new(p)
    }
}

/// Counts lookups.
#[derive(Clone)]
struct Counting(Arc<AtomicU32>);

#[async_trait]
impl Reconcile for Counting {
    async fn reconcile(&self, _: &Finished) -> Verdict {
        self.0.fetch_add(1, Ordering::SeqCst);
        Verdict::Matches
    }
}

/// Issue 17 item 5 (each integration reaches 0.9 of its own limit) and the doc ("each
/// paced by its integration's limit"): a lookup waits for its integration's limiter
/// while holding one of the `concurrency` permits shared by every integration, so a
/// slow (here: stalled) integration holds all of them and the others stop too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_integration_does_not_hold_back_the_lookups_of_another() {
    let slow = Gate(Arc::new(tokio::sync::Semaphore::new(0)));
    let fast = Arc::new(AtomicU32::new(0));
    let books = Arc::new(Books::default());
    let def = SagaDefinition::builder("shop", 1)
        .step("pay", Book(books.clone()))
        .reconcile("slow", Counting(Arc::new(AtomicU32::new(0))))
        .step("order", Book(books.clone()))
        .reconcile("fast", Counting(fast.clone()))
        .build()
        .unwrap();
    let engine = Engine::builder()
        .register(def)
        .seed(7)
        .options(EngineOptions::default().with_reconciler(now_window().limit("slow", slow.clone())))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let n = 40;
    for i in 0..n {
        run(&engine, "shop", json!({ "amount": i })).await;
    }
    let pass = tokio::spawn({
        let engine = engine.clone();
        async move { engine.reconcile_now().await }
    });
    // The fast integration is not limited at all: its 40 lookups take no time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while fast.load(Ordering::SeqCst) < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = fast.load(Ordering::SeqCst);
    // Let the slow one through so the pass ends.
    slow.0.add_permits(1000);
    pass.await.unwrap().unwrap();
    engine.shutdown().await.unwrap();
    assert_eq!(
        done, n,
        "unlimited lookups stalled behind a slow integration's limiter"
    );
}
