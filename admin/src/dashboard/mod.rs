//! The operator dashboard: the admin API's queries and repairs as server-rendered web
//! pages, for a browser.
//!
//! | method and path | who | what |
//! | --- | --- | --- |
//! | `GET /login` | anyone | the login form: a token and the operator's name |
//! | `POST /login` | anyone | checks the token; sets the session cookie and redirects (303) |
//! | `POST /logout` | session | clears the cookie |
//! | `GET /` | read | overview: counts by status and definition, stuck and parked, activity over the last minutes |
//! | `GET /sagas?status=&definition=&park_kind=&older_than=&newer_than=&stuck=&start_key=&text=&after=` | read | the saga list, newest first, a page at a time (`after`: the last id of the previous page) |
//! | `GET /sagas/{id}` | read | one saga: summary, steps with keys and outputs, the timeline of its log, the repairs that apply now |
//! | `POST /sagas/{id}/repair` | admin | form `action`, `step`, `drift`, `reason`: one repair, recorded with the session's operator |
//! | `POST /sagas/{id}/cancel` | admin | form `reason` |
//! | `GET /bulk` | read | the bulk form (the list's filter, an action, a reason) |
//! | `POST /bulk` | admin | without `confirm`: a dry run (matched, would apply, refused); with `confirm=yes`: applies it |
//! | `GET /assets/style.css` | anyone | the stylesheet (embedded in the binary) |
//!
//! **Tokens and sessions.** The same two tokens as the API ([`crate::Auth`]): the admin
//! token may do everything, the read token may look at everything and repair nothing (a
//! POST with it is answered 403). The login form takes a token and the operator's name;
//! the dashboard then sets a session cookie holding the role, the name and an expiry,
//! signed with HMAC-SHA256 under a key derived from the admin token and the token that
//! logged in (so the cookie holds no token, a read token cannot mint an admin session,
//! and rotating a token ends the sessions it opened). The cookie is `HttpOnly`,
//! `SameSite=Strict`, `Path=/`, without `Max-Age` (it ends with the browser), and
//! `Secure` with the name prefix `__Host-` when [`DashboardOptions::with_secure_cookies`]
//! is on (set it whenever the dashboard is reached over https, through a proxy or not).
//! A session ends after [`DashboardOptions::with_session_ttl`] (8 hours by default);
//! logging out clears the cookie in that browser (a copy of the cookie stays valid until
//! it expires or the token is rotated: the server keeps no session list).
//!
//! **Every page needs a session.** A request without a valid session cookie, or with an
//! expired or forged one, gets 401 with the login form as its body and nothing else,
//! whatever it asked for; only `/login` and the stylesheet answer without one.
//!
//! **CSRF.** Every POST (repairs, cancel, bulk, logout) must carry, in the hidden field
//! `csrf`, a token that is the HMAC of the session cookie under the session's key: a page
//! of another site can neither read it nor compute it. On top of that the cookie is
//! `SameSite=Strict`, and a POST whose `Origin` (or, without one, `Referer`) names
//! another host than the request's `Host`, or whose `Sec-Fetch-Site` says it came from
//! another site, is refused with 403. The login form checks `Origin` too.
//!
//! **Who repairs.** The operator recorded with a repair or a bulk action (the log's
//! "who") is the name given at login, kept in the signed session; the reason is asked on
//! each form and required.
//!
//! **What is shown.** Pages are HTML rendered on the server, with every value that comes
//! from a saga (inputs, outputs, errors, reasons, keys) escaped. Inputs and outputs pass
//! through a redaction rule first ([`DashboardOptions::with_redact`]): a JSON field whose
//! name contains one of the listed words, at any depth, has its value shown as
//! `"[redacted]"`. Error messages and reasons are free text and are shown as they are.
//! There is no JavaScript; responses carry a Content-Security-Policy that allows only the
//! dashboard's own stylesheet and forms posting to itself, `X-Frame-Options: DENY` and
//! `Cache-Control: no-store`.
//!
//! Serve it on a listener of its own, at the root (the pages link to absolute paths),
//! bound to a loopback or internal address, next to the API's:
//!
//! ```no_run
//! # async fn run(engine: sagaflow::Engine) -> std::io::Result<()> {
//! use std::future::IntoFuture;
//! use std::sync::Arc;
//! use sagaflow_admin::dashboard::{self, DashboardOptions};
//! use sagaflow_admin::Auth;
//!
//! let Some(auth) = Auth::from_env()? else { return Ok(()) }; // no admin token: neither
//! let engine = Arc::new(engine);
//! let api = sagaflow_admin::router(engine.clone(), auth.clone());
//! let pages = dashboard::router(engine, auth, DashboardOptions::default());
//! let api_listener = tokio::net::TcpListener::bind("127.0.0.1:7070").await?;
//! let pages_listener = tokio::net::TcpListener::bind("127.0.0.1:7071").await?;
//! tokio::try_join!(
//!     axum::serve(api_listener, api).into_future(),
//!     axum::serve(pages_listener, pages).into_future(),
//! )?;
//! # Ok(())
//! # }
//! ```
//!
//! [`serve`] does the second half alone.

mod assets;
mod auth;
mod filter;
mod pages;
mod render;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use sagaflow::Engine;

use crate::Auth;

/// How the dashboard behaves: redaction, cookies, sessions, and what its pages count.
///
/// ```
/// use std::time::Duration;
/// use sagaflow_admin::dashboard::DashboardOptions;
///
/// let options = DashboardOptions::default()
///     .with_secure_cookies(true)
///     .with_redact(["card", "iban", "email"])
///     .with_session_ttl(Duration::from_secs(4 * 3600));
/// # let _ = options;
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DashboardOptions {
    /// Words that mark a JSON field of an input or output as secret.
    pub redact: Vec<String>,
    /// Whether the session cookie is `Secure` (and named with the `__Host-` prefix).
    pub secure_cookies: bool,
    /// How long a session lasts after login.
    pub session_ttl: Duration,
    /// An active saga with no transition for this long counts as stuck.
    pub stuck_after: Duration,
    /// The overview's activity chart covers this much time before now.
    pub activity_window: Duration,
    /// In this many buckets.
    pub activity_buckets: usize,
    /// Sagas per page of the list.
    pub page_size: usize,
}

/// The words [`DashboardOptions::redact`] holds by default.
pub const DEFAULT_REDACT: [&str; 8] = [
    "card", "cvv", "cvc", "password", "token", "secret", "email", "iban",
];

impl Default for DashboardOptions {
    fn default() -> Self {
        DashboardOptions {
            redact: DEFAULT_REDACT.iter().map(|w| w.to_string()).collect(),
            secure_cookies: false,
            session_ttl: Duration::from_secs(8 * 3600),
            stuck_after: Duration::from_secs(15 * 60),
            activity_window: Duration::from_secs(30 * 60),
            activity_buckets: 30,
            page_size: 50,
        }
    }
}

impl DashboardOptions {
    /// Replaces the redaction rule: a field of an input or output whose name contains
    /// one of `words` (ignoring case, `_` and `-`: `card` hides `card_number` and
    /// `cardNumber`) has its value, whatever it is, shown as `"[redacted]"`, at any depth.
    /// An empty list shows everything.
    pub fn with_redact<I, S>(mut self, words: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.redact = words.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`DashboardOptions::secure_cookies`]: on whenever browsers reach the
    /// dashboard over https (a browser does not send a `Secure` cookie over plain http).
    pub fn with_secure_cookies(mut self, secure: bool) -> Self {
        self.secure_cookies = secure;
        self
    }

    /// Sets [`DashboardOptions::session_ttl`] (default 8 hours).
    pub fn with_session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = ttl;
        self
    }

    /// Sets [`DashboardOptions::stuck_after`] (default 15 minutes).
    pub fn with_stuck_after(mut self, d: Duration) -> Self {
        self.stuck_after = d;
        self
    }

    /// Sets the overview's activity window and its buckets (default 30 minutes in 30).
    pub fn with_activity(mut self, window: Duration, buckets: usize) -> Self {
        self.activity_window = window;
        self.activity_buckets = buckets.clamp(1, 240);
        self
    }

    /// Sets [`DashboardOptions::page_size`] (default 50; at least 1, at most 1000).
    pub fn with_page_size(mut self, n: usize) -> Self {
        self.page_size = n.clamp(1, 1000);
        self
    }
}

#[derive(Clone)]
struct Dash {
    engine: Arc<Engine>,
    auth: Arc<Auth>,
    keys: Arc<auth::Keys>,
    options: Arc<DashboardOptions>,
}

/// The dashboard's routes over `engine`, for a listener of their own (see the module
/// docs for the routes and the security design).
pub fn router(engine: Arc<Engine>, auth: Auth, options: DashboardOptions) -> Router {
    let state = Dash {
        engine,
        keys: Arc::new(auth::Keys::new(&auth)),
        auth: Arc::new(auth),
        options: Arc::new(options),
    };
    // Layers run outside in: the session first (401), then, for a change, the admin
    // role (403).
    let writes = Router::new()
        .route("/sagas/{id}/repair", post(pages::repair))
        .route("/sagas/{id}/cancel", post(pages::cancel))
        .route("/bulk", post(pages::bulk))
        .route_layer(middleware::from_fn(auth::require_admin));
    let pages = Router::new()
        .route("/", get(pages::overview))
        .route("/sagas", get(pages::list))
        .route("/sagas/{id}", get(pages::saga))
        .route("/bulk", get(pages::bulk_form))
        .route("/logout", post(auth::logout))
        .merge(writes)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_session,
        ));
    Router::new()
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/assets/style.css", get(assets::style))
        .merge(pages)
        .fallback(pages::not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// Serves the dashboard on `listener` until the server fails.
///
/// # Errors
///
/// The I/O error that stopped the server.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    auth: Auth,
    options: DashboardOptions,
) -> std::io::Result<()> {
    axum::serve(listener, router(engine, auth, options)).await
}

/// What the browser may do with a response: nothing but show it, styled by the
/// dashboard's own stylesheet. No scripts at all, no framing, forms only to itself.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    let mut set = |name: header::HeaderName, value: &'static str| {
        if !h.contains_key(&name) {
            h.insert(name, HeaderValue::from_static(value));
        }
    };
    set(header::CONTENT_SECURITY_POLICY, CSP);
    set(header::X_FRAME_OPTIONS, "DENY");
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(header::REFERRER_POLICY, "same-origin");
    set(header::CACHE_CONTROL, "no-store");
    set(
        header::HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    response
}
