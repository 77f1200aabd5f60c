//! Plugins that survive a crash of their supervisor (`survive_supervisor`),
//! and their re-adoption by the next one.
//!
//! - A survivor is forked without the parent-death signal. When the
//!   supervisor dies (SIGKILL, OOM kill, abort) it is reparented to init or
//!   the nearest subreaper, and keeps running in its own cgroup, whose
//!   limits hold without us.
//! - Its stdout and stderr are files (`O_APPEND`) in `<dir>/<instance>/`,
//!   never pipes: nothing it writes while no supervisor runs is lost, and it
//!   cannot die of SIGPIPE. The supervisor tails them from a persisted
//!   offset ([`tail`]), so the next one resumes where the last one stopped;
//!   what has been read is given back to the filesystem (holes punched) and
//!   unread output beyond `max_output` is dropped oldest first and counted.
//! - Once it is ready, a [`Record`] is written atomically (temp, rename) next
//!   to its output: pid, start time, boot id, cgroup, uid, what it runs and
//!   what it answered to Initialize.
//! - The next supervisor takes `<dir>/lock` (one supervisor per directory),
//!   spares the recorded cgroups and sockets from its stale-run cleanup,
//!   and each replica, before its first start, tries to re-adopt its
//!   record: a pidfd is opened first, then the process must have the
//!   recorded start time (`/proc/<pid>/stat` field 22), boot id and uid, be
//!   in the instance's own cgroup, and answer on the instance's socket with
//!   that pid as its peer (SO_PEERCRED, translated into our PID namespace,
//!   so a plugin in its own PID namespace is compared by its pid here). Only
//!   then is it adopted, without a second Initialize. Anything else drops
//!   the record: a process that failed the proof is never signalled; the
//!   cgroup (only ours can be in it) is killed and removed; the replica
//!   starts fresh.
//! - A survivor whose supervisor stays away longer than `max_unsupervised`
//!   is killed by the guard ([`crate::guard`]) the daemon leaves behind, or,
//!   if none ran, by the next supervisor instead of being adopted.
//! - A clean shutdown stops survivors like every other plugin: only a
//!   crash leaves them running.

use crate::instance::Instance;
use crate::logs::{LogBuffer, LogLine, MAX_LINE};
use crate::manifest::SurvivePolicy;
use crate::process::{Child, ExitStatus};
use plugvisor_proto::InitializeResponse;
use plugvisor_proto::handshake::{self, Handshake};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{oneshot, watch};

/// The survivors' directory below the state dir (or the runtime dir).
/// Plugin names cannot start with a dot, so it is never a plugin's.
pub const DIR_NAME: &str = ".survivors";
/// A survivor's record, in its instance directory.
pub const RECORD_FILE: &str = "record.json";
/// Held (flock) by the supervisor that owns the directory.
pub const LOCK_FILE: &str = "lock";
/// Touched every [`HEARTBEAT`] while a supervisor runs.
pub const HEARTBEAT_FILE: &str = "heartbeat";
/// How often the heartbeat is touched.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Records larger than this are corrupt (real ones are ~1 KiB).
pub const MAX_RECORD_BYTES: u64 = 64 << 10;
/// The record format this supervisor writes and reads.
pub const RECORD_FORMAT: u32 = 1;
/// How long a new supervisor waits for the directory's lock (a guard holds
/// it for a moment while it trims output or kills an expired survivor).
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// How often output is persisted (its offset) and given back (hole punch).
const PERSIST_EVERY: Duration = Duration::from_millis(200);
/// Longest sleep of an idle tail.
const TAIL_IDLE: Duration = Duration::from_millis(100);

/// What a survivor answered to Initialize: re-adoption publishes it again
/// instead of calling Initialize a second time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordedInfo {
    pub name: String,
    pub version: String,
    pub methods: Vec<String>,
    pub stream_methods: Vec<String>,
    pub state_version: u32,
    pub sessions: bool,
}

/// One surviving replica, as its supervisor left it. Paths (socket,
/// output, cgroup) are not stored: they follow from `instance`, so a
/// forged record cannot point anywhere else.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub format: u32,
    pub plugin: String,
    pub replica: usize,
    /// Which start of the replica it is: `<plugin>-<replica>-<start>`.
    pub start: u64,
    /// In the supervisor's PID namespace.
    pub pid: i32,
    /// `/proc/<pid>/stat` field 22, clock ticks after boot.
    pub start_time: u64,
    /// `/proc/sys/kernel/random/boot_id` when it started.
    pub boot_id: String,
    /// Its real uid.
    pub uid: u32,
    /// The manifest version and executable it runs.
    pub version: String,
    pub exec: PathBuf,
    pub info: RecordedInfo,
    pub restarts: u32,
    /// Its bounds, as they were when it started.
    pub max_unsupervised_ms: u64,
    pub max_output: u64,
    /// Its cgroup directories, for the guard ([`crate::guard`]) to kill
    /// what is left in them; a supervisor finds them by name instead.
    pub cgroup: Vec<PathBuf>,
    /// What it runs (its executable's digest and signer), shown again
    /// once it is adopted.
    #[serde(default)]
    pub identity: crate::signature::RunIdentity,
}

impl Record {
    /// `<plugin>-<replica>-<start>`: its instance id, cgroup name and the
    /// name of its socket and output directories.
    pub fn instance(&self) -> String {
        format!("{}-{}-{}", self.plugin, self.replica, self.start)
    }

    /// Parses and checks a record file's text.
    pub fn parse(text: &[u8]) -> Result<Record, String> {
        let r: Record = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        if r.format != RECORD_FORMAT {
            return Err(format!("record format {} is not {RECORD_FORMAT}", r.format));
        }
        crate::manifest::validate_name(&r.plugin)?;
        if r.pid <= 1 {
            return Err(format!("pid {} is not a plugin's", r.pid));
        }
        if r.boot_id.is_empty() || r.start_time == 0 {
            return Err("no start time or boot id".into());
        }
        Ok(r)
    }
}

/// Where a survivor's files are.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `<survivors>/<instance>/`.
    pub dir: PathBuf,
    /// Shared by the instance and its tails: what they have emitted, and
    /// whether a hand-over holds them (see [`TailGate`]).
    pub(crate) gate: Arc<TailGate>,
}

/// Between a survivor's tails and a hand-over: the offsets up to which the
/// tails have put lines into the log buffer, moved only under this lock;
/// frozen, the tails emit nothing more. A hand-over freezes them, saves
/// these offsets, then takes the log buffer: the new image reads on from
/// exactly the line after the last one carried (nothing twice, nothing
/// lost). A hand-over that does not happen thaws them.
#[derive(Debug, Default)]
pub(crate) struct TailGate {
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    frozen: bool,
    /// Per stream (stdout, stderr): the offset emitted up to.
    emitted: [Option<u64>; 2],
}

fn stream_index(stream: &str) -> usize {
    usize::from(stream != "stdout")
}

impl TailGate {
    /// Stops the tails of `paths` emitting and saves how far they got.
    pub(crate) fn freeze(&self, paths: &Paths) -> io::Result<()> {
        let mut state = lock(&self.state);
        state.frozen = true;
        for stream in ["stdout", "stderr"] {
            if let Some(offset) = state.emitted[stream_index(stream)] {
                write_atomic(&paths.offset(stream), offset.to_string().as_bytes())?;
            }
        }
        Ok(())
    }

    pub(crate) fn thaw(&self) {
        lock(&self.state).frozen = false;
    }
}

impl Paths {
    pub fn new(survivors: &Path, instance: &str) -> Paths {
        Paths {
            dir: survivors.join(instance),
            gate: Arc::default(),
        }
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join(RECORD_FILE)
    }
    pub fn output(&self, stream: &str) -> PathBuf {
        self.dir.join(stream)
    }
    /// How far the supervisor has read `stream`.
    pub fn offset(&self, stream: &str) -> PathBuf {
        self.dir.join(format!("{stream}.offset"))
    }
    /// Bytes of `stream` dropped unread (over `max_output`).
    pub fn dropped(&self, stream: &str) -> PathBuf {
        self.dir.join(format!("{stream}.dropped"))
    }
}

/// Writes `bytes` to `path` atomically: a temp file beside it, renamed
/// over it. A process crash leaves the old or the new file, never half.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Reads a small regular file, refusing one over `max` bytes, a symlink,
/// or anything else that is not a plain file (a FIFO would block).
pub fn read_small(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let mut bytes = Vec::new();
    f.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is over {max} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

/// A number kept in a small file (an offset, a count); 0 when absent.
pub fn read_number(path: &Path) -> u64 {
    read_small(path, 64)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// What procfs says of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcIdentity {
    pub start_time: u64,
    pub uid: u32,
}

/// Reads `<proc>/<pid>/stat` field 22 and the real uid.
pub fn proc_identity(proc_root: &Path, pid: i32) -> io::Result<ProcIdentity> {
    let base = proc_root.join(pid.to_string());
    let stat = String::from_utf8_lossy(&read_small(&base.join("stat"), 4096)?).into_owned();
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} in {}/stat", base.display()),
        )
    };
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so
    // fields are counted after the last `)`. Field 3 (state) is the first.
    let rest = &stat[stat.rfind(')').ok_or_else(|| bad("no `)`"))? + 1..];
    let start_time = rest
        .split_whitespace()
        .nth(22 - 3)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| bad("no field 22"))?;
    let status = String::from_utf8_lossy(&read_small(&base.join("status"), 64 << 10)?).into_owned();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| bad("no Uid"))?;
    Ok(ProcIdentity { start_time, uid })
}

/// This boot's id.
pub fn boot_id(proc_root: &Path) -> io::Result<String> {
    let path = proc_root.join("sys/kernel/random/boot_id");
    Ok(String::from_utf8_lossy(&read_small(&path, 128)?)
        .trim()
        .to_string())
}

/// Whether `pid` is listed in every one of the cgroup directories.
pub fn in_cgroup(dirs: &[PathBuf], pid: i32) -> bool {
    !dirs.is_empty()
        && dirs.iter().all(|dir| {
            std::fs::read_to_string(dir.join("cgroup.procs"))
                .is_ok_and(|procs| procs.lines().any(|l| l.trim().parse() == Ok(pid)))
        })
}

/// Opens a pidfd for `pid` (the process it names at this moment).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the process behind `pidfd` is still running.
pub fn alive(pidfd: &OwnedFd) -> bool {
    let mut fd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, not blocking.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n == 0
}

/// Sends `signal` through a pidfd: never to a process that reuses the pid.
pub fn pidfd_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a pidfd we own, a signal number, a null
    // siginfo and no flags; no memory of ours is touched.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// Proves, without touching it, that `record.pid` is the recorded survivor:
/// a pidfd first, then start time, boot id, uid and cgroup membership, and
/// the pidfd still alive afterwards (so procfs spoke of that very process).
/// The socket check comes after, in [`readopt`]. `Err` says why not.
pub fn prove(
    proc_root: &Path,
    record: &Record,
    cgroup_dirs: &[PathBuf],
) -> Result<OwnedFd, String> {
    let pidfd = pidfd_open(record.pid).map_err(|e| format!("pid {} is gone ({e})", record.pid))?;
    if !alive(&pidfd) {
        return Err(format!("pid {} is gone (it exited)", record.pid));
    }
    let boot = boot_id(proc_root).map_err(|e| format!("cannot read the boot id: {e}"))?;
    if boot != record.boot_id {
        return Err(format!(
            "it was recorded in another boot ({}; this is {boot})",
            record.boot_id
        ));
    }
    let id = proc_identity(proc_root, record.pid)
        .map_err(|e| format!("cannot read pid {}: {e}", record.pid))?;
    if id.start_time != record.start_time {
        return Err(format!(
            "pid {} started at tick {}, not at the recorded {}: another process has its pid",
            record.pid, id.start_time, record.start_time
        ));
    }
    if id.uid != record.uid {
        return Err(format!(
            "pid {} runs as uid {}, not the recorded {}",
            record.pid, id.uid, record.uid
        ));
    }
    if !in_cgroup(cgroup_dirs, record.pid) {
        return Err(format!(
            "pid {} is not in the plugin's cgroup {}",
            record.pid,
            cgroup_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !alive(&pidfd) {
        return Err(format!("pid {} exited while it was checked", record.pid));
    }
    Ok(pidfd)
}

/// The survivors of a supervisor: its directory (locked), the records the
/// last one left (claimed one by one by the replicas), and the default
/// policy. One per supervisor, in its `Host`.
pub struct Survivors {
    pub dir: PathBuf,
    pub proc_root: PathBuf,
    /// `survive_supervisor` for manifests that do not say.
    pub default: SurvivePolicy,
    /// The flock on `<dir>/lock`, held until the supervisor shuts down.
    lock: Mutex<Option<std::fs::File>>,
    /// Records not yet claimed, by plugin and replica.
    pending: Mutex<HashMap<(String, usize), Record>>,
    /// How long ago the previous supervisor last touched the heartbeat.
    pub unsupervised_for: Duration,
    /// Whether the heartbeat task runs.
    beating: std::sync::atomic::AtomicBool,
}

impl Survivors {
    /// Takes the directory's lock and reads the records an earlier run left.
    /// A corrupt, oversized or foreign record is dropped with a warning (its
    /// cgroup is then cleaned as stale: only our processes can be in it).
    pub fn open(dir: &Path, proc_root: &Path, default: SurvivePolicy) -> io::Result<Survivors> {
        crate::rundir::secure_dir(dir, 0o700).map_err(io::Error::other)?;
        let lock = take_lock(&dir.join(LOCK_FILE))?;
        let heartbeat = dir.join(HEARTBEAT_FILE);
        let unsupervised_for = std::fs::metadata(&heartbeat)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        let mut pending = HashMap::new();
        for entry in std::fs::read_dir(dir)?.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let paths = Paths::new(dir, &name);
            let record = read_small(&paths.record(), MAX_RECORD_BYTES)
                .map_err(|e| e.to_string())
                .and_then(|text| Record::parse(&text))
                .and_then(|r| match r.instance() == name {
                    true => Ok(r),
                    false => Err(format!("it describes {}, not {name}", r.instance())),
                });
            match record {
                Ok(r) => {
                    // Two of one replica: a crash in the middle of an
                    // upgrade. The newer start is the one calls went to
                    // last; the older one's cgroup is cleaned as stale.
                    let key = (r.plugin.clone(), r.replica);
                    let older = match pending.get(&key) {
                        Some(Record { start, .. }) if *start > r.start => Some(r),
                        _ => pending.insert(key, r),
                    };
                    if let Some(older) = older {
                        tracing::warn!(
                            "two survivors of replica {} of {}: keeping the newer, dropping {}",
                            older.replica,
                            older.plugin,
                            older.instance()
                        );
                        let _ = std::fs::remove_dir_all(Paths::new(dir, &older.instance()).dir);
                    }
                }
                Err(why) => {
                    if paths.record().exists() {
                        tracing::warn!(
                            "dropping the survivor record {}: {why}",
                            paths.record().display()
                        );
                    }
                    // Output nobody will read, of an instance nobody adopts.
                    let _ = std::fs::remove_dir_all(&paths.dir);
                }
            }
        }
        let survivors = Survivors {
            dir: dir.to_path_buf(),
            proc_root: proc_root.to_path_buf(),
            default,
            lock: Mutex::new(Some(lock)),
            pending: Mutex::new(pending),
            unsupervised_for,
            beating: Default::default(),
        };
        survivors.beat();
        Ok(survivors)
    }

    /// Lets another supervisor take the directory: this one has shut
    /// down and stopped every plugin.
    pub fn release(&self) {
        lock(&self.lock).take();
    }

    /// The instance names to spare from the stale-run cleanup (cgroups and
    /// socket directories).
    pub fn keep(&self) -> Vec<String> {
        lock(&self.pending).values().map(Record::instance).collect()
    }

    /// The record of `plugin`'s replica `replica`, if one is waiting.
    pub fn claim(&self, plugin: &str, replica: usize) -> Option<Record> {
        lock(&self.pending).remove(&(plugin.to_string(), replica))
    }

    /// Takes the records no replica of this supervisor will claim: those
    /// `wanted` says no to (their plugin is gone, or has fewer replicas).
    pub fn unwanted(&self, wanted: impl Fn(&str, usize) -> bool) -> Vec<Record> {
        let mut pending = lock(&self.pending);
        let gone: Vec<_> = pending
            .keys()
            .filter(|(plugin, replica)| !wanted(plugin, *replica))
            .cloned()
            .collect();
        gone.into_iter()
            .filter_map(|k| pending.remove(&k))
            .collect()
    }

    /// Touches the heartbeat: a supervisor runs.
    pub fn beat(&self) {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(HEARTBEAT_FILE))
            .and_then(|f| f.set_modified(SystemTime::now()));
    }

    pub fn paths(&self, instance: &str) -> Paths {
        Paths::new(&self.dir, instance)
    }
}

/// Starts (once) the task that touches the heartbeat every [`HEARTBEAT`]
/// while the supervisor runs: the next one learns from it how long its
/// survivors went unsupervised. Needs a runtime.
pub(crate) fn keep_beating(host: &Arc<crate::host::Host>) {
    if host
        .survivors
        .beating
        .swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        return;
    }
    let heart = host.clone();
    host.tasks.spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = heart.cancel.cancelled() => break,
                _ = tick.tick() => heart.survivors.beat(),
            }
        }
    });
}

/// Takes an exclusive flock on `path`, waiting up to [`LOCK_WAIT`] (a guard
/// may hold it for a moment).
pub fn take_lock(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || Instant::now() >= deadline {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot lock {}: {e}; another supervisor uses this state directory (two supervisors must not share one)",
                    path.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the map stays whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A survivor's part of an [`Instance`]: where its files are and its
/// bounds. Dropping it (the instance ended or was stopped) removes the
/// record at once, so a crash from then on adopts nothing; the tails
/// remove the output once they have read it all.
#[derive(Debug)]
pub struct Survival {
    pub paths: Paths,
    pub policy: SurvivePolicy,
}

impl Survival {
    /// Writes the record of a ready survivor.
    pub fn commit(&self, record: &Record) -> io::Result<()> {
        let text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        write_atomic(&self.paths.record(), &text)
    }
}

impl Drop for Survival {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.paths.record());
    }
}

/// Creates a new survivor's output files and returns them for its stdout
/// and stderr (`O_APPEND`, 0600, owned by the supervisor: the plugin only
/// ever holds the descriptors).
pub fn create_output(paths: &Paths) -> io::Result<(OwnedFd, OwnedFd)> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let _ = std::fs::remove_dir_all(&paths.dir);
    std::fs::DirBuilder::new().mode(0o700).create(&paths.dir)?;
    let open = |stream: &str| -> io::Result<OwnedFd> {
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(paths.output(stream))?;
        Ok(OwnedFd::from(f))
    };
    Ok((open("stdout")?, open("stderr")?))
}

/// What a tail hands its lines to.
#[derive(Clone)]
pub(crate) struct TailSink {
    pub plugin: String,
    pub instance: String,
    pub logs: Arc<LogBuffer>,
}

impl TailSink {
    fn line(&self, stream: &'static str, line: String) {
        self.logs.record(
            &self.plugin,
            LogLine {
                time: SystemTime::now(),
                instance: self.instance.clone(),
                stream,
                line,
            },
        );
    }
}

/// Follows one output file from its persisted offset until the child has
/// exited and everything is read. Lines go to the plugin's log buffer (so
/// `plugvisor logs` and the rate-limited re-emission see them); the first
/// handshake line of stdout goes to `handshake`. Every [`PERSIST_EVERY`]
/// the offset is saved (a crash repeats at most that much output, never
/// loses any) and the read part is given back to the filesystem; unread
/// output over `max_output` is dropped oldest first, with a line saying so.
pub(crate) async fn tail(
    paths: Paths,
    stream: &'static str,
    max_output: u64,
    sink: TailSink,
    mut handshake: Option<oneshot::Sender<Result<Handshake, String>>>,
    mut exit: watch::Receiver<Option<ExitStatus>>,
) {
    // Writable only to punch holes (fallocate needs it); never written.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(paths.output(stream))
    {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(plugin = %sink.plugin, instance = %sink.instance, "cannot read its {stream}: {e}");
            return;
        }
    };
    let mut offset = read_number(&paths.offset(stream));
    let mut saved = offset;
    // Dropped before this tail began (by the guard, while unsupervised).
    let earlier = read_number(&paths.dropped(stream));
    if earlier > 0 {
        sink.line(
            stream,
            format!("[plugvisor: {earlier} bytes of {stream} dropped unread so far: over survive_supervisor.max_output ({max_output} bytes)]"),
        );
    }
    let mut punched = 0u64;
    let mut pending: Vec<u8> = Vec::new();
    let mut idle = Duration::from_millis(1);
    let mut last_save = Instant::now();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let exited = exit.borrow_and_update().is_some();
        // Read and emit under the gate; frozen by a hand-over, wait.
        let n = {
            let mut gate = lock(&paths.gate.state);
            if gate.frozen {
                None
            } else {
                // Over the cap: skip to the newest `max_output / 2`.
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                let read_to = offset + pending.len() as u64;
                if size.saturating_sub(read_to) > max_output {
                    let skip_to = size - max_output / 2;
                    let dropped = skip_to - read_to;
                    // A flood before the handshake must not drop the handshake.
                    if let Some(tx) = handshake.take() {
                        match find_handshake(&file, offset, skip_to) {
                            Some(found) => {
                                let _ = tx.send(found);
                            }
                            None => handshake = Some(tx),
                        }
                    }
                    pending.clear();
                    offset = skip_to;
                    let total = read_number(&paths.dropped(stream)) + dropped;
                    let _ = write_atomic(&paths.dropped(stream), total.to_string().as_bytes());
                    sink.line(
                stream,
                format!("[plugvisor: {dropped} bytes of {stream} dropped unread: over survive_supervisor.max_output ({max_output} bytes)]"),
            );
                }
                let n = pread(&file, &mut chunk, offset + pending.len() as u64).unwrap_or(0);
                if n > 0 {
                    idle = Duration::from_millis(1);
                    pending.extend_from_slice(&chunk[..n]);
                    let mut start = 0;
                    while let Some(pos) = pending[start..]
                        .iter()
                        .take(MAX_LINE + 1)
                        .position(|b| *b == b'\n')
                        .map(|p| p + start)
                        .or_else(|| {
                            (pending.len() - start > MAX_LINE).then_some(start + MAX_LINE - 1)
                        })
                    {
                        let mut line = &pending[start..=pos];
                        if line.last() == Some(&b'\n') {
                            line = &line[..line.len() - 1];
                        }
                        if line.last() == Some(&b'\r') {
                            line = &line[..line.len() - 1];
                        }
                        let text = String::from_utf8_lossy(line).into_owned();
                        start = pos + 1;
                        if let Some(tx) = handshake.take() {
                            match Handshake::parse(&text) {
                                Ok(h) => {
                                    let _ = tx.send(Ok(h));
                                    continue;
                                }
                                Err(handshake::HandshakeError::Malformed(why)) => {
                                    let _ = tx.send(Err(why));
                                }
                                Err(handshake::HandshakeError::NotAHandshake) => {
                                    handshake = Some(tx)
                                }
                            }
                        }
                        sink.line(stream, text);
                    }
                    offset += start as u64;
                    pending.drain(..start);
                }
                gate.emitted[stream_index(stream)] = Some(offset);
                Some(n)
            }
        };
        let Some(n) = n else {
            tokio::time::sleep(TAIL_IDLE).await;
            continue;
        };
        if n > 0 {
            // A flood never idles: let other tasks run between chunks, and
            // save the offset on the way as well.
            tokio::task::yield_now().await;
            if last_save.elapsed() < PERSIST_EVERY {
                continue;
            }
        }
        if last_save.elapsed() >= PERSIST_EVERY || (exited && n == 0) {
            if offset != saved
                && write_atomic(&paths.offset(stream), offset.to_string().as_bytes()).is_ok()
            {
                saved = offset;
            }
            // Only what a crash would not read again is given back.
            let upto = saved & !4095;
            if upto > punched {
                punch_hole(&file, punched, upto - punched);
                punched = upto;
            }
            last_save = Instant::now();
        }
        if n > 0 {
            continue;
        }
        if exited {
            if !pending.is_empty() {
                sink.line(stream, String::from_utf8_lossy(&pending).into_owned());
            }
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(idle) => {}
            _ = exit.changed() => {}
        }
        idle = (idle * 2).min(TAIL_IDLE);
    }
    sink.logs.finish(&sink.plugin, &sink.instance);
    // The record goes first when the instance ends; without it nobody will
    // read this output again.
    if !paths.record().exists() {
        let _ = std::fs::remove_file(paths.output(stream));
        let _ = std::fs::remove_file(paths.offset(stream));
        let _ = std::fs::remove_file(paths.dropped(stream));
        let _ = std::fs::remove_dir(&paths.dir);
    }
}

/// The first handshake line (or malformed one) in `[from, to)` of `file`,
/// read in chunks: output about to be dropped unread is still searched for
/// it.
fn find_handshake(file: &std::fs::File, from: u64, to: u64) -> Option<Result<Handshake, String>> {
    let mut chunk = vec![0u8; 64 << 10];
    let mut line: Vec<u8> = Vec::new();
    let mut at = from;
    while at < to {
        let want = chunk.len().min((to - at) as usize);
        let n = pread(file, &mut chunk[..want], at)
            .ok()
            .filter(|n| *n > 0)?;
        at += n as u64;
        for &b in &chunk[..n] {
            if b != b'\n' {
                if line.len() < MAX_LINE {
                    line.push(b);
                }
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            match Handshake::parse(text.trim_end_matches('\r')) {
                Ok(h) => return Some(Ok(h)),
                Err(handshake::HandshakeError::Malformed(why)) => return Some(Err(why)),
                Err(handshake::HandshakeError::NotAHandshake) => line.clear(),
            }
        }
    }
    None
}

fn pread(file: &std::fs::File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, at)
}

/// Frees `len` bytes at `at` of `file` without changing its size or what
/// later offsets hold (`FALLOC_FL_PUNCH_HOLE`): a writer appending at the
/// same time loses nothing. Filesystems without it keep the bytes.
pub fn punch_hole(file: &std::fs::File, at: u64, len: u64) {
    // SAFETY: fallocate on a descriptor we own; the range is plain integers.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc < 0 {
        tracing::debug!(
            "cannot punch a hole in plugin output: {}",
            io::Error::last_os_error()
        );
    }
}

/// Starts the tails of a survivor's stdout and stderr, into `sink`.
pub(crate) fn start_tails(
    tasks: &tokio_util::task::TaskTracker,
    survival: &Survival,
    sink: TailSink,
    child: &Child,
    handshake: Option<oneshot::Sender<Result<Handshake, String>>>,
) {
    let mut handshake = handshake;
    for stream in ["stdout", "stderr"] {
        let hs = if stream == "stdout" {
            handshake.take()
        } else {
            None
        };
        tasks.spawn(tail(
            survival.paths.clone(),
            stream,
            survival.policy.max_output,
            sink.clone(),
            hs,
            child.exit_watch(),
        ));
    }
}

/// The record of `replica`'s survivor `instance`, which just became ready
/// running `manifest` and answered `info` to Initialize.
pub(crate) fn record_of(
    replica: &crate::replica::Replica,
    instance: &Instance,
    manifest: &crate::manifest::Manifest,
    info: &InitializeResponse,
    policy: SurvivePolicy,
) -> io::Result<Record> {
    let proc_root = &replica.host.survivors.proc_root;
    let pid = instance.child.pid();
    let id = proc_identity(proc_root, pid)?;
    let start = instance
        .id
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(Record {
        format: RECORD_FORMAT,
        plugin: replica.name().to_string(),
        replica: replica.index,
        start,
        pid,
        start_time: id.start_time,
        boot_id: boot_id(proc_root)?,
        uid: id.uid,
        version: manifest.version.to_string(),
        exec: manifest.exec.clone(),
        info: RecordedInfo {
            name: info.name.clone(),
            version: info.version.clone(),
            methods: info.methods.clone(),
            stream_methods: info.stream_methods.clone(),
            state_version: info.state_version,
            sessions: info.sessions,
        },
        restarts: replica.plugin.board.lock().replicas[replica.index].restarts,
        max_unsupervised_ms: policy.max_unsupervised.as_millis() as u64,
        max_output: policy.max_output,
        identity: instance.identity.clone(),
        cgroup: instance
            .cgroup
            .as_ref()
            .map(|c| c.cgroup().paths())
            .unwrap_or_default(),
    })
}

impl RecordedInfo {
    /// As Initialize answered it.
    pub fn response(&self) -> InitializeResponse {
        InitializeResponse {
            name: self.name.clone(),
            version: self.version.clone(),
            methods: self.methods.clone(),
            stream_methods: self.stream_methods.clone(),
            state_version: self.state_version,
            protocol_version: handshake::PROTOCOL_VERSION,
            sessions: self.sessions,
        }
    }
}

/// Why a record was not adopted, and whether its process was proven ours
/// (then it is killed through its pidfd; otherwise never signalled).
pub(crate) struct NotAdopted {
    pub why: String,
    pub proven: Option<OwnedFd>,
}

/// Re-adopts `record` as an instance of `replica`: proves its identity,
/// connects with the peer check, holds its cgroup and tails its output
/// from where the last supervisor stopped. No Initialize is sent.
pub(crate) async fn readopt(
    host: &crate::host::Host,
    survivors: &Survivors,
    record: &Record,
    policy: SurvivePolicy,
    plugin: &str,
    logs: &Arc<LogBuffer>,
) -> Result<Instance, NotAdopted> {
    let instance_id = record.instance();
    let no = |why: String| NotAdopted { why, proven: None };
    let crate::isolation::Enforcement::Cgroups(tree) = host.isolation.enforcement() else {
        return Err(no(
            "this supervisor runs without cgroups, so it cannot prove the survivor's identity"
                .into(),
        ));
    };
    let Some(cgroup) = tree.existing(&instance_id) else {
        return Err(no(format!("its cgroup {instance_id} is gone")));
    };
    let dirs = cgroup.paths();
    let proc_root = survivors.proc_root.clone();
    let r = record.clone();
    let pidfd = tokio::task::spawn_blocking(move || prove(&proc_root, &r, &dirs))
        .await
        .map_err(|e| no(format!("the identity check failed: {e}")))?
        .map_err(no)?;
    let limit = Duration::from_millis(record.max_unsupervised_ms);
    if survivors.unsupervised_for > limit {
        return Err(NotAdopted {
            why: format!(
                "it ran unsupervised for {}s, over its max_unsupervised of {}s",
                survivors.unsupervised_for.as_secs(),
                limit.as_secs()
            ),
            proven: Some(pidfd),
        });
    }
    if !policy.enabled {
        return Err(NotAdopted {
            why: "survive_supervisor is now off for it".into(),
            proven: Some(pidfd),
        });
    }
    let socket_dir = host.opts.runtime_dir.join("plugins").join(&instance_id);
    let socket = socket_dir.join("plugin.sock");
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        crate::transport::connect_plugin(&socket, record.pid),
    )
    .await;
    let channel = match connected {
        Ok(Ok(channel)) => channel,
        // Proven by procfs and cgroup, yet not answering as itself: it is
        // ours, but not usable.
        Ok(Err(e)) => {
            return Err(NotAdopted {
                why: format!("its socket {} does not answer as it: {e}", socket.display()),
                proven: Some(pidfd),
            });
        }
        Err(_) => {
            return Err(NotAdopted {
                why: format!("its socket {} did not answer within 5s", socket.display()),
                proven: Some(pidfd),
            });
        }
    };
    if !alive(&pidfd) {
        return Err(no(format!(
            "pid {} exited while it was adopted",
            record.pid
        )));
    }
    let child = Child::adopted(record.pid, pidfd, &host.io_tasks)
        .map_err(|e| no(format!("cannot watch its pidfd: {e}")))?;
    let paths = survivors.paths(&instance_id);
    let survival = Survival {
        paths: paths.clone(),
        policy,
    };
    let sink = TailSink {
        plugin: plugin.to_string(),
        instance: instance_id.clone(),
        logs: logs.clone(),
    };
    start_tails(&host.io_tasks, &survival, sink, &child, None);
    Ok(Instance {
        id: instance_id.clone(),
        client: crate::instance::Client::new(channel),
        child,
        socket_dir,
        spawned_at: Instant::now(),
        cgroup: Some(host.isolation.lease(&instance_id, cgroup, &host.io_tasks)),
        sessions: None,
        // Its output is in files, read by the tails started above.
        output: [None, None],
        survival: Some(survival),
        // Not removed by plugvisor: a survivor is a plain child.
        container: None,
        identity: record.identity.clone(),
    })
}

/// Before a replica's first start: re-adopts the survivor its previous
/// supervisor recorded, if there is one and it proves to be itself.
/// Returns the instance with what it answered to Initialize, and its start
/// number (the replica's next start continues from it). A survivor that
/// runs another version or executable than the manifest now names is
/// adopted only to be stopped gracefully (with a last snapshot), so the
/// fresh start that follows restores its state.
pub(crate) async fn claim(
    replica: &crate::replica::Replica,
    spec: &crate::replica::Spec,
) -> Option<(Instance, InitializeResponse, u64)> {
    use crate::status::{EventDetail, PluginState};
    let host = &replica.host;
    let record = host.survivors.claim(replica.name(), replica.index)?;
    let manifest = &spec.manifest;
    let policy = manifest
        .survive_supervisor
        .unwrap_or(host.survivors.default);
    let id = record.instance();
    let adopted = readopt(
        host,
        &host.survivors,
        &record,
        policy,
        replica.name(),
        &replica.plugin.logs,
    )
    .await;
    let mut instance = match adopted {
        Ok(instance) => instance,
        Err(NotAdopted { why, proven }) => {
            let what = match proven {
                Some(_) => "it is killed",
                None => "it is not touched",
            };
            replica.transition(
                PluginState::Starting,
                &id,
                format!("not re-adopting pid {} of the previous supervisor: {why}; {what}, and a fresh instance starts", record.pid),
            );
            discard(host, &host.survivors, &record, proven).await;
            return None;
        }
    };
    let info = record.info.response();
    replica.update(|r| {
        r.instance = id.clone();
        r.pid = Some(record.pid);
        r.restarts = record.restarts;
    });
    replica.event(
        PluginState::Initializing,
        &id,
        format!(
            "re-adopted pid {}, which survived the previous supervisor (unsupervised for {}s); not initialized again",
            record.pid,
            host.survivors.unsupervised_for.as_secs()
        ),
        EventDetail {
            pid: Some(record.pid),
            ..EventDetail::default()
        },
    );
    if record.version != manifest.version.to_string() || record.exec != manifest.exec {
        let why = format!(
            "it runs {} {}, but the manifest now names {} {}",
            record.exec.display(),
            record.version,
            manifest.exec.display(),
            manifest.version
        );
        replica
            .stop_instance(manifest, &mut instance, &why, true, true)
            .await;
        return None;
    }
    if info.sessions {
        replica.open_sessions(&mut instance).await;
    }
    Some((instance, info, record.start))
}

/// Writes the record of a survivor that became ready (a failure leaves it
/// running, but a crash of the supervisor would then lose it: said loudly).
pub(crate) fn commit_ready(
    replica: &crate::replica::Replica,
    instance: &Instance,
    manifest: &crate::manifest::Manifest,
    info: &InitializeResponse,
) {
    let Some(survival) = &instance.survival else {
        return;
    };
    let written = record_of(replica, instance, manifest, info, survival.policy)
        .and_then(|record| survival.commit(&record));
    if let Err(e) = written {
        tracing::error!(
            plugin = %replica.name(),
            instance = %instance.id,
            "cannot record the survivor in {}: {e}; it will not be re-adopted after a crash of the supervisor",
            survival.paths.dir.display()
        );
    }
}

/// Kills (once proven) the survivors no plugin of this supervisor claims.
pub(crate) async fn release(
    host: &crate::host::Host,
    wanted: impl Fn(&str, usize) -> bool,
) -> usize {
    let records = host.survivors.unwanted(wanted);
    for record in &records {
        let id = record.instance();
        let dirs = match host.isolation.enforcement() {
            crate::isolation::Enforcement::Cgroups(tree) => {
                tree.existing(&id).map(|c| c.paths()).unwrap_or_default()
            }
            crate::isolation::Enforcement::RlimitsOnly { .. } => Vec::new(),
        };
        let proc_root = host.survivors.proc_root.clone();
        let r = record.clone();
        let proven = tokio::task::spawn_blocking(move || prove(&proc_root, &r, &dirs))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let what = match &proven {
            Ok(_) => "killing it".to_string(),
            Err(why) => format!("not touching pid {}: {why}", record.pid),
        };
        tracing::warn!(
            plugin = %record.plugin,
            instance = %id,
            "a survivor of the previous supervisor is not wanted by this one (no such plugin or replica); {what}"
        );
        discard(host, &host.survivors, record, proven.ok()).await;
    }
    records.len()
}

/// Disposes of a record that was not adopted: a proven survivor is
/// SIGKILLed through its pidfd; its cgroup (only ours can be in it) is
/// killed and removed; its socket directory, record and output go.
pub(crate) async fn discard(
    host: &crate::host::Host,
    survivors: &Survivors,
    record: &Record,
    proven: Option<OwnedFd>,
) {
    let instance_id = record.instance();
    if let Some(pidfd) = &proven {
        let _ = pidfd_signal(pidfd, libc::SIGKILL);
    }
    if let crate::isolation::Enforcement::Cgroups(tree) = host.isolation.enforcement()
        && let Some(cgroup) = tree.existing(&instance_id)
    {
        crate::isolation::dispose(&instance_id, cgroup).await;
    }
    let _ = std::fs::remove_dir_all(host.opts.runtime_dir.join("plugins").join(&instance_id));
    let _ = std::fs::remove_dir_all(survivors.paths(&instance_id).dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: i32, start_time: u64, boot_id: &str, uid: u32) -> Record {
        Record {
            format: RECORD_FORMAT,
            plugin: "tp".into(),
            replica: 0,
            start: 3,
            pid,
            start_time,
            boot_id: boot_id.into(),
            uid,
            version: "1.0.0".into(),
            exec: "/bin/true".into(),
            info: RecordedInfo {
                name: "tp".into(),
                version: "1.0.0".into(),
                methods: vec!["echo".into()],
                stream_methods: vec![],
                state_version: 0,
                sessions: false,
            },
            restarts: 0,
            max_unsupervised_ms: 600_000,
            max_output: DEFAULT_MAX_OUTPUT_FOR_TESTS,
            cgroup: vec![],
            identity: Default::default(),
        }
    }

    const DEFAULT_MAX_OUTPUT_FOR_TESTS: u64 = 1 << 20;

    fn write_record(dir: &Path, name: &str, bytes: &[u8]) {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join(RECORD_FILE), bytes).unwrap();
    }

    #[test]
    fn corrupt_huge_and_misplaced_records_are_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let good = record(4242, 7, "boot", 0);
        std::fs::create_dir_all(&dir).unwrap();
        write_record(&dir, "tp-0-3", &serde_json::to_vec(&good).unwrap());
        write_record(&dir, "tp-1-1", b"{ not json");
        write_record(&dir, "tp-2-1", &vec![b' '; MAX_RECORD_BYTES as usize + 10]);
        // A record that names another instance than its directory.
        write_record(&dir, "tp-3-1", &serde_json::to_vec(&good).unwrap());
        // A FIFO where the record should be (reading it would block), and a
        // symlink to a good one elsewhere.
        std::fs::create_dir_all(dir.join("tp-5-3")).unwrap();
        nix::unistd::mkfifo(
            &dir.join("tp-5-3").join(RECORD_FILE),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let mut linked = good.clone();
        linked.replica = 6;
        std::fs::write(
            tmp.path().join("elsewhere.json"),
            serde_json::to_vec(&linked).unwrap(),
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("tp-6-3")).unwrap();
        std::os::unix::fs::symlink(
            tmp.path().join("elsewhere.json"),
            dir.join("tp-6-3").join(RECORD_FILE),
        )
        .unwrap();
        let mut pid1 = good.clone();
        pid1.replica = 4;
        pid1.pid = 1;
        write_record(&dir, "tp-4-3", &serde_json::to_vec(&pid1).unwrap());
        let s = Survivors::open(&dir, Path::new("/proc"), SurvivePolicy::OFF).unwrap();
        assert_eq!(s.keep(), vec!["tp-0-3".to_string()]);
        for gone in ["tp-1-1", "tp-2-1", "tp-3-1", "tp-4-3", "tp-5-3", "tp-6-3"] {
            assert!(!dir.join(gone).exists(), "{gone} stays");
        }
        assert_eq!(s.claim("tp", 0), Some(good));
        assert_eq!(s.claim("tp", 0), None);
    }

    #[test]
    fn of_two_records_of_one_replica_the_newer_start_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        std::fs::create_dir_all(&dir).unwrap();
        let older = record(4242, 7, "boot", 0);
        let mut newer = older.clone();
        newer.start = 4;
        newer.pid = 4343;
        // Either order of the directory listing.
        write_record(&dir, "tp-0-4", &serde_json::to_vec(&newer).unwrap());
        write_record(&dir, "tp-0-3", &serde_json::to_vec(&older).unwrap());
        let s = Survivors::open(&dir, Path::new("/proc"), SurvivePolicy::OFF).unwrap();
        assert_eq!(s.keep(), vec!["tp-0-4".to_string()]);
        assert!(!dir.join("tp-0-3").exists());
        assert_eq!(s.claim("tp", 0), Some(newer));
    }

    #[test]
    fn a_second_supervisor_cannot_take_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let first = Survivors::open(&dir, Path::new("/proc"), SurvivePolicy::OFF).unwrap();
        let err = Survivors::open(&dir, Path::new("/proc"), SurvivePolicy::OFF)
            .err()
            .expect("the second open fails");
        assert!(err.to_string().contains("another supervisor"), "{err}");
        drop(first);
        Survivors::open(&dir, Path::new("/proc"), SurvivePolicy::OFF).unwrap();
    }

    #[test]
    fn identity_is_proven_by_start_time_boot_uid_and_cgroup() {
        let proc_root = Path::new("/proc");
        let mut sleeper = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pid = sleeper.id() as i32;
        let id = proc_identity(proc_root, pid).unwrap();
        let boot = boot_id(proc_root).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let member = tmp.path().join("member");
        let other = tmp.path().join("other");
        std::fs::create_dir_all(&member).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(member.join("cgroup.procs"), format!("1\n{pid}\n")).unwrap();
        std::fs::write(other.join("cgroup.procs"), "1\n2\n").unwrap();

        let right = record(pid, id.start_time, &boot, id.uid);
        assert!(prove(proc_root, &right, std::slice::from_ref(&member)).is_ok());
        let e = prove(
            proc_root,
            &record(pid, id.start_time + 1, &boot, id.uid),
            std::slice::from_ref(&member),
        )
        .unwrap_err();
        assert!(e.contains("another process has its pid"), "{e}");
        let e = prove(
            proc_root,
            &record(pid, id.start_time, "other-boot", id.uid),
            std::slice::from_ref(&member),
        )
        .unwrap_err();
        assert!(e.contains("another boot"), "{e}");
        let e = prove(
            proc_root,
            &record(pid, id.start_time, &boot, id.uid + 1),
            std::slice::from_ref(&member),
        )
        .unwrap_err();
        assert!(e.contains("uid"), "{e}");
        let e = prove(proc_root, &right, &[other]).unwrap_err();
        assert!(e.contains("not in the plugin's cgroup"), "{e}");
        let e = prove(proc_root, &right, &[]).unwrap_err();
        assert!(e.contains("not in the plugin's cgroup"), "{e}");
        // Nothing was sent to it.
        assert!(sleeper.try_wait().unwrap().is_none());
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        let e = prove(proc_root, &right, &[member]).unwrap_err();
        assert!(e.contains("is gone"), "{e}");
    }

    fn sink(logs: &Arc<LogBuffer>) -> TailSink {
        TailSink {
            plugin: "tp".into(),
            instance: "tp-0-3".into(),
            logs: logs.clone(),
        }
    }

    fn lines(logs: &LogBuffer) -> Vec<String> {
        logs.tail(usize::MAX).into_iter().map(|l| l.line).collect()
    }

    #[tokio::test]
    async fn a_tail_resumes_where_the_last_one_stopped() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = Paths::new(tmp.path(), "tp-0-3");
        let (out, _err) = create_output(&paths).unwrap();
        let mut out = std::fs::File::from(out);
        writeln!(out, "one\ntwo").unwrap();
        // A record keeps the files after the tail ends.
        std::fs::write(paths.record(), b"{}").unwrap();
        let (tx, rx) = watch::channel(None);
        let logs = Arc::new(LogBuffer::new(100));
        let first = tokio::spawn(tail(
            paths.clone(),
            "stdout",
            1 << 20,
            sink(&logs),
            None,
            rx,
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines(&logs).len() < 2 {
            assert!(Instant::now() < deadline, "{:?}", lines(&logs));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // As if the supervisor ended here (its offset saved on the way out).
        tx.send_replace(Some(ExitStatus::Unknown));
        first.await.unwrap();
        assert_eq!(read_number(&paths.offset("stdout")), 8);
        // Written while nobody read, the last line unfinished.
        write!(out, "three\nfour").unwrap();
        let logs = Arc::new(LogBuffer::new(100));
        let (_tx, rx) = watch::channel(Some(ExitStatus::Unknown));
        tail(paths.clone(), "stdout", 1 << 20, sink(&logs), None, rx).await;
        assert_eq!(lines(&logs), ["three", "four"]);
        // Without a record, the output goes with the tail.
        std::fs::remove_file(paths.record()).unwrap();
        let (_tx, rx) = watch::channel(Some(ExitStatus::Unknown));
        tail(
            paths.clone(),
            "stdout",
            1 << 20,
            sink(&Arc::new(LogBuffer::new(10))),
            None,
            rx,
        )
        .await;
        assert!(!paths.output("stdout").exists());
    }

    #[tokio::test]
    async fn unread_output_over_the_cap_is_dropped_oldest_first_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = Paths::new(tmp.path(), "tp-0-3");
        let (out, _err) = create_output(&paths).unwrap();
        std::fs::write(paths.record(), b"{}").unwrap();
        let mut out = std::io::BufWriter::new(std::fs::File::from(out));
        for i in 0..20_000 {
            writeln!(
                out,
                "flood line {i:09} the quick brown fox jumps over the lazy dog"
            )
            .unwrap();
        }
        drop(out);
        let size = std::fs::metadata(paths.output("stdout")).unwrap().len();
        let cap = MIN_CAP;
        let logs = Arc::new(LogBuffer::new(100_000));
        let (_tx, rx) = watch::channel(Some(ExitStatus::Unknown));
        tail(paths.clone(), "stdout", cap, sink(&logs), None, rx).await;
        let seen = lines(&logs);
        assert!(seen[0].contains("dropped unread"), "{}", seen[0]);
        let dropped = read_number(&paths.dropped("stdout"));
        assert!(
            dropped >= size - cap && dropped < size,
            "{dropped} of {size}"
        );
        assert_eq!(
            seen.last().unwrap(),
            &format!(
                "flood line {:09} the quick brown fox jumps over the lazy dog",
                19_999
            )
        );
        // What was kept is at most the cap.
        let kept: usize = seen[1..].iter().map(|l| l.len() + 1).sum();
        assert!(kept as u64 <= cap, "{kept}");
        // The read part is given back to the filesystem.
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(paths.output("stdout")).unwrap().blocks() * 512;
        assert!(
            blocks < size / 2,
            "{blocks} bytes still allocated of {size}"
        );
    }

    #[tokio::test]
    async fn a_handshake_buried_in_a_flood_is_still_found() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = Paths::new(tmp.path(), "tp-0-3");
        let (out, _err) = create_output(&paths).unwrap();
        let mut out = std::io::BufWriter::new(std::fs::File::from(out));
        for i in 0..5_000 {
            writeln!(
                out,
                "before {i:09} the quick brown fox jumps over the lazy dog"
            )
            .unwrap();
        }
        writeln!(out, "plugvisor|1|unix|/run/x.sock").unwrap();
        for i in 0..20_000 {
            writeln!(
                out,
                "after {i:09} the quick brown fox jumps over the lazy dog"
            )
            .unwrap();
        }
        drop(out);
        let (tx, rx) = oneshot::channel();
        let (_exit, exit) = watch::channel(Some(ExitStatus::Unknown));
        let logs = Arc::new(LogBuffer::new(10));
        tail(paths, "stdout", MIN_CAP, sink(&logs), Some(tx), exit).await;
        let found = rx.await.expect("the handshake was reported").unwrap();
        assert_eq!(found.address, "/run/x.sock");
    }

    const MIN_CAP: u64 = crate::manifest::SurvivePolicy::ON.max_output / 1024;
}
