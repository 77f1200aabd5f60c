//! `plugvisor run`: discover plugins, supervise them, serve the control
//! socket, reload on SIGHUP, and stop everything cleanly when the shutdown
//! future resolves.

use crate::control::{self, Access};
use crate::notify::Notifier;
use crate::reload::{LoadConfig, Reloader};
use crate::upgrade_self::{Launch, Upgrader};
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
    run_with(config, load_config, shutdown, Launch::default()).await
}

/// [`run`], launched as `launch` says; carries on from a previous image's
/// state when this one was started by `upgrade-self`.
pub async fn run_with(
    config: Config,
    load_config: LoadConfig,
    shutdown: impl Future<Output = ()>,
    mut launch: Launch,
) -> anyhow::Result<()> {
    let notifier = Notifier::from_env().context("NOTIFY_SOCKET is set but unusable")?;
    let resumed = crate::upgrade_self::resume_env()
        .context("cannot carry on from the previous daemon image's hand-over")?;
    if config.strict && resumed.is_none() {
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
    let (resumed, inherited, inherited_metrics, inherited_health, inherited_guard) = match resumed {
        Some(r) => (
            Some((r.state, r.app)),
            Some(r.listener),
            r.metrics,
            r.health,
            r.guard,
        ),
        None => (None, None, None, None, None),
    };
    let listener = match inherited {
        // Inherited, never closed: clients waited in its backlog.
        Some(listener) => listener,
        None => {
            let listener = control::bind(&config.control_socket()).await?;
            control::give_socket_to_group(&config.control_socket(), &config.control_gids)?;
            listener
        }
    };

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
    let (supervisor, state) = match resumed {
        Some((handed, app)) => {
            let processes = launch.processes.take().ok_or_else(|| {
                anyhow::anyhow!("a hand-over needs the process thread on the main thread")
            })?;
            let (supervisor, errors) = Supervisor::resume(options, processes, handed)
                .await
                .context("cannot start the supervisor from the hand-over state")?;
            for error in errors {
                tracing::error!("{error}");
            }
            (supervisor, Some(app))
        }
        None => {
            let supervisor = Supervisor::launch_with(options, launch.processes.take())
                .await
                .context("cannot start the supervisor")?;
            (supervisor, None)
        }
    };
    // Bounds survivors (max_unsupervised, max_output) if this daemon dies.
    // The previous image's guard, if handed over, goes on watching this one.
    let started_guard = match inherited_guard {
        Some(pipe) => Ok(crate::survivors::Guard::from_pipe(pipe)),
        None => crate::survivors::Guard::start(&survivors_dir),
    };
    let guard = match started_guard {
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
    let started = match &state {
        Some(app) => {
            reloader.resume(app.fingerprints.clone()).await;
            let started = supervisor.names().len();
            tracing::info!(
                generation = app.generation,
                plugins = started,
                "took over from the previous daemon image; every plugin kept running"
            );
            started
        }
        None => {
            let (started, errors) = reloader.start().await?;
            for error in &errors {
                tracing::error!("plugin not loaded: {error}");
            }
            supervisor.release_survivors().await;
            started
        }
    };
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
            let listener = match inherited_metrics {
                // Handed over, never closed: scrapers waited in its backlog.
                Some(listener) if same_address(&listener, address) => {
                    listener.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(listener)?
                }
                _ => tokio::net::TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot serve metrics on {address}"))?,
            };
            tracing::info!("metrics on http://{address}/metrics");
            Some(listener)
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
    let mut health_copy = None;
    let health = match config.health.address {
        Some(address) => {
            let listener = match inherited_health {
                // Handed over, never closed: probes waited in its backlog.
                Some(listener) if same_address(&listener, address) => {
                    listener.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(listener)?
                }
                _ => tokio::net::TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot serve gRPC health on {address}"))?,
            };
            health_copy = Some(
                std::os::fd::AsFd::as_fd(&listener)
                    .try_clone_to_owned()
                    .map(std::net::TcpListener::from)
                    .context("cannot keep the gRPC health listener for a hand-over")?,
            );
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
    let upgrader = Upgrader::new(
        supervisor.clone(),
        reloader.clone(),
        listener,
        access_now,
        cancel.clone(),
        &launch,
        state.as_ref(),
        metrics,
    );
    if let Some(listener) = health_copy {
        upgrader.keep_health_listener(listener);
    }
    if let Some(guard) = &guard {
        upgrader.keep_guard_pipe(guard.raw_fd());
    }
    upgrader.start_server();
    if let Some(app) = &state {
        let info = upgrader.info();
        tracing::info!(
            generation = app.generation,
            "serving after a hand-over of {}ms ({}ms without accepting control connections)",
            info.last_handover_ms,
            info.last_pause_ms
        );
    }
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
    let upgrade_loop = async {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
            tracing::warn!("cannot listen for SIGUSR2; upgrade with `plugvisor upgrade-self`");
            return std::future::pending().await;
        };
        while usr2.recv().await.is_some() {
            tracing::info!("SIGUSR2 received: upgrading the daemon in place");
            if let Err(e) = upgrader.request(None).await {
                tracing::error!("{}", e.message());
            }
        }
    };
    tokio::select! {
        _ = shutdown => {}
        _ = status_loop => {}
        _ = reload_loop => {}
        _ = upgrade_loop => {}
    }
    upgrader.finish().await;
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
    // The control server and the metrics endpoint.
    upgrader.stop_server().await;
    if let Some(health) = health {
        match health.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("gRPC health: {e}"),
            Err(e) => tracing::warn!("gRPC health task: {e}"),
        }
    }
    let _ = std::fs::remove_file(config.control_socket());
    tracing::info!("stopped");
    Ok(())
}

/// Whether a handed-over listener listens where the config says (any port
/// when the config asks for port 0).
fn same_address(listener: &std::net::TcpListener, address: std::net::SocketAddr) -> bool {
    listener.local_addr().is_ok_and(|bound| {
        bound.ip() == address.ip() && (address.port() == 0 || bound.port() == address.port())
    })
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
