//! CUDA kernels of r4b-serve and their launchers (feature `cuda`; without it the crate is empty).
//!
//! The kernels live in `src/r4b.cu`, compiled by nvcc to sm_80 and sm_90 PTX at build time
//! (`build.rs`); the one the device runs is loaded once per process ([`KernelOptions`] can force
//! sm_80). Launchers take raw device addresses ([`DevPtr`]): the model owns its
//! buffers and graph capture needs stable addresses, so nothing here allocates per call.
//!
//! Contract of every `unsafe fn` here: each address is a live allocation of this crate's context,
//! large enough for the shapes given, with the element type the kernel names (bf16 unless said).
#![allow(clippy::missing_safety_doc)]

mod options;
pub use options::{DecodeAttention, KernelArch, KernelOptions};

#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
pub use gpu::*;
