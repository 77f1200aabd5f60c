//! The daemon's side of calls by capability: `ps --capability` lists the
//! providers in the order a call tries them.

use crate::control::status_of;
use plugvisor::Supervisor;
use plugvisor_proto as pb;
use std::time::Duration;

/// How long a stream by capability waits for a ready provider before its
/// first chunk goes anywhere.
pub const STREAM_WAIT: Duration = Duration::from_secs(30);

/// The providers of `capability` supervised here, best first.
pub fn providers(supervisor: &Supervisor, capability: &str, usage: bool) -> Vec<pb::PluginStatus> {
    let wanted: Vec<String> = supervisor
        .providers(capability)
        .into_iter()
        .map(|(p, _)| p.plugin)
        .collect();
    let mut all = supervisor.list_with(usage);
    all.retain(|info| wanted.contains(&info.name));
    all.sort_by_key(|info| wanted.iter().position(|w| *w == info.name));
    all.iter().map(status_of).collect()
}
