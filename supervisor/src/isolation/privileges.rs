//! Who a plugin runs as and which capabilities it keeps: least privilege by
//! default, like systemd's `DynamicUser=yes`.
//!
//! - Under a supervisor that may change users (root: `CAP_SETUID` and
//!   `CAP_SETGID`), each plugin runs as its own unprivileged uid, with the
//!   same number as its gid, from [`DynamicUsers`]: derived from the plugin's
//!   name (FNV-1a into the range), probing past uids that the user or group
//!   database knows and past uids this supervisor gave another plugin. It is
//!   not persisted: the same name gets the same uid on every start unless a
//!   collision moved it. The manifest's `isolation.user` (or the supervisor
//!   config's `isolation.user`) picks a named user instead; `user: root` is
//!   the only way to run as root, and `inspect` says so.
//! - Capabilities: none. The bounding, permitted, effective, inheritable and
//!   ambient sets are emptied before exec, except for the capabilities the
//!   manifest names (`isolation.capabilities`), which are kept in all five
//!   so a non-root uid still holds them after exec.
//! - A supervisor that is not root runs plugins as itself, says so once at
//!   start-up, and lists what it could not apply in `inspect`.
//!
//! The child's part ([`CapsPlan::apply_before_setuid`],
//! [`CapsPlan::apply_after_setuid`]) makes raw system calls only, on data
//! computed before fork.

use std::collections::BTreeMap;
use std::path::Path;

/// Capability names by number (`capabilities(7)`), up to Linux 6.x's 40.
pub const CAP_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// `CAP_SETPCAP`: dropping capabilities from the bounding set.
pub const CAP_SETPCAP: u32 = 8;

/// The capability called `name` (`CAP_NET_BIND_SERVICE`, case-insensitive,
/// the `CAP_` prefix optional).
pub fn capability(name: &str) -> Option<u32> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    CAP_NAMES.iter().position(|n| *n == full).map(|i| i as u32)
}

/// Checks `isolation.capabilities`: known names, or `ALL`. The message
/// names the bad entry.
pub fn validate_capabilities(names: &[String]) -> Result<(), String> {
    for name in names {
        if !name.eq_ignore_ascii_case("ALL") && capability(name).is_none() {
            return Err(format!(
                "`{name}` is not a capability; expected names such as CAP_NET_BIND_SERVICE or CAP_NET_RAW (see capabilities(7)), or ALL"
            ));
        }
    }
    Ok(())
}

/// The set of capabilities `names` asks for, up to `last_cap`.
pub fn mask_of(names: &[String], last_cap: u32) -> u64 {
    names.iter().fold(0u64, |mask, name| {
        if name.eq_ignore_ascii_case("ALL") {
            mask | all_caps(last_cap)
        } else {
            match capability(name) {
                Some(c) if c <= last_cap => mask | (1 << c),
                _ => mask,
            }
        }
    })
}

fn all_caps(last_cap: u32) -> u64 {
    if last_cap >= 63 {
        u64::MAX
    } else {
        (1u64 << (last_cap + 1)) - 1
    }
}

/// The names of the capabilities in `mask`.
pub fn names_of(mask: u64) -> Vec<String> {
    (0..64u32)
        .filter(|c| mask & (1 << c) != 0)
        .map(|c| {
            CAP_NAMES
                .get(c as usize)
                .map(|n| n.to_string())
                .unwrap_or_else(|| format!("CAP_{c}"))
        })
        .collect()
}

/// The highest capability this kernel knows, from
/// `<proc>/sys/kernel/cap_last_cap` (40 on kernels that lack the file
/// cannot be assumed, so the table's last is the fallback).
pub fn last_cap(proc_root: &Path) -> u32 {
    std::fs::read_to_string(proc_root.join("sys/kernel/cap_last_cap"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|c: &u32| *c < 64)
        .unwrap_or(CAP_NAMES.len() as u32 - 1)
}

/// This process's effective capabilities.
pub fn effective_caps() -> u64 {
    (0..64u32)
        .filter(|c| super::capable(*c))
        .fold(0, |m, c| m | (1 << c))
}

/// `isolation.dynamic_users` in the supervisor config: the uids (and gids of
/// the same number) plugins get. The default is systemd's DynamicUser range,
/// above Debian's normal users (1000–59999) and below `nobody` (65534 is in
/// it but skipped: it has a passwd entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicUsers {
    pub first: u32,
    pub last: u32,
}

impl Default for DynamicUsers {
    fn default() -> Self {
        DynamicUsers {
            first: 61184,
            last: 65519,
        }
    }
}

impl DynamicUsers {
    /// Checks the range: not empty, not root, not beyond 32-bit ids.
    pub fn validate(&self) -> Result<(), String> {
        if self.first == 0 || self.first > self.last || self.last >= u32::MAX - 1 {
            return Err(format!(
                "{}..{} is not a range of unprivileged ids; expected 0 < first <= last < 4294967294, such as 61184..65519",
                self.first, self.last
            ));
        }
        Ok(())
    }
}

/// Hands out dynamic uids: one per plugin name, for the supervisor's life.
#[derive(Debug, Default)]
pub struct Allocator {
    by_name: BTreeMap<String, u32>,
}

impl Allocator {
    /// The uid of plugin `name`: its earlier one, or the first free uid from
    /// the name's hash onwards. `taken` says whether the system already uses
    /// a uid (the user or group database knows it). Blocks on NSS through
    /// `taken`: call it off the runtime.
    pub fn uid_for(
        &mut self,
        name: &str,
        range: DynamicUsers,
        taken: impl Fn(u32) -> bool,
    ) -> Result<u32, String> {
        if let Some(uid) = self.by_name.get(name) {
            return Ok(*uid);
        }
        let size = u64::from(range.last - range.first) + 1;
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let ours: std::collections::HashSet<u32> = self.by_name.values().copied().collect();
        for probe in 0..size {
            let uid = range.first + ((hash + probe) % size) as u32;
            if !ours.contains(&uid) && !taken(uid) {
                self.by_name.insert(name.to_string(), uid);
                return Ok(uid);
            }
        }
        Err(format!(
            "no free uid left in isolation.dynamic_users {}..{} of the supervisor config; widen the range",
            range.first, range.last
        ))
    }

    /// The uid plugin `name` was given, if it has started.
    pub fn get(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }
}

/// Whether the user or group database knows `id` (so a dynamic user must
/// not take it).
pub fn id_in_use(id: u32) -> bool {
    use nix::unistd::{Gid, Group, Uid, User};
    !matches!(User::from_uid(Uid::from_raw(id)), Ok(None))
        || !matches!(Group::from_gid(Gid::from_raw(id)), Ok(None))
}

/// Where a plugin's identity came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// Allocated from `isolation.dynamic_users`.
    Dynamic,
    /// The manifest's `isolation.user` / `isolation.group`.
    Manifest,
    /// The supervisor config's `isolation.user`.
    Config,
    /// The supervisor's own: it cannot change users.
    Supervisor,
}

impl std::fmt::Display for IdentitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IdentitySource::Dynamic => "dynamic",
            IdentitySource::Manifest => "manifest isolation.user",
            IdentitySource::Config => "supervisor config isolation.user",
            IdentitySource::Supervisor => "the supervisor's own (it is not root)",
        })
    }
}

/// What a plugin runs as and holds, as resolved for its last start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub uid: u32,
    pub gid: u32,
    pub source: IdentitySource,
    /// Capabilities kept across exec.
    pub capabilities: u64,
    pub no_new_privs: bool,
    /// What could not be applied, and why.
    pub degraded: Vec<String>,
}

/// The capability changes a child makes, computed before fork.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapsPlan {
    /// The capabilities kept in every set.
    pub keep: u64,
    /// The kernel's last capability: the bounding set is emptied up to it.
    pub last_cap: u32,
    /// The supervisor may drop from the bounding set (`CAP_SETPCAP`).
    pub drop_bounding: bool,
    /// The child changes its uid: `keep` must survive `setresuid`.
    pub changes_uid: bool,
}

/// A step of [`CapsPlan`] that failed, for the report pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapsStep {
    Bounding,
    KeepCaps,
    Capset,
    Ambient,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

impl CapsPlan {
    /// While still root, before the credentials change: empties the
    /// bounding set but for `keep`, and keeps the permitted set across
    /// `setresuid` when there is something to keep. Returns the failed step
    /// and the capability it was at.
    ///
    /// # Safety
    ///
    /// Call only in a freshly forked child: raw system calls only.
    pub unsafe fn apply_before_setuid(&self) -> Result<(), (CapsStep, u32)> {
        // SAFETY: prctl with integer arguments only.
        unsafe {
            if self.drop_bounding {
                for cap in 0..=self.last_cap {
                    if self.keep & (1 << cap) == 0
                        && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
                    {
                        return Err((CapsStep::Bounding, cap));
                    }
                }
            }
            if self.keep != 0
                && self.changes_uid
                && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0
            {
                return Err((CapsStep::KeepCaps, 0));
            }
        }
        Ok(())
    }

    /// After the credentials change: permitted, effective and inheritable
    /// become `keep` (lowering is always allowed), the ambient set is
    /// cleared, then `keep` is raised in it so that it survives exec for a
    /// non-root uid.
    ///
    /// # Safety
    ///
    /// Call only in a freshly forked child: raw system calls only, on stack
    /// data.
    pub unsafe fn apply_after_setuid(&self) -> Result<(), (CapsStep, u32)> {
        let low = self.keep as u32;
        let high = (self.keep >> 32) as u32;
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [
            CapData {
                effective: low,
                permitted: low,
                inheritable: low,
            },
            CapData {
                effective: high,
                permitted: high,
                inheritable: high,
            },
        ];
        // SAFETY: capset with a version-3 header for this process and the
        // two data structs version 3 reads; prctl with integers.
        unsafe {
            if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) < 0 {
                return Err((CapsStep::Capset, 0));
            }
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) < 0
            {
                return Err((CapsStep::Ambient, 0));
            }
            for cap in 0..=self.last_cap {
                if self.keep & (1 << cap) != 0
                    && libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE,
                        cap as libc::c_ulong,
                        0,
                        0,
                    ) < 0
                {
                    return Err((CapsStep::Ambient, cap));
                }
            }
        }
        Ok(())
    }
}

/// Whether a process running as `uid` with groups `gids` may reach `path`
/// (search every ancestor) and use it as `want` (`0o4` read, `0o1`
/// execute, or both): the error names the first place that stops it.
pub fn reachable(path: &Path, uid: u32, gids: &[u32], want: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if uid == 0 {
        return Ok(());
    }
    let allowed = |meta: &std::fs::Metadata, bits: u32| {
        let shift = if meta.uid() == uid {
            6
        } else if gids.contains(&meta.gid()) {
            3
        } else {
            0
        };
        (meta.mode() >> shift) & bits == bits
    };
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    for dir in ancestors {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let meta =
            std::fs::metadata(dir).map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
        if !allowed(&meta, 0o1) {
            return Err(format!(
                "{} is mode {:04o} (owner {}, group {}), which uid {uid} cannot search",
                dir.display(),
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid()
            ));
        }
    }
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if !allowed(&meta, want) {
        return Err(format!(
            "{} is mode {:04o} (owner {}, group {}), which uid {uid} cannot {}",
            path.display(),
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            match want {
                0o5 => "read and execute",
                0o4 => "read",
                _ => "execute",
            }
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_parse_and_unknown_ones_are_refused() {
        assert_eq!(capability("CAP_NET_BIND_SERVICE"), Some(10));
        assert_eq!(capability("net_bind_service"), Some(10));
        assert_eq!(capability("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(capability("CAP_FLY"), None);
        let e = validate_capabilities(&["CAP_NET_RAW".into(), "CAP_FLY".into()]).unwrap_err();
        assert!(e.contains("`CAP_FLY` is not a capability"), "{e}");
        assert!(validate_capabilities(&["all".into()]).is_ok());
        assert_eq!(mask_of(&["CAP_NET_BIND_SERVICE".into()], 40), 1 << 10);
        assert_eq!(mask_of(&["ALL".into()], 40), (1 << 41) - 1);
        // A capability this kernel does not know is not kept.
        assert_eq!(mask_of(&["CAP_BPF".into()], 38), 0);
        assert_eq!(
            names_of(1 << 10 | 1 << 13),
            ["CAP_NET_BIND_SERVICE", "CAP_NET_RAW"]
        );
    }

    #[test]
    fn dynamic_uids_are_stable_per_name_and_never_shared() {
        let range = DynamicUsers {
            first: 100,
            last: 103,
        };
        let mut a = Allocator::default();
        let echo = a.uid_for("echo", range, |_| false).unwrap();
        assert!((100..=103).contains(&echo));
        assert_eq!(a.uid_for("echo", range, |_| false).unwrap(), echo);
        // A fresh allocator (a restart) derives the same uid.
        assert_eq!(
            Allocator::default()
                .uid_for("echo", range, |_| false)
                .unwrap(),
            echo
        );
        // Taken by the system: probed past.
        let mut b = Allocator::default();
        let moved = b.uid_for("echo", range, |u| u == echo).unwrap();
        assert_ne!(moved, echo);
        // Four names fill four uids; the fifth is refused with the range named.
        let mut c = Allocator::default();
        let mut seen = std::collections::HashSet::new();
        for name in ["a", "b", "c", "d"] {
            assert!(seen.insert(c.uid_for(name, range, |_| false).unwrap()));
        }
        let e = c.uid_for("e", range, |_| false).unwrap_err();
        assert!(e.contains("100..103"), "{e}");
        assert!(DynamicUsers::default().validate().is_ok());
        assert!(DynamicUsers { first: 0, last: 10 }.validate().is_err());
        assert!(DynamicUsers { first: 10, last: 9 }.validate().is_err());
    }

    #[test]
    fn reachability_names_the_directory_that_stops_a_uid() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        let file = closed.join("plugin");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let other = if me == 61999 { 61998 } else { 61999 };
        let e = reachable(&file, other, &[other], 0o5).unwrap_err();
        assert!(
            e.contains(&closed.display().to_string()) && e.contains("0700"),
            "{e}"
        );
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert!(reachable(&file, other, &[other], 0o5).is_ok());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = reachable(&file, other, &[other], 0o1).unwrap_err();
        assert!(e.contains("cannot execute"), "{e}");
    }
}
