//! Reconcile hooks: how a step's external system is asked for its view of a finished
//! step, so that the engine can check its logs against the systems it called.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::definition::StepContext;
use crate::ids::{IdempotencyKey, SagaId};
use crate::machine::{DriftKind, Expected, SagaStatus};

/// What a reconcile hook is asked about: one step of a finished saga, and what its log
/// says the system it called should hold.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Finished {
    /// The saga.
    pub saga: SagaId,
    /// Its definition's name.
    pub definition: String,
    /// Its definition's version.
    pub version: u32,
    /// How it ended.
    pub status: SagaStatus,
    /// The step's name.
    pub step: String,
    /// What the log says the system should hold for the step's key.
    pub expected: Expected,
    /// The key the action was (or would have been) called with: what to look up.
    pub key: IdempotencyKey,
    /// The key its compensation was called with.
    pub compensation_key: IdempotencyKey,
    /// The saga's input.
    pub input: Arc<Value>,
    /// The step's recorded output, if it succeeded.
    pub output: Option<Value>,
    /// Every recorded output of the saga, by step name.
    pub outputs: Arc<BTreeMap<String, Value>>,
}

impl Finished {
    /// The usual judgement of a lookup by key, for a system where a record in force is
    /// the step's effect: `found` is that record (`None`: nothing in force for the key),
    /// and `differs` says how it differs from what the log holds, if it does.
    ///
    /// | expected | nothing in force | a record in force |
    /// | --- | --- | --- |
    /// | present | missing | matches, or different |
    /// | undone, absent | matches | unexpected |
    ///
    /// ```
    /// use sagaflow::definition::{Finished, Verdict};
    /// use sagaflow::machine::{DriftKind, Expected};
    /// # use sagaflow::{IdempotencyKey, Phase, SagaId, SagaStatus};
    /// # let saga: SagaId = "0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071".parse()?;
    /// # let f = Finished::for_test(saga, "charge", Expected::Present, Some(serde_json::json!({"cents": 500})));
    /// let charged = Some(400_u64);
    /// let verdict = f.judge(charged, |cents| {
    ///     (*cents != 500).then(|| format!("charged {cents} cents, the log says 500"))
    /// });
    /// assert_eq!(verdict.kind(), Some(DriftKind::Different));
    /// assert_eq!(f.judge(None::<u64>, |_| None).kind(), Some(DriftKind::Missing));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn judge<T>(
        &self,
        found: Option<T>,
        differs: impl FnOnce(&T) -> Option<String>,
    ) -> Verdict {
        match (self.expected, found) {
            (Expected::Present, None) => {
                Verdict::missing(format!("no record in force for key {}", self.key))
            }
            (Expected::Present, Some(t)) => {
                differs(&t).map_or(Verdict::Matches, Verdict::different)
            }
            (_, None) => Verdict::Matches,
            (expected, Some(_)) => Verdict::unexpected(format!(
                "a record in force for key {}, where the log says {expected}",
                self.key
            )),
        }
    }

    /// A context for calling the step's system the way the step did: same saga, step,
    /// input, outputs and idempotency key (the action's), first attempt, no deadline.
    /// For a hook that goes through the same client code as the step (the steps
    /// toolkit's HTTP integrations take a [`StepContext`]).
    pub fn step_context(&self) -> StepContext {
        StepContext {
            saga_id: self.saga,
            step: Arc::from(self.step.as_str()),
            phase: crate::Phase::Action,
            attempt: crate::Attempt::FIRST,
            key: self.key.clone(),
            deadline: crate::Timestamp::from_millis(u64::MAX),
            input: self.input.clone(),
            outputs: Some(self.outputs.clone()),
        }
    }

    /// A description of a step for a hook's own tests.
    ///
    /// ```
    /// use sagaflow::definition::Finished;
    /// use sagaflow::machine::Expected;
    /// use sagaflow::SagaId;
    ///
    /// let saga: SagaId = "0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071".parse()?;
    /// let f = Finished::for_test(saga, "charge", Expected::Undone, None);
    /// assert!(f.key.as_str().ends_with("/charge/action"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn for_test(saga: SagaId, step: &str, expected: Expected, output: Option<Value>) -> Self {
        Finished {
            saga,
            definition: "test".into(),
            version: 1,
            status: match expected {
                Expected::Present => SagaStatus::Completed,
                _ => SagaStatus::Compensated,
            },
            step: step.to_string(),
            expected,
            key: IdempotencyKey::derive(saga, step, crate::Phase::Action),
            compensation_key: IdempotencyKey::derive(saga, step, crate::Phase::Compensation),
            input: Arc::new(Value::Null),
            output,
            outputs: Arc::new(BTreeMap::new()),
        }
    }
}

/// A reconcile hook's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The system agrees with the log.
    Matches,
    /// It does not, or it could not be asked ([`DriftKind::Unknown`]).
    Drift {
        /// How.
        kind: DriftKind,
        /// What was found, for an operator (bounded when it is recorded).
        detail: String,
    },
}

impl Verdict {
    /// The log says the effect stands; the system has no record of it.
    pub fn missing(detail: impl fmt::Display) -> Self {
        Verdict::drift(DriftKind::Missing, detail)
    }

    /// The log says there is no effect; the system holds one in force.
    pub fn unexpected(detail: impl fmt::Display) -> Self {
        Verdict::drift(DriftKind::Unexpected, detail)
    }

    /// Both have it, but it differs.
    pub fn different(detail: impl fmt::Display) -> Self {
        Verdict::drift(DriftKind::Different, detail)
    }

    /// The system could not be asked (the reconciler asks again before recording it).
    pub fn unknown(detail: impl fmt::Display) -> Self {
        Verdict::drift(DriftKind::Unknown, detail)
    }

    /// A drift of `kind`.
    pub fn drift(kind: DriftKind, detail: impl fmt::Display) -> Self {
        Verdict::Drift {
            kind,
            detail: detail.to_string(),
        }
    }

    /// The drift's kind; `None` for [`Verdict::Matches`].
    pub fn kind(&self) -> Option<DriftKind> {
        match self {
            Verdict::Matches => None,
            Verdict::Drift { kind, .. } => Some(*kind),
        }
    }
}

/// Asks the system a step called for its view of one finished step, by key.
///
/// Registered per step with [`crate::SagaDefinitionBuilder::reconcile`], under the name
/// of an integration: the reconciler paces the lookups of each integration by its own
/// limit ([`crate::ReconcileOptions::limit`]). A hook never fails: a system that cannot
/// be asked is [`Verdict::unknown`].
///
/// ```
/// use sagaflow::definition::{Finished, Reconcile, Verdict};
///
/// struct Payments; // a client of the payment provider
/// #[sagaflow::async_trait]
/// impl Reconcile for Payments {
///     async fn reconcile(&self, step: &Finished) -> Verdict {
///         // let charge = self.client.charge_by_key(step.key.as_str()).await;
///         let charge: Option<u64> = None;
///         step.judge(charge, |_| None)
///     }
/// }
/// ```
#[async_trait]
pub trait Reconcile: Send + Sync + 'static {
    /// The system's view of `step`, judged against what the log expects.
    async fn reconcile(&self, step: &Finished) -> Verdict;
}

/// A step's hook and the integration it belongs to.
#[derive(Clone)]
pub(crate) struct Checker {
    pub(crate) integration: Arc<str>,
    pub(crate) hook: Arc<dyn Reconcile>,
}

impl fmt::Debug for Checker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checker")
            .field("integration", &self.integration)
            .finish_non_exhaustive()
    }
}
