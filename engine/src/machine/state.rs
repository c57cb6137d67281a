//! A saga's state: a pure fold of its log.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::Timestamp;
use crate::ids::{Attempt, Lsn, SagaId, StartKey};
use crate::machine::event::{Event, FailureKind, LogRecord, ParkReason};

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
}

impl SagaStatus {
    /// All statuses, in index order.
    pub const ALL: [SagaStatus; 5] = [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Parked,
    ];

    /// Whether the saga has ended for good (completed or compensated). A parked saga has
    /// stopped but is not final: an operator may move it on.
    pub fn is_final(self) -> bool {
        matches!(self, SagaStatus::Completed | SagaStatus::Compensated)
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
        }
    }

    /// The status with code `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        SagaStatus::ALL.into_iter().find(|s| s.code() == code)
    }

    /// The status as a lowercase word.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Parked => "parked",
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
    /// Why compensation began, once it has.
    pub compensation_reason: Option<String>,
    /// Why the saga is parked, while it is.
    pub parked: Option<ParkReason>,
    /// When the saga started.
    pub created_at: Timestamp,
    /// When the latest record was written.
    pub updated_at: Timestamp,
    /// The lsn the next record gets.
    pub next_lsn: Lsn,
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
                input,
                start_key,
            } => Ok(SagaState {
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
                    })
                    .collect(),
                compensation_reason: None,
                parked: None,
                created_at: first.at,
                updated_at: first.at,
                next_lsn: Lsn(1),
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
        if self.status.is_final() {
            return Err(err(format!("the saga already ended ({})", self.status)));
        }
        // Parked sagas accept nothing until operator actions exist in the log format.
        if self.status == SagaStatus::Parked {
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
            Event::StepAttemptStarted { step, attempt, .. } => {
                let i = step_mut(*step)?;
                self.expect_status(SagaStatus::Running, lsn)?;
                let s = &mut self.steps[i];
                if matches!(s.action, Progress::Succeeded { .. }) {
                    return Err(err(format!("step {step} already succeeded")));
                }
                if attempt.0 != s.action.attempts() + 1 {
                    return Err(err(format!("attempt {attempt} is not the next one")));
                }
                s.action = Progress::InFlight { attempt: *attempt };
            }
            Event::StepSucceeded {
                step,
                attempt,
                output,
            } => {
                let i = step_mut(*step)?;
                self.expect_status(SagaStatus::Running, lsn)?;
                let s = &mut self.steps[i];
                if s.action != (Progress::InFlight { attempt: *attempt }) {
                    return Err(err(format!(
                        "attempt {attempt} of step {step} is not running"
                    )));
                }
                s.action = Progress::Succeeded { attempt: *attempt };
                s.output = Some(output.clone());
            }
            Event::StepFailed {
                step,
                attempt,
                kind,
                error,
                retry_at,
            } => {
                let i = step_mut(*step)?;
                self.expect_status(SagaStatus::Running, lsn)?;
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
                if attempt.0 != s.compensation.attempts() + 1 {
                    return Err(err(format!("attempt {attempt} is not the next one")));
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
                self.status = SagaStatus::Compensated;
            }
            Event::Parked { reason } => {
                self.status = SagaStatus::Parked;
                self.parked = Some(reason.clone());
            }
        }
        self.next_lsn = Lsn(lsn.0 + 1);
        self.updated_at = record.at;
        Ok(())
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
