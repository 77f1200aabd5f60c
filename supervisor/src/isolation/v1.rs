//! cgroup v1: one hierarchy per controller (or a few co-mounted), each under
//! `<root>/<controller>`. An instance's cgroup is a directory
//! `<parent>/<instance>` in every hierarchy found, and the child joins each
//! one before exec.
//!
//! | limit / reading | file |
//! |---|---|
//! | memory max / high | `memory.limit_in_bytes` (+ `memory.memsw.limit_in_bytes`) / `memory.soft_limit_in_bytes` |
//! | cpu | `cpu.cfs_quota_us` per `cpu.cfs_period_us` |
//! | pids | `pids.max` |
//! | usage | `memory.usage_in_bytes`, `memory.max_usage_in_bytes`, `cpuacct.usage`, `pids.current` |
//! | OOM kills | `memory.oom_control` `oom_kill`; else `memory.failcnt` |
//!
//! Killing the whole cgroup: freeze it (`freezer.state`), SIGKILL every PID
//! (none can exit, fork or be reused while frozen), thaw.

use super::fs::{
    CgroupFs, keyed_value, kill_and_remove_blocking, kill_pids, mkdir_all, pids_of, remove_tree,
    single_value, write_value,
};
use super::{
    CPU_PERIOD_US, CgroupError, CgroupLimits, CgroupManager, CgroupTree, Controllers, Mechanism,
    OomEvidence, ProcsFile, Usage, cpu_quota_us,
};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The controllers plugvisor uses, by the directory name they are mounted at.
const CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];

/// One mounted hierarchy and the controllers it carries.
#[derive(Debug, Clone)]
struct Hierarchy {
    /// Its mount point (symlinks resolved).
    mount: PathBuf,
    controllers: Controllers,
}

/// The v1 hierarchies under a root, with this supervisor's parent cgroup in
/// each.
#[derive(Debug)]
pub struct V1Tree {
    fs: Arc<dyn CgroupFs>,
    parent: String,
    hierarchies: Vec<Hierarchy>,
}

fn set(c: &mut Controllers, name: &str) {
    match name {
        "memory" => c.memory = true,
        "cpu" => c.cpu = true,
        "cpuacct" => c.cpuacct = true,
        "pids" => c.pids = true,
        "freezer" => c.freezer = true,
        _ => {}
    }
}

fn union(hierarchies: &[Hierarchy]) -> Controllers {
    hierarchies
        .iter()
        .fold(Controllers::default(), |a, h| Controllers {
            memory: a.memory || h.controllers.memory,
            cpu: a.cpu || h.controllers.cpu,
            cpuacct: a.cpuacct || h.controllers.cpuacct,
            pids: a.pids || h.controllers.pids,
            freezer: a.freezer || h.controllers.freezer,
        })
}

impl V1Tree {
    /// Finds v1 hierarchies of the controllers plugvisor uses under `root`
    /// (a v1 hierarchy has a `tasks` file and no `cgroup.controllers`).
    /// `None` when there is none of memory, cpu and pids.
    pub fn probe(fs: Arc<dyn CgroupFs>, root: &Path, parent: &str) -> Option<V1Tree> {
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        for name in CONTROLLERS {
            let dir = root.join(name);
            if !fs.exists(&dir.join("tasks")) || fs.exists(&dir.join("cgroup.controllers")) {
                continue;
            }
            let mount = fs.canonicalize(&dir).unwrap_or(dir);
            match hierarchies.iter_mut().find(|h| h.mount == mount) {
                // Co-mounted (`cpu,cpuacct`): one directory for both.
                Some(h) => set(&mut h.controllers, name),
                None => {
                    let mut controllers = Controllers::default();
                    set(&mut controllers, name);
                    hierarchies.push(Hierarchy { mount, controllers });
                }
            }
        }
        let c = union(&hierarchies);
        (c.memory || c.cpu || c.pids).then(|| V1Tree {
            fs,
            parent: parent.trim_start_matches('/').to_string(),
            hierarchies,
        })
    }

    fn parent_dirs(&self) -> impl Iterator<Item = PathBuf> + '_ {
        self.hierarchies.iter().map(|h| h.mount.join(&self.parent))
    }

    fn cgroup(&self, name: &str) -> V1Cgroup {
        V1Cgroup {
            fs: self.fs.clone(),
            dirs: self
                .hierarchies
                .iter()
                .map(|h| (h.controllers, h.mount.join(&self.parent).join(name)))
                .collect(),
        }
    }
}

impl CgroupTree for V1Tree {
    fn mechanism(&self) -> Mechanism {
        Mechanism::V1
    }

    fn controllers(&self) -> Controllers {
        union(&self.hierarchies)
    }

    fn describe(&self) -> String {
        self.parent_dirs()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn setup(&self) -> Result<(), CgroupError> {
        for dir in self.parent_dirs() {
            mkdir_all(&*self.fs, &dir)?;
        }
        Ok(())
    }

    fn clean_stale(&self) -> Result<Vec<String>, CgroupError> {
        self.clean_stale_keeping(&[])
    }

    fn existing(&self, name: &str) -> Option<Arc<dyn CgroupManager>> {
        let cgroup = self.cgroup(name);
        let found = cgroup.dirs.iter().all(|(_, dir)| self.fs.exists(dir));
        found.then(|| Arc::new(cgroup) as Arc<dyn CgroupManager>)
    }

    fn clean_stale_keeping(&self, keep: &[String]) -> Result<Vec<String>, CgroupError> {
        let mut names = BTreeSet::new();
        for dir in self.parent_dirs() {
            match self.fs.subdirs(&dir) {
                Ok(subdirs) => names.extend(subdirs),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CgroupError::io("cannot list", &dir, e)),
            }
        }
        names.retain(|n| !keep.contains(n));
        for name in &names {
            kill_and_remove_blocking(&self.cgroup(name), Duration::from_secs(2))?;
        }
        Ok(names.into_iter().collect())
    }

    fn teardown(&self) -> Result<(), CgroupError> {
        let mut result = Ok(());
        for dir in self.parent_dirs() {
            if let Err(e) = self.fs.rmdir(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                result = Err(CgroupError::io("cannot remove the cgroup", &dir, e));
            }
        }
        result
    }

    fn adopt(&self, proc_cgroup: &str) -> Option<Arc<dyn CgroupManager>> {
        let mut dirs = Vec::new();
        for h in &self.hierarchies {
            // `<id>:<controllers>:<path>`, one line per hierarchy.
            let path = proc_cgroup.lines().find_map(|line| {
                let mut fields = line.splitn(3, ':');
                let (_, names, path) = (fields.next()?, fields.next()?, fields.next()?);
                let mut c = Controllers::default();
                names.split(',').for_each(|n| set(&mut c, n));
                let ours = h.controllers;
                let shared = (c.memory && ours.memory)
                    || (c.cpu && ours.cpu)
                    || (c.cpuacct && ours.cpuacct)
                    || (c.pids && ours.pids)
                    || (c.freezer && ours.freezer);
                shared.then(|| path.trim().trim_matches('/').to_string())
            });
            match path {
                Some(rel) if !rel.is_empty() => dirs.push((h.controllers, h.mount.join(rel))),
                _ => {}
            }
        }
        (!dirs.is_empty()).then(|| {
            Arc::new(V1Cgroup {
                fs: self.fs.clone(),
                dirs,
            }) as Arc<dyn CgroupManager>
        })
    }

    fn create(
        &self,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<Arc<dyn CgroupManager>, CgroupError> {
        let cgroup = self.cgroup(name);
        let made = cgroup.make(limits);
        if let Err(e) = made {
            let _ = cgroup.remove();
            return Err(e);
        }
        Ok(Arc::new(cgroup))
    }
}

/// One instance's cgroup: its directory in each hierarchy.
#[derive(Debug)]
pub struct V1Cgroup {
    fs: Arc<dyn CgroupFs>,
    dirs: Vec<(Controllers, PathBuf)>,
}

impl V1Cgroup {
    /// The directory of the hierarchy carrying a controller.
    fn dir(&self, has: impl Fn(&Controllers) -> bool) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| has(c))
            .map(|(_, d)| d.as_path())
    }

    fn read(&self, dir: Option<&Path>, file: &str) -> Option<String> {
        self.fs.read(&dir?.join(file)).ok()
    }

    fn make(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            match self.fs.mkdir(dir) {
                Ok(()) => {}
                // Left by a crash of this run: reuse it once it is empty.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    kill_pids(&self.pids()?);
                }
                Err(e) => return Err(CgroupError::io("cannot create the cgroup", dir, e)),
            }
        }
        let fs = &*self.fs;
        if let Some(dir) = self.dir(|c| c.memory) {
            if let Some(max) = limits.memory_max {
                write_value(fs, &dir.join("memory.limit_in_bytes"), &max.to_string())?;
                // Memory+swap at the same value: no escaping the limit into
                // swap. Absent when swap accounting is off.
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                if fs.exists(&memsw) {
                    write_value(fs, &memsw, &max.to_string())?;
                }
            }
            if let Some(high) = limits.memory_high {
                write_value(
                    fs,
                    &dir.join("memory.soft_limit_in_bytes"),
                    &high.to_string(),
                )?;
            }
        }
        if let (Some(dir), Some(cores)) = (self.dir(|c| c.cpu), limits.cpu) {
            write_value(
                fs,
                &dir.join("cpu.cfs_period_us"),
                &CPU_PERIOD_US.to_string(),
            )?;
            write_value(
                fs,
                &dir.join("cpu.cfs_quota_us"),
                &cpu_quota_us(cores).to_string(),
            )?;
        }
        if let (Some(dir), Some(max)) = (self.dir(|c| c.pids), limits.pids_max) {
            write_value(fs, &dir.join("pids.max"), &max.to_string())?;
        }
        Ok(())
    }

    /// Freezes the cgroup and waits (briefly) until it is frozen.
    fn freeze(&self, dir: &Path) -> Result<(), CgroupError> {
        let state = dir.join("freezer.state");
        write_value(&*self.fs, &state, "FROZEN")?;
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            match self.fs.read(&state) {
                Ok(s) if s.trim() == "FROZEN" => return Ok(()),
                Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(CgroupError::io("cannot read", &state, e)),
            }
        }
        // Still FREEZING (a task in an uninterruptible sleep): kill anyway;
        // the caller repeats until the cgroup is empty.
        Ok(())
    }
}

impl CgroupManager for V1Cgroup {
    fn mechanism(&self) -> Mechanism {
        Mechanism::V1
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.clone()).collect()
    }

    fn controllers(&self) -> Controllers {
        self.dirs
            .iter()
            .fold(Controllers::default(), |a, (c, _)| Controllers {
                memory: a.memory || c.memory,
                cpu: a.cpu || c.cpu,
                cpuacct: a.cpuacct || c.cpuacct,
                pids: a.pids || c.pids,
                freezer: a.freezer || c.freezer,
            })
    }

    /// Each hierarchy's `tasks` file, or its `cgroup.procs` where `tasks`
    /// cannot be opened (a delegation that handed over only
    /// `cgroup.procs`).
    ///
    /// The child joins right after fork, while it has one thread, so moving
    /// that thread (`0` to `tasks`) moves the whole process, exactly as `0`
    /// to `cgroup.procs` would. It is much cheaper: a `cgroup.procs` write
    /// takes the kernel's global threadgroup lock for writing, which waits
    /// for an RCU grace period (milliseconds, tens of them on a busy host),
    /// while moving the calling thread alone skips that lock (Linux 6.7+;
    /// older kernels take it either way, so nothing is lost there).
    fn open_procs(&self) -> Result<Vec<ProcsFile>, CgroupError> {
        self.dirs
            .iter()
            .map(|(_, dir)| {
                let tasks = dir.join("tasks");
                if let Ok(fd) = self.fs.open_write(&tasks) {
                    return Ok(ProcsFile { path: tasks, fd });
                }
                let path = dir.join("cgroup.procs");
                let fd = self
                    .fs
                    .open_write(&path)
                    .map_err(|e| CgroupError::io("cannot open", &path, e))?;
                Ok(ProcsFile { path, fd })
            })
            .collect()
    }

    fn usage(&self) -> Usage {
        let memory = self.dir(|c| c.memory);
        let pids = self.dir(|c| c.pids);
        let cpu = self
            .read(self.dir(|c| c.cpuacct), "cpuacct.usage")
            .and_then(|t| single_value(&t))
            .map(Duration::from_nanos);
        Usage {
            memory_current: self
                .read(memory, "memory.usage_in_bytes")
                .and_then(|t| single_value(&t)),
            memory_peak: self
                .read(memory, "memory.max_usage_in_bytes")
                .and_then(|t| single_value(&t)),
            cpu,
            pids_current: self
                .read(pids, "pids.current")
                .and_then(|t| single_value(&t)),
            pids_rejected: self
                .read(pids, "pids.events")
                .and_then(|t| keyed_value(&t, "max")),
            oom_kills: self.oom_evidence().kills,
        }
    }

    fn oom_evidence(&self) -> OomEvidence {
        let memory = self.dir(|c| c.memory);
        OomEvidence {
            kills: self
                .read(memory, "memory.oom_control")
                .and_then(|t| keyed_value(&t, "oom_kill")),
            limit_hits: self
                .read(memory, "memory.failcnt")
                .and_then(|t| single_value(&t)),
        }
    }

    fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut all = BTreeSet::new();
        for (_, dir) in &self.dirs {
            let path = dir.join("cgroup.procs");
            match self.fs.read(&path) {
                Ok(text) => all.extend(pids_of(&text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CgroupError::io("cannot read", &path, e)),
            }
        }
        Ok(all.into_iter().collect())
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        let freezer = self
            .dir(|c| c.freezer)
            .filter(|d| self.fs.exists(&d.join("freezer.state")));
        match freezer {
            Some(dir) => {
                self.freeze(dir)?;
                let killed = self.pids().map(|pids| kill_pids(&pids));
                // Thaw even when listing failed: a frozen cgroup must not stay.
                write_value(&*self.fs, &dir.join("freezer.state"), "THAWED")?;
                killed
            }
            // Without a freezer a process may fork between listing and
            // killing; the caller repeats until the cgroup is empty.
            None => self.pids().map(|pids| kill_pids(&pids)),
        }
    }

    fn remove(&self) -> Result<(), CgroupError> {
        let mut first = None;
        for (_, dir) in &self.dirs {
            if let Err(e) = remove_tree(&*self.fs, dir) {
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(()),
            Some(e) if e.errno() == Some(libc::EBUSY) => Err(e.with_hint(
                "processes are still in it; they are being killed, and it is removed once they are gone",
            )),
            Some(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolation::fake::FakeCgroupFs;
    use crate::process::ExitStatus;

    const ALL: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];

    fn tree(fs: &Arc<FakeCgroupFs>) -> V1Tree {
        let tree = V1Tree::probe(fs.clone(), &fs.root(), "plugvisor").unwrap();
        tree.setup().unwrap();
        tree
    }

    #[test]
    fn finds_each_hierarchy_and_writes_limits_in_each() {
        let fs = Arc::new(FakeCgroupFs::v1(&ALL).unwrap());
        let tree = tree(&fs);
        assert_eq!(
            tree.controllers().to_string(),
            "memory, cpu, cpuacct, pids, freezer"
        );
        let cg = tree
            .create(
                "echo-0-1",
                &CgroupLimits {
                    memory_max: Some(64 << 20),
                    memory_high: Some(32 << 20),
                    cpu: Some(0.25),
                    pids_max: Some(16),
                },
            )
            .unwrap();
        let w = |f: &str| fs.written(f);
        assert_eq!(
            w("memory/plugvisor/echo-0-1/memory.limit_in_bytes").as_deref(),
            Some("67108864")
        );
        assert_eq!(
            w("memory/plugvisor/echo-0-1/memory.memsw.limit_in_bytes").as_deref(),
            Some("67108864")
        );
        assert_eq!(
            w("memory/plugvisor/echo-0-1/memory.soft_limit_in_bytes").as_deref(),
            Some("33554432")
        );
        assert_eq!(
            w("cpu/plugvisor/echo-0-1/cpu.cfs_period_us").as_deref(),
            Some("100000")
        );
        assert_eq!(
            w("cpu/plugvisor/echo-0-1/cpu.cfs_quota_us").as_deref(),
            Some("25000")
        );
        assert_eq!(w("pids/plugvisor/echo-0-1/pids.max").as_deref(), Some("16"));
        // The child joins every hierarchy.
        let procs: Vec<PathBuf> = cg
            .open_procs()
            .unwrap()
            .into_iter()
            .map(|p| p.path)
            .collect();
        assert_eq!(procs.len(), 5);
        // Through `tasks`: the child joins while it has one thread.
        assert!(procs.contains(&fs.root().join("freezer/plugvisor/echo-0-1/tasks")));
    }

    #[test]
    fn a_child_joins_through_tasks_or_else_cgroup_procs() {
        let fs = Arc::new(FakeCgroupFs::v1(&ALL).unwrap());
        let tree = tree(&fs);
        let cg = tree.create("echo-0-1", &CgroupLimits::default()).unwrap();
        // A delegation that handed over cgroup.procs but not tasks.
        std::fs::remove_file(fs.root().join("memory/plugvisor/echo-0-1/tasks")).unwrap();
        let procs: Vec<PathBuf> = cg
            .open_procs()
            .unwrap()
            .into_iter()
            .map(|p| p.path)
            .collect();
        assert_eq!(procs.len(), 5);
        assert!(procs.contains(&fs.root().join("memory/plugvisor/echo-0-1/cgroup.procs")));
        assert!(procs.contains(&fs.root().join("pids/plugvisor/echo-0-1/tasks")));
        // Neither: a clear error naming the file.
        std::fs::remove_file(fs.root().join("pids/plugvisor/echo-0-1/tasks")).unwrap();
        std::fs::remove_file(fs.root().join("pids/plugvisor/echo-0-1/cgroup.procs")).unwrap();
        let e = cg.open_procs().unwrap_err().to_string();
        assert!(e.contains("pids/plugvisor/echo-0-1/cgroup.procs"), "{e}");
    }

    #[test]
    fn adopts_a_runtimes_cgroup_from_proc_cgroup_for_reading_only() {
        let fs = Arc::new(FakeCgroupFs::v1(&ALL).unwrap());
        let tree = tree(&fs);
        let ctr = "libpod_parent/libpod-abc";
        for c in ALL {
            std::fs::create_dir_all(fs.root().join(c).join(ctr)).unwrap();
        }
        fs.set_file(&format!("memory/{ctr}/memory.usage_in_bytes"), "8192\n")
            .unwrap();
        fs.set_file(
            &format!("memory/{ctr}/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .unwrap();
        let proc_cgroup = format!(
            "12:memory:/{ctr}\n11:cpu,cpuacct:/{ctr}\n5:pids:/{ctr}\n3:freezer:/{ctr}\n1:name=systemd:/elsewhere\n"
        );
        let cg = tree.adopt(&proc_cgroup).expect("adopted");
        assert!(
            cg.paths().contains(&fs.root().join("memory").join(ctr)),
            "{:?}",
            cg.paths()
        );
        assert_eq!(cg.usage().memory_current, Some(8192));
        assert_eq!(cg.oom_evidence().kills, Some(1));
        // A process in the root cgroups: its usage would be the host's.
        assert!(tree.adopt("12:memory:/\n5:pids:/\n").is_none());
        assert!(tree.adopt("").is_none());
    }

    #[test]
    fn oom_kills_come_from_oom_control_else_failcnt() {
        let fs = Arc::new(FakeCgroupFs::v1(&ALL).unwrap());
        let cg = tree(&fs)
            .create("echo-0-1", &CgroupLimits::default())
            .unwrap();
        let killed = ExitStatus::Signaled {
            signal: libc::SIGKILL,
            core_dumped: false,
        };
        assert!(!cg.oom_evidence().explains(killed));
        let dir = "memory/plugvisor/echo-0-1";
        fs.set_file(
            &format!("{dir}/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(cg.oom_evidence().kills, Some(2));
        assert!(cg.oom_evidence().explains(killed));
        // An older kernel: no oom_kill line; the limit's failcnt decides.
        fs.set_file(
            &format!("{dir}/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\n",
        )
        .unwrap();
        fs.set_file(&format!("{dir}/memory.failcnt"), "4\n")
            .unwrap();
        assert_eq!(cg.oom_evidence().kills, None);
        assert!(cg.oom_evidence().explains(killed));
        fs.set_file(&format!("{dir}/memory.usage_in_bytes"), "4096\n")
            .unwrap();
        fs.set_file("cpuacct/plugvisor/echo-0-1/cpuacct.usage", "2500000000\n")
            .unwrap();
        let usage = cg.usage();
        assert_eq!(usage.memory_current, Some(4096));
        assert_eq!(usage.cpu, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn kill_freezes_then_thaws_and_removal_covers_every_hierarchy() {
        let fs = Arc::new(FakeCgroupFs::v1(&ALL).unwrap());
        let tree = tree(&fs);
        let cg = tree.create("echo-0-1", &CgroupLimits::default()).unwrap();
        cg.kill_all().unwrap();
        let states: Vec<String> = fs
            .writes()
            .into_iter()
            .filter(|(p, _)| p == "freezer/plugvisor/echo-0-1/freezer.state")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(states, vec!["FROZEN", "THAWED"]);
        cg.remove().unwrap();
        for c in ALL {
            assert!(
                !fs.root().join(c).join("plugvisor/echo-0-1").exists(),
                "{c}"
            );
        }
        tree.create("stale-0-1", &CgroupLimits::default()).unwrap();
        assert_eq!(tree.clean_stale().unwrap(), vec!["stale-0-1"]);
        tree.teardown().unwrap();
        assert!(!fs.root().join("memory/plugvisor").exists());
    }

    #[test]
    fn missing_hierarchies_are_skipped() {
        let fs = Arc::new(FakeCgroupFs::v1(&["memory"]).unwrap());
        let tree = tree(&fs);
        let c = tree.controllers();
        assert!(c.memory && !c.cpu && !c.pids && !c.freezer);
        let cg = tree
            .create(
                "echo-0-1",
                &CgroupLimits {
                    cpu: Some(1.0),
                    ..CgroupLimits::default()
                },
            )
            .unwrap();
        assert_eq!(
            cg.paths(),
            vec![fs.root().join("memory/plugvisor/echo-0-1")]
        );
        // No freezer: kill by listing.
        cg.kill_all().unwrap();
        let only_freezer = Arc::new(FakeCgroupFs::v1(&["freezer"]).unwrap());
        assert!(V1Tree::probe(only_freezer.clone(), &only_freezer.root(), "p").is_none());
    }
}
