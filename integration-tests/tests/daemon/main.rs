//! The real `plugvisor` daemon and CLI, end to end: every verb over the
//! control socket, reload, metrics, streaming calls, `top` and colours in a
//! real terminal, the Grafana dashboard. One test binary for all of them.

mod cli;
mod daemon;
mod grafana;
mod metrics;
mod operator;
mod reload;
mod stream;
mod support;
mod terminal;
mod top;
mod upgrade_self;
