//! The reconciler: walks the sagas that finished in a window of time, asks the system
//! each step called for its view (the step's [`Reconcile`] hook, by idempotency key),
//! and records every disagreement on the saga's log as a drift, counted in
//! `sagaflow_reconcile_drift_total`.
//!
//! - It walks the finish-time index, never the sagas themselves, a batch at a time, and
//!   keeps its place in the store ([`SagaLog::set_position`]): after a restart it goes on
//!   where it stopped. The place moves on only once every drift of a batch is recorded,
//!   so a crash makes it look at a batch again, never skip one; a drift already recorded
//!   for the same step and kind is not recorded twice.
//! - Lookups run concurrently, each paced by its integration's limit ([`Pace`], which
//!   the steps toolkit's rate limiter implements), so the reconciler never takes more
//!   from a provider than it is allowed.
//! - A system that cannot be asked is asked again a few times, then recorded as drift
//!   of kind `unknown`: nobody knows whether it agrees.
//! - Drift goes on a finished saga through the same path as an operator's repair: one
//!   write at a time in this process, under the saga's lease in a shared store.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinSet;

use crate::admin;
use crate::clock::Timestamp;
use crate::definition::{Finished, SagaDefinition, Verdict};
use crate::error::{Error, Result};
use crate::executor::{ownership, Inner};
use crate::ids::{IdempotencyKey, Lsn, Phase, SagaId};
use crate::machine::{
    DriftKind, Event, Expected, LogRecord, Progress, Repair, SagaState, SagaStatus,
};
use crate::store::{SagaMeta, Write};

/// The prefix of the names the reconciler's places are stored under.
const POSITION: &str = "reconciler";

/// Paces the lookups of one integration: the reconciler waits for [`Pace::admit`]
/// before each lookup and holds what it returns while the lookup runs.
///
/// `sagaflow-steps`' `RateLimiter` implements it, so one limiter can pace a provider's
/// step calls and the reconciler's lookups alike.
#[async_trait]
pub trait Pace: Send + Sync + 'static {
    /// Waits until one more lookup may start. The returned value is dropped when it
    /// ends (a concurrency permit, say).
    async fn admit(&self) -> Box<dyn Send>;
}

/// A shared limiter paces as the limiter does.
#[async_trait]
impl<P: Pace + ?Sized> Pace for Arc<P> {
    async fn admit(&self) -> Box<dyn Send> {
        (**self).admit().await
    }
}

/// How the reconciler runs: see [`crate::EngineOptions::reconcile`].
#[derive(Clone)]
#[non_exhaustive]
pub struct ReconcileOptions {
    /// Sagas that finished less than this long ago are left for later: their effects
    /// may still be settling in the systems (a refund being booked). Default 10 minutes.
    pub min_age: Duration,
    /// Sagas that finished longer ago than this are not looked at. Default 7 days.
    pub max_age: Duration,
    /// How often the background task looks for newly finished sagas once it has
    /// caught up. Default 1 minute.
    pub every: Duration,
    /// At most this many sagas per batch: the position moves on once per batch, and a
    /// batch's lookups run concurrently. Default 1000.
    pub batch: usize,
    /// At most this many lookups of one integration at once (waiting for its turn or
    /// running). Default 32.
    pub concurrency: usize,
    /// How many times a lookup answered [`Verdict::unknown`] is made before the drift
    /// is recorded as `unknown`. Default 3.
    pub unknown_attempts: u32,
    /// How long to wait between those. Default 1 second.
    pub unknown_backoff: Duration,
    /// How long one lookup may take; then it counts as `unknown`. Default 30 seconds.
    pub lookup_timeout: Duration,
    /// The limit of each integration, by name; an integration without one is not
    /// paced (only `concurrency` bounds it).
    pub limits: BTreeMap<String, Arc<dyn Pace>>,
}

impl fmt::Debug for ReconcileOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReconcileOptions")
            .field("min_age", &self.min_age)
            .field("max_age", &self.max_age)
            .field("every", &self.every)
            .field("batch", &self.batch)
            .field("concurrency", &self.concurrency)
            .field("unknown_attempts", &self.unknown_attempts)
            .field("unknown_backoff", &self.unknown_backoff)
            .field("lookup_timeout", &self.lookup_timeout)
            .field("limits", &self.limits.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            min_age: Duration::from_secs(10 * 60),
            max_age: Duration::from_secs(7 * 24 * 3600),
            every: Duration::from_secs(60),
            batch: 1000,
            concurrency: 32,
            unknown_attempts: 3,
            unknown_backoff: Duration::from_secs(1),
            lookup_timeout: Duration::from_secs(30),
            limits: BTreeMap::new(),
        }
    }
}

impl ReconcileOptions {
    /// Looks at sagas that finished between `min_age` and `max_age` ago.
    pub fn window(mut self, min_age: Duration, max_age: Duration) -> Self {
        self.min_age = min_age;
        self.max_age = max_age.max(min_age);
        self
    }

    /// Sets [`ReconcileOptions::every`].
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Sets [`ReconcileOptions::batch`] (at least 1).
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// Sets [`ReconcileOptions::concurrency`] (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Sets [`ReconcileOptions::unknown_attempts`] (at least 1) and
    /// [`ReconcileOptions::unknown_backoff`].
    pub fn unknown(mut self, attempts: u32, backoff: Duration) -> Self {
        self.unknown_attempts = attempts.max(1);
        self.unknown_backoff = backoff;
        self
    }

    /// Sets [`ReconcileOptions::lookup_timeout`].
    pub fn lookup_timeout(mut self, d: Duration) -> Self {
        self.lookup_timeout = d;
        self
    }

    /// Paces the lookups of `integration` by `pace`.
    pub fn limit(mut self, integration: impl Into<String>, pace: impl Pace) -> Self {
        self.limits.insert(integration.into(), Arc::new(pace));
        self
    }
}

/// One drift found (and recorded) by a reconciler pass.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct FoundDrift {
    /// The saga.
    pub saga: SagaId,
    /// Its definition.
    pub definition: String,
    /// The step.
    pub step: String,
    /// How the system disagrees.
    pub kind: DriftKind,
    /// What the log says.
    pub expected: Expected,
    /// What the hook found.
    pub detail: String,
    /// Where it is in the saga's log; `None` if the same drift was recorded before.
    pub lsn: Option<Lsn>,
}

/// What reconciler passes did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// Finished sagas looked at.
    pub sagas: usize,
    /// Lookups made (each attempt of a lookup counts).
    pub lookups: u64,
    /// Steps whose system agreed.
    pub matched: u64,
    /// Sagas not checked: resolved by hand, a log that cannot be read, or steps that
    /// changed under the same definition version.
    pub skipped: usize,
    /// Sagas of definitions not registered in this process: left for the walk of a
    /// process that has them (each definition has its own position).
    pub elsewhere: usize,
    /// Steps with a hook that were not looked up: skipped by an operator, or whose log
    /// leaves it open whether they took effect.
    pub unchecked: u64,
    /// Every drift found.
    pub drifts: Vec<FoundDrift>,
    /// Where the walk stands: the last saga looked at, by finish time.
    pub position: Option<(Timestamp, SagaId)>,
}

/// One lookup: a step of a saga, what the log expects, and who to ask.
#[derive(Clone)]
struct Lookup {
    index: u32,
    finished: Finished,
    integration: Arc<str>,
    hook: Arc<dyn crate::definition::Reconcile>,
}

/// What the log of a finished saga expects of step `i`, or `None` if it expects nothing
/// a system could be asked about.
pub(crate) fn expected(state: &SagaState, i: usize) -> Option<Expected> {
    let s = state.steps.get(i)?;
    let succeeded = matches!(s.action, Progress::Succeeded { .. });
    let undone = matches!(s.compensation, Progress::Succeeded { .. });
    match state.status {
        SagaStatus::Completed => succeeded.then_some(Expected::Present),
        SagaStatus::Compensated | SagaStatus::Cancelled => {
            // The last attempt was refused under the step's one key: a service that
            // honours the key would have answered the first attempt's effect had there
            // been one, so there is none (a pivot compensated around, say).
            let refused_last = matches!(
                s.action,
                Progress::Failed {
                    kind: crate::machine::FailureKind::Rejected,
                    ..
                }
            );
            if undone {
                Some(Expected::Undone)
            } else if !s.may_have_taken_effect() || refused_last {
                Some(Expected::Absent)
            } else if succeeded {
                // Not compensatable (an await step without an undo): it stands.
                Some(Expected::Present)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The steps an operator skipped (going forward or compensating): done by hand, so the
/// log knows nothing of what the system holds for them.
fn skipped_steps(records: &[LogRecord]) -> BTreeSet<u32> {
    records
        .iter()
        .filter_map(|r| match &r.event {
            Event::OperatorAction {
                action: Repair::SkipStep { step },
                ..
            } => Some(*step),
            _ => None,
        })
        .collect()
}

/// The lookups of one finished saga: a step with a hook and an expectation each.
fn lookups_of(
    state: &SagaState,
    def: &SagaDefinition,
    skipped: &BTreeSet<u32>,
    unchecked: &mut u64,
) -> Vec<Lookup> {
    let outputs = Arc::new(state.outputs());
    let mut out = Vec::new();
    for (i, step) in def.steps().iter().enumerate() {
        let (Some(checker), Ok(index)) = (&step.reconcile, u32::try_from(i)) else {
            continue;
        };
        let Some(expected) = expected(state, i).filter(|_| !skipped.contains(&index)) else {
            *unchecked += 1;
            continue;
        };
        let s = &state.steps[i];
        out.push(Lookup {
            index,
            finished: Finished {
                saga: state.id,
                definition: state.definition.clone(),
                version: state.version,
                status: state.status,
                step: s.name.clone(),
                expected,
                key: IdempotencyKey::derive(state.id, &s.name, Phase::Action),
                compensation_key: IdempotencyKey::derive(state.id, &s.name, Phase::Compensation),
                input: state.input.clone(),
                output: s.output.clone(),
                outputs: outputs.clone(),
            },
            integration: checker.integration.clone(),
            hook: checker.hook.clone(),
        });
    }
    out
}

/// Asks one system, again while it cannot answer: each time within its integration's
/// bound (`permits`: one integration's lookups, waiting or running, never take another's
/// places), then admitted by its pace. The hook runs in a task of its own, bounded by
/// `lookup_timeout`: a hook that panics or hangs answers `unknown` for that lookup and
/// stops nothing else. Returns the verdict and how many lookups it took.
async fn ask(
    inner: Arc<Inner>,
    opts: Arc<ReconcileOptions>,
    permits: Arc<tokio::sync::Semaphore>,
    l: Lookup,
) -> (Verdict, u64) {
    let mut made = 0;
    loop {
        // The semaphore is never closed: a permit always comes.
        let permit = permits.clone().acquire_owned().await.ok();
        let pace = match opts.limits.get(&*l.integration) {
            Some(p) => Some(p.admit().await),
            None => None,
        };
        let (hook, finished) = (l.hook.clone(), l.finished.clone());
        let mut call = tokio::spawn(async move { hook.reconcile(&finished).await });
        let deadline = inner.clock.now().saturating_add(opts.lookup_timeout);
        let verdict = tokio::select! {
            done = &mut call => match done {
                Ok(v) => v,
                Err(e) => Verdict::unknown(format!("the reconcile hook failed: {e}")),
            },
            () = inner.clock.sleep_until(deadline) => {
                call.abort();
                Verdict::unknown(format!("no answer within {:?}", opts.lookup_timeout))
            }
        };
        drop(permit);
        drop(pace);
        made += 1;
        inner.metrics.reconcile_lookup(&l.integration);
        if verdict.kind() != Some(DriftKind::Unknown) || made >= u64::from(opts.unknown_attempts) {
            return (verdict, made);
        }
        let next = inner.clock.now().saturating_add(opts.unknown_backoff);
        inner.clock.sleep_until(next).await;
    }
}

/// The name a definition's position is stored under. One per definition and version:
/// a process walks for the definitions it has, so a saga of a definition only another
/// process knows (a rolling deploy) is left for that process's walk, not passed over.
fn position_name(definition: &str, version: u32) -> String {
    format!("{POSITION}/{definition}@{version}")
}

/// One pass over at most a batch of finished sagas after the stored positions of this
/// process's definitions. Returns its report and whether the batch was full (more may
/// be waiting).
pub(crate) async fn pass(
    inner: &Arc<Inner>,
    opts: &Arc<ReconcileOptions>,
) -> Result<(ReconcileReport, bool)> {
    let mut report = ReconcileReport::default();
    let now = inner.clock.now();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let until = Timestamp::from_millis(now.as_millis().saturating_sub(ms(opts.min_age)));
    let from = Timestamp::from_millis(now.as_millis().saturating_sub(ms(opts.max_age)));
    // Everything finished at `from` or later: after the greatest id one millisecond
    // before it.
    let floor = (
        Timestamp::from_millis(from.as_millis().saturating_sub(1)),
        SagaId::from_bytes([0xff; 16]),
    );
    let defs: Vec<(String, u32)> = inner
        .defs
        .iter()
        .flat_map(|(name, versions)| versions.keys().map(move |v| (name.clone(), *v)))
        .collect();
    let names: Vec<String> = defs.iter().map(|(n, v)| position_name(n, *v)).collect();
    let stored = inner
        .io(move |s| {
            names
                .iter()
                .map(|n| s.position(n))
                .collect::<crate::store::Result<Vec<_>>>()
        })
        .await??;
    let starts: BTreeMap<(String, u32), (Timestamp, SagaId)> = defs
        .iter()
        .cloned()
        .zip(stored)
        .map(|(d, p)| (d, p.filter(|p| *p > floor).unwrap_or(floor)))
        .collect();
    let Some(&after) = starts.values().min() else {
        return Ok((report, false));
    };
    let batch = opts.batch.max(1);
    let found = inner
        .io(move |s| s.finished_before(until, Some(after), batch))
        .await??;
    let Some(&last) = found.last() else {
        // Where the walk stands: nowhere yet, if nothing was ever looked at.
        report.position = Some(after).filter(|p| *p > floor);
        return Ok((report, false));
    };
    let full = found.len() >= batch;
    let finished_at: BTreeMap<SagaId, Timestamp> = found.iter().map(|(t, id)| (*id, *t)).collect();
    let ids: Vec<SagaId> = found.iter().map(|(_, id)| *id).collect();
    let loaded = inner.io(move |s| s.load(&ids)).await??;
    let mut sagas: BTreeMap<SagaId, (SagaState, Vec<Lookup>)> = BTreeMap::new();
    for l in loaded {
        let records = match crate::store::codec::decode_log(l.saga, &l.log) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(saga_id = %l.saga, error = %e, "reconciler: log unreadable, skipped");
                report.skipped += 1;
                continue;
            }
        };
        let state = match SagaState::fold(l.saga, &records) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(saga_id = %l.saga, error = %e, "reconciler: log does not fold, skipped");
                report.skipped += 1;
                continue;
            }
        };
        let key = (state.definition.clone(), state.version);
        // Another process's definition: its walk, not this one.
        let Some(start) = starts.get(&key) else {
            report.elsewhere += 1;
            continue;
        };
        // Already looked at under this definition's position.
        if finished_at
            .get(&l.saga)
            .is_none_or(|t| (*t, l.saga) <= *start)
        {
            continue;
        }
        let Some(def) = inner.definition(&state.definition, state.version) else {
            continue;
        };
        if state.status == SagaStatus::Resolved {
            report.skipped += 1;
            continue;
        }
        // The hooks are the steps' by position: a definition whose steps changed under
        // the same version would ask one step's system about another's key.
        if let Some(why) = crate::machine::definition_mismatch(&def, &state) {
            tracing::warn!(saga_id = %l.saga, reason = %why, "reconciler: definition changed, skipped");
            report.skipped += 1;
            continue;
        }
        report.sagas += 1;
        let lookups = lookups_of(
            &state,
            &def,
            &skipped_steps(&records),
            &mut report.unchecked,
        );
        sagas.insert(l.saga, (state, lookups));
    }
    // Every lookup of the batch at once, each within its integration's `concurrency`
    // places.
    let mut bounds: BTreeMap<Arc<str>, Arc<tokio::sync::Semaphore>> = BTreeMap::new();
    let mut running: JoinSet<(SagaId, usize, Verdict, u64)> = JoinSet::new();
    for (&id, (_, lookups)) in &sagas {
        for (n, l) in lookups.iter().enumerate() {
            let permits = bounds
                .entry(l.integration.clone())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1))))
                .clone();
            let (inner, opts, l) = (inner.clone(), opts.clone(), l.clone());
            running.spawn(async move {
                let (verdict, made) = ask(inner, opts, permits, l).await;
                (id, n, verdict, made)
            });
        }
    }
    let mut stopping = inner.stopping.subscribe();
    let mut verdicts: BTreeMap<SagaId, Vec<(usize, Verdict)>> = BTreeMap::new();
    loop {
        // A stop ends the lookups (dropping the set aborts them) before anything of
        // this batch is written: its positions stay, and the batch is looked at again.
        let done = tokio::select! {
            biased;
            _ = stopping.wait_for(|s| *s) => return Err(Error::ShuttingDown),
            done = running.join_next() => done,
        };
        let Some(done) = done else { break };
        // `ask` catches what a hook does; a join error here is the runtime's.
        let Ok((id, n, verdict, made)) = done else {
            continue;
        };
        report.lookups += made;
        verdicts.entry(id).or_default().push((n, verdict));
    }
    for (id, mut found) in verdicts {
        let Some((state, lookups)) = sagas.get(&id) else {
            continue;
        };
        // In step order, whatever order the lookups ended in.
        found.sort_by_key(|(n, _)| *n);
        let mut drifts = Vec::new();
        for (n, verdict) in found {
            let Some(l) = lookups.get(n) else {
                continue;
            };
            match verdict {
                Verdict::Matches => report.matched += 1,
                Verdict::Drift { kind, detail } => {
                    drifts.push((l.index, kind, l.finished.expected, detail))
                }
            }
        }
        if drifts.is_empty() {
            continue;
        }
        match record(inner, id, &state.definition, drifts).await {
            Ok(found) => report.drifts.extend(found),
            // Deleted meanwhile (retention, a purge): nothing left to record it on.
            Err(Error::UnknownSaga(_)) => {}
            Err(e) => return Err(e),
        }
    }
    // Every definition of this process has been walked up to `last`.
    let moved: Vec<String> = starts
        .iter()
        .filter(|(_, start)| **start < last)
        .map(|((n, v), _)| position_name(n, *v))
        .collect();
    inner
        .io(move |s| {
            for n in &moved {
                s.set_position(n, last)?;
            }
            s.sync()
        })
        .await??;
    report.position = Some(last);
    Ok((report, full))
}

/// Records `drifts` (step, kind, expected, detail) on finished saga `id`, one write,
/// skipping any recorded before for the same step and kind.
async fn record(
    inner: &Arc<Inner>,
    id: SagaId,
    definition: &str,
    drifts: Vec<(u32, DriftKind, Expected, String)>,
) -> Result<Vec<FoundDrift>> {
    // One write to a saga no driver drives at a time in this process (as repairs), and
    // under its lease in a shared store.
    let _one_at_a_time = inner.repair_lock.lock().await;
    let lease = if inner.shared() {
        Some(ownership::adopt(inner, id).await?)
    } else {
        None
    };
    let now = inner.clock.now();
    let built = inner.io(move |store| build(store, id, drifts, now)).await?;
    let result = async {
        let (write, found) = built?;
        if let Some(mut w) = write {
            w.fence = lease.map(|l| inner.fence(l.epoch));
            inner.committer.commit(w).await?;
        }
        Ok::<_, Error>(found)
    }
    .await;
    if let Some(l) = lease {
        ownership::give_back(inner, l).await;
    }
    let found = result?;
    for f in found.iter().filter(|f| f.lsn.is_some()) {
        inner.metrics.drift(definition, &f.step, f.kind);
        tracing::warn!(
            saga_id = %id, step = %f.step, kind = %f.kind, expected = %f.expected,
            detail = %f.detail, "reconciler: drift"
        );
    }
    Ok(found)
}

/// The write that records `drifts` on the stored saga, and what it records.
fn build(
    store: &dyn crate::store::SagaLog,
    id: SagaId,
    drifts: Vec<(u32, DriftKind, Expected, String)>,
    now: Timestamp,
) -> Result<(Option<Write>, Vec<FoundDrift>)> {
    let mut state = admin::state(store, id)?;
    let previous = store.meta(id)?;
    let mut records = Vec::new();
    let mut found = Vec::new();
    for (step, kind, expected, detail) in drifts {
        let name = state
            .steps
            .get(step as usize)
            .map_or_else(String::new, |s| s.name.clone());
        let seen = state
            .drifts
            .iter()
            .any(|d| d.step == step && d.kind == kind);
        let detail = crate::bound_message(detail);
        let mut f = FoundDrift {
            saga: id,
            definition: state.definition.clone(),
            step: name,
            kind,
            expected,
            detail: detail.clone(),
            lsn: None,
        };
        if !seen {
            let record = LogRecord {
                lsn: state.next_lsn,
                at: now,
                event: Event::Drift {
                    step,
                    kind,
                    expected,
                    detail,
                },
            };
            state.apply(&record).map_err(|e| Error::CorruptLog {
                saga: id,
                reason: e.to_string(),
            })?;
            f.lsn = Some(record.lsn);
            records.push(record);
        }
        found.push(f);
    }
    if records.is_empty() {
        return Ok((None, found));
    }
    let write = Write {
        saga: id,
        records,
        meta: SagaMeta::of(&state),
        previous,
        fence: None,
        taken: Vec::new(),
    };
    Ok((Some(write), found))
}

/// Passes until caught up (a pass that found less than a batch).
pub(crate) async fn catch_up(
    inner: &Arc<Inner>,
    opts: &Arc<ReconcileOptions>,
) -> Result<ReconcileReport> {
    let mut total = ReconcileReport::default();
    loop {
        let (r, full) = pass(inner, opts).await?;
        total.sagas += r.sagas;
        total.lookups += r.lookups;
        total.matched += r.matched;
        total.skipped += r.skipped;
        total.elsewhere += r.elsewhere;
        total.unchecked += r.unchecked;
        total.drifts.extend(r.drifts);
        total.position = r.position;
        if !full || *inner.stopping.borrow() {
            return Ok(total);
        }
    }
}

/// The background task: catches up every `every`, until the engine stops. A pass is not
/// dropped part way: it sees the stop itself, between its lookups and its writes.
pub(crate) async fn run(inner: Arc<Inner>, opts: Arc<ReconcileOptions>) {
    let mut stopping = inner.stopping.subscribe();
    loop {
        if *stopping.borrow_and_update() {
            return;
        }
        let next = inner.clock.now().saturating_add(opts.every);
        tokio::select! {
            biased;
            _ = stopping.changed() => return,
            () = inner.clock.sleep_until(next) => {}
        }
        let _one_at_a_time = inner.reconciling.lock().await;
        match catch_up(&inner, &opts).await {
            Ok(r) if !r.drifts.is_empty() => {
                tracing::info!(sagas = r.sagas, drifts = r.drifts.len(), "reconciler pass");
            }
            Ok(_) | Err(Error::ShuttingDown) => {}
            Err(e) => tracing::warn!(error = %e, "reconciler pass failed; tried again later"),
        }
    }
}
