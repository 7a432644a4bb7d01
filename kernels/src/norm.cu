// Norm family: fused residual-add + RMSNorm, LayerNorm, and the Qwen3 attention prologue
// (q/k RMSNorm + RoPE + paged KV write) with its cos/sin table. Part of the translation unit
// r4b.cu.
#include "common.cuh"

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
