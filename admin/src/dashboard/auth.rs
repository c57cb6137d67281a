//! Sessions, login and logout, and the checks every POST passes: the session cookie
//! (401), the admin role (403), the request's origin and the CSRF token (403).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::render::{self, Esc};
use super::Dash;
use crate::{Auth, Role, Token};

type HmacSha256 = Hmac<Sha256>;

/// The largest form body read (repairs, bulk and login forms are a few hundred bytes).
const FORM_LIMIT: usize = 64 * 1024;

/// The longest operator name taken at login, in characters.
const MAX_OPERATOR: usize = 64;

/// The signing keys of sessions, one per role, derived from the tokens.
pub(super) struct Keys {
    admin: [u8; 32],
    read: Option<[u8; 32]>,
}

impl Keys {
    pub(super) fn new(auth: &Auth) -> Keys {
        Keys {
            admin: derive(&auth.admin, Role::Admin, &auth.admin),
            read: auth
                .read
                .as_ref()
                .map(|r| derive(&auth.admin, Role::Read, r)),
        }
    }

    fn of(&self, role: Role) -> Option<&[u8; 32]> {
        match role {
            Role::Admin => Some(&self.admin),
            Role::Read => self.read.as_ref(),
        }
    }
}

fn hmac(key: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length: this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// A role's session key: keyed with the admin token (which a read token's holder does
/// not know, so cannot forge an admin session) over the role and the token that logs in
/// with it (so rotating either token ends the sessions it signed).
fn derive(admin: &Token, role: Role, token: &Token) -> [u8; 32] {
    let mut m = hmac(admin.0.as_bytes());
    m.update(b"sagaflow dashboard session key v1\0");
    m.update(role_name(role).as_bytes());
    m.update(b"\0");
    m.update(token.0.as_bytes());
    m.finalize().into_bytes().into()
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Read => "read",
    }
}

/// Who is logged in, for one request.
#[derive(Clone, Debug)]
pub(super) struct Session {
    pub(super) role: Role,
    pub(super) operator: String,
    /// The CSRF token every form of this session carries.
    pub(super) csrf: String,
}

impl Session {
    pub(super) fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn cookie_name(d: &Dash) -> &'static str {
    // `__Host-`: the browser takes the cookie only if Secure, for Path=/ and without a
    // Domain, so no sibling host can plant one.
    if d.options.secure_cookies {
        "__Host-sagaflow_session"
    } else {
        "sagaflow_session"
    }
}

/// The cookie value of a new session: `v1.<role>.<expires ms>.<name hex>.<mac hex>`.
fn mint(keys: &Keys, role: Role, operator: &str, ttl: Duration) -> Option<String> {
    let expires = now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    let payload = format!(
        "v1.{}.{expires}.{}",
        role_name(role),
        hex::encode(operator.as_bytes())
    );
    let mut m = hmac(keys.of(role)?);
    m.update(payload.as_bytes());
    Some(format!(
        "{payload}.{}",
        hex::encode(m.finalize().into_bytes())
    ))
}

/// The session a cookie value stands for, if its signature holds and it has not
/// expired.
fn verify(keys: &Keys, value: &str) -> Option<Session> {
    let (payload, mac) = value.rsplit_once('.')?;
    let mut parts = payload.split('.');
    let (Some("v1"), Some(role), Some(expires), Some(name), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let role = match role {
        "admin" => Role::Admin,
        "read" => Role::Read,
        _ => return None,
    };
    let key = keys.of(role)?;
    let mut m = hmac(key);
    m.update(payload.as_bytes());
    // Constant time: a forger learns nothing from how long the refusal took.
    m.verify_slice(&hex::decode(mac).ok()?).ok()?;
    if expires.parse::<u64>().ok()? <= now_ms() {
        return None;
    }
    let operator = String::from_utf8(hex::decode(name).ok()?).ok()?;
    let mut c = hmac(key);
    c.update(b"csrf\0");
    c.update(value.as_bytes());
    Some(Session {
        role,
        operator,
        csrf: hex::encode(c.finalize().into_bytes()),
    })
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

impl Dash {
    pub(super) fn session_of(&self, headers: &HeaderMap) -> Option<Session> {
        verify(&self.keys, cookie(headers, cookie_name(self))?)
    }
}

/// Whether a state-changing request comes from the dashboard's own pages, as far as the
/// browser says: `Sec-Fetch-Site`, then `Origin`, then `Referer` must name this host.
/// A request with none of them (not a browser) passes here; the CSRF token still has to
/// match.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        if !matches!(site, "same-origin" | "none") {
            return false;
        }
    }
    let host = text(header::HOST);
    let authority = |url: &str| -> Option<String> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))?;
        rest.split(['/', '?', '#'])
            .next()
            .map(|a| a.to_ascii_lowercase())
    };
    let claimed = match (text(header::ORIGIN), text(header::REFERER)) {
        (Some(origin), _) => origin,
        (None, Some(referer)) => referer,
        (None, None) => return true,
    };
    match (authority(claimed), host) {
        (Some(a), Some(h)) => a == h.to_ascii_lowercase(),
        _ => false,
    }
}

/// The `csrf` field of a form body (hex, so never percent-encoded by a browser).
fn csrf_field(body: &[u8]) -> Option<&[u8]> {
    body.split(|&b| b == b'&')
        .filter_map(|pair| {
            let eq = pair.iter().position(|&b| b == b'=')?;
            Some((&pair[..eq], &pair[eq + 1..]))
        })
        .find(|(name, _)| *name == b"csrf")
        .map(|(_, value)| value)
}

/// Every page: a valid session, or 401 with the login form. A POST also needs a
/// request from this origin and the session's CSRF token in its form (403).
pub(super) async fn require_session(
    State(d): State<Dash>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    let Some(session) = d.session_of(request.headers()) else {
        tracing::warn!(%path, "dashboard: refused, no valid session");
        let back = if request.method() == Method::GET {
            request
                .uri()
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string())
        } else {
            "/".to_string()
        };
        return login_form(StatusCode::UNAUTHORIZED, &back, None);
    };
    let mut request = request;
    if request.method() != Method::GET && request.method() != Method::HEAD {
        if !same_origin(request.headers()) {
            tracing::warn!(%path, operator = %session.operator, "dashboard: refused, a POST from another origin");
            return render::problem(
                StatusCode::FORBIDDEN,
                Some(&session),
                "Refused",
                "This form was not sent from the dashboard's own pages.",
            );
        }
        let (parts, body) = request.into_parts();
        let bytes: Bytes = match axum::body::to_bytes(body, FORM_LIMIT).await {
            Ok(b) => b,
            Err(_) => {
                return render::problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Some(&session),
                    "Refused",
                    "The form is too large.",
                )
            }
        };
        let token_ok =
            csrf_field(&bytes).is_some_and(|t| bool::from(t.ct_eq(session.csrf.as_bytes())));
        if !token_ok {
            tracing::warn!(%path, operator = %session.operator, "dashboard: refused, a POST without the session's CSRF token");
            return render::problem(
                StatusCode::FORBIDDEN,
                Some(&session),
                "Refused",
                "This form has no valid CSRF token: reload the page and try again.",
            );
        }
        request = Request::from_parts(parts, Body::from(bytes));
    }
    request.extensions_mut().insert(session);
    next.run(request).await
}

/// Changes: the admin role, else 403.
pub(super) async fn require_admin(request: Request, next: Next) -> Response {
    match request.extensions().get::<Session>() {
        Some(s) if s.is_admin() => next.run(request).await,
        other => {
            let path = request.uri().path();
            tracing::warn!(%path, "dashboard: refused, the read-only token cannot repair");
            render::problem(
                StatusCode::FORBIDDEN,
                other,
                "Read-only",
                "You are logged in with the read-only token: repairs and bulk actions need the admin token.",
            )
        }
    }
}

/// A local path to go back to after login: a path on this site, never another site
/// (`//host`, `/\host`, `http:`).
fn local_path(next: Option<&str>) -> String {
    match next {
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.contains('\\')
                && !p.chars().any(char::is_control)
                && !p.starts_with("/login") =>
        {
            p.to_string()
        }
        _ => "/".to_string(),
    }
}

/// The login page, with `status`: 200 when asked for, 401 in place of a page the
/// request had no session for.
pub(super) fn login_form(status: StatusCode, next: &str, error: Option<&str>) -> Response {
    let mut body = String::from("<section class=\"login\"><h1>Sagaflow</h1>");
    if status == StatusCode::UNAUTHORIZED && error.is_none() {
        body.push_str("<p class=\"hint\">Log in to see this page.</p>");
    }
    if let Some(e) = error {
        body.push_str(&format!("<p class=\"flash error\">{}</p>", Esc(e)));
    }
    body.push_str(&format!(
        "<form method=\"post\" action=\"/login\">\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <label>Token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" required autofocus></label>\
         <label>Your name <input type=\"text\" name=\"operator\" maxlength=\"{MAX_OPERATOR}\" required \
         placeholder=\"recorded with every repair\"></label>\
         <button type=\"submit\">Log in</button></form>\
         <p class=\"hint\">The admin token may repair; the read token may only look.</p></section>",
        Esc(&local_path(Some(next)))
    ));
    render::html(
        status,
        render::page("Log in", None, render::Nav::None, &body),
    )
}

#[derive(Debug, Deserialize)]
pub(super) struct NextQuery {
    next: Option<String>,
}

pub(super) async fn login_page(
    q: Result<axum::extract::Query<NextQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let next = q.ok().and_then(|q| q.0.next);
    login_form(StatusCode::OK, &local_path(next.as_deref()), None)
}

#[derive(Debug, Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    operator: String,
    next: Option<String>,
}

pub(super) async fn login(
    State(d): State<Dash>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    // A page of another site must not log a browser in (into the attacker's session).
    if !same_origin(&headers) {
        tracing::warn!("dashboard: login refused, a POST from another origin");
        return login_form(
            StatusCode::FORBIDDEN,
            "/",
            Some("This form was not sent from the dashboard's login page."),
        );
    }
    let Ok(Form(form)) = form else {
        return login_form(
            StatusCode::BAD_REQUEST,
            "/",
            Some("The form could not be read."),
        );
    };
    let next = local_path(form.next.as_deref());
    let presented = form.token.as_bytes();
    let role = if d.auth.admin.matches(presented) {
        Some(Role::Admin)
    } else if d.auth.read.as_ref().is_some_and(|r| r.matches(presented)) {
        Some(Role::Read)
    } else {
        None
    };
    let Some(role) = role else {
        tracing::warn!("dashboard: login refused, not a valid token");
        return login_form(
            StatusCode::UNAUTHORIZED,
            &next,
            Some("That is not a valid token."),
        );
    };
    let operator = form.operator.trim();
    if operator.is_empty()
        || operator.chars().count() > MAX_OPERATOR
        || operator.chars().any(char::is_control)
    {
        return login_form(
            StatusCode::BAD_REQUEST,
            &next,
            Some("Give your name (1 to 64 characters): it is recorded with every repair."),
        );
    }
    let Some(value) = mint(&d.keys, role, operator, d.options.session_ttl) else {
        return login_form(
            StatusCode::UNAUTHORIZED,
            &next,
            Some("That is not a valid token."),
        );
    };
    tracing::info!(%operator, role = role_name(role), "dashboard: logged in");
    let mut cookie = format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Strict",
        cookie_name(&d)
    );
    if d.options.secure_cookies {
        cookie.push_str("; Secure");
    }
    see_other(&next, Some(cookie))
}

pub(super) async fn logout(State(d): State<Dash>) -> Response {
    let mut cookie = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        cookie_name(&d)
    );
    if d.options.secure_cookies {
        cookie.push_str("; Secure");
    }
    see_other("/login", Some(cookie))
}

/// A 303 to a local path, with a cookie to set.
pub(super) fn see_other(location: &str, cookie: Option<String>) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    // A path that is no valid header value (not ASCII, say) goes to the overview.
    let to = HeaderValue::from_str(location).unwrap_or(HeaderValue::from_static("/"));
    r.headers_mut().insert(header::LOCATION, to);
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        let auth = Auth::new(Token::new("admin-token-0123456789").unwrap())
            .with_read_token(Token::new("read-token-0123456789").unwrap());
        Keys::new(&auth)
    }

    #[test]
    fn a_session_verifies_only_as_minted() {
        let k = keys();
        let v = mint(&k, Role::Read, "ana <b>", Duration::from_secs(60)).unwrap();
        let s = verify(&k, &v).unwrap();
        assert_eq!((s.role, s.operator.as_str()), (Role::Read, "ana <b>"));
        // Claiming the admin role with the read session's signature fails.
        let forged = v.replacen(".read.", ".admin.", 1);
        assert!(verify(&k, &forged).is_none());
        // So does another name, an expired one, and garbage.
        let renamed = v.replacen(&hex::encode("ana <b>"), &hex::encode("bob"), 1);
        assert!(verify(&k, &renamed).is_none());
        let old = mint(&k, Role::Admin, "ana", Duration::ZERO).unwrap();
        assert!(verify(&k, &old).is_none());
        for junk in ["", "v1", "v1.admin.1.00.zz", "v1.admin.x.y.z.w"] {
            assert!(verify(&k, junk).is_none(), "{junk}");
        }
        // Another admin token: every session it did not sign is refused.
        let other = Keys::new(&Auth::new(Token::new("admin-token-9876543210").unwrap()));
        assert!(verify(&other, &v).is_none());
    }

    #[test]
    fn csrf_tokens_differ_per_session() {
        let k = keys();
        let a = verify(
            &k,
            &mint(&k, Role::Admin, "ana", Duration::from_secs(60)).unwrap(),
        );
        let b = verify(
            &k,
            &mint(&k, Role::Admin, "bob", Duration::from_secs(60)).unwrap(),
        );
        assert_ne!(a.unwrap().csrf, b.unwrap().csrf);
    }

    #[test]
    fn only_local_paths_are_followed_after_login() {
        assert_eq!(
            local_path(Some("/sagas?status=parked")),
            "/sagas?status=parked"
        );
        for bad in [
            "//evil.example/",
            "/\\evil.example",
            "https://evil.example",
            "/login",
            "",
        ] {
            assert_eq!(local_path(Some(bad)), "/", "{bad}");
        }
    }

    #[test]
    fn origins_must_name_this_host() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert!(same_origin(&h(&[
            ("host", "127.0.0.1:7071"),
            ("origin", "http://127.0.0.1:7071")
        ])));
        assert!(!same_origin(&h(&[
            ("host", "127.0.0.1:7071"),
            ("origin", "http://evil.example")
        ])));
        assert!(!same_origin(&h(&[
            ("host", "127.0.0.1:7071"),
            ("origin", "null")
        ])));
        assert!(same_origin(&h(&[
            ("host", "a:1"),
            ("referer", "https://a:1/sagas/x")
        ])));
        assert!(!same_origin(&h(&[
            ("host", "a:1"),
            ("referer", "https://a:1.evil/x")
        ])));
        assert!(!same_origin(&h(&[
            ("host", "a:1"),
            ("sec-fetch-site", "cross-site")
        ])));
        assert!(
            same_origin(&h(&[("host", "a:1")])),
            "no browser headers: the CSRF token decides"
        );
    }

    #[test]
    fn the_csrf_field_is_found_in_a_form_body() {
        assert_eq!(csrf_field(b"reason=x&csrf=abc&step=1"), Some(&b"abc"[..]));
        assert_eq!(csrf_field(b"reason=csrf%3Dabc"), None);
        assert_eq!(csrf_field(b""), None);
    }
}
