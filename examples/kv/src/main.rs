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
//! `set` and a `delete` that removed something mark the state as changed.
//! The exported state is the JSON object of all pairs, state version 1.

use std::collections::BTreeMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use plugvisor_sdk::{
    InitContext, Plugin, Request, Response, StateSnapshot, Status, async_trait, unknown_method,
};

/// The format of the exported state: a JSON object of string pairs.
const STATE_VERSION: u32 = 1;

/// The store. A `BTreeMap` so `list` and exports are in a stable order.
#[derive(Debug, Default)]
struct Kv {
    map: RwLock<BTreeMap<String, String>>,
}

impl Kv {
    // A poisoned lock means a writer panicked; every write here is a single
    // map operation, so the map is still consistent and we keep serving.
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, String>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, String>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
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

fn to_json(map: &BTreeMap<String, String>) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(map).map_err(|e| Status::internal(format!("encoding the store: {e}")))
}

#[async_trait]
impl Plugin for Kv {
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn methods(&self) -> Vec<String> {
        ["set", "get", "delete", "list", "count"]
            .map(String::from)
            .to_vec()
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    async fn initialize(&self, ctx: InitContext) -> Result<(), Status> {
        let Some(restored) = ctx.restored_state else {
            return Ok(());
        };
        if restored.state_version != STATE_VERSION {
            return Err(Status::failed_precondition(format!(
                "restored state has version {}, but this kv plugin reads only version {STATE_VERSION}",
                restored.state_version
            )));
        }
        let map: BTreeMap<String, String> = if restored.state.is_empty() {
            BTreeMap::new()
        } else {
            serde_json::from_slice(&restored.state).map_err(|e| {
                Status::failed_precondition(format!(
                    "restored state (version {STATE_VERSION}) is not a JSON object of strings: {e}"
                ))
            })?
        };
        *self.write() = map;
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
                self.write().insert(k.to_string(), v.to_string());
                Ok(Response::empty().state_changed())
            }
            "get" => {
                let k = key(method, &req.payload)?;
                match self.read().get(&k) {
                    Some(v) => Ok(Response::new(v.clone())),
                    None => Err(Status::not_found(format!("get: no key `{k}`"))),
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
            "list" => Ok(Response::new(to_json(&self.read())?)),
            "count" => Ok(Response::new(self.read().len().to_string())),
            other => Err(unknown_method(other)),
        }
    }

    async fn export_state(&self) -> Result<StateSnapshot, Status> {
        Ok(StateSnapshot::new(to_json(&self.read())?, STATE_VERSION))
    }
}

fn main() {
    plugvisor_sdk::main(Kv::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugvisor_sdk::Code;
    use plugvisor_sdk::testing::Harness;
    use serde_json::json;
    use std::collections::HashMap;

    async fn started() -> Harness {
        let mut h = Harness::start(Kv::default()).await.unwrap();
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
        assert_eq!(snapshot.state_version, 1);
        let exported: serde_json::Value = serde_json::from_slice(&snapshot.state).unwrap();
        assert_eq!(exported, json!({"city": "Lisbon", "n": "42"}));

        let mut h = h.restart_with_state(Kv::default()).await;
        let init = h.initialize(json!({})).await.unwrap();
        assert_eq!(init.state_version, 1);
        assert_eq!(h.call("get", "city").await.unwrap(), "Lisbon");
        assert_eq!(h.call("count", "").await.unwrap(), "2");
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn refuses_state_of_an_unknown_version_naming_it() {
        let mut h = Harness::start(Kv::default()).await.unwrap();
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
        let mut h = Harness::start(Kv::default()).await.unwrap();
        let err = h
            .initialize_with_state(json!({}), Some(StateSnapshot::new("[1]", 1)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        h.shutdown().await.unwrap();
    }
}
