//! Webhook verification: HMAC-SHA256 over the timestamp and the body, in the widely used
//! `t=<unix seconds>,v1=<hex signature>` header scheme.
//!
//! A webhook is accepted only if its body is within the size limit, the header parses
//! with at most a few `v1` signatures each of exactly 64 hex digits, its timestamp is
//! neither older than the tolerance nor further in the future than the allowed clock
//! skew, it names an event id, one of its `v1` signatures matches one of the active
//! secrets (several may be active while a secret is rotated; compared in constant
//! time), and its event id has not been seen before (replays are refused; the memory of
//! seen ids is bounded). Each refusal is its own error.
//!
//! The checks are ordered by cost, and everything an unauthenticated sender controls is
//! bounded before any HMAC is computed:
//!
//! | limit | default | setter | refusal |
//! | --- | --- | --- | --- |
//! | body size | 1 MiB ([`DEFAULT_MAX_BODY`]) | [`Verifier::with_max_body`] | [`WebhookError::BodyTooLarge`] |
//! | `v1` signatures per header | 8 ([`DEFAULT_MAX_SIGNATURES`]) | [`Verifier::with_max_signatures`] | [`WebhookError::TooManySignatures`] |
//! | a `v1` signature | 64 hex digits | | [`WebhookError::EmptySignature`], [`WebhookError::MalformedSignature`] |
//! | age of the timestamp | 5 minutes ([`DEFAULT_TOLERANCE`]) | [`Verifier::with_tolerance`] | [`WebhookError::Stale`] |
//! | timestamp ahead of now | 30 s ([`DEFAULT_FUTURE_SKEW`]) | [`Verifier::with_future_skew`] | [`WebhookError::FromTheFuture`] |
//! | event id | 1 to 256 bytes ([`MAX_EVENT_ID_LEN`]) | | [`WebhookError::MissingEventId`], [`WebhookError::EventIdTooLong`] |
//!
//! The body is hashed once per active secret, however many signatures the header
//! carries. That is still CPU time proportional to the body: in an async handler, call
//! [`Verifier::verify_async`], which hashes bodies above a threshold (64 KiB,
//! [`DEFAULT_BLOCKING_THRESHOLD`]) on tokio's blocking pool instead of the runtime's
//! threads. The receiving server should also cap the body it reads (the verifier's
//! limit applies to what it is given).
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use sagaflow_steps::secrets::Secret;
//! use sagaflow_steps::webhook::{sign, Verifier, WebhookError};
//!
//! let secret = Secret::new("whsec_1");
//! let verifier = Verifier::new(vec![secret.clone()]).with_tolerance(Duration::from_secs(300));
//! let now = SystemTime::now();
//! let body = br#"{"id":"evt_1","type":"charge.settled"}"#;
//! let header = sign(&secret, now, body);
//! assert_eq!(verifier.verify(&header, body, "evt_1", now), Ok(()));
//! assert_eq!(verifier.verify(&header, body, "evt_1", now), Err(WebhookError::Replayed));
//! assert_eq!(verifier.verify(&header, b"{}", "evt_2", now), Err(WebhookError::BadSignature));
//! assert_eq!(verifier.verify(&header, body, "", now), Err(WebhookError::MissingEventId));
//! let early = sign(&secret, now + Duration::from_secs(120), body);
//! assert!(matches!(verifier.verify(&early, body, "evt_3", now), Err(WebhookError::FromTheFuture { .. })));
//! ```

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::digest::CtOutput;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secrets::Secret;

type HmacSha256 = Hmac<Sha256>;

/// The bytes of an HMAC-SHA256 signature.
const SIGNATURE_LEN: usize = 32;

/// How old a timestamp may be unless [`Verifier::with_tolerance`] says otherwise:
/// 5 minutes.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// How far ahead of the receiver's clock a timestamp may be unless
/// [`Verifier::with_future_skew`] says otherwise: 30 s, for clocks that disagree. A
/// sender does not sign in the future, so this is much smaller than the tolerance.
pub const DEFAULT_FUTURE_SKEW: Duration = Duration::from_secs(30);

/// How many `v1` signatures a header may carry unless
/// [`Verifier::with_max_signatures`] says otherwise: 8 (a sender rotating its secret
/// sends two).
pub const DEFAULT_MAX_SIGNATURES: usize = 8;

/// The largest body verified unless [`Verifier::with_max_body`] says otherwise: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// Bodies larger than this are hashed on tokio's blocking pool by
/// [`Verifier::verify_async`] unless [`Verifier::with_blocking_threshold`] says
/// otherwise: 64 KiB.
pub const DEFAULT_BLOCKING_THRESHOLD: usize = 64 << 10;

/// The longest event id accepted, in bytes: ids are remembered, so they are bounded.
pub const MAX_EVENT_ID_LEN: usize = 256;

/// Why a webhook was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// The signature header is missing parts or does not parse.
    #[error("malformed signature header: {0}")]
    Malformed(String),
    /// The body is larger than the verifier's limit; it was not hashed.
    #[error("webhook body of {len} bytes is over the limit of {max} bytes")]
    BodyTooLarge {
        /// The body's size, in bytes.
        len: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// The header carries more `v1` signatures than the verifier's limit; nothing was
    /// hashed.
    #[error("more than {max} v1 signatures in the signature header")]
    TooManySignatures {
        /// The limit.
        max: usize,
    },
    /// A `v1=` entry is empty.
    #[error("empty v1 signature")]
    EmptySignature,
    /// A `v1` signature is not 64 hex digits (the 32 bytes of an HMAC-SHA256).
    #[error("malformed v1 signature: {0}")]
    MalformedSignature(String),
    /// The timestamp is older than the tolerance.
    #[error("stale webhook: signed {age_secs} s ago, tolerance {tolerance_secs} s")]
    Stale {
        /// How long ago the webhook was signed, in seconds.
        age_secs: u64,
        /// The tolerance, in seconds.
        tolerance_secs: u64,
    },
    /// The timestamp is further ahead of the receiver's clock than the allowed skew.
    #[error(
        "webhook from the future: signed {ahead_secs} s ahead of now, allowed skew {skew_secs} s"
    )]
    FromTheFuture {
        /// How far ahead of now the timestamp is, in seconds.
        ahead_secs: u64,
        /// The allowed skew, in seconds.
        skew_secs: u64,
    },
    /// The event has no id (empty or blank), so a replay could not be told from a new
    /// event.
    #[error("missing event id")]
    MissingEventId,
    /// The event id is longer than [`MAX_EVENT_ID_LEN`] bytes.
    #[error("event id of {len} bytes is over the limit of {max} bytes")]
    EventIdTooLong {
        /// The id's length, in bytes.
        len: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// No signature matches any active secret: forged, or signed with a retired secret.
    #[error("bad signature")]
    BadSignature,
    /// This event id was accepted before.
    #[error("replayed webhook: event already seen")]
    Replayed,
    /// The verification on the blocking pool did not finish (the runtime is shutting
    /// down); the webhook was not accepted.
    #[error("verification interrupted: {0}")]
    Interrupted(String),
}

/// The signature header for `body` signed with `secret` at `at`, as a sender builds it.
pub fn sign(secret: &Secret, at: SystemTime, body: &[u8]) -> String {
    let t = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let sig = tag(secret, t, body).map_or_else(Vec::new, |m| m.into_bytes().to_vec());
    format!("t={t},v1={}", hex::encode(sig))
}

/// The HMAC-SHA256 of `"{t}.{body}"` under `secret`, as a constant-time comparable
/// value.
fn tag(secret: &Secret, t: u64, body: &[u8]) -> Option<CtOutput<HmacSha256>> {
    // HMAC takes keys of any length, so `new_from_slice` cannot fail here.
    let mut m = HmacSha256::new_from_slice(secret.expose().as_bytes()).ok()?;
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    Some(m.finalize())
}

/// Whether one of `sigs` is the signature of `"{t}.{body}"` under one of `secrets`:
/// the body is hashed once per secret, and every candidate is compared in constant
/// time.
fn signed(secrets: &[Secret], t: u64, body: &[u8], sigs: &[[u8; SIGNATURE_LEN]]) -> bool {
    let mut matched = false;
    for secret in secrets {
        let Some(expected) = tag(secret, t, body) else {
            continue;
        };
        for sig in sigs {
            // `CtOutput`'s equality is constant-time; `|=` keeps going past a match.
            matched |= expected == CtOutput::new((*sig).into());
        }
    }
    matched
}

/// At most 40 characters of `s`, to quote a sender's input in an error without
/// echoing all of it.
fn quote(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// What the cheap checks leave for the HMAC.
#[derive(Debug)]
struct Checked {
    t: u64,
    sigs: Vec<[u8; SIGNATURE_LEN]>,
}

/// Verifies webhooks from one sender.
#[derive(Debug)]
pub struct Verifier {
    secrets: Arc<[Secret]>,
    tolerance: Duration,
    future_skew: Duration,
    max_signatures: usize,
    max_body: usize,
    blocking_threshold: usize,
    capacity: usize,
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl Verifier {
    /// A verifier accepting signatures by any of `secrets`, with the defaults: 5
    /// minutes of tolerance, 30 s of future skew, 8 signatures, 1 MiB bodies, hashing
    /// on the blocking pool above 64 KiB; remembers the last 100,000 event ids.
    pub fn new(secrets: Vec<Secret>) -> Self {
        Verifier {
            secrets: secrets.into(),
            tolerance: DEFAULT_TOLERANCE,
            future_skew: DEFAULT_FUTURE_SKEW,
            max_signatures: DEFAULT_MAX_SIGNATURES,
            max_body: DEFAULT_MAX_BODY,
            blocking_threshold: DEFAULT_BLOCKING_THRESHOLD,
            capacity: 100_000,
            seen: Mutex::new((HashSet::new(), VecDeque::new())),
        }
    }

    /// Sets how old a timestamp may be (default [`DEFAULT_TOLERANCE`]).
    pub fn with_tolerance(mut self, d: Duration) -> Self {
        self.tolerance = d;
        self
    }

    /// Sets how far ahead of now a timestamp may be (default [`DEFAULT_FUTURE_SKEW`]):
    /// the difference the sender's and the receiver's clocks are allowed. Keep it
    /// small: a signature from the future stays valid that much longer.
    pub fn with_future_skew(mut self, d: Duration) -> Self {
        self.future_skew = d;
        self
    }

    /// Sets how many `v1` signatures a header may carry (at least 1; default
    /// [`DEFAULT_MAX_SIGNATURES`]). More are refused before anything is hashed.
    pub fn with_max_signatures(mut self, n: usize) -> Self {
        self.max_signatures = n.max(1);
        self
    }

    /// Sets the largest body verified, in bytes (default [`DEFAULT_MAX_BODY`]). Larger
    /// ones are refused before anything is hashed.
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Sets the body size above which [`Verifier::verify_async`] hashes on tokio's
    /// blocking pool (default [`DEFAULT_BLOCKING_THRESHOLD`]).
    pub fn with_blocking_threshold(mut self, bytes: usize) -> Self {
        self.blocking_threshold = bytes;
        self
    }

    /// Sets how many event ids are remembered (at least 1). Ids older than that are
    /// forgotten; the timestamp checks refuse their replays anyway once they are stale,
    /// so size it to the events a sender sends within the tolerance plus the future
    /// skew.
    pub fn with_memory(mut self, ids: usize) -> Self {
        self.capacity = ids.max(1);
        self
    }

    /// Checks `header` (the `t=...,v1=...` value) against `body` at `now`, then refuses
    /// `event_id` if it was seen before and remembers it otherwise.
    ///
    /// This hashes the body on the calling thread, once per active secret. In an async
    /// handler with large bodies, use [`Verifier::verify_async`].
    ///
    /// # Errors
    ///
    /// A [`WebhookError`] saying why it was refused.
    pub fn verify(
        &self,
        header: &str,
        body: &[u8],
        event_id: &str,
        now: SystemTime,
    ) -> Result<(), WebhookError> {
        let checked = self.check(header, body.len(), event_id, now)?;
        if !signed(&self.secrets, checked.t, body, &checked.sigs) {
            return Err(WebhookError::BadSignature);
        }
        self.remember(event_id)
    }

    /// As [`Verifier::verify`], but a body larger than the blocking threshold is hashed
    /// on tokio's blocking pool (`spawn_blocking`), so the runtime's threads keep
    /// serving other requests meanwhile. Every cheap check (size, header, signatures,
    /// timestamp, event id) runs first, on the caller's thread. Needs a tokio runtime.
    ///
    /// # Errors
    ///
    /// A [`WebhookError`] saying why it was refused;
    /// [`WebhookError::Interrupted`] if the blocking task did not finish.
    pub async fn verify_async<B>(
        &self,
        header: &str,
        body: B,
        event_id: &str,
        now: SystemTime,
    ) -> Result<(), WebhookError>
    where
        B: AsRef<[u8]> + Send + 'static,
    {
        let len = body.as_ref().len();
        let Checked { t, sigs } = self.check(header, len, event_id, now)?;
        let ok = if len <= self.blocking_threshold {
            signed(&self.secrets, t, body.as_ref(), &sigs)
        } else {
            let secrets = Arc::clone(&self.secrets);
            tokio::task::spawn_blocking(move || signed(&secrets, t, body.as_ref(), &sigs))
                .await
                .map_err(|e| WebhookError::Interrupted(e.to_string()))?
        };
        if !ok {
            return Err(WebhookError::BadSignature);
        }
        self.remember(event_id)
    }

    /// Every check but the HMAC and the replay memory, cheapest first; nothing here
    /// costs more than a pass over the header.
    fn check(
        &self,
        header: &str,
        body_len: usize,
        event_id: &str,
        now: SystemTime,
    ) -> Result<Checked, WebhookError> {
        if body_len > self.max_body {
            return Err(WebhookError::BodyTooLarge {
                len: body_len,
                max: self.max_body,
            });
        }
        let mut t: Option<u64> = None;
        let mut candidates: Vec<&str> = Vec::new();
        for part in header.split(',') {
            let (k, v) = part.trim().split_once('=').ok_or_else(|| {
                WebhookError::Malformed(format!("`{}` is not key=value", quote(part)))
            })?;
            match k {
                "t" => {
                    if t.is_some() {
                        return Err(WebhookError::Malformed("more than one t=".into()));
                    }
                    t = Some(v.parse().map_err(|_| {
                        WebhookError::Malformed(format!("timestamp `{}` is not a number", quote(v)))
                    })?);
                }
                "v1" => {
                    // Counted before any is decoded: a thousand entries cost one pass.
                    if candidates.len() == self.max_signatures {
                        return Err(WebhookError::TooManySignatures {
                            max: self.max_signatures,
                        });
                    }
                    candidates.push(v);
                }
                _ => {} // other schemes (v0, ...) are ignored
            }
        }
        let t = t.ok_or_else(|| WebhookError::Malformed("no t=".into()))?;
        if candidates.is_empty() {
            return Err(WebhookError::Malformed("no v1=".into()));
        }
        let mut sigs = Vec::with_capacity(candidates.len());
        for v in candidates {
            if v.is_empty() {
                return Err(WebhookError::EmptySignature);
            }
            let mut sig = [0u8; SIGNATURE_LEN];
            hex::decode_to_slice(v, &mut sig).map_err(|e| {
                WebhookError::MalformedSignature(format!(
                    "`{}` is not {} hex digits: {e}",
                    quote(v),
                    2 * SIGNATURE_LEN
                ))
            })?;
            sigs.push(sig);
        }
        let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if t > now_s {
            let ahead = t - now_s;
            if ahead > self.future_skew.as_secs() {
                return Err(WebhookError::FromTheFuture {
                    ahead_secs: ahead,
                    skew_secs: self.future_skew.as_secs(),
                });
            }
        } else {
            let age = now_s - t;
            if age > self.tolerance.as_secs() {
                return Err(WebhookError::Stale {
                    age_secs: age,
                    tolerance_secs: self.tolerance.as_secs(),
                });
            }
        }
        if event_id.trim().is_empty() {
            return Err(WebhookError::MissingEventId);
        }
        if event_id.len() > MAX_EVENT_ID_LEN {
            return Err(WebhookError::EventIdTooLong {
                len: event_id.len(),
                max: MAX_EVENT_ID_LEN,
            });
        }
        Ok(Checked { t, sigs })
    }

    /// Refuses `event_id` if it was accepted before, remembers it otherwise.
    fn remember(&self, event_id: &str) -> Result<(), WebhookError> {
        let mut g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (set, order) = &mut *g;
        if !set.insert(event_id.to_string()) {
            return Err(WebhookError::Replayed);
        }
        order.push_back(event_id.to_string());
        while order.len() > self.capacity {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        Ok(())
    }
}
