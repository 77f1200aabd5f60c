//! The daemon's side of remote plugins: starting the registry endpoint
//! (`registry:` in plugvisor.yaml) and showing where each plugin runs.

use anyhow::Context;
use plugvisor::Supervisor;
use plugvisor::registry::{Registry, RegistryConfig};
use plugvisor_proto as pb;
use std::future::Future;
use tokio_util::sync::CancellationToken;

/// Binds the registry (failing the start if its files or address are
/// bad) and returns its serving future, which ends on `cancel`.
pub async fn start(
    config: RegistryConfig,
    supervisor: Supervisor,
    cancel: CancellationToken,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let registry = Registry::bind(config)
        .await
        .map_err(anyhow::Error::msg)
        .context("cannot start the registry")?;
    let address = registry.local_addr()?;
    tracing::info!("registry on {address} (TCP + mutual TLS)");
    Ok(async move {
        registry
            .serve(supervisor, async move { cancel.cancelled().await })
            .await
    })
}

/// Whether `name` is a plugin that announced itself to the registry (a
/// reload of the plugins directory leaves those alone).
pub fn is_registered(supervisor: &Supervisor, name: &str) -> bool {
    supervisor
        .info(name)
        .ok()
        .and_then(|i| i.remote)
        .is_some_and(|r| r.origin == "registry")
}

/// The wire form of where a remote plugin runs.
pub fn remote_status(r: &plugvisor::remote::RemoteInfo) -> pb::RemoteStatus {
    pb::RemoteStatus {
        address: r.address.clone(),
        identity: r.identity.clone(),
        origin: r.origin.to_string(),
        registered_by: r.registered_by.clone().unwrap_or_default(),
        capabilities: r.capabilities.clone(),
        last_heartbeat_secs: r.last_heartbeat.map_or(0, |d| d.as_secs()),
    }
}

/// The `WHERE` column of `ps`: `local`, `tls://host:port`, or
/// `tls://host:port (registry)`.
pub fn location(p: &pb::PluginStatus) -> String {
    match &p.remote {
        None => "local".into(),
        Some(r) if r.origin == "registry" => format!("tls://{} (registry)", r.address),
        Some(r) => format!("tls://{}", r.address),
    }
}

/// `ps --json` / `inspect --json`: where a remote plugin runs.
pub fn remote_json(r: &pb::RemoteStatus) -> serde_json::Value {
    serde_json::json!({
        "address": r.address,
        "identity": r.identity,
        "origin": r.origin,
        "registered_by": (!r.registered_by.is_empty()).then_some(&r.registered_by),
        "capabilities": r.capabilities,
        "last_heartbeat_secs": (r.origin == "registry").then_some(r.last_heartbeat_secs),
    })
}

/// `inspect`'s lines for a remote plugin, in place of `executable:`.
pub fn print_remote(r: &pb::RemoteStatus) {
    println!(
        "remote:     tls://{} (identity `{}`, from the {})",
        r.address, r.identity, r.origin
    );
    if !r.registered_by.is_empty() {
        println!(
            "registered: by {}; last heartbeat {}s ago",
            r.registered_by, r.last_heartbeat_secs
        );
    }
    if !r.capabilities.is_empty() {
        println!("capabilities: {}", r.capabilities.join(", "));
    }
}
