//! The plugin executable, opened once. Every check is made on that open
//! descriptor — never on the path again — so what was checked is what runs:
//!
//! - it must be a regular, executable file, and not writable by group or
//!   others (unless the config allows it): such a file can be swapped by
//!   someone other than its owner;
//! - with a `sha256:` pin, the digest is computed from the descriptor and the
//!   child executes that same descriptor (`execveat(fd, "", AT_EMPTY_PATH)`),
//!   so replacing the file after the check (a rename, a new inode) changes
//!   nothing. Rewriting the *same* inode in place between the check and exec
//!   would need write permission on the file, which only its owner has
//!   (group/world-writable files are refused).
//!
//! Scripts (`#!`): executing a descriptor makes the kernel hand the
//! interpreter `/dev/fd/N`, which must stay open across exec. So a pinned
//! script keeps that one extra descriptor and sees `$0` as `/dev/fd/N`; an
//! unpinned one (like the Python example's launcher) is executed by path.
//! A pin on a script covers the script, not its interpreter.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
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
    /// Open read-only, close-on-exec.
    pub fd: OwnedFd,
    /// The digest computed from `fd`, when the manifest pins one.
    pub sha256: Option<String>,
    /// Starts with `#!`.
    pub script: bool,
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
        let mut head = [0u8; 2];
        let mut hasher = expected.map(|_| Sha256::new());
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0usize;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| PinError::Io(format!("cannot read {}: {e}", path.display())))?;
            if n == 0 {
                break;
            }
            if total < 2 {
                let take = (2 - total).min(n);
                head[total..total + take].copy_from_slice(&buf[..take]);
            }
            total += n;
            match hasher.as_mut() {
                Some(h) => h.update(&buf[..n]),
                // Only the first bytes matter without a pin.
                None if total >= 2 => break,
                None => {}
            }
        }
        let sha256 = hasher.map(|h| hex(&h.finalize()));
        if let (Some(expected), Some(actual)) = (expected, &sha256)
            && !expected.eq_ignore_ascii_case(actual)
        {
            return Err(PinError::Refused(format!(
                "sha256 mismatch for {}: expected {expected}, actual {actual}; refusing to run it. If this binary is intended, update `sha256:` in the manifest",
                path.display()
            )));
        }
        Ok(Executable {
            path: path.to_path_buf(),
            fd: OwnedFd::from(file),
            sha256,
            script: head == *b"#!",
        })
    }

    /// Whether the child must execute the descriptor rather than the path:
    /// when the bytes were pinned.
    pub fn exec_from_fd(&self) -> bool {
        self.sha256.is_some()
    }

    /// The descriptor to execute, duplicated for the spawn.
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.as_fd().try_clone_to_owned()
    }
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
