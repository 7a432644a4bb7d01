//! Collective family: the NCCL communicator on a [`Gpu`]'s stream (bf16 all-reduce for the
//! row-parallel layers, u32 all-gather for the sampler's packed words). No kernels of its own:
//! NCCL runs them, so there is no `collective.cu`.
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::CudaStream;
use cudarc::nccl::{result as nccl_result, sys as nccl_sys};

use crate::{DevPtr, Gpu, GpuError, Result};

/// A new NCCL unique id (128 bytes), made by rank 0 and handed to every rank.
pub fn nccl_unique_id() -> Result<Vec<u8>> {
    let id = nccl_result::get_uniqueid()?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// One rank's NCCL communicator on a [`Gpu`]'s stream.
#[derive(Debug)]
pub struct Nccl {
    comm: nccl_sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

// SAFETY: the communicator is used from one thread at a time (the worker's executor).
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the group `id` as `rank` of `world` (blocks until every rank has joined).
    pub fn new(gpu: &Gpu, id: &[u8], rank: usize, world: usize) -> Result<Self> {
        if id.len() != 128 {
            return Err(GpuError::Invalid(format!(
                "NCCL unique id has {} bytes, want 128",
                id.len()
            )));
        }
        gpu.bind()?;
        let mut raw = nccl_sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in raw.internal.iter_mut().zip(id) {
            *d = *s as _;
        }
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL before use.
        let comm = unsafe {
            nccl_result::comm_init_rank(comm.as_mut_ptr(), world as i32, raw, rank as i32)?;
            comm.assume_init()
        };
        Ok(Nccl {
            comm,
            stream: gpu.stream.clone(),
            rank,
            world,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// In-place sum of `count` bf16 values over the group.
    pub unsafe fn all_reduce_bf16(&self, buf: DevPtr, count: usize) -> Result<()> {
        nccl_result::all_reduce(
            buf as *const c_void,
            buf as *mut c_void,
            count,
            nccl_sys::ncclDataType_t::ncclBfloat16,
            nccl_sys::ncclRedOp_t::ncclSum,
            self.comm,
            self.stream.cu_stream() as _,
        )?;
        Ok(())
    }

    /// Gathers `count` 4-byte values from every rank into `recv` (`world · count`, rank order).
    pub unsafe fn all_gather_u32(&self, send: DevPtr, recv: DevPtr, count: usize) -> Result<()> {
        nccl_result::all_gather(
            send as *const c_void,
            recv as *mut c_void,
            count,
            nccl_sys::ncclDataType_t::ncclUint32,
            self.comm,
            self.stream.cu_stream() as _,
        )?;
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was initialised in `new` and is dropped once. Abort, not
        // destroy: a peer may be gone, and destroy would wait for it.
        unsafe {
            let _ = nccl_result::comm_abort(self.comm);
        }
    }
}
