//! Token sampling from the vocab-parallel head, vLLM-compatible.
//!
//! Design:
//! - **Candidates, never the full logits.** Each rank holds `V / world` columns of the logits
//!   (151,936 / TP for R-4B). Gathering them would move `B · V` floats per step; instead every rank
//!   applies the penalties and the temperature to the ids it owns, keeps its own top `K` (value,
//!   global id) pairs per row, and only those cross the group. The merged, sorted union
//!   (value desc, id asc) is cut to the global top `K`, which is exactly the top `K` of the full
//!   vocabulary (a token of the global top `K` is in its rank's top `K`), so every world size sees
//!   the same candidate set.
//! - **Exact normaliser.** Probabilities are not renormalised over the candidates: every rank also
//!   sends `(max, Σ exp(x − max))` of its whole slice, and the global log-sum-exp over the FULL
//!   vocabulary is merged from those pairs (`M + ln Σ_r s_r e^{m_r − M}`, in f64). Candidate
//!   probabilities and logprobs are therefore exact, not "softmax over the top K".
//! - **K (candidates per row).** Greedy rows: `K = 1`. Sampling rows: `K = top_k` when
//!   `0 < top_k ≤` [`MAX_CANDIDATES`] (top-k is applied first, so nothing outside it can matter:
//!   exact); otherwise `K =` [`DEFAULT_CANDIDATES`] (`top_k == 0`) or [`MAX_CANDIDATES`]
//!   (larger `top_k`). Probability mass outside the candidate set is the *tail*: it counts in the
//!   normaliser (top-p's mass is measured against the full vocabulary), but tail tokens are never
//!   drawn. So when the nucleus (or plain temperature sampling) would reach beyond the top `K`,
//!   the draw is limited to the top `K` and renormalised over it. `top_logprobs + 1` needs no room
//!   in `K`: logprobs use their own raw candidates (below).
//! - **Filters**, in vLLM's (v0) order on the sorted candidates: top-k, then top-p (smallest prefix
//!   whose mass ≥ top_p, renormalised after top-k as vLLM does; at least one token), then min-p
//!   (drop `p < min_p · p_max`); each keeps a prefix. The draw is renormalised over what is kept.
//! - **RNG: counter-based, stateless.** The uniform of a draw is the `(n + 1)`-th output of a
//!   SplitMix64 generator seeded with the sequence's seed, `n` = the number of tokens the sequence
//!   has generated ([`TokenHistory::output_len`]); see [`uniform`]. No state lives in the worker, so
//!   every rank draws the same token, and a preempted-and-recomputed sequence (or the same request
//!   with the same seed) gets the same tokens.
//! - **Logprobs: raw** (vLLM's default `logprobs_mode = raw_logprobs`): the log-softmax of the
//!   unpenalised, untempered logits. Each rank sends a second `(max, sumexp)` pair of its raw slice,
//!   the raw logit of each of its candidates (the chosen token is always a candidate, whichever rank
//!   owns it), and its raw top `top_logprobs`; the merge gives exact values. Without `logprobs`,
//!   `logprob` is 0 and `top` is empty, and no raw normaliser is computed.
//! - **Communication:** with world size 1 nothing is sent. Otherwise every row of the batch is packed
//!   into one f32 and one u32 tensor: exactly 2 `all_gather` calls per step, whatever `B`.
//!
//! - **Structured output** (a grammar's token mask, [`r4b_model::grammar`]): each rank receives the
//!   mask bits of its own shard per row and sets the disallowed ids of the *processed* logits to
//!   `−∞` after the penalties, so candidates, normaliser, top-p and the draw see only allowed ids
//!   (as vLLM applies its grammar bitmask before sampling). Logprobs stay raw (unmasked).
//!
//! Here the local work (penalties, top-k selection, exp sums) runs on the host over
//! `[B, V / world]` (the CPU engine; the reference for the GPU sampler, `gpu::GpuSampler`, which
//! runs both halves as kernels over the same packed layout: [`packed_layout`],
//! [`penalty_entries`], [`finish_packed`]).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Tensor};

use crate::collective::Collective;
use crate::parallel::VocabParallelHead;
use crate::{Error, Result};

/// Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`).
pub const GREEDY_TEMPERATURE: f32 = 1e-5;
/// Candidates per row when `top_k` is off.
pub const DEFAULT_CANDIDATES: usize = 256;
/// Most candidates per row (a larger `top_k` is cut to this many).
pub const MAX_CANDIDATES: usize = 1024;
/// Most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub use r4b_model::sampling::MAX_TOP_LOGPROBS;

/// Plain-Rust sampling parameters (mirrors `cluster.v1.SamplingParams`).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (or below [`GREEDY_TEMPERATURE`]) = greedy arg-max.
    pub temperature: f32,
    /// Nucleus mass, `(0, 1]`; 1 = off.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens; 0 = off.
    pub top_k: u32,
    /// Drop tokens with `p < min_p · p_max`, `[0, 1]`; 0 = off.
    pub min_p: f32,
    /// The request's seed (the caller resolves it into [`SampleRow::seed`]).
    pub seed: Option<u64>,
    /// OpenAI presence penalty on generated tokens, `[-2, 2]`.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty on generated tokens, `[-2, 2]`.
    pub frequency_penalty: f32,
    /// HF/vLLM repetition penalty on prompt and generated tokens, `> 0`; 1 = off.
    pub repetition_penalty: f32,
    /// Return the chosen token's log-probability.
    pub logprobs: bool,
    /// Also return this many most likely tokens (with `logprobs`), `0..=20`.
    pub top_logprobs: u32,
}

impl Default for SamplingParams {
    /// Greedy, no penalties, no logprobs.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges (the shared bounds of `r4b_model::sampling`); a violation is
    /// [`Error::Step`] naming the field.
    pub fn validate(&self) -> Result<()> {
        r4b_model::check_sampling(&self.to_proto())
            .map_err(|e| Error::Step(format!("sampling params: {e}")))
    }

    /// The same parameters as a `cluster.v1.SamplingParams`.
    pub fn to_proto(&self) -> r4b_proto::v1::SamplingParams {
        r4b_proto::v1::SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            logprobs: self.logprobs,
            top_logprobs: self.top_logprobs,
            prompt_logprobs: None,
        }
    }

    /// Whether this is greedy decoding (`temperature < 1e-5`).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    /// Candidates kept per row (`K`, see the module doc).
    pub fn candidates(&self) -> usize {
        if self.is_greedy() {
            1
        } else if self.top_k > 0 {
            (self.top_k as usize).min(MAX_CANDIDATES)
        } else {
            DEFAULT_CANDIDATES
        }
    }
}

/// Token history of one sequence, for penalties: counts of generated tokens and the set of
/// prompt tokens.
#[derive(Clone, Debug, Default)]
pub struct TokenHistory {
    prompt: BTreeSet<u32>,
    output: BTreeMap<u32, u32>,
    output_len: usize,
}

impl TokenHistory {
    /// Records a prompt token (repetition penalty only).
    pub fn push_prompt(&mut self, id: u32) {
        self.prompt.insert(id);
    }

    /// Records a generated token (all penalties; advances the RNG counter).
    pub fn push_output(&mut self, id: u32) {
        *self.output.entry(id).or_insert(0) += 1;
        self.output_len += 1;
    }

    /// The number of generated tokens so far.
    pub fn output_len(&self) -> usize {
        self.output_len
    }

    /// How often `id` was generated.
    pub fn output_count(&self, id: u32) -> u32 {
        self.output.get(&id).copied().unwrap_or(0)
    }

    /// Whether `id` is in the prompt.
    pub fn in_prompt(&self, id: u32) -> bool {
        self.prompt.contains(&id)
    }
}

/// One row to sample.
#[derive(Clone, Copy, Debug)]
pub struct SampleRow<'a> {
    /// The sequence's sampling parameters.
    pub params: &'a SamplingParams,
    /// The sequence's tokens so far (penalties, RNG counter).
    pub history: &'a TokenHistory,
    /// Per-sequence seed (request seed or a random one chosen by the caller).
    pub seed: u64,
}

/// A sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    /// The token id.
    pub id: u32,
    /// Its raw log-probability (0 unless `logprobs`).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens under the raw distribution, most likely first
    /// (ties: lower id first); empty unless `logprobs`.
    pub top: Vec<(u32, f32)>,
}

/// Samples one token per row of `hidden [B, hidden]` from the vocab-parallel head. Every rank of
/// the group calls it with the same rows (collective inside); every rank gets the same result.
pub fn sample(
    head: &VocabParallelHead,
    comm: &dyn Collective,
    hidden: &Tensor,
    rows: &[SampleRow],
) -> Result<Vec<SampledToken>> {
    sample_masked(head, comm, hidden, rows, &[])
}

/// This rank's allowed ids of one row, bit `j` of word `j / 32` = local column `j`; `None` = no
/// constraint. Missing words disallow their ids.
pub type ShardMask = Option<Vec<u32>>;

/// [`sample`] with a token mask per row (`masks` empty = none; otherwise one per row).
pub fn sample_masked(
    head: &VocabParallelHead,
    comm: &dyn Collective,
    hidden: &Tensor,
    rows: &[SampleRow],
    masks: &[ShardMask],
) -> Result<Vec<SampledToken>> {
    let logits = head.local_logits(hidden)?;
    sample_logits_masked(&logits, comm, rows, masks)
}

/// Sets the ids `mask` disallows to `−∞` (`row[j]` is allowed when bit `j` is set).
pub fn apply_mask(row: &mut [f32], mask: &[u32]) {
    for (j, v) in row.iter_mut().enumerate() {
        if mask.get(j / 32).is_none_or(|w| (w >> (j % 32)) & 1 == 0) {
            *v = f32::NEG_INFINITY;
        }
    }
}

/// Samples one token per row of this rank's logits `[B, V / world]`: rank `r` holds the global ids
/// `r · w .. (r + 1) · w` (`w` = the local width, equal on all ranks). Every rank calls it with
/// the same rows and gets the same result; 2 `all_gather` calls when the world size is above 1.
pub fn sample_logits(
    local_logits: &Tensor,
    comm: &dyn Collective,
    rows: &[SampleRow],
) -> Result<Vec<SampledToken>> {
    sample_logits_masked(local_logits, comm, rows, &[])
}

/// [`sample_logits`] with a token mask per row (`masks` empty = none; otherwise one per row).
pub fn sample_logits_masked(
    local_logits: &Tensor,
    comm: &dyn Collective,
    rows: &[SampleRow],
    masks: &[ShardMask],
) -> Result<Vec<SampledToken>> {
    let (b, width) = local_logits.dims2()?;
    if !masks.is_empty() && masks.len() != rows.len() {
        return Err(Error::Step(format!(
            "sampling: {} masks for {} rows",
            masks.len(),
            rows.len()
        )));
    }
    if b != rows.len() {
        return Err(Error::Step(format!(
            "sampling: {b} logit rows for {} sample rows",
            rows.len()
        )));
    }
    for (i, row) in rows.iter().enumerate() {
        row.params
            .validate()
            .map_err(|e| Error::Step(format!("row {i}: {e}")))?;
    }
    if b == 0 {
        return Ok(Vec::new());
    }
    if width == 0 {
        return Err(Error::Step("sampling: logits have no columns".into()));
    }
    let start = comm
        .rank()
        .checked_mul(width)
        .and_then(|s| u32::try_from(s).ok())
        .ok_or_else(|| {
            Error::Step(format!(
                "sampling: rank {} · width {width} overflows u32",
                comm.rank()
            ))
        })?;
    let plans: Vec<Plan> = rows.iter().map(|r| Plan::new(r.params, width)).collect();
    let values = local_logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (mut f, mut u) = (Vec::new(), Vec::new());
    for (i, ((raw, row), plan)) in values.into_iter().zip(rows).zip(&plans).enumerate() {
        let mask = masks.get(i).and_then(Option::as_deref);
        pack_row(raw, start, (row, mask), plan, (&mut f, &mut u));
    }
    let parts = exchange(comm, local_logits, f, u)?;
    finish(&parts, rows, &plans)
}

/// What one row sends, derived from its parameters and the local width (same on every rank).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    pub greedy: bool,
    pub logprobs: bool,
    /// Global candidates kept (`K`).
    pub keep: usize,
    /// Candidates this rank sends (`min(K, w)`).
    pub k_local: usize,
    /// Raw top tokens kept for `top_logprobs`.
    pub n_keep: usize,
    /// Raw top tokens this rank sends.
    pub n_local: usize,
}

/// Values per row before the candidates: processed (max, sumexp), raw (max, sumexp).
const HEAD: usize = 4;

impl Plan {
    /// The plan of a row with parameters `p` over slices `width` wide.
    pub fn new(p: &SamplingParams, width: usize) -> Plan {
        let keep = p.candidates();
        let n_keep = if p.logprobs {
            p.top_logprobs as usize
        } else {
            0
        };
        Plan {
            greedy: p.is_greedy(),
            logprobs: p.logprobs,
            keep,
            k_local: keep.min(width),
            n_keep,
            n_local: n_keep.min(width),
        }
    }

    /// f32 values per row: head, candidate (processed, raw) logits, raw top logits.
    pub fn f_len(&self) -> usize {
        HEAD + 2 * self.k_local + self.n_local
    }

    /// u32 values per row: candidate ids, raw top ids.
    pub fn u_len(&self) -> usize {
        self.k_local + self.n_local
    }
}

/// A row's plan with its first f32 and u32 word in the packed sections.
pub type RowLayout = (Plan, usize, usize);

/// The packed layout of `rows` over slices `width` wide, as [`sample_logits`] exchanges it (and
/// the GPU sampler writes it): each row's [`RowLayout`], and the f32 and u32 words in all.
/// Validates the parameters.
pub fn packed_layout(rows: &[SampleRow], width: usize) -> Result<(Vec<RowLayout>, usize, usize)> {
    let (mut nf, mut nu) = (0, 0);
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        row.params
            .validate()
            .map_err(|e| Error::Step(format!("row {i}: {e}")))?;
        let plan = Plan::new(row.params, width);
        out.push((plan, nf, nu));
        nf += plan.f_len();
        nu += plan.u_len();
    }
    Ok((out, nf, nu))
}

/// The penalty entries of `row` on the slice of global ids `start .. start + width`: `(local
/// index, times generated)` for every id a penalty touches (prompt ∪ output with a repetition
/// penalty, else the output ids with a frequency or presence penalty), sorted by index.
pub fn penalty_entries(row: &SampleRow, start: u32, width: usize) -> Vec<(u32, u32)> {
    let (p, h) = (row.params, row.history);
    let local = |id: u32| id.checked_sub(start).filter(|&i| (i as usize) < width);
    let mut out: Vec<(u32, u32)> = if p.repetition_penalty != 1.0 {
        let mut ids: BTreeSet<u32> = h.prompt.iter().copied().filter_map(local).collect();
        ids.extend(h.output.keys().copied().filter_map(local));
        ids.into_iter()
            .map(|i| (i, h.output_count(start + i)))
            .collect()
    } else if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        h.output
            .iter()
            .filter_map(|(&id, &c)| local(id).map(|i| (i, c)))
            .collect()
    } else {
        Vec::new()
    };
    out.sort_unstable();
    out
}

/// The merge half of [`sample_logits`] over packed words gathered from every rank (rank order;
/// each `(f32 words, u32 words)` laid out as [`packed_layout`] says): picks one token per row.
pub fn finish_packed(
    parts: &[(Vec<f32>, Vec<u32>)],
    rows: &[SampleRow],
    width: usize,
) -> Result<Vec<SampledToken>> {
    let (layout, nf, nu) = packed_layout(rows, width)?;
    if parts.is_empty() || parts.iter().any(|(f, u)| f.len() != nf || u.len() != nu) {
        return Err(Error::Step(format!(
            "sampling: packed parts do not hold {nf}+{nu} words per rank"
        )));
    }
    let plans: Vec<Plan> = layout.iter().map(|l| l.0).collect();
    finish(parts, rows, &plans)
}

/// Applies this row's penalties, mask and temperature to its local logits and appends what it
/// sends.
fn pack_row(
    mut raw: Vec<f32>,
    start: u32,
    (row, mask): (&SampleRow, Option<&[u32]>),
    plan: &Plan,
    (f, u): (&mut Vec<f32>, &mut Vec<u32>),
) {
    raw.iter_mut()
        .filter(|v| v.is_nan())
        .for_each(|v| *v = f32::NEG_INFINITY);
    let mut proc = raw.clone();
    apply_penalties(&mut proc, start, row.params, row.history);
    if let Some(m) = mask {
        apply_mask(&mut proc, m);
    }
    if !plan.greedy {
        let t = row.params.temperature;
        proc.iter_mut().for_each(|v| *v /= t);
    }
    let (pm, ps) = if plan.greedy {
        (0.0, 0.0)
    } else {
        max_sumexp(&proc)
    };
    let (rm, rs) = if plan.logprobs {
        max_sumexp(&raw)
    } else {
        (0.0, 0.0)
    };
    f.extend([pm, ps, rm, rs]);
    let cands = top_indices(&proc, plan.k_local);
    f.extend(cands.iter().map(|&i| proc[i as usize]));
    f.extend(cands.iter().map(|&i| raw[i as usize]));
    u.extend(cands.iter().map(|&i| start + i));
    let top = top_indices(&raw, plan.n_local);
    f.extend(top.iter().map(|&i| raw[i as usize]));
    u.extend(top.iter().map(|&i| start + i));
}

/// Applies the repetition penalty (HF/vLLM: on prompt ∪ output ids, `x > 0 → x / p`, else
/// `x · p`), then the frequency (`− f · count`) and presence (`− p · [count > 0]`) penalties
/// (OpenAI: output ids only) to the ids of `row` (global ids `start ..`); other ids are ignored.
fn apply_penalties(row: &mut [f32], start: u32, p: &SamplingParams, h: &TokenHistory) {
    let len = row.len();
    let owned = |id: u32| {
        id.checked_sub(start)
            .map(|i| i as usize)
            .filter(|&i| i < len)
    };
    let rp = p.repetition_penalty;
    if rp != 1.0 {
        let output_only = h.output.keys().filter(|id| !h.prompt.contains(id));
        for i in h
            .prompt
            .iter()
            .chain(output_only)
            .filter_map(|&id| owned(id))
        {
            let v = row[i];
            row[i] = if v > 0.0 { v / rp } else { v * rp };
        }
    }
    let (fp, pp) = (p.frequency_penalty, p.presence_penalty);
    if fp != 0.0 || pp != 0.0 {
        for (&id, &count) in &h.output {
            if let Some(i) = owned(id) {
                row[i] -= fp * count as f32;
                if count > 0 {
                    row[i] -= pp;
                }
            }
        }
    }
}

/// `(max, Σ exp(x − max))` of a slice (sum accumulated in f64); `(−∞, 0)` if all are `−∞`.
pub(crate) fn max_sumexp(row: &[f32]) -> (f32, f32) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return (m, 0.0);
    }
    let s: f64 = row.iter().map(|&x| f64::from((x - m).exp())).sum();
    (m, s as f32)
}

/// Global log-sum-exp from per-rank `(max, sumexp)` pairs: `M + ln Σ_r s_r e^{m_r − M}`.
pub(crate) fn merge_lse(parts: &[(f32, f32)]) -> f64 {
    let m = parts
        .iter()
        .map(|p| f64::from(p.0))
        .fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    let s: f64 = parts
        .iter()
        .filter(|p| p.1 > 0.0)
        .map(|&(mr, sr)| f64::from(sr) * (f64::from(mr) - m).exp())
        .sum();
    m + s.ln()
}

/// Orders (value, id) pairs: value descending, then id ascending (NaN compares equal).
pub(crate) fn by_value_desc(a: (f32, u32), b: (f32, u32)) -> Ordering {
    b.0.partial_cmp(&a.0)
        .unwrap_or(Ordering::Equal)
        .then(a.1.cmp(&b.1))
}

/// Indices of the `k` largest values, sorted (value desc, index asc).
pub(crate) fn top_indices(row: &[f32], k: usize) -> Vec<u32> {
    let cmp = |a: &u32, b: &u32| by_value_desc((row[*a as usize], *a), (row[*b as usize], *b));
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// All-gathers the packed rows (2 calls), or keeps them as they are on a single rank.
pub(crate) fn exchange(
    comm: &dyn Collective,
    like: &Tensor,
    f: Vec<f32>,
    u: Vec<u32>,
) -> Result<Vec<(Vec<f32>, Vec<u32>)>> {
    if comm.world_size() == 1 {
        return Ok(vec![(f, u)]);
    }
    let device = like.device();
    let (nf, nu) = (f.len(), u.len());
    let gf = comm.all_gather(&Tensor::from_vec(f, nf, device)?)?;
    let gu = comm.all_gather(&Tensor::from_vec(u, nu, device)?)?;
    if gf.len() != comm.world_size() || gu.len() != gf.len() {
        return Err(Error::Step(format!(
            "sampling: all_gather returned {} parts",
            gf.len()
        )));
    }
    gf.iter()
        .zip(&gu)
        .enumerate()
        .map(|(r, (tf, tu))| {
            let (vf, vu) = (tf.flatten_all()?.to_vec1::<f32>()?, tu.flatten_all()?.to_vec1::<u32>()?);
            if (vf.len(), vu.len()) != (nf, nu) {
                return Err(Error::Step(format!(
                    "sampling: rank {r} sent {}+{} values, expected {nf}+{nu} (unequal vocab slices?)",
                    vf.len(),
                    vu.len()
                )));
            }
            Ok((vf, vu))
        })
        .collect()
}

/// One row of one rank's packed data.
struct RankRow<'a> {
    f: &'a [f32],
    u: &'a [u32],
}

/// Merges the gathered rows and picks one token per row.
fn finish(
    parts: &[(Vec<f32>, Vec<u32>)],
    rows: &[SampleRow],
    plans: &[Plan],
) -> Result<Vec<SampledToken>> {
    let (mut of, mut ou) = (0, 0);
    let mut out = Vec::with_capacity(rows.len());
    for (row, plan) in rows.iter().zip(plans) {
        let views: Vec<RankRow> = parts
            .iter()
            .map(|(f, u)| RankRow {
                f: &f[of..of + plan.f_len()],
                u: &u[ou..ou + plan.u_len()],
            })
            .collect();
        out.push(finish_row(&views, row, plan)?);
        of += plan.f_len();
        ou += plan.u_len();
    }
    Ok(out)
}

/// A merged candidate: processed logit, raw logit, global id.
type Cand = (f32, f32, u32);

/// Merges one row over ranks: candidates, normalisers, the draw and the logprobs.
fn finish_row(views: &[RankRow], row: &SampleRow, plan: &Plan) -> Result<SampledToken> {
    let k = plan.k_local;
    let mut cands: Vec<Cand> = Vec::with_capacity(k * views.len());
    let mut raw_top: Vec<(f32, u32)> = Vec::with_capacity(plan.n_local * views.len());
    for v in views {
        let (proc, rest) = v.f[HEAD..].split_at(k);
        let (raw, top) = rest.split_at(k);
        let (ids, top_ids) = v.u.split_at(k);
        cands.extend(
            proc.iter()
                .zip(raw)
                .zip(ids)
                .map(|((&p, &r), &id)| (p, r, id)),
        );
        raw_top.extend(top.iter().copied().zip(top_ids.iter().copied()));
    }
    cands.sort_by(|a, b| by_value_desc((a.0, a.2), (b.0, b.2)));
    cands.truncate(plan.keep);
    let pick = if plan.greedy {
        0
    } else {
        let pairs: Vec<(f32, f32)> = views.iter().map(|v| (v.f[0], v.f[1])).collect();
        let lse = merge_lse(&pairs);
        let probs: Vec<f64> = cands.iter().map(|c| (f64::from(c.0) - lse).exp()).collect();
        let n = kept_len(&probs, row.params);
        draw(
            &probs[..n],
            uniform(row.seed, row.history.output_len() as u64),
        )
    };
    let &(_, raw, id) = cands
        .get(pick)
        .ok_or_else(|| Error::Step("sampling: no candidates for a row".into()))?;
    if !plan.logprobs {
        return Ok(SampledToken {
            id,
            logprob: 0.0,
            top: Vec::new(),
        });
    }
    let pairs: Vec<(f32, f32)> = views.iter().map(|v| (v.f[2], v.f[3])).collect();
    let raw_lse = merge_lse(&pairs);
    let lp = |x: f32| (f64::from(x) - raw_lse) as f32;
    raw_top.sort_by(|a, b| by_value_desc(*a, *b));
    raw_top.truncate(plan.n_keep);
    let top = raw_top.iter().map(|&(x, id)| (id, lp(x))).collect();
    Ok(SampledToken {
        id,
        logprob: lp(raw),
        top,
    })
}

/// How many leading candidates (probabilities sorted descending, exact over the full vocabulary)
/// survive top-k, then top-p, then min-p; at least one when `probs` is not empty.
fn kept_len(probs: &[f64], p: &SamplingParams) -> usize {
    let mut n = probs.len();
    if n == 0 {
        return 0;
    }
    if p.top_k > 0 {
        n = n.min(p.top_k as usize);
    }
    if p.top_p < 1.0 {
        // After top-k vLLM renormalises over the k kept; if top-k did not cut inside the candidates
        // (off, or larger than K) the basis is the full vocabulary: the tail counts as mass.
        let exact_top_k = p.top_k > 0 && (p.top_k as usize) <= probs.len();
        let basis = if exact_top_k {
            probs[..n].iter().sum()
        } else {
            1.0
        };
        let target = f64::from(p.top_p) * basis;
        let mut cum = 0.0;
        if let Some(i) = probs[..n].iter().position(|&q| {
            cum += q;
            cum >= target
        }) {
            n = i + 1;
        }
    }
    if p.min_p > 0.0 {
        let threshold = f64::from(p.min_p) * probs[0];
        n = probs[..n]
            .iter()
            .take_while(|&&q| q >= threshold)
            .count()
            .max(1);
    }
    n
}

/// Inverse-CDF draw over `probs` (renormalised): the first index whose cumulative mass exceeds
/// `u · Σ probs`; index 0 if the mass is not positive and finite.
fn draw(probs: &[f64], u: f64) -> usize {
    let total: f64 = probs.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return 0;
    }
    let target = u * total;
    let mut cum = 0.0;
    for (i, &q) in probs.iter().enumerate() {
        cum += q;
        if cum > target {
            return i;
        }
    }
    probs.len().saturating_sub(1)
}

/// The draw's uniform in `[0, 1)`: output number `counter + 1` of SplitMix64 seeded with `seed`
/// (state `seed + (counter + 1) · 0x9E3779B97F4A7C15`, then the SplitMix64 finaliser), top 53 bits.
/// Stateless: the same `(seed, counter)` gives the same value on every rank and after recompute.
pub fn uniform(seed: u64, counter: u64) -> f64 {
    let mut z = seed.wrapping_add(counter.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::SingleRank;
    use candle_core::Device;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn penalties_match_hand_computed_values() {
        // ids 10..16 live on this slice; 99 (prompt) and 5 (output) live elsewhere.
        let mut row = vec![2.0, -1.0, 0.5, 3.0, -2.0, 1.0];
        let mut h = TokenHistory::default();
        [10, 11, 99].into_iter().for_each(|id| h.push_prompt(id));
        [12, 13, 12, 10, 5]
            .into_iter()
            .for_each(|id| h.push_output(id));
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..params()
        };
        apply_penalties(&mut row, 10, &p, &h);
        // 10: 2/2 − 0.5·1 − 0.25; 11: −1·2; 12: 0.5/2 − 0.5·2 − 0.25; 13: 3/2 − 0.5 − 0.25.
        assert_eq!(row, vec![0.25, -2.0, -1.0, 0.75, -2.0, 1.0]);
        assert_eq!(
            (h.output_len(), h.output_count(12), h.in_prompt(99)),
            (5, 2, true)
        );
    }

    #[test]
    fn penalty_entries_list_the_touched_ids_of_the_slice() {
        let mut h = TokenHistory::default();
        [10, 11, 99].into_iter().for_each(|id| h.push_prompt(id));
        [12, 13, 12, 10, 5]
            .into_iter()
            .for_each(|id| h.push_output(id));
        let rep = SamplingParams {
            repetition_penalty: 2.0,
            ..params()
        };
        let freq = SamplingParams {
            frequency_penalty: 0.5,
            ..params()
        };
        let off = params();
        let row = |p| SampleRow {
            params: p,
            history: &h,
            seed: 0,
        };
        // Slice 10..16: prompt 10, 11; output 10 (×1), 12 (×2), 13 (×1); 5 and 99 elsewhere.
        assert_eq!(
            penalty_entries(&row(&rep), 10, 6),
            vec![(0, 1), (1, 0), (2, 2), (3, 1)]
        );
        assert_eq!(
            penalty_entries(&row(&freq), 10, 6),
            vec![(0, 1), (2, 2), (3, 1)]
        );
        assert!(penalty_entries(&row(&off), 10, 6).is_empty());
        assert_eq!(penalty_entries(&row(&rep), 0, 6), vec![(5, 1)]);
    }

    #[test]
    fn penalties_off_change_nothing() {
        let mut row = vec![2.0, -1.0, 0.5];
        let mut h = TokenHistory::default();
        h.push_prompt(0);
        h.push_output(1);
        apply_penalties(&mut row, 0, &params(), &h);
        assert_eq!(row, vec![2.0, -1.0, 0.5]);
    }

    #[test]
    fn filters_keep_the_expected_prefix() {
        let probs = [0.4, 0.3, 0.2, 0.1];
        let k = |top_k, top_p, min_p| {
            kept_len(
                &probs,
                &SamplingParams {
                    top_k,
                    top_p,
                    min_p,
                    ..params()
                },
            )
        };
        assert_eq!(k(0, 1.0, 0.0), 4);
        assert_eq!(k(2, 1.0, 0.0), 2);
        assert_eq!(k(9, 1.0, 0.0), 4);
        assert_eq!(k(0, 0.5, 0.0), 2); // 0.4 < 0.5 ≤ 0.7
        assert_eq!(k(0, 0.39, 0.0), 1);
        assert_eq!(k(0, 0.75, 0.0), 3);
        assert_eq!(k(0, 0.01, 0.0), 1);
        // top-p after top-k is measured against the top-k mass 0.7: targets 0.42 and 0.35.
        assert_eq!(k(2, 0.6, 0.0), 2);
        assert_eq!(k(2, 0.5, 0.0), 1);
        // min-p: thresholds 0.2 (keeps p = 0.2) and 0.24.
        assert_eq!(k(0, 1.0, 0.5), 3);
        assert_eq!(k(0, 1.0, 0.6), 2);
        assert_eq!(k(0, 1.0, 1.0), 1);
        assert_eq!(k(0, 0.75, 0.6), 2);
        // Candidates holding half the mass: the nucleus reaches into the tail, all are kept.
        let half = [0.3, 0.2];
        assert_eq!(
            kept_len(
                &half,
                &SamplingParams {
                    top_p: 0.9,
                    ..params()
                }
            ),
            2
        );
        assert_eq!(
            kept_len(
                &half,
                &SamplingParams {
                    top_p: 0.25,
                    ..params()
                }
            ),
            1
        );
        assert_eq!(kept_len(&[], &params()), 0);
    }

    #[test]
    fn draw_is_the_inverse_cdf() {
        let probs = [0.1, 0.3, 0.1]; // renormalised: 0.2, 0.6, 0.2
        assert_eq!(draw(&probs, 0.0), 0);
        assert_eq!(draw(&probs, 0.19), 0);
        assert_eq!(draw(&probs, 0.21), 1);
        assert_eq!(draw(&probs, 0.79), 1);
        assert_eq!(draw(&probs, 0.81), 2);
        assert_eq!(draw(&probs, 0.999_999), 2);
        assert_eq!(draw(&[0.0, 0.0], 0.5), 0);
        assert_eq!(draw(&[f64::NAN], 0.5), 0);
    }

    #[test]
    fn merged_logsumexp_matches_direct_f64() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37)
            .collect();
        let direct = {
            let m = x
                .iter()
                .map(|&v| f64::from(v))
                .fold(f64::NEG_INFINITY, f64::max);
            m + x
                .iter()
                .map(|&v| (f64::from(v) - m).exp())
                .sum::<f64>()
                .ln()
        };
        for world in [1, 2, 4, 8] {
            let pairs: Vec<(f32, f32)> = x.chunks(1000 / world).map(max_sumexp).collect();
            let merged = merge_lse(&pairs);
            assert!(
                (merged - direct).abs() < 1e-5 * direct.abs().max(1.0),
                "{world}: {merged} vs {direct}"
            );
        }
        // A rank whose slice is all −∞ contributes nothing; all −∞ gives −∞.
        let pairs = [max_sumexp(&[f32::NEG_INFINITY; 3]), max_sumexp(&[0.0, 0.0])];
        assert!((merge_lse(&pairs) - 2f64.ln()).abs() < 1e-7);
        assert_eq!(
            merge_lse(&[max_sumexp(&[f32::NEG_INFINITY])]),
            f64::NEG_INFINITY
        );
    }

    #[test]
    fn uniform_is_deterministic_and_uniform() {
        assert_eq!(uniform(42, 7), uniform(42, 7));
        assert_ne!(uniform(42, 7), uniform(42, 8));
        assert_ne!(uniform(42, 7), uniform(43, 7));
        // First SplitMix64 output for seed 0 is 0xE220A8397B1DCDAF (the published reference value).
        assert_eq!(
            uniform(0, 0),
            (0xE220_A839_7B1D_CDAFu64 >> 11) as f64 / (1u64 << 53) as f64
        );
        for draws in [
            (0..10_000).map(|c| uniform(1234, c)).collect::<Vec<_>>(),
            (0..10_000).map(|s| uniform(s, 0)).collect(),
        ] {
            assert!(draws.iter().all(|&u| (0.0..1.0).contains(&u)));
            let mean = draws.iter().sum::<f64>() / draws.len() as f64;
            assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
            let low = draws.iter().filter(|&&u| u < 0.25).count() as f64 / draws.len() as f64;
            assert!((low - 0.25).abs() < 0.02, "P(u < 0.25) = {low}");
        }
    }

    #[test]
    fn top_indices_sort_by_value_then_id() {
        let row = [1.0, 3.0, 0.0, 3.0, 2.0];
        assert_eq!(top_indices(&row, 1), vec![1]);
        assert_eq!(top_indices(&row, 3), vec![1, 3, 4]);
        assert_eq!(top_indices(&row, 9), vec![1, 3, 4, 0, 2]);
        assert!(top_indices(&row, 0).is_empty());
    }

    #[test]
    fn mask_keeps_exactly_the_set_bits() {
        // Ids 0..40; allowed: 1, 3 (word 0 = 0b1010) and 33 (word 1 = 0b10).
        let mut row: Vec<f32> = (0..40).map(|i| i as f32).collect();
        apply_mask(&mut row, &[0b1010, 0b10]);
        let kept: Vec<usize> = (0..40).filter(|&i| row[i].is_finite()).collect();
        assert_eq!(kept, vec![1, 3, 33]);
        assert_eq!((row[1], row[3], row[33]), (1.0, 3.0, 33.0));
        // A short mask disallows the ids it does not cover.
        let mut row = vec![0.0f32; 40];
        apply_mask(&mut row, &[u32::MAX]);
        assert_eq!(row.iter().filter(|v| v.is_finite()).count(), 32);
    }

    #[test]
    fn masked_rows_sample_allowed_ids_with_raw_logprobs() {
        // Row 0 masked to {0, 2}: greedy takes id 2 (logit 1.5) over the unmasked best id 1 (3).
        // Row 1 unmasked. Raw logprob of id 2 over the full row [1, 3, 1.5, 0]:
        // 1.5 − ln(e + e³ + e^1.5 + 1).
        let logits =
            Tensor::new(&[[1f32, 3.0, 1.5, 0.0], [5.0, 1.0, 2.0, 0.0]], &Device::Cpu).unwrap();
        let h = TokenHistory::default();
        let p = SamplingParams {
            logprobs: true,
            ..params()
        };
        let rows: Vec<SampleRow> = (0..2)
            .map(|_| SampleRow {
                params: &p,
                history: &h,
                seed: 0,
            })
            .collect();
        let out =
            sample_logits_masked(&logits, &SingleRank, &rows, &[Some(vec![0b0101]), None]).unwrap();
        assert_eq!((out[0].id, out[1].id), (2, 0));
        let want = 1.5 - (1f64.exp() + 3f64.exp() + 1.5f64.exp() + 1.0).ln();
        assert!(
            (f64::from(out[0].logprob) - want).abs() < 1e-5,
            "{}",
            out[0].logprob
        );
        // Temperature sampling never draws a masked id.
        let hot = SamplingParams {
            temperature: 1.0,
            ..params()
        };
        for seed in 0..50 {
            let row = [SampleRow {
                params: &hot,
                history: &h,
                seed,
            }];
            let t = sample_logits_masked(
                &logits.narrow(0, 0, 1).unwrap(),
                &SingleRank,
                &row,
                &[Some(vec![0b1001])],
            )
            .unwrap();
            assert!(t[0].id == 0 || t[0].id == 3, "seed {seed}: {}", t[0].id);
        }
    }

    #[test]
    fn greedy_ties_pick_the_lowest_id() {
        let logits =
            Tensor::new(&[[1f32, 3.0, 0.0, 3.0], [5.0, 5.0, 5.0, 5.0]], &Device::Cpu).unwrap();
        let (p, h) = (params(), TokenHistory::default());
        let rows: Vec<SampleRow> = (0..2)
            .map(|_| SampleRow {
                params: &p,
                history: &h,
                seed: 0,
            })
            .collect();
        let ids: Vec<u32> = sample_logits(&logits, &SingleRank, &rows)
            .unwrap()
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, vec![1, 0]);
    }

    #[test]
    fn validate_checks_every_range() {
        assert!(params().validate().is_ok());
        let ok = SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            min_p: 1.0,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            repetition_penalty: 0.5,
            top_logprobs: 20,
            ..params()
        };
        assert!(ok.validate().is_ok());
        let bad = [
            SamplingParams {
                temperature: -0.1,
                ..params()
            },
            SamplingParams {
                temperature: f32::INFINITY,
                ..params()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..params()
            },
            SamplingParams {
                top_p: 0.0,
                ..params()
            },
            SamplingParams {
                top_p: 1.01,
                ..params()
            },
            SamplingParams {
                top_p: f32::NAN,
                ..params()
            },
            SamplingParams {
                min_p: -0.1,
                ..params()
            },
            SamplingParams {
                min_p: 1.5,
                ..params()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..params()
            },
            SamplingParams {
                repetition_penalty: f32::NAN,
                ..params()
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..params()
            },
            SamplingParams {
                frequency_penalty: f32::NAN,
                ..params()
            },
            SamplingParams {
                top_logprobs: 21,
                ..params()
            },
        ];
        for p in bad {
            assert!(matches!(p.validate(), Err(Error::Step(_))), "{p:?}");
        }
    }

    #[test]
    fn candidate_counts() {
        assert_eq!(params().candidates(), 1);
        let t = |top_k| {
            SamplingParams {
                temperature: 1.0,
                top_k,
                ..params()
            }
            .candidates()
        };
        assert_eq!(
            (t(0), t(5), t(1000), t(100_000)),
            (DEFAULT_CANDIDATES, 5, 1000, MAX_CANDIDATES)
        );
    }

    #[test]
    fn bad_rows_are_step_errors() {
        let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let (p, h) = (params(), TokenHistory::default());
        let one = [SampleRow {
            params: &p,
            history: &h,
            seed: 0,
        }];
        assert!(matches!(
            sample_logits(&logits, &SingleRank, &one),
            Err(Error::Step(_))
        ));
        let bad = SamplingParams {
            top_p: 0.0,
            ..params()
        };
        let rows = [
            SampleRow {
                params: &p,
                history: &h,
                seed: 0,
            },
            SampleRow {
                params: &bad,
                history: &h,
                seed: 0,
            },
        ];
        assert!(matches!(
            sample_logits(&logits, &SingleRank, &rows),
            Err(Error::Step(_))
        ));
    }
}
