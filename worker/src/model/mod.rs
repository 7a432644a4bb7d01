//! The R-4B model, one file per block: [`siglip`] (vision tower), [`projector`], [`anyres`]
//! (image preprocessing and feature packing), [`qwen3`] (decoder). This file joins them:
//! `encode_image(pixels) -> rows` on the vision side, `forward_step(chunks, kv)` on the LLM side,
//! where image rows replace the `<image>` token embeddings in order (masked scatter).
//! Reference: transformers `models/llava_onevision/modeling_llava_onevision.py`, vLLM `rvl.py`.

pub mod anyres;
pub mod head;
pub mod image_rows;
pub mod plan;
pub mod projector;
pub mod qwen3;
pub mod siglip;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{Checkpoint, Weights};
use crate::collective::Collective;
use crate::config::RConfig;
use crate::kv::{KvShape, PagedKvCache};
use crate::parallel::{Candidates, Shard, VocabParallelHead};
use crate::sampling::{SampleRow, SampledToken};
use crate::{Error, Result};

use anyres::PixelViews;
pub use image_rows::{ChunkImageRows, ImageRange, ImageRows};
use projector::Projector;
use qwen3::{Qwen3, SeqSpan};
use siglip::VisionTower;

/// One sequence's part of a step: a prefill chunk or a single decode token.
#[derive(Clone, Debug)]
pub struct SeqChunk<'a> {
    /// Token ids of this chunk (at least one).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` (= tokens of this sequence already in the KV cache).
    pub start_pos: usize,
    /// The sequence's KV blocks (covering `start_pos + tokens.len()` positions).
    pub block_table: &'a [u32],
    /// How many leading tokens of this chunk belong to the prompt. Only prompt tokens can be
    /// image placeholders: an `<image>` id the model generates is embedded like any token.
    pub prompt_tokens: usize,
    /// Rows for the `<image>` tokens among the chunk's prompt tokens, in order: `[count, hidden]`
    /// (host rows for the CPU engine, ranges of the engine's own image rows for either).
    pub image_rows: Option<ChunkImageRows<'a>>,
}

impl SeqChunk<'_> {
    /// Number of image placeholders in this chunk (`<image>` ids among its prompt tokens).
    pub fn image_count(&self, image_token: u32) -> usize {
        let n = self.prompt_tokens.min(self.tokens.len());
        self.tokens[..n]
            .iter()
            .filter(|&&t| t == image_token)
            .count()
    }

    /// The chunk's `<image>` placeholder count, checked against its image rows.
    pub fn checked_image_count(&self, image_token: u32) -> Result<usize> {
        let count = self.image_count(image_token);
        let have = self
            .image_rows
            .as_ref()
            .map(|r| r.rows())
            .transpose()?
            .unwrap_or(0);
        if have != count {
            return Err(Error::Step(format!(
                "chunk has {count} `<image>` tokens but {have} image rows"
            )));
        }
        Ok(count)
    }
}

/// Which rows of a step come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputRows {
    /// The last token of each chunk (what sampling needs): `[chunks, hidden]`.
    Last,
    /// Every token (teacher-forced checks): `[T, hidden]`.
    All,
}

/// One rank of R-4B.
#[derive(Debug)]
pub struct R4bModel {
    cfg: RConfig,
    shard: Shard,
    device: Device,
    vision: VisionTower,
    projector: Projector,
    /// `model.image_newline [hidden]`.
    image_newline: Tensor,
    llm: Qwen3,
    lm_head: VocabParallelHead,
    comm: Arc<dyn Collective>,
}

impl R4bModel {
    /// Loads this rank's shard of the checkpoint (the TP plan in ARCHITECTURE.md).
    pub fn load(
        ckpt: &Checkpoint,
        cfg: &RConfig,
        comm: Arc<dyn Collective>,
        device: &Device,
    ) -> Result<Self> {
        let shard = Shard {
            rank: comm.rank(),
            world: comm.world_size(),
        };
        cfg.validate_tp(shard.world)?;
        let root = Weights::new(ckpt, device, DType::F32);
        let model = root.pp("model");
        let vision = VisionTower::load(&model.pp("vision_tower").pp("vision_model"), cfg)?;
        let projector = Projector::load(&model.pp("multi_modal_projector"), cfg)?;
        let image_newline = model.get("image_newline", &[cfg.text.hidden_size])?;
        let llm = Qwen3::load(&model.pp("language_model"), &cfg.text, shard, comm.clone())?;
        // Stored lm_head or tied embedding: one decision for both backends (model/head.rs).
        let head_scope = match head::head_source(cfg, ckpt)? {
            head::HeadSource::LmHead => root.pp("lm_head"),
            head::HeadSource::TiedEmbedding => model.pp("language_model").pp("embed_tokens"),
        };
        let lm_head = VocabParallelHead::load(
            &head_scope,
            cfg.text.vocab_size,
            cfg.text.hidden_size,
            shard,
            comm.clone(),
        )?;
        Ok(R4bModel {
            cfg: cfg.clone(),
            shard,
            device: device.clone(),
            vision,
            projector,
            image_newline,
            llm,
            lm_head,
            comm,
        })
    }

    /// The config.
    pub fn config(&self) -> &RConfig {
        &self.cfg
    }

    /// This rank's place in the group.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The KV cache shape of this rank for `num_blocks` blocks of `block_size` tokens.
    pub fn kv_shape(&self, num_blocks: usize, block_size: usize) -> KvShape {
        KvShape {
            layers: self.cfg.text.num_hidden_layers,
            num_blocks,
            block_size,
            kv_heads: self.cfg.text.num_key_value_heads / self.shard.world,
            head_dim: self.cfg.text.head_dim,
        }
    }

    /// A zeroed KV cache for this rank.
    pub fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<PagedKvCache> {
        PagedKvCache::new(self.kv_shape(num_blocks, block_size))
    }

    /// Vision side: one image's views → its `<image>` rows `[num_image_tokens, hidden]`
    /// (SigLIP → projector → anyres packing with `image_newline`). Replicated on every rank.
    pub fn encode_image(&self, views: &PixelViews) -> Result<Tensor> {
        let pixels = anyres::views_tensor(views, &self.device)?; // [V, 3, S, S]
        let feats = self.vision.forward(&pixels)?; // [V, 729, Cv · feature layers]
        let (v, n, cv) = feats.dims3()?;
        let proj = self.projector.forward(&feats.reshape((v * n, cv))?)?; // [V·729, Ct]
        let proj = proj.reshape((v, n, self.cfg.text.hidden_size))?;
        let geom = self.cfg.image_geometry();
        Ok(anyres::pack_features(
            &proj,
            views.image_size,
            &geom,
            &self.image_newline,
        )?)
    }

    /// Embeddings of a step's tokens with image rows scattered into the `<image>` positions.
    fn embed_step(&self, chunks: &[SeqChunk]) -> Result<Tensor> {
        let ids: Vec<u32> = chunks
            .iter()
            .flat_map(|c| c.tokens.iter().copied())
            .collect();
        let text = self.llm.embed(&ids)?; // [T, hidden]
        let image_id = self.cfg.image_token_index;
        if chunks
            .iter()
            .all(|c| c.image_count(image_id) == 0 && c.image_rows.is_none())
        {
            return Ok(text);
        }
        // Rebuild the batch as runs of text rows and image rows, in order.
        let mut pieces = Vec::new();
        let mut row = 0;
        for c in chunks {
            c.checked_image_count(image_id)?;
            let image_rows = c.image_rows.as_ref().map(|r| r.to_host()).transpose()?;
            let is_img = |i: usize| i < c.prompt_tokens && c.tokens[i] == image_id;
            let mut used = 0;
            let mut i = 0;
            while i < c.tokens.len() {
                let img = is_img(i);
                let run = (i..c.tokens.len())
                    .take_while(|&j| is_img(j) == img)
                    .count();
                match (img, &image_rows) {
                    (true, Some(r)) => {
                        pieces.push(r.narrow(0, used, run)?);
                        used += run;
                    }
                    _ => pieces.push(text.narrow(0, row + i, run)?),
                }
                i += run;
            }
            row += c.tokens.len();
        }
        Ok(Tensor::cat(&pieces, 0)?)
    }

    /// LLM side: runs one step over all chunks and returns final-normed hidden states.
    pub fn forward_step(
        &self,
        chunks: &[SeqChunk],
        kv: &mut PagedKvCache,
        rows: OutputRows,
    ) -> Result<Tensor> {
        let mut spans = Vec::with_capacity(chunks.len());
        let mut offset = 0;
        for c in chunks {
            if c.tokens.is_empty() {
                return Err(Error::Step("empty chunk".into()));
            }
            let end = c.start_pos + c.tokens.len();
            if end > self.cfg.text.max_position_embeddings {
                return Err(Error::Step(format!(
                    "position {end} exceeds max_position_embeddings {}",
                    self.cfg.text.max_position_embeddings
                )));
            }
            spans.push(SeqSpan {
                offset,
                len: c.tokens.len(),
                start_pos: c.start_pos,
                block_table: c.block_table,
            });
            offset += c.tokens.len();
        }
        let embeds = self.embed_step(chunks)?;
        let hidden = self.llm.forward_embeds(&embeds, &spans, kv)?; // [T, hidden]
        match rows {
            OutputRows::All => Ok(hidden),
            OutputRows::Last => {
                let last: Vec<u32> = spans
                    .iter()
                    .map(|s| (s.offset + s.len - 1) as u32)
                    .collect();
                let idx = Tensor::from_vec(last, spans.len(), hidden.device())?;
                Ok(hidden.index_select(&idx, 0)?)
            }
        }
    }

    /// Global top-`k` candidates of each row of `hidden [B, hidden]` (vocab-parallel, no full gather).
    pub fn candidates(&self, hidden: &Tensor, k: usize) -> Result<Vec<Candidates>> {
        self.lm_head.candidates(hidden, k)
    }

    /// Samples one token per row of `hidden [B, hidden]` (vocab-parallel candidates; every rank
    /// calls it with the same rows and gets the same tokens).
    pub fn sample(&self, hidden: &Tensor, rows: &[SampleRow]) -> Result<Vec<SampledToken>> {
        crate::sampling::sample(&self.lm_head, self.comm.as_ref(), hidden, rows)
    }

    /// [`R4bModel::sample`] with a token mask of this rank's shard per row (structured output).
    pub fn sample_masked(
        &self,
        hidden: &Tensor,
        rows: &[SampleRow],
        masks: &[crate::sampling::ShardMask],
    ) -> Result<Vec<SampledToken>> {
        crate::sampling::sample_masked(&self.lm_head, self.comm.as_ref(), hidden, rows, masks)
    }

    /// The raw log-probability (rank, top alternatives) of one target token per row of
    /// `hidden [R, hidden]` (prompt logprobs; vocab-parallel, every rank gets the same result).
    pub fn prompt_logprobs(
        &self,
        hidden: &Tensor,
        targets: &[crate::prompt_logprobs::PromptTarget],
    ) -> Result<Vec<crate::prompt_logprobs::PromptLogprob>> {
        crate::prompt_logprobs::prompt_logprobs(&self.lm_head, self.comm.as_ref(), hidden, targets)
    }

    /// Full logits `[B, vocab]` gathered over ranks: tests and diagnostics only.
    pub fn full_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.full_logits(hidden)
    }
}
