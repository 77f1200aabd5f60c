//! The daemon (`plugvisor run`) as a child process of the bench, and what the
//! bench reads of it from procfs.

use super::{Result, Setup, write_manifest};
use plugvisor_cli::control::connect;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub type Client = plugvisor_cli::control::Client;

/// The daemon as a child process, with cgroups on (the daemon's default);
/// stopped with SIGTERM (then SIGKILL after `grace`) when dropped, so every
/// exit path stops it. Its plugins die with it: they have a parent-death
/// signal, and any descendant still there after the daemon is gone is
/// killed by [`Drop`].
pub struct Daemon {
    child: std::process::Child,
    log: PathBuf,
    socket: PathBuf,
    /// How long a SIGTERM may take: stopping 1,000 plugins takes longer
    /// than stopping one.
    pub grace: Duration,
}

impl Daemon {
    /// Starts a daemon in `dir` whose plugins directory holds an echo
    /// plugin for each of `plugins`.
    pub fn start(bins: &Setup, dir: &Path, plugins: &[&str]) -> Result<Daemon> {
        let plugins_dir = dir.join("plugins");
        std::fs::create_dir_all(&plugins_dir)?;
        for name in plugins {
            write_manifest(&plugins_dir, name, bins, "")?;
        }
        let log = dir.join("daemon.log");
        let stderr = std::fs::File::create(&log)?;
        let child = std::process::Command::new(&bins.daemon)
            .arg("--control")
            .arg(dir.join("c.sock"))
            .arg("run")
            .arg("--plugins-dir")
            .arg(&plugins_dir)
            .arg("--runtime-dir")
            .arg(dir.join("rt"))
            .env("PLUGVISOR_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bins.daemon.display()))?;
        Ok(Daemon {
            child,
            log,
            socket: dir.join("c.sock"),
            grace: Duration::from_secs(15),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A control client, once the socket answers (within 15 s).
    pub async fn connect(&mut self) -> Result<Client> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            self.check_alive()?;
            if self.socket.exists()
                && let Ok(c) = connect(&self.socket).await
            {
                return Ok(c);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the daemon's control socket {} did not answer within 15 s; its log:\n    {}",
                    self.socket.display(),
                    self.log_tail()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The last lines the daemon logged, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n    ")
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            return Err(format!(
                "the daemon exited early ({status}); its log:\n    {}",
                self.log_tail()
            )
            .into());
        }
        Ok(())
    }

    /// Stops the daemon (SIGTERM, SIGKILL after `grace`), then kills any of
    /// its descendants that outlived it. Returns how long the stop took and
    /// how many descendants had to be killed.
    pub fn stop(&mut self) -> (Duration, usize) {
        let started = Instant::now();
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return (started.elapsed(), 0);
        }
        let descendants = descendants(self.pid());
        let pid = nix::unistd::Pid::from_raw(self.pid());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = started + self.grace;
        let mut stopped = false;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                stopped = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if !stopped {
            eprintln!(
                "plugvisor-bench: the daemon did not stop within {} s of SIGTERM; killing it",
                self.grace.as_secs()
            );
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let took = started.elapsed();
        // Parent-death signals are asynchronous: give them a moment.
        let mut left = still_running(&descendants);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            left = still_running(&descendants);
        }
        for (pid, _) in &left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if !left.is_empty() {
            eprintln!(
                "plugvisor-bench: {} plugin process(es) outlived the daemon; killed them",
                left.len()
            );
        }
        (took, left.len())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process and its start time (field 22 of /proc/<pid>/stat), so a reused
/// pid is never mistaken for it.
type ProcId = (i32, u64);

/// Every descendant of `root` now, from /proc/*/stat.
pub fn descendants(root: i32) -> Vec<ProcId> {
    let mut children: HashMap<i32, Vec<ProcId>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(stat) = proc_stat(pid) {
            children
                .entry(stat.ppid)
                .or_default()
                .push((pid, stat.start));
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &(child, start) in children.get(&p).map_or(&[][..], |v| v.as_slice()) {
            out.push((child, start));
            todo.push(child);
        }
    }
    out
}

fn still_running(procs: &[ProcId]) -> Vec<ProcId> {
    procs
        .iter()
        .copied()
        .filter(|&(pid, start)| proc_stat(pid).is_some_and(|s| s.start == start && !s.zombie))
        .collect()
}

/// The fields of /proc/<pid>/stat the bench uses.
pub struct ProcStat {
    pub ppid: i32,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub start: u64,
    pub zombie: bool,
}

pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: split after the
    // last `)`. Fields from there on: state(3) ppid(4) ... utime(14)
    // stime(15) ... starttime(22).
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        ppid: f.get(1)?.parse().ok()?,
        cpu_ticks: field(14)? + field(15)?,
        start: field(22)?,
        zombie: f.first() == Some(&"Z"),
    })
}

/// Clock ticks per second, for [`ProcStat::cpu_ticks`].
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant; no memory of ours is touched.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}
