//! The filesystem view (`isolation.filesystem`, Landlock), on real plugin
//! processes: what a read-only plugin can and cannot write, that its own
//! paths stay writable and the host readable, and how the view reads in
//! `inspect`.

use plugvisor::Supervisor;
use plugvisor::isolation::{landlock, pin};
use plugvisor::manifest::Manifest;
use plugvisor_integration_tests::{Sandbox, bin};
use prost::bytes::Bytes;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const SECS_10: Duration = Duration::from_secs(10);

macro_rules! or_skip {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(why) => {
                plugvisor_integration_tests::skip(why);
                return;
            }
        }
    };
}

async fn call(sup: &Supervisor, plugin: &str, method: &str, payload: &str) -> serde_json::Value {
    let reply = sup
        .call(
            plugin,
            method,
            Bytes::from(payload.to_string()),
            Default::default(),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{plugin}.{method}({payload}): {e}"));
    serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|e| panic!("{plugin}.{method}: not JSON: {e}"))
}

/// A directory anyone may write in, as `/tmp` is.
fn world_writable(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
}

async fn write(sup: &Supervisor, plugin: &str, path: &Path) -> serde_json::Value {
    call(sup, plugin, "write_file", &path.display().to_string()).await
}

#[tokio::test]
async fn a_read_only_plugin_writes_only_its_own_paths_and_still_reads_the_host() {
    let abi = or_skip!(landlock::probe());
    let sandbox = Sandbox::new();
    let open = sandbox.dir.path().join("open");
    world_writable(&open);
    // `writable: [data]` is relative to the manifest's directory.
    let data = sandbox.plugins_dir().join("ro").join("data");
    world_writable(&data);
    let sup = sandbox.supervisor();
    for (name, extra) in [
        ("ro", "isolation: {filesystem: {writable: [data]}}"),
        ("free", ""),
    ] {
        sup.add(
            sandbox.manifest(name, &bin("testplugin"), extra),
            &Default::default(),
        )
        .unwrap();
        sup.wait_ready(name, SECS_10).await.unwrap();
    }

    // Outside its paths: refused by Landlock, though the mode allows it.
    let r = write(&sup, "ro", &open.join("ro")).await;
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().starts_with("EACCES"), "{r}");
    assert!(!open.join("ro").exists());
    // The same write from a plugin without a view succeeds.
    let r = write(&sup, "free", &open.join("free")).await;
    assert_eq!(r["ok"], true, "{r}");

    // Its own paths: the listed one, its private tmp, the null device.
    let r = write(&sup, "ro", &data.join("ro")).await;
    assert_eq!(r["ok"], true, "{r}");
    assert!(data.join("ro").exists());
    let env = call(&sup, "ro", "env", "").await;
    let tmp = env["TMPDIR"].as_str().expect("TMPDIR is set").to_string();
    assert!(
        Path::new(&tmp).starts_with(sandbox.runtime_dir()),
        "the private tmp is in the runtime dir: {tmp}"
    );
    let r = write(&sup, "ro", &Path::new(&tmp).join("scratch")).await;
    assert_eq!(r["ok"], true, "{r}");
    let r = write(&sup, "ro", Path::new("/dev/null")).await;
    assert_eq!(r["ok"], true, "{r}");
    // Even its own /proc entries are not writable.
    let r = write(&sup, "ro", Path::new("/proc/self/comm")).await;
    assert!(r["error"].as_str().unwrap().starts_with("EACCES"), "{r}");
    // Without a view, no private tmp is made.
    let free_env = call(&sup, "free", "env", "").await;
    assert!(free_env.get("TMPDIR").is_none(), "{free_env}");

    // The host stays readable: its executable and the directory it is in.
    let exe = bin("testplugin");
    let r = call(&sup, "ro", "read_file", &exe.display().to_string()).await;
    assert_eq!(r["ok"], true, "{r}");
    let exe_dir = exe.parent().unwrap().display().to_string();
    let r = call(&sup, "ro", "read_file", &exe_dir).await;
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");

    let info = sup.info("ro").unwrap();
    let line = format!(
        "filesystem read-only (Landlock ABI {abi}), writable: its socket directory, its private tmp (TMPDIR), {}",
        data.display()
    );
    assert!(
        info.isolation
            .hardening
            .iter()
            .any(|h| h.starts_with(&line)),
        "{:?}",
        info.isolation.hardening
    );
    assert!(
        !info
            .isolation
            .degraded
            .iter()
            .any(|d| d.contains("filesystem")),
        "{:?}",
        info.isolation.degraded
    );
    let free = sup.info("free").unwrap();
    assert!(
        free.isolation
            .hardening
            .iter()
            .any(|h| h.starts_with("filesystem host")),
        "{:?}",
        free.isolation.hardening
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_pinned_plugin_executes_its_sealed_copy_inside_the_view() {
    or_skip!(landlock::probe());
    let sandbox = Sandbox::new();
    let open = sandbox.dir.path().join("open");
    world_writable(&open);
    let exe = bin("testplugin");
    let digest = pin::sha256_file(&exe).unwrap();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest(
            "pinned",
            &exe,
            &format!("sha256: {digest}\nisolation: {{filesystem: read-only}}"),
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("pinned", SECS_10).await.unwrap();
    let r = write(&sup, "pinned", &open.join("x")).await;
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().starts_with("EACCES"), "{r}");
    sup.shutdown().await;
}

#[test]
fn unknown_filesystem_keys_and_views_are_manifest_errors_naming_the_field() {
    let sandbox = Sandbox::new();
    for (extra, field, needle) in [
        (
            "isolation: {filesystem: {writeable: [data]}}",
            "isolation.filesystem",
            "unknown field `writeable`",
        ),
        (
            "isolation: {filesystem: sandboxed}",
            "isolation.filesystem",
            "unknown variant `sandboxed`",
        ),
        (
            "isolation: {filesystem: {view: host, writable: [data]}}",
            "isolation.filesystem.writable",
            "only applies to `view: read-only`",
        ),
    ] {
        let path = sandbox.plugin("bad", &bin("testplugin"), extra);
        let e = Manifest::load(&path).unwrap_err();
        assert_eq!(e.field.as_deref(), Some(field), "{extra}: {e}");
        assert!(e.message.contains(needle), "{extra}: {e}");
    }
}
