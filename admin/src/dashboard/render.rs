//! HTML: escaping, the page layout, times and durations, redacted JSON and the
//! activity chart. Everything that comes from a saga goes through [`Esc`].

use std::fmt::{self, Write as _};
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sagaflow::admin::Activity;
use sagaflow::Timestamp;
use serde_json::Value;

use super::auth::Session;

/// Text escaped for HTML, in element content and in quoted attribute values alike.
pub(super) struct Esc<'a>(pub(super) &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// Which part of the navigation is the current page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Nav {
    None,
    Overview,
    Sagas,
    Bulk,
}

/// A whole page: the header (navigation, who is logged in, logout) around `body`, which
/// must already be HTML.
pub(super) fn page(title: &str, session: Option<&Session>, nav: Nav, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Sagaflow</title><link rel=\"stylesheet\" href=\"/assets/style.css\"></head><body>",
        Esc(title)
    );
    if let Some(s) = session {
        out.push_str("<header><nav><a class=\"brand\" href=\"/\">Sagaflow</a>");
        for (n, href, label) in [
            (Nav::Overview, "/", "Overview"),
            (Nav::Sagas, "/sagas", "Sagas"),
            (Nav::Bulk, "/bulk", "Bulk"),
        ] {
            let current = if n == nav {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(out, "<a href=\"{href}\"{current}>{label}</a>");
        }
        let _ = write!(
            out,
            "</nav><div class=\"who\"><span>{} · {}</span>\
             <form method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\" class=\"link\">Log out</button></form></div></header>",
            Esc(&s.operator),
            if s.is_admin() { "admin" } else { "read-only" },
            Esc(&s.csrf)
        );
    }
    let _ = write!(out, "<main>{body}</main></body></html>");
    out
}

pub(super) fn html(status: StatusCode, page: String) -> Response {
    let mut r = (status, page).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// A page that only says what went wrong.
pub(super) fn problem(
    status: StatusCode,
    session: Option<&Session>,
    title: &str,
    message: &str,
) -> Response {
    let body = format!(
        "<h1>{}</h1><p class=\"flash error\">{}</p><p><a href=\"/\">Overview</a> · <a href=\"/sagas\">Sagas</a></p>",
        Esc(title),
        Esc(message)
    );
    html(status, page(title, session, Nav::None, &body))
}

/// A duration the way people say it: `850ms`, `12s`, `4m 05s`, `3h 20m`, `2d 4h`.
pub(super) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 3600 {
        match s % 60 {
            0 => format!("{}m", s / 60),
            rest => format!("{}m {rest:02}s", s / 60),
        }
    } else if s < 86_400 {
        match (s / 60) % 60 {
            0 => format!("{}h", s / 3600),
            rest => format!("{}h {rest:02}m", s / 3600),
        }
    } else {
        match (s / 3600) % 24 {
            0 => format!("{}d", s / 86_400),
            rest => format!("{}d {rest}h", s / 86_400),
        }
    }
}

/// `t` relative to `now`: `3m 05s ago`, `in 12s`.
pub(super) fn relative(now: Timestamp, t: Timestamp) -> String {
    if t <= now {
        format!("{} ago", human(now.duration_since(t)))
    } else {
        format!("in {}", human(t.duration_since(now)))
    }
}

/// A time element: the UTC time, with how long ago (or until) as its tooltip's
/// neighbour.
pub(super) fn time(now: Timestamp, t: Timestamp) -> String {
    format!(
        "<time datetime=\"{t}\" title=\"{t}\">{}</time>",
        Esc(&relative(now, t))
    )
}

/// The value with every field whose name matches a word of `words` replaced by
/// `"[redacted]"`, at any depth.
pub(super) fn redact(v: &Value, words: &[String]) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if secret(k, words) {
                        Value::String("[redacted]".into())
                    } else {
                        redact(v, words)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|i| redact(i, words)).collect()),
        other => other.clone(),
    }
}

fn fold(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

fn secret(field: &str, words: &[String]) -> bool {
    let f = fold(field);
    words.iter().any(|w| {
        let w = fold(w);
        !w.is_empty() && f.contains(&w)
    })
}

/// A JSON value, redacted and pretty-printed, escaped in a `<pre>`.
pub(super) fn json_block(v: &Value, words: &[String]) -> String {
    let text = serde_json::to_string_pretty(&redact(v, words)).unwrap_or_default();
    format!("<pre class=\"json\">{}</pre>", Esc(&text))
}

/// A JSON value, redacted, on one line cut at `max` characters, escaped.
pub(super) fn json_line(v: &Value, words: &[String], max: usize) -> String {
    let text = serde_json::to_string(&redact(v, words)).unwrap_or_default();
    format!("<code>{}</code>", Esc(&cut(&text, max)))
}

/// `s` cut to `max` characters, with an ellipsis if cut.
pub(super) fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

/// Percent-encoding for a query string value: everything but the unreserved
/// characters.
pub(super) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The overview's chart: sagas started, completed and compensated per bucket as lines,
/// and the median completion latency per bucket as bars underneath. Inline SVG (no
/// script, no image request); colours come from the stylesheet's classes.
pub(super) fn activity_chart(a: &Activity) -> String {
    const W: f64 = 720.0;
    const H: f64 = 150.0;
    const LH: f64 = 60.0;
    const LEFT: f64 = 44.0;
    const TOP: f64 = 10.0;
    let n = a.started.len().max(1);
    let step = W / n as f64;
    let max = a
        .started
        .iter()
        .chain(&a.completed)
        .chain(&a.compensated)
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    let x = |i: usize| LEFT + step * (i as f64 + 0.5);
    let y = |v: u64| TOP + H - H * v as f64 / max as f64;
    let mut out = String::new();
    let total_h = TOP + H + 24.0 + LH + 24.0;
    let _ = write!(
        out,
        "<svg class=\"chart\" viewBox=\"0 0 {} {total_h}\" role=\"img\" \
         aria-label=\"Sagas started, completed and compensated per bucket, and completion latency\">",
        LEFT + W + 10.0
    );
    // Axes and grid.
    let _ = write!(
        out,
        "<line class=\"axis\" x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\"/>\
         <line class=\"grid\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{}\" y2=\"{TOP}\"/>\
         <text class=\"label\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{max}</text>\
         <text class=\"label\" x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>",
        TOP + H,
        LEFT + W,
        TOP + H,
        LEFT + W,
        LEFT - 6.0,
        TOP + 4.0,
        LEFT - 6.0,
        TOP + H + 4.0,
    );
    for (class, series) in [
        ("started", &a.started),
        ("completed", &a.completed),
        ("compensated", &a.compensated),
    ] {
        let points: Vec<String> = series
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = write!(
            out,
            "<polyline class=\"line {class}\" points=\"{}\"/>",
            points.join(" ")
        );
    }
    // Latency bars.
    let lat_top = TOP + H + 24.0;
    let lat_max = a.p50_ms.iter().flatten().copied().max().unwrap_or(0).max(1);
    let _ = write!(
        out,
        "<line class=\"axis\" x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\"/>\
         <text class=\"label\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
        lat_top + LH,
        LEFT + W,
        lat_top + LH,
        LEFT - 6.0,
        lat_top + 4.0,
        Esc(&human(Duration::from_millis(lat_max)))
    );
    for (i, p) in a.p50_ms.iter().enumerate() {
        if let Some(ms) = p {
            let h = (LH * *ms as f64 / lat_max as f64).max(1.0);
            let _ = write!(
                out,
                "<rect class=\"latency\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\">\
                 <title>median {}</title></rect>",
                x(i) - step * 0.35,
                lat_top + LH - h,
                step * 0.7,
                Esc(&human(Duration::from_millis(*ms)))
            );
        }
    }
    let window = Duration::from_secs(a.bucket_secs.saturating_mul(n as u64));
    let _ = write!(
        out,
        "<text class=\"label\" x=\"{LEFT}\" y=\"{}\">{} ago</text>\
         <text class=\"label\" x=\"{}\" y=\"{}\" text-anchor=\"end\">now</text>\
         <text class=\"label\" x=\"{}\" y=\"{}\">median completion latency</text></svg>",
        total_h - 4.0,
        Esc(&human(window)),
        LEFT + W,
        total_h - 4.0,
        LEFT + 4.0,
        lat_top - 6.0,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            Esc("<script>alert('x')</script> & \"q\"").to_string(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(Esc("plain ünïcode").to_string(), "plain ünïcode");
    }

    #[test]
    fn secrets_are_redacted_at_any_depth() {
        let words: Vec<String> = ["card", "email"].map(String::from).to_vec();
        let v = json!({
            "order": "o-1",
            "cardNumber": "4111111111111111",
            "customer": { "Email": "a@b.c", "name": "Ana", "cards": [1, 2] },
            "items": [{ "card_token": "tok" }, { "sku": "x" }],
        });
        assert_eq!(
            redact(&v, &words),
            json!({
                "order": "o-1",
                "cardNumber": "[redacted]",
                "customer": { "Email": "[redacted]", "name": "Ana", "cards": "[redacted]" },
                "items": [{ "card_token": "[redacted]" }, { "sku": "x" }],
            })
        );
        assert_eq!(redact(&v, &[]), v);
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(url_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_300)), "12.3s");
        assert_eq!(human(Duration::from_secs(245)), "4m 05s");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 20 * 60)), "3h 20m");
        assert_eq!(human(Duration::from_secs(2 * 86_400 + 4 * 3600)), "2d 4h");
        assert_eq!(human(Duration::from_secs(30 * 60)), "30m");
        assert_eq!(human(Duration::from_secs(8 * 3600)), "8h");
        assert_eq!(human(Duration::from_secs(86_400)), "1d");
    }
}
