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
