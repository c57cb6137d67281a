//! What the dashboard's list and bulk page stand on: filters by park kind, start key,
//! text in reasons and age; bulk repairs with a dry run first, each recorded on its own
//! saga; and the activity an overview charts.

use std::time::Duration;

use sagaflow::admin::ListFilter;
use sagaflow::machine::{Event, Repair};
use sagaflow::{BulkAction, Error, ParkKind, Phase, SagaOutcome, SagaStatus, StartKey};
use sagaflow_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_pick_sagas_and_a_bulk_repair_acts_on_exactly_those_after_a_dry_run() {
    let ledger = Ledger::new();
    for tag in ["p1", "p2", "p3"] {
        ledger.script_tagged(tag, "order", Phase::Action, [Outcome::Rejected]);
        ledger.script_tagged(tag, "inventory", Phase::Compensation, [Outcome::Rejected]);
    }
    ledger.script_tagged("c1", "order", Phase::Action, [Outcome::Rejected]);
    let engine = memory_engine(checkout(&ledger)).await;
    let mut parked = Vec::new();
    for tag in ["p1", "p2", "p3"] {
        let id = engine
            .start("checkout", json!({ "tag": tag }), None)
            .await
            .unwrap();
        assert!(matches!(
            engine.wait(id).await.unwrap(),
            SagaOutcome::Parked { .. }
        ));
        parked.push(id);
    }
    let compensated = engine
        .start("checkout", json!({ "tag": "c1" }), None)
        .await
        .unwrap();
    engine.wait(compensated).await.unwrap();
    let keyed = engine
        .start_once(
            "checkout",
            json!({ "tag": "fine" }),
            StartKey::new("order-42").unwrap(),
        )
        .await
        .unwrap()
        .id();
    engine.wait(keyed).await.unwrap();

    let ids = |f: ListFilter| -> Vec<sagaflow::SagaId> {
        engine.find(&f).unwrap().into_iter().map(|m| m.id).collect()
    };
    assert_eq!(
        ids(ListFilter::default().park_kind(ParkKind::CompensationFailed)),
        parked
    );
    assert!(ids(ListFilter::default().park_kind(ParkKind::CrashLoop)).is_empty());
    // A park kind with another status matches nothing, not the parked sagas.
    assert!(ids(ListFilter::default()
        .status(SagaStatus::Completed)
        .park_kind(ParkKind::CompensationFailed))
    .is_empty());
    assert_eq!(
        ids(ListFilter::default().start_key("order-42")),
        vec![keyed]
    );
    assert!(ids(ListFilter::default().start_key("order-43")).is_empty());
    // Text in reasons, any case: the compensated saga's reason names the order step.
    let by_text = ids(ListFilter::default().text("ORDER REFUSED"));
    assert!(by_text.contains(&compensated), "{by_text:?}");
    assert!(!by_text.contains(&keyed));
    assert_eq!(
        ids(ListFilter::default().newer_than(Duration::from_secs(3600))).len(),
        5
    );
    assert!(ids(ListFilter::default().older_than(Duration::from_secs(3600))).is_empty());
    // Newest first, with a cursor.
    let newest = ids(ListFilter::default().newest_first().limit(2));
    assert_eq!(newest, vec![keyed, compensated]);
    let next = ids(ListFilter::default()
        .newest_first()
        .after(compensated)
        .limit(2));
    assert_eq!(next, vec![parked[2], parked[1]]);

    // Who and why are required.
    let parked_filter = ListFilter::default().status(SagaStatus::Parked);
    let e = engine
        .bulk(&parked_filter, BulkAction::Resume, None, "ops", " ")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BulkRefused(_)), "{e}");
    assert_eq!(e.code(), "SAGA-0020");

    // A dry run counts and writes nothing.
    let dry = engine
        .bulk(
            &parked_filter,
            BulkAction::Resume,
            None,
            "ops",
            "stock fixed",
        )
        .await
        .unwrap();
    assert_eq!((dry.matched, dry.applied, dry.refused_count), (3, 3, 0));
    for id in &parked {
        assert_eq!(engine.status(*id).unwrap().status, SagaStatus::Parked);
    }
    let confirm = dry.confirm.expect("a dry run answers its confirmation");
    assert_eq!(confirm.upto, Some(parked[2]));
    // A confirmation of another set of sagas is refused, and writes nothing.
    let other = sagaflow::BulkConfirm {
        matched: 2,
        ..confirm
    };
    let e = engine
        .bulk(
            &parked_filter,
            BulkAction::Resume,
            Some(other),
            "ops",
            "stock fixed",
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BulkRefused(_)), "{e}");
    // A reason too long to record is refused before anything is counted.
    let long = "x".repeat(sagaflow::MAX_MESSAGE_BYTES + 1);
    assert!(matches!(
        engine
            .bulk(&parked_filter, BulkAction::Resume, None, "ops", &long)
            .await,
        Err(Error::BulkRefused(_))
    ));
    // Applied: each saga gets its own operator action, and resumes.
    let done = engine
        .bulk(
            &parked_filter,
            BulkAction::Resume,
            Some(confirm),
            "ops",
            "stock fixed",
        )
        .await
        .unwrap();
    assert_eq!((done.matched, done.applied, done.refused_count), (3, 3, 0));
    for id in &parked {
        assert!(matches!(
            engine.wait(*id).await.unwrap(),
            SagaOutcome::Compensated { .. }
        ));
        let actions: Vec<_> = engine
            .history(*id)
            .unwrap()
            .into_iter()
            .filter_map(|r| match r.event {
                Event::OperatorAction {
                    action,
                    operator,
                    reason,
                } => Some((action, operator, reason)),
                _ => None,
            })
            .collect();
        assert_eq!(
            actions,
            vec![(Repair::Resume, "ops".to_string(), "stock fixed".to_string())]
        );
    }
    // The same confirmation again: the sagas it counted are no longer parked.
    let e = engine
        .bulk(
            &parked_filter,
            BulkAction::Resume,
            Some(confirm),
            "ops",
            "stock fixed",
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("changed since the dry run"), "{e}");
    // A repair that does not fit a saga is counted and listed, not fatal.
    let completed = ListFilter::default().status(SagaStatus::Completed);
    let dry = engine
        .bulk(&completed, BulkAction::Compensate, None, "ops", "undo it")
        .await
        .unwrap();
    assert_eq!((dry.matched, dry.applied), (1, 0));
    let refused = engine
        .bulk(
            &completed,
            BulkAction::Compensate,
            dry.confirm,
            "ops",
            "undo it",
        )
        .await
        .unwrap();
    assert_eq!(
        (refused.matched, refused.applied, refused.refused_count),
        (1, 0, 1)
    );
    assert_eq!(refused.refused[0].0, keyed);

    // Activity over the last hour: five started, one completed, four compensated.
    let a = engine.activity(Duration::from_secs(3600), 12).unwrap();
    assert_eq!(a.started.len(), 12);
    assert_eq!(a.started.iter().sum::<u64>(), 5);
    assert_eq!(a.completed.iter().sum::<u64>(), 1);
    assert_eq!(a.compensated.iter().sum::<u64>(), 4);
    assert!(a.p50_ms_all.is_some());
    assert!(!a.truncated);
    // The last bucket holds them (they all ran a moment ago).
    assert_eq!(a.started[11], 5);
    engine.shutdown().await.unwrap();
}
