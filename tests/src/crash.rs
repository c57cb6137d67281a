//! Crashes at chosen durable boundaries.
//!
//! A [`CrashPlan`] counts the events of one engine incarnation: store appends, and calls
//! that reach a fake service. When the planned event comes, the "process" dies: the store
//! refuses every later write, the services ignore every later call, and whoever watches
//! [`CrashPlan::wait_crashed`] drops the engine. With [`sagaflow::store::MemLog`] the
//! writes that were appended but not synced are then thrown away, as a power loss would.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use sagaflow::store::{self, SagaLog, SagaMeta, Write};
use sagaflow::{Lsn, SagaId, SagaStatus, StartKey, Timestamp};

/// Where a crash strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashPoint {
    /// The write is never appended.
    BeforeAppend,
    /// The write is appended but the sync that would make it durable never happens.
    AfterAppendBeforeSync,
    /// The attempt's start is durable; the request never reaches the service.
    AfterSyncBeforeEffect,
    /// The service applied the effect; its answer is never recorded.
    AfterEffectBeforeRecord,
    /// A delivery of an event is never written: the sender is not answered and sends
    /// it again to the next incarnation.
    BeforeDelivery,
    /// A delivery of an event is durable, but the process dies before acknowledging
    /// it: the sender sends it again, and it must be a duplicate.
    AfterDelivery,
}

impl CrashPoint {
    /// All points.
    pub const ALL: [CrashPoint; 4] = [
        CrashPoint::BeforeAppend,
        CrashPoint::AfterAppendBeforeSync,
        CrashPoint::AfterSyncBeforeEffect,
        CrashPoint::AfterEffectBeforeRecord,
    ];

    /// The points at a delivery's durable write (counted by deliveries).
    pub const DELIVERY: [CrashPoint; 2] = [CrashPoint::BeforeDelivery, CrashPoint::AfterDelivery];

    fn counts_appends(self) -> bool {
        matches!(
            self,
            CrashPoint::BeforeAppend | CrashPoint::AfterAppendBeforeSync
        )
    }

    fn counts_effects(self) -> bool {
        matches!(
            self,
            CrashPoint::AfterSyncBeforeEffect | CrashPoint::AfterEffectBeforeRecord
        )
    }

    fn counts_deliveries(self) -> bool {
        matches!(self, CrashPoint::BeforeDelivery | CrashPoint::AfterDelivery)
    }
}

/// A crash at the `nth` (from 0) event of its kind in one incarnation: the `nth` append
/// for the append points, the `nth` service call for the effect points, the `nth`
/// delivery of an event for the delivery points. A small `nth`
/// right after a restart is a crash during recovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Crash {
    /// Where.
    pub point: CrashPoint,
    /// At which event of its kind.
    pub nth: u32,
}

/// What the store should do with an append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendFate {
    /// Go ahead.
    Proceed,
    /// Refuse it: the process is dead.
    Dead,
    /// Apply it, then die.
    CrashAfter,
}

/// What a service should do with a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EffectFate {
    /// Go ahead.
    Proceed,
    /// Ignore it: the process is dead.
    Dead,
    /// Die before the request leaves.
    CrashBefore,
    /// Apply the effect, then die.
    CrashAfter,
}

/// One incarnation's crash plan.
#[derive(Debug)]
pub struct CrashPlan {
    crash: Option<Crash>,
    appends: AtomicU32,
    effects: AtomicU32,
    deliveries: AtomicU32,
    crashed: tokio::sync::watch::Sender<bool>,
}

impl CrashPlan {
    /// A plan that crashes at `crash`, or never.
    pub fn new(crash: Option<Crash>) -> Arc<Self> {
        Arc::new(CrashPlan {
            crash,
            appends: AtomicU32::new(0),
            effects: AtomicU32::new(0),
            deliveries: AtomicU32::new(0),
            crashed: tokio::sync::watch::channel(false).0,
        })
    }

    /// Whether the process has died.
    pub fn crashed(&self) -> bool {
        *self.crashed.borrow()
    }

    fn die(&self) {
        self.crashed.send_replace(true);
    }

    /// Resolves once the process has died.
    pub async fn wait_crashed(&self) {
        let mut rx = self.crashed.subscribe();
        // The sender lives as long as `self`; an error cannot happen while we borrow it.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Called by the store before each append.
    pub fn on_append(&self) -> AppendFate {
        if self.crashed() {
            return AppendFate::Dead;
        }
        let n = self.appends.fetch_add(1, Ordering::SeqCst);
        match self.crash {
            Some(c) if c.point.counts_appends() && c.nth == n => match c.point {
                CrashPoint::BeforeAppend => {
                    self.die();
                    AppendFate::Dead
                }
                _ => AppendFate::CrashAfter,
            },
            _ => AppendFate::Proceed,
        }
    }

    /// Called by a service on each call.
    pub fn on_effect(&self) -> EffectFate {
        if self.crashed() {
            return EffectFate::Dead;
        }
        let n = self.effects.fetch_add(1, Ordering::SeqCst);
        match self.crash {
            Some(c) if c.point.counts_effects() && c.nth == n => {
                self.die();
                if c.point == CrashPoint::AfterSyncBeforeEffect {
                    EffectFate::CrashBefore
                } else {
                    EffectFate::CrashAfter
                }
            }
            _ => EffectFate::Proceed,
        }
    }
}

impl CrashPlan {
    /// Called by the store before each delivery's durable write: like an append,
    /// [`AppendFate::CrashAfter`] writes it and then dies (before it is acknowledged).
    pub fn on_deliver(&self) -> AppendFate {
        if self.crashed() {
            return AppendFate::Dead;
        }
        let n = self.deliveries.fetch_add(1, Ordering::SeqCst);
        match self.crash {
            Some(c) if c.point.counts_deliveries() && c.nth == n => {
                if c.point == CrashPoint::BeforeDelivery {
                    self.die();
                    AppendFate::Dead
                } else {
                    AppendFate::CrashAfter
                }
            }
            _ => AppendFate::Proceed,
        }
    }
}

/// A store that obeys a [`CrashPlan`]: once the plan says the process died, every write
/// and sync fails.
#[derive(Debug)]
pub struct CrashableStore {
    inner: Arc<dyn SagaLog>,
    plan: Arc<CrashPlan>,
}

impl CrashableStore {
    /// Wraps `inner`, crashing as `plan` says.
    pub fn new(inner: Arc<dyn SagaLog>, plan: Arc<CrashPlan>) -> Arc<Self> {
        Arc::new(CrashableStore { inner, plan })
    }
}

fn dead() -> store::Error {
    store::Error::Injected("the process crashed".into())
}

impl SagaLog for CrashableStore {
    fn inbox(&self) -> &dyn store::Inbox {
        self
    }

    fn append(&self, writes: Vec<Write>) -> store::Result<()> {
        let plan = &self.plan;
        match plan.on_append() {
            AppendFate::Proceed => self.inner.append(writes),
            AppendFate::Dead => Err(dead()),
            AppendFate::CrashAfter => {
                self.inner.append(writes)?;
                plan.die();
                Ok(())
            }
        }
    }

    fn sync(&self) -> store::Result<()> {
        if self.plan.crashed() {
            return Err(dead());
        }
        self.inner.sync()
    }

    fn read(&self, saga: SagaId) -> store::Result<Vec<(Lsn, Vec<u8>)>> {
        self.inner.read(saga)
    }

    fn meta(&self, saga: SagaId) -> store::Result<Option<SagaMeta>> {
        self.inner.meta(saga)
    }

    fn with_status(&self, status: SagaStatus) -> store::Result<Vec<SagaId>> {
        self.inner.with_status(status)
    }

    fn find_start_key(&self, key: &StartKey) -> store::Result<Option<SagaId>> {
        self.inner.find_start_key(key)
    }

    fn due(&self, until: Timestamp) -> store::Result<Vec<(Timestamp, SagaId)>> {
        self.inner.due(until)
    }

    fn drifted(&self, after: Option<SagaId>, limit: usize) -> store::Result<Vec<SagaMeta>> {
        self.inner.drifted(after, limit)
    }

    fn position(&self, name: &str) -> store::Result<Option<(Timestamp, SagaId)>> {
        self.inner.position(name)
    }

    fn set_position(&self, name: &str, at: (Timestamp, SagaId)) -> store::Result<()> {
        if self.plan.crashed() {
            return Err(dead());
        }
        self.inner.set_position(name, at)
    }

    fn finished_before(
        &self,
        until: Timestamp,
        after: Option<(Timestamp, SagaId)>,
        limit: usize,
    ) -> store::Result<Vec<(Timestamp, SagaId)>> {
        self.inner.finished_before(until, after, limit)
    }

    fn check(&self) -> store::Result<store::CheckReport> {
        if self.plan.crashed() {
            return Err(dead());
        }
        self.inner.check()
    }

    fn remove(&self, saga: SagaId) -> store::Result<()> {
        if self.plan.crashed() {
            return Err(dead());
        }
        self.inner.remove(saga)
    }

    fn remove_batch(&self, sagas: &[SagaId]) -> store::Result<()> {
        if self.plan.crashed() {
            return Err(dead());
        }
        self.inner.remove_batch(sagas)
    }
}

/// Deliveries are durable writes too: none is accepted once the process died, and the
/// plan may kill the process right before one or right after one (durable, never
/// acknowledged).
impl store::Inbox for CrashableStore {
    fn deliver(
        &self,
        key: &str,
        id: &str,
        payload: &serde_json::Value,
        at: sagaflow::Timestamp,
    ) -> store::Result<store::Delivered> {
        match self.plan.on_deliver() {
            AppendFate::Proceed => self.inner.inbox().deliver(key, id, payload, at),
            AppendFate::Dead => Err(dead()),
            AppendFate::CrashAfter => {
                self.inner.inbox().deliver(key, id, payload, at)?;
                self.plan.die();
                Err(dead())
            }
        }
    }

    fn waiting(&self, key: &str) -> store::Result<Vec<store::Delivery>> {
        self.inner.inbox().waiting(key)
    }

    fn deliveries(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> store::Result<Vec<store::Delivery>> {
        self.inner.inbox().deliveries(after, limit)
    }

    fn purge(&self, before: sagaflow::Timestamp) -> store::Result<usize> {
        if self.plan.crashed() {
            return Err(dead());
        }
        self.inner.inbox().purge(before)
    }
}
