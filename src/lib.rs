//! The plugvisor protocol: generated types and gRPC stubs for the `Plugin`
//! service (what every plugin serves) and the `Control` service (what the
//! daemon serves), plus the handshake constants both sides agree on.
//!
//! This crate does no I/O. The supervisor (`plugvisor`) and the SDK
//! (`plugvisor-sdk`) both depend on it.

/// Generated code for package `plugvisor.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("plugvisor.v1");
}

pub mod framing;
pub mod handshake;

pub use v1::*;
