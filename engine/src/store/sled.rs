//! The embedded default store, on sled 0.34.
//!
//! Each group of writes is one `apply_batch` (atomic), then `flush`. sled 0.34's flush
//! ends in `sync_file_range`, which does not flush the drive's cache or the file's
//! metadata (sled issue #1452), so `sync` follows it with an `fdatasync` of sled's data
//! file: only then is a write on stable storage across a power loss (G1).
//!
//! sled also writes any item larger than its blob threshold (about a quarter of a
//! segment: 128 KiB with the default 512 KiB segments; a large saga input or output, or
//! a page holding several) to its own file under `blobs/`, and 0.34 does not fsync those
//! files. `sync` therefore fsyncs every blob file it has not synced yet, and the `blobs`
//! directory, after the data file.
//!
//! Every batch also carries a commit number, and each sync ends by recording the last
//! number synced in a witness file beside sled's (see `witness.rs`): at open, a store
//! holding fewer commits than its witness has lost committed writes, and is refused.
//!
//! A snapshot that a killed process left unfinished (`snap.<lsn>.generating`) is removed
//! before sled opens: sled 0.34 would take it for the newest snapshot and refuse to open
//! (see `remove_unfinished_snapshots`).
//!
//! Opening a sled directory writes to it (sled's recovery rewrites a torn tail), so read-
//! only tools use [`SledLog::open_read_only`], which opens a private copy.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::witness::{self, Witness};

use crate::clock::Timestamp;
use crate::ids::{Lsn, SagaId, StartKey};
use crate::machine::SagaStatus;
use crate::store::codec::{self, Op};
use crate::store::inbox::{Delivered, Delivery, Inbox};
use crate::store::kv::{self, Kv};
use crate::store::{Error, Result, SagaLog, SagaMeta, Write};

/// A [`SagaLog`] in a sled database directory.
///
/// ```
/// use sagaflow::store::{SagaLog, SledLog};
///
/// let dir = tempfile::tempdir()?;
/// let log = SledLog::open(dir.path())?;
/// assert!(log.incomplete()?.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SledLog {
    db: sled::Db,
    data_file: File,
    path: PathBuf,
    /// Blob files already made durable (sled removes them when it collects garbage).
    synced_blobs: Mutex<HashSet<OsString>>,
    /// The last commit number applied, and the witness of the last one synced. Held
    /// while a batch is applied, so that numbers reach sled in order.
    commits: Mutex<Commits>,
    /// Held from a delivery's check for a duplicate to its sync: a duplicate is only
    /// answered once the first delivery is durable.
    delivering: Mutex<()>,
    /// For a read-only open: the private copy, removed when the store is dropped
    /// (declared last, so sled has let go of it by then).
    scratch: Option<Scratch>,
}

#[derive(Debug)]
struct Commits {
    applied: u64,
    witness: Witness,
}

/// A private copy of a data directory, deleted on drop.
#[derive(Debug)]
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "could not remove the read-only copy");
        }
    }
}

/// The key under which every batch stores its commit number.
const COMMIT_KEY: &[u8] = b"W";

fn commit_number(db: &sled::Db, path: &Path) -> Result<Option<u64>> {
    match sled::Tree::get(db, COMMIT_KEY).map_err(backend)? {
        None => Ok(None),
        Some(v) => {
            let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| Error::WitnessDamaged {
                path: path.display().to_string(),
                problem: format!("the store's commit number is {} bytes, expected 8", v.len()),
            })?;
            Ok(Some(u64::from_be_bytes(bytes)))
        }
    }
}

/// Removes the snapshots a process killed while writing one left behind.
///
/// sled 0.34.7 writes a snapshot only while it opens a directory (when its log has moved
/// on since the last one): to `snap.<lsn>.generating`, fsynced, then renamed to
/// `snap.<lsn>`, and only then are older snapshots removed. But its open takes every
/// `snap.*` file as a candidate, the unfinished ones included, and
/// `snap.<lsn>.generating` sorts after `snap.<lsn>`: a process killed between creating
/// that file and renaming it leaves a store that no longer opens, "Read corrupted data at
/// file offset None". The kill test met it about once in a few thousand kills. Such a
/// file was never a snapshot sled relied on; the one thing sled did before it is zero the
/// bytes past the tip of the log it recovered, which a recovery from the previous
/// snapshot and the log reaches again. So removing it gives sled back the store as it
/// was.
///
/// Done under the data file's lock (sled takes the same exclusive lock when it opens):
/// a live engine's snapshot in progress is never touched, and a store in use is
/// [`Error::Locked`], as sled would say.
fn remove_unfinished_snapshots(dir: &Path) -> Result<()> {
    // Read and write, as sled opens it: where flock is emulated with fcntl (NFS), an
    // exclusive lock needs a writable descriptor.
    let data = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("db"))
    {
        Ok(f) => f,
        // A new store (or not a store yet): sled creates its data file before it writes
        // any snapshot, so there is nothing unfinished.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    try_lock(&data, dir)?;
    let mut removed = false;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(
                path = %dir.display(),
                file = %name,
                "removing a snapshot that a killed process left unfinished"
            );
            std::fs::remove_file(entry.path())?;
            removed = true;
        }
    }
    if removed {
        // The removal is durable before sled recovers (and writes a snapshot of its own).
        File::open(dir)?.sync_all()?;
    }
    // The lock goes with `data`, before sled takes it.
    drop(data);
    Ok(())
}

/// Takes the exclusive lock sled takes on its data file `data` in directory `dir`:
/// [`Error::Locked`] if another holds it, an I/O error if the lock could not be asked.
fn try_lock(data: &File, dir: &Path) -> Result<()> {
    match data.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
            path: dir.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

fn backend(e: sled::Error) -> Error {
    match e {
        sled::Error::Io(io) => Error::Io(io),
        other => Error::Backend(other.to_string()),
    }
}

impl SledLog {
    /// Opens (or creates) the store in directory `path`.
    ///
    /// # Errors
    ///
    /// [`Error::Locked`] if another engine has it open, or an I/O or backend error.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        remove_unfinished_snapshots(&path)?;
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    Error::Locked {
                        path: path.display().to_string(),
                    }
                }
                other => backend(other),
            })?;
        // sled keeps its pages in `<dir>/db`; that is the file to fdatasync.
        let data_file = File::open(path.join("db"))?;
        let found = commit_number(&db, &path)?;
        let witness = witness::check_and_open(&path, found)?;
        Ok(SledLog {
            db,
            data_file,
            path,
            synced_blobs: Mutex::new(HashSet::new()),
            commits: Mutex::new(Commits {
                applied: found.unwrap_or(0),
                witness,
            }),
            delivering: Mutex::new(()),
            scratch: None,
        })
    }

    /// Opens the store in `path` for reading without changing it: sled's own recovery
    /// writes to the directory it opens, so this copies the directory (sled's files, its
    /// blobs and the witness) to a private temporary one and opens the copy, with the
    /// same witness check as [`SledLog::open`]. Writes go to the copy and are lost when
    /// the store is dropped. Costs a copy of the directory.
    ///
    /// ```
    /// use sagaflow::store::{SagaLog, SledLog};
    ///
    /// let dir = tempfile::tempdir()?;
    /// drop(SledLog::open(dir.path())?);
    /// let copy = SledLog::open_read_only(dir.path())?;
    /// assert_ne!(copy.path(), dir.path());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Locked`] if an engine has the directory open (ask that engine instead),
    /// [`Error::LostWrites`] or [`Error::WitnessDamaged`] as for [`SledLog::open`], or an
    /// I/O error (including a directory that holds no store).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let db = File::open(path.join("db"))?;
        // sled holds an exclusive lock on its data file while open: a running engine's
        // directory is changing under us, and a copy of it would be torn.
        try_lock(&db, path)?;
        let scratch = Scratch(scratch_dir()?);
        copy_dir(path, &scratch.0)?;
        drop(db);
        let mut log = SledLog::open(&scratch.0)?;
        log.scratch = Some(scratch);
        Ok(log)
    }

    /// Opens the store, waiting up to `wait` for another engine (a previous process that
    /// is still exiting, or an engine in this process being dropped) to let go of it.
    ///
    /// Blocks the calling thread; call it from a blocking context.
    ///
    /// # Errors
    ///
    /// [`Error::Locked`] if it is still locked after `wait`, or as [`SledLog::open`].
    #[allow(clippy::disallowed_methods)] // see the comment below
    pub fn open_waiting(path: impl AsRef<Path>, wait: Duration) -> Result<Self> {
        // Wall-clock waiting here is about the operating system's file lock, not about
        // saga time, so it does not go through the injected clock.
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            match SledLog::open(path.as_ref()) {
                Err(Error::Locked { .. }) if start.elapsed() < wait => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Overwrites a raw value, bypassing every check: for tests of corrupt data.
    ///
    /// # Errors
    ///
    /// An I/O or backend error.
    #[cfg(any(test, feature = "test-support"))]
    pub fn put_raw(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.db.insert(key, value).map_err(backend)?;
        self.sync()
    }

    /// Every key and value, in key order: for tests of damaged stores.
    ///
    /// # Errors
    ///
    /// An I/O or backend error.
    pub fn dump(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.db
            .iter()
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(backend))
            .collect()
    }

    /// Deletes a raw key, bypassing every check: for tests of damaged stores.
    ///
    /// # Errors
    ///
    /// An I/O or backend error.
    #[cfg(any(test, feature = "test-support"))]
    pub fn delete_raw(&self, key: &[u8]) -> Result<()> {
        self.db.remove(key).map_err(backend)?;
        self.sync()
    }

    /// Bytes sled uses on disk.
    ///
    /// # Errors
    ///
    /// An I/O or backend error.
    pub fn size_on_disk(&self) -> Result<u64> {
        self.db.size_on_disk().map_err(backend)
    }

    /// How many of sled's blob files this store has made durable so far.
    pub fn blobs_synced(&self) -> usize {
        self.synced_blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// fsyncs the blob files written since the last sync, then the `blobs` directory
    /// (so the new names are durable too). The directory is usually empty: a cheap
    /// `readdir` per group commit.
    fn sync_blobs(&self) -> Result<()> {
        let dir = self.path.join("blobs");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut present = HashSet::new();
        let mut new_ones = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // Collected by sled between the listing and the open: nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
                new_ones = true;
            }
            present.insert(name);
        }
        if new_ones {
            File::open(&dir)?.sync_all()?;
        }
        *synced = present;
        Ok(())
    }

    fn apply(&self, ops: Vec<Op>) -> Result<()> {
        let mut batch = sled::Batch::default();
        // Counters are read and written under the commit lock, which every write takes:
        // the commit thread and retention never lose each other's counts.
        let mut commits = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        let mut counters: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>> =
            std::collections::HashMap::new();
        for op in ops {
            match op {
                Op::Put(k, v) => batch.insert(k, v),
                Op::Delete(k) => batch.remove(k),
                Op::Add(k, delta) => {
                    let current = match counters.get(&k) {
                        Some(v) => v.clone(),
                        None => Kv::get(&self.db, &k)?,
                    };
                    counters.insert(k, codec::add_to_count(current.as_deref(), delta));
                }
            }
        }
        for (k, v) in counters {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        let next = commits
            .applied
            .checked_add(1)
            .ok_or_else(|| Error::Backend("commit numbers exhausted".into()))?;
        batch.insert(COMMIT_KEY, &next.to_be_bytes());
        self.db.apply_batch(batch).map_err(backend)?;
        commits.applied = next;
        Ok(())
    }

    /// Refuses writes that would replace a stored log record: the log is append-only.
    fn refuse_overwrites(&self, writes: &[Write]) -> Result<()> {
        for w in writes {
            for r in &w.records {
                if self
                    .db
                    .contains_key(codec::log_key(w.saga, r.lsn))
                    .map_err(backend)?
                {
                    return Err(Error::WouldOverwrite {
                        saga: w.saga,
                        lsn: r.lsn,
                    });
                }
            }
        }
        Ok(())
    }
}

impl Kv for sled::Db {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(sled::Tree::get(self, key)
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_prefix(prefix)
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(backend))
            .collect()
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.scan_prefix(prefix)
            .next_back()
            .transpose()
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .map_err(backend)
    }

    fn visit(&self, prefix: &[u8], from: Option<&[u8]>, f: &mut kv::Visitor<'_>) -> Result<()> {
        let start = from.filter(|s| *s > prefix).unwrap_or(prefix).to_vec();
        for kv in self.range(start..) {
            let (k, v) = kv.map_err(backend)?;
            if !k.starts_with(prefix) || !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    fn visit_back(
        &self,
        prefix: &[u8],
        before: Option<&[u8]>,
        f: &mut kv::Visitor<'_>,
    ) -> Result<()> {
        let walk = match before.filter(|b| b.starts_with(prefix)) {
            Some(b) => self.range(prefix.to_vec()..b.to_vec()),
            None => self.scan_prefix(prefix),
        };
        for kv in walk.rev() {
            let (k, v) = kv.map_err(backend)?;
            if !k.starts_with(prefix) || !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }
}

impl SledLog {
    fn check_inner(&self, repair: bool) -> Result<super::check::Report> {
        let (report, ops) = super::check::check(&self.db)?;
        if repair && !ops.is_empty() {
            self.apply(ops)?;
            self.sync()?;
        }
        Ok(report)
    }
}

impl SagaLog for SledLog {
    fn inbox(&self) -> &dyn Inbox {
        self
    }

    fn check(&self) -> Result<super::check::Report> {
        self.check_inner(true)
    }

    fn append(&self, writes: Vec<Write>) -> Result<()> {
        self.refuse_overwrites(&writes)?;
        let mut all = Vec::new();
        for w in writes {
            all.extend(codec::ops(w)?);
        }
        // One batch for the whole group: atomic as a whole, which is stronger than the
        // per-write atomicity the trait asks for.
        self.apply(all)
    }

    fn sync(&self) -> Result<()> {
        // Everything applied up to here is made durable by the flush below; only then
        // may the witness say so.
        let applied = self
            .commits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .applied;
        self.db.flush().map_err(backend)?;
        self.data_file.sync_data()?;
        self.sync_blobs()?;
        self.commits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .witness
            .record(applied)
    }

    fn read(&self, saga: SagaId) -> Result<Vec<(Lsn, Vec<u8>)>> {
        kv::read(&self.db, saga)
    }

    fn meta(&self, saga: SagaId) -> Result<Option<SagaMeta>> {
        kv::meta(&self.db, saga)
    }

    fn with_status(&self, status: SagaStatus) -> Result<Vec<SagaId>> {
        kv::with_status(&self.db, status)
    }

    fn page(
        &self,
        status: Option<SagaStatus>,
        after: Option<SagaId>,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<SagaMeta>> {
        kv::page(&self.db, status, after, limit, newest_first)
    }

    fn counts(&self) -> Result<crate::store::Counts> {
        kv::counts(&self.db)
    }

    fn find_start_key(&self, key: &StartKey) -> Result<Option<SagaId>> {
        kv::find_start_key(&self.db, key)
    }

    fn finished_before(
        &self,
        until: Timestamp,
        after: Option<(Timestamp, SagaId)>,
        limit: usize,
    ) -> Result<Vec<(Timestamp, SagaId)>> {
        kv::finished_before(&self.db, until, after, limit)
    }

    fn due(&self, until: Timestamp) -> Result<Vec<(Timestamp, SagaId)>> {
        kv::due(&self.db, until)
    }

    fn drifted(&self, after: Option<SagaId>, limit: usize) -> Result<Vec<SagaMeta>> {
        kv::drifted(&self.db, after, limit)
    }

    fn position(&self, name: &str) -> Result<Option<(Timestamp, SagaId)>> {
        kv::position(&self.db, name)
    }

    fn set_position(&self, name: &str, at: (Timestamp, SagaId)) -> Result<()> {
        if kv::position(&self.db, name)?.is_some_and(|p| p >= at) {
            return Ok(());
        }
        self.apply(vec![Op::Put(
            codec::position_key(name),
            codec::encode_position(at)?,
        )])
    }

    fn remove(&self, saga: SagaId) -> Result<()> {
        let ops = kv::removal(&self.db, saga)?;
        self.apply(ops)
    }

    fn remove_batch(&self, sagas: &[SagaId]) -> Result<()> {
        // One sled batch for all of them: retention deletes thousands at a time.
        let mut ops = Vec::new();
        for s in sagas {
            ops.extend(kv::removal(&self.db, *s)?);
        }
        self.apply(ops)
    }
}

/// A new, empty directory of this process's own under the system's temporary directory.
fn scratch_dir() -> Result<PathBuf> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::Backend(format!("no randomness: {e}")))?;
    let dir = std::env::temp_dir().join(format!(
        "sagaflow-ro-{}-{}",
        std::process::id(),
        u64::from_le_bytes(b)
    ));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// Copies a directory's files and subdirectories (sled's `db`, `conf`, snapshots, `blobs/`
/// and the witness).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

impl Inbox for SledLog {
    fn deliver(
        &self,
        key: &str,
        id: &str,
        payload: &serde_json::Value,
        at: Timestamp,
    ) -> Result<Delivered> {
        let _one_at_a_time = self.delivering.lock().unwrap_or_else(|p| p.into_inner());
        let k = codec::inbox_key(key, id)?;
        let seen = Kv::get(&self.db, &k)?.is_some();
        if !seen {
            // A taken mark left from a delivery purged meanwhile is not this one's.
            self.apply(vec![
                Op::Delete(codec::taken_key(key, id)?),
                Op::Put(k, codec::encode_delivery(payload, at)?),
            ])?;
        }
        self.sync()?;
        Ok(if seen {
            Delivered::Duplicate
        } else {
            Delivered::New
        })
    }

    fn waiting(&self, key: &str) -> Result<Vec<Delivery>> {
        kv::inbox_waiting(&self.db, key)
    }

    fn deliveries(&self, after: Option<(&str, &str)>, limit: usize) -> Result<Vec<Delivery>> {
        kv::inbox_deliveries(&self.db, after, limit)
    }

    fn purge(&self, before: Timestamp) -> Result<usize> {
        let ops = kv::inbox_purge_ops(&self.db, before)?;
        let n = ops.len() / 2;
        if !ops.is_empty() {
            self.apply(ops)?;
            self.sync()?;
        }
        Ok(n)
    }
}
