//! `plugvisor top`: a live, full-screen view of the daemon's plugins over
//! the control socket, refreshed every interval: state, pid, uptime,
//! restarts, CPU and memory from each plugin's cgroup, and calls/s,
//! errors/s, p50/p99 latency, in flight and queued from the same Prometheus
//! series `/metrics` serves. Without a terminal (or with `--once`) it prints
//! one plain snapshot instead.
//!
//! - [`prom`]: reads the metrics text; rates and quantiles over an interval.
//! - [`model`]: rows from two readings; sorting, filtering, formatting.
//! - [`app`]: the screen's state and what each key does.
//! - [`view`]: draws it with ratatui.

mod app;
mod model;
mod prom;
mod view;

use anyhow::Context;
use app::{Action, App, Effect};
use model::{Column, Reading};
use plugvisor_proto as pb;
use ratatui::crossterm::event::{self, Event, KeyEventKind};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

type Client = crate::control::Client;

/// How many events and log lines the detail pane asks for.
const DETAIL_LINES: u32 = 50;

/// What `plugvisor top` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub interval: Duration,
    pub once: bool,
    /// A column title (`--sort cpu`).
    pub sort: String,
    /// Only plugins whose name contains this, or whose state is it.
    pub filter: String,
}

/// Runs `plugvisor top`; returns the exit code.
pub async fn command(control: &Path, options: &Options) -> anyhow::Result<i32> {
    let Some(sort) = Column::parse(&options.sort) else {
        let names: Vec<_> = Column::ALL.iter().map(|c| c.title()).collect();
        eprintln!(
            "plugvisor: --sort `{}` is not a column; use one of {}",
            options.sort,
            names.join(", ")
        );
        return Ok(2);
    };
    if options.interval < Duration::from_millis(100) {
        eprintln!("plugvisor: --interval must be at least 100ms");
        return Ok(2);
    }
    let mut client = crate::control::connect(control).await?;
    if options.once || !std::io::stdout().is_terminal() {
        return snapshot(&mut client, options, sort).await;
    }
    interactive(client, control, options, sort).await
}

async fn read(client: &mut Client) -> Result<Reading, tonic::Status> {
    let plugins = client
        .list(pb::ListRequest {
            usage: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .plugins;
    let text = client
        .metrics(pb::MetricsRequest {})
        .await?
        .into_inner()
        .text;
    Ok(Reading {
        at: Instant::now(),
        plugins,
        calls: prom::parse(&text),
    })
}

/// Two readings one interval apart (rates need two), printed as a table.
async fn snapshot(client: &mut Client, options: &Options, sort: Column) -> anyhow::Result<i32> {
    let before = read(client).await?;
    tokio::time::sleep(options.interval).await;
    let now = read(client).await?;
    let mut rows: Vec<_> = model::rows(Some(&before), &now)
        .into_iter()
        .filter(|r| model::matches(r, &options.filter))
        .collect();
    model::sort(&mut rows, sort, sort.descending_by_default());
    let mut lines: Vec<Vec<String>> = vec![Column::ALL.iter().map(|c| c.title().into()).collect()];
    for row in &rows {
        lines.push(model::cells(row));
        if row.replicas.len() > 1 {
            lines.extend(row.replicas.iter().map(model::replica_cells));
        }
    }
    let widths: Vec<usize> = (0..Column::ALL.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for line in &lines {
        let padded: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    }
    Ok(0)
}

/// Puts the terminal back however `interactive` ends (error, panic, quit).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Reads terminal events on a thread of its own (crossterm's reads block)
/// and hands them over; stops within one poll once `stop` is set.
fn spawn_input(
    stop: Arc<AtomicBool>,
    tx: tokio::sync::mpsc::Sender<Event>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Acquire) {
            match event::poll(Duration::from_millis(100)) {
                Ok(true) => match event::read() {
                    Ok(e) => {
                        if tx.blocking_send(e).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                },
                Ok(false) => {}
                Err(_) => return,
            }
        }
    })
}

async fn interactive(
    mut client: Client,
    control: &Path,
    options: &Options,
    sort: Column,
) -> anyhow::Result<i32> {
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let _restore = Restore;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut input) = tokio::sync::mpsc::channel(64);
    let reader = spawn_input(stop.clone(), tx);
    let result = screen(
        &mut terminal,
        &mut client,
        control,
        options,
        sort,
        &mut input,
    )
    .await;
    stop.store(true, Ordering::Release);
    drop(input);
    // The reader polls every 100 ms, so this returns promptly.
    let _ = reader.join();
    result
}

async fn screen(
    terminal: &mut ratatui::DefaultTerminal,
    client: &mut Client,
    control: &Path,
    options: &Options,
    sort: Column,
    input: &mut tokio::sync::mpsc::Receiver<Event>,
) -> anyhow::Result<i32> {
    let mut app = App::new(sort, options.filter.clone());
    let mut last: Option<Reading> = None;
    let mut error: Option<String> = None;
    // At most one action at a time; the screen keeps refreshing meanwhile.
    let mut pending: Option<tokio::task::JoinHandle<String>> = None;
    let mut tick = tokio::time::interval(options.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let label = control.display().to_string();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match read(client).await {
                    Ok(now) => {
                        app.update(model::rows(last.as_ref(), &now), Instant::now());
                        last = Some(now);
                        error = None;
                    }
                    Err(e) => error = Some(format!("cannot read the daemon: {}", e.message())),
                }
            }
            Some(e) = input.recv() => {
                let Event::Key(key) = e else {
                    // A resize: draw again below.
                    terminal.draw(|f| view::draw(f, &app, &label, error.as_deref()))?;
                    continue;
                };
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                match app.on_key(key) {
                    Effect::Quit => {
                        if let Some(task) = pending.take() {
                            task.abort();
                        }
                        return Ok(0);
                    }
                    Effect::Run(action) if pending.is_some() => {
                        app.message = Some(format!("busy; not starting {}", action.describe()));
                    }
                    Effect::Run(action) => {
                        app.message = Some(format!("{}…", action.describe()));
                        pending = Some(tokio::spawn(run(client.clone(), action)));
                    }
                    Effect::None => {}
                }
            }
            done = async { pending.as_mut().expect("guarded by the branch condition").await }, if pending.is_some() => {
                pending = None;
                app.message = Some(done.unwrap_or_else(|e| format!("the action failed: {e}")));
                tick.reset_immediately();
            }
        }
        if app.detail
            && let Some(name) = app.selected.clone()
        {
            detail(client, &name, &mut app).await;
        }
        terminal.draw(|f| view::draw(f, &app, &label, error.as_deref()))?;
    }
}

/// Reads the selected plugin's latest events and log lines.
async fn detail(client: &mut Client, name: &str, app: &mut App) {
    if let Ok(r) = client
        .inspect(pb::InspectRequest { name: name.into() })
        .await
    {
        app.events = r.into_inner().history;
    }
    let logs = client
        .logs(pb::LogsRequest {
            plugin: name.into(),
            tail: DETAIL_LINES,
            follow: false,
        })
        .await;
    if let Ok(stream) = logs {
        let mut stream = stream.into_inner();
        let mut lines = Vec::new();
        while let Ok(Some(line)) = stream.message().await {
            lines.push(line);
        }
        app.logs = lines;
    }
}

/// Asks the daemon to do `action`; answers the outcome to show.
async fn run(mut client: Client, action: Action) -> String {
    let (name, reply) = match &action {
        Action::Restart(n) => (n, client.restart(request(n)).await),
        Action::Stop(n) => (n, client.stop(request(n)).await),
        Action::Start(n) => (n, client.start(request(n)).await),
    };
    match reply {
        Ok(r) => {
            let state = r.into_inner().status.unwrap_or_default().state;
            format!("{}: done (now {state})", action.describe())
        }
        Err(e) => format!("{name}: {:?}: {}", e.code(), e.message()),
    }
}

fn request(name: &str) -> pb::PluginRequest {
    pb::PluginRequest {
        name: name.to_string(),
        upgrade: false,
    }
}
