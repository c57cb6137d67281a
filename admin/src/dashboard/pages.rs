//! The pages: overview, saga list, one saga (with its repairs), bulk; and the handlers of
//! their forms.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Extension, Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use sagaflow::admin::{is_stuck, Activity, Stats};
use sagaflow::machine::{
    check_cancel, check_repair, Event, LogRecord, Progress, Repair, SagaState,
};
use sagaflow::{
    BulkAction, BulkReport, Engine, Error, IdempotencyKey, Phase, SagaId, SagaMeta, SagaStatus,
    StepKind, Timestamp,
};
use serde::Deserialize;

use super::auth::{self, Session};
use super::filter::{park_kind_name, Params};
use super::render::{self, cut, html, json_block, json_line, page, problem, time, Esc, Nav};
use super::Dash;

fn now() -> Timestamp {
    Timestamp::from_millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    )
}

fn engine_problem(session: &Session, e: &Error) -> Response {
    problem(
        crate::error_status(e),
        Some(session),
        "Error",
        &format!("{e} ({})", e.code()),
    )
}

/// Runs engine queries on a blocking thread (a PostgreSQL store reads by round trips),
/// answering an error page if they fail.
async fn blocking<T: Send + 'static>(
    d: &Dash,
    session: &Session,
    f: impl FnOnce(&Engine) -> sagaflow::Result<T> + Send + 'static,
) -> Result<T, Response> {
    let engine = d.engine.clone();
    match tokio::task::spawn_blocking(move || f(&engine)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(engine_problem(session, &e)),
        Err(e) => Err(problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(session),
            "Error",
            &e.to_string(),
        )),
    }
}

fn badge(status: SagaStatus) -> String {
    format!("<span class=\"badge {0}\">{0}</span>", Esc(status.as_str()))
}

fn per_minute(n: u64, window: Duration) -> String {
    let minutes = window.as_secs_f64() / 60.0;
    if minutes <= 0.0 {
        return "0".into();
    }
    format!("{:.1}", n as f64 / minutes)
}

pub(super) async fn overview(
    State(d): State<Dash>,
    Extension(session): Extension<Session>,
) -> Response {
    let (stuck_after, window, buckets) = (
        d.options.stuck_after,
        d.options.activity_window,
        d.options.activity_buckets,
    );
    let (stats, activity) = match blocking(&d, &session, move |e| {
        Ok((e.stats(stuck_after)?, e.activity(window, buckets)?))
    })
    .await
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    let body = overview_body(&stats, &activity, window, stuck_after);
    html(
        StatusCode::OK,
        page("Overview", Some(&session), Nav::Overview, &body),
    )
}

fn overview_body(s: &Stats, a: &Activity, window: Duration, stuck_after: Duration) -> String {
    let count = |st: SagaStatus| s.by_status.get(st.as_str()).copied().unwrap_or(0);
    let mut out = String::from("<h1>Overview</h1><div class=\"cards\">");
    let card = |out: &mut String, label: &str, n: u64, href: &str, class: &str| {
        let _ = write!(
            out,
            "<a class=\"card {class}\" href=\"{href}\"><span class=\"n\">{n}</span><span class=\"l\">{}</span></a>",
            Esc(label)
        );
    };
    card(&mut out, "sagas in all", s.total, "/sagas", "");
    card(
        &mut out,
        "running",
        count(SagaStatus::Running),
        "/sagas?status=running",
        "",
    );
    card(
        &mut out,
        "compensating",
        count(SagaStatus::Compensating),
        "/sagas?status=compensating",
        "",
    );
    let parked = count(SagaStatus::Parked);
    card(
        &mut out,
        "parked: need an operator",
        parked,
        "/sagas?status=parked",
        if parked > 0 { "warn" } else { "" },
    );
    card(
        &mut out,
        &format!("stuck (idle over {})", render::human(stuck_after)),
        s.stuck,
        "/sagas?stuck=on",
        if s.stuck > 0 { "bad" } else { "" },
    );
    card(
        &mut out,
        "waiting for a retry",
        s.waiting_for_retry,
        "/sagas?status=running",
        "",
    );
    out.push_str("</div>");
    if let Some((id, age)) = s.oldest_active {
        let _ = write!(
            out,
            "<p class=\"muted\">Oldest active saga: <a class=\"mono\" href=\"/sagas/{id}\">{id}</a>, started {} ago.</p>",
            render::human(Duration::from_secs(age))
        );
    }

    // Activity.
    let started: u64 = a.started.iter().sum();
    let completed: u64 = a.completed.iter().sum();
    let compensated: u64 = a.compensated.iter().sum();
    let lat = |v: Option<u64>| {
        v.map_or("–".to_string(), |ms| {
            render::human(Duration::from_millis(ms))
        })
    };
    let _ = write!(
        out,
        "<h2>Last {}</h2><p class=\"legend\">\
         <span class=\"started\">■ started {started} ({}/min)</span>\
         <span class=\"completed\">■ completed {completed} ({}/min)</span>\
         <span class=\"compensated\">■ compensated or cancelled {compensated}</span>\
         <span>completion latency p50 {}, p95 {}</span></p>{}",
        render::human(window),
        per_minute(started, window),
        per_minute(completed, window),
        lat(a.p50_ms_all),
        lat(a.p95_ms_all),
        render::activity_chart(a),
    );
    if a.truncated {
        out.push_str(
            "<p class=\"hint\">More sagas than the chart reads: its counts are lower bounds.</p>",
        );
    }

    // By status.
    out.push_str("<h2>By status</h2><table><tr>");
    for st in SagaStatus::ALL {
        let _ = write!(out, "<th class=\"num\">{}</th>", badge(st));
    }
    out.push_str("</tr><tr>");
    for st in SagaStatus::ALL {
        let _ = write!(
            out,
            "<td class=\"num\"><a href=\"/sagas?status={0}\">{1}</a></td>",
            st.as_str(),
            count(st)
        );
    }
    out.push_str("</tr></table>");

    // By definition.
    out.push_str("<h2>By definition</h2>");
    if s.by_definition.is_empty() {
        out.push_str("<p class=\"muted\">No sagas yet.</p>");
    } else {
        out.push_str("<table><tr><th>Definition</th>");
        for st in SagaStatus::ALL {
            let _ = write!(out, "<th class=\"num\">{}</th>", st.as_str());
        }
        out.push_str("</tr>");
        for (def, by) in &s.by_definition {
            let q = render::url_encode(def);
            let _ = write!(
                out,
                "<tr><td><a href=\"/sagas?definition={q}\">{}</a></td>",
                Esc(def)
            );
            for st in SagaStatus::ALL {
                let n = by.get(st.as_str()).copied().unwrap_or(0);
                if n == 0 {
                    out.push_str("<td class=\"num muted\">0</td>");
                } else {
                    let _ = write!(
                        out,
                        "<td class=\"num\"><a href=\"/sagas?definition={q}&amp;status={}\">{n}</a></td>",
                        st.as_str()
                    );
                }
            }
            out.push_str("</tr>");
        }
        out.push_str("</table>");
    }
    out
}

/// What a saga waits for, in words (empty if nothing).
fn waiting(m: &SagaMeta, now: Timestamp) -> String {
    if let Some(t) = m.starts_at {
        return format!("starts {}", time(now, t));
    }
    if let Some(a) = &m.awaiting {
        return format!(
            "event <code>{}</code> until {}",
            Esc(&cut(&a.key, 60)),
            time(now, a.until)
        );
    }
    if let Some(t) = m.settling_until {
        return format!("settling until {}", time(now, t));
    }
    if let Some(t) = m.due {
        return format!("retry {}", time(now, t));
    }
    String::new()
}

pub(super) async fn list(
    State(d): State<Dash>,
    Extension(session): Extension<Session>,
    q: Result<Query<Params>, QueryRejection>,
) -> Response {
    let params = q.map(|Query(p)| p).unwrap_or_default();
    let parsed = params
        .to_filter(d.options.stuck_after)
        .and_then(|f| Ok((f, params.cursor()?)));
    let (filter, after) = match parsed {
        Ok(x) => x,
        Err(e) => {
            let body = list_form(&params, Some(&e));
            return html(
                StatusCode::BAD_REQUEST,
                page("Sagas", Some(&session), Nav::Sagas, &body),
            );
        }
    };
    // The options' fields are public: held to the setter's bounds here too.
    let size = d.options.page_size.clamp(1, 1000);
    let mut filter = filter.newest_first().limit(size + 1);
    if let Some(a) = after {
        filter = filter.after(a);
    }
    let mut metas = match blocking(&d, &session, move |e| e.find(&filter)).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let more = metas.len() > size;
    metas.truncate(size);
    let now = now();
    let mut body = list_form(&params, None);
    if metas.is_empty() {
        body.push_str("<p class=\"muted\">No saga matches.</p>");
    } else {
        body.push_str(
            "<table class=\"sagas\"><tr><th>Saga</th><th>Definition</th><th>Status</th>\
             <th>Started</th><th>Last change</th><th>Waiting</th><th>Reason</th></tr>",
        );
        for m in &metas {
            let mut status = badge(m.status);
            if let Some(k) = m.park_kind {
                let _ = write!(
                    status,
                    " <span class=\"muted\">{}</span>",
                    Esc(&park_kind_name(k))
                );
            }
            if is_stuck(m, now, d.options.stuck_after) {
                status.push_str(" <span class=\"badge parked\">stuck</span>");
            }
            if m.open_drifts > 0 {
                let _ = write!(
                    status,
                    " <span class=\"badge parked\">{} drift</span>",
                    m.open_drifts
                );
            }
            let _ = write!(
                body,
                "<tr><td><a class=\"mono\" href=\"/sagas/{id}\">{id}</a>{key}</td><td>{def} v{v}</td>\
                 <td>{status}</td><td>{created}</td><td>{updated}</td><td>{waiting}</td><td>{reason}</td></tr>",
                id = m.id,
                key = m.start_key.as_ref().map_or(String::new(), |k| format!(
                    "<br><span class=\"muted\">key {}</span>",
                    Esc(&cut(k.as_str(), 40))
                )),
                def = Esc(&m.definition),
                v = m.version,
                created = time(now, m.created_at),
                updated = time(now, m.updated_at),
                waiting = waiting(m, now),
                reason = Esc(&cut(m.reason.as_deref().unwrap_or(""), 160)),
            );
        }
        body.push_str("</table>");
    }
    let query = params.query();
    let amp = if query.is_empty() { "" } else { "&amp;" };
    body.push_str("<div class=\"pager\">");
    if after.is_some() {
        let _ = write!(body, "<a href=\"/sagas?{query}\">← Newest</a>");
    }
    if let (true, Some(last)) = (more, metas.last()) {
        let _ = write!(
            body,
            "<a href=\"/sagas?{query}{amp}after={}\" rel=\"next\">Older →</a>",
            last.id
        );
    }
    body.push_str("</div>");
    html(
        StatusCode::OK,
        page("Sagas", Some(&session), Nav::Sagas, &body),
    )
}

fn list_form(params: &Params, error: Option<&str>) -> String {
    let mut out = String::from("<h1>Sagas</h1>");
    if let Some(e) = error {
        let _ = write!(out, "<p class=\"flash error\">{}</p>", Esc(e));
    }
    let q = params.query();
    let _ = write!(
        out,
        "<form method=\"get\" action=\"/sagas\" class=\"box\" id=\"filter\">{}\
         <div class=\"actions\"><button type=\"submit\">Filter</button>\
         <a href=\"/sagas\">Clear</a><a href=\"/bulk?{}\">Bulk repair of these…</a></div></form>\
         <p class=\"hint\">Newest first.</p>",
        params.inputs(),
        Esc(&q),
    );
    out
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct Flash {
    done: Option<String>,
}

pub(super) async fn saga(
    State(d): State<Dash>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    flash: Result<Query<Flash>, QueryRejection>,
) -> Response {
    let Ok(id) = id.parse::<SagaId>() else {
        return no_such_saga(&session);
    };
    let read = blocking(&d, &session, move |e| {
        let meta = e.status(id)?;
        let log = e.readable_log(id)?;
        // Folded from the records just read, rather than read again: a log with a
        // problem (a value that does not decode, a record that does not fit) has no
        // state, as `Engine::state` would refuse it.
        let state = log
            .problems
            .is_empty()
            .then(|| SagaState::fold(id, &log.records).ok())
            .flatten();
        Ok((meta, log, state))
    })
    .await;
    let (meta, log, state) = match read {
        Ok(x) => x,
        Err(r) => return r,
    };
    let now = now();
    let words = &d.options.redact;
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>Saga <span class=\"mono\">{id}</span> {}</h1>",
        badge(meta.status)
    );
    // Said only when the log's latest operator record is that action by this operator:
    // a link cannot make the page claim a repair nobody made.
    let latest = log.records.iter().rev().find_map(|r| match &r.event {
        Event::OperatorAction {
            action, operator, ..
        } => Some((action.name(), operator.as_str())),
        Event::CancelRequested { operator, .. } => Some(("cancel", operator.as_str())),
        _ => None,
    });
    let done = flash
        .ok()
        .and_then(|Query(f)| f.done)
        .filter(|d| latest == Some((d.as_str(), session.operator.as_str())));
    if let Some(done) = done {
        let _ = write!(
            body,
            "<p class=\"flash\">Recorded: {} by {}. <a href=\"/sagas/{id}\">Reload</a> to follow the saga.</p>",
            Esc(&done),
            Esc(&session.operator)
        );
    }
    body.push_str(&summary(&meta, state.as_ref(), now));

    // Repairs first: what an operator came for.
    body.push_str("<h2>Repairs that apply now</h2>");
    let offers = offered(&meta, state.as_ref());
    body.push_str(&repairs(id, &offers, &session));

    // The started record names the steps even when the log does not fold.
    let (names, input) = match log.records.first().map(|r| &r.event) {
        Some(Event::Started { steps, input, .. }) => (steps.clone(), Some(input.clone())),
        _ => (Vec::new(), None),
    };
    if let Some(st) = &state {
        body.push_str("<h2>Steps</h2>");
        body.push_str(&steps_table(id, st, words));
    }
    body.push_str("<h2>Input</h2>");
    match input {
        Some(v) => body.push_str(&json_block(&v, words)),
        None => body.push_str("<p class=\"muted\">The started record could not be read.</p>"),
    }
    body.push_str("<h2 id=\"timeline\">Timeline</h2>");
    body.push_str(&timeline(id, &log.records, &names, words));
    if !log.problems.is_empty() {
        body.push_str(
            "<h2>What could not be read</h2><table><tr><th>lsn</th><th>problem</th></tr>",
        );
        for p in &log.problems {
            let _ = write!(
                body,
                "<tr><td class=\"num\">{}</td><td>{}{}</td></tr>",
                p.lsn,
                Esc(&p.problem),
                if p.newer_format {
                    " (written by a newer engine)"
                } else {
                    ""
                }
            );
        }
        body.push_str("</table>");
    }
    html(
        StatusCode::OK,
        page(&format!("Saga {id}"), Some(&session), Nav::Sagas, &body),
    )
}

fn summary(m: &SagaMeta, state: Option<&SagaState>, now: Timestamp) -> String {
    let mut out = String::from("<section class=\"box\"><dl class=\"summary\">");
    let mut row = |k: &str, v: String| {
        let _ = write!(out, "<dt>{}</dt><dd>{v}</dd>", Esc(k));
    };
    row(
        "Definition",
        format!("{} v{}", Esc(&m.definition), m.version),
    );
    let mut status = badge(m.status);
    if let Some(k) = m.park_kind {
        let _ = write!(status, " {}", Esc(&park_kind_name(k)));
    }
    row("Status", status);
    if let Some(r) = &m.reason {
        row("Reason", Esc(r).to_string());
    }
    if let Some(k) = &m.start_key {
        row("Start key", format!("<code>{}</code>", Esc(k.as_str())));
    }
    row(
        "Started",
        format!(
            "{} <span class=\"muted\">{}</span>",
            time(now, m.created_at),
            m.created_at
        ),
    );
    row(
        "Last change",
        format!(
            "{} <span class=\"muted\">{}</span>",
            time(now, m.updated_at),
            m.updated_at
        ),
    );
    if let Some(t) = m.finished_at {
        row(
            "Finished",
            format!(
                "{} <span class=\"muted\">after {}</span>",
                time(now, t),
                render::human(t.duration_since(m.created_at))
            ),
        );
    }
    let w = waiting(m, now);
    if !w.is_empty() {
        row("Waiting", w);
    }
    if let Some(s) = state {
        if let Some(t) = s.deadline {
            row("Deadline", time(now, t));
        }
        if let Some((who, why)) = &s.cancellation {
            row("Cancelled by", format!("{}: {}", Esc(who), Esc(why)));
        }
        if let Some((who, why)) = &s.resolution {
            row("Resolved by", format!("{}: {}", Esc(who), Esc(why)));
        }
    }
    if m.open_drifts > 0 {
        row("Open drifts", m.open_drifts.to_string());
    }
    out.push_str("</dl></section>");
    out
}

/// One repair a saga accepts now, as a form.
struct Offer {
    /// `repair` or `cancel`: the form's endpoint.
    endpoint: &'static str,
    repair: Option<Repair>,
    label: String,
    hint: &'static str,
    danger: bool,
}

fn step_name(state: &SagaState, i: u32) -> String {
    state
        .steps
        .get(i as usize)
        .map_or_else(|| format!("step {i}"), |s| s.name.clone())
}

/// The repairs `check_repair` and `check_cancel` accept for this saga now: no others.
/// A saga whose log does not fold (parked, corrupt) can only be resolved.
fn offered(meta: &SagaMeta, state: Option<&SagaState>) -> Vec<Offer> {
    let mut out = Vec::new();
    let offer = |repair: Repair, label: String, hint: &'static str, danger: bool| Offer {
        endpoint: "repair",
        repair: Some(repair),
        label,
        hint,
        danger,
    };
    let Some(state) = state else {
        if meta.status == SagaStatus::Parked {
            out.push(offer(
                Repair::MarkResolved,
                "Mark resolved".into(),
                "Its log cannot be read to the end: settle it by hand, then record that here.",
                true,
            ));
        }
        return out;
    };
    let ok = |r: &Repair| check_repair(state, r).is_ok();
    let steps = 0..u32::try_from(state.steps.len()).unwrap_or(u32::MAX);
    if ok(&Repair::Resume) {
        out.push(offer(
            Repair::Resume,
            "Resume".into(),
            "Take it up where it stopped, with one more attempt for what failed.",
            false,
        ));
    }
    let retries: Vec<u32> = steps
        .clone()
        .filter(|&i| ok(&Repair::RetryNow { step: Some(i) }))
        .collect();
    for &i in &retries {
        out.push(offer(
            Repair::RetryNow { step: Some(i) },
            format!("Retry `{}` now", step_name(state, i)),
            "Run the retry it waits for now instead of at its time.",
            false,
        ));
    }
    if retries.len() != 1 && ok(&Repair::RetryNow { step: None }) {
        out.push(offer(
            Repair::RetryNow { step: None },
            "Retry now".into(),
            "Run every retry the current stage waits for now.",
            false,
        ));
    }
    for i in steps {
        if ok(&Repair::SkipStep { step: i }) {
            out.push(offer(
                Repair::SkipStep { step: i },
                format!("Skip `{}`", step_name(state, i)),
                "Count it as done: you did it by hand.",
                true,
            ));
        }
    }
    if ok(&Repair::ForceCompensate) {
        out.push(offer(
            Repair::ForceCompensate,
            "Compensate".into(),
            "Stop going forward and undo every step that may have taken effect.",
            true,
        ));
    }
    if check_cancel(state).is_ok() {
        out.push(Offer {
            endpoint: "cancel",
            repair: None,
            label: "Cancel".into(),
            hint: "Compensate on request: it ends cancelled.",
            danger: true,
        });
    }
    for drift in state.drifts.iter().filter(|d| d.handled.is_none()) {
        let r = Repair::HandleDrift { drift: drift.lsn };
        if ok(&r) {
            out.push(offer(
                r,
                format!(
                    "Mark drift at lsn {} handled ({} `{}`)",
                    drift.lsn, drift.kind, drift.step_name
                ),
                "You dealt with what the reconciler found.",
                false,
            ));
        }
    }
    if ok(&Repair::MarkResolved) {
        out.push(offer(
            Repair::MarkResolved,
            "Mark resolved".into(),
            "You settled it by hand: the engine stops driving it.",
            true,
        ));
    }
    out
}

fn repairs(id: SagaId, offers: &[Offer], session: &Session) -> String {
    if offers.is_empty() {
        return "<p class=\"muted\">None: no repair applies to this saga in its state.</p>".into();
    }
    if !session.is_admin() {
        let names: Vec<String> = offers.iter().map(|o| Esc(&o.label).to_string()).collect();
        return format!(
            "<p>{}.</p><p class=\"hint\">You are logged in with the read-only token: repairs need the admin token.</p>",
            names.join(" · ")
        );
    }
    let mut out = String::from("<div class=\"repairs\">");
    for o in offers {
        let (name, step, drift) = match &o.repair {
            Some(r) => {
                let (step, drift) = match r {
                    Repair::RetryNow { step } => (*step, None),
                    Repair::SkipStep { step } => (Some(*step), None),
                    Repair::HandleDrift { drift } => (None, Some(drift.0)),
                    _ => (None, None),
                };
                (r.name(), step, drift)
            }
            None => ("cancel", None, None),
        };
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/sagas/{id}/{}\" data-repair=\"{name}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <input type=\"hidden\" name=\"action\" value=\"{name}\">",
            o.endpoint,
            Esc(&session.csrf)
        );
        if let Some(s) = step {
            let _ = write!(out, "<input type=\"hidden\" name=\"step\" value=\"{s}\">");
        }
        if let Some(l) = drift {
            let _ = write!(out, "<input type=\"hidden\" name=\"drift\" value=\"{l}\">");
        }
        let _ = write!(
            out,
            "<p><strong>{label}</strong> <span class=\"hint\">{hint}</span></p>\
             <div class=\"row\"><input name=\"reason\" required maxlength=\"2000\" \
             placeholder=\"Why (required)\" aria-label=\"Reason\">\
             <button type=\"submit\"{class}>{label}</button></div></form>",
            label = Esc(&o.label),
            hint = Esc(o.hint),
            class = if o.danger { " class=\"danger\"" } else { "" },
        );
    }
    out.push_str("</div>");
    out
}

fn kind_name(k: StepKind) -> &'static str {
    match k {
        StepKind::Compensatable => "compensatable",
        StepKind::Pivot => "pivot",
        StepKind::Retriable => "retriable",
        _ => "other",
    }
}

fn progress(p: &Progress, now: Timestamp) -> String {
    match p {
        Progress::NotStarted => "<span class=\"muted\">not started</span>".into(),
        Progress::InFlight { attempt } => format!("attempt {attempt} in flight"),
        Progress::Succeeded { attempt } => format!("succeeded (attempt {attempt})"),
        Progress::Failed {
            attempt,
            kind,
            error,
            retry_at,
        } => format!(
            "failed, attempt {attempt}: {} <code>{}</code>{}",
            Esc(&format!("{kind:?}").to_lowercase()),
            Esc(&cut(error, 200)),
            retry_at.map_or("; no more attempts".to_string(), |t| format!(
                "; retry {}",
                time(now, t)
            ))
        ),
    }
}

fn steps_table(id: SagaId, st: &SagaState, words: &[String]) -> String {
    let now = now();
    // A stage column only when some steps share one (a parallel group).
    let grouped = st.stages.windows(2).any(|w| w[0] == w[1]);
    let mut out = String::from("<table class=\"steps\"><tr><th>#</th><th>Step</th><th>Kind</th>");
    if grouped {
        out.push_str("<th>Stage</th>");
    }
    out.push_str(
        "<th>Action</th><th>Compensation</th><th>Idempotency keys</th><th>Output</th></tr>",
    );
    for (i, s) in st.steps.iter().enumerate() {
        let kind = st.kinds.get(i).copied();
        let _ = write!(
            out,
            "<tr><td class=\"num\">{i}</td><td>{}</td><td>{}</td>",
            Esc(&s.name),
            kind.map_or("", kind_name)
        );
        if grouped {
            let _ = write!(
                out,
                "<td class=\"num\">{}</td>",
                st.stages.get(i).copied().unwrap_or(0)
            );
        }
        let action_key = IdempotencyKey::derive(id, &s.name, Phase::Action);
        let mut keys = format!("<code>{}</code>", Esc(action_key.as_str()));
        let compensatable = kind.is_none_or(|k| k == StepKind::Compensatable);
        if compensatable {
            let _ = write!(
                keys,
                "<br><code>{}</code>",
                Esc(IdempotencyKey::derive(id, &s.name, Phase::Compensation).as_str())
            );
        }
        let output = s.output.as_ref().map_or(String::new(), |o| {
            format!(
                "<details><summary>{}</summary>{}</details>",
                json_line(o, words, 60),
                json_block(o, words)
            )
        });
        let _ = write!(
            out,
            "<td>{}</td><td>{}</td><td>{keys}</td><td>{output}</td></tr>",
            progress(&s.action, now),
            if compensatable {
                progress(&s.compensation, now)
            } else {
                "<span class=\"muted\">–</span>".into()
            },
        );
    }
    out.push_str("</table>");
    out
}

/// The log as a table: every transition with its time, its offset from the start, the
/// step, what happened and the details (attempt durations, keys, errors, retries,
/// waits, who and why).
fn timeline(id: SagaId, records: &[LogRecord], names: &[String], words: &[String]) -> String {
    let start = records.first().map_or(Timestamp::EPOCH, |r| r.at);
    let name = |i: u32| {
        names
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| format!("step {i}"))
    };
    // When each attempt started and its deadline, by (phase, step, attempt).
    let mut attempts: HashMap<(Phase, u32, u32), (Timestamp, Timestamp)> = HashMap::new();
    let since = |attempts: &HashMap<(Phase, u32, u32), (Timestamp, Timestamp)>,
                 key: (Phase, u32, u32),
                 at: Timestamp| {
        attempts.get(&key).map_or(String::new(), |(t, _)| {
            format!("after {}", render::human(at.duration_since(*t)))
        })
    };
    let mut out = String::from(
        "<table class=\"timeline\"><tr><th class=\"num\">lsn</th><th>time (UTC)</th><th class=\"num\">+</th>\
         <th>step</th><th>what</th><th>details</th></tr>",
    );
    for r in records {
        let at = r.at;
        let mut class = "";
        let step = r.event.step().map(name).unwrap_or_default();
        let (what, details) = match &r.event {
            Event::Started {
                definition,
                version,
                steps,
                start_key,
                deadline,
                not_before,
                ..
            } => {
                let mut d = format!("{} v{version}, {} steps", Esc(definition), steps.len());
                if let Some(k) = start_key {
                    let _ = write!(d, "; start key <code>{}</code>", Esc(k.as_str()));
                }
                if let Some(t) = deadline {
                    let _ = write!(d, "; deadline {t}");
                }
                if let Some(t) = not_before {
                    let _ = write!(d, "; not before {t}");
                }
                ("started".to_string(), d)
            }
            Event::StepAttemptStarted {
                step: s,
                attempt,
                deadline,
            }
            | Event::CompensationAttemptStarted {
                step: s,
                attempt,
                deadline,
            } => {
                let phase = if matches!(r.event, Event::StepAttemptStarted { .. }) {
                    Phase::Action
                } else {
                    Phase::Compensation
                };
                attempts.insert((phase, *s, attempt.0), (at, *deadline));
                let key = IdempotencyKey::derive(id, &name(*s), phase);
                let what = match phase {
                    Phase::Action => format!("attempt {attempt} started"),
                    Phase::Compensation => format!("compensation attempt {attempt} started"),
                };
                (
                    what,
                    format!(
                        "key <code>{}</code>; deadline {} later",
                        Esc(key.as_str()),
                        render::human(deadline.duration_since(at))
                    ),
                )
            }
            Event::StepSucceeded {
                step: s,
                attempt,
                output,
            } => {
                class = "ev-done";
                (
                    format!("attempt {attempt} succeeded"),
                    format!(
                        "{}; output {}",
                        since(&attempts, (Phase::Action, *s, attempt.0), at),
                        json_line(output, words, 160)
                    ),
                )
            }
            Event::CompensationSucceeded { step: s, attempt } => {
                class = "ev-done";
                (
                    format!("compensation attempt {attempt} succeeded"),
                    since(&attempts, (Phase::Compensation, *s, attempt.0), at),
                )
            }
            Event::StepFailed {
                step: s,
                attempt,
                kind,
                error,
                retry_at,
            }
            | Event::CompensationFailed {
                step: s,
                attempt,
                kind,
                error,
                retry_at,
            } => {
                class = "ev-failed";
                let phase = if matches!(r.event, Event::StepFailed { .. }) {
                    Phase::Action
                } else {
                    Phase::Compensation
                };
                let what = match phase {
                    Phase::Action => format!("attempt {attempt} failed"),
                    Phase::Compensation => format!("compensation attempt {attempt} failed"),
                };
                let next = match retry_at {
                    Some(t) => format!(
                        "retry at {t} ({} later)",
                        render::human(t.duration_since(at))
                    ),
                    None => "no more attempts".into(),
                };
                (
                    what,
                    format!(
                        "{}; {}: <code>{}</code>; {next}",
                        since(&attempts, (phase, *s, attempt.0), at),
                        Esc(&format!("{kind:?}").to_lowercase()),
                        Esc(error)
                    ),
                )
            }
            Event::CompensationBegan { reason } => {
                class = "ev-failed";
                ("compensation began".into(), Esc(reason).to_string())
            }
            Event::Awaiting {
                step: s,
                attempt,
                key,
            } => {
                let until = attempts
                    .get(&(Phase::Action, *s, attempt.0))
                    .map_or(String::new(), |(_, d)| format!(" until {d}"));
                (
                    "waiting for an event".into(),
                    format!("key <code>{}</code>{until}", Esc(key)),
                )
            }
            Event::EventReceived {
                step: s,
                attempt,
                delivery,
            } => (
                "event received".into(),
                format!(
                    "delivery <code>{}</code>, {} of waiting",
                    Esc(delivery),
                    attempts
                        .get(&(Phase::Action, *s, attempt.0))
                        .map_or(String::new(), |(t, _)| render::human(at.duration_since(*t)))
                ),
            ),
            Event::Completed => {
                class = "ev-done";
                (
                    "completed".into(),
                    format!("after {}", render::human(at.duration_since(start))),
                )
            }
            Event::Compensated => {
                class = "ev-done";
                (
                    "compensated".into(),
                    format!("after {}", render::human(at.duration_since(start))),
                )
            }
            Event::Cancelled => {
                class = "ev-done";
                ("cancelled".into(), String::new())
            }
            Event::CancelRequested { operator, reason } => {
                class = "ev-operator";
                (
                    "cancel requested".into(),
                    format!("by <strong>{}</strong>: {}", Esc(operator), Esc(reason)),
                )
            }
            Event::Parked { reason } => {
                class = "ev-parked";
                (
                    format!("parked ({})", park_kind_name(reason.kind)),
                    Esc(&reason.message).to_string(),
                )
            }
            Event::Drift {
                kind,
                expected,
                detail,
                ..
            } => {
                class = "ev-failed";
                (
                    format!("drift: {kind}"),
                    format!("expected {expected}; found: {}", Esc(detail)),
                )
            }
            Event::OperatorAction {
                action,
                operator,
                reason,
            } => {
                class = "ev-operator";
                let target = match action {
                    Repair::HandleDrift { drift } => format!(" (drift at lsn {drift})"),
                    _ => String::new(),
                };
                (
                    format!("operator: {}{target}", action.name()),
                    format!("by <strong>{}</strong>: {}", Esc(operator), Esc(reason)),
                )
            }
            other => (other.name().to_string(), String::new()),
        };
        let clock = at.to_string();
        let _ = write!(
            out,
            "<tr class=\"{class}\"><td class=\"num\">{}</td><td class=\"mono\" title=\"{clock}\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{details}</td></tr>",
            r.lsn,
            Esc(clock.get(11..23).unwrap_or(&clock)),
            render::human(at.duration_since(start)),
            Esc(&step),
            Esc(&what),
        );
    }
    out.push_str("</table>");
    out
}

/// The form of one repair.
#[derive(Debug, Deserialize)]
pub(super) struct RepairForm {
    #[serde(default)]
    action: String,
    step: Option<String>,
    drift: Option<String>,
    #[serde(default)]
    reason: String,
}

fn number<T: std::str::FromStr>(field: &str, v: Option<&str>) -> Result<Option<T>, String> {
    v.map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("`{field}` must be a number")))
        .transpose()
}

fn no_such_saga(session: &Session) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        Some(session),
        "No such saga",
        "That is not a saga id.",
    )
}

pub(super) async fn repair(
    State(d): State<Dash>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    form: Result<Form<RepairForm>, FormRejection>,
) -> Response {
    let Ok(id) = id.parse::<SagaId>() else {
        return no_such_saga(&session);
    };
    let Ok(Form(form)) = form else {
        return problem(
            StatusCode::BAD_REQUEST,
            Some(&session),
            "Repair refused",
            "The form could not be read.",
        );
    };
    let reason = form.reason.trim();
    if reason.is_empty() {
        return problem(
            StatusCode::BAD_REQUEST,
            Some(&session),
            "Repair refused",
            "A reason is required: it is recorded in the saga's log.",
        );
    }
    let refused = |e: &str| problem(StatusCode::BAD_REQUEST, Some(&session), "Repair refused", e);
    let request = match (
        number("step", form.step.as_deref()),
        number("drift", form.drift.as_deref()),
    ) {
        (Ok(step), Ok(drift)) => crate::RepairRequest {
            action: form.action.clone(),
            step,
            drift,
            operator: session.operator.clone(),
            reason: reason.to_string(),
        },
        (Err(e), _) | (_, Err(e)) => return refused(&e),
    };
    let action = match request.to_repair() {
        Ok(a) => a,
        Err(e) => return refused(&e),
    };
    tracing::info!(saga = %id, action = action.name(), operator = %session.operator, "dashboard: repair");
    match d
        .engine
        .repair(id, action.clone(), &request.operator, &request.reason)
        .await
    {
        Ok(_) => auth::see_other(&format!("/sagas/{id}?done={}", action.name()), None),
        Err(e) => engine_problem(&session, &e),
    }
}

pub(super) async fn cancel(
    State(d): State<Dash>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    form: Result<Form<RepairForm>, FormRejection>,
) -> Response {
    let Ok(id) = id.parse::<SagaId>() else {
        return no_such_saga(&session);
    };
    let reason = form.map(|Form(f)| f.reason).unwrap_or_default();
    let reason = reason.trim();
    if reason.is_empty() {
        return problem(
            StatusCode::BAD_REQUEST,
            Some(&session),
            "Cancellation refused",
            "A reason is required: it is recorded in the saga's log.",
        );
    }
    tracing::info!(saga = %id, operator = %session.operator, "dashboard: cancel");
    match d.engine.cancel(id, &session.operator, reason).await {
        Ok(_) => auth::see_other(&format!("/sagas/{id}?done=cancel"), None),
        Err(e) => engine_problem(&session, &e),
    }
}

const ACTIONS: [BulkAction; 4] = [
    BulkAction::Retry,
    BulkAction::Resume,
    BulkAction::Compensate,
    BulkAction::Resolve,
];

fn bulk_page(session: &Session, params: &Params, error: Option<&str>) -> String {
    let mut out = String::from(
        "<h1>Bulk repair</h1><p class=\"hint\">One repair applied to every saga the filter matches \
         (at most 10 000, oldest first), each checked on its own and recorded in its own log with your \
         name and the reason. A dry run counts them first; nothing is written until you confirm.</p>",
    );
    if let Some(e) = error {
        let _ = write!(out, "<p class=\"flash error\">{}</p>", Esc(e));
    }
    if !session.is_admin() {
        out.push_str("<p class=\"flash error\">You are logged in with the read-only token: bulk repairs need the admin token.</p>");
    }
    let chosen = params.action.as_deref().unwrap_or("");
    let _ = write!(
        out,
        "<form method=\"post\" action=\"/bulk\" class=\"box\" id=\"bulk\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">{}\
         <div class=\"actions\"><label>Action <select name=\"action\">",
        Esc(&session.csrf),
        params.inputs()
    );
    for a in ACTIONS {
        let sel = if chosen == a.name() { " selected" } else { "" };
        let _ = write!(out, "<option value=\"{0}\"{sel}>{0}</option>", a.name());
    }
    let _ = write!(
        out,
        "</select></label><label>Reason <input name=\"reason\" required maxlength=\"2000\" size=\"40\" value=\"{}\"></label>\
         <button type=\"submit\">Dry run</button></div></form>",
        Esc(params.reason.as_deref().unwrap_or(""))
    );
    out
}

pub(super) async fn bulk_form(
    Extension(session): Extension<Session>,
    q: Result<Query<Params>, QueryRejection>,
) -> Response {
    let params = q.map(|Query(p)| p).unwrap_or_default();
    let body = bulk_page(&session, &params, None);
    html(
        StatusCode::OK,
        page("Bulk repair", Some(&session), Nav::Bulk, &body),
    )
}

pub(super) async fn bulk(
    State(d): State<Dash>,
    Extension(session): Extension<Session>,
    form: Result<Form<Params>, FormRejection>,
) -> Response {
    let params = form.map(|Form(p)| p).unwrap_or_default();
    let refuse = |e: &str| {
        html(
            StatusCode::BAD_REQUEST,
            page(
                "Bulk repair",
                Some(&session),
                Nav::Bulk,
                &bulk_page(&session, &params, Some(e)),
            ),
        )
    };
    let filter = match params.to_filter(d.options.stuck_after) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    let action: BulkAction = match params.action.as_deref().unwrap_or("").parse() {
        Ok(a) => a,
        Err(e) => return refuse(&e),
    };
    let reason = params.reason.as_deref().unwrap_or("").trim().to_string();
    if reason.is_empty() {
        return refuse("A reason is required: it is recorded in each saga's log.");
    }
    // No confirmation: a dry run. With one: exactly the sagas that dry run matched.
    let confirm: Option<sagaflow::BulkConfirm> = match params.confirm.as_deref().map(str::parse) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => return refuse(&e),
    };
    let dry_run = confirm.is_none();
    tracing::info!(action = action.name(), dry_run, operator = %session.operator, "dashboard: bulk repair");
    // On a task of its own: a browser that gives up waiting must not stop it half way.
    let engine = d.engine.clone();
    let operator = session.operator.clone();
    let why = reason.clone();
    let run =
        tokio::spawn(async move { engine.bulk(&filter, action, confirm, &operator, &why).await });
    let report = match run.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return engine_problem(&session, &e),
        Err(e) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                Some(&session),
                "Error",
                &e.to_string(),
            )
        }
    };
    let body = bulk_report(&session, &params, action, &reason, &report);
    html(
        StatusCode::OK,
        page("Bulk repair", Some(&session), Nav::Bulk, &body),
    )
}

fn bulk_report(
    session: &Session,
    params: &Params,
    action: BulkAction,
    reason: &str,
    r: &BulkReport,
) -> String {
    let q = params.query();
    let mut out = format!(
        "<h1>Bulk repair: {}</h1><section class=\"box\" id=\"report\"><dl class=\"summary\">\
         <dt>Action</dt><dd>{}</dd><dt>Filter</dt><dd>{} <a href=\"/sagas?{}\">see them</a></dd>\
         <dt>Reason</dt><dd>{}</dd><dt>Matched</dt><dd class=\"matched\">{}</dd>\
         <dt>{}</dt><dd class=\"applied\">{}</dd><dt>Refused</dt><dd>{}</dd></dl>",
        if r.dry_run { "dry run" } else { "applied" },
        action.name(),
        if params.any() {
            format!("<code>{}</code>", Esc(&q))
        } else {
            "none: every saga".into()
        },
        Esc(&q),
        Esc(reason),
        r.matched,
        if r.dry_run {
            "Would apply now"
        } else {
            "Applied"
        },
        r.applied,
        r.refused_count,
    );
    if r.truncated {
        let _ = write!(
            out,
            "<p class=\"flash error\">The filter matches more than {}: only those were looked at.</p>",
            sagaflow::BULK_MAX
        );
    }
    out.push_str("</section>");
    if let (true, true, true, Some(confirm)) =
        (r.dry_run, r.applied > 0, session.is_admin(), r.confirm)
    {
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/bulk\" class=\"box\" id=\"confirm\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">{}\
             <input type=\"hidden\" name=\"action\" value=\"{}\">\
             <input type=\"hidden\" name=\"reason\" value=\"{}\">\
             <input type=\"hidden\" name=\"confirm\" value=\"{}\">\
             <p>Confirmed, it applies to exactly the sagas counted here: if the filter matches any other by then, nothing is done and you see a new dry run.</p>\
             <button type=\"submit\" class=\"danger\">Apply {} to {} {}</button> \
             <a href=\"/bulk?{}&amp;action={}&amp;reason={}\">Change it</a></form>",
            Esc(&session.csrf),
            params.hidden(),
            action.name(),
            Esc(reason),
            Esc(&confirm.to_string()),
            action.name(),
            r.applied,
            if r.applied == 1 { "saga" } else { "sagas" },
            Esc(&q),
            action.name(),
            Esc(&render::url_encode(reason)),
        );
    } else if r.dry_run {
        out.push_str("<p class=\"muted\">Nothing to apply.</p>");
    }
    if !r.refused.is_empty() {
        out.push_str("<h2>Refused</h2><table><tr><th>Saga</th><th>Why</th></tr>");
        for (id, why) in &r.refused {
            let _ = write!(
                out,
                "<tr><td><a class=\"mono\" href=\"/sagas/{id}\">{id}</a></td><td>{}</td></tr>",
                Esc(why)
            );
        }
        out.push_str("</table>");
        if r.refused_count > r.refused.len() as u64 {
            let _ = write!(
                out,
                "<p class=\"muted\">and {} more.</p>",
                r.refused_count - r.refused.len() as u64
            );
        }
    }
    out
}

/// Any other path: 401 without a session, like every page, else 404.
pub(super) async fn not_found(State(d): State<Dash>, headers: HeaderMap) -> Response {
    match d.session_of(&headers) {
        None => auth::login_form(StatusCode::UNAUTHORIZED, "/", None),
        Some(s) => problem(
            StatusCode::NOT_FOUND,
            Some(&s),
            "Not found",
            "There is no such page.",
        ),
    }
}
