//! CUDA kernels of r4b-serve and their launchers (feature `cuda`; without it the crate is empty).
//!
//! The kernels live in one `.cu` file per op family next to the `.rs` file that launches them
//! (`embed`, `norm`, `attention`, `elementwise`, `gemm`, `sample`, `collective`: the IPC
//! all-reduce, beside NCCL), all compiled as one translation unit, `src/r4b.cu`, by nvcc to sm_80
//! and sm_90 PTX at build time (`build.rs`); the one the device runs is loaded once per process ([`KernelOptions`] can force
//! sm_80). `gpu.rs` keeps the device core (context, stream, allocations, module loading,
//! timeline); every launcher goes through the one launch path of `launch.rs`. Launchers take raw
//! device addresses ([`DevPtr`]): the model owns its buffers and graph capture needs stable
//! addresses, so nothing here allocates per call.
//!
//! Contract of every `unsafe fn` here: each address is a live allocation of this crate's context,
//! large enough for the shapes given, with the element type the kernel names (bf16 unless said).
#![allow(clippy::missing_safety_doc)]

mod options;
pub use options::{DecodeAttention, KernelArch, KernelOptions};

#[cfg(feature = "cuda")]
mod attention;
#[cfg(feature = "cuda")]
mod collective;
#[cfg(feature = "cuda")]
mod elementwise;
#[cfg(feature = "cuda")]
mod embed;
#[cfg(feature = "cuda")]
mod gemm;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
mod norm;
#[cfg(feature = "cuda")]
mod sample;

#[cfg(feature = "cuda")]
pub use attention::{DecodeAttn, FlashAttn, FLASH_HEAD_DIMS};
#[cfg(feature = "cuda")]
pub use collective::{
    nccl_unique_id, DeviceGroup, IpcAllReduce, Nccl, IPC_HANDLE_BYTES, IPC_MAX_WORLD,
};
#[cfg(feature = "cuda")]
pub use gemm::{Gemm, LinearImpl, OutType, GEMV_MAX_ROWS};
#[cfg(feature = "cuda")]
pub use gpu::{
    can_access_peer, cudarc, device_count, DBuf, DevPtr, Gpu, GpuError, Result, PTX_SM80, PTX_SM90,
};
#[cfg(feature = "cuda")]
pub use launch::Launch;
#[cfg(feature = "cuda")]
pub use norm::{Residual, RopeKv};
#[cfg(feature = "cuda")]
pub use sample::{
    SampleOut, SampleRowArgs, SAMPLE_MAX_K, SAMPLE_MAX_WORLD, SAMPLE_OUT_TOP, SAMPLE_OUT_WORDS,
    SAMPLE_PART_WORDS, SAMPLE_ROW_WORDS,
};
