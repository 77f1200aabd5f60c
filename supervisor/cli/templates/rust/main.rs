//! {{name}}: a plugvisor plugin, written with plugvisor-sdk.
//!
//! Methods (Handle):
//! - `echo`: returns the payload unchanged;
//! - `config`: returns the configuration Initialize delivered, as JSON
//!   (`plugvisor conformance` uses it to check that config arrives).
//!
//! `echo` also streams (HandleStream), chunk by chunk as they arrive.
//!
//! The plugin keeps no state. To keep some across restarts and upgrades,
//! implement `state_version`, `export_state` and read
//! `InitContext::restored_state` in `initialize` (see the SDK's docs and the
//! `kv` example in the plugvisor repository).

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use plugvisor_sdk::{
    ByteStream, InitContext, Plugin, Request, Response, Status, async_trait, unknown_method,
};

struct {{type}} {
    /// The merged config from `Initialize`, as JSON; `config` returns it.
    config: RwLock<String>,
}

impl {{type}} {
    fn new() -> Self {
        {{type}} {
            config: RwLock::new("{}".to_string()),
        }
    }
}

#[async_trait]
impl Plugin for {{type}} {
    fn name(&self) -> &str {
        "{{name}}"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn methods(&self) -> Vec<String> {
        vec!["echo".to_string(), "config".to_string()]
    }

    fn stream_methods(&self) -> Vec<String> {
        vec!["echo".to_string()]
    }

    async fn initialize(&self, ctx: InitContext) -> Result<(), Status> {
        // Check the config here and refuse what the plugin cannot use with
        // `Status::invalid_argument`: a plugin that fails Initialize is
        // never ready, and the operator sees why.
        // A poisoned lock only means a writer panicked; the String is intact.
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = ctx.config.to_string();
        Ok(())
    }

    async fn handle(&self, req: Request) -> Result<Response, Status> {
        match req.method.as_str() {
            "echo" => Ok(Response::new(req.payload)),
            "config" => {
                let config = self
                    .config
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                Ok(Response::new(config))
            }
            other => Err(unknown_method(other)),
        }
    }

    async fn handle_stream(
        &self,
        method: &str,
        _metadata: HashMap<String, String>,
        input: ByteStream,
    ) -> Result<ByteStream, Status> {
        match method {
            // The reply is the input, passed on as each chunk arrives.
            "echo" => Ok(input),
            other => Err(unknown_method(other)),
        }
    }
}

fn main() {
    plugvisor_sdk::main({{type}}::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugvisor_sdk::Code;
    use plugvisor_sdk::testing::Harness;
    use serde_json::json;

    #[tokio::test]
    async fn echoes_and_returns_its_config() {
        let mut h = Harness::start({{type}}::new()).await.unwrap();
        let init = h.initialize(json!({"greeting": "hi"})).await.unwrap();
        assert_eq!(init.methods, ["echo", "config"]);
        assert_eq!(init.stream_methods, ["echo"]);
        assert_eq!(h.call("echo", "hello").await.unwrap(), "hello");
        let config: serde_json::Value =
            serde_json::from_slice(&h.call("config", "").await.unwrap()).unwrap();
        assert_eq!(config, json!({"greeting": "hi"}));
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn streams_chunks_back() {
        let mut h = Harness::start({{type}}::new()).await.unwrap();
        h.initialize(json!({})).await.unwrap();
        let out = h.stream("echo", ["ab", "cd", "ef"]).await.unwrap();
        assert_eq!(out, ["ab", "cd", "ef"]);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn unknown_methods_are_unimplemented() {
        let mut h = Harness::start({{type}}::new()).await.unwrap();
        h.initialize(json!({})).await.unwrap();
        let err = h.call("no-such-method", "x").await.unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        let err = h.stream("config", ["x"]).await.unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        h.shutdown().await.unwrap();
    }
}
