//! Order processing with Sagaflow.
//!
//! ```text
//! # everything at once: providers, the service killed with SIGKILL every 2 s, a report
//! cargo run --release -p example-order-processing -- chaos --orders 2000 --concurrency 64 --fail-rate 0.2 --kill-every 2s
//!
//! # or by hand (see README.md's walkthrough)
//! cargo run -p example-order-processing -- providers --dir /tmp/shop/providers --webhook-url http://127.0.0.1:8080/webhooks/payments
//! cargo run -p example-order-processing -- serve --data-dir /tmp/shop/data --addresses /tmp/shop/providers/addresses.json --listen 127.0.0.1:8080
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use example_order_processing::providers::{self, Addresses, Faults};
use example_order_processing::{chaos, saga, service};
use sagaflow::Engine;
use sagaflow_steps::secrets::Secret;

#[derive(Parser, Debug)]
#[command(name = "order-processing", about = "Order processing with Sagaflow")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 2s"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{s}`: use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn parse_window(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("`{s}`: use START..END in seconds"))?;
    let a: u64 = a.trim().parse().map_err(|_| format!("`{s}`: bad start"))?;
    let b: u64 = b.trim().parse().map_err(|_| format!("`{s}`: bad end"))?;
    if b <= a {
        return Err(format!("`{s}`: the end must come after the start"));
    }
    Ok((a, b))
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the fake payments, inventory and orders providers.
    Providers {
        /// Where their ledgers and addresses.json go.
        #[arg(long)]
        dir: PathBuf,
        /// Share of calls that fail with a 500.
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        /// Latency added to every call, in ms.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Inventory's rate limit, calls per second.
        #[arg(long, default_value_t = 300)]
        inventory_per_second: u64,
        /// Where payments sends its signed webhooks.
        #[arg(long)]
        webhook_url: Option<String>,
        /// An outage window in seconds since start, like `30..60` (503 with
        /// Retry-After); repeatable.
        #[arg(long, value_parser = parse_window)]
        outage: Vec<(u64, u64)>,
    },
    /// Run the order service.
    Serve {
        /// The engine's sled directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The providers' addresses.json.
        #[arg(long)]
        addresses: PathBuf,
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
    /// Providers, the service killed again and again, clients retrying, a report.
    Chaos {
        /// Orders to place.
        #[arg(long, default_value_t = 2000)]
        orders: u32,
        /// Clients at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Providers' failure rate.
        #[arg(long, default_value_t = 0.2)]
        fail_rate: f64,
        /// Providers' latency in ms.
        #[arg(long, default_value_t = 2)]
        latency_ms: u64,
        /// Time between SIGKILLs of the service.
        #[arg(long, value_parser = parse_duration, default_value = "2s")]
        kill_every: Duration,
        /// At most this many kills.
        #[arg(long, default_value_t = 1000)]
        kills: u32,
        /// Working directory (a temporary one if not given).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

async fn serve(data_dir: PathBuf, addresses: PathBuf, listen: String) -> anyhow::Result<()> {
    let a: Addresses =
        serde_json::from_slice(&std::fs::read(&addresses).context("reading addresses")?)?;
    std::fs::create_dir_all(&data_dir)?;
    let integrations = saga::Integrations::new(&a);
    let engine = Arc::new(
        Engine::builder()
            .register(saga::definition(&integrations)?)
            .open(&data_dir)
            .await?,
    );
    tracing::info!(recovered = ?engine.recovery(), "engine open");
    let svc = service::Service::new(
        engine.clone(),
        Secret::new(a.webhook_secret.clone()),
        &data_dir,
    )?;
    let mut app = service::app(svc);
    if let Ok(admin) = sagaflow_admin::Token::from_env("SAGAFLOW_ADMIN_TOKEN") {
        let mut auth = sagaflow_admin::Auth::new(admin);
        if let Ok(read) = sagaflow_admin::Token::from_env("SAGAFLOW_READ_TOKEN") {
            auth = auth.with_read_token(read);
        }
        app = app.nest("/admin", sagaflow_admin::router(engine.clone(), auth));
    }
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!(%listen, "order service listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    match Arc::try_unwrap(engine) {
        Ok(e) => e.shutdown().await?,
        Err(_) => tracing::warn!("engine still in use at exit; its sagas resume at the next start"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = sagaflow_admin::init_logging(if std::env::var("LOG_JSON").is_ok() {
        sagaflow_admin::LogFormat::Json
    } else {
        sagaflow_admin::LogFormat::Text
    });
    match Cli::parse().command {
        Cmd::Providers {
            dir,
            fail_rate,
            latency_ms,
            inventory_per_second,
            webhook_url,
            outage,
        } => {
            let faults = Faults {
                fail_rate,
                latency_ms,
                outages: outage,
            };
            let p = providers::start(
                &dir,
                faults,
                inventory_per_second,
                Arc::new(Mutex::new(webhook_url)),
            )
            .await?;
            let json = serde_json::to_string_pretty(&p.addresses)?;
            std::fs::write(dir.join("addresses.json"), &json)?;
            println!("{json}");
            tokio::signal::ctrl_c().await?;
            Ok(())
        }
        Cmd::Serve {
            data_dir,
            addresses,
            listen,
        } => serve(data_dir, addresses, listen).await,
        Cmd::Chaos {
            orders,
            concurrency,
            fail_rate,
            latency_ms,
            kill_every,
            kills,
            dir,
        } => {
            let tmp = tempfile::tempdir()?;
            let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
            let report = chaos::run(chaos::ChaosConfig {
                orders,
                concurrency,
                fail_rate,
                latency_ms,
                kill_every,
                max_kills: kills,
                dir,
                exe: std::env::current_exe()?,
                progress: true,
            })
            .await?;
            println!("orders        {}", report.orders);
            println!("completed     {}", report.completed);
            println!("compensated   {}", report.compensated);
            println!("parked        {}", report.parked);
            println!("kills         {}", report.kills);
            println!(
                "charges       {} (refunds {})",
                report.charges, report.refunds
            );
            println!(
                "reservations  {} (releases {})",
                report.reservations, report.releases
            );
            println!(
                "orders made   {} (shipments {})",
                report.orders_created, report.shipments
            );
            println!(
                "webhooks      {} settled, {} forged refused",
                report.webhooks_delivered, report.forged_webhooks_refused
            );
            println!(
                "replays       {} returned the same order",
                report.idempotent_replays
            );
            for p in &report.problems {
                println!("MISMATCH      {p}");
            }
            println!("mismatches    {}", report.mismatches);
            let mut json = serde_json::to_value(&report)?;
            if let Some(o) = json.as_object_mut() {
                o.remove("problems");
            }
            println!("{json}");
            if report.mismatches > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
