//! A cgroup filesystem in a temporary directory, for tests that run without
//! root or without the cgroup version they test. It behaves like the kernel
//! where plugvisor relies on it:
//!
//! - `mkdir` fills a new cgroup with its interface files (v2: from the
//!   parent's `cgroup.subtree_control`; v1: by the hierarchy's controller);
//! - writing a PID to `cgroup.procs` moves it out of every other cgroup;
//! - v2 "no internal processes": enabling controllers in a non-root cgroup
//!   that holds processes, or joining a cgroup that has controllers enabled
//!   for its children, fails with EBUSY; `rmdir` of a populated cgroup too;
//! - every write is recorded, and faults (an errno for the next N writes to
//!   a file) can be injected.
//!
//! The cgroup filesystem is at [`FakeCgroupFs::root`]; a procfs with
//! `self/cgroup` is at [`FakeCgroupFs::proc_root`].

use super::fs::CgroupFs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug)]
struct Fault {
    file: String,
    errno: i32,
    remaining: usize,
}

/// See the module docs.
#[derive(Debug)]
pub struct FakeCgroupFs {
    dir: tempfile::TempDir,
    writes: Mutex<Vec<(String, String)>>,
    faults: Mutex<Vec<Fault>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const V1_FILES: [(&str, &[(&str, &str)]); 5] = [
    (
        "memory",
        &[
            ("memory.limit_in_bytes", "9223372036854771712\n"),
            ("memory.memsw.limit_in_bytes", "9223372036854771712\n"),
            ("memory.soft_limit_in_bytes", "9223372036854771712\n"),
            ("memory.usage_in_bytes", "0\n"),
            ("memory.max_usage_in_bytes", "0\n"),
            (
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
            ),
            ("memory.failcnt", "0\n"),
        ],
    ),
    (
        "cpu",
        &[
            ("cpu.cfs_period_us", "100000\n"),
            ("cpu.cfs_quota_us", "-1\n"),
        ],
    ),
    ("cpuacct", &[("cpuacct.usage", "0\n")]),
    (
        "pids",
        &[
            ("pids.max", "max\n"),
            ("pids.current", "0\n"),
            ("pids.events", "max 0\n"),
        ],
    ),
    ("freezer", &[("freezer.state", "THAWED\n")]),
];

const V2_FILES: [(&str, &[(&str, &str)]); 3] = [
    (
        "memory",
        &[
            ("memory.max", "max\n"),
            ("memory.high", "max\n"),
            ("memory.swap.max", "max\n"),
            ("memory.oom.group", "0\n"),
            ("memory.current", "0\n"),
            ("memory.peak", "0\n"),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
            ),
        ],
    ),
    ("cpu", &[("cpu.max", "max 100000\n")]),
    (
        "pids",
        &[
            ("pids.max", "max\n"),
            ("pids.current", "0\n"),
            ("pids.events", "max 0\n"),
        ],
    ),
];

fn write_files(dir: &Path, files: &[(&str, &str)]) -> io::Result<()> {
    for (name, content) in files {
        std::fs::write(dir.join(name), content)?;
    }
    Ok(())
}

fn pids_in(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

impl FakeCgroupFs {
    fn new() -> io::Result<FakeCgroupFs> {
        let dir = tempfile::Builder::new().prefix("pv-cgroupfs").tempdir()?;
        std::fs::create_dir_all(dir.path().join("cgroup"))?;
        std::fs::create_dir_all(dir.path().join("proc/self"))?;
        std::fs::write(dir.path().join("proc/self/cgroup"), "0::/\n")?;
        Ok(FakeCgroupFs {
            dir,
            writes: Mutex::default(),
            faults: Mutex::default(),
        })
    }

    /// A cgroup v2 root offering `controllers` (e.g. `["memory", "cpu", "pids"]`).
    pub fn v2(controllers: &[&str]) -> io::Result<FakeCgroupFs> {
        let fs = FakeCgroupFs::new()?;
        let root = fs.root();
        write_files(
            &root,
            &[
                (
                    "cgroup.controllers",
                    &format!("{}\n", controllers.join(" ")),
                ),
                ("cgroup.subtree_control", "\n"),
                ("cgroup.procs", ""),
                ("cpu.stat", "usage_usec 0\n"),
            ],
        )?;
        Ok(fs)
    }

    /// A cgroup v1 layout with one hierarchy per controller in `controllers`
    /// (of memory, cpu, cpuacct, pids, freezer).
    pub fn v1(controllers: &[&str]) -> io::Result<FakeCgroupFs> {
        let fs = FakeCgroupFs::new()?;
        for name in controllers {
            let mount = fs.root().join(name);
            std::fs::create_dir_all(&mount)?;
            write_files(&mount, &[("tasks", ""), ("cgroup.procs", "")])?;
        }
        Ok(fs)
    }

    /// Where the cgroup filesystem is mounted.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("cgroup")
    }

    /// A procfs holding only `self/cgroup`.
    pub fn proc_root(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    /// Makes the supervisor's own v2 cgroup `cgroup` (`0::<cgroup>`).
    pub fn set_own_cgroup(&self, cgroup: &str) -> io::Result<()> {
        std::fs::write(
            self.proc_root().join("self/cgroup"),
            format!("0::{cgroup}\n"),
        )
    }

    /// Creates a v2 cgroup at `path` (from the root, parents included) and
    /// puts `pids` in it. Parents get the controllers of their parent enabled.
    pub fn add_v2_cgroup(&self, path: &str, pids: &[i32]) -> io::Result<PathBuf> {
        let mut dir = self.root();
        for part in path.trim_matches('/').split('/').filter(|p| !p.is_empty()) {
            let controllers = std::fs::read_to_string(dir.join("cgroup.controllers"))?;
            std::fs::write(dir.join("cgroup.subtree_control"), &controllers)?;
            dir.push(part);
            if !dir.exists() {
                self.mkdir(&dir)?;
            }
        }
        let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(dir.join("cgroup.procs"), text)?;
        Ok(dir)
    }

    /// The next `times` writes to files named `file` fail with `errno`.
    pub fn fail_writes(&self, file: &str, errno: i32, times: usize) {
        lock(&self.faults).push(Fault {
            file: file.to_string(),
            errno,
            remaining: times,
        });
    }

    /// Every successful write so far: (path relative to the root, value).
    pub fn writes(&self) -> Vec<(String, String)> {
        lock(&self.writes).clone()
    }

    /// The value last written to `rel` (a path relative to the root).
    pub fn written(&self, rel: &str) -> Option<String> {
        lock(&self.writes)
            .iter()
            .rev()
            .find(|(p, _)| p == rel)
            .map(|(_, v)| v.clone())
    }

    /// Reads a file relative to the root.
    pub fn file(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root().join(rel)).unwrap_or_default()
    }

    /// Sets a file relative to the root, as the kernel would (a counter).
    pub fn set_file(&self, rel: &str, content: &str) -> io::Result<()> {
        std::fs::write(self.root().join(rel), content)
    }

    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(self.root())
            .unwrap_or(path)
            .display()
            .to_string()
    }

    fn is_v2(&self, dir: &Path) -> bool {
        dir.join("cgroup.controllers").exists()
    }

    fn is_root(&self, dir: &Path) -> bool {
        !dir.join("cgroup.type").exists()
    }

    /// Every `cgroup.procs` below the root.
    fn all_procs(dir: &Path, out: &mut Vec<PathBuf>) {
        if dir.join("cgroup.procs").exists() {
            out.push(dir.join("cgroup.procs"));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    FakeCgroupFs::all_procs(&e.path(), out);
                }
            }
        }
    }

    fn busy() -> io::Error {
        io::Error::from_raw_os_error(libc::EBUSY)
    }

    fn write_procs(&self, path: &Path, value: &str) -> io::Result<()> {
        let dir = path.parent().unwrap_or(path);
        if self.is_v2(dir) && !self.is_root(dir) {
            let subtree = std::fs::read_to_string(dir.join("cgroup.subtree_control"))?;
            if !subtree.trim().is_empty() {
                return Err(FakeCgroupFs::busy());
            }
        }
        let pid = value.trim().to_string();
        let mut files = Vec::new();
        FakeCgroupFs::all_procs(&self.root(), &mut files);
        for file in files {
            let mut pids = pids_in(&std::fs::read_to_string(&file)?);
            pids.retain(|p| *p != pid);
            if file == path {
                pids.push(pid.clone());
            }
            let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
            std::fs::write(&file, text)?;
        }
        Ok(())
    }

    fn write_subtree_control(&self, path: &Path, value: &str) -> io::Result<()> {
        let dir = path.parent().unwrap_or(path);
        if !self.is_root(dir)
            && !pids_in(&std::fs::read_to_string(dir.join("cgroup.procs"))?).is_empty()
        {
            return Err(FakeCgroupFs::busy());
        }
        let available = std::fs::read_to_string(dir.join("cgroup.controllers"))?;
        let mut enabled = pids_in(&std::fs::read_to_string(path)?);
        for change in value.split_whitespace() {
            let (on, name) = match change.split_at(1) {
                ("+", name) => (true, name),
                ("-", name) => (false, name),
                _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
            };
            if !available.split_whitespace().any(|a| a == name) {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            enabled.retain(|e| e != name);
            if on {
                enabled.push(name.to_string());
            }
        }
        std::fs::write(path, format!("{}\n", enabled.join(" ")))
    }

    fn populate(&self, dir: &Path) -> io::Result<()> {
        let parent = dir.parent().unwrap_or(dir);
        if self.is_v2(parent) {
            let subtree = std::fs::read_to_string(parent.join("cgroup.subtree_control"))?;
            write_files(
                dir,
                &[
                    ("cgroup.controllers", &subtree),
                    ("cgroup.subtree_control", "\n"),
                    ("cgroup.procs", ""),
                    ("cgroup.type", "domain\n"),
                    ("cgroup.events", "populated 0\nfrozen 0\n"),
                    ("cgroup.kill", ""),
                    ("cgroup.freeze", "0\n"),
                    ("cpu.stat", "usage_usec 0\n"),
                ],
            )?;
            for (controller, files) in V2_FILES {
                if subtree.split_whitespace().any(|c| c == controller) {
                    write_files(dir, files)?;
                }
            }
        } else {
            write_files(dir, &[("tasks", ""), ("cgroup.procs", "")])?;
            let mount = dir
                .strip_prefix(self.root())
                .ok()
                .and_then(|rel| rel.components().next())
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .unwrap_or_default();
            for (controller, files) in V1_FILES {
                if mount == controller {
                    write_files(dir, files)?;
                }
            }
        }
        Ok(())
    }
}

impl CgroupFs for FakeCgroupFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        {
            let mut faults = lock(&self.faults);
            if let Some(f) = faults
                .iter_mut()
                .find(|f| f.file == name && f.remaining > 0)
            {
                f.remaining -= 1;
                return Err(io::Error::from_raw_os_error(f.errno));
            }
        }
        if !path.is_file() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        match name.as_str() {
            "cgroup.procs" => self.write_procs(path, value)?,
            "cgroup.subtree_control" => self.write_subtree_control(path, value)?,
            "cgroup.freeze" => {
                std::fs::write(path, value)?;
                let dir = path.parent().unwrap_or(path);
                std::fs::write(
                    dir.join("cgroup.events"),
                    format!("populated 0\nfrozen {}\n", value.trim()),
                )?;
            }
            _ => std::fs::write(path, value)?,
        }
        lock(&self.writes).push((self.rel(path), value.to_string()));
        Ok(())
    }

    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)?;
        self.populate(path)
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        if !path.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let populated =
            !pids_in(&std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default())
                .iter()
                .all(|p| p == "0");
        let children = std::fs::read_dir(path)?
            .flatten()
            .any(|e| e.path().is_dir());
        if populated || children {
            return Err(FakeCgroupFs::busy());
        }
        std::fs::remove_dir_all(path)
    }

    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>> {
        super::fs::HostFs.subdirs(path)
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
