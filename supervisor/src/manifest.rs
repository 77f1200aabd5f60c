//! Plugin manifests (`plugin.yaml`) and discovery of plugins in a plugins
//! directory.
//!
//! A plugin is `<plugins_dir>/<name>/plugin.yaml`, or
//! `<plugins_dir>/<name>/<semver>/plugin.yaml` when several versions are
//! installed side by side (the highest version wins). Parsing is strict:
//! unknown fields and bad values are errors that name the file and the field.

mod container;
mod hooks;
mod host;
mod remote;
mod survive;
mod yaml_guard;

use crate::units::{HumanDuration, HumanSize};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file name every plugin directory holds.
pub const MANIFEST_FILE: &str = "plugin.yaml";
/// Largest manifest accepted (1 MiB); real ones are a few hundred bytes, and
/// a bigger file is refused before it is read whole.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
pub use container::{ContainerRuntime, ContainerSpec};
pub use hooks::{DEFAULT_HOOK_TIMEOUT, HookSpec, HooksSpec, MAX_HOOK_TIMEOUT};
pub use host::{HostLimits, KERNEL_PIDS_MAX, Rlimit, host_limits_problems};
pub use remote::{RemoteSpec, validate_address};
pub use survive::SurvivePolicy;
/// Deepest nesting of collections accepted in a manifest or config file.
pub use yaml_guard::MAX_DEPTH;
pub(crate) use yaml_guard::{check_shape, read_bounded};

/// A manifest that failed to load, with where and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {}{message}", file.display(), field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
pub struct ManifestError {
    /// The manifest (or directory) at fault.
    pub file: PathBuf,
    /// The offending field, when one can be named.
    pub field: Option<String>,
    /// What was wrong and what was expected.
    pub message: String,
}

impl ManifestError {
    fn new(file: &Path, field: Option<&str>, message: impl Into<String>) -> Self {
        ManifestError {
            file: file.to_path_buf(),
            field: field.map(str::to_string),
            message: message.into(),
        }
    }
}

/// When a plugin that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Whatever the exit, start it again.
    Always,
    /// Start it again unless it exited with code 0 on its own.
    #[default]
    OnFailure,
    /// Never start it again.
    Never,
}

/// `restart:` — how crashes are answered. See [`crate::policy`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartSpec {
    pub policy: RestartMode,
    pub initial_backoff: HumanDuration,
    pub max_backoff: HumanDuration,
    pub multiplier: f64,
    /// Fraction of the delay randomised either way (0.2 = ±20%), so a fleet of
    /// crashing plugins does not restart in lockstep.
    pub jitter: f64,
    /// Continuous readiness after which the backoff starts over.
    pub reset_after: HumanDuration,
    /// More than this many restarts within `window` and the plugin is `failed`.
    pub max_restarts: u32,
    pub window: HumanDuration,
    /// After a crash of an instance that had been ready, spawn and
    /// handshake the next one during the backoff; Initialize is sent once
    /// the backoff has elapsed (see [`crate::actor`]). `false` starts
    /// nothing before the backoff has elapsed.
    pub prestart: bool,
}

impl Default for RestartSpec {
    fn default() -> Self {
        RestartSpec {
            policy: RestartMode::OnFailure,
            initial_backoff: HumanDuration(Duration::from_millis(100)),
            max_backoff: HumanDuration(Duration::from_secs(30)),
            multiplier: 2.0,
            jitter: 0.2,
            reset_after: HumanDuration(Duration::from_secs(60)),
            max_restarts: 10,
            window: HumanDuration(Duration::from_secs(60)),
            prestart: true,
        }
    }
}

/// `health:` — liveness probing of a ready plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSpec {
    pub interval: HumanDuration,
    pub timeout: HumanDuration,
    /// Consecutive failed probes that restart the child.
    pub failure_threshold: u32,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            interval: HumanDuration(Duration::from_secs(5)),
            timeout: HumanDuration(Duration::from_secs(1)),
            failure_threshold: 3,
        }
    }
}

/// `timeouts:` — how long each phase may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Spawn until the handshake line.
    pub start: HumanDuration,
    /// The Initialize call.
    pub initialize: HumanDuration,
    /// Default deadline of a call that does not bring its own.
    pub call: HumanDuration,
    /// Shutdown RPC + SIGTERM grace before SIGKILL.
    pub stop: HumanDuration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            start: HumanDuration(Duration::from_secs(10)),
            initialize: HumanDuration(Duration::from_secs(5)),
            call: HumanDuration(Duration::from_secs(30)),
            stop: HumanDuration(Duration::from_secs(10)),
        }
    }
}

/// `state:` — snapshots of what the plugin's ExportState returns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSpec {
    /// How often a ready plugin's state is snapshotted; `0s` turns periodic
    /// snapshots off (a graceful stop still takes one).
    pub snapshot_interval: HumanDuration,
    /// Snapshot after every call that reports `state_changed`, before the
    /// caller gets its reply: no acknowledged change is ever lost.
    pub snapshot_on_change: bool,
}

impl Default for StateSpec {
    fn default() -> Self {
        StateSpec {
            snapshot_interval: HumanDuration(Duration::from_secs(30)),
            snapshot_on_change: false,
        }
    }
}

/// `limits:` — resources a plugin instance may use. Memory, cpu and pids are
/// enforced by the instance's cgroup; the rest are rlimits set before exec.
/// See [`crate::isolation`].
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Hard memory limit: beyond it the kernel's OOM killer ends the plugin
    /// (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`).
    pub memory: Option<HumanSize>,
    /// Throttling threshold below `memory`: reclaim pressure, no kill
    /// (v2 `memory.high`, v1 `memory.soft_limit_in_bytes`).
    pub memory_high: Option<HumanSize>,
    /// CPU time per wall-clock time, in cores (`0.5` = half of one CPU).
    pub cpu: Option<f64>,
    /// Processes and threads the plugin and its descendants may have.
    pub pids: Option<u64>,
    /// `RLIMIT_NOFILE`: open descriptors per process.
    pub nofile: Option<u64>,
    /// `RLIMIT_CORE`: core dump size; 0 (no core dumps) when not given.
    pub core: Option<HumanSize>,
    /// `RLIMIT_DATA`: the data segment and private memory mappings.
    pub data: Option<HumanSize>,
    /// `RLIMIT_CPU`: CPU seconds per process before SIGXCPU, then SIGKILL.
    pub cpu_time: Option<HumanDuration>,
    /// `RLIMIT_NPROC`: processes of the plugin's *user* (all of them, not just
    /// this plugin's; root is exempt). `pids` is the per-plugin limit.
    pub nproc: Option<u64>,
}

/// `isolation.network`: which network the plugin sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// The supervisor's own network namespace.
    #[default]
    Host,
    /// An empty network namespace: not even a loopback that is up. Its Unix
    /// socket still works (it is a file, not a network address).
    None,
}

/// `isolation:` — who the plugin runs as and what it can reach.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IsolationSpec {
    /// Run as this user (name or numeric uid); needs a root supervisor.
    pub user: Option<String>,
    /// Run with this group (name or numeric gid); defaults to the user's
    /// primary group.
    pub group: Option<String>,
    pub network: NetworkMode,
    /// `PR_SET_NO_NEW_PRIVS`: setuid binaries and file capabilities grant
    /// nothing to the plugin or its descendants.
    pub no_new_privs: bool,
    // Privileges (see crate::isolation::privileges).
    /// Capabilities kept across exec (`CAP_NET_BIND_SERVICE`, or `ALL`);
    /// every other one is dropped, the bounding set included.
    pub capabilities: Vec<String>,
    /// A plugin whose Initialize reports another version than `version:`
    /// fails to start, instead of starting with a warning.
    pub require_version_match: bool,
    // --- seccomp and PID namespace (isolation/seccomp.rs, isolation/pidns.rs)
    /// The seccomp filter: `default`, `unconfined`, or
    /// `{profile, action, allow, deny}`.
    pub seccomp: crate::isolation::seccomp::SeccompSpec,
    /// Run the plugin as PID 1 of its own PID namespace, so that its
    /// descendants die with it. On by default where the kernel allows.
    pub pid_namespace: bool,
    // --- end seccomp and PID namespace
    /// The filesystem view (Landlock): `host`, `read-only`, or
    /// `{view, writable, best_effort}`.
    pub filesystem: crate::isolation::landlock::FilesystemSpec,
}

impl Default for IsolationSpec {
    fn default() -> Self {
        IsolationSpec {
            user: None,
            group: None,
            network: NetworkMode::Host,
            no_new_privs: true,
            capabilities: Vec::new(),
            require_version_match: false,
            seccomp: Default::default(),
            pid_namespace: true,
            filesystem: Default::default(),
        }
    }
}

/// `calls:` — backpressure: how many calls a plugin takes at once (across
/// its replicas) and how many may wait for a slot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallLimits {
    pub max_in_flight: usize,
    /// Beyond this many waiting calls, new ones get RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// Calls per unit of time (`500/s`) across all methods; beyond it,
    /// RESOURCE_EXHAUSTED with a retry hint. See [`crate::ratelimit`].
    pub rate: Option<crate::ratelimit::Rate>,
    /// Calls let through at once after a quiet spell; default: one second's
    /// worth of `rate` (at least 1).
    #[serde(deserialize_with = "crate::ratelimit::de_burst")]
    pub burst: Option<u64>,
    /// Each method's own limit, checked before the plugin's:
    /// `methods: {resize: {rate: 50/s, burst: 10}}`.
    #[serde(deserialize_with = "crate::ratelimit::de_methods")]
    pub methods: BTreeMap<String, crate::ratelimit::MethodLimit>,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            max_in_flight: 1024,
            max_queue: 1024,
            rate: None,
            burst: None,
            methods: BTreeMap::new(),
        }
    }
}

/// `upgrade:` — how a new version takes over from a running one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpgradeSpec {
    /// After the switch the old instance stays up this long; if the new one
    /// exits or fails a health check meanwhile, calls go back to the old one.
    pub probation: HumanDuration,
}

impl Default for UpgradeSpec {
    fn default() -> Self {
        UpgradeSpec {
            probation: HumanDuration(Duration::from_secs(2)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    version: String,
    /// Instead of `exec`: a plugin on another host.
    #[serde(default)]
    remote: Option<remote::RawRemote>,
    /// Required, unless `container:` runs the plugin.
    #[serde(default)]
    exec: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    config: Option<serde_json::Value>,
    #[serde(default)]
    restart: RestartSpec,
    #[serde(default)]
    health: HealthSpec,
    #[serde(default)]
    timeouts: Timeouts,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    isolation: IsolationSpec,
    #[serde(default)]
    idempotent: Vec<String>,
    #[serde(default)]
    state: StateSpec,
    /// A count, or an autoscaling policy: see [`crate::autoscale`].
    #[serde(default = "one")]
    replicas: serde_json::Value,
    #[serde(default)]
    calls: CallLimits,
    #[serde(default)]
    upgrade: UpgradeSpec,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    hooks: HooksSpec,
    #[serde(default)]
    container: Option<ContainerSpec>,
    #[serde(default)]
    requires: Vec<crate::dependencies::RawRequirement>,
    survive_supervisor: Option<SurvivePolicy>,
}

fn one() -> serde_json::Value {
    1.into()
}

/// A validated manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub name: String,
    pub version: semver::Version,
    /// The `plugin.yaml` this came from.
    pub path: PathBuf,
    /// Its directory: the plugin's working directory and the base of `exec`.
    pub dir: PathBuf,
    /// Absolute path of the executable.
    pub exec: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Defaults sent in Initialize, under the supervisor config's overrides.
    pub config: serde_json::Map<String, serde_json::Value>,
    pub restart: RestartSpec,
    pub health: HealthSpec,
    pub timeouts: Timeouts,
    /// The executable's expected SHA-256, lowercase hex: checked on the very
    /// bytes that are executed, at every start.
    pub sha256: Option<String>,
    pub limits: Limits,
    pub isolation: IsolationSpec,
    /// Methods safe to send again: a call to one of these that loses its
    /// instance mid-flight is retried on the next ready instance (within its
    /// deadline). Every other call is sent at most once.
    pub idempotent: Vec<String>,
    pub state: StateSpec,
    /// Identical children; calls go to the least-loaded ready one. With
    /// `autoscale`, the count started with (its `min`).
    pub replicas: u32,
    /// `replicas: {min, max, ...}`: the replica count follows the load.
    pub autoscale: Option<crate::autoscale::AutoscaleSpec>,
    pub calls: CallLimits,
    pub upgrade: UpgradeSpec,
    /// The text this was parsed from: what a hand-over to a new supervisor
    /// image carries (the file may have changed since).
    pub source: std::sync::Arc<str>,
    /// Set for a plugin on another host (`remote:`): it is connected to,
    /// not spawned, and `exec` is empty.
    pub remote: Option<RemoteSpec>,
    /// What the plugin provides (`image.resize`): calls can name one
    /// instead of a plugin. See [`crate::capability`].
    pub capabilities: Vec<String>,
    /// Commands run at pre-start, post-ready, pre-stop and post-exit.
    pub hooks: HooksSpec,
    /// Set when the plugin is an OCI container: `exec` is then the
    /// container runtime.
    pub container: Option<ContainerSpec>,
    /// The SHA-256 of the manifest text this was parsed from: what a
    /// signature is checked against (see [`crate::signature`]).
    pub source_sha256: String,
    /// Plugins that must be ready before this one starts (see
    /// [`crate::dependencies`]).
    pub requires: Vec<crate::dependencies::Requirement>,
    /// `survive_supervisor:`; unset takes the supervisor config's default.
    /// See [`crate::adopt`].
    pub survive_supervisor: Option<SurvivePolicy>,
}

/// Checks a plugin name: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid plugin name; expected 1-63 characters of a-z, 0-9, `_` or `-`, starting with a letter or digit"
        ))
    }
}

impl Manifest {
    /// Reads and validates one manifest file.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = read_bounded(path, MAX_MANIFEST_BYTES, "a plugin manifest")
            .map_err(|m| ManifestError::new(path, None, m))?;
        Manifest::parse(path, &text)
    }

    /// Validates manifest text that came from `path`. Text over
    /// [`MAX_MANIFEST_BYTES`], nesting deeper than [`MAX_DEPTH`] and YAML
    /// aliases are refused before the text is parsed.
    pub fn parse(path: &Path, text: &str) -> Result<Manifest, ManifestError> {
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::new(
                path,
                None,
                format!(
                    "is {} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit for a plugin manifest",
                    text.len()
                ),
            ));
        }
        check_shape(text, MAX_DEPTH).map_err(|m| ManifestError::new(path, None, m))?;
        let raw: RawManifest = serde_yaml::from_str(text).map_err(|e| yaml_error(path, &e))?;
        let err = |field: &str, msg: String| ManifestError::new(path, Some(field), msg);
        validate_name(&raw.name).map_err(|m| err("name", m))?;
        let version = semver::Version::parse(&raw.version).map_err(|e| {
            err(
                "version",
                format!(
                    "`{}` is not a semantic version (e.g. 1.2.0): {e}",
                    raw.version
                ),
            )
        })?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let remote = match raw.remote {
            Some(r) => {
                let keys: serde_yaml::Mapping =
                    serde_yaml::from_str(text).map_err(|e| yaml_error(path, &e))?;
                if let Some((field, why)) = remote::LOCAL_ONLY
                    .iter()
                    .find(|(field, _)| keys.contains_key(*field))
                {
                    return Err(err(
                        field,
                        format!(
                            "does not apply to a remote plugin ({why}); remove it, or remove `remote:`"
                        ),
                    ));
                }
                Some(
                    r.resolve(&dir)
                        .map_err(|(f, m)| err(&format!("remote.{f}"), m))?,
                )
            }
            None => None,
        };
        let (exec, container) = match (raw.exec, raw.container) {
            _ if remote.is_some() => (PathBuf::new(), None),
            (Some(exec), None) => {
                if exec.trim().is_empty() {
                    return Err(err("exec", "must name the plugin's executable".into()));
                }
                (dir.join(&exec), None)
            }
            (None, None) => {
                return Err(err(
                    "exec",
                    "missing: name the plugin's executable (or run it as a container with `container:`, or give `remote:` for a plugin on another host)".into(),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(err(
                    "container",
                    "a container plugin runs its image or bundle, not `exec`; remove one of them"
                        .into(),
                ));
            }
            (None, Some(c)) => {
                let c = c
                    .validate(&dir)
                    .map_err(|(f, m)| err(&format!("container.{f}"), m))?;
                if raw.sha256.is_some() {
                    return Err(err(
                        "sha256",
                        "pins an executable; pin a container's image by digest (`image: name@sha256:...`) instead".into(),
                    ));
                }
                if c.runtime == ContainerRuntime::Runc && !raw.args.is_empty() {
                    return Err(err(
                        "args",
                        "a runc bundle's command is its config.json's process.args; remove `args`"
                            .into(),
                    ));
                }
                (c.runtime_program(), Some(c))
            }
        };
        let config = match raw.config {
            None | Some(serde_json::Value::Null) => serde_json::Map::new(),
            Some(serde_json::Value::Object(map)) => map,
            Some(other) => {
                return Err(err(
                    "config",
                    format!("expected a mapping of keys to values, got `{other}`"),
                ));
            }
        };
        for key in raw.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(err("env", format!("`{key}` is not a valid variable name")));
            }
            if key.starts_with("PLUGVISOR_") {
                return Err(err(
                    "env",
                    format!("`{key}`: PLUGVISOR_* variables are set by the supervisor"),
                ));
            }
        }
        raw.hooks
            .validate()
            .map_err(|(f, m)| err(&format!("hooks.{f}"), m))?;
        validate_restart(&raw.restart).map_err(|(f, m)| err(&format!("restart.{f}"), m))?;
        if raw.health.interval.0.is_zero() {
            return Err(err("health.interval", "must be greater than zero".into()));
        }
        if raw.health.timeout.0.is_zero() {
            return Err(err("health.timeout", "must be greater than zero".into()));
        }
        if raw.health.failure_threshold == 0 {
            return Err(err("health.failure_threshold", "must be at least 1".into()));
        }
        let (replicas, autoscale) =
            crate::autoscale::parse_replicas(&raw.replicas).map_err(|(f, m)| err(&f, m))?;
        if raw.calls.max_in_flight == 0 {
            return Err(err("calls.max_in_flight", "must be at least 1".into()));
        }
        crate::ratelimit::validate(&raw.calls).map_err(|(f, m)| err(&f, m))?;
        crate::capability::validate_all(&raw.capabilities).map_err(|m| err("capabilities", m))?;
        if let Some(empty) = raw.idempotent.iter().find(|m| m.trim().is_empty()) {
            return Err(err("idempotent", format!("`{empty}` is not a method name")));
        }
        for (field, value) in [
            ("timeouts.start", raw.timeouts.start),
            ("timeouts.initialize", raw.timeouts.initialize),
            ("timeouts.call", raw.timeouts.call),
            ("timeouts.stop", raw.timeouts.stop),
        ] {
            if value.0.is_zero() {
                return Err(err(field, "must be greater than zero".into()));
            }
        }
        validate_limits(&raw.limits).map_err(|(f, m)| err(&format!("limits.{f}"), m))?;
        validate_isolation(&raw.isolation).map_err(|(f, m)| err(&format!("isolation.{f}"), m))?;
        let mut isolation = raw.isolation;
        isolation.filesystem.resolve_against(&dir);
        let sha256 = raw
            .sha256
            .map(|digest| validate_sha256(&digest).map_err(|m| err("sha256", m)))
            .transpose()?;
        let requires = crate::dependencies::parse(&raw.name, raw.requires)
            .map_err(|(field, m)| err(&field, m))?;
        Ok(Manifest {
            requires,
            name: raw.name,
            version,
            path: path.to_path_buf(),
            dir,
            exec,
            args: raw.args,
            env: raw.env,
            config,
            restart: raw.restart,
            health: raw.health,
            timeouts: raw.timeouts,
            sha256,
            limits: raw.limits,
            isolation,
            idempotent: raw.idempotent,
            state: raw.state,
            replicas,
            autoscale,
            calls: raw.calls,
            upgrade: raw.upgrade,
            source: text.into(),
            remote,
            capabilities: raw.capabilities,
            hooks: raw.hooks,
            container,
            source_sha256: crate::signature::sha256_hex(text.as_bytes()),
            survive_supervisor: raw.survive_supervisor,
        })
    }

    /// Checks that `exec` names an executable regular file.
    pub fn check_executable(&self) -> Result<(), ManifestError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&self.exec).map_err(|e| {
            ManifestError::new(
                &self.path,
                Some("exec"),
                format!("`{}`: {e}", self.exec.display()),
            )
        })?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(ManifestError::new(
                &self.path,
                Some("exec"),
                format!("`{}` is not an executable file", self.exec.display()),
            ));
        }
        Ok(())
    }
}

fn validate_restart(r: &RestartSpec) -> Result<(), (&'static str, String)> {
    if r.initial_backoff.0.is_zero() {
        return Err(("initial_backoff", "must be greater than zero".into()));
    }
    if r.max_backoff < r.initial_backoff {
        return Err((
            "max_backoff",
            format!(
                "{:?} is less than initial_backoff {:?}",
                r.max_backoff, r.initial_backoff
            ),
        ));
    }
    if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
        return Err((
            "multiplier",
            format!("{} must be at least 1.0", r.multiplier),
        ));
    }
    if !(0.0..=1.0).contains(&r.jitter) {
        return Err((
            "jitter",
            format!("{} must be between 0.0 and 1.0", r.jitter),
        ));
    }
    if r.window.0.is_zero() {
        return Err(("window", "must be greater than zero".into()));
    }
    Ok(())
}

pub(crate) fn validate_limits(l: &Limits) -> Result<(), (&'static str, String)> {
    const MIB: u64 = 1 << 20;
    if let Some(m) = l.memory
        && m.0 < MIB
    {
        return Err(("memory", format!("{m:?} is below the 1MiB minimum")));
    }
    if let Some(h) = l.memory_high {
        if h.0 < MIB {
            return Err(("memory_high", format!("{h:?} is below the 1MiB minimum")));
        }
        if let Some(m) = l.memory
            && h > m
        {
            return Err((
                "memory_high",
                format!(
                    "{h:?} is above `memory` ({m:?}); the throttling threshold must be at most the hard limit"
                ),
            ));
        }
    }
    if let Some(cpu) = l.cpu
        && !(cpu.is_finite() && cpu >= 0.01)
    {
        return Err((
            "cpu",
            format!("{cpu} must be a number of cores of at least 0.01 (e.g. 0.5)"),
        ));
    }
    for (field, value, min) in [
        ("pids", l.pids, 1),
        ("nofile", l.nofile, 16),
        ("nproc", l.nproc, 1),
    ] {
        if let Some(v) = value
            && v < min
        {
            return Err((field, format!("{v} is below the minimum of {min}")));
        }
    }
    if let Some(t) = l.cpu_time
        && t.0.is_zero()
    {
        return Err(("cpu_time", "must be greater than zero".into()));
    }
    Ok(())
}

fn validate_isolation(i: &IsolationSpec) -> Result<(), (&'static str, String)> {
    for (field, value) in [("user", &i.user), ("group", &i.group)] {
        if let Some(v) = value
            && (v.is_empty() || v.contains(['/', ':', '\0']) || v.trim() != v)
        {
            return Err((
                field,
                format!("`{v}` is not a valid {field} name or number"),
            ));
        }
    }
    crate::isolation::privileges::validate_capabilities(&i.capabilities)
        .map_err(|m| ("capabilities", m))?;
    i.filesystem.validate().map_err(|(f, m)| match f {
        "writable" => ("filesystem.writable", m),
        _ => ("filesystem", m),
    })?;
    Ok(())
}

/// Checks a `sha256:` pin: 64 hex digits (an optional `sha256:` prefix is
/// accepted). Returns it in lowercase.
fn validate_sha256(digest: &str) -> Result<String, String> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(format!(
            "`{digest}` is not a SHA-256 digest; expected 64 hex digits, as `sha256sum` prints"
        ))
    }
}

/// Turns a serde_yaml error into one that names the field where possible.
fn yaml_error(path: &Path, e: &serde_yaml::Error) -> ManifestError {
    let text = e.to_string();
    // serde_yaml says "restart: unknown field `x`, expected ..." or
    // "restart.initial_backoff: unknown unit ..."; the part before ": " is the
    // field path when it has no spaces.
    let (field, message) = match text.split_once(": ") {
        Some((head, rest)) if !head.contains(' ') && !head.is_empty() => {
            // A value's own error may name the field inside the section
            // ("calls: burst: ..."): keep the whole path.
            match rest.split_once(": ") {
                Some((inner, detail))
                    if !inner.is_empty()
                        && inner.chars().all(|c| {
                            c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)
                        }) =>
                {
                    (Some(format!("{head}.{inner}")), detail.to_string())
                }
                _ => (Some(head.to_string()), rest.to_string()),
            }
        }
        _ => (None, text.clone()),
    };
    ManifestError {
        file: path.to_path_buf(),
        field,
        message,
    }
}

/// What discovery found: the plugins that load, and the errors of those that
/// do not. One bad plugin never hides the good ones.
#[derive(Debug, Default)]
pub struct Discovery {
    pub manifests: Vec<Manifest>,
    pub errors: Vec<ManifestError>,
}

impl fmt::Display for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} plugin(s), {} error(s)",
            self.manifests.len(),
            self.errors.len()
        )
    }
}

/// Scans `plugins_dir` for plugins. A missing directory is an error; an
/// entry that is not a plugin directory is skipped.
pub fn discover(plugins_dir: &Path) -> Result<Discovery, ManifestError> {
    let entries = std::fs::read_dir(plugins_dir).map_err(|e| {
        ManifestError::new(
            plugins_dir,
            None,
            format!("cannot read the plugins directory: {e}"),
        )
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut found = Discovery::default();
    for dir in dirs {
        match load_plugin_dir(&dir) {
            Ok(Some(m)) => found.manifests.push(m),
            Ok(None) => {}
            Err(e) => found.errors.push(e),
        }
    }
    // Dependency order; a missing requirement or a cycle is an error.
    let manifests = std::mem::take(&mut found.manifests);
    found.manifests = crate::dependencies::resolve(manifests, &mut found.errors);
    Ok(found)
}

/// Loads `<dir>/plugin.yaml`, or the highest `<dir>/<semver>/plugin.yaml`.
fn load_plugin_dir(dir: &Path) -> Result<Option<Manifest>, ManifestError> {
    let dir_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let direct = dir.join(MANIFEST_FILE);
    let manifest_path = if direct.is_file() {
        direct
    } else {
        let mut versions: Vec<(semver::Version, PathBuf)> = std::fs::read_dir(dir)
            .map_err(|e| ManifestError::new(dir, None, format!("cannot read: {e}")))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let v = semver::Version::parse(&e.file_name().to_string_lossy()).ok()?;
                let path = e.path().join(MANIFEST_FILE);
                path.is_file().then_some((v, path))
            })
            .collect();
        versions.sort_by(|a, b| a.0.cmp(&b.0));
        match versions.pop() {
            Some((_, path)) => path,
            None => return Ok(None),
        }
    };
    let manifest = Manifest::load(&manifest_path)?;
    if manifest.name != dir_name {
        return Err(ManifestError::new(
            &manifest_path,
            Some("name"),
            format!(
                "`{}` does not match its directory `{dir_name}`",
                manifest.name
            ),
        ));
    }
    if let Some(version_dir) = manifest_path
        .parent()
        .filter(|p| *p != dir)
        .and_then(|p| p.file_name())
    {
        let version_dir = version_dir.to_string_lossy();
        if version_dir != manifest.version.to_string() {
            return Err(ManifestError::new(
                &manifest_path,
                Some("version"),
                format!(
                    "`{}` does not match its directory `{version_dir}`",
                    manifest.version
                ),
            ));
        }
    }
    if manifest.remote.is_none() {
        manifest.check_executable()?;
    }
    Ok(Some(manifest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(Path::new("/plugins/echo/plugin.yaml"), text)
    }

    #[test]
    fn parses_a_full_manifest() {
        let m = parse(
            "name: echo\nversion: 1.2.0\nexec: ./echo-plugin\nargs: [--fast]\nenv: {MODE: x}\n\
             config: {greeting: hi}\nrestart: {policy: always, initial_backoff: 50ms}\n\
             health: {interval: 2s}\ntimeouts: {start: 3s}\n",
        )
        .unwrap();
        assert_eq!(m.name, "echo");
        assert_eq!(m.version, semver::Version::new(1, 2, 0));
        assert_eq!(m.exec, PathBuf::from("/plugins/echo/./echo-plugin"));
        assert_eq!(m.args, vec!["--fast"]);
        assert_eq!(m.env["MODE"], "x");
        assert_eq!(m.config["greeting"], "hi");
        assert_eq!(m.restart.policy, RestartMode::Always);
        assert_eq!(m.restart.initial_backoff.0, Duration::from_millis(50));
        assert_eq!(m.restart.max_backoff.0, Duration::from_secs(30));
        assert_eq!(m.health.interval.0, Duration::from_secs(2));
        assert_eq!(m.timeouts.start.0, Duration::from_secs(3));
        assert_eq!(m.timeouts.stop.0, Duration::from_secs(10));
    }

    #[test]
    fn unknown_field_is_named_with_the_file() {
        let e = parse("name: echo\nversion: 1.0.0\nexec: ./x\ncolour: blue\n").unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("/plugins/echo/plugin.yaml"), "{text}");
        assert!(text.contains("unknown field `colour`"), "{text}");
    }

    #[test]
    fn unknown_nested_field_names_its_section() {
        let e =
            parse("name: echo\nversion: 1.0.0\nexec: ./x\nrestart: {polcy: never}\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("restart"), "{e}");
        assert!(e.message.contains("unknown field `polcy`"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            (
                "name: Echo!\nversion: 1.0.0\nexec: ./x\n",
                "name",
                "not a valid plugin name",
            ),
            (
                "name: echo\nversion: one\nexec: ./x\n",
                "version",
                "not a semantic version",
            ),
            (
                "name: echo\nversion: 1.0.0\nexec: ''\n",
                "exec",
                "must name",
            ),
            (
                "name: echo\nversion: 1.0.0\nexec: ./x\nconfig: [1, 2]\n",
                "config",
                "mapping",
            ),
            (
                "name: echo\nversion: 1.0.0\nexec: ./x\nenv: {PLUGVISOR_X: y}\n",
                "env",
                "set by the supervisor",
            ),
            (
                "name: echo\nversion: 1.0.0\nexec: ./x\nrestart: {multiplier: 0.5}\n",
                "restart.multiplier",
                "at least 1.0",
            ),
            (
                "name: echo\nversion: 1.0.0\nexec: ./x\nrestart: {jitter: 2.0}\n",
                "restart.jitter",
                "between",
            ),
            (
                "name: echo\nversion: 1.0.0\nexec: ./x\nrestart: {initial_backoff: 10s, max_backoff: 1s}\n",
                "restart.max_backoff",
                "less than",
            ),
            (
                "name: echo\nversion: 1.0.0\nexec: ./x\nhealth: {failure_threshold: 0}\n",
                "health.failure_threshold",
                "at least 1",
            ),
            (
                "name: echo\nversion: 1.0.0\nexec: ./x\ntimeouts: {stop: 0s}\n",
                "timeouts.stop",
                "greater than zero",
            ),
        ];
        for (text, field, needle) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn bad_duration_is_reported_with_its_location() {
        let e = parse("name: echo\nversion: 1.0.0\nexec: ./x\nrestart: {window: 5}\n").unwrap_err();
        // serde_yaml names the section and the line and column of the value.
        assert!(e.to_string().contains("no unit"), "{e}");
        assert!(e.to_string().contains("line 4 column"), "{e}");
        assert_eq!(e.field.as_deref(), Some("restart"), "{e}");
    }

    #[test]
    fn missing_required_field_is_named() {
        let e = parse("name: echo\nexec: ./x\n").unwrap_err();
        assert!(e.to_string().contains("missing field `version`"), "{e}");
    }

    #[test]
    fn parses_limits_isolation_and_pin() {
        let m = parse(
            "name: echo\nversion: 1.0.0\nexec: ./x\n\
             limits: {memory: 128MiB, memory_high: 100MiB, cpu: 0.5, pids: 64, nofile: 1024, core: 0, \
             data: 1GiB, cpu_time: 1h, nproc: 100}\n\
             isolation: {user: nobody, group: nogroup, network: none, no_new_privs: false}\n\
             sha256: sha256:9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08\n",
        )
        .unwrap();
        let l = &m.limits;
        assert_eq!(l.memory.unwrap().0, 128 << 20);
        assert_eq!(l.memory_high.unwrap().0, 100 << 20);
        assert_eq!(l.cpu, Some(0.5));
        assert_eq!(
            (l.pids, l.nofile, l.nproc),
            (Some(64), Some(1024), Some(100))
        );
        assert_eq!(l.core.unwrap().0, 0);
        assert_eq!(l.data.unwrap().0, 1 << 30);
        assert_eq!(l.cpu_time.unwrap().0, Duration::from_secs(3600));
        assert_eq!(m.isolation.user.as_deref(), Some("nobody"));
        assert_eq!(m.isolation.group.as_deref(), Some("nogroup"));
        assert_eq!(m.isolation.network, NetworkMode::None);
        assert!(!m.isolation.no_new_privs);
        assert_eq!(
            m.sha256.as_deref(),
            Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
        );
    }

    #[test]
    fn filesystem_paths_resolve_against_the_manifest_directory() {
        let m = Manifest::parse(
            Path::new("/etc/plugvisor/plugins/echo/plugin.yaml"),
            "name: echo\nversion: 1.0.0\nexec: ./x\nisolation:\n  filesystem: {writable: [data, /srv/echo]}\n",
        )
        .unwrap();
        let fs = &m.isolation.filesystem;
        assert_eq!(fs.view, crate::isolation::landlock::View::ReadOnly);
        assert_eq!(
            fs.writable,
            [
                PathBuf::from("/etc/plugvisor/plugins/echo/data"),
                PathBuf::from("/srv/echo")
            ]
        );
        let host = parse("name: echo\nversion: 1.0.0\nexec: ./x\n").unwrap();
        assert!(!host.isolation.filesystem.restricts(), "host by default");
    }

    #[test]
    fn isolation_defaults_are_hardened() {
        let m = parse("name: echo\nversion: 1.0.0\nexec: ./x\n").unwrap();
        assert!(m.isolation.no_new_privs);
        assert_eq!(m.isolation.network, NetworkMode::Host);
        assert!(m.isolation.user.is_none() && m.sha256.is_none());
        assert!(m.limits.memory.is_none() && m.limits.core.is_none());
    }

    #[test]
    fn bad_limits_isolation_and_pins_name_the_field() {
        let base = "name: echo\nversion: 1.0.0\nexec: ./x\n";
        let cases = [
            ("limits: {memory: 512KiB}", "limits.memory", "1MiB minimum"),
            (
                "limits: {memory: 64MiB, memory_high: 1GiB}",
                "limits.memory_high",
                "above `memory`",
            ),
            ("limits: {cpu: 0}", "limits.cpu", "at least 0.01"),
            ("limits: {cpu: .nan}", "limits.cpu", "at least 0.01"),
            ("limits: {pids: 0}", "limits.pids", "minimum of 1"),
            ("limits: {nofile: 3}", "limits.nofile", "minimum of 16"),
            (
                "limits: {cpu_time: 0s}",
                "limits.cpu_time",
                "greater than zero",
            ),
            (
                "isolation: {user: ''}",
                "isolation.user",
                "not a valid user",
            ),
            (
                "isolation: {group: 'a:b'}",
                "isolation.group",
                "not a valid group",
            ),
            (
                "isolation: {filesystem: {view: host, writable: [/srv]}}",
                "isolation.filesystem.writable",
                "only applies to `view: read-only`",
            ),
            ("sha256: abc", "sha256", "64 hex digits"),
            (
                "sha256: zz86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "sha256",
                "64 hex digits",
            ),
        ];
        for (extra, field, needle) in cases {
            let text = format!("{base}{extra}\n");
            let e = parse(&text).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
        // Type errors and unknown keys are caught by serde, with the section.
        for (extra, section, needle) in [
            (
                "limits: {memory: lots}",
                "limits",
                "does not start with a number",
            ),
            ("limits: {memory: 1 parsec}", "limits", "unknown size unit"),
            ("limits: {pids: -1}", "limits.pids", "expected u64"),
            ("limits: {swap: 1GiB}", "limits", "unknown field `swap`"),
            (
                "isolation: {network: bridge}",
                "isolation",
                "unknown variant `bridge`",
            ),
            (
                "isolation: {netwrk: none}",
                "isolation",
                "unknown field `netwrk`",
            ),
            (
                "isolation: {filesystem: {writeable: [/srv]}}",
                "isolation.filesystem",
                "unknown field `writeable`",
            ),
            (
                "isolation: {filesystem: readonly}",
                "isolation.filesystem",
                "unknown variant `readonly`",
            ),
            (
                "isolation: {capabilities: [CAP_NET_BIND_SERVICE, CAP_FLY]}",
                "isolation.capabilities",
                "`CAP_FLY` is not a capability",
            ),
        ] {
            let text = format!("{base}{extra}\n");
            let e = parse(&text).unwrap_err();
            let field = e.field.as_deref().unwrap_or_default();
            assert!(field.starts_with(section), "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
    }

    fn write_plugin(root: &Path, rel: &str, name: &str, version: &str) {
        use std::os::unix::fs::PermissionsExt;
        let dir = root.join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(MANIFEST_FILE),
            format!("name: {name}\nversion: {version}\nexec: ./run\n"),
        )
        .unwrap();
        std::fs::write(dir.join("run"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(dir.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn discovery_picks_the_highest_version_and_keeps_going_past_errors() {
        let root = tempfile::tempdir().unwrap();
        write_plugin(root.path(), "kv/1.0.0", "kv", "1.0.0");
        write_plugin(root.path(), "kv/1.10.0", "kv", "1.10.0");
        write_plugin(root.path(), "kv/1.9.0", "kv", "1.9.0");
        write_plugin(root.path(), "echo", "echo", "0.1.0");
        write_plugin(root.path(), "wrong", "other", "0.1.0");
        std::fs::create_dir_all(root.path().join("broken")).unwrap();
        std::fs::write(root.path().join("broken/plugin.yaml"), "name: [").unwrap();
        std::fs::create_dir_all(root.path().join("noexec")).unwrap();
        std::fs::write(
            root.path().join("noexec/plugin.yaml"),
            "name: noexec\nversion: 1.0.0\nexec: ./missing\n",
        )
        .unwrap();
        std::fs::create_dir_all(root.path().join("empty-dir")).unwrap();

        let found = discover(root.path()).unwrap();
        let names: Vec<_> = found
            .manifests
            .iter()
            .map(|m| format!("{}@{}", m.name, m.version))
            .collect();
        assert_eq!(names, vec!["echo@0.1.0", "kv@1.10.0"]);
        let errors: Vec<_> = found.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(
            errors.iter().any(|e| e.contains("broken/plugin.yaml")),
            "{errors:#?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("noexec/plugin.yaml") && e.contains("field `exec`")),
            "{errors:#?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("does not match its directory `wrong`")),
            "{errors:#?}"
        );
    }

    const HEAD: &str = "name: echo\nversion: 1.0.0\nexec: ./x\n";

    #[test]
    fn deeply_nested_manifests_are_refused_before_parsing() {
        // 200 KB of `[`: the YAML parser alone took over 30 s on this.
        let text = format!("{HEAD}config: {{a: {}}}\n", "[".repeat(100_000));
        let e = parse(&text).unwrap_err();
        assert!(
            e.to_string().starts_with("/plugins/echo/plugin.yaml: "),
            "{e}"
        );
        assert!(e.message.contains("deeper than 64 levels"), "{e}");
        let block: String = (0..100)
            .map(|d| format!("{}k{d}:\n", " ".repeat(d + 2)))
            .collect();
        let e = parse(&format!("{HEAD}config:\n{block}")).unwrap_err();
        assert!(e.message.contains("deeper than 64 levels"), "{e}");
        // Reasonable nesting is fine.
        let ok = format!(
            "{HEAD}config: {{a: {}1{}}}\n",
            "[".repeat(40),
            "]".repeat(40)
        );
        parse(&ok).unwrap();
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text =
            format!("{HEAD}config:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h", "i"]
            .windows(2)
            .map(|w| (w[0], w[1]))
        {
            text.push_str(&format!("  {name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("aliases"), "{e}");
    }

    #[test]
    fn oversized_manifests_are_refused_before_being_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugin.yaml");
        // A 10 MB string value.
        let text = format!("{HEAD}config: {{blob: \"{}\"}}\n", "x".repeat(10 << 20));
        std::fs::write(&path, &text).unwrap();
        let e = Manifest::load(&path).unwrap_err();
        assert_eq!(e.file, path);
        assert!(
            e.message
                .contains("1048576-byte limit for a plugin manifest"),
            "{e}"
        );
        let e = Manifest::parse(&path, &text).unwrap_err();
        assert!(e.message.contains("1048576-byte limit"), "{e}");
    }

    #[test]
    fn sizes_that_overflow_name_their_field() {
        let e = parse(&format!(
            "{HEAD}limits: {{memory: 99999999999999999999999GiB}}\n"
        ))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("limits.memory"), "{e}");
        assert!(e.message.contains("too large"), "{e}");
        let e = parse(&format!(
            "{HEAD}limits: {{pids: 99999999999999999999999}}\n"
        ))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("limits.pids"), "{e}");
        let e = parse(&format!(
            "{HEAD}timeouts: {{call: 99999999999999999999999h}}\n"
        ))
        .unwrap_err();
        assert!(
            e.field
                .as_deref()
                .unwrap_or_default()
                .starts_with("timeouts"),
            "{e}"
        );
        assert!(e.message.contains("too long"), "{e}");
        let e = parse(&format!("{HEAD}limits: {{cpu: .nan}}\n")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("limits.cpu"), "{e}");
        let e = parse(&format!("{HEAD}restart: {{multiplier: .inf}}\n")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("restart.multiplier"), "{e}");
        let e = parse(&format!("{HEAD}replicas: 99999999999\n")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("replicas"), "{e}");
    }

    #[test]
    fn missing_plugins_dir_is_an_error() {
        let e = discover(Path::new("/nonexistent/plugvisor-plugins")).unwrap_err();
        assert!(
            e.to_string().contains("cannot read the plugins directory"),
            "{e}"
        );
    }
}
