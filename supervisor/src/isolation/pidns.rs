//! A PID namespace per plugin: the plugin is PID 1 of a namespace of its
//! own, so when it dies the kernel SIGKILLs every process left in that
//! namespace at once — a double-forked, `setsid`-ed grandchild included,
//! even when the supervisor was SIGKILLed and nobody is left to clean up.
//!
//! How: `unshare(CLONE_NEWPID)` changes only the namespace the *calling
//! thread's* future children are born in, and is allowed in a
//! multi-threaded process. The process thread (see [`crate::process`]),
//! which forks every child, unshares right before forking a child that
//! wants a namespace and goes back to its own namespace right after
//! (`setns` on a pidfd of this process), so each plugin gets a fresh
//! namespace and nothing else does. The forked child is then PID 1 of the
//! new namespace from its first instruction: the pidfd, `kill(-pid)` on its
//! group, `waitid` and SO_PEERCRED all see its PID in the supervisor's
//! namespace, which is the one the kernel translates to.
//!
//! The plugin itself is PID 1, with no init in front of it. An init would
//! need a second process between the supervisor and the plugin: the peer
//! check (the socket's peer must be the spawned child) and the exit status
//! (a seccomp SIGSYS, an OOM SIGKILL) would then be the init's, not the
//! plugin's. What PID 1 changes for the plugin:
//! - the kernel does not deliver a signal to PID 1 that has no handler for
//!   it, SIGKILL excepted. The SDKs handle SIGTERM; a plugin that does not
//!   is SIGKILLed after `timeouts.stop`, as one that ignores SIGTERM is;
//! - orphans in its namespace are reparented to it, so a plugin that forks
//!   helpers must reap them (as it must anyway for its own children). The
//!   pids limit bounds what an unreaped zombie costs. Set
//!   `isolation.pid_namespace: false` for plugins that cannot.
//!
//! Needs CAP_SYS_ADMIN; [`probe`] says once at start-up whether this host
//! allows it, and plugins run without a namespace (reported in `inspect`)
//! when it does not.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Whether this process can give children a PID namespace of their own:
/// tries it on a scratch thread, which forks nothing.
pub fn probe() -> Result<(), String> {
    std::thread::Builder::new()
        .name("plugvisor-pidns-probe".into())
        .spawn(|| {
            // The whole round trip the process thread makes: a pidfd of this
            // process (5.3+), unshare, and setns back on the pidfd (5.8+).
            let mut ns = ForChildren::open()
                .map_err(|e| format!("cannot open a pidfd of this process: {e}"))?;
            ns.enter_new().map_err(|e| e.to_string())?;
            ns.restore().map_err(|e| e.to_string())
        })
        .map_err(|e| format!("cannot start a thread to probe PID namespaces: {e}"))?
        .join()
        .unwrap_or_else(|_| Err("the PID namespace probe panicked".into()))
}

/// The process thread's handle on its own PID namespace, to come back to
/// after forking a child into a new one.
#[derive(Debug)]
pub struct ForChildren {
    /// A pidfd of this process: `setns` on it restores the namespace.
    own: OwnedFd,
    /// Set between [`Self::enter_new`] and a successful [`Self::restore`].
    away: bool,
}

impl ForChildren {
    pub fn open() -> io::Result<ForChildren> {
        // SAFETY: pidfd_open on our own PID with no flags returns a new
        // descriptor, which nobody else owns.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ForChildren {
            // SAFETY: just returned by pidfd_open, owned by nobody else.
            own: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            away: false,
        })
    }

    /// Makes the calling thread's next child PID 1 of a new namespace.
    /// Call [`Self::restore`] once that child is forked.
    pub fn enter_new(&mut self) -> io::Result<()> {
        self.restore()?;
        // SAFETY: unshare with a flag only; it changes the namespace this
        // thread's future children are born in, nothing else.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "entering a new PID namespace (unshare(CLONE_NEWPID)): {e}. Hint: it needs CAP_SYS_ADMIN; set isolation.pid_namespace: false to run without"
                ),
            ));
        }
        self.away = true;
        Ok(())
    }

    /// Children of the calling thread are born in this process's own PID
    /// namespace again.
    pub fn restore(&mut self) -> io::Result<()> {
        if !self.away {
            return Ok(());
        }
        // SAFETY: setns on our own pidfd: moves this thread's namespace for
        // children back to the one this process runs in.
        if unsafe { libc::setns(self.own.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("returning to the supervisor's PID namespace: {e}"),
            ));
        }
        self.away = false;
        Ok(())
    }
}

/// A pidfd of this process, for a child in another PID namespace to check
/// that its parent is still alive (`getppid` is 0 there).
pub fn own_pidfd() -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open on our own PID; the descriptor is new and ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just returned by pidfd_open, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the process behind `pidfd` has exited. Async-signal-safe: one
/// `poll` with no timeout.
pub fn exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd on the stack, without waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_forked_after_enter_new_is_pid_1_and_later_ones_are_not() {
        if let Err(why) = probe() {
            eprintln!("skipped: {why}");
            return;
        }
        std::thread::spawn(|| {
            let mut ns = ForChildren::open().unwrap();
            let pid_in_child = |ns: &mut ForChildren, new: bool| {
                if new {
                    ns.enter_new().unwrap();
                }
                let out = std::process::Command::new("/bin/sh")
                    .args(["-c", "echo $$"])
                    .output()
                    .unwrap();
                ns.restore().unwrap();
                String::from_utf8(out.stdout).unwrap().trim().to_string()
            };
            assert_eq!(pid_in_child(&mut ns, true), "1");
            assert_ne!(pid_in_child(&mut ns, false), "1");
            // A fresh namespace each time (the first one died with its init).
            assert_eq!(pid_in_child(&mut ns, true), "1");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn our_own_pidfd_is_not_exited() {
        assert!(!exited(&own_pidfd().unwrap()));
    }
}
