//! The `sagaflow` binary on real data directories, and against a running engine's API.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use sagaflow::{Phase, SagaId, SagaMeta, SagaOutcome};
use sagaflow_admin::{router, Auth, Token};
use sagaflow_tests::*;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-token-0123456789";

fn sagaflow(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sagaflow"));
    c.args(args)
        .env_remove("SAGAFLOW_URL")
        .env_remove("SAGAFLOW_DATA_DIR");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run sagaflow")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A refused repair says so once, on one line: the saga, why, and that nothing was
/// written.
fn assert_refusal(o: &Output, id: SagaId, why: &str) {
    let out = text(o);
    let line = out.strip_suffix('\n').unwrap_or(&out);
    let why_given = line
        .strip_prefix(&format!("repair of saga {id} refused: "))
        .and_then(|l| l.strip_suffix("; nothing was written"));
    assert!(
        why_given.is_some_and(|w| w.contains(why)) && !line.contains('\n'),
        "{out}"
    );
    assert_eq!(out.matches("refused").count(), 1, "{out}");
}

/// A data directory with one parked saga (a compensation that failed) and one that
/// completed; the engine is stopped when this returns.
async fn directory(dir: &Path) -> (SagaId, SagaId, Arc<Ledger>) {
    let ledger = Ledger::new();
    ledger.script_tagged("bad", "order", Phase::Action, [Outcome::Rejected]);
    ledger.script_tagged("bad", "inventory", Phase::Compensation, [Outcome::Rejected]);
    let engine = builder()
        .register(checkout(&ledger))
        .open(dir)
        .await
        .unwrap();
    let parked = engine
        .start("checkout", json!({"tag": "bad"}), None)
        .await
        .unwrap();
    let done = engine
        .start("checkout", json!({"tag": "good"}), None)
        .await
        .unwrap();
    assert!(matches!(
        engine.wait(parked).await.unwrap(),
        SagaOutcome::Parked { .. }
    ));
    engine.wait(done).await.unwrap();
    engine.shutdown().await.unwrap();
    (parked, done, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_works_on_a_stopped_engines_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (parked, done, ledger) = directory(tmp.path()).await;
    let d = tmp.path().to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["--data-dir", d.as_str()];
        all.extend_from_slice(args);
        sagaflow(&all, &[])
    };

    let o = run(&["list", "--status", "parked", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let metas: Vec<SagaMeta> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(metas.iter().map(|m| m.id).collect::<Vec<_>>(), [parked]);

    let o = run(&["list"]);
    let out = text(&o);
    assert!(
        out.contains("parked") && out.contains("completed") && out.contains("2 saga(s)"),
        "{out}"
    );

    let o = run(&["show", &parked.to_string()]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("compensation_failed"), "{out}");
    assert!(
        out.contains(&format!("key {parked}/inventory/compensation")),
        "{out}"
    );
    assert!(out.contains("status      parked"), "{out}");
    // Step numbers, as `skip --step` takes them, next to the names.
    assert!(
        out.contains("steps       0 payment, 1 inventory, 2 order"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("compensation_failed") && l.contains(" 1 inventory ")),
        "{out}"
    );

    let o = run(&["stats", "--json"]);
    let stats: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["total"], 2);
    assert_eq!(stats["by_status"]["parked"], 1);

    // Refused repairs exit with 3 and write nothing.
    let before = run(&["show", &parked.to_string(), "--json"]);
    let o = run(&[
        "compensate",
        &parked.to_string(),
        "--reason",
        "already compensating",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_refusal(&o, parked, "compensation can only be forced going forward");
    let o = run(&["retry", &done.to_string(), "--reason", "it is done"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_refusal(&o, done, "the saga has ended (completed)");
    let after = run(&["show", &parked.to_string(), "--json"]);
    assert_eq!(before.stdout, after.stdout);

    let o = run(&[
        "resume",
        &parked.to_string(),
        "--reason",
        "inventory back",
        "--operator",
        "ana",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("status now compensating"), "{}", text(&o));
    let o = run(&["show", &parked.to_string()]);
    assert!(
        text(&o).contains("resume by ana: inventory back"),
        "{}",
        text(&o)
    );

    // The engine finishes what the operator resumed.
    let engine = builder()
        .register(checkout(&ledger))
        .open(tmp.path())
        .await
        .unwrap();
    assert!(matches!(
        engine.wait(parked).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    engine.shutdown().await.unwrap();
    drop(engine); // lets go of the directory

    let o = run(&["resolve", &done.to_string(), "--reason", "x"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "a completed saga cannot be resolved: {}",
        text(&o)
    );
    let o = run(&["show", "not-an-id"]);
    assert_eq!(o.status.code(), Some(2), "usage error: {}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_talks_to_a_running_engine_and_honours_token_roles() {
    let tmp = tempfile::tempdir().unwrap();
    let (parked, _done, ledger) = directory(tmp.path()).await;
    let engine = builder()
        .register(checkout(&ledger))
        .open(tmp.path())
        .await
        .unwrap();
    let auth = Auth::new(Token::new(ADMIN).unwrap()).with_read_token(Token::new(READ).unwrap());
    let engine = Arc::new(engine);
    let app = router(engine.clone(), auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let d = tmp.path().to_str().unwrap().to_string();
    let id = parked.to_string();

    let out = tokio::task::spawn_blocking(move || {
        // The directory is locked while the engine runs: the CLI says to use --url.
        let locked = sagaflow(&["--data-dir", &d, "list"], &[]);
        assert_eq!(locked.status.code(), Some(1));
        assert!(text(&locked).contains("--url"), "{}", text(&locked));

        let list = sagaflow(
            &["--url", &url, "list", "--status", "parked"],
            &[("SAGAFLOW_TOKEN", READ)],
        );
        assert!(list.status.success(), "{}", text(&list));
        assert!(text(&list).contains(&id));

        let no_token = sagaflow(&["--url", &url, "list"], &[]);
        assert_eq!(no_token.status.code(), Some(1));
        let wrong = sagaflow(
            &["--url", &url, "list"],
            &[("SAGAFLOW_TOKEN", "wrong-token-0123456789")],
        );
        assert!(text(&wrong).contains("401"), "{}", text(&wrong));

        let read_only = sagaflow(
            &["--url", &url, "resume", &id, "--reason", "fixed"],
            &[("SAGAFLOW_TOKEN", READ)],
        );
        assert_eq!(read_only.status.code(), Some(1));
        assert!(text(&read_only).contains("403"), "{}", text(&read_only));

        let refused = sagaflow(
            &["--url", &url, "retry", &id, "--reason", "now"],
            &[("SAGAFLOW_TOKEN", ADMIN)],
        );
        assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
        assert_refusal(&refused, parked, "the saga is parked: resume it instead");

        // A step name is looked up in the saga's history through the API.
        let skip = |step: &str| {
            sagaflow(
                &["--url", &url, "skip", &id, "--step", step, "--reason", "x"],
                &[("SAGAFLOW_TOKEN", ADMIN)],
            )
        };
        let wrong = skip("payment");
        assert_eq!(wrong.status.code(), Some(3), "{}", text(&wrong));
        assert_refusal(
            &wrong,
            parked,
            "step 0 (`payment`) is not a step compensation is at",
        );
        let unknown = skip("shipping");
        assert_eq!(unknown.status.code(), Some(1), "{}", text(&unknown));
        assert!(
            text(&unknown)
                .contains("has no step `shipping`; its steps: 0 payment, 1 inventory, 2 order"),
            "{}",
            text(&unknown)
        );

        sagaflow(
            &[
                "--url",
                &url,
                "resume",
                &id,
                "--reason",
                "fixed",
                "--operator",
                "bo",
            ],
            &[("SAGAFLOW_TOKEN", ADMIN)],
        )
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(matches!(
        engine.wait(parked).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_saga_is_shown_up_to_the_damage_and_resolved_and_reads_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (parked, _done, _ledger) = directory(tmp.path()).await;
    // Damage the parked saga's second stored value, as a bad disk would.
    let dir = tmp.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        use sagaflow::store::{codec, SagaLog, SledLog};
        let log = SledLog::open_waiting(&dir, std::time::Duration::from_secs(10)).unwrap();
        let (lsn, _) = log.read(parked).unwrap()[1].clone();
        log.put_raw(&codec::log_key(parked, lsn), b"\x01{\"lsn\":")
            .unwrap();
    })
    .await
    .unwrap();
    let d = tmp.path().to_str().unwrap().to_string();
    let db_before = std::fs::read(tmp.path().join("db")).unwrap();

    let o = sagaflow(&["--data-dir", &d, "show", &parked.to_string()], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("started"), "{out}");
    assert!(out.contains("unreadable: corrupt log record 2"), "{out}");
    let o = sagaflow(&["--data-dir", &d, "list"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(tmp.path().join("db")).unwrap(),
        db_before,
        "show and list changed the directory"
    );

    let o = sagaflow(
        &[
            "--data-dir",
            &d,
            "resolve",
            &parked.to_string(),
            "--reason",
            "refunded by hand",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("status now resolved"), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_takes_a_step_name_or_its_number() {
    let tmp = tempfile::tempdir().unwrap();
    let (parked, _done, ledger) = directory(tmp.path()).await;
    let d = tmp.path().to_str().unwrap().to_string();
    let id = parked.to_string();
    let skip = |step: &str| {
        sagaflow(
            &[
                "--data-dir",
                &d,
                "skip",
                &id,
                "--step",
                step,
                "--reason",
                "released by hand",
                "--operator",
                "ana",
            ],
            &[],
        )
    };

    let o = skip("warehouse");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "saga {parked} has no step `warehouse`; its steps: 0 payment, 1 inventory, 2 order"
        )),
        "{}",
        text(&o)
    );
    // Compensation is at inventory (1): payment by name and 2 by number are refused.
    let o = skip("payment");
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_refusal(
        &o,
        parked,
        "step 0 (`payment`) is not a step compensation is at",
    );
    let o = skip("2");
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_refusal(
        &o,
        parked,
        "step 2 (`order`) is not a step compensation is at",
    );

    let o = skip("inventory");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("skip_step of step 1 recorded (by ana)"),
        "{}",
        text(&o)
    );
    let o = sagaflow(&["--data-dir", &d, "show", &id], &[]);
    assert!(
        text(&o).lines().any(|l| l.contains("operator_action")
            && l.contains(" 1 inventory ")
            && l.contains("skip_step by ana: released by hand")),
        "{}",
        text(&o)
    );

    // The engine goes on with the compensation before it: payment.
    let engine = builder()
        .register(checkout(&ledger))
        .open(tmp.path())
        .await
        .unwrap();
    assert!(matches!(
        engine.wait(parked).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_waiting_for_an_attempt_to_settle_says_so_in_list_and_show() {
    let tmp = tempfile::tempdir().unwrap();
    let ledger = Ledger::new();
    // The charge's outcome is unknown and it must not run twice: nothing is undone
    // before its attempt's deadline (5 s here).
    ledger.script("payment", Phase::Action, [Outcome::Unknown]);
    let engine = builder()
        .register(checkout_with(
            &ledger,
            [sagaflow::Idempotence::NotIdempotent; 3],
        ))
        .open(tmp.path())
        .await
        .unwrap();
    let id = engine
        .start("checkout", serde_json::json!({}), None)
        .await
        .unwrap();
    // Wait for the condition (the failure recorded with its settle window), not a time.
    let mut settling = None;
    for _ in 0..500 {
        settling = engine.status(id).unwrap().settling_until;
        if settling.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let until = settling.expect("the saga settles");
    // Stopped while settling: the wait is durable, and the CLI sees it.
    engine.shutdown().await.unwrap();
    drop(engine);
    let d = tmp.path().to_str().unwrap().to_string();
    let o = sagaflow(&["--data-dir", &d, "list"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("settling until {until}")),
        "{}",
        text(&o)
    );
    let o = sagaflow(&["--data-dir", &d, "show", &id.to_string()], &[]);
    assert!(
        text(&o).contains(&format!("settling until {until}")),
        "{}",
        text(&o)
    );
    assert!(ledger
        .calls_of(id, "payment", Phase::Compensation)
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_purge_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let ledger = Ledger::new();
    // One saga waits an hour for a retry of its inventory step: cancellable.
    ledger.script_tagged(
        "wait",
        "inventory",
        Phase::Action,
        [Outcome::RetryAfter(std::time::Duration::from_secs(3600))],
    );
    let engine = builder()
        .register(checkout(&ledger))
        .open(tmp.path())
        .await
        .unwrap();
    let waiting = engine
        .start("checkout", serde_json::json!({"tag": "wait"}), None)
        .await
        .unwrap();
    let done = engine
        .start("checkout", serde_json::json!({"tag": "done"}), None)
        .await
        .unwrap();
    engine.wait(done).await.unwrap();
    ledger
        .wait_for_call(waiting, "inventory", Phase::Action)
        .await;
    engine.shutdown().await.unwrap();
    drop(engine);
    let d = tmp.path().to_str().unwrap().to_string();

    // Recorded offline; the engine carries it out when it next opens the store.
    let o = sagaflow(
        &[
            "--data-dir",
            &d,
            "cancel",
            &waiting.to_string(),
            "--reason",
            "customer asked",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("cancellation recorded"), "{}", text(&o));
    let o = sagaflow(
        &[
            "--data-dir",
            &d,
            "cancel",
            &done.to_string(),
            "--reason",
            "too late",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("has ended"), "{}", text(&o));

    let engine = builder()
        .register(checkout(&ledger))
        .open(tmp.path())
        .await
        .unwrap();
    assert!(matches!(
        engine.wait(waiting).await.unwrap(),
        SagaOutcome::Cancelled { .. }
    ));
    engine.shutdown().await.unwrap();
    drop(engine);

    let o = sagaflow(&["--data-dir", &d, "list", "--status", "cancelled"], &[]);
    assert!(text(&o).contains(&waiting.to_string()), "{}", text(&o));
    // Purge: a dry run counts, --yes deletes.
    let o = sagaflow(&["--data-dir", &d, "purge", "--finished-before", "0s"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("2 finished saga(s)"), "{}", text(&o));
    assert!(text(&o).contains("dry run"), "{}", text(&o));
    let o = sagaflow(
        &[
            "--data-dir",
            &d,
            "purge",
            "--finished-before",
            "2100-01-01T00:00:00Z",
            "--yes",
        ],
        &[],
    );
    assert!(text(&o).contains("deleted 2"), "{}", text(&o));
    let o = sagaflow(&["--data-dir", &d, "list", "--json"], &[]);
    let left: Vec<SagaMeta> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(left.is_empty(), "{left:?}");
    let o = sagaflow(
        &["--data-dir", &d, "purge", "--finished-before", "yesterday"],
        &[],
    );
    assert!(!o.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_a_sound_store_and_the_damage_of_a_damaged_one_without_changing_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (parked, done, _ledger) = directory(tmp.path()).await;
    let d = tmp.path().to_str().unwrap().to_string();
    let o = sagaflow(&["--data-dir", &d, "verify"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("2 saga(s): 0 index finding(s), 0 log(s) that do not fold"),
        "{}",
        text(&o)
    );
    let dir = tmp.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        use sagaflow::store::{codec, SagaLog, SledLog};
        let log = SledLog::open_waiting(&dir, std::time::Duration::from_secs(10)).unwrap();
        log.delete_raw(&codec::status_key(sagaflow::SagaStatus::Completed, done))
            .unwrap();
        let (lsn, _) = log.read(parked).unwrap()[1].clone();
        log.put_raw(&codec::log_key(parked, lsn), b"\x01{").unwrap();
    })
    .await
    .unwrap();
    let before = std::fs::read(tmp.path().join("db")).unwrap();
    let o = sagaflow(&["--data-dir", &d, "verify"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains(&format!("index    {done}: missing from the status index")),
        "{out}"
    );
    assert!(out.contains(&format!("log      {parked}:")), "{out}");
    assert_eq!(std::fs::read(tmp.path().join("db")).unwrap(), before);
}

/// payment → settle (await `settlement/<order>` for an hour) → order.
fn settled(ledger: &Arc<Ledger>) -> sagaflow::SagaDefinition {
    sagaflow::SagaDefinition::builder("settled", 1)
        .step("payment", fake("payment", ledger))
        .options(opts())
        .await_event(
            "settle",
            sagaflow::Await::new(std::time::Duration::from_secs(3600), |ctx| {
                ctx.saga_input()["order"]
                    .as_str()
                    .map(|o| format!("settlement/{o}"))
                    .ok_or_else(|| "no order".to_string())
            }),
        )
        .step("order", fake("order", ledger))
        .options(opts())
        .build()
        .unwrap()
}

/// Waits until saga `id` waits for its event.
async fn until_awaiting(engine: &sagaflow::Engine, id: SagaId) {
    for _ in 0..1000 {
        if engine.status(id).unwrap().awaiting.is_some() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("saga {id} never began waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_and_approve_through_a_running_engine_and_list_its_inbox() {
    let tmp = tempfile::tempdir().unwrap();
    let ledger = Ledger::new();
    let engine = builder()
        .register(settled(&ledger))
        .open(tmp.path())
        .await
        .unwrap();
    let paid = engine
        .start("settled", json!({"order": "o1"}), None)
        .await
        .unwrap();
    let reviewed = engine
        .start("settled", json!({"order": "o2"}), None)
        .await
        .unwrap();
    until_awaiting(&engine, reviewed).await;
    let auth = Auth::new(Token::new(ADMIN).unwrap()).with_read_token(Token::new(READ).unwrap());
    let engine = Arc::new(engine);
    let app = router(engine.clone(), auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let d = tmp.path().to_str().unwrap().to_string();
    let id = reviewed.to_string();
    let url2 = url.clone();

    tokio::task::spawn_blocking(move || {
        let admin = [("SAGAFLOW_TOKEN", ADMIN)];
        let deliver = |payload: &str, env: &[(&str, &str)]| {
            sagaflow(
                &[
                    "--url",
                    &url,
                    "deliver",
                    "settlement/o1",
                    "--id",
                    "wh-1",
                    "--payload",
                    payload,
                ],
                env,
            )
        };
        // The read token cannot deliver; nothing is written.
        let o = deliver(r#"{"settled": 500}"#, &[("SAGAFLOW_TOKEN", READ)]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("403"), "{}", text(&o));
        // A payload that is not JSON is a usage error.
        let o = deliver("{oops", &admin);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        let o = deliver(r#"{"settled": 500}"#, &admin);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            text(&o),
            "delivery wh-1 to settlement/o1: accepted (durable)\n"
        );
        let o = deliver(r#"{"settled": 1}"#, &admin);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            text(&o),
            "delivery wh-1 to settlement/o1: a duplicate, accepted before; nothing was written\n"
        );
        let o = sagaflow(
            &[
                "--url",
                &url,
                "--json",
                "deliver",
                "k",
                "--id",
                "i",
                "--payload",
                "\"x\"",
            ],
            &admin,
        );
        assert!(o.status.success(), "{}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v, json!({"delivered": "new"}));
        // A refused delivery exits 3 and says nothing was written.
        let o = sagaflow(
            &["--url", &url, "deliver", "", "--id", "i", "--payload", "1"],
            &admin,
        );
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        assert!(
            text(&o).starts_with("delivery refused: a correlation key has 1 to 256 bytes")
                && text(&o).ends_with("; nothing was written\n"),
            "{}",
            text(&o)
        );
        // With the engine running, --data-dir is refused before the directory is touched.
        let o = sagaflow(
            &[
                "--data-dir",
                &d,
                "deliver",
                "k",
                "--id",
                "i",
                "--payload",
                "1",
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("give --url"), "{}", text(&o));

        // The saga to approve says what it waits for.
        let o = sagaflow(&["--url", &url, "list"], &[("SAGAFLOW_TOKEN", READ)]);
        assert!(
            text(&o)
                .lines()
                .any(|l| l.starts_with(&id) && l.contains("event `settlement/o2` until ")),
            "{}",
            text(&o)
        );

        // Approvals: by step name; a step that does not wait for an event is refused.
        let approve = |step: &str, env: &[(&str, &str)]| {
            sagaflow(
                &[
                    "--url",
                    &url,
                    "approve",
                    &id,
                    "--step",
                    step,
                    "--reason",
                    "checked the statement",
                    "--operator",
                    "ana",
                ],
                env,
            )
        };
        let o = approve("settle", &[("SAGAFLOW_TOKEN", READ)]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("403"), "{}", text(&o));
        let o = approve("payment", &admin);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        assert!(
            text(&o).contains("does not wait for an event")
                && text(&o).contains("nothing was written"),
            "{}",
            text(&o)
        );
        let o = approve("settle", &admin);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            text(&o),
            format!("saga {id}: approval of step settle delivered (by ana, durable)\n")
        );
        let o = approve("settle", &admin);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            text(&o).contains("was approved before; nothing was written"),
            "{}",
            text(&o)
        );
        let o = sagaflow(
            &[
                "--data-dir",
                &d,
                "approve",
                &id,
                "--step",
                "settle",
                "--reason",
                "x",
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("give --url"), "{}", text(&o));

        // The inbox through the API, with the read token.
        let o = sagaflow(&["--url", &url, "inbox"], &[("SAGAFLOW_TOKEN", READ)]);
        assert!(o.status.success(), "{}", text(&o));
        let out = text(&o);
        assert!(out.starts_with("KEY "), "{out}");
        assert!(
            out.lines().any(|l| l.starts_with("settlement/o1  wh-1 ")
                && l.ends_with(r#"{"settled":500}"#)),
            "{out}"
        );
        assert!(out.contains(&format!("approval/{id}/settle")), "{out}");
        assert!(out.contains("3 delivery(ies)"), "{out}");
    })
    .await
    .unwrap();

    assert!(matches!(
        engine.wait(paid).await.unwrap(),
        SagaOutcome::Completed { .. }
    ));
    let SagaOutcome::Completed { outputs } = engine.wait(reviewed).await.unwrap() else {
        panic!("not completed")
    };
    assert_eq!(
        outputs["settle"],
        json!({"approved_by": "ana", "reason": "checked the statement"})
    );
    // Taken now, each by its saga.
    let o = tokio::task::spawn_blocking(move || {
        sagaflow(
            &["--url", &url2, "--json", "inbox"],
            &[("SAGAFLOW_TOKEN", READ)],
        )
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let listed: Vec<sagaflow::store::Delivery> = serde_json::from_slice(&o.stdout).unwrap();
    let taken: Vec<_> = listed
        .iter()
        .map(|d| (d.key.as_str(), d.taken_by))
        .collect();
    assert_eq!(
        taken,
        [
            ("k", None),
            ("settlement/o1", Some(paid)),
            ("settlement/o2", Some(reviewed))
        ]
    );
}

/// Runs the CLI on a directory whose engine just shut down, again while sled still lets
/// go of its lock (from its own thread, a moment later under load).
fn on_directory(args: &[&str]) -> Output {
    for _ in 0..200 {
        let o = sagaflow(args, &[]);
        if !text(&o).contains("the engine is running") {
            return o;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the directory stayed locked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_of_a_stopped_engine_is_listed_without_changing_it_and_deliveries_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ledger = Ledger::new();
    let engine = builder()
        .register(settled(&ledger))
        .open(tmp.path())
        .await
        .unwrap();
    for (key, id) in [
        ("settlement/o1", "wh-1"),
        ("settlement/zz", "wh-9"),
        ("a", "1"),
    ] {
        engine.deliver(key, id, json!({"n": id})).await.unwrap();
    }
    let taker = engine
        .start("settled", json!({"order": "o1"}), None)
        .await
        .unwrap();
    engine.wait(taker).await.unwrap();
    engine.shutdown().await.unwrap();
    drop(engine);
    let d = tmp.path().to_str().unwrap().to_string();

    let out = tokio::task::spawn_blocking(move || {
        let o = on_directory(&["--data-dir", &d, "inbox"]);
        assert!(o.status.success(), "{}", text(&o));
        let before = std::fs::read(Path::new(&d).join("db")).unwrap();
        let lines: Vec<String> = text(&o).lines().map(str::to_string).collect();
        let o = on_directory(&["--data-dir", &d, "inbox", "--limit", "2"]);
        let page: Vec<String> = text(&o).lines().map(str::to_string).collect();
        let o = on_directory(&[
            "--data-dir",
            &d,
            "inbox",
            "--after-key",
            "settlement/o1",
            "--after-id",
            "wh-1",
            "--json",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let rest: Vec<sagaflow::store::Delivery> = serde_json::from_slice(&o.stdout).unwrap();
        let half = on_directory(&["--data-dir", &d, "inbox", "--after-key", "a"]);
        let zero = on_directory(&["--data-dir", &d, "inbox", "--limit", "0"]);
        let deliver = on_directory(&[
            "--data-dir",
            &d,
            "deliver",
            "a",
            "--id",
            "2",
            "--payload",
            "1",
        ]);
        let show = on_directory(&["--data-dir", &d, "show", &taker.to_string()]);
        assert!(
            text(&show).lines().any(|l| l.contains("awaiting")
                && l.contains(" 1 settle ")
                && l.ends_with("key settlement/o1")),
            "{}",
            text(&show)
        );
        assert!(
            text(&show)
                .lines()
                .any(|l| l.contains("event_received") && l.ends_with("delivery wh-1")),
            "{}",
            text(&show)
        );
        let after = std::fs::read(Path::new(&d).join("db")).unwrap();
        assert_eq!(before, after, "the inbox changed the directory");
        (lines, page, rest, half, zero, deliver)
    })
    .await
    .unwrap();
    let (lines, page, rest, half, zero, deliver) = out;
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert!(lines[0].starts_with("KEY"), "{lines:?}");
    assert!(lines[1].starts_with("a              1     "), "{lines:?}");
    assert!(
        lines[2].starts_with("settlement/o1  wh-1  ")
            && lines[2].contains(&format!("  {taker}  "))
            && lines[2].ends_with(r#"{"n":"wh-1"}"#),
        "{lines:?}"
    );
    assert!(lines[3].contains("  -  "), "{lines:?}");
    assert_eq!(lines[4], "3 delivery(ies)");
    assert_eq!(page.len(), 5, "{page:?}");
    assert_eq!(page[3], "2 delivery(ies)");
    assert_eq!(
        page[4],
        "next page: --after-key settlement/o1 --after-id wh-1"
    );
    assert_eq!(rest.len(), 1);
    assert_eq!(
        (rest[0].key.as_str(), rest[0].taken_by),
        ("settlement/zz", None)
    );
    assert_eq!(half.status.code(), Some(2), "{}", text(&half));
    assert_eq!(zero.status.code(), Some(1), "{}", text(&zero));
    assert!(
        text(&zero).contains("limit must be 1 to 1000"),
        "{}",
        text(&zero)
    );
    assert_eq!(deliver.status.code(), Some(1), "{}", text(&deliver));
    assert!(
        text(&deliver).contains("needs the running engine: give --url"),
        "{}",
        text(&deliver)
    );
}

/// A system whose books disagree (with `kind`) on every saga started with
/// `{"drift": true}`, and agree on the others. Another system's text can hold anything:
/// the order system's detail runs long and has a newline.
struct Books(sagaflow::machine::DriftKind);

#[sagaflow::async_trait]
impl sagaflow::Reconcile for Books {
    async fn reconcile(&self, step: &sagaflow::Finished) -> sagaflow::Verdict {
        use sagaflow::machine::DriftKind;
        if step.input["drift"] != true {
            return sagaflow::Verdict::Matches;
        }
        let detail = match self.0 {
            DriftKind::Missing => "no charge for this key".to_string(),
            _ => format!("amount 400, the log says 500\nraw {}", "x".repeat(100)),
        };
        sagaflow::Verdict::drift(self.0, detail)
    }
}

/// payment (its books miss the charge) → order (its books hold another amount).
fn checked(ledger: &Arc<Ledger>) -> sagaflow::SagaDefinition {
    use sagaflow::machine::DriftKind;
    sagaflow::SagaDefinition::builder("checked", 1)
        .step("payment", fake("payment", ledger))
        .options(opts())
        .reconcile("payments", Books(DriftKind::Missing))
        .step("order", fake("order", ledger))
        .options(opts())
        .reconcile("orders", Books(DriftKind::Different))
        .build()
        .unwrap()
}

/// A data directory with two completed sagas whose books disagree (two drifts each,
/// recorded by the reconciler) and one whose books agree; the engine is stopped when
/// this returns. The drifted sagas come in id order.
async fn drifted_directory(dir: &Path) -> (Vec<SagaId>, SagaId, Arc<Ledger>) {
    let ledger = Ledger::new();
    let reconcile = sagaflow::ReconcileOptions::default()
        .window(
            std::time::Duration::ZERO,
            std::time::Duration::from_secs(3600),
        )
        .every(std::time::Duration::from_secs(3600));
    let engine = builder()
        .register(checked(&ledger))
        .options(sagaflow::EngineOptions::default().with_reconciler(reconcile))
        .open(dir)
        .await
        .unwrap();
    let mut drifted = Vec::new();
    for drift in [true, true, false] {
        let id = engine
            .start("checked", json!({ "drift": drift }), None)
            .await
            .unwrap();
        engine.wait(id).await.unwrap();
        drifted.push(id);
    }
    let clean = drifted.pop().unwrap();
    drifted.sort();
    assert_eq!(engine.reconcile_now().await.unwrap().drifts.len(), 4);
    engine.shutdown().await.unwrap();
    drop(engine);
    (drifted, clean, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_lists_and_handles_drifts_on_a_stopped_engines_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (drifted, clean, _ledger) = drifted_directory(tmp.path()).await;
    let d = tmp.path().to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            let mut all = vec!["--data-dir", d.as_str()];
            all.extend_from_slice(args);
            on_directory(&all)
        };
        let db = || std::fs::read(Path::new(&d).join("db")).unwrap();
        let (s, other) = (drifted[0], drifted[1]);

        let o = run(&["drift", "--json"]);
        assert!(o.status.success(), "{}", text(&o));
        let before = db();
        let all: sagaflow_admin::DriftPage = serde_json::from_slice(&o.stdout).unwrap();
        let listed: Vec<(SagaId, &str)> = all
            .drifts
            .iter()
            .map(|e| (e.saga, e.drift.step_name.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                (s, "payment"),
                (s, "order"),
                (other, "payment"),
                (other, "order")
            ]
        );
        assert_eq!(all.next, None);
        let (payment, order) = (all.drifts[0].drift.lsn, all.drifts[1].drift.lsn);

        let o = run(&["drift"]);
        assert!(o.status.success(), "{}", text(&o));
        let lines: Vec<String> = text(&o).lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 6, "{lines:?}");
        assert!(
            lines[0].starts_with("SAGA")
                && lines[0].contains("DEFINITION  STEP")
                && lines[0].contains("KIND")
                && lines[0].contains("EXPECTED  FOUND AT")
                && lines[0].ends_with("LSN  DETAIL"),
            "{lines:?}"
        );
        let row = &lines[1];
        assert!(
            row.starts_with(&format!(
                "{s}  checked v1  0 payment  missing    present   "
            )) && row.ends_with(&format!(" {payment}  no charge for this key")),
            "{lines:?}"
        );
        // Another system's text is cut and kept on one line.
        let row = &lines[2];
        assert!(
            row.contains("  1 order    different  present   ")
                && row.contains(&format!(" {order}  amount 400, the log says 500\\nraw xxx"))
                && row.ends_with("x...")
                && !row.contains(&"x".repeat(60)),
            "{lines:?}"
        );
        assert_eq!(lines[5], "4 open drift(s) on 2 saga(s)");

        // A page of one saga, with its cursor; the next page from it.
        let o = run(&["drift", "--limit", "1"]);
        let out = text(&o);
        assert!(out.contains("2 open drift(s) on 1 saga(s)"), "{out}");
        assert!(out.ends_with(&format!("next page: --after {s}\n")), "{out}");
        let o = run(&["drift", "--after", &s.to_string(), "--json"]);
        let rest: sagaflow_admin::DriftPage = serde_json::from_slice(&o.stdout).unwrap();
        assert!(rest.drifts.iter().all(|e| e.saga == other) && rest.drifts.len() == 2);
        assert_eq!(rest.next, None);
        let o = run(&["drift", "--limit", "0"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("limit must be 1 to 1000"), "{}", text(&o));

        // The timeline shows each drift, open, on its step.
        let o = run(&["show", &s.to_string()]);
        let out = text(&o);
        assert!(out.contains("drifts      2 open, 0 handled"), "{out}");
        assert!(
            out.lines().any(|l| l.contains(" drift ")
                && l.contains(" 0 payment ")
                && l.ends_with("missing (expected present, open): no charge for this key")),
            "{out}"
        );
        let o = run(&["list"]);
        let out = text(&o);
        assert!(
            out.lines().next().unwrap().contains("WAITING  DRIFTS"),
            "{out}"
        );
        assert!(
            out.lines()
                .any(|l| l.starts_with(&s.to_string()) && l.ends_with(" 2")),
            "{out}"
        );
        assert!(
            out.lines()
                .any(|l| l.starts_with(&clean.to_string()) && l.ends_with(" -")),
            "{out}"
        );
        assert_eq!(before, db(), "reading drifts changed the directory");

        // Marking one handled: who and why into the log, once.
        let handle = |lsn: &str| {
            run(&[
                "drift",
                "handle",
                &s.to_string(),
                lsn,
                "--reason",
                "refund booked by hand",
                "--operator",
                "ana",
            ])
        };
        let o = handle("999");
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        assert_refusal(&o, s, "no drift is recorded at lsn 999");
        let o = handle(&payment.to_string());
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            text(&o),
            format!(
                "saga {s}: drift at lsn {payment} marked handled (by ana); \
                 1 open drift(s) left on it\n"
            )
        );
        let o = handle(&payment.to_string());
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        assert_refusal(
            &o,
            s,
            &format!("the drift at lsn {payment} is already handled"),
        );
        let o = run(&["drift", "handle", &s.to_string(), &order.to_string()]);
        assert_eq!(o.status.code(), Some(2), "no --reason: {}", text(&o));

        let o = run(&["show", &s.to_string()]);
        let out = text(&o);
        assert!(out.contains("drifts      1 open, 1 handled"), "{out}");
        let handled_at = out
            .lines()
            .find(|l| l.contains("handle_drift of lsn"))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            handled_at.contains(" 0 payment ")
                && handled_at.ends_with(&format!(
                    "handle_drift of lsn {payment} by ana: refund booked by hand"
                )),
            "{out}"
        );
        let at = handled_at.split_whitespace().next().unwrap();
        assert!(
            out.lines().any(|l| l.contains(" 0 payment ")
                && l.contains(&format!("missing (expected present, handled at lsn {at})"))),
            "{out}"
        );
        let o = run(&["drift", "--json"]);
        let left: sagaflow_admin::DriftPage = serde_json::from_slice(&o.stdout).unwrap();
        let listed: Vec<(SagaId, &str)> = left
            .drifts
            .iter()
            .map(|e| (e.saga, e.drift.step_name.as_str()))
            .collect();
        assert_eq!(listed, [(s, "order"), (other, "payment"), (other, "order")]);
        let o = run(&["list", "--json"]);
        let metas: Vec<SagaMeta> = serde_json::from_slice(&o.stdout).unwrap();
        let count = |id: SagaId| metas.iter().find(|m| m.id == id).unwrap().open_drifts;
        assert_eq!((count(s), count(other), count(clean)), (1, 2, 0));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_and_drift_handle_through_a_running_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let (drifted, _clean, ledger) = drifted_directory(tmp.path()).await;
    let engine = Arc::new(
        builder()
            .register(checked(&ledger))
            .open(tmp.path())
            .await
            .unwrap(),
    );
    let auth = Auth::new(Token::new(ADMIN).unwrap()).with_read_token(Token::new(READ).unwrap());
    let app = router(engine.clone(), auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let s = drifted[0];
    let payment = engine.drifts(None, 1).unwrap()[0].drift.lsn;

    tokio::task::spawn_blocking(move || {
        let o = sagaflow(&["--url", &url, "drift"], &[("SAGAFLOW_TOKEN", READ)]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            text(&o).ends_with("4 open drift(s) on 2 saga(s)\n"),
            "{}",
            text(&o)
        );
        let o = sagaflow(
            &["--url", &url, "drift", "--limit", "1", "--json"],
            &[("SAGAFLOW_TOKEN", READ)],
        );
        let page: sagaflow_admin::DriftPage = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(page.drifts.len(), 2);
        assert_eq!(page.next, Some(s));

        let handle = |token: &str| {
            sagaflow(
                &[
                    "--url",
                    &url,
                    "drift",
                    "handle",
                    &s.to_string(),
                    &payment.to_string(),
                    "--reason",
                    "refund booked by hand",
                ],
                &[("SAGAFLOW_TOKEN", token)],
            )
        };
        let o = handle(READ);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("403"), "{}", text(&o));
        let o = handle(ADMIN);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            text(&o).contains("marked handled") && text(&o).contains("1 open drift(s) left"),
            "{}",
            text(&o)
        );
        let o = handle(ADMIN);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        assert_refusal(
            &o,
            s,
            &format!("the drift at lsn {payment} is already handled"),
        );
    })
    .await
    .unwrap();
    let open = engine.drifts(None, 10).unwrap();
    assert_eq!(open.len(), 3);
    assert!(open.iter().all(|e| e.drift.lsn != payment || e.saga != s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_repairs_through_a_running_engine_count_first() {
    let tmp = tempfile::tempdir().unwrap();
    let (parked, _done, ledger) = directory(tmp.path()).await;
    let d = tmp.path().to_str().unwrap().to_string();
    let offline = sagaflow(
        &[
            "--data-dir",
            &d,
            "bulk",
            "resume",
            "--status",
            "parked",
            "--reason",
            "x",
        ],
        &[],
    );
    assert_eq!(offline.status.code(), Some(1));
    assert!(
        text(&offline).contains("needs the running engine"),
        "{}",
        text(&offline)
    );

    let engine = builder()
        .register(checkout(&ledger))
        .open(tmp.path())
        .await
        .unwrap();
    let auth = Auth::new(Token::new(ADMIN).unwrap()).with_read_token(Token::new(READ).unwrap());
    let engine = Arc::new(engine);
    let app = router(engine.clone(), auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let status = engine.clone();
    let out = tokio::task::spawn_blocking(move || {
        let bulk = |extra: &[&str], token: &str| {
            let mut args = vec![
                "--url",
                &url,
                "bulk",
                "resume",
                "--status",
                "parked",
                "--park-kind",
                "compensation_failed",
                "--reason",
                "inventory fixed",
                "--operator",
                "bo",
            ];
            args.extend(extra);
            sagaflow(&args, &[("SAGAFLOW_TOKEN", token)])
        };
        let read = bulk(&[], READ);
        assert_eq!(read.status.code(), Some(1));
        assert!(text(&read).contains("403"), "{}", text(&read));
        // Without --confirm: a dry run, which prints the token that applies it.
        let dry = bulk(&[], ADMIN);
        assert!(dry.status.success(), "{}", text(&dry));
        assert!(
            text(&dry).contains(
                "dry run: resume would be accepted for 1 of the 1 sagas matched; 0 refused"
            ),
            "{}",
            text(&dry)
        );
        let token = text(&dry)
            .split("--confirm ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no confirmation token: {}", text(&dry)));
        assert_eq!(
            status.status(parked).unwrap().status,
            sagaflow::SagaStatus::Parked
        );
        let json = sagaflow(
            &[
                "--url", &url, "--json", "bulk", "retry", "--status", "parked", "--reason", "x",
            ],
            &[("SAGAFLOW_TOKEN", ADMIN)],
        );
        let report: Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(report["matched"], 1);
        assert_eq!(
            report["applied"], 0,
            "a parked saga is resumed, not retried"
        );
        assert_eq!(report["refused_count"], 1);
        // A token of another set of sagas is refused.
        // Refused, nothing written: exit 3, as a refused repair.
        let wrong = bulk(&["--confirm", "2-0000000000000000-none"], ADMIN);
        assert_eq!(wrong.status.code(), Some(3), "{}", text(&wrong));
        bulk(&["--confirm", &token], ADMIN)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("resume recorded on 1 of the 1 sagas matched (by bo); 0 refused"),
        "{}",
        text(&out)
    );
    assert!(matches!(
        engine.wait(parked).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
}
