//! Bulk repairs: one repair applied to every saga a filter matches, each recorded on
//! its own saga (who and why in its log) exactly as if it had been asked alone.

use serde::{Deserialize, Serialize};

use crate::admin::{self, ListFilter};
use crate::error::{Error, Result};
use crate::executor::Engine;
use crate::ids::SagaId;
use crate::machine::{check_repair, Repair};

/// What a bulk repair does to each saga it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BulkAction {
    /// Run every waiting retry now ([`Repair::RetryNow`]).
    Retry,
    /// Take a parked saga up where it stopped ([`Repair::Resume`]).
    Resume,
    /// Compensate ([`Repair::ForceCompensate`]).
    Compensate,
    /// Mark resolved by hand ([`Repair::MarkResolved`]).
    Resolve,
}

impl BulkAction {
    /// The repair it applies to each saga.
    pub fn repair(self) -> Repair {
        match self {
            BulkAction::Retry => Repair::RetryNow { step: None },
            BulkAction::Resume => Repair::Resume,
            BulkAction::Compensate => Repair::ForceCompensate,
            BulkAction::Resolve => Repair::MarkResolved,
        }
    }

    /// Its name, as the admin API and the dashboard spell it.
    pub fn name(self) -> &'static str {
        match self {
            BulkAction::Retry => "retry",
            BulkAction::Resume => "resume",
            BulkAction::Compensate => "compensate",
            BulkAction::Resolve => "resolve",
        }
    }
}

impl std::str::FromStr for BulkAction {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        [
            BulkAction::Retry,
            BulkAction::Resume,
            BulkAction::Compensate,
            BulkAction::Resolve,
        ]
        .into_iter()
        .find(|a| a.name() == s)
        .ok_or_else(|| format!("unknown bulk action `{s}` (retry, resume, compensate, resolve)"))
    }
}

/// What a dry run matched, handed back to apply the repair to exactly those sagas: if
/// the filter matches anything else by then (a saga parked meanwhile, one started since,
/// one repaired by somebody else), the bulk repair is refused and the dry run must be
/// looked at again.
///
/// It reads and writes as one token, `matched-fingerprint-upto` (for a form field, a
/// command line or JSON):
///
/// ```
/// use sagaflow::BulkConfirm;
///
/// let c: BulkConfirm = "2-00000000000000ff-0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6071".parse()?;
/// assert_eq!(c.matched, 2);
/// assert_eq!(c.to_string().parse::<BulkConfirm>()?, c);
/// assert!("2-zz-none".parse::<BulkConfirm>().is_err());
/// # Ok::<(), String>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BulkConfirm {
    /// How many sagas it matched.
    pub matched: u64,
    /// A digest of their ids, in order (FNV-1a: a check against change, not a secret).
    pub fingerprint: u64,
    /// The newest saga it matched (ids grow with time): the repair looks no further.
    pub upto: Option<SagaId>,
}

impl std::fmt::Display for BulkConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.upto {
            Some(id) => write!(f, "{}-{:016x}-{id}", self.matched, self.fingerprint),
            None => write!(f, "{}-{:016x}-none", self.matched, self.fingerprint),
        }
    }
}

impl std::str::FromStr for BulkConfirm {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a bulk confirmation (matched-fingerprint-upto)");
        let mut parts = s.trim().splitn(3, '-');
        let (Some(n), Some(fp), Some(upto)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        Ok(BulkConfirm {
            matched: n.parse().map_err(|_| bad())?,
            fingerprint: u64::from_str_radix(fp, 16).map_err(|_| bad())?,
            upto: match upto {
                "none" => None,
                id => Some(id.parse().map_err(|_| bad())?),
            },
        })
    }
}

/// In JSON, the token string (a fingerprint as a JSON number would lose digits in
/// JavaScript and jq).
impl Serialize for BulkConfirm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BulkConfirm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let token = String::deserialize(d)?;
        token.parse().map_err(serde::de::Error::custom)
    }
}

/// FNV-1a over the ids, in order.
fn fingerprint(ids: &[SagaId]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in ids {
        for b in id.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// What a bulk repair did, or (dry run) would do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BulkReport {
    /// Whether nothing was written.
    pub dry_run: bool,
    /// Sagas the filter matched.
    pub matched: u64,
    /// Of those, repaired (a dry run: those the repair would be accepted for now).
    pub applied: u64,
    /// Of those, refused, with why (the first [`BulkReport::MAX_LISTED`]).
    pub refused: Vec<(SagaId, String)>,
    /// How many were refused in all.
    pub refused_count: u64,
    /// Whether the filter matched more than the limit: the rest were not looked at.
    pub truncated: bool,
    /// A dry run's answer: what to hand back to apply it to exactly these sagas.
    pub confirm: Option<BulkConfirm>,
}

impl BulkReport {
    /// Refusals listed at most (all are counted).
    pub const MAX_LISTED: usize = 100;

    fn refuse(&mut self, id: SagaId, why: String) {
        self.refused_count += 1;
        if self.refused.len() < Self::MAX_LISTED {
            self.refused.push((id, why));
        }
    }
}

/// The most sagas one bulk repair acts on.
pub const BULK_MAX: u64 = 10_000;

impl Engine {
    /// A bulk repair: `action` applied to the sagas `filter` matches (its cursor and limit
    /// aside), at most [`BULK_MAX`], oldest first, one at a time through
    /// [`Engine::repair`], so each is checked and recorded on its own saga with
    /// `operator` and `reason`; one the repair does not fit is counted and listed, not
    /// fatal.
    ///
    /// It takes two calls. Without `confirm`, a dry run: nothing is written; the report
    /// counts the sagas matched and those the repair would be accepted for now, and
    /// carries the [`BulkConfirm`] of what it matched. With that `confirm`, the repair is
    /// applied to exactly those sagas: if the filter matches any other saga by then, or
    /// misses one, nothing is written and it is refused.
    ///
    /// # Errors
    ///
    /// [`Error::BulkRefused`] without who and why (or with one too long to record), or
    /// when the sagas matched changed since the dry run; [`Error::Store`] if the store
    /// cannot be listed; [`Error::ShuttingDown`].
    pub async fn bulk(
        &self,
        filter: &ListFilter,
        action: BulkAction,
        confirm: Option<BulkConfirm>,
        operator: &str,
        reason: &str,
    ) -> Result<BulkReport> {
        let nobody = SagaId::from_bytes([0; 16]);
        admin::check_who(nobody, operator, reason).map_err(|e| match e {
            Error::RepairRefused { reason, .. } => Error::BulkRefused(reason),
            other => other,
        })?;
        let repair = action.repair();
        let (ids, truncated) = self
            .bulk_matches(filter, confirm.and_then(|c| c.upto))
            .await?;
        let seen = BulkConfirm {
            matched: ids.len() as u64,
            fingerprint: fingerprint(&ids),
            upto: ids.last().copied(),
        };
        let mut report = BulkReport {
            dry_run: confirm.is_none(),
            matched: seen.matched,
            truncated,
            ..BulkReport::default()
        };
        let inner = self.inner.clone();
        let Some(confirm) = confirm else {
            for id in ids {
                let state = inner.io(move |s| admin::state(s, id)).await?;
                match state.map(|st| check_repair(&st, &repair)) {
                    Ok(Ok(())) => report.applied += 1,
                    Ok(Err(r)) => report.refuse(id, r.0),
                    Err(e) => report.refuse(id, e.to_string()),
                }
            }
            report.confirm = Some(seen);
            return Ok(report);
        };
        if (seen.matched, seen.fingerprint) != (confirm.matched, confirm.fingerprint) {
            return Err(Error::BulkRefused(format!(
                "the sagas the filter matches changed since the dry run (it matched {}, now {} \
                 up to the same saga, or others): look at a new dry run",
                confirm.matched, seen.matched
            )));
        }
        for id in ids {
            match self.repair(id, repair.clone(), operator, reason).await {
                Ok(_) => report.applied += 1,
                Err(Error::ShuttingDown) => return Err(Error::ShuttingDown),
                Err(e) => report.refuse(id, e.to_string()),
            }
        }
        Ok(report)
    }

    /// The ids `filter` matches, oldest first, none after `upto`, at most [`BULK_MAX`]
    /// (and whether there were more).
    async fn bulk_matches(
        &self,
        filter: &ListFilter,
        upto: Option<SagaId>,
    ) -> Result<(Vec<SagaId>, bool)> {
        let mut page_filter = filter.clone();
        page_filter.newest_first = false;
        page_filter.after = None;
        page_filter.limit = Some(500);
        let inner = self.inner.clone();
        let mut ids = Vec::new();
        loop {
            let f = page_filter.clone();
            let now = inner.clock.now();
            let page = inner.io(move |s| admin::list(s, &f, now)).await??;
            let Some(last) = page.last().map(|m| m.id) else {
                return Ok((ids, false));
            };
            let full = page.len() >= 500;
            for meta in page {
                if upto.is_some_and(|u| meta.id > u) {
                    return Ok((ids, false));
                }
                if ids.len() as u64 >= BULK_MAX {
                    return Ok((ids, true));
                }
                ids.push(meta.id);
            }
            if !full {
                return Ok((ids, false));
            }
            page_filter.after = Some(last);
        }
    }
}
