//! The supervisor's own configuration (`plugvisor.yaml`). Every value has a
//! default, so `plugvisor run --plugins-dir DIR` needs no file at all.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Largest config file accepted (1 MiB), refused before it is read whole.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

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
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginOverride {
    /// `false` keeps a discovered plugin from starting.
    pub enabled: Option<bool>,
    /// Deep-merged over the manifest's `config`.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Added to (and overriding) the manifest's `env`.
    pub env: BTreeMap<String, String>,
    /// Tenants of the plugin, each run as its own entry
    /// `<plugin>@<tenant>` (see [`crate::tenant`]).
    pub tenants: BTreeMap<String, crate::tenant::TenantSpec>,
}

/// `cgroup:` — where plugin cgroups are made, and whether they are a must.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupConfig {
    /// Where the cgroup filesystems are mounted; probed for cgroup v2, then
    /// v1 controllers, then a hybrid layout's `unified` tree.
    pub root: PathBuf,
    /// Without a writable cgroup tree, refuse to start instead of running
    /// plugins on rlimits alone.
    pub require: bool,
    /// `false`: do not use cgroups at all (rlimits only).
    pub enabled: bool,
    /// The cgroup under which each plugin instance gets its own: relative to
    /// each v1 hierarchy's root, or to the supervisor's own (delegated) cgroup
    /// on v2; `/`-prefixed means from the v2 root. Everything below it belongs
    /// to this daemon and is cleaned at start-up. Default: `plugvisor` with the
    /// default runtime_dir, else `plugvisor-<hash of runtime_dir>`, so two
    /// daemons never share one.
    pub parent: Option<String>,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            root: PathBuf::from("/sys/fs/cgroup"),
            require: false,
            enabled: true,
            parent: None,
        }
    }
}

/// `isolation:` — who plugins run as, and what every plugin must have.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IsolationConfig {
    /// The uids (and same-numbered gids) plugins without `isolation.user`
    /// get, one per plugin, when the supervisor is root.
    pub dynamic_users: crate::isolation::privileges::DynamicUsers,
    /// Run plugins without `isolation.user` as this user instead of a
    /// dynamic one (a name or a uid).
    pub user: Option<String>,
    /// Refuse to start a plugin whose manifest has no `sha256:` pin.
    pub require_pinning: bool,
}

/// `health:` — the standard gRPC health service (`grpc.health.v1.Health`)
/// on a TCP port, for probes such as Kubernetes' `grpc` liveness and
/// readiness probes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Where to serve it, e.g. `0.0.0.0:8081`; not served when unset.
    pub address: Option<std::net::SocketAddr>,
    /// The plugins readiness waits for (each needs a ready or degraded
    /// replica); default: every supervised plugin.
    pub required: Option<Vec<String>>,
}

/// `routing:` — where calls by capability go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Try local providers of a capability before remote ones; `false`:
    /// load alone decides.
    pub prefer_local: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig { prefer_local: true }
    }
}

/// Checks `cgroup.parent`: path components of letters, digits, `.`, `_`, `-`.
fn validate_cgroup_parent(parent: &str) -> Result<(), String> {
    let relative = parent.strip_prefix('/').unwrap_or(parent);
    let ok = !relative.is_empty()
        && relative.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{parent}` is not a cgroup path; expected names of letters, digits, `.`, `_` or `-` separated by `/`, such as `plugvisor` or `/plugvisor/prod`"
        ))
    }
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
    /// Where Prometheus metrics are served (`GET /metrics`), e.g.
    /// `127.0.0.1:9464`; not served when unset.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Refuse to start when any manifest fails to load or any plugin cannot
    /// be added; a reload then changes nothing while a manifest is broken.
    /// Plugins that fail to start or crash later are restarted, not fatal.
    pub strict: bool,
    /// Users (besides root and the daemon's own user) allowed on the control socket.
    pub control_uids: Vec<u32>,
    /// Groups allowed on the control socket.
    pub control_gids: Vec<u32>,
    pub plugins: BTreeMap<String, PluginOverride>,
    pub cgroup: CgroupConfig,
    /// Start executables that users other than their owner may write to.
    /// Off by default: such a file can be swapped under the supervisor.
    pub allow_writable_executables: bool,
    pub isolation: IsolationConfig,
    /// Where remote plugins announce themselves (TCP + mutual TLS); off
    /// when unset. See [`crate::registry`].
    pub registry: Option<crate::registry::RegistryConfig>,
    pub health: HealthConfig,
    pub routing: RoutingConfig,
    /// Public keys whose signatures plugins may carry (see
    /// [`crate::signature`]).
    pub trusted_keys: Vec<TrustedKeyConfig>,
    /// Refuse plugins without a valid signature by a trusted key.
    pub require_signatures: bool,
    /// The default of every manifest's `survive_supervisor` (the manifest
    /// wins when it sets one).
    pub survive_supervisor: crate::manifest::SurvivePolicy,
}

/// One entry of `trusted_keys`: a name and a minisign public key, inline
/// (`key: RW...`) or in a file (`key_file: release.pub`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKeyConfig {
    /// Shown as the signer in `inspect`, `ps --json` and metrics.
    pub name: String,
    #[serde(default)]
    pub key: Option<String>,
    /// Relative to the config file's directory.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
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
            metrics_address: None,
            strict: false,
            control_uids: Vec::new(),
            control_gids: Vec::new(),
            plugins: BTreeMap::new(),
            cgroup: CgroupConfig::default(),
            allow_writable_executables: false,
            isolation: IsolationConfig::default(),
            registry: None,
            health: HealthConfig::default(),
            routing: RoutingConfig::default(),
            trusted_keys: Vec::new(),
            require_signatures: false,
            survive_supervisor: crate::manifest::SurvivePolicy::OFF,
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
        let text = crate::manifest::read_bounded(path, MAX_CONFIG_BYTES, "a supervisor config")
            .map_err(err)?;
        crate::manifest::check_shape(&text, crate::manifest::MAX_DEPTH).map_err(err)?;
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
        if !config.cgroup.root.is_absolute() {
            return Err(err(format!(
                "cgroup.root: `{}` must be an absolute path, such as /sys/fs/cgroup",
                config.cgroup.root.display()
            )));
        }
        if let Some(parent) = &config.cgroup.parent {
            validate_cgroup_parent(parent).map_err(|m| err(format!("cgroup.parent: {m}")))?;
        }
        config
            .isolation
            .dynamic_users
            .validate()
            .map_err(|m| err(format!("isolation.dynamic_users: {m}")))?;
        if let Some(user) = &config.isolation.user
            && (user.is_empty() || user.contains(['/', ':', '\0']) || user.trim() != user)
        {
            return Err(err(format!(
                "isolation.user: `{user}` is not a valid user name or number"
            )));
        }
        if let Some(registry) = &mut config.registry {
            registry.resolve(base).map_err(err)?;
        }
        for (name, plugin) in &config.plugins {
            crate::manifest::validate_name(name)
                .map_err(|m| err(format!("plugins.{name}: {m}")))?;
            for (tenant, spec) in &plugin.tenants {
                crate::tenant::validate(tenant, spec, &format!("plugins.{name}.tenants.{tenant}"))
                    .map_err(err)?;
            }
        }
        for name in config.health.required.iter().flatten() {
            crate::manifest::validate_name(name)
                .map_err(|m| err(format!("health.required: {m}")))?;
        }
        for key in &mut config.trusted_keys {
            key.key_file = key.key_file.take().map(|p| base.join(p));
        }
        config.signature_policy().map_err(err)?;
        Ok(config)
    }

    /// The trusted keys, read and checked, and `require_signatures`.
    pub fn signature_policy(&self) -> Result<crate::signature::SignaturePolicy, String> {
        let mut trusted: Vec<crate::signature::TrustedKey> = Vec::new();
        for (i, k) in self.trusted_keys.iter().enumerate() {
            let at = format!("trusted_keys[{i}]");
            crate::manifest::validate_name(&k.name).map_err(|m| format!("{at}.name: {m}"))?;
            let text = match (&k.key, &k.key_file) {
                (Some(key), None) => key.clone(),
                (None, Some(file)) => crate::manifest::read_bounded(file, 4096, "a public key")
                    .map_err(|m| format!("{at}.key_file: {}: {m}", file.display()))?,
                _ => {
                    return Err(format!(
                        "{at} ({}): give exactly one of `key` (the minisign public key, RW...) or `key_file`",
                        k.name
                    ));
                }
            };
            let key = crate::signature::TrustedKey::parse(&k.name, &text)
                .map_err(|m| format!("{at} ({}): {m}", k.name))?;
            if let Some(other) = trusted
                .iter()
                .find(|t| t.name == key.name || t.key_id == key.key_id)
            {
                return Err(format!(
                    "{at} ({}): the same name or key id ({}) as `{}` listed before it",
                    k.name, key.key_id, other.name
                ));
            }
            trusted.push(key);
        }
        if self.require_signatures && trusted.is_empty() {
            return Err(
                "require_signatures: true needs at least one key in trusted_keys, or no plugin could start"
                    .into(),
            );
        }
        Ok(crate::signature::SignaturePolicy {
            trusted,
            require: self.require_signatures,
        })
    }

    /// `cgroup.parent`, defaulted: `plugvisor` for the default runtime
    /// directory, else `plugvisor-<hash>` of the runtime directory, which no
    /// two running daemons share (each owns its control socket there).
    pub fn cgroup_parent(&self) -> String {
        if let Some(parent) = &self.cgroup.parent {
            return parent.clone();
        }
        if self.runtime_dir == default_runtime_dir() {
            return "plugvisor".to_string();
        }
        // FNV-1a: stable across runs and builds, unlike std's hasher.
        let hash = self
            .runtime_dir
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
        format!("plugvisor-{:08x}", hash as u32)
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
    fn hostile_config_files_are_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugvisor.yaml");
        let deep = format!(
            "plugins: {{echo: {{config: {{a: {}}}}}}}\n",
            "[".repeat(100_000)
        );
        std::fs::write(&path, deep).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", path.display())), "{e}");
        assert!(e.contains("deeper than 64 levels"), "{e}");

        std::fs::write(&path, format!("plugins_dir: \"{}\"\n", "p".repeat(2 << 20))).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("1048576-byte limit for a supervisor config"),
            "{e}"
        );

        std::fs::write(&path, "plugins_dir: &p p\nstate_dir: *p\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("aliases"), "{e}");
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
    fn cgroup_settings_parse_and_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugvisor.yaml");
        std::fs::write(&path, "").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.cgroup.root, PathBuf::from("/sys/fs/cgroup"));
        assert!(c.cgroup.enabled && !c.cgroup.require && !c.allow_writable_executables);
        assert_eq!(c.cgroup_parent(), "plugvisor");
        std::fs::write(&path, "runtime_dir: run\n").unwrap();
        let c = Config::load(&path).unwrap();
        // A non-default runtime dir gets its own, stable parent cgroup.
        let parent = c.cgroup_parent();
        assert!(parent.starts_with("plugvisor-"), "{parent}");
        assert_eq!(parent, c.cgroup_parent());
        let mut other = c.clone();
        other.runtime_dir = dir.path().join("elsewhere");
        assert_ne!(other.cgroup_parent(), parent);

        std::fs::write(
            &path,
            "cgroup: {root: /tmp/cg, require: true, parent: /plugvisor/prod}\nallow_writable_executables: true\n",
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.cgroup.root, PathBuf::from("/tmp/cg"));
        assert!(c.cgroup.require && c.allow_writable_executables);
        assert_eq!(c.cgroup_parent(), "/plugvisor/prod");
    }

    #[test]
    fn isolation_settings_default_to_dynamic_users_outside_debians_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugvisor.yaml");
        std::fs::write(&path, "").unwrap();
        let c = Config::load(&path).unwrap();
        // Above Debian's normal users (1000-59999), systemd's DynamicUser range.
        assert_eq!(
            (
                c.isolation.dynamic_users.first,
                c.isolation.dynamic_users.last
            ),
            (61184, 65519)
        );
        assert!(c.isolation.user.is_none() && !c.isolation.require_pinning);
        std::fs::write(
            &path,
            "isolation: {dynamic_users: {first: 70000, last: 70100}, user: nobody, require_pinning: true}\n",
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.isolation.dynamic_users.first, 70000);
        assert_eq!(c.isolation.user.as_deref(), Some("nobody"));
        assert!(c.isolation.require_pinning);
    }

    #[test]
    fn bad_cgroup_settings_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugvisor.yaml");
        for (text, needle) in [
            ("cgroup: {root: sys/fs/cgroup}\n", "cgroup.root"),
            ("cgroup: {parent: ../escape}\n", "cgroup.parent"),
            ("cgroup: {parent: 'a b'}\n", "cgroup.parent"),
            ("cgroup: {parent: /}\n", "cgroup.parent"),
            ("cgroup: {requre: true}\n", "unknown field `requre`"),
            ("cgroup: {require: maybe}\n", "cgroup.require"),
            (
                "allow_writable_executables: 1\n",
                "allow_writable_executables",
            ),
            (
                "isolation: {dynamic_users: {first: 0, last: 10}}\n",
                "isolation.dynamic_users",
            ),
            ("isolation: {user: 'a:b'}\n", "isolation.user"),
            ("isolation: {require_pining: true}\n", "require_pining"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Config::load(&path).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
            assert!(e.contains("plugvisor.yaml"), "{text}: {e}");
        }
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
