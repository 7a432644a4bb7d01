//! Norm family (`norm.cu`): fused residual-add + RMSNorm over the f32 residual stream, LayerNorm,
//! and the Qwen3 attention prologue (q/k RMSNorm + RoPE in place, k and v into the paged KV
//! cache) with its cos/sin table.
use crate::launch::{grid1, grid2, i, kernel_set, KernelArg};
use crate::{DevPtr, Gpu, GpuError, Result};

/// What [`Gpu::add_rmsnorm`] does to the residual stream before normalising it.
#[derive(Clone, Copy, Debug)]
pub enum Residual {
    Keep,
    Add(DevPtr),
    Set(DevPtr),
}

/// Arguments of [`Gpu::qk_norm_rope_kv`].
#[derive(Clone, Copy, Debug)]
pub struct RopeKv {
    pub qkv: DevPtr,
    pub q_norm: DevPtr,
    pub k_norm: DevPtr,
    /// i32 `[T]`.
    pub positions: DevPtr,
    /// i32 `[T]`: KV cache slot of each token.
    pub slots: DevPtr,
    pub k_cache: DevPtr,
    pub v_cache: DevPtr,
    pub tokens: usize,
    pub nq: usize,
    pub nkv: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub theta: f32,
    /// cos/sin table from [`Gpu::rope_table`] and its position count (then one warp per head).
    pub table: Option<(DevPtr, usize)>,
}

kernel_set! {
    /// The norm kernels.
    struct Kernels { add_rmsnorm, add_rmsnorm_v8, layernorm, qk_norm_rope_kv, qk_norm_rope_kv_w, rope_table }
}

impl Gpu {
    /// RMSNorm over an f32 residual stream (`residual` f32 `[T, hidden]`): `Keep` normalises it,
    /// `Add(x)` adds bf16 `x` first, `Set(x)` replaces it by `x` first.
    pub unsafe fn add_rmsnorm(
        &self,
        residual: DevPtr,
        x: Residual,
        w: DevPtr,
        out: DevPtr,
        (tokens, hidden): (usize, usize),
        eps: f32,
    ) -> Result<()> {
        let (mode, xp) = match x {
            Residual::Keep => (0i32, 0u64),
            Residual::Add(p) => (1, p),
            Residual::Set(p) => (2, p),
        };
        // One pass with the row in registers where it fits (8 values per thread, ≤ 4 chunks
        // each), else the two-pass kernel.
        let chunks = hidden / 8;
        let aligned = [residual, xp, w, out].iter().all(|p| p % 16 == 0);
        let k = &self.kernels.norm;
        let (f, block) = if hidden % 8 == 0 && aligned && chunks <= 4 * 1024 {
            (
                &k.add_rmsnorm_v8,
                (chunks.min(1024).div_ceil(32) * 32) as u32,
            )
        } else {
            (&k.add_rmsnorm, 256)
        };
        let args: [&dyn KernelArg; 7] = [&residual, &xp, &w, &out, &i(hidden), &eps, &mode];
        self.launch_row_ctas(f, tokens, block, &args)
    }

    /// LayerNorm rows of `x` into `out`.
    pub unsafe fn layernorm(
        &self,
        x: DevPtr,
        (w, b): (DevPtr, DevPtr),
        out: DevPtr,
        (tokens, hidden): (usize, usize),
        eps: f32,
    ) -> Result<()> {
        let args: [&dyn KernelArg; 6] = [&x, &w, &b, &out, &i(hidden), &eps];
        self.launch_row_ctas(&self.kernels.norm.layernorm, tokens, 256, &args)
    }

    /// q/k RMSNorm + RoPE in place, k and v into the KV cache.
    pub unsafe fn qk_norm_rope_kv(&self, a: &RopeKv) -> Result<()> {
        if a.tokens == 0 {
            return Ok(());
        }
        let (nq, nkv, hd) = (i(a.nq), i(a.nkv), i(a.head_dim));
        // One warp per head with the cos/sin table where the head dim allows, else one block
        // per head computing the angles.
        let (table, max_pos) = a.table.unwrap_or((0, 0));
        let warp = a.table.is_some() && a.head_dim.is_multiple_of(64) && a.head_dim <= 256;
        let mp = i(max_pos);
        let mut args: Vec<&dyn KernelArg> = vec![
            &a.qkv,
            &a.q_norm,
            &a.k_norm,
            &a.positions,
            &a.slots,
            &a.k_cache,
            &a.v_cache,
            &nq,
            &nkv,
            &hd,
            &a.eps,
        ];
        let k = &self.kernels.norm;
        let (func, cfg) = if warp {
            args.extend([&table as &dyn KernelArg, &mp]);
            let cfg = grid2(a.tokens, (a.nq + 2 * a.nkv).div_ceil(4), 128);
            (&k.qk_norm_rope_kv_w, cfg)
        } else {
            args.push(&a.theta);
            let threads = (a.head_dim / 2).div_ceil(32) * 32;
            let cfg = grid2(a.tokens, a.nq + 2 * a.nkv, threads as u32);
            (&k.qk_norm_rope_kv, cfg)
        };
        self.launch(func, cfg, &args)
    }

    /// Fills `out` (f32 `[2, max_pos, head_dim / 2]`: cos, then sin) with the rotary angles
    /// `pos · theta^(−2i/hd)` for [`RopeKv::table`].
    pub unsafe fn rope_table(
        &self,
        out: DevPtr,
        max_pos: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        if max_pos == 0 || !(2..=2048).contains(&head_dim) {
            return Err(GpuError::Invalid(format!(
                "rope table of {max_pos} positions, head dim {head_dim}"
            )));
        }
        let args: [&dyn KernelArg; 4] = [&out, &i(max_pos), &i(head_dim), &theta];
        let cfg = grid1(max_pos, (head_dim / 2).div_ceil(32) as u32 * 32);
        self.launch(&self.kernels.norm.rope_table, cfg, &args)
    }
}
