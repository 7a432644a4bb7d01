//! Small pure rules of the scheduling policy: block arithmetic, the token budget, prefix-hit
//! limits and image row offsets. `step.rs` composes them.

use super::types::ImageSpan;

/// Blocks needed to hold `tokens` KV entries.
pub(super) fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// More blocks a sequence holding `held` blocks needs to hold `tokens` KV entries.
pub(super) fn extra_blocks(tokens: usize, held: usize, block_size: usize) -> usize {
    blocks_for(tokens, block_size).saturating_sub(held)
}

/// Most leading full blocks of a `len`-token prompt a prefix-cache hit may cover: the last token
/// is always computed, so that a token is sampled after it.
pub(super) fn max_prefix_blocks(len: usize, block_size: usize) -> usize {
    len.saturating_sub(1) / block_size
}

/// `<image>` rows (tokens) of `images` before position `pos`.
pub(super) fn image_rows_before(images: &[ImageSpan], pos: usize) -> usize {
    images
        .iter()
        .map(|s| pos.saturating_sub(s.start).min(s.len))
        .sum()
}

/// What one prefilling sequence runs in a step: images to encode first, then a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PrefillGrant {
    /// Images to encode (indexes), in order.
    pub(super) encode: std::ops::Range<usize>,
    /// Chunk length in tokens.
    pub(super) len: usize,
    /// Budget the grant uses: `len` plus the images' encode costs (may exceed the budget only
    /// when `may_exceed` allowed a large image).
    pub(super) cost: usize,
}

/// Plans a prefill chunk from position `start` towards `end` under `left` tokens of budget,
/// where `<image>` tokens can only run once their image is encoded: images `..ready` are held
/// by the workers; the next ones are encoded in this step while their cost leaves room for at
/// least one token. With `may_exceed` (no other prefill work in the step yet) one image is
/// encoded whatever its cost, so an image larger than the budget is never starved; the step
/// then holds the decodes for at most one image's encode.
pub(super) fn grant_prefill(
    images: &[ImageSpan],
    ready: usize,
    (start, end): (usize, usize),
    left: usize,
    may_exceed: bool,
) -> PrefillGrant {
    let mut encode = ready..ready;
    let (mut pos, mut left, mut cost) = (start, left, 0);
    loop {
        // Tokens run up to the next image that is not encoded.
        let limit = images
            .get(encode.end)
            .map_or(end, |img| img.start.clamp(start, end));
        let run = (limit - pos).min(left);
        pos += run;
        left -= run;
        cost += run;
        if pos >= end || left == 0 || pos < limit {
            break;
        }
        let Some(img) = images.get(encode.end) else {
            break;
        };
        let first = may_exceed && encode.is_empty() && pos == start;
        if img.encode_cost < left {
            left -= img.encode_cost;
        } else if first {
            // Over budget: this image, then at least one of its tokens.
            left = 1;
        } else {
            break;
        }
        cost += img.encode_cost;
        encode.end += 1;
    }
    PrefillGrant {
        encode,
        len: pos - start,
        cost,
    }
}

/// The tokens one step may still run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TokenBudget {
    left: usize,
}

impl TokenBudget {
    /// A budget of `max_batched_tokens`.
    pub(super) fn new(max_batched_tokens: usize) -> Self {
        Self {
            left: max_batched_tokens,
        }
    }

    /// Tokens left.
    pub(super) fn left(&self) -> usize {
        self.left
    }

    /// How many of `want` tokens fit (the chunk is cut to the budget).
    pub(super) fn grant(&self, want: usize) -> usize {
        want.min(self.left)
    }

    /// Spends `n` granted tokens (all that is left when `n` is more: an image over budget).
    pub(super) fn spend(&mut self, n: usize) {
        self.left = self.left.saturating_sub(n);
    }

    /// Returns `n` tokens of a chunk taken out of the plan (its sequence was preempted).
    pub(super) fn refund(&mut self, n: usize) {
        self.left += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_arithmetic() {
        assert_eq!(blocks_for(0, 16), 0);
        assert_eq!(blocks_for(1, 16), 1);
        assert_eq!(blocks_for(16, 16), 1);
        assert_eq!(blocks_for(17, 16), 2);
        assert_eq!(extra_blocks(17, 1, 16), 1);
        assert_eq!(extra_blocks(16, 2, 16), 0);
    }

    #[test]
    fn prefix_hit_leaves_the_last_token() {
        // 32 tokens in blocks of 16: only block 0 may hit (token 31 must be computed).
        assert_eq!(max_prefix_blocks(32, 16), 1);
        assert_eq!(max_prefix_blocks(33, 16), 2);
        assert_eq!(max_prefix_blocks(16, 16), 0);
        assert_eq!(max_prefix_blocks(1, 16), 0);
    }

    fn span(start: usize, len: usize, encode_cost: usize) -> ImageSpan {
        ImageSpan {
            start,
            len,
            digest: [0; 32],
            encode_cost,
        }
    }

    #[test]
    fn prefill_stops_at_images_it_cannot_afford() {
        // Text 0..2, image A at 2..8 (cost 5), text 8..10, image B at 10..12 (cost 20).
        let images = [span(2, 6, 5), span(10, 2, 20)];
        let g = |ready, start, left, may_exceed| {
            let g = grant_prefill(&images, ready, (start, 14), left, may_exceed);
            (g.encode, g.len, g.cost)
        };
        // 16 tokens: 2 text, A (5), 6 rows + 2 text = 8, then B does not fit in the 1 left.
        assert_eq!(g(0, 0, 16, true), (0..1, 10, 15));
        // Only 6 tokens: 2 text, then A (5) leaves less than one token after it: stop at 2.
        assert_eq!(g(0, 0, 6, false), (0..0, 2, 2));
        // At A's start with 6 left: A (5) leaves 1 token, its first row.
        assert_eq!(g(0, 2, 6, true), (0..1, 1, 6));
        // A already held: its 6 rows, then B (20 of the 32 left), B's rows and the last text.
        assert_eq!(g(1, 2, 40, false), (1..2, 12, 32));
        // B alone, over budget, when nothing else runs: encode it and run 1 of its rows.
        assert_eq!(g(1, 10, 4, true), (1..2, 1, 21));
        assert_eq!(g(1, 10, 4, false), (1..1, 0, 0));
        // Past every image: plain text.
        assert_eq!(g(2, 12, 4, false), (2..2, 2, 2));
    }

    #[test]
    fn image_rows() {
        let s = |start, len| span(start, len, 0);
        let images = [s(2, 3), s(10, 4)];
        assert_eq!(image_rows_before(&images, 0), 0);
        assert_eq!(image_rows_before(&images, 3), 1);
        assert_eq!(image_rows_before(&images, 5), 3);
        assert_eq!(image_rows_before(&images, 12), 5);
        assert_eq!(image_rows_before(&images, 100), 7);
    }

    #[test]
    fn budget_cuts_and_refunds() {
        let mut b = TokenBudget::new(2048);
        assert_eq!(b.grant(5000), 2048);
        b.spend(2000);
        assert_eq!(b.grant(100), 48);
        b.spend(48);
        assert_eq!(b.grant(1), 0);
        b.refund(10);
        assert_eq!(b.left(), 10);
    }
}
