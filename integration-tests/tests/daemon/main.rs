//! The real `plugvisor` daemon and CLI, end to end: every verb over the
//! control socket, reload, metrics, streaming calls, `top` and colours in a
//! real terminal, the Grafana dashboard. One test binary for all of them.

mod autoscale;
mod call_session;
mod cli;
mod containers;
mod daemon;
mod dependencies;
mod grafana;
mod hooks;
mod kubernetes;
mod metrics;
mod operator;
mod reload;
mod remote;
mod routing;
mod signing;
mod stream;
mod support;
mod survive;
mod tenant;
mod terminal;
mod top;
mod upgrade_self;
mod validate;
