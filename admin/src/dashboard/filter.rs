//! The filter the saga list and the bulk page share: read from a query string or a form,
//! turned into the engine's [`ListFilter`], and written back as form fields, hidden
//! fields and links.

use std::fmt::Write as _;
use std::time::Duration;

use sagaflow::admin::ListFilter;
use sagaflow::{ParkKind, SagaId, SagaStatus};
use serde::Deserialize;

use super::render::{url_encode, Esc};

/// Every field the list's GET form and the bulk POST form send. Browsers send empty
/// fields as empty strings: those mean "any".
#[derive(Clone, Debug, Default, Deserialize)]
pub(super) struct Params {
    pub(super) status: Option<String>,
    pub(super) definition: Option<String>,
    pub(super) park_kind: Option<String>,
    pub(super) older_than: Option<String>,
    pub(super) newer_than: Option<String>,
    pub(super) stuck: Option<String>,
    pub(super) start_key: Option<String>,
    pub(super) text: Option<String>,
    pub(super) after: Option<String>,
    // The bulk form's own fields.
    pub(super) action: Option<String>,
    pub(super) reason: Option<String>,
    pub(super) confirm: Option<String>,
}

/// The filter's fields, in form order, with their names.
const FIELDS: [&str; 8] = [
    "status",
    "definition",
    "park_kind",
    "older_than",
    "newer_than",
    "stuck",
    "start_key",
    "text",
];

/// Every park kind, for the select (the engine's enum is open to new kinds; a kind
/// missing here is still shown on the sagas that have it).
pub(super) const PARK_KINDS: [ParkKind; 9] = [
    ParkKind::CompensationFailed,
    ParkKind::ForwardFailed,
    ParkKind::OutcomeUnknown,
    ParkKind::UnknownDefinition,
    ParkKind::DefinitionMismatch,
    ParkKind::CorruptLog,
    ParkKind::CrashLoop,
    ParkKind::DeadlinePassed,
    ParkKind::NewerFormat,
];

/// A park kind as the log spells it (`compensation_failed`).
pub(super) fn park_kind_name(k: ParkKind) -> String {
    match serde_json::to_value(k) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{k:?}"),
    }
}

fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// `90s`, `15m`, `2h`, `1d`, `1w`, or a number of seconds.
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (90s, 15m, 2h, 1d)"))?;
    let secs = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("`{s}` is not a duration (90s, 15m, 2h, 1d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

impl Params {
    fn value(&self, field: &str) -> Option<&str> {
        given(match field {
            "status" => &self.status,
            "definition" => &self.definition,
            "park_kind" => &self.park_kind,
            "older_than" => &self.older_than,
            "newer_than" => &self.newer_than,
            "stuck" => &self.stuck,
            "start_key" => &self.start_key,
            "text" => &self.text,
            _ => return None,
        })
    }

    /// Whether any part of the filter is set.
    pub(super) fn any(&self) -> bool {
        FIELDS.iter().any(|f| self.value(f).is_some())
    }

    /// The engine filter (no cursor, no limit).
    pub(super) fn to_filter(&self, stuck_after: Duration) -> Result<ListFilter, String> {
        let mut f = ListFilter::default();
        if let Some(s) = self.value("status") {
            f = f.status(SagaStatus::parse(s).ok_or_else(|| format!("unknown status `{s}`"))?);
        }
        if let Some(d) = self.value("definition") {
            f = f.definition(d);
        }
        if let Some(k) = self.value("park_kind") {
            f = f.park_kind(crate::parse_park_kind(k)?);
        }
        if let Some(d) = self.value("older_than") {
            f = f.older_than(parse_duration(d)?);
        }
        if let Some(d) = self.value("newer_than") {
            f = f.newer_than(parse_duration(d)?);
        }
        if self.value("stuck").is_some() {
            f = f.stuck_for(stuck_after);
        }
        if let Some(k) = self.value("start_key") {
            f = f.start_key(k);
        }
        if let Some(t) = self.value("text") {
            f = f.text(crate::filter_text(t)?);
        }
        Ok(f)
    }

    /// The cursor, if any.
    pub(super) fn cursor(&self) -> Result<Option<SagaId>, String> {
        given(&self.after)
            .map(|a| a.parse().map_err(|_| format!("`{a}` is not a saga id")))
            .transpose()
    }

    /// The filter as a query string (no leading `?`), for links.
    pub(super) fn query(&self) -> String {
        FIELDS
            .iter()
            .filter_map(|f| self.value(f).map(|v| format!("{f}={}", url_encode(v))))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// The filter as hidden form fields (the bulk confirmation carries the same filter).
    pub(super) fn hidden(&self) -> String {
        let mut out = String::new();
        for f in FIELDS {
            if let Some(v) = self.value(f) {
                let _ = write!(
                    out,
                    "<input type=\"hidden\" name=\"{f}\" value=\"{}\">",
                    Esc(v)
                );
            }
        }
        out
    }

    /// The filter's inputs, filled with the current values.
    pub(super) fn inputs(&self) -> String {
        let v = |f: &str| self.value(f).unwrap_or("");
        let mut out = String::from("<div class=\"filters\">");
        // Status.
        out.push_str("<label>Status <select name=\"status\"><option value=\"\">any</option>");
        for s in SagaStatus::ALL {
            let sel = if v("status") == s.as_str() {
                " selected"
            } else {
                ""
            };
            let _ = write!(out, "<option value=\"{0}\"{sel}>{0}</option>", s.as_str());
        }
        out.push_str("</select></label>");
        let _ = write!(
            out,
            "<label>Definition <input name=\"definition\" value=\"{}\" size=\"14\"></label>",
            Esc(v("definition"))
        );
        // Park kind.
        out.push_str("<label>Park kind <select name=\"park_kind\"><option value=\"\">any</option>");
        for k in PARK_KINDS {
            let name = park_kind_name(k);
            let sel = if v("park_kind") == name {
                " selected"
            } else {
                ""
            };
            let _ = write!(out, "<option value=\"{0}\"{sel}>{0}</option>", Esc(&name));
        }
        out.push_str("</select></label>");
        let _ = write!(
            out,
            "<label>Older than <input name=\"older_than\" value=\"{}\" size=\"5\" placeholder=\"2h\"></label>\
             <label>Newer than <input name=\"newer_than\" value=\"{}\" size=\"5\" placeholder=\"15m\"></label>\
             <label class=\"check\"><input type=\"checkbox\" name=\"stuck\" value=\"on\"{}> Stuck</label>\
             <label>Start key <input name=\"start_key\" value=\"{}\" size=\"14\"></label>\
             <label>Reason contains <input name=\"text\" value=\"{}\" size=\"16\"></label>",
            Esc(v("older_than")),
            Esc(v("newer_than")),
            if self.value("stuck").is_some() {
                " checked"
            } else {
                ""
            },
            Esc(v("start_key")),
            Esc(v("text")),
        );
        out.push_str("</div>");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration(" 2h ").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn empty_fields_mean_any_and_the_rest_round_trip() {
        let p = Params {
            status: Some("parked".into()),
            definition: Some(String::new()),
            text: Some("a&b <c>".into()),
            park_kind: Some("compensation_failed".into()),
            ..Params::default()
        };
        let f = p.to_filter(Duration::from_secs(60)).unwrap();
        assert_eq!(f.status, Some(SagaStatus::Parked));
        assert_eq!(f.definition, None);
        assert_eq!(f.park_kind, Some(ParkKind::CompensationFailed));
        assert_eq!(
            p.query(),
            "status=parked&park_kind=compensation_failed&text=a%26b%20%3Cc%3E"
        );
        assert!(p.hidden().contains("value=\"a&amp;b &lt;c&gt;\""));
        let bad = Params {
            status: Some("sleeping".into()),
            ..Params::default()
        };
        assert!(bad.to_filter(Duration::from_secs(60)).is_err());
        assert_eq!(park_kind_name(ParkKind::CrashLoop), "crash_loop");
    }
}
