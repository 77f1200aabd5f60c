//! Tenants in the daemon: those the supervisor config declares
//! (`plugins.<plugin>.tenants.<tenant>`) and those added, enabled or
//! disabled at runtime (`plugvisor tenant ...`, the control API's `Tenant`
//! RPC). Runtime changes are kept in `<state_dir>/tenants.json`, so they
//! outlive reloads and restarts of the daemon; the config's tenants are
//! changed in the config (and a reload).
//!
//! Each enabled tenant runs as its own entry `<plugin>@<tenant>` (see
//! [`plugvisor::tenant`]); reloads keep these entries in step with the
//! plugin (a new version upgrades every tenant, a removed plugin removes
//! them). Every change runs under the reloader's lock, in its own task, so
//! a client that goes away mid-change leaves nothing half done.

use crate::reload::{Known, ReloadReport, Reloader, fingerprint};
use anyhow::Context;
use plugvisor::config::PluginOverride;
use plugvisor::error::Error;
use plugvisor::manifest::Manifest;
use plugvisor::supervisor::PluginInfo;
use plugvisor::tenant::{TenantSpec, entry_name, validate_tenant_name};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The file runtime tenant changes are kept in, under `state_dir`.
pub const TENANTS_FILE: &str = "tenants.json";

/// Tenant changes made at runtime.
#[derive(Debug, Default, Clone)]
pub struct RuntimeTenants {
    /// Tenants added with `tenant add`, by plugin: their specs as given.
    pub added: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    /// Entries (`<plugin>@<tenant>`) disabled with `tenant disable`.
    pub disabled: BTreeSet<String>,
}

fn file(state_dir: &Path) -> PathBuf {
    state_dir.join(TENANTS_FILE)
}

/// Parses a tenant spec strictly: unknown fields and bad limits are errors.
pub fn parse_spec(tenant: &str, value: &serde_json::Value) -> Result<TenantSpec, String> {
    let spec: TenantSpec = serde_json::from_value(value.clone())
        .map_err(|e| format!("tenant `{tenant}`: {e}; expected {{config, env, limits}}"))?;
    plugvisor::tenant::validate(tenant, &spec, &format!("tenant `{tenant}`"))?;
    Ok(spec)
}

impl RuntimeTenants {
    /// Reads `<state_dir>/tenants.json`; a missing file holds nothing.
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = file(state_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_json(&text)
                .with_context(|| format!("{}: not a tenants file", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// `{"added": {plugin: {tenant: spec}}, "disabled": ["p@t", ...]}`.
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"added": self.added, "disabled": self.disabled})
    }

    fn from_json(text: &str) -> anyhow::Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)?;
        let Some(object) = value.as_object() else {
            anyhow::bail!("expected a JSON object");
        };
        let mut tenants = RuntimeTenants::default();
        for (key, value) in object {
            match key.as_str() {
                "added" => {
                    tenants.added = serde_json::from_value(value.clone())
                        .context("`added`: expected {plugin: {tenant: spec}}")?
                }
                "disabled" => {
                    tenants.disabled = serde_json::from_value(value.clone())
                        .context("`disabled`: expected a list of names")?
                }
                other => anyhow::bail!("unknown field `{other}`"),
            }
        }
        Ok(tenants)
    }

    /// Writes the file atomically (temp file, fsync, rename).
    fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        let path = file(state_dir);
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let tmp = state_dir.join(format!(".{TENANTS_FILE}.tmp"));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(serde_json::to_string_pretty(&self.to_json())?.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(state_dir)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write {}", path.display()));
        }
        Ok(())
    }

    /// Every tenant of `plugin`, from the config's overrides and from
    /// runtime: (tenant, spec or why it is unusable, source, enabled).
    fn of(&self, plugin: &str, overrides: &PluginOverride) -> Vec<Tenant> {
        let mut all: Vec<Tenant> = overrides
            .tenants
            .iter()
            .map(|(tenant, spec)| Tenant {
                plugin: plugin.to_string(),
                tenant: tenant.clone(),
                spec: Ok(spec.clone()),
                source: "config",
                enabled: spec.enabled != Some(false),
            })
            .collect();
        for (tenant, value) in self.added.get(plugin).into_iter().flatten() {
            if overrides.tenants.contains_key(tenant) {
                continue;
            }
            let spec = parse_spec(tenant, value);
            all.push(Tenant {
                plugin: plugin.to_string(),
                tenant: tenant.clone(),
                enabled: spec.as_ref().is_ok_and(|s| s.enabled != Some(false)),
                spec,
                source: "runtime",
            });
        }
        for t in &mut all {
            if self.disabled.contains(&entry_name(plugin, &t.tenant)) {
                t.enabled = false;
            }
        }
        all
    }
}

/// One tenant as the daemon sees it.
struct Tenant {
    plugin: String,
    tenant: String,
    spec: Result<TenantSpec, String>,
    source: &'static str,
    enabled: bool,
}

/// A tenant for `tenant list`.
pub struct TenantRow {
    pub plugin: String,
    pub tenant: String,
    pub source: String,
    pub enabled: bool,
    pub status: Option<PluginInfo>,
}

/// What a `Tenant` request asks.
#[derive(Debug, Clone)]
pub enum TenantOp {
    List {
        plugin: Option<String>,
    },
    Add {
        plugin: String,
        tenant: String,
        spec: serde_json::Value,
    },
    Remove {
        plugin: String,
        tenant: String,
    },
    Enable {
        plugin: String,
        tenant: String,
    },
    Disable {
        plugin: String,
        tenant: String,
    },
}

impl Reloader {
    /// Starts, upgrades or leaves as they are the enabled tenants of
    /// `manifest`'s plugin, adding their entries to `wanted` (the rest are
    /// removed by the caller).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn sync_tenants(
        &self,
        manifest: &Manifest,
        overrides: &PluginOverride,
        tenants: &RuntimeTenants,
        known: &mut BTreeMap<String, String>,
        running: &[String],
        report: &mut ReloadReport,
        wanted: &mut Vec<String>,
    ) {
        for t in tenants.of(&manifest.name, overrides) {
            let name = entry_name(&t.plugin, &t.tenant);
            if !t.enabled {
                continue;
            }
            let spec = match t.spec {
                Ok(spec) => spec,
                Err(why) => {
                    report.failed.push((name, why));
                    continue;
                }
            };
            wanted.push(name.clone());
            let (m, o) = match plugvisor::tenant::entry_for(manifest, overrides, &t.tenant, &spec) {
                Ok(entry) => entry,
                Err(why) => {
                    report.failed.push((name, why));
                    continue;
                }
            };
            let print = format!("{}\n{spec:?}", fingerprint(&m, &o));
            if !running.contains(&name) {
                match self.supervisor.add(m, &o) {
                    Ok(()) => {
                        known.insert(name.clone(), print);
                        report.added.push(name);
                    }
                    Err(e) => report.failed.push((name, e.to_string())),
                }
            } else if known.get(&name) == Some(&print) {
                report.unchanged.push(name);
            } else {
                match self.replace(&name, m, o).await {
                    Ok(()) => {
                        known.insert(name.clone(), print);
                        report.upgraded.push(name);
                    }
                    Err(e) => report.failed.push((name, e.to_string())),
                }
            }
        }
    }

    /// Upgrades the running tenants of `manifest`'s plugin (or only
    /// `only`) to it, even if nothing seems changed (`restart --upgrade`).
    pub(crate) async fn upgrade_tenants(
        &self,
        known: &mut Known,
        manifest: &Manifest,
        overrides: &PluginOverride,
        only: Option<&str>,
    ) -> Result<(), Error> {
        let running = self.supervisor.names();
        let mut failed = Vec::new();
        let mut found = false;
        for t in known.tenants.of(&manifest.name, overrides) {
            if only.is_some_and(|o| o != t.tenant) {
                continue;
            }
            let name = entry_name(&t.plugin, &t.tenant);
            if !running.contains(&name) {
                continue;
            }
            found = true;
            let spec = match t.spec {
                Ok(spec) => spec,
                Err(why) => {
                    failed.push(format!("{name}: {why}"));
                    continue;
                }
            };
            let (m, o) = plugvisor::tenant::entry_for(manifest, overrides, &t.tenant, &spec)
                .map_err(Error::Invalid)?;
            let print = format!("{}\n{spec:?}", fingerprint(&m, &o));
            match self.replace(&name, m, o).await {
                Ok(()) => {
                    known.fingerprints.insert(name, print);
                }
                Err(e) => failed.push(format!("{name}: {e}")),
            }
        }
        if let Some(tenant) = only
            && !found
        {
            return Err(Error::UnknownPlugin(entry_name(&manifest.name, tenant)));
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "not every tenant was upgraded: {}",
                failed.join("; ")
            )))
        }
    }

    /// Carries out a tenant request in its own task: it finishes (or rolls
    /// back) even if the caller goes away.
    pub async fn tenant(self: &Arc<Self>, op: TenantOp) -> Result<Vec<TenantRow>, Error> {
        let this = self.clone();
        tokio::spawn(async move { this.tenant_now(op).await })
            .await
            .map_err(|e| Error::Invalid(format!("the tenant change failed: {e}")))?
    }

    async fn tenant_now(&self, op: TenantOp) -> Result<Vec<TenantRow>, Error> {
        let mut guard = self.known.lock().await;
        let known = &mut *guard;
        let invalid = |m: String| Error::Invalid(m);
        let check = |plugin: &str, tenant: &str| -> Result<(), Error> {
            plugvisor::manifest::validate_name(plugin).map_err(invalid)?;
            validate_tenant_name(tenant).map_err(invalid)
        };
        let (plugin, tenant) = match &op {
            TenantOp::List { plugin } => return Ok(self.rows(known, plugin.as_deref())),
            TenantOp::Add { plugin, tenant, .. }
            | TenantOp::Remove { plugin, tenant }
            | TenantOp::Enable { plugin, tenant }
            | TenantOp::Disable { plugin, tenant } => (plugin.clone(), tenant.clone()),
        };
        check(&plugin, &tenant)?;
        let name = entry_name(&plugin, &tenant);
        let overrides = known
            .settings
            .plugins
            .get(&plugin)
            .cloned()
            .unwrap_or_default();
        let in_config = overrides.tenants.contains_key(&tenant);
        let at_runtime = known
            .tenants
            .added
            .get(&plugin)
            .is_some_and(|t| t.contains_key(&tenant));
        let mut next = known.tenants.clone();
        match op {
            TenantOp::List { .. } => unreachable!("answered above"),
            TenantOp::Add { spec, .. } => {
                if in_config || at_runtime {
                    return Err(invalid(format!(
                        "`{name}` already exists ({}); remove it first",
                        if in_config {
                            "declared in the supervisor config"
                        } else {
                            "added at runtime"
                        }
                    )));
                }
                let parsed = parse_spec(&tenant, &spec).map_err(invalid)?;
                let base = self.supervisor.manifest(&plugin)?;
                if plugvisor::tenant::split(&plugin).1.is_some() {
                    return Err(invalid(format!("`{plugin}` is a tenant, not a plugin")));
                }
                next.added
                    .entry(plugin.clone())
                    .or_default()
                    .insert(tenant.clone(), spec);
                next.disabled.remove(&name);
                next.save(&known.settings.state_dir)
                    .map_err(|e| invalid(format!("{e:#}")))?;
                let (m, o) = plugvisor::tenant::entry_for(&base, &overrides, &tenant, &parsed)
                    .map_err(invalid)?;
                let print = format!("{}\n{parsed:?}", fingerprint(&m, &o));
                if parsed.enabled != Some(false)
                    && let Err(e) = self.supervisor.add(m, &o)
                {
                    // Roll back: the file says what runs.
                    let _ = known.tenants.save(&known.settings.state_dir);
                    return Err(e);
                }
                known.fingerprints.insert(name.clone(), print);
            }
            TenantOp::Remove { .. } => {
                if in_config {
                    return Err(invalid(format!(
                        "`{name}` is declared in the supervisor config (plugins.{plugin}.tenants.{tenant}); remove it there and reload, or disable it"
                    )));
                }
                if !at_runtime {
                    return Err(Error::UnknownPlugin(name));
                }
                if let Some(t) = next.added.get_mut(&plugin) {
                    t.remove(&tenant);
                    if t.is_empty() {
                        next.added.remove(&plugin);
                    }
                }
                next.disabled.remove(&name);
                self.stop_entry(&name).await?;
                known.fingerprints.remove(&name);
                next.save(&known.settings.state_dir)
                    .map_err(|e| invalid(format!("{e:#}")))?;
            }
            TenantOp::Disable { .. } => {
                if !in_config && !at_runtime {
                    return Err(Error::UnknownPlugin(name));
                }
                next.disabled.insert(name.clone());
                next.save(&known.settings.state_dir)
                    .map_err(|e| invalid(format!("{e:#}")))?;
                self.stop_entry(&name).await?;
                known.fingerprints.remove(&name);
            }
            TenantOp::Enable { .. } => {
                if !in_config && !at_runtime {
                    return Err(Error::UnknownPlugin(name));
                }
                next.disabled.remove(&name);
                next.save(&known.settings.state_dir)
                    .map_err(|e| invalid(format!("{e:#}")))?;
                known.tenants = next.clone();
                if !self.supervisor.names().contains(&name) {
                    let base = self.supervisor.manifest(&plugin)?;
                    let mut report = ReloadReport::default();
                    self.sync_tenants(
                        &base,
                        &overrides,
                        &next,
                        &mut known.fingerprints,
                        &self.supervisor.names(),
                        &mut report,
                        &mut Vec::new(),
                    )
                    .await;
                    if let Some((_, why)) = report.failed.iter().find(|(n, _)| *n == name) {
                        return Err(invalid(why.clone()));
                    }
                }
            }
        }
        known.tenants = next;
        Ok(self
            .rows(known, Some(&plugin))
            .into_iter()
            .filter(|r| r.tenant == tenant)
            .collect())
    }

    /// Removes a tenant's entry if it runs (a last snapshot is taken).
    async fn stop_entry(&self, name: &str) -> Result<(), Error> {
        match self.supervisor.remove(name).await {
            Ok(()) | Err(Error::UnknownPlugin(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn rows(&self, known: &Known, plugin: Option<&str>) -> Vec<TenantRow> {
        let mut plugins: BTreeSet<String> = known.settings.plugins.keys().cloned().collect();
        plugins.extend(known.tenants.added.keys().cloned());
        plugins
            .into_iter()
            .filter(|p| plugin.is_none_or(|want| want == p))
            .flat_map(|p| {
                let overrides = known.settings.plugins.get(&p).cloned().unwrap_or_default();
                known.tenants.of(&p, &overrides)
            })
            .map(|t| TenantRow {
                status: self.supervisor.info(&entry_name(&t.plugin, &t.tenant)).ok(),
                plugin: t.plugin,
                tenant: t.tenant,
                source: t.source.to_string(),
                enabled: t.enabled,
            })
            .collect()
    }
}
