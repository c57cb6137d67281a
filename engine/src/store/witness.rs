//! The witness: a small file beside the sled store that says how many group commits the
//! store has made durable, so that a store which lost committed writes is noticed.
//!
//! sled 0.34 checks each batch of its log with a CRC, and at open treats the first batch
//! that does not check out as a torn tail: it cuts recovery short there and zeroes the
//! rest of the segment. That is right after a power loss in the middle of a write, and
//! wrong after a flipped byte or a truncated file in the middle of committed data: every
//! batch after the damage is dropped without an error, and the sagas in them vanish
//! (a retried start key would then start a second saga). sled cannot tell the two apart;
//! the witness can. Every batch the store writes carries the next commit number, and
//! after each durable sync the witness file is overwritten with the last number synced
//! and fsynced. At open, the store must hold at least the witnessed number; fewer means
//! committed writes are missing, and the store refuses to open.
//!
//! The witness is written after the store's own sync, never before, so a crash between
//! the two leaves the store ahead of its witness (fine) and never behind it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::store::{Error, Result};

/// The witness file's name inside the data directory.
pub(crate) const FILE_NAME: &str = "sagaflow.witness";

const MAGIC: &[u8; 8] = b"SFWITN01";
const LEN: usize = 24;

fn checksum(bytes: &[u8]) -> u64 {
    // FNV-1a: enough to tell a damaged witness from a valid one.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn encode(seq: u64) -> [u8; LEN] {
    let mut out = [0u8; LEN];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seq.to_be_bytes());
    let sum = checksum(&out[..16]);
    out[16..].copy_from_slice(&sum.to_be_bytes());
    out
}

fn decode(bytes: &[u8]) -> std::result::Result<u64, String> {
    if bytes.len() != LEN {
        return Err(format!("witness of {} bytes, expected {LEN}", bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err("witness does not start with its magic bytes".into());
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[8..16]);
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&bytes[16..]);
    if u64::from_be_bytes(sum) != checksum(&bytes[..16]) {
        return Err("witness checksum does not match".into());
    }
    Ok(u64::from_be_bytes(seq))
}

/// The witness file of one data directory, open for writing.
#[derive(Debug)]
pub(crate) struct Witness {
    file: File,
    /// The last number written and synced.
    written: u64,
}

/// What the witness of a directory says, read without changing anything.
pub(crate) fn read(dir: &Path) -> Result<Option<u64>> {
    let path = dir.join(FILE_NAME);
    let mut f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::with_capacity(LEN);
    f.by_ref().take(LEN as u64 + 1).read_to_end(&mut bytes)?;
    decode(&bytes)
        .map(Some)
        .map_err(|problem| Error::WitnessDamaged {
            path: dir.display().to_string(),
            problem: format!("{}: {problem}", path.display()),
        })
}

/// Compares what the store holds (`found`, the last commit number in it) with what its
/// witness says, and returns the witness to keep writing. A directory with neither (new,
/// or written by an engine before witnesses existed) gets a witness at `found`.
pub(crate) fn check_and_open(dir: &Path, found: Option<u64>) -> Result<Witness> {
    let empty = std::fs::metadata(dir.join(FILE_NAME)).is_ok_and(|m| m.len() == 0);
    let witnessed = if empty && found.unwrap_or(0) == 0 {
        // Created but never written: a crash between the two, the first time this store
        // was opened (nothing was committed yet). Written afresh below.
        None
    } else {
        read(dir)?
    };
    let path_str = || dir.display().to_string();
    match (witnessed, found) {
        (Some(w), found) if found.unwrap_or(0) < w => {
            return Err(Error::LostWrites {
                path: path_str(),
                witnessed: w,
                found: found.unwrap_or(0),
            })
        }
        (None, Some(f)) if f > 0 => {
            return Err(Error::WitnessDamaged {
                path: path_str(),
                problem: format!(
                    "the witness file {FILE_NAME} is missing while the store holds commit {f}"
                ),
            })
        }
        _ => {}
    }
    let path: PathBuf = dir.join(FILE_NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    let mut w = Witness { file, written: 0 };
    match witnessed {
        Some(n) => w.written = n,
        None if empty => w.write(found.unwrap_or(0))?,
        None => {
            // A new witness: its name must be durable before any commit relies on it.
            w.write(found.unwrap_or(0))?;
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(w)
}

impl Witness {
    /// Records that every commit up to `seq` is durable in the store.
    pub(crate) fn record(&mut self, seq: u64) -> Result<()> {
        if seq <= self.written {
            return Ok(());
        }
        self.write(seq)
    }

    fn write(&mut self, seq: u64) -> Result<()> {
        // One 24-byte write at offset 0: inside one sector, so it lands whole or not at
        // all; fdatasync, since the file's size does not change after the first write.
        self.file.write_all_at(&encode(seq), 0)?;
        self.file.sync_data()?;
        self.written = seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        assert_eq!(decode(&encode(42)), Ok(42));
        let mut b = encode(42);
        b[9] ^= 1;
        assert!(decode(&b).is_err());
        assert!(decode(&b[..10]).is_err());
    }

    #[test]
    fn a_store_behind_its_witness_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = check_and_open(dir.path(), None).unwrap();
        w.record(7).unwrap();
        drop(w);
        assert!(matches!(
            check_and_open(dir.path(), Some(5)),
            Err(Error::LostWrites {
                witnessed: 7,
                found: 5,
                ..
            })
        ));
        assert!(check_and_open(dir.path(), Some(7)).is_ok());
        // Ahead of the witness: a crash between the store's sync and the witness's.
        assert!(check_and_open(dir.path(), Some(8)).is_ok());
        std::fs::remove_file(dir.path().join(FILE_NAME)).unwrap();
        assert!(matches!(
            check_and_open(dir.path(), Some(8)),
            Err(Error::WitnessDamaged { .. })
        ));
        // An empty witness over a store with commits is damage; over an empty store, a
        // crash right after creating it.
        std::fs::write(dir.path().join(FILE_NAME), b"").unwrap();
        assert!(matches!(
            check_and_open(dir.path(), Some(8)),
            Err(Error::WitnessDamaged { .. })
        ));
        assert!(check_and_open(dir.path(), None).is_ok());
        assert_eq!(read(dir.path()).unwrap(), Some(0));
    }
}
