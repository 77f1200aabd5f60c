//! Capabilities: what plugins provide (`image.resize`), and which provider a
//! call that names a capability instead of a plugin goes to.
//!
//! The index maps each capability to its providers, each local (supervised
//! here) or remote (reached over TCP + mutual TLS: a manifest's `remote:`,
//! or a plugin that announced itself to the registry). Every plugin feeds
//! it from its manifest; a registration's manifest carries the capabilities
//! it announced. Choosing is a pure function of what the
//! caller reports of each provider ([`rank`]): ready providers first, then
//! local before remote (unless configured otherwise), then the fewest calls
//! in flight, ties taken in turn (round robin).

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where a provider runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Locality {
    /// A plugin this supervisor runs.
    Local,
    /// A plugin reached over the network.
    Remote,
}

impl Locality {
    /// Where the plugin of `manifest` runs: remote when it names `remote:`
    /// (in its file, or built from a registration).
    pub fn of(manifest: &crate::manifest::Manifest) -> Locality {
        if manifest.remote.is_some() {
            Locality::Remote
        } else {
            Locality::Local
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Locality::Local => "local",
            Locality::Remote => "remote",
        }
    }
}

/// One provider of a capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// The plugin's name.
    pub plugin: String,
    pub locality: Locality,
}

/// What the caller sees of a provider at the moment of choosing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Some instance is ready (or degraded) and takes calls now.
    pub ready: bool,
    /// Calls in flight on it.
    pub in_flight: usize,
}

/// Checks a capability name: dot-separated lowercase identifiers
/// (`image.resize`, `kv.v2.get`), each `[a-z][a-z0-9_-]*`, at most 128
/// characters in all.
pub fn validate(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.split('.').all(|part| {
            let mut chars = part.chars();
            chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a capability name; expected lowercase identifiers separated by dots, such as `image.resize` (each part starts with a-z, then a-z, 0-9, `_` or `-`; 128 characters at most)"
        ))
    }
}

/// Checks a manifest's `capabilities:` list: valid names, no repeats.
pub fn validate_all(names: &[String]) -> Result<(), String> {
    for (i, name) in names.iter().enumerate() {
        validate(name)?;
        if names[..i].contains(name) {
            return Err(format!("`{name}` is listed twice"));
        }
    }
    Ok(())
}

/// Capability → providers, fed by whoever knows of providers.
#[derive(Default)]
pub struct CapabilityIndex {
    /// By capability, providers in the order they were registered. One lock:
    /// written on add/upgrade/remove, read once per call by capability.
    by_capability: RwLock<BTreeMap<String, Vec<Provider>>>,
    /// Turns ties in turn.
    turn: AtomicUsize,
}

impl CapabilityIndex {
    /// Sets what `plugin` provides (replacing what it provided before).
    pub fn set(&self, plugin: &str, locality: Locality, capabilities: &[String]) {
        let mut index = self.write();
        remove_from(&mut index, plugin);
        for capability in capabilities {
            index.entry(capability.clone()).or_default().push(Provider {
                plugin: plugin.to_string(),
                locality,
            });
        }
    }

    /// Forgets `plugin`.
    pub fn remove(&self, plugin: &str) {
        remove_from(&mut self.write(), plugin);
    }

    /// The providers of `capability`, in registration order.
    pub fn providers(&self, capability: &str) -> Vec<Provider> {
        self.read().get(capability).cloned().unwrap_or_default()
    }

    /// Every capability and its providers.
    pub fn all(&self) -> BTreeMap<String, Vec<Provider>> {
        self.read().clone()
    }

    /// The providers of `capability`, best first: see [`rank`]. `load`
    /// reports each provider's state now (`None`: it is gone).
    pub fn ranked(
        &self,
        capability: &str,
        prefer_local: bool,
        load: impl Fn(&Provider) -> Option<Load>,
    ) -> Vec<(Provider, Load)> {
        let providers = self.providers(capability);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let loaded = providers
            .into_iter()
            .filter_map(|p| load(&p).map(|l| (p, l)))
            .collect();
        rank(loaded, prefer_local, turn)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Vec<Provider>>> {
        // Every write leaves the map consistent: a poisoned lock is usable.
        self.by_capability.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Vec<Provider>>> {
        self.by_capability
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }
}

fn remove_from(index: &mut BTreeMap<String, Vec<Provider>>, plugin: &str) {
    index.retain(|_, providers| {
        providers.retain(|p| p.plugin != plugin);
        !providers.is_empty()
    });
}

/// Orders providers for a call: ready ones first; then, with
/// `prefer_local`, local before remote; then fewest calls in flight; ties
/// in turn, starting at position `turn` (so equal providers take calls
/// round robin).
pub fn rank(
    providers: Vec<(Provider, Load)>,
    prefer_local: bool,
    turn: usize,
) -> Vec<(Provider, Load)> {
    let n = providers.len().max(1);
    let mut keyed: Vec<_> = providers
        .into_iter()
        .enumerate()
        .map(|(i, (p, l))| {
            let locality = if prefer_local {
                p.locality
            } else {
                Locality::Local
            };
            let key = (!l.ready, locality, l.in_flight, (i + n - turn % n) % n);
            (key, (p, l))
        })
        .collect();
    keyed.sort_by_key(|(key, _)| *key);
    keyed.into_iter().map(|(_, pl)| pl).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, locality: Locality) -> Provider {
        Provider {
            plugin: name.into(),
            locality,
        }
    }

    fn load(ready: bool, in_flight: usize) -> Load {
        Load { ready, in_flight }
    }

    fn names(ranked: &[(Provider, Load)]) -> Vec<&str> {
        ranked.iter().map(|(p, _)| p.plugin.as_str()).collect()
    }

    #[test]
    fn validates_dotted_lowercase_names() {
        for good in ["image.resize", "kv", "kv.v2.get", "a-b.c_d"] {
            assert!(validate(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Image.resize",
            "image..resize",
            ".x",
            "x.",
            "1x",
            "x.2y",
            "a b",
            "é",
        ] {
            let e = validate(bad).unwrap_err();
            assert!(e.contains("not a capability name"), "{bad}: {e}");
        }
        assert!(validate(&"a".repeat(129)).is_err());
        let e = validate_all(&["a.b".into(), "a.b".into()]).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn ready_first_then_local_then_least_loaded() {
        let ranked = rank(
            vec![
                (p("down", Locality::Local), load(false, 0)),
                (p("remote-idle", Locality::Remote), load(true, 0)),
                (p("busy", Locality::Local), load(true, 5)),
                (p("idle", Locality::Local), load(true, 1)),
            ],
            true,
            0,
        );
        assert_eq!(names(&ranked), ["idle", "busy", "remote-idle", "down"]);
        // Not preferring local: load alone decides among ready ones.
        let ranked = rank(
            vec![
                (p("busy", Locality::Local), load(true, 5)),
                (p("remote-idle", Locality::Remote), load(true, 0)),
            ],
            false,
            0,
        );
        assert_eq!(names(&ranked), ["remote-idle", "busy"]);
    }

    #[test]
    fn ties_take_turns() {
        let providers = || {
            vec![
                (p("a", Locality::Local), load(true, 0)),
                (p("b", Locality::Local), load(true, 0)),
                (p("c", Locality::Local), load(true, 0)),
            ]
        };
        let firsts: Vec<_> = (0..6)
            .map(|turn| rank(providers(), true, turn)[0].0.plugin.clone())
            .collect();
        assert_eq!(firsts, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn the_index_follows_set_and_remove() {
        let index = CapabilityIndex::default();
        index.set(
            "a",
            Locality::Local,
            &["img.resize".into(), "img.thumb".into()],
        );
        index.set("r", Locality::Remote, &["img.resize".into()]);
        assert_eq!(index.providers("img.resize").len(), 2);
        // An upgrade that drops a capability.
        index.set("a", Locality::Local, &["img.thumb".into()]);
        assert_eq!(index.providers("img.resize"), [p("r", Locality::Remote)]);
        index.remove("r");
        assert!(index.providers("img.resize").is_empty());
        assert!(!index.all().contains_key("img.resize"), "no empty entries");
        // Gone providers (load says None) are left out.
        index.set("b", Locality::Local, &["img.thumb".into()]);
        let ranked = index.ranked("img.thumb", true, |p| {
            (p.plugin != "a").then_some(load(true, 0))
        });
        assert_eq!(names(&ranked), ["b"]);
    }
}
