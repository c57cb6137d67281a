//! Several engines over one shared store, under virtual time (G9): leases expire, a
//! process crashes and its sagas are taken over, a process cut off from the store past
//! its lease comes back as a zombie whose writes are refused, and the same seed gives
//! the same log.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use sagaflow::store::{
    codec, Answer, CheckReport, Lease, Leases, MemLog, OwnerId, Refused, Request, SagaLog,
    SagaMeta, Write, WriteResult,
};
use sagaflow::{
    Clock, CommitMode, Engine, EngineOptions, Idempotence, Lsn, Phase, SagaId, SagaStatus,
    StartKey, StepKind, Timestamp, TokioClock,
};
use sagaflow_tests::check::{check_saga, check_start_keys, ObservedSaga, StepShape};
use sagaflow_tests::{checkout, Ledger, Outcome};

const TTL: Duration = Duration::from_secs(2);

/// A shared store as one process sees it: while `cut`, its lease calls (renew, claim,
/// requests) fail, as they would for a process stalled or partitioned from the
/// database; its writes still arrive (late), which is what fencing is for.
#[derive(Debug)]
struct Cut {
    inner: Arc<MemLog>,
    cut: AtomicBool,
}

impl Cut {
    fn new(inner: Arc<MemLog>) -> Arc<Self> {
        Arc::new(Cut {
            inner,
            cut: AtomicBool::new(false),
        })
    }

    fn refuse(&self) -> sagaflow::store::Result<()> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(sagaflow::store::Error::Injected(
                "cut off from the store".into(),
            ));
        }
        Ok(())
    }
}

impl SagaLog for Cut {
    fn inbox(&self) -> &dyn sagaflow::store::Inbox {
        self
    }
    fn append(&self, writes: Vec<Write>) -> sagaflow::store::Result<()> {
        self.inner.append(writes)
    }
    fn append_each(&self, writes: Vec<Write>) -> sagaflow::store::Result<Vec<WriteResult>> {
        self.inner.append_each(writes)
    }
    fn sync(&self) -> sagaflow::store::Result<()> {
        self.inner.sync()
    }
    fn read(&self, saga: SagaId) -> sagaflow::store::Result<Vec<(Lsn, Vec<u8>)>> {
        self.inner.read(saga)
    }
    fn meta(&self, saga: SagaId) -> sagaflow::store::Result<Option<SagaMeta>> {
        self.inner.meta(saga)
    }
    fn with_status(&self, status: SagaStatus) -> sagaflow::store::Result<Vec<SagaId>> {
        self.inner.with_status(status)
    }
    fn find_start_key(&self, key: &StartKey) -> sagaflow::store::Result<Option<SagaId>> {
        self.inner.find_start_key(key)
    }
    fn due(&self, until: Timestamp) -> sagaflow::store::Result<Vec<(Timestamp, SagaId)>> {
        self.inner.due(until)
    }
    fn finished_before(
        &self,
        until: Timestamp,
        after: Option<(Timestamp, SagaId)>,
        limit: usize,
    ) -> sagaflow::store::Result<Vec<(Timestamp, SagaId)>> {
        self.inner.finished_before(until, after, limit)
    }
    fn position(&self, name: &str) -> sagaflow::store::Result<Option<(Timestamp, SagaId)>> {
        self.inner.position(name)
    }
    fn set_position(&self, name: &str, at: (Timestamp, SagaId)) -> sagaflow::store::Result<()> {
        self.inner.set_position(name, at)
    }
    fn remove(&self, saga: SagaId) -> sagaflow::store::Result<()> {
        self.inner.remove(saga)
    }
    fn check(&self) -> sagaflow::store::Result<CheckReport> {
        self.inner.check()
    }
    fn leases(&self) -> Option<&dyn Leases> {
        Some(self)
    }
}

impl Leases for Cut {
    fn ttl(&self) -> Duration {
        TTL
    }
    fn claim(
        &self,
        owner: &OwnerId,
        limit: usize,
        definitions: &[String],
    ) -> sagaflow::store::Result<Vec<Lease>> {
        self.refuse()?;
        self.inner.claim(owner, limit, definitions)
    }
    fn acquire(&self, owner: &OwnerId, saga: SagaId) -> sagaflow::store::Result<Option<Lease>> {
        self.refuse()?;
        self.inner.acquire(owner, saga)
    }
    fn renew(&self, owner: &OwnerId) -> sagaflow::store::Result<Vec<Lease>> {
        self.refuse()?;
        self.inner.renew(owner)
    }
    fn release(
        &self,
        owner: &OwnerId,
        lease: Lease,
        wake_at: Option<Timestamp>,
    ) -> sagaflow::store::Result<()> {
        self.inner.release(owner, lease, wake_at)
    }
    fn holder(&self, saga: SagaId) -> sagaflow::store::Result<Option<(OwnerId, u64)>> {
        self.inner.holder(saga)
    }
    fn request(
        &self,
        saga: SagaId,
        action: &str,
        operator: &str,
        reason: &str,
    ) -> sagaflow::store::Result<u64> {
        self.inner.request(saga, action, operator, reason)
    }
    fn requests_for(&self, owner: &OwnerId) -> sagaflow::store::Result<Vec<Request>> {
        self.refuse()?;
        self.inner.requests_for(owner)
    }
    fn answer(&self, id: u64, answer: &Answer) -> sagaflow::store::Result<bool> {
        self.inner.answer(id, answer)
    }
    fn answer_of(&self, id: u64) -> sagaflow::store::Result<Option<Answer>> {
        self.inner.answer_of(id)
    }
}

/// A virtual clock, a shared store whose leases it times, and the services' ledger.
fn world() -> (Arc<dyn Clock>, Arc<MemLog>, Arc<Ledger>) {
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(Timestamp::from_millis(
        1_700_000_000_000,
    )));
    let store = Arc::new(MemLog::shared(clock.clone(), TTL));
    (clock, store, Ledger::new())
}

async fn open(
    name: &str,
    store: Arc<dyn SagaLog>,
    clock: &Arc<dyn Clock>,
    ledger: &Arc<Ledger>,
    seed: u64,
) -> Engine {
    open_with(name, checkout(ledger), store, clock, seed).await
}

/// An engine named `name` with `def` registered on the shared `store`.
async fn open_with(
    name: &str,
    def: sagaflow::SagaDefinition,
    store: Arc<dyn SagaLog>,
    clock: &Arc<dyn Clock>,
    seed: u64,
) -> Engine {
    Engine::builder()
        .register(def)
        .clock(clock.clone())
        .seed(seed)
        .owner(OwnerId::new(name))
        .options(
            EngineOptions::default()
                .with_commit_mode(CommitMode::RuntimeTask)
                .with_lease_tick(Duration::from_millis(200)),
        )
        .open_with(store)
        .await
        .expect("engine opens on the shared store")
}

fn shape() -> Vec<StepShape> {
    ["payment", "inventory", "order"]
        .into_iter()
        .map(|n| StepShape {
            name: n.into(),
            kind: StepKind::Compensatable,
            idempotence: Idempotence::Idempotent,
        })
        .collect()
}

/// Checks every saga against G2–G5, start keys against G6, and fencing against G9: per
/// saga, the epochs of accepted writes never go down along the log, and each epoch was
/// written by one owner only.
fn check_all(store: &MemLog, ledger: &Ledger, ids: &[SagaId]) -> Result<(), String> {
    let calls = ledger.calls();
    let mut keys: BTreeMap<String, Vec<SagaId>> = BTreeMap::new();
    for id in ids {
        let meta = store.meta(*id).map_err(|e| e.to_string())?;
        if let Some(k) = meta.as_ref().and_then(|m| m.start_key.clone()) {
            keys.entry(k.to_string()).or_default().push(*id);
        }
        check_saga(&ObservedSaga::read(store, *id, shape(), &calls)?)?;
    }
    for ids in keys.values_mut() {
        ids.dedup();
    }
    check_start_keys(&keys)?;
    let mut last: BTreeMap<SagaId, (u64, Option<Lsn>)> = BTreeMap::new();
    let mut writer: BTreeMap<(SagaId, u64), OwnerId> = BTreeMap::new();
    for (saga, lsn, owner, epoch) in store.accepted_fences() {
        if let Some((e, l)) = last.get(&saga) {
            if epoch < *e {
                return Err(format!(
                    "saga {saga}: a write of epoch {epoch} was accepted after one of epoch {e} \
                     (at lsn {l:?})"
                ));
            }
        }
        last.insert(saga, (epoch, lsn));
        if let Some(w) = writer.insert((saga, epoch), owner.clone()) {
            if w != owner {
                return Err(format!(
                    "saga {saga}: epoch {epoch} was written by {w} and by {owner}"
                ));
            }
        }
    }
    Ok(())
}

struct Run {
    dump: Vec<(Vec<u8>, Vec<u8>)>,
    refused: Vec<Refused>,
    zombie: SagaId,
    claimed_by_b_or_c: usize,
    ended: usize,
}

/// Three engines; A crashes with sagas in flight and restarts as a new owner, C is cut
/// off from the store past its lease while an attempt hangs, then comes back. Every saga
/// must end, once.
async fn scenario(seed: u64) -> Run {
    let (clock, store, ledger) = world();
    let c_view = Cut::new(store.clone());
    let a = open("A", store.clone(), &clock, &ledger, seed).await;
    let b = open("B", store.clone(), &clock, &ledger, seed + 1).await;
    let c = open("C", c_view.clone(), &clock, &ledger, seed + 2).await;

    // A's sagas hang in their payment (A dies with them in flight); C's first saga
    // applies its payment and hangs past the lease (the zombie's attempt).
    for i in 0..4 {
        ledger.script_tagged(
            &format!("a{i}"),
            "payment",
            Phase::Action,
            [Outcome::ApplyThenHang],
        );
    }
    ledger.script_tagged("c0", "inventory", Phase::Action, [Outcome::ApplyThenHang]);
    // One rejected payment: that saga compensates, on whichever engine holds it.
    ledger.script_tagged("b1", "inventory", Phase::Action, [Outcome::Rejected]);

    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            a.start("checkout", json!({"tag": format!("a{i}")}), None)
                .await
                .unwrap(),
        );
    }
    for i in 0..3 {
        ids.push(
            b.start("checkout", json!({"tag": format!("b{i}")}), None)
                .await
                .unwrap(),
        );
    }
    for i in 0..2 {
        ids.push(
            c.start("checkout", json!({"tag": format!("c{i}")}), None)
                .await
                .unwrap(),
        );
    }
    // The same start key from two processes at once: one saga.
    let key = StartKey::new("order-77").unwrap();
    let (x, y) = tokio::join!(
        a.start_once("checkout", json!({"tag": "k"}), key.clone()),
        b.start_once("checkout", json!({"tag": "k"}), key.clone()),
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.id(), y.id(), "one start key, one saga");
    assert!(
        x.is_new() != y.is_new(),
        "exactly one of the two starts is new"
    );
    ids.push(x.id());

    // Let the hanging attempts reach their services.
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A crashes: its tasks stop where they stand, its leases stay until they expire.
    drop(a);
    // C is cut off from the store: it can no longer renew.
    c_view.cut.store(true, Ordering::SeqCst);
    // Past the lease, B (or C, once back) claims A's and C's sagas.
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    c_view.cut.store(false, Ordering::SeqCst);
    // A restarts, a new owner: it takes its share of whatever is claimable, and its
    // new sagas run beside the others.
    let a2 = open("A2", store.clone(), &clock, &ledger, seed + 3).await;
    ids.push(
        a2.start("checkout", json!({"tag": "a2"}), None)
            .await
            .unwrap(),
    );

    // Every saga ends: wait on each from B, whoever drives it.
    let mut ended = 0;
    for id in &ids {
        let outcome = tokio::time::timeout(Duration::from_secs(120), b.wait(*id))
            .await
            .unwrap_or_else(|_| panic!("saga {id} did not end"))
            .unwrap_or_else(|e| panic!("wait for {id}: {e}"));
        let _ = outcome;
        ended += 1;
    }
    let claimed_by_b_or_c = store
        .accepted_fences()
        .iter()
        .filter(|(_, _, owner, epoch)| *epoch > 1 && owner.as_str() != "A")
        .count();
    check_all(&store, &ledger, &ids).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    for id in &ids {
        let m = store.meta(*id).unwrap().unwrap();
        assert!(
            matches!(m.status, SagaStatus::Completed | SagaStatus::Compensated),
            "saga {id} ended {:?}",
            m.status
        );
    }
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
    a2.shutdown().await.unwrap();
    Run {
        dump: store.dump(),
        refused: store.refused_writes(),
        zombie: ids[7],
        claimed_by_b_or_c,
        ended,
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_crashed_process_is_taken_over_and_a_zombie_is_fenced() {
    // `SAGA_SHARED_SEEDS` runs more seeds (each draws other ids, jitter and orders).
    let seeds: u64 = std::env::var("SAGA_SHARED_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    for seed in 11..11 + seeds {
        let run = scenario(seed).await;
        assert_eq!(run.ended, 11, "seed {seed}");
        assert!(
            run.claimed_by_b_or_c > 0,
            "seed {seed}: the crashed process's sagas were claimed under a new epoch"
        );
        // The zombie's late write (its hung attempt timing out) was refused for its
        // epoch.
        assert!(
            run.refused.iter().any(|r| matches!(
                r,
                Refused::Fenced { saga, carried: 1, current } if *saga == run.zombie && *current > 1
            )),
            "seed {seed}: the zombie's write was not fenced: {:?}",
            run.refused
        );
    }
}

#[test]
fn the_same_seed_gives_the_same_log() {
    let run = |seed| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(scenario(seed))
    };
    let (x, y) = (run(23), run(23));
    assert_eq!(
        x.dump, y.dump,
        "two runs of one seed wrote different stores"
    );
}

/// A driver that stops on a store error (a failed commit) leaves its lease held by a
/// live process; the renewal task gives such a lease back, and the saga is claimed and
/// finished rather than stranded until the process restarts.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_saga_whose_driver_stopped_on_a_store_error_is_not_stranded() {
    let (clock, store, ledger) = world();
    let a = open("A", store.clone(), &clock, &ledger, 5).await;
    ledger.script_tagged("s", "payment", Phase::Action, [Outcome::Hang]);
    let id = a
        .start("checkout", json!({"tag": "s"}), None)
        .await
        .unwrap();
    ledger.wait_for_call(id, "payment", Phase::Action).await;
    // The commit after the hung attempt times out fails: the driver stops.
    store.fail_next_syncs(1);
    let outcome = tokio::time::timeout(Duration::from_secs(60), a.wait(id))
        .await
        .expect("the saga was not stranded")
        .unwrap();
    assert!(
        matches!(outcome, sagaflow::SagaOutcome::Completed { .. }),
        "{outcome:?}"
    );
    let epochs: Vec<u64> = store
        .accepted_fences()
        .iter()
        .filter(|(s, ..)| *s == id)
        .map(|(.., e)| *e)
        .collect();
    assert!(
        epochs.last() > Some(&1),
        "finished under a new epoch: {epochs:?}"
    );
    a.shutdown().await.unwrap();
}

/// A saga that waits longer than a lease for its retry gives its lease back; when the
/// retry is due, another process claims it and finishes it (the first is still alive).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_saga_sleeping_past_a_lease_is_claimed_when_due_by_any_process() {
    let (clock, store, ledger) = world();
    let a = open("A", store.clone(), &clock, &ledger, 31).await;
    // A 429 asking for 60 s: far longer than the 2 s lease.
    ledger.script_tagged(
        "slow",
        "inventory",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(60))],
    );
    let id = a
        .start("checkout", json!({"tag": "slow"}), None)
        .await
        .unwrap();
    // Let it reach its wait and hand the lease back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(store.holder(id).unwrap(), None, "the lease was handed back");
    assert_eq!(a.in_flight(), 0, "no driver holds the sleeping saga");
    // A second process, opened meanwhile, is as likely to take it as the first.
    let b = open("B", store.clone(), &clock, &ledger, 32).await;
    let outcome = tokio::time::timeout(Duration::from_secs(120), b.wait(id))
        .await
        .expect("claimed and finished when due")
        .unwrap();
    assert!(
        matches!(outcome, sagaflow::SagaOutcome::Completed { .. }),
        "{outcome:?}"
    );
    let retried_at = ledger.calls_of(id, "inventory", Phase::Action);
    assert_eq!(retried_at.len(), 2, "one 429, one retry: {retried_at:?}");
    let writers: std::collections::BTreeSet<String> = store
        .accepted_fences()
        .iter()
        .filter(|(s, _, _, e)| *s == id && *e > 1)
        .map(|(_, _, o, _)| o.as_str().to_string())
        .collect();
    assert_eq!(
        writers.len(),
        1,
        "claimed once, by one process: {writers:?}"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A parked saga is repaired from a process that never drove it: it takes the saga's
/// lease, records the operator's action, and the saga goes on there.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_parked_saga_is_repaired_from_another_process() {
    let (clock, store, ledger) = world();
    let a = open("A", store.clone(), &clock, &ledger, 41).await;
    let b = open("B", store.clone(), &clock, &ledger, 42).await;
    // The inventory is refused, and the payment's refund fails every time: parked.
    ledger.script_tagged("p", "inventory", Phase::Action, [Outcome::Rejected]);
    ledger.script_tagged("p", "payment", Phase::Compensation, [Outcome::Retryable; 4]);
    let id = a
        .start("checkout", json!({"tag": "p"}), None)
        .await
        .unwrap();
    let parked = tokio::time::timeout(Duration::from_secs(60), a.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(parked, sagaflow::SagaOutcome::Parked { .. }),
        "{parked:?}"
    );
    // From B, which never drove it: resume; the refund now goes through.
    let meta = b
        .repair(
            id,
            sagaflow::machine::Repair::Resume,
            "ops@example",
            "refund service fixed",
        )
        .await
        .unwrap();
    assert!(meta.status.is_active(), "{meta:?}");
    let outcome = tokio::time::timeout(Duration::from_secs(60), a.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(outcome, sagaflow::SagaOutcome::Compensated { .. }),
        "{outcome:?}"
    );
    let history = codec::decode_log(id, &store.read(id).unwrap()).unwrap();
    assert!(history.iter().any(|r| matches!(
        &r.event,
        sagaflow::machine::Event::OperatorAction { operator, .. } if operator == "ops@example"
    )));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A rolling deploy: a process that does not know a saga's definition does not claim it
/// (nor park it), and a process that knows it finishes it.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_process_without_the_definition_gives_a_claimed_saga_back() {
    let (clock, store, ledger) = world();
    let a = open("A", store.clone(), &clock, &ledger, 51).await;
    ledger.script_tagged("r", "payment", Phase::Action, [Outcome::Hang]);
    let id = a
        .start("checkout", json!({"tag": "r"}), None)
        .await
        .unwrap();
    ledger.wait_for_call(id, "payment", Phase::Action).await;
    drop(a);
    // The new version's process knows only another definition.
    let other = sagaflow::SagaDefinition::builder("other", 1)
        .step("x", sagaflow_tests::fake("x", &ledger))
        .build()
        .unwrap();
    let newer = open_with("newer", other, store.clone(), &clock, 52).await;
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    let meta = store.meta(id).unwrap().unwrap();
    assert_eq!(meta.status, SagaStatus::Running, "not parked: {meta:?}");
    // A process that knows it takes it.
    let knows = open("A2", store.clone(), &clock, &ledger, 53).await;
    let outcome = tokio::time::timeout(Duration::from_secs(180), knows.wait(id))
        .await
        .expect("finished by a process that knows the definition")
        .unwrap();
    assert!(
        matches!(outcome, sagaflow::SagaOutcome::Completed { .. }),
        "{outcome:?}"
    );
    newer.shutdown().await.unwrap();
    knows.shutdown().await.unwrap();
}

/// A repair of a saga handed back to the store (waiting an hour for a retry) is applied
/// by the process asked, which adopts the saga: the retry runs now.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retry_now_on_a_handed_back_saga_runs_it_now_from_any_process() {
    let (clock, store, ledger) = world();
    let a = open("A", store.clone(), &clock, &ledger, 61).await;
    let b = open("B", store.clone(), &clock, &ledger, 62).await;
    ledger.script_tagged(
        "h",
        "inventory",
        Phase::Action,
        [Outcome::RetryAfter(Duration::from_secs(3600))],
    );
    let id = a
        .start("checkout", json!({"tag": "h"}), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(store.holder(id).unwrap(), None, "handed back");
    let asked = tokio::time::timeout(
        Duration::from_secs(30),
        b.repair(
            id,
            sagaflow::machine::Repair::RetryNow { step: None },
            "ops@example",
            "provider is back",
        ),
    )
    .await
    .expect("the repair returns")
    .unwrap();
    assert!(asked.status.is_active(), "{asked:?}");
    let outcome = tokio::time::timeout(Duration::from_secs(60), b.wait(id))
        .await
        .expect("ran now, not in an hour")
        .unwrap();
    assert!(
        matches!(outcome, sagaflow::SagaOutcome::Completed { .. }),
        "{outcome:?}"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Two processes each cancel a saga the other drives, at the same time: both answers
/// come back (neither waits for the other while holding its own repair lock).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn crossed_cancels_between_two_processes_both_return() {
    let (clock, store, ledger) = world();
    let a = open("A", store.clone(), &clock, &ledger, 71).await;
    let b = open("B", store.clone(), &clock, &ledger, 72).await;
    ledger.script_tagged("x", "payment", Phase::Action, [Outcome::Hang]);
    ledger.script_tagged("y", "payment", Phase::Action, [Outcome::Hang]);
    let on_a = a
        .start("checkout", json!({"tag": "x"}), None)
        .await
        .unwrap();
    let on_b = b
        .start("checkout", json!({"tag": "y"}), None)
        .await
        .unwrap();
    ledger.wait_for_call(on_a, "payment", Phase::Action).await;
    ledger.wait_for_call(on_b, "payment", Phase::Action).await;
    let (x, y) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(
            b.cancel(on_a, "ops", "crossed one"),
            a.cancel(on_b, "ops", "crossed two")
        )
    })
    .await
    .expect("both cancels return");
    x.unwrap();
    y.unwrap();
    for (e, id) in [(&a, on_a), (&b, on_b)] {
        let outcome = e.wait(id).await.unwrap();
        assert!(
            matches!(outcome, sagaflow::SagaOutcome::Cancelled { .. }),
            "{outcome:?}"
        );
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A process cut off from the store accepts no delivery and sees none.
impl sagaflow::store::Inbox for Cut {
    fn deliver(
        &self,
        key: &str,
        id: &str,
        payload: &serde_json::Value,
        at: Timestamp,
    ) -> sagaflow::store::Result<sagaflow::store::Delivered> {
        self.refuse()?;
        self.inner.inbox().deliver(key, id, payload, at)
    }
    fn waiting(&self, key: &str) -> sagaflow::store::Result<Vec<sagaflow::store::Delivery>> {
        self.refuse()?;
        self.inner.inbox().waiting(key)
    }
    fn deliveries(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> sagaflow::store::Result<Vec<sagaflow::store::Delivery>> {
        self.refuse()?;
        self.inner.inbox().deliveries(after, limit)
    }
    fn purge(&self, before: Timestamp) -> sagaflow::store::Result<usize> {
        self.refuse()?;
        self.inner.inbox().purge(before)
    }
}
