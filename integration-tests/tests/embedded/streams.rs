//! `HandleStream` through the embedded supervisor: chunks of every size
//! (larger than an HTTP/2 frame, smaller than a message prefix) come back
//! intact, and a stream nobody reads holds a bounded number of bytes.

use plugvisor_integration_tests::{Sandbox, bin, wait_until};
use prost::bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_stream::StreamExt;

const SECS_10: Duration = Duration::from_secs(10);

/// Bytes that differ from chunk to chunk and position to position, so a
/// lost, repeated or reordered piece shows.
fn pattern(seed: usize, len: usize) -> Bytes {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(7919)) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test]
async fn chunks_of_every_size_round_trip_intact() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest("t", &bin("testplugin"), ""),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("t", SECS_10).await.unwrap();
    // Around the inline threshold (4 KiB), the old and new frame sizes (1
    // and 2 MiB) and well beyond them.
    let sizes = [
        1,
        9,
        4096,
        4097,
        (1 << 20) - 9,
        1 << 20,
        (1 << 20) + 1,
        2 << 20,
        (3 << 20) + 7,
        8 << 20,
        5,
    ];
    let chunks: Vec<Bytes> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| pattern(i, len))
        .collect();
    let sent: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let upload = tokio_stream::iter(chunks.into_iter().map(Ok));
    let reply = sup
        .call_stream("t", "echo", HashMap::new(), upload, None)
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
}

#[tokio::test]
async fn a_stream_nobody_reads_holds_a_bounded_number_of_chunks() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest("t", &bin("testplugin"), ""),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("t", SECS_10).await.unwrap();
    // An endless upload of 1 MiB chunks to a plugin that echoes as fast as
    // it can, and a caller that never reads the reply: only the HTTP/2
    // windows (4 MiB per stream each way) and the chunks in flight between
    // them may be taken, never the whole flood.
    const CHUNK: usize = 1 << 20;
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let chunk = pattern(1, CHUNK);
    let upload = tokio_stream::iter(std::iter::repeat_with(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(chunk.clone())
    }));
    let reply = sup
        .call_stream("t", "echo", HashMap::new(), upload, None)
        .await
        .unwrap();
    // The windows fill: the flow reaches the plugin and back.
    wait_until(SECS_10, "the windows to fill", || {
        pulled.load(Ordering::SeqCst) >= 8
    })
    .await;
    // Then it stops. Were anything buffered without bound, a local socket
    // would move hundreds of MiB in this time.
    let mut last = pulled.load(Ordering::SeqCst);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = pulled.load(Ordering::SeqCst);
    }
    assert!(
        last <= 24,
        "{last} chunks of 1 MiB were taken from a stream whose reply nobody reads"
    );
    // The stream still works: reading the reply lets the upload go on.
    tokio::pin!(reply);
    for _ in 0..32 {
        let chunk = reply.next().await.unwrap().unwrap();
        assert!(!chunk.is_empty());
    }
    assert!(pulled.load(Ordering::SeqCst) > last);
    sup.shutdown().await;
}
