//! Every checker rejects a hand-broken history, so none can pass vacuously.

use std::collections::BTreeMap;

use sagaflow::machine::Event;
use sagaflow::{Idempotence, Phase, SagaId, SagaStatus, StepKind};
use sagaflow_tests::check::{self, ObservedSaga};
use sagaflow_tests::crash::{Crash, CrashPoint};
use sagaflow_tests::sim::{
    run_and_check, run_case, AwaitSpec, Case, EventPlan, SagaSpec, SimStore, StepSpec,
};
use sagaflow_tests::Outcome;

/// Three compensatable steps, one saga; `fail` fails that step with `how`.
fn case_with(fail: Option<usize>, how: Outcome) -> Case {
    staged(&[0, 1, 2], fail, how)
}

/// Compensatable steps of these stages, one saga; `fail` fails that step with `how`.
fn staged(stages: &[u32], fail: Option<usize>, how: Outcome) -> Case {
    let n = stages.len();
    let mut action = vec![Vec::new(); n];
    if let Some(i) = fail {
        // Unknown outcomes are retried (the steps are idempotent): one per attempt.
        action[i] = vec![how; 4];
    }
    Case {
        seed: 1,
        steps: stages
            .iter()
            .map(|&stage| StepSpec {
                kind: StepKind::Compensatable,
                idempotence: Idempotence::Idempotent,
                stage,
                awaits: None,
            })
            .collect(),
        sagas: vec![SagaSpec {
            action,
            compensation: vec![Vec::new(); n],
            cancel_after: None,
            deadline_after: None,
            event: EventPlan::Never,
        }],
        crashes: Vec::new(),
    }
}

/// `fail` fails with an unknown outcome: that step is compensated too.
fn case(fail: Option<usize>) -> Case {
    case_with(fail, Outcome::Unknown)
}

fn observe(fail: Option<usize>) -> ObservedSaga {
    observe_case(&case(fail))
}

fn observe_case(case: &Case) -> ObservedSaga {
    let report = run_case(case, &SimStore::Memory).expect("run");
    report.check().expect("a clean run passes every check");
    report.sagas.into_iter().next().expect("one saga")
}

fn completed() -> ObservedSaga {
    let s = observe(None);
    assert_eq!(s.status, Some(SagaStatus::Completed));
    s
}

fn compensated() -> ObservedSaga {
    let s = observe(Some(2));
    assert_eq!(s.status, Some(SagaStatus::Compensated));
    s
}

fn comp_positions(s: &ObservedSaga) -> Vec<usize> {
    s.calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.phase == Phase::Compensation)
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn clean_runs_pass() {
    check::check_saga(&completed()).unwrap();
    check::check_saga(&compensated()).unwrap();
}

#[test]
fn an_effect_applied_under_a_second_key_is_rejected() {
    let mut s = completed();
    let mut twin = s.calls[0].clone();
    twin.key = format!("{}/s0/action-again", s.id);
    s.calls.push(twin);
    let err = check::check_keys_and_write_ahead(&s).unwrap_err();
    assert!(err.contains("was called with key"), "{err}");
}

#[test]
fn an_effect_without_a_durable_start_is_rejected() {
    // A lost transition: the record that said "s1 attempt 1 started" is gone.
    let mut s = completed();
    s.history
        .retain(|r| !matches!(r.event, Event::StepAttemptStarted { step: 1, .. }));
    let err = check::check_keys_and_write_ahead(&s).unwrap_err();
    assert!(err.contains("its start is not in the log"), "{err}");
    let err = check::check_final(&s).unwrap_err();
    assert!(err.contains("does not fold"), "{err}");
}

#[test]
fn compensations_out_of_order_are_rejected() {
    let mut s = compensated();
    let pos = comp_positions(&s);
    s.calls.swap(pos[1], pos[2]);
    let err = check::check_compensation_order(&s).unwrap_err();
    assert!(
        err.contains("`s0` (stage 0) was compensated before the undo of step `s1`"),
        "{err}"
    );
}

#[test]
fn a_later_stage_compensated_again_after_an_earlier_one_began_is_rejected() {
    let mut s = compensated();
    let again = s.calls[comp_positions(&s)[0]].clone();
    assert_eq!(again.step, "s2");
    s.calls.push(again);
    let err = check::check_compensation_order(&s).unwrap_err();
    assert!(
        err.contains("`s2` (stage 2) was compensated after step `s0` of an earlier stage (0)"),
        "{err}"
    );
}

/// s0, then s1 and s2 in parallel, then s3, which fails with an unknown outcome: s3 is
/// compensated, then s1 and s2 concurrently, then s0.
fn grouped() -> ObservedSaga {
    let s = observe_case(&staged(&[0, 1, 1, 2], Some(3), Outcome::Unknown));
    assert_eq!(s.status, Some(SagaStatus::Compensated));
    assert_eq!(s.stages, [0, 1, 1, 2]);
    s
}

/// Where in the log the first record matching `f` is.
fn record(s: &ObservedSaga, f: impl Fn(&Event) -> bool) -> usize {
    s.history
        .iter()
        .position(|r| f(&r.event))
        .expect("the record is in the log")
}

fn comp_started(s: &ObservedSaga, step: u32) -> usize {
    record(
        s,
        |e| matches!(e, Event::CompensationAttemptStarted { step: st, .. } if *st == step),
    )
}

fn comp_succeeded(s: &ObservedSaga, step: u32) -> usize {
    record(
        s,
        |e| matches!(e, Event::CompensationSucceeded { step: st, .. } if *st == step),
    )
}

#[test]
fn concurrent_compensation_within_a_stage_is_accepted() {
    let mut s = grouped();
    // The engine ran the group's two compensations at once: both started before either
    // succeeded. The checks accept it, as they accept its mirror image.
    let (a, b) = (comp_started(&s, 1), comp_started(&s, 2));
    assert!(a.max(b) < comp_succeeded(&s, 1).min(comp_succeeded(&s, 2)));
    check::check_saga(&s).unwrap();
    let ev = s.history[a].event.clone();
    s.history[a].event = s.history[b].event.clone();
    s.history[b].event = ev;
    let (c1, c2) = (
        s.calls
            .iter()
            .position(|c| c.step == "s1" && c.phase == Phase::Compensation)
            .unwrap(),
        s.calls
            .iter()
            .position(|c| c.step == "s2" && c.phase == Phase::Compensation)
            .unwrap(),
    );
    s.calls.swap(c1, c2);
    check::check_compensation_stages(&s).unwrap();
    check::check_compensation_order(&s).unwrap();
    check::check_saga(&s).unwrap();
}

#[test]
fn an_earlier_stage_compensation_started_while_a_later_one_runs_is_rejected() {
    let mut s = grouped();
    // s0's compensation starts right after s2's, while s2's is still running (and s1's
    // perhaps too).
    let moved = s.history.remove(comp_started(&s, 0));
    let at = comp_started(&s, 2) + 1;
    s.history.insert(at, moved);
    for (lsn, r) in s.history.iter_mut().enumerate() {
        r.lsn = sagaflow::Lsn(lsn as u64);
    }
    check::check_final(&s).expect("the log still folds: only the stage order is wrong");
    let err = check::check_compensation_stages(&s).unwrap_err();
    assert!(
        err.contains("step `s0` (stage 0) started")
            && err.contains("a later stage (1) was owed a compensation that had not succeeded"),
        "{err}"
    );
}

#[test]
fn an_earlier_stage_compensated_before_a_later_branch_is_rejected() {
    let mut s = grouped();
    // As the services would see it: s0 undone between the group's two undos.
    let pos = comp_positions(&s);
    let names: Vec<&str> = pos.iter().map(|&p| s.calls[p].step.as_str()).collect();
    assert_eq!(names[0], "s3");
    assert_eq!(names[3], "s0");
    let s0 = s.calls.remove(pos[3]);
    s.calls.insert(pos[2], s0);
    let err = check::check_compensation_order(&s).unwrap_err();
    assert!(
        err.contains("`s0` (stage 0) was compensated before the undo of step")
            && err.contains("of a later stage (1)"),
        "{err}"
    );
}

#[test]
fn stages_other_than_the_definitions_are_rejected() {
    let s = grouped().with_stages(vec![0, 1, 2, 3]);
    let err = check::check_final(&s).unwrap_err();
    assert!(err.contains("the log records stages [0, 1, 1, 2]"), "{err}");
}

#[test]
fn running_forward_after_compensation_began_is_rejected() {
    let mut s = compensated();
    let forward = s.calls[0].clone();
    s.calls.push(forward);
    let err = check::check_compensation_order(&s).unwrap_err();
    assert!(
        err.contains("ran forward after compensation began"),
        "{err}"
    );
}

#[test]
fn compensating_a_step_that_never_started_is_rejected() {
    let mut s = observe(Some(1));
    let first_comp = comp_positions(&s)[0];
    let mut ghost = s.calls[first_comp].clone();
    ghost.step = "s2".into();
    ghost.key = format!("{}/s2/compensation", s.id);
    s.calls.insert(first_comp, ghost);
    let err = check::check_compensation_order(&s).unwrap_err();
    assert!(err.contains("never started"), "{err}");
}

#[test]
fn compensating_a_rejected_step_is_rejected() {
    let mut s = observe_case(&case_with(Some(2), Outcome::Rejected));
    assert_eq!(s.status, Some(SagaStatus::Compensated));
    assert_eq!(
        comp_positions(&s).len(),
        2,
        "the rejected step is not undone"
    );
    let first_comp = comp_positions(&s)[0];
    let mut undo = s.calls[first_comp].clone();
    undo.step = "s2".into();
    undo.key = format!("{}/s2/compensation", s.id);
    s.calls.insert(first_comp, undo);
    let err = check::check_compensation_order(&s).unwrap_err();
    assert!(err.contains("every attempt of it was rejected"), "{err}");
}

#[test]
fn an_effect_landing_after_its_undo_is_rejected() {
    let mut s = compensated();
    // The first step's charge arrives after its refund: a late request.
    let effect = s
        .calls
        .iter()
        .position(|c| c.step == "s0" && c.phase == Phase::Action && c.applied)
        .unwrap();
    let late = s.calls.remove(effect);
    s.calls.push(late);
    let err = check::check_effects(&s).unwrap_err();
    assert!(err.contains("landed after its undo"), "{err}");
}

#[test]
fn compensating_the_pivot_is_rejected() {
    let mut s = compensated();
    s.shape[2].kind = StepKind::Pivot;
    let err = check::check_compensation_order(&s).unwrap_err();
    assert!(err.contains("(Pivot) was compensated"), "{err}");
}

#[test]
fn a_saga_that_did_not_end_is_rejected() {
    let mut s = completed();
    s.status = Some(SagaStatus::Running);
    assert!(check::check_final(&s).unwrap_err().contains("did not end"));
    s.status = Some(SagaStatus::Parked);
    s.reason = None;
    assert!(check::check_final(&s)
        .unwrap_err()
        .contains("without a reason"));
}

#[test]
fn a_completed_saga_missing_an_effect_is_rejected() {
    let mut s = completed();
    s.calls[1].applied = false;
    let err = check::check_effects(&s).unwrap_err();
    assert!(err.contains("never took effect"), "{err}");
}

#[test]
fn a_compensated_saga_with_an_effect_left_is_rejected() {
    let mut s = compensated();
    let last = *comp_positions(&s).last().unwrap();
    s.calls.remove(last);
    let err = check::check_effects(&s).unwrap_err();
    assert!(err.contains("was not undone"), "{err}");
}

#[test]
fn a_non_idempotent_step_applied_twice_is_rejected() {
    let mut s = completed();
    s.shape[0].idempotence = Idempotence::NotIdempotent;
    check::check_not_idempotent_once(&s).unwrap();
    let again = s.calls[0].clone();
    s.calls.insert(1, again);
    let err = check::check_not_idempotent_once(&s).unwrap_err();
    assert!(err.contains("took effect 2 times"), "{err}");
}

#[test]
fn two_sagas_under_one_start_key_are_rejected() {
    let a = SagaId::from_bytes([1; 16]);
    let b = SagaId::from_bytes([2; 16]);
    let mut keys = BTreeMap::from([("k".to_string(), vec![a])]);
    check::check_start_keys(&keys).unwrap();
    keys.insert("k".into(), vec![a, b]);
    assert!(check::check_start_keys(&keys)
        .unwrap_err()
        .contains("names 2 sagas"));
}

#[test]
fn the_determinism_check_sees_a_changed_log() {
    let a = run_case(&case(None), &SimStore::Memory).unwrap();
    let b = run_case(&case(None), &SimStore::Memory).unwrap();
    assert_eq!(a.dump, b.dump, "same case, same bytes");
    let mut other = case(None);
    other.seed = 2;
    let c = run_case(&other, &SimStore::Memory).unwrap();
    assert_ne!(
        a.dump, c.dump,
        "another seed, other ids: the comparison must notice"
    );
}

#[test]
fn a_crash_between_effect_and_record_reruns_with_the_same_key() {
    // A targeted case: the first service call applies its effect and the process dies
    // before the result is recorded; recovery must re-run s0 with the same key.
    let mut c = case(None);
    c.crashes = vec![Crash {
        point: CrashPoint::AfterEffectBeforeRecord,
        nth: 0,
    }];
    let report = run_and_check(&c).unwrap();
    assert_eq!(report.crashes, 1);
    let s = &report.sagas[0];
    let s0: Vec<_> = s.calls.iter().filter(|c| c.step == "s0").collect();
    assert_eq!(s0.len(), 2);
    assert_eq!(s0[0].key, s0[1].key);
    assert_eq!(s.status, Some(SagaStatus::Completed));
}

/// The real-process test's reconciliation sees undos out of stage order: s0, then s1
/// and s2 in parallel, then s3, which is refused; the ledger file is written as the
/// child's services would write it, then s0's undo is moved before s1's.
#[tokio::test]
async fn the_kill_ledger_rejects_undos_out_of_stage_order() {
    use sagaflow::{SagaDefinition, StartKey};
    use sagaflow_tests::kill_ledger::reconcile;
    use sagaflow_tests::{builder, fake, opts, Ledger};

    let ledger = Ledger::new();
    ledger.script("s3", Phase::Action, [Outcome::Rejected]);
    let kind = StepKind::Compensatable;
    let def = SagaDefinition::builder("kill-group", 1)
        .step_with("s0", kind, fake("s0", &ledger), opts())
        .parallel(|g| {
            g.step_with("s1", kind, fake("s1", &ledger), opts())
                .step_with("s2", kind, fake("s2", &ledger), opts())
        })
        .step_with("s3", kind, fake("s3", &ledger), opts())
        .build()
        .expect("valid definition");
    let store = std::sync::Arc::new(sagaflow::store::MemLog::new());
    let engine = builder()
        .register(def)
        .open_with(store.clone())
        .await
        .expect("engine opens");
    let id = engine
        .start(
            "kill-group",
            serde_json::json!({}),
            Some(StartKey::new("order-0").expect("key")),
        )
        .await
        .expect("started");
    engine.wait(id).await.expect("ended");
    engine.shutdown().await.expect("shut down");
    let lines: Vec<String> = ledger
        .calls()
        .iter()
        .filter(|c| c.applied)
        .map(|c| {
            let tag = if c.phase == Phase::Action { 'A' } else { 'C' };
            format!("{tag} {}", c.key)
        })
        .collect();
    let r = reconcile(&*store, &lines.join("\n"), 1).expect("reconciles");
    assert_eq!(
        (r.compensated, r.lost, r.doubled, r.misordered),
        (1, 0, 0, 0),
        "{r:?}"
    );
    assert_eq!((r.with_groups, r.group_undos), (1, 1), "{r:?}");

    let mut bad = lines.clone();
    let s0 = bad
        .iter()
        .position(|l| l.ends_with("/s0/compensation"))
        .expect("s0 undone");
    let s1 = bad
        .iter()
        .position(|l| l.ends_with("/s1/compensation"))
        .expect("s1 undone");
    assert!(s1 < s0, "the group is undone before s0");
    let line = bad.remove(s0);
    bad.insert(s1, line);
    let r = reconcile(&*store, &bad.join("\n"), 1).expect("reconciles");
    assert_eq!((r.lost, r.doubled), (0, 0), "{r:?}");
    assert!(r.misordered >= 1, "{r:?}");
    assert!(
        r.problems[0].contains("s0 (stage 0) was undone before the undo of s1"),
        "{r:?}"
    );
}

/// s0, then an await step s1 (5 s, `on_timeout`), then s2; one saga whose event comes
/// as `plan`. The clean run passes every check.
fn awaited(plan: EventPlan, on_timeout: sagaflow::OnTimeout) -> ObservedSaga {
    let mut c = case(None);
    c.steps[1].awaits = Some(AwaitSpec {
        within_ms: 5_000,
        on_timeout,
    });
    c.sagas[0].event = plan;
    observe_case(&c)
}

fn during() -> ObservedSaga {
    let s = awaited(
        EventPlan::During { permille: 500 },
        sagaflow::OnTimeout::Rejected,
    );
    assert_eq!(s.status, Some(SagaStatus::Completed));
    let received = s
        .history
        .iter()
        .filter(|r| matches!(r.event, Event::EventReceived { .. }))
        .count();
    assert_eq!(received, 1);
    s
}

fn never() -> ObservedSaga {
    let s = awaited(EventPlan::Never, sagaflow::OnTimeout::Unknown);
    assert_eq!(s.status, Some(SagaStatus::Compensated));
    s
}

fn events(s: &mut ObservedSaga) -> &mut check::AwaitObservation {
    s.events.as_mut().expect("an await step")
}

fn await_deadline(s: &ObservedSaga) -> sagaflow::Timestamp {
    s.history
        .iter()
        .find_map(|r| match r.event {
            Event::StepAttemptStarted {
                step: 1, deadline, ..
            } => Some(deadline),
            _ => None,
        })
        .expect("the wait began")
}

#[test]
fn clean_await_runs_pass() {
    for plan in [
        EventPlan::Before,
        EventPlan::TwiceSameId {
            permille: 100,
            gap_ms: 10,
        },
        EventPlan::TwiceNewId {
            permille: 100,
            gap_ms: 10,
        },
        EventPlan::After { late_ms: 10 },
    ] {
        let s = awaited(plan, sagaflow::OnTimeout::Rejected);
        check::check_events(&s).unwrap();
    }
}

#[test]
fn an_await_step_completed_without_an_acknowledged_delivery_is_rejected() {
    let mut s = during();
    events(&mut s).acknowledged.clear();
    let e = check::check_events(&s).unwrap_err();
    assert!(e.contains("which no sender was told was accepted"), "{e}");
}

#[test]
fn an_acknowledged_delivery_lost_is_rejected() {
    let mut s = during();
    events(&mut s).inbox.clear();
    let e = check::check_events(&s).unwrap_err();
    assert!(e.contains("is not in the inbox"), "{e}");
}

#[test]
fn an_event_taken_twice_is_rejected() {
    // Recorded twice in the log.
    let mut s = during();
    let i = s
        .history
        .iter()
        .position(|r| matches!(r.event, Event::EventReceived { .. }))
        .unwrap();
    let again = s.history[i].clone();
    s.history.insert(i, again);
    let e = check::check_events(&s).unwrap_err();
    assert!(e.contains("took 2 deliveries"), "{e}");

    // Two deliveries with different ids, both marked taken by the saga.
    let mut s = awaited(
        EventPlan::TwiceNewId {
            permille: 100,
            gap_ms: 10,
        },
        sagaflow::OnTimeout::Rejected,
    );
    let id = s.id;
    assert_eq!(events(&mut s).inbox.len(), 2);
    for d in &mut events(&mut s).inbox {
        d.taken_by = Some(id);
    }
    let e = check::check_events(&s).unwrap_err();
    assert!(
        e.contains("2 deliveries for `event/0` are marked taken"),
        "{e}"
    );
}

#[test]
fn an_event_taken_by_another_saga_is_rejected() {
    let mut s = during();
    for d in &mut events(&mut s).inbox {
        d.taken_by = Some(SagaId::from_bytes([7; 16]));
    }
    let e = check::check_events(&s).unwrap_err();
    assert!(e.contains("was taken by saga"), "{e}");
}

#[test]
fn a_wait_failing_before_its_deadline_is_rejected() {
    let mut s = never();
    check::check_events(&s).unwrap();
    let deadline = await_deadline(&s);
    let r = s
        .history
        .iter_mut()
        .find(|r| matches!(r.event, Event::StepFailed { step: 1, .. }))
        .unwrap();
    assert!(r.at >= deadline);
    r.at = sagaflow::Timestamp::from_millis(deadline.as_millis() - 1_000);
    let e = check::check_events(&s).unwrap_err();
    assert!(e.contains("before its deadline"), "{e}");
}

#[test]
fn a_wait_that_never_failed_without_its_event_is_rejected() {
    let mut s = never();
    s.history
        .retain(|r| !matches!(r.event, Event::StepFailed { step: 1, .. }));
    let e = check::check_events(&s).unwrap_err();
    assert!(e.contains("the wait never failed"), "{e}");
}

#[test]
fn a_delivery_in_time_never_taken_is_rejected() {
    // The event came one second into the wait, and the wait timed out anyway.
    let mut s = never();
    let mut d = during().events.unwrap().inbox.remove(0);
    let began = s
        .history
        .iter()
        .find(|r| matches!(r.event, Event::Awaiting { .. }))
        .unwrap()
        .at;
    d.received_at = began.saturating_add(std::time::Duration::from_secs(1));
    d.taken_by = None;
    events(&mut s).acknowledged.push(check::Acked {
        key: d.key.clone(),
        id: d.id.clone(),
        at: d.received_at,
    });
    events(&mut s).inbox.push(d);
    let e = check::check_events(&s).unwrap_err();
    assert!(e.contains("but was never taken"), "{e}");
}

#[test]
fn a_delivery_taken_after_its_deadline_is_rejected() {
    let mut s = during();
    let deadline = await_deadline(&s);
    events(&mut s).inbox[0].received_at =
        deadline.saturating_add(std::time::Duration::from_secs(1));
    let e = check::check_events(&s).unwrap_err();
    assert!(e.contains("after its deadline"), "{e}");
}

#[test]
fn a_wait_timing_out_as_the_definition_does_not_say_is_rejected() {
    let mut s = never();
    if let Some(o) = s.events.as_mut() {
        o.on_timeout = sagaflow::OnTimeout::Rejected;
    }
    let e = check::check_events(&s).unwrap_err();
    assert!(e.contains("but its definition says"), "{e}");
}
