//! Real processes on a real PostgreSQL (G9): three engine processes share one database
//! under load; one is killed with SIGKILL at random moments and restarted, one is
//! stopped with SIGSTOP past its lease and resumed with SIGCONT. Its writes after that
//! are refused; whatever it had in flight is absorbed by keys. Then the ledger (a file
//! outside the processes) is reconciled against the store: 0 lost, 0 doubled, every saga
//! ended. The takeover time after each kill is reported.
//!
//! `SAGA_PG_SAGAS` (default 2000) and `SAGA_PG_KILLS` (default 5) set the size;
//! `SAGAFLOW_TEST_DATABASE_URL` the server. Skipped without a server unless `CI` is set.
#![cfg(feature = "postgres")]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sagaflow::store::{PgLog, PgOptions};
use sagaflow_tests::kill_ledger::reconcile;
use sagaflow_tests::{env_u64, splitmix};

const LEASE: Duration = Duration::from_millis(1500);

fn url() -> String {
    std::env::var("SAGAFLOW_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} failed");
}

/// How many active sagas `owner` still holds.
fn held_by(rt: &tokio::runtime::Runtime, schema: &str, owner: &str) -> i64 {
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let q =
            format!("SELECT count(*) FROM {schema}.sagas WHERE owner = $1 AND status IN (1, 2)");
        client.query_one(&q, &[&owner]).await.expect("count").get(0)
    })
}

#[test]
fn three_processes_share_postgres_through_kills_and_a_stall() {
    let exe = env!("CARGO_BIN_EXE_sagaflow-crash-child");
    let sagas = env_u64("SAGA_PG_SAGAS", 2000);
    let kills_wanted = env_u64("SAGA_PG_KILLS", 5);
    let mut rng = env_u64("SAGA_SEED", 20_261_125);
    let schema = format!(
        "p_{}_{}",
        std::process::id(),
        splitmix(&mut rng) % 1_000_000
    );
    let store = match PgLog::connect(&url(), PgOptions::default().schema(schema.clone())) {
        Ok(s) => s,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: no PostgreSQL at `{}` ({e})", url());
            return;
        }
        Err(e) => panic!("CI is set and PostgreSQL at `{}` is not usable: {e}", url()),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let work = tempfile::tempdir().expect("temp dir");
    let ledger = work.path().join("ledger.txt");
    let spawn = |owner: &str| {
        Command::new(exe)
            .arg(work.path().join("unused"))
            .arg(&ledger)
            .arg(sagas.to_string())
            .env("SAGAFLOW_CHILD_DATABASE_URL", url())
            .env("SAGAFLOW_CHILD_SCHEMA", &schema)
            .env("SAGAFLOW_CHILD_OWNER", owner)
            .env("SAGAFLOW_CHILD_LEASE_MS", LEASE.as_millis().to_string())
            .env_remove("RUST_BACKTRACE")
            // Each process draws its own saga ids, as in production.
            .env_remove("SAGA_SEED")
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(work.path().join(format!("{owner}.err")))
                    .expect("stderr file"),
            )
            .spawn()
            .expect("spawn a child")
    };
    eprintln!("pg processes: {sagas} sagas, {kills_wanted} kills, lease {LEASE:?}");
    let mut a = spawn("A-0");
    let mut b = spawn("B");
    let mut c = spawn("C");
    let mut takeovers = Vec::new();
    let mut stalled = false;
    for k in 0..kills_wanted {
        std::thread::sleep(Duration::from_millis(400 + splitmix(&mut rng) % 1200));
        if a.try_wait().expect("status").is_some() {
            break;
        }
        a.kill().expect("SIGKILL");
        a.wait().expect("reap");
        let killed = Instant::now();
        let owner = format!("A-{k}");
        a = spawn(&format!("A-{}", k + 1));
        if k == 1 && b.try_wait().expect("status").is_none() {
            // B stalls past its lease while A's sagas are being taken over.
            signal(&b, "STOP");
            stalled = true;
        }
        // Takeover: until no active saga is held by the dead process.
        loop {
            if held_by(&rt, &schema, &owner) == 0 {
                takeovers.push(killed.elapsed());
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "sagas of a killed process were not taken over in 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if stalled && k == 1 {
            std::thread::sleep(LEASE * 2);
            signal(&b, "CONT");
        }
    }
    // Every process runs to the end: each waits for every order, wherever it ran.
    let start = Instant::now();
    let mut outs = Vec::new();
    for (name, child) in [("A", &mut a), ("B", &mut b), ("C", &mut c)] {
        let status = loop {
            if let Some(s) = child.try_wait().expect("status") {
                break s;
            }
            if start.elapsed() > Duration::from_secs(300) {
                let _ = child.kill();
                panic!("process {name} did not finish in 300 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read stdout");
        let err = std::fs::read_to_string(work.path().join(format!(
            "{}.err",
            if name == "A" {
                format!("A-{}", takeovers.len())
            } else {
                name.to_string()
            }
        )))
        .unwrap_or_default();
        assert!(
            status.success(),
            "process {name} failed: {status:?} {out} {err}"
        );
        assert!(out.starts_with("DONE "), "{name}: {out}");
        outs.push(format!("{name}: {}", out.trim()));
    }
    let text = std::fs::read_to_string(&ledger).expect("ledger");
    let r = reconcile(&store, &text, sagas).expect("the ledger reconciles");
    takeovers.sort();
    let ms = |d: &Duration| d.as_millis();
    eprintln!(
        "pg processes: {} kills, B stalled past its lease: {stalled}; takeover after a kill: \
         min {} ms, max {} ms (lease {} ms, claim tick 100 ms); {outs:?}",
        takeovers.len(),
        takeovers.first().map_or(0, ms),
        takeovers.last().map_or(0, ms),
        LEASE.as_millis()
    );
    eprintln!(
        "{{\"sagas\":{sagas},\"completed\":{},\"compensated\":{},\"lost\":{},\"doubled\":{},\
         \"calls\":{},\"repeats_absorbed\":{},\"takeover_max_ms\":{}}}",
        r.completed,
        r.compensated,
        r.lost,
        r.doubled,
        r.lines,
        r.lines - r.distinct,
        takeovers.last().map_or(0, ms)
    );
    assert!(
        r.lost == 0 && r.doubled == 0 && r.misordered == 0,
        "{} lost, {} doubled: {:#?}",
        r.lost,
        r.doubled,
        r.problems
    );
    assert!(r.completed > 0 && r.compensated > 0);
    assert!(!takeovers.is_empty(), "no kill landed");
    assert!(stalled || kills_wanted < 2, "B was never stalled");
    let _ = store.drop_schema();
}
