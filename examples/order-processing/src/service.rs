//! The order service: `POST /orders`, `GET /orders/{id}`, and the payments webhook.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sagaflow::machine::Event;
use sagaflow::{Engine, Error, SagaId, StartKey};
use sagaflow_steps::secrets::Secret;
use sagaflow_steps::webhook::{Verifier, WebhookError};
use serde_json::{json, Value};

use crate::saga::OrderRequest;

/// What the handlers share.
#[derive(Debug)]
pub struct Service {
    engine: Arc<Engine>,
    verifier: Verifier,
    settled: Mutex<File>,
    /// Webhooks accepted.
    pub webhooks_accepted: AtomicU64,
    /// Webhooks refused (forged, stale, malformed).
    pub webhooks_refused: AtomicU64,
}

impl Service {
    /// The service over `engine`, verifying webhooks signed with `webhook_secret` and
    /// recording settled charges in `data_dir/settled.jsonl`.
    ///
    /// # Errors
    ///
    /// If the settlements file cannot be opened.
    pub fn new(
        engine: Arc<Engine>,
        webhook_secret: Secret,
        data_dir: &Path,
    ) -> anyhow::Result<Arc<Self>> {
        let settled = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("settled.jsonl"))?;
        Ok(Arc::new(Service {
            engine,
            verifier: Verifier::new(vec![webhook_secret]),
            settled: Mutex::new(settled),
            webhooks_accepted: AtomicU64::new(0),
            webhooks_refused: AtomicU64::new(0),
        }))
    }
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

async fn place(State(s): State<Arc<Service>>, headers: HeaderMap, body: Bytes) -> Response {
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
    let id = match s.engine.start("order", &order, Some(key)).await {
        Ok(id) => id,
        Err(e @ Error::ShuttingDown) => {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    // The same key with another order is refused: it never charges again.
    let stored = s.engine.state(id).map(|st| (*st.input).clone());
    let sent = serde_json::to_value(&order).unwrap_or(Value::Null);
    match stored {
        Ok(v) if v == sent => {}
        Ok(_) => {
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "this Idempotency-Key was already used for a different order",
            )
        }
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
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
    let id = event["id"].as_str().unwrap_or("");
    match s.verifier.verify(header, &body, id, SystemTime::now()) {
        Ok(()) => {
            s.webhooks_accepted.fetch_add(1, Ordering::Relaxed);
            let mut f = s.settled.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(
                f,
                "{}",
                json!({ "event": id, "charge_key": event["charge_key"] })
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Err(WebhookError::Replayed) => refuse(StatusCode::CONFLICT, "already received"),
        Err(e) => {
            s.webhooks_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "refused a payments webhook");
            refuse(StatusCode::UNAUTHORIZED, e.to_string())
        }
    }
}
