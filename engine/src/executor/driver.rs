//! Drives one saga: decide, record, sync, run the effect, record its result, repeat.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::clock::Timestamp;
use crate::definition::{ErasedStep, OnTimeout, SagaDefinition, StepContext, StepError};
use crate::error::{Error, Result};
use crate::executor::{inbox, lock, Asked, Inner, PendingRepair, RepairError, SagaOutcome};
use crate::ids::{Attempt, IdempotencyKey, Phase};
use crate::machine::{
    check_cancel, check_repair, decide, next_attempt_at, Decision, Event, FailureKind, Live,
    LogRecord, Progress, Refusal, Repair, SagaState,
};
use crate::store::{Fence, Lease, SagaMeta, Taken, Write};

/// Why an attempt failed, before it is written down.
struct Failure {
    kind: FailureKind,
    message: String,
    hint: Option<Duration>,
}

impl From<StepError> for Failure {
    fn from(e: StepError) -> Self {
        let kind = match &e {
            StepError::Retryable { .. } => FailureKind::Retryable,
            StepError::RetryAfter { .. } => FailureKind::RetryAfter,
            StepError::Rejected { .. } => FailureKind::Rejected,
            StepError::Unknown { .. } => FailureKind::Unknown,
        };
        Failure {
            kind,
            hint: e.retry_after_hint(),
            message: crate::payload::bound_message(e.message().to_string()),
        }
    }
}

type StepFuture<'a> =
    Pin<Box<dyn Future<Output = std::result::Result<Value, StepError>> + Send + 'a>>;

/// A step's future with its panics caught: a panic inside a step fails that attempt,
/// not the engine.
struct CatchPanic<'a>(tracing::instrument::Instrumented<StepFuture<'a>>);

impl Future for CatchPanic<'_> {
    type Output = std::result::Result<
        std::result::Result<Value, StepError>,
        Box<dyn std::any::Any + Send + 'static>,
    >;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The step's future is not used again after a panic (the attempt is over and
        // the future is dropped), so observing it after unwinding cannot happen.
        let fut = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(fut).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}

/// An attempt whose start is recorded, ready to run in its own task.
struct Launch {
    /// For an await step: the key it waits on (or why there is none), and what its
    /// timeout means.
    awaits: Option<(std::result::Result<String, String>, OnTimeout)>,
    /// For an await step: told when its wait is given up ([`Decision::Withdraw`]).
    withdrawn: Option<tokio::sync::watch::Receiver<bool>>,
    step: u32,
    phase: Phase,
    attempt: Attempt,
    name: Arc<str>,
    code: Arc<dyn ErasedStep>,
    ctx: StepContext,
    /// The action's output, for a compensation.
    output: Option<Value>,
    deadline: Timestamp,
    timeout: Duration,
    /// The `step` span of this half of the step: its attempts' span is a child of it.
    step_span: tracing::Span,
}

/// How an attempt ended, before it is written down.
struct Ended {
    /// An await step's wait given up because the engine stops: nothing is recorded (the
    /// wait goes on after a restart, with the same deadline).
    stopped: bool,
    /// For an await step whose event came: the delivery it takes.
    delivery: Option<Taken>,
    step: u32,
    phase: Phase,
    attempt: Attempt,
    name: Arc<str>,
    took: Duration,
    result: std::result::Result<Value, Failure>,
}

impl Launch {
    /// Runs the attempt to its end or its deadline.
    async fn run(self, inner: Arc<Inner>) -> Ended {
        if let Some((key, on_timeout)) = self.awaits.clone() {
            return self.wait(inner, key, on_timeout).await;
        }
        let Launch {
            awaits: _,
            withdrawn: _,
            step,
            phase,
            attempt,
            name,
            code,
            ctx,
            output,
            deadline,
            timeout,
            step_span,
        } = self;
        let span = tracing::info_span!(parent: &step_span, "attempt", step = %name, %phase, attempt = attempt.0);
        let fut: StepFuture<'_> = match phase {
            Phase::Action => code.execute(ctx),
            Phase::Compensation => {
                Box::pin(async move { code.compensate(ctx, output).await.map(|()| Value::Null) })
            }
        };
        let began = inner.clock.now();
        // `biased`, deadline first: once the deadline has passed the step is not polled
        // again, so it cannot start an effect late. A process that stalled past the
        // deadline (stopped, frozen, cut off) would otherwise resume inside the step and
        // call the service after other processes settled the attempt at its deadline and
        // perhaps undid it. A fixed order also keeps simulations reproducible (tokio's
        // default order is random).
        let result = tokio::select! {
            biased;
            () = inner.clock.sleep_until(deadline) => {
                Err(Failure { kind: FailureKind::Timeout, message: format!("attempt timed out after {timeout:?}"), hint: None })
            }
            done = CatchPanic(fut.instrument(span)) => match done {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(e.into()),
                Err(payload) => {
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a non-string payload".into());
                    let message = crate::payload::bound_message(format!("step panicked: {msg}"));
                    Err(Failure { kind: FailureKind::Panic, message, hint: None })
                }
            },
        };
        Ended {
            stopped: false,
            delivery: None,
            step,
            phase,
            attempt,
            name,
            took: inner.clock.now().duration_since(began),
            result,
        }
    }

    /// An await step's attempt: waits for its event until the deadline.
    async fn wait(
        self,
        inner: Arc<Inner>,
        key: std::result::Result<String, String>,
        on_timeout: OnTimeout,
    ) -> Ended {
        let began = inner.clock.now();
        let mut stopped = false;
        let (result, delivery) = match key {
            Err(why) => (
                Err(Failure {
                    kind: FailureKind::Rejected,
                    message: crate::payload::bound_message(format!("no correlation key: {why}")),
                    hint: None,
                }),
                None,
            ),
            Ok(key) => {
                match inbox::await_event(&inner, &key, self.deadline, self.withdrawn.clone()).await
                {
                    inbox::Awaited::Withdrawn => (
                        Err(Failure {
                            kind: FailureKind::Rejected,
                            message: format!(
                                "no longer waited for `{key}`: its stage failed or the saga was \
                             cancelled"
                            ),
                            hint: None,
                        }),
                        None,
                    ),
                    inbox::Awaited::Stopped => {
                        stopped = true;
                        (Ok(Value::Null), None)
                    }
                    inbox::Awaited::Event(d) => (
                        Ok(d.payload),
                        Some(Taken {
                            key: d.key,
                            id: d.id,
                        }),
                    ),
                    inbox::Awaited::TimedOut => (
                        Err(Failure {
                            kind: timeout_kind(on_timeout),
                            message: crate::payload::bound_message(format!(
                                "no event for `{key}` by {}",
                                self.deadline
                            )),
                            hint: None,
                        }),
                        None,
                    ),
                }
            }
        };
        Ended {
            stopped,
            delivery,
            step: self.step,
            phase: self.phase,
            attempt: self.attempt,
            name: self.name,
            took: inner.clock.now().duration_since(began),
            result,
        }
    }
}

pub(crate) struct Driver {
    inner: Arc<Inner>,
    def: Arc<SagaDefinition>,
    state: SagaState,
    /// The summary as last made durable; `None` before the saga's first write.
    committed: Option<SagaMeta>,
    /// Records applied to `state` but not yet written.
    pending: Vec<LogRecord>,
    /// Deliveries from the inbox those records take (an await step's event).
    taken: Vec<Taken>,
    /// Told how the first write went: `start` returns once the `started` record is
    /// durable, and that record travels with the first attempt's start.
    first_write: Option<tokio::sync::oneshot::Sender<Result<()>>>,
    /// In a shared store, the epoch of the lease this driver holds: every write carries
    /// it, and a write refused for it stops the driver.
    epoch: Option<u64>,
    /// A `step` span per half of a step with attempts to come, under the saga's span:
    /// it spans every attempt (retries included) and closes once that half settled.
    step_spans: std::collections::HashMap<(u32, Phase), tracing::Span>,
}

/// How a wait that timed out fails, as its definition says: `Unknown` is a timeout (its
/// outcome unknown, so it is compensated); anything else a rejection.
fn timeout_kind(on_timeout: OnTimeout) -> FailureKind {
    match on_timeout {
        OnTimeout::Unknown => FailureKind::Timeout,
        _ => FailureKind::Rejected,
    }
}

impl Driver {
    pub(crate) fn new(
        inner: Arc<Inner>,
        def: Arc<SagaDefinition>,
        state: SagaState,
        committed: Option<SagaMeta>,
    ) -> Self {
        Driver {
            inner,
            def,
            state,
            committed,
            pending: Vec::new(),
            taken: Vec::new(),
            first_write: None,
            epoch: None,
            step_spans: std::collections::HashMap::new(),
        }
    }

    /// Drives under the lease epoch `epoch` (a shared store).
    pub(crate) fn with_epoch(mut self, epoch: Option<u64>) -> Self {
        self.epoch = epoch;
        self
    }

    /// A driver for a saga that is not on disk yet: `record` is its `started` record,
    /// already applied to `state`. It is written with the saga's first attempt; the
    /// returned receiver hears how that write went.
    pub(crate) fn starting(
        inner: Arc<Inner>,
        def: Arc<SagaDefinition>,
        state: SagaState,
        record: LogRecord,
    ) -> (Self, tokio::sync::oneshot::Receiver<Result<()>>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut d = Driver::new(inner, def, state, None);
        d.pending.push(record);
        d.first_write = Some(tx);
        (d, rx)
    }

    pub(crate) fn state(&self) -> &SagaState {
        &self.state
    }

    /// Appends `event` to the in-memory state and the records waiting to be written.
    pub(crate) fn record(&mut self, event: Event) -> Result<()> {
        let record = LogRecord {
            lsn: self.state.next_lsn,
            at: self.inner.clock.now(),
            event,
        };
        // The driver only records transitions that `decide` asked for, so a fold error
        // here is an engine bug; report it as a corrupt log rather than panic.
        self.state.apply(&record).map_err(|e| Error::CorruptLog {
            saga: self.state.id,
            reason: format!("engine produced a transition that does not fit: {e}"),
        })?;
        self.pending.push(record);
        Ok(())
    }

    /// Writes the pending records, with the summary and index changes they imply, and
    /// returns once they are durable.
    pub(crate) async fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // Taken, not copied: if the write fails the driver stops, and the saga is read
        // back from the store by whoever drives it next.
        let records = std::mem::take(&mut self.pending);
        let meta = self.meta();
        let write = Write {
            saga: self.state.id,
            records,
            meta: meta.clone(),
            previous: self.committed.clone(),
            fence: self.epoch.map(|epoch| Fence {
                owner: self.inner.owner.clone(),
                epoch,
            }),
            taken: std::mem::take(&mut self.taken),
        };
        let result = self.inner.committer.commit(write).await;
        if let Some(tx) = self.first_write.take() {
            // `start` may have been cancelled by its caller; the saga goes on regardless.
            let _ = tx.send(result.clone());
        }
        result?;
        self.committed = Some(meta);
        Ok(())
    }

    fn meta(&self) -> SagaMeta {
        SagaMeta::of(&self.state)
    }

    /// Runs the saga until it ends, parks, or the engine stops: an event loop over the
    /// attempts in flight, the timer `decide` asked for, repairs and stop.
    ///
    /// `wake` is this saga's own: a repair queued for it notifies it (see
    /// `Inner::ask_driver`).
    pub(crate) async fn run(mut self, wake: Arc<tokio::sync::Notify>) -> Result<SagaOutcome> {
        let mut stopping = self.inner.stopping.subscribe();
        // The attempts in flight, each in its own task: the branches of a group run
        // side by side, and none waits for the driver to write another's result.
        // Dropping the driver (a crash, a dropped engine) aborts them.
        let mut attempts: JoinSet<Ended> = JoinSet::new();
        let mut live = Live::new();
        // The await steps in flight, by step: how to give up their waits.
        let mut waits: std::collections::HashMap<u32, tokio::sync::watch::Sender<bool>> =
            std::collections::HashMap::new();
        loop {
            if *stopping.borrow() {
                // No new attempt; those in flight end (each within its deadline) and
                // their results are written, so that nothing started is left unsaid.
                if live.is_empty() {
                    self.flush().await?;
                    return Err(Error::ShuttingDown);
                }
                self.flush().await?;
                if let Some(done) = attempts.join_next().await {
                    self.ended(done, &mut live)?;
                }
                continue;
            }
            // Looked for on every pass, not only when `wake` fired: a repair (or a
            // cancellation) queued while an attempt's result was being written is
            // applied before anything else is decided; and one queued before this
            // driver started (a saga adopted to apply it) is found at once.
            {
                let pending = lock(&self.inner.repairs).remove(&self.state.id);
                if let Some(p) = pending {
                    // Boxed: repairs are rare, and their future would otherwise widen
                    // every saga's task by its size.
                    Box::pin(self.repair(p, &live)).await?;
                }
            }
            let now = self.inner.clock.now();
            let mut wait = None;
            let mut changed = false;
            let mut launch = Vec::new();
            for decision in decide(&self.def, &self.state, &live, now) {
                match decision {
                    Decision::RunStep { step, attempt } => {
                        launch.push(self.begin(step, Phase::Action, attempt)?);
                    }
                    Decision::Compensate { step, attempt } => {
                        launch.push(self.begin(step, Phase::Compensation, attempt)?);
                    }
                    Decision::CloseInterrupted { step, attempt } => {
                        changed = true;
                        // A wait for an event sent nothing and took nothing: closed, it
                        // had no effect.
                        let waited = self
                            .state
                            .steps
                            .get(step as usize)
                            .is_some_and(|s| s.awaits.is_some() && s.delivery.is_none());
                        // Unless its event came meanwhile: then it is taken, as the
                        // wait would have taken it had no crash interrupted it.
                        if waited && self.take_waiting(step, attempt).await? {
                            continue;
                        }
                        // A wait closed at or after its deadline (it passed while the
                        // process was down) ends as its definition says a timeout ends:
                        // an `Unknown` one is compensated (docs/durability.md).
                        let timed_out = self
                            .state
                            .steps
                            .get(step as usize)
                            .and_then(|s| s.deadline)
                            .filter(|d| self.inner.clock.now() >= *d)
                            .zip(
                                self.def
                                    .step(step as usize)
                                    .and_then(|sd| sd.awaits.as_ref())
                                    .map(|a| a.on_timeout),
                            );
                        let (kind, error) =
                            if let (true, Some((deadline, on_timeout))) = (waited, timed_out) {
                                (
                                    timeout_kind(on_timeout),
                                    format!(
                                        "the wait of attempt {attempt} was interrupted by a crash \
                                     and its deadline {deadline} passed before it was resumed; \
                                     it took no event"
                                    ),
                                )
                            } else if waited {
                                (
                                    FailureKind::Rejected,
                                    format!(
                                        "the wait of attempt {attempt} was interrupted by a crash \
                                     and is not resumed (the saga is cancelled or its stage \
                                     failed); it took no event"
                                    ),
                                )
                            } else {
                                (
                                    FailureKind::Interrupted,
                                    format!(
                                    "attempt {attempt} was interrupted by a crash and will not \
                                     run again (the step is not idempotent, or the saga is \
                                     cancelled or compensating), so it may have taken effect"
                                ),
                                )
                            };
                        self.record(Event::StepFailed {
                            step,
                            attempt,
                            kind,
                            error,
                            retry_at: None,
                        })?;
                    }
                    Decision::BeginCompensation { reason } => {
                        changed = true;
                        tracing::info!(%reason, "compensation began");
                        self.record(Event::CompensationBegan { reason })?;
                    }
                    Decision::Wait { until } => wait = Some(until),
                    // Nothing to write: the wait ends, and its result is recorded then.
                    Decision::Withdraw { step } => {
                        if let Some(tx) = waits.get(&step) {
                            tx.send_replace(true);
                        }
                    }
                    Decision::Complete => {
                        changed = true;
                        self.record(Event::Completed)?;
                        self.flush().await?;
                        tracing::info!("saga completed");
                    }
                    Decision::FinishCompensation => {
                        changed = true;
                        self.record(Event::Compensated)?;
                        self.flush().await?;
                        tracing::info!("saga compensated");
                    }
                    Decision::Cancel { operator, reason } => {
                        changed = true;
                        tracing::info!(%reason, "saga cancelled by its deadline");
                        self.record(Event::CancelRequested { operator, reason })?;
                    }
                    Decision::FinishCancellation => {
                        changed = true;
                        self.record(Event::Cancelled)?;
                        self.flush().await?;
                        tracing::info!("saga cancelled");
                    }
                    Decision::Park { reason } => {
                        changed = true;
                        tracing::warn!(kind = ?reason.kind, reason = %reason.message, "saga parked");
                        self.record(Event::Parked { reason })?;
                        self.flush().await?;
                    }
                    // Only decided with nothing in flight.
                    Decision::Idle => {
                        self.flush().await?;
                        let outcome =
                            SagaOutcome::of(&self.state).ok_or(Error::NotRunning(self.state.id))?;
                        self.count_end(&outcome);
                        return Ok(outcome);
                    }
                }
            }
            if !launch.is_empty() {
                // The starts are durable before any of the attempts runs (G1); the
                // results before them travel in the same write.
                self.flush().await?;
                for mut a in launch {
                    live.insert(a.step);
                    if a.awaits.is_some() {
                        let (tx, rx) = tokio::sync::watch::channel(false);
                        waits.insert(a.step, tx);
                        a.withdrawn = Some(rx);
                    }
                    // In the saga's span: what a step logs carries the saga's id.
                    attempts.spawn(a.run(self.inner.clone()).in_current_span());
                }
                continue;
            }
            if changed {
                continue;
            }
            // Nothing to do now: results are made durable before waiting.
            self.flush().await?;
            if live.is_empty() {
                let Some(until) = wait else {
                    return Err(Error::CorruptLog {
                        saga: self.state.id,
                        reason: "the saga has nothing to do, nothing in flight and no timer".into(),
                    });
                };
                if self.hand_back(until).await? {
                    return Err(Error::NotRunning(self.state.id));
                }
            }
            let timer = async {
                match wait {
                    Some(until) => self.inner.clock.sleep_until(until).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                Some(done) = attempts.join_next(), if !live.is_empty() => {
                    self.ended(done, &mut live)?;
                }
                () = timer => {}
                _ = stopping.changed() => {}
                // `notify_one` keeps a permit when nobody waits: a driver that was
                // busy when its repair was queued still wakes (the loop looks then).
                () = wake.notified() => {}
            }
        }
    }

    /// In a shared store, a saga that has nothing to do for longer than a lease lasts
    /// need not hold one: its lease is given back, to be claimed by whichever process
    /// is there when its timer is due. Whether it was (the driver then ends).
    async fn hand_back(&self, until: Timestamp) -> Result<bool> {
        let Some(epoch) = self.epoch else {
            return Ok(false);
        };
        let Some(ttl) = self.inner.store.leases().map(|l| l.ttl()) else {
            return Ok(false);
        };
        if until <= self.inner.clock.now().saturating_add(ttl) {
            return Ok(false);
        }
        // A repair waiting for this driver is applied first: the saga stays here.
        if lock(&self.inner.repairs).contains_key(&self.state.id) {
            return Ok(false);
        }
        let (owner, lease) = (
            self.inner.owner.clone(),
            Lease {
                saga: self.state.id,
                epoch,
            },
        );
        self.inner
            .lease_io(move |l| l.release(&owner, lease, Some(until)))
            .await?;
        tracing::debug!(until = %until, "lease handed back until the saga's timer");
        Ok(true)
    }

    fn count_end(&self, outcome: &SagaOutcome) {
        let secs = self
            .inner
            .clock
            .now()
            .duration_since(self.state.created_at)
            .as_secs_f64();
        let (name, took) = match outcome {
            SagaOutcome::Completed { .. } => ("completed", Some(secs)),
            SagaOutcome::Compensated { .. } => ("compensated", Some(secs)),
            SagaOutcome::Parked { .. } => ("parked", None),
            SagaOutcome::Resolved { .. } => ("resolved", None),
            SagaOutcome::Cancelled { .. } => ("cancelled", Some(secs)),
        };
        self.inner.metrics.ended(&self.state.definition, name, took);
    }

    /// Applies an operator's repair (or a cancellation), if the state allows it, and
    /// answers the caller.
    async fn repair(&mut self, p: PendingRepair, live: &Live) -> Result<()> {
        let saga = self.state.id;
        let answer = match p.action {
            Asked::Repair(action) => match while_in_flight(&self.state, &action, live)
                .and_then(|()| check_repair(&self.state, &action))
            {
                Err(refusal) => Err(Error::RepairRefused {
                    saga,
                    reason: refusal.0,
                }),
                Ok(()) => {
                    tracing::warn!(action = action.name(), operator = %p.operator, reason = %p.reason, "operator repair");
                    self.inner
                        .metrics
                        .repaired(&self.state.definition, action.name());
                    self.record(Event::OperatorAction {
                        action,
                        operator: p.operator,
                        reason: p.reason,
                    })?;
                    self.flush().await.map(|()| self.meta())
                }
            },
            Asked::Cancel => match check_cancel(&self.state) {
                Err(refusal) => Err(Error::CancelRefused {
                    saga,
                    reason: refusal.0,
                }),
                Ok(()) => {
                    tracing::warn!(operator = %p.operator, reason = %p.reason, "saga cancelled");
                    self.record(Event::CancelRequested {
                        operator: p.operator,
                        reason: p.reason,
                    })?;
                    self.flush().await.map(|()| self.meta())
                }
            },
        };
        let failed = answer
            .as_ref()
            .err()
            .filter(|e| !matches!(e, Error::RepairRefused { .. } | Error::CancelRefused { .. }))
            .cloned();
        let _ = p.reply.send(answer.map_err(RepairError::Final));
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Begins an attempt: records its start (written, and durable, before it runs:
    /// G1) and returns what the attempt's task needs.
    fn begin(&mut self, step: u32, phase: Phase, attempt: Attempt) -> Result<Launch> {
        let i = step as usize;
        let Some(sd) = self.def.step(i) else {
            return Err(Error::CorruptLog {
                saga: self.state.id,
                reason: format!("decided on step {step}, which the definition lacks"),
            });
        };
        let timeout = match phase {
            Phase::Action => sd.options.retry.attempt_timeout,
            Phase::Compensation => sd.options.compensation_retry.attempt_timeout,
        };
        let name = sd.name.clone();
        let code = sd.code.clone();
        let awaits = match phase {
            Phase::Action => sd.awaits.clone(),
            Phase::Compensation => None,
        };
        let now = self.inner.clock.now();
        let deadline = match (&awaits, self.state.steps.get(i)) {
            // An await step waits until its deadline counted from when it began
            // waiting, across restarts: an attempt after a crash keeps it.
            (Some(_), Some(s)) if matches!(s.action, Progress::InFlight { .. }) => {
                s.deadline.unwrap_or_else(|| now.saturating_add(timeout))
            }
            _ => now.saturating_add(timeout),
        };
        self.record(Event::attempt_started(phase, step, attempt, deadline))?;
        let step_span = self
            .step_spans
            .entry((step, phase))
            .or_insert_with(|| tracing::info_span!("step", step = %name, %phase))
            .clone();
        let ctx = StepContext {
            saga_id: self.state.id,
            step: name.clone(),
            phase,
            attempt,
            key: IdempotencyKey::derive(self.state.id, &name, phase),
            deadline,
            input: self.state.input.clone(),
            outputs: {
                let outputs = self.state.outputs();
                (!outputs.is_empty()).then(|| Arc::new(outputs))
            },
        };
        let awaits = match awaits {
            Some(spec) => {
                let key = (spec.key)(&ctx)
                    .and_then(|k| crate::store::inbox::check_id("correlation key", &k).map(|()| k));
                if let Ok(k) = &key {
                    self.record(Event::Awaiting {
                        step,
                        attempt,
                        key: k.clone(),
                    })?;
                }
                Some((key, spec.on_timeout))
            }
            None => None,
        };
        Ok(Launch {
            awaits,
            withdrawn: None,
            step,
            phase,
            attempt,
            name,
            code,
            ctx,
            output: self.state.steps.get(i).and_then(|s| s.output.clone()),
            deadline,
            timeout,
            step_span,
        })
    }

    /// For an interrupted wait about to be closed: takes the event that came for it by
    /// its deadline, if one did, recording the step's success. Whether it did.
    async fn take_waiting(&mut self, step: u32, attempt: Attempt) -> Result<bool> {
        let Some((key, deadline)) = self
            .state
            .steps
            .get(step as usize)
            .and_then(|s| Some((s.awaits.clone()?, s.deadline?)))
        else {
            return Ok(false);
        };
        let Ok(Some(d)) = inbox::first_in_time(&self.inner, &key, deadline).await else {
            return Ok(false);
        };
        let Ok(output) = self.check_size(d.payload) else {
            return Ok(false);
        };
        self.record(Event::EventReceived {
            step,
            attempt,
            delivery: d.id.clone(),
        })?;
        self.taken.push(Taken {
            key: d.key,
            id: d.id,
        });
        self.record(Event::StepSucceeded {
            step,
            attempt,
            output,
        })?;
        Ok(true)
    }

    /// Records how an attempt ended; the record is written with whatever comes next.
    fn ended(
        &mut self,
        done: std::result::Result<Ended, tokio::task::JoinError>,
        live: &mut Live,
    ) -> Result<()> {
        // An attempt's task catches the step's panics, so it only fails to join if the
        // runtime is going away. The driver stops as in a crash: the attempt stays in
        // flight in the log, and whoever drives the saga next treats it as interrupted.
        let Ended {
            stopped,
            delivery,
            step,
            phase,
            attempt,
            name,
            took,
            result,
        } = done.map_err(|e| {
            tracing::warn!(error = %e, "an attempt's task did not finish");
            Error::NotRunning(self.state.id)
        })?;
        live.remove(&step);
        if stopped {
            // Left in flight in the log, as a crash leaves it.
            return Ok(());
        }
        let written = self.write_result(step, phase, attempt, &name, took, result, delivery);
        // The half of the step settled (succeeded, or failed with no attempt to come):
        // its span ends.
        let settled = self.state.steps.get(step as usize).is_none_or(|s| {
            let p = match phase {
                Phase::Action => &s.action,
                Phase::Compensation => &s.compensation,
            };
            !matches!(
                p,
                Progress::InFlight { .. }
                    | Progress::Failed {
                        retry_at: Some(_),
                        ..
                    }
            )
        });
        if settled {
            self.step_spans.remove(&(step, phase));
        }
        written
    }

    /// Records how an attempt ended, and when the next one is due if it failed.
    #[allow(clippy::too_many_arguments)]
    fn write_result(
        &mut self,
        step: u32,
        phase: Phase,
        attempt: Attempt,
        name: &str,
        took: Duration,
        result: std::result::Result<Value, Failure>,
        delivery: Option<Taken>,
    ) -> Result<()> {
        let result = result.and_then(|v| self.check_size(v));
        let now = self.inner.clock.now();
        self.inner.metrics.attempt(
            &self.state.definition,
            name,
            phase,
            took.as_secs_f64(),
            result.as_ref().err().map(|f| f.kind),
        );
        match (phase, result) {
            (Phase::Action, Ok(output)) => {
                if let Some(taken) = delivery {
                    // Taken in the write that records it: never lost, never twice.
                    self.record(Event::EventReceived {
                        step,
                        attempt,
                        delivery: taken.id.clone(),
                    })?;
                    self.taken.push(taken);
                }
                self.record(Event::StepSucceeded {
                    step,
                    attempt,
                    output,
                })
            }
            (Phase::Compensation, Ok(_)) => {
                self.record(Event::CompensationSucceeded { step, attempt })
            }
            (phase, Err(f)) => {
                tracing::warn!(step = %name, %phase, attempt = attempt.0, kind = ?f.kind, error = %f.message, "attempt failed");
                let jitter = self.jitter(step, phase, attempt);
                let retry_at = next_attempt_at(
                    &self.def,
                    &self.state,
                    step,
                    phase,
                    f.kind,
                    f.hint,
                    now,
                    jitter,
                );
                self.record(match phase {
                    Phase::Action => Event::StepFailed {
                        step,
                        attempt,
                        kind: f.kind,
                        error: f.message,
                        retry_at,
                    },
                    Phase::Compensation => Event::CompensationFailed {
                        step,
                        attempt,
                        kind: f.kind,
                        error: f.message,
                        retry_at,
                    },
                })
            }
        }
    }

    /// Checks an output against the payload limits before it is recorded: an output the
    /// log could not read back must never be written.
    fn check_size(&self, v: Value) -> std::result::Result<Value, Failure> {
        let opts = &self.inner.options;
        let max_depth = opts
            .max_payload_depth
            .min(crate::payload::MAX_PAYLOAD_DEPTH);
        let too_large = |message: String| Failure {
            kind: FailureKind::OutputTooLarge,
            message,
            hint: None,
        };
        if crate::payload::depth(&v) > max_depth {
            crate::payload::dispose(v);
            return Err(too_large(format!(
                "output nests deeper than the limit of {max_depth} levels"
            )));
        }
        let limit = opts.max_payload_bytes;
        match crate::payload::to_bytes(&v, limit, max_depth) {
            Ok(_) => Ok(v),
            Err(_) => Err(too_large(format!(
                "output exceeds the limit of {limit} bytes"
            ))),
        }
    }

    fn jitter(&self, step: u32, phase: Phase, attempt: Attempt) -> u64 {
        let mut key = Vec::with_capacity(26);
        key.extend_from_slice(self.state.id.as_bytes());
        key.extend_from_slice(&step.to_be_bytes());
        key.push(phase as u8);
        key.extend_from_slice(&attempt.0.to_be_bytes());
        self.inner.entropy.sample(&key)
    }
}

/// Whether `action` may be applied while the attempts of `live` run: a step is not
/// skipped while an attempt of it runs, and a saga is not marked resolved while any
/// does (its result could no longer be written). Forcing compensation is allowed: the
/// branches in flight settle before anything is undone.
fn while_in_flight(
    state: &SagaState,
    action: &Repair,
    live: &Live,
) -> std::result::Result<(), Refusal> {
    let name = |i: u32| {
        state
            .steps
            .get(i as usize)
            .map_or_else(|| "?".to_string(), |s| s.name.clone())
    };
    match action {
        Repair::SkipStep { step } if live.contains(step) => Err(Refusal(format!(
            "step {step} (`{}`) has an attempt in flight: wait for it to end",
            name(*step)
        ))),
        Repair::MarkResolved => match live.first() {
            Some(&i) => Err(Refusal(format!(
                "step {i} (`{}`) has an attempt in flight: wait for it to end",
                name(i)
            ))),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}
