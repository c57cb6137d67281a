//! Fold and decide over hand-written logs: no runtime, no store.

use serde_json::json;

use crate::clock::Timestamp;
use crate::definition::tests::Noop;
use crate::definition::{Idempotence, RetryPolicy, SagaDefinition, StepKind, StepOptions};
use crate::ids::{Attempt, Lsn, SagaId};
use crate::machine::{
    decide, Decision, Event, FailureKind, FoldError, Live, LogRecord, ParkKind, Progress, Repair,
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

// Parallel groups.

/// a → [b, c, d] → p (pivot) → [r, s] (retriable group). b is not idempotent.
fn grouped() -> SagaDefinition {
    let o = || StepOptions::default().with_retry(RetryPolicy::default().with_max_attempts(2));
    SagaDefinition::builder("grouped", 1)
        .step_with("a", StepKind::Compensatable, Noop, o())
        .parallel(|g| {
            g.step_with(
                "b",
                StepKind::Compensatable,
                Noop,
                o().with_idempotence(Idempotence::NotIdempotent),
            )
            .step_with("c", StepKind::Compensatable, Noop, o())
            .step_with("d", StepKind::Compensatable, Noop, o())
        })
        .pivot("p", Noop)
        .parallel(|g| g.retriable("r", Noop).retriable("s", Noop))
        .build()
        .unwrap()
}

/// a succeeded and the group's three branches started, then `more`.
fn fanned_out(more: Vec<Event>) -> Vec<Event> {
    let mut events = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        started(2, 1),
        started(3, 1),
    ];
    events.extend(more);
    events
}

fn all(def: &SagaDefinition, events: Vec<Event>, live: &[u32], now: u64) -> Vec<Decision> {
    decide(
        def,
        &state(def, events),
        &live.iter().copied().collect(),
        t(now),
    )
}

fn run(step: u32, n: u32) -> Decision {
    Decision::RunStep {
        step,
        attempt: a(n),
    }
}

fn comp(step: u32, n: u32) -> Decision {
    Decision::Compensate {
        step,
        attempt: a(n),
    }
}

fn started_until(step: u32, n: u32, deadline: u64) -> Event {
    Event::StepAttemptStarted {
        step,
        attempt: a(n),
        deadline: t(deadline),
    }
}

#[test]
fn a_group_fans_out_and_the_next_stage_waits_for_every_branch() {
    let def = grouped();
    assert_eq!(def.step_stages().collect::<Vec<_>>(), [0, 1, 1, 1, 2, 3, 3]);
    assert_eq!(all(&def, vec![], &[], 0), [run(0, 1)]);
    let fanned = vec![started(0, 1), ok(0, 1)];
    assert_eq!(
        all(&def, fanned.clone(), &[], 0),
        [run(1, 1), run(2, 1), run(3, 1)]
    );
    // While the branches run, nothing new starts.
    let mut running = fanned.clone();
    running.extend([started(1, 1), started(2, 1), started(3, 1)]);
    assert_eq!(all(&def, running.clone(), &[1, 2, 3], 0), []);
    // Two done, one in flight: still nothing; the pivot waits for the whole group.
    running.extend([ok(1, 1), ok(3, 1)]);
    assert_eq!(all(&def, running.clone(), &[2], 0), []);
    running.push(ok(2, 1));
    assert_eq!(all(&def, running.clone(), &[], 0), [run(4, 1)]);
    // Later steps see every branch's output.
    let s = state(&def, running);
    assert_eq!(s.outputs().len(), 4);
}

#[test]
fn a_branch_waiting_for_a_retry_does_not_hold_back_its_siblings() {
    let def = grouped();
    let events = fanned_out(vec![
        failed(2, 1, FailureKind::Retryable, Some(500)),
        ok(3, 1),
    ]);
    // b still runs; c waits for its timer.
    assert_eq!(
        all(&def, events.clone(), &[1], 100),
        [Decision::Wait { until: t(500) }]
    );
    assert_eq!(all(&def, events.clone(), &[1], 500), [run(2, 2)]);
    let s = state(&def, events);
    assert_eq!(s.next_timer(), Some(t(500)));
}

#[test]
fn a_branch_that_fails_for_good_stops_new_attempts_and_its_siblings_settle_first() {
    let def = grouped();
    let mut events = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        started_until(2, 1, 300),
        // d never started yet (it would start with its siblings; here the log shows it
        // not started, as after a crash between two starts).
        failed(1, 1, FailureKind::Rejected, None),
    ];
    // c is in flight here: nothing starts, not even d, and compensation waits.
    assert_eq!(all(&def, events.clone(), &[2], 100), []);
    // c succeeds after its sibling failed: it is compensated with the rest.
    events.push(ok(2, 1));
    let d = all(&def, events.clone(), &[], 100);
    let [Decision::BeginCompensation { reason }] = &d[..] else {
        panic!("{d:?}");
    };
    assert!(reason.contains("`b` was rejected"), "{reason}");
    events.push(Event::CompensationBegan {
        reason: reason.clone(),
    });
    // b was rejected (no effect) and d never started: only c, then a, are undone.
    assert_eq!(all(&def, events.clone(), &[], 100), [comp(2, 1)]);
    events.extend([comp_started(2, 1), comp_ok(2, 1)]);
    assert_eq!(all(&def, events.clone(), &[], 100), [comp(0, 1)]);
    events.extend([comp_started(0, 1), comp_ok(0, 1)]);
    assert_eq!(all(&def, events, &[], 100), [Decision::FinishCompensation]);
}

#[test]
fn a_sibling_of_unknown_outcome_is_settled_before_compensation_begins() {
    let def = grouped();
    let events = vec![
        started(0, 1),
        ok(0, 1),
        started_until(1, 1, 200),
        started_until(2, 1, 300),
        started_until(3, 1, 400),
        failed(1, 1, FailureKind::Rejected, None),
        failed(2, 1, FailureKind::Timeout, Some(350)),
        ok(3, 1),
    ];
    // c timed out and would have been retried; its sibling failed, so the retry is
    // abandoned and the saga waits for c's deadline before undoing anything.
    let s = state(&def, events.clone());
    assert_eq!(s.settling_until(), Some(t(300)));
    assert_eq!(
        all(&def, events.clone(), &[], 250),
        [Decision::Wait { until: t(300) }]
    );
    assert!(matches!(
        &all(&def, events, &[], 300)[..],
        [Decision::BeginCompensation { .. }]
    ));
}

#[test]
fn the_branches_of_a_group_are_compensated_concurrently_then_the_stage_before() {
    let def = grouped();
    let mut events = fanned_out(vec![
        ok(1, 1),
        ok(2, 1),
        failed(3, 1, FailureKind::Unknown, None),
        Event::CompensationBegan {
            reason: "d failed".into(),
        },
    ]);
    assert_eq!(
        all(&def, events.clone(), &[], 2_000_000),
        [comp(1, 1), comp(2, 1), comp(3, 1)]
    );
    events.extend([comp_started(1, 1), comp_started(2, 1), comp_started(3, 1)]);
    // The earlier stage waits for every branch's compensation.
    events.extend([comp_ok(1, 1), comp_ok(3, 1)]);
    assert_eq!(all(&def, events.clone(), &[2], 2_000_000), []);
    events.push(comp_ok(2, 1));
    assert_eq!(all(&def, events, &[], 2_000_000), [comp(0, 1)]);
}

#[test]
fn a_crash_during_fan_out_closes_each_interrupted_branch_by_its_own_rule() {
    let def = grouped();
    let events = fanned_out(vec![ok(3, 1)]);
    // b is not idempotent: closed as interrupted, so the group has failed, and c is
    // closed too rather than run again into a saga about to be compensated.
    assert_eq!(
        all(&def, events.clone(), &[], 0),
        [
            Decision::CloseInterrupted {
                step: 1,
                attempt: a(1)
            },
            Decision::CloseInterrupted {
                step: 2,
                attempt: a(1)
            },
        ]
    );
    // Idempotent branches interrupted while b had succeeded: each runs again with its
    // key.
    let events = fanned_out(vec![ok(1, 1)]);
    assert_eq!(all(&def, events, &[], 0), [run(2, 2), run(3, 2)]);
}

#[test]
fn a_crash_during_concurrent_compensation_resumes_every_branch() {
    let def = grouped();
    let events = fanned_out(vec![
        ok(1, 1),
        ok(2, 1),
        failed(3, 1, FailureKind::Rejected, None),
        Event::CompensationBegan {
            reason: "d rejected".into(),
        },
        comp_started(1, 1),
        comp_started(2, 1),
        comp_ok(1, 1),
    ]);
    // c's compensation was interrupted: run again. b's is done; d had no effect.
    assert_eq!(all(&def, events, &[], 0), [comp(2, 2)]);
}

#[test]
fn forced_compensation_of_a_group_in_flight_waits_for_its_branches() {
    let def = grouped();
    let mut events = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        started_until(2, 1, 500),
        Event::OperatorAction {
            action: Repair::ForceCompensate,
            operator: "ana".into(),
            reason: "customer called".into(),
        },
    ];
    let s = state(&def, events.clone());
    assert_eq!(s.status, SagaStatus::Compensating);
    // Both branches in flight: nothing is undone yet.
    assert_eq!(all(&def, events.clone(), &[1, 2], 100), []);
    // b's result is recorded while compensating; c is still running: nothing of the
    // group is undone until every branch settled (G5).
    events.push(ok(1, 1));
    assert_eq!(all(&def, events.clone(), &[2], 100), []);
    events.push(failed(2, 1, FailureKind::Timeout, None));
    // c timed out at its deadline (500): both are undone from then on, together.
    assert_eq!(
        all(&def, events.clone(), &[], 400),
        [Decision::Wait { until: t(500) }]
    );
    assert_eq!(
        all(&def, events.clone(), &[], 500),
        [comp(1, 1), comp(2, 1)]
    );
    // After a crash with c's action interrupted instead, the stage waits for c's
    // deadline before undoing b.
    events.pop();
    assert_eq!(
        all(&def, events, &[], 100),
        [Decision::Wait { until: t(500) }]
    );
}

#[test]
fn a_retriable_group_that_fails_parks_once_its_siblings_settle() {
    let def = grouped();
    let mut events = vec![started(0, 1), ok(0, 1)];
    for i in 1..=3 {
        events.extend([started(i, 1), ok(i, 1)]);
    }
    events.extend([
        started(4, 1),
        ok(4, 1),
        started(5, 1),
        started(6, 1),
        failed(5, 1, FailureKind::Permanent, None),
    ]);
    assert_eq!(all(&def, events.clone(), &[6], 0), []);
    events.push(ok(6, 1));
    let d = all(&def, events, &[], 0);
    let [Decision::Park { reason }] = &d[..] else {
        panic!("{d:?}");
    };
    assert_eq!(reason.kind, ParkKind::ForwardFailed);
}

#[test]
fn repairs_name_the_branch_they_act_on() {
    let def = grouped();
    let events = fanned_out(vec![
        failed(2, 1, FailureKind::Retryable, Some(900)),
        failed(3, 1, FailureKind::Retryable, Some(800)),
    ]);
    let s = state(&def, events.clone());
    let retry = |step| Repair::RetryNow { step };
    crate::machine::check_repair(&s, &retry(Some(2))).unwrap();
    crate::machine::check_repair(&s, &retry(None)).unwrap();
    // a succeeded long ago; b has no timer (it is in flight).
    assert!(crate::machine::check_repair(&s, &retry(Some(0))).is_err());
    let mut records = log(&def, events);
    records.push(LogRecord {
        lsn: Lsn(records.len() as u64),
        at: t(100),
        event: Event::OperatorAction {
            action: retry(Some(2)),
            operator: "ana".into(),
            reason: "the window is over".into(),
        },
    });
    let s = SagaState::fold(id(), &records).unwrap();
    // Only c's retry moved.
    assert_eq!(
        decide(&def, &s, &[1].into_iter().collect(), t(100)),
        [run(2, 2), Decision::Wait { until: t(800) }]
    );
    // Skip works on one branch; a branch that succeeded is not the stage's to skip.
    crate::machine::check_repair(&s, &Repair::SkipStep { step: 3 }).unwrap();
    assert!(crate::machine::check_repair(&s, &Repair::SkipStep { step: 0 }).is_err());
    assert!(crate::machine::check_repair(&s, &Repair::SkipStep { step: 4 }).is_err());
}

#[test]
fn stages_that_do_not_count_up_do_not_fold() {
    let def = grouped();
    let mut records = log(&def, vec![]);
    for bad in [
        vec![0, 1, 1],
        vec![1, 1, 1, 1, 2, 3, 3],
        vec![0, 2, 2, 2, 3, 4, 4],
    ] {
        if let Event::Started { stages, .. } = &mut records[0].event {
            *stages = bad;
        }
        assert!(SagaState::fold(id(), &records).is_err());
    }
}

#[test]
fn a_definition_whose_groups_changed_parks() {
    let def = grouped();
    let flat = SagaDefinition::builder("grouped", 1)
        .step("a", Noop)
        .step("b", Noop)
        .step("c", Noop)
        .step("d", Noop)
        .pivot("p", Noop)
        .retriable("r", Noop)
        .retriable("s", Noop)
        .build()
        .unwrap();
    let s = state(&def, vec![]);
    let d = decide(&flat, &s, &Live::new(), t(0));
    assert!(
        matches!(&d[..], [Decision::Park { reason }] if reason.kind == ParkKind::DefinitionMismatch),
        "{d:?}"
    );
}

/// A model run of `decide` over random definitions with groups: a driver that carries
/// out every decision, finishes attempts in flight in a random order with random
/// outcomes, and crashes now and then (its attempts in flight are then interrupted).
/// Whatever happens, every decision fits the log, nothing starts out of its stage, no
/// saga-wide decision comes while an attempt is in flight, compensation follows the
/// stages backwards, and the saga reaches an end or a park.
mod model {
    use super::*;
    use crate::ids::Phase;
    use crate::machine::next_attempt_at;
    use proptest::prelude::*;

    /// The next draw of a splitmix64 sequence whose state is `x`.
    fn splitmix(x: &mut u64) -> u64 {
        let out = crate::clock::splitmix64(*x);
        *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        out
    }

    /// Stages of 1 to 4 branches before an optional pivot, and maybe a retriable group.
    fn definition(rng: &mut u64) -> SagaDefinition {
        let o = |rng: &mut u64| {
            let idem = if splitmix(rng).is_multiple_of(3) {
                Idempotence::NotIdempotent
            } else {
                Idempotence::Idempotent
            };
            StepOptions::default()
                .with_idempotence(idem)
                .with_retry(RetryPolicy::default().with_max_attempts(2))
                .with_compensation_retry(RetryPolicy::default().with_max_attempts(3))
        };
        let mut b = SagaDefinition::builder("model", 1);
        let mut n = 0;
        let mut name = || {
            n += 1;
            format!("s{n}")
        };
        for _ in 0..1 + splitmix(rng) % 3 {
            let branches = 1 + splitmix(rng) % 4;
            b = b.parallel(|mut g| {
                for _ in 0..branches {
                    g = g.step_with(name(), StepKind::Compensatable, Noop, o(rng));
                }
                g
            });
        }
        if splitmix(rng).is_multiple_of(2) {
            b = b.step_with(name(), StepKind::Pivot, Noop, o(rng));
            if splitmix(rng).is_multiple_of(2) {
                b = b.parallel(|g| {
                    g.step_with(name(), StepKind::Retriable, Noop, o(rng))
                        .step_with(name(), StepKind::Retriable, Noop, o(rng))
                });
            }
        }
        b.build().unwrap()
    }

    /// How a run ended, and whether it ran two branches, or two compensations, at
    /// once.
    struct Ran {
        status: SagaStatus,
        fanned_out: bool,
        undid_side_by_side: bool,
    }

    fn run(seed: u64) -> Result<Ran, String> {
        let mut fanned_out = false;
        let mut undid_side_by_side = false;
        let mut rng = seed;
        let def = definition(&mut rng);
        let mut records = log(&def, vec![]);
        let mut s = SagaState::fold(id(), &records).unwrap();
        let mut live: Live = Live::new();
        let mut now = 0u64;
        let push = |s: &mut SagaState, records: &mut Vec<LogRecord>, now: u64, event| {
            let r = LogRecord {
                lsn: s.next_lsn,
                at: t(now),
                event,
            };
            s.apply(&r).map_err(|e| format!("{e} ({:?})", r.event))?;
            records.push(r);
            Ok::<(), String>(())
        };
        for _ in 0..2_000 {
            let ds = decide(&def, &s, &live, t(now));
            let begin =
                |phase, step, attempt| Event::attempt_started(phase, step, attempt, t(now + 100));
            let alone = ds.iter().any(|d| {
                !matches!(
                    d,
                    Decision::RunStep { .. }
                        | Decision::Compensate { .. }
                        | Decision::CloseInterrupted { .. }
                        | Decision::Wait { .. }
                )
            });
            if alone && (ds.len() != 1 || !live.is_empty()) {
                return Err(format!("{ds:?} with {live:?} in flight"));
            }
            let mut wait = None;
            let mut changed = false;
            for d in ds {
                match d {
                    Decision::Idle => {
                        check_end(&def, &s)?;
                        return Ok(Ran {
                            status: s.status,
                            fanned_out,
                            undid_side_by_side,
                        });
                    }
                    Decision::RunStep { step, attempt } => {
                        let stage = s.current_stage().ok_or("no stage")?;
                        if !stage.contains(&(step as usize)) || s.stage_failed() {
                            return Err(format!("step {step} run outside {stage:?}"));
                        }
                        push(
                            &mut s,
                            &mut records,
                            now,
                            begin(Phase::Action, step, attempt),
                        )?;
                        live.insert(step);
                        fanned_out |= live.len() > 1;
                        changed = true;
                    }
                    Decision::Compensate { step, attempt } => {
                        let stage = s.compensation_stage();
                        if !stage.contains(&(step as usize)) {
                            return Err(format!("step {step} compensated outside {stage:?}"));
                        }
                        let event = begin(Phase::Compensation, step, attempt);
                        push(&mut s, &mut records, now, event)?;
                        live.insert(step);
                        undid_side_by_side |= live.len() > 1;
                        changed = true;
                    }
                    Decision::CloseInterrupted { step, attempt } => {
                        push(
                            &mut s,
                            &mut records,
                            now,
                            Event::StepFailed {
                                step,
                                attempt,
                                kind: FailureKind::Interrupted,
                                error: "crash".into(),
                                retry_at: None,
                            },
                        )?;
                        changed = true;
                    }
                    Decision::Wait { until } => wait = Some(until),
                    Decision::BeginCompensation { reason } => {
                        push(
                            &mut s,
                            &mut records,
                            now,
                            Event::CompensationBegan { reason },
                        )?;
                        changed = true;
                    }
                    Decision::Park { reason } => {
                        push(&mut s, &mut records, now, Event::Parked { reason })?;
                        changed = true;
                    }
                    Decision::Complete => {
                        push(&mut s, &mut records, now, Event::Completed)?;
                        changed = true;
                    }
                    Decision::FinishCompensation => {
                        push(&mut s, &mut records, now, Event::Compensated)?;
                        changed = true;
                    }
                    other => return Err(format!("unexpected {other:?}")),
                }
            }
            if changed {
                continue;
            }
            if live.is_empty() {
                let until = wait.ok_or("nothing to do, nothing in flight, no timer")?;
                now = now.max(until.as_millis());
                continue;
            }
            // A crash now and then: every attempt in flight is interrupted.
            if splitmix(&mut rng).is_multiple_of(12) {
                live.clear();
                continue;
            }
            // One attempt in flight ends, with a random outcome.
            let pick = (splitmix(&mut rng) % live.len() as u64) as usize;
            let step = *live.iter().nth(pick).unwrap();
            live.remove(&step);
            now += splitmix(&mut rng) % 50;
            let st = &s.steps[step as usize];
            let (phase, attempt) = match (&st.compensation, &st.action) {
                (Progress::InFlight { attempt }, _) => (Phase::Compensation, *attempt),
                (_, Progress::InFlight { attempt }) => (Phase::Action, *attempt),
                _ => return Err(format!("step {step} is live but not in flight")),
            };
            let kind = match splitmix(&mut rng) % 6 {
                0 => None,
                1 | 2 => None,
                3 => Some(FailureKind::Rejected),
                4 => Some(FailureKind::Retryable),
                _ => Some(FailureKind::Unknown),
            };
            let event = match (phase, kind) {
                (Phase::Action, None) => Event::StepSucceeded {
                    step,
                    attempt,
                    output: json!(1),
                },
                (Phase::Compensation, None) => Event::CompensationSucceeded { step, attempt },
                (phase, Some(kind)) => {
                    let retry_at = next_attempt_at(
                        &def,
                        &s,
                        step,
                        phase,
                        kind,
                        None,
                        t(now),
                        splitmix(&mut rng),
                    );
                    let error = "scripted".to_string();
                    match phase {
                        Phase::Action => Event::StepFailed {
                            step,
                            attempt,
                            kind,
                            error,
                            retry_at,
                        },
                        Phase::Compensation => Event::CompensationFailed {
                            step,
                            attempt,
                            kind,
                            error,
                            retry_at,
                        },
                    }
                }
            };
            push(&mut s, &mut records, now, event)?;
        }
        Err(format!("no end after 2000 rounds: {:?}", s.status))
    }

    fn check_end(def: &SagaDefinition, s: &SagaState) -> Result<(), String> {
        match s.status {
            SagaStatus::Completed => Ok(()),
            SagaStatus::Parked => Ok(()),
            SagaStatus::Compensated => {
                for (i, st) in s.steps.iter().enumerate() {
                    let owed = def.step_kind(i) == Some(StepKind::Compensatable)
                        && st.may_have_taken_effect();
                    if owed != matches!(st.compensation, Progress::Succeeded { .. }) {
                        return Err(format!("step {i}: owed {owed}, {:?}", st.compensation));
                    }
                }
                Ok(())
            }
            other => Err(format!("ended {other}")),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn every_run_of_a_grouped_saga_fits_its_log_and_ends(seed in any::<u64>()) {
            if let Err(e) = run(seed) {
                panic!("seed {seed}: {e}");
            }
        }
    }

    /// The model reaches every end, with branches and compensations side by side:
    /// otherwise the property above would prove little.
    #[test]
    fn the_model_runs_reach_every_end() {
        let mut ends = std::collections::BTreeMap::new();
        let (mut fanned, mut undid) = (0, 0);
        for seed in 0..500 {
            let ran = run(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            *ends.entry(ran.status).or_insert(0) += 1;
            fanned += usize::from(ran.fanned_out);
            undid += usize::from(ran.undid_side_by_side);
        }
        println!("{ends:?}, fanned out {fanned}, undid side by side {undid}");
        for status in [
            SagaStatus::Completed,
            SagaStatus::Compensated,
            SagaStatus::Parked,
        ] {
            assert!(ends.get(&status).copied().unwrap_or(0) > 10, "{ends:?}");
        }
        assert!(fanned > 100 && undid > 20, "{fanned} {undid}");
    }
}

#[test]
fn the_reason_names_the_failed_branch_before_the_siblings_closed_after_it() {
    let def = grouped();
    let events = fanned_out(vec![
        ok(3, 1),
        failed(2, 1, FailureKind::Interrupted, None),
        failed(1, 1, FailureKind::Rejected, None),
    ]);
    let d = all(&def, events, &[], 2_000_000);
    let [Decision::BeginCompensation { reason }] = &d[..] else {
        panic!("{d:?}");
    };
    assert!(reason.starts_with("step `b` was rejected"), "{reason}");
    assert!(
        reason.contains("step `c`'s attempt 1 was interrupted by a crash and not run again"),
        "{reason}"
    );
}

#[test]
fn the_sagas_deadline_is_a_timer_while_branches_are_in_flight() {
    let def = grouped();
    let mut records = log(&def, fanned_out(vec![ok(2, 1), ok(3, 1)]));
    if let Event::Started { deadline, .. } = &mut records[0].event {
        *deadline = Some(t(1_000));
    }
    let s = SagaState::fold(id(), &records).unwrap();
    // b runs: nothing to do but wait for it, or for the deadline, whichever comes first.
    assert_eq!(
        decide(&def, &s, &[1].into_iter().collect(), t(500)),
        [Decision::Wait { until: t(1_000) }]
    );
    // At the deadline the saga is cancelled (before its pivot), b still running.
    assert!(matches!(
        &decide(&def, &s, &[1].into_iter().collect(), t(1_000))[..],
        [Decision::Cancel { .. }]
    ));
}

#[test]
fn an_interrupted_wait_had_no_effect() {
    let def = SagaDefinition::builder("w", 1)
        .step("a", Noop)
        .await_event(
            "settle",
            crate::definition::Await::new(std::time::Duration::from_secs(3600), |_| Ok("k".into())),
        )
        .build()
        .unwrap();
    let events = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        Event::Awaiting {
            step: 1,
            attempt: a(1),
            key: "k".into(),
        },
        Event::CancelRequested {
            operator: "ana".into(),
            reason: "changed her mind".into(),
        },
    ];
    let s = state(&def, events.clone());
    // A wait sends nothing: interrupted, it may not have taken effect, and nothing
    // waits for its deadline (a million ms here) before closing it and undoing `a`.
    assert!(!s.steps[1].may_have_taken_effect());
    assert_eq!(s.steps[1].undo_not_before(), None);
    assert_eq!(
        all(&def, events, &[], 10),
        [Decision::CloseInterrupted {
            step: 1,
            attempt: a(1)
        }]
    );
    // Run again after a crash (not cancelled), its next attempt does not count the
    // first as a possible effect either.
    let s = state(
        &def,
        vec![
            started(0, 1),
            ok(0, 1),
            started(1, 1),
            Event::Awaiting {
                step: 1,
                attempt: a(1),
                key: "k".into(),
            },
            started(1, 2),
        ],
    );
    assert!(!s.steps[1].effect_possible);
    assert_eq!(s.steps[1].unknown_until, None);
}

fn drift(step: u32, kind: crate::machine::DriftKind) -> Event {
    Event::Drift {
        step,
        kind,
        expected: crate::machine::Expected::Present,
        detail: "amount differs".into(),
    }
}

fn handle(lsn: u64) -> Event {
    Event::OperatorAction {
        action: Repair::HandleDrift { drift: Lsn(lsn) },
        operator: "ana".into(),
        reason: "fixed by hand".into(),
    }
}

#[test]
fn drift_comes_only_after_the_end_and_is_handled_once() {
    use crate::machine::DriftKind::{Different, Missing};
    let def = abc();
    let done = vec![
        started(0, 1),
        ok(0, 1),
        started(1, 1),
        ok(1, 1),
        started(2, 1),
        ok(2, 1),
        Event::Completed,
    ];
    // Before the end, drift does not fit, nor does its handling.
    let e = fold_err(&def, vec![started(0, 1), drift(0, Missing)]);
    assert!(e.reason.contains("before the saga ended"), "{e}");
    // After it: recorded, the status and the end's time unchanged.
    let mut events = done.clone();
    events.push(drift(1, Different));
    events.push(drift(2, Missing));
    let s = state(&def, events.clone());
    assert_eq!(s.status, SagaStatus::Completed);
    assert_eq!(s.ended_at, Some(t(70)));
    assert_eq!(s.updated_at, t(90));
    assert_eq!(s.open_drifts().count(), 2);
    assert_eq!(
        (s.drifts[0].lsn, s.drifts[0].step_name.as_str()),
        (Lsn(8), "b")
    );
    // A drift of a step that does not exist does not fit.
    let mut bad = done.clone();
    bad.push(drift(7, Missing));
    assert!(fold_err(&def, bad).reason.contains("does not exist"));
    // Handled: by lsn, once, with who and why; other repairs stay refused.
    assert!(crate::machine::check_repair(&s, &Repair::HandleDrift { drift: Lsn(3) }).is_err());
    assert!(crate::machine::check_repair(&s, &Repair::Resume).is_err());
    events.push(handle(8));
    let s = state(&def, events.clone());
    assert_eq!(s.open_drifts().count(), 1);
    let h = s.drifts[0].handled.as_ref().unwrap();
    assert_eq!((h.operator.as_str(), h.at), ("ana", t(100)));
    assert_eq!(crate::store::SagaMeta::of(&s).open_drifts, 1);
    assert_eq!(crate::store::SagaMeta::of(&s).finished_at, Some(t(70)));
    events.push(handle(8));
    assert!(fold_err(&def, events).reason.contains("already handled"));
}
