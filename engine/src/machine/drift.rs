//! Drift: what a finished saga's log says against what the systems its steps called hold.
//!
//! The reconciler (see [`crate::Reconcile`]) asks each system for its view of a finished
//! step, by the step's idempotency key, and records every disagreement on the saga's log
//! as an [`crate::machine::Event::Drift`]. An operator marks one handled with
//! [`crate::machine::Repair::HandleDrift`], who and why in the log like any repair. Both
//! come after the saga's end and change nothing but its drift list.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::ids::Lsn;

/// What a finished saga's log says a step should have left in the system it called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Expected {
    /// The action succeeded and was not undone: the system holds its effect, as the
    /// step's output describes it.
    Present,
    /// The action may have taken effect and its compensation succeeded: the system holds
    /// nothing in force for its key (a refund for the charge, a released reservation).
    Undone,
    /// The action never took effect: it never started, or the service refused it
    /// (rejected). The system holds nothing for its key.
    Absent,
}

impl Expected {
    /// The name, as the log and the admin API spell it.
    pub fn name(self) -> &'static str {
        match self {
            Expected::Present => "present",
            Expected::Undone => "undone",
            Expected::Absent => "absent",
        }
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a system disagrees with the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DriftKind {
    /// The log says the effect stands; the system has no record of it.
    Missing,
    /// The log says there is no effect (compensated, or never taken); the system holds
    /// one in force.
    Unexpected,
    /// Both have it, but it differs (an amount, a state).
    Different,
    /// The system could not be asked (down, refusing, an answer that does not parse),
    /// again and again: nobody knows whether it agrees.
    Unknown,
}

impl DriftKind {
    /// Every kind.
    pub const ALL: [DriftKind; 4] = [
        DriftKind::Missing,
        DriftKind::Unexpected,
        DriftKind::Different,
        DriftKind::Unknown,
    ];

    /// The name, as the log, the metric label and the admin API spell it.
    pub fn name(self) -> &'static str {
        match self {
            DriftKind::Missing => "missing",
            DriftKind::Unexpected => "unexpected",
            DriftKind::Different => "different",
            DriftKind::Unknown => "unknown",
        }
    }
}

impl fmt::Display for DriftKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DriftKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DriftKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!("unknown drift kind `{s}` (missing, unexpected, different, unknown)")
            })
    }
}

/// One drift recorded on a saga, as its log folds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftRecord {
    /// The record's lsn: what [`crate::machine::Repair::HandleDrift`] names.
    pub lsn: Lsn,
    /// When the reconciler found it.
    pub at: Timestamp,
    /// The step's index.
    pub step: u32,
    /// The step's name.
    pub step_name: String,
    /// How the system disagrees.
    pub kind: DriftKind,
    /// What the log says the system should hold.
    pub expected: Expected,
    /// What the hook said it found.
    pub detail: String,
    /// Once an operator marked it handled: who, why and when.
    pub handled: Option<Handled>,
}

/// An operator's note that a drift was dealt with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handled {
    /// Who.
    pub operator: String,
    /// Why, or what they did.
    pub reason: String,
    /// When.
    pub at: Timestamp,
}
