//! `testplugin`: a plugvisor plugin whose misbehaviour is chosen by its
//! arguments (the manifest's `args`), for the supervisor's own tests.
//!
//! Start-up faults (flags):
//!
//! | flag | effect |
//! |---|---|
//! | `--junk N` | print N lines `junk line <i> before handshake` on stdout first |
//! | `--no-handshake` | never print the handshake; sleep until killed |
//! | `--wrong-path` | announce `<assigned path>.wrong` instead of the assigned path |
//! | `--bad-version` | announce protocol version 99 |
//! | `--ignore-sigterm` | ignore SIGTERM; `Shutdown` replies but does nothing |
//! | `--double-fork` | leave a grandchild in the process group (see `fork.rs`) |
//! | `--init-sleep-ms N` | sleep N ms in `Initialize` |
//! | `--exit-immediately N` | exit with code N before the handshake |
//! | `--init-fail` | `Initialize` fails with FAILED_PRECONDITION |
//! | `--ignore-cookie` | serve without checking `PLUGVISOR_MAGIC_COOKIE` |
//! | `--ignore-shutdown` | `Shutdown` replies but does nothing (SIGTERM still works) |
//!
//! Protocol faults, for `plugvisor conformance` (see `plugin.rs`'s [`Faults`]):
//! `--unknown-ok`, `--forget-state`, `--no-stream`, `--stream-fail`,
//! `--not-serving`, `--phantom-method`.
//!
//! Methods are listed in `plugin.rs`.

mod fork;
mod isolation;
mod plugin;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use plugvisor_proto::handshake;
use plugvisor_sdk::{HandshakeEnv, ServeError, ServeOptions};

use crate::plugin::{Faults, TestPlugin};

/// The command line, parsed.
#[derive(Debug, Default)]
struct Args {
    junk: u64,
    no_handshake: bool,
    wrong_path: bool,
    bad_version: bool,
    ignore_sigterm: bool,
    ignore_shutdown: bool,
    ignore_cookie: bool,
    double_fork: bool,
    exit_immediately: Option<i32>,
    faults: Faults,
}

const USAGE: &str = "usage: testplugin [--junk N] [--no-handshake] [--wrong-path] [--bad-version] \
                     [--ignore-sigterm] [--double-fork] [--init-sleep-ms N] \
                     [--exit-immediately N] [--init-fail] [--ignore-cookie] [--ignore-shutdown] \
                     [--unknown-ok] [--forget-state] [--no-stream] [--stream-fail] \
                     [--not-serving] [--phantom-method]";

impl Args {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            // Accept both `--flag N` and `--flag=N`.
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let mut value = |what: &str| -> Result<String, String> {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| format!("{flag} needs {what}"))
            };
            fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
                v.parse()
                    .map_err(|_| format!("{flag}: `{v}` is not a valid number"))
            }
            match flag.as_str() {
                "--junk" => parsed.junk = num(&flag, value("a line count")?)?,
                "--no-handshake" => parsed.no_handshake = true,
                "--wrong-path" => parsed.wrong_path = true,
                "--bad-version" => parsed.bad_version = true,
                "--ignore-sigterm" => parsed.ignore_sigterm = true,
                "--double-fork" => parsed.double_fork = true,
                "--init-fail" => parsed.faults.init_fail = true,
                "--ignore-cookie" => parsed.ignore_cookie = true,
                "--ignore-shutdown" => parsed.ignore_shutdown = true,
                "--unknown-ok" => parsed.faults.unknown_ok = true,
                "--forget-state" => parsed.faults.forget_state = true,
                "--no-stream" => parsed.faults.no_stream = true,
                "--claim-stream" => parsed.faults.claim_stream = true,
                "--stream-fail" => parsed.faults.stream_fail = true,
                "--not-serving" => parsed.faults.not_serving = true,
                "--phantom-method" => parsed.faults.phantom_method = true,
                "--validate-hang" => parsed.faults.validate_hang = true,
                "--validate-silent" => parsed.faults.validate_silent = true,
                "--init-sleep-ms" => {
                    let ms = num(&flag, value("milliseconds")?)?;
                    parsed.faults.init_sleep = Duration::from_millis(ms);
                }
                "--exit-immediately" => {
                    parsed.exit_immediately = Some(num(&flag, value("an exit code")?)?)
                }
                _ => return Err(format!("unknown argument `{arg}`")),
            }
        }
        Ok(parsed)
    }
}

fn main() -> ExitCode {
    let mut args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(why) => {
            eprintln!("testplugin: {why}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // The environment can ask for a phantom method too: a plugin whose
    // methods depend on something other than its binary and arguments.
    if std::env::var_os("TESTPLUGIN_PHANTOM_METHOD").is_some() {
        args.faults.phantom_method = true;
    }

    // Before any thread exists: forking a multi-threaded process is unsafe.
    let grandchild = if args.double_fork {
        match fork::double_fork() {
            Ok(pid) => Some(pid),
            Err(e) => {
                eprintln!("testplugin: --double-fork failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };

    if let Some(code) = args.exit_immediately {
        eprintln!("testplugin: exiting with code {code} before the handshake, as asked");
        std::process::exit(code);
    }

    let env = if args.ignore_cookie {
        env_without_cookie_check()
    } else {
        HandshakeEnv::from_env().map_err(|e| e.to_string())
    };
    let env = match env {
        Ok(env) => env,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::FAILURE;
        }
    };

    if args.junk > 0 {
        let mut out = std::io::stdout().lock();
        for i in 1..=args.junk {
            // Ignoring write errors: a closed stdout shows up at the handshake.
            let _ = writeln!(out, "junk line {i} before handshake");
        }
        let _ = out.flush();
    }

    if args.no_handshake {
        eprintln!("testplugin: never sending the handshake, as asked");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }

    if args.ignore_sigterm {
        // SAFETY: setting a signal disposition to SIG_IGN installs no handler
        // code, and no other thread exists yet to race with.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("testplugin: failed to start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let plugin = TestPlugin::new(args.faults.clone(), grandchild);
    match runtime.block_on(run(env, &args, plugin)) {
        // Exit without waiting for the runtime's tasks, like `plugvisor_sdk::main`.
        Ok(()) => std::process::exit(0),
        Err(err) => {
            eprintln!("testplugin: {err}");
            std::process::exit(1)
        }
    }
}

/// `--ignore-cookie`: the handshake environment read the way a careless
/// plugin would, trusting the socket path without the magic cookie.
fn env_without_cookie_check() -> Result<HandshakeEnv, String> {
    let socket = std::env::var_os(handshake::ENV_SOCKET)
        .filter(|s| !s.is_empty())
        .ok_or("testplugin: --ignore-cookie still needs PLUGVISOR_PLUGIN_SOCKET")?;
    Ok(HandshakeEnv {
        socket_path: socket.into(),
        protocol_versions: vec![handshake::PROTOCOL_VERSION],
        plugin_name: std::env::var(handshake::ENV_NAME).ok(),
    })
}

/// Binds, announces (possibly wrongly) and serves.
async fn run(env: HandshakeEnv, args: &Args, plugin: TestPlugin) -> Result<(), ServeError> {
    plugvisor_sdk::init_logging();
    let listener = env.bind()?;
    let mut handshake = env.handshake();
    if args.wrong_path {
        handshake.address.push_str(".wrong");
    }
    if args.bad_version {
        handshake.protocol_version = 99;
    }
    let options = ServeOptions {
        handle_signals: !args.ignore_sigterm,
        honor_shutdown_rpc: !(args.ignore_sigterm || args.ignore_shutdown),
        handshake: Some(handshake),
        ..ServeOptions::default()
    };
    let result =
        plugvisor_sdk::serve_listener(plugin, listener, options, std::future::pending()).await;
    let _ = std::fs::remove_file(&env.socket_path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        Args::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_every_flag() {
        let a = parse(&[
            "--junk",
            "3",
            "--no-handshake",
            "--wrong-path",
            "--bad-version",
            "--ignore-sigterm",
            "--double-fork",
            "--init-sleep-ms=250",
            "--exit-immediately",
            "7",
            "--init-fail",
            "--ignore-cookie",
            "--ignore-shutdown",
            "--unknown-ok",
            "--forget-state",
            "--no-stream",
            "--stream-fail",
            "--not-serving",
            "--phantom-method",
            "--validate-hang",
            "--validate-silent",
        ])
        .unwrap();
        assert_eq!(a.junk, 3);
        assert!(a.no_handshake && a.wrong_path && a.bad_version);
        assert!(a.ignore_sigterm && a.double_fork && a.faults.init_fail);
        assert_eq!(a.faults.init_sleep, Duration::from_millis(250));
        assert_eq!(a.exit_immediately, Some(7));
        assert!(a.ignore_cookie && a.ignore_shutdown);
        let f = &a.faults;
        assert!(f.unknown_ok && f.forget_state && f.no_stream && f.stream_fail);
        assert!(f.not_serving && f.phantom_method);
        assert!(f.validate_hang && f.validate_silent);
    }

    #[test]
    fn rejects_unknown_flags_and_missing_values() {
        assert!(
            parse(&["--frobnicate"])
                .unwrap_err()
                .contains("--frobnicate")
        );
        assert!(parse(&["--junk"]).unwrap_err().contains("needs"));
        assert!(parse(&["--junk", "x"]).unwrap_err().contains("`x`"));
    }
}
