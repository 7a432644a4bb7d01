use std::ffi::c_void;
use std::sync::Arc;

pub use cudarc;
use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{result as drv, CudaContext, CudaFunction, CudaStream, LaunchConfig};
use cudarc::nccl::{result as nccl_result, sys as nccl_sys};
use cudarc::nvrtc::Ptx;

use crate::{DecodeAttention, KernelArch, KernelOptions};

/// A device address.
pub type DevPtr = u64;

/// The skinny-GEMM kernel exists for up to this many rows ([`Gpu::gemv`]); [`Gpu::linear`] uses it
/// where it measured faster than cuBLAS.
pub const GEMV_MAX_ROWS: usize = 8;

/// The PTX of `src/r4b.cu` for sm_80 (A100; runs on every later device too).
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

struct Funcs {
    embed_gather: CudaFunction,
    scatter_rows: CudaFunction,
    gather_rows: CudaFunction,
    add_rmsnorm: CudaFunction,
    add_rmsnorm_v8: CudaFunction,
    layernorm: CudaFunction,
    qk_norm_rope_kv: CudaFunction,
    qk_norm_rope_kv_w: CudaFunction,
    rope_table: CudaFunction,
    /// `(head_dim, group)` → kernel.
    decode: Vec<((usize, usize), CudaFunction)>,
    decode_combine: CudaFunction,
    /// `head_dim` → tensor-core prefill attention kernel, 64 query rows per CTA.
    flash: Vec<(usize, CudaFunction)>,
    /// The same with 128 query rows per CTA (two m-tiles per warp).
    flash2: Vec<(usize, CudaFunction)>,
    /// `head_dim` → tensor-core paged decode attention kernel.
    flash_decode: Vec<(usize, CudaFunction)>,
    gather_kv: CudaFunction,
    softmax_rows: CudaFunction,
    silu_mul: CudaFunction,
    silu_mul_v8: CudaFunction,
    bias_act: CudaFunction,
    bias_residual: CudaFunction,
    im2col_patches: CudaFunction,
    add_pos_embed: CudaFunction,
    argmax_rows: CudaFunction,
    sample_partial: CudaFunction,
    sample_prepare: CudaFunction,
    sample_finish: CudaFunction,
    /// `gemv[m - 1]` computes M = m rows.
    gemv: Vec<CudaFunction>,
    gemv_r4: CudaFunction,
    gemv_silu: CudaFunction,
}

/// How [`Gpu::linear`] runs a one-row product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearImpl {
    Blas,
    /// The skinny kernel, one output column per warp.
    Gemv,
    /// The skinny kernel, four output columns per warp.
    Gemv4,
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
    pdl: std::sync::atomic::AtomicBool,
    /// Multiprocessors of the device.
    pub sm_count: usize,
    /// One-row products: the implementation measured fastest per `(n, k, f32 out)` (see
    /// [`Gpu::set_linear_impl`]); shapes not in it follow a fixed rule.
    linear_impl: std::sync::Mutex<std::collections::HashMap<(usize, usize, bool), LinearImpl>>,
    /// When set, [`Gpu::mark`] records a timing event per labelled op (eager steps only).
    timeline: std::sync::Mutex<Option<Vec<(&'static str, cudarc::driver::CudaEvent)>>>,
    blas: CudaBlas,
    f: Funcs,
    _workspace: DBuf,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .finish()
    }
}

/// What [`Gpu::add_rmsnorm`] does to the residual stream before normalising it.
#[derive(Clone, Copy, Debug)]
pub enum Residual {
    Keep,
    Add(DevPtr),
    Set(DevPtr),
}

/// Element type of a GEMM output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutType {
    Bf16,
    F32,
}

/// A column-major cuBLAS GEMM (`C = α·op(A)·op(B) + β·C`), bf16 inputs, f32 accumulation,
/// strided-batched when `batch > 1`.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: DevPtr,
    pub lda: usize,
    pub stride_a: usize,
    pub b: DevPtr,
    pub ldb: usize,
    pub stride_b: usize,
    pub c: DevPtr,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
    pub alpha: f32,
    pub beta: f32,
    pub out: OutType,
}

/// Arguments of [`Gpu::qk_norm_rope_kv`].
#[derive(Clone, Copy, Debug)]
pub struct RopeKv {
    pub qkv: DevPtr,
    pub q_norm: DevPtr,
    pub k_norm: DevPtr,
    /// i32 `[T]`.
    pub positions: DevPtr,
    /// i32 `[T]`: KV cache slot of each token.
    pub slots: DevPtr,
    pub k_cache: DevPtr,
    pub v_cache: DevPtr,
    pub tokens: usize,
    pub nq: usize,
    pub nkv: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub theta: f32,
    /// cos/sin table from [`Gpu::rope_table`] and its position count (then one warp per head).
    pub table: Option<(DevPtr, usize)>,
}

/// Arguments of [`Gpu::decode_attention`].
#[derive(Clone, Copy, Debug)]
pub struct DecodeAttn {
    /// Queries: head `h` of token `t` at `q + (t·q_stride + h·hd)·2`.
    pub q: DevPtr,
    pub q_stride: usize,
    pub k_cache: DevPtr,
    pub v_cache: DevPtr,
    /// i32 `[T]`: keys visible to each query.
    pub ctx_lens: DevPtr,
    /// i32 `[T]`: the block-table row of each query.
    pub bt_rows: DevPtr,
    /// i32 `[rows, max_blocks]`.
    pub block_tables: DevPtr,
    pub max_blocks: usize,
    pub block_size: usize,
    pub tokens: usize,
    pub nq: usize,
    pub nkv: usize,
    pub head_dim: usize,
    /// Keys per partition and the number of partitions the scratch holds per (token, head).
    pub part_size: usize,
    pub parts: usize,
    pub scale: f32,
    /// Scratch: f32 `[T, nq, parts]` ×2 and f32 `[T, nq, parts, hd]`.
    pub pm: DevPtr,
    pub pl: DevPtr,
    pub pacc: DevPtr,
    /// Output: head `h` of token `t` at `out + (t·out_stride + h·hd)·2`.
    pub out: DevPtr,
    pub out_stride: usize,
}

/// Head dims the tensor-core prefill attention is built for ([`Gpu::flash_attention`]).
pub const FLASH_HEAD_DIMS: [usize; 5] = [64, 72, 80, 96, 128];

/// Dynamic shared memory of the tensor-core attention kernels: two stages of a 64-key K tile and
/// a V tile, rows padded to a multiple of 16 plus 8 bf16.
fn flash_smem_bytes(head_dim: usize) -> usize {
    2 * 2 * 64 * (head_dim.div_ceil(16) * 16 + 8) * 2
}

/// Dynamic shared memory of the prefill attention kernel with `rows` query rows per CTA: the
/// CTA's Q rows (same pitch) before the K/V stages.
fn flash_prefill_smem_bytes(head_dim: usize, rows: usize) -> usize {
    flash_smem_bytes(head_dim) + rows * (head_dim.div_ceil(16) * 16 + 8) * 2
}

/// Arguments of [`Gpu::flash_attention`]: `rows` queries of each of `batch` independent sequences
/// (strides in elements) attend to their keys, causally or not.
#[derive(Clone, Copy, Debug)]
pub struct FlashAttn {
    /// Head `h` of query row `r` of sequence `z` at `q + (z·q_z + r·q_ld + h·hd)·2`.
    pub q: DevPtr,
    pub q_ld: usize,
    pub q_z: usize,
    /// Keys/values of kv head `g` at row `r`: `k + (z·kv_z + r·kv_ld + g·hd)·2` (same for `v`).
    pub k: DevPtr,
    pub v: DevPtr,
    pub kv_ld: usize,
    pub kv_z: usize,
    /// Paged keys: i32 block table of the sequence and the block size (key `i` is row
    /// `table[i / bs]·bs + i % bs`); `None`: row = key.
    pub block_table: Option<(DevPtr, usize)>,
    pub out: DevPtr,
    pub out_ld: usize,
    pub out_z: usize,
    pub rows: usize,
    pub batch: usize,
    /// Keys before the first query row (causal: query `i` sees keys `..= ctx_base + i`).
    pub ctx_base: usize,
    /// Keys per sequence (causal: `ctx_base + rows`).
    pub nkeys: usize,
    pub nq: usize,
    pub nkv: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
}

/// A kernel launch through `cuLaunchKernelEx`: the arguments as pointers to their values, and the
/// programmatic-dependent-launch attribute when the GPU has it on (see `PDL_WAIT` in r4b.cu).
pub struct Launch<'a> {
    gpu: &'a Gpu,
    func: &'a CudaFunction,
    args: Vec<*mut c_void>,
}

impl<'a> Launch<'a> {
    /// Appends one kernel argument (kept borrowed until the launch).
    pub fn arg<T: Copy>(mut self, v: &'a T) -> Self {
        self.args.push(v as *const T as *mut c_void);
        self
    }

    /// Enqueues the kernel on the GPU's stream.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, and every
    /// pointer among them must be valid for what the kernel does with it.
    pub unsafe fn launch(mut self, cfg: LaunchConfig) -> Result<()> {
        use cudarc::driver::sys as cu;
        self.gpu.ctx.bind_to_thread()?;
        let pdl = self.gpu.pdl.load(std::sync::atomic::Ordering::Relaxed);
        // SAFETY: plain-old-data C structs; zero is a valid starting value.
        let mut attr: cu::CUlaunchAttribute = std::mem::zeroed();
        attr.id = cu::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = cu::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.gpu.stream.cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: u32::from(pdl),
        };
        cu::cuLaunchKernelEx(
            &config,
            self.func.cu_function(),
            self.args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()?;
        Ok(())
    }
}

fn grid1(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn grid2(x: usize, y: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn i(v: usize) -> i32 {
    v as i32
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
        let l = |n: &str| module.load_function(n);
        // The tensor-core attention kernels keep two stages of K and V tiles (and the prefill
        // kernels their Q rows) in dynamic shared memory, above the 48 KB default.
        let tiled = |name: String, hd: usize, smem: usize| -> Result<(usize, CudaFunction)> {
            let f = l(&name)?;
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )?;
            Ok((hd, f))
        };
        // The prefill attention kernels of every head dim, `rows` query rows per CTA.
        let prefill = |prefix: &str, rows: usize| -> Result<Vec<(usize, CudaFunction)>> {
            FLASH_HEAD_DIMS
                .iter()
                .map(|&hd| {
                    tiled(
                        format!("{prefix}{hd}"),
                        hd,
                        flash_prefill_smem_bytes(hd, rows),
                    )
                })
                .collect()
        };
        let f = Funcs {
            embed_gather: l("embed_gather")?,
            scatter_rows: l("scatter_rows")?,
            gather_rows: l("gather_rows")?,
            add_rmsnorm: l("add_rmsnorm")?,
            add_rmsnorm_v8: l("add_rmsnorm_v8")?,
            layernorm: l("layernorm")?,
            qk_norm_rope_kv: l("qk_norm_rope_kv")?,
            qk_norm_rope_kv_w: l("qk_norm_rope_kv_w")?,
            rope_table: l("rope_table")?,
            decode: {
                let mut v = Vec::new();
                for hd in [16, 32, 64, 128] {
                    for g in [1, 2, 4, 8] {
                        v.push(((hd, g), l(&format!("decode_attn_hd{hd}_g{g}"))?));
                    }
                }
                v
            },
            decode_combine: l("decode_attn_combine")?,
            flash: prefill("flash_attn_hd", 64)?,
            flash2: prefill("flash_attn2_hd", 128)?,
            flash_decode: [64usize, 128]
                .iter()
                .map(|&hd| tiled(format!("flash_decode_hd{hd}"), hd, flash_smem_bytes(hd)))
                .collect::<Result<_>>()?,
            gather_kv: l("gather_kv")?,
            softmax_rows: l("softmax_rows")?,
            silu_mul: l("silu_mul")?,
            silu_mul_v8: l("silu_mul_v8")?,
            bias_act: l("bias_act")?,
            bias_residual: l("bias_residual")?,
            im2col_patches: l("im2col_patches")?,
            add_pos_embed: l("add_pos_embed")?,
            argmax_rows: l("argmax_rows")?,
            sample_partial: l("sample_partial")?,
            sample_prepare: l("sample_prepare")?,
            sample_finish: l("sample_finish")?,
            gemv: (1..=GEMV_MAX_ROWS)
                .map(|m| l(&format!("gemv_m{m}")))
                .collect::<Result<_, _>>()?,
            gemv_r4: l("gemv_r4")?,
            gemv_silu: l("gemv_silu")?,
        };
        let sm_count = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        let blas = CudaBlas::new(stream.clone())?;
        // A fixed cuBLAS workspace, so that GEMMs allocate nothing (required under graph capture).
        let ws_bytes = 64 << 20;
        let workspace = Self::alloc_in(&ctx, ws_bytes)?;
        // SAFETY: the handle and the workspace live as long as `Gpu`.
        unsafe {
            blas_sys::cublasSetWorkspace_v2(*blas.handle(), workspace.ptr as *mut c_void, ws_bytes)
                .result()?;
        }
        Ok(Gpu {
            ctx,
            stream,
            options: *options,
            compute_capability: (major, minor),
            ptx_arch,
            pdl: std::sync::atomic::AtomicBool::new(false),
            sm_count,
            timeline: std::sync::Mutex::new(None),
            linear_impl: std::sync::Mutex::new(std::collections::HashMap::new()),
            blas,
            f,
            _workspace: workspace,
        })
    }

    /// Turns programmatic dependent launch on or off for the following launches (a CUDA graph
    /// keeps what was set while it was captured). Measured on the H100: +1.5–2 % at 1–128
    /// decode queries, −16 % for the CUDA-core decode attention at 256 (bench/RESULTS.md).
    /// Only on the sm_90 build, and only when the options allow it.
    pub fn set_pdl(&self, on: bool) {
        let allowed = self.ptx_arch >= 90 && self.options.pdl;
        self.pdl
            .store(on && allowed, std::sync::atomic::Ordering::Relaxed);
    }

    /// Starts a launch of `func` on this GPU's stream (see [`Launch`]).
    pub fn launch_builder<'a>(&'a self, func: &'a CudaFunction) -> Launch<'a> {
        Launch {
            gpu: self,
            func,
            args: Vec::with_capacity(24),
        }
    }

    fn alloc_in(ctx: &Arc<CudaContext>, bytes: usize) -> Result<DBuf> {
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

    // ----- GEMM ----------------------------------------------------------------------------------

    /// A raw column-major GEMM (see [`Gemm`]).
    pub unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let bf = blas_sys::cudaDataType_t::CUDA_R_16BF;
        let ct = match g.out {
            OutType::Bf16 => bf,
            OutType::F32 => blas_sys::cudaDataType_t::CUDA_R_32F,
        };
        let (alpha, beta) = (g.alpha, g.beta);
        let compute = blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        if g.batch <= 1 {
            blas_result::gemm_ex(
                *self.blas.handle(),
                op(g.trans_a),
                op(g.trans_b),
                i(g.m),
                i(g.n),
                i(g.k),
                (&alpha) as *const f32 as *const c_void,
                g.a as *const c_void,
                bf,
                i(g.lda),
                g.b as *const c_void,
                bf,
                i(g.ldb),
                (&beta) as *const f32 as *const c_void,
                g.c as *mut c_void,
                ct,
                i(g.ldc),
                compute,
                algo,
            )?;
        } else {
            blas_result::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(g.trans_a),
                op(g.trans_b),
                i(g.m),
                i(g.n),
                i(g.k),
                (&alpha) as *const f32 as *const c_void,
                g.a as *const c_void,
                bf,
                i(g.lda),
                g.stride_a as i64,
                g.b as *const c_void,
                bf,
                i(g.ldb),
                g.stride_b as i64,
                (&beta) as *const f32 as *const c_void,
                g.c as *mut c_void,
                ct,
                i(g.ldc),
                g.stride_c as i64,
                i(g.batch),
                compute,
                algo,
            )?;
        }
        Ok(())
    }

    /// `Y[M, N] = X[M, K] · W[N, K]ᵀ` (row-major; W as a PyTorch Linear weight), `Y += ...` when
    /// `accumulate`. X and W are bf16, Y bf16 or f32.
    pub unsafe fn linear(
        &self,
        x: DevPtr,
        w: DevPtr,
        y: DevPtr,
        (m, n, k): (usize, usize, usize),
        out: OutType,
        accumulate: bool,
    ) -> Result<()> {
        let aligned = k % 8 == 0 && x.is_multiple_of(16) && w.is_multiple_of(16);
        if !accumulate && m == 1 && aligned {
            let chosen = self
                .linear_impl
                .lock()
                .ok()
                .and_then(|t| t.get(&(n, k, out == OutType::F32)).copied());
            // Without a measurement: the skinny kernel at K ≤ 4096 (measured faster there on
            // the H100, bench/RESULTS.md), cuBLAS above.
            let imp = chosen.unwrap_or(if k <= 4096 {
                LinearImpl::Gemv
            } else {
                LinearImpl::Blas
            });
            return self.linear_with(imp, x, w, y, (m, n, k), out);
        }
        self.linear_blas(x, w, y, (m, n, k), out, accumulate)
    }

    /// Records the implementation [`Gpu::linear`] uses for one-row `(n, k, out)` products.
    pub fn set_linear_impl(&self, (n, k): (usize, usize), out: OutType, imp: LinearImpl) {
        if let Ok(mut t) = self.linear_impl.lock() {
            t.insert((n, k, out == OutType::F32), imp);
        }
    }

    /// `Y = X · Wᵀ` through a given implementation (the skinny kernels: 16-byte aligned X and W,
    /// k a multiple of 8; `Gemv4` one row only).
    pub unsafe fn linear_with(
        &self,
        imp: LinearImpl,
        x: DevPtr,
        w: DevPtr,
        y: DevPtr,
        (m, n, k): (usize, usize, usize),
        out: OutType,
    ) -> Result<()> {
        match imp {
            LinearImpl::Blas => self.linear_blas(x, w, y, (m, n, k), out, false),
            LinearImpl::Gemv => self.gemv(x, w, y, (m, n, k), out),
            LinearImpl::Gemv4 if m == 1 => self.gemv4(x, w, y, (n, k), out),
            LinearImpl::Gemv4 => Err(GpuError::Invalid(format!("gemv4 with {m} rows"))),
        }
    }

    unsafe fn gemv4(
        &self,
        x: DevPtr,
        w: DevPtr,
        y: DevPtr,
        (n, k): (usize, usize),
        out: OutType,
    ) -> Result<()> {
        if k % 8 != 0 || !x.is_multiple_of(16) || !w.is_multiple_of(16) {
            return Err(GpuError::Invalid(format!(
                "gemv4: k = {k} must be a multiple of 8, x and w 16-byte aligned"
            )));
        }
        let (nn, kk) = (i(n), i(k));
        let of = i32::from(out == OutType::F32);
        self.launch_builder(&self.f.gemv_r4)
            .arg(&x)
            .arg(&w)
            .arg(&y)
            .arg(&nn)
            .arg(&kk)
            .arg(&of)
            .launch(grid1(n.div_ceil(32), 256))?;
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

    /// [`Gpu::linear`] always through cuBLAS.
    pub unsafe fn linear_blas(
        &self,
        x: DevPtr,
        w: DevPtr,
        y: DevPtr,
        (m, n, k): (usize, usize, usize),
        out: OutType,
        accumulate: bool,
    ) -> Result<()> {
        self.gemm(&Gemm {
            trans_a: true,
            trans_b: false,
            m: n,
            n: m,
            k,
            a: w,
            lda: k,
            stride_a: 0,
            b: x,
            ldb: k,
            stride_b: 0,
            c: y,
            ldc: n,
            stride_c: 0,
            batch: 1,
            alpha: 1.0,
            beta: if accumulate { 1.0 } else { 0.0 },
            out,
        })
    }

    /// The skinny-GEMM kernel: `Y[m, n] = X[m, k] · W[n, k]ᵀ`, 1 ≤ m ≤ 8, k a multiple of 8,
    /// 16-byte aligned X and W.
    pub unsafe fn gemv(
        &self,
        x: DevPtr,
        w: DevPtr,
        y: DevPtr,
        (m, n, k): (usize, usize, usize),
        out: OutType,
    ) -> Result<()> {
        let f = self
            .f
            .gemv
            .get(m.wrapping_sub(1))
            .ok_or_else(|| GpuError::Invalid(format!("gemv with {m} rows")))?;
        let (nn, kk) = (i(n), i(k));
        let of = i32::from(out == OutType::F32);
        self.launch_builder(f)
            .arg(&x)
            .arg(&w)
            .arg(&y)
            .arg(&nn)
            .arg(&kk)
            .arg(&of)
            .launch(grid1(n.div_ceil(8), 256))?;
        Ok(())
    }

    // ----- kernels ---------------------------------------------------------------------------------

    /// `out[t] = table[ids[t] − start]` for owned ids, else zeros (i32 ids).
    pub unsafe fn embed_gather(
        &self,
        ids: DevPtr,
        table: DevPtr,
        out: DevPtr,
        tokens: usize,
        hidden: usize,
        (start, rows): (usize, usize),
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let (h, s, r) = (i(hidden), i(start), i(rows));
        self.launch_builder(&self.f.embed_gather)
            .arg(&ids)
            .arg(&table)
            .arg(&out)
            .arg(&h)
            .arg(&s)
            .arg(&r)
            .launch(grid1(tokens, 128))?;
        Ok(())
    }

    /// `out[dst[i]] = src[i]` for `n` rows (i32 `dst`).
    pub unsafe fn scatter_rows(
        &self,
        dst: DevPtr,
        src: DevPtr,
        out: DevPtr,
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let h = i(hidden);
        self.launch_builder(&self.f.scatter_rows)
            .arg(&dst)
            .arg(&src)
            .arg(&out)
            .arg(&h)
            .launch(grid1(n, 128))?;
        Ok(())
    }

    /// `out[i] = src[idx[i]]` for `n` rows (i32 `idx`).
    pub unsafe fn gather_rows(
        &self,
        idx: DevPtr,
        src: DevPtr,
        out: DevPtr,
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let h = i(hidden);
        self.launch_builder(&self.f.gather_rows)
            .arg(&idx)
            .arg(&src)
            .arg(&out)
            .arg(&h)
            .launch(grid1(n, 128))?;
        Ok(())
    }

    /// RMSNorm over an f32 residual stream (`residual` f32 `[T, hidden]`): `Keep` normalises it,
    /// `Add(x)` adds bf16 `x` first, `Set(x)` replaces it by `x` first.
    pub unsafe fn add_rmsnorm(
        &self,
        residual: DevPtr,
        x: Residual,
        w: DevPtr,
        out: DevPtr,
        (tokens, hidden): (usize, usize),
        eps: f32,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let (mode, xp) = match x {
            Residual::Keep => (0i32, 0u64),
            Residual::Add(p) => (1, p),
            Residual::Set(p) => (2, p),
        };
        let h = i(hidden);
        // One pass with the row in registers where it fits (8 values per thread, ≤ 4 chunks
        // each), else the two-pass kernel.
        let chunks = hidden / 8;
        let aligned = [residual, xp, w, out].iter().all(|p| p % 16 == 0);
        let (f, block) = if hidden % 8 == 0 && aligned && chunks <= 4 * 1024 {
            (
                &self.f.add_rmsnorm_v8,
                (chunks.min(1024).div_ceil(32) * 32) as u32,
            )
        } else {
            (&self.f.add_rmsnorm, 256)
        };
        self.launch_builder(f)
            .arg(&residual)
            .arg(&xp)
            .arg(&w)
            .arg(&out)
            .arg(&h)
            .arg(&eps)
            .arg(&mode)
            .launch(grid1(tokens, block))?;
        Ok(())
    }

    /// LayerNorm rows of `x` into `out`.
    pub unsafe fn layernorm(
        &self,
        x: DevPtr,
        (w, b): (DevPtr, DevPtr),
        out: DevPtr,
        (tokens, hidden): (usize, usize),
        eps: f32,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let h = i(hidden);
        self.launch_builder(&self.f.layernorm)
            .arg(&x)
            .arg(&w)
            .arg(&b)
            .arg(&out)
            .arg(&h)
            .arg(&eps)
            .launch(grid1(tokens, 256))?;
        Ok(())
    }

    /// q/k RMSNorm + RoPE in place, k and v into the KV cache.
    pub unsafe fn qk_norm_rope_kv(&self, a: &RopeKv) -> Result<()> {
        if a.tokens == 0 {
            return Ok(());
        }
        let (nq, nkv, hd) = (i(a.nq), i(a.nkv), i(a.head_dim));
        // One warp per head with the cos/sin table where the head dim allows, else one block
        // per head computing the angles.
        let (table, max_pos) = a.table.unwrap_or((0, 0));
        let warp = a.table.is_some() && a.head_dim.is_multiple_of(64) && a.head_dim <= 256;
        let mp = i(max_pos);
        let (func, cfg) = if warp {
            let cfg = grid2(a.tokens, (a.nq + 2 * a.nkv).div_ceil(4), 128);
            (&self.f.qk_norm_rope_kv_w, cfg)
        } else {
            let threads = (a.head_dim / 2).div_ceil(32) * 32;
            let cfg = grid2(a.tokens, a.nq + 2 * a.nkv, threads as u32);
            (&self.f.qk_norm_rope_kv, cfg)
        };
        let l = self
            .launch_builder(func)
            .arg(&a.qkv)
            .arg(&a.q_norm)
            .arg(&a.k_norm)
            .arg(&a.positions)
            .arg(&a.slots)
            .arg(&a.k_cache)
            .arg(&a.v_cache)
            .arg(&nq)
            .arg(&nkv)
            .arg(&hd)
            .arg(&a.eps);
        if warp {
            l.arg(&table).arg(&mp).launch(cfg)
        } else {
            l.arg(&a.theta).launch(cfg)
        }
    }

    /// Fills `out` (f32 `[2, max_pos, head_dim / 2]`: cos, then sin) with the rotary angles
    /// `pos · theta^(−2i/hd)` for [`RopeKv::table`].
    pub unsafe fn rope_table(
        &self,
        out: DevPtr,
        max_pos: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        if max_pos == 0 || !(2..=2048).contains(&head_dim) {
            return Err(GpuError::Invalid(format!(
                "rope table of {max_pos} positions, head dim {head_dim}"
            )));
        }
        let (mp, hd) = (i(max_pos), i(head_dim));
        self.launch_builder(&self.f.rope_table)
            .arg(&out)
            .arg(&mp)
            .arg(&hd)
            .arg(&theta)
            .launch(grid1(max_pos, (head_dim / 2).div_ceil(32) as u32 * 32))?;
        Ok(())
    }

    /// Paged attention of single queries over their cached keys (split over the context, then
    /// merged).
    pub unsafe fn decode_attention(&self, a: &DecodeAttn) -> Result<()> {
        if a.tokens == 0 {
            return Ok(());
        }
        let group = if a.nkv > 0 && a.nq.is_multiple_of(a.nkv) {
            a.nq / a.nkv
        } else {
            0
        };
        let func = self
            .f
            .decode
            .iter()
            .find(|(k, _)| *k == (a.head_dim, group))
            .map(|(_, f)| f)
            .ok_or_else(|| {
                GpuError::Invalid(format!(
                    "decode attention: head_dim {} with {} q heads over {} kv heads \
                     (head_dim 16/32/64/128, group 1/2/4/8)",
                    a.head_dim, a.nq, a.nkv
                ))
            })?;
        let (qs, mb, bs, nq, nkv) = (
            i(a.q_stride),
            i(a.max_blocks),
            i(a.block_size),
            i(a.nq),
            i(a.nkv),
        );
        let (ps, parts, hd, os) = (i(a.part_size), i(a.parts), i(a.head_dim), i(a.out_stride));
        let tensor_core = self
            .f
            .flash_decode
            .iter()
            .find(|(d, _)| *d == a.head_dim)
            .map(|(_, f)| f)
            // Measured (r4b-gpu-check attn, H200): the tensor-core kernel is 1.1–1.8× faster
            // from 1 to 256 queries.
            .filter(|_| {
                self.options.decode_attention == DecodeAttention::TensorCore
                    && (1..=8).contains(&group)
            });
        let (func, smem, scale) = match tensor_core {
            Some(f) => (
                f,
                flash_smem_bytes(a.head_dim) as u32,
                a.scale * std::f32::consts::LOG2_E,
            ),
            None => (func, 0, a.scale),
        };
        let cfg = LaunchConfig {
            grid_dim: (a.parts as u32, a.nkv as u32, a.tokens as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem,
        };
        self.launch_builder(func)
            .arg(&a.q)
            .arg(&qs)
            .arg(&a.k_cache)
            .arg(&a.v_cache)
            .arg(&a.ctx_lens)
            .arg(&a.bt_rows)
            .arg(&a.block_tables)
            .arg(&mb)
            .arg(&bs)
            .arg(&nq)
            .arg(&nkv)
            .arg(&ps)
            .arg(&parts)
            .arg(&scale)
            .arg(&a.pm)
            .arg(&a.pl)
            .arg(&a.pacc)
            .launch(cfg)?;
        self.launch_builder(&self.f.decode_combine)
            .arg(&a.pm)
            .arg(&a.pl)
            .arg(&a.pacc)
            .arg(&a.ctx_lens)
            .arg(&a.out)
            .arg(&os)
            .arg(&nq)
            .arg(&hd)
            .arg(&ps)
            .arg(&parts)
            .launch(grid2(a.tokens, a.nq, a.head_dim as u32))?;
        Ok(())
    }

    /// Whether [`Gpu::flash_attention`] exists for this head dim.
    pub fn has_flash(&self, head_dim: usize) -> bool {
        self.f.flash.iter().any(|(hd, _)| *hd == head_dim)
    }

    /// Prefill attention on tensor cores (see [`FlashAttn`]).
    pub unsafe fn flash_attention(&self, a: &FlashAttn) -> Result<()> {
        if a.rows == 0 || a.batch == 0 {
            return Ok(());
        }
        // 128 rows per CTA read each K/V fragment once for two m-tiles; 64 keep more CTAs for
        // short prefills (measured, H200: 128 wins once there is a CTA per multiprocessor).
        let rows_per_cta = self
            .options
            .prefill_rows
            .filter(|r| [64, 128].contains(r))
            .unwrap_or(if a.rows.div_ceil(128) * a.nq * a.batch >= self.sm_count {
                128
            } else {
                64
            });
        let func = if rows_per_cta == 128 {
            &self.f.flash2
        } else {
            &self.f.flash
        }
        .iter()
        .find(|(hd, _)| *hd == a.head_dim)
        .map(|(_, f)| f)
        .ok_or_else(|| {
            GpuError::Invalid(format!(
                "flash attention: head_dim {} (built for {FLASH_HEAD_DIMS:?})",
                a.head_dim
            ))
        })?;
        if a.nkv == 0 || !a.nq.is_multiple_of(a.nkv) || a.nkeys == 0 {
            return Err(GpuError::Invalid(format!(
                "flash attention: {} q heads over {} kv heads, {} keys",
                a.nq, a.nkv, a.nkeys
            )));
        }
        let ll = |v: usize| v as i64;
        let (bt, bs) = a.block_table.unwrap_or((0, 1));
        let (q_ld, kv_ld, out_ld, bs) = (i(a.q_ld), i(a.kv_ld), i(a.out_ld), i(bs));
        let (q_z, kv_z, out_z) = (ll(a.q_z), ll(a.kv_z), ll(a.out_z));
        let (rows, base, nkeys, group) = (i(a.rows), i(a.ctx_base), i(a.nkeys), i(a.nq / a.nkv));
        let causal = i32::from(a.causal);
        let scale_log2 = a.scale * std::f32::consts::LOG2_E;
        let cfg = LaunchConfig {
            grid_dim: (
                a.rows.div_ceil(rows_per_cta) as u32,
                a.nq as u32,
                a.batch as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: flash_prefill_smem_bytes(a.head_dim, rows_per_cta) as u32,
        };
        self.launch_builder(func)
            .arg(&a.q)
            .arg(&q_ld)
            .arg(&q_z)
            .arg(&a.k)
            .arg(&a.v)
            .arg(&kv_ld)
            .arg(&kv_z)
            .arg(&bt)
            .arg(&bs)
            .arg(&a.out)
            .arg(&out_ld)
            .arg(&out_z)
            .arg(&rows)
            .arg(&base)
            .arg(&nkeys)
            .arg(&group)
            .arg(&causal)
            .arg(&scale_log2)
            .launch(cfg)?;
        Ok(())
    }

    /// Copies positions `0..ctx` of one sequence out of the paged cache into `[ctx, width]`.
    pub unsafe fn gather_kv(
        &self,
        (k_cache, v_cache): (DevPtr, DevPtr),
        block_table: DevPtr,
        (block_size, width, ctx): (usize, usize, usize),
        (k_out, v_out): (DevPtr, DevPtr),
    ) -> Result<()> {
        if ctx == 0 {
            return Ok(());
        }
        let (bs, w) = (i(block_size), i(width));
        self.launch_builder(&self.f.gather_kv)
            .arg(&k_cache)
            .arg(&v_cache)
            .arg(&block_table)
            .arg(&bs)
            .arg(&w)
            .arg(&k_out)
            .arg(&v_out)
            .launch(grid1(ctx, 128))?;
        Ok(())
    }

    /// Row softmax of bf16 scores `[rows, ctx]`, in place; causal when `causal_base` is set
    /// (row `r` sees keys `..= causal_base + r % rows_per_head`).
    pub unsafe fn softmax_rows(
        &self,
        s: DevPtr,
        (rows, ctx): (usize, usize),
        rows_per_head: usize,
        causal_base: Option<usize>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let (c, rph) = (i(ctx), i(rows_per_head.max(1)));
        let cb = causal_base.map(i).unwrap_or(-1);
        self.launch_builder(&self.f.softmax_rows)
            .arg(&s)
            .arg(&c)
            .arg(&rph)
            .arg(&cb)
            .launch(grid1(rows, 256))?;
        Ok(())
    }

    /// `out[t, i] = silu(gu[t, i]) · gu[t, F + i]`.
    pub unsafe fn silu_mul(&self, gu: DevPtr, out: DevPtr, tokens: usize, f: usize) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let ff = i(f);
        // 8 values per thread where the rows allow 16-byte accesses.
        let (func, grid) = if f.is_multiple_of(8) && gu.is_multiple_of(16) && out.is_multiple_of(16)
        {
            (&self.f.silu_mul_v8, f.div_ceil(8 * 256))
        } else {
            (&self.f.silu_mul, f.div_ceil(256))
        };
        self.launch_builder(func)
            .arg(&gu)
            .arg(&out)
            .arg(&ff)
            .launch(grid2(grid, tokens, 256))?;
        Ok(())
    }

    /// The MLP's first half: `act[t] = silu(x[t]·w[n]) · (x[t]·w[f + n])` for the concatenated
    /// `[2f, k]` gate/up weight. One row (skinny kernels on, aligned): one fused kernel, the same
    /// bits as the two-kernel path; otherwise [`Gpu::linear`] into `gu` (bf16 `[t, 2f]`), then
    /// [`Gpu::silu_mul`]. Returns whether it fused.
    pub unsafe fn gate_up_silu(
        &self,
        x: DevPtr,
        w: DevPtr,
        (gu, act): (DevPtr, DevPtr),
        (tokens, f, k): (usize, usize, usize),
    ) -> Result<bool> {
        let aligned = k % 8 == 0 && x.is_multiple_of(16) && w.is_multiple_of(16);
        if tokens == 1 && aligned {
            let (ff, kk) = (i(f), i(k));
            self.launch_builder(&self.f.gemv_silu)
                .arg(&x)
                .arg(&w)
                .arg(&act)
                .arg(&ff)
                .arg(&kk)
                .launch(grid1(f.div_ceil(8), 256))?;
            return Ok(true);
        }
        self.linear(x, w, gu, (tokens, 2 * f, k), OutType::Bf16, false)?;
        self.silu_mul(gu, act, tokens, f)?;
        Ok(false)
    }

    /// `x = act(x + b)`; act 0 none, 1 gelu-tanh, 2 gelu-erf.
    pub unsafe fn bias_act(
        &self,
        x: DevPtr,
        b: DevPtr,
        (tokens, d): (usize, usize),
        act: i32,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let dd = i(d);
        self.launch_builder(&self.f.bias_act)
            .arg(&x)
            .arg(&b)
            .arg(&dd)
            .arg(&act)
            .launch(grid2(d.div_ceil(256), tokens, 256))?;
        Ok(())
    }

    /// `res += x + b` (b may be 0 = no bias).
    pub unsafe fn bias_residual(
        &self,
        res: DevPtr,
        x: DevPtr,
        b: DevPtr,
        (tokens, d): (usize, usize),
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let dd = i(d);
        self.launch_builder(&self.f.bias_residual)
            .arg(&res)
            .arg(&x)
            .arg(&b)
            .arg(&dd)
            .launch(grid2(d.div_ceil(256), tokens, 256))?;
        Ok(())
    }

    /// f32 pixels `[V, 3, S, S]` → bf16 patch rows `[V·(S/P)², 3·P·P]`.
    pub unsafe fn im2col_patches(
        &self,
        px: DevPtr,
        out: DevPtr,
        views: usize,
        (s, p): (usize, usize),
    ) -> Result<()> {
        let n = s / p;
        if views == 0 || n == 0 {
            return Ok(());
        }
        let (ss, pp) = (i(s), i(p));
        self.launch_builder(&self.f.im2col_patches)
            .arg(&px)
            .arg(&out)
            .arg(&ss)
            .arg(&pp)
            .launch(grid1(views * n * n, 256))?;
        Ok(())
    }

    /// `x[r] = x[r] + b + pos[r % n]`.
    pub unsafe fn add_pos_embed(
        &self,
        x: DevPtr,
        (b, pos): (DevPtr, DevPtr),
        (rows, d, n): (usize, usize, usize),
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let (dd, nn) = (i(d), i(n));
        self.launch_builder(&self.f.add_pos_embed)
            .arg(&x)
            .arg(&b)
            .arg(&pos)
            .arg(&dd)
            .arg(&nn)
            .launch(grid2(d.div_ceil(256), rows, 256))?;
        Ok(())
    }

    /// Row max and its lowest index of f32 `[B, V]` into f32 `val[B]`, i32 `idx[B]`.
    pub unsafe fn argmax_rows(
        &self,
        logits: DevPtr,
        (rows, v): (usize, usize),
        val: DevPtr,
        idx: DevPtr,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let vv = i(v);
        self.launch_builder(&self.f.argmax_rows)
            .arg(&logits)
            .arg(&vv)
            .arg(&val)
            .arg(&idx)
            .launch(grid1(rows, 1024))?;
        Ok(())
    }

    /// Sampling, rank-local half, stage 1: for each row of `rows` ([`SampleRowArgs`] words on the
    /// device) and each of `parts` equal parts of its logits row (f32 `[_, width]`, modified in
    /// place), penalties and temperature, normalisers, the part's top candidates and raw top
    /// tokens into `scratch` ([`SAMPLE_PART_WORDS`] u32 words per row and part). `pen`: u32
    /// (local index, output count) pairs sorted by index per row; `pen_raw`: one f32 per pair.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sample_partial(
        &self,
        logits: DevPtr,
        (rows, width, parts): (usize, usize, usize),
        args: DevPtr,
        pen: DevPtr,
        pen_raw: DevPtr,
        scratch: DevPtr,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        if parts == 0 || parts > width {
            return Err(GpuError::Invalid(format!(
                "sampling: {parts} parts of a {width}-wide row"
            )));
        }
        let w = i(width);
        self.launch_builder(&self.f.sample_partial)
            .arg(&logits)
            .arg(&w)
            .arg(&args)
            .arg(&pen)
            .arg(&pen_raw)
            .arg(&scratch)
            .launch(grid2(rows, parts, 1024))?;
        Ok(())
    }

    /// Sampling, rank-local half, stage 2: merges each row's parts from `scratch` into `packed`
    /// (`nf` f32 words, then the u32 words; offsets per row), global ids `start ..`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sample_prepare(
        &self,
        scratch: DevPtr,
        (rows, width, parts): (usize, usize, usize),
        start: usize,
        args: DevPtr,
        packed: DevPtr,
        nf: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let (w, pa, st, nf) = (i(width), i(parts), i(start), i(nf));
        self.launch_builder(&self.f.sample_prepare)
            .arg(&scratch)
            .arg(&w)
            .arg(&pa)
            .arg(&st)
            .arg(&args)
            .arg(&packed)
            .arg(&nf)
            .launch(grid1(rows, 1024))?;
        Ok(())
    }

    /// Sampling, merge half: `gathered` holds `world` ranks' packed words (`rank_words` each, the
    /// first `nf` of them f32); per row, merges the candidates, applies the filters, draws and
    /// writes [`SAMPLE_OUT_WORDS`] u32 words into `out` (see [`SampleOut`]).
    pub unsafe fn sample_finish(
        &self,
        gathered: DevPtr,
        (world, rank_words, nf): (usize, usize, usize),
        args: DevPtr,
        rows: usize,
        out: DevPtr,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        if world > SAMPLE_MAX_WORLD {
            return Err(GpuError::Invalid(format!(
                "sample_finish merges at most {SAMPLE_MAX_WORLD} ranks, got {world}"
            )));
        }
        let (wd, rw, nf) = (i(world), i(rank_words), i(nf));
        self.launch_builder(&self.f.sample_finish)
            .arg(&gathered)
            .arg(&wd)
            .arg(&rw)
            .arg(&nf)
            .arg(&args)
            .arg(&out)
            .launch(grid1(rows, 1024))?;
        Ok(())
    }
}

/// u32 words per row of the sampling kernels' arguments (`SR_WORDS` in r4b.cu).
pub const SAMPLE_ROW_WORDS: usize = 24;
/// u32 words per row of `sample_finish`'s output (`SO_WORDS`).
pub const SAMPLE_OUT_WORDS: usize = 44;
/// Most `top_logprobs` entries `sample_finish` returns (`SO_TOP`).
pub const SAMPLE_OUT_TOP: usize = 20;
/// Most candidates per row (`SAMPLE_MAX_K`).
pub const SAMPLE_MAX_K: usize = 1024;
/// u32 words of scratch per row and part of `sample_partial` (`SP_WORDS`).
pub const SAMPLE_PART_WORDS: usize = 8 + 3 * SAMPLE_MAX_K + 2 * SAMPLE_OUT_TOP;
/// Most ranks `sample_finish` merges.
pub const SAMPLE_MAX_WORLD: usize = 8;

/// One row's arguments of the sampling kernels (layout `SR_*` in r4b.cu).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SampleRowArgs {
    /// Row of the logits buffer.
    pub logits_row: u32,
    pub greedy: bool,
    pub logprobs: bool,
    /// Temperature (1 for greedy rows).
    pub temperature: f32,
    /// Candidates each rank sends (≤ [`SAMPLE_MAX_K`], ≤ the slice width).
    pub k_local: u32,
    /// Raw top tokens each rank sends.
    pub n_local: u32,
    /// This row's penalty entries `[begin, end)`.
    pub pen: (u32, u32),
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// First word of this row in the packed f32 and u32 sections.
    pub f_off: u32,
    pub u_off: u32,
    /// Candidates kept after the merge (K).
    pub keep: u32,
    /// `top_logprobs` (≤ [`SAMPLE_OUT_TOP`]).
    pub n_keep: u32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub seed: u64,
    /// Tokens generated so far (the draw's counter).
    pub counter: u64,
}

impl SampleRowArgs {
    /// The kernel's words.
    pub fn words(&self) -> [u32; SAMPLE_ROW_WORDS] {
        let mut w = [0u32; SAMPLE_ROW_WORDS];
        w[0] = self.logits_row;
        w[1] = u32::from(self.greedy) | (u32::from(self.logprobs) << 1);
        w[2] = self.temperature.to_bits();
        w[3] = self.k_local;
        w[4] = self.n_local;
        w[5] = self.pen.0;
        w[6] = self.pen.1;
        w[7] = self.repetition_penalty.to_bits();
        w[8] = self.frequency_penalty.to_bits();
        w[9] = self.presence_penalty.to_bits();
        w[10] = self.f_off;
        w[11] = self.u_off;
        w[12] = self.keep;
        w[13] = self.n_keep;
        w[14] = self.top_k;
        w[15] = self.top_p.to_bits();
        w[16] = self.min_p.to_bits();
        w[17] = self.seed as u32;
        w[18] = (self.seed >> 32) as u32;
        w[19] = self.counter as u32;
        w[20] = (self.counter >> 32) as u32;
        w
    }
}

/// One row of `sample_finish`'s output.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOut {
    pub id: u32,
    /// Raw log-probability (0 without logprobs).
    pub logprob: f32,
    /// `(id, raw log-probability)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

impl SampleOut {
    /// Decodes one row's words (`SAMPLE_OUT_WORDS`).
    pub fn from_words(w: &[u32]) -> Result<SampleOut> {
        if w.len() < SAMPLE_OUT_WORDS {
            return Err(GpuError::Invalid(format!(
                "sample output row has {} words, want {SAMPLE_OUT_WORDS}",
                w.len()
            )));
        }
        let n = (w[2] as usize).min(SAMPLE_OUT_TOP);
        Ok(SampleOut {
            id: w[0],
            logprob: f32::from_bits(w[1]),
            top: (0..n)
                .map(|t| (w[3 + 2 * t], f32::from_bits(w[4 + 2 * t])))
                .collect(),
        })
    }
}

// ----- NCCL ----------------------------------------------------------------------------------------

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
