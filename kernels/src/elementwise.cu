// Elementwise family: SwiGLU's SiLU·mul, bias + activation, bias + residual. Part of the
// translation unit r4b.cu.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Elementwise.
// SwiGLU: out[t, i] = silu(gu[t, i]) · gu[t, F + i]. grid (ceil(F/256), T), block 256.
extern "C" __global__ void silu_mul(const bf16* __restrict__ gu, bf16* __restrict__ out, int F) {
  PDL_ENTRY();
  const int i = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
  if (i >= F) return;
  const float g = b2f(gu[(size_t)t * 2 * F + i]), u = b2f(gu[(size_t)t * 2 * F + F + i]);
  const float sg = b2f(f2b(g / (1.f + __expf(-g))));
  out[(size_t)t * F + i] = f2b(sg * u);
}

// silu_mul, 8 values per thread (F % 8 == 0). grid (ceil(F / 2048), T), block 256.
extern "C" __global__ void silu_mul_v8(const bf16* __restrict__ gu, bf16* __restrict__ out, int F) {
  PDL_ENTRY();
  const int c = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
  if (c * 8 >= F) return;
  const size_t row = (size_t)t * 2 * F + (size_t)c * 8;
  const uint4 gv = *reinterpret_cast<const uint4*>(gu + row);
  const uint4 uv = *reinterpret_cast<const uint4*>(gu + row + F);
  const bf16* gb = reinterpret_cast<const bf16*>(&gv);
  const bf16* ub = reinterpret_cast<const bf16*>(&uv);
  uint4 res;
  bf16* ob = reinterpret_cast<bf16*>(&res);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float g = b2f(gb[j]);
    const float sg = b2f(f2b(g / (1.f + __expf(-g))));
    ob[j] = f2b(sg * b2f(ub[j]));
  }
  *reinterpret_cast<uint4*>(out + (size_t)t * F + (size_t)c * 8) = res;
}

// x[t, i] = act(x[t, i] + b[i]); act 0 none, 1 gelu (tanh approx), 2 gelu (erf).
// grid (ceil(D/256), T), block 256.
extern "C" __global__ void bias_act(bf16* __restrict__ x, const bf16* __restrict__ b, int D, int act) {
  PDL_ENTRY();
  const int i = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
  if (i >= D) return;
  const size_t o = (size_t)t * D + i;
  float v = b2f(f2b(b2f(x[o]) + b2f(b[i])));
  if (act == 1) {
    const float k = 0.7978845608028654f;
    v = 0.5f * v * (1.f + tanhf(k * (v + 0.044715f * v * v * v)));
  } else if (act == 2) {
    v = 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
  }
  x[o] = f2b(v);
}

// res[t, i] = bf16(res + bf16(x + b)) (bias may be null). grid (ceil(D/256), T), block 256.
extern "C" __global__ void bias_residual(bf16* __restrict__ res, const bf16* __restrict__ x,
                                         const bf16* __restrict__ b, int D) {
  PDL_ENTRY();
  const int i = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
  if (i >= D) return;
  const size_t o = (size_t)t * D + i;
  const float xb = b ? b2f(f2b(b2f(x[o]) + b2f(b[i]))) : b2f(x[o]);
  res[o] = f2b(b2f(res[o]) + xb);
}
