//! `plugvisor run`: discover plugins, supervise them, serve the control
//! socket, and stop everything cleanly when the shutdown future resolves.

use crate::config::Config;
use crate::control::{self, Access};
use crate::manifest;
use crate::notify::Notifier;
use crate::supervisor::{Supervisor, SupervisorOptions};
use anyhow::Context;
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs the daemon until `shutdown` resolves, then stops every plugin.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let notifier = Notifier::from_env().context("NOTIFY_SOCKET is set but unusable")?;
    let discovery = manifest::discover(&config.plugins_dir)?;
    for error in &discovery.errors {
        tracing::error!("plugin not loaded: {error}");
    }
    if config.strict && !discovery.errors.is_empty() {
        anyhow::bail!(
            "{} plugin(s) failed to load and `strict` is set",
            discovery.errors.len()
        );
    }
    std::fs::create_dir_all(&config.runtime_dir).with_context(|| {
        format!(
            "cannot create the runtime directory {}",
            config.runtime_dir.display()
        )
    })?;
    let listener = control::bind(&config.control_socket()).await?;

    let mut options = SupervisorOptions::new(&config.runtime_dir);
    options.subreaper = true;
    options.state_dir = Some(config.state_dir.clone());
    let supervisor = Supervisor::new(options).context("cannot start the supervisor")?;
    let mut started = 0;
    for manifest in discovery.manifests {
        let overrides = config
            .plugins
            .get(&manifest.name)
            .cloned()
            .unwrap_or_default();
        if overrides.enabled == Some(false) {
            tracing::info!(plugin = %manifest.name, "disabled in the supervisor config; not started");
            continue;
        }
        supervisor.add(manifest, &overrides)?;
        started += 1;
    }
    for name in config.plugins.keys() {
        if supervisor.info(name).is_err() && config.plugins[name].enabled != Some(false) {
            tracing::warn!(plugin = %name, "the supervisor config has settings for `{name}`, but no such plugin was found in {}", config.plugins_dir.display());
        }
    }
    tracing::info!(
        plugins = started,
        control = %config.control_socket().display(),
        plugins_dir = %config.plugins_dir.display(),
        "plugvisor is running"
    );

    let cancel = CancellationToken::new();
    let server = tokio::spawn(control::serve(
        supervisor.clone(),
        listener,
        Access {
            uids: config.control_uids.clone(),
            gids: config.control_gids.clone(),
        },
        cancel.clone(),
    ));
    let _ = notifier.notify(&format!("READY=1\nSTATUS=supervising {started} plugin(s)"));
    let watchdog = Notifier::watchdog_interval();
    let status_loop = async {
        let mut tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(5)));
        loop {
            tick.tick().await;
            if watchdog.is_some() {
                let _ = notifier.notify("WATCHDOG=1");
            }
            let plugins = supervisor.list();
            let up = plugins.iter().filter(|p| p.state.is_up()).count();
            let _ = notifier.notify(&format!("STATUS={up}/{} plugin(s) up", plugins.len()));
        }
    };
    tokio::select! {
        _ = shutdown => {}
        _ = status_loop => {}
    }
    tracing::info!("shutting down: stopping plugins");
    let _ = notifier.notify("STOPPING=1\nSTATUS=stopping plugins");
    supervisor.shutdown().await;
    cancel.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("control socket: {e}"),
        Err(e) => tracing::warn!("control socket task: {e}"),
    }
    let _ = std::fs::remove_file(config.control_socket());
    tracing::info!("stopped");
    Ok(())
}
