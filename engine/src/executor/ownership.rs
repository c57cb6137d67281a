//! Sharing a store with other engine processes (G9): the lease task, adopting a saga
//! nobody drives, and asking another process's driver for a repair.
//!
//! One task per engine renews every lease this process holds, in one store call every
//! third of a lease, and gives back leases it holds without driving the saga (a driver
//! that stopped on a store error). Another claims sagas whose lease expired (or whose
//! timer is due after they were handed back) and picks up the repairs other processes
//! recorded for its sagas, every `lease_tick`. Renewals have their own task so that a
//! large takeover, which reads every claimed saga's log, never delays them. Neither
//! task's calls depend on the number of sagas or definitions: an idle engine makes two
//! store calls a tick plus one renewal every third of a lease.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::executor::{lock, Asked, Driver, Inner};
use crate::ids::SagaId;
use crate::machine::{Repair, SagaStatus};
use crate::recovery::{self, RecoveryReport};
use crate::store::{Answer, Lease, OwnerId, SagaMeta};

/// A request as stored for another process: the repair or the cancellation.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Stored {
    Repair(Repair),
    Cancel,
}

impl From<&Asked> for Stored {
    fn from(a: &Asked) -> Self {
        match a {
            Asked::Repair(r) => Stored::Repair(r.clone()),
            Asked::Cancel => Stored::Cancel,
        }
    }
}

impl From<Stored> for Asked {
    fn from(s: Stored) -> Self {
        match s {
            Stored::Repair(r) => Asked::Repair(r),
            Stored::Cancel => Asked::Cancel,
        }
    }
}

/// Claims batch after batch while full batches come back (a dead process's sagas are
/// taken over at once, not a batch per tick), until the engine stops.
pub(crate) async fn claim_all(inner: &Arc<Inner>, report: &mut RecoveryReport) -> Result<()> {
    while claim_once(inner, report).await? >= inner.options.claim_batch.max(1) {
        if *inner.stopping.borrow() {
            break;
        }
    }
    Ok(())
}

/// Claims up to a batch of claimable sagas and hands each to a driver, as recovery
/// does at open. Returns how many were claimed.
async fn claim_once(inner: &Arc<Inner>, report: &mut RecoveryReport) -> Result<usize> {
    let owner = inner.owner.clone();
    let batch = inner.options.claim_batch;
    let definitions = inner.definition_names();
    let leases = inner
        .lease_io(move |l| l.claim(&owner, batch.max(1), &definitions))
        .await?
        .unwrap_or_default();
    let n = leases.len();
    if n == 0 {
        return Ok(0);
    }
    // Every claimed saga's log and summary in one store call, not two per saga.
    let ids: Vec<SagaId> = leases.iter().map(|l| l.saga).collect();
    let loaded = match inner.io(move |store| store.load(&ids)).await? {
        Ok(l) => l,
        Err(e) => {
            for lease in leases {
                give_back(inner, lease).await;
            }
            return Err(e.into());
        }
    };
    let mut loaded: std::collections::HashMap<SagaId, crate::store::Loaded> =
        loaded.into_iter().map(|l| (l.saga, l)).collect();
    for lease in leases {
        tracing::info!(saga_id = %lease.saga, epoch = lease.epoch, "claimed saga");
        inner.metrics.claimed();
        let recovered = match loaded.remove(&lease.saga) {
            Some(l) => recovery::recover_loaded(inner, l, report, Some(lease.epoch)).await,
            None => Err(Error::UnknownSaga(lease.saga)),
        };
        if let Err(e) = recovered {
            tracing::error!(saga_id = %lease.saga, error = %e, "recovery of a claimed saga failed");
            report.failed.push((lease.saga, e.to_string()));
            give_back(inner, lease).await;
        }
    }
    Ok(n)
}

/// Lets a lease go at once (a driver could not be started for it): it is claimed again
/// at a later tick.
pub(crate) async fn give_back(inner: &Arc<Inner>, lease: Lease) {
    let owner = inner.owner.clone();
    let released = inner
        .lease_io(move |l| l.release(&owner, lease, None))
        .await;
    if let Err(e) = released {
        tracing::warn!(saga_id = %lease.saga, error = %e, "could not give a lease back");
    }
}

/// Takes the lease of a saga no process drives (a finished one) for one write of this
/// process, waiting while another process holds it for a write of its own, up to two
/// leases' time.
///
/// # Errors
///
/// [`Error::Store`] if it is still held then, or the store fails.
pub(crate) async fn adopt(inner: &Arc<Inner>, id: SagaId) -> Result<Lease> {
    let ttl = inner
        .store
        .leases()
        .map_or(Duration::from_secs(10), |l| l.ttl());
    let give_up = inner.clock.now().saturating_add(ttl.saturating_mul(2));
    loop {
        let owner = inner.owner.clone();
        if let Some(lease) = inner
            .lease_io(move |l| l.acquire(&owner, id))
            .await?
            .flatten()
        {
            return Ok(lease);
        }
        let now = inner.clock.now();
        if now >= give_up || *inner.stopping.borrow() {
            return Err(Error::Store(Arc::new(crate::store::Error::Backend(
                format!("saga {id} is held by another process"),
            ))));
        }
        inner
            .clock
            .sleep_until(now.saturating_add(Duration::from_millis(50)))
            .await;
    }
}

/// Renews this process's leases every third of a lease, and gives back those it holds
/// without a driver here (seen so at two renewals in a row, so that a saga being
/// claimed and started meanwhile is not given back).
pub(crate) async fn renew(inner: Arc<Inner>) {
    let Some(ttl) = inner.store.leases().map(|l| l.ttl()) else {
        return;
    };
    let every = (ttl / 3).max(Duration::from_millis(10));
    let mut stopping = inner.renewals_stop.subscribe();
    let mut orphans: std::collections::HashSet<SagaId> = std::collections::HashSet::new();
    loop {
        if *stopping.borrow_and_update() {
            return;
        }
        let owner = inner.owner.clone();
        match inner.lease_io(move |l| l.renew(&owner)).await {
            Ok(Some(held)) => {
                inner.metrics.leases_held(held.len());
                let undriven: std::collections::HashSet<SagaId> = {
                    let running = lock(&inner.running);
                    held.iter()
                        .map(|l| l.saga)
                        .filter(|id| !running.contains_key(id))
                        .collect()
                };
                for lease in held.iter().filter(|l| orphans.contains(&l.saga)) {
                    if undriven.contains(&lease.saga) {
                        tracing::info!(saga_id = %lease.saga, "giving back a lease no driver here uses");
                        give_back(&inner, *lease).await;
                    }
                }
                orphans = undriven;
            }
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
        }
        let next = inner.clock.now().saturating_add(every);
        tokio::select! {
            biased;
            _ = stopping.changed() => return,
            () = inner.clock.sleep_until(next) => {}
        }
    }
}

/// Claims expired leases and answers requests, every `lease_tick`.
pub(crate) async fn run(inner: Arc<Inner>) {
    if inner.store.leases().is_none() {
        return;
    }
    let tick = inner.options.lease_tick.max(Duration::from_millis(10));
    let mut stopping = inner.stopping.subscribe();
    // A recorded request wakes this task at once where the store says so (NOTIFY);
    // the tick is the fallback.
    let mut hint = inner
        .store
        .leases()
        .and_then(|l| l.changes())
        .map(|c| c.requests);
    // Requests being applied: each waits for its saga's attempt to settle, on a task of
    // its own, so that claims here never wait for an attempt.
    let in_hand: Arc<std::sync::Mutex<std::collections::HashSet<u64>>> = Arc::default();
    loop {
        if *stopping.borrow_and_update() {
            return;
        }
        if let Err(e) = claim_all(&inner, &mut RecoveryReport::default()).await {
            tracing::warn!(error = %e, "claiming sagas failed");
        }
        answer_requests(&inner, &in_hand).await;
        let next = inner.clock.now().saturating_add(tick);
        // Woken by a request, only requests are looked at again before the tick.
        loop {
            tokio::select! {
                biased;
                _ = stopping.changed() => return,
                () = inner.clock.sleep_until(next) => break,
                true = changed(&mut hint) => answer_requests(&inner, &in_hand).await,
            }
        }
    }
}

/// Whether a hint moved (`false` at once if there is none, so a `select!` branch that
/// waits on it is disabled).
async fn changed(hint: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match hint {
        Some(rx) => rx.changed().await.is_ok(),
        None => false,
    }
}

/// Hands the requests other processes recorded for sagas this one drives to their
/// drivers, each on a task of its own that records the answer.
async fn answer_requests(
    inner: &Arc<Inner>,
    in_hand: &Arc<std::sync::Mutex<std::collections::HashSet<u64>>>,
) {
    let owner = inner.owner.clone();
    let requests = match inner.lease_io(move |l| l.requests_for(&owner)).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "reading requests failed");
            return;
        }
    };
    for r in requests {
        if !lock(in_hand).insert(r.id) {
            continue;
        }
        // The id stays in `in_hand` for good: a list read before the answer was
        // recorded must not apply the request a second time. (Requests are operator
        // actions: a few a day, not a growing load.)
        let inner = inner.clone();
        lock(&inner.clone().tasks).spawn(async move {
            answer_one(&inner, r).await;
        });
    }
}

async fn answer_one(inner: &Arc<Inner>, r: crate::store::Request) {
    {
        let answer = match serde_json::from_str::<Stored>(&r.action) {
            Err(e) => Answer::Refused(format!("request not understood: {e}")),
            Ok(action) => {
                let _one_at_a_time = inner.repair_lock.lock().await;
                match inner
                    .ask_driver(r.saga, action.into(), &r.operator, &r.reason)
                    .await
                {
                    Some(Ok(meta)) => match serde_json::to_string(&meta) {
                        Ok(json) => Answer::Applied(json),
                        Err(e) => Answer::Refused(e.to_string()),
                    },
                    Some(Err(e)) => Answer::Refused(e.to_string()),
                    None => Answer::NotDriven,
                }
            }
        };
        // The request was applied (or refused): its answer is recorded, never the
        // request applied again. Tried until the store takes it, a second apart.
        let id = r.id;
        let mut tries = 0u32;
        loop {
            let answer = answer.clone();
            let recorded = inner.lease_io(move |l| l.answer(id, &answer)).await;
            match recorded {
                Ok(_) => break,
                Err(e) => {
                    tries += 1;
                    tracing::warn!(request = id, error = %e, tries, "recording an answer failed");
                    if *inner.stopping.borrow() || tries >= 60 {
                        break;
                    }
                    let next = inner.clock.now().saturating_add(Duration::from_secs(1));
                    inner.clock.sleep_until(next).await;
                }
            }
        }
    }
}

/// What [`ask_elsewhere`] came to.
pub(crate) enum Elsewhere {
    /// The owner applied or refused it: its answer (boxed: a summary is large, and the
    /// other variant is a number).
    Answered(Box<Result<SagaMeta>>),
    /// Nobody else drives the saga: this process holds its lease now, under this epoch,
    /// and drives it if it is active.
    Adopted(u64),
}

/// Gets a repair or cancellation applied to a saga this process does not drive: by its
/// owner, through a request in the store, or, if no live process holds it, by taking
/// its lease here.
pub(crate) async fn ask_elsewhere(
    inner: &Arc<Inner>,
    id: SagaId,
    action: &Asked,
    operator: &str,
    reason: &str,
) -> Result<Elsewhere> {
    let me = inner.owner.clone();
    let ttl = inner
        .store
        .leases()
        .map_or(Duration::from_secs(10), |l| l.ttl());
    loop {
        match holder_of(inner, id).await? {
            Some(owner) if owner != me => {
                if let Some(answer) = ask_owner(inner, id, action, operator, reason, ttl).await? {
                    return Ok(Elsewhere::Answered(Box::new(answer)));
                }
            }
            _ => {
                let owner = me.clone();
                let lease = inner
                    .lease_io(move |l| l.acquire(&owner, id))
                    .await?
                    .flatten();
                if let Some(lease) = lease {
                    return Ok(Elsewhere::Adopted(lease.epoch));
                }
                // Somebody took it between the two calls: ask them.
            }
        }
        if *inner.stopping.borrow() {
            return Err(Error::ShuttingDown);
        }
    }
}

/// Records a request for the saga's owner and waits for its answer, as long as that
/// owner holds the saga (it answers once the attempt in flight settles, as a local
/// driver would). `None`: the owner lost the saga or does not drive it; the caller
/// tries again.
async fn ask_owner(
    inner: &Arc<Inner>,
    id: SagaId,
    action: &Asked,
    operator: &str,
    reason: &str,
    ttl: Duration,
) -> Result<Option<Result<SagaMeta>>> {
    let json = serde_json::to_string(&Stored::from(action))
        .map_err(|e| Error::Store(Arc::new(crate::store::Error::Backend(e.to_string()))))?;
    let (op, why) = (operator.to_string(), reason.to_string());
    let request = inner
        .lease_io(move |l| l.request(id, &json, &op, &why))
        .await?;
    let Some(request) = request else {
        return Ok(None);
    };
    let owner = holder_of(inner, id).await?;
    let mut next_look = inner.clock.now().saturating_add(ttl);
    let mut hint = outcomes_hint(inner);
    loop {
        let answer = inner
            .lease_io(move |l| l.answer_of(request))
            .await?
            .flatten();
        let gone = if answer.is_none() && inner.clock.now() >= next_look {
            next_look = inner.clock.now().saturating_add(ttl);
            let now_held = holder_of(inner, id).await?;
            now_held.is_none() || now_held != owner
        } else {
            false
        };
        let answer = match answer {
            Some(a) => a,
            None if gone => {
                // Withdraw it; if the owner answered meanwhile, that answer stands.
                let recorded = inner
                    .lease_io(move |l| l.answer(request, &Answer::NotDriven))
                    .await?
                    .unwrap_or(false);
                if recorded {
                    return Ok(None);
                }
                continue;
            }
            None => {
                if *inner.stopping.borrow() {
                    return Err(Error::ShuttingDown);
                }
                nap(inner, &mut hint).await;
                continue;
            }
        };
        return Ok(match answer {
            Answer::Applied(json) => Some(serde_json::from_str::<SagaMeta>(&json).map_err(|e| {
                Error::Store(Arc::new(crate::store::Error::Backend(format!(
                    "the owner's answer does not decode: {e}"
                ))))
            })),
            Answer::Refused(why) => Some(Err(match action {
                Asked::Cancel => Error::CancelRefused {
                    saga: id,
                    reason: why,
                },
                Asked::Repair(_) => Error::RepairRefused {
                    saga: id,
                    reason: why,
                },
            })),
            Answer::NotDriven => None,
        });
    }
}

/// Waits, by reading the store, until a saga driven by another process (or by nobody
/// for now) is no longer active.
pub(crate) async fn wait_in_store(inner: &Arc<Inner>, id: SagaId) -> Result<SagaStatus> {
    let mut hint = outcomes_hint(inner);
    loop {
        let meta = inner.io(move |store| store.meta(id)).await??;
        match meta {
            None => return Err(Error::UnknownSaga(id)),
            Some(m) if !m.status.is_active() => return Ok(m.status),
            Some(_) => {}
        }
        // Adopted here meanwhile: the local driver will publish.
        if lock(&inner.running).contains_key(&id) {
            return Ok(SagaStatus::Running);
        }
        if *inner.stopping.borrow() {
            return Err(Error::ShuttingDown);
        }
        nap(inner, &mut hint).await;
    }
}

/// Who holds the saga's lease unexpired now, if anybody.
async fn holder_of(inner: &Arc<Inner>, id: SagaId) -> Result<Option<OwnerId>> {
    Ok(inner
        .lease_io(move |l| l.holder(id))
        .await?
        .flatten()
        .map(|(owner, _)| owner))
}

/// The hint that a saga ended or a request was answered anywhere (NOTIFY), if the
/// store gives one.
fn outcomes_hint(inner: &Inner) -> Option<tokio::sync::watch::Receiver<u64>> {
    inner
        .store
        .leases()
        .and_then(|l| l.changes())
        .map(|c| c.outcomes)
}

/// One pause of a waiter that reads the store: a quarter of a lease tick, or less if
/// `hint` moves first.
async fn nap(inner: &Inner, hint: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    let poll = (inner.options.lease_tick / 4).max(Duration::from_millis(5));
    let next = inner.clock.now().saturating_add(poll);
    tokio::select! {
        () = inner.clock.sleep_until(next) => {}
        true = changed(hint) => {}
    }
}

/// Gives back every lease this process holds, so that the others take its sagas over at
/// once rather than a lease later (a clean shutdown).
pub(crate) fn release_all(inner: &Inner) {
    let Some(leases) = inner.store.leases() else {
        return;
    };
    let owner: &OwnerId = &inner.owner;
    match leases.renew(owner) {
        Ok(held) => {
            for lease in held {
                if let Err(e) = leases.release(owner, lease, None) {
                    tracing::warn!(saga_id = %lease.saga, error = %e, "could not release a lease");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not list leases to release"),
    }
}

/// Starts a driver for an adopted saga, or gives its lease back if one runs here
/// already (it is stale and will be fenced).
pub(crate) async fn drive_adopted(inner: &Arc<Inner>, driver: Driver, lease: Lease) {
    if !inner.spawn(driver) {
        give_back(inner, lease).await;
    }
}
