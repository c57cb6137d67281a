//! End to end at a small size: the real service binary, killed with SIGKILL while it
//! works (orders placed, charges made, settlement webhooks in flight), reconciled by the
//! engine's reconciler against the providers (the saga's reconcile hooks) and, for every
//! settlement, against the engine's store.

use std::time::Duration;

use example_order_processing::chaos::{run, ChaosConfig, Report};

/// The chaos runs pick free ports by binding and letting go: two at once in one test
/// binary could pick the same one, and one run's clients would talk to the other's
/// service. They take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_orders_survive_three_kills_with_nothing_double_charged() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let report = run(ChaosConfig {
        orders: 100,
        concurrency: 8,
        fail_rate: 0.2,
        // Slow providers, frequent kills: the kills land while sagas are in flight.
        latency_ms: 60,
        kill_every: Duration::from_millis(200),
        max_kills: 3,
        dir: dir.path().to_path_buf(),
        exe: env!("CARGO_BIN_EXE_order-processing").into(),
        progress: false,
        database_url: None,
    })
    .await
    .unwrap();
    assert_eq!(report.problems, Vec::<String>::new());
    assert_eq!(report.mismatches, 0);
    assert_eq!(report.kills, 3, "{report:?}");
    assert_eq!(report.completed + report.compensated + report.parked, 100);
    assert!(report.completed > 0 && report.compensated > 0, "{report:?}");
    assert!(report.refunds > 0, "some charges were refunded: {report:?}");
    assert_eq!(report.charges, report.completed as usize + report.refunds);
    // The reservation runs beside the charge: a declined card's stock, if reserved, is
    // released, as a sold-out order's charge, if taken, is refunded.
    assert_eq!(
        report.reservations,
        report.completed as usize + report.releases
    );
    assert_eq!(report.orders_created, report.completed as usize);
    settlements_reconcile(&report);
    steps_reconcile(&report);
    assert_eq!(report.forged_webhooks_refused, 3);
    assert_eq!(report.idempotent_replays, 10);
    // Every compensation is counted under its reason, with no saga's id in it: the
    // declined cards (amounts ending in 13) all under one reason. (A decline whose
    // reservation, running beside it, was interrupted by a kill has a reason naming both
    // branches: a class of its own, not counted here.)
    assert_eq!(
        report.compensated_by_reason.values().sum::<u32>(),
        report.compensated,
        "{report:?}"
    );
    assert!(
        report.compensated_by_reason.len() < report.compensated as usize,
        "{report:?}"
    );
    let declined: Vec<_> = report
        .compensated_by_reason
        .keys()
        .filter(|r| r.contains("card declined") && !r.contains("; "))
        .collect();
    assert_eq!(declined.len(), 1, "{report:?}");
    assert!(declined[0].contains("attempt N"), "{report:?}");
}

/// Two replicas on one PostgreSQL database, clients spread across both, the first
/// killed again and again: the second takes its sagas over, and everything reconciles.
/// Skipped without a server (`SAGAFLOW_TEST_DATABASE_URL`), unless `CI` is set.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_survive_kills_of_one() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let url = std::env::var("SAGAFLOW_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into());
    // A probe: reachable, and the user may create a schema (dropped at once).
    let probe = sagaflow::store::PgOptions::default().schema("chaos_probe");
    match sagaflow::store::PgLog::connect(&url, probe) {
        Ok(pg) => pg.drop_schema().unwrap(),
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set and PostgreSQL is not usable: {e}"
            );
            eprintln!("skipping: no PostgreSQL at `{url}` ({e})");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let report = run(ChaosConfig {
        orders: 100,
        concurrency: 8,
        fail_rate: 0.2,
        latency_ms: 60,
        kill_every: Duration::from_millis(400),
        max_kills: 3,
        dir: dir.path().to_path_buf(),
        exe: env!("CARGO_BIN_EXE_order-processing").into(),
        progress: false,
        database_url: Some(url),
    })
    .await
    .unwrap();
    assert_eq!(report.problems, Vec::<String>::new());
    assert_eq!(report.mismatches, 0);
    assert_eq!(report.kills, 3, "{report:?}");
    assert_eq!(report.completed + report.compensated + report.parked, 100);
    assert!(report.completed > 0 && report.compensated > 0, "{report:?}");
    assert_eq!(report.charges, report.completed as usize + report.refunds);
    assert_eq!(
        report.reservations,
        report.completed as usize + report.releases
    );
    settlements_reconcile(&report);
    steps_reconcile(&report);
}

/// What the engine's reconciler must show after every chaos run, on any store: every
/// finished saga looked at, every step with a hook (four: all but `settle`) agreeing
/// with its provider, or passed over because its log cannot say what to expect (and
/// then checked by the report), no drift.
fn steps_reconcile(report: &Report) {
    assert!(report.drifts.is_empty(), "{report:?}");
    assert_eq!(
        report.reconcile_sagas,
        (report.completed + report.compensated) as usize,
        "{report:?}"
    );
    assert_eq!(
        report.reconcile_matched + report.reconcile_unchecked.len() as u64,
        4 * report.reconcile_sagas as u64,
        "{report:?}"
    );
    assert!(
        report
            .reconcile_unchecked
            .iter()
            .all(|s| s.ends_with("/create_order")),
        "{report:?}"
    );
    assert!(
        report.reconcile_lookups >= report.reconcile_matched,
        "{report:?}"
    );
}

/// What every chaos run's settlements must show, on any store.
fn settlements_reconcile(report: &Report) {
    // Every settlement payments sent was acknowledged, and taken by exactly one saga,
    // its own, or left unclaimed only because its saga was compensated before it waited.
    assert_eq!(report.settlements_lost, 0, "{report:?}");
    assert_eq!(report.settlements_doubled, 0, "{report:?}");
    assert_eq!(report.settlements_sent, report.charges, "{report:?}");
    assert_eq!(
        report.settlements_acknowledged, report.settlements_sent,
        "{report:?}"
    );
    assert_eq!(
        report.settlements_taken + report.settlements_unclaimed,
        report.settlements_sent,
        "{report:?}"
    );
    assert!(
        report.settlements_taken >= report.completed as usize,
        "{report:?}"
    );
    // Replayed after the kills, every one is a duplicate by its event id.
    assert_eq!(report.settlements_replayed, report.settlements_acknowledged);
    assert_eq!(
        report.settlement_replays_duplicate, report.settlements_replayed,
        "{report:?}"
    );
}
