//! The `plugvisor` binary's library: everything the daemon and the CLI add
//! on top of the embeddable [`plugvisor`] core.
//!
//! # Layout
//!
//! - [`cli`]: the command line (clap), one function per verb.
//! - [`daemon`]: `plugvisor run`: discovery, the control server, signals.
//! - [`control`]: the gRPC control API the CLI talks to, and its client.
//! - [`control_client`]: the client's transport: reconnects, and sends a
//!   call the daemon never processed again, once.
//! - [`call_session`]: `Control.CallSession`, many calls on one stream:
//!   the daemon's side and the client.
//! - [`follow`]: `logs -f` / `events -f` carrying on across `upgrade-self`.
//! - [`connections`]: the control server's open connections, closed at shutdown.
//! - [`reload`]: re-reading plugins_dir and the config on `reload` / SIGHUP.
//! - [`metrics_http`]: the Prometheus `/metrics` endpoint.
//! - [`notify`]: sd_notify for systemd's `Type=notify` and watchdog.
//! - [`conformance`]: checks one plugin against the protocol, rule by rule.
//! - [`stream`]: `call --stream`, chunked through `Control.CallStream`.
//! - [`upgrade_self`]: `plugvisor upgrade-self` / SIGUSR2, replacing the
//!   daemon with a new binary while every plugin keeps running.
//! - [`top`]: `plugvisor top`, the live full-screen view.
//! - [`new`]: `plugvisor new`, plugin skeletons in Rust, Python and Go.
//! - [`sign`]: `plugvisor keygen` and `plugvisor sign`, signed plugins.
//! - [`progress`]: live step lines for long verbs, and terminal colours.
//! - [`survivors`]: the guard the daemon leaves behind for its survivors.

pub mod call_session;
pub mod capability;
pub mod cli;
pub mod conformance;
pub mod connections;
pub mod control;
pub mod control_client;
pub mod daemon;
pub mod follow;
pub mod health_tcp;
pub mod metrics_http;
pub mod new;
pub mod notify;
pub mod progress;
pub mod registry;
pub mod reload;
pub mod sign;
pub mod stream;
pub mod survivors;
pub mod tenant;
pub mod tenant_cmd;
pub mod top;
pub mod upgrade_self;
