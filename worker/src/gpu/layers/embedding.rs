//! The vocabulary-parallel ends of the decoder: the token embedding (rows summed over the group)
//! and the output head (per-rank logits; the arg-max or the sampler's candidates cross the group,
//! never the full logits).

use r4b_kernels::{DBuf, DevPtr, OutType};

use super::{Ctx, Linear};
use crate::gpu::weights::{gpu_err, Loader, Split};
use crate::Result;

/// Token embedding split by vocabulary rows: each rank writes the rows of the ids it owns (zeros
/// for the others) and the rows are summed over the group.
pub struct VocabParallelEmbedding {
    weight: DBuf,
    hidden: usize,
    vocab_start: usize,
    vocab_local: usize,
}

impl VocabParallelEmbedding {
    /// This rank's rows of `{name}.weight [vocab, hidden]`.
    pub fn load(l: &mut Loader, name: &str, (vocab, hidden): (usize, usize)) -> Result<Self> {
        let vocab_local = vocab / l.shard.world.max(1);
        Ok(VocabParallelEmbedding {
            weight: l.upload(&format!("{name}.weight"), &[vocab, hidden], Split::Rows)?,
            hidden,
            vocab_start: l.shard.rank * vocab_local,
            vocab_local,
        })
    }

    /// `ids` (i32 `[T]`) → `out` (bf16 `[T, hidden]`), all-reduced in place.
    ///
    /// # Safety
    /// `ids` holds `tokens` i32, `out` `tokens × hidden` bf16.
    pub unsafe fn forward(&self, ctx: &Ctx, ids: DevPtr, out: DevPtr, tokens: usize) -> Result<()> {
        ctx.gpu
            .embed_gather(
                ids,
                self.weight.ptr(),
                out,
                tokens,
                self.hidden,
                (self.vocab_start, self.vocab_local),
            )
            .map_err(gpu_err)?;
        ctx.comm
            .all_reduce_sum_bf16(ctx.gpu, out, tokens * self.hidden)?;
        Ok(())
    }
}

/// The output projection split by vocabulary rows (`lm_head` or the tied embedding).
pub struct VocabParallelHead {
    linear: Linear,
    hidden: usize,
    vocab_local: usize,
}

/// Device buffers of the head's arg-max: per-row best value and index (f32, u32 `[seqs]`) and the
/// gather scratch (u32 `[world + 1, 2, seqs]`).
#[derive(Clone, Copy, Debug)]
pub struct ArgmaxBufs {
    pub best_val: DevPtr,
    pub best_idx: DevPtr,
    pub gathered: DevPtr,
}

impl VocabParallelHead {
    /// This rank's rows of the tensor `tensor [vocab, hidden]` (full name: `lm_head.weight` or
    /// the tied embedding's, as `model::head` decides).
    pub fn load(l: &mut Loader, tensor: &str, (vocab, hidden): (usize, usize)) -> Result<Self> {
        Ok(VocabParallelHead {
            linear: Linear::load_tensor(l, tensor, (vocab, hidden), Split::Rows)?,
            hidden,
            vocab_local: vocab / l.shard.world.max(1),
        })
    }

    /// Rows of this rank's logits.
    pub fn vocab_local(&self) -> usize {
        self.vocab_local
    }

    /// The local weight.
    pub fn linear(&self) -> &Linear {
        &self.linear
    }

    /// This rank's logits `[rows, vocab / world]` (f32) of `x [rows, hidden]`.
    ///
    /// # Safety
    /// `x` holds `rows × hidden` bf16, `logits` `rows × vocab / world` f32.
    pub unsafe fn logits(&self, ctx: &Ctx, x: DevPtr, logits: DevPtr, rows: usize) -> Result<()> {
        self.linear.forward(ctx.gpu, x, logits, rows, OutType::F32)
    }

    /// Logits of `x [seqs, hidden]`, then each row's local arg-max into `bufs`.
    ///
    /// # Safety
    /// As [`VocabParallelHead::logits`]; `bufs` hold `seqs` rows.
    pub unsafe fn forward(
        &self,
        ctx: &Ctx,
        x: DevPtr,
        logits: DevPtr,
        bufs: &ArgmaxBufs,
        seqs: usize,
    ) -> Result<()> {
        self.logits(ctx, x, logits, seqs)?;
        ctx.mark("final norm + lm_head")?;
        ctx.gpu
            .argmax_rows(
                logits,
                (seqs, self.vocab_local),
                bufs.best_val,
                bufs.best_idx,
            )
            .map_err(gpu_err)?;
        ctx.mark("argmax")
    }

    /// The global arg-max of the first `seqs` rows after [`VocabParallelHead::forward`] (ties:
    /// lowest id): every rank's best (value, index) gathered and merged on the host.
    ///
    /// # Safety
    /// `bufs` hold `seqs` rows (`gathered`: `(world + 1) · 2 · seqs` words).
    pub unsafe fn argmax(&self, ctx: &Ctx, bufs: &ArgmaxBufs, seqs: usize) -> Result<Vec<u32>> {
        let (gpu, comm) = (ctx.gpu, ctx.comm);
        let world = comm.world_size();
        let mut words = vec![0u32; world * 2 * seqs];
        if comm.is_noop() {
            gpu.dtoh(bufs.best_val, &mut words[..seqs])
                .map_err(gpu_err)?;
            gpu.dtoh(bufs.best_idx, &mut words[seqs..2 * seqs])
                .map_err(gpu_err)?;
        } else {
            // Pack [values | indices] and gather from every rank.
            gpu.dtod(bufs.best_val, bufs.gathered, seqs * 4)
                .map_err(gpu_err)?;
            gpu.dtod(bufs.best_idx, bufs.gathered + (seqs * 4) as u64, seqs * 4)
                .map_err(gpu_err)?;
            let recv = bufs.gathered + (2 * seqs * 4) as u64;
            let at = comm.all_gather_u32(gpu, bufs.gathered, recv, 2 * seqs)?;
            gpu.dtoh(at, &mut words).map_err(gpu_err)?;
        }
        let mut out = Vec::with_capacity(seqs);
        for s in 0..seqs {
            let mut best = (f32::NEG_INFINITY, u32::MAX);
            for r in 0..world {
                let base = r * 2 * seqs;
                let v = f32::from_bits(words[base + s]);
                let id = words[base + seqs + s] + (r * self.vocab_local) as u32;
                if v > best.0 || (v == best.0 && id < best.1) {
                    best = (v, id);
                }
            }
            out.push(best.1);
        }
        Ok(out)
    }

    /// Logits of `tokens` rows of `x` (`[tokens, hidden]`, TP = 1), in blocks of `block` rows
    /// through the `logits` buffer, downloaded: `[tokens, vocab]` f32.
    ///
    /// # Safety
    /// `x` holds `tokens` rows; `logits` holds `block` rows.
    pub unsafe fn logits_all(
        &self,
        ctx: &Ctx,
        x: DevPtr,
        logits: DevPtr,
        (tokens, block): (usize, usize),
    ) -> Result<Vec<f32>> {
        let v = self.vocab_local;
        let mut out = vec![0f32; tokens * v];
        for r0 in (0..tokens).step_by(block.max(1)) {
            let n = block.min(tokens - r0);
            self.logits(ctx, x + (r0 * self.hidden * 2) as u64, logits, n)?;
            ctx.gpu
                .dtoh(logits, &mut out[r0 * v..(r0 + n) * v])
                .map_err(gpu_err)?;
        }
        Ok(out)
    }
}
