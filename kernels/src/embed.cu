// Embedding family: vocab-parallel token embedding gather, image-row scatter, row gather, and
// SigLIP's patch im2col and position add. Part of the translation unit r4b.cu.
#include "common.cuh"

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
