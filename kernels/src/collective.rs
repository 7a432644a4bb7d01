//! Collective family: the bf16 all-reduce of the row-parallel layers and the u32 all-gather of
//! the sampler's packed words, two ways:
//! - [`IpcAllReduce`]: over CUDA IPC memory, for the ranks of one node, whether they share one
//!   GPU or sit on GPUs with peer access. Its kernels are in `collective.cu` (design there):
//!   one-shot below [`IpcAllReduce::two_shot_min_bytes`], two-shot (reduce-scatter + all-gather)
//!   above, the same bits on every rank, graph-capturable, and a deadline instead of a hang.
//! - [`Nccl`]: one NCCL communicator on a [`Gpu`]'s stream (ranks on different GPUs without peer
//!   access, or across nodes). NCCL runs its own kernels.
use std::ffi::c_void;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaFunction, CudaStream};
use cudarc::nccl::{result as nccl_result, sys as nccl_sys};

use crate::launch::{grid1, i, kernel_set, KernelArg};
use crate::{DBuf, DevPtr, Gpu, GpuError, Result};

kernel_set! {
    /// The IPC collective's kernels.
    struct Kernels { ipc_all_reduce_one_shot, ipc_all_reduce_two_shot, ipc_all_gather_u32 }
}
pub(crate) use Kernels as CollectiveKernels;

/// What both collectives of this family provide, on a [`Gpu`]'s stream: the worker puts either
/// behind its one device-collective seam. Every call must be made by every rank of the group, in
/// the same order, with the same counts.
pub trait DeviceGroup: Send + std::fmt::Debug {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// In-place sum of `count` bf16 values at `buf` over the group.
    ///
    /// # Safety
    /// `buf` holds `count` bf16 values on `gpu`'s context.
    unsafe fn all_reduce_bf16(&self, gpu: &Gpu, buf: DevPtr, count: usize) -> Result<()>;
    /// Gathers `count` u32 of every rank into `recv` (`world · count`, rank order).
    ///
    /// # Safety
    /// `send` holds `count` and `recv` `world · count` words on `gpu`'s context.
    unsafe fn all_gather_u32(
        &self,
        gpu: &Gpu,
        send: DevPtr,
        recv: DevPtr,
        count: usize,
    ) -> Result<()>;
}

/// Most ranks of one IPC group (`IPC_MAX_WORLD` in collective.cu).
pub const IPC_MAX_WORLD: usize = 8;
/// Most CTAs of one IPC call (`IPC_MAX_BLOCKS`): every CTA of every rank must be resident at
/// once, since each waits for its peers'.
const IPC_MAX_BLOCKS: usize = 32;
/// The flags at the head of each region (`IPC_FLAG_BYTES`).
const IPC_FLAG_BYTES: usize = 65536;
const IPC_THREADS: u32 = 512;
/// Bytes of a CUDA IPC memory handle.
pub const IPC_HANDLE_BYTES: usize = 64;

/// One rank's end of an all-reduce over CUDA IPC memory (design in `collective.cu`).
///
/// Set up in two steps: [`IpcAllReduce::new`] allocates this rank's region and returns its IPC
/// handle; once every rank has every handle (the caller exchanges them, e.g. over the host
/// collective), [`IpcAllReduce::connect`] maps the peers' regions. Every call must then be made
/// by every rank, in the same order, with the same counts.
pub struct IpcAllReduce {
    rank: usize,
    world: usize,
    /// This rank's region: flags, then two staging buffers of `stage_bytes`.
    region: DBuf,
    stage_bytes: usize,
    /// The regions' addresses in rank order, on the device (`u64 × IPC_MAX_WORLD`).
    bases: DBuf,
    /// Epoch and blocks-done counter (`u32 × 2`, private to this rank).
    state: DBuf,
    /// Peer regions mapped by `connect` (closed on drop).
    opened: Vec<DevPtr>,
    timeout_ns: u64,
    two_shot_min_bytes: usize,
    connected: bool,
}

// SAFETY: used from one thread at a time (the worker's executor); the addresses are plain
// device addresses of the owning context.
unsafe impl Send for IpcAllReduce {}

impl std::fmt::Debug for IpcAllReduce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpcAllReduce")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("stage_bytes", &self.stage_bytes)
            .field("two_shot_min_bytes", &self.two_shot_min_bytes)
            .finish_non_exhaustive()
    }
}

impl IpcAllReduce {
    /// Allocates this rank's region (flags zeroed; two staging buffers of `stage_bytes`, a
    /// multiple of 16) and returns it with its IPC handle. A barrier that waits longer than
    /// `timeout` (a peer died or hangs) traps: the context fails and every later call errors.
    pub fn new(
        gpu: &Gpu,
        (rank, world): (usize, usize),
        stage_bytes: usize,
        timeout: Duration,
    ) -> Result<(Self, [u8; IPC_HANDLE_BYTES])> {
        if world == 0 || world > IPC_MAX_WORLD || rank >= world {
            return Err(GpuError::Invalid(format!(
                "IPC all-reduce: rank {rank} of {world} (at most {IPC_MAX_WORLD} ranks)"
            )));
        }
        let stage_bytes = stage_bytes.max(16).next_multiple_of(16);
        let region = gpu.alloc(IPC_FLAG_BYTES + 2 * stage_bytes)?;
        let bases = gpu.alloc(8 * IPC_MAX_WORLD)?;
        let state = gpu.alloc(8)?;
        // SAFETY: fresh allocations of these sizes; the synchronisation below makes the zeros
        // visible before any peer can map the region.
        let handle = unsafe {
            gpu.memset0(region.ptr(), IPC_FLAG_BYTES)?;
            gpu.memset0(state.ptr(), 8)?;
            gpu.memset0(bases.ptr(), 8 * IPC_MAX_WORLD)?;
            gpu.sync()?;
            let mut h: cu::CUipcMemHandle = std::mem::zeroed();
            cu::cuIpcGetMemHandle(&mut h, region.ptr()).result()?;
            let mut out = [0u8; IPC_HANDLE_BYTES];
            for (o, c) in out.iter_mut().zip(h.reserved.iter()) {
                *o = *c as u8;
            }
            out
        };
        Ok((
            IpcAllReduce {
                rank,
                world,
                region,
                stage_bytes,
                bases,
                state,
                opened: Vec::new(),
                timeout_ns: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
                two_shot_min_bytes: default_two_shot_min_bytes(world),
                connected: false,
            },
            handle,
        ))
    }

    /// Maps every peer's region from its handle (`handles` in rank order; this rank's own entry
    /// is not used) and uploads the addresses. Peer regions on another GPU need peer access
    /// between the devices (the caller checks it).
    pub fn connect(&mut self, gpu: &Gpu, handles: &[[u8; IPC_HANDLE_BYTES]]) -> Result<()> {
        if handles.len() != self.world {
            return Err(GpuError::Invalid(format!(
                "IPC all-reduce: {} handles for {} ranks",
                handles.len(),
                self.world
            )));
        }
        gpu.bind()?;
        let mut addrs = vec![0u64; IPC_MAX_WORLD];
        for (r, h) in handles.iter().enumerate() {
            if r == self.rank {
                addrs[r] = self.region.ptr();
                continue;
            }
            // SAFETY: a handle made by `new` in a peer process; CUDA validates it.
            let ptr = unsafe {
                let mut raw: cu::CUipcMemHandle = std::mem::zeroed();
                for (d, s) in raw.reserved.iter_mut().zip(h) {
                    *d = *s as _;
                }
                let mut ptr = 0;
                cu::cuIpcOpenMemHandle_v2(
                    &mut ptr,
                    raw,
                    cu::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                )
                .result()?;
                ptr
            };
            self.opened.push(ptr);
            addrs[r] = ptr;
        }
        self.upload_bases(gpu, &addrs)
    }

    /// Wires ranks that live in this one process (one context: tests, benchmarks): every
    /// region is addressed directly, without IPC.
    pub fn connect_local(group: &mut [IpcAllReduce], gpu: &Gpu) -> Result<()> {
        let mut addrs = vec![0u64; IPC_MAX_WORLD];
        for (a, r) in addrs.iter_mut().zip(group.iter()) {
            *a = r.region.ptr();
        }
        for r in group.iter_mut() {
            if r.world != group_len(&addrs) {
                return Err(GpuError::Invalid(
                    "IPC all-reduce: a local group needs every rank".into(),
                ));
            }
            r.upload_bases(gpu, &addrs)?;
        }
        Ok(())
    }

    fn upload_bases(&mut self, gpu: &Gpu, addrs: &[u64]) -> Result<()> {
        // SAFETY: `bases` holds IPC_MAX_WORLD u64; `addrs` has that many.
        unsafe {
            gpu.htod(addrs, self.bases.ptr())?;
        }
        gpu.sync()?;
        self.connected = true;
        Ok(())
    }

    /// Messages of at least this many bytes take the two-shot kernel.
    pub fn two_shot_min_bytes(&self) -> usize {
        self.two_shot_min_bytes
    }

    /// Sets the one-shot / two-shot threshold (every rank must set the same).
    pub fn set_two_shot_min_bytes(&mut self, bytes: usize) {
        self.two_shot_min_bytes = bytes;
    }

    fn check(&self) -> Result<()> {
        if self.connected {
            Ok(())
        } else {
            Err(GpuError::Invalid(
                "IPC all-reduce used before connect".into(),
            ))
        }
    }

    /// Launches one of this family's kernels over `work` items: its own arguments `head`, then
    /// the group's (regions, state, rank, world, staging bytes, deadline), as every kernel of
    /// collective.cu takes them.
    unsafe fn launch(
        &self,
        gpu: &Gpu,
        f: &CudaFunction,
        work: usize,
        head: &[&dyn KernelArg],
    ) -> Result<()> {
        let (bases, state) = (self.bases.ptr(), self.state.ptr());
        let (rank, world, stage) = (i(self.rank), i(self.world), self.stage_bytes as i64);
        let mut args: Vec<&dyn KernelArg> = head.to_vec();
        args.extend_from_slice(&[&bases, &state, &rank, &world, &stage, &self.timeout_ns]);
        gpu.launch(f, grid1(blocks(work), IPC_THREADS), &args)
    }
}

impl DeviceGroup for IpcAllReduce {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    /// In-place sum of `count` bf16 values at `buf` over the group, enqueued on `gpu`'s stream
    /// (in pieces of at most one staging buffer). Every rank gets the same bits: each value is
    /// summed in f32 in rank order and rounded once.
    unsafe fn all_reduce_bf16(&self, gpu: &Gpu, buf: DevPtr, count: usize) -> Result<()> {
        self.check()?;
        let k = &gpu.kernels.collective;
        let piece = self.stage_bytes / 2;
        let mut done = 0;
        while done < count {
            let n = piece.min(count - done);
            let (units, rest) = ((n / 8) as i64, i(n % 8));
            let two = 2 * n >= self.two_shot_min_bytes && self.world > 1;
            let (f, work) = if two {
                (&k.ipc_all_reduce_two_shot, (n / 8).div_ceil(self.world))
            } else {
                (&k.ipc_all_reduce_one_shot, n / 8)
            };
            let at = buf + 2 * done as u64;
            self.launch(gpu, f, work, &[&at, &units, &rest])?;
            done += n;
        }
        Ok(())
    }

    /// Gathers `count` u32 of every rank into `recv` (`world · count`, rank order).
    unsafe fn all_gather_u32(
        &self,
        gpu: &Gpu,
        send: DevPtr,
        recv: DevPtr,
        count: usize,
    ) -> Result<()> {
        self.check()?;
        if 4 * count > self.stage_bytes {
            return Err(GpuError::Invalid(format!(
                "IPC all-gather of {count} words: the staging buffer holds {}",
                self.stage_bytes / 4
            )));
        }
        let k = &gpu.kernels.collective;
        self.launch(
            gpu,
            &k.ipc_all_gather_u32,
            count,
            &[&send, &recv, &(count as i64)],
        )
    }
}

/// Where two-shot starts to win, measured on one H200 with the ranks on separate streams
/// (`r4b-gpu-check allreduce`, bench/RESULTS.md): from 10 MiB at 2 ranks, 5 MiB at 4 and 8 ranks
/// (at 1.3 MiB they are equal within noise).
fn default_two_shot_min_bytes(world: usize) -> usize {
    if world <= 2 {
        8 << 20
    } else {
        2 << 20
    }
}

/// The ranks of a local group (addresses set so far).
fn group_len(addrs: &[u64]) -> usize {
    addrs.iter().take_while(|&&a| a != 0).count()
}

/// CTAs for `work` items (16-byte units or words): one item per thread up to the cap.
fn blocks(work: usize) -> usize {
    work.div_ceil(IPC_THREADS as usize).clamp(1, IPC_MAX_BLOCKS)
}

impl Drop for IpcAllReduce {
    fn drop(&mut self) {
        for &p in &self.opened {
            // SAFETY: mapped by `connect`, closed once.
            unsafe {
                let _ = cu::cuIpcCloseMemHandle(p);
            }
        }
    }
}

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
}

impl DeviceGroup for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    /// On the communicator's stream (the one of the `Gpu` it joined on).
    unsafe fn all_reduce_bf16(&self, _: &Gpu, buf: DevPtr, count: usize) -> Result<()> {
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

    unsafe fn all_gather_u32(
        &self,
        _: &Gpu,
        send: DevPtr,
        recv: DevPtr,
        count: usize,
    ) -> Result<()> {
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
