//! Group commit: one durable write for every transition that arrived while the previous
//! one was being made durable.
//!
//! A flush plus fdatasync costs the same whether it carries one saga's transition or a
//! thousand, so a dedicated thread takes whatever has queued up, appends it in one batch
//! and syncs once. Under load the batches grow by themselves; with one saga in flight
//! each transition still gets its own sync without waiting for company.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::store::{self, Refused, SagaLog, Write, WriteResult};

/// Upper bound on writes per batch, so one huge batch cannot delay its first writers
/// without limit.
const MAX_BATCH: usize = 4096;

/// A job's answer: the batch failed as a whole, or its write was applied or refused
/// on its own.
type Reply = std::result::Result<WriteResult, Arc<store::Error>>;

struct Job {
    write: Write,
    done: oneshot::Sender<Reply>,
}

/// Counters of the group-commit writer.
#[derive(Debug, Default)]
pub(crate) struct CommitCounters {
    pub(crate) batches: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) records: AtomicU64,
}

/// How many durable writes the engine made and how many transitions they carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommitStats {
    /// Group commits: one append and one sync each.
    pub batches: u64,
    /// Atomic saga writes they carried (a write is one saga's records plus its index
    /// changes).
    pub writes: u64,
    /// Log records those writes carried.
    pub records: u64,
}

/// Where the group-commit loop runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommitMode {
    /// A dedicated OS thread: syncs never block the async runtime. The default, and the
    /// right choice for a real disk.
    #[default]
    Thread,
    /// A task on the engine's tokio runtime that calls the store directly. Syncs block
    /// the runtime thread while they run, so this is for in-memory stores: on a
    /// current-thread runtime with paused time, a whole engine run is then deterministic,
    /// which is what the simulations need.
    RuntimeTask,
}

enum Sender {
    Thread(mpsc::Sender<Job>),
    Task(tokio::sync::mpsc::UnboundedSender<Job>),
}

pub(crate) struct Committer {
    tx: Mutex<Option<Sender>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<CommitCounters>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer").finish_non_exhaustive()
    }
}

impl Committer {
    pub(crate) fn spawn(store: Arc<dyn SagaLog>, mode: CommitMode) -> std::io::Result<Self> {
        let counters = Arc::new(CommitCounters::default());
        let c = counters.clone();
        let (tx, thread) = match mode {
            CommitMode::Thread => {
                let (tx, rx) = mpsc::channel::<Job>();
                let thread = std::thread::Builder::new()
                    .name("sagaflow-commit".into())
                    .spawn(move || {
                        while let Ok(first) = rx.recv() {
                            let jobs = gather(first, || rx.try_recv().ok());
                            commit_batch(&*store, jobs, &c);
                        }
                    })?;
                (Sender::Thread(tx), Some(thread))
            }
            CommitMode::RuntimeTask => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
                // The task ends when the sender is dropped and the queue is drained.
                drop(tokio::spawn(async move {
                    while let Some(first) = rx.recv().await {
                        let jobs = gather(first, || rx.try_recv().ok());
                        commit_batch(&*store, jobs, &c);
                    }
                }));
                (Sender::Task(tx), None)
            }
        };
        Ok(Committer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(thread),
            counters,
        })
    }

    /// Appends `write` and returns once it is durable.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the batch failed; in a shared store, [`Error::Fenced`] or
    /// [`Error::StartKeyConflict`] if this write alone was refused.
    pub(crate) async fn commit(&self, write: Write) -> Result<()> {
        let (done, wait) = oneshot::channel();
        {
            let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            let job = Job { write, done };
            let sent = match tx.as_ref().ok_or(Error::ShuttingDown)? {
                Sender::Thread(tx) => tx.send(job).is_ok(),
                Sender::Task(tx) => tx.send(job).is_ok(),
            };
            if !sent {
                return Err(Error::ShuttingDown);
            }
        }
        match wait.await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(Refused::Fenced { saga, .. }))) => Err(Error::Fenced { saga }),
            Ok(Ok(Err(Refused::StartKeyTaken { key, existing }))) => {
                Err(Error::StartKeyConflict { key, existing })
            }
            Ok(Err(e)) => Err(Error::Store(e)),
            Err(_) => Err(Error::ShuttingDown),
        }
    }

    pub(crate) fn stats(&self) -> CommitStats {
        CommitStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            writes: self.counters.writes.load(Ordering::Relaxed),
            records: self.counters.records.load(Ordering::Relaxed),
        }
    }

    /// Stops taking writes and waits for the writer to finish what it has.
    pub(crate) fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            // The writer never panics on its own (store errors are replies), so a join
            // error means a panic inside the store; there is nothing left to clean up.
            let _ = t.join();
        }
    }
}

/// Takes `first` and whatever else is queued, up to [`MAX_BATCH`] writes.
fn gather(first: Job, mut next: impl FnMut() -> Option<Job>) -> Vec<Job> {
    let mut jobs = vec![first];
    while jobs.len() < MAX_BATCH {
        match next() {
            Some(job) => jobs.push(job),
            None => break,
        }
    }
    jobs
}

/// One group commit: append every write of `jobs`, sync once, answer every job.
fn commit_batch(store: &dyn SagaLog, jobs: Vec<Job>, counters: &CommitCounters) {
    let n = jobs.len();
    let mut writes: Vec<Write> = Vec::with_capacity(n);
    let mut replies = Vec::with_capacity(n);
    for job in jobs {
        writes.push(job.write);
        replies.push(job.done);
    }
    let sizes: Vec<usize> = writes.iter().map(|w| w.records.len()).collect();
    let result = store
        .append_each(writes)
        .and_then(|each| store.sync().map(|()| each));
    match result {
        Ok(each) if each.len() == n => {
            // Only what the store took: a refused write (a shared store) carried nothing.
            let (applied, records) = each
                .iter()
                .zip(&sizes)
                .filter(|(r, _)| r.is_ok())
                .fold((0u64, 0u64), |(w, r), (_, n)| (w + 1, r + *n as u64));
            counters.batches.fetch_add(1, Ordering::Relaxed);
            counters.writes.fetch_add(applied, Ordering::Relaxed);
            counters.records.fetch_add(records, Ordering::Relaxed);
            for (r, one) in replies.into_iter().zip(each) {
                // A caller that stopped waiting (its task was aborted) needs no reply.
                let _ = r.send(Ok(one));
            }
        }
        other => {
            let e = match other {
                Err(e) => Arc::new(e),
                Ok(each) => Arc::new(store::Error::Backend(format!(
                    "the store answered {} of {n} writes",
                    each.len()
                ))),
            };
            tracing::error!(error = %e, writes = n, "group commit failed");
            for r in replies {
                let _ = r.send(Err(e.clone()));
            }
        }
    }
}
