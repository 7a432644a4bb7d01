//! The GPU engine's collectives: sums and gathers of device buffers, enqueued on the GPU's
//! stream (feature `cuda`).
//!
//! Design:
//! - [`DeviceCollective`] is what the GPU layers call (the row-parallel linears and the
//!   vocab-parallel embedding all-reduce, the vocab-parallel head and the GPU sampler gather). It
//!   is a separate trait from [`super::Collective`]: that one moves host tensors and returns new
//!   ones; this one works in place on device addresses and returns as soon as the operation is
//!   enqueued, so a decode step that calls it can be captured in a CUDA graph.
//! - Implementations: [`Solo`] (a group of one: every operation is a no-op) and
//!   [`NcclCollective`] (one NCCL communicator on the engine's stream; also usable at world size
//!   1 to check that path). The kind is chosen once, when the group starts (`GpuModel::load`).
//! - Still to come: an all-reduce over CUDA IPC memory for ranks on one node (also several ranks
//!   sharing one GPU). To sit behind this trait it must sum in place on the caller's stream,
//!   give every rank the same bits, allocate nothing per call and be capturable in a CUDA graph
//!   (no host synchronisation inside the call).

use r4b_kernels::{DevPtr, Gpu, Nccl};

use super::CollectiveError;

/// Collectives over device buffers of one tensor-parallel group, enqueued on the stream of the
/// engine's `Gpu`. Every call must be made by every rank of the group, in the same order.
pub trait DeviceCollective: Send + std::fmt::Debug {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// The number of ranks in the group.
    fn world_size(&self) -> usize;
    /// Whether every operation is a no-op (a group of one without a communicator): callers may
    /// then skip the packing around a gather.
    fn is_noop(&self) -> bool;
    /// In-place element-wise sum of `count` bf16 values at `buf` over the group, enqueued on the
    /// stream (graph-capturable).
    ///
    /// # Safety
    /// `buf` is a live device allocation of the engine's context holding `count` bf16 values.
    unsafe fn all_reduce_sum_bf16(&self, buf: DevPtr, count: usize) -> Result<(), CollectiveError>;
    /// Gathers `count` 4-byte words of every rank, in rank order, and returns where they are:
    /// `recv` (`world_size() · count` words), or `send` itself when nothing had to move (a group
    /// of one).
    ///
    /// # Safety
    /// `send` holds `count` words and `recv` `world_size() · count` words on the engine's context.
    unsafe fn all_gather_u32(
        &self,
        send: DevPtr,
        recv: DevPtr,
        count: usize,
    ) -> Result<DevPtr, CollectiveError>;
}

/// World size 1 without a communicator: the sum is the buffer itself, the gather is `send`.
#[derive(Debug, Default)]
pub struct Solo;

impl DeviceCollective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn is_noop(&self) -> bool {
        true
    }
    unsafe fn all_reduce_sum_bf16(&self, _: DevPtr, _: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
    unsafe fn all_gather_u32(
        &self,
        send: DevPtr,
        _: DevPtr,
        _: usize,
    ) -> Result<DevPtr, CollectiveError> {
        Ok(send)
    }
}

/// One rank's NCCL communicator on the engine's stream.
#[derive(Debug)]
pub struct NcclCollective {
    nccl: Nccl,
}

impl NcclCollective {
    /// Joins the group `id` (rank 0's NCCL unique id) as `rank` of `world`; blocks until every
    /// rank has joined.
    pub fn join(gpu: &Gpu, id: &[u8], rank: usize, world: usize) -> Result<Self, CollectiveError> {
        let nccl = Nccl::new(gpu, id, rank, world).map_err(|e| device_error("join", e))?;
        Ok(NcclCollective { nccl })
    }
}

fn device_error(op: &'static str, e: r4b_kernels::GpuError) -> CollectiveError {
    CollectiveError::Device {
        op,
        reason: e.to_string(),
    }
}

impl DeviceCollective for NcclCollective {
    fn rank(&self) -> usize {
        self.nccl.rank()
    }
    fn world_size(&self) -> usize {
        self.nccl.world_size()
    }
    fn is_noop(&self) -> bool {
        false
    }
    unsafe fn all_reduce_sum_bf16(&self, buf: DevPtr, count: usize) -> Result<(), CollectiveError> {
        self.nccl
            .all_reduce_bf16(buf, count)
            .map_err(|e| device_error("all_reduce", e))
    }
    unsafe fn all_gather_u32(
        &self,
        send: DevPtr,
        recv: DevPtr,
        count: usize,
    ) -> Result<DevPtr, CollectiveError> {
        self.nccl
            .all_gather_u32(send, recv, count)
            .map_err(|e| device_error("all_gather", e))?;
        Ok(recv)
    }
}
