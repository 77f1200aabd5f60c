//! The plugin executable, opened once. Every check is made on that open
//! descriptor — never on the path again:
//!
//! - it must be a regular, executable file, and not writable by group or
//!   others (unless the config allows it): such a file can be swapped by
//!   someone other than its owner;
//! - with a `sha256:` pin, its bytes are copied into a sealed memfd
//!   (`memfd_create`, then `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW |
//!   F_SEAL_SEAL`), the digest is computed from the sealed copy, and the
//!   child executes that copy (`execveat(fd, "", AT_EMPTY_PATH)`). The
//!   guarantee: the bytes that run are exactly the bytes that were hashed.
//!   Nobody — not the file's owner, not root — can change a sealed memfd,
//!   so neither replacing the file (a rename, a new inode) nor rewriting
//!   the same inode in place after the check changes what runs. A pinned
//!   binary costs its size in memory per start, for as long as it runs.
//!
//! Scripts (`#!`): executing a descriptor makes the kernel hand the
//! interpreter `/dev/fd/N`, which must stay open across exec. So a pinned
//! script keeps that one extra descriptor (the sealed copy) and sees `$0` as
//! `/dev/fd/N`; an unpinned one (like the Python example's launcher) is
//! executed by path. A pin on a script covers the script, not its
//! interpreter, nor anything the script reads.

use sha2::{Digest, Sha256};
use std::io::{Read, Seek};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why an executable may not run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PinError {
    /// The file is not acceptable: a changed digest, writable by others, not
    /// executable. Retrying will not help until someone changes it.
    #[error("{0}")]
    Refused(String),
    /// It could not be read (missing, permissions).
    #[error("{0}")]
    Io(String),
}

/// An executable opened for a start.
#[derive(Debug)]
pub struct Executable {
    pub path: PathBuf,
    /// What to execute: with a pin, the sealed in-memory copy whose digest
    /// was checked; without one, the file itself (read-only). Close-on-exec.
    pub fd: OwnedFd,
    /// The digest computed from the sealed copy, when the manifest pins one
    /// or a signature is checked.
    pub sha256: Option<String>,
    /// Starts with `#!`.
    pub script: bool,
    /// `fd` is a sealed copy: the child executes it, not the path.
    pub sealed: bool,
}

impl Executable {
    /// Opens `path` and checks it: a regular executable file, not writable by
    /// group or others unless `allow_writable`, and with the `expected`
    /// SHA-256 if one is given.
    pub fn open(
        path: &Path,
        expected: Option<&str>,
        allow_writable: bool,
    ) -> Result<Executable, PinError> {
        Self::open_with(path, expected, allow_writable, expected.is_some())
    }

    /// [`Self::open`]; with `seal`, the bytes are copied into a sealed memfd
    /// and their digest recorded even without an `expected` one (a
    /// signature is checked against it).
    pub fn open_with(
        path: &Path,
        expected: Option<&str>,
        allow_writable: bool,
        seal: bool,
    ) -> Result<Executable, PinError> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| PinError::Io(format!("cannot open {}: {e}", path.display())))?;
        let meta = file
            .metadata()
            .map_err(|e| PinError::Io(format!("cannot stat {}: {e}", path.display())))?;
        if !meta.is_file() || meta.mode() & 0o111 == 0 {
            return Err(PinError::Refused(format!(
                "{} is not an executable file (mode {:04o})",
                path.display(),
                meta.mode() & 0o7777
            )));
        }
        if meta.mode() & 0o6000 != 0 {
            return Err(PinError::Refused(format!(
                "{} is set-user-ID or set-group-ID (mode {:04o}); plugins run with no_new_privs, under which the bit grants nothing, and a privileged binary has no place among plugins: `chmod ug-s` it",
                path.display(),
                meta.mode() & 0o7777
            )));
        }
        if meta.mode() & 0o022 != 0 && !allow_writable {
            return Err(PinError::Refused(format!(
                "{} is writable by {} (mode {:04o}), so someone other than its owner could replace what runs; `chmod go-w` it, or set allow_writable_executables: true in the supervisor config",
                path.display(),
                match (meta.mode() & 0o020 != 0, meta.mode() & 0o002 != 0) {
                    (true, true) => "its group and everyone",
                    (true, false) => "its group",
                    _ => "everyone",
                },
                meta.mode() & 0o7777
            )));
        }
        if expected.is_none() && !seal {
            let mut head = [0u8; 2];
            let n = read_head(&mut file, &mut head)
                .map_err(|e| PinError::Io(format!("cannot read {}: {e}", path.display())))?;
            return Ok(Executable {
                path: path.to_path_buf(),
                fd: OwnedFd::from(file),
                sha256: None,
                script: n == 2 && head == *b"#!",
                sealed: false,
            });
        }
        let sealed = sealed_copy(&mut file, path)?;
        drop(file);
        let mut sealed = std::fs::File::from(sealed);
        let mut hasher = Sha256::new();
        let mut head = [0u8; 2];
        let n = read_head(&mut sealed, &mut head).map_err(|e| {
            PinError::Io(format!("cannot read the copy of {}: {e}", path.display()))
        })?;
        hasher.update(&head[..n]);
        std::io::copy(&mut sealed, &mut hasher).map_err(|e| {
            PinError::Io(format!("cannot read the copy of {}: {e}", path.display()))
        })?;
        let actual = hex(&hasher.finalize());
        if let Some(expected) = expected
            && !expected.eq_ignore_ascii_case(&actual)
        {
            return Err(PinError::Refused(format!(
                "sha256 mismatch for {}: expected {expected}, actual {actual}; refusing to run it. If this binary is intended, update `sha256:` in the manifest",
                path.display()
            )));
        }
        Ok(Executable {
            path: path.to_path_buf(),
            fd: OwnedFd::from(sealed),
            sha256: Some(actual),
            script: n == 2 && head == *b"#!",
            sealed: true,
        })
    }

    /// Whether the child must execute the descriptor rather than the path:
    /// when the bytes were sealed (pinned or signed).
    pub fn exec_from_fd(&self) -> bool {
        self.sealed
    }

    /// The descriptor to execute, duplicated for the spawn.
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.as_fd().try_clone_to_owned()
    }

    /// The digest of the file as opened (not sealed), read through the
    /// descriptor without moving its offset. A file being executed cannot
    /// be written (ETXTBSY), so while the child runs this is what it runs;
    /// only a sealed copy guarantees it from the check on.
    pub fn digest_of_file(&self) -> std::io::Result<String> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::from(self.fd.as_fd().try_clone_to_owned()?);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut offset = 0u64;
        loop {
            let n = file.read_at(&mut buf, offset)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        Ok(hex(&hasher.finalize()))
    }

    /// What identifies the file's content for [`DigestCache`]: device,
    /// inode, size, modification and change times (any write moves them).
    pub fn content_key(&self) -> std::io::Result<ContentKey> {
        let meta = std::fs::File::from(self.fd.as_fd().try_clone_to_owned()?).metadata()?;
        Ok(ContentKey([
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime() as u64,
            meta.mtime_nsec() as u64,
            meta.ctime() as u64,
            meta.ctime_nsec() as u64,
        ]))
    }
}

/// See [`Executable::content_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentKey([u64; 7]);

/// Digests of unsealed executables by content key, so restarts and many
/// plugins sharing one binary hash it once. Bounded: cleared when full.
#[derive(Debug, Default)]
pub struct DigestCache(std::sync::Mutex<std::collections::HashMap<ContentKey, String>>);

impl DigestCache {
    const MAX: usize = 4096;

    /// The digest of `exe` as opened, from the cache or computed now.
    pub fn digest(&self, exe: &Executable) -> std::io::Result<String> {
        if let Some(digest) = &exe.sha256 {
            return Ok(digest.clone());
        }
        let key = exe.content_key()?;
        // Plain inserts and lookups: a poisoned lock is still consistent.
        if let Some(d) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(d.clone());
        }
        let digest = exe.digest_of_file()?;
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(key, digest.clone());
        Ok(digest)
    }
}

/// Reads up to `head.len()` bytes from the start; returns how many.
fn read_head(file: &mut std::fs::File, head: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The seals that make a memfd immutable: no write, no size change, and no
/// removing them.
const SEALS: libc::c_int =
    libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Copies `file` into a new memfd and seals it; the returned descriptor is
/// close-on-exec and positioned at the start.
fn sealed_copy(file: &mut std::fs::File, path: &Path) -> Result<OwnedFd, PinError> {
    let fail = |what: &str, e: std::io::Error| {
        PinError::Io(format!(
            "cannot make a sealed copy of {} to execute ({what}): {e}",
            path.display()
        ))
    };
    let name = path
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_default();
    let name = std::ffi::CString::new([b"plugvisor:".as_slice(), &name].concat())
        .unwrap_or_else(|_| c"plugvisor".to_owned());
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // MFD_EXEC (Linux 6.3) keeps it executable under vm.memfd_noexec=1;
    // older kernels reject the flag, and their memfds are executable anyway.
    // SAFETY: memfd_create with a valid C string and flags returns a new
    // descriptor.
    let mut fd = unsafe { libc::memfd_create(name.as_ptr(), flags | libc::MFD_EXEC) };
    if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // SAFETY: as above.
        fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    }
    if fd < 0 {
        return Err(fail("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned it; nobody else owns it.
    let mut memfd = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    std::io::copy(file, &mut memfd).map_err(|e| fail("copy", e))?;
    // SAFETY: fcntl on our own descriptor with integer arguments.
    if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } < 0 {
        return Err(fail("F_ADD_SEALS", std::io::Error::last_os_error()));
    }
    memfd
        .seek(std::io::SeekFrom::Start(0))
        .map_err(|e| fail("seek", e))?;
    Ok(OwnedFd::from(memfd))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a file, as `sha256sum` prints it (for `plugvisor check`
/// and tests).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const HELLO_SHA256: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

    fn file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_matching_pin_opens_and_records_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path(), "bin", b"hello\n", 0o755);
        assert_eq!(sha256_file(&path).unwrap(), HELLO_SHA256);
        let exe = Executable::open(&path, Some(&HELLO_SHA256.to_uppercase()), false).unwrap();
        assert_eq!(exe.sha256.as_deref(), Some(HELLO_SHA256));
        assert!(exe.exec_from_fd() && !exe.script);
        let unpinned = Executable::open(&path, None, false).unwrap();
        assert!(!unpinned.exec_from_fd() && unpinned.sha256.is_none());
    }

    #[test]
    fn a_mismatch_is_refused_naming_both_digests() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path(), "bin", b"hello\n", 0o755);
        let wrong = "0".repeat(64);
        let e = Executable::open(&path, Some(&wrong), false).unwrap_err();
        let PinError::Refused(text) = e else {
            panic!("{e}")
        };
        assert!(text.contains(&format!("expected {wrong}")), "{text}");
        assert!(text.contains(&format!("actual {HELLO_SHA256}")), "{text}");
    }

    #[test]
    fn writable_or_non_executable_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let group = file(dir.path(), "g", b"x", 0o775);
        let e = Executable::open(&group, None, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("writable by its group") && e.contains("0775"),
            "{e}"
        );
        assert!(Executable::open(&group, None, true).is_ok());
        let world = file(dir.path(), "w", b"x", 0o757);
        let e = Executable::open(&world, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("writable by everyone"), "{e}");
        let plain = file(dir.path(), "p", b"x", 0o644);
        let e = Executable::open(&plain, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an executable file"), "{e}");
        let missing = Executable::open(&dir.path().join("nope"), None, false).unwrap_err();
        assert!(matches!(missing, PinError::Io(_)), "{missing}");
    }

    #[test]
    fn scripts_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path(), "s", b"#!/bin/sh\nexit 0\n", 0o755);
        assert!(Executable::open(&path, None, false).unwrap().script);
        let one = file(dir.path(), "one", b"#", 0o755);
        assert!(!Executable::open(&one, None, false).unwrap().script);
    }
}

/// A pinned executable runs the bytes that were hashed, whatever happens to
/// the file afterwards.
#[cfg(test)]
mod exec_tests {
    use super::*;
    use crate::isolation::preexec::{ChildSetup, ExecFd};
    use crate::process::{ExitStatus, ProcessManager, SpawnSpec};
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    fn spec(program: &Path) -> SpawnSpec {
        SpawnSpec {
            program: program.to_path_buf(),
            args: Vec::new(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: "/".into(),
        }
    }

    /// Rewrites `path` in place: same inode, by its owner.
    fn rewrite_in_place(path: &Path, bytes: &[u8]) {
        let before = std::fs::metadata(path).unwrap().ino();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
        assert_eq!(std::fs::metadata(path).unwrap().ino(), before);
    }

    async fn run(exe: Executable) -> (ExitStatus, String) {
        let pm = ProcessManager::new().unwrap();
        let exec = ExecFd {
            keep_open: exe.script,
            fd: exe.fd,
        };
        let mut child = pm
            .spawn_with(&spec(&exe.path), ChildSetup::default(), Some(exec))
            .await
            .unwrap();
        let mut out = String::new();
        let mut stdout = child.stdout.take().unwrap();
        let read = tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut out);
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .unwrap()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .unwrap();
        (status, out)
    }

    #[tokio::test]
    async fn a_binary_rewritten_in_place_after_the_check_still_runs_the_checked_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugin");
        let truth = std::fs::read("/bin/true").unwrap();
        let lie = std::fs::read("/bin/false").unwrap();
        std::fs::write(&path, &truth).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let pin = sha256_file(&path).unwrap();
        let exe = Executable::open(&path, Some(&pin), false).unwrap();
        rewrite_in_place(&path, &lie);
        let (status, _) = run(exe).await;
        assert_eq!(status, ExitStatus::Exited(0), "the rewritten bytes ran");
    }

    #[tokio::test]
    async fn a_script_rewritten_in_place_after_the_check_still_runs_the_checked_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugin.sh");
        std::fs::write(&path, "#!/bin/sh\necho verified\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let pin = sha256_file(&path).unwrap();
        let exe = Executable::open(&path, Some(&pin), false).unwrap();
        assert!(exe.script);
        rewrite_in_place(&path, b"#!/bin/sh\necho swapped\n");
        let (status, out) = run(exe).await;
        assert_eq!(
            (status, out.as_str()),
            (ExitStatus::Exited(0), "verified\n")
        );
    }

    #[test]
    fn the_copy_that_runs_is_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugin.sh");
        std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let pin = sha256_file(&path).unwrap();
        let exe = Executable::open(&path, Some(&pin), false).unwrap();
        // SAFETY: fcntl on our own descriptor.
        let seals = unsafe { libc::fcntl(exe.fd.as_raw_fd(), libc::F_GET_SEALS) };
        assert!(
            seals >= 0,
            "not a memfd: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(seals & SEALS, SEALS);
        // Open for writing, and still refused: the seal holds.
        let mut f = std::fs::File::from(exe.fd);
        let e = f.write_all(b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    }
}
