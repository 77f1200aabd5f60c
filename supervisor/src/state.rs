//! Plugin state snapshots on disk: what `ExportState` returned, written
//! atomically (temp file, fsync, rename, directory fsync) with a checksum and
//! the state version, so a restarted or upgraded plugin continues where it
//! stopped. A corrupt or partial snapshot is detected and skipped in favour of
//! the previous good one; the last [`KEEP`] snapshots are kept for that.
//!
//! File format (`<dir>/<plugin>/state.<seq>.snap`, little endian):
//!
//! ```text
//! "PVSNAP01"  magic, 8 bytes
//! u32         state version
//! u64         state length N
//! u32         CRC-32 of the state bytes
//! N bytes     the state
//! ```

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"PVSNAP01";
const HEADER: usize = 8 + 4 + 8 + 4;
/// Snapshots kept per plugin: the newest and the ones before it, so a
/// corrupt newest one still leaves a good one.
pub const KEEP: usize = 3;

/// A plugin's exported state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub state: Vec<u8>,
    pub state_version: u32,
    /// Its sequence number on disk (higher is newer).
    pub seq: u64,
}

/// What loading found: the newest good snapshot, and what was skipped.
#[derive(Debug, Default)]
pub struct Loaded {
    pub snapshot: Option<Snapshot>,
    /// Newer snapshots that failed their checks, with why.
    pub skipped: Vec<String>,
}

/// Why a snapshot could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the state snapshot {path}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Snapshots of one plugin, under `<state_dir>/<plugin>/`.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
}

impl SnapshotStore {
    pub fn new(state_dir: &Path, plugin: &str) -> Self {
        SnapshotStore {
            dir: state_dir.join(plugin),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sequence numbers on disk, newest first.
    fn sequences(&self) -> Vec<u64> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut seqs: Vec<u64> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("state.")?
                    .strip_suffix(".snap")?
                    .parse()
                    .ok()
            })
            .collect();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        seqs
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("state.{seq:020}.snap"))
    }

    /// The newest snapshot that passes its checks.
    pub fn load(&self) -> Loaded {
        let mut loaded = Loaded::default();
        for seq in self.sequences() {
            let path = self.path(seq);
            match read_snapshot(&path, seq) {
                Ok(snapshot) => {
                    loaded.snapshot = Some(snapshot);
                    break;
                }
                Err(why) => loaded.skipped.push(format!("{}: {why}", path.display())),
            }
        }
        loaded
    }

    /// Writes a new snapshot atomically and prunes old ones. On failure the
    /// previous snapshots are untouched and the temp file is removed.
    pub fn write(&self, state: &[u8], state_version: u32) -> Result<u64, WriteError> {
        let seq = self.sequences().first().map_or(1, |s| s + 1);
        let path = self.path(seq);
        let fail = |source: io::Error| WriteError {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(fail)?;
        let tmp = self.dir.join(format!(".state.{seq:020}.tmp"));
        let result = (|| {
            let mut file = File::create(&tmp)?;
            let mut header = Vec::with_capacity(HEADER);
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&state_version.to_le_bytes());
            header.extend_from_slice(&(state.len() as u64).to_le_bytes());
            header.extend_from_slice(&crc32(state).to_le_bytes());
            file.write_all(&header)?;
            file.write_all(state)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(e));
        }
        for old in self.sequences().into_iter().skip(KEEP) {
            let _ = std::fs::remove_file(self.path(old));
        }
        Ok(seq)
    }
}

impl SnapshotStore {
    /// Removes the snapshots newer than `seq`; returns how many.
    pub fn discard_after(&self, seq: u64) -> io::Result<usize> {
        let mut removed = 0;
        for newer in self.sequences().into_iter().filter(|s| *s > seq) {
            std::fs::remove_file(self.path(newer))?;
            removed += 1;
        }
        Ok(removed)
    }
}

fn read_snapshot(path: &Path, seq: u64) -> Result<Snapshot, String> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err("not a plugvisor snapshot (bad header)".into());
    }
    let word = |range: std::ops::Range<usize>| -> [u8; 4] {
        let mut out = [0u8; 4];
        out.copy_from_slice(&bytes[range]);
        out
    };
    let state_version = u32::from_le_bytes(word(8..12));
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len);
    let crc = u32::from_le_bytes(word(20..24));
    let state = &bytes[HEADER..];
    if state.len() as u64 != len {
        return Err(format!(
            "truncated: the header says {len} bytes, the file holds {}",
            state.len()
        ));
    }
    if crc32(state) != crc {
        return Err("checksum mismatch: the state bytes are corrupt".into());
    }
    Ok(Snapshot {
        state: state.to_vec(),
        state_version,
        seq,
    })
}

/// CRC-32 (IEEE 802.3, the zlib polynomial).
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for byte in data {
        crc = TABLE[((crc ^ u32::from(*byte)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn writes_and_loads_the_newest_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path(), "kv");
        assert_eq!(store.load().snapshot, None);
        assert_eq!(store.write(b"one", 1).unwrap(), 1);
        assert_eq!(store.write(b"two", 2).unwrap(), 2);
        let loaded = store.load();
        assert_eq!(
            loaded.snapshot,
            Some(Snapshot {
                state: b"two".to_vec(),
                state_version: 2,
                seq: 2
            })
        );
        assert!(loaded.skipped.is_empty());
    }

    #[test]
    fn keeps_only_the_last_few() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path(), "kv");
        for i in 0..10u8 {
            store.write(&[i], 1).unwrap();
        }
        assert_eq!(store.sequences(), vec![10, 9, 8]);
    }

    #[test]
    fn a_corrupt_newest_snapshot_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path(), "kv");
        store.write(b"good", 1).unwrap();
        store.write(b"newer", 1).unwrap();
        let newest = store.path(2);
        let mut bytes = std::fs::read(&newest).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        std::fs::write(&newest, bytes).unwrap();
        let loaded = store.load();
        assert_eq!(loaded.snapshot.unwrap().state, b"good");
        assert_eq!(loaded.skipped.len(), 1);
        assert!(
            loaded.skipped[0].contains("checksum mismatch"),
            "{:?}",
            loaded.skipped
        );
    }

    #[test]
    fn a_truncated_snapshot_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path(), "kv");
        store.write(b"good", 1).unwrap();
        store.write(b"partial write", 1).unwrap();
        let newest = store.path(2);
        let bytes = std::fs::read(&newest).unwrap();
        std::fs::write(&newest, &bytes[..bytes.len() - 3]).unwrap();
        let loaded = store.load();
        assert_eq!(loaded.snapshot.unwrap().state, b"good");
        assert!(
            loaded.skipped[0].contains("truncated"),
            "{:?}",
            loaded.skipped
        );
    }

    #[test]
    fn a_failed_write_leaves_the_previous_snapshot_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path(), "kv");
        store.write(b"good", 1).unwrap();
        // Make the temp file unwritable: a directory where it goes.
        let blocker = store.dir().join(".state.00000000000000000002.tmp");
        std::fs::create_dir(&blocker).unwrap();
        let err = store.write(b"lost", 1).unwrap_err();
        assert!(
            err.to_string().contains("state.00000000000000000002.snap"),
            "{err}"
        );
        std::fs::remove_dir(&blocker).unwrap();
        assert_eq!(store.load().snapshot.unwrap().state, b"good");
        let leftovers: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
