// Attention family: paged decode attention (CUDA-core and tensor-core) with its combine step,
// the cuBLAS path's gather and row softmax, and the tensor-core prefill attention. Part of the
// translation unit r4b.cu.
#include "common.cuh"

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
