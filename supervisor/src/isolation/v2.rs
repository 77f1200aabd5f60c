//! cgroup v2: one tree. Instance cgroups live at `<base>/<parent>/<instance>`,
//! where `<base>` is the supervisor's own cgroup — under systemd with
//! `Delegate=yes`, the service's cgroup, which it may manage — or the root
//! when `parent` is absolute (`/plugvisor`).
//!
//! Delegation and "no internal processes": a cgroup that enables
//! controllers for its children may not hold processes itself (except the
//! real root). So when the supervisor lives in `<base>`, it first moves
//! itself into the leaf `<base>/supervisor`, then enables the controllers in
//! `<base>/cgroup.subtree_control`. If that write answers EBUSY, other
//! processes of the delegated cgroup (a systemd helper, a container's init)
//! are still in `<base>`: they are moved into the leaf too and the write is
//! retried.
//!
//! | limit / reading | file |
//! |---|---|
//! | memory max / high | `memory.max` (+ `memory.swap.max` 0, `memory.oom.group` 1) / `memory.high` |
//! | cpu | `cpu.max` = `<quota> <period>` |
//! | pids | `pids.max` |
//! | usage | `memory.current`, `memory.peak`, `cpu.stat` `usage_usec`, `pids.current` |
//! | OOM kills | `memory.events` `oom_kill` |
//!
//! Killing the whole cgroup: `cgroup.kill` (Linux 5.14+); else freeze
//! (`cgroup.freeze`), kill every PID, thaw.

use super::fs::{
    CgroupFs, keyed_value, kill_and_remove_blocking, kill_pids, mkdir_all, pids_of, remove_tree,
    single_value, write_value,
};
use super::{
    CPU_PERIOD_US, CgroupError, CgroupLimits, CgroupManager, CgroupTree, Controllers, Mechanism,
    OomEvidence, ProbeOptions, ProcsFile, Usage, cpu_quota_us,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The leaf the supervisor moves itself into inside its delegated cgroup.
pub const SUPERVISOR_LEAF: &str = "supervisor";
/// Attempts at enabling controllers while processes are moved out of the way.
const EBUSY_ATTEMPTS: usize = 5;

/// This supervisor's part of a cgroup v2 tree.
#[derive(Debug)]
pub struct V2Tree {
    fs: Arc<dyn CgroupFs>,
    /// `<mount>/<base>`: the delegated cgroup (or the root).
    base: PathBuf,
    /// `<base>/<parent>`: instance cgroups are made here.
    parent: PathBuf,
    /// Where the supervisor moves itself, when it lives in `base`.
    leaf: Option<PathBuf>,
    pid: i32,
    /// Of memory, cpu and pids, those `base` offers.
    controllers: Controllers,
    /// The v2 mount: where other managers' cgroups are found.
    mount: PathBuf,
}

/// The supervisor's own v2 cgroup (`0::/path` in `<proc>/self/cgroup`).
fn own_cgroup(fs: &dyn CgroupFs, proc_root: &Path) -> String {
    fs.read(&proc_root.join("self/cgroup"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string()))
        })
        .unwrap_or_else(|| "/".to_string())
}

fn join_cgroup(mount: &Path, cgroup: &str) -> PathBuf {
    let rel = cgroup.trim_matches('/');
    if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    }
}

fn controllers_in(text: &str) -> Controllers {
    let mut c = Controllers::default();
    for name in text.split_whitespace() {
        match name.trim_start_matches('+') {
            "memory" => c.memory = true,
            // cpu.stat (usage) exists with or without the cpu controller.
            "cpu" => c.cpu = true,
            "pids" => c.pids = true,
            _ => {}
        }
    }
    c.cpuacct = true;
    c
}

fn enable_line(c: Controllers) -> String {
    let mut names = Vec::new();
    if c.memory {
        names.push("+memory");
    }
    if c.cpu {
        names.push("+cpu");
    }
    if c.pids {
        names.push("+pids");
    }
    names.join(" ")
}

impl V2Tree {
    /// Describes the v2 tree mounted at `mount` as this supervisor would use
    /// it; the reason when it offers none of memory, cpu and pids.
    pub fn probe(o: &ProbeOptions, mount: &Path) -> Result<V2Tree, String> {
        let fs = &*o.fs;
        let own = own_cgroup(fs, &o.proc_root);
        let (base_cgroup, parent_rel) = match o.parent.strip_prefix('/') {
            Some(absolute) => ("/".to_string(), absolute.to_string()),
            None => {
                // After a restart in place the supervisor is already in its
                // leaf; the delegated cgroup is the one above it.
                let base = match own.strip_suffix(&format!("/{SUPERVISOR_LEAF}")) {
                    Some(above) if !above.is_empty() => above.to_string(),
                    _ => own.clone(),
                };
                (base, o.parent.clone())
            }
        };
        let base = join_cgroup(mount, &base_cgroup);
        let available = fs
            .read(&base.join("cgroup.controllers"))
            .unwrap_or_default();
        let controllers = controllers_in(&available);
        if !(controllers.memory || controllers.cpu || controllers.pids) {
            return Err(format!(
                "cgroup v2 at {} offers none of the memory, cpu and pids controllers (cgroup.controllers: `{}`); run plugvisor under systemd with Delegate=yes, or enable them in the parent's cgroup.subtree_control",
                base.display(),
                available.trim()
            ));
        }
        // The real root may hold processes; any other cgroup (a delegated
        // one, a container's namespace root) may not once it has
        // controllers for children. Only non-root cgroups have cgroup.type.
        let lives_in_base = own.trim_end_matches('/') == base_cgroup.trim_end_matches('/');
        let leaf = (lives_in_base && fs.exists(&base.join("cgroup.type")))
            .then(|| base.join(SUPERVISOR_LEAF));
        Ok(V2Tree {
            fs: o.fs.clone(),
            parent: base.join(&parent_rel),
            base,
            leaf,
            pid: o.pid,
            controllers,
            mount: mount.to_path_buf(),
        })
    }

    /// Enables our controllers in `dir`'s subtree_control (if not yet), moving
    /// the processes still in `dir` into the leaf on EBUSY.
    fn enable_controllers(&self, dir: &Path) -> Result<(), CgroupError> {
        let file = dir.join("cgroup.subtree_control");
        let line = enable_line(self.controllers);
        let enabled = self.fs.read(&file).unwrap_or_default();
        if controllers_in(&enabled) == self.controllers {
            return Ok(());
        }
        let mut last = None;
        for _ in 0..EBUSY_ATTEMPTS {
            match self.fs.write(&file, &line) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    last = Some(e);
                    // "No internal processes": whoever is still in `dir` must
                    // go to the leaf first.
                    let procs = dir.join("cgroup.procs");
                    let pids = self
                        .fs
                        .read(&procs)
                        .map(|t| {
                            t.split_whitespace()
                                .filter_map(|p| p.parse::<i32>().ok())
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default();
                    match &self.leaf {
                        Some(leaf) if dir == self.base => {
                            for pid in pids {
                                // A process that exited meanwhile is fine.
                                let _ = self.fs.write(&leaf.join("cgroup.procs"), &pid.to_string());
                            }
                        }
                        _ => break,
                    }
                }
                Err(e) => {
                    return Err(CgroupError::io(
                        format!("cannot write `{line}` to"),
                        &file,
                        e,
                    ));
                }
            }
        }
        let pids = self
            .fs
            .read(&dir.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(", ");
        Err(CgroupError::io(
            format!("cannot write `{line}` to"),
            &file,
            last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)),
        )
        .with_hint(format!(
            "{} still holds processes ({pids}), and a cgroup that hands controllers to its children may hold none; give plugvisor a cgroup of its own (systemd Delegate=yes), or set cgroup.parent to an absolute path such as /plugvisor",
            dir.display()
        )))
    }

    fn cgroup(&self, name: &str) -> V2Cgroup {
        V2Cgroup {
            fs: self.fs.clone(),
            dir: self.parent.join(name),
            controllers: self.controllers,
        }
    }
}

impl CgroupTree for V2Tree {
    fn mechanism(&self) -> Mechanism {
        Mechanism::V2
    }

    fn controllers(&self) -> Controllers {
        self.controllers
    }

    fn describe(&self) -> String {
        self.parent.display().to_string()
    }

    fn setup(&self) -> Result<(), CgroupError> {
        let fs = &*self.fs;
        if let Some(leaf) = &self.leaf {
            mkdir_all(fs, leaf)?;
            write_value(fs, &leaf.join("cgroup.procs"), &self.pid.to_string()).map_err(|e| {
                if e.errno() == Some(libc::EBUSY) {
                    e.with_hint(format!(
                        "{} has controllers enabled for children, so no process may join it; remove it (it is the supervisor's leaf)",
                        leaf.display()
                    ))
                } else {
                    e
                }
            })?;
        }
        // Controllers are enabled level by level from the base down to the
        // parent, which hands them to the instance cgroups.
        let rel = self
            .parent
            .strip_prefix(&self.base)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        self.enable_controllers(&self.base)?;
        let mut dir = self.base.clone();
        for part in rel.components() {
            dir.push(part);
            mkdir_all(fs, &dir)?;
            self.enable_controllers(&dir)?;
        }
        Ok(())
    }

    fn clean_stale(&self) -> Result<Vec<String>, CgroupError> {
        self.clean_stale_keeping(&[])
    }

    fn existing(&self, name: &str) -> Option<Arc<dyn CgroupManager>> {
        let cgroup = self.cgroup(name);
        self.fs
            .exists(&cgroup.dir)
            .then(|| Arc::new(cgroup) as Arc<dyn CgroupManager>)
    }

    fn clean_stale_keeping(&self, keep: &[String]) -> Result<Vec<String>, CgroupError> {
        let mut names = match self.fs.subdirs(&self.parent) {
            Ok(names) => names,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(CgroupError::io("cannot list", &self.parent, e)),
        };
        names.retain(|n| !keep.contains(n));
        for name in &names {
            kill_and_remove_blocking(&self.cgroup(name), Duration::from_secs(2))?;
        }
        Ok(names)
    }

    fn teardown(&self) -> Result<(), CgroupError> {
        // Only the parent: the base is the delegated cgroup (or the root),
        // and the supervisor still lives in its leaf.
        if self.parent == self.base {
            return Ok(());
        }
        self.fs
            .rmdir(&self.parent)
            .map_err(|e| CgroupError::io("cannot remove the cgroup", &self.parent, e))
    }

    fn adopt(&self, proc_cgroup: &str) -> Option<Arc<dyn CgroupManager>> {
        let path = proc_cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))?
            .trim();
        if path.trim_matches('/').is_empty() {
            return None;
        }
        Some(Arc::new(V2Cgroup {
            fs: self.fs.clone(),
            dir: join_cgroup(&self.mount, path),
            controllers: self.controllers,
        }))
    }

    fn create(
        &self,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<Arc<dyn CgroupManager>, CgroupError> {
        let cgroup = self.cgroup(name);
        if let Err(e) = cgroup.make(limits) {
            let _ = cgroup.remove();
            return Err(e);
        }
        Ok(Arc::new(cgroup))
    }
}

/// One instance's v2 cgroup.
#[derive(Debug)]
pub struct V2Cgroup {
    fs: Arc<dyn CgroupFs>,
    dir: PathBuf,
    controllers: Controllers,
}

impl V2Cgroup {
    fn read(&self, file: &str) -> Option<String> {
        self.fs.read(&self.dir.join(file)).ok()
    }

    fn make(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let fs = &*self.fs;
        match fs.mkdir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => kill_pids(&self.pids()?),
            Err(e) => return Err(CgroupError::io("cannot create the cgroup", &self.dir, e)),
        }
        let c = self.controllers;
        if c.memory {
            if let Some(max) = limits.memory_max {
                write_value(fs, &self.dir.join("memory.max"), &max.to_string())?;
                // The limit is the plugin's memory: no swapping past it.
                let swap = self.dir.join("memory.swap.max");
                if fs.exists(&swap) {
                    write_value(fs, &swap, "0")?;
                }
            }
            if let Some(high) = limits.memory_high {
                write_value(fs, &self.dir.join("memory.high"), &high.to_string())?;
            }
            // An OOM kill takes the whole plugin, not one of its processes.
            let group = self.dir.join("memory.oom.group");
            if fs.exists(&group) {
                write_value(fs, &group, "1")?;
            }
        }
        if let (true, Some(cores)) = (c.cpu, limits.cpu) {
            write_value(
                fs,
                &self.dir.join("cpu.max"),
                &format!("{} {CPU_PERIOD_US}", cpu_quota_us(cores)),
            )?;
        }
        if let (true, Some(max)) = (c.pids, limits.pids_max) {
            write_value(fs, &self.dir.join("pids.max"), &max.to_string())?;
        }
        Ok(())
    }
}

impl CgroupManager for V2Cgroup {
    fn mechanism(&self) -> Mechanism {
        Mechanism::V2
    }

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.dir.clone()]
    }

    fn controllers(&self) -> Controllers {
        self.controllers
    }

    fn open_procs(&self) -> Result<Vec<ProcsFile>, CgroupError> {
        let path = self.dir.join("cgroup.procs");
        let fd = self
            .fs
            .open_write(&path)
            .map_err(|e| CgroupError::io("cannot open", &path, e))?;
        Ok(vec![ProcsFile { path, fd }])
    }

    fn usage(&self) -> Usage {
        Usage {
            memory_current: self.read("memory.current").and_then(|t| single_value(&t)),
            memory_peak: self.read("memory.peak").and_then(|t| single_value(&t)),
            cpu: self
                .read("cpu.stat")
                .and_then(|t| keyed_value(&t, "usage_usec"))
                .map(Duration::from_micros),
            pids_current: self.read("pids.current").and_then(|t| single_value(&t)),
            pids_rejected: self
                .read("pids.events")
                .and_then(|t| keyed_value(&t, "max")),
            oom_kills: self.oom_evidence().kills,
        }
    }

    fn oom_evidence(&self) -> OomEvidence {
        let events = self.read("memory.events");
        OomEvidence {
            kills: events.as_deref().and_then(|t| keyed_value(t, "oom_kill")),
            limit_hits: events.as_deref().and_then(|t| keyed_value(t, "max")),
        }
    }

    fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let path = self.dir.join("cgroup.procs");
        match self.fs.read(&path) {
            Ok(text) => Ok(pids_of(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(CgroupError::io("cannot read", &path, e)),
        }
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        let kill = self.dir.join("cgroup.kill");
        if self.fs.exists(&kill) {
            return write_value(&*self.fs, &kill, "1");
        }
        // Before Linux 5.14: freeze, kill, thaw.
        let freeze = self.dir.join("cgroup.freeze");
        write_value(&*self.fs, &freeze, "1")?;
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            let frozen = self
                .read("cgroup.events")
                .and_then(|t| keyed_value(&t, "frozen"));
            if frozen != Some(0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let killed = self.pids().map(|pids| kill_pids(&pids));
        write_value(&*self.fs, &freeze, "0")?;
        killed
    }

    fn remove(&self) -> Result<(), CgroupError> {
        remove_tree(&*self.fs, &self.dir)
    }
}

#[cfg(test)]
mod tests;
