//! Zero-downtime upgrades, all-or-nothing across replicas.
//!
//! The coordinator ([`crate::plugin`]) runs an upgrade in two phases:
//!
//! 1. *Switch*, one replica after the other: the replica drains its calls,
//!    exports its state (written as a snapshot), starts the new instance
//!    with it, health-checks it, switches calls to it and watches it through
//!    the probation window, keeping the old instance alive beside it. It
//!    answers "switched" (or "failed, still on the old instance") and waits.
//! 2. *Decide*: if every replica switched, the coordinator commits (each
//!    stops its old instance and adopts the new spec); if one failed, it
//!    rolls back every replica that had switched (each kills its new
//!    instance, drops the snapshots the new version wrote, and hands calls
//!    back to the old one). Either all replicas run the new spec, or all run
//!    the old one.
//!
//! The coordinator is its own task, so a caller that goes away mid-upgrade
//! changes nothing: the upgrade finishes or rolls back on its own. A
//! decision that never comes (the coordinator is gone) counts as a rollback.

use crate::instance::{self, Instance, probe};
use crate::process::wait_exit;
use crate::replica::{Replica, Spec};
use crate::routing::Route;
use crate::status::{EventDetail, Health, PluginState};
use plugvisor_proto::RestoredState;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The coordinator's order to one replica.
pub(crate) struct Order {
    pub spec: Arc<Spec>,
    /// Answered after the switch: `Ok` when the replica runs the new spec
    /// (its old instance kept), `Err(why)` when it stayed on the old one.
    pub switched: oneshot::Sender<Result<(), String>>,
    /// The coordinator's decision, sent once every replica has answered.
    pub decision: oneshot::Receiver<Verdict>,
}

/// Commit or roll back; `done` is answered once carried out.
pub(crate) struct Verdict {
    pub commit: bool,
    /// Why a rollback happened (another replica's failure).
    pub reason: String,
    pub done: oneshot::Sender<()>,
}

/// What a running replica goes on with after an upgrade.
pub(crate) struct Upgraded {
    pub instance: Instance,
    /// When the instance it goes on with became ready, if it is a new one.
    pub ready_since: Option<Instant>,
    /// The spec to adopt, when the upgrade was committed.
    pub adopted: Option<Arc<Spec>>,
}

/// A replica with no instance running switches nothing: it says so and
/// waits for the verdict. Returns the spec to adopt on commit.
pub(crate) async fn nothing_running(order: Order, cancel: &CancellationToken) -> Option<Arc<Spec>> {
    let _ = order.switched.send(Ok(()));
    let verdict = tokio::select! {
        v = order.decision => v.ok(),
        _ = cancel.cancelled() => None,
    };
    let verdict = verdict?;
    let _ = verdict.done.send(());
    verdict.commit.then_some(order.spec)
}

/// Upgrades a running replica from `current` to `order.spec`: switch, then
/// the verdict. Returns the instance to go on with.
pub(crate) async fn run(
    replica: &Replica,
    current: &Spec,
    old: Instance,
    order: Order,
    new_id: &str,
) -> Upgraded {
    let Order {
        spec: new,
        switched,
        decision,
    } = order;
    let old_route = replica.plugin.routes.ready(replica.index);
    let switch = switch_over(replica, current, &old, old_route.as_ref(), &new, new_id).await;
    let (fresh, ready_since, before) = match switch {
        Ok(s) => s,
        Err(why) => {
            restore_old(replica, current, &new, &old, old_route.as_ref(), &why);
            let _ = switched.send(Err(why));
            return Upgraded {
                instance: old,
                ready_since: None,
                adopted: None,
            };
        }
    };
    let _ = switched.send(Ok(()));
    let verdict = tokio::select! {
        v = decision => v.ok(),
        _ = replica.host.cancel.cancelled() => None,
    };
    let (commit, reason, done) = match verdict {
        Some(v) => (v.commit, v.reason, Some(v.done)),
        None => (false, "the upgrade was abandoned".to_string(), None),
    };
    let result = if commit {
        commit_switch(replica, current, &new, old, fresh, ready_since).await
    } else {
        roll_back(
            replica,
            current,
            &new,
            old,
            old_route.as_ref(),
            fresh,
            before,
            &reason,
        )
        .await
    };
    if let Some(done) = done {
        let _ = done.send(());
    }
    result
}

/// Phase one: from the old instance to a ready, probed new one that takes
/// the calls. Returns the new instance, when it became ready, and the
/// newest snapshot before the new version ran (to roll back to).
async fn switch_over(
    replica: &Replica,
    current: &Spec,
    old: &Instance,
    old_route: Option<&Arc<crate::routing::ReadyInstance>>,
    new: &Arc<Spec>,
    new_id: &str,
) -> Result<(Instance, Instant, Option<u64>), String> {
    let started = Instant::now();
    // New calls wait (or go to other replicas) while the state moves over;
    // calls in flight on the old instance finish first.
    replica.route(Route::Pending);
    if let Some(route) = old_route
        && !route.drained(current.manifest.timeouts.call.0).await
    {
        return Err("calls on the old instance did not finish in time".into());
    }
    // The export and its snapshot hold the snapshot turn, so no periodic
    // snapshot of the old instance lands after this one.
    let turn = match &replica.snapshots {
        Some(s) => Some(s.turn().await),
        None => None,
    };
    let state = instance::export(&old.client, current.manifest.timeouts.call.0)
        .await
        .map_err(|why| format!("cannot export the old instance's state: {why}"))?;
    let before = match (&replica.snapshots, turn) {
        (Some(snapshots), Some(turn)) => Some(
            snapshots
                .write(turn, state.state.to_vec(), state.state_version)
                .await
                .map_err(|why| format!("cannot save the old instance's state: {why}"))?,
        ),
        _ => None,
    };
    let note = format!(
        "; upgrading from {} with {} bytes of state (version {})",
        current.manifest.version,
        state.state.len(),
        state.state_version
    );
    let restored = Some(RestoredState {
        state: state.state,
        state_version: state.state_version,
    });
    let (fresh, info) = replica
        .launch(new, new_id, restored, &note)
        .await
        .map_err(|e| format!("the new instance did not start: {e}"))?;
    if let Err(why) = healthy(&fresh, new).await {
        instance::kill_and_reap(&fresh.child).await;
        return Err(format!("the new instance is not healthy: {why}"));
    }
    // A new version with a new config: the new version says whether it
    // accepts it, before it takes calls (see `crate::validate`).
    if crate::validate::changed_config_and_version(current, new)
        && let Err(why) =
            crate::validate::ask(&fresh.client, &new.config, new.manifest.timeouts.call.0).await
    {
        instance::kill_and_reap(&fresh.child).await;
        return Err(format!("the new instance refused the new config: {why}"));
    }
    if let Err(e) = replica.post_ready(new, &fresh).await {
        instance::kill_and_reap(&fresh.child).await;
        return Err(format!("the new instance's {e}"));
    }
    let ready_since = replica.publish(&fresh, &info);
    let switched = started.elapsed();
    // Probation: the old instance stays up, taking no calls, in case the new
    // one fails soon after the switch.
    if let Err(why) = probation(&new.manifest, &fresh).await {
        instance::kill_and_reap(&fresh.child).await;
        if let (Some(snapshots), Some(seq)) = (&replica.snapshots, before) {
            discard_after(snapshots, seq).await;
        }
        return Err(format!(
            "the new instance failed its probation: {why} (calls it took meanwhile are not carried back)"
        ));
    }
    replica.transition(
        PluginState::Ready,
        &fresh.id,
        format!(
            "calls switched to {} after {}ms; the old instance stays until every replica has switched",
            new.manifest.version,
            switched.as_millis()
        ),
    );
    Ok((fresh, ready_since, before))
}

async fn healthy(instance: &Instance, spec: &Spec) -> Result<(), String> {
    match probe(&instance.client, spec.manifest.health.timeout.0).await? {
        (Health::Serving | Health::Degraded, _) => Ok(()),
        (other, msg) => Err(format!(
            "health check answered {}: {msg}",
            other.as_str_name()
        )),
    }
}

/// Watches a just-switched instance for `upgrade.probation`: an exit or a
/// failed health probe fails it.
async fn probation(
    manifest: &crate::manifest::Manifest,
    instance: &Instance,
) -> Result<(), String> {
    let window = manifest.upgrade.probation.0;
    if window.is_zero() {
        return Ok(());
    }
    let every = (window / 4).max(Duration::from_millis(10));
    let end = tokio::time::sleep(window);
    let exited = wait_exit(instance.child.exit_watch());
    tokio::pin!(end, exited);
    loop {
        tokio::select! {
            _ = &mut end => return Ok(()),
            status = &mut exited => return Err(format!("it {status}")),
            _ = tokio::time::sleep(every) => {
                match probe(&instance.client, manifest.health.timeout.0).await {
                    Ok((Health::Serving | Health::Degraded, _)) => {}
                    Ok((status, message)) => return Err(format!("health check answered {}: {message}", status.as_str_name())),
                    Err(why) => return Err(format!("health check failed: {why}")),
                }
            }
        }
    }
}

/// Calls go back to the old instance, which kept running.
fn restore_old(
    replica: &Replica,
    current: &Spec,
    new: &Spec,
    old: &Instance,
    old_route: Option<&Arc<crate::routing::ReadyInstance>>,
    why: &str,
) {
    let pid = old.child.pid();
    replica.update(|r| {
        r.instance = old.id.clone();
        r.pid = Some(pid);
        r.attached = Some(Arc::new(crate::handover::Attached::of(old)));
    });
    if let Some(route) = old_route {
        replica.route(Route::Ready(route.clone()));
    }
    replica.event(
        PluginState::Ready,
        &old.id,
        format!(
            "upgrade to {} rolled back: {why}; still serving {}",
            new.manifest.version, current.manifest.version
        ),
        EventDetail {
            pid: Some(pid),
            version: Some(current.manifest.version.to_string()),
            ..EventDetail::default()
        },
    );
}

/// Commit: the old instance is drained and stopped; the new one goes on.
async fn commit_switch(
    replica: &Replica,
    current: &Spec,
    new: &Arc<Spec>,
    mut old: Instance,
    fresh: Instance,
    ready_since: Instant,
) -> Upgraded {
    replica
        .stop_instance(
            &current.manifest,
            &mut old,
            "replaced by an upgrade",
            true,
            false,
        )
        .await;
    replica.event(
        PluginState::Ready,
        &fresh.id,
        format!(
            "upgraded from {} to {}",
            current.manifest.version, new.manifest.version
        ),
        EventDetail {
            pid: Some(fresh.child.pid()),
            version: Some(new.manifest.version.to_string()),
            ..EventDetail::default()
        },
    );
    Upgraded {
        instance: fresh,
        ready_since: Some(ready_since),
        adopted: Some(new.clone()),
    }
}

/// Rollback after a switch: the new instance is killed, the snapshots it
/// wrote are dropped (the old binary must not restore the new version's
/// state), and calls go back to the old instance.
#[allow(clippy::too_many_arguments)]
async fn roll_back(
    replica: &Replica,
    current: &Spec,
    new: &Spec,
    old: Instance,
    old_route: Option<&Arc<crate::routing::ReadyInstance>>,
    fresh: Instance,
    before: Option<u64>,
    reason: &str,
) -> Upgraded {
    instance::kill_and_reap(&fresh.child).await;
    drop(fresh);
    if let (Some(snapshots), Some(seq)) = (&replica.snapshots, before) {
        discard_after(snapshots, seq).await;
    }
    restore_old(replica, current, new, &old, old_route, reason);
    Upgraded {
        instance: old,
        ready_since: None,
        adopted: None,
    }
}

/// Drops the snapshots newer than `seq`, under the snapshot turn.
async fn discard_after(snapshots: &instance::Snapshots, seq: u64) {
    let _turn = snapshots.turn().await;
    let store = snapshots.store.clone();
    match tokio::task::spawn_blocking(move || store.discard_after(seq)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(
            dir = %snapshots.store.dir().display(),
            "cannot drop the snapshots of a rolled-back upgrade: {e}"
        ),
        Err(e) => tracing::warn!("the snapshot cleaner failed: {e}"),
    }
}
