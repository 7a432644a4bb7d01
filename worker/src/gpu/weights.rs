//! Checkpoint → GPU: each rank uploads only its slices, converted to bf16, straight from the
//! mmap (bf16 checkpoints need no host copy for row slices). Progress and GB/s on stderr.

use std::time::Instant;

use r4b_kernels::{DBuf, Gpu};
use safetensors::Dtype;

use crate::checkpoint::Checkpoint;
pub use crate::shard::{Shard, Split};
use crate::{Error, Result};

/// Uploads tensors, counting bytes for the GB/s report.
pub struct Loader<'a> {
    pub ckpt: &'a Checkpoint,
    pub gpu: &'a Gpu,
    pub shard: Shard,
    pub bytes: u64,
    started: Instant,
    total_hint: u64,
    last_report: u64,
    verbose: bool,
}

impl<'a> Loader<'a> {
    pub fn new(ckpt: &'a Checkpoint, gpu: &'a Gpu, shard: Shard, verbose: bool) -> Self {
        // Rough size of this rank's share, for the progress line.
        let total: u64 = ckpt
            .entries()
            .values()
            .map(|e| (e.end - e.start) as u64)
            .sum();
        Loader {
            ckpt,
            gpu,
            shard,
            bytes: 0,
            started: Instant::now(),
            total_hint: (total / shard.world.max(1) as u64).max(1),
            last_report: 0,
            verbose,
        }
    }

    /// Uploaded bytes per second so far.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.started.elapsed().as_secs_f64().max(1e-9) / 1e9
    }

    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// This rank's part of `name` as bf16, written at `dst` (element offset `at` of a buffer).
    /// Returns the number of bf16 elements written.
    pub fn upload_into(
        &mut self,
        name: &str,
        shape: &[usize],
        split: Split,
        dst: &DBuf,
        at: usize,
    ) -> Result<usize> {
        let axis = match split {
            Split::Replicated => None,
            Split::Rows => Some(0),
            Split::Cols => Some(1),
        };
        let (dtype, bytes) = self.ckpt.raw_slice(name, shape, self.shard, axis)?;
        let elems = bytes.len() / dtype_size(dtype);
        if (at + elems) * 2 > dst.bytes() {
            return Err(Error::Step(format!(
                "`{name}`: {elems} elements do not fit the device buffer at {at}"
            )));
        }
        let converted;
        let data: &[u8] = match dtype {
            Dtype::BF16 => &bytes,
            Dtype::F32 => {
                converted = bytes
                    .chunks_exact(4)
                    .flat_map(|c| {
                        half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .to_le_bytes()
                    })
                    .collect::<Vec<u8>>();
                &converted
            }
            Dtype::F16 => {
                converted = bytes
                    .chunks_exact(2)
                    .flat_map(|c| {
                        half::bf16::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                            .to_le_bytes()
                    })
                    .collect::<Vec<u8>>();
                &converted
            }
            other => {
                return Err(Error::TensorDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        // SAFETY: `dst` holds at least `(at + elems)` bf16 values (checked above); the copy is
        // synchronous for pageable memory.
        unsafe { self.gpu.htod(data, dst.at(at, 2)) }.map_err(gpu_err)?;
        self.bytes += data.len() as u64;
        self.report();
        Ok(elems)
    }

    /// A new buffer holding this rank's part of `name` (bf16).
    pub fn upload(&mut self, name: &str, shape: &[usize], split: Split) -> Result<DBuf> {
        let n: usize = shape.iter().product();
        let local = match split {
            Split::Replicated => n,
            _ => n / self.shard.world.max(1),
        };
        let buf = self.gpu.alloc(local * 2).map_err(gpu_err)?;
        self.upload_into(name, shape, split, &buf, 0)?;
        Ok(buf)
    }

    fn report(&mut self) {
        if !self.verbose {
            return;
        }
        let pct = self.bytes * 100 / self.total_hint;
        if pct >= self.last_report + 10 {
            self.last_report = pct - pct % 10;
            eprintln!(
                "rank {}: loading weights {:>3}% ({:.2} GB, {:.2} GB/s)",
                self.shard.rank,
                pct.min(100),
                self.bytes as f64 / 1e9,
                self.gbps()
            );
        }
    }
}

fn dtype_size(d: Dtype) -> usize {
    d.bitsize() / 8
}

/// Maps a GPU error into the worker's error type.
pub fn gpu_err(e: r4b_kernels::GpuError) -> Error {
    Error::Gpu(e.to_string())
}
