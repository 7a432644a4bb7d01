//! The tensor-parallel plan's vocabulary: a rank's place in its group ([`Shard`]) and how a
//! tensor is split over the group ([`Split`]). The CPU layer types (`parallel`), the GPU loader
//! (`gpu::weights`), the load plan (`model::plan`) and the checkpoint's byte ranges all use these.

use crate::{Error, Result};

/// The position of this rank in its tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This rank, `0..world`.
    pub rank: usize,
    /// Group size (TP).
    pub world: usize,
}

impl Shard {
    /// The only rank of a group of one.
    pub const SINGLE: Shard = Shard { rank: 0, world: 1 };

    /// Whether this group has one rank (no communication).
    pub fn is_noop(&self) -> bool {
        self.world == 1
    }

    /// `len / world`, checked.
    pub fn part(&self, len: usize, what: &str) -> Result<usize> {
        if self.world == 0 || !len.is_multiple_of(self.world) {
            return Err(Error::TensorParallel {
                tp: self.world,
                reason: format!("{what} = {len} is not divisible by {}", self.world),
            });
        }
        Ok(len / self.world)
    }
}

/// How a tensor is split over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Every rank reads it whole.
    Replicated,
    /// Rank `r` of `N` reads rows `[r·n/N, (r+1)·n/N)` of dim 0 (column-parallel, vocab-parallel).
    Rows,
    /// Rank `r` of `N` reads columns of dim 1 (row-parallel).
    Cols,
}
