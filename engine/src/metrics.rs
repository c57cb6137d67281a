//! Prometheus metrics of an engine, in the OpenMetrics text format.
//!
//! Counters and histograms are updated where things happen (a saga starts, an attempt
//! runs or fails, a saga ends); the gauges that describe the whole store (in-flight
//! sagas, the age of the oldest active saga, stuck sagas) are refreshed when the metrics
//! are rendered and by the stuck-saga watchdog.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::executor::CommitStats;
use crate::ids::Phase;
use crate::machine::FailureKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DefLabels {
    definition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    definition: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    definition: String,
    step: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailLabels {
    definition: String,
    step: String,
    phase: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriftLabels {
    definition: String,
    step: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IntegrationLabels {
    integration: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn saga_buckets() -> Histogram {
    // 1 ms to about 9 hours.
    Histogram::new(exponential_buckets(0.001, 2.0, 25))
}

fn attempt_buckets() -> Histogram {
    // 1 ms to about 1 hour.
    Histogram::new(exponential_buckets(0.001, 2.0, 22))
}

pub(crate) struct Metrics {
    registry: Registry,
    started: Family<DefLabels, Counter>,
    ended: Family<EndLabels, Counter>,
    attempts: Family<StepLabels, Counter>,
    failures: Family<FailLabels, Counter>,
    saga_seconds: HistogramFamily<DefLabels>,
    attempt_seconds: HistogramFamily<StepLabels>,
    repairs: Family<EndLabels, Counter>,
    pub(crate) in_flight: Gauge,
    pub(crate) oldest_active_seconds: Gauge,
    pub(crate) stuck: Gauge,
    commits: Counter,
    durable_writes: Counter,
    deleted: Counter,
    claimed: Counter,
    deliveries: Counter,
    leases: Gauge,
    drifts: Family<DriftLabels, Counter>,
    lookups: Family<IntegrationLabels, Counter>,
    seen_commits: AtomicU64,
    seen_writes: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("sagaflow");
        let m = Metrics {
            started: Family::default(),
            ended: Family::default(),
            attempts: Family::default(),
            failures: Family::default(),
            saga_seconds: Family::new_with_constructor(saga_buckets),
            attempt_seconds: Family::new_with_constructor(attempt_buckets),
            repairs: Family::default(),
            in_flight: Gauge::default(),
            oldest_active_seconds: Gauge::default(),
            stuck: Gauge::default(),
            commits: Counter::default(),
            durable_writes: Counter::default(),
            deleted: Counter::default(),
            claimed: Counter::default(),
            deliveries: Counter::default(),
            leases: Gauge::default(),
            drifts: Family::default(),
            lookups: Family::default(),
            seen_commits: AtomicU64::new(0),
            seen_writes: AtomicU64::new(0),
            registry: Registry::default(),
        };
        registry.register("sagas_started", "Sagas started", m.started.clone());
        registry.register(
            "reconcile_drift",
            "Drifts the reconciler recorded: a system disagrees with a finished saga's log",
            m.drifts.clone(),
        );
        registry.register(
            "reconcile_lookups",
            "Lookups the reconciler made, by integration",
            m.lookups.clone(),
        );
        registry.register(
            "deliveries",
            "Events accepted for await steps (duplicates not counted)",
            m.deliveries.clone(),
        );
        registry.register(
            "sagas_ended",
            "Sagas that ended, by outcome (completed, compensated, parked, resolved)",
            m.ended.clone(),
        );
        registry.register(
            "step_attempts",
            "Attempts of step actions and compensations",
            m.attempts.clone(),
        );
        registry.register(
            "step_failures",
            "Failed attempts, by kind of failure",
            m.failures.clone(),
        );
        registry.register(
            "saga_duration_seconds",
            "Time from a saga's start to its end (completed or compensated)",
            m.saga_seconds.clone(),
        );
        registry.register(
            "step_attempt_duration_seconds",
            "Time one attempt of a step took",
            m.attempt_seconds.clone(),
        );
        registry.register(
            "repairs",
            "Operator repairs applied, by action",
            m.repairs.clone(),
        );
        registry.register(
            "sagas_in_flight",
            "Sagas this engine is driving",
            m.in_flight.clone(),
        );
        registry.register(
            "oldest_active_saga_age_seconds",
            "Age of the oldest saga still running or compensating",
            m.oldest_active_seconds.clone(),
        );
        registry.register(
            "stuck_sagas",
            "Active sagas with no transition for longer than the stuck threshold",
            m.stuck.clone(),
        );
        registry.register(
            "group_commits",
            "Durable group commits (one sync each)",
            m.commits.clone(),
        );
        registry.register(
            "durable_writes",
            "Atomic saga writes made durable",
            m.durable_writes.clone(),
        );
        registry.register(
            "sagas_deleted",
            "Finished sagas deleted by retention",
            m.deleted.clone(),
        );
        registry.register(
            "sagas_claimed",
            "Sagas claimed by this process in a shared store: at open, from a process whose lease expired, or handed back and now due",
            m.claimed.clone(),
        );
        registry.register(
            "leases_held",
            "Saga leases this process held at its last renewal (shared store)",
            m.leases.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a saga claimed from another (dead or stalled) process, in a shared store.
    pub(crate) fn claimed(&self) {
        self.claimed.inc();
    }

    /// The number of leases this process held at its last renewal.
    pub(crate) fn leases_held(&self, n: usize) {
        self.leases.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts a drift the reconciler recorded.
    pub(crate) fn drift(&self, definition: &str, step: &str, kind: crate::machine::DriftKind) {
        self.drifts
            .get_or_create(&DriftLabels {
                definition: definition.to_string(),
                step: step.to_string(),
                kind: kind.name().to_string(),
            })
            .inc();
    }

    /// Counts a lookup the reconciler made.
    pub(crate) fn reconcile_lookup(&self, integration: &str) {
        self.lookups
            .get_or_create(&IntegrationLabels {
                integration: integration.to_string(),
            })
            .inc();
    }

    /// Counts finished sagas deleted by the retention task.
    pub(crate) fn deleted(&self, n: u64) {
        self.deleted.inc_by(n);
    }

    pub(crate) fn started(&self, definition: &str) {
        self.started
            .get_or_create(&DefLabels {
                definition: definition.to_string(),
            })
            .inc();
    }

    pub(crate) fn ended(&self, definition: &str, outcome: &str, seconds: Option<f64>) {
        self.ended
            .get_or_create(&EndLabels {
                definition: definition.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        if let Some(s) = seconds {
            self.saga_seconds
                .get_or_create(&DefLabels {
                    definition: definition.to_string(),
                })
                .observe(s);
        }
    }

    pub(crate) fn attempt(
        &self,
        definition: &str,
        step: &str,
        phase: Phase,
        seconds: f64,
        failure: Option<FailureKind>,
    ) {
        let labels = StepLabels {
            definition: definition.to_string(),
            step: step.to_string(),
            phase: phase.as_str().to_string(),
        };
        self.attempts.get_or_create(&labels).inc();
        self.attempt_seconds.get_or_create(&labels).observe(seconds);
        if let Some(kind) = failure {
            let kind = serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{kind:?}"));
            self.failures
                .get_or_create(&FailLabels {
                    definition: labels.definition,
                    step: labels.step,
                    phase: labels.phase,
                    kind,
                })
                .inc();
        }
    }

    pub(crate) fn delivered(&self) {
        self.deliveries.inc();
    }

    pub(crate) fn repaired(&self, definition: &str, action: &str) {
        self.repairs
            .get_or_create(&EndLabels {
                definition: definition.to_string(),
                outcome: action.to_string(),
            })
            .inc();
    }

    /// Renders every metric; `commits` brings the group-commit counters up to date.
    pub(crate) fn render(&self, commits: CommitStats) -> String {
        let catch_up = |seen: &AtomicU64, counter: &Counter, now: u64| {
            let before = seen.swap(now, Ordering::Relaxed);
            counter.inc_by(now.saturating_sub(before));
        };
        catch_up(&self.seen_commits, &self.commits, commits.batches);
        catch_up(&self.seen_writes, &self.durable_writes, commits.writes);
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
