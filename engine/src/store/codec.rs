//! How records, summaries and keys are laid out in bytes.
// Public only with the `test-support` feature: otherwise its items are the crate's own.
#![cfg_attr(not(feature = "test-support"), allow(unreachable_pub, dead_code))]
//!
//! Values start with a format byte, then JSON. JSON costs a little space and time, but a
//! log that an operator can read with any tool is worth it, and the format byte leaves
//! room for a denser encoding later without losing old logs.
//!
//! - format 1: one log record, stored under its own lsn;
//! - format 2: a JSON array of consecutive log records written in one atomic write,
//!   stored under the first one's lsn. One key instead of several is what lets a write
//!   carry "step 2 succeeded, step 3 started" at the cost of a single store update;
//! - formats 3 and 4: as 1 and 2, for records that use what parallel groups added (a
//!   `started` record listing the stages). An engine from before groups reads the byte
//!   as a newer format and parks the saga, instead of running its group one step at a
//!   time; logs without groups keep formats 1 and 2, which every engine reads.

use crate::clock::Timestamp;
use crate::ids::{Lsn, SagaId, StartKey};
use crate::machine::{Event, LogRecord, SagaStatus};
use crate::store::{Error, Result, SagaMeta, Write};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The format byte of a value holding one record (and of summaries).
pub const FORMAT_V1: u8 = 1;

/// The format byte of a value holding several consecutive records.
pub const FORMAT_V2: u8 = 2;

/// The format byte of a value holding one record that uses parallel groups.
pub const FORMAT_V3: u8 = 3;

/// The format byte of a value holding several consecutive records, one of which uses
/// parallel groups.
pub const FORMAT_V4: u8 = 4;

/// The newest format byte this engine reads and writes.
const NEWEST_FORMAT: u8 = FORMAT_V4;

/// Whether `record` needs format 3: an engine that does not know groups must not read
/// it as a saga of consecutive steps.
fn uses_groups(record: &LogRecord) -> bool {
    matches!(&record.event, Event::Started { stages, .. } if !stages.is_empty())
}

const LOG: u8 = b'L';
const META: u8 = b'M';
const STATUS: u8 = b'S';
const TIMER: u8 = b'T';
const START_KEY: u8 = b'K';
const FINISHED: u8 = b'F';
const COUNTER: u8 = b'C';
/// Values moved aside by the consistency check (a malformed key, an unreadable summary
/// without a log): kept, under `Q` + the original key, for an operator to inspect.
const QUARANTINE: u8 = b'Q';
/// A delivered event: `I`, the correlation key's length (2 bytes), the key, the
/// delivery id.
const INBOX: u8 = b'I';
/// That a saga took a delivered event: `J` and the rest of the delivery's key; the value
/// is the saga's id.
const TAKEN: u8 = b'J';
/// The drift index: `D` and the id of a saga with open drifts; empty value.
const DRIFT: u8 = b'D';
/// A named position in the finish-time index (the reconciler's cursor): `P` and the
/// name; the value is the format byte and the JSON of the position.
const POSITION: u8 = b'P';

/// The key a value stored under `key` is moved to when the consistency check sets it
/// aside.
pub fn quarantine_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(QUARANTINE);
    k.extend_from_slice(key);
    k
}

/// A key-value change that a store applies.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// Set `key` to `value`.
    Put(Vec<u8>, Vec<u8>),
    /// Delete `key`.
    Delete(Vec<u8>),
    /// Add `delta` to the counter at `key` (an 8-byte big-endian count; absent is 0; a
    /// count that reaches 0 is deleted). Stores apply it under their write lock, so
    /// concurrent writers never lose an update.
    Add(Vec<u8>, i64),
}

/// The counter of sagas of `definition` with `status`: what stats read instead of
/// every summary.
pub fn counter_key(status: SagaStatus, definition: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + definition.len());
    k.push(COUNTER);
    k.push(status.code());
    k.extend_from_slice(definition.as_bytes());
    k
}

/// The prefix of every counter.
pub fn counter_prefix() -> Vec<u8> {
    vec![COUNTER]
}

/// The status and definition a counter key counts.
///
/// # Errors
///
/// [`Error::CorruptIndex`] if the key does not parse.
pub fn counted_by(key: &[u8]) -> Result<(SagaStatus, String)> {
    let bad = || Error::CorruptIndex(format!("counter key {key:?}"));
    let status = key
        .get(1)
        .and_then(|c| SagaStatus::from_code(*c))
        .ok_or_else(bad)?;
    let definition = std::str::from_utf8(key.get(2..).ok_or_else(bad)?).map_err(|_| bad())?;
    Ok((status, definition.to_string()))
}

/// A counter's value.
///
/// # Errors
///
/// [`Error::CorruptIndex`] unless it is 8 bytes.
pub fn count_of(value: &[u8]) -> Result<u64> {
    <[u8; 8]>::try_from(value)
        .map(u64::from_be_bytes)
        .map_err(|_| Error::CorruptIndex(format!("a counter of {} bytes", value.len())))
}

/// The value of a counter at `current` after adding `delta` (never below 0): `None`
/// when it reaches 0 and the key goes.
pub fn add_to_count(current: Option<&[u8]>, delta: i64) -> Option<Vec<u8>> {
    // An unreadable counter counts as 0: the check at open rebuilds every counter.
    let now = current.and_then(|v| count_of(v).ok()).unwrap_or(0);
    let next = if delta >= 0 {
        now.saturating_add(delta.unsigned_abs())
    } else {
        now.saturating_sub(delta.unsigned_abs())
    };
    (next > 0).then(|| next.to_be_bytes().to_vec())
}

/// Encodes a log record.
///
/// # Errors
///
/// [`Error::Backend`] if the record does not serialize (a JSON map with non-string keys
/// cannot happen for `serde_json::Value`, so in practice never).
pub fn encode_record(record: &LogRecord) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    out.push(if uses_groups(record) {
        FORMAT_V3
    } else {
        FORMAT_V1
    });
    serde_json::to_writer(&mut out, record)
        .map_err(|e| Error::Backend(format!("record does not serialize: {e}")))?;
    Ok(out)
}

/// Decodes a log record of `saga`.
///
/// # Errors
///
/// [`Error::Corrupt`] if the bytes are not a record of a known format.
pub fn decode_record(saga: SagaId, lsn: Lsn, bytes: &[u8]) -> Result<LogRecord> {
    let corrupt = |reason: String| Error::Corrupt {
        saga,
        what: format!("log record {lsn}"),
        reason,
    };
    let json = strip_record_format(bytes)
        .map_err(|why| format_error(saga, format!("log record {lsn}"), bytes, why))?;
    let record: LogRecord = serde_json::from_slice(json)
        .map_err(|e| undecodable(saga, format!("log record {lsn}"), json, e))?;
    if record.lsn != lsn {
        return Err(corrupt(format!(
            "stored under lsn {lsn} but says {}",
            record.lsn
        )));
    }
    Ok(record)
}

/// Decodes one stored log value, which holds one record (format 1) or several
/// consecutive ones (format 2), the first at `lsn`.
///
/// # Errors
///
/// [`Error::Corrupt`] if the bytes are not records of a known format, or their lsns do
/// not start at `lsn` and follow each other.
pub fn decode_value(saga: SagaId, lsn: Lsn, bytes: &[u8]) -> Result<Vec<LogRecord>> {
    match bytes.first() {
        Some(&(FORMAT_V2 | FORMAT_V4)) => {
            let corrupt = |reason: String| Error::Corrupt {
                saga,
                what: format!("log records from {lsn}"),
                reason,
            };
            let json = bytes.get(1..).unwrap_or_default();
            let records: Vec<LogRecord> = serde_json::from_slice(json)
                .map_err(|e| undecodable(saga, format!("log records from {lsn}"), json, e))?;
            if records.is_empty() {
                return Err(corrupt("an empty group".into()));
            }
            for (i, r) in records.iter().enumerate() {
                let expected = u64::try_from(i).ok().and_then(|i| lsn.0.checked_add(i));
                if expected != Some(r.lsn.0) {
                    return Err(corrupt(format!("record {i} says lsn {}", r.lsn)));
                }
            }
            Ok(records)
        }
        _ => decode_record(saga, lsn, bytes).map(|r| vec![r]),
    }
}

/// Decodes a saga's stored log values, as [`crate::store::SagaLog::read`] returns them,
/// into its records.
///
/// # Errors
///
/// [`Error::Corrupt`] for the first value that does not decode.
pub fn decode_log(saga: SagaId, values: &[(Lsn, Vec<u8>)]) -> Result<Vec<LogRecord>> {
    let mut out = Vec::with_capacity(values.len() * 2);
    for (lsn, bytes) in values {
        out.extend(decode_value(saga, *lsn, bytes)?);
    }
    Ok(out)
}

/// The error for a value whose format byte is not one this engine writes: a small byte
/// above the newest it knows, over well-formed JSON, was written by a newer engine;
/// anything else is damage.
fn format_error(saga: SagaId, what: String, bytes: &[u8], reason: String) -> Error {
    match bytes.first() {
        // A plausible next version over well-formed JSON; a random byte is damage.
        Some(&b)
            if (NEWEST_FORMAT + 1..=15).contains(&b)
                && serde_json::from_slice::<serde::de::IgnoredAny>(
                    bytes.get(1..).unwrap_or_default(),
                )
                .is_ok() =>
        {
            Error::NewerFormat { saga, what, reason }
        }
        _ => Error::Corrupt { saga, what, reason },
    }
}

/// The error for JSON that does not decode as what this engine writes. Well-formed JSON
/// that names a variant this engine does not know (an event type, a failure kind) was
/// written by a newer engine; anything else is damage.
///
/// Unknown *fields* are tolerated (serde's default): a newer engine may add a field only
/// if an older one can safely ignore it, and must otherwise write a new event type or
/// format byte, which an older engine refuses as above. Records are never rewritten, so
/// an ignored field is kept on disk.
fn undecodable(saga: SagaId, what: String, json: &[u8], e: serde_json::Error) -> Error {
    let reason = format!("does not decode: {e}");
    let newer = e.is_data()
        && e.to_string().starts_with("unknown variant")
        && serde_json::from_slice::<serde::de::IgnoredAny>(json).is_ok();
    if newer {
        Error::NewerFormat { saga, what, reason }
    } else {
        Error::Corrupt { saga, what, reason }
    }
}

/// The JSON of a one-record value (format 1 or 3).
fn strip_record_format(bytes: &[u8]) -> std::result::Result<&[u8], String> {
    match bytes.split_first() {
        Some((&(FORMAT_V1 | FORMAT_V3), rest)) => Ok(rest),
        Some((b, _)) => Err(format!("unknown format byte {b}")),
        None => Err("empty value".into()),
    }
}

fn strip_format(bytes: &[u8]) -> std::result::Result<&[u8], String> {
    match bytes.split_first() {
        Some((&FORMAT_V1, rest)) => Ok(rest),
        Some((b, _)) => Err(format!("unknown format byte {b}")),
        None => Err("empty value".into()),
    }
}

/// Encodes a saga summary.
///
/// # Errors
///
/// [`Error::Backend`] if it does not serialize (never in practice).
pub fn encode_meta(meta: &SagaMeta) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT_V1];
    serde_json::to_writer(&mut out, meta)
        .map_err(|e| Error::Backend(format!("summary does not serialize: {e}")))?;
    Ok(out)
}

/// Decodes a saga summary.
///
/// # Errors
///
/// [`Error::Corrupt`] if the bytes are not a summary of a known format.
pub fn decode_meta(saga: SagaId, bytes: &[u8]) -> Result<SagaMeta> {
    let json =
        strip_format(bytes).map_err(|why| format_error(saga, "summary".into(), bytes, why))?;
    serde_json::from_slice(json).map_err(|e| undecodable(saga, "summary".into(), json, e))
}

/// The key of one log record.
pub fn log_key(saga: SagaId, lsn: Lsn) -> Vec<u8> {
    let mut k = log_prefix(saga);
    k.extend_from_slice(&lsn.0.to_be_bytes());
    k
}

/// The prefix of all log records of `saga`.
pub fn log_prefix(saga: SagaId) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(LOG);
    k.extend_from_slice(saga.as_bytes());
    k
}

/// The lsn in a log key.
///
/// # Errors
///
/// [`Error::Corrupt`] if the key is not a log key of `saga`.
pub fn lsn_of(saga: SagaId, key: &[u8]) -> Result<Lsn> {
    let bytes: [u8; 8] = key
        .get(17..25)
        .and_then(|b| b.try_into().ok())
        .filter(|_| key.len() == 25)
        .ok_or_else(|| Error::Corrupt {
            saga,
            what: "log key".into(),
            reason: format!("{} bytes, expected 25", key.len()),
        })?;
    Ok(Lsn(u64::from_be_bytes(bytes)))
}

/// The key of a saga's summary.
pub fn meta_key(saga: SagaId) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(META);
    k.extend_from_slice(saga.as_bytes());
    k
}

/// The prefix of the status index for `status`.
pub fn status_prefix(status: SagaStatus) -> Vec<u8> {
    vec![STATUS, status.code()]
}

/// The status index key of `saga` under `status`.
pub fn status_key(status: SagaStatus, saga: SagaId) -> Vec<u8> {
    let mut k = status_prefix(status);
    k.extend_from_slice(saga.as_bytes());
    k
}

/// The prefix of the timer index.
pub fn timer_prefix() -> Vec<u8> {
    vec![TIMER]
}

/// The timer index key of `saga` due at `due`.
pub fn timer_key(due: Timestamp, saga: SagaId) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(TIMER);
    k.extend_from_slice(&due.as_millis().to_be_bytes());
    k.extend_from_slice(saga.as_bytes());
    k
}

/// The prefix of the finish-time index (what retention walks).
pub fn finished_prefix() -> Vec<u8> {
    vec![FINISHED]
}

/// The finish-time index key of `saga`, finished at `at`.
pub fn finished_key(at: Timestamp, saga: SagaId) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(FINISHED);
    k.extend_from_slice(&at.as_millis().to_be_bytes());
    k.extend_from_slice(saga.as_bytes());
    k
}

/// The key of a start-key index entry.
pub fn start_key_key(key: &StartKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.as_str().len());
    k.push(START_KEY);
    k.extend_from_slice(key.as_str().as_bytes());
    k
}

/// The saga id at the end of an index key (status or timer).
///
/// # Errors
///
/// [`Error::CorruptIndex`] if the key is too short.
pub fn saga_of_index_key(key: &[u8]) -> Result<SagaId> {
    let start = key
        .len()
        .checked_sub(16)
        .ok_or_else(|| Error::CorruptIndex(format!("index key of {} bytes", key.len())))?;
    let bytes: [u8; 16] = key[start..]
        .try_into()
        .map_err(|_| Error::CorruptIndex("index key".into()))?;
    Ok(SagaId::from_bytes(bytes))
}

/// The due time in a timer key.
///
/// # Errors
///
/// [`Error::CorruptIndex`] if the key is not 25 bytes.
pub fn due_of_timer_key(key: &[u8]) -> Result<Timestamp> {
    let bytes: [u8; 8] = key
        .get(1..9)
        .and_then(|b| b.try_into().ok())
        .filter(|_| key.len() == 25)
        .ok_or_else(|| Error::CorruptIndex(format!("timer key of {} bytes", key.len())))?;
    Ok(Timestamp::from_millis(u64::from_be_bytes(bytes)))
}

/// The saga id stored as a start-key index value.
///
/// # Errors
///
/// [`Error::CorruptIndex`] if the value is not 16 bytes.
pub fn saga_of_start_key_value(value: &[u8]) -> Result<SagaId> {
    let bytes: [u8; 16] = value
        .try_into()
        .map_err(|_| Error::CorruptIndex(format!("start key value of {} bytes", value.len())))?;
    Ok(SagaId::from_bytes(bytes))
}

/// The key-value changes that make up `write`: its records (one value for all of
/// them), its summary when something an index or a reader needs has changed, and the
/// index entries that change with them.
///
/// # Errors
///
/// As [`encode_meta`].
pub fn ops(write: Write) -> Result<Vec<Op>> {
    let Write {
        saga,
        records,
        meta,
        previous,
        fence: _,
        taken,
    } = write;
    let mut ops = Vec::with_capacity(5);
    for t in &taken {
        ops.push(Op::Put(taken_key(&t.key, &t.id)?, saga.as_bytes().to_vec()));
    }
    let mut encoded = Vec::with_capacity(records.len());
    for r in &records {
        encoded.push((r.lsn, encode_record(r)?));
    }
    let mut records = encoded.into_iter();
    if let Some((first, bytes)) = records.next() {
        let rest: Vec<_> = records.collect();
        if rest.is_empty() {
            ops.push(Op::Put(log_key(saga, first), bytes));
        } else {
            // Splice the records' JSON into one array rather than re-encoding them.
            let len = bytes.len() + rest.iter().map(|(_, b)| b.len() + 1).sum::<usize>() + 2;
            let mut group = Vec::with_capacity(len);
            let newer = bytes.first() == Some(&FORMAT_V3)
                || rest.iter().any(|(_, b)| b.first() == Some(&FORMAT_V3));
            group.push(if newer { FORMAT_V4 } else { FORMAT_V2 });
            group.push(b'[');
            group.extend_from_slice(strip_record_format(&bytes).map_err(Error::Backend)?);
            for (_, b) in &rest {
                group.push(b',');
                group.extend_from_slice(strip_record_format(b).map_err(Error::Backend)?);
            }
            group.push(b']');
            ops.push(Op::Put(log_key(saga, first), group));
        }
    }
    let prev = previous.as_ref();
    // The summary's times and last lsn are read from the log's tail (see
    // `with_log_tail`), so it is rewritten only when the rest of it changes.
    let changed = prev.is_none_or(|p| {
        p.status != meta.status
            || p.due != meta.due
            || p.reason != meta.reason
            || p.finished_at != meta.finished_at
            || p.settling_until != meta.settling_until
            || p.awaiting != meta.awaiting
            || p.starts_at != meta.starts_at
            || p.open_drifts != meta.open_drifts
            || p.park_kind != meta.park_kind
    });
    if prev.map(|p| p.status) != Some(meta.status) {
        if let Some(p) = prev {
            ops.push(Op::Delete(status_key(p.status, saga)));
            ops.push(Op::Add(counter_key(p.status, &p.definition), -1));
        }
        ops.push(Op::Put(status_key(meta.status, saga), Vec::new()));
        ops.push(Op::Add(counter_key(meta.status, &meta.definition), 1));
    }
    let old_due = prev.and_then(|p| p.due);
    if old_due != meta.due {
        if let Some(d) = old_due {
            ops.push(Op::Delete(timer_key(d, saga)));
        }
        if let Some(d) = meta.due {
            ops.push(Op::Put(timer_key(d, saga), Vec::new()));
        }
    }
    let old_finished = prev.and_then(|p| p.finished_at);
    if old_finished != meta.finished_at {
        if let Some(t) = old_finished {
            ops.push(Op::Delete(finished_key(t, saga)));
        }
        if let Some(t) = meta.finished_at {
            ops.push(Op::Put(finished_key(t, saga), Vec::new()));
        }
    }
    let had_drift = prev.is_some_and(|p| p.open_drifts > 0);
    if had_drift != (meta.open_drifts > 0) {
        if had_drift {
            ops.push(Op::Delete(drift_key(saga)));
        } else {
            ops.push(Op::Put(drift_key(saga), Vec::new()));
        }
    }
    if prev.is_none() {
        if let Some(k) = &meta.start_key {
            ops.push(Op::Put(start_key_key(k), saga.as_bytes().to_vec()));
        }
    }
    if changed {
        ops.push(Op::Put(meta_key(saga), encode_meta(&meta)?));
    }
    Ok(ops)
}

/// Brings a stored summary's `updated_at` and `last_lsn` up to date from the saga's
/// last stored log value (the summary is not rewritten on every transition). A tail
/// that does not decode leaves the summary as stored.
pub fn with_log_tail(mut meta: SagaMeta, tail: Option<(Lsn, Vec<u8>)>) -> SagaMeta {
    if let Some(last) = tail
        .and_then(|(lsn, bytes)| decode_value(meta.id, lsn, &bytes).ok())
        .and_then(|mut records| records.pop())
    {
        meta.updated_at = last.at;
        meta.last_lsn = last.lsn;
    }
    meta
}

/// The deletions that remove a saga whose summary is `meta` and whose log keys are
/// `log_keys`.
pub fn removal(meta: &SagaMeta, log_keys: impl IntoIterator<Item = Vec<u8>>) -> Vec<Op> {
    let mut ops: Vec<Op> = log_keys.into_iter().map(Op::Delete).collect();
    ops.push(Op::Delete(meta_key(meta.id)));
    ops.push(Op::Delete(status_key(meta.status, meta.id)));
    ops.push(Op::Add(counter_key(meta.status, &meta.definition), -1));
    if let Some(d) = meta.due {
        ops.push(Op::Delete(timer_key(d, meta.id)));
    }
    if let Some(k) = &meta.start_key {
        ops.push(Op::Delete(start_key_key(k)));
    }
    if let Some(t) = meta.finished_at {
        ops.push(Op::Delete(finished_key(t, meta.id)));
    }
    if meta.open_drifts > 0 {
        ops.push(Op::Delete(drift_key(meta.id)));
    }
    ops
}

/// The drift index's prefix.
pub fn drift_prefix() -> Vec<u8> {
    vec![DRIFT]
}

/// The drift index entry of `saga`.
pub fn drift_key(saga: SagaId) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(DRIFT);
    k.extend_from_slice(saga.as_bytes());
    k
}

/// The key of the position named `name`.
pub fn position_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(POSITION);
    k.extend_from_slice(name.as_bytes());
    k
}

#[derive(Serialize, Deserialize)]
struct StoredPosition {
    at: Timestamp,
    saga: SagaId,
}

/// A position's stored value.
///
/// # Errors
///
/// [`Error::Backend`] if it does not encode (it always does).
pub fn encode_position(at: (Timestamp, SagaId)) -> Result<Vec<u8>> {
    let mut v = vec![FORMAT_V1];
    serde_json::to_writer(
        &mut v,
        &StoredPosition {
            at: at.0,
            saga: at.1,
        },
    )
    .map_err(|e| Error::Backend(e.to_string()))?;
    Ok(v)
}

/// Reads a position's stored value.
///
/// # Errors
///
/// [`Error::CorruptIndex`] if it does not decode.
pub fn decode_position(name: &str, bytes: &[u8]) -> Result<(Timestamp, SagaId)> {
    let json = match bytes.split_first() {
        Some((&FORMAT_V1, rest)) => rest,
        _ => {
            return Err(Error::CorruptIndex(format!(
                "position `{name}`: unknown format"
            )))
        }
    };
    let p: StoredPosition = serde_json::from_slice(json)
        .map_err(|e| Error::CorruptIndex(format!("position `{name}`: {e}")))?;
    Ok((p.at, p.saga))
}

/// The part of an inbox key after its prefix byte: the correlation key's length, the
/// key, the delivery id.
fn inbox_suffix(key: &str, id: &str) -> Result<Vec<u8>> {
    use crate::store::inbox::check_id;
    check_id("correlation key", key).map_err(Error::Backend)?;
    check_id("delivery id", id).map_err(Error::Backend)?;
    let len = u16::try_from(key.len()).map_err(|_| Error::Backend("key too long".into()))?;
    let mut k = Vec::with_capacity(2 + key.len() + id.len());
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k.extend_from_slice(id.as_bytes());
    Ok(k)
}

/// The key of a delivered event.
///
/// # Errors
///
/// [`Error::Backend`] if the key or id is empty or longer than
/// [`crate::store::inbox::MAX_INBOX_ID_LEN`].
pub fn inbox_key(key: &str, id: &str) -> Result<Vec<u8>> {
    let mut k = vec![INBOX];
    k.extend_from_slice(&inbox_suffix(key, id)?);
    Ok(k)
}

/// The key of the mark that a saga took a delivered event.
///
/// # Errors
///
/// As [`inbox_key`].
pub fn taken_key(key: &str, id: &str) -> Result<Vec<u8>> {
    let mut k = vec![TAKEN];
    k.extend_from_slice(&inbox_suffix(key, id)?);
    Ok(k)
}

/// The prefix of every delivery for correlation key `key` (or of every delivery).
pub fn inbox_prefix(key: Option<&str>) -> Vec<u8> {
    let mut k = vec![INBOX];
    if let Some(key) = key {
        // A key too long to be stored has no deliveries: its prefix matches nothing
        // (no stored key has a length above the limit).
        let len = u16::try_from(key.len()).unwrap_or(u16::MAX);
        k.extend_from_slice(&len.to_be_bytes());
        k.extend_from_slice(key.as_bytes());
    }
    k
}

/// The prefix of every taken mark.
pub fn taken_prefix() -> Vec<u8> {
    vec![TAKEN]
}

/// The stored form of a delivery: what it says and when it came.
#[derive(Serialize, Deserialize)]
struct StoredDelivery<'a> {
    payload: std::borrow::Cow<'a, Value>,
    received_at: Timestamp,
}

/// Encodes a delivery's value.
///
/// # Errors
///
/// [`Error::Backend`] if it does not serialize (never in practice).
pub fn encode_delivery(payload: &Value, at: Timestamp) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT_V1];
    serde_json::to_writer(
        &mut out,
        &StoredDelivery {
            payload: std::borrow::Cow::Borrowed(payload),
            received_at: at,
        },
    )
    .map_err(|e| Error::Backend(format!("delivery does not serialize: {e}")))?;
    Ok(out)
}

/// The correlation key and delivery id of an inbox key (or of a taken mark).
///
/// # Errors
///
/// [`Error::CorruptIndex`] if the key is not one.
pub fn inbox_ids_of(k: &[u8]) -> Result<(String, String)> {
    let bad = || Error::CorruptIndex(format!("inbox key {k:?}"));
    let (_, rest) = k.split_first().ok_or_else(bad)?;
    let len = rest
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or_else(bad)?;
    let key = rest.get(2..2 + len).ok_or_else(bad)?;
    let id = rest.get(2 + len..).ok_or_else(bad)?;
    Ok((
        String::from_utf8(key.to_vec()).map_err(|_| bad())?,
        String::from_utf8(id.to_vec()).map_err(|_| bad())?,
    ))
}

/// Decodes a stored delivery from its key and value; `taken_by` from its taken mark.
///
/// # Errors
///
/// [`Error::CorruptIndex`] if the key or the value does not decode.
pub fn decode_delivery(
    k: &[u8],
    v: &[u8],
    taken_by: Option<&[u8]>,
) -> Result<crate::store::inbox::Delivery> {
    let (key, id) = inbox_ids_of(k)?;
    let bad = |why: String| Error::CorruptIndex(format!("delivery `{id}` for `{key}`: {why}"));
    let json = strip_format(v).map_err(&bad)?;
    let stored: StoredDelivery<'static> =
        serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    let taken_by = match taken_by {
        Some(b) => Some(
            <[u8; 16]>::try_from(b)
                .map(SagaId::from_bytes)
                .map_err(|_| bad(format!("a taken mark of {} bytes", b.len())))?,
        ),
        None => None,
    };
    Ok(crate::store::inbox::Delivery {
        key,
        id,
        payload: stored.payload.into_owned(),
        received_at: stored.received_at,
        taken_by,
    })
}
