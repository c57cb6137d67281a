//! Property-based crash-recovery simulations (see docs/testing.md).
//!
//! `SAGA_SIM_CASES` sets how many cases run (CI: the default), `SAGA_SIM_SEED` the first
//! seed. A failing case names its seed; `SAGA_SIM_SEED=<seed> SAGA_SIM_CASES=1` replays
//! exactly that case.

use std::collections::BTreeMap;

use sagaflow::SagaStatus;
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
        4,
        "every crash point must strike: {t:?}"
    );
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
    let (mut crashes, mut groups) = (0, 0);
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
    }
    eprintln!("sled simulations: {crashes} crashes, {groups} cases with parallel groups");
}
