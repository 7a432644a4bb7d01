//! Normalisations: RMSNorm over the f32 residual stream (Qwen3; also the q/k norms' weights,
//! applied inside the fused rope kernel) and LayerNorm with bias (SigLIP, projector).

use r4b_kernels::{DBuf, DevPtr, Gpu, Residual};

use crate::gpu::weights::{gpu_err, Loader, Split};
use crate::Result;

/// `y = x / rms(x) · w` over rows of `dim`, weight `{name}.weight [dim]` (replicated).
pub struct RmsNorm {
    weight: DBuf,
    dim: usize,
    eps: f32,
}

impl RmsNorm {
    pub fn load(l: &mut Loader, name: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm {
            weight: l.upload(&format!("{name}.weight"), &[dim], Split::Replicated)?,
            dim,
            eps,
        })
    }

    /// The weight's device address (for kernels that fuse the norm, `qk_norm_rope_kv`).
    pub fn weight_ptr(&self) -> DevPtr {
        self.weight.ptr()
    }

    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// Updates the f32 residual stream `hidden [rows, dim]` with `prev` (add, set or keep; see
    /// [`Gpu::add_rmsnorm`]) and writes its norm to `out` (bf16).
    ///
    /// # Safety
    /// `hidden` holds `rows × dim` f32, `out` and `prev`'s buffer `rows × dim` bf16.
    pub unsafe fn forward_residual(
        &self,
        gpu: &Gpu,
        hidden: DevPtr,
        prev: Residual,
        out: DevPtr,
        rows: usize,
    ) -> Result<()> {
        gpu.add_rmsnorm(
            hidden,
            prev,
            self.weight.ptr(),
            out,
            (rows, self.dim),
            self.eps,
        )
        .map_err(gpu_err)
    }
}

/// `y = (x − mean) / std · w + b` over rows of `dim`, `{name}.weight` and `{name}.bias`
/// (replicated).
pub struct LayerNorm {
    weight: DBuf,
    bias: DBuf,
    dim: usize,
    eps: f32,
}

impl LayerNorm {
    pub fn load(l: &mut Loader, name: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            weight: l.upload(&format!("{name}.weight"), &[dim], Split::Replicated)?,
            bias: l.upload(&format!("{name}.bias"), &[dim], Split::Replicated)?,
            dim,
            eps,
        })
    }

    /// `out [rows, dim] = LayerNorm(x)` (bf16).
    ///
    /// # Safety
    /// `x` and `out` hold `rows × dim` bf16.
    pub unsafe fn forward(&self, gpu: &Gpu, x: DevPtr, out: DevPtr, rows: usize) -> Result<()> {
        gpu.layernorm(
            x,
            (self.weight.ptr(), self.bias.ptr()),
            out,
            (rows, self.dim),
            self.eps,
        )
        .map_err(gpu_err)
    }
}
