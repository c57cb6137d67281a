//! The event log's vocabulary: every transition a saga can make.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::Timestamp;
use crate::definition::StepKind;
use crate::ids::{Attempt, Lsn, Phase, StartKey};
use crate::machine::drift::{DriftKind, Expected};

/// Why an attempt failed, as recorded in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// The step reported a transient failure.
    Retryable,
    /// The step reported a transient failure with a retry-after hint.
    RetryAfter,
    /// Written by engines before `rejected` and `unknown` existed: a failure the step
    /// called permanent. Read as before: no retry, and the step counts as possibly
    /// effective (compensated); a pivot that failed so took no effect.
    Permanent,
    /// The step reported that the service refused: no effect. Not compensated.
    Rejected,
    /// The step reported that the call may have taken effect.
    Unknown,
    /// The attempt ran past its timeout.
    Timeout,
    /// The step panicked.
    Panic,
    /// The step's output was larger (or deeper) than the engine accepts.
    OutputTooLarge,
    /// A crash interrupted the attempt and the step is not idempotent, so it may or may
    /// not have taken effect.
    Interrupted,
}

impl FailureKind {
    /// Whether a failure of this kind, once no attempt is left, leaves it unknown if the
    /// action took effect: the step said so, or the engine, not the step, saw it fail (a
    /// timeout, a panic, a crash, an output it could not record), or retries of a
    /// transient failure ran out (G4). Such a step is compensated, never before the
    /// attempt's deadline; a pivot or retriable step parks the saga.
    pub fn outcome_unknown(self) -> bool {
        !matches!(self, FailureKind::Rejected | FailureKind::Permanent)
    }

    /// Whether the failed attempt may have taken effect (anything but `rejected`).
    pub fn may_have_taken_effect(self) -> bool {
        self != FailureKind::Rejected
    }

    /// Whether the attempt itself may have taken effect, not as a consequence of running
    /// out of retries: the step said so, or the engine saw it end without an answer (a
    /// timeout, a panic, a crash, an output it could not record). A request of such an
    /// attempt may still land until the attempt's deadline.
    pub fn effect_unknown(self) -> bool {
        matches!(
            self,
            FailureKind::Unknown
                | FailureKind::Timeout
                | FailureKind::Panic
                | FailureKind::OutputTooLarge
                | FailureKind::Interrupted
        )
    }

    /// Whether the step asked to be tried again.
    pub fn transient(self) -> bool {
        matches!(self, FailureKind::Retryable | FailureKind::RetryAfter)
    }
}

/// What kind of attention a parked saga needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ParkKind {
    /// A compensation failed permanently or ran out of attempts (G5).
    CompensationFailed,
    /// A step after the pivot failed permanently or ran out of attempts.
    ForwardFailed,
    /// A step that cannot be compensated (pivot or retriable, not idempotent) was
    /// interrupted: nobody knows whether it took effect.
    OutcomeUnknown,
    /// The saga's definition or version is not registered with this engine.
    UnknownDefinition,
    /// The registered definition has other steps than the ones this saga was started
    /// with under the same version.
    DefinitionMismatch,
    /// A log record did not decode or does not fit the log before it, or the store's
    /// consistency check found the saga damaged. Only `mark_resolved` applies.
    CorruptLog,
    /// A step (or compensation) was interrupted by a crash too many times in a row
    /// ([`crate::StepOptions::max_interruptions`]): it probably kills the process.
    CrashLoop,
    /// The saga's deadline passed after its pivot had started: it can only go forward,
    /// and an operator decides.
    DeadlinePassed,
    /// A log record or summary was written by a newer engine (a format byte or event
    /// type this engine does not know). Open the store with that engine, or resolve.
    NewerFormat,
}

/// Why a saga is parked: a kind an operator can filter on, and a sentence to read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkReason {
    /// The kind.
    pub kind: ParkKind,
    /// What happened, for a human.
    pub message: String,
}

impl ParkReason {
    /// A reason of `kind` saying `message`.
    pub fn new(kind: ParkKind, message: impl Into<String>) -> Self {
        ParkReason {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for ParkReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// One transition of a saga.
///
/// Steps are named by index in the definition; the names themselves are in
/// [`Event::Started`], so a log can be read without the definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// The saga was created.
    Started {
        /// Definition name.
        definition: String,
        /// Definition version.
        version: u32,
        /// The definition's step names, in order, at the time of start.
        steps: Vec<String>,
        /// The steps' kinds, in order, so that a log can be judged (and repaired) without
        /// the definition. Empty in logs written before kinds were recorded: then every
        /// step counts as compensatable.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        kinds: Vec<StepKind>,
        /// The stage of each step, in order, when the definition has parallel groups
        /// (steps of one group share a stage). Empty when every step is a stage of its
        /// own, as in every log written before groups existed. A record that lists
        /// stages is stored in a newer format (see the store's codec), so an engine that
        /// does not know groups refuses it instead of running the group one by one.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stages: Vec<u32>,
        /// The saga input.
        input: Value,
        /// The caller's start key, if any.
        start_key: Option<StartKey>,
        /// When the saga must have ended: then it is cancelled (before the pivot) or
        /// parked (after it). Absent in logs of earlier versions.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline: Option<Timestamp>,
        /// Not before when its first step may run (a delayed start).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_before: Option<Timestamp>,
    },
    /// An attempt of a step action is about to run (durable before it runs: G1).
    StepAttemptStarted {
        /// Step index.
        step: u32,
        /// Attempt number.
        attempt: Attempt,
        /// When the engine stops waiting for it.
        deadline: Timestamp,
    },
    /// A step action succeeded.
    StepSucceeded {
        /// Step index.
        step: u32,
        /// Attempt number.
        attempt: Attempt,
        /// The step's output.
        output: Value,
    },
    /// A step action failed.
    StepFailed {
        /// Step index.
        step: u32,
        /// Attempt number.
        attempt: Attempt,
        /// How it failed.
        kind: FailureKind,
        /// The error message.
        error: String,
        /// When the next attempt is due, or `None` if there will be none.
        retry_at: Option<Timestamp>,
    },
    /// The saga gave up going forward and starts compensating.
    CompensationBegan {
        /// Why.
        reason: String,
    },
    /// An attempt of a compensation is about to run.
    CompensationAttemptStarted {
        /// Step index.
        step: u32,
        /// Attempt number.
        attempt: Attempt,
        /// When the engine stops waiting for it.
        deadline: Timestamp,
    },
    /// A compensation succeeded.
    CompensationSucceeded {
        /// Step index.
        step: u32,
        /// Attempt number.
        attempt: Attempt,
    },
    /// A compensation failed.
    CompensationFailed {
        /// Step index.
        step: u32,
        /// Attempt number.
        attempt: Attempt,
        /// How it failed.
        kind: FailureKind,
        /// The error message.
        error: String,
        /// When the next attempt is due, or `None` if there will be none.
        retry_at: Option<Timestamp>,
    },
    /// Every step succeeded.
    Completed,
    /// Every step that may have taken effect was compensated.
    Compensated,
    /// Somebody asked to cancel the saga (or its deadline passed, `operator`
    /// "deadline"): no new attempt starts, the one in flight settles, and the saga
    /// compensates, then ends `cancelled`.
    CancelRequested {
        /// Who.
        operator: String,
        /// Why.
        reason: String,
    },
    /// A cancelled saga finished compensating.
    Cancelled,
    /// The saga needs an operator.
    Parked {
        /// Why.
        reason: ParkReason,
    },
    /// The attempt of an await step just started waits for the event addressed to
    /// `key` (written with its start).
    Awaiting {
        /// Step index.
        step: u32,
        /// Attempt number.
        attempt: Attempt,
        /// The correlation key, derived from the saga's input and earlier outputs.
        key: String,
    },
    /// The event an await step waited for arrived: delivery `delivery` of its key was
    /// taken from the inbox (in the same write); the step's success, with the event's
    /// payload as its output, follows.
    EventReceived {
        /// Step index.
        step: u32,
        /// Attempt number.
        attempt: Attempt,
        /// The sender's delivery id.
        delivery: String,
    },
    /// The reconciler found that the system step `step` called disagrees with this
    /// (finished) log. Recorded after the saga's end; changes nothing but its drift list.
    Drift {
        /// Step index.
        step: u32,
        /// How the system disagrees.
        kind: DriftKind,
        /// What the log says the system should hold.
        expected: Expected,
        /// What the reconcile hook said it found.
        detail: String,
    },
    /// An operator repaired the saga.
    OperatorAction {
        /// What they did.
        action: Repair,
        /// Who.
        operator: String,
        /// Why.
        reason: String,
    },
}

/// What an operator can do to a saga. Every repair is checked against the saga's state
/// ([`crate::machine::check_repair`]) before it is written, so none can break the
/// guarantees: for example, compensation cannot be forced once the pivot has started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Repair {
    /// Run the retry that is waiting on a timer now: of step `step`, or, without one,
    /// of every step of the current stage that waits for one.
    RetryNow {
        /// The step (a branch of a parallel group, say); absent in logs written before
        /// groups, where it meant the one current step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<u32>,
    },
    /// Take a parked saga up where it stopped, with one more attempt for what failed.
    Resume,
    /// Stop going forward and compensate every step that started (only before the
    /// pivot has started).
    ForceCompensate,
    /// Count the current step (or, while compensating, the current compensation) as
    /// done without running it: the operator did it by hand.
    SkipStep {
        /// Step index.
        step: u32,
    },
    /// The operator settled the saga by hand; the engine stops driving it.
    MarkResolved,
    /// The operator dealt with the drift recorded at lsn `drift` (a finished saga's
    /// only repair): it no longer counts as open.
    HandleDrift {
        /// The lsn of the [`Event::Drift`] record.
        drift: Lsn,
    },
}

impl Repair {
    /// The repair's name, as the CLI and the admin API spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Repair::RetryNow { .. } => "retry_now",
            Repair::Resume => "resume",
            Repair::ForceCompensate => "force_compensate",
            Repair::SkipStep { .. } => "skip_step",
            Repair::MarkResolved => "mark_resolved",
            Repair::HandleDrift { .. } => "handle_drift",
        }
    }
}

impl Event {
    /// The record that an attempt of `step`'s action or compensation (`phase`) starts,
    /// with its deadline.
    pub fn attempt_started(
        phase: Phase,
        step: u32,
        attempt: Attempt,
        deadline: Timestamp,
    ) -> Event {
        match phase {
            Phase::Action => Event::StepAttemptStarted {
                step,
                attempt,
                deadline,
            },
            Phase::Compensation => Event::CompensationAttemptStarted {
                step,
                attempt,
                deadline,
            },
        }
    }

    /// The step index a step-level event is about (an attempt, a result, a skip).
    ///
    /// ```
    /// use sagaflow::machine::{Event, Repair};
    /// use sagaflow::Attempt;
    ///
    /// assert_eq!(Event::CompensationSucceeded { step: 2, attempt: Attempt(1) }.step(), Some(2));
    /// assert_eq!(Event::Completed.step(), None);
    /// ```
    pub fn step(&self) -> Option<u32> {
        match self {
            Event::StepAttemptStarted { step, .. }
            | Event::StepSucceeded { step, .. }
            | Event::StepFailed { step, .. }
            | Event::CompensationAttemptStarted { step, .. }
            | Event::CompensationSucceeded { step, .. }
            | Event::CompensationFailed { step, .. }
            | Event::Awaiting { step, .. }
            | Event::EventReceived { step, .. }
            | Event::Drift { step, .. } => Some(*step),
            Event::OperatorAction {
                action:
                    Repair::SkipStep { step }
                    | Repair::RetryNow {
                        step: Some(step), ..
                    },
                ..
            } => Some(*step),
            _ => None,
        }
    }

    /// A short name for the event's type, as in the log's JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Started { .. } => "started",
            Event::StepAttemptStarted { .. } => "step_attempt_started",
            Event::StepSucceeded { .. } => "step_succeeded",
            Event::StepFailed { .. } => "step_failed",
            Event::CompensationBegan { .. } => "compensation_began",
            Event::Awaiting { .. } => "awaiting",
            Event::EventReceived { .. } => "event_received",
            Event::CompensationAttemptStarted { .. } => "compensation_attempt_started",
            Event::CompensationSucceeded { .. } => "compensation_succeeded",
            Event::CompensationFailed { .. } => "compensation_failed",
            Event::Completed => "completed",
            Event::Compensated => "compensated",
            Event::CancelRequested { .. } => "cancel_requested",
            Event::Cancelled => "cancelled",
            Event::Parked { .. } => "parked",
            Event::Drift { .. } => "drift",
            Event::OperatorAction { .. } => "operator_action",
        }
    }
}

/// An event with its place in the log and its time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Position in the saga's log.
    pub lsn: Lsn,
    /// When it was recorded.
    pub at: Timestamp,
    /// The transition.
    pub event: Event,
}
