//! The supervisor's `HandleStream` (chunks sent and read without tonic's
//! codec) against plugins on other gRPC stacks: grpcio (Python) and
//! grpc-go. Chunks larger than an HTTP/2 frame, and tiny ones, come back
//! intact.

use plugvisor_integration_tests::{Sandbox, skip};
use prost::bytes::Bytes;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tokio_stream::StreamExt;

/// Streams chunks of several sizes to `exec`'s `echo` stream method
/// through an embedded supervisor and checks every byte came back in order.
fn echoes_every_chunk(exec: &Path) {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(async {
        let sandbox = Sandbox::new();
        let sup = sandbox.supervisor();
        sup.add(sandbox.manifest("p", exec, ""), &Default::default())
            .unwrap();
        sup.wait_ready("p", Duration::from_secs(30)).await.unwrap();
        let sizes = [1, 4097, 1 << 20, (3 << 20) + 7, 5];
        let chunks: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(n, &len)| {
                (0..len)
                    .map(|i| (i * 31 + n * 7) as u8)
                    .collect::<Vec<u8>>()
                    .into()
            })
            .collect();
        let sent: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let upload = tokio_stream::iter(chunks.into_iter().map(Ok));
        let reply = sup
            .call_stream("p", "echo", HashMap::new(), upload, None)
            .await
            .unwrap();
        tokio::pin!(reply);
        let mut back = Vec::with_capacity(sent.len());
        while let Some(chunk) = reply.next().await {
            back.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(back.len(), sent.len());
        assert!(back == sent, "the echoed bytes differ from those sent");
        sup.shutdown().await;
    });
}

#[test]
fn a_python_plugin_echoes_large_and_small_chunks() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let launcher = repo.join("examples/python-echo/python-echo");
    if !repo.join(".venv/bin/python3").exists() || !launcher.exists() {
        return skip("python venv missing (run scripts/setup-python.sh)");
    }
    echoes_every_chunk(&launcher);
}

#[test]
fn a_go_plugin_echoes_large_and_small_chunks() {
    match crate::go_plugin::go_echo() {
        Ok(exec) => echoes_every_chunk(&exec),
        Err(why) => skip(why),
    }
}
