//! HTTP calls from steps, with the failure classification the engine acts on.
//!
//! An [`Integration`] is one downstream service: its base URL, a per-call timeout, and
//! optionally a [`RateLimiter`], a [`CircuitBreaker`] and a [`TokenSource`], all shared
//! by every saga that calls it. Each call sends the step's idempotency key as
//! `Idempotency-Key` and the saga id as `X-Correlation-Id` (and, with the `otel`
//! feature, the W3C `traceparent` and `tracestate` of the current span: see
//! `trace_context`), and its outcome becomes the [`StepError`] the engine needs:
//!
//! | outcome | step error | why |
//! | --- | --- | --- |
//! | cannot connect | retryable | the request never left |
//! | 408, 409, 425 | retryable | the service asks for another try |
//! | 429, or 503 with `Retry-After` (seconds or HTTP-date) | retryable after that time, at most [`DEFAULT_MAX_RETRY_AFTER`] (one hour; [`Integration::with_max_retry_after`]); the integration pauses for everyone | |
//! | other 4xx | rejected, with the status and the start of the body | the service refused: no effect, not compensated |
//! | timeout, connection lost after sending, 5xx, an answer that cannot be read | unknown | it may have taken effect: compensated (a pivot parks), never before the attempt's deadline |
//! | 2xx whose body does not decode | unknown, saying what was expected | it took effect, but its output cannot be recorded |
//! | 401 with a token source | one token refresh and one replay, then as above | |
//!
//! A `Retry-After` is a number the server chose, so it is clamped before it becomes a
//! step error or a pause: `Retry-After: 18446744073709551615`, `99999999999` or a date
//! in the year 9999 all give "retry after one hour" (the configured maximum), with the
//! clamp said in the error's message. The engine then bounds it again by the step's
//! retry policy (`RetryPolicy::max_retry_after`, one hour by default).
//!
//! ```no_run
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use sagaflow::{Compensate, Step, StepContext, StepError};
//! use sagaflow_steps::http::Integration;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Charge { charge_id: String }
//!
//! struct ChargeCard { payments: Arc<Integration> }
//!
//! #[async_trait]
//! impl Step for ChargeCard {
//!     type Input = serde_json::Value;
//!     type Output = Charge;
//!     async fn execute(&self, ctx: &StepContext, order: serde_json::Value) -> Result<Charge, StepError> {
//!         self.payments.post_json(ctx, "/charges", &order).await
//!     }
//! }
//!
//! #[async_trait]
//! impl Compensate for ChargeCard {
//!     async fn compensate(&self, ctx: &StepContext, _: serde_json::Value, charge: Option<Charge>) -> Result<(), StepError> {
//!         // Refund by the charge's own key when the charge's outcome is unknown.
//!         let body = serde_json::json!({ "charge_id": charge.map(|c| c.charge_id), "charge_key": ctx.action_key().as_str() });
//!         self.payments.post_json::<serde_json::Value>(ctx, "/refunds", &body).await.map(|_| ())
//!     }
//! }
//! ```

#[cfg(any(feature = "rate_limit", feature = "circuit_breaker", feature = "oauth"))]
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use sagaflow::{StepContext, StepError};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[cfg(feature = "circuit_breaker")]
use crate::circuit_breaker::{CallResult, CircuitBreaker};
#[cfg(feature = "oauth")]
use crate::oauth::TokenSource;
#[cfg(feature = "rate_limit")]
use crate::rate_limit::RateLimiter;

/// The pause assumed when a 429 carries no usable `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The longest `Retry-After` an [`Integration`] (and [`classify`]) passes on unless
/// [`Integration::with_max_retry_after`] sets another bound: one hour.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Parses a `Retry-After` value: delay-seconds or an HTTP-date (RFC 9110 §10.2.3),
/// relative to `now`. A date in the past is zero.
///
/// The result is what the server asked for, not clamped: delay-seconds too large for
/// a `u64` give [`Duration::MAX`]. [`classify_with`] clamps it. Never panics.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use sagaflow_steps::http::parse_retry_after;
///
/// let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
/// assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
/// assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
/// assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO));
/// assert_eq!(parse_retry_after("soon", now), None);
/// assert_eq!(parse_retry_after("18446744073709551615", now), Some(Duration::from_secs(u64::MAX)));
/// assert_eq!(parse_retry_after("99999999999999999999999", now), Some(Duration::MAX));
/// ```
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: delay-seconds. Too many for a u64 is still "a very long time".
        return Some(v.parse::<u64>().map_or(Duration::MAX, Duration::from_secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The step error for an answer with `status`, `headers` and `body`, or `None` for a
/// success; a `Retry-After` is clamped to [`DEFAULT_MAX_RETRY_AFTER`]. See
/// [`classify_with`].
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<StepError> {
    classify_with(status, headers, body, DEFAULT_MAX_RETRY_AFTER)
}

/// As [`classify`], with a `Retry-After` clamped to `max_retry_after`: whatever the
/// server sent, the hint in the error is at most that, and the error's message says
/// when it was clamped.
///
/// ```
/// use std::time::Duration;
/// use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
/// use reqwest::StatusCode;
/// use sagaflow_steps::http::classify_with;
///
/// let mut headers = HeaderMap::new();
/// headers.insert(RETRY_AFTER, HeaderValue::from_static("18446744073709551615"));
/// let max = Duration::from_secs(60);
/// let e = classify_with(StatusCode::TOO_MANY_REQUESTS, &headers, b"", max).unwrap();
/// assert_eq!(e.retry_after_hint(), Some(max));
/// assert!(e.message().contains("clamped"));
/// ```
pub fn classify_with(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    max_retry_after: Duration,
) -> Option<StepError> {
    if status.is_success() {
        return None;
    }
    let asked = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let hint = asked.map(|d| d.min(max_retry_after));
    let snippet: String = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    let mut what = format!("{status}: {snippet}");
    if asked.is_some_and(|d| d > max_retry_after) {
        what.push_str(&format!(
            " (retry-after clamped to the maximum of {max_retry_after:?})"
        ));
    }
    Some(match (status, hint) {
        (StatusCode::TOO_MANY_REQUESTS, h) => {
            StepError::retry_after(h.unwrap_or(DEFAULT_RETRY_AFTER.min(max_retry_after)), what)
        }
        (StatusCode::SERVICE_UNAVAILABLE, Some(h)) => StepError::retry_after(h, what),
        (StatusCode::REQUEST_TIMEOUT | StatusCode::CONFLICT | StatusCode::TOO_EARLY, _) => {
            StepError::retryable(what)
        }
        // The server may have done the work before failing.
        (s, _) if s.is_server_error() => StepError::unknown(what),
        // It refused: nothing happened, and asking again will not change that.
        (s, _) if s.is_client_error() => StepError::rejected(what),
        // 1xx and 3xx that reqwest did not follow: not a refusal the service stated.
        _ => StepError::unknown(what),
    })
}

/// The largest answer body read by default: 4 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 4 << 20;

/// One downstream service, shared by every step that calls it.
#[derive(Debug)]
pub struct Integration {
    name: String,
    base: String,
    client: reqwest::Client,
    timeout: Duration,
    max_retry_after: Duration,
    max_response_bytes: usize,
    #[cfg(feature = "rate_limit")]
    limiter: Option<Arc<RateLimiter>>,
    #[cfg(feature = "circuit_breaker")]
    breaker: Option<Arc<CircuitBreaker>>,
    #[cfg(feature = "oauth")]
    tokens: Option<Arc<TokenSource>>,
}

impl Integration {
    /// The service `name` at `base_url`; 10 s per call; `Retry-After` clamped to
    /// [`DEFAULT_MAX_RETRY_AFTER`].
    pub fn new(name: impl Into<String>, base_url: impl Into<String>) -> Self {
        Integration {
            name: name.into(),
            base: base_url.into().trim_end_matches('/').to_string(),
            client: reqwest::Client::new(),
            timeout: Duration::from_secs(10),
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            #[cfg(feature = "rate_limit")]
            limiter: None,
            #[cfg(feature = "circuit_breaker")]
            breaker: None,
            #[cfg(feature = "oauth")]
            tokens: None,
        }
    }

    /// Sets the per-call timeout (the step's own deadline caps it too).
    pub fn with_timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Bounds the `Retry-After` a server can hand over (default
    /// [`DEFAULT_MAX_RETRY_AFTER`]): a longer one becomes a retry after `max`, and a
    /// pause of the limiter for at most `max` (and at most the limiter's own bound).
    pub fn with_max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Bounds the body of an answer (default [`DEFAULT_MAX_RESPONSE_BYTES`]): a longer
    /// one is not read further, and the call's outcome is unknown (the service did
    /// answer, so the request may have taken effect).
    pub fn with_max_response_bytes(mut self, max: usize) -> Self {
        self.max_response_bytes = max;
        self
    }

    /// Uses `client` (connection pool, TLS settings).
    pub fn with_client(mut self, client: reqwest::Client) -> Self {
        self.client = client;
        self
    }

    /// Queues calls behind `limiter`.
    #[cfg(feature = "rate_limit")]
    pub fn with_limiter(mut self, limiter: Arc<RateLimiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Guards calls with `breaker`.
    #[cfg(feature = "circuit_breaker")]
    pub fn with_breaker(mut self, breaker: Arc<CircuitBreaker>) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Sends `Authorization: Bearer` tokens from `tokens`.
    #[cfg(feature = "oauth")]
    pub fn with_tokens(mut self, tokens: Arc<TokenSource>) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// `POST base/path` with a JSON body; decodes a JSON answer.
    ///
    /// # Errors
    ///
    /// The [`StepError`] the outcome means (see the module docs).
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        ctx: &StepContext,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, StepError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| StepError::rejected(format!("request body does not serialize: {e}")))?;
        self.call(ctx, Method::POST, path, Some(body)).await
    }

    /// `GET base/path`; decodes a JSON answer.
    ///
    /// # Errors
    ///
    /// As [`Integration::post_json`].
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        ctx: &StepContext,
        path: &str,
    ) -> Result<T, StepError> {
        self.call(ctx, Method::GET, path, None).await
    }

    /// A call with an optional JSON body.
    ///
    /// # Errors
    ///
    /// As [`Integration::post_json`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        ctx: &StepContext,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, StepError> {
        #[cfg(feature = "circuit_breaker")]
        let permit = match &self.breaker {
            Some(b) => Some(b.permit()?),
            None => None,
        };
        #[cfg(feature = "rate_limit")]
        let _slot = match &self.limiter {
            Some(l) => Some(l.acquire().await),
            None => None,
        };
        let (result, health) = self.send_with_token(ctx, &method, path, body).await;
        #[cfg(feature = "circuit_breaker")]
        if let (Some(b), Some(p)) = (&self.breaker, permit) {
            b.record(p, health.into());
        }
        #[cfg(not(feature = "circuit_breaker"))]
        let _ = health;
        result
    }

    async fn send_with_token<T: DeserializeOwned>(
        &self,
        ctx: &StepContext,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (Result<T, StepError>, Health) {
        #[cfg(feature = "oauth")]
        if let Some(tokens) = &self.tokens {
            let token = match tokens.token().await {
                Ok(t) => t,
                Err(e) => return (Err(e.to_step_error()), Health::Neutral),
            };
            let (result, health, status) = self
                .send_once(ctx, method, path, body.clone(), Some(token.expose()))
                .await;
            if status != Some(StatusCode::UNAUTHORIZED) {
                return (result, health);
            }
            // The token was refused (expired early, revoked): one refresh, one replay.
            tokens.invalidate(&token);
            let token = match tokens.token().await {
                Ok(t) => t,
                Err(e) => return (Err(e.to_step_error()), Health::Neutral),
            };
            let (result, health, _) = self
                .send_once(ctx, method, path, body, Some(token.expose()))
                .await;
            return (result, health);
        }
        let (result, health, _) = self.send_once(ctx, method, path, body, None).await;
        (result, health)
    }

    /// One request: the result, what it says about the service's health, and the
    /// status if there was an answer.
    async fn send_once<T: DeserializeOwned>(
        &self,
        ctx: &StepContext,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
        token: Option<&str>,
    ) -> (Result<T, StepError>, Health, Option<StatusCode>) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let left = Duration::from_millis(ctx.deadline().as_millis().saturating_sub(now_ms));
        if left.is_zero() {
            // Past the attempt's deadline the engine may already have settled the attempt
            // and undone it: a request sent now could land after its undo. Nothing is
            // sent, so nothing took effect.
            return (
                Err(StepError::retryable(
                    "the attempt's deadline has passed: the request was not sent",
                )),
                NEUTRAL,
                None,
            );
        }
        let timeout = self.timeout.min(left);
        let url = format!("{}{}", self.base, path);
        let mut req = self.client.request(method.clone(), &url).timeout(timeout);
        for (name, value) in crate::correlation_headers(ctx) {
            req = req.header(name, value);
        }
        #[cfg(feature = "otel")]
        for (name, value) in crate::trace_context::headers() {
            req = req.header(name, value);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                // Only a failed connect is known to have sent nothing; a timeout or a
                // connection lost later may have reached the service.
                let err = if e.is_connect() {
                    StepError::retryable(format!(
                        "cannot connect to `{}`: {}",
                        self.name,
                        e.without_url()
                    ))
                } else if e.is_timeout() {
                    StepError::unknown(format!("`{}` timed out after {timeout:?}", self.name))
                } else {
                    StepError::unknown(format!(
                        "call to `{}` failed after sending: {}",
                        self.name,
                        e.without_url()
                    ))
                };
                return (Err(err), FAILURE, None);
            }
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        // Read in chunks, at most `max_response_bytes`: a server cannot make a step hold
        // an answer of any size.
        let mut resp = resp;
        let mut bytes: Vec<u8> = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len().saturating_add(chunk.len()) > self.max_response_bytes {
                        let what = format!(
                            "`{}` answered {status} with a body over {} bytes",
                            self.name, self.max_response_bytes
                        );
                        return (Err(StepError::unknown(what)), FAILURE, Some(status));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    let what = format!(
                        "reading the answer of `{}` failed: {}",
                        self.name,
                        e.without_url()
                    );
                    return (Err(StepError::unknown(what)), FAILURE, Some(status));
                }
            }
        }
        if let Some(err) = classify_with(status, &headers, &bytes, self.max_retry_after) {
            #[cfg(feature = "rate_limit")]
            if let (Some(l), Some(hint)) = (&self.limiter, err.retry_after_hint()) {
                l.pause_for(hint);
            }
            let health = if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
                FAILURE
            } else {
                NEUTRAL
            };
            tracing::debug!(integration = %self.name, %status, "call failed");
            return (Err(err), health, Some(status));
        }
        // The service did the work; only its answer cannot be recorded.
        let decoded = serde_json::from_slice::<T>(&bytes).map_err(|e| {
            StepError::unknown(format!(
                "`{}` answered {status} with a body that does not decode as {}: {e}",
                self.name,
                std::any::type_name::<T>()
            ))
        });
        (decoded, SUCCESS, Some(status))
    }
}

/// What a call says about the service's health (fed to the circuit breaker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Success,
    Failure,
    Neutral,
}

const FAILURE: Health = Health::Failure;
const NEUTRAL: Health = Health::Neutral;
const SUCCESS: Health = Health::Success;

#[cfg(feature = "circuit_breaker")]
impl From<Health> for CallResult {
    fn from(h: Health) -> Self {
        match h {
            Health::Success => CallResult::Success,
            Health::Failure => CallResult::Failure,
            Health::Neutral => CallResult::Neutral,
        }
    }
}
