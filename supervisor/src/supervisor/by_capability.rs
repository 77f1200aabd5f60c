//! Calls that name a capability instead of a plugin: the facade's side of
//! [`crate::capability`]. A call goes to the best ready provider (see
//! [`crate::capability::rank`]); a provider that turns out stopped or gone
//! when the call reaches it is skipped for the next one. With no provider
//! ready, the call waits for one until its deadline, and fails at once when
//! every provider is stopped or failed.

use super::Supervisor;
use crate::capability::{Load, Provider};
use crate::error::Error;
use plugvisor_proto::HandleResponse;
use prost::bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;

/// How long a call by capability waits for a provider when neither the
/// caller nor a provider's manifest says.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

impl Supervisor {
    /// Every capability and its providers.
    pub fn capabilities(&self) -> BTreeMap<String, Vec<Provider>> {
        self.host.capabilities.all()
    }

    /// The providers of `capability` that are supervised here, best first,
    /// with what they look like now.
    pub fn providers(&self, capability: &str) -> Vec<(Provider, Load)> {
        self.host
            .capabilities
            .ranked(capability, self.host.opts.prefer_local, |p| self.load(p))
    }

    /// What a provider looks like now; `None` when it is not supervised here.
    fn load(&self, provider: &Provider) -> Option<Load> {
        let common = self.common(&provider.plugin).ok()?;
        let (ready, _) = common.routes.readiness();
        Some(Load {
            ready,
            in_flight: common.in_flight.get().max(0) as usize,
        })
    }

    /// The best ready provider of `capability` (other than those in
    /// `skip`), waiting for one until `deadline`.
    async fn ready_provider(
        &self,
        capability: &str,
        deadline: Instant,
        waited: Duration,
        skip: &[String],
    ) -> Result<String, Error> {
        // Subscribed before looking: a provider's route changes before its
        // event is sent, so no change between the look and the wait is
        // missed.
        let mut events = self.host.events.subscribe();
        loop {
            let ranked: Vec<_> = self
                .providers(capability)
                .into_iter()
                .filter(|(p, _)| !skip.contains(&p.plugin))
                .collect();
            if ranked.is_empty() {
                if skip.is_empty() {
                    return Err(Error::UnknownCapability(capability.to_string()));
                }
                return Err(Error::NoProvider {
                    capability: capability.to_string(),
                    reason: format!("tried {}, none took the call", skip.join(", ")),
                });
            }
            if let Some((best, _)) = ranked.iter().find(|(_, l)| l.ready) {
                return Ok(best.plugin.clone());
            }
            let down: Vec<String> = ranked
                .iter()
                .filter_map(|(p, _)| {
                    let common = self.common(&p.plugin).ok()?;
                    let (_, all_down) = common.routes.readiness();
                    all_down.then(|| {
                        let info = self.info_with(&common, false);
                        format!("{} is {} ({})", p.plugin, info.state, info.reason)
                    })
                })
                .collect();
            if down.len() == ranked.len() {
                return Err(Error::NoProvider {
                    capability: capability.to_string(),
                    reason: down.join("; "),
                });
            }
            match tokio::time::timeout_at(deadline.into(), events.recv()).await {
                Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => continue,
                Ok(Err(RecvError::Closed)) => return Err(Error::ShuttingDown),
                Err(_) => {
                    let names: Vec<_> = ranked.iter().map(|(p, _)| p.plugin.as_str()).collect();
                    return Err(Error::NoProvider {
                        capability: capability.to_string(),
                        reason: format!(
                            "none of {} became ready within {}ms",
                            names.join(", "),
                            waited.as_millis()
                        ),
                    });
                }
            }
        }
    }

    /// The provider a call to `capability` would go to now, waiting up to
    /// `timeout` for one to be ready. For streams: pick, then
    /// [`Self::call_stream`] it.
    pub async fn provider(&self, capability: &str, timeout: Duration) -> Result<String, Error> {
        self.ready_provider(capability, Instant::now() + timeout, timeout, &[])
            .await
    }

    /// Calls `method` on a ready provider of `capability` and says which
    /// one answered. Ready providers go first, local before remote (unless
    /// configured otherwise), then the least loaded, ties in turn. A
    /// provider found stopped or gone when the call reaches it is skipped
    /// for the next. `timeout` (default: the best provider's
    /// `timeouts.call`) bounds the whole call, waiting included.
    pub async fn call_capability(
        &self,
        capability: &str,
        method: &str,
        payload: Bytes,
        metadata: HashMap<String, String>,
        timeout: Option<Duration>,
    ) -> Result<(String, HandleResponse), Error> {
        let timeout = timeout.unwrap_or_else(|| {
            self.providers(capability)
                .first()
                .and_then(|(p, _)| self.common(&p.plugin).ok())
                .map_or(DEFAULT_WAIT, |c| c.board.spec().manifest.timeouts.call.0)
        });
        let deadline = Instant::now() + timeout;
        let mut skipped: Vec<String> = Vec::new();
        loop {
            let provider = self
                .ready_provider(capability, deadline, timeout, &skipped)
                .await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::NoProvider {
                    capability: capability.to_string(),
                    reason: format!("no time left of {}ms", timeout.as_millis()),
                });
            }
            let result = self
                .call(
                    &provider,
                    method,
                    payload.clone(),
                    metadata.clone(),
                    Some(remaining),
                )
                .await;
            match result {
                // Never sent: the provider stopped or went away since it
                // was chosen. The next one gets the call.
                Err(e @ (Error::NotRunning { .. } | Error::UnknownPlugin(_))) => {
                    tracing::debug!(
                        capability,
                        provider,
                        "provider unavailable ({e}); trying the next"
                    );
                    skipped.push(provider);
                }
                other => return other.map(|reply| (provider, reply)),
            }
        }
    }
}
