//! Fold and decide over hand-written logs: no runtime, no store.

use serde_json::json;

use crate::clock::Timestamp;
use crate::definition::tests::Noop;
use crate::definition::{Idempotence, RetryPolicy, SagaDefinition, StepKind, StepOptions};
use crate::ids::{Attempt, Lsn, SagaId};
use crate::machine::{
    decide, Decision, Event, FailureKind, FoldError, Live, LogRecord, ParkKind, Progress,
    SagaState, SagaStatus,
};

fn id() -> SagaId {
    SagaId::from_bytes([1; 16])
}

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn a(n: u32) -> Attempt {
    Attempt(n)
}

/// a → b → c, all compensatable; b is not idempotent; two attempts each.
fn abc() -> SagaDefinition {
    let o = || StepOptions::default().with_retry(RetryPolicy::default().with_max_attempts(2));
    SagaDefinition::builder("abc", 1)
        .step_with("a", StepKind::Compensatable, Noop, o())
        .step_with(
            "b",
            StepKind::Compensatable,
            Noop,
            o().with_idempotence(Idempotence::NotIdempotent),
        )
        .step_with("c", StepKind::Compensatable, Noop, o())
        .build()
        .unwrap()
}

/// a → p (pivot, not idempotent) → r (retriable).
fn apr() -> SagaDefinition {
    SagaDefinition::builder("apr", 1)
        .step("a", Noop)
        .step_with(
            "p",
            StepKind::Pivot,
            Noop,
            StepOptions::default().with_idempotence(Idempotence::NotIdempotent),
        )
        .retriable("r", Noop)
        .build()
        .unwrap()
}

fn log(def: &SagaDefinition, events: Vec<Event>) -> Vec<LogRecord> {
    let mut all = vec![Event::Started {
        definition: def.name().into(),
        version: def.version(),
        steps: def.step_names().map(String::from).collect(),
        kinds: def.step_kinds().collect(),
        stages: if def.has_groups() {
            def.step_stages().collect()
        } else {
            Vec::new()
        },
        input: json!({}),
        start_key: None,
        deadline: None,
        not_before: None,
    }];
    all.extend(events);
    all.into_iter()
        .enumerate()
        .map(|(i, event)| LogRecord {
            lsn: Lsn(i as u64),
            at: t(i as u64 * 10),
            event,
        })
        .collect()
}

fn started(step: u32, n: u32) -> Event {
    Event::StepAttemptStarted {
        step,
        attempt: a(n),
        deadline: t(1_000_000),
    }
}

fn ok(step: u32, n: u32) -> Event {
    Event::StepSucceeded {
        step,
        attempt: a(n),
        output: json!(step),
    }
}

fn failed(step: u32, n: u32, kind: FailureKind, retry_at: Option<u64>) -> Event {
    Event::StepFailed {
        step,
        attempt: a(n),
        kind,
        error: "boom".into(),
        retry_at: retry_at.map(t),
    }
}

fn comp_started(step: u32, n: u32) -> Event {
    Event::CompensationAttemptStarted {
        step,
        attempt: a(n),
        deadline: t(1_000_000),
    }
}

fn comp_ok(step: u32, n: u32) -> Event {
    Event::CompensationSucceeded {
        step,
        attempt: a(n),
    }
}

fn state(def: &SagaDefinition, events: Vec<Event>) -> SagaState {
    SagaState::fold(id(), &log(def, events)).unwrap()
}

fn next(def: &SagaDefinition, events: Vec<Event>, now: u64) -> Decision {
    one(def, &state(def, events), t(now))
}

/// The decision for a saga of consecutive steps with nothing in flight: always exactly
/// one.
fn one(def: &SagaDefinition, s: &SagaState, now: Timestamp) -> Decision {
    let mut all = decide(def, s, &Live::new(), now);
    assert_eq!(all.len(), 1, "one decision expected, got {all:?}");
    all.remove(0)
}

#[test]
fn a_new_saga_runs_its_first_step() {
    let def = abc();
    assert_eq!(
        next(&def, vec![], 0),
        Decision::RunStep {
            step: 0,
            attempt: a(1)
        }
    );
}

#[test]
fn success_moves_on_and_the_last_success_completes() {
    let def = abc();
    assert_eq!(
        next(&def, vec![started(0, 1), ok(0, 1)], 0),
        Decision::RunStep {
            step: 1,
            attempt: a(1)
        }
    );
    let all = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        ok(1, 1),
        started(2, 1),
        ok(2, 1),
    ];
    assert_eq!(next(&def, all.clone(), 0), Decision::Complete);
    let mut done = all;
    done.push(Event::Completed);
    let s = state(&def, done);
    assert_eq!(s.status, SagaStatus::Completed);
    assert_eq!(s.outputs().len(), 3);
    assert_eq!(one(&def, &s, t(0)), Decision::Idle);
}

#[test]
fn a_retryable_failure_waits_for_its_timer_then_retries() {
    let def = abc();
    let events = vec![
        started(0, 1),
        failed(0, 1, FailureKind::Retryable, Some(500)),
    ];
    assert_eq!(
        next(&def, events.clone(), 499),
        Decision::Wait { until: t(500) }
    );
    assert_eq!(
        next(&def, events, 500),
        Decision::RunStep {
            step: 0,
            attempt: a(2)
        }
    );
}

#[test]
fn a_failure_without_retry_begins_compensation() {
    let def = abc();
    let d = next(
        &def,
        vec![
            started(0, 1),
            ok(0, 1),
            started(1, 1),
            failed(1, 1, FailureKind::Permanent, None),
        ],
        0,
    );
    assert_eq!(
        d,
        Decision::BeginCompensation {
            reason: "step `b` failed permanently at attempt 1: boom".into()
        }
    );
}

#[test]
fn compensation_runs_started_steps_in_reverse_then_finishes() {
    let def = abc();
    let mut events = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        failed(1, 1, FailureKind::Permanent, None),
        Event::CompensationBegan {
            reason: "b failed".into(),
        },
    ];
    // b was started (it may have done something), so it is compensated first; c never
    // started, so it is not.
    assert_eq!(
        next(&def, events.clone(), 0),
        Decision::Compensate {
            step: 1,
            attempt: a(1)
        }
    );
    events.extend([comp_started(1, 1), comp_ok(1, 1)]);
    assert_eq!(
        next(&def, events.clone(), 0),
        Decision::Compensate {
            step: 0,
            attempt: a(1)
        }
    );
    events.extend([comp_started(0, 1), comp_ok(0, 1)]);
    assert_eq!(next(&def, events.clone(), 0), Decision::FinishCompensation);
    events.push(Event::Compensated);
    assert_eq!(state(&def, events).status, SagaStatus::Compensated);
}

#[test]
fn an_interrupted_idempotent_step_is_rerun_whatever_its_budget() {
    let def = abc();
    assert_eq!(
        next(&def, vec![started(0, 1)], 0),
        Decision::RunStep {
            step: 0,
            attempt: a(2)
        }
    );
    // A crash is not a failed attempt (G4): the interrupted second attempt of a step
    // allowed two is run again, and still has its second try.
    let events = vec![
        started(0, 1),
        failed(0, 1, FailureKind::Retryable, Some(0)),
        started(0, 2),
    ];
    assert_eq!(
        next(&def, events.clone(), 0),
        Decision::RunStep {
            step: 0,
            attempt: a(3)
        }
    );
    let s = state(&def, [events, vec![started(0, 3)]].concat());
    assert_eq!(s.steps[0].interrupted.total, 1);
    assert_eq!(s.steps[0].attempts_used(), 2);
}

#[test]
fn a_step_interrupted_again_and_again_parks_as_a_crash_loop() {
    let def = abc();
    // Four interrupted attempts and a fifth in flight: the fifth interruption in a row.
    let events: Vec<Event> = (1..=5).map(|n| started(0, n)).collect();
    match next(&def, events.clone(), 1_000_000) {
        Decision::Park { reason } => {
            assert_eq!(reason.kind, ParkKind::CrashLoop);
            assert!(
                reason.message.contains("5 attempts in a row"),
                "{}",
                reason.message
            );
        }
        other => panic!("{other:?}"),
    }
    // One fewer is still run again.
    assert!(matches!(
        next(&def, events[..4].to_vec(), 0),
        Decision::RunStep { .. }
    ));
    // An attempt that ends resets the count.
    let mut reset: Vec<Event> = (1..=4).map(|n| started(0, n)).collect();
    reset.push(failed(0, 4, FailureKind::Retryable, Some(0)));
    reset.extend((5..=8).map(|n| started(0, n)));
    assert!(matches!(next(&def, reset, 0), Decision::RunStep { .. }));
}

#[test]
fn an_interrupted_compensation_loop_parks_too() {
    let def = abc();
    let mut events = vec![
        started(0, 1),
        failed(0, 1, FailureKind::Unknown, None),
        Event::CompensationBegan { reason: "x".into() },
    ];
    events.extend((1..=5).map(|n| comp_started(0, n)));
    match next(&def, events, 2_000_000) {
        Decision::Park { reason } => assert_eq!(reason.kind, ParkKind::CrashLoop),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_interrupted_non_idempotent_step_is_closed_then_settles_then_compensated() {
    let def = abc();
    let events = vec![started(0, 1), ok(0, 1), started(1, 1)];
    assert_eq!(
        next(&def, events.clone(), 0),
        Decision::CloseInterrupted {
            step: 1,
            attempt: a(1)
        }
    );
    let mut closed = events;
    closed.push(failed(1, 1, FailureKind::Interrupted, None));
    // Its request may still land until the attempt's deadline: nothing is undone before.
    assert_eq!(
        next(&def, closed.clone(), 999_999),
        Decision::Wait {
            until: t(1_000_000)
        }
    );
    let s = state(&def, closed.clone());
    assert_eq!(s.settling_until(), Some(t(1_000_000)));
    assert_eq!(s.next_timer(), Some(t(1_000_000)));
    let d = next(&def, closed, 1_000_000);
    let Decision::BeginCompensation { reason } = d else {
        panic!("{d:?}");
    };
    assert!(reason.contains("interrupted by a crash"), "{reason}");
}

#[test]
fn a_rejected_step_is_not_compensated_but_the_steps_before_it_are() {
    let def = abc();
    let mut events = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        failed(1, 1, FailureKind::Rejected, None),
    ];
    // No settle window: a rejection took no effect.
    let d = next(&def, events.clone(), 0);
    let Decision::BeginCompensation { reason } = d else {
        panic!("{d:?}");
    };
    assert!(reason.contains("rejected"), "{reason}");
    events.push(Event::CompensationBegan { reason });
    assert_eq!(
        next(&def, events.clone(), 0),
        Decision::Compensate {
            step: 0,
            attempt: a(1)
        }
    );
    events.extend([comp_started(0, 1), comp_ok(0, 1)]);
    assert_eq!(next(&def, events, 0), Decision::FinishCompensation);
}

#[test]
fn a_step_rejected_after_an_attempt_that_may_have_taken_effect_is_compensated() {
    let def = abc();
    let events = vec![
        started(0, 1),
        failed(0, 1, FailureKind::Timeout, Some(0)),
        started(0, 2),
        failed(0, 2, FailureKind::Rejected, None),
        Event::CompensationBegan { reason: "x".into() },
    ];
    // Not before the timed-out attempt's deadline: its request may still land.
    assert_eq!(
        next(&def, events.clone(), 0),
        Decision::Wait {
            until: t(1_000_000)
        }
    );
    assert_eq!(
        next(&def, events, 1_000_000),
        Decision::Compensate {
            step: 0,
            attempt: a(1)
        }
    );
}

#[test]
fn a_step_that_succeeded_after_an_unknown_attempt_is_undone_only_after_that_deadline() {
    let def = abc();
    let early = |n| Event::StepAttemptStarted {
        step: 0,
        attempt: a(n),
        deadline: t(500 * u64::from(n)),
    };
    let events = vec![
        early(1),
        failed(0, 1, FailureKind::Unknown, Some(0)),
        early(2),
        ok(0, 2),
        started(1, 1),
        failed(1, 1, FailureKind::Rejected, None),
        Event::CompensationBegan { reason: "x".into() },
    ];
    // Attempt 1 (deadline 500) may land late; attempt 2 succeeded. Its undo waits for
    // attempt 1's deadline, and the wait is the saga's durable timer.
    assert_eq!(
        next(&def, events.clone(), 100),
        Decision::Wait { until: t(500) }
    );
    let s = state(&def, events.clone());
    assert_eq!(s.settling_until(), Some(t(500)));
    assert_eq!(s.next_timer(), Some(t(500)));
    assert_eq!(
        next(&def, events, 500),
        Decision::Compensate {
            step: 0,
            attempt: a(1)
        }
    );
}

#[test]
fn an_unknown_failure_settles_then_compensates_the_step_itself() {
    let def = abc();
    let mut events = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        failed(1, 1, FailureKind::Unknown, None),
    ];
    assert_eq!(
        next(&def, events.clone(), 10),
        Decision::Wait {
            until: t(1_000_000)
        }
    );
    assert!(matches!(
        next(&def, events.clone(), 1_000_000),
        Decision::BeginCompensation { .. }
    ));
    events.push(Event::CompensationBegan { reason: "x".into() });
    assert_eq!(
        next(&def, events, 1_000_000),
        Decision::Compensate {
            step: 1,
            attempt: a(1)
        }
    );
}

#[test]
fn an_unknown_outcome_of_the_pivot_parks_after_settling_but_a_refusal_compensates() {
    let def = apr();
    let base = vec![started(0, 1), ok(0, 1), started(1, 1)];
    for kind in [
        FailureKind::Interrupted,
        FailureKind::Unknown,
        FailureKind::Timeout,
        // Out of attempts on a transient failure: it may have taken effect.
        FailureKind::Retryable,
    ] {
        let mut events = base.clone();
        events.push(failed(1, 1, kind, None));
        assert_eq!(
            next(&def, events.clone(), 0),
            Decision::Wait {
                until: t(1_000_000)
            },
            "{kind:?}"
        );
        match next(&def, events, 1_000_000) {
            Decision::Park { reason } => assert_eq!(reason.kind, ParkKind::OutcomeUnknown),
            other => panic!("{kind:?}: {other:?}"),
        }
    }
    for kind in [FailureKind::Rejected, FailureKind::Permanent] {
        let mut refused = base.clone();
        refused.push(failed(1, 1, kind, None));
        assert!(matches!(
            next(&def, refused.clone(), 0),
            Decision::BeginCompensation { .. }
        ));
        // Compensation skips the pivot itself.
        refused.push(Event::CompensationBegan { reason: "x".into() });
        assert_eq!(
            next(&def, refused, 0),
            Decision::Compensate {
                step: 0,
                attempt: a(1)
            }
        );
    }
}

#[test]
fn a_logged_permanent_failure_keeps_its_old_meaning() {
    // Logs written before `rejected` existed: the failing step counts as possibly
    // effective and is compensated, without a settle window.
    let def = abc();
    let events = vec![
        started(0, 1),
        failed(0, 1, FailureKind::Permanent, None),
        Event::CompensationBegan { reason: "x".into() },
    ];
    assert_eq!(
        next(&def, events, 0),
        Decision::Compensate {
            step: 0,
            attempt: a(1)
        }
    );
}

#[test]
fn retry_now_is_refused_while_settling() {
    let def = abc();
    let s = state(
        &def,
        vec![started(0, 1), failed(0, 1, FailureKind::Unknown, None)],
    );
    let refusal =
        crate::machine::check_repair(&s, &crate::machine::Repair::RetryNow { step: None })
            .unwrap_err();
    assert!(refusal.0.contains("settling until"), "{}", refusal.0);
}

#[test]
fn a_retriable_step_that_gives_up_parks_instead_of_compensating() {
    let def = apr();
    let events = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        ok(1, 1),
        started(2, 1),
        failed(2, 1, FailureKind::Rejected, None),
    ];
    match next(&def, events, 0) {
        Decision::Park { reason } => {
            assert_eq!(reason.kind, ParkKind::ForwardFailed);
            assert_eq!(
                reason.message,
                "step `r` was rejected at attempt 1 (no effect): boom; past the pivot the saga \
                 can only go forward"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failed_compensation_retries_then_parks() {
    let def = abc();
    let mut events = vec![
        started(0, 1),
        failed(0, 1, FailureKind::Permanent, None),
        Event::CompensationBegan { reason: "x".into() },
        comp_started(0, 1),
        Event::CompensationFailed {
            step: 0,
            attempt: a(1),
            kind: FailureKind::Retryable,
            error: "down".into(),
            retry_at: Some(t(900)),
        },
    ];
    assert_eq!(
        next(&def, events.clone(), 0),
        Decision::Wait { until: t(900) }
    );
    events.extend([
        comp_started(0, 2),
        Event::CompensationFailed {
            step: 0,
            attempt: a(2),
            kind: FailureKind::Permanent,
            error: "no such charge".into(),
            retry_at: None,
        },
    ]);
    match next(&def, events, 1_000) {
        Decision::Park { reason } => {
            assert_eq!(reason.kind, ParkKind::CompensationFailed);
            assert_eq!(
                reason.message,
                "compensation of step `a` failed at attempt 2: no such charge"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_interrupted_compensation_is_rerun() {
    let def = abc();
    let events = vec![
        started(0, 1),
        failed(0, 1, FailureKind::Permanent, None),
        Event::CompensationBegan { reason: "x".into() },
        comp_started(0, 1),
    ];
    assert_eq!(
        next(&def, events, 0),
        Decision::Compensate {
            step: 0,
            attempt: a(2)
        }
    );
}

#[test]
fn a_definition_with_other_steps_parks() {
    let def = abc();
    let other = SagaDefinition::builder("abc", 1)
        .step("a", Noop)
        .step("x", Noop)
        .build()
        .unwrap();
    let s = state(&def, vec![]);
    match one(&other, &s, t(0)) {
        Decision::Park { reason } => assert_eq!(reason.kind, ParkKind::DefinitionMismatch),
        d => panic!("{d:?}"),
    }
}

#[test]
fn decide_is_a_pure_function_of_its_inputs() {
    let def = abc();
    let events = vec![
        started(0, 1),
        failed(0, 1, FailureKind::Retryable, Some(50)),
    ];
    let s = state(&def, events);
    for now in [0, 49, 50, 51] {
        assert_eq!(one(&def, &s, t(now)), one(&def, &s.clone(), t(now)));
    }
    // Folding twice gives the same state.
    let l = log(&def, vec![started(0, 1), ok(0, 1)]);
    assert_eq!(SagaState::fold(id(), &l), SagaState::fold(id(), &l));
}

fn fold_err(def: &SagaDefinition, events: Vec<Event>) -> FoldError {
    SagaState::fold(id(), &log(def, events)).unwrap_err()
}

#[test]
fn fold_rejects_logs_that_do_not_fit_together() {
    let def = abc();
    // A result for an attempt that never started.
    assert_eq!(fold_err(&def, vec![ok(0, 1)]).lsn, Lsn(1));
    // An attempt number that skips.
    assert!(fold_err(&def, vec![started(0, 2)])
        .reason
        .contains("not the next"));
    // A step that does not exist.
    assert!(fold_err(&def, vec![started(9, 1)])
        .reason
        .contains("does not exist"));
    // Compensating a step that never started.
    let e = fold_err(
        &def,
        vec![
            Event::CompensationBegan { reason: "x".into() },
            comp_started(2, 1),
        ],
    );
    assert!(e.reason.contains("never started"), "{e}");
    // Completed with a step missing.
    assert!(fold_err(&def, vec![Event::Completed])
        .reason
        .contains("did not succeed"));
    // Anything after the end.
    let all = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        ok(1, 1),
        started(2, 1),
        ok(2, 1),
        Event::Completed,
        started(0, 2),
    ];
    assert!(fold_err(&def, all).reason.contains("already ended"));
    // Forward steps after compensation began.
    let e = fold_err(
        &def,
        vec![
            Event::CompensationBegan { reason: "x".into() },
            started(0, 1),
        ],
    );
    assert!(e.reason.contains("compensating, not running"), "{e}");
    // A gap in lsns.
    let mut l = log(&def, vec![started(0, 1)]);
    l[1].lsn = Lsn(5);
    assert!(SagaState::fold(id(), &l)
        .unwrap_err()
        .reason
        .contains("expected lsn 1"));
    // An empty log and a log that does not begin with `started`.
    assert!(SagaState::fold(id(), &[]).is_err());
    assert!(SagaState::fold(id(), &l[1..]).is_err());
}

#[test]
fn progress_reports_attempts() {
    let def = abc();
    let s = state(
        &def,
        vec![
            started(0, 1),
            failed(0, 1, FailureKind::Timeout, Some(5)),
            started(0, 2),
        ],
    );
    assert_eq!(s.steps[0].action, Progress::InFlight { attempt: a(2) });
    assert_eq!(s.steps[0].action.attempts(), 2);
    assert!(!s.steps[1].action.started());
}

#[test]
fn a_pivot_refused_after_an_attempt_of_unknown_outcome_settles_then_parks() {
    let def = apr();
    let events = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        failed(1, 1, FailureKind::Timeout, Some(0)),
        started(1, 2),
        failed(1, 2, FailureKind::Rejected, None),
    ];
    // Attempt 1 may still land: nothing is decided before its deadline.
    assert_eq!(
        next(&def, events.clone(), 0),
        Decision::Wait {
            until: t(1_000_000)
        }
    );
    // Then it parks: the pivot may have taken effect, so the steps before it must not be
    // undone.
    match next(&def, events, 1_000_000) {
        Decision::Park { reason } => assert_eq!(reason.kind, ParkKind::OutcomeUnknown),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_idempotent_pivot_refused_after_an_unknown_attempt_compensates_after_settling() {
    // The same key on both attempts: the refusal is the service's answer for the key.
    let def = SagaDefinition::builder("ap", 1)
        .step("a", Noop)
        .pivot("p", Noop)
        .build()
        .unwrap();
    let events = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        failed(1, 1, FailureKind::Timeout, Some(0)),
        started(1, 2),
        failed(1, 2, FailureKind::Rejected, None),
    ];
    assert_eq!(
        next(&def, events.clone(), 0),
        Decision::Wait {
            until: t(1_000_000)
        }
    );
    assert!(matches!(
        next(&def, events, 1_000_000),
        Decision::BeginCompensation { .. }
    ));
}

#[test]
fn resume_after_a_crash_loop_runs_the_step_again() {
    let def = abc();
    let mut events: Vec<Event> = (1..=5).map(|n| started(0, n)).collect();
    let Decision::Park { reason } = next(&def, events.clone(), 2_000_000) else {
        panic!("expected a crash-loop park");
    };
    events.push(Event::Parked { reason });
    events.push(Event::OperatorAction {
        action: crate::machine::Repair::Resume,
        operator: "ops".into(),
        reason: "fixed the bug".into(),
    });
    assert_eq!(
        next(&def, events, 2_000_000),
        Decision::RunStep {
            step: 0,
            attempt: a(6)
        }
    );
}

#[test]
fn a_crash_loop_parks_only_after_the_interrupted_attempt_s_deadline() {
    let def = abc();
    let events: Vec<Event> = (1..=5).map(|n| started(0, n)).collect();
    assert_eq!(
        next(&def, events.clone(), 10),
        Decision::Wait {
            until: t(1_000_000)
        }
    );
    assert!(matches!(
        next(&def, events, 1_000_000),
        Decision::Park { .. }
    ));
}

#[test]
fn forced_compensation_waits_for_an_attempt_still_in_flight() {
    let def = abc();
    let events = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        Event::Parked {
            reason: crate::machine::ParkReason::new(ParkKind::UnknownDefinition, "x"),
        },
        Event::OperatorAction {
            action: crate::machine::Repair::ForceCompensate,
            operator: "ops".into(),
            reason: "undo".into(),
        },
    ];
    // Step b's attempt 1 was in flight when the saga was parked: it may still land.
    assert_eq!(
        next(&def, events.clone(), 5),
        Decision::Wait {
            until: t(1_000_000)
        }
    );
    assert_eq!(
        next(&def, events, 1_000_000),
        Decision::Compensate {
            step: 1,
            attempt: a(1)
        }
    );
}

#[test]
fn resume_after_a_deadline_park_lifts_the_deadline() {
    let def = apr();
    let deadline = t(50);
    let mut records = log(&def, vec![started(0, 1), ok(0, 1), started(1, 1), ok(1, 1)]);
    if let Event::Started { deadline: d, .. } = &mut records[0].event {
        *d = Some(deadline);
    }
    let state = SagaState::fold(id(), &records).unwrap();
    let Decision::Park { reason } = one(&def, &state, t(100)) else {
        panic!("expected a deadline park");
    };
    assert_eq!(reason.kind, ParkKind::DeadlinePassed);
    let next_lsn = records.len() as u64;
    for (i, event) in [
        Event::Parked { reason },
        Event::OperatorAction {
            action: crate::machine::Repair::Resume,
            operator: "ops".into(),
            reason: "go on".into(),
        },
    ]
    .into_iter()
    .enumerate()
    {
        records.push(LogRecord {
            lsn: Lsn(next_lsn + i as u64),
            at: t(100),
            event,
        });
    }
    let state = SagaState::fold(id(), &records).unwrap();
    assert_eq!(
        one(&def, &state, t(100)),
        Decision::RunStep {
            step: 2,
            attempt: a(1)
        }
    );
}
