//! Every decoder of stored bytes against random bytes and structured mutations of valid
//! records (G8): none panics; each answers with a value or a typed error; and what a
//! damaged store holds never stops recovery of the sagas beside it.
//!
//! Cases: `SAGA_DECODER_CASES` (default 5,000 per property; the soak mode sets 1,000,000
//! or more, see docs/testing.md).

use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sagaflow::admin;
use sagaflow::machine::{Event, LogRecord, ParkReason, Repair, SagaState};
use sagaflow::store::{codec, MemLog, SagaLog};
use sagaflow::{Attempt, FailureKind, Lsn, ParkKind, SagaId, StartKey, Timestamp};
use serde_json::json;

fn cases() -> u32 {
    std::env::var("SAGA_DECODER_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// The saga every damaged value belongs to.
const SAGA_BYTES: [u8; 16] = [1; 16];

/// A few valid records of every shape the engine writes.
fn valid_records() -> Vec<LogRecord> {
    let at = Timestamp::from_millis(1_700_000_000_000);
    let events = vec![
        Event::Started {
            definition: "checkout".into(),
            version: 1,
            steps: vec!["payment".into(), "order".into()],
            kinds: vec![],
            stages: vec![],
            input: json!({"cents": 1200, "items": [1, 2, {"sku": "a"}]}),
            start_key: Some(StartKey::new("k-1").unwrap()),
            deadline: Some(at),
            not_before: None,
        },
        Event::StepAttemptStarted {
            step: 0,
            attempt: Attempt(1),
            deadline: at,
        },
        Event::Awaiting {
            step: 0,
            attempt: Attempt(1),
            key: "settlement/1".into(),
        },
        Event::EventReceived {
            step: 0,
            attempt: Attempt(1),
            delivery: "wh-1".into(),
        },
        Event::StepSucceeded {
            step: 0,
            attempt: Attempt(1),
            output: json!({"receipt": "r"}),
        },
        Event::StepFailed {
            step: 1,
            attempt: Attempt(1),
            kind: FailureKind::RetryAfter,
            error: "429".into(),
            retry_at: Some(at),
        },
        Event::CompensationBegan {
            reason: "refused".into(),
        },
        Event::Parked {
            reason: ParkReason::new(ParkKind::CompensationFailed, "x"),
        },
        Event::OperatorAction {
            action: Repair::SkipStep { step: 1 },
            operator: "ops".into(),
            reason: "by hand".into(),
        },
        Event::Completed,
    ];
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| LogRecord {
            lsn: Lsn(i as u64),
            at,
            event,
        })
        .collect()
}

/// A valid stored value: one record (format 1) or a group (format 2).
fn valid_values() -> Vec<(Lsn, Vec<u8>)> {
    let records = valid_records();
    let mut out: Vec<(Lsn, Vec<u8>)> = records
        .iter()
        .map(|r| (r.lsn, codec::encode_record(r).unwrap()))
        .collect();
    let mut group = vec![codec::FORMAT_V2];
    group.extend_from_slice(&serde_json::to_vec(&records[1..3]).unwrap());
    out.push((Lsn(1), group));
    // A `started` record with stages (format 3), and a delivery's value.
    let mut grouped = records[0].clone();
    if let Event::Started { steps, stages, .. } = &mut grouped.event {
        *stages = vec![0; steps.len()];
    }
    out.push((Lsn(0), codec::encode_record(&grouped).unwrap()));
    out
}

/// An inbox entry cut and flipped byte by byte: every damaged key or value is an error,
/// never a panic, and the intact one decodes.
#[test]
fn damaged_deliveries_never_panic_a_decoder() {
    let key = codec::inbox_key("settlement/1", "wh-1").unwrap();
    let value =
        codec::encode_delivery(&json!({"settled": 1200}), Timestamp::from_millis(5)).unwrap();
    let d = codec::decode_delivery(&key, &value, None).unwrap();
    assert_eq!((d.key.as_str(), d.id.as_str()), ("settlement/1", "wh-1"));
    for bytes in [&key, &value] {
        for i in 0..bytes.len() {
            let mut cut = bytes.clone();
            cut.truncate(i);
            let _ = codec::decode_delivery(&cut, &value, None);
            let _ = codec::decode_delivery(&key, &cut, Some(&cut));
            let _ = codec::inbox_ids_of(&cut);
            for flip in [0x01u8, 0x80, 0xff] {
                let mut v = bytes.clone();
                v[i] ^= flip;
                let _ = codec::decode_delivery(&v, &value, None);
                let _ = codec::decode_delivery(&key, &v, Some(&v));
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Delete(usize),
    /// Replaces the first number in the JSON with this text.
    Number(String),
    /// Wraps the value's JSON in `n` arrays.
    Nest(usize),
    FormatByte(u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        prop_oneof![
            Just("18446744073709551615".to_string()),
            Just("18446744073709551616".to_string()),
            Just("-1".to_string()),
            Just("1e999".to_string()),
            Just("4294967296".to_string()),
            Just("0.5".to_string()),
        ]
        .prop_map(Mutation::Number),
        (1..300usize).prop_map(Mutation::Nest),
        any::<u8>().prop_map(Mutation::FormatByte),
    ]
}

fn mutate(mut v: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let n = v.len().max(1);
    match m {
        Mutation::Flip(i, b) => {
            if let Some(x) = v.get_mut(i % n) {
                *x ^= b;
            }
        }
        Mutation::Truncate(i) => v.truncate(i % n),
        Mutation::Insert(i, b) => v.insert(i % (v.len() + 1), *b),
        Mutation::Delete(i) => {
            if !v.is_empty() {
                v.remove(i % n);
            }
        }
        Mutation::Number(text) => {
            if let Some(start) = v.iter().skip(1).position(u8::is_ascii_digit) {
                let start = start + 1;
                let end = v[start..]
                    .iter()
                    .position(|b| !b.is_ascii_digit())
                    .map_or(v.len(), |e| start + e);
                v.splice(start..end, text.bytes());
            }
        }
        Mutation::Nest(levels) => {
            if !v.is_empty() {
                let body = v.split_off(1);
                v.extend(std::iter::repeat_n(b'[', *levels));
                v.extend(body);
                v.extend(std::iter::repeat_n(b']', *levels));
            }
        }
        Mutation::FormatByte(b) => {
            if let Some(x) = v.first_mut() {
                *x = *b;
            }
        }
    }
    v
}

/// Decodes `bytes` every way the engine reads stored bytes; panics are the failure.
fn decode_every_way(lsn: Lsn, bytes: &[u8]) {
    if let Ok(records) = codec::decode_value(SagaId::from_bytes(SAGA_BYTES), lsn, bytes) {
        // What decodes must fold or be refused, never panic.
        let _ = SagaState::fold(SagaId::from_bytes(SAGA_BYTES), &records);
        for r in &records {
            let _ = r.event.step();
            let _ = r.event.name();
        }
    }
    let _ = codec::decode_record(SagaId::from_bytes(SAGA_BYTES), lsn, bytes);
    let _ = codec::decode_meta(SagaId::from_bytes(SAGA_BYTES), bytes);
    let _ = codec::decode_log(SagaId::from_bytes(SAGA_BYTES), &[(lsn, bytes.to_vec())]);
    let _ = codec::lsn_of(SagaId::from_bytes(SAGA_BYTES), bytes);
    let _ = codec::saga_of_index_key(bytes);
    let _ = codec::due_of_timer_key(bytes);
    let _ = codec::saga_of_start_key_value(bytes);
    // The inbox: a delivery's key and value, a taken mark.
    let _ = codec::inbox_ids_of(bytes);
    let _ = codec::decode_delivery(bytes, bytes, Some(bytes));
    if let Ok(key) = codec::inbox_key("settlement/1", "wh-1") {
        let _ = codec::decode_delivery(&key, bytes, None);
    }
}

#[test]
fn random_bytes_never_panic_a_decoder() {
    runner()
        .run(
            &(any::<u64>(), proptest::collection::vec(any::<u8>(), 0..512)),
            |(lsn, bytes)| {
                decode_every_way(Lsn(lsn), &bytes);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn mutated_records_never_panic_a_decoder() {
    let values = valid_values();
    runner()
        .run(
            &(
                0..values.len(),
                proptest::collection::vec(mutation(), 1..4),
                any::<u64>(),
            ),
            |(which, mutations, lsn)| {
                let (at, bytes) = &values[which];
                let bytes = mutations.iter().fold(bytes.clone(), mutate);
                decode_every_way(*at, &bytes);
                decode_every_way(Lsn(lsn), &bytes);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn valid_records_round_trip() {
    for (lsn, bytes) in valid_values() {
        let records = codec::decode_value(SagaId::from_bytes(SAGA_BYTES), lsn, &bytes).unwrap();
        assert_eq!(records[0].lsn, lsn);
    }
}

/// A damaged saga beside a healthy one: whatever the damage, reading its log as far as
/// it goes and the store's consistency check answer, and the healthy saga still folds.
#[test]
fn a_damaged_log_never_stops_its_neighbour() {
    let values = valid_values();
    let healthy = SagaId::from_bytes([2; 16]);
    let store_cases = (cases() / 10).max(100);
    let mut runner = TestRunner::new(Config {
        cases: store_cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(
                proptest::collection::vec((0..values.len(), mutation()), 1..6),
                proptest::collection::vec(any::<u8>(), 0..40),
            ),
            |(damage, odd_key)| {
                let store = Arc::new(MemLog::new());
                // The healthy neighbour: a started record and its summary.
                let first = &valid_records()[0];
                store.put_raw(
                    &codec::log_key(healthy, Lsn(0)),
                    &codec::encode_record(first).unwrap(),
                );
                for (i, (which, m)) in damage.iter().enumerate() {
                    let (_, bytes) = &values[*which];
                    store.put_raw(
                        &codec::log_key(SagaId::from_bytes(SAGA_BYTES), Lsn(i as u64)),
                        &mutate(bytes.clone(), m),
                    );
                }
                let mut key = b"L".to_vec();
                key.extend_from_slice(&odd_key);
                store.put_raw(&key, b"\x01{}");
                let report = store.check().unwrap();
                let _ = admin::readable_log(&*store, SagaId::from_bytes(SAGA_BYTES));
                let view = admin::readable_log(&*store, healthy).unwrap();
                prop_assert!(view.problems.is_empty(), "{:?} {:?}", view.problems, report);
                Ok(())
            },
        )
        .unwrap();
}
