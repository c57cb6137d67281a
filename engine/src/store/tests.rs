//! One conformance suite, run against every store.

use serde_json::json;

use crate::clock::Timestamp;
use crate::ids::{Attempt, Lsn, SagaId, StartKey};
use crate::machine::{Event, LogRecord, SagaStatus};
use crate::store::codec::{self, decode_record, encode_record};
use crate::store::{Error, Fence, MemLog, OwnerId, SagaLog, SagaMeta, SledLog, Write};

fn id(n: u8) -> SagaId {
    SagaId::from_bytes([n; 16])
}

fn meta(saga: SagaId, status: SagaStatus, last: u64, due: Option<u64>) -> SagaMeta {
    SagaMeta {
        id: saga,
        definition: "d".into(),
        version: 1,
        status,
        start_key: Some(StartKey::new(format!("key-{saga}")).unwrap()),
        created_at: Timestamp::from_millis(1),
        updated_at: Timestamp::from_millis(last),
        last_lsn: Lsn(last),
        due: due.map(Timestamp::from_millis),
        settling_until: None,
        awaiting: None,
        starts_at: None,
        reason: None,
        finished_at: None,
        open_drifts: 0,
        park_kind: None,
    }
}

/// The record `rec` stores at `lsn`, as a write carries it.
fn record(lsn: u64) -> LogRecord {
    LogRecord {
        lsn: Lsn(lsn),
        at: Timestamp::from_millis(lsn),
        event: Event::StepAttemptStarted {
            step: 0,
            attempt: Attempt(1),
            deadline: Timestamp::from_millis(99),
        },
    }
}

/// The stored value of [`record`]`(lsn)`, as `read` gives it back.
fn rec(lsn: u64) -> (Lsn, Vec<u8>) {
    (Lsn(lsn), encode_record(&record(lsn)).unwrap())
}

fn first(saga: SagaId) -> Write {
    Write {
        saga,
        records: vec![record(0)],
        meta: meta(saga, SagaStatus::Running, 0, None),
        previous: None,
        fence: None,
        taken: Vec::new(),
    }
}

fn conformance(log: &dyn SagaLog) {
    // A shared store takes only writes under a lease: the suite writes under one.
    let fence = log.leases().map(|_| Fence {
        owner: OwnerId::new("conformance"),
        epoch: 1,
    });
    let fenced = |mut writes: Vec<Write>| {
        for w in &mut writes {
            w.fence = fence.clone();
        }
        writes
    };
    inbox_conformance(log, &fenced);
    drift_conformance(log, &fenced);
    let (a, b) = (id(1), id(2));
    log.append(fenced(vec![first(a), first(b)])).unwrap();
    log.sync().unwrap();
    assert_eq!(log.incomplete().unwrap(), vec![a, b]);
    assert_eq!(log.read(a).unwrap(), vec![rec(0)]);
    assert_eq!(
        log.find_start_key(&StartKey::new(format!("key-{a}")).unwrap())
            .unwrap(),
        Some(a)
    );
    assert_eq!(
        log.find_start_key(&StartKey::new("other").unwrap())
            .unwrap(),
        None
    );

    // a waits on a timer; b parks.
    let a1 = meta(a, SagaStatus::Running, 2, Some(500));
    let b1 = meta(b, SagaStatus::Parked, 1, None);
    log.append(fenced(vec![
        Write {
            saga: a,
            records: vec![record(1), record(2)],
            meta: a1.clone(),
            previous: Some(meta(a, SagaStatus::Running, 0, None)),
            fence: None,
            taken: Vec::new(),
        },
        Write {
            saga: b,
            records: vec![record(1)],
            meta: b1.clone(),
            previous: Some(meta(b, SagaStatus::Running, 0, None)),
            fence: None,
            taken: Vec::new(),
        },
    ]))
    .unwrap();
    log.sync().unwrap();
    let values = log.read(a).unwrap();
    if !log.remote() {
        // Records written together are stored as one group, under the first one's lsn.
        assert_eq!(values.len(), 2);
    }
    assert_eq!(values[1].0, Lsn(1));
    let records = codec::decode_log(a, &values).unwrap();
    assert_eq!(
        records.iter().map(|r| r.lsn).collect::<Vec<_>>(),
        [Lsn(0), Lsn(1), Lsn(2)]
    );
    assert_eq!(values[0], rec(0));
    assert_eq!(log.meta(a).unwrap(), Some(a1.clone()));
    // Several summaries at once: the unknown one is left out, the order is free.
    let mut both = log.metas(&[b, id(77), a]).unwrap();
    both.sort_by_key(|m| m.id);
    assert_eq!(both, vec![a1.clone(), b1.clone()]);
    assert!(log.metas(&[]).unwrap().is_empty());
    assert_eq!(log.with_status(SagaStatus::Parked).unwrap(), vec![b]);
    assert_eq!(log.with_status(SagaStatus::Running).unwrap(), vec![a]);
    assert_eq!(log.incomplete().unwrap(), vec![a]);
    // Pages walk an index from a cursor, either way; counts come from counters.
    let ids = |v: Vec<SagaMeta>| v.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(ids(log.page(None, None, 10, false).unwrap()), vec![a, b]);
    assert_eq!(ids(log.page(None, None, 10, true).unwrap()), vec![b, a]);
    assert_eq!(ids(log.page(None, Some(a), 10, false).unwrap()), vec![b]);
    assert_eq!(ids(log.page(None, Some(b), 10, true).unwrap()), vec![a]);
    assert_eq!(ids(log.page(None, None, 1, false).unwrap()), vec![a]);
    assert_eq!(
        ids(log.page(Some(SagaStatus::Parked), None, 10, false).unwrap()),
        vec![b]
    );
    assert_eq!(
        ids(log
            .page(Some(SagaStatus::Parked), Some(b), 10, false)
            .unwrap()),
        vec![]
    );
    assert_eq!(log.page(None, None, 10, false).unwrap()[0], a1);
    let counts = log.counts().unwrap();
    assert_eq!(
        counts.by_status,
        [(SagaStatus::Running, 1), (SagaStatus::Parked, 1)]
            .into_iter()
            .collect()
    );
    assert_eq!(counts.by_definition["d"][&SagaStatus::Parked], 1);
    assert_eq!(log.due(Timestamp::from_millis(499)).unwrap(), vec![]);
    assert_eq!(
        log.due(Timestamp::from_millis(500)).unwrap(),
        vec![(Timestamp::from_millis(500), a)]
    );

    // The timer moves; the old entry goes.
    let a2 = meta(a, SagaStatus::Completed, 3, None);
    log.append(fenced(vec![Write {
        saga: a,
        records: vec![record(3)],
        meta: a2,
        previous: Some(a1),
        fence: None,
        taken: Vec::new(),
    }]))
    .unwrap();
    log.sync().unwrap();
    assert!(log
        .due(Timestamp::from_millis(u64::MAX))
        .unwrap()
        .is_empty());
    assert!(log.incomplete().unwrap().is_empty());
    assert_eq!(log.with_status(SagaStatus::Completed).unwrap(), vec![a]);

    // Removal takes the log, the summary and every index entry.
    log.remove(a).unwrap();
    log.sync().unwrap();
    assert!(log.read(a).unwrap().is_empty());
    assert_eq!(log.meta(a).unwrap(), None);
    assert!(log.with_status(SagaStatus::Completed).unwrap().is_empty());
    assert_eq!(
        log.find_start_key(&StartKey::new(format!("key-{a}")).unwrap())
            .unwrap(),
        None
    );
    assert_eq!(log.meta(b).unwrap(), Some(b1));
    // Removing an unknown saga is a no-op.
    log.remove(id(9)).unwrap();
    log.sync().unwrap();
    assert_eq!(
        log.counts().unwrap().by_status,
        [(SagaStatus::Parked, 1)].into_iter().collect(),
        "a removed saga is no longer counted"
    );
}

#[test]
fn counters_are_rebuilt_at_open_when_missing_or_wrong() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = SledLog::open(dir.path()).unwrap();
        log.append(vec![first(id(1)), first(id(2))]).unwrap();
        log.sync().unwrap();
        // A store from before counters were kept, and one whose counter drifted.
        log.delete_raw(&codec::counter_key(SagaStatus::Running, "d"))
            .unwrap();
        log.put_raw(
            &codec::counter_key(SagaStatus::Parked, "gone"),
            &7u64.to_be_bytes(),
        )
        .unwrap();
    }
    let log = SledLog::open(dir.path()).unwrap();
    let report = log.check().unwrap();
    assert_eq!(report.findings.len(), 2, "{report:?}");
    assert_eq!(
        log.counts().unwrap().by_status,
        [(SagaStatus::Running, 2)].into_iter().collect()
    );
    assert!(
        log.check().unwrap().findings.is_empty(),
        "repaired for good"
    );
    // A store with no counters at all (written before they were kept) gets them quietly.
    log.delete_raw(&codec::counter_key(SagaStatus::Running, "d"))
        .unwrap();
    assert!(log.check().unwrap().findings.is_empty());
    assert_eq!(log.counts().unwrap().by_status[&SagaStatus::Running], 2);
}

/// The inbox's rules, on every store: a delivery is recorded once per key and id, waits
/// until a write takes it (atomically with that write), lists in key and id order, and is
/// purged by age; keys and ids are bounded.
/// The drift index follows the summaries' open drifts, and a position reads back.
fn drift_conformance(log: &dyn SagaLog, fenced: &dyn Fn(Vec<Write>) -> Vec<Write>) {
    let (a, b) = (id(40), id(41));
    let ended = |saga, last, drifts| {
        let mut m = meta(saga, SagaStatus::Completed, last, None);
        m.finished_at = Some(Timestamp::from_millis(1));
        m.open_drifts = drifts;
        m
    };
    let mut w = vec![first(a), first(b)];
    for w in &mut w {
        w.meta = ended(w.saga, 0, 0);
    }
    log.append(fenced(w)).unwrap();
    assert!(log.drifted(None, 10).unwrap().is_empty());
    let drift = |saga, lsn, before, after| Write {
        saga,
        records: vec![record(lsn)],
        meta: ended(saga, lsn, after),
        previous: Some(ended(saga, lsn - 1, before)),
        fence: None,
        taken: Vec::new(),
    };
    // A finished saga has no owner: a shared store takes a write to it under a lease
    // taken for it, as the reconciler takes one.
    let owner = OwnerId::new("conformance");
    let leased = |mut w: Write| {
        if let Some(l) = log.leases() {
            let lease = l.acquire(&owner, w.saga).unwrap().unwrap();
            w.fence = Some(Fence {
                owner: owner.clone(),
                epoch: lease.epoch,
            });
        }
        w
    };
    log.append(vec![leased(drift(a, 1, 0, 1)), leased(drift(b, 1, 0, 2))])
        .unwrap();
    log.sync().unwrap();
    let listed = |after, limit| -> Vec<(SagaId, u32)> {
        log.drifted(after, limit)
            .unwrap()
            .into_iter()
            .map(|m| (m.id, m.open_drifts))
            .collect()
    };
    assert_eq!(listed(None, 10), vec![(a, 1), (b, 2)]);
    assert_eq!(listed(None, 1), vec![(a, 1)]);
    assert_eq!(listed(Some(a), 10), vec![(b, 2)]);
    // Handled: out of the index; removed: gone with the saga.
    log.append(vec![leased(drift(a, 2, 1, 0))]).unwrap();
    assert_eq!(listed(None, 10), vec![(b, 2)]);
    log.remove(b).unwrap();
    log.remove(a).unwrap();
    log.sync().unwrap();
    assert!(listed(None, 10).is_empty());
    // A position: none until set, then what was set.
    assert_eq!(log.position("reconciler").unwrap(), None);
    let at = (Timestamp::from_millis(77), id(42));
    log.set_position("reconciler", at).unwrap();
    log.sync().unwrap();
    assert_eq!(log.position("reconciler").unwrap(), Some(at));
    assert_eq!(log.position("other").unwrap(), None);
    // Only forward: an earlier position does not replace it, a later one does.
    log.set_position("reconciler", (Timestamp::from_millis(76), id(43)))
        .unwrap();
    log.set_position("reconciler", (Timestamp::from_millis(77), id(41)))
        .unwrap();
    assert_eq!(log.position("reconciler").unwrap(), Some(at));
    let later = (Timestamp::from_millis(77), id(44));
    log.set_position("reconciler", later).unwrap();
    log.sync().unwrap();
    assert_eq!(log.position("reconciler").unwrap(), Some(later));
}

fn inbox_conformance(log: &dyn SagaLog, fenced: &dyn Fn(Vec<Write>) -> Vec<Write>) {
    use crate::store::{Delivered, Taken};
    let inbox = log.inbox();
    let at = Timestamp::from_millis;
    let deliver = |key: &str, id: &str, n: u64| inbox.deliver(key, id, &json!({ "n": n }), at(n));
    assert_eq!(deliver("pay-1", "d1", 1).unwrap(), Delivered::New);
    // The same id again, even with another payload: recorded once.
    assert_eq!(deliver("pay-1", "d1", 9).unwrap(), Delivered::Duplicate);
    assert_eq!(deliver("pay-1", "d2", 2).unwrap(), Delivered::New);
    // The same id for another key is another delivery; a key that is a prefix of
    // another does not see the other's deliveries.
    assert_eq!(deliver("pay-10", "d1", 3).unwrap(), Delivered::New);
    assert_eq!(deliver("pay-", "d1", 4).unwrap(), Delivered::New);
    let ids = |v: Vec<crate::store::Delivery>| -> Vec<(String, String, u64)> {
        v.into_iter()
            .map(|d| (d.key, d.id, d.payload["n"].as_u64().unwrap()))
            .collect()
    };
    let own = |k: &str, i: &str, n: u64| (k.to_string(), i.to_string(), n);
    assert_eq!(
        ids(inbox.waiting("pay-1").unwrap()),
        [own("pay-1", "d1", 1), own("pay-1", "d2", 2)]
    );
    assert_eq!(ids(inbox.waiting("pay-").unwrap()), [own("pay-", "d1", 4)]);
    assert!(inbox.waiting("nobody").unwrap().is_empty());
    // Taken by a saga's write: gone from what waits, listed as taken.
    let taker = id(90);
    let mut w = first(taker);
    w.taken = vec![Taken {
        key: "pay-1".into(),
        id: "d1".into(),
    }];
    log.append(fenced(vec![w])).unwrap();
    log.sync().unwrap();
    assert_eq!(
        ids(inbox.waiting("pay-1").unwrap()),
        [own("pay-1", "d2", 2)]
    );
    let all = inbox.deliveries(None, 10).unwrap();
    assert_eq!(all.len(), 4);
    let d1 = all
        .iter()
        .find(|d| d.key == "pay-1" && d.id == "d1")
        .unwrap();
    assert_eq!(d1.taken_by, Some(taker));
    // Taken, it still answers duplicates.
    assert_eq!(deliver("pay-1", "d1", 5).unwrap(), Delivered::Duplicate);
    // Pages in key and id order.
    let first_two = inbox.deliveries(None, 2).unwrap();
    let next = inbox
        .deliveries(Some((&first_two[1].key, &first_two[1].id)), 10)
        .unwrap();
    let mut keys: Vec<_> = first_two
        .iter()
        .chain(&next)
        .map(|d| (d.key.clone(), d.id.clone()))
        .collect();
    assert_eq!(keys.len(), 4);
    let sorted = {
        let mut k = keys.clone();
        k.sort();
        k
    };
    assert_eq!(keys, sorted);
    keys.dedup();
    assert_eq!(keys.len(), 4);
    // Bounded keys and ids.
    assert!(deliver("", "d", 1).is_err());
    assert!(deliver("k", "", 1).is_err());
    assert!(deliver(&"k".repeat(300), "d", 1).is_err());
    // Purged by age, taken or not.
    assert_eq!(inbox.purge(at(3)).unwrap(), 2);
    assert_eq!(ids(inbox.waiting("pay-1").unwrap()), []);
    assert_eq!(inbox.deliveries(None, 10).unwrap().len(), 2);
    assert_eq!(inbox.purge(at(100)).unwrap(), 2);
    assert!(inbox.deliveries(None, 10).unwrap().is_empty());
    // The taker is a saga like the others: removed, so the suite starts clean.
    log.remove(taker).unwrap();
    log.sync().unwrap();
}

#[test]
fn a_delivery_survives_a_crash_once_acknowledged() {
    let log = MemLog::new();
    log.inbox()
        .deliver("k", "d", &json!(1), Timestamp::from_millis(1))
        .unwrap();
    log.crash();
    assert_eq!(log.inbox().waiting("k").unwrap().len(), 1);
}

#[test]
fn memory_store_conforms() {
    conformance(&MemLog::new());
}

#[test]
fn sled_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance(&SledLog::open(dir.path()).unwrap());
}

#[test]
fn sled_store_keeps_what_was_synced_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = SledLog::open(dir.path()).unwrap();
        log.append(vec![first(id(3))]).unwrap();
        log.sync().unwrap();
    }
    let log = SledLog::open(dir.path()).unwrap();
    assert_eq!(log.read(id(3)).unwrap(), vec![rec(0)]);
    assert_eq!(log.incomplete().unwrap(), vec![id(3)]);
}

#[test]
fn sled_blob_files_are_synced_too() {
    // A record over sled's blob threshold (128 KiB with default segments) goes to its
    // own file, which sled 0.34 does not fsync; the store must.
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(dir.path()).unwrap();
    let mut w = first(id(4));
    let big = LogRecord {
        lsn: Lsn(0),
        at: Timestamp::from_millis(0),
        event: Event::Started {
            definition: "d".into(),
            version: 1,
            steps: vec!["a".into()],
            kinds: Vec::new(),
            stages: Vec::new(),
            input: json!({ "blob": "x".repeat(300 * 1024) }),
            start_key: None,
            deadline: None,
            not_before: None,
        },
    };
    w.records = vec![big.clone()];
    log.append(vec![w]).unwrap();
    log.sync().unwrap();
    assert!(log.blobs_synced() >= 1, "the blob file was fsynced");
    drop(log);
    let log = SledLog::open(dir.path()).unwrap();
    let values = log.read(id(4)).unwrap();
    assert_eq!(codec::decode_log(id(4), &values).unwrap()[0], big);
}

#[test]
fn a_second_sled_open_is_refused_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _held = SledLog::open(dir.path()).unwrap();
    let err = SledLog::open_waiting(dir.path(), std::time::Duration::from_millis(20)).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
}

#[test]
fn memory_crash_loses_exactly_the_unsynced_writes() {
    let log = MemLog::new();
    log.append(vec![first(id(1))]).unwrap();
    log.sync().unwrap();
    log.append(vec![first(id(2))]).unwrap();
    assert_eq!(
        log.incomplete().unwrap(),
        vec![id(1), id(2)],
        "reads see pending writes"
    );
    log.crash();
    assert_eq!(log.incomplete().unwrap(), vec![id(1)]);
    assert!(log.read(id(2)).unwrap().is_empty());
    assert_eq!(log.pending(), 0);
}

#[test]
fn a_failed_sync_makes_nothing_durable() {
    let log = MemLog::new();
    log.fail_next_syncs(1);
    log.append(vec![first(id(1))]).unwrap();
    assert!(matches!(log.sync(), Err(Error::Injected(_))));
    log.crash();
    assert!(log.incomplete().unwrap().is_empty());
}

#[test]
fn records_round_trip_and_bad_bytes_are_typed_errors() {
    let r = LogRecord {
        lsn: Lsn(4),
        at: Timestamp::from_millis(77),
        event: Event::Started {
            definition: "d".into(),
            version: 3,
            steps: vec!["a".into()],
            kinds: vec![crate::StepKind::Pivot],
            stages: Vec::new(),
            input: json!({"x": [1, 2]}),
            start_key: Some(StartKey::new("k").unwrap()),
            deadline: Some(Timestamp::from_millis(9_000)),
            not_before: Some(Timestamp::from_millis(100)),
        },
    };
    let bytes = encode_record(&r).unwrap();
    assert_eq!(decode_record(id(1), Lsn(4), &bytes).unwrap(), r);
    for bad in [&b""[..], b"\x02{}", b"\x01not json", b"\x01{\"lsn\":4}"] {
        let err = decode_record(id(1), Lsn(4), bad).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    }
    // A record filed under the wrong lsn is corrupt too.
    assert!(decode_record(id(1), Lsn(5), &bytes).is_err());
    // Groups: consecutive records from the key's lsn, nothing else.
    let group = |lsns: &[u64]| {
        let body: Vec<String> = lsns
            .iter()
            .map(|l| format!("{{\"lsn\":{l},\"at\":1,\"event\":{{\"type\":\"completed\"}}}}"))
            .collect();
        let mut v = vec![codec::FORMAT_V2];
        v.extend_from_slice(format!("[{}]", body.join(",")).as_bytes());
        v
    };
    assert_eq!(
        codec::decode_value(id(1), Lsn(3), &group(&[3, 4]))
            .unwrap()
            .len(),
        2
    );
    assert!(codec::decode_value(id(1), Lsn(3), &group(&[3, 5])).is_err());
    assert!(codec::decode_value(id(1), Lsn(3), &group(&[4, 5])).is_err());
    assert!(codec::decode_value(id(1), Lsn(3), &group(&[])).is_err());
    assert!(codec::decode_value(id(1), Lsn(3), b"\x02[").is_err());
    assert!(codec::decode_meta(id(1), b"\x01[]").is_err());
    assert!(codec::lsn_of(id(1), b"short").is_err());
    assert!(codec::saga_of_start_key_value(b"short").is_err());
}

/// A `started` record that lists stages (a definition with parallel groups) is stored
/// in format 3, or 4 among other records, so that an engine from before groups refuses
/// it as newer rather than run the group one step at a time; logs without groups keep
/// formats 1 and 2. A format byte past the newest is a newer engine's, not damage.
#[test]
fn records_with_groups_are_stored_in_a_newer_format() {
    let started = |stages: Vec<u32>| LogRecord {
        lsn: Lsn(0),
        at: Timestamp::from_millis(1),
        event: Event::Started {
            definition: "d".into(),
            version: 1,
            steps: vec!["a".into(), "b".into(), "c".into()],
            kinds: Vec::new(),
            stages,
            input: json!({}),
            start_key: None,
            deadline: None,
            not_before: None,
        },
    };
    let grouped = started(vec![0, 1, 1]);
    let bytes = encode_record(&grouped).unwrap();
    assert_eq!(bytes[0], codec::FORMAT_V3);
    assert_eq!(decode_record(id(1), Lsn(0), &bytes).unwrap(), grouped);
    assert_eq!(
        encode_record(&started(Vec::new())).unwrap()[0],
        codec::FORMAT_V1
    );
    // With the first attempt, in one value: format 4, read back whole.
    let write = |first: LogRecord| {
        let mut w = self::first(id(1));
        w.records = vec![first, record(1)];
        codec::ops(w).unwrap()
    };
    let value = |ops: Vec<codec::Op>| {
        ops.into_iter()
            .find_map(|op| match op {
                codec::Op::Put(k, v) if k == codec::log_key(id(1), Lsn(0)) => Some(v),
                _ => None,
            })
            .unwrap()
    };
    let v = value(write(grouped.clone()));
    assert_eq!(v[0], codec::FORMAT_V4);
    assert_eq!(codec::decode_value(id(1), Lsn(0), &v).unwrap()[0], grouped);
    assert_eq!(value(write(started(Vec::new())))[0], codec::FORMAT_V2);
    // The byte after the newest, over JSON: a newer engine's record.
    let mut newer = bytes.clone();
    newer[0] = codec::FORMAT_V4 + 1;
    assert!(matches!(
        decode_record(id(1), Lsn(0), &newer),
        Err(Error::NewerFormat { .. })
    ));
}

/// Logs written by format 1 must stay readable: the golden file is committed and never
/// regenerated by this test.
#[test]
fn golden_v1_log_still_decodes() {
    let text = include_str!("../../../tests/fixtures/golden-v1.jsonl");
    let saga: SagaId = "0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071".parse().unwrap();
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut bytes = vec![codec::FORMAT_V1];
        bytes.extend_from_slice(line.as_bytes());
        records.push(decode_record(saga, Lsn(i as u64), &bytes).unwrap());
    }
    let state = crate::machine::SagaState::fold(saga, &records).unwrap();
    assert_eq!(state.status, SagaStatus::Compensated);
    assert_eq!(state.steps.len(), 3);
}

/// The lease rules every shared store keeps (see `lease.rs`), with real time: a lease of
/// `ttl` is let expire by sleeping past it.
fn lease_conformance(log: &dyn SagaLog, ttl: std::time::Duration) {
    use crate::store::{Answer, Refused};
    let leases = log.leases().expect("a shared store");
    let defs = vec!["d".to_string()];
    let (a_owner, b_owner) = (OwnerId::new("A"), OwnerId::new("B"));
    let under = |mut w: Write, owner: &OwnerId, epoch: u64| {
        w.fence = Some(Fence {
            owner: owner.clone(),
            epoch,
        });
        w
    };
    let next = |saga: SagaId, lsn: u64, status: SagaStatus| Write {
        saga,
        records: vec![record(lsn)],
        meta: meta(saga, status, lsn, None),
        previous: Some(meta(saga, SagaStatus::Running, lsn - 1, None)),
        fence: None,
        taken: Vec::new(),
    };
    let s = id(21);
    let results = log
        .append_each(vec![
            under(first(s), &a_owner, 1),
            // Unfenced: refused by a shared store.
            next(id(22), 1, SagaStatus::Running),
        ])
        .unwrap();
    assert_eq!(results[0], Ok(()));
    assert!(matches!(results[1], Err(Refused::Fenced { .. })));
    assert_eq!(leases.holder(s).unwrap(), Some((a_owner.clone(), 1)));
    // Another owner's write under the same epoch is refused; A's goes through.
    let r = log
        .append_each(vec![under(next(s, 1, SagaStatus::Running), &b_owner, 1)])
        .unwrap();
    assert!(
        matches!(
            r[0],
            Err(Refused::Fenced {
                carried: 1,
                current: 1,
                ..
            })
        ),
        "{r:?}"
    );
    let r = log
        .append_each(vec![under(next(s, 1, SagaStatus::Running), &a_owner, 1)])
        .unwrap();
    assert_eq!(r[0], Ok(()));
    assert_eq!(
        leases.renew(&a_owner).unwrap(),
        vec![Lease { saga: s, epoch: 1 }]
    );
    // Unexpired: nobody else can claim or acquire it.
    assert!(leases.claim(&b_owner, 10, &defs).unwrap().is_empty());
    assert_eq!(leases.acquire(&b_owner, s).unwrap(), None);
    // A second saga with the same start key is refused, its batch-mate is not.
    let mut twin = first(id(23));
    twin.meta.start_key = meta(s, SagaStatus::Running, 0, None).start_key;
    let r = log
        .append_each(vec![
            under(twin, &b_owner, 1),
            under(first(id(24)), &b_owner, 1),
        ])
        .unwrap();
    assert!(
        matches!(&r[0], Err(Refused::StartKeyTaken { existing, .. }) if *existing == s),
        "{r:?}"
    );
    assert_eq!(r[1], Ok(()));
    assert_eq!(
        log.meta(id(23)).unwrap(),
        None,
        "a refused write leaves nothing"
    );

    // A stops renewing; past the lease, B claims it under a new epoch.
    std::thread::sleep(ttl + std::time::Duration::from_millis(150));
    // Only by a process that knows the saga's definition.
    assert!(leases
        .claim(&b_owner, 10, &["other".to_string()])
        .unwrap()
        .is_empty());
    let claimed = leases.claim(&b_owner, 10, &defs).unwrap();
    assert!(
        claimed.contains(&Lease { saga: s, epoch: 2 }),
        "{claimed:?}"
    );
    let r = log
        .append_each(vec![under(next(s, 2, SagaStatus::Running), &a_owner, 1)])
        .unwrap();
    assert!(
        matches!(
            r[0],
            Err(Refused::Fenced {
                carried: 1,
                current: 2,
                ..
            })
        ),
        "{r:?}"
    );
    let r = log
        .append_each(vec![under(next(s, 2, SagaStatus::Running), &b_owner, 2)])
        .unwrap();
    assert_eq!(r[0], Ok(()));
    assert_eq!(
        log.read(s).unwrap().len(),
        3,
        "the fenced write left no record"
    );

    // Requests: recorded, listed for the holder, answered once.
    let q = leases
        .request(s, "{\"cancel\":null}", "ops", "why")
        .unwrap();
    let open = leases.requests_for(&b_owner).unwrap();
    assert_eq!(open.iter().map(|r| r.id).collect::<Vec<_>>(), vec![q]);
    assert!(leases.requests_for(&a_owner).unwrap().is_empty());
    assert!(leases.answer(q, &Answer::NotDriven).unwrap());
    assert!(!leases.answer(q, &Answer::Refused("late".into())).unwrap());
    assert_eq!(leases.answer_of(q).unwrap(), Some(Answer::NotDriven));
    assert!(leases.requests_for(&b_owner).unwrap().is_empty());

    // Handed back until a timer an hour away: not claimable, but acquirable.
    let far = crate::clock::SystemClock
        .now()
        .saturating_add(std::time::Duration::from_secs(3600));
    leases
        .release(&b_owner, Lease { saga: s, epoch: 2 }, Some(far))
        .unwrap();
    assert_eq!(leases.holder(s).unwrap(), None);
    assert!(!leases
        .claim(&a_owner, 10, &defs)
        .unwrap()
        .iter()
        .any(|l| l.saga == s));
    let l = leases.acquire(&a_owner, s).unwrap();
    assert_eq!(l, Some(Lease { saga: s, epoch: 3 }));
    // A saga that ends lets its lease go; an ended saga is never claimed.
    let r = log
        .append_each(vec![under(next(s, 3, SagaStatus::Completed), &a_owner, 3)])
        .unwrap();
    assert_eq!(r[0], Ok(()));
    std::thread::sleep(ttl + std::time::Duration::from_millis(150));
    assert!(!leases
        .claim(&b_owner, 10, &defs)
        .unwrap()
        .iter()
        .any(|l| l.saga == s));
}

use crate::clock::Clock;
use crate::store::Lease;

#[test]
fn shared_memory_store_conforms() {
    let ttl = std::time::Duration::from_millis(300);
    conformance(&MemLog::shared(
        std::sync::Arc::new(crate::clock::SystemClock),
        ttl,
    ));
    lease_conformance(
        &MemLog::shared(std::sync::Arc::new(crate::clock::SystemClock), ttl),
        ttl,
    );
}

/// A PostgreSQL store in a schema of its own, or `None` (with a message) if no server
/// answers, unless `CI` is set: then no server is a failure.
#[cfg(feature = "postgres")]
pub(crate) fn test_pg(ttl: std::time::Duration) -> Option<crate::store::PgLog> {
    use crate::store::{PgLog, PgOptions};
    let url = std::env::var("SAGAFLOW_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into());
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    let schema = format!(
        "t_{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    );
    match PgLog::connect(&url, PgOptions::default().schema(schema).lease_ttl(ttl)) {
        Ok(s) => Some(s),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: no PostgreSQL at `{url}` ({e}); set SAGAFLOW_TEST_DATABASE_URL");
            None
        }
        Err(e) => panic!("CI is set and PostgreSQL at `{url}` is not usable: {e}"),
    }
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_store_conforms() {
    let ttl = std::time::Duration::from_millis(300);
    let Some(pg) = test_pg(ttl) else { return };
    conformance(&pg);
    pg.drop_schema().unwrap();
    let Some(pg) = test_pg(ttl) else { return };
    lease_conformance(&pg, ttl);
    assert_eq!(pg.schema_version().unwrap(), crate::store::SCHEMA_VERSION);
    pg.drop_schema().unwrap();
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_refuses_a_schema_from_a_newer_engine() {
    use crate::store::{PgLog, PgOptions};
    let Some(pg) = test_pg(std::time::Duration::from_secs(1)) else {
        return;
    };
    pg.bump_schema_version_for_test(crate::store::SCHEMA_VERSION + 1)
        .unwrap();
    let url = std::env::var("SAGAFLOW_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into());
    let err = PgLog::connect(&url, PgOptions::default().schema(pg.schema())).unwrap_err();
    assert!(err.to_string().contains("newer engine"), "{err}");
    pg.drop_schema().unwrap();
}
