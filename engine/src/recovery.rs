//! Recovery: what the engine does with the sagas it finds when it opens a store.
//!
//! Every saga that is running or compensating is read back, decoded and folded, then
//! handed to a driver, which asks `decide` what comes next, exactly as it would have
//! before the crash (G4). A saga that cannot be driven is parked with the reason: its
//! definition is not registered, or its log does not decode or does not fit together
//! (G8). One bad saga never stops the others.
//!
//! In a store several engine processes share, recovery takes only what this process
//! can claim: sagas whose lease expired (their process died) or that wait, handed back,
//! for a timer now due. The lease task goes on claiming after open; a claimed saga
//! goes through the same `recover_one` as at open, under its new epoch.
//!
//! Before any of that, the store checks itself (`SagaLog::check`): indexes that do not
//! match the summaries and logs are repaired, and sagas found damaged are parked here,
//! so that no saga with a log is missing from the list.

use std::sync::Arc;

use std::collections::HashSet;

use crate::admin;
use crate::error::{Error, Result};
use crate::executor::{Driver, Inner};
use crate::ids::{Lsn, SagaId};
use crate::machine::{
    definition_mismatch, Event, LogRecord, ParkKind, ParkReason, SagaState, SagaStatus,
};
use crate::payload::bound_message;
use crate::store::{Finding, SagaMeta, Write};

/// What recovery found.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Sagas the store's consistency check saw (with a log or a summary).
    pub checked: usize,
    /// Every inconsistency the store's consistency check found, and what it did: each
    /// is also logged at WARN.
    pub findings: Vec<Finding>,
    /// How many sagas were handed back to a driver.
    pub resumed: usize,
    /// Which: the ids of the sagas resumed.
    pub resumed_ids: Vec<SagaId>,
    /// Sagas parked at recovery, with the reason: damaged, unreadable, written by a
    /// newer engine, or whose definition is missing or no longer fits.
    pub parked: Vec<(SagaId, ParkReason)>,
    /// Sagas that could not even be parked (the store refused the write); they stay as
    /// they are and are tried again at the next open.
    pub failed: Vec<(SagaId, String)>,
}

pub(crate) async fn recover(inner: &Arc<Inner>) -> Result<RecoveryReport> {
    let check = inner.io(|store| store.check()).await??;
    let mut report = RecoveryReport {
        checked: check.sagas,
        findings: check.findings,
        ..RecoveryReport::default()
    };
    let mut handled = HashSet::new();
    for (id, why) in check.damaged {
        handled.insert(id);
        let meta = inner.io(move |store| store.meta(id)).await?.ok().flatten();
        // A saga that had ended, or was parked already, stays as it is: it is visible
        // in the list, and the finding says what is wrong with it.
        if meta.as_ref().is_some_and(|m| !m.status.is_active()) {
            continue;
        }
        // In a shared store, parked only under a lease of this process's.
        let epoch = if inner.shared() {
            let owner = inner.owner.clone();
            let lease = inner
                .lease_io(move |l| l.acquire(&owner, id))
                .await?
                .flatten();
            match lease {
                Some(l) => Some(l.epoch),
                None => continue,
            }
        } else {
            None
        };
        let lsn = match inner
            .io(move |store| admin::readable_log(store, id))
            .await?
        {
            Ok(view) => view.next_lsn,
            Err(_) => meta
                .as_ref()
                .and_then(|m| m.last_lsn.0.checked_add(1))
                .map(Lsn),
        };
        let reason = ParkReason::new(ParkKind::CorruptLog, bound_message(why));
        if let Err(e) = park(inner, id, lsn, meta, reason, &mut report, epoch).await {
            tracing::error!(saga_id = %id, error = %e, "could not park a damaged saga");
            report.failed.push((id, e.to_string()));
        }
    }
    if inner.shared() {
        // Whatever can be claimed now; the lease task claims the rest as leases expire.
        crate::executor::claim_all(inner, &mut report).await?;
        log_report(&report);
        return Ok(report);
    }
    // Both lists are read before any driver starts: a resumed saga that begins
    // compensating while recovery goes on moves from one index to the other, and must
    // not be picked up a second time.
    let mut todo = Vec::new();
    for status in [SagaStatus::Running, SagaStatus::Compensating] {
        todo.extend(
            inner
                .store
                .with_status(status)?
                .into_iter()
                .filter(|id| !handled.contains(id)),
        );
    }
    for id in todo {
        if let Err(e) = recover_one(inner, id, &mut report, None).await {
            tracing::error!(saga_id = %id, error = %e, "recovery failed for saga");
            report.failed.push((id, e.to_string()));
        }
    }
    log_report(&report);
    Ok(report)
}

fn log_report(report: &RecoveryReport) {
    tracing::info!(
        checked = report.checked,
        findings = report.findings.len(),
        resumed = report.resumed,
        parked = report.parked.len(),
        failed = report.failed.len(),
        "recovery done"
    );
}

/// Reads one saga back and hands it to a driver (under lease `epoch` in a shared
/// store), or parks it with the reason it cannot be driven.
pub(crate) async fn recover_one(
    inner: &Arc<Inner>,
    id: SagaId,
    report: &mut RecoveryReport,
    epoch: Option<u64>,
) -> Result<()> {
    let loaded = inner.io(move |store| store.load(&[id])).await??;
    let Some(loaded) = loaded.into_iter().next() else {
        return Err(Error::UnknownSaga(id));
    };
    recover_loaded(inner, loaded, report, epoch).await
}

/// As [`recover_one`], for a saga whose log and summary were read already (a batch of
/// claimed sagas is read in one store call).
pub(crate) async fn recover_loaded(
    inner: &Arc<Inner>,
    loaded: crate::store::Loaded,
    report: &mut RecoveryReport,
    epoch: Option<u64>,
) -> Result<()> {
    let id = loaded.saga;
    let meta = loaded.meta;
    let view = admin::readable_log_of(id, loaded.log)?;
    let lsn = view.next_lsn;
    if let Some(first) = view.problems.first() {
        let kind = if view.problems.iter().any(|p| p.newer_format) {
            ParkKind::NewerFormat
        } else {
            ParkKind::CorruptLog
        };
        let reason = ParkReason::new(kind, first.problem.clone());
        return park(inner, id, lsn, meta, reason, report, epoch).await;
    }
    // No problems: the records fold (readable_log checked).
    let state = SagaState::fold(id, &view.records).map_err(|e| Error::CorruptLog {
        saga: id,
        reason: e.to_string(),
    })?;
    let Some(def) = inner.definition(&state.definition, state.version) else {
        if let (Some(e), true) = (epoch, inner.shared()) {
            // Another process may know it (a rolling deploy): give it back for a minute
            // rather than park it here. A definition no process knows keeps coming back
            // and shows as stuck.
            tracing::warn!(
                saga_id = %id,
                definition = %state.definition,
                version = state.version,
                "claimed a saga whose definition this process does not know: given back"
            );
            let wake = inner
                .clock
                .now()
                .saturating_add(std::time::Duration::from_secs(60));
            let (owner, lease) = (
                inner.owner.clone(),
                crate::store::Lease { saga: id, epoch: e },
            );
            inner
                .lease_io(move |l| l.release(&owner, lease, Some(wake)))
                .await?;
            report.failed.push((
                id,
                format!(
                    "definition `{}` version {} unknown here",
                    state.definition, state.version
                ),
            ));
            return Ok(());
        }
        let reason = ParkReason::new(
            ParkKind::UnknownDefinition,
            format!(
                "definition `{}` version {} is not registered with this engine",
                state.definition, state.version
            ),
        );
        return park(inner, id, lsn, meta, reason, report, epoch).await;
    };
    if let Some(reason) = definition_mismatch(&def, &state) {
        return park(inner, id, lsn, meta, reason, report, epoch).await;
    }
    tracing::info!(saga_id = %id, status = %state.status, "resuming saga");
    // A summary the check could not rebuild is written afresh with the next transition.
    let driver = Driver::new(inner.clone(), def, state, meta).with_epoch(epoch);
    if !inner.spawn(driver) {
        return Err(Error::Store(Arc::new(crate::store::Error::Backend(
            "a driver for this saga runs here already".into(),
        ))));
    }
    report.resumed += 1;
    report.resumed_ids.push(id);
    Ok(())
}

/// Parks a saga that cannot be driven: one more record after whatever its log holds, so
/// nothing already written is lost and an operator sees why.
async fn park(
    inner: &Arc<Inner>,
    id: SagaId,
    lsn: Option<Lsn>,
    meta: Option<SagaMeta>,
    reason: ParkReason,
    report: &mut RecoveryReport,
    epoch: Option<u64>,
) -> Result<()> {
    let Some(lsn) = lsn else {
        return Err(Error::CorruptLog {
            saga: id,
            reason: "no lsn is free for a park record".into(),
        });
    };
    tracing::warn!(saga_id = %id, kind = ?reason.kind, reason = %reason.message, "parking saga at recovery");
    let now = inner.clock.now();
    let record = LogRecord {
        lsn,
        at: now,
        event: Event::Parked {
            reason: reason.clone(),
        },
    };
    // Without a readable summary, the consistency check has removed the saga's index
    // entries: this write creates them afresh, as for a saga's first write.
    let mut parked = SagaMeta::over_unreadable_log(
        id,
        meta.as_ref(),
        SagaStatus::Parked,
        lsn,
        now,
        reason.message.clone(),
    );
    parked.park_kind = Some(reason.kind);
    let definition = parked.definition.clone();
    let write = Write {
        saga: id,
        records: vec![record],
        meta: parked,
        previous: meta,
        fence: epoch.map(|e| inner.fence(e)),
        taken: Vec::new(),
    };
    inner.committer.commit(write).await?;
    inner.metrics.ended(&definition, "parked", None);
    report.parked.push((id, reason));
    Ok(())
}
