//! The coordinator's side of autoscaling: it keeps the policy task running
//! while the committed manifest autoscales, and carries out its `Scale`
//! operations. Scaling up adds replicas at the end (seeded from the shared
//! snapshot when `replicas.restore: shared`); scaling down removes the last
//! ones, one at a time: each leaves routing, drains, stops with a last
//! snapshot, and only once its actor has ended are its route and row
//! dropped.

use super::{Coordinator, start_replica};
use crate::actor::Command;
use crate::autoscale::Restore;
use crate::error::Error;
use crate::state::SnapshotStore;
use crate::status::EventDetail;
use std::time::SystemTime;
use tokio::sync::oneshot;

impl Coordinator {
    /// Starts the policy task when the committed manifest autoscales and
    /// none runs; stops it when the manifest no longer autoscales.
    pub(super) fn keep_policy(&mut self) {
        if self.manifest.autoscale.is_none() {
            self.policy = None;
            return;
        }
        if self.policy.is_some() {
            return;
        }
        let token = self.host.cancel.child_token();
        self.host.tasks.spawn(crate::autoscale::run_policy(
            self.host.clone(),
            self.common.clone(),
            self.ops.clone(),
            token.clone(),
        ));
        self.policy = Some(token.drop_guard());
    }

    /// Runs `to` replicas (within `replicas.min`/`max`).
    pub(super) async fn scale(&mut self, to: usize, reason: String) -> Result<(), Error> {
        let name = self.common.name.clone();
        let Some(policy) = self.manifest.autoscale.clone() else {
            return Err(Error::Invalid(format!(
                "`{name}` does not autoscale: its manifest gives a fixed replica count"
            )));
        };
        let to = to.clamp(policy.min as usize, policy.max as usize);
        let from = self.replicas.len();
        if to == from {
            return Ok(());
        }
        let note = format!("autoscaling from {from} to {to} replica(s): {reason}");
        tracing::info!(plugin = %name, "{note}");
        self.common.board.lock().last_scaling = Some((note.clone(), SystemTime::now()));
        let detail = EventDetail {
            scaled_to: Some(to),
            ..EventDetail::default()
        };
        if to > from {
            let spec = self.common.board.spec();
            let seed = self.shared_state(policy.restore).await;
            self.common.board.resize(to);
            self.common.routes.resize(to);
            for index in from..to {
                let seeded = self.seed(index, policy.restore, seed.as_ref()).await;
                let (tx, task) = start_replica(
                    &self.host,
                    &self.common,
                    &spec,
                    index,
                    Some((
                        format!("{note}; replica {index} added{seeded}"),
                        detail.clone(),
                    )),
                );
                self.replicas.push(tx);
                self.replica_tasks.push(task);
            }
            return Ok(());
        }
        for index in (to..from).rev() {
            let (reply, done) = oneshot::channel();
            let order = Command::Retire {
                reason: format!("{note}; replica {index} removed"),
                scaled_to: to,
                reply,
            };
            let sent = match self.replicas.last() {
                Some(replica) => replica.send(order).await.is_ok(),
                None => false,
            };
            if sent {
                done.await.map_err(|_| Error::ShuttingDown)?;
            }
            self.replicas.pop();
            if let Some(task) = self.replica_tasks.pop() {
                // Its route and row go only once nothing writes them.
                let _ = task.await;
            }
            self.common.routes.resize(index);
            self.common.board.resize(index);
        }
        Ok(())
    }

    /// The state a replica added by scaling up starts from: with
    /// `restore: shared`, a fresh snapshot of replica 0 (the shared one)
    /// when it is ready, else its newest snapshot on disk.
    async fn shared_state(&self, restore: Restore) -> Option<(Vec<u8>, u32, String)> {
        let dir = self.host.opts.state_dir.clone()?;
        if restore != Restore::Shared {
            return None;
        }
        if let Some(ready) = self.common.routes.ready(0)
            && let Some(snapshots) = &ready.snapshots
            && let Err(why) = snapshots
                .take(&ready.client, self.manifest.timeouts.call.0)
                .await
        {
            tracing::warn!(plugin = %self.common.name, "a fresh shared snapshot for the added replicas failed ({why}); they start from the newest one on disk");
        }
        let store = SnapshotStore::new(&dir, &self.common.name);
        let loaded = tokio::task::spawn_blocking(move || store.load())
            .await
            .ok()?;
        match loaded {
            Ok(loaded) => loaded.snapshot.map(|s| {
                let note = format!("shared snapshot #{}", s.seq);
                (s.state, s.state_version, note)
            }),
            Err(e) => {
                tracing::warn!(plugin = %self.common.name, "the shared snapshot cannot be read ({e}); added replicas start empty");
                None
            }
        }
    }

    /// Prepares replica `index`'s snapshot store before it starts: its
    /// older snapshots (from an earlier time it ran) are superseded by the
    /// shared state, or dropped when it starts empty. Returns a note for
    /// its event.
    async fn seed(
        &self,
        index: usize,
        restore: Restore,
        seed: Option<&(Vec<u8>, u32, String)>,
    ) -> String {
        let Some(dir) = self.host.opts.state_dir.clone() else {
            return String::new();
        };
        let store = SnapshotStore::new(&dir, &format!("{}@{index}", self.common.name));
        let seed = seed.cloned();
        let done = tokio::task::spawn_blocking(move || match seed {
            Some((state, version, note)) => store
                .write(&state, version)
                .map(|_| format!("; restoring the {note}"))
                .map_err(|e| e.to_string()),
            None => store
                .discard_after(0)
                .map(|_| match restore {
                    Restore::Shared => "; no shared snapshot yet: starting empty".to_string(),
                    Restore::Empty => "; starting empty (replicas.restore: empty)".to_string(),
                })
                .map_err(|e| e.to_string()),
        })
        .await;
        match done {
            Ok(Ok(note)) => note,
            Ok(Err(why)) => {
                tracing::warn!(plugin = %self.common.name, replica = index, "preparing the added replica's state failed: {why}");
                format!("; its state could not be prepared: {why}")
            }
            Err(e) => format!("; its state could not be prepared: {e}"),
        }
    }
}
