//! Retention: finished sagas are deleted once their definition's retention has passed,
//! by a background task, in bounded batches off the runtime's threads, so that a store
//! stops growing without slowing the sagas that run.
//!
//! It walks the finish-time index (`F`), never the sagas themselves, and deletes only
//! sagas whose summary says they ended for good (completed, compensated, cancelled,
//! resolved): a parked or active saga is never deleted, whatever the index says.
//!
//! The same task deletes the inbox's deliveries older than
//! [`crate::EngineOptions::inbox_retention`]: an event no saga waited for is kept that
//! long for operators to see, and a taken one answers duplicates that long.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::definition::Retention;
use crate::executor::Inner;
use crate::ids::SagaId;
use crate::store::{Result, SagaLog};

/// What one pass deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pass {
    /// Finished sagas looked at.
    pub(crate) examined: usize,
    /// Of those, deleted.
    pub(crate) deleted: usize,
    /// Where the next pass goes on (the last one looked at), if this one was full.
    pub(crate) cursor: Option<(Timestamp, SagaId)>,
}

/// One bounded pass over the finish-time index: at most `batch` sagas finished at or
/// before `until`, after `cursor`; each is deleted if `keep_for` (its definition's
/// retention) has passed since it finished.
pub(crate) fn pass(
    store: &dyn SagaLog,
    until: Timestamp,
    cursor: Option<(Timestamp, SagaId)>,
    batch: usize,
    now: Timestamp,
    keep_for: &dyn Fn(&str, u32) -> Retention,
) -> Result<Pass> {
    let found = store.finished_before(until, cursor, batch)?;
    let mut pass = Pass {
        examined: found.len(),
        cursor: (found.len() >= batch)
            .then(|| found.last().copied())
            .flatten(),
        ..Pass::default()
    };
    let mut due = Vec::new();
    for (finished, id) in found {
        let meta = match store.meta(id) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(saga_id = %id, error = %e, "retention: summary unreadable, kept");
                continue;
            }
        };
        // A saga with drift nobody has handled is kept until somebody has.
        if !meta.status.is_final() || meta.open_drifts > 0 {
            continue;
        }
        if let Retention::For(d) = keep_for(&meta.definition, meta.version) {
            if finished.saturating_add(d) <= now {
                due.push(id);
            }
        }
    }
    if !due.is_empty() {
        store.remove_batch(&due)?;
        store.sync()?;
        pass.deleted = due.len();
    }
    Ok(pass)
}

/// The background task: a pass every `every`, at once again while passes come back full
/// (a backlog), until the engine stops.
pub(crate) async fn run(inner: Arc<Inner>, every: Duration, batch: usize) {
    let mut stopping = inner.stopping.subscribe();
    let mut cursor = None;
    let mut backlog = false;
    loop {
        if *stopping.borrow_and_update() {
            return;
        }
        if !backlog {
            let next = inner.clock.now().saturating_add(every);
            tokio::select! {
                biased;
                _ = stopping.changed() => return,
                () = inner.clock.sleep_until(next) => {}
            }
            purge_inbox(&inner).await;
        }
        let Some(shortest) = inner.shortest_retention() else {
            continue;
        };
        let now = inner.clock.now();
        let until = Timestamp::from_millis(
            now.as_millis()
                .saturating_sub(u64::try_from(shortest.as_millis()).unwrap_or(u64::MAX)),
        );
        let worker = inner.clone();
        // Deletions and the writes made to finished sagas (drift, its handling) take
        // turns: a write prepared from a saga's log must not land after the saga is
        // deleted, or it would leave half a saga behind.
        let one_at_a_time = inner.repair_lock.lock().await;
        // Through `io`: off the runtime on a remote store, inline on a local one (a
        // bounded batch), as the engine's other store calls: a blocking task would let
        // a simulation's virtual time run on while it works, and its runs differ.
        let done = inner
            .io(move |store| {
                pass(store, until, cursor, batch, now, &|name, version| {
                    worker.retention_of(name, version)
                })
            })
            .await;
        drop(one_at_a_time);
        match done {
            Ok(Ok(p)) => {
                if p.deleted > 0 {
                    tracing::debug!(deleted = p.deleted, examined = p.examined, "retention pass");
                    inner.metrics.deleted(p.deleted as u64);
                    // Paced: a backlog is worked off at the configured rate at most.
                    if let Some(rate) = inner.options.retention_max_per_sec.filter(|r| *r > 0) {
                        let pause = Duration::from_secs_f64(p.deleted as f64 / f64::from(rate));
                        let until = inner.clock.now().saturating_add(pause);
                        tokio::select! {
                            biased;
                            _ = stopping.changed() => return,
                            () = inner.clock.sleep_until(until) => {}
                        }
                    }
                }
                backlog = p.cursor.is_some();
                cursor = p.cursor;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "retention pass failed; tried again later");
                backlog = false;
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention pass did not finish");
                backlog = false;
            }
        }
    }
}

/// Deletes the deliveries received more than the inbox retention ago.
async fn purge_inbox(inner: &Arc<Inner>) {
    let Some(keep) = inner.options.inbox_retention else {
        return;
    };
    let before = Timestamp::from_millis(
        inner
            .clock
            .now()
            .as_millis()
            .saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX)),
    );
    // Through `io`: inline on a local store, as the engine's other store calls, so that
    // a simulation stays a pure function of its seed.
    match inner.io(move |s| s.inbox().purge(before)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::debug!(deleted = n, "inbox purged"),
        Ok(Err(e)) => tracing::warn!(error = %e, "inbox purge failed; tried again later"),
        Err(e) => tracing::warn!(error = %e, "inbox purge did not finish"),
    }
}
