//! The GPU engine's collectives: sums and gathers of device buffers, enqueued on the GPU's
//! stream (feature `cuda`).
//!
//! Design:
//! - [`DeviceCollective`] is what the GPU layers call (the row-parallel linears and the
//!   vocab-parallel embedding all-reduce, the vocab-parallel head and the GPU sampler gather). It
//!   is a separate trait from [`super::Collective`]: that one moves host tensors and returns new
//!   ones; this one works in place on device addresses and returns as soon as the operation is
//!   enqueued, so a decode step that calls it can be captured in a CUDA graph.
//! - Implementations, chosen once when the group starts (`GpuModel::load`):
//!   - [`Solo`]: a group of one; every operation is a no-op;
//!   - [`IpcCollective`]: the ranks of one node over CUDA IPC memory, whether they share one GPU
//!     or sit on GPUs with peer access (r4b-kernels' `IpcAllReduce`: same bits on every rank,
//!     one-shot or two-shot by size, graph-capturable, a deadline instead of a hang). The default
//!     at TP > 1, and the only one when ranks share a GPU (NCCL refuses that);
//!   - [`NcclCollective`]: one NCCL communicator on the engine's stream, for GPUs without peer
//!     access, or when `--disable-custom-all-reduce` asks for it (also usable at world size 1 to
//!     check that path).
//!
//! Every implementation sums in place on the caller's stream, gives every rank the same bits,
//! allocates nothing per call and can be captured in a CUDA graph (no host synchronisation
//! inside a call).

use std::time::Duration;

use candle_core::{Device, Tensor};
use r4b_kernels::{DevPtr, DeviceGroup, Gpu, IpcAllReduce, Nccl, IPC_HANDLE_BYTES};

use super::{Collective, CollectiveError};

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
    /// In-place element-wise sum of `count` bf16 values at `buf` over the group, enqueued on
    /// `gpu`'s stream (graph-capturable).
    ///
    /// # Safety
    /// `buf` is a live device allocation of the engine's context holding `count` bf16 values.
    unsafe fn all_reduce_sum_bf16(
        &self,
        gpu: &Gpu,
        buf: DevPtr,
        count: usize,
    ) -> Result<(), CollectiveError>;
    /// Gathers `count` 4-byte words of every rank, in rank order, and returns where they are:
    /// `recv` (`world_size() · count` words), or `send` itself when nothing had to move (a group
    /// of one).
    ///
    /// # Safety
    /// `send` holds `count` words and `recv` `world_size() · count` words on the engine's context.
    unsafe fn all_gather_u32(
        &self,
        gpu: &Gpu,
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
    unsafe fn all_reduce_sum_bf16(
        &self,
        _: &Gpu,
        _: DevPtr,
        _: usize,
    ) -> Result<(), CollectiveError> {
        Ok(())
    }
    unsafe fn all_gather_u32(
        &self,
        _: &Gpu,
        send: DevPtr,
        _: DevPtr,
        _: usize,
    ) -> Result<DevPtr, CollectiveError> {
        Ok(send)
    }
}

/// One rank of a group whose operations an r4b-kernels collective runs ([`DeviceGroup`]): NCCL
/// ([`NcclCollective`]) or the all-reduce over CUDA IPC memory ([`IpcCollective`]).
#[derive(Debug)]
pub struct Group<T>(T);

/// One rank's NCCL communicator on the engine's stream.
pub type NcclCollective = Group<Nccl>;
/// The ranks of one node over CUDA IPC memory (see the module documentation).
pub type IpcCollective = Group<IpcAllReduce>;

impl NcclCollective {
    /// Joins the group `id` (rank 0's NCCL unique id) as `rank` of `world`; blocks until every
    /// rank has joined.
    pub fn join(gpu: &Gpu, id: &[u8], rank: usize, world: usize) -> Result<Self, CollectiveError> {
        let nccl = Nccl::new(gpu, id, rank, world).map_err(|e| device_error("join", e))?;
        Ok(Group(nccl))
    }
}

fn device_error(op: &'static str, e: r4b_kernels::GpuError) -> CollectiveError {
    CollectiveError::Device {
        op,
        reason: e.to_string(),
    }
}

impl<T: DeviceGroup> DeviceCollective for Group<T> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn is_noop(&self) -> bool {
        false
    }
    unsafe fn all_reduce_sum_bf16(
        &self,
        gpu: &Gpu,
        buf: DevPtr,
        count: usize,
    ) -> Result<(), CollectiveError> {
        self.0
            .all_reduce_bf16(gpu, buf, count)
            .map_err(|e| device_error("all_reduce", e))
    }
    unsafe fn all_gather_u32(
        &self,
        gpu: &Gpu,
        send: DevPtr,
        recv: DevPtr,
        count: usize,
    ) -> Result<DevPtr, CollectiveError> {
        self.0
            .all_gather_u32(gpu, send, recv, count)
            .map_err(|e| device_error("all_gather", e))?;
        Ok(recv)
    }
}

impl IpcCollective {
    /// Allocates this rank's region (two staging buffers of `stage_bytes`), exchanges the IPC
    /// handles over the host collective `host` (whose rank and size this group takes) and maps
    /// the peers' regions. A collective that waits longer than `timeout` for a peer fails the
    /// GPU context instead of hanging.
    pub fn join(
        gpu: &Gpu,
        host: &dyn Collective,
        stage_bytes: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let (rank, world) = (host.rank(), host.world_size());
        let (mut ipc, handle) = IpcAllReduce::new(gpu, (rank, world), stage_bytes, timeout)
            .map_err(|e| device_error("ipc_setup", e))?;
        let mine =
            Tensor::from_vec(handle.to_vec(), IPC_HANDLE_BYTES, &Device::Cpu).map_err(|e| {
                device_error("ipc_setup", r4b_kernels::GpuError::Invalid(e.to_string()))
            })?;
        let mut handles = Vec::with_capacity(world);
        for t in host.all_gather(&mine)? {
            let bytes: Vec<u8> = t.to_vec1().map_err(|e| {
                device_error("ipc_setup", r4b_kernels::GpuError::Invalid(e.to_string()))
            })?;
            let h: [u8; IPC_HANDLE_BYTES] = bytes.try_into().map_err(|_| {
                device_error(
                    "ipc_setup",
                    r4b_kernels::GpuError::Invalid("an IPC handle of the wrong size".into()),
                )
            })?;
            handles.push(h);
        }
        ipc.connect(gpu, &handles)
            .map_err(|e| device_error("ipc_connect", e))?;
        // Every rank has mapped every region before any collective may run.
        host.all_reduce_sum(
            &Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).map_err(|e| {
                device_error("ipc_setup", r4b_kernels::GpuError::Invalid(e.to_string()))
            })?,
        )?;
        Ok(Group(ipc))
    }

    /// Messages of at least this many bytes take the two-shot kernel (every rank the same).
    pub fn set_two_shot_min_bytes(&mut self, bytes: usize) {
        self.0.set_two_shot_min_bytes(bytes);
    }
}
