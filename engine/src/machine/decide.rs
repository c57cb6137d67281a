//! What happens next: a pure function of (definition, state, now).

use crate::clock::Timestamp;
use crate::definition::{Idempotence, SagaDefinition, StepKind};
use crate::ids::Attempt;
use crate::machine::event::{ParkKind, ParkReason};
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
        SagaStatus::Running => decide_forward(def, state, now),
        _ => decide_backward(def, state, now),
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
                let rerun = sd.options.idempotence == Idempotence::Idempotent
                    && sd.options.retry.allows_another(attempt.0);
                return if rerun {
                    Decision::RunStep {
                        step,
                        attempt: attempt.next(),
                    }
                } else {
                    Decision::CloseInterrupted {
                        step,
                        attempt: *attempt,
                    }
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
                let unknown = kind.outcome_unknown();
                return match sd.kind {
                    StepKind::Pivot | StepKind::Retriable if unknown => Decision::Park {
                        reason: ParkReason::new(
                            ParkKind::OutcomeUnknown,
                            format!(
                                "step `{}` ({}) ended at attempt {attempt} without a known \
                                 outcome ({error}); it cannot be compensated: check whether it \
                                 took effect, then resolve the saga",
                                s.name, sd.kind
                            ),
                        ),
                    },
                    StepKind::Retriable => Decision::Park {
                        reason: ParkReason::new(
                            ParkKind::ForwardFailed,
                            format!(
                                "step `{}` after the pivot failed at attempt {attempt}: {error}",
                                s.name
                            ),
                        ),
                    },
                    _ => Decision::BeginCompensation {
                        reason: format!("step `{}` failed at attempt {attempt}: {error}", s.name),
                    },
                };
            }
        }
    }
    Decision::Complete
}

fn decide_backward(def: &SagaDefinition, state: &SagaState, now: Timestamp) -> Decision {
    // Reverse order of start: steps run one after another, so that is reverse index order.
    for (i, (s, sd)) in state.steps.iter().zip(def.steps()).enumerate().rev() {
        // Only compensatable steps whose action was ever started may have taken effect
        // that can be undone (G5). A failed pivot took no effect by definition.
        if sd.kind != StepKind::Compensatable || !s.action.started() {
            continue;
        }
        let step = i as u32;
        match &s.compensation {
            Progress::Succeeded { .. } => continue,
            Progress::NotStarted => {
                return Decision::Compensate {
                    step,
                    attempt: Attempt::FIRST,
                }
            }
            Progress::InFlight { attempt } => {
                // Compensations are idempotent by contract: re-run with the same key.
                return if sd.options.compensation_retry.allows_another(attempt.0) {
                    Decision::Compensate {
                        step,
                        attempt: attempt.next(),
                    }
                } else {
                    Decision::Park {
                        reason: ParkReason::new(
                            ParkKind::CompensationFailed,
                            format!(
                                "compensation of step `{}` was interrupted at its last allowed \
                                 attempt ({attempt})",
                                s.name
                            ),
                        ),
                    }
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
