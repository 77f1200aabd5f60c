//! `plugvisor run`: discover plugins, supervise them, serve the control
//! socket, reload on SIGHUP, and stop everything cleanly when the shutdown
//! future resolves.

use crate::control::{self, Access};
use crate::notify::Notifier;
use crate::reload::{LoadConfig, Reloader};
use anyhow::Context;
use plugvisor::config::Config;
use plugvisor::manifest;
use plugvisor::supervisor::{Supervisor, SupervisorOptions};
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Runs the daemon until `shutdown` resolves, then stops every plugin.
/// `config` is what was read at start; `load_config` reads it afresh for
/// reloads (SIGHUP, `plugvisor reload`).
pub async fn run(
    config: Config,
    load_config: LoadConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let notifier = Notifier::from_env().context("NOTIFY_SOCKET is set but unusable")?;
    if config.strict {
        let discovery = manifest::discover(&config.plugins_dir)?;
        for error in &discovery.errors {
            tracing::error!("plugin not loaded: {error}");
        }
        if !discovery.errors.is_empty() {
            anyhow::bail!(
                "{} plugin(s) failed to load and `strict` is set",
                discovery.errors.len()
            );
        }
    }
    // The control socket and every plugin socket live here: it must be
    // ours alone (not a symlink, not writable by others).
    plugvisor::rundir::secure_dir(&config.runtime_dir, 0o711)?;
    let listener = control::bind(&config.control_socket()).await?;
    control::give_socket_to_group(&config.control_socket(), &config.control_gids)?;

    let mut options = SupervisorOptions::new(&config.runtime_dir);
    options.subreaper = true;
    options.state_dir = Some(config.state_dir.clone());
    options.isolation = isolation_options(&config);
    options.prefer_local = config.routing.prefer_local;
    options.isolation.signatures = config
        .signature_policy()
        .map_err(anyhow::Error::msg)
        .context("trusted_keys")?;
    options.survive_supervisor = config.survive_supervisor;
    let survivors_dir = options.survivors_dir();
    let supervisor = Supervisor::launch(options)
        .await
        .context("cannot start the supervisor")?;
    // Bounds survivors (max_unsupervised, max_output) if this daemon dies.
    let guard = match crate::survivors::Guard::start(&survivors_dir) {
        Ok(guard) => Some(guard),
        Err(e) => {
            tracing::warn!(
                "no survivor guard: {e:#}; survivors of a crash are bounded only when a supervisor starts again"
            );
            None
        }
    };
    let (access, access_now) = tokio::sync::watch::channel(Access {
        uids: config.control_uids.clone(),
        gids: config.control_gids.clone(),
        ..Access::default()
    });
    let reloader = Arc::new(Reloader::new(
        supervisor.clone(),
        load_config,
        config.clone(),
        access,
    ));
    let (started, errors) = reloader.start().await?;
    for error in &errors {
        tracing::error!("plugin not loaded: {error}");
    }
    supervisor.release_survivors().await;
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
    let metrics = match config.metrics_address {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot serve metrics on {address}"))?;
            tracing::info!("metrics on http://{address}/metrics");
            Some(tokio::spawn(crate::metrics_http::serve(
                listener,
                supervisor.clone(),
                crate::metrics_http::Limits::default(),
                cancel.clone(),
            )))
        }
        None => None,
    };
    // Its own token: registered plugins leave before the others stop.
    let registry_cancel = CancellationToken::new();
    let registry = match &config.registry {
        Some(registry) => Some(tokio::spawn(
            crate::registry::start(
                registry.clone(),
                supervisor.clone(),
                registry_cancel.clone(),
            )
            .await?,
        )),
        None => None,
    };
    let health = match config.health.address {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot serve gRPC health on {address}"))?;
            tracing::info!("gRPC health (grpc.health.v1) on {address}");
            Some(tokio::spawn(crate::health_tcp::serve(
                listener,
                crate::health_tcp::Checker::new(
                    supervisor.clone(),
                    config.control_socket(),
                    config.health.required.clone(),
                ),
                cancel.clone(),
            )))
        }
        None => None,
    };
    let server = tokio::spawn(control::serve(
        supervisor.clone(),
        listener,
        access_now,
        Some(reloader.clone()),
        cancel.clone(),
        control::SHUTDOWN_GRACE,
    ));
    let _ = notifier
        .announce(&format!("READY=1\nSTATUS=supervising {started} plugin(s)"))
        .await;
    let watchdog = Notifier::watchdog_interval();
    let status_loop = notifier.keep_alive(watchdog, || {
        // States only: no cgroup reads on every watchdog tick.
        let plugins = supervisor.list_with(false);
        let up = plugins.iter().filter(|p| p.state.is_up()).count();
        format!("{up}/{} plugin(s) up", plugins.len())
    });
    let reload_loop = async {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload with `plugvisor reload`");
            return std::future::pending().await;
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading");
            let _ = notifier.announce("RELOADING=1\nSTATUS=reloading").await;
            if let Err(e) = reloader.reload().await {
                tracing::error!("reload changed nothing: {e:#}");
            }
            let _ = notifier.announce("READY=1").await;
        }
    };
    tokio::select! {
        _ = shutdown => {}
        _ = status_loop => {}
        _ = reload_loop => {}
    }
    tracing::info!("shutting down: stopping plugins");
    let _ = notifier
        .announce("STOPPING=1\nSTATUS=stopping plugins")
        .await;
    registry_cancel.cancel();
    if let Some(registry) = registry {
        let _ = registry.await;
    }
    // Stopping can outlast WatchdogSec (each plugin may take timeouts.stop).
    tokio::select! {
        _ = supervisor.shutdown() => {}
        _ = notifier.feed_watchdog(watchdog) => {}
    }
    if let Some(guard) = guard {
        guard.stop();
    }
    cancel.cancel();
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    if let Some(health) = health {
        match health.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("gRPC health: {e}"),
            Err(e) => tracing::warn!("gRPC health task: {e}"),
        }
    }
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("control socket: {e}"),
        Err(e) => tracing::warn!("control socket task: {e}"),
    }
    let _ = std::fs::remove_file(config.control_socket());
    tracing::info!("stopped");
    Ok(())
}

/// The supervisor's isolation settings from the config: cgroups probed at
/// `cgroup.root` (unless turned off), under this daemon's own parent cgroup.
fn isolation_options(config: &plugvisor::config::Config) -> plugvisor::isolation::IsolationOptions {
    use plugvisor::isolation::{CgroupMode, IsolationOptions};
    IsolationOptions {
        cgroups: if config.cgroup.enabled {
            CgroupMode::Probe {
                root: config.cgroup.root.clone(),
                parent: config.cgroup_parent(),
                require: config.cgroup.require,
            }
        } else {
            CgroupMode::Off
        },
        allow_writable_executables: config.allow_writable_executables,
        dynamic_users: config.isolation.dynamic_users,
        default_user: config.isolation.user.clone(),
        require_pinning: config.isolation.require_pinning,
        // Set by `run` from `trusted_keys`, which it checks.
        signatures: Default::default(),
    }
}
