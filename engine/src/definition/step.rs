//! The `Step` trait that step authors implement, and the erased form the engine stores.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::clock::Timestamp;
use crate::ids::{Attempt, IdempotencyKey, Phase, SagaId};

/// How a step action or compensation failed. A failing step is an outcome the engine
/// handles (retry, compensate, park), not an engine error.
///
/// The kind says what the engine may assume about the effect (G5):
///
/// | kind | took effect? | the engine |
/// | --- | --- | --- |
/// | [`StepError::Retryable`], [`StepError::RetryAfter`] | no, try again | retries with the same key; out of attempts, it counts as unknown |
/// | [`StepError::Rejected`] | no: the service refused | no retry; the step is **not** compensated (the steps before it are) |
/// | [`StepError::Unknown`] | maybe | retries an idempotent step with the same key; then, once the attempt's deadline has passed, compensates the step (or parks the saga at a pivot or after it) |
///
/// ```
/// use std::time::Duration;
/// use sagaflow::StepError;
///
/// let e = StepError::retry_after(Duration::from_secs(2), "429 from inventory");
/// assert!(e.is_retryable());
/// assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(2)));
/// assert!(!StepError::rejected("card declined").is_retryable());
/// assert!(StepError::unknown("connection reset after the request was sent").may_have_taken_effect());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// A transient failure without effect: try again after the policy's backoff.
    #[error("retryable: {message}")]
    Retryable {
        /// What went wrong.
        message: String,
    },
    /// A transient failure with a hint from the other side, such as a 429 or 503 with
    /// `Retry-After`: try again, but not before `after` has passed.
    #[error("retryable after {after:?}: {message}")]
    RetryAfter {
        /// What went wrong.
        message: String,
        /// The earliest the next attempt may start, from now.
        after: Duration,
    },
    /// The service refused (a declined card, a 4xx other than 408, 409, 425 and 429): it
    /// definitely took no effect, and another attempt will not change that. The step is
    /// not compensated; the saga compensates the steps before it (or parks after the
    /// pivot).
    #[error("rejected: {message}")]
    Rejected {
        /// What went wrong.
        message: String,
    },
    /// It may have taken effect (a timeout, a connection dropped after the request was
    /// sent, a 5xx). An idempotent step is retried with the same key; when no attempt is
    /// left, the step is compensated (a pivot parks the saga), never before the attempt's
    /// deadline, so a request still on its way cannot land after its undo.
    #[error("unknown: {message}")]
    Unknown {
        /// What went wrong.
        message: String,
    },
}

impl StepError {
    /// A transient failure.
    pub fn retryable(message: impl fmt::Display) -> Self {
        StepError::Retryable {
            message: message.to_string(),
        }
    }

    /// A transient failure that must not be retried before `after`.
    pub fn retry_after(after: Duration, message: impl fmt::Display) -> Self {
        StepError::RetryAfter {
            message: message.to_string(),
            after,
        }
    }

    /// The service refused: no effect, and retrying will not help.
    pub fn rejected(message: impl fmt::Display) -> Self {
        StepError::Rejected {
            message: message.to_string(),
        }
    }

    /// The outcome is unknown: it may have taken effect.
    pub fn unknown(message: impl fmt::Display) -> Self {
        StepError::Unknown {
            message: message.to_string(),
        }
    }

    /// Whether the step asks to be tried again (retryable or retry-after). An unknown
    /// failure of an idempotent step is retried too, at the engine's choice.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StepError::Retryable { .. } | StepError::RetryAfter { .. }
        )
    }

    /// Whether the failed call may have taken effect.
    pub fn may_have_taken_effect(&self) -> bool {
        matches!(self, StepError::Unknown { .. })
    }

    /// The minimum wait before the next attempt, if the failure gave one.
    pub fn retry_after_hint(&self) -> Option<Duration> {
        match self {
            StepError::RetryAfter { after, .. } => Some(*after),
            _ => None,
        }
    }

    /// The failure's message without its kind.
    pub fn message(&self) -> &str {
        match self {
            StepError::Retryable { message }
            | StepError::RetryAfter { message, .. }
            | StepError::Rejected { message }
            | StepError::Unknown { message } => message,
        }
    }
}

/// What a step sees of its saga during one attempt.
///
/// Cheap to clone: the saga input and earlier outputs are shared.
#[derive(Clone)]
pub struct StepContext {
    pub(crate) saga_id: SagaId,
    pub(crate) step: Arc<str>,
    pub(crate) phase: Phase,
    pub(crate) attempt: Attempt,
    pub(crate) key: IdempotencyKey,
    pub(crate) deadline: Timestamp,
    pub(crate) input: Arc<Value>,
    /// `None` while no step has an output: no allocation for a saga's first step.
    pub(crate) outputs: Option<Arc<BTreeMap<String, Value>>>,
}

impl fmt::Debug for StepContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Input and outputs stay out of Debug: they may hold customer data.
        f.debug_struct("StepContext")
            .field("saga_id", &self.saga_id)
            .field("step", &self.step)
            .field("phase", &self.phase)
            .field("attempt", &self.attempt)
            .field("key", &self.key)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl StepContext {
    /// A context for calling a step outside the engine, for example in a step's own unit
    /// tests. The idempotency key is derived exactly as the engine derives it.
    ///
    /// ```
    /// use sagaflow::{Attempt, Phase, SagaId, StepContext, Timestamp};
    ///
    /// let saga: SagaId = "0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071".parse()?;
    /// let ctx = StepContext::for_test(saga, "charge", Phase::Action, serde_json::json!({"cents": 5}));
    /// assert_eq!(ctx.attempt(), Attempt::FIRST);
    /// assert!(ctx.idempotency_key().as_str().ends_with("/charge/action"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn for_test(saga_id: SagaId, step: &str, phase: Phase, input: Value) -> Self {
        StepContext {
            saga_id,
            step: Arc::from(step),
            phase,
            attempt: Attempt::FIRST,
            key: IdempotencyKey::derive(saga_id, step, phase),
            deadline: Timestamp::from_millis(u64::MAX),
            input: Arc::new(input),
            outputs: None,
        }
    }

    /// The same context with the attempt's deadline at `deadline`: for tests of steps
    /// that must not call out once it has passed.
    ///
    /// ```
    /// use sagaflow::{Phase, SagaId, StepContext, Timestamp};
    ///
    /// let saga: SagaId = "0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071".parse()?;
    /// let ctx = StepContext::for_test(saga, "charge", Phase::Action, serde_json::json!({}))
    ///     .with_deadline(Timestamp::from_millis(1));
    /// assert_eq!(ctx.deadline(), Timestamp::from_millis(1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_deadline(mut self, deadline: Timestamp) -> Self {
        self.deadline = deadline;
        self
    }

    /// The saga this attempt belongs to; also the correlation id to pass downstream.
    pub fn saga_id(&self) -> SagaId {
        self.saga_id
    }

    /// The step's name.
    pub fn step_name(&self) -> &str {
        &self.step
    }

    /// Whether this is the action or the compensation.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The attempt number, from 1.
    pub fn attempt(&self) -> Attempt {
        self.attempt
    }

    /// The stable idempotency key of this action or compensation (G3). Send it downstream.
    pub fn idempotency_key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// The idempotency key of the step's *action*, whatever the phase: what a
    /// compensation undoes by ("refund the charge made with this key"). In the action
    /// it equals [`StepContext::idempotency_key`].
    ///
    /// ```
    /// use sagaflow::{Phase, SagaId, StepContext};
    ///
    /// let saga: SagaId = "0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071".parse()?;
    /// let undo = StepContext::for_test(saga, "charge", Phase::Compensation, serde_json::json!({}));
    /// assert!(undo.idempotency_key().as_str().ends_with("/charge/compensation"));
    /// assert!(undo.action_key().as_str().ends_with("/charge/action"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn action_key(&self) -> IdempotencyKey {
        match self.phase {
            Phase::Action => self.key.clone(),
            Phase::Compensation => IdempotencyKey::derive(self.saga_id, &self.step, Phase::Action),
        }
    }

    /// When the engine gives up on this attempt; pass it on as a request timeout.
    pub fn deadline(&self) -> Timestamp {
        self.deadline
    }

    /// The saga's input as JSON.
    pub fn saga_input(&self) -> &Value {
        &self.input
    }

    /// The recorded output of an earlier step (a refund needs the charge id), decoded.
    ///
    /// Returns `Ok(None)` if that step has no recorded output.
    ///
    /// # Errors
    ///
    /// A rejected [`StepError`] if the output does not decode as `T` (nothing was sent).
    pub fn output_of<T: DeserializeOwned>(&self, step: &str) -> Result<Option<T>, StepError> {
        match self.outputs.as_ref().and_then(|o| o.get(step)) {
            None => Ok(None),
            Some(v) => T::deserialize(v).map(Some).map_err(|e| {
                StepError::rejected(format!(
                    "output of step `{step}` does not decode as {}: {e}",
                    std::any::type_name::<T>()
                ))
            }),
        }
    }
}

/// One step of a saga, written by the user: its forward action.
///
/// `Input` is decoded from the saga's input (each step may take its own view of it);
/// `Output` is recorded in the log and handed to the compensation and to later steps.
/// `execute` must be safe to repeat with the same [`StepContext::idempotency_key`]: the
/// engine runs it at least once, and the key makes the effect exactly-once.
///
/// A step before the pivot is *compensatable* and must also implement [`Compensate`]:
/// the builder's [`crate::SagaDefinitionBuilder::step`] asks for it, so a step that cannot
/// be undone cannot be declared compensatable. A pivot or retriable step implements
/// `Step` alone.
///
/// ```
/// use async_trait::async_trait;
/// use sagaflow::{Compensate, Step, StepContext, StepError};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Deserialize)]
/// struct Order { cents: u64 }
/// #[derive(Serialize, Deserialize)]
/// struct Charge { charge_id: String }
///
/// struct ChargeCard;
///
/// #[async_trait]
/// impl Step for ChargeCard {
///     type Input = Order;
///     type Output = Charge;
///
///     async fn execute(&self, ctx: &StepContext, order: Order) -> Result<Charge, StepError> {
///         // A real step sends ctx.idempotency_key() to the payment provider, and
///         // classifies its failures: a declined card is `StepError::rejected`, a
///         // timeout `StepError::unknown`.
///         Ok(Charge { charge_id: format!("ch_{}_{}", ctx.idempotency_key(), order.cents) })
///     }
/// }
///
/// #[async_trait]
/// impl Compensate for ChargeCard {
///     async fn compensate(
///         &self,
///         ctx: &StepContext,
///         _order: Order,
///         charge: Option<Charge>,
///     ) -> Result<(), StepError> {
///         // `None`: the charge may or may not have happened: refund by the key of the
///         // action, `ctx.action_key()`.
///         let _ = (charge, ctx.action_key());
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Step: Send + Sync + 'static {
    /// What the step reads from the saga input.
    type Input: DeserializeOwned + Send + 'static;
    /// What the step records when it succeeds.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// The forward action.
    async fn execute(
        &self,
        ctx: &StepContext,
        input: Self::Input,
    ) -> Result<Self::Output, StepError>;
}

/// How a compensatable step is undone: what every step before the pivot provides.
///
/// A compensation is always idempotent (it is re-run with its own key after a crash)
/// and undoes by the action's key ([`StepContext::action_key`]) when `output` is `None`:
/// the action failed or was interrupted but may have taken effect. See [`Step`] for an
/// example.
#[async_trait]
pub trait Compensate: Step {
    /// Undo the action. `output` is the recorded output if the action succeeded, `None`
    /// if it failed or was interrupted (it may still have taken effect: undo by key).
    async fn compensate(
        &self,
        ctx: &StepContext,
        input: Self::Input,
        output: Option<Self::Output>,
    ) -> Result<(), StepError>;
}

/// The object-safe form of a step that the engine stores: JSON in, JSON out.
#[async_trait]
pub(crate) trait ErasedStep: Send + Sync {
    fn check_input(&self, input: &Value) -> Result<(), String>;
    async fn execute(&self, ctx: StepContext) -> Result<Value, StepError>;
    async fn compensate(&self, ctx: StepContext, output: Option<Value>) -> Result<(), StepError>;
}

/// A pivot or retriable step: never compensated.
pub(crate) struct Forward<S>(pub(crate) S);

/// The code of an await step without an undo: the engine waits for the event instead
/// of executing anything, and there is nothing to compensate.
pub(crate) struct NoUndo;

#[async_trait]
impl ErasedStep for NoUndo {
    fn check_input(&self, _: &Value) -> Result<(), String> {
        Ok(())
    }

    async fn execute(&self, _: StepContext) -> Result<Value, StepError> {
        // The driver waits for an await step's event; it never executes its code.
        Err(StepError::rejected("an await step has nothing to execute"))
    }

    async fn compensate(&self, _: StepContext, _: Option<Value>) -> Result<(), StepError> {
        Ok(())
    }
}

/// A compensatable step.
pub(crate) struct Undoable<S>(pub(crate) S);

fn decode<T: DeserializeOwned>(what: &str, v: &Value) -> Result<T, String> {
    serde_json::from_value(v.clone()).map_err(|e| {
        format!(
            "{what} does not decode as {}: {e}",
            std::any::type_name::<T>()
        )
    })
}

async fn execute_erased<S: Step>(step: &S, ctx: StepContext) -> Result<Value, StepError> {
    // An input that does not decode never reached the service.
    let input = decode::<S::Input>("saga input", &ctx.input).map_err(StepError::rejected)?;
    let out = step.execute(&ctx, input).await?;
    // Serialized within the deepest nesting a record can be read back with, so a hostile
    // output cannot overflow the stack here; the engine applies its own (smaller or
    // equal) limits afterwards. The action did run: an output that cannot be recorded
    // leaves its effect unknown.
    crate::payload::to_value(&out, usize::MAX, crate::payload::MAX_PAYLOAD_DEPTH)
        .map(|(v, _)| v)
        .map_err(|e| match e {
            crate::payload::Refused::Limit(_) => StepError::unknown(format!(
                "step output nests deeper than {} levels",
                crate::payload::MAX_PAYLOAD_DEPTH
            )),
            crate::payload::Refused::Invalid(e) => {
                StepError::unknown(format!("step output does not serialize: {e}"))
            }
        })
}

#[async_trait]
impl<S: Step> ErasedStep for Forward<S> {
    fn check_input(&self, input: &Value) -> Result<(), String> {
        decode::<S::Input>("saga input", input).map(|_| ())
    }

    async fn execute(&self, ctx: StepContext) -> Result<Value, StepError> {
        execute_erased(&self.0, ctx).await
    }

    async fn compensate(&self, ctx: StepContext, _: Option<Value>) -> Result<(), StepError> {
        // `decide` never compensates a pivot or retriable step; this answers a bug
        // rather than panicking on it.
        Err(StepError::rejected(format!(
            "step `{}` is not compensatable",
            ctx.step_name()
        )))
    }
}

#[async_trait]
impl<S: Compensate> ErasedStep for Undoable<S> {
    fn check_input(&self, input: &Value) -> Result<(), String> {
        decode::<S::Input>("saga input", input).map(|_| ())
    }

    async fn execute(&self, ctx: StepContext) -> Result<Value, StepError> {
        execute_erased(&self.0, ctx).await
    }

    async fn compensate(&self, ctx: StepContext, output: Option<Value>) -> Result<(), StepError> {
        let input = decode::<S::Input>("saga input", &ctx.input).map_err(StepError::rejected)?;
        let output = match output {
            None => None,
            Some(v) => {
                Some(decode::<S::Output>("recorded output", &v).map_err(StepError::rejected)?)
            }
        };
        self.0.compensate(&ctx, input, output).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Fails to compile if `ErasedStep` stops being object safe.
    fn _object_safe(_: &dyn ErasedStep) {}

    #[test]
    fn step_error_messages_are_lowercase_and_typed() {
        assert_eq!(
            StepError::rejected("card declined").to_string(),
            "rejected: card declined"
        );
        assert_eq!(StepError::retryable("x").retry_after_hint(), None);
    }
}
