//! Write plugvisor plugins in Rust: implement [`Plugin`], call [`main`].
//!
//! A complete plugin:
//!
//! ```no_run
//! use plugvisor_sdk::{Plugin, Request, Response, Status, async_trait, unknown_method};
//!
//! struct Echo;
//!
//! #[async_trait]
//! impl Plugin for Echo {
//!     async fn handle(&self, req: Request) -> Result<Response, Status> {
//!         match req.method.as_str() {
//!             "echo" => Ok(Response::new(req.payload)),
//!             other => Err(unknown_method(other)),
//!         }
//!     }
//! }
//!
//! fn main() {
//!     plugvisor_sdk::main(Echo)
//! }
//! ```
//!
//! [`main`] does the supervisor handshake (protocol section 3 of the spec):
//! it refuses to run without the supervisor's magic cookie, listens on the
//! socket in `PLUGVISOR_PLUGIN_SOCKET`, prints `plugvisor|1|unix|<path>` on
//! stdout, serves the `plugvisor.v1.Plugin` and `grpc.health.v1.Health`
//! services, and on a `Shutdown` RPC, SIGTERM or SIGINT drains in-flight
//! calls and exits 0. Logs go to stderr (see [`init_logging`]); stdout
//! carries only the handshake line.
//!
//! # Layout
//!
//! - [`Plugin`] and its plain types ([`Request`], [`Response`],
//!   [`InitContext`], [`Health`], [`StateSnapshot`]) live in `plugin.rs`.
//! - `service.rs` turns the gRPC services into calls on a [`Plugin`].
//! - [`serve`], [`serve_with`], [`serve_listener`] and [`HandshakeEnv`] run
//!   a plugin (`serve.rs`).
//! - [`testing::Harness`] runs a plugin in-process for tests, no supervisor.
//!
//! # Methods and errors
//!
//! A plugin answers each method it knows and returns [`unknown_method`]
//! (status `UNIMPLEMENTED`) for the rest. Any [`Status`] a plugin returns
//! reaches the caller unchanged.

mod plugin;
mod serve;
mod service;
mod stream_wire;
pub mod testing;
pub mod tls;

use std::io::IsTerminal;

pub use plugin::{
    ByteStream, Bytes, Health, InitContext, Plugin, Request, Response, StateSnapshot,
    unknown_method,
};
pub use serve::{HandshakeEnv, ServeError, ServeOptions, serve, serve_listener, serve_with};
pub use tokio_stream::{Stream, StreamExt};
pub use tonic::async_trait;
pub use tonic::{Code, Status};

/// Runs `plugin` as a plugvisor plugin and exits: 0 after a clean shutdown,
/// 1 (with the reason on stderr) if it could not start or serve.
///
/// Builds a single-threaded Tokio runtime and runs [`serve`] on it: a
/// plugin answers calls on one thread (calls still run concurrently as
/// tasks), starts faster, costs one thread against its `pids` limit, and
/// avoids waking threads across cores for each call. Handlers that do
/// blocking or CPU-heavy work should use `tokio::task::spawn_blocking`; a
/// plugin that wants several worker threads builds its own runtime and
/// calls [`serve`].
pub fn main<P: Plugin>(plugin: P) -> ! {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(source) => exit_with(&ServeError::Runtime { source }),
    };
    match runtime.block_on(serve(plugin)) {
        // Exit without dropping the runtime: a call that ignored the drain
        // deadline must not keep the process alive.
        Ok(()) => std::process::exit(0),
        Err(err) => exit_with(&err),
    }
}

fn exit_with(err: &ServeError) -> ! {
    match err {
        // Already a complete, friendly explanation.
        ServeError::NotStartedBySupervisor => eprintln!("{err}"),
        _ => eprintln!("plugin failed: {err}"),
    }
    std::process::exit(1)
}

/// Sends `tracing` output to stderr, filtered by `RUST_LOG` (default
/// `info`): JSON lines (one object per event, fields flattened) when stderr
/// is not a terminal, so the supervisor can keep levels and fields; human
/// text on a terminal. Does nothing if a global subscriber is already set.
/// [`serve`] calls it.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init` fails only when a subscriber is already installed, which is fine.
    let _ = if std::io::stderr().is_terminal() {
        builder.try_init()
    } else {
        builder.json().flatten_event(true).try_init()
    };
}
