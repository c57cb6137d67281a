//! Limits on what the engine writes, checked before it writes (G8).
//!
//! The engine must never write a record it could not read back. serde_json refuses to
//! read JSON nested deeper than 128 levels, and a log record wraps a payload in two or
//! three levels of its own (the record, its event, a group of records), so an input or
//! output is refused at write time once it nests deeper than [`MAX_PAYLOAD_DEPTH`].
//! Serializing through [`LimitedWriter`] also stops a hostile value (a 100,000-level
//! `serde_json::Value`) before its recursion can exhaust the stack: serialization is cut
//! off at the first byte past a limit.
//!
//! Messages (step errors, panic payloads, operator reasons) are stored bounded to
//! [`MAX_MESSAGE_BYTES`], cut at a character boundary and marked as cut.

use std::io;

use serde::Serialize;
use serde_json::Value;

/// The deepest nesting of arrays and objects an input or output may have, whatever
/// [`crate::EngineOptions::max_payload_depth`] says: the deepest a record's payload can be
/// and still be read back by serde_json (whose limit is 128 levels in all).
pub const MAX_PAYLOAD_DEPTH: usize = 100;

/// The most bytes of a message (a step's error, a panic, an operator's reason) the
/// engine stores; longer ones are cut and marked.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Which limit a payload broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exceeded {
    /// More bytes than allowed (`size` is how many were seen before stopping).
    Size { size: usize, limit: usize },
    /// Nested deeper than allowed.
    Depth { limit: usize },
}

/// Counts bytes and tracks JSON nesting as serde_json writes, and fails the write at the
/// first byte past either limit.
struct LimitedWriter {
    out: Vec<u8>,
    max_bytes: usize,
    max_depth: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    exceeded: Option<Exceeded>,
}

impl io::Write for LimitedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len().saturating_add(buf.len()) > self.max_bytes {
            self.exceeded = Some(Exceeded::Size {
                size: self.out.len().saturating_add(buf.len()),
                limit: self.max_bytes,
            });
            return Err(io::Error::other("payload limit"));
        }
        for &b in buf {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'[' | b'{' => {
                    self.depth += 1;
                    if self.depth > self.max_depth {
                        self.exceeded = Some(Exceeded::Depth {
                            limit: self.max_depth,
                        });
                        return Err(io::Error::other("payload limit"));
                    }
                }
                b']' | b'}' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a value could not be turned into a payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// It broke a limit.
    Limit(Exceeded),
    /// It does not serialize (or, in theory, does not parse back).
    Invalid(String),
}

/// Serializes `value` to JSON bytes within `max_bytes` and `max_depth` (itself capped at
/// [`MAX_PAYLOAD_DEPTH`]), stopping at the first byte past a limit.
pub(crate) fn to_bytes(
    value: &impl Serialize,
    max_bytes: usize,
    max_depth: usize,
) -> Result<Vec<u8>, Refused> {
    let mut w = LimitedWriter {
        out: Vec::new(),
        max_bytes,
        max_depth: max_depth.min(MAX_PAYLOAD_DEPTH),
        depth: 0,
        in_string: false,
        escaped: false,
        exceeded: None,
    };
    match serde_json::to_writer(&mut w, value) {
        Ok(()) => Ok(w.out),
        Err(e) => Err(match w.exceeded {
            Some(x) => Refused::Limit(x),
            None => Refused::Invalid(e.to_string()),
        }),
    }
}

/// `value` as a JSON [`Value`] within the limits, as [`to_bytes`]; also returns its size
/// in bytes.
pub(crate) fn to_value(
    value: &impl Serialize,
    max_bytes: usize,
    max_depth: usize,
) -> Result<(Value, usize), Refused> {
    let bytes = to_bytes(value, max_bytes, max_depth)?;
    let v = serde_json::from_slice(&bytes).map_err(|e| Refused::Invalid(e.to_string()))?;
    Ok((v, bytes.len()))
}

/// How deeply `v` nests arrays and objects (a scalar is 0), without recursion.
pub(crate) fn depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        let d = d + 1;
        deepest = deepest.max(d);
        stack.extend(children.map(|c| (c, d)));
    }
    deepest
}

/// Drops `v` without recursion: a value nested deeper than the stack allows would
/// otherwise overflow it in its own destructor.
pub(crate) fn dispose(v: Value) {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(a) => stack.extend(a),
            Value::Object(o) => stack.extend(o.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

/// `message` cut to at most [`MAX_MESSAGE_BYTES`] (at a character boundary), with a note
/// of how long it was, so that no message can grow a record without bound.
///
/// ```
/// let long = "x".repeat(10_000);
/// let cut = sagaflow::bound_message(long);
/// assert!(cut.len() <= sagaflow::MAX_MESSAGE_BYTES);
/// assert!(cut.ends_with("[cut: 10000 bytes in all]"));
/// assert_eq!(sagaflow::bound_message("short".to_string()), "short");
/// ```
pub fn bound_message(message: String) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let note = format!(" … [cut: {} bytes in all]", message.len());
    let mut end = MAX_MESSAGE_BYTES.saturating_sub(note.len());
    while end > 0 && !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + note.len());
    out.push_str(&message[..end]);
    out.push_str(&note);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> Value {
        let mut v = Value::Null;
        for _ in 0..levels {
            v = Value::Array(vec![v]);
        }
        v
    }

    #[test]
    fn depth_is_counted_without_recursion() {
        assert_eq!(depth(&Value::Null), 0);
        assert_eq!(depth(&serde_json::json!({"a": [1, {"b": 2}]})), 3);
        let deep = nested(200_000);
        assert_eq!(depth(&deep), 200_000);
        dispose(deep);
    }

    #[test]
    fn limits_stop_serialization_early() {
        assert_eq!(
            to_bytes(&nested(65), 1 << 20, 64),
            Err(Refused::Limit(Exceeded::Depth { limit: 64 }))
        );
        assert!(to_bytes(&nested(64), 1 << 20, 64).is_ok());
        // The option cannot raise the depth past what can be read back.
        assert_eq!(
            to_bytes(&nested(101), 1 << 20, 1000),
            Err(Refused::Limit(Exceeded::Depth { limit: 100 }))
        );
        assert!(matches!(
            to_bytes(&"x".repeat(100), 50, 64),
            Err(Refused::Limit(Exceeded::Size { limit: 50, .. }))
        ));
        // Brackets inside strings are not nesting.
        let (v, n) = to_value(&serde_json::json!({"s": "[[[[\\\"{{{{"}), 100, 1).unwrap();
        assert_eq!(depth(&v), 1);
        assert!(n < 100);
    }

    #[test]
    fn a_payload_at_the_limit_reads_back_inside_a_record() {
        let record =
            serde_json::json!([{"lsn": 1, "event": {"output": nested(MAX_PAYLOAD_DEPTH)}}]);
        let bytes = serde_json::to_vec(&record).unwrap();
        assert!(serde_json::from_slice::<Value>(&bytes).is_ok());
    }

    #[test]
    fn messages_are_cut_at_a_char_boundary() {
        let m = "é".repeat(5_000);
        let cut = bound_message(m);
        assert!(cut.len() <= MAX_MESSAGE_BYTES);
        assert!(cut.contains("[cut: 10000 bytes in all]"));
    }
}
