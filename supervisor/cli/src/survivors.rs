//! The daemon's side of `survive_supervisor`: the survivors' guard
//! ([`plugvisor::guard`]) it leaves behind, as a process of its own, to
//! bound its survivors if it dies.

use anyhow::Context;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// A running guard: the write end of its pipe. Dropping it without
/// [`Guard::stop`] is what a crash looks like to the guard.
pub struct Guard {
    pipe: std::io::PipeWriter,
}

impl Guard {
    /// Starts `plugvisor survivor-guard DIR` in a process group of its own
    /// (a terminal's Ctrl-C is not for it), with the read end of a pipe as
    /// its stdin and the daemon's stderr.
    pub fn start(dir: &Path) -> anyhow::Result<Guard> {
        let (read, pipe) = std::io::pipe().context("cannot make the survivor guard's pipe")?;
        let exe = std::env::current_exe().context("cannot find the plugvisor executable")?;
        let mut child = Command::new(&exe);
        child
            .arg("survivor-guard")
            .arg(dir)
            .env_clear()
            .env("PATH", plugvisor::instance::DEFAULT_PATH)
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0);
        // The daemon reaps it (it reaps every child) when it exits.
        child
            .spawn()
            .with_context(|| format!("cannot start {} survivor-guard", exe.display()))?;
        Ok(Guard { pipe })
    }

    /// The guard a previous image started and handed over (the write end
    /// of its pipe).
    pub fn from_pipe(pipe: std::os::fd::OwnedFd) -> Guard {
        Guard {
            pipe: std::io::PipeWriter::from(pipe),
        }
    }

    /// The pipe's descriptor, to hand over at a switch.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.pipe.as_raw_fd()
    }

    /// A clean shutdown: every plugin is stopped, the guard has nothing to
    /// bound.
    pub fn stop(mut self) {
        let _ = self.pipe.write_all(plugvisor::guard::STOP);
    }
}

/// `plugvisor survivor-guard DIR`: waits on stdin for the daemon to go.
pub async fn run_guard(dir: &Path) -> anyhow::Result<i32> {
    use std::os::fd::AsFd;
    let watch = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot read stdin")?;
    let dir = dir.to_path_buf();
    let outcome = tokio::task::spawn_blocking(move || {
        plugvisor::guard::run(
            &dir,
            Path::new("/proc"),
            watch,
            std::time::Duration::from_secs(1),
        )
    })
    .await??;
    if outcome != plugvisor::guard::Outcome::Stopped {
        eprintln!("plugvisor survivor-guard: done ({outcome:?})");
    }
    Ok(0)
}
