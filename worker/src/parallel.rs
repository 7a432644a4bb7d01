//! Tensor-parallel layer types. Each type owns its shard axis and the communication it needs,
//! so the model code never branches on the rank:
//!
//! | type | weight split | after the matmul |
//! |---|---|---|
//! | [`ColumnParallelLinear`] | out dim (rows of `[out, in]`) | nothing (output stays sharded) |
//! | [`RowParallelLinear`] | in dim (columns of `[out, in]`) | all-reduce sum |
//! | [`VocabParallelEmbedding`] | vocab rows | all-reduce sum |
//! | [`VocabParallelHead`] | vocab rows | per-rank top-k candidates gathered (never the full logits) |
//! | [`Linear`] | replicated | nothing |

use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use crate::checkpoint::Weights;
use crate::collective::Collective;
pub use crate::shard::Shard;
use crate::Result;

/// `y = x Wᵀ + b` on `[T, in]`, for weights `[out, in]` (PyTorch layout).
fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// A replicated linear layer (vision tower, projector).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{w}.weight [out, in]` and, if `bias`, `{w}.bias [out]`.
    pub fn load(w: &Weights, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let weight = w.get("weight", &[out, inp])?;
        let bias = if bias {
            Some(w.get("bias", &[out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `[T, in] -> [T, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        affine(x, &self.weight, self.bias.as_ref())
    }
}

/// Linear layer split by output features; the output stays sharded (`[T, out / world]`).
#[derive(Clone, Debug)]
pub struct ColumnParallelLinear {
    weight: Tensor,
}

impl ColumnParallelLinear {
    /// Loads this rank's rows of `{w}.weight [out, in]` (no bias: Qwen3 has none).
    pub fn load(w: &Weights, out: usize, inp: usize, shard: Shard) -> Result<Self> {
        Ok(ColumnParallelLinear {
            weight: w.rows("weight", &[out, inp], shard)?,
        })
    }

    /// `[T, in] -> [T, out / world]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        affine(x, &self.weight, None)
    }
}

/// Linear layer split by input features; partial products are summed over ranks.
#[derive(Clone, Debug)]
pub struct RowParallelLinear {
    weight: Tensor,
    comm: Arc<dyn Collective>,
}

impl RowParallelLinear {
    /// Loads this rank's columns of `{w}.weight [out, in]`.
    pub fn load(
        w: &Weights,
        out: usize,
        inp: usize,
        shard: Shard,
        comm: Arc<dyn Collective>,
    ) -> Result<Self> {
        Ok(RowParallelLinear {
            weight: w.cols("weight", &[out, inp], shard)?,
            comm,
        })
    }

    /// `[T, in / world] -> [T, out]` (all-reduced).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let partial = affine(x, &self.weight, None)?;
        if self.comm.world_size() == 1 {
            return Ok(partial);
        }
        Ok(self.comm.all_reduce_sum(&partial)?)
    }
}

/// Token embedding split by vocabulary rows: each rank looks up the ids it owns (zeros for the
/// others) and the rows are summed over ranks.
#[derive(Clone, Debug)]
pub struct VocabParallelEmbedding {
    weight: Tensor,
    vocab_start: u32,
    vocab_local: u32,
    comm: Arc<dyn Collective>,
}

impl VocabParallelEmbedding {
    /// Loads this rank's rows of `{w}.weight [vocab, hidden]`.
    pub fn load(
        w: &Weights,
        vocab: usize,
        hidden: usize,
        shard: Shard,
        comm: Arc<dyn Collective>,
    ) -> Result<Self> {
        let local = shard.part(vocab, "vocab_size")?;
        Ok(VocabParallelEmbedding {
            weight: w.rows("weight", &[vocab, hidden], shard)?,
            vocab_start: (shard.rank * local) as u32,
            vocab_local: local as u32,
            comm,
        })
    }

    /// `ids [T] -> [T, hidden]`.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let (t, hidden) = (ids.len(), self.weight.dim(1)?);
        let device = self.weight.device();
        // 1. Local row index for owned ids; other ids read row 0 and are masked to zero.
        let mut local = Vec::with_capacity(t);
        let mut mask = Vec::with_capacity(t);
        for &id in ids {
            let owned = id >= self.vocab_start && id < self.vocab_start + self.vocab_local;
            local.push(if owned { id - self.vocab_start } else { 0 });
            mask.push(if owned { 1f32 } else { 0f32 });
        }
        let idx = Tensor::from_vec(local, t, device)?;
        let rows = self.weight.index_select(&idx, 0)?; // [T, hidden]
        if self.comm.world_size() == 1 {
            return Ok(rows);
        }
        let mask = Tensor::from_vec(mask, (t, 1), device)?.to_dtype(rows.dtype())?;
        let rows = rows.broadcast_mul(&mask)?;
        debug_assert_eq!(rows.dims(), &[t, hidden]);
        Ok(self.comm.all_reduce_sum(&rows)?)
    }
}

/// The best `k` (logit, token id) pairs of one row, highest first (ties: lower id first).
#[derive(Clone, Debug, PartialEq)]
pub struct Candidates {
    /// Logits, descending.
    pub logits: Vec<f32>,
    /// Token ids, same order.
    pub ids: Vec<u32>,
}

impl Candidates {
    /// The greedy token (arg-max; lowest id among equal maxima, as `torch.argmax`).
    pub fn greedy(&self) -> Option<u32> {
        self.ids.first().copied()
    }
}

/// Sorts (logit, id) pairs: logit descending, then id ascending; NaN last.
fn sort_pairs(pairs: &mut [(f32, u32)]) {
    pairs.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
    });
}

/// Top `k` of each row of `logits [B, V_local]`, with ids offset by `vocab_start`.
fn local_top_k(logits: &Tensor, k: usize, vocab_start: u32) -> Result<Vec<Vec<(f32, u32)>>> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let mut pairs: Vec<(f32, u32)> = row
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    (
                        if v.is_nan() { f32::NEG_INFINITY } else { v },
                        vocab_start + i as u32,
                    )
                })
                .collect();
            let k = k.min(pairs.len());
            if k < pairs.len() {
                pairs.select_nth_unstable_by(k, |a, b| {
                    b.0.partial_cmp(&a.0)
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(a.1.cmp(&b.1))
                });
                pairs.truncate(k);
            }
            sort_pairs(&mut pairs);
            pairs
        })
        .collect())
}

/// The output projection split by vocabulary rows. Sampling works on per-rank candidates: each
/// rank keeps its top `k` and only those `k · world` pairs per row cross the group.
#[derive(Clone, Debug)]
pub struct VocabParallelHead {
    weight: Tensor,
    vocab_start: u32,
    comm: Arc<dyn Collective>,
}

impl VocabParallelHead {
    /// Loads this rank's rows of `{w}.weight [vocab, hidden]` (`lm_head` or the tied embedding).
    pub fn load(
        w: &Weights,
        vocab: usize,
        hidden: usize,
        shard: Shard,
        comm: Arc<dyn Collective>,
    ) -> Result<Self> {
        let local = shard.part(vocab, "vocab_size")?;
        Ok(VocabParallelHead {
            weight: w.rows("weight", &[vocab, hidden], shard)?,
            vocab_start: (shard.rank * local) as u32,
            comm,
        })
    }

    /// This rank's logits, `[B, hidden] -> [B, vocab / world]`.
    pub fn local_logits(&self, x: &Tensor) -> Result<Tensor> {
        affine(x, &self.weight, None)
    }

    /// The global top `k` of each row, from per-rank top `k` lists (every rank gets the result).
    pub fn candidates(&self, x: &Tensor, k: usize) -> Result<Vec<Candidates>> {
        let k = k.max(1);
        let local = local_top_k(&self.local_logits(x)?, k, self.vocab_start)?;
        let rows = local.len();
        let merged: Vec<Vec<(f32, u32)>> = if self.comm.world_size() == 1 {
            local
        } else {
            // Pack [rows, k] logits and ids (rows may hold fewer than k if V_local < k).
            let kk = local.first().map(|r| r.len()).unwrap_or(0);
            let logits: Vec<f32> = local.iter().flat_map(|r| r.iter().map(|p| p.0)).collect();
            let ids: Vec<u32> = local.iter().flat_map(|r| r.iter().map(|p| p.1)).collect();
            let device = x.device();
            let all_l = self
                .comm
                .all_gather(&Tensor::from_vec(logits, (rows, kk), device)?)?;
            let all_i = self
                .comm
                .all_gather(&Tensor::from_vec(ids, (rows, kk), device)?)?;
            let mut merged = vec![Vec::with_capacity(kk * all_l.len()); rows];
            for (l, i) in all_l.iter().zip(&all_i) {
                let (l, i) = (l.to_vec2::<f32>()?, i.to_vec2::<u32>()?);
                for (r, m) in merged.iter_mut().enumerate() {
                    m.extend(l[r].iter().copied().zip(i[r].iter().copied()));
                }
            }
            merged
        };
        Ok(merged
            .into_iter()
            .map(|mut pairs| {
                sort_pairs(&mut pairs);
                pairs.truncate(k);
                Candidates {
                    logits: pairs.iter().map(|p| p.0).collect(),
                    ids: pairs.iter().map(|p| p.1).collect(),
                }
            })
            .collect())
    }

    /// The full logits `[B, vocab]`, gathered from every rank. For tests and diagnostics only:
    /// sampling uses [`VocabParallelHead::candidates`].
    pub fn full_logits(&self, x: &Tensor) -> Result<Tensor> {
        let local = self.local_logits(x)?.contiguous()?;
        if self.comm.world_size() == 1 {
            return Ok(local);
        }
        let parts = self.comm.all_gather(&local)?;
        Ok(Tensor::cat(&parts, D::Minus1)?)
    }
}
