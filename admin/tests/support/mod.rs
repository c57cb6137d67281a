//! A shop for the dashboard's tests: an engine on a memory store holding sagas in every
//! state a page shows (parked twice, resolved by hand, compensated, completed), and the
//! dashboard served for it on 127.0.0.1.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use reqwest::header::{HeaderMap, SET_COOKIE};
use reqwest::{redirect, Client, StatusCode};
use sagaflow::machine::Repair;
use sagaflow::store::MemLog;
use sagaflow::{Engine, Phase, SagaId, SagaOutcome};
use sagaflow_admin::dashboard::{self, DashboardOptions};
use sagaflow_admin::{Auth, Token};
use sagaflow_tests::*;
use serde_json::json;

pub const ADMIN: &str = "admin-token-0123456789";
pub const READ: &str = "read-token-0123456789";

/// What a saga's input says that must never reach a page as markup.
pub const SCRIPT: &str = "<script>alert(1)</script>";
/// A card number that must never reach a page at all.
pub const CARD: &str = "4111111111111111";
/// The reason the resolved saga was resolved with: markup again.
pub const RESOLVED_WHY: &str = "<img src=x onerror=alert(2)> refunded by hand";

pub struct Shop {
    pub url: String,
    pub engine: Arc<Engine>,
    pub ledger: Arc<Ledger>,
    /// Parked: its inventory compensation was refused for good.
    pub parked: SagaId,
    /// Parked the same way.
    pub also_parked: SagaId,
    /// Parked, then resolved by hand with [`RESOLVED_WHY`].
    pub resolved: SagaId,
    /// Compensated: the order was refused.
    pub compensated: SagaId,
    /// Completed.
    pub completed: SagaId,
}

pub fn auth() -> Auth {
    Auth::new(Token::new(ADMIN).unwrap()).with_read_token(Token::new(READ).unwrap())
}

fn input(tag: &str) -> serde_json::Value {
    json!({
        "tag": tag,
        "order": format!("o-{tag}"),
        "note": SCRIPT,
        "card": { "number": CARD, "cvv": "123" },
        "customer_email": "ana@example.com",
        "items": [{ "sku": "mug", "qty": 2 }],
    })
}

pub async fn shop(options: DashboardOptions) -> Shop {
    let ledger = Ledger::new();
    for tag in ["p1", "p2", "p3"] {
        ledger.script_tagged(tag, "order", Phase::Action, [Outcome::Rejected]);
        ledger.script_tagged(tag, "inventory", Phase::Compensation, [Outcome::Rejected]);
    }
    ledger.script_tagged("ok1", "payment", Phase::Action, [Outcome::Retryable]);
    ledger.script_tagged("c1", "order", Phase::Action, [Outcome::Rejected]);
    let engine = Arc::new(
        builder()
            .register(checkout(&ledger))
            .open_with(Arc::new(MemLog::new()))
            .await
            .unwrap(),
    );
    let run = |tag: &'static str| {
        let engine = engine.clone();
        async move {
            let id = engine.start("checkout", input(tag), None).await.unwrap();
            let outcome = engine.wait(id).await.unwrap();
            (id, outcome)
        }
    };
    let mut ids = Vec::new();
    for tag in ["ok1", "ok2", "ok3", "c1", "p3", "p2", "p1"] {
        ids.push(run(tag).await);
    }
    for (_, outcome) in &ids[..3] {
        assert!(
            matches!(outcome, SagaOutcome::Completed { .. }),
            "{outcome:?}"
        );
    }
    assert!(matches!(ids[3].1, SagaOutcome::Compensated { .. }));
    for (_, outcome) in &ids[4..] {
        assert!(matches!(outcome, SagaOutcome::Parked { .. }), "{outcome:?}");
    }
    engine
        .repair(ids[4].0, Repair::MarkResolved, "ops", RESOLVED_WHY)
        .await
        .unwrap();
    let url = serve(dashboard::router(engine.clone(), auth(), options)).await;
    Shop {
        url,
        engine,
        ledger,
        parked: ids[6].0,
        also_parked: ids[5].0,
        resolved: ids[4].0,
        compensated: ids[3].0,
        completed: ids[0].0,
    }
}

/// Serves `app` on 127.0.0.1; its base URL.
pub async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A dashboard of an empty engine whose admin token is `admin`; its base URL.
pub async fn shop_with_auth_of(admin: &str) -> String {
    let engine = builder()
        .register(checkout(&Ledger::new()))
        .open_with(Arc::new(MemLog::new()))
        .await
        .unwrap();
    let auth = Auth::new(Token::new(admin).unwrap());
    serve(dashboard::router(
        Arc::new(engine),
        auth,
        DashboardOptions::default(),
    ))
    .await
}

/// A client that does not follow redirects (a login answers 303).
pub fn client() -> Client {
    Client::builder()
        .redirect(redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs in; the `name=value` of the session cookie.
pub async fn login(url: &str, token: &str, operator: &str) -> String {
    let r = client()
        .post(format!("{url}/login"))
        .form(&[("token", token), ("operator", operator), ("next", "/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "login with {token}");
    let cookie = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    cookie.split(';').next().unwrap().to_string()
}

pub async fn get(url: &str, cookie: &str) -> (StatusCode, HeaderMap, String) {
    let r = client()
        .get(url)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

/// The CSRF token the pages of this session carry.
pub async fn csrf(url: &str, cookie: &str) -> String {
    let (_, _, page) = get(&format!("{url}/"), cookie).await;
    let at = page.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    page[at..at + 64].to_string()
}

pub async fn post(
    url: &str,
    cookie: &str,
    form: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut req = client().post(url).header("cookie", cookie).form(form);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

/// The confirmation token of a dry run's confirm form.
pub fn confirm_token(page: &str) -> String {
    let open = "name=\"confirm\" value=\"";
    let at = page
        .find(open)
        .unwrap_or_else(|| panic!("no confirm form: {page}"))
        + open.len();
    let end = page[at..].find('"').unwrap();
    page[at..at + end].to_string()
}
