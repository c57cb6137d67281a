//! The invariants every run must satisfy, checked against the log and the ledger.
//!
//! Each checker returns the first violation it finds as a sentence. The tests in
//! `tests/tests/checkers.rs` feed each one a hand-broken history, so none can pass
//! vacuously.

use std::collections::{BTreeMap, BTreeSet};

use sagaflow::machine::{Event, LogRecord, SagaState};
use sagaflow::{Idempotence, IdempotencyKey, Phase, SagaId, SagaStatus, StepKind};

use crate::Call;

/// A step's shape in the definition the run used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepShape {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: StepKind,
    /// Whether it may be re-run after an unknown outcome.
    pub idempotence: Idempotence,
}

/// Everything observed about one saga after a run.
#[derive(Clone, Debug)]
pub struct ObservedSaga {
    /// The saga.
    pub id: SagaId,
    /// Its definition's steps.
    pub shape: Vec<StepShape>,
    /// Its status in the store's summary.
    pub status: Option<SagaStatus>,
    /// The summary's reason.
    pub reason: Option<String>,
    /// Its durable log.
    pub history: Vec<LogRecord>,
    /// Every call the services received for it, in order.
    pub calls: Vec<Call>,
    /// The stage of each step in the definition the run used (steps of a parallel group
    /// share one): what the compensation checks order by, and what the log's `started`
    /// record must say.
    pub stages: Vec<u32>,
}

impl ObservedSaga {
    /// Saga `id` as `store` holds it after a run, with the `calls` the services received
    /// for it (those whose key is the saga's), of a definition without parallel groups
    /// (each step a stage of its own; see [`ObservedSaga::with_stages`]).
    ///
    /// # Errors
    ///
    /// The store's error, or a log that does not decode, as a sentence.
    pub fn read(
        store: &dyn sagaflow::store::SagaLog,
        id: SagaId,
        shape: Vec<StepShape>,
        calls: &[Call],
    ) -> Result<Self, String> {
        let err = |e: sagaflow::store::Error| e.to_string();
        let meta = store.meta(id).map_err(err)?;
        let history =
            sagaflow::store::codec::decode_log(id, &store.read(id).map_err(err)?).map_err(err)?;
        let prefix = format!("{id}/");
        let shape_len = shape.len();
        Ok(ObservedSaga {
            id,
            shape,
            status: meta.as_ref().map(|m| m.status),
            reason: meta.and_then(|m| m.reason),
            history,
            calls: calls
                .iter()
                .filter(|c| c.key.starts_with(&prefix))
                .cloned()
                .collect(),
            stages: (0u32..).take(shape_len).collect(),
        })
    }

    /// The same saga, of a definition whose steps have these `stages`
    /// ([`sagaflow::SagaDefinition::step_stages`]).
    #[must_use]
    pub fn with_stages(mut self, stages: Vec<u32>) -> Self {
        self.stages = stages;
        self
    }

    /// The stage of step `i` (as the definition says).
    fn stage(&self, i: usize) -> u32 {
        self.stages.get(i).copied().unwrap_or(u32::MAX)
    }
}

fn step_index(s: &ObservedSaga, name: &str) -> Result<usize, String> {
    s.shape
        .iter()
        .position(|st| st.name == name)
        .ok_or_else(|| format!("saga {}: a call names unknown step `{name}`", s.id))
}

/// Attempts whose start is in the log, by (step, phase).
fn started_attempts(history: &[LogRecord]) -> BTreeSet<(u32, Phase, u32)> {
    history
        .iter()
        .filter_map(|r| match r.event {
            Event::StepAttemptStarted { step, attempt, .. } => {
                Some((step, Phase::Action, attempt.0))
            }
            Event::CompensationAttemptStarted { step, attempt, .. } => {
                Some((step, Phase::Compensation, attempt.0))
            }
            _ => None,
        })
        .collect()
}

/// G2: the saga ended completed, compensated, or parked with a reason, and its log
/// folds to that status.
pub fn check_final(s: &ObservedSaga) -> Result<(), String> {
    let state = SagaState::fold(s.id, &s.history)
        .map_err(|e| format!("saga {}: its log does not fold: {e}", s.id))?;
    match s.status {
        Some(SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Cancelled) => {}
        Some(SagaStatus::Parked) => {
            if s.reason.as_deref().unwrap_or("").is_empty() {
                return Err(format!("saga {} is parked without a reason", s.id));
            }
        }
        other => return Err(format!("saga {} did not end: status {other:?}", s.id)),
    }
    if state.stages != s.stages {
        return Err(format!(
            "saga {}: the log records stages {:?} but the definition has {:?}",
            s.id, state.stages, s.stages
        ));
    }
    if Some(state.status) != s.status {
        return Err(format!(
            "saga {}: the log says {} but the summary says {:?}",
            s.id, state.status, s.status
        ));
    }
    Ok(())
}

/// G3: every call carried the one key derived from (saga, step, phase); G1: every call
/// matches an attempt whose start is in the durable log.
pub fn check_keys_and_write_ahead(s: &ObservedSaga) -> Result<(), String> {
    let started = started_attempts(&s.history);
    for c in &s.calls {
        let i = step_index(s, &c.step)?;
        let want = IdempotencyKey::derive(s.id, &c.step, c.phase);
        if c.key != want.as_str() {
            return Err(format!(
                "saga {}: step `{}` {} was called with key `{}`, not `{want}`",
                s.id, c.step, c.phase, c.key
            ));
        }
        if !started.contains(&(i as u32, c.phase, c.attempt)) {
            return Err(format!(
                "saga {}: step `{}` {} attempt {} reached the service but its start is not in the log",
                s.id, c.step, c.phase, c.attempt
            ));
        }
    }
    Ok(())
}

/// G4: a step that is not idempotent took effect at most once.
pub fn check_not_idempotent_once(s: &ObservedSaga) -> Result<(), String> {
    let mut applied: BTreeMap<&str, u32> = BTreeMap::new();
    for c in s
        .calls
        .iter()
        .filter(|c| c.applied && c.phase == Phase::Action)
    {
        *applied.entry(&c.step).or_default() += 1;
    }
    for st in &s.shape {
        let n = applied.get(st.name.as_str()).copied().unwrap_or(0);
        if st.idempotence == Idempotence::NotIdempotent && n > 1 {
            return Err(format!(
                "saga {}: step `{}` is not idempotent but took effect {n} times",
                s.id, st.name
            ));
        }
    }
    Ok(())
}

/// Which steps' actions may have taken effect, as the log says (G5): an attempt was
/// started and did not end rejected.
fn may_have_taken_effect(s: &ObservedSaga) -> Result<Vec<bool>, String> {
    let state = SagaState::fold(s.id, &s.history)
        .map_err(|e| format!("saga {}: its log does not fold: {e}", s.id))?;
    Ok(state
        .steps
        .iter()
        .map(|st| st.may_have_taken_effect())
        .collect())
}

/// Which steps were owed a compensation (G5): compensatable, and may have taken effect.
fn owed(s: &ObservedSaga) -> Result<Vec<bool>, String> {
    Ok(may_have_taken_effect(s)?
        .into_iter()
        .zip(&s.shape)
        .map(|(effect, st)| effect && st.kind == StepKind::Compensatable)
        .collect())
}

/// G5, as the services saw it: compensations only for compensatable steps that may have
/// taken effect (started, and not only rejected), stage by stage in reverse order, and
/// nothing forward once compensation began. Stages are a partial order: the branches of
/// one parallel group are compensated concurrently, in any order among themselves, but
/// no step of a stage is compensated before every step of a later stage that was owed a
/// compensation has had its undo applied, and never a later stage again once an earlier
/// one has begun.
pub fn check_compensation_order(s: &ObservedSaga) -> Result<(), String> {
    let started = started_attempts(&s.history);
    let effect = may_have_taken_effect(s)?;
    let owed = owed(s)?;
    // The earliest stage whose compensation reached a service so far, and one such step.
    let mut lowest: Option<(u32, &str)> = None;
    let mut undone = vec![false; s.shape.len()];
    let mut compensating = false;
    for c in &s.calls {
        let i = step_index(s, &c.step)?;
        match c.phase {
            // A request sent before compensation began may land during it; whether it
            // landed before its own undo is `check_effects`' business.
            Phase::Action if c.late => {}
            Phase::Action if compensating => {
                return Err(format!(
                    "saga {}: step `{}` ran forward after compensation began",
                    s.id, c.step
                ))
            }
            Phase::Action => {}
            Phase::Compensation => {
                compensating = true;
                if s.shape[i].kind != StepKind::Compensatable {
                    return Err(format!(
                        "saga {}: step `{}` ({:?}) was compensated",
                        s.id, c.step, s.shape[i].kind
                    ));
                }
                if !started
                    .iter()
                    .any(|(st, p, _)| *st == i as u32 && *p == Phase::Action)
                {
                    return Err(format!(
                        "saga {}: step `{}` was compensated but never started",
                        s.id, c.step
                    ));
                }
                if !effect.get(i).copied().unwrap_or(true) {
                    return Err(format!(
                        "saga {}: step `{}` was compensated but every attempt of it was rejected",
                        s.id, c.step
                    ));
                }
                let stage = s.stage(i);
                if let Some((low, other)) = lowest.filter(|(low, _)| stage > *low) {
                    return Err(format!(
                        "saga {}: step `{}` (stage {stage}) was compensated after step `{other}` \
                         of an earlier stage ({low}) was",
                        s.id, c.step
                    ));
                }
                if let Some(j) =
                    (0..s.shape.len()).find(|&j| s.stage(j) > stage && owed[j] && !undone[j])
                {
                    return Err(format!(
                        "saga {}: step `{}` (stage {stage}) was compensated before the undo of \
                         step `{}` of a later stage ({}) had taken effect",
                        s.id,
                        c.step,
                        s.shape[j].name,
                        s.stage(j)
                    ));
                }
                if c.applied {
                    undone[i] = true;
                }
                if lowest.is_none_or(|(low, _)| stage < low) {
                    lowest = Some((stage, &c.step));
                }
            }
        }
    }
    Ok(())
}

/// G5, as the log says it: no compensation attempt of a step starts before every step
/// of a later stage that was owed a compensation has its compensation's success in the
/// log. Branches of one stage may be compensated concurrently (their attempts overlap in
/// the log); stages may not.
pub fn check_compensation_stages(s: &ObservedSaga) -> Result<(), String> {
    let owed = owed(s)?;
    let mut succeeded = vec![false; s.shape.len()];
    let name = |i: usize| s.shape.get(i).map_or("?", |st| st.name.as_str());
    for r in &s.history {
        match r.event {
            Event::CompensationSucceeded { step, .. } => {
                if let Some(done) = succeeded.get_mut(step as usize) {
                    *done = true;
                }
            }
            Event::CompensationAttemptStarted { step, attempt, .. } => {
                let i = step as usize;
                let stage = s.stage(i);
                if let Some(j) =
                    (0..s.shape.len()).find(|&j| s.stage(j) > stage && owed[j] && !succeeded[j])
                {
                    return Err(format!(
                        "saga {}: the compensation of step `{}` (stage {stage}) started \
                         (attempt {attempt}, lsn {}) while step `{}` of a later stage ({}) \
                         was owed a compensation that had not succeeded",
                        s.id,
                        name(i),
                        r.lsn,
                        name(j),
                        s.stage(j)
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// G3, G5 at the end: a completed saga took every effect and undid none; a compensated
/// one undid every compensatable step that may have taken effect, each under its one
/// key, and keeps no effect: every action that reached a service was followed there by
/// its undo (an action landing after its undo, a request still on the wire when the
/// engine compensated, is exactly what the settle window prevents).
pub fn check_effects(s: &ObservedSaga) -> Result<(), String> {
    let applied = |name: &str, phase: Phase| {
        s.calls
            .iter()
            .any(|c| c.step == name && c.phase == phase && c.applied)
    };
    match s.status {
        Some(SagaStatus::Completed) => {
            for st in &s.shape {
                if !applied(&st.name, Phase::Action) {
                    return Err(format!(
                        "saga {} completed but step `{}` never took effect",
                        s.id, st.name
                    ));
                }
            }
            if let Some(c) = s.calls.iter().find(|c| c.phase == Phase::Compensation) {
                return Err(format!(
                    "saga {} completed but step `{}` was compensated",
                    s.id, c.step
                ));
            }
        }
        Some(SagaStatus::Compensated | SagaStatus::Cancelled) => {
            let effect = may_have_taken_effect(s)?;
            for (i, st) in s.shape.iter().enumerate() {
                if st.kind != StepKind::Compensatable {
                    // A step that cannot be undone took effect: the saga had to go
                    // forward (or park), never compensate.
                    if applied(&st.name, Phase::Action) {
                        return Err(format!(
                            "saga {} is compensated but keeps the effect of step `{}` ({:?})",
                            s.id, st.name, st.kind
                        ));
                    }
                    continue;
                }
                let took_effect = applied(&st.name, Phase::Action);
                let must_undo = effect.get(i).copied().unwrap_or(false) || took_effect;
                if must_undo && !applied(&st.name, Phase::Compensation) {
                    return Err(format!(
                        "saga {} is compensated but step `{}` was not undone",
                        s.id, st.name
                    ));
                }
                let last_effect = s
                    .calls
                    .iter()
                    .rposition(|c| c.step == st.name && c.phase == Phase::Action && c.applied);
                let last_undo = s.calls.iter().rposition(|c| {
                    c.step == st.name && c.phase == Phase::Compensation && c.applied
                });
                if let Some(e) = last_effect {
                    if last_undo.is_none_or(|u| u < e) {
                        return Err(format!(
                            "saga {} is compensated but keeps the effect of step `{}`: it landed \
                             after its undo",
                            s.id, st.name
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Every per-saga check.
pub fn check_saga(s: &ObservedSaga) -> Result<(), String> {
    check_final(s)?;
    check_keys_and_write_ahead(s)?;
    check_not_idempotent_once(s)?;
    check_compensation_order(s)?;
    check_compensation_stages(s)?;
    check_effects(s)
}

/// G6: each start key names exactly one saga.
pub fn check_start_keys(keys: &BTreeMap<String, Vec<SagaId>>) -> Result<(), String> {
    for (k, ids) in keys {
        if ids.len() != 1 {
            return Err(format!(
                "start key `{k}` names {} sagas: {ids:?}",
                ids.len()
            ));
        }
    }
    Ok(())
}
