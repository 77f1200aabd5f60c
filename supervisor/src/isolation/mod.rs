//! Isolation of plugin processes: the manifest's limits, made to hold.
//!
//! - cgroups: one [`CgroupTree`] (where instance cgroups are made) and one
//!   [`CgroupManager`] per instance, with a v1 ([`v1`]) and a v2 ([`v2`])
//!   implementation chosen once at start-up by [`probe`]-ing a root that is a
//!   parameter, and a recording fake (`fake`, with the `test-support` feature) for tests. All their file
//!   operations go through [`fs::CgroupFs`], so tests point them at a temp dir.
//! - [`rlimits`]: NOFILE, CORE, DATA, CPU, NPROC from the manifest.
//! - [`pin`]: the executable, opened once, checked (sha256, writability) on
//!   that descriptor and executed from it.
//! - [`privileges`]: who a plugin runs as (its own dynamic uid under a root
//!   supervisor) and which capabilities it keeps (none by default).
//! - [`landlock`]: the filesystem view (`isolation.filesystem`).
//! - [`preexec`]: what the child does between fork and exec (join its
//!   cgroups, rlimits, namespaces, credentials, no_new_privs), prepared
//!   before fork so the child only makes raw system calls.
//! - [`Isolation`]: the supervisor's entry point. It owns the choice of
//!   mechanism (cgroups or "rlimits only", with the reason), prepares each
//!   spawn, and knows each live instance's cgroup for `inspect`.
//!
//! Blocking work — hashing the executable, NSS user and group lookups,
//! cgroupfs calls, freeze-and-poll kills, stale-cgroup cleanup — runs on
//! tokio's blocking pool behind the async entry points
//! ([`Isolation::start_async`], [`Isolation::prepare`],
//! [`CgroupLease::kill_all`], a dropped lease's disposal), never on a
//! runtime worker.

#[cfg(any(test, feature = "test-support"))]
pub mod fake;
pub mod fs;
pub mod landlock;
pub mod pidns;
pub mod pin;
pub mod preexec;
pub mod privileges;
pub mod rlimits;
pub mod seccomp;
pub mod v1;
pub mod v2;

use crate::manifest::{Limits, Manifest, NetworkMode};
use crate::process::ExitStatus;
use crate::units::format_size;
use fs::CgroupFs;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which cgroup version a tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    V1,
    V2,
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mechanism::V1 => "cgroup v1",
            Mechanism::V2 => "cgroup v2",
        })
    }
}

/// The controllers a tree can use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Controllers {
    pub memory: bool,
    pub cpu: bool,
    /// CPU time accounting (v1 `cpuacct`; always with `cpu` on v2, and
    /// `cpu.stat` exists on v2 even without it).
    pub cpuacct: bool,
    pub pids: bool,
    /// v1 only: needed to kill a cgroup whose processes keep forking.
    pub freezer: bool,
}

impl fmt::Display for Controllers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.memory, "memory"),
            (self.cpu, "cpu"),
            (self.cpuacct, "cpuacct"),
            (self.pids, "pids"),
            (self.freezer, "freezer"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
        f.write_str(&names.join(", "))
    }
}

/// The limits a cgroup enforces.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupLimits {
    pub memory_max: Option<u64>,
    pub memory_high: Option<u64>,
    /// Cores: quota / period.
    pub cpu: Option<f64>,
    pub pids_max: Option<u64>,
}

impl CgroupLimits {
    pub fn from_manifest(limits: &Limits) -> Self {
        CgroupLimits {
            memory_max: limits.memory.map(|s| s.0),
            memory_high: limits.memory_high.map(|s| s.0),
            cpu: limits.cpu,
            pids_max: limits.pids,
        }
    }
}

/// The CFS period the cpu quota is expressed in: 100 ms, the kernel default.
pub const CPU_PERIOD_US: u64 = 100_000;

/// `cpu` cores as a quota per [`CPU_PERIOD_US`] (at least the kernel's 1 ms).
pub fn cpu_quota_us(cores: f64) -> u64 {
    ((cores * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

/// What an instance's cgroup has used. `None`: not known (no controller, or
/// a kernel without that file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    pub cpu: Option<Duration>,
    pub pids_current: Option<u64>,
    /// Forks refused because of `pids.max`.
    pub pids_rejected: Option<u64>,
    pub oom_kills: Option<u64>,
}

impl Usage {
    /// The sum of two instances' usage (what either does not know is left
    /// to the other).
    pub fn plus(&self, other: &Usage) -> Usage {
        fn add<T: std::ops::Add<Output = T> + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            }
        }
        Usage {
            memory_current: add(self.memory_current, other.memory_current),
            memory_peak: add(self.memory_peak, other.memory_peak),
            cpu: add(self.cpu, other.cpu),
            pids_current: add(self.pids_current, other.pids_current),
            pids_rejected: add(self.pids_rejected, other.pids_rejected),
            oom_kills: add(self.oom_kills, other.oom_kills),
        }
    }
}

/// What a cgroup says about the OOM killer, to classify an exit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OomEvidence {
    /// OOM kills in this cgroup (v2 `memory.events`, v1 `memory.oom_control`
    /// `oom_kill`); `None` on kernels that do not count them.
    pub kills: Option<u64>,
    /// Times usage hit the limit (v1 `memory.failcnt`): the fallback.
    pub limit_hits: Option<u64>,
}

impl OomEvidence {
    /// Whether a child that ended with `status` was ended by the OOM killer:
    /// it was SIGKILLed and the cgroup counted an OOM kill (or, where kills
    /// are not counted, its memory hit the limit). Never guessed from
    /// SIGKILL alone.
    pub fn explains(&self, status: ExitStatus) -> bool {
        // A re-adopted survivor's status is unknown: the counter decides.
        let sigkill = matches!(status, ExitStatus::Signaled { signal, .. } if signal == libc::SIGKILL)
            || status == ExitStatus::Unknown;
        sigkill
            && match self.kills {
                Some(kills) => kills > 0,
                None => self.limit_hits.unwrap_or(0) > 0,
            }
    }
}

/// A `cgroup.procs` file (v1: `tasks`, see [`v1`]) opened before fork: the
/// child writes `0` into it to join the cgroup before it execs.
#[derive(Debug)]
pub struct ProcsFile {
    pub path: PathBuf,
    pub fd: OwnedFd,
}

/// A cgroup operation that failed: what, on which file, why, and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}{}", path.display(), hint.as_ref().map(|h| format!(". Hint: {h}")).unwrap_or_default())]
pub struct CgroupError {
    /// "cannot write `64` to", "cannot create", ...
    pub what: String,
    pub path: PathBuf,
    pub source: io::Error,
    pub hint: Option<String>,
}

impl CgroupError {
    /// An error with the hint its errno suggests.
    pub fn io(what: impl Into<String>, path: &Path, source: io::Error) -> Self {
        let hint = match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => Some(
                "run plugvisor as root, or under systemd with Delegate=yes (as docker/plugvisor.service does)"
                    .to_string(),
            ),
            Some(libc::EROFS) => Some(
                "the cgroup filesystem is read-only here (a container?); mount it read-write or give the container its own cgroup namespace, or set cgroup.enabled: false"
                    .to_string(),
            ),
            _ => None,
        };
        CgroupError {
            what: what.into(),
            path: path.to_path_buf(),
            source,
            hint,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// One plugin instance's cgroup (v1: a directory in each hierarchy).
pub trait CgroupManager: Send + Sync + fmt::Debug {
    fn mechanism(&self) -> Mechanism;
    /// Its directories, for messages and `inspect`.
    fn paths(&self) -> Vec<PathBuf>;
    /// What it enforces.
    fn controllers(&self) -> Controllers;
    /// Opens the `cgroup.procs` files a child joins through.
    fn open_procs(&self) -> Result<Vec<ProcsFile>, CgroupError>;
    fn usage(&self) -> Usage;
    fn oom_evidence(&self) -> OomEvidence;
    /// The processes in it.
    fn pids(&self) -> Result<Vec<i32>, CgroupError>;
    /// SIGKILLs every process in it, forks in flight included (v2
    /// `cgroup.kill`; else freeze, kill, thaw).
    fn kill_all(&self) -> Result<(), CgroupError>;
    /// Removes it. EBUSY while a process remains.
    fn remove(&self) -> Result<(), CgroupError>;
}

/// Where instance cgroups are made: a parent cgroup owned by this supervisor.
pub trait CgroupTree: Send + Sync + fmt::Debug {
    fn mechanism(&self) -> Mechanism;
    fn controllers(&self) -> Controllers;
    /// The parent cgroup's directories.
    fn describe(&self) -> String;
    /// Creates the parent cgroup; on v2, moves the supervisor into a leaf of
    /// its delegated cgroup first and enables the controllers.
    fn setup(&self) -> Result<(), CgroupError>;
    /// Kills and removes what an earlier run left below the parent; returns
    /// the names removed.
    fn clean_stale(&self) -> Result<Vec<String>, CgroupError>;
    /// [`Self::clean_stale`], sparing the cgroups named in `keep`: those of
    /// instances taken over from a previous supervisor image.
    fn clean_stale_keeping(&self, keep: &[String]) -> Result<Vec<String>, CgroupError> {
        if keep.is_empty() {
            self.clean_stale()
        } else {
            Ok(Vec::new())
        }
    }
    /// The cgroup of an instance that already exists (taken over from a
    /// previous supervisor image), without creating or changing it.
    fn existing(&self, _name: &str) -> Option<Arc<dyn CgroupManager>> {
        None
    }
    /// Removes the parent cgroup if it is empty (at a clean shutdown).
    fn teardown(&self) -> Result<(), CgroupError>;
    /// Creates an instance's cgroup with `limits` written.
    fn create(
        &self,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<Arc<dyn CgroupManager>, CgroupError>;
    /// The cgroup another manager (a container runtime) made for a
    /// process, from that process's `/proc/<pid>/cgroup`: for reading
    /// usage and OOM kills only. `None` when it is not below this tree's
    /// mounts (or is a root cgroup, whose usage is the whole host's).
    fn adopt(&self, proc_cgroup: &str) -> Option<Arc<dyn CgroupManager>> {
        let _ = proc_cgroup;
        None
    }
}

/// `CAP_SYS_ADMIN`: new namespaces (`network: none`).
pub const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_SYS_RESOURCE`: raising a hard rlimit.
pub const CAP_SYS_RESOURCE: u32 = 24;
/// `CAP_SETUID`: running a plugin as another user.
pub const CAP_SETUID: u32 = 7;
/// `CAP_SETGID`: ... and group.
pub const CAP_SETGID: u32 = 6;

/// Whether this process has capability `cap` in its effective set. Root
/// in a container often lacks some (`CAP_SYS_RESOURCE` is a common one).
pub fn capable(cap: u32) -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a valid version-3 header for this process and
    // room for the two data structs version 3 fills.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    rc == 0 && (data[(cap / 32) as usize].effective >> (cap % 32)) & 1 == 1
}

/// Where to look for cgroups, and as whom.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub fs: Arc<dyn CgroupFs>,
    /// Where cgroup filesystems are mounted (`/sys/fs/cgroup` on a host).
    pub root: PathBuf,
    /// procfs, to read the supervisor's own cgroup (`<proc>/self/cgroup`).
    pub proc_root: PathBuf,
    /// The parent cgroup name (see [`crate::config::CgroupConfig::parent`]).
    pub parent: String,
    /// The supervisor's PID, which v2 delegation moves into a leaf.
    pub pid: i32,
}

/// Picks the cgroup implementation for `root`: cgroup v2 mounted at the
/// root, else v1 controller hierarchies below it, else the `unified` v2
/// tree of a hybrid layout. The reason when none is usable.
pub fn probe(o: &ProbeOptions) -> Result<Arc<dyn CgroupTree>, String> {
    if o.fs.exists(&o.root.join("cgroup.controllers")) {
        return v2::V2Tree::probe(o, &o.root).map(|t| Arc::new(t) as Arc<dyn CgroupTree>);
    }
    if let Some(tree) = v1::V1Tree::probe(o.fs.clone(), &o.root, &o.parent) {
        return Ok(Arc::new(tree));
    }
    let unified = o.root.join("unified");
    if o.fs.exists(&unified.join("cgroup.controllers")) {
        return v2::V2Tree::probe(o, &unified).map(|t| Arc::new(t) as Arc<dyn CgroupTree>);
    }
    Err(format!(
        "no cgroup filesystem at {}: neither cgroup v2 (cgroup.controllers) nor v1 controller directories (memory, cpu, pids)",
        o.root.display()
    ))
}

/// Whether and how the supervisor uses cgroups.
#[derive(Debug, Clone, Default)]
pub enum CgroupMode {
    /// No cgroups: rlimits only. The default for an embedded supervisor,
    /// which must not claim a cgroup another program may use.
    #[default]
    Off,
    /// Probe `root`; make instance cgroups below `parent`, which belongs to
    /// this supervisor (stale cgroups in it are killed at start-up).
    Probe {
        root: PathBuf,
        parent: String,
        /// Refuse to start without a usable cgroup tree.
        require: bool,
    },
    /// Use this tree (tests: a temp-dir cgroupfs or a recording fake).
    Tree(Arc<dyn CgroupTree>),
}

/// The isolation settings of a supervisor.
#[derive(Debug, Clone, Default)]
pub struct IsolationOptions {
    pub cgroups: CgroupMode,
    /// Start group- or world-writable executables.
    pub allow_writable_executables: bool,
    /// Where plugins without `isolation.user` get their uid (root only).
    pub dynamic_users: privileges::DynamicUsers,
    /// Run plugins without `isolation.user` as this user instead.
    pub default_user: Option<String>,
    /// Refuse plugins whose manifest has no `sha256:` pin.
    pub require_pinning: bool,
    /// Trusted keys, and whether plugins must be signed.
    pub signatures: crate::signature::SignaturePolicy,
}

/// What enforces a supervisor's limits.
#[derive(Debug, Clone)]
pub enum Enforcement {
    Cgroups(Arc<dyn CgroupTree>),
    RlimitsOnly { why: String },
}

/// Why a spawn could not be prepared.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PrepareError {
    /// The plugin must not run as it is (pin mismatch, writable executable,
    /// unknown user): restarting will not help until someone changes it.
    #[error("{0}")]
    Refused(String),
    /// Setting up failed (a cgroup could not be made); a retry may succeed.
    #[error("{0}")]
    Failed(String),
}

/// What a spawn needs from isolation, prepared before fork.
#[derive(Debug)]
pub struct Prepared {
    pub exec: pin::Executable,
    pub child: preexec::ChildSetup,
    pub cgroup: Option<Arc<dyn CgroupManager>>,
    /// Who the plugin runs as when it drops privileges: its socket directory
    /// is handed to this owner.
    pub owner: Option<(u32, u32)>,
    /// The plugin asked for a filesystem view: give it a private tmp in
    /// its socket directory (`TMPDIR`), applied or not.
    pub private_tmp: bool,
    /// What runs: the executable's digest and who signed it.
    pub identity: crate::signature::RunIdentity,
}

impl Prepared {
    /// Lets the plugin write beneath `dir`, its socket directory (and the
    /// private tmp in it), when it runs in a filesystem view.
    pub fn allow_own_dir(&mut self, dir: &Path) -> io::Result<()> {
        match &mut self.child.landlock {
            Some(rs) => rs.allow(dir, landlock::fs_rights(rs.abi())),
            None => Ok(()),
        }
    }
}

/// One limit as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStatus {
    /// The manifest field: `memory`, `nofile`, ...
    pub name: String,
    pub value: String,
    /// `cgroup v1 memory.limit_in_bytes`, `rlimit NOFILE`, `not enforced: ...`.
    pub enforced_by: String,
}

/// A plugin's isolation as `inspect` shows it.
#[derive(Debug, Clone, Default)]
pub struct IsolationStatus {
    /// `cgroup v1`, `cgroup v2` or `rlimits only: <why>`.
    pub mechanism: String,
    /// The running instance's cgroup directories.
    pub cgroup: Vec<PathBuf>,
    pub limits: Vec<LimitStatus>,
    /// Live usage of the running instance's cgroup.
    pub usage: Option<Usage>,
    /// `no_new_privs`, `user nobody`, `network none`, `sha256 9f86d0…`.
    pub hardening: Vec<String>,
    // Privileges (see [`privileges`]).
    /// The uid and gid it runs as; `None` before its first start.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Where the identity came from: `dynamic`, `manifest isolation.user`, ...
    pub identity: String,
    /// Whether the uid was allocated from the dynamic range.
    pub dynamic_user: bool,
    /// Capabilities it holds (`CAP_NET_BIND_SERVICE`); empty: none.
    pub capabilities: Vec<String>,
    pub no_new_privs: bool,
    /// What could not be applied, and why.
    pub degraded: Vec<String>,
}

/// The supervisor's isolation: the mechanism chosen at start-up and the
/// cgroups of live instances.
#[derive(Debug)]
pub struct Isolation {
    enforcement: Enforcement,
    allow_writable_executables: bool,
    /// Instance id → its cgroup, while the instance lives.
    live: Arc<Mutex<HashMap<String, Arc<dyn CgroupManager>>>>,
    privileges: Privileges,
    /// What this host allows of seccomp and PID namespaces.
    confinement: Confinement,
    /// Where `/proc` is: container cgroups are found through it.
    proc_root: PathBuf,
}

/// What `prepare` needs to decide who a plugin runs as and what it keeps.
#[derive(Debug, Clone)]
struct Privileges {
    dynamic_users: privileges::DynamicUsers,
    default_user: Option<String>,
    require_pinning: bool,
    /// The supervisor may change users (`CAP_SETUID` and `CAP_SETGID`).
    can_setid: bool,
    /// The supervisor's effective capabilities: what it can hand on.
    own_caps: u64,
    /// `/proc/sys/kernel/cap_last_cap`, read at start-up.
    last_cap: u32,
    /// Dynamic uids by plugin name.
    users: Arc<Mutex<privileges::Allocator>>,
    /// Plugin name → what its last start resolved, for `inspect`.
    held: Arc<Mutex<HashMap<String, privileges::Held>>>,
    /// Trusted keys and `require_signatures`; a reload swaps them, each
    /// start reads them once.
    signatures: Arc<std::sync::RwLock<Arc<crate::signature::SignaturePolicy>>>,
    /// Digests of unsealed executables, for what `inspect` shows runs.
    digests: Arc<pin::DigestCache>,
}

impl Privileges {
    fn signature_policy(&self) -> Arc<crate::signature::SignaturePolicy> {
        self.signatures
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn new(opts: &IsolationOptions, proc_root: &Path) -> Privileges {
        let can_setid = capable(CAP_SETUID) && capable(CAP_SETGID);
        if !can_setid {
            tracing::warn!(
                "the supervisor is not root (uid {}): plugins run as uid {} too, without their own users, and keep whatever capabilities it has; run it as root for per-plugin users",
                nix::unistd::geteuid(),
                nix::unistd::geteuid()
            );
        }
        Privileges {
            dynamic_users: opts.dynamic_users,
            default_user: opts.default_user.clone(),
            require_pinning: opts.require_pinning,
            can_setid,
            own_caps: privileges::effective_caps(),
            last_cap: privileges::last_cap(proc_root),
            users: Arc::default(),
            held: Arc::default(),
            signatures: Arc::new(std::sync::RwLock::new(Arc::new(opts.signatures.clone()))),
            digests: Arc::default(),
        }
    }

    /// What cannot be applied to any plugin of this supervisor.
    fn degraded(&self) -> Vec<String> {
        let mut d = Vec::new();
        if !self.can_setid {
            let uid = nix::unistd::geteuid();
            d.push(format!(
                "supervisor not root, running as uid {uid}: no per-plugin user"
            ));
        }
        if self.own_caps & (1 << privileges::CAP_SETPCAP) == 0 {
            d.push("capability bounding set not emptied: the supervisor lacks CAP_SETPCAP".into());
        }
        d
    }

    /// Who `m` runs as, its capability plan and what `inspect` shows.
    fn resolve(
        &self,
        m: &Manifest,
    ) -> Result<
        (
            Option<preexec::Credentials>,
            privileges::CapsPlan,
            privileges::Held,
        ),
        PrepareError,
    > {
        use privileges::IdentitySource;
        let euid = nix::unistd::geteuid().as_raw();
        let egid = nix::unistd::getegid().as_raw();
        if self.require_pinning && m.sha256.is_none() {
            return Err(PrepareError::Refused(format!(
                "the supervisor config requires pinned executables (isolation.require_pinning: true) and {} has no `sha256:`; add `sha256: <output of sha256sum {}>`",
                m.path.display(),
                m.exec.display()
            )));
        }
        let (credentials, source) = if m.isolation.user.is_some() || m.isolation.group.is_some() {
            let c = preexec::Credentials::resolve(
                m.isolation.user.as_deref(),
                m.isolation.group.as_deref(),
            )
            .map_err(PrepareError::Refused)?;
            if !self.can_setid {
                return Err(PrepareError::Refused(
                    "isolation.user/group: running a plugin as another user needs a supervisor running as root (CAP_SETUID, CAP_SETGID)"
                        .into(),
                ));
            }
            (c, IdentitySource::Manifest)
        } else if !self.can_setid {
            (None, IdentitySource::Supervisor)
        } else if let Some(user) = &self.default_user {
            let c = preexec::Credentials::resolve(Some(user), None)
                .map_err(|e| PrepareError::Refused(format!("supervisor config {e}")))?;
            (c, IdentitySource::Config)
        } else {
            let uid = lock(&self.users)
                .uid_for(&m.name, self.dynamic_users, privileges::id_in_use)
                .map_err(PrepareError::Refused)?;
            (
                Some(preexec::Credentials {
                    uid,
                    gid: uid,
                    groups: vec![uid],
                }),
                IdentitySource::Dynamic,
            )
        };
        let all = m
            .isolation
            .capabilities
            .iter()
            .any(|c| c.eq_ignore_ascii_case("ALL"));
        let asked = privileges::mask_of(&m.isolation.capabilities, self.last_cap);
        // `ALL`: everything the supervisor holds.
        let keep = if all { asked & self.own_caps } else { asked };
        let missing = keep & !self.own_caps;
        if missing != 0 {
            return Err(PrepareError::Refused(format!(
                "isolation.capabilities: the supervisor does not hold {}, so it cannot give it to the plugin; run it as root or remove it from the manifest",
                privileges::names_of(missing).join(", ")
            )));
        }
        let (uid, gid) = credentials
            .as_ref()
            .map(|c| (c.uid, c.gid))
            .unwrap_or((euid, egid));
        let plan = privileges::CapsPlan {
            keep,
            last_cap: self.last_cap,
            drop_bounding: self.own_caps & (1 << privileges::CAP_SETPCAP) != 0,
            changes_uid: uid != euid,
        };
        let held = privileges::Held {
            uid,
            gid,
            source,
            capabilities: keep,
            no_new_privs: m.isolation.no_new_privs,
            degraded: self.degraded(),
        };
        Ok((credentials, plan, held))
    }
}

// --- seccomp and PID namespace
/// Whether this host can apply seccomp filters and PID namespaces, probed
/// once at start-up: `Err` says why not.
#[derive(Debug, Clone)]
pub struct Confinement {
    pub seccomp: Result<(), String>,
    pub pid_namespace: Result<(), String>,
    /// The Landlock ABI version, for filesystem views.
    pub landlock: Result<u32, String>,
}

impl Confinement {
    /// Probes the kernel and says once what cannot be applied.
    pub fn probe() -> Confinement {
        let c = Confinement {
            seccomp: seccomp::probe(),
            pid_namespace: pidns::probe(),
            landlock: landlock::probe(),
        };
        if let Err(why) = &c.seccomp {
            tracing::warn!("plugins run without their seccomp filters: {why}");
        }
        if let Err(why) = &c.pid_namespace {
            tracing::warn!("plugins run without PID namespaces of their own: {why}");
        }
        match &c.landlock {
            Ok(abi) => tracing::debug!("filesystem views use Landlock ABI {abi}"),
            Err(why) => tracing::warn!(
                "plugins that ask for a filesystem view (isolation.filesystem) are refused, or start without it when they say best_effort: {why}"
            ),
        }
        c
    }

    /// The Landlock ruleset a spawn of `m` starts from: `/` readable, the
    /// devices and `writable` paths writable. The instance's own directory
    /// is added once it exists ([`Prepared::allow_own_dir`]). `None`
    /// for the host view, or without Landlock under `best_effort`.
    fn filesystem_for(&self, m: &Manifest) -> Result<Option<landlock::Ruleset>, PrepareError> {
        let spec = &m.isolation.filesystem;
        if !spec.restricts() {
            return Ok(None);
        }
        let abi = match &self.landlock {
            Ok(abi) => *abi,
            Err(why) if spec.best_effort => {
                tracing::warn!(
                    "{} starts without its filesystem view ({}; isolation.filesystem.best_effort: true): {why}",
                    m.name,
                    spec.view
                );
                return Ok(None);
            }
            Err(why) => {
                return Err(PrepareError::Refused(format!(
                    "isolation.filesystem: the {} view needs Landlock, which this host cannot apply: {why}. Set isolation.filesystem.best_effort: true to start without it",
                    spec.view
                )));
            }
        };
        let all = landlock::fs_rights(abi);
        let mut rs =
            landlock::Ruleset::new(abi).map_err(|e| PrepareError::Failed(e.to_string()))?;
        rs.allow(Path::new("/"), landlock::access::READ)
            .map_err(|e| {
                PrepareError::Failed(format!("isolation.filesystem: cannot open /: {e}"))
            })?;
        for dev in landlock::DEVICES {
            // A host without one of them simply has nothing to allow.
            if let Err(e) = rs.allow(Path::new(dev), all) {
                tracing::debug!("{}: no rule for {dev}: {e}", m.name);
            }
        }
        for p in &spec.writable {
            rs.allow(p, all).map_err(|e| {
                PrepareError::Refused(format!(
                    "isolation.filesystem.writable: cannot open {}: {e}; create it (writable by the plugin's user) or remove it from the list",
                    p.display()
                ))
            })?;
        }
        Ok(Some(rs))
    }

    /// What `m`'s filesystem view cannot be, and why (for `degraded`).
    fn filesystem_degraded(&self, m: &Manifest) -> Option<String> {
        let spec = &m.isolation.filesystem;
        match &self.landlock {
            Err(why) if spec.restricts() => Some(format!(
                "filesystem view {} not applied (best_effort): {why}",
                spec.view
            )),
            _ => None,
        }
    }

    /// The filter a spawn of `m` installs, compiled for this machine.
    fn seccomp_for(&self, m: &Manifest) -> Result<Option<seccomp::Compiled>, PrepareError> {
        if self.seccomp.is_err() {
            return Ok(None);
        }
        let arch = seccomp::host_arch().map_err(PrepareError::Refused)?;
        seccomp::compile(&m.isolation.seccomp, arch)
            .map_err(|e| PrepareError::Refused(format!("isolation.seccomp: {e}")))
    }

    /// `inspect`'s lines for `m`: what is applied, and what is not and why.
    pub fn describe(&self, m: &Manifest) -> Vec<String> {
        let spec = &m.isolation.seccomp;
        let seccomp = match &self.seccomp {
            _ if spec.is_unconfined() => spec.describe(),
            Ok(()) => spec.describe(),
            Err(why) => format!("seccomp not applied: {why}"),
        };
        let pid_ns = match &self.pid_namespace {
            _ if !m.isolation.pid_namespace => {
                "shared PID namespace (isolation.pid_namespace: false)".to_string()
            }
            Ok(()) => "own PID namespace (the plugin is PID 1)".to_string(),
            Err(why) => format!("own PID namespace not applied: {why}"),
        };
        let fs = &m.isolation.filesystem;
        let filesystem = match &self.landlock {
            _ if !fs.restricts() => "filesystem host (no view: isolation.filesystem)".to_string(),
            Ok(abi) => {
                let mut writable = vec![
                    "its socket directory".to_string(),
                    "its private tmp (TMPDIR)".to_string(),
                ];
                writable.extend(fs.writable.iter().map(|p| p.display().to_string()));
                writable.extend(landlock::DEVICES.iter().map(|d| d.to_string()));
                format!(
                    "filesystem {} (Landlock ABI {abi}), writable: {}",
                    fs.view,
                    writable.join(", ")
                )
            }
            Err(why) => format!("filesystem view {} not applied: {why}", fs.view),
        };
        vec![seccomp, pid_ns, filesystem]
    }
}
// --- end seccomp and PID namespace

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Inserts and removes are single calls; a panic elsewhere leaves the map
    // consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Isolation {
    /// The trusted keys and `require_signatures` that starts check now.
    pub fn signature_policy(&self) -> Arc<crate::signature::SignaturePolicy> {
        self.privileges.signature_policy()
    }

    /// Replaces the trusted keys and `require_signatures` (a reload): every
    /// start from now on checks the new ones; what runs is left alone.
    pub fn set_signature_policy(&self, policy: crate::signature::SignaturePolicy) {
        // A plain swap: a poisoned lock still holds a whole value.
        *self
            .privileges
            .signatures
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// Chooses the mechanism: probes (or takes) a cgroup tree, sets it up and
    /// cleans what an earlier run left. Without a usable tree it warns once
    /// and runs on rlimits alone, unless cgroups are required: then the
    /// reason is the error.
    ///
    /// Blocks (cgroupfs, and waiting for stale processes to die): call it
    /// from a blocking context, or use [`Self::start_async`].
    pub fn start(opts: &IsolationOptions, proc_root: &Path) -> Result<Isolation, String> {
        Self::start_keeping(opts, proc_root, &[])
    }

    /// [`Self::start`], keeping the cgroups of the instances named in
    /// `keep` (taken over from a previous supervisor image).
    pub fn start_keeping(
        opts: &IsolationOptions,
        proc_root: &Path,
        keep: &[String],
    ) -> Result<Isolation, String> {
        let (tree, require) = match &opts.cgroups {
            CgroupMode::Off => (
                Err("cgroups are turned off (cgroup.enabled: false, or an embedded supervisor without SupervisorOptions::isolation.cgroups)".to_string()),
                false,
            ),
            CgroupMode::Probe {
                root,
                parent,
                require,
            } => (
                probe(&ProbeOptions {
                    fs: Arc::new(fs::HostFs),
                    root: root.clone(),
                    proc_root: proc_root.to_path_buf(),
                    parent: parent.clone(),
                    pid: std::process::id() as i32,
                }),
                *require,
            ),
            CgroupMode::Tree(tree) => (Ok(tree.clone()), true),
        };
        let tree = tree.and_then(|tree| {
            tree.setup().map_err(|e| e.to_string())?;
            let stale = tree.clean_stale_keeping(keep).map_err(|e| e.to_string())?;
            if !stale.is_empty() {
                tracing::info!(
                    "removed {} stale cgroup(s) of an earlier run: {}",
                    stale.len(),
                    stale.join(", ")
                );
            }
            Ok(tree)
        });
        let enforcement = match tree {
            Ok(tree) => {
                tracing::info!(
                    "limits enforced by {} ({}) at {}",
                    tree.mechanism(),
                    tree.controllers(),
                    tree.describe()
                );
                Enforcement::Cgroups(tree)
            }
            Err(why) if require => {
                return Err(format!(
                    "cgroups are required (cgroup.require: true) but cannot be used: {why}"
                ));
            }
            Err(why) => {
                if !matches!(opts.cgroups, CgroupMode::Off) {
                    tracing::warn!(
                        "no usable cgroup tree, so plugins run on rlimits alone: memory, cpu and pids limits are not enforced ({why}); set cgroup.require: true to make this fatal"
                    );
                }
                Enforcement::RlimitsOnly { why }
            }
        };
        Ok(Isolation {
            enforcement,
            allow_writable_executables: opts.allow_writable_executables,
            live: Arc::default(),
            privileges: Privileges::new(opts, proc_root),
            confinement: Confinement::probe(),
            proc_root: proc_root.to_path_buf(),
        })
    }

    /// [`Self::start`] on the blocking pool: probing, setting up the tree
    /// and killing an earlier run's stale cgroups read and write cgroupfs
    /// and wait for processes to die. Prefer it inside a runtime.
    pub async fn start_async(
        opts: &IsolationOptions,
        proc_root: &Path,
    ) -> Result<Isolation, String> {
        Self::start_async_keeping(opts, proc_root, &[]).await
    }

    /// [`Self::start_async`] with [`Self::start_keeping`]'s `keep`.
    pub async fn start_async_keeping(
        opts: &IsolationOptions,
        proc_root: &Path,
        keep: &[String],
    ) -> Result<Isolation, String> {
        let opts = opts.clone();
        let proc_root = proc_root.to_path_buf();
        let keep = keep.to_vec();
        tokio::task::spawn_blocking(move || Isolation::start_keeping(&opts, &proc_root, &keep))
            .await
            .map_err(|e| format!("starting isolation stopped before it finished: {e}"))?
    }

    /// At a clean shutdown, after every instance is gone: removes the
    /// parent cgroup if nothing is left in it.
    pub fn shutdown(&self) {
        if let Enforcement::Cgroups(tree) = &self.enforcement
            && let Err(e) = tree.teardown()
        {
            tracing::debug!("the parent cgroup stays: {e}");
        }
    }

    pub fn enforcement(&self) -> &Enforcement {
        &self.enforcement
    }

    /// `cgroup v1`, `cgroup v2` or `rlimits only: <why>`.
    pub fn mechanism(&self) -> String {
        match &self.enforcement {
            Enforcement::Cgroups(tree) => tree.mechanism().to_string(),
            Enforcement::RlimitsOnly { why } => format!("rlimits only: {why}"),
        }
    }

    /// Everything a spawn of `manifest` as `instance_id` needs, before fork:
    /// the executable opened and checked, credentials resolved, rlimits
    /// computed, and the instance's cgroup made with its `cgroup.procs`
    /// files opened. Side effects (the cgroup) come last.
    ///
    /// All of it blocks (hashing the executable, user and group lookups
    /// through NSS, cgroup files), so it runs on the blocking pool, never on
    /// a runtime worker. Cancel safe: if the caller stops waiting, a cgroup
    /// made for the start is removed.
    pub async fn prepare(
        &self,
        manifest: &Manifest,
        instance_id: &str,
    ) -> Result<Prepared, PrepareError> {
        let enforcement = self.enforcement.clone();
        let confinement = self.confinement.clone();
        let allow_writable = self.allow_writable_executables;
        let privileges = self.privileges.clone();
        let manifest = manifest.clone();
        let instance_id = instance_id.to_string();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let prepared = prepare_blocking(
                &enforcement,
                &confinement,
                allow_writable,
                &privileges,
                &manifest,
                &instance_id,
            );
            if let Err(Ok(Prepared {
                cgroup: Some(cgroup),
                ..
            })) = tx.send(prepared)
            {
                // Nobody is waiting for this start any more.
                let _ = cgroup.remove();
            }
        });
        rx.await.unwrap_or_else(|_| {
            Err(PrepareError::Failed(
                "preparing the start stopped before it finished (a panic on the blocking pool)"
                    .into(),
            ))
        })
    }

    /// The sandbox a lifecycle hook of `manifest` runs in (see
    /// [`crate::hooks`]): the plugin's user, capabilities, rlimits,
    /// network namespace, `no_new_privs`, seccomp filter and filesystem
    /// view, but neither its cgroup (a hook is time-bounded instead, and
    /// pre-start runs before the cgroup exists) nor its PID namespace (the
    /// hook's process group is killed when it ends or times out).
    pub async fn hook_setup(
        &self,
        manifest: &Manifest,
    ) -> Result<preexec::ChildSetup, PrepareError> {
        let cgroups = matches!(self.enforcement, Enforcement::Cgroups(_));
        let confinement = self.confinement.clone();
        let privileges = self.privileges.clone();
        let manifest = manifest.clone();
        tokio::task::spawn_blocking(move || {
            let (credentials, caps, _held) = privileges.resolve(&manifest)?;
            let data_fallback = (!cgroups).then_some(manifest.limits.memory).flatten();
            Ok(preexec::ChildSetup {
                cgroup_procs: Vec::new(),
                rlimits: rlimits::from_limits(&manifest.limits, data_fallback.map(|s| s.0)),
                credentials,
                network_none: manifest.isolation.network == NetworkMode::None,
                no_new_privs: manifest.isolation.no_new_privs,
                caps: Some(caps),
                seccomp: confinement.seccomp_for(&manifest)?,
                pid_namespace: false,
                landlock: confinement.filesystem_for(&manifest)?,
                // A hook dies with the supervisor, and its output is piped.
                survive: false,
                output: None,
            })
        })
        .await
        .unwrap_or_else(|_| {
            Err(PrepareError::Failed(
                "preparing the hook's sandbox stopped before it finished (a panic on the blocking pool)"
                    .into(),
            ))
        })
    }

    /// Records the cgroup a container runtime made for a live instance
    /// whose container's init process is `pid`, so `inspect`, `ps` and the
    /// exit reason (OOM kills) see it like any plugin's. The runtime owns
    /// it: the returned handle only forgets it when dropped.
    pub fn observe(&self, instance_id: &str, pid: i32) -> Option<ObservedCgroup> {
        let Enforcement::Cgroups(tree) = &self.enforcement else {
            return None;
        };
        let path = self.proc_root.join(pid.to_string()).join("cgroup");
        let text = std::fs::read_to_string(&path).ok()?;
        let cgroup = tree.adopt(&text)?;
        lock(&self.live).insert(instance_id.to_string(), cgroup.clone());
        Some(ObservedCgroup {
            instance: instance_id.to_string(),
            cgroup,
            live: self.live.clone(),
        })
    }

    /// Records a live instance's cgroup; the lease kills and removes it when
    /// dropped.
    pub fn lease(
        &self,
        instance_id: &str,
        cgroup: Arc<dyn CgroupManager>,
        tasks: &tokio_util::task::TaskTracker,
    ) -> CgroupLease {
        lock(&self.live).insert(instance_id.to_string(), cgroup.clone());
        CgroupLease {
            instance: instance_id.to_string(),
            cgroup,
            live: self.live.clone(),
            tasks: tasks.clone(),
        }
    }

    /// The lease of a live instance's existing cgroup, taken over from a
    /// previous supervisor image; `None` without cgroups.
    pub fn relet(
        &self,
        instance_id: &str,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Option<CgroupLease> {
        let Enforcement::Cgroups(tree) = &self.enforcement else {
            return None;
        };
        let cgroup = tree.existing(instance_id)?;
        Some(self.lease(instance_id, cgroup, tasks))
    }

    /// `inspect`'s view of a plugin whose live instances (one per replica)
    /// are `instances`; usage is summed over them.
    pub fn status<'a>(
        &self,
        manifest: &Manifest,
        instances: impl IntoIterator<Item = &'a str>,
    ) -> IsolationStatus {
        self.status_with(manifest, instances, true)
    }

    /// [`Self::status`], reading live usage from the cgroups only when
    /// `usage` is true (`usage` is then `None`).
    pub fn status_with<'a>(
        &self,
        manifest: &Manifest,
        instances: impl IntoIterator<Item = &'a str>,
        usage: bool,
    ) -> IsolationStatus {
        let cgroups: Vec<Arc<dyn CgroupManager>> = {
            let live = lock(&self.live);
            instances
                .into_iter()
                .filter_map(|i| live.get(i).cloned())
                .collect()
        };
        let usage = if usage {
            cgroups.iter().map(|c| c.usage()).reduce(|a, b| a.plus(&b))
        } else {
            None
        };
        let held = lock(&self.privileges.held).get(&manifest.name).cloned();
        let p = &self.privileges;
        IsolationStatus {
            mechanism: self.mechanism(),
            cgroup: cgroups.iter().flat_map(|c| c.paths()).collect(),
            limits: limit_table(&manifest.limits, &self.enforcement),
            usage,
            uid: held.as_ref().map(|h| h.uid),
            gid: held.as_ref().map(|h| h.gid),
            identity: match &held {
                Some(h) => h.source.to_string(),
                None => "not started yet".to_string(),
            },
            dynamic_user: held
                .as_ref()
                .is_some_and(|h| h.source == privileges::IdentitySource::Dynamic),
            capabilities: held
                .as_ref()
                .map(|h| privileges::names_of(h.capabilities))
                .unwrap_or_else(|| {
                    privileges::names_of(privileges::mask_of(
                        &manifest.isolation.capabilities,
                        p.last_cap,
                    ))
                }),
            no_new_privs: manifest.isolation.no_new_privs,
            degraded: held
                .map(|h| h.degraded)
                .unwrap_or_else(|| p.degraded())
                .into_iter()
                .chain(self.confinement.filesystem_degraded(manifest))
                .collect(),
            hardening: hardening_of(manifest)
                .into_iter()
                .chain(self.confinement.describe(manifest))
                .collect(),
        }
    }
}

/// [`Isolation::prepare`]'s blocking part.
fn prepare_blocking(
    enforcement: &Enforcement,
    confinement: &Confinement,
    allow_writable: bool,
    privileges: &Privileges,
    manifest: &Manifest,
    instance_id: &str,
) -> Result<Prepared, PrepareError> {
    // The policy in force now, for the whole start (a reload may swap it).
    let signatures = privileges.signature_policy();
    // A checked signature compares the sealed bytes, which are what runs.
    let signed = signatures.applies_to(&manifest.dir);
    let exec = pin::Executable::open_with(
        &manifest.exec,
        manifest.sha256.as_deref(),
        allow_writable,
        manifest.sha256.is_some() || signed,
    )
    .map_err(|e| match e {
        pin::PinError::Refused(why) => PrepareError::Refused(why),
        pin::PinError::Io(why) => PrepareError::Failed(why),
    })?;
    let signer = signatures
        .check(manifest, exec.sha256.as_deref())
        .map_err(PrepareError::Refused)?;
    let identity = crate::signature::RunIdentity {
        sha256: match privileges.digests.digest(&exec) {
            Ok(digest) => Some(digest),
            Err(e) => {
                tracing::warn!(plugin = %manifest.name, "cannot compute the sha256 of {}: {e}", manifest.exec.display());
                None
            }
        },
        sealed: exec.sealed,
        signer,
    };
    let (credentials, caps, held) = privileges.resolve(manifest)?;
    if let Some(c) = &credentials
        && !exec.exec_from_fd()
    {
        // Executed by path, as the plugin's user: it must reach the file.
        let want = if exec.script { 0o5 } else { 0o1 };
        privileges::reachable(&manifest.exec, c.uid, &c.groups, want).map_err(|why| {
            PrepareError::Refused(format!(
                "{} runs as uid {} ({}), which cannot run its executable: {why}. Make the directories searchable (chmod o+x) and the file executable (and readable, for a script) by others, pin it with sha256 (a pinned copy is executed from memory), or set isolation.user",
                manifest.name, c.uid, held.source
            ))
        })?;
    }
    if manifest.isolation.network == NetworkMode::None && !capable(CAP_SYS_ADMIN) {
        return Err(PrepareError::Refused(
            "isolation.network: none needs a supervisor running as root (CAP_SYS_ADMIN) to make a network namespace".into(),
        ));
    }
    let seccomp = confinement.seccomp_for(manifest)?;
    // Without no_new_privs the kernel installs a filter only for a process
    // holding CAP_SYS_ADMIN, which a plugin does not keep by default: say so
    // now rather than fail every start at the seccomp step.
    let keeps_sys_admin = manifest
        .isolation
        .capabilities
        .iter()
        .any(|c| c == "ALL" || c == "CAP_SYS_ADMIN");
    if seccomp.is_some() && !manifest.isolation.no_new_privs && !keeps_sys_admin {
        return Err(PrepareError::Refused(
            "isolation.no_new_privs: false leaves no way to install the seccomp filter (the kernel needs no_new_privs, or CAP_SYS_ADMIN kept); set isolation.seccomp: unconfined too, or keep no_new_privs".into(),
        ));
    }
    let landlock = confinement.filesystem_for(manifest)?;
    if landlock.is_some() && !manifest.isolation.no_new_privs && !keeps_sys_admin {
        return Err(PrepareError::Refused(
            "isolation.no_new_privs: false leaves no way to enter the filesystem view (Landlock needs no_new_privs, or CAP_SYS_ADMIN kept); keep no_new_privs, or set isolation.filesystem: host".into(),
        ));
    }
    let cgroups = matches!(*enforcement, Enforcement::Cgroups(_));
    let data_fallback = (!cgroups).then_some(manifest.limits.memory).flatten();
    let limits = rlimits::from_limits(&manifest.limits, data_fallback.map(|s| s.0));
    rlimits::check_feasible(&limits, capable(CAP_SYS_RESOURCE)).map_err(PrepareError::Refused)?;
    let (cgroup, procs) = match enforcement {
        Enforcement::Cgroups(tree) => {
            let cg = tree
                .create(instance_id, &CgroupLimits::from_manifest(&manifest.limits))
                .map_err(|e| PrepareError::Failed(format!("cgroup: {e}")))?;
            match cg.open_procs() {
                Ok(procs) => (Some(cg), procs),
                Err(e) => {
                    let _ = cg.remove();
                    return Err(PrepareError::Failed(format!("cgroup: {e}")));
                }
            }
        }
        Enforcement::RlimitsOnly { .. } => (None, Vec::new()),
    };
    let owner = credentials.as_ref().map(|c| (c.uid, c.gid));
    let child = preexec::ChildSetup {
        cgroup_procs: procs,
        rlimits: limits,
        credentials,
        network_none: manifest.isolation.network == NetworkMode::None,
        no_new_privs: manifest.isolation.no_new_privs,
        caps: Some(caps),
        seccomp,
        pid_namespace: manifest.isolation.pid_namespace && confinement.pid_namespace.is_ok(),
        landlock,
        survive: false,
        output: None,
    };
    lock(&privileges.held).insert(manifest.name.clone(), held);
    Ok(Prepared {
        exec,
        child,
        cgroup,
        owner,
        private_tmp: manifest.isolation.filesystem.restricts(),
        identity,
    })
}

/// What a start of `m` would refuse, checked offline (`plugvisor check`):
/// the executable (pin, writability, set-user-ID), the user and group, the
/// filesystem view's writable paths, and a missing pin when
/// `require_pinning`. Returns what is allowed but worth a warning: an
/// unpinned executable.
pub fn check_manifest(
    m: &Manifest,
    allow_writable_executables: bool,
    require_pinning: bool,
) -> Result<Vec<String>, String> {
    if let Some(remote) = &m.remote {
        return crate::remote::check(remote).map(|()| Vec::new());
    }
    pin::Executable::open(&m.exec, m.sha256.as_deref(), allow_writable_executables)
        .map_err(|e| e.to_string())?;
    preexec::Credentials::resolve(m.isolation.user.as_deref(), m.isolation.group.as_deref())?;
    // A start opens each of them and refuses the plugin if one is missing.
    for p in &m.isolation.filesystem.writable {
        std::fs::metadata(p).map_err(|e| {
            format!(
                "isolation.filesystem.writable: cannot open {}: {e}; create it (writable by the plugin's user) or remove it from the list",
                p.display()
            )
        })?;
    }
    let mut warnings = Vec::new();
    if m.sha256.is_none() {
        let what = format!(
            "{}: {} is not pinned (no `sha256:`), so any change to the file runs unchecked; add `sha256: <output of sha256sum {}>`",
            m.path.display(),
            m.exec.display(),
            m.exec.display()
        );
        if require_pinning {
            return Err(format!(
                "{what} (the supervisor config sets isolation.require_pinning: true)"
            ));
        }
        warnings.push(what);
    }
    Ok(warnings)
}

/// A container runtime's cgroup of a live instance (see
/// [`Isolation::observe`]): read, never killed or removed; dropping it
/// only stops showing it.
#[derive(Debug)]
pub struct ObservedCgroup {
    instance: String,
    cgroup: Arc<dyn CgroupManager>,
    live: Arc<Mutex<HashMap<String, Arc<dyn CgroupManager>>>>,
}

impl ObservedCgroup {
    pub fn cgroup(&self) -> &Arc<dyn CgroupManager> {
        &self.cgroup
    }
}

impl Drop for ObservedCgroup {
    fn drop(&mut self) {
        let mut live = lock(&self.live);
        if live
            .get(&self.instance)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cgroup))
        {
            live.remove(&self.instance);
        }
    }
}

/// Holds a live instance's cgroup. Dropping it kills whatever is left in
/// the cgroup and removes it (on a task, as that waits for the processes to
/// go).
#[derive(Debug)]
pub struct CgroupLease {
    instance: String,
    cgroup: Arc<dyn CgroupManager>,
    live: Arc<Mutex<HashMap<String, Arc<dyn CgroupManager>>>>,
    tasks: tokio_util::task::TaskTracker,
}

impl CgroupLease {
    pub fn cgroup(&self) -> &Arc<dyn CgroupManager> {
        &self.cgroup
    }

    /// SIGKILLs every process in the cgroup, on the blocking pool (a v1
    /// cgroup is frozen first, which is waited for).
    pub async fn kill_all(&self) -> Result<(), CgroupError> {
        let cgroup = self.cgroup.clone();
        tokio::task::spawn_blocking(move || cgroup.kill_all())
            .await
            .unwrap_or_else(|e| {
                Err(CgroupError::io(
                    "cannot kill the processes of",
                    &self.cgroup.paths().first().cloned().unwrap_or_default(),
                    io::Error::other(e.to_string()),
                ))
            })
    }
}

impl Drop for CgroupLease {
    fn drop(&mut self) {
        lock(&self.live).remove(&self.instance);
        let cgroup = self.cgroup.clone();
        let instance = std::mem::take(&mut self.instance);
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tasks
                .spawn(async move { dispose(&instance, cgroup).await });
        } else {
            // No runtime (the process is exiting): one attempt, no waiting.
            let _ = cgroup.kill_all();
            let _ = cgroup.remove();
        }
    }
}

/// Kills every process in `cgroup`, waits until it is empty, and removes it.
/// Gives up (with a warning) after a few seconds: the directory is then
/// removed as stale by the next start. Runs on the blocking pool: killing a
/// v1 cgroup freezes it and polls, and every step is a cgroupfs call.
pub async fn dispose(instance: &str, cgroup: Arc<dyn CgroupManager>) {
    let instance = instance.to_string();
    let _ = tokio::task::spawn_blocking(move || dispose_blocking(&instance, &*cgroup)).await;
}

/// [`dispose`], on the calling thread.
fn dispose_blocking(instance: &str, cgroup: &dyn CgroupManager) {
    const STEP: Duration = Duration::from_millis(5);
    const ATTEMPTS: u32 = 1000; // 5 s
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        let pids = cgroup.pids().unwrap_or_default();
        if !pids.is_empty() {
            // Again and again: a process may have forked while being killed
            // where no freezer is available.
            if attempt % 20 == 0
                && let Err(e) = cgroup.kill_all()
            {
                last = Some(e.to_string());
            }
            std::thread::sleep(STEP);
            continue;
        }
        match cgroup.remove() {
            Ok(()) => return,
            // A process is still on its way out.
            Err(e) if e.errno() == Some(libc::EBUSY) => {
                last = Some(e.to_string());
                std::thread::sleep(STEP);
            }
            Err(e) => {
                tracing::warn!(instance, "cannot remove the cgroup: {e}");
                return;
            }
        }
    }
    tracing::warn!(
        instance,
        "the cgroup is still in use after 5s; leaving it for the next start-up to clean ({})",
        last.unwrap_or_default()
    );
}

/// Each limit of the manifest with what enforces it under `enforcement`.
pub fn limit_table(l: &Limits, enforcement: &Enforcement) -> Vec<LimitStatus> {
    let mut rows = Vec::new();
    let mut row = |name: &str, value: String, by: String| {
        rows.push(LimitStatus {
            name: name.to_string(),
            value,
            enforced_by: by,
        })
    };
    let (mechanism, controllers) = match enforcement {
        Enforcement::Cgroups(tree) => (Some(tree.mechanism()), tree.controllers()),
        Enforcement::RlimitsOnly { .. } => (None, Controllers::default()),
    };
    let cgroup_file = |on: bool, v1: &str, v2: &str| -> Option<String> {
        match (mechanism, on) {
            (Some(Mechanism::V1), true) => Some(format!("cgroup v1 {v1}")),
            (Some(Mechanism::V2), true) => Some(format!("cgroup v2 {v2}")),
            _ => None,
        }
    };
    let no_controller = |what: &str| match mechanism {
        Some(m) => format!("not enforced: no {what} controller in this {m} tree"),
        None => "not enforced: no cgroup".to_string(),
    };
    if let Some(m) = l.memory {
        let by = cgroup_file(controllers.memory, "memory.limit_in_bytes", "memory.max")
            .unwrap_or_else(|| match (mechanism, l.data) {
                (None, None) => "rlimit DATA (an approximation: no cgroup)".to_string(),
                _ => no_controller("memory"),
            });
        row("memory", format_size(m.0), by);
    }
    if let Some(h) = l.memory_high {
        let by = cgroup_file(
            controllers.memory,
            "memory.soft_limit_in_bytes",
            "memory.high",
        )
        .unwrap_or_else(|| no_controller("memory"));
        row("memory_high", format_size(h.0), by);
    }
    if let Some(c) = l.cpu {
        let by = cgroup_file(controllers.cpu, "cpu.cfs_quota_us", "cpu.max")
            .unwrap_or_else(|| no_controller("cpu"));
        row("cpu", format!("{c} cores"), by);
    }
    if let Some(p) = l.pids {
        let by = cgroup_file(controllers.pids, "pids.max", "pids.max")
            .unwrap_or_else(|| no_controller("pids"));
        row("pids", p.to_string(), by);
    }
    // Without cgroups, `memory` falls back to RLIMIT_DATA (see `prepare`).
    let data_fallback = mechanism
        .is_none()
        .then_some(l.memory)
        .flatten()
        .map(|s| s.0);
    for r in rlimits::from_limits(l, data_fallback) {
        row(
            r.resource.field(),
            r.resource.format(r.soft),
            format!("rlimit {}", r.resource.name()),
        );
    }
    rows
}

/// The hardening a plugin runs with, for `inspect`.
fn hardening_of(m: &Manifest) -> Vec<String> {
    let mut h = vec![
        "clean environment".to_string(),
        "stdin /dev/null".to_string(),
        "only fds 0-2 inherited".to_string(),
        "own session".to_string(),
    ];
    if m.isolation.no_new_privs {
        h.push("no_new_privs".into());
    }
    match m.isolation.user.as_deref() {
        Some(user @ ("root" | "0")) => h.push(format!("user {user} (explicit opt-in)")),
        Some(user) => h.push(format!("user {user}")),
        None => {}
    }
    if let Some(group) = &m.isolation.group {
        h.push(format!("group {group}"));
    }
    if m.isolation.network == NetworkMode::None {
        h.push("network none".into());
    }
    if let Some(digest) = &m.sha256 {
        h.push(format!("sha256 {digest}"));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{HumanDuration, HumanSize};

    #[test]
    fn oom_is_read_from_counters_not_guessed_from_sigkill() {
        let killed = ExitStatus::Signaled {
            signal: libc::SIGKILL,
            core_dumped: false,
        };
        let counted = OomEvidence {
            kills: Some(1),
            limit_hits: Some(5),
        };
        assert!(counted.explains(killed));
        // An exit code or another signal is never an OOM kill.
        assert!(!counted.explains(ExitStatus::Exited(137)));
        assert!(!counted.explains(ExitStatus::Signaled {
            signal: libc::SIGTERM,
            core_dumped: false
        }));
        // SIGKILL without an OOM kill counted: not OOM, even if the limit was hit.
        let none = OomEvidence {
            kills: Some(0),
            limit_hits: Some(9),
        };
        assert!(!none.explains(killed));
        // Kernels without an OOM-kill counter: the limit hits decide.
        let fallback = OomEvidence {
            kills: None,
            limit_hits: Some(3),
        };
        assert!(fallback.explains(killed));
        assert!(!OomEvidence::default().explains(killed));
    }

    /// A cgroupfs that notes which thread touched it.
    #[derive(Debug)]
    struct ThreadNoting {
        inner: Arc<fake::FakeCgroupFs>,
        threads: Mutex<Vec<std::thread::ThreadId>>,
    }

    impl ThreadNoting {
        fn note(&self) {
            lock(&self.threads).push(std::thread::current().id());
        }
    }

    impl CgroupFs for ThreadNoting {
        fn read(&self, path: &Path) -> io::Result<String> {
            self.note();
            self.inner.read(path)
        }
        fn write(&self, path: &Path, value: &str) -> io::Result<()> {
            self.note();
            self.inner.write(path, value)
        }
        fn mkdir(&self, path: &Path) -> io::Result<()> {
            self.note();
            self.inner.mkdir(path)
        }
        fn rmdir(&self, path: &Path) -> io::Result<()> {
            self.note();
            self.inner.rmdir(path)
        }
        fn subdirs(&self, path: &Path) -> io::Result<Vec<String>> {
            self.note();
            self.inner.subdirs(path)
        }
        fn exists(&self, path: &Path) -> bool {
            self.note();
            self.inner.exists(path)
        }
        fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
            self.note();
            self.inner.canonicalize(path)
        }
        fn open_write(&self, path: &Path) -> io::Result<OwnedFd> {
            self.note();
            self.inner.open_write(path)
        }
    }

    /// The test runs on a current-thread runtime: its one worker is this
    /// thread, which must never do cgroupfs work, hashing or NSS lookups.
    #[tokio::test]
    async fn start_prepare_and_dispose_block_only_off_the_runtime_thread() {
        use std::os::unix::fs::PermissionsExt;
        let fake = Arc::new(fake::FakeCgroupFs::v2(&["memory", "pids"]).unwrap());
        let fs = Arc::new(ThreadNoting {
            inner: fake.clone(),
            threads: Mutex::default(),
        });
        let runtime_thread = std::thread::current().id();
        let tree = probe(&ProbeOptions {
            fs: fs.clone(),
            root: fake.root(),
            proc_root: fake.proc_root(),
            parent: "plugvisor".into(),
            pid: 4_194_400,
        })
        .unwrap();
        lock(&fs.threads).clear();
        let iso = Isolation::start_async(
            &IsolationOptions {
                cgroups: CgroupMode::Tree(tree),
                allow_writable_executables: false,
                ..IsolationOptions::default()
            },
            &fake.proc_root(),
        )
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("plugin");
        std::fs::write(&bin, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let digest = pin::sha256_file(&bin).unwrap();
        let manifest = Manifest::parse(
            &dir.path().join("plugin.yaml"),
            &format!(
                "name: echo\nversion: 1.0.0\nexec: ./plugin\nsha256: {digest}\nlimits: {{memory: 64MiB, pids: 16}}\n"
            ),
        )
        .unwrap();
        let prepared = iso.prepare(&manifest, "echo-1").await.unwrap();
        assert_eq!(prepared.exec.sha256.as_deref(), Some(digest.as_str()));
        let tasks = tokio_util::task::TaskTracker::new();
        let lease = iso.lease("echo-1", prepared.cgroup.clone().unwrap(), &tasks);
        assert!(fake.root().join("plugvisor/echo-1").is_dir());
        lease.kill_all().await.unwrap();
        drop(lease);
        tasks.close();
        tasks.wait().await;
        let threads = lock(&fs.threads).clone();
        assert!(threads.len() > 3, "{threads:?}");
        assert!(
            !threads.contains(&runtime_thread),
            "cgroupfs was touched on the runtime thread"
        );
        // The lease's disposal removed the cgroup.
        assert!(!fake.root().join("plugvisor/echo-1").exists());
    }

    fn probe_of(
        fs: &Arc<fake::FakeCgroupFs>,
        root: PathBuf,
    ) -> Result<Arc<dyn CgroupTree>, String> {
        probe(&ProbeOptions {
            fs: fs.clone(),
            root,
            proc_root: fs.proc_root(),
            parent: "plugvisor".into(),
            pid: 4_194_400,
        })
    }

    #[test]
    fn probing_prefers_v2_then_v1_then_a_hybrid_unified_tree() {
        let v2 = Arc::new(fake::FakeCgroupFs::v2(&["memory", "pids"]).unwrap());
        assert_eq!(probe_of(&v2, v2.root()).unwrap().mechanism(), Mechanism::V2);

        // Hybrid as on the development machines: v1 controllers, and a
        // unified tree without controllers. v1 wins.
        let hybrid = Arc::new(fake::FakeCgroupFs::v1(&["memory", "cpu", "pids"]).unwrap());
        let unified = hybrid.root().join("unified");
        std::fs::create_dir(&unified).unwrap();
        std::fs::write(unified.join("cgroup.controllers"), "\n").unwrap();
        assert_eq!(
            probe_of(&hybrid, hybrid.root()).unwrap().mechanism(),
            Mechanism::V1
        );

        // Hybrid with the controllers on the unified side.
        let only_unified = Arc::new(fake::FakeCgroupFs::v1(&[]).unwrap());
        let unified = only_unified.root().join("unified");
        std::fs::create_dir(&unified).unwrap();
        std::fs::write(unified.join("cgroup.controllers"), "memory pids\n").unwrap();
        std::fs::write(unified.join("cgroup.subtree_control"), "\n").unwrap();
        let tree = probe_of(&only_unified, only_unified.root()).unwrap();
        assert_eq!(tree.mechanism(), Mechanism::V2);
        assert!(
            tree.describe().ends_with("unified/plugvisor"),
            "{}",
            tree.describe()
        );

        let nothing = Arc::new(fake::FakeCgroupFs::v1(&[]).unwrap());
        let e = probe_of(&nothing, nothing.root()).unwrap_err();
        assert!(e.contains("no cgroup filesystem at"), "{e}");
    }

    #[test]
    fn without_cgroups_it_runs_on_rlimits_unless_they_are_required() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("no-cgroupfs");
        let probe = |require| IsolationOptions {
            cgroups: CgroupMode::Probe {
                root: root.clone(),
                parent: "plugvisor".into(),
                require,
            },
            allow_writable_executables: false,
            ..IsolationOptions::default()
        };
        let iso = Isolation::start(&probe(false), dir.path()).unwrap();
        assert!(
            iso.mechanism()
                .starts_with("rlimits only: no cgroup filesystem at"),
            "{}",
            iso.mechanism()
        );
        let e = Isolation::start(&probe(true), dir.path()).unwrap_err();
        assert!(e.contains("cgroup.require: true"), "{e}");
        let off = Isolation::start(&IsolationOptions::default(), dir.path()).unwrap();
        assert!(
            off.mechanism().contains("cgroups are turned off"),
            "{}",
            off.mechanism()
        );

        let fs = Arc::new(fake::FakeCgroupFs::v2(&["memory", "cpu", "pids"]).unwrap());
        let tree = probe_of(&fs, fs.root()).unwrap();
        let iso = Isolation::start(
            &IsolationOptions {
                cgroups: CgroupMode::Tree(tree),
                allow_writable_executables: false,
                ..IsolationOptions::default()
            },
            dir.path(),
        )
        .unwrap();
        assert_eq!(iso.mechanism(), "cgroup v2");
    }

    #[test]
    fn capabilities_are_read_from_the_kernel() {
        // A process that is not root has no effective capabilities (short of
        // file capabilities, which the test binary lacks); root normally has
        // CAP_SYS_ADMIN here, but may lack others (in a container).
        if !nix::unistd::geteuid().is_root() {
            assert!(!(0..41).any(capable));
        }
        assert!(!capable(63), "no such capability");
    }

    #[test]
    fn cpu_cores_become_a_quota() {
        assert_eq!(cpu_quota_us(0.5), 50_000);
        assert_eq!(cpu_quota_us(2.0), 200_000);
        assert_eq!(cpu_quota_us(0.001), 1000);
    }

    #[derive(Debug)]
    struct Tree(Mechanism, Controllers);
    impl CgroupTree for Tree {
        fn mechanism(&self) -> Mechanism {
            self.0
        }
        fn controllers(&self) -> Controllers {
            self.1
        }
        fn describe(&self) -> String {
            String::new()
        }
        fn setup(&self) -> Result<(), CgroupError> {
            Ok(())
        }
        fn clean_stale(&self) -> Result<Vec<String>, CgroupError> {
            Ok(Vec::new())
        }
        fn teardown(&self) -> Result<(), CgroupError> {
            Ok(())
        }
        fn create(&self, _: &str, _: &CgroupLimits) -> Result<Arc<dyn CgroupManager>, CgroupError> {
            unreachable!("not used by limit_table")
        }
    }

    #[test]
    fn inspect_names_what_enforces_each_limit() {
        let limits = Limits {
            memory: Some(HumanSize(128 << 20)),
            cpu: Some(0.5),
            pids: Some(64),
            nofile: Some(1024),
            cpu_time: Some(HumanDuration(Duration::from_secs(90))),
            ..Limits::default()
        };
        let by = |rows: &[LimitStatus], name: &str| {
            rows.iter()
                .find(|r| r.name == name)
                .map(|r| format!("{} by {}", r.value, r.enforced_by))
                .unwrap_or_default()
        };
        let all = Controllers {
            memory: true,
            cpu: true,
            cpuacct: true,
            pids: true,
            freezer: true,
        };
        let v1 = limit_table(
            &limits,
            &Enforcement::Cgroups(Arc::new(Tree(Mechanism::V1, all))),
        );
        assert_eq!(
            by(&v1, "memory"),
            "128MiB by cgroup v1 memory.limit_in_bytes"
        );
        assert_eq!(by(&v1, "cpu"), "0.5 cores by cgroup v1 cpu.cfs_quota_us");
        assert_eq!(by(&v1, "pids"), "64 by cgroup v1 pids.max");
        assert_eq!(by(&v1, "nofile"), "1024 by rlimit NOFILE");
        assert_eq!(by(&v1, "core"), "0B by rlimit CORE");
        assert_eq!(by(&v1, "cpu_time"), "90s by rlimit CPU");

        let no_cpu = Controllers { cpu: false, ..all };
        let v2 = limit_table(
            &limits,
            &Enforcement::Cgroups(Arc::new(Tree(Mechanism::V2, no_cpu))),
        );
        assert_eq!(by(&v2, "memory"), "128MiB by cgroup v2 memory.max");
        assert_eq!(
            by(&v2, "cpu"),
            "0.5 cores by not enforced: no cpu controller in this cgroup v2 tree"
        );

        let none = limit_table(&limits, &Enforcement::RlimitsOnly { why: "test".into() });
        assert_eq!(
            by(&none, "memory"),
            "128MiB by rlimit DATA (an approximation: no cgroup)"
        );
        assert_eq!(by(&none, "pids"), "64 by not enforced: no cgroup");
        assert_eq!(by(&none, "data"), "128MiB by rlimit DATA");
    }

    fn with_filesystem(spec: &str) -> Manifest {
        Manifest::parse(
            Path::new("/plugins/echo/plugin.yaml"),
            &format!("name: echo\nversion: 1.0.0\nexec: ./x\nisolation: {{filesystem: {spec}}}\n"),
        )
        .unwrap()
    }

    #[test]
    fn without_landlock_a_view_is_refused_unless_best_effort() {
        let host = Confinement {
            seccomp: Ok(()),
            pid_namespace: Ok(()),
            landlock: Err("no Landlock in this test".into()),
        };
        let strict = with_filesystem("read-only");
        match host.filesystem_for(&strict) {
            Err(PrepareError::Refused(why)) => {
                assert!(
                    why.starts_with("isolation.filesystem: the read-only view needs Landlock"),
                    "{why}"
                );
                assert!(why.contains("no Landlock in this test"), "{why}");
                assert!(why.contains("best_effort: true"), "{why}");
            }
            other => panic!("a view without Landlock must be refused: {other:?}"),
        }
        let lenient = with_filesystem("{best_effort: true}");
        assert!(host.filesystem_for(&lenient).unwrap().is_none());
        assert_eq!(
            host.filesystem_degraded(&lenient).as_deref(),
            Some("filesystem view read-only not applied (best_effort): no Landlock in this test")
        );
        assert!(
            host.describe(&lenient).contains(
                &"filesystem view read-only not applied: no Landlock in this test".into()
            )
        );
        // Nothing asked, nothing missing.
        let none = with_filesystem("host");
        assert!(host.filesystem_for(&none).unwrap().is_none());
        assert_eq!(host.filesystem_degraded(&none), None);
    }

    #[test]
    fn a_writable_path_that_does_not_exist_refuses_the_start() {
        let Ok(abi) = landlock::probe() else {
            eprintln!("skipped: no Landlock on this host");
            return;
        };
        let host = Confinement {
            seccomp: Ok(()),
            pid_namespace: Ok(()),
            landlock: Ok(abi),
        };
        let m = with_filesystem("{writable: [/no/such/dir/here]}");
        match host.filesystem_for(&m) {
            Err(PrepareError::Refused(why)) => assert!(
                why.starts_with("isolation.filesystem.writable: cannot open /no/such/dir/here"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        let ok = with_filesystem("read-only");
        assert_eq!(host.filesystem_for(&ok).unwrap().unwrap().abi(), abi);
        let described = host.describe(&ok);
        assert!(
            described.iter().any(|h| h.starts_with(&format!(
                "filesystem read-only (Landlock ABI {abi}), writable: its socket directory, its private tmp (TMPDIR)"
            ))),
            "{described:?}"
        );
    }
}
