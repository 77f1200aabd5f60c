//! Dependencies between plugins: a manifest's `requires:` names plugins
//! that must be ready before it starts, optionally with a version range,
//! and says what the requirement going down does to it:
//!
//! - `on_crash: notify` (systemd's `Wants=` once running): an event on the
//!   dependent, which keeps running, whether the requirement crashed or an
//!   operator stopped it;
//! - `on_crash: restart` (systemd's `BindsTo=`): the dependent stops
//!   whenever the requirement goes down (crash, `stop`, `restart`,
//!   `remove`), waits in state `waiting`, and starts again once the
//!   requirement is ready. A deliberate stop of the requirement waits for
//!   its bound dependents to stop first, as systemd orders stop jobs in
//!   reverse of `After=`.
//!
//! Either way a dependent starts only once every requirement is ready (like
//! `Requires=` + `After=` on a `Type=notify` unit, at start only).
//!
//! Plugins start in dependency order (the daemon adds them topologically),
//! each waits in state `waiting` until what it requires is ready, a cycle or
//! a missing requirement is an error naming both ends, and the supervisor
//! stops dependents before what they require.

use crate::actor::Command;
use crate::manifest::{Manifest, ManifestError};
use crate::plugin::Registry;
use crate::replica::{Replica, Spec};
use crate::routing::Route;
use crate::status::{Event, EventDetail, PluginState};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// What a crash of a required plugin does to its dependent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnCrash {
    /// An event on the dependent, which keeps running (systemd `Wants=`).
    #[default]
    Notify,
    /// The dependent stops (before the requirement, when that is stopped on
    /// purpose), waits until the requirement is ready again and starts
    /// (systemd `BindsTo=`).
    Restart,
}

impl OnCrash {
    pub fn as_str(&self) -> &'static str {
        match self {
            OnCrash::Notify => "notify",
            OnCrash::Restart => "restart",
        }
    }
}

/// One entry of `requires:`.
#[derive(Debug, Clone, PartialEq)]
pub struct Requirement {
    pub name: String,
    /// The versions accepted, e.g. `>=1.2, <2`; `None`: any.
    pub version: Option<semver::VersionReq>,
    pub on_crash: OnCrash,
}

impl std::fmt::Display for Requirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{} {v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// `requires:` as written: `kv` or `{name: kv, version: ..., on_crash: ...}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawRequirement {
    Name(String),
    Full {
        name: String,
        #[serde(default)]
        version: Option<String>,
        #[serde(default)]
        on_crash: OnCrash,
    },
}

/// Checks `requires:` of the plugin `own`: valid names, ranges, no
/// duplicates, not itself. Errors are (the field, what is wrong).
pub(crate) fn parse(
    own: &str,
    raw: Vec<RawRequirement>,
) -> Result<Vec<Requirement>, (String, String)> {
    let mut out: Vec<Requirement> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let (name, version, on_crash) = match r {
            RawRequirement::Name(name) => (name, None, OnCrash::Notify),
            RawRequirement::Full {
                name,
                version,
                on_crash,
            } => (name, version, on_crash),
        };
        let field = format!("requires[{i}]");
        crate::manifest::validate_name(&name).map_err(|m| (field.clone(), m))?;
        if name == own {
            return Err((
                field,
                format!("{own} requires itself, a cycle: {own} → {own}"),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err((field, format!("`{name}` is listed twice")));
        }
        let version = version
            .map(|v| {
                semver::VersionReq::parse(&v).map_err(|e| {
                    (
                        format!("requires[{i}].version"),
                        format!("`{v}` is not a version range such as \">=1.2, <2\": {e}"),
                    )
                })
            })
            .transpose()?;
        out.push(Requirement {
            name,
            version,
            on_crash,
        });
    }
    Ok(out)
}

/// Why `requirement` of `dependent` is not met by `found` (its manifest
/// version), if it is not.
fn version_problem(dependent: &str, r: &Requirement, found: &semver::Version) -> Option<String> {
    match &r.version {
        Some(range) if !range.matches(found) => Some(format!(
            "{dependent} requires {} {range}, but {} is {found}",
            r.name, r.name
        )),
        _ => None,
    }
}

/// Orders discovered manifests so every plugin comes after what it
/// requires. A plugin whose requirement is missing (or failed to load, or
/// has the wrong version), or that is on a cycle, is moved to the errors,
/// which name both ends; so is any plugin that requires one of those.
pub fn resolve(manifests: Vec<Manifest>, errors: &mut Vec<ManifestError>) -> Vec<Manifest> {
    let mut by_name: BTreeMap<String, Manifest> =
        manifests.into_iter().map(|m| (m.name.clone(), m)).collect();
    let err = |m: &Manifest, message: String| ManifestError {
        file: m.path.clone(),
        field: Some("requires".into()),
        message,
    };
    // Missing and mismatched requirements, until nothing more drops out.
    loop {
        let mut dropped = Vec::new();
        for m in by_name.values() {
            for r in &m.requires {
                let problem = match by_name.get(&r.name) {
                    None => Some(format!(
                        "{} requires {}, which is not among the loaded plugins (missing, disabled, or failed to load)",
                        m.name, r.name
                    )),
                    Some(found) => version_problem(&m.name, r, &found.version),
                };
                if let Some(problem) = problem {
                    dropped.push((m.name.clone(), problem));
                    break;
                }
            }
        }
        if dropped.is_empty() {
            break;
        }
        for (name, problem) in dropped {
            if let Some(m) = by_name.remove(&name) {
                errors.push(err(&m, problem));
            }
        }
    }
    // Kahn's algorithm, in name order among the ready ones.
    let mut waiting: BTreeMap<String, BTreeSet<String>> = by_name
        .values()
        .map(|m| {
            (
                m.name.clone(),
                m.requires.iter().map(|r| r.name.clone()).collect(),
            )
        })
        .collect();
    let mut order = Vec::with_capacity(by_name.len());
    while let Some(next) = waiting
        .iter()
        .find(|(_, reqs)| reqs.is_empty())
        .map(|(n, _)| n.clone())
    {
        waiting.remove(&next);
        for reqs in waiting.values_mut() {
            reqs.remove(&next);
        }
        order.push(next);
    }
    // What is left is on a cycle or behind one.
    for (name, _) in std::mem::take(&mut waiting) {
        let m = &by_name[&name];
        let message = match cycle_from(&name, |n| {
            by_name
                .get(n)
                .map(|m| m.requires.iter().map(|r| r.name.clone()).collect())
                .unwrap_or_default()
        }) {
            Some(cycle) if cycle.first() == Some(&name) => {
                format!("requirements form a cycle: {}", cycle.join(" → "))
            }
            Some(cycle) => format!("{name} requires plugins on a cycle: {}", cycle.join(" → ")),
            None => format!("{name} cannot be ordered"),
        };
        errors.push(err(m, message));
    }
    order
        .into_iter()
        .filter_map(|n| by_name.remove(&n))
        .collect()
}

/// A cycle reachable from `start`, as `[a, b, ..., a]`.
fn cycle_from(start: &str, edges: impl Fn(&str) -> Vec<String>) -> Option<Vec<String>> {
    fn walk(
        node: &str,
        edges: &dyn Fn(&str) -> Vec<String>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges(node) {
            if let Some(c) = walk(&next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    walk(start, &edges, &mut Vec::new(), &mut BTreeSet::new())
}

/// The manifests the supervised plugins run, by name.
fn supervised(registry: &Registry) -> BTreeMap<String, Arc<Manifest>> {
    registry
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(n, h)| (n.clone(), h.common.board.spec().manifest.clone()))
        .collect()
}

/// Checks that adding (or upgrading to) `manifest` keeps the graph whole:
/// every requirement is supervised, in a matching version, and no cycle
/// forms. A runtime `add` of a plugin whose requirement is missing is
/// refused: add what it requires first.
pub(crate) fn check_add(registry: &Registry, manifest: &Manifest) -> Result<(), String> {
    let mut all = supervised(registry);
    for r in &manifest.requires {
        match all.get(&r.name) {
            None => {
                return Err(format!(
                    "{} requires {}, which is not supervised; add {} first",
                    manifest.name, r.name, r.name
                ));
            }
            Some(found) => {
                if let Some(problem) = version_problem(&manifest.name, r, &found.version) {
                    return Err(problem);
                }
            }
        }
    }
    all.insert(manifest.name.clone(), Arc::new(manifest.clone()));
    if let Some(cycle) = cycle_from(&manifest.name, |n| {
        all.get(n)
            .map(|m| m.requires.iter().map(|r| r.name.clone()).collect())
            .unwrap_or_default()
    }) {
        return Err(format!(
            "requirements would form a cycle: {}",
            cycle.join(" → ")
        ));
    }
    Ok(())
}

/// The supervised plugins in the order to stop them: each wave holds
/// plugins no one still running requires (dependents first). Plugins
/// without dependencies either way are left out: they stop at once.
pub(crate) fn stop_waves(registry: &Registry) -> Vec<Vec<String>> {
    let all = supervised(registry);
    let involved: BTreeSet<String> = all
        .values()
        .flat_map(|m| {
            let own = (!m.requires.is_empty()).then(|| m.name.clone());
            m.requires
                .iter()
                .filter(|r| all.contains_key(&r.name))
                .map(|r| r.name.clone())
                .chain(own)
        })
        .collect();
    let mut left = involved;
    let mut waves = Vec::new();
    while !left.is_empty() {
        let wave: Vec<String> = left
            .iter()
            .filter(|n| {
                !left.iter().any(|d| {
                    all.get(d.as_str())
                        .is_some_and(|m| m.requires.iter().any(|r| &r.name == *n))
                })
            })
            .cloned()
            .collect();
        if wave.is_empty() {
            // A cycle (refused on add): stop the rest together.
            waves.push(left.into_iter().collect());
            break;
        }
        for n in &wave {
            left.remove(n);
        }
        waves.push(wave);
    }
    waves
}

/// `names` (supervised plugins) in the order to stop or remove them: a
/// plugin before everything it requires, directly or through others
/// (supervised or not in `names`); otherwise in the order given.
pub(crate) fn dependents_first(registry: &Registry, names: Vec<String>) -> Vec<String> {
    let all = supervised(registry);
    // Everything each plugin requires, transitively.
    let below = |name: &str| {
        let mut seen = BTreeSet::new();
        let mut next = vec![name.to_string()];
        while let Some(n) = next.pop() {
            for r in all.get(&n).map(|m| m.requires.as_slice()).unwrap_or(&[]) {
                if seen.insert(r.name.clone()) {
                    next.push(r.name.clone());
                }
            }
        }
        seen
    };
    let below: BTreeMap<String, BTreeSet<String>> =
        names.iter().map(|n| (n.clone(), below(n))).collect();
    let mut left = names;
    let mut order = Vec::with_capacity(left.len());
    while !left.is_empty() {
        // The first one no other remaining plugin requires; on a cycle
        // (refused on add), the first.
        let at = left
            .iter()
            .position(|n| !left.iter().any(|d| d != n && below[d].contains(n)))
            .unwrap_or(0);
        order.push(left.remove(at));
    }
    order
}

/// Whether the supervised plugin `name` has a ready (or degraded) replica,
/// and its manifest version; `None` when it is not supervised. A replica
/// in a zero-downtime upgrade counts as up: its calls wait, none fail, so
/// the new instance starting and the old one stopping are no going down.
fn status_of(registry: &Registry, name: &str) -> Option<(bool, semver::Version, String)> {
    let handle = registry
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .cloned()?;
    let board = handle.common.board.lock();
    let up = board
        .replicas
        .iter()
        .any(|r| r.state.is_up() || r.upgrading);
    let why = board
        .replicas
        .first()
        .map(|r| format!("{}: {}", r.state, r.reason))
        .unwrap_or_default();
    Some((up, board.spec.manifest.version.clone(), why))
}

/// The first requirement of `manifest` that is not ready, and why.
fn unmet(registry: &Registry, manifest: &Manifest) -> Option<(String, String)> {
    for r in &manifest.requires {
        let why = match status_of(registry, &r.name) {
            None => format!("waiting for {}: it is not supervised", r.name),
            Some((_, version, _)) if version_problem(&manifest.name, r, &version).is_some() => {
                format!(
                    "waiting for {}: {}",
                    r.name,
                    version_problem(&manifest.name, r, &version).unwrap_or_default()
                )
            }
            Some((true, _, _)) => continue,
            Some((false, _, state)) => format!("waiting for {} to be ready ({state})", r.name),
        };
        return Some((r.name.clone(), why));
    }
    None
}

/// How waiting for requirements ended.
pub(crate) enum WaitEnd {
    /// Every requirement is ready: start.
    Ready,
    /// An order arrived; the actor carries it out.
    Command(Command),
    /// The supervisor is shutting down.
    Exit,
}

/// Waits, in state `waiting`, until every requirement of `spec` is ready.
/// Calls wait meanwhile (up to their deadline). Returns at once when the
/// plugin requires nothing or everything is ready.
pub(crate) async fn wait_for_requirements(
    replica: &Replica,
    spec: &Spec,
    commands: &mut mpsc::Receiver<Command>,
) -> WaitEnd {
    let manifest = &spec.manifest;
    if manifest.requires.is_empty() {
        return WaitEnd::Ready;
    }
    let Some(registry) = replica.host.registry.upgrade() else {
        return WaitEnd::Exit;
    };
    // Subscribed before the first look: no change between them is missed.
    let mut events = replica.host.events.subscribe();
    let mut said = String::new();
    loop {
        let Some((name, why)) = unmet(&registry, manifest) else {
            return WaitEnd::Ready;
        };
        if why != said {
            replica.route(Route::Pending);
            replica.event(
                PluginState::Waiting,
                "",
                why.clone(),
                EventDetail {
                    requirement: Some(name),
                    ..EventDetail::default()
                },
            );
            said = why;
        }
        tokio::select! {
            _ = replica.host.cancel.cancelled() => return WaitEnd::Exit,
            cmd = commands.recv() => return match cmd {
                Some(cmd) => WaitEnd::Command(cmd),
                None => WaitEnd::Exit,
            },
            event = events.recv() => match event {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return WaitEnd::Exit,
            },
        }
    }
}

/// Watches a running plugin's requirements: reports each one going down
/// (no replica ready any more) or coming back.
pub(crate) struct Watch {
    registry: std::sync::Weak<Registry>,
    events: Option<broadcast::Receiver<Event>>,
    /// Requirement → (ready when last seen, what its crash does).
    up: BTreeMap<String, (bool, OnCrash)>,
    /// The first look at every requirement is done: one that went down
    /// while the instance started (before this watch subscribed) is seen.
    looked: bool,
}

/// A requirement that went down or came back.
pub(crate) struct Change {
    pub name: String,
    pub up: bool,
    pub on_crash: OnCrash,
    /// Its state and reason, for the dependent's event.
    pub why: String,
}

impl Watch {
    /// For an instance started once every requirement was ready: each is
    /// taken as up, and the first [`Self::next`] looks whether it still is.
    pub fn new(replica: &Replica, manifest: &Manifest) -> Watch {
        let registry = replica.host.registry.clone();
        let events = (!manifest.requires.is_empty()).then(|| replica.host.events.subscribe());
        let up = manifest
            .requires
            .iter()
            .map(|r| (r.name.clone(), (true, r.on_crash)))
            .collect();
        Watch {
            registry,
            events,
            up,
            looked: false,
        }
    }

    /// The next change of a requirement; pending forever without any.
    /// Cancel safe (only the event stream is awaited).
    pub async fn next(&mut self) -> Change {
        let Some(events) = self.events.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            let plugin = if !self.looked {
                self.looked = true;
                None
            } else {
                match events.recv().await {
                    Ok(event) => Some(event.plugin),
                    // Missed events: look at every requirement.
                    Err(broadcast::error::RecvError::Lagged(_)) => None,
                    Err(broadcast::error::RecvError::Closed) => {
                        return std::future::pending().await;
                    }
                }
            };
            let Some(registry) = self.registry.upgrade() else {
                return std::future::pending().await;
            };
            for (name, (was_up, on_crash)) in self.up.iter_mut() {
                if plugin.as_ref().is_some_and(|p| p != name) {
                    continue;
                }
                let (up, why) = match status_of(&registry, name) {
                    Some((up, _, why)) => (up, why),
                    None => (false, "removed from the supervisor".to_string()),
                };
                if up != *was_up {
                    *was_up = up;
                    return Change {
                        name: name.clone(),
                        up,
                        on_crash: *on_crash,
                        why,
                    };
                }
            }
        }
    }
}

/// Whether a replica in `state` has a child (starting, running, stopping).
fn has_instance(state: PluginState) -> bool {
    matches!(
        state,
        PluginState::Starting
            | PluginState::Initializing
            | PluginState::Ready
            | PluginState::Degraded
            | PluginState::Stopping
    )
}

/// The plugins bound to `name` (`on_crash: restart`), directly, each with
/// whether a replica of it has a child.
fn bound_dependents(registry: &Registry, name: &str) -> Vec<(String, bool, Arc<Manifest>)> {
    registry
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|(n, h)| {
            let board = h.common.board.lock();
            let bound = board
                .spec
                .manifest
                .requires
                .iter()
                .any(|r| r.name == name && r.on_crash == OnCrash::Restart);
            bound.then(|| {
                let running = board.replicas.iter().any(|r| has_instance(r.state));
                (n.clone(), running, board.spec.manifest.clone())
            })
        })
        .collect()
}

/// How long the bound dependents of `name` (and theirs) may take to stop:
/// each may be starting (start, Initialize), then snapshots and stops.
fn release_deadline(registry: &Registry, name: &str) -> Duration {
    let mut total = Duration::from_secs(5);
    let mut seen = BTreeSet::new();
    let mut next = vec![name.to_string()];
    while let Some(n) = next.pop() {
        for (dependent, _, m) in bound_dependents(registry, &n) {
            if seen.insert(dependent.clone()) {
                let t = &m.timeouts;
                total += t.start.0 + t.initialize.0 + t.call.0 + t.stop.0;
                next.push(dependent);
            }
        }
    }
    total
}

/// Called by a replica stopping its instance on purpose (stop, restart,
/// remove, its own requirement going down), once it said `stopping`: when
/// that leaves its plugin without a replica serving, the plugins bound to
/// it (`on_crash: restart`) see it go down and stop; this waits until they
/// have, so dependents stop before what they require, as systemd orders
/// stops. Bounded: past a deadline (their start, snapshot and stop
/// timeouts) the stop goes on, with a warning event. Returns at once on
/// shutdown (which stops plugins in dependency waves itself).
pub(crate) async fn let_bound_dependents_stop(replica: &Replica, instance: &str) {
    let Some(registry) = replica.host.registry.upgrade() else {
        return;
    };
    let name = replica.name();
    // Subscribed before the first look: no change between them is missed.
    let mut events = replica.host.events.subscribe();
    if status_of(&registry, name).is_some_and(|(up, _, _)| up) {
        // Another replica still serves: the plugin is not going down.
        return;
    }
    let limit = release_deadline(&registry, name);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let running: Vec<String> = bound_dependents(&registry, name)
            .into_iter()
            .filter(|(_, running, _)| *running)
            .map(|(n, _, _)| n)
            .collect();
        if running.is_empty() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                let why = format!(
                    "stopping although {} (bound to it with on_crash: restart) did not stop within {}s",
                    running.join(", "),
                    limit.as_secs()
                );
                tracing::warn!(plugin = %name, "{why}");
                replica.event(PluginState::Stopping, instance, why, EventDetail::default());
                return;
            }
            _ = replica.host.cancel.cancelled() => return,
            event = events.recv() => if let Err(broadcast::error::RecvError::Closed) = event {
                return;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(dir: &std::path::Path, name: &str, version: &str, requires: &str) -> Manifest {
        let path = dir.join(format!("{name}.yaml"));
        let text = format!("name: {name}\nversion: {version}\nexec: ./x\nrequires: {requires}\n");
        std::fs::write(&path, &text).unwrap();
        Manifest::parse(&path, &text).unwrap()
    }

    #[test]
    fn requirements_parse_short_and_long() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(
            dir.path(),
            "web",
            "1.0.0",
            "[kv, {name: auth, version: '>=1.2, <2', on_crash: restart}]",
        );
        assert_eq!(m.requires[0].name, "kv");
        assert_eq!(m.requires[0].on_crash, OnCrash::Notify);
        assert_eq!(m.requires[1].on_crash, OnCrash::Restart);
        assert_eq!(m.requires[1].to_string(), "auth >=1.2, <2");
        for (bad, needle) in [
            ("[web]", "web requires itself"),
            ("[kv, kv]", "listed twice"),
            ("[{name: kv, version: 'one'}]", "requires[0].version"),
            ("[{name: kv, on_crash: explode}]", "requires"),
            ("['Bad!']", "requires[0]"),
        ] {
            let path = dir.path().join("bad.yaml");
            let text = format!("name: web\nversion: 1.0.0\nexec: ./x\nrequires: {bad}\n");
            let e = Manifest::parse(&path, &text).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn discovery_orders_by_dependency_and_names_both_ends_of_problems() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ms = vec![
            manifest(d, "web", "1.0.0", "[api]"),
            manifest(d, "api", "1.0.0", "[{name: kv, version: '>=1.2'}]"),
            manifest(d, "kv", "1.3.0", "[]"),
            manifest(d, "lonely", "1.0.0", "[ghost]"),
            manifest(d, "old", "1.0.0", "[{name: kv, version: '<1'}]"),
            manifest(d, "a", "1.0.0", "[b]"),
            manifest(d, "b", "1.0.0", "[a]"),
            manifest(d, "behind", "1.0.0", "[a]"),
            manifest(d, "after-lonely", "1.0.0", "[lonely]"),
        ];
        let mut errors = Vec::new();
        let order: Vec<String> = resolve(ms, &mut errors)
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(order, ["kv", "api", "web"]);
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        let find = |needle: &str| {
            assert!(
                text.iter().any(|t| t.contains(needle)),
                "{needle} in {text:#?}"
            )
        };
        find("lonely requires ghost, which is not among the loaded plugins");
        find("old requires kv <1, but kv is 1.3.0");
        find("after-lonely requires lonely");
        find("requirements form a cycle: a → b → a");
        find("requirements form a cycle: b → a → b");
        find("behind requires plugins on a cycle: a → b → a");
        assert!(text.iter().all(|t| t.contains("requires")), "{text:#?}");
    }
}
