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

use std::collections::BTreeMap;
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
use crate::machine::{DriftKind, Event, Expected, LogRecord, Progress, SagaState, SagaStatus};
use crate::store::{SagaMeta, Write};

/// The name the reconciler's place is stored under.
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
    /// At most this many lookups at once, over every integration. Default 32.
    pub concurrency: usize,
    /// How many times a lookup answered [`Verdict::unknown`] is made before the drift
    /// is recorded as `unknown`. Default 3.
    pub unknown_attempts: u32,
    /// How long to wait between those. Default 1 second.
    pub unknown_backoff: Duration,
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

    /// Paces the lookups of `integration` by `pace`.
    pub fn limit(mut self, integration: impl Into<String>, pace: impl Pace) -> Self {
        self.limits.insert(integration.into(), Arc::new(pace));
        self
    }
}

/// One drift found (and recorded) by a reconciler pass.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// Sagas not checked: resolved by hand, or their definition is not registered
    /// here.
    pub skipped: usize,
    /// Every drift found.
    pub drifts: Vec<FoundDrift>,
    /// Where the walk stands: the last saga looked at, by finish time.
    pub position: Option<(Timestamp, SagaId)>,
}

/// One lookup: a step of a saga, what the log expects, and who to ask.
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
            if undone {
                Some(Expected::Undone)
            } else if !s.may_have_taken_effect() {
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

/// The lookups of one finished saga: a step with a hook and an expectation each.
fn lookups_of(state: &SagaState, def: &SagaDefinition) -> Vec<Lookup> {
    let outputs = Arc::new(state.outputs());
    let mut out = Vec::new();
    for (i, step) in def.steps().iter().enumerate() {
        let (Some(checker), Some(expected), Ok(index)) =
            (&step.reconcile, expected(state, i), u32::try_from(i))
        else {
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

/// Asks one system, again while it cannot answer, paced by its integration's limit.
/// Returns the verdict and how many lookups it took.
async fn ask(inner: Arc<Inner>, opts: Arc<ReconcileOptions>, l: &Lookup) -> (Verdict, u64) {
    let mut made = 0;
    loop {
        let permit = match opts.limits.get(&*l.integration) {
            Some(p) => Some(p.admit().await),
            None => None,
        };
        let verdict = l.hook.reconcile(&l.finished).await;
        drop(permit);
        made += 1;
        inner.metrics.reconcile_lookup(&l.integration);
        if verdict.kind() != Some(DriftKind::Unknown) || made >= u64::from(opts.unknown_attempts) {
            return (verdict, made);
        }
        let next = inner.clock.now().saturating_add(opts.unknown_backoff);
        inner.clock.sleep_until(next).await;
    }
}

/// One pass over at most a batch of finished sagas after the stored position. Returns
/// its report and whether the batch was full (more may be waiting).
pub(crate) async fn pass(
    inner: &Arc<Inner>,
    opts: &Arc<ReconcileOptions>,
) -> Result<(ReconcileReport, bool)> {
    let now = inner.clock.now();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let until = Timestamp::from_millis(now.as_millis().saturating_sub(ms(opts.min_age)));
    let from = Timestamp::from_millis(now.as_millis().saturating_sub(ms(opts.max_age)));
    let stored = inner.io(|s| s.position(POSITION)).await??;
    // Everything finished at `from` or later: after the greatest id one millisecond
    // before it.
    let floor = (
        Timestamp::from_millis(from.as_millis().saturating_sub(1)),
        SagaId::from_bytes([0xff; 16]),
    );
    let after = stored.filter(|p| *p > floor).unwrap_or(floor);
    let batch = opts.batch.max(1);
    let found = inner
        .io(move |s| s.finished_before(until, Some(after), batch))
        .await??;
    let mut report = ReconcileReport {
        position: stored,
        ..ReconcileReport::default()
    };
    let Some(&last) = found.last() else {
        return Ok((report, false));
    };
    let full = found.len() >= batch;
    let ids: Vec<SagaId> = found.iter().map(|(_, id)| *id).collect();
    let loaded = inner.io(move |s| s.load(&ids)).await??;
    // Every lookup of the batch, run concurrently under the overall bound.
    let permits = Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
    let mut running: JoinSet<(SagaId, u32, Verdict, u64)> = JoinSet::new();
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
        let Ok(state) = SagaState::fold(l.saga, &records) else {
            tracing::warn!(saga_id = %l.saga, "reconciler: log does not fold, skipped");
            report.skipped += 1;
            continue;
        };
        let def = inner.definition(&state.definition, state.version);
        let (true, Some(def)) = (state.status != SagaStatus::Resolved, def) else {
            report.skipped += 1;
            continue;
        };
        report.sagas += 1;
        let lookups = lookups_of(&state, &def);
        sagas.insert(l.saga, (state, lookups));
    }
    for (&id, (_, lookups)) in &sagas {
        for (n, l) in lookups.iter().enumerate() {
            let permit = permits.clone().acquire_owned().await;
            let (inner, opts) = (inner.clone(), opts.clone());
            let lookup = Lookup {
                index: l.index,
                finished: l.finished.clone(),
                integration: l.integration.clone(),
                hook: l.hook.clone(),
            };
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            running.spawn(async move {
                let _permit = permit;
                let (verdict, made) = ask(inner, opts, &lookup).await;
                (id, n, verdict, made)
            });
        }
    }
    let mut verdicts: BTreeMap<SagaId, Vec<(u32, Verdict)>> = BTreeMap::new();
    while let Some(done) = running.join_next().await {
        let (id, n, verdict, made) = done.map_err(|e| {
            Error::Store(Arc::new(crate::store::Error::Backend(format!(
                "a reconcile hook panicked: {e}"
            ))))
        })?;
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
            let Some(l) = lookups.get(n as usize) else {
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
    inner
        .io(move |s| {
            s.set_position(POSITION, last)?;
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
        total.drifts.extend(r.drifts);
        total.position = r.position;
        if !full || *inner.stopping.borrow() {
            return Ok(total);
        }
    }
}

/// The background task: catches up every `every`, until the engine stops.
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
        tokio::select! {
            biased;
            _ = stopping.changed() => return,
            done = catch_up(&inner, &opts) => match done {
                Ok(r) if !r.drifts.is_empty() => {
                    tracing::info!(sagas = r.sagas, drifts = r.drifts.len(), "reconciler pass");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reconciler pass failed; tried again later"),
            },
        }
    }
}
