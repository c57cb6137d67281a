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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::secrets::Secret;

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
            _ => sagaflow::StepError::permanent(self),
        }
    }
}

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
}

impl ClientCredentials {
    /// Credentials for `token_url`; refreshes 30 s before expiry.
    pub fn new(token_url: impl Into<String>, client_id: impl Into<String>, secret: Secret) -> Self {
        ClientCredentials {
            token_url: token_url.into(),
            client_id: client_id.into(),
            client_secret: secret,
            scope: None,
            margin: Duration::from_secs(30),
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
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: Option<u64>,
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
            .send()
            .await
            .map_err(|e| Error::Unavailable(e.without_url().to_string()))?;
        let status = resp.status();
        if status.is_server_error() {
            return Err(Error::Unavailable(status.to_string()));
        }
        if !status.is_success() {
            return Err(Error::Refused(status.to_string()));
        }
        let body: TokenResponse = resp
            .json()
            .await
            .map_err(|e| Error::Malformed(e.without_url().to_string()))?;
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(300));
        let token = Secret::new(body.access_token);
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(Cached {
            token: token.clone(),
            refresh_at: Instant::now() + lifetime.saturating_sub(self.creds.margin),
        });
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        tracing::info!(client_id = %self.creds.client_id, expires_in = ?lifetime, "fetched an access token");
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
