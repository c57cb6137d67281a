//! The admin HTTP API of a running engine: the queries and repairs of the `sagaflow` CLI,
//! as JSON, behind bearer tokens.
//!
//! Two tokens: a **read** token (list, show, stats, drifts, metrics) and an **admin** token
//! (everything, repairs included). Tokens are compared in constant time; a call without
//! a valid token is refused with 401, a read token attempting a repair with 403, and
//! both are logged (without the token).
//!
//! | method and path | token | what |
//! | --- | --- | --- |
//! | `GET /v1/sagas?status=&definition=&older_than_secs=&stuck_for_secs=&limit=` | read | summaries, oldest first; `limit` is 1 or more (`limit=0` is a 400), absent for no limit |
//! | `GET /v1/sagas/{id}` | read | `{ "summary": ..., "history": [...], "problems": [...] }` (problems: what of a damaged log could not be read) |
//! | `GET /v1/stats?stuck_after_secs=` | read | counts by status and definition, oldest, stuck |
//! | `POST /v1/sagas/{id}/repair` | admin | body `{ "action": "resume", "step": 2, "operator": "ana", "reason": "..." }`; `{ "action": "handle_drift", "drift": 7, ... }` marks the drift recorded at lsn 7 handled |
//! | `POST /v1/sagas/{id}/cancel` | admin | body `{ "operator": "ana", "reason": "..." }` |
//! | `POST /v1/purge` | admin | body `{ "finished_before_ms": 1763500000000, "dry_run": true }`: counts (or deletes) finished sagas |
//! | `POST /v1/deliveries` | admin | body `{ "key": "settlement/o1", "id": "wh-81", "payload": {...} }`: an event for the await step waiting on `key`; answered once durable, 201 `{ "delivered": "new" }` or 200 `{ "delivered": "duplicate" }` (this key and id were delivered before: nothing written) |
//! | `POST /v1/sagas/{id}/approve` | admin | body `{ "step": "review", "operator": "ana", "reason": "..." }`: delivers the approval the await step `step` waits for; 201 or 200 as above |
//! | `GET /v1/deliveries?after_key=&after_id=&limit=` | read | the inbox's deliveries, taken (`taken_by`) or not, in the store's stable order after the cursor (both or neither); `limit` 1 to 1000, 100 if absent |
//! | `GET /v1/drifts?after=&limit=` | read | `{ "drifts": [...], "next": "<saga id>" or null }`: the open drifts of up to `limit` sagas (1 to 1000, 100 if absent) in saga id order after the saga `after`, each `{ "saga", "definition", "version", "status", "drift": { "lsn", "at", "step", "step_name", "kind", "expected", "detail", "handled" } }`; `next` is the `after` of the next page, null on the last |
//! | `POST /v1/reconcile` | admin | body none or `{}`: runs the reconciler until it has caught up, answers `{ "sagas", "lookups", "matched", "skipped", "drifts": [...], "position" }` (the drifts it found; `lsn` null for one recorded before) |
//! | `POST /v1/bulk` | admin | body `{ "action": "resume", "status": "parked", "park_kind": "compensation_failed", "operator": "ana", "reason": "..." }` (see [`BulkRequest`] for every filter field): one repair applied to the sagas the filter matches, each recorded on its own saga; answers the [`sagaflow::BulkReport`]. Without `confirm`, a dry run: it counts the sagas matched and those the repair would be accepted for, writes nothing, and answers a `confirm` token; the same request with `"confirm": "<token>"` applies it to exactly those sagas, or is refused if the filter matches anything else by then. 400 with SAGA-0020 without who or why, or for a confirmation that no longer holds |
//! | `GET /metrics` | read | Prometheus text format |
//!
//! Deliveries and approvals need the admin token: like a repair, they change what a
//! saga does next (an approval is an operator's decision, recorded in the log with who
//! and why), so a token that may only look must not send them.
//!
//! Marking a drift handled is a repair (admin token, 409 with SAGA-0012 if no open drift
//! is recorded at that lsn: none, or handled already); listing drifts needs only the
//! read token. Running the reconciler writes drift records, so it needs the admin token;
//! it answers once caught up, which with paced lookups can take a while.
//!
//! Errors are `{ "error": "...", "code": "SAGA-0012" }` with 400 (bad request, malformed
//! JSON), 401, 403, 404 (unknown saga), 409 (repair or cancellation refused), 413 (a
//! body over axum's default 2 MB, or a payload over the engine's limits: SAGA-0006,
//! SAGA-0013), 422 (a delivery or approval refused, SAGA-0019; a corrupt log,
//! SAGA-0009), 503 (shutting down), 500 (store).
//!
//! The operator dashboard, the same queries and repairs as web pages for a browser
//! (cookie login with the same two tokens), is in [`dashboard`], on a listener of its
//! own.
//!
//! Serve the router on a listener of its own, bound to a loopback or internal address,
//! never nested in a public application's routes. [`Auth::from_env`] reads the tokens
//! and refuses a short one with an error, so that a typo cannot switch the API off or
//! leave it guessable.
//!
//! ```no_run
//! # async fn serve(engine: sagaflow::Engine) -> std::io::Result<()> {
//! use std::sync::Arc;
//! use sagaflow_admin::{router, Auth, Token};
//!
//! let auth = Auth::new(Token::from_env("SAGAFLOW_ADMIN_TOKEN")?)
//!     .with_read_token(Token::from_env("SAGAFLOW_READ_TOKEN")?);
//! let app = router(Arc::new(engine), auth);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7070").await?;
//! axum::serve(listener, app).await
//! # }
//! ```

#![warn(missing_docs)]

pub mod dashboard;

use std::fmt;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sagaflow::admin::{DriftEntry, ListFilter, LogProblem, Stats};
use sagaflow::machine::{LogRecord, Repair};
use sagaflow::store::{Delivered, Delivery};
use sagaflow::{
    Engine, Error, FoundDrift, Lsn, ReconcileReport, SagaId, SagaMeta, SagaStatus, Timestamp,
};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the fields of every enclosing span (so every line
    /// of a saga carries its `saga_id`, `definition` and `version`; attempt lines add
    /// `step`, `phase` and `attempt`).
    Json,
}

/// Installs a global tracing subscriber writing to standard error, filtered by
/// `RUST_LOG` (default `info`). Text lines are coloured only when standard error is a
/// terminal and `NO_COLOR` is unset or empty, so a log file or a pipe gets plain text.
///
/// # Errors
///
/// If a global subscriber is already installed.
pub fn init_logging(format: LogFormat) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ));
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    }
}

/// Whether log lines are coloured: on a terminal, unless `NO_COLOR` is set to something
/// (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// A bearer token. Its `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// A token; tokens shorter than 16 bytes are refused as guessable.
    ///
    /// # Errors
    ///
    /// An `InvalidInput` I/O error for a short token.
    pub fn new(token: impl Into<String>) -> std::io::Result<Token> {
        let t = token.into();
        if t.len() < Token::MIN_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "a token needs at least {} bytes, this one has {}",
                    Token::MIN_LEN,
                    t.len()
                ),
            ));
        }
        Ok(Token(t))
    }

    /// The shortest token accepted, in bytes.
    pub const MIN_LEN: usize = 16;

    /// The token in environment variable `var`.
    ///
    /// # Errors
    ///
    /// `NotFound` if the variable is unset, or as [`Token::new`].
    pub fn from_env(var: &str) -> std::io::Result<Token> {
        let t = std::env::var(var).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("{var} is not set"))
        })?;
        Token::new(t)
    }

    fn matches(&self, presented: &[u8]) -> bool {
        // Constant time over the token's bytes; the length difference leaks nothing
        // useful about a random token.
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Who may call the API.
#[derive(Clone, Debug)]
pub struct Auth {
    admin: Token,
    read: Option<Token>,
}

impl Auth {
    /// The admin token may do everything.
    pub fn new(admin: Token) -> Auth {
        Auth { admin, read: None }
    }

    /// A read-only token for queries and metrics.
    pub fn with_read_token(mut self, read: Token) -> Auth {
        self.read = Some(read);
        self
    }

    /// The tokens in [`ADMIN_TOKEN_VAR`] and [`READ_TOKEN_VAR`] (see [`Auth::from_lookup`]).
    ///
    /// # Errors
    ///
    /// As [`Auth::from_lookup`].
    pub fn from_env() -> std::io::Result<Option<Auth>> {
        Auth::from_lookup(|var| std::env::var(var).ok())
    }

    /// The tokens named [`ADMIN_TOKEN_VAR`] and [`READ_TOKEN_VAR`], as `lookup` finds
    /// them (the environment, a secrets file). An unset or empty admin token means no
    /// admin API: `Ok(None)`. The read token is optional.
    ///
    /// # Errors
    ///
    /// An `InvalidInput` error naming the variable if a token is shorter than
    /// [`Token::MIN_LEN`] bytes, or if a read token is set without an admin token.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> std::io::Result<Option<Auth>> {
        let get = |var: &str| lookup(var).filter(|v| !v.is_empty());
        let named = |var: &str, t: String| {
            Token::new(t).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{var}: {e}; set a random one (`openssl rand -hex 32`) or unset it"),
                )
            })
        };
        let admin = get(ADMIN_TOKEN_VAR)
            .map(|t| named(ADMIN_TOKEN_VAR, t))
            .transpose()?;
        let read = get(READ_TOKEN_VAR)
            .map(|t| named(READ_TOKEN_VAR, t))
            .transpose()?;
        match (admin, read) {
            (Some(admin), read) => {
                let auth = Auth::new(admin);
                Ok(Some(match read {
                    Some(r) => auth.with_read_token(r),
                    None => auth,
                }))
            }
            (None, Some(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{READ_TOKEN_VAR} is set but {ADMIN_TOKEN_VAR} is not: \
                     the admin API needs an admin token"
                ),
            )),
            (None, None) => Ok(None),
        }
    }
}

/// The environment variable holding the admin token.
pub const ADMIN_TOKEN_VAR: &str = "SAGAFLOW_ADMIN_TOKEN";
/// The environment variable holding the read-only token.
pub const READ_TOKEN_VAR: &str = "SAGAFLOW_READ_TOKEN";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Read,
    Admin,
}

#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
    auth: Arc<Auth>,
}

/// The API's routes over `engine`.
pub fn router(engine: Arc<Engine>, auth: Auth) -> Router {
    let state = AppState {
        engine,
        auth: Arc::new(auth),
    };
    Router::new()
        .route("/v1/sagas", get(list))
        .route("/v1/sagas/{id}", get(show))
        .route("/v1/stats", get(stats))
        .route("/v1/sagas/{id}/repair", post(repair))
        .route("/v1/sagas/{id}/cancel", post(cancel))
        .route("/v1/purge", post(purge))
        .route("/v1/deliveries", post(deliver).get(deliveries))
        .route("/v1/sagas/{id}/approve", post(approve))
        .route("/v1/drifts", get(drifts))
        .route("/v1/reconcile", post(reconcile))
        .route("/v1/bulk", post(bulk))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// An error as the API reports it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
    /// The stable code, where there is one (`SAGA-0012`).
    pub code: Option<String>,
}

fn refuse(status: StatusCode, error: impl Into<String>, code: Option<&str>) -> Response {
    (
        status,
        Json(ApiError {
            error: error.into(),
            code: code.map(str::to_string),
        }),
    )
        .into_response()
}

/// Runs a query of the engine's on a blocking thread: with a networked store (PostgreSQL)
/// a read takes a round trip, which must not hold up the runtime's other requests.
async fn off_runtime<T: Send + 'static>(
    engine: &Arc<Engine>,
    f: impl FnOnce(&Engine) -> T + Send + 'static,
) -> Result<T, Response> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || f(&engine))
        .await
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None))
}

/// The HTTP status an engine error is answered with, in the API and the dashboard.
fn error_status(e: &Error) -> StatusCode {
    match e {
        Error::UnknownSaga(_) => StatusCode::NOT_FOUND,
        Error::RepairRefused { .. } | Error::CancelRefused { .. } => StatusCode::CONFLICT,
        Error::BulkRefused(_) => StatusCode::BAD_REQUEST,
        Error::CorruptLog { .. } | Error::InvalidDelivery(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::PayloadTooLarge { .. } | Error::PayloadTooDeep { .. } => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn engine_error(e: Error) -> Response {
    refuse(error_status(&e), e.to_string(), Some(e.code()))
}

async fn authenticate(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    let needed = if request.method() == axum::http::Method::POST {
        Role::Admin
    } else {
        Role::Read
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::as_bytes);
    let role = presented.and_then(|p| {
        if state.auth.admin.matches(p) {
            Some(Role::Admin)
        } else if state.auth.read.as_ref().is_some_and(|r| r.matches(p)) {
            Some(Role::Read)
        } else {
            None
        }
    });
    match role {
        None => {
            tracing::warn!(%path, token_presented = presented.is_some(), "admin API: refused, no valid token");
            refuse(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required",
                None,
            )
        }
        Some(r) if r < needed => {
            tracing::warn!(%path, "admin API: refused, the read-only token cannot repair");
            refuse(StatusCode::FORBIDDEN, "this token is read-only", None)
        }
        Some(_) => next.run(request).await,
    }
}

/// Query parameters of `GET /v1/sagas`.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ListQuery {
    /// Only this status.
    pub status: Option<String>,
    /// Only this definition.
    pub definition: Option<String>,
    /// Only sagas older than this many seconds.
    pub older_than_secs: Option<u64>,
    /// Only sagas stuck for this many seconds.
    pub stuck_for_secs: Option<u64>,
    /// At most this many (1 or more); absent for no limit.
    pub limit: Option<usize>,
    /// A cursor: only sagas after this saga id (the last of the previous page), or
    /// before it with `newest_first`.
    pub after: Option<String>,
    /// Newest first instead of oldest first.
    pub newest_first: Option<bool>,
}

impl ListQuery {
    /// The engine filter this query asks for.
    ///
    /// # Errors
    ///
    /// A message if the status is not one of the known words, or if the limit is 0.
    pub fn to_filter(&self) -> Result<ListFilter, String> {
        let mut f = ListFilter::default();
        if let Some(s) = &self.status {
            f = f.status(SagaStatus::parse(s).ok_or_else(|| format!("unknown status `{s}`"))?);
        }
        if let Some(d) = &self.definition {
            f = f.definition(d.clone());
        }
        if let Some(s) = self.older_than_secs {
            f = f.older_than(Duration::from_secs(s));
        }
        if let Some(s) = self.stuck_for_secs {
            f = f.stuck_for(Duration::from_secs(s));
        }
        if let Some(n) = self.limit {
            // "At most 0" is a caller's mistake, not a query: refused rather than guessed.
            if n == 0 {
                return Err("limit must be 1 or more (leave it out for no limit)".into());
            }
            f = f.limit(n);
        }
        if let Some(a) = &self.after {
            f = f.after(parse_id(a)?);
        }
        if self.newest_first == Some(true) {
            f = f.newest_first();
        }
        Ok(f)
    }
}

async fn list(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    let filter = match q.to_filter() {
        Ok(f) => f,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e, None),
    };
    match off_runtime(&state.engine, move |e| e.find(&filter)).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => engine_error(e),
        Err(r) => r,
    }
}

/// One saga: its summary and its log, as far as it can be read.
#[derive(Debug, Serialize, Deserialize)]
pub struct SagaView {
    /// The summary.
    pub summary: SagaMeta,
    /// Every transition that can be read.
    pub history: Vec<LogRecord>,
    /// What could not be read (a saga parked with a corrupt log, or written by a newer
    /// engine); empty for a healthy saga.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<LogProblem>,
}

fn parse_id(id: &str) -> Result<SagaId, String> {
    id.parse().map_err(|e| format!("bad saga id `{id}`: {e}"))
}

async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e, None),
    };
    // As far as it can be read: an operator must be able to see a corrupt saga's log
    // up to the damage before resolving it.
    let read = off_runtime(&state.engine, move |e| {
        e.status(id)
            .and_then(|summary| e.readable_log(id).map(|log| (summary, log)))
    });
    match read.await {
        Ok(Ok((summary, log))) => Json(SagaView {
            summary,
            history: log.records,
            problems: log.problems,
        })
        .into_response(),
        Ok(Err(e)) => engine_error(e),
        Err(r) => r,
    }
}

#[derive(Debug, Deserialize)]
struct StatsQuery {
    stuck_after_secs: Option<u64>,
}

async fn stats(State(state): State<AppState>, Query(q): Query<StatsQuery>) -> Response {
    let after = Duration::from_secs(q.stuck_after_secs.unwrap_or(900));
    match off_runtime(&state.engine, move |e| e.stats(after)).await {
        Ok(Ok(s)) => Json::<Stats>(s).into_response(),
        Ok(Err(e)) => engine_error(e),
        Err(r) => r,
    }
}

/// The body of `POST /v1/sagas/{id}/repair`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RepairRequest {
    /// `retry_now`, `resume`, `force_compensate`, `skip_step`, `mark_resolved` or
    /// `handle_drift`.
    pub action: String,
    /// The step: required for `skip_step`; for `retry_now`, the one step (a branch of a
    /// parallel group) to retry, every step waiting for a retry if absent.
    pub step: Option<u32>,
    /// The lsn of the drift record: required for `handle_drift`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<u64>,
    /// Who.
    pub operator: String,
    /// Why.
    pub reason: String,
}

impl RepairRequest {
    /// The repair this request asks for.
    ///
    /// # Errors
    ///
    /// A message for an unknown action, a `skip_step` without a step or a
    /// `handle_drift` without a drift.
    pub fn to_repair(&self) -> Result<Repair, String> {
        Ok(match self.action.as_str() {
            "retry_now" => Repair::RetryNow { step: self.step },
            "resume" => Repair::Resume,
            "force_compensate" => Repair::ForceCompensate,
            "mark_resolved" => Repair::MarkResolved,
            "skip_step" => Repair::SkipStep {
                step: self.step.ok_or("skip_step needs `step`")?,
            },
            "handle_drift" => Repair::HandleDrift {
                drift: Lsn(self
                    .drift
                    .ok_or("handle_drift needs `drift` (the lsn of the drift record)")?),
            },
            other => return Err(format!("unknown action `{other}`")),
        })
    }
}

/// The answer to a POST body that cannot be read: 413 for a body over the limit (axum's
/// default, 2 MB), else 400 (malformed JSON, a missing or mistyped field, no JSON
/// content type).
fn rejected(e: &JsonRejection) -> Response {
    let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    refuse(status, e.body_text(), None)
}

/// The saga id of a path and the JSON body of a POST, or the 400 (or 413) that refuses
/// them.
fn id_and_body<T>(
    id: &str,
    body: Result<Json<T>, JsonRejection>,
) -> Result<(SagaId, T), Box<Response>> {
    let id = parse_id(id).map_err(|e| Box::new(refuse(StatusCode::BAD_REQUEST, e, None)))?;
    let Json(req) = body.map_err(|e| Box::new(rejected(&e)))?;
    Ok((id, req))
}

async fn repair(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<RepairRequest>, JsonRejection>,
) -> Response {
    let (id, req) = match id_and_body(&id, body) {
        Ok(x) => x,
        Err(refused) => return *refused,
    };
    let action = match req.to_repair() {
        Ok(a) => a,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e, None),
    };
    match state
        .engine
        .repair(id, action, &req.operator, &req.reason)
        .await
    {
        Ok(meta) => Json(meta).into_response(),
        Err(e) => engine_error(e),
    }
}

/// The body of `POST /v1/sagas/{id}/cancel`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CancelRequest {
    /// Who.
    pub operator: String,
    /// Why.
    pub reason: String,
}

async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<CancelRequest>, JsonRejection>,
) -> Response {
    let (id, req) = match id_and_body(&id, body) {
        Ok(x) => x,
        Err(refused) => return *refused,
    };
    match state.engine.cancel(id, &req.operator, &req.reason).await {
        Ok(meta) => Json(meta).into_response(),
        Err(e) => engine_error(e),
    }
}

/// The body of `POST /v1/purge`: delete finished sagas that finished at or before a
/// time. A dry run (the default) only counts them.
#[derive(Debug, Serialize, Deserialize)]
pub struct PurgeRequest {
    /// Milliseconds since the Unix epoch.
    pub finished_before_ms: u64,
    /// Count only (default `true`).
    #[serde(default = "yes")]
    pub dry_run: bool,
}

fn yes() -> bool {
    true
}

async fn purge(
    State(state): State<AppState>,
    body: Result<Json<PurgeRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return rejected(&e),
    };
    let before = sagaflow::Timestamp::from_millis(req.finished_before_ms);
    match state.engine.purge(before, req.dry_run).await {
        Ok(p) => Json(p).into_response(),
        Err(e) => engine_error(e),
    }
}

/// The body of `POST /v1/deliveries`: an event for the await step waiting on `key`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeliverRequest {
    /// The correlation key the await step waits on (1 to 256 bytes).
    pub key: String,
    /// The sender's delivery id (1 to 256 bytes): a second delivery with the same key
    /// and id is a duplicate, whatever its payload.
    pub id: String,
    /// What the event says: the await step's output (`null` if it says nothing).
    pub payload: serde_json::Value,
}

/// The answer to a delivery or an approval.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeliverResponse {
    /// `new` (recorded now, durably: 201) or `duplicate` (recorded before: 200).
    pub delivered: Delivered,
}

/// 201 for a new delivery, 200 for a duplicate; the engine's error otherwise.
fn delivered(result: sagaflow::Result<Delivered>) -> Response {
    match result {
        Ok(d) => {
            let status = if d == Delivered::New {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(DeliverResponse { delivered: d })).into_response()
        }
        Err(e) => engine_error(e),
    }
}

async fn deliver(
    State(state): State<AppState>,
    body: Result<Json<DeliverRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return rejected(&e),
    };
    // The engine answers once the delivery is durable (G10).
    delivered(state.engine.deliver(&req.key, &req.id, req.payload).await)
}

/// The body of `POST /v1/sagas/{id}/approve`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApproveRequest {
    /// The await step to approve, by name.
    pub step: String,
    /// Who (the payload's `approved_by`).
    pub operator: String,
    /// Why.
    pub reason: String,
}

async fn approve(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<ApproveRequest>, JsonRejection>,
) -> Response {
    let (id, req) = match id_and_body(&id, body) {
        Ok(x) => x,
        Err(refused) => return *refused,
    };
    delivered(
        state
            .engine
            .approve(id, &req.step, &req.operator, &req.reason)
            .await,
    )
}

/// Query parameters of `GET /v1/deliveries`.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct DeliveriesQuery {
    /// A cursor, with `after_id`: the key of the last delivery of the previous page.
    pub after_key: Option<String>,
    /// A cursor, with `after_key`: the delivery id of the last delivery of the previous
    /// page.
    pub after_id: Option<String>,
    /// At most this many: 1 to [`MAX_DELIVERIES_PAGE`], [`DEFAULT_DELIVERIES_PAGE`] if
    /// absent.
    pub limit: Option<usize>,
}

/// The most deliveries one `GET /v1/deliveries` returns.
pub const MAX_DELIVERIES_PAGE: usize = 1000;
/// How many deliveries `GET /v1/deliveries` returns without a `limit`.
pub const DEFAULT_DELIVERIES_PAGE: usize = 100;

impl DeliveriesQuery {
    /// The cursor and the limit this query asks for.
    ///
    /// # Errors
    ///
    /// A message for a cursor with only one of its halves, or a limit of 0 or over
    /// [`MAX_DELIVERIES_PAGE`].
    pub fn to_page(&self) -> Result<(Option<(String, String)>, usize), String> {
        let after =
            match (&self.after_key, &self.after_id) {
                (Some(k), Some(i)) => Some((k.clone(), i.clone())),
                (None, None) => None,
                _ => return Err(
                    "after_key and after_id go together (the last delivery of the previous page)"
                        .into(),
                ),
            };
        let limit = self.limit.unwrap_or(DEFAULT_DELIVERIES_PAGE);
        if limit == 0 || limit > MAX_DELIVERIES_PAGE {
            return Err(format!(
                "limit must be 1 to {MAX_DELIVERIES_PAGE} (leave it out for {DEFAULT_DELIVERIES_PAGE})"
            ));
        }
        Ok((after, limit))
    }
}

async fn deliveries(State(state): State<AppState>, Query(q): Query<DeliveriesQuery>) -> Response {
    let (after, limit) = match q.to_page() {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e, None),
    };
    match state.engine.deliveries(after, limit).await {
        Ok(v) => Json::<Vec<Delivery>>(v).into_response(),
        Err(e) => engine_error(e),
    }
}

/// Query parameters of `GET /v1/drifts`.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct DriftsQuery {
    /// A cursor: only sagas after this saga id (the `next` of the previous page).
    pub after: Option<String>,
    /// At most this many sagas (each with all its open drifts): 1 to
    /// [`MAX_DRIFTS_PAGE`], [`DEFAULT_DRIFTS_PAGE`] if absent.
    pub limit: Option<usize>,
}

/// The most sagas one `GET /v1/drifts` returns the drifts of.
pub const MAX_DRIFTS_PAGE: usize = 1000;
/// How many sagas `GET /v1/drifts` returns the drifts of without a `limit`.
pub const DEFAULT_DRIFTS_PAGE: usize = 100;

impl DriftsQuery {
    /// The cursor and the limit (in sagas) this query asks for.
    ///
    /// # Errors
    ///
    /// A message for a cursor that is not a saga id, or a limit of 0 or over
    /// [`MAX_DRIFTS_PAGE`].
    pub fn to_page(&self) -> Result<(Option<SagaId>, usize), String> {
        let after = self.after.as_deref().map(parse_id).transpose()?;
        let limit = self.limit.unwrap_or(DEFAULT_DRIFTS_PAGE);
        if limit == 0 || limit > MAX_DRIFTS_PAGE {
            return Err(format!(
                "limit must be 1 to {MAX_DRIFTS_PAGE} (leave it out for {DEFAULT_DRIFTS_PAGE})"
            ));
        }
        Ok((after, limit))
    }
}

/// A page of open drifts: the answer to `GET /v1/drifts`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DriftPage {
    /// The open drifts of up to `limit` sagas, in saga id order, each saga's in the
    /// order they were found.
    pub drifts: Vec<DriftEntry>,
    /// The `after` of the next page; `None` on the last.
    pub next: Option<SagaId>,
}

impl DriftPage {
    /// The page of `limit` sagas out of `entries`, the open drifts of up to `limit + 1`
    /// sagas as [`sagaflow::admin::drifts`] returns them: the drifts of the first
    /// `limit` sagas, and the cursor of the next page if there was another saga after
    /// them. Asking for one saga more tells a full last page from one with more after
    /// it, so that a walk never ends on an empty page.
    pub fn of(mut entries: Vec<DriftEntry>, limit: usize) -> DriftPage {
        let mut sagas = 0;
        let mut previous = None;
        let mut cut = None;
        for (i, e) in entries.iter().enumerate() {
            if previous != Some(e.saga) {
                previous = Some(e.saga);
                sagas += 1;
                if sagas > limit {
                    cut = Some(i);
                    break;
                }
            }
        }
        let next = cut.and_then(|i| {
            entries.truncate(i);
            entries.last().map(|e| e.saga)
        });
        DriftPage {
            drifts: entries,
            next,
        }
    }
}

async fn drifts(State(state): State<AppState>, Query(q): Query<DriftsQuery>) -> Response {
    let (after, limit) = match q.to_page() {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e, None),
    };
    // Every saga of a page has its log read: off the runtime, as `show`.
    match off_runtime(&state.engine, move |e| e.drifts(after, limit + 1)).await {
        Ok(Ok(v)) => Json(DriftPage::of(v, limit)).into_response(),
        Ok(Err(e)) => engine_error(e),
        Err(r) => r,
    }
}

/// Where the reconciler's walk of finished sagas stands.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReconcilePosition {
    /// When the last saga looked at finished.
    pub finished_at: Timestamp,
    /// That saga.
    pub saga: SagaId,
}

/// What a reconciler run did: the answer to `POST /v1/reconcile`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReconcileSummary {
    /// Finished sagas looked at.
    pub sagas: usize,
    /// Lookups made (each attempt counts).
    pub lookups: u64,
    /// Steps whose system agreed with the log.
    pub matched: u64,
    /// Sagas not checked (resolved by hand, an unreadable log, steps that changed under
    /// the same definition version).
    pub skipped: usize,
    /// Sagas of definitions this engine does not have: left to the processes that do.
    pub elsewhere: usize,
    /// Steps with a hook not looked up (skipped by hand, or an open outcome).
    pub unchecked: u64,
    /// Every drift found.
    pub drifts: Vec<FoundDrift>,
    /// Where the walk stands; `None` before any saga was looked at.
    pub position: Option<ReconcilePosition>,
}

impl From<ReconcileReport> for ReconcileSummary {
    fn from(r: ReconcileReport) -> Self {
        ReconcileSummary {
            sagas: r.sagas,
            lookups: r.lookups,
            matched: r.matched,
            skipped: r.skipped,
            elsewhere: r.elsewhere,
            unchecked: r.unchecked,
            drifts: r.drifts,
            position: r
                .position
                .map(|(finished_at, saga)| ReconcilePosition { finished_at, saga }),
        }
    }
}

async fn reconcile(State(state): State<AppState>) -> Response {
    // On a task of its own: a client that hangs up must not cut a pass short between
    // taking a saga's lease and giving it back (a shared store), or mid-batch.
    let engine = state.engine.clone();
    match tokio::spawn(async move { engine.reconcile_now().await }).await {
        Ok(Ok(r)) => Json(ReconcileSummary::from(r)).into_response(),
        Ok(Err(e)) => engine_error(e),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

/// The body of `POST /v1/bulk`: which sagas (every filter field is optional; none
/// matches every saga), what to do to each, who and why.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BulkRequest {
    /// `retry`, `resume`, `compensate` or `resolve` ([`sagaflow::BulkAction`]).
    pub action: String,
    /// Only this status (`running`, `parked`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Only this definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
    /// Only parked sagas of this kind (`compensation_failed`, `forward_failed`, ...,
    /// as [`sagaflow::ParkKind`] is spelled in JSON); implies `status: parked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub park_kind: Option<String>,
    /// Only sagas started at least this many seconds ago.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_than_secs: Option<u64>,
    /// Only sagas started at most this many seconds ago.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newer_than_secs: Option<u64>,
    /// Only sagas stuck for at least this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stuck_for_secs: Option<u64>,
    /// Only the saga started with this start key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_key: Option<String>,
    /// Only sagas whose reason contains this text, ignoring case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Absent: a dry run, which counts and writes nothing, and answers with `confirm`
    /// (a [`sagaflow::BulkConfirm`] token). That token: the repair is applied to exactly
    /// the sagas the dry run matched, or refused (400, SAGA-0020) if the filter matches
    /// anything else by now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<String>,
    /// Who (recorded on each saga); missing or empty: refused with SAGA-0020.
    #[serde(default)]
    pub operator: String,
    /// Why (recorded on each saga); missing or empty: refused with SAGA-0020.
    #[serde(default)]
    pub reason: String,
}

impl BulkRequest {
    /// The action and the engine filter this request asks for.
    ///
    /// # Errors
    ///
    /// A message for an unknown action, status or park kind, a text longer than
    /// [`MAX_FILTER_TEXT`] bytes, or a confirmation that does not parse.
    pub fn to_bulk(
        &self,
    ) -> Result<
        (
            sagaflow::BulkAction,
            ListFilter,
            Option<sagaflow::BulkConfirm>,
        ),
        String,
    > {
        let action: sagaflow::BulkAction = self.action.parse()?;
        let confirm = self.confirm.as_deref().map(str::parse).transpose()?;
        let mut f = ListFilter::default();
        if let Some(s) = &self.status {
            f = f.status(SagaStatus::parse(s).ok_or_else(|| format!("unknown status `{s}`"))?);
        }
        if let Some(d) = &self.definition {
            f = f.definition(d.clone());
        }
        if let Some(k) = &self.park_kind {
            f = f.park_kind(parse_park_kind(k)?);
        }
        if let Some(s) = self.older_than_secs {
            f = f.older_than(Duration::from_secs(s));
        }
        if let Some(s) = self.newer_than_secs {
            f = f.newer_than(Duration::from_secs(s));
        }
        if let Some(s) = self.stuck_for_secs {
            f = f.stuck_for(Duration::from_secs(s));
        }
        if let Some(k) = &self.start_key {
            f = f.start_key(k.clone());
        }
        if let Some(t) = &self.text {
            f = f.text(filter_text(t)?);
        }
        Ok((action, f, confirm))
    }
}

/// The longest text filter taken, in bytes: it is matched against every saga's reason.
pub const MAX_FILTER_TEXT: usize = 256;

/// A text filter, refused when longer than [`MAX_FILTER_TEXT`].
///
/// # Errors
///
/// A message saying so.
pub fn filter_text(t: &str) -> Result<String, String> {
    if t.len() > MAX_FILTER_TEXT {
        return Err(format!(
            "the text filter is limited to {MAX_FILTER_TEXT} bytes"
        ));
    }
    Ok(t.to_string())
}

/// A park kind as JSON spells it (`compensation_failed`).
fn parse_park_kind(word: &str) -> Result<sagaflow::ParkKind, String> {
    serde_json::from_value(serde_json::Value::String(word.to_string()))
        .map_err(|_| format!("unknown park kind `{word}`"))
}

async fn bulk(
    State(state): State<AppState>,
    body: Result<Json<BulkRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return rejected(&e),
    };
    let (action, filter, confirm) = match req.to_bulk() {
        Ok(x) => x,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e, None),
    };
    // On a task of its own, like the reconciler: a client that hangs up must not stop a
    // bulk repair half way through (each saga's repair is whole either way).
    let engine = state.engine.clone();
    let run = tokio::spawn(async move {
        engine
            .bulk(&filter, action, confirm, &req.operator, &req.reason)
            .await
    });
    match run.await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(e)) => engine_error(e),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = match off_runtime(&state.engine, |e| e.metrics_text()).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::colour;

    #[test]
    fn log_lines_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())), "an empty NO_COLOR is unset");
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None), "a file or a pipe");
        assert!(!colour(false, Some("1".into())));
    }
}
