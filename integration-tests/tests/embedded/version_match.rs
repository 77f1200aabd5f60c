//! A plugin that reports another version in Initialize than its manifest
//! says: a warning in its ready event, both versions in `info` (and so in
//! `ps`/`inspect`), and a refused start when the manifest sets
//! `isolation.require_version_match`. The test plugin reports the
//! workspace version; the sandbox's manifests say 1.0.0.

use plugvisor::PluginState;
use plugvisor::manifest::Manifest;
use plugvisor_integration_tests::{Sandbox, bin, wait_state};
use std::time::Duration;

const SECS_10: Duration = Duration::from_secs(10);
/// What the test plugin reports in Initialize.
const REPORTED: &str = env!("CARGO_PKG_VERSION");

#[tokio::test]
async fn a_version_mismatch_is_a_warning_and_both_versions_are_shown() {
    assert_ne!(REPORTED, "1.0.0", "the test needs the versions to differ");
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest("drift", &bin("testplugin"), ""),
        &Default::default(),
    )
    .unwrap();
    let ready = wait_state(&mut events, "drift", PluginState::Ready, SECS_10).await;
    assert!(
        ready.reason.contains(&format!(
            "warning: the plugin reports version {REPORTED} in Initialize, but its manifest"
        )) && ready.reason.ends_with("says 1.0.0"),
        "{}",
        ready.reason
    );
    let info = sup.info("drift").unwrap();
    assert_eq!(info.version, "1.0.0");
    assert_eq!(info.reported_version.as_deref(), Some(REPORTED));
    sup.shutdown().await;
}

#[tokio::test]
async fn require_version_match_refuses_a_mismatch_and_accepts_a_match() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "strict",
            &bin("testplugin"),
            "isolation: {require_version_match: true}",
        ),
        &Default::default(),
    )
    .unwrap();
    let failed = wait_state(&mut events, "strict", PluginState::Failed, SECS_10).await;
    assert!(
        failed
            .reason
            .contains(&format!("reports version {REPORTED}"))
            && failed
                .reason
                .contains("isolation.require_version_match: true"),
        "{}",
        failed.reason
    );
    assert_eq!(
        sup.info("strict").unwrap().restarts,
        0,
        "refused, not retried"
    );
    // The same plugin with its real version starts.
    let dir = sandbox.plugins_dir().join("matching");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("plugin.yaml");
    std::fs::write(
        &path,
        format!(
            "name: matching\nversion: {REPORTED}\nexec: {}\nisolation: {{require_version_match: true}}\n",
            bin("testplugin").display()
        ),
    )
    .unwrap();
    sup.add(Manifest::load(&path).unwrap(), &Default::default())
        .unwrap();
    sup.wait_ready("matching", SECS_10).await.unwrap();
    let info = sup.info("matching").unwrap();
    assert_eq!(info.reported_version.as_deref(), Some(REPORTED));
    sup.shutdown().await;
}
