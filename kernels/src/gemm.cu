// GEMM family (the skinny kernels; larger products run on cuBLAS): one-row to eight-row
// products, four columns per warp, and the fused gate/up + SiLU·mul. Part of the translation unit
// r4b.cu.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Skinny GEMM (decode): Y[m, n] = Σ_k X[m, k] · W[n, k] for M ≤ 8 rows, W [N, K] bf16 row-major
// (a Linear weight), K a multiple of 8. One warp per output column n, 16-byte loads, 4 loads of W
// in flight per lane; X comes through L1 (shared by the block's 8 warps).
// grid ceil(N / 8), block 256. out_f32: Y is f32, else bf16.
template <int M>
__device__ void gemv_rows(const bf16* __restrict__ x, const bf16* __restrict__ w,
                          void* __restrict__ y, int N, int K, int out_f32) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * 8 + (threadIdx.x >> 5);
  constexpr int U = 4;
  uint4 wv[U];
  // The first weights load before the dependency wait (they do not depend on the previous
  // kernel), so they stream in while it finishes.
  const bf16* wr = w + (size_t)min(n, N - 1) * K;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int k = lane * 8 + u * 256;
    wv[u] = k < K ? __ldg(reinterpret_cast<const uint4*>(wr + k)) : make_uint4(0, 0, 0, 0);
  }
  PDL_ENTRY();
  if (n >= N) return;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  for (int k0 = lane * 8; k0 < K; k0 += 32 * 8 * U) {
    if (k0 != lane * 8) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = k0 + u * 256;
        wv[u] = k < K ? __ldg(reinterpret_cast<const uint4*>(wr + k)) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * 256;
      if (k >= K) break;
      const bf16* wb = reinterpret_cast<const bf16*>(&wv[u]);
      float wf[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) wf[j] = b2f(wb[j]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + k));
        const bf16* xb = reinterpret_cast<const bf16*>(&xv);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[m] += wf[j] * b2f(xb[j]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0) {
      if (out_f32)
        reinterpret_cast<float*>(y)[(size_t)m * N + n] = v;
      else
        reinterpret_cast<bf16*>(y)[(size_t)m * N + n] = f2b(v);
    }
  }
}
#define GEMV_KERNEL(M)                                                                          \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      gemv_m##M(const bf16* x, const bf16* w, void* y, int N, int K, int out_f32) {              \
    gemv_rows<M>(x, w, y, N, K, out_f32);                                                        \
  }
GEMV_KERNEL(1)
GEMV_KERNEL(2)
GEMV_KERNEL(3)
GEMV_KERNEL(4)
GEMV_KERNEL(5)
GEMV_KERNEL(6)
GEMV_KERNEL(7)
GEMV_KERNEL(8)

// gate_up product and SiLU·mul in one kernel at one row: y[n] = silu(x·w[n]) · (x·w[F + n]),
// with w the concatenated [2F, K] gate/up weight. Each warp computes its two dot products in
// gemv_m1's summation order and rounds them, and the product, to bf16 exactly as gemv_m1 +
// silu_mul_v8 do (same bits, one kernel less). grid ceil(F / 8), block 256.
extern "C" __global__ void __launch_bounds__(256)
    gemv_silu(const bf16* __restrict__ x, const bf16* __restrict__ w, bf16* __restrict__ y, int F,
              int K) {
  constexpr int U = 4;
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * 8 + (threadIdx.x >> 5);
  const bf16* wg = w + (size_t)min(n, F - 1) * K;
  const bf16* wu = wg + (size_t)F * K;
  uint4 gv[U], uv[U];
  auto load_w = [&](int k0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * 256;
      gv[u] = k < K ? __ldg(reinterpret_cast<const uint4*>(wg + k)) : make_uint4(0, 0, 0, 0);
      uv[u] = k < K ? __ldg(reinterpret_cast<const uint4*>(wu + k)) : make_uint4(0, 0, 0, 0);
    }
  };
  load_w(lane * 8);  // before the dependency wait, as in gemv_rows
  PDL_ENTRY();
  if (n >= F) return;
  float ag = 0.f, au = 0.f;
  for (int k0 = lane * 8; k0 < K; k0 += 32 * 8 * U) {
    if (k0 != lane * 8) load_w(k0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * 256;
      if (k >= K) break;
      const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + k));
      const bf16* xb = reinterpret_cast<const bf16*>(&xv);
      const bf16* gb = reinterpret_cast<const bf16*>(&gv[u]);
      const bf16* ub = reinterpret_cast<const bf16*>(&uv[u]);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        ag += b2f(gb[j]) * b2f(xb[j]);
        au += b2f(ub[j]) * b2f(xb[j]);
      }
    }
  }
  ag = warp_sum(ag);
  au = warp_sum(au);
  if (lane == 0) {
    const float g = b2f(f2b(ag)), up = b2f(f2b(au));
    const float sg = b2f(f2b(g / (1.f + __expf(-g))));
    y[n] = f2b(sg * up);
  }
}

// Skinny GEMM at one row, 4 output columns per warp (each x load feeds 4 weight rows; 8 loads of
// W in flight per lane). Same per-lane summation order as gemv_m1. grid ceil(N / 32), block 256.
extern "C" __global__ void __launch_bounds__(256)
    gemv_r4(const bf16* __restrict__ x, const bf16* __restrict__ w, void* __restrict__ y, int N,
            int K, int out_f32) {
  constexpr int R = 4, U = 2;
  const int lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * 8 + (threadIdx.x >> 5)) * R;
  uint4 wv[U][R];
  auto load_w = [&](int k0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * 256;
#pragma unroll
      for (int r = 0; r < R; ++r)
        wv[u][r] = k < K && n0 + r < N
                       ? __ldg(reinterpret_cast<const uint4*>(w + (size_t)(n0 + r) * K + k))
                       : make_uint4(0, 0, 0, 0);
    }
  };
  load_w(lane * 8);  // before the dependency wait, as in gemv_rows
  PDL_ENTRY();
  if (n0 >= N) return;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  for (int k0 = lane * 8; k0 < K; k0 += 32 * 8 * U) {
    if (k0 != lane * 8) load_w(k0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * 256;
      if (k >= K) break;
      float xf[8];
      const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + k));
      const bf16* xb = reinterpret_cast<const bf16*>(&xv);
#pragma unroll
      for (int j = 0; j < 8; ++j) xf[j] = b2f(xb[j]);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const bf16* wb = reinterpret_cast<const bf16*>(&wv[u][r]);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[r] += b2f(wb[j]) * xf[j];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0 && n0 + r < N) {
      if (out_f32)
        reinterpret_cast<float*>(y)[n0 + r] = v;
      else
        reinterpret_cast<bf16*>(y)[n0 + r] = f2b(v);
    }
  }
}
