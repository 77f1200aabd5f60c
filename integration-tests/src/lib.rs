//! Support for plugvisor's end-to-end tests: locating the built binaries,
//! writing plugins directories, running the real daemon, and waiting on
//! conditions with deadlines (never sleeping and hoping).

use plugvisor::manifest::Manifest;
use plugvisor::{Event, PluginState, Supervisor, SupervisorOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A binary built by this workspace (`target/<profile>/<name>`), found next
/// to the running test executable, and fresh: the first call in a test
/// process runs `cargo build --workspace --bins` (see [`build_bins`]), so a
/// test never runs a binary older than the source.
pub mod tls;

pub fn bin(name: &str) -> PathBuf {
    let dir = bin_dir();
    if let Err(e) = BUILT.get_or_init(|| build_bins(&dir)) {
        panic!("{e}");
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built by `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// Whether this process built the workspace's binaries, and how it went.
static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();

/// `target/<profile>`: where the running test executable and the binaries
/// of the same profile are.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let mut dir = exe.parent().expect("the test executable has a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps has a parent");
    }
    dir.to_path_buf()
}

/// Runs `cargo build --workspace --bins` with the cargo that runs the tests
/// (`$CARGO`), the profile the test was built with (the name of `dir`) and
/// the target directory `dir` is in. Quiet, and quick when nothing changed.
fn build_bins(dir: &Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests sits in the workspace")
        .join("Cargo.toml");
    let target_dir = dir
        .parent()
        .expect("a profile directory is in the target dir");
    let mut command = Command::new(&cargo);
    command
        .args([
            "build",
            "--workspace",
            "--bins",
            "--quiet",
            "--manifest-path",
        ])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(profile) => {
            command.args(["--profile", profile]);
        }
        None => return Err(format!("{} is not a profile directory", dir.display())),
    }
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", Path::new(&cargo).display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`cargo build --workspace --bins` for the end-to-end tests failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A temporary plugins directory plus runtime dir, with short paths so that
/// socket paths stay under the Unix limit.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Sandbox {
    /// A daemon run on this sandbox made its plugins' cgroups under a parent
    /// named after the runtime directory. One that was SIGKILLed could not
    /// remove them, and a plugin's descendants without a parent-death signal
    /// (a `--double-fork` grandchild) live on in them: kill and remove all
    /// of it, as the daemon's next start would.
    fn drop(&mut self) {
        use plugvisor::isolation::{ProbeOptions, fs::HostFs, probe};
        let config = plugvisor::config::Config {
            runtime_dir: self.runtime_dir(),
            ..Default::default()
        };
        let parent = config.cgroup_parent();
        let root = config.cgroup.root.clone();
        // Listing a parent that does not exist finds nothing: no effect.
        if let Ok(tree) = probe(&ProbeOptions {
            fs: std::sync::Arc::new(HostFs),
            root,
            proc_root: "/proc".into(),
            parent,
            pid: std::process::id() as i32,
        }) {
            let _ = tree.clean_stale();
            let _ = tree.teardown();
        }
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("pv")
            .tempdir_in("/tmp")
            .expect("a temp dir in /tmp");
        // Plugins run as their own unprivileged users under a root
        // supervisor: they must reach their executables and sockets here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod 0755 the sandbox");
        std::fs::create_dir_all(dir.path().join("plugins")).expect("plugins dir");
        Sandbox { dir }
    }

    pub fn plugins_dir(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Writes `<plugins>/<name>/plugin.yaml` running `exec` with `extra` YAML
    /// appended (e.g. `args: [--junk, "3"]`).
    pub fn plugin(&self, name: &str, exec: &Path, extra: &str) -> PathBuf {
        let dir = self.plugins_dir().join(name);
        std::fs::create_dir_all(&dir).expect("plugin dir");
        let path = dir.join("plugin.yaml");
        std::fs::write(
            &path,
            format!(
                "name: {name}\nversion: 1.0.0\nexec: {}\n{extra}\n",
                exec.display()
            ),
        )
        .expect("write manifest");
        path
    }

    /// Writes a manifest and loads it.
    pub fn manifest(&self, name: &str, exec: &Path, extra: &str) -> Manifest {
        Manifest::load(&self.plugin(name, exec, extra)).expect("valid manifest")
    }

    /// An embedded supervisor whose sockets live in this sandbox.
    pub fn supervisor(&self) -> Supervisor {
        Supervisor::new(SupervisorOptions::new(self.runtime_dir())).expect("supervisor starts")
    }

    /// The sandbox's state dir: `<sandbox>/state`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// An embedded supervisor that keeps state snapshots in [`Self::state_dir`].
    pub fn supervisor_with_state(&self) -> Supervisor {
        let mut options = SupervisorOptions::new(self.runtime_dir());
        options.state_dir = Some(self.state_dir());
        Supervisor::new(options).expect("supervisor starts")
    }
}

/// Polls `condition` every 5 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Blocking [`wait_until`] for tests without a runtime.
pub fn wait_until_blocking(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for the next event of `plugin` that satisfies `matches`.
pub async fn next_event(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    plugin: &str,
    timeout: Duration,
    mut matches: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no matching event for `{plugin}` within {timeout:?}"))
            .expect("event stream open");
        if event.plugin == plugin && matches(&event) {
            return event;
        }
    }
}

/// Waits for `plugin` to reach `state`.
pub async fn wait_state(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    plugin: &str,
    state: PluginState,
    timeout: Duration,
) -> Event {
    next_event(events, plugin, timeout, |e| e.state == state).await
}

/// True when no process `pid` runs (it does not exist or is a zombie).
pub fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// The real `plugvisor` daemon, started on a sandbox and killed on drop.
pub struct Daemon {
    pub child: Child,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `plugvisor run` on the sandbox's plugins dir and waits until
    /// its control socket answers.
    pub fn start(sandbox: &Sandbox, extra_args: &[&str]) -> Daemon {
        Self::start_with(sandbox, extra_args, |_| {})
    }

    /// [`Daemon::start`], letting `configure` adjust the command first (e.g.
    /// its environment).
    pub fn start_with(
        sandbox: &Sandbox,
        extra_args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Daemon {
        let control = sandbox.dir.path().join("ctl.sock");
        let log = sandbox.dir.path().join("daemon.log");
        let log_file = std::fs::File::create(&log).expect("daemon log");
        let mut command = Command::new(bin("plugvisor"));
        command
            .arg("--control")
            .arg(&control)
            .arg("run")
            .arg("--plugins-dir")
            .arg(sandbox.plugins_dir())
            .arg("--runtime-dir")
            .arg(sandbox.runtime_dir())
            .arg("--state-dir")
            .arg(sandbox.dir.path().join("state"))
            .args(extra_args)
            .env("PLUGVISOR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        configure(&mut command);
        let child = command.spawn().expect("the daemon starts");
        let mut daemon = Daemon {
            child,
            control,
            log,
        };
        let control = daemon.control.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::os::unix::net::UnixStream::connect(&control).is_ok() {
                break;
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("the daemon exited with {status}:\n{}", daemon.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not listen within 10s:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        daemon
    }

    /// Runs a CLI verb against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("plugvisor"))
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("the CLI runs")
    }

    /// Runs a CLI verb and returns its stdout, asserting exit code 0.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "plugvisor {args:?} failed with {}: {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// `ps --json`, parsed.
    pub fn ps(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.cli_ok(&["ps", "--json"])).expect("ps --json is JSON")
    }

    /// The `ps --json` row of one plugin.
    pub fn plugin(&self, name: &str) -> serde_json::Value {
        self.ps()
            .into_iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("`{name}` is not in ps"))
    }

    /// Waits until `name` is ready.
    pub fn wait_ready(&self, name: &str) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        wait_until_blocking(Duration::from_secs(15), &format!("{name} ready"), || {
            last = self.plugin(name);
            last["state"] == "ready"
        });
        last
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` and waits for the daemon to exit (10 s at most).
    pub fn stop_with(&mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(self.pid(), signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within 10s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    /// Stops the daemon gracefully (SIGTERM), so it takes its plugins and
    /// their descendants with it; SIGKILL only if it does not exit in 10 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Reports a test (or part of one) that cannot run on this machine. The
/// reason is printed, and appended to the file `PLUGVISOR_SKIP_LOG` names,
/// so `scripts/test.sh` can list every skip after the run: cargo hides the
/// output of tests that pass, and a skip must never pass silently.
pub fn skip(reason: impl std::fmt::Display) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string();
    let line = format!("SKIP: {test}: {reason}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("PLUGVISOR_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{line}");
        }
    }
}
