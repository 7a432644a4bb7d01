//! Sampling family (`sample.cu`): greedy arg-max and the vocab-parallel sampler
//! (`sample_partial` → `sample_prepare` → NCCL all-gather → `sample_finish`), the GPU half of
//! `worker/src/sampling.rs`, with the per-row argument and output words.
use crate::launch::{grid2, i, kernel_set, KernelArg};
use crate::{DevPtr, Gpu, GpuError, Result};

/// u32 words per row of the sampling kernels' arguments (`SR_WORDS` in sample.cu).
pub const SAMPLE_ROW_WORDS: usize = 24;
/// u32 words per row of `sample_finish`'s output (`SO_WORDS`).
pub const SAMPLE_OUT_WORDS: usize = 44;
/// Most `top_logprobs` entries `sample_finish` returns (`SO_TOP`).
pub const SAMPLE_OUT_TOP: usize = 20;
/// Most candidates per row (`SAMPLE_MAX_K`).
pub const SAMPLE_MAX_K: usize = 1024;
/// u32 words of scratch per row and part of `sample_partial` (`SP_WORDS`).
pub const SAMPLE_PART_WORDS: usize = 8 + 3 * SAMPLE_MAX_K + 2 * SAMPLE_OUT_TOP;
/// Most ranks `sample_finish` merges.
pub const SAMPLE_MAX_WORLD: usize = 8;

/// One row's arguments of the sampling kernels (layout `SR_*` in sample.cu).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SampleRowArgs {
    /// Row of the logits buffer.
    pub logits_row: u32,
    pub greedy: bool,
    pub logprobs: bool,
    /// Temperature (1 for greedy rows).
    pub temperature: f32,
    /// Candidates each rank sends (≤ [`SAMPLE_MAX_K`], ≤ the slice width).
    pub k_local: u32,
    /// Raw top tokens each rank sends.
    pub n_local: u32,
    /// This row's penalty entries `[begin, end)`.
    pub pen: (u32, u32),
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// First word of this row in the packed f32 and u32 sections.
    pub f_off: u32,
    pub u_off: u32,
    /// Candidates kept after the merge (K).
    pub keep: u32,
    /// `top_logprobs` (≤ [`SAMPLE_OUT_TOP`]).
    pub n_keep: u32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub seed: u64,
    /// Tokens generated so far (the draw's counter).
    pub counter: u64,
}

impl SampleRowArgs {
    /// The kernel's words.
    pub fn words(&self) -> [u32; SAMPLE_ROW_WORDS] {
        let mut w = [0u32; SAMPLE_ROW_WORDS];
        w[0] = self.logits_row;
        w[1] = u32::from(self.greedy) | (u32::from(self.logprobs) << 1);
        w[2] = self.temperature.to_bits();
        w[3] = self.k_local;
        w[4] = self.n_local;
        w[5] = self.pen.0;
        w[6] = self.pen.1;
        w[7] = self.repetition_penalty.to_bits();
        w[8] = self.frequency_penalty.to_bits();
        w[9] = self.presence_penalty.to_bits();
        w[10] = self.f_off;
        w[11] = self.u_off;
        w[12] = self.keep;
        w[13] = self.n_keep;
        w[14] = self.top_k;
        w[15] = self.top_p.to_bits();
        w[16] = self.min_p.to_bits();
        w[17] = self.seed as u32;
        w[18] = (self.seed >> 32) as u32;
        w[19] = self.counter as u32;
        w[20] = (self.counter >> 32) as u32;
        w
    }
}

/// One row of `sample_finish`'s output.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOut {
    pub id: u32,
    /// Raw log-probability (0 without logprobs).
    pub logprob: f32,
    /// `(id, raw log-probability)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

impl SampleOut {
    /// Decodes one row's words (`SAMPLE_OUT_WORDS`).
    pub fn from_words(w: &[u32]) -> Result<SampleOut> {
        if w.len() < SAMPLE_OUT_WORDS {
            return Err(GpuError::Invalid(format!(
                "sample output row has {} words, want {SAMPLE_OUT_WORDS}",
                w.len()
            )));
        }
        let n = (w[2] as usize).min(SAMPLE_OUT_TOP);
        Ok(SampleOut {
            id: w[0],
            logprob: f32::from_bits(w[1]),
            top: (0..n)
                .map(|t| (w[3 + 2 * t], f32::from_bits(w[4 + 2 * t])))
                .collect(),
        })
    }
}

kernel_set! {
    /// The sampling kernels.
    struct Kernels { argmax_rows, sample_partial, sample_prepare, sample_finish, apply_token_mask }
}

impl Gpu {
    /// Structured output: sets to `−∞`, in place, every column of f32 `logits [_, width]` that a
    /// row's mask disallows. `rows_bits` (u32 on the device): the `n` logits-row indices, then
    /// `n` masks of `words = ceil(width / 32)` words (bit `j` of word `j / 32` allows column `j`).
    pub unsafe fn apply_token_mask(
        &self,
        logits: DevPtr,
        width: usize,
        rows_bits: DevPtr,
        n: usize,
    ) -> Result<()> {
        let words = width.div_ceil(32);
        let k: [&dyn KernelArg; 5] = [&logits, &rows_bits, &i(n), &i(width), &i(words)];
        self.launch_row_threads(&self.kernels.sample.apply_token_mask, (n, width), &k)
    }

    /// Row max and its lowest index of f32 `[B, V]` into f32 `val[B]`, i32 `idx[B]`.
    pub unsafe fn argmax_rows(
        &self,
        logits: DevPtr,
        (rows, v): (usize, usize),
        val: DevPtr,
        idx: DevPtr,
    ) -> Result<()> {
        let k: [&dyn KernelArg; 4] = [&logits, &i(v), &val, &idx];
        self.launch_row_ctas(&self.kernels.sample.argmax_rows, rows, 1024, &k)
    }

    /// Sampling, rank-local half, stage 1: for each row of `rows` ([`SampleRowArgs`] words on the
    /// device) and each of `parts` equal parts of its logits row (f32 `[_, width]`, modified in
    /// place), penalties and temperature, normalisers, the part's top candidates and raw top
    /// tokens into `scratch` ([`SAMPLE_PART_WORDS`] u32 words per row and part). `pen`: u32
    /// (local index, output count) pairs sorted by index per row; `pen_raw`: one f32 per pair.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sample_partial(
        &self,
        logits: DevPtr,
        (rows, width, parts): (usize, usize, usize),
        args: DevPtr,
        pen: DevPtr,
        pen_raw: DevPtr,
        scratch: DevPtr,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        if parts == 0 || parts > width {
            return Err(GpuError::Invalid(format!(
                "sampling: {parts} parts of a {width}-wide row"
            )));
        }
        let k: [&dyn KernelArg; 6] = [&logits, &i(width), &args, &pen, &pen_raw, &scratch];
        let cfg = grid2(rows, parts, 1024);
        self.launch(&self.kernels.sample.sample_partial, cfg, &k)
    }

    /// Sampling, rank-local half, stage 2: merges each row's parts from `scratch` into `packed`
    /// (`nf` f32 words, then the u32 words; offsets per row), global ids `start ..`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sample_prepare(
        &self,
        scratch: DevPtr,
        (rows, width, parts): (usize, usize, usize),
        start: usize,
        args: DevPtr,
        packed: DevPtr,
        nf: usize,
    ) -> Result<()> {
        let (w, pa, st, nf) = (i(width), i(parts), i(start), i(nf));
        let k: [&dyn KernelArg; 7] = [&scratch, &w, &pa, &st, &args, &packed, &nf];
        self.launch_row_ctas(&self.kernels.sample.sample_prepare, rows, 1024, &k)
    }

    /// Sampling, merge half: `gathered` holds `world` ranks' packed words (`rank_words` each, the
    /// first `nf` of them f32); per row, merges the candidates, applies the filters, draws and
    /// writes [`SAMPLE_OUT_WORDS`] u32 words into `out` (see [`SampleOut`]).
    pub unsafe fn sample_finish(
        &self,
        gathered: DevPtr,
        (world, rank_words, nf): (usize, usize, usize),
        args: DevPtr,
        rows: usize,
        out: DevPtr,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        if world > SAMPLE_MAX_WORLD {
            return Err(GpuError::Invalid(format!(
                "sample_finish merges at most {SAMPLE_MAX_WORLD} ranks, got {world}"
            )));
        }
        let (wd, rw, nf) = (i(world), i(rank_words), i(nf));
        let k: [&dyn KernelArg; 6] = [&gathered, &wd, &rw, &nf, &args, &out];
        self.launch_row_ctas(&self.kernels.sample.sample_finish, rows, 1024, &k)
    }
}
