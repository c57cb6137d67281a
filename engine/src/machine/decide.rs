//! What happens next: a pure function of (definition, state, attempts in flight, now).
//!
//! `decide` returns every action due now, not one: the branches of a parallel group
//! start together, several interrupted attempts are closed each by its own rule, and the
//! compensations of one stage run concurrently. The driver carries them out, then asks
//! again whenever something changed (an attempt ended, a timer fired, a repair came).

use std::collections::BTreeSet;

use crate::clock::Timestamp;
use crate::definition::{Idempotence, SagaDefinition, StepKind};
use crate::ids::Attempt;
use crate::machine::event::{FailureKind, ParkKind, ParkReason};
use crate::machine::state::{Progress, SagaState, SagaStatus};

/// One thing to do for a saga. [`decide`] returns a list of them.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Decision {
    /// Record `step_attempt_started`, sync, then run the action.
    RunStep {
        /// Step index.
        step: u32,
        /// Attempt number.
        attempt: Attempt,
    },
    /// A crash interrupted an attempt that must not be re-run: record it as failed with
    /// kind `interrupted` (it may have taken effect).
    CloseInterrupted {
        /// Step index.
        step: u32,
        /// The interrupted attempt.
        attempt: Attempt,
    },
    /// Stop the wait of await step `step` (in flight here): its stage failed or the saga
    /// is cancelled, and a wait has no request in flight to settle. The attempt ends
    /// `rejected` (no event, no effect).
    Withdraw {
        /// Step index.
        step: u32,
    },
    /// Record `compensation_began`.
    BeginCompensation {
        /// Why.
        reason: String,
    },
    /// Record `compensation_attempt_started`, sync, then run the compensation.
    Compensate {
        /// Step index.
        step: u32,
        /// Attempt number.
        attempt: Attempt,
    },
    /// Nothing more is due before `until` (a durable retry timer, the end of a settle
    /// window), unless an attempt in flight ends first. Always last in the list.
    Wait {
        /// When the next attempt is due.
        until: Timestamp,
    },
    /// Record `completed`.
    Complete,
    /// Record `compensated`.
    FinishCompensation,
    /// Record `cancel_requested`: the saga's deadline passed before its pivot.
    Cancel {
        /// Who (`deadline`).
        operator: String,
        /// Why.
        reason: String,
    },
    /// Record `cancelled`: a cancelled saga finished compensating.
    FinishCancellation,
    /// Record `parked`.
    Park {
        /// Why.
        reason: ParkReason,
    },
    /// Nothing to do: the saga ended or waits for an operator.
    Idle,
}

/// Why `def` cannot drive `state`, if it cannot: under the same name and version, its
/// steps must have the names and (where the log recorded them) the kinds the saga was
/// started with. A renamed, added, removed or re-kinded step (compensatable turned pivot,
/// say) would make the engine misread the log (G8).
pub fn definition_mismatch(def: &SagaDefinition, state: &SagaState) -> Option<ParkReason> {
    let names_differ = def.len() != state.steps.len()
        || def.step_names().zip(&state.steps).any(|(d, s)| d != s.name)
        || def.step_stages().ne(state.stages.iter().copied());
    let kinds_differ =
        state.kinds_recorded && def.step_kinds().zip(&state.kinds).any(|(d, s)| d != *s);
    if !names_differ && !kinds_differ {
        return None;
    }
    let describe = |names: Vec<&str>, kinds: Vec<StepKind>| {
        names
            .iter()
            .zip(kinds)
            .map(|(n, k)| format!("{n} ({k})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Some(ParkReason::new(
        ParkKind::DefinitionMismatch,
        format!(
            "definition `{}` version {} has steps [{}], the saga was started with [{}]",
            def.name(),
            def.version(),
            describe(def.step_names().collect(), def.step_kinds().collect()),
            describe(
                state.steps.iter().map(|s| s.name.as_str()).collect(),
                state.kinds.clone()
            ),
        ),
    ))
}

/// Steps with an attempt (of the action or the compensation) running in this process
/// now. An attempt the log shows in flight that is not among them was interrupted by a
/// crash (or by the loss of the saga's lease).
pub type Live = BTreeSet<u32>;

/// Decides what happens next for `state`, run by `def`, at `now`, while the attempts of
/// the steps in `live` run: every action due now, in step order, then at most one
/// [`Decision::Wait`] for the earliest timer. An empty list means nothing happens until
/// an attempt in flight ends. Saga-wide transitions (complete, begin compensation, park,
/// finish) come alone, and only once nothing is in flight, so that every sibling of a
/// failed branch settles first (G5).
///
/// Replaying the same log with the same definition and nothing in flight gives the same
/// decisions (G4); `now` only matters for whether a timer is due.
pub fn decide(
    def: &SagaDefinition,
    state: &SagaState,
    live: &Live,
    now: Timestamp,
) -> Vec<Decision> {
    if !state.status.is_active() {
        return vec![Decision::Idle];
    }
    if let Some(reason) = definition_mismatch(def, state) {
        return if live.is_empty() {
            vec![Decision::Park { reason }]
        } else {
            Vec::new()
        };
    }
    match state.status {
        SagaStatus::Running => decide_running(def, state, live, now),
        _ => {
            let mut out = decide_backward(def, state, live, now);
            if state.cancellation.is_some() {
                for d in &mut out {
                    if *d == Decision::FinishCompensation {
                        *d = Decision::FinishCancellation;
                    }
                }
            }
            out
        }
    }
}

/// The actions due now and the earliest timer, gathered step by step.
#[derive(Default)]
struct Plan {
    due: Vec<Decision>,
    wait: Option<Timestamp>,
}

impl Plan {
    fn wait_until(&mut self, t: Timestamp) {
        self.wait = Some(self.wait.map_or(t, |w| w.min(t)));
    }

    fn into_vec(mut self) -> Vec<Decision> {
        if let Some(until) = self.wait {
            self.due.push(Decision::Wait { until });
        }
        self.due
    }
}

/// `decision` alone once nothing is in flight; nothing (wait for the attempts) before.
fn when_settled(live: &Live, decision: Decision) -> Vec<Decision> {
    if live.is_empty() {
        vec![decision]
    } else {
        Vec::new()
    }
}

/// Going forward: a cancellation asked for, a deadline passed, a delayed start, or the
/// current stage.
fn decide_running(
    def: &SagaDefinition,
    state: &SagaState,
    live: &Live,
    now: Timestamp,
) -> Vec<Decision> {
    if let Some((who, why)) = &state.cancellation {
        return decide_cancelling(def, state, live, now, who, why);
    }
    if let Some(deadline) = state.deadline.filter(|d| now >= *d) {
        return match crate::machine::check_cancel(state) {
            Ok(()) => vec![Decision::Cancel {
                operator: "deadline".into(),
                reason: format!("the saga's deadline {deadline} passed"),
            }],
            // Past the pivot: parked, but not before every attempt of the current stage
            // that may still land has ended or reached its deadline.
            Err(_) => {
                if !live.is_empty() {
                    return Vec::new();
                }
                let settle = state
                    .current_stage()
                    .and_then(|r| r.filter_map(|i| state.steps[i].undo_not_before()).max())
                    .filter(|t| now < *t);
                match settle {
                    Some(until) => vec![Decision::Wait { until }],
                    None => vec![Decision::Park {
                        reason: ParkReason::new(
                            ParkKind::DeadlinePassed,
                            format!(
                                "the saga's deadline {deadline} passed after its pivot had \
                                 started: it can only go forward; resume it, or resolve it by hand"
                            ),
                        ),
                    }],
                }
            }
        };
    }
    let nothing_started = state.steps.iter().all(|s| !s.action.started());
    let mut out = match state.not_before.filter(|t| now < *t && nothing_started) {
        Some(until) => vec![Decision::Wait { until }],
        None => decide_forward(def, state, live, now),
    };
    // A wait never sleeps through the deadline: it fires while the saga waits, while
    // attempts are in flight, and after a restart (recovery decides again).
    if let Some(d) = state.deadline {
        if let Some(Decision::Wait { until }) = out.last_mut() {
            *until = (*until).min(d);
        } else if out.iter().all(is_attempt) {
            out.push(Decision::Wait { until: d });
        }
    }
    out
}

/// Whether `d` acts on one attempt (rather than on the whole saga).
fn is_attempt(d: &Decision) -> bool {
    matches!(
        d,
        Decision::RunStep { .. }
            | Decision::Compensate { .. }
            | Decision::CloseInterrupted { .. }
            | Decision::Withdraw { .. }
    )
}

/// A cancelled saga going forward: no new attempt; attempts a crash interrupted are
/// closed (their outcome is unknown); once the attempts in flight have ended and every
/// attempt of the current stage that may still land has reached its deadline,
/// compensation begins.
fn decide_cancelling(
    def: &SagaDefinition,
    state: &SagaState,
    live: &Live,
    now: Timestamp,
    who: &str,
    why: &str,
) -> Vec<Decision> {
    let begin = Decision::BeginCompensation {
        reason: format!("cancelled by {who}: {why}"),
    };
    let Some(stage) = state.current_stage() else {
        return when_settled(live, begin);
    };
    let closes: Vec<Decision> = stage
        .clone()
        .filter_map(|i| match state.steps[i].action {
            Progress::InFlight { attempt } if !live.contains(&(i as u32)) => {
                Some(Decision::CloseInterrupted {
                    step: i as u32,
                    attempt,
                })
            }
            _ => None,
        })
        .collect();
    if !closes.is_empty() {
        return closes;
    }
    if !live.is_empty() {
        return withdrawals(def, state, live);
    }
    match stage
        .filter_map(|i| state.steps[i].unknown_until)
        .max()
        .filter(|t| now < *t)
    {
        Some(until) => vec![Decision::Wait { until }],
        None => vec![begin],
    }
}

/// The current stage going forward: every branch that can start starts; a branch that
/// failed for good stops new attempts of its siblings, and once they have settled the
/// saga compensates (or, past the pivot, parks).
fn decide_forward(
    def: &SagaDefinition,
    state: &SagaState,
    live: &Live,
    now: Timestamp,
) -> Vec<Decision> {
    let Some(stage) = state.current_stage() else {
        return when_settled(live, Decision::Complete);
    };
    // The stage has failed if a branch failed for good, or will have once an
    // interrupted branch that must not run twice is closed: then nothing new starts.
    let failed = state.stage_failed()
        || stage.clone().any(|i| {
            matches!(state.steps[i].action, Progress::InFlight { .. })
                && !live.contains(&(i as u32))
                && def
                    .step(i)
                    .is_some_and(|sd| sd.options.idempotence == Idempotence::NotIdempotent)
        });
    let mut plan = Plan::default();
    let mut crash_looped: Option<(usize, u32)> = None;
    for i in stage.clone() {
        let (Some(s), Some(sd)) = (state.steps.get(i), def.step(i)) else {
            continue;
        };
        let step = i as u32;
        match &s.action {
            Progress::Succeeded { .. } => {}
            Progress::InFlight { .. } if live.contains(&step) => {}
            Progress::NotStarted => {
                if !failed {
                    plan.due.push(Decision::RunStep {
                        step,
                        attempt: Attempt::FIRST,
                    });
                }
            }
            Progress::InFlight { attempt } => {
                // Interrupted by a crash. A crash is not a failed attempt (G4): an
                // idempotent step runs again with the same key, whatever its retry
                // budget, unless it keeps being interrupted (a step that kills the
                // process). One that must not run twice, or whose stage failed, is
                // closed: it may have taken effect.
                if failed || sd.options.idempotence == Idempotence::NotIdempotent {
                    plan.due.push(Decision::CloseInterrupted {
                        step,
                        attempt: *attempt,
                    });
                    continue;
                }
                let in_a_row = s.interrupted.in_a_row.saturating_add(1);
                if in_a_row >= sd.options.max_interruptions {
                    crash_looped.get_or_insert((i, in_a_row));
                    continue;
                }
                plan.due.push(Decision::RunStep {
                    step,
                    attempt: attempt.next(),
                });
            }
            Progress::Failed {
                attempt,
                retry_at: Some(at),
                ..
            } => {
                // A sibling failed for good: the retry is abandoned.
                if failed {
                } else if now >= *at {
                    plan.due.push(Decision::RunStep {
                        step,
                        attempt: attempt.next(),
                    });
                } else {
                    plan.wait_until(*at);
                }
            }
            Progress::Failed { retry_at: None, .. } => {}
        }
    }
    if let Some((i, times)) = crash_looped {
        // No new attempt of the stage; parked once nothing in flight and no interrupted
        // attempt can still land.
        let mut closes: Vec<Decision> = plan
            .due
            .into_iter()
            .filter(|d| matches!(d, Decision::CloseInterrupted { .. }))
            .collect();
        // An interrupted wait is not run again either. While the stage settles before
        // the park, its deadline still fires (G7): it is closed then, timed out as its
        // definition says. One still running when the stage has settled stays as it is
        // in the parked saga: the park is not held back for it (a wait may last days),
        // and a resume goes on with it, with the same deadline.
        let mut next_wait_end: Option<Timestamp> = None;
        for j in stage.clone() {
            let s = &state.steps[j];
            let Progress::InFlight { attempt } = s.action else {
                continue;
            };
            // Not closed already: a crash-looped stage has not failed, so no interrupted
            // branch of it was closed above.
            if !s.waiting() || live.contains(&(j as u32)) {
                continue;
            }
            match s.deadline {
                Some(d) if now >= d => closes.push(Decision::CloseInterrupted {
                    step: j as u32,
                    attempt,
                }),
                Some(d) => next_wait_end = Some(next_wait_end.map_or(d, |n| n.min(d))),
                None => {}
            }
        }
        if !closes.is_empty() || !live.is_empty() {
            closes.extend(next_wait_end.map(|until| Decision::Wait { until }));
            return closes;
        }
        if let Some(settled) = stage
            .filter_map(|j| state.steps[j].undo_not_before())
            .max()
            .filter(|t| now < *t)
        {
            let until = next_wait_end.map_or(settled, |w| w.min(settled));
            return vec![Decision::Wait { until }];
        }
        return vec![Decision::Park {
            reason: crash_loop(&state.steps[i].name, "attempt", times),
        }];
    }
    if !failed {
        return plan.into_vec();
    }
    // A branch failed for good. Interrupted siblings are closed first, then the
    // siblings in flight settle: their results are recorded, and what they did is
    // compensated with the rest.
    if !plan.due.is_empty() || !live.is_empty() {
        plan.due.extend(withdrawals(def, state, live));
        return plan.due;
    }
    // Settle before undo (G4): a request an attempt sent may land until its deadline;
    // nothing is compensated or parked before then.
    if let Some(until) = state.settling_until().filter(|t| now < *t) {
        return vec![Decision::Wait { until }];
    }
    vec![stage_failure(def, state, stage)]
}

/// The waits of the await steps in flight, given up: nothing they wait for matters any
/// more.
fn withdrawals(def: &SagaDefinition, state: &SagaState, live: &Live) -> Vec<Decision> {
    live.iter()
        .filter(|&&step| {
            let i = step as usize;
            def.is_await(i)
                && state
                    .steps
                    .get(i)
                    .is_some_and(|s| matches!(s.action, Progress::InFlight { .. }))
        })
        .map(|&step| Decision::Withdraw { step })
        .collect()
}

/// What a stage that cannot succeed leads to: compensation before the pivot; past it
/// (or for the pivot itself), a parked saga.
fn stage_failure(
    def: &SagaDefinition,
    state: &SagaState,
    stage: std::ops::Range<usize>,
) -> Decision {
    // What failed comes first; branches closed because of it (interrupted) after.
    let mut reasons = Vec::new();
    let mut closed = Vec::new();
    let mut park: Option<ParkKind> = None;
    for i in stage {
        let (Some(s), Some(sd)) = (state.steps.get(i), def.step(i)) else {
            continue;
        };
        let Progress::Failed {
            attempt,
            kind,
            error,
            retry_at: None,
        } = &s.action
        else {
            continue;
        };
        let what = describe_failure(&s.name, *kind, *attempt, error);
        // Unknown if the last attempt's outcome is. An earlier attempt of unknown
        // outcome matters only for a step that is not idempotent: an idempotent one's
        // attempts share a key, so the service's last answer for that key (here a
        // refusal) is its answer for all of them.
        let unknown = kind.outcome_unknown()
            || (sd.options.idempotence == Idempotence::NotIdempotent && s.outcome_unknown());
        let closed_after = *kind == FailureKind::Interrupted;
        let kind = match sd.kind {
            StepKind::Pivot | StepKind::Retriable if unknown => Some(ParkKind::OutcomeUnknown),
            StepKind::Retriable => Some(ParkKind::ForwardFailed),
            _ => None,
        };
        let what = match (kind, sd.kind) {
            (Some(ParkKind::OutcomeUnknown), k) => format!(
                "{what}; it is {k} and cannot be compensated: check whether it took effect, \
                 then resolve the saga"
            ),
            (Some(_), _) => format!("{what}; past the pivot the saga can only go forward"),
            (None, _) => what,
        };
        // The gravest reason decides: an unknown outcome outranks a known failure.
        park = match (park, kind) {
            (Some(ParkKind::OutcomeUnknown), _) | (_, Some(ParkKind::OutcomeUnknown)) => {
                Some(ParkKind::OutcomeUnknown)
            }
            (p, k) => p.or(k),
        };
        if closed_after {
            closed.push(what);
        } else {
            reasons.push(what);
        }
    }
    reasons.append(&mut closed);
    let reason = reasons.join("; ");
    match park {
        Some(kind) => Decision::Park {
            reason: ParkReason::new(kind, reason),
        },
        None => Decision::BeginCompensation { reason },
    }
}

/// A sentence naming what happened to a step whose last attempt failed for good.
fn describe_failure(name: &str, kind: FailureKind, attempt: Attempt, error: &str) -> String {
    match kind {
        FailureKind::Rejected => {
            format!("step `{name}` was rejected at attempt {attempt} (no effect): {error}")
        }
        FailureKind::Permanent => {
            format!("step `{name}` failed permanently at attempt {attempt}: {error}")
        }
        FailureKind::Retryable | FailureKind::RetryAfter => format!(
            "step `{name}` failed at attempt {attempt} and has no attempt left, so it may have \
             taken effect: {error}"
        ),
        FailureKind::Interrupted => format!(
            "step `{name}`'s attempt {attempt} was interrupted by a crash and not run again \
             (the step is not idempotent, or a branch beside it had failed), so it may have \
             taken effect"
        ),
        FailureKind::Timeout => {
            format!("step `{name}` timed out at attempt {attempt}, so it may have taken effect: {error}")
        }
        _ => format!(
            "step `{name}` ended at attempt {attempt} without a known outcome, so it may have \
             taken effect: {error}"
        ),
    }
}

fn crash_loop(name: &str, what: &str, times: u32) -> ParkReason {
    ParkReason::new(
        ParkKind::CrashLoop,
        format!(
            "step `{name}`: {times} {what}s in a row were interrupted by a crash; it may be \
             what kills the process. Find out why, then resume (or resolve) the saga"
        ),
    )
}

/// Compensating: the steps of the last stage still owed a compensation are compensated
/// concurrently, each once no attempt of its action can still land; then the stage
/// before, in reverse order. A compensation that fails for good parks the saga once its
/// siblings in flight have ended; it never skips ahead (G5).
fn decide_backward(
    def: &SagaDefinition,
    state: &SagaState,
    live: &Live,
    now: Timestamp,
) -> Vec<Decision> {
    // Only compensatable steps that may have taken effect are undone (G5), judged by
    // the definition's kinds (the same as the log's, where it recorded them).
    // Waits still going on (compensation was forced while the saga waited for an
    // event) have nothing to settle: they are given up first.
    let withdraw = withdrawals(def, state, live);
    if !withdraw.is_empty() {
        return withdraw;
    }
    let stage = state.compensation_stage_by(|i| def.step_kind(i));
    if stage.is_empty() {
        return when_settled(live, Decision::FinishCompensation);
    }
    // Every branch of the stage settles before any of them is undone (G5): an action
    // still running (compensation was forced while its group was in flight), or an
    // attempt whose request may still land (interrupted, or of unknown outcome), holds
    // the whole stage, as the settle window before compensation begins does.
    let mut settle: Option<Timestamp> = None;
    for &i in &stage {
        let s = &state.steps[i];
        let running = matches!(s.action, Progress::InFlight { .. })
            && !matches!(s.compensation, Progress::InFlight { .. })
            && live.contains(&(i as u32));
        if running {
            return Vec::new();
        }
        let undoing = !matches!(s.compensation, Progress::NotStarted);
        if let Some(t) = s.undo_not_before().filter(|t| now < *t && !undoing) {
            settle = Some(settle.map_or(t, |w| w.max(t)));
        }
    }
    if let Some(until) = settle {
        return vec![Decision::Wait { until }];
    }
    let mut plan = Plan::default();
    let mut park: Option<ParkReason> = None;
    for i in stage {
        let (Some(s), Some(sd)) = (state.steps.get(i), def.step(i)) else {
            continue;
        };
        let step = i as u32;
        // A branch still running (compensation was forced while its group was in
        // flight) settles before it is undone.
        if live.contains(&step) {
            continue;
        }
        match &s.compensation {
            Progress::Succeeded { .. } => {}
            Progress::NotStarted => {
                // An earlier attempt of unknown outcome (or one still in flight, when
                // compensation was forced) may still land, even if a later one
                // succeeded: its undo waits for that attempt's deadline (G4).
                match s.undo_not_before().filter(|t| now < *t) {
                    Some(until) => plan.wait_until(until),
                    None => plan.due.push(Decision::Compensate {
                        step,
                        attempt: Attempt::FIRST,
                    }),
                }
            }
            Progress::InFlight { attempt } => {
                // Compensations are idempotent by contract: re-run with the same key. An
                // interruption does not use up the budget; a crash loop parks.
                let in_a_row = s.compensation_interrupted.in_a_row.saturating_add(1);
                if in_a_row >= sd.options.max_interruptions {
                    park.get_or_insert_with(|| {
                        crash_loop(&s.name, "compensation attempt", in_a_row)
                    });
                } else {
                    plan.due.push(Decision::Compensate {
                        step,
                        attempt: attempt.next(),
                    });
                }
            }
            Progress::Failed {
                attempt,
                retry_at: Some(at),
                ..
            } => {
                if now >= *at {
                    plan.due.push(Decision::Compensate {
                        step,
                        attempt: attempt.next(),
                    });
                } else {
                    plan.wait_until(*at);
                }
            }
            Progress::Failed {
                attempt,
                error,
                retry_at: None,
                ..
            } => {
                park.get_or_insert_with(|| {
                    ParkReason::new(
                        ParkKind::CompensationFailed,
                        format!(
                            "compensation of step `{}` failed at attempt {attempt}: {error}",
                            s.name
                        ),
                    )
                });
            }
        }
    }
    match park {
        Some(reason) => when_settled(live, Decision::Park { reason }),
        None => plan.into_vec(),
    }
}
