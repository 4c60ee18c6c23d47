// CUDA's kernel vocabulary on the simulator's runtime (runtime.h), for the CUDA-only kernels
// (kernels/chunked/, CUDA files). Included before the kernel's own header by `simulated_cuda()`.
//
// Every CUDA thread is a simulator lane; a block is a threadgroup and a warp a simdgroup, so
// `__syncthreads` is the threadgroup barrier and the warp-wide operations are simdgroup
// collectives: every lane of the warp must reach them, as on the GPU.
//   threadIdx, blockIdx, blockDim, gridDim   from the running lane
//   __shfl_up_sync / __shfl_xor_sync         simd_shuffle_up / simd_shuffle_xor
//   mma.sync m16n8k16 bf16, m16n8k8 tf32     `mma_bf16`, `mma_tf32`: one exchange of every lane's
//                                            fragments, then each lane forms its accumulator
//                                            elements from PTX's fragment layouts (float32 sums)
//   ldmatrix .x4 .trans                      `ldmatrix_x4_trans`: one exchange of row addresses
//   cp.async                                 per-lane queues that land at the wait (see below)
//   extern __shared__                        `dynamic_smem<T>()`: GDN_SIM_SMEM bytes per block,
//                                            filled with 0xff for each block so reads of unwritten
//                                            shared memory show
// Kernel arguments are plain pointers: each buffer sits between canary pads (sim/_core.py, _Guarded)
// and a write outside it is reported after the launch.
#pragma once

#include <cmath>
#include <cstring>
#include <unordered_map>
#include <vector>

#ifndef GDN_SIM_SMEM
#define GDN_SIM_SMEM 0
#endif

#define GDN_CUDA_SIM 1
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __shared__

typedef ::metal::bfloat16_t __nv_bfloat16;
typedef _Float16 __half;

struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half2 {
  __half x, y;
};

#define threadIdx (::metal_sim::cur_lane()->tpitg)
#define blockIdx (::metal_sim::cur_lane()->tgpig)
#define blockDim (::metal_sim::cur_lane()->dtptg)
#define gridDim (::metal_sim::cur_lane()->tgpg)

inline void __syncthreads() { threadgroup_barrier(mem_flags::mem_threadgroup); }
[[noreturn]] inline void __trap() { ::metal_sim::fail("__trap() reached"); }

template <class T>
inline T __shfl_up_sync(unsigned, T x, unsigned d) { return simd_shuffle_up(x, (ushort)d); }
template <class T>
inline T __shfl_xor_sync(unsigned, T x, int m) { return simd_shuffle_xor(x, (ushort)m); }

inline float __bfloat162float(__nv_bfloat16 x) { return float(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }
inline float __half2float(__half x) { return float(x); }
inline __half __float2half_rn(float x) { return __half(x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
inline float2 make_float2(float a, float b) { return float2(a, b); }

namespace cuda_sim {

// cvt.rna.tf32.f32: 10 mantissa bits, ties away from zero, as a float32 bit pattern.
inline unsigned tf32(float x) {
  unsigned u = __builtin_bit_cast(unsigned, x);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf, nan
  return (u + 0x1000u) & 0xffffe000u;
}

inline float bf16_half(unsigned reg, int hi) {
  return float(__nv_bfloat16::from_bits(static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu)));
}

struct Frags {
  unsigned a[4];
  unsigned b[2];
};

// d (16 x 8, this lane's 4 elements) += A (16 x K) B (K x 8); element i of d sits at row
// g + 8 (i >> 1), column 2 t + (i & 1), g = lane / 4, t = lane % 4.
template <int K, class FA, class FB>
inline void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], FA a_at, FB b_at) {
  Frags f;
  for (int i = 0; i < 4; ++i) f.a[i] = a[i];
  f.b[0] = b[0];
  f.b[1] = b[1];
  auto x = ::metal_sim::exchange(f, ::metal_sim::OP_MMA);
  if (x.mask != 0xffffffffu) ::metal_sim::fail("mma.sync reached by %u of 32 lanes", (unsigned)__builtin_popcount(x.mask));
  const int g = x.me >> 2, t = x.me & 3;
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i >> 1), n = 2 * t + (i & 1);
    float acc = d[i];
    for (int k = 0; k < K; ++k) acc += a_at(x, r, k) * b_at(x, k, n);
    d[i] = acc;
  }
}

// m16n8k16, bf16: A register j of lane 4 (r % 8) + (k % 8) / 2 holds row r for j & 1 == r / 8 and
// columns k for j >> 1 == k / 8 (low half even k); B register j of lane 4 n + (k % 8) / 2 holds k / 8 == j.
inline void mma_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  mma<16>(
      d, a, b,
      [](const auto& x, int r, int k) {
        return bf16_half(x.at(4 * (r % 8) + (k % 8) / 2).a[(r / 8) + 2 * (k / 8)], k & 1);
      },
      [](const auto& x, int k, int n) { return bf16_half(x.at(4 * n + (k % 8) / 2).b[k / 8], k & 1); });
}

// m16n8k8, tf32: A register j of lane 4 (r % 8) + k % 4 holds row r for j & 1 == r / 8 and column
// k for j >> 1 == k / 4; B register j of lane 4 n + k % 4 holds k / 4 == j.
inline void mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  mma<8>(
      d, a, b,
      [](const auto& x, int r, int k) {
        return __builtin_bit_cast(float, x.at(4 * (r % 8) + k % 4).a[(r / 8) + 2 * (k / 4)]);
      },
      [](const auto& x, int k, int n) { return __builtin_bit_cast(float, x.at(4 * n + k % 4).b[k / 4]); });
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lanes 8m..8m+7 give the rows of 8 x 8 matrix m;
// each lane receives, per matrix, the elements (2 (lane % 4), lane / 4) and (2 (lane % 4) + 1, lane / 4).
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* row) {
  auto x = ::metal_sim::exchange(row, ::metal_sim::OP_LDMATRIX);
  if (x.mask != 0xffffffffu) ::metal_sim::fail("ldmatrix reached by %u of 32 lanes", (unsigned)__builtin_popcount(x.mask));
  const int lane = x.me;
  for (int m = 0; m < 4; ++m) {
    const uint16_t* lo = static_cast<const uint16_t*>(x.at(8 * m + 2 * (lane % 4)));
    const uint16_t* hi = static_cast<const uint16_t*>(x.at(8 * m + 2 * (lane % 4) + 1));
    r[m] = unsigned(lo[lane / 4]) | (unsigned(hi[lane / 4]) << 16);
  }
}

// cp.async: each lane's copies wait in its own queue, grouped by commit, and land only when a
// wait_group / wait_all releases them: the latest the hardware may deliver them. A kernel that
// reads a copy's target before waiting for it reads the block's 0xff fill (NaN) instead.
struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;
};
struct CopyQueue {
  std::vector<PendingCopy> open;
  std::vector<std::vector<PendingCopy>> groups;
};
inline CopyQueue& copy_queue() {
  // Lanes of one block share an OS thread (runtime.h): one table per thread, emptied per block.
  static thread_local std::unordered_map<const void*, CopyQueue> queues;
  static thread_local uint64_t gen = 0;
  if (gen != ::metal_sim::t_tg_gen) {
    gen = ::metal_sim::t_tg_gen;
    queues.clear();
  }
  return queues[::metal_sim::cur_lane()];
}
inline void land(const std::vector<PendingCopy>& group) {
  for (const PendingCopy& c : group) {
    if (c.valid) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
  }
}
inline void cp_async16(void* dst, const void* src, bool valid) { copy_queue().open.push_back({dst, src, valid}); }
inline void cp_async_commit() {
  CopyQueue& q = copy_queue();
  q.groups.push_back(std::move(q.open));
  q.open.clear();
}
// Lands all but the `pending` most recently committed groups.
inline void cp_async_wait_group(int pending) {
  CopyQueue& q = copy_queue();
  while ((int)q.groups.size() > pending) {
    land(q.groups.front());
    q.groups.erase(q.groups.begin());
  }
}
inline void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait_group(0);
}

// One buffer per OS thread: a block runs on one OS thread from start to end (runtime.h).
template <class T>
inline T* dynamic_smem() {
  alignas(64) static thread_local unsigned char storage[GDN_SIM_SMEM > 0 ? GDN_SIM_SMEM : 1];
  static thread_local uint64_t gen = 0;
  if (gen != ::metal_sim::t_tg_gen) {
    gen = ::metal_sim::t_tg_gen;
    std::memset(storage, 0xff, sizeof(storage));
  }
  return reinterpret_cast<T*>(storage);
}

}  // namespace cuda_sim

#define GDN_EXTERN_SMEM(T, name) T* name = ::cuda_sim::dynamic_smem<T>()
