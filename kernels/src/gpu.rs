//! The device core: context, the stream everything runs on, allocations ([`DBuf`], [`DevPtr`]),
//! copies, loading the kernel module, programmatic dependent launch, and the timeline/event
//! plumbing. The kernels' launchers live with their family (`attention.rs`, `norm.rs`, …), each
//! in its own `impl Gpu` block, and launch through [`Gpu::launch`] (`launch.rs`).
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use cudarc;
use cudarc::driver::{result as drv, CudaContext, CudaStream};
use cudarc::nccl::result as nccl_result;
use cudarc::nvrtc::Ptx;

use crate::collective::CollectiveKernels;
use crate::{attention, elementwise, embed, gemm, norm, sample};
use crate::{KernelArch, KernelOptions};

/// A device address.
pub type DevPtr = u64;

/// The PTX of `src/r4b.cu` (every family's kernels) for sm_80 (A100; runs on every later
/// device too).
pub const PTX_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/r4b_sm_80.ptx"));
/// The PTX of `src/r4b.cu` for sm_90 (H100/H200: programmatic dependent launch).
pub const PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/r4b_sm_90.ptx"));

/// Errors of the GPU layer.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("NCCL: {0:?}")]
    Nccl(nccl_result::NcclError),
    #[error("{0}")]
    Invalid(String),
}

impl From<nccl_result::NcclError> for GpuError {
    fn from(e: nccl_result::NcclError) -> Self {
        GpuError::Nccl(e)
    }
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;

/// Number of CUDA devices visible to this process.
pub fn device_count() -> Result<usize> {
    Ok(CudaContext::device_count()? as usize)
}

/// Whether device `a` can map memory of device `b` (peer access over NVLink or PCIe); a device
/// can always reach itself.
pub fn can_access_peer(a: usize, b: usize) -> Result<bool> {
    use cudarc::driver::sys as cu;
    if a == b {
        return Ok(true);
    }
    let ordinal =
        |o: usize| i32::try_from(o).map_err(|_| GpuError::Invalid(format!("device ordinal {o}")));
    // SAFETY: plain queries; the driver was initialised by `device_count` or a context.
    unsafe {
        cu::cuInit(0).result()?;
        let (mut da, mut db) = (0, 0);
        cu::cuDeviceGet(&mut da, ordinal(a)?).result()?;
        cu::cuDeviceGet(&mut db, ordinal(b)?).result()?;
        let mut can = 0;
        cu::cuDeviceCanAccessPeer(&mut can, da, db).result()?;
        Ok(can != 0)
    }
}

/// An owned device allocation (freed on drop).
#[derive(Debug)]
pub struct DBuf {
    ptr: DevPtr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DBuf {
    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Address of element `i` of `elem`-byte elements.
    pub fn at(&self, i: usize, elem: usize) -> DevPtr {
        self.ptr + (i * elem) as u64
    }
}

impl Drop for DBuf {
    fn drop(&mut self) {
        if self.ptr != 0 && self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `Gpu::alloc` in this context, freed once.
            unsafe {
                let _ = drv::free_sync(self.ptr);
            }
        }
    }
}

/// The kernels of every family, loaded from the one module, and cuBLAS (the GEMM family's).
pub(crate) struct Kernels {
    pub(crate) embed: embed::Kernels,
    pub(crate) norm: norm::Kernels,
    pub(crate) attention: attention::Kernels,
    pub(crate) elementwise: elementwise::Kernels,
    pub(crate) gemm: gemm::Kernels,
    pub(crate) sample: sample::Kernels,
    pub(crate) collective: CollectiveKernels,
}

/// One GPU: context, the stream everything runs on, cuBLAS and the loaded kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// The kernel choices (see [`KernelOptions`]); benchmarks may change them between launches.
    pub options: KernelOptions,
    /// Compute capability `(major, minor)` of the device.
    pub compute_capability: (i32, i32),
    /// The PTX loaded: 80 or 90.
    pub ptx_arch: u32,
    /// Kernels launch with programmatic dependent launch (each may start while the previous
    /// one finishes); see [`Gpu::set_pdl`].
    pdl: AtomicBool,
    /// Multiprocessors of the device.
    pub sm_count: usize,
    /// When set, [`Gpu::mark`] records a timing event per labelled op (eager steps only).
    timeline: std::sync::Mutex<Option<Vec<(&'static str, cudarc::driver::CudaEvent)>>>,
    pub(crate) kernels: Kernels,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .finish()
    }
}

impl Gpu {
    /// Opens device `ordinal`, loads the kernels built for it (sm_90 on Hopper and newer, sm_80
    /// on Ampere, or sm_80 when `options.arch` forces it) and sets cuBLAS up on one stream.
    pub fn new(ordinal: usize, options: &KernelOptions) -> Result<Self> {
        let ctx = CudaContext::new(ordinal)?;
        // One stream, no cross-stream hazards: cudarc's per-allocation events are not needed.
        // SAFETY: every buffer of this crate is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let major = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        )?;
        let minor = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        )?;
        let ptx_arch = match (options.arch, major) {
            (_, m) if m < 8 => {
                return Err(GpuError::Invalid(format!(
                    "compute capability {major}.{minor}: the kernels need sm_80 (A100) or newer"
                )))
            }
            (KernelArch::Sm80, _) | (KernelArch::Auto, 8) => 80,
            (KernelArch::Auto, _) => 90,
        };
        let ptx = if ptx_arch == 90 { PTX_SM90 } else { PTX_SM80 };
        let module = ctx.load_module(Ptx::from_src(ptx))?;
        let kernels = Kernels {
            embed: embed::Kernels::load(&module)?,
            norm: norm::Kernels::load(&module)?,
            attention: attention::Kernels::load(&module)?,
            elementwise: elementwise::Kernels::load(&module)?,
            gemm: gemm::Kernels::load(&module, &ctx, &stream)?,
            sample: sample::Kernels::load(&module)?,
            collective: CollectiveKernels::load(&module)?,
        };
        let sm_count = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        Ok(Gpu {
            ctx,
            stream,
            options: *options,
            compute_capability: (major, minor),
            ptx_arch,
            pdl: AtomicBool::new(false),
            sm_count,
            timeline: std::sync::Mutex::new(None),
            kernels,
        })
    }

    /// Turns programmatic dependent launch on or off for the following launches (a CUDA graph
    /// keeps what was set while it was captured). Measured on the H100: +1.5–2 % at 1–128
    /// decode queries, −16 % for the CUDA-core decode attention at 256 (bench/RESULTS.md).
    /// Only on the sm_90 build, and only when the options allow it.
    pub fn set_pdl(&self, on: bool) {
        let allowed = self.ptx_arch >= 90 && self.options.pdl;
        self.pdl.store(on && allowed, Ordering::Relaxed);
    }

    /// Whether launches carry the programmatic-dependent-launch attribute now.
    pub(crate) fn pdl_on(&self) -> bool {
        self.pdl.load(Ordering::Relaxed)
    }

    pub(crate) fn alloc_in(ctx: &Arc<CudaContext>, bytes: usize) -> Result<DBuf> {
        ctx.bind_to_thread()?;
        // SAFETY: a plain allocation, freed by DBuf's drop.
        let ptr = unsafe { drv::malloc_sync(bytes.max(1))? };
        Ok(DBuf {
            ptr,
            bytes,
            ctx: ctx.clone(),
        })
    }

    /// A device allocation of `bytes` (contents undefined).
    pub fn alloc(&self, bytes: usize) -> Result<DBuf> {
        Self::alloc_in(&self.ctx, bytes)
    }

    /// Starts recording a timeline: every later [`Gpu::mark`] records an event.
    pub fn timeline_start(&self) -> Result<()> {
        let ev = self
            .stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        if let Ok(mut t) = self.timeline.lock() {
            *t = Some(vec![("start", ev)]);
        }
        Ok(())
    }

    /// Marks the end of the op labelled `label` (no-op unless a timeline is recording).
    pub fn mark(&self, label: &'static str) -> Result<()> {
        if let Ok(mut t) = self.timeline.lock() {
            if let Some(v) = t.as_mut() {
                let ev = self
                    .stream
                    .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
                v.push((label, ev));
            }
        }
        Ok(())
    }

    /// Stops the timeline and returns milliseconds per label (summed over its occurrences), in
    /// first-seen order.
    pub fn timeline_stop(&self) -> Result<Vec<(&'static str, f64)>> {
        self.sync()?;
        let v = match self.timeline.lock() {
            Ok(mut t) => t.take().unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        for w in v.windows(2) {
            let ms = f64::from(w[0].1.elapsed_ms(&w[1].1)?);
            match out.iter_mut().find(|(l, _)| *l == w[1].0) {
                Some(e) => e.1 += ms,
                None => out.push((w[1].0, ms)),
            }
        }
        Ok(out)
    }

    /// Free and total device memory, bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.bind_to_thread()?;
        Ok(drv::mem_get_info()?)
    }

    /// Makes this GPU's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        Ok(self.ctx.bind_to_thread()?)
    }

    pub fn sync(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Host → device, ordered on the stream. The host slice must stay untouched until the stream
    /// reaches the copy (pageable memory: the driver stages it before returning).
    pub unsafe fn htod<T>(&self, src: &[T], dst: DevPtr) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        drv::memcpy_htod_async(dst, src, self.stream.cu_stream())?;
        Ok(())
    }

    /// Host `[rows, width]` i32 → device rows of `pitch` i32 (`pitch ≥ width`; the rest of each
    /// device row is left as it was), one pitched copy.
    pub unsafe fn htod_rows_i32(
        &self,
        src: &[i32],
        (rows, width): (usize, usize),
        dst: DevPtr,
        pitch: usize,
    ) -> Result<()> {
        if rows == 0 || width == 0 {
            return Ok(());
        }
        if src.len() < rows * width || pitch < width {
            return Err(GpuError::Invalid(format!(
                "pitched copy of {rows}×{width} from {} values into pitch {pitch}",
                src.len()
            )));
        }
        use cudarc::driver::sys as cu;
        let copy = cu::CUDA_MEMCPY2D_st {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: cu::CUmemorytype::CU_MEMORYTYPE_HOST,
            srcHost: src.as_ptr() as *const c_void,
            srcDevice: 0,
            srcArray: std::ptr::null_mut(),
            srcPitch: width * 4,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: cu::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst,
            dstArray: std::ptr::null_mut(),
            dstPitch: pitch * 4,
            WidthInBytes: width * 4,
            Height: rows,
        };
        cu::cuMemcpy2DAsync_v2(&copy, self.stream.cu_stream()).result()?;
        Ok(())
    }

    /// Device → host; synchronises the stream.
    pub unsafe fn dtoh<T>(&self, src: DevPtr, dst: &mut [T]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        drv::memcpy_dtoh_async(dst, src, self.stream.cu_stream())?;
        self.sync()
    }

    pub unsafe fn dtod(&self, src: DevPtr, dst: DevPtr, bytes: usize) -> Result<()> {
        if bytes > 0 {
            drv::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())?;
        }
        Ok(())
    }

    pub unsafe fn memset0(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        if bytes > 0 {
            drv::memset_d8_async(dst, 0, bytes, self.stream.cu_stream())?;
        }
        Ok(())
    }

    /// Milliseconds per run of `f` (which enqueues work on this GPU's stream), over `reps` runs
    /// after one warm-up, timed with events.
    pub fn time_ms(&self, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let a = self.stream.record_event(flags)?;
        for _ in 0..reps {
            f()?;
        }
        let b = self.stream.record_event(flags)?;
        self.sync()?;
        Ok(f64::from(a.elapsed_ms(&b)?) / reps.max(1) as f64)
    }
}
