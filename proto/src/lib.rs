//! # r4b-proto
//!
//! The `.proto` files of the cluster (`proto/cluster.proto`, package `cluster.v1`) and the code
//! tonic/prost generate from them, and the shared-secret check every component link uses
//! ([`auth`]).
//!
//! - `Coordinator` service: gateway → coordinator (generate as a server stream, health, model
//!   info, load).
//! - `Worker` service: coordinator → each worker rank (init, a bidirectional step stream,
//!   health, shutdown).
#![deny(missing_docs)]

pub mod auth;
pub mod tls;

/// Version 1 of the cluster protocol.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("cluster.v1");
}

/// HTTP/2 flow-control window of one gRPC stream, bytes, for every client and server of the
/// cluster: a step carries image views of megabytes, which the 64 KiB default splits into dozens
/// of window round trips.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 flow-control window of one connection, bytes.
pub const CONNECTION_WINDOW: u32 = 32 << 20;
