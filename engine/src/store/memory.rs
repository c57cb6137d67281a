//! An in-memory store that can crash.
//!
//! It keeps what was appended apart from what was synced: [`MemLog::crash`] throws away
//! everything appended since the last sync, which is exactly what a power loss does to a
//! real disk. Simulations run the engine on it, crash it at chosen points, and open a new
//! engine on what is left.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::clock::Timestamp;
use crate::ids::{Lsn, SagaId, StartKey};
use crate::machine::SagaStatus;
use crate::store::codec::{self, Op};
use crate::store::kv::{self, Kv};
use crate::store::{Error, Result, SagaLog, SagaMeta, Write};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Debug, Default)]
struct Inner {
    visible: Map,
    durable: Map,
    pending: Vec<Op>,
    syncs: u64,
    fail_syncs: u32,
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
    pub fn put_raw(&self, key: &[u8], value: &[u8]) {
        let mut inner = self.lock();
        let op = Op::Put(key.to_vec(), value.to_vec());
        apply(&mut inner.visible, &op);
        apply(&mut inner.durable, &op);
    }

    /// Deletes a raw key durably, bypassing every check: for tests of damaged stores.
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
}

impl SagaLog for MemLog {
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
        let mut inner = self.lock();
        // The log is append-only: a write that would replace a record is refused.
        for w in &writes {
            for (lsn, _) in &w.records {
                if inner.visible.contains_key(&codec::log_key(w.saga, *lsn)) {
                    return Err(Error::WouldOverwrite {
                        saga: w.saga,
                        lsn: *lsn,
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

    fn remove(&self, saga: SagaId) -> Result<()> {
        let mut inner = self.lock();
        let ops = kv::removal(&inner, saga)?;
        for op in &ops {
            apply(&mut inner.visible, op);
        }
        inner.pending.extend(ops);
        Ok(())
    }
}
