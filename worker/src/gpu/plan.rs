//! The host side of a step: chunks reordered paged-first, the metadata every kernel reads, all
//! validated against the worker's sizes before anything is uploaded.

use r4b_kernels::DevPtr;

use super::{GpuLimits, PAGED_MAX_WORK};
use crate::config::RConfig;
use crate::model::{ChunkImageRows, ImageRows, SeqChunk};
use crate::{Error, Result};

/// Host-side plan of one step (chunks reordered decodes first).
#[derive(Debug, Default)]
pub struct StepPlan {
    /// Chunk indices in execution order.
    pub order: Vec<usize>,
    /// Leading paged chunks in `order` (decodes and short prefills) and their tokens.
    pub paged_chunks: usize,
    pub paged_tokens: usize,
    /// Every chunk is a single-token decode without images.
    pub decode_only: bool,
    /// Token count of each chunk, in `order`.
    pub lens: Vec<usize>,
    pub ids: Vec<i32>,
    pub positions: Vec<i32>,
    pub slots: Vec<i32>,
    /// Keys visible to each paged token, and its block-table row.
    pub ctx_lens: Vec<i32>,
    pub bt_rows: Vec<i32>,
    /// `[order.len(), table_width]`: each chunk's blocks, zero-padded to the widest chunk's
    /// (uploaded into device rows of `max_blocks`).
    pub block_tables: Vec<i32>,
    pub table_width: usize,
    /// Row of each chunk's last token, by ORIGINAL chunk index.
    pub last_rows: Vec<i32>,
    /// The step row of each `<image>` row, in step order, and where those rows are: runs of
    /// `(first row on the device, rows)` inside the images' own memory, in the same order.
    pub image_dst: Vec<i32>,
    pub image_src: Vec<(DevPtr, usize)>,
    /// Longest context of the paged tokens.
    pub max_paged_ctx: usize,
    pub tokens: usize,
}

/// One run of the model over an uploaded plan: `tokens` rows (the plan's, or more when a graph
/// pads the decodes to its bucket) and the paged attention's `(part_size, parts)`.
#[derive(Clone, Copy, Debug)]
pub struct Pass<'a> {
    pub plan: &'a StepPlan,
    pub tokens: usize,
    pub split: (usize, usize),
}

impl Pass<'_> {
    /// Rows the paged attention runs: the plan's paged tokens, or every row of a padded graph
    /// step (padded rows are decodes too).
    pub fn paged_rows(&self) -> usize {
        if self.tokens > self.plan.tokens {
            self.tokens
        } else {
            self.plan.paged_tokens
        }
    }
}

impl StepPlan {
    /// Plans `chunks` against the worker's limits and its `num_blocks` KV blocks.
    pub fn build(
        chunks: &[SeqChunk],
        cfg: &RConfig,
        lim: &GpuLimits,
        num_blocks: usize,
    ) -> Result<StepPlan> {
        let bs = lim.block_size;
        let image_id = cfg.image_token_index;
        let mut p = StepPlan {
            last_rows: vec![0; chunks.len()],
            ..Default::default()
        };
        if chunks.len() > lim.max_seqs {
            return Err(Error::Step(format!(
                "{} sequences in one step, the worker holds {}",
                chunks.len(),
                lim.max_seqs
            )));
        }
        let is_paged =
            |c: &SeqChunk| c.tokens.len() * (c.start_pos + c.tokens.len()) <= PAGED_MAX_WORK;
        p.order = (0..chunks.len())
            .filter(|&i| is_paged(&chunks[i]))
            .collect();
        p.paged_chunks = p.order.len();
        p.order
            .extend((0..chunks.len()).filter(|&i| !is_paged(&chunks[i])));
        p.decode_only = chunks
            .iter()
            .all(|c| c.tokens.len() == 1 && c.image_count(image_id) == 0);
        for (j, &ci) in p.order.clone().iter().enumerate() {
            let c = &chunks[ci];
            if c.tokens.is_empty() {
                return Err(Error::Step("empty chunk".into()));
            }
            let end = c.start_pos + c.tokens.len();
            if end > lim.max_model_len {
                return Err(Error::Step(format!(
                    "position {end} exceeds the worker's max_model_len {}",
                    lim.max_model_len
                )));
            }
            let need = end.div_ceil(bs);
            if c.block_table.len() < need {
                return Err(Error::Kv(format!(
                    "block table has {} blocks, {need} needed",
                    c.block_table.len()
                )));
            }
            if let Some(&b) = c.block_table[..need]
                .iter()
                .find(|&&b| b as usize >= num_blocks)
            {
                return Err(Error::Kv(format!(
                    "block {b} out of range ({num_blocks} blocks)"
                )));
            }
            p.table_width = p.table_width.max(need);
            c.checked_image_count(image_id)?;
            if let Some(r) = &c.image_rows {
                device_runs(r, cfg.text.hidden_size, &mut p.image_src)?;
            }
            for (i, &t) in c.tokens.iter().enumerate() {
                let pos = c.start_pos + i;
                let row = p.ids.len() as i32;
                if i < c.prompt_tokens && t == image_id {
                    p.image_dst.push(row);
                }
                if t as usize >= cfg.text.vocab_size {
                    return Err(Error::Step(format!(
                        "token {t} outside the vocabulary ({})",
                        cfg.text.vocab_size
                    )));
                }
                p.ids.push(t as i32);
                p.positions.push(pos as i32);
                let blk = c.block_table[pos / bs] as usize;
                p.slots.push((blk * bs + pos % bs) as i32);
            }
            p.last_rows[ci] = p.ids.len() as i32 - 1;
            p.lens.push(c.tokens.len());
            if j < p.paged_chunks {
                for i in 0..c.tokens.len() {
                    p.ctx_lens.push((c.start_pos + i + 1) as i32);
                    p.bt_rows.push(j as i32);
                }
                p.paged_tokens += c.tokens.len();
                p.max_paged_ctx = p.max_paged_ctx.max(end);
            }
        }
        // Block tables at the widest chunk's width (the device rows are `max_blocks` wide).
        let width = p.table_width.max(1);
        p.table_width = width;
        p.block_tables = vec![0i32; p.order.len() * width];
        for (j, &ci) in p.order.iter().enumerate() {
            let c = &chunks[ci];
            let need = (c.start_pos + c.tokens.len()).div_ceil(bs);
            for (d, &b) in p.block_tables[j * width..]
                .iter_mut()
                .zip(&c.block_table[..need])
            {
                *d = b as i32;
            }
        }
        p.tokens = p.ids.len();
        if p.tokens > lim.max_tokens {
            return Err(Error::Step(format!(
                "{} tokens in one step, the worker holds {}",
                p.tokens, lim.max_tokens
            )));
        }
        Ok(p)
    }
}

/// Appends where a chunk's image rows are on the device: one `(first row, rows)` run per image
/// range. The GPU engine reads only the images it encoded itself.
fn device_runs(rows: &ChunkImageRows, hidden: usize, out: &mut Vec<(DevPtr, usize)>) -> Result<()> {
    let ChunkImageRows::Ranges(ranges) = rows else {
        return Err(Error::Step(
            "the GPU engine reads image rows from the images it encoded \
             (GpuModel::encode_image), not from host tensors"
                .into(),
        ));
    };
    for r in ranges.iter().filter(|r| r.len > 0) {
        let ImageRows::Device(image) = r.image else {
            return Err(Error::Step(
                "the GPU engine was handed an image encoded on the host".into(),
            ));
        };
        if r.start + r.len > image.rows() || image.hidden() != hidden {
            return Err(Error::Step(format!(
                "image rows {}..{} of an image of {} rows of {} (the model's rows have {hidden})",
                r.start,
                r.start + r.len,
                image.rows(),
                image.hidden()
            )));
        }
        out.push((image.row(r.start), r.len));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn cfg() -> RConfig {
        let text = r4b_model::embedded::config_json().to_string();
        RConfig::from_json_str(&text).expect("embedded config")
    }

    fn limits() -> GpuLimits {
        GpuLimits {
            max_tokens: 2048,
            max_seqs: 4,
            max_model_len: 1024,
            block_size: 16,
            memory_utilization: 0.9,
            num_blocks: 0,
            enforce_eager: false,
        }
    }

    fn chunk<'a>(tokens: &'a [u32], start_pos: usize, blocks: &'a [u32]) -> SeqChunk<'a> {
        SeqChunk {
            tokens,
            start_pos,
            block_table: blocks,
            prompt_tokens: tokens.len(),
            image_rows: None,
        }
    }

    #[test]
    fn paged_chunks_run_first_and_rows_keep_the_original_order() {
        let cfg = cfg();
        assert_ne!(cfg.image_token_index, 1);
        // 600 tokens from position 0: 600 · 600 > PAGED_MAX_WORK, so it runs after the decode.
        let long = vec![1u32; 600];
        assert!(long.len() * long.len() > PAGED_MAX_WORK);
        let long_blocks: Vec<u32> = (0..38).collect();
        let decode_blocks = [40u32];
        let chunks = [
            chunk(&long, 0, &long_blocks),
            chunk(&[1], 10, &decode_blocks),
        ];
        let p = StepPlan::build(&chunks, &cfg, &limits(), 64).expect("plan");
        assert_eq!(p.order, [1, 0]);
        assert_eq!((p.paged_chunks, p.paged_tokens, p.tokens), (1, 1, 601));
        assert!(!p.decode_only);
        // The decode is row 0 (slot 40·16 + 10, sees 11 keys), the prefill rows 1..=600.
        assert_eq!(p.slots[0], 40 * 16 + 10);
        assert_eq!(p.ctx_lens, [11]);
        assert_eq!(p.bt_rows, [0]);
        assert_eq!(p.last_rows, [600, 0]);
        assert_eq!(p.lens, [1, 600]);
        assert_eq!(p.table_width, 38);
        assert_eq!(p.block_tables.len(), 2 * 38);
        assert_eq!(p.block_tables[0], 40);
        assert_eq!(p.max_paged_ctx, 11);
        // A padded graph pass runs the paged kernel over every row.
        let pass = Pass {
            plan: &p,
            tokens: 604,
            split: (64, 1),
        };
        assert_eq!(pass.paged_rows(), 604);
        let pass = Pass {
            tokens: 601,
            ..pass
        };
        assert_eq!(pass.paged_rows(), 1);
    }

    #[test]
    fn decode_only_steps_are_marked() {
        let cfg = cfg();
        let chunks = [chunk(&[1], 3, &[0]), chunk(&[2], 20, &[1, 2])];
        let p = StepPlan::build(&chunks, &cfg, &limits(), 8).expect("plan");
        assert!(p.decode_only);
        assert_eq!(p.order, [0, 1]);
        assert_eq!(p.ctx_lens, [4, 21]);
        assert_eq!(p.block_tables, [0, 0, 1, 2]);
    }

    #[test]
    fn bad_chunks_are_refused() {
        let cfg = cfg();
        let lim = limits();
        let vocab = cfg.text.vocab_size as u32;
        let cases: Vec<(Vec<u32>, usize, Vec<u32>, usize)> = vec![
            // Block 8 of 8 blocks.
            (vec![1], 0, vec![8], 8),
            // Block table too short for position 16.
            (vec![1], 16, vec![0], 8),
            // Past max_model_len.
            (vec![1], lim.max_model_len, (0..65).collect(), 100),
            // Outside the vocabulary.
            (vec![vocab], 0, vec![0], 8),
            // Empty.
            (vec![], 0, vec![0], 8),
        ];
        for (tokens, start, blocks, num_blocks) in &cases {
            let c = [chunk(tokens, *start, blocks)];
            assert!(
                StepPlan::build(&c, &cfg, &lim, *num_blocks).is_err(),
                "{tokens:?} at {start} over {blocks:?}"
            );
        }
        let one = [1u32];
        let many: Vec<SeqChunk> = (0..lim.max_seqs + 1)
            .map(|_| chunk(&one, 0, &[0]))
            .collect();
        assert!(StepPlan::build(&many, &cfg, &lim, 8).is_err());
    }

    #[test]
    fn host_image_rows_are_refused() {
        let cfg = cfg();
        let h = cfg.text.hidden_size;
        let tokens = [1, cfg.image_token_index, cfg.image_token_index];
        let rows = candle_core::Tensor::zeros((2, h), candle_core::DType::BF16, &Device::Cpu)
            .expect("rows");
        let host = ImageRows::Host(rows.clone());
        for image_rows in [
            ChunkImageRows::Host(rows),
            ChunkImageRows::whole(&host).expect("whole"),
        ] {
            let c = [SeqChunk {
                image_rows: Some(image_rows),
                ..chunk(&tokens, 0, &[0])
            }];
            match StepPlan::build(&c, &cfg, &limits(), 8) {
                Err(Error::Step(m)) => assert!(m.contains("GPU engine"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
