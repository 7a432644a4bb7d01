//! [`KernelOptions`]: the GPU engine's kernel choices, made once by the binary (its flags, then
//! the environment overrides listed in `r4b/src/options.rs`) and passed down. Nothing in this
//! crate or in the worker's GPU engine reads the environment.

/// Which compiled PTX the engine loads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelArch {
    /// The device's own: sm_90 on Hopper and newer, sm_80 on Ampere.
    #[default]
    Auto,
    /// The sm_80 build on any device: the A100 code path, checked on a Hopper card.
    Sm80,
}

/// Which kernel runs the paged decode attention. The option is the wish; the worker's attention
/// layer turns it into the kernel it names in `DecodeAttn::kernel` once, at load (the CUDA-core
/// one where the tensor-core kernel is not built for the head dim).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodeAttention {
    /// Tensor cores: 1.1-1.8x the CUDA-core kernel at every batch measured (bench/RESULTS.md).
    #[default]
    TensorCore,
    /// CUDA cores (kept for head dims without the tensor-core kernel, and for comparisons).
    CudaCore,
}

/// Kernel choices of the GPU engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOptions {
    /// Which PTX to load.
    pub arch: KernelArch,
    /// Programmatic dependent launch for steps of at most 128 tokens (sm_90 only; +1.5-2 % on
    /// decode steps, bench/RESULTS.md).
    pub pdl: bool,
    /// Query rows per CTA of the prefill attention (64 or 128); `None`: 128 whenever that still
    /// gives every multiprocessor a CTA, else 64.
    pub prefill_rows: Option<usize>,
    /// The decode attention kernel.
    pub decode_attention: DecodeAttention,
}

impl Default for KernelOptions {
    fn default() -> Self {
        KernelOptions {
            arch: KernelArch::Auto,
            pdl: true,
            prefill_rows: None,
            decode_attention: DecodeAttention::TensorCore,
        }
    }
}
