//! The runtime directory: where the control socket and every plugin's socket
//! live. Whoever can write in it can replace those sockets, so it is created
//! without following symlinks and refused, with a reason, when it is a
//! symlink, not a directory, owned by another user, or writable by group or
//! others. Its `plugins/` subdirectory gets the same checks, and the socket
//! directories an earlier run left there are swept at start.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Why a runtime directory cannot be trusted or made.
#[derive(Debug, thiserror::Error)]
#[error("runtime directory {path}: {reason}")]
pub struct RunDirError {
    pub path: PathBuf,
    pub reason: String,
}

/// Makes sure `path` is a directory only this process's user can write in:
/// creates it with `mode` when missing (parents as needed), sets `mode` on
/// it, and refuses a symlink, a non-directory, another owner, or group- or
/// world-writable permissions.
pub fn secure_dir(path: &Path, mode: u32) -> Result<(), RunDirError> {
    let fail = |reason: String| RunDirError {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .map_err(|e| fail(format!("cannot create its parent: {e}")))?;
    }
    let created = match nix::unistd::mkdir(path, nix::sys::stat::Mode::from_bits_truncate(mode)) {
        Ok(()) => true,
        Err(nix::errno::Errno::EEXIST) => false,
        Err(e) => return Err(fail(format!("cannot create it: {e}"))),
    };
    let dir = open_nofollow(path).map_err(|e| {
        let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        match e.raw_os_error() {
            _ if is_link => fail(
                "it is a symbolic link; refusing to follow it (another user could point it anywhere). Remove it, or choose another runtime_dir".into(),
            ),
            Some(libc::ENOTDIR) => fail("it is not a directory".into()),
            _ => fail(format!("cannot open it: {e}")),
        }
    })?;
    let stat = nix::sys::stat::fstat(&dir).map_err(|e| fail(format!("cannot stat it: {e}")))?;
    let me = nix::unistd::geteuid().as_raw();
    if stat.st_uid != me {
        return Err(fail(format!(
            "it is owned by uid {}, not by this supervisor's uid {me}; another user could replace the sockets in it. Remove it, or choose another runtime_dir",
            stat.st_uid
        )));
    }
    let perm = stat.st_mode & 0o7777;
    if !created && perm & 0o022 != 0 {
        return Err(fail(format!(
            "it is writable by {} (mode {perm:04o}), so another user could replace the sockets in it. Remove it or `chmod go-w` it",
            if perm & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            }
        )));
    }
    if perm != mode {
        nix::sys::stat::fchmod(&dir, nix::sys::stat::Mode::from_bits_truncate(mode))
            .map_err(|e| fail(format!("cannot set mode {mode:04o}: {e}")))?;
    }
    Ok(())
}

fn open_nofollow(path: &Path) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open(2) with a valid NUL-terminated path and flags only.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    debug_assert!(fd.as_raw_fd() >= 0);
    Ok(fd)
}

/// Prepares `<runtime_dir>` (mode 0711: others may reach a socket they are
/// allowed to, but not list) and `<runtime_dir>/plugins`, and removes the
/// socket directories an earlier run left in it. Returns how many it swept.
pub fn prepare(runtime_dir: &Path) -> Result<usize, RunDirError> {
    prepare_keeping(runtime_dir, &[])
}

/// [`prepare`], keeping the socket directories named in `keep`: those of
/// instances taken over from a previous supervisor image.
pub fn prepare_keeping(runtime_dir: &Path, keep: &[String]) -> Result<usize, RunDirError> {
    secure_dir(runtime_dir, 0o711)?;
    let plugins = runtime_dir.join("plugins");
    secure_dir(&plugins, 0o711)?;
    let entries = std::fs::read_dir(&plugins).map_err(|e| RunDirError {
        path: plugins.clone(),
        reason: format!("cannot list it: {e}"),
    })?;
    let mut swept = 0;
    for entry in entries.filter_map(Result::ok) {
        // remove_dir_all does not follow symlinks: a planted link is removed
        // itself, not what it points to.
        let path = entry.path();
        if keep.iter().any(|k| entry.file_name() == k.as_str())
            && entry.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        match removed {
            Ok(()) => swept += 1,
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot remove a stale socket directory: {e}")
            }
        }
    }
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_a_missing_directory_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("a/b/run");
        secure_dir(&run, 0o711).unwrap();
        assert_eq!(mode(&run), 0o711);
    }

    #[test]
    fn refuses_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("attacker");
        std::fs::create_dir(&target).unwrap();
        let run = dir.path().join("run");
        std::os::unix::fs::symlink(&target, &run).unwrap();
        let err = secure_dir(&run, 0o711).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }

    #[test]
    fn refuses_a_directory_others_can_write() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = secure_dir(&run, 0o711).unwrap_err();
        assert!(
            err.to_string().contains("writable by everyone (mode 0777)"),
            "{err}"
        );
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o775)).unwrap();
        let err = secure_dir(&run, 0o711).unwrap_err();
        assert!(err.to_string().contains("writable by its group"), "{err}");
    }

    #[test]
    fn refuses_a_directory_owned_by_another_user() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to hand a directory to another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
        let err = secure_dir(&run, 0o711).unwrap_err();
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    }

    #[test]
    fn prepare_sweeps_what_an_earlier_run_left() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(run.join("plugins/echo-0-1")).unwrap();
        std::fs::write(run.join("plugins/echo-0-1/plugin.sock"), "").unwrap();
        let outside = dir.path().join("keep");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("precious"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, run.join("plugins/planted")).unwrap();
        assert_eq!(prepare(&run).unwrap(), 2);
        assert_eq!(std::fs::read_dir(run.join("plugins")).unwrap().count(), 0);
        assert!(
            outside.join("precious").exists(),
            "a link is removed, not followed"
        );
    }

    #[test]
    fn refuses_a_planted_plugins_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let attacker = dir.path().join("attacker");
        std::fs::create_dir(&attacker).unwrap();
        std::os::unix::fs::symlink(&attacker, run.join("plugins")).unwrap();
        let err = prepare(&run).unwrap_err();
        assert!(err.to_string().contains("plugins"), "{err}");
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }
}
