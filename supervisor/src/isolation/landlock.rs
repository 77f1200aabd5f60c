//! A filesystem view per plugin, enforced with Landlock.
//!
//! `isolation.filesystem` chooses the view ([`FilesystemSpec`]):
//! - `host` (the default): no restriction beyond the plugin's uid;
//! - `read-only`: the whole host stays readable and executable, and nothing
//!   is writable but the plugin's own socket directory, a private tmp
//!   inside it (given as `TMPDIR`), the paths listed in `writable`, and
//!   `/dev/null`, `/dev/zero`, `/dev/full`.
//!
//! How: before fork, the parent creates a ruleset that handles every
//! filesystem right of the best Landlock ABI the kernel offers (read once at
//! start-up by [`probe`]), opens each allowed path with `O_PATH|O_CLOEXEC`
//! and adds a rule for it ([`Ruleset::allow`]). The child calls
//! `landlock_restrict_self` on that descriptor after `no_new_privs` (which
//! the kernel requires, short of CAP_SYS_ADMIN) and before the seccomp
//! filter ([`restrict_self`]): one raw system call, async-signal-safe. The
//! restriction holds for the plugin and every descendant, and cannot be
//! lifted.
//!
//! Raw system calls rather than the `landlock` crate: three calls and two
//! structs, and the one made between fork and exec must not allocate, which
//! the crate's `RulesetCreated::restrict_self` does not promise.
//!
//! What a handled right means per ABI: 1 has the 13 basic rights, and
//! always denies linking or renaming a file into another directory; 2 adds
//! `REFER` (such moves within the writable paths work); 3 adds `TRUNCATE`;
//! 5 adds `IOCTL_DEV`. Descriptors opened before the restriction (stdin
//! `/dev/null`, the pipes to the supervisor) keep working.

use serde::Deserialize;
use serde::de::{self, Deserializer, IntoDeserializer, MapAccess, Visitor};
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `LANDLOCK_CREATE_RULESET_VERSION`: ask for the ABI instead of a ruleset.
const CREATE_RULESET_VERSION: u32 = 1 << 0;
/// `LANDLOCK_RULE_PATH_BENEATH`.
const RULE_PATH_BENEATH: libc::c_int = 1;

/// `LANDLOCK_ACCESS_FS_*`.
pub mod access {
    pub const EXECUTE: u64 = 1 << 0;
    pub const WRITE_FILE: u64 = 1 << 1;
    pub const READ_FILE: u64 = 1 << 2;
    pub const READ_DIR: u64 = 1 << 3;
    pub const REMOVE_DIR: u64 = 1 << 4;
    pub const REMOVE_FILE: u64 = 1 << 5;
    pub const MAKE_CHAR: u64 = 1 << 6;
    pub const MAKE_DIR: u64 = 1 << 7;
    pub const MAKE_REG: u64 = 1 << 8;
    pub const MAKE_SOCK: u64 = 1 << 9;
    pub const MAKE_FIFO: u64 = 1 << 10;
    pub const MAKE_BLOCK: u64 = 1 << 11;
    pub const MAKE_SYM: u64 = 1 << 12;
    /// ABI 2.
    pub const REFER: u64 = 1 << 13;
    /// ABI 3.
    pub const TRUNCATE: u64 = 1 << 14;
    /// ABI 5.
    pub const IOCTL_DEV: u64 = 1 << 15;
    /// The rights that apply to a file (rather than to a directory's
    /// entries): a rule on a file may grant only these.
    pub const FILE: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;
    /// Reading and executing.
    pub const READ: u64 = EXECUTE | READ_FILE | READ_DIR;
}

/// Every filesystem right Landlock ABI `abi` handles.
pub fn fs_rights(abi: u32) -> u64 {
    match abi {
        0 => 0,
        1 => access::REFER - 1,
        2 => access::TRUNCATE - 1,
        3 | 4 => access::IOCTL_DEV - 1,
        _ => (access::IOCTL_DEV << 1) - 1,
    }
}

/// The Landlock ABI this kernel offers, or why there is none.
pub fn probe() -> Result<u32, String> {
    // SAFETY: with the VERSION flag and no attribute, the call only returns
    // the ABI version; it creates nothing.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if abi >= 1 {
        return Ok(abi as u32);
    }
    let e = io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::ENOSYS) => format!(
            "this kernel has no Landlock (landlock_create_ruleset: {e}); it needs Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK"
        ),
        Some(libc::EOPNOTSUPP) => format!(
            "Landlock is built into this kernel but not enabled (landlock_create_ruleset: {e}); add `landlock` to the kernel's `lsm=` boot parameter"
        ),
        _ => format!("Landlock cannot be used here (landlock_create_ruleset: {e})"),
    })
}

/// `isolation.filesystem.view`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum View {
    /// The host's filesystem, as the plugin's uid sees it.
    #[default]
    Host,
    /// Everything readable, nothing writable but the plugin's own paths.
    ReadOnly,
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            View::Host => "host",
            View::ReadOnly => "read-only",
        })
    }
}

/// `isolation.filesystem`: `host`, `read-only`, or
/// `{view, writable, best_effort}` (the mapping's view defaults to
/// `read-only`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FilesystemSpec {
    pub view: View,
    /// Paths (directories or files) the plugin may write beneath, beyond
    /// its own. Relative paths are resolved against the manifest's
    /// directory when the manifest is read.
    pub writable: Vec<PathBuf>,
    /// Start without the view where Landlock is unavailable (reported),
    /// instead of refusing the start.
    pub best_effort: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FullSpec {
    #[serde(default = "read_only")]
    view: View,
    #[serde(default)]
    writable: Vec<PathBuf>,
    #[serde(default)]
    best_effort: bool,
}

fn read_only() -> View {
    View::ReadOnly
}

impl<'de> Deserialize<'de> for FilesystemSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SpecVisitor;
        impl<'de> Visitor<'de> for SpecVisitor {
            type Value = FilesystemSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "`host`, `read-only`, or a mapping with `view`, `writable`, `best_effort`",
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FilesystemSpec, E> {
                Ok(FilesystemSpec {
                    view: View::deserialize(s.into_deserializer())?,
                    ..FilesystemSpec::default()
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FilesystemSpec, A::Error> {
                // Keeps `deny_unknown_fields`'s "unknown field `x`" message.
                let f = FullSpec::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(FilesystemSpec {
                    view: f.view,
                    writable: f.writable,
                    best_effort: f.best_effort,
                })
            }
        }
        d.deserialize_any(SpecVisitor)
    }
}

impl FilesystemSpec {
    /// Whether a view is asked for at all.
    pub fn restricts(&self) -> bool {
        self.view != View::Host
    }

    /// Checks the spec; `Err` is `(field under isolation.filesystem, message)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.view == View::Host && !self.writable.is_empty() {
            return Err((
                "writable",
                "only applies to `view: read-only`; the host view restricts nothing".into(),
            ));
        }
        for p in &self.writable {
            if p.as_os_str().is_empty() || p.as_os_str().as_bytes().contains(&0) {
                return Err(("writable", format!("`{}` is not a path", p.display())));
            }
        }
        Ok(())
    }

    /// Resolves relative `writable` paths against `dir` (the manifest's).
    pub fn resolve_against(&mut self, dir: &Path) {
        for p in &mut self.writable {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
}

/// Device files any view leaves writable: writing to them reaches no file.
pub const DEVICES: [&str; 3] = ["/dev/null", "/dev/zero", "/dev/full"];

/// A ruleset being built before fork. Its descriptor is close-on-exec.
#[derive(Debug)]
pub struct Ruleset {
    fd: OwnedFd,
    /// The rights it handles: those not granted by a rule are denied.
    handled: u64,
    abi: u32,
}

impl Ruleset {
    /// A ruleset handling every filesystem right of `abi`.
    pub fn new(abi: u32) -> io::Result<Ruleset> {
        let handled = fs_rights(abi);
        // `struct landlock_ruleset_attr`'s first field; the kernel takes a
        // prefix of the struct (the net and scope fields stay unhandled).
        let attr: u64 = handled;
        // SAFETY: the kernel reads `size_of::<u64>()` bytes from `attr`,
        // which lives across the call, and returns a new descriptor.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const u64,
                std::mem::size_of::<u64>(),
                0u32,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot create a Landlock ruleset (ABI {abi}): {e}"),
            ));
        }
        Ok(Ruleset {
            // SAFETY: just returned by the kernel; owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            handled,
            abi,
        })
    }

    pub fn abi(&self) -> u32 {
        self.abi
    }

    /// Grants `rights` beneath `path` (a directory), or on it (a file: only
    /// the file rights of `rights` apply). Follows symbolic links.
    pub fn allow(&mut self, path: &Path, rights: u64) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: open(2) on a NUL-terminated path; the result is checked.
        let raw = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just opened, owned by nobody else.
        let dir = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `stat` is plain data, for which all zeroes is valid.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on a descriptor we own, into a struct on the stack.
        if unsafe { libc::fstat(dir.as_raw_fd(), &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let mut allowed = rights & self.handled;
        if !is_dir {
            allowed &= access::FILE;
        }
        self.add(&dir, allowed)
    }

    fn add(&mut self, parent: &OwnedFd, allowed: u64) -> io::Result<()> {
        /// `struct landlock_path_beneath_attr`, packed as the kernel's.
        #[repr(C, packed)]
        struct PathBeneath {
            allowed_access: u64,
            parent_fd: i32,
        }
        let attr = PathBeneath {
            allowed_access: allowed,
            parent_fd: parent.as_raw_fd(),
        };
        // SAFETY: the kernel reads the attribute, which lives across the
        // call, and takes its own reference to `parent`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.fd.as_raw_fd(),
                RULE_PATH_BENEATH,
                &attr as *const PathBeneath,
                0u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Hands the descriptor to the child.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

/// Puts the calling thread (and what it executes) under the ruleset behind
/// `fd`. Returns whether it did (errno says why not).
///
/// # Safety
///
/// Call in a freshly forked child, after `no_new_privs` (or with
/// CAP_SYS_ADMIN). Async-signal-safe: one raw system call.
pub unsafe fn restrict_self(fd: &OwnedFd) -> bool {
    // SAFETY: landlock_restrict_self on a descriptor we own, no flags.
    let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0u32) };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<FilesystemSpec, String> {
        serde_yaml::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn a_name_or_a_mapping_chooses_the_view() {
        assert_eq!(parse("host").unwrap(), FilesystemSpec::default());
        assert_eq!(parse("read-only").unwrap().view, View::ReadOnly);
        let full = parse("{writable: [data, /srv/x], best_effort: true}").unwrap();
        assert_eq!(full.view, View::ReadOnly, "a mapping means a view");
        assert_eq!(full.writable, [PathBuf::from("data"), "/srv/x".into()]);
        assert!(full.best_effort);
        assert_eq!(parse("{view: host}").unwrap().view, View::Host);
    }

    #[test]
    fn unknown_views_and_keys_are_named() {
        let e = parse("readonly").unwrap_err();
        assert!(e.contains("unknown variant `readonly`"), "{e}");
        let e = parse("{writeable: [/tmp]}").unwrap_err();
        assert!(e.contains("unknown field `writeable`"), "{e}");
        let e = parse("{view: read-only, readable: [/]}").unwrap_err();
        assert!(e.contains("unknown field `readable`"), "{e}");
    }

    #[test]
    fn writable_paths_need_a_view_and_resolve_against_the_manifest() {
        let mut spec = parse("{view: host, writable: [/x]}").unwrap();
        assert_eq!(spec.validate().unwrap_err().0, "writable");
        spec = parse("{writable: [data, /abs]}").unwrap();
        spec.validate().unwrap();
        spec.resolve_against(Path::new("/plugins/echo"));
        assert_eq!(
            spec.writable,
            [PathBuf::from("/plugins/echo/data"), "/abs".into()]
        );
    }

    #[test]
    fn each_abi_handles_more_rights() {
        assert_eq!(fs_rights(1).count_ones(), 13);
        assert_eq!(fs_rights(2), fs_rights(1) | access::REFER);
        assert_eq!(fs_rights(3), fs_rights(2) | access::TRUNCATE);
        assert_eq!(fs_rights(4), fs_rights(3));
        assert_eq!(fs_rights(7), fs_rights(3) | access::IOCTL_DEV);
    }

    #[test]
    fn a_restricted_child_cannot_write_outside_its_rules() {
        let abi = match probe() {
            Ok(abi) => abi,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let allowed = tempfile::tempdir().unwrap();
        let denied = tempfile::tempdir().unwrap();
        let mut rs = Ruleset::new(abi).unwrap();
        rs.allow(Path::new("/"), access::READ).unwrap();
        rs.allow(allowed.path(), fs_rights(abi)).unwrap();
        rs.allow(Path::new("/dev/null"), fs_rights(abi)).unwrap();
        let fd = rs.into_fd();
        let in_allowed = CString::new(allowed.path().join("f").as_os_str().as_bytes()).unwrap();
        let in_denied = CString::new(denied.path().join("f").as_os_str().as_bytes()).unwrap();
        // A forked child, so the restriction does not reach the test
        // process; it makes raw system calls only, then _exits.
        // SAFETY: fork in a test; the child allocates nothing.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let create = |p: &CString| {
                // SAFETY: open(2) on a NUL-terminated path.
                unsafe { libc::open(p.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600) }
            };
            // SAFETY: raw system calls in the forked child.
            let code = unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || !restrict_self(&fd) {
                    1
                } else if create(&in_allowed) < 0 {
                    2
                } else if create(&in_denied) >= 0 || *libc::__errno_location() != libc::EACCES {
                    3
                } else if libc::open(c"/".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) < 0 {
                    4
                } else {
                    0
                }
            };
            // SAFETY: ends the child without running the test harness's exit.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "{status}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "step that failed");
        assert!(allowed.path().join("f").exists());
        assert!(!denied.path().join("f").exists());
    }
}
