//! The runner's step buffers: every activation and every piece of uploaded step metadata, sized
//! once for `max_tokens` tokens and `max_seqs` sequences, at fixed addresses (CUDA graphs replay
//! them).

use r4b_kernels::{DBuf, Gpu};

use super::layers::ArgmaxBufs;
use super::models::r4b::Qwen3Dims;
use super::weights::gpu_err;
use super::{part_size, GpuLimits, GRAPH_BATCHES, PREFILL_ROWS, PREFILL_SCRATCH};
use crate::Result;

/// Step buffers, sized for `max_tokens` tokens and `max_seqs` sequences.
pub struct StepBuffers {
    // Plan (i32).
    pub ids: DBuf,
    pub positions: DBuf,
    pub slots: DBuf,
    pub ctx_lens: DBuf,
    pub bt_rows: DBuf,
    /// `[max_seqs, max_blocks]`.
    pub block_tables: DBuf,
    pub last_rows: DBuf,
    /// i32 `[T]`: the step row of each `<image>` row of the step, in order.
    pub image_dst: DBuf,
    // Activations.
    /// The residual stream, f32 `[T, H]`.
    pub hidden: DBuf,
    pub normed: DBuf,
    pub qkv: DBuf,
    pub attn: DBuf,
    pub proj: DBuf,
    pub gate_up: DBuf,
    pub act: DBuf,
    /// Each sequence's last row `[S, H]`, its logits f32 `[S, V/w]`, arg-max and gather words.
    pub last: DBuf,
    pub logits: DBuf,
    pub best_val: DBuf,
    pub best_idx: DBuf,
    pub gathered: DBuf,
    // Attention scratch.
    /// Paged attention partitions: f32 `[entries]` ×2 and f32 `[entries, hd]`.
    pub pm: DBuf,
    pub pl: DBuf,
    pub pacc: DBuf,
    /// Gathered keys/values and scores of the cuBLAS-product prefill path.
    pub kc: DBuf,
    pub vc: DBuf,
    pub s: DBuf,
    /// Sizes the buffers were made for.
    pub max_tokens: usize,
    pub max_seqs: usize,
    pub max_blocks: usize,
    max_model_len: usize,
    nq: usize,
    /// Capacity of the attention partition scratch, in (token, head, partition) entries.
    part_entries: usize,
}

impl StepBuffers {
    pub fn alloc(gpu: &Gpu, d: &Qwen3Dims, world: usize, lim: &GpuLimits) -> Result<Self> {
        let (h, nq, nkv, hd, f) = (d.hidden, d.nq, d.nkv, d.head_dim, d.intermediate);
        let (tmax, smax) = (lim.max_tokens.max(lim.max_seqs), lim.max_seqs);
        let max_blocks = lim.max_model_len.div_ceil(lim.block_size);
        // Partition scratch: what the largest graph bucket needs (eager steps adapt the partition
        // size to it).
        let part_entries = GRAPH_BATCHES
            .iter()
            .filter(|&&b| b <= smax)
            .map(|&b| b * nq * lim.max_model_len.div_ceil(part_size(b)).next_power_of_two())
            .max()
            .unwrap_or(0)
            // Every paged token of an eager step needs at least one partition.
            .max(tmax * nq * 2);
        let qkv_w = d.qkv_width();
        let ctx = lim.max_model_len;
        let a = |bytes: usize| gpu.alloc(bytes).map_err(gpu_err);
        Ok(StepBuffers {
            ids: a(tmax * 4)?,
            positions: a(tmax * 4)?,
            slots: a(tmax * 4)?,
            ctx_lens: a(tmax * 4)?,
            bt_rows: a(tmax * 4)?,
            block_tables: a(smax * max_blocks * 4)?,
            last_rows: a(smax * 4)?,
            image_dst: a(tmax * 4)?,
            hidden: a(tmax * h * 4)?,
            normed: a(tmax * h * 2)?,
            qkv: a(tmax * qkv_w * 2)?,
            attn: a(tmax * nq * hd * 2)?,
            proj: a(tmax * h * 2)?,
            gate_up: a(tmax * 2 * f * 2)?,
            act: a(tmax * f * 2)?,
            last: a(smax * h * 2)?,
            logits: a(smax * d.vocab_local * 4)?,
            best_val: a(smax * 4)?,
            best_idx: a(smax * 4)?,
            // The arg-max gather: this rank's [values | indices] (2·S words), then every rank's.
            gathered: a((world + 1) * smax * 2 * 4)?,
            pm: a(part_entries * 4)?,
            pl: a(part_entries * 4)?,
            pacc: a(part_entries * hd * 4)?,
            kc: a(ctx * nkv * hd * 2)?,
            vc: a(ctx * nkv * hd * 2)?,
            s: a(PREFILL_SCRATCH.max(nkv * PREFILL_ROWS * ctx * 2))?,
            max_tokens: tmax,
            max_seqs: smax,
            max_blocks,
            max_model_len: lim.max_model_len,
            nq,
            part_entries,
        })
    }

    /// The head's arg-max buffers.
    pub fn argmax(&self) -> ArgmaxBufs {
        ArgmaxBufs {
            best_val: self.best_val.ptr(),
            best_idx: self.best_idx.ptr(),
            gathered: self.gathered.ptr(),
        }
    }

    /// `(part_size, parts)` of the paged attention for `tokens` queries whose longest context is
    /// `max_ctx`, within the partition scratch. For graphs the partition count is rounded up to a
    /// power of two (fewer graphs).
    pub fn split_for(&self, tokens: usize, max_ctx: usize, graph: bool) -> (usize, usize) {
        let mut ps = part_size(tokens);
        let cap_parts = |ps: usize| self.max_model_len.div_ceil(ps).next_power_of_two();
        let mut parts = max_ctx.div_ceil(ps).max(1);
        if graph {
            parts = parts.next_power_of_two().min(cap_parts(ps));
        }
        let entries = |parts: usize| tokens.max(1) * self.nq * parts;
        while entries(parts) > self.part_entries && ps < self.max_model_len {
            ps *= 2;
            parts = max_ctx.div_ceil(ps).max(1);
            if graph {
                parts = parts.next_power_of_two().min(cap_parts(ps));
            }
        }
        (ps, parts)
    }
}
