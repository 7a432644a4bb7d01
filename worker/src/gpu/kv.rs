//! The paged bf16 KV cache of one rank: per layer a K and a V pool of `blocks × block_size` slots
//! of `nkv × hd` values. Owned by the runner and borrowed by the model's forward (the layers hold
//! weights only). The last block is scratch: padded rows of a graph step write there.

use candle_core::{DType, Device, Tensor};
use r4b_kernels::{DBuf, DevPtr, Gpu};

use super::weights::gpu_err;
use super::GpuLimits;
use crate::collective::Collective;
use crate::{Error, Result};

/// How this rank's KV budget is found when the group has several ranks: `ranks_on_device`
/// ranks (this one included) split `memory_utilization` of their GPU, and the group measures the
/// memory in use only once every rank has allocated everything but its KV cache.
pub struct KvShare<'a> {
    pub ranks_on_device: usize,
    /// The group's host collective (its barriers).
    pub host: &'a dyn Collective,
}

impl KvShare<'_> {
    /// Bytes of `gpu` in use by every process, measured between two barriers of the group (so
    /// every rank sharing the GPU has allocated its weights and buffers, and none its cache
    /// yet). At world size 1 there is no barrier.
    fn measure_used(&self, gpu: &Gpu) -> Result<usize> {
        let barrier = || -> Result<()> {
            if self.host.world_size() > 1 {
                let one = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
                self.host.all_reduce_sum(&one)?;
            }
            Ok(())
        };
        gpu.sync().map_err(gpu_err)?;
        barrier()?;
        let (free, total) = gpu.mem_info().map_err(gpu_err)?;
        barrier()?;
        Ok(total - free)
    }
}

/// One layer's view of the cache, as the attention kernels read it.
#[derive(Clone, Copy, Debug)]
pub struct KvLayer {
    pub k: DevPtr,
    pub v: DevPtr,
    pub block_size: usize,
    /// Width of a block-table row on the device.
    pub max_blocks: usize,
}

/// See the module documentation.
pub struct GpuKv {
    layers: Vec<(DBuf, DBuf)>,
    /// Blocks the scheduler may use (the scratch block is not counted).
    num_blocks: usize,
    block_size: usize,
    max_blocks: usize,
}

impl GpuKv {
    /// KV bytes per token for `layers` layers of `nkv` heads of `head_dim` (bf16).
    pub fn bytes_per_token(layers: usize, nkv: usize, head_dim: usize) -> usize {
        layers * 2 * nkv * head_dim * 2
    }

    /// Allocates `limits.num_blocks` blocks, or as many as fit in this rank's share of
    /// `memory_utilization` of the device less `reserved` bytes per rank (what the rank allocates
    /// later: the image budget), plus the scratch block. Every rank must end with the same count:
    /// the caller takes the minimum.
    pub fn alloc(
        gpu: &Gpu,
        (layers, nkv, head_dim): (usize, usize, usize),
        lim: &GpuLimits,
        (share, reserved): (&KvShare, usize),
    ) -> Result<Self> {
        let used = share.measure_used(gpu)?;
        let (_, total) = gpu.mem_info().map_err(gpu_err)?;
        let budget = (total as f64 * lim.memory_utilization) as usize;
        // Graphs, cuBLAS and NCCL take some memory after this point, and the image rows up to
        // `reserved`, per rank.
        let ranks = share.ranks_on_device.max(1);
        let reserve = ranks * ((512 << 20) + reserved);
        let per_block = Self::bytes_per_token(layers, nkv, head_dim) * lim.block_size;
        let fit = budget.saturating_sub(used + reserve) / ranks / per_block.max(1);
        let blocks = match lim.num_blocks {
            0 => fit,
            n => n,
        };
        if blocks < 2 || (lim.num_blocks > 0 && lim.num_blocks > fit) {
            return Err(Error::Kv(format!(
                "{blocks} KV blocks wanted, {fit} fit in {:.1} GiB ({:.0}% of {:.1} GiB, {:.1} GiB \
                 in use, {:.1} GiB kept for image rows per rank, {ranks} rank(s) on this GPU)",
                budget.saturating_sub(used) as f64 / ranks as f64 / (1u64 << 30) as f64,
                lim.memory_utilization * 100.0,
                total as f64 / (1u64 << 30) as f64,
                used as f64 / (1u64 << 30) as f64,
                reserved as f64 / (1u64 << 30) as f64
            )));
        }
        let layer_bytes = blocks * lim.block_size * nkv * head_dim * 2;
        let mut pools = Vec::with_capacity(layers);
        for _ in 0..layers {
            let k = gpu.alloc(layer_bytes).map_err(gpu_err)?;
            let v = gpu.alloc(layer_bytes).map_err(gpu_err)?;
            // SAFETY: fresh allocations of `layer_bytes`.
            unsafe {
                gpu.memset0(k.ptr(), layer_bytes).map_err(gpu_err)?;
                gpu.memset0(v.ptr(), layer_bytes).map_err(gpu_err)?;
            }
            pools.push((k, v));
        }
        gpu.sync().map_err(gpu_err)?;
        Ok(GpuKv {
            layers: pools,
            // The last block is the scratch block.
            num_blocks: blocks - 1,
            block_size: lim.block_size,
            max_blocks: lim.max_model_len.div_ceil(lim.block_size),
        })
    }

    /// Blocks the scheduler may use.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The scratch block (padded graph rows write and read only there).
    pub fn scratch_block(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Layer `i`'s pools.
    pub fn layer(&self, i: usize) -> Result<KvLayer> {
        let (k, v) = self
            .layers
            .get(i)
            .ok_or_else(|| Error::Kv(format!("no KV cache for layer {i}")))?;
        Ok(KvLayer {
            k: k.ptr(),
            v: v.ptr(),
            block_size: self.block_size,
            max_blocks: self.max_blocks,
        })
    }
}
