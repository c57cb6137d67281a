//! What operators need over a store: list, show, stats, stuck sagas, and offline
//! repairs.
//!
//! [`Admin`] works on a store directly, for a data directory whose engine is stopped
//! (the `sagaflow` CLI without `--url`). A running [`crate::Engine`] answers the same
//! queries over its own store and applies repairs live ([`crate::Engine::repair`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::error::{Error, Result};
use crate::ids::{Lsn, SagaId};
use crate::machine::{check_repair, Event, LogRecord, ParkKind, Repair, SagaState, SagaStatus};
use crate::store::{codec, SagaLog, SagaMeta, SledLog, Write};

/// Which sagas to list.
///
/// ```
/// use std::time::Duration;
/// use sagaflow::admin::ListFilter;
/// use sagaflow::SagaStatus;
///
/// let stuck = ListFilter::default().stuck_for(Duration::from_secs(900));
/// let parked = ListFilter::default().status(SagaStatus::Parked).definition("checkout");
/// # let _ = (stuck, parked);
/// ```
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ListFilter {
    /// Only this status.
    pub status: Option<SagaStatus>,
    /// Only this definition.
    pub definition: Option<String>,
    /// Only sagas started at least this long ago.
    pub older_than: Option<Duration>,
    /// Only sagas started at most this long ago.
    pub newer_than: Option<Duration>,
    /// Only sagas stuck for at least this long (see [`is_stuck`]).
    pub stuck_for: Option<Duration>,
    /// Only parked sagas of this kind.
    pub park_kind: Option<ParkKind>,
    /// Only the saga started with this start key (looked up in the start-key index).
    pub start_key: Option<String>,
    /// Only sagas whose reason (why they compensated, parked or were resolved)
    /// contains this text, ignoring case.
    pub text: Option<String>,
    /// At most this many.
    pub limit: Option<usize>,
    /// Only sagas after this one (a cursor: the last id of the previous page), or
    /// before it with [`ListFilter::newest_first`].
    pub after: Option<SagaId>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
}

impl ListFilter {
    /// Sets [`ListFilter::status`].
    pub fn status(mut self, s: SagaStatus) -> Self {
        self.status = Some(s);
        self
    }

    /// Sets [`ListFilter::definition`].
    pub fn definition(mut self, d: impl Into<String>) -> Self {
        self.definition = Some(d.into());
        self
    }

    /// Sets [`ListFilter::older_than`].
    pub fn older_than(mut self, d: Duration) -> Self {
        self.older_than = Some(d);
        self
    }

    /// Sets [`ListFilter::stuck_for`].
    pub fn stuck_for(mut self, d: Duration) -> Self {
        self.stuck_for = Some(d);
        self
    }

    /// Sets [`ListFilter::newer_than`].
    pub fn newer_than(mut self, d: Duration) -> Self {
        self.newer_than = Some(d);
        self
    }

    /// Sets [`ListFilter::park_kind`] (and the status to parked, if none is set: a
    /// filter on another status and a park kind matches nothing).
    pub fn park_kind(mut self, kind: ParkKind) -> Self {
        self.park_kind = Some(kind);
        self.status.get_or_insert(SagaStatus::Parked);
        self
    }

    /// Sets [`ListFilter::start_key`].
    pub fn start_key(mut self, key: impl Into<String>) -> Self {
        self.start_key = Some(key.into());
        self
    }

    /// Sets [`ListFilter::text`].
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// Whether `meta` passes every part of the filter but the cursor and the limit.
    pub fn matches(&self, meta: &SagaMeta, now: Timestamp) -> bool {
        self.matches_text(
            meta,
            now,
            self.text.as_ref().map(|t| t.to_lowercase()).as_deref(),
        )
    }

    /// As [`ListFilter::matches`], with the text already lowercased (once per walk, not
    /// once per saga).
    fn matches_text(&self, meta: &SagaMeta, now: Timestamp, text: Option<&str>) -> bool {
        self.status.is_none_or(|s| s == meta.status)
            && self
                .definition
                .as_ref()
                .is_none_or(|d| *d == meta.definition)
            && self
                .older_than
                .is_none_or(|d| now.duration_since(meta.created_at) >= d)
            && self
                .newer_than
                .is_none_or(|d| now.duration_since(meta.created_at) <= d)
            && self.stuck_for.is_none_or(|d| is_stuck(meta, now, d))
            && self.park_kind.is_none_or(|k| meta.park_kind == Some(k))
            && self
                .start_key
                .as_ref()
                .is_none_or(|k| meta.start_key.as_ref().is_some_and(|m| m.as_str() == k))
            && text.is_none_or(|t| {
                meta.reason
                    .as_ref()
                    .is_some_and(|r| r.to_lowercase().contains(t))
            })
    }

    /// Sets [`ListFilter::limit`].
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }

    /// Sets [`ListFilter::after`].
    pub fn after(mut self, id: SagaId) -> Self {
        self.after = Some(id);
        self
    }

    /// Sets [`ListFilter::newest_first`].
    pub fn newest_first(mut self) -> Self {
        self.newest_first = true;
        self
    }
}

/// Summaries read per store call while listing.
const PAGE: usize = 500;

/// Whether a saga is stuck at `now`: running or compensating, with no transition for
/// longer than `threshold`, and not waiting for a retry that is still to come (a saga
/// that waits an hour for a 429's Retry-After is not stuck; one whose retry was due an
/// hour ago and has not run is), nor for an event before the await step's deadline.
pub fn is_stuck(meta: &SagaMeta, now: Timestamp, threshold: Duration) -> bool {
    meta.status.is_active()
        && now.duration_since(meta.updated_at) > threshold
        && meta.due.is_none_or(|due| due <= now)
        && meta.awaiting.as_ref().is_none_or(|a| a.until <= now)
}

/// The sagas in `store` that pass `filter`, oldest first (or newest first), from its
/// cursor on. Pages through an index ([`SagaLog::page`]): a page of a status costs the
/// same in a store of a million sagas as in one of ten; a filter on definition or age
/// reads on until it has `limit` matches. A summary that does not decode is skipped
/// with a warning, so one bad saga does not hide the others.
///
/// # Errors
///
/// [`Error::Store`] if an index cannot be read.
pub fn list(store: &dyn SagaLog, filter: &ListFilter, now: Timestamp) -> Result<Vec<SagaMeta>> {
    let want = filter.limit.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    if want == 0 {
        return Ok(out);
    }
    let text = filter.text.as_ref().map(|t| t.to_lowercase());
    let keep = |meta: &SagaMeta| filter.matches_text(meta, now, text.as_deref());
    if let Some(key) = &filter.start_key {
        // One saga at most: the start-key index says which.
        let Ok(key) = crate::ids::StartKey::new(key.clone()) else {
            return Ok(out);
        };
        let found = match store.find_start_key(&key)? {
            Some(id) => store.meta(id)?,
            None => None,
        };
        let past_cursor = |m: &SagaMeta| {
            filter.after.is_none_or(|a| {
                if filter.newest_first {
                    m.id < a
                } else {
                    m.id > a
                }
            })
        };
        out.extend(found.filter(|m| keep(m) && past_cursor(m)));
        return Ok(out);
    }
    let statuses: Vec<Option<SagaStatus>> = match (filter.status, filter.stuck_for) {
        (Some(s), _) => vec![Some(s)],
        // Stuck means active: the two active statuses, merged in id order below.
        (None, Some(_)) => vec![Some(SagaStatus::Running), Some(SagaStatus::Compensating)],
        (None, None) => vec![None],
    };
    let single = statuses.len() == 1;
    // Without a filter past the index, every summary read is kept: read no more than
    // asked for.
    let unfiltered = filter.definition.is_none()
        && filter.older_than.is_none()
        && filter.newer_than.is_none()
        && filter.stuck_for.is_none()
        && filter.park_kind.is_none()
        && filter.text.is_none()
        && single;
    for status in statuses {
        let mut cursor = filter.after;
        loop {
            let size = if unfiltered {
                PAGE.min(want.saturating_sub(out.len()))
            } else {
                PAGE
            };
            let page = store.page(status, cursor, size, filter.newest_first)?;
            let full = page.len() == size;
            // Ids grow with creation time: newest first, the first saga older than
            // `newer_than` ends the walk.
            let mut too_old = false;
            for meta in page {
                cursor = Some(meta.id);
                if filter.newest_first
                    && filter
                        .newer_than
                        .is_some_and(|d| now.duration_since(meta.created_at) > d)
                {
                    too_old = true;
                    break;
                }
                if keep(&meta) {
                    out.push(meta);
                    if single && out.len() >= want {
                        return Ok(out);
                    }
                }
            }
            if !full || too_old {
                break;
            }
        }
    }
    out.sort_by_key(|m| m.id);
    if filter.newest_first {
        out.reverse();
    }
    out.truncate(want);
    Ok(out)
}

/// Counts over a whole store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Stats {
    /// Sagas in the store.
    pub total: u64,
    /// Sagas by status.
    pub by_status: BTreeMap<String, u64>,
    /// Sagas by definition, then status.
    pub by_definition: BTreeMap<String, BTreeMap<String, u64>>,
    /// The oldest saga still running or compensating, and its age in seconds.
    pub oldest_active: Option<(SagaId, u64)>,
    /// Active sagas stuck for longer than the threshold given.
    pub stuck: u64,
    /// Sagas waiting on a retry timer.
    pub waiting_for_retry: u64,
}

/// Counts the sagas in `store`: totals from the store's counters ([`SagaLog::counts`]),
/// the rest from the active sagas alone, never from every summary.
///
/// # Errors
///
/// [`Error::Store`] if an index cannot be read.
pub fn stats(store: &dyn SagaLog, now: Timestamp, stuck_after: Duration) -> Result<Stats> {
    let mut s = Stats::default();
    let counts = store.counts()?;
    for (status, n) in &counts.by_status {
        s.total += n;
        *s.by_status.entry(status.to_string()).or_default() += n;
    }
    for (definition, by) in counts.by_definition {
        let d = s.by_definition.entry(definition).or_default();
        for (status, n) in by {
            *d.entry(status.to_string()).or_default() += n;
        }
    }
    for status in [SagaStatus::Running, SagaStatus::Compensating] {
        let filter = ListFilter::default().status(status);
        for meta in list(store, &filter, now)? {
            let age = now.duration_since(meta.created_at).as_secs();
            if s.oldest_active.is_none_or(|(_, a)| age > a) {
                s.oldest_active = Some((meta.id, age));
            }
            if is_stuck(&meta, now, stuck_after) {
                s.stuck += 1;
            }
            if meta.due.is_some() {
                s.waiting_for_retry += 1;
            }
        }
    }
    Ok(s)
}

/// What happened over the last minutes, in equal buckets (oldest first): what an
/// overview charts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Activity {
    /// The length of each bucket, in seconds.
    pub bucket_secs: u64,
    /// When the first bucket begins.
    pub since: Timestamp,
    /// Sagas started in each bucket.
    pub started: Vec<u64>,
    /// Sagas completed in each bucket.
    pub completed: Vec<u64>,
    /// Sagas compensated or cancelled in each bucket.
    pub compensated: Vec<u64>,
    /// The median time from start to completion of the sagas completed in each bucket,
    /// in milliseconds (`None`: none completed).
    pub p50_ms: Vec<Option<u64>>,
    /// Over the whole window: median and 95th percentile from start to completion.
    pub p50_ms_all: Option<u64>,
    /// Likewise, the 95th percentile.
    pub p95_ms_all: Option<u64>,
    /// Whether more sagas started or finished in the window than were read
    /// ([`ACTIVITY_CAP`] of each): the counts are then lower bounds.
    pub truncated: bool,
}

/// At most this many started and this many finished sagas are read for [`activity`].
pub const ACTIVITY_CAP: usize = 20_000;

/// Starts, completions, compensations and completion latency over the `window` before
/// `now`, in `buckets` buckets. Reads the newest sagas through the id index (ids grow
/// with time) and the finished ones through the finish-time index, each up to
/// [`ACTIVITY_CAP`]: never the whole store.
///
/// # Errors
///
/// [`Error::Store`].
pub fn activity(
    store: &dyn SagaLog,
    now: Timestamp,
    window: Duration,
    buckets: usize,
) -> Result<Activity> {
    let buckets = buckets.clamp(1, 1000);
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
    let bucket_ms = window_ms.div_ceil(buckets as u64).max(1);
    let since = Timestamp::from_millis(now.as_millis().saturating_sub(window_ms));
    // The window is `since..=now`: a saga of this very millisecond is in the last bucket.
    let slot = |t: Timestamp| -> Option<usize> {
        if t > now {
            return None;
        }
        let off = t.as_millis().checked_sub(since.as_millis())?;
        usize::try_from(off / bucket_ms)
            .ok()
            .map(|i| i.min(buckets - 1))
    };
    let mut a = Activity {
        bucket_secs: bucket_ms / 1000,
        since,
        started: vec![0; buckets],
        completed: vec![0; buckets],
        compensated: vec![0; buckets],
        p50_ms: vec![None; buckets],
        p50_ms_all: None,
        p95_ms_all: None,
        truncated: false,
    };
    // Started: newest first, until older than the window.
    let mut cursor = None;
    let mut read = 0;
    'started: loop {
        let page = store.page(None, cursor, PAGE, true)?;
        let full = page.len() == PAGE;
        for m in page {
            cursor = Some(m.id);
            if m.created_at < since {
                break 'started;
            }
            read += 1;
            if read > ACTIVITY_CAP {
                a.truncated = true;
                break 'started;
            }
            if let Some(i) = slot(m.created_at) {
                a.started[i] += 1;
            }
        }
        if !full {
            break;
        }
    }
    // Finished: by finish time, from the window's start.
    let floor = (
        Timestamp::from_millis(since.as_millis().saturating_sub(1)),
        SagaId::from_bytes([0xff; 16]),
    );
    let finished = store.finished_before(now, Some(floor), ACTIVITY_CAP + 1)?;
    a.truncated |= finished.len() > ACTIVITY_CAP;
    let mut by_bucket: Vec<Vec<u64>> = vec![Vec::new(); buckets];
    let mut all = Vec::new();
    // The summaries in batches: one round trip per thousand sagas on a remote store,
    // not one per saga.
    let finished: Vec<(Timestamp, SagaId)> = finished.into_iter().take(ACTIVITY_CAP).collect();
    let mut summaries = BTreeMap::new();
    for chunk in finished.chunks(1000) {
        let ids: Vec<SagaId> = chunk.iter().map(|(_, id)| *id).collect();
        summaries.extend(store.metas(&ids)?.into_iter().map(|m| (m.id, m)));
    }
    for (at, id) in finished {
        let Some(i) = slot(at) else { continue };
        let Some(m) = summaries.get(&id) else {
            continue;
        };
        match m.status {
            SagaStatus::Completed => {
                a.completed[i] += 1;
                let ms = at.as_millis().saturating_sub(m.created_at.as_millis());
                by_bucket[i].push(ms);
                all.push(ms);
            }
            SagaStatus::Compensated | SagaStatus::Cancelled => a.compensated[i] += 1,
            _ => {}
        }
    }
    let pct = |v: &mut Vec<u64>, p: usize| -> Option<u64> {
        v.sort_unstable();
        let last = v.len().checked_sub(1)?;
        v.get(last * p / 100).copied()
    };
    for (i, v) in by_bucket.iter_mut().enumerate() {
        a.p50_ms[i] = pct(v, 50);
    }
    a.p50_ms_all = pct(&mut all, 50);
    a.p95_ms_all = pct(&mut all, 95);
    Ok(a)
}

/// A saga's log, decoded.
///
/// # Errors
///
/// [`Error::UnknownSaga`], [`Error::CorruptLog`], [`Error::Store`].
pub fn history(store: &dyn SagaLog, id: SagaId) -> Result<Vec<LogRecord>> {
    let raw = store.read(id)?;
    if raw.is_empty() {
        return Err(Error::UnknownSaga(id));
    }
    Ok(codec::decode_log(id, &raw)?)
}

/// One part of a saga's log that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LogProblem {
    /// The lsn of the stored value (or record) concerned.
    pub lsn: Lsn,
    /// What is wrong with it.
    pub problem: String,
    /// Whether it was written by a newer engine rather than damaged.
    pub newer_format: bool,
}

/// A saga's log as far as it can be read: every stored value that decodes, and what is
/// wrong with the others. What an operator looks at for a saga parked with a corrupt
/// log, and what recovery decides from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReadableLog {
    /// The records that decode, in lsn order.
    pub records: Vec<LogRecord>,
    /// The values that do not decode, or the first record that does not fit the ones
    /// before it.
    pub problems: Vec<LogProblem>,
    /// The lsn a record appended now would get: after everything stored, or, should that
    /// overflow (a damaged key with lsn `u64::MAX`), the first lsn no stored value uses.
    /// `None` only if no lsn is free.
    pub next_lsn: Option<Lsn>,
}

/// Reads as much of a saga's log as can be read. Never fails on what the log holds,
/// only on the store itself.
///
/// # Errors
///
/// [`Error::UnknownSaga`] if the saga has no log, or [`Error::Store`].
pub fn readable_log(store: &dyn SagaLog, id: SagaId) -> Result<ReadableLog> {
    readable_log_of(id, store.read(id)?)
}

/// [`readable_log`] over log values already read.
pub(crate) fn readable_log_of(
    id: SagaId,
    raw: Vec<(crate::ids::Lsn, Vec<u8>)>,
) -> Result<ReadableLog> {
    if raw.is_empty() {
        return Err(Error::UnknownSaga(id));
    }
    let mut out = ReadableLog::default();
    // The lsns each stored value covers: a group covers one per record.
    let mut covered: Vec<(u64, u64)> = Vec::with_capacity(raw.len());
    for (lsn, bytes) in &raw {
        match codec::decode_value(id, *lsn, bytes) {
            Ok(records) => {
                let last = records.last().map_or(lsn.0, |r| r.lsn.0);
                covered.push((lsn.0, last));
                out.records.extend(records);
            }
            Err(e) => {
                covered.push((lsn.0, lsn.0));
                out.problems.push(LogProblem {
                    lsn: *lsn,
                    newer_format: matches!(e, crate::store::Error::NewerFormat { .. }),
                    problem: crate::bound_message(e.to_string()),
                });
            }
        }
    }
    if let Err(e) = SagaState::fold(id, &out.records) {
        if out.problems.is_empty() {
            out.problems.push(LogProblem {
                lsn: e.lsn,
                problem: crate::bound_message(e.to_string()),
                newer_format: false,
            });
        }
    }
    out.next_lsn = next_free_lsn(&covered).map(Lsn);
    Ok(out)
}

/// After the highest covered lsn if that does not overflow, else the first gap.
fn next_free_lsn(covered: &[(u64, u64)]) -> Option<u64> {
    let highest = covered.iter().map(|&(_, last)| last).max()?;
    if let Some(next) = highest.checked_add(1) {
        return Some(next);
    }
    let mut ranges = covered.to_vec();
    ranges.sort_unstable();
    let mut free = 0u64;
    for (first, last) in ranges {
        if first > free {
            return Some(free);
        }
        free = free.max(last.checked_add(1)?);
    }
    Some(free)
}

/// A saga's state, folded from its log.
///
/// # Errors
///
/// As [`history`].
pub fn state(store: &dyn SagaLog, id: SagaId) -> Result<SagaState> {
    SagaState::fold(id, &history(store, id)?).map_err(|e| Error::CorruptLog {
        saga: id,
        reason: e.to_string(),
    })
}

/// What [`verify`] found: a store is sound when both lists are empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Verified {
    /// Sagas looked at.
    pub sagas: usize,
    /// What the store's consistency check found (indexes against summaries and logs).
    pub findings: Vec<crate::store::Finding>,
    /// Sagas whose log does not fold, with why.
    pub unfoldable: Vec<(SagaId, String)>,
    /// Sagas whose stored summary (or drift index entry) says otherwise than their log
    /// folds to: status, finish time, open drifts, park kind.
    #[serde(default)]
    pub disagreeing: Vec<(SagaId, String)>,
}

impl Verified {
    /// Whether nothing was found.
    pub fn is_sound(&self) -> bool {
        self.findings.is_empty() && self.unfoldable.is_empty() && self.disagreeing.is_empty()
    }
}

/// How a stored summary disagrees with the summary its log folds to, if it does. A
/// summary written before a field existed (a park kind) is not held to that field.
fn disagreement(stored: &SagaMeta, folded: &SagaMeta, indexed: bool) -> Option<String> {
    let mut what = Vec::new();
    if stored.status != folded.status {
        what.push(format!(
            "status {} (the log: {})",
            stored.status, folded.status
        ));
    }
    if stored.finished_at != folded.finished_at {
        what.push(format!(
            "finish time {:?} (the log: {:?})",
            stored.finished_at, folded.finished_at
        ));
    }
    if stored.open_drifts != folded.open_drifts {
        what.push(format!(
            "{} open drifts (the log: {})",
            stored.open_drifts, folded.open_drifts
        ));
    }
    if indexed != (folded.open_drifts > 0) {
        what.push(format!(
            "{} the drift index (the log: {} open drifts)",
            if indexed { "in" } else { "not in" },
            folded.open_drifts
        ));
    }
    if stored.park_kind.is_some() && stored.park_kind != folded.park_kind {
        what.push(format!(
            "park kind {:?} (the log: {:?})",
            stored.park_kind, folded.park_kind
        ));
    }
    (!what.is_empty()).then(|| what.join("; "))
}

/// Checks a whole store: every index entry against the summaries and logs (the
/// consistency check's `findings`, as given) and every saga's log folding. For after a
/// restore or a move between stores. Reads only.
///
/// # Errors
///
/// [`Error::Store`] if the store cannot be read.
pub fn verify(store: &dyn SagaLog, findings: Vec<crate::store::Finding>) -> Result<Verified> {
    let mut out = Verified {
        findings,
        ..Verified::default()
    };
    let mut ids = Vec::new();
    for s in SagaStatus::ALL {
        ids.extend(store.with_status(s)?);
    }
    ids.sort();
    ids.dedup();
    out.sagas = ids.len();
    let mut indexed = std::collections::BTreeSet::new();
    let mut after = None;
    loop {
        let page = store.drifted(after, PAGE)?;
        let Some(last) = page.last().map(|m| m.id) else {
            break;
        };
        let full = page.len() >= PAGE;
        indexed.extend(page.into_iter().map(|m| m.id));
        if !full {
            break;
        }
        after = Some(last);
    }
    for id in ids {
        match state(store, id) {
            Ok(folded) => {
                let stored = store.meta(id)?;
                let folded = SagaMeta::of(&folded);
                let why = match &stored {
                    Some(m) => disagreement(m, &folded, indexed.contains(&id)),
                    None => Some("no summary".into()),
                };
                if let Some(why) = why {
                    out.disagreeing.push((id, why));
                }
            }
            // A saga parked or resolved over a damaged log is known damage, already
            // reported by its park reason; it is still listed here, as it does not fold.
            Err(e) => out.unfoldable.push((id, e.to_string())),
        }
    }
    Ok(out)
}

/// What [`purge`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Purged {
    /// Finished sagas that finished at or before the time given.
    pub matched: u64,
    /// Of those, deleted (0 in a dry run).
    pub deleted: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// Deletes (or, with `dry_run`, counts) the finished sagas that finished at or before
/// `finished_before`, in batches. Parked and active sagas are never deleted.
///
/// # Errors
///
/// [`Error::Store`].
pub fn purge(store: &dyn SagaLog, finished_before: Timestamp, dry_run: bool) -> Result<Purged> {
    let mut out = Purged {
        dry_run,
        ..Purged::default()
    };
    let mut cursor = None;
    loop {
        let batch = store.finished_before(finished_before, cursor, 1000)?;
        let Some(last) = batch.last().copied() else {
            break;
        };
        let mut finished = Vec::new();
        for (_, id) in &batch {
            if store.meta(*id)?.is_some_and(|m| m.status.is_final()) {
                finished.push(*id);
            }
        }
        out.matched += finished.len() as u64;
        if !dry_run && !finished.is_empty() {
            store.remove_batch(&finished)?;
            store.sync()?;
            out.deleted += finished.len() as u64;
        }
        cursor = Some(last);
    }
    Ok(out)
}

/// A checked repair, ready to be written: the saga's state with the repair applied, and
/// the atomic write that records it.
pub(crate) struct PreparedRepair {
    /// `None` for a saga resolved over a log that does not fold.
    pub(crate) state: Option<SagaState>,
    pub(crate) meta: SagaMeta,
    pub(crate) write: Write,
}

/// One open drift, with the saga it is recorded on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct DriftEntry {
    /// The saga.
    pub saga: SagaId,
    /// Its definition.
    pub definition: String,
    /// Its definition's version.
    pub version: u32,
    /// How it ended.
    pub status: SagaStatus,
    /// The drift (its `lsn` is what [`Repair::HandleDrift`] names).
    pub drift: crate::machine::DriftRecord,
}

/// The open drifts of up to `limit` sagas, in saga id order after `after` (a cursor:
/// the last saga of the previous page), each saga's drifts in the order found: a walk
/// of the store's drift index, never of every saga. A saga whose log cannot be read is
/// skipped with a warning (`verify` reports it).
///
/// # Errors
///
/// [`Error::Store`].
pub fn drifts(store: &dyn SagaLog, after: Option<SagaId>, limit: usize) -> Result<Vec<DriftEntry>> {
    let mut out = Vec::new();
    for meta in store.drifted(after, limit)? {
        let state = match state(store, meta.id) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(saga_id = %meta.id, error = %e, "drift listing: log unreadable");
                continue;
            }
        };
        for d in state.open_drifts() {
            out.push(DriftEntry {
                saga: state.id,
                definition: state.definition.clone(),
                version: state.version,
                status: state.status,
                drift: d.clone(),
            });
        }
    }
    Ok(out)
}

/// Refuses a repair without who (operator) and why (reason): both go into the log.
pub(crate) fn check_who(id: SagaId, operator: &str, reason: &str) -> Result<()> {
    if operator.trim().is_empty() || reason.trim().is_empty() {
        return Err(Error::RepairRefused {
            saga: id,
            reason: "a repair needs who (operator) and why (reason)".into(),
        });
    }
    // Both are stored in the log: bounded like every other stored message, and refused
    // rather than cut, since the operator is there to shorten them.
    if operator.len() > crate::MAX_MESSAGE_BYTES || reason.len() > crate::MAX_MESSAGE_BYTES {
        return Err(Error::RepairRefused {
            saga: id,
            reason: format!(
                "who and why are limited to {} bytes each",
                crate::MAX_MESSAGE_BYTES
            ),
        });
    }
    Ok(())
}

/// Reads the saga, checks the repair ([`check_repair`]) and builds the write that
/// records it, stamped `now`. Shared by the engine and [`Admin`], so both refuse and
/// record exactly alike.
pub(crate) fn prepare_repair(
    store: &dyn SagaLog,
    id: SagaId,
    action: Repair,
    operator: &str,
    reason: &str,
    now: Timestamp,
) -> Result<PreparedRepair> {
    check_who(id, operator, reason)?;
    let mut state = match state(store, id) {
        Ok(s) => s,
        // An operator must always be able to settle a saga whose log cannot be read.
        Err(Error::CorruptLog { .. } | Error::NewerFormat { .. })
            if action == Repair::MarkResolved =>
        {
            return resolve_unreadable(store, id, operator, reason, now);
        }
        Err(e) => return Err(e),
    };
    check_repair(&state, &action).map_err(|r| Error::RepairRefused {
        saga: id,
        reason: r.0,
    })?;
    let previous = store.meta(id)?;
    let record = LogRecord {
        lsn: state.next_lsn,
        at: now,
        event: Event::OperatorAction {
            action,
            operator: operator.to_string(),
            reason: reason.to_string(),
        },
    };
    state.apply(&record).map_err(|e| Error::CorruptLog {
        saga: id,
        reason: e.to_string(),
    })?;
    let meta = SagaMeta::of(&state);
    let write = Write {
        saga: id,
        records: vec![record.clone()],
        meta: meta.clone(),
        previous,
        fence: None,
        taken: Vec::new(),
    };
    Ok(PreparedRepair {
        state: Some(state),
        meta,
        write,
    })
}

/// Marks resolved a saga whose log does not fold: the record goes after everything
/// stored (nothing is overwritten, the unreadable part stays for inspection), and the
/// summary is built from the stored one, or from nothing if that is unreadable too.
fn resolve_unreadable(
    store: &dyn SagaLog,
    id: SagaId,
    operator: &str,
    reason: &str,
    now: Timestamp,
) -> Result<PreparedRepair> {
    let lsn = match readable_log(store, id) {
        Ok(view) => view.next_lsn,
        Err(Error::UnknownSaga(_)) => store
            .meta(id)
            .ok()
            .flatten()
            .and_then(|m| m.last_lsn.0.checked_add(1))
            .map(Lsn),
        Err(e) => return Err(e),
    }
    .ok_or_else(|| Error::CorruptLog {
        saga: id,
        reason: "no lsn is free for the resolution record".into(),
    })?;
    let previous = store.meta(id).ok().flatten();
    let record = LogRecord {
        lsn,
        at: now,
        event: Event::OperatorAction {
            action: Repair::MarkResolved,
            operator: operator.to_string(),
            reason: reason.to_string(),
        },
    };
    let meta = SagaMeta::over_unreadable_log(
        id,
        previous.as_ref(),
        SagaStatus::Resolved,
        lsn,
        now,
        format!("resolved by {operator}: {reason}"),
    );
    let write = Write {
        saga: id,
        records: vec![record.clone()],
        meta: meta.clone(),
        previous,
        fence: None,
        taken: Vec::new(),
    };
    Ok(PreparedRepair {
        state: None,
        meta,
        write,
    })
}

/// Operator access to a store whose engine is stopped.
///
/// ```
/// use sagaflow::admin::{Admin, ListFilter};
///
/// let dir = tempfile::tempdir()?;
/// let admin = Admin::open(dir.path())?;
/// assert!(admin.list(&ListFilter::default())?.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Admin {
    store: Arc<dyn SagaLog>,
    clock: Arc<dyn Clock>,
    check: crate::store::CheckReport,
}

impl Admin {
    /// Opens the sled store in `dir`.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] with [`crate::store::Error::Locked`] if an engine has it open:
    /// talk to that engine's admin API instead.
    pub fn open(dir: impl AsRef<Path>) -> Result<Admin> {
        let store = SledLog::open(dir)?;
        Admin::checked(Arc::new(store))
    }

    /// Opens the sled store in `dir` for reading only: on a private copy (see
    /// [`SledLog::open_read_only`]), so nothing in `dir` changes, not even what sled's
    /// own recovery or the consistency check would repair. Repairs made through it are
    /// lost when it is dropped: use [`Admin::open`] for those.
    ///
    /// # Errors
    ///
    /// As [`Admin::open`], and [`Error::StoreDamaged`] if the store lost committed
    /// writes.
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<Admin> {
        let store = SledLog::open_read_only(dir)?;
        Admin::checked(Arc::new(store))
    }

    /// Runs the store's consistency check (repairing what can be rebuilt, so that no
    /// saga with a log is missing from a list) and keeps its findings.
    fn checked(store: Arc<dyn SagaLog>) -> Result<Admin> {
        let report = store.check()?;
        Ok(Admin {
            store,
            clock: Arc::new(SystemClock),
            check: report,
        })
    }

    /// What the store's consistency check found when this was opened (empty for
    /// [`Admin::new`], which does not check).
    pub fn check_report(&self) -> &crate::store::CheckReport {
        &self.check
    }

    /// Admin access to `store`, stamping repairs with `clock`.
    pub fn new(store: Arc<dyn SagaLog>, clock: Arc<dyn Clock>) -> Admin {
        Admin {
            store,
            clock,
            check: crate::store::CheckReport::default(),
        }
    }

    /// See [`list`].
    ///
    /// # Errors
    ///
    /// As [`list`].
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<SagaMeta>> {
        list(&*self.store, filter, self.clock.now())
    }

    /// See [`stats`].
    ///
    /// # Errors
    ///
    /// As [`stats`].
    pub fn stats(&self, stuck_after: Duration) -> Result<Stats> {
        stats(&*self.store, self.clock.now(), stuck_after)
    }

    /// A saga's summary.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSaga`], [`Error::CorruptLog`], [`Error::Store`].
    pub fn status(&self, id: SagaId) -> Result<SagaMeta> {
        self.store.meta(id)?.ok_or(Error::UnknownSaga(id))
    }

    /// See [`history`].
    ///
    /// # Errors
    ///
    /// As [`history`].
    pub fn history(&self, id: SagaId) -> Result<Vec<LogRecord>> {
        history(&*self.store, id)
    }

    /// Records a cancellation in the stored saga (checked as [`crate::Engine::cancel`]
    /// checks it): the engine that next opens the store compensates it and ends it
    /// cancelled.
    ///
    /// # Errors
    ///
    /// [`Error::CancelRefused`], [`Error::RepairRefused`] without who and why,
    /// [`Error::UnknownSaga`], [`Error::CorruptLog`], [`Error::Store`].
    pub fn cancel(&self, id: SagaId, operator: &str, reason: &str) -> Result<SagaMeta> {
        check_who(id, operator, reason)?;
        let mut state = state(&*self.store, id)?;
        crate::machine::check_cancel(&state).map_err(|r| Error::CancelRefused {
            saga: id,
            reason: r.0,
        })?;
        let previous = self.store.meta(id)?;
        let record = LogRecord {
            lsn: state.next_lsn,
            at: self.clock.now(),
            event: Event::CancelRequested {
                operator: operator.to_string(),
                reason: reason.to_string(),
            },
        };
        state.apply(&record).map_err(|e| Error::CorruptLog {
            saga: id,
            reason: e.to_string(),
        })?;
        let meta = SagaMeta::of(&state);
        self.store.append(vec![Write {
            saga: id,
            records: vec![record.clone()],
            meta: meta.clone(),
            previous,
            fence: None,
            taken: Vec::new(),
        }])?;
        self.store.sync()?;
        Ok(meta)
    }

    /// See [`verify`]: the findings of the consistency check this was opened with, and
    /// every log folded. Open with [`Admin::open_read_only`] to verify without changing
    /// anything.
    ///
    /// # Errors
    ///
    /// As [`verify`].
    pub fn verify(&self) -> Result<Verified> {
        verify(&*self.store, self.check.findings.clone())
    }

    /// See [`drifts`].
    ///
    /// # Errors
    ///
    /// As [`drifts`].
    pub fn drifts(&self, after: Option<SagaId>, limit: usize) -> Result<Vec<DriftEntry>> {
        drifts(&*self.store, after, limit)
    }

    /// See [`purge`].
    ///
    /// # Errors
    ///
    /// As [`purge`].
    pub fn purge(&self, finished_before: Timestamp, dry_run: bool) -> Result<Purged> {
        purge(&*self.store, finished_before, dry_run)
    }

    /// See [`readable_log`].
    ///
    /// # Errors
    ///
    /// As [`readable_log`].
    pub fn readable_log(&self, id: SagaId) -> Result<ReadableLog> {
        readable_log(&*self.store, id)
    }

    /// Applies a repair to the stored saga and syncs it: the engine takes it from there
    /// when it next opens the store. Checked exactly as [`crate::Engine::repair`]
    /// checks; whether the definition is registered is for that engine to see (a resumed
    /// saga whose definition is missing is parked again, with that reason).
    ///
    /// # Errors
    ///
    /// [`Error::RepairRefused`], [`Error::UnknownSaga`], [`Error::CorruptLog`],
    /// [`Error::Store`].
    pub fn repair(
        &self,
        id: SagaId,
        action: Repair,
        operator: &str,
        reason: &str,
    ) -> Result<SagaMeta> {
        let prepared =
            prepare_repair(&*self.store, id, action, operator, reason, self.clock.now())?;
        self.store.append(vec![prepared.write])?;
        self.store.sync()?;
        Ok(prepared.meta)
    }
}
