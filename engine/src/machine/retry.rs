//! The retry rule: whether a failed attempt gets another, and when.
//!
//! A pure function of the definition, the state and the failure, like `decide`; the
//! jitter is drawn by the caller from the engine's injected entropy, so replaying a
//! log with the same seed gives the same timers (G7).

use std::time::Duration;

use crate::clock::Timestamp;
use crate::definition::{Idempotence, SagaDefinition};
use crate::ids::Phase;
use crate::machine::event::FailureKind;
use crate::machine::state::SagaState;

/// When the attempt after the one of `step` (in `phase`) that just failed with `kind`
/// is due, or `None` if no attempt follows: the call was rejected, or failed for good,
/// or may have taken effect and may not be repeated, or the policy's budget is spent.
///
/// `state` is the state before the failure is recorded (the attempt in flight);
/// `hint` is the failure's "retry after"; `jitter` a uniform 64-bit draw.
///
/// A rejected call will be rejected again; a call that may have taken effect is
/// repeated only with the same key, by a step that allows it (compensations always
/// do). Interrupted attempts do not use up the budget (G4).
#[allow(clippy::too_many_arguments)]
pub fn next_attempt_at(
    def: &SagaDefinition,
    state: &SagaState,
    step: u32,
    phase: Phase,
    kind: FailureKind,
    hint: Option<Duration>,
    now: Timestamp,
    jitter: u64,
) -> Option<Timestamp> {
    let i = step as usize;
    let sd = def.step(i)?;
    let may_retry = match kind {
        FailureKind::Rejected | FailureKind::Permanent | FailureKind::OutputTooLarge => false,
        FailureKind::Retryable | FailureKind::RetryAfter => true,
        _ => phase == Phase::Compensation || sd.options.idempotence == Idempotence::Idempotent,
    };
    if !may_retry {
        return None;
    }
    let s = state.steps.get(i)?;
    let (used, policy) = match phase {
        Phase::Action => (s.attempts_used(), &sd.options.retry),
        Phase::Compensation => (
            s.compensation_attempts_used(),
            &sd.options.compensation_retry,
        ),
    };
    policy.next_attempt_at(used, now, jitter, hint)
}
