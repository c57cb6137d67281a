//! The consistency check a store runs when it is opened: every index entry is checked
//! against the summaries and logs it stands for, and rebuilt from them where it is wrong.
//!
//! The log is the truth; the summary (`M`) is derived from it; the status, timer and
//! start-key indexes are derived from the summary. One damaged entry must have an effect
//! on one saga only, and never a silent one (G8):
//!
//! - an index entry that does not parse, or points at no saga, is deleted (it can be
//!   rebuilt, so nothing is lost);
//! - a saga with a log and a summary gets exactly the index entries its summary implies;
//! - a missing or unreadable summary over a log that folds is rebuilt from the log;
//! - a log key that does not parse is moved aside (under `Q`, nothing is deleted) and its
//!   saga is reported damaged, like a summary over no log and a log that does not fold:
//!   the engine parks each damaged saga with the reason, so it stays visible.
//!
//! Every finding is logged and returned, so the recovery report counts it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::ids::{SagaId, StartKey};
use crate::machine::{SagaState, SagaStatus};
use crate::store::codec::{self, Op};
use crate::store::kv::Kv;
use crate::store::{Error, Result, SagaMeta};

/// One inconsistency the check found, and what it did about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Finding {
    /// The saga concerned, when the damaged entry names one.
    pub saga: Option<SagaId>,
    /// What was wrong.
    pub problem: String,
    /// What the check did ("deleted", "rebuilt from the summary", ...).
    pub action: String,
}

/// What the consistency check found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Report {
    /// Sagas in the store (with a log or a summary).
    pub sagas: usize,
    /// Every inconsistency found, repaired or not.
    pub findings: Vec<Finding>,
    /// Sagas that cannot be driven as they are (a log that does not fold or has a
    /// malformed key, a summary over no log), with why: the engine parks each.
    pub damaged: Vec<(SagaId, String)>,
}

/// What an index says of one saga.
#[derive(Default)]
struct Indexed {
    statuses: Vec<SagaStatus>,
    timers: Vec<Timestamp>,
    finished: Vec<Timestamp>,
    drift: bool,
}

/// The part of a summary the indexes derive from.
struct Summary {
    status: SagaStatus,
    definition: String,
    due: Option<Timestamp>,
    start_key: Option<StartKey>,
    finished_at: Option<Timestamp>,
    drifts: bool,
}

impl From<&SagaMeta> for Summary {
    fn from(m: &SagaMeta) -> Self {
        Summary {
            status: m.status,
            definition: m.definition.clone(),
            due: m.due,
            start_key: m.start_key.clone(),
            finished_at: m.finished_at,
            drifts: m.open_drifts > 0,
        }
    }
}

fn saga_at(key: &[u8], from: usize) -> Option<SagaId> {
    let bytes: [u8; 16] = key.get(from..from + 16)?.try_into().ok()?;
    Some(SagaId::from_bytes(bytes))
}

/// Checks the whole store and returns what it found, with the changes that repair it
/// (for the caller to apply and sync, or not, for a read-only look).
pub(crate) fn check(kv: &impl Kv) -> Result<(Report, Vec<Op>)> {
    let mut report = Report::default();
    let mut ops = Vec::new();
    let note = |report: &mut Report, saga: Option<SagaId>, problem: String, action: &str| {
        tracing::warn!(saga_id = ?saga, %problem, action, "store check");
        report.findings.push(Finding {
            saga,
            problem,
            action: action.to_string(),
        });
    };

    // Logs: which sagas have one; malformed keys are moved aside.
    let mut logs: BTreeSet<SagaId> = BTreeSet::new();
    let mut damaged: BTreeMap<SagaId, String> = BTreeMap::new();
    let mut odd_log_keys = Vec::new();
    kv.visit(b"L", None, &mut |k, v| {
        match (k.len(), saga_at(k, 1)) {
            (25, Some(id)) => {
                logs.insert(id);
            }
            _ => odd_log_keys.push((k.to_vec(), v.to_vec())),
        }
        Ok(true)
    })?;
    for (k, v) in odd_log_keys {
        let saga = saga_at(&k, 1);
        let problem = format!("log key of {} bytes (expected 25)", k.len());
        note(&mut report, saga, problem.clone(), "moved aside under Q");
        ops.push(Op::Put(codec::quarantine_key(&k), v));
        ops.push(Op::Delete(k));
        if let Some(id) = saga {
            logs.insert(id);
            damaged.insert(id, format!("its log has a malformed key: {problem}"));
        }
    }

    // Summaries.
    let mut summaries: BTreeMap<SagaId, Summary> = BTreeMap::new();
    let mut upgraded: Vec<SagaMeta> = Vec::new();
    let mut unreadable: BTreeMap<SagaId, (Vec<u8>, String)> = BTreeMap::new();
    let mut odd_meta_keys = Vec::new();
    kv.visit(b"M", None, &mut |k, v| {
        match (k.len(), saga_at(k, 1)) {
            (17, Some(id)) => match codec::decode_meta(id, v) {
                Ok(mut m) if m.id == id => {
                    // Written before finish times were kept: its final write is when it
                    // finished (the summary is rewritten when the status changes).
                    if m.status.is_final() && m.finished_at.is_none() {
                        m.finished_at = Some(m.updated_at);
                        upgraded.push(m.clone());
                    }
                    summaries.insert(id, Summary::from(&m));
                }
                Ok(m) => {
                    unreadable.insert(id, (k.to_vec(), format!("it names saga {}", m.id)));
                }
                Err(e) => {
                    unreadable.insert(id, (k.to_vec(), e.to_string()));
                }
            },
            _ => odd_meta_keys.push((k.to_vec(), v.to_vec())),
        }
        Ok(true)
    })?;
    let upgraded_ids: BTreeSet<SagaId> = upgraded.iter().map(|m| m.id).collect();
    for m in upgraded {
        // Not an inconsistency: summaries of an earlier version, brought up to date
        // quietly (retention and purge walk the finish-time index).
        ops.push(Op::Put(codec::meta_key(m.id), codec::encode_meta(&m)?));
    }
    for (k, v) in odd_meta_keys {
        let problem = format!("summary key of {} bytes (expected 17)", k.len());
        note(&mut report, None, problem, "moved aside under Q");
        ops.push(Op::Put(codec::quarantine_key(&k), v));
        ops.push(Op::Delete(k));
    }

    // Indexes.
    let mut indexed: BTreeMap<SagaId, Indexed> = BTreeMap::new();
    let mut bad_index = Vec::new();
    kv.visit(b"S", None, &mut |k, _| {
        let status = k.get(1).copied().and_then(SagaStatus::from_code);
        match (k.len(), status, saga_at(k, 2)) {
            (18, Some(s), Some(id)) => indexed.entry(id).or_default().statuses.push(s),
            _ => bad_index.push((k.to_vec(), "status index key")),
        }
        Ok(true)
    })?;
    kv.visit(b"T", None, &mut |k, _| {
        match (codec::due_of_timer_key(k), saga_at(k, 9)) {
            (Ok(at), Some(id)) if k.len() == 25 => indexed.entry(id).or_default().timers.push(at),
            _ => bad_index.push((k.to_vec(), "timer index key")),
        }
        Ok(true)
    })?;
    kv.visit(b"F", None, &mut |k, _| {
        match (codec::due_of_timer_key(k), saga_at(k, 9)) {
            (Ok(at), Some(id)) if k.len() == 25 => indexed.entry(id).or_default().finished.push(at),
            _ => bad_index.push((k.to_vec(), "finish-time index key")),
        }
        Ok(true)
    })?;
    kv.visit(&codec::drift_prefix(), None, &mut |k, _| {
        match saga_at(k, 1) {
            Some(id) if k.len() == 17 => indexed.entry(id).or_default().drift = true,
            _ => bad_index.push((k.to_vec(), "drift index key")),
        }
        Ok(true)
    })?;
    let mut start_keys: BTreeMap<Vec<u8>, SagaId> = BTreeMap::new();
    kv.visit(b"K", None, &mut |k, v| {
        match codec::saga_of_start_key_value(v) {
            Ok(id) => {
                start_keys.insert(k.to_vec(), id);
            }
            Err(_) => bad_index.push((k.to_vec(), "start key entry")),
        }
        Ok(true)
    })?;
    for (k, what) in bad_index {
        note(
            &mut report,
            None,
            format!("{what} of {} bytes does not parse", k.len()),
            "deleted (rebuilt from the summaries)",
        );
        ops.push(Op::Delete(k));
    }

    // Summaries that are missing or unreadable over a log are rebuilt from the log.
    for (&id, (key, why)) in &unreadable {
        if logs.contains(&id) {
            continue;
        }
        note(
            &mut report,
            Some(id),
            format!("unreadable summary ({why}) and no log"),
            "moved aside under Q",
        );
        let value = kv.get(key)?.unwrap_or_default();
        ops.push(Op::Put(codec::quarantine_key(key), value));
        ops.push(Op::Delete(key.clone()));
    }
    for &id in &logs {
        if summaries.contains_key(&id) || damaged.contains_key(&id) {
            continue;
        }
        let problem = match unreadable.get(&id) {
            Some((_, why)) => format!("unreadable summary: {why}"),
            None => "no summary".to_string(),
        };
        match rebuild(kv, id) {
            Ok(meta) => {
                note(
                    &mut report,
                    Some(id),
                    problem,
                    "summary rebuilt from the log",
                );
                ops.push(Op::Put(codec::meta_key(id), codec::encode_meta(&meta)?));
                summaries.insert(id, Summary::from(&meta));
            }
            Err(e) => {
                note(
                    &mut report,
                    Some(id),
                    format!("{problem}; the log does not fold either: {e}"),
                    "reported damaged",
                );
                damaged.insert(id, format!("{problem}, and its log does not fold: {e}"));
            }
        }
    }
    for (&id, _) in summaries.iter().filter(|(id, _)| !logs.contains(id)) {
        note(
            &mut report,
            Some(id),
            "summary without a log".into(),
            "reported damaged",
        );
        damaged.insert(
            id,
            "its summary is stored but its log is missing".to_string(),
        );
    }

    // Each saga's index entries, from its summary; damaged sagas without a readable
    // summary lose theirs (parking writes the right ones).
    let all: BTreeSet<SagaId> = logs
        .iter()
        .chain(summaries.keys())
        .chain(indexed.keys())
        .copied()
        .collect();
    report.sagas = logs.union(&summaries.keys().copied().collect()).count();
    for id in all {
        let have = indexed.remove(&id).unwrap_or_default();
        let want = summaries.get(&id);
        let known = logs.contains(&id) || want.is_some();
        for s in &have.statuses {
            if want.map(|w| w.status) != Some(*s) {
                let why = if known {
                    format!("status index says {s}, the summary does not")
                } else {
                    format!("status index entry ({s}) for a saga that does not exist")
                };
                note(&mut report, Some(id), why, "deleted");
                ops.push(Op::Delete(codec::status_key(*s, id)));
            }
        }
        for t in &have.timers {
            if want.and_then(|w| w.due) != Some(*t) {
                let why = if known {
                    format!("timer index entry at {t} that the summary does not hold")
                } else {
                    format!("timer index entry at {t} for a saga that does not exist")
                };
                note(&mut report, Some(id), why, "deleted");
                ops.push(Op::Delete(codec::timer_key(*t, id)));
            }
        }
        for t in &have.finished {
            if want.and_then(|w| w.finished_at) != Some(*t) {
                let why = if known {
                    format!("finish-time index entry at {t} that the summary does not hold")
                } else {
                    format!("finish-time index entry at {t} for a saga that does not exist")
                };
                note(&mut report, Some(id), why, "deleted");
                ops.push(Op::Delete(codec::finished_key(*t, id)));
            }
        }
        if have.drift && !want.is_some_and(|w| w.drifts) {
            let why = if known {
                "drift index entry that the summary does not hold"
            } else {
                "drift index entry for a saga that does not exist"
            };
            note(&mut report, Some(id), why.into(), "deleted");
            ops.push(Op::Delete(codec::drift_key(id)));
        }
        let Some(want) = want else { continue };
        if want.drifts && !have.drift {
            note(
                &mut report,
                Some(id),
                "missing from the drift index".into(),
                "rebuilt from the summary",
            );
            ops.push(Op::Put(codec::drift_key(id), Vec::new()));
        }
        if let Some(t) = want.finished_at.filter(|t| !have.finished.contains(t)) {
            if !upgraded_ids.contains(&id) {
                note(
                    &mut report,
                    Some(id),
                    format!("missing from the finish-time index ({t})"),
                    "rebuilt from the summary",
                );
            }
            ops.push(Op::Put(codec::finished_key(t, id), Vec::new()));
        }
        if !have.statuses.contains(&want.status) {
            note(
                &mut report,
                Some(id),
                format!("missing from the status index ({})", want.status),
                "rebuilt from the summary",
            );
            ops.push(Op::Put(codec::status_key(want.status, id), Vec::new()));
        }
        if let Some(t) = want.due.filter(|t| !have.timers.contains(t)) {
            note(
                &mut report,
                Some(id),
                format!("missing from the timer index ({t})"),
                "rebuilt from the summary",
            );
            ops.push(Op::Put(codec::timer_key(t, id), Vec::new()));
        }
        if let Some(k) = &want.start_key {
            let key = codec::start_key_key(k);
            match start_keys.get(&key) {
                Some(&owner) if owner == id => {}
                Some(&owner) if logs.contains(&owner) || summaries.contains_key(&owner) => {
                    note(
                        &mut report,
                        Some(id),
                        format!("start key `{k}` also claimed by saga {owner}"),
                        "left as it is",
                    );
                }
                _ => {
                    note(
                        &mut report,
                        Some(id),
                        format!("start key `{k}` missing from the start-key index"),
                        "rebuilt from the summary",
                    );
                    ops.push(Op::Put(key.clone(), id.as_bytes().to_vec()));
                    start_keys.insert(key, id);
                }
            }
        }
    }
    for (key, owner) in &start_keys {
        // The saga a key names must say it was started with that key: otherwise a start
        // with the key would answer with somebody else's saga.
        let claims = summaries.get(owner).and_then(|w| w.start_key.as_ref());
        if let Some(claim) = claims.filter(|k| codec::start_key_key(k) != *key) {
            note(
                &mut report,
                Some(*owner),
                format!(
                    "start key `{}` points at a saga started with `{claim}`",
                    String::from_utf8_lossy(key.get(1..).unwrap_or_default())
                ),
                "deleted",
            );
            ops.push(Op::Delete(key.clone()));
            continue;
        }
        if !logs.contains(owner) && !summaries.contains_key(owner) {
            note(
                &mut report,
                Some(*owner),
                format!(
                    "start key `{}` points at a saga that does not exist",
                    String::from_utf8_lossy(key.get(1..).unwrap_or_default())
                ),
                "deleted",
            );
            ops.push(Op::Delete(key.clone()));
        }
    }
    // A damaged saga without a readable summary lost its index entries above; give it a
    // summary that says so, parked, so that it stays in every list (also for the
    // offline tools, which do not park). Recovery leaves a saga already parked alone.
    for (id, why) in &damaged {
        if summaries.contains_key(id) {
            continue;
        }
        let t = Timestamp::EPOCH;
        let placeholder = SagaMeta {
            id: *id,
            definition: "<unreadable>".into(),
            version: 0,
            status: SagaStatus::Parked,
            start_key: None,
            created_at: t,
            updated_at: t,
            last_lsn: crate::ids::Lsn(0),
            due: None,
            settling_until: None,
            awaiting: None,
            starts_at: None,
            reason: Some(crate::bound_message(format!("corrupt log: {why}"))),
            finished_at: None,
            open_drifts: 0,
            park_kind: Some(crate::machine::ParkKind::CorruptLog),
        };
        ops.push(Op::Put(
            codec::meta_key(*id),
            codec::encode_meta(&placeholder)?,
        ));
        ops.push(Op::Put(
            codec::status_key(SagaStatus::Parked, *id),
            Vec::new(),
        ));
    }
    // The counters stats read: recounted from the summaries, since this walk reads
    // them all anyway. A store written before counters were kept has none: they are
    // made quietly; a counter that disagrees is a finding.
    let mut want: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for sum in summaries.values() {
        *want
            .entry(codec::counter_key(sum.status, &sum.definition))
            .or_default() += 1;
    }
    // Placeholders, parked, for damaged sagas without a readable summary (above).
    let placeholders = damaged
        .keys()
        .filter(|id| !summaries.contains_key(id))
        .count() as u64;
    if placeholders > 0 {
        *want
            .entry(codec::counter_key(SagaStatus::Parked, "<unreadable>"))
            .or_default() += placeholders;
    }
    let mut have: BTreeMap<Vec<u8>, Option<u64>> = BTreeMap::new();
    kv.visit(&codec::counter_prefix(), None, &mut |k, v| {
        have.insert(k.to_vec(), codec::count_of(v).ok());
        Ok(true)
    })?;
    let had_counters = !have.is_empty();
    for (k, n) in &want {
        if have.get(k) != Some(&Some(*n)) {
            if had_counters {
                let what = codec::counted_by(k).map_or_else(
                    |_| "a counter".to_string(),
                    |(s, d)| format!("the count of {d} {s}"),
                );
                note(
                    &mut report,
                    None,
                    format!(
                        "{what} is {:?}, the summaries say {n}",
                        have.get(k).copied().flatten()
                    ),
                    "recounted",
                );
            }
            ops.push(Op::Put(k.clone(), n.to_be_bytes().to_vec()));
        }
    }
    for k in have.keys().filter(|k| !want.contains_key(*k)) {
        note(
            &mut report,
            None,
            "a counter of sagas that do not exist".into(),
            "deleted",
        );
        ops.push(Op::Delete(k.clone()));
    }
    report.damaged = damaged.into_iter().collect();
    Ok((report, ops))
}

/// A saga's summary rebuilt from its log.
fn rebuild(kv: &impl Kv, id: SagaId) -> Result<SagaMeta> {
    let values = super::kv::read(kv, id)?;
    let records = codec::decode_log(id, &values)?;
    let state = SagaState::fold(id, &records).map_err(|e| Error::Corrupt {
        saga: id,
        what: "log".into(),
        reason: e.to_string(),
    })?;
    Ok(SagaMeta::of(&state))
}
