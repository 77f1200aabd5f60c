//! The supervisor's own configuration (`plugvisor.yaml`). Every value has a
//! default, so `plugvisor run --plugins-dir DIR` needs no file at all.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A config file that failed to load.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    pub message: String,
}

/// Log output format of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Per-plugin settings in the supervisor config, layered over the manifest.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginOverride {
    /// `false` keeps a discovered plugin from starting.
    pub enabled: Option<bool>,
    /// Deep-merged over the manifest's `config`.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Added to (and overriding) the manifest's `env`.
    pub env: BTreeMap<String, String>,
}

/// `plugvisor.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub plugins_dir: PathBuf,
    /// Sockets of plugins and the control socket live here.
    pub runtime_dir: PathBuf,
    /// Snapshots of plugin state.
    pub state_dir: PathBuf,
    /// Where the control API listens; defaults to `<runtime_dir>/control.sock`.
    pub control_socket: Option<PathBuf>,
    pub log_format: LogFormat,
    /// Any plugin error (bad manifest, failed start) stops the daemon.
    pub strict: bool,
    /// Users (besides root and the daemon's own user) allowed on the control socket.
    pub control_uids: Vec<u32>,
    /// Groups allowed on the control socket.
    pub control_gids: Vec<u32>,
    pub plugins: BTreeMap<String, PluginOverride>,
}

impl Default for Config {
    fn default() -> Self {
        let runtime_dir = default_runtime_dir();
        Config {
            plugins_dir: PathBuf::from("plugins"),
            state_dir: default_state_dir(),
            control_socket: None,
            runtime_dir,
            log_format: LogFormat::Text,
            strict: false,
            control_uids: Vec::new(),
            control_gids: Vec::new(),
            plugins: BTreeMap::new(),
        }
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `/run/plugvisor` for root, else `$XDG_RUNTIME_DIR/plugvisor`, else
/// `/tmp/plugvisor-<uid>`.
pub fn default_runtime_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/plugvisor");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("plugvisor"),
        _ => PathBuf::from(format!("/tmp/plugvisor-{}", nix::unistd::geteuid())),
    }
}

fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/plugvisor");
    }
    match std::env::var_os("XDG_STATE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("plugvisor"),
        _ => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".local/state/plugvisor"),
            None => default_runtime_dir().join("state"),
        },
    }
}

/// Where clients look for the daemon when not told: `PLUGVISOR_CONTROL`
/// (handled by the CLI) or the default runtime dir's `control.sock`.
pub fn default_control_socket() -> PathBuf {
    default_runtime_dir().join("control.sock")
}

impl Config {
    /// Reads a config file; relative paths in it are taken from its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError {
            file: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))?
        };
        let base = path.parent().unwrap_or(Path::new("."));
        config.plugins_dir = base.join(&config.plugins_dir);
        config.runtime_dir = base.join(&config.runtime_dir);
        config.state_dir = base.join(&config.state_dir);
        config.control_socket = config.control_socket.map(|p| base.join(p));
        for name in config.plugins.keys() {
            crate::manifest::validate_name(name)
                .map_err(|m| err(format!("plugins.{name}: {m}")))?;
        }
        Ok(config)
    }

    /// The control socket path, defaulted from `runtime_dir`.
    pub fn control_socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.runtime_dir.join("control.sock"))
    }
}

/// Merges `overlay` into `base`: objects merge key by key, recursively; any
/// other value in `overlay` replaces the one in `base`.
pub fn merge_json(
    base: &mut serde_json::Map<String, serde_json::Value>,
    overlay: &serde_json::Map<String, serde_json::Value>,
) {
    for (key, value) in overlay {
        match (base.get_mut(key), value) {
            (Some(serde_json::Value::Object(b)), serde_json::Value::Object(o)) => merge_json(b, o),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_file_gives_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugvisor.yaml");
        std::fs::write(&path, "").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.plugins_dir, dir.path().join("plugins"));
        assert_eq!(c.control_socket(), c.runtime_dir.join("control.sock"));
        assert!(!c.strict);
    }

    #[test]
    fn unknown_key_names_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugvisor.yaml");
        std::fs::write(&path, "plugins_dir: p\nplugin_dir: q\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("plugvisor.yaml"), "{e}");
        assert!(e.contains("unknown field `plugin_dir`"), "{e}");
    }

    #[test]
    fn overrides_parse_and_bad_plugin_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugvisor.yaml");
        std::fs::write(
            &path,
            "plugins:\n  echo:\n    config: {greeting: hello}\n    env: {A: b}\n    enabled: false\n",
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.plugins["echo"].config["greeting"], "hello");
        assert_eq!(c.plugins["echo"].enabled, Some(false));
        std::fs::write(&path, "plugins:\n  Bad!: {}\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("plugins.Bad!"), "{e}");
    }

    #[test]
    fn merge_is_deep_and_overlay_wins() {
        let mut base = json!({"a": 1, "nested": {"x": 1, "y": 2}, "list": [1]})
            .as_object()
            .cloned()
            .unwrap();
        let overlay = json!({"b": 2, "nested": {"y": 3}, "list": [2]})
            .as_object()
            .cloned()
            .unwrap();
        merge_json(&mut base, &overlay);
        assert_eq!(
            serde_json::Value::Object(base),
            json!({"a": 1, "b": 2, "nested": {"x": 1, "y": 3}, "list": [2]})
        );
    }
}
