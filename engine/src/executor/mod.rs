//! The engine: the only part of Sagaflow that does I/O.
//!
//! It owns the store, the group-commit writer, the clock and the entropy; it runs one
//! task per active saga, each a loop of decide → record → sync → effect → record.

mod bulk;
mod commit;
mod driver;
mod inbox;
mod ownership;
mod reconciler;
mod retention;
mod signal;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

pub use bulk::{BulkAction, BulkConfirm, BulkReport, BULK_MAX};
use commit::Committer;
pub use commit::{CommitMode, CommitStats};
pub(crate) use driver::Driver;
pub(crate) use ownership::claim_all;
pub use reconciler::{FoundDrift, Pace, ReconcileOptions, ReconcileReport};

use crate::admin::{self, ListFilter, Stats};
use crate::clock::{Clock, Entropy, OsEntropy, SeededEntropy, SystemClock, Timestamp};
use crate::definition::SagaDefinition;
use crate::error::{Error, Result};
use crate::ids::{Lsn, SagaId, StartKey};
use crate::machine::{
    check_cancel, check_repair, Event, LogRecord, ParkReason, Repair, SagaState, SagaStatus,
};
use crate::metrics::Metrics;
use crate::recovery::{self, RecoveryReport};
use crate::store::{codec, Fence, Lease, OwnerId, SagaLog, SagaMeta, SledLog};

/// How to start a saga, beyond its input ([`Engine::start_with`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StartOptions {
    /// The start key (G6).
    pub key: Option<StartKey>,
    /// Not before when the first step runs: a delayed start.
    pub not_before: Option<Timestamp>,
    /// When the saga must have ended; overrides the definition's deadline. When it
    /// passes, the saga is cancelled, or parked if its pivot has started.
    pub deadline: Option<Timestamp>,
}

impl StartOptions {
    /// Sets [`StartOptions::key`].
    pub fn key(mut self, key: StartKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Sets [`StartOptions::not_before`].
    pub fn not_before(mut self, at: Timestamp) -> Self {
        self.not_before = Some(at);
        self
    }

    /// Sets [`StartOptions::deadline`].
    pub fn deadline(mut self, at: Timestamp) -> Self {
        self.deadline = Some(at);
        self
    }
}

/// What [`Engine::start_once`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "started", content = "id", rename_all = "snake_case")]
pub enum Started {
    /// A new saga was started.
    New(SagaId),
    /// A saga had been started under this key (with the same input) before; nothing new
    /// runs.
    Existing(SagaId),
}

impl Started {
    /// The saga's id, either way.
    pub fn id(&self) -> SagaId {
        match self {
            Started::New(id) | Started::Existing(id) => *id,
        }
    }

    /// Whether this call started it.
    pub fn is_new(&self) -> bool {
        matches!(self, Started::New(_))
    }
}

/// How a saga ended, as [`Engine::wait`] reports it.
///
/// Serializes with its kind in `outcome`:
///
/// ```
/// use sagaflow::SagaOutcome;
///
/// let o = SagaOutcome::Compensated { reason: "card declined".into() };
/// assert_eq!(
///     serde_json::to_string(&o)?,
///     r#"{"outcome":"compensated","reason":"card declined"}"#
/// );
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SagaOutcome {
    /// Every step succeeded.
    Completed {
        /// Each step's output, by step name.
        outputs: BTreeMap<String, Value>,
    },
    /// Every step that may have taken effect was compensated.
    Compensated {
        /// Why compensation began.
        reason: String,
    },
    /// The saga needs an operator.
    Parked {
        /// Why.
        reason: ParkReason,
    },
    /// An operator settled the saga by hand.
    Resolved {
        /// Who.
        operator: String,
        /// Why.
        reason: String,
    },
    /// It was cancelled (by a caller, or because its deadline passed) and everything
    /// that may have taken effect was compensated.
    Cancelled {
        /// Who asked (`deadline` for a deadline).
        operator: String,
        /// Why.
        reason: String,
    },
}

impl SagaOutcome {
    /// The outcome a state has reached, or `None` while it is still active.
    pub fn of(state: &SagaState) -> Option<Self> {
        match state.status {
            SagaStatus::Completed => Some(SagaOutcome::Completed {
                outputs: state.outputs(),
            }),
            SagaStatus::Compensated => Some(SagaOutcome::Compensated {
                reason: state.compensation_reason.clone().unwrap_or_default(),
            }),
            SagaStatus::Parked => state
                .parked
                .clone()
                .map(|reason| SagaOutcome::Parked { reason }),
            SagaStatus::Resolved => state
                .resolution
                .clone()
                .map(|(operator, reason)| SagaOutcome::Resolved { operator, reason }),
            SagaStatus::Cancelled => state
                .cancellation
                .clone()
                .map(|(operator, reason)| SagaOutcome::Cancelled { operator, reason }),
            SagaStatus::Running | SagaStatus::Compensating => None,
        }
    }
}

/// Engine settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EngineOptions {
    /// The largest saga input or step output accepted, serialized, in bytes. A larger
    /// input is refused at start; a larger output fails its attempt permanently.
    pub max_payload_bytes: usize,
    /// The deepest nesting of arrays and objects accepted in a saga input or step output
    /// (at most [`crate::MAX_PAYLOAD_DEPTH`], which a larger value is clamped to). A deeper
    /// input is refused at start; a deeper output fails its attempt permanently.
    pub max_payload_depth: usize,
    /// How long [`EngineBuilder::open`] waits for another engine to release the data
    /// directory.
    pub lock_wait: Duration,
    /// Where group commit runs; see [`CommitMode`].
    pub commit_mode: CommitMode,
    /// An active saga with no transition for longer than this is stuck: logged once,
    /// counted in `sagaflow_stuck_sagas`, listed by [`crate::admin::ListFilter::stuck_for`].
    /// `None` turns the watchdog off.
    pub stuck_after: Option<Duration>,
    /// How often the retention task deletes finished sagas whose definition's
    /// retention has passed; `None` turns it off (sagas are then deleted only by
    /// [`Engine::purge`]).
    pub retention_every: Option<Duration>,
    /// At most this many finished sagas per retention pass (passes follow each other at
    /// once while there is a backlog).
    pub retention_batch: usize,
    /// The retention of sagas whose definition is not registered with this engine.
    pub default_retention: crate::Retention,
    /// At most this many deletions per second by the retention task, so that a backlog
    /// of finished sagas is worked off without taking the store from the sagas that
    /// run; `None`: as fast as passes go.
    pub retention_max_per_sec: Option<u32>,
    /// In a store several engine processes share: how often this process claims sagas
    /// whose lease expired and picks up repairs asked of it by other processes (leases
    /// are renewed every third of their time to live). A takeover after a crash happens
    /// within the lease's time to live plus one tick.
    pub lease_tick: Duration,
    /// In a shared store: at most this many sagas claimed per store call (at least 1
    /// is used).
    pub claim_batch: usize,
    /// How long the inbox keeps a delivered event (taken by a saga or not): an event
    /// for a key no saga waits on is visible to operators that long, and a taken one
    /// answers a repeated delivery as a duplicate that long. `None`: kept until purged
    /// by hand. Default 7 days. Purged by the retention task.
    pub inbox_retention: Option<Duration>,
    /// How the reconciler checks finished sagas against the systems their steps
    /// called (the steps' [`crate::Reconcile`] hooks). `None` (the default): no
    /// background task; [`Engine::reconcile_now`] still runs with the defaults.
    pub reconcile: Option<ReconcileOptions>,
}

impl Default for EngineOptions {
    /// 1 MiB payloads nested at most 64 levels; wait 10 s for the directory lock.
    fn default() -> Self {
        EngineOptions {
            max_payload_bytes: 1 << 20,
            max_payload_depth: 64,
            lock_wait: Duration::from_secs(10),
            commit_mode: CommitMode::default(),
            stuck_after: Some(Duration::from_secs(15 * 60)),
            retention_every: Some(Duration::from_secs(10)),
            retention_batch: 1000,
            default_retention: crate::Retention::default(),
            retention_max_per_sec: Some(2000),
            lease_tick: Duration::from_secs(1),
            claim_batch: 1000,
            inbox_retention: Some(Duration::from_secs(7 * 24 * 3600)),
            reconcile: None,
        }
    }
}

impl EngineOptions {
    /// Sets [`EngineOptions::max_payload_bytes`].
    pub fn with_max_payload_bytes(mut self, n: usize) -> Self {
        self.max_payload_bytes = n;
        self
    }

    /// Sets [`EngineOptions::max_payload_depth`] (clamped to [`crate::MAX_PAYLOAD_DEPTH`]).
    pub fn with_max_payload_depth(mut self, n: usize) -> Self {
        self.max_payload_depth = n.min(crate::MAX_PAYLOAD_DEPTH);
        self
    }

    /// Sets [`EngineOptions::commit_mode`].
    pub fn with_commit_mode(mut self, mode: CommitMode) -> Self {
        self.commit_mode = mode;
        self
    }

    /// Sets [`EngineOptions::stuck_after`].
    pub fn with_stuck_after(mut self, d: Option<Duration>) -> Self {
        self.stuck_after = d;
        self
    }

    /// Sets [`EngineOptions::retention_every`] and [`EngineOptions::retention_batch`].
    pub fn with_retention_task(mut self, every: Option<Duration>, batch: usize) -> Self {
        self.retention_every = every;
        self.retention_batch = batch.max(1);
        self
    }

    /// Sets [`EngineOptions::retention_max_per_sec`].
    pub fn with_retention_max_per_sec(mut self, n: Option<u32>) -> Self {
        self.retention_max_per_sec = n;
        self
    }

    /// Sets [`EngineOptions::default_retention`].
    pub fn with_default_retention(mut self, r: crate::Retention) -> Self {
        self.default_retention = r;
        self
    }

    /// Sets [`EngineOptions::inbox_retention`].
    pub fn with_inbox_retention(mut self, keep: Option<Duration>) -> Self {
        self.inbox_retention = keep;
        self
    }

    /// Sets [`EngineOptions::reconcile`]: the reconciler runs in the background.
    pub fn with_reconciler(mut self, options: ReconcileOptions) -> Self {
        self.reconcile = Some(options);
        self
    }

    /// Sets [`EngineOptions::lease_tick`].
    pub fn with_lease_tick(mut self, d: Duration) -> Self {
        self.lease_tick = d;
        self
    }

    /// Sets [`EngineOptions::lock_wait`].
    pub fn with_lock_wait(mut self, d: Duration) -> Self {
        self.lock_wait = d;
        self
    }
}

/// A saga driven in this process.
struct Driven {
    /// Where its outcome is published, once somebody waits for it.
    cell: Option<Arc<OutcomeCell>>,
    /// Wakes its driver when a repair is queued for it. One per saga rather than one
    /// broadcast to every driver: a repair wakes only the driver it is for, and in a
    /// deterministic order (a `watch` channel wakes its receivers in a random order,
    /// which made two simulated runs of one seed differ).
    wake: Arc<tokio::sync::Notify>,
}

/// Where a saga's outcome is published. Created only when somebody waits: a saga that
/// nobody awaits costs one map entry, not a channel.
#[derive(Default)]
struct OutcomeCell {
    value: Mutex<Option<Result<SagaOutcome>>>,
    ready: tokio::sync::Notify,
}

impl OutcomeCell {
    async fn get(&self) -> Result<SagaOutcome> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            // Registered before looking, so a publish in between is not missed.
            notified.as_mut().enable();
            if let Some(v) = lock(&self.value).clone() {
                return v;
            }
            notified.await;
        }
    }

    fn publish(&self, outcome: Result<SagaOutcome>) {
        *lock(&self.value) = Some(outcome);
        self.ready.notify_waiters();
    }
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn SagaLog>,
    pub(crate) committer: Committer,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) entropy: Arc<dyn Entropy>,
    pub(crate) options: EngineOptions,
    defs: HashMap<String, BTreeMap<u32, Arc<SagaDefinition>>>,
    pub(crate) stopping: watch::Sender<bool>,
    running: Mutex<HashMap<SagaId, Driven>>,
    tasks: Mutex<JoinSet<()>>,
    start_locks: Mutex<HashMap<StartKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Repairs for running sagas, picked up by their drivers.
    pub(crate) repairs: Mutex<HashMap<SagaId, PendingRepair>>,
    /// One repair at a time, engine-wide: repairs are rare and must not race.
    pub(crate) repair_lock: tokio::sync::Mutex<()>,
    pub(crate) metrics: Metrics,
    /// Who this process is among those sharing the store.
    pub(crate) owner: OwnerId,
    /// Stops the renewal task: set only once every driver has stopped, so that leases
    /// are kept while a shutdown lets the attempts in flight finish.
    pub(crate) renewals_stop: watch::Sender<bool>,
    renewals: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The await steps of this process, by the correlation key they wait on.
    pub(crate) waiters: inbox::Waiters,
    /// One reconciler pass at a time in this process (the background task's and
    /// [`Engine::reconcile_now`]'s).
    pub(crate) reconciling: tokio::sync::Mutex<()>,
}

/// What an operator (or a caller) asks of a saga's driver.
#[derive(Clone)]
pub(crate) enum Asked {
    /// A repair.
    Repair(Repair),
    /// A cancellation.
    Cancel,
}

/// Where a repair asked of a saga that no local driver drives goes.
enum Routed {
    /// The saga's driver (here or in another process) applied or refused it.
    Answered(Result<SagaMeta>),
    /// The saga is not active: the caller applies it to the stored saga, under this
    /// lease, which this process now holds.
    Stored(Lease),
}

/// A repair (or cancellation) waiting for the driver of a running saga to apply it.
pub(crate) struct PendingRepair {
    pub(crate) action: Asked,
    pub(crate) operator: String,
    pub(crate) reason: String,
    pub(crate) reply: tokio::sync::oneshot::Sender<std::result::Result<SagaMeta, RepairError>>,
}

/// How a repair handed to a driver ended.
pub(crate) enum RepairError {
    /// Applied or refused: this is the answer.
    Final(Error),
    /// The driver ended before it got to it: apply it to the stored saga instead.
    Gone,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here is a single map operation: a panic cannot leave the
    // data half-updated, so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Runs a store call: at once on a local store (so simulations stay deterministic),
    /// on a thread of its own when the store is remote, so that a slow network never
    /// blocks the async runtime.
    pub(crate) async fn io<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn SagaLog) -> T + Send + 'static,
    ) -> Result<T> {
        if !self.store.remote() {
            return Ok(f(&*self.store));
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .map_err(|e| Error::Store(Arc::new(crate::store::Error::Backend(e.to_string()))))
    }

    /// A call of the store's lease operations, made as [`Inner::io`] makes store calls;
    /// `None` for a store one process owns alone.
    pub(crate) async fn lease_io<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn crate::store::Leases) -> crate::store::Result<T> + Send + 'static,
    ) -> Result<Option<T>> {
        Ok(self
            .io(move |store| store.leases().map(f).transpose())
            .await??)
    }

    /// Whether several engine processes share the store (sagas are leased).
    pub(crate) fn shared(&self) -> bool {
        self.store.leases().is_some()
    }

    /// The fence a write under `epoch` carries.
    pub(crate) fn fence(&self, epoch: u64) -> Fence {
        Fence {
            owner: self.owner.clone(),
            epoch,
        }
    }

    /// Hands a repair or a cancellation to the driver of `id`, if this engine drives it,
    /// and waits for its answer. `None`: not driven here (or it ended meanwhile): the
    /// caller deals with the stored saga.
    pub(crate) async fn ask_driver(
        &self,
        id: SagaId,
        action: Asked,
        operator: &str,
        reason: &str,
    ) -> Option<Result<SagaMeta>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = {
            // Checked and queued under the `running` lock: the driver's exit takes the
            // same lock to collect what is queued, so nothing waits forever.
            let running = lock(&self.running);
            let driven = running.get(&id).map(|d| d.wake.clone());
            if driven.is_some() {
                lock(&self.repairs).insert(
                    id,
                    PendingRepair {
                        action,
                        operator: operator.to_string(),
                        reason: reason.to_string(),
                        reply: tx,
                    },
                );
            }
            driven
        };
        let wake = queued?;
        wake.notify_one();
        match rx.await {
            Ok(Ok(meta)) => Some(Ok(meta)),
            Ok(Err(RepairError::Final(e))) => Some(Err(e)),
            Ok(Err(RepairError::Gone)) | Err(_) => None,
        }
    }

    /// The names of the registered definitions: what this process claims in a shared
    /// store.
    pub(crate) fn definition_names(&self) -> Vec<String> {
        self.defs.keys().cloned().collect()
    }

    pub(crate) fn definition(&self, name: &str, version: u32) -> Option<Arc<SagaDefinition>> {
        self.defs.get(name)?.get(&version).cloned()
    }

    /// How long a finished saga of this definition is kept.
    pub(crate) fn retention_of(&self, name: &str, version: u32) -> crate::Retention {
        self.definition(name, version)
            .map_or(self.options.default_retention, |d| d.retention())
    }

    /// The shortest retention of any definition (and of unregistered ones), or `None`
    /// if every one is forever: how far back the retention task must look.
    pub(crate) fn shortest_retention(&self) -> Option<Duration> {
        self.defs
            .values()
            .flat_map(|v| v.values())
            .map(|d| d.retention())
            .chain([self.options.default_retention])
            .filter_map(|r| match r {
                crate::Retention::For(d) => Some(d),
                crate::Retention::Forever => None,
            })
            .min()
    }

    /// Spawns the task that drives a saga, and the cell its outcome is published in.
    /// `false` if a driver for the saga runs already (this one is dropped).
    pub(crate) fn spawn(self: &Arc<Self>, driver: Driver) -> bool {
        let id = driver.state().id;
        let wake = Arc::new(tokio::sync::Notify::new());
        let span = tracing::info_span!(
            "saga",
            saga_id = %id,
            definition = %driver.state().definition,
            version = driver.state().version
        );
        {
            let mut running = lock(&self.running);
            if running.contains_key(&id) {
                // Two drivers for one saga would write two records with one lsn: the
                // one already running keeps it.
                tracing::error!(saga_id = %id, "a driver for this saga is already running");
                return false;
            }
            running.insert(
                id,
                Driven {
                    cell: None,
                    wake: wake.clone(),
                },
            );
        }
        let inner = self.clone();
        lock(&self.tasks).spawn(
            async move {
                let outcome = driver.run(wake).await;
                match &outcome {
                    Ok(_) | Err(Error::ShuttingDown) => {}
                    // Another process holds the saga now, or it was handed back to the
                    // store to wait for its timer: nothing went wrong here.
                    Err(e @ (Error::Fenced { .. } | Error::NotRunning(_))) if inner.shared() => {
                        tracing::info!(reason = %e, code = e.code(), "this process stopped driving the saga");
                    }
                    // Another process started a saga under the same key first: this
                    // one was never written, and `start` answers with the other.
                    Err(e @ Error::StartKeyConflict { .. }) if inner.shared() => {
                        tracing::debug!(reason = %e, "start key taken by another process");
                    }
                    Err(e) => tracing::error!(error = %e, code = e.code(), "saga stopped"),
                }
                // Both maps under the `running` lock (always taken first): a repair is
                // queued only while the saga is in `running`, so none is left behind.
                let (cell, pending) = {
                    let mut running = lock(&inner.running);
                    let cell = running.remove(&id).and_then(|d| d.cell);
                    (cell, lock(&inner.repairs).remove(&id))
                };
                if let Some(cell) = cell {
                    cell.publish(outcome);
                }
                // A repair that arrived as the saga ended goes to the stored saga.
                if let Some(p) = pending {
                    let _ = p.reply.send(Err(RepairError::Gone));
                }
            }
            .instrument(span),
        );
        true
    }
}

/// Flags stuck sagas: logs each once, keeps `sagaflow_stuck_sagas` current.
async fn watchdog(inner: Arc<Inner>, threshold: Duration) {
    let mut stopping = inner.stopping.subscribe();
    let every = (threshold / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut flagged: std::collections::HashSet<SagaId> = std::collections::HashSet::new();
    loop {
        if *stopping.borrow_and_update() {
            return;
        }
        let next = inner.clock.now().saturating_add(every);
        tokio::select! {
            biased;
            _ = stopping.changed() => return,
            () = inner.clock.sleep_until(next) => {}
        }
        let now = inner.clock.now();
        let filter = ListFilter::default().stuck_for(threshold);
        let Ok(Ok(stuck)) = inner
            .io(move |store| admin::list(store, &filter, now))
            .await
        else {
            continue;
        };
        inner.metrics.stuck.set(stuck.len() as i64);
        let mut still = std::collections::HashSet::new();
        for meta in stuck {
            if !flagged.contains(&meta.id) {
                tracing::warn!(
                    saga_id = %meta.id,
                    definition = %meta.definition,
                    status = %meta.status,
                    idle_secs = now.duration_since(meta.updated_at).as_secs(),
                    "saga stuck: no transition for longer than the threshold"
                );
            }
            still.insert(meta.id);
        }
        flagged = still;
    }
}

/// Builds an [`Engine`]: register definitions, inject clock and entropy, open a store.
///
/// ```
/// # async fn demo(def: sagaflow::SagaDefinition) -> sagaflow::Result<()> {
/// use sagaflow::Engine;
///
/// let dir = std::env::temp_dir().join("sagaflow-doc-builder");
/// let engine = Engine::builder().register(def).seed(42).open(&dir).await?;
/// engine.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct EngineBuilder {
    defs: Vec<SagaDefinition>,
    clock: Option<Arc<dyn Clock>>,
    entropy: Option<Arc<dyn Entropy>>,
    options: EngineOptions,
    owner: Option<OwnerId>,
}

impl EngineBuilder {
    /// Registers a definition. Sagas on disk find theirs by name and version.
    pub fn register(mut self, def: SagaDefinition) -> Self {
        self.defs.push(def);
        self
    }

    /// Uses `clock` instead of the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Uses `entropy` for jitter and saga ids.
    pub fn entropy(mut self, entropy: Arc<dyn Entropy>) -> Self {
        self.entropy = Some(entropy);
        self
    }

    /// Uses [`SeededEntropy`] with `seed`: replayable jitter and ids, for tests and
    /// simulations only (ids become predictable). Without it (and without `SAGA_SEED`),
    /// the engine uses [`OsEntropy`].
    pub fn seed(self, seed: u64) -> Self {
        self.entropy(Arc::new(SeededEntropy::new(seed)))
    }

    /// Names this process among those sharing a store (default: [`OwnerId::generate`]).
    pub fn owner(mut self, owner: OwnerId) -> Self {
        self.owner = Some(owner);
        self
    }

    /// Sets the options.
    pub fn options(mut self, options: EngineOptions) -> Self {
        self.options = options;
        self
    }

    /// Opens the engine on a sled store in directory `dir` (created if missing) and
    /// resumes every saga found there that is not finished.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateDefinition`], or [`Error::Store`] if the store cannot be opened
    /// (locked by another engine for longer than [`EngineOptions::lock_wait`], or an I/O
    /// error).
    pub async fn open(self, dir: impl AsRef<Path>) -> Result<Engine> {
        let dir = dir.as_ref().to_path_buf();
        let wait = self.options.lock_wait;
        // Waiting for the lock blocks; keep it off the runtime's threads so that an
        // engine being dropped on this runtime can finish letting go.
        let store = tokio::task::spawn_blocking(move || SledLog::open_waiting(dir, wait))
            .await
            .map_err(|e| Error::Store(Arc::new(crate::store::Error::Backend(e.to_string()))))??;
        self.open_with(Arc::new(store)).await
    }

    /// Opens the engine on a PostgreSQL database shared with other engine processes
    /// (`url` as in `DATABASE_URL`, e.g. `postgres://user@host/db`): creates or
    /// migrates the schema, then claims the sagas no live process holds. Each active
    /// saga is leased to one process; see `docs/operations.md`.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the database cannot be reached or its schema is newer than
    /// this engine knows; as [`EngineBuilder::open_with`].
    #[cfg(feature = "postgres")]
    pub async fn open_postgres(
        self,
        url: &str,
        options: crate::store::PgOptions,
    ) -> Result<Engine> {
        let url = url.to_string();
        let store =
            tokio::task::spawn_blocking(move || crate::store::PgLog::connect(&url, options))
                .await
                .map_err(|e| Error::Store(Arc::new(crate::store::Error::Backend(e.to_string()))))?
                .map_err(|e| Error::Store(Arc::new(e)))?;
        self.open_with(Arc::new(store)).await
    }

    /// Opens the engine on `store` and resumes every saga in it that is not finished.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateDefinition`], or [`Error::Store`] if the store cannot be read.
    pub async fn open_with(self, store: Arc<dyn SagaLog>) -> Result<Engine> {
        let mut defs: HashMap<String, BTreeMap<u32, Arc<SagaDefinition>>> = HashMap::new();
        for d in self.defs {
            let versions = defs.entry(d.name().to_string()).or_default();
            if versions.contains_key(&d.version()) {
                return Err(Error::DuplicateDefinition {
                    name: d.name().to_string(),
                    version: d.version(),
                });
            }
            versions.insert(d.version(), Arc::new(d));
        }
        let entropy = self.entropy.unwrap_or_else(|| {
            match SeededEntropy::seed_from_environment() {
                // Only a test sets SAGA_SEED: say so loudly, since seeded ids can be
                // predicted, but never log a seed that production would have drawn.
                Some(seed) => {
                    tracing::warn!(
                        seed,
                        "SAGA_SEED is set: saga ids are predictable (tests only)"
                    );
                    Arc::new(SeededEntropy::new(seed))
                }
                None => Arc::new(OsEntropy::new()),
            }
        });
        let committer = Committer::spawn(store.clone(), self.options.commit_mode)
            .map_err(|e| Error::Store(Arc::new(crate::store::Error::Io(e))))?;
        let inner = Arc::new(Inner {
            store,
            committer,
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            entropy,
            options: self.options,
            defs,
            stopping: watch::channel(false).0,
            running: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            start_locks: Mutex::new(HashMap::new()),
            repairs: Mutex::new(HashMap::new()),
            repair_lock: tokio::sync::Mutex::new(()),
            metrics: Metrics::new(),
            owner: self.owner.unwrap_or_else(OwnerId::generate),
            renewals_stop: watch::channel(false).0,
            renewals: Mutex::new(None),
            waiters: inbox::Waiters::default(),
            reconciling: tokio::sync::Mutex::new(()),
        });
        let report = recovery::recover(&inner).await?;
        if inner.shared() {
            tracing::info!(owner = %inner.owner, "sharing the store: leases on");
            // Not among the tasks a shutdown waits for: it must outlive the drivers.
            *lock(&inner.renewals) = Some(tokio::spawn(ownership::renew(inner.clone())));
            lock(&inner.tasks).spawn(ownership::run(inner.clone()));
        }
        if let Some(threshold) = inner.options.stuck_after {
            let watchdog = watchdog(inner.clone(), threshold);
            lock(&inner.tasks).spawn(watchdog);
        }
        if let Some(every) = inner.options.retention_every {
            let task = retention::run(inner.clone(), every, inner.options.retention_batch);
            lock(&inner.tasks).spawn(task);
        }
        if let Some(opts) = inner.options.reconcile.clone() {
            let task = reconciler::run(inner.clone(), Arc::new(opts));
            lock(&inner.tasks).spawn(task);
        }
        Ok(Engine {
            _last: Arc::new(AbortOnDrop(inner.clone())),
            inner,
            report: Arc::new(report),
        })
    }
}

/// A saga engine: starts sagas, drives them to their end, answers queries.
///
/// The queries that are plain functions (`status`, `state`, `history`, `list`, `find`,
/// `stats`, `metrics_text`, `readable_log`) read the store on the caller's thread. On
/// PostgreSQL each is a round trip: from async code, call them through
/// `tokio::task::spawn_blocking`, as the admin API does. The `async` methods never
/// block the runtime.
///
/// Cheap to clone: clones share one engine (hand one to each request handler). Dropping
/// the last clone aborts its sagas where they stand, as a crash would: everything
/// durable stays, and the next engine opened on the same store resumes it. Call
/// [`Engine::shutdown`] (from any clone) to stop cleanly instead.
///
/// ```
/// # async fn demo(engine: sagaflow::Engine) -> sagaflow::Result<()> {
/// let for_handler = engine.clone();
/// tokio::spawn(async move { for_handler.in_flight() });
/// engine.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
    report: Arc<RecoveryReport>,
    /// Held by every clone; the last one dropped aborts the sagas.
    _last: Arc<AbortOnDrop>,
}

/// Aborts an engine's tasks when the last [`Engine`] clone goes.
struct AbortOnDrop(Arc<Inner>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        lock(&self.0.tasks).abort_all();
        if let Some(r) = lock(&self.0.renewals).take() {
            r.abort();
        }
        self.0.committer.close();
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("store", &self.inner.store)
            .field("recovery", &self.report)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A builder.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// Starts a saga of the latest registered version of definition `name` with
    /// `input`, and returns its id once its start is durable.
    ///
    /// With a `start_key`, starting is idempotent (G6): if a saga was already started
    /// with that key and the same input, its id is returned and nothing new runs; with
    /// another input, [`Error::StartKeyConflict`]. To tell "started" from "already
    /// existed", use [`Engine::start_once`].
    ///
    /// # Errors
    ///
    /// [`Error::UnknownDefinition`], [`Error::InvalidInput`] if a step's input type
    /// rejects `input`, [`Error::PayloadTooLarge`], [`Error::PayloadTooDeep`],
    /// [`Error::StartKeyConflict`], [`Error::ShuttingDown`], or [`Error::Store`].
    pub async fn start(
        &self,
        name: &str,
        input: impl Serialize,
        start_key: Option<StartKey>,
    ) -> Result<SagaId> {
        let options = StartOptions {
            key: start_key,
            ..StartOptions::default()
        };
        self.begin(name, input, options).await.map(|s| s.id())
    }

    /// Starts a saga under `start_key` unless one was started under it before, and says
    /// which happened (G6). The same key with another input is refused.
    ///
    /// ```
    /// # async fn demo(engine: sagaflow::Engine) -> sagaflow::Result<()> {
    /// use sagaflow::{Error, StartKey, Started};
    ///
    /// let key = StartKey::new("order-1042")?;
    /// let first = engine.start_once("checkout", serde_json::json!({"cents": 500}), key.clone()).await?;
    /// assert!(matches!(first, Started::New(_)));
    /// let again = engine.start_once("checkout", serde_json::json!({"cents": 500}), key.clone()).await?;
    /// assert_eq!(again, Started::Existing(first.id()));
    /// let other = engine.start_once("checkout", serde_json::json!({"cents": 900}), key).await;
    /// assert!(matches!(other, Err(Error::StartKeyConflict { .. })));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Engine::start`].
    pub async fn start_once(
        &self,
        name: &str,
        input: impl Serialize,
        start_key: StartKey,
    ) -> Result<Started> {
        self.begin(name, input, StartOptions::default().key(start_key))
            .await
    }

    /// Starts a saga with options: a start key, a delayed start, a deadline. The saga is
    /// stored at once (start-key dedup applies at once) and its first step runs not
    /// before [`StartOptions::not_before`]; both times are in the log, so they hold
    /// across a restart.
    ///
    /// ```
    /// # async fn demo(engine: sagaflow::Engine) -> sagaflow::Result<()> {
    /// use std::time::Duration;
    /// use sagaflow::{Clock, StartKey, StartOptions, SystemClock};
    ///
    /// let now = SystemClock.now();
    /// let started = engine
    ///     .start_with(
    ///         "checkout",
    ///         serde_json::json!({"cents": 500}),
    ///         StartOptions::default()
    ///             .key(StartKey::new("order-1043")?)
    ///             .not_before(now.saturating_add(Duration::from_secs(3600)))
    ///             .deadline(now.saturating_add(Duration::from_secs(7200))),
    ///     )
    ///     .await?;
    /// # let _ = started; Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Engine::start`].
    pub async fn start_with(
        &self,
        name: &str,
        input: impl Serialize,
        options: StartOptions,
    ) -> Result<Started> {
        self.begin(name, input, options).await
    }

    /// Asks a saga to stop going forward: no new attempt starts, the attempt in flight
    /// settles, everything that may have taken effect is compensated, and the saga ends
    /// [`SagaStatus::Cancelled`]. Recorded with who and why. Returns the summary once the
    /// request is durable (not once the saga has ended: [`Engine::wait`] for that).
    ///
    /// ```
    /// # async fn demo(engine: sagaflow::Engine, id: sagaflow::SagaId) -> sagaflow::Result<()> {
    /// use sagaflow::{Error, SagaOutcome};
    ///
    /// match engine.cancel(id, "checkout-api", "customer cancelled the order").await {
    ///     Ok(_) => assert!(matches!(engine.wait(id).await?, SagaOutcome::Cancelled { .. })),
    ///     // Past the pivot a saga can only go forward.
    ///     Err(Error::CancelRefused { reason, .. }) => println!("too late: {reason}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::CancelRefused`] past the pivot (or if the saga is compensating, parked or
    /// ended), [`Error::RepairRefused`] without who and why, [`Error::UnknownSaga`],
    /// [`Error::NotRunning`] if this engine does not drive it, [`Error::Store`].
    pub async fn cancel(&self, id: SagaId, operator: &str, reason: &str) -> Result<SagaMeta> {
        admin::check_who(id, operator, reason)?;
        let inner = &self.inner;
        let one_at_a_time = inner.repair_lock.lock().await;
        if let Some(answer) = inner.ask_driver(id, Asked::Cancel, operator, reason).await {
            return answer;
        }
        // Not held while another process is asked: that process may be asking this one.
        drop(one_at_a_time);
        if inner.shared() {
            match self
                .ask_elsewhere(id, Asked::Cancel, operator, reason)
                .await?
            {
                Routed::Answered(answer) => return answer,
                // Nothing to write for a saga that is not active: only the refusal.
                Routed::Stored(lease) => ownership::give_back(inner, lease).await,
            }
        }
        // Not driven here: say why, from the stored saga.
        let stored = self.state_io(id).await?;
        check_cancel(&stored).map_err(|r| Error::CancelRefused {
            saga: id,
            reason: r.0,
        })?;
        Err(Error::NotRunning(id))
    }

    /// In a shared store: gets `action` applied by the process that drives `id`, or
    /// takes the saga's lease here and applies it through a local driver; or, if the
    /// saga is not active, says under which epoch the caller applies it to the stored
    /// saga.
    async fn ask_elsewhere(
        &self,
        id: SagaId,
        action: Asked,
        operator: &str,
        reason: &str,
    ) -> Result<Routed> {
        let inner = &self.inner;
        // Each round gets an answer, or finds the saga's driver gone (it ended, or handed
        // the saga back) and tries again: a bounded number of times.
        for _ in 0..20 {
            let epoch = match ownership::ask_elsewhere(inner, id, &action, operator, reason).await?
            {
                ownership::Elsewhere::Answered(answer) => return Ok(Routed::Answered(*answer)),
                ownership::Elsewhere::Adopted(epoch) => epoch,
            };
            let lease = Lease { saga: id, epoch };
            let meta = match inner.io(move |store| store.meta(id)).await? {
                Ok(m) => m,
                Err(e) => {
                    ownership::give_back(inner, lease).await;
                    return Err(e.into());
                }
            };
            if !meta.is_some_and(|m| m.status.is_active()) {
                return Ok(Routed::Stored(lease));
            }
            // Active and nobody drives it: drive it here, and let the driver apply it.
            let mut report = crate::recovery::RecoveryReport::default();
            if let Err(e) = crate::recovery::recover_one(inner, id, &mut report, Some(epoch)).await
            {
                ownership::give_back(inner, lease).await;
                return Err(e);
            }
            if let Some(answer) = inner.ask_driver(id, action.clone(), operator, reason).await {
                return Ok(Routed::Answered(answer));
            }
            // The driver ended before it got to it (the saga parked at recovery, say):
            // look again.
        }
        Err(Error::NotRunning(id))
    }

    /// The saga's state, read off the runtime's threads when the store is remote.
    async fn state_io(&self, id: SagaId) -> Result<SagaState> {
        self.inner.io(move |store| admin::state(store, id)).await?
    }

    async fn begin(
        &self,
        name: &str,
        input: impl Serialize,
        options: StartOptions,
    ) -> Result<Started> {
        let start_key = options.key.clone();
        let inner = &self.inner;
        if *inner.stopping.borrow() {
            return Err(Error::ShuttingDown);
        }
        let def = inner
            .defs
            .get(name)
            .and_then(|v| v.values().next_back())
            .cloned()
            .ok_or_else(|| Error::UnknownDefinition(name.to_string()))?;
        // Serialized within the limits before anything else: a value too large or too
        // deep is refused without being built in full, and nothing is written that the
        // log could not read back (G8).
        let limit = inner.options.max_payload_bytes;
        let depth = inner.options.max_payload_depth;
        let (input, _) = crate::payload::to_value(&input, limit, depth).map_err(|e| match e {
            crate::payload::Refused::Limit(crate::payload::Exceeded::Size { size, limit }) => {
                Error::PayloadTooLarge { size, limit }
            }
            crate::payload::Refused::Limit(crate::payload::Exceeded::Depth { limit }) => {
                Error::PayloadTooDeep { limit }
            }
            crate::payload::Refused::Invalid(e) => Error::InvalidInput {
                step: String::new(),
                reason: format!("input does not serialize: {e}"),
            },
        })?;
        for s in def.steps() {
            s.code
                .check_input(&input)
                .map_err(|reason| Error::InvalidInput {
                    step: s.name.to_string(),
                    reason,
                })?;
        }

        let key_lock = start_key.as_ref().map(|k| {
            lock(&inner.start_locks)
                .entry(k.clone())
                .or_default()
                .clone()
        });
        let guard = match &key_lock {
            Some(l) => Some(l.clone().lock_owned().await),
            None => None,
        };
        let result = self.start_locked(def, input, options).await;
        drop(guard);
        if let (Some(k), Some(l)) = (&start_key, key_lock) {
            let mut locks = lock(&inner.start_locks);
            // Two references: the map's and ours. Nobody else waits on it.
            if Arc::strong_count(&l) == 2 {
                locks.remove(k);
            }
        }
        result
    }

    async fn start_locked(
        &self,
        def: Arc<SagaDefinition>,
        input: Value,
        options: StartOptions,
    ) -> Result<Started> {
        let inner = &self.inner;
        let start_key = options.key;
        if let Some(k) = &start_key {
            let key = k.clone();
            if let Some(existing) = inner.io(move |store| store.find_start_key(&key)).await?? {
                tracing::debug!(saga_id = %existing, start_key = %k, "start key seen before");
                return self
                    .same_input(existing, k, &input)
                    .await
                    .map(|()| Started::Existing(existing));
            }
        }
        // Kept only where another process can take the key or the id between the look
        // above and the write below: then the inputs are compared as if it had been
        // first, or the start is made again under a new id.
        let input_copy = inner.shared().then(|| input.clone());
        let mut input = Some(input);
        let mut tries = 0;
        loop {
            tries += 1;
            let now = inner.clock.now();
            // An engine reopened with the same seed draws the same random bits again;
            // within the same millisecond that would reproduce an id already on disk.
            // Draw again. (A shared store refuses a first write for an id it holds,
            // which is answered below.)
            let mut id = SagaId::generate(now, &*inner.entropy);
            while !inner.shared()
                && (inner.store.meta(id)?.is_some() || !inner.store.read(id)?.is_empty())
            {
                id = SagaId::generate(now, &*inner.entropy);
            }
            let this_input = input
                .take()
                .or_else(|| input_copy.clone())
                .unwrap_or_default();
            let first = LogRecord {
                lsn: Lsn(0),
                at: now,
                event: Event::Started {
                    definition: def.name().to_string(),
                    version: def.version(),
                    steps: def.step_names().map(str::to_string).collect(),
                    kinds: def.step_kinds().collect(),
                    // Recorded only when the definition has groups: a log without them
                    // stays in the format every earlier engine reads.
                    stages: if def.has_groups() {
                        def.step_stages().collect()
                    } else {
                        Vec::new()
                    },
                    input: this_input,
                    start_key: start_key.clone(),
                    // A deadline given at start wins; else the definition's, counted
                    // from when the saga begins.
                    deadline: options.deadline.or_else(|| {
                        def.deadline()
                            .map(|d| options.not_before.unwrap_or(now).max(now).saturating_add(d))
                    }),
                    not_before: options.not_before.filter(|t| *t > now),
                },
            };
            let state = SagaState::new(id, &first).map_err(|e| Error::CorruptLog {
                saga: id,
                reason: e.to_string(),
            })?;
            // The `started` record rides with the first attempt's start: one durable
            // write instead of two. `start` still answers only once it is durable.
            let definition = def.name().to_string();
            let (driver, written) = Driver::starting(inner.clone(), def.clone(), state, first);
            // In a shared store the saga's first write creates its lease, at epoch 1.
            inner.spawn(driver.with_epoch(inner.shared().then_some(1)));
            return match written.await {
                Ok(Ok(())) => {
                    tracing::info!(saga_id = %id, "saga started");
                    inner.metrics.started(&definition);
                    Ok(Started::New(id))
                }
                // Another process started a saga under this key in the meantime (a
                // shared store's constraint caught it): the same answer as if it had
                // been first.
                Ok(Err(Error::StartKeyConflict { key, existing })) => {
                    tracing::debug!(saga_id = %existing, start_key = %key, "start key taken meanwhile");
                    let input = input_copy.unwrap_or_default();
                    self.same_input(existing, &key, &input)
                        .await
                        .map(|()| Started::Existing(existing))
                }
                // A first write refused for its lease: a saga with this id exists (in a
                // shared store, engines that share a `SAGA_SEED` draw the same ids).
                // Nothing was written: start again under another id.
                Ok(Err(Error::Fenced { .. })) if inner.shared() && tries < 5 => {
                    tracing::warn!(saga_id = %id, "saga id taken in the shared store; drawing another");
                    continue;
                }
                Ok(Err(e)) => Err(e),
                // The driver ended before writing anything: the engine is being dropped.
                Err(_) => Err(Error::ShuttingDown),
            };
        }
    }

    /// Refuses a start key reused with another input than the saga it names was started
    /// with (G6): the input in that saga's `started` record is the digest kept with the
    /// key, compared as JSON (so key order and spacing do not matter).
    async fn same_input(&self, existing: SagaId, key: &StartKey, input: &Value) -> Result<()> {
        let values = self.inner.io(move |store| store.read(existing)).await??;
        let first = values
            .first()
            .map(|(lsn, bytes)| codec::decode_value(existing, *lsn, bytes))
            .transpose()?
            .and_then(|records| records.into_iter().next());
        match first.map(|r| r.event) {
            Some(Event::Started { input: stored, .. }) if stored == *input => Ok(()),
            Some(Event::Started { .. }) => Err(Error::StartKeyConflict {
                key: key.clone(),
                existing,
            }),
            _ => Err(Error::CorruptLog {
                saga: existing,
                reason: format!(
                    "start key `{key}` names it, but its log does not begin with `started`"
                ),
            }),
        }
    }

    /// Waits until the saga ends (completed, compensated or parked) and returns how.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSaga`]; [`Error::NotRunning`] if the saga is active but this
    /// engine stopped driving it (after a store failure); [`Error::ShuttingDown`] if the
    /// engine stopped before the saga ended; [`Error::CorruptLog`]; [`Error::Store`].
    pub async fn wait(&self, id: SagaId) -> Result<SagaOutcome> {
        let inner = &self.inner;
        loop {
            let cell = lock(&inner.running)
                .get_mut(&id)
                .map(|d| d.cell.get_or_insert_with(Default::default).clone());
            if let Some(cell) = cell {
                match cell.get().await {
                    // Another process drives it now, it waits in the store for its
                    // timer, or its driver stopped on a store error and its lease goes
                    // back to be claimed: its end is read from the store.
                    Err(Error::Fenced { .. } | Error::NotRunning(_) | Error::Store(_))
                        if inner.shared() => {}
                    other => return other,
                }
            }
            if !inner.shared() {
                break;
            }
            if ownership::wait_in_store(inner, id).await? != SagaStatus::Running {
                break;
            }
            // Adopted by this process meanwhile: its driver publishes the outcome.
        }
        match self.state_io(id).await {
            Ok(state) => SagaOutcome::of(&state).ok_or(Error::NotRunning(id)),
            // A log that does not fold was parked at recovery (or resolved since): the
            // readable records after the damage say how it ended.
            Err(e @ (Error::CorruptLog { .. } | Error::NewerFormat { .. })) => {
                let view = inner
                    .io(move |store| admin::readable_log(store, id))
                    .await??;
                let last_word = view.records.iter().rev().find_map(|r| match &r.event {
                    Event::Parked { reason } => Some(SagaOutcome::Parked {
                        reason: reason.clone(),
                    }),
                    Event::OperatorAction {
                        action: Repair::MarkResolved,
                        operator,
                        reason,
                    } => Some(SagaOutcome::Resolved {
                        operator: operator.clone(),
                        reason: reason.clone(),
                    }),
                    _ => None,
                });
                let status = inner
                    .io(move |store| store.meta(id).ok().flatten().map(|m| m.status))
                    .await?;
                match (status, last_word) {
                    (Some(SagaStatus::Parked | SagaStatus::Resolved), Some(outcome)) => Ok(outcome),
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Applies an operator's repair to a saga and returns its summary afterwards.
    ///
    /// The repair is checked against the saga's state first ([`check_repair`]): one that
    /// would break a guarantee is refused with the reason and nothing is written.
    /// Otherwise it is recorded in the saga's log, with `operator` and `reason`, and the
    /// saga goes on from there: a resumed saga is driven again, a resolved one is not.
    /// For a saga in the middle of an attempt, the repair waits for the attempt to end.
    ///
    /// # Errors
    ///
    /// [`Error::RepairRefused`] (also for an empty operator or reason),
    /// [`Error::UnknownSaga`], [`Error::CorruptLog`], [`Error::Store`].
    pub async fn repair(
        &self,
        id: SagaId,
        action: Repair,
        operator: &str,
        reason: &str,
    ) -> Result<SagaMeta> {
        admin::check_who(id, operator, reason)?;
        let inner = &self.inner;
        let one_at_a_time = inner.repair_lock.lock().await;
        if let Some(answer) = inner
            .ask_driver(id, Asked::Repair(action.clone()), operator, reason)
            .await
        {
            return answer;
        }
        // Not held while another process is asked: that process may be asking this one
        // (there, the lease keeps writes to the saga apart). Held otherwise, so that two
        // writes to a stored saga (a repair, a drift) never take the same lsn.
        let one_at_a_time = if inner.shared() {
            drop(one_at_a_time);
            None
        } else {
            Some(one_at_a_time)
        };
        let mut lease = None;
        if inner.shared() {
            match self
                .ask_elsewhere(id, Asked::Repair(action.clone()), operator, reason)
                .await?
            {
                Routed::Answered(answer) => return answer,
                Routed::Stored(l) => lease = Some(l),
            }
        }
        let repaired = self
            .repair_stored(id, action, operator, reason, lease)
            .await;
        if let (Some(l), Err(_)) = (lease, &repaired) {
            ownership::give_back(inner, l).await;
        }
        drop(one_at_a_time);
        repaired
    }

    /// Runs the reconciler now, with [`EngineOptions::reconcile`] (or the defaults):
    /// passes over the finished sagas in its window, from where the last pass stopped,
    /// until it has caught up. Every drift it finds is recorded on its saga and
    /// returned. One pass runs at a time per engine: this waits for the background
    /// task's.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the store fails (the position stays where the last complete
    /// batch left it), [`Error::ShuttingDown`].
    pub async fn reconcile_now(&self) -> Result<ReconcileReport> {
        let inner = &self.inner;
        let opts = Arc::new(inner.options.reconcile.clone().unwrap_or_default());
        let _one_at_a_time = inner.reconciling.lock().await;
        reconciler::catch_up(inner, &opts).await
    }

    /// The open drifts (see [`admin::drifts`]).
    ///
    /// # Errors
    ///
    /// As [`admin::drifts`].
    pub fn drifts(&self, after: Option<SagaId>, limit: usize) -> Result<Vec<admin::DriftEntry>> {
        admin::drifts(&*self.inner.store, after, limit)
    }

    /// Applies a repair to a saga no driver drives (parked, or it ended meanwhile), in a
    /// shared store under `lease`.
    async fn repair_stored(
        &self,
        id: SagaId,
        action: Repair,
        operator: &str,
        reason: &str,
        lease: Option<Lease>,
    ) -> Result<SagaMeta> {
        let inner = &self.inner;
        let stored = match self.state_io(id).await {
            Ok(s) => Some(s),
            // Resolving is the one repair that applies to a log that cannot be read.
            Err(Error::CorruptLog { .. } | Error::NewerFormat { .. })
                if action == Repair::MarkResolved =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        let def = stored
            .as_ref()
            .and_then(|s| inner.definition(&s.definition, s.version));
        let needs_code = !matches!(action, Repair::MarkResolved | Repair::HandleDrift { .. });
        if let (Some(stored), None, true) = (&stored, &def, needs_code) {
            // Checked before anything is written: a resumed saga needs its code.
            check_repair(stored, &action).map_err(|r| Error::RepairRefused {
                saga: id,
                reason: r.0,
            })?;
            return Err(Error::RepairRefused {
                saga: id,
                reason: format!(
                    "definition `{}` version {} is not registered with this engine",
                    stored.definition, stored.version
                ),
            });
        }
        let repair_name = action.name();
        tracing::warn!(saga_id = %id, action = repair_name, operator, reason, "operator repair");
        let (op, why, now) = (operator.to_string(), reason.to_string(), inner.clock.now());
        let mut prepared = inner
            .io(move |store| admin::prepare_repair(store, id, action, &op, &why, now))
            .await??;
        prepared.write.fence = lease.map(|l| inner.fence(l.epoch));
        inner.committer.commit(prepared.write).await?;
        let meta = prepared.meta;
        inner.metrics.repaired(&meta.definition, repair_name);
        if meta.status == SagaStatus::Resolved {
            inner.metrics.ended(&meta.definition, "resolved", None);
        }
        if let (true, Some(def), Some(state)) = (meta.status.is_active(), def, prepared.state) {
            let driver = Driver::new(inner.clone(), def, state, Some(meta.clone()))
                .with_epoch(lease.map(|l| l.epoch));
            match lease {
                Some(l) => ownership::drive_adopted(inner, driver, l).await,
                None => {
                    inner.spawn(driver);
                }
            }
        }
        Ok(meta)
    }

    /// The saga's current state, folded from its log.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSaga`], [`Error::CorruptLog`], [`Error::Store`].
    pub fn state(&self, id: SagaId) -> Result<SagaState> {
        admin::state(&*self.inner.store, id)
    }

    /// The saga's summary: status, definition, times, due retry, reason.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSaga`], [`Error::CorruptLog`] if the summary does not decode,
    /// [`Error::Store`].
    pub fn status(&self, id: SagaId) -> Result<SagaMeta> {
        self.inner.store.meta(id)?.ok_or(Error::UnknownSaga(id))
    }

    /// The saga's full log, oldest first.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSaga`]; [`Error::CorruptLog`] naming the first record that does
    /// not decode; [`Error::Store`].
    pub fn history(&self, id: SagaId) -> Result<Vec<LogRecord>> {
        admin::history(&*self.inner.store, id)
    }

    /// As much of the saga's log as can be read, and what is wrong with the rest: for a
    /// saga parked with a corrupt log, or written by a newer engine.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSaga`] if it has no log; [`Error::Store`].
    pub fn readable_log(&self, id: SagaId) -> Result<admin::ReadableLog> {
        admin::readable_log(&*self.inner.store, id)
    }

    /// The summaries of the sagas with `status`, oldest first. A summary that does not
    /// decode is skipped with a warning, so one bad saga does not hide the others.
    ///
    /// # Errors
    ///
    /// [`Error::Store`].
    pub fn list(&self, status: SagaStatus) -> Result<Vec<SagaMeta>> {
        self.find(&ListFilter::default().status(status))
    }

    /// The durable retry timers due at or before `until`, earliest first.
    ///
    /// # Errors
    ///
    /// [`Error::Store`].
    pub fn scheduled(&self, until: Timestamp) -> Result<Vec<(Timestamp, SagaId)>> {
        Ok(self.inner.store.due(until)?)
    }

    /// The sagas that pass `filter`, oldest first (see [`crate::admin::list`]).
    ///
    /// # Errors
    ///
    /// [`Error::Store`].
    pub fn find(&self, filter: &ListFilter) -> Result<Vec<SagaMeta>> {
        admin::list(&*self.inner.store, filter, self.inner.clock.now())
    }

    /// Counts over the whole store; stuck means no transition for `stuck_after`.
    ///
    /// # Errors
    ///
    /// [`Error::Store`].
    pub fn stats(&self, stuck_after: Duration) -> Result<Stats> {
        admin::stats(&*self.inner.store, self.inner.clock.now(), stuck_after)
    }

    /// Starts, completions, compensations and completion latency over the last
    /// `window`, in `buckets` (see [`admin::activity`]).
    ///
    /// # Errors
    ///
    /// As [`admin::activity`].
    pub fn activity(&self, window: Duration, buckets: usize) -> Result<admin::Activity> {
        admin::activity(&*self.inner.store, self.inner.clock.now(), window, buckets)
    }

    /// The engine's metrics in the Prometheus (OpenMetrics) text format.
    pub fn metrics_text(&self) -> String {
        let inner = &self.inner;
        let m = &inner.metrics;
        m.in_flight.set(lock(&inner.running).len() as i64);
        // Saga ids are time-ordered: the oldest active saga is the first of each index.
        let now = inner.clock.now();
        let oldest = [SagaStatus::Running, SagaStatus::Compensating]
            .into_iter()
            // One summary from each index, not every id in it.
            .filter_map(|s| inner.store.page(Some(s), None, 1, false).ok()?.pop())
            .map(|meta| now.duration_since(meta.created_at).as_secs())
            .max()
            .unwrap_or(0);
        m.oldest_active_seconds.set(oldest as i64);
        if let Some(threshold) = inner.options.stuck_after {
            let filter = ListFilter::default().stuck_for(threshold);
            if let Ok(stuck) = admin::list(&*inner.store, &filter, now) {
                m.stuck.set(stuck.len() as i64);
            }
        }
        m.render(inner.committer.stats())
    }

    /// Deletes the finished sagas (completed, compensated, cancelled, resolved) that
    /// finished at or before `finished_before`, whatever their retention; with `dry_run`,
    /// only counts them. Parked and active sagas are never deleted.
    ///
    /// # Errors
    ///
    /// [`Error::Store`].
    pub async fn purge(&self, finished_before: Timestamp, dry_run: bool) -> Result<admin::Purged> {
        // Takes turns with the writes made to finished sagas, as retention does.
        let _one_at_a_time = self.inner.repair_lock.lock().await;
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || admin::purge(&*store, finished_before, dry_run))
            .await
            .map_err(|e| Error::Store(Arc::new(crate::store::Error::Backend(e.to_string()))))?
    }

    /// What the engine found and did when it opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.report
    }

    /// How many durable writes were made and how many transitions they carried.
    pub fn commit_stats(&self) -> CommitStats {
        self.inner.committer.stats()
    }

    /// The number of sagas this engine is driving now.
    pub fn in_flight(&self) -> usize {
        lock(&self.inner.running).len()
    }

    /// Stops cleanly: no new sagas or attempts start, attempts in flight finish and
    /// their results are made durable, then the store is synced. Sagas that did not end
    /// resume when an engine opens the store again. Any clone may call it; every clone
    /// refuses new work afterwards. The store itself (a sled directory's lock) is let go
    /// when the last clone is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the final sync fails.
    pub async fn shutdown(&self) -> Result<()> {
        self.inner.stopping.send_replace(true);
        let mut tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        while tasks.join_next().await.is_some() {}
        // Every driver has stopped: the leases need no more renewing.
        self.inner.renewals_stop.send_replace(true);
        let renewals = lock(&self.inner.renewals).take();
        if let Some(r) = renewals {
            let _ = r.await;
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.committer.close();
            // The others take this process's sagas over at once, not a lease later.
            ownership::release_all(&inner);
            inner.store.sync()
        })
        .await
        .map_err(|e| Error::Store(Arc::new(crate::store::Error::Backend(e.to_string()))))??;
        Ok(())
    }
}
