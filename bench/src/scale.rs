//! Listing and counting over a large store (`--scale N`): N finished sagas written
//! straight into a store, then the operator's queries timed: the first page of the list,
//! a page from a cursor half way through, a page filtered by status, and stats. On sled
//! and, with the `postgres` feature and a database URL, on PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sagaflow::admin::{Admin, ListFilter};
use sagaflow::machine::{Event, LogRecord};
use sagaflow::store::{Fence, OwnerId, SagaLog, Write};
use sagaflow::{Lsn, SagaId, SagaMeta, SagaStatus, SystemClock, Timestamp};

/// What the queries took, in milliseconds.
#[derive(Debug)]
pub(crate) struct ScaleFigures {
    pub(crate) store: &'static str,
    pub(crate) sagas: u64,
    pub(crate) fill_secs: f64,
    pub(crate) first_page_ms: f64,
    pub(crate) cursor_page_ms: f64,
    pub(crate) parked_page_ms: f64,
    pub(crate) stats_ms: f64,
}

fn id(n: u64) -> SagaId {
    // Time-ordered like real ids: a millisecond per saga, the number in the rest.
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&(1_700_000_000_000u64 + n).to_be_bytes());
    b[8..].copy_from_slice(&n.to_be_bytes());
    SagaId::from_bytes(b)
}

fn write(n: u64, fence: Option<&OwnerId>) -> Write {
    let saga = id(n);
    let at = Timestamp::from_millis(1_700_000_000_000 + n);
    // One in a hundred parked, the rest completed, over four definitions.
    let status = if n % 100 == 7 {
        SagaStatus::Parked
    } else {
        SagaStatus::Completed
    };
    let definition = format!("def-{}", n % 4);
    let record = LogRecord {
        lsn: Lsn(0),
        at,
        event: Event::Started {
            definition: definition.clone(),
            version: 1,
            steps: vec!["a".into()],
            kinds: Vec::new(),
            stages: Vec::new(),
            input: serde_json::json!({ "n": n }),
            start_key: None,
            deadline: None,
            not_before: None,
        },
    };
    let meta = SagaMeta {
        id: saga,
        definition,
        version: 1,
        status,
        start_key: None,
        created_at: at,
        updated_at: at,
        last_lsn: Lsn(0),
        due: None,
        settling_until: None,
        awaiting: None,
        starts_at: None,
        reason: (status == SagaStatus::Parked).then(|| "needs a look".to_string()),
        finished_at: (status == SagaStatus::Completed).then_some(at),
        open_drifts: 0,
        park_kind: (status == SagaStatus::Parked).then_some(sagaflow::ParkKind::OutcomeUnknown),
    };
    let mut w = Write {
        saga,
        records: vec![record],
        meta,
        previous: None,
        fence: None,
        taken: Vec::new(),
    };
    w.fence = fence.map(|o| Fence {
        owner: o.clone(),
        epoch: 1,
    });
    w
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed().as_secs_f64() * 1000.0)
}

/// Fills `store` with `n` sagas and times the queries.
pub(crate) fn measure(
    name: &'static str,
    store: Arc<dyn SagaLog>,
    n: u64,
    fence: Option<&OwnerId>,
) -> ScaleFigures {
    let start = Instant::now();
    let batch = 5_000;
    let mut next = 0;
    while next < n {
        let writes: Vec<Write> = (next..(next + batch).min(n))
            .map(|i| write(i, fence))
            .collect();
        next += writes.len() as u64;
        for r in store.append_each(writes).expect("fill") {
            r.expect("a fill write refused");
        }
        store.sync().expect("sync");
    }
    let fill_secs = start.elapsed().as_secs_f64();
    let admin = Admin::new(store, Arc::new(SystemClock));
    let (first, first_page_ms) =
        timed(|| admin.list(&ListFilter::default().limit(50)).expect("list"));
    assert_eq!(first.len() as u64, n.min(50));
    let (mid, cursor_page_ms) = timed(|| {
        admin
            .list(&ListFilter::default().after(id(n / 2)).limit(50))
            .expect("list")
    });
    assert_eq!(
        mid.first().map(|m| m.id),
        (n > n / 2 + 1).then(|| id(n / 2 + 1))
    );
    let (parked, parked_page_ms) = timed(|| {
        admin
            .list(
                &ListFilter::default()
                    .status(SagaStatus::Parked)
                    .newest_first()
                    .limit(50),
            )
            .expect("list")
    });
    assert!(parked.iter().all(|m| m.status == SagaStatus::Parked));
    let (stats, stats_ms) = timed(|| admin.stats(Duration::from_secs(900)).expect("stats"));
    assert_eq!(stats.total, n);
    ScaleFigures {
        store: name,
        sagas: n,
        fill_secs,
        first_page_ms,
        cursor_page_ms,
        parked_page_ms,
        stats_ms,
    }
}
