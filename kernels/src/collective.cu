// Collective family: all-reduce (bf16 sum) and all-gather (u32) over CUDA IPC memory, for the
// ranks of one node, whether they share one GPU or sit on GPUs with peer access. NCCL's
// collectives (collective.rs) need no kernel of their own.
//
// Each rank owns one region, exported with cuIpcGetMemHandle and mapped by every peer:
//   [0, IPC_FLAG_BYTES)                          flags, u32: [barrier 2][block IPC_MAX_BLOCKS][from rank IPC_MAX_WORLD]
//   [IPC_FLAG_BYTES + p·stage, + stage)          staging buffer p ∈ {0, 1} (the parity of the call)
// and one private state pair (epoch of the last finished call, blocks done in this call).
// `bases` is a device array of the regions' addresses in rank order (the rank's own included).
//
// A call, on every rank in the same order with the same count (so the same grid):
// - epoch e = state.epoch + 1 (the same on every rank: they make the same calls), parity e & 1;
// - block b copies its part of the input into its own staging buffer, then raises flag [k][b][rank]
//   to e in every peer's region (release) and waits until every peer's flag [k][b][peer] in its
//   own region reaches e (acquire): block b of every rank has then written its part;
// - it reads the parts it needs from every rank's staging buffer (in rank order, summing in f32,
//   so every rank gets the same bits), and the last block to finish stores e as the epoch.
// Two staging buffers make one barrier per phase enough: a rank can only start writing buffer
// e & 1 again at call e + 2, after every peer has started call e + 1 (its barrier), and a peer
// starts call e + 1 only once its call e, which read buffer e & 1, has finished (stream order).
// Nothing waits forever: a barrier that waits longer than `timeout_ns` (a peer died or hangs)
// traps, which fails the context, so the host sees an error instead of a hang.
// No host synchronisation, no allocation, fixed addresses: the calls can be captured in a graph.

#define IPC_MAX_WORLD 8
#define IPC_MAX_BLOCKS 32
#define IPC_FLAG_BYTES 65536

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

// Flag [k][block][from] of the region at `base`.
__device__ __forceinline__ uint32_t* ipc_flag(uint64_t base, int k, int block, int from) {
  return reinterpret_cast<uint32_t*>(base) + (k * IPC_MAX_BLOCKS + block) * IPC_MAX_WORLD + from;
}
// Staging buffer p of the region at `base`.
__device__ __forceinline__ char* ipc_stage(uint64_t base, int p, long long stage_bytes) {
  return reinterpret_cast<char*>(base) + IPC_FLAG_BYTES + p * stage_bytes;
}

// Barrier k of this block with the same block of every rank, at epoch e.
__device__ void ipc_barrier(const uint64_t* bases, int rank, int world, int k, uint32_t e,
                            unsigned long long timeout_ns) {
  __syncthreads();
  const int t = threadIdx.x;
  if (t < world) {
    // Every write of this block before the barrier is visible to the peers before the flag.
    __threadfence_system();
    st_release_sys(ipc_flag(bases[t], k, blockIdx.x, rank), e);
    const uint32_t* mine = ipc_flag(bases[rank], k, blockIdx.x, t);
    const unsigned long long t0 = global_ns();
    while (static_cast<int32_t>(ld_acquire_sys(mine) - e) < 0) {
      if (global_ns() - t0 > timeout_ns) __trap();
    }
  }
  __syncthreads();
}

__device__ __forceinline__ uint32_t ipc_epoch_begin(const uint32_t* state) {
  return *reinterpret_cast<const volatile uint32_t*>(state) + 1u;
}
// The last block of the grid to get here stores the epoch (every block read the old one first).
__device__ __forceinline__ void ipc_epoch_end(uint32_t* state, uint32_t e) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&state[1], 1u) == gridDim.x - 1) {
      state[1] = 0;
      *reinterpret_cast<volatile uint32_t*>(state) = e;
      __threadfence();
    }
  }
}

// acc[0..8) += the 8 bf16 of v.
__device__ __forceinline__ void add8(float* acc, uint4 v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}
__device__ __forceinline__ uint4 pack8(const float* acc) {
  uint4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return v;
}
// The sum over ranks, in rank order, of unit u (8 bf16) of the staging buffers p.
__device__ __forceinline__ uint4 sum_unit(const uint64_t* bases, int world, int p,
                                          long long stage_bytes, long long u) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int r = 0; r < world; ++r)
    add8(acc, __ldcg(reinterpret_cast<const uint4*>(ipc_stage(bases[r], p, stage_bytes)) + u));
  return pack8(acc);
}
// The scalar tail (count % 8 values after the units), done by block 0 of every rank: copy before
// the barrier (copy = true), sum in rank order after it.
__device__ void tail(bf16* buf, long long units, int n, const uint64_t* bases, int rank, int world,
                     int p, long long stage_bytes, bool copy) {
  if (blockIdx.x != 0 || threadIdx.x >= n) return;
  const long long i = units * 8 + threadIdx.x;
  if (copy) {
    reinterpret_cast<bf16*>(ipc_stage(bases[rank], p, stage_bytes))[i] = buf[i];
    return;
  }
  float acc = 0.f;
  for (int r = 0; r < world; ++r)
    acc += b2f(__ldcg(reinterpret_cast<const bf16*>(ipc_stage(bases[r], p, stage_bytes)) + i));
  buf[i] = f2b(acc);
}

// In-place sum of `units`·8 + `rest` bf16 at `buf` over the group, one shot: every rank reads
// every rank's whole input (small messages: one barrier).
extern "C" __global__ void ipc_all_reduce_one_shot(bf16* buf, long long units, int rest,
                                                   const uint64_t* bases, uint32_t* state, int rank,
                                                   int world, long long stage_bytes,
                                                   unsigned long long timeout_ns) {
  PDL_ENTRY();
  const uint32_t e = ipc_epoch_begin(state);
  const int p = e & 1;
  const long long per = (units + gridDim.x - 1) / gridDim.x;
  const long long u0 = blockIdx.x * per, u1 = min(units, u0 + per);
  uint4* mine = reinterpret_cast<uint4*>(ipc_stage(bases[rank], p, stage_bytes));
  const uint4* in = reinterpret_cast<const uint4*>(buf);
  for (long long u = u0 + threadIdx.x; u < u1; u += blockDim.x) mine[u] = in[u];
  tail(buf, units, rest, bases, rank, world, p, stage_bytes, true);
  ipc_barrier(bases, rank, world, 0, e, timeout_ns);
  uint4* out = reinterpret_cast<uint4*>(buf);
  for (long long u = u0 + threadIdx.x; u < u1; u += blockDim.x)
    out[u] = sum_unit(bases, world, p, stage_bytes, u);
  tail(buf, units, rest, bases, rank, world, p, stage_bytes, false);
  ipc_epoch_end(state, e);
}

// The same sum in two shots (large messages): rank s reduces slice s of every rank's input into
// its own staging buffer (reduce-scatter), then every rank copies each slice from its owner
// (all-gather). Each value is summed by one rank only, so every rank gets its bits.
extern "C" __global__ void ipc_all_reduce_two_shot(bf16* buf, long long units, int rest,
                                                   const uint64_t* bases, uint32_t* state, int rank,
                                                   int world, long long stage_bytes,
                                                   unsigned long long timeout_ns) {
  PDL_ENTRY();
  const uint32_t e = ipc_epoch_begin(state);
  const int p = e & 1;
  // Slice s: units [s·S, (s+1)·S); block b owns [b·P, (b+1)·P) of every slice.
  const long long S = (units + world - 1) / world;
  const long long P = (S + gridDim.x - 1) / gridDim.x;
  uint4* mine = reinterpret_cast<uint4*>(ipc_stage(bases[rank], p, stage_bytes));
  uint4* io = reinterpret_cast<uint4*>(buf);
  for (int s = 0; s < world; ++s) {
    const long long u0 = s * S + blockIdx.x * P, u1 = min(min(units, (s + 1) * S), u0 + P);
    for (long long u = u0 + threadIdx.x; u < u1; u += blockDim.x) mine[u] = io[u];
  }
  tail(buf, units, rest, bases, rank, world, p, stage_bytes, true);
  ipc_barrier(bases, rank, world, 0, e, timeout_ns);
  {
    const long long u0 = rank * S + blockIdx.x * P, u1 = min(min(units, (rank + 1) * S), u0 + P);
    for (long long u = u0 + threadIdx.x; u < u1; u += blockDim.x) {
      const uint4 v = sum_unit(bases, world, p, stage_bytes, u);
      io[u] = v;
      // Peers read only their own slices of this buffer in this phase: overwriting ours with the
      // result is safe, and they copy it from here after barrier 1.
      mine[u] = v;
    }
  }
  tail(buf, units, rest, bases, rank, world, p, stage_bytes, false);
  ipc_barrier(bases, rank, world, 1, e, timeout_ns);
  for (int s = 0; s < world; ++s) {
    if (s == rank) continue;
    const uint4* theirs = reinterpret_cast<const uint4*>(ipc_stage(bases[s], p, stage_bytes));
    const long long u0 = s * S + blockIdx.x * P, u1 = min(min(units, (s + 1) * S), u0 + P);
    for (long long u = u0 + threadIdx.x; u < u1; u += blockDim.x) io[u] = __ldcg(theirs + u);
  }
  ipc_epoch_end(state, e);
}

// Gathers `count` u32 of every rank into `recv` (`world · count`, rank order).
extern "C" __global__ void ipc_all_gather_u32(const uint32_t* send, uint32_t* recv,
                                              long long count, const uint64_t* bases,
                                              uint32_t* state, int rank, int world,
                                              long long stage_bytes,
                                              unsigned long long timeout_ns) {
  PDL_ENTRY();
  const uint32_t e = ipc_epoch_begin(state);
  const int p = e & 1;
  const long long per = (count + gridDim.x - 1) / gridDim.x;
  const long long i0 = blockIdx.x * per, i1 = min(count, i0 + per);
  uint32_t* mine = reinterpret_cast<uint32_t*>(ipc_stage(bases[rank], p, stage_bytes));
  for (long long i = i0 + threadIdx.x; i < i1; i += blockDim.x) mine[i] = send[i];
  ipc_barrier(bases, rank, world, 0, e, timeout_ns);
  for (int r = 0; r < world; ++r) {
    const uint32_t* theirs = reinterpret_cast<const uint32_t*>(ipc_stage(bases[r], p, stage_bytes));
    for (long long i = i0 + threadIdx.x; i < i1; i += blockDim.x)
      recv[r * count + i] = __ldcg(theirs + i);
  }
  ipc_epoch_end(state, e);
}
