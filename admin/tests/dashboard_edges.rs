//! Edges of the dashboard found in review (issue 16): a bulk confirmation bound to what
//! its dry run matched, a reason too long refused by the dry run, a page that claims no
//! repair nobody made, a contradictory filter, and a default request that is a dry run.
//! Each failed before its fix.

mod support;

use reqwest::StatusCode;
use sagaflow::{Phase, SagaOutcome, SagaStatus};
use sagaflow_admin::dashboard::DashboardOptions;
use sagaflow_tests::Outcome;
use serde_json::json;
use support::*;

/// The number in `<dd class="{class}">N</dd>` of a bulk report.
fn dd(page: &str, class: &str) -> u64 {
    let open = format!("<dd class=\"{class}\">");
    let at = page
        .find(&open)
        .unwrap_or_else(|| panic!("no {class}: {page}"))
        + open.len();
    let end = page[at..].find('<').unwrap();
    page[at..at + end].parse().unwrap()
}

/// The operator confirms "Apply resume to 2 sagas" after a dry run; a third saga that
/// parked in between is not repaired: the confirmation carries what the dry run matched
/// (up to its newest saga), and the bulk repair is refused as a whole when the filter
/// matches anything else there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_bulk_repairs_no_saga_its_dry_run_did_not_count() {
    let shop = shop(DashboardOptions::default()).await;
    let url = &shop.url;
    let admin = login(url, ADMIN, "ana").await;
    let token = csrf(url, &admin).await;
    let bulk = format!("{url}/bulk");
    let form = [
        ("status", "parked"),
        ("park_kind", "compensation_failed"),
        ("action", "resume"),
        ("reason", "inventory service fixed"),
        ("csrf", token.as_str()),
    ];
    let (status, _, dry) = post(&bulk, &admin, &form, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(dd(&dry, "applied"), 2, "the dry run counts 2");
    assert!(dry.contains("Apply resume to 2 sagas"), "{dry}");

    // Meanwhile another saga parks the same way.
    shop.ledger
        .script_tagged("late", "order", Phase::Action, [Outcome::Rejected]);
    shop.ledger.script_tagged(
        "late",
        "inventory",
        Phase::Compensation,
        [Outcome::Rejected],
    );
    let late = shop
        .engine
        .start("checkout", json!({ "tag": "late" }), None)
        .await
        .unwrap();
    assert!(matches!(
        shop.engine.wait(late).await.unwrap(),
        SagaOutcome::Parked { .. }
    ));

    let token_of_dry_run = confirm_token(&dry);
    let mut confirm = form.to_vec();
    confirm.push(("confirm", token_of_dry_run.as_str()));
    let (status, _, applied) = post(&bulk, &admin, &confirm, &[]).await;
    assert_eq!(status, StatusCode::OK, "{applied}");
    assert_eq!(dd(&applied, "applied"), 2, "{applied}");
    assert_eq!(
        shop.engine.status(late).unwrap().status,
        SagaStatus::Parked,
        "a saga the operator never saw counted was repaired: {applied}"
    );
    // The same confirmation again: the sagas it counted are no longer parked, so the
    // filter matches another set (the late saga alone), and nothing is done.
    let (status, _, refused) = post(&bulk, &admin, &confirm, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(refused.contains("changed since the dry run"), "{refused}");
    assert_eq!(shop.engine.status(late).unwrap().status, SagaStatus::Parked);
}

/// A reason longer than any repair may record (4096 bytes) is refused by the dry run
/// itself, rather than counted as "would apply" and refused saga by saga on
/// confirmation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_dry_run_counts_only_what_the_confirmation_applies() {
    let shop = shop(DashboardOptions::default()).await;
    let url = &shop.url;
    let admin = login(url, ADMIN, "ana").await;
    let token = csrf(url, &admin).await;
    let bulk = format!("{url}/bulk");
    let reason = "x".repeat(5000);
    let form = [
        ("status", "parked"),
        ("action", "resume"),
        ("reason", reason.as_str()),
        ("csrf", token.as_str()),
    ];
    let (status, _, dry) = post(&bulk, &admin, &form, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{dry}");
    assert!(!dry.contains("Would apply"), "{dry}");
    assert_eq!(
        shop.engine.status(shop.parked).unwrap().status,
        SagaStatus::Parked
    );
}

/// A saga's page says "Recorded: <anything> by <you>" for whatever `?done=` the URL
/// carries, though nothing was recorded: a crafted link (followed through the login
/// page, which keeps the query in `next`) makes an operator believe a repair was made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_page_does_not_claim_a_repair_nobody_made() {
    let shop = shop(DashboardOptions::default()).await;
    let url = &shop.url;
    let admin = login(url, ADMIN, "ana").await;
    let (status, _, page) = get(
        &format!(
            "{url}/sagas/{}?done=mark_resolved+(refund+sent+to+the+customer)",
            shop.parked
        ),
        &admin,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        shop.engine.status(shop.parked).unwrap().status,
        SagaStatus::Parked
    );
    assert!(
        !page.contains("Recorded: mark_resolved"),
        "the page claims a repair that was never made"
    );
}

/// A filter whose status and park kind contradict each other (completed, and parked for
/// a failed compensation) silently drops the status: the list, and a bulk repair driven
/// by the same filter, act on parked sagas while the form says "completed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contradictory_filter_matches_nothing_rather_than_another_status() {
    let shop = shop(DashboardOptions::default()).await;
    let url = &shop.url;
    let admin = login(url, ADMIN, "ana").await;
    let (status, _, page) = get(
        &format!("{url}/sagas?status=completed&park_kind=compensation_failed"),
        &admin,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("<option value=\"completed\" selected>"),
        "the form says completed"
    );
    assert!(
        !page.contains(&shop.parked.to_string()),
        "a parked saga is listed under status=completed"
    );
}

/// `POST /v1/bulk` is a dry run unless it carries a dry run's confirmation, from JSON and
/// from the request type's `Default` alike: a Rust client that fills the rest with
/// `..Default::default()` gets a dry run.
#[test]
fn a_default_bulk_request_is_a_dry_run() {
    let req = sagaflow_admin::BulkRequest {
        action: "compensate".into(),
        operator: "ana".into(),
        reason: "x".into(),
        ..Default::default()
    };
    let from_json: sagaflow_admin::BulkRequest =
        serde_json::from_value(json!({"action": "compensate", "operator": "ana", "reason": "x"}))
            .unwrap();
    assert!(
        from_json.confirm.is_none(),
        "JSON without confirm: a dry run"
    );
    assert!(req.confirm.is_none(), "Default: a dry run");
}
