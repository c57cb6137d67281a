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

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::clock::Timestamp;
use crate::ids::{Lsn, SagaId, StartKey};
use crate::machine::SagaStatus;
use crate::store::codec::{self, Op};
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
        Ok(SledLog {
            db,
            data_file,
            path,
            synced_blobs: Mutex::new(HashSet::new()),
        })
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
    pub fn put_raw(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.db.insert(key, value).map_err(backend)?;
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
        for op in ops {
            match op {
                Op::Put(k, v) => batch.insert(k, v),
                Op::Delete(k) => batch.remove(k),
            }
        }
        self.db.apply_batch(batch).map_err(backend)
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
}

impl SagaLog for SledLog {
    fn append(&self, writes: Vec<Write>) -> Result<()> {
        let mut all = Vec::new();
        for w in writes {
            all.extend(codec::ops(w)?);
        }
        // One batch for the whole group: atomic as a whole, which is stronger than the
        // per-write atomicity the trait asks for.
        self.apply(all)
    }

    fn sync(&self) -> Result<()> {
        self.db.flush().map_err(backend)?;
        self.data_file.sync_data()?;
        self.sync_blobs()
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

    fn find_start_key(&self, key: &StartKey) -> Result<Option<SagaId>> {
        kv::find_start_key(&self.db, key)
    }

    fn due(&self, until: Timestamp) -> Result<Vec<(Timestamp, SagaId)>> {
        kv::due(&self.db, until)
    }

    fn remove(&self, saga: SagaId) -> Result<()> {
        let ops = kv::removal(&self.db, saga)?;
        self.apply(ops)
    }
}
