//! `plugvisor-bench`: the figures of SPEC §8, measured in one run beside a raw
//! Unix-socket ping-pong of the same payload, and printed next to their
//! targets.
//!
//! ```text
//! cargo build --release -p plugvisor-cli -p plugvisor-example-echo \
//!     -p plugvisor-integration-tests --bin plugvisor-bench
//! target/release/plugvisor-bench [--quick] [--json] [--spin] [--plugins N]
//! ```
//!
//! The echo plugin (`echo-plugin`) and the daemon (`plugvisor`) are looked
//! for next to this executable. Everything runs under one temporary
//! directory, which is removed at the end; the daemon is always stopped.

#[path = "bench/daemon.rs"]
mod daemon;
#[path = "bench/fleet.rs"]
mod fleet;
#[path = "bench/floor.rs"]
mod floor;
#[path = "bench/handover.rs"]
mod handover;
#[path = "bench/remote.rs"]
mod remote;
#[path = "bench/spin.rs"]
mod spin;
#[path = "bench/stats.rs"]
mod stats;

use plugvisor::manifest::Manifest;
use plugvisor::{Event, PluginState, Supervisor, SupervisorOptions};
use plugvisor_proto as pb;
use prost::bytes::Bytes;
use spin::CpuMode;
use stats::{Row, Stats, Table, Verdict};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::broadcast;
use tokio_stream::StreamExt;

/// The payload of every latency and throughput figure.
const PAYLOAD: usize = 64;
/// HandleStream: total size and chunk size.
const STREAM_TOTAL: usize = 64 << 20;
const STREAM_CHUNK: usize = 1 << 20;
/// Restart settings of the benchmarked plugins: a short, fixed backoff that
/// never gives up, so crash → ready can be read as backoff + X.
const BACKOFF: Duration = Duration::from_millis(10);
const RESTART_YAML: &str = "{policy: always, initial_backoff: 10ms, max_backoff: 10ms, multiplier: 1.0, jitter: 0.0, max_restarts: 100000, window: 1s}";
/// Concurrent callers of the throughput figure.
const CALLERS: usize = 8;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

/// How many samples of each figure.
#[derive(Debug, Clone, Copy)]
struct Counts {
    latency: usize,
    latency_warmup: usize,
    concurrent_calls: usize,
    stream_reps: usize,
    restarts: usize,
    crashes: usize,
    memory_plugins: usize,
    /// Section 10: how long the daemon's CPU use at rest is read over, and
    /// how many times `plugvisor ps` is run.
    fleet_rest: Duration,
    fleet_ps_runs: usize,
    /// Section 11: `upgrade-self` hand-overs under load.
    upgrades: usize,
}

impl Counts {
    fn full() -> Self {
        Counts {
            latency: 20_000,
            latency_warmup: 2_000,
            concurrent_calls: 200_000,
            stream_reps: 5,
            restarts: 30,
            crashes: 20,
            memory_plugins: 50,
            fleet_rest: Duration::from_secs(10),
            fleet_ps_runs: 10,
            upgrades: 10,
        }
    }

    fn quick() -> Self {
        Counts {
            latency: 2_000,
            latency_warmup: 200,
            concurrent_calls: 16_000,
            stream_reps: 1,
            restarts: 5,
            crashes: 5,
            memory_plugins: 10,
            fleet_rest: Duration::from_secs(3),
            fleet_ps_runs: 3,
            upgrades: 3,
        }
    }
}

struct Options {
    quick: bool,
    json: bool,
    /// `--plugin-env K=V`: extra environment of every benchmarked plugin.
    plugin_env: Vec<(String, String)>,
    /// `--spin`: latency figures with a lowest-priority spinner per CPU.
    cpus: CpuMode,
    /// `--plugins N`: section 10's plugin count (default 1,000; 50 quick).
    plugins: Option<usize>,
    /// `--only 1,11`: the sections to run (default: all).
    only: Option<Vec<u32>>,
}

impl Options {
    /// Whether any of `sections` is to run.
    fn runs(&self, sections: &[u32]) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| sections.iter().any(|s| only.contains(s)))
    }
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        quick: false,
        json: false,
        plugin_env: Vec::new(),
        cpus: CpuMode::Idle,
        plugins: None,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--json" => opts.json = true,
            "--spin" => opts.cpus = CpuMode::Spin,
            "--plugins" => {
                let n = args.next().ok_or("--plugins needs a count, e.g. 1000")?;
                let n: usize = n
                    .parse()
                    .map_err(|_| format!("--plugins `{n}`: expected a count, e.g. 1000"))?;
                if n == 0 {
                    return Err("--plugins must be at least 1 (or 0 is not a fleet)".into());
                }
                opts.plugins = Some(n);
            }
            "--only" => {
                let list = args
                    .next()
                    .ok_or("--only needs section numbers, e.g. 1,11")?;
                let sections = list
                    .split(',')
                    .map(|n| match n.trim().parse::<u32>() {
                        Ok(n @ 1..=11) => Ok(n),
                        _ => Err(format!(
                            "--only `{list}`: `{n}` is not a section number (1 to 11)"
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                opts.only = Some(sections);
            }
            "--plugin-env" => {
                let kv = args
                    .next()
                    .ok_or("--plugin-env needs KEY=VALUE, e.g. TOKIO_WORKER_THREADS=1")?;
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("--plugin-env `{kv}`: expected KEY=VALUE"))?;
                opts.plugin_env.push((k.to_string(), v.to_string()));
            }
            "-h" | "--help" => {
                println!(
                    "plugvisor-bench: measures the SPEC §8 performance figures in one run.\n\n\
                     usage: plugvisor-bench [--quick] [--json] [--spin] [--plugins N] [--only 1,11] [--plugin-env KEY=VALUE]...\n\n  \
                     --quick       small sample counts (a smoke run, not a measurement)\n  \
                     --json        also print the figures as one JSON object\n  \
                     --spin        latency figures with a SCHED_IDLE spinner thread per CPU, so\n                \
                     idle vCPUs do not sleep between hops (the `cpus` column says which)\n  \
                     --plugins N   plugins of section 10, in one daemon (default 1000; 50 with --quick)\n  \
                     --only LIST   run only these sections, e.g. `--only 11` (2-7 run together)\n  \
                     --plugin-env  set a variable in every benchmarked plugin's environment\n                \
                     (e.g. TOKIO_WORKER_THREADS=1); repeatable\n\n\
                     TOKIO_WORKER_THREADS in the bench's own environment sets the worker count of\n\
                     the embedded supervisor's runtime (default: one per CPU)."
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`; try --help")),
        }
    }
    Ok(opts)
}

/// The executables the bench drives, found next to its own, and the extra
/// environment of the plugins.
struct Setup {
    echo: PathBuf,
    kv: PathBuf,
    daemon: PathBuf,
    plugin_env: Vec<(String, String)>,
}

fn locate_binaries() -> Result<Setup, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", exe.display()))?;
    let release = if dir.file_name().is_some_and(|n| n == "release") {
        " --release"
    } else {
        ""
    };
    let find = |name: &str, package: &str| {
        let path = dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "missing binary `{name}`: expected it at {}\nbuild it with: cargo build{release} -p {package}",
                path.display()
            ))
        }
    };
    Ok(Setup {
        echo: find("echo-plugin", "plugvisor-example-echo")?,
        kv: find("kv-plugin", "plugvisor-example-kv")?,
        daemon: find("plugvisor", "plugvisor")?,
        plugin_env: Vec::new(),
    })
}

fn main() -> ExitCode {
    let mut opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("plugvisor-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let mut bins = match locate_binaries() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("plugvisor-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    bins.plugin_env = std::mem::take(&mut opts.plugin_env);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("plugvisor-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts, bins)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("plugvisor-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every section; a failed section becomes an ERROR row, the others
/// still run. Returns whether every section ran.
async fn run(opts: Options, bins: Setup) -> Result<bool> {
    let counts = if opts.quick {
        Counts::quick()
    } else {
        Counts::full()
    };
    let cpus_mode = opts.cpus;
    let (tmp, fs) = temp_root()?;
    let root = tmp.path().to_path_buf();
    let mut table = Table::default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_before = load_average();
    eprintln!(
        "plugvisor-bench: {} run, {cpus} CPUs, latency with CPUs {}, temp dir {} ({fs})",
        if opts.quick { "QUICK (smoke)" } else { "full" },
        cpus_mode.label(),
        root.display()
    );

    // 1. The floors.
    let (floor, copy_floor) = if !opts.runs(&[1]) {
        (None, None)
    } else {
        eprintln!("[1/11] raw Unix-socket ping-pong and copy ...");
        let floor = match floor::raw_floor(&root, counts, cpus_mode).await {
            Ok((floor, blocking)) => {
                table.push(
                    Row::new(
                        "1  raw UDS ping-pong 64 B (tokio client <-> echo thread)",
                        floor.p50_p99(),
                        "the floor",
                        Verdict::Info,
                    )
                    .cpus(cpus_mode.label()),
                );
                table.push(
                    Row::new(
                        "   raw UDS ping-pong 64 B (blocking std, both ends)",
                        blocking.p50_p99(),
                        "kernel floor, info",
                        Verdict::Info,
                    )
                    .cpus(cpus_mode.label()),
                );
                table.json("raw_p50_us", floor.p50_us());
                table.json("raw_p99_us", floor.p99_us());
                table.json("raw_blocking_p50_us", blocking.p50_us());
                table.json("raw_blocking_p99_us", blocking.p99_us());
                Some(floor)
            }
            Err(e) => {
                table.error("1  raw UDS ping-pong 64 B", &e);
                None
            }
        };
        let copy_floor = match floor::raw_copy(counts).await {
            Ok((median, best)) => {
                table.push(
                    Row::new(
                        "   raw UDS copy 64 MiB (1 MiB writes) round trip, socketpair",
                        format!(
                            "{median:.2} GB/s median, {best:.2} best of {}",
                            counts.stream_reps
                        ),
                        "the stream floor",
                        Verdict::Info,
                    )
                    .cpus(CpuMode::Idle.label()),
                );
                table.json("raw_copy_gb_per_s", median);
                Some(median)
            }
            Err(e) => {
                table.error("   raw UDS copy 64 MiB", &e);
                None
            }
        };
        (floor, copy_floor)
    };

    // 8. Memory first, on its own supervisor, before any other figure has
    // grown the heap (a 64 MiB stream leaves the allocator bigger).
    if opts.runs(&[8]) {
        eprintln!(
            "[8/11] supervisor memory with {} plugins ...",
            counts.memory_plugins
        );
        match memory(&root, &bins, counts).await {
            Ok(m) => m.report(&mut table),
            Err(e) => table.error("8  supervisor memory", &e),
        }
    }

    // The embedded supervisor of figures 2, 4-7.
    let floors = Floors {
        ping: floor,
        copy_gb_s: copy_floor,
        cpus: cpus_mode,
    };
    let daemon_p50 = if opts.runs(&[2, 3, 4, 5, 6, 7]) {
        let sup = Supervisor::new(SupervisorOptions::new(root.join("e")))?;
        let result = embedded_and_daemon(&root, &bins, counts, &sup, floors, &mut table).await;
        sup.shutdown().await;
        match result {
            Ok(p50) => p50,
            Err(e) => {
                table.error("embedded supervisor", &e);
                None
            }
        }
    } else {
        None
    };

    // 9. The price of per-call snapshots (state.snapshot_on_change).
    if opts.runs(&[9]) {
        eprintln!("[9/11] kv set with and without per-call snapshots ...");
        match snapshot_cost(&root, &bins, counts).await {
            Ok((off, on, fs)) => {
                table.push(Row::new(
                    "9  kv `set`, 64 B, snapshots periodic only: p50 / p99",
                    off.p50_p99(),
                    "info",
                    Verdict::Info,
                ));
                table.push(Row::new(
                    format!("   kv `set` with a snapshot before every reply ({fs})"),
                    on.p50_p99(),
                    "info: cost of no loss",
                    Verdict::Info,
                ));
                table.json("kv_set_p50_us", off.p50_us());
                table.json("kv_set_snapshot_each_p50_us", on.p50_us());
                table.json("kv_set_snapshot_each_p99_us", on.p99_us());
            }
            Err(e) => table.error("9  kv set with per-call snapshots", &e),
        }
    }
    // 10. Many plugins in one daemon.
    if opts.runs(&[10]) {
        let plan = fleet::FleetPlan {
            plugins: opts.plugins.unwrap_or(if opts.quick { 50 } else { 1000 }),
            rest: counts.fleet_rest,
            ps_runs: counts.fleet_ps_runs,
            calls: counts.latency / 4,
            warmup: counts.latency_warmup / 4,
            cpus: cpus_mode,
        };
        eprintln!(
            "[10/11] {} echo plugins in one daemon, health every 1 s ...",
            plan.plugins
        );
        match fleet::run(&root, &bins, plan).await {
            Ok(f) => report_fleet(&f, daemon_p50, cpus_mode, &mut table),
            Err(e) => table.error(&format!("10 {} plugins in one daemon", plan.plugins), &e),
        }
    }

    // 11. upgrade-self under load.
    if opts.runs(&[11]) {
        eprintln!(
            "[11/11] upgrade-self {} times, callers calling all the time ...",
            counts.upgrades
        );
        match handover::run(&root, &bins, counts.upgrades).await {
            Ok(h) => report_handover(&h, &mut table),
            Err(e) => table.error("11 upgrade-self under load", &e),
        }
    }
    table.sort();
    println!();
    println!(
        "plugvisor-bench — SPEC §8 figures ({} run, {cpus} CPUs, payload {PAYLOAD} B; latency n={} after {} warm-up calls)",
        if opts.quick {
            "QUICK smoke, not a measurement"
        } else {
            "full"
        },
        counts.latency,
        counts.latency_warmup
    );
    println!(
        "every target is a ratio to a floor measured in this run; `cpus`: spin = a SCHED_IDLE spinner per CPU (--spin), idle = none"
    );
    if !bins.plugin_env.is_empty() {
        let env: Vec<String> = bins
            .plugin_env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("plugin environment: {}", env.join(" "));
    }
    println!(
        "runtime dir (plugin sockets): {} ({fs}); load average (1 min) before / after: {load_before} / {}",
        root.display(),
        load_average()
    );
    table.print();
    if opts.json {
        println!("{}", table.json_text());
    }
    Ok(!table.has_errors())
}

fn report_handover(h: &handover::Handover, table: &mut Table) {
    table.push(Row::new(
        format!(
            "11 upgrade-self: request -> new daemon answers ({} hand-overs, 1 plugin)",
            h.upgrades
        ),
        format!(
            "p50 {} / max {}",
            stats::fmt_ms(h.total.p50),
            stats::fmt_ms(h.total.p99)
        ),
        "info",
        Verdict::Info,
    ));
    table.push(Row::new(
        "   of which, by the daemon: request -> serving / socket not accepted",
        format!(
            "p50 {} / {}",
            stats::fmt_ms(h.daemon_total.p50),
            stats::fmt_ms(h.daemon_paused.p50)
        ),
        "info",
        Verdict::Info,
    ));
    table.push(Row::new(
        "   longest control call during the hand-overs (4 callers)",
        stats::fmt_ms(h.longest_call),
        "info: the pause a caller sees",
        Verdict::Info,
    ));
    table.push(Row::new(
        format!(
            "   failed calls of {} ({} sent again by the client, never processed)",
            h.calls + h.failed,
            h.resent
        ),
        h.failed.to_string(),
        "0",
        Verdict::at_most(h.failed as f64, 0.0),
    ));
    table.json("handover_p50_ms", h.total.p50.as_secs_f64() * 1e3);
    table.json("handover_max_ms", h.total.p99.as_secs_f64() * 1e3);
    table.json(
        "handover_daemon_p50_ms",
        h.daemon_total.p50.as_secs_f64() * 1e3,
    );
    table.json(
        "handover_paused_p50_ms",
        h.daemon_paused.p50.as_secs_f64() * 1e3,
    );
    table.json(
        "handover_longest_call_ms",
        h.longest_call.as_secs_f64() * 1e3,
    );
    table.json("handover_failed_calls", h.failed as f64);
}

/// The same-run floors the embedded figures are ratios to.
#[derive(Clone, Copy)]
struct Floors {
    ping: Option<Stats>,
    copy_gb_s: Option<f64>,
    /// The CPU mode of the latency figures.
    cpus: CpuMode,
}

/// `a / b` as "2.3x what", or "n/a".
fn ratio_text(r: Option<f64>, what: &str) -> String {
    r.map_or("n/a".to_string(), |r| format!("{r:.2}x {what}"))
}

fn ratio_at_most(r: Option<f64>, target: f64) -> Verdict {
    r.map_or(Verdict::Info, |r| Verdict::at_most(r, target))
}

fn ratio_at_least(r: Option<f64>, target: f64) -> Verdict {
    r.map_or(Verdict::Info, |r| Verdict::at_least(r, target))
}

/// Runs figures 2-7; returns the daemon's 1-plugin p50 (figure 3), the
/// baseline of section 10's calls.
async fn embedded_and_daemon(
    root: &Path,
    bins: &Setup,
    counts: Counts,
    sup: &Supervisor,
    floors: Floors,
    table: &mut Table,
) -> Result<Option<Duration>> {
    let manifest = write_manifest(&root.join("ep"), "echo", bins, "")?;
    let mut events = sup.events();
    sup.add(manifest, &Default::default())?;
    sup.wait_ready("echo", Duration::from_secs(30)).await?;
    let mode = floors.cpus.label();

    // 2. Handle, one caller, embedded.
    eprintln!("[2/11] Handle 64 B, one caller, embedded ...");
    let embedded = match embedded_latency(sup, counts, floors.cpus).await {
        Ok(s) => {
            let p50 = floors
                .ping
                .map(|f| s.p50.as_secs_f64() / f.p50.as_secs_f64());
            let p99 = floors
                .ping
                .map(|f| s.p99.as_secs_f64() / f.p99.as_secs_f64());
            table.push(
                Row::new(
                    "2  Handle 64 B, 1 caller, embedded: p50 / p99",
                    s.p50_p99(),
                    "-",
                    Verdict::Info,
                )
                .cpus(mode),
            );
            table.push(
                Row::new(
                    "   embedded p50 / raw p50",
                    ratio_text(p50, "raw"),
                    "<= 3x",
                    ratio_at_most(p50, 3.0),
                )
                .cpus(mode),
            );
            table.push(
                Row::new(
                    "   embedded p99 / raw p99",
                    ratio_text(p99, "raw"),
                    "<= 8x",
                    ratio_at_most(p99, 8.0),
                )
                .cpus(mode),
            );
            table.json("embedded_p50_us", s.p50_us());
            table.json("embedded_p99_us", s.p99_us());
            table.json("embedded_mean_us", s.mean.as_secs_f64() * 1e6);
            if let Some(r) = p50 {
                table.json("embedded_over_raw_p50", r);
            }
            if let Some(r) = p99 {
                table.json("embedded_over_raw_p99", r);
            }
            Some(s)
        }
        Err(e) => {
            table.error("2  Handle 64 B, 1 caller, embedded", &e);
            None
        }
    };

    // 2b. The same over TCP + mutual TLS on loopback (a remote plugin).
    eprintln!("[2b] Handle 64 B, one caller, embedded, over TCP + mTLS ...");
    let tls = remote::latency(root, bins, sup, counts.latency_warmup, counts.latency)
        .await
        .and_then(Stats::of);
    match tls {
        Ok(s) => {
            let ratio = embedded
                .as_ref()
                .map(|e| s.p50.as_secs_f64() / e.p50.as_secs_f64());
            table.push(
                Row::new(
                    "2b Handle 64 B, 1 caller, TCP + mTLS loopback: p50 / p99",
                    s.p50_p99(),
                    "-",
                    Verdict::Info,
                )
                .cpus(mode),
            );
            table.push(
                Row::new(
                    "   TCP + mTLS p50 / Unix-socket p50",
                    ratio_text(ratio, "embedded"),
                    "-",
                    Verdict::Info,
                )
                .cpus(mode),
            );
            table.json("tls_p50_us", s.p50_us());
            table.json("tls_p99_us", s.p99_us());
            if let Some(r) = ratio {
                table.json("tls_over_unix_p50", r);
            }
        }
        Err(e) => table.error("2b Handle 64 B over TCP + mTLS", &e),
    }

    // 4. Concurrent callers (before the spawn figures, which need the exec
    // floor of section 6 for the daemon's spawn figure as well).
    eprintln!("[4/11] 1 and {CALLERS} concurrent callers, embedded ...");
    match concurrent(sup, counts).await {
        Ok((one, rate)) => {
            let r = Some(rate / one);
            table.push(
                Row::new(
                    format!("4  {CALLERS} concurrent callers, 64 B, embedded"),
                    format!(
                        "{} calls/s ({} calls)",
                        thousands(rate),
                        thousands(counts.concurrent_calls as f64)
                    ),
                    ">= 60,000 calls/s",
                    Verdict::at_least(rate, 60_000.0),
                )
                .cpus(CpuMode::Idle.label()),
            );
            table.push(
                Row::new(
                    "   1 caller, back to back, embedded",
                    format!("{} calls/s", thousands(one)),
                    "info",
                    Verdict::Info,
                )
                .cpus(CpuMode::Idle.label()),
            );
            table.push(Row::new(
                format!("   {CALLERS} callers / 1 caller"),
                ratio_text(r, "1 caller"),
                ">= 4x",
                ratio_at_least(r, 4.0),
            ));
            table.json("concurrent_calls_per_s", rate);
            table.json("one_caller_calls_per_s", one);
            table.json("concurrent_over_one_caller", rate / one);
        }
        Err(e) => table.error("4  concurrent callers", &e),
    }

    // 5. HandleStream throughput.
    eprintln!("[5/11] HandleStream 64 MiB ...");
    match stream(sup, counts).await {
        Ok((median, best)) => {
            let r = floors.copy_gb_s.map(|raw| raw / median);
            table.push(
                Row::new(
                    "5  HandleStream 64 MiB (1 MiB chunks) round trip, embedded",
                    format!(
                        "{median:.2} GB/s median, {best:.2} best of {}",
                        counts.stream_reps
                    ),
                    ">= 2 GB/s",
                    Verdict::at_least(median, 2.0),
                )
                .cpus(CpuMode::Idle.label()),
            );
            table.push(Row::new(
                "   raw UDS copy (round trip) / HandleStream, medians",
                ratio_text(r, "slower than raw"),
                "<= 5x",
                ratio_at_most(r, 5.0),
            ));
            table.json("stream_gb_per_s", median);
            table.json("stream_gb_per_s_best", best);
            if let Some(r) = r {
                table.json("raw_copy_over_stream", r);
            }
        }
        Err(e) => table.error("5  HandleStream 64 MiB", &e),
    }

    // 6. spawn -> ready, embedded.
    eprintln!(
        "[6/11] spawn -> ready over {} restarts ...",
        counts.restarts
    );
    let exec_floor = match spawn_ready(sup, bins, &mut events, counts).await {
        Ok(s) => {
            let r = s.total.p50.as_secs_f64() / s.exec_floor.p50.as_secs_f64();
            table.push(Row::new(
                "6  spawn -> ready, embedded (Rust SDK echo): p50 / p99",
                s.total.p50_p99_ms(),
                "-",
                Verdict::Info,
            ));
            table.push(Row::new(
                "   embedded spawn -> ready p50 / exec floor p50",
                ratio_text(Some(r), "exec"),
                "<= 2x",
                Verdict::at_most(r, 2.0),
            ));
            table.push(Row::new(
                "   of which spawn -> handshake / Initialize (p50)",
                format!(
                    "{} / {}",
                    stats::fmt_ms(s.handshake.p50),
                    stats::fmt_ms(s.initialize.p50)
                ),
                "info",
                Verdict::Info,
            ));
            table.push(Row::new(
                "   exec floor: echo-plugin run bare (exits at once), fork->reaped",
                s.exec_floor.p50_p99_ms(),
                "the spawn floor",
                Verdict::Info,
            ));
            table.json("exec_floor_p50_ms", s.exec_floor.p50.as_secs_f64() * 1e3);
            table.json("spawn_ready_p50_ms", s.total.p50.as_secs_f64() * 1e3);
            table.json("spawn_ready_p99_ms", s.total.p99.as_secs_f64() * 1e3);
            table.json("spawn_ready_over_exec", r);
            table.json(
                "spawn_handshake_p50_ms",
                s.handshake.p50.as_secs_f64() * 1e3,
            );
            table.json(
                "spawn_initialize_p50_ms",
                s.initialize.p50.as_secs_f64() * 1e3,
            );
            Some(s.exec_floor)
        }
        Err(e) => {
            table.error("6  spawn -> ready", &e);
            None
        }
    };

    // 3. The same through the daemon, and its spawn -> ready.
    eprintln!("[3/11] Handle 64 B, one caller, and spawn -> ready through the daemon ...");
    let mut daemon_p50 = None;
    match daemon_figures(root, bins, counts, floors.cpus).await {
        Ok(d) => {
            let s = d.latency;
            daemon_p50 = Some(s.p50);
            let ratio = embedded.map(|e| s.p50.as_secs_f64() / e.p50.as_secs_f64());
            let unary_ratio = embedded.map(|e| d.unary.p50.as_secs_f64() / e.p50.as_secs_f64());
            table.push(
                Row::new(
                    "3  Handle 64 B, 1 caller, daemon unary `Call`: p50 / p99",
                    format!(
                        "{} (p50 {})",
                        d.unary.p50_p99(),
                        ratio_text(unary_ratio, "embedded")
                    ),
                    "-",
                    Verdict::Info,
                )
                .cpus(mode),
            );
            table.json("daemon_unary_p50_us", d.unary.p50_us());
            table.json("daemon_unary_p99_us", d.unary.p99_us());
            table.push(
                Row::new(
                    "3  Handle 64 B, 1 caller, daemon call session: p50 / p99",
                    s.p50_p99(),
                    "-",
                    Verdict::Info,
                )
                .cpus(mode),
            );
            table.push(
                Row::new(
                    "   daemon p50 / embedded p50",
                    ratio_text(ratio, "embedded"),
                    "<= 1.5x",
                    ratio_at_most(ratio, 1.5),
                )
                .cpus(mode),
            );
            table.json("daemon_p50_us", s.p50_us());
            table.json("daemon_p99_us", s.p99_us());
            if let Some(r) = ratio {
                table.json("daemon_over_embedded_p50", r);
            }
            match d.spawn {
                Ok(spawn) => {
                    let r = exec_floor.map(|f| spawn.p50.as_secs_f64() / f.p50.as_secs_f64());
                    table.push(Row::new(
                        format!(
                            "6  spawn -> ready in the daemon ({}): p50 / p99",
                            d.isolation
                        ),
                        spawn.p50_p99_ms(),
                        "-",
                        Verdict::Info,
                    ));
                    table.push(Row::new(
                        "   daemon spawn -> ready p50 / exec floor p50",
                        ratio_text(r, "exec"),
                        "<= 2x",
                        ratio_at_most(r, 2.0),
                    ));
                    table.json("daemon_spawn_ready_p50_ms", spawn.p50.as_secs_f64() * 1e3);
                    if let Some(r) = r {
                        table.json("daemon_spawn_ready_over_exec", r);
                    }
                }
                Err(e) => table.error("6  spawn -> ready in the daemon", &e),
            }
        }
        Err(e) => table.error("3  Handle 64 B through the daemon", &e),
    }
    match floor::chained_floor(root, counts, floors.cpus).await {
        Ok((one, two)) => {
            let r = two.p50.as_secs_f64() / one.p50.as_secs_f64();
            table.push(
                Row::new(
                    "   floor: raw UDS 2 hops chained p50 / 1 hop p50",
                    format!("{:.2}x ({} / {})", r, two.p50_p99(), one.p50_p99()),
                    "-",
                    Verdict::Info,
                )
                .cpus(mode),
            );
            table.json("raw_two_hops_p50_us", two.p50_us());
            table.json("raw_one_hop_p50_us", one.p50_us());
            table.json("raw_two_hops_over_one_p50", r);
        }
        Err(e) => table.error("   floor: raw UDS 2 hops chained", &e),
    }

    // 7. crash -> event, crash -> ready.
    eprintln!(
        "[7/11] crash -> event / ready over {} crashes ...",
        counts.crashes
    );
    match crashes(sup, &mut events, counts).await {
        Ok(c) => {
            table.push(Row::new(
                "7  crash (SIGKILL) -> backoff event received: p50 / p99",
                c.event.p50_p99(),
                "p50 <= 1 ms",
                Verdict::at_most(c.event.p50.as_secs_f64() * 1e3, 1.0),
            ));
            table.push(Row::new(
                "   of which SIGKILL -> process gone (own pidfd readable)",
                c.exit.p50_p99(),
                "info (kernel)",
                Verdict::Info,
            ));
            table.push(Row::new(
                "   then process gone -> event stamped (supervisor)",
                c.stamped.p50_p99(),
                "info",
                Verdict::Info,
            ));
            table.push(Row::new(
                "   then event stamped -> received (broadcast wake-up)",
                c.delivered.p50_p99(),
                "info",
                Verdict::Info,
            ));
            table.json(
                "crash_backoff_sleep_p50_ms",
                c.slept.p50.as_secs_f64() * 1e3,
            );
            table.json("crash_exit_p50_us", c.exit.p50_us());
            table.json("crash_supervisor_p50_us", c.stamped.p50_us());
            table.json("crash_delivery_p50_us", c.delivered.p50_us());
            let extra = c.ready_minus_backoff;
            table.push(Row::new(
                "   crash -> ready again: p50 / p99",
                format!(
                    "backoff {} + {} / + {}",
                    stats::fmt_ms(BACKOFF),
                    stats::fmt_ms(extra.p50),
                    stats::fmt_ms(extra.p99)
                ),
                "<= backoff + 3 ms",
                Verdict::at_most(extra.p50.as_secs_f64() * 1e3, 3.0),
            ));
            table.push(Row::new(
                format!(
                    "   of which backoff event -> starting (backoff {})",
                    stats::fmt_ms(BACKOFF)
                ),
                c.slept.p50_p99_ms(),
                "info",
                Verdict::Info,
            ));
            table.push(Row::new(
                "   of which starting -> ready",
                c.restarted.p50_p99_ms(),
                "info",
                Verdict::Info,
            ));
            table.push(Row::new(
                "   of which SIGKILL -> Initialize sent, past the backoff",
                c.initialize_late.p50_p99_ms(),
                "info (timer)",
                Verdict::Info,
            ));
            table.push(Row::new(
                "   of which Initialize sent -> ready",
                c.initialized.p50_p99_ms(),
                "info",
                Verdict::Info,
            ));
            table.json(
                "crash_initialize_late_p50_ms",
                c.initialize_late.p50.as_secs_f64() * 1e3,
            );
            table.json(
                "crash_initialized_p50_ms",
                c.initialized.p50.as_secs_f64() * 1e3,
            );
            table.json("crash_event_p50_us", c.event.p50_us());
            table.json("crash_event_p99_us", c.event.p99_us());
            table.json(
                "crash_ready_minus_backoff_p50_ms",
                extra.p50.as_secs_f64() * 1e3,
            );
            table.json(
                "crash_ready_minus_backoff_p99_ms",
                extra.p99.as_secs_f64() * 1e3,
            );
            table.json("crash_backoff_ms", BACKOFF.as_secs_f64() * 1e3);
        }
        Err(e) => table.error("7  crash -> event / ready", &e),
    }
    Ok(daemon_p50)
}

// ---------------------------------------------------------------------------
// Plugins.

/// Writes `<dir>/<name>/plugin.yaml` for the echo plugin, with `extra`
/// manifest lines (e.g. `health:`), and loads it.
fn write_manifest(dir: &Path, name: &str, setup: &Setup, extra: &str) -> Result<Manifest> {
    let plugin_dir = dir.join(name);
    std::fs::create_dir_all(&plugin_dir)?;
    let path = plugin_dir.join("plugin.yaml");
    let mut text = format!(
        "name: {name}\nversion: 0.1.0\nexec: {}\nrestart: {RESTART_YAML}\n",
        serde_json::to_string(&setup.echo.display().to_string())?
    );
    if !setup.plugin_env.is_empty() {
        // JSON strings are YAML flow scalars.
        let env: serde_json::Map<String, serde_json::Value> = setup
            .plugin_env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
        text.push_str(&format!("env: {}\n", serde_json::Value::Object(env)));
    }
    text.push_str(extra);
    std::fs::write(&path, text)?;
    Ok(Manifest::load(&path)?)
}

/// kv `set` latency without and with `state.snapshot_on_change`, the state
/// dir on a disk filesystem (fsync on tmpfs would cost nothing and say
/// nothing). Returns both and where the state dir was.
async fn snapshot_cost(
    root: &Path,
    bins: &Setup,
    counts: Counts,
) -> Result<(Stats, Stats, String)> {
    let state = tempfile::Builder::new()
        .prefix("pvb-state")
        .tempdir_in("/var/tmp")?;
    let fs = format!("state dir on {}", filesystem_of(state.path()));
    let mut options = SupervisorOptions::new(root.join("s"));
    options.state_dir = Some(state.path().to_path_buf());
    let sup = Supervisor::new(options)?;
    let result = async {
        let mut stats = Vec::new();
        for (name, on) in [("kvoff", false), ("kvon", true)] {
            let dir = root.join("kvm").join(name);
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("plugin.yaml");
            std::fs::write(
                &path,
                format!(
                    "name: {name}\nversion: 0.1.0\nexec: {}\nstate: {{snapshot_interval: 0s, snapshot_on_change: {on}}}\n",
                    serde_json::to_string(&bins.kv.display().to_string())?
                ),
            )?;
            sup.add(Manifest::load(&path)?, &Default::default())?;
            sup.wait_ready(name, Duration::from_secs(20)).await?;
            let n = (counts.latency / 10).max(200);
            let mut samples = Vec::with_capacity(n);
            for i in 0..n + n / 10 {
                // 64 B payloads over a store of up to 200 keys.
                let body = format!("k{:03}={:0>57}", i % 200, i);
                let started = Instant::now();
                sup.call(name, "set", Bytes::from(body), HashMap::new(), None)
                    .await?;
                if i >= n / 10 {
                    samples.push(started.elapsed());
                }
            }
            stats.push(Stats::of(samples)?);
        }
        let on = stats.pop().ok_or("no samples")?;
        let off = stats.pop().ok_or("no samples")?;
        Ok::<_, BoxError>((off, on, fs))
    }
    .await;
    sup.shutdown().await;
    result
}

/// The filesystem type of `path` (from /proc/self/mounts), e.g. `ext4`.
fn filesystem_of(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fs) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(point)
                .then(|| (point.len(), fs.to_string()))
        })
        .max()
        .map_or_else(|| "unknown".to_string(), |(_, fs)| fs)
}

fn payload() -> Bytes {
    Bytes::from(vec![b'x'; PAYLOAD])
}

async fn call_once(sup: &Supervisor, payload: &Bytes) -> Result<()> {
    let reply = sup
        .call("echo", "echo", payload.clone(), HashMap::new(), None)
        .await?;
    if reply.payload.len() != PAYLOAD {
        return Err(format!(
            "echo answered {} bytes instead of {PAYLOAD}",
            reply.payload.len()
        )
        .into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Embedded latency.

async fn embedded_latency(sup: &Supervisor, counts: Counts, cpus: CpuMode) -> Result<Stats> {
    let sup = sup.clone();
    let _spin = cpus.hold()?;
    // On a runtime worker, as a host application's calls would be.
    let samples = tokio::spawn(async move {
        let payload = payload();
        let mut samples = Vec::with_capacity(counts.latency);
        for i in 0..counts.latency_warmup + counts.latency {
            let t = Instant::now();
            call_once(&sup, &payload).await?;
            if i >= counts.latency_warmup {
                samples.push(t.elapsed());
            }
        }
        Ok::<_, BoxError>(samples)
    })
    .await??;
    Stats::of(samples)
}

// ---------------------------------------------------------------------------
// 3. Through the daemon.

struct DaemonFigures {
    /// Calls through a long-lived call session (`Control.CallSession`).
    latency: Stats,
    /// Unary `Control.Call`, one HTTP/2 stream per call.
    unary: Stats,
    /// starting -> ready of restarts through the control API, as the
    /// control client receives the events.
    spawn: Result<Stats>,
    /// The plugin's isolation, from `Inspect`: whether cgroups were on.
    isolation: String,
}

async fn daemon_figures(
    root: &Path,
    bins: &Setup,
    counts: Counts,
    cpus: CpuMode,
) -> Result<DaemonFigures> {
    let dir = root.join("d");
    std::fs::create_dir_all(&dir)?;
    // Stopped by Drop on every path: SIGTERM, then wait.
    let mut daemon = daemon::Daemon::start(bins, &dir, &["echo"])?;
    let mut client = daemon.connect().await?;
    let request = |timeout_ms| pb::CallRequest {
        plugin: "echo".into(),
        method: "echo".into(),
        payload: payload(),
        metadata: HashMap::new(),
        timeout_ms,
        ..Default::default()
    };
    // The first call waits for the plugin to become ready.
    client
        .call(request(30_000))
        .await
        .map_err(|s| format!("{s}; daemon log:\n    {}", daemon.log_tail()))?;
    let check = |reply: &pb::CallResponse| -> Result<()> {
        if reply.payload.len() != PAYLOAD {
            return Err(format!(
                "the daemon answered {} bytes instead of {PAYLOAD}",
                reply.payload.len()
            )
            .into());
        }
        Ok(())
    };
    let unary = {
        let _spin = cpus.hold()?;
        let mut samples = Vec::with_capacity(counts.latency);
        for i in 0..counts.latency_warmup + counts.latency {
            let t = Instant::now();
            let reply = client.call(request(0)).await?.into_inner();
            if i >= counts.latency_warmup {
                samples.push(t.elapsed());
            }
            check(&reply)?;
        }
        Stats::of(samples)?
    };
    // A long-lived control client: one call session for every call.
    let session = plugvisor_cli::control_client::CallSession::connect(daemon.socket()).await?;
    let latency = {
        let _spin = cpus.hold()?;
        let mut samples = Vec::with_capacity(counts.latency);
        for i in 0..counts.latency_warmup + counts.latency {
            let t = Instant::now();
            let reply = session.call(request(0)).await?;
            if i >= counts.latency_warmup {
                samples.push(t.elapsed());
            }
            check(&reply)?;
        }
        Stats::of(samples)?
    };
    let isolation = client
        .inspect(pb::InspectRequest {
            name: "echo".into(),
        })
        .await?
        .into_inner()
        .status
        .and_then(|s| s.isolation)
        .map_or_else(
            || "isolation unknown".to_string(),
            |i| {
                if i.cgroups.is_empty() {
                    format!("{}, cgroups OFF", i.mechanism)
                } else {
                    format!("{}, cgroups on", i.mechanism)
                }
            },
        );
    let spawn = daemon_spawn_ready(&mut client, counts).await;
    Ok(DaemonFigures {
        latency,
        unary,
        spawn,
        isolation,
    })
}

/// Restarts the daemon's echo plugin through the control API and times its
/// `starting` -> `ready` events as a follower of the event stream receives
/// them (both cross the same stream, so its delivery delay cancels out; the
/// events' own stamps are whole milliseconds).
async fn daemon_spawn_ready(client: &mut daemon::Client, counts: Counts) -> Result<Stats> {
    let mut events = client
        .events(pb::EventsRequest {
            plugin: "echo".into(),
            follow: true,
        })
        .await?
        .into_inner();
    let wait = Duration::from_secs(10);
    let mut samples = Vec::with_capacity(counts.restarts);
    for i in 0..counts.restarts + 1 {
        // Let the last start's stragglers finish, and drop the history.
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Ok(Some(e)) = tokio::time::timeout(Duration::ZERO, events.next()).await {
            e?;
        }
        client
            .restart(pb::PluginRequest {
                name: "echo".into(),
                upgrade: false,
            })
            .await?;
        let mut starting = None;
        let ready = loop {
            let e = tokio::time::timeout(wait, events.next())
                .await
                .map_err(|_| "no `ready` event within 10 s of a restart")?
                .ok_or("the daemon's event stream ended")??;
            match e.state.as_str() {
                "starting" => starting = Some(Instant::now()),
                "ready" if starting.is_some() => break Instant::now(),
                "failed" => return Err(format!("echo failed: {}", e.reason).into()),
                _ => {}
            }
        };
        // The first restart warms up (page cache, allocator); not counted.
        if let (Some(s), true) = (starting, i > 0) {
            samples.push(ready - s);
        }
    }
    Stats::of(samples)
}

// ---------------------------------------------------------------------------
// 4. Concurrent callers.

/// Calls/s of one caller and of `CALLERS` concurrent callers, each caller
/// making the same number of calls.
async fn concurrent(sup: &Supervisor, counts: Counts) -> Result<(f64, f64)> {
    async fn burst(sup: &Supervisor, callers: usize, total: usize) -> Result<Duration> {
        let per = total / callers;
        let start = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let sup = sup.clone();
                tokio::spawn(async move {
                    let payload = payload();
                    for _ in 0..per {
                        call_once(&sup, &payload).await?;
                    }
                    Ok::<_, BoxError>(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        Ok(start.elapsed())
    }
    burst(sup, CALLERS, counts.concurrent_calls / 10).await?;
    let per = counts.concurrent_calls / CALLERS;
    let one = burst(sup, 1, per).await?;
    let all = burst(sup, CALLERS, per * CALLERS).await?;
    Ok((
        per as f64 / one.as_secs_f64(),
        (per * CALLERS) as f64 / all.as_secs_f64(),
    ))
}

// ---------------------------------------------------------------------------
// 5. HandleStream.

/// Streams `total` bytes through `echo` and checks every byte came back;
/// returns the time until the last byte was back (checking excluded).
async fn stream_once(sup: &Supervisor, total: usize) -> Result<Duration> {
    let chunks: Vec<Bytes> = (0..total / STREAM_CHUNK)
        .map(|i| Bytes::from(vec![(i % 251) as u8; STREAM_CHUNK]))
        .collect();
    let input = tokio_stream::iter(chunks.clone().into_iter().map(Ok));
    let start = Instant::now();
    let output = sup
        .call_stream("echo", "echo", HashMap::new(), input, None)
        .await?;
    tokio::pin!(output);
    let mut received = Vec::with_capacity(chunks.len());
    let mut bytes = 0usize;
    while let Some(chunk) = output.next().await {
        let chunk = chunk?;
        bytes += chunk.len();
        received.push(chunk);
    }
    let elapsed = start.elapsed();
    if bytes != total {
        return Err(format!("HandleStream echoed {bytes} bytes of {total}").into());
    }
    // Same bytes in the same order, whatever the re-chunking.
    let sent = chunks.iter().flat_map(|c| c.iter());
    let back = received.iter().flat_map(|c| c.iter());
    if !sent.eq(back) {
        return Err("HandleStream echoed different bytes than were sent".into());
    }
    Ok(elapsed)
}

/// Median and best GB/s (10^9 bytes of payload per second, each byte sent
/// and received back).
async fn stream(sup: &Supervisor, counts: Counts) -> Result<(f64, f64)> {
    stream_once(sup, 8 * STREAM_CHUNK).await?;
    let mut rates = Vec::new();
    for _ in 0..counts.stream_reps {
        let elapsed = stream_once(sup, STREAM_TOTAL).await?;
        rates.push(STREAM_TOTAL as f64 / elapsed.as_secs_f64() / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    Ok((rates[rates.len() / 2], rates[rates.len() - 1]))
}

// ---------------------------------------------------------------------------
// Events.

/// Drops every event already queued.
fn drain(events: &mut broadcast::Receiver<Event>) {
    while !matches!(
        events.try_recv(),
        Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed)
    ) {}
}

/// The next event of `plugin` that `want` accepts, and when it was received.
async fn next_event(
    events: &mut broadcast::Receiver<Event>,
    plugin: &str,
    want: impl Fn(&Event) -> bool,
    timeout: Duration,
) -> Result<(Event, Instant)> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => {
                return Err(format!(
                    "no awaited event of `{plugin}` within {}s",
                    timeout.as_secs()
                )
                .into());
            }
            Ok(Ok(e)) => {
                let at = Instant::now();
                if e.plugin == plugin && want(&e) {
                    return Ok((e, at));
                }
                if e.plugin == plugin && e.state == PluginState::Failed {
                    return Err(format!("`{plugin}` failed: {}", e.reason).into());
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) => {
                return Err("the supervisor's event channel closed".into());
            }
        }
    }
}

fn since(later: SystemTime, earlier: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// 6. spawn -> ready.

struct SpawnFigures {
    total: Stats,
    handshake: Stats,
    initialize: Stats,
    /// Running the plugin executable without the handshake environment: it
    /// prints "this is a plugvisor plugin" and exits 1. The cost of fork,
    /// exec, loading and process exit, with no runtime or socket.
    exec_floor: Stats,
}

async fn spawn_ready(
    sup: &Supervisor,
    setup: &Setup,
    events: &mut broadcast::Receiver<Event>,
    counts: Counts,
) -> Result<SpawnFigures> {
    let wait = Duration::from_secs(10);
    let (mut total, mut handshake, mut initialize) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..counts.restarts + 1 {
        sup.wait_ready("echo", wait).await?;
        // Let the last start's and stop's stragglers (exiting child, output
        // readers) finish before the next one is timed.
        tokio::time::sleep(Duration::from_millis(20)).await;
        drain(events);
        sup.restart("echo").await?;
        let is = |s: PluginState| move |e: &Event| e.state == s;
        let (starting, _) = next_event(events, "echo", is(PluginState::Starting), wait).await?;
        let (init, _) = next_event(events, "echo", is(PluginState::Initializing), wait).await?;
        let (ready, _) = next_event(events, "echo", is(PluginState::Ready), wait).await?;
        // The first restart warms up (page cache, allocator); not counted.
        if i > 0 {
            total.push(since(ready.time, starting.time));
            handshake.push(since(init.time, starting.time));
            initialize.push(since(ready.time, init.time));
        }
    }
    let echo = setup.echo.clone();
    let n = counts.restarts;
    let exec_floor = tokio::task::spawn_blocking(move || {
        let mut samples = Vec::with_capacity(n);
        for i in 0..n + 1 {
            let t = Instant::now();
            std::process::Command::new(&echo)
                .env_clear()
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()?;
            if i > 0 {
                samples.push(t.elapsed());
            }
        }
        Ok::<_, std::io::Error>(samples)
    })
    .await??;
    Ok(SpawnFigures {
        total: Stats::of(total)?,
        handshake: Stats::of(handshake)?,
        initialize: Stats::of(initialize)?,
        exec_floor: Stats::of(exec_floor)?,
    })
}

// ---------------------------------------------------------------------------
// 7. crash -> event, crash -> ready.

struct CrashFigures {
    event: Stats,
    /// SIGKILL until the process is gone (its pidfd readable), as seen by a
    /// thread of ours polling its own pidfd: the kernel's share.
    exit: Stats,
    /// Process gone until the supervisor stamped the backoff event.
    stamped: Stats,
    /// Event stamped until this task received it (broadcast wake-up).
    delivered: Stats,
    /// Backoff event until the restart's starting event (the backoff sleep).
    slept: Stats,
    /// Starting until ready, for these restarts.
    restarted: Stats,
    /// SIGKILL until Initialize was sent (the `initializing` event), minus
    /// the backoff: how late the backoff's timer fired, and what of the
    /// start was not done during the backoff.
    initialize_late: Stats,
    /// Initialize sent until ready.
    initialized: Stats,
    ready_minus_backoff: Stats,
}

async fn crashes(
    sup: &Supervisor,
    events: &mut broadcast::Receiver<Event>,
    counts: Counts,
) -> Result<CrashFigures> {
    let wait = Duration::from_secs(10);
    let (mut to_event, mut to_exit, mut to_ready) = (Vec::new(), Vec::new(), Vec::new());
    let (mut stamped, mut delivered) = (Vec::new(), Vec::new());
    let (mut slept, mut restarted) = (Vec::new(), Vec::new());
    let (mut initialize_late, mut initialized) = (Vec::new(), Vec::new());
    for _ in 0..counts.crashes {
        sup.wait_ready("echo", wait).await?;
        let pid = sup
            .info("echo")?
            .pid
            .ok_or("the ready echo plugin has no pid")?;
        let pidfd = pidfd::open(pid)?;
        let gone = tokio::task::spawn_blocking(move || pidfd::wait(&pidfd, 10_000));
        // Settle: the start's stragglers finish, the watcher reaches poll().
        tokio::time::sleep(Duration::from_millis(20)).await;
        drain(events);
        let t0_wall = SystemTime::now();
        let t0 = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let (first, at) = next_event(events, "echo", |_| true, wait).await?;
        if first.state != PluginState::Backoff {
            return Err(format!(
                "after SIGKILL the first event was `{}` ({}), not `backoff`",
                first.state, first.reason
            )
            .into());
        }
        to_event.push(at - t0);
        let gone = gone
            .await??
            .ok_or("the killed child did not exit within 10 s")?;
        let gone = gone.saturating_duration_since(t0);
        to_exit.push(gone);
        let stamp = since(first.time, t0_wall);
        stamped.push(stamp.saturating_sub(gone));
        delivered.push((at - t0).saturating_sub(stamp));
        let (starting, _) =
            next_event(events, "echo", |e| e.state == PluginState::Starting, wait).await?;
        let (initializing, _) = next_event(
            events,
            "echo",
            |e| e.state == PluginState::Initializing,
            wait,
        )
        .await?;
        let (ready, ready_at) =
            next_event(events, "echo", |e| e.state == PluginState::Ready, wait).await?;
        slept.push(since(starting.time, first.time));
        restarted.push(since(ready.time, starting.time));
        let backoff = first.detail.delay.unwrap_or(BACKOFF);
        initialize_late.push(since(initializing.time, t0_wall).saturating_sub(backoff));
        initialized.push(since(ready.time, initializing.time));
        to_ready.push((ready_at - t0).saturating_sub(backoff));
    }
    Ok(CrashFigures {
        event: Stats::of(to_event)?,
        exit: Stats::of(to_exit)?,
        stamped: Stats::of(stamped)?,
        delivered: Stats::of(delivered)?,
        slept: Stats::of(slept)?,
        restarted: Stats::of(restarted)?,
        initialize_late: Stats::of(initialize_late)?,
        initialized: Stats::of(initialized)?,
        ready_minus_backoff: Stats::of(to_ready)?,
    })
}

/// A pidfd of our own, to see when a process is gone.
mod pidfd {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Instant;

    pub fn open(pid: i32) -> std::io::Result<OwnedFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor; nobody else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Blocks until the process exits (the pidfd turns readable); when, or
    /// None after `timeout_ms`.
    pub fn wait(fd: &OwnedFd, timeout_ms: i32) -> std::io::Result<Option<Instant>> {
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd that outlives the call.
            let rc = unsafe { libc::poll(&mut poll, 1, timeout_ms) };
            let at = Instant::now();
            match rc {
                1 => return Ok(Some(at)),
                0 => return Ok(None),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 8. Memory.

struct MemoryFigures {
    plugins: usize,
    base_kib: u64,
    after_kib: u64,
    base_anon_kib: u64,
    after_anon_kib: u64,
    child_kib: Option<u64>,
}

impl MemoryFigures {
    fn per_plugin_mib(&self) -> f64 {
        self.after_kib.saturating_sub(self.base_kib) as f64 / 1024.0 / self.plugins as f64
    }

    fn report(&self, table: &mut Table) {
        let base = self.base_kib as f64 / 1024.0;
        let per = self.per_plugin_mib();
        table.push(Row::new(
            "8  supervisor memory (bench process VmRSS): base",
            format!("{base:.1} MiB"),
            "<= 20 MiB",
            Verdict::at_most(base, 20.0),
        ));
        table.push(Row::new(
            format!("   per plugin ({} echo plugins ready)", self.plugins),
            format!(
                "{per:.3} MiB/plugin ({:.1} MiB total)",
                self.after_kib as f64 / 1024.0
            ),
            "<= 0.5 MiB/plugin",
            Verdict::at_most(per, 0.5),
        ));
        table.push(Row::new(
            "   RssAnon base / per plugin",
            format!(
                "{:.1} MiB / {:.3} MiB",
                self.base_anon_kib as f64 / 1024.0,
                self.after_anon_kib.saturating_sub(self.base_anon_kib) as f64
                    / 1024.0
                    / self.plugins as f64
            ),
            "info",
            Verdict::Info,
        ));
        if let Some(kib) = self.child_kib {
            table.push(Row::new(
                "   one echo-plugin child's VmRSS",
                format!("{:.1} MiB", kib as f64 / 1024.0),
                "info (not supervisor)",
                Verdict::Info,
            ));
            table.json("echo_child_rss_mib", kib as f64 / 1024.0);
        }
        table.json("memory_base_mib", base);
        table.json("memory_per_plugin_mib", per);
        table.json("memory_plugins", self.plugins as f64);
    }
}

/// A `/proc/<pid>/status` field in KiB (`self` for this process).
fn proc_status_kib(pid: &str, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

async fn memory(root: &Path, bins: &Setup, counts: Counts) -> Result<MemoryFigures> {
    let sup = Supervisor::new(SupervisorOptions::new(root.join("m")))?;
    let result = memory_with(&sup, root, bins, counts).await;
    sup.shutdown().await;
    result
}

async fn memory_with(
    sup: &Supervisor,
    root: &Path,
    bins: &Setup,
    counts: Counts,
) -> Result<MemoryFigures> {
    let names: Vec<String> = (0..counts.memory_plugins)
        .map(|i| format!("m{i:03}"))
        .collect();
    let manifests = names
        .iter()
        .map(|n| write_manifest(&root.join("mp"), n, bins, ""))
        .collect::<Result<Vec<_>>>()?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let base_kib = proc_status_kib("self", "VmRSS")?;
    let base_anon_kib = proc_status_kib("self", "RssAnon")?;
    for m in manifests {
        sup.add(m, &Default::default())?;
    }
    for n in &names {
        sup.wait_ready(n, Duration::from_secs(60)).await?;
    }
    // Let the starts' transient buffers go.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_kib = proc_status_kib("self", "VmRSS")?;
    let after_anon_kib = proc_status_kib("self", "RssAnon")?;
    let child_kib = sup
        .info(&names[0])?
        .pid
        .and_then(|pid| proc_status_kib(&pid.to_string(), "VmRSS").ok());
    Ok(MemoryFigures {
        plugins: names.len(),
        base_kib,
        after_kib,
        base_anon_kib,
        after_anon_kib,
        child_kib,
    })
}

// ---------------------------------------------------------------------------

/// Section 10's rows: the supervisor's costs and the plugins' costs apart.
fn report_fleet(
    f: &fleet::FleetFigures,
    daemon_p50: Option<Duration>,
    cpus: CpuMode,
    table: &mut Table,
) {
    let n = f.plugins;
    let mib = |kib: u64| kib as f64 / 1024.0;
    table.push(Row::new(
        format!("10 {n} echo plugins in one daemon: host limits"),
        f.limits.clone(),
        "checked first",
        Verdict::Info,
    ));
    table.push(Row::new(
        "   each plugin's isolation (from inspect)",
        f.isolation.clone(),
        "info",
        Verdict::Info,
    ));
    table.push(Row::new(
        format!("   all {n} ready, from one reload"),
        format!(
            "{:.2} s ({:.2} ms per plugin)",
            f.ready_in.as_secs_f64(),
            f.ready_in.as_secs_f64() * 1e3 / n as f64
        ),
        "info: all ready fast",
        Verdict::Info,
    ));
    let budget = 20.0 + 0.5 * n as f64;
    table.push(Row::new(
        "   supervisor (daemon) VmRSS: no plugins / all ready",
        format!(
            "{:.1} MiB / {:.1} MiB ({:.3} MiB per plugin)",
            mib(f.base_rss_kib),
            mib(f.rss_kib),
            mib(f.rss_kib.saturating_sub(f.base_rss_kib)) / n as f64
        ),
        format!("<= 20 MiB + 0.5 MiB x {n} = {budget:.0} MiB"),
        Verdict::at_most(mib(f.rss_kib), budget),
    ));
    table.push(Row::new(
        "   plugins: one echo child's VmRSS x N / sum of Pss",
        format!(
            "{:.1} MiB x {n} = {:.0} MiB / {:.0} MiB ({} processes)",
            mib(f.child_rss_kib),
            mib(f.child_rss_kib) * n as f64,
            mib(f.plugins_pss_kib),
            f.plugin_processes
        ),
        "info (not supervisor)",
        Verdict::Info,
    ));
    table.push(Row::new(
        format!(
            "   CPU at rest over {:.0} s: supervisor / all plugins",
            f.rest.as_secs_f64()
        ),
        format!(
            "{:.1}% / {:.1}% of one CPU",
            f.cpu_percent, f.plugins_cpu_percent
        ),
        "info",
        Verdict::Info,
    ));
    table.push(Row::new(
        "   health checks failed (metrics) / restarts",
        format!("{} / {}", f.health_failures, f.restarts),
        "0 missed deadlines",
        Verdict::at_most(f.health_failures + f.restarts as f64, 0.0),
    ));
    table.push(Row::new(
        format!(
            "   `plugvisor ps` (real CLI, exec to exit), {} runs",
            f.ps_runs
        ),
        format!(
            "p50 {} / worst {}",
            stats::fmt_ms(f.ps.p50),
            stats::fmt_ms(f.ps_worst)
        ),
        "p50 <= 100 ms",
        Verdict::at_most(f.ps.p50.as_secs_f64() * 1e3, 100.0),
    ));
    let r = daemon_p50.map(|d| f.call.p50.as_secs_f64() / d.as_secs_f64());
    table.push(
        Row::new(
            "   Handle 64 B to one of them, daemon call session: p50 / p99",
            f.call.p50_p99(),
            "-",
            Verdict::Info,
        )
        .cpus(cpus.label()),
    );
    table.push(
        Row::new(
            "   its p50 / the 1-plugin daemon p50 (figure 3)",
            ratio_text(r, "1 plugin"),
            "<= 1.5x",
            ratio_at_most(r, 1.5),
        )
        .cpus(cpus.label()),
    );
    table.push(Row::new(
        "   stop: SIGTERM -> daemon exited, every plugin stopped",
        format!(
            "{:.2} s, {} process(es) left to kill",
            f.stop.as_secs_f64(),
            f.leftovers
        ),
        "always cleaned up",
        Verdict::at_most(f.leftovers as f64, 0.0),
    ));
    table.json("fleet_plugins", n as f64);
    table.json("fleet_ready_s", f.ready_in.as_secs_f64());
    table.json("fleet_supervisor_rss_mib", mib(f.rss_kib));
    table.json("fleet_supervisor_base_rss_mib", mib(f.base_rss_kib));
    table.json("fleet_child_rss_mib", mib(f.child_rss_kib));
    table.json("fleet_plugins_pss_mib", mib(f.plugins_pss_kib));
    table.json("fleet_supervisor_cpu_percent", f.cpu_percent);
    table.json("fleet_plugins_cpu_percent", f.plugins_cpu_percent);
    table.json("fleet_health_failures", f.health_failures);
    table.json("fleet_ps_p50_ms", f.ps.p50.as_secs_f64() * 1e3);
    table.json("fleet_call_p50_us", f.call.p50_us());
    if let Some(r) = r {
        table.json("fleet_call_over_one_plugin_p50", r);
    }
}

/// The bench's temporary directory, on a tmpfs when there is one: the
/// supervisor's runtime dir (plugin sockets) is `/run/plugvisor` or
/// `$XDG_RUNTIME_DIR/plugvisor` in production, a tmpfs on a normal host, and
/// on a disk file system every start and exit pays for the socket
/// directory's journaled mkdir/rmdir. Paths stay short: a Unix socket path
/// must fit in 107 bytes.
fn temp_root() -> Result<(tempfile::TempDir, String)> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    // The file system type of the mount holding `dir` (longest prefix).
    let fs_of = |dir: &Path| {
        mounts
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (_, point, fs) = (f.next()?, f.next()?, f.next()?);
                dir.starts_with(point)
                    .then(|| (point.len(), fs.to_string()))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, fs)| fs)
            .unwrap_or_else(|| "unknown fs".into())
    };
    let candidates = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/run", "/dev/shm"].map(PathBuf::from));
    for dir in candidates {
        if dir.is_dir()
            && fs_of(&dir) == "tmpfs"
            && let Ok(tmp) = tempfile::Builder::new().prefix("pvb").tempdir_in(&dir)
        {
            return Ok((tmp, "tmpfs".into()));
        }
    }
    let tmp = tempfile::Builder::new().prefix("pvb").tempdir_in("/tmp")?;
    let fs = format!("{}, no tmpfs found", fs_of(Path::new("/tmp")));
    Ok((tmp, fs))
}

/// The 1-minute load average, as text.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// 123456.7 -> "123,457".
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
