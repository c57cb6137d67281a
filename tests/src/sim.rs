//! Deterministic simulation: random definitions, scripted step outcomes and crashes at
//! every durable boundary, run on the real engine under virtual time.
//!
//! A [`Case`] is a pure function of a 64-bit seed ([`Case::from_seed`]), so a failing
//! case is replayed from its seed alone. One run is one current-thread tokio runtime
//! with paused time, a [`sagaflow::TokioClock`], seeded entropy and the group commit on
//! a runtime task: nothing in it depends on the wall clock or on thread scheduling, so
//! the same case gives a byte-identical store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use sagaflow::machine::{Event, SagaState};
use sagaflow::store::{MemLog, SagaLog, SledLog};
use sagaflow::{
    Await, Clock, CommitMode, Engine, EngineOptions, Idempotence, OnTimeout, Retention,
    RetryPolicy, SagaDefinition, SagaId, SagaStatus, StartKey, StartOptions, StepKind, StepOptions,
    Timestamp, TokioClock,
};
use serde_json::json;

use crate::check::{self, Acked, AwaitObservation, ObservedSaga, StepShape};
use crate::crash::{Crash, CrashPlan, CrashPoint, CrashableStore};
use crate::{FakeStep, Ledger, Outcome};

/// Step names: at most 3 stages of 4, the pivot, and 2 stages of 4.
const NAMES: [&str; 21] = [
    "s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11", "s12", "s13", "s14",
    "s15", "s16", "s17", "s18", "s19", "s20",
];

/// One step of a generated definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepSpec {
    /// Kind.
    pub kind: StepKind,
    /// Idempotence.
    pub idempotence: Idempotence,
    /// Its stage: steps of one parallel group share a stage; stages count 0, 1, 2, ..
    /// in step order, as [`SagaDefinition::step_stages`] does.
    pub stage: u32,
    /// An await step (compensatable, before the pivot) instead of a call to a service.
    pub awaits: Option<AwaitSpec>,
}

/// An await step of a generated definition: it waits for the event addressed to
/// `event/<tag>` (the saga's tag), and its undo is a call to a fake service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AwaitSpec {
    /// How long it waits (virtual ms).
    pub within_ms: u64,
    /// What its timeout means.
    pub on_timeout: OnTimeout,
}

/// When a saga's event is delivered, by a simulated sender outside the engine that
/// sends until it is answered (a delivery refused by a crashed process is sent again to
/// the next one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventPlan {
    /// Before the saga is started.
    Before,
    /// While it waits: `permille` of the wait after its `awaiting` record.
    During {
        /// Thousandths of the wait.
        permille: u64,
    },
    /// This long after the wait's deadline.
    After {
        /// Virtual ms past the deadline.
        late_ms: u64,
    },
    /// During the wait, and again `gap_ms` later with the same delivery id.
    TwiceSameId {
        /// Thousandths of the wait.
        permille: u64,
        /// Virtual ms between the two.
        gap_ms: u64,
    },
    /// During the wait, and again `gap_ms` later with another delivery id.
    TwiceNewId {
        /// Thousandths of the wait.
        permille: u64,
        /// Virtual ms between the two.
        gap_ms: u64,
    },
    /// Never.
    Never,
}

impl EventPlan {
    /// A short name, for counting.
    pub fn name(self) -> &'static str {
        match self {
            EventPlan::Before => "before",
            EventPlan::During { .. } => "during",
            EventPlan::After { .. } => "after",
            EventPlan::TwiceSameId { .. } => "twice_same_id",
            EventPlan::TwiceNewId { .. } => "twice_new_id",
            EventPlan::Never => "never",
        }
    }

    /// The deliveries after the wait began at `at` with deadline `deadline`: (when,
    /// delivery id). [`EventPlan::Before`] is sent before the saga starts instead.
    fn after_awaiting(self, at: Timestamp, deadline: Timestamp) -> Vec<(Timestamp, &'static str)> {
        let within = deadline.duration_since(at);
        let during = |permille: u64| at.saturating_add(within.mul_f64(permille as f64 / 1000.0));
        match self {
            EventPlan::Before | EventPlan::Never => Vec::new(),
            EventPlan::During { permille } => vec![(during(permille), "e1")],
            EventPlan::After { late_ms } => {
                vec![(
                    deadline.saturating_add(Duration::from_millis(late_ms)),
                    "e1",
                )]
            }
            EventPlan::TwiceSameId { permille, gap_ms } => {
                let t = during(permille);
                vec![
                    (t, "e1"),
                    (t.saturating_add(Duration::from_millis(gap_ms)), "e1"),
                ]
            }
            EventPlan::TwiceNewId { permille, gap_ms } => {
                let t = during(permille);
                vec![
                    (t, "e1"),
                    (t.saturating_add(Duration::from_millis(gap_ms)), "e2"),
                ]
            }
        }
    }
}

/// The correlation key of saga `tag`'s event.
pub fn event_key(tag: &str) -> String {
    format!("event/{tag}")
}

/// The scripts of one saga: per step, the outcomes of its first action attempts and of
/// its first compensation attempts (later attempts succeed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SagaSpec {
    /// Per step, action outcomes.
    pub action: Vec<Vec<Outcome>>,
    /// Per step, compensation outcomes.
    pub compensation: Vec<Vec<Outcome>>,
    /// A cancellation this long (ms of virtual time) after the run began, racing
    /// whatever the saga does then.
    pub cancel_after: Option<u64>,
    /// A deadline this long (ms) after the run began.
    pub deadline_after: Option<u64>,
    /// When its event is delivered, if the definition has an await step.
    pub event: EventPlan,
}

/// A whole simulated run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// The engine's entropy seed.
    pub seed: u64,
    /// The definition.
    pub steps: Vec<StepSpec>,
    /// The sagas, started concurrently.
    pub sagas: Vec<SagaSpec>,
    /// One crash per incarnation, in order; the incarnation after the last runs to the
    /// end.
    pub crashes: Vec<Crash>,
}

fn action_outcome() -> impl Strategy<Value = Outcome> + Clone {
    prop_oneof![
        4 => Just(Outcome::Retryable),
        2 => (1u64..5_000).prop_map(|ms| Outcome::RetryAfter(Duration::from_millis(ms))),
        1 => Just(Outcome::Rejected),
        1 => Just(Outcome::Unknown),
        1 => Just(Outcome::ApplyThenUnknown),
        // Inside the sims' 5 s attempt timeout.
        1 => (1u64..4_999).prop_map(|ms| Outcome::Late(Duration::from_millis(ms))),
        1 => Just(Outcome::Hang),
        1 => Just(Outcome::Panic),
        1 => Just(Outcome::ApplyThenHang),
    ]
}

fn compensation_outcome() -> impl Strategy<Value = Outcome> + Clone {
    prop_oneof![
        4 => Just(Outcome::Retryable),
        1 => Just(Outcome::Hang),
        1 => Just(Outcome::Panic),
        1 => Just(Outcome::Rejected),
    ]
}

fn script(
    outcome: impl Strategy<Value = Outcome> + Clone,
    quiet: u32,
) -> impl Strategy<Value = Vec<Outcome>> {
    prop_oneof![
        quiet => Just(Vec::new()),
        1 => prop::collection::vec(outcome, 1..4),
    ]
}

fn crash() -> impl Strategy<Value = Crash> {
    let point = prop::sample::select(CrashPoint::ALL.to_vec());
    // Small `nth` lands early, including during recovery; larger ones mid-run.
    let nth = prop_oneof![1 => 0u32..3, 3 => 0u32..40];
    (point, nth).prop_map(|(point, nth)| Crash { point, nth })
}

/// The size of one stage: a single step, or a parallel group of 2 to 4 branches.
fn stage_size() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![3 => Just(1usize), 2 => Just(2), 1 => Just(3), 1 => Just(4)]
}

/// A definition's layout: (kind, stage) per step. Without a pivot, 1 to 3 stages of
/// compensatable steps; with one, 0 to 3 such stages, the pivot (a stage of its own),
/// then 0 to 2 stages of retriable steps. Any stage but the pivot may be a group.
fn layout() -> impl Strategy<Value = Vec<(StepKind, u32)>> {
    let sizes = |range: std::ops::RangeInclusive<usize>| prop::collection::vec(stage_size(), range);
    prop_oneof![
        1 => sizes(1..=3).prop_map(|before| (before, None)),
        1 => (sizes(0..=3), sizes(0..=2)).prop_map(|(before, after)| (before, Some(after))),
    ]
    .prop_map(|(before, after)| {
        let mut stages: Vec<(StepKind, usize)> = before
            .into_iter()
            .map(|n| (StepKind::Compensatable, n))
            .collect();
        if let Some(after) = after {
            stages.push((StepKind::Pivot, 1));
            stages.extend(after.into_iter().map(|n| (StepKind::Retriable, n)));
        }
        let mut steps = Vec::new();
        for (stage, (kind, n)) in (0u32..).zip(stages) {
            steps.extend(std::iter::repeat_n((kind, stage), n));
        }
        steps
    })
}

fn event_plan() -> impl Strategy<Value = EventPlan> {
    prop_oneof![
        2 => Just(EventPlan::Before),
        3 => (0u64..1000).prop_map(|permille| EventPlan::During { permille }),
        2 => (1u64..5_000).prop_map(|late_ms| EventPlan::After { late_ms }),
        1 => (0u64..1000, 0u64..3_000)
            .prop_map(|(permille, gap_ms)| EventPlan::TwiceSameId { permille, gap_ms }),
        1 => (0u64..1000, 0u64..3_000)
            .prop_map(|(permille, gap_ms)| EventPlan::TwiceNewId { permille, gap_ms }),
        2 => Just(EventPlan::Never),
    ]
}

fn delivery_crash() -> impl Strategy<Value = Crash> {
    (prop::sample::select(CrashPoint::DELIVERY.to_vec()), 0u32..3)
        .prop_map(|(point, nth)| Crash { point, nth })
}

/// What turns a case into one with an await step: which compensatable step (if any)
/// waits, how long and what its timeout means; when each saga's event comes; crashes at
/// deliveries and where they go among the others. Drawn after the rest of the case, so
/// a seed's case without an await step is what it was before await steps existed.
#[derive(Clone, Debug)]
struct AwaitExtras {
    step: Option<(prop::sample::Index, u64, bool)>,
    plans: Vec<EventPlan>,
    crashes: Vec<(prop::sample::Index, Crash)>,
}

fn await_extras() -> impl Strategy<Value = AwaitExtras> {
    (
        prop::option::weighted(
            0.45,
            (
                any::<prop::sample::Index>(),
                2_000u64..20_000,
                any::<bool>(),
            ),
        ),
        prop::collection::vec(event_plan(), 4),
        prop::collection::vec((any::<prop::sample::Index>(), delivery_crash()), 0..=2),
    )
        .prop_map(|(step, plans, crashes)| AwaitExtras {
            step,
            plans,
            crashes,
        })
}

impl AwaitExtras {
    fn apply(self, mut case: Case) -> Case {
        let candidates: Vec<usize> = (0..case.steps.len())
            .filter(|&i| case.steps[i].kind == StepKind::Compensatable)
            .collect();
        let Some((which, within_ms, unknown)) = self.step.filter(|_| !candidates.is_empty()) else {
            return case;
        };
        let i = candidates[which.index(candidates.len())];
        let s = &mut case.steps[i];
        s.idempotence = Idempotence::Idempotent;
        s.awaits = Some(AwaitSpec {
            within_ms,
            on_timeout: if unknown {
                OnTimeout::Unknown
            } else {
                OnTimeout::Rejected
            },
        });
        for (saga, plan) in case.sagas.iter_mut().zip(self.plans) {
            saga.event = plan;
        }
        for (at, crash) in self.crashes {
            let at = at.index(case.crashes.len() + 1);
            case.crashes.insert(at, crash);
        }
        case
    }
}

/// The strategy that generates cases: 1 to 3 stages with or without a pivot (and 0 to 2
/// stages after it), each stage a single step or a parallel group of 2 to 4 branches; 1
/// to 4 sagas, 0 to 4 crashes. In about two cases in five, one compensatable step (maybe
/// a branch of a group) is an await step instead, each saga's event comes before, during
/// or after its wait, twice or never, and up to two more crashes strike at deliveries.
pub fn case_strategy() -> impl Strategy<Value = Case> {
    (base_case_strategy(), await_extras()).prop_map(|(case, extras)| extras.apply(case))
}

fn base_case_strategy() -> impl Strategy<Value = Case> {
    (
        layout(),
        any::<u64>(),
        1usize..=4,
        prop::collection::vec(crash(), 0..=4),
    )
        .prop_flat_map(|(layout, seed, sagas, crashes)| {
            let n = layout.len();
            let idem = prop::collection::vec(prop::bool::weighted(0.8), n);
            let saga = (
                prop::collection::vec(script(action_outcome(), 3), n),
                prop::collection::vec(script(compensation_outcome(), 5), n),
                prop::option::weighted(0.2, 0u64..10_000),
                prop::option::weighted(0.15, 1_000u64..60_000),
            )
                .prop_map(
                    |(action, compensation, cancel_after, deadline_after)| SagaSpec {
                        action,
                        compensation,
                        cancel_after,
                        deadline_after,
                        event: EventPlan::Never,
                    },
                );
            let sagas = prop::collection::vec(saga, sagas);
            (idem, sagas).prop_map(move |(idem, sagas)| Case {
                seed,
                steps: idem
                    .into_iter()
                    .zip(&layout)
                    .map(|(idempotent, &(kind, stage))| StepSpec {
                        kind,
                        idempotence: if idempotent {
                            Idempotence::Idempotent
                        } else {
                            Idempotence::NotIdempotent
                        },
                        stage,
                        awaits: None,
                    })
                    .collect(),
                sagas,
                crashes: crashes.clone(),
            })
        })
}

fn runner_for(seed: u64) -> TestRunner {
    let mut bytes = [0u8; 32];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&seed.rotate_left(i as u32 * 16).to_le_bytes());
    }
    TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

impl Case {
    /// The case for `seed`: always the same.
    pub fn from_seed(seed: u64) -> Case {
        Case::tree(seed).current()
    }

    /// The value tree for `seed`, for shrinking a failure.
    ///
    /// # Panics
    ///
    /// Never for this strategy (it has no filters that could reject).
    pub fn tree(seed: u64) -> impl ValueTree<Value = Case> {
        case_strategy()
            .new_tree(&mut runner_for(seed))
            .expect("the case strategy has no filters")
    }

    fn definition(&self, ledger: &Arc<Ledger>) -> Result<SagaDefinition, String> {
        let quick = |max| {
            RetryPolicy::default()
                .with_max_attempts(max)
                .with_initial_backoff(Duration::from_millis(10))
                .with_max_backoff(Duration::from_secs(1))
                .with_attempt_timeout(Duration::from_secs(5))
        };
        let mut b =
            SagaDefinition::builder("sim", 1).retention(Retention::For(Duration::from_secs(3600)));
        let options = |s: &StepSpec| {
            let retry = if s.kind == StepKind::Retriable {
                quick(6)
            } else {
                quick(4)
            };
            // Two interruptions in a row park: crashes that keep landing on one attempt
            // make crash loops.
            StepOptions::default()
                .with_idempotence(s.idempotence)
                .with_retry(retry)
                .with_compensation_retry(quick(5))
                .with_max_interruptions(2)
        };
        let step = |i: usize| FakeStep {
            name: NAMES[i],
            ledger: ledger.clone(),
        };
        let wait = |i: usize, a: AwaitSpec| {
            Await::new(Duration::from_millis(a.within_ms), |ctx| {
                ctx.saga_input()["tag"]
                    .as_str()
                    .map(event_key)
                    .ok_or_else(|| "the input has no tag".to_string())
            })
            .on_timeout(a.on_timeout)
            .compensate_with(step(i))
        };
        let mut i = 0;
        while i < self.steps.len() {
            let stage = self.steps[i].stage;
            let end = self.steps[i..]
                .iter()
                .position(|s| s.stage != stage)
                .map_or(self.steps.len(), |p| i + p);
            // A stage of one is a plain step; with an odd seed, a compensatable one is
            // written as a group of one (which must behave, and be recorded, the same).
            let one = end - i == 1
                && (self.seed.is_multiple_of(2) || self.steps[i].kind != StepKind::Compensatable);
            if one {
                let s = &self.steps[i];
                b = match s.awaits {
                    Some(a) => b.await_event(NAMES[i], wait(i, a)),
                    None => b.step_with(NAMES[i], s.kind, step(i), options(s)),
                };
            } else {
                b = b.parallel(|mut g| {
                    for (j, s) in self.steps.iter().enumerate().take(end).skip(i) {
                        g = match s.awaits {
                            Some(a) => g.await_event(NAMES[j], wait(j, a)),
                            None => g.step_with(NAMES[j], s.kind, step(j), options(s)),
                        };
                    }
                    g
                });
            }
            i = end;
        }
        let def = b.build().map_err(|e| e.to_string())?;
        if def.step_stages().ne(self.stages()) {
            return Err(format!(
                "the definition has stages {:?}, the case {:?}",
                def.step_stages().collect::<Vec<_>>(),
                self.stages().collect::<Vec<_>>()
            ));
        }
        Ok(def)
    }

    /// The stage of each step.
    pub fn stages(&self) -> impl Iterator<Item = u32> + '_ {
        self.steps.iter().map(|s| s.stage)
    }

    /// The await step, if the definition has one.
    pub fn await_step(&self) -> Option<(usize, AwaitSpec)> {
        self.steps
            .iter()
            .enumerate()
            .find_map(|(i, s)| Some((i, s.awaits?)))
    }

    /// Whether some stage is a parallel group of two or more branches.
    pub fn has_groups(&self) -> bool {
        self.steps.windows(2).any(|w| w[0].stage == w[1].stage)
    }

    fn shape(&self) -> Vec<StepShape> {
        self.steps
            .iter()
            .enumerate()
            .map(|(i, s)| StepShape {
                name: NAMES[i].to_string(),
                kind: s.kind,
                idempotence: s.idempotence,
            })
            .collect()
    }

    fn script(&self, ledger: &Ledger) {
        for (i, saga) in self.sagas.iter().enumerate() {
            let tag = i.to_string();
            for (j, outcomes) in saga.action.iter().enumerate() {
                ledger.script_tagged(&tag, NAMES[j], sagaflow::Phase::Action, outcomes.clone());
            }
            for (j, outcomes) in saga.compensation.iter().enumerate() {
                ledger.script_tagged(
                    &tag,
                    NAMES[j],
                    sagaflow::Phase::Compensation,
                    outcomes.clone(),
                );
            }
        }
    }
}

/// Where a simulation keeps its sagas.
#[derive(Clone, Debug)]
pub enum SimStore {
    /// A [`MemLog`]: a crash drops what was not synced.
    Memory,
    /// A sled directory, reopened after every crash.
    Sled(PathBuf),
}

/// What a run left behind.
#[derive(Debug)]
pub struct RunReport {
    /// Every saga, observed after the run.
    pub sagas: Vec<ObservedSaga>,
    /// Sagas by start key, from the store.
    pub start_keys: BTreeMap<String, Vec<SagaId>>,
    /// Crashes that actually struck (a planned crash past the end of a run does not).
    pub crashes: u32,
    /// Where they struck.
    pub struck: Vec<CrashPoint>,
    /// Engines opened.
    pub incarnations: u32,
    /// Crashes after which the durable log showed two or more branches of one parallel
    /// group with an action attempt started and no result: crashes during fan-out.
    pub mid_fan_out: u32,
    /// Crashes after which the durable log showed two or more branches of one group with
    /// a compensation attempt started and no result: crashes during concurrent
    /// compensation.
    pub mid_compensation: u32,
    /// The durable store, byte for byte (memory runs only).
    pub dump: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// What retention did wrong once the run was over and two hours passed (a saga
    /// that had not ended deleted, or a finished one kept past its retention).
    pub retention: Vec<String>,
}

impl RunReport {
    /// Runs every checker.
    ///
    /// # Errors
    ///
    /// The first violation, as a sentence.
    pub fn check(&self) -> Result<(), String> {
        for s in &self.sagas {
            check::check_saga(s)?;
        }
        if let Some(v) = self.retention.first() {
            return Err(v.clone());
        }
        check::check_start_keys(&self.start_keys)
    }
}

/// Runs `case` on `store` and observes the result.
///
/// # Errors
///
/// A sentence if the run itself went wrong (an engine that would not open, a start or
/// a wait that failed without a crash, too many incarnations).
pub fn run_case(case: &Case, store: &SimStore) -> Result<RunReport, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(run(case, store, None))
}

/// Runs `case` from the state a previous run left in `mem` and `ledger`: for checking
/// that recovering twice is recovering once.
///
/// # Errors
///
/// As [`run_case`].
pub fn resume_case(
    case: &Case,
    mem: Arc<MemLog>,
    ledger: Arc<Ledger>,
    extra_recoveries: u32,
) -> Result<RunReport, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        // Open and drop engines that recover but do nothing else: the state must not
        // change.
        for _ in 0..extra_recoveries {
            let engine = engine(case, &ledger, mem.clone(), None).await?;
            drop(engine);
        }
        let resumed = Resume { mem, ledger };
        // From here on, no more crashes: a crash counts appends, and how writes group
        // into appends depends on scheduling, which the extra (aborted) engines shift.
        // The decisions and the records do not depend on it, and that is what must match.
        let rest = Case {
            crashes: Vec::new(),
            ..case.clone()
        };
        run(&rest, &SimStore::Memory, Some(resumed)).await
    })
}

struct Resume {
    mem: Arc<MemLog>,
    ledger: Arc<Ledger>,
}

fn clock() -> Arc<TokioClock> {
    Arc::new(TokioClock::starting_at(Timestamp::from_millis(
        1_700_000_000_000,
    )))
}

async fn engine(
    case: &Case,
    ledger: &Arc<Ledger>,
    store: Arc<dyn SagaLog>,
    clock: Option<Arc<TokioClock>>,
) -> Result<Engine, String> {
    let builder = Engine::builder()
        .seed(case.seed)
        .clock(clock.unwrap_or_else(self::clock))
        .options(
            EngineOptions::default()
                .with_commit_mode(CommitMode::RuntimeTask)
                .with_retention_task(Some(Duration::from_secs(600)), 50),
        )
        .register(case.definition(ledger)?);
    builder.open_with(store).await.map_err(|e| e.to_string())
}

async fn open_sled(dir: &Path) -> Result<Arc<SledLog>, String> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || SledLog::open_waiting(dir, Duration::from_secs(30)))
        .await
        .map_err(|e| e.to_string())?
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// State of one run across incarnations.
struct Run<'a> {
    case: &'a Case,
    ids: Vec<Option<SagaId>>,
    /// When the run began (virtual time): cancellations and deadlines count from it.
    began: Timestamp,
    clock: Arc<TokioClock>,
    /// Per saga, its event sender's progress: senders live outside the engine and
    /// outlast its incarnations.
    senders: Mutex<Vec<Sender>>,
}

/// A simulated sender of one saga's events.
#[derive(Clone, Debug, Default)]
struct Sender {
    /// When the saga's wait began and its deadline, once the log shows it.
    awaiting: Option<(Timestamp, Timestamp)>,
    /// The deliveries it was told were accepted, in order.
    acked: Vec<Acked>,
}

/// When saga `id`'s wait at `step` began, with its deadline (the first attempt's, kept
/// across restarts); `Err` if the saga ended (or parked) without waiting.
fn awaiting_in(
    engine: &Engine,
    id: SagaId,
    step: u32,
) -> Result<Option<(Timestamp, Timestamp)>, ()> {
    let Ok(history) = engine.history(id) else {
        return Ok(None);
    };
    let mut deadline = None;
    for r in &history {
        match &r.event {
            Event::StepAttemptStarted {
                step: s,
                deadline: d,
                ..
            } if *s == step => deadline = deadline.or(Some(*d)),
            Event::Awaiting { step: s, .. } if *s == step => {
                if let Some(d) = deadline {
                    return Ok(Some((r.at, d)));
                }
            }
            _ => {}
        }
    }
    match SagaState::fold(id, &history) {
        Ok(state) if state.status.is_final() || state.status == SagaStatus::Parked => Err(()),
        _ => Ok(None),
    }
}

impl<'a> Run<'a> {
    fn new(case: &'a Case, clock: Arc<TokioClock>) -> Self {
        Run {
            case,
            ids: vec![None; case.sagas.len()],
            began: clock.now(),
            clock,
            senders: Mutex::new(vec![Sender::default(); case.sagas.len()]),
        }
    }

    fn senders(&self) -> std::sync::MutexGuard<'_, Vec<Sender>> {
        self.senders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every acknowledged delivery so far.
    fn acked(&self) -> Vec<Acked> {
        self.senders()
            .iter()
            .flat_map(|s| s.acked.iter().cloned())
            .collect()
    }

    /// Saga `i`'s sender delivers `did`; `false` if it was not acknowledged (the
    /// process died: it is sent again to the next one).
    async fn deliver(&self, engine: &Engine, i: usize, did: &str) -> bool {
        let key = event_key(&i.to_string());
        match engine
            .deliver(&key, did, json!({ "event": did, "saga": i }))
            .await
        {
            Ok(_) => {
                let at = self.clock.now();
                self.senders()[i].acked.push(Acked {
                    key,
                    id: did.to_string(),
                    at,
                });
                true
            }
            Err(_) => false,
        }
    }

    /// Saga `i`'s sender, for the events it sends once the saga waits: watches the log
    /// for the wait, then delivers at the planned times. `false`: a delivery was not
    /// acknowledged.
    async fn send(&self, engine: &Engine, i: usize) -> bool {
        let Some((step, _)) = self.case.await_step() else {
            return true;
        };
        let Some(spec) = self.case.sagas.get(i) else {
            return true;
        };
        if matches!(spec.event, EventPlan::Before | EventPlan::Never) {
            return true;
        }
        let Some(id) = self.ids[i] else {
            return true;
        };
        let awaiting = loop {
            if let Some(a) = self.senders()[i].awaiting {
                break a;
            }
            match awaiting_in(engine, id, step as u32) {
                Ok(Some(a)) => {
                    self.senders()[i].awaiting = Some(a);
                    break a;
                }
                Ok(None) => {}
                Err(()) => return true,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let planned = spec.event.after_awaiting(awaiting.0, awaiting.1);
        loop {
            let n = self.senders()[i].acked.len();
            let Some(&(at, did)) = planned.get(n) else {
                return true;
            };
            self.clock.sleep_until(at).await;
            if !self.deliver(engine, i, did).await {
                return false;
            }
        }
    }

    /// Starts (again) every saga and waits for them all. `Ok(false)`: something failed,
    /// which is only allowed if the process crashed.
    async fn drive(&mut self, engine: &Engine) -> Result<bool, String> {
        let began = self.began;
        // Events that come before their sagas start (sent again until acknowledged).
        if self.case.await_step().is_some() {
            for i in 0..self.case.sagas.len() {
                let due = self.case.sagas[i].event == EventPlan::Before
                    && self.senders()[i].acked.is_empty();
                if due && !self.deliver(engine, i, "e1").await {
                    return Ok(false);
                }
            }
        }
        for i in 0..self.case.sagas.len() {
            let key = StartKey::new(format!("saga-{i}")).map_err(|e| e.to_string())?;
            let mut options = StartOptions::default().key(key);
            if let Some(d) = self.case.sagas[i].deadline_after {
                options = options.deadline(began.saturating_add(Duration::from_millis(d)));
            }
            match engine
                .start_with("sim", json!({ "tag": i.to_string() }), options)
                .await
                .map(|s| s.id())
            {
                Ok(id) => {
                    if let Some(prev) = self.ids[i] {
                        if prev != id {
                            return Err(format!(
                                "G6: start key saga-{i} gave {id} after it gave {prev}"
                            ));
                        }
                    }
                    self.ids[i] = Some(id);
                }
                Err(_) => return Ok(false),
            }
        }
        // Cancellations race the sagas at their times (virtual, from the run's start);
        // a refused one (the saga passed its pivot, or ended) is part of the race.
        let mut cancels: Vec<(u64, SagaId)> = self
            .case
            .sagas
            .iter()
            .zip(&self.ids)
            .filter_map(|(spec, id)| Some((spec.cancel_after?, (*id)?)))
            .collect();
        cancels.sort();
        let clock = self.clock.clone();
        let cancelling = async {
            for (after, id) in cancels {
                let at = began.saturating_add(Duration::from_millis(after));
                clock.sleep_until(at).await;
                let _ = engine.cancel(id, "sim", "cancel racing a step").await;
            }
        };
        let waiting = async {
            for id in self.ids.iter().flatten() {
                if engine.wait(*id).await.is_err() {
                    return false;
                }
            }
            true
        };
        let this = &*self;
        // At most 4 sagas.
        let sending = async {
            let (a, b, c, d) = tokio::join!(
                this.send(engine, 0),
                this.send(engine, 1),
                this.send(engine, 2),
                this.send(engine, 3)
            );
            a && b && c && d
        };
        let (done, (), sent) = tokio::join!(waiting, cancelling, sending);
        Ok(done && sent)
    }
}

async fn run(case: &Case, store: &SimStore, resume: Option<Resume>) -> Result<RunReport, String> {
    let (mem, ledger) = match resume {
        Some(r) => (r.mem, r.ledger),
        None => {
            let ledger = Ledger::new();
            case.script(&ledger);
            (Arc::new(MemLog::new()), ledger)
        }
    };
    let clock = clock();
    let mut state = Run::new(case, clock.clone());
    let mut crashes = case.crashes.iter().copied();
    let (mut struck, mut incarnations) = (0u32, 0u32);
    let (mut mid_fan_out, mut mid_compensation) = (0u32, 0u32);
    let mut points = Vec::new();
    loop {
        incarnations += 1;
        if incarnations as usize > case.crashes.len() + 1 {
            return Err("a run without a planned crash did not finish".into());
        }
        let planned = crashes.next();
        let plan = CrashPlan::new(planned);
        ledger.set_crash_plan(Some(plan.clone()));
        let inner: Arc<dyn SagaLog> = match store {
            SimStore::Memory => mem.clone(),
            SimStore::Sled(dir) => open_sled(dir).await?,
        };
        if incarnations > 1 {
            // What the crash left durable: how many branches of a group it interrupted.
            let (fan_out, compensation) = in_flight_branches(&*inner)?;
            mid_fan_out += u32::from(fan_out >= 2);
            mid_compensation += u32::from(compensation >= 2);
        }
        let store_c = CrashableStore::new(inner, plan.clone());
        let engine = match engine(case, &ledger, store_c, Some(clock.clone())).await {
            Ok(e) => e,
            Err(_) if plan.crashed() => {
                struck += 1;
                points.extend(planned.map(|c| c.point));
                if matches!(store, SimStore::Memory) {
                    mem.crash();
                }
                continue;
            }
            Err(e) => return Err(format!("the engine did not open: {e}")),
        };
        // `biased`: tokio's select otherwise picks a branch at random, which would make
        // two runs of one seed differ.
        let finished = tokio::select! {
            biased;
            r = state.drive(&engine) => r?,
            () = plan.wait_crashed() => false,
        };
        if plan.crashed() {
            struck += 1;
            points.extend(planned.map(|c| c.point));
            drop(engine);
            if matches!(store, SimStore::Memory) {
                mem.crash();
            }
            continue;
        }
        if !finished {
            return Err("a start or a wait failed without a crash".into());
        }
        if matches!(store, SimStore::Sled(_)) {
            // Observed below, once the directory is let go of.
            engine.shutdown().await.map_err(|e| e.to_string())?;
            drop(engine);
            break;
        }
        // Observed before retention may delete anything (every write is synced, so the
        // durable store is complete), then two hours pass with the engine open: every
        // finished saga (retention 1 h) goes, nothing else does.
        let mut report = observe(
            case,
            &state.ids,
            &state.acked(),
            &*mem,
            &ledger,
            struck,
            incarnations,
        )?;
        report.dump = Some(mem.dump());
        tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
        let mut retention = Vec::new();
        for s in &report.sagas {
            let gone = matches!(engine.status(s.id), Err(sagaflow::Error::UnknownSaga(_)));
            let finished = s.status.is_some_and(SagaStatus::is_final);
            if finished && !gone {
                retention.push(format!("saga {} ended 2 h ago and was not deleted", s.id));
            }
            if !finished && gone {
                retention.push(format!(
                    "saga {} was deleted although it had not ended ({:?})",
                    s.id, s.status
                ));
            }
        }
        engine.shutdown().await.map_err(|e| e.to_string())?;
        ledger.set_crash_plan(None);
        report.struck = points;
        report.retention = retention;
        report.mid_fan_out = mid_fan_out;
        report.mid_compensation = mid_compensation;
        return Ok(report);
    }
    ledger.set_crash_plan(None);

    let final_store: Arc<dyn SagaLog> = match store {
        SimStore::Memory => mem.clone(),
        SimStore::Sled(dir) => open_sled(dir).await?,
    };
    observe(
        case,
        &state.ids,
        &state.acked(),
        &*final_store,
        &ledger,
        struck,
        incarnations,
    )
    .map(|mut r| {
        r.struck = points;
        r.mid_fan_out = mid_fan_out;
        r.mid_compensation = mid_compensation;
        r
    })
}

/// The most branches of one stage of one saga in `store` with an action attempt in
/// flight (started, no result), and the most with a compensation attempt in flight.
fn in_flight_branches(store: &dyn SagaLog) -> Result<(usize, usize), String> {
    use sagaflow::machine::{Progress, SagaState};
    let err = |e: sagaflow::store::Error| e.to_string();
    let (mut actions, mut compensations) = (0, 0);
    for status in SagaStatus::ALL {
        for id in store.with_status(status).map_err(err)? {
            let log = sagaflow::store::codec::decode_log(id, &store.read(id).map_err(err)?)
                .map_err(err)?;
            let state = SagaState::fold(id, &log).map_err(|e| e.to_string())?;
            let mut i = 0;
            while i < state.steps.len() {
                let stage = state.stage_steps(i);
                let in_flight = |p: fn(&sagaflow::machine::StepState) -> &Progress| {
                    state.steps[stage.clone()]
                        .iter()
                        .filter(|s| matches!(p(s), Progress::InFlight { .. }))
                        .count()
                };
                actions = actions.max(in_flight(|s| &s.action));
                compensations = compensations.max(in_flight(|s| &s.compensation));
                i = stage.end.max(i + 1);
            }
        }
    }
    Ok((actions, compensations))
}

fn observe(
    case: &Case,
    ids: &[Option<SagaId>],
    acked: &[Acked],
    store: &dyn SagaLog,
    ledger: &Ledger,
    crashes: u32,
    incarnations: u32,
) -> Result<RunReport, String> {
    let err = |e: sagaflow::store::Error| e.to_string();
    let mut start_keys: BTreeMap<String, Vec<SagaId>> = BTreeMap::new();
    let mut all = Vec::new();
    for status in SagaStatus::ALL {
        all.extend(store.with_status(status).map_err(err)?);
    }
    for id in &all {
        if let Some(m) = store.meta(*id).map_err(err)? {
            if let Some(k) = m.start_key {
                start_keys.entry(k.to_string()).or_default().push(*id);
            }
        }
    }
    let calls = ledger.calls();
    let inbox = match case.await_step() {
        Some(_) => store
            .inbox()
            .deliveries(None, 100_000)
            .map_err(|e| format!("the inbox could not be read: {e}"))?,
        None => Vec::new(),
    };
    let mut sagas = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let id = id.ok_or_else(|| format!("saga {i} was never started"))?;
        let mut saga = ObservedSaga::read(store, id, case.shape(), &calls)?
            .with_stages(case.stages().collect());
        if let Some((step, spec)) = case.await_step() {
            saga = saga.with_events(AwaitObservation {
                step: step as u32,
                key: event_key(&i.to_string()),
                on_timeout: spec.on_timeout,
                acknowledged: acked.to_vec(),
                inbox: inbox.clone(),
            });
        }
        sagas.push(saga);
    }
    // A call for a saga nobody knows would be an effect without a durable start.
    if let Some(c) = calls.iter().find(|c| {
        !sagas
            .iter()
            .any(|s| c.key.starts_with(&format!("{}/", s.id)))
    }) {
        return Err(format!("a call with key {} belongs to no saga", c.key));
    }
    Ok(RunReport {
        sagas,
        start_keys,
        crashes,
        struck: Vec::new(),
        incarnations,
        mid_fan_out: 0,
        mid_compensation: 0,
        dump: None,
        retention: Vec::new(),
    })
}

/// A store and a ledger as a crash left them.
pub type Crashed = (Arc<MemLog>, Arc<Ledger>);

/// Runs a case until its first crash only, and returns the store and the ledger as
/// that crash left them.
///
/// # Errors
///
/// As [`run_case`].
pub fn run_to_first_crash(case: &Case) -> Result<Option<Crashed>, String> {
    let Some(first) = case.crashes.first().copied() else {
        return Ok(None);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let ledger = Ledger::new();
        case.script(&ledger);
        let mem = Arc::new(MemLog::new());
        let plan = CrashPlan::new(Some(first));
        ledger.set_crash_plan(Some(plan.clone()));
        let clock = clock();
        let engine = engine(
            case,
            &ledger,
            CrashableStore::new(mem.clone(), plan.clone()),
            Some(clock.clone()),
        )
        .await;
        if let Ok(engine) = engine {
            let mut state = Run::new(case, clock);
            tokio::select! {
                biased;
                r = state.drive(&engine) => { r?; }
                () = plan.wait_crashed() => {}
            }
            drop(engine);
        }
        if !plan.crashed() {
            return Ok(None);
        }
        ledger.set_crash_plan(None);
        mem.crash();
        Ok(Some((mem, ledger)))
    })
}

/// Runs `case` in memory, checks every invariant, checks that a second run gives a
/// byte-identical store (G4), and that recovering from its first crash twice gives the
/// same store as recovering once.
///
/// # Errors
///
/// The first violation, as a sentence.
pub fn run_and_check(case: &Case) -> Result<RunReport, String> {
    let report = run_case(case, &SimStore::Memory)?;
    report.check()?;
    let again = run_case(case, &SimStore::Memory)?;
    if again.dump != report.dump {
        return Err("G4: the same seed gave a different log".into());
    }
    if let Some((mem, ledger)) = run_to_first_crash(case)? {
        let once = resume_case(case, Arc::new(mem.fork()), ledger.fork(), 0)?;
        once.check()?;
        let twice = resume_case(case, Arc::new(mem.fork()), ledger.fork(), 2)?;
        if once.dump != twice.dump {
            return Err("G4: recovering twice gave another log than recovering once".into());
        }
    }
    Ok(report)
}

/// Shrinks a failing case: the simplest case generated from `seed`'s tree that still
/// fails `fails`, tried at most `budget` times.
pub fn shrink(seed: u64, budget: u32, fails: impl Fn(&Case) -> bool) -> Case {
    let mut tree = Case::tree(seed);
    let mut last = tree.current();
    for _ in 0..budget {
        if fails(&tree.current()) {
            last = tree.current();
            if !tree.simplify() {
                break;
            }
        } else if !tree.complicate() {
            break;
        }
    }
    last
}
