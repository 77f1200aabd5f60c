//! Section 11: `upgrade-self` under load. A daemon with one echo plugin is
//! replaced by a new image of itself several times while callers call
//! `echo` without pause, half on a new connection per call, half on one
//! long-lived connection each. Measured: the hand-over time (the
//! `UpgradeSelf` request sent -> the new image answering), the longest
//! call during the run (the pause a caller sees), and failed calls (any
//! error counts: the control client itself sends again a call the daemon
//! never processed).

use super::daemon::Daemon;
use super::stats::Stats;
use super::{Result, Setup, payload};
use plugvisor_cli::control_client::ControlConnection;
use plugvisor_proto as pb;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Callers of each kind.
const CALLERS: usize = 2;

pub struct Handover {
    /// Request sent -> the new image answers `DaemonInfo`, per upgrade.
    pub total: Stats,
    /// The daemon's own figures, per upgrade: request -> serving, and how
    /// long the control socket was not accepted on.
    pub daemon_total: Stats,
    pub daemon_paused: Stats,
    /// The longest call during the run.
    pub longest_call: Duration,
    pub calls: u64,
    pub failed: u64,
    /// Calls the client sent again (never processed by the old image).
    pub resent: u64,
    pub upgrades: usize,
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    resent: AtomicU64,
    longest_us: AtomicU64,
}

async fn call(client: &mut plugvisor_cli::control::Client) -> Result<()> {
    let reply = client
        .call(pb::CallRequest {
            plugin: "echo".into(),
            method: "echo".into(),
            payload: payload(),
            ..Default::default()
        })
        .await?
        .into_inner();
    if reply.payload != payload() {
        return Err("the echo came back different".into());
    }
    Ok(())
}

async fn caller(socket: PathBuf, per_call: bool, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut held: Option<(ControlConnection, plugvisor_cli::control::Client)> = None;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result = async {
            if held.is_none() {
                let connection = ControlConnection::connect(&socket).await?;
                held = Some((
                    connection.clone(),
                    plugvisor_cli::control::client(connection),
                ));
            }
            let (_, client) = held.as_mut().ok_or("no client")?;
            call(client).await
        }
        .await;
        tally
            .longest_us
            .fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok(()) => tally.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                eprintln!("  a call failed during the hand-over run: {e}");
                tally.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        if per_call && let Some((connection, _)) = held.take() {
            tally
                .resent
                .fetch_add(connection.resent(), Ordering::Relaxed);
        }
    }
    if let Some((connection, _)) = held {
        tally
            .resent
            .fetch_add(connection.resent(), Ordering::Relaxed);
    }
}

/// Waits until the daemon answers as `generation`.
async fn serving(socket: &Path, generation: u64) -> Result<pb::DaemonInfoResponse> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut client) = plugvisor_cli::control::connect(socket).await
            && let Ok(info) = client.daemon_info(pb::DaemonInfoRequest {}).await
        {
            let info = info.into_inner();
            if info.generation >= generation {
                return Ok(info);
            }
            if !info.last_upgrade_error.is_empty() {
                return Err(format!("upgrade-self failed: {}", info.last_upgrade_error).into());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no daemon of generation {generation} within 30 s").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub async fn run(root: &Path, bins: &Setup, upgrades: usize) -> Result<Handover> {
    let dir = root.join("h");
    std::fs::create_dir_all(&dir)?;
    let mut daemon = Daemon::start(bins, &dir, &["echo"])?;
    let mut client = daemon.connect().await?;
    // The first call waits for the plugin to become ready.
    client
        .call(pb::CallRequest {
            plugin: "echo".into(),
            method: "echo".into(),
            payload: payload(),
            timeout_ms: 30_000,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("{s}; daemon log:\n    {}", daemon.log_tail()))?;
    let socket = daemon.socket().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut callers = Vec::new();
    for per_call in [true, false] {
        for _ in 0..CALLERS {
            callers.push(tokio::spawn(caller(
                socket.clone(),
                per_call,
                stop.clone(),
                tally.clone(),
            )));
        }
    }
    let result = async {
        let (mut total, mut daemon_total, mut daemon_paused) = (Vec::new(), Vec::new(), Vec::new());
        for generation in 1..=upgrades as u64 {
            // Some load before each switch.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let started = Instant::now();
            let mut client = plugvisor_cli::control::connect(&socket).await?;
            client
                .upgrade_self(pb::UpgradeSelfRequest {
                    binary: String::new(),
                })
                .await
                .map_err(|s| format!("upgrade-self: {}", s.message()))?;
            let info = serving(&socket, generation).await?;
            total.push(started.elapsed());
            daemon_total.push(Duration::from_millis(info.last_handover_ms));
            daemon_paused.push(Duration::from_millis(info.last_pause_ms));
            daemon.check_alive()?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, super::BoxError>((total, daemon_total, daemon_paused))
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        let _ = c.await;
    }
    let (total, daemon_total, daemon_paused) = result?;
    Ok(Handover {
        total: Stats::of(total)?,
        daemon_total: Stats::of(daemon_total)?,
        daemon_paused: Stats::of(daemon_paused)?,
        longest_call: Duration::from_micros(tally.longest_us.load(Ordering::Relaxed)),
        calls: tally.ok.load(Ordering::Relaxed),
        failed: tally.failed.load(Ordering::Relaxed),
        resent: tally.resent.load(Ordering::Relaxed),
        upgrades,
    })
}
