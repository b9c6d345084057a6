# Can one block per SM pull its share of a KV-cache stream faster through the bulk copy engine
# (cp.async.bulk + mbarrier, sm_90) than through per-thread cp.async? A stream-only question,
# asked before touching the decode kernel: each block streams its own contiguous chunk of K and of
# V (as a split of a group does) through a shared-memory ring, and xor-folds what lands so nothing
# is dead. Kernel time with a sleep ahead, median of 40, buffers rotated past the L2.
# Usage: python stream-bulk.py OUT.json
import ctypes, json, sys, torch
from ikport.backends.cuda import CudaBackend
from ikport.bench import harness

SRC = r"""
#include <cuda_runtime.h>
struct SArgs { const uint4* k; const uint4* v; long long chunk16; unsigned int* out; };

__device__ __forceinline__ unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

// The library's stream: every thread copies its own U 16-byte slots of K and of V a step.
template <int THREADS, int U, int STAGES>
__global__ void __launch_bounds__(THREADS) ring_cp(SArgs a) {
  extern __shared__ __align__(16) uint4 ring[];
  const long long n = a.chunk16, base = blockIdx.x * n;
  const uint4* k = a.k + base; const uint4* v = a.v + base;
  constexpr int STEP = THREADS * U;
  const int nsteps = (n + STEP - 1) / STEP;
  auto slot = [&](int s, int u, int kv) { return ring + ((s * U + u) * 2 + kv) * THREADS + threadIdx.x; };
  auto issue = [&](int i) {
    if (i < nsteps) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        long long idx = (long long)i * STEP + u * THREADS + threadIdx.x;
        int sz = idx < n ? 16 : 0;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(slot(i % STAGES, u, 0))), "l"(k + (idx < n ? idx : 0)), "r"(sz));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(slot(i % STAGES, u, 1))), "l"(v + (idx < n ? idx : 0)), "r"(sz));
      }
    }
    asm volatile("cp.async.commit_group;");
  };
  for (int i = 0; i < STAGES - 1; ++i) issue(i);
  unsigned acc = 0;
  for (int i = 0; i < nsteps; ++i) {
    issue(i + STAGES - 1);
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 1));
#pragma unroll
    for (int u = 0; u < U; ++u) {
      uint4 x = *slot(i % STAGES, u, 0), y = *slot(i % STAGES, u, 1);
      acc ^= x.x ^ x.y ^ x.z ^ x.w ^ y.x ^ y.y ^ y.z ^ y.w;
    }
  }
  if (acc == 0x9e3779b9u) a.out[0] = acc;
}

__device__ __forceinline__ void mbar_init(unsigned long long* b, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* b, int tx) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(b)), "r"(tx) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* b, int parity) {
  unsigned done = 0;
  do {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(smem_addr(b)), "r"(parity) : "memory");
  } while (!done);
}
template <bool EVICT_FIRST>
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, int bytes, unsigned long long* bar) {
  if (EVICT_FIRST) {
    unsigned long long pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                 ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(pol) : "memory");
  } else {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
  }
}

// A ring stage's barriers: `full` completes on one arrival plus the stage's bytes, `empty` on one
// arrival per warp.
template <int THREADS, int STAGES>
__device__ __forceinline__ void init_ring_barriers(unsigned long long* full, unsigned long long* empty) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) { mbar_init(&full[s], 1); mbar_init(&empty[s], THREADS / 32); }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
}

// The bulk copy engine: thread 0 issues one copy of K and one of V per step (STEP16 16-byte
// units each) onto the step's `full` barrier; every warp reads its slots, then arrives on the
// step's `empty` barrier, which thread 0 waits on before refilling the stage (STAGES ahead).
template <int THREADS, int STEP16, int STAGES, bool EVICT_FIRST>
__global__ void __launch_bounds__(THREADS) ring_bulk(SArgs a) {
  extern __shared__ __align__(128) uint4 ring[];
  __shared__ __align__(8) unsigned long long full[STAGES], empty[STAGES];
  const long long n = a.chunk16, base = blockIdx.x * n;
  const uint4* k = a.k + base; const uint4* v = a.v + base;
  const int nsteps = (n + STEP16 - 1) / STEP16;
  init_ring_barriers<THREADS, STAGES>(full, empty);
  auto issue = [&](int i) {
    if (i >= nsteps) return;
    const int s = i % STAGES;
    if (i >= STAGES) mbar_wait(&empty[s], ((i / STAGES) - 1) & 1);
    const long long off = (long long)i * STEP16;
    const int cnt = n - off < STEP16 ? int(n - off) : STEP16;
    mbar_expect_tx(&full[s], cnt * 32);
    bulk_copy<EVICT_FIRST>(ring + (s * 2 + 0) * STEP16, k + off, cnt * 16, &full[s]);
    bulk_copy<EVICT_FIRST>(ring + (s * 2 + 1) * STEP16, v + off, cnt * 16, &full[s]);
  };
  if (threadIdx.x == 0) for (int i = 0; i < STAGES; ++i) issue(i);
  unsigned acc = 0;
  for (int i = 0; i < nsteps; ++i) {
    const int s = i % STAGES;
    mbar_wait(&full[s], (i / STAGES) & 1);
    const long long off = (long long)i * STEP16;
    const int cnt = n - off < STEP16 ? int(n - off) : STEP16;
#pragma unroll
    for (int j = threadIdx.x; j < STEP16; j += THREADS) {
      if (j < cnt) {
        uint4 x = ring[(s * 2) * STEP16 + j], y = ring[(s * 2 + 1) * STEP16 + j];
        acc ^= x.x ^ x.y ^ x.z ^ x.w ^ y.x ^ y.y ^ y.z ^ y.w;
      }
    }
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbar_arrive(&empty[s]);
    if (threadIdx.x == 0) issue(i + STAGES);
  }
  if (acc == 0x9e3779b9u) a.out[0] = acc;
}

// The same ring filled by 32 copy lanes, each copying ROW16-unit rows (256 B at ROW16 = 16: one
// KV row at head_dim 128): what paged caches of small pages would issue.
template <int THREADS, int STEP16, int STAGES, int ROW16>
__global__ void __launch_bounds__(THREADS) ring_bulk_rows(SArgs a) {
  extern __shared__ __align__(128) uint4 ring[];
  __shared__ __align__(8) unsigned long long full[STAGES], empty[STAGES];
  const long long n = a.chunk16, base = blockIdx.x * n;
  const uint4* k = a.k + base; const uint4* v = a.v + base;
  const int nsteps = n / STEP16;  // (whole steps only)
  const int lane = threadIdx.x & 31;
  init_ring_barriers<THREADS, STAGES>(full, empty);
  auto issue = [&](int i) {  // warp 0
    if (i >= nsteps) return;
    const int s = i % STAGES;
    if (i >= STAGES) mbar_wait(&empty[s], ((i / STAGES) - 1) & 1);
    if (lane == 0) mbar_expect_tx(&full[s], STEP16 * 32);
    __syncwarp();
    const long long off = (long long)i * STEP16;
    for (int r = lane; r < STEP16 / ROW16; r += 32) {
      bulk_copy<false>(ring + (s * 2 + 0) * STEP16 + r * ROW16, k + off + r * ROW16, ROW16 * 16, &full[s]);
      bulk_copy<false>(ring + (s * 2 + 1) * STEP16 + r * ROW16, v + off + r * ROW16, ROW16 * 16, &full[s]);
    }
  };
  if (threadIdx.x < 32) for (int i = 0; i < STAGES; ++i) issue(i);
  unsigned acc = 0;
  for (int i = 0; i < nsteps; ++i) {
    const int s = i % STAGES;
    mbar_wait(&full[s], (i / STAGES) & 1);
#pragma unroll
    for (int j = threadIdx.x; j < STEP16; j += THREADS) {
      uint4 x = ring[(s * 2) * STEP16 + j], y = ring[(s * 2 + 1) * STEP16 + j];
      acc ^= x.x ^ x.y ^ x.z ^ x.w ^ y.x ^ y.y ^ y.z ^ y.w;
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
    if (threadIdx.x < 32) issue(i + STAGES);
  }
  if (acc == 0x9e3779b9u) a.out[0] = acc;
}

// A plain read of both tensors (the read floor's kernel), grid-stride.
__global__ void __launch_bounds__(512) readpass(SArgs a) {
  const long long n = a.chunk16;  // here: 16-byte units of each tensor in all
  unsigned acc = 0;
  long long stride = (long long)gridDim.x * blockDim.x, i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + stride < n; i += 2 * stride) {
    uint4 v0 = __ldcs(a.k + i), v1 = __ldcs(a.k + i + stride), v2 = __ldcs(a.v + i), v3 = __ldcs(a.v + i + stride);
    acc ^= v0.x ^ v0.y ^ v0.z ^ v0.w ^ v1.x ^ v1.y ^ v1.z ^ v1.w ^ v2.x ^ v2.y ^ v2.z ^ v2.w ^ v3.x ^ v3.y ^ v3.z ^ v3.w;
  }
  for (; i < n; i += stride) { uint4 v0 = __ldcs(a.k + i), v2 = __ldcs(a.v + i); acc ^= v0.x ^ v0.w ^ v2.x ^ v2.w; }
  if (acc == 0x9e3779b9u) a.out[0] = acc;
}
"""

class SArgs(ctypes.Structure):
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("chunk16", ctypes.c_int64), ("out", ctypes.c_void_p)]

# name: (kernel, threads, shared bytes)
KERNELS = {
    "cp-256x2-st4": ("ring_cp<256, 2, 4>", 256, 4 * 2 * 2 * 256 * 16),
    "cp-512x1-st4": ("ring_cp<512, 1, 4>", 512, 4 * 1 * 2 * 512 * 16),
    "cp-256x2-st8": ("ring_cp<256, 2, 8>", 256, 8 * 2 * 2 * 256 * 16),
    "bulk-128-8K-st4": ("ring_bulk<128, 512, 4, false>", 128, 4 * 2 * 512 * 16),
    "bulk-256-8K-st4": ("ring_bulk<256, 512, 4, false>", 256, 4 * 2 * 512 * 16),
    "bulk-256-8K-st8": ("ring_bulk<256, 512, 8, false>", 256, 8 * 2 * 512 * 16),
    "bulk-256-16K-st4": ("ring_bulk<256, 1024, 4, false>", 256, 4 * 2 * 1024 * 16),
    "bulk-256-4K-st8": ("ring_bulk<256, 256, 8, false>", 256, 8 * 2 * 256 * 16),
    "bulk-256-8K-st4-ef": ("ring_bulk<256, 512, 4, true>", 256, 4 * 2 * 512 * 16),
    "bulk-256-8K-st6": ("ring_bulk<256, 512, 6, false>", 256, 6 * 2 * 512 * 16),
    "bulkrow256B-256-8K-st4": ("ring_bulk_rows<256, 512, 4, 16>", 256, 4 * 2 * 512 * 16),
    "bulkrow4K-256-8K-st4": ("ring_bulk_rows<256, 512, 4, 256>", 256, 4 * 2 * 512 * 16),
    "bulkrow256B-512-16K-st2": ("ring_bulk_rows<512, 1024, 2, 16>", 512, 2 * 2 * 1024 * 16),
}

def main(out_path):
    be = CudaBackend()
    target = be.target_for(0)
    names = [k for k, _, _ in KERNELS.values()] + ["readpass"]
    src = SRC + "".join(f"template __global__ void {n}(SArgs);\n" for n in names if "<" in n)
    mod = be.compile(src, names, [], target)
    loaded = be.load(mod, 0)
    fns = {n: be.get_function(loaded, mod, n) for n in names}
    print("registers/spills:", {n: str(r) for n, r in mod.resources.items()}, flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(4, dtype=torch.int32, device="cuda")
    stream = lambda: torch.cuda.current_stream().cuda_stream
    res = {**harness.device_meta(), "command": " ".join(["python", *sys.argv]), "sms": sms,
           "method": "each block streams its own contiguous chunk of K and of V through a shared-memory ring; "
                     "kernel time (sleep ahead), median of 40, 3 rotated buffer sets", "us": {}}
    for total in (134_217_728, 1_073_741_824):  # D1's and D2's K+V bytes
        half = total // 2
        sets = 3 if total < 500e6 else 2
        bufs = [(torch.empty(half, dtype=torch.uint8, device="cuda").random_(),
                 torch.empty(half, dtype=torch.uint8, device="cuda").random_()) for _ in range(sets)]
        def timeit(fn, grid, threads, smem, chunk16):
            if smem > 48 * 1024:
                be.set_max_dynamic_shared(fn, smem)
            calls = [lambda b=b: be.launch(fn, (grid, 1, 1), (threads, 1, 1), smem,
                                            SArgs(b[0].data_ptr(), b[1].data_ptr(), chunk16, out.data_ptr()), stream())
                     for b in bufs]
            for i in range(6): calls[i % sets]()
            torch.cuda.synchronize()
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(40)]
            for i in range(40):
                torch.cuda._sleep(300000 if total < 500e6 else 1000000)
                ev[i][0].record(); calls[i % sets](); ev[i][1].record()
            torch.cuda.synchronize()
            return sorted(a.elapsed_time(b) * 1000 for a, b in ev)[20]
        label = f"{total >> 20}MiB"
        t = timeit(fns["readpass"], 4 * sms, 512, 0, half // 16)
        res["us"][f"{label} readpass grid={4 * sms}"] = round(t, 2)
        print(f"{label} readpass {t:.2f} us {total / t / 1e3:.0f} GB/s", flush=True)
        for grid in (64, 128, sms, 256, 2 * sms):
            for name, (kname, threads, smem) in KERNELS.items():
                if smem > 227 * 1024 or (grid > sms and smem > 113 * 1024):
                    continue
                chunk16 = half // 16 // grid // 1024 * 1024  # whole steps of every variant: the same bytes for all
                t = timeit(fns[kname], grid, threads, smem, chunk16)
                moved = 2 * chunk16 * 16 * grid
                res["us"][f"{label} {name} grid={grid}"] = round(t, 2)
                print(f"{label} {name:22s} grid={grid:4d} {t:8.2f} us {moved / t / 1e3:6.0f} GB/s", flush=True)
        del bufs
        torch.cuda.empty_cache()
    json.dump(res, open(out_path, "w"), indent=1)

if __name__ == "__main__":
    main(sys.argv[1])
