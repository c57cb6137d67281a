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
/// ```
/// use std::time::Duration;
/// use sagaflow::StepError;
///
/// let e = StepError::retry_after(Duration::from_secs(2), "429 from inventory");
/// assert!(e.is_retryable());
/// assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(2)));
/// assert!(!StepError::permanent("card declined").is_retryable());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// A transient failure: try again after the policy's backoff.
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
    /// A failure that another attempt will not fix (a declined card, a 4xx): the saga
    /// compensates (before the pivot) or parks (after it).
    #[error("permanent: {message}")]
    Permanent {
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

    /// A failure that retrying will not fix.
    pub fn permanent(message: impl fmt::Display) -> Self {
        StepError::Permanent {
            message: message.to_string(),
        }
    }

    /// Whether the engine may try again.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, StepError::Permanent { .. })
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
            | StepError::Permanent { message } => message,
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
    /// A permanent [`StepError`] if the output does not decode as `T`.
    pub fn output_of<T: DeserializeOwned>(&self, step: &str) -> Result<Option<T>, StepError> {
        match self.outputs.as_ref().and_then(|o| o.get(step)) {
            None => Ok(None),
            Some(v) => T::deserialize(v).map(Some).map_err(|e| {
                StepError::permanent(format!(
                    "output of step `{step}` does not decode as {}: {e}",
                    std::any::type_name::<T>()
                ))
            }),
        }
    }
}

/// One step of a saga, written by the user: a forward action and its compensation.
///
/// `Input` is decoded from the saga's input (each step may take its own view of it);
/// `Output` is recorded in the log and handed to the compensation and to later steps.
/// Both methods must be safe to repeat with the same [`StepContext::idempotency_key`]:
/// the engine runs them at least once, and the key makes the effect exactly-once.
///
/// ```
/// use async_trait::async_trait;
/// use sagaflow::{Step, StepContext, StepError};
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
///         // A real step sends ctx.idempotency_key() to the payment provider.
///         Ok(Charge { charge_id: format!("ch_{}_{}", ctx.idempotency_key(), order.cents) })
///     }
///
///     async fn compensate(
///         &self,
///         _ctx: &StepContext,
///         _order: Order,
///         charge: Option<Charge>,
///     ) -> Result<(), StepError> {
///         // `None`: the charge may or may not have happened; refund by key.
///         let _ = charge;
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

    /// Undo the action. `output` is the recorded output if the action succeeded, `None`
    /// if it failed or was interrupted (it may still have taken effect: undo by key).
    ///
    /// The default refuses permanently, which parks a saga that needed it: a
    /// compensatable step must say how it is undone. Pivot and retriable steps are never
    /// compensated and can keep the default.
    async fn compensate(
        &self,
        ctx: &StepContext,
        input: Self::Input,
        output: Option<Self::Output>,
    ) -> Result<(), StepError> {
        let _ = (input, output);
        Err(StepError::permanent(format!(
            "step `{}` has no compensation",
            ctx.step_name()
        )))
    }
}

/// The object-safe form of [`Step`] that the engine stores: JSON in, JSON out.
#[async_trait]
pub(crate) trait ErasedStep: Send + Sync {
    fn check_input(&self, input: &Value) -> Result<(), String>;
    async fn execute(&self, ctx: StepContext) -> Result<Value, StepError>;
    async fn compensate(&self, ctx: StepContext, output: Option<Value>) -> Result<(), StepError>;
}

pub(crate) struct Erased<S>(pub(crate) S);

fn decode<T: DeserializeOwned>(what: &str, v: &Value) -> Result<T, String> {
    serde_json::from_value(v.clone()).map_err(|e| {
        format!(
            "{what} does not decode as {}: {e}",
            std::any::type_name::<T>()
        )
    })
}

#[async_trait]
impl<S: Step> ErasedStep for Erased<S> {
    fn check_input(&self, input: &Value) -> Result<(), String> {
        decode::<S::Input>("saga input", input).map(|_| ())
    }

    async fn execute(&self, ctx: StepContext) -> Result<Value, StepError> {
        let input = decode::<S::Input>("saga input", &ctx.input).map_err(StepError::permanent)?;
        let out = self.0.execute(&ctx, input).await?;
        // Serialized within the deepest nesting a record can be read back with, so a
        // hostile output cannot overflow the stack here; the engine applies its own
        // (smaller or equal) limits afterwards.
        crate::payload::to_value(&out, usize::MAX, crate::payload::MAX_PAYLOAD_DEPTH)
            .map(|(v, _)| v)
            .map_err(|e| match e {
                crate::payload::Refused::Limit(_) => StepError::permanent(format!(
                    "step output nests deeper than {} levels",
                    crate::payload::MAX_PAYLOAD_DEPTH
                )),
                crate::payload::Refused::Invalid(e) => {
                    StepError::permanent(format!("step output does not serialize: {e}"))
                }
            })
    }

    async fn compensate(&self, ctx: StepContext, output: Option<Value>) -> Result<(), StepError> {
        let input = decode::<S::Input>("saga input", &ctx.input).map_err(StepError::permanent)?;
        let output = match output {
            None => None,
            Some(v) => {
                Some(decode::<S::Output>("recorded output", &v).map_err(StepError::permanent)?)
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
            StepError::permanent("card declined").to_string(),
            "permanent: card declined"
        );
        assert_eq!(StepError::retryable("x").retry_after_hint(), None);
    }
}
