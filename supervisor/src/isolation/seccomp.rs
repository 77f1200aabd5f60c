//! The default seccomp filter: a deny list, in the spirit of Docker's default
//! profile and systemd's `@system-service`, of the system calls an ordinary
//! service never needs and an attacker who took over a plugin would want.
//!
//! Why each group is denied:
//!
//! | group | system calls | why |
//! | --- | --- | --- |
//! | `@mount` | mount, umount2, pivot_root, chroot, the new mount API (fsopen, fsconfig, fsmount, fspick, move_mount, open_tree, mount_setattr) | rearranging the filesystem view is how containers are escaped |
//! | `@module` | init_module, finit_module, delete_module | loading code into the kernel |
//! | `@debug` | ptrace, process_vm_readv/writev, kcmp, perf_event_open, lookup_dcookie | reading and writing other processes' memory; perf is a long-running source of kernel bugs and side channels |
//! | `@raw-io` | iopl, ioperm (x86 only) | direct port I/O |
//! | `@clock` | settimeofday, clock_settime, adjtimex, clock_adjtime | the host's clock is not a plugin's to set |
//! | `@reboot` | reboot, kexec_load, kexec_file_load | rebooting or replacing the kernel |
//! | `@swap` | swapon, swapoff | host memory configuration |
//! | `@keyring` | keyctl, add_key, request_key | the kernel keyring is not namespaced: keys leak between tenants |
//! | `@privileged-ns` | unshare, setns, clone with a `CLONE_NEW*` flag; clone3 answers ENOSYS | new user namespaces hand an unprivileged process root-only kernel surface (most kernel LPEs of recent years start there) |
//! | `@bpf` | bpf | loading programs into the kernel |
//! | `@handles` | open_by_handle_at, name_to_handle_at | opening files by handle bypasses the path walk (the "shocker" escape) |
//! | `@quota` | quotactl, quotactl_fd | host filesystem configuration |
//! | `@acct` | acct | host process accounting |
//! | `@personality` | personality, except the harmless personas (0, UNAME26, READ_IMPLIES_EXEC off, query) | turning off address-space randomisation, READ_IMPLIES_EXEC |
//! | `@userfaultfd` | userfaultfd | stalls kernel threads at will: the classic race widener for exploits |
//! | `@io-uring` | io_uring_setup, io_uring_enter, io_uring_register | a second system-call interface that seccomp cannot see into |
//! | `@syslog` | syslog | reading the kernel log leaks kernel addresses |
//!
//! clone3 passes its flags in memory, which a BPF filter cannot read, so
//! while `@privileged-ns` is denied it fails with ENOSYS, as under Docker:
//! the C libraries and language runtimes then fall back to clone, whose
//! flags are checked. (A plain EPERM would be taken as a real refusal.)
//!
//! A blocked call fails with EPERM (`action: errno`), or kills the process
//! with SIGSYS (`action: kill`), which the exit reason then calls a seccomp
//! kill. The filter is compiled for the running architecture before fork
//! ([`compile`]), and installed by the child after `no_new_privs`, just
//! before exec, with the raw `seccomp(2)` call ([`Installed::install`]): no
//! allocation between fork and exec.
//!
//! Architectures: the table below has each system call's number on x86_64
//! and on aarch64 (the asm-generic numbers), and seccompiler emits the
//! architecture check, so a filter compiled for one refuses to run on the
//! other. The unit tests compile every group for both; the x86_64 numbers
//! are checked against `libc::SYS_*` on x86_64 and the aarch64 numbers on
//! aarch64 hosts. A system call an architecture lacks (iopl there) is
//! simply not part of its filter.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What a blocked system call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BlockAction {
    /// Fails with EPERM: the plugin sees an ordinary refusal.
    #[default]
    Errno,
    /// Kills the whole process with SIGSYS.
    Kill,
}

/// Which list a filter starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Every group in [`GROUPS`].
    #[default]
    Default,
    /// Nothing but what `deny` names.
    Unconfined,
}

/// `isolation.seccomp`: `default`, `unconfined`, or
/// `{profile, action, allow, deny}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawSpec")]
pub struct SeccompSpec {
    pub profile: Profile,
    pub action: BlockAction,
    /// Groups (`@mount`) or system calls taken off the profile's list.
    pub allow: Vec<String>,
    /// Groups or system calls added to it.
    pub deny: Vec<String>,
}

impl Default for SeccompSpec {
    fn default() -> Self {
        SeccompSpec {
            profile: Profile::Default,
            action: BlockAction::Errno,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSpec {
    Name(Profile),
    Full(FullSpec),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FullSpec {
    #[serde(default)]
    profile: Profile,
    #[serde(default)]
    action: BlockAction,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

impl TryFrom<RawSpec> for SeccompSpec {
    type Error = String;
    fn try_from(raw: RawSpec) -> Result<Self, String> {
        let spec = match raw {
            RawSpec::Name(profile) => SeccompSpec {
                profile,
                ..SeccompSpec::default()
            },
            RawSpec::Full(f) => SeccompSpec {
                profile: f.profile,
                action: f.action,
                allow: f.allow,
                deny: f.deny,
            },
        };
        for (field, names) in [("allow", &spec.allow), ("deny", &spec.deny)] {
            for name in names {
                expand(name).map_err(|e| format!("isolation.seccomp.{field}: {e}"))?;
            }
        }
        Ok(spec)
    }
}

impl SeccompSpec {
    /// No filter at all.
    pub fn is_unconfined(&self) -> bool {
        self.profile == Profile::Unconfined && self.deny.is_empty()
    }

    /// The system calls this spec blocks, by name, sorted.
    pub fn denied(&self) -> BTreeSet<&'static str> {
        let mut set = BTreeSet::new();
        if self.profile == Profile::Default {
            for (_, members) in GROUPS {
                set.extend(members.iter().copied());
            }
        }
        // Names were checked when the manifest was read.
        for name in &self.deny {
            set.extend(expand(name).unwrap_or_default());
        }
        for name in &self.allow {
            for s in expand(name).unwrap_or_default() {
                set.remove(s);
            }
        }
        set
    }

    /// For `inspect`: `seccomp default (EPERM)`, `seccomp unconfined`,
    /// `seccomp default, allow @debug (SIGSYS)`.
    pub fn describe(&self) -> String {
        if self.is_unconfined() {
            return "seccomp unconfined".into();
        }
        let mut s = format!(
            "seccomp {}",
            match self.profile {
                Profile::Default => "default",
                Profile::Unconfined => "unconfined",
            }
        );
        if !self.allow.is_empty() {
            s.push_str(&format!(", allow {}", self.allow.join(" ")));
        }
        if !self.deny.is_empty() {
            s.push_str(&format!(", deny {}", self.deny.join(" ")));
        }
        s.push_str(match self.action {
            BlockAction::Errno => " (blocked calls fail with EPERM)",
            BlockAction::Kill => " (blocked calls kill with SIGSYS)",
        });
        s
    }
}

/// The groups of the default profile, and their members.
pub const GROUPS: &[(&str, &[&str])] = &[
    (
        "@mount",
        &[
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
        ],
    ),
    ("@module", &["init_module", "finit_module", "delete_module"]),
    (
        "@debug",
        &[
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kcmp",
            "perf_event_open",
            "lookup_dcookie",
        ],
    ),
    ("@raw-io", &["iopl", "ioperm"]),
    (
        "@clock",
        &["settimeofday", "clock_settime", "adjtimex", "clock_adjtime"],
    ),
    ("@reboot", &["reboot", "kexec_load", "kexec_file_load"]),
    ("@swap", &["swapon", "swapoff"]),
    ("@keyring", &["keyctl", "add_key", "request_key"]),
    ("@privileged-ns", &["unshare", "setns", "clone", "clone3"]),
    ("@bpf", &["bpf"]),
    ("@handles", &["open_by_handle_at", "name_to_handle_at"]),
    ("@quota", &["quotactl", "quotactl_fd"]),
    ("@acct", &["acct"]),
    ("@personality", &["personality"]),
    ("@userfaultfd", &["userfaultfd"]),
    (
        "@io-uring",
        &["io_uring_setup", "io_uring_enter", "io_uring_register"],
    ),
    ("@syslog", &["syslog"]),
];

/// Every system call a spec may name: (name, x86_64 number, aarch64 number).
/// `None` where the architecture has no such call.
const SYSCALLS: &[(&str, Option<i64>, Option<i64>)] = &[
    ("mount", Some(165), Some(40)),
    ("umount2", Some(166), Some(39)),
    ("pivot_root", Some(155), Some(41)),
    ("chroot", Some(161), Some(51)),
    ("fsopen", Some(430), Some(430)),
    ("fsconfig", Some(431), Some(431)),
    ("fsmount", Some(432), Some(432)),
    ("fspick", Some(433), Some(433)),
    ("move_mount", Some(429), Some(429)),
    ("open_tree", Some(428), Some(428)),
    ("mount_setattr", Some(442), Some(442)),
    ("init_module", Some(175), Some(105)),
    ("finit_module", Some(313), Some(273)),
    ("delete_module", Some(176), Some(106)),
    ("ptrace", Some(101), Some(117)),
    ("process_vm_readv", Some(310), Some(270)),
    ("process_vm_writev", Some(311), Some(271)),
    ("kcmp", Some(312), Some(272)),
    ("perf_event_open", Some(298), Some(241)),
    ("lookup_dcookie", Some(212), Some(18)),
    ("iopl", Some(172), None),
    ("ioperm", Some(173), None),
    ("settimeofday", Some(164), Some(170)),
    ("clock_settime", Some(227), Some(112)),
    ("adjtimex", Some(159), Some(171)),
    ("clock_adjtime", Some(305), Some(266)),
    ("reboot", Some(169), Some(142)),
    ("kexec_load", Some(246), Some(104)),
    ("kexec_file_load", Some(320), Some(294)),
    ("swapon", Some(167), Some(224)),
    ("swapoff", Some(168), Some(225)),
    ("keyctl", Some(250), Some(219)),
    ("add_key", Some(248), Some(217)),
    ("request_key", Some(249), Some(218)),
    ("unshare", Some(272), Some(97)),
    ("setns", Some(308), Some(268)),
    ("clone", Some(56), Some(220)),
    ("clone3", Some(435), Some(435)),
    ("bpf", Some(321), Some(280)),
    ("open_by_handle_at", Some(304), Some(265)),
    ("name_to_handle_at", Some(303), Some(264)),
    ("quotactl", Some(179), Some(60)),
    ("quotactl_fd", Some(443), Some(443)),
    ("acct", Some(163), Some(89)),
    ("personality", Some(135), Some(92)),
    ("userfaultfd", Some(323), Some(282)),
    ("io_uring_setup", Some(425), Some(425)),
    ("io_uring_enter", Some(426), Some(426)),
    ("io_uring_register", Some(427), Some(427)),
    ("syslog", Some(103), Some(116)),
];

/// The namespace flags of clone that `@privileged-ns` refuses.
const CLONE_NEW_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// personality(2) values that stay allowed: PER_LINUX, UNAME26, PER_LINUX32,
/// PER_LINUX32 | UNAME26, and 0xffffffff (a query). The rest switch on
/// ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC and the like.
const HARMLESS_PERSONAS: [u64; 5] = [0x0, 0x20000, 0x0008, 0x20008, 0xffff_ffff];

/// A group's members, or the one system call named.
fn expand(name: &str) -> Result<Vec<&'static str>, String> {
    if name.starts_with('@') {
        return GROUPS
            .iter()
            .find(|(g, _)| *g == name)
            .map(|(_, m)| m.to_vec())
            .ok_or_else(|| {
                format!(
                    "no group `{name}`; the groups are {}",
                    GROUPS
                        .iter()
                        .map(|(g, _)| *g)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
    }
    SYSCALLS
        .iter()
        .find(|(s, _, _)| *s == name)
        .map(|(s, _, _)| vec![*s])
        .ok_or_else(|| {
            format!(
                "`{name}` is not a system call plugvisor filters; name a group, or one of {}",
                SYSCALLS
                    .iter()
                    .map(|(s, _, _)| *s)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn number(name: &str, arch: TargetArch) -> Option<i64> {
    let (_, x86, arm) = SYSCALLS.iter().find(|(s, _, _)| *s == name)?;
    match arch {
        TargetArch::x86_64 => *x86,
        TargetArch::aarch64 => *arm,
        TargetArch::riscv64 => None,
    }
}

/// The architecture this supervisor runs on, if seccompiler supports it.
pub fn host_arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|_| {
        format!(
            "seccomp filters are built for x86_64 and aarch64, not {}",
            std::env::consts::ARCH
        )
    })
}

/// Whether this kernel takes seccomp filters that kill the process (Linux
/// 4.14+ with CONFIG_SECCOMP_FILTER), asked without installing anything.
pub fn probe() -> Result<(), String> {
    host_arch()?;
    let kill: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 from a valid pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &kill as *const u32,
        )
    };
    if rc < 0 {
        return Err(format!(
            "this kernel takes no seccomp filters (seccomp(SECCOMP_GET_ACTION_AVAIL): {}); it needs Linux 4.14+ with CONFIG_SECCOMP_FILTER",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A compiled filter: one or two BPF programs, installed in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    programs: Vec<BpfProgram>,
}

impl Compiled {
    /// Instructions in all programs (for tests and logs).
    pub fn len(&self) -> usize {
        self.programs.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.programs.is_empty()
    }
}

/// Why a filter cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot compile the seccomp filter for {arch:?}: {why}")]
pub struct CompileError {
    arch: TargetArch,
    why: String,
}

/// Compiles `spec` for `arch`; `None` when it filters nothing.
pub fn compile(spec: &SeccompSpec, arch: TargetArch) -> Result<Option<Compiled>, CompileError> {
    let err = |why: String| CompileError { arch, why };
    let denied = spec.denied();
    if denied.is_empty() {
        return Ok(None);
    }
    let cond = |arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, len, op, value).map_err(|e| err(e.to_string()))
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut clone3 = None;
    for name in &denied {
        let Some(nr) = number(name, arch) else {
            continue;
        };
        let chain = match *name {
            // Only with a namespace flag: threads and plain forks stay.
            "clone" => CLONE_NEW_FLAGS
                .iter()
                .map(|flag| {
                    SeccompRule::new(vec![cond(
                        0,
                        SeccompCmpArgLen::Qword,
                        SeccompCmpOp::MaskedEq(*flag),
                        *flag,
                    )?])
                    .map_err(|e| err(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?,
            // Any persona but the harmless ones (an AND of inequalities).
            "personality" => vec![
                SeccompRule::new(
                    HARMLESS_PERSONAS
                        .iter()
                        .map(|p| cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, *p))
                        .collect::<Result<Vec<_>, _>>()?,
                )
                .map_err(|e| err(e.to_string()))?,
            ],
            // Flags in memory: answered ENOSYS by a second program.
            "clone3" => {
                clone3 = Some(nr);
                continue;
            }
            _ => Vec::new(),
        };
        rules.insert(nr, chain);
    }
    let blocked = match spec.action {
        BlockAction::Errno => SeccompAction::Errno(libc::EPERM as u32),
        BlockAction::Kill => SeccompAction::KillProcess,
    };
    let mut programs = Vec::new();
    let main = SeccompFilter::new(rules, SeccompAction::Allow, blocked, arch)
        .map_err(|e| err(e.to_string()))?;
    programs.push(BpfProgram::try_from(main).map_err(|e| err(e.to_string()))?);
    if let Some(nr) = clone3 {
        let only = SeccompFilter::new(
            BTreeMap::from([(nr, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(|e| err(e.to_string()))?;
        programs.push(BpfProgram::try_from(only).map_err(|e| err(e.to_string()))?);
    }
    Ok(Some(Compiled { programs }))
}

/// A compiled filter, ready for the child to install between fork and exec.
#[derive(Debug)]
pub struct Installed {
    compiled: Compiled,
}

impl Installed {
    pub fn new(compiled: Compiled) -> Installed {
        Installed { compiled }
    }

    /// Installs every program on the calling thread. Returns the index of
    /// the program that failed.
    ///
    /// # Safety
    ///
    /// Call in a freshly forked child, after `no_new_privs` (or with
    /// CAP_SYS_ADMIN). Async-signal-safe: the programs were built before
    /// fork; this builds a `sock_fprog` on the stack and makes one raw
    /// system call per program.
    pub unsafe fn install(&self) -> Result<(), usize> {
        for (i, program) in self.compiled.programs.iter().enumerate() {
            let fprog = libc::sock_fprog {
                len: program.len() as libc::c_ushort,
                // seccompiler's sock_filter is `repr(C)` with the kernel's
                // layout, as libc's is.
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: seccomp(2) copies the program from `fprog`, which
            // points into a vector that lives until exec.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &fprog as *const libc::sock_fprog,
                )
            };
            if rc < 0 {
                return Err(i);
            }
        }
        Ok(())
    }
}

impl fmt::Display for BlockAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockAction::Errno => "errno",
            BlockAction::Kill => "kill",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<SeccompSpec, String> {
        serde_yaml::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn every_group_member_has_a_number_on_some_architecture() {
        for (group, members) in GROUPS {
            for m in *members {
                let row = SYSCALLS.iter().find(|(s, _, _)| s == m);
                assert!(row.is_some(), "{group}: {m} is not in the table");
                let (_, x, a) = row.unwrap();
                assert!(x.is_some() || a.is_some(), "{m}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_64_numbers_match_libc() {
        let libc_numbers: &[(&str, i64)] = &[
            ("mount", libc::SYS_mount),
            ("umount2", libc::SYS_umount2),
            ("pivot_root", libc::SYS_pivot_root),
            ("chroot", libc::SYS_chroot),
            ("fsopen", libc::SYS_fsopen),
            ("fsconfig", libc::SYS_fsconfig),
            ("fsmount", libc::SYS_fsmount),
            ("fspick", libc::SYS_fspick),
            ("move_mount", libc::SYS_move_mount),
            ("open_tree", libc::SYS_open_tree),
            ("mount_setattr", libc::SYS_mount_setattr),
            ("init_module", libc::SYS_init_module),
            ("finit_module", libc::SYS_finit_module),
            ("delete_module", libc::SYS_delete_module),
            ("ptrace", libc::SYS_ptrace),
            ("process_vm_readv", libc::SYS_process_vm_readv),
            ("process_vm_writev", libc::SYS_process_vm_writev),
            ("kcmp", libc::SYS_kcmp),
            ("perf_event_open", libc::SYS_perf_event_open),
            ("lookup_dcookie", libc::SYS_lookup_dcookie),
            ("iopl", libc::SYS_iopl),
            ("ioperm", libc::SYS_ioperm),
            ("settimeofday", libc::SYS_settimeofday),
            ("clock_settime", libc::SYS_clock_settime),
            ("adjtimex", libc::SYS_adjtimex),
            ("clock_adjtime", libc::SYS_clock_adjtime),
            ("reboot", libc::SYS_reboot),
            ("kexec_load", libc::SYS_kexec_load),
            ("kexec_file_load", libc::SYS_kexec_file_load),
            ("swapon", libc::SYS_swapon),
            ("swapoff", libc::SYS_swapoff),
            ("keyctl", libc::SYS_keyctl),
            ("add_key", libc::SYS_add_key),
            ("request_key", libc::SYS_request_key),
            ("unshare", libc::SYS_unshare),
            ("setns", libc::SYS_setns),
            ("clone", libc::SYS_clone),
            ("clone3", libc::SYS_clone3),
            ("bpf", libc::SYS_bpf),
            ("open_by_handle_at", libc::SYS_open_by_handle_at),
            ("name_to_handle_at", libc::SYS_name_to_handle_at),
            ("quotactl", libc::SYS_quotactl),
            ("quotactl_fd", libc::SYS_quotactl_fd),
            ("acct", libc::SYS_acct),
            ("personality", libc::SYS_personality),
            ("userfaultfd", libc::SYS_userfaultfd),
            ("io_uring_setup", libc::SYS_io_uring_setup),
            ("io_uring_enter", libc::SYS_io_uring_enter),
            ("io_uring_register", libc::SYS_io_uring_register),
            ("syslog", libc::SYS_syslog),
        ];
        assert_eq!(libc_numbers.len(), SYSCALLS.len());
        for (name, nr) in libc_numbers {
            assert_eq!(number(name, TargetArch::x86_64), Some(*nr), "{name}");
        }
    }

    #[test]
    fn the_default_profile_compiles_for_x86_64_and_aarch64() {
        let spec = SeccompSpec::default();
        let x86 = compile(&spec, TargetArch::x86_64).unwrap().unwrap();
        let arm = compile(&spec, TargetArch::aarch64).unwrap().unwrap();
        // The main program and clone3's ENOSYS.
        assert_eq!(x86.programs.len(), 2);
        assert_eq!(arm.programs.len(), 2);
        // Different numbers and architecture checks: different programs.
        assert_ne!(x86, arm);
        assert!(x86.len() < 4096 && arm.len() < 4096, "BPF_MAXINSNS");
    }

    #[test]
    fn specs_read_as_names_or_maps_and_bad_names_are_errors() {
        assert_eq!(parse("default").unwrap(), SeccompSpec::default());
        assert!(parse("unconfined").unwrap().is_unconfined());
        let s = parse("{action: kill, allow: ['@debug'], deny: [acct]}").unwrap();
        assert_eq!(s.action, BlockAction::Kill);
        let denied = s.denied();
        assert!(!denied.contains("ptrace") && denied.contains("mount"));
        let only = parse("{profile: unconfined, deny: [ptrace]}").unwrap();
        assert_eq!(only.denied().into_iter().collect::<Vec<_>>(), ["ptrace"]);
        let e = parse("{allow: ['@nope']}").unwrap_err();
        assert!(e.contains("no group `@nope`"), "{e}");
        let e = parse("{deny: [read]}").unwrap_err();
        assert!(
            e.contains("`read` is not a system call plugvisor filters"),
            "{e}"
        );
        assert!(parse("{action: maybe}").is_err());
    }

    #[test]
    fn unconfined_compiles_to_nothing() {
        let spec = parse("unconfined").unwrap();
        assert!(compile(&spec, TargetArch::x86_64).unwrap().is_none());
        let allow_all = parse(
            "{allow: ['@mount', '@module', '@debug', '@raw-io', '@clock', '@reboot', '@swap', '@keyring', '@privileged-ns', '@bpf', '@handles', '@quota', '@acct', '@personality', '@userfaultfd', '@io-uring', '@syslog']}",
        )
        .unwrap();
        assert!(compile(&allow_all, TargetArch::aarch64).unwrap().is_none());
    }
}
