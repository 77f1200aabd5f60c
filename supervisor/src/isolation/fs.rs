//! The file operations cgroup managers make, behind one narrow trait, so the
//! v1 and v2 logic runs unchanged against the real cgroupfs or against a
//! temporary directory laid out like one (the `fake` module, with the `test-support` feature).

use std::fmt::Debug;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::CgroupError;

/// What a cgroup manager does to a cgroup filesystem.
pub trait CgroupFs: Send + Sync + Debug {
    /// Reads a whole interface file.
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Writes `value` to an interface file in one `write(2)`, as cgroupfs
    /// requires; never creates the file.
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
    /// Creates one cgroup directory (not its parents).
    fn mkdir(&self, path: &Path) -> io::Result<()>;
    /// Removes one (empty) cgroup directory.
    fn rmdir(&self, path: &Path) -> io::Result<()>;
    /// Names of the child cgroups (subdirectories) of `path`.
    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>>;
    fn exists(&self, path: &Path) -> bool;
    /// The path with symlinks resolved (v1 `cpu` is often a link to
    /// `cpu,cpuacct`).
    fn canonicalize(&self, path: &Path) -> io::Result<std::path::PathBuf> {
        std::fs::canonicalize(path)
    }
    /// Opens an interface file for writing, close-on-exec, to be written by a
    /// child between fork and exec (`cgroup.procs`).
    fn open_write(&self, path: &Path) -> io::Result<OwnedFd>;
}

/// The host's filesystem: the real cgroupfs.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostFs;

impl CgroupFs for HostFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        // One write: cgroupfs parses each write(2) on its own.
        let n = file.write(value.as_bytes())?;
        if n != value.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {n} of {} bytes", value.len()),
            ));
        }
        Ok(())
    }

    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }

    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn open_write(&self, path: &Path) -> io::Result<OwnedFd> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(OwnedFd::from(file))
    }
}

/// Writes `value` to `path`, naming both in the error.
pub fn write_value(fs: &dyn CgroupFs, path: &Path, value: &str) -> Result<(), CgroupError> {
    fs.write(path, value)
        .map_err(|e| CgroupError::io(format!("cannot write `{}` to", value.trim()), path, e))
}

/// Creates `path` and whatever of its ancestors is missing.
pub fn mkdir_all(fs: &dyn CgroupFs, path: &Path) -> Result<(), CgroupError> {
    let mut missing = Vec::new();
    let mut at = Some(path);
    while let Some(p) = at {
        if fs.exists(p) {
            break;
        }
        missing.push(p);
        at = p.parent();
    }
    for p in missing.into_iter().rev() {
        match fs.mkdir(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(CgroupError::io("cannot create the cgroup", p, e)),
        }
    }
    Ok(())
}

/// Removes the cgroup `dir` and every cgroup below it, deepest first. A
/// missing one is not an error.
pub fn remove_tree(fs: &dyn CgroupFs, dir: &Path) -> Result<(), CgroupError> {
    let subdirs = match fs.subdirs(dir) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CgroupError::io("cannot list", dir, e)),
    };
    for sub in subdirs {
        remove_tree(fs, &dir.join(sub))?;
    }
    match fs.rmdir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CgroupError::io("cannot remove the cgroup", dir, e)),
    }
}

/// Kills what is in `cgroup` until it is empty, for up to `timeout`, then
/// removes it. For start-up cleaning, where blocking is fine.
pub fn kill_and_remove_blocking(
    cgroup: &dyn super::CgroupManager,
    timeout: std::time::Duration,
) -> Result<(), CgroupError> {
    let deadline = std::time::Instant::now() + timeout;
    let mut round = 0u32;
    loop {
        let empty = cgroup.pids().map(|p| p.is_empty()).unwrap_or(true);
        if empty {
            match cgroup.remove() {
                Err(e)
                    if e.errno() == Some(libc::EBUSY) && std::time::Instant::now() < deadline => {}
                other => return other,
            }
        } else if round % 25 == 0 {
            cgroup.kill_all()?;
        }
        if std::time::Instant::now() >= deadline {
            return cgroup.remove();
        }
        round += 1;
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Reads `key value` lines (`memory.events`, `cpu.stat`, `memory.oom_control`)
/// and returns the value of `key`.
pub fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Parses a file holding one number; `max` reads as `None`.
pub fn single_value(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Parses `cgroup.procs`: one PID per line. Only real, other processes:
/// never 0 or a negative number (which `kill` would take as a process
/// group) and never the supervisor itself.
pub fn pids_of(text: &str) -> Vec<i32> {
    let own = std::process::id() as i32;
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p| p > 0 && p != own)
        .collect()
}

/// SIGKILLs each of `pids` (from [`pids_of`]). ESRCH (gone) is fine.
pub fn kill_pids(pids: &[i32]) {
    for &pid in pids {
        if pid > 0 {
            // SAFETY: kill(2) with a positive PID and a signal number; no
            // memory is passed.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_interface_files() {
        let events = "low 0\nhigh 3\nmax 7\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_value(events, "oom_kill"), Some(1));
        assert_eq!(keyed_value(events, "oom"), Some(2));
        assert_eq!(keyed_value(events, "missing"), None);
        assert_eq!(single_value("123\n"), Some(123));
        assert_eq!(single_value("max\n"), None);
        assert_eq!(pids_of("1\n22\n333\n"), vec![1, 22, 333]);
        assert!(pids_of("").is_empty());
        // A fake cgroup.procs a child wrote `0` into, or our own PID: never
        // something to kill.
        let own = std::process::id().to_string();
        assert!(pids_of(&format!("0\n-1\n{own}\n")).is_empty());
    }

    #[test]
    fn host_fs_never_creates_interface_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("pids.max");
        let e = HostFs.write(&missing, "64").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        std::fs::write(&missing, "").unwrap();
        HostFs.write(&missing, "64").unwrap();
        assert_eq!(HostFs.read(&missing).unwrap(), "64");
        HostFs.mkdir(&dir.path().join("child")).unwrap();
        assert_eq!(HostFs.subdirs(dir.path()).unwrap(), vec!["child"]);
        HostFs.rmdir(&dir.path().join("child")).unwrap();
        assert!(HostFs.subdirs(dir.path()).unwrap().is_empty());
    }
}
