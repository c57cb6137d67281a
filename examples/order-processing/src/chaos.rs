//! The chaos run: providers in this process, the order service as a child process that
//! is killed with SIGKILL again and again (while orders are placed, charges made and
//! settlement webhooks are in flight), clients that retry with the same idempotency
//! keys, and at the end a reconciliation: the engine's own reconciler (the saga's
//! reconcile hooks, [`crate::reconcile`]) asks the providers about every step of every
//! finished saga, and every settlement payments sent is checked against the engine's
//! store (its inbox and the sagas' `event_received` records).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::providers::{self, Faults, ProviderSecrets, Providers};
use crate::reconcile::{reconcile_options, STEPS_WITH_HOOKS};
use crate::saga::{self, Integrations, OrderRequest};

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosConfig {
    /// Orders to place.
    pub orders: u32,
    /// Clients placing them at once.
    pub concurrency: usize,
    /// The providers' failure rate.
    pub fail_rate: f64,
    /// Providers' added latency.
    pub latency_ms: u64,
    /// Time between kills.
    pub kill_every: Duration,
    /// Kills at most (the run may end with fewer if everything finished).
    pub max_kills: u32,
    /// Where the providers' ledgers, the service's data and its log go.
    pub dir: PathBuf,
    /// The `order-processing` binary (the service runs as `<exe> serve ...`).
    pub exe: PathBuf,
    /// Show a progress bar on standard error.
    pub progress: bool,
    /// Run two replicas of the service on this PostgreSQL database (in a fresh schema),
    /// spread the clients across both, and kill only the first.
    pub database_url: Option<String>,
}

/// The reconciliation report.
///
/// What is checked where:
///
/// - **The library's reconciler** (`Engine::reconcile_now` on the run's store, after the
///   service is stopped, with the saga's hooks asking the providers in this process):
///   every step of every completed or compensated saga against its provider, by key: an
///   effect the log says stands but the provider does not hold (*missing*), one the log
///   says was undone or never taken but is in force (*unexpected*: a refund or release
///   lost, an order made for a compensated order), one that differs (*different*: an
///   amount, an id, two effects under one key, an effect undone twice, another order for
///   the same order id), or a provider that could not be asked (*unknown*). Each is in
///   [`Report::drifts`] and is a mismatch. It must have looked at every completed and
///   compensated saga. The steps it passes over because their log cannot say what to
///   expect ([`Report::reconcile_unchecked`]) are checked here against the ledgers.
/// - **Left here**, because the reconciler starts from the sagas and cannot see them:
///   ledger entries under a key that is no saga's step key, or under the key of a saga no
///   client of this run placed; the settlements (payments' outbox against the engine's
///   inbox and histories, see the `settlements_*` fields); the counts of effects; sagas
///   parked or not ended; the client-side checks (replays, a key reused with another
///   order, forged webhooks).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Orders placed.
    pub orders: u32,
    /// Sagas completed.
    pub completed: u32,
    /// Sagas compensated.
    pub compensated: u32,
    /// Sagas compensated, counted by the reason compensation began, with the numbers
    /// and ids in it replaced (see [`reason_class`]) so that like reasons count together.
    pub compensated_by_reason: BTreeMap<String, u32>,
    /// Sagas parked.
    pub parked: u32,
    /// SIGKILLs delivered to the service.
    pub kills: u32,
    /// Charges taken.
    pub charges: usize,
    /// Charges refunded.
    pub refunds: usize,
    /// Reservations made.
    pub reservations: usize,
    /// Reservations released.
    pub releases: usize,
    /// Orders created.
    pub orders_created: usize,
    /// Shipments booked.
    pub shipments: usize,
    /// Settlements payments sent (one per charge taken), each a signed webhook retried
    /// until it is answered 2xx.
    pub settlements_sent: usize,
    /// Of those, the ones the service answered 2xx (so the delivery was durable).
    pub settlements_acknowledged: usize,
    /// Of those, the ones whose 2xx said `duplicate`: the engine had recorded an
    /// earlier attempt whose answer never reached payments (the service was killed
    /// after the delivery was durable, before it answered).
    pub settlements_redelivered: usize,
    /// Attempts of settlement webhooks beyond the first, over the acknowledged ones:
    /// sends that got no 2xx (the service was down, being killed or starting) and were
    /// retried.
    pub settlement_retries: u64,
    /// Settlements taken by a saga (an `event_received` record naming its event id).
    pub settlements_taken: usize,
    /// Acknowledged settlements no saga took because their saga was compensated before
    /// its `settle` step began waiting (a sold-out order whose charge ran beside the
    /// reservation): kept in the inbox, the charge refunded. Not lost.
    pub settlements_unclaimed: usize,
    /// Acknowledged settlements that no saga took, other than the unclaimed ones, plus
    /// sagas that completed without taking a settlement. Must be 0.
    pub settlements_lost: usize,
    /// Settlements applied more than once: for each settlement, the `event_received`
    /// records naming it beyond the first, plus, for each saga, the settlements it took
    /// beyond one. Must be 0.
    pub settlements_doubled: usize,
    /// Acknowledged settlements replayed by payments at the end, after the kills.
    pub settlements_replayed: usize,
    /// Of those, the ones answered 2xx `duplicate` (all must be).
    pub settlement_replays_duplicate: usize,
    /// Forged webhooks sent, all of which must be refused.
    pub forged_webhooks_refused: u32,
    /// Replays of an order with its key that returned the same order.
    pub idempotent_replays: u32,
    /// Finished sagas the library's reconciler looked at.
    pub reconcile_sagas: usize,
    /// Lookups it made, each attempt counted (the providers fail lookups at the run's
    /// failure rate too, and a failed one is asked again).
    pub reconcile_lookups: u64,
    /// Steps whose provider agreed with the log.
    pub reconcile_matched: u64,
    /// The drifts it found (each also a mismatch).
    pub drifts: Vec<Drift>,
    /// Steps with a hook it passed over (`<saga>/<step>`), because the log cannot say
    /// what the provider should hold (none in this saga: see `unchecked_steps`).
    /// Checked by this report instead (no order made for it).
    pub reconcile_unchecked: Vec<String>,
    /// Everything that does not add up; must be 0.
    pub mismatches: usize,
    /// What the mismatches are.
    pub problems: Vec<String>,
}

/// A drift the reconciler found.
#[derive(Clone, Debug, Serialize)]
pub struct Drift {
    /// The saga (the order id).
    pub saga: String,
    /// The step.
    pub step: String,
    /// `missing`, `unexpected`, `different` or `unknown`.
    pub kind: String,
    /// What the log says: `present`, `undone` or `absent`.
    pub expected: String,
    /// What the provider said.
    pub detail: String,
}

struct Supervisor {
    exe: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: tokio::sync::Mutex<Option<Child>>,
}

impl Supervisor {
    async fn start(&self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        // The secrets come from the run's own file: none from this environment, and no
        // admin API (its default port may be taken).
        let child = Command::new(&self.exe)
            .args(&self.args)
            .env_remove(providers::CLIENT_SECRET_VAR)
            .env_remove(providers::WEBHOOK_SECRET_VAR)
            .env_remove(sagaflow_admin::ADMIN_TOKEN_VAR)
            .env_remove(sagaflow_admin::READ_TOKEN_VAR)
            // The store is the run's choice (`--database-url` in the arguments, or the
            // sled directory), never a `DATABASE_URL` left in this environment.
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("starting the service")?;
        *self.child.lock().await = Some(child);
        Ok(())
    }

    async fn kill(&self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.lock().await.take() {
            // SIGKILL: no clean shutdown, whatever the service was doing.
            c.kill().await?;
        }
        Ok(())
    }
}

fn order_for(i: u32) -> OrderRequest {
    OrderRequest {
        customer: format!("customer-{}", i % 97),
        // Every 17th order is out of stock; amounts ending in 13 are declined;
        // customer-13 is refused by the orders service after being charged.
        sku: if i % 17 == 5 {
            "sold-out".into()
        } else {
            format!("sku-{}", i % 11)
        },
        quantity: 1 + i % 3,
        amount_cents: 1_000 + u64::from(i) * 100 + if i % 23 == 7 { 13 } else { 0 },
    }
}

/// Runs the chaos scenario and reconciles.
///
/// # Errors
///
/// If the providers or the service cannot be started.
pub async fn run(cfg: ChaosConfig) -> anyhow::Result<Report> {
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.dir)?;
    let webhook_urls = Arc::new(Mutex::new(Vec::new()));
    let faults = Faults {
        fail_rate: cfg.fail_rate,
        latency_ms: cfg.latency_ms,
        outages: vec![(3, 4)],
        // Settlements spread over a second after their charges: many are in flight when
        // the service is killed, or arrive while it is down.
        settle_within_ms: 1000,
    };
    let secrets = ProviderSecrets::generate()?;
    let env_file = cfg.dir.join("secrets.env");
    secrets.write_env_file(
        &env_file,
        &[providers::CLIENT_SECRET_VAR, providers::WEBHOOK_SECRET_VAR],
    )?;
    let providers: Providers = providers::start(
        &cfg.dir.join("providers"),
        faults,
        300,
        webhook_urls.clone(),
        secrets,
    )
    .await?;
    // One replica on sled; two on PostgreSQL, sharing the sagas. Free ports, kept
    // across restarts.
    let replicas = if cfg.database_url.is_some() { 2 } else { 1 };
    let mut ports = Vec::new();
    for _ in 0..replicas {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        ports.push(l.local_addr()?.port());
    }
    let bases: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let base = bases[0].clone();
    // Settlement webhooks go to every replica in turn (on PostgreSQL any of them
    // accepts a delivery for any saga).
    *webhook_urls.lock().unwrap_or_else(|p| p.into_inner()) = bases
        .iter()
        .map(|b| format!("{b}/webhooks/payments"))
        .collect();
    let addresses = cfg.dir.join("addresses.json");
    std::fs::write(&addresses, serde_json::to_vec_pretty(&providers.addresses)?)?;
    let schema = format!(
        "chaos_{}_{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() % 1_000_000)
    );
    let mut supervisors = Vec::new();
    for (k, port) in ports.iter().enumerate() {
        let data = if replicas == 1 {
            cfg.dir.join("data")
        } else {
            cfg.dir.join(format!("data-{k}"))
        };
        let mut args = vec![
            "serve".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--addresses".into(),
            addresses.display().to_string(),
            "--env-file".into(),
            env_file.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        if let Some(url) = &cfg.database_url {
            args.extend(["--database-url".into(), url.clone()]);
            args.extend(["--pg-schema".into(), schema.clone()]);
        }
        supervisors.push(Arc::new(Supervisor {
            exe: cfg.exe.clone(),
            args,
            log: cfg.dir.join(format!("service-{k}.log")),
            child: tokio::sync::Mutex::new(None),
        }));
    }
    // The first starts alone, so that it creates the schema before the second opens.
    for (s, base) in supervisors.iter().zip(&bases) {
        s.start().await?;
        if replicas > 1 {
            wait_until_up(base).await;
        }
    }
    // Only the first replica is killed: on PostgreSQL the second takes its sagas over.
    let service = supervisors[0].clone();

    let kills = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let (service, kills, stop) = (service.clone(), kills.clone(), stop.clone());
        let (every, max) = (cfg.kill_every, cfg.max_kills);
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) && kills.load(Ordering::SeqCst) < max {
                tokio::time::sleep(every).await;
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if service.kill().await.is_ok() {
                    kills.fetch_add(1, Ordering::SeqCst);
                }
                let _ = service.start().await;
            }
        })
    };

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let submitted = Arc::new(AtomicU64::new(0));
    let ended = Arc::new(AtomicU64::new(0));
    let progress = cfg.progress.then(|| {
        let (submitted, ended, kills) = (submitted.clone(), ended.clone(), kills.clone());
        let total = u64::from(cfg.orders);
        tokio::spawn(async move {
            loop {
                let (s, e) = (
                    submitted.load(Ordering::Relaxed),
                    ended.load(Ordering::Relaxed),
                );
                let width = 30;
                let done = (e * width / total.max(1)) as usize;
                let sent = ((s * width / total.max(1)) as usize).max(done);
                eprint!(
                    "\r[{}{}{}] placed {s}/{total}, ended {e}/{total}, kills {}   ",
                    "#".repeat(done),
                    "-".repeat(sent - done),
                    " ".repeat(width as usize - sent),
                    kills.load(Ordering::Relaxed)
                );
                let _ = std::io::stderr().flush();
                if e >= total {
                    eprintln!();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    });

    // Place every order, retrying with the same key until the service answers.
    let ids: Arc<Mutex<BTreeMap<u32, String>>> = Arc::default();
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let replays = Arc::new(AtomicU32::new(0));
    let permits = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..cfg.orders {
        let permit = permits.clone().acquire_owned().await?;
        let (client, bases, ids, problems, submitted, replays) = (
            client.clone(),
            bases.clone(),
            ids.clone(),
            problems.clone(),
            submitted.clone(),
            replays.clone(),
        );
        tasks.spawn(async move {
            let order = order_for(i);
            let key = format!("order-{i}");
            let id = place(&client, &bases, i as usize, &key, &order).await;
            match &id {
                Ok(id) => {
                    ids.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(i, id.clone());
                    // Every tenth client retries as if it never heard back: same order.
                    if i % 10 == 0 {
                        match place(&client, &bases, i as usize + 1, &key, &order).await {
                            Ok(again) if &again == id => {
                                replays.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                problems
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(format!(
                                        "order {i}: a replay with its key gave {other:?}, not {id}"
                                    ))
                            }
                        }
                    }
                }
                Err(e) => problems
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("order {i} was not accepted: {e}")),
            }
            submitted.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}

    // A different order under a used key must be refused. Asked until the service
    // answers (it may be down between a kill and its restart); a transport error is
    // no answer.
    let mut other = order_for(1);
    other.quantity += 1;
    let mut answer = post(&client, &base, "order-1", &other).await;
    for n in 1..100 {
        if answer.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        answer = post(&client, &bases[n % bases.len()], "order-1", &other).await;
    }
    match answer {
        Ok((422, _)) => {}
        r => problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!(
                "a different body under a used key was not refused with 422: {r:?}"
            )),
    }

    // Wait until every saga has ended (asking the last replica, never killed, when
    // there are two: any replica answers for every saga).
    let base = bases[bases.len() - 1].clone();
    let ids = ids.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut status: BTreeMap<u32, String> = BTreeMap::new();
    let mut parked_reasons: BTreeMap<u32, String> = BTreeMap::new();
    let mut compensated_reasons: BTreeMap<u32, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while status.len() < ids.len() && Instant::now() < deadline {
        for (i, id) in &ids {
            if status.contains_key(i) {
                continue;
            }
            if let Ok(r) = client.get(format!("{base}/orders/{id}")).send().await {
                if let Ok(v) = r.json::<Value>().await {
                    let s = v["status"].as_str().unwrap_or("").to_string();
                    let reason = v["reason"].as_str().unwrap_or("").to_string();
                    match s.as_str() {
                        "parked" => {
                            parked_reasons.insert(*i, reason);
                        }
                        "compensated" => {
                            compensated_reasons.insert(*i, reason);
                        }
                        _ => {}
                    }
                    if matches!(
                        s.as_str(),
                        "completed" | "compensated" | "parked" | "resolved"
                    ) {
                        status.insert(*i, s);
                        ended.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if status.len() < ids.len() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let _ = killer.await;
    // The killer may have left it dead: make sure it runs for the webhook checks.
    if service.child.lock().await.is_none() {
        service.start().await?;
    }

    // Forged webhooks must be refused.
    let forged_secret = sagaflow_steps::secrets::Secret::new("whsec_attacker");
    let mut forged_refused = 0;
    for n in 0..3 {
        let body =
            json!({ "id": format!("evt_forged_{n}"), "type": "charge.settled", "charge_key": "x" })
                .to_string();
        let sig = sagaflow_steps::webhook::sign(&forged_secret, SystemTime::now(), body.as_bytes());
        for _ in 0..50 {
            match client
                .post(format!("{base}/webhooks/payments"))
                .header("signature", &sig)
                .body(body.clone())
                .send()
                .await
            {
                Ok(r) if r.status() == reqwest::StatusCode::UNAUTHORIZED => {
                    forged_refused += 1;
                    break;
                }
                Ok(r) => {
                    problems
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("a forged webhook got {}", r.status()));
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    // Let the settlement webhooks of the last charges be acknowledged.
    let settled = || {
        let e = providers.settlements.entries();
        let sent = e.iter().filter(|e| e.kind == "settlement").count();
        let acked = e.iter().filter(|e| e.kind == "acknowledged").count();
        (sent, acked)
    };
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let (sent, acked) = settled();
        if acked >= sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Payments replays every acknowledged settlement once more, after all the kills and
    // restarts: each must be answered 2xx as a duplicate (by its event id, from the
    // engine's store) and be recorded once.
    let (replayed, replays_duplicate) =
        replay_settlements(&client, &bases, &providers, &problems).await;
    for s in &supervisors {
        s.kill().await?;
    }
    // The engine's store, read after the service is gone: its inbox and the sagas'
    // histories.
    let saga_ids: Vec<sagaflow::SagaId> = ids.values().filter_map(|s| s.parse().ok()).collect();
    let view = match &cfg.database_url {
        None => {
            let data = cfg.dir.join("data");
            read_store_when_unlocked(
                move || {
                    sagaflow::store::SledLog::open_read_only(&data)
                        .map(|l| Arc::new(l) as Arc<dyn sagaflow::store::SagaLog>)
                },
                saga_ids,
            )
            .await
        }
        #[cfg(feature = "postgres")]
        Some(url) => {
            let options = sagaflow::store::PgOptions::default().schema(schema.clone());
            let url = url.clone();
            read_store_when_unlocked(
                move || {
                    sagaflow::store::PgLog::connect(&url, options.clone())
                        .map(|l| Arc::new(l) as Arc<dyn sagaflow::store::SagaLog>)
                },
                saga_ids,
            )
            .await
        }
        #[cfg(not(feature = "postgres"))]
        Some(_) => Err(anyhow::anyhow!(
            "--database-url needs the `postgres` feature"
        )),
    };
    // The library's reconciler over the same store (before the schema goes): every
    // finished saga's steps against the providers.
    let reconciled = reconcile_store(&cfg, &schema, &providers).await;
    // The run's schema goes with it.
    #[cfg(feature = "postgres")]
    if let Some(url) = &cfg.database_url {
        let options = sagaflow::store::PgOptions::default().schema(schema.clone());
        let url = url.clone();
        let dropped = tokio::task::spawn_blocking(move || {
            sagaflow::store::PgLog::connect(&url, options).and_then(|pg| pg.drop_schema())
        })
        .await;
        if !matches!(dropped, Ok(Ok(()))) {
            tracing::warn!(%schema, "could not drop the run's schema");
        }
    }
    if let Some(p) = progress {
        ended.store(u64::from(cfg.orders), Ordering::Relaxed);
        let _ = p.await;
    }

    let mut report = count(&providers, &ids, &status);
    match reconciled {
        Ok(r) => take_drifts(&mut report, &providers, r),
        Err(e) => report
            .problems
            .push(format!("the reconciler could not run: {e:#}")),
    }
    report.orders = cfg.orders;
    report.kills = kills.load(Ordering::SeqCst);
    report.forged_webhooks_refused = forged_refused;
    report.idempotent_replays = replays.load(Ordering::Relaxed);
    for reason in compensated_reasons.values() {
        *report
            .compensated_by_reason
            .entry(reason_class(reason))
            .or_default() += 1;
    }
    report.settlements_replayed = replayed;
    report.settlement_replays_duplicate = replays_duplicate;
    match view {
        Ok(view) => reconcile_settlements(&mut report, &providers, &ids, &status, &view),
        Err(e) => report
            .problems
            .push(format!("the engine's store could not be read: {e:#}")),
    }
    // These providers never refuse an undo for good, so nothing here should need an
    // operator: a parked saga is a finding.
    for (i, reason) in &parked_reasons {
        report.problems.push(format!("order {i} parked: {reason}"));
    }
    for i in 0..cfg.orders {
        if !status.contains_key(&i) && ids.contains_key(&i) {
            report.problems.push(format!("order {i} did not end"));
        }
    }
    report.problems.extend(
        problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned(),
    );
    report.mismatches = report.problems.len();
    tracing::info!(took = ?started.elapsed(), "chaos run done");
    Ok(report)
}

/// A reason with what varies from saga to saga taken out, so that like reasons count
/// together: a number becomes `N` (`attempt 3` is `attempt N`, `5s` is `Ns`), and a word
/// mixing digits with letters (a saga or charge id, `customer-13`) becomes `<id>`. An
/// HTTP status (`402 Payment Required`) is kept: it tells failures apart.
pub fn reason_class(reason: &str) -> String {
    let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    let mut out = String::with_capacity(reason.len());
    let mut rest = reason;
    while let Some(c) = rest.chars().next() {
        if !is_word(c) {
            out.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let end = rest.find(|c: char| !is_word(c)).unwrap_or(rest.len());
        let (word, after) = rest.split_at(end);
        rest = after;
        if !word.contains(|c: char| c.is_ascii_digit()) {
            out.push_str(word);
            continue;
        }
        let digits = word.trim_end_matches(|c: char| c.is_ascii_lowercase());
        let unit = &word[digits.len()..];
        let numeric = !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit());
        let http_status = numeric
            && digits.len() == 3
            && unit.is_empty()
            && (100..600).contains(&digits.parse::<u32>().unwrap_or(0))
            && after.starts_with(' ')
            && after[1..].starts_with(|c: char| c.is_ascii_uppercase());
        if http_status {
            out.push_str(word);
        } else if numeric && unit.len() <= 3 {
            out.push('N');
            out.push_str(unit);
        } else {
            out.push_str("<id>");
        }
    }
    out
}

async fn post(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    order: &OrderRequest,
) -> Result<(u16, Value), reqwest::Error> {
    let r = client
        .post(format!("{base}/orders"))
        .header("idempotency-key", key)
        .json(order)
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

/// Places an order, retrying with the same key while the service is down or busy: at
/// replica `first` of `bases`, then at the next one after each failure.
async fn place(
    client: &reqwest::Client,
    bases: &[String],
    first: usize,
    key: &str,
    order: &OrderRequest,
) -> Result<String, String> {
    for n in 0..2_000 {
        let base = &bases[(first + n) % bases.len()];
        match post(client, base, key, order).await {
            Ok((202, v)) => {
                return v["order_id"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or("no id".into())
            }
            Ok((s, v)) if (400..500).contains(&s) => return Err(format!("{s}: {v}")),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Err("the service never answered".into())
}

/// Sends every acknowledged settlement once more, signed as payments signs, spread
/// across `bases`; returns how many were sent and how many were answered 2xx
/// `duplicate`. Anything else is a problem.
async fn replay_settlements(
    client: &reqwest::Client,
    bases: &[String],
    providers: &Providers,
    problems: &Mutex<Vec<String>>,
) -> (usize, usize) {
    let acked: BTreeSet<String> = providers
        .settlements
        .entries()
        .into_iter()
        .filter(|e| e.kind == "acknowledged")
        .filter_map(|e| e.key.strip_prefix("ack/").map(str::to_string))
        .collect();
    let (mut sent, mut duplicate) = (0, 0);
    for (n, e) in providers
        .settlements
        .entries()
        .into_iter()
        .filter(|e| e.kind == "settlement" && acked.contains(&e.key))
        .enumerate()
    {
        let body = e.answer.to_string();
        let mut answer = None;
        // The service may be starting: a transport error is no answer.
        for k in 0..100 {
            let sig = sagaflow_steps::webhook::sign(
                &providers.secrets.webhook_secret,
                SystemTime::now(),
                body.as_bytes(),
            );
            let r = client
                .post(format!(
                    "{}/webhooks/payments",
                    bases[(n + k) % bases.len()]
                ))
                .header("signature", sig)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            if let Ok(r) = r {
                let status = r.status().as_u16();
                answer = Some((status, r.json::<Value>().await.unwrap_or(Value::Null)));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent += 1;
        match answer {
            Some((200, v)) if v["delivery"] == "duplicate" => duplicate += 1,
            other => problems
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!(
                    "settlement {} replayed after the run was answered {other:?}, not a duplicate",
                    e.key
                )),
        }
    }
    (sent, duplicate)
}

/// What the engine's store says about settlements.
#[derive(Debug, Default)]
struct StoreView {
    /// Every delivery in the inbox.
    deliveries: Vec<sagaflow::store::Delivery>,
    /// Per saga, the delivery ids of its `event_received` records, in log order.
    received: BTreeMap<String, Vec<String>>,
    /// The sagas whose `settle` step began waiting (an `awaiting` record).
    awaited: BTreeSet<String>,
}

/// Opens the store with `open` (retrying for 30 s while a killed service's lock is
/// being let go) and reads the inbox and the histories of `ids`.
async fn read_store_when_unlocked(
    open: impl Fn() -> sagaflow::store::Result<Arc<dyn sagaflow::store::SagaLog>> + Send + 'static,
    ids: Vec<sagaflow::SagaId>,
) -> anyhow::Result<StoreView> {
    tokio::task::spawn_blocking(move || {
        let until = Instant::now() + Duration::from_secs(30);
        let store = loop {
            match open() {
                Ok(s) => break s,
                Err(e) if Instant::now() < until => {
                    tracing::debug!(error = %e, "the store is not readable yet");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(anyhow::Error::from(e).context("opening the store")),
            }
        };
        let mut view = StoreView::default();
        let mut after: Option<(String, String)> = None;
        loop {
            let page = store
                .inbox()
                .deliveries(after.as_ref().map(|(k, i)| (k.as_str(), i.as_str())), 1000)?;
            let Some(last) = page.last() else { break };
            after = Some((last.key.clone(), last.id.clone()));
            view.deliveries.extend(page);
        }
        for id in ids {
            let history = sagaflow::admin::history(store.as_ref(), id)?;
            let mut got = Vec::new();
            for r in history {
                match r.event {
                    sagaflow::machine::Event::EventReceived { delivery, .. } => got.push(delivery),
                    sagaflow::machine::Event::Awaiting { .. } => {
                        view.awaited.insert(id.to_string());
                    }
                    _ => {}
                }
            }
            view.received.insert(id.to_string(), got);
        }
        Ok(view)
    })
    .await?
}

/// Every settlement payments sent against the engine's store: see the fields
/// `settlements_*` of [`Report`] for the definitions.
fn reconcile_settlements(
    r: &mut Report,
    p: &Providers,
    ids: &BTreeMap<u32, String>,
    status: &BTreeMap<u32, String>,
    view: &StoreView,
) {
    let entries = p.settlements.entries();
    let settlements: Vec<&providers::Entry> =
        entries.iter().filter(|e| e.kind == "settlement").collect();
    let acks: BTreeMap<&str, &Value> = entries
        .iter()
        .filter(|e| e.kind == "acknowledged")
        .filter_map(|e| e.key.strip_prefix("ack/").map(|k| (k, &e.answer)))
        .collect();
    let status_of: BTreeMap<&str, &str> = ids
        .iter()
        .filter_map(|(i, id)| status.get(i).map(|s| (id.as_str(), s.as_str())))
        .collect();
    // Who took what: delivery id -> the sagas whose logs took it (one entry per record).
    let mut takers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (saga, got) in &view.received {
        for d in got {
            takers.entry(d.as_str()).or_default().push(saga.as_str());
        }
        let distinct: BTreeSet<&String> = got.iter().collect();
        if distinct.len() > 1 {
            r.settlements_doubled += distinct.len() - 1;
            r.problems.push(format!(
                "saga {saga} took {} settlements: {got:?}",
                distinct.len()
            ));
        }
        if status_of.get(saga.as_str()) == Some(&"completed") && got.is_empty() {
            r.settlements_lost += 1;
            r.problems
                .push(format!("saga {saga} completed without a settlement"));
        }
    }
    let in_inbox: BTreeMap<&str, &sagaflow::store::Delivery> =
        view.deliveries.iter().map(|d| (d.id.as_str(), d)).collect();
    if in_inbox.len() != view.deliveries.len() {
        r.problems
            .push("the inbox holds one event id under two keys".to_string());
    }
    let sent: BTreeSet<&str> = settlements.iter().map(|e| e.key.as_str()).collect();
    for d in &view.deliveries {
        if !sent.contains(d.id.as_str()) {
            r.problems
                .push(format!("the inbox holds {} that payments never sent", d.id));
        }
    }
    r.settlements_sent = settlements.len();
    if r.settlements_sent != r.charges {
        r.problems.push(format!(
            "{} charges but {} settlements sent",
            r.charges, r.settlements_sent
        ));
    }
    for e in &settlements {
        let id = e.key.as_str();
        let own = e.answer["charge_key"]
            .as_str()
            .and_then(|k| k.split('/').next())
            .unwrap_or("");
        let ack = acks.get(id);
        if let Some(a) = ack {
            r.settlements_acknowledged += 1;
            r.settlement_retries += a["attempts"].as_u64().unwrap_or(1).saturating_sub(1);
            if a["answer"]["delivery"] == "duplicate" {
                r.settlements_redelivered += 1;
            }
        } else {
            r.problems
                .push(format!("settlement {id} was never acknowledged"));
        }
        let took = takers.get(id).cloned().unwrap_or_default();
        if !took.is_empty() {
            r.settlements_taken += 1;
            r.settlements_doubled += took.len() - 1;
            if took.len() > 1 {
                r.problems.push(format!(
                    "settlement {id} taken {} times: {took:?}",
                    took.len()
                ));
            }
            for t in &took {
                if *t != own {
                    r.problems.push(format!(
                        "settlement {id} of saga {own}'s charge taken by saga {t}"
                    ));
                }
            }
            match in_inbox.get(id) {
                Some(d) if d.taken_by.map(|s| s.to_string()).as_deref() == Some(took[0]) => {}
                other => r.problems.push(format!(
                    "settlement {id} taken by {took:?} but the inbox says {:?}",
                    other.map(|d| d.taken_by)
                )),
            }
            continue;
        }
        if ack.is_none() {
            continue;
        }
        let durable = in_inbox.contains_key(id);
        let compensated_before_waiting =
            status_of.get(own) == Some(&"compensated") && !view.awaited.contains(own);
        if durable && compensated_before_waiting {
            r.settlements_unclaimed += 1;
        } else {
            r.settlements_lost += 1;
            r.problems.push(format!(
                "settlement {id} acknowledged but taken by no saga (in the inbox: {durable}; its saga {own}: {:?}, waited: {})",
                status_of.get(own),
                view.awaited.contains(own)
            ));
        }
    }
}

/// The library's reconciler over the run's store (sled, or the run's PostgreSQL
/// schema), with the order saga's hooks asking the providers in this process: every
/// finished saga, however recently it finished. The service must be stopped: this opens
/// an engine on its store (which would also resume any saga that had not ended).
async fn reconcile_store(
    cfg: &ChaosConfig,
    schema: &str,
    p: &Providers,
) -> anyhow::Result<(sagaflow::ReconcileReport, Vec<(sagaflow::SagaId, String)>)> {
    #[cfg(not(feature = "postgres"))]
    let _ = schema;
    let integrations = Integrations::new(&p.addresses, &p.secrets.client_secret);
    let options = sagaflow::EngineOptions::default()
        // Nothing but the reconciler: no finished saga is purged meanwhile.
        .with_retention_task(None, 1)
        .with_reconciler(
            reconcile_options(&integrations)
                .window(Duration::ZERO, Duration::from_secs(365 * 24 * 3600))
                // Only `reconcile_now` runs: the background task would wait this long.
                .every(Duration::from_secs(24 * 3600))
                // Lookups fail at the run's failure rate too: a provider that answers
                // at all is heard within this many attempts.
                .unknown(20, Duration::from_millis(10)),
        );
    let builder = sagaflow::Engine::builder()
        .register(saga::definition(&integrations)?)
        .options(options);
    let engine = match &cfg.database_url {
        None => builder.open(cfg.dir.join("data")).await?,
        #[cfg(feature = "postgres")]
        Some(url) => {
            builder
                .open_postgres(
                    url,
                    sagaflow::store::PgOptions::default().schema(schema.to_string()),
                )
                .await?
        }
        #[cfg(not(feature = "postgres"))]
        Some(_) => anyhow::bail!("--database-url needs the `postgres` feature"),
    };
    let report = engine.reconcile_now().await;
    let unchecked = unchecked_steps(&engine);
    engine.shutdown().await?;
    Ok((report?, unchecked?))
}

/// The steps with a hook of the sagas that ended compensated (or cancelled) of which
/// the log says neither that they took no effect, nor that they were undone, nor that
/// their last attempt was refused under their key: the reconciler has no expectation
/// for them and counts them as unchecked. This saga leaves none: a pivot
/// (`create_order`) refused after an attempt whose outcome was unknown is expected
/// absent, and looked up, by the reconciler itself.
fn unchecked_steps(engine: &sagaflow::Engine) -> anyhow::Result<Vec<(sagaflow::SagaId, String)>> {
    use sagaflow::machine::Progress;
    let mut out = Vec::new();
    for status in [
        sagaflow::SagaStatus::Compensated,
        sagaflow::SagaStatus::Cancelled,
    ] {
        for meta in engine.list(status)? {
            for s in engine.state(meta.id)?.steps {
                let undone = matches!(s.compensation, Progress::Succeeded { .. });
                let stands = matches!(s.action, Progress::Succeeded { .. });
                let refused = matches!(
                    s.action,
                    Progress::Failed {
                        kind: sagaflow::FailureKind::Rejected,
                        ..
                    }
                );
                if STEPS_WITH_HOOKS.contains(&s.name.as_str())
                    && s.may_have_taken_effect()
                    && !undone
                    && !stands
                    && !refused
                {
                    out.push((meta.id, s.name));
                }
            }
        }
    }
    Ok(out)
}

/// Puts what the reconciler found into `r`: every drift is a mismatch, and so is a
/// finished saga it did not look at. The steps it passed over (`unchecked`, see
/// [`unchecked_steps`]) are checked here against the ledgers: a `create_order` must
/// have left no order (under its key, or for its order id under any key); any other
/// is a mismatch, since this saga cannot leave one.
fn take_drifts(
    r: &mut Report,
    p: &Providers,
    (found, unchecked): (sagaflow::ReconcileReport, Vec<(sagaflow::SagaId, String)>),
) {
    for (saga, step) in unchecked {
        r.reconcile_unchecked.push(format!("{saga}/{step}"));
        let key = sagaflow::IdempotencyKey::derive(saga, &step, sagaflow::Phase::Action);
        let id = saga.to_string();
        let orders: Vec<String> = p
            .orders
            .under_or_about(Some(key.as_str()), Some(&id))
            .into_iter()
            .filter(|e| e.kind == "order")
            .map(|e| e.key)
            .collect();
        match step.as_str() {
            "create_order" if orders.is_empty() => {}
            "create_order" => r.problems.push(format!(
                "saga {saga} compensated, its order refused after an unknown outcome, but orders were made: {orders:?}"
            )),
            _ => r.problems.push(format!(
                "step {step} of compensated saga {saga} may have taken effect and was not undone"
            )),
        }
    }
    r.reconcile_sagas = found.sagas;
    r.reconcile_lookups = found.lookups;
    r.reconcile_matched = found.matched;
    let finished = (r.completed + r.compensated) as usize;
    if found.sagas != finished || found.skipped > 0 {
        r.problems.push(format!(
            "the reconciler looked at {} sagas (skipped {}), but {finished} finished",
            found.sagas, found.skipped
        ));
    }
    for d in found.drifts {
        r.problems.push(format!(
            "drift: saga {} step {} {} (the log says {}): {}",
            d.saga, d.step, d.kind, d.expected, d.detail
        ));
        r.drifts.push(Drift {
            saga: d.saga.to_string(),
            step: d.step,
            kind: d.kind.to_string(),
            expected: d.expected.to_string(),
            detail: d.detail,
        });
    }
}

/// The counts of the report, from the sagas' ends and the providers' ledgers, and the
/// one ledger check the reconciler cannot make (it starts from the sagas): every entry
/// is under a step key (`<saga>/<step>/<phase>`) of a saga a client of this run placed.
fn count(p: &Providers, ids: &BTreeMap<u32, String>, status: &BTreeMap<u32, String>) -> Report {
    let mut r = Report::default();
    let known: BTreeSet<&str> = ids.values().map(String::as_str).collect();
    let mut strangers = BTreeSet::new();
    let mut count = BTreeMap::<String, usize>::new();
    for e in p
        .payments
        .entries()
        .into_iter()
        .chain(p.inventory.entries())
        .chain(p.orders.entries())
    {
        *count.entry(e.kind.clone()).or_default() += 1;
        let parts: Vec<&str> = e.key.split('/').collect();
        match parts[..] {
            [saga, _, "action" | "compensation"] if known.contains(saga) => {}
            [saga, _, "action" | "compensation"] => {
                strangers.insert(saga.to_string());
            }
            _ => r
                .problems
                .push(format!("a {} under a foreign key {}", e.kind, e.key)),
        }
    }
    for saga in strangers {
        r.problems
            .push(format!("effects for a saga no client knows: {saga}"));
    }
    let n = |k: &str| count.get(k).copied().unwrap_or(0);
    // A refund or release of something that never happened is a no-op: not counted.
    let undone = |entries: Vec<providers::Entry>, kind: &str, field: &str| {
        entries
            .iter()
            .filter(|e| e.kind == kind && e.answer[field] == Value::Bool(true))
            .count()
    };
    r.charges = n("charge");
    r.refunds = undone(p.payments.entries(), "refund", "refunded");
    r.reservations = n("reserve");
    r.releases = undone(p.inventory.entries(), "release", "released");
    r.orders_created = n("order");
    r.shipments = n("shipment");
    for s in status.values() {
        match s.as_str() {
            "completed" => r.completed += 1,
            "compensated" => r.compensated += 1,
            "parked" => r.parked += 1,
            _ => {}
        }
    }
    r
}

/// Waits (at most 30 s) until a replica answers HTTP at `base` (any answer, a 404 for
/// this path included: it listens, so its engine is open).
async fn wait_until_up(base: &str) {
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::reason_class;

    #[test]
    fn like_reasons_count_together() {
        let declined = |attempt: u32| {
            reason_class(&format!(
                "step `charge` failed permanently at attempt {attempt}: 402 Payment Required: \
                 {{\"error\":\"card declined\"}}"
            ))
        };
        assert_eq!(declined(1), declined(3));
        assert_eq!(
            declined(1),
            "step `charge` failed permanently at attempt N: 402 Payment Required: \
             {\"error\":\"card declined\"}"
        );
        assert_eq!(
            reason_class("charge ch_01a21333e1c37cad for customer-13 timed out after 5s"),
            "charge <id> for <id> timed out after Ns"
        );
        assert_eq!(
            reason_class("saga 01a21333-e1ae-7dc5-a6f6-9eb571db4f2d: 503 Service Unavailable"),
            "saga <id>: 503 Service Unavailable"
        );
        assert_eq!(
            reason_class("sold-out is out of stock: 4213 cents, 500 of them"),
            "sold-out is out of stock: N cents, N of them"
        );
        assert_eq!(reason_class(""), "");
        assert_eq!(reason_class("é 12 ü"), "é N ü");
    }
}
