//! # r4b-proto
//!
//! The `.proto` files of the cluster (`proto/cluster.proto`, package `cluster.v1`) and the code
//! tonic/prost generate from them. Logic lives elsewhere; this crate holds types only.
//!
//! - `Coordinator` service: gateway → coordinator (generate as a server stream, health, model
//!   info, load).
//! - `Worker` service: coordinator → each worker rank (init, a bidirectional step stream,
//!   health, shutdown).
#![deny(missing_docs)]

/// Version 1 of the cluster protocol.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("cluster.v1");
}
