//! Drives one saga: decide, record, sync, run the effect, record its result, repeat.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::Value;
use tracing::Instrument;

use crate::clock::Timestamp;
use crate::definition::{Idempotence, RetryPolicy, SagaDefinition, StepContext, StepError};
use crate::error::{Error, Result};
use crate::executor::{lock, Asked, Inner, PendingRepair, RepairError, SagaOutcome};
use crate::ids::{Attempt, IdempotencyKey, Phase};
use crate::machine::{
    check_cancel, check_repair, decide, Decision, Event, FailureKind, LogRecord, SagaState,
};
use crate::store::{Fence, Lease, SagaMeta, Write};

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

pub(crate) struct Driver {
    inner: Arc<Inner>,
    def: Arc<SagaDefinition>,
    state: SagaState,
    /// The summary as last made durable; `None` before the saga's first write.
    committed: Option<SagaMeta>,
    /// Records applied to `state` but not yet written.
    pending: Vec<LogRecord>,
    /// Told how the first write went: `start` returns once the `started` record is
    /// durable, and that record travels with the first attempt's start.
    first_write: Option<tokio::sync::oneshot::Sender<Result<()>>>,
    /// In a shared store, the epoch of the lease this driver holds: every write carries
    /// it, and a write refused for it stops the driver.
    epoch: Option<u64>,
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
            first_write: None,
            epoch: None,
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

    /// Runs the saga until it ends, parks, or the engine stops.
    pub(crate) async fn run(mut self) -> Result<SagaOutcome> {
        let mut stopping = self.inner.stopping.subscribe();
        let mut repairs = self.inner.repair_epoch.subscribe();
        // A new receiver counts what was sent before as seen: a repair queued for this
        // saga before its driver started (a saga adopted to apply it) is looked for at
        // once.
        repairs.mark_changed();
        loop {
            if *stopping.borrow() {
                self.flush().await?;
                return Err(Error::ShuttingDown);
            }
            // Repairs are applied between attempts, never during one.
            if repairs.has_changed().unwrap_or(false) {
                repairs.borrow_and_update();
                let pending = lock(&self.inner.repairs).remove(&self.state.id);
                if let Some(p) = pending {
                    // Boxed: repairs are rare, and their future would otherwise widen
                    // every saga's task by its size.
                    Box::pin(self.repair(p)).await?;
                }
            }
            let now = self.inner.clock.now();
            match decide(&self.def, &self.state, now) {
                Decision::RunStep { step, attempt } => {
                    self.attempt(step, Phase::Action, attempt).await?;
                }
                Decision::Compensate { step, attempt } => {
                    self.attempt(step, Phase::Compensation, attempt).await?;
                }
                Decision::CloseInterrupted { step, attempt } => {
                    self.record(Event::StepFailed {
                        step,
                        attempt,
                        kind: FailureKind::Interrupted,
                        error: format!(
                            "attempt {attempt} was interrupted by a crash and will not run \
                             again (the step is not idempotent, or the saga is cancelled), so \
                             it may have taken effect"
                        ),
                        retry_at: None,
                    })?;
                }
                Decision::BeginCompensation { reason } => {
                    tracing::info!(%reason, "compensation began");
                    self.record(Event::CompensationBegan { reason })?;
                }
                Decision::Wait { until } => {
                    self.flush().await?;
                    if self.hand_back(until).await? {
                        return Err(Error::NotRunning(self.state.id));
                    }
                    tokio::select! {
                        biased;
                        () = self.inner.clock.sleep_until(until) => {}
                        _ = stopping.changed() => {}
                        _ = repairs.changed() => {
                            // Seen again at the top of the loop.
                            repairs.mark_changed();
                        }
                    }
                }
                Decision::Complete => {
                    self.record(Event::Completed)?;
                    self.flush().await?;
                    tracing::info!("saga completed");
                }
                Decision::FinishCompensation => {
                    self.record(Event::Compensated)?;
                    self.flush().await?;
                    tracing::info!("saga compensated");
                }
                Decision::Cancel { operator, reason } => {
                    tracing::info!(%reason, "saga cancelled by its deadline");
                    self.record(Event::CancelRequested { operator, reason })?;
                }
                Decision::FinishCancellation => {
                    self.record(Event::Cancelled)?;
                    self.flush().await?;
                    tracing::info!("saga cancelled");
                }
                Decision::Park { reason } => {
                    tracing::warn!(kind = ?reason.kind, reason = %reason.message, "saga parked");
                    self.record(Event::Parked { reason })?;
                    self.flush().await?;
                }
                Decision::Idle => {
                    self.flush().await?;
                    let outcome =
                        SagaOutcome::of(&self.state).ok_or(Error::NotRunning(self.state.id))?;
                    self.count_end(&outcome);
                    return Ok(outcome);
                }
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
    async fn repair(&mut self, p: PendingRepair) -> Result<()> {
        let saga = self.state.id;
        let answer = match p.action {
            Asked::Repair(action) => match check_repair(&self.state, &action) {
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

    /// Whether a failure of `kind` may be followed by another attempt (budget
    /// permitting): a rejected call will be rejected again; a call that may have taken
    /// effect is repeated only with the same key by a step that allows it
    /// (compensations always do).
    fn may_retry(&self, step: usize, phase: Phase, kind: FailureKind) -> bool {
        match kind {
            FailureKind::Rejected | FailureKind::Permanent | FailureKind::OutputTooLarge => false,
            FailureKind::Retryable | FailureKind::RetryAfter => true,
            _ => {
                phase == Phase::Compensation
                    || self
                        .def
                        .step(step)
                        .is_some_and(|s| s.options.idempotence == Idempotence::Idempotent)
            }
        }
    }

    fn policy(&self, step: usize, phase: Phase) -> Option<&RetryPolicy> {
        let sd = self.def.step(step)?;
        Some(match phase {
            Phase::Action => &sd.options.retry,
            Phase::Compensation => &sd.options.compensation_retry,
        })
    }

    /// One attempt: record its start, make that durable (G1), run it, record the result.
    /// The result is written together with whatever comes next.
    async fn attempt(&mut self, step: u32, phase: Phase, attempt: Attempt) -> Result<()> {
        let i = step as usize;
        let (Some(sd), Some(policy)) = (self.def.step(i), self.policy(i, phase)) else {
            return Err(Error::CorruptLog {
                saga: self.state.id,
                reason: format!("decided on step {step}, which the definition lacks"),
            });
        };
        let timeout = policy.attempt_timeout;
        let name = sd.name.clone();
        let code = sd.code.clone();
        let deadline = self.inner.clock.now().saturating_add(timeout);
        self.record(match phase {
            Phase::Action => Event::StepAttemptStarted {
                step,
                attempt,
                deadline,
            },
            Phase::Compensation => Event::CompensationAttemptStarted {
                step,
                attempt,
                deadline,
            },
        })?;
        self.flush().await?;

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
        let output = self.state.steps.get(i).and_then(|s| s.output.clone());
        let span = tracing::info_span!("attempt", step = %name, %phase, attempt = attempt.0);
        // The attempt runs inside this saga's task rather than its own: nothing to
        // allocate per attempt beyond the step's future, and dropping the driver (a
        // crash, a dropped engine) drops the attempt with it.
        let fut: StepFuture<'_> = match phase {
            Phase::Action => code.execute(ctx),
            Phase::Compensation => {
                Box::pin(async move { code.compensate(ctx, output).await.map(|()| Value::Null) })
            }
        };
        let began = self.inner.clock.now();
        let result = self
            .await_attempt(CatchPanic(fut.instrument(span)), deadline, timeout)
            .await;
        let result = result.and_then(|v| self.check_size(v));
        let now = self.inner.clock.now();
        self.inner.metrics.attempt(
            &self.state.definition,
            &name,
            phase,
            now.duration_since(began).as_secs_f64(),
            result.as_ref().err().map(|f| f.kind),
        );
        match (phase, result) {
            (Phase::Action, Ok(output)) => self.record(Event::StepSucceeded {
                step,
                attempt,
                output,
            }),
            (Phase::Compensation, Ok(_)) => {
                self.record(Event::CompensationSucceeded { step, attempt })
            }
            (phase, Err(f)) => {
                tracing::warn!(step = %name, %phase, attempt = attempt.0, kind = ?f.kind, error = %f.message, "attempt failed");
                let retry_at = if self.may_retry(i, phase, f.kind) {
                    // Interrupted attempts do not use up the budget (G4).
                    let used = self.state.steps.get(i).map_or(attempt.0, |s| match phase {
                        Phase::Action => s.attempts_used(),
                        Phase::Compensation => s.compensation_attempts_used(),
                    });
                    let jitter = self.jitter(step, phase, attempt);
                    self.policy(i, phase)
                        .and_then(|p| p.next_attempt_at(used, now, jitter, f.hint))
                } else {
                    None
                };
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

    async fn await_attempt(
        &self,
        attempt: CatchPanic<'_>,
        deadline: Timestamp,
        timeout: Duration,
    ) -> std::result::Result<Value, Failure> {
        // `biased`, deadline first: once the deadline has passed the step is not polled
        // again, so it cannot start an effect late. A process that stalled past the
        // deadline (stopped, frozen, cut off) would otherwise resume inside the step and
        // call the service after other processes settled the attempt at its deadline and
        // perhaps undid it. A fixed order also keeps simulations reproducible (tokio's
        // default order is random).
        tokio::select! {
            biased;
            () = self.inner.clock.sleep_until(deadline) => {
                Err(Failure { kind: FailureKind::Timeout, message: format!("attempt timed out after {timeout:?}"), hint: None })
            }
            done = attempt => match done {
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
