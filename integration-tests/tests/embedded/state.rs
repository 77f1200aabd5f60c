//! State that survives: snapshots of a real plugin's exported state, taken
//! per call, periodically and at graceful stop, restored after a crash or a
//! supervisor restart, with corrupt snapshots skipped.

use plugvisor::{PluginState, Supervisor};
use plugvisor_integration_tests::{Sandbox, bin, is_gone, wait_state, wait_until};
use prost::bytes::Bytes;
use std::path::Path;
use std::time::Duration;

const SECS_10: Duration = Duration::from_secs(10);

async fn call(sup: &Supervisor, method: &str, payload: &str) -> Result<Bytes, plugvisor::Error> {
    sup.call(
        "kv",
        method,
        Bytes::from(payload.to_string()),
        Default::default(),
        Some(SECS_10),
    )
    .await
    .map(|r| r.payload)
}

async fn kill_and_wait_back(sup: &Supervisor) {
    let mut events = sup.events();
    let pid = sup.info("kv").unwrap().pid.unwrap();
    // SAFETY: signals the plugin process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_state(&mut events, "kv", PluginState::Ready, SECS_10).await;
    assert!(is_gone(pid));
}

#[tokio::test]
async fn with_per_call_snapshots_no_acknowledged_write_is_lost_to_sigkill() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor_with_state();
    sup.add(
        sandbox.manifest(
            "kv",
            &bin("kv-plugin"),
            "state: {snapshot_on_change: true, snapshot_interval: 0s}\nrestart: {initial_backoff: 10ms}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("kv", SECS_10).await.unwrap();
    for i in 0..50 {
        call(&sup, "set", &format!("key{i}=value{i}"))
            .await
            .unwrap();
    }
    kill_and_wait_back(&sup).await;
    for i in 0..50 {
        let value = call(&sup, "get", &format!("key{i}")).await.unwrap();
        assert_eq!(value, format!("value{i}").as_bytes(), "key{i} survived");
    }
    let history = sup.history("kv").unwrap();
    assert!(
        history.iter().any(
            |e| e.state == PluginState::Initializing && e.reason.contains("restoring snapshot")
        ),
        "{history:#?}"
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn periodic_snapshots_cover_writes_older_than_the_interval() {
    let sandbox = Sandbox::new();
    let state_dir = sandbox.state_dir();
    let sup = sandbox.supervisor_with_state();
    sup.add(
        sandbox.manifest(
            "kv",
            &bin("kv-plugin"),
            "state: {snapshot_interval: 50ms}\nrestart: {initial_backoff: 10ms}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("kv", SECS_10).await.unwrap();
    call(&sup, "set", "colour=blue").await.unwrap();
    // Wait for a snapshot holding the write, then crash.
    let store = plugvisor::state::SnapshotStore::new(&state_dir, "kv");
    wait_until(SECS_10, "a snapshot with the write", || {
        store.load().is_ok_and(|l| {
            l.snapshot
                .is_some_and(|s| String::from_utf8_lossy(&s.state).contains("blue"))
        })
    })
    .await;
    kill_and_wait_back(&sup).await;
    assert_eq!(
        call(&sup, "get", "colour").await.unwrap(),
        "blue".as_bytes()
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_graceful_stop_snapshots_and_a_new_supervisor_restores() {
    let sandbox = Sandbox::new();
    let manifest = sandbox.manifest("kv", &bin("kv-plugin"), "state: {snapshot_interval: 0s}");
    let sup = sandbox.supervisor_with_state();
    sup.add(manifest.clone(), &Default::default()).unwrap();
    sup.wait_ready("kv", SECS_10).await.unwrap();
    call(&sup, "set", "a=1").await.unwrap();
    call(&sup, "set", "b=2").await.unwrap();
    sup.shutdown().await;

    let sup = sandbox.supervisor_with_state();
    sup.add(manifest, &Default::default()).unwrap();
    sup.wait_ready("kv", SECS_10).await.unwrap();
    assert_eq!(call(&sup, "get", "a").await.unwrap(), "1".as_bytes());
    assert_eq!(call(&sup, "get", "b").await.unwrap(), "2".as_bytes());
    sup.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_latest_snapshot_falls_back_to_the_previous_and_says_so() {
    let sandbox = Sandbox::new();
    let state_dir = sandbox.state_dir();
    let sup = sandbox.supervisor_with_state();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "kv",
            &bin("kv-plugin"),
            "state: {snapshot_on_change: true, snapshot_interval: 0s}\nrestart: {initial_backoff: 1s, jitter: 0.0}",
        ),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "kv", PluginState::Ready, SECS_10).await;
    call(&sup, "set", "first=1").await.unwrap();
    call(&sup, "set", "second=2").await.unwrap();
    let pid = sup.info("kv").unwrap().pid.unwrap();
    // SAFETY: signals the plugin process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // During the 1s backoff, corrupt the newest snapshot file.
    wait_state(&mut events, "kv", PluginState::Backoff, SECS_10).await;
    let mut snaps: Vec<_> = std::fs::read_dir(state_dir.join("kv"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .collect();
    snaps.sort();
    let newest = snaps.last().unwrap().clone();
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&newest, bytes).unwrap();

    let init = wait_state(&mut events, "kv", PluginState::Initializing, SECS_10).await;
    assert!(
        init.reason.contains("skipped corrupt snapshot"),
        "{}",
        init.reason
    );
    assert!(init.reason.contains("checksum mismatch"), "{}", init.reason);
    wait_state(&mut events, "kv", PluginState::Ready, SECS_10).await;
    assert_eq!(call(&sup, "get", "first").await.unwrap(), "1".as_bytes());
    assert!(
        call(&sup, "get", "second").await.is_err(),
        "the corrupt snapshot's write is not restored"
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn an_unreadable_newest_snapshot_stops_the_start_instead_of_losing_it() {
    let sandbox = Sandbox::new();
    let state_dir = sandbox.state_dir();
    let sup = sandbox.supervisor_with_state();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "kv",
            &bin("kv-plugin"),
            "state: {snapshot_on_change: true, snapshot_interval: 0s}\nrestart: {initial_backoff: 1s, jitter: 0.0}",
        ),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "kv", PluginState::Ready, SECS_10).await;
    call(&sup, "set", "kept=yes").await.unwrap();
    let store = plugvisor::state::SnapshotStore::new(&state_dir, "kv");
    let newest = store.dir().join(format!(
        "state.{:020}.snap",
        store.latest_seq().expect("a snapshot was written")
    ));
    let pid = sup.info("kv").unwrap().pid.unwrap();
    // SAFETY: signals the plugin process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // During the 1s backoff, make the newest snapshot unreadable: a symlink
    // to a directory fails `read` with EISDIR, for root too.
    wait_state(&mut events, "kv", PluginState::Backoff, SECS_10).await;
    let aside = newest.with_extension("aside");
    std::fs::rename(&newest, &aside).unwrap();
    let dir = newest.with_extension("dir");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&dir, &newest).unwrap();

    let refused = wait_state(&mut events, "kv", PluginState::Backoff, SECS_10).await;
    assert!(
        refused.reason.contains("cannot restore its saved state")
            && refused.reason.contains(&newest.display().to_string()),
        "{}",
        refused.reason
    );
    assert!(std::fs::symlink_metadata(&newest).is_ok(), "not pruned");
    // Put it back: the next attempt restores it.
    std::fs::remove_file(&newest).unwrap();
    std::fs::rename(&aside, &newest).unwrap();
    wait_state(&mut events, "kv", PluginState::Ready, SECS_10).await;
    assert_eq!(call(&sup, "get", "kept").await.unwrap(), "yes".as_bytes());
    sup.shutdown().await;
}

#[tokio::test]
async fn a_full_disk_during_a_snapshot_keeps_the_previous_one() {
    let sandbox = Sandbox::new();
    let state_dir = sandbox.state_dir();
    std::fs::create_dir_all(&state_dir).unwrap();
    let size = "size=64k";
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", size, "tmpfs"])
        .arg(&state_dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        plugvisor_integration_tests::skip(
            "cannot mount a small tmpfs to fill (needs root and mount)",
        );
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&state_dir);
    let sup = sandbox.supervisor_with_state();
    sup.add(
        sandbox.manifest(
            "kv",
            &bin("kv-plugin"),
            "state: {snapshot_on_change: true, snapshot_interval: 0s}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("kv", SECS_10).await.unwrap();
    call(&sup, "set", "small=ok").await.unwrap();
    // A value bigger than the whole filesystem: the snapshot cannot be written,
    // and the caller is told its change happened but is not durable: DATA_LOSS,
    // not a retryable UNAVAILABLE that would invite sending it again.
    let big = format!("big={}", "x".repeat(128 * 1024));
    let err = call(&sup, "set", &big).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err}");
    assert!(err.to_string().contains("could not be saved"), "{err}");
    // And it leaves a trace beyond the caller: an event and the metric.
    let history = sup.history("kv").unwrap();
    assert!(
        history.iter().any(|e| e
            .reason
            .contains("state snapshot after a `set` call that changed state failed")),
        "{history:#?}"
    );
    let metrics = sup.metrics_text();
    assert!(
        metrics.contains("plugvisor_snapshot_failures_total{plugin=\"kv\"} 1"),
        "{metrics}"
    );
    let store = plugvisor::state::SnapshotStore::new(&state_dir, "kv");
    let snapshot = store
        .load()
        .expect("the snapshots can be read")
        .snapshot
        .expect("the previous snapshot is intact");
    assert!(String::from_utf8_lossy(&snapshot.state).contains("small"));
    assert!(!String::from_utf8_lossy(&snapshot.state).contains("xxxx"));
    let leftovers = std::fs::read_dir(state_dir.join("kv"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .count();
    assert_eq!(leftovers, 0, "no temp file is left behind");
    sup.shutdown().await;
}

#[tokio::test]
async fn a_streamed_call_that_changes_state_is_snapshotted_before_it_ends() {
    let sandbox = Sandbox::new();
    let state_dir = sandbox.state_dir();
    let sup = sandbox.supervisor_with_state();
    sup.add(
        sandbox.manifest(
            "tp",
            &bin("testplugin"),
            "state: {snapshot_on_change: true, snapshot_interval: 0s}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("tp", SECS_10).await.unwrap();
    let before = sup.export_state("tp", None).await.unwrap();
    let before: u64 = String::from_utf8_lossy(&before.state).parse().unwrap();
    let upload = tokio_stream::iter(vec![
        Ok(Bytes::from(vec![1u8; 1000])),
        Ok(Bytes::from(vec![2u8; 500])),
    ]);
    let mut reply = sup
        .call_stream("tp", "count", Default::default(), upload, None)
        .await
        .unwrap();
    let mut out = Vec::new();
    use tokio_stream::StreamExt;
    while let Some(chunk) = reply.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    // The flag-only chunk the plugin ended with is not data.
    assert_eq!(out, b"1500");
    // By the time the caller saw the end, the new state was on disk.
    let snapshot = plugvisor::state::SnapshotStore::new(&state_dir, "tp")
        .load()
        .unwrap()
        .snapshot
        .expect("a snapshot taken because the stream changed state");
    let saved: u64 = String::from_utf8_lossy(&snapshot.state).parse().unwrap();
    assert_eq!(saved, before + 1500);
    sup.shutdown().await;
}
