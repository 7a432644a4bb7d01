// Helpers every kernel family uses: bf16 conversions, the programmatic-dependent-launch macros
// and warp/block reductions. Included by each family's .cu (and through them by r4b.cu, the one
// translation unit build.rs compiles).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float b2f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 f2b(float x) { return __float2bfloat16(x); }

// Programmatic dependent launch (sm_90): a kernel launched with the PDL attribute may start
// before the previous kernel on the stream has finished; PDL_WAIT blocks until that kernel has
// completed and its writes are visible (a no-op without the attribute). Every kernel here waits
// before touching memory another kernel writes, then lets the next kernel start its prologue
// (PDL_LAUNCH): only the weight prefetch of the skinny GEMMs runs before the wait.
// On sm_80 there is no PDL: the macros are empty (the host never sets the attribute there).
#if __CUDA_ARCH__ >= 900
#define PDL_WAIT() asm volatile("griddepcontrol.wait;\n" ::: "memory")
#define PDL_LAUNCH() asm volatile("griddepcontrol.launch_dependents;\n" :::)
#else
#define PDL_WAIT() \
  do {             \
  } while (0)
#define PDL_LAUNCH() \
  do {               \
  } while (0)
#endif
#define PDL_ENTRY() \
  do {              \
    PDL_WAIT();     \
    PDL_LAUNCH();   \
  } while (0)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `red` holds 32 floats.
__device__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.f;
  return warp_sum(t);
}
__device__ float block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : -INFINITY;
  return warp_max(t);
}
