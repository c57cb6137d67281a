//! The dashboard over plain HTTP: no page without a session, no change without the admin
//! token, the CSRF token and this origin; what a saga says is escaped and its secrets
//! redacted; bulk repairs count first and apply on confirmation.

mod support;

use reqwest::header::{LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use sagaflow::{SagaOutcome, SagaStatus};
use sagaflow_admin::dashboard::DashboardOptions;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_and_form_answers_401_without_a_valid_session() {
    let shop = shop(DashboardOptions::default()).await;
    let url = &shop.url;
    let id = shop.parked;
    let pages = [
        "/".to_string(),
        "/sagas".into(),
        "/sagas?status=parked".into(),
        format!("/sagas/{id}"),
        "/bulk".into(),
        "/no/such/page".into(),
        format!("/sagas/{id}/repair"),
    ];
    let forms = [
        format!("/sagas/{id}/repair"),
        format!("/sagas/{id}/cancel"),
        "/bulk".into(),
        "/logout".into(),
    ];
    // A session signed with another admin token, one with a mangled signature, the
    // token itself as a cookie, and the API's bearer header: none is a session.
    let admin = login(url, ADMIN, "ana").await;
    let last = if admin.ends_with('0') { '1' } else { '0' };
    let mangled = format!("{}{last}", &admin[..admin.len() - 1]);
    let other = {
        let other = support::shop_with_auth_of("admin-token-9999999999").await;
        login(&other, "admin-token-9999999999", "eve").await
    };
    let wrong = [
        String::new(),
        mangled,
        other,
        format!("sagaflow_session={ADMIN}"),
        format!(
            "__Host-sagaflow_session={}",
            &admin["sagaflow_session=".len()..]
        ),
    ];
    for cookie in &wrong {
        for p in &pages {
            let (status, headers, body) = get(&format!("{url}{p}"), cookie).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "GET {p} with {cookie:?}");
            assert!(body.contains("action=\"/login\""), "the login form: {body}");
            assert!(
                !body.contains("checkout") && !body.contains("Timeline"),
                "no page content: {body}"
            );
            assert!(headers["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'none'"));
        }
        for p in &forms {
            let (status, _, body) = post(
                &format!("{url}{p}"),
                cookie,
                &[("action", "resume"), ("reason", "x"), ("status", "parked")],
                &[],
            )
            .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "POST {p} with {cookie:?}");
            assert!(!body.contains("checkout"));
        }
    }
    let bearer = client()
        .get(format!("{url}/sagas"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::UNAUTHORIZED, "cookies only");
    assert_eq!(
        shop.engine.status(id).unwrap().status,
        SagaStatus::Parked,
        "nothing was repaired"
    );

    // A wrong token does not log in.
    let r = client()
        .post(format!("{url}/login"))
        .form(&[("token", "admin-token-0123456788"), ("operator", "eve")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get(SET_COOKIE).is_none());
    // The login page and the stylesheet need no session.
    let (status, _, _) = get(&format!("{url}/login"), "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, css) = get(&format!("{url}/assets/style.css"), "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(css.contains("svg.chart"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_token_sees_every_page_but_cannot_repair() {
    let shop = shop(DashboardOptions::default()).await;
    let url = &shop.url;
    let id = shop.parked;
    let read = login(url, READ, "rita").await;
    for p in [
        "/".to_string(),
        "/sagas".into(),
        format!("/sagas/{id}"),
        "/bulk".into(),
    ] {
        let (status, _, body) = get(&format!("{url}{p}"), &read).await;
        assert_eq!(status, StatusCode::OK, "{p}");
        assert!(body.contains("rita · read-only"), "{p}");
    }
    let (_, _, page) = get(&format!("{url}/sagas/{id}"), &read).await;
    assert!(
        page.contains("Resume") && !page.contains("data-repair="),
        "listed, no forms"
    );
    let token = csrf(url, &read).await;
    for (path, form) in [
        (
            format!("/sagas/{id}/repair"),
            vec![("action", "resume"), ("reason", "fixed"), ("csrf", &token)],
        ),
        (
            format!("/sagas/{id}/cancel"),
            vec![("reason", "no"), ("csrf", &token)],
        ),
        (
            "/bulk".to_string(),
            vec![
                ("status", "parked"),
                ("action", "resume"),
                ("reason", "fixed"),
                ("csrf", &token),
            ],
        ),
    ] {
        let (status, _, body) = post(&format!("{url}{path}"), &read, &form, &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert!(body.contains("read-only"), "{body}");
    }
    assert_eq!(shop.engine.status(id).unwrap().status, SagaStatus::Parked);
    // Logging out is not a repair.
    let (status, headers, _) =
        post(&format!("{url}/logout"), &read, &[("csrf", &token)], &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(headers[SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_needs_the_csrf_token_and_this_origin() {
    let shop = shop(DashboardOptions::default()).await;
    let url = &shop.url;
    let id = shop.parked;
    let admin = login(url, ADMIN, "ana").await;
    let token = csrf(url, &admin).await;
    let other_session = csrf(url, &login(url, ADMIN, "bob").await).await;
    let repair = format!("{url}/sagas/{id}/repair");
    let here = url.as_str();
    type Fields<'a> = Vec<(&'a str, &'a str)>;
    let refused: [(&str, Fields, Fields); 6] = [
        ("no token", vec![], vec![]),
        ("a wrong token", vec![("csrf", "00")], vec![]),
        (
            "another session's token",
            vec![("csrf", &other_session)],
            vec![],
        ),
        (
            "another origin",
            vec![("csrf", &token)],
            vec![("origin", "http://evil.example")],
        ),
        (
            "another site's referer",
            vec![("csrf", &token)],
            vec![("referer", "http://evil.example/x")],
        ),
        (
            "a cross-site fetch",
            vec![("csrf", &token)],
            vec![("sec-fetch-site", "cross-site"), ("origin", here)],
        ),
    ];
    for (what, extra, headers) in refused {
        let mut form = vec![("action", "resume"), ("reason", "fixed")];
        form.extend(extra);
        let (status, _, _) = post(&repair, &admin, &form, &headers).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
    }
    assert_eq!(shop.engine.status(id).unwrap().status, SagaStatus::Parked);

    // Without a reason: refused, nothing written.
    let (status, _, _) = post(
        &repair,
        &admin,
        &[("action", "resume"), ("reason", "  "), ("csrf", &token)],
        &[("origin", here)],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A repair the saga's state does not allow: 409, with the engine's reason.
    let (status, _, body) = post(
        &repair,
        &admin,
        &[("action", "retry_now"), ("reason", "x"), ("csrf", &token)],
        &[("origin", here)],
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body.contains("SAGA-0012"), "{body}");

    let (status, headers, _) = post(
        &repair,
        &admin,
        &[
            ("action", "resume"),
            ("reason", "stock service fixed"),
            ("csrf", &token),
        ],
        &[("origin", here), ("sec-fetch-site", "same-origin")],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        headers[LOCATION],
        format!("/sagas/{id}?done=resume").as_str()
    );
    assert!(matches!(
        shop.engine.wait(id).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    let (_, _, page) = get(&format!("{url}/sagas/{id}?done=resume"), &admin).await;
    assert!(
        page.contains("operator: resume"),
        "the timeline shows the repair"
    );
    assert!(page.contains("<strong>ana</strong>: stock service fixed"));

    // A login form posted from another site is refused too.
    let r = client()
        .post(format!("{url}/login"))
        .header("origin", "http://evil.example")
        .form(&[("token", ADMIN), ("operator", "eve")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.headers().get(SET_COOKIE).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_and_the_headers_are_strict() {
    let shop = shop(DashboardOptions::default()).await;
    let r = client()
        .post(format!("{}/login", shop.url))
        .form(&[
            ("token", ADMIN),
            ("operator", "ana"),
            ("next", "//evil.example/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()[LOCATION], "/", "only local paths after login");
    let cookie = r.headers()[SET_COOKIE].to_str().unwrap();
    assert!(cookie.starts_with("sagaflow_session=v1.admin."), "{cookie}");
    for attr in ["; Path=/", "; HttpOnly", "; SameSite=Strict"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure") && !cookie.contains("Max-Age"),
        "{cookie}"
    );
    assert!(!cookie.contains(ADMIN), "the cookie holds no token");
    let session = cookie.split(';').next().unwrap();
    let (_, headers, _) = get(&format!("{}/", shop.url), session).await;
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["cache-control"], "no-store");
    let csp = headers["content-security-policy"].to_str().unwrap();
    for part in [
        "default-src 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");

    let secure = support::shop(DashboardOptions::default().with_secure_cookies(true)).await;
    let r = client()
        .post(format!("{}/login", secure.url))
        .form(&[("token", READ), ("operator", "rita")])
        .send()
        .await
        .unwrap();
    let cookie = r.headers()[SET_COOKIE].to_str().unwrap();
    assert!(
        cookie.starts_with("__Host-sagaflow_session=v1.read."),
        "{cookie}"
    );
    assert!(cookie.contains("; Secure"), "{cookie}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_saga_says_is_escaped_and_its_secrets_redacted() {
    let shop = shop(DashboardOptions::default()).await;
    let url = &shop.url;
    let admin = login(url, ADMIN, "<b>ana</b>").await;
    let (status, _, page) = get(&format!("{url}/sagas/{}", shop.parked), &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !page.contains(SCRIPT),
        "markup from the input is not markup"
    );
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!page.contains(CARD) && !page.contains("ana@example.com") && !page.contains("\"123\""));
    assert!(page.contains("[redacted]"));
    assert!(!page.contains("<b>ana</b>") && page.contains("&lt;b&gt;ana&lt;/b&gt;"));
    // The timeline: attempts with their keys, the failure and the park.
    let id = shop.parked;
    assert!(
        page.contains(&format!("{id}/order/action")),
        "idempotency keys"
    );
    assert!(page.contains("attempt 1 failed") && page.contains("parked (compensation_failed)"));
    // Only the repairs its state allows: a saga parked on a failed compensation can be
    // resumed, have that compensation skipped, or be resolved; not retried, compensated
    // or cancelled.
    for offered in ["resume", "skip_step", "mark_resolved"] {
        assert!(
            page.contains(&format!("data-repair=\"{offered}\"")),
            "{offered}"
        );
    }
    for not in ["retry_now", "force_compensate", "cancel"] {
        assert!(!page.contains(&format!("data-repair=\"{not}\"")), "{not}");
    }

    // A reason with markup, in the list and on the saga's page.
    let (_, _, list) = get(&format!("{url}/sagas?status=resolved"), &admin).await;
    assert!(list.contains(&shop.resolved.to_string()));
    assert!(!list.contains("<img src=x"), "{list}");
    assert!(list.contains("&lt;img src=x onerror=alert(2)&gt;"));
    // Filters: parked only, newest first, and the text of reasons.
    let (_, _, parked) = get(&format!("{url}/sagas?status=parked"), &admin).await;
    let (a, b) = (
        parked.find(&shop.parked.to_string()).unwrap(),
        parked.find(&shop.also_parked.to_string()).unwrap(),
    );
    assert!(a < b, "newest first");
    assert!(!parked.contains(&shop.completed.to_string()));
    let (_, _, by_text) = get(&format!("{url}/sagas?text=REFUNDED+BY"), &admin).await;
    assert!(by_text.contains(&shop.resolved.to_string()));
    assert!(!by_text.contains(&shop.parked.to_string()));
    let (status, _, _) = get(&format!("{url}/sagas?status=sleeping"), &admin).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_pages_with_a_cursor() {
    let shop = shop(DashboardOptions::default().with_page_size(2)).await;
    let url = &shop.url;
    let admin = login(url, ADMIN, "ana").await;
    let mut seen = Vec::new();
    let mut next = format!("{url}/sagas");
    for _ in 0..10 {
        let (_, _, page) = get(&next, &admin).await;
        for part in page.split("<a class=\"mono\" href=\"/sagas/").skip(1) {
            seen.push(part[..36].to_string());
        }
        match page.find("rel=\"next\"") {
            Some(_) => {
                let at = page.find("/sagas?after=").unwrap();
                let end = page[at..].find('"').unwrap();
                next = format!("{url}{}", &page[at..at + end].replace("&amp;", "&"));
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), 7, "every saga once: {seen:?}");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(seen, sorted, "newest first, across pages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_repair_counts_first_and_applies_on_confirmation() {
    let shop = shop(DashboardOptions::default()).await;
    let url = &shop.url;
    let admin = login(url, ADMIN, "ana").await;
    let token = csrf(url, &admin).await;
    let bulk = format!("{url}/bulk");
    let (status, _, _) = post(
        &bulk,
        &admin,
        &[
            ("status", "parked"),
            ("action", "resume"),
            ("reason", ""),
            ("csrf", &token),
        ],
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a reason is required");

    let form = [
        ("status", "parked"),
        ("park_kind", "compensation_failed"),
        ("action", "resume"),
        ("reason", "inventory service fixed"),
        ("csrf", token.as_str()),
    ];
    let (status, _, dry) = post(&bulk, &admin, &form, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(dry.contains("dry run"), "{dry}");
    assert!(
        dry.contains("<dd class=\"matched\">2</dd>")
            && dry.contains("<dd class=\"applied\">2</dd>")
    );
    assert!(
        dry.contains("name=\"confirm\" value=\"2-"),
        "a confirm form"
    );
    assert!(
        dry.contains("name=\"park_kind\" value=\"compensation_failed\""),
        "with the same filter"
    );
    for id in [shop.parked, shop.also_parked] {
        assert_eq!(shop.engine.status(id).unwrap().status, SagaStatus::Parked);
    }
    let token = confirm_token(&dry);
    let mut confirm = form.to_vec();
    confirm.push(("confirm", token.as_str()));
    let (status, _, applied) = post(&bulk, &admin, &confirm, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(applied.contains("Bulk repair: applied"));
    assert!(
        applied.contains("<dd class=\"applied\">2</dd>"),
        "{applied}"
    );
    for id in [shop.parked, shop.also_parked] {
        assert!(matches!(
            shop.engine.wait(id).await.unwrap(),
            SagaOutcome::Compensated { .. }
        ));
        let who: Vec<_> = shop
            .engine
            .history(id)
            .unwrap()
            .into_iter()
            .filter_map(|r| match r.event {
                sagaflow::machine::Event::OperatorAction {
                    operator, reason, ..
                } => Some((operator, reason)),
                _ => None,
            })
            .collect();
        assert_eq!(
            who,
            vec![("ana".to_string(), "inventory service fixed".to_string())]
        );
    }
}
