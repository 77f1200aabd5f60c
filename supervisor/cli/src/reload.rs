//! Reloading the daemon's plugins: re-read the supervisor config and the
//! plugins directory, then start added plugins, stop removed ones, and
//! upgrade changed ones without downtime ([`plugvisor::Supervisor::upgrade_with`]).
//! A plugin whose manifest no longer loads keeps running as it was, and the
//! report says why. Triggered by SIGHUP, `plugvisor reload`, and (for one
//! plugin) `plugvisor restart NAME --upgrade`.

use plugvisor::config::{Config, PluginOverride};
use plugvisor::error::Error;
use plugvisor::manifest::{self, Manifest, ManifestError};
use plugvisor::supervisor::Supervisor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Reads the supervisor config afresh (the file, with command-line overrides).
pub type LoadConfig = Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub upgraded: Vec<String>,
    pub unchanged: Vec<String>,
    /// Plugins left as they were, and why.
    pub failed: Vec<(String, String)>,
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
        Ok(())
    }
}

/// Keeps what the daemon runs in step with its config and plugins directory.
pub struct Reloader {
    supervisor: Supervisor,
    load_config: LoadConfig,
    /// What each running plugin was started from, to see what changed.
    fingerprints: tokio::sync::Mutex<BTreeMap<String, String>>,
}

/// Identifies what a plugin runs: the manifest file's text, the executable's
/// size, mtime and inode, and the config's overrides.
fn fingerprint(manifest: &Manifest, overrides: &PluginOverride) -> String {
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
    pub fn new(supervisor: Supervisor, load_config: LoadConfig) -> Reloader {
        Reloader {
            supervisor,
            load_config,
            fingerprints: tokio::sync::Mutex::default(),
        }
    }

    fn discover(&self) -> anyhow::Result<(Config, manifest::Discovery)> {
        let config = (self.load_config)()?;
        let discovery = manifest::discover(&config.plugins_dir)?;
        Ok((config, discovery))
    }

    /// Brings the running plugins in line with the config and plugins dir.
    /// Fails (changing nothing) only when the config or the directory itself
    /// cannot be read.
    pub async fn reload(&self) -> anyhow::Result<ReloadReport> {
        let (config, discovery) = self.discover()?;
        let mut known = self.fingerprints.lock().await;
        let mut report = ReloadReport::default();
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
                match self.supervisor.add(manifest, &overrides) {
                    Ok(()) => {
                        known.insert(name.clone(), print);
                        report.added.push(name);
                    }
                    Err(e) => report.failed.push((name, e.to_string())),
                }
            } else if known.get(&name) == Some(&print) {
                report.unchanged.push(name);
            } else {
                match self.replace(&name, manifest, overrides).await {
                    Ok(()) => {
                        known.insert(name.clone(), print);
                        report.upgraded.push(name);
                    }
                    Err(e) => report.failed.push((name, e.to_string())),
                }
            }
        }
        for name in running {
            if wanted.contains(&name) {
                continue;
            }
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
    async fn replace(
        &self,
        name: &str,
        manifest: Manifest,
        overrides: PluginOverride,
    ) -> Result<(), Error> {
        let replicas = self.supervisor.info(name)?.replicas.len();
        if replicas == manifest.replicas as usize {
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
        let (config, discovery) = self.discover()?;
        let mut known = self.fingerprints.lock().await;
        let mut started = 0;
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
            known.insert(manifest.name.clone(), fingerprint(&manifest, &overrides));
            self.supervisor.add(manifest, &overrides)?;
            started += 1;
        }
        Ok((started, discovery.errors))
    }

    /// Upgrades one plugin to what its directory holds now (`restart
    /// --upgrade`), even if nothing seems changed.
    pub async fn upgrade(&self, name: &str) -> Result<(), Error> {
        let (config, discovery) = self
            .discover()
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
        let mut known = self.fingerprints.lock().await;
        self.replace(name, manifest, overrides).await?;
        known.insert(name.to_string(), print);
        Ok(())
    }
}
