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

use candle_core::{DType, Tensor};

use crate::collective::Collective;
use crate::parallel::VocabParallelHead;
use crate::sampling::{by_value_desc, exchange, max_sumexp, merge_lse, top_indices};
use crate::{Error, Result};

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
    let (mut f, mut u) = (Vec::new(), Vec::new());
    for (raw, t) in values.iter_mut().zip(targets) {
        raw.iter_mut()
            .filter(|v| v.is_nan())
            .for_each(|v| *v = f32::NEG_INFINITY);
        let (m, s) = max_sumexp(raw);
        let own =
            t.id.checked_sub(start)
                .and_then(|i| raw.get(i as usize).copied())
                .unwrap_or(f32::NEG_INFINITY);
        f.extend([m, s, own]);
        let top = top_indices(raw, t.top.min(width));
        f.extend(top.iter().map(|&i| raw[i as usize]));
        u.extend(top.iter().map(|&i| start + i));
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
        .iter()
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
    fn a_row_count_mismatch_is_an_error() {
        let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let one = [PromptTarget { id: 0, top: 1 }];
        assert!(prompt_logprobs_logits(&logits, &SingleRank, &one).is_err());
    }
}
