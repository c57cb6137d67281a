//! Await steps: a step that waits for an event from outside (a webhook, an approval),
//! addressed to its saga by a correlation key, until a deadline.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::definition::step::ErasedStep;
use crate::definition::StepContext;

/// What an await step's timeout means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnTimeout {
    /// Nothing happened: the step fails `rejected` and is not compensated (the steps
    /// before it are).
    #[default]
    Rejected,
    /// Something may have happened that the event would have told (a payment that may
    /// have settled): the step fails with an unknown outcome and is compensated (or, past
    /// the pivot, parks the saga).
    Unknown,
}

/// The correlation key of an await step: derived from the saga's input and the outputs
/// of the steps before it (`ctx.saga_input()`, `ctx.output_of(..)`).
pub type KeyFn = dyn Fn(&StepContext) -> Result<String, String> + Send + Sync;

/// How an await step finds its event and how long it waits for it.
///
/// ```
/// use std::time::Duration;
/// use sagaflow::{Await, OnTimeout};
///
/// let settlement = Await::new(Duration::from_secs(3600), |ctx| {
///     ctx.output_of::<String>("charge")
///         .map_err(|e| e.to_string())?
///         .map(|charge| format!("settlement/{charge}"))
///         .ok_or_else(|| "no charge id".to_string())
/// })
/// .on_timeout(OnTimeout::Unknown);
/// assert_eq!(settlement.within(), Duration::from_secs(3600));
/// ```
#[derive(Clone)]
pub struct Await {
    pub(crate) key: Arc<KeyFn>,
    pub(crate) within: Duration,
    pub(crate) on_timeout: OnTimeout,
    pub(crate) compensation: Option<Arc<dyn ErasedStep>>,
}

impl fmt::Debug for Await {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Await")
            .field("within", &self.within)
            .field("on_timeout", &self.on_timeout)
            .field("compensation", &self.compensation.is_some())
            .finish_non_exhaustive()
    }
}

impl Await {
    /// Waits up to `within` (counted from when the step begins waiting, across
    /// restarts) for the event addressed to the key `key` derives. A key that cannot be
    /// derived fails the step `rejected`.
    pub fn new(
        within: Duration,
        key: impl Fn(&StepContext) -> Result<String, String> + Send + Sync + 'static,
    ) -> Self {
        Await {
            key: Arc::new(key),
            within,
            on_timeout: OnTimeout::default(),
            compensation: None,
        }
    }

    /// What a timeout means (default [`OnTimeout::Rejected`]).
    pub fn on_timeout(mut self, on_timeout: OnTimeout) -> Self {
        self.on_timeout = on_timeout;
        self
    }

    /// How long the step waits.
    pub fn within(&self) -> Duration {
        self.within
    }

    /// Undoes what the event stood for, if the saga compensates after it arrived (a
    /// settled payment refunded, say): `step`'s `compensate` runs with the event's
    /// payload as the output; its `execute` is never called.
    pub fn compensate_with(mut self, step: impl crate::Compensate) -> Self {
        self.compensation = Some(Arc::new(crate::definition::step::Undoable(step)));
        self
    }
}
