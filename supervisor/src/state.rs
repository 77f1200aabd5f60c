//! Plugin state snapshots on disk: what `ExportState` returned, written
//! atomically (temp file, fsync, rename, directory fsync) with a checksum and
//! the state version, so a restarted or upgraded plugin continues where it
//! stopped. A corrupt or partial snapshot is detected and skipped in favour of
//! the previous good one; the last [`KEEP`] snapshots are kept for that.
//!
//! A snapshot that cannot be *read* (permission denied, an I/O error,
//! something other than a file in its place) is not corrupt: it may hold the
//! newest state, so [`SnapshotStore::load`] fails instead of starting the
//! plugin without it, and pruning never removes such a file.
//!
//! File format (`<dir>/<plugin>/state.<seq>.snap`, little endian):
//!
//! ```text
//! "PVSNAP02"  magic, 8 bytes
//! u32         state version
//! u64         state length N
//! u32         CRC-32 (IEEE) of the 20 bytes above followed by the state bytes
//! N bytes     the state
//! ```
//!
//! The older `PVSNAP01` format is the same except that its CRC covers only
//! the state bytes (a flipped bit in its state version went unnoticed); it is
//! still read, never written.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The format written today: the checksum covers the header too.
const MAGIC: &[u8; 8] = b"PVSNAP02";
/// The first format: the checksum covers the state bytes only.
const MAGIC_V1: &[u8; 8] = b"PVSNAP01";
/// Bytes covered by the header checksum: magic, state version, length.
const CHECKED_HEADER: usize = 8 + 4 + 8;
const HEADER: usize = CHECKED_HEADER + 4;
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

/// Why the snapshots could not be loaded: a snapshot file (or the directory
/// holding them) could not be read. Starting without it would silently lose
/// the state it may hold, so the start stops instead.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the state snapshot {}: {source}. Hint: {}", path.display(), hint(source))]
pub struct LoadError {
    /// The snapshot file, or the plugin's snapshot directory.
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            "give the supervisor's user read access to it (check its owner and mode), or move it away to start the plugin without that state"
        }
        io::ErrorKind::IsADirectory | io::ErrorKind::NotADirectory => {
            "something other than a snapshot file is in its place; move it away"
        }
        _ => {
            "check the disk and the kernel log (dmesg); move the file away to start the plugin without that state"
        }
    }
}

/// Why a snapshot could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the state snapshot {}: {source}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// What reading one snapshot file found.
enum Read1 {
    Good(Snapshot),
    /// Read, and failed its checks: why.
    Corrupt(String),
    /// Gone between listing and opening (pruned meanwhile).
    Vanished,
    /// Could not be read.
    Unreadable(io::Error),
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

    /// Sequence numbers on disk, newest first. A missing directory holds none.
    fn sequences(&self) -> io::Result<Vec<u64>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut seqs: Vec<u64> = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(seq) = name
                .strip_prefix("state.")
                .and_then(|n| n.strip_suffix(".snap"))
                .and_then(|n| n.parse().ok())
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(seqs)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("state.{seq:020}.snap"))
    }

    /// The newest sequence number on disk, whether or not that snapshot is
    /// good; `None` when there is none (or the directory cannot be listed).
    pub fn latest_seq(&self) -> Option<u64> {
        self.sequences().ok()?.first().copied()
    }

    /// The newest snapshot that passes its checks. Corrupt newer ones are
    /// skipped and listed in [`Loaded::skipped`]; one that cannot be read is
    /// an error, as is a directory that cannot be listed.
    pub fn load(&self) -> Result<Loaded, LoadError> {
        let sequences = self.sequences().map_err(|source| LoadError {
            path: self.dir.clone(),
            source,
        })?;
        let mut loaded = Loaded::default();
        for seq in sequences {
            let path = self.path(seq);
            match read_snapshot(&path, seq) {
                Read1::Good(snapshot) => {
                    loaded.snapshot = Some(snapshot);
                    break;
                }
                Read1::Corrupt(why) => loaded.skipped.push(format!("{}: {why}", path.display())),
                Read1::Vanished => {}
                Read1::Unreadable(source) => return Err(LoadError { path, source }),
            }
        }
        Ok(loaded)
    }

    /// Writes a new snapshot atomically, reads it back to verify it, and
    /// prunes snapshots older than the newest [`KEEP`]. On failure the
    /// previous snapshots are untouched and the temp file is removed.
    ///
    /// Only files older than the new, verified snapshot are pruned, and only
    /// those that could be read: one that failed to read may be the only copy
    /// of some state and is left for the operator (with a warning).
    pub fn write(&self, state: &[u8], state_version: u32) -> Result<u64, WriteError> {
        let fail_dir = |source: io::Error| WriteError {
            path: self.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(fail_dir)?;
        let existing = self.sequences().map_err(fail_dir)?;
        let seq = existing.first().map_or(1, |s| s + 1);
        let path = self.path(seq);
        let fail = |source: io::Error| WriteError {
            path: path.clone(),
            source,
        };
        let tmp = self.dir.join(format!(".state.{seq:020}.tmp"));
        let result = (|| {
            let mut file = File::create(&tmp)?;
            file.write_all(&encode_header(state, state_version))?;
            file.write_all(state)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(e));
        }
        match read_snapshot(&path, seq) {
            Read1::Good(_) => {}
            Read1::Corrupt(why) => return Err(fail(io::Error::other(format!("read back: {why}")))),
            Read1::Vanished => {
                return Err(fail(io::Error::other(
                    "read back: the file vanished right after it was written",
                )));
            }
            Read1::Unreadable(e) => {
                return Err(fail(io::Error::new(e.kind(), format!("read back: {e}"))));
            }
        }
        // The new snapshot is good and newer than every file below.
        for old in existing.into_iter().skip(KEEP - 1) {
            let old_path = self.path(old);
            match read_snapshot(&old_path, old) {
                Read1::Good(_) | Read1::Corrupt(_) => {
                    if let Err(e) = std::fs::remove_file(&old_path)
                        && e.kind() != io::ErrorKind::NotFound
                    {
                        tracing::warn!(
                            "cannot prune the old state snapshot {}: {e}",
                            old_path.display()
                        );
                    }
                }
                Read1::Vanished => {}
                Read1::Unreadable(e) => tracing::warn!(
                    "keeping the old state snapshot {}: it cannot be read ({e}), so it is not pruned; move it away once it is not needed",
                    old_path.display()
                ),
            }
        }
        Ok(seq)
    }

    /// Removes the snapshots newer than `seq` (when an upgrade is rolled
    /// back, so the old version never restores the new version's state).
    /// Returns how many were removed.
    pub fn discard_after(&self, seq: u64) -> io::Result<usize> {
        let mut removed = 0;
        for newer in self.sequences()?.into_iter().take_while(|s| *s > seq) {
            match std::fs::remove_file(self.path(newer)) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot remove {}: {e}", self.path(newer).display()),
                    ));
                }
            }
        }
        if removed > 0 {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(removed)
    }
}

/// The header of a current-format snapshot of `state`.
fn encode_header(state: &[u8], state_version: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&state_version.to_le_bytes());
    header.extend_from_slice(&(state.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(state);
    header.extend_from_slice(&crc.finalize().to_le_bytes());
    header
}

fn read_snapshot(path: &Path, seq: u64) -> Read1 {
    let mut bytes = Vec::new();
    match File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Read1::Vanished,
        Err(e) => return Read1::Unreadable(e),
    }
    match decode(&bytes, seq) {
        Ok(snapshot) => Read1::Good(snapshot),
        Err(why) => Read1::Corrupt(why),
    }
}

fn decode(bytes: &[u8], seq: u64) -> Result<Snapshot, String> {
    if bytes.len() < HEADER {
        return Err(format!(
            "truncated: {} bytes, shorter than the {HEADER}-byte header",
            bytes.len()
        ));
    }
    let (header, state) = bytes.split_at(HEADER);
    let v1 = match &header[..8] {
        m if m == MAGIC => false,
        m if m == MAGIC_V1 => true,
        _ => return Err("not a plugvisor snapshot (bad magic)".into()),
    };
    let field = |at: usize, out: &mut [u8]| out.copy_from_slice(&header[at..at + out.len()]);
    let (mut version, mut len, mut crc) = ([0u8; 4], [0u8; 8], [0u8; 4]);
    field(8, &mut version);
    field(12, &mut len);
    field(20, &mut crc);
    let (state_version, len, crc) = (
        u32::from_le_bytes(version),
        u64::from_le_bytes(len),
        u32::from_le_bytes(crc),
    );
    if (state.len() as u64) < len {
        return Err(format!(
            "truncated: the header says {len} bytes, the file holds {}",
            state.len()
        ));
    }
    if state.len() as u64 > len {
        return Err(format!(
            "trailing bytes: the header says {len} bytes, the file holds {}",
            state.len()
        ));
    }
    let mut hasher = crc32fast::Hasher::new();
    if !v1 {
        hasher.update(&header[..CHECKED_HEADER]);
    }
    hasher.update(state);
    if hasher.finalize() != crc {
        return Err("checksum mismatch: the snapshot is corrupt".into());
    }
    Ok(Snapshot {
        state: state.to_vec(),
        state_version,
        seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SnapshotStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path(), "kv");
        (dir, store)
    }

    fn flip_byte(path: &Path, at: usize) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at] ^= 0xFF;
        std::fs::write(path, bytes).unwrap();
    }

    /// Replaces a snapshot file by a symlink to a directory: opening it
    /// works and `read` fails with EISDIR, even for root (which file modes do
    /// not stop), while `unlink` would still remove it as it would a file.
    fn make_unreadable(path: &Path) {
        let _ = std::fs::remove_file(path);
        let target = path.with_extension("dir");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, path).unwrap();
    }

    fn exists(path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }

    fn state_of(loaded: Result<Loaded, LoadError>) -> Vec<u8> {
        loaded.unwrap().snapshot.expect("a snapshot").state
    }

    #[test]
    fn checksum_is_the_standard_crc32() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn writes_and_loads_the_newest_snapshot() {
        let (_dir, store) = store();
        assert_eq!(store.load().unwrap().snapshot, None);
        assert_eq!(store.latest_seq(), None);
        assert_eq!(store.write(b"one", 1).unwrap(), 1);
        assert_eq!(store.write(b"two", 2).unwrap(), 2);
        assert_eq!(store.latest_seq(), Some(2));
        let loaded = store.load().unwrap();
        assert_eq!(
            loaded.snapshot,
            Some(Snapshot {
                state: b"two".to_vec(),
                state_version: 2,
                seq: 2
            })
        );
        assert!(loaded.skipped.is_empty());
        let bytes = std::fs::read(store.path(2)).unwrap();
        assert_eq!(&bytes[..8], b"PVSNAP02");
    }

    #[test]
    fn keeps_only_the_last_few() {
        let (_dir, store) = store();
        for i in 0..10u8 {
            store.write(&[i], 1).unwrap();
        }
        assert_eq!(store.sequences().unwrap(), vec![10, 9, 8]);
    }

    #[test]
    fn a_corrupt_newest_snapshot_falls_back_to_the_previous_one() {
        let (_dir, store) = store();
        store.write(b"good", 1).unwrap();
        store.write(b"newer", 1).unwrap();
        let newest = store.path(2);
        let len = std::fs::metadata(&newest).unwrap().len() as usize;
        flip_byte(&newest, len - 1);
        let loaded = store.load().unwrap();
        assert_eq!(loaded.snapshot.unwrap().state, b"good");
        assert_eq!(loaded.skipped.len(), 1);
        assert!(
            loaded.skipped[0].contains("checksum mismatch"),
            "{:?}",
            loaded.skipped
        );
    }

    #[test]
    fn a_corrupt_state_version_is_detected() {
        let (_dir, store) = store();
        store.write(b"good", 1).unwrap();
        store.write(b"newer", 7).unwrap();
        flip_byte(&store.path(2), 8);
        let loaded = store.load().unwrap();
        assert_eq!(loaded.snapshot.unwrap().state, b"good");
        assert!(
            loaded.skipped[0].contains("checksum mismatch"),
            "{:?}",
            loaded.skipped
        );
    }

    #[test]
    fn bad_magic_is_detected() {
        let (_dir, store) = store();
        store.write(b"good", 1).unwrap();
        store.write(b"newer", 1).unwrap();
        flip_byte(&store.path(2), 0);
        let loaded = store.load().unwrap();
        assert_eq!(loaded.snapshot.unwrap().state, b"good");
        assert!(
            loaded.skipped[0].contains("bad magic"),
            "{:?}",
            loaded.skipped
        );
    }

    #[test]
    fn a_truncated_snapshot_is_detected() {
        let (_dir, store) = store();
        store.write(b"good", 1).unwrap();
        store.write(b"partial write", 1).unwrap();
        let newest = store.path(2);
        let bytes = std::fs::read(&newest).unwrap();
        std::fs::write(&newest, &bytes[..bytes.len() - 3]).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.snapshot.unwrap().state, b"good");
        assert!(
            loaded.skipped[0].contains("truncated"),
            "{:?}",
            loaded.skipped
        );
        std::fs::write(&newest, &bytes[..5]).unwrap();
        assert!(store.load().unwrap().skipped[0].contains("truncated"));
    }

    #[test]
    fn reads_snapshots_of_the_first_format() {
        let (_dir, store) = store();
        std::fs::create_dir_all(store.dir()).unwrap();
        // PVSNAP01: the CRC covers the state bytes only.
        let state = b"from an older supervisor";
        let mut bytes = b"PVSNAP01".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&(state.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(state).to_le_bytes());
        bytes.extend_from_slice(state);
        std::fs::write(store.path(4), &bytes).unwrap();
        let snapshot = store.load().unwrap().snapshot.unwrap();
        assert_eq!(
            snapshot,
            Snapshot {
                state: state.to_vec(),
                state_version: 3,
                seq: 4
            }
        );
        // Corruption of its state is still caught.
        flip_byte(&store.path(4), HEADER);
        assert!(store.load().unwrap().skipped[0].contains("checksum mismatch"));
        // The next write continues its numbering, in the new format.
        assert_eq!(store.write(b"new", 3).unwrap(), 5);
        assert_eq!(state_of(store.load()), b"new");
    }

    #[test]
    fn an_unreadable_newest_snapshot_stops_the_load() {
        let (_dir, store) = store();
        store.write(b"older", 1).unwrap();
        store.write(b"newest", 1).unwrap();
        make_unreadable(&store.path(2));
        let err = store.load().unwrap_err();
        assert_eq!(err.path, store.path(2));
        let text = err.to_string();
        assert!(text.contains("state.00000000000000000002.snap"), "{text}");
        assert!(text.contains("Hint:"), "{text}");
        assert!(text.contains("Is a directory"), "{text}");
    }

    #[test]
    fn an_unreadable_older_snapshot_does_not_matter_when_a_newer_one_is_good() {
        let (_dir, store) = store();
        store.write(b"older", 1).unwrap();
        store.write(b"newest", 1).unwrap();
        make_unreadable(&store.path(1));
        assert_eq!(state_of(store.load()), b"newest");
    }

    #[test]
    fn an_unlistable_directory_stops_the_load() {
        let (dir, store) = store();
        // A file where the plugin's snapshot directory should be: ENOTDIR.
        std::fs::write(dir.path().join("kv"), b"not a directory").unwrap();
        let err = store.load().unwrap_err();
        assert_eq!(err.path, store.dir());
        assert!(err.to_string().contains("Hint:"), "{err}");
        assert_eq!(store.latest_seq(), None);
    }

    #[test]
    fn unreadable_snapshots_are_never_pruned() {
        let (_dir, store) = store();
        store.write(b"good", 1).unwrap();
        store.write(b"two", 1).unwrap();
        store.write(b"three", 1).unwrap();
        make_unreadable(&store.path(1));
        make_unreadable(&store.path(2));
        for i in 0..5u8 {
            store.write(&[i], 1).unwrap();
        }
        // 8, 7 and 6 are the newest; 5, 4 and 3 were read and pruned; 2 and 1
        // failed to read and are still there.
        assert_eq!(store.sequences().unwrap(), vec![8, 7, 6, 2, 1]);
        assert!(exists(&store.path(1)) && exists(&store.path(2)));
    }

    #[test]
    fn the_last_good_snapshot_survives_newer_unreadable_ones() {
        let (_dir, store) = store();
        store.write(b"good", 1).unwrap();
        // Newer files that cannot be read, then a write: the good one is
        // older than KEEP files but only a verified newer one lets it go.
        for seq in 2..=4 {
            make_unreadable(&store.path(seq));
        }
        assert!(store.load().is_err());
        let err = {
            // Block the new file from being written: the write fails, and
            // nothing is pruned.
            std::fs::create_dir(store.dir().join(".state.00000000000000000005.tmp")).unwrap();
            store.write(b"lost", 1).unwrap_err()
        };
        assert!(
            err.to_string().contains("state.00000000000000000005.snap"),
            "{err}"
        );
        assert!(exists(&store.path(1)), "the last good snapshot is kept");
        std::fs::remove_dir(store.dir().join(".state.00000000000000000005.tmp")).unwrap();
        // With a verified newer snapshot, pruning may go on, but the
        // unreadable ones stay.
        assert_eq!(store.write(b"new", 1).unwrap(), 5);
        assert_eq!(store.sequences().unwrap(), vec![5, 4, 3, 2]);
        assert_eq!(state_of(store.load()), b"new");
    }

    #[test]
    fn an_io_error_stops_the_load() {
        let (_dir, store) = store();
        store.write(b"older", 1).unwrap();
        store.write(b"newest", 1).unwrap();
        // Reading /proc/self/mem at offset 0 (an unmapped address) fails
        // with EIO, for root too.
        std::fs::remove_file(store.path(2)).unwrap();
        std::os::unix::fs::symlink("/proc/self/mem", store.path(2)).unwrap();
        let err = store.load().unwrap_err();
        assert_eq!(err.source.raw_os_error(), Some(libc::EIO), "{err}");
        assert!(err.to_string().contains("dmesg"), "{err}");
    }

    #[test]
    fn a_snapshot_without_read_permission_stops_the_load() {
        use std::os::unix::fs::PermissionsExt;
        if nix::unistd::geteuid().is_root() {
            eprintln!(
                "skipped: root reads files whatever their mode (EISDIR and EIO cover the path)"
            );
            return;
        }
        let (_dir, store) = store();
        store.write(b"newest", 1).unwrap();
        std::fs::set_permissions(store.path(1), std::fs::Permissions::from_mode(0o000)).unwrap();
        let err = store.load().unwrap_err();
        assert_eq!(err.source.kind(), io::ErrorKind::PermissionDenied, "{err}");
        assert!(err.to_string().contains("read access"), "{err}");
    }

    #[test]
    fn discards_snapshots_newer_than_a_sequence() {
        let (_dir, store) = store();
        assert_eq!(store.discard_after(0).unwrap(), 0);
        store.write(b"old version", 1).unwrap();
        store.write(b"new version", 2).unwrap();
        store.write(b"new version again", 2).unwrap();
        assert_eq!(store.discard_after(1).unwrap(), 2);
        assert_eq!(store.latest_seq(), Some(1));
        assert_eq!(state_of(store.load()), b"old version");
        assert_eq!(store.discard_after(1).unwrap(), 0);
        // Numbering goes on from what is left.
        assert_eq!(store.write(b"after rollback", 1).unwrap(), 2);
    }

    #[test]
    fn a_failed_write_leaves_the_previous_snapshot_and_no_temp_file() {
        let (_dir, store) = store();
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
        assert_eq!(state_of(store.load()), b"good");
        let leftovers: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
