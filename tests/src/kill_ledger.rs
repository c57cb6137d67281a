//! Reconciles the file ledger of the real-process kill tests (`sagaflow-crash-child`)
//! against a store: every order ended once, completed with every effect or compensated
//! with every effect undone, and no effect belongs to a saga the store does not know.

use std::collections::{BTreeMap, BTreeSet};

use sagaflow::store::SagaLog;
use sagaflow::{SagaStatus, StartKey};

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
    // Where each (saga, step, tag) last landed in the ledger, in arrival order.
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
        last_at.insert((saga.to_string(), step.to_string(), tag), r.lines);
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
        let did = applied.get(&id.to_string()).cloned().unwrap_or_default();
        let has = |step: &str, tag: char| did.contains(&(step.to_string(), tag));
        match meta.status {
            SagaStatus::Completed => {
                r.completed += 1;
                for step in ["reserve", "charge", "ship", "notify"] {
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
                for step in ["reserve", "charge"] {
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
                    let at = |tag| last_at[&(id.to_string(), step.to_string(), tag)];
                    if at('A') > at('C') {
                        r.doubled += 1;
                        problem(&mut r, format!("order-{n}: {step} landed after its undo"));
                    }
                }
                if has("ship", 'A') || has("notify", 'A') {
                    r.doubled += 1;
                    problem(&mut r, format!("order-{n} passed the pivot"));
                }
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
