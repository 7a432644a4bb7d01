// r4b-serve CUDA kernels, compiled for sm_80 (A100) and sm_90 (H100/H200); sm_90-only
// instructions stay behind `__CUDA_ARCH__ >= 900`. bf16 activations, f32 arithmetic.
// Every kernel is `extern "C"` so the Rust side finds it by name in the PTX module.
// Layout conventions (row-major):
//   activations  [T, D]                          one row per token of the step
//   qkv          [T, (nq + 2·nkv)·hd]            q heads, then k heads, then v heads
//   KV cache     [num_blocks·block_size, nkv, hd] per layer, separate K and V; slot = block·bs + pos % bs
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

// ---------------------------------------------------------------------------------------------
// Embedding (vocab-parallel): out[t] = table[ids[t] − start] when start ≤ id < start + rows, else 0.
// grid T, block 128.
extern "C" __global__ void embed_gather(const int* __restrict__ ids, const bf16* __restrict__ table,
                                        bf16* __restrict__ out, int hidden, int start, int rows) {
  PDL_ENTRY();
  const int t = blockIdx.x;
  const int id = ids[t] - start;
  const bool own = id >= 0 && id < rows;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    out[(size_t)t * hidden + i] = own ? table[(size_t)id * hidden + i] : f2b(0.f);
}

// out[dst[i]] = src[i] (image rows into their `<image>` positions). grid n, block 128.
extern "C" __global__ void scatter_rows(const int* __restrict__ dst, const bf16* __restrict__ src,
                                        bf16* __restrict__ out, int hidden) {
  PDL_ENTRY();
  const int i = blockIdx.x;
  const size_t d = (size_t)dst[i] * hidden, s = (size_t)i * hidden;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) out[d + c] = src[s + c];
}

// out[i] = rows[idx[i]] (pick rows, e.g. the last token of each sequence). grid n, block 128.
extern "C" __global__ void gather_rows(const int* __restrict__ idx, const bf16* __restrict__ src,
                                       bf16* __restrict__ out, int hidden) {
  PDL_ENTRY();
  const int i = blockIdx.x;
  const size_t s = (size_t)idx[i] * hidden, d = (size_t)i * hidden;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) out[d + c] = src[s + c];
}

// ---------------------------------------------------------------------------------------------
// Residual add + RMSNorm (Qwen3), with the residual stream kept in f32:
//   mode 0: r = residual;  mode 1: r = residual + x;  mode 2: r = x (the embeddings).
//   residual = r (modes 1, 2); out = w · bf16(r · rsqrt(mean r² + eps)).
// grid T, block 256.
extern "C" __global__ void add_rmsnorm(float* __restrict__ residual, const bf16* __restrict__ x,
                                       const bf16* __restrict__ w, bf16* __restrict__ out,
                                       int hidden, float eps, int mode) {
  PDL_ENTRY();
  __shared__ float red[32];
  const size_t row = (size_t)blockIdx.x * hidden;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float r = mode == 2 ? b2f(x[row + i]) : residual[row + i];
    if (mode == 1) r += b2f(x[row + i]);
    if (mode != 0) residual[row + i] = r;
    ss += r * r;
  }
  const float inv = rsqrtf(block_sum(ss, red) / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float r = residual[row + i];
    out[row + i] = f2b(b2f(w[i]) * b2f(f2b(r * inv)));
  }
}

// The same, one pass over memory: each thread keeps up to 4 chunks of 8 values in registers
// (hidden % 8 == 0, hidden ≤ 32 · blockDim). grid T, block ceil(hidden / 8) rounded to a warp
// (≤ 1024).
extern "C" __global__ void add_rmsnorm_v8(float* __restrict__ residual, const bf16* __restrict__ x,
                                          const bf16* __restrict__ w, bf16* __restrict__ out,
                                          int hidden, float eps, int mode) {
  PDL_ENTRY();
  __shared__ float red[32];
  const size_t row = (size_t)blockIdx.x * hidden;
  const int chunks = hidden / 8;
  float r[4][8];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c >= chunks) break;
    const size_t o = row + (size_t)c * 8;
    float xv[8];
    if (mode != 0) {
      const uint4 xr = *reinterpret_cast<const uint4*>(x + o);
      const bf16* xb = reinterpret_cast<const bf16*>(&xr);
#pragma unroll
      for (int j = 0; j < 8; ++j) xv[j] = b2f(xb[j]);
    }
    if (mode == 2) {
#pragma unroll
      for (int j = 0; j < 8; ++j) r[i][j] = xv[j];
    } else {
      const float4 a = *reinterpret_cast<const float4*>(residual + o);
      const float4 b = *reinterpret_cast<const float4*>(residual + o + 4);
      r[i][0] = a.x, r[i][1] = a.y, r[i][2] = a.z, r[i][3] = a.w;
      r[i][4] = b.x, r[i][5] = b.y, r[i][6] = b.z, r[i][7] = b.w;
      if (mode == 1) {
#pragma unroll
        for (int j = 0; j < 8; ++j) r[i][j] += xv[j];
      }
    }
    if (mode != 0) {
      *reinterpret_cast<float4*>(residual + o) = make_float4(r[i][0], r[i][1], r[i][2], r[i][3]);
      *reinterpret_cast<float4*>(residual + o + 4) =
          make_float4(r[i][4], r[i][5], r[i][6], r[i][7]);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) ss += r[i][j] * r[i][j];
  }
  const float inv = rsqrtf(block_sum(ss, red) / hidden + eps);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c >= chunks) break;
    const size_t o = row + (size_t)c * 8;
    const uint4 wr = *reinterpret_cast<const uint4*>(w + (size_t)c * 8);
    const bf16* wb = reinterpret_cast<const bf16*>(&wr);
    uint4 res;
    bf16* ob = reinterpret_cast<bf16*>(&res);
#pragma unroll
    for (int j = 0; j < 8; ++j) ob[j] = f2b(b2f(wb[j]) * b2f(f2b(r[i][j] * inv)));
    *reinterpret_cast<uint4*>(out + o) = res;
  }
}

// LayerNorm (SigLIP, projector): out = (x − μ)/σ · w + b. grid T, block 256.
extern "C" __global__ void layernorm(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                     const bf16* __restrict__ b, bf16* __restrict__ out, int hidden,
                                     float eps) {
  PDL_ENTRY();
  __shared__ float red[32];
  const size_t row = (size_t)blockIdx.x * hidden;
  float s = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) s += b2f(x[row + i]);
  const float mean = block_sum(s, red) / hidden;
  float v = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float d = b2f(x[row + i]) - mean;
    v += d * d;
  }
  const float inv = rsqrtf(block_sum(v, red) / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    out[row + i] = f2b((b2f(x[row + i]) - mean) * inv * b2f(w[i]) + b2f(b[i]));
}

// ---------------------------------------------------------------------------------------------
// Qwen3 attention prologue, per (token, head):
//   q heads: RMSNorm(q_norm) then RoPE, in place;
//   k heads: RMSNorm(k_norm) then RoPE, written to the K cache at slot[t];
//   v heads: copied to the V cache at slot[t].
// RoPE is NeoX style (rotate_half), angle = pos · theta^(−2i/hd), in f32.
// grid (T, nq + 2·nkv), block hd/2 (pairs i, i + hd/2).
extern "C" __global__ void qk_norm_rope_kv(bf16* __restrict__ qkv, const bf16* __restrict__ qn_w,
                                           const bf16* __restrict__ kn_w,
                                           const int* __restrict__ positions,
                                           const int* __restrict__ slots, bf16* __restrict__ k_cache,
                                           bf16* __restrict__ v_cache, int nq, int nkv, int hd,
                                           float eps, float theta) {
  PDL_ENTRY();
  __shared__ float red[32];
  // blockDim.x = hd/2 rounded up to whole warps; threads past hd/2 only join the reduction.
  const int t = blockIdx.x, h = blockIdx.y, half = hd / 2;
  const bool active = (int)threadIdx.x < half;
  const int i = active ? threadIdx.x : 0;
  const int stride = (nq + 2 * nkv) * hd;
  bf16* row = qkv + (size_t)t * stride + (size_t)h * hd;
  const size_t cache_off = ((size_t)slots[t] * nkv) * hd;
  if (h >= nq + nkv) {  // v head
    if (!active) return;
    const int kvh = h - nq - nkv;
    v_cache[cache_off + (size_t)kvh * hd + i] = row[i];
    v_cache[cache_off + (size_t)kvh * hd + i + half] = row[i + half];
    return;
  }
  const bf16* w = h < nq ? qn_w : kn_w;
  float x1 = b2f(row[i]), x2 = b2f(row[i + half]);
  const float ss = active ? x1 * x1 + x2 * x2 : 0.f;
  const float inv = rsqrtf(block_sum(ss, red) / hd + eps);
  if (!active) return;
  x1 = b2f(w[i]) * b2f(f2b(x1 * inv));
  x2 = b2f(w[i + half]) * b2f(f2b(x2 * inv));
  // bf16 rounding of the normed value, as the reference does before RoPE.
  x1 = b2f(f2b(x1));
  x2 = b2f(f2b(x2));
  const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
  const float ang = (float)positions[t] * inv_freq;
  float s, c;
  sincosf(ang, &s, &c);
  const bf16 o1 = f2b(x1 * c - x2 * s), o2 = f2b(x2 * c + x1 * s);
  if (h < nq) {
    row[i] = o1;
    row[i + half] = o2;
  } else {
    const int kvh = h - nq;
    k_cache[cache_off + (size_t)kvh * hd + i] = o1;
    k_cache[cache_off + (size_t)kvh * hd + i + half] = o2;
    row[i] = o1;
    row[i + half] = o2;
  }
}

// RoPE table: cos then sin of pos · theta^(−2i/hd), [max_pos, hd/2] each, f32, computed with
// the same expressions as qk_norm_rope_kv (so the values are the same). grid max_pos, block hd/2.
extern "C" __global__ void rope_table(float* __restrict__ out, int max_pos, int hd, float theta) {
  PDL_ENTRY();
  const int pos = blockIdx.x, i = threadIdx.x, half = hd / 2;
  if (i >= half) return;
  const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
  const float ang = (float)pos * inv_freq;
  float sn, c;
  sincosf(ang, &sn, &c);
  out[(size_t)pos * half + i] = c;
  out[((size_t)max_pos + pos) * half + i] = sn;
}

// qk_norm_rope_kv with one warp per head (hd a multiple of 64, ≤ 256) and cos/sin from
// rope_table. grid (T, ceil((nq + 2·nkv) / 4)), block 128.
extern "C" __global__ void qk_norm_rope_kv_w(bf16* __restrict__ qkv, const bf16* __restrict__ qn_w,
                                             const bf16* __restrict__ kn_w,
                                             const int* __restrict__ positions,
                                             const int* __restrict__ slots,
                                             bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                             int nq, int nkv, int hd, float eps,
                                             const float* __restrict__ table, int max_pos) {
  PDL_ENTRY();
  const int t = blockIdx.x, h = blockIdx.y * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (h >= nq + 2 * nkv) return;
  const int half = hd / 2, per = half / 32;
  bf16* row = qkv + (size_t)t * (nq + 2 * nkv) * hd + (size_t)h * hd;
  const size_t cache_off = (size_t)slots[t] * nkv * hd;
  if (h >= nq + nkv) {  // v head
    const size_t o = cache_off + (size_t)(h - nq - nkv) * hd;
    for (int p = 0; p < per; ++p) {
      const int i = lane + 32 * p;
      v_cache[o + i] = row[i];
      v_cache[o + i + half] = row[i + half];
    }
    return;
  }
  float x1[4], x2[4], ss = 0.f;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    if (p >= per) break;
    const int i = lane + 32 * p;
    x1[p] = b2f(row[i]);
    x2[p] = b2f(row[i + half]);
    ss += x1[p] * x1[p] + x2[p] * x2[p];
  }
  const float inv = rsqrtf(warp_sum(ss) / hd + eps);
  const bf16* w = h < nq ? qn_w : kn_w;
  const int pos = positions[t];
  const float* cs = table + (size_t)pos * half;
  const float* sn = table + ((size_t)max_pos + pos) * half;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    if (p >= per) break;
    const int i = lane + 32 * p;
    // bf16 rounding of the normed value, as the reference does before RoPE.
    const float a = b2f(f2b(b2f(w[i]) * b2f(f2b(x1[p] * inv))));
    const float b = b2f(f2b(b2f(w[i + half]) * b2f(f2b(x2[p] * inv))));
    const float c = cs[i], s = sn[i];
    const bf16 o1 = f2b(a * c - b * s), o2 = f2b(b * c + a * s);
    row[i] = o1;
    row[i + half] = o2;
    if (h >= nq) {
      const size_t o = cache_off + (size_t)(h - nq) * hd;
      k_cache[o + i] = o1;
      k_cache[o + i + half] = o2;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Paged attention of single query tokens, split over the context (flash-decoding).
// One CTA per (partition, kv head, query token); 4 warps; a group of L = HD/8 lanes handles one
// key per iteration (8 dims per lane, 16-byte loads), for all G query heads of the kv head at once.
// Query token t sees keys 0 .. ctx_lens[t]-1 of block-table row bt_rows[t] (so a prefill chunk's
// tokens can share one row). Partial results: m, l [Tq, nq, parts], acc [Tq, nq, parts, HD].
#define DEC_WARPS 4
template <int HD, int MAX_G>
__device__ void decode_attn_part(const bf16* __restrict__ q, int q_stride,
                                 const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                                 const int* __restrict__ ctx_lens, const int* __restrict__ bt_rows,
                                 const int* __restrict__ block_tables, int max_blocks,
                                 int block_size, int nq, int nkv, int part_size, int parts,
                                 float scale, float* __restrict__ pm, float* __restrict__ pl,
                                 float* __restrict__ pacc) {
  constexpr int L = HD / 8;       // lanes per key
  constexpr int KPW = 32 / L;     // keys per warp iteration
  const int part = blockIdx.x, kvh = blockIdx.y, t = blockIdx.z;
  constexpr int G = MAX_G;  // query heads per kv head (the launcher picks the instantiation)
  const int ctx = ctx_lens[t];
  const int k0 = part * part_size;
  if (k0 >= ctx) return;
  const int k1 = min(ctx, k0 + part_size);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / L, sl = lane % L;
  const int d0 = sl * 8;

  float qv[MAX_G][8];
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    if (g < G) {
      const uint4 qr = *reinterpret_cast<const uint4*>(q + (size_t)t * q_stride +
                                                       (size_t)(kvh * G + g) * HD + d0);
      const bf16* qb = reinterpret_cast<const bf16*>(&qr);
#pragma unroll
      for (int j = 0; j < 8; ++j) qv[g][j] = b2f(qb[j]) * scale;
    }
  }
  float m[MAX_G], l[MAX_G], acc[MAX_G][8];
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
  }
  const int* bt = block_tables + (size_t)bt_rows[t] * max_blocks;
  // U keys per sub-group are loaded before any is used (bytes in flight); the loop bound is
  // uniform across the warp (the shuffles need every lane): a lane whose key is past the end
  // computes on a clamped key and discards the result.
  constexpr int U = 4;
  constexpr int STEP = DEC_WARPS * KPW;
  for (int base = k0 + warp * KPW; base < k1; base += STEP * U) {
    uint4 kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = min(base + u * STEP + sub, k1 - 1);
      const int slot = bt[key / block_size] * block_size + key % block_size;
      const size_t off = ((size_t)slot * nkv + kvh) * HD + d0;
      kr[u] = *reinterpret_cast<const uint4*>(k_cache + off);
      vr[u] = *reinterpret_cast<const uint4*>(v_cache + off);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool valid = base + u * STEP + sub < k1;
      const bf16* kb = reinterpret_cast<const bf16*>(&kr[u]);
      const bf16* vb = reinterpret_cast<const bf16*>(&vr[u]);
      float kf[8], vf[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        kf[j] = b2f(kb[j]);
        vf[j] = b2f(vb[j]);
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) s += qv[g][j] * kf[j];
#pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (valid) {
          const float mn = fmaxf(m[g], s);
          const float corr = __expf(m[g] - mn);
          const float p = __expf(s - mn);
          l[g] = l[g] * corr + p;
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[g][j] = acc[g][j] * corr + p * vf[j];
          m[g] = mn;
        }
      }
    }
  }
  // Merge the KPW·DEC_WARPS key streams through shared memory: stream id = warp·KPW + sub.
  constexpr int STREAMS = DEC_WARPS * KPW;
  __shared__ float sm_m[STREAMS][MAX_G], sm_l[STREAMS][MAX_G];
  __shared__ float sm_acc[STREAMS][MAX_G][HD];
  const int stream = warp * KPW + sub;
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    if (g < G) {
      if (sl == 0) {
        sm_m[stream][g] = m[g];
        sm_l[stream][g] = l[g];
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) sm_acc[stream][g][d0 + j] = acc[g][j];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * HD; idx += blockDim.x) {
    const int g = idx / HD, d = idx % HD;
    float M = -INFINITY;
    for (int s = 0; s < STREAMS; ++s) M = fmaxf(M, sm_m[s][g]);
    float Ls = 0.f, A = 0.f;
    for (int s = 0; s < STREAMS; ++s) {
      const float ms = sm_m[s][g];
      if (ms == -INFINITY) continue;
      const float c = __expf(ms - M);
      Ls += sm_l[s][g] * c;
      A += sm_acc[s][g][d] * c;
    }
    const int h = kvh * G + g;
    const size_t base = ((size_t)t * nq + h) * parts + part;
    pacc[base * HD + d] = A;
    if (d == 0) {
      pm[base] = M;
      pl[base] = Ls;
    }
  }
}

#define DECODE_KERNEL(HD, G)                                                                       \
  extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32, 4)                                   \
      decode_attn_hd##HD##_g##G(const bf16* q, int q_stride, const bf16* k_cache,                   \
                                const bf16* v_cache, const int* ctx_lens, const int* bt_rows,       \
                                const int* block_tables, int max_blocks, int block_size, int nq,    \
                                int nkv, int part_size, int parts, float scale, float* pm,          \
                                float* pl, float* pacc) {                                           \
    PDL_ENTRY();                                                                                   \
    decode_attn_part<HD, G>(q, q_stride, k_cache, v_cache, ctx_lens, bt_rows, block_tables,         \
                            max_blocks, block_size, nq, nkv, part_size, parts, scale, pm, pl,       \
                            pacc);                                                                  \
  }
#define DECODE_KERNELS(HD) \
  DECODE_KERNEL(HD, 1)     \
  DECODE_KERNEL(HD, 2)     \
  DECODE_KERNEL(HD, 4)     \
  DECODE_KERNEL(HD, 8)
DECODE_KERNELS(16)
DECODE_KERNELS(32)
DECODE_KERNELS(64)
DECODE_KERNELS(128)

// Merge of the partitions: out[t, h·hd + d] = Σ_p e^{m_p − M} acc_p[d] / Σ_p e^{m_p − M} l_p.
// grid (Tq, nq), block hd.
extern "C" __global__ void decode_attn_combine(const float* __restrict__ pm,
                                               const float* __restrict__ pl,
                                               const float* __restrict__ pacc,
                                               const int* __restrict__ ctx_lens, bf16* __restrict__ out,
                                               int out_stride, int nq, int hd, int part_size,
                                               int parts) {
  PDL_ENTRY();
  const int t = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const int used = min(parts, (ctx_lens[t] + part_size - 1) / part_size);
  const size_t base = ((size_t)t * nq + h) * parts;
  float M = -INFINITY;
  for (int p = 0; p < used; ++p) M = fmaxf(M, pm[base + p]);
  float Ls = 0.f, A = 0.f;
  for (int p = 0; p < used; ++p) {
    const float c = __expf(pm[base + p] - M);
    Ls += pl[base + p] * c;
    A += pacc[(base + p) * hd + d] * c;
  }
  out[(size_t)t * out_stride + (size_t)h * hd + d] = f2b(Ls > 0.f ? A / Ls : 0.f);
}

// ---------------------------------------------------------------------------------------------
// Prefill attention helpers (the two products run on cuBLAS).
// Gather one sequence's keys/values [0, ctx) from the paged cache into contiguous [ctx, nkv·hd].
// grid ctx, block 128.
extern "C" __global__ void gather_kv(const bf16* __restrict__ k_cache,
                                     const bf16* __restrict__ v_cache,
                                     const int* __restrict__ block_table, int block_size, int width,
                                     bf16* __restrict__ k_out, bf16* __restrict__ v_out) {
  PDL_ENTRY();
  const int p = blockIdx.x;
  const size_t slot = (size_t)block_table[p / block_size] * block_size + p % block_size;
  for (int c = threadIdx.x; c < width; c += blockDim.x) {
    k_out[(size_t)p * width + c] = k_cache[slot * width + c];
    v_out[(size_t)p * width + c] = v_cache[slot * width + c];
  }
}

// Row softmax of scores S [rows, ctx] (bf16, already scaled), in place. Causal when
// causal_base ≥ 0: row r of a head sees keys 0 ..= causal_base + (r % rows_per_head).
// grid rows, block 256.
extern "C" __global__ void softmax_rows(bf16* __restrict__ s, int ctx, int rows_per_head,
                                        int causal_base) {
  PDL_ENTRY();
  __shared__ float red[32];
  const int r = blockIdx.x;
  const int valid = causal_base >= 0 ? min(ctx, causal_base + (r % rows_per_head) + 1) : ctx;
  bf16* row = s + (size_t)r * ctx;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < valid; i += blockDim.x) mx = fmaxf(mx, b2f(row[i]));
  mx = block_max(mx, red);
  float sum = 0.f;
  for (int i = threadIdx.x; i < valid; i += blockDim.x) sum += __expf(b2f(row[i]) - mx);
  sum = block_sum(sum, red);
  const float inv = 1.f / sum;
  // Each thread rewrites only the elements it read: in place is safe.
  for (int i = threadIdx.x; i < ctx; i += blockDim.x)
    row[i] = f2b(i < valid ? __expf(b2f(row[i]) - mx) * inv : 0.f);
}

// ---------------------------------------------------------------------------------------------
// Prefill attention on tensor cores (flash style, mma.sync m16n8k16 bf16 → f32).
// A CTA owns 64·MT query rows (16·MT per warp: MT m-tiles) of one q head and walks the keys in
// tiles of 64: S = Q·Kᵀ (f32), online softmax in base 2 (scale folded into one FFMA per score),
// O += bf16(P)·V, O / l at the end. The CTA's Q rows and two stages of K/V tiles (tile j + 1
// loads while tile j is used) come into shared memory with cp.async (dynamic shared memory:
// (64·MT + 2 · 2 · 64) · (HDP + 8) bf16); every Q, K and V fragment is read with ldmatrix, and
// each K/V fragment feeds the MT m-tiles of its warp. Keys come from a paged cache
// (block_table ≠ null: key → slot = block_table[key / bs]·bs + key % bs, row = slot) or a
// contiguous buffer (row = key); row `r` of kv head g is at base + r·kv_ld + g·HD. Causal: query
// row i (position ctx_base + i) sees keys 0 ..= ctx_base + i; else every key < nkeys. Head dims
// that are not a multiple of 16 are zero-padded in shared memory (SigLIP: 72 → 80).
// grid (ceil(rows / (64·MT)), nq, batch), block 128; batch z offsets q/kv/out by z·(q_z, kv_z,
// out_z).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_wait1() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void ldsm_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// c[16×8] += a[16×16] · b[16×8] (fragments as the PTX ISA lays them out).
__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

#define FA_ROWS 64
#define FA_KEYS 64
#define FA_BT_SMEM 1024  // block-table entries a CTA keeps in shared memory (the rest: global)
// Keys [key0, key0 + 64) of kv head `kvh` into a K tile `ks` and the V tile after it (TILE bf16
// further), rows of LDS bf16, zeros past `limit` / HD, by a CTA of 128 threads: each finds the
// cache rows of its FA_KEYS·CH / 128 16-byte pieces once (a shift for power-of-two block sizes)
// and issues the K and V copies from them.
// Paged: block b of the table is sbt[b − bt_base] when that is below FA_BT_SMEM, else bt[b].
template <int HD, int HDP, int LDS>
__device__ __forceinline__ void fa_load_kv(bf16* ks, const bf16* __restrict__ k,
                                           const bf16* __restrict__ v, int kv_ld, int kvh,
                                           const int* sbt, int bt_base,
                                           const int* __restrict__ bt, int bs, int key0,
                                           int limit) {
  constexpr int CH = HDP / 8, VALID = HD / 8, PER = FA_KEYS * CH / 128;
  constexpr int TILE_BYTES = FA_KEYS * LDS * 2;
  static_assert(FA_KEYS * CH % 128 == 0, "a tile is a whole number of copies per thread");
  int row[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) row[i] = min(key0 + (int)(threadIdx.x + i * 128) / CH, limit - 1);
  if (bt) {
    const int sh = __ffs(bs) - 1;
    if (bs == 1 << sh) {
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        const int b = row[i] >> sh, sb = b - bt_base;
        row[i] = ((sb < FA_BT_SMEM ? sbt[sb] : bt[b]) << sh) | (row[i] & (bs - 1));
      }
    } else {
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        const int b = row[i] / bs, sb = b - bt_base;
        row[i] = (sb < FA_BT_SMEM ? sbt[sb] : bt[b]) * bs + row[i] - b * bs;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = threadIdx.x + i * 128;
    const int r = c / CH, ch = c % CH;
    const int bytes = key0 + r < limit && ch < VALID ? 16 : 0;
    const size_t off = (size_t)row[i] * kv_ld + kvh * HD + min(ch, VALID - 1) * 8;
    const uint32_t dst = smem_u32(ks + r * LDS + ch * 8);
    cp_async16(dst, k + off, bytes);
    cp_async16(dst + TILE_BYTES, v + off, bytes);
  }
}

// 2^x in one MUFU instruction (denormal results flush to 0: softmax weights below 2^-126).
__device__ __forceinline__ float ex2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <int HD, int MT>
__device__ void flash_attn(const bf16* __restrict__ q, int q_ld, long long q_z,
                           const bf16* __restrict__ k, const bf16* __restrict__ v, int kv_ld,
                           long long kv_z, const int* __restrict__ bt, int bs,
                           bf16* __restrict__ out, int out_ld, long long out_z, int rows,
                           int ctx_base, int nkeys, int group, int causal, float scale_log2) {
  constexpr int HDP = (HD + 15) / 16 * 16;  // padded head dim
  constexpr int LDS = HDP + 8;              // smem row pitch: conflict-free ldmatrix
  constexpr int KC = HDP / 16;              // k-steps of Q·Kᵀ
  constexpr int NT = HDP / 8;               // n-tiles of O
  constexpr int CH = HDP / 8, VALID = HD / 8;
  constexpr int ROWS = FA_ROWS * MT;        // query rows of the CTA: MT m-tiles of 16 per warp
  constexpr int TILE = FA_KEYS * LDS;
  // Shared memory: the CTA's Q rows, then two stages of (K, V) tiles (tile j + 1 loads while
  // tile j is used).
  extern __shared__ __align__(16) unsigned char fa_smem[];
  bf16* const q_sm = reinterpret_cast<bf16*>(fa_smem);
  bf16* const kv_sm = q_sm + ROWS * LDS;
  __shared__ int sbt[FA_BT_SMEM];
  const int rb = gridDim.x - 1 - blockIdx.x;  // the longest (last) row blocks start first
  const int h = blockIdx.y, z = blockIdx.z, kvh = h / group;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r0 = rb * ROWS;
  q += z * q_z;
  k += z * kv_z;
  v += z * kv_z;
  out += z * out_z;
  const int kmax = causal ? min(nkeys, ctx_base + r0 + ROWS) : nkeys;
  const int tiles = (kmax + FA_KEYS - 1) / FA_KEYS;
  // Tiles below `full` need no mask: every key exists and every row of the CTA sees it.
  const int full = causal ? min(nkeys, ctx_base + r0 + 1) / FA_KEYS : nkeys / FA_KEYS;
  // The warp's rows: wr0 .. wr0 + 16·MT − 1; tiles wholly after its last position are skipped.
  const int wr0 = r0 + warp * 16 * MT;
  const int wlast = causal ? ctx_base + wr0 + 16 * MT - 1 : nkeys;
  if (bt) {
    const int nb = min(FA_BT_SMEM, (kmax + bs - 1) / bs);
    for (int i = threadIdx.x; i < nb; i += blockDim.x) sbt[i] = bt[i];
    __syncthreads();
  }
  // Q rows (zeros past `rows` / HD), in the same commit group as the first K/V tile.
  for (int c = threadIdx.x; c < ROWS * CH; c += blockDim.x) {
    const int r = c / CH, ch = c % CH;
    const bool ok = r0 + r < rows && ch < VALID;
    const bf16* src = ok ? q + (size_t)(r0 + r) * q_ld + (size_t)h * HD + ch * 8 : q;
    cp_async16(smem_u32(q_sm + r * LDS + ch * 8), src, ok ? 16 : 0);
  }
  // Keys at or past kmax are masked for every row of the CTA: they load as zeros.
  auto load = [&](int j) {
    fa_load_kv<HD, HDP, LDS>(kv_sm + (j & 1) * 2 * TILE, k, v, kv_ld, kvh, sbt, 0, bt, bs,
                             j * FA_KEYS, kmax);
  };
  load(0);
  cp_commit();

  // This thread's rows of each 16-row m-tile: g and g + 8; its columns qc, qc + 1 (+ 8).
  const int g = lane >> 2, qc = (lane & 3) * 2;
  float o[MT][NT][4];
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int n = 0; n < NT; ++n) o[t][n][0] = o[t][n][1] = o[t][n][2] = o[t][n][3] = 0.f;
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int t = 0; t < MT; ++t) m[t][0] = m[t][1] = -INFINITY, l[t][0] = l[t][1] = 0.f;

  for (int j = 0; j < tiles; ++j) {
    if (j + 1 < tiles) load(j + 1);
    cp_commit();
    cp_wait1();  // tile j (and Q) are in; tile j + 1 may still be loading
    __syncthreads();
    if (j * FA_KEYS <= wlast) {
      const bf16* ks = kv_sm + (j & 1) * 2 * TILE;
      const bf16* vs = ks + TILE;
      // S = Q·Kᵀ: each K fragment (ldmatrix) feeds the MT m-tiles of the warp.
      float s[MT][8][4];
#pragma unroll
      for (int t = 0; t < MT; ++t)
#pragma unroll
        for (int n = 0; n < 8; ++n) s[t][n][0] = s[t][n][1] = s[t][n][2] = s[t][n][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        uint32_t qa[MT][4];
#pragma unroll
        for (int t = 0; t < MT; ++t)
          ldsm_x4(qa[t], smem_u32(q_sm + (warp * 16 * MT + t * 16 + (lane & 15)) * LDS +
                                  kc * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t b[4];
          ldsm_x4(b, smem_u32(ks + ((np * 2 + (lane >> 4)) * 8 + (lane & 7)) * LDS + kc * 16 +
                              ((lane >> 3) & 1) * 8));
#pragma unroll
          for (int t = 0; t < MT; ++t) {
            mma_bf16(s[t][np * 2], qa[t], b[0], b[1]);
            mma_bf16(s[t][np * 2 + 1], qa[t], b[2], b[3]);
          }
        }
      }
      float ms[MT][2];  // running max in base 2 per row, subtracted in the exponent
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        // Mask where needed, running max of the raw scores over the row (4 lanes share a
        // row); the scale (base 2) goes into one FFMA per score below.
        float mx[2] = {m[t][0], m[t][1]};
        if (j >= full) {
          const int kb = j * FA_KEYS + qc;
          const int qp0 = ctx_base + wr0 + t * 16 + g;
#pragma unroll
          for (int n = 0; n < 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key = kb + n * 8 + (e & 1);
              const bool ok = key < nkeys && (!causal || key <= qp0 + (e >> 1) * 8);
              if (!ok) s[t][n][e] = -INFINITY;
            }
          }
        }
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          mx[0] = fmaxf(mx[0], fmaxf(s[t][n][0], s[t][n][1]));
          mx[1] = fmaxf(mx[1], fmaxf(s[t][n][2], s[t][n][3]));
        }
        bool grow = false;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
          // Lazy rescaling: the reference max m moves (and O, l are rescaled) only when a row's
          // max grew by more than 2^8 in base 2, for the whole warp at once; otherwise the
          // weights below are up to 2^8 (exact in f32, same relative rounding in bf16).
          grow |= (mx[r] - m[t][r]) * scale_log2 > 8.f;  // m = −∞: true once a key exists
        }
        if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            // 0 on the row's first tile (m = −∞); a row with no key yet keeps m = −∞.
            const float corr =
                mx[r] == -INFINITY ? 1.f : ex2_fast((m[t][r] - mx[r]) * scale_log2);
            m[t][r] = mx[r];
            l[t][r] *= corr;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
              o[t][n][r * 2] *= corr;
              o[t][n][r * 2 + 1] *= corr;
            }
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) ms[t][r] = m[t][r] == -INFINITY ? 0.f : m[t][r] * scale_log2;
      }
      // O += P·V, 16 keys at a time: P of those keys becomes the A fragment of each m-tile (the
      // scores are consumed as they go), and each V fragment (ldmatrix.trans) feeds the MT
      // m-tiles.
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        uint32_t pa[MT][4];
#pragma unroll
        for (int t = 0; t < MT; ++t) {
#pragma unroll
          for (int h2 = 0; h2 < 2; ++h2) {
            const float* sn = s[t][c * 2 + h2];
            const float p0 = ex2_fast(fmaf(sn[0], scale_log2, -ms[t][0]));
            const float p1 = ex2_fast(fmaf(sn[1], scale_log2, -ms[t][0]));
            const float p2 = ex2_fast(fmaf(sn[2], scale_log2, -ms[t][1]));
            const float p3 = ex2_fast(fmaf(sn[3], scale_log2, -ms[t][1]));
            l[t][0] += p0 + p1;
            l[t][1] += p2 + p3;
            pa[t][h2 * 2] = pack_bf16(p0, p1);
            pa[t][h2 * 2 + 1] = pack_bf16(p2, p3);
          }
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t b[4];
          ldsm_x4_t(b, smem_u32(vs + (c * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDS +
                                (np * 2 + (lane >> 4)) * 8));
#pragma unroll
          for (int t = 0; t < MT; ++t) {
            mma_bf16(o[t][np * 2], pa[t], b[0], b[1]);
            mma_bf16(o[t][np * 2 + 1], pa[t], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  // Row sums over the 4 lanes of a row, then O / l.
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float lr = l[t][r];
      lr += __shfl_xor_sync(0xffffffffu, lr, 1);
      lr += __shfl_xor_sync(0xffffffffu, lr, 2);
      inv[r] = lr > 0.f ? 1.f / lr : 0.f;
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int col = n * 8 + qc;
      if (col >= HD) continue;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = wr0 + t * 16 + g + r * 8;
        if (row < rows)
          *reinterpret_cast<uint32_t*>(out + (size_t)row * out_ld + (size_t)h * HD + col) =
              pack_bf16(o[t][n][r * 2] * inv[r], o[t][n][r * 2 + 1] * inv[r]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Paged decode attention on tensor cores: the same partitions and partial results as
// decode_attn_part (so decode_attn_combine merges them), for GQA groups of G ≤ 8 query heads:
// the G heads of one kv head are the rows of a 16-row mma tile (rows ≥ G are zero), so every
// K/V byte is read once per kv head. A CTA (partition, kv head, query token) walks its keys in
// 64-key tiles, two stages of cp.async; warp w takes keys 16w .. 16w + 15 of each tile with
// its own running max / sum / output, merged through shared memory at the end.
template <int HD>
__device__ void flash_decode(const bf16* __restrict__ q, int q_stride,
                             const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                             const int* __restrict__ ctx_lens, const int* __restrict__ bt_rows,
                             const int* __restrict__ block_tables, int max_blocks, int bs, int nq,
                             int nkv, int part_size, int parts, float scale_log2,
                             float* __restrict__ pm, float* __restrict__ pl,
                             float* __restrict__ pacc) {
  constexpr int LDS = HD + 8, KC = HD / 16, NT = HD / 8, TILE = FA_KEYS * LDS;
  extern __shared__ __align__(16) unsigned char fa_smem[];
  bf16* const kv_sm = reinterpret_cast<bf16*>(fa_smem);
  __shared__ int sbt[FA_BT_SMEM];
  const int part = blockIdx.x, kvh = blockIdx.y, t = blockIdx.z;
  const int G = nq / nkv;
  const int ctx = ctx_lens[t];
  const int k0 = part * part_size;
  if (k0 >= ctx) return;
  const int k1 = min(ctx, k0 + part_size);
  const int tiles = (k1 - k0 + FA_KEYS - 1) / FA_KEYS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int* bt = block_tables + (size_t)bt_rows[t] * max_blocks;
  const int bt_base = k0 / bs;
  {
    const int nb = min(FA_BT_SMEM, (k1 - 1) / bs - bt_base + 1);
    for (int i = threadIdx.x; i < nb; i += blockDim.x) sbt[i] = bt[bt_base + i];
    __syncthreads();
  }
  auto load = [&](int j) {
    fa_load_kv<HD, HD, LDS>(kv_sm + (j & 1) * 2 * TILE, k_cache, v_cache, nkv * HD, kvh, sbt,
                            bt_base, bt, bs, k0 + j * FA_KEYS, k1);
  };
  load(0);
  cp_commit();
  const int g = lane >> 2, qc = (lane & 3) * 2;
  // Q rows: head kvh·G + g for g < G (the rows g + 8 never exist: G ≤ 8).
  uint32_t qf[KC][4];
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i & 1) * 8, col = kc * 16 + qc + (i >> 1) * 8;
      qf[kc][i] = row < G ? *reinterpret_cast<const uint32_t*>(
                                q + (size_t)t * q_stride + (size_t)(kvh * G + row) * HD + col)
                          : 0u;
    }
  }
  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m = -INFINITY, l = 0.f;  // row g only (row g + 8 is padding)
  for (int j = 0; j < tiles; ++j) {
    if (j + 1 < tiles) load(j + 1);
    cp_commit();
    cp_wait1();
    __syncthreads();
    const bf16* ks = kv_sm + (j & 1) * 2 * TILE + warp * 16 * LDS;
    const bf16* vs = kv_sm + (j & 1) * 2 * TILE + TILE + warp * 16 * LDS;
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      uint32_t b[4];
      ldsm_x4(b, smem_u32(ks + ((lane >> 4) * 8 + (lane & 7)) * LDS + kc * 16 +
                          ((lane >> 3) & 1) * 8));
      mma_bf16(s[0], qf[kc], b[0], b[1]);
      mma_bf16(s[1], qf[kc], b[2], b[3]);
    }
    const int kb = k0 + j * FA_KEYS + warp * 16 + qc;
    float mx = m;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool ok = kb + n * 8 + e < k1;
        s[n][e] = ok ? s[n][e] * scale_log2 : -INFINITY;
        mx = fmaxf(mx, s[n][e]);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // A warp whose keys are all past the end keeps m = −∞ and adds nothing.
    const float base = mx == -INFINITY ? 0.f : mx;
    const float corr = exp2f(m - base);
    m = mx;
    l *= corr;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      o[n][0] *= corr;
      o[n][1] *= corr;
    }
    const float p00 = exp2f(s[0][0] - base), p01 = exp2f(s[0][1] - base);
    const float p10 = exp2f(s[1][0] - base), p11 = exp2f(s[1][1] - base);
    l += p00 + p01 + p10 + p11;
    const uint32_t pa[4] = {pack_bf16(p00, p01), 0u, pack_bf16(p10, p11), 0u};
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldsm_x4_t(b, smem_u32(vs + (((lane >> 3) & 1) * 8 + (lane & 7)) * LDS +
                            (np * 2 + (lane >> 4)) * 8));
      mma_bf16(o[np * 2], pa, b[0], b[1]);
      mma_bf16(o[np * 2 + 1], pa, b[2], b[3]);
    }
    __syncthreads();
  }
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  // Merge the 4 warps: (m, l, O) of rows < G through shared memory (the K/V stages are free).
  float* sm_o = reinterpret_cast<float*>(fa_smem);  // [4][8][HD]
  __shared__ float sm_m[4][8], sm_l[4][8];
  if (g < G) {
    if ((lane & 3) == 0) {
      sm_m[warp][g] = m;
      sm_l[warp][g] = l;
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      sm_o[(warp * 8 + g) * HD + n * 8 + qc] = o[n][0];
      sm_o[(warp * 8 + g) * HD + n * 8 + qc + 1] = o[n][1];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * HD; idx += blockDim.x) {
    const int r = idx / HD, d = idx % HD;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < 4; ++w) M = fmaxf(M, sm_m[w][r]);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      if (sm_m[w][r] == -INFINITY) continue;
      const float c = exp2f(sm_m[w][r] - M);
      L += sm_l[w][r] * c;
      A += sm_o[(w * 8 + r) * HD + d] * c;
    }
    const size_t pbase = ((size_t)t * nq + kvh * G + r) * parts + part;
    pacc[pbase * HD + d] = A;
    if (d == 0) {
      pm[pbase] = M * 0.6931471805599453f;  // natural-log units, as decode_attn_combine expects
      pl[pbase] = L;
    }
  }
}

#define FLASH_DECODE_KERNEL(HD)                                                                  \
  extern "C" __global__ void __launch_bounds__(128) flash_decode_hd##HD(                          \
      const bf16* q, int q_stride, const bf16* k_cache, const bf16* v_cache, const int* ctx_lens, \
      const int* bt_rows, const int* block_tables, int max_blocks, int bs, int nq, int nkv,       \
      int part_size, int parts, float scale_log2, float* pm, float* pl, float* pacc) {            \
    PDL_ENTRY();                                                                                  \
    flash_decode<HD>(q, q_stride, k_cache, v_cache, ctx_lens, bt_rows, block_tables, max_blocks,  \
                     bs, nq, nkv, part_size, parts, scale_log2, pm, pl, pacc);                    \
  }
FLASH_DECODE_KERNEL(64)
FLASH_DECODE_KERNEL(128)

// flash_attn_hd* take 64 query rows per CTA (16 per warp), flash_attn2_hd* 128 (32 per warp:
// each K/V fragment read from shared memory feeds two m-tiles).
#define FLASH_KERNEL(NAME, HD, MT, MINB)                                                          \
  extern "C" __global__ void __launch_bounds__(128, MINB) NAME##HD(                              \
      const bf16* q, int q_ld, long long q_z, const bf16* k, const bf16* v, int kv_ld,            \
      long long kv_z, const int* bt, int bs, bf16* out, int out_ld, long long out_z, int rows,    \
      int ctx_base, int nkeys, int group, int causal, float scale_log2) {                         \
    PDL_ENTRY();                                                                                  \
    flash_attn<HD, MT>(q, q_ld, q_z, k, v, kv_ld, kv_z, bt, bs, out, out_ld, out_z, rows,         \
                       ctx_base, nkeys, group, causal, scale_log2);                               \
  }
FLASH_KERNEL(flash_attn_hd, 64, 1, 3)
FLASH_KERNEL(flash_attn_hd, 72, 1, 3)
FLASH_KERNEL(flash_attn_hd, 80, 1, 3)
FLASH_KERNEL(flash_attn_hd, 96, 1, 3)
FLASH_KERNEL(flash_attn_hd, 128, 1, 3)
FLASH_KERNEL(flash_attn2_hd, 64, 2, 2)
FLASH_KERNEL(flash_attn2_hd, 72, 2, 2)
FLASH_KERNEL(flash_attn2_hd, 80, 2, 2)
FLASH_KERNEL(flash_attn2_hd, 96, 2, 2)
FLASH_KERNEL(flash_attn2_hd, 128, 2, 2)

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

// SigLIP patch embedding input: normalised pixels [V, 3, S, S] (f32) → patch rows
// [V·(S/P)², 3·P·P] (bf16) in the conv weight's (c, ky, kx) order. grid (V·n², ), block 256.
extern "C" __global__ void im2col_patches(const float* __restrict__ px, bf16* __restrict__ out,
                                          int S, int P) {
  PDL_ENTRY();
  const int n = S / P, row = blockIdx.x, v = row / (n * n), pi = row % (n * n);
  const int py = pi / n, pxi = pi % n, K = 3 * P * P;
  for (int c = threadIdx.x; c < K; c += blockDim.x) {
    const int ch = c / (P * P), ky = (c / P) % P, kx = c % P;
    const size_t src = (((size_t)v * 3 + ch) * S + (py * P + ky)) * S + (pxi * P + kx);
    out[(size_t)row * K + c] = f2b(px[src]);
  }
}

// x[v·n + p, i] = bf16(bf16(x + b[i]) + pos[p, i]) (patch bias then position embedding).
// grid (ceil(D/256), V·n), block 256.
extern "C" __global__ void add_pos_embed(bf16* __restrict__ x, const bf16* __restrict__ b,
                                         const bf16* __restrict__ pos, int D, int n) {
  PDL_ENTRY();
  const int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
  if (i >= D) return;
  const size_t o = (size_t)r * D + i;
  const float v = b2f(f2b(b2f(x[o]) + b2f(b[i])));
  x[o] = f2b(v + b2f(pos[(size_t)(r % n) * D + i]));
}

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

// ---------------------------------------------------------------------------------------------
// Greedy: per row of f32 logits [B, V], the max value and its lowest index. grid B, block 1024.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int V,
                                       float* __restrict__ out_val, int* __restrict__ out_idx) {
  PDL_ENTRY();
  __shared__ float sv[32];
  __shared__ int si[32];
  const float* row = logits + (size_t)blockIdx.x * V;
  float best = -INFINITY;
  int bi = 0x7fffffff;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = row[i];
    if (v > best) {
      best = v;
      bi = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > best || (ov == best && oi < bi)) {
      best = ov;
      bi = oi;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) {
    sv[warp] = best;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < nw ? sv[lane] : -INFINITY;
    bi = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > best || (ov == best && oi < bi)) {
        best = ov;
        bi = oi;
      }
    }
    if (lane == 0) {
      out_val[blockIdx.x] = best;
      out_idx[blockIdx.x] = bi;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sampling over the vocab-parallel head (the GPU half of worker/src/sampling.rs, same results).
// Each rank runs `sample_prepare` on its logit slice [rows, W] (global ids start .. start + W):
// penalties and temperature, (max, Σexp) of the processed and the raw logits, its top k_local
// candidates (processed value, raw value, global id) and its raw top n_local, packed exactly as
// the host sampler packs them. The packed words of all ranks are all-gathered (NCCL), then
// `sample_finish` merges the candidates, applies top-k / top-p / min-p and draws with the
// counter-based uniform; arithmetic in the same order and precision as the host so that both
// pick the same token.
//
// Per-row parameters, SR_WORDS u32 words each (f32 and u64 fields as bits).
#define SR_ROW 0        // logits row of this sample row
#define SR_FLAGS 1      // bit 0 greedy, bit 1 logprobs
#define SR_TEMP 2       // f32 temperature (1 for greedy rows)
#define SR_K 3          // candidates this rank sends (k_local)
#define SR_N 4          // raw top tokens this rank sends (n_local)
#define SR_PEN_BEGIN 5  // penalty entries [begin, end) of `pen`
#define SR_PEN_END 6
#define SR_REP 7        // f32 repetition penalty
#define SR_FREQ 8       // f32 frequency penalty
#define SR_PRES 9       // f32 presence penalty
#define SR_F_OFF 10     // this row's first f32 word in the packed f section
#define SR_U_OFF 11     // this row's first word in the packed u section
#define SR_KEEP 12      // global candidates kept (K)
#define SR_N_KEEP 13    // top_logprobs
#define SR_TOP_K 14
#define SR_TOP_P 15     // f32
#define SR_MIN_P 16     // f32
#define SR_SEED 17      // u64 (lo, hi)
#define SR_COUNTER 19   // u64 (lo, hi): tokens generated so far
#define SR_WORDS 24
// Output of `sample_finish` per row: id, f32 logprob, top count, then (id, f32 logprob) pairs.
#define SO_TOP 20
#define SO_WORDS 44
#define SAMPLE_MAX_K 1024

// Order-preserving key: a larger float gives a larger key; −0 and +0 give the same key.
__device__ __forceinline__ uint32_t f2key(float f) {
  const uint32_t u = f == 0.f ? 0u : __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ double block_sum_d(double v, double* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double t = lane < nw ? red[lane] : 0.0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;
}

struct TopKSmem {
  uint32_t hist[2048];
  uint32_t wc_gt[32], wc_eq[32];
  uint32_t digit, kr, base_gt, base_eq, sel_warp, sel_acc;
  uint64_t sort[SAMPLE_MAX_K];
};

// Radix select of the k-th largest 32-bit key in three passes (11, 11 and 10 bits from the top):
// each pass histograms the digit of the keys that match the digits chosen so far, then picks the
// digit holding the kr-th largest. The pieces let a caller fold other per-element work into the
// same loads (see sample_partial). Whole block; blockDim.x = 1024.
struct Radix {
  uint32_t prefix, mask, kr;  // digits chosen so far, their bits, rank still to find
};
__device__ __forceinline__ int radix_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
__device__ __forceinline__ int radix_bins(int pass) { return pass == 2 ? 1024 : 2048; }

// Zeroes the pass's histogram (the caller syncs before counting).
__device__ void radix_clear(TopKSmem& s, int pass) {
  for (int i = threadIdx.x; i < radix_bins(pass); i += blockDim.x) s.hist[i] = 0;
}

// Counts key u (when valid) into the pass's histogram; every lane of the warp calls it
// (warp-aggregated: one shared atomic per distinct digit in the warp).
__device__ __forceinline__ void radix_add(TopKSmem& s, const Radix& r, int pass, bool valid,
                                          uint32_t u) {
  const int lane = threadIdx.x & 31;
  uint32_t d = 0xffffffffu;
  if (valid && (u & r.mask) == r.prefix) d = (u >> radix_shift(pass)) & (radix_bins(pass) - 1);
  const unsigned peers = __match_any_sync(0xffffffffu, d);
  if (d != 0xffffffffu && lane == __ffs(peers) - 1) atomicAdd(&s.hist[d], (uint32_t)__popc(peers));
}

// After the counting loop: picks the pass's digit (bins in descending order, warp w owns
// nb / 32 of them: find the warp, then the lane, then the bin) and updates r.
__device__ void radix_pick(TopKSmem& s, Radix& r, int pass) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nb = radix_bins(pass), per_lane = nb >> 10;
  auto bin = [&](int w, int l, int j) { return nb - 1 - ((w * 32 + l) * per_lane + j); };
  __syncthreads();
  uint32_t lsum = 0;
  for (int j = 0; j < per_lane; ++j) lsum += s.hist[bin(warp, lane, j)];
  uint32_t wsum = lsum;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, o);
  if (lane == 0) s.wc_gt[warp] = wsum;
  __syncthreads();
  if (warp == 0) {
    const uint32_t v = s.wc_gt[lane];
    uint32_t incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    if (incl - v < r.kr && r.kr <= incl) {
      s.sel_warp = lane;
      s.sel_acc = incl - v;
    }
  }
  __syncthreads();
  if (warp == (int)s.sel_warp) {
    uint32_t incl = lsum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    uint32_t acc = s.sel_acc + incl - lsum;
    if (acc < r.kr && r.kr <= s.sel_acc + incl) {
      for (int j = 0; j < per_lane; ++j) {
        const uint32_t c = s.hist[bin(warp, lane, j)];
        if (acc + c >= r.kr) {
          s.digit = bin(warp, lane, j);
          s.kr = r.kr - acc;
          break;
        }
        acc += c;
      }
    }
  }
  __syncthreads();
  r.prefix |= s.digit << radix_shift(pass);
  r.mask |= (uint32_t)(radix_bins(pass) - 1) << radix_shift(pass);
  r.kr = s.kr;
  __syncthreads();
}

// After the three passes (r.prefix = the k-th largest key): the indices of every larger key and
// of the r.kr lowest indices equal to it (one ordered compaction pass), sorted by key descending
// then index ascending (the host's order) into s.sort[0 .. k) (low 32 bits; bitonic sort).
template <class KeyOf>
__device__ void radix_collect(int n, int k, KeyOf key_of, const Radix& r, TopKSmem& s) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, bd = blockDim.x;
  const uint32_t thr = r.prefix, kr = r.kr, n_gt = k - kr;
  if (tid == 0) {
    s.base_gt = 0;
    s.base_eq = 0;
  }
  __syncthreads();
  const unsigned below = (1u << lane) - 1u;
  for (int b = 0; b < n; b += bd) {
    const int i = b + tid;
    const uint32_t u = i < n ? key_of(i) : 0u;
    const bool gt = i < n && u > thr, eq = i < n && u == thr;
    const unsigned bg = __ballot_sync(0xffffffffu, gt), be = __ballot_sync(0xffffffffu, eq);
    if (lane == 0) {
      s.wc_gt[warp] = __popc(bg);
      s.wc_eq[warp] = __popc(be);
    }
    __syncthreads();
    uint32_t pg = s.base_gt + __popc(bg & below), pe = s.base_eq + __popc(be & below);
    uint32_t tg = 0, te = 0;
    for (int w = 0; w < (bd >> 5); ++w) {
      if (w < warp) {
        pg += s.wc_gt[w];
        pe += s.wc_eq[w];
      }
      tg += s.wc_gt[w];
      te += s.wc_eq[w];
    }
    if (gt) s.sort[pg] = i;
    if (eq && pe < kr) s.sort[n_gt + pe] = i;
    __syncthreads();
    if (tid == 0) {
      s.base_gt += tg;
      s.base_eq += te;
    }
    __syncthreads();
    if (s.base_gt >= n_gt && s.base_eq >= kr) break;  // block-uniform: all found
  }
  // Sort (key desc, index asc): ascending on (~key << 32 | index); padded to a power of two.
  int p2 = 1;
  while (p2 < k) p2 <<= 1;
  for (int i = tid; i < p2; i += bd) {
    if (i < k) {
      const uint32_t idx = (uint32_t)s.sort[i];
      s.sort[i] = ((uint64_t)(~key_of(idx)) << 32) | idx;
    } else {
      s.sort[i] = ~0ull;
    }
  }
  __syncthreads();
  for (int size = 2; size <= p2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = tid; t < (p2 >> 1); t += bd) {
        const int lo = 2 * t - (t & (stride - 1)), hi = lo + stride;
        const bool up = (lo & size) == 0;
        const uint64_t a = s.sort[lo], c = s.sort[hi];
        if ((a > c) == up) {
          s.sort[lo] = c;
          s.sort[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// Indices of the k (1 ≤ k ≤ min(n, 1024)) largest keys of key_of(0 .. n), sorted by key
// descending then index ascending, into s.sort[0 .. k): the three radix passes, then
// radix_collect. Whole block; blockDim.x = 1024.
template <class KeyOf>
__device__ void block_top_k(int n, int k, KeyOf key_of, TopKSmem& s) {
  Radix r{0u, 0u, (uint32_t)k};
#pragma unroll 1
  for (int pass = 0; pass < 3; ++pass) {
    radix_clear(s, pass);
    __syncthreads();
    for (int b = 0; b < n; b += blockDim.x) {
      const int i = b + threadIdx.x;
      radix_add(s, r, pass, i < n, i < n ? key_of(i) : 0u);
    }
    radix_pick(s, r, pass);
  }
  radix_collect(n, k, key_of, r, s);
}

// Stage 1, grid (rows, parts), block 1024: part c of a row covers the logits [c·W/parts,
// (c+1)·W/parts) (several CTAs per row keep small batches fast). `logits` is modified in place
// (NaN → −inf, penalties applied); the raw value of each penalised entry is kept in pen_raw.
// pen: (local index, output count) pairs, sorted by index within each row. Each (row, part)
// writes SP_WORDS words of scratch: its (max, Σexp) pairs, its top min(k, size) candidates
// (processed value, raw value, local index) and its raw top min(nt, size).
#define SP_HEAD 8  // pm, ps, rm, rs, candidates, raw top count
#define SP_PROC SP_HEAD
#define SP_RAW (SP_PROC + SAMPLE_MAX_K)
#define SP_ID (SP_RAW + SAMPLE_MAX_K)
#define SP_TV (SP_ID + SAMPLE_MAX_K)
#define SP_TI (SP_TV + SO_TOP)
#define SP_WORDS (SP_TI + SO_TOP)
extern "C" __global__ void __launch_bounds__(1024) sample_partial(
    float* __restrict__ logits, int W, const uint32_t* __restrict__ rows,
    const uint32_t* __restrict__ pen, float* __restrict__ pen_raw, uint32_t* __restrict__ scratch) {
  PDL_ENTRY();
  __shared__ TopKSmem s;
  __shared__ double red[32];
  __shared__ float redf[32];
  const int parts = gridDim.y, c = blockIdx.y;
  const uint32_t* p = rows + (size_t)blockIdx.x * SR_WORDS;
  const int tid = threadIdx.x, bd = blockDim.x;
  const int lo = (int)((long long)W * c / parts), hi = (int)((long long)W * (c + 1) / parts);
  const int n = hi - lo;
  float* x = logits + (size_t)p[SR_ROW] * W + lo;
  const bool greedy = p[SR_FLAGS] & 1u, logprobs = p[SR_FLAGS] & 2u;
  const float temp = __uint_as_float(p[SR_TEMP]);
  const int k = min((int)p[SR_K], n), nt = min((int)p[SR_N], n);
  const uint32_t pb = p[SR_PEN_BEGIN], pe = p[SR_PEN_END];
  uint32_t* so = scratch + ((size_t)blockIdx.x * parts + c) * SP_WORDS;
  float* sf = reinterpret_cast<float*>(so);

  const float rp = __uint_as_float(p[SR_REP]), fp = __uint_as_float(p[SR_FREQ]),
              pp = __uint_as_float(p[SR_PRES]);
  // Penalties on this part, in place (repetition on prompt ∪ output, then frequency and presence
  // on output tokens), with the host's rounding (no fused multiply-add); NaN counts as −inf.
  auto penalise = [&]() {
    for (uint32_t e = pb + tid; e < pe; e += bd) {
      const uint32_t gi = pen[2 * e], cnt = pen[2 * e + 1];
      if (gi < (uint32_t)lo || gi >= (uint32_t)hi) continue;
      float v = x[gi - lo];
      if (isnan(v)) v = -INFINITY;
      pen_raw[e] = v;
      if (rp != 1.f) v = v > 0.f ? __fdiv_rn(v, rp) : __fmul_rn(v, rp);
      if ((fp != 0.f || pp != 0.f) && cnt > 0) {
        v = __fsub_rn(v, __fmul_rn(fp, (float)cnt));
        v = __fsub_rn(v, pp);
      }
      x[gi - lo] = v;
    }
    __syncthreads();
  };
  // The raw value of candidate idx: the saved one if it was penalised.
  auto raw_of = [&](uint32_t idx, float v) {
    const uint32_t gi = lo + idx;
    uint32_t a = pb, b = pe;  // binary search among this row's penalised indices
    while (a < b) {
      const uint32_t mid = (a + b) >> 1;
      if (pen[2 * mid] < gi)
        a = mid + 1;
      else
        b = mid;
    }
    return a < pe && pen[2 * a] == gi ? pen_raw[a] : v;
  };

  if (!logprobs) {
    // No raw normaliser or raw top needed: penalties, then x / T in place, and the passes over
    // the part folded together: (max, radix pass 0), (Σ exp, radix pass 1), radix pass 2, collect.
    penalise();
    Radix r{0u, 0u, (uint32_t)k};
    radix_clear(s, 0);
    __syncthreads();
    float mx = -INFINITY;
    for (int b = 0; b < n; b += bd) {
      const int i = b + tid;
      float v = 0.f;
      if (i < n) {
        v = x[i];
        const bool nan = isnan(v);
        if (nan) v = -INFINITY;
        if (!greedy) v = __fdiv_rn(v, temp);
        if (nan || !greedy) x[i] = v;
        mx = fmaxf(mx, v);
      }
      radix_add(s, r, 0, i < n, f2key(v));
    }
    const float pm = block_max(mx, redf);
    radix_pick(s, r, 0);
    radix_clear(s, 1);
    __syncthreads();
    double acc = 0.0;
    for (int b = 0; b < n; b += bd) {
      const int i = b + tid;
      const float v = i < n ? x[i] : 0.f;
      if (i < n && !greedy && pm != -INFINITY) acc += (double)expf(__fsub_rn(v, pm));
      radix_add(s, r, 1, i < n, f2key(v));
    }
    if (!greedy) {
      const double ps = block_sum_d(acc, red);
      if (tid == 0) {
        sf[0] = pm;
        sf[1] = pm == -INFINITY ? 0.f : (float)ps;
      }
    }
    radix_pick(s, r, 1);
    radix_clear(s, 2);
    __syncthreads();
    for (int b = 0; b < n; b += bd) {
      const int i = b + tid;
      radix_add(s, r, 2, i < n, i < n ? f2key(x[i]) : 0u);
    }
    radix_pick(s, r, 2);
    if (tid == 0) {
      so[4] = k;
      so[5] = 0;
    }
    radix_collect(n, k, [&](int i) { return f2key(x[i]); }, r, s);
    for (int j = tid; j < k; j += bd) {
      const uint32_t idx = (uint32_t)s.sort[j];
      sf[SP_PROC + j] = x[idx];
      sf[SP_RAW + j] = greedy ? raw_of(idx, x[idx]) : 0.f;  // read only with logprobs
      so[SP_ID + j] = lo + idx;
    }
    return;
  }

  // (max, Σ exp(v − max)) of value_of(0 .. n) into dst[0], dst[1] (sum in f64); (−inf, 0) when
  // every value is −inf.
  auto max_sumexp = [&](auto value_of, float* dst) {
    float mx = -INFINITY;
    for (int i = tid; i < n; i += bd) mx = fmaxf(mx, value_of(i));
    mx = block_max(mx, redf);
    double acc = 0.0;
    if (mx != -INFINITY)
      for (int i = tid; i < n; i += bd) acc += (double)expf(__fsub_rn(value_of(i), mx));
    const double sum = block_sum_d(acc, red);
    if (tid == 0) {
      dst[0] = mx;
      dst[1] = mx == -INFINITY ? 0.f : (float)sum;
    }
    __syncthreads();
  };
  // With logprobs: 1. raw logits: NaN → −inf; their (max, Σ exp).
  for (int i = tid; i < n; i += bd)
    if (isnan(x[i])) x[i] = -INFINITY;
  __syncthreads();
  max_sumexp([&](int i) { return x[i]; }, sf + 2);
  // 2. Raw top nt (top_logprobs).
  if (tid == 0) so[5] = nt;
  if (nt > 0) {
    block_top_k(n, nt, [&](int i) { return f2key(x[i]); }, s);
    for (int j = tid; j < nt; j += bd) {
      const uint32_t idx = (uint32_t)s.sort[j];
      sf[SP_TV + j] = x[idx];
      so[SP_TI + j] = lo + idx;
    }
    __syncthreads();
  }
  // 3. Penalties.
  penalise();
  // 4. Processed logits x / T, computed on the fly (the raw values stay for the logprobs):
  //    (max, Σ exp) for sampled rows; greedy rows have T = 1.
  auto proc = [&](int i) { return greedy ? x[i] : __fdiv_rn(x[i], temp); };
  if (!greedy) max_sumexp(proc, sf);
  // 5. The part's top k candidates of the processed logits, with their raw values.
  if (tid == 0) so[4] = k;
  block_top_k(n, k, [&](int i) { return f2key(proc(i)); }, s);
  for (int j = tid; j < k; j += bd) {
    const uint32_t idx = (uint32_t)s.sort[j];
    sf[SP_PROC + j] = proc(idx);
    sf[SP_RAW + j] = raw_of(idx, x[idx]);
    so[SP_ID + j] = lo + idx;
  }
}

// (max, Σ exp) of the union of parts from their pairs at word `off` of each part's scratch:
// M = max m_c, S = Σ s_c e^{m_c − M} (f64); (−inf, 0) when every part is −inf.
__device__ void merge_pairs(const uint32_t* sc, int parts, int off, float* out) {
  float M = -INFINITY;
  for (int c = 0; c < parts; ++c) M = fmaxf(M, __uint_as_float(sc[(size_t)c * SP_WORDS + off]));
  double S = 0.0;
  if (M != -INFINITY)
    for (int c = 0; c < parts; ++c) {
      const float mc = __uint_as_float(sc[(size_t)c * SP_WORDS + off]);
      const float s = __uint_as_float(sc[(size_t)c * SP_WORDS + off + 1]);
      if (s > 0.f) S = __dadd_rn(S, __dmul_rn((double)s, exp((double)mc - (double)M)));
    }
  out[0] = M;
  out[1] = M == -INFINITY ? 0.f : (float)S;
}

// The top `want` entries of a row's parts (each part's list sorted, its f32 values at word
// `val` of its scratch, its length at word `len`), as candidate indices c · cap + j in
// s.sort[0 .. want); returns cap = min(want, widest part). Entries past a part's length are holes
// with the smallest key (below −inf), never picked while `want` real entries exist.
__device__ int merge_part_lists(const uint32_t* sc, int parts, int widest, int want, int len,
                                int val, TopKSmem& s) {
  const int cap = min(want, widest);
  block_top_k(
      parts * cap, want,
      [&](int i) {
        const int c = i / cap, j = i - c * cap;
        const uint32_t* q = sc + (size_t)c * SP_WORDS;
        return j < (int)q[len] ? f2key(__uint_as_float(q[val + j])) : 0u;
      },
      s);
  return cap;
}

// Stage 2, grid rows, block 1024: merges a row's parts (candidate lists in increasing id order,
// so equal values keep the lowest ids) into the rank's packed words, laid out as the host's
// `pack_row`: f = pm, ps, rm, rs, candidates' processed values, their raw values, raw top values;
// u = candidates' global ids, raw top ids (global ids = start + local index).
extern "C" __global__ void __launch_bounds__(1024) sample_prepare(
    const uint32_t* __restrict__ scratch, int W, int parts, int start,
    const uint32_t* __restrict__ rows, uint32_t* __restrict__ packed, int nf) {
  PDL_ENTRY();
  __shared__ TopKSmem s;
  const uint32_t* p = rows + (size_t)blockIdx.x * SR_WORDS;
  const int tid = threadIdx.x, bd = blockDim.x;
  const bool greedy = p[SR_FLAGS] & 1u, logprobs = p[SR_FLAGS] & 2u;
  const int k = p[SR_K], nt = p[SR_N];
  const uint32_t* sc = scratch + (size_t)blockIdx.x * parts * SP_WORDS;
  float* fo = reinterpret_cast<float*>(packed) + p[SR_F_OFF];
  uint32_t* uo = packed + nf + p[SR_U_OFF];
  const int widest = (W + parts - 1) / parts;
  if (tid == 0) {
    if (greedy) {
      fo[0] = 0.f;
      fo[1] = 0.f;
    } else {
      merge_pairs(sc, parts, 0, fo);
    }
    if (logprobs) {
      merge_pairs(sc, parts, 2, fo + 2);
    } else {
      fo[2] = 0.f;
      fo[3] = 0.f;
    }
  }
  // Candidates: the top k of the parts' lists of processed values; then the raw top nt.
  int cap = merge_part_lists(sc, parts, widest, k, 4, SP_PROC, s);
  for (int j = tid; j < k; j += bd) {
    const int i = (int)(uint32_t)s.sort[j], c = i / cap, e = i - c * cap;
    const uint32_t* q = sc + (size_t)c * SP_WORDS;
    fo[4 + j] = __uint_as_float(q[SP_PROC + e]);
    fo[4 + k + j] = __uint_as_float(q[SP_RAW + e]);
    uo[j] = start + q[SP_ID + e];
  }
  __syncthreads();
  if (nt > 0) {
    cap = merge_part_lists(sc, parts, widest, nt, 5, SP_TV, s);
    for (int j = tid; j < nt; j += bd) {
      const int i = (int)(uint32_t)s.sort[j], c = i / cap, e = i - c * cap;
      const uint32_t* q = sc + (size_t)c * SP_WORDS;
      fo[4 + 2 * k + j] = __uint_as_float(q[SP_TV + e]);
      uo[k + j] = start + q[SP_TI + e];
    }
  }
}

// The draw's uniform in [0, 1): SplitMix64 output number counter + 1 for `seed`, top 53 bits.
__device__ double sample_uniform(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + (counter + 1ull) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

// Global log-sum-exp from per-rank (max, sumexp) pairs at f[stride·r + 0/1]: M + ln Σ s_r e^{m_r − M}.
__device__ double merge_lse(const uint32_t* g, int world, int rank_words, int off) {
  double M = -INFINITY;
  for (int r = 0; r < world; ++r)
    M = fmax(M, (double)__uint_as_float(g[(size_t)r * rank_words + off]));
  if (!isfinite(M)) return M;
  double s = 0.0;
  for (int r = 0; r < world; ++r) {
    const float sr = __uint_as_float(g[(size_t)r * rank_words + off + 1]);
    const double mr = __uint_as_float(g[(size_t)r * rank_words + off]);
    if (sr > 0.f) s = __dadd_rn(s, __dmul_rn((double)sr, exp(mr - M)));
  }
  return M + log(s);
}

// Whether (va, ia) comes before (vb, ib): value descending, then id ascending.
__device__ __forceinline__ bool before(float va, uint32_t ia, float vb, uint32_t ib) {
  return va > vb || (va == vb && ia < ib);
}

// grid rows, block 1024. g: world blocks of rank_words words (each: nf f32 words, then u words).
// out: SO_WORDS words per row.
extern "C" __global__ void __launch_bounds__(1024) sample_finish(
    const uint32_t* __restrict__ g, int world, int rank_words, int nf,
    const uint32_t* __restrict__ rows, uint32_t* __restrict__ out) {
  PDL_ENTRY();
  __shared__ float cval[SAMPLE_MAX_K], craw[SAMPLE_MAX_K];
  __shared__ uint32_t cid[SAMPLE_MAX_K];
  __shared__ double prob[SAMPLE_MAX_K];
  __shared__ int pick_s;
  const uint32_t* p = rows + (size_t)blockIdx.x * SR_WORDS;
  const int tid = threadIdx.x, bd = blockDim.x;
  const bool greedy = p[SR_FLAGS] & 1u, logprobs = p[SR_FLAGS] & 2u;
  const int k = p[SR_K], nt = p[SR_N];
  const int fo = p[SR_F_OFF], uo = nf + p[SR_U_OFF];
  const int total = world * k;
  const int keep = min((int)p[SR_KEEP], total);
  // 1. Merge the ranks' sorted candidate lists: the merged position of candidate j of rank r is
  //    j plus, for every other rank, how many of its candidates come before it.
  for (int c = tid; c < total; c += bd) {
    const int r = c / k, j = c % k;
    const uint32_t* fr = g + (size_t)r * rank_words + fo;
    const float v = __uint_as_float(fr[4 + j]);
    const uint32_t id = g[(size_t)r * rank_words + uo + j];
    int pos = j;
    for (int q = 0; q < world && pos < keep; ++q) {
      if (q == r) continue;
      const uint32_t* fq = g + (size_t)q * rank_words + fo;
      const uint32_t* uq = g + (size_t)q * rank_words + uo;
      int lo = 0, hi = k;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (before(__uint_as_float(fq[4 + mid]), uq[mid], v, id))
          lo = mid + 1;
        else
          hi = mid;
      }
      pos += lo;
    }
    if (pos < keep) {
      cval[pos] = v;
      craw[pos] = __uint_as_float(fr[4 + k + j]);
      cid[pos] = id;
    }
  }
  __syncthreads();
  // 2. Probabilities over the full vocabulary (exact normaliser), filters, draw.
  if (!greedy) {
    const double lse = merge_lse(g, world, rank_words, fo);
    for (int i = tid; i < keep; i += bd) prob[i] = exp((double)cval[i] - lse);
  }
  __syncthreads();
  if (tid == 0) {
    int pick = 0;
    if (!greedy && keep > 0) {
      const uint32_t top_k = p[SR_TOP_K];
      const float top_p = __uint_as_float(p[SR_TOP_P]), min_p = __uint_as_float(p[SR_MIN_P]);
      int n = keep;
      if (top_k > 0) n = min(n, (int)top_k);
      if (top_p < 1.f) {
        const bool exact = top_k > 0 && (int)top_k <= keep;
        double basis = 1.0;
        if (exact) {
          basis = 0.0;
          for (int i = 0; i < n; ++i) basis += prob[i];
        }
        const double target = (double)top_p * basis;
        double cum = 0.0;
        for (int i = 0; i < n; ++i) {
          cum += prob[i];
          if (cum >= target) {
            n = i + 1;
            break;
          }
        }
      }
      if (min_p > 0.f) {
        const double thr = (double)min_p * prob[0];
        int c = 0;
        while (c < n && prob[c] >= thr) ++c;
        n = max(c, 1);
      }
      double tot = 0.0;
      for (int i = 0; i < n; ++i) tot += prob[i];
      if (isfinite(tot) && tot > 0.0) {
        const uint64_t seed = (uint64_t)p[SR_SEED] | ((uint64_t)p[SR_SEED + 1] << 32);
        const uint64_t ctr = (uint64_t)p[SR_COUNTER] | ((uint64_t)p[SR_COUNTER + 1] << 32);
        const double target = sample_uniform(seed, ctr) * tot;
        double cum = 0.0;
        pick = n - 1;
        for (int i = 0; i < n; ++i) {
          cum += prob[i];
          if (cum > target) {
            pick = i;
            break;
          }
        }
      }
    }
    pick_s = pick;
  }
  __syncthreads();
  // 3. The chosen token and, with logprobs, raw log-probabilities (merged raw normaliser and the
  //    ranks' raw top lists, merged by repeatedly taking the best head).
  if (tid == 0) {
    uint32_t* o = out + (size_t)blockIdx.x * SO_WORDS;
    const int pick = pick_s;
    o[0] = keep > 0 ? cid[pick] : 0xffffffffu;
    o[1] = __float_as_uint(0.f);
    o[2] = 0;
    if (logprobs && keep > 0) {
      const double rl = merge_lse(g, world, rank_words, fo + 2);
      o[1] = __float_as_uint((float)((double)craw[pick] - rl));
      const int n_keep = min((int)p[SR_N_KEEP], min(SO_TOP, world * nt));
      int head[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int t = 0; t < n_keep; ++t) {
        int best = -1;
        float bv = 0.f;
        uint32_t bi = 0;
        for (int r = 0; r < world && r < 8; ++r) {
          if (head[r] >= nt) continue;
          const float v = __uint_as_float(g[(size_t)r * rank_words + fo + 4 + 2 * k + head[r]]);
          const uint32_t id = g[(size_t)r * rank_words + uo + k + head[r]];
          if (best < 0 || before(v, id, bv, bi)) {
            best = r;
            bv = v;
            bi = id;
          }
        }
        if (best < 0) break;
        ++head[best];
        o[3 + 2 * t] = bi;
        o[4 + 2 * t] = __float_as_uint((float)((double)bv - rl));
        o[2] = t + 1;
      }
    }
  }
}
