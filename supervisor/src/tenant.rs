//! Per-tenant instances: one plugin, many tenants, each run as its own
//! supervised entry named `<plugin>@<tenant>`.
//!
//! A tenant's entry is the plugin's manifest under that name, with the
//! tenant's own config, environment and limits layered over the plugin's.
//! Because it is an entry like any other it has its own coordinator and
//! replicas, restart counters, cgroup (per instance), dynamic uid, snapshot
//! directory (`<state_dir>/<plugin>@<tenant>/`), logs and events; calls,
//! `inspect`, `logs`, `stop` and the rest name it `<plugin>@<tenant>`.
//! Stopping or removing one tenant touches no other.
//!
//! The plugin's metadata (Initialize's name, version and methods) belongs
//! to the binary, not to a tenant: [`MetadataCache`] keeps it by the
//! executable's SHA-256. The first instance of a binary to initialize fills
//! it; a tenant added later shows its methods and version at once (before
//! its own instance is ready), and every tenant instance's Initialize reply
//! is checked against it: a binary that answers differently for another
//! tenant is refused, since its metadata is not what it says it is. Each
//! instance is still initialized with its own config: that call cannot be
//! shared.

use crate::config::{PluginOverride, merge_json};
use crate::manifest::{Limits, Manifest};
use plugvisor_proto::InitializeResponse;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Set in a tenant instance's environment: the tenant's name.
pub const TENANT_ENV: &str = "PLUGVISOR_TENANT";

/// One tenant of a plugin: what it runs with on top of the plugin's own
/// settings (the supervisor config's `plugins.<name>.tenants.<tenant>`, or
/// `plugvisor tenant add`).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantSpec {
    /// `false`: declared, but not started.
    pub enabled: Option<bool>,
    /// Deep-merged over the plugin's config (manifest < supervisor config
    /// < tenant).
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Added to the plugin's environment.
    pub env: BTreeMap<String, String>,
    /// Each limit given replaces the manifest's for this tenant's
    /// instances (`memory`, `cpu`, `pids`, ... as under `limits:`).
    pub limits: Limits,
}

/// Checks a tenant name: `[a-z][a-z0-9_-]{0,31}`. It becomes part of file,
/// socket and cgroup names, so nothing else is allowed; it starts with a
/// letter so `<plugin>@<tenant>` never reads as a replica (`<plugin>@1`).
pub fn validate_tenant_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if first_ok && rest_ok && name.len() <= 32 {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid tenant name; expected 1-32 characters of a-z, 0-9, `_` or `-`, starting with a letter"
        ))
    }
}

/// The entry name of `tenant` of `plugin`: `<plugin>@<tenant>`.
pub fn entry_name(plugin: &str, tenant: &str) -> String {
    format!("{plugin}@{tenant}")
}

/// Splits an entry name into its plugin and tenant (`None` for a plugin's
/// own entry).
pub fn split(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((plugin, tenant)) => (plugin, Some(tenant)),
        None => (name, None),
    }
}

/// Checks a tenant spec: its name, environment and limits, with errors
/// naming the field under `field` (e.g. `plugins.kv.tenants.acme`).
pub fn validate(tenant: &str, spec: &TenantSpec, field: &str) -> Result<(), String> {
    validate_tenant_name(tenant).map_err(|m| format!("{field}: {m}"))?;
    for key in spec.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(format!("{field}.env: `{key}` is not a valid variable name"));
        }
        if key.starts_with("PLUGVISOR_") {
            return Err(format!(
                "{field}.env: `{key}`: PLUGVISOR_* variables are set by the supervisor"
            ));
        }
    }
    crate::manifest::validate_limits(&spec.limits)
        .map_err(|(f, m)| format!("{field}.limits.{f}: {m}"))
}

/// Fills the limits `over` gives into `base`.
fn merge_limits(base: &mut Limits, over: &Limits) {
    macro_rules! take {
        ($($f:ident),*) => {$(
            if over.$f.is_some() {
                base.$f = over.$f.clone();
            }
        )*};
    }
    take!(
        memory,
        memory_high,
        cpu,
        pids,
        nofile,
        core,
        data,
        cpu_time,
        nproc
    );
}

/// The manifest and supervisor-config overrides of `tenant`'s entry: the
/// plugin's manifest renamed `<plugin>@<tenant>`, with the tenant's limits
/// and `PLUGVISOR_TENANT`, and the plugin's overrides with the tenant's
/// config and environment merged over them.
pub fn entry_for(
    base: &Manifest,
    base_overrides: &PluginOverride,
    tenant: &str,
    spec: &TenantSpec,
) -> Result<(Manifest, PluginOverride), String> {
    validate(tenant, spec, &format!("tenant `{tenant}`"))?;
    if split(&base.name).1.is_some() {
        return Err(format!("`{}` is already a tenant's entry", base.name));
    }
    let mut manifest = base.clone();
    manifest.name = entry_name(&base.name, tenant);
    merge_limits(&mut manifest.limits, &spec.limits);
    manifest
        .env
        .insert(TENANT_ENV.to_string(), tenant.to_string());
    let mut overrides = base_overrides.clone();
    overrides.enabled = None;
    merge_json(&mut overrides.config, &spec.config);
    overrides.env.extend(spec.env.clone());
    Ok((manifest, overrides))
}

/// What Initialize says about a binary. (Its `name` is not part of it: a
/// plugin may answer with the entry name it was given.)
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    pub version: String,
    pub methods: Vec<String>,
    pub stream_methods: Vec<String>,
}

impl Metadata {
    fn of(reply: &InitializeResponse) -> Self {
        let sorted = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v.dedup();
            v
        };
        Metadata {
            version: reply.version.clone(),
            methods: sorted(&reply.methods),
            stream_methods: sorted(&reply.stream_methods),
        }
    }
}

/// A file's identity: when it changes, its digest is computed again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileId {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileId {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

#[derive(Default)]
struct CacheInner {
    /// Digests of executables, by file identity: hashed once per file.
    digests: HashMap<FileId, String>,
    /// Metadata by digest.
    metadata: HashMap<String, Arc<Metadata>>,
}

/// Plugin metadata by the executable's SHA-256 (see the module docs). One
/// lock: each use is a map look-up; hashing happens outside it.
#[derive(Default)]
pub struct MetadataCache {
    inner: Mutex<CacheInner>,
}

/// How an instance's Initialize reply compared with the cache.
#[derive(Debug, Clone, PartialEq)]
pub enum Checked {
    /// The first reply of this binary: now cached.
    Cached,
    /// The same as the cached reply.
    Matches,
}

impl MetadataCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        // Map inserts only: a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The executable's digest, if it was computed for the file as it is
    /// now (a `stat`, no reading): cheap enough for any caller.
    pub fn known_digest(&self, exec: &Path) -> Option<String> {
        let id = FileId::of(exec).ok()?;
        self.lock().digests.get(&id).cloned()
    }

    /// The executable's digest, computed once per file identity. Reads the
    /// whole file the first time: call it on the blocking pool.
    pub fn digest_blocking(&self, exec: &Path) -> std::io::Result<String> {
        let id = FileId::of(exec)?;
        if let Some(d) = self.lock().digests.get(&id) {
            return Ok(d.clone());
        }
        let digest = crate::isolation::pin::sha256_file(exec)?;
        self.lock().digests.insert(id, digest.clone());
        Ok(digest)
    }

    /// The cached metadata of the binary with this digest.
    pub fn get(&self, digest: &str) -> Option<Arc<Metadata>> {
        self.lock().metadata.get(digest).cloned()
    }

    /// Caches `reply` as the metadata of `digest`, or checks it against
    /// what is cached; a difference is an error that names it.
    pub fn check(&self, key: &str, reply: &InitializeResponse) -> Result<Checked, String> {
        let digest = key.split(' ').next().unwrap_or(key);
        let new = Metadata::of(reply);
        let mut inner = self.lock();
        match inner.metadata.get(key) {
            None => {
                inner.metadata.insert(key.to_string(), Arc::new(new));
                Ok(Checked::Cached)
            }
            Some(cached) if **cached == new => Ok(Checked::Matches),
            Some(cached) => {
                let mut diffs = Vec::new();
                if cached.version != new.version {
                    diffs.push(format!(
                        "version {} (cached: {})",
                        new.version, cached.version
                    ));
                }
                if cached.methods != new.methods {
                    diffs.push(format!(
                        "methods [{}] (cached: [{}])",
                        new.methods.join(", "),
                        cached.methods.join(", ")
                    ));
                }
                if cached.stream_methods != new.stream_methods {
                    diffs.push(format!(
                        "stream methods [{}] (cached: [{}])",
                        new.stream_methods.join(", "),
                        cached.stream_methods.join(", ")
                    ));
                }
                Err(format!(
                    "its Initialize reply differs from the metadata cached for the same binary (sha256 {digest}): {}; a binary's methods and version must not depend on its tenant",
                    diffs.join("; ")
                ))
            }
        }
    }
}

/// The cache key of what `manifest` runs: the executable's digest and its
/// arguments (one binary can serve different methods under different
/// arguments).
fn key(digest: &str, manifest: &Manifest) -> String {
    format!("{digest} {:?}", manifest.args)
}

/// Fills a new tenant entry's board with its binary's cached metadata, when
/// the binary was seen before: `inspect` shows its methods and version
/// before its own instance is ready.
pub(crate) fn prefill(cache: &MetadataCache, board: &crate::status::Board) {
    let mut b = board.lock();
    let manifest = b.spec.manifest.clone();
    if split(&manifest.name).1.is_none() {
        return;
    }
    let Some(digest) = cache.known_digest(&manifest.exec) else {
        return;
    };
    if let Some(m) = cache.get(&key(&digest, &manifest)) {
        b.methods = m.methods.clone();
        b.reported_version = (!m.version.is_empty()).then(|| m.version.clone());
    }
}

/// Checks a tenant instance's Initialize reply against its binary's
/// cached metadata (caching it if it is the first). Plugins' own entries
/// are not checked.
pub(crate) async fn check_instance(
    cache: &Arc<MetadataCache>,
    manifest: &Manifest,
    reply: &InitializeResponse,
) -> Result<(), String> {
    if split(&manifest.name).1.is_none() {
        return Ok(());
    }
    let exec = manifest.exec.clone();
    let hasher = cache.clone();
    let digest = tokio::task::spawn_blocking(move || hasher.digest_blocking(&exec))
        .await
        .map_err(|e| format!("hashing the executable failed: {e}"))?
        .map_err(|e| format!("cannot hash {}: {e}", manifest.exec.display()))?;
    match cache.check(&key(&digest, manifest), reply)? {
        Checked::Cached => {
            tracing::debug!(plugin = %manifest.name, "cached the metadata of sha256 {digest}")
        }
        Checked::Matches => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(version: &str, methods: &[&str]) -> InitializeResponse {
        InitializeResponse {
            name: "kv".into(),
            version: version.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn tenant_names_are_strict() {
        for good in ["acme", "a", "team-7", "b_2"] {
            assert!(validate_tenant_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Acme",
            "1st",
            "a/b",
            "..",
            "a.b",
            "a@b",
            "a b",
            "-x",
            "é",
            &"x".repeat(33),
        ] {
            let e = validate_tenant_name(bad).unwrap_err();
            assert!(e.contains("not a valid tenant name"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_tenant_entry_layers_its_config_env_and_limits_over_the_plugins() {
        let base = Manifest::parse(
            Path::new("/p/kv/plugin.yaml"),
            "name: kv\nversion: 1.0.0\nexec: ./kv\nconfig: {a: 1, nested: {x: 1, y: 1}}\nenv: {LANG: C}\nlimits: {memory: 128MiB, pids: 64}\n",
        )
        .unwrap();
        let mut base_overrides = PluginOverride::default();
        base_overrides.config.insert("b".into(), 2.into());
        let spec: TenantSpec = serde_yaml::from_str(
            "config: {b: 3, nested: {y: 2}}\nenv: {REGION: eu}\nlimits: {memory: 64MiB}\n",
        )
        .unwrap();
        let (m, o) = entry_for(&base, &base_overrides, "acme", &spec).unwrap();
        assert_eq!(m.name, "kv@acme");
        assert_eq!(m.limits.memory.unwrap().0, 64 << 20, "the tenant's limit");
        assert_eq!(
            m.limits.pids,
            Some(64),
            "the plugin's where the tenant sets none"
        );
        assert_eq!(m.env["PLUGVISOR_TENANT"], "acme");
        assert_eq!(o.env["REGION"], "eu");
        let spec_of = crate::spec::Spec::new(Arc::new(m), &o, &Default::default());
        assert_eq!(
            serde_json::Value::Object(spec_of.config),
            serde_json::json!({"a": 1, "b": 3, "nested": {"x": 1, "y": 2}})
        );
        // The base is untouched, and an entry cannot have tenants.
        assert_eq!(base.name, "kv");
        let (nested, _) = entry_for(&base, &base_overrides, "acme", &spec).unwrap();
        assert!(entry_for(&nested, &base_overrides, "x", &spec).is_err());
        let bad: TenantSpec = serde_yaml::from_str("env: {PLUGVISOR_X: y}").unwrap();
        let e = entry_for(&base, &base_overrides, "acme", &bad).unwrap_err();
        assert!(e.contains("set by the supervisor"), "{e}");
        assert!(serde_yaml::from_str::<TenantSpec>("limitz: {}").is_err());
    }

    #[test]
    fn splits_entry_names() {
        assert_eq!(split("kv@acme"), ("kv", Some("acme")));
        assert_eq!(split("kv"), ("kv", None));
        assert_eq!(entry_name("kv", "acme"), "kv@acme");
    }

    #[test]
    fn the_metadata_of_a_binary_is_cached_once_and_a_different_reply_is_refused() {
        let cache = MetadataCache::default();
        assert_eq!(
            cache.check("d1", &reply("1.0.0", &["get", "put"])).unwrap(),
            Checked::Cached
        );
        // Order does not matter.
        assert_eq!(
            cache.check("d1", &reply("1.0.0", &["put", "get"])).unwrap(),
            Checked::Matches
        );
        let e = cache.check("d1", &reply("1.0.1", &["get"])).unwrap_err();
        assert!(
            e.contains("version 1.0.1 (cached: 1.0.0)")
                && e.contains("methods [get] (cached: [get, put])"),
            "{e}"
        );
        // Another binary has its own entry.
        assert_eq!(
            cache.check("d2", &reply("2.0.0", &["get"])).unwrap(),
            Checked::Cached
        );
        assert_eq!(cache.get("d1").unwrap().version, "1.0.0");
    }

    #[test]
    fn a_file_is_hashed_again_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("plugin");
        std::fs::write(&exe, b"one").unwrap();
        let cache = MetadataCache::default();
        assert_eq!(cache.known_digest(&exe), None, "not hashed yet");
        let first = cache.digest_blocking(&exe).unwrap();
        assert_eq!(cache.known_digest(&exe).as_deref(), Some(first.as_str()));
        std::fs::write(&exe, b"two, longer").unwrap();
        assert_eq!(cache.known_digest(&exe), None, "a changed file is unknown");
        assert_ne!(cache.digest_blocking(&exe).unwrap(), first);
    }
}
