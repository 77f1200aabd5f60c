//! Resource limits (`setrlimit`) from a manifest's `limits:`, computed before
//! fork and applied by the child with one raw `prlimit64` call each (see
//! [`super::preexec`]).
//!
//! Each limit is set as both soft and hard value, so the plugin cannot raise
//! it again; `cpu_time` keeps 5 s of headroom between SIGXCPU (soft) and
//! SIGKILL (hard) so a plugin can log why it is going away. `core` is 0
//! unless the manifest says otherwise: no core dumps by default.

use crate::manifest::Limits;
use crate::units::{format_duration, format_size};
use std::time::Duration;

/// Seconds of CPU between SIGXCPU and SIGKILL for `cpu_time`.
const CPU_TIME_GRACE_SECS: u64 = 5;

/// The resources a manifest can limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Nofile,
    Core,
    Data,
    Cpu,
    Nproc,
}

impl Resource {
    /// The `RLIMIT_*` constant.
    pub fn raw(self) -> libc::c_int {
        (match self {
            Resource::Nofile => libc::RLIMIT_NOFILE,
            Resource::Core => libc::RLIMIT_CORE,
            Resource::Data => libc::RLIMIT_DATA,
            Resource::Cpu => libc::RLIMIT_CPU,
            Resource::Nproc => libc::RLIMIT_NPROC,
        }) as libc::c_int
    }

    /// `NOFILE` for `RLIMIT_NOFILE`, and so on.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Nofile => "NOFILE",
            Resource::Core => "CORE",
            Resource::Data => "DATA",
            Resource::Cpu => "CPU",
            Resource::Nproc => "NPROC",
        }
    }

    /// The manifest field under `limits:`.
    pub fn field(self) -> &'static str {
        match self {
            Resource::Nofile => "nofile",
            Resource::Core => "core",
            Resource::Data => "data",
            Resource::Cpu => "cpu_time",
            Resource::Nproc => "nproc",
        }
    }

    /// A value in the manifest's terms: sizes for CORE and DATA, a duration
    /// for CPU, a count otherwise.
    pub fn format(self, value: u64) -> String {
        match self {
            Resource::Core | Resource::Data => format_size(value),
            Resource::Cpu => format_duration(Duration::from_secs(value)),
            Resource::Nofile | Resource::Nproc => value.to_string(),
        }
    }
}

/// One limit to set in the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: Resource,
    pub soft: u64,
    pub hard: u64,
}

impl Rlimit {
    /// The struct `prlimit64` takes.
    pub fn raw(&self) -> libc::rlimit64 {
        libc::rlimit64 {
            rlim_cur: self.soft,
            rlim_max: self.hard,
        }
    }
}

/// The rlimits of `limits`. `data_fallback` stands in for `data` when the
/// manifest gives none (the memory limit, when no cgroup enforces it).
pub fn from_limits(limits: &Limits, data_fallback: Option<u64>) -> Vec<Rlimit> {
    let same = |resource, v: u64| Rlimit {
        resource,
        soft: v,
        hard: v,
    };
    let mut out = Vec::new();
    if let Some(n) = limits.nofile {
        out.push(same(Resource::Nofile, n));
    }
    out.push(same(Resource::Core, limits.core.map_or(0, |s| s.0)));
    if let Some(d) = limits.data.map(|s| s.0).or(data_fallback) {
        out.push(same(Resource::Data, d));
    }
    if let Some(t) = limits.cpu_time {
        // RLIMIT_CPU counts whole seconds; round up so a limit is never 0.
        let secs = t.0.as_secs() + u64::from(t.0.subsec_nanos() > 0);
        out.push(Rlimit {
            resource: Resource::Cpu,
            soft: secs,
            hard: secs + CPU_TIME_GRACE_SECS,
        });
    }
    if let Some(n) = limits.nproc {
        out.push(same(Resource::Nproc, n));
    }
    out
}

/// Checks, before fork, that the child will be allowed to set `limits`: only
/// a process with `CAP_SYS_RESOURCE` (`privileged`) may raise a hard limit
/// above its own. The child inherits the supervisor's limits, so compare
/// with those.
pub fn check_feasible(limits: &[Rlimit], privileged: bool) -> Result<(), String> {
    if privileged {
        return Ok(());
    }
    for l in limits {
        let mut current = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 on our own process (pid 0) with no new limit only
        // writes the current one into `current`, a valid rlimit64.
        let rc =
            unsafe { libc::prlimit64(0, l.resource.raw() as _, std::ptr::null(), &mut current) };
        if rc == 0 && current.rlim_max != libc::RLIM64_INFINITY && l.hard > current.rlim_max {
            return Err(format!(
                "limits.{} {} is above the supervisor's own hard limit {}, which only a process with CAP_SYS_RESOURCE (root, outside most containers) can raise; raise the daemon's limit (e.g. Limit{}= in its systemd unit) or lower limits.{}",
                l.resource.field(),
                l.resource.format(l.hard),
                l.resource.format(current.rlim_max),
                l.resource.name(),
                l.resource.field(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{HumanDuration, HumanSize};

    #[test]
    fn core_is_zero_by_default_and_others_only_when_given() {
        let l = from_limits(&Limits::default(), None);
        assert_eq!(
            l,
            vec![Rlimit {
                resource: Resource::Core,
                soft: 0,
                hard: 0
            }]
        );
    }

    #[test]
    fn every_manifest_limit_maps_to_its_rlimit() {
        let limits = Limits {
            nofile: Some(64),
            core: Some(HumanSize(1 << 20)),
            data: Some(HumanSize(256 << 20)),
            cpu_time: Some(HumanDuration(Duration::from_millis(1500))),
            nproc: Some(10),
            ..Limits::default()
        };
        let l = from_limits(&limits, Some(1));
        let find = |r| l.iter().find(|x| x.resource == r).copied().unwrap();
        assert_eq!(
            (find(Resource::Nofile).soft, find(Resource::Nofile).hard),
            (64, 64)
        );
        assert_eq!(find(Resource::Core).soft, 1 << 20);
        // An explicit `data` wins over the fallback.
        assert_eq!(find(Resource::Data).soft, 256 << 20);
        // 1.5 s rounds up to 2 s; SIGKILL comes 5 s of CPU later.
        assert_eq!((find(Resource::Cpu).soft, find(Resource::Cpu).hard), (2, 7));
        assert_eq!(find(Resource::Nproc).soft, 10);
        assert_eq!(find(Resource::Nofile).raw().rlim_max, 64);
    }

    #[test]
    fn memory_falls_back_to_data_without_a_cgroup() {
        let l = from_limits(&Limits::default(), Some(128 << 20));
        assert!(
            l.iter()
                .any(|x| x.resource == Resource::Data && x.soft == 128 << 20)
        );
    }

    #[test]
    fn raising_a_hard_limit_needs_privilege() {
        let huge = [Rlimit {
            resource: Resource::Nofile,
            soft: u64::MAX - 1,
            hard: u64::MAX - 1,
        }];
        assert!(check_feasible(&huge, true).is_ok());
        let e = check_feasible(&huge, false).unwrap_err();
        assert!(
            e.contains("limits.nofile") && e.contains("LimitNOFILE="),
            "{e}"
        );
        let small = [Rlimit {
            resource: Resource::Nofile,
            soft: 16,
            hard: 16,
        }];
        assert!(check_feasible(&small, false).is_ok());
    }
}
