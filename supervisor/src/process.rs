//! Child processes: spawning with the hygiene a supervisor owes its children,
//! reaping them, and signalling them without ever hitting a reused PID.
//!
//! - Every child is forked from one long-lived *process thread*, which is
//!   also the one reaper. The parent-death signal (`PR_SET_PDEATHSIG`) fires
//!   when the thread that forked exits, not the process, so forking from a
//!   short-lived thread would kill children at random. Forking and reaping
//!   on the same thread means a PID is never reaped while its spawn is
//!   still waiting for its exec to succeed or fail. Children are cloned
//!   without copying the supervisor's memory (see [`crate::vfork`]).
//! - Each child gets a pidfd right after fork. The thread sleeps in `poll`
//!   on the pidfds of its children (and an eventfd for new work), so no
//!   blocking wait ever runs on a runtime worker and no task per child is
//!   needed. Tracked children are waited for one by one
//!   (`waitid(P_PIDFD)`), so a host application's own children are never
//!   reaped by us. Signals to one child go through `pidfd_send_signal`.
//! - A child starts a new session, so it leads its own process group, whose
//!   ID is its PID. The group is signalled with `kill(-pid)`, which is only
//!   safe while that PID cannot name anyone else: while the child is alive
//!   or an unreaped zombie. So when a child exits, the reaper first sees the
//!   exit without reaping (`WNOWAIT`), SIGKILLs what is left of its group
//!   while the zombie pins the PID, and only then reaps it and publishes the
//!   status. [`Child::signal_group`] takes the same per-child lock and sends
//!   nothing once the child is reaped: no group signal is ever sent after
//!   the leader's PID was released.
//! - In daemon mode the supervisor is a child subreaper
//!   ([`ProcessManager::adopt_orphans`]): orphaned grandchildren are
//!   reparented to it, and the reaper also collects every exited child it
//!   does not track (`waitid(P_ALL, WNOHANG | WNOWAIT)`, then that PID) — in
//!   the style of containerd's shim reaper. Only a process that owns all of
//!   its children may do that; an embedded supervisor never does.

use crate::isolation::preexec::{ChildSetup, ExecArgs, ExecFd, PreExec};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch};

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called exit with this code.
    Exited(i32),
    /// A signal ended it.
    Signaled { signal: i32, core_dumped: bool },
    /// It ended while not our child (a re-adopted survivor of an earlier
    /// supervisor): its pidfd says it is gone, but only its parent could
    /// learn how.
    Unknown,
}

impl ExitStatus {
    /// From what `waitid` reported for an exited child.
    fn from_siginfo(info: &libc::siginfo_t) -> ExitStatus {
        // SAFETY: `si_status` reads the union member waitid fills for
        // CLD_* codes, which are the only ones WEXITED reports.
        let status = unsafe { info.si_status() };
        match info.si_code {
            libc::CLD_EXITED => ExitStatus::Exited(status),
            code => ExitStatus::Signaled {
                signal: status,
                core_dumped: code == libc::CLD_DUMPED,
            },
        }
    }

    /// What is reported when the real status is lost (the runtime or the
    /// reaper went away, or someone else in the process reaped the child).
    const LOST: ExitStatus = ExitStatus::Signaled {
        signal: libc::SIGKILL,
        core_dumped: false,
    };

    /// Exit code 0.
    pub fn success(&self) -> bool {
        *self == ExitStatus::Exited(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exited with code {code}"),
            ExitStatus::Signaled {
                signal,
                core_dumped,
            } => {
                let name = signal_name(*signal);
                write!(f, "killed by {name}")?;
                if *core_dumped {
                    write!(f, " (core dumped)")?;
                }
                Ok(())
            }
            ExitStatus::Unknown => write!(f, "exited (status unknown: not our child)"),
        }
    }
}

/// `SIGKILL` for 9, and so on; `signal N` for the unnamed.
pub fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The complete environment: nothing of the supervisor's is inherited.
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
}

/// What the reaper and a child's owner share: the child's PID and whether it
/// has been reaped, under one lock, so that a group signal and the reap never
/// interleave.
#[derive(Debug)]
struct Leader {
    pid: i32,
    /// `true` once reaped: from then on the PID, and so the group ID, may name
    /// another process. Held while the owner signals the group, and while the
    /// reaper kills the leftover group and reaps.
    reaped: Mutex<bool>,
    /// What was done to the group, in order, for tests to check.
    #[cfg(test)]
    log: Mutex<Vec<GroupEvent>>,
}

/// A step in a leader's end, as recorded for tests.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupEvent {
    /// `kill(-pid)` was sent.
    Signaled(i32),
    /// A group signal was asked for after the reap, and not sent.
    Refused(i32),
    /// The leader was reaped: its PID is free.
    Reaped,
}

impl Leader {
    fn new(pid: i32) -> Leader {
        Leader {
            pid,
            reaped: Mutex::new(false),
            #[cfg(test)]
            log: Mutex::default(),
        }
    }

    #[cfg(test)]
    fn record(&self, event: GroupEvent) {
        lock(&self.log).push(event);
    }

    #[cfg(not(test))]
    fn record(&self, _event: GroupEvent) {}

    /// Signals the group unless the leader was reaped; `Ok(false)` when not
    /// sent.
    fn signal_group(&self, signal: i32) -> io::Result<bool> {
        let reaped = lock(&self.reaped);
        if *reaped {
            self.record(GroupEvent::Refused(signal));
            return Ok(false);
        }
        self.record(GroupEvent::Signaled(signal));
        kill_group(self.pid, signal)?;
        Ok(true)
    }
}

/// `kill(-pid, signal)`. ESRCH (an empty group) is not an error.
///
/// Callers guarantee that `pid` is a child of ours that has not been reaped
/// (alive or a zombie): that pins the PID, so `-pid` names that child's own
/// group — it leads one as a session leader, which cannot change group.
fn kill_group(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory
    // is passed.
    let rc = unsafe { libc::kill(-pid, signal) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err);
        }
    }
    Ok(())
}

/// A running (or exited) child.
#[derive(Debug)]
pub struct Child {
    leader: Arc<Leader>,
    pidfd: Arc<OwnedFd>,
    /// `Some` once the child has exited, its leftover group was killed, and
    /// it was reaped.
    exit: watch::Receiver<Option<ExitStatus>>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

impl Child {
    pub fn pid(&self) -> i32 {
        self.leader.pid
    }

    /// The child's pidfd (handed to the next image at a hand-over).
    pub fn pidfd(&self) -> &Arc<OwnedFd> {
        &self.pidfd
    }

    /// A receiver that turns `Some` when the child has exited and was reaped.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.exit.clone()
    }

    /// The exit status, if it has exited (and was reaped).
    pub fn try_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits for the child to exit. By the time this returns, what was left
    /// of its process group has been sent SIGKILL.
    pub async fn wait(&self) -> ExitStatus {
        wait_exit(self.exit.clone()).await
    }

    /// Sends `signal` to the child through its pidfd: never to a process that
    /// merely reuses its PID. ESRCH (already exited) is not an error.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        pidfd_send_signal(&self.pidfd, signal)
    }

    /// Sends `signal` to the child's whole process group (it leads one, having
    /// started a new session), so grandchildren that stayed in the group get
    /// it too. Sent only while the child is unreaped — alive, or a zombie
    /// that pins its PID — so `-pid` cannot name another process's group.
    /// Once the child is reaped nothing is sent and `Ok(false)` is returned:
    /// the reaper SIGKILLed the leftover group just before reaping, and
    /// members that left the group are the cgroup's to kill.
    pub fn signal_group(&self, signal: i32) -> io::Result<bool> {
        self.leader.signal_group(signal)
    }
}

impl Child {
    /// A survivor of an earlier supervisor, proven to be the recorded
    /// plugin (see [`crate::adopt`]) and held by `pidfd`. It is not our
    /// child: nothing can wait for it, so a task watches the pidfd and
    /// reports [`ExitStatus::Unknown`] when it ends. Its process group is
    /// never signalled by number (its PID is not pinned by us): signals go
    /// through the pidfd, and the rest of it is its cgroup's to kill.
    pub fn adopted(
        pid: i32,
        pidfd: OwnedFd,
        tasks: &tokio_util::task::TaskTracker,
    ) -> io::Result<Child> {
        let watched = pidfd.try_clone()?;
        // SAFETY: `watched` is an OwnedFd the AsyncFd owns for its whole
        // life, so the descriptor stays open and names the same pidfd.
        let watched = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(watched, tokio::io::Interest::READABLE)
        }
        .map_err(|e| io::Error::other(e.to_string()))?;
        let leader = Leader::new(pid);
        // As if reaped: `signal_group` refuses, since `-pid` is not pinned.
        *lock(&leader.reaped) = true;
        let (tx, exit) = watch::channel(None);
        tasks.spawn(async move {
            // A pidfd turns readable when its process exits.
            tokio::select! {
                _ = watched.readable() => {}
                _ = tx.closed() => return,
            }
            tx.send_replace(Some(ExitStatus::Unknown));
        });
        Ok(Child {
            leader: Arc::new(leader),
            pidfd: Arc::new(pidfd),
            exit,
            stdout: None,
            stderr: None,
        })
    }
}

impl Drop for Child {
    /// A child nobody holds is a child nobody supervises: kill it and its
    /// process group. If it has already been reaped, its leftover group was
    /// killed then, and nothing is sent now.
    fn drop(&mut self) {
        let _ = self.signal_group(libc::SIGKILL);
        if self.try_status().is_none() {
            let _ = self.signal(libc::SIGKILL);
        }
    }
}

/// Waits until a child's exit watch turns `Some`.
pub async fn wait_exit(mut exit: watch::Receiver<Option<ExitStatus>>) -> ExitStatus {
    loop {
        if let Some(status) = *exit.borrow_and_update() {
            return status;
        }
        if exit.changed().await.is_err() {
            // The reaper is gone without a status (the process is exiting).
            return exit.borrow().unwrap_or(ExitStatus::LOST);
        }
    }
}

/// What the process thread hands back for a spawn.
struct Spawned {
    /// The read ends of its output pipes (`None` for a tracked inherited
    /// child, or a survivor writing to files).
    output: Option<(Option<OwnedFd>, Option<OwnedFd>)>,
    pidfd: Arc<OwnedFd>,
    leader: Arc<Leader>,
    exit: watch::Receiver<Option<ExitStatus>>,
}

/// What the process thread is asked to do.
enum Job {
    Spawn(SpawnJob),
    /// Track a child inherited across a hand-over (see [`crate::handover`]).
    Track(TrackJob),
    /// Replace this process's image (see [`ProcessManager::exec`]).
    Exec(ExecJob),
}

struct TrackJob {
    pid: i32,
    pidfd: OwnedFd,
    reply: oneshot::Sender<io::Result<Spawned>>,
}

/// An `execve` of a new supervisor image, performed by the process thread:
/// the thread whose children the plugins are. The kernel kills every other
/// thread at exec, and a child's parent-death signal fires when the thread
/// that forked it exits; the exec'ing thread does not exit, so no plugin
/// gets the signal, and its children stay its (now the new image's main
/// thread's) children.
pub struct ExecRequest {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    /// Descriptors the new image inherits: their close-on-exec flag is
    /// cleared just before the exec (and set again if it fails). Every other
    /// descriptor stays close-on-exec.
    pub keep_fds: Vec<i32>,
    /// The PIDs of the children the new image is told about. The exec is
    /// refused if the thread tracks any other set (a child spawned or reaped
    /// after the state was taken), so none goes unsupervised.
    pub expected: Vec<i32>,
}

struct ExecJob {
    request: ExecRequest,
    reply: oneshot::Sender<io::Error>,
}

struct SpawnJob {
    command: Box<crate::vfork::Launch>,
    /// Fork it as PID 1 of a new PID namespace (see `isolation::pidns`).
    new_pid_ns: bool,
    reply: oneshot::Sender<io::Result<Spawned>>,
}

/// How long the reaper sleeps between looks for orphans when it adopts
/// them and nobody calls [`ProcessManager::reap_orphans`]: a safety net for
/// a missed SIGCHLD, not the normal path.
const ORPHAN_POLL_MS: libc::c_int = 1000;

/// Spawns children from one long-lived thread, which also reaps them.
pub struct ProcessManager {
    /// `None` only while dropping: the thread then finds the channel closed.
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    /// An eventfd the thread polls with its children's pidfds: written to
    /// hand it work.
    wake: Arc<OwnedFd>,
    /// Reap every exited child, tracked or not (daemon mode).
    adopt: Arc<AtomicBool>,
    /// Untracked children reaped so far.
    orphans: Arc<AtomicUsize>,
}

impl ProcessManager {
    /// Starts the process thread. It runs until the manager is dropped and
    /// every child it spawned has been reaped. (`_tasks` is no longer used:
    /// no task is spawned per child.)
    pub fn new() -> io::Result<ProcessManager> {
        let (manager, thread) = Self::detached()?;
        std::thread::Builder::new()
            .name("plugvisor-procs".into())
            .spawn(move || thread.run())?;
        Ok(manager)
    }

    /// The manager and its process thread, which the caller runs on a
    /// thread of its choice with [`ProcessThread::run`]. The daemon runs it
    /// on its main thread, so that every plugin is a child of the main
    /// thread before and after a hand-over's exec (which that thread
    /// performs).
    pub fn detached() -> io::Result<(ProcessManager, ProcessThread)> {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        // SAFETY: eventfd takes an initial value and flags and returns a new
        // descriptor, which nobody else owns.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just returned by eventfd, owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(wake) });
        let adopt = Arc::new(AtomicBool::new(false));
        let orphans = Arc::new(AtomicUsize::new(0));
        let reaper = Reaper {
            jobs: rx,
            wake: wake.clone(),
            adopt: adopt.clone(),
            orphans: orphans.clone(),
            children: HashMap::new(),
            pid_ns: None,
        };
        Ok((
            ProcessManager {
                jobs: Some(jobs),
                wake,
                adopt,
                orphans,
            },
            ProcessThread(reaper),
        ))
    }

    fn send(&self, job: Job) -> io::Result<()> {
        let stopped = || io::Error::other("the process thread has stopped");
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())?;
        wake(&self.wake);
        Ok(())
    }

    /// Tracks a child this process inherited across an exec (its PID and
    /// pidfd), with its output pipes: the reaper reaps it like one it
    /// spawned. It must be a child of the thread running the process thread.
    pub async fn track(
        &self,
        pid: i32,
        pidfd: OwnedFd,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
    ) -> io::Result<Child> {
        let (reply, result) = oneshot::channel();
        self.send(Job::Track(TrackJob { pid, pidfd, reply }))?;
        let Spawned {
            pidfd,
            leader,
            exit,
            ..
        } = result
            .await
            .map_err(|_| io::Error::other("the process thread has stopped"))??;
        let mut child = Child {
            leader,
            pidfd,
            exit,
            stdout: None,
            stderr: None,
        };
        child.stdout = stdout.map(pipe::Receiver::from_owned_fd).transpose()?;
        child.stderr = stderr.map(pipe::Receiver::from_owned_fd).transpose()?;
        Ok(child)
    }

    /// Replaces this process's image by `request.program`, from the process
    /// thread, keeping every child. Returns only on failure (nothing
    /// changed then: the children are still tracked, and the kept
    /// descriptors are close-on-exec again).
    pub async fn exec(&self, request: ExecRequest) -> io::Error {
        let (reply, result) = oneshot::channel();
        if let Err(e) = self.send(Job::Exec(ExecJob { request, reply })) {
            return e;
        }
        result
            .await
            .unwrap_or_else(|_| io::Error::other("the process thread has stopped"))
    }

    /// Another handle on the same process thread, for work that must spawn
    /// a child after its owner has gone (removing a container when its
    /// instance is dropped). The thread lives while any handle does.
    pub fn handle(&self) -> ProcessManager {
        ProcessManager {
            jobs: self.jobs.clone(),
            wake: self.wake.clone(),
            adopt: self.adopt.clone(),
            orphans: self.orphans.clone(),
        }
    }

    /// Makes this process a child subreaper, so orphaned descendants of
    /// plugins are reparented here instead of escaping to init. Prefer
    /// [`Self::adopt_orphans`], which also reaps them.
    pub fn become_subreaper() -> io::Result<()> {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Daemon mode: makes this process a child subreaper and lets the reaper
    /// reap *every* exited child, tracked or not. Only for a process that
    /// owns all of its children (not a host application that embeds the
    /// supervisor and spawns children of its own: their statuses would be
    /// taken from it). Call [`Self::reap_orphans`] on SIGCHLD for prompt
    /// reaping; without it orphans are collected within a second.
    pub fn adopt_orphans(&self) -> io::Result<()> {
        Self::become_subreaper()?;
        self.adopt.store(true, Ordering::SeqCst);
        wake(&self.wake);
        Ok(())
    }

    /// Wakes the reaper to collect exited children now (call on SIGCHLD).
    pub fn reap_orphans(&self) {
        wake(&self.wake);
    }

    /// How many untracked children (orphans) the reaper has reaped.
    pub fn orphans_reaped(&self) -> usize {
        self.orphans.load(Ordering::SeqCst)
    }

    /// Spawns `spec` with a clean environment, stdin from /dev/null, stdout
    /// and stderr piped, a new session, the parent-death signal set, and
    /// every descriptor beyond 0-2 closed on exec.
    pub async fn spawn(&self, spec: &SpawnSpec) -> io::Result<Child> {
        self.spawn_with(spec, ChildSetup::default(), None).await
    }

    /// [`Self::spawn`], with what isolation asks of the child before exec
    /// (join its cgroups, rlimits, namespaces, credentials, no_new_privs;
    /// see [`crate::isolation::preexec`]), and optionally executing an
    /// already opened, verified file instead of looking up `spec.program`.
    ///
    /// Cancel safe: a child whose spawn is abandoned is killed (and reaped).
    pub async fn spawn_with(
        &self,
        spec: &SpawnSpec,
        setup: ChildSetup,
        exec: Option<ExecFd>,
    ) -> io::Result<Child> {
        let mut setup = setup;
        // A survivor writes to files that outlive us; others to pipes.
        let output = match setup.output.take() {
            Some((out, err)) => crate::vfork::Output::Files(out, err),
            None => crate::vfork::Output::Piped,
        };
        let exec = exec.map(|fd| ExecArgs {
            fd,
            program: &spec.program,
            args: &spec.args,
            env: &spec.env,
        });
        let new_pid_ns = setup.pid_namespace;
        let (pre_exec, report) = PreExec::new(setup, exec)?;
        // The child runs `PreExec::run` between clone and exec: it only
        // makes raw system calls on data prepared before the clone (no
        // allocation, no locks), so it is async-signal-safe, and it shares
        // nothing it changes with us (see `crate::vfork`). It joins the
        // cgroups, starts a new session, sets the parent-death signal,
        // marks every descriptor beyond 0-2 close-on-exec, and so on; with
        // a descriptor to execute it execs itself.
        let command = crate::vfork::Launch::new(
            &spec.program,
            &spec.args,
            &spec.env,
            &spec.cwd,
            output,
            pre_exec,
        )?;
        let stopped = || io::Error::other("the process thread has stopped");
        let (reply, result) = oneshot::channel();
        self.send(Job::Spawn(SpawnJob {
            command: Box::new(command),
            new_pid_ns,
            reply,
        }))?;
        let Spawned {
            output,
            pidfd,
            leader,
            exit,
        } = result
            .await
            .map_err(|_| stopped())?
            .map_err(|e| report.explain(e))?;
        // From here on, a failure drops `child`, which kills it.
        let mut child = Child {
            leader,
            pidfd,
            exit,
            stdout: None,
            stderr: None,
        };
        let Some((stdout, stderr)) = output else {
            return Err(io::Error::other(
                "the process thread answered a spawn without a child",
            ));
        };
        child.stdout = stdout.map(pipe::Receiver::from_owned_fd).transpose()?;
        child.stderr = stderr.map(pipe::Receiver::from_owned_fd).transpose()?;
        Ok(child)
    }
}

impl Drop for ProcessManager {
    fn drop(&mut self) {
        // Closing the channel and waking the thread lets it exit once its
        // children are reaped.
        self.jobs = None;
        wake(&self.wake);
    }
}

/// Writes to an eventfd to wake the thread polling it.
fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: write(2) of 8 bytes from a valid u64 to our own eventfd; a full
    // counter (EAGAIN) still leaves it readable, which is all we need.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// A child the reaper watches.
struct Tracked {
    leader: Arc<Leader>,
    pidfd: Arc<OwnedFd>,
    exit: watch::Sender<Option<ExitStatus>>,
}

/// Whether a tracked child can be reaped.
enum Peek {
    Running,
    /// Exited, unreaped: a zombie that pins its PID.
    Exited,
    /// Not waitable: someone else in this process reaped it.
    Gone,
}

/// The process thread's loop, to run on a thread of the caller's choice
/// (see [`ProcessManager::detached`]). Every child is forked by, and a child
/// of, the thread that runs it.
pub struct ProcessThread(Reaper);

impl ProcessThread {
    /// Runs until the manager is dropped and every child was reaped.
    pub fn run(self) {
        self.0.run()
    }
}

/// The process thread: forks every child and reaps them.
struct Reaper {
    jobs: std::sync::mpsc::Receiver<Job>,
    wake: Arc<OwnedFd>,
    adopt: Arc<AtomicBool>,
    orphans: Arc<AtomicUsize>,
    /// Children spawned and not yet reaped, by PID. Only this thread touches
    /// it, so forking and reaping never race.
    children: HashMap<i32, Tracked>,
    /// This thread's way back to its own PID namespace, opened at the first
    /// spawn that asks for a new one.
    pid_ns: Option<crate::isolation::pidns::ForChildren>,
}

impl Reaper {
    fn run(mut self) {
        let mut open = true;
        loop {
            while open {
                match self.jobs.try_recv() {
                    Ok(Job::Spawn(job)) => self.spawn(job),
                    Ok(Job::Track(job)) => self.track(job),
                    Ok(Job::Exec(job)) => self.exec(job),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            self.reap();
            if !open && self.children.is_empty() {
                return;
            }
            self.sleep(open && self.adopt.load(Ordering::SeqCst));
        }
    }

    /// Forks one child and starts tracking it.
    fn spawn(&mut self, job: SpawnJob) {
        // Only this thread forks, so only its namespace for children needs
        // to change: into a fresh one for this child, and back right after.
        let entered = if job.new_pid_ns {
            let ns = match self.pid_ns.take() {
                Some(ns) => Ok(ns),
                None => crate::isolation::pidns::ForChildren::open(),
            };
            ns.and_then(|mut ns| {
                let entered = ns.enter_new();
                self.pid_ns = Some(ns);
                entered
            })
        } else {
            self.pid_ns.as_mut().map_or(Ok(()), |ns| ns.restore())
        };
        let result = entered.and_then(|()| job.command.spawn());
        if let Some(ns) = self.pid_ns.as_mut()
            && let Err(e) = ns.restore()
        {
            // Tried again before the next spawn.
            tracing::error!("{e}");
        }
        let result = result.and_then(|child| {
            let pid = child.pid;
            match pidfd_open(pid) {
                Ok(fd) => Ok((child, fd)),
                Err(e) => {
                    // Cannot happen for our own unreaped child; kill and
                    // reap it rather than leave it unsupervised.
                    // SAFETY: signals and then waits for our own child, which
                    // cannot have been reaped yet: only this thread reaps.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, std::ptr::null_mut(), 0);
                    }
                    Err(e)
                }
            }
        });
        let result = result.map(|(child, pidfd)| {
            let pid = child.pid;
            let pidfd = Arc::new(pidfd);
            let leader = Arc::new(Leader::new(pid));
            let (tx, exit) = watch::channel(None);
            self.children.insert(
                pid,
                Tracked {
                    leader: leader.clone(),
                    pidfd: pidfd.clone(),
                    exit: tx,
                },
            );
            Spawned {
                output: Some((child.stdout, child.stderr)),
                pidfd,
                leader,
                exit,
            }
        });
        if let Err(Ok(abandoned)) = job.reply.send(result) {
            // The caller is gone: nobody would supervise this child.
            let _ = abandoned.leader.signal_group(libc::SIGKILL);
            let _ = pidfd_send_signal(&abandoned.pidfd, libc::SIGKILL);
        }
    }

    /// Starts tracking an inherited child.
    fn track(&mut self, job: TrackJob) {
        let result = match self.children.entry(job.pid) {
            std::collections::hash_map::Entry::Occupied(_) => Err(io::Error::other(format!(
                "pid {} is already tracked",
                job.pid
            ))),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let pidfd = Arc::new(job.pidfd);
                let leader = Arc::new(Leader::new(job.pid));
                let (tx, exit) = watch::channel(None);
                slot.insert(Tracked {
                    leader: leader.clone(),
                    pidfd: pidfd.clone(),
                    exit: tx,
                });
                Ok(Spawned {
                    output: None,
                    pidfd,
                    leader,
                    exit,
                })
            }
        };
        // A caller that is gone drops the `Child`, which kills it.
        let _ = job.reply.send(result);
    }

    /// Execs a new image (see [`ProcessManager::exec`]); answers only on
    /// failure.
    fn exec(&mut self, job: ExecJob) {
        let error = self.try_exec(&job.request);
        let _ = job.reply.send(error);
    }

    fn try_exec(&mut self, request: &ExecRequest) -> io::Error {
        use std::os::unix::ffi::OsStrExt;
        let mut tracked: Vec<i32> = self.children.keys().copied().collect();
        let mut expected = request.expected.clone();
        tracked.sort_unstable();
        expected.sort_unstable();
        if tracked != expected {
            return io::Error::other(format!(
                "the children changed while the hand-over state was taken (tracked {tracked:?}, in the state {expected:?}); nothing was replaced, try again"
            ));
        }
        let cstring = |s: &std::ffi::OsStr| {
            std::ffi::CString::new(s.as_bytes())
                .map_err(|_| io::Error::other(format!("{s:?} contains a NUL byte")))
        };
        let prepared = (|| -> io::Result<_> {
            let program = cstring(request.program.as_os_str())?;
            let args = request
                .args
                .iter()
                .map(|a| cstring(a))
                .collect::<io::Result<Vec<_>>>()?;
            let env = request
                .env
                .iter()
                .map(|(k, v)| {
                    let mut kv = k.clone();
                    kv.push("=");
                    kv.push(v);
                    cstring(&kv)
                })
                .collect::<io::Result<Vec<_>>>()?;
            Ok((program, args, env))
        })();
        let (program, args, env) = match prepared {
            Ok(p) => p,
            Err(e) => return e,
        };
        let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        for fd in &request.keep_fds {
            set_cloexec(*fd, false);
        }
        // SAFETY: execve with NUL-terminated strings and NULL-terminated
        // arrays that outlive the call. On success it does not return: the
        // kernel kills every other thread, and this one (the parent of every
        // plugin) continues as the new image's main thread.
        unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        let error = io::Error::last_os_error();
        for fd in &request.keep_fds {
            set_cloexec(*fd, true);
        }
        io::Error::new(
            error.kind(),
            format!("cannot exec {}: {error}", request.program.display()),
        )
    }

    /// Reaps every child that has exited: tracked ones one by one; in
    /// adopting mode, every other child too.
    fn reap(&mut self) {
        let done: Vec<(i32, Peek)> = self
            .children
            .iter()
            .filter_map(|(pid, t)| match peek(&t.pidfd) {
                Peek::Running => None,
                other => Some((*pid, other)),
            })
            .collect();
        for (pid, how) in done {
            if let Some(t) = self.children.remove(&pid) {
                finish(t, how);
            }
        }
        if !self.adopt.load(Ordering::SeqCst) {
            return;
        }
        loop {
            // SAFETY: zeroed siginfo_t is a valid value to be filled.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid with a valid siginfo pointer; WNOWAIT leaves the
            // child waitable, WNOHANG never blocks.
            let rc = unsafe {
                libc::waitid(
                    libc::P_ALL,
                    0,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            // SAFETY: si_pid is the member waitid fills (0 when none exited).
            let pid = unsafe { info.si_pid() };
            if rc < 0 || pid == 0 {
                return;
            }
            if let Some(t) = self.children.remove(&pid) {
                finish(t, Peek::Exited);
                continue;
            }
            // Not ours to supervise: an orphan reparented to us. This thread
            // is the only one that forks or reaps here, so the PID is still
            // that exited child's.
            // SAFETY: as above, on that one PID.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG,
                )
            };
            // SAFETY: as above.
            if rc < 0 || unsafe { info.si_pid() } == 0 {
                return;
            }
            self.orphans.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Sleeps until a child exits, work arrives, or (when adopting orphans)
    /// the orphan poll interval passes.
    fn sleep(&self, adopting: bool) {
        let mut fds: Vec<libc::pollfd> = std::iter::once(self.wake.as_raw_fd())
            .chain(self.children.values().map(|t| t.pidfd.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let timeout = if adopting { ORPHAN_POLL_MS } else { -1 };
        // SAFETY: poll on a valid array of pollfds of descriptors we own. An
        // error (EINTR) just means another round.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        let mut count = 0u64;
        // SAFETY: read(2) of 8 bytes into a valid u64 from our non-blocking
        // eventfd, which resets it.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    }
}

/// Whether the child behind `pidfd` has exited, without reaping it.
fn peek(pidfd: &OwnedFd) -> Peek {
    // SAFETY: zeroed siginfo_t is a valid value to be filled.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own pidfd with a valid siginfo pointer; WNOWAIT
    // leaves it waitable, WNOHANG never blocks.
    let rc = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc < 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => Peek::Running,
            _ => Peek::Gone,
        };
    }
    // SAFETY: si_pid is the member waitid fills (0 while it runs).
    match unsafe { info.si_pid() } {
        0 => Peek::Running,
        _ => Peek::Exited,
    }
}

/// Ends a tracked child: while its zombie still pins the PID, SIGKILLs what
/// is left of its process group; then reaps it and publishes the status.
/// The leader's lock is held throughout, so the owner's
/// [`Child::signal_group`] happens wholly before (while the PID is pinned)
/// or is refused after.
fn finish(t: Tracked, how: Peek) {
    let mut reaped = lock(&t.leader.reaped);
    let status = match how {
        Peek::Exited => {
            t.leader.record(GroupEvent::Signaled(libc::SIGKILL));
            if let Err(e) = kill_group(t.leader.pid, libc::SIGKILL) {
                tracing::warn!(
                    pid = t.leader.pid,
                    "cannot kill the process group of an exited child: {e}"
                );
            }
            // SAFETY: zeroed siginfo_t is a valid value to be filled.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on our own pidfd, which is an exited zombie, with
            // a valid siginfo pointer.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PIDFD,
                    t.pidfd.as_raw_fd() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG,
                )
            };
            // SAFETY: as in `peek`.
            if rc == 0 && unsafe { info.si_pid() } != 0 {
                ExitStatus::from_siginfo(&info)
            } else {
                ExitStatus::LOST
            }
        }
        // Someone else reaped it, so its PID may already be reused: its
        // group is left to the cgroup, never signalled by number.
        Peek::Gone | Peek::Running => {
            tracing::warn!(
                pid = t.leader.pid,
                "a child was reaped by someone else in this process; its exit status is lost"
            );
            ExitStatus::LOST
        }
    };
    *reaped = true;
    t.leader.record(GroupEvent::Reaped);
    drop(reaped);
    t.exit.send_replace(Some(status));
}

/// Sets or clears a descriptor's close-on-exec flag.
pub fn set_cloexec(fd: i32, on: bool) {
    // SAFETY: fcntl F_GETFD/F_SETFD on a descriptor number; an invalid one
    // just fails.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            let flags = if on {
                flags | libc::FD_CLOEXEC
            } else {
                flags & !libc::FD_CLOEXEC
            };
            libc::fcntl(fd, libc::F_SETFD, flags);
        }
    }
}

fn pidfd_send_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes a pidfd we own, a signal number, a
    // null siginfo and zero flags; it touches no memory of ours.
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
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err);
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a thread panicked while holding it; the
    // guarded values are single booleans and lists, always consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncBufReadExt;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn sh(script: &str) -> SpawnSpec {
        SpawnSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: "/".into(),
        }
    }

    async fn first_line(child: &mut Child) -> String {
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("no line within the deadline")
            .expect("stdout read")
            .expect("stdout closed without a line")
    }

    /// Waits (blocking, up to the deadline) until `pidfd`'s process exits.
    fn exits_within(pidfd: &OwnedFd, deadline: Duration) -> bool {
        let mut fd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut fd, 1, deadline.as_millis() as libc::c_int) };
        n == 1
    }

    #[tokio::test]
    async fn a_child_starts_with_default_signals_its_own_cwd_env_and_stdin() {
        // The supervisor ignores SIGPIPE and catches signals (SIGUSR1
        // here); the process thread blocks every signal around the clone.
        let pm = ProcessManager::new().unwrap();
        let _usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).unwrap();
        // The shell reads its own status with builtins only.
        let mut spec = sh(concat!(
            "while read -r k v; do case \"$k\" in SigBlk:|SigIgn:|SigCgt:) echo \"$k $v\";; esac; ",
            "done < /proc/$$/status; pwd; echo \"$PATH|$HOME\"; cat; echo end"
        ));
        spec.cwd = "/tmp".into();
        let mut child = pm.spawn(&spec).await.unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut all = Vec::new();
        while let Ok(Ok(Some(line))) = tokio::time::timeout(DEADLINE, lines.next_line()).await {
            all.push(line);
        }
        let mask = |name: &str| {
            let line = all.iter().find(|l| l.starts_with(name)).expect(name);
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        assert_eq!(mask("SigBlk:"), 0, "nothing blocked: {all:?}");
        // Our handler (SIGUSR1) is not the child's (the shell catches a
        // few of its own); SIGPIPE, which we ignore, is default.
        assert_eq!(mask("SigCgt:") & (1 << (libc::SIGUSR1 - 1)), 0, "{all:?}");
        assert_eq!(mask("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "{all:?}");
        // Stdin is /dev/null: `cat` ends at once.
        assert_eq!(all[3..], ["/tmp", "/usr/bin:/bin|", "end"], "{all:?}");
        assert!(child.wait().await.success());
    }

    #[tokio::test]
    async fn a_program_that_cannot_be_executed_fails_the_spawn_and_leaves_no_child() {
        let pm = ProcessManager::new().unwrap();
        let mut spec = sh("true");
        spec.program = "/nonexistent/plugin".into();
        let Err(e) = pm.spawn(&spec).await else {
            panic!("no such program")
        };
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        spec.program = "no-such-program-in-path".into();
        let Err(e) = pm.spawn(&spec).await else {
            panic!("not in PATH")
        };
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("not in PATH"), "{e}");
        spec.program = "/tmp".into();
        let Err(e) = pm.spawn(&spec).await else {
            panic!("a directory")
        };
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        spec = sh("true");
        spec.cwd = "/nonexistent-dir".into();
        let Err(e) = pm.spawn(&spec).await else {
            panic!("no such cwd")
        };
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        // Found through PATH.
        spec = sh("echo ok");
        spec.program = "sh".into();
        let mut child = pm.spawn(&spec).await.unwrap();
        assert_eq!(first_line(&mut child).await, "ok");
        assert!(child.wait().await.success());
        // Every failed child was reaped. A child that failed before exec
        // still has the process thread's name; other tests of this binary
        // run at the same time, and their children have other names.
        let ours = std::process::id().to_string();
        let zombies: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
            .filter(|status| {
                let field = |name: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(str::trim)
                        .unwrap_or_default()
                        .to_string()
                };
                field("PPid:") == ours
                    && field("State:").starts_with('Z')
                    && field("Name:") == "plugvisor-procs"
            })
            .collect();
        assert!(
            zombies.is_empty(),
            "a failed spawn left a zombie: {zombies:?}"
        );
    }

    #[tokio::test]
    async fn a_leftover_group_is_killed_before_the_leader_is_reaped() {
        let pm = ProcessManager::new().unwrap();
        // The shell leads the group; `sleep` stays in it when the shell dies.
        let mut child = pm.spawn(&sh("sleep 1000 & echo $!; wait")).await.unwrap();
        let grandchild: i32 = first_line(&mut child).await.parse().unwrap();
        let grandchild = pidfd_open(grandchild).expect("the grandchild is alive");
        // Kill the leader alone.
        child.signal(libc::SIGKILL).unwrap();
        let status = tokio::time::timeout(DEADLINE, child.wait()).await.unwrap();
        assert_eq!(
            status,
            ExitStatus::Signaled {
                signal: libc::SIGKILL,
                core_dumped: false
            }
        );
        // Nobody asked for the group to be killed: the reaper did, before
        // it released the leader's PID.
        assert!(
            exits_within(&grandchild, DEADLINE),
            "the grandchild outlived its group leader"
        );
        assert_eq!(
            *lock(&child.leader.log),
            [GroupEvent::Signaled(libc::SIGKILL), GroupEvent::Reaped]
        );
        // After the reap, a group signal is refused rather than sent to a
        // number that may name another group by now.
        assert!(!child.signal_group(libc::SIGTERM).unwrap());
        drop(child.stdout.take());
        let log = child.leader.log.lock().unwrap().clone();
        assert_eq!(
            log,
            [
                GroupEvent::Signaled(libc::SIGKILL),
                GroupEvent::Reaped,
                GroupEvent::Refused(libc::SIGTERM)
            ]
        );
    }

    #[tokio::test]
    async fn dropping_a_child_kills_its_group_and_it_is_still_reaped() {
        let pm = ProcessManager::new().unwrap();
        let mut child = pm.spawn(&sh("sleep 1000 & echo $!; wait")).await.unwrap();
        let grandchild: i32 = first_line(&mut child).await.parse().unwrap();
        let grandchild = pidfd_open(grandchild).unwrap();
        let leader = child.leader.clone();
        let mut exit = child.exit_watch();
        drop(child);
        let status = tokio::time::timeout(DEADLINE, wait_exit(exit.clone()))
            .await
            .unwrap();
        assert!(!status.success());
        assert!(exit.borrow_and_update().is_some());
        assert!(exits_within(&grandchild, DEADLINE));
        let log = lock(&leader.log).clone();
        let reaped_at = log.iter().position(|e| *e == GroupEvent::Reaped).unwrap();
        assert!(
            log[reaped_at + 1..].is_empty()
                && log[..reaped_at].contains(&GroupEvent::Signaled(libc::SIGKILL)),
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn host_children_are_not_reaped_when_embedded() {
        let pm = ProcessManager::new().unwrap();
        let mut host_child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        for _ in 0..5 {
            let child = pm.spawn(&sh("exit 3")).await.unwrap();
            let status = tokio::time::timeout(DEADLINE, child.wait()).await.unwrap();
            assert_eq!(status, ExitStatus::Exited(3));
        }
        // The host's child exited long ago, and its status is still the host's.
        assert_eq!(host_child.wait().unwrap().code(), Some(7));
        assert_eq!(pm.orphans_reaped(), 0);
    }

    #[tokio::test]
    async fn an_abandoned_spawn_is_killed() {
        let pm = ProcessManager::new().unwrap();
        // Each start is cancelled at some point of its way; none may leave
        // a process behind. `pidfd_open` on a reaped PID fails with ESRCH,
        // but the PID might be reused, so count our children in /proc.
        let sleeper = sh("exec sleep 1000");
        for _ in 0..20 {
            let spawn = pm.spawn(&sleeper);
            let _ = tokio::time::timeout(Duration::from_micros(50), spawn).await;
        }
        let child = pm.spawn(&sh("exit 0")).await.unwrap();
        child.wait().await;
        let me = std::process::id().to_string();
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let sleepers = sleepers_of(&me);
            if sleepers.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "abandoned children still run: {sleepers:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Our children that run `sleep`.
    fn sleepers_of(parent: &str) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...
            let Some(close) = stat.rfind(')') else {
                continue;
            };
            let comm = &stat[stat.find('(').unwrap_or(0) + 1..close];
            let mut rest = stat[close + 1..].split_whitespace();
            let state = rest.next().unwrap_or("");
            let ppid = rest.next().unwrap_or("");
            if ppid == parent && comm == "sleep" && state != "Z" {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        found
    }

    const IN_SUBPROCESS: &str = "PLUGVISOR_PROCESS_TEST_SUBREAPER";

    /// Becoming a subreaper changes the whole process, so this test reruns
    /// itself alone in a child process of the test binary.
    #[test]
    fn orphans_are_reaped_by_an_adopting_reaper_without_listing_proc() {
        let name = "process::tests::orphans_are_reaped_by_an_adopting_reaper_without_listing_proc";
        if std::env::var_os(IN_SUBPROCESS).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env(IN_SUBPROCESS, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("1 passed"), "{text}");
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let pm = ProcessManager::new().unwrap();
            pm.adopt_orphans().unwrap();
            // The grandchild leaves the group (setsid), so it survives its
            // parent, is reparented to us, and exits on its own later.
            let mut child = pm.spawn(&sh("setsid sleep 0.3 & echo $!")).await.unwrap();
            let orphan = first_line(&mut child).await;
            assert_eq!(
                tokio::time::timeout(DEADLINE, child.wait()).await.unwrap(),
                ExitStatus::Exited(0)
            );
            let stat = std::path::Path::new("/proc").join(&orphan);
            let deadline = std::time::Instant::now() + DEADLINE;
            // Gone from /proc means reaped, and the count says by us.
            while stat.exists() || pm.orphans_reaped() == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "orphan {orphan} not reaped: {:?}",
                    std::fs::read_to_string(stat.join("stat"))
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
}
