//! The `order-processing` binary as an operator runs it: its configuration errors, the
//! providers' secrets, and the service under a descriptor limit with idle sockets.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use example_order_processing::providers::{self, Faults, ProviderSecrets};
use sagaflow_steps::secrets::Secrets;
use tokio::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_order-processing");
const VARS: [&str; 5] = [
    "PAYMENTS_CLIENT_SECRET",
    "PAYMENTS_WEBHOOK_SECRET",
    "SAGAFLOW_ADMIN_TOKEN",
    "SAGAFLOW_READ_TOKEN",
    // `serve` opens this database instead of its data directory when it is set.
    "DATABASE_URL",
];

/// The binary with none of its secrets (nor a database URL) inherited from this
/// environment, nor a backtrace setting, which would append a backtrace to the error
/// text the tests compare.
fn command(program: &str) -> Command {
    let mut c = Command::new(program);
    for v in VARS {
        c.env_remove(v);
    }
    c.env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    c.kill_on_drop(true);
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` until it holds; fails after 60 s.
async fn until<T>(what: &str, mut cond: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_short_admin_token_before_opening_anything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (env, want) in [
        (
            vec![("SAGAFLOW_ADMIN_TOKEN", "short-token")],
            "Error: SAGAFLOW_ADMIN_TOKEN: a token needs at least 16 bytes, this one has 11; \
             set a random one (`openssl rand -hex 32`) or unset it\n",
        ),
        (
            vec![
                ("SAGAFLOW_ADMIN_TOKEN", "admin-token-0123456789"),
                ("SAGAFLOW_READ_TOKEN", "read"),
            ],
            "Error: SAGAFLOW_READ_TOKEN: a token needs at least 16 bytes, this one has 4; \
             set a random one (`openssl rand -hex 32`) or unset it\n",
        ),
    ] {
        let out = command(EXE)
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(["--addresses", "/nonexistent/addresses.json"])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("PAYMENTS_CLIENT_SECRET", "cs")
            .env("PAYMENTS_WEBHOOK_SECRET", "whsec")
            .envs(env)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(String::from_utf8_lossy(&out.stderr), want);
        assert!(!data.exists(), "nothing was opened");
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_never_print_their_secrets_and_keep_generated_ones_in_a_0600_file() {
    let tmp = tempfile::tempdir().unwrap();
    let run = async |dir: &Path, env: &[(&str, &str)]| -> (String, String) {
        std::fs::create_dir_all(dir).unwrap();
        let (out, err) = (dir.join("stdout"), dir.join("stderr"));
        let mut child = command(EXE)
            .args(["providers", "--dir"])
            .arg(dir)
            .envs(env.iter().copied())
            .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
            .spawn()
            .unwrap();
        let addresses = dir.join("addresses.json");
        until("the providers print their addresses", async || {
            let text = std::fs::read_to_string(&out).ok()?;
            (text.ends_with("}\n") && addresses.exists()).then_some(())
        })
        .await;
        child.kill().await.unwrap();
        (
            std::fs::read_to_string(&out).unwrap(),
            std::fs::read_to_string(&err).unwrap(),
        )
    };

    // Nothing in the environment: both generated, into a file that an earlier,
    // world-readable one does not leave readable.
    let first = tmp.path().join("first");
    std::fs::create_dir_all(&first).unwrap();
    let file = first.join("secrets.env");
    std::fs::write(&file, "OLD=leftover\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (stdout, stderr) = run(&first, &[]).await;
    assert_eq!(mode(&file), 0o600);
    let secrets = Secrets::from_file(&file).unwrap();
    let client = secrets.get("PAYMENTS_CLIENT_SECRET").unwrap();
    let webhook = secrets.get("PAYMENTS_WEBHOOK_SECRET").unwrap();
    assert!(secrets.get("OLD").is_err(), "the file was rewritten");
    for (s, prefix) in [(&client, "cs_"), (&webhook, "whsec_")] {
        let hex = s.expose().strip_prefix(prefix).unwrap();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{hex}");
    }
    let addresses = std::fs::read_to_string(first.join("addresses.json")).unwrap();
    assert_eq!(stdout, format!("{addresses}\n"), "stdout is the addresses");
    let mut keys: Vec<String> = serde_json::from_str::<serde_json::Value>(&addresses)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    keys.sort();
    assert_eq!(keys, ["inventory", "orders", "payments"]);
    assert!(
        stderr.contains(&format!(
            "generated PAYMENTS_CLIENT_SECRET and PAYMENTS_WEBHOOK_SECRET into {} (mode 0600): \
             pass it to the service with --env-file\n",
            file.display()
        )),
        "{stderr}"
    );
    for s in [&client, &webhook] {
        for (name, text) in [
            ("stdout", &stdout),
            ("stderr", &stderr),
            ("addresses", &addresses),
        ] {
            assert!(!text.contains(s.expose()), "a secret in {name}: {text}");
        }
    }

    // A second run generates other secrets.
    let (_, _) = run(&tmp.path().join("second"), &[]).await;
    let again = Secrets::from_file(tmp.path().join("second/secrets.env")).unwrap();
    assert_ne!(
        again.get("PAYMENTS_CLIENT_SECRET").unwrap().expose(),
        client.expose()
    );

    // From the environment: used, not written anywhere, not printed.
    let given = tmp.path().join("given");
    let (stdout, stderr) = run(
        &given,
        &[
            ("PAYMENTS_CLIENT_SECRET", "given-client-secret-1"),
            ("PAYMENTS_WEBHOOK_SECRET", "whsec_given_new,whsec_given_old"),
        ],
    )
    .await;
    assert!(!given.join("secrets.env").exists());
    assert!(!stderr.contains("generated"), "{stderr}");
    for text in [&stdout, &stderr] {
        assert!(!text.contains("given"), "{text}");
    }
}

#[test]
fn provider_secrets_come_from_the_environment_or_are_generated() {
    let (s, generated) = ProviderSecrets::from_lookup_or_generate(|var| match var {
        "PAYMENTS_CLIENT_SECRET" => Some("cs-given".into()),
        "PAYMENTS_WEBHOOK_SECRET" => Some(" whsec_new , whsec_old".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(
        (s.client_secret.expose(), s.webhook_secret.expose()),
        ("cs-given", "whsec_new"),
        "payments signs with the first of the list"
    );
    assert!(generated.is_empty());
    let (a, generated) = ProviderSecrets::from_lookup_or_generate(|_| Some(String::new())).unwrap();
    assert_eq!(
        generated,
        ["PAYMENTS_CLIENT_SECRET", "PAYMENTS_WEBHOOK_SECRET"]
    );
    let b = ProviderSecrets::generate().unwrap();
    assert_ne!(a.client_secret, b.client_secret);
    assert_ne!(a.webhook_secret, b.webhook_secret);
    assert_eq!(
        format!("{a:?}"),
        "ProviderSecrets { client_secret: Secret(<redacted>), webhook_secret: Secret(<redacted>) }"
    );
}

/// The issue's scenario at a smaller size: more idle sockets than the service has
/// descriptors. Each is accepted in turn, timed out, and a real client gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_past_the_descriptor_limit_do_not_lock_clients_out() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = ProviderSecrets::generate().unwrap();
    let env_file = tmp.path().join("secrets.env");
    secrets
        .write_env_file(
            &env_file,
            &[providers::CLIENT_SECRET_VAR, providers::WEBHOOK_SECRET_VAR],
        )
        .unwrap();
    let p = providers::start(
        &tmp.path().join("providers"),
        Faults::default(),
        1000,
        Arc::new(Mutex::new(Vec::new())),
        secrets,
    )
    .await
    .unwrap();
    let addresses = tmp.path().join("addresses.json");
    std::fs::write(&addresses, serde_json::to_vec(&p.addresses).unwrap()).unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    let log = tmp.path().join("service.log");
    const TOKEN: &str = "admin-token-0123456789";
    // 300 idle sockets against 200 descriptors; 2 listeners x 32 + 128 kept in reserve.
    let mut child = command("sh")
        .arg("-c")
        .arg(r#"ulimit -n 200 && exec "$0" "$@""#)
        .arg(EXE)
        .args(["serve", "--data-dir"])
        .arg(tmp.path().join("data"))
        .arg("--addresses")
        .arg(&addresses)
        .arg("--env-file")
        .arg(&env_file)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .args(["--max-connections", "32", "--header-read-timeout", "500ms"])
        .env("SAGAFLOW_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let order = format!("{base}/orders/01a211da-b34b-7c63-a822-20fc30493cca");
    until("the service answers", async || {
        let r = client.get(&order).send().await.ok()?;
        (r.status() == 404).then_some(())
    })
    .await;
    // The admin API is on its own listener, and only there.
    let r = client
        .get(format!("{admin}/v1/sagas"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{base}/admin/v1/sagas"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let r = client.get(&order).send().await.unwrap();
    assert_eq!(r.status(), 404);
    child.kill().await.unwrap();
    drop(idle);

    // Each kind is logged at its first occurrence, then at most once every 10 s with
    // the running count.
    let text = std::fs::read_to_string(&log).unwrap();
    let first = |what: &str| {
        text.lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no `{what}` in {text}"))
            .to_string()
    };
    let limit = first("connection limit reached: new connections wait until one closes");
    assert!(
        limit.contains(" WARN ")
            && limit.contains("listener=\"public\" max_connections=32 times=1"),
        "{limit}"
    );
    let timeout = first("closed a connection that sent no complete request head in time");
    assert!(
        timeout.contains("header_read_timeout=500ms times=1"),
        "{timeout}"
    );
    let has = |what: &str| text.lines().filter(|l| l.contains(what)).count();
    assert_eq!(has("accept failed"), 0, "never out of descriptors: {text}");
    assert_eq!(has("too few descriptors"), 0, "{text}");
}
