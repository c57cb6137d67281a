//! Property-based crash-recovery simulations (see docs/testing.md).
//!
//! `SAGA_SIM_CASES` sets how many cases run (CI: the default), `SAGA_SIM_SEED` the first
//! seed. A failing case names its seed; `SAGA_SIM_SEED=<seed> SAGA_SIM_CASES=1` replays
//! exactly that case.

use std::collections::BTreeMap;

use sagaflow::SagaStatus;
use sagaflow_tests::crash::CrashPoint;
use sagaflow_tests::env_u64;
use sagaflow_tests::sim::{run_and_check, run_case, shrink, Case, SimStore};

fn seeds(cases_var: &str, default_cases: u64) -> Vec<u64> {
    let mut seeds: Vec<u64> = include_str!("../regressions/sim-seeds.txt")
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.parse().ok())
        .collect();
    let base = env_u64("SAGA_SIM_SEED", 0x5a6a_f10e);
    let n = env_u64(cases_var, default_cases);
    seeds.extend((0..n).map(|i| base.wrapping_add(i)));
    seeds
}

#[derive(Default, Debug)]
struct Totals {
    cases: u64,
    sagas: u64,
    crashes: u64,
    crash_points: BTreeMap<String, u64>,
    incarnations: u64,
    by_status: BTreeMap<String, u64>,
    /// Cases whose definition has a parallel group of two or more branches.
    with_groups: u64,
    /// Cases with a retriable group after the pivot.
    with_retriable_groups: u64,
    /// Crashes that left two or more branches of a group with actions in flight.
    mid_fan_out: u64,
    /// Crashes that left two or more branches of a group with compensations in flight.
    mid_compensation: u64,
    /// Cases whose definition has an await step, and those where it is a group's branch.
    with_awaits: u64,
    awaits_in_groups: u64,
    /// Sagas of such cases by when their event was planned (`before`, `during`, ...).
    event_plans: BTreeMap<&'static str, u64>,
    /// Of those, by what happened: the saga waited and took its event, waited and timed
    /// out, or never reached its wait.
    waits: BTreeMap<String, u64>,
    /// Deliveries acknowledged, and how many of them were duplicates by id.
    acknowledged: u64,
    /// Crashes right before and right after a delivery's durable write.
    delivery_crashes: u64,
}

/// What happened to saga `s`'s wait: `taken`, `timed_out` or `not_reached`, after
/// its plan's name.
fn wait_outcome(s: &sagaflow_tests::check::ObservedSaga, plan: &str) -> Option<String> {
    use sagaflow::machine::Event;
    let ev = s.events.as_ref()?;
    let mine = |step: &u32| *step == ev.step;
    let reached = s
        .history
        .iter()
        .any(|r| matches!(&r.event, Event::Awaiting { step, .. } if mine(step)));
    let taken = s
        .history
        .iter()
        .any(|r| matches!(&r.event, Event::EventReceived { step, .. } if mine(step)));
    let failed = s
        .history
        .iter()
        .any(|r| matches!(&r.event, Event::StepFailed { step, .. } if mine(step)));
    let what = match (reached, taken, failed) {
        (false, _, _) => "not_reached",
        (true, true, _) => "taken",
        (true, false, true) => "timed_out",
        (true, false, false) => "in_flight",
    };
    Some(format!("{plan}/{what}"))
}

/// Steps of the simulations panic on purpose; keep their messages out of the output,
/// and everything else in it.
fn quiet_step_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if !msg.ends_with(" blew up") {
            default(info);
        }
    }));
}

#[test]
fn simulated_crashes_keep_every_guarantee() {
    quiet_step_panics();
    let mut t = Totals::default();
    for seed in seeds("SAGA_SIM_CASES", 400) {
        let case = Case::from_seed(seed);
        match run_and_check(&case) {
            Ok(r) => {
                t.cases += 1;
                t.with_groups += u64::from(case.has_groups());
                t.with_retriable_groups += u64::from(case.steps.windows(2).any(|w| {
                    w[0].stage == w[1].stage && w[0].kind == sagaflow::StepKind::Retriable
                }));
                t.mid_fan_out += u64::from(r.mid_fan_out);
                t.mid_compensation += u64::from(r.mid_compensation);
                if let Some((step, _)) = case.await_step() {
                    t.with_awaits += 1;
                    t.awaits_in_groups += u64::from(
                        case.steps
                            .iter()
                            .enumerate()
                            .any(|(i, s)| i != step && s.stage == case.steps[step].stage),
                    );
                    for (spec, s) in case.sagas.iter().zip(&r.sagas) {
                        *t.event_plans.entry(spec.event.name()).or_default() += 1;
                        if let Some(w) = wait_outcome(s, spec.event.name()) {
                            *t.waits.entry(w).or_default() += 1;
                        }
                    }
                    if let Some(ev) = r.sagas.first().and_then(|s| s.events.as_ref()) {
                        t.acknowledged += ev.acknowledged.len() as u64;
                    }
                }
                t.delivery_crashes += r
                    .struck
                    .iter()
                    .filter(|p| CrashPoint::DELIVERY.contains(p))
                    .count() as u64;
                t.crashes += u64::from(r.crashes);
                for p in &r.struck {
                    *t.crash_points.entry(format!("{p:?}")).or_default() += 1;
                }
                t.incarnations += u64::from(r.incarnations);
                for s in &r.sagas {
                    t.sagas += 1;
                    let status = s.status.map_or("none".to_string(), |st| st.to_string());
                    *t.by_status.entry(status).or_default() += 1;
                }
            }
            Err(why) => {
                let small = shrink(seed, 300, |c| run_and_check(c).is_err());
                let small_why = run_and_check(&small).err().unwrap_or_default();
                panic!(
                    "simulation seed {seed} failed: {why}\n\
                     replay: SAGA_SIM_SEED={seed} SAGA_SIM_CASES=1 cargo test -p sagaflow-tests --test sim\n\
                     shrunk case ({small_why}):\n{small:#?}"
                );
            }
        }
    }
    eprintln!("simulation totals: {t:?}");
    assert!(t.crashes > 0, "the simulations must actually crash");
    assert_eq!(
        t.crash_points.len(),
        6,
        "every crash point must strike (deliveries' too): {t:?}"
    );
    // Await steps, and every way an event can come, including never.
    assert!(
        t.with_awaits * 5 >= t.cases,
        "await steps are common: {t:?}"
    );
    assert!(t.awaits_in_groups > 0, "an await step in a group: {t:?}");
    for plan in [
        "before",
        "during",
        "after",
        "twice_same_id",
        "twice_new_id",
        "never",
    ] {
        assert!(
            t.waits.contains_key(&format!("{plan}/timed_out"))
                || t.waits.contains_key(&format!("{plan}/taken")),
            "some saga must wait with its event planned `{plan}`: {t:?}"
        );
    }
    for w in [
        "during/taken",
        "before/taken",
        "after/timed_out",
        "never/timed_out",
    ] {
        assert!(t.waits.contains_key(w), "{w} must happen: {t:?}");
    }
    assert!(t.by_status.contains_key(SagaStatus::Compensated.as_str()));
    assert!(t.by_status.contains_key(SagaStatus::Completed.as_str()));
    // Groups are common, and crashes strike them where recovery is hardest: with several
    // branches in flight forward, and several compensations in flight at once.
    assert!(
        t.with_groups * 2 >= t.cases,
        "at least half the cases must have a parallel group: {t:?}"
    );
    assert!(t.with_retriable_groups > 0, "a retriable group: {t:?}");
    assert!(
        t.mid_fan_out > 0,
        "some crash must interrupt two branches of a group: {t:?}"
    );
    assert!(
        t.mid_compensation > 0,
        "some crash must interrupt two compensations of a group: {t:?}"
    );
}

#[test]
fn the_same_properties_hold_on_sled_with_real_reopens() {
    quiet_step_panics();
    let (mut crashes, mut groups, mut awaits) = (0, 0, 0);
    for seed in seeds("SAGA_SIM_SLED_CASES", 12) {
        let case = Case::from_seed(seed);
        let dir = tempfile::tempdir().expect("temp dir");
        let report = run_case(&case, &SimStore::Sled(dir.path().to_path_buf()))
            .unwrap_or_else(|e| panic!("sled simulation seed {seed}: {e}"));
        if let Err(why) = report.check() {
            panic!("sled simulation seed {seed} failed: {why}\n{case:#?}");
        }
        crashes += report.crashes;
        groups += u32::from(case.has_groups());
        awaits += u32::from(case.await_step().is_some());
    }
    eprintln!(
        "sled simulations: {crashes} crashes, {groups} cases with parallel groups, {awaits} with \
         await steps"
    );
}
