//! Device copies of the `<image>` rows of recently encoded images.
//!
//! The vision tower leaves an image's rows on the GPU, the executor keeps them as a host tensor
//! (it outlives the step: later chunks and recomputation after preemption read it), and the
//! prefill needs them on the GPU again. A chunk whose rows are a slice of an image encoded
//! recently copies them on the device instead of uploading them from the host (15 MB for a
//! 640×480 image: ~3 ms over PCIe, ~10 µs on the device). Entries hold a clone of the host
//! tensor, so the host address they are keyed by cannot be reused while they exist; the oldest
//! go first beyond [`IMAGE_ROW_CACHE_BYTES`], and a lookup that misses uploads as before.

use std::collections::VecDeque;

use candle_core::Tensor;
use r4b_kernels::{DBuf, DevPtr, Gpu};

use super::weights::gpu_err;
use super::with_bf16;
use crate::Result;

/// Device bytes the cache may hold (about 16 images of 640×480).
pub const IMAGE_ROW_CACHE_BYTES: usize = 256 << 20;

struct Entry {
    /// Keeps the host storage, and so `base`, alive.
    _host: Tensor,
    /// Host address and length (bf16 values) of the rows.
    base: usize,
    len: usize,
    dev: DBuf,
}

/// See the module documentation.
#[derive(Default)]
pub struct ImageRowCache {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl ImageRowCache {
    /// Records `host` (a contiguous bf16 CPU tensor) as a copy of the `rows` on the device at
    /// `dev_rows` (copied now, on the GPU's stream). Images larger than the cache, or a failed
    /// allocation, are simply not cached.
    ///
    /// # Safety
    /// `dev_rows` holds as many bf16 values as `host`.
    pub unsafe fn insert(&mut self, gpu: &Gpu, host: &Tensor, dev_rows: DevPtr) -> Result<()> {
        let (base, len) = with_bf16(host, |v| Ok((v.as_ptr() as usize, v.len())))?;
        let bytes = len * 2;
        if bytes == 0 || bytes > IMAGE_ROW_CACHE_BYTES {
            return Ok(());
        }
        while self.bytes + bytes > IMAGE_ROW_CACHE_BYTES {
            match self.entries.pop_front() {
                Some(old) => self.bytes -= old.len * 2,
                None => break,
            }
        }
        let dev = match gpu.alloc(bytes) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!("image rows not kept on the GPU: {e}");
                return Ok(());
            }
        };
        gpu.dtod(dev_rows, dev.ptr(), bytes).map_err(gpu_err)?;
        self.entries.push_back(Entry {
            _host: host.clone(),
            base,
            len,
            dev,
        });
        self.bytes += bytes;
        Ok(())
    }

    /// The device address of `rows` when they lie inside a cached image's host rows.
    pub fn find(&self, rows: &[half::bf16]) -> Option<DevPtr> {
        let (at, len) = (rows.as_ptr() as usize, rows.len());
        self.entries
            .iter()
            .rev()
            .find(|e| at >= e.base && at + len * 2 <= e.base + e.len * 2)
            .map(|e| e.dev.ptr() + (at - e.base) as u64)
    }
}
