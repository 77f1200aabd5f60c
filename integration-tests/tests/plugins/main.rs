//! Plugins in every language against the protocol: `plugvisor conformance`,
//! the Go and Python examples and helpers, and `plugvisor new` skeletons.
//! One test binary for all of them.

mod conformance;
mod go_plugin;
mod new;
mod python_helper;
mod streams;
