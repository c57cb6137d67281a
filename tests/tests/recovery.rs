//! Recovery: an engine dropped or crashed mid-saga, reopened on the same store.

use std::sync::Arc;
use std::time::Duration;

use sagaflow::machine::Event;
use sagaflow::store::{codec, MemLog, SagaLog, SledLog};
use sagaflow::{
    Engine, Error, Idempotence, Lsn, ParkKind, Phase, SagaDefinition, SagaOutcome, SagaStatus,
    StepKind, Timestamp, TokioClock,
};
use sagaflow_tests::*;
use serde_json::json;

fn attempts_of(engine: &Engine, id: sagaflow::SagaId, step: u32) -> Vec<u32> {
    engine
        .history(id)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            Event::StepAttemptStarted {
                step: s, attempt, ..
            } if s == step => Some(attempt.0),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_dropped_mid_saga_finishes_it_on_reopen_without_double_effects() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::new();
    // The inventory service applies the reservation, then the engine dies before hearing back.
    ledger.script("inventory", Phase::Action, [Outcome::ApplyThenHang]);
    let engine = builder()
        .register(checkout(&ledger))
        .open(dir.path())
        .await
        .unwrap();
    let id = engine
        .start("checkout", json!({"cents": 100}), None)
        .await
        .unwrap();
    ledger.wait_for_call(id, "inventory", Phase::Action).await;
    drop(engine);

    let engine = builder()
        .register(checkout(&ledger))
        .open(dir.path())
        .await
        .unwrap();
    assert_eq!(engine.recovery().resumed, 1);
    let outcome = engine.wait(id).await.unwrap();
    assert!(
        matches!(outcome, SagaOutcome::Completed { .. }),
        "{outcome:?}"
    );
    // Each step took effect once; inventory was asked twice, with the same key.
    assert_eq!(
        ledger.effects_of(id),
        ["payment", "inventory", "order"]
            .map(|s| (s.to_string(), Phase::Action))
            .to_vec()
    );
    let inv = ledger.calls_of(id, "inventory", Phase::Action);
    assert_eq!(inv.len(), 2);
    assert_eq!(inv[0].0, inv[1].0);
    assert_eq!(ledger.applications()[&inv[0].0], 2);
    assert_eq!(ledger.calls_of(id, "payment", Phase::Action).len(), 1);
    assert_eq!(attempts_of(&engine, id, 1), [1, 2]);
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_interrupted_non_idempotent_step_is_treated_as_done_and_compensated() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    ledger.script("inventory", Phase::Action, [Outcome::ApplyThenHang]);
    let def = || {
        checkout_with(
            &ledger,
            [
                Idempotence::Idempotent,
                Idempotence::NotIdempotent,
                Idempotence::Idempotent,
            ],
        )
    };
    let engine = builder()
        .register(def())
        .open_with(store.clone())
        .await
        .unwrap();
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    ledger.wait_for_call(id, "inventory", Phase::Action).await;
    drop(engine);
    store.crash();

    let engine = builder()
        .register(def())
        .open_with(store.clone())
        .await
        .unwrap();
    let SagaOutcome::Compensated { reason } = engine.wait(id).await.unwrap() else {
        panic!("expected compensated");
    };
    assert!(reason.contains("interrupted"), "{reason}");
    assert_eq!(
        ledger.calls_of(id, "inventory", Phase::Action).len(),
        1,
        "never re-run"
    );
    assert_eq!(
        ledger.effects_of(id),
        vec![
            ("payment".to_string(), Phase::Action),
            ("inventory".to_string(), Phase::Action),
            ("inventory".to_string(), Phase::Compensation),
            ("payment".to_string(), Phase::Compensation),
        ]
    );
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_retry_scheduled_before_a_crash_fires_after_it() {
    let store = Arc::new(MemLog::new());
    let clock = Arc::new(TokioClock::starting_at(Timestamp::from_millis(5_000_000)));
    let ledger = Ledger::new();
    ledger.script(
        "payment",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(600))],
    );
    let engine = paused_builder(clock.clone())
        .register(checkout(&ledger))
        .open_with(store.clone())
        .await
        .unwrap();
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    while engine.status(id).unwrap().due.is_none() {
        tokio::task::yield_now().await;
    }
    let due = engine.status(id).unwrap().due.unwrap();
    drop(engine);
    store.crash();

    let engine = paused_builder(clock.clone())
        .register(checkout(&ledger))
        .open_with(store.clone())
        .await
        .unwrap();
    assert_eq!(engine.scheduled(due).unwrap(), vec![(due, id)]);
    assert!(matches!(
        engine.wait(id).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    let second = engine
        .history(id)
        .unwrap()
        .into_iter()
        .filter(|r| matches!(r.event, Event::StepAttemptStarted { step: 0, .. }))
        .nth(1)
        .unwrap();
    assert!(second.at >= due);
    assert_eq!(ledger.calls_of(id, "payment", Phase::Action).len(), 2);
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_clean_shutdown_mid_saga_resumes_on_reopen() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    ledger.script(
        "order",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(3600))],
    );
    let engine = builder()
        .register(checkout(&ledger))
        .open_with(store.clone())
        .await
        .unwrap();
    let id = engine.start("checkout", json!({}), None).await.unwrap();
    ledger.wait_for_call(id, "order", Phase::Action).await;
    engine.shutdown().await.unwrap();
    // Everything the shutdown wrote is durable: a crash now loses nothing.
    store.crash();
    assert_eq!(store.pending(), 0);

    let engine = builder()
        .register(checkout(&ledger))
        .open_with(store.clone())
        .await
        .unwrap();
    let state = engine.state(id).unwrap();
    assert_eq!(state.status, SagaStatus::Running);
    assert!(matches!(
        state.steps[2].action,
        sagaflow::machine::Progress::Failed {
            retry_at: Some(_),
            ..
        }
    ));
    assert_eq!(engine.recovery().resumed, 1);
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unknown_definition_parks_that_saga_and_the_others_finish() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    ledger.script("payment", Phase::Action, [Outcome::Hang, Outcome::Hang]);
    let engine = builder()
        .register(checkout(&ledger))
        .register(checkout_with_pivot(&ledger))
        .open_with(store.clone())
        .await
        .unwrap();
    let lost = engine.start("checkout", json!({}), None).await.unwrap();
    let kept = engine
        .start("checkout-pivot", json!({}), None)
        .await
        .unwrap();
    ledger.wait_for_call(lost, "payment", Phase::Action).await;
    ledger.wait_for_call(kept, "payment", Phase::Action).await;
    drop(engine);

    let engine = builder()
        .register(checkout_with_pivot(&ledger))
        .open_with(store.clone())
        .await
        .unwrap();
    let report = engine.recovery().clone();
    assert_eq!(report.resumed, 1);
    assert_eq!(report.parked.len(), 1);
    assert_eq!(report.parked[0].0, lost);
    assert_eq!(report.parked[0].1.kind, ParkKind::UnknownDefinition);
    assert!(matches!(
        engine.wait(kept).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    let SagaOutcome::Parked { reason } = engine.wait(lost).await.unwrap() else {
        panic!("expected parked");
    };
    assert_eq!(
        reason.message,
        "definition `checkout` version 1 is not registered with this engine"
    );
    // Nothing of the parked saga's log was lost: its first attempt is still there.
    assert_eq!(attempts_of(&engine, lost, 0), [1]);
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_definition_whose_steps_changed_under_the_same_version_parks() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    let id = interrupted_checkout(store.clone(), &ledger).await;

    let changed = SagaDefinition::builder("checkout", 1)
        .step_with(
            "payment",
            StepKind::Compensatable,
            fake("payment", &ledger),
            opts(),
        )
        .step_with(
            "shipping",
            StepKind::Compensatable,
            fake("shipping", &ledger),
            opts(),
        )
        .build()
        .unwrap();
    let engine = builder()
        .register(changed)
        .open_with(store.clone())
        .await
        .unwrap();
    let SagaOutcome::Parked { reason } = engine.wait(id).await.unwrap() else {
        panic!("expected parked");
    };
    assert_eq!(reason.kind, ParkKind::DefinitionMismatch);
    assert!(
        reason.message.contains(
            "started with [payment (compensatable), inventory (compensatable), order (compensatable)]"
        ),
        "{}",
        reason.message
    );
    // Parked by recovery itself, and counted in its report.
    assert_eq!(engine.recovery().parked.len(), 1);
    assert_eq!(engine.recovery().parked[0].0, id);
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_step_whose_kind_changed_under_the_same_version_parks() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    let id = interrupted_checkout(store.clone(), &ledger).await;

    // Same names, same version, but `order` is now the pivot: the log's kinds say
    // otherwise, and driving it would misjudge what may be compensated.
    let mut b = SagaDefinition::builder("checkout", 1);
    for (name, kind) in [
        ("payment", StepKind::Compensatable),
        ("inventory", StepKind::Compensatable),
        ("order", StepKind::Pivot),
    ] {
        b = b.step_with(name, kind, fake(name, &ledger), opts());
    }
    let engine = builder()
        .register(b.build().unwrap())
        .open_with(store.clone())
        .await
        .unwrap();
    let SagaOutcome::Parked { reason } = engine.wait(id).await.unwrap() else {
        panic!("expected parked");
    };
    assert_eq!(reason.kind, ParkKind::DefinitionMismatch);
    assert!(
        reason.message.contains("order (a pivot)"),
        "{}",
        reason.message
    );
    assert_eq!(engine.recovery().parked.len(), 1);
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn old_sagas_keep_their_version_and_new_ones_take_the_latest() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    let old = interrupted_checkout(store.clone(), &ledger).await;

    let v2 = SagaDefinition::builder("checkout", 2)
        .step_with(
            "payment",
            StepKind::Compensatable,
            fake("payment", &ledger),
            opts(),
        )
        .build()
        .unwrap();
    let engine = builder()
        .register(checkout(&ledger))
        .register(v2)
        .open_with(store.clone())
        .await
        .unwrap();
    let new = engine.start("checkout", json!({}), None).await.unwrap();
    let o = engine.wait(old).await.unwrap();
    assert!(
        matches!(&o, SagaOutcome::Completed { outputs } if outputs.len() == 3),
        "{o:?}"
    );
    assert!(
        matches!(engine.wait(new).await.unwrap(), SagaOutcome::Completed { outputs } if outputs.len() == 1)
    );
    assert_eq!(engine.status(new).unwrap().version, 2);
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_reported_and_parks_only_its_saga() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::new();
    ledger.script("inventory", Phase::Action, [Outcome::Hang, Outcome::Hang]);
    let engine = builder()
        .register(checkout(&ledger))
        .open(dir.path())
        .await
        .unwrap();
    let bad = engine.start("checkout", json!({}), None).await.unwrap();
    let good = engine.start("checkout", json!({}), None).await.unwrap();
    ledger.wait_for_call(bad, "inventory", Phase::Action).await;
    ledger.wait_for_call(good, "inventory", Phase::Action).await;
    drop(engine);

    // Flip the record "payment succeeded" of one saga into garbage, as a bad disk would.
    let dir_path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let log = SledLog::open_waiting(&dir_path, Duration::from_secs(10)).unwrap();
        // Values: [started, payment attempt], [payment succeeded, inventory attempt].
        let (lsn, _) = log.read(bad).unwrap()[1].clone();
        assert_eq!(lsn, Lsn(2));
        log.put_raw(&codec::log_key(bad, lsn), b"\x01{\"lsn\":2,\"at\":")
            .unwrap();
    })
    .await
    .unwrap();

    let engine = builder()
        .register(checkout(&ledger))
        .open(dir.path())
        .await
        .unwrap();
    assert_eq!(engine.recovery().resumed, 1);
    assert_eq!(engine.recovery().parked.len(), 1);
    assert!(matches!(
        engine.wait(good).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    let SagaOutcome::Parked { reason } = engine.wait(bad).await.unwrap() else {
        panic!("expected parked");
    };
    assert_eq!(reason.kind, ParkKind::CorruptLog);
    assert!(
        reason.message.contains("log record 2"),
        "{}",
        reason.message
    );
    let err = engine.history(bad).unwrap_err();
    assert!(
        matches!(err, Error::CorruptLog { saga, .. } if saga == bad),
        "{err}"
    );
    let meta = engine.status(bad).unwrap();
    assert_eq!(meta.status, SagaStatus::Parked);
    // The bad saga's later effects never ran.
    assert!(ledger.calls_of(bad, "order", Phase::Action).is_empty());
    engine.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_engine_reopened_with_the_same_seed_never_reuses_a_saga_id() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    // Virtual time stands still between the two engines: same millisecond, same seed.
    let clock = Arc::new(TokioClock::starting_at(Timestamp::from_millis(42)));
    let first = paused_builder(clock.clone())
        .register(checkout(&ledger))
        .open_with(store.clone())
        .await
        .unwrap();
    let a = first.start("checkout", json!({}), None).await.unwrap();
    first.wait(a).await.unwrap();
    first.shutdown().await.unwrap();
    let second = paused_builder(clock)
        .register(checkout(&ledger))
        .open_with(store.clone())
        .await
        .unwrap();
    let b = second.start("checkout", json!({}), None).await.unwrap();
    assert_ne!(a, b);
    second.wait(b).await.unwrap();
    assert_eq!(second.state(a).unwrap().status, SagaStatus::Completed);
    assert_eq!(
        second.history(a).unwrap().len(),
        8,
        "the first saga's log is untouched"
    );
    second.shutdown().await.unwrap();
}

/// Found by the order-processing chaos run: recovery listed the running sagas, started
/// their drivers, then listed the compensating ones; a saga whose new driver began
/// compensating in between was listed twice and driven by two drivers, which wrote two
/// records with one lsn. Here a second saga that has to be parked makes recovery yield
/// between the two lists, on a single thread, so the interleaving is certain.
#[tokio::test]
async fn a_saga_that_starts_compensating_during_recovery_gets_one_driver() {
    let store = Arc::new(MemLog::new());
    let ledger = Ledger::new();
    ledger.script("payment", Phase::Action, [Outcome::ApplyThenHang]);
    let x_def = || {
        checkout_with(
            &ledger,
            [
                Idempotence::NotIdempotent,
                Idempotence::Idempotent,
                Idempotence::Idempotent,
            ],
        )
    };
    let engine = builder()
        .register(x_def())
        .register(checkout_with_pivot(&ledger))
        .open_with(store.clone())
        .await
        .unwrap();
    let x = engine.start("checkout", json!({}), None).await.unwrap();
    ledger.wait_for_call(x, "payment", Phase::Action).await;
    let y = engine
        .start("checkout-pivot", json!({"tag": "y"}), None)
        .await
        .unwrap();
    ledger.script_tagged("y", "payment", Phase::Action, [Outcome::Hang]);
    ledger.wait_for_call(y, "payment", Phase::Action).await;
    drop(engine);

    // Only x's definition: recovery resumes x (which at once closes its interrupted
    // step and begins compensating), then parks y, which yields.
    let engine = builder()
        .register(x_def())
        .open_with(store.clone())
        .await
        .unwrap();
    assert_eq!(engine.recovery().resumed, 1, "{:?}", engine.recovery());
    assert!(matches!(
        engine.wait(x).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    let state = engine.state(x).unwrap();
    assert_eq!(state.status, SagaStatus::Compensated);
    assert_eq!(ledger.calls_of(x, "payment", Phase::Compensation).len(), 1);
    engine.shutdown().await.unwrap();
}

/// Logs written before parallel groups existed (formats 1 and 2, no stages, a
/// `retry_now` without a step) still recover: the fixture is a store's log values as
/// such an engine wrote them, committed and never regenerated. One saga was going
/// forward (its second attempt of `inventory` interrupted by a crash, after an
/// operator's retry-now), one compensating (its compensation of `payment` interrupted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_before_parallel_groups_recovers() {
    #[derive(serde::Deserialize)]
    struct Value {
        saga: sagaflow::SagaId,
        lsn: u64,
        format: u8,
        raw: String,
    }
    let text = include_str!("../fixtures/pre-groups-store.jsonl");
    let values: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    {
        let log = SledLog::open(dir.path()).unwrap();
        for v in &values {
            let mut bytes = vec![v.format];
            bytes.extend_from_slice(v.raw.as_bytes());
            // Still the format this engine writes for a saga without groups, byte for
            // byte: decoding and encoding again gives the same value.
            let records = codec::decode_value(v.saga, Lsn(v.lsn), &bytes).unwrap();
            let mut again: Vec<Vec<u8>> = records
                .iter()
                .map(|r| codec::encode_record(r).unwrap())
                .collect();
            let reencoded = if again.len() == 1 {
                again.remove(0)
            } else {
                let inner: Vec<&[u8]> = again.iter().map(|b| &b[1..]).collect();
                let mut out = vec![codec::FORMAT_V2, b'['];
                out.extend_from_slice(&inner.join(&b","[..]));
                out.push(b']');
                out
            };
            assert_eq!(
                String::from_utf8_lossy(&reencoded),
                String::from_utf8_lossy(&bytes)
            );
            log.put_raw(&codec::log_key(v.saga, Lsn(v.lsn)), &bytes)
                .unwrap();
        }
    }
    let (forward, backward) = (values[0].saga, values[values.len() - 1].saga);

    let ledger = Ledger::new();
    let engine = builder()
        .register(checkout(&ledger))
        .register(checkout_with_pivot(&ledger))
        .open(dir.path())
        .await
        .unwrap();
    let report = engine.recovery();
    assert_eq!(report.resumed, 2, "{report:?}");
    assert!(report.parked.is_empty(), "{report:?}");
    // The fixture holds the logs alone: their summaries and indexes are rebuilt, and
    // nothing else is found.
    assert!(
        report.findings.iter().all(|f| matches!(
            f.action.as_str(),
            "summary rebuilt from the log" | "rebuilt from the summary"
        )),
        "{:?}",
        report.findings
    );

    let outcome = engine.wait(forward).await.unwrap();
    assert!(
        matches!(outcome, SagaOutcome::Completed { .. }),
        "{outcome:?}"
    );
    // The interrupted attempt ran again (attempt 3) with the key of attempts 1 and 2.
    assert_eq!(attempts_of(&engine, forward, 1), [1, 2, 3]);
    let keys: Vec<String> = ledger
        .calls_of(forward, "inventory", Phase::Action)
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(keys.len(), 1);
    assert_eq!(
        keys[0],
        sagaflow::IdempotencyKey::derive(forward, "inventory", Phase::Action).to_string()
    );
    // The operator's old `retry_now` reads as one for the stage the saga was at.
    assert!(engine.history(forward).unwrap().iter().any(|r| matches!(
        &r.event,
        Event::OperatorAction {
            action: sagaflow::machine::Repair::RetryNow { step: None },
            ..
        }
    )));

    let outcome = engine.wait(backward).await.unwrap();
    assert!(
        matches!(outcome, SagaOutcome::Compensated { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        ledger.calls_of(backward, "payment", Phase::Compensation),
        [(
            sagaflow::IdempotencyKey::derive(backward, "payment", Phase::Compensation).to_string(),
            2
        )]
    );
}
