// r4b-serve CUDA kernels (sm_90). bf16 activations, f32 arithmetic.
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
#define PDL_WAIT() asm volatile("griddepcontrol.wait;\n" ::: "memory")
#define PDL_LAUNCH() asm volatile("griddepcontrol.launch_dependents;\n" :::)
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
// A CTA owns 64 query rows (16 per warp) of one q head and walks the keys in tiles of 64:
// S = Q·Kᵀ (f32), online softmax in base 2 (scale folded into one FFMA per score), O += bf16(P)·V,
// O / l at the end. K/V tiles come
// into shared memory with cp.async, two stages (tile j + 1 loads while tile j is used; dynamic
// shared memory: 2 · 2 · 64 · (HDP + 8) bf16). Keys come from a paged cache (block_table ≠ null:
// key → slot = block_table[key / bs]·bs + key % bs, row = slot) or a contiguous buffer (row =
// key); row `r` of kv head g is at base + r·kv_ld + g·HD. Causal: query row i (position
// ctx_base + i) sees keys 0 ..= ctx_base + i; else every key < nkeys. Head dims that are not a
// multiple of 16 are zero-padded in registers and shared memory (SigLIP: 72 → 80).
// grid (ceil(rows / 64), nq, batch), block 128; batch z offsets q/kv/out by z·(q_z, kv_z, out_z).
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
// Keys [key0, key0 + 64) of kv head `kvh` into smem rows of LDS bf16 (zeros past `limit` / HD).
// Paged: block b of the table is sbt[b − bt_base] when that is below FA_BT_SMEM, else bt[b].
template <int HD, int HDP, int LDS>
__device__ __forceinline__ void fa_load_tile(bf16* sm, const bf16* __restrict__ base, int kv_ld,
                                             int kvh, const int* sbt, int bt_base,
                                             const int* __restrict__ bt, int bs, int key0,
                                             int limit) {
  constexpr int CH = HDP / 8, VALID = HD / 8;
  for (int c = threadIdx.x; c < FA_KEYS * CH; c += blockDim.x) {
    const int r = c / CH, ch = c % CH, key = key0 + r;
    const bool ok = key < limit && ch < VALID;
    const bf16* src = base;
    if (ok) {
      size_t row = key;
      if (bt) {
        const int b = key / bs, sb = b - bt_base;
        row = (size_t)(sb < FA_BT_SMEM ? sbt[sb] : bt[b]) * bs + key % bs;
      }
      src = base + row * kv_ld + (size_t)kvh * HD + ch * 8;
    }
    cp_async16(smem_u32(sm + r * LDS + ch * 8), src, ok ? 16 : 0);
  }
}

template <int HD>
__device__ void flash_attn(const bf16* __restrict__ q, int q_ld, long long q_z,
                           const bf16* __restrict__ k, const bf16* __restrict__ v, int kv_ld,
                           long long kv_z, const int* __restrict__ bt, int bs,
                           bf16* __restrict__ out, int out_ld, long long out_z, int rows,
                           int ctx_base, int nkeys, int group, int causal, float scale_log2) {
  constexpr int HDP = (HD + 15) / 16 * 16;  // padded head dim
  constexpr int LDS = HDP + 8;              // smem row pitch: conflict-free ldmatrix
  constexpr int KC = HDP / 16;              // k-steps of Q·Kᵀ
  constexpr int NT = HDP / 8;               // n-tiles of O
  constexpr int TILE = FA_KEYS * LDS;
  // Two stages of (K, V) tiles: tile j + 1 loads while tile j is used.
  extern __shared__ __align__(16) unsigned char fa_smem[];
  bf16* const kv_sm = reinterpret_cast<bf16*>(fa_smem);
  __shared__ int sbt[FA_BT_SMEM];
  const int rb = gridDim.x - 1 - blockIdx.x;  // the longest (last) row blocks start first
  const int h = blockIdx.y, z = blockIdx.z, kvh = h / group;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r0 = rb * FA_ROWS;
  q += z * q_z;
  k += z * kv_z;
  v += z * kv_z;
  out += z * out_z;
  const int kmax = causal ? min(nkeys, ctx_base + r0 + FA_ROWS) : nkeys;
  const int tiles = (kmax + FA_KEYS - 1) / FA_KEYS;
  // Tiles below `full` need no mask: every key exists and every row of the CTA sees it.
  const int full = causal ? min(nkeys, ctx_base + r0 + 1) / FA_KEYS : nkeys / FA_KEYS;
  if (bt) {
    const int nb = min(FA_BT_SMEM, (kmax + bs - 1) / bs);
    for (int i = threadIdx.x; i < nb; i += blockDim.x) sbt[i] = bt[i];
    __syncthreads();
  }
  // Keys at or past kmax are masked for every row of the CTA: they load as zeros.
  auto load = [&](int j) {
    bf16* st = kv_sm + (j & 1) * 2 * TILE;
    fa_load_tile<HD, HDP, LDS>(st, k, kv_ld, kvh, sbt, 0, bt, bs, j * FA_KEYS, kmax);
    fa_load_tile<HD, HDP, LDS>(st + TILE, v, kv_ld, kvh, sbt, 0, bt, bs, j * FA_KEYS, kmax);
  };
  load(0);
  cp_commit();

  // This thread's rows of the warp's 16: g and g + 8.
  const int g = lane >> 2, qc = (lane & 3) * 2;
  const int qr = r0 + warp * 16 + g;
  uint32_t qf[KC][4];
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = qr + (i & 1) * 8, col = kc * 16 + qc + (i >> 1) * 8;
      qf[kc][i] = row < rows && col < HD
                      ? *reinterpret_cast<const uint32_t*>(q + (size_t)row * q_ld +
                                                           (size_t)h * HD + col)
                      : 0u;
    }
  }
  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int j = 0; j < tiles; ++j) {
    if (j + 1 < tiles) load(j + 1);
    cp_commit();
    cp_wait1();  // tile j is in (tile j + 1 may still be loading)
    __syncthreads();
    const bf16* ks = kv_sm + (j & 1) * 2 * TILE;
    const bf16* vs = ks + TILE;
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        ldsm_x4(b, smem_u32(ks + ((np * 2 + (lane >> 4)) * 8 + (lane & 7)) * LDS + kc * 16 +
                            ((lane >> 3) & 1) * 8));
        mma_bf16(s[np * 2], qf[kc], b[0], b[1]);
        mma_bf16(s[np * 2 + 1], qf[kc], b[2], b[3]);
      }
    }
    // Mask where needed, running max of the raw scores over the row (4 lanes share a row); the
    // scale (base 2) goes into one FFMA per score below.
    float mx[2] = {m[0], m[1]};
    if (j >= full) {
      const int kb = j * FA_KEYS + qc;
      const int qp0 = ctx_base + qr;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = kb + n * 8 + (e & 1);
          const bool ok = key < nkeys && (!causal || key <= qp0 + (e >> 1) * 8);
          if (!ok) s[n][e] = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      mx[0] = fmaxf(mx[0], fmaxf(s[n][0], s[n][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[n][2], s[n][3]));
    }
    float corr[2], ms[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      corr[r] = exp2f((m[r] - mx[r]) * scale_log2);  // 0 on the first tile (m = −∞)
      m[r] = mx[r];
      ms[r] = mx[r] * scale_log2;
      l[r] *= corr[r];
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      o[n][0] *= corr[0];
      o[n][1] *= corr[0];
      o[n][2] *= corr[1];
      o[n][3] *= corr[1];
    }
    uint32_t pa[4][4];  // P as A fragments: keys 16·c .. 16·c + 15
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const float p0 = exp2f(fmaf(s[n][0], scale_log2, -ms[0]));
      const float p1 = exp2f(fmaf(s[n][1], scale_log2, -ms[0]));
      const float p2 = exp2f(fmaf(s[n][2], scale_log2, -ms[1]));
      const float p3 = exp2f(fmaf(s[n][3], scale_log2, -ms[1]));
      l[0] += p0 + p1;
      l[1] += p2 + p3;
      pa[n >> 1][(n & 1) * 2] = pack_bf16(p0, p1);
      pa[n >> 1][(n & 1) * 2 + 1] = pack_bf16(p2, p3);
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldsm_x4_t(b, smem_u32(vs + (c * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDS +
                              (np * 2 + (lane >> 4)) * 8));
        mma_bf16(o[np * 2], pa[c], b[0], b[1]);
        mma_bf16(o[np * 2 + 1], pa[c], b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  // Row sums over the 4 lanes of a row, then O / l.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int col = n * 8 + qc;
    if (col >= HD) continue;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = qr + r * 8;
      if (row < rows)
        *reinterpret_cast<uint32_t*>(out + (size_t)row * out_ld + (size_t)h * HD + col) =
            pack_bf16(o[n][r * 2] * inv[r], o[n][r * 2 + 1] * inv[r]);
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
    bf16* st = kv_sm + (j & 1) * 2 * TILE;
    const int key0 = k0 + j * FA_KEYS;
    fa_load_tile<HD, HD, LDS>(st, k_cache, nkv * HD, kvh, sbt, bt_base, bt, bs, key0, k1);
    fa_load_tile<HD, HD, LDS>(st + TILE, v_cache, nkv * HD, kvh, sbt, bt_base, bt, bs, key0, k1);
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

#define FLASH_KERNEL(HD)                                                                         \
  extern "C" __global__ void __launch_bounds__(128, 3) flash_attn_hd##HD(                            \
      const bf16* q, int q_ld, long long q_z, const bf16* k, const bf16* v, int kv_ld,            \
      long long kv_z, const int* bt, int bs, bf16* out, int out_ld, long long out_z, int rows,    \
      int ctx_base, int nkeys, int group, int causal, float scale_log2) {                         \
    PDL_ENTRY();                                                                                 \
    flash_attn<HD>(q, q_ld, q_z, k, v, kv_ld, kv_z, bt, bs, out, out_ld, out_z, rows, ctx_base, \
                   nkeys, group, causal, scale_log2);                                             \
  }
FLASH_KERNEL(64)
FLASH_KERNEL(72)
FLASH_KERNEL(80)
FLASH_KERNEL(96)
FLASH_KERNEL(128)

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
