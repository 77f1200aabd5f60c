//! Reloading the daemon's plugins: re-read the supervisor config and the
//! plugins directory, then start added plugins (in dependency order), stop
//! removed ones (dependents first), and upgrade changed ones without
//! downtime ([`plugvisor::Supervisor::upgrade_with`]).
//! A plugin whose manifest no longer loads keeps running as it was, and the
//! report says why. Triggered by SIGHUP, `plugvisor reload`, and (for one
//! plugin) `plugvisor restart NAME --upgrade`.
//!
//! Of the global settings, a reload applies those that can change live
//! (`plugins_dir`, `plugins`, `control_uids`, `control_gids`, `strict`,
//! `trusted_keys`, `require_signatures`) and
//! reports the others that changed (see [`RESTART_SETTINGS`]) as needing a
//! restart: they keep their running values until then.

use crate::control::Access;
use plugvisor::config::{Config, PluginOverride};
use plugvisor::error::Error;
use plugvisor::manifest::{self, Manifest, ManifestError};
use plugvisor::supervisor::Supervisor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Reads the supervisor config afresh (the file, with command-line overrides).
pub type LoadConfig = std::sync::Arc<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub upgraded: Vec<String>,
    pub unchanged: Vec<String>,
    /// Plugins left as they were, and why.
    pub failed: Vec<(String, String)>,
    /// Global settings that changed and now apply.
    pub settings_applied: Vec<String>,
    /// Global settings that changed but apply only after a restart.
    pub settings_need_restart: Vec<String>,
    /// Running plugins whose signature does not verify under the reloaded
    /// `trusted_keys`/`require_signatures`, and why: they keep running, and
    /// their next start is refused.
    pub untrusted: Vec<(String, String)>,
}

/// Global settings a reload applies.
pub const LIVE_SETTINGS: &[&str] = &[
    "plugins_dir",
    "plugins",
    "control_uids",
    "control_gids",
    "strict",
    "trusted_keys",
    "require_signatures",
];

/// Global settings only a restart of the daemon applies: the directories
/// and sockets the running supervisor was built on, the log subscriber, the
/// metrics listener and the cgroup tree.
pub const RESTART_SETTINGS: &[&str] = &[
    "runtime_dir",
    "state_dir",
    "control_socket",
    "log_format",
    "metrics_address",
    "cgroup",
    "allow_writable_executables",
    "isolation",
    "health",
    "routing",
    "survive_supervisor",
];

/// The global settings that differ between `running` and `new`, as
/// (applied by a reload, needing a restart), each in the order of
/// [`LIVE_SETTINGS`] and [`RESTART_SETTINGS`].
pub fn changed_settings(running: &Config, new: &Config) -> (Vec<String>, Vec<String>) {
    // Config is compared through its Debug form where a field has no Eq.
    let same =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    let live = [
        running.plugins_dir == new.plugins_dir,
        same(&running.plugins, &new.plugins),
        running.control_uids == new.control_uids,
        running.control_gids == new.control_gids,
        running.strict == new.strict,
        running.trusted_keys == new.trusted_keys,
        running.require_signatures == new.require_signatures,
    ];
    let restart = [
        running.runtime_dir == new.runtime_dir,
        running.state_dir == new.state_dir,
        running.control_socket() == new.control_socket(),
        running.log_format == new.log_format,
        running.metrics_address == new.metrics_address,
        same(&running.cgroup, &new.cgroup),
        running.allow_writable_executables == new.allow_writable_executables,
        running.isolation == new.isolation,
        running.health == new.health,
        running.routing == new.routing,
        running.survive_supervisor == new.survive_supervisor,
    ];
    let names = |names: &[&str], same: &[bool]| {
        names
            .iter()
            .zip(same)
            .filter(|(_, same)| !**same)
            .map(|(name, _)| name.to_string())
            .collect()
    };
    (
        names(LIVE_SETTINGS, &live),
        names(RESTART_SETTINGS, &restart),
    )
}

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "added: {}; removed: {}; upgraded: {}; unchanged: {}",
            list(&self.added),
            list(&self.removed),
            list(&self.upgraded),
            list(&self.unchanged)
        )?;
        for (name, why) in &self.failed {
            write!(f, "; {name} unchanged because {why}")?;
        }
        if !self.settings_applied.is_empty() {
            write!(
                f,
                "; settings applied: {}",
                self.settings_applied.join(", ")
            )?;
        }
        if !self.settings_need_restart.is_empty() {
            write!(
                f,
                "; settings changed but not applied until a restart: {}",
                self.settings_need_restart.join(", ")
            )?;
        }
        for (name, why) in &self.untrusted {
            write!(
                f,
                "; {name} runs on but its next start is refused because {why}"
            )?;
        }
        Ok(())
    }
}

/// Keeps what the daemon runs in step with its config and plugins directory.
pub struct Reloader {
    pub(crate) supervisor: Supervisor,
    load_config: LoadConfig,
    /// What runs now. One lock, so reloads, upgrades and tenant changes
    /// take turns.
    pub(crate) known: tokio::sync::Mutex<Known>,
    /// Who may use the control socket; the control service reads it on
    /// every call.
    access: tokio::sync::watch::Sender<Access>,
}

/// What the daemon runs now.
pub(crate) struct Known {
    /// What each running plugin was started from, to see what changed.
    pub(crate) fingerprints: BTreeMap<String, String>,
    /// The settings in force: the live ones as last reloaded, the others as
    /// the daemon started with them.
    pub(crate) settings: Config,
    /// Tenants added, enabled or disabled at runtime (`plugvisor tenant`).
    pub(crate) tenants: crate::tenant::RuntimeTenants,
}

/// Identifies what a plugin runs: the manifest file's text, the executable's
/// size, mtime and inode, and the config's overrides.
pub(crate) fn fingerprint(manifest: &Manifest, overrides: &PluginOverride) -> String {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(&manifest.path).unwrap_or_default();
    let exec = std::fs::metadata(&manifest.exec)
        .map(|m| format!("{}:{}:{}:{}", m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
        .unwrap_or_default();
    format!(
        "{}\n{text}\n{exec}\n{}\n{}",
        manifest.path.display(),
        serde_json::Value::Object(overrides.config.clone()),
        serde_json::to_string(&overrides.env).unwrap_or_default()
    )
}

/// The plugin a discovery error belongs to: the first path component under
/// the plugins directory.
fn plugin_of(error: &ManifestError, plugins_dir: &Path) -> Option<String> {
    error
        .file
        .strip_prefix(plugins_dir)
        .ok()?
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
}

impl Reloader {
    /// `running` is the config the daemon started with; `access` is where the
    /// control service reads who may call it.
    pub fn new(
        supervisor: Supervisor,
        load_config: LoadConfig,
        running: Config,
        access: tokio::sync::watch::Sender<Access>,
    ) -> Reloader {
        Reloader {
            supervisor,
            load_config,
            known: tokio::sync::Mutex::new(Known {
                fingerprints: BTreeMap::new(),
                settings: running,
                tenants: Default::default(),
            }),
            access,
        }
    }

    /// Applies the live global settings of `new` over `running`.
    fn apply_settings(&self, running: &mut Config, new: &Config, changed: &[String]) {
        running.plugins_dir = new.plugins_dir.clone();
        running.plugins = new.plugins.clone();
        running.strict = new.strict;
        running.trusted_keys = new.trusted_keys.clone();
        running.require_signatures = new.require_signatures;
        if changed
            .iter()
            .any(|s| s == "control_uids" || s == "control_gids")
        {
            running.control_uids = new.control_uids.clone();
            running.control_gids = new.control_gids.clone();
            self.access.send_modify(|access| {
                access.uids = new.control_uids.clone();
                access.gids = new.control_gids.clone();
            });
            if let Err(e) =
                crate::control::give_socket_to_group(&running.control_socket(), &new.control_gids)
            {
                tracing::error!("reload: {e:#}");
            }
        }
    }

    /// Reads the config and the plugins directory on the blocking pool:
    /// file reads and YAML parsing never hold up a runtime worker, so the
    /// control API keeps answering during a reload.
    async fn discover(&self) -> anyhow::Result<(Config, manifest::Discovery)> {
        let load_config = self.load_config.clone();
        tokio::task::spawn_blocking(move || {
            let config = load_config()?;
            let discovery = manifest::discover(&config.plugins_dir)?;
            Ok((config, discovery))
        })
        .await
        .map_err(|e| anyhow::anyhow!("the plugins directory reader failed: {e}"))?
    }

    /// Brings the running plugins in line with the config and plugins dir.
    /// Fails (changing nothing) only when the config or the directory itself
    /// cannot be read.
    pub async fn reload(&self) -> anyhow::Result<ReloadReport> {
        let (config, discovery) = self.discover().await?;
        if config.strict && !discovery.errors.is_empty() {
            for error in &discovery.errors {
                tracing::error!("plugin not loaded: {error}");
            }
            anyhow::bail!(
                "{} plugin(s) failed to load and `strict` is set: {}",
                discovery.errors.len(),
                discovery
                    .errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        let mut guard = self.known.lock().await;
        let Known {
            fingerprints: known,
            settings,
            tenants,
        } = &mut *guard;
        // Checked when the config loaded; read the key files now, before
        // anything changes.
        let signatures = config.signature_policy().map_err(anyhow::Error::msg)?;
        let mut report = ReloadReport::default();
        (report.settings_applied, report.settings_need_restart) =
            changed_settings(settings, &config);
        self.apply_settings(settings, &config, &report.settings_applied);
        // Before plugins are added or upgraded, so they start under it. The
        // keys are compared, not only the config: a key file may change.
        if signatures.summary() != self.supervisor.signature_policy().summary() {
            if !report
                .settings_applied
                .iter()
                .any(|s| s == "trusted_keys" || s == "require_signatures")
            {
                report.settings_applied.push("trusted_keys".into());
            }
            tracing::info!(
                "reload: signatures are now checked with {}",
                signatures.summary()
            );
            report.untrusted = self.supervisor.set_signature_policy(signatures).await;
        }
        if !report.settings_need_restart.is_empty() {
            tracing::warn!(
                "reload: changed settings not applied until the daemon restarts: {}",
                report.settings_need_restart.join(", ")
            );
        }
        let mut broken: BTreeMap<String, String> = BTreeMap::new();
        for error in &discovery.errors {
            tracing::error!("plugin not loaded: {error}");
            if let Some(name) = plugin_of(error, &config.plugins_dir) {
                broken.insert(name, error.to_string());
            }
        }
        let running = self.supervisor.names();
        let mut wanted = Vec::new();
        for manifest in discovery.manifests {
            let name = manifest.name.clone();
            let overrides = config.plugins.get(&name).cloned().unwrap_or_default();
            if overrides.enabled == Some(false) {
                continue;
            }
            wanted.push(name.clone());
            let print = fingerprint(&manifest, &overrides);
            if !running.contains(&name) {
                match self.supervisor.add(manifest.clone(), &overrides) {
                    Ok(()) => {
                        known.insert(name.clone(), print);
                        report.added.push(name);
                    }
                    Err(e) => report.failed.push((name, e.to_string())),
                }
            } else if known.get(&name) == Some(&print) {
                report.unchanged.push(name);
            } else {
                match self
                    .replace(&name, manifest.clone(), overrides.clone())
                    .await
                {
                    Ok(()) => {
                        known.insert(name.clone(), print);
                        report.upgraded.push(name);
                    }
                    Err(e) => report.failed.push((name, e.to_string())),
                }
            }
            self.sync_tenants(
                &manifest,
                &overrides,
                tenants,
                known,
                &running,
                &mut report,
                &mut wanted,
            )
            .await;
        }
        // Removed in reverse dependency order: dependents first (additions
        // and upgrades above went in dependency order, as discovered).
        let leaving: Vec<String> = running
            .into_iter()
            .filter(|name| {
                // A tenant's entry stays as it was while its plugin's
                // manifest is broken, like the plugin itself.
                let base = plugvisor::tenant::split(name).0;
                let kept = wanted.contains(name)
                    || crate::registry::is_registered(&self.supervisor, name)
                    || (base != name && broken.contains_key(base));
                !kept
            })
            .collect();
        for name in self.supervisor.dependents_first(leaving) {
            if let Some(why) = broken.remove(&name) {
                report.failed.push((name, why));
                continue;
            }
            match self.supervisor.remove(&name).await {
                Ok(()) => {
                    known.remove(&name);
                    report.removed.push(name);
                }
                Err(e) => report.failed.push((name, e.to_string())),
            }
        }
        for (name, why) in broken {
            if !report.failed.iter().any(|(n, _)| *n == name) {
                report.failed.push((name, why));
            }
        }
        tracing::info!("reload: {report}");
        Ok(report)
    }

    /// Replaces a running plugin: an upgrade when the replica count is the
    /// same, else a stop and a fresh start.
    pub(crate) async fn replace(
        &self,
        name: &str,
        manifest: Manifest,
        overrides: PluginOverride,
    ) -> Result<(), Error> {
        let replicas = self.supervisor.info(name)?.replicas.len();
        if manifest.accepts_replicas(replicas) {
            self.supervisor
                .upgrade_with(name, manifest, overrides)
                .await
        } else {
            self.supervisor.remove(name).await?;
            self.supervisor.add(manifest, &overrides)
        }
    }

    /// Starts every plugin the config and plugins dir name (the daemon's
    /// start). Returns the plugins started and the discovery errors.
    pub async fn start(&self) -> anyhow::Result<(usize, Vec<ManifestError>)> {
        let (config, discovery) = self.discover().await?;
        let mut guard = self.known.lock().await;
        guard.tenants = crate::tenant::RuntimeTenants::load(&config.state_dir)?;
        let Known {
            fingerprints: known,
            tenants,
            ..
        } = &mut *guard;
        let mut started = 0;
        let mut errors = discovery.errors;
        for manifest in discovery.manifests {
            let overrides = config
                .plugins
                .get(&manifest.name)
                .cloned()
                .unwrap_or_default();
            if overrides.enabled == Some(false) {
                tracing::info!(plugin = %manifest.name, "disabled in the supervisor config; not started");
                continue;
            }
            let print = fingerprint(&manifest, &overrides);
            let (name, path) = (manifest.name.clone(), manifest.path.clone());
            // Refused when what it requires was left out (disabled).
            if let Err(e) = self.supervisor.add(manifest.clone(), &overrides) {
                if config.strict {
                    return Err(e.into());
                }
                errors.push(ManifestError {
                    file: path,
                    field: Some("requires".into()),
                    message: e.to_string(),
                });
                continue;
            }
            known.insert(name, print);
            started += 1;
            let mut report = ReloadReport::default();
            self.sync_tenants(
                &manifest,
                &overrides,
                tenants,
                known,
                &[],
                &mut report,
                &mut Vec::new(),
            )
            .await;
            started += report.added.len();
            for (name, why) in report.failed {
                tracing::error!(plugin = %name, "tenant not started: {why}");
            }
        }
        Ok((started, errors))
    }

    /// What each running plugin was started from, for a hand-over to a new
    /// daemon image (see [`crate::upgrade_self`]).
    pub async fn fingerprints(&self) -> BTreeMap<String, String> {
        self.known.lock().await.fingerprints.clone()
    }

    /// Carries on from a previous daemon image's [`Self::fingerprints`]:
    /// its plugins run already, so a reload compares against them.
    pub async fn resume(&self, fingerprints: BTreeMap<String, String>) {
        self.known.lock().await.fingerprints = fingerprints;
    }

    /// Upgrades one plugin to what its directory holds now (`restart
    /// --upgrade`), even if nothing seems changed.
    pub async fn upgrade(&self, name: &str) -> Result<(), Error> {
        // A tenant's entry upgrades to what its plugin's directory holds.
        let (name, tenant) = plugvisor::tenant::split(name);
        let (config, discovery) = self
            .discover()
            .await
            .map_err(|e| Error::Invalid(format!("{e:#}")))?;
        let dir: PathBuf = config.plugins_dir.join(name);
        if let Some(error) = discovery.errors.iter().find(|e| e.file.starts_with(&dir)) {
            return Err(Error::Invalid(format!(
                "not upgraded: its manifest does not load: {error}"
            )));
        }
        let manifest = discovery
            .manifests
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no plugin `{name}` in {}",
                    config.plugins_dir.display()
                ))
            })?;
        let overrides = config.plugins.get(name).cloned().unwrap_or_default();
        let print = fingerprint(&manifest, &overrides);
        let mut known = self.known.lock().await;
        if tenant.is_none() {
            self.replace(name, manifest.clone(), overrides.clone())
                .await?;
            known.fingerprints.insert(name.to_string(), print);
        }
        self.upgrade_tenants(&mut known, &manifest, &overrides, tenant)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_settings_are_not_reported() {
        let config = Config::default();
        let (applied, restart) = changed_settings(&config, &config.clone());
        assert!(applied.is_empty() && restart.is_empty());
    }

    #[test]
    fn separates_live_settings_from_those_needing_a_restart() {
        let running = Config::default();
        let mut new = running.clone();
        new.control_uids = vec![1000];
        new.control_gids = vec![27];
        new.strict = true;
        new.plugins.insert("echo".into(), PluginOverride::default());
        new.runtime_dir = "/run/elsewhere".into();
        new.cgroup.enabled = false;
        new.metrics_address = Some(([127, 0, 0, 1], 9464).into());
        new.log_format = plugvisor::config::LogFormat::Json;
        let (applied, restart) = changed_settings(&running, &new);
        assert_eq!(
            applied,
            ["plugins", "control_uids", "control_gids", "strict"]
        );
        // The control socket defaults to one in runtime_dir: it moves too.
        assert_eq!(
            restart,
            [
                "runtime_dir",
                "control_socket",
                "log_format",
                "metrics_address",
                "cgroup"
            ]
        );
    }

    #[test]
    fn the_report_says_which_settings_wait_for_a_restart() {
        let report = ReloadReport {
            settings_applied: vec!["control_uids".into()],
            settings_need_restart: vec!["state_dir".into(), "cgroup".into()],
            ..Default::default()
        };
        let text = report.to_string();
        assert!(text.contains("settings applied: control_uids"), "{text}");
        assert!(
            text.contains("not applied until a restart: state_dir, cgroup"),
            "{text}"
        );
    }
}
