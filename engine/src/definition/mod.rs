//! Saga definitions: a name, a version and steps in order.
//!
//! A definition is built once, validated, and registered with the engine before it
//! starts. Sagas already on disk find their definition again by name and version; the
//! step names are recorded in each saga's first log record, so a definition that changed
//! under the same version is caught at recovery instead of being run against a log it
//! does not match.

mod await_event;
mod reconcile;
mod retry;
mod step;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use await_event::{Await, KeyFn, OnTimeout};
pub(crate) use reconcile::Checker;
pub use reconcile::{Finished, Reconcile, Verdict};
pub use retry::RetryPolicy;
pub(crate) use step::ErasedStep;
pub use step::{Compensate, Step, StepContext, StepError};
use step::{Forward, Undoable};

/// The longest step or definition name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Errors from building a definition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The definition has no steps.
    #[error("saga `{0}` has no steps")]
    Empty(String),
    /// Two steps share a name; names key the log and the idempotency keys.
    #[error("saga `{saga}` has two steps named `{step}`")]
    DuplicateStep {
        /// The definition.
        saga: String,
        /// The repeated name.
        step: String,
    },
    /// A name is empty, too long, or has characters outside `[A-Za-z0-9_.-]`.
    #[error("invalid name `{0}`: use 1 to 64 characters from A-Z, a-z, 0-9, `_`, `.`, `-`")]
    InvalidName(String),
    /// A step option was set before any step was added (options apply to the step
    /// added last).
    #[error("saga `{0}`: a step option was set before any step")]
    OptionWithoutStep(String),
    /// More than one pivot step.
    #[error("saga `{saga}` has a second pivot `{step}`; a saga has at most one")]
    SecondPivot {
        /// The definition.
        saga: String,
        /// The second pivot.
        step: String,
    },
    /// A parallel group has no steps.
    #[error("saga `{0}` has a parallel group without steps")]
    EmptyGroup(String),
    /// A pivot inside a parallel group: the point of no return is one step, so that
    /// everything before it can still be undone and nothing after it has to be.
    #[error("step `{step}` of saga `{saga}` is a pivot inside a parallel group")]
    PivotInGroup {
        /// The definition.
        saga: String,
        /// The pivot.
        step: String,
    },
    /// A step's kind does not fit its place: compensatable steps come before the
    /// pivot, retriable steps after it.
    #[error("step `{step}` of saga `{saga}` is {kind} but {why}")]
    MisplacedStep {
        /// The definition.
        saga: String,
        /// The step.
        step: String,
        /// Its declared kind.
        kind: StepKind,
        /// Why it does not fit.
        why: &'static str,
    },
}

/// Where a step stands relative to the point of no return.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StepKind {
    /// Has an action and a compensation; before the pivot.
    Compensatable,
    /// The point of no return: once it succeeds the saga must complete forward. If it
    /// fails, the steps before it are compensated; it is never compensated itself.
    Pivot,
    /// After the pivot: retried until it succeeds (or an operator acts), never
    /// compensated.
    Retriable,
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StepKind::Compensatable => "compensatable",
            StepKind::Pivot => "a pivot",
            StepKind::Retriable => "retriable",
        })
    }
}

/// Whether a step's action is safe to run again after a crash left its outcome unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Idempotence {
    /// Running it again with the same idempotency key is safe (the default): an
    /// interrupted attempt is re-run (G4).
    #[default]
    Idempotent,
    /// It may have taken effect and must not run again: an interrupted attempt is
    /// treated as "may have happened" and compensated (or parks the saga if the step
    /// cannot be compensated).
    NotIdempotent,
}

/// Options of one step.
///
/// ```
/// use std::time::Duration;
/// use sagaflow::{Idempotence, RetryPolicy, StepOptions};
///
/// let opts = StepOptions::default()
///     .with_idempotence(Idempotence::NotIdempotent)
///     .with_retry(RetryPolicy::default().with_max_attempts(2))
///     .with_compensation_retry(RetryPolicy::compensation_default().with_attempt_timeout(Duration::from_secs(5)));
/// assert_eq!(opts.retry.max_attempts, Some(2));
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct StepOptions {
    /// Whether an interrupted attempt may be re-run.
    pub idempotence: Idempotence,
    /// Retry policy of the action. Unless set with [`StepOptions::with_retry`], a
    /// retriable step uses [`RetryPolicy::forever`] and other steps
    /// [`RetryPolicy::default`].
    pub retry: RetryPolicy,
    /// Retry policy of the compensation.
    pub compensation_retry: RetryPolicy,
    /// How many times in a row an attempt of this step (or its compensation) may be
    /// interrupted by a crash before the saga is parked with `crash_loop`: a step that
    /// kills its process must not crash-loop the engine forever. Interruptions never use
    /// up the retry budget (G4). Default 5.
    pub max_interruptions: u32,
    explicit_retry: bool,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            idempotence: Idempotence::default(),
            retry: RetryPolicy::default(),
            compensation_retry: RetryPolicy::compensation_default(),
            max_interruptions: 5,
            explicit_retry: false,
        }
    }
}

impl StepOptions {
    /// Sets [`StepOptions::idempotence`].
    pub fn with_idempotence(mut self, idempotence: Idempotence) -> Self {
        self.idempotence = idempotence;
        self
    }

    /// Sets the action's retry policy.
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self.explicit_retry = true;
        self
    }

    /// Sets the compensation's retry policy.
    pub fn with_compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = policy;
        self
    }

    /// Sets [`StepOptions::max_interruptions`] (at least 1).
    pub fn with_max_interruptions(mut self, n: u32) -> Self {
        self.max_interruptions = n.max(1);
        self
    }
}

/// One step of a definition: its name, kind, options and code.
pub(crate) struct StepDef {
    pub(crate) name: Arc<str>,
    /// The stage the step belongs to: steps of one stage (a parallel group) run
    /// concurrently; stages run one after another.
    pub(crate) stage: u32,
    pub(crate) kind: StepKind,
    /// For an await step: how it finds its event.
    pub(crate) awaits: Option<Await>,
    pub(crate) options: StepOptions,
    pub(crate) code: Arc<dyn ErasedStep>,
    /// How the reconciler asks the system the step calls for its view, if it can.
    pub(crate) reconcile: Option<Checker>,
}

impl fmt::Debug for StepDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepDef")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("stage", &self.stage)
            .field("awaits", &self.awaits)
            .field("options", &self.options)
            .field("reconcile", &self.reconcile)
            .finish_non_exhaustive()
    }
}

/// A validated saga definition.
///
/// ```
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use sagaflow::{Compensate, RetryPolicy, SagaDefinition, Step, StepContext, StepError};
///
/// struct Noop;
/// #[async_trait]
/// impl Step for Noop {
///     type Input = serde_json::Value;
///     type Output = ();
///     async fn execute(&self, _: &StepContext, _: serde_json::Value) -> Result<(), StepError> { Ok(()) }
/// }
/// #[async_trait]
/// impl Compensate for Noop {
///     async fn compensate(&self, _: &StepContext, _: serde_json::Value, _: Option<()>) -> Result<(), StepError> { Ok(()) }
/// }
///
/// let def = SagaDefinition::builder("checkout", 1)
///     .step("charge", Noop)                        // compensatable: needs `Compensate`
///     .not_idempotent()                            // options apply to the step added last
///     .timeout(Duration::from_secs(10))
///     .step("reserve", Noop)
///     .retry(RetryPolicy::default().with_max_attempts(5))
///     .pivot("create_order", Noop)                 // pivot and retriable: `Step` alone
///     .retriable("send_email", Noop)
///     .build()?;
/// assert_eq!(def.step_names().collect::<Vec<_>>(), ["charge", "reserve", "create_order", "send_email"]);
///
/// // Duplicate names are refused.
/// assert!(SagaDefinition::builder("checkout", 1).step("a", Noop).step("a", Noop).build().is_err());
/// # Ok::<(), sagaflow::definition::Error>(())
/// ```
#[derive(Debug)]
pub struct SagaDefinition {
    name: String,
    version: u32,
    steps: Vec<StepDef>,
    deadline: Option<Duration>,
    retention: Retention,
}

/// How long a finished saga (completed, compensated, cancelled or resolved) is kept
/// before the engine deletes it. Parked sagas are never deleted automatically.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Retention {
    /// Deleted once this long has passed since it finished.
    For(Duration),
    /// Never deleted.
    Forever,
}

impl Default for Retention {
    /// Seven days.
    fn default() -> Self {
        Retention::For(Duration::from_secs(7 * 24 * 3600))
    }
}

impl SagaDefinition {
    /// Starts a definition named `name` at `version`.
    pub fn builder(name: impl Into<String>, version: u32) -> SagaDefinitionBuilder {
        SagaDefinitionBuilder {
            name: name.into(),
            version,
            steps: Vec::new(),
            error: None,
            deadline: None,
            retention: Retention::default(),
            group: None,
            stages: 0,
        }
    }

    /// The definition's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The definition's version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The total deadline of a saga of this definition, counted from when it begins,
    /// if it has one.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// How long a finished saga of this definition is kept.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// The step kinds, in order.
    pub fn step_kinds(&self) -> impl Iterator<Item = StepKind> + '_ {
        self.steps.iter().map(|s| s.kind)
    }

    /// The step names, in order.
    pub fn step_names(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().map(|s| &*s.name)
    }

    /// The stage of each step, in step order: steps of one parallel group share a
    /// stage; a step outside any group has a stage of its own. Stages count from 0.
    ///
    /// ```
    /// # use sagaflow::{SagaDefinition, StepContext, StepError, Step, Compensate};
    /// # struct Noop;
    /// # #[async_trait::async_trait]
    /// # impl Step for Noop {
    /// #     type Input = serde_json::Value;
    /// #     type Output = ();
    /// #     async fn execute(&self, _: &StepContext, _: serde_json::Value) -> Result<(), StepError> { Ok(()) }
    /// # }
    /// # #[async_trait::async_trait]
    /// # impl Compensate for Noop {
    /// #     async fn compensate(&self, _: &StepContext, _: serde_json::Value, _: Option<()>) -> Result<(), StepError> { Ok(()) }
    /// # }
    /// let def = SagaDefinition::builder("order", 1)
    ///     .step("charge", Noop)
    ///     .parallel(|g| g.step("reserve_stock", Noop).step("hold_courier_slot", Noop))
    ///     .pivot("create_order", Noop)
    ///     .build()?;
    /// assert_eq!(def.step_stages().collect::<Vec<_>>(), [0, 1, 1, 2]);
    /// assert!(def.has_groups());
    /// # Ok::<(), sagaflow::definition::Error>(())
    /// ```
    pub fn step_stages(&self) -> impl Iterator<Item = u32> + '_ {
        self.steps.iter().map(|s| s.stage)
    }

    /// Whether some stage is a parallel group of more than one step (a group of one
    /// behaves as a plain step, and is recorded as one).
    pub fn has_groups(&self) -> bool {
        self.steps
            .iter()
            .enumerate()
            .any(|(i, s)| usize::try_from(s.stage).ok() != Some(i))
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Always false: a built definition has at least one step.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The kind of step `index`, if there is one.
    pub fn step_kind(&self, index: usize) -> Option<StepKind> {
        self.steps.get(index).map(|s| s.kind)
    }

    /// Whether step `index` is an await step.
    pub fn is_await(&self, index: usize) -> bool {
        self.steps.get(index).is_some_and(|s| s.awaits.is_some())
    }

    pub(crate) fn step(&self, index: usize) -> Option<&StepDef> {
        self.steps.get(index)
    }

    pub(crate) fn steps(&self) -> &[StepDef] {
        &self.steps
    }
}

/// Builds a [`SagaDefinition`]; see there for an example.
///
/// Steps are added in order; the option methods ([`SagaDefinitionBuilder::retry`],
/// [`SagaDefinitionBuilder::not_idempotent`], ...) apply to the step added last.
#[derive(Debug)]
pub struct SagaDefinitionBuilder {
    name: String,
    version: u32,
    steps: Vec<StepDef>,
    error: Option<Error>,
    deadline: Option<Duration>,
    retention: Retention,
    /// The stage of the parallel group being built, while one is.
    group: Option<u32>,
    /// Stages so far.
    stages: u32,
}

impl SagaDefinitionBuilder {
    /// Adds a compensatable step (before the pivot): it must say how it is undone.
    pub fn step(self, name: impl Into<String>, step: impl Compensate) -> Self {
        self.push(
            name,
            StepKind::Compensatable,
            Arc::new(Undoable(step)),
            StepOptions::default(),
        )
    }

    /// Adds the pivot step, the point of no return: never compensated.
    pub fn pivot(self, name: impl Into<String>, step: impl Step) -> Self {
        self.push(
            name,
            StepKind::Pivot,
            Arc::new(Forward(step)),
            StepOptions::default(),
        )
    }

    /// Adds a retriable step (after the pivot): never compensated, and retried without
    /// limit unless [`SagaDefinitionBuilder::retry`] says otherwise.
    pub fn retriable(self, name: impl Into<String>, step: impl Step) -> Self {
        self.push(
            name,
            StepKind::Retriable,
            Arc::new(Forward(step)),
            StepOptions::default(),
        )
    }

    /// Adds a step whose kind is chosen at run time, with `options`. The step must be
    /// able to compensate, since `kind` may be compensatable; prefer
    /// [`SagaDefinitionBuilder::step`], [`SagaDefinitionBuilder::pivot`] and
    /// [`SagaDefinitionBuilder::retriable`], which check that in the types.
    pub fn step_with(
        self,
        name: impl Into<String>,
        kind: StepKind,
        step: impl Compensate,
        options: StepOptions,
    ) -> Self {
        self.push(name, kind, Arc::new(Undoable(step)), options)
    }

    fn push(
        mut self,
        name: impl Into<String>,
        kind: StepKind,
        code: Arc<dyn ErasedStep>,
        mut options: StepOptions,
    ) -> Self {
        if kind == StepKind::Retriable && !options.explicit_retry {
            options.retry = RetryPolicy::forever();
        }
        let name: Arc<str> = Arc::from(name.into());
        let stage = match self.group {
            Some(stage) => {
                if kind == StepKind::Pivot {
                    self.error.get_or_insert_with(|| Error::PivotInGroup {
                        saga: self.name.clone(),
                        step: name.to_string(),
                    });
                }
                stage
            }
            None => {
                let stage = self.stages;
                self.stages = self.stages.saturating_add(1);
                stage
            }
        };
        self.steps.push(StepDef {
            name,
            stage,
            kind,
            awaits: None,
            options,
            code,
            reconcile: None,
        });
        self
    }

    /// Adds an await step: it waits for the event addressed to its saga by the
    /// correlation key `spec` derives, until `spec`'s deadline; the event's payload
    /// becomes its output. Before the pivot it is compensatable (by
    /// [`Await::compensate_with`], or by nothing if it has no undo); after it, retriable
    /// in kind, but a timeout is never retried: it parks the saga.
    ///
    /// Events are delivered with [`crate::Engine::deliver`]; one that arrives before
    /// the saga reaches the step waits for it.
    pub fn await_event(self, name: impl Into<String>, spec: Await) -> Self {
        let past_pivot = self.steps.iter().any(|s| s.kind == StepKind::Pivot);
        let kind = if past_pivot {
            StepKind::Retriable
        } else {
            StepKind::Compensatable
        };
        let code: Arc<dyn ErasedStep> = match &spec.compensation {
            Some(c) => c.clone(),
            None => Arc::new(step::NoUndo),
        };
        // One attempt: a wait that timed out is not waited again. A crash is not an
        // attempt, and a long wait may see many: only a loop of them parks.
        let options = StepOptions::default()
            .with_retry(
                RetryPolicy::default()
                    .with_max_attempts(1)
                    .with_attempt_timeout(spec.within),
            )
            .with_max_interruptions(1000);
        let mut this = self.push(name, kind, code, options);
        if let Some(last) = this.steps.last_mut() {
            last.awaits = Some(spec);
        }
        this
    }

    /// Adds a parallel group: the steps `build` adds run concurrently, each with its
    /// own retry policy, timeout and idempotency key, and the group ends when every one
    /// of them has succeeded; later steps see every branch's output. If a branch fails
    /// for good, no new attempt starts, the branches in flight settle, and the saga
    /// compensates the branches that may have taken effect (concurrently), then the
    /// earlier stages in reverse order.
    ///
    /// A group holds compensatable steps (before the pivot) or retriable ones (after
    /// it), never the pivot. See [`SagaDefinition::step_stages`] for an example.
    pub fn parallel(mut self, build: impl FnOnce(GroupBuilder) -> GroupBuilder) -> Self {
        let stage = self.stages;
        self.stages = self.stages.saturating_add(1);
        self.group = Some(stage);
        let before = self.steps.len();
        let mut this = build(GroupBuilder {
            inner: self,
            first: before,
        })
        .inner;
        this.group = None;
        if this.steps.len() == before {
            this.error
                .get_or_insert_with(|| Error::EmptyGroup(this.name.clone()));
        }
        this
    }

    /// Changes the options of the step added last.
    fn last(mut self, change: impl FnOnce(&mut StepOptions)) -> Self {
        match self.steps.last_mut() {
            Some(s) => change(&mut s.options),
            None => {
                self.error
                    .get_or_insert_with(|| Error::OptionWithoutStep(self.name.clone()));
            }
        }
        self
    }

    /// Replaces the options of the step added last.
    pub fn options(self, options: StepOptions) -> Self {
        self.last(|o| *o = options)
    }

    /// Sets the action's retry policy of the step added last.
    pub fn retry(self, policy: RetryPolicy) -> Self {
        self.last(|o| {
            o.retry = policy;
            o.explicit_retry = true;
        })
    }

    /// Sets the compensation's retry policy of the step added last.
    pub fn compensation_retry(self, policy: RetryPolicy) -> Self {
        self.last(|o| o.compensation_retry = policy)
    }

    /// Sets the per-attempt timeout of the step added last (action and compensation).
    pub fn timeout(self, timeout: Duration) -> Self {
        self.last(|o| {
            o.retry.attempt_timeout = timeout;
            o.compensation_retry.attempt_timeout = timeout;
        })
    }

    /// Marks the step added last as not idempotent: it must not run twice, so an
    /// attempt whose outcome is unknown is never retried (G4).
    pub fn not_idempotent(self) -> Self {
        self.last(|o| o.idempotence = Idempotence::NotIdempotent)
    }

    /// Gives every saga of this definition a total deadline, counted from when it
    /// begins (a start may set its own): when it passes, the saga is cancelled, or
    /// parked if its pivot has started.
    pub fn deadline(mut self, total: Duration) -> Self {
        self.deadline = Some(total);
        self
    }

    /// Sets how long finished sagas of this definition are kept (default 7 days).
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Sets [`StepOptions::max_interruptions`] of the step added last.
    pub fn max_interruptions(self, n: u32) -> Self {
        self.last(|o| o.max_interruptions = n.max(1))
    }

    /// Gives the step added last a reconcile hook: once a saga has finished, the
    /// reconciler (see [`crate::ReconcileOptions`]) asks `hook` whether the system the
    /// step called agrees with the log. `integration` names that system: lookups are
    /// paced per integration.
    pub fn reconcile(mut self, integration: impl Into<String>, hook: impl Reconcile) -> Self {
        let checker = Checker {
            integration: Arc::from(integration.into()),
            hook: Arc::new(hook),
        };
        match self.steps.last_mut() {
            Some(s) => s.reconcile = Some(checker),
            None => {
                self.error
                    .get_or_insert_with(|| Error::OptionWithoutStep(self.name.clone()));
            }
        }
        self
    }

    /// Validates and returns the definition.
    ///
    /// # Errors
    ///
    /// [`Error`] if the saga is empty, a name is invalid or repeated, there are two
    /// pivots, a compensatable step follows the pivot or a retriable step precedes it,
    /// or an option was set before any step.
    pub fn build(self) -> Result<SagaDefinition, Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        check_name(&self.name)?;
        if self.steps.is_empty() {
            return Err(Error::Empty(self.name));
        }
        let mut seen = HashSet::new();
        let mut pivot_seen = false;
        for s in &self.steps {
            check_name(&s.name)?;
            if !seen.insert(s.name.clone()) {
                return Err(Error::DuplicateStep {
                    saga: self.name.clone(),
                    step: s.name.to_string(),
                });
            }
            let misplaced = |why| Error::MisplacedStep {
                saga: self.name.clone(),
                step: s.name.to_string(),
                kind: s.kind,
                why,
            };
            match s.kind {
                StepKind::Pivot if pivot_seen => {
                    return Err(Error::SecondPivot {
                        saga: self.name.clone(),
                        step: s.name.to_string(),
                    })
                }
                StepKind::Pivot => pivot_seen = true,
                StepKind::Compensatable if pivot_seen => {
                    return Err(misplaced("follows the pivot"))
                }
                StepKind::Retriable if !pivot_seen => {
                    return Err(misplaced("no pivot precedes it"))
                }
                _ => {}
            }
        }
        Ok(SagaDefinition {
            name: self.name,
            version: self.version,
            steps: self.steps,
            deadline: self.deadline,
            retention: self.retention,
        })
    }
}

/// Builds the branches of a parallel group; see [`SagaDefinitionBuilder::parallel`].
///
/// The option methods apply to the branch added last, as on the definition's builder.
#[derive(Debug)]
pub struct GroupBuilder {
    inner: SagaDefinitionBuilder,
    /// The index the group's first branch gets.
    first: usize,
}

impl GroupBuilder {
    fn with(mut self, change: impl FnOnce(SagaDefinitionBuilder) -> SagaDefinitionBuilder) -> Self {
        self.inner = change(self.inner);
        self
    }

    /// Changes the options of the branch added last: an option before the group's
    /// first branch is an error, not a change to the step before the group.
    fn option(
        mut self,
        change: impl FnOnce(SagaDefinitionBuilder) -> SagaDefinitionBuilder,
    ) -> Self {
        if self.inner.steps.len() == self.first {
            let name = self.inner.name.clone();
            self.inner
                .error
                .get_or_insert(Error::OptionWithoutStep(name));
            return self;
        }
        self.with(change)
    }

    /// Adds a compensatable branch.
    pub fn step(self, name: impl Into<String>, step: impl Compensate) -> Self {
        self.with(|b| b.step(name, step))
    }

    /// Adds an await branch: see [`SagaDefinitionBuilder::await_event`].
    pub fn await_event(self, name: impl Into<String>, spec: Await) -> Self {
        self.with(|b| b.await_event(name, spec))
    }

    /// Adds a retriable branch (a group after the pivot).
    pub fn retriable(self, name: impl Into<String>, step: impl Step) -> Self {
        self.with(|b| b.retriable(name, step))
    }

    /// Adds a branch whose kind is chosen at run time (never a pivot).
    pub fn step_with(
        self,
        name: impl Into<String>,
        kind: StepKind,
        step: impl Compensate,
        options: StepOptions,
    ) -> Self {
        self.with(|b| b.step_with(name, kind, step, options))
    }

    /// Replaces the options of the branch added last.
    pub fn options(self, options: StepOptions) -> Self {
        self.option(|b| b.options(options))
    }

    /// Sets the action's retry policy of the branch added last.
    pub fn retry(self, policy: RetryPolicy) -> Self {
        self.option(|b| b.retry(policy))
    }

    /// Sets the compensation's retry policy of the branch added last.
    pub fn compensation_retry(self, policy: RetryPolicy) -> Self {
        self.option(|b| b.compensation_retry(policy))
    }

    /// Sets the per-attempt timeout of the branch added last.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.option(|b| b.timeout(timeout))
    }

    /// Marks the branch added last as not idempotent.
    pub fn not_idempotent(self) -> Self {
        self.option(|b| b.not_idempotent())
    }

    /// Sets [`StepOptions::max_interruptions`] of the branch added last.
    pub fn max_interruptions(self, n: u32) -> Self {
        self.option(|b| b.max_interruptions(n))
    }

    /// Gives the branch added last a reconcile hook: see
    /// [`SagaDefinitionBuilder::reconcile`].
    pub fn reconcile(self, integration: impl Into<String>, hook: impl Reconcile) -> Self {
        self.option(|b| b.reconcile(integration, hook))
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use async_trait::async_trait;

    pub(crate) struct Noop;

    #[async_trait]
    impl Step for Noop {
        type Input = serde_json::Value;
        type Output = ();
        async fn execute(&self, _: &StepContext, _: Self::Input) -> Result<(), StepError> {
            Ok(())
        }
    }

    #[async_trait]
    impl Compensate for Noop {
        async fn compensate(
            &self,
            _: &StepContext,
            _: Self::Input,
            _: Option<()>,
        ) -> Result<(), StepError> {
            Ok(())
        }
    }

    #[test]
    fn options_chain_onto_the_step_added_last() {
        let def = SagaDefinition::builder("s", 1)
            .step("a", Noop)
            .not_idempotent()
            .max_interruptions(2)
            .step("b", Noop)
            .retry(RetryPolicy::default().with_max_attempts(7))
            .build()
            .unwrap();
        let a = &def.step(0).unwrap().options;
        let b = &def.step(1).unwrap().options;
        assert_eq!(a.idempotence, Idempotence::NotIdempotent);
        assert_eq!(a.max_interruptions, 2);
        assert_eq!(b.idempotence, Idempotence::Idempotent);
        assert_eq!(b.retry.max_attempts, Some(7));
        assert_eq!(
            SagaDefinition::builder("s", 1)
                .not_idempotent()
                .step("a", Noop)
                .build()
                .unwrap_err(),
            Error::OptionWithoutStep("s".into())
        );
    }

    #[test]
    fn rejects_empty_duplicate_and_misplaced() {
        assert_eq!(
            SagaDefinition::builder("s", 1).build().unwrap_err(),
            Error::Empty("s".into())
        );
        assert!(matches!(
            SagaDefinition::builder("s", 1)
                .step("a", Noop)
                .step("a", Noop)
                .build(),
            Err(Error::DuplicateStep { .. })
        ));
        assert!(matches!(
            SagaDefinition::builder("s", 1)
                .pivot("p", Noop)
                .pivot("q", Noop)
                .build(),
            Err(Error::SecondPivot { .. })
        ));
        assert!(matches!(
            SagaDefinition::builder("s", 1)
                .pivot("p", Noop)
                .step("a", Noop)
                .build(),
            Err(Error::MisplacedStep {
                kind: StepKind::Compensatable,
                ..
            })
        ));
        assert!(matches!(
            SagaDefinition::builder("s", 1).retriable("r", Noop).build(),
            Err(Error::MisplacedStep {
                kind: StepKind::Retriable,
                ..
            })
        ));
        assert!(matches!(
            SagaDefinition::builder("s", 1)
                .step("has space", Noop)
                .build(),
            Err(Error::InvalidName(_))
        ));
        assert!(matches!(
            SagaDefinition::builder("", 1).step("a", Noop).build(),
            Err(Error::InvalidName(_))
        ));
    }

    #[test]
    fn groups_are_validated() {
        let def = SagaDefinition::builder("s", 1)
            .step("a", Noop)
            .parallel(|g| {
                g.step("b", Noop)
                    .timeout(Duration::from_secs(3))
                    .step("c", Noop)
            })
            .pivot("p", Noop)
            .build()
            .unwrap();
        assert_eq!(def.step_stages().collect::<Vec<_>>(), [0, 1, 1, 2]);
        // Each branch has its own options.
        assert_eq!(
            def.step(1).unwrap().options.retry.attempt_timeout,
            Duration::from_secs(3)
        );
        assert_ne!(
            def.step(2).unwrap().options.retry.attempt_timeout,
            Duration::from_secs(3)
        );
        assert_eq!(
            SagaDefinition::builder("s", 1)
                .step("a", Noop)
                .parallel(|g| g)
                .build()
                .unwrap_err(),
            Error::EmptyGroup("s".into())
        );
        assert!(matches!(
            SagaDefinition::builder("s", 1)
                .parallel(|g| g.step("a", Noop).step_with(
                    "p",
                    StepKind::Pivot,
                    Noop,
                    StepOptions::default()
                ))
                .build(),
            Err(Error::PivotInGroup { .. })
        ));
        assert!(matches!(
            SagaDefinition::builder("s", 1)
                .step("a", Noop)
                .parallel(|g| g.step("b", Noop).step("a", Noop))
                .build(),
            Err(Error::DuplicateStep { .. })
        ));
        // An option before the group's first branch is not applied to the step before.
        assert_eq!(
            SagaDefinition::builder("s", 1)
                .step("a", Noop)
                .parallel(|g| g.not_idempotent().step("b", Noop))
                .build()
                .unwrap_err(),
            Error::OptionWithoutStep("s".into())
        );
        // A retriable group before the pivot is misplaced, as a retriable step is.
        assert!(matches!(
            SagaDefinition::builder("s", 1)
                .parallel(|g| g.retriable("r", Noop).retriable("q", Noop))
                .build(),
            Err(Error::MisplacedStep { .. })
        ));
        // A group of one is a plain step.
        let one = SagaDefinition::builder("s", 1)
            .parallel(|g| g.step("a", Noop))
            .step("b", Noop)
            .build()
            .unwrap();
        assert!(!one.has_groups());
    }

    #[test]
    fn retriable_steps_retry_forever_unless_told() {
        let def = SagaDefinition::builder("s", 1)
            .pivot("p", Noop)
            .retriable("r", Noop)
            .step_with(
                "r2",
                StepKind::Retriable,
                Noop,
                StepOptions::default().with_retry(RetryPolicy::default().with_max_attempts(3)),
            )
            .build()
            .unwrap();
        assert_eq!(def.step(1).unwrap().options.retry.max_attempts, None);
        assert_eq!(def.step(2).unwrap().options.retry.max_attempts, Some(3));
    }
}
