//! `sagaflow`: find and repair sagas, on a data directory (engine stopped) or through a
//! running engine's admin API (`--url`, token in `SAGAFLOW_TOKEN`).
//!
//! ```text
//! sagaflow --data-dir /var/lib/shop/sagas list --status parked
//! sagaflow --url http://127.0.0.1:7070 show 0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071
//! sagaflow --url http://127.0.0.1:7070 resume <id> --reason "provider back up"
//! sagaflow --url http://127.0.0.1:7070 deliver settlement/o1 --id wh-81 --payload '{"settled":500}'
//! sagaflow --url http://127.0.0.1:7070 approve <id> --step review --reason "checked"
//! sagaflow --data-dir /var/lib/shop/sagas inbox
//! sagaflow --url http://127.0.0.1:7070 drift
//! sagaflow --url http://127.0.0.1:7070 drift handle <id> 7 --reason "refund booked by hand"
//! sagaflow --url http://127.0.0.1:7070 bulk resume --status parked --reason "stock fixed"   # a dry run
//! sagaflow --url http://127.0.0.1:7070 bulk resume --status parked --reason "stock fixed" --confirm TOKEN
//! ```
//!
//! Exit codes: 0 done, 1 error, 2 usage, 3 refused (a repair, cancellation, delivery or
//! approval; nothing was written).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand};
use sagaflow::admin::{Admin, Purged, Stats};
use sagaflow::machine::{Event, LogRecord, Repair};
use sagaflow::store::{Delivered, Delivery, SagaLog, SledLog};
use sagaflow::BulkReport;
use sagaflow::{Error, IdempotencyKey, Lsn, Phase, SagaId, SagaMeta, Timestamp};
use sagaflow_admin::{
    ApiError, ApproveRequest, BulkRequest, CancelRequest, DeliverRequest, DeliverResponse,
    DeliveriesQuery, DriftPage, DriftsQuery, ListQuery, PurgeRequest, RepairRequest, SagaView,
};

#[derive(Parser, Debug)]
#[command(
    name = "sagaflow",
    version,
    about = "List, inspect and repair Sagaflow sagas"
)]
struct Cli {
    /// The data directory of a stopped engine.
    #[arg(long, env = "SAGAFLOW_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// The admin API of a running engine (token in SAGAFLOW_TOKEN).
    #[arg(long, env = "SAGAFLOW_URL", global = true, conflicts_with = "data_dir")]
    url: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List sagas, oldest first.
    List {
        /// running, compensating, completed, compensated, parked, resolved or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Only this definition.
        #[arg(long)]
        definition: Option<String>,
        /// Only sagas started at least this long ago (90s, 15m, 2h, 1d).
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// Only sagas with no transition for at least this long.
        #[arg(long, value_parser = parse_duration)]
        stuck_for: Option<Duration>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Only sagas after this one: the last id of the previous page (before it with
        /// --newest-first).
        #[arg(long)]
        after: Option<SagaId>,
        /// Newest first.
        #[arg(long)]
        newest_first: bool,
    },
    /// Show one saga's timeline: every transition with its time, attempt, error and key.
    Show {
        /// The saga id.
        id: SagaId,
    },
    /// Counts by status and definition, the oldest active saga, stuck sagas.
    Stats {
        /// A saga idle this long counts as stuck.
        #[arg(long, value_parser = parse_duration, default_value = "15m")]
        stuck_after: Duration,
    },
    /// Run a saga's waiting retry now (every waiting one, or one step's).
    Retry {
        #[command(flatten)]
        target: Target,
        /// Only this step (a branch of a parallel group, say): its name, or its number
        /// as `show` prints it.
        #[arg(long)]
        step: Option<String>,
    },
    /// Resume a parked saga, with one more attempt for what failed.
    Resume(Target),
    /// Force compensation of a saga that has not started its pivot.
    Compensate(Target),
    /// Count a step the saga is at (or its compensation) as done by hand.
    Skip {
        #[command(flatten)]
        target: Target,
        /// The step: its name, or its number as `show` prints it (counted from 0).
        #[arg(long)]
        step: String,
    },
    /// Mark a saga resolved by hand; the engine stops driving it.
    Resolve(Target),
    /// Cancel a saga before its pivot: it compensates and ends cancelled.
    Cancel(Target),
    /// Check a stopped engine's store (on a private copy): every index against the
    /// summaries and logs, every log folding. Exit 1 if anything is wrong.
    Verify,
    /// Delete finished sagas (completed, compensated, cancelled, resolved) that finished
    /// before a time. Counts only, unless --yes.
    Purge {
        /// A time (2026-11-18T00:00:00Z) or an age (7d: finished more than 7 days ago).
        #[arg(long)]
        finished_before: String,
        /// Delete them (without it: a dry run that only counts).
        #[arg(long)]
        yes: bool,
    },
    /// Deliver an event to the await step waiting on KEY (or that will): answered once
    /// it is durable. Needs the running engine (--url).
    Deliver {
        /// The correlation key the await step waits on.
        key: String,
        /// The delivery id: a second delivery with the same key and id is a duplicate.
        #[arg(long)]
        id: String,
        /// What the event says, as JSON (the await step's output).
        #[arg(long, value_parser = parse_json)]
        payload: serde_json::Value,
    },
    /// Approve a saga's await step: delivers who approved and why to the key it waits
    /// on. Needs the running engine (--url).
    Approve {
        #[command(flatten)]
        target: Target,
        /// The await step, by name.
        #[arg(long)]
        step: String,
    },
    /// List the inbox: delivered events, taken by a saga or still waiting for one, in
    /// the store's order (the same on every page).
    Inbox {
        /// Only deliveries after this key and id: the last of the previous page.
        #[arg(long, requires = "after_id")]
        after_key: Option<String>,
        /// With --after-key.
        #[arg(long, requires = "after_key")]
        after_id: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = sagaflow_admin::DEFAULT_DELIVERIES_PAGE)]
        limit: usize,
    },
    /// List the open drifts: where the reconciler found that a system a finished saga's
    /// step called disagrees with its log. `drift handle` marks one handled.
    #[command(args_conflicts_with_subcommands = true)]
    Drift {
        #[command(subcommand)]
        handle: Option<DriftCommand>,
        /// Only sagas after this one: the `--after` the previous page ends with.
        #[arg(long)]
        after: Option<SagaId>,
        /// The drifts of at most this many sagas (1 to 1000).
        #[arg(long, default_value_t = sagaflow_admin::DEFAULT_DRIFTS_PAGE)]
        limit: usize,
    },
    /// Apply one repair to every saga a filter matches (at most 10 000, oldest first),
    /// each checked and recorded on its own saga; one refused is listed, not fatal.
    /// Needs the running engine (--url). Without --confirm, a dry run: it counts and
    /// prints the token that applies it to exactly the sagas counted.
    Bulk {
        /// retry, resume, compensate or resolve.
        action: sagaflow::BulkAction,
        #[command(flatten)]
        filter: BulkFilter,
        /// The token a dry run printed: apply the repair to exactly the sagas it
        /// counted (refused if the filter matches anything else by now). Without it,
        /// a dry run: nothing is written.
        #[arg(long)]
        confirm: Option<String>,
        /// Why (recorded in each saga's log).
        #[arg(long)]
        reason: String,
        /// Who (recorded in each saga's log).
        #[arg(long, env = "USER", default_value = "operator")]
        operator: String,
    },
}

/// Which sagas a bulk repair acts on: every field is optional; none matches every saga.
#[derive(Args, Debug)]
struct BulkFilter {
    /// running, compensating, completed, compensated, parked, resolved or cancelled.
    #[arg(long)]
    status: Option<String>,
    /// Only this definition.
    #[arg(long)]
    definition: Option<String>,
    /// Only parked sagas of this kind (compensation_failed, forward_failed,
    /// outcome_unknown, crash_loop, deadline_passed, ...).
    #[arg(long)]
    park_kind: Option<String>,
    /// Only sagas started at least this long ago (90s, 15m, 2h, 1d).
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// Only sagas started at most this long ago.
    #[arg(long, value_parser = parse_duration)]
    newer_than: Option<Duration>,
    /// Only sagas with no transition for at least this long.
    #[arg(long, value_parser = parse_duration)]
    stuck_for: Option<Duration>,
    /// Only the saga started with this start key.
    #[arg(long)]
    start_key: Option<String>,
    /// Only sagas whose reason contains this text (any case).
    #[arg(long)]
    text: Option<String>,
}

#[derive(Subcommand, Debug)]
enum DriftCommand {
    /// Mark the drift recorded at LSN on saga ID handled: who and why go into its log,
    /// and it leaves the list of open drifts.
    Handle {
        #[command(flatten)]
        target: Target,
        /// The drift record's lsn, as `drift` and `show` print it.
        lsn: u64,
    },
}

#[derive(Args, Debug)]
struct Target {
    /// The saga id.
    id: SagaId,
    /// Why (recorded in the saga's log).
    #[arg(long)]
    reason: String,
    /// Who (recorded in the saga's log).
    #[arg(long, env = "USER", default_value = "operator")]
    operator: String,
}

fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not JSON ({e}); quote a string: '\"text\"'"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 90s, 15m, 2h, 1d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("`{s}`: use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

/// Where the answers come from.
enum Backend {
    Local(Admin),
    Remote {
        client: reqwest::Client,
        url: String,
        token: String,
    },
}

/// A refused repair, kept apart so `main` can exit with code 3. Its text is the
/// engine's ("repair of saga X refused: why"), printed as it is.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl Backend {
    fn open(cli: &Cli) -> anyhow::Result<Backend> {
        match (&cli.url, &cli.data_dir) {
            (Some(url), _) => Ok(Backend::Remote {
                client: reqwest::Client::new(),
                url: url.trim_end_matches('/').to_string(),
                token: std::env::var("SAGAFLOW_TOKEN")
                    .context("--url needs the API token in SAGAFLOW_TOKEN")?,
            }),
            (None, Some(_))
                if matches!(
                    cli.command,
                    Command::Deliver { .. } | Command::Approve { .. } | Command::Bulk { .. }
                ) =>
            {
                // With sled, only the engine that holds the store may write to it, and
                // only it can wake the step waiting for the event.
                Err(anyhow!(
                    "a delivery, an approval or a bulk repair needs the running engine: give \
                     --url, not --data-dir (start the engine if it is stopped)"
                ))
            }
            (None, Some(dir)) => {
                // Reading commands never change the directory: they work on a private
                // copy (sled's recovery and the consistency check write to what they
                // open). Repairs open the directory itself.
                let read_only = matches!(
                    cli.command,
                    Command::List { .. }
                        | Command::Show { .. }
                        | Command::Stats { .. }
                        | Command::Verify
                        | Command::Drift { handle: None, .. }
                );
                let opened = if read_only {
                    Admin::open_read_only(dir)
                } else {
                    Admin::open(dir)
                };
                Ok(Backend::Local(opened.map_err(locked)?))
            }
            (None, None) => Err(anyhow!(
                "give --data-dir (engine stopped) or --url (engine running)"
            )),
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &impl serde::Serialize,
    ) -> anyhow::Result<T> {
        let Backend::Remote { client, url, token } = self else {
            return Err(anyhow!("not a remote backend"));
        };
        let resp = client
            .get(format!("{url}{path}"))
            .query(query)
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("calling {url}{path}"))?;
        decode(resp).await
    }

    async fn list(&self, q: &ListQuery) -> anyhow::Result<Vec<SagaMeta>> {
        match self {
            Backend::Local(a) => Ok(a.list(&q.to_filter().map_err(|e| anyhow!(e))?)?),
            Backend::Remote { .. } => self.get("/v1/sagas", q).await,
        }
    }

    async fn show(&self, id: SagaId) -> anyhow::Result<SagaView> {
        match self {
            Backend::Local(a) => {
                // As much as can be read: a saga parked with a corrupt log is shown up
                // to the damage, with what could not be read.
                let log = a.readable_log(id)?;
                Ok(SagaView {
                    summary: a.status(id)?,
                    history: log.records,
                    problems: log.problems,
                })
            }
            Backend::Remote { .. } => self.get(&format!("/v1/sagas/{id}"), &()).await,
        }
    }

    /// A page of open drifts: the drifts of up to `limit` sagas after `after`.
    async fn drifts(&self, after: Option<SagaId>, limit: usize) -> anyhow::Result<DriftPage> {
        let q = DriftsQuery {
            after: after.map(|id| id.to_string()),
            limit: Some(limit),
        };
        // The API's bounds, checked alike on a directory.
        q.to_page().map_err(|e| anyhow!(e))?;
        match self {
            Backend::Local(a) => Ok(DriftPage::of(a.drifts(after, limit + 1)?, limit)),
            Backend::Remote { .. } => self.get("/v1/drifts", &q).await,
        }
    }

    async fn stats(&self, stuck_after: Duration) -> anyhow::Result<Stats> {
        match self {
            Backend::Local(a) => Ok(a.stats(stuck_after)?),
            Backend::Remote { .. } => {
                self.get("/v1/stats", &[("stuck_after_secs", stuck_after.as_secs())])
                    .await
            }
        }
    }

    async fn repair(&self, id: SagaId, req: &RepairRequest) -> anyhow::Result<SagaMeta> {
        match self {
            Backend::Local(a) => {
                let action = req.to_repair().map_err(|e| anyhow!(e))?;
                a.repair(id, action, &req.operator, &req.reason)
                    .map_err(|e| match e {
                        Error::RepairRefused { .. } => anyhow!(Refused(e.to_string())),
                        other => anyhow!(other),
                    })
            }
            Backend::Remote { .. } => self.post(&format!("/v1/sagas/{id}/repair"), req).await,
        }
    }

    /// POSTs `body` to the API; a 409, or a 422 with SAGA-0019 (a delivery or approval
    /// refused), is a refusal (exit 3).
    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<T> {
        let Backend::Remote { client, url, token } = self else {
            return Err(anyhow!("not a remote backend"));
        };
        let resp = client
            .post(format!("{url}{path}"))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("calling {url}"))?;
        let status = resp.status();
        if status == reqwest::StatusCode::CONFLICT
            || status == reqwest::StatusCode::UNPROCESSABLE_ENTITY
            || status == reqwest::StatusCode::BAD_REQUEST
        {
            let body = resp.text().await.unwrap_or_default();
            return Err(match serde_json::from_str::<ApiError>(&body) {
                Ok(e) if status == reqwest::StatusCode::CONFLICT => anyhow!(Refused(e.error)),
                // A delivery refused, a bulk repair refused (nothing written): exit 3.
                Ok(e) if matches!(e.code.as_deref(), Some("SAGA-0019" | "SAGA-0020")) => {
                    anyhow!(Refused(e.error))
                }
                Ok(e) => anyhow!("{status}: {}", e.error),
                Err(_) => anyhow!("{status}: {body}"),
            });
        }
        decode(resp).await
    }

    /// Delivers an event through the API (a directory cannot take one: see `open`).
    async fn deliver(&self, req: &DeliverRequest) -> anyhow::Result<Delivered> {
        let r: DeliverResponse = self.post("/v1/deliveries", req).await?;
        Ok(r.delivered)
    }

    async fn approve(&self, id: SagaId, req: &ApproveRequest) -> anyhow::Result<Delivered> {
        let r: DeliverResponse = self.post(&format!("/v1/sagas/{id}/approve"), req).await?;
        Ok(r.delivered)
    }

    async fn cancel(&self, id: SagaId, t: &Target) -> anyhow::Result<SagaMeta> {
        match self {
            Backend::Local(a) => a.cancel(id, &t.operator, &t.reason).map_err(|e| match e {
                Error::CancelRefused { .. } | Error::RepairRefused { .. } => {
                    anyhow!(Refused(e.to_string()))
                }
                other => anyhow!(other),
            }),
            Backend::Remote { .. } => {
                let body = CancelRequest {
                    operator: t.operator.clone(),
                    reason: t.reason.clone(),
                };
                self.post(&format!("/v1/sagas/{id}/cancel"), &body).await
            }
        }
    }

    async fn purge(&self, before: Timestamp, dry_run: bool) -> anyhow::Result<Purged> {
        match self {
            Backend::Local(a) => Ok(a.purge(before, dry_run)?),
            Backend::Remote { .. } => {
                let body = PurgeRequest {
                    finished_before_ms: before.as_millis(),
                    dry_run,
                };
                self.post("/v1/purge", &body).await
            }
        }
    }
}

/// An error opening a directory, saying what to do if its engine is running.
fn locked(e: Error) -> anyhow::Error {
    match e {
        Error::Store(ref s) if matches!(**s, sagaflow::store::Error::Locked { .. }) => {
            anyhow!("{e}: the engine is running; use --url with its admin API")
        }
        other => anyhow!(other),
    }
}

/// The inbox's deliveries after `after`, at most `limit`: from the running engine's API,
/// or from a private copy of a stopped engine's directory (nothing in it changes).
async fn inbox(
    cli: &Cli,
    after: Option<(String, String)>,
    limit: usize,
) -> anyhow::Result<Vec<Delivery>> {
    let (after_key, after_id) = after.clone().unzip();
    let q = DeliveriesQuery {
        after_key,
        after_id,
        limit: Some(limit),
    };
    // The API's bounds, checked alike on a directory.
    q.to_page().map_err(|e| anyhow!(e))?;
    match (&cli.url, &cli.data_dir) {
        (None, Some(dir)) => {
            let store = SledLog::open_read_only(dir).map_err(|e| locked(e.into()))?;
            let after = after.as_ref().map(|(k, i)| (k.as_str(), i.as_str()));
            Ok(store
                .inbox()
                .deliveries(after, limit)
                .map_err(Error::from)?)
        }
        _ => Backend::open(cli)?.get("/v1/deliveries", &q).await,
    }
}

/// A time given as an RFC 3339 UTC timestamp (`2026-11-18T00:00:00Z`, optionally with
/// milliseconds) or as an age (`7d`: that long before now).
fn parse_time(s: &str) -> anyhow::Result<Timestamp> {
    if let Ok(ago) = parse_duration(s) {
        let ms = u64::try_from(ago.as_millis()).unwrap_or(u64::MAX);
        return Ok(Timestamp::from_millis(now().as_millis().saturating_sub(ms)));
    }
    let bad = || anyhow!("`{s}` is neither a time like 2026-11-18T00:00:00Z nor an age like 7d");
    let t = s.trim().strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = t.split_once('T').ok_or_else(bad)?;
    let num = |x: &str| x.parse::<i64>().map_err(|_| bad());
    let d: Vec<&str> = date.split('-').collect();
    let (hms, millis) = match time.split_once('.') {
        Some((hms, frac)) => (hms, num(&format!("{frac:0<3}")[..3])?),
        None => (time, 0),
    };
    let h: Vec<&str> = hms.split(':').collect();
    let ([y, mo, da], [hh, mi, ss]) = (d.as_slice(), h.as_slice()) else {
        return Err(bad());
    };
    let (y, mo, da, hh, mi, ss) = (num(y)?, num(mo)?, num(da)?, num(hh)?, num(mi)?, num(ss)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || hh > 23 || mi > 59 || ss > 60 {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm), proleptic Gregorian.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 86_400 + hh * 3600 + mi * 60 + ss) * 1000) + millis;
    u64::try_from(ms)
        .map(Timestamp::from_millis)
        .map_err(|_| anyhow!("`{s}` is before 1970"))
}

async fn decode<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> anyhow::Result<T> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp.json().await?);
    }
    let body = resp.text().await.unwrap_or_default();
    let msg = serde_json::from_str::<ApiError>(&body).map_or(body, |e| e.error);
    Err(anyhow!("{status}: {msg}"))
}

fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Timestamp::from_millis(ms)
}

/// A duration in one format at every size: `45s`, `1m54s`, `2h03m`, `3d04h`.
fn human(d: Duration) -> String {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    let s = d.as_secs();
    if s < MINUTE {
        format!("{s}s")
    } else if s < HOUR {
        format!("{}m{:02}s", s / MINUTE, s % MINUTE)
    } else if s < DAY {
        format!("{}h{:02}m", s / HOUR, s % HOUR / MINUTE)
    } else {
        format!("{}d{:02}h", s / DAY, s % DAY / HOUR)
    }
}

/// Lays out rows in columns as wide as their widest cell, two spaces apart. The last
/// cell of a row is not padded and does not widen its column, so a row with fewer
/// cells (a damaged record's lsn and what is wrong with it) runs on as free text.
/// `right` lists the right-aligned columns.
fn table(rows: &[Vec<String>], right: &[usize]) -> Vec<String> {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (j, cell) in row.iter().enumerate().take(row.len().saturating_sub(1)) {
            if widths.len() <= j {
                widths.resize(j + 1, 0);
            }
            widths[j] = widths[j].max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let last = row.len().saturating_sub(1);
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(j, cell)| {
                    let w = if j == last { 0 } else { widths[j] };
                    if right.contains(&j) {
                        format!("{cell:>w$}")
                    } else {
                        format!("{cell:<w$}")
                    }
                })
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

/// The step names of a saga, from its `started` record (empty if it cannot be read).
fn step_names(view: &SagaView) -> Vec<String> {
    match view.history.first().map(|r| &r.event) {
        Some(Event::Started { steps, .. }) => steps.clone(),
        _ => Vec::new(),
    }
}

/// The steps in order, a parallel group's branches in brackets:
/// `0 payment, [1 stock | 2 courier], 3 order`.
/// `stages` is the `started` record's (empty without groups).
fn stages_line(names: &[String], stages: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0usize;
    while i < names.len() {
        let stage = stages.get(i);
        let mut j = i + 1;
        while stage.is_some() && stages.get(j) == stage {
            j += 1;
        }
        let labels: Vec<String> = (i..j).map(|k| step_label(names, k as u32)).collect();
        out.push(if labels.len() > 1 {
            format!("[{}]", labels.join(" | "))
        } else {
            labels.join("")
        });
        i = j;
    }
    out.join(", ")
}

/// A step as `show` prints it: its number (counted from 0, what `skip --step` takes
/// too) and its name.
fn step_label(names: &[String], i: u32) -> String {
    match names.get(i as usize) {
        Some(name) => format!("{i} {name}"),
        None => i.to_string(),
    }
}

/// What an active saga waits for: its await step's event, a retry, or the end of a
/// settle window (an attempt of unknown outcome whose request may still land before
/// anything is undone).
fn waiting(m: &SagaMeta) -> String {
    if let Some(a) = &m.awaiting {
        return format!("event `{}` until {}", a.key, a.until);
    }
    match (m.starts_at, m.settling_until, m.due) {
        (Some(t), _, _) => format!("starts at {t}"),
        (None, Some(t), _) => format!("settling until {t}"),
        (None, None, Some(d)) => format!("retry at {d}"),
        (None, None, None) => "-".to_string(),
    }
}

fn print_list(metas: &Vec<SagaMeta>) {
    let now = now();
    // Open drifts get a column only on a page that has some: finished sagas rarely do.
    let drifts = metas.iter().any(|m| m.open_drifts > 0);
    let mut header = vec!["ID", "STATUS", "DEFINITION", "AGE", "IDLE", "WAITING"];
    if drifts {
        header.push("DRIFTS");
    }
    header.push("REASON");
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for m in metas {
        let mut row = vec![
            m.id.to_string(),
            m.status.as_str().to_string(),
            format!("{} v{}", m.definition, m.version),
            human(now.duration_since(m.created_at)),
            human(now.duration_since(m.updated_at)),
            waiting(m),
        ];
        if drifts {
            row.push(match m.open_drifts {
                0 => "-".to_string(),
                n => n.to_string(),
            });
        }
        row.push(m.reason.clone().unwrap_or_default());
        rows.push(row);
    }
    let right: &[usize] = if drifts { &[3, 4, 6] } else { &[3, 4] };
    for line in table(&rows, right) {
        println!("{line}");
    }
    println!("{} saga(s)", metas.len());
}

fn print_show(view: &SagaView) {
    let m = &view.summary;
    let names = step_names(view);
    println!("saga        {}", m.id);
    println!("definition  {} v{}", m.definition, m.version);
    println!("status      {}", m.status);
    if let Some(k) = &m.start_key {
        println!("start key   {k}");
    }
    println!("started     {}", m.created_at);
    println!("updated     {}", m.updated_at);
    match (m.starts_at, m.settling_until, m.due) {
        (Some(t), _, _) => println!("starts at   {t} (a delayed start)"),
        (None, Some(t), _) => {
            println!("waiting     settling until {t} (an attempt may still land)")
        }
        (None, None, Some(d)) => println!("next retry  {d}"),
        (None, None, None) => {}
    }
    if let Some(a) = &m.awaiting {
        println!("waiting     event `{}` until {}", a.key, a.until);
    }
    if let Some(r) = &m.reason {
        println!("reason      {r}");
    }
    let found = view
        .history
        .iter()
        .filter(|r| matches!(r.event, Event::Drift { .. }))
        .count();
    if found > 0 {
        let handled = view
            .history
            .iter()
            .filter(|r| handled_drift(&r.event).is_some())
            .count();
        let open = found.saturating_sub(handled);
        let hint = if open > 0 {
            format!(" (sagaflow drift handle {} LSN --reason ...)", m.id)
        } else {
            String::new()
        };
        println!("drifts      {open} open, {handled} handled{hint}");
    }
    if !names.is_empty() {
        let stages = match view.history.first().map(|r| &r.event) {
            Some(Event::Started { stages, .. }) => stages.clone(),
            _ => Vec::new(),
        };
        println!("steps       {}", stages_line(&names, &stages));
    }
    println!();
    // Records and unreadable values in lsn order, so the damage shows where it is.
    let mut rows: Vec<(Lsn, Vec<String>)> = view
        .problems
        .iter()
        .map(|p| {
            let origin = if p.newer_format {
                "written by a newer engine"
            } else {
                "unreadable"
            };
            (
                p.lsn,
                vec![p.lsn.to_string(), format!("{origin}: {}", p.problem)],
            )
        })
        .collect();
    for r in &view.history {
        let (step, attempt, detail) = describe(m.id, &names, &view.history, r);
        rows.push((
            r.lsn,
            vec![
                r.lsn.to_string(),
                r.at.to_string(),
                r.event.name().to_string(),
                step,
                attempt,
                detail,
            ],
        ));
    }
    rows.sort_by_key(|(lsn, _)| *lsn);
    let header = ["LSN", "TIME", "EVENT", "STEP", "ATTEMPT", "DETAIL"]
        .map(String::from)
        .to_vec();
    let rows: Vec<Vec<String>> = std::iter::once(header)
        .chain(rows.into_iter().map(|(_, row)| row))
        .collect();
    for line in table(&rows, &[0, 4]) {
        println!("{line}");
    }
}

/// The lsn of the drift record an operator marked handled, if `event` is that action.
fn handled_drift(event: &Event) -> Option<Lsn> {
    match event {
        Event::OperatorAction {
            action: Repair::HandleDrift { drift },
            ..
        } => Some(*drift),
        _ => None,
    }
}

/// A record's step, attempt and detail cells in `show`'s timeline; `history` is the
/// whole log, for the records that refer to another (a drift and its handling).
fn describe(
    id: SagaId,
    names: &[String],
    history: &[LogRecord],
    r: &LogRecord,
) -> (String, String, String) {
    let name = |i: u32| step_label(names, i);
    let key = |i: u32, phase: Phase| {
        let step = names
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| i.to_string());
        format!("key {}", IdempotencyKey::derive(id, &step, phase))
    };
    match &r.event {
        Event::Started {
            input, start_key, ..
        } => (
            String::new(),
            String::new(),
            format!(
                "input {input}{}",
                start_key
                    .as_ref()
                    .map_or(String::new(), |k| format!(", start key {k}"))
            ),
        ),
        Event::StepAttemptStarted {
            step,
            attempt,
            deadline,
        } => (
            name(*step),
            attempt.to_string(),
            format!("{}, deadline {deadline}", key(*step, Phase::Action)),
        ),
        Event::StepSucceeded {
            step,
            attempt,
            output,
        } => (name(*step), attempt.to_string(), format!("output {output}")),
        Event::StepFailed {
            step,
            attempt,
            kind,
            error,
            retry_at,
        }
        | Event::CompensationFailed {
            step,
            attempt,
            kind,
            error,
            retry_at,
        } => (
            name(*step),
            attempt.to_string(),
            format!(
                "{kind:?}: {error}; {}",
                retry_at.map_or("no retry".to_string(), |t| format!("retry at {t}"))
            ),
        ),
        Event::CompensationAttemptStarted {
            step,
            attempt,
            deadline,
        } => (
            name(*step),
            attempt.to_string(),
            format!("{}, deadline {deadline}", key(*step, Phase::Compensation)),
        ),
        Event::CompensationSucceeded { step, attempt } => {
            (name(*step), attempt.to_string(), String::new())
        }
        Event::Awaiting { step, attempt, key } => {
            (name(*step), attempt.to_string(), format!("key {key}"))
        }
        Event::EventReceived {
            step,
            attempt,
            delivery,
        } => (
            name(*step),
            attempt.to_string(),
            format!("delivery {delivery}"),
        ),
        Event::CompensationBegan { reason } => (String::new(), String::new(), reason.clone()),
        Event::Parked { reason } => (
            String::new(),
            String::new(),
            format!("{:?}: {}", reason.kind, reason.message),
        ),
        Event::Drift {
            step,
            kind,
            expected,
            detail,
        } => {
            let state = history
                .iter()
                .find(|h| handled_drift(&h.event) == Some(r.lsn))
                .map_or_else(
                    || "open".to_string(),
                    |h| format!("handled at lsn {}", h.lsn),
                );
            (
                name(*step),
                String::new(),
                format!(
                    "{kind} (expected {expected}, {state}): {}",
                    one_line_text(detail, 200)
                ),
            )
        }
        Event::OperatorAction {
            action: Repair::HandleDrift { drift },
            operator,
            reason,
        } => {
            // The step is the drift's: found by the lsn the action names.
            let step = history
                .iter()
                .find(|h| h.lsn == *drift)
                .and_then(|h| match h.event {
                    Event::Drift { step, .. } => Some(name(step)),
                    _ => None,
                })
                .unwrap_or_default();
            (
                step,
                String::new(),
                format!("handle_drift of lsn {drift} by {operator}: {reason}"),
            )
        }
        Event::OperatorAction {
            action,
            operator,
            reason,
        } => {
            let step = r.event.step().map(name).unwrap_or_default();
            (
                step,
                String::new(),
                format!("{} by {operator}: {reason}", action.name()),
            )
        }
        _ => (String::new(), String::new(), String::new()),
    }
}

/// A payload in one line, cut to `max` characters.
fn one_line(v: &serde_json::Value, max: usize) -> String {
    let s = v.to_string();
    if s.chars().count() <= max {
        s
    } else {
        format!("{}...", s.chars().take(max).collect::<String>())
    }
}

/// Free text (a reconcile hook's detail, from another system) in one line of at most
/// `max` characters: control characters (a newline, a terminal escape) are shown
/// escaped, so that they can neither break the table nor drive the terminal.
fn one_line_text(s: &str, max: usize) -> String {
    let mut escaped = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    if escaped.chars().count() <= max {
        escaped
    } else {
        format!("{}...", escaped.chars().take(max).collect::<String>())
    }
}

/// A page of open drifts; a full page ends with the cursor of the next.
fn print_drifts(page: &DriftPage) {
    let mut rows = vec![[
        "SAGA",
        "DEFINITION",
        "STEP",
        "KIND",
        "EXPECTED",
        "FOUND AT",
        "LSN",
        "DETAIL",
    ]
    .map(String::from)
    .to_vec()];
    for e in &page.drifts {
        let d = &e.drift;
        rows.push(vec![
            e.saga.to_string(),
            format!("{} v{}", e.definition, e.version),
            format!("{} {}", d.step, d.step_name),
            d.kind.to_string(),
            d.expected.to_string(),
            d.at.to_string(),
            d.lsn.to_string(),
            one_line_text(&d.detail, 60),
        ]);
    }
    for line in table(&rows, &[6]) {
        println!("{line}");
    }
    let mut sagas: Vec<SagaId> = page.drifts.iter().map(|e| e.saga).collect();
    sagas.dedup();
    println!(
        "{} open drift(s) on {} saga(s)",
        page.drifts.len(),
        sagas.len()
    );
    if let Some(next) = page.next {
        println!("next page: --after {next}");
    }
}

/// A page of the inbox, and the limit it was asked with (a full page may have more
/// after it).
fn print_inbox(page: &[Delivery], limit: usize) {
    let mut rows = vec![["KEY", "ID", "RECEIVED", "TAKEN BY", "PAYLOAD"]
        .map(String::from)
        .to_vec()];
    for d in page {
        rows.push(vec![
            d.key.clone(),
            d.id.clone(),
            d.received_at.to_string(),
            d.taken_by
                .map_or_else(|| "-".to_string(), |s| s.to_string()),
            one_line(&d.payload, 60),
        ]);
    }
    for line in table(&rows, &[]) {
        println!("{line}");
    }
    println!("{} delivery(ies)", page.len());
    if let Some(last) = page.last().filter(|_| page.len() >= limit) {
        println!("next page: --after-key {} --after-id {}", last.key, last.id);
    }
}

fn print_bulk(action: &str, operator: &str, r: &BulkReport) {
    if r.dry_run {
        println!(
            "dry run: {action} would be accepted for {} of the {} sagas matched; {} refused; \
             nothing was written",
            r.applied, r.matched, r.refused_count
        );
        if let Some(c) = r.confirm.filter(|_| r.applied > 0) {
            println!("to apply it to exactly these sagas, run the same command with --confirm {c}");
        }
    } else {
        println!(
            "{action} recorded on {} of the {} sagas matched (by {operator}); {} refused",
            r.applied, r.matched, r.refused_count
        );
    }
    if r.truncated {
        println!(
            "the filter matches more than {}: only those were looked at",
            sagaflow::BULK_MAX
        );
    }
    for (id, why) in &r.refused {
        println!("  {id}  {}", one_line_text(why, 160));
    }
    let unlisted = r.refused_count.saturating_sub(r.refused.len() as u64);
    if unlisted > 0 {
        println!("  and {unlisted} more refused");
    }
}

fn print_stats(s: &Stats) {
    let mut rows = vec![vec!["total".to_string(), s.total.to_string()]];
    for (status, n) in &s.by_status {
        rows.push(vec![format!("  {status}"), n.to_string()]);
    }
    rows.push(vec![
        "waiting for retry".into(),
        s.waiting_for_retry.to_string(),
    ]);
    rows.push(vec!["stuck".into(), s.stuck.to_string()]);
    rows.push(vec![
        "oldest active".into(),
        match s.oldest_active {
            Some((id, age)) => format!("{id} ({})", human(Duration::from_secs(age))),
            None => "-".into(),
        },
    ]);
    for line in table(&rows, &[]) {
        println!("{line}");
    }
    println!("by definition:");
    let rows: Vec<Vec<String>> = s
        .by_definition
        .iter()
        .map(|(d, counts)| {
            let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
            vec![format!("  {d}"), parts.join(", ")]
        })
        .collect();
    for line in table(&rows, &[]) {
        println!("{line}");
    }
}

/// The step `given` means in saga `id`: one of its step names (from its `started`
/// record), or else a step number counted from 0.
async fn resolve_step(backend: &Backend, id: SagaId, given: &str) -> anyhow::Result<u32> {
    let view = backend.show(id).await;
    let names = view.as_ref().map(step_names).unwrap_or_default();
    if let Some(i) = names.iter().position(|n| n == given) {
        return Ok(u32::try_from(i)?);
    }
    if let Ok(n) = given.parse::<u32>() {
        return Ok(n);
    }
    match view {
        Err(e) => Err(e.context(format!("looking up step `{given}` of saga {id}"))),
        Ok(_) if names.is_empty() => Err(anyhow!(
            "saga {id}: its step names cannot be read; give the step's number"
        )),
        Ok(_) => {
            let steps: Vec<String> = (0..names.len() as u32)
                .map(|i| step_label(&names, i))
                .collect();
            Err(anyhow!(
                "saga {id} has no step `{given}`; its steps: {}",
                steps.join(", ")
            ))
        }
    }
}

/// Prints `value` as pretty JSON for scripts, or with `table` for people.
fn emit<T: serde::Serialize>(json: bool, value: &T, table: fn(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        table(value);
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Inbox {
        after_key,
        after_id,
        limit,
    } = &cli.command
    {
        let after = after_key.clone().zip(after_id.clone());
        let page = inbox(&cli, after, *limit).await?;
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&page)?);
        } else {
            print_inbox(&page, *limit);
        }
        return Ok(());
    }
    let backend = Backend::open(&cli)?;
    let repair = |target: &Target, action: &str, step: Option<u32>| {
        (
            target.id,
            RepairRequest {
                action: action.to_string(),
                step,
                drift: None,
                operator: target.operator.clone(),
                reason: target.reason.clone(),
            },
        )
    };
    let request = match &cli.command {
        Command::List {
            status,
            definition,
            older_than,
            stuck_for,
            limit,
            after,
            newest_first,
        } => {
            let q = ListQuery {
                status: status.clone(),
                definition: definition.clone(),
                older_than_secs: older_than.map(|d| d.as_secs()),
                stuck_for_secs: stuck_for.map(|d| d.as_secs()),
                limit: *limit,
                after: after.map(|id| id.to_string()),
                newest_first: newest_first.then_some(true),
            };
            let metas = backend.list(&q).await?;
            return emit(cli.json, &metas, print_list);
        }
        Command::Show { id } => {
            let view = backend.show(*id).await?;
            return emit(cli.json, &view, print_show);
        }
        Command::Stats { stuck_after } => {
            let s = backend.stats(*stuck_after).await?;
            return emit(cli.json, &s, print_stats);
        }
        Command::Retry { target, step } => {
            let step = match step {
                Some(s) => Some(resolve_step(&backend, target.id, s).await?),
                None => None,
            };
            repair(target, "retry_now", step)
        }
        Command::Resume(t) => repair(t, "resume", None),
        Command::Compensate(t) => repair(t, "force_compensate", None),
        Command::Skip { target, step } => {
            let step = resolve_step(&backend, target.id, step).await?;
            repair(target, "skip_step", Some(step))
        }
        Command::Resolve(t) => repair(t, "mark_resolved", None),
        Command::Verify => {
            let Backend::Local(admin) = &backend else {
                return Err(anyhow!(
                    "verify reads a stopped engine's store: give --data-dir, not --url"
                ));
            };
            let v = admin.verify()?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for f in &v.findings {
                    let saga = f.saga.map_or_else(|| "-".to_string(), |s| s.to_string());
                    println!("index    {saga}: {} ({} in the copy)", f.problem, f.action);
                }
                for (id, why) in &v.unfoldable {
                    println!("log      {id}: {why}");
                }
                for (id, why) in &v.disagreeing {
                    println!("summary  {id}: {why}");
                }
                println!(
                    "{} saga(s): {} index finding(s), {} log(s) that do not fold, {} summary(ies) \
                     that disagree with their log",
                    v.sagas,
                    v.findings.len(),
                    v.unfoldable.len(),
                    v.disagreeing.len()
                );
            }
            if !v.is_sound() {
                return Err(anyhow!("the store is not sound"));
            }
            return Ok(());
        }
        Command::Inbox { .. } => unreachable!("answered above"),
        Command::Drift {
            handle: None,
            after,
            limit,
        } => {
            let page = backend.drifts(*after, *limit).await?;
            return emit(cli.json, &page, print_drifts);
        }
        Command::Drift {
            handle: Some(DriftCommand::Handle { target, lsn }),
            ..
        } => {
            let req = RepairRequest {
                action: "handle_drift".to_string(),
                step: None,
                drift: Some(*lsn),
                operator: target.operator.clone(),
                reason: target.reason.clone(),
            };
            let meta = backend.repair(target.id, &req).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&meta)?);
            } else {
                println!(
                    "saga {}: drift at lsn {lsn} marked handled (by {}); {} open drift(s) left \
                     on it",
                    target.id, target.operator, meta.open_drifts
                );
            }
            return Ok(());
        }
        Command::Deliver { key, id, payload } => {
            let req = DeliverRequest {
                key: key.clone(),
                id: id.clone(),
                payload: payload.clone(),
            };
            let d = backend.deliver(&req).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&DeliverResponse { delivered: d })?
                );
            } else if d == Delivered::New {
                println!("delivery {id} to {key}: accepted (durable)");
            } else {
                println!(
                    "delivery {id} to {key}: a duplicate, accepted before; nothing was written"
                );
            }
            return Ok(());
        }
        Command::Approve { target, step } => {
            let req = ApproveRequest {
                step: step.clone(),
                operator: target.operator.clone(),
                reason: target.reason.clone(),
            };
            let d = backend.approve(target.id, &req).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&DeliverResponse { delivered: d })?
                );
            } else if d == Delivered::New {
                println!(
                    "saga {}: approval of step {step} delivered (by {}, durable)",
                    target.id, target.operator
                );
            } else {
                println!(
                    "saga {}: step {step} was approved before; nothing was written",
                    target.id
                );
            }
            return Ok(());
        }
        Command::Bulk {
            action,
            filter,
            confirm,
            reason,
            operator,
        } => {
            let secs = |d: &Option<Duration>| d.map(|d| d.as_secs());
            let req = BulkRequest {
                action: action.name().to_string(),
                status: filter.status.clone(),
                definition: filter.definition.clone(),
                park_kind: filter.park_kind.clone(),
                older_than_secs: secs(&filter.older_than),
                newer_than_secs: secs(&filter.newer_than),
                stuck_for_secs: secs(&filter.stuck_for),
                start_key: filter.start_key.clone(),
                text: filter.text.clone(),
                confirm: confirm.clone(),
                operator: operator.clone(),
                reason: reason.clone(),
            };
            let report: BulkReport = backend.post("/v1/bulk", &req).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_bulk(action.name(), operator, &report);
            }
            return Ok(());
        }
        Command::Cancel(t) => {
            let meta = backend.cancel(t.id, t).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&meta)?);
            } else {
                println!(
                    "saga {}: cancellation recorded (by {}); it compensates and ends cancelled \
                     (offline: once an engine next opens the store)",
                    t.id, t.operator
                );
            }
            return Ok(());
        }
        Command::Purge {
            finished_before,
            yes,
        } => {
            let before = parse_time(finished_before)?;
            let p = backend.purge(before, !*yes).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else if p.dry_run {
                println!(
                    "{} finished saga(s) finished before {before}; dry run, nothing deleted \
                     (add --yes to delete them)",
                    p.matched
                );
            } else {
                println!(
                    "deleted {} finished saga(s) finished before {before}",
                    p.deleted
                );
            }
            return Ok(());
        }
    };
    let (id, req) = request;
    let meta = backend.repair(id, &req).await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&meta)?);
    } else {
        let what = match req.step {
            Some(i) => format!("{} of step {i}", req.action),
            None => req.action.clone(),
        };
        println!(
            "saga {id}: {what} recorded (by {}); status now {}",
            req.operator, meta.status
        );
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if let Some(r) = e.downcast_ref::<Refused>() {
                // The engine's text says it was refused, and why.
                eprintln!("{r}; nothing was written");
                std::process::ExitCode::from(3)
            } else {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_the_same_way_at_every_size() {
        let h = |s: u64| human(Duration::from_secs(s));
        assert_eq!(h(0), "0s");
        assert_eq!(h(59), "59s");
        assert_eq!(h(60), "1m00s");
        assert_eq!(h(114), "1m54s");
        assert_eq!(h(3599), "59m59s");
        assert_eq!(h(2 * 3600 + 3 * 60 + 59), "2h03m");
        assert_eq!(h(86_399), "23h59m");
        assert_eq!(h(3 * 86_400 + 4 * 3600), "3d04h");
        assert_eq!(h(400 * 86_400), "400d00h");
    }

    #[test]
    fn groups_show_in_brackets() {
        let names: Vec<String> = ["pay", "stock", "courier", "order"]
            .map(String::from)
            .into();
        assert_eq!(
            stages_line(&names, &[0, 1, 1, 2]),
            "0 pay, [1 stock | 2 courier], 3 order"
        );
        assert_eq!(
            stages_line(&names, &[]),
            "0 pay, 1 stock, 2 courier, 3 order"
        );
    }

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let rows = vec![
            vec!["N".to_string(), "STEP".into(), "DETAIL".into()],
            vec![
                "1".to_string(),
                "a_rather_long_step_name".into(),
                "x".into(),
            ],
            vec!["12".to_string(), "ü".into(), "y".into()],
            vec!["3".to_string(), "free text that runs on".into()],
        ];
        let lines = table(&rows, &[0]);
        assert_eq!(
            lines,
            [
                " N  STEP                     DETAIL",
                " 1  a_rather_long_step_name  x",
                "12  ü                        y",
                " 3  free text that runs on",
            ]
        );
    }
}
