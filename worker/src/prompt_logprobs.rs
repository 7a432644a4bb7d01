//! Prompt log-probabilities (vLLM's `prompt_logprobs`) from the vocab-parallel head.
//!
//! For a prompt token at position `t ≥ 1`, the distribution is the one the model predicts from
//! the hidden state at `t − 1`; the value is the **raw** log-softmax (unpenalised, untempered: the
//! same quantity as a sampled token's `logprob`, vLLM's `raw_logprobs`), over the FULL vocabulary.
//!
//! The exchange reuses the sampler's machinery (`sampling.rs`): each rank packs, per row, the
//! `(max, Σ exp(x − max))` of its raw slice, the raw logit of the target token if it owns it
//! (`−∞` otherwise: exactly one rank owns each id), and its own top `k` (value, global id); one
//! pair of `all_gather` calls merges them exactly (global log-sum-exp in f64, the global top `k`
//! is in the union of the per-rank top `k`). The rank (vLLM: the number of vocabulary entries
//! whose logit is `≥` the target's, the target itself included) needs the target's logit first,
//! so each rank then counts its own entries and a third `all_gather` sums the counts. With world
//! size 1 nothing is sent. TP = 1, 2, 4 therefore give the same values.
//!
//! The executor sees one chunk at a time: [`PromptJob::plan`] says which positions a chunk
//! scores and from which hidden rows; the row that predicts the next chunk's first token is kept
//! in the sequence's state (`carry`) until then.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::collective::Collective;
use crate::model::R4bModel;
use crate::parallel::VocabParallelHead;
use crate::sampling::{by_value_desc, exchange, max_sumexp, merge_lse, top_indices};
use crate::{Error, Result};

/// Prompt positions scored per pass of the head (bounds the logits held at once).
const ROWS_PER_PASS: usize = 256;

/// One prompt position to score: the row's hidden state predicts `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptTarget {
    /// The prompt token at this position.
    pub id: u32,
    /// Alternatives to return (`prompt_logprobs = k`).
    pub top: usize,
}

/// The log-probability of one prompt token.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprob {
    /// The token.
    pub id: u32,
    /// Its raw log-probability.
    pub logprob: f32,
    /// `1 +` the number of other tokens with a raw logit at least as high.
    pub rank: u32,
    /// The `top` most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Where a prompt position's predicting hidden state is.
#[derive(Clone, Copy, Debug)]
pub(crate) enum HiddenRow {
    /// The sequence's carried row (the position before the chunk).
    Carry,
    /// This row of the step's hidden states (`[T, hidden]`, all chunks).
    Step(usize),
}

/// The prompt positions one chunk scores (`prompt_logprobs`).
pub(crate) struct PromptJob {
    /// Index of the chunk in the step.
    pub(crate) chunk: usize,
    /// The carried row, when the first target uses it.
    pub(crate) carry: Option<Tensor>,
    /// `(prompt position, where its hidden state is, target)`, in position order.
    pub(crate) targets: Vec<(u32, HiddenRow, PromptTarget)>,
    /// Step row to carry into the sequence's next chunk (its last position, still in the prompt).
    pub(crate) keep: Option<usize>,
}

/// One chunk of a step, as the prompt-logprob planner sees it.
pub(crate) struct ChunkSpan<'a> {
    /// Index of the chunk in the step.
    pub(crate) index: usize,
    /// Row of the chunk's first token among the step's hidden states.
    pub(crate) row: usize,
    /// Position of the chunk's first token.
    pub(crate) start: usize,
    /// The chunk's tokens.
    pub(crate) tokens: &'a [u32],
    /// The sequence's prompt length.
    pub(crate) prompt_len: usize,
}

impl PromptJob {
    /// What chunk `c` of a sequence asking for `k` alternatives scores: every prompt position
    /// `t ≥ 1` it holds, predicted by the hidden state at `t − 1`: the sequence's `carry` (the
    /// previous chunk's last row) for the chunk's first token (a first chunk after a preemption
    /// has none and skips that position, which the coordinator already has), a row of this step
    /// for the others. `None` when there is nothing to score and nothing to carry (a decode).
    pub(crate) fn plan(c: &ChunkSpan, k: usize, carry: Option<&Tensor>) -> Option<PromptJob> {
        let n = c.tokens.len();
        let mut targets = Vec::new();
        for t in c.start.max(1)..(c.start + n).min(c.prompt_len) {
            let src = if t > c.start {
                HiddenRow::Step(c.row + t - 1 - c.start)
            } else if carry.is_some() {
                HiddenRow::Carry
            } else {
                continue;
            };
            let target = PromptTarget {
                id: c.tokens[t - c.start],
                top: k,
            };
            targets.push((t as u32, src, target));
        }
        let keep = (c.start + n < c.prompt_len).then(|| c.row + n - 1);
        (!targets.is_empty() || keep.is_some()).then(|| PromptJob {
            chunk: c.index,
            carry: carry.cloned(),
            targets,
            keep,
        })
    }
}

/// Scores every job's targets over the step's hidden states `[T, hidden]` (one vocab-parallel
/// exchange for all of them) and picks the rows they carry on.
pub(crate) fn score_prompts(
    model: &R4bModel,
    hidden: &Tensor,
    jobs: &[PromptJob],
) -> Result<Vec<(Vec<PromptLogprob>, Option<Tensor>)>> {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for job in jobs {
        for &(_, src, target) in &job.targets {
            let row = match (src, &job.carry) {
                (HiddenRow::Carry, Some(c)) => c.clone(),
                (HiddenRow::Step(i), _) => hidden.narrow(0, i, 1)?,
                (HiddenRow::Carry, None) => {
                    return Err(Error::Step("prompt logprobs: no carried row".into()))
                }
            };
            rows.push(row);
            targets.push(target);
        }
    }
    // In slices of rows, so a long prefill never holds [T, V / world] logits at once (R-4B: a
    // 2048-token chunk would be 1.2 GB at TP = 1); every rank slices alike.
    let mut scored = Vec::with_capacity(rows.len());
    for (rows, targets) in rows
        .chunks(ROWS_PER_PASS)
        .zip(targets.chunks(ROWS_PER_PASS))
    {
        scored.extend(model.prompt_logprobs(&Tensor::cat(rows, 0)?, targets)?);
    }
    let mut scored = scored.into_iter();
    jobs.iter()
        .map(|job| {
            let entries: Vec<PromptLogprob> = scored.by_ref().take(job.targets.len()).collect();
            // A copy, so the step's [T, hidden] buffer is not kept alive by one row.
            let keep = job
                .keep
                .map(|i| hidden.narrow(0, i, 1).and_then(|r| r.copy()))
                .transpose()?;
            Ok((entries, keep))
        })
        .collect()
}

/// Scores one target per row of `hidden [R, hidden]` (every rank calls it with the same rows and
/// gets the same result).
pub fn prompt_logprobs(
    head: &VocabParallelHead,
    comm: &dyn Collective,
    hidden: &Tensor,
    targets: &[PromptTarget],
) -> Result<Vec<PromptLogprob>> {
    let logits = head.local_logits(hidden)?;
    prompt_logprobs_logits(&logits, comm, targets)
}

/// Scores one target per row of this rank's logits `[R, V / world]` (rank `r` holds the global
/// ids `r · w .. (r + 1) · w`).
pub fn prompt_logprobs_logits(
    local_logits: &Tensor,
    comm: &dyn Collective,
    targets: &[PromptTarget],
) -> Result<Vec<PromptLogprob>> {
    let (r, width) = local_logits.dims2()?;
    if r != targets.len() {
        return Err(Error::Step(format!(
            "prompt logprobs: {r} logit rows for {} targets",
            targets.len()
        )));
    }
    if r == 0 {
        return Ok(Vec::new());
    }
    let start = comm
        .rank()
        .checked_mul(width)
        .and_then(|s| u32::try_from(s).ok())
        .ok_or_else(|| Error::Step("prompt logprobs: vocabulary offset overflows u32".into()))?;
    let mut values = local_logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    // Rows are independent: one row per rayon task (the same arithmetic per row, so the same
    // values; the GPU engine scores up to max_seqs rows of 150k logits per call here).
    let per_row: Vec<(Vec<f32>, Vec<u32>)> = values
        .par_iter_mut()
        .zip(targets)
        .map(|(raw, t)| {
            raw.iter_mut()
                .filter(|v| v.is_nan())
                .for_each(|v| *v = f32::NEG_INFINITY);
            let (m, s) = max_sumexp(raw);
            let own =
                t.id.checked_sub(start)
                    .and_then(|i| raw.get(i as usize).copied())
                    .unwrap_or(f32::NEG_INFINITY);
            let top = top_indices(raw, t.top.min(width));
            let mut f = vec![m, s, own];
            f.extend(top.iter().map(|&i| raw[i as usize]));
            (f, top.iter().map(|&i| start + i).collect())
        })
        .collect();
    let (mut f, mut u) = (Vec::new(), Vec::new());
    for (rf, ru) in per_row {
        f.extend(rf);
        u.extend(ru);
    }
    let parts = exchange(comm, local_logits, f, u)?;
    let (mut of, mut ou) = (0, 0);
    let mut out = Vec::with_capacity(r);
    let mut target_logits = Vec::with_capacity(r);
    for t in targets {
        let n = t.top.min(width);
        let mut pairs = Vec::with_capacity(parts.len());
        let mut target = f32::NEG_INFINITY;
        let mut top: Vec<(f32, u32)> = Vec::with_capacity(n * parts.len());
        for (pf, pu) in &parts {
            pairs.push((pf[of], pf[of + 1]));
            // Only the owner's value is finite.
            target = target.max(pf[of + 2]);
            top.extend(
                pf[of + 3..of + 3 + n]
                    .iter()
                    .copied()
                    .zip(pu[ou..ou + n].iter().copied()),
            );
        }
        of += 3 + n;
        ou += n;
        let lse = merge_lse(&pairs);
        let lp = |x: f32| (f64::from(x) - lse) as f32;
        top.sort_by(|a, b| by_value_desc(*a, *b));
        top.truncate(t.top);
        target_logits.push(target);
        out.push(PromptLogprob {
            id: t.id,
            logprob: lp(target),
            rank: 0,
            top: top.iter().map(|&(x, id)| (id, lp(x))).collect(),
        });
    }
    // Ranks: each rank counts its entries at least as high as the (now known) target logit.
    let counts: Vec<u32> = values
        .par_iter()
        .zip(&target_logits)
        .map(|(raw, &x)| raw.iter().filter(|&&v| v >= x).count() as u32)
        .collect();
    let total = sum_over_ranks(comm, local_logits, counts)?;
    for (o, c) in out.iter_mut().zip(total) {
        o.rank = c.max(1);
    }
    Ok(out)
}

/// Element-wise sum of `counts` over the group (one `all_gather`).
fn sum_over_ranks(comm: &dyn Collective, like: &Tensor, counts: Vec<u32>) -> Result<Vec<u32>> {
    if comm.world_size() == 1 {
        return Ok(counts);
    }
    let n = counts.len();
    let all = comm.all_gather(&Tensor::from_vec(counts, n, like.device())?)?;
    let mut total = vec![0u32; n];
    for t in all {
        let v = t.flatten_all()?.to_vec1::<u32>()?;
        if v.len() != n {
            return Err(Error::Step(format!(
                "prompt logprobs: a rank sent {} counts, expected {n}",
                v.len()
            )));
        }
        total.iter_mut().zip(v).for_each(|(a, b)| *a += b);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::SingleRank;
    use candle_core::Device;

    #[test]
    fn values_ranks_and_top_match_hand_computed() {
        // Row 0: logits (1, 3, 0, 3): lse = ln(e + 2e³ + 1). Target 0 (logit 1): 3 logits ≥ 1.
        // Row 1: all equal: every logprob is −ln 4, and every entry ties (rank 4).
        let logits =
            Tensor::new(&[[1f32, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0]], &Device::Cpu).unwrap();
        let targets = [
            PromptTarget { id: 0, top: 3 },
            PromptTarget { id: 2, top: 0 },
        ];
        let got = prompt_logprobs_logits(&logits, &SingleRank, &targets).unwrap();
        let lse = (1f64.exp() + 2.0 * 3f64.exp() + 1.0).ln();
        let lp = |x: f64| (x - lse) as f32;
        assert_eq!(got[0].id, 0);
        assert!((got[0].logprob - lp(1.0)).abs() < 1e-6);
        assert_eq!(got[0].rank, 3);
        let ids: Vec<u32> = got[0].top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 0], "value desc, then id asc");
        assert!((got[0].top[0].1 - lp(3.0)).abs() < 1e-6);
        assert!((got[1].logprob + 4f32.ln()).abs() < 1e-6);
        assert_eq!((got[1].rank, got[1].top.len()), (4, 0));
    }

    #[test]
    fn plans_cover_each_prompt_position_once_across_chunks() {
        let carry = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
        let tokens = [10, 11, 12, 13];
        let span = |start, prompt_len| ChunkSpan {
            index: 1,
            row: 5,
            start,
            tokens: &tokens,
            prompt_len,
        };
        let positions = |j: &PromptJob| -> Vec<(u32, u32)> {
            j.targets.iter().map(|&(t, _, g)| (t, g.id)).collect()
        };
        // First chunk (positions 0..4 of a 10-token prompt): targets 1..4, rows 5..8; the last
        // row (8) is carried.
        let j = PromptJob::plan(&span(0, 10), 2, None).unwrap();
        assert_eq!(positions(&j), vec![(1, 11), (2, 12), (3, 13)]);
        assert!(matches!(j.targets[0].1, HiddenRow::Step(5)));
        assert_eq!((j.keep, j.chunk, j.targets[0].2.top), (Some(8), 1, 2));
        // Middle chunk (4..8) with the carry: position 4 from it, 5..8 from rows 5..8.
        let j = PromptJob::plan(&span(4, 10), 2, Some(&carry)).unwrap();
        assert_eq!(positions(&j), vec![(4, 10), (5, 11), (6, 12), (7, 13)]);
        assert!(matches!(j.targets[0].1, HiddenRow::Carry));
        assert!(matches!(j.targets[3].1, HiddenRow::Step(7)));
        // Last chunk (8..12 of a 10-token prompt, output after it): 8, 9; nothing carried.
        let j = PromptJob::plan(&span(8, 10), 2, Some(&carry)).unwrap();
        assert_eq!(positions(&j), vec![(8, 10), (9, 11)]);
        assert_eq!(j.keep, None);
        // After a preemption, no carry: the chunk's first position is skipped.
        let j = PromptJob::plan(&span(4, 10), 2, None).unwrap();
        assert_eq!(positions(&j)[0], (5, 11));
        // A decode: nothing.
        assert!(PromptJob::plan(&span(12, 10), 2, Some(&carry)).is_none());
    }

    #[test]
    fn a_row_count_mismatch_is_an_error() {
        let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let one = [PromptTarget { id: 0, top: 1 }];
        assert!(prompt_logprobs_logits(&logits, &SingleRank, &one).is_err());
    }
}
