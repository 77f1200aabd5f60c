//! Helpers shared by the terminal tests.
pub mod tmux;
