//! Parallel groups on the real engine: branches run side by side, a failed branch's
//! siblings settle before anything is undone, repairs act on one branch, and recovery
//! closes each interrupted branch by its own rule.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sagaflow::machine::{Event, Repair};
use sagaflow::store::MemLog;
use sagaflow::{
    Compensate, Engine, FailureKind, Idempotence, Phase, RetryPolicy, SagaDefinition, SagaOutcome,
    SagaStatus, Step, StepContext, StepError, TokioClock,
};
use sagaflow_tests::*;
use serde_json::{json, Value};

/// What one attempt of a [`Timed`] step does.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// Waits this long, then succeeds.
    Ok(u64),
    /// Waits this long, then is rejected (no effect).
    Reject(u64),
    /// Fails at once, asking to be tried again in ten minutes.
    RetryLater,
    /// Never answers.
    Hang,
}

/// When each attempt began and ended, in virtual (or real) time since the test began.
#[derive(Default)]
struct Journal {
    entries: Mutex<Vec<(String, Phase, &'static str, Duration)>>,
    start: Mutex<Option<tokio::time::Instant>>,
    scripts: Mutex<std::collections::HashMap<(String, Phase), VecDeque<Act>>>,
}

impl Journal {
    fn new() -> Arc<Self> {
        let j = Arc::new(Journal::default());
        *j.start.lock().unwrap() = Some(tokio::time::Instant::now());
        j
    }

    fn script(&self, step: &str, phase: Phase, acts: impl IntoIterator<Item = Act>) {
        self.scripts
            .lock()
            .unwrap()
            .insert((step.into(), phase), acts.into_iter().collect());
    }

    fn note(&self, step: &str, phase: Phase, what: &'static str) {
        let since = self.start.lock().unwrap().unwrap().elapsed();
        self.entries
            .lock()
            .unwrap()
            .push((step.into(), phase, what, since));
    }

    /// When `step`'s `phase` last did `what`.
    fn at(&self, step: &str, phase: Phase, what: &str) -> Option<Duration> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(s, p, w, _)| s == step && *p == phase && *w == what)
            .map(|e| e.3)
    }

    fn count(&self, step: &str, phase: Phase) -> usize {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, p, w, _)| s == step && *p == phase && *w == "began")
            .count()
    }

    async fn act(&self, step: &str, phase: Phase) -> Result<(), StepError> {
        self.note(step, phase, "began");
        let act = self
            .scripts
            .lock()
            .unwrap()
            .get_mut(&(step.to_string(), phase))
            .and_then(VecDeque::pop_front)
            .unwrap_or(Act::Ok(0));
        let result = match act {
            Act::Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
            Act::Reject(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Err(StepError::rejected(format!("{step} refused")))
            }
            Act::RetryLater => Err(StepError::retry_after(
                Duration::from_secs(600),
                format!("{step} busy"),
            )),
            Act::Hang => std::future::pending().await,
        };
        self.note(step, phase, "ended");
        result
    }
}

struct Timed {
    name: &'static str,
    journal: Arc<Journal>,
}

#[async_trait]
impl Step for Timed {
    type Input = Value;
    type Output = Value;
    async fn execute(&self, ctx: &StepContext, _: Value) -> Result<Value, StepError> {
        self.journal.act(self.name, Phase::Action).await?;
        // What the step saw of the steps before it.
        let seen: Vec<&str> = ["a", "b", "c", "d"]
            .into_iter()
            .filter(|s| matches!(ctx.output_of::<Value>(s), Ok(Some(_))))
            .collect();
        Ok(json!({ "step": self.name, "saw": seen }))
    }
}

#[async_trait]
impl Compensate for Timed {
    async fn compensate(
        &self,
        _: &StepContext,
        _: Value,
        _: Option<Value>,
    ) -> Result<(), StepError> {
        self.journal.act(self.name, Phase::Compensation).await
    }
}

/// a → [b, c, d] → e, all compensatable, with a 1 s attempt timeout.
fn fan(journal: &Arc<Journal>, c_idempotence: Idempotence) -> SagaDefinition {
    let s = |name| Timed {
        name,
        journal: journal.clone(),
    };
    let retry = RetryPolicy::default()
        .with_max_attempts(3)
        .with_attempt_timeout(Duration::from_secs(1));
    SagaDefinition::builder("fan", 1)
        .step("a", s("a"))
        .retry(retry.clone())
        .parallel(|g| {
            let g = g.step("b", s("b")).retry(retry.clone()).step("c", s("c"));
            let g = match c_idempotence {
                Idempotence::NotIdempotent => g.not_idempotent(),
                Idempotence::Idempotent => g,
            };
            g.retry(retry.clone())
                .step("d", s("d"))
                .retry(retry.clone())
        })
        .step("e", s("e"))
        .retry(retry)
        .build()
        .unwrap()
}

async fn paused_engine(def: SagaDefinition, store: Option<Arc<MemLog>>) -> Engine {
    let clock = Arc::new(TokioClock::starting_at(sagaflow::Timestamp::from_millis(
        1_700_000_000_000,
    )));
    let b = paused_builder(clock).register(def);
    match store {
        Some(s) => b.open_with(s).await.unwrap(),
        None => b.open_with(Arc::new(MemLog::new())).await.unwrap(),
    }
}

fn failures(engine: &Engine, id: sagaflow::SagaId, kind: FailureKind) -> Vec<u32> {
    engine
        .history(id)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            Event::StepFailed { step, kind: k, .. } if k == kind => Some(step),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn branches_run_side_by_side_and_the_next_step_sees_every_output() {
    let journal = Journal::new();
    for step in ["a", "b", "c", "d", "e"] {
        journal.script(step, Phase::Action, [Act::Ok(100)]);
    }
    let engine = paused_engine(fan(&journal, Idempotence::Idempotent), None).await;
    let id = engine.start("fan", json!({}), None).await.unwrap();
    let outcome = engine.wait(id).await.unwrap();
    let SagaOutcome::Completed { outputs, .. } = outcome else {
        panic!("{outcome:?}");
    };
    // Three waits of 100 ms (a, the group, e), not five.
    let took = journal.at("e", Phase::Action, "ended").unwrap();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(400),
        "{took:?}"
    );
    for branch in ["b", "c", "d"] {
        assert_eq!(
            journal.at(branch, Phase::Action, "began"),
            journal.at("a", Phase::Action, "ended"),
            "{branch} began when a ended"
        );
    }
    assert_eq!(outputs["e"]["saw"], json!(["a", "b", "c", "d"]));
}

#[tokio::test(start_paused = true)]
async fn a_branch_that_succeeds_after_its_sibling_failed_is_compensated_once_it_settles() {
    let journal = Journal::new();
    // b is refused at once; c takes 300 ms and succeeds; d takes 200 ms and succeeds.
    journal.script("b", Phase::Action, [Act::Reject(0)]);
    journal.script("c", Phase::Action, [Act::Ok(300)]);
    journal.script("d", Phase::Action, [Act::Ok(200)]);
    journal.script("c", Phase::Compensation, [Act::Ok(50)]);
    journal.script("d", Phase::Compensation, [Act::Ok(50)]);
    let engine = paused_engine(fan(&journal, Idempotence::Idempotent), None).await;
    let id = engine.start("fan", json!({}), None).await.unwrap();
    let outcome = engine.wait(id).await.unwrap();
    assert!(
        matches!(outcome, SagaOutcome::Compensated { .. }),
        "{outcome:?}"
    );
    let c_done = journal.at("c", Phase::Action, "ended").unwrap();
    // Nothing was undone while c was in flight.
    for step in ["c", "d", "a"] {
        let began = journal.at(step, Phase::Compensation, "began").unwrap();
        assert!(
            began >= c_done,
            "{step} compensated at {began:?}, c ended at {c_done:?}"
        );
    }
    // c and d were undone together, then a, after both.
    assert_eq!(
        journal.at("c", Phase::Compensation, "began"),
        journal.at("d", Phase::Compensation, "began")
    );
    assert!(
        journal.at("a", Phase::Compensation, "began").unwrap()
            >= journal.at("c", Phase::Compensation, "ended").unwrap()
    );
    // b had no effect: not compensated. e never ran.
    assert_eq!(journal.count("b", Phase::Compensation), 0);
    assert_eq!(journal.count("e", Phase::Action), 0);
}

#[tokio::test(start_paused = true)]
async fn forced_compensation_of_a_group_in_flight_waits_for_its_branches() {
    let journal = Journal::new();
    journal.script("b", Phase::Action, [Act::Ok(400)]);
    journal.script("c", Phase::Action, [Act::Ok(600)]);
    journal.script("d", Phase::Action, [Act::Ok(100)]);
    let engine = paused_engine(fan(&journal, Idempotence::Idempotent), None).await;
    let id = engine.start("fan", json!({}), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let meta = engine
        .repair(id, Repair::ForceCompensate, "ana", "the customer cancelled")
        .await
        .unwrap();
    assert_eq!(meta.status, SagaStatus::Compensating);
    let outcome = engine.wait(id).await.unwrap();
    assert!(
        matches!(outcome, SagaOutcome::Compensated { .. }),
        "{outcome:?}"
    );
    // d had ended when compensation was forced; b and c were still running. Nothing of
    // the group is undone before every branch settled (c, the last, at 600 ms), then the
    // three together, and a after all three.
    let settled = journal.at("c", Phase::Action, "ended").unwrap();
    for step in ["b", "c", "d"] {
        assert!(
            journal.at(step, Phase::Compensation, "began").unwrap() >= settled,
            "{step}"
        );
    }
    assert!(
        journal.at("a", Phase::Compensation, "began").unwrap()
            >= journal.at("c", Phase::Compensation, "ended").unwrap()
    );
    assert_eq!(journal.count("e", Phase::Action), 0);
}

#[tokio::test(start_paused = true)]
async fn recovery_closes_each_interrupted_branch_by_its_own_rule() {
    // A crash while b and c are in flight. c is not idempotent: it is closed as
    // interrupted (it may have taken effect), the group has failed, and b's interrupted
    // attempt is closed too; after the attempts' deadline both are undone, then a.
    let store = Arc::new(MemLog::new());
    let journal = Journal::new();
    journal.script("b", Phase::Action, [Act::Hang]);
    journal.script("c", Phase::Action, [Act::Hang]);
    journal.script("d", Phase::Action, [Act::Ok(0)]);
    let engine = paused_engine(
        fan(&journal, Idempotence::NotIdempotent),
        Some(store.clone()),
    )
    .await;
    let id = engine.start("fan", json!({}), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(journal.count("b", Phase::Action), 1);
    assert_eq!(journal.count("c", Phase::Action), 1);
    drop(engine);

    let engine = paused_engine(fan(&journal, Idempotence::NotIdempotent), Some(store)).await;
    let reopened = journal.start.lock().unwrap().unwrap().elapsed();
    let outcome = engine.wait(id).await.unwrap();
    assert!(
        matches!(outcome, SagaOutcome::Compensated { .. }),
        "{outcome:?}"
    );
    let mut closed = failures(&engine, id, FailureKind::Interrupted);
    closed.sort_unstable();
    assert_eq!(closed, [1, 2], "b and c closed as interrupted");
    // Neither ran again; both (and d) were undone, not before the deadline (1 s) of the
    // attempts the crash interrupted.
    assert_eq!(journal.count("b", Phase::Action), 1);
    assert_eq!(journal.count("c", Phase::Action), 1);
    for step in ["b", "c", "d"] {
        let began = journal.at(step, Phase::Compensation, "began").unwrap();
        assert!(
            began >= Duration::from_secs(1),
            "{step} undone at {began:?}"
        );
        assert!(began >= reopened);
    }
}

#[tokio::test(start_paused = true)]
async fn recovery_runs_every_interrupted_idempotent_branch_again_with_its_key() {
    let store = Arc::new(MemLog::new());
    let journal = Journal::new();
    journal.script("b", Phase::Action, [Act::Hang]);
    journal.script("c", Phase::Action, [Act::Hang]);
    journal.script("d", Phase::Action, [Act::Hang]);
    let engine = paused_engine(fan(&journal, Idempotence::Idempotent), Some(store.clone())).await;
    let id = engine.start("fan", json!({}), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(engine);
    let engine = paused_engine(fan(&journal, Idempotence::Idempotent), Some(store)).await;
    let outcome = engine.wait(id).await.unwrap();
    assert!(
        matches!(outcome, SagaOutcome::Completed { .. }),
        "{outcome:?}"
    );
    for step in ["b", "c", "d"] {
        assert_eq!(journal.count(step, Phase::Action), 2, "{step}");
    }
    assert!(failures(&engine, id, FailureKind::Interrupted).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_now_and_skip_act_on_one_branch() {
    let journal = Journal::new();
    journal.script("b", Phase::Action, [Act::RetryLater]);
    journal.script("c", Phase::Action, [Act::RetryLater]);
    let slow = RetryPolicy::default()
        .with_max_attempts(3)
        .with_max_retry_after(Duration::from_secs(600));
    let s = |name| Timed {
        name,
        journal: journal.clone(),
    };
    let def = SagaDefinition::builder("pair", 1)
        .parallel(|g| {
            g.step("b", s("b"))
                .retry(slow.clone())
                .step("c", s("c"))
                .retry(slow.clone())
        })
        .step("e", s("e"))
        .build()
        .unwrap();
    let engine = builder()
        .register(def)
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let id = engine.start("pair", json!({}), None).await.unwrap();
    let waiting = |engine: &Engine| failures(engine, id, FailureKind::RetryAfter).len() == 2;
    while !waiting(&engine) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A step outside the stage is refused; b's retry runs now, c's keeps waiting.
    assert!(engine
        .repair(id, Repair::RetryNow { step: Some(2) }, "ana", "e")
        .await
        .is_err());
    engine
        .repair(
            id,
            Repair::RetryNow { step: Some(0) },
            "ana",
            "b's window is over",
        )
        .await
        .unwrap();
    while journal.count("b", Phase::Action) < 2 || journal.at("b", Phase::Action, "ended").is_none()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(journal.count("b", Phase::Action), 2);
    assert_eq!(journal.count("c", Phase::Action), 1);
    // The operator did c by hand: the saga goes on.
    engine
        .repair(id, Repair::SkipStep { step: 1 }, "ana", "reserved by phone")
        .await
        .unwrap();
    let outcome = engine.wait(id).await.unwrap();
    assert!(
        matches!(outcome, SagaOutcome::Completed { .. }),
        "{outcome:?}"
    );
    assert_eq!(journal.count("c", Phase::Action), 1);
}
