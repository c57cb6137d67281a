//! The order service: `POST /orders`, `GET /orders/{id}`, and the payments webhook;
//! [`run`] serves it, and the admin API on a listener of its own.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::{anyhow, Context};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sagaflow::machine::Event;
use sagaflow::{Engine, Error, SagaId, StartKey};
use sagaflow_admin::Auth;
use sagaflow_steps::secrets::{Secret, Secrets};
use sagaflow_steps::webhook::{Verifier, WebhookError};
use serde_json::{json, Value};

use crate::providers::{CLIENT_SECRET_VAR, WEBHOOK_SECRET_VAR};
use crate::saga::OrderRequest;
use crate::server::{self, ConnStats, Limits};

/// What the handlers share.
#[derive(Debug)]
pub struct Service {
    engine: Arc<Engine>,
    verifier: Verifier,
    settled: Settled,
    /// Webhooks accepted (and recorded).
    pub webhooks_accepted: AtomicU64,
    /// Authentic webhooks refused as already received, before or after a restart.
    pub webhooks_duplicate: AtomicU64,
    /// Webhooks refused (forged, stale, malformed).
    pub webhooks_refused: AtomicU64,
}

impl Service {
    /// The service over `engine`, verifying webhooks signed with any of
    /// `webhook_secrets` (several while a secret is rotated) and recording settled
    /// charges in `data_dir/settled.jsonl`. That file is also the memory of the event
    /// ids already received: it is read here, so a webhook replayed after a restart is
    /// still a duplicate.
    ///
    /// # Errors
    ///
    /// If `webhook_secrets` is empty, or the settlements file cannot be read or opened,
    /// or has a line that does not decode.
    pub fn new(
        engine: Arc<Engine>,
        webhook_secrets: Vec<Secret>,
        data_dir: &Path,
    ) -> anyhow::Result<Arc<Self>> {
        if webhook_secrets.is_empty() {
            return Err(anyhow!("no webhook secret: every webhook would be refused"));
        }
        Ok(Arc::new(Service {
            engine,
            verifier: Verifier::new(webhook_secrets),
            settled: Settled::open(&data_dir.join("settled.jsonl"))?,
            webhooks_accepted: AtomicU64::new(0),
            webhooks_duplicate: AtomicU64::new(0),
            webhooks_refused: AtomicU64::new(0),
        }))
    }
}

/// `settled.jsonl`: one line per accepted webhook, appended and fsynced before the 2xx,
/// and the set of event ids in it.
#[derive(Debug)]
struct Settled {
    path: PathBuf,
    inner: Mutex<SettledInner>,
}

#[derive(Debug)]
struct SettledInner {
    file: File,
    len: u64,
    seen: HashSet<String>,
}

impl Settled {
    fn open(path: &Path) -> anyhow::Result<Settled> {
        let existed = path.exists();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if !existed {
            // A new file's name is durable once its directory is synced.
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            File::open(dir).and_then(|d| d.sync_all())?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        // A line is written whole and fsynced before the webhook is answered, so bytes
        // after the last newline are a write the sender was never told about: it sends
        // the webhook again. They are cut off, or the next line would be glued to them.
        let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if whole < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                bytes = bytes.len() - whole,
                "settled.jsonl ends with a torn line (a crash mid-write); cutting it off"
            );
            file.set_len(whole as u64)?;
            file.sync_all()?;
        }
        let mut seen = HashSet::new();
        for (i, line) in bytes[..whole].split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value = serde_json::from_slice(line).map_err(|e| {
                anyhow!(
                    "{} line {}: {e}; the file is damaged: restore it or remove the line",
                    path.display(),
                    i + 1
                )
            })?;
            let Some(id) = v["event"].as_str() else {
                return Err(anyhow!("{} line {}: no `event` id", path.display(), i + 1));
            };
            seen.insert(id.to_string());
        }
        Ok(Settled {
            path: path.to_path_buf(),
            inner: Mutex::new(SettledInner {
                file,
                len: whole as u64,
                seen,
            }),
        })
    }

    /// Records `event` once: `Ok(true)` when it is new and now durable, `Ok(false)` if
    /// it was recorded before. Blocks on an fsync.
    fn record(&self, event: &str, charge_key: &Value) -> std::io::Result<bool> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.seen.contains(event) {
            return Ok(false);
        }
        let mut line = json!({ "event": event, "charge_key": charge_key }).to_string();
        line.push('\n');
        let written = g
            .file
            .write_all(line.as_bytes())
            .and_then(|()| g.file.sync_data());
        if let Err(e) = written {
            // Leave no partial line for the next append to be glued to.
            let len = g.len;
            let _ = g.file.set_len(len);
            tracing::error!(path = %self.path.display(), error = %e, "cannot record a webhook");
            return Err(e);
        }
        g.len += line.len() as u64;
        g.seen.insert(event.to_string());
        Ok(true)
    }
}

/// The service's secrets: from the environment, else from a `NAME=value` file (see
/// `.env.example`). `Debug` shows none of them.
#[derive(Debug)]
pub struct ServiceSecrets {
    /// The shop's OAuth client secret at payments ([`CLIENT_SECRET_VAR`]).
    pub client_secret: Secret,
    /// The webhook secrets accepted ([`WEBHOOK_SECRET_VAR`], comma-separated).
    pub webhook_secrets: Vec<Secret>,
    /// The admin API's tokens, if the admin token is set.
    pub admin: Option<Auth>,
}

impl ServiceSecrets {
    /// From the environment, falling back to `env_file` for what it does not set.
    ///
    /// # Errors
    ///
    /// As [`ServiceSecrets::from_lookup`], or if `env_file` cannot be read.
    pub fn load(env_file: Option<&Path>) -> anyhow::Result<Self> {
        let file = match env_file {
            Some(p) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        path = %p.display(),
                        mode = format!("{:o}", mode & 0o777),
                        "the env file holds secrets but other users can read it: chmod 600 it"
                    );
                }
                Secrets::from_file(p)?
            }
            None => Secrets::default(),
        };
        ServiceSecrets::from_lookup(|name| file.get(name).ok().map(|s| s.expose().to_string()))
    }

    /// From what `lookup` finds.
    ///
    /// # Errors
    ///
    /// If the client secret or every webhook secret is missing, or an admin token is
    /// short (see [`Auth::from_lookup`]).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let admin = Auth::from_lookup(&lookup)?;
        let client_secret = lookup(CLIENT_SECRET_VAR)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                anyhow!("{CLIENT_SECRET_VAR} is not set: set it in the environment or in the --env-file")
            })?;
        let webhook_secrets = webhook_secrets(&lookup(WEBHOOK_SECRET_VAR).unwrap_or_default())
            .map_err(|e| {
                anyhow!("{WEBHOOK_SECRET_VAR}: {e}: set it in the environment or in the --env-file")
            })?;
        Ok(ServiceSecrets {
            client_secret: Secret::new(client_secret),
            webhook_secrets,
            admin,
        })
    }
}

/// The webhook secrets in a comma-separated list (blanks around each are trimmed).
///
/// # Errors
///
/// If the list has no secret, or an empty entry (`a,,b`: a typo that would go unseen).
pub fn webhook_secrets(list: &str) -> anyhow::Result<Vec<Secret>> {
    if list.trim().is_empty() {
        return Err(anyhow!("no webhook secret"));
    }
    list.split(',')
        .map(str::trim)
        .map(|s| {
            if s.is_empty() {
                Err(anyhow!("an empty entry in the list of webhook secrets"))
            } else {
                Ok(Secret::new(s))
            }
        })
        .collect()
}

/// Where and how [`run`] listens.
#[derive(Debug)]
pub struct Listeners {
    /// The public listener: orders and webhooks.
    pub public: tokio::net::TcpListener,
    /// The admin API's own listener and its tokens, if it is on.
    pub admin: Option<(tokio::net::TcpListener, Auth)>,
    /// The limits of each listener.
    pub limits: Limits,
    /// What the public listener's connections did.
    pub public_stats: Arc<ConnStats>,
}

/// Serves `service` on the public listener and, if configured, the admin API over
/// `engine` on its own listener, until `shutdown` completes.
///
/// # Errors
///
/// If the limits are invalid.
pub async fn run(
    service: Arc<Service>,
    engine: Arc<Engine>,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let public = server::serve(
        "public",
        listeners.public,
        app(service),
        listeners.limits,
        listeners.public_stats,
        stopped(stop_rx.clone()),
    );
    let admin = async {
        match listeners.admin {
            Some((listener, auth)) => {
                server::serve(
                    "admin",
                    listener,
                    sagaflow_admin::router(engine, auth),
                    listeners.limits,
                    Arc::default(),
                    stopped(stop_rx.clone()),
                )
                .await
            }
            None => Ok(()),
        }
    };
    let signal = async {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let (p, a, ()) = tokio::join!(public, admin, signal);
    p.and(a)
}

/// The service's routes.
pub fn app(service: Arc<Service>) -> Router {
    Router::new()
        .route("/orders", post(place))
        .route("/orders/{id}", get(show))
        .route("/webhooks/payments", post(webhook))
        .with_state(service)
}

fn refuse(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

/// `application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

async fn place(State(s): State<Arc<Service>>, headers: HeaderMap, body: Bytes) -> Response {
    if !is_json(&headers) {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "an order is sent as Content-Type: application/json",
        );
    }
    let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the Idempotency-Key header is required",
        );
    };
    let key = match StartKey::new(key) {
        Ok(k) => k,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if body.len() > 16 * 1024 {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "an order is at most 16 KiB");
    }
    let order: OrderRequest = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("not an order: {e}")),
    };
    let problems = order.problems();
    if !problems.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, problems.join("; "));
    }
    // The same key with another order is refused by the engine (G6): it never charges
    // again.
    let id = match s.engine.start_once("order", &order, key).await {
        Ok(started) => started.id(),
        Err(e @ Error::ShuttingDown) => {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Err(Error::StartKeyConflict { .. }) => {
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "this Idempotency-Key was already used for a different order",
            )
        }
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let status = s
        .engine
        .status(id)
        .map(|m| m.status.to_string())
        .unwrap_or_default();
    (
        StatusCode::ACCEPTED,
        Json(json!({ "order_id": id, "status": status })),
    )
        .into_response()
}

async fn show(State(s): State<Arc<Service>>, UrlPath(id): UrlPath<String>) -> Response {
    let Ok(id) = id.parse::<SagaId>() else {
        return refuse(StatusCode::BAD_REQUEST, "not an order id");
    };
    let meta = match s.engine.status(id) {
        Ok(m) => m,
        Err(Error::UnknownSaga(_)) => return refuse(StatusCode::NOT_FOUND, "no such order"),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let history = s.engine.history(id).unwrap_or_default();
    let names: Vec<String> = match history.first().map(|r| &r.event) {
        Some(Event::Started { steps, .. }) => steps.clone(),
        _ => Vec::new(),
    };
    let step_of = |e: &Event| e.step().and_then(|i| names.get(i as usize).cloned());
    let detail = |e: &Event| -> Value {
        match e {
            Event::StepAttemptStarted { attempt, .. }
            | Event::CompensationAttemptStarted { attempt, .. } => json!({ "attempt": attempt }),
            Event::StepFailed {
                attempt,
                error,
                retry_at,
                ..
            }
            | Event::CompensationFailed {
                attempt,
                error,
                retry_at,
                ..
            } => json!({
                "attempt": attempt,
                "error": error,
                "retry_at": retry_at.map(|t| t.to_string()),
            }),
            Event::CompensationBegan { reason } => json!({ "reason": reason }),
            Event::Parked { reason } => json!({ "reason": reason.message }),
            _ => Value::Null,
        }
    };
    let timeline: Vec<Value> = history
        .iter()
        .map(|r| {
            json!({
                "at": r.at.to_string(),
                "event": r.event.name(),
                "step": step_of(&r.event),
                "detail": detail(&r.event),
            })
        })
        .collect();
    Json(json!({
        "order_id": id,
        "status": meta.status,
        "reason": meta.reason,
        "timeline": timeline,
    }))
    .into_response()
}

async fn webhook(State(s): State<Arc<Service>>, headers: HeaderMap, body: Bytes) -> Response {
    let header = headers
        .get("signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let id = match event["id"].as_str() {
        Some(id) if !id.is_empty() => id.to_string(),
        // Without an id a redelivery cannot be told from a new event.
        _ => {
            s.webhooks_refused.fetch_add(1, Ordering::Relaxed);
            return refuse(StatusCode::BAD_REQUEST, "the event has no `id`");
        }
    };
    // Large bodies are hashed off the runtime's threads.
    let verdict = s
        .verifier
        .verify_async(header, body.clone(), &id, SystemTime::now())
        .await;
    match verdict {
        // The verifier checks the signature before its in-memory replay check, so both
        // mean authentic; the durable record below decides what is a duplicate.
        Ok(()) | Err(WebhookError::Replayed) => {}
        Err(e @ WebhookError::Interrupted(_)) => {
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Err(e) => {
            s.webhooks_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "refused a payments webhook");
            return refuse(StatusCode::UNAUTHORIZED, e.to_string());
        }
    }
    let charge_key = event["charge_key"].clone();
    let svc = s.clone();
    let recorded = tokio::task::spawn_blocking(move || svc.settled.record(&id, &charge_key)).await;
    match recorded {
        Ok(Ok(true)) => {
            s.webhooks_accepted.fetch_add(1, Ordering::Relaxed);
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(Ok(false)) => {
            s.webhooks_duplicate.fetch_add(1, Ordering::Relaxed);
            refuse(StatusCode::CONFLICT, "already received")
        }
        // Not recorded: the sender is not told 2xx, so it sends it again.
        Ok(Err(e)) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot record the webhook: {e}"),
        ),
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot record the webhook: {e}"),
        ),
    }
}
