//! Webhook verification: HMAC-SHA256 over the timestamp and the body, in the widely used
//! `t=<unix seconds>,v1=<hex signature>` header scheme.
//!
//! A webhook is accepted only if the header parses, its timestamp is within the
//! tolerance, one of its `v1` signatures matches one of the active secrets (several may
//! be active while a secret is rotated; compared in constant time), and its event id
//! has not been seen before (replays are refused; the memory of seen ids is bounded).
//! Each refusal is its own error.
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
//! ```

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secrets::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Why a webhook was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// The signature header is missing parts or does not parse.
    #[error("malformed signature header: {0}")]
    Malformed(String),
    /// The timestamp is outside the tolerance: too old, or from the future.
    #[error("stale webhook: signed {age_secs} s away from now, tolerance {tolerance_secs} s")]
    Stale {
        /// Distance between the timestamp and now, in seconds.
        age_secs: u64,
        /// The tolerance, in seconds.
        tolerance_secs: u64,
    },
    /// No signature matches any active secret: forged, or signed with a retired secret.
    #[error("bad signature")]
    BadSignature,
    /// This event id was accepted before.
    #[error("replayed webhook: event already seen")]
    Replayed,
}

/// The signature header for `body` signed with `secret` at `at`, as a sender builds it.
pub fn sign(secret: &Secret, at: SystemTime, body: &[u8]) -> String {
    let t = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("t={t},v1={}", hex::encode(mac(secret, t, body)))
}

fn mac(secret: &Secret, t: u64, body: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length, so `new_from_slice` cannot fail here.
    let mut m = match HmacSha256::new_from_slice(secret.expose().as_bytes()) {
        Ok(m) => m,
        Err(_) => return Vec::new(),
    };
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

/// Verifies webhooks from one sender.
#[derive(Debug)]
pub struct Verifier {
    secrets: Vec<Secret>,
    tolerance: Duration,
    capacity: usize,
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl Verifier {
    /// A verifier accepting signatures by any of `secrets`; 5 minutes of tolerance;
    /// remembers the last 100,000 event ids.
    pub fn new(secrets: Vec<Secret>) -> Self {
        Verifier {
            secrets,
            tolerance: Duration::from_secs(300),
            capacity: 100_000,
            seen: Mutex::new((HashSet::new(), VecDeque::new())),
        }
    }

    /// Sets the timestamp tolerance.
    pub fn with_tolerance(mut self, d: Duration) -> Self {
        self.tolerance = d;
        self
    }

    /// Sets how many event ids are remembered (at least 1). Ids older than that are
    /// forgotten; the timestamp tolerance refuses their replays anyway once they are
    /// stale, so size it to the events a sender sends within the tolerance.
    pub fn with_memory(mut self, ids: usize) -> Self {
        self.capacity = ids.max(1);
        self
    }

    /// Checks `header` (the `t=...,v1=...` value) against `body` at `now`, then refuses
    /// `event_id` if it was seen before and remembers it otherwise.
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
        let mut t: Option<u64> = None;
        let mut sigs: Vec<Vec<u8>> = Vec::new();
        for part in header.split(',') {
            let (k, v) = part
                .trim()
                .split_once('=')
                .ok_or_else(|| WebhookError::Malformed(format!("`{part}` is not key=value")))?;
            match k {
                "t" => {
                    t = Some(v.parse().map_err(|_| {
                        WebhookError::Malformed(format!("timestamp `{v}` is not a number"))
                    })?)
                }
                "v1" => sigs.push(
                    hex::decode(v).map_err(|_| WebhookError::Malformed("v1 is not hex".into()))?,
                ),
                _ => {} // other schemes (v0, ...) are ignored
            }
        }
        let t = t.ok_or_else(|| WebhookError::Malformed("no t=".into()))?;
        if sigs.is_empty() {
            return Err(WebhookError::Malformed("no v1=".into()));
        }
        let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let age = now_s.abs_diff(t);
        if age > self.tolerance.as_secs() {
            return Err(WebhookError::Stale {
                age_secs: age,
                tolerance_secs: self.tolerance.as_secs(),
            });
        }
        let signed = self.secrets.iter().any(|secret| {
            sigs.iter().any(|sig| {
                HmacSha256::new_from_slice(secret.expose().as_bytes())
                    .map(|mut m| {
                        m.update(t.to_string().as_bytes());
                        m.update(b".");
                        m.update(body);
                        // `verify_slice` compares in constant time.
                        m.verify_slice(sig).is_ok()
                    })
                    .unwrap_or(false)
            })
        });
        if !signed {
            return Err(WebhookError::BadSignature);
        }
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
