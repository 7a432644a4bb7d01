//! The `<image>` rows of the images that live sequences hold, in device memory.
//!
//! The vision tower packs an image's rows straight into a [`DeviceImage`] (one allocation per
//! image, bf16 `[n, H]`); the worker keeps it in the sequence's state until the sequence is
//! released (a preemption releases it too) or refused, and every prefill chunk scatters its rows
//! from there into the embeddings. Nothing goes through the host.
//!
//! **Budget.** The images held at once take at most [`ImageMemory::limit`] bytes: room for
//! [`IMAGE_ROWS_PER_SEQ`] rows (one 640×480 image is 2,929) for each of the `max_seqs` sequences
//! a step may hold, or `max_model_len` rows each when that is less. For R-4B at the default 256
//! sequences that is 3.75 GiB per rank (about 3 % of an H200's KV cache at TP = 1); a sequence
//! may hold more than its share while others hold less. The runner reserves the whole budget out
//! of the KV cache's sizing at load, so image rows never compete with KV blocks. An image that
//! would go over the budget refuses its sequence with [`Error::ImageMemory`] before anything is
//! encoded (the same answer on every rank: the accounting is the same); a [`DeviceImage`] gives
//! its bytes back when dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use r4b_kernels::{DBuf, DevPtr, Gpu};

use super::weights::gpu_err;
use super::GpuLimits;
use crate::{Error, Result};

/// Image rows budgeted per sequence slot (`max_seqs`): one 640×480 image and some to spare.
pub const IMAGE_ROWS_PER_SEQ: usize = 3072;

const MIB: usize = 1 << 20;

/// The image budget of one rank: its limit and the bytes the live [`DeviceImage`]s hold.
#[derive(Debug)]
pub struct ImageMemory {
    limit: usize,
    used: Arc<AtomicUsize>,
}

impl ImageMemory {
    /// The budget for a worker of `limits` whose rows are `hidden` bf16 values: `max_seqs ×
    /// min(IMAGE_ROWS_PER_SEQ, max_model_len)` rows.
    pub fn new(limits: &GpuLimits, hidden: usize) -> Self {
        let rows = limits.max_seqs * IMAGE_ROWS_PER_SEQ.min(limits.max_model_len);
        ImageMemory {
            limit: rows * hidden * 2,
            used: Arc::default(),
        }
    }

    /// The budget, bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether `bytes` more fit.
    pub fn check(&self, bytes: usize) -> Result<()> {
        let used = self.used.load(Ordering::Relaxed);
        if used + bytes > self.limit {
            return Err(Error::ImageMemory {
                need: bytes.div_ceil(MIB),
                used: used.div_ceil(MIB),
                limit: self.limit / MIB,
            });
        }
        Ok(())
    }

    /// Room for `rows` rows of `hidden` bf16 values (contents undefined), counted until the
    /// image is dropped.
    pub fn alloc(&self, gpu: &Gpu, rows: usize, hidden: usize) -> Result<DeviceImage> {
        let bytes = rows * hidden * 2;
        self.check(bytes)?;
        let buf = gpu.alloc(bytes).map_err(gpu_err)?;
        self.used.fetch_add(bytes, Ordering::Relaxed);
        Ok(DeviceImage {
            buf,
            rows,
            hidden,
            used: self.used.clone(),
        })
    }
}

/// One image's `<image>` rows on the device: bf16 `[rows, hidden]`, owned (freed and given back
/// to the [`ImageMemory`] budget when dropped).
#[derive(Debug)]
pub struct DeviceImage {
    buf: DBuf,
    rows: usize,
    hidden: usize,
    used: Arc<AtomicUsize>,
}

impl DeviceImage {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Width of a row (bf16 values).
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Address of row `r` (≤ rows: one past the last is the end).
    pub(crate) fn row(&self, r: usize) -> DevPtr {
        self.buf.at(r * self.hidden, 2)
    }
}

impl Drop for DeviceImage {
    fn drop(&mut self) {
        self.used.fetch_sub(self.buf.bytes(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_seqs: usize, max_model_len: usize) -> GpuLimits {
        GpuLimits {
            max_tokens: 2048,
            max_seqs,
            max_model_len,
            block_size: 16,
            memory_utilization: 0.9,
            num_blocks: 0,
            enforce_eager: false,
        }
    }

    #[test]
    fn the_budget_is_rows_per_sequence_slot() {
        // R-4B, 256 sequences: 3.75 GiB.
        assert_eq!(
            ImageMemory::new(&limits(256, 8192), 2560).limit(),
            (15 << 30) / 4
        );
        // Sequences shorter than the per-slot rows.
        assert_eq!(
            ImageMemory::new(&limits(2, 100), 8).limit(),
            2 * 100 * 8 * 2
        );
    }

    #[test]
    fn rows_over_the_budget_are_refused_with_the_figures() {
        let m = ImageMemory::new(&limits(1, 1024), 512);
        assert!(m.check(m.limit()).is_ok());
        m.used.fetch_add(MIB, Ordering::Relaxed);
        match m.check(m.limit()) {
            Err(Error::ImageMemory { need, used, limit }) => {
                assert_eq!((need, used, limit), (1, 1, 1));
            }
            other => panic!("{other:?}"),
        }
    }
}
