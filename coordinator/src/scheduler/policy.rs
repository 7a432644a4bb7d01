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

    /// Spends `n` granted tokens.
    pub(super) fn spend(&mut self, n: usize) {
        debug_assert!(n <= self.left);
        self.left -= n;
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

    #[test]
    fn image_rows() {
        let s = |start, len| ImageSpan {
            start,
            len,
            digest: [0; 32],
        };
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
