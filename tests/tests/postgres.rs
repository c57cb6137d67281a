//! Several engines on one real PostgreSQL database (G9): takeover after a crash, wait
//! and cancel from a process that does not drive the saga, one start key across
//! processes. Skipped with a message when no server answers, unless `CI` is set.
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use sagaflow::store::{OwnerId, PgLog, PgOptions};
use sagaflow::SagaDefinition;
use sagaflow::{CommitMode, Engine, EngineOptions, Phase, SagaOutcome, StartKey};
use sagaflow_tests::{checkout, fake, opts, paid, Ledger, Outcome};

/// payment → [inventory | courier] → order, all compensatable.
fn grouped(ledger: &Arc<Ledger>) -> SagaDefinition {
    SagaDefinition::builder("grouped", 1)
        .step("payment", fake("payment", ledger))
        .options(opts())
        .parallel(|g| {
            g.step("inventory", fake("inventory", ledger))
                .options(opts())
                .step("courier", fake("courier", ledger))
                .options(opts())
        })
        .step("order", fake("order", ledger))
        .options(opts())
        .build()
        .expect("valid definition")
}

const TTL: Duration = Duration::from_secs(1);

fn url() -> String {
    std::env::var("SAGAFLOW_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

/// A fresh schema of this test's own, or `None` if no server answers (and `CI` is not
/// set).
fn schema() -> Option<String> {
    let name = format!(
        "e_{}_{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() % 1_000_000 + u128::from(rand_suffix())
    );
    match PgLog::connect(&url(), PgOptions::default().schema(name.clone())) {
        Ok(_) => Some(name),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "skipping: no PostgreSQL at `{}` ({e}); set SAGAFLOW_TEST_DATABASE_URL",
                url()
            );
            None
        }
        Err(e) => panic!("CI is set and PostgreSQL at `{}` is not usable: {e}", url()),
    }
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(1);
    (h.finish() % 1_000_000) as u32
}

async fn open(name: &str, schema: &str, ledger: &Arc<Ledger>) -> Engine {
    Engine::builder()
        .register(checkout(ledger))
        .register(grouped(ledger))
        .register(paid(ledger, sagaflow::OnTimeout::Rejected))
        .owner(OwnerId::new(name))
        .options(
            EngineOptions::default()
                .with_commit_mode(CommitMode::Thread)
                .with_lease_tick(Duration::from_millis(100)),
        )
        .open_postgres(&url(), PgOptions::default().schema(schema).lease_ttl(TTL))
        .await
        .expect("engine opens on PostgreSQL")
}

fn cleanup(schema: &str) {
    if let Ok(pg) = PgLog::connect(&url(), PgOptions::default().schema(schema)) {
        let _ = pg.drop_schema();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_engines_sagas_are_taken_over_and_seen_from_everywhere() {
    let Some(schema) = schema() else { return };
    let ledger = Ledger::new();
    let a = open("A", &schema, &ledger).await;
    let b = open("B", &schema, &ledger).await;

    // A's first five sagas hang in their payment; A dies with them in flight.
    for i in 0..5 {
        ledger.script_tagged(&format!("h{i}"), "payment", Phase::Action, [Outcome::Hang]);
    }
    let mut hung = Vec::new();
    for i in 0..5 {
        hung.push(
            a.start("checkout", json!({"tag": format!("h{i}")}), None)
                .await
                .unwrap(),
        );
    }
    let mut fine = Vec::new();
    for i in 0..10 {
        fine.push(
            b.start("checkout", json!({"tag": format!("f{i}")}), None)
                .await
                .unwrap(),
        );
    }
    for id in &hung {
        ledger.wait_for_call(*id, "payment", Phase::Action).await;
    }
    // The same start key from both processes: one saga.
    let key = StartKey::new("order-9").unwrap();
    let (x, y) = tokio::join!(
        a.start_once("checkout", json!({"tag": "k"}), key.clone()),
        b.start_once("checkout", json!({"tag": "k"}), key.clone()),
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.id(), y.id());
    assert_ne!(x.is_new(), y.is_new());
    let other = b.start_once("checkout", json!({"tag": "other"}), key).await;
    assert!(other.is_err(), "the key with another input is refused");

    let killed = Instant::now();
    drop(a);
    // B claims A's sagas once their leases expire and drives them to the end.
    for id in &hung {
        let outcome = tokio::time::timeout(Duration::from_secs(30), b.wait(*id))
            .await
            .expect("taken over in time")
            .unwrap();
        assert!(
            matches!(outcome, SagaOutcome::Completed { .. }),
            "{outcome:?}"
        );
    }
    eprintln!(
        "takeover: A's 5 sagas completed by B {:?} after the kill (lease {TTL:?})",
        killed.elapsed()
    );
    // A new process sees and waits on sagas B drove.
    let c = open("C", &schema, &ledger).await;
    for id in fine.iter().chain(&hung) {
        let outcome = c.wait(*id).await.unwrap();
        assert!(
            matches!(outcome, SagaOutcome::Completed { .. }),
            "{outcome:?}"
        );
        // Each payment took effect under one key, whoever drove it.
        let keys: std::collections::BTreeSet<_> = ledger
            .calls_of(*id, "payment", Phase::Action)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys.len(), 1);
    }
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
    drop((b, c));
    cleanup(&schema);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_asked_of_another_process_is_applied_by_its_owner() {
    let Some(schema) = schema() else { return };
    let ledger = Ledger::new();
    let a = open("A", &schema, &ledger).await;
    let b = open("B", &schema, &ledger).await;
    // The payment hangs until its 5 s attempt timeout: the saga is in flight on A.
    ledger.script_tagged("x", "payment", Phase::Action, [Outcome::Hang]);
    let id = a
        .start("checkout", json!({"tag": "x"}), None)
        .await
        .unwrap();
    ledger.wait_for_call(id, "payment", Phase::Action).await;
    let meta = b.cancel(id, "ops@example", "customer asked").await.unwrap();
    assert!(
        meta.status.is_active(),
        "recorded; the attempt still settles"
    );
    let outcome = b.wait(id).await.unwrap();
    assert!(
        matches!(&outcome, SagaOutcome::Cancelled { operator, .. } if operator == "ops@example"),
        "{outcome:?}"
    );
    // Recorded in the saga's log, by its owner.
    let history = a.history(id).unwrap();
    assert!(history
        .iter()
        .any(|r| matches!(&r.event, sagaflow::machine::Event::CancelRequested { reason, .. } if reason == "customer asked")));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    drop((a, b));
    cleanup(&schema);
}

/// A group's branches in flight when their process dies are taken over by another
/// process, which runs each again with its key: the group's stages survive the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_in_flight_is_taken_over_and_each_branch_runs_again_with_its_key() {
    let Some(schema) = schema() else { return };
    let ledger = Ledger::new();
    ledger.script("inventory", Phase::Action, [Outcome::Hang]);
    ledger.script("courier", Phase::Action, [Outcome::Hang]);
    let a = open("A", &schema, &ledger).await;
    let id = a.start("grouped", json!({}), None).await.unwrap();
    ledger.wait_for_call(id, "inventory", Phase::Action).await;
    ledger.wait_for_call(id, "courier", Phase::Action).await;
    drop(a);

    let b = open("B", &schema, &ledger).await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), b.wait(id))
        .await
        .expect("taken over within the lease")
        .unwrap();
    assert!(
        matches!(outcome, SagaOutcome::Completed { .. }),
        "{outcome:?}"
    );
    for step in ["inventory", "courier"] {
        let calls = ledger.calls_of(id, step, Phase::Action);
        assert_eq!(calls.len(), 2, "{step}: {calls:?}");
        assert_eq!(calls[0].0, calls[1].0, "{step}: one key");
    }
    b.shutdown().await.unwrap();
    cleanup(&schema);
}

/// Any process accepts a delivery: one delivered to process B is taken by the saga that
/// waits for it in process A, and repeating it in A is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_delivered_to_one_process_reaches_the_saga_waiting_in_another() {
    let Some(schema) = schema() else { return };
    let ledger = Ledger::new();
    let a = open("A", &schema, &ledger).await;
    let b = open("B", &schema, &ledger).await;
    let id = a.start("paid", json!({"order": "o1"}), None).await.unwrap();
    ledger.wait_for_call(id, "payment", Phase::Action).await;
    let delivered = b
        .deliver("settlement/o1", "wh-1", json!({"settled": true}))
        .await
        .unwrap();
    assert_eq!(delivered, sagaflow::store::Delivered::New);
    let outcome = tokio::time::timeout(Duration::from_secs(30), a.wait(id))
        .await
        .expect("taken within a lease tick or two")
        .unwrap();
    let SagaOutcome::Completed { outputs } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(outputs["settle"], json!({"settled": true}));
    assert_eq!(
        a.deliver("settlement/o1", "wh-1", json!({})).await.unwrap(),
        sagaflow::store::Delivered::Duplicate
    );
    let listed = b.deliveries(None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].taken_by, Some(id));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    cleanup(&schema);
}

/// Finds the order step's record missing, whatever it is asked.
struct OrderGone;

#[sagaflow::async_trait]
impl sagaflow::Reconcile for OrderGone {
    async fn reconcile(&self, step: &sagaflow::Finished) -> sagaflow::Verdict {
        step.judge(None::<()>, |_| None)
    }
}

async fn open_checked(name: &str, schema: &str, ledger: &Arc<Ledger>) -> Engine {
    let def = SagaDefinition::builder("checked", 1)
        .step("payment", fake("payment", ledger))
        .options(opts())
        .step("order", fake("order", ledger))
        .options(opts())
        .reconcile("orders", OrderGone)
        .build()
        .expect("valid definition");
    let reconcile = sagaflow::ReconcileOptions::default()
        .window(Duration::ZERO, Duration::from_secs(3600))
        .every(Duration::from_secs(3600));
    Engine::builder()
        .register(def)
        .owner(OwnerId::new(name))
        .options(
            EngineOptions::default()
                .with_commit_mode(CommitMode::Thread)
                .with_lease_tick(Duration::from_millis(100))
                .with_reconciler(reconcile),
        )
        .open_postgres(&url(), PgOptions::default().schema(schema).lease_ttl(TTL))
        .await
        .expect("engine opens on PostgreSQL")
}

/// Drift found by one process is recorded under the saga's lease, listed from every
/// process, handled from another, and the reconciler's position is the store's: a
/// second process goes on where the first stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_recorded_under_a_lease_and_the_position_is_shared() {
    let Some(schema) = schema() else { return };
    let ledger = Ledger::new();
    let a = open_checked("a", &schema, &ledger).await;
    let b = open_checked("b", &schema, &ledger).await;
    let id = a.start("checked", json!({}), None).await.unwrap();
    assert!(matches!(
        a.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));

    let report = b.reconcile_now().await.unwrap();
    assert_eq!(report.sagas, 1);
    assert_eq!(report.drifts.len(), 1);
    assert_eq!(report.drifts[0].kind, sagaflow::machine::DriftKind::Missing);
    let lsn = report.drifts[0].lsn.expect("recorded");
    // Seen from the other process, through the store's drift index.
    let listed = tokio::task::spawn_blocking({
        let a = a.clone();
        move || a.drifts(None, 10)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].saga, listed[0].drift.lsn), (id, lsn));
    // The position is in the store: the other process has nothing left to look at.
    let again = a.reconcile_now().await.unwrap();
    assert_eq!((again.sagas, again.lookups), (0, 0));
    // Handled from the process that did not record it.
    a.repair(
        id,
        sagaflow::machine::Repair::HandleDrift { drift: lsn },
        "ana",
        "order recreated by hand",
    )
    .await
    .unwrap();
    let meta = tokio::task::spawn_blocking({
        let b = b.clone();
        move || b.status(id)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(meta.open_drifts, 0);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    cleanup(&schema);
}
