//! Child processes: spawning with the hygiene a supervisor owes its children,
//! waiting on them through pidfds, and signalling them without ever hitting a
//! reused PID.
//!
//! - Every child is forked from one long-lived *spawner thread*. The
//!   parent-death signal (`PR_SET_PDEATHSIG`) fires when the thread that
//!   forked exits, not the process, so forking from a short-lived thread would
//!   kill children at random.
//! - Each child gets a pidfd right after fork. Exit is awaited by polling the
//!   pidfd and then reaping that one PID, so a host application's own
//!   children are never reaped by us, and signals go through
//!   `pidfd_send_signal`.
//! - A child starts a new session, so it leads its own process group and
//!   its descendants can be signalled together.
//! - In daemon mode the supervisor is a child subreaper: orphaned
//!   grandchildren are reparented to it, and [`ProcessManager::sweep_orphans`]
//!   reaps those it does not track.

use crate::isolation::preexec::{ChildSetup, ExecArgs, ExecFd, PreExec};
use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch};

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called exit with this code.
    Exited(i32),
    /// A signal ended it.
    Signaled { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    fn from_wait_status(status: libc::c_int) -> ExitStatus {
        if libc::WIFEXITED(status) {
            ExitStatus::Exited(libc::WEXITSTATUS(status))
        } else {
            ExitStatus::Signaled {
                signal: libc::WTERMSIG(status),
                core_dumped: libc::WCOREDUMP(status),
            }
        }
    }

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

/// A running (or exited, not yet observed) child.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    pidfd: Arc<OwnedFd>,
    /// `Some` once the child has exited and been reaped.
    exit: watch::Receiver<Option<ExitStatus>>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

impl Child {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A receiver that turns `Some` when the child has exited.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.exit.clone()
    }

    /// The exit status, if it has exited.
    pub fn try_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits for the child to exit.
    pub async fn wait(&self) -> ExitStatus {
        wait_exit(self.exit.clone()).await
    }

    /// Sends `signal` to the child through its pidfd: never to a process that
    /// merely reuses its PID. ESRCH (already exited) is not an error.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal takes a pidfd we own, a signal number, a
        // null siginfo and zero flags; it touches no memory of ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
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

    /// Sends `signal` to the child's whole process group (it leads one, having
    /// started a new session), so grandchildren that stayed in the group get
    /// it too. The group ID cannot be reused while any member is alive, and a
    /// group with no members answers ESRCH, which is not an error.
    pub fn signal_group(&self, signal: i32) -> io::Result<()> {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory
        // is passed.
        let rc = unsafe { libc::kill(-self.pid, signal) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(err);
            }
        }
        Ok(())
    }
}

impl Drop for Child {
    /// A child nobody holds is a child nobody supervises: kill it and what
    /// is left of its process group. The group outlives its leader (a
    /// crashed plugin's workers or double-forked helpers), so it is killed
    /// even when the child itself has exited; an empty group is ESRCH.
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
            // The waiter task is gone without a status (runtime shutting down).
            return exit.borrow().unwrap_or(ExitStatus::Signaled {
                signal: libc::SIGKILL,
                core_dumped: false,
            });
        }
    }
}

type SpawnReply = oneshot::Sender<io::Result<(std::process::Child, OwnedFd)>>;

/// Spawns children from one long-lived thread and tracks which PIDs are ours.
pub struct ProcessManager {
    jobs: std::sync::mpsc::Sender<(Command, SpawnReply)>,
    /// PIDs of live children that a waiter task will reap. Held while forking
    /// and while reaping so the orphan sweeper never reaps a tracked child.
    tracked: Arc<Mutex<HashSet<i32>>>,
    tasks: tokio_util::task::TaskTracker,
}

impl ProcessManager {
    /// Starts the spawner thread.
    pub fn new(tasks: tokio_util::task::TaskTracker) -> io::Result<ProcessManager> {
        let (jobs, rx) = std::sync::mpsc::channel::<(Command, SpawnReply)>();
        let tracked: Arc<Mutex<HashSet<i32>>> = Arc::default();
        let registry = tracked.clone();
        std::thread::Builder::new()
            .name("plugvisor-spawner".into())
            .spawn(move || {
                // Lives until the ProcessManager (the only sender) is dropped,
                // which is after every child was stopped.
                while let Ok((mut command, reply)) = rx.recv() {
                    let mut tracked = lock(&registry);
                    let result = command.spawn().and_then(|child| {
                        let pid = child.id() as i32;
                        match pidfd_open(pid) {
                            Ok(fd) => {
                                tracked.insert(pid);
                                Ok((child, fd))
                            }
                            Err(e) => {
                                // Cannot happen for our own unreaped child;
                                // kill it rather than leave it unsupervised.
                                // SAFETY: signals our own child, which cannot
                                // have been reaped yet: nobody waits for it.
                                unsafe { libc::kill(pid, libc::SIGKILL) };
                                Err(e)
                            }
                        }
                    });
                    drop(tracked);
                    let _ = reply.send(result);
                }
            })?;
        Ok(ProcessManager {
            jobs,
            tracked,
            tasks,
        })
    }

    /// Makes this process a child subreaper, so orphaned descendants of
    /// plugins are reparented here (and reaped by [`Self::sweep_orphans`])
    /// instead of escaping to init.
    pub fn become_subreaper() -> io::Result<()> {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
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
    pub async fn spawn_with(
        &self,
        spec: &SpawnSpec,
        setup: ChildSetup,
        exec: Option<ExecFd>,
    ) -> io::Result<Child> {
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let exec = exec.map(|fd| ExecArgs {
            fd,
            program: &spec.program,
            args: &spec.args,
            env: &spec.env,
        });
        let (pre_exec, report) = PreExec::new(setup, exec)?;
        // SAFETY: the closure runs between fork and exec; `PreExec::run` only
        // makes raw system calls on data prepared before fork (no allocation,
        // no locks), so it is async-signal-safe. It joins the cgroups, starts
        // a new session, sets the parent-death signal, marks every
        // descriptor beyond 0-2 close-on-exec, and so on; with a descriptor
        // to execute it execs itself and returns only on failure.
        unsafe {
            command.pre_exec(move || pre_exec.run());
        }
        let (reply, result) = oneshot::channel();
        self.jobs
            .send((command, reply))
            .map_err(|_| io::Error::other("the spawner thread has stopped"))?;
        let (mut std_child, pidfd) = result
            .await
            .map_err(|_| io::Error::other("the spawner thread has stopped"))?
            .map_err(|e| report.explain(e))?;
        let pid = std_child.id() as i32;
        let stdout = std_child
            .stdout
            .take()
            .map(|s| pipe::Receiver::from_owned_fd(OwnedFd::from(s)))
            .transpose()?;
        let stderr = std_child
            .stderr
            .take()
            .map(|s| pipe::Receiver::from_owned_fd(OwnedFd::from(s)))
            .transpose()?;
        // The std Child is dropped without waiting: the waiter below reaps.
        drop(std_child);
        let pidfd = Arc::new(pidfd);
        let (tx, exit) = watch::channel(None);
        let tracked = self.tracked.clone();
        let waiter_fd = pidfd.clone();
        self.tasks.spawn(async move {
            let status = reap_when_exited(pid, &waiter_fd, &tracked).await;
            let _ = tx.send(Some(status));
        });
        Ok(Child {
            pid,
            pidfd,
            exit,
            stdout,
            stderr,
        })
    }

    /// Reaps exited processes that are our children but not tracked: the
    /// orphaned descendants reparented to us as subreaper. Lists children
    /// from `proc_root` (normally `/proc`).
    pub fn sweep_orphans(&self, proc_root: &std::path::Path) -> usize {
        let tracked = lock(&self.tracked);
        let mut reaped = 0;
        for pid in list_children(proc_root) {
            if tracked.contains(&pid) {
                continue;
            }
            let mut status = 0;
            // SAFETY: waitpid on a specific PID that is our untracked child;
            // WNOHANG so a live one is left alone.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                reaped += 1;
            }
        }
        reaped
    }
}

/// Children of this process, from `/proc/self/task/*/children`.
fn list_children(proc_root: &std::path::Path) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(proc_root.join("self/task")) else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for task in tasks.filter_map(Result::ok) {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    pids
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a thread panicked while holding it; the set
    // of PIDs is still consistent (inserts and removes are single calls).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::O_NONBLOCK as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until the pidfd is readable (the child exited), then reaps it.
async fn reap_when_exited(
    pid: i32,
    pidfd: &Arc<OwnedFd>,
    tracked: &Mutex<HashSet<i32>>,
) -> ExitStatus {
    // SAFETY: `PidFd` holds an `Arc<OwnedFd>`, so the descriptor stays open
    // and refers to the same pidfd for as long as the AsyncFd owns it, and
    // `as_raw_fd` always returns that descriptor.
    let registered = unsafe {
        AsyncFd::register_with_interest(PidFd(pidfd.clone()), tokio::io::Interest::READABLE)
    };
    match registered {
        Ok(async_fd) => {
            if let Ok(guard) = async_fd.readable().await {
                drop(guard);
            }
        }
        Err(_) => {
            // Cannot poll the pidfd (should not happen): fall back to a
            // blocking wait on a worker thread.
        }
    }
    let reap = move || {
        let mut tracked = lock(tracked);
        let mut status = 0;
        // SAFETY: waitpid on our own tracked child. It is a zombie (the pidfd
        // became readable) or we block until it is one; only this task reaps
        // tracked PIDs, so the PID cannot have been reused.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        tracked.remove(&pid);
        if rc == pid {
            ExitStatus::from_wait_status(status)
        } else {
            ExitStatus::Signaled {
                signal: libc::SIGKILL,
                core_dumped: false,
            }
        }
    };
    reap()
}

/// A pidfd as something tokio can poll.
struct PidFd(Arc<OwnedFd>);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
