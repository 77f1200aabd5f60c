//! Starting a child without copying the supervisor's address space.
//!
//! A plain `fork` copies the page tables of the whole supervisor (every
//! runtime thread's stack and heap) and then makes each page the supervisor
//! writes fault once until the child has exec'd: a cost that grows with the
//! supervisor and is paid on every start. Like `posix_spawn`, [`Launch`]
//! clones the child with `CLONE_VM | CLONE_VFORK`: it shares the process
//! thread's memory, runs on a stack of its own, and the process thread is
//! suspended until the child has exec'd (or exited). The child's work
//! before exec is the same as with `fork`: [`PreExec::run`], which only
//! makes raw system calls on data prepared before the clone.
//!
//! Sharing memory asks for two precautions, the ones `posix_spawn` takes:
//! - the process thread blocks every signal before the clone, so no signal
//!   handler of the supervisor runs in the child (it would run on the
//!   supervisor's memory); the child sets each caught signal back to its
//!   default, then unblocks signals (exec does not clear the mask);
//! - the child never returns and never unwinds: a failure is written to a
//!   close-on-exec status pipe as an errno and the child `_exit`s.
//!
//! Signal dispositions, descriptors, credentials, the seccomp filter and
//! the Landlock domain are the child's own (no `CLONE_SIGHAND`,
//! `CLONE_FILES` or `CLONE_THREAD`), so nothing it changes reaches the
//! supervisor.

use crate::isolation::preexec::{CStringArray, PreExec};
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The child's stack: its pre-exec steps are a few frames of raw calls.
const STACK_SIZE: usize = 256 * 1024;
const PAGE: usize = 4096;

/// Where a child's standard output and error go.
pub(crate) enum Output {
    /// Pipes; the parent keeps their read ends.
    Piped,
    /// Files (a survivor's).
    Files(OwnedFd, OwnedFd),
}

/// Everything a child needs, built before the clone.
pub(crate) struct Launch {
    path: CString,
    argv: CStringArray,
    envp: CStringArray,
    cwd: CString,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    /// The parent's read ends, when piped.
    read_ends: Option<(OwnedFd, OwnedFd)>,
    pre: PreExec,
}

/// A child that has exec'd.
pub(crate) struct Launched {
    pub pid: i32,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two descriptors to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two descriptors; nobody else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `program` as `execvp` would find it: as given when it names a path,
/// else the first executable file of that name in `PATH` (the child's, as
/// given in `env`, else the supervisor's).
fn resolve(program: &Path, env: &[(OsString, OsString)]) -> io::Result<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(program.to_path_buf());
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not in PATH", program.display()),
            )
        })
}

impl Launch {
    /// Prepares a child running `program` with `args` and exactly `env`,
    /// in `cwd`, stdin from /dev/null, after `pre`'s steps.
    pub(crate) fn new(
        program: &Path,
        args: &[String],
        env: &[(OsString, OsString)],
        cwd: &Path,
        output: Output,
        pre: PreExec,
    ) -> io::Result<Launch> {
        let path = cstring(resolve(program, env)?.as_os_str().as_bytes())?;
        let argv = CStringArray::argv(program.as_os_str(), args)?;
        let envp = CStringArray::env(env)?;
        let stdin = OwnedFd::from(std::fs::File::open("/dev/null")?);
        let (stdout, stderr, read_ends) = match output {
            Output::Files(out, err) => (out, err, None),
            Output::Piped => {
                let (out_r, out_w) = pipe()?;
                let (err_r, err_w) = pipe()?;
                (out_w, err_w, Some((out_r, err_r)))
            }
        };
        Ok(Launch {
            path,
            argv,
            envp,
            cwd: cstring(cwd.as_os_str().as_bytes())?,
            stdin,
            stdout,
            stderr,
            read_ends,
            pre,
        })
    }

    /// Clones the child and returns once it has exec'd; on failure it has
    /// been reaped. Call on the process thread (the child's parent-death
    /// signal follows the thread that clones it).
    pub(crate) fn spawn(self) -> io::Result<Launched> {
        let (status_r, status_w) = pipe()?;
        let args = ChildArgs {
            launch: &self,
            status: status_w.as_raw_fd(),
        };
        // SAFETY: an anonymous private mapping we own and unmap below; its
        // lowest page is made inaccessible as a guard.
        let stack = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                STACK_SIZE + PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if stack == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the first page of the mapping made above.
        unsafe { libc::mprotect(stack, PAGE, libc::PROT_NONE) };
        // SAFETY: sigset_t is plain data; sigfillset initializes it.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: clone with CLONE_VM | CLONE_VFORK on a stack of our own:
        // this thread is suspended until the child execs or exits, and the
        // child only runs `child_main` (raw system calls on `args`, which
        // outlives it) with every signal blocked until its handlers are
        // back to default. The signal mask is restored right after.
        let pid = unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child_main,
                (stack as *mut u8).add(STACK_SIZE + PAGE).cast(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&args as *const ChildArgs<'_>).cast_mut().cast(),
            );
            let err = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            libc::munmap(stack, STACK_SIZE + PAGE);
            if pid < 0 { Err(err) } else { Ok(pid) }
        }?;
        drop(status_w);
        let mut errno = [0u8; 4];
        let n = loop {
            // SAFETY: read(2) into a valid four-byte buffer from our pipe.
            let n = unsafe { libc::read(status_r.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
            if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break n;
            }
        };
        if n == 4 {
            // It failed before exec and exited: reap it (it is not tracked).
            // SAFETY: waits for our own child, which nothing else reaps.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
        }
        let Launch { read_ends, .. } = self;
        let (stdout, stderr) = match read_ends {
            Some((out, err)) => (Some(out), Some(err)),
            None => (None, None),
        };
        Ok(Launched {
            pid,
            stdout,
            stderr,
        })
    }
}

struct ChildArgs<'a> {
    launch: &'a Launch,
    /// Write end of the status pipe (close-on-exec).
    status: i32,
}

/// Writes the errno of the failed step to the status pipe and exits.
///
/// # Safety
///
/// Only in the cloned child.
unsafe fn fail(status: i32, errno: i32) -> ! {
    let bytes = errno.to_ne_bytes();
    // SAFETY: write(2) from a valid buffer, then _exit(2): both raw calls.
    unsafe {
        libc::write(status, bytes.as_ptr().cast(), 4);
        libc::_exit(127)
    }
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The child, between clone and exec. Never returns.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` the parent passed, alive until this
    // child execs or exits (the parent is suspended until then). Everything
    // below is a raw system call or libc's async-signal-safe wrappers on
    // data prepared before the clone: no allocation, no lock, no unwinding.
    unsafe {
        let args = &*(arg as *const ChildArgs<'_>);
        let l = args.launch;
        // Every signal is blocked (inherited from the parent). Handlers
        // are the supervisor's and would run on its memory: back to
        // default, as exec would do anyway. SIGPIPE, which the supervisor
        // ignores, too (a plugin expects the default).
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            if old.sa_sigaction != libc::SIG_DFL
                && (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        for (fd, target) in [(&l.stdin, 0), (&l.stdout, 1), (&l.stderr, 2)] {
            let fd = fd.as_raw_fd();
            // dup2 onto itself keeps close-on-exec (a supervisor started
            // with a standard descriptor closed reuses its number): clear it.
            let kept = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if kept < 0 {
                fail(args.status, last_errno());
            }
        }
        if libc::chdir(l.cwd.as_ptr()) < 0 {
            fail(args.status, last_errno());
        }
        // With a descriptor to execute, `run` execs it and returns only on
        // failure.
        if let Err(e) = l.pre.run() {
            fail(args.status, e.raw_os_error().unwrap_or(libc::EIO));
        }
        libc::execve(l.path.as_ptr(), l.argv.as_ptr(), l.envp.as_ptr());
        fail(args.status, last_errno())
    }
}
