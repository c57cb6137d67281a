//! Every checker rejects a hand-broken history, so none can pass vacuously.

use std::collections::BTreeMap;

use sagaflow::machine::Event;
use sagaflow::{Idempotence, Phase, SagaId, SagaStatus, StepKind};
use sagaflow_tests::check::{self, ObservedSaga};
use sagaflow_tests::crash::{Crash, CrashPoint};
use sagaflow_tests::sim::{run_and_check, run_case, Case, SagaSpec, SimStore, StepSpec};
use sagaflow_tests::Outcome;

/// Three compensatable steps, one saga; `fail` fails that step with `how`.
fn case_with(fail: Option<usize>, how: Outcome) -> Case {
    let mut action = vec![Vec::new(); 3];
    if let Some(i) = fail {
        // Unknown outcomes are retried (the steps are idempotent): one per attempt.
        action[i] = vec![how; 4];
    }
    Case {
        seed: 1,
        steps: vec![
            StepSpec {
                kind: StepKind::Compensatable,
                idempotence: Idempotence::Idempotent,
            };
            3
        ],
        sagas: vec![SagaSpec {
            action,
            compensation: vec![Vec::new(); 3],
            cancel_after: None,
            deadline_after: None,
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
    assert!(err.contains("after a step that started before it"), "{err}");
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
