//! Pre-start: the next instance of a replica whose ready instance crashed
//! is spawned, handshaken and connected during the backoff (at once, or
//! [`LEAD`] before the end of a longer backoff); Initialize is sent once
//! the backoff has elapsed. The restart then takes the backoff
//! plus Initialize instead of the backoff plus a whole start.
//!
//! The rules (README, "Restart policy"):
//! - only after a crash of an instance that had been ready: a start that
//!   fails (exits at start, fails its handshake or Initialize) is followed
//!   by the whole backoff with nothing running, so a crash loop never execs
//!   without pause;
//! - not for remote plugins (nothing to spawn), plugins with `requires`
//!   (their requirements are checked when the backoff has elapsed), or a
//!   manifest with `restart: {prestart: false}`;
//! - the standby is the actor's alone ([`Pending`]): any order but a start
//!   (stop, restart, upgrade, reload, remove, retire) and the supervisor's
//!   shutdown kill it first; dropped, it kills its child and its cgroup;
//! - a standby that fails to start or dies before its Initialize is an
//!   event, not a restart: the usual start follows when the backoff has
//!   elapsed.

use super::{Actor, Next, Outcome};
use crate::instance::{self, Instance, StartError};
use crate::process::ExitStatus;
use crate::replica::{Replica, Spec};
use crate::status::{EventDetail, ExitReason, PluginState};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An instance started during the backoff: handshaken and connected, not
/// initialized.
pub(crate) struct Standby {
    pub instance: Instance,
    /// The spec it was started under: used only if it is still in force.
    pub spec: Arc<Spec>,
    /// Spawn to handshake.
    handshake: Duration,
}

/// How long before the end of its backoff a standby is started: at once
/// for a backoff up to this long, later for a longer one (so that it is not
/// kept idle, nor refuses a hand-over to a new supervisor image, for the
/// whole of a long backoff). Longer than most plugins take to handshake.
pub(super) const LEAD: Duration = Duration::from_secs(2);

/// When the standby of a backoff ending at `deadline` is started.
pub(super) fn start_at(deadline: Instant) -> Instant {
    let now = Instant::now();
    deadline.checked_sub(LEAD).map_or(now, |at| at.max(now))
}

/// Sleeps until `deadline`, to within tens of microseconds. tokio's timer
/// has a 1 ms tick and rounds a deadline up to the next one (and its wait
/// in the kernel is in whole milliseconds too): alone it ends a backoff
/// 0.5 to 1.5 ms late. It takes the wait to a millisecond before the
/// deadline; the rest is slept on a blocking thread (at most 1 ms of it).
pub(super) async fn sleep_until(deadline: Instant) {
    const TICK: Duration = Duration::from_millis(1);
    if let Some(coarse) = deadline.checked_sub(TICK) {
        tokio::time::sleep_until(coarse.into()).await;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    if !left.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(left)).await;
    }
}

/// Whether a crash of a ready instance of `spec` may pre-start the next.
pub(super) fn allowed(spec: &Spec) -> bool {
    let m = &spec.manifest;
    m.restart.prestart && m.remote.is_none() && m.requires.is_empty()
}

pub(super) type Starting = Pin<Box<dyn Future<Output = Result<Standby, StartError>> + Send>>;

/// The standby of one backoff, owned by the actor's backoff: a start in
/// flight, then a started instance waiting for the deadline.
#[derive(Default)]
pub(super) struct Pending {
    pub starting: Option<Starting>,
    pub ready: Option<Standby>,
}

impl Pending {
    /// Starts instance `id` of `spec` now, to be initialized at `deadline`.
    pub fn start(&mut self, replica: &Replica, spec: &Arc<Spec>, id: String, deadline: Instant) {
        let replica = replica.clone();
        let spec = spec.clone();
        self.starting = Some(Box::pin(async move {
            // A start dropped half-way (an order came) leaves no socket
            // directory behind; its child and cgroup go with their owners.
            let dir = DirGuard(Some(
                replica.host.opts.runtime_dir.join("plugins").join(&id),
            ));
            let left = deadline.saturating_duration_since(Instant::now());
            let during = format!(
                " during the backoff (it crashed after it was ready; Initialize when the backoff has elapsed, in {}ms)",
                left.as_millis()
            );
            let started = replica.spawn_instance(&spec, &id, &during).await;
            dir.disarm();
            let instance = started?;
            Ok(Standby {
                handshake: instance.spawned_at.elapsed(),
                instance,
                spec,
            })
        }));
    }

    /// The backoff has elapsed: what follows, or `None` while the start in
    /// flight is still going.
    pub fn on_elapsed(&mut self) -> Option<Next> {
        if self.starting.is_some() {
            return None;
        }
        Some(match self.ready.take() {
            Some(s) => Next::Standby(Box::new(s)),
            None => Next::Start,
        })
    }

    /// The start in flight ended; what follows if the backoff has elapsed.
    pub fn on_started(
        &mut self,
        replica: &Replica,
        started: Result<Standby, StartError>,
        elapsed: bool,
        deadline: Instant,
    ) -> Option<Next> {
        self.starting = None;
        let left = deadline.saturating_duration_since(Instant::now());
        match started {
            Ok(s) if elapsed => Some(Next::Standby(Box::new(s))),
            Ok(s) => {
                let pid = s.instance.child.pid();
                replica.event(
                    PluginState::Starting,
                    &s.instance.id,
                    format!(
                        "handshake done in {}ms (pid {pid}); Initialize when the backoff has elapsed, in {}ms",
                        s.handshake.as_millis(),
                        left.as_millis()
                    ),
                    EventDetail {
                        pid: Some(pid),
                        ..EventDetail::default()
                    },
                );
                self.ready = Some(s);
                None
            }
            Err(e) => {
                let then = if elapsed {
                    "starting anew now".to_string()
                } else {
                    format!(
                        "starting anew when the backoff has elapsed, in {}ms",
                        left.as_millis()
                    )
                };
                replica.event(
                    PluginState::Backoff,
                    "",
                    format!("the instance started during the backoff failed: {e}; {then}"),
                    EventDetail::of_exit(&ExitReason::Start(e)),
                );
                elapsed.then_some(Next::Start)
            }
        }
    }

    /// The waiting standby exited before its Initialize: gone, with an
    /// event; the usual start follows at the deadline.
    pub async fn on_exited(&mut self, replica: &Replica, status: ExitStatus, deadline: Instant) {
        let Some(s) = self.ready.take() else {
            return;
        };
        let id = s.instance.id.clone();
        discard(replica, s).await;
        let left = deadline.saturating_duration_since(Instant::now());
        replica.event(
            PluginState::Backoff,
            &id,
            format!(
                "the instance started during the backoff ended before its Initialize ({status}); starting anew when the backoff has elapsed, in {}ms",
                left.as_millis()
            ),
            EventDetail::of_exit(&ExitReason::from_status(status)),
        );
    }

    /// Kills whatever was started: the start in flight, the waiting
    /// standby.
    pub async fn discard(&mut self, replica: &Replica) {
        self.starting = None;
        if let Some(s) = self.ready.take() {
            discard(replica, s).await;
        }
    }
}

/// The start in flight (a [`Pending`]'s) finishing; never, without one.
pub(super) async fn started(starting: &mut Option<Starting>) -> Result<Standby, StartError> {
    match starting.as_mut() {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// The waiting standby (a [`Pending`]'s) exiting; never, without one.
pub(super) async fn exited(ready: &Option<Standby>) -> ExitStatus {
    match ready {
        Some(s) => s.instance.child.wait().await,
        None => std::future::pending().await,
    }
}

/// Kills a standby: its process group and child (reaped), what is left of
/// its cgroup; its cgroup and socket directory are removed as it drops.
/// Its post-exit hook runs, as after any instance that was spawned.
pub(super) async fn discard(replica: &Replica, standby: Standby) {
    // Boxed: it holds a hook's run, and the backoff that awaits it is
    // itself deep in the actor's future.
    Box::pin(discard_now(replica, standby)).await
}

async fn discard_now(replica: &Replica, standby: Standby) {
    let Standby { instance, spec, .. } = standby;
    let status = instance::kill_and_reap(&instance.child).await;
    if let Some(lease) = &instance.cgroup
        && let Err(e) = lease.kill_all().await
    {
        tracing::warn!(plugin = %replica.name(), instance = %instance.id, "cannot kill the rest of its cgroup: {e}");
    }
    replica.update(|r| {
        if r.instance == instance.id {
            r.pid = None;
        }
    });
    tracing::info!(plugin = %replica.name(), instance = %instance.id, "the instance started during the backoff is discarded ({status})");
    let id = instance.id.clone();
    drop(instance);
    let exit = ExitReason::from_status(status);
    replica
        .hook_reported(
            &spec.manifest,
            &spec.env,
            "post_exit",
            &id,
            &[
                (
                    "PLUGVISOR_EXIT_REASON",
                    format!("started during the backoff and discarded; the plugin {status}"),
                ),
                ("PLUGVISOR_EXIT_KIND", exit.kind().to_string()),
            ],
        )
        .await;
}

/// Removes a socket directory unless disarmed.
struct DirGuard(Option<PathBuf>);

impl DirGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Actor {
    /// Initializes an instance started during the backoff (the backoff has
    /// elapsed), then serves calls through it like any other.
    pub(super) async fn initialize_standby(
        &mut self,
        standby: Standby,
    ) -> Result<Outcome, ExitReason> {
        let (restored, note) = match self.replica.restored_state().await {
            Ok(v) => v,
            Err(why) => {
                discard(&self.replica, standby).await;
                return Err(ExitReason::Start(StartError::StateUnreadable(why)));
            }
        };
        let Standby {
            mut instance,
            spec,
            handshake,
        } = standby;
        // Its start took the handshake and takes Initialize: the wait for
        // the backoff is no part of it ("ready in", the start metric).
        if let Some(at) = Instant::now().checked_sub(handshake) {
            instance.spawned_at = at;
        }
        let reason = format!(
            "handshake done in {}ms during the backoff; backoff elapsed, calling Initialize{note}",
            handshake.as_millis()
        );
        // Dropping the start (on shutdown) kills its child: see `Child`'s
        // Drop.
        let launched = tokio::select! {
            r = self.replica.initialize_instance(&spec, instance, restored, reason) => r,
            _ = self.replica.host.cancel.cancelled() => return Ok(Outcome::Decided(Next::Exit)),
        };
        let (instance, info) = launched.map_err(ExitReason::Start)?;
        // Boxed: serving is the largest part of the actor's future.
        Box::pin(self.publish_and_serve(instance, info)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_backoff_sleep_never_ends_early_and_not_a_tick_late() {
        let mut late = Vec::new();
        for ms in [0u64, 1, 2, 5, 10, 13] {
            let deadline = Instant::now() + Duration::from_micros(ms * 1000 + 300);
            sleep_until(deadline).await;
            let now = Instant::now();
            assert!(now >= deadline, "ended {:?} early", deadline - now);
            late.push(now - deadline);
        }
        // On a busy machine a wake-up may be late; most are not.
        late.sort();
        assert!(late[late.len() / 2] < Duration::from_millis(1), "{late:?}");
    }
}
