//! Manifest values that parse but that this host will refuse at start, found
//! offline for `plugvisor check`: rlimits above what the supervisor may set,
//! process limits beyond what the kernel allows.

use super::{Manifest, ManifestError};
use std::path::{Path, PathBuf};

/// `pids.max` above this is refused by the kernel (`PID_MAX_LIMIT`, 2^22).
pub const KERNEL_PIDS_MAX: u64 = 1 << 22;

/// What the host lets a plugin's limits be.
#[derive(Debug, Clone, Default)]
pub struct HostLimits {
    /// Highest `limits.nofile` a start can set, and why: the supervisor's
    /// hard `RLIMIT_NOFILE`, or `fs.nr_open` when it may raise hard limits
    /// (root). `None` when unknown.
    pub nofile_max: Option<(u64, String)>,
    /// Highest `limits.nproc`, and why (the hard `RLIMIT_NPROC` unless root).
    pub nproc_max: Option<(u64, String)>,
    /// `kernel.pid_max`, and where it was read.
    pub pid_max: Option<(u64, PathBuf)>,
}

impl HostLimits {
    /// Reads the limits of this process and of the kernel under `proc_root`
    /// (normally `/proc`).
    pub fn probe(proc_root: &Path) -> HostLimits {
        let privileged = nix::unistd::geteuid().is_root();
        Self::probe_with(proc_root, privileged, hard_rlimit)
    }

    /// [`Self::probe`] with the privilege and the rlimit reader given.
    pub fn probe_with(
        proc_root: &Path,
        privileged: bool,
        hard: impl Fn(Rlimit) -> Option<u64>,
    ) -> HostLimits {
        let read = |rel: &str| -> Option<(u64, PathBuf)> {
            let path = proc_root.join(rel);
            let value = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
            Some((value, path))
        };
        let nr_open = read("sys/fs/nr_open");
        let nofile_max = if privileged {
            nr_open.map(|(n, path)| {
                (
                    n,
                    format!(
                        "the kernel's fs.nr_open ({}), the most any process may open",
                        path.display()
                    ),
                )
            })
        } else {
            hard(Rlimit::Nofile).map(|n| {
                (
                    n,
                    "the supervisor's own hard RLIMIT_NOFILE, which only root (CAP_SYS_RESOURCE) may raise; raise it (e.g. LimitNOFILE= in the systemd unit) or lower the limit".to_string(),
                )
            })
        };
        let nproc_max = (!privileged)
            .then(|| hard(Rlimit::Nproc))
            .flatten()
            .map(|n| {
                (
                    n,
                    "the supervisor's own hard RLIMIT_NPROC, which only root may raise; raise it (e.g. LimitNPROC= in the systemd unit) or lower the limit".to_string(),
                )
            });
        HostLimits {
            nofile_max,
            nproc_max,
            pid_max: read("sys/kernel/pid_max"),
        }
    }
}

/// The rlimits [`HostLimits`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rlimit {
    Nofile,
    Nproc,
}

/// This process's hard limit of `resource`; `None` when unlimited or unknown.
fn hard_rlimit(resource: Rlimit) -> Option<u64> {
    let resource = match resource {
        Rlimit::Nofile => libc::RLIMIT_NOFILE,
        Rlimit::Nproc => libc::RLIMIT_NPROC,
    };
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for getrlimit to fill.
    let rc = unsafe { libc::getrlimit(resource, &mut limit) };
    (rc == 0 && limit.rlim_max != libc::RLIM_INFINITY).then_some(limit.rlim_max)
}

/// The manifest's values that `host` will refuse or that can never apply,
/// each naming the manifest, the field and the host's limit. Empty when the
/// host can run it as written.
pub fn host_limits_problems(manifest: &Manifest, host: &HostLimits) -> Vec<ManifestError> {
    let mut problems = Vec::new();
    let mut problem = |field: &str, message: String| {
        problems.push(ManifestError::new(&manifest.path, Some(field), message));
    };
    let limits = &manifest.limits;
    for (field, value, max) in [
        ("limits.nofile", limits.nofile, &host.nofile_max),
        ("limits.nproc", limits.nproc, &host.nproc_max),
    ] {
        if let (Some(v), Some((max, why))) = (value, max)
            && v > *max
        {
            problem(
                field,
                format!("{v} is above {max}, {why}; starting the plugin would fail"),
            );
        }
    }
    if let Some(pids) = limits.pids {
        if pids > KERNEL_PIDS_MAX {
            problem(
                "limits.pids",
                format!(
                    "{pids} is above {KERNEL_PIDS_MAX}, the most the kernel accepts for a cgroup's pids.max; starting the plugin would fail"
                ),
            );
        } else if let Some((pid_max, path)) = &host.pid_max
            && pids > *pid_max
        {
            problem(
                "limits.pids",
                format!(
                    "{pids} is above this host's kernel.pid_max ({pid_max}, from {}), so it limits nothing; lower it to at most {pid_max}",
                    path.display()
                ),
            );
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(limits: &str) -> Manifest {
        Manifest::parse(
            Path::new("/plugins/echo/plugin.yaml"),
            &format!("name: echo\nversion: 1.0.0\nexec: ./x\nlimits: {{{limits}}}\n"),
        )
        .unwrap()
    }

    /// A `/proc` laid out in a temp dir.
    fn fake_proc(pid_max: &str, nr_open: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/kernel")).unwrap();
        std::fs::create_dir_all(dir.path().join("sys/fs")).unwrap();
        std::fs::write(dir.path().join("sys/kernel/pid_max"), pid_max).unwrap();
        std::fs::write(dir.path().join("sys/fs/nr_open"), nr_open).unwrap();
        dir
    }

    #[test]
    fn unprivileged_nofile_and_nproc_are_bounded_by_the_hard_rlimits() {
        let proc = fake_proc("32768\n", "1048576\n");
        let host = HostLimits::probe_with(proc.path(), false, |_| Some(4096));
        let problems = host_limits_problems(&manifest("nofile: 8192, nproc: 5000"), &host);
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 2, "{text:#?}");
        assert_eq!(problems[0].field.as_deref(), Some("limits.nofile"));
        assert!(
            text[0].starts_with(
                "/plugins/echo/plugin.yaml: field `limits.nofile`: 8192 is above 4096"
            ),
            "{}",
            text[0]
        );
        assert!(
            text[0].contains("RLIMIT_NOFILE") && text[0].contains("LimitNOFILE="),
            "{}",
            text[0]
        );
        assert_eq!(problems[1].field.as_deref(), Some("limits.nproc"));
        assert!(host_limits_problems(&manifest("nofile: 4096, nproc: 10"), &host).is_empty());
    }

    #[test]
    fn root_may_go_up_to_nr_open() {
        let proc = fake_proc("32768", "1048576");
        let host = HostLimits::probe_with(proc.path(), true, |_| Some(4096));
        assert!(host_limits_problems(&manifest("nofile: 8192, nproc: 5000"), &host).is_empty());
        let problems = host_limits_problems(&manifest("nofile: 2000000"), &host);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].message.contains("fs.nr_open"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn pids_beyond_pid_max_or_the_kernel_limit_are_reported() {
        let proc = fake_proc("32768", "1048576");
        let host = HostLimits::probe_with(proc.path(), true, |_| None);
        let problems = host_limits_problems(&manifest("pids: 40000"), &host);
        assert_eq!(problems.len(), 1);
        let text = problems[0].to_string();
        assert!(
            text.contains("field `limits.pids`") && text.contains("kernel.pid_max (32768, from"),
            "{text}"
        );
        assert!(
            text.contains(&proc.path().join("sys/kernel/pid_max").display().to_string()),
            "{text}"
        );
        let problems = host_limits_problems(&manifest("pids: 5000000"), &host);
        assert!(problems[0].message.contains("pids.max"), "{}", problems[0]);
        assert!(host_limits_problems(&manifest("pids: 64"), &host).is_empty());
    }

    #[test]
    fn unknown_host_limits_report_nothing() {
        let host = HostLimits::probe_with(Path::new("/nonexistent"), false, |_| None);
        assert!(
            host_limits_problems(&manifest("nofile: 99999999, pids: 4000000"), &host).is_empty()
        );
    }

    #[test]
    fn probes_this_host() {
        let host = HostLimits::probe(Path::new("/proc"));
        let Some((pid_max, _)) = host.pid_max.clone() else {
            eprintln!("skipped: /proc/sys/kernel/pid_max is not readable here");
            return;
        };
        assert!(pid_max >= 300, "{pid_max}");
        assert!(
            host.nofile_max.as_ref().is_some_and(|(n, _)| *n >= 16),
            "{host:?}"
        );
    }
}
