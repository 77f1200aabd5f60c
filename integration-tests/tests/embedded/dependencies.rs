//! `requires:` with real plugin processes: a dependent waits for what it
//! requires, hears of its crash (and with `on_crash: restart` restarts with
//! it), an operator's stop of a requirement stops the plugins bound to it
//! first (BindsTo=) and its start brings them back, add and upgrade refuse
//! missing requirements and cycles, and shutdown stops dependents first.

use plugvisor::{Error, Event, PluginState};
use plugvisor_integration_tests::{Sandbox, bin, is_gone, wait_state};
use std::time::Duration;
use tokio::sync::broadcast;

const SECS_10: Duration = Duration::from_secs(10);

/// Every event until `until` holds for one, in order.
async fn collect(
    events: &mut broadcast::Receiver<Event>,
    mut until: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let e = tokio::time::timeout(SECS_10, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no event within 10s after {seen:#?}"))
            .expect("event stream open");
        seen.push(e);
        if until(&seen) {
            return seen;
        }
    }
}

fn position(seen: &[Event], plugin: &str, state: PluginState) -> usize {
    seen.iter()
        .position(|e| e.plugin == plugin && e.state == state)
        .unwrap_or_else(|| panic!("no {state} event of {plugin} in {seen:#?}"))
}

fn ready(seen: &[Event], plugins: &[&str]) -> bool {
    plugins.iter().all(|p| {
        seen.iter()
            .any(|e| e.plugin == *p && e.state == PluginState::Ready)
    })
}

#[tokio::test]
async fn dependents_wait_for_what_they_require_hear_of_its_crash_and_bound_ones_restart() {
    let sandbox = Sandbox::new();
    let tp = bin("testplugin");
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    // kv is slow to initialize, so its dependents visibly wait.
    sup.add(
        sandbox.manifest("kv", &tp, "args: [--init-sleep-ms, '300']"),
        &Default::default(),
    )
    .unwrap();
    sup.add(
        sandbox.manifest("web", &tp, "requires: [kv]"),
        &Default::default(),
    )
    .unwrap();
    sup.add(
        sandbox.manifest(
            "bound",
            &tp,
            "requires: [{name: kv, version: '>=1, <2', on_crash: restart}]\nrestart: {initial_backoff: 10ms}",
        ),
        &Default::default(),
    )
    .unwrap();
    let seen = collect(&mut events, |s| ready(s, &["kv", "web", "bound"])).await;
    for dependent in ["web", "bound"] {
        let waiting = &seen[position(&seen, dependent, PluginState::Waiting)];
        assert!(
            waiting.reason.starts_with("waiting for kv to be ready"),
            "{waiting:?}"
        );
        assert_eq!(waiting.detail.requirement.as_deref(), Some("kv"));
        // Not spawned before kv was ready.
        assert!(
            position(&seen, dependent, PluginState::Starting)
                > position(&seen, "kv", PluginState::Ready),
            "{dependent} started before kv was ready: {seen:#?}"
        );
    }
    let info = sup.info("bound").unwrap();
    assert_eq!(info.requires[0].name, "kv");
    let web_pid = sup.info("web").unwrap().pid.unwrap();
    let bound_pid = sup.info("bound").unwrap().pid.unwrap();

    // kv crashes.
    let kv_pid = sup.info("kv").unwrap().pid.unwrap();
    // SAFETY: signals a plugin process this test's supervisor started.
    unsafe { libc::kill(kv_pid, libc::SIGKILL) };
    let seen = collect(&mut events, |s| {
        s.iter()
            .any(|e| e.plugin == "bound" && e.state == PluginState::Ready)
            && s.iter().filter(|e| e.plugin == "web").count() >= 2
    })
    .await;
    let mut told = seen
        .iter()
        .filter(|e| e.plugin == "web" && e.detail.requirement.as_deref() == Some("kv"));
    let down = told.next().expect("web hears kv went down");
    assert!(
        down.reason.starts_with("required plugin kv went down"),
        "{down:?}"
    );
    assert_eq!(down.state, PluginState::Ready, "web keeps running");
    let back = told.next().expect("web hears kv is back");
    assert!(
        back.reason.starts_with("required plugin kv is ready again"),
        "{back:?}"
    );
    let stopping = &seen[position(&seen, "bound", PluginState::Stopping)];
    assert!(
        stopping.reason.contains("on_crash: restart"),
        "{stopping:?}"
    );
    assert!(
        position(&seen, "bound", PluginState::Starting) > position(&seen, "kv", PluginState::Ready),
        "bound started again before kv was ready: {seen:#?}"
    );
    assert_ne!(sup.info("bound").unwrap().pid, Some(bound_pid));
    assert_eq!(sup.info("web").unwrap().pid, Some(web_pid), "notify only");

    // Shutdown: dependents stop before what they require.
    let mut events = sup.events();
    sup.shutdown().await;
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    let kv_stops = position(&seen, "kv", PluginState::Stopping);
    for dependent in ["web", "bound"] {
        assert!(
            position(&seen, dependent, PluginState::Stopped) < kv_stops,
            "{dependent} stopped after kv began stopping: {seen:#?}"
        );
    }
}

#[tokio::test]
async fn missing_requirements_versions_and_cycles_are_refused_naming_both_ends() {
    let sandbox = Sandbox::new();
    let tp = bin("testplugin");
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    let e = sup
        .add(
            sandbox.manifest("web", &tp, "requires: [kv]"),
            &Default::default(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    assert!(
        e.to_string()
            .contains("web requires kv, which is not supervised; add kv first"),
        "{e}"
    );
    sup.add(sandbox.manifest("kv", &tp, ""), &Default::default())
        .unwrap();
    let e = sup
        .add(
            sandbox.manifest("old", &tp, "requires: [{name: kv, version: '>=2'}]"),
            &Default::default(),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("old requires kv >=2, but kv is 1.0.0"),
        "{e}"
    );
    sup.add(
        sandbox.manifest("web", &tp, "requires: [kv]"),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "web", PluginState::Ready, SECS_10).await;
    // An upgrade of kv that would require web closes a cycle.
    let e = sup
        .upgrade("kv", sandbox.manifest("kv", &tp, "requires: [web]"))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("requirements would form a cycle: kv → web → kv"),
        "{e}"
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn stopping_a_requirement_stops_bound_dependents_first_and_starting_it_brings_them_back() {
    let sandbox = Sandbox::new();
    let tp = bin("testplugin");
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(sandbox.manifest("kv", &tp, ""), &Default::default())
        .unwrap();
    // web only hears of it (Wants=); bound stops with kv (BindsTo=), and
    // outer, bound to bound, stops before it.
    sup.add(
        sandbox.manifest("web", &tp, "requires: [kv]"),
        &Default::default(),
    )
    .unwrap();
    sup.add(
        sandbox.manifest("bound", &tp, "requires: [{name: kv, on_crash: restart}]"),
        &Default::default(),
    )
    .unwrap();
    sup.add(
        sandbox.manifest("outer", &tp, "requires: [{name: bound, on_crash: restart}]"),
        &Default::default(),
    )
    .unwrap();
    collect(&mut events, |s| ready(s, &["kv", "web", "bound", "outer"])).await;
    // The order reload removes in: each before what it requires, also
    // through a plugin not in the list (outer → bound → kv).
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        sup.dependents_first(names(&["kv", "web", "bound", "outer"])),
        names(&["web", "outer", "bound", "kv"])
    );
    assert_eq!(
        sup.dependents_first(names(&["kv", "outer"])),
        names(&["outer", "kv"])
    );
    let pid = |name: &str| sup.info(name).unwrap().pid.unwrap();
    let (bound_pid, outer_pid) = (pid("bound"), pid("outer"));

    // A zero-downtime upgrade of kv is no going down: nothing bound to it
    // stops (its old instance stops while the new one serves).
    let mut upgrade_events = sup.events();
    sup.upgrade("kv", sandbox.manifest("kv", &tp, ""))
        .await
        .unwrap();
    // Then web restarts: by its ready, bound has had every event of the
    // upgrade to react to.
    sup.restart("web").await.unwrap();
    let seen = collect(&mut upgrade_events, |s| ready(s, &["web"])).await;
    assert!(
        !seen
            .iter()
            .any(|e| e.plugin == "bound" && e.state == PluginState::Stopping),
        "an upgrade of kv stopped bound: {seen:#?}"
    );
    assert_eq!(sup.info("bound").unwrap().pid, Some(bound_pid));
    let web_pid = pid("web");

    let mut events = sup.events();
    sup.stop("kv").await.unwrap();
    // When the stop returns, what is bound to kv is already down, waiting
    // for it, and its processes are gone; web runs on.
    for (name, old) in [("bound", bound_pid), ("outer", outer_pid)] {
        let info = sup.info(name).unwrap();
        assert_eq!(info.state, PluginState::Waiting, "{name}: {info:?}");
        assert_eq!(info.pid, None, "{name}");
        assert!(is_gone(old), "{name}'s process {old} still runs");
    }
    assert_eq!(
        sup.info("bound").unwrap().reason.split(" (").next(),
        Some("waiting for kv to be ready")
    );
    assert_eq!(sup.info("web").unwrap().pid, Some(web_pid), "notify only");
    assert_eq!(sup.info("kv").unwrap().state, PluginState::Stopped);
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    // Stops in reverse dependency order: kv says it is stopping, then
    // outer stops before bound, and bound before kv.
    let at = |plugin: &str, state: PluginState| position(&seen, plugin, state);
    assert!(at("kv", PluginState::Stopping) < at("bound", PluginState::Stopping));
    assert!(
        at("outer", PluginState::Stopped) < at("bound", PluginState::Stopped),
        "{seen:#?}"
    );
    assert!(
        at("bound", PluginState::Stopped) < at("kv", PluginState::Stopped),
        "{seen:#?}"
    );
    let told = seen
        .iter()
        .find(|e| e.plugin == "web" && e.detail.requirement.as_deref() == Some("kv"))
        .unwrap_or_else(|| panic!("web is told kv went down: {seen:#?}"));
    assert!(
        told.reason.starts_with("required plugin kv went down"),
        "{told:?}"
    );

    // Starting kv brings bound back once kv is ready, and outer after it.
    sup.start("kv").await.unwrap();
    let seen = collect(&mut events, |s| ready(s, &["kv", "bound", "outer"])).await;
    assert!(
        position(&seen, "bound", PluginState::Starting) > position(&seen, "kv", PluginState::Ready),
        "{seen:#?}"
    );
    assert!(
        position(&seen, "outer", PluginState::Starting)
            > position(&seen, "bound", PluginState::Ready),
        "{seen:#?}"
    );
    assert_eq!(sup.info("web").unwrap().pid, Some(web_pid), "notify only");

    // An operator's stop of a bound dependent holds: kv's restart does not
    // bring it back.
    sup.stop("outer").await.unwrap();
    let mut events = sup.events();
    sup.restart("kv").await.unwrap();
    let _ = collect(&mut events, |s| ready(s, &["bound"])).await;
    assert_eq!(sup.info("outer").unwrap().state, PluginState::Stopped);
    sup.shutdown().await;
}
