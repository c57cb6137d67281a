//! Fake providers as real HTTP servers on 127.0.0.1: payments, inventory, orders.
//!
//! Each honours idempotency keys (the same key returns the first answer and applies
//! nothing twice), keeps its ledger in a file so it survives restarts and can be
//! reconciled, and can be given a failure rate, a latency and outage windows. Each also
//! answers lookups by idempotency key (`GET /charges?key=`, `/reservations?key=`,
//! `/orders?key=&order_id=`, `/shipments?key=`), what the saga's reconcile hooks ask
//! (see [`crate::reconcile`]); lookups see the same faults, and payments' need a token
//! as its charges do. [`Ledger`] can also be given drift by hand (a refund lost, an
//! order made outside any saga, an amount changed), for drills and tests. Payments
//! also issues short-lived OAuth tokens and, for every charge it takes, sends one signed
//! `charge.settled` webhook, asynchronously, retrying until it is answered 2xx, as a real
//! payment provider does (its outbox, `settlements.jsonl`, survives a restart of the
//! providers); inventory answers 429 with Retry-After past its rate.
//!
//! The two secrets payments shares with the shop (the OAuth client secret and the
//! webhook signing secret) are never in source and never printed: [`ProviderSecrets`]
//! takes them from the environment or generates them, and writes generated ones only to
//! a file created with mode 0600.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use sagaflow_steps::secrets::Secret;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// How a provider misbehaves.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Faults {
    /// Share of calls that fail with a 500 (half before applying, half after).
    pub fail_rate: f64,
    /// Added to every call.
    pub latency_ms: u64,
    /// Seconds since start during which the provider answers 503 with Retry-After.
    pub outages: Vec<(u64, u64)>,
    /// Payments settles each charge a pseudo-random 0 to this many ms after taking it
    /// (0: at once), so that settlement webhooks are spread out in time.
    #[serde(default)]
    pub settle_within_ms: u64,
}

/// One line of a provider's ledger.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    /// `charge`, `refund`, `reserve`, `release`, `order` or `shipment`.
    pub kind: String,
    /// The idempotency key it was applied under.
    pub key: String,
    /// What it is about, for a lookup by it: the charge key a refund undoes, the
    /// reservation key a release undoes, the business order id (the order's saga id) of
    /// an order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<String>,
    /// What was answered.
    pub answer: Value,
}

/// A ledger's entries, indexed by key and by what they are about.
#[derive(Debug, Default)]
struct Book {
    all: Vec<Entry>,
    by_key: HashMap<String, Vec<usize>>,
    by_about: HashMap<String, Vec<usize>>,
}

impl Book {
    fn of(entries: Vec<Entry>) -> Self {
        let mut b = Book::default();
        for e in entries {
            b.push(e);
        }
        b
    }

    fn push(&mut self, e: Entry) {
        let i = self.all.len();
        self.by_key.entry(e.key.clone()).or_default().push(i);
        if let Some(a) = &e.about {
            self.by_about.entry(a.clone()).or_default().push(i);
        }
        self.all.push(e);
    }

    fn first(&self, key: &str) -> Option<&Entry> {
        self.by_key
            .get(key)
            .and_then(|i| i.first())
            .map(|&i| &self.all[i])
    }

    fn pick(&self, index: Option<&Vec<usize>>) -> Vec<Entry> {
        index
            .map(|i| i.iter().map(|&i| self.all[i].clone()).collect())
            .unwrap_or_default()
    }
}

/// A ledger: what a provider applied, by idempotency key, persisted as JSON lines.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    book: Mutex<Book>,
}

impl Ledger {
    /// Opens (or creates) the ledger file at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Arc<Self>> {
        let mut all = Vec::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                all.push(serde_json::from_str::<Entry>(line)?);
            }
        }
        Ok(Arc::new(Ledger {
            path: path.to_path_buf(),
            book: Mutex::new(Book::of(all)),
        }))
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer given before under `key`, if any.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.book().first(key).map(|e| e.answer.clone())
    }

    /// Applies `kind` under `key` once; returns the first answer for the key.
    pub fn apply(&self, kind: &str, key: &str, answer: Value) -> anyhow::Result<Value> {
        self.apply_once(kind, key, answer).map(|(a, _)| a)
    }

    /// As [`Ledger::apply`], and says whether this call applied it (`true`) or an
    /// earlier one had.
    pub fn apply_once(
        &self,
        kind: &str,
        key: &str,
        answer: Value,
    ) -> anyhow::Result<(Value, bool)> {
        self.apply_about(kind, key, None, answer)
    }

    /// As [`Ledger::apply_once`], recording what the entry is about (see
    /// [`Entry::about`]).
    pub fn apply_about(
        &self,
        kind: &str,
        key: &str,
        about: Option<&str>,
        answer: Value,
    ) -> anyhow::Result<(Value, bool)> {
        let mut g = self.book();
        if let Some(e) = g.first(key) {
            return Ok((e.answer.clone(), false));
        }
        let e = Entry {
            kind: kind.to_string(),
            key: key.to_string(),
            about: about.map(str::to_string),
            answer: answer.clone(),
        };
        self.append(&mut g, e)?;
        Ok((answer, true))
    }

    fn append(&self, g: &mut Book, e: Entry) -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        writeln!(f, "{}", serde_json::to_string(&e)?)?;
        g.push(e);
        Ok(())
    }

    /// Every entry, in order.
    pub fn entries(&self) -> Vec<Entry> {
        self.book().all.clone()
    }

    /// Every entry under `key`, in order (one, unless the ledger was tampered with).
    pub fn under(&self, key: &str) -> Vec<Entry> {
        let g = self.book();
        g.pick(g.by_key.get(key))
    }

    /// Every entry about `about` (see [`Entry::about`]), in order.
    pub fn about(&self, about: &str) -> Vec<Entry> {
        let g = self.book();
        g.pick(g.by_about.get(about))
    }

    /// Every entry under `key` or about `about`, in order, each once.
    pub fn under_or_about(&self, key: Option<&str>, about: Option<&str>) -> Vec<Entry> {
        let g = self.book();
        let mut at: Vec<usize> = key
            .and_then(|k| g.by_key.get(k))
            .into_iter()
            .chain(about.and_then(|a| g.by_about.get(a)))
            .flatten()
            .copied()
            .collect();
        at.sort_unstable();
        at.dedup();
        at.into_iter().map(|i| g.all[i].clone()).collect()
    }

    /// Drift, for drills and tests: appends `e` as it is, even under a key already
    /// used, as something done outside any saga (or applied twice) would be.
    ///
    /// # Errors
    ///
    /// If the file cannot be written.
    pub fn record(&self, e: Entry) -> anyhow::Result<()> {
        let mut g = self.book();
        self.append(&mut g, e)
    }

    /// Drift, for drills and tests: forgets every entry under `key` (a refund lost, say)
    /// and returns them.
    ///
    /// # Errors
    ///
    /// If the file cannot be rewritten.
    pub fn remove(&self, key: &str) -> anyhow::Result<Vec<Entry>> {
        let mut g = self.book();
        let (gone, kept): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut g.all)
            .into_iter()
            .partition(|e| e.key == key);
        *g = Book::of(kept);
        self.rewrite(&g)?;
        Ok(gone)
    }

    /// Drift, for drills and tests: changes the answer of the first entry under `key`
    /// (an amount changed, say). Returns whether there was one.
    ///
    /// # Errors
    ///
    /// If the file cannot be rewritten.
    pub fn amend(&self, key: &str, change: impl FnOnce(&mut Value)) -> anyhow::Result<bool> {
        let mut g = self.book();
        let Some(&i) = g.by_key.get(key).and_then(|i| i.first()) else {
            return Ok(false);
        };
        change(&mut g.all[i].answer);
        self.rewrite(&g)?;
        Ok(true)
    }

    fn rewrite(&self, g: &Book) -> anyhow::Result<()> {
        let mut text = String::new();
        for e in &g.all {
            text.push_str(&serde_json::to_string(e)?);
            text.push('\n');
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }
}

struct Provider {
    faults: Faults,
    started: Instant,
    ledger: Arc<Ledger>,
    calls: AtomicU64,
}

enum Fault {
    None,
    Before,
    After,
    Outage(u64),
}

impl Provider {
    fn fault(&self, key: &str) -> Fault {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let since = self.started.elapsed().as_secs();
        if let Some((_, end)) = self
            .faults
            .outages
            .iter()
            .find(|(a, b)| since >= *a && since < *b)
        {
            return Fault::Outage(end - since);
        }
        // Pseudo-random per (key, call), so a retry of the same key may pass.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ n;
        for b in key.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let r = (h >> 11) as f64 / (1u64 << 53) as f64;
        if r < self.faults.fail_rate / 2.0 {
            Fault::Before
        } else if r < self.faults.fail_rate {
            Fault::After
        } else {
            Fault::None
        }
    }

    async fn pause(&self) {
        if self.faults.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.faults.latency_ms)).await;
        }
    }
}

fn key_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

/// Runs one idempotent operation with the provider's faults around it; the entry it
/// makes is about `about` (see [`Entry::about`]).
async fn operate(
    p: &Provider,
    headers: &HeaderMap,
    kind: &str,
    about: Option<&str>,
    decide: impl FnOnce(&str) -> Result<Value, (StatusCode, String)>,
) -> Response {
    p.pause().await;
    let Some(key) = key_of(headers) else {
        return error(StatusCode::BAD_REQUEST, "Idempotency-Key header required");
    };
    if let Some(previous) = p.ledger.get(&key) {
        return Json(previous).into_response();
    }
    let fault = p.fault(&key);
    match fault {
        Fault::Outage(left) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", left.max(1).to_string())],
                "planned outage",
            )
                .into_response()
        }
        Fault::Before => return error(StatusCode::INTERNAL_SERVER_ERROR, "injected failure"),
        _ => {}
    }
    let answer = match decide(&key) {
        Ok(a) => a,
        Err((status, msg)) => return error(status, &msg),
    };
    let answer = match p.ledger.apply_about(kind, &key, about, answer) {
        Ok((a, _)) => a,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    if matches!(fault, Fault::After) {
        // Applied, but the answer is lost: the caller must retry with the same key.
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "injected failure after applying",
        );
    }
    Json(answer).into_response()
}

/// Addresses of the three providers, as the service reads them. No secrets: this is
/// printed and written to `addresses.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Addresses {
    /// Payments base URL.
    pub payments: String,
    /// Inventory base URL.
    pub inventory: String,
    /// Orders base URL.
    pub orders: String,
}

/// The environment variable (or secrets-file entry) of the shop's OAuth client secret at
/// payments.
pub const CLIENT_SECRET_VAR: &str = "PAYMENTS_CLIENT_SECRET";
/// The environment variable (or secrets-file entry) of the webhook signing secrets: a
/// comma-separated list. Payments signs with the first; the service accepts any of them,
/// so a secret is rotated by putting the new one first, then dropping the old one.
pub const WEBHOOK_SECRET_VAR: &str = "PAYMENTS_WEBHOOK_SECRET";

/// The secrets payments shares with the shop. `Debug` shows neither.
#[derive(Clone, Debug)]
pub struct ProviderSecrets {
    /// The OAuth client secret of the shop (client id `shop`).
    pub client_secret: Secret,
    /// The secret payments signs webhooks with.
    pub webhook_secret: Secret,
}

impl ProviderSecrets {
    /// Two fresh random secrets (256 bits each, from the operating system).
    ///
    /// # Errors
    ///
    /// If the operating system has no randomness to give.
    pub fn generate() -> anyhow::Result<Self> {
        Ok(ProviderSecrets {
            client_secret: random_secret("cs_")?,
            webhook_secret: random_secret("whsec_")?,
        })
    }

    /// The secrets `lookup` finds under [`CLIENT_SECRET_VAR`] and [`WEBHOOK_SECRET_VAR`]
    /// (the first of its list), each generated if unset or empty. Also returns the names
    /// of those that were generated.
    ///
    /// # Errors
    ///
    /// As [`ProviderSecrets::generate`].
    pub fn from_lookup_or_generate(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<(Self, Vec<&'static str>)> {
        let mut generated = Vec::new();
        let client_secret = match lookup(CLIENT_SECRET_VAR).filter(|v| !v.trim().is_empty()) {
            Some(v) => Secret::new(v.trim()),
            None => {
                generated.push(CLIENT_SECRET_VAR);
                random_secret("cs_")?
            }
        };
        let first = lookup(WEBHOOK_SECRET_VAR).and_then(|v| {
            v.split(',')
                .map(str::trim)
                .find(|s| !s.is_empty())
                .map(str::to_string)
        });
        let webhook_secret = match first {
            Some(v) => Secret::new(v),
            None => {
                generated.push(WEBHOOK_SECRET_VAR);
                random_secret("whsec_")?
            }
        };
        Ok((
            ProviderSecrets {
                client_secret,
                webhook_secret,
            },
            generated,
        ))
    }

    /// Writes the secrets named in `names` as `NAME=value` lines (the format of
    /// `.env.example` and of the service's `--env-file`) to `path`. The file is created
    /// with mode 0600, and an existing file is set to 0600 before anything is written.
    ///
    /// # Errors
    ///
    /// If the file cannot be written.
    pub fn write_env_file(&self, path: &Path, names: &[&str]) -> std::io::Result<()> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let mut text = String::from("# Generated by `order-processing providers`; keep private.\n");
        for name in names {
            let value = match *name {
                CLIENT_SECRET_VAR => &self.client_secret,
                WEBHOOK_SECRET_VAR => &self.webhook_secret,
                _ => continue,
            };
            text.push_str(&format!("{name}={}\n", value.expose()));
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()
    }
}

fn random_secret(prefix: &str) -> anyhow::Result<Secret> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a secret: {e}"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(Secret::new(format!("{prefix}{hex}")))
}

/// The running providers and their ledgers.
#[derive(Debug)]
pub struct Providers {
    /// Where they listen.
    pub addresses: Addresses,
    /// Payments' ledger (charges, refunds).
    pub payments: Arc<Ledger>,
    /// Inventory's ledger (reservations, releases).
    pub inventory: Arc<Ledger>,
    /// Orders' ledger (orders, shipments).
    pub orders: Arc<Ledger>,
    /// Payments' settlement outbox: a `settlement` entry (key: the event id, answer:
    /// the webhook's body) when a charge is first taken, an `acknowledged` entry (key:
    /// `ack/<event id>`, answer: the status and body of the 2xx) when the shop accepted
    /// it.
    pub settlements: Arc<Ledger>,
    /// Where payments sends its webhooks: it tries each in turn until one answers 2xx.
    pub webhook_urls: Arc<Mutex<Vec<String>>>,
    /// The secrets payments shares with the shop.
    pub secrets: ProviderSecrets,
}

struct PaymentsState {
    p: Provider,
    tokens: Mutex<HashMap<String, Instant>>,
    issued: AtomicU64,
    client_secret: Secret,
    webhook_secret: Secret,
    webhook_urls: Arc<Mutex<Vec<String>>>,
    settlements: Arc<Ledger>,
}

async fn token(State(s): State<Arc<PaymentsState>>, headers: HeaderMap) -> Response {
    let want = format!(
        "Basic {}",
        b64(&format!("shop:{}", s.client_secret.expose()))
    );
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let n = s.issued.fetch_add(1, Ordering::Relaxed);
    let t = format!("tok-{n}-{}", s.p.started.elapsed().as_nanos());
    // Tokens live 5 seconds: long runs see them expire and refresh.
    s.tokens
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(t.clone(), Instant::now() + Duration::from_secs(5));
    Json(json!({ "access_token": t, "token_type": "bearer", "expires_in": 5 })).into_response()
}

fn authorized(s: &PaymentsState, headers: &HeaderMap) -> bool {
    let Some(t) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let g = s.tokens.lock().unwrap_or_else(|p| p.into_inner());
    g.get(t).is_some_and(|until| Instant::now() < *until)
}

async fn charge(
    State(s): State<Arc<PaymentsState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&s, &headers) {
        return error(StatusCode::UNAUTHORIZED, "token expired or unknown");
    }
    let cents = body["amount_cents"].as_u64().unwrap_or(0);
    let resp = operate(&s.p, &headers, "charge", None, |key| {
        if cents % 100 == 13 {
            return Err((StatusCode::PAYMENT_REQUIRED, "card declined".into()));
        }
        Ok(json!({ "charge_id": format!("ch_{}", short(key)), "amount_cents": cents }))
    })
    .await;
    // Taken (whether or not its answer got back: an injected failure after applying
    // loses only the answer): it settles, once. The outbox entry is written once per
    // charge, so a retried charge does not settle twice.
    if let Some(key) = key_of(&headers) {
        if let Some(taken) = s.p.ledger.get(&key) {
            let event = settlement_event(&key, &taken);
            let id = event["id"].as_str().unwrap_or_default().to_string();
            if s.settlements.get(&id).is_none() {
                match s.settlements.apply_once("settlement", &id, event.clone()) {
                    Ok((_, true)) => settle_later(s.clone(), event),
                    Ok((_, false)) => {}
                    Err(e) => tracing::error!(error = %e, "payments cannot record a settlement"),
                }
            }
        }
    }
    resp
}

/// The `charge.settled` event of the charge taken under `key` with answer `taken`.
fn settlement_event(key: &str, taken: &Value) -> Value {
    json!({
        "id": format!("evt_{}", short(key)),
        "type": "charge.settled",
        "charge_id": taken["charge_id"],
        "charge_key": key,
        "amount_cents": taken["amount_cents"],
        "settlement_id": format!("st_{}", short(key)),
    })
}

/// Sends the signed settlement webhook `event`, retrying (100 ms, doubling to 2 s,
/// across the webhook addresses in turn) until one answers 2xx, and records the
/// acknowledgement in the outbox. Any other answer, or none, is retried: a 5xx, a
/// refusal, a connection refused while the service restarts.
fn settle_later(s: Arc<PaymentsState>, event: Value) {
    tokio::spawn(async move {
        let id = event["id"].as_str().unwrap_or_default().to_string();
        let body = event.to_string();
        let within = s.p.faults.settle_within_ms;
        if within > 0 {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in id.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            tokio::time::sleep(Duration::from_millis(h % (within + 1))).await;
        }
        let client = reqwest::Client::new();
        let mut pause = Duration::from_millis(100);
        for attempt in 0u64.. {
            let urls = s
                .webhook_urls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if !urls.is_empty() {
                let url = &urls[(attempt as usize) % urls.len()];
                let sig = sagaflow_steps::webhook::sign(
                    &s.webhook_secret,
                    SystemTime::now(),
                    body.as_bytes(),
                );
                let sent = client
                    .post(url)
                    .header("signature", sig)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await;
                if let Ok(r) = sent {
                    let status = r.status().as_u16();
                    if r.status().is_success() {
                        let answer = r.json::<Value>().await.unwrap_or(Value::Null);
                        let ack =
                            json!({ "status": status, "answer": answer, "attempts": attempt + 1 });
                        if let Err(e) =
                            s.settlements
                                .apply("acknowledged", &format!("ack/{id}"), ack)
                        {
                            tracing::error!(error = %e, "payments cannot record an acknowledgement");
                        }
                        return;
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    });
}

async fn refund(
    State(s): State<Arc<PaymentsState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&s, &headers) {
        return error(StatusCode::UNAUTHORIZED, "token expired or unknown");
    }
    let charge_key = body["charge_key"].as_str();
    let charged = charge_key
        .map(|k| s.p.ledger.get(k).is_some())
        .unwrap_or(false);
    operate(&s.p, &headers, "refund", charge_key, |_| {
        Ok(json!({ "refunded": charged }))
    })
    .await
}

struct InventoryState {
    p: Provider,
    per_second: u64,
    window: Mutex<(u64, u64)>,
}

async fn reserve(
    State(s): State<Arc<InventoryState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(limited) = over_rate(&s) {
        return limited;
    }
    let sku = body["sku"].as_str().unwrap_or("").to_string();
    let qty = body["quantity"].as_u64().unwrap_or(0);
    operate(&s.p, &headers, "reserve", None, |key| {
        if sku == "sold-out" {
            return Err((
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{sku} is out of stock"),
            ));
        }
        Ok(json!({ "reservation_id": format!("rs_{}", short(key)), "quantity": qty }))
    })
    .await
}

/// A 429 with Retry-After past inventory's rate (every call counts, lookups too).
fn over_rate(s: &InventoryState) -> Option<Response> {
    let sec = s.p.started.elapsed().as_secs();
    let mut w = s.window.lock().unwrap_or_else(|p| p.into_inner());
    if w.0 != sec {
        *w = (sec, 0);
    }
    w.1 += 1;
    (w.1 > s.per_second).then(|| {
        (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "rate limited",
        )
            .into_response()
    })
}

async fn release(
    State(s): State<Arc<InventoryState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let reservation_key = body["reservation_key"].as_str();
    let reserved = reservation_key
        .map(|k| s.p.ledger.get(k).is_some())
        .unwrap_or(false);
    operate(&s.p, &headers, "release", reservation_key, |_| {
        Ok(json!({ "released": reserved }))
    })
    .await
}

async fn create_order(
    State(p): State<Arc<Provider>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let charge = body["charge_id"].as_str().unwrap_or("").to_string();
    let customer = body["customer"].as_str().unwrap_or("").to_string();
    // The business order id (the shop's order id: its saga's id), so that every order
    // for it can be found, one made outside any saga included.
    let order_id = body["order_id"].as_str().filter(|o| !o.is_empty());
    operate(&p, &headers, "order", order_id, |key| {
        if charge.is_empty() {
            return Err((StatusCode::BAD_REQUEST, "charge_id required".into()));
        }
        // A blocked customer is found out only after the charge: the pivot fails and
        // the charge must be refunded.
        if customer == "customer-13" {
            return Err((
                StatusCode::UNPROCESSABLE_ENTITY,
                "customer is blocked".into(),
            ));
        }
        Ok(json!({ "order_number": format!("on_{}", short(key)) }))
    })
    .await
}

async fn book(
    State(p): State<Arc<Provider>>,
    headers: HeaderMap,
    Json(_body): Json<Value>,
) -> Response {
    operate(&p, &headers, "shipment", None, |key| {
        Ok(json!({ "tracking": format!("tr_{}", short(key)) }))
    })
    .await
}

/// The query of a lookup: by idempotency key, and for orders also by business order id.
#[derive(Debug, Deserialize)]
struct Lookup {
    key: Option<String>,
    order_id: Option<String>,
}

impl Lookup {
    fn key(&self) -> Option<&str> {
        self.key.as_deref().filter(|k| !k.is_empty())
    }

    fn order_id(&self) -> Option<&str> {
        self.order_id.as_deref().filter(|k| !k.is_empty())
    }
}

/// The faults a lookup sees: the latency, the outages and the failure rate (a lookup
/// applies nothing, so a failure is a 500 either way).
async fn lookup_fault(p: &Provider, key: &str) -> Option<Response> {
    p.pause().await;
    match p.fault(key) {
        Fault::None => None,
        Fault::Outage(left) => Some(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", left.max(1).to_string())],
                "planned outage",
            )
                .into_response(),
        ),
        Fault::Before | Fault::After => {
            Some(error(StatusCode::INTERNAL_SERVER_ERROR, "injected failure"))
        }
    }
}

/// An entry as a lookup shows it: its answer's fields, its key and what it is about,
/// and `extra`.
fn shown(e: &Entry, extra: &[(&str, Value)]) -> Value {
    let mut v = match &e.answer {
        Value::Object(o) => Value::Object(o.clone()),
        other => json!({ "answer": other }),
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("key".into(), json!(e.key));
        if let Some(a) = &e.about {
            o.insert("about".into(), json!(a));
        }
        for (k, x) in extra {
            o.insert((*k).to_string(), x.clone());
        }
    }
    v
}

/// How many undos of `kind` about `key` in `ledger` undid something (`field` true: a
/// refund or release of what never happened answers false).
fn undone(ledger: &Ledger, key: &str, kind: &str, field: &str) -> usize {
    ledger
        .about(key)
        .iter()
        .filter(|e| e.kind == kind && e.answer[field] == Value::Bool(true))
        .count()
}

/// `GET /charges?key=K` (OAuth, as the charges): every charge taken under idempotency
/// key K (one, unless the ledger was tampered with) with `refunded` (whether a refund by
/// that key refunded it) and `refunds` (how many did), as `{"charges": [...]}`.
async fn find_charges(
    State(s): State<Arc<PaymentsState>>,
    headers: HeaderMap,
    Query(q): Query<Lookup>,
) -> Response {
    if !authorized(&s, &headers) {
        return error(StatusCode::UNAUTHORIZED, "token expired or unknown");
    }
    let Some(key) = q.key() else {
        return error(StatusCode::BAD_REQUEST, "the `key` parameter is required");
    };
    if let Some(failed) = lookup_fault(&s.p, key).await {
        return failed;
    }
    let refunds = undone(&s.p.ledger, key, "refund", "refunded");
    let undo = [
        ("refunded", json!(refunds > 0)),
        ("refunds", json!(refunds)),
    ];
    let charges: Vec<Value> =
        s.p.ledger
            .under(key)
            .iter()
            .filter(|e| e.kind == "charge")
            .map(|e| shown(e, &undo))
            .collect();
    Json(json!({ "charges": charges })).into_response()
}

/// `GET /reservations?key=K`: every reservation made under idempotency key K with
/// `released` and `releases`, as `{"reservations": [...]}`. Counts against inventory's
/// rate.
async fn find_reservations(
    State(s): State<Arc<InventoryState>>,
    Query(q): Query<Lookup>,
) -> Response {
    if let Some(limited) = over_rate(&s) {
        return limited;
    }
    let Some(key) = q.key() else {
        return error(StatusCode::BAD_REQUEST, "the `key` parameter is required");
    };
    if let Some(failed) = lookup_fault(&s.p, key).await {
        return failed;
    }
    let releases = undone(&s.p.ledger, key, "release", "released");
    let undo = [
        ("released", json!(releases > 0)),
        ("releases", json!(releases)),
    ];
    let reservations: Vec<Value> =
        s.p.ledger
            .under(key)
            .iter()
            .filter(|e| e.kind == "reserve")
            .map(|e| shown(e, &undo))
            .collect();
    Json(json!({ "reservations": reservations })).into_response()
}

/// `GET /orders?key=K&order_id=O` (either or both): every order made under idempotency
/// key K or for business order id O (under any key: one made outside any saga too),
/// each once, with its `key` and `about` (the order id), as `{"orders": [...]}`.
async fn find_orders(State(p): State<Arc<Provider>>, Query(q): Query<Lookup>) -> Response {
    let (key, order_id) = (q.key(), q.order_id());
    let Some(first) = key.or(order_id) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the `key` or `order_id` parameter is required",
        );
    };
    if let Some(failed) = lookup_fault(&p, first).await {
        return failed;
    }
    let orders: Vec<Value> = p
        .ledger
        .under_or_about(key, order_id)
        .iter()
        .filter(|e| e.kind == "order")
        .map(|e| shown(e, &[]))
        .collect();
    Json(json!({ "orders": orders })).into_response()
}

/// `GET /shipments?key=K`: every shipment booked under idempotency key K, as
/// `{"shipments": [...]}`.
async fn find_shipments(State(p): State<Arc<Provider>>, Query(q): Query<Lookup>) -> Response {
    let Some(key) = q.key() else {
        return error(StatusCode::BAD_REQUEST, "the `key` parameter is required");
    };
    if let Some(failed) = lookup_fault(&p, key).await {
        return failed;
    }
    let shipments: Vec<Value> = p
        .ledger
        .under(key)
        .iter()
        .filter(|e| e.kind == "shipment")
        .map(|e| shown(e, &[]))
        .collect();
    Json(json!({ "shipments": shipments })).into_response()
}

fn short(key: &str) -> String {
    key.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(40)
        .collect()
}

fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn serve(app: Router) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

/// Starts the three providers with ledgers in `dir`. `webhook_urls` is where payments
/// delivers its webhooks (it can be set later, when the service's address is known;
/// with several, each retry goes to the next); `secrets` are the ones payments shares
/// with the shop. Settlements in the outbox that were never acknowledged (the providers
/// stopped before) are sent again.
pub async fn start(
    dir: &Path,
    faults: Faults,
    inventory_per_second: u64,
    webhook_urls: Arc<Mutex<Vec<String>>>,
    secrets: ProviderSecrets,
) -> anyhow::Result<Providers> {
    std::fs::create_dir_all(dir)?;
    let provider = |name: &str| -> anyhow::Result<Provider> {
        Ok(Provider {
            faults: faults.clone(),
            started: Instant::now(),
            ledger: Ledger::open(&dir.join(format!("{name}.jsonl")))?,
            calls: AtomicU64::new(0),
        })
    };
    let settlements = Ledger::open(&dir.join("settlements.jsonl"))?;
    let payments = Arc::new(PaymentsState {
        p: provider("payments")?,
        tokens: Mutex::new(HashMap::new()),
        issued: AtomicU64::new(0),
        client_secret: secrets.client_secret.clone(),
        webhook_secret: secrets.webhook_secret.clone(),
        webhook_urls: webhook_urls.clone(),
        settlements: settlements.clone(),
    });
    for e in settlements.entries() {
        if e.kind == "settlement" && settlements.get(&format!("ack/{}", e.key)).is_none() {
            settle_later(payments.clone(), e.answer);
        }
    }
    let inventory = Arc::new(InventoryState {
        p: provider("inventory")?,
        per_second: inventory_per_second,
        window: Mutex::new((0, 0)),
    });
    let orders = Arc::new(provider("orders")?);
    let (pl, il, ol) = (
        payments.p.ledger.clone(),
        inventory.p.ledger.clone(),
        orders.ledger.clone(),
    );
    let payments_url = serve(
        Router::new()
            .route("/oauth/token", post(token))
            .route("/charges", post(charge).get(find_charges))
            .route("/refunds", post(refund))
            .with_state(payments),
    )
    .await?;
    let inventory_url = serve(
        Router::new()
            .route("/reservations", post(reserve).get(find_reservations))
            .route("/releases", post(release))
            .with_state(inventory),
    )
    .await?;
    let orders_url = serve(
        Router::new()
            .route("/orders", post(create_order).get(find_orders))
            .route("/shipments", post(book).get(find_shipments))
            .with_state(orders),
    )
    .await?;
    Ok(Providers {
        addresses: Addresses {
            payments: payments_url,
            inventory: inventory_url,
            orders: orders_url,
        },
        payments: pl,
        inventory: il,
        orders: ol,
        settlements,
        webhook_urls,
        secrets,
    })
}
