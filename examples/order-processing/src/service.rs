//! The order service: `POST /orders`, `GET /orders/{id}`, and the payments webhook;
//! [`run`] serves it, and the admin API on a listener of its own.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{anyhow, Context};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sagaflow::machine::Event;
use sagaflow::store::Delivered;
use sagaflow::{Engine, Error, SagaId, StartKey};
use sagaflow_admin::Auth;
use sagaflow_steps::secrets::{Secret, Secrets};
use sagaflow_steps::webhook::{Verifier, WebhookError};
use serde_json::{json, Value};

use crate::providers::{CLIENT_SECRET_VAR, WEBHOOK_SECRET_VAR};
use crate::saga::{settlement_key, OrderRequest};
use crate::server::{self, ConnStats, Limits};

/// What the handlers share.
#[derive(Debug)]
pub struct Service {
    engine: Arc<Engine>,
    verifier: Verifier,
    /// Settlements delivered to the engine (new, and durable before the 2xx).
    pub webhooks_accepted: AtomicU64,
    /// Authentic settlements the engine had already recorded (by event id), before or
    /// after a restart: answered 2xx, recorded once.
    pub webhooks_duplicate: AtomicU64,
    /// Webhooks refused (forged, stale, malformed).
    pub webhooks_refused: AtomicU64,
}

impl Service {
    /// The service over `engine`, verifying webhooks signed with any of
    /// `webhook_secrets` (several while a secret is rotated). A settlement webhook is
    /// delivered to the engine's inbox, where the order's `settle` step takes it; the
    /// inbox is also the memory of the event ids already received (the webhook's event
    /// id is the delivery id), durable in the engine's store, so a webhook replayed after
    /// a restart, or to another replica, is a duplicate.
    ///
    /// # Errors
    ///
    /// If `webhook_secrets` is empty.
    pub fn new(engine: Arc<Engine>, webhook_secrets: Vec<Secret>) -> anyhow::Result<Arc<Self>> {
        if webhook_secrets.is_empty() {
            return Err(anyhow!("no webhook secret: every webhook would be refused"));
        }
        Ok(Arc::new(Service {
            engine,
            // The verifier's own memory of event ids is per process; the engine's inbox
            // decides what is a duplicate (see `webhook`), so it is kept minimal.
            verifier: Verifier::new(webhook_secrets).with_memory(1),
            webhooks_accepted: AtomicU64::new(0),
            webhooks_duplicate: AtomicU64::new(0),
            webhooks_refused: AtomicU64::new(0),
        }))
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
            Event::Awaiting { attempt, key, .. } => json!({ "attempt": attempt, "key": key }),
            Event::EventReceived {
                attempt, delivery, ..
            } => json!({ "attempt": attempt, "delivery": delivery }),
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
        // mean authentic; the engine's inbox decides what is a duplicate.
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
    if event["type"] != "charge.settled" {
        s.webhooks_refused.fetch_add(1, Ordering::Relaxed);
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "only `charge.settled` events are handled",
        );
    }
    let Some(charge) = event["charge_id"].as_str().filter(|c| !c.is_empty()) else {
        s.webhooks_refused.fetch_add(1, Ordering::Relaxed);
        return refuse(StatusCode::BAD_REQUEST, "the event has no `charge_id`");
    };
    // Delivered to the `settle` step of the order that took this charge (now, or when
    // it gets there), with the event id as the delivery id. `deliver` returns once the
    // delivery is durable: only then is the sender told 2xx, so a crash before that is
    // covered by its retries, and a retry after it is a duplicate.
    match s.engine.deliver(&settlement_key(charge), &id, event).await {
        Ok(Delivered::Duplicate) => {
            s.webhooks_duplicate.fetch_add(1, Ordering::Relaxed);
            (StatusCode::OK, Json(json!({ "delivery": "duplicate" }))).into_response()
        }
        Ok(_) => {
            s.webhooks_accepted.fetch_add(1, Ordering::Relaxed);
            (StatusCode::ACCEPTED, Json(json!({ "delivery": "new" }))).into_response()
        }
        Err(
            e @ (Error::InvalidDelivery(_)
            | Error::PayloadTooLarge { .. }
            | Error::PayloadTooDeep { .. }),
        ) => {
            s.webhooks_refused.fetch_add(1, Ordering::Relaxed);
            refuse(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        // Not recorded: the sender is not told 2xx, so it sends it again.
        Err(e @ Error::ShuttingDown) => refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => {
            tracing::error!(error = %e, "cannot deliver a settlement");
            refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot record the webhook: {e}"),
            )
        }
    }
}
