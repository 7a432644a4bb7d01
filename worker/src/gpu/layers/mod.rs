//! GPU layers: the weights of one block and the kernels that apply them, with the shard axis and
//! the communication in the type (as [`crate::parallel`] does for the CPU model):
//!
//! | type | weight split | after the product |
//! |---|---|---|
//! | [`Linear`] | as loaded ([`Split`](crate::shard::Split)) | nothing |
//! | [`ColumnParallelLinear`] | out dim, several checkpoint tensors fused into one weight | nothing (output stays sharded) |
//! | [`RowParallelLinear`] | in dim | all-reduce sum ([`DeviceCollective`]) |
//! | [`VocabParallelEmbedding`] | vocab rows | all-reduce sum |
//! | [`VocabParallelHead`] | vocab rows | per-rank arg-max or sampler candidates gathered |
//! | [`RmsNorm`], [`LayerNorm`] | replicated | nothing |
//! | [`Attention`] | heads (through its linears) | all-reduce (its `o_proj`) |
//!
//! A [`Linear`] carries its weight's element type ([`WeightDtype`], bf16 today) and an optional
//! scale: the one place a quantised (FP8) weight will go. [`Attention`] picks its kernels
//! ([`AttentionKernels`]) when it is built. Layers hold weights only: activations live in the
//! runner's step buffers and the KV cache is passed to the forward.

mod attention;
mod embedding;
mod linear;
mod norm;

pub use attention::{attention_gemm, Attention, AttentionKernels, AttnGemm, PrefillKernel, Rotary};
pub use embedding::{ArgmaxBufs, VocabParallelEmbedding, VocabParallelHead};
pub use linear::{ColumnParallelLinear, Linear, RowParallelLinear, WeightDtype};
pub use norm::{LayerNorm, RmsNorm};

use r4b_kernels::Gpu;

use super::weights::gpu_err;
use crate::collective::DeviceCollective;
use crate::Result;

/// What every layer's forward needs besides its inputs: the GPU (stream, kernels) and the
/// group's device collective.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub gpu: &'a Gpu,
    pub comm: &'a dyn DeviceCollective,
}

impl Ctx<'_> {
    /// Ends the op labelled `label` on the timeline (a no-op unless a timeline is recording).
    pub fn mark(&self, label: &'static str) -> Result<()> {
        self.gpu.mark(label).map_err(gpu_err)
    }
}
