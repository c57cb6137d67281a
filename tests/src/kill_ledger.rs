//! Reconciles the file ledger of the real-process kill tests (`sagaflow-crash-child`)
//! against a store: every order ended once, completed with every effect or compensated
//! with every effect undone, stage by stage in reverse order, and no effect belongs to a
//! saga the store does not know. Each saga's steps, kinds and stages are read from its
//! log's `started` record, so orders of any definition (with parallel groups or without)
//! reconcile alike.

use std::collections::{BTreeMap, BTreeSet};

use sagaflow::machine::SagaState;
use sagaflow::store::SagaLog;
use sagaflow::{SagaStatus, StartKey, StepKind};

/// What reconciliation counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Orders that completed.
    pub completed: u64,
    /// Orders that were compensated.
    pub compensated: u64,
    /// Orders with no saga, or whose saga did not end: lost.
    pub lost: u64,
    /// Start keys that made more than one saga, or effects applied where they must not
    /// be (kept after an undo, past a pivot that was never reached): doubled.
    pub doubled: u64,
    /// Undos that landed in the wrong order: a compensation of a step landed before the
    /// last undo of a step of a later stage (G5: the stages are undone in reverse order;
    /// the branches of one group in any order).
    pub misordered: u64,
    /// Orders of a definition with a parallel group that ended completed or compensated.
    pub with_groups: u64,
    /// Of those, compensated orders in which two or more branches of one group were
    /// undone.
    pub group_undos: u64,
    /// Ledger lines: calls that took effect.
    pub lines: usize,
    /// Distinct (saga, step, phase) effects among them; the rest are repeats of a key
    /// after a kill, which a service that honours keys absorbs.
    pub distinct: usize,
    /// The first problems found, for the failure message.
    pub problems: Vec<String>,
}

/// Reconciles `ledger` (lines `A <key>` for an action, `C <key>` for a compensation)
/// against `log` for orders `order-0 .. order-<sagas>`.
///
/// # Errors
///
/// A ledger line that does not parse, or a store that cannot be read.
pub fn reconcile(log: &dyn SagaLog, ledger: &str, sagas: u64) -> Result<Reconciled, String> {
    let mut r = Reconciled::default();
    let problem = |r: &mut Reconciled, p: String| {
        if r.problems.len() < 20 {
            r.problems.push(p);
        }
    };
    let mut applied: BTreeMap<String, BTreeSet<(String, char)>> = BTreeMap::new();
    // Where each (saga, step, tag) first and last landed in the ledger, in arrival order.
    let mut first_at: BTreeMap<(String, String, char), usize> = BTreeMap::new();
    let mut last_at: BTreeMap<(String, String, char), usize> = BTreeMap::new();
    for line in ledger.lines() {
        let (tag, key) = line
            .split_once(' ')
            .ok_or_else(|| format!("a ledger line is `<A|C> <key>`: {line}"))?;
        let tag = tag.chars().next().ok_or("a tag")?;
        let mut parts = key.split('/');
        let (Some(saga), Some(step), Some(phase)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("malformed key {key}"));
        };
        let want_phase = if tag == 'A' { "action" } else { "compensation" };
        if phase != want_phase {
            return Err(format!("tag and phase disagree: {line}"));
        }
        applied
            .entry(saga.to_string())
            .or_default()
            .insert((step.to_string(), tag));
        let at = (saga.to_string(), step.to_string(), tag);
        first_at.entry(at.clone()).or_insert(r.lines);
        last_at.insert(at, r.lines);
        r.lines += 1;
    }
    let err = |e: sagaflow::store::Error| e.to_string();
    let mut known = BTreeSet::new();
    for n in 0..sagas {
        let key = StartKey::new(format!("order-{n}")).map_err(|e| e.to_string())?;
        let Some(id) = log.find_start_key(&key).map_err(err)? else {
            r.lost += 1;
            problem(&mut r, format!("order-{n} was never started"));
            continue;
        };
        known.insert(id.to_string());
        let Some(meta) = log.meta(id).map_err(err)? else {
            r.lost += 1;
            problem(&mut r, format!("order-{n} has no summary"));
            continue;
        };
        let records =
            sagaflow::store::codec::decode_log(id, &log.read(id).map_err(err)?).map_err(err)?;
        let state = SagaState::fold(id, &records).map_err(|e| format!("order-{n}: {e}"))?;
        let steps: Vec<(&str, StepKind, u32)> = state
            .steps
            .iter()
            .zip(&state.kinds)
            .zip(&state.stages)
            .map(|((s, k), st)| (s.name.as_str(), *k, *st))
            .collect();
        let grouped = state.stages.windows(2).any(|w| w[0] == w[1]);
        let did = applied.get(&id.to_string()).cloned().unwrap_or_default();
        let has = |step: &str, tag: char| did.contains(&(step.to_string(), tag));
        let at = |map: &BTreeMap<(String, String, char), usize>, step: &str, tag| {
            map.get(&(id.to_string(), step.to_string(), tag)).copied()
        };
        match meta.status {
            SagaStatus::Completed => {
                r.completed += 1;
                r.with_groups += u64::from(grouped);
                for &(step, _, _) in &steps {
                    if !has(step, 'A') {
                        r.lost += 1;
                        problem(&mut r, format!("order-{n} completed without {step}"));
                    }
                    if has(step, 'C') {
                        r.doubled += 1;
                        problem(&mut r, format!("order-{n} completed but {step} was undone"));
                    }
                }
            }
            SagaStatus::Compensated => {
                r.compensated += 1;
                r.with_groups += u64::from(grouped);
                for &(step, kind, _) in &steps {
                    if kind != StepKind::Compensatable {
                        if has(step, 'A') {
                            r.doubled += 1;
                            problem(&mut r, format!("order-{n} passed the pivot ({step})"));
                        }
                        continue;
                    }
                    if !has(step, 'A') {
                        continue;
                    }
                    if !has(step, 'C') {
                        r.doubled += 1;
                        problem(&mut r, format!("order-{n}: {step} was left applied"));
                        continue;
                    }
                    // No effect kept: the last action landed before its undo, late
                    // arrivals included (the ledger does not remember undos).
                    if at(&last_at, step, 'A') > at(&last_at, step, 'C') {
                        r.doubled += 1;
                        problem(&mut r, format!("order-{n}: {step} landed after its undo"));
                    }
                }
                // Stage by stage: every undo of a later stage (a repeat after a kill
                // included) landed before the first undo of an earlier one.
                for &(early, _, k) in &steps {
                    let Some(first) = at(&first_at, early, 'C') else {
                        continue;
                    };
                    for &(late, _, _) in steps.iter().filter(|(_, _, l)| *l > k) {
                        if at(&last_at, late, 'C').is_some_and(|last| last > first) {
                            r.misordered += 1;
                            problem(
                                &mut r,
                                format!(
                                    "order-{n}: {early} (stage {k}) was undone before the \
                                     undo of {late}, of a later stage"
                                ),
                            );
                        }
                    }
                }
                let undone_in_a_group = steps.iter().any(|&(a, _, k)| {
                    has(a, 'C')
                        && steps
                            .iter()
                            .any(|&(b, _, l)| l == k && b != a && has(b, 'C'))
                });
                r.group_undos += u64::from(undone_in_a_group);
            }
            other => {
                r.lost += 1;
                problem(
                    &mut r,
                    format!("order-{n} ended {other}: {:?}", meta.reason),
                );
            }
        }
    }
    // One saga per start key: every saga in the store is one of ours.
    let mut in_store = 0u64;
    for status in SagaStatus::ALL {
        in_store += log.with_status(status).map_err(err)?.len() as u64;
    }
    if in_store > sagas {
        r.doubled += in_store - sagas;
        problem(
            &mut r,
            format!("{in_store} sagas in the store for {sagas} start keys"),
        );
    }
    for saga in applied.keys() {
        if !known.contains(saga) {
            r.doubled += 1;
            problem(&mut r, format!("an effect for unknown saga {saga}"));
        }
    }
    r.distinct = applied.values().map(BTreeSet::len).sum();
    Ok(r)
}
