//! The PostgreSQL part of the benchmark (feature `postgres`): 3-step sagas on a shared
//! database with one and with two engine *processes*, beside the raw commit rate of the
//! same server measured in the same run (single-row INSERT transactions at the same
//! concurrency).
//!
//! Each engine process is this binary started again with `--pg-worker`: it runs its
//! share of the sagas and prints one JSON line (its latencies); the parent times the
//! whole and adds them up.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sagaflow::store::{PgLog, PgOptions};
use sagaflow::{Engine, SagaDefinition};
use serde_json::{json, Value};

use crate::{percentile, Noop};

/// One measured configuration.
#[derive(Debug)]
pub(crate) struct PgRun {
    pub(crate) processes: u32,
    pub(crate) concurrency: u64,
    pub(crate) sagas: u64,
    pub(crate) secs: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

impl PgRun {
    pub(crate) fn sagas_per_sec(&self) -> f64 {
        self.sagas as f64 / self.secs
    }
}

/// What the PostgreSQL part measured.
#[derive(Debug)]
pub(crate) struct PgFigures {
    pub(crate) raw_commits_c1: f64,
    pub(crate) raw_commits_c64: f64,
    pub(crate) runs: Vec<PgRun>,
}

fn schema_name(tag: &str) -> String {
    format!("bench_{tag}_{}", std::process::id())
}

/// Single-row INSERT transactions (autocommit) from `clients` connections.
fn raw_commits(
    rt: &tokio::runtime::Runtime,
    url: &str,
    clients: u64,
    total: u64,
) -> Result<f64, String> {
    rt.block_on(async {
        let schema = schema_name("raw");
        let (admin, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; \
                 CREATE TABLE {schema}.raw (id bigint PRIMARY KEY, v bytea NOT NULL)"
            ))
            .await
            .map_err(|e| e.to_string())?;
        let per = total / clients;
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..clients {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let q = format!("INSERT INTO {schema}.raw (id, v) VALUES ($1, $2)");
            tasks.spawn(async move {
                let stmt = client.prepare(&q).await?;
                let value = vec![7u8; 200];
                for i in 0..per {
                    let id = i64::try_from(c << 32 | i).unwrap_or(i64::MAX);
                    client.execute(&stmt, &[&id, &value]).await?;
                }
                Ok::<(), tokio_postgres::Error>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        }
        let rate = (per * clients) as f64 / start.elapsed().as_secs_f64();
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .map_err(|e| e.to_string())?;
        Ok(rate)
    })
}

/// `--pg-worker <url> <schema> <concurrency> <sagas> <first>`: one engine process.
pub(crate) fn worker(args: &[String]) -> Result<(), String> {
    let [url, schema, concurrency, sagas, first] = args else {
        return Err("--pg-worker <url> <schema> <concurrency> <sagas> <first>".into());
    };
    let parse = |s: &str| s.parse::<u64>().map_err(|e| e.to_string());
    let (concurrency, sagas, first) = (parse(concurrency)?, parse(sagas)?, parse(first)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut lat = rt.block_on(async {
        let mut b = SagaDefinition::builder("bench", 1);
        for i in 0..3 {
            b = b.step(format!("step{i}"), Noop);
        }
        let def = b.build().map_err(|e| e.to_string())?;
        let options = PgOptions::default().schema(schema.clone()).pool_size(16);
        let engine = Arc::new(
            Engine::builder()
                .register(def)
                .open_postgres(url, options)
                .await
                .map_err(|e| e.to_string())?,
        );
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency as usize));
        let mut tasks = tokio::task::JoinSet::new();
        for n in first..first + sagas {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| e.to_string())?;
            let e = engine.clone();
            tasks.spawn(async move {
                let t = Instant::now();
                let id = e.start("bench", json!({ "n": n }), None).await?;
                e.wait(id).await?;
                drop(permit);
                Ok::<f64, sagaflow::Error>(t.elapsed().as_secs_f64() * 1000.0)
            });
        }
        let mut lat = Vec::with_capacity(sagas as usize);
        while let Some(r) = tasks.join_next().await {
            lat.push(r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?);
        }
        engine.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(lat)
    })?;
    lat.sort_by(f64::total_cmp);
    println!("{}", json!({ "lat": lat }));
    Ok(())
}

/// Runs `processes` worker processes on one fresh schema, `sagas` in all.
fn run(url: &str, processes: u32, concurrency: u64, sagas: u64) -> Result<PgRun, String> {
    let schema = schema_name(&format!("p{processes}c{concurrency}"));
    // Created (and migrated) once up front, so the workers' start is not a race to
    // migrate.
    let store = PgLog::connect(url, PgOptions::default().schema(schema.clone()))
        .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let per = sagas / u64::from(processes);
    let start = Instant::now();
    let children: Vec<_> = (0..processes)
        .map(|p| {
            Command::new(&exe)
                .arg("--pg-worker")
                .args([url, &schema])
                .arg(concurrency.to_string())
                .arg(per.to_string())
                .arg((u64::from(p) * per).to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let mut lat: Vec<f64> = Vec::new();
    for c in children {
        let out = c.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("a worker failed: {:?}", out.status));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value =
            serde_json::from_str(text.lines().last().unwrap_or("{}")).map_err(|e| e.to_string())?;
        lat.extend(
            v["lat"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect::<Vec<_>>())
                .unwrap_or_default(),
        );
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let _ = store.drop_schema();
    Ok(PgRun {
        processes,
        concurrency,
        sagas: per * u64::from(processes),
        secs,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    })
}

/// The whole PostgreSQL part; `None` (with a message) when no server answers.
pub(crate) fn measure(rt: &tokio::runtime::Runtime, url: &str, sagas: u64) -> Option<PgFigures> {
    let raw_commits_c1 = match raw_commits(rt, url, 1, 2_000) {
        Ok(r) => r,
        Err(e) => {
            println!("PostgreSQL at `{url}` not usable ({e}): skipping its figures");
            return None;
        }
    };
    let raw_commits_c64 = raw_commits(rt, url, 64, 64 * 300).ok()?;
    println!("raw PostgreSQL, single-row INSERT transactions:");
    println!("  1 client:                   {raw_commits_c1:>10.0} commits/s");
    println!("  64 clients:                 {raw_commits_c64:>10.0} commits/s");
    let mut runs = Vec::new();
    for (processes, c, n) in [
        (1, 1, sagas.min(1_000)),
        (1, 64, sagas),
        (1, 1024, sagas),
        (2, 64, sagas),
        (2, 1024, sagas),
    ] {
        match run(url, processes, c, n) {
            Ok(r) => runs.push(r),
            Err(e) => println!("PostgreSQL run p={processes} c={c} failed: {e}"),
        }
        // Let the server settle between runs.
        std::thread::sleep(Duration::from_millis(200));
    }
    Some(PgFigures {
        raw_commits_c1,
        raw_commits_c64,
        runs,
    })
}

/// A step that never returns (`Hold`: sagas held in it stay active and leased) or asks to
/// be retried in an hour (`Later`: sagas in it wait on a long timer, with their lease
/// handed back).
enum StepChoice {
    Hold,
    Later,
}

#[async_trait::async_trait]
impl sagaflow::Step for StepChoice {
    type Input = serde::de::IgnoredAny;
    type Output = ();

    async fn execute(
        &self,
        _: &sagaflow::StepContext,
        _: serde::de::IgnoredAny,
    ) -> Result<(), sagaflow::StepError> {
        match self {
            StepChoice::Hold => std::future::pending().await,
            StepChoice::Later => Err(sagaflow::StepError::retry_after(
                Duration::from_secs(3600),
                "come back in an hour",
            )),
        }
    }
}

#[async_trait::async_trait]
impl sagaflow::Compensate for StepChoice {
    async fn compensate(
        &self,
        _: &sagaflow::StepContext,
        _: serde::de::IgnoredAny,
        _: Option<()>,
    ) -> Result<(), sagaflow::StepError> {
        Ok(())
    }
}

fn metric(engine: &Engine, prefix: &str, needle: &str) -> u64 {
    engine
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with(prefix) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Takeover at scale: `n` sagas held in a step by a process that then dies; another
/// process claims and finishes them. Seconds from the death to all claimed and to all
/// completed, with a 2 s lease.
pub(crate) fn claim_at_scale(
    rt: &tokio::runtime::Runtime,
    url: &str,
    n: u64,
) -> Result<(f64, f64, f64), String> {
    let schema = schema_name("claim");
    let lease = Duration::from_secs(2);
    let opts = || {
        PgOptions::default()
            .schema(schema.clone())
            .lease_ttl(lease)
            .pool_size(16)
    };
    let quiet = || {
        sagaflow::EngineOptions::default()
            .with_stuck_after(None)
            .with_retention_task(None, 1)
            .with_lease_tick(Duration::from_millis(100))
    };
    let out = rt.block_on(async {
        let def = |held: bool| {
            let b = SagaDefinition::builder("claim", 1);
            let b = if held {
                b.step("hold", StepChoice::Hold)
            } else {
                b.step("hold", Noop)
            };
            b.build().map_err(|e| e.to_string())
        };
        let dying = Arc::new(
            Engine::builder()
                .register(def(true)?)
                .owner(sagaflow::store::OwnerId::new("dying"))
                .options(quiet())
                .open_postgres(url, opts())
                .await
                .map_err(|e| e.to_string())?,
        );
        let permits = Arc::new(tokio::sync::Semaphore::new(1024));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| e.to_string())?;
            let e = dying.clone();
            tasks.spawn(async move {
                let r = e.start("claim", json!({ "n": i }), None).await;
                drop(permit);
                r
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        }
        // Dies as a crash would: its sagas stay in their step, its leases run out.
        drop(dying);
        let died = Instant::now();
        let taker = Engine::builder()
            .register(def(false)?)
            .owner(sagaflow::store::OwnerId::new("taker"))
            .options(quiet())
            .open_postgres(url, opts())
            .await
            .map_err(|e| e.to_string())?;
        let (mut claimed_at, mut done_at) = (None, None);
        while done_at.is_none() && died.elapsed() < Duration::from_secs(600) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let claimed = metric(&taker, "sagaflow_sagas_claimed_total", "");
            let done = metric(&taker, "sagaflow_sagas_ended_total", "completed");
            if claimed >= n && claimed_at.is_none() {
                claimed_at = Some(died.elapsed().as_secs_f64());
            }
            if done >= n {
                done_at = Some(died.elapsed().as_secs_f64());
            }
        }
        taker.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((
            lease.as_secs_f64(),
            claimed_at.ok_or("not all claimed in 600 s")?,
            done_at.ok_or("not all completed in 600 s")?,
        ))
    });
    if let Ok(pg) = PgLog::connect(url, PgOptions::default().schema(schema)) {
        let _ = pg.drop_schema();
    }
    out
}

/// Statements per second one engine process sent while it sat idle for `secs`, counted
/// by its store (`PgLog::statements`): with an empty store and one definition, then with
/// ten definitions, 1,000 sagas held in a step (leased, renewed) and 1,000 waiting an
/// hour for a retry (their leases handed back). Default options: leases of 10 s, a
/// lease tick of 1 s, the watchdog and the retention task on.
pub(crate) fn idle_queries(
    rt: &tokio::runtime::Runtime,
    url: &str,
    secs: u64,
) -> Result<(f64, f64), String> {
    let mut rates = Vec::new();
    for loaded in [false, true] {
        let schema = schema_name(if loaded { "idle_loaded" } else { "idle_empty" });
        let store = Arc::new(
            PgLog::connect(url, PgOptions::default().schema(schema.clone()))
                .map_err(|e| e.to_string())?,
        );
        let engine = rt.block_on(async {
            let mut b = Engine::builder();
            let defs = if loaded { 10 } else { 1 };
            for d in 0..defs {
                let def = SagaDefinition::builder(format!("idle-{d}"), 1)
                    .step(
                        "a",
                        if d == 0 {
                            StepChoice::Hold
                        } else {
                            StepChoice::Later
                        },
                    )
                    .build()
                    .map_err(|e| e.to_string())?;
                b = b.register(def);
            }
            let engine = b
                .open_with(store.clone())
                .await
                .map_err(|e| e.to_string())?;
            if loaded {
                for i in 0..1000 {
                    engine
                        .start("idle-0", json!({ "n": i }), None)
                        .await
                        .map_err(|e| e.to_string())?;
                    engine
                        .start("idle-1", json!({ "n": i }), None)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok::<_, String>(engine)
        })?;
        // Let the starts settle (the waiting ones hand their leases back).
        std::thread::sleep(Duration::from_secs(3));
        let before = store.statements();
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        let sent = store.statements() - before;
        rates.push(sent as f64 / t.elapsed().as_secs_f64());
        drop(engine);
        let _ = store.drop_schema();
    }
    Ok((rates[0], rates[1]))
}
