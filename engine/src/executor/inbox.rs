//! Events for await steps: accepting a delivery (durable before it is acknowledged, G10)
//! and the wait of an await step for its event.
//!
//! A delivery is written to the store's inbox first; then the await steps of this
//! process that wait on its key are woken. An await step looks in the inbox when it
//! begins (an event that came first is there), whenever it is woken, and, in a store
//! other processes share, at every lease tick and on the store's change hint (a delivery
//! accepted by another process). It takes the delivery in the write that records its
//! success, so that an event is applied once, and never lost, whatever crashes when.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::watch;

use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::executor::signal::{Signal, Watcher};
use crate::executor::{lock, Engine, Inner};
use crate::ids::SagaId;
use crate::machine::SagaState;
use crate::store::{Delivered, Delivery};

/// The await steps of this process waiting on each correlation key.
#[derive(Default)]
pub(crate) struct Waiters {
    keys: Mutex<HashMap<String, (Arc<Signal>, usize)>>,
}

/// One await step's registration; unregisters when dropped.
pub(crate) struct Waiting<'a> {
    waiters: &'a Waiters,
    key: String,
    pub(crate) woken: Watcher,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut keys = lock(&self.waiters.keys);
        if let Some((_, n)) = keys.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

impl Waiters {
    /// Registers a wait on `key`.
    pub(crate) fn watch(&self, key: &str) -> Waiting<'_> {
        let mut keys = lock(&self.keys);
        let (signal, n) = keys
            .entry(key.to_string())
            .or_insert_with(|| (Arc::new(Signal::default()), 0));
        *n += 1;
        Waiting {
            waiters: self,
            key: key.to_string(),
            woken: signal.watch(),
        }
    }

    /// Wakes the waits on `key`.
    pub(crate) fn wake(&self, key: &str) {
        // Several sagas of this process may wait on one key: they wake in the order
        // they began waiting, not by chance (see `signal.rs`).
        if let Some((signal, _)) = lock(&self.keys).get(key) {
            signal.raise();
        }
    }
}

/// How an await step's wait ended.
pub(crate) enum Awaited {
    /// Its event: the delivery to take.
    Event(Delivery),
    /// Its deadline passed first.
    TimedOut,
    /// The engine stops: a wait has nothing to finish (no request is in flight), so it
    /// ends at once and goes on after a restart.
    Stopped,
    /// The saga gave the wait up (its stage failed, or it was cancelled).
    Withdrawn,
}

/// Waits for the event addressed to `key` until `deadline`. A store that cannot be read
/// for a while only delays the wait: it is read again at the next tick.
pub(crate) async fn await_event(
    inner: &Arc<Inner>,
    key: &str,
    deadline: Timestamp,
    mut withdrawn: Option<watch::Receiver<bool>>,
) -> Awaited {
    let mut waiting = inner.waiters.watch(key);
    let mut stopping = inner.stopping.subscribe();
    // In a shared store a delivery may be accepted by another process: its hint, and a
    // poll at every lease tick in case the hint is missed.
    let mut hint = inner
        .store
        .leases()
        .and_then(|l| l.changes())
        .map(|c| c.outcomes);
    let remote = inner.shared();
    loop {
        if *stopping.borrow_and_update() {
            return Awaited::Stopped;
        }
        // Read before anything ends the wait: an event that came before the wait was
        // given up is taken, whatever woke the wait first.
        let given_up = withdrawn.as_mut().is_some_and(|w| *w.borrow_and_update());
        // When it was given up, read with it: the inbox read below takes time.
        let given_up_late = given_up && inner.clock.now() >= deadline;
        let failed = match first_in_time(inner, key, deadline).await {
            Ok(Some(d)) => return Awaited::Event(d),
            Ok(None) => false,
            Err(()) => true,
        };
        if given_up {
            // Given up at or after its deadline: it had timed out by then, and ends as
            // its definition says a timeout ends (an `Unknown` wait is compensated; a
            // wait given up in time is not).
            if given_up_late {
                return Awaited::TimedOut;
            }
            return Awaited::Withdrawn;
        }
        // Past the deadline already (a wait resumed after a restart): what came in time
        // was read just now.
        if inner.clock.now() >= deadline {
            return Awaited::TimedOut;
        }
        let poll = inner
            .clock
            .now()
            .saturating_add(inner.options.lease_tick)
            .min(deadline);
        tokio::select! {
            biased;
            () = inner.clock.sleep_until(deadline) => {
                // One last look: an event accepted in time, whose wake-up (or, in
                // another process, whose notification or poll) had not come yet, counts.
                return match first_in_time(inner, key, deadline).await {
                    Ok(Some(d)) => Awaited::Event(d),
                    _ => Awaited::TimedOut,
                };
            }
            _ = stopping.changed() => {}
            _ = async {
                match withdrawn.as_mut() {
                    // A sender gone never wakes again: not a reason to spin.
                    Some(w) => if w.changed().await.is_err() { std::future::pending::<()>().await },
                    None => std::future::pending().await,
                }
            } => {}
            _ = waiting.woken.changed() => {}
            _ = async {
                match hint.as_mut() {
                    Some(h) => if h.changed().await.is_err() { std::future::pending::<()>().await },
                    None => std::future::pending().await,
                }
            } => {}
            () = inner.clock.sleep_until(poll), if remote || failed => {}
        }
    }
}

/// The oldest delivery for `key` no saga took that was accepted by `deadline`: one that
/// came later is too late for this wait, as it would be for a wait that never stopped.
/// `Err` (logged) if the inbox could not be read.
pub(crate) async fn first_in_time(
    inner: &Arc<Inner>,
    key: &str,
    deadline: Timestamp,
) -> std::result::Result<Option<Delivery>, ()> {
    let k = key.to_string();
    match inner.io(move |s| s.inbox().waiting(&k)).await {
        Ok(Ok(waiting)) => Ok(waiting.into_iter().find(|d| d.received_at <= deadline)),
        Ok(Err(e)) => {
            tracing::warn!(key, error = %e, "the inbox could not be read; trying again");
            Err(())
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "the inbox could not be read; trying again");
            Err(())
        }
    }
}

impl Engine {
    /// Delivers an event for the await step waiting on `key` (or that will): returns
    /// once it is durable (G10). A second delivery with the same key and `delivery_id`
    /// is not recorded again and is answered [`Delivered::Duplicate`]. An event no saga
    /// takes is kept for [`crate::EngineOptions::inbox_retention`] and listed by
    /// [`Engine::deliveries`].
    ///
    /// With sled the engine must be up to accept it (the sender retries until it gets an
    /// answer); with a shared store any process accepts it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidDelivery`] for an empty or too long key or id,
    /// [`Error::PayloadTooLarge`] or [`Error::PayloadTooDeep`] for a payload over the
    /// limits, [`Error::ShuttingDown`], or a store error (nothing acknowledged: retry).
    pub async fn deliver(&self, key: &str, delivery_id: &str, payload: Value) -> Result<Delivered> {
        let inner = &self.inner;
        if *inner.stopping.borrow() {
            return Err(Error::ShuttingDown);
        }
        for (what, v) in [("correlation key", key), ("delivery id", delivery_id)] {
            crate::store::inbox::check_id(what, v).map_err(Error::InvalidDelivery)?;
        }
        let (limit, depth) = (
            inner.options.max_payload_bytes,
            inner.options.max_payload_depth,
        );
        let (payload, _) =
            crate::payload::to_value(&payload, limit, depth).map_err(|e| match e {
                crate::payload::Refused::Limit(crate::payload::Exceeded::Size { size, limit }) => {
                    Error::PayloadTooLarge { size, limit }
                }
                crate::payload::Refused::Limit(crate::payload::Exceeded::Depth { limit }) => {
                    Error::PayloadTooDeep { limit }
                }
                crate::payload::Refused::Invalid(e) => {
                    Error::InvalidDelivery(format!("the payload does not serialize: {e}"))
                }
            })?;
        let (k, id, at) = (key.to_string(), delivery_id.to_string(), inner.clock.now());
        let delivered = inner
            .io(move |s| s.inbox().deliver(&k, &id, &payload, at))
            .await??;
        if delivered == Delivered::New {
            inner.waiters.wake(key);
            inner.metrics.delivered();
        }
        tracing::info!(key, delivery_id, ?delivered, "event delivered");
        Ok(delivered)
    }

    /// Approves the await step `step` of saga `id`: delivers to the key that step
    /// waits on an event saying who approved and why (its output), with the delivery id
    /// `approval/<saga>/<step>`, so that approving twice is a duplicate.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidDelivery`] if the saga has no such await step, or it is not
    /// waiting now (its key is not known yet, or it took its event, or its wait ended), [`Error::UnknownSaga`], or as
    /// [`Engine::deliver`].
    pub async fn approve(
        &self,
        id: SagaId,
        step: &str,
        operator: &str,
        reason: &str,
    ) -> Result<Delivered> {
        // Who and why are bounded as a repair's are (they go into the saga's log as the
        // step's output); said as a refused delivery.
        crate::admin::check_who(id, operator, reason).map_err(|e| match e {
            Error::RepairRefused { reason, .. } => {
                Error::InvalidDelivery(reason.replace("a repair", "an approval"))
            }
            other => other,
        })?;
        let engine = self.clone();
        // The log is read off the runtime: on a shared store it is a round trip.
        let history = tokio::task::spawn_blocking(move || engine.history(id))
            .await
            .map_err(|e| Error::Store(Arc::new(crate::store::Error::Backend(e.to_string()))))??;
        let state = SagaState::fold(id, &history).map_err(|e| Error::CorruptLog {
            saga: id,
            reason: e.to_string(),
        })?;
        let s = state
            .steps
            .iter()
            .find(|s| s.name == step)
            .ok_or_else(|| Error::InvalidDelivery(format!("saga {id} has no step `{step}`")))?;
        let key = s.awaits.clone().ok_or_else(|| {
            Error::InvalidDelivery(format!(
                "step `{step}` of saga {id} does not wait for an event (yet)"
            ))
        })?;
        let approval = format!("approval/{id}/{step}");
        // Approved before, and taken: the same answer as to any repeated delivery.
        if s.delivery.as_deref() == Some(approval.as_str()) {
            return Ok(Delivered::Duplicate);
        }
        // Otherwise only a wait going on now: an approval of one that took another event,
        // or ended, would sit in the inbox for nobody.
        let waiting = state.status.is_active()
            && matches!(s.action, crate::machine::Progress::InFlight { .. })
            && s.delivery.is_none();
        if !waiting {
            return Err(Error::InvalidDelivery(format!(
                "step `{step}` of saga {id} is not waiting for an event now (it took one, or \
                 its wait ended; the saga is {})",
                state.status
            )));
        }
        self.deliver(
            &key,
            &approval,
            serde_json::json!({ "approved_by": operator, "reason": reason }),
        )
        .await
    }

    /// The inbox's deliveries, taken or not, after `after` (in the store's stable
    /// order), at most `limit`: what operators look at.
    ///
    /// # Errors
    ///
    /// A store error.
    pub async fn deliveries(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<Delivery>> {
        Ok(self
            .inner
            .io(move |s| {
                s.inbox()
                    .deliveries(after.as_ref().map(|(k, i)| (k.as_str(), i.as_str())), limit)
            })
            .await??)
    }
}
