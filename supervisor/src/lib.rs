//! plugvisor: a process-isolated plugin supervisor.
//!
//! Plugins are executables that serve the `plugvisor.v1.Plugin` gRPC service
//! on a Unix socket. The supervisor discovers them from manifests, starts each
//! as a child process, checks its handshake and socket peer, initializes it,
//! routes calls to it, and restarts it with backoff when it crashes.
//!
//! # Layout
//!
//! - [`manifest`], [`config`], [`units`]: what to run, parsed strictly.
//! - [`process`]: spawning, pidfds, reaping (every OS effect of a child).
//! - [`instance`]: one child's start (handshake, connect, Initialize) and stop.
//! - [`isolation`]: cgroups (v1, v2), rlimits, binary pinning, and the
//!   sandbox: own uid, no capabilities, seccomp, a PID namespace.
//! - [`policy`]: the restart policy as pure functions of time;
//!   [`autoscale`]: the autoscaling policy, and its task.
//! - [`supervisor`]: the public API (the facade) and the call paths. Behind
//!   it, per plugin, one coordinator (`plugin`: owns what the plugin should
//!   run, runs operations that span replicas) and one actor per replica
//!   (`actor`: owns its child), with `upgrade` (all-or-nothing upgrades),
//!   `replica` (the steps of a replica's life), `spec` (what a replica
//!   runs), `routing` (where calls go and admission), `session` (calls
//!   multiplexed on long-lived streams), `host` (what every plugin shares)
//!   and [`status`] (states, events, the published view).
//! - [`ratelimit`]: `calls.rate` token buckets, checked before admission;
//!   [`capability`]: who provides what, and which provider a call by
//!   capability goes to.
//! - [`tenant`]: per-tenant instances (`<plugin>@<tenant>`) and the
//!   metadata cache by executable checksum.
//! - [`container`]: plugins that are OCI images (podman) or bundles (runc).
//! - [`hooks`]: lifecycle hooks (pre-start, post-ready, pre-stop,
//!   post-exit).
//! - [`metrics`]: the Prometheus registry the supervisor feeds.
//! - [`state`]: atomic state snapshots.
//! - [`logs`]: plugin output capture; [`transport`]: gRPC over Unix sockets;
//!   `stream_wire`: `HandleStream` without copying chunks.
//! - [`handover`]: handing the running supervisor over to a new image of
//!   itself (`plugvisor upgrade-self`), every plugin left running.
//! - [`dependencies`]: `requires:`, start order, waiting, crash propagation.
//! - [`signature`]: signed plugins (minisign over a list of sha256 sums).
//! - [`rundir`]: the runtime directory, created and checked so no other
//!   user can plant or replace a socket in it.
//!
//! The daemon, its control API and the CLI are the `plugvisor-cli` crate;
//! this one has no CLI dependencies.
//!
//! # Embedding
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use plugvisor::{Supervisor, SupervisorOptions, manifest::Manifest};
//! let supervisor = Supervisor::new(SupervisorOptions::new("/tmp/plugvisor-demo"))?;
//! let manifest = Manifest::load("plugins/echo/plugin.yaml".as_ref())?;
//! supervisor.add(manifest, &Default::default())?;
//! let reply = supervisor
//!     .call("echo", "upper", "hi".into(), Default::default(), None)
//!     .await?;
//! assert_eq!(&reply.payload[..], b"HI");
//! supervisor.shutdown().await;
//! # Ok(()) }
//! ```

mod actor;
pub mod adopt;
pub mod autoscale;
pub mod capability;
pub mod config;
pub mod container;
pub mod dependencies;
pub mod error;
pub mod guard;
pub mod handover;
pub mod hooks;
mod host;
pub mod instance;
pub mod isolation;
pub mod logs;
pub mod manifest;
pub mod metrics;
mod plugin;
pub mod policy;
pub mod process;
pub mod ratelimit;
pub mod registry;
pub mod remote;
mod replica;
mod routing;
pub mod rundir;
mod session;
pub mod signature;
mod spec;
pub mod state;
pub mod status;
mod stream_wire;
pub mod supervisor;
pub mod tenant;
pub mod tls;
pub mod transport;
pub mod units;
mod upgrade;
mod validate;
mod vfork;

pub use error::Error;
pub use supervisor::{
    Event, EventDetail, ExitReason, PluginInfo, PluginState, ReplicaInfo, Supervisor,
    SupervisorOptions,
};
