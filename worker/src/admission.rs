//! Per-sequence checks of a step, run by every rank before anything is computed.
//!
//! A sequence whose data cannot be run (a token outside the vocabulary, a block table that does
//! not cover its positions or names blocks that do not exist, an image payload that does not
//! match its geometry, sampling parameters out of bounds) is refused alone: the rank drops it
//! from the step, reports a `SeqRejection`, and runs the others. The checks read only the step
//! and fixed model facts, so every rank refuses the same sequences without talking to the others.
//! Anything that goes wrong after them (a device error, a collective failure) fails the step.

use r4b_model::{ImageLimits, RequestError};
use r4b_proto::v1 as pb;

use crate::model::anyres::ImageGeometry;

/// The fixed facts a sequence is checked against.
#[derive(Clone, Debug)]
pub struct StepLimits {
    /// Embedding rows (`text_config.vocab_size`).
    pub vocab_size: usize,
    /// Longest position + 1 (`max_position_embeddings`).
    pub max_positions: usize,
    /// KV blocks this rank allocated.
    pub num_blocks: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// `<image>` token id.
    pub image_token: u32,
    /// Anyres geometry (views and token count per image size).
    pub geometry: ImageGeometry,
}

fn ids_in_vocab(what: &str, ids: &[u32], vocab: usize) -> Result<(), String> {
    match ids.iter().position(|&t| t as usize >= vocab) {
        Some(i) => Err(format!(
            "{what} token {i} is {}, outside the vocabulary of {vocab} tokens",
            ids[i]
        )),
        None => Ok(()),
    }
}

impl StepLimits {
    /// Checks what a sequence's first chunk brings: sampling parameters and history.
    pub fn check_first_chunk(&self, s: &pb::SeqStep, p: &pb::SamplingParams) -> Result<(), String> {
        r4b_model::check_sampling(p).map_err(|e| e.to_string())?;
        ids_in_vocab("history", &s.history, self.vocab_size)
    }

    /// Checks the images a step brings: payload sizes, and the views and token count their
    /// size gives under the model's anyres geometry.
    pub fn check_images(&self, images: &[pb::Image]) -> Result<(), String> {
        let g = &self.geometry;
        let limits = ImageLimits {
            tile: g.tile as u32,
            max_views: u32::MAX,
        };
        for (i, img) in images.iter().enumerate() {
            r4b_model::check_image(i, img, limits).map_err(|e| e.to_string())?;
            let (h, w) = (img.height as usize, img.width as usize);
            let (rows, cols) = g.layout(h, w).grid;
            let views = 1 + rows * cols;
            let tokens = g.num_image_tokens(h, w);
            if img.views as usize != views || img.num_tokens as usize != tokens {
                return Err(RequestError::Image {
                    index: i,
                    reason: format!(
                        "a {w}x{h} image has {views} views and {tokens} tokens, the request \
                         says {} and {}",
                        img.views, img.num_tokens
                    ),
                }
                .to_string());
            }
        }
        Ok(())
    }

    /// Checks one chunk of a sequence whose state holds `image_rows` rows of its images.
    pub fn check_chunk(
        &self,
        s: &pb::SeqStep,
        image_rows: usize,
        prompt_len: usize,
    ) -> Result<(), String> {
        if s.tokens.is_empty() {
            return Err("the chunk has no tokens".into());
        }
        ids_in_vocab("chunk", &s.tokens, self.vocab_size)?;
        let end = s.start_pos as usize + s.tokens.len();
        if end > self.max_positions {
            return Err(format!(
                "positions up to {end} exceed max_position_embeddings {}",
                self.max_positions
            ));
        }
        let need = end.div_ceil(self.block_size.max(1));
        if s.block_table.len() < need {
            return Err(format!(
                "block table has {} blocks, {need} needed for {end} positions",
                s.block_table.len()
            ));
        }
        if let Some(&b) = s.block_table[..need]
            .iter()
            .find(|&&b| b as usize >= self.num_blocks)
        {
            return Err(format!(
                "block {b} does not exist ({} blocks)",
                self.num_blocks
            ));
        }
        let prompt_here = prompt_len
            .saturating_sub(s.start_pos as usize)
            .min(s.tokens.len());
        let images = s.tokens[..prompt_here]
            .iter()
            .filter(|&&t| t == self.image_token)
            .count();
        let off = s.image_row_offset as usize;
        if images > 0 && off + images > image_rows {
            return Err(format!(
                "the chunk needs image rows {off}..{} but the sequence's images give {image_rows}",
                off + images
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> StepLimits {
        StepLimits {
            vocab_size: 100,
            max_positions: 64,
            num_blocks: 8,
            block_size: 4,
            image_token: 9,
            geometry: ImageGeometry {
                tile: 28,
                patch: 14,
                pinpoints: vec![(28, 28), (28, 56), (56, 28), (56, 56)],
                max_tiles: 9,
            },
        }
    }

    fn chunk(tokens: Vec<u32>, start_pos: u32, table: Vec<u32>) -> pb::SeqStep {
        pb::SeqStep {
            seq_id: 1,
            tokens,
            start_pos,
            block_table: table,
            ..Default::default()
        }
    }

    #[test]
    fn chunks_are_checked_against_the_cache_and_vocabulary() {
        let l = limits();
        assert_eq!(
            l.check_chunk(&chunk(vec![1, 2, 3, 4, 5], 0, vec![0, 1]), 0, 5),
            Ok(())
        );
        let err = |c: pb::SeqStep| l.check_chunk(&c, 0, 5).expect_err("refused");
        assert!(err(chunk(vec![], 0, vec![0])).contains("no tokens"));
        assert!(err(chunk(vec![1, 100], 0, vec![0])).contains("token 1 is 100"));
        // 5 positions need 2 blocks of 4.
        assert!(err(chunk(vec![1; 5], 0, vec![0])).contains("2 needed"));
        assert!(err(chunk(vec![1], 7, vec![0, 8])).contains("block 8 does not exist"));
        assert!(err(chunk(vec![1], 64, vec![0; 17])).contains("max_position_embeddings 64"));
        // Two `<image>` prompt tokens need two rows past the offset.
        let mut c = chunk(vec![9, 9, 1], 0, vec![0]);
        c.image_row_offset = 1;
        assert_eq!(l.check_chunk(&c, 3, 3), Ok(()));
        assert!(l
            .check_chunk(&c, 2, 3)
            .expect_err("short")
            .contains("rows 1..3"));
        // `<image>` ids past the prompt are generated tokens, not placeholders.
        assert_eq!(
            l.check_chunk(&chunk(vec![9, 9], 4, vec![0, 1]), 0, 4),
            Ok(())
        );
    }

    #[test]
    fn first_chunks_and_images_are_checked() {
        let l = limits();
        let p = pb::SamplingParams {
            top_p: 1.0,
            repetition_penalty: 1.0,
            ..Default::default()
        };
        let mut s = chunk(vec![1], 0, vec![0]);
        assert_eq!(l.check_first_chunk(&s, &p), Ok(()));
        let mut hot = p;
        hot.repetition_penalty = f32::INFINITY;
        assert!(l
            .check_first_chunk(&s, &hot)
            .expect_err("inf")
            .contains("repetition_penalty"));
        s.history = vec![3, 1000];
        assert!(l
            .check_first_chunk(&s, &p)
            .expect_err("history")
            .contains("1000"));
        s.history.clear();
        // A 28x28 image fits the 28x28 pinpoint: a 1x1 grid, so the base view + 1 tile (2 views)
        // and 4 (base) + 2·2 (map) + 2 (newlines) = 10 tokens.
        let g = &l.geometry;
        assert_eq!(g.num_image_tokens(28, 28), g.tokens_per_tile() + 2 * 2 + 2);
        let image = |views: u32, num_tokens: u32| pb::Image {
            views_u8: vec![0; (views * 3 * 28 * 28) as usize],
            views,
            tile: 28,
            height: 28,
            width: 28,
            digest: vec![0; 32],
            num_tokens,
        };
        let good = g.num_image_tokens(28, 28) as u32;
        assert_eq!(l.check_images(&[image(2, good)]), Ok(()));
        let e = l
            .check_images(&[image(2, good), image(2, good + 1)])
            .expect_err("count");
        assert!(e.contains("image 1"), "{e}");
        assert!(l.check_images(&[image(3, good)]).is_err());
        let mut short = image(2, good);
        short.views_u8.truncate(10);
        let e = l.check_images(&[short]).expect_err("bytes");
        assert!(e.contains("bytes"), "{e}");
    }
}
