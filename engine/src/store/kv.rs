//! The reads every store shares, written once over an ordered key-value view.

use crate::clock::Timestamp;
use crate::ids::{Lsn, SagaId, StartKey};
use crate::machine::SagaStatus;
use crate::store::codec::{self, Op};
use crate::store::inbox::Delivery;
use crate::store::{Result, SagaMeta};

/// What [`Kv::visit`] calls with each key and value; `Ok(false)` stops the walk.
pub(crate) type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool> + 'a;

/// An ordered key-value map, as a store sees its own data.
pub(crate) trait Kv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Every pair whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// The pair with the greatest key that starts with `prefix`.
    fn last(&self, prefix: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>>;
    /// Calls `f` with every pair whose key starts with `prefix` (and is at least `from`,
    /// if given), in key order, without collecting them, until `f` says stop (the
    /// consistency check reads the whole store this way).
    fn visit(&self, prefix: &[u8], from: Option<&[u8]>, f: &mut Visitor<'_>) -> Result<()>;
    /// As [`Kv::visit`], backwards: from the greatest key below `before` (if given).
    fn visit_back(&self, prefix: &[u8], before: Option<&[u8]>, f: &mut Visitor<'_>) -> Result<()>;
}

/// Summaries of the sagas with `status` (all if `None`), in id order after `after` (or
/// before it, newest first), at most `limit`: a walk of the status index (or of the
/// summaries), never of the whole store.
pub(crate) fn page(
    kv: &impl Kv,
    status: Option<SagaStatus>,
    after: Option<SagaId>,
    limit: usize,
    newest_first: bool,
) -> Result<Vec<SagaMeta>> {
    let prefix = match status {
        Some(s) => codec::status_prefix(s),
        None => vec![b'M'],
    };
    let mut ids = Vec::new();
    let cursor = after.map(|id| {
        let mut k = prefix.clone();
        k.extend_from_slice(id.as_bytes());
        k
    });
    let mut take = |k: &[u8], _: &[u8]| -> Result<bool> {
        if ids.len() >= limit {
            return Ok(false);
        }
        // A malformed key is the consistency check's business (it runs at open).
        let Ok(id) = codec::saga_of_index_key(k) else {
            return Ok(true);
        };
        if Some(id) != after {
            ids.push(id);
        }
        Ok(ids.len() < limit)
    };
    if limit == 0 {
        return Ok(Vec::new());
    }
    if newest_first {
        kv.visit_back(&prefix, cursor.as_deref(), &mut take)?;
    } else {
        kv.visit(&prefix, cursor.as_deref(), &mut take)?;
    }
    Ok(metas(kv, ids))
}

/// The counters: how many sagas of each definition have each status.
pub(crate) fn counts(kv: &impl Kv) -> Result<super::Counts> {
    let mut c = super::Counts::default();
    kv.visit(&codec::counter_prefix(), None, &mut |k, v| {
        let (status, definition) = codec::counted_by(k)?;
        let n = codec::count_of(v)?;
        *c.by_status.entry(status).or_default() += n;
        *c.by_definition
            .entry(definition)
            .or_default()
            .entry(status)
            .or_default() += n;
        Ok(true)
    })?;
    Ok(c)
}

pub(crate) fn read(kv: &impl Kv, saga: SagaId) -> Result<Vec<(Lsn, Vec<u8>)>> {
    kv.scan(&codec::log_prefix(saga))?
        .into_iter()
        .map(|(k, v)| Ok((codec::lsn_of(saga, &k)?, v)))
        .collect()
}

pub(crate) fn meta(kv: &impl Kv, saga: SagaId) -> Result<Option<SagaMeta>> {
    let Some(stored) = kv.get(&codec::meta_key(saga))? else {
        return Ok(None);
    };
    let meta = codec::decode_meta(saga, &stored)?;
    let tail = match kv.last(&codec::log_prefix(saga))? {
        Some((k, v)) => Some((codec::lsn_of(saga, &k)?, v)),
        None => None,
    };
    Ok(Some(codec::with_log_tail(meta, tail)))
}

pub(crate) fn with_status(kv: &impl Kv, status: SagaStatus) -> Result<Vec<SagaId>> {
    kv.scan(&codec::status_prefix(status))?
        .into_iter()
        .map(|(k, _)| codec::saga_of_index_key(&k))
        .collect()
}

pub(crate) fn find_start_key(kv: &impl Kv, key: &StartKey) -> Result<Option<SagaId>> {
    kv.get(&codec::start_key_key(key))?
        .map(|v| codec::saga_of_start_key_value(&v))
        .transpose()
}

pub(crate) fn due(kv: &impl Kv, until: Timestamp) -> Result<Vec<(Timestamp, SagaId)>> {
    let mut out = Vec::new();
    for (k, _) in kv.scan(&codec::timer_prefix())? {
        let at = codec::due_of_timer_key(&k)?;
        if at > until {
            break;
        }
        out.push((at, codec::saga_of_index_key(&k)?));
    }
    Ok(out)
}

pub(crate) fn finished_before(
    kv: &impl Kv,
    until: Timestamp,
    after: Option<(Timestamp, SagaId)>,
    limit: usize,
) -> Result<Vec<(Timestamp, SagaId)>> {
    let mut out = Vec::new();
    let from = after.map(|(t, id)| codec::finished_key(t, id));
    kv.visit(&codec::finished_prefix(), from.as_deref(), &mut |k, _| {
        if from.as_deref() == Some(k) {
            return Ok(true);
        }
        let at = codec::due_of_timer_key(k)?;
        if at > until || out.len() >= limit {
            return Ok(false);
        }
        out.push((at, codec::saga_of_index_key(k)?));
        Ok(true)
    })?;
    Ok(out)
}

/// Summaries of the sagas in the drift index, in id order after `after`, at most
/// `limit`.
pub(crate) fn drifted(kv: &impl Kv, after: Option<SagaId>, limit: usize) -> Result<Vec<SagaMeta>> {
    let mut ids = Vec::new();
    let from = after.map(codec::drift_key);
    if limit > 0 {
        kv.visit(&codec::drift_prefix(), from.as_deref(), &mut |k, _| {
            // A malformed key is the consistency check's business.
            if let Ok(id) = codec::saga_of_index_key(k) {
                if Some(id) != after {
                    ids.push(id);
                }
            }
            Ok(ids.len() < limit)
        })?;
    }
    Ok(metas(kv, ids))
}

/// The summaries of `ids`, in order: one that does not decode is skipped with a warning,
/// so that one bad saga does not hide the others.
fn metas(kv: &impl Kv, ids: Vec<SagaId>) -> Vec<SagaMeta> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match meta(kv, id) {
            Ok(Some(m)) => out.push(m),
            Ok(None) => {}
            Err(e) => tracing::warn!(saga_id = %id, error = %e, "summary does not decode"),
        }
    }
    out
}

/// The position stored under `name`.
pub(crate) fn position(kv: &impl Kv, name: &str) -> Result<Option<(Timestamp, SagaId)>> {
    kv.get(&codec::position_key(name))?
        .map(|v| codec::decode_position(name, &v))
        .transpose()
}

/// The deletions that remove `saga`, or none if it is unknown.
pub(crate) fn removal(kv: &impl Kv, saga: SagaId) -> Result<Vec<Op>> {
    let Some(m) = meta(kv, saga)? else {
        return Ok(Vec::new());
    };
    let keys = kv
        .scan(&codec::log_prefix(saga))?
        .into_iter()
        .map(|(k, _)| k);
    Ok(codec::removal(&m, keys))
}

/// The deliveries for `key` that no saga took, oldest first.
pub(crate) fn inbox_waiting(kv: &impl Kv, key: &str) -> Result<Vec<Delivery>> {
    let mut out = Vec::new();
    for (k, v) in kv.scan(&codec::inbox_prefix(Some(key)))? {
        let d = codec::decode_delivery(&k, &v, None)?;
        if kv.get(&codec::taken_key(&d.key, &d.id)?)?.is_none() {
            out.push(d);
        }
    }
    out.sort_by(|a, b| (a.received_at, &a.id).cmp(&(b.received_at, &b.id)));
    Ok(out)
}

/// Every delivery after `after`, in key and id order, at most `limit`.
pub(crate) fn inbox_deliveries(
    kv: &impl Kv,
    after: Option<(&str, &str)>,
    limit: usize,
) -> Result<Vec<Delivery>> {
    let from = after.map(|(k, i)| codec::inbox_key(k, i)).transpose()?;
    let mut raw = Vec::new();
    if limit > 0 {
        kv.visit(&codec::inbox_prefix(None), from.as_deref(), &mut |k, v| {
            if Some(k) != from.as_deref() {
                raw.push((k.to_vec(), v.to_vec()));
            }
            Ok(raw.len() < limit)
        })?;
    }
    let mut out = Vec::with_capacity(raw.len());
    for (k, v) in raw {
        let (key, id) = codec::inbox_ids_of(&k)?;
        let taken = kv.get(&codec::taken_key(&key, &id)?)?;
        out.push(codec::decode_delivery(&k, &v, taken.as_deref())?);
    }
    Ok(out)
}

/// The deletions that purge every delivery received before `before` (with its taken
/// mark).
pub(crate) fn inbox_purge_ops(kv: &impl Kv, before: Timestamp) -> Result<Vec<Op>> {
    let mut ops = Vec::new();
    let mut failed = None;
    kv.visit(&codec::inbox_prefix(None), None, &mut |k, v| {
        match codec::decode_delivery(k, v, None) {
            Ok(d) if d.received_at < before => match codec::taken_key(&d.key, &d.id) {
                Ok(t) => {
                    ops.push(Op::Delete(k.to_vec()));
                    ops.push(Op::Delete(t));
                }
                Err(e) => failed = Some(e),
            },
            Ok(_) => {}
            // An undecodable delivery is kept for an operator to look at.
            Err(_) => {}
        }
        Ok(failed.is_none())
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(ops),
    }
}
