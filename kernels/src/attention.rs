//! Attention family (`attention.cu`): paged decode attention (CUDA-core and tensor-core kernels,
//! split over the context, then merged), the tensor-core prefill attention, and the cuBLAS
//! path's KV gather and row softmax.
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule};

use crate::launch::{grid, grid2, i, KernelArg};
use crate::{DecodeAttention, DevPtr, Gpu, GpuError, Result};

/// Arguments of [`Gpu::decode_attention`].
#[derive(Clone, Copy, Debug)]
pub struct DecodeAttn {
    /// Queries: head `h` of token `t` at `q + (t·q_stride + h·hd)·2`.
    pub q: DevPtr,
    pub q_stride: usize,
    pub k_cache: DevPtr,
    pub v_cache: DevPtr,
    /// i32 `[T]`: keys visible to each query.
    pub ctx_lens: DevPtr,
    /// i32 `[T]`: the block-table row of each query.
    pub bt_rows: DevPtr,
    /// i32 `[rows, max_blocks]`.
    pub block_tables: DevPtr,
    pub max_blocks: usize,
    pub block_size: usize,
    pub tokens: usize,
    pub nq: usize,
    pub nkv: usize,
    pub head_dim: usize,
    /// Keys per partition and the number of partitions the scratch holds per (token, head).
    pub part_size: usize,
    pub parts: usize,
    pub scale: f32,
    /// Scratch: f32 `[T, nq, parts]` ×2 and f32 `[T, nq, parts, hd]`.
    pub pm: DevPtr,
    pub pl: DevPtr,
    pub pacc: DevPtr,
    /// Output: head `h` of token `t` at `out + (t·out_stride + h·hd)·2`.
    pub out: DevPtr,
    pub out_stride: usize,
    /// Which kernel runs (the caller's choice, see [`Gpu::has_decode_attention`]).
    pub kernel: DecodeAttention,
}

/// Head dims the tensor-core prefill attention is built for ([`Gpu::flash_attention`]).
pub const FLASH_HEAD_DIMS: [usize; 5] = [64, 72, 80, 96, 128];

/// Dynamic shared memory of the tensor-core attention kernels: two stages of a 64-key K tile and
/// a V tile, rows padded to a multiple of 16 plus 8 bf16.
fn flash_smem_bytes(head_dim: usize) -> usize {
    2 * 2 * 64 * (head_dim.div_ceil(16) * 16 + 8) * 2
}

/// Dynamic shared memory of the prefill attention kernel with `rows` query rows per CTA: the
/// CTA's Q rows (same pitch) before the K/V stages.
fn flash_prefill_smem_bytes(head_dim: usize, rows: usize) -> usize {
    flash_smem_bytes(head_dim) + rows * (head_dim.div_ceil(16) * 16 + 8) * 2
}

/// Arguments of [`Gpu::flash_attention`]: `rows` queries of each of `batch` independent sequences
/// (strides in elements) attend to their keys, causally or not.
#[derive(Clone, Copy, Debug)]
pub struct FlashAttn {
    /// Head `h` of query row `r` of sequence `z` at `q + (z·q_z + r·q_ld + h·hd)·2`.
    pub q: DevPtr,
    pub q_ld: usize,
    pub q_z: usize,
    /// Keys/values of kv head `g` at row `r`: `k + (z·kv_z + r·kv_ld + g·hd)·2` (same for `v`).
    pub k: DevPtr,
    pub v: DevPtr,
    pub kv_ld: usize,
    pub kv_z: usize,
    /// Paged keys: i32 block table of the sequence and the block size (key `i` is row
    /// `table[i / bs]·bs + i % bs`); `None`: row = key.
    pub block_table: Option<(DevPtr, usize)>,
    pub out: DevPtr,
    pub out_ld: usize,
    pub out_z: usize,
    pub rows: usize,
    pub batch: usize,
    /// Keys before the first query row (causal: query `i` sees keys `..= ctx_base + i`).
    pub ctx_base: usize,
    /// Keys per sequence (causal: `ctx_base + rows`).
    pub nkeys: usize,
    pub nq: usize,
    pub nkv: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
}

pub(crate) struct Kernels {
    /// `(head_dim, group)` → kernel.
    decode: Vec<((usize, usize), CudaFunction)>,
    decode_combine: CudaFunction,
    /// `head_dim` → tensor-core prefill attention kernel, 64 query rows per CTA.
    flash: Vec<(usize, CudaFunction)>,
    /// The same with 128 query rows per CTA (two m-tiles per warp).
    flash2: Vec<(usize, CudaFunction)>,
    /// `head_dim` → tensor-core paged decode attention kernel.
    flash_decode: Vec<(usize, CudaFunction)>,
    gather_kv: CudaFunction,
    softmax_rows: CudaFunction,
}

impl Kernels {
    pub(crate) fn load(m: &Arc<CudaModule>) -> Result<Self> {
        let l = |n: &str| m.load_function(n);
        // The tensor-core attention kernels keep two stages of K and V tiles (and the prefill
        // kernels their Q rows) in dynamic shared memory, above the 48 KB default.
        let tiled = |name: String, hd: usize, smem: usize| -> Result<(usize, CudaFunction)> {
            let f = l(&name)?;
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )?;
            Ok((hd, f))
        };
        // The prefill attention kernels of every head dim, `rows` query rows per CTA.
        let prefill = |prefix: &str, rows: usize| -> Result<Vec<(usize, CudaFunction)>> {
            FLASH_HEAD_DIMS
                .iter()
                .map(|&hd| {
                    tiled(
                        format!("{prefix}{hd}"),
                        hd,
                        flash_prefill_smem_bytes(hd, rows),
                    )
                })
                .collect()
        };
        Ok(Kernels {
            decode: {
                let mut v = Vec::new();
                for hd in [16, 32, 64, 128] {
                    for g in [1, 2, 4, 8] {
                        v.push(((hd, g), l(&format!("decode_attn_hd{hd}_g{g}"))?));
                    }
                }
                v
            },
            decode_combine: l("decode_attn_combine")?,
            flash: prefill("flash_attn_hd", 64)?,
            flash2: prefill("flash_attn2_hd", 128)?,
            flash_decode: [64usize, 128]
                .iter()
                .map(|&hd| tiled(format!("flash_decode_hd{hd}"), hd, flash_smem_bytes(hd)))
                .collect::<Result<_>>()?,
            gather_kv: l("gather_kv")?,
            softmax_rows: l("softmax_rows")?,
        })
    }
}

impl Gpu {
    /// Whether the paged decode attention `kernel` is built for `head_dim` with `group` query
    /// heads per kv head (tensor cores: head dim 64/128, group 1..=8; CUDA cores: head dim
    /// 16/32/64/128, group 1/2/4/8).
    pub fn has_decode_attention(
        &self,
        kernel: DecodeAttention,
        head_dim: usize,
        group: usize,
    ) -> bool {
        let k = &self.kernels.attention;
        match kernel {
            DecodeAttention::TensorCore => {
                (1..=8).contains(&group) && k.flash_decode.iter().any(|(d, _)| *d == head_dim)
            }
            DecodeAttention::CudaCore => k.decode.iter().any(|(d, _)| *d == (head_dim, group)),
        }
    }

    /// Paged attention of single queries over their cached keys (split over the context, then
    /// merged), on the kernel `a.kernel` names.
    pub unsafe fn decode_attention(&self, a: &DecodeAttn) -> Result<()> {
        if a.tokens == 0 {
            return Ok(());
        }
        let group = if a.nkv > 0 && a.nq.is_multiple_of(a.nkv) {
            a.nq / a.nkv
        } else {
            0
        };
        let k = &self.kernels.attention;
        let missing = || {
            GpuError::Invalid(format!(
                "decode attention ({:?}): head_dim {} with {} q heads over {} kv heads \
                 (tensor cores: head_dim 64/128, group 1..=8; CUDA cores: head_dim \
                 16/32/64/128, group 1/2/4/8)",
                a.kernel, a.head_dim, a.nq, a.nkv
            ))
        };
        let (func, smem, scale) = match a.kernel {
            DecodeAttention::TensorCore => {
                let f = (k.flash_decode.iter())
                    .find(|(d, _)| *d == a.head_dim && (1..=8).contains(&group))
                    .map(|(_, f)| f)
                    .ok_or_else(missing)?;
                (
                    f,
                    flash_smem_bytes(a.head_dim),
                    a.scale * std::f32::consts::LOG2_E,
                )
            }
            DecodeAttention::CudaCore => {
                let f = (k.decode.iter())
                    .find(|(k, _)| *k == (a.head_dim, group))
                    .map(|(_, f)| f)
                    .ok_or_else(missing)?;
                (f, 0, a.scale)
            }
        };
        let (qs, mb, bs, nq, nkv) = (
            i(a.q_stride),
            i(a.max_blocks),
            i(a.block_size),
            i(a.nq),
            i(a.nkv),
        );
        let (ps, parts, hd, os) = (i(a.part_size), i(a.parts), i(a.head_dim), i(a.out_stride));
        let cfg = grid((a.parts, a.nkv, a.tokens), 128, smem);
        let (q, kc, vc, lens) = (&a.q, &a.k_cache, &a.v_cache, &a.ctx_lens);
        let (rows, tables, (pm, pl, pacc)) = (&a.bt_rows, &a.block_tables, (&a.pm, &a.pl, &a.pacc));
        let args: [&dyn KernelArg; 17] = [
            q, &qs, kc, vc, lens, rows, tables, &mb, &bs, &nq, &nkv, &ps, &parts, &scale, pm, pl,
            pacc,
        ];
        self.launch(func, cfg, &args)?;
        let args: [&dyn KernelArg; 10] = [pm, pl, pacc, lens, &a.out, &os, &nq, &hd, &ps, &parts];
        let cfg = grid2(a.tokens, a.nq, a.head_dim as u32);
        self.launch(&k.decode_combine, cfg, &args)
    }

    /// Whether [`Gpu::flash_attention`] exists for this head dim.
    pub fn has_flash(&self, head_dim: usize) -> bool {
        (self.kernels.attention.flash.iter()).any(|(hd, _)| *hd == head_dim)
    }

    /// Prefill attention on tensor cores (see [`FlashAttn`]).
    pub unsafe fn flash_attention(&self, a: &FlashAttn) -> Result<()> {
        if a.rows == 0 || a.batch == 0 {
            return Ok(());
        }
        // 128 rows per CTA read each K/V fragment once for two m-tiles; 64 keep more CTAs for
        // short prefills (measured, H200: 128 wins once there is a CTA per multiprocessor).
        let rows_per_cta = self
            .options
            .prefill_rows
            .filter(|r| [64, 128].contains(r))
            .unwrap_or(if a.rows.div_ceil(128) * a.nq * a.batch >= self.sm_count {
                128
            } else {
                64
            });
        let func = if rows_per_cta == 128 {
            &self.kernels.attention.flash2
        } else {
            &self.kernels.attention.flash
        }
        .iter()
        .find(|(hd, _)| *hd == a.head_dim)
        .map(|(_, f)| f)
        .ok_or_else(|| {
            GpuError::Invalid(format!(
                "flash attention: head_dim {} (built for {FLASH_HEAD_DIMS:?})",
                a.head_dim
            ))
        })?;
        if a.nkv == 0 || !a.nq.is_multiple_of(a.nkv) || a.nkeys == 0 {
            return Err(GpuError::Invalid(format!(
                "flash attention: {} q heads over {} kv heads, {} keys",
                a.nq, a.nkv, a.nkeys
            )));
        }
        let ll = |v: usize| v as i64;
        let (bt, bs) = a.block_table.unwrap_or((0, 1));
        let (q_ld, kv_ld, out_ld, bs) = (i(a.q_ld), i(a.kv_ld), i(a.out_ld), i(bs));
        let (q_z, kv_z, out_z) = (ll(a.q_z), ll(a.kv_z), ll(a.out_z));
        let (rows, base, nkeys, group) = (i(a.rows), i(a.ctx_base), i(a.nkeys), i(a.nq / a.nkv));
        let causal = i32::from(a.causal);
        // The softmax runs in base 2.
        let scale2 = a.scale * std::f32::consts::LOG2_E;
        let cfg = grid(
            (a.rows.div_ceil(rows_per_cta), a.nq, a.batch),
            128,
            flash_prefill_smem_bytes(a.head_dim, rows_per_cta),
        );
        let (q, k, v, out) = (&a.q, &a.k, &a.v, &a.out);
        let args: [&dyn KernelArg; 18] = [
            q, &q_ld, &q_z, k, v, &kv_ld, &kv_z, &bt, &bs, out, &out_ld, &out_z, &rows, &base,
            &nkeys, &group, &causal, &scale2,
        ];
        self.launch(func, cfg, &args)
    }

    /// Copies positions `0..ctx` of one sequence out of the paged cache into `[ctx, width]`.
    pub unsafe fn gather_kv(
        &self,
        (k_cache, v_cache): (DevPtr, DevPtr),
        block_table: DevPtr,
        (block_size, width, ctx): (usize, usize, usize),
        (k_out, v_out): (DevPtr, DevPtr),
    ) -> Result<()> {
        let (bs, w) = (i(block_size), i(width));
        let args: [&dyn KernelArg; 7] = [&k_cache, &v_cache, &block_table, &bs, &w, &k_out, &v_out];
        self.launch_row_ctas(&self.kernels.attention.gather_kv, ctx, 128, &args)
    }

    /// Row softmax of bf16 scores `[rows, ctx]`, in place; causal when `causal_base` is set
    /// (row `r` sees keys `..= causal_base + r % rows_per_head`).
    pub unsafe fn softmax_rows(
        &self,
        s: DevPtr,
        (rows, ctx): (usize, usize),
        rows_per_head: usize,
        causal_base: Option<usize>,
    ) -> Result<()> {
        let cb = causal_base.map(i).unwrap_or(-1);
        let args: [&dyn KernelArg; 4] = [&s, &i(ctx), &i(rows_per_head.max(1)), &cb];
        self.launch_row_ctas(&self.kernels.attention.softmax_rows, rows, 256, &args)
    }
}
