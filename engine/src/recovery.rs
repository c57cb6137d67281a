//! Recovery: what the engine does with the sagas it finds when it opens a store.
//!
//! Every saga that is running or compensating is read back, decoded and folded, then
//! handed to a driver, which asks `decide` what comes next, exactly as it would have
//! before the crash (G4). A saga that cannot be driven is parked with the reason: its
//! definition is not registered, or its log does not decode or does not fit together
//! (G8). One bad saga never stops the others.

use std::sync::Arc;

use crate::error::Result;
use crate::executor::{Driver, Inner};
use crate::ids::{Lsn, SagaId};
use crate::machine::{Event, LogRecord, ParkKind, ParkReason, SagaState, SagaStatus};
use crate::store::{codec, SagaMeta, Write};

/// What recovery found.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Sagas handed back to a driver.
    pub resumed: usize,
    /// Sagas parked at recovery, with the reason.
    pub parked: Vec<(SagaId, ParkReason)>,
    /// Sagas that could not even be parked (the store refused the write); they stay as
    /// they are and are tried again at the next open.
    pub failed: Vec<(SagaId, String)>,
}

pub(crate) async fn recover(inner: &Arc<Inner>) -> Result<RecoveryReport> {
    let mut report = RecoveryReport::default();
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
                .map(|id| (id, status)),
        );
    }
    for (id, status) in todo {
        if let Err(e) = recover_one(inner, id, status, &mut report).await {
            tracing::error!(saga_id = %id, error = %e, "recovery failed for saga");
            report.failed.push((id, e.to_string()));
        }
    }
    tracing::info!(
        resumed = report.resumed,
        parked = report.parked.len(),
        failed = report.failed.len(),
        "recovery done"
    );
    Ok(report)
}

async fn recover_one(
    inner: &Arc<Inner>,
    id: SagaId,
    indexed: SagaStatus,
    report: &mut RecoveryReport,
) -> Result<()> {
    let raw = inner.store.read(id)?;
    // The next lsn follows the last record that can be read; if the last value does
    // not decode, its key's lsn + 1 is still free (keys are first lsns of groups).
    let next_lsn = raw.last().map_or(Lsn(0), |(l, bytes)| {
        codec::decode_value(id, *l, bytes)
            .ok()
            .and_then(|rs| rs.last().map(|r| Lsn(r.lsn.0 + 1)))
            .unwrap_or(Lsn(l.0 + 1))
    });
    let meta = inner.store.meta(id);
    let folded = codec::decode_log(id, &raw)
        .map_err(|e| e.to_string())
        .and_then(|records| SagaState::fold(id, &records).map_err(|e| e.to_string()));
    let corrupt = |why: String| ParkReason::new(ParkKind::CorruptLog, why);
    match (folded, meta) {
        (Ok(state), Ok(Some(meta))) => match inner.definition(&state.definition, state.version) {
            Some(def) => {
                tracing::info!(saga_id = %id, status = %state.status, "resuming saga");
                inner.spawn(Driver::new(inner.clone(), def, state, Some(meta)));
                report.resumed += 1;
                Ok(())
            }
            None => {
                let reason = ParkReason::new(
                    ParkKind::UnknownDefinition,
                    format!(
                        "definition `{}` version {} is not registered with this engine",
                        state.definition, state.version
                    ),
                );
                park(inner, id, indexed, next_lsn, Some(meta), reason, report).await
            }
        },
        (Ok(_), Ok(None)) => {
            let reason = corrupt("the saga has a log but no summary".into());
            park(inner, id, indexed, next_lsn, None, reason, report).await
        }
        (Err(why), meta) => {
            park(
                inner,
                id,
                indexed,
                next_lsn,
                meta.ok().flatten(),
                corrupt(why),
                report,
            )
            .await
        }
        (Ok(_), Err(e)) => {
            park(
                inner,
                id,
                indexed,
                next_lsn,
                None,
                corrupt(e.to_string()),
                report,
            )
            .await
        }
    }
}

/// Parks a saga that cannot be driven: one more record after whatever its log holds, so
/// nothing already written is lost and an operator sees why.
async fn park(
    inner: &Arc<Inner>,
    id: SagaId,
    indexed: SagaStatus,
    lsn: Lsn,
    meta: Option<SagaMeta>,
    reason: ParkReason,
    report: &mut RecoveryReport,
) -> Result<()> {
    tracing::warn!(saga_id = %id, kind = ?reason.kind, reason = %reason.message, "parking saga at recovery");
    let now = inner.clock.now();
    let record = LogRecord {
        lsn,
        at: now,
        event: Event::Parked {
            reason: reason.clone(),
        },
    };
    // Without a readable summary, rebuild the part the indexes need: the status it was
    // found under, so that index entry is moved rather than left behind.
    let previous = meta.unwrap_or_else(|| SagaMeta {
        id,
        definition: String::from("<unreadable>"),
        version: 0,
        status: indexed,
        start_key: None,
        created_at: now,
        updated_at: now,
        last_lsn: Lsn(lsn.0.saturating_sub(1)),
        due: None,
        reason: None,
    });
    let previous_definition = previous.definition.clone();
    let meta = SagaMeta {
        status: SagaStatus::Parked,
        updated_at: now,
        last_lsn: lsn,
        due: None,
        reason: Some(reason.message.clone()),
        ..previous.clone()
    };
    let write = Write {
        saga: id,
        records: vec![(lsn, codec::encode_record(&record)?)],
        meta,
        previous: Some(previous),
    };
    inner.committer.commit(write).await?;
    inner.metrics.ended(&previous_definition, "parked", None);
    report.parked.push((id, reason));
    Ok(())
}
