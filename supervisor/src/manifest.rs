//! Plugin manifests (`plugin.yaml`) and discovery of plugins in a plugins
//! directory.
//!
//! A plugin is `<plugins_dir>/<name>/plugin.yaml`, or
//! `<plugins_dir>/<name>/<semver>/plugin.yaml` when several versions are
//! installed side by side (the highest version wins). Parsing is strict:
//! unknown fields and bad values are errors that name the file and the field.

use crate::units::HumanDuration;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file name every plugin directory holds.
pub const MANIFEST_FILE: &str = "plugin.yaml";

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

/// `calls:` — backpressure: how many calls a plugin takes at once (across
/// its replicas) and how many may wait for a slot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallLimits {
    pub max_in_flight: usize,
    /// Beyond this many waiting calls, new ones get RESOURCE_EXHAUSTED.
    pub max_queue: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            max_in_flight: 1024,
            max_queue: 1024,
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
    exec: String,
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
    idempotent: Vec<String>,
    #[serde(default)]
    state: StateSpec,
    #[serde(default = "one")]
    replicas: u32,
    #[serde(default)]
    calls: CallLimits,
    #[serde(default)]
    upgrade: UpgradeSpec,
}

fn one() -> u32 {
    1
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
    /// Methods safe to send again: a call to one of these that loses its
    /// instance mid-flight is retried on the next ready instance (within its
    /// deadline). Every other call is sent at most once.
    pub idempotent: Vec<String>,
    pub state: StateSpec,
    /// Identical children; calls go to the least-loaded ready one.
    pub replicas: u32,
    pub calls: CallLimits,
    pub upgrade: UpgradeSpec,
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
        let text = std::fs::read_to_string(path)
            .map_err(|e| ManifestError::new(path, None, format!("cannot read: {e}")))?;
        Manifest::parse(path, &text)
    }

    /// Validates manifest text that came from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Manifest, ManifestError> {
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
        if raw.exec.trim().is_empty() {
            return Err(err("exec", "must name the plugin's executable".into()));
        }
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let exec = dir.join(&raw.exec);
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
        if !(1..=64).contains(&raw.replicas) {
            return Err(err(
                "replicas",
                format!("{} is out of range; expected 1 to 64", raw.replicas),
            ));
        }
        if raw.calls.max_in_flight == 0 {
            return Err(err("calls.max_in_flight", "must be at least 1".into()));
        }
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
        Ok(Manifest {
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
            idempotent: raw.idempotent,
            state: raw.state,
            replicas: raw.replicas,
            calls: raw.calls,
            upgrade: raw.upgrade,
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

/// Turns a serde_yaml error into one that names the field where possible.
fn yaml_error(path: &Path, e: &serde_yaml::Error) -> ManifestError {
    let text = e.to_string();
    // serde_yaml says "restart: unknown field `x`, expected ..." or
    // "restart.initial_backoff: unknown unit ..."; the part before ": " is the
    // field path when it has no spaces.
    let (field, message) = match text.split_once(": ") {
        Some((head, rest)) if !head.contains(' ') && !head.is_empty() => {
            (Some(head.to_string()), rest.to_string())
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
    manifest.check_executable()?;
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

    #[test]
    fn missing_plugins_dir_is_an_error() {
        let e = discover(Path::new("/nonexistent/plugvisor-plugins")).unwrap_err();
        assert!(
            e.to_string().contains("cannot read the plugins directory"),
            "{e}"
        );
    }
}
