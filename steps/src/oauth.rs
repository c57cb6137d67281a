//! OAuth2 client-credentials tokens: cached, refreshed before they expire, refreshed by
//! one caller however many wait, and never printed.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use sagaflow_steps::oauth::{ClientCredentials, TokenSource};
//! use sagaflow_steps::secrets::Secret;
//!
//! let tokens = TokenSource::new(
//!     ClientCredentials::new("https://auth.example/token", "shop", Secret::from_env("PAYMENTS_CLIENT_SECRET")?)
//!         .with_scope("payments")
//!         .with_margin(Duration::from_secs(60)),
//! );
//! let token = tokens.token().await?; // cached until 60 s before it expires
//! # let _ = token; Ok(()) }
//! ```
//!
//! The token's lifetime is the server's `expires_in`, which is only trusted within
//! bounds: it is clamped to [`ClientCredentials::max_lifetime`] (24 hours by default,
//! [`DEFAULT_MAX_LIFETIME`]), so `"expires_in": 18446744073709551615` caches the token
//! for a day, not forever, and never overflows. `expires_in` may be an integer, a
//! number with a fraction or a string of digits (some providers send `"3599"`); a
//! missing one means 300 s; a negative one means already expired. A token living
//! shorter than the refresh margin is refreshed halfway through its life.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::secrets::Secret;

/// The longest a token is cached unless [`ClientCredentials::with_max_lifetime`] says
/// otherwise, whatever `expires_in` the server sent: 24 hours.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The lifetime assumed when the token endpoint sends no `expires_in`: 300 s.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// Errors getting a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The token endpoint could not be reached or answered 5xx: try again later.
    #[error("token endpoint unavailable: {0}")]
    Unavailable(String),
    /// The token endpoint refused the credentials (4xx): retrying will not help.
    #[error("token endpoint refused the client credentials: {0}")]
    Refused(String),
    /// The answer is not a token.
    #[error("token endpoint answered something else than a token: {0}")]
    Malformed(String),
}

impl Error {
    /// The step failure this error means.
    pub fn to_step_error(&self) -> sagaflow::StepError {
        match self {
            Error::Unavailable(_) => sagaflow::StepError::retryable(self),
            // The call itself was never sent: nothing happened downstream.
            _ => sagaflow::StepError::rejected(self),
        }
    }
}

/// How long a token request may take.
const TOKEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest token answer read: 64 KiB.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 << 10;

/// Where and how to get tokens.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientCredentials {
    /// The token endpoint.
    pub token_url: String,
    /// The client id.
    pub client_id: String,
    /// The client secret.
    pub client_secret: Secret,
    /// The scope to ask for.
    pub scope: Option<String>,
    /// Refresh this long before the token expires.
    pub margin: Duration,
    /// The longest a token is cached, whatever the server's `expires_in` says.
    pub max_lifetime: Duration,
}

impl ClientCredentials {
    /// Credentials for `token_url`; refreshes 30 s before expiry; caches a token for at
    /// most [`DEFAULT_MAX_LIFETIME`].
    pub fn new(token_url: impl Into<String>, client_id: impl Into<String>, secret: Secret) -> Self {
        ClientCredentials {
            token_url: token_url.into(),
            client_id: client_id.into(),
            client_secret: secret,
            scope: None,
            margin: Duration::from_secs(30),
            max_lifetime: DEFAULT_MAX_LIFETIME,
        }
    }

    /// Sets [`ClientCredentials::scope`].
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Sets [`ClientCredentials::margin`].
    pub fn with_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    /// Sets [`ClientCredentials::max_lifetime`].
    pub fn with_max_lifetime(mut self, max: Duration) -> Self {
        self.max_lifetime = max;
        self
    }

    /// How long after it was fetched a token that the server says lives `lifetime` is
    /// refreshed: `margin` before it expires, or halfway through a life shorter than
    /// the margin, after clamping `lifetime` to `max_lifetime`.
    fn refresh_after(&self, lifetime: Duration) -> Duration {
        let lifetime = lifetime.min(self.max_lifetime);
        if lifetime > self.margin {
            lifetime - self.margin
        } else {
            lifetime / 2
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<Value>,
}

/// The server's `expires_in`, as a duration that may be [`Duration::MAX`] but never
/// overflows: a non-negative integer or fraction of seconds, or a string of digits.
fn lifetime(expires_in: Option<&Value>) -> Result<Duration, Error> {
    let not_seconds = || Error::Malformed("expires_in is not a number of seconds".into());
    match expires_in {
        None | Some(Value::Null) => Ok(DEFAULT_LIFETIME),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(secs), _) => Ok(Duration::from_secs(secs)),
            // Negative: already expired. Too large for a duration: as long as can be.
            (None, Some(secs)) if secs <= 0.0 => Ok(Duration::ZERO),
            (None, Some(secs)) => Ok(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)),
            (None, None) => Err(not_seconds()),
        },
        Some(Value::String(s)) => {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(not_seconds());
            }
            Ok(s.parse::<u64>().map_or(Duration::MAX, Duration::from_secs))
        }
        Some(_) => Err(not_seconds()),
    }
}

#[derive(Debug, Clone)]
struct Cached {
    token: Secret,
    refresh_at: Instant,
}

/// A cache of client-credentials tokens; share one per integration.
#[derive(Debug)]
pub struct TokenSource {
    creds: ClientCredentials,
    client: reqwest::Client,
    cached: Mutex<Option<Cached>>,
    refreshing: tokio::sync::Mutex<()>,
    refreshes: AtomicU64,
}

impl TokenSource {
    /// A token source with its own HTTP client.
    pub fn new(creds: ClientCredentials) -> Self {
        TokenSource::with_client(creds, reqwest::Client::new())
    }

    /// A token source using `client`.
    pub fn with_client(creds: ClientCredentials, client: reqwest::Client) -> Self {
        TokenSource {
            creds,
            client,
            cached: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            refreshes: AtomicU64::new(0),
        }
    }

    /// How long until the cached token is refreshed, if one is cached and fresh.
    pub fn refresh_due_in(&self) -> Option<Duration> {
        let g = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        g.as_ref()
            .filter(|c| now < c.refresh_at)
            .map(|c| c.refresh_at.saturating_duration_since(now))
    }

    /// How many tokens were fetched so far.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    fn fresh(&self) -> Option<Secret> {
        let g = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref()
            .filter(|c| Instant::now() < c.refresh_at)
            .map(|c| c.token.clone())
    }

    /// A valid token: the cached one, or a new one if it is missing or about to expire.
    /// While one caller refreshes, the others wait for its token instead of fetching
    /// their own.
    ///
    /// # Errors
    ///
    /// [`Error`] if a token cannot be had.
    pub async fn token(&self) -> Result<Secret, Error> {
        if let Some(t) = self.fresh() {
            return Ok(t);
        }
        let _one = self.refreshing.lock().await;
        // Somebody may have refreshed while we waited for the lock.
        if let Some(t) = self.fresh() {
            return Ok(t);
        }
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(s) = &self.creds.scope {
            form.push(("scope", s.as_str()));
        }
        let resp = self
            .client
            .post(&self.creds.token_url)
            .basic_auth(
                &self.creds.client_id,
                Some(self.creds.client_secret.expose()),
            )
            .form(&form)
            .timeout(TOKEN_TIMEOUT)
            .send()
            .await
            .map_err(|e| Error::Unavailable(e.without_url().to_string()))?;
        let status = resp.status();
        // The token endpoint asking for another try, or failing: try again later.
        let again = matches!(
            status,
            reqwest::StatusCode::REQUEST_TIMEOUT
                | reqwest::StatusCode::TOO_EARLY
                | reqwest::StatusCode::TOO_MANY_REQUESTS
        );
        if status.is_server_error() || again {
            return Err(Error::Unavailable(status.to_string()));
        }
        if !status.is_success() {
            return Err(Error::Refused(status.to_string()));
        }
        // A token answer is small: a larger one is not read.
        let mut resp = resp;
        let mut raw: Vec<u8> = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| Error::Unavailable(e.without_url().to_string()))?
        {
            if raw.len().saturating_add(chunk.len()) > MAX_TOKEN_RESPONSE_BYTES {
                return Err(Error::Malformed(format!(
                    "a token answer over {MAX_TOKEN_RESPONSE_BYTES} bytes"
                )));
            }
            raw.extend_from_slice(&chunk);
        }
        let body: TokenResponse =
            serde_json::from_slice(&raw).map_err(|e| Error::Malformed(e.to_string()))?;
        let asked = lifetime(body.expires_in.as_ref())?;
        if asked > self.creds.max_lifetime {
            tracing::warn!(client_id = %self.creds.client_id, expires_in = ?asked, max_lifetime = ?self.creds.max_lifetime, "token lifetime longer than the maximum: clamped");
        }
        let refresh_after = self.creds.refresh_after(asked);
        let token = Secret::new(body.access_token);
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(Cached {
            token: token.clone(),
            refresh_at: crate::instant_after(Instant::now(), refresh_after),
        });
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        tracing::info!(client_id = %self.creds.client_id, expires_in = ?asked.min(self.creds.max_lifetime), refresh_in = ?refresh_after, "fetched an access token");
        Ok(token)
    }

    /// Forgets `token` if it is the cached one (the API answered 401 to it), so the
    /// next [`TokenSource::token`] fetches a new one. A newer token is kept.
    pub fn invalidate(&self, token: &Secret) {
        let mut g = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().is_some_and(|c| c.token == *token) {
            *g = None;
        }
    }
}
