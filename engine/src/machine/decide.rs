//! What happens next: a pure function of (definition, state, now).

use crate::clock::Timestamp;
use crate::definition::{Idempotence, SagaDefinition, StepKind};
use crate::ids::Attempt;
use crate::machine::event::{FailureKind, ParkKind, ParkReason};
use crate::machine::state::{Progress, SagaState, SagaStatus};

/// The next thing to do for a saga.
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
    /// Nothing is due before `until` (a durable retry timer).
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
        || def.step_names().zip(&state.steps).any(|(d, s)| d != s.name);
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

/// Decides what happens next for `state`, run by `def`, at `now`.
///
/// Called only between attempts: an attempt the state shows in flight was interrupted
/// by a crash. Replaying the same log with the same definition gives the same decisions
/// (G4); `now` only matters for whether a retry timer is due.
pub fn decide(def: &SagaDefinition, state: &SagaState, now: Timestamp) -> Decision {
    if !state.status.is_active() {
        return Decision::Idle;
    }
    if let Some(reason) = definition_mismatch(def, state) {
        return Decision::Park { reason };
    }
    match state.status {
        SagaStatus::Running => decide_running(def, state, now),
        _ => match decide_backward(def, state, now) {
            Decision::FinishCompensation if state.cancellation.is_some() => {
                Decision::FinishCancellation
            }
            other => other,
        },
    }
}

/// Going forward: a cancellation asked for, a deadline passed, a delayed start, or the
/// next step.
fn decide_running(def: &SagaDefinition, state: &SagaState, now: Timestamp) -> Decision {
    if let Some((who, why)) = &state.cancellation {
        return decide_cancelling(state, now, who, why);
    }
    if let Some(deadline) = state.deadline.filter(|d| now >= *d) {
        return match crate::machine::check_cancel(state) {
            Ok(()) => Decision::Cancel {
                operator: "deadline".into(),
                reason: format!("the saga's deadline {deadline} passed"),
            },
            // Past the pivot: parked, but not before an attempt of the current step that
            // may still land has reached its deadline.
            Err(_) => match state
                .current_step()
                .and_then(|i| state.steps[i].undo_not_before())
                .filter(|t| now < *t)
            {
                Some(until) => Decision::Wait { until },
                None => Decision::Park {
                    reason: ParkReason::new(
                        ParkKind::DeadlinePassed,
                        format!(
                        "the saga's deadline {deadline} passed after its pivot had started: it \
                         can only go forward; resume it, or resolve it by hand"
                    ),
                    ),
                },
            },
        };
    }
    let nothing_started = state.steps.iter().all(|s| !s.action.started());
    let decision = match state.not_before.filter(|t| now < *t && nothing_started) {
        Some(until) => Decision::Wait { until },
        None => decide_forward(def, state, now),
    };
    // A wait never sleeps through the deadline: it fires while the saga waits, and after
    // a restart (recovery decides again).
    match (decision, state.deadline) {
        (Decision::Wait { until }, Some(d)) if d < until => Decision::Wait { until: d },
        (other, _) => other,
    }
}

/// A cancelled saga going forward: no new attempt; the attempt a crash interrupted is
/// closed (its outcome is unknown); once every attempt of the current step that may
/// still land has reached its deadline, compensation begins.
fn decide_cancelling(state: &SagaState, now: Timestamp, who: &str, why: &str) -> Decision {
    if let Some(i) = state.current_step() {
        let s = &state.steps[i];
        if let Progress::InFlight { attempt } = s.action {
            return Decision::CloseInterrupted {
                step: i as u32,
                attempt,
            };
        }
        if let Some(until) = s.unknown_until.filter(|t| now < *t) {
            return Decision::Wait { until };
        }
    }
    Decision::BeginCompensation {
        reason: format!("cancelled by {who}: {why}"),
    }
}

fn decide_forward(def: &SagaDefinition, state: &SagaState, now: Timestamp) -> Decision {
    for (i, (s, sd)) in state.steps.iter().zip(def.steps()).enumerate() {
        let step = i as u32;
        match &s.action {
            Progress::Succeeded { .. } => continue,
            Progress::NotStarted => {
                return Decision::RunStep {
                    step,
                    attempt: Attempt::FIRST,
                }
            }
            Progress::InFlight { attempt } => {
                // Between attempts, an attempt in flight was interrupted by a crash. A
                // crash is not a failed attempt (G4): an idempotent step runs again with
                // the same key, whatever its retry budget, unless it keeps being
                // interrupted (a step that kills the process).
                if sd.options.idempotence == Idempotence::NotIdempotent {
                    return Decision::CloseInterrupted {
                        step,
                        attempt: *attempt,
                    };
                }
                let in_a_row = s.interrupted.in_a_row.saturating_add(1);
                if in_a_row >= sd.options.max_interruptions {
                    // Parked only once the interrupted attempt can no longer land.
                    if let Some(until) = s.undo_not_before().filter(|t| now < *t) {
                        return Decision::Wait { until };
                    }
                    return Decision::Park {
                        reason: crash_loop(&s.name, "attempt", in_a_row),
                    };
                }
                return Decision::RunStep {
                    step,
                    attempt: attempt.next(),
                };
            }
            Progress::Failed {
                attempt,
                retry_at: Some(at),
                ..
            } => {
                return if now >= *at {
                    Decision::RunStep {
                        step,
                        attempt: attempt.next(),
                    }
                } else {
                    Decision::Wait { until: *at }
                };
            }
            Progress::Failed {
                attempt,
                kind,
                error,
                retry_at: None,
            } => {
                // Settle before undo (G4): a request the attempt sent may land until its
                // deadline; nothing is compensated or parked before then.
                if let Some(until) = state.settling_until().filter(|t| now < *t) {
                    return Decision::Wait { until };
                }
                let what = describe_failure(&s.name, *kind, *attempt, error);
                // Unknown if the last attempt's outcome is. An earlier attempt of unknown
                // outcome matters only for a step that is not idempotent: an idempotent
                // one's attempts share a key, so the service's last answer for that key
                // (here a refusal) is its answer for all of them.
                let unknown = kind.outcome_unknown()
                    || (sd.options.idempotence == Idempotence::NotIdempotent
                        && s.outcome_unknown());
                return match sd.kind {
                    StepKind::Pivot | StepKind::Retriable if unknown => Decision::Park {
                        reason: ParkReason::new(
                            ParkKind::OutcomeUnknown,
                            format!(
                                "{what}; it is {} and cannot be compensated: check whether \
                                     it took effect, then resolve the saga",
                                sd.kind
                            ),
                        ),
                    },
                    StepKind::Retriable => Decision::Park {
                        reason: ParkReason::new(
                            ParkKind::ForwardFailed,
                            format!("{what}; past the pivot the saga can only go forward"),
                        ),
                    },
                    _ => Decision::BeginCompensation { reason: what },
                };
            }
        }
    }
    Decision::Complete
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
            "step `{name}` is not idempotent and its attempt {attempt} was interrupted by a \
             crash, so it may have taken effect"
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

fn decide_backward(def: &SagaDefinition, state: &SagaState, now: Timestamp) -> Decision {
    // Reverse order of start: steps run one after another, so that is reverse index order.
    for (i, (s, sd)) in state.steps.iter().zip(def.steps()).enumerate().rev() {
        // Only compensatable steps that may have taken effect are undone (G5): an action
        // that never started, or whose every attempt was rejected, did nothing.
        if sd.kind != StepKind::Compensatable || !s.may_have_taken_effect() {
            continue;
        }
        let step = i as u32;
        match &s.compensation {
            Progress::Succeeded { .. } => continue,
            Progress::NotStarted => {
                // An earlier attempt of unknown outcome (or one still in flight, when
                // compensation was forced) may still land, even if a later one
                // succeeded: its undo waits for that attempt's deadline (G4).
                if let Some(until) = s.undo_not_before().filter(|t| now < *t) {
                    return Decision::Wait { until };
                }
                return Decision::Compensate {
                    step,
                    attempt: Attempt::FIRST,
                };
            }
            Progress::InFlight { attempt } => {
                // Compensations are idempotent by contract: re-run with the same key. An
                // interruption does not use up the budget; a crash loop parks.
                let in_a_row = s.compensation_interrupted.in_a_row.saturating_add(1);
                if in_a_row >= sd.options.max_interruptions {
                    return Decision::Park {
                        reason: crash_loop(&s.name, "compensation attempt", in_a_row),
                    };
                }
                return Decision::Compensate {
                    step,
                    attempt: attempt.next(),
                };
            }
            Progress::Failed {
                attempt,
                retry_at: Some(at),
                ..
            } => {
                return if now >= *at {
                    Decision::Compensate {
                        step,
                        attempt: attempt.next(),
                    }
                } else {
                    Decision::Wait { until: *at }
                };
            }
            Progress::Failed {
                attempt,
                error,
                retry_at: None,
                ..
            } => {
                return Decision::Park {
                    reason: ParkReason::new(
                        ParkKind::CompensationFailed,
                        format!(
                            "compensation of step `{}` failed at attempt {attempt}: {error}",
                            s.name
                        ),
                    ),
                }
            }
        }
    }
    Decision::FinishCompensation
}
