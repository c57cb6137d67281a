//! The pure core: events, the state they fold into, and the decision of what comes next.
//!
//! Nothing in this module does I/O, reads the clock or draws randomness: given the same
//! log and definition it always answers the same. The executor feeds it, carries out what
//! it decides, and records the result; recovery replays the log through the same code.

mod decide;
mod drift;
mod event;
mod retry;
mod state;
#[cfg(test)]
mod tests;

pub use decide::{decide, definition_mismatch, Decision, Live};
pub use drift::{DriftKind, DriftRecord, Expected, Handled};
pub use event::{Event, FailureKind, LogRecord, ParkKind, ParkReason, Repair};
pub use retry::next_attempt_at;
pub use state::{
    check_cancel, check_repair, FoldError, Interruptions, Progress, Refusal, SagaState, SagaStatus,
    StepState,
};
