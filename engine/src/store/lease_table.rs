//! The lease rules of a shared store, kept in memory: what [`super::MemLog::shared`]
//! uses so that simulations can run several engines over one store under virtual time.
//! The PostgreSQL store states the same rules in SQL; the conformance suite holds both
//! to them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, Timestamp};
use crate::ids::SagaId;
use crate::store::lease::{Answer, Fence, Lease, OwnerId, Refused, Request};
use crate::store::Write;

#[derive(Clone, Debug)]
struct Row {
    owner: Option<OwnerId>,
    epoch: u64,
    until: Timestamp,
    /// While released: when it becomes claimable.
    wake_at: Option<Timestamp>,
    active: bool,
    definition: String,
}

/// The leases and requests of a shared in-memory store.
#[derive(Debug)]
pub(crate) struct LeaseTable {
    clock: Arc<dyn Clock>,
    ttl: Duration,
    rows: BTreeMap<SagaId, Row>,
    requests: Vec<(Request, Option<Answer>)>,
    /// Every fenced write accepted, in order: what the simulations check fencing by.
    accepted: Vec<(SagaId, Option<crate::ids::Lsn>, OwnerId, u64)>,
    refused: Vec<Refused>,
}

impl LeaseTable {
    pub(crate) fn new(clock: Arc<dyn Clock>, ttl: Duration) -> Self {
        LeaseTable {
            clock,
            ttl,
            rows: BTreeMap::new(),
            requests: Vec::new(),
            accepted: Vec::new(),
            refused: Vec::new(),
        }
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    fn until(&self) -> Timestamp {
        self.clock.now().saturating_add(self.ttl)
    }

    /// Every fenced write accepted so far: (saga, its first lsn, owner, epoch).
    pub(crate) fn accepted(&self) -> Vec<(SagaId, Option<crate::ids::Lsn>, OwnerId, u64)> {
        self.accepted.clone()
    }

    /// Every write refused so far, in order.
    pub(crate) fn refused(&self) -> Vec<Refused> {
        self.refused.clone()
    }

    /// Whether `write` may be applied, given `key_holder`, the saga already holding its
    /// start key (for a first write).
    pub(crate) fn admit(&mut self, w: &Write, key_holder: Option<SagaId>) -> Result<(), Refused> {
        let verdict = self.verdict(w, key_holder);
        if let Err(r) = &verdict {
            self.refused.push(r.clone());
        }
        verdict
    }

    fn verdict(&self, w: &Write, key_holder: Option<SagaId>) -> Result<(), Refused> {
        let carried = w.fence.as_ref().map_or(0, |f| f.epoch);
        let current = self.rows.get(&w.saga).map_or(0, |r| r.epoch);
        let fenced = Refused::Fenced {
            saga: w.saga,
            carried,
            current,
        };
        let Some(fence) = &w.fence else {
            // A shared store takes no write from outside the lease protocol.
            return Err(fenced);
        };
        match (self.rows.get(&w.saga), &w.previous) {
            (None, None) => match (key_holder, &w.meta.start_key) {
                (Some(existing), Some(key)) if existing != w.saga => Err(Refused::StartKeyTaken {
                    key: key.clone(),
                    existing,
                }),
                _ => Ok(()),
            },
            (Some(r), _) if r.owner.as_ref() == Some(&fence.owner) && r.epoch == fence.epoch => {
                Ok(())
            }
            _ => Err(fenced),
        }
    }

    /// Records an admitted write: a first write creates the lease; a write that ends the
    /// saga lets the lease go.
    pub(crate) fn applied(&mut self, w: &Write) {
        let until = self.until();
        let active = w.meta.status.is_active();
        if let Some(Fence { owner, epoch }) = &w.fence {
            self.accepted.push((
                w.saga,
                w.records.first().map(|r| r.lsn),
                owner.clone(),
                *epoch,
            ));
            let row = self.rows.entry(w.saga).or_insert_with(|| Row {
                owner: Some(owner.clone()),
                epoch: *epoch,
                until,
                wake_at: None,
                active,
                definition: w.meta.definition.clone(),
            });
            row.active = active;
            if !active {
                row.owner = None;
            }
        }
    }

    pub(crate) fn removed(&mut self, saga: SagaId) {
        self.rows.remove(&saga);
    }

    pub(crate) fn claim(
        &mut self,
        owner: &OwnerId,
        limit: usize,
        definitions: &[String],
    ) -> Vec<Lease> {
        let now = self.clock.now();
        let until = self.until();
        let mut out = Vec::new();
        for (saga, row) in self.rows.iter_mut() {
            if out.len() >= limit {
                break;
            }
            let claimable = row.active
                && definitions.contains(&row.definition)
                && match &row.owner {
                    None => row.wake_at.is_none_or(|t| t <= now),
                    Some(o) => o != owner && row.until < now,
                };
            if claimable {
                row.epoch = row.epoch.saturating_add(1);
                row.owner = Some(owner.clone());
                row.until = until;
                row.wake_at = None;
                out.push(Lease {
                    saga: *saga,
                    epoch: row.epoch,
                });
            }
        }
        out
    }

    /// `exists`: whether the saga is in the store (a lease row is made for a saga that
    /// has none, one written before the store was shared).
    pub(crate) fn acquire(&mut self, owner: &OwnerId, saga: SagaId, exists: bool) -> Option<Lease> {
        let now = self.clock.now();
        let until = self.until();
        let row = match self.rows.get_mut(&saga) {
            Some(r) => r,
            None if exists => self.rows.entry(saga).or_insert(Row {
                owner: None,
                epoch: 0,
                until: now,
                wake_at: None,
                active: false,
                definition: String::new(),
            }),
            None => return None,
        };
        let free = match &row.owner {
            None => true,
            Some(o) => o == owner || row.until < now,
        };
        if !free {
            return None;
        }
        row.epoch = row.epoch.saturating_add(1);
        row.owner = Some(owner.clone());
        row.until = until;
        row.wake_at = None;
        Some(Lease {
            saga,
            epoch: row.epoch,
        })
    }

    pub(crate) fn renew(&mut self, owner: &OwnerId) -> Vec<Lease> {
        let until = self.until();
        self.rows
            .iter_mut()
            .filter(|(_, r)| r.owner.as_ref() == Some(owner))
            .map(|(saga, r)| {
                r.until = until;
                Lease {
                    saga: *saga,
                    epoch: r.epoch,
                }
            })
            .collect()
    }

    pub(crate) fn release(&mut self, owner: &OwnerId, lease: Lease, wake_at: Option<Timestamp>) {
        if let Some(r) = self.rows.get_mut(&lease.saga) {
            if r.owner.as_ref() == Some(owner) && r.epoch == lease.epoch {
                r.owner = None;
                r.wake_at = wake_at;
            }
        }
    }

    pub(crate) fn holder(&self, saga: SagaId) -> Option<(OwnerId, u64)> {
        let now = self.clock.now();
        let r = self.rows.get(&saga)?;
        match &r.owner {
            Some(o) if r.until >= now => Some((o.clone(), r.epoch)),
            _ => None,
        }
    }

    pub(crate) fn request(
        &mut self,
        saga: SagaId,
        action: &str,
        operator: &str,
        reason: &str,
    ) -> u64 {
        let id = self.requests.len() as u64 + 1;
        self.requests.push((
            Request {
                id,
                saga,
                action: action.to_string(),
                operator: operator.to_string(),
                reason: reason.to_string(),
            },
            None,
        ));
        id
    }

    pub(crate) fn requests_for(&self, owner: &OwnerId) -> Vec<Request> {
        self.requests
            .iter()
            .filter(|(r, a)| {
                a.is_none()
                    && self
                        .rows
                        .get(&r.saga)
                        .is_some_and(|row| row.owner.as_ref() == Some(owner))
            })
            .map(|(r, _)| r.clone())
            .collect()
    }

    pub(crate) fn answer(&mut self, id: u64, answer: &Answer) -> bool {
        let slot = id
            .checked_sub(1)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.requests.get_mut(i));
        match slot {
            Some((_, a @ None)) => {
                *a = Some(answer.clone());
                true
            }
            _ => false,
        }
    }

    pub(crate) fn answer_of(&self, id: u64) -> Option<Answer> {
        let i = usize::try_from(id.checked_sub(1)?).ok()?;
        self.requests.get(i).and_then(|(_, a)| a.clone())
    }
}
