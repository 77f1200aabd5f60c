//! The supervisor as a library, with real plugin processes: supervision,
//! upgrades and replicas, state, Initialize, isolation and the sandbox.
//! One test binary for all of them: linking one binary per file costs more
//! than running them on a 2-core machine.

mod autoscale;
mod confinement;
mod dependencies;
mod filesystem;
mod initialize;
mod isolation;
mod prestart;
mod privileges;
mod routing;
mod state;
mod streams;
mod supervision;
mod upgrade;
mod version_match;
