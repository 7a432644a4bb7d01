// Sampling family: greedy arg-max and the vocab-parallel sampler (partial, prepare, finish).
// Part of the translation unit r4b.cu.
#include "common.cuh"

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

// ---------------------------------------------------------------------------------------------
// Structured output: a grammar's token mask on one rank's logits, in place, before sampling.
// `rows_bits` = n logits-row indices (u32), then n masks of `words` u32 each: bit j of word
// j / 32 of mask r allows local column j of logits row rows_bits[r]; every column whose bit is
// clear becomes -inf. logits f32 [_, width]. grid (ceil(width / 256), n), block 256. Runs after
// the forward (outside any CUDA graph: the masks change every step).
extern "C" __global__ void apply_token_mask(float* __restrict__ logits,
                                           const uint32_t* __restrict__ rows_bits, int n,
                                           int width, int words) {
  PDL_ENTRY();
  const int j = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
  if (j >= width || r >= n) return;
  const uint32_t row = rows_bits[r];
  const uint32_t w = rows_bits[n + (size_t)r * words + (j >> 5)];
  if (!((w >> (j & 31)) & 1u)) logits[(size_t)row * width + j] = -INFINITY;
}
