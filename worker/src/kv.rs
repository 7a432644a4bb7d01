//! Paged KV storage of one rank: fixed-size blocks of `block_size` token slots; a sequence owns
//! a block table (which blocks hold its positions, in order). The coordinator decides which
//! blocks a sequence gets; this module only stores and gathers.
//!
//! Layout per layer: `[num_blocks, block_size, kv_heads_local, head_dim]` for K and for V.

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Shape of a rank's KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    /// Decoder layers.
    pub layers: usize,
    /// Blocks per layer.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// Key/value heads on this rank.
    pub kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

impl KvShape {
    /// Bytes one token takes in this rank's cache (K and V, all layers, f32).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.slot_len() * std::mem::size_of::<f32>()
    }

    /// f32 values of one token slot (one of K or V).
    fn slot_len(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// The paged K/V storage of one rank (CPU, f32).
#[derive(Debug)]
pub struct PagedKvCache {
    shape: KvShape,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl PagedKvCache {
    /// Allocates zeroed storage.
    pub fn new(shape: KvShape) -> Result<Self> {
        if shape.block_size == 0 || shape.num_blocks == 0 {
            return Err(Error::Kv(format!("empty cache shape {shape:?}")));
        }
        let per_layer = shape
            .num_blocks
            .checked_mul(shape.block_size)
            .and_then(|n| n.checked_mul(shape.slot_len()))
            .ok_or_else(|| Error::Kv(format!("cache shape {shape:?} overflows")))?;
        Ok(PagedKvCache {
            shape,
            k: (0..shape.layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..shape.layers).map(|_| vec![0.0; per_layer]).collect(),
        })
    }

    /// The cache shape.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// The slot index of position `pos` of a sequence with `block_table`.
    pub fn slot(&self, block_table: &[u32], pos: usize) -> Result<usize> {
        let bs = self.shape.block_size;
        let block = *block_table.get(pos / bs).ok_or_else(|| {
            Error::Kv(format!(
                "position {pos} needs block {} but the table has {}",
                pos / bs,
                block_table.len()
            ))
        })? as usize;
        if block >= self.shape.num_blocks {
            return Err(Error::Kv(format!(
                "block {block} is outside the cache ({} blocks)",
                self.shape.num_blocks
            )));
        }
        Ok(block * bs + pos % bs)
    }

    /// Writes K and V rows (`[n, kv_heads * head_dim]` each, row-major) for positions
    /// `start .. start + n` of one sequence in `layer`.
    pub fn write(
        &mut self,
        layer: usize,
        block_table: &[u32],
        start: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let sl = self.shape.slot_len();
        if k.len() != v.len() || !k.len().is_multiple_of(sl) {
            return Err(Error::Kv(format!(
                "write of {} / {} values is not whole slots of {sl}",
                k.len(),
                v.len()
            )));
        }
        for i in 0..k.len() / sl {
            let s = self.slot(block_table, start + i)? * sl;
            self.k[layer][s..s + sl].copy_from_slice(&k[i * sl..(i + 1) * sl]);
            self.v[layer][s..s + sl].copy_from_slice(&v[i * sl..(i + 1) * sl]);
        }
        Ok(())
    }

    /// K and V of positions `0 .. len` of one sequence in `layer`, each `[len, kv_heads, head_dim]`.
    pub fn gather(
        &self,
        layer: usize,
        block_table: &[u32],
        len: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let sl = self.shape.slot_len();
        let mut k = Vec::with_capacity(len * sl);
        let mut v = Vec::with_capacity(len * sl);
        for pos in 0..len {
            let s = self.slot(block_table, pos)? * sl;
            k.extend_from_slice(&self.k[layer][s..s + sl]);
            v.extend_from_slice(&self.v[layer][s..s + sl]);
        }
        let dims = (len, self.shape.kv_heads, self.shape.head_dim);
        Ok((
            Tensor::from_vec(k, dims, device)?,
            Tensor::from_vec(v, dims, device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_gather_follows_the_block_table() {
        let shape = KvShape {
            layers: 1,
            num_blocks: 4,
            block_size: 2,
            kv_heads: 1,
            head_dim: 2,
        };
        let mut kv = PagedKvCache::new(shape).unwrap();
        // Positions 0..3 of a sequence whose blocks are [3, 1]: slots 6, 7, 2.
        let k = [0., 1., 10., 11., 20., 21.];
        let v = [5., 6., 15., 16., 25., 26.];
        kv.write(0, &[3, 1], 0, &k, &v).unwrap();
        assert_eq!(kv.slot(&[3, 1], 2).unwrap(), 2);
        assert_eq!(&kv.k[0][12..16], &[0., 1., 10., 11.]);
        assert_eq!(&kv.k[0][4..6], &[20., 21.]);
        let (gk, gv) = kv.gather(0, &[3, 1], 3, &Device::Cpu).unwrap();
        assert_eq!(
            gk.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            k.to_vec()
        );
        assert_eq!(
            gv.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v.to_vec()
        );
    }

    #[test]
    fn short_tables_and_foreign_blocks_are_errors() {
        let shape = KvShape {
            layers: 1,
            num_blocks: 2,
            block_size: 2,
            kv_heads: 1,
            head_dim: 1,
        };
        let mut kv = PagedKvCache::new(shape).unwrap();
        assert!(kv.write(0, &[0], 1, &[1., 2.], &[1., 2.]).is_err());
        assert!(kv.write(0, &[5], 0, &[1.], &[1.]).is_err());
        assert!(kv.gather(0, &[1], 3, &Device::Cpu).is_err());
    }
}
