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
    /// Applies `action` to every saga `filter` matches (its cursor and limit aside), at
    /// most [`BULK_MAX`], oldest first, one at a time through [`Engine::repair`]: each is
    /// checked and recorded on its own saga, with `operator` and `reason`, and one that is
    /// refused (its state does not allow it) is counted and listed, not fatal. With
    /// `dry_run`, nothing is written: the report counts the sagas matched and those the
    /// repair would be accepted for now.
    ///
    /// # Errors
    ///
    /// [`Error::BulkRefused`] without who and why, [`Error::Store`] if the store cannot
    /// be listed, [`Error::ShuttingDown`].
    pub async fn bulk(
        &self,
        filter: &ListFilter,
        action: BulkAction,
        dry_run: bool,
        operator: &str,
        reason: &str,
    ) -> Result<BulkReport> {
        if operator.trim().is_empty() || reason.trim().is_empty() {
            return Err(Error::BulkRefused(
                "a bulk repair needs who (operator) and why (reason)".into(),
            ));
        }
        let repair = action.repair();
        let mut report = BulkReport {
            dry_run,
            ..BulkReport::default()
        };
        let mut page_filter = filter.clone();
        page_filter.newest_first = false;
        page_filter.after = None;
        page_filter.limit = Some(500);
        let inner = self.inner.clone();
        loop {
            let f = page_filter.clone();
            let now = inner.clock.now();
            let page = inner.io(move |s| admin::list(s, &f, now)).await??;
            let Some(last) = page.last().map(|m| m.id) else {
                break;
            };
            let full = page.len() >= 500;
            for meta in page {
                if report.matched >= BULK_MAX {
                    report.truncated = true;
                    return Ok(report);
                }
                report.matched += 1;
                let id = meta.id;
                if dry_run {
                    let state = inner.io(move |s| admin::state(s, id)).await?;
                    match state.map(|st| check_repair(&st, &repair)) {
                        Ok(Ok(())) => report.applied += 1,
                        Ok(Err(r)) => report.refuse(id, r.0),
                        Err(e) => report.refuse(id, e.to_string()),
                    }
                    continue;
                }
                match self.repair(id, repair.clone(), operator, reason).await {
                    Ok(_) => report.applied += 1,
                    Err(Error::ShuttingDown) => return Err(Error::ShuttingDown),
                    Err(e) => report.refuse(id, e.to_string()),
                }
            }
            if !full {
                break;
            }
            page_filter.after = Some(last);
        }
        Ok(report)
    }
}
