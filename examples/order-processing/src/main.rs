//! Order processing with Sagaflow.
//!
//! ```text
//! # everything at once: providers, the service killed with SIGKILL every 2 s, and a
//! # report reconciled by the engine's reconciler against the providers
//! cargo run --release -p example-order-processing -- chaos --orders 2000 --concurrency 64 --fail-rate 0.2 --kill-every 2s
//!
//! # two replicas on one PostgreSQL database, the first killed again and again
//! cargo run --release -p example-order-processing --features postgres -- chaos --orders 2000 \
//!     --database-url postgres://postgres@127.0.0.1/test
//!
//! # or by hand (see README.md's walkthrough)
//! cargo run -p example-order-processing -- providers --dir /tmp/shop/providers --webhook-url http://127.0.0.1:8080/webhooks/payments
//! cargo run -p example-order-processing -- serve --data-dir /tmp/shop/data --addresses /tmp/shop/providers/addresses.json \
//!     --env-file /tmp/shop/providers/secrets.env --listen 127.0.0.1:8080
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use example_order_processing::providers::{self, Addresses, Faults, ProviderSecrets};
use example_order_processing::server::{self, Limits};
use example_order_processing::service::{Listeners, ServiceSecrets};
use example_order_processing::{chaos, reconcile, saga, service};
use sagaflow::Engine;

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
    ///
    /// The secrets payments shares with the shop come from PAYMENTS_CLIENT_SECRET and
    /// PAYMENTS_WEBHOOK_SECRET (the first of its list signs); those unset are generated
    /// and written to DIR/secrets.env (mode 0600) for the service's --env-file. They are
    /// never printed.
    Providers {
        /// Where their ledgers, addresses.json and secrets.env go.
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
        /// Where payments sends its signed settlement webhooks; repeatable (each retry
        /// goes to the next).
        #[arg(long)]
        webhook_url: Vec<String>,
        /// An outage window in seconds since start, like `30..60` (503 with
        /// Retry-After); repeatable.
        #[arg(long, value_parser = parse_window)]
        outage: Vec<(u64, u64)>,
        /// Payments settles each charge a pseudo-random 0 to this many ms after taking
        /// it.
        #[arg(long, default_value_t = 0)]
        settle_within_ms: u64,
    },
    /// Run the order service.
    ///
    /// Secrets come from the environment, else from --env-file: PAYMENTS_CLIENT_SECRET,
    /// PAYMENTS_WEBHOOK_SECRET (a comma-separated list: any of them is accepted, so a
    /// secret is rotated without downtime), and SAGAFLOW_ADMIN_TOKEN /
    /// SAGAFLOW_READ_TOKEN (at least 16 bytes; unset: no admin API).
    Serve {
        /// The engine's sled directory (with --database-url: created, and otherwise
        /// unused).
        #[arg(long)]
        data_dir: PathBuf,
        /// A PostgreSQL database shared with other replicas, instead of the sled
        /// directory (needs the `postgres` feature).
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        /// The schema the engine's tables live in, with --database-url.
        #[arg(long, default_value = "sagaflow")]
        pg_schema: String,
        /// The providers' addresses.json.
        #[arg(long)]
        addresses: PathBuf,
        /// A file of NAME=value lines for the secrets the environment does not set.
        #[arg(long)]
        env_file: Option<PathBuf>,
        /// Where to listen for orders and webhooks.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Where the admin API listens (when SAGAFLOW_ADMIN_TOKEN is set): its own
        /// listener, never the public one.
        #[arg(long, default_value = "127.0.0.1:7070")]
        admin_listen: String,
        /// Where the operator dashboard listens (when SAGAFLOW_ADMIN_TOKEN is set; log
        /// in with that token, or SAGAFLOW_READ_TOKEN to look only); `off`: no dashboard.
        #[arg(long, default_value = "127.0.0.1:7071")]
        dashboard_listen: String,
        /// Connections open at once, per listener; more wait until one closes.
        #[arg(long, default_value_t = Limits::default().max_connections)]
        max_connections: usize,
        /// Time a connection has to send a complete request head (also the keep-alive
        /// wait for the next request).
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        header_read_timeout: Duration,
        /// A connection on which no byte moves for this long is closed.
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        idle_timeout: Duration,
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
        /// Run two service replicas on this PostgreSQL database (a fresh schema),
        /// clients spread across both, and kill only the first (needs the `postgres`
        /// feature).
        #[arg(long)]
        database_url: Option<String>,
    },
}

#[derive(Debug)]
struct ServeArgs {
    data_dir: PathBuf,
    database_url: Option<String>,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pg_schema: String,
    addresses: PathBuf,
    env_file: Option<PathBuf>,
    listen: String,
    admin_listen: String,
    dashboard_listen: String,
    limits: Limits,
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Configuration errors first, before anything is opened or bound.
    args.limits.check()?;
    let secrets = ServiceSecrets::load(args.env_file.as_deref())?;
    let a: Addresses = serde_json::from_slice(
        &std::fs::read(&args.addresses)
            .with_context(|| format!("reading {}", args.addresses.display()))?,
    )?;
    if let Some(fds) = server::descriptor_limit() {
        let listeners = if secrets.admin.is_some() { 2 } else { 1 };
        // Descriptors for the engine's files and the calls to the providers.
        let reserve = 128;
        let needed = (args.limits.max_connections as u64) * listeners + reserve;
        if needed > fds {
            tracing::warn!(
                max_connections = args.limits.max_connections,
                descriptor_limit = fds,
                "the connection limit leaves too few descriptors (ulimit -n): lower --max-connections or raise the limit"
            );
        }
    }
    let public = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let dashboard = match (&secrets.admin, args.dashboard_listen.as_str()) {
        (Some(auth), listen) if listen != "off" => {
            let l = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding the dashboard to {listen}"))?;
            let addr = l.local_addr()?;
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the dashboard listens on a non-loopback address");
            }
            tracing::info!(%addr, "dashboard listening");
            Some((l, auth.clone()))
        }
        _ => None,
    };
    let admin = match secrets.admin {
        Some(auth) => {
            let l = tokio::net::TcpListener::bind(&args.admin_listen)
                .await
                .with_context(|| format!("binding the admin API to {}", args.admin_listen))?;
            let addr = l.local_addr()?;
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the admin API listens on a non-loopback address");
            }
            tracing::info!(%addr, "admin API listening");
            Some((l, auth))
        }
        None => {
            tracing::info!("admin API off: SAGAFLOW_ADMIN_TOKEN is not set");
            None
        }
    };
    std::fs::create_dir_all(&args.data_dir)?;
    let integrations = saga::Integrations::new(&a, &secrets.client_secret);
    // The reconciler checks, every minute, the orders that finished between 10 minutes
    // and 7 days ago against the providers (the steps' hooks), at inventory's rate.
    let builder = Engine::builder()
        .register(saga::definition(&integrations)?)
        .options(
            sagaflow::EngineOptions::default()
                .with_reconciler(reconcile::reconcile_options(&integrations)),
        );
    let engine = Arc::new(match &args.database_url {
        None => builder.open(&args.data_dir).await?,
        #[cfg(feature = "postgres")]
        Some(url) => {
            builder
                .open_postgres(
                    url,
                    sagaflow::store::PgOptions::default().schema(args.pg_schema.clone()),
                )
                .await?
        }
        #[cfg(not(feature = "postgres"))]
        Some(_) => anyhow::bail!(
            "--database-url needs the `postgres` feature: cargo run --features postgres ..."
        ),
    });
    tracing::info!(recovered = ?engine.recovery(), "engine open");
    let dashboard = dashboard.map(|(listener, auth)| {
        let engine = engine.clone();
        tokio::spawn(async move {
            let options = sagaflow_admin::dashboard::DashboardOptions::default();
            if let Err(e) = sagaflow_admin::dashboard::serve(listener, engine, auth, options).await
            {
                tracing::error!(error = %e, "the dashboard stopped");
            }
        })
    });
    let svc = service::Service::new(engine.clone(), secrets.webhook_secrets)?;
    tracing::info!(listen = %public.local_addr()?, limits = ?args.limits, "order service listening");
    service::run(
        svc,
        engine.clone(),
        Listeners {
            public,
            admin,
            limits: args.limits,
            public_stats: Arc::default(),
        },
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    )
    .await?;
    // The dashboard holds a handle on the engine: let go of it before the shutdown.
    if let Some(task) = dashboard {
        task.abort();
        let _ = task.await;
    }
    match Arc::try_unwrap(engine) {
        Ok(e) => e.shutdown().await?,
        Err(_) => tracing::warn!("engine still in use at exit; its sagas resume at the next start"),
    }
    Ok(())
}

/// With the `otel` feature and `OTEL_EXPORTER_OTLP_ENDPOINT` set: log lines as usual,
/// and the spans exported over OTLP/HTTP to that endpoint. The guard flushes what is
/// left when it is dropped, at exit.
#[cfg(feature = "otel")]
fn init_traces() -> anyhow::Result<Option<sagaflow_otel::Guard>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let Some(endpoint) = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
    else {
        return Ok(None);
    };
    let options = sagaflow_otel::Options::new("order-processing").with_endpoint(endpoint);
    let (otel, guard) = sagaflow_otel::layer(&options)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(otel)
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours on a terminal only (and not with NO_COLOR), as without traces.
                .with_ansi(
                    std::io::IsTerminal::is_terminal(&std::io::stderr())
                        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
                ),
        )
        .try_init()?;
    Ok(Some(guard))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    #[cfg(feature = "otel")]
    let _traces = init_traces()?;
    #[cfg(feature = "otel")]
    let exporting = _traces.is_some();
    #[cfg(not(feature = "otel"))]
    let exporting = false;
    if !exporting {
        let _ = sagaflow_admin::init_logging(if std::env::var("LOG_JSON").is_ok() {
            sagaflow_admin::LogFormat::Json
        } else {
            sagaflow_admin::LogFormat::Text
        });
    }
    match Cli::parse().command {
        Cmd::Providers {
            dir,
            fail_rate,
            latency_ms,
            inventory_per_second,
            webhook_url,
            outage,
            settle_within_ms,
        } => {
            let faults = Faults {
                fail_rate,
                latency_ms,
                outages: outage,
                settle_within_ms,
            };
            std::fs::create_dir_all(&dir)?;
            let (secrets, generated) =
                ProviderSecrets::from_lookup_or_generate(|var| std::env::var(var).ok())?;
            if !generated.is_empty() {
                let path = dir.join("secrets.env");
                secrets
                    .write_env_file(&path, &generated)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!(
                    "generated {} into {} (mode 0600): pass it to the service with --env-file",
                    generated.join(" and "),
                    path.display()
                );
            }
            let p = providers::start(
                &dir,
                faults,
                inventory_per_second,
                Arc::new(Mutex::new(webhook_url.into_iter().collect())),
                secrets,
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
            database_url,
            pg_schema,
            addresses,
            env_file,
            listen,
            admin_listen,
            dashboard_listen,
            max_connections,
            header_read_timeout,
            idle_timeout,
        } => {
            serve(ServeArgs {
                data_dir,
                database_url,
                pg_schema,
                addresses,
                env_file,
                listen,
                admin_listen,
                dashboard_listen,
                limits: Limits {
                    max_connections,
                    header_read_timeout,
                    idle_timeout,
                },
            })
            .await
        }
        Cmd::Chaos {
            orders,
            concurrency,
            fail_rate,
            latency_ms,
            kill_every,
            kills,
            dir,
            database_url,
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
                database_url,
            })
            .await?;
            println!("orders        {}", report.orders);
            println!("completed     {}", report.completed);
            println!("compensated   {}", report.compensated);
            // Most frequent first.
            let mut reasons: Vec<(&String, &u32)> = report.compensated_by_reason.iter().collect();
            reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let width = reasons
                .iter()
                .map(|(_, n)| n.to_string().len())
                .max()
                .unwrap_or(0);
            for (reason, n) in reasons {
                println!("  {n:>width$}  {reason}");
            }
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
                "settlements   {} sent, {} acknowledged, {} taken by a saga, {} unclaimed (saga compensated before it waited)",
                report.settlements_sent,
                report.settlements_acknowledged,
                report.settlements_taken,
                report.settlements_unclaimed
            );
            println!(
                "  retried     {} sends; redelivered {} answered duplicate (a kill lost the first answer); replayed at the end {}, answered duplicate {}",
                report.settlement_retries,
                report.settlements_redelivered, report.settlements_replayed, report.settlement_replays_duplicate
            );
            println!(
                "  lost        {}, doubled {}",
                report.settlements_lost, report.settlements_doubled
            );
            println!(
                "webhooks      {} forged refused",
                report.forged_webhooks_refused
            );
            println!(
                "replays       {} returned the same order",
                report.idempotent_replays
            );
            println!(
                "reconciled    {} sagas by the engine's reconciler: {} lookups, {} steps matched, {} drifts; {} steps it could not judge checked here",
                report.reconcile_sagas,
                report.reconcile_lookups,
                report.reconcile_matched,
                report.drifts.len(),
                report.reconcile_unchecked.len()
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
