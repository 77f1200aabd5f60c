//! The `plugvisor` command line: the daemon (`run`), offline validation
//! (`check`), and client verbs that talk to a running daemon over its control
//! socket. Exit codes: 0 ok, 1 error, 2 usage.

use crate::control;
use anyhow::{Context, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use plugvisor::config::{Config, LogFormat};
use plugvisor_proto as pb;
use prost::bytes::Bytes;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "plugvisor",
    version,
    about = "A process-isolated plugin supervisor"
)]
pub struct Cli {
    /// Control socket of the daemon (default: <runtime_dir>/control.sock).
    #[arg(long, global = true, env = "PLUGVISOR_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Supervisor config file (plugvisor.yaml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Plugins directory (overrides the config's plugins_dir).
    #[arg(long, value_name = "DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// Runtime directory for sockets (overrides the config's runtime_dir).
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Directory of plugin state snapshots (overrides the config's state_dir).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics here, e.g. 127.0.0.1:9464 (overrides the
    /// config's metrics_address).
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Serve gRPC health (grpc.health.v1) on this TCP address, e.g.
    /// 0.0.0.0:8081 (overrides the config's health.address).
    #[arg(long, value_name = "ADDR")]
    pub health_address: Option<std::net::SocketAddr>,
    /// Refuse to start when any manifest fails to load or any plugin cannot
    /// be added; a reload then changes nothing while a manifest is broken.
    /// (Plugins that crash after starting are restarted, not fatal.)
    #[arg(long)]
    pub strict: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: supervise the plugins and serve the control socket.
    Run(ConfigArgs),
    /// Validate the config and every manifest offline; exit 1 on errors.
    Check {
        #[command(flatten)]
        args: ConfigArgs,
        /// Print {"plugins": [...], "errors": [...], "warnings": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// Show the config a plugin gets (manifest < supervisor config <
    /// runtime); with KEY=VALUE pairs, set runtime overrides (VALUE as JSON,
    /// else as a string; `KEY=null` removes one) and roll them out without
    /// downtime.
    Config {
        name: String,
        #[arg(value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// List plugins.
    Ps {
        #[arg(long)]
        json: bool,
        /// Only the providers of this capability, in the order a call by
        /// capability tries them (ready, local, least loaded first).
        #[arg(long, value_name = "CAPABILITY")]
        capability: Option<String>,
    },
    /// Show one plugin's status and recent events.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Show a plugin's output.
    Logs {
        name: String,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// Number of past lines (0: all kept).
        #[arg(long, default_value_t = 100)]
        tail: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show state transitions.
    Events {
        /// Only this plugin.
        name: Option<String>,
        /// Keep printing new events.
        #[arg(short, long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Start a stopped or failed plugin.
    Start { name: String },
    /// Stop a plugin gracefully.
    Stop { name: String },
    /// Restart a plugin (clears `failed`).
    Restart {
        name: String,
        /// Replace it with what its plugins directory holds now (a new
        /// version or binary), without downtime; rolled back if the new one
        /// fails.
        #[arg(long)]
        upgrade: bool,
    },
    /// Replace the running daemon with a new plugvisor binary while every
    /// plugin keeps running with the same pid (like SIGUSR2). Waits until
    /// the new daemon serves.
    UpgradeSelf {
        /// The new binary (default: the path the daemon was started from).
        #[arg(long, value_name = "FILE")]
        binary: Option<PathBuf>,
        /// How long to wait for the new daemon to serve, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// The pre-flight a daemon runs on a new binary before `upgrade-self`:
    /// checks the config and the hand-over state format, then exits.
    #[command(hide = true)]
    HandoverCheck {
        /// The state format the running daemon writes.
        #[arg(long)]
        format: u32,
        #[command(flatten)]
        args: ConfigArgs,
    },
    /// Re-read the config and plugins dir: start added plugins, stop removed
    /// ones, upgrade changed ones (like SIGHUP).
    Reload {
        #[arg(long)]
        json: bool,
    },
    /// Call a plugin's method and print the reply; with `--capability CAP
    /// METHOD`, call a ready provider of a capability.
    Call {
        /// The plugin (with --capability: the method).
        name: String,
        /// The method (not given with --capability).
        method: Option<String>,
        /// Call a ready provider of this capability instead of a named
        /// plugin; stderr says which one answered.
        #[arg(long, value_name = "CAPABILITY", conflicts_with = "stream")]
        capability: Option<String>,
        /// The payload as a string.
        #[arg(long, conflicts_with = "data_file")]
        data: Option<String>,
        /// Read the payload from a file.
        #[arg(long, value_name = "FILE")]
        data_file: Option<PathBuf>,
        /// `-`: read the payload from standard input.
        #[arg(value_name = "-")]
        stdin: Option<String>,
        /// Deadline, e.g. `5s` (default: the plugin's timeouts.call; none
        /// for a stream).
        #[arg(long, value_parser = plugvisor::units::parse_duration)]
        timeout: Option<Duration>,
        #[arg(long, conflicts_with = "stream")]
        json: bool,
        /// Stream the payload (stdin unless --data/--data-file) to the
        /// plugin's HandleStream and write its reply to stdout as it comes.
        /// Payloads over one message's limit (64 MiB) stream by themselves.
        #[arg(long)]
        stream: bool,
    },
    /// Tenants of plugins: each runs as its own entry PLUGIN@TENANT, the
    /// name `call`, `inspect`, `logs`, `stop` and the rest take.
    Tenant {
        #[command(subcommand)]
        command: crate::tenant_cmd::TenantCommand,
    },
    /// Plugin state: `state export NAME` prints what ExportState returns.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Probe a plugin's HealthCheck now.
    Health {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Check a plugin against the protocol: run it under a private
    /// supervisor and print PASS/FAIL per rule; exit 1 if any rule fails.
    Conformance {
        /// The plugin's plugin.yaml (or its directory), or a bare executable.
        #[arg(value_name = "MANIFEST_OR_EXECUTABLE")]
        target: PathBuf,
        #[arg(long)]
        json: bool,
        /// Extra Initialize config: a JSON object merged over the manifest's.
        #[arg(long, value_name = "JSON")]
        config: Option<String>,
        /// Deadline for the handshake, Initialize and each call.
        #[arg(long, default_value = "10s", value_parser = plugvisor::units::parse_duration)]
        timeout: Duration,
    },
    /// Write a plugin skeleton that passes `plugvisor conformance` as
    /// generated: source, plugin.yaml, build script or launcher, and a test.
    New {
        /// The plugin's name: 1-63 characters of a-z, 0-9, `_` or `-`.
        name: String,
        #[arg(long, value_enum)]
        lang: crate::new::Lang,
        /// Where to write it (default: ./NAME); must be missing or empty.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Write into a non-empty directory, replacing the skeleton's files.
        #[arg(long)]
        force: bool,
        /// Rust: depend on plugvisor-sdk at this path (default: by path
        /// inside a plugvisor checkout, else by version).
        #[arg(long, value_name = "DIR")]
        sdk_path: Option<PathBuf>,
        /// Python: the interpreter the launcher execs, set as
        /// PYTHON in plugin.yaml (default: the active virtualenv's,
        /// else the checkout's .venv, else python3 on PATH).
        #[arg(long, value_name = "PATH")]
        python: Option<PathBuf>,
    },
    /// Print a shell completion script, e.g.
    /// `plugvisor completions bash > /etc/bash_completion.d/plugvisor`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Live view of every plugin (state, CPU, memory, calls/s, errors/s,
    /// latency), refreshed every interval; keys: q quit, / filter, 1-9 sort,
    /// Enter details, r restart, x stop. Without a terminal, or with
    /// `--once`, prints one snapshot.
    Top {
        /// Print one plain snapshot (rates over one interval) and exit.
        #[arg(long)]
        once: bool,
        /// Refresh interval.
        #[arg(long, default_value = "1s", value_parser = plugvisor::units::parse_duration)]
        interval: Duration,
        /// Sort by this column (name, state, cpu, mem, calls, err, p99, ...).
        #[arg(long, default_value = "name")]
        sort: String,
        /// Only plugins whose name contains this, or whose state is this.
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// Make a minisign key pair for signing plugins: `<OUT>.key` (secret,
    /// 0600) and `<OUT>.pub`; prints the `trusted_keys` entry to add.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long, value_name = "PREFIX", default_value = "plugvisor")]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Sign a plugin directory: writes plugin.sums (the SHA-256 of its
    /// manifest, executable and any --file) and plugin.sums.minisig.
    Sign {
        /// The minisign secret key (from `plugvisor keygen` or `minisign -G`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Another file of the plugin to cover (relative to its directory).
        #[arg(long = "file", value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The signature's trusted comment (default: name, version, time).
        #[arg(long)]
        comment: Option<String>,
        /// The plugin directory (holding plugin.yaml).
        dir: PathBuf,
    },
    /// Print the version.
    Version,
    /// Bounds the survivors of a daemon that died (started by `run`; see
    /// `survive_supervisor` in the README).
    #[command(hide = true)]
    SurvivorGuard { dir: std::path::PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Write the plugin's exported state to stdout (or --out FILE).
    Export {
        name: String,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Print {"state_version": N, "state": "<utf-8 or lossy text>"}.
        #[arg(long)]
        json: bool,
    },
}

/// Loads the config file (if any) and applies the command-line overrides.
pub fn load_config(args: &ConfigArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(dir) = &args.plugins_dir {
        config.plugins_dir = dir.clone();
    }
    if let Some(dir) = &args.runtime_dir {
        config.runtime_dir = dir.clone();
    }
    if let Some(dir) = &args.state_dir {
        config.state_dir = dir.clone();
    }
    if let Some(address) = args.metrics_address {
        config.metrics_address = Some(address);
    }
    if let Some(address) = args.health_address {
        config.health.address = Some(address);
    }
    if args.strict {
        config.strict = true;
    }
    Ok(config)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PLUGVISOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Runs the CLI; returns the process exit code.
pub fn main(cli: Cli) -> i32 {
    if matches!(cli.command, Command::Run(_)) {
        return run_daemon(cli);
    }
    run_on_runtime(cli, None)
}

/// `plugvisor run`: the process thread (which forks every plugin, and
/// execs the next image at `upgrade-self`) runs on the main thread, the
/// daemon on a runtime beside it. Every plugin is then a child of the main
/// thread, in this image and in every image after an `upgrade-self`.
fn run_daemon(cli: Cli) -> i32 {
    let (processes, thread) = match plugvisor::process::ProcessManager::detached() {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("plugvisor: cannot start the process thread: {e}");
            return 1;
        }
    };
    let daemon = std::thread::Builder::new()
        .name("plugvisor-daemon".into())
        .spawn(move || run_on_runtime(cli, Some(processes)));
    let daemon = match daemon {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("plugvisor: cannot start the daemon thread: {e}");
            return 1;
        }
    };
    // Returns once the daemon dropped the manager and every child is reaped.
    thread.run();
    daemon.join().unwrap_or(1)
}

fn run_on_runtime(cli: Cli, processes: Option<plugvisor::process::ProcessManager>) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("plugvisor: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(dispatch(cli, processes)) {
        Ok(code) => code,
        // The daemon's answer, as `plugvisor call` shows it: code and message.
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("plugvisor: {:?}: {}", status.code(), status.message()),
                None => eprintln!("plugvisor: {e:#}"),
            }
            1
        }
    }
}

/// The daemon's config flags, as `run` and `handover-check` take them.
fn config_argv(args: &ConfigArgs) -> Vec<std::ffi::OsString> {
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    let mut flag = |name: &str, value: Option<std::ffi::OsString>| {
        if let Some(value) = value {
            argv.push(name.into());
            argv.push(value);
        }
    };
    flag("--config", args.config.clone().map(Into::into));
    flag("--plugins-dir", args.plugins_dir.clone().map(Into::into));
    flag("--runtime-dir", args.runtime_dir.clone().map(Into::into));
    flag("--state-dir", args.state_dir.clone().map(Into::into));
    flag(
        "--metrics-address",
        args.metrics_address.map(|a| a.to_string().into()),
    );
    if args.strict {
        argv.push("--strict".into());
    }
    argv
}

async fn dispatch(
    cli: Cli,
    mut processes: Option<plugvisor::process::ProcessManager>,
) -> anyhow::Result<i32> {
    let control_path = || match &cli.control {
        Some(p) => p.clone(),
        None => control::resolve(None),
    };
    match &cli.command {
        Command::Run(args) => {
            let mut config = load_config(args)?;
            if let Some(control) = &cli.control {
                config.control_socket = Some(control.clone());
            }
            init_logging(config.log_format);
            let flags = config_argv(args);
            let (args, control) = (args.clone(), cli.control.clone());
            let reload = std::sync::Arc::new(move || {
                let mut config = load_config(&args)?;
                if let Some(control) = &control {
                    config.control_socket = Some(control.clone());
                }
                Ok(config)
            });
            let mut global: Vec<std::ffi::OsString> = Vec::new();
            if let Some(control) = &cli.control {
                global.push("--control".into());
                global.push(control.into());
            }
            let mut run_argv = global.clone();
            run_argv.push("run".into());
            run_argv.extend(flags.iter().cloned());
            let mut check_argv = global;
            check_argv.extend([
                "handover-check".into(),
                "--format".into(),
                plugvisor::handover::FORMAT.to_string().into(),
            ]);
            check_argv.extend(flags);
            let launch = crate::upgrade_self::Launch {
                processes: processes.take(),
                run_argv,
                check_argv,
            };
            crate::daemon::run_with(config, reload, shutdown_signal(), launch).await?;
            Ok(0)
        }
        Command::HandoverCheck { format, args } => {
            load_config(args)?;
            plugvisor::handover::check_format(*format).map_err(anyhow::Error::msg)?;
            println!(
                "{} format={} version={}",
                crate::upgrade_self::PREFLIGHT_OK,
                plugvisor::handover::FORMAT,
                env!("CARGO_PKG_VERSION")
            );
            Ok(0)
        }
        Command::UpgradeSelf {
            binary,
            timeout,
            json,
        } => upgrade_self(&control_path(), binary.clone(), *timeout, *json).await,
        Command::Check { args, json } => check(args, *json),
        Command::Config { name, set } => {
            let mut changes = serde_json::Map::new();
            for pair in set {
                let Some((key, value)) = pair.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                    return usage(&format!("`{pair}` is not KEY=VALUE"));
                };
                let value = serde_json::from_str(value)
                    .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
                changes.insert(key.to_string(), value);
            }
            let mut client = control::connect(&control_path()).await?;
            let set_json = if changes.is_empty() {
                String::new()
            } else {
                serde_json::Value::Object(changes).to_string()
            };
            let r = client
                .config(pb::ConfigRequest {
                    name: name.clone(),
                    set_json,
                })
                .await?
                .into_inner();
            let config: serde_json::Value = serde_json::from_str(&r.config_json)?;
            println!("{}", serde_json::to_string_pretty(&config)?);
            Ok(0)
        }
        Command::Tenant { command } => crate::tenant_cmd::run(command, &control_path()).await,
        Command::State {
            command: StateCommand::Export { name, out, json },
        } => {
            let mut client = control::connect(&control_path()).await?;
            let state = client
                .export_state(pb::PluginRequest {
                    name: name.clone(),
                    upgrade: false,
                })
                .await?
                .into_inner();
            if *json {
                let v = serde_json::json!({
                    "state_version": state.state_version,
                    "state": String::from_utf8_lossy(&state.state),
                });
                println!("{v}");
            } else if let Some(path) = out {
                std::fs::write(path, &state.state)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!(
                    "{name}: {} bytes, state version {}",
                    state.state.len(),
                    state.state_version
                );
            } else {
                std::io::stdout().write_all(&state.state)?;
            }
            Ok(0)
        }
        Command::Health { name, json } => {
            let mut client = control::connect(&control_path()).await?;
            let h = client
                .health(pb::PluginRequest {
                    name: name.clone(),
                    upgrade: false,
                })
                .await?
                .into_inner();
            if *json {
                println!(
                    "{}",
                    serde_json::json!({
                        "status": h.status,
                        "message": h.message,
                        "instance": h.instance,
                        "version": h.version,
                        "sha256": (!h.sha256.is_empty()).then_some(&h.sha256),
                        "signer": h.signer.as_ref().map(|g| serde_json::json!({"name": g.name, "key_id": g.key_id})),
                    })
                );
            } else {
                let runs = what_runs_short(&h.version, &h.sha256, h.signer.as_ref());
                println!("{}", health_line(name, &h.status, &h.message, &runs));
            }
            Ok(if h.status == "SERVING" { 0 } else { 1 })
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "plugvisor",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Command::Top {
            once,
            interval,
            sort,
            filter,
        } => {
            let options = crate::top::Options {
                interval: *interval,
                once: *once,
                sort: sort.clone(),
                filter: filter.clone(),
            };
            crate::top::command(&control_path(), &options).await
        }
        Command::Keygen { out, force } => crate::sign::keygen(out, *force),
        Command::Sign {
            key,
            files,
            comment,
            dir,
        } => crate::sign::sign(dir, key, files, comment.as_deref()),
        Command::Version => {
            println!("plugvisor {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        Command::SurvivorGuard { dir } => crate::survivors::run_guard(dir).await,
        Command::Conformance {
            target,
            json,
            config,
            timeout,
        } => crate::conformance::command(target, *json, config.as_deref(), *timeout).await,
        Command::New {
            name,
            lang,
            dir,
            force,
            sdk_path,
            python,
        } => crate::new::command(&crate::new::Options {
            name: name.clone(),
            lang: *lang,
            dir: dir.clone(),
            force: *force,
            sdk_path: sdk_path.clone(),
            python: python.clone(),
        }),
        Command::Ps { json, capability } => {
            let mut client = control::connect(&control_path()).await?;
            // The table shows no usage; `--json` keeps every field.
            let list = client
                .list(pb::ListRequest {
                    usage: *json,
                    capability: capability.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if *json {
                let rows: Vec<_> = list.plugins.iter().map(status_json).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_table(&list.plugins);
            }
            Ok(0)
        }
        Command::Inspect { name, json } => {
            let mut client = control::connect(&control_path()).await?;
            let r = client
                .inspect(pb::InspectRequest { name: name.clone() })
                .await?
                .into_inner();
            let status = r.status.unwrap_or_default();
            if *json {
                let mut v = status_json(&status);
                v["history"] = r.history.iter().map(event_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("name:       {}", status.name);
                if status.reported_version.is_empty() || status.reported_version == status.version {
                    println!("version:    {}", status.version);
                } else {
                    println!(
                        "version:    {} (manifest; the plugin reports {})",
                        status.version, status.reported_version
                    );
                }
                println!("state:      {} ({})", status.state, status.reason);
                println!("pid:        {}", dash(status.pid));
                println!("restarts:   {}", status.restarts);
                println!("last exit:  {}", or_dash(&status.last_exit));
                println!("uptime:     {}s", status.uptime_secs);
                match &status.remote {
                    Some(r) => crate::registry::print_remote(r),
                    None => {
                        println!("executable: {}", status.executable);
                        println!("sha256:     {}", what_runs_line(&status));
                        println!(
                            "signed by:  {}",
                            status.signer.as_ref().map_or("-".to_string(), |g| format!(
                                "{} (key {}; {})",
                                g.name, g.key_id, g.comment
                            ))
                        );
                    }
                }
                if !status.requires.is_empty() {
                    println!("requires:   {}", requires_line(&status.requires));
                }
                println!("methods:    {}", status.methods.join(", "));
                if !status.capabilities.is_empty() {
                    println!("provides:   {}", status.capabilities.join(", "));
                }
                for l in &status.rate_limits {
                    let scope = if l.method == "*" { "calls" } else { &l.method };
                    println!("rate limit: {scope}: {}", l.limit);
                }
                if let Some(scaling) = &status.scaling {
                    println!(
                        "replicas:   {} (autoscaled between {} and {})",
                        scaling.current, scaling.min, scaling.max
                    );
                    println!("scaled:     {}", or_dash(&scaling.last_reason));
                } else if status.replicas.len() > 1 {
                    println!("replicas:   {}", status.replicas.len());
                }
                print_isolation(&status.isolation.unwrap_or_default());
                println!("events:");
                for e in &r.history {
                    println!("  {}", event_line(e));
                }
            }
            Ok(0)
        }
        Command::Logs {
            name,
            follow,
            tail,
            json,
        } => {
            let mut out = std::io::stdout();
            let color = crate::progress::stdout_color();
            let request = pb::LogsRequest {
                plugin: name.clone(),
                tail: *tail,
                follow: *follow,
            };
            let again = pb::LogsRequest {
                tail: 0,
                ..request.clone()
            };
            crate::follow::run(&control_path(), request, again, *follow, |line: &pb::LogLine| {
                if *json {
                    let v = serde_json::json!({"time_ms": line.time_ms, "instance": line.instance, "stream": line.stream, "line": line.line});
                    writeln!(out, "{v}")?;
                } else {
                    writeln!(out, "{}", crate::progress::log_line(line, color))?;
                }
                out.flush()?;
                Ok(())
            })
            .await?;
            Ok(0)
        }
        Command::Events { name, follow, json } => {
            let mut out = std::io::stdout();
            let color = crate::progress::stdout_color();
            let request = pb::EventsRequest {
                plugin: name.clone().unwrap_or_default(),
                follow: *follow,
            };
            let again = request.clone();
            crate::follow::run(&control_path(), request, again, *follow, |e: &pb::Event| {
                if *json {
                    writeln!(out, "{}", event_json(e))?;
                } else {
                    writeln!(out, "{}", crate::progress::event_line(e, color))?;
                }
                out.flush()?;
                Ok(())
            })
            .await?;
            Ok(0)
        }
        Command::Reload { json } => {
            let mut client = control::connect(&control_path()).await?;
            let reload = client.reload(pb::ReloadRequest {});
            let r = if *json {
                reload.await?
            } else {
                crate::progress::with_steps(&control_path(), None, reload).await?
            }
            .into_inner();
            let failed: Vec<_> = r
                .failed
                .iter()
                .map(|f| serde_json::json!({"name": f.name, "reason": f.reason}))
                .collect();
            if *json {
                let v = serde_json::json!({
                    "added": r.added, "removed": r.removed, "upgraded": r.upgraded,
                    "unchanged": r.unchanged, "failed": failed,
                    "settings_applied": r.settings_applied,
                    "settings_need_restart": r.settings_need_restart,
                    "untrusted": r.untrusted.iter()
                        .map(|f| serde_json::json!({"name": f.name, "reason": f.reason}))
                        .collect::<Vec<_>>(),
                });
                println!("{v}");
            } else {
                let list = |v: &[String]| {
                    if v.is_empty() {
                        "-".to_string()
                    } else {
                        v.join(", ")
                    }
                };
                println!("added:     {}", list(&r.added));
                println!("removed:   {}", list(&r.removed));
                println!("upgraded:  {}", list(&r.upgraded));
                println!("unchanged: {}", list(&r.unchanged));
                for f in &r.failed {
                    println!("failed:    {}: {}", f.name, f.reason);
                }
                if !r.settings_applied.is_empty() {
                    println!("settings applied: {}", r.settings_applied.join(", "));
                }
                if !r.settings_need_restart.is_empty() {
                    println!(
                        "settings changed but not applied until the daemon restarts: {}",
                        r.settings_need_restart.join(", ")
                    );
                }
                for f in &r.untrusted {
                    println!(
                        "untrusted: {}: runs on, its next start is refused: {}",
                        f.name, f.reason
                    );
                }
            }
            // Plugins left as they were, or running what the new policy
            // refuses, need the operator.
            Ok(if r.failed.is_empty() && r.untrusted.is_empty() {
                0
            } else {
                1
            })
        }
        Command::Start { name } | Command::Stop { name } | Command::Restart { name, .. } => {
            let mut client = control::connect(&control_path()).await?;
            let upgrade = matches!(&cli.command, Command::Restart { upgrade: true, .. });
            let request = pb::PluginRequest {
                name: name.clone(),
                upgrade,
            };
            // Each transition is printed as it happens, the result at the end.
            type Reply = Result<tonic::Response<pb::CommandResponse>, tonic::Status>;
            let (verb, command): (_, std::pin::Pin<Box<dyn Future<Output = Reply> + Send>>) =
                match &cli.command {
                    Command::Start { .. } => ("started", Box::pin(client.start(request))),
                    Command::Stop { .. } => ("stopped", Box::pin(client.stop(request))),
                    _ if upgrade => ("upgraded", Box::pin(client.restart(request))),
                    _ => ("restarted", Box::pin(client.restart(request))),
                };
            let response =
                crate::progress::with_steps(&control_path(), Some(name), command).await?;
            let status = response.into_inner().status.unwrap_or_default();
            println!("{name}: {verb} (now {})", status.state);
            Ok(0)
        }
        Command::Call {
            name,
            method,
            capability,
            data,
            data_file,
            stdin,
            timeout,
            json,
            stream,
        } => {
            use crate::stream::Payload;
            // `call NAME METHOD`, or `call --capability CAP METHOD`.
            let (name, method, capability) = match (capability, method) {
                (None, Some(method)) => (name.clone(), method.clone(), String::new()),
                (Some(cap), None) => (String::new(), name.clone(), cap.clone()),
                (None, None) => return usage("name the method to call: `call NAME METHOD`"),
                (Some(_), Some(extra)) => {
                    return usage(&format!(
                        "unexpected argument `{extra}`: with --capability, name only the method (`call --capability CAP METHOD`)"
                    ));
                }
            };
            let (name, method) = (&name, &method);
            let payload = match (data, data_file, stdin.as_deref()) {
                (Some(d), None, None) => Payload::data(d, *stream),
                (None, Some(f), None) => Payload::file(f, *stream)?,
                (None, None, Some("-")) => Payload::stdin(*stream)?,
                (None, None, None) if *stream => Payload::stdin(true)?,
                (None, None, None) => Payload::Whole(Bytes::new()),
                (_, _, Some(other)) if other != "-" => {
                    return usage(&format!(
                        "unexpected argument `{other}`; use `-` to read the payload from stdin"
                    ));
                }
                _ => return usage("give the payload once: --data, --data-file or -"),
            };
            let payload = match payload {
                Payload::Whole(bytes) => bytes,
                Payload::Stream { source, reason } => {
                    if !capability.is_empty() {
                        bail!(
                            "{}; the CLI sends streams to a named plugin: `plugvisor ps --capability {capability}` lists the providers",
                            reason.unwrap_or_else(|| "this payload goes as a stream".into())
                        );
                    }
                    if let Some(reason) = reason {
                        if *json {
                            bail!(
                                "{reason}; it must go as a stream (--stream), whose reply --json cannot show"
                            );
                        }
                        eprintln!(
                            "plugvisor: {reason}: streaming it to {name}.{method} (HandleStream)"
                        );
                    }
                    return crate::stream::call(&control_path(), name, method, source, *timeout)
                        .await;
                }
            };
            let request = pb::CallRequest {
                plugin: name.clone(),
                method: method.clone(),
                payload,
                metadata: Default::default(),
                timeout_ms: timeout.map_or(0, |t| t.as_millis() as u64),
                capability: capability.clone(),
            };
            check_message_size(&request)?;
            let mut client = control::connect(&control_path()).await?;
            let reply = client.call(request).await;
            let target = if capability.is_empty() {
                name
            } else {
                &capability
            };
            let reply = match reply {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    let hint = status
                        .metadata()
                        .get(plugvisor::error::RETRY_AFTER_MS)
                        .and_then(|v| v.to_str().ok())
                        .map(|ms| format!(" (retry-after-ms: {ms})"))
                        .unwrap_or_default();
                    bail!(
                        "{target}.{method}: {:?}: {}{hint}",
                        status.code(),
                        status.message()
                    )
                }
            };
            if !capability.is_empty() && !*json {
                eprintln!("plugvisor: {capability}: answered by {}", reply.plugin);
            }
            let mut out = std::io::stdout();
            if *json {
                let v = serde_json::json!({
                    "payload": String::from_utf8_lossy(&reply.payload),
                    "metadata": reply.metadata,
                    "plugin": reply.plugin,
                });
                writeln!(out, "{v}")?;
            } else {
                out.write_all(&reply.payload)?;
                if out.is_terminal() && !reply.payload.ends_with(b"\n") {
                    writeln!(out)?;
                }
            }
            out.flush()?;
            Ok(0)
        }
    }
}

/// `NAME: STATUS MESSAGE`, without a trailing space when there is no message.
fn health_line(name: &str, status: &str, message: &str, runs: &str) -> String {
    if message.is_empty() {
        format!("{name}: {status} ({runs})")
    } else {
        format!("{name}: {status} {message} ({runs})")
    }
}

/// What answered a health check, short: `version 1.2.0, sha256
/// 3f2a9c1e7b0d, signed by release` (the digest's first 12 hex digits, as
/// `inspect` and `health --json` give it whole).
fn what_runs_short(version: &str, sha256: &str, signer: Option<&pb::Signer>) -> String {
    let digest = match sha256.get(..12) {
        Some(short) => short,
        None if sha256.is_empty() => "unknown",
        None => sha256,
    };
    let signed = match signer {
        Some(s) => format!("signed by {}", s.name),
        None => "unsigned".to_string(),
    };
    format!("version {version}, sha256 {digest}, {signed}")
}

/// Refuses, before sending, a call larger than one control message may be
/// (the daemon would reset the stream with an unhelpful protocol error).
fn check_message_size(request: &pb::CallRequest) -> anyhow::Result<()> {
    use prost::Message;
    let size = request.encoded_len();
    let limit = plugvisor::transport::MAX_MESSAGE;
    if size > limit {
        bail!(
            "the call to {}.{} is {size} bytes ({} of payload), over the {limit}-byte ({} MiB) limit of one control message. \
             Payloads this large go as a stream: the plugin's HandleStream, reached through the daemon's Control.CallStream RPC \
             (Supervisor::call_stream when embedding the supervisor).",
            request.plugin,
            request.method,
            request.payload.len(),
            limit >> 20,
        );
    }
    Ok(())
}

fn usage(message: &str) -> anyhow::Result<i32> {
    eprintln!("plugvisor: {message}");
    Ok(2)
}

/// `plugvisor check`: validates the config and every manifest without
/// starting anything.
fn check(args: &ConfigArgs, json: bool) -> anyhow::Result<i32> {
    let config = load_config(args)?;
    let discovery = plugvisor::manifest::discover(&config.plugins_dir)?;
    let mut plugins = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut unpinned: Vec<String> = Vec::new();
    // Limits this host would refuse at every start (nofile above the hard
    // limit, pids beyond pid_max): caught here rather than in a restart loop.
    let host = plugvisor::manifest::HostLimits::probe(std::path::Path::new("/proc"));
    let signatures = config.signature_policy().map_err(anyhow::Error::msg)?;
    for m in &discovery.manifests {
        let refused = plugvisor::manifest::host_limits_problems(m, &host);
        if !refused.is_empty() {
            errors.extend(refused.iter().map(ToString::to_string));
            continue;
        }
        // What a start would refuse: the pin, writability, the user.
        match plugvisor::isolation::check_manifest(
            m,
            config.allow_writable_executables,
            config.isolation.require_pinning,
        ) {
            Ok(warnings) => {
                unpinned.extend(warnings);
                // What a start would say of its signature.
                match plugvisor::signature::check_offline(&signatures, m) {
                    Ok(_) => plugins.push(m),
                    Err(why) => errors.push(format!("{}: {why}", m.path.display())),
                }
            }
            Err(why) => errors.push(format!("{}: {why}", m.path.display())),
        }
    }
    errors.extend(discovery.errors.iter().map(|e| e.to_string()));
    let warnings: Vec<String> = config
        .plugins
        .keys()
        .filter(|name| !discovery.manifests.iter().any(|m| &m.name == *name))
        .map(|name| {
            format!(
                "the supervisor config has settings for `{name}`, but no such plugin is in {}",
                config.plugins_dir.display()
            )
        })
        .chain(unpinned)
        .collect();
    if json {
        let plugins: Vec<_> = plugins
            .iter()
            .map(|m| serde_json::json!({"name": m.name, "version": m.version.to_string(), "manifest": m.path}))
            .collect();
        let v = serde_json::json!({"plugins": plugins, "errors": errors, "warnings": warnings});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for m in &plugins {
            println!("ok    {} {} ({})", m.name, m.version, m.path.display());
        }
        for e in &errors {
            println!("error {e}");
        }
        for w in &warnings {
            println!("warn  {w}");
        }
        println!("{} plugin(s), {} error(s)", plugins.len(), errors.len());
    }
    Ok(if errors.is_empty() { 0 } else { 1 })
}

/// `plugvisor upgrade-self`: asks for the switch, then waits until the new
/// image serves (its generation), or the old one reports why it could not.
async fn upgrade_self(
    control_path: &std::path::Path,
    binary: Option<PathBuf>,
    timeout: u64,
    json: bool,
) -> anyhow::Result<i32> {
    let started = std::time::Instant::now();
    let mut client = control::connect(control_path).await?;
    let before = client
        .daemon_info(pb::DaemonInfoRequest {})
        .await?
        .into_inner();
    let binary = binary
        .map(|b| std::path::absolute(&b).unwrap_or(b))
        .map(|b| b.display().to_string())
        .unwrap_or_default();
    let accepted = client
        .upgrade_self(pb::UpgradeSelfRequest { binary })
        .await?
        .into_inner();
    drop(client);
    let deadline = started + Duration::from_secs(timeout);
    loop {
        // A new connection each time: the old image closes its connections.
        let info = match control::connect(control_path).await {
            Ok(mut client) => client
                .daemon_info(pb::DaemonInfoRequest {})
                .await
                .ok()
                .map(|r| r.into_inner()),
            Err(_) => None,
        };
        if let Some(info) = info {
            if info.generation >= accepted.generation {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "pid": info.pid,
                            "binary": info.binary,
                            "version": info.version,
                            "generation": info.generation,
                            "previous_binary": before.binary,
                            "handover_ms": info.last_handover_ms,
                            "pause_ms": info.last_pause_ms,
                        })
                    );
                } else {
                    println!(
                        "upgraded in place: pid {} now runs {} (version {}, generation {}); hand-over {}ms, control socket paused {}ms",
                        info.pid,
                        info.binary,
                        info.version,
                        info.generation,
                        info.last_handover_ms,
                        info.last_pause_ms
                    );
                }
                return Ok(0);
            }
            if !info.last_upgrade_error.is_empty() {
                bail!(
                    "not upgraded; the daemon keeps running {}: {}",
                    info.binary,
                    info.last_upgrade_error
                );
            }
        }
        if std::time::Instant::now() >= deadline {
            bail!("the daemon did not report the new image within {timeout}s (see its log)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// `inspect`'s sha256 line: the digest and what it is of.
fn what_runs_line(s: &pb::PluginStatus) -> String {
    if s.sha256.is_empty() {
        return "- (not started yet)".into();
    }
    let of = if s.sha256_sealed {
        "of the sealed bytes executed"
    } else {
        "of the file at start"
    };
    format!("{} ({of})", s.sha256)
}

/// `kv >=1.2 (on crash: restart), cache`.
fn requires_line(r: &[pb::Requirement]) -> String {
    r.iter()
        .map(|r| {
            let mut s = r.name.clone();
            if !r.version.is_empty() {
                s.push_str(&format!(" {}", r.version));
            }
            s.push_str(&format!(" (on crash: {})", r.on_crash));
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn status_json(s: &pb::PluginStatus) -> serde_json::Value {
    serde_json::json!({
        "name": s.name,
        "version": s.version,
        "reported_version": (!s.reported_version.is_empty()).then_some(&s.reported_version),
        "state": s.state,
        "reason": s.reason,
        "pid": (s.pid != 0).then_some(s.pid),
        "restarts": s.restarts,
        "last_exit": (!s.last_exit.is_empty()).then_some(&s.last_exit),
        "uptime_secs": s.uptime_secs,
        "executable": s.executable,
        "methods": s.methods,
        "capabilities": s.capabilities,
        "rate_limits": s.rate_limits.iter().map(|l| serde_json::json!({
            "method": l.method,
            "limit": l.limit,
        })).collect::<Vec<_>>(),
        "isolation": s.isolation.as_ref().map(isolation_json),
        "remote": s.remote.as_ref().map(crate::registry::remote_json),
        "replicas": s.replicas.iter().map(|r| serde_json::json!({
            "instance": r.instance,
            "state": r.state,
            "pid": (r.pid != 0).then_some(r.pid),
            "restarts": r.restarts,
        })).collect::<Vec<_>>(),
        "scaling": s.scaling.as_ref().map(scaling_json),
        "sha256": (!s.sha256.is_empty()).then_some(&s.sha256),
        "sha256_sealed": s.sha256_sealed,
        "signer": s.signer.as_ref().map(|g| serde_json::json!({"name": g.name, "key_id": g.key_id, "comment": g.comment})),
        "requires": s.requires.iter().map(|r| serde_json::json!({
            "name": r.name,
            "version": (!r.version.is_empty()).then_some(&r.version),
            "on_crash": r.on_crash,
        })).collect::<Vec<_>>(),
    })
}

fn scaling_json(s: &pb::Scaling) -> serde_json::Value {
    serde_json::json!({
        "min": s.min,
        "max": s.max,
        "current": s.current,
        "last_reason": (!s.last_reason.is_empty()).then_some(&s.last_reason),
        "last_change_ms": (s.last_change_ms != 0).then_some(s.last_change_ms),
    })
}

/// `2 (autoscaled 1-8)`, or the plain count.
fn replicas_cell(p: &pb::PluginStatus) -> String {
    match &p.scaling {
        Some(s) => format!("{} ({}-{})", s.current, s.min, s.max),
        None => p.replicas.len().max(1).to_string(),
    }
}

fn isolation_json(i: &pb::Isolation) -> serde_json::Value {
    serde_json::json!({
        "mechanism": i.mechanism,
        "cgroups": i.cgroups,
        "limits": i.limits.iter().map(|l| serde_json::json!({
            "name": l.name,
            "value": l.value,
            "enforced_by": l.enforced_by,
        })).collect::<Vec<_>>(),
        "usage": i.usage.as_ref().map(|u| serde_json::json!({
            "memory_bytes": u.memory_bytes,
            "memory_peak_bytes": u.memory_peak_bytes,
            "cpu_usec": u.cpu_usec,
            "pids": u.pids,
            "pids_rejected": u.pids_rejected,
            "oom_kills": u.oom_kills,
        })),
        "hardening": i.hardening,
        "uid": i.uid,
        "gid": i.gid,
        "identity": i.identity,
        "dynamic_user": i.dynamic_user,
        "capabilities": i.capabilities,
        "no_new_privs": i.no_new_privs,
        "degraded": i.degraded,
    })
}

/// `inspect`'s isolation section: the mechanism, each limit and what
/// enforces it, live usage, hardening.
fn print_isolation(i: &pb::Isolation) {
    println!("isolation:  {}", or_dash(&i.mechanism));
    if !i.cgroups.is_empty() {
        println!("cgroups:    {}", i.cgroups.join(", "));
    }
    if i.limits.is_empty() {
        println!("limits:     -");
    } else {
        println!("limits:");
        let name_w = i.limits.iter().map(|l| l.name.len()).max().unwrap_or(0);
        let value_w = i.limits.iter().map(|l| l.value.len()).max().unwrap_or(0);
        for l in &i.limits {
            println!(
                "  {:<name_w$}  {:<value_w$}  {}",
                l.name, l.value, l.enforced_by
            );
        }
    }
    match &i.usage {
        None => println!("usage:      - (no running instance in a cgroup)"),
        Some(u) => {
            let mut parts = Vec::new();
            if let Some(m) = u.memory_bytes {
                let peak = u
                    .memory_peak_bytes
                    .map(|p| format!(" (peak {})", human_bytes(p)))
                    .unwrap_or_default();
                parts.push(format!("memory {}{peak}", human_bytes(m)));
            }
            if let Some(c) = u.cpu_usec {
                parts.push(format!("cpu {:.2}s", c as f64 / 1e6));
            }
            if let Some(p) = u.pids {
                let refused = match u.pids_rejected {
                    Some(n) if n > 0 => format!(" ({n} forks refused)"),
                    _ => String::new(),
                };
                parts.push(format!("pids {p}{refused}"));
            }
            if let Some(k) = u.oom_kills {
                parts.push(format!("OOM kills {k}"));
            }
            println!("usage:      {}", parts.join(", "));
        }
    }
    println!("hardening:  {}", i.hardening.join(", "));
    let id = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "user:       uid {} gid {} ({})",
        id(i.uid),
        id(i.gid),
        or_dash(&i.identity)
    );
    println!(
        "caps:       {}",
        if i.capabilities.is_empty() {
            "none".to_string()
        } else {
            i.capabilities.join(", ")
        }
    );
    println!("nnp:        {}", if i.no_new_privs { "yes" } else { "no" });
    for d in &i.degraded {
        println!("degraded:   {d}");
    }
}

/// `12.3MiB`: a byte count for people.
fn human_bytes(n: u64) -> String {
    const UNITS: [(f64, &str); 3] = [
        (1024.0 * 1024.0 * 1024.0, "GiB"),
        (1024.0 * 1024.0, "MiB"),
        (1024.0, "KiB"),
    ];
    for (factor, unit) in UNITS {
        if n as f64 >= factor {
            return format!("{:.1}{unit}", n as f64 / factor);
        }
    }
    format!("{n}B")
}

fn event_json(e: &pb::Event) -> serde_json::Value {
    let mut v = serde_json::json!({
        "time_ms": e.time_ms,
        "plugin": e.plugin,
        "replica": e.replica,
        "instance": e.instance,
        "state": e.state,
        "reason": e.reason,
    });
    // Structured facts, present only where they apply.
    if e.pid != 0 {
        v["pid"] = e.pid.into();
    }
    if !e.version.is_empty() {
        v["version"] = e.version.clone().into();
    }
    if let Some(exit) = &e.exit {
        let mut x = serde_json::json!({"kind": exit.kind, "oom": exit.oom});
        if exit.kind == "exit" || exit.code != 0 {
            x["code"] = exit.code.into();
        }
        if exit.signal != 0 {
            x["signal"] = exit.signal.into();
        }
        v["exit"] = x;
    }
    if e.attempt != 0 {
        v["attempt"] = e.attempt.into();
        v["delay_ms"] = e.delay_ms.into();
    }
    if e.scaled_to != 0 {
        v["scaled_to"] = e.scaled_to.into();
    }
    v
}

fn event_line(e: &pb::Event) -> String {
    let secs = e.time_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!(
        "{h:02}:{m:02}:{s:02}.{:03} {:<12} {:<13} {}",
        e.time_ms % 1000,
        e.plugin,
        e.state,
        e.reason
    )
}

fn dash(n: u32) -> String {
    if n == 0 { "-".into() } else { n.to_string() }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn print_table(plugins: &[pb::PluginStatus]) {
    // The REPLICAS column shows only when some plugin autoscales.
    let scaled = plugins.iter().any(|p| p.scaling.is_some());
    let rows: Vec<Vec<String>> = plugins
        .iter()
        .map(|p| {
            [
                p.name.clone(),
                p.version.clone(),
                p.state.clone(),
                dash(p.pid),
                p.restarts.to_string(),
                if p.uptime_secs > 0 {
                    format!("{}s", p.uptime_secs)
                } else {
                    "-".into()
                },
                or_dash(&p.last_exit).to_string(),
                crate::registry::location(p),
            ]
            .into_iter()
            .chain(scaled.then(|| replicas_cell(p)))
            .collect()
        })
        .collect();
    let mut header = vec![
        "NAME",
        "VERSION",
        "STATE",
        "PID",
        "RESTARTS",
        "UPTIME",
        "LAST EXIT",
        "WHERE",
    ];
    if scaled {
        header.push("REPLICAS");
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.clone());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_line_has_no_trailing_space_without_a_message() {
        let runs = what_runs_short("1.0.0", &"ab".repeat(32), None);
        assert_eq!(runs, "version 1.0.0, sha256 abababababab, unsigned");
        assert_eq!(
            health_line("echo", "SERVING", "", &runs),
            "echo: SERVING (version 1.0.0, sha256 abababababab, unsigned)"
        );
        assert_eq!(
            health_line("echo", "DEGRADED", "disk low", &runs),
            "echo: DEGRADED disk low (version 1.0.0, sha256 abababababab, unsigned)"
        );
        let signer = pb::Signer {
            name: "release".into(),
            key_id: "7C0E27FB1E9D1F88".into(),
            comment: String::new(),
        };
        assert_eq!(
            what_runs_short("2.1.0", "", Some(&signer)),
            "version 2.1.0, sha256 unknown, signed by release"
        );
    }

    #[test]
    fn a_call_over_the_message_limit_is_refused_before_sending() {
        let mut request = pb::CallRequest {
            plugin: "echo".into(),
            method: "upper".into(),
            payload: Bytes::from(vec![b'x'; plugvisor::transport::MAX_MESSAGE]),
            ..Default::default()
        };
        let error = check_message_size(&request).unwrap_err().to_string();
        assert!(
            error.contains("67108864-byte (64 MiB) limit") && error.contains("CallStream"),
            "{error}"
        );
        request.payload = Bytes::from(vec![b'x'; 1024]);
        assert!(check_message_size(&request).is_ok());
    }
}
