//! The dashboard in a real browser: headless Chromium, driven over WebDriver by
//! chromedriver, logs in, filters the list to the parked sagas, opens one, resumes it
//! with a reason and sees it compensate; then resumes the other one with a bulk repair
//! (dry run, then confirm) and logs out. It takes a screenshot of every page.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`eval "$(bash scripts/chromium.sh)"`
//! installs them and sets `SAGAFLOW_CHROMIUM` and `SAGAFLOW_CHROMEDRIVER`; without those
//! variables the test looks for `chromium` and `chromedriver` on the `PATH`). Without
//! them it is skipped with a message, unless `CI` is set: then it fails.
//!
//! Screenshots (1280x800) go to `target/tmp/dashboard-screenshots`, or to the directory
//! in `SAGAFLOW_SCREENSHOTS` (relative to the workspace root): the ones in the docs are
//! made with `SAGAFLOW_SCREENSHOTS=docs/dashboard cargo test -p sagaflow-admin --test
//! browser`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use sagaflow::{SagaOutcome, SagaStatus};
use sagaflow_admin::dashboard::DashboardOptions;
use serde_json::json;
use support::*;

/// The longest the test waits for a page or a saga.
const PATIENCE: Duration = Duration::from_secs(30);

/// chromedriver, killed when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn tool(var: &str, name: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)).filter(|p| p.is_file()),
        _ => on_path(name),
    }
}

fn screenshots() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    match std::env::var_os("SAGAFLOW_SCREENSHOTS") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots"),
    }
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let dir = screenshots();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Waits until the page's source contains `text` (reloading it with `reload`).
async fn until_page_has(c: &Client, text: &str, reload: bool) -> String {
    let start = Instant::now();
    loop {
        let source = c.source().await.unwrap();
        if source.contains(text) {
            return source;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the page never showed {text:?}: {source}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        if reload {
            c.refresh().await.unwrap();
        }
    }
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn type_in(c: &Client, css: &str, text: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .send_keys(text)
        .await
        .unwrap();
}

/// Starts chromedriver on a free port and waits until it answers.
async fn chromedriver(path: &Path, log: &Path) -> (Driver, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(path)
        .arg(format!("--port={port}"))
        .arg(format!("--log-path={}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let driver = Driver(child);
    let status = format!("http://127.0.0.1:{port}/status");
    let start = Instant::now();
    while reqwest::get(&status)
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(start.elapsed() < PATIENCE, "chromedriver never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (driver, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_filters_opens_a_parked_saga_and_resumes_it() {
    let (Some(chromium), Some(driver)) = (
        tool("SAGAFLOW_CHROMIUM", "chromium"),
        tool("SAGAFLOW_CHROMEDRIVER", "chromedriver"),
    ) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but chromium or chromedriver is missing: \
             run `eval \"$(bash scripts/chromium.sh)\"` first"
        );
        eprintln!(
            "skipped: no chromium or chromedriver (install them with \
             `eval \"$(bash scripts/chromium.sh)\"`)"
        );
        return;
    };
    let shop = shop(DashboardOptions::default()).await;
    let profile = tempfile::tempdir().unwrap();
    let log = profile.path().join("chromedriver.log");
    let (_driver, port) = chromedriver(&driver, &log).await;
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                "--window-size=1280,800",
                format!("--user-data-dir={}", profile.path().join("profile").display()),
            ],
        },
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap_or_else(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("no WebDriver session: {e}\n{log}")
        });
    // On a task of its own, so that the browser is closed even if an assertion fails.
    let flow = tokio::spawn(walk(c.clone(), shop));
    let outcome = flow.await;
    let _ = c.close().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn walk(c: Client, shop: Shop) {
    let url = &shop.url;
    // Without a session every page is the login form.
    c.goto(&format!("{url}/")).await.unwrap();
    c.find(Locator::Css("form[action='/login']")).await.unwrap();
    shot(&c, "login").await;
    type_in(&c, "input[name=token]", ADMIN).await;
    type_in(&c, "input[name=operator]", "ana").await;
    click(&c, "form[action='/login'] button[type=submit]").await;
    let overview = until_page_has(&c, "<h1>Overview</h1>", false).await;
    assert!(overview.contains("parked: need an operator"));
    assert!(overview.contains("<svg class=\"chart\""));
    shot(&c, "overview").await;

    // The list, filtered to the parked sagas.
    c.find(Locator::LinkText("Sagas"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_page_has(&c, "<h1>Sagas</h1>", false).await;
    c.find(Locator::Css("select[name=status]"))
        .await
        .unwrap()
        .select_by_value("parked")
        .await
        .unwrap();
    click(&c, "#filter button[type=submit]").await;
    let list = until_page_has(&c, "status=parked", false).await;
    for id in [shop.parked, shop.also_parked] {
        assert!(list.contains(&id.to_string()), "{id} is listed");
    }
    assert!(!list.contains(&shop.completed.to_string()));
    assert!(!list.contains(&shop.resolved.to_string()));
    assert!(c
        .current_url()
        .await
        .unwrap()
        .as_str()
        .contains("status=parked"));
    shot(&c, "list").await;

    // One parked saga, and its repair.
    let id = shop.parked;
    click(&c, &format!("a[href='/sagas/{id}']")).await;
    let page = until_page_has(&c, "Timeline</h2>", false).await;
    assert!(page.contains("badge parked"));
    assert!(page.contains("[redacted]") && !page.contains(CARD));
    shot(&c, "saga").await;
    type_in(
        &c,
        "form[data-repair=resume] input[name=reason]",
        "inventory service is back",
    )
    .await;
    click(&c, "form[data-repair=resume] button[type=submit]").await;
    until_page_has(&c, "Recorded: resume by ana", false).await;
    // The saga resumes: it compensates what is left, and the page shows it.
    let after = until_page_has(&c, "<span class=\"badge compensated\">", true).await;
    assert!(after.contains("operator: resume"));
    assert!(after.contains("<strong>ana</strong>: inventory service is back"));
    assert_eq!(
        shop.engine.status(id).unwrap().status,
        SagaStatus::Compensated
    );
    // The timeline, where the repair is recorded with who and why.
    c.goto(&format!("{url}/sagas/{id}#timeline")).await.unwrap();
    until_page_has(&c, "operator: resume", false).await;
    shot(&c, "repaired").await;

    // Bulk: the other parked saga, dry run first.
    c.find(Locator::LinkText("Bulk"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_page_has(&c, "<h1>Bulk repair</h1>", false).await;
    c.find(Locator::Css("#bulk select[name=status]"))
        .await
        .unwrap()
        .select_by_value("parked")
        .await
        .unwrap();
    c.find(Locator::Css("#bulk select[name=action]"))
        .await
        .unwrap()
        .select_by_value("resume")
        .await
        .unwrap();
    type_in(&c, "#bulk input[name=reason]", "inventory service is back").await;
    shot(&c, "bulk-form").await;
    click(&c, "#bulk button[type=submit]").await;
    let dry = until_page_has(&c, "Bulk repair: dry run", false).await;
    assert!(dry.contains("<dd class=\"matched\">1</dd>"), "{dry}");
    assert_eq!(
        shop.engine.status(shop.also_parked).unwrap().status,
        SagaStatus::Parked,
        "a dry run writes nothing"
    );
    shot(&c, "bulk").await;
    click(&c, "#confirm button[type=submit]").await;
    let applied = until_page_has(&c, "Bulk repair: applied", false).await;
    assert!(
        applied.contains("<dd class=\"applied\">1</dd>"),
        "{applied}"
    );
    assert!(matches!(
        shop.engine.wait(shop.also_parked).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    shot(&c, "bulk-applied").await;

    // Logged out, the pages are the login form again.
    click(&c, "header form[action='/logout'] button").await;
    until_page_has(&c, "action=\"/login\"", false).await;
    c.goto(&format!("{url}/sagas/{id}")).await.unwrap();
    let gone = c.source().await.unwrap();
    assert!(gone.contains("action=\"/login\"") && !gone.contains("Timeline"));
}
