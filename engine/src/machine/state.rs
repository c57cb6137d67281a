//! A saga's state: a pure fold of its log.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::Timestamp;
use crate::definition::StepKind;
use crate::ids::{Attempt, Lsn, SagaId, StartKey};
use crate::machine::drift::{DriftRecord, Handled};
use crate::machine::event::{Event, FailureKind, LogRecord, ParkKind, ParkReason, Repair};

/// Where a saga is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Going forward.
    Running,
    /// Undoing what it did.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Every step that may have taken effect was compensated.
    Compensated,
    /// Waiting for an operator.
    Parked,
    /// Settled by hand by an operator.
    Resolved,
    /// Compensated on a caller's request (or because its deadline passed) before the
    /// pivot.
    Cancelled,
}

impl SagaStatus {
    /// All statuses, in index order.
    pub const ALL: [SagaStatus; 7] = [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Parked,
        SagaStatus::Resolved,
        SagaStatus::Cancelled,
    ];

    /// Whether the saga has ended for good (completed, compensated, cancelled, or
    /// resolved by an operator). A parked saga has stopped but is not final: an operator
    /// may move it on.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            SagaStatus::Completed
                | SagaStatus::Compensated
                | SagaStatus::Resolved
                | SagaStatus::Cancelled
        )
    }

    /// Whether the engine drives the saga (running or compensating).
    pub fn is_active(self) -> bool {
        matches!(self, SagaStatus::Running | SagaStatus::Compensating)
    }

    /// A stable one-byte code, used in store index keys.
    pub fn code(self) -> u8 {
        match self {
            SagaStatus::Running => 1,
            SagaStatus::Compensating => 2,
            SagaStatus::Completed => 3,
            SagaStatus::Compensated => 4,
            SagaStatus::Parked => 5,
            SagaStatus::Resolved => 6,
            SagaStatus::Cancelled => 7,
        }
    }

    /// The status with code `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        SagaStatus::ALL.into_iter().find(|s| s.code() == code)
    }

    /// The status named by `word` (as [`SagaStatus::as_str`] spells it).
    pub fn parse(word: &str) -> Option<Self> {
        SagaStatus::ALL.into_iter().find(|s| s.as_str() == word)
    }

    /// The status as a lowercase word.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Parked => "parked",
            SagaStatus::Resolved => "resolved",
            SagaStatus::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Progress of one half (action or compensation) of a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// No attempt yet.
    NotStarted,
    /// An attempt was started and has no result in the log. Seen by `decide`, this means
    /// the attempt was interrupted (the engine only decides between attempts).
    InFlight {
        /// The attempt.
        attempt: Attempt,
    },
    /// The last attempt failed.
    Failed {
        /// The attempt.
        attempt: Attempt,
        /// How.
        kind: FailureKind,
        /// The error.
        error: String,
        /// When the next attempt is due; `None`: no more attempts.
        retry_at: Option<Timestamp>,
    },
    /// Done.
    Succeeded {
        /// The attempt that succeeded.
        attempt: Attempt,
    },
}

impl Progress {
    /// Whether any attempt was ever started.
    pub fn started(&self) -> bool {
        !matches!(self, Progress::NotStarted)
    }

    /// The number of the latest attempt, 0 if none.
    pub fn attempts(&self) -> u32 {
        match self {
            Progress::NotStarted => 0,
            Progress::InFlight { attempt }
            | Progress::Failed { attempt, .. }
            | Progress::Succeeded { attempt } => attempt.0,
        }
    }
}

/// How often attempts of one half of a step were interrupted by a crash (an attempt
/// started while the previous one had no result).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interruptions {
    /// In all: attempts that do not count against the retry budget (G4).
    pub total: u32,
    /// Since the last attempt that ended: the crash-loop counter.
    pub in_a_row: u32,
}

impl Interruptions {
    fn one_more(&mut self) {
        self.total = self.total.saturating_add(1);
        self.in_a_row = self.in_a_row.saturating_add(1);
    }
}

/// One step's progress.
#[derive(Clone, Debug, PartialEq)]
pub struct StepState {
    /// The step's name.
    pub name: String,
    /// The action.
    pub action: Progress,
    /// The recorded output, once the action succeeded.
    pub output: Option<Value>,
    /// The compensation.
    pub compensation: Progress,
    /// The deadline of the action's latest attempt: before it has passed, a request
    /// that attempt sent may still land.
    pub deadline: Option<Timestamp>,
    /// The latest deadline of an attempt of the action whose outcome is unknown (it
    /// failed so, or was interrupted): until then a request it sent may still land, so
    /// the step is not compensated before (G4), even if a later attempt succeeded.
    pub unknown_until: Option<Timestamp>,
    /// Whether an attempt of the action ended in a way that may have taken effect
    /// (anything but `rejected`), or was interrupted.
    pub effect_possible: bool,
    /// Interrupted attempts of the action.
    pub interrupted: Interruptions,
    /// Interrupted attempts of the compensation.
    pub compensation_interrupted: Interruptions,
    /// For an await step: the correlation key its latest attempt waits (or waited) on.
    pub awaits: Option<String>,
    /// For an await step: the delivery it took, once its event arrived.
    pub delivery: Option<String>,
}

impl StepState {
    /// Whether the action may have taken effect, so that compensating it is owed (G5):
    /// an attempt was started and did not end rejected.
    pub fn may_have_taken_effect(&self) -> bool {
        self.effect_possible || (self.in_flight() && !self.waiting())
    }

    fn in_flight(&self) -> bool {
        matches!(self.action, Progress::InFlight { .. })
    }

    /// Whether the attempt in flight is an await step's wait that took no event: it
    /// sent nothing and took nothing, so it had no effect, interrupted or not.
    pub(crate) fn waiting(&self) -> bool {
        self.awaits.is_some() && self.delivery.is_none()
    }

    /// Not before when the action may be undone (or, for a step that cannot be undone,
    /// the saga parked): the latest deadline of an attempt whose outcome is unknown,
    /// including one still in flight (interrupted by a crash, not yet closed). A request
    /// such an attempt sent may land until then (G4).
    pub fn undo_not_before(&self) -> Option<Timestamp> {
        if self.in_flight() && !self.waiting() {
            self.unknown_until.max(self.deadline)
        } else {
            self.unknown_until
        }
    }

    /// Whether some attempt of the action may have taken effect without anyone knowing:
    /// one failed with an unknown outcome or was interrupted.
    pub fn outcome_unknown(&self) -> bool {
        self.unknown_until.is_some() || (self.in_flight() && !self.waiting())
    }

    /// The action's attempts that ended (succeeded or failed): what the retry budget
    /// counts. Interrupted attempts are not among them.
    pub fn attempts_used(&self) -> u32 {
        self.action
            .attempts()
            .saturating_sub(self.interrupted.total)
    }

    /// The compensation's attempts that ended.
    pub fn compensation_attempts_used(&self) -> u32 {
        self.compensation
            .attempts()
            .saturating_sub(self.compensation_interrupted.total)
    }
}

/// A log that cannot be folded: records out of order, or a transition that does not fit
/// the state before it. Treated like a corrupt record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("log record {lsn} does not fit the log before it: {reason}")]
pub struct FoldError {
    /// The record that does not fit.
    pub lsn: Lsn,
    /// Why.
    pub reason: String,
}

/// A saga's state: what its log says, nothing else.
#[derive(Clone, Debug, PartialEq)]
pub struct SagaState {
    /// The saga.
    pub id: SagaId,
    /// Definition name.
    pub definition: String,
    /// Definition version.
    pub version: u32,
    /// Input (shared: every attempt's context points at it).
    pub input: Arc<Value>,
    /// Start key.
    pub start_key: Option<StartKey>,
    /// Status.
    pub status: SagaStatus,
    /// Steps, in definition order.
    pub steps: Vec<StepState>,
    /// Step kinds, in definition order (from the `started` record).
    pub kinds: Vec<StepKind>,
    /// Whether the `started` record recorded the kinds (logs written before kinds were
    /// recorded count every step as compensatable, and cannot be checked for a kind
    /// that changed).
    pub kinds_recorded: bool,
    /// The stage of each step, in definition order (from the `started` record): steps
    /// of a parallel group share one. Without groups, step `i` is stage `i`.
    pub stages: Vec<u32>,
    /// Why compensation began, once it has.
    pub compensation_reason: Option<String>,
    /// Why the saga is parked, while it is.
    pub parked: Option<ParkReason>,
    /// What it was doing when it was parked, while it is.
    pub parked_from: Option<SagaStatus>,
    /// Who resolved it and why, once an operator has.
    pub resolution: Option<(String, String)>,
    /// Who asked to cancel it and why, once somebody has (or its deadline passed).
    pub cancellation: Option<(String, String)>,
    /// When it must have ended, if it has a deadline: then it is cancelled (or parked,
    /// past the pivot).
    pub deadline: Option<Timestamp>,
    /// Not before when its first step may run (a delayed start).
    pub not_before: Option<Timestamp>,
    /// When the saga started.
    pub created_at: Timestamp,
    /// When the latest record was written.
    pub updated_at: Timestamp,
    /// The lsn the next record gets.
    pub next_lsn: Lsn,
    /// Drifts the reconciler recorded after the saga ended, oldest first, handled or
    /// not.
    pub drifts: Vec<DriftRecord>,
    /// When it ended (completed, compensated, cancelled or resolved): the time of that
    /// record, which the drift records that may follow do not move.
    pub ended_at: Option<Timestamp>,
}

impl SagaState {
    /// The state after the first record, which must be [`Event::Started`] at lsn 0.
    ///
    /// # Errors
    ///
    /// [`FoldError`] if the record is anything else.
    pub fn new(id: SagaId, first: &LogRecord) -> Result<Self, FoldError> {
        let err = |reason: &str| FoldError {
            lsn: first.lsn,
            reason: reason.to_string(),
        };
        if first.lsn != Lsn(0) {
            return Err(err("the first record must have lsn 0"));
        }
        match &first.event {
            Event::Started {
                definition,
                version,
                steps,
                kinds,
                stages,
                input,
                start_key,
                deadline,
                not_before,
            } => Ok(SagaState {
                stages: stages_of(steps.len(), stages).map_err(|why| err(&why))?,
                id,
                definition: definition.clone(),
                version: *version,
                input: Arc::new(input.clone()),
                start_key: start_key.clone(),
                status: SagaStatus::Running,
                steps: steps
                    .iter()
                    .map(|name| StepState {
                        name: name.clone(),
                        action: Progress::NotStarted,
                        output: None,
                        compensation: Progress::NotStarted,
                        deadline: None,
                        unknown_until: None,
                        effect_possible: false,
                        interrupted: Interruptions::default(),
                        compensation_interrupted: Interruptions::default(),
                        awaits: None,
                        delivery: None,
                    })
                    .collect(),
                kinds: (0..steps.len())
                    .map(|i| kinds.get(i).copied().unwrap_or(StepKind::Compensatable))
                    .collect(),
                kinds_recorded: !kinds.is_empty(),
                compensation_reason: None,
                parked: None,
                parked_from: None,
                resolution: None,
                cancellation: None,
                deadline: *deadline,
                not_before: *not_before,
                created_at: first.at,
                updated_at: first.at,
                next_lsn: Lsn(1),
                drifts: Vec::new(),
                ended_at: None,
            }),
            _ => Err(err("the first record must be `started`")),
        }
    }

    /// Folds a whole log.
    ///
    /// # Errors
    ///
    /// [`FoldError`] at the first record that does not fit.
    pub fn fold<'a>(
        id: SagaId,
        records: impl IntoIterator<Item = &'a LogRecord>,
    ) -> Result<Self, FoldError> {
        let mut it = records.into_iter();
        let first = it.next().ok_or(FoldError {
            lsn: Lsn(0),
            reason: "the log is empty".into(),
        })?;
        let mut state = SagaState::new(id, first)?;
        for r in it {
            state.apply(r)?;
        }
        Ok(state)
    }

    /// The outputs of the steps that succeeded, by step name.
    pub fn outputs(&self) -> BTreeMap<String, Value> {
        self.steps
            .iter()
            .filter_map(|s| s.output.clone().map(|o| (s.name.clone(), o)))
            .collect()
    }

    /// Applies one record. On error the state is unchanged.
    ///
    /// # Errors
    ///
    /// [`FoldError`] if the record's lsn is not the next one, or the transition does
    /// not fit (a result for an attempt that was not started, anything after the end).
    pub fn apply(&mut self, record: &LogRecord) -> Result<(), FoldError> {
        let lsn = record.lsn;
        let err = |reason: String| FoldError { lsn, reason };
        if lsn != self.next_lsn {
            return Err(err(format!("expected lsn {}", self.next_lsn)));
        }
        let after_the_end = matches!(
            record.event,
            Event::Drift { .. }
                | Event::OperatorAction {
                    action: Repair::HandleDrift { .. },
                    ..
                }
        );
        if self.status.is_final() != after_the_end {
            return Err(err(if after_the_end {
                format!("`{}` before the saga ended", record.event.name())
            } else {
                format!("the saga already ended ({})", self.status)
            }));
        }
        // A parked saga waits for an operator: only a repair moves it.
        if self.status == SagaStatus::Parked
            && !matches!(record.event, Event::OperatorAction { .. })
        {
            return Err(err("the saga is parked".into()));
        }
        let n = self.steps.len();
        let step_mut = |step: u32| -> Result<usize, FoldError> {
            let i = step as usize;
            if i < n {
                Ok(i)
            } else {
                Err(FoldError {
                    lsn,
                    reason: format!("step {step} does not exist (the saga has {n})"),
                })
            }
        };
        match &record.event {
            Event::Started { .. } => return Err(err("a second `started`".into())),
            Event::StepAttemptStarted {
                step,
                attempt,
                deadline,
            } => {
                let i = step_mut(*step)?;
                self.expect_status(SagaStatus::Running, lsn)?;
                let s = &mut self.steps[i];
                if matches!(s.action, Progress::Succeeded { .. }) {
                    return Err(err(format!("step {step} already succeeded")));
                }
                if Some(attempt.0) != s.action.attempts().checked_add(1) {
                    return Err(err(format!("attempt {attempt} is not the next one")));
                }
                if matches!(s.action, Progress::InFlight { .. }) {
                    // The previous attempt was interrupted: it may have taken effect, and
                    // its request may land until its deadline. Not a wait for an event:
                    // it sent nothing, and took no event (that is written with its
                    // success).
                    s.interrupted.one_more();
                    if s.awaits.is_none() {
                        s.effect_possible = true;
                        s.unknown_until = s.unknown_until.max(s.deadline);
                    }
                }
                s.deadline = Some(*deadline);
                s.action = Progress::InFlight { attempt: *attempt };
            }
            Event::StepSucceeded {
                step,
                attempt,
                output,
            } => {
                let i = step_mut(*step)?;
                // Running, or compensating: compensation forced while a branch of a group
                // was in flight waits for that branch's result.
                self.expect_active(lsn)?;
                let s = &mut self.steps[i];
                if s.action != (Progress::InFlight { attempt: *attempt }) {
                    return Err(err(format!(
                        "attempt {attempt} of step {step} is not running"
                    )));
                }
                s.action = Progress::Succeeded { attempt: *attempt };
                s.output = Some(output.clone());
                s.effect_possible = true;
                s.interrupted.in_a_row = 0;
            }
            Event::StepFailed {
                step,
                attempt,
                kind,
                error,
                retry_at,
            } => {
                let i = step_mut(*step)?;
                self.expect_active(lsn)?;
                let s = &mut self.steps[i];
                if s.action != (Progress::InFlight { attempt: *attempt }) {
                    return Err(err(format!(
                        "attempt {attempt} of step {step} is not running"
                    )));
                }
                s.action = Progress::Failed {
                    attempt: *attempt,
                    kind: *kind,
                    error: error.clone(),
                    retry_at: *retry_at,
                };
                s.effect_possible |= kind.may_have_taken_effect();
                if kind.effect_unknown() {
                    s.unknown_until = s.unknown_until.max(s.deadline);
                }
                s.interrupted.in_a_row = 0;
            }
            Event::Awaiting { step, attempt, key } => {
                let i = step_mut(*step)?;
                let s = &mut self.steps[i];
                if s.action != (Progress::InFlight { attempt: *attempt }) || s.delivery.is_some() {
                    return Err(err(format!(
                        "attempt {attempt} of step {step} is not running"
                    )));
                }
                s.awaits = Some(key.clone());
            }
            Event::EventReceived {
                step,
                attempt,
                delivery,
            } => {
                let i = step_mut(*step)?;
                let s = &mut self.steps[i];
                if s.action != (Progress::InFlight { attempt: *attempt }) || s.awaits.is_none() {
                    return Err(err(format!(
                        "step {step} does not wait for an event at attempt {attempt}"
                    )));
                }
                s.delivery = Some(delivery.clone());
            }
            Event::CompensationBegan { reason } => {
                self.expect_status(SagaStatus::Running, lsn)?;
                self.status = SagaStatus::Compensating;
                self.compensation_reason = Some(reason.clone());
            }
            Event::CompensationAttemptStarted { step, attempt, .. } => {
                let i = step_mut(*step)?;
                self.expect_status(SagaStatus::Compensating, lsn)?;
                let s = &mut self.steps[i];
                if !s.action.started() {
                    return Err(err(format!(
                        "step {step} never started; nothing to compensate"
                    )));
                }
                if matches!(s.compensation, Progress::Succeeded { .. }) {
                    return Err(err(format!("step {step} is already compensated")));
                }
                if Some(attempt.0) != s.compensation.attempts().checked_add(1) {
                    return Err(err(format!("attempt {attempt} is not the next one")));
                }
                if matches!(s.compensation, Progress::InFlight { .. }) {
                    s.compensation_interrupted.one_more();
                }
                s.compensation = Progress::InFlight { attempt: *attempt };
            }
            Event::CompensationSucceeded { step, attempt } => {
                let i = step_mut(*step)?;
                self.expect_status(SagaStatus::Compensating, lsn)?;
                let s = &mut self.steps[i];
                if s.compensation != (Progress::InFlight { attempt: *attempt }) {
                    return Err(err(format!(
                        "compensation attempt {attempt} of step {step} is not running"
                    )));
                }
                s.compensation = Progress::Succeeded { attempt: *attempt };
                s.compensation_interrupted.in_a_row = 0;
            }
            Event::CompensationFailed {
                step,
                attempt,
                kind,
                error,
                retry_at,
            } => {
                let i = step_mut(*step)?;
                self.expect_status(SagaStatus::Compensating, lsn)?;
                let s = &mut self.steps[i];
                if s.compensation != (Progress::InFlight { attempt: *attempt }) {
                    return Err(err(format!(
                        "compensation attempt {attempt} of step {step} is not running"
                    )));
                }
                s.compensation = Progress::Failed {
                    attempt: *attempt,
                    kind: *kind,
                    error: error.clone(),
                    retry_at: *retry_at,
                };
                s.compensation_interrupted.in_a_row = 0;
            }
            Event::Completed => {
                self.expect_status(SagaStatus::Running, lsn)?;
                if let Some(s) = self
                    .steps
                    .iter()
                    .find(|s| !matches!(s.action, Progress::Succeeded { .. }))
                {
                    return Err(err(format!(
                        "`completed` but step `{}` did not succeed",
                        s.name
                    )));
                }
                self.status = SagaStatus::Completed;
            }
            Event::Compensated => {
                self.expect_status(SagaStatus::Compensating, lsn)?;
                if self.cancellation.is_some() {
                    return Err(err("a cancelled saga ends `cancelled`".into()));
                }
                self.status = SagaStatus::Compensated;
            }
            Event::CancelRequested { operator, reason } => {
                check_cancel(self).map_err(|e| err(e.to_string()))?;
                self.cancellation = Some((operator.clone(), reason.clone()));
            }
            Event::Cancelled => {
                self.expect_status(SagaStatus::Compensating, lsn)?;
                if self.cancellation.is_none() {
                    return Err(err("`cancelled` without a cancel request".into()));
                }
                self.status = SagaStatus::Cancelled;
            }
            Event::Parked { reason } => {
                self.parked_from = Some(self.status);
                self.status = SagaStatus::Parked;
                self.parked = Some(reason.clone());
            }
            Event::Drift {
                step,
                kind,
                expected,
                detail,
            } => {
                let i = step_mut(*step)?;
                self.drifts.push(DriftRecord {
                    lsn,
                    at: record.at,
                    step: *step,
                    step_name: self.steps[i].name.clone(),
                    kind: *kind,
                    expected: *expected,
                    detail: detail.clone(),
                    handled: None,
                });
            }
            Event::OperatorAction {
                action,
                operator,
                reason,
            } => {
                check_repair(self, action).map_err(|e| err(e.to_string()))?;
                self.apply_repair(action, operator, reason, record.at);
            }
        }
        // `lsn` equals `next_lsn`, which only grows by one per record; checked all the
        // same, since it was read from the store.
        self.next_lsn = Lsn(lsn
            .0
            .checked_add(1)
            .ok_or_else(|| err("no lsn follows this one".into()))?);
        self.updated_at = record.at;
        if self.status.is_final() && self.ended_at.is_none() {
            self.ended_at = Some(record.at);
        }
        Ok(())
    }

    /// The step going forward is at (the first one that has not succeeded), if any.
    pub fn current_step(&self) -> Option<usize> {
        self.steps
            .iter()
            .position(|s| !matches!(s.action, Progress::Succeeded { .. }))
    }

    /// The steps of the stage step `i` belongs to: `i` alone, or every branch of its
    /// parallel group.
    pub fn stage_steps(&self, i: usize) -> Range<usize> {
        let Some(&stage) = self.stages.get(i) else {
            return i..i;
        };
        // Stages are contiguous and ascending (checked when the log was read).
        let start = self.stages[..i]
            .iter()
            .rposition(|&s| s != stage)
            .map_or(0, |p| p + 1);
        let end = self.stages[i..]
            .iter()
            .position(|&s| s != stage)
            .map_or(self.stages.len(), |p| i + p);
        start..end
    }

    /// The stage going forward is at: the steps of the first stage with a step that has
    /// not succeeded.
    pub fn current_stage(&self) -> Option<Range<usize>> {
        self.current_step().map(|i| self.stage_steps(i))
    }

    /// Whether step `i` is owed a compensation it has not had: it is compensatable, may
    /// have taken effect (G5), and its compensation has not succeeded.
    pub fn owes_compensation(&self, i: usize) -> bool {
        self.owes_compensation_by(i, &|i| self.kinds.get(i).copied())
    }

    fn owes_compensation_by(&self, i: usize, kind: &dyn Fn(usize) -> Option<StepKind>) -> bool {
        self.steps.get(i).is_some_and(|s| {
            kind(i) == Some(StepKind::Compensatable)
                && s.may_have_taken_effect()
                && !matches!(s.compensation, Progress::Succeeded { .. })
        })
    }

    /// The step compensation is at: the last compensatable step that may have taken
    /// effect and whose compensation has not succeeded.
    pub fn current_compensation(&self) -> Option<usize> {
        (0..self.steps.len())
            .rev()
            .find(|&i| self.owes_compensation(i))
    }

    /// The steps compensation is at: those of the last stage holding a step owed a
    /// compensation, which are compensated concurrently.
    pub fn compensation_stage(&self) -> Vec<usize> {
        self.compensation_stage_by(|i| self.kinds.get(i).copied())
    }

    /// [`SagaState::compensation_stage`], with the step kinds `kind` gives (the
    /// definition's, say, for a log written before kinds were recorded).
    pub fn compensation_stage_by(&self, kind: impl Fn(usize) -> Option<StepKind>) -> Vec<usize> {
        let owes = |i: usize| self.owes_compensation_by(i, &kind);
        (0..self.steps.len())
            .rev()
            .find(|&i| owes(i))
            .map(|i| self.stage_steps(i).filter(|&j| owes(j)).collect())
            .unwrap_or_default()
    }

    /// Whether a step of the current stage failed for good (no attempt left): the stage
    /// cannot succeed, and no new attempt of it starts.
    pub fn stage_failed(&self) -> bool {
        self.current_stage().is_some_and(|r| {
            self.steps[r]
                .iter()
                .any(|s| matches!(s.action, Progress::Failed { retry_at: None, .. }))
        })
    }

    /// Until when a request an attempt of step `i` sent may still land: the deadline
    /// of an attempt in flight or of one that failed without a known outcome, and of
    /// every earlier attempt whose outcome is unknown.
    fn settles_at(&self, i: usize) -> Option<Timestamp> {
        let s = self.steps.get(i)?;
        match &s.action {
            // Failed for good of unknown outcome (an exhausted retry included): its
            // request may land until its deadline too.
            Progress::Failed { kind, .. } if kind.outcome_unknown() => {
                s.deadline.max(s.unknown_until)
            }
            _ => s.undo_not_before(),
        }
    }

    /// When the settle window the saga waits in ends, if it waits in one: nothing may undo
    /// a step (or park the saga) before the deadline of every attempt of it whose outcome
    /// is unknown has passed, since a request such an attempt sent may still land (G4).
    ///
    /// Going forward, that is once a step of the current stage failed for good: the
    /// latest such deadline over the stage's steps (the branches of a group still in
    /// flight included). Compensating, the latest deadline of an unknown attempt of a
    /// step about to be compensated.
    pub fn settling_until(&self) -> Option<Timestamp> {
        match self.status {
            SagaStatus::Running if self.stage_failed() => {
                let r = self.current_stage()?;
                r.filter_map(|i| self.settles_at(i)).max()
            }
            SagaStatus::Compensating => self
                .compensation_stage()
                .into_iter()
                .filter(|&i| self.steps[i].compensation == Progress::NotStarted)
                .filter_map(|i| self.steps[i].undo_not_before())
                .max(),
            _ => None,
        }
    }

    /// The key an await step of the saga waits on now and its deadline (the earliest,
    /// if several branches wait).
    pub fn awaiting(&self) -> Option<(String, Timestamp)> {
        if !self.status.is_active() {
            return None;
        }
        self.steps
            .iter()
            .filter(|s| matches!(s.action, Progress::InFlight { .. }) && s.delivery.is_none())
            .filter_map(|s| Some((s.awaits.clone()?, s.deadline?)))
            .min_by_key(|(_, until)| *until)
    }

    /// The status the saga is in, or was in before it was parked.
    pub fn working_status(&self) -> SagaStatus {
        match (self.status, self.parked_from) {
            (SagaStatus::Parked, Some(from)) => from,
            (status, _) => status,
        }
    }

    /// When the earliest retry (or the end of the settle window) the saga waits for is
    /// due, if it waits for one.
    pub fn next_timer(&self) -> Option<Timestamp> {
        let retry_at = |p: &Progress| match p {
            Progress::Failed {
                retry_at: Some(at), ..
            } => Some(*at),
            _ => None,
        };
        match self.status {
            SagaStatus::Running => {
                let nothing_started = self.steps.iter().all(|s| !s.action.started());
                if nothing_started {
                    if let Some(t) = self.not_before {
                        return Some(t);
                    }
                }
                if self.stage_failed() {
                    return self.settling_until();
                }
                let r = self.current_stage()?;
                self.steps[r]
                    .iter()
                    .filter_map(|s| retry_at(&s.action))
                    .min()
            }
            SagaStatus::Compensating => self
                .compensation_stage()
                .into_iter()
                .filter_map(|i| {
                    let s = &self.steps[i];
                    match s.compensation {
                        Progress::NotStarted => s.undo_not_before(),
                        ref p => retry_at(p),
                    }
                })
                .min(),
            _ => None,
        }
    }

    /// The steps a repair acts on, with the half (action or compensation) it acts on:
    /// `step` if given, else every step of the current stage (going forward) or of the
    /// compensation stage.
    fn repair_targets(&self, working: SagaStatus, step: Option<u32>) -> Vec<usize> {
        let all: Vec<usize> = match working {
            SagaStatus::Running => self
                .current_stage()
                .map(|r| r.collect())
                .unwrap_or_default(),
            SagaStatus::Compensating => self.compensation_stage(),
            _ => Vec::new(),
        };
        match step {
            Some(s) => all.into_iter().filter(|&i| i == s as usize).collect(),
            None => all,
        }
    }

    fn progress_mut(&mut self, working: SagaStatus, i: usize) -> Option<&mut Progress> {
        let s = self.steps.get_mut(i)?;
        Some(match working {
            SagaStatus::Compensating => &mut s.compensation,
            _ => &mut s.action,
        })
    }

    fn apply_repair(&mut self, action: &Repair, operator: &str, reason: &str, at: Timestamp) {
        let working = self.working_status();
        // An operator who moves on a saga parked for its deadline overrides the deadline:
        // otherwise the next decision would park it again at once.
        if self.parked.as_ref().map(|p| p.kind) == Some(ParkKind::DeadlinePassed)
            && matches!(action, Repair::Resume | Repair::SkipStep { .. })
        {
            self.deadline = None;
        }
        let unpark = |s: &mut SagaState| {
            if s.status == SagaStatus::Parked {
                s.status = working;
                s.parked = None;
                s.parked_from = None;
            }
        };
        match action {
            Repair::RetryNow { step } => {
                for i in self.repair_targets(working, *step) {
                    if let Some(Progress::Failed {
                        retry_at: Some(t), ..
                    }) = self.progress_mut(working, i)
                    {
                        *t = at;
                    }
                }
            }
            Repair::Resume => {
                unpark(self);
                for i in self.repair_targets(working, None) {
                    // An operator looked at a crash loop: count interruptions afresh.
                    self.steps[i].interrupted.in_a_row = 0;
                    self.steps[i].compensation_interrupted.in_a_row = 0;
                    // One more attempt for what had run out of them.
                    if let Some(Progress::Failed { retry_at, .. }) = self.progress_mut(working, i) {
                        if retry_at.is_none() {
                            *retry_at = Some(at);
                        }
                    }
                }
            }
            Repair::ForceCompensate => {
                unpark(self);
                self.status = SagaStatus::Compensating;
                self.compensation_reason = Some(format!("forced by {operator}: {reason}"));
            }
            Repair::SkipStep { step } => {
                unpark(self);
                let i = *step as usize;
                if let Some(s) = self.steps.get_mut(i) {
                    match working {
                        SagaStatus::Running => {
                            let attempt = Attempt(s.action.attempts());
                            s.action = Progress::Succeeded { attempt };
                            s.output = Some(Value::Null);
                        }
                        _ => {
                            let attempt = Attempt(s.compensation.attempts());
                            s.compensation = Progress::Succeeded { attempt };
                        }
                    }
                }
            }
            Repair::MarkResolved => {
                self.status = SagaStatus::Resolved;
                self.parked = None;
                self.parked_from = None;
                self.resolution = Some((operator.to_string(), reason.to_string()));
            }
            Repair::HandleDrift { drift } => {
                if let Some(d) = self.drifts.iter_mut().find(|d| d.lsn == *drift) {
                    d.handled = Some(Handled {
                        operator: operator.to_string(),
                        reason: reason.to_string(),
                        at,
                    });
                }
            }
        }
    }

    /// The drifts no operator has marked handled yet.
    pub fn open_drifts(&self) -> impl Iterator<Item = &DriftRecord> {
        self.drifts.iter().filter(|d| d.handled.is_none())
    }

    fn expect_active(&self, lsn: Lsn) -> Result<(), FoldError> {
        if self.status.is_active() {
            Ok(())
        } else {
            Err(FoldError {
                lsn,
                reason: format!("the saga is {}, not running or compensating", self.status),
            })
        }
    }

    fn expect_status(&self, want: SagaStatus, lsn: Lsn) -> Result<(), FoldError> {
        if self.status == want {
            Ok(())
        } else {
            Err(FoldError {
                lsn,
                reason: format!("the saga is {}, not {want}", self.status),
            })
        }
    }
}

/// Whether a saga may be cancelled now: it is going forward and no step at or after the
/// pivot has started (past the pivot a saga can only go forward). A pure function of the
/// log, like [`check_repair`].
///
/// # Errors
///
/// A [`Refusal`] saying why.
pub fn check_cancel(state: &SagaState) -> Result<(), Refusal> {
    let no = |why: String| Err(Refusal(why));
    match state.status {
        SagaStatus::Running => {}
        SagaStatus::Compensating => return no("the saga is already compensating".into()),
        SagaStatus::Parked => {
            return no("the saga is parked: force compensation or resolve it instead".into())
        }
        ended => return no(format!("the saga has ended ({ended})")),
    }
    if state.cancellation.is_some() {
        return no("the saga is already being cancelled".into());
    }
    if let Some(i) = (0..state.steps.len()).find(|&i| {
        state.kinds.get(i) != Some(&StepKind::Compensatable) && state.steps[i].action.started()
    }) {
        return no(format!(
            "step `{}` ({}) has started: past the pivot a saga can only go forward",
            state.steps[i].name, state.kinds[i]
        ));
    }
    Ok(())
}

/// Why a repair was refused: it would break a guarantee or does not fit the saga's state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Whether `action` may be applied to `state`. A pure function of the log (the step
/// kinds are in it), shared by the engine, the offline admin tools and the fold, so a
/// repair that is refused live is refused offline too, and a log holding a repair that
/// should have been refused does not fold.
///
/// # Errors
///
/// A [`Refusal`] saying why.
pub fn check_repair(state: &SagaState, action: &Repair) -> Result<(), Refusal> {
    let no = |why: String| Err(Refusal(why));
    if let Repair::HandleDrift { drift } = action {
        // Drift is recorded only after the end, so this is a finished saga's repair.
        return match state.drifts.iter().find(|d| d.lsn == *drift) {
            None => no(format!("no drift is recorded at lsn {drift}")),
            Some(d) if d.handled.is_some() => {
                no(format!("the drift at lsn {drift} is already handled"))
            }
            Some(_) => Ok(()),
        };
    }
    if state.status.is_final() {
        return no(format!("the saga has ended ({})", state.status));
    }
    let working = state.working_status();
    let parked = state.status == SagaStatus::Parked;
    match action {
        Repair::RetryNow { step } => {
            if parked {
                return no("the saga is parked: resume it instead".into());
            }
            let settling = |t: Timestamp| {
                no(format!(
                    "the saga is settling until {t}: its last attempt may still take effect, \
                     and nothing is retried or undone before then"
                ))
            };
            if working == SagaStatus::Running && state.stage_failed() {
                if let Some(t) = state.settling_until() {
                    return settling(t);
                }
                return no(
                    "a step of the current stage failed for good: nothing is retried".into(),
                );
            }
            let targets = state.repair_targets(working, *step);
            if let (Some(i), true) = (step, targets.is_empty()) {
                let name = state
                    .steps
                    .get(*i as usize)
                    .map_or("?", |s| s.name.as_str());
                return no(format!(
                    "step {i} (`{name}`) is not in the stage the saga is at"
                ));
            }
            let waiting = targets.iter().any(|&i| {
                let s = &state.steps[i];
                let p = match working {
                    SagaStatus::Compensating => &s.compensation,
                    _ => &s.action,
                };
                matches!(
                    p,
                    Progress::Failed {
                        retry_at: Some(_),
                        ..
                    }
                )
            });
            if !waiting {
                if let Some(t) = state.settling_until() {
                    return settling(t);
                }
                return no("the saga is not waiting for a retry".into());
            }
        }
        Repair::Resume => {
            if !parked {
                return no(format!("the saga is not parked (it is {})", state.status));
            }
            match state.parked.as_ref().map(|p| p.kind) {
                Some(ParkKind::CorruptLog) => {
                    return no("its log is corrupt: only mark_resolved applies".into())
                }
                Some(ParkKind::NewerFormat) => {
                    return no(
                        "it was written by a newer engine: open the store with that \
                               engine, or mark it resolved"
                            .into(),
                    )
                }
                _ => {}
            }
            if !working.is_active() {
                return no("it was not running or compensating when it was parked".into());
            }
        }
        Repair::ForceCompensate => {
            if working != SagaStatus::Running {
                return no(format!(
                    "compensation can only be forced going forward, not {working}"
                ));
            }
            if let Some(i) = (0..state.steps.len()).find(|&i| {
                state.kinds.get(i) != Some(&StepKind::Compensatable)
                    && state.steps[i].action.started()
            }) {
                return no(format!(
                    "step `{}` ({}) has started: past the pivot a saga can only go forward",
                    state.steps[i].name, state.kinds[i]
                ));
            }
        }
        Repair::SkipStep { step } => {
            let i = *step as usize;
            let name = state.steps.get(i).map_or("?", |s| s.name.as_str());
            let succeeded = state
                .steps
                .get(i)
                .is_some_and(|s| matches!(s.action, Progress::Succeeded { .. }));
            match working {
                SagaStatus::Running
                    if state.current_stage().is_some_and(|r| r.contains(&i)) && !succeeded => {}
                SagaStatus::Compensating if state.compensation_stage().contains(&i) => {}
                SagaStatus::Running => {
                    return no(format!(
                        "step {step} (`{name}`) is not a step the saga is at (or it succeeded)"
                    ))
                }
                SagaStatus::Compensating => {
                    return no(format!(
                        "step {step} (`{name}`) is not a step compensation is at"
                    ))
                }
                other => return no(format!("nothing to skip while {other}")),
            }
        }
        Repair::MarkResolved => {}
        // Answered above.
        Repair::HandleDrift { .. } => {}
    }
    Ok(())
}

/// The stage of each of `n` steps, from a `started` record's `stages` (empty: each step
/// is a stage of its own). Stages must count up from 0 by at most one per step, so that
/// each stage is one run of consecutive steps.
fn stages_of(n: usize, stages: &[u32]) -> Result<Vec<u32>, String> {
    if stages.is_empty() {
        return (0..n)
            .map(|i| u32::try_from(i).map_err(|_| "too many steps".to_string()))
            .collect();
    }
    if stages.len() != n {
        return Err(format!("{} stages for {n} steps", stages.len()));
    }
    let mut prev: Option<u32> = None;
    for &st in stages {
        let ok = match prev {
            None => st == 0,
            Some(p) => st == p || Some(st) == p.checked_add(1),
        };
        if !ok {
            return Err(format!(
                "the stages {stages:?} do not count up from 0 by one"
            ));
        }
        prev = Some(st);
    }
    Ok(stages.to_vec())
}
