//! Sampling on the GPU: the two halves of [`crate::sampling`] as kernels (`sample_partial` +
//! `sample_prepare`, `sample_finish` in kernels/src/sample.cu), with the same packed layout, arithmetic order
//! and counter-based draw as the host sampler, so both pick the same tokens (`r4b-gpu-check
//! sample` compares them).
//!
//! Per step: one upload of the rows' arguments (and their penalty entries, if any); the
//! rank-local stage 1 over [`parts_for`] parts of each logits row at once (penalties,
//! temperature, normalisers, each part's top candidates: a few rows still use the whole GPU);
//! stage 2 merging the parts into the packed words; one all-gather of the packed candidates
//! through the group's [`DeviceCollective`] (nothing moves for [`crate::collective::Solo`]); the
//! merge kernel (top-k, top-p, min-p, seeded draw, logprobs); one download of 44 words per row.
//! Nothing of the vocabulary leaves the GPU.
//!
//! Every rank takes the same path (GPU or host sampler) for the same rows: [`GpuSampler::accepts`]
//! depends only on the rows and the group's configuration.

use r4b_kernels::{
    DBuf, DevPtr, Gpu, SampleOut, SampleRowArgs, SAMPLE_MAX_K, SAMPLE_MAX_WORLD, SAMPLE_OUT_WORDS,
    SAMPLE_PART_WORDS, SAMPLE_ROW_WORDS,
};

use super::alloc;
use super::weights::gpu_err;
use crate::collective::DeviceCollective;
use crate::sampling::{self, SampleRow, SampledToken, MAX_CANDIDATES, MAX_TOP_LOGPROBS};
use crate::{Error, Result};

/// Packed words one row may take per rank (head, candidates × 3, raw top × 2).
const MAX_ROW_WORDS: usize = 4 + 3 * MAX_CANDIDATES + 2 * MAX_TOP_LOGPROBS as usize;
/// Stage 1 aims at this many CTAs (row × part) so that a few rows still fill the GPU.
const TARGET_CTAS: usize = 256;
/// Most parts per row, and the fewest logits per part.
const MAX_PARTS: usize = 32;
const MIN_PART: usize = 2048;

/// Parts per row for `rows` rows of `width` logits (stage 1 runs rows × parts CTAs).
pub fn parts_for(rows: usize, width: usize) -> usize {
    (TARGET_CTAS / rows.max(1))
        .clamp(1, MAX_PARTS)
        .min(width / MIN_PART)
        .max(1)
}

/// Device buffers of the GPU sampler for up to `max_rows` rows per step.
pub struct GpuSampler {
    max_rows: usize,
    args: DBuf,
    /// Stage-1 scratch: `SAMPLE_PART_WORDS` per (row, part), for max(max_rows, TARGET_CTAS).
    scratch: DBuf,
    packed: DBuf,
    /// Every rank's packed words (a group that communicates: world > 1, or NCCL at 1).
    gathered: Option<DBuf>,
    out: DBuf,
    /// Penalty entries (u32 pairs) and their raw values, grown on demand.
    pen: Option<(DBuf, DBuf, usize)>,
    /// Token masks (structured output): row indices then bits, u32 words, grown on demand.
    mask: Option<(DBuf, usize)>,
}

/// What [`GpuSampler::prepare`] laid out: f32 and u32 words per rank.
#[derive(Clone, Copy, Debug)]
pub struct Packed {
    pub nf: usize,
    pub nu: usize,
}

impl Packed {
    /// Words per rank.
    pub fn words(&self) -> usize {
        self.nf + self.nu
    }
}

impl GpuSampler {
    /// Buffers for `max_rows` rows in the group of `comm` (a gather buffer unless its
    /// operations are no-ops).
    pub fn new(gpu: &Gpu, max_rows: usize, comm: &dyn DeviceCollective) -> Result<Self> {
        let (world, gather) = (comm.world_size(), !comm.is_noop());
        const _: () = assert!(MAX_CANDIDATES <= SAMPLE_MAX_K);
        let max_rows = max_rows.max(1);
        let packed_bytes = Self::gather_bytes(max_rows);
        Ok(GpuSampler {
            max_rows,
            args: alloc(gpu, max_rows * SAMPLE_ROW_WORDS * 4)?,
            scratch: alloc(gpu, max_rows.max(TARGET_CTAS) * SAMPLE_PART_WORDS * 4)?,
            packed: alloc(gpu, packed_bytes)?,
            gathered: if gather {
                Some(alloc(gpu, world * packed_bytes)?)
            } else {
                None
            },
            out: alloc(gpu, max_rows * SAMPLE_OUT_WORDS * 4)?,
            pen: None,
            mask: None,
        })
    }

    /// Whether the GPU sampler takes these rows: at most `max_rows`, distinct logits rows, a
    /// world size the merge kernel handles. Otherwise the caller samples on the host.
    pub fn accepts(&self, world: usize, rows: &[(usize, SampleRow)]) -> bool {
        let mut seen: Vec<usize> = rows.iter().map(|r| r.0).collect();
        seen.sort_unstable();
        seen.dedup();
        rows.len() <= self.max_rows && seen.len() == rows.len() && world <= SAMPLE_MAX_WORLD
    }

    /// Sets the columns each masked row's grammar disallows to `−∞` in this rank's logits (f32
    /// `[_, width]` at `logits`, row `rows[i].0` for `masks[i]`): one upload of the masked rows'
    /// indices and bits, one `apply_token_mask` launch. The buffer is the sampler's, not a
    /// graph's: this runs after the forward (a graph replay or not).
    ///
    /// # Safety
    /// `logits` holds every row named in `rows`, `width` f32 each.
    pub unsafe fn apply_masks(
        &mut self,
        gpu: &Gpu,
        (logits, width): (DevPtr, usize),
        rows: &[(usize, SampleRow)],
        masks: &[sampling::ShardMask],
    ) -> Result<()> {
        let words = width.div_ceil(32);
        let picked: Vec<(u32, &[u32])> = rows
            .iter()
            .zip(masks)
            .filter_map(|(&(ci, _), m)| m.as_deref().map(|m| (ci as u32, m)))
            .collect();
        if picked.is_empty() {
            return Ok(());
        }
        let n = picked.len();
        let mut host = Vec::with_capacity(n * (1 + words));
        host.extend(picked.iter().map(|p| p.0));
        for (_, m) in &picked {
            // A short mask disallows what it does not cover (as the host sampler reads it).
            host.extend((0..words).map(|w| m.get(w).copied().unwrap_or(0)));
        }
        if self.mask.as_ref().is_none_or(|m| m.1 < host.len()) {
            let cap = host.len().next_power_of_two();
            self.mask = None;
            self.mask = Some((alloc(gpu, cap * 4)?, cap));
        }
        let (buf, _) = self
            .mask
            .as_ref()
            .ok_or_else(|| Error::Gpu("GPU sampler: no mask buffer".into()))?;
        gpu.htod(&host, buf.ptr()).map_err(gpu_err)?;
        gpu.apply_token_mask(logits, width, buf.ptr(), n)
            .map_err(gpu_err)
    }

    /// Bytes of one rank's packed words for `max_rows` rows (what the gather moves per rank).
    pub fn gather_bytes(max_rows: usize) -> usize {
        max_rows * MAX_ROW_WORDS * 4
    }

    /// Samples one token per row from this rank's logits (f32 `[_, width]` at `logits`, global
    /// ids `start ..`; row `rows[i].0`, modified in place). Every rank of the group calls it with
    /// the same rows and gets the same tokens.
    ///
    /// # Safety
    /// `logits` holds every row named in `rows`, `width` f32 each.
    pub unsafe fn sample(
        &mut self,
        gpu: &Gpu,
        (logits, width, start): (DevPtr, usize, usize),
        comm: &dyn DeviceCollective,
        rows: &[(usize, SampleRow)],
    ) -> Result<Vec<SampledToken>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let world = comm.world_size();
        let recv = match (&self.gathered, comm.is_noop()) {
            (Some(g), _) => g.ptr(),
            (None, true) => self.packed.ptr(),
            (None, false) => {
                return Err(Error::Gpu(
                    "GPU sampler built without a gather buffer".into(),
                ))
            }
        };
        let packed = self.prepare(gpu, (logits, width, start), rows, None)?;
        let g = comm.all_gather_u32(gpu, self.packed.ptr(), recv, packed.words())?;
        self.finish(gpu, g, world, packed, rows.len())
    }

    /// The rank-local half: uploads the rows' arguments and penalty entries and runs
    /// `sample_prepare` into `dst` (default: this sampler's packed buffer).
    ///
    /// # Safety
    /// As [`GpuSampler::sample`]; `dst`, when given, holds the packed words.
    pub unsafe fn prepare(
        &mut self,
        gpu: &Gpu,
        (logits, width, start): (DevPtr, usize, usize),
        rows: &[(usize, SampleRow)],
        dst: Option<DevPtr>,
    ) -> Result<Packed> {
        if rows.len() > self.max_rows {
            return Err(Error::Step(format!(
                "GPU sampler: {} rows, room for {}",
                rows.len(),
                self.max_rows
            )));
        }
        let srows: Vec<SampleRow> = rows.iter().map(|r| r.1).collect();
        let (layout, nf, nu) = sampling::packed_layout(&srows, width)?;
        let start32 = u32::try_from(start)
            .ok()
            .filter(|s| s.checked_add(width as u32).is_some())
            .ok_or_else(|| Error::Step(format!("GPU sampler: slice start {start} too large")))?;
        let mut words = Vec::with_capacity(rows.len() * SAMPLE_ROW_WORDS);
        let mut pen: Vec<u32> = Vec::new();
        for (&(logits_row, row), &(plan, f_off, u_off)) in rows.iter().zip(&layout) {
            let entries = sampling::penalty_entries(&row, start32, width);
            let begin = (pen.len() / 2) as u32;
            pen.extend(entries.iter().flat_map(|&(i, c)| [i, c]));
            let p = row.params;
            let a = SampleRowArgs {
                logits_row: logits_row as u32,
                greedy: plan.greedy,
                logprobs: plan.logprobs,
                temperature: if plan.greedy { 1.0 } else { p.temperature },
                k_local: plan.k_local as u32,
                n_local: plan.n_local as u32,
                pen: (begin, (pen.len() / 2) as u32),
                repetition_penalty: p.repetition_penalty,
                frequency_penalty: p.frequency_penalty,
                presence_penalty: p.presence_penalty,
                f_off: f_off as u32,
                u_off: u_off as u32,
                keep: plan.keep as u32,
                n_keep: plan.n_keep as u32,
                top_k: p.top_k,
                top_p: p.top_p,
                min_p: p.min_p,
                seed: row.seed,
                counter: row.history.output_len() as u64,
            };
            words.extend_from_slice(&a.words());
        }
        let entries = pen.len() / 2;
        let grow = self.pen.as_ref().is_none_or(|p| p.2 < entries);
        if grow {
            let cap = entries.max(1).next_power_of_two().max(4096);
            self.pen = None; // free the old pair first
            self.pen = Some((alloc(gpu, cap * 8)?, alloc(gpu, cap * 4)?, cap));
        }
        let (pen_buf, pen_raw, _) = self
            .pen
            .as_ref()
            .ok_or_else(|| Error::Gpu("GPU sampler: no penalty buffer".into()))?;
        gpu.htod(&words, self.args.ptr()).map_err(gpu_err)?;
        gpu.htod(&pen, pen_buf.ptr()).map_err(gpu_err)?;
        let parts = parts_for(rows.len(), width);
        let shape = (rows.len(), width, parts);
        gpu.sample_partial(
            logits,
            shape,
            self.args.ptr(),
            pen_buf.ptr(),
            pen_raw.ptr(),
            self.scratch.ptr(),
        )
        .map_err(gpu_err)?;
        gpu.sample_prepare(
            self.scratch.ptr(),
            shape,
            start,
            self.args.ptr(),
            dst.unwrap_or(self.packed.ptr()),
            nf,
        )
        .map_err(gpu_err)?;
        Ok(Packed { nf, nu })
    }

    /// The merge half over `world` ranks' packed words at `gathered` (rank order), with the
    /// arguments of the last [`GpuSampler::prepare`]; downloads the tokens.
    ///
    /// # Safety
    /// `gathered` holds `world · packed.words()` words.
    pub unsafe fn finish(
        &mut self,
        gpu: &Gpu,
        gathered: DevPtr,
        world: usize,
        packed: Packed,
        rows: usize,
    ) -> Result<Vec<SampledToken>> {
        gpu.sample_finish(
            gathered,
            (world, packed.words(), packed.nf),
            self.args.ptr(),
            rows,
            self.out.ptr(),
        )
        .map_err(gpu_err)?;
        let mut words = vec![0u32; rows * SAMPLE_OUT_WORDS];
        gpu.dtoh(self.out.ptr(), &mut words).map_err(gpu_err)?;
        words
            .chunks_exact(SAMPLE_OUT_WORDS)
            .map(|w| {
                let o = SampleOut::from_words(w).map_err(gpu_err)?;
                if o.id == u32::MAX {
                    return Err(Error::Step("sampling: no candidates for a row".into()));
                }
                Ok(SampledToken {
                    id: o.id,
                    logprob: o.logprob,
                    top: o.top,
                })
            })
            .collect()
    }

    /// This sampler's packed buffer (the input of a one-rank [`GpuSampler::finish`]).
    pub fn packed_ptr(&self) -> DevPtr {
        self.packed.ptr()
    }

    /// The packed words of the last [`GpuSampler::prepare`] into this sampler's buffer, as the
    /// host sampler's `(f32, u32)` parts (checks).
    ///
    /// # Safety
    /// A `prepare` with `dst = None` ran before.
    pub unsafe fn packed_parts(&self, gpu: &Gpu, packed: Packed) -> Result<(Vec<f32>, Vec<u32>)> {
        let mut w = vec![0u32; packed.words()];
        gpu.dtoh(self.packed.ptr(), &mut w).map_err(gpu_err)?;
        let u = w.split_off(packed.nf);
        Ok((w.into_iter().map(f32::from_bits).collect(), u))
    }
}
