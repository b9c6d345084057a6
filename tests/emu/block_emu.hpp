// block_emu.hpp -- a host stand-in for ik::vendor that runs whole thread blocks of a kernel on the
// CPU (tests/test_decode_emulation.py), so a kernel's own source (kernels_src/*.cuh; the test
// rewrites only its shared-memory declarations into calls to emu::dynamic_smem/static_smem)
// executes with 32- or 64-lane warps, every copy path a target has, and block clusters.
//
// Each GPU thread is a coroutine (ucontext) with its own stack; one OS thread runs them in turn,
// switching only where a GPU thread could wait: a barrier (warp, block or cluster), a shuffle, or
// a spin on memory (a split-K counter). So a run is deterministic for a given seed,
// and a deadlock (every thread waiting, nothing in flight) is reported instead of hanging.
//
// What is modelled, and how adversarially:
//   shared memory   starts as 0xff bytes (NaN in fp16/bf16/fp32) for every block;
//   cp.async        (IK_HAS_ASYNC_COPY=1) copies are recorded per thread and performed only when
//                   cp_async_wait<N> retires their group: a read of a slot before its wait sees
//                   the stale bytes;
//   scheduling      every thread runs to its next wait in turn, but each warp of a block gets a
//                   random speed (runs in 1/1 to 1/8 of the passes), so warps drift apart as far
//                   as their barriers let them;
//   clusters        (EMU_CLUSTERS=1) the blocks of a cluster run together, each with its own
//                   shared memory; cluster_store writes the same offset in another block's;
//                   barrier.cluster is a split arrive/wait over every thread of the cluster.
// What is not: the weak memory model (every access here is sequentially consistent), timing, and
// the vendor intrinsics themselves (tests/emu/wave_emu.hpp says the same for shuffles).
// Blocks (or clusters) of a grid run one after another, in a seeded random order.
#pragma once
#include <math.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if !defined(IK_WARP_SIZE) || !defined(EMU_LANE_MASK_T) || !defined(EMU_ASYNC_COPY) || !defined(EMU_CLUSTERS)
#error "define IK_WARP_SIZE, EMU_LANE_MASK_T, EMU_ASYNC_COPY and EMU_CLUSTERS (0|1)"
#endif

#define IK_DEVICE inline
#define IK_HD inline
#define IK_RESTRICT
#define IK_VENDOR_NAME "emu"
#define IK_INFINITY INFINITY
#define __global__
#define __launch_bounds__(...)
#define __forceinline__

struct EmuDim3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct uint4 { unsigned int x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
inline float __log2f(float x) { return log2f(x); }
using std::max;
using std::min;

namespace emu {

struct Copy { void* dst; const void* src; int bytes = 16; };

struct Barrier {
  int expected = 0, count = 0;
  unsigned generation = 0;
};

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  EmuDim3 idx, block_idx;
  int block = 0;                  // which block of the running unit (a cluster's rank)
  unsigned cluster_arrived = 0;   // the cluster barrier's generation at this thread's last arrive
  bool cluster_pending = false;   // arrived, not yet waited
  bool done = false;
  std::deque<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                // cp.async copies not yet committed
};

inline std::vector<Thread> threads;
inline Thread* current = nullptr;
inline ucontext_t scheduler;
inline EmuDim3 grid_dim, block_dim;
inline int threads_per_block = 0;
inline std::vector<Barrier> warp_barriers;   // [block][warp]
inline std::vector<Barrier> block_barriers;  // [block]
inline Barrier cluster_barrier;
inline std::vector<float> warp_f;  // shuffle slots, one per thread of the unit
inline std::vector<int> warp_i;
inline std::vector<char> warp_p;
inline std::vector<float> matrix_a, matrix_b;  // matrix_emu.hpp: 16 slots per thread of the unit
inline std::vector<int> block_any_count;  // [block]
// Shared memory of each block of the unit: the dynamic part, and each static array by name.
constexpr size_t kDynamicSmemBytes = 256 * 1024;
inline std::vector<std::vector<unsigned char>> dynamic_smem_of;
inline std::vector<std::map<std::string, std::vector<unsigned char>>> static_smem_of;
inline std::mt19937_64 rng;
inline unsigned long long progress = 0;  // bumps whenever some thread could stop waiting

inline const char* error = nullptr;  // why the running block was abandoned

// From a GPU thread: abandons the block (its coroutines are never resumed) and returns to the
// scheduler, which reports `what`.
[[noreturn]] inline void fail(const char* what) {
  error = what;
  setcontext(&scheduler);
  std::abort();  // (unreachable)
}

inline void yield() { swapcontext(&current->ctx, &scheduler); }

inline void arrive_and_wait(Barrier& b) {
  const unsigned g = b.generation;
  ++progress;
  if (++b.count == b.expected) {
    b.count = 0;
    ++b.generation;
    ++progress;
    return;
  }
  while (b.generation == g) yield();
}

inline int tid() { return static_cast<int>(current->idx.x); }
inline int lane() { return tid() % IK_WARP_SIZE; }
inline int warps_per_block() { return (threads_per_block + IK_WARP_SIZE - 1) / IK_WARP_SIZE; }
inline Barrier& my_warp() { return warp_barriers[current->block * warps_per_block() + tid() / IK_WARP_SIZE]; }

template <class T>
T* slots(std::vector<T>& v) { return v.data() + current->block * threads_per_block + tid() / IK_WARP_SIZE * IK_WARP_SIZE; }
inline float* slots_of(float) { return slots(warp_f); }
// The calling wave's 16 slots per lane of `v` (matrix fragments).
inline float* wave_matrix_slots(std::vector<float>& v) { return v.data() + 16 * (slots(v) - v.data()); }
inline int* slots_of(int) { return slots(warp_i); }

// Every lane publishes v; the caller gets lane `src`'s value (two barrier phases, as wave_emu).
template <class T>
T exchange(T v, int src) {
  slots_of(v)[lane()] = v;
  arrive_and_wait(my_warp());
  T r = slots_of(v)[src];
  arrive_and_wait(my_warp());
  return r;
}
inline int xor_source(int mask, int width) {
  int l = lane(), src = l ^ mask;
  return src >= ((l + width) & ~(width - 1)) ? l : src;
}

inline void perform(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.src) memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
    else memset(c.dst, 0, static_cast<size_t>(c.bytes));
  }
}

inline void entry(unsigned int lo, unsigned int hi);
inline void (*block_body)() = nullptr;

// Runs the blocks `blocks` (one, or the blocks of a cluster) of `block_threads` threads each to
// completion, together; nullptr, or what went wrong.
inline const char* run_unit(const std::vector<EmuDim3>& blocks, int block_threads) {
  error = nullptr;
  threads_per_block = block_threads;
  const size_t nb = blocks.size(), n = nb * static_cast<size_t>(block_threads);
  threads.assign(n, Thread{});
  warp_barriers.assign(nb * static_cast<size_t>(warps_per_block()), Barrier{});
  for (auto& b : warp_barriers) b.expected = IK_WARP_SIZE;
  block_barriers.assign(nb, Barrier{});
  for (auto& b : block_barriers) b.expected = block_threads;
  cluster_barrier = Barrier{};
  cluster_barrier.expected = static_cast<int>(n);
  warp_f.assign(n, 0.f);
  warp_i.assign(n, 0);
  warp_p.assign(n, 0);
  matrix_a.assign(16 * n, 0.f);
  matrix_b.assign(16 * n, 0.f);
  block_any_count.assign(nb, 0);
  // uninitialized shared memory: NaN in every float type
  dynamic_smem_of.assign(nb, std::vector<unsigned char>(kDynamicSmemBytes, 0xff));
  static_smem_of.assign(nb, {});
  for (size_t t = 0; t < n; ++t) {
    Thread& th = threads[t];
    th.block = static_cast<int>(t / static_cast<size_t>(block_threads));
    th.idx.x = static_cast<unsigned int>(t % static_cast<size_t>(block_threads));
    th.block_idx = blocks[static_cast<size_t>(th.block)];
    th.stack.resize(128 * 1024);
    getcontext(&th.ctx);
    th.ctx.uc_stack.ss_sp = th.stack.data();
    th.ctx.uc_stack.ss_size = th.stack.size();
    th.ctx.uc_link = &scheduler;
    const uintptr_t self = reinterpret_cast<uintptr_t>(&th);
    makecontext(&th.ctx, reinterpret_cast<void (*)()>(entry), 2, static_cast<unsigned int>(self),
                static_cast<unsigned int>(static_cast<unsigned long long>(self) >> 32));
  }
  std::vector<char> skip(warp_barriers.size(), 0);
  std::vector<int> slowness(warp_barriers.size());  // a warp runs in 1 of `slowness` passes
  for (int& s : slowness) s = 1 << (rng() % 4);
  bool full_pass = true;  // a pass that runs every live thread (else some warps sit it out)
  for (;;) {
    bool alive = false;
    const unsigned long long before = progress;
    for (size_t w = 0; w < skip.size(); ++w) skip[w] = !full_pass && rng() % slowness[w] != 0;
    for (Thread& th : threads) {
      if (th.done) continue;
      alive = true;
      if (skip[static_cast<size_t>(th.block * warps_per_block()) + th.idx.x / IK_WARP_SIZE]) continue;
      current = &th;
      swapcontext(&scheduler, &th.ctx);
      current = nullptr;
      if (error) return error;
    }
    if (!alive) break;
    if (progress != before) {
      full_pass = false;
    } else if (!full_pass) {
      full_pass = true;  // nothing moved while some warps sat out: run everyone
    } else {  // a full pass with every thread waiting
      return "deadlock: every thread waits";
    }
  }
  for (const Thread& th : threads) {
    if (!th.groups.empty() || !th.open.empty()) return "a thread exited with cp.async copies never waited for";
  }
  return nullptr;
}

// Every block of `grid`, `cluster` consecutive blocks along x at a time (1: one block), the units
// in a seeded random order, each thread running `body`; nullptr or the first failure.
inline const char* run_grid(void (*body)(), EmuDim3 grid, int threads, int cluster, unsigned long long seed) {
  std::vector<std::vector<EmuDim3>> units;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; x += static_cast<unsigned>(cluster)) {
        units.emplace_back();
        for (int r = 0; r < cluster; ++r) units.back().push_back({x + static_cast<unsigned>(r), y, z});
      }
  rng.seed(seed);
  std::shuffle(units.begin(), units.end(), rng);
  grid_dim = grid;
  block_dim = {static_cast<unsigned>(threads), 1, 1};
  block_body = body;
  for (const auto& unit : units)
    if (const char* err = run_unit(unit, threads)) return err;
  return nullptr;
}

inline void entry(unsigned int lo, unsigned int hi) {
  Thread* th = reinterpret_cast<Thread*>(static_cast<uintptr_t>(lo) | (static_cast<uintptr_t>(hi) << 32));
  block_body();
  th->done = true;
  ++progress;
}

// The running thread's block's shared memory: its dynamic part, and its static array `name` of
// type A (e.g. float[4][16]); tests/emulation.py rewrites `__shared__` declarations into these.
template <class T>
T* dynamic_smem() { return reinterpret_cast<T*>(dynamic_smem_of[static_cast<size_t>(current->block)].data()); }
template <class A>
A* static_smem(const char* name) {
  auto& bytes = static_smem_of[static_cast<size_t>(current->block)][name];
  if (bytes.empty()) bytes.assign(sizeof(A) + 16, 0xff);
  void* p = bytes.data();
  size_t space = bytes.size();
  return static_cast<A*>(std::align(16, sizeof(A), p, space));
}

}  // namespace emu

#define threadIdx (emu::current->idx)
#define blockIdx (emu::current->block_idx)
#define gridDim (emu::grid_dim)
#define blockDim (emu::block_dim)

namespace ik {
namespace vendor {

// fp16 and bf16 storage: 16 raw bits; conversions through the host's _Float16 (IEEE binary16).
struct half_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };
using lane_mask_t = EMU_LANE_MASK_T;

inline float half_bits_to_float(unsigned short b) { _Float16 h; memcpy(&h, &b, 2); return static_cast<float>(h); }
inline unsigned short float_to_half_bits(float f) { _Float16 h = static_cast<_Float16>(f); unsigned short b; memcpy(&b, &h, 2); return b; }
inline float bf16_to_float(unsigned short b) { return __uint_as_float(static_cast<unsigned int>(b) << 16); }
inline unsigned short float_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<unsigned short>(u >> 16);
}

IK_DEVICE int lane_id() { return emu::lane(); }
IK_DEVICE float shfl_xor(float v, int mask, int width) { return emu::exchange(v, emu::xor_source(mask, width)); }
IK_DEVICE int shfl_xor(int v, int mask, int width) { return emu::exchange(v, emu::xor_source(mask, width)); }
IK_DEVICE float shfl(float v, int src, int width) { return emu::exchange(v, (emu::lane() & ~(width - 1)) + src); }
IK_DEVICE int shfl(int v, int src, int width) { return emu::exchange(v, (emu::lane() & ~(width - 1)) + src); }
IK_DEVICE lane_mask_t ballot(bool p) {
  emu::slots(emu::warp_p)[emu::lane()] = p;
  emu::arrive_and_wait(emu::my_warp());
  lane_mask_t m = 0;
  for (int i = 0; i < IK_WARP_SIZE; ++i) m |= static_cast<lane_mask_t>(emu::slots(emu::warp_p)[i] != 0) << i;
  emu::arrive_and_wait(emu::my_warp());
  return m;
}
IK_DEVICE void warp_sync() { emu::arrive_and_wait(emu::my_warp()); }
IK_DEVICE void block_sync() { emu::arrive_and_wait(emu::block_barriers[static_cast<size_t>(emu::current->block)]); }
IK_DEVICE bool block_any(bool p) {
  int& count = emu::block_any_count[static_cast<size_t>(emu::current->block)];
  if (p) ++count;
  block_sync();
  const bool r = count > 0;
  block_sync();
  if (threadIdx.x == 0) count = 0;
  block_sync();
  return r;
}
IK_DEVICE float exp2_fast(float x) { return exp2f(x); }

IK_DEVICE float half_to_float(half_t h) { return half_bits_to_float(h.bits); }
IK_DEVICE half_t float_to_half(float f) { return {float_to_half_bits(f)}; }
IK_DEVICE float2 half2_bits_to_float2(unsigned int u) {
  return {half_bits_to_float(static_cast<unsigned short>(u & 0xffffu)), half_bits_to_float(static_cast<unsigned short>(u >> 16))};
}
IK_DEVICE unsigned short half_bits(half_t h) { return h.bits; }
IK_DEVICE unsigned short bf16_bits(bf16_t h) { return h.bits; }
IK_DEVICE bf16_t bf16_from_bits(unsigned short b) { return {b}; }
IK_DEVICE unsigned short float_to_bf16_bits(float f) { return float_to_bf16(f); }
IK_DEVICE half_t half_from_bits(unsigned short b) { return {b}; }
// (INT4 helpers: the decode kernel does not use them; each element rounded as the dtype rounds.)
inline unsigned int map2(unsigned int a, unsigned int b, unsigned int c, bool bf, int op) {
  unsigned int r = 0;
  for (int h = 0; h < 2; ++h) {
    auto get = [&](unsigned int w) {
      unsigned short s = static_cast<unsigned short>(w >> (16 * h));
      return bf ? bf16_to_float(s) : half_bits_to_float(s);
    };
    auto round = [&](float f) { return bf ? bf16_to_float(float_to_bf16(f)) : half_bits_to_float(float_to_half_bits(f)); };
    float x = round(get(a) - get(b));
    if (op) x = round(x * get(c));
    r |= static_cast<unsigned int>(bf ? float_to_bf16(x) : float_to_half_bits(x)) << (16 * h);
  }
  return r;
}
IK_DEVICE unsigned int half2_sub_mul(unsigned int a, unsigned int z, unsigned int s) { return map2(a, z, s, false, 1); }
IK_DEVICE unsigned int half2_sub(unsigned int a, unsigned int z) { return map2(a, z, 0, false, 0); }
IK_DEVICE unsigned int half2_mul(unsigned int a, unsigned int b) { return map2(a, 0, b, false, 1); }  // a - 0 is a
IK_DEVICE unsigned int half2_fma(unsigned int a, unsigned int b, unsigned int c) {  // one rounding
  unsigned int r = 0;
  for (int h = 0; h < 2; ++h) {
    auto get = [&](unsigned int w) { return half_bits_to_float(static_cast<unsigned short>(w >> (16 * h))); };
    r |= static_cast<unsigned int>(float_to_half_bits(static_cast<float>(
             static_cast<double>(get(a)) * get(b) + get(c)))) << (16 * h);
  }
  return r;
}
IK_DEVICE unsigned int bf162_sub(unsigned int a, unsigned int z) { return map2(a, z, 0, true, 0); }
IK_DEVICE unsigned int bf162_sub_mul(unsigned int a, unsigned int z, unsigned int s) { return map2(a, z, s, true, 1); }

IK_DEVICE uint4 load16(const void* p) { uint4 v; memcpy(&v, p, 16); return v; }
IK_DEVICE uint4 load16_stream(const void* p) { return load16(p); }
IK_DEVICE void store16(void* p, uint4 v) { memcpy(p, &v, 16); }

IK_DEVICE void fence_device() {}
// A spin on a counter (`atomic_add(p, 0)` in a loop) must let the other threads run.
IK_DEVICE int atomic_add(int* p, int v) {
  const int old = *p;
  *p += v;
  if (v != 0) ++emu::progress;
  else emu::yield();
  return old;
}
IK_DEVICE float load_coherent(const float* p) { return *p; }
IK_DEVICE float4 load_coherent4(const float* p) { float4 v; memcpy(&v, p, 16); return v; }

#define IK_HAS_ASYNC_COPY EMU_ASYNC_COPY
IK_DEVICE void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
  if (!EMU_ASYNC_COPY) {
    store16(smem, valid ? load16(gmem) : make_uint4(0, 0, 0, 0));
    return;
  }
  emu::current->open.push_back({smem, valid ? gmem : nullptr});
}
IK_DEVICE void cp_async16(void* smem, const void* gmem) { cp_async16_zfill(smem, gmem, true); }
// 8 and 4 bytes (an INT8 KV cache's codes and scales), recorded and performed the same way.
inline void cp_async_n_zfill(void* smem, const void* gmem, bool valid, int bytes) {
  if (!EMU_ASYNC_COPY) {
    if (valid) memcpy(smem, gmem, static_cast<size_t>(bytes));
    else memset(smem, 0, static_cast<size_t>(bytes));
    return;
  }
  emu::current->open.push_back({smem, valid ? gmem : nullptr, bytes});
}
IK_DEVICE void cp_async8_zfill(void* smem, const void* gmem, bool valid) { cp_async_n_zfill(smem, gmem, valid, 8); }
IK_DEVICE void cp_async4_zfill(void* smem, const void* gmem, bool valid) { cp_async_n_zfill(smem, gmem, valid, 4); }
IK_DEVICE void cp_async_commit() {
  if (!EMU_ASYNC_COPY) return;
  emu::current->groups.push_back(std::move(emu::current->open));
  emu::current->open.clear();
}
template <int N>
IK_DEVICE void cp_async_wait() {
  if (!EMU_ASYNC_COPY) return;
  auto& g = emu::current->groups;
  while (static_cast<int>(g.size()) > N) {
    emu::perform(g.front());
    g.pop_front();
  }
}

#define IK_HAS_CLUSTERS EMU_CLUSTERS
#define IK_CLUSTER_DIMS(n)
// `smem` lies in this block's dynamic shared memory; the store goes to the same offset in block
// `rank`'s (the blocks of a running unit are the cluster's, rank = block).
IK_DEVICE void cluster_store(float* smem, unsigned int rank, float v) {
  if (!EMU_CLUSTERS) emu::fail("cluster_store on a target without clusters");
  auto& mine = emu::dynamic_smem_of[static_cast<size_t>(emu::current->block)];
  const auto off = reinterpret_cast<unsigned char*>(smem) - mine.data();
  if (off < 0 || static_cast<size_t>(off) + 4 > mine.size() || off % 4) emu::fail("cluster_store outside dynamic shared memory");
  if (rank >= emu::dynamic_smem_of.size()) emu::fail("cluster_store to a rank outside the cluster");
  memcpy(emu::dynamic_smem_of[rank].data() + off, &v, 4);
}
IK_DEVICE void cluster_arrive() {
  if (!EMU_CLUSTERS) emu::fail("cluster barrier on a target without clusters");
  emu::Thread& th = *emu::current;
  if (th.cluster_pending) emu::fail("cluster arrive twice without a wait");
  th.cluster_pending = true;
  th.cluster_arrived = emu::cluster_barrier.generation;
  ++emu::progress;
  if (++emu::cluster_barrier.count == emu::cluster_barrier.expected) {
    emu::cluster_barrier.count = 0;
    ++emu::cluster_barrier.generation;
  }
}
IK_DEVICE void cluster_arrive_relaxed() { cluster_arrive(); }
IK_DEVICE void cluster_wait() {
  emu::Thread& th = *emu::current;
  if (!th.cluster_pending) emu::fail("cluster wait without an arrive");
  while (emu::cluster_barrier.generation == th.cluster_arrived) emu::yield();
  th.cluster_pending = false;
}


}  // namespace vendor
}  // namespace ik
