//! Sagaflow's benchmark: how much the engine adds to the cost of durability.
//!
//! ```text
//! cargo run --release -p sagaflow-bench -- --sagas 20000
//! ```
//!
//! In one process and one run, on the same disk, it measures:
//!
//! 1. the raw limits: sled inserts of the engine's typical record size with one flush +
//!    fdatasync per record, and with group commit (64 writer threads, one flush +
//!    fdatasync per batch);
//! 2. Sagaflow: a 3-step saga of no-op steps at concurrency 1, 64 and 1024, and a 10-step
//!    saga at concurrency 1024; and parallel groups: a saga "step, group of 3, step"
//!    whose five steps each wait 10 ms (a simulated call: a tokio sleep), at concurrency
//!    1 (p50 and p99 against the three waits it must take in sequence, and against the
//!    same five steps in a row) and at concurrency 1024 (sagas/s, durable writes per
//!    saga);
//! 3. for each: sagas/s, log records/s and durable writes/s, latency from start to
//!    outcome (p50, p99, p99.9), bytes on disk per saga, and the ratios to the raw
//!    limits; and a memory probe: live heap per in-flight saga, with 1024 sagas held
//!    inside their first step (counted by a counting allocator).
//!
//! With the `postgres` feature and `--database-url` (or `DATABASE_URL`), it also runs
//! 3-step sagas on PostgreSQL with one and two engine processes beside the server's raw
//! commit rate (see `pg.rs`).
//!
//! The last line of output is one JSON object. Absolute figures drift on shared
//! machines; the ratios to the raw limits measured in the same run are what to compare.

#![recursion_limit = "256"]

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sagaflow::store::{self, SagaLog, Write};
use sagaflow::{
    Compensate, Engine, EngineOptions, Lsn, Retention, SagaDefinition, SagaId, SagaMeta,
    SagaStatus, StartKey, Step, StepContext, StepError, Timestamp,
};
use serde::de::IgnoredAny;
use serde_json::json;

#[cfg(feature = "postgres")]
mod pg;
mod scale;

/// Counts live heap bytes, so the memory probe can measure what in-flight sagas hold
/// rather than what the process's resident set happens to be.
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub(crate) static LIVE: AtomicUsize = AtomicUsize::new(0);

    pub(crate) struct Counting;

    // SAFETY: every method forwards to `System` with the caller's arguments unchanged
    // and only adds bookkeeping on an atomic counter.
    #[allow(unsafe_code)]
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                LIVE.fetch_add(layout.size(), Ordering::Relaxed);
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) };
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
                LIVE.fetch_add(new_size, Ordering::Relaxed);
            }
            p
        }
    }

    pub(crate) fn live() -> usize {
        LIVE.load(Ordering::Relaxed)
    }
}

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

/// The size of a typical log record: a `step_attempt_started` or `step_succeeded` with a
/// small output, plus the summary that travels with it.
const RECORD_BYTES: usize = 200;

struct Args {
    sagas: u64,
    raw_records: u64,
    concurrency: Vec<u64>,
    retention_soak: u64,
    database_url: Option<String>,
    pg_sagas: u64,
    scale: u64,
    pg_claim: u64,
    pg_idle_secs: u64,
    pg_only: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        sagas: 20_000,
        raw_records: 2_000,
        concurrency: vec![1, 64, 1024],
        retention_soak: 0,
        database_url: std::env::var("DATABASE_URL").ok(),
        pg_sagas: 20_000,
        scale: 0,
        pg_claim: 0,
        pg_idle_secs: 10,
        pg_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--sagas" => a.sagas = value()?.parse().map_err(|e| format!("--sagas: {e}"))?,
            "--raw-records" => {
                a.raw_records = value()?
                    .parse()
                    .map_err(|e| format!("--raw-records: {e}"))?
            }
            "--concurrency" => {
                a.concurrency = value()?
                    .split(',')
                    .map(|c| c.trim().parse().map_err(|e| format!("--concurrency: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--retention-soak" => {
                a.retention_soak = value()?
                    .parse()
                    .map_err(|e| format!("--retention-soak: {e}"))?
            }
            "--database-url" => a.database_url = Some(value()?),
            "--pg-only" => a.pg_only = true,
            "--scale" => a.scale = value()?.parse().map_err(|e| format!("--scale: {e}"))?,
            "--pg-claim" => {
                a.pg_claim = value()?.parse().map_err(|e| format!("--pg-claim: {e}"))?
            }
            "--pg-idle-secs" => {
                a.pg_idle_secs = value()?
                    .parse()
                    .map_err(|e| format!("--pg-idle-secs: {e}"))?
            }
            "--pg-sagas" => {
                a.pg_sagas = value()?.parse().map_err(|e| format!("--pg-sagas: {e}"))?
            }
            "-h" | "--help" => {
                println!(
                    "usage: sagaflow-bench [--sagas N] [--raw-records N] [--concurrency 1,64,1024] \
                     [--retention-soak N] [--database-url URL] [--pg-sagas N] [--scale N] \
                     [--pg-claim N] [--pg-idle-secs S] [--pg-only]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn dir_bytes(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            let p = e.path();
            total += if p.is_dir() {
                dir_bytes(&p)
            } else {
                e.metadata().map_or(0, |m| m.len())
            };
        }
    }
    total
}

fn open_raw(dir: &Path) -> (sled::Db, File) {
    let db = sled::Config::new().path(dir).open().expect("open sled");
    let file = File::open(dir.join("db")).expect("sled data file");
    (db, file)
}

/// One flush + fdatasync per record, one writer: the cost of a durable write alone.
fn raw_fsync(records: u64) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let (db, file) = open_raw(dir.path());
    let value = vec![7u8; RECORD_BYTES];
    let start = Instant::now();
    for i in 0..records {
        db.insert(i.to_be_bytes(), value.clone()).expect("insert");
        db.flush().expect("flush");
        file.sync_data().expect("fdatasync");
    }
    records as f64 / start.elapsed().as_secs_f64()
}

/// 64 writers, one committer: whatever queued while the last sync ran goes in one batch
/// and one sync. The ceiling for any engine on this disk.
fn raw_group_commit(records: u64, writers: u64) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let (db, file) = open_raw(dir.path());
    type Job = (Vec<u8>, mpsc::SyncSender<()>);
    let (tx, rx) = mpsc::channel::<Job>();
    let committer = std::thread::spawn(move || {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while let Ok(j) = rx.try_recv() {
                jobs.push(j);
            }
            let mut batch = sled::Batch::default();
            for (k, _) in &jobs {
                batch.insert(k.clone(), vec![7u8; RECORD_BYTES]);
            }
            db.apply_batch(batch).expect("batch");
            db.flush().expect("flush");
            file.sync_data().expect("fdatasync");
            for (_, done) in jobs {
                let _ = done.send(());
            }
        }
    });
    let per_writer = records / writers;
    let start = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let (done_tx, done_rx) = mpsc::sync_channel(1);
                for i in 0..per_writer {
                    let key = (w << 40 | i).to_be_bytes().to_vec();
                    tx.send((key, done_tx.clone())).expect("send");
                    done_rx.recv().expect("reply");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer");
    }
    let rate = (per_writer * writers) as f64 / start.elapsed().as_secs_f64();
    drop(tx);
    committer.join().expect("committer");
    rate
}

struct Noop;

/// A step that does nothing and reads nothing of the input (`IgnoredAny` decodes
/// without building anything), so the figures are the engine's own.
#[async_trait]
impl Step for Noop {
    type Input = IgnoredAny;
    type Output = ();

    async fn execute(&self, _: &StepContext, _: IgnoredAny) -> Result<(), StepError> {
        Ok(())
    }
}

#[async_trait]
impl Compensate for Noop {
    async fn compensate(
        &self,
        _: &StepContext,
        _: IgnoredAny,
        _: Option<()>,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

/// A step that stands for a call to another service: it waits `0` (a real tokio sleep)
/// and does nothing else. Its compensation is immediate.
struct Wait(Duration);

#[async_trait]
impl Step for Wait {
    type Input = IgnoredAny;
    type Output = ();

    async fn execute(&self, _: &StepContext, _: IgnoredAny) -> Result<(), StepError> {
        tokio::time::sleep(self.0).await;
        Ok(())
    }
}

#[async_trait]
impl Compensate for Wait {
    async fn compensate(
        &self,
        _: &StepContext,
        _: IgnoredAny,
        _: Option<()>,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

/// How long each step of the parallel-group sagas waits.
const STEP_WAIT: Duration = Duration::from_millis(10);

/// "step, group of 3, step": five steps that each wait `wait`; three of them at once.
fn parallel_definition(wait: Duration) -> SagaDefinition {
    SagaDefinition::builder("bench", 1)
        .step("first", Wait(wait))
        .parallel(|g| {
            g.step("branch0", Wait(wait))
                .step("branch1", Wait(wait))
                .step("branch2", Wait(wait))
        })
        .step("last", Wait(wait))
        .build()
        .expect("definition")
}

/// The same five steps one after the other: what the group saves.
fn serial_wait_definition(wait: Duration) -> SagaDefinition {
    let mut b = SagaDefinition::builder("bench", 1);
    for i in 0..5 {
        b = b.step(format!("step{i}"), Wait(wait));
    }
    b.build().expect("definition")
}

/// A step that holds every saga at its first step until released, so the probe can
/// count what a given number of in-flight sagas hold.
struct Gate {
    entered: Arc<AtomicU64>,
    open: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl Step for Gate {
    type Input = IgnoredAny;
    type Output = ();

    async fn execute(&self, _: &StepContext, _: IgnoredAny) -> Result<(), StepError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let permit = self.open.acquire().await.map_err(StepError::rejected)?;
        permit.forget();
        Ok(())
    }
}

#[async_trait]
impl Compensate for Gate {
    async fn compensate(
        &self,
        _: &StepContext,
        _: IgnoredAny,
        _: Option<()>,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

/// A store that keeps nothing: the memory probe runs on it once to tell the engine's own
/// per-saga memory from what sled's caches grow by for the same writes. Never used for
/// a throughput figure.
#[derive(Debug)]
struct Discard;

impl SagaLog for Discard {
    fn inbox(&self) -> &dyn store::Inbox {
        self
    }
    fn append(&self, _: Vec<Write>) -> store::Result<()> {
        Ok(())
    }
    fn sync(&self) -> store::Result<()> {
        Ok(())
    }
    fn read(&self, _: SagaId) -> store::Result<Vec<(Lsn, Vec<u8>)>> {
        Ok(Vec::new())
    }
    fn meta(&self, _: SagaId) -> store::Result<Option<SagaMeta>> {
        Ok(None)
    }
    fn with_status(&self, _: SagaStatus) -> store::Result<Vec<SagaId>> {
        Ok(Vec::new())
    }
    fn find_start_key(&self, _: &StartKey) -> store::Result<Option<SagaId>> {
        Ok(None)
    }
    fn due(&self, _: Timestamp) -> store::Result<Vec<(Timestamp, SagaId)>> {
        Ok(Vec::new())
    }
    fn position(&self, _: &str) -> store::Result<Option<(Timestamp, SagaId)>> {
        Ok(None)
    }
    fn set_position(&self, _: &str, _: (Timestamp, SagaId)) -> store::Result<()> {
        Ok(())
    }
    fn remove(&self, _: SagaId) -> store::Result<()> {
        Ok(())
    }
    fn finished_before(
        &self,
        _: Timestamp,
        _: Option<(Timestamp, SagaId)>,
        _: usize,
    ) -> store::Result<Vec<(Timestamp, SagaId)>> {
        Ok(Vec::new())
    }
    fn check(&self) -> store::Result<store::CheckReport> {
        Ok(store::CheckReport::default())
    }
}

/// Keeps no delivery either (the bench has no await step).
impl store::Inbox for Discard {
    fn deliver(
        &self,
        _: &str,
        _: &str,
        _: &serde_json::Value,
        _: Timestamp,
    ) -> store::Result<store::Delivered> {
        Ok(store::Delivered::New)
    }
    fn waiting(&self, _: &str) -> store::Result<Vec<store::Delivery>> {
        Ok(Vec::new())
    }
    fn deliveries(&self, _: Option<(&str, &str)>, _: usize) -> store::Result<Vec<store::Delivery>> {
        Ok(Vec::new())
    }
    fn purge(&self, _: Timestamp) -> store::Result<usize> {
        Ok(0)
    }
}

/// Live heap per in-flight saga: `n` three-step sagas started and all held inside their
/// first step, minus the heap before they started.
fn memory_probe(rt: &tokio::runtime::Runtime, n: u64, on_sled: bool) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let entered = Arc::new(AtomicU64::new(0));
    let open = Arc::new(tokio::sync::Semaphore::new(0));
    let def = SagaDefinition::builder("probe", 1)
        .step(
            "gate",
            Gate {
                entered: entered.clone(),
                open: open.clone(),
            },
        )
        .step("b", Noop)
        .step("c", Noop)
        .build()
        .expect("definition");
    rt.block_on(async {
        let b = Engine::builder().seed(2).register(def);
        let engine = Arc::new(if on_sled {
            b.open(dir.path()).await.expect("open")
        } else {
            b.open_with(Arc::new(Discard)).await.expect("open")
        });
        // Warm up allocator pools, sled's caches and the runtime with one saga.
        open.add_permits(1);
        let _ = engine
            .start("probe", json!({"n": 0}), None)
            .await
            .expect("start");
        while engine.in_flight() > 0 {
            tokio::task::yield_now().await;
        }
        entered.store(0, Ordering::SeqCst);
        let before = counting::live();
        let mut starts = tokio::task::JoinSet::new();
        for i in 0..n {
            let e = engine.clone();
            starts.spawn(async move { e.start("probe", json!({ "n": i }), None).await });
        }
        let mut ids = Vec::with_capacity(n as usize);
        while let Some(r) = starts.join_next().await {
            ids.push(r.expect("task").expect("start"));
        }
        while entered.load(Ordering::SeqCst) < n {
            tokio::task::yield_now().await;
        }
        let held = counting::live().saturating_sub(before);
        open.add_permits(n as usize);
        drop(ids);
        while engine.in_flight() > 0 {
            tokio::task::yield_now().await;
        }
        match Arc::try_unwrap(engine) {
            Ok(e) => e.shutdown().await.expect("shutdown"),
            Err(_) => panic!("engine still shared"),
        }
        held as f64 / n as f64
    })
}

/// The rate limiter of `sagaflow-steps` under 200 concurrent callers: the rate it
/// actually lets through, against the configured one.
fn limiter_rate(rt: &tokio::runtime::Runtime, per_second: u32, calls: u64) -> f64 {
    use sagaflow_steps::rate_limit::RateLimiter;
    rt.block_on(async {
        let limiter = Arc::new(RateLimiter::new("bench").per_second(per_second, 1));
        // Spend the initial burst so it does not flatter the figure.
        limiter.acquire().await;
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..200 {
            let l = limiter.clone();
            let n = calls / 200 + u64::from(t < calls % 200);
            tasks.spawn(async move {
                for _ in 0..n {
                    l.acquire().await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        calls as f64 / start.elapsed().as_secs_f64()
    })
}

/// How long one reconcile lookup takes: a provider's round trip.
const LOOKUP_LATENCY: Duration = Duration::from_millis(5);

/// A reconcile hook that takes a provider's round trip and agrees.
struct Agrees;

#[async_trait]
impl sagaflow::Reconcile for Agrees {
    async fn reconcile(&self, _: &sagaflow::Finished) -> sagaflow::Verdict {
        tokio::time::sleep(LOOKUP_LATENCY).await;
        sagaflow::Verdict::Matches
    }
}

/// What the reconciler achieved against its limit.
#[derive(Debug)]
struct Reconciled {
    limit: u32,
    sagas: usize,
    lookups: u64,
    secs: f64,
}

impl Reconciled {
    /// Lookups per second per integration (two integrations share the lookups).
    fn per_integration(&self) -> f64 {
        self.lookups as f64 / 2.0 / self.secs
    }
}

/// Finishes `sagas` two-step sagas (each step with a hook of its own integration),
/// then times the reconciler over them with each integration limited to `limit`
/// lookups/s by the steps toolkit's rate limiter.
fn reconcile_rate(rt: &tokio::runtime::Runtime, sagas: u64, limit: u32) -> Reconciled {
    use sagaflow_steps::rate_limit::RateLimiter;
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let def = SagaDefinition::builder("recon", 1)
            .step("alpha", Noop)
            .reconcile("alpha", Agrees)
            .step("beta", Noop)
            .reconcile("beta", Agrees)
            .build()
            .expect("definition");
        // A burst of 10 (20 ms of lookups at 500/s): enough for a late timer to be made
        // up, as a limiter in production is configured; spent before the clock starts,
        // so the figure is the steady rate.
        const BURST: u32 = 10;
        let alpha = Arc::new(RateLimiter::new("alpha").per_second(limit, BURST));
        let beta = Arc::new(RateLimiter::new("beta").per_second(limit, BURST));
        let opts = sagaflow::ReconcileOptions::default()
            .window(Duration::ZERO, Duration::from_secs(3600))
            .every(Duration::from_secs(3600))
            .limit("alpha", alpha.clone())
            .limit("beta", beta.clone());
        let engine = Engine::builder()
            .register(def)
            .options(EngineOptions::default().with_reconciler(opts))
            .open(dir.path())
            .await
            .expect("engine");
        let mut starts = tokio::task::JoinSet::new();
        for i in 0..sagas {
            let e = engine.clone();
            starts.spawn(async move {
                let id = e.start("recon", json!({ "n": i }), None).await?;
                e.wait(id).await
            });
            while starts.len() >= 256 {
                starts.join_next().await;
            }
        }
        while starts.join_next().await.is_some() {}
        // Spend each limiter's burst so it does not flatter the figure.
        for _ in 0..BURST {
            drop(alpha.acquire().await);
            drop(beta.acquire().await);
        }
        let start = Instant::now();
        let report = engine.reconcile_now().await.expect("reconciler");
        let secs = start.elapsed().as_secs_f64();
        let _ = engine.shutdown().await;
        Reconciled {
            limit,
            sagas: report.sagas,
            lookups: report.lookups,
            secs,
        }
    })
}

#[derive(Debug)]
struct Run {
    name: String,
    /// No-op steps in a row; the waiting sagas are told apart by `shape`.
    steps: usize,
    shape: Shape,
    concurrency: u64,
    sagas: u64,
    secs: f64,
    records: u64,
    writes: u64,
    syncs: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    disk_per_saga: f64,
}

/// Which saga a run measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `steps` no-op steps in a row.
    Noop,
    /// "step, group of 3, step", each step waiting [`STEP_WAIT`].
    Parallel,
    /// The same five waiting steps in a row.
    SerialWait,
}

impl Run {
    fn writes_per_saga(&self) -> f64 {
        self.writes as f64 / self.sagas as f64
    }
    fn sagas_per_sec(&self) -> f64 {
        self.sagas as f64 / self.secs
    }
    fn writes_per_sec(&self) -> f64 {
        self.writes as f64 / self.secs
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn run_engine(rt: &tokio::runtime::Runtime, steps: usize, concurrency: u64, sagas: u64) -> Run {
    let mut b = SagaDefinition::builder("bench", 1);
    for i in 0..steps {
        b = b.step(format!("step{i}"), Noop);
    }
    let def = b.build().expect("definition");
    run_definition(
        rt,
        def,
        format!("{steps}-step c={concurrency}"),
        (steps, Shape::Noop),
        concurrency,
        sagas,
    )
}

/// Runs `sagas` sagas of `def` (named "bench") at `concurrency` on a fresh sled store.
fn run_definition(
    rt: &tokio::runtime::Runtime,
    def: SagaDefinition,
    name: String,
    (steps, shape): (usize, Shape),
    concurrency: u64,
    sagas: u64,
) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let (secs, mut lat, stats) = rt.block_on(async {
        let engine = Arc::new(
            Engine::builder()
                .seed(1)
                .register(def)
                .open(dir.path())
                .await
                .expect("open"),
        );
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency as usize));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..sagas {
            let permit = permits.clone().acquire_owned().await.expect("permit");
            let e = engine.clone();
            tasks.spawn(async move {
                let t = Instant::now();
                let id = e
                    .start("bench", json!({ "n": n }), None)
                    .await
                    .expect("start");
                e.wait(id).await.expect("wait");
                drop(permit);
                t.elapsed().as_secs_f64() * 1000.0
            });
        }
        let mut lat = Vec::with_capacity(sagas as usize);
        while let Some(r) = tasks.join_next().await {
            lat.push(r.expect("task"));
        }
        let secs = start.elapsed().as_secs_f64();
        let stats = engine.commit_stats();
        match Arc::try_unwrap(engine) {
            Ok(e) => e.shutdown().await.expect("shutdown"),
            Err(_) => panic!("engine still shared"),
        }
        (secs, lat, stats)
    });
    lat.sort_by(f64::total_cmp);
    Run {
        name,
        steps,
        shape,
        concurrency,
        sagas,
        secs,
        records: stats.records,
        writes: stats.writes,
        syncs: stats.batches,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        p999_ms: percentile(&lat, 0.999),
        disk_per_saga: dir_bytes(dir.path()) as f64 / sagas as f64,
    }
}

/// A run of 3-step sagas at `concurrency` with every finished saga due for deletion
/// `keep` after it finished and the retention task running beside them.
struct RetentionRun {
    sagas: u64,
    secs: f64,
    /// Sagas the retention task deleted while the sagas ran.
    deleted: u64,
    /// (sagas finished so far, bytes of the data directory) along the way.
    disk: Vec<(u64, u64)>,
}

fn deleted_so_far(engine: &Engine) -> u64 {
    engine
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix("sagaflow_sagas_deleted_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn run_with_retention(
    rt: &tokio::runtime::Runtime,
    concurrency: u64,
    sagas: u64,
    keep: Duration,
    samples: u64,
    max_per_sec: Option<u32>,
) -> RetentionRun {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut b = SagaDefinition::builder("bench", 1).retention(Retention::For(keep));
    for i in 0..3 {
        b = b.step(format!("step{i}"), Noop);
    }
    let def = b.build().expect("definition");
    let every = (sagas / samples.max(1)).max(1);
    rt.block_on(async {
        let engine = Engine::builder()
            .seed(1)
            .register(def)
            .options(
                EngineOptions::default()
                    .with_retention_task(Some(Duration::from_millis(200)), 1000)
                    .with_retention_max_per_sec(max_per_sec),
            )
            .open(dir.path())
            .await
            .expect("open");
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency as usize));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let mut done = 0u64;
        let mut disk = Vec::new();
        let note = |done: u64, disk: &mut Vec<(u64, u64)>| {
            if done.is_multiple_of(every) {
                disk.push((done, dir_bytes(dir.path())));
            }
        };
        for n in 0..sagas {
            let permit = permits.clone().acquire_owned().await.expect("permit");
            let e = engine.clone();
            tasks.spawn(async move {
                let id = e
                    .start("bench", json!({ "n": n }), None)
                    .await
                    .expect("start");
                e.wait(id).await.expect("wait");
                drop(permit);
            });
            while let Some(r) = tasks.try_join_next() {
                r.expect("task");
                done += 1;
                note(done, &mut disk);
            }
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("task");
            done += 1;
            note(done, &mut disk);
        }
        let secs = start.elapsed().as_secs_f64();
        let deleted = deleted_so_far(&engine);
        engine.shutdown().await.expect("shutdown");
        RetentionRun {
            sagas,
            secs,
            deleted,
            disk,
        }
    })
}

fn main() {
    #[cfg(feature = "postgres")]
    {
        let argv: Vec<String> = std::env::args().collect();
        if argv.get(1).map(String::as_str) == Some("--pg-worker") {
            if let Err(e) = pg::worker(&argv[2..]) {
                eprintln!("{e}");
                std::process::exit(1);
            }
            return;
        }
    }
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if a.pg_only {
        // Only the PostgreSQL figures (and --scale): its keys alone on the last line.
        println!("{}", extras(&rt, &a));
        return;
    }

    println!("raw sled, {RECORD_BYTES}-byte records, flush + fdatasync:");
    let fsync = raw_fsync(a.raw_records);
    println!("  one per record:             {fsync:>10.0} records/s");
    let group = raw_group_commit(a.raw_records * 100, 64);
    println!("  group commit, 64 writers:   {group:>10.0} records/s");
    println!();

    let mut runs = Vec::new();
    for &c in &a.concurrency {
        // At concurrency 1 every saga pays its syncs alone: fewer sagas say as much.
        let n = if c == 1 { a.sagas.min(2_000) } else { a.sagas };
        runs.push(run_engine(&rt, 3, c, n));
    }
    runs.push(run_engine(&rt, 10, 1024, a.sagas / 2));
    // Parallel groups: every saga takes at least three waits, so c=1 runs few of them
    // (300 take about 10 s); the same five steps in a row for comparison.
    let wait_ms = STEP_WAIT.as_millis();
    let parallel_c1 = run_definition(
        &rt,
        parallel_definition(STEP_WAIT),
        format!("group c=1 ({wait_ms}ms)"),
        (5, Shape::Parallel),
        1,
        a.sagas.min(300),
    );
    let serial_c1 = run_definition(
        &rt,
        serial_wait_definition(STEP_WAIT),
        format!("5 in row c=1 ({wait_ms}ms)"),
        (5, Shape::SerialWait),
        1,
        a.sagas.min(200),
    );
    let parallel_c1024 = run_definition(
        &rt,
        parallel_definition(STEP_WAIT),
        format!("group c=1024 ({wait_ms}ms)"),
        (5, Shape::Parallel),
        1024,
        a.sagas,
    );
    runs.push(parallel_c1);
    runs.push(serial_c1);
    runs.push(parallel_c1024);
    // Retention deleting beside a c=1024 run: every saga is due 1 s after it finished;
    // the default pace (at most 2,000 deletions/s).
    let with_retention = run_with_retention(
        &rt,
        1024,
        a.sagas,
        Duration::from_secs(1),
        10,
        EngineOptions::default().retention_max_per_sec,
    );
    // The soak keeps up with the sagas it makes: unpaced.
    let soak = (a.retention_soak > 0).then(|| {
        run_with_retention(
            &rt,
            1024,
            a.retention_soak,
            Duration::from_secs(5),
            20,
            None,
        )
    });
    let limiter = limiter_rate(&rt, 1_000, 3_000);
    // Three seconds of lookups at the limit: enough batches to count their seams.
    let reconciled = reconcile_rate(&rt, a.sagas.clamp(300, 1_500), 500);
    let probe = memory_probe(&rt, 1024, false);
    let probe_sled = memory_probe(&rt, 1024, true);

    println!(
        "{:<24} {:>8} {:>10} {:>11} {:>11} {:>8} {:>8} {:>8} {:>9} {:>10} {:>9}",
        "run",
        "sagas",
        "sagas/s",
        "records/s",
        "writes/s",
        "syncs",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "disk/saga",
        "vs group"
    );
    for r in &runs {
        println!(
            "{:<24} {:>8} {:>10.0} {:>11.0} {:>11.0} {:>8} {:>8.2} {:>8.2} {:>9.2} {:>9.0}B {:>9.3}",
            r.name,
            r.sagas,
            r.sagas_per_sec(),
            r.records as f64 / r.secs,
            r.writes_per_sec(),
            r.syncs,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.disk_per_saga,
            r.writes_per_sec() / group,
        );
    }
    let find_shape = |shape: Shape, steps: usize, c: u64| {
        runs.iter()
            .find(|r| r.shape == shape && r.steps == steps && r.concurrency == c)
    };
    let find = |steps: usize, c: u64| find_shape(Shape::Noop, steps, c);
    let par_c1 = find_shape(Shape::Parallel, 5, 1);
    let par_c1024 = find_shape(Shape::Parallel, 5, 1024);
    let serial_wait_c1 = find_shape(Shape::SerialWait, 5, 1);
    let wait_ms = STEP_WAIT.as_secs_f64() * 1000.0;
    // The least a group saga can take at c=1: three waits in sequence (the first step,
    // the group, the last step) plus its durable writes, each at the raw one-sync cost.
    let par_floor_ms = par_c1.map(|r| 3.0 * wait_ms + r.writes_per_saga() * 1000.0 / fsync);
    let c1 = find(3, 1);
    let c1024 = find(3, 1024);
    // A saga at concurrency 1 needs (writes per saga) durable writes, each costing
    // 1 / raw fsync rate.
    let durable_cost_ms = c1.map_or(0.0, |r| r.writes as f64 / r.sagas as f64 * 1000.0 / fsync);
    println!();
    println!(
        "memory per in-flight saga (1024 held in step 1): engine {probe:.0} B of live heap; \
         {probe_sled:.0} B with sled's cache growth for their writes"
    );
    println!(
        "rate limiter (sagaflow-steps), 200 callers, limit 1000/s: {limiter:.0}/s ({:.3} of the limit)",
        limiter / 1000.0
    );
    println!(
        "reconciler: {} sagas, {} lookups ({} ms each) over 2 integrations limited to {}/s \
         each: {:.0} lookups/s per integration in {:.2} s ({:.3} of the limit)",
        reconciled.sagas,
        reconciled.lookups,
        LOOKUP_LATENCY.as_millis(),
        reconciled.limit,
        reconciled.per_integration(),
        reconciled.secs,
        reconciled.per_integration() / f64::from(reconciled.limit)
    );
    if let Some(r) = c1 {
        println!(
            "c=1: p50 {:.3} ms against {:.3} ms of durable writes ({:.2} writes/saga): {:.2}x",
            r.p50_ms,
            durable_cost_ms,
            r.writes as f64 / r.sagas as f64,
            r.p50_ms / durable_cost_ms
        );
    }
    if let (Some(p), Some(floor)) = (par_c1, par_floor_ms) {
        println!(
            "parallel group (step, group of 3, step; each waits {wait_ms:.0} ms), c=1: p50 {:.2} ms, \
             p99 {:.2} ms against a floor of {floor:.2} ms (3 waits + {:.2} durable writes at the \
             raw one-sync rate): {:.2}x; the same 5 steps in a row: p50 {}",
            p.p50_ms,
            p.p99_ms,
            p.writes_per_saga(),
            p.p50_ms / floor,
            serial_wait_c1.map_or("-".into(), |s| format!("{:.2} ms", s.p50_ms)),
        );
    }
    if let Some(p) = par_c1024 {
        println!(
            "parallel group, c=1024: {:.0} sagas/s ({:.0} for 3 no-op steps), {:.2} durable \
             writes per saga ({}), {:.3} of raw group-commit records/s",
            p.sagas_per_sec(),
            c1024.map_or(0.0, Run::sagas_per_sec),
            p.writes_per_saga(),
            c1024.map_or("-".into(), |r| format!(
                "{:.2} for 3 no-op steps",
                r.writes_per_saga()
            )),
            p.writes_per_sec() / group,
        );
    }
    println!(
        "3-step c=1024 with retention (due 1 s after finishing, at most 2,000 deletions/s): \
         {:.0} sagas/s, {:.0} deleted/s meanwhile ({} of {})",
        with_retention.sagas as f64 / with_retention.secs,
        with_retention.deleted as f64 / with_retention.secs,
        with_retention.deleted,
        with_retention.sagas
    );
    if let Some(s) = &soak {
        println!(
            "retention soak: {} sagas at {:.0}/s, {} deleted meanwhile; data directory size \
             along the way (sagas done: bytes):",
            s.sagas,
            s.sagas as f64 / s.secs,
            s.deleted
        );
        for (n, bytes) in &s.disk {
            println!("  {n:>9}: {:>8.1} MiB", *bytes as f64 / (1 << 20) as f64);
        }
    }
    let extras = extras(&rt, &a);
    let json = json!({
        "raw_fsync_per_sec": fsync.round(),
        "raw_group_commit_records_per_sec": group.round(),
        "sagas_per_sec_c1": c1.map(|r| r.sagas_per_sec().round()),
        "sagas_per_sec_c64": find(3, 64).map(|r| r.sagas_per_sec().round()),
        "sagas_per_sec_c1024": c1024.map(|r| r.sagas_per_sec().round()),
        "sagas_per_sec_10step_c1024": find(10, 1024).map(|r| r.sagas_per_sec().round()),
        "p50_ms_c1": c1.map(|r| r.p50_ms),
        "p99_ms_c1": c1.map(|r| r.p99_ms),
        "p50_ms_c1024": c1024.map(|r| r.p50_ms),
        "p99_ms_c1024": c1024.map(|r| r.p99_ms),
        "p999_ms_c1024": c1024.map(|r| r.p999_ms),
        "durable_write_cost_ms_c1": durable_cost_ms,
        "p50_over_durable_cost_c1": c1.map(|r| r.p50_ms / durable_cost_ms),
        "writes_per_saga_3step": c1024.map(|r| r.writes as f64 / r.sagas as f64),
        "limiter_achieved_per_sec_at_1000": limiter.round(),
        "mem_bytes_per_inflight": probe.round(),
        "mem_bytes_per_inflight_with_sled": probe_sled.round(),
        "disk_bytes_per_saga_c1024": c1024.map(|r| r.disk_per_saga.round()),
        "ratio_to_group_commit": c1024.map(|r| r.writes_per_sec() / group),
        "sagas_per_sec_c1024_with_retention": (with_retention.sagas as f64 / with_retention.secs).round(),
        "retention_deleted_per_sec": (with_retention.deleted as f64 / with_retention.secs).round(),
        "retention_soak_sagas": soak.as_ref().map(|s| s.sagas),
        "retention_soak_deleted": soak.as_ref().map(|s| s.deleted),
        "retention_soak_disk_bytes": soak.as_ref().map(|s| s.disk.clone()),
        "parallel_step_wait_ms": STEP_WAIT.as_millis() as u64,
        "parallel_p50_ms_c1": par_c1.map(|r| r.p50_ms),
        "parallel_p99_ms_c1": par_c1.map(|r| r.p99_ms),
        "parallel_floor_ms_c1": par_floor_ms,
        "parallel_p50_over_floor_c1": par_c1.zip(par_floor_ms).map(|(r, f)| r.p50_ms / f),
        "parallel_writes_per_saga_c1": par_c1.map(Run::writes_per_saga),
        "serial5_wait_p50_ms_c1": serial_wait_c1.map(|r| r.p50_ms),
        "parallel_sagas_per_sec_c1024": par_c1024.map(|r| r.sagas_per_sec().round()),
        "parallel_p50_ms_c1024": par_c1024.map(|r| r.p50_ms),
        "parallel_p99_ms_c1024": par_c1024.map(|r| r.p99_ms),
        "parallel_writes_per_saga": par_c1024.map(Run::writes_per_saga),
        "parallel_ratio_to_group_commit": par_c1024.map(|r| r.writes_per_sec() / group),
        "reconcile_limit_per_sec": reconciled.limit,
        "reconcile_lookups_per_sec": reconciled.per_integration().round(),
        "reconcile_ratio_to_limit": reconciled.per_integration() / f64::from(reconciled.limit),
        "reconcile_lookup_ms": LOOKUP_LATENCY.as_millis() as u64,
    });
    let mut json = json;
    if let (Some(o), Some(e)) = (json.as_object_mut(), extras.as_object()) {
        o.extend(e.clone());
    }
    println!("{json}");
}

/// The PostgreSQL runs, the scale queries, the takeover at scale and the idle cost:
/// printed as they come, and returned as the keys they add to the last JSON line.
fn extras(rt: &tokio::runtime::Runtime, a: &Args) -> serde_json::Value {
    // Used only by the PostgreSQL parts.
    let _ = &rt;
    #[cfg(feature = "postgres")]
    let pgf = a
        .database_url
        .as_deref()
        .and_then(|url| pg::measure(rt, url, a.pg_sagas));
    #[cfg(not(feature = "postgres"))]
    let pgf: Option<()> = {
        if a.database_url.is_some() {
            println!("built without the `postgres` feature: no PostgreSQL figures");
        }
        None
    };
    // Listing and counting over a large store.
    let mut scales = Vec::new();
    if a.scale > 0 {
        let dir = tempfile::tempdir().expect("temp dir");
        let sled = Arc::new(sagaflow::store::SledLog::open(dir.path()).expect("sled"));
        scales.push(scale::measure("sled", sled, a.scale, None));
        #[cfg(feature = "postgres")]
        if let Some(url) = &a.database_url {
            let schema = format!("bench_scale_{}", std::process::id());
            match store::PgLog::connect(url, store::PgOptions::default().schema(schema)) {
                Ok(pg) => {
                    let pg = Arc::new(pg);
                    let owner = store::OwnerId::new("bench");
                    scales.push(scale::measure(
                        "postgres",
                        pg.clone(),
                        a.scale,
                        Some(&owner),
                    ));
                    let _ = pg.drop_schema();
                }
                Err(e) => println!("scale on PostgreSQL skipped: {e}"),
            }
        }
        for f in &scales {
            println!(
                "{} with {} sagas (filled in {:.1} s): first page of 50 {:.2} ms, a page from a \
                 cursor half way {:.2} ms, newest parked page {:.2} ms, stats {:.2} ms",
                f.store,
                f.sagas,
                f.fill_secs,
                f.first_page_ms,
                f.cursor_page_ms,
                f.parked_page_ms,
                f.stats_ms
            );
        }
    }
    #[cfg(feature = "postgres")]
    let claim = match (&a.database_url, a.pg_claim) {
        (Some(url), n) if n > 0 => match pg::claim_at_scale(rt, url, n) {
            Ok((lease, claimed, done)) => {
                println!(
                    "takeover of {n} sagas on PostgreSQL: the holder died; lease {lease:.1} s; all \
                     claimed {claimed:.2} s and all completed {done:.2} s after the death"
                );
                Some((claimed, done))
            }
            Err(e) => {
                println!("takeover at scale failed: {e}");
                None
            }
        },
        _ => None,
    };
    #[cfg(not(feature = "postgres"))]
    let claim: Option<(f64, f64)> = None;
    #[cfg(feature = "postgres")]
    let idle = match &a.database_url {
        Some(url) if a.pg_idle_secs > 0 => match pg::idle_queries(rt, url, a.pg_idle_secs) {
            Ok((empty, loaded)) => {
                println!(
                    "idle engine on PostgreSQL: {empty:.2} statements/s with an empty store, \
                     {loaded:.2}/s with 10 definitions, 1,000 sagas held and 1,000 on hour-long \
                     timers"
                );
                Some((empty, loaded))
            }
            Err(e) => {
                println!("idle measurement failed: {e}");
                None
            }
        },
        _ => None,
    };
    #[cfg(not(feature = "postgres"))]
    let idle: Option<(f64, f64)> = None;
    #[cfg(feature = "postgres")]
    if let Some(f) = &pgf {
        println!(
            "{:<22} {:>8} {:>10} {:>8} {:>8} {:>16}",
            "PostgreSQL run", "sagas", "sagas/s", "p50 ms", "p99 ms", "vs raw commits"
        );
        for r in &f.runs {
            println!(
                "{:<22} {:>8} {:>10.0} {:>8.2} {:>8.2} {:>16.3}",
                format!("3-step p={} c={}", r.processes, r.concurrency),
                r.sagas,
                r.sagas_per_sec(),
                r.p50_ms,
                r.p99_ms,
                r.sagas_per_sec() / f.raw_commits_c64
            );
        }
    }
    #[cfg(feature = "postgres")]
    let pg_key = |p: u32, c: u64, what: &str| -> Option<f64> {
        let r = pgf
            .as_ref()?
            .runs
            .iter()
            .find(|r| r.processes == p && r.concurrency == c)?;
        Some(match what {
            "rate" => r.sagas_per_sec().round(),
            "p50" => r.p50_ms,
            _ => r.p99_ms,
        })
    };
    #[cfg(not(feature = "postgres"))]
    let pg_key = |_: u32, _: u64, _: &str| -> Option<f64> { pgf.map(|()| 0.0) };
    #[cfg(feature = "postgres")]
    let pg_raw = pgf
        .as_ref()
        .map(|f| (f.raw_commits_c1.round(), f.raw_commits_c64.round()));
    #[cfg(not(feature = "postgres"))]
    let pg_raw: Option<(f64, f64)> = None;
    json!({
        "pg_sagas_per_sec_c1024_1proc": pg_key(1, 1024, "rate"),
        "pg_sagas_per_sec_c1024_2proc": pg_key(2, 1024, "rate"),
        "pg_sagas_per_sec_c64_1proc": pg_key(1, 64, "rate"),
        "pg_sagas_per_sec_c64_2proc": pg_key(2, 64, "rate"),
        "pg_sagas_per_sec_c1": pg_key(1, 1, "rate"),
        "pg_p50_ms_c1": pg_key(1, 1, "p50"),
        "pg_p99_ms_c1": pg_key(1, 1, "p99"),
        "pg_p50_ms_c1024_2proc": pg_key(2, 1024, "p50"),
        "pg_p99_ms_c1024_2proc": pg_key(2, 1024, "p99"),
        "pg_raw_commits_per_sec_c1": pg_raw.map(|r| r.0),
        "pg_raw_commits_per_sec_c64": pg_raw.map(|r| r.1),
        "pg_claim_all_secs": claim.map(|c| c.0),
        "pg_claim_completed_secs": claim.map(|c| c.1),
        "pg_claim_sagas": (a.pg_claim > 0).then_some(a.pg_claim),
        "pg_idle_queries_per_sec_empty": idle.map(|i| i.0),
        "pg_idle_queries_per_sec_loaded": idle.map(|i| i.1),
        "scale_sagas": (a.scale > 0).then_some(a.scale),
        "scale_sled_first_page_ms": scales.iter().find(|f| f.store == "sled").map(|f| f.first_page_ms),
        "scale_sled_cursor_page_ms": scales.iter().find(|f| f.store == "sled").map(|f| f.cursor_page_ms),
        "scale_sled_stats_ms": scales.iter().find(|f| f.store == "sled").map(|f| f.stats_ms),
        "scale_pg_first_page_ms": scales.iter().find(|f| f.store == "postgres").map(|f| f.first_page_ms),
        "scale_pg_cursor_page_ms": scales.iter().find(|f| f.store == "postgres").map(|f| f.cursor_page_ms),
        "scale_pg_stats_ms": scales.iter().find(|f| f.store == "postgres").map(|f| f.stats_ms),
    })
}
