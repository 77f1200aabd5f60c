//! The echo plugin: the smallest useful plugvisor plugin, and the one the
//! benchmarks call.
//!
//! Methods:
//! - `echo`: returns the payload unchanged.
//! - `upper`: returns the payload with ASCII letters upper-cased.
//! - `greet`: returns the `greeting` config key (default `hello`), followed
//!   by `, <payload>` when the payload is not empty.
//!
//! `echo` and `upper` also work over `HandleStream`, chunk by chunk as the
//! chunks arrive.

use std::collections::HashMap;
use std::sync::RwLock;

use plugvisor_sdk::{
    ByteStream, Bytes, InitContext, Plugin, Request, Response, Status, StreamExt, async_trait,
    unknown_method,
};

/// Used by `greet` when the config has no `greeting`.
const DEFAULT_GREETING: &str = "hello";

#[derive(Debug)]
struct Echo {
    /// Set by `Initialize`; read by `greet`. A lock rather than a `OnceLock`
    /// because a supervisor may initialize again with new config.
    greeting: RwLock<String>,
}

impl Echo {
    fn new() -> Self {
        Echo {
            greeting: RwLock::new(DEFAULT_GREETING.to_string()),
        }
    }

    fn greet(&self, payload: &[u8]) -> Bytes {
        // A poisoned lock only means a writer panicked mid-assignment of a
        // `String`; the old or new value is still a valid greeting.
        let greeting = self
            .greeting
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if payload.is_empty() {
            Bytes::from(greeting)
        } else {
            let mut out = greeting.into_bytes();
            out.extend_from_slice(b", ");
            out.extend_from_slice(payload);
            Bytes::from(out)
        }
    }
}

fn upper(payload: &[u8]) -> Bytes {
    Bytes::from(payload.to_ascii_uppercase())
}

#[async_trait]
impl Plugin for Echo {
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn methods(&self) -> Vec<String> {
        ["echo", "upper", "greet"].map(String::from).to_vec()
    }

    fn stream_methods(&self) -> Vec<String> {
        ["echo", "upper"].map(String::from).to_vec()
    }

    async fn initialize(&self, ctx: InitContext) -> Result<(), Status> {
        let greeting = match ctx.config.get("greeting") {
            None | Some(serde_json::Value::Null) => DEFAULT_GREETING.to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(Status::invalid_argument(format!(
                    "config key `greeting` must be a string, got {other}"
                )));
            }
        };
        *self
            .greeting
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = greeting;
        Ok(())
    }

    async fn handle(&self, req: Request) -> Result<Response, Status> {
        match req.method.as_str() {
            "echo" => Ok(Response::new(req.payload)),
            "upper" => Ok(Response::new(upper(&req.payload))),
            "greet" => Ok(Response::new(self.greet(&req.payload))),
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
            "echo" => Ok(input),
            "upper" => Ok(Box::pin(input.map(|chunk| chunk.map(|c| upper(&c))))),
            other => Err(unknown_method(other)),
        }
    }
}

fn main() {
    plugvisor_sdk::main(Echo::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugvisor_sdk::Code;
    use plugvisor_sdk::testing::Harness;
    use serde_json::json;

    #[tokio::test]
    async fn echoes_and_upper_cases() {
        let mut h = Harness::start(Echo::new()).await.unwrap();
        let init = h.initialize(json!({})).await.unwrap();
        assert_eq!(init.methods, ["echo", "upper", "greet"]);
        assert_eq!(h.call("echo", "Hi there").await.unwrap(), "Hi there");
        assert_eq!(h.call("upper", "Hi thére").await.unwrap(), "HI THéRE");
        assert_eq!(h.call("echo", "").await.unwrap(), "");
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn greets_with_the_configured_greeting() {
        let mut h = Harness::start(Echo::new()).await.unwrap();
        h.initialize(json!({"greeting": "hi"})).await.unwrap();
        assert_eq!(h.call("greet", "bob").await.unwrap(), "hi, bob");
        assert_eq!(h.call("greet", "").await.unwrap(), "hi");
        h.shutdown().await.unwrap();

        let mut h = Harness::start(Echo::new()).await.unwrap();
        h.initialize(json!({})).await.unwrap();
        assert_eq!(h.call("greet", "").await.unwrap(), DEFAULT_GREETING);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn rejects_a_greeting_that_is_not_a_string() {
        let mut h = Harness::start(Echo::new()).await.unwrap();
        let err = h.initialize(json!({"greeting": 3})).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("greeting"), "{}", err.message());
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn unknown_methods_are_unimplemented() {
        let mut h = Harness::start(Echo::new()).await.unwrap();
        let err = h.call("reverse", "x").await.unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        let err = h.stream("greet", ["x"]).await.unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn streams_chunks_back_as_they_arrive() {
        let mut h = Harness::start(Echo::new()).await.unwrap();
        let chunks: Vec<Bytes> = (0..8u8)
            .map(|i| Bytes::from(vec![b'a' + i; 1024 * 1024]))
            .collect();
        let out = h.stream("echo", chunks.clone()).await.unwrap();
        assert_eq!(out, chunks);
        let out = h.stream("upper", ["ab", "c"]).await.unwrap();
        assert_eq!(out, ["AB", "C"]);
        h.shutdown().await.unwrap();
    }
}
