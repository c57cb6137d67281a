//! The invariants every run must satisfy, checked against the log and the ledger.
//!
//! Each checker returns the first violation it finds as a sentence. The tests in
//! `tests/tests/checkers.rs` feed each one a hand-broken history, so none can pass
//! vacuously.

use std::collections::{BTreeMap, BTreeSet};

use sagaflow::machine::{Event, LogRecord, SagaState};
use sagaflow::store::Delivery;
use sagaflow::{
    FailureKind, Idempotence, IdempotencyKey, OnTimeout, Phase, SagaId, SagaStatus, StepKind,
    Timestamp,
};

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
    /// The saga's await step, if its definition has one, and what happened to its
    /// events.
    pub events: Option<AwaitObservation>,
}

/// A delivery the simulated sender was told was accepted (`deliver` returned `Ok`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acked {
    /// Correlation key.
    pub key: String,
    /// Delivery id.
    pub id: String,
    /// When the answer came (virtual time).
    pub at: Timestamp,
}

/// What is known about one saga's await step and its events after a run (G10).
#[derive(Clone, Debug)]
pub struct AwaitObservation {
    /// The await step's index.
    pub step: u32,
    /// The key it waits on (derived from the saga's input).
    pub key: String,
    /// What its timeout means.
    pub on_timeout: OnTimeout,
    /// Every delivery the sender was told was accepted, for any key.
    pub acknowledged: Vec<Acked>,
    /// Every delivery in the store's inbox after the run, for any key.
    pub inbox: Vec<Delivery>,
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
            events: None,
        })
    }

    /// The same saga, of a definition whose steps have these `stages`
    /// ([`sagaflow::SagaDefinition::step_stages`]).
    #[must_use]
    pub fn with_stages(mut self, stages: Vec<u32>) -> Self {
        self.stages = stages;
        self
    }

    /// The same saga, whose definition has an await step observed so.
    #[must_use]
    pub fn with_events(mut self, events: AwaitObservation) -> Self {
        self.events = Some(events);
        self
    }

    /// Whether step `i` is an await step (it calls no service forward).
    fn awaits(&self, i: usize) -> bool {
        self.events.as_ref().is_some_and(|e| e.step as usize == i)
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
            for (i, st) in s.shape.iter().enumerate() {
                // An await step's effect is its event: `check_events` holds it to that.
                if !s.awaits(i) && !applied(&st.name, Phase::Action) {
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
    check_effects(s)?;
    check_events(s)
}

/// G10 and G7 for a saga with an await step:
///
/// - every acknowledged delivery is in the inbox (never lost);
/// - the await step took at most one delivery, recorded once (`event_received`, for the
///   attempt that succeeded, right before its success); it succeeded only with one, and
///   that one was acknowledged to its sender, is addressed to its key, reached the inbox
///   no later than the wait's deadline, and is marked taken by this saga and no other;
///   no other delivery of its key is taken (an event delivered twice is taken once);
/// - every attempt of the wait kept the deadline of the first (across restarts);
/// - a wait that failed did so at its deadline (not before, and within a second of it
///   under virtual time) and as its definition says (rejected, or timeout for
///   `OnTimeout::Unknown`), or earlier and rejected if it was given up (its saga was
///   cancelled or a sibling of its group failed first), and the saga did not complete;
/// - a saga that waited and ended (not parked) with an acknowledged delivery for its key
///   received before the deadline (or before the wait was given up) took one; one that
///   ended without such a delivery failed the wait.
///
/// Sagas without an await step pass.
pub fn check_events(s: &ObservedSaga) -> Result<(), String> {
    let Some(ev) = &s.events else {
        return Ok(());
    };
    let id = s.id;
    let name = s
        .shape
        .get(ev.step as usize)
        .map_or("?", |st| st.name.as_str());
    let stored = |key: &str, did: &str| ev.inbox.iter().find(|d| d.key == key && d.id == did);
    for a in &ev.acknowledged {
        if stored(&a.key, &a.id).is_none() {
            return Err(format!(
                "G10: delivery `{}` for `{}` was acknowledged at {} but is not in the inbox",
                a.id, a.key, a.at
            ));
        }
    }
    for d in &ev.inbox {
        match d.taken_by {
            Some(by) if d.key == ev.key && by != id => {
                return Err(format!(
                    "G10: delivery `{}` for `{}` (saga {id}'s key) was taken by saga {by}",
                    d.id, d.key
                ))
            }
            Some(by) if d.key != ev.key && by == id => {
                return Err(format!(
                    "G10: saga {id} took delivery `{}` for `{}`, a key it never waited on",
                    d.id, d.key
                ))
            }
            _ => {}
        }
    }
    let mut deadline: Option<Timestamp> = None;
    let mut received: Vec<(usize, u32, &str)> = Vec::new();
    let mut succeeded: Option<(usize, u32)> = None;
    // (when, kind, whether the wait could have been given up by then: the saga was
    // cancelled or compensating, or a sibling of its stage failed).
    let mut failed: Vec<(Timestamp, FailureKind, bool)> = Vec::new();
    let mut awaited = false;
    let mut withdrawable = false;
    let stage = s.stage(ev.step as usize);
    // A crash's recovery closes the interrupted branches of a failed stage together, in
    // step order: a sibling failing at the same moment counts.
    let sibling_failed_by = |t: Timestamp| {
        s.history.iter().any(|r| {
            matches!(&r.event, Event::StepFailed { step, .. }
                if *step != ev.step && s.stage(*step as usize) == stage && r.at <= t)
        })
    };
    for (pos, r) in s.history.iter().enumerate() {
        match &r.event {
            Event::CancelRequested { .. } | Event::CompensationBegan { .. } => withdrawable = true,
            Event::StepFailed { step, .. }
                if *step != ev.step && s.stage(*step as usize) == stage =>
            {
                withdrawable = true;
            }
            Event::StepAttemptStarted {
                step, deadline: d, ..
            } if *step == ev.step => match deadline {
                None => deadline = Some(*d),
                Some(first) if first != *d => {
                    return Err(format!(
                        "G7: saga {id}: the wait of step `{name}` began with deadline {first} \
                         but a later attempt waits until {d}"
                    ))
                }
                Some(_) => {}
            },
            Event::Awaiting { step, key, .. } if *step == ev.step => {
                if *key != ev.key {
                    return Err(format!(
                        "saga {id}: step `{name}` waits on `{key}`, not on `{}`",
                        ev.key
                    ));
                }
                awaited = true;
            }
            Event::Awaiting { step, .. } => {
                return Err(format!(
                    "saga {id}: step {step} waits for an event but is not an await step"
                ))
            }
            Event::EventReceived {
                step,
                attempt,
                delivery,
            } => {
                if *step != ev.step {
                    return Err(format!(
                        "saga {id}: step {step} took delivery `{delivery}` but is not an await step"
                    ));
                }
                received.push((pos, attempt.0, delivery));
            }
            Event::StepSucceeded { step, attempt, .. } if *step == ev.step => {
                succeeded = Some((pos, attempt.0));
            }
            Event::StepFailed { step, kind, .. } if *step == ev.step => {
                failed.push((r.at, *kind, withdrawable || sibling_failed_by(r.at)));
            }
            _ => {}
        }
    }
    if received.len() > 1 {
        return Err(format!(
            "G10: saga {id}: step `{name}` took {} deliveries ({:?}): an event is taken once",
            received.len(),
            received.iter().map(|r| r.2).collect::<Vec<_>>()
        ));
    }
    let taken_here: Vec<&Delivery> = ev
        .inbox
        .iter()
        .filter(|d| d.key == ev.key && d.taken_by == Some(id))
        .collect();
    if taken_here.len() > 1 {
        return Err(format!(
            "G10: saga {id}: {} deliveries for `{}` are marked taken by it: an event is taken once",
            taken_here.len(),
            ev.key
        ));
    }
    match (succeeded, received.first()) {
        (Some((pos, attempt)), Some(&(rpos, rattempt, did))) => {
            if rattempt != attempt || rpos > pos {
                return Err(format!(
                    "saga {id}: step `{name}` succeeded at attempt {attempt} but took its event \
                     at attempt {rattempt}"
                ));
            }
            if !ev
                .acknowledged
                .iter()
                .any(|a| a.key == ev.key && a.id == did)
            {
                return Err(format!(
                    "G10: saga {id}: step `{name}` completed with delivery `{did}`, which no \
                     sender was told was accepted"
                ));
            }
            let Some(d) = stored(&ev.key, did) else {
                return Err(format!(
                    "G10: saga {id}: step `{name}` took delivery `{did}`, which is not in the inbox"
                ));
            };
            if d.taken_by != Some(id) {
                return Err(format!(
                    "G10: saga {id} took delivery `{did}` but the inbox says it was taken by {:?}",
                    d.taken_by
                ));
            }
            if let Some(dl) = deadline.filter(|dl| d.received_at > *dl) {
                return Err(format!(
                    "G7: saga {id}: step `{name}` took delivery `{did}`, received at {}, after \
                     its deadline {dl}",
                    d.received_at
                ));
            }
        }
        (Some(_), None) => {
            return Err(format!(
                "G10: saga {id}: await step `{name}` succeeded without taking a delivery"
            ))
        }
        (None, Some(&(_, _, did))) => {
            return Err(format!(
                "G10: saga {id}: step `{name}` took delivery `{did}` but did not succeed"
            ))
        }
        (None, None) => {
            if let Some(d) = taken_here.first() {
                return Err(format!(
                    "G10: the inbox marks delivery `{}` taken by saga {id}, whose log never took it",
                    d.id
                ));
            }
        }
    }
    let want = match ev.on_timeout {
        OnTimeout::Unknown => FailureKind::Timeout,
        _ => FailureKind::Rejected,
    };
    for &(at, kind, withdrawable) in &failed {
        let Some(dl) = deadline else {
            return Err(format!("saga {id}: step `{name}` failed but never started"));
        };
        // A wait given up (its saga cancelled, a sibling failed) ends at once, rejected;
        // one a crash interrupted then is closed as interrupted.
        if at < dl
            && withdrawable
            && matches!(kind, FailureKind::Rejected | FailureKind::Interrupted)
        {
            continue;
        }
        if at < dl {
            return Err(format!(
                "G7: saga {id}: the wait of step `{name}` failed at {at}, before its deadline {dl}"
            ));
        }
        if at.duration_since(dl) > std::time::Duration::from_secs(1) {
            return Err(format!(
                "G7: saga {id}: the wait of step `{name}` failed at {at}, long after its \
                 deadline {dl}"
            ));
        }
        if kind != want {
            return Err(format!(
                "saga {id}: the wait of step `{name}` timed out as {kind:?}, but its definition \
                 says {want:?}"
            ));
        }
        if s.status == Some(SagaStatus::Completed) {
            return Err(format!(
                "saga {id} completed although its wait `{name}` failed"
            ));
        }
    }
    let ended = s.status.is_some_and(SagaStatus::is_final);
    if let (true, true, Some(dl)) = (awaited, ended, deadline) {
        // Until the deadline, or until the wait was given up.
        let dl = failed.first().map_or(dl, |f| f.0.min(dl));
        let in_time = ev
            .acknowledged
            .iter()
            .filter(|a| a.key == ev.key)
            .filter_map(|a| stored(&a.key, &a.id))
            .find(|d| d.received_at < dl);
        match (in_time, succeeded) {
            (Some(d), None) => {
                return Err(format!(
                    "G10: saga {id}: delivery `{}` for `{}` came at {}, before the end {dl} of \
                     its wait, but was never taken",
                    d.id, d.key, d.received_at
                ))
            }
            (None, None) if failed.is_empty() => {
                return Err(format!(
                    "saga {id}: no event came for step `{name}` by its deadline {dl}, and the \
                     wait never failed"
                ))
            }
            _ => {}
        }
    }
    Ok(())
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
