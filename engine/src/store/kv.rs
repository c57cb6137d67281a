//! The reads every store shares, written once over an ordered key-value view.

use crate::clock::Timestamp;
use crate::ids::{Lsn, SagaId, StartKey};
use crate::machine::SagaStatus;
use crate::store::codec::{self, Op};
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
