//! The kv plugin: a stateful key-value store that survives restarts and
//! upgrades through `ExportState` / `Initialize`.
//!
//! Methods (keys and values are UTF-8 text):
//! - `set`: payload `key=value` (the first `=` splits); replies with nothing.
//! - `get`: payload `key`; replies with the value, or NOT_FOUND.
//! - `delete`: payload `key`; replies `1` if it existed, `0` if not.
//! - `list`: replies with all pairs as a JSON object.
//! - `count`: replies with the number of keys.
//!
//! - `rev`: payload `key`; replies with how many times the key was set
//!   (state version 2 only).
//!
//! `set` and a `delete` that removed something mark the state as changed.
//!
//! # State versions
//!
//! - Version 2 (this release): `{"entries": {"<key>": {"value": "...", "rev": N}}}`.
//! - Version 1 (the previous release): a JSON object of key to value.
//!
//! This release reads both: a version 1 snapshot is migrated on Initialize,
//! every key starting at revision 1. `--state-version 1` makes it write and
//! read only version 1, as the previous release did (the upgrade tests use
//! it to stand for that release).

use std::collections::BTreeMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use plugvisor_sdk::{
    InitContext, Plugin, Request, Response, StateSnapshot, Status, async_trait, unknown_method,
};
use serde_json::{Value, json};

/// The newest state format this release writes.
const STATE_VERSION: u32 = 2;

/// One key's value and how many times it was set.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    value: String,
    rev: u64,
}

/// The store. A `BTreeMap` so `list` and exports are in a stable order.
#[derive(Debug)]
struct Kv {
    map: RwLock<BTreeMap<String, Entry>>,
    /// The state version written by ExportState: 2, or 1 in legacy mode.
    format: u32,
}

impl Kv {
    fn new(format: u32) -> Self {
        Kv {
            map: RwLock::default(),
            format,
        }
    }

    // A poisoned lock means a writer panicked; every write here is a single
    // map operation, so the map is still consistent and we keep serving.
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The store in state format `version`.
    fn encode(&self, version: u32) -> Result<Vec<u8>, Status> {
        let map = self.read();
        let value = if version == 1 {
            json!(
                map.iter()
                    .map(|(k, e)| (k.clone(), e.value.clone()))
                    .collect::<BTreeMap<_, _>>()
            )
        } else {
            let entries: serde_json::Map<String, Value> = map
                .iter()
                .map(|(k, e)| (k.clone(), json!({"value": e.value, "rev": e.rev})))
                .collect();
            json!({ "entries": entries })
        };
        serde_json::to_vec(&value).map_err(|e| Status::internal(format!("encoding the store: {e}")))
    }
}

/// Reads state of `version`: 1 (migrated, revision 1) or 2.
fn decode(version: u32, state: &[u8]) -> Result<BTreeMap<String, Entry>, Status> {
    if state.is_empty() {
        return Ok(BTreeMap::new());
    }
    let bad = |e: String| {
        Status::failed_precondition(format!(
            "restored state (version {version}) is unusable: {e}"
        ))
    };
    match version {
        1 => {
            let map: BTreeMap<String, String> = serde_json::from_slice(state)
                .map_err(|e| bad(format!("not a JSON object of strings: {e}")))?;
            Ok(map
                .into_iter()
                .map(|(k, value)| (k, Entry { value, rev: 1 }))
                .collect())
        }
        2 => {
            let doc: Value = serde_json::from_slice(state).map_err(|e| bad(e.to_string()))?;
            let entries = doc
                .get("entries")
                .and_then(Value::as_object)
                .ok_or_else(|| bad("no `entries` object".into()))?;
            entries
                .iter()
                .map(|(k, e)| {
                    let value = e.get("value").and_then(Value::as_str);
                    let rev = e.get("rev").and_then(Value::as_u64);
                    match (value, rev) {
                        (Some(value), Some(rev)) => Ok((
                            k.clone(),
                            Entry {
                                value: value.to_string(),
                                rev,
                            },
                        )),
                        _ => Err(bad(format!(
                            "entry `{k}` lacks a string `value` or a number `rev`"
                        ))),
                    }
                })
                .collect()
        }
        other => Err(Status::failed_precondition(format!(
            "restored state has version {other}, but this kv plugin reads versions 1 and {STATE_VERSION}"
        ))),
    }
}

fn utf8<'a>(method: &str, payload: &'a [u8]) -> Result<&'a str, Status> {
    std::str::from_utf8(payload)
        .map_err(|e| Status::invalid_argument(format!("{method}: payload is not UTF-8 ({e})")))
}

fn key(method: &str, payload: &[u8]) -> Result<String, Status> {
    let key = utf8(method, payload)?;
    if key.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{method}: payload must be a key, got nothing"
        )));
    }
    Ok(key.to_string())
}

#[async_trait]
impl Plugin for Kv {
    fn version(&self) -> &str {
        if self.format == 1 {
            "1.0.0"
        } else {
            env!("CARGO_PKG_VERSION")
        }
    }

    fn methods(&self) -> Vec<String> {
        let mut methods: Vec<String> = ["set", "get", "delete", "list", "count"]
            .map(String::from)
            .to_vec();
        if self.format >= 2 {
            methods.push("rev".into());
        }
        methods
    }

    fn state_version(&self) -> u32 {
        self.format
    }

    async fn initialize(&self, ctx: InitContext) -> Result<(), Status> {
        let Some(restored) = ctx.restored_state else {
            return Ok(());
        };
        if restored.state_version > self.format {
            return Err(Status::failed_precondition(format!(
                "restored state has version {}, but this kv plugin reads versions up to {}",
                restored.state_version, self.format
            )));
        }
        *self.write() = decode(restored.state_version, &restored.state)?;
        Ok(())
    }

    async fn handle(&self, req: Request) -> Result<Response, Status> {
        let method = req.method.as_str();
        match method {
            "set" => {
                let text = utf8(method, &req.payload)?;
                let Some((k, v)) = text.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                    return Err(Status::invalid_argument(format!(
                        "set: payload must be `key=value`, got `{text}`"
                    )));
                };
                let mut map = self.write();
                let rev = map.get(k).map_or(1, |e| e.rev + 1);
                map.insert(
                    k.to_string(),
                    Entry {
                        value: v.to_string(),
                        rev,
                    },
                );
                Ok(Response::empty().state_changed())
            }
            "get" => {
                let k = key(method, &req.payload)?;
                match self.read().get(&k) {
                    Some(e) => Ok(Response::new(e.value.clone())),
                    None => Err(Status::not_found(format!("get: no key `{k}`"))),
                }
            }
            "rev" if self.format >= 2 => {
                let k = key(method, &req.payload)?;
                match self.read().get(&k) {
                    Some(e) => Ok(Response::new(e.rev.to_string())),
                    None => Err(Status::not_found(format!("rev: no key `{k}`"))),
                }
            }
            "delete" => {
                let k = key(method, &req.payload)?;
                if self.write().remove(&k).is_some() {
                    Ok(Response::new("1").state_changed())
                } else {
                    Ok(Response::new("0"))
                }
            }
            "list" => Ok(Response::new(self.encode(1)?)),
            "count" => Ok(Response::new(self.read().len().to_string())),
            other => Err(unknown_method(other)),
        }
    }

    async fn export_state(&self) -> Result<StateSnapshot, Status> {
        Ok(StateSnapshot::new(self.encode(self.format)?, self.format))
    }
}

/// `--state-version 1|2` (default 2).
fn format_from_args() -> Result<u32, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(STATE_VERSION),
        [flag, v] if flag == "--state-version" && (v == "1" || v == "2") => {
            Ok(v.parse().unwrap_or(STATE_VERSION))
        }
        other => Err(format!(
            "usage: kv-plugin [--state-version 1|2]; got {other:?}"
        )),
    }
}

fn main() {
    match format_from_args() {
        Ok(format) => plugvisor_sdk::main(Kv::new(format)),
        Err(usage) => {
            eprintln!("{usage}");
            std::process::exit(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugvisor_sdk::Code;
    use plugvisor_sdk::testing::Harness;
    use serde_json::json;
    use std::collections::HashMap;

    async fn started() -> Harness {
        let mut h = Harness::start(Kv::new(STATE_VERSION)).await.unwrap();
        h.initialize(json!({})).await.unwrap();
        h
    }

    #[tokio::test]
    async fn sets_gets_lists_counts_and_deletes() {
        let mut h = started().await;
        h.call("set", "a=1").await.unwrap();
        h.call("set", "b=x=y").await.unwrap();
        assert_eq!(h.call("get", "a").await.unwrap(), "1");
        assert_eq!(h.call("get", "b").await.unwrap(), "x=y");
        assert_eq!(h.call("count", "").await.unwrap(), "2");
        let list: serde_json::Value =
            serde_json::from_slice(&h.call("list", "").await.unwrap()).unwrap();
        assert_eq!(list, json!({"a": "1", "b": "x=y"}));
        assert_eq!(h.call("delete", "a").await.unwrap(), "1");
        assert_eq!(h.call("delete", "a").await.unwrap(), "0");
        assert_eq!(h.call("count", "").await.unwrap(), "1");
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn missing_keys_are_not_found() {
        let mut h = started().await;
        let err = h.call("get", "nope").await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("`nope`"), "{}", err.message());
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn bad_payloads_are_invalid_arguments() {
        let mut h = started().await;
        for (method, payload) in [("set", "novalue"), ("set", "=v"), ("get", "")] {
            let err = h.call(method, payload).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{method} {payload}");
        }
        let err = h.call("get", vec![0xff, 0xfe]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            h.call("frobnicate", "").await.unwrap_err().code(),
            Code::Unimplemented
        );
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn writes_mark_state_changed_and_reads_do_not() {
        let mut h = started().await;
        let call = async |h: &mut Harness, m: &str, p: &'static str| {
            h.call_with_metadata(m, p, HashMap::new())
                .await
                .unwrap()
                .state_changed
        };
        assert!(call(&mut h, "set", "k=v").await);
        assert!(!call(&mut h, "get", "k").await);
        assert!(!call(&mut h, "list", "").await);
        assert!(call(&mut h, "delete", "k").await);
        assert!(!call(&mut h, "delete", "k").await);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn state_survives_export_and_restart() {
        let mut h = started().await;
        h.call("set", "city=Lisbon").await.unwrap();
        h.call("set", "n=42").await.unwrap();
        let snapshot = h.export_state().await.unwrap();
        assert_eq!(snapshot.state_version, 2);
        let exported: serde_json::Value = serde_json::from_slice(&snapshot.state).unwrap();
        assert_eq!(
            exported,
            json!({"entries": {"city": {"value": "Lisbon", "rev": 1}, "n": {"value": "42", "rev": 1}}})
        );

        let mut h = h.restart_with_state(Kv::new(STATE_VERSION)).await;
        let init = h.initialize(json!({})).await.unwrap();
        assert_eq!(init.state_version, 2);
        assert_eq!(h.call("get", "city").await.unwrap(), "Lisbon");
        assert_eq!(h.call("count", "").await.unwrap(), "2");
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn refuses_state_of_an_unknown_version_naming_it() {
        let mut h = Harness::start(Kv::new(STATE_VERSION)).await.unwrap();
        let err = h
            .initialize_with_state(json!({}), Some(StateSnapshot::new("{}", 7)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("version 7"), "{}", err.message());
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn refuses_corrupt_state() {
        let mut h = Harness::start(Kv::new(STATE_VERSION)).await.unwrap();
        let err = h
            .initialize_with_state(json!({}), Some(StateSnapshot::new("[1]", 1)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn migrates_a_version_1_snapshot_and_counts_revisions_from_there() {
        let mut h = Harness::start(Kv::new(STATE_VERSION)).await.unwrap();
        let v1 = StateSnapshot::new(r#"{"city":"Porto"}"#, 1);
        h.initialize_with_state(json!({}), Some(v1)).await.unwrap();
        assert_eq!(h.call("get", "city").await.unwrap(), "Porto");
        assert_eq!(h.call("rev", "city").await.unwrap(), "1");
        h.call("set", "city=Braga").await.unwrap();
        assert_eq!(h.call("rev", "city").await.unwrap(), "2");
        let snapshot = h.export_state().await.unwrap();
        assert_eq!(snapshot.state_version, 2);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn the_previous_release_writes_version_1_and_cannot_read_version_2() {
        let mut h = Harness::start(Kv::new(1)).await.unwrap();
        h.initialize(json!({})).await.unwrap();
        h.call("set", "a=b").await.unwrap();
        let snapshot = h.export_state().await.unwrap();
        assert_eq!(snapshot.state_version, 1);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&snapshot.state).unwrap(),
            json!({"a": "b"})
        );
        assert_eq!(
            h.call("rev", "a").await.unwrap_err().code(),
            Code::Unimplemented
        );
        h.shutdown().await.unwrap();
        let mut h = Harness::start(Kv::new(1)).await.unwrap();
        let v2 = StateSnapshot::new(r#"{"entries":{}}"#, 2);
        let err = h
            .initialize_with_state(json!({}), Some(v2))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("version 2"), "{}", err.message());
        h.shutdown().await.unwrap();
    }
}
