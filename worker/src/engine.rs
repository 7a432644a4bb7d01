//! A minimal greedy driver over [`R4bModel`]: it owns a KV cache, gives each sequence a block
//! table, and runs prompts to a fixed number of greedy tokens, either one sequence at a time or
//! all together with prefill chunks and decodes mixed in the same steps. It is the reference the
//! coordinator's scheduler is checked against, and what the offline TP runner uses; it is not the
//! serving scheduler (no admission, preemption or prefix cache).
//!
//! Every rank of a TP group runs the same calls in the same order.

use candle_core::Tensor;

use crate::model::{ChunkImageRows, OutputRows, R4bModel, SeqChunk};
use crate::{Error, Result};

/// One prompt: token ids (with `<image>` already expanded to its count) and the rows of its
/// images in order (`[num_image_tokens, hidden]` each, from [`R4bModel::encode_image`]).
#[derive(Clone, Debug)]
pub struct Prompt {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Image rows, one tensor per image, in prompt order.
    pub images: Vec<Tensor>,
}

/// How to run.
#[derive(Clone, Debug)]
pub struct GreedyOptions {
    /// Tokens to generate per prompt.
    pub steps: usize,
    /// KV block size in tokens.
    pub block_size: usize,
    /// Largest prefill chunk (None: whole prompt in one chunk).
    pub prefill_chunk: Option<usize>,
    /// Run all prompts together in shared steps; prompt `i` joins at step `i`, so steps mix one
    /// sequence's prefill with others' decodes. `false`: one prompt after another.
    pub batched: bool,
    /// Record the full logits of every generated position (gathered over ranks; tests only).
    pub record_logits: bool,
}

/// What one prompt produced.
#[derive(Clone, Debug, Default)]
pub struct GreedyRun {
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Full logits before each generated token (when recorded).
    pub logits: Vec<Vec<f32>>,
}

struct SeqState<'p> {
    prompt: &'p Prompt,
    image_rows: Option<Tensor>,
    blocks: Vec<u32>,
    /// Tokens already in the KV cache.
    pos: usize,
    /// `<image>` rows already consumed.
    image_used: usize,
    run: GreedyRun,
}

impl SeqState<'_> {
    fn done(&self, steps: usize) -> bool {
        self.run.tokens.len() >= steps
    }

    /// The next chunk's tokens: a prompt slice, or the last generated token.
    fn next_tokens(&self, chunk: Option<usize>) -> Vec<u32> {
        let ids = &self.prompt.input_ids;
        if self.pos < ids.len() {
            let end = chunk.map_or(ids.len(), |c| (self.pos + c).min(ids.len()));
            ids[self.pos..end].to_vec()
        } else {
            self.run.tokens.last().copied().into_iter().collect()
        }
    }
}

/// Runs every prompt to `opts.steps` greedy tokens.
pub fn run_greedy(
    model: &R4bModel,
    prompts: &[Prompt],
    opts: &GreedyOptions,
) -> Result<Vec<GreedyRun>> {
    if opts.block_size == 0 || opts.prefill_chunk == Some(0) {
        return Err(Error::Step(
            "block_size and prefill_chunk must be positive".into(),
        ));
    }
    let image_id = model.config().image_token_index;
    let mut next_block = 0u32;
    let mut seqs = Vec::with_capacity(prompts.len());
    for p in prompts {
        if p.input_ids.is_empty() {
            return Err(Error::Step("empty prompt".into()));
        }
        let n_blocks = (p.input_ids.len() + opts.steps).div_ceil(opts.block_size);
        let blocks = (next_block..next_block + n_blocks as u32).collect();
        next_block += n_blocks as u32;
        let image_rows = if p.images.is_empty() {
            None
        } else {
            Some(Tensor::cat(&p.images, 0)?)
        };
        let expected = p.input_ids.iter().filter(|&&t| t == image_id).count();
        let have = image_rows
            .as_ref()
            .map(|r| r.dim(0))
            .transpose()?
            .unwrap_or(0);
        if expected != have {
            return Err(Error::Step(format!(
                "prompt has {expected} `<image>` tokens but its images give {have} rows"
            )));
        }
        seqs.push(SeqState {
            prompt: p,
            image_rows,
            blocks,
            pos: 0,
            image_used: 0,
            run: GreedyRun::default(),
        });
    }
    let mut kv = model.new_kv_cache(next_block.max(1) as usize, opts.block_size)?;
    let mut step = 0usize;
    loop {
        // Which sequences take part in this step.
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&i| !seqs[i].done(opts.steps))
            .filter(|&i| {
                if opts.batched {
                    i <= step
                } else {
                    (0..i).all(|j| seqs[j].done(opts.steps))
                }
            })
            .collect();
        if active.is_empty() {
            if seqs.iter().all(|s| s.done(opts.steps)) {
                break;
            }
            step += 1;
            continue;
        }
        let tokens: Vec<Vec<u32>> = active
            .iter()
            .map(|&i| seqs[i].next_tokens(opts.prefill_chunk))
            .collect();
        let mut chunks = Vec::with_capacity(active.len());
        for (&i, toks) in active.iter().zip(&tokens) {
            let s = &seqs[i];
            let mut chunk = SeqChunk {
                tokens: toks,
                start_pos: s.pos,
                block_table: &s.blocks,
                prompt_tokens: s.prompt.input_ids.len().saturating_sub(s.pos),
                image_rows: None,
            };
            let n_img = chunk.image_count(image_id);
            if let (Some(r), true) = (&s.image_rows, n_img > 0) {
                chunk.image_rows = Some(ChunkImageRows::Host(r.narrow(0, s.image_used, n_img)?));
            }
            chunks.push(chunk);
        }
        let hidden = model.forward_step(&chunks, &mut kv, OutputRows::Last)?;
        let cands = model.candidates(&hidden, 1)?;
        let logits = if opts.record_logits {
            Some(model.full_logits(&hidden)?.to_vec2::<f32>()?)
        } else {
            None
        };
        for (row, (&i, toks)) in active.iter().zip(&tokens).enumerate() {
            let s = &mut seqs[i];
            let prompt_part = s
                .prompt
                .input_ids
                .len()
                .saturating_sub(s.pos)
                .min(toks.len());
            s.image_used += toks[..prompt_part]
                .iter()
                .filter(|&&t| t == image_id)
                .count();
            s.pos += toks.len();
            if s.pos < s.prompt.input_ids.len() {
                continue; // mid-prompt chunk: no token yet
            }
            let tok = cands[row]
                .greedy()
                .ok_or_else(|| Error::Step("no candidate".into()))?;
            s.run.tokens.push(tok);
            if let Some(l) = &logits {
                s.run.logits.push(l[row].clone());
            }
        }
        step += 1;
    }
    Ok(seqs.into_iter().map(|s| s.run).collect())
}
