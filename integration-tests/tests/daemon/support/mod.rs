//! Helpers shared by the terminal tests. Each test crate compiles this
//! module on its own and uses a part of it.
#![allow(dead_code)]

pub mod tmux;
