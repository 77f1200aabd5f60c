//! What a child does between fork and exec. Everything is prepared in the
//! parent before fork — descriptors opened, C strings built, limits computed
//! — so that the child only makes raw system calls: no allocation, no lock,
//! nothing that is not async-signal-safe in a copy of a multi-threaded
//! process.
//!
//! In order, the child:
//! 1. joins its cgroup(s), writing `0` to each pre-opened `cgroup.procs` (v1: `tasks`),
//!    before anything else it does is charged elsewhere;
//! 2. starts a new session (own process group, no controlling terminal);
//! 3. sets its rlimits;
//! 4. enters an empty network namespace (`network: none`);
//! 5. empties the capability bounding set but for the manifest's
//!    `isolation.capabilities` (and keeps them across the uid change);
//! 6. drops to the plugin's user and groups (while still privileged for 1-5);
//! 7. sets its permitted, effective, inheritable and ambient capabilities
//!    to exactly the kept ones (none by default);
//! 8. sets the parent-death signal — after 6, since a credential change
//!    clears it — and checks the supervisor did not die meanwhile;
//! 9. sets `no_new_privs`;
//! 10. enters its filesystem view (`landlock_restrict_self` on the ruleset
//!     built before fork; it needs 9; see [`super::landlock`]);
//! 11. marks every descriptor beyond 0-2 close-on-exec, then installs the
//!     seccomp filter compiled before fork (last, so nothing above is
//!     filtered, and after the capabilities are gone; see
//!     [`super::seccomp`]);
//! 12. executes the pinned, sealed copy (`execveat`), or returns and lets the
//!     standard library execute the path.
//!
//! A child that wants a PID namespace of its own is forked into one (see
//! [`super::pidns`]): it is PID 1 there and `getppid` is 0, so step 8
//! checks the supervisor through a pidfd instead.
//!
//! A step that fails writes its number to a report pipe before returning
//! the errno, so the parent can say which step failed on what.

use super::ProcsFile;
use super::privileges::{CapsPlan, CapsStep};
use super::rlimits::Rlimit;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Who a plugin runs as, resolved before fork.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the user's, from the group database).
    pub groups: Vec<u32>,
}

impl Credentials {
    /// Resolves `isolation.user` and `isolation.group` (names or numbers).
    /// `None` when neither is given.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Credentials>, String> {
        use nix::unistd::{Gid, Group, Uid, User};
        if user.is_none() && group.is_none() {
            return Ok(None);
        }
        let user = match user {
            None => None,
            Some(u) => {
                let found = match u.parse::<u32>() {
                    Ok(uid) => User::from_uid(Uid::from_raw(uid)),
                    Err(_) => User::from_name(u),
                }
                .map_err(|e| format!("isolation.user: cannot look up `{u}`: {e}"))?;
                match (found, u.parse::<u32>()) {
                    (Some(found), _) => {
                        Some((found.uid.as_raw(), found.gid.as_raw(), Some(found.name)))
                    }
                    // A bare uid without a passwd entry: fine with a group.
                    (None, Ok(uid)) => Some((uid, u32::MAX, None)),
                    (None, Err(_)) => {
                        return Err(format!(
                            "isolation.user: no user named `{u}` on this machine"
                        ));
                    }
                }
            }
        };
        let gid = match group {
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => Group::from_name(g)
                    .map_err(|e| format!("isolation.group: cannot look up `{g}`: {e}"))?
                    .ok_or_else(|| {
                        format!("isolation.group: no group named `{g}` on this machine")
                    })?
                    .gid
                    .as_raw(),
            },
            None => match &user {
                Some((_, gid, _)) if *gid != u32::MAX => *gid,
                _ => {
                    return Err(format!(
                        "isolation.user: uid `{}` has no entry in the user database, so its group is unknown; set isolation.group",
                        user.map(|u| u.0).unwrap_or_default()
                    ));
                }
            },
        };
        let (uid, groups) = match user {
            Some((uid, _, Some(name))) => {
                let name = CString::new(name).map_err(|e| format!("isolation.user: {e}"))?;
                let groups = nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
                    .map_err(|e| {
                        format!("isolation.user: cannot list the groups of {name:?}: {e}")
                    })?
                    .into_iter()
                    .map(|g| g.as_raw())
                    .collect();
                (uid, groups)
            }
            Some((uid, _, None)) => (uid, vec![gid]),
            // A group alone: keep the user, change the group.
            None => (nix::unistd::geteuid().as_raw(), vec![gid]),
        };
        Ok(Some(Credentials { uid, gid, groups }))
    }
}

/// What isolation asks of a child before exec.
#[derive(Debug, Default)]
pub struct ChildSetup {
    /// Written `0` (join) before anything else.
    pub cgroup_procs: Vec<ProcsFile>,
    pub rlimits: Vec<Rlimit>,
    pub credentials: Option<Credentials>,
    /// Enter a new, empty network namespace.
    pub network_none: bool,
    pub no_new_privs: bool,
    /// Capabilities: `None` leaves them as inherited (no isolation asked).
    pub caps: Option<CapsPlan>,
    // --- seccomp and PID namespace
    /// The filter to install last, compiled before fork.
    pub seccomp: Option<super::seccomp::Compiled>,
    /// Fork the child as PID 1 of a new PID namespace.
    pub pid_namespace: bool,
    // --- end seccomp and PID namespace
    /// The filesystem view to enter after `no_new_privs`.
    pub landlock: Option<super::landlock::Ruleset>,
    /// `survive_supervisor`: no parent-death signal (see [`crate::adopt`]).
    pub survive: bool,
    /// Where stdout and stderr go instead of pipes (a survivor's files).
    pub output: Option<(OwnedFd, OwnedFd)>,
}

/// Execute this open file instead of the path.
#[derive(Debug)]
pub struct ExecFd {
    pub fd: OwnedFd,
    /// Leave it open across exec: a script's interpreter reads `/dev/fd/N`.
    pub keep_open: bool,
}

/// What the child executes itself: an open file, with the command line and
/// environment the path would have had.
pub struct ExecArgs<'a> {
    pub fd: ExecFd,
    /// `argv[0]`.
    pub program: &'a Path,
    pub args: &'a [String],
    pub env: &'a [(std::ffi::OsString, std::ffi::OsString)],
}

/// The steps that can fail, as reported through the pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Step {
    JoinCgroup = 1,
    Setsid,
    Rlimit,
    NetNamespace,
    Setgroups,
    Setgid,
    Setuid,
    ParentDeathSignal,
    ParentGone,
    NoNewPrivs,
    CloseRange,
    KeepExecFd,
    Exec,
    CapBounding,
    KeepCaps,
    Capset,
    CapAmbient,
    Seccomp,
    Landlock,
}

impl Step {
    const ALL: [Step; 19] = [
        Step::JoinCgroup,
        Step::Setsid,
        Step::Rlimit,
        Step::NetNamespace,
        Step::Setgroups,
        Step::Setgid,
        Step::Setuid,
        Step::ParentDeathSignal,
        Step::ParentGone,
        Step::NoNewPrivs,
        Step::CloseRange,
        Step::KeepExecFd,
        Step::Exec,
        Step::CapBounding,
        Step::KeepCaps,
        Step::Capset,
        Step::CapAmbient,
        Step::Seccomp,
        Step::Landlock,
    ];
}

/// A NULL-terminated array of C strings, for `execveat`.
pub(crate) struct CStringArray {
    /// Owns what `ptrs` points into; never changed after construction.
    _strings: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

impl CStringArray {
    /// The NULL-terminated array of pointers, as `execve` takes it.
    pub(crate) fn as_ptr(&self) -> *const *const libc::c_char {
        self.ptrs.as_ptr()
    }

    pub(crate) fn new(items: impl IntoIterator<Item = Vec<u8>>) -> io::Result<Self> {
        let strings = items
            .into_iter()
            .map(|b| CString::new(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e)))
            .collect::<io::Result<Vec<_>>>()?;
        let mut ptrs: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        Ok(CStringArray {
            _strings: strings,
            ptrs,
        })
    }

    /// `program` as argument 0, then `args`.
    pub(crate) fn argv(program: &OsStr, args: &[String]) -> io::Result<Self> {
        Self::new(
            std::iter::once(program.as_bytes().to_vec())
                .chain(args.iter().map(|a| a.as_bytes().to_vec())),
        )
    }

    /// `KEY=value` strings of `env`.
    pub(crate) fn env(env: &[(OsString, OsString)]) -> io::Result<Self> {
        Self::new(env.iter().map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(OsStr::as_bytes(v));
            kv
        }))
    }
}

// SAFETY: the pointers point into the CStrings owned by the same struct,
// which are never mutated or dropped while it lives; sharing or moving the
// struct between threads moves the owner with them.
unsafe impl Send for CStringArray {}
// SAFETY: as above; nothing is ever written through the pointers.
unsafe impl Sync for CStringArray {}

struct Exec {
    fd: OwnedFd,
    keep_open: bool,
    argv: CStringArray,
    envp: CStringArray,
}

/// Everything the child needs, owned by the pre-exec closure. The parent
/// drops it (closing its copies of the descriptors) after the fork.
pub struct PreExec {
    parent: libc::pid_t,
    procs: Vec<OwnedFd>,
    rlimits: Vec<(libc::c_int, libc::rlimit64)>,
    network_none: bool,
    groups: Option<Vec<libc::gid_t>>,
    gid: Option<libc::gid_t>,
    uid: Option<libc::uid_t>,
    no_new_privs: bool,
    caps: Option<CapsPlan>,
    /// The seccomp filter, installed after everything else.
    seccomp: Option<super::seccomp::Installed>,
    /// The Landlock ruleset to restrict the child to (close-on-exec).
    landlock: Option<OwnedFd>,
    /// A pidfd of the supervisor, for a child in its own PID namespace to
    /// check it is alive (`getppid` is 0 there).
    parent_pidfd: Option<OwnedFd>,
    /// No parent-death signal: the child is to survive the supervisor.
    survive: bool,
    exec: Option<Exec>,
    /// Write end of the report pipe (close-on-exec, non-blocking).
    report: OwnedFd,
}

/// The parent's side of a [`PreExec`]: turns a failed spawn's errno into a
/// message that names the step and its object.
pub struct Report {
    read: OwnedFd,
    procs: Vec<PathBuf>,
    rlimits: Vec<String>,
    exec: Option<PathBuf>,
}

impl PreExec {
    /// Prepares `setup` for a child of this process. With `exec`, the child
    /// executes that descriptor with `argv` and `env` itself.
    pub fn new(setup: ChildSetup, exec: Option<ExecArgs<'_>>) -> io::Result<(PreExec, Report)> {
        let mut pipe = [0; 2];
        // SAFETY: `pipe` is a valid array of two descriptors to fill.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 just returned these two descriptors; nobody else owns them.
        let (read, write) =
            unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
        let (exec, exec_path) = match exec {
            None => (None, None),
            Some(ExecArgs {
                fd,
                program: path,
                args,
                env,
            }) => {
                let argv = CStringArray::argv(path.as_os_str(), args)?;
                let envp = CStringArray::env(env)?;
                (
                    Some(Exec {
                        fd: fd.fd,
                        keep_open: fd.keep_open,
                        argv,
                        envp,
                    }),
                    Some(path.to_path_buf()),
                )
            }
        };
        let report = Report {
            read,
            procs: setup.cgroup_procs.iter().map(|p| p.path.clone()).collect(),
            rlimits: setup
                .rlimits
                .iter()
                .map(|r| {
                    format!(
                        "RLIMIT_{} to {}",
                        r.resource.name(),
                        r.resource.format(r.soft)
                    )
                })
                .collect(),
            exec: exec_path,
        };
        let creds = setup.credentials;
        let parent_pidfd = if setup.pid_namespace {
            Some(super::pidns::own_pidfd()?)
        } else {
            None
        };
        let pre = PreExec {
            parent: std::process::id() as libc::pid_t,
            procs: setup.cgroup_procs.into_iter().map(|p| p.fd).collect(),
            rlimits: setup
                .rlimits
                .iter()
                .map(|r| (r.resource.raw(), r.raw()))
                .collect(),
            network_none: setup.network_none,
            groups: creds.as_ref().map(|c| c.groups.clone()),
            gid: creds.as_ref().map(|c| c.gid),
            uid: creds.as_ref().map(|c| c.uid),
            no_new_privs: setup.no_new_privs,
            caps: setup.caps,
            seccomp: setup.seccomp.map(super::seccomp::Installed::new),
            landlock: setup.landlock.map(super::landlock::Ruleset::into_fd),
            parent_pidfd,
            exec,
            report: write,
            survive: setup.survive,
        };
        Ok((pre, report))
    }

    /// Records the failed step for the parent and returns the errno.
    fn fail(&self, step: Step, index: usize) -> io::Error {
        // Read errno before the write below can change it.
        let err = io::Error::last_os_error();
        let msg = [step as u8, index.min(255) as u8];
        // SAFETY: write(2) from a valid two-byte buffer to our own pipe; a
        // failure to report is not worth failing for.
        unsafe { libc::write(self.report.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
        err
    }

    /// Runs in the child between fork and exec; with a descriptor to
    /// execute, returns only on failure.
    ///
    /// # Safety
    ///
    /// Call only in a freshly forked child. It makes raw system calls only
    /// (no allocation, no locks), so it is async-signal-safe.
    pub unsafe fn run(&self) -> io::Result<()> {
        // SAFETY: every call below is a raw system call on descriptors this
        // struct owns, or on plain integers and pointers to data this struct
        // owns, which lives until exec; none allocates or takes a lock.
        unsafe {
            for (i, fd) in self.procs.iter().enumerate() {
                if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(self.fail(Step::JoinCgroup, i));
                }
            }
            if libc::setsid() < 0 {
                return Err(self.fail(Step::Setsid, 0));
            }
            for (i, (resource, limit)) in self.rlimits.iter().enumerate() {
                let no_old: *mut libc::rlimit64 = std::ptr::null_mut();
                if libc::syscall(libc::SYS_prlimit64, 0, *resource, limit as *const _, no_old) < 0 {
                    return Err(self.fail(Step::Rlimit, i));
                }
            }
            if self.network_none && libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNET) < 0 {
                return Err(self.fail(Step::NetNamespace, 0));
            }
            if let Some(caps) = &self.caps
                && let Err((step, cap)) = caps.apply_before_setuid()
            {
                return Err(self.fail(Step::from(step), cap as usize));
            }
            if let Some(groups) = &self.groups
                && libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) < 0
            {
                return Err(self.fail(Step::Setgroups, 0));
            }
            if let Some(gid) = self.gid
                && libc::syscall(libc::SYS_setresgid, gid, gid, gid) < 0
            {
                return Err(self.fail(Step::Setgid, 0));
            }
            if let Some(uid) = self.uid
                && libc::syscall(libc::SYS_setresuid, uid, uid, uid) < 0
            {
                return Err(self.fail(Step::Setuid, 0));
            }
            if let Some(caps) = &self.caps
                && let Err((step, cap)) = caps.apply_after_setuid()
            {
                return Err(self.fail(Step::from(step), cap as usize));
            }
            // Die with the supervisor, even when it is SIGKILLed (unless it
            // is to survive it).
            if !self.survive && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                return Err(self.fail(Step::ParentDeathSignal, 0));
            }
            // The supervisor may have died before prctl took effect.
            let parent_gone = match &self.parent_pidfd {
                Some(pidfd) => super::pidns::exited(pidfd),
                None => libc::getppid() != self.parent,
            };
            if parent_gone && !self.survive {
                *libc::__errno_location() = libc::ESRCH;
                return Err(self.fail(Step::ParentGone, 0));
            }
            if self.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                return Err(self.fail(Step::NoNewPrivs, 0));
            }
            if let Some(ruleset) = &self.landlock
                && !super::landlock::restrict_self(ruleset)
            {
                return Err(self.fail(Step::Landlock, 0));
            }
            // No descriptor beyond 0-2 survives exec, whoever opened it
            // without O_CLOEXEC. CLOEXEC rather than close, so the standard
            // library's exec-error pipe and our report pipe keep working.
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) < 0
            {
                return Err(self.fail(Step::CloseRange, 0));
            }
            if let Some(filter) = &self.seccomp
                && let Err(i) = filter.install()
            {
                return Err(self.fail(Step::Seccomp, i));
            }
            let Some(exec) = &self.exec else {
                return Ok(());
            };
            if exec.keep_open && libc::fcntl(exec.fd.as_raw_fd(), libc::F_SETFD, 0) < 0 {
                return Err(self.fail(Step::KeepExecFd, 0));
            }
            libc::syscall(
                libc::SYS_execveat,
                exec.fd.as_raw_fd(),
                c"".as_ptr(),
                exec.argv.ptrs.as_ptr(),
                exec.envp.ptrs.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            Err(self.fail(Step::Exec, 0))
        }
    }
}

impl From<CapsStep> for Step {
    fn from(s: CapsStep) -> Step {
        match s {
            CapsStep::Bounding => Step::CapBounding,
            CapsStep::KeepCaps => Step::KeepCaps,
            CapsStep::Capset => Step::Capset,
            CapsStep::Ambient => Step::CapAmbient,
        }
    }
}

impl Report {
    /// Explains a failed spawn: which step failed on what, and how to fix it.
    pub fn explain(&self, err: io::Error) -> io::Error {
        let mut msg = [0u8; 2];
        // SAFETY: read(2) into a valid two-byte buffer from our own,
        // non-blocking pipe.
        let n = unsafe { libc::read(self.read.as_raw_fd(), msg.as_mut_ptr().cast(), 2) };
        if n != 2 {
            return err;
        }
        let Some(step) = Step::ALL.iter().find(|s| **s as u8 == msg[0]) else {
            return err;
        };
        let i = usize::from(msg[1]);
        let nth = |list: &[String]| list.get(i).cloned().unwrap_or_default();
        let what = match step {
            Step::JoinCgroup => format!(
                "joining the cgroup through {}",
                self.procs
                    .get(i)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            Step::Setsid => "starting a new session".into(),
            Step::Rlimit => format!("setting {}", nth(&self.rlimits)),
            Step::NetNamespace => {
                "entering a new network namespace (isolation.network: none needs CAP_SYS_ADMIN)"
                    .into()
            }
            Step::Setgroups => "setting the supplementary groups".into(),
            Step::Setgid => "switching to isolation.group".into(),
            Step::Setuid => "switching to isolation.user".into(),
            Step::ParentDeathSignal => "setting the parent-death signal".into(),
            Step::ParentGone => "checking the supervisor is alive (it is not)".into(),
            Step::NoNewPrivs => "setting no_new_privs".into(),
            Step::CloseRange => "marking inherited descriptors close-on-exec".into(),
            Step::Seccomp => "installing the seccomp filter (isolation.seccomp; it needs no_new_privs or CAP_SYS_ADMIN, and a kernel with CONFIG_SECCOMP_FILTER)".into(),
            Step::Landlock => "entering the filesystem view (isolation.filesystem; Landlock needs no_new_privs or CAP_SYS_ADMIN)".into(),
            Step::KeepExecFd => "keeping the script's descriptor open".into(),
            Step::CapBounding => format!(
                "dropping {} from the capability bounding set (needs CAP_SETPCAP)",
                super::privileges::names_of(1 << (i as u64 & 63)).join("")
            ),
            Step::KeepCaps => {
                "keeping isolation.capabilities across the uid change (PR_SET_KEEPCAPS)".into()
            }
            Step::Capset => "setting the capability sets to isolation.capabilities (capset)".into(),
            Step::CapAmbient => format!(
                "raising {} in the ambient set (isolation.capabilities)",
                super::privileges::names_of(1 << (i as u64 & 63)).join("")
            ),
            Step::Exec => format!(
                "executing the sealed, verified copy of {}",
                self.exec
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        };
        io::Error::new(err.kind(), format!("{what}: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_user_or_group_means_no_change() {
        assert_eq!(Credentials::resolve(None, None).unwrap(), None);
    }

    #[test]
    fn users_and_groups_resolve_by_name_or_number() {
        let root = Credentials::resolve(Some("root"), None).unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        let by_number = Credentials::resolve(Some("0"), Some("0")).unwrap().unwrap();
        assert_eq!((by_number.uid, by_number.gid), (0, 0));
        let e = Credentials::resolve(Some("no-such-user-here"), None).unwrap_err();
        assert!(e.contains("no user named `no-such-user-here`"), "{e}");
        let e = Credentials::resolve(Some("root"), Some("no-such-group-here")).unwrap_err();
        assert!(e.contains("no group named"), "{e}");
        let e = Credentials::resolve(Some("4000000"), None).unwrap_err();
        assert!(e.contains("set isolation.group"), "{e}");
        let numeric = Credentials::resolve(Some("4000000"), Some("4000000"))
            .unwrap()
            .unwrap();
        assert_eq!(numeric.groups, vec![4_000_000]);
    }

    #[test]
    fn a_failed_step_is_explained() {
        let setup = ChildSetup {
            rlimits: vec![Rlimit {
                resource: super::super::rlimits::Resource::Nofile,
                soft: 64,
                hard: 64,
            }],
            ..ChildSetup::default()
        };
        let (pre, report) = PreExec::new(setup, None).unwrap();
        // SAFETY: sets errno of this thread, then records a step the way the
        // child would.
        unsafe { *libc::__errno_location() = libc::EPERM };
        let err = pre.fail(Step::Rlimit, 0);
        let text = report.explain(err).to_string();
        assert!(text.starts_with("setting RLIMIT_NOFILE to 64: "), "{text}");
        assert!(text.contains("Operation not permitted"), "{text}");
        // Nothing reported: the error passes unchanged.
        let plain = report.explain(io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(plain.raw_os_error(), Some(libc::ENOENT));
    }
}
