//! Section 10: many echo plugins (`--plugins N`, default 1,000) in one
//! daemon, health-checked every second.
//!
//! The daemon is the realistic host: cgroups on, and under a root daemon
//! each plugin also gets its own dynamic uid, a seccomp filter and a PID
//! namespace. Plugins are added by one `Reload` of a plugins directory
//! holding N manifests; the daemon (and so every plugin) is always stopped
//! at the end, and any plugin process that outlived it is killed.

use super::daemon::{Daemon, descendants, proc_stat, ticks_per_second};
use super::spin::CpuMode;
use super::{PAYLOAD, Result, Setup, Stats, proc_status_kib, write_manifest};
use plugvisor_proto as pb;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

/// What the section is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct FleetPlan {
    pub plugins: usize,
    /// How long the supervisor's CPU use at rest is read over.
    pub rest: Duration,
    pub ps_runs: usize,
    pub calls: usize,
    pub warmup: usize,
    pub cpus: CpuMode,
}

pub struct FleetFigures {
    pub plugins: usize,
    pub limits: String,
    pub isolation: String,
    pub ready_in: Duration,
    /// The daemon's VmRSS with no plugin, and with all of them ready.
    pub base_rss_kib: u64,
    pub rss_kib: u64,
    pub rest: Duration,
    /// Percent of one CPU, over `rest`: the daemon, and all plugins.
    pub cpu_percent: f64,
    pub plugins_cpu_percent: f64,
    pub health_failures: f64,
    pub restarts: u64,
    pub ps_runs: usize,
    pub ps: Stats,
    pub ps_worst: Duration,
    pub call: Stats,
    /// Median VmRSS of one plugin process, how many there are, and the sum
    /// of their Pss (shared pages counted once).
    pub child_rss_kib: u64,
    pub plugin_processes: usize,
    pub plugins_pss_kib: u64,
    /// SIGTERM until the daemon exited, all plugins stopped.
    pub stop: Duration,
    pub leftovers: usize,
}

const HEALTH_YAML: &str = "health: {interval: 1s, timeout: 1s, failure_threshold: 3}\n";

pub async fn run(root: &Path, bins: &Setup, plan: FleetPlan) -> Result<FleetFigures> {
    let limits = preflight(plan.plugins)?;
    let dir = root.join("f");
    std::fs::create_dir_all(&dir)?;
    let mut daemon = Daemon::start(bins, &dir, &[])?;
    daemon.grace = Duration::from_secs(30) + Duration::from_millis(100) * plan.plugins as u32;
    let measured = measure(&mut daemon, &dir, bins, plan, limits).await;
    // Stopping 1,000 plugins blocks for seconds: off the async workers.
    let (stop, leftovers) = tokio::task::spawn_blocking(move || daemon.stop()).await?;
    let mut figures = measured?;
    figures.stop = stop;
    figures.leftovers = leftovers;
    Ok(figures)
}

async fn measure(
    daemon: &mut Daemon,
    dir: &Path,
    bins: &Setup,
    plan: FleetPlan,
    limits: String,
) -> Result<FleetFigures> {
    let n = plan.plugins;
    let pid = daemon.pid();
    let mut client = daemon.connect().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base_rss_kib = proc_status_kib(&pid.to_string(), "VmRSS")?;

    // All of them at once, through one reload; ready when the last one's
    // `ready` event arrives.
    let mut events = client
        .events(pb::EventsRequest {
            plugin: String::new(),
            follow: true,
        })
        .await?
        .into_inner();
    let names: Vec<String> = (0..n).map(|i| format!("f{i:04}")).collect();
    for name in &names {
        write_manifest(&dir.join("plugins"), name, bins, HEALTH_YAML)?;
    }
    let started = Instant::now();
    let report = client.reload(pb::ReloadRequest {}).await?.into_inner();
    if let Some(f) = report.failed.first() {
        return Err(format!(
            "{} of {n} plugins could not be added, e.g. `{}`: {}",
            report.failed.len(),
            f.name,
            f.reason
        )
        .into());
    }
    let deadline = started + Duration::from_secs(60) + Duration::from_millis(200) * n as u32;
    let mut ready: HashSet<String> = HashSet::new();
    let mut via_events = true;
    while ready.len() < n && via_events {
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, events.next()).await {
            Err(_) => {
                return Err(format!(
                    "only {} of {n} plugins were ready after {:.0} s",
                    ready.len(),
                    started.elapsed().as_secs_f64()
                )
                .into());
            }
            Ok(Some(Ok(e))) if e.state == "ready" => {
                ready.insert(e.plugin);
            }
            Ok(Some(Ok(e))) if e.state == "failed" => {
                return Err(format!("plugin `{}` failed: {}", e.plugin, e.reason).into());
            }
            Ok(Some(Ok(_))) => {}
            // Lagged (data loss) or ended: count from `List` instead.
            Ok(Some(Err(_)) | None) => via_events = false,
        }
    }
    drop(events);
    while ready.len() < n {
        if Instant::now() > deadline {
            return Err(format!("only {} of {n} plugins became ready", ready.len()).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let list = client
            .list(pb::ListRequest {
                usage: false,
                ..Default::default()
            })
            .await?
            .into_inner();
        ready = list
            .plugins
            .into_iter()
            .filter(|p| p.state == "ready")
            .map(|p| p.name)
            .collect();
    }
    let ready_in = started.elapsed();
    daemon.check_alive()?;

    // At rest: health checks only. Let the starts' transients go first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_kib = proc_status_kib(&pid.to_string(), "VmRSS")?;
    let plugin_procs = descendants(pid);
    let cpu = |pids: &[(i32, u64)]| -> u64 {
        pids.iter()
            .filter_map(|&(p, _)| proc_stat(p))
            .map(|s| s.cpu_ticks)
            .sum()
    };
    let daemon_ticks = |pid| proc_stat(pid).map_or(0, |s| s.cpu_ticks);
    let (d0, p0, t0) = (daemon_ticks(pid), cpu(&plugin_procs), Instant::now());
    tokio::time::sleep(plan.rest).await;
    let (d1, p1, rest) = (daemon_ticks(pid), cpu(&plugin_procs), t0.elapsed());
    let percent = |ticks: u64| ticks as f64 / ticks_per_second() / rest.as_secs_f64() * 100.0;

    // `plugvisor ps`, the real CLI, timed from exec to exit.
    let exe = bins.daemon.clone();
    let socket = daemon.socket().to_path_buf();
    let runs = plan.ps_runs;
    let ps_times = tokio::task::spawn_blocking(move || -> Result<Vec<Duration>> {
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                let out = std::process::Command::new(&exe)
                    .arg("--control")
                    .arg(&socket)
                    .arg("ps")
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .output()?;
                let took = t.elapsed();
                let lines = out.stdout.iter().filter(|&&b| b == b'\n').count();
                if !out.status.success() || lines < n {
                    return Err(format!(
                        "`plugvisor ps` {} with {lines} lines for {n} plugins",
                        out.status
                    )
                    .into());
                }
                Ok(took)
            })
            .collect()
    })
    .await??;
    let ps_worst = ps_times.iter().copied().max().unwrap_or_default();

    // Calls to one plugin among N, by the same kind of client as figure 3
    // (a long-lived call session), so the two compare.
    let call = {
        let session = plugvisor_cli::control_client::CallSession::connect(daemon.socket()).await?;
        let _spin = plan.cpus.hold()?;
        let mut samples = Vec::with_capacity(plan.calls);
        for i in 0..plan.warmup + plan.calls {
            let t = Instant::now();
            let reply = session
                .call(pb::CallRequest {
                    plugin: names[0].clone(),
                    method: "echo".into(),
                    payload: vec![b'x'; PAYLOAD].into(),
                    metadata: HashMap::new(),
                    timeout_ms: 0,
                    ..Default::default()
                })
                .await?;
            if i >= plan.warmup {
                samples.push(t.elapsed());
            }
            if reply.payload.len() != PAYLOAD {
                return Err(format!("echo answered {} bytes", reply.payload.len()).into());
            }
        }
        Stats::of(samples)?
    };

    // Health and restarts over the whole section.
    let metrics = client
        .metrics(pb::MetricsRequest {})
        .await?
        .into_inner()
        .text;
    let series: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with("plugvisor_health_check_failures_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    if series.len() < n {
        return Err(format!(
            "the metrics hold {} plugvisor_health_check_failures_total series for {n} plugins",
            series.len()
        )
        .into());
    }
    let health_failures = series.iter().sum();
    let list = client
        .list(pb::ListRequest {
            usage: false,
            ..Default::default()
        })
        .await?
        .into_inner();
    let restarts = list.plugins.iter().map(|p| u64::from(p.restarts)).sum();
    let not_ready = list.plugins.iter().filter(|p| p.state != "ready").count();
    if not_ready > 0 {
        return Err(format!("{not_ready} of {n} plugins were no longer ready at the end").into());
    }
    let isolation = client
        .inspect(pb::InspectRequest {
            name: names[0].clone(),
        })
        .await?
        .into_inner()
        .status
        .and_then(|s| s.isolation)
        .map_or_else(|| "unknown".to_string(), |i| isolation_text(&i));

    // What the plugins cost, apart from the supervisor.
    let mut rss: Vec<u64> = Vec::new();
    let mut pss = 0;
    for &(p, _) in &plugin_procs {
        let p = p.to_string();
        if let Ok(kib) = proc_status_kib(&p, "VmRSS") {
            rss.push(kib);
        }
        pss += rollup_kib(&p, "Pss").unwrap_or(0);
    }
    rss.sort_unstable();
    Ok(FleetFigures {
        plugins: n,
        limits,
        isolation,
        ready_in,
        base_rss_kib,
        rss_kib,
        rest,
        cpu_percent: percent(d1.saturating_sub(d0)),
        plugins_cpu_percent: percent(p1.saturating_sub(p0)),
        health_failures,
        restarts,
        ps_runs: plan.ps_runs,
        ps: Stats::of(ps_times)?,
        ps_worst,
        call,
        child_rss_kib: rss.get(rss.len() / 2).copied().unwrap_or(0),
        plugin_processes: plugin_procs.len(),
        plugins_pss_kib: pss,
        stop: Duration::ZERO,
        leftovers: 0,
    })
}

/// `dynamic uid, seccomp, pid namespace, no_new_privs; cgroup v1`.
fn isolation_text(i: &pb::Isolation) -> String {
    let mut parts = Vec::new();
    if i.dynamic_user {
        parts.push("dynamic uid");
    }
    for (needle, short) in [
        ("seccomp", "seccomp"),
        ("PID namespace", "pid namespace"),
        ("no_new_privs", "no_new_privs"),
    ] {
        if i.hardening.iter().any(|h| h.contains(needle)) {
            parts.push(short);
        }
    }
    let mut text = format!("{}; limits by {}", parts.join(", "), i.mechanism);
    if i.cgroups.is_empty() {
        text.push_str(" (no cgroups)");
    }
    if !i.degraded.is_empty() {
        text.push_str(&format!("; degraded: {}", i.degraded.join(", ")));
    }
    text
}

/// A field of /proc/<pid>/smaps_rollup in KiB.
fn rollup_kib(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Checks the host can hold `n` plugins (processes, threads, descriptors,
/// memory) before starting any; raises this process's soft descriptor limit
/// (which the daemon inherits) when it is too low. Returns what it found.
fn preflight(n: usize) -> Result<String> {
    let read_num =
        |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    // Each echo plugin: a few threads; budget 8 tasks and 12 descriptors
    // (the daemon's side: connections, pipes, pidfd, cgroup files) each.
    let pid_max = read_num("/proc/sys/kernel/pid_max").unwrap_or(32768);
    let in_use: u64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().nth(3)?.split('/').nth(1)?.parse().ok())
        .unwrap_or(0);
    let tasks = 8 * n as u64;
    if in_use + tasks > pid_max {
        return Err(format!(
            "{n} plugins need about {tasks} more tasks; pid_max is {pid_max} with {in_use} in use. Hint: raise kernel.pid_max or pass --plugins with a smaller N"
        )
        .into());
    }
    let fds = 12 * n as u64 + 1024;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if limit.rlim_cur < fds {
        if limit.rlim_max < fds {
            return Err(format!(
                "{n} plugins need about {fds} descriptors in the daemon; the hard limit is {}. Hint: ulimit -Hn {fds}",
                limit.rlim_max
            )
            .into());
        }
        limit.rlim_cur = fds;
        // SAFETY: setrlimit reads one rlimit we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let need_kib = 6 * 1024 * n as u64;
    if available_kib < need_kib {
        return Err(format!(
            "{n} plugins need about {} MiB; only {} MiB are available. Hint: pass --plugins with a smaller N",
            need_kib / 1024,
            available_kib / 1024
        )
        .into());
    }
    // This process's pids cgroup (v1) limit, which the daemon starts in.
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let pids_max = cgroups
        .lines()
        .find_map(|l| l.split_once(":pids:").map(|(_, p)| p.to_string()))
        .and_then(|p| std::fs::read_to_string(format!("/sys/fs/cgroup/pids{p}/pids.max")).ok())
        .map_or_else(|| "none found".to_string(), |s| s.trim().to_string());
    Ok(format!(
        "pid_max {pid_max} ({in_use} tasks in use), nofile {}, pids.max {pids_max}, {:.1} GiB available",
        limit.rlim_cur,
        available_kib as f64 / 1024.0 / 1024.0
    ))
}
