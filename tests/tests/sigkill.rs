//! The real-process test: the engine in a child process, killed with SIGKILL at random
//! moments under load and restarted on the same sled directory until every saga has
//! ended; then the ledger (a file the child's steps append to, outside the process) is
//! reconciled against the store. Odd orders run a definition with parallel groups, so
//! kills land while branches run side by side and while a group's branches are undone
//! concurrently; the undos must still land stage by stage in reverse order.
//!
//! `SAGA_KILLS` (default 20) sets the number of kills, `SAGA_KILL_SAGAS` (default 300)
//! the number of sagas, `SAGA_SEED` the kill schedule.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sagaflow::store::{SagaLog, SledLog};
use sagaflow::{SagaStatus, StartKey};
use sagaflow_tests::kill_ledger::reconcile;
use sagaflow_tests::{env_u64, splitmix};

#[test]
fn sigkill_at_random_moments_loses_nothing_and_applies_nothing_twice() {
    let exe = env!("CARGO_BIN_EXE_sagaflow-crash-child");
    let kills_wanted = env_u64("SAGA_KILLS", 20);
    let sagas = env_u64("SAGA_KILL_SAGAS", 300);
    let mut rng = env_u64("SAGA_SEED", 20_261_125);
    eprintln!("sigkill test: seed {rng}, {kills_wanted} kills, {sagas} sagas");
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("data");
    let ledger = work.path().join("ledger.txt");
    // Each run's stderr goes to a file, so a run that fails on its own says why.
    let errors = work.path().join("stderr.txt");
    let child = || {
        Command::new(exe)
            .arg(&dir)
            .arg(&ledger)
            .arg(sagas.to_string())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&errors).expect("stderr file"))
            .spawn()
            .expect("spawn the child")
    };
    let stderr = || std::fs::read_to_string(&errors).unwrap_or_default();

    // Kill it again and again. The schedule is wall-clock by nature (a real process is
    // killed while it runs); nothing here asserts on time.
    let mut kills = 0;
    let mut runs = 0;
    while kills < kills_wanted {
        runs += 1;
        assert!(
            runs < kills_wanted * 5,
            "the child keeps finishing before it is killed"
        );
        let mut c = child();
        std::thread::sleep(Duration::from_millis(40 + splitmix(&mut rng) % 260));
        if let Some(status) = c.try_wait().expect("child status") {
            // It finished before the kill; the remaining kills would hit nothing.
            assert!(
                status.success(),
                "run {runs} failed before its kill: {status:?}\n{}",
                stderr()
            );
            break;
        }
        c.kill().expect("SIGKILL");
        c.wait().expect("reap");
        kills += 1;
    }

    // Then let it finish.
    let mut c = child();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = c.try_wait().expect("child status") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(300) {
            c.kill().ok();
            panic!("the final run did not finish in 300 s\n{}", stderr());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    c.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    assert!(
        status.success(),
        "final run failed: {status:?} {out}\n{}",
        stderr()
    );
    assert!(out.starts_with("DONE "), "{out}");
    eprintln!(
        "sigkill test: {kills} kills in {runs} runs, final run: {}",
        out.trim()
    );
    assert!(kills >= kills_wanted.min(20), "only {kills} kills landed");

    // Reconcile the ledger against the store.
    let log = SledLog::open(&dir).expect("open the store");
    let text = std::fs::read_to_string(&ledger).expect("ledger");
    let r = reconcile(&log, &text, sagas).expect("the ledger reconciles");
    assert!(
        r.lost == 0 && r.doubled == 0 && r.misordered == 0,
        "{} lost, {} doubled, {} undone out of stage order: {:#?}",
        r.lost,
        r.doubled,
        r.misordered,
        r.problems
    );
    eprintln!(
        "sigkill test: {} completed, {} compensated; {} calls took effect under {} keys ({} \
         repeats of a key after a kill, absorbed by it)",
        r.completed,
        r.compensated,
        r.lines,
        r.distinct,
        r.lines - r.distinct
    );
    assert!(r.completed > 0 && r.compensated > 0);
    eprintln!(
        "sigkill test: {} orders with parallel groups ended, {} of them compensated with \
         two or more branches of a group undone",
        r.with_groups, r.group_undos
    );
    assert!(
        r.with_groups > 0 && r.group_undos > 0,
        "orders with groups must complete and compensate: {r:?}"
    );
    let late = (0..sagas).filter(|n| n % 5 == 1).count();
    eprintln!("sigkill test: {late} orders had their charge delivered late");
}

/// A step that kills its own process every time it runs must not crash-loop the engine:
/// after 5 interruptions in a row the saga is parked with `crash_loop`, and the engine
/// runs on (G4).
#[test]
fn a_step_that_aborts_its_process_parks_its_saga_as_a_crash_loop() {
    let exe = env!("CARGO_BIN_EXE_sagaflow-crash-child");
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("data");
    let ledger = work.path().join("ledger.txt");
    let run = || {
        Command::new(exe)
            .arg(&dir)
            .arg(&ledger)
            .arg("1")
            .arg("abort")
            .stderr(Stdio::null())
            .output()
            .expect("run the child")
    };
    let mut aborted = 0;
    let out = loop {
        let out = run();
        if out.status.success() {
            break out;
        }
        aborted += 1;
        assert!(aborted <= 5, "still crashing after {aborted} runs");
    };
    assert_eq!(
        aborted, 5,
        "parked after exactly five interruptions in a row"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), "DONE 0 0 1");
    let log = SledLog::open(&dir).expect("open the store");
    let id = log
        .find_start_key(&StartKey::new("order-0").expect("key"))
        .expect("index")
        .expect("started");
    let meta = log.meta(id).expect("meta").expect("summary");
    assert_eq!(meta.status, SagaStatus::Parked);
    let reason = meta.reason.unwrap_or_default();
    assert!(reason.contains("5 attempts in a row"), "{reason}");
}
