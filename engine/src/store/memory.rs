//! An in-memory store that can crash.
//!
//! It keeps what was appended apart from what was synced: [`MemLog::crash`] throws away
//! everything appended since the last sync, which is exactly what a power loss does to a
//! real disk. Simulations run the engine on it, crash it at chosen points, and open a new
//! engine on what is left.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::clock::{Clock, Timestamp};
use crate::ids::{Lsn, SagaId, StartKey};
use crate::machine::SagaStatus;
use crate::store::codec::{self, Op};
use crate::store::inbox::{Delivered, Delivery, Inbox};
use crate::store::kv::{self, Kv};
use crate::store::lease::{Answer, Lease, Leases, OwnerId, Request};
use crate::store::lease_table::LeaseTable;
use crate::store::{Error, Result, SagaLog, SagaMeta, Write, WriteResult};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Debug, Default)]
struct Inner {
    visible: Map,
    durable: Map,
    pending: Vec<Op>,
    syncs: u64,
    fail_syncs: u32,
    /// In a shared store: the leases (kept as a database keeps them: a process crash
    /// does not touch them).
    leases: Option<LeaseTable>,
}

/// An in-memory [`SagaLog`] with separate pending and durable writes.
///
/// ```
/// use sagaflow::store::{MemLog, SagaLog};
///
/// let log = MemLog::new();
/// assert!(log.incomplete()?.is_empty());
/// log.crash(); // nothing pending: nothing lost
/// # Ok::<(), sagaflow::store::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct MemLog {
    inner: Mutex<Inner>,
    /// Held from a delivery's check for a duplicate to its sync: a duplicate is only
    /// answered once the first delivery is durable.
    delivering: Mutex<()>,
}

impl MemLog {
    /// An empty store.
    pub fn new() -> Self {
        MemLog::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated (every
        // update is a single insert or remove), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Simulates a crash: every write appended since the last sync is lost.
    pub fn crash(&self) {
        let mut inner = self.lock();
        inner.visible = inner.durable.clone();
        inner.pending.clear();
    }

    /// A store shared by several engines, as a database is: each active saga is leased
    /// to one engine for `ttl`, measured by `clock` (the store's clock; give every engine
    /// the same one in a simulation), and every write must carry the lease's epoch. For
    /// simulations of several engine processes.
    pub fn shared(clock: Arc<dyn Clock>, ttl: Duration) -> Self {
        MemLog {
            inner: Mutex::new(Inner {
                leases: Some(LeaseTable::new(clock, ttl)),
                ..Inner::default()
            }),
            delivering: Mutex::new(()),
        }
    }

    /// Runs `f` on the lease table; `None` if the store is not shared.
    fn table<T>(&self, f: impl FnOnce(&mut LeaseTable) -> T) -> Option<T> {
        self.lock().leases.as_mut().map(f)
    }

    /// Appends to a store one process owns: no lease, one result for the batch.
    fn append_local(&self, writes: Vec<Write>) -> Result<()> {
        let mut inner = self.lock();
        // The log is append-only: a write that would replace a record is refused.
        for w in &writes {
            for r in &w.records {
                if inner.visible.contains_key(&codec::log_key(w.saga, r.lsn)) {
                    return Err(Error::WouldOverwrite {
                        saga: w.saga,
                        lsn: r.lsn,
                    });
                }
            }
        }
        let mut all = Vec::new();
        for w in writes {
            all.extend(codec::ops(w)?);
        }
        for op in &all {
            apply(&mut inner.visible, op);
        }
        inner.pending.extend(all);
        Ok(())
    }

    /// In a shared store, every fenced write accepted so far, in order: (saga, the lsn of
    /// its first record, owner, epoch). Simulations check fencing against it.
    pub fn accepted_fences(&self) -> Vec<(SagaId, Option<Lsn>, OwnerId, u64)> {
        self.table(|t| t.accepted()).unwrap_or_default()
    }

    /// In a shared store, every write refused so far (fenced, or a start key taken).
    pub fn refused_writes(&self) -> Vec<crate::store::Refused> {
        self.table(|t| t.refused()).unwrap_or_default()
    }

    /// The number of successful syncs so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// The number of key-value changes appended but not yet synced.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// Makes the next `n` syncs fail (and lose nothing already durable).
    pub fn fail_next_syncs(&self, n: u32) {
        self.lock().fail_syncs = n;
    }

    /// Everything durable, in key order: two runs that should be identical can be
    /// compared byte for byte.
    pub fn dump(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.lock()
            .durable
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Sets a raw value durably, bypassing every check: for tests of damaged stores.
    #[cfg(any(test, feature = "test-support"))]
    pub fn put_raw(&self, key: &[u8], value: &[u8]) {
        let mut inner = self.lock();
        let op = Op::Put(key.to_vec(), value.to_vec());
        apply(&mut inner.visible, &op);
        apply(&mut inner.durable, &op);
    }

    /// Deletes a raw key durably, bypassing every check: for tests of damaged stores.
    #[cfg(any(test, feature = "test-support"))]
    pub fn delete_raw(&self, key: &[u8]) {
        let mut inner = self.lock();
        let op = Op::Delete(key.to_vec());
        apply(&mut inner.visible, &op);
        apply(&mut inner.durable, &op);
    }

    /// A new store holding what this one holds durably, as a disk image copied after a
    /// crash would.
    pub fn fork(&self) -> MemLog {
        let durable = self.lock().durable.clone();
        MemLog {
            inner: Mutex::new(Inner {
                visible: durable.clone(),
                durable,
                ..Inner::default()
            }),
            delivering: Mutex::new(()),
        }
    }
}

fn apply(map: &mut Map, op: &Op) {
    match op {
        Op::Put(k, v) => {
            map.insert(k.clone(), v.clone());
        }
        Op::Delete(k) => {
            map.remove(k);
        }
        Op::Add(k, delta) => match codec::add_to_count(map.get(k).map(Vec::as_slice), *delta) {
            Some(v) => {
                map.insert(k.clone(), v);
            }
            None => {
                map.remove(k);
            }
        },
        // `Op` is non-exhaustive for other crates only; every variant is handled here.
    }
}

impl Kv for MutexGuard<'_, Inner> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.visible.get(key).cloned())
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .visible
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .visible
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .last()
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn visit(&self, prefix: &[u8], from: Option<&[u8]>, f: &mut kv::Visitor<'_>) -> Result<()> {
        let start = from.filter(|s| *s > prefix).unwrap_or(prefix).to_vec();
        for (k, v) in self
            .visible
            .range(start..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            if !f(k, v)? {
                break;
            }
        }
        Ok(())
    }

    fn visit_back(
        &self,
        prefix: &[u8],
        before: Option<&[u8]>,
        f: &mut kv::Visitor<'_>,
    ) -> Result<()> {
        // Up to `before`, or to the first key past the prefix (the prefix with its last
        // byte that can grow grown by one).
        let end = before
            .filter(|b| b.starts_with(prefix))
            .map(<[u8]>::to_vec)
            .or_else(|| {
                let mut e = prefix.to_vec();
                while let Some(last) = e.pop() {
                    if last < u8::MAX {
                        e.push(last + 1);
                        return Some(e);
                    }
                }
                None
            });
        let walk: Box<dyn DoubleEndedIterator<Item = (&Vec<u8>, &Vec<u8>)>> = match end {
            Some(e) => Box::new(self.visible.range(prefix.to_vec()..e)),
            None => Box::new(self.visible.range(prefix.to_vec()..)),
        };
        for (k, v) in walk.rev() {
            if !k.starts_with(prefix) || !f(k, v)? {
                break;
            }
        }
        Ok(())
    }
}

impl SagaLog for MemLog {
    fn inbox(&self) -> &dyn Inbox {
        self
    }

    fn check(&self) -> Result<super::check::Report> {
        let mut inner = self.lock();
        let (report, ops) = super::check::check(&inner)?;
        for op in &ops {
            apply(&mut inner.visible, op);
        }
        // Made durable at once, like the sled store's repairs (which sync).
        for op in &ops {
            apply(&mut inner.durable, op);
        }
        Ok(report)
    }

    fn append(&self, writes: Vec<Write>) -> Result<()> {
        if self.lock().leases.is_some() {
            // A shared store answers each write; refusals are errors here.
            for r in self.append_each(writes)? {
                r.map_err(|e| Error::Backend(e.to_string()))?;
            }
            return Ok(());
        }
        self.append_local(writes)
    }

    fn append_each(&self, writes: Vec<Write>) -> Result<Vec<WriteResult>> {
        let mut inner = self.lock();
        let Some(mut table) = inner.leases.take() else {
            drop(inner);
            let n = writes.len();
            self.append_local(writes)?;
            return Ok(vec![Ok(()); n]);
        };
        let mut results = Vec::with_capacity(writes.len());
        let mut outcome = Ok(());
        for w in writes {
            let holder = match &w.meta.start_key {
                Some(k) if w.previous.is_none() => kv::find_start_key(&inner, k),
                _ => Ok(None),
            };
            let admitted = holder.map(|h| table.admit(&w, h));
            match admitted {
                Ok(Ok(())) => {}
                Ok(Err(refused)) => {
                    results.push(Err(refused));
                    continue;
                }
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
            if let Some(r) = w
                .records
                .iter()
                .find(|r| inner.visible.contains_key(&codec::log_key(w.saga, r.lsn)))
            {
                outcome = Err(Error::WouldOverwrite {
                    saga: w.saga,
                    lsn: r.lsn,
                });
                break;
            }
            table.applied(&w);
            let ops = match codec::ops(w) {
                Ok(ops) => ops,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            for op in &ops {
                apply(&mut inner.visible, op);
            }
            inner.pending.extend(ops);
            results.push(Ok(()));
        }
        inner.leases = Some(table);
        outcome.map(|()| results)
    }

    fn leases(&self) -> Option<&dyn Leases> {
        self.lock().leases.is_some().then_some(self as &dyn Leases)
    }

    fn sync(&self) -> Result<()> {
        let mut inner = self.lock();
        if inner.fail_syncs > 0 {
            inner.fail_syncs -= 1;
            return Err(Error::Injected("sync failed".into()));
        }
        let pending = std::mem::take(&mut inner.pending);
        for op in &pending {
            apply(&mut inner.durable, op);
        }
        inner.syncs += 1;
        Ok(())
    }

    fn read(&self, saga: SagaId) -> Result<Vec<(Lsn, Vec<u8>)>> {
        kv::read(&self.lock(), saga)
    }

    fn meta(&self, saga: SagaId) -> Result<Option<SagaMeta>> {
        kv::meta(&self.lock(), saga)
    }

    fn with_status(&self, status: SagaStatus) -> Result<Vec<SagaId>> {
        kv::with_status(&self.lock(), status)
    }

    fn page(
        &self,
        status: Option<SagaStatus>,
        after: Option<SagaId>,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<SagaMeta>> {
        kv::page(&self.lock(), status, after, limit, newest_first)
    }

    fn counts(&self) -> Result<crate::store::Counts> {
        kv::counts(&self.lock())
    }

    fn find_start_key(&self, key: &StartKey) -> Result<Option<SagaId>> {
        kv::find_start_key(&self.lock(), key)
    }

    fn finished_before(
        &self,
        until: Timestamp,
        after: Option<(Timestamp, SagaId)>,
        limit: usize,
    ) -> Result<Vec<(Timestamp, SagaId)>> {
        kv::finished_before(&self.lock(), until, after, limit)
    }

    fn due(&self, until: Timestamp) -> Result<Vec<(Timestamp, SagaId)>> {
        kv::due(&self.lock(), until)
    }

    fn drifted(&self, after: Option<SagaId>, limit: usize) -> Result<Vec<SagaMeta>> {
        kv::drifted(&self.lock(), after, limit)
    }

    fn position(&self, name: &str) -> Result<Option<(Timestamp, SagaId)>> {
        kv::position(&self.lock(), name)
    }

    fn set_position(&self, name: &str, at: (Timestamp, SagaId)) -> Result<()> {
        let op = Op::Put(codec::position_key(name), codec::encode_position(at)?);
        let mut inner = self.lock();
        if kv::position(&inner, name)?.is_some_and(|p| p >= at) {
            return Ok(());
        }
        // A write of its own, durable at once, like a delivery: the pending writes of
        // the group commit stay pending.
        apply(&mut inner.visible, &op);
        apply(&mut inner.durable, &op);
        Ok(())
    }

    fn remove(&self, saga: SagaId) -> Result<()> {
        let mut inner = self.lock();
        let ops = kv::removal(&inner, saga)?;
        if let Some(t) = inner.leases.as_mut() {
            t.removed(saga);
        }
        for op in &ops {
            apply(&mut inner.visible, op);
        }
        inner.pending.extend(ops);
        Ok(())
    }
}

impl Leases for MemLog {
    fn ttl(&self) -> Duration {
        self.table(|t| t.ttl()).unwrap_or_default()
    }

    fn claim(&self, owner: &OwnerId, limit: usize, definitions: &[String]) -> Result<Vec<Lease>> {
        Ok(self
            .table(|t| t.claim(owner, limit, definitions))
            .unwrap_or_default())
    }

    fn acquire(&self, owner: &OwnerId, saga: SagaId) -> Result<Option<Lease>> {
        let exists = self.meta(saga)?.is_some();
        Ok(self.table(|t| t.acquire(owner, saga, exists)).flatten())
    }

    fn renew(&self, owner: &OwnerId) -> Result<Vec<Lease>> {
        Ok(self.table(|t| t.renew(owner)).unwrap_or_default())
    }

    fn release(&self, owner: &OwnerId, lease: Lease, wake_at: Option<Timestamp>) -> Result<()> {
        self.table(|t| t.release(owner, lease, wake_at));
        Ok(())
    }

    fn holder(&self, saga: SagaId) -> Result<Option<(OwnerId, u64)>> {
        Ok(self.table(|t| t.holder(saga)).flatten())
    }

    fn request(&self, saga: SagaId, action: &str, operator: &str, reason: &str) -> Result<u64> {
        self.table(|t| t.request(saga, action, operator, reason))
            .ok_or_else(|| Error::Backend("not a shared store".into()))
    }

    fn requests_for(&self, owner: &OwnerId) -> Result<Vec<Request>> {
        Ok(self.table(|t| t.requests_for(owner)).unwrap_or_default())
    }

    fn answer(&self, id: u64, answer: &Answer) -> Result<bool> {
        Ok(self.table(|t| t.answer(id, answer)).unwrap_or(false))
    }

    fn answer_of(&self, id: u64) -> Result<Option<Answer>> {
        Ok(self.table(|t| t.answer_of(id)).flatten())
    }
}

impl Inbox for MemLog {
    fn deliver(
        &self,
        key: &str,
        id: &str,
        payload: &serde_json::Value,
        at: Timestamp,
    ) -> Result<Delivered> {
        let _one_at_a_time = self.delivering.lock().unwrap_or_else(|p| p.into_inner());
        let k = codec::inbox_key(key, id)?;
        let value = codec::encode_delivery(payload, at)?;
        let seen = {
            let mut inner = self.lock();
            let seen = inner.visible.contains_key(&k);
            if !seen {
                // Durable at once, as a write of its own: the group commit's pending
                // writes are not made durable by it (a crash still loses exactly those).
                // A taken mark left from a delivery purged meanwhile is not this one's.
                let ops = [Op::Delete(codec::taken_key(key, id)?), Op::Put(k, value)];
                for op in &ops {
                    apply(&mut inner.visible, op);
                    apply(&mut inner.durable, op);
                }
            }
            seen
        };
        Ok(if seen {
            Delivered::Duplicate
        } else {
            Delivered::New
        })
    }

    fn waiting(&self, key: &str) -> Result<Vec<Delivery>> {
        kv::inbox_waiting(&self.lock(), key)
    }

    fn deliveries(&self, after: Option<(&str, &str)>, limit: usize) -> Result<Vec<Delivery>> {
        kv::inbox_deliveries(&self.lock(), after, limit)
    }

    fn purge(&self, before: Timestamp) -> Result<usize> {
        let mut inner = self.lock();
        let ops = kv::inbox_purge_ops(&inner, before)?;
        // A write of its own, like a delivery: other pending writes stay pending.
        for op in &ops {
            apply(&mut inner.visible, op);
            apply(&mut inner.durable, op);
        }
        Ok(ops.len() / 2)
    }
}
