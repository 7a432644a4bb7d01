//! GEMM family: cuBLAS products ([`Gemm`], [`Gpu::gemm`]), the one-row products [`Gpu::linear`]
//! routes per shape, and the skinny kernels of `gemm.cu` (`gemv_m1..8`, `gemv_r4`, `gemv_silu`).
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

use crate::launch::{grid1, i, KernelArg};
use crate::{DBuf, DevPtr, Gpu, GpuError, Result};

/// The skinny-GEMM kernel exists for up to this many rows ([`Gpu::gemv`]); [`Gpu::linear`] uses it
/// where it measured faster than cuBLAS.
pub const GEMV_MAX_ROWS: usize = 8;

/// How [`Gpu::linear`] runs a one-row product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearImpl {
    Blas,
    /// The skinny kernel, one output column per warp.
    Gemv,
    /// The skinny kernel, four output columns per warp.
    Gemv4,
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

/// The skinny kernels, cuBLAS with its fixed workspace, and the per-shape choice of
/// [`Gpu::linear`].
pub(crate) struct Kernels {
    /// `gemv[m - 1]` computes M = m rows.
    gemv: Vec<CudaFunction>,
    gemv_r4: CudaFunction,
    gemv_silu: CudaFunction,
    blas: CudaBlas,
    /// One-row products: the implementation measured fastest per `(n, k, f32 out)` (see
    /// [`Gpu::set_linear_impl`]); shapes not in it follow a fixed rule.
    linear_impl: Mutex<HashMap<(usize, usize, bool), LinearImpl>>,
    _workspace: DBuf,
}

impl Kernels {
    pub(crate) fn load(
        m: &Arc<CudaModule>,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
    ) -> Result<Self> {
        let gemv = (1..=GEMV_MAX_ROWS)
            .map(|rows| m.load_function(&format!("gemv_m{rows}")))
            .collect::<Result<_, _>>()?;
        let blas = CudaBlas::new(stream.clone())?;
        // A fixed cuBLAS workspace, so that GEMMs allocate nothing (required under graph capture).
        let ws_bytes = 64 << 20;
        let workspace = Gpu::alloc_in(ctx, ws_bytes)?;
        // SAFETY: the handle and the workspace live as long as `Gpu`.
        unsafe {
            blas_sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace.ptr() as *mut c_void,
                ws_bytes,
            )
            .result()?;
        }
        Ok(Kernels {
            gemv,
            gemv_r4: m.load_function("gemv_r4")?,
            gemv_silu: m.load_function("gemv_silu")?,
            blas,
            linear_impl: Mutex::new(HashMap::new()),
            _workspace: workspace,
        })
    }
}

impl Gpu {
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
                *self.kernels.gemm.blas.handle(),
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
                *self.kernels.gemm.blas.handle(),
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
        if !accumulate && m == 1 && skinny_aligned(x, w, k) {
            let chosen = (self.kernels.gemm.linear_impl)
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
        if let Ok(mut t) = self.kernels.gemm.linear_impl.lock() {
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
            LinearImpl::Gemv4 if m == 1 => self.gemv4((x, w, y), (n, k), out),
            LinearImpl::Gemv4 => Err(GpuError::Invalid(format!("gemv4 with {m} rows"))),
        }
    }

    unsafe fn gemv4(
        &self,
        (x, w, y): (DevPtr, DevPtr, DevPtr),
        (n, k): (usize, usize),
        out: OutType,
    ) -> Result<()> {
        if !skinny_aligned(x, w, k) {
            return Err(GpuError::Invalid(format!(
                "gemv4: k = {k} must be a multiple of 8, x and w 16-byte aligned"
            )));
        }
        self.skinny(&self.kernels.gemm.gemv_r4, (x, w, y), (n, k), out, 32)
    }

    /// One skinny-GEMM launch: `func` over `n` output columns of `k`-long dot products, `cols`
    /// columns per CTA.
    unsafe fn skinny(
        &self,
        func: &CudaFunction,
        (x, w, y): (DevPtr, DevPtr, DevPtr),
        (n, k): (usize, usize),
        out: OutType,
        cols: usize,
    ) -> Result<()> {
        let of = i32::from(out == OutType::F32);
        let args: [&dyn KernelArg; 6] = [&x, &w, &y, &i(n), &i(k), &of];
        self.launch(func, grid1(n.div_ceil(cols), 256), &args)
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
        let f = (self.kernels.gemm.gemv)
            .get(m.wrapping_sub(1))
            .ok_or_else(|| GpuError::Invalid(format!("gemv with {m} rows")))?;
        self.skinny(f, (x, w, y), (n, k), out, 8)
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
        if tokens == 1 && skinny_aligned(x, w, k) {
            let args: [&dyn KernelArg; 5] = [&x, &w, &act, &i(f), &i(k)];
            let func = &self.kernels.gemm.gemv_silu;
            self.launch(func, grid1(f.div_ceil(8), 256), &args)?;
            return Ok(true);
        }
        self.linear(x, w, gu, (tokens, 2 * f, k), OutType::Bf16, false)?;
        self.silu_mul(gu, act, tokens, f)?;
        Ok(false)
    }
}

/// Whether the skinny kernels can run on `x` and `w` (16-byte aligned, `k` a multiple of 8).
fn skinny_aligned(x: DevPtr, w: DevPtr, k: usize) -> bool {
    k.is_multiple_of(8) && x.is_multiple_of(16) && w.is_multiple_of(16)
}
