// Metal's kernel vocabulary for CUDA.
//
// Passed as `header=` to mx.fast.cuda_kernel so that kernel bodies written for
// mx.fast.metal_kernel compile unchanged under NVRTC. MLX places this text after its
// own includes (cuda_fp16.h, cuda_bf16.h, cooperative_groups.h) and before the kernel,
// whose body sits inside namespace mlx::core::cu.
//
// Launch rules a body relies on (the launcher's job, not this file's):
// - MLX-CUDA launches ceil(grid / threadgroup) blocks, so a grid that is not a multiple
//   of the threadgroup runs extra threads that Metal would not; launch specs keep grids
//   multiples of their threadgroups.
// - simd_* collectives use full-warp masks: every lane of the warp must reach them
//   (a body must not return early from some lanes before a collective).
// - Metal passes Python scalars as `constant T&`, CUDA as a pointer: bodies read sizes
//   from `*_shape` arrays, which index the same way on both.
#ifndef GDN_CUDA_PRELUDE_H
#define GDN_CUDA_PRELUDE_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef __nv_bfloat16 bfloat16_t;
typedef __nv_bfloat16 bfloat;
typedef __half half;

namespace mgdn_prelude {

__device__ __forceinline__ uint3 make_u3(unsigned x, unsigned y, unsigned z) {
  uint3 r;
  r.x = x;
  r.y = y;
  r.z = z;
  return r;
}
__device__ __forceinline__ uint3 tpig() {
  return make_u3(blockIdx.x * blockDim.x + threadIdx.x, blockIdx.y * blockDim.y + threadIdx.y,
                 blockIdx.z * blockDim.z + threadIdx.z);
}
__device__ __forceinline__ uint3 tptg() { return make_u3(threadIdx.x, threadIdx.y, threadIdx.z); }
__device__ __forceinline__ uint3 tgpig() { return make_u3(blockIdx.x, blockIdx.y, blockIdx.z); }
__device__ __forceinline__ uint3 tptg_size() { return make_u3(blockDim.x, blockDim.y, blockDim.z); }
__device__ __forceinline__ uint3 tgs_per_grid() { return make_u3(gridDim.x, gridDim.y, gridDim.z); }
__device__ __forceinline__ uint3 threads_grid() {
  return make_u3(gridDim.x * blockDim.x, gridDim.y * blockDim.y, gridDim.z * blockDim.z);
}
// Metal's flat index: x fastest, then y, then z.
__device__ __forceinline__ uint flat_tid() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ uint tg_threads() { return blockDim.x * blockDim.y * blockDim.z; }

}  // namespace mgdn_prelude

#define thread_position_in_grid (::mgdn_prelude::tpig())
#define thread_position_in_threadgroup (::mgdn_prelude::tptg())
#define threadgroup_position_in_grid (::mgdn_prelude::tgpig())
#define threads_per_threadgroup (::mgdn_prelude::tptg_size())
#define dispatch_threads_per_threadgroup (::mgdn_prelude::tptg_size())
#define threadgroups_per_grid (::mgdn_prelude::tgs_per_grid())
#define threads_per_grid (::mgdn_prelude::threads_grid())
#define grid_size (::mgdn_prelude::threads_grid())
#define thread_index_in_threadgroup (::mgdn_prelude::flat_tid())
#define thread_index_in_simdgroup (::mgdn_prelude::flat_tid() & 31u)
#define simdgroup_index_in_threadgroup (::mgdn_prelude::flat_tid() >> 5)
#define simdgroups_per_threadgroup ((::mgdn_prelude::tg_threads() + 31u) >> 5)
#define dispatch_simdgroups_per_threadgroup ((::mgdn_prelude::tg_threads() + 31u) >> 5)
#define thread_index_in_quadgroup (::mgdn_prelude::flat_tid() & 3u)
#define quadgroup_index_in_threadgroup (::mgdn_prelude::flat_tid() >> 2)
#define threads_per_simdgroup 32u
#define thread_execution_width 32u

// Barriers. Metal's flags choose which memory is ordered; __syncthreads orders both.
enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
__device__ __forceinline__ mem_flags operator|(mem_flags a, mem_flags b) {
  return static_cast<mem_flags>(static_cast<unsigned>(a) | static_cast<unsigned>(b));
}
__device__ __forceinline__ void threadgroup_barrier(mem_flags = mem_flags::mem_none) { __syncthreads(); }
__device__ __forceinline__ void simdgroup_barrier(mem_flags = mem_flags::mem_none) { __syncwarp(); }

// Scalar math in Metal's namespaces. Half types compute in float and round back.
namespace metal {

template <typename T>
struct mgdn_is_half_type {
  static constexpr bool value = false;
};
template <>
struct mgdn_is_half_type<__half> {
  static constexpr bool value = true;
};
template <>
struct mgdn_is_half_type<__nv_bfloat16> {
  static constexpr bool value = true;
};

#define MGDN_UNARY(NAME, FF, DF)                                                        \
  __device__ __forceinline__ float NAME(float x) { return FF(x); }                      \
  __device__ __forceinline__ double NAME(double x) { return DF(x); }                    \
  __device__ __forceinline__ __half NAME(__half x) { return __float2half(FF(__half2float(x))); } \
  __device__ __forceinline__ __nv_bfloat16 NAME(__nv_bfloat16 x) {                      \
    return __float2bfloat16(FF(__bfloat162float(x)));                                  \
  }

MGDN_UNARY(exp, expf, ::exp)
MGDN_UNARY(exp2, exp2f, ::exp2)
MGDN_UNARY(log, logf, ::log)
MGDN_UNARY(log2, log2f, ::log2)
MGDN_UNARY(log1p, log1pf, ::log1p)
MGDN_UNARY(sqrt, sqrtf, ::sqrt)
MGDN_UNARY(rsqrt, rsqrtf, ::rsqrt)
MGDN_UNARY(tanh, tanhf, ::tanh)
MGDN_UNARY(sin, sinf, ::sin)
MGDN_UNARY(cos, cosf, ::cos)
MGDN_UNARY(floor, floorf, ::floor)
MGDN_UNARY(ceil, ceilf, ::ceil)
MGDN_UNARY(abs, fabsf, ::fabs)
MGDN_UNARY(fabs, fabsf, ::fabs)
#undef MGDN_UNARY

__device__ __forceinline__ float fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ float pow(float a, float b) { return powf(a, b); }
__device__ __forceinline__ float precise_divide(float a, float b) { return a / b; }

template <typename T>
__device__ __forceinline__ T max(T a, T b) { return a > b ? a : b; }
template <typename T>
__device__ __forceinline__ T min(T a, T b) { return a < b ? a : b; }
template <typename T>
__device__ __forceinline__ T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T>
__device__ __forceinline__ T select(T a, T b, bool c) { return c ? b : a; }
__device__ __forceinline__ bool isnan(float x) { return ::isnan(x); }
__device__ __forceinline__ bool isinf(float x) { return ::isinf(x); }
__device__ __forceinline__ bool isfinite(float x) { return ::isfinite(x); }

template <typename To, typename From>
__device__ __forceinline__ To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To r;
  __builtin_memcpy(&r, &x, sizeof(To));
  return r;
}

// fast:: maps to the hardware approximations, precise:: to the IEEE versions.
namespace fast {
__device__ __forceinline__ float exp(float x) { return __expf(x); }
__device__ __forceinline__ float exp2(float x) { return exp2f(x); }
__device__ __forceinline__ float log(float x) { return __logf(x); }
__device__ __forceinline__ float log2(float x) { return __log2f(x); }
__device__ __forceinline__ float sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ float rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ float tanh(float x) { return tanhf(x); }
__device__ __forceinline__ float divide(float a, float b) { return __fdividef(a, b); }
template <typename T>
__device__ __forceinline__ T max(T a, T b) { return a > b ? a : b; }
template <typename T>
__device__ __forceinline__ T min(T a, T b) { return a < b ? a : b; }
}  // namespace fast

namespace precise {
__device__ __forceinline__ float exp(float x) { return expf(x); }
__device__ __forceinline__ float exp2(float x) { return exp2f(x); }
__device__ __forceinline__ float log(float x) { return logf(x); }
__device__ __forceinline__ float log1p(float x) { return log1pf(x); }
__device__ __forceinline__ float sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ float rsqrt(float x) { return 1.0f / sqrtf(x); }
__device__ __forceinline__ float tanh(float x) { return tanhf(x); }
__device__ __forceinline__ float divide(float a, float b) { return a / b; }
}  // namespace precise

}  // namespace metal

using metal::as_type;
using metal::clamp;
using metal::select;

// simd-group collectives on a full 32-lane warp. Half types go through the shuffles'
// own __half / __nv_bfloat16 overloads; sums and scans accumulate in the value's type.
namespace mgdn_prelude {
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T shfl_xor(T x, int m) { return __shfl_xor_sync(kFull, x, m); }
template <typename T>
__device__ __forceinline__ T shfl(T x, int lane) { return __shfl_sync(kFull, x, lane); }
template <typename T>
__device__ __forceinline__ T shfl_up(T x, unsigned d) { return __shfl_up_sync(kFull, x, d); }
template <typename T>
__device__ __forceinline__ T shfl_down(T x, unsigned d) { return __shfl_down_sync(kFull, x, d); }
}  // namespace mgdn_prelude

template <typename T>
__device__ __forceinline__ T simd_sum(T x) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) x = x + mgdn_prelude::shfl_xor(x, m);
  return x;
}
template <typename T>
__device__ __forceinline__ T simd_product(T x) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) x = x * mgdn_prelude::shfl_xor(x, m);
  return x;
}
template <typename T>
__device__ __forceinline__ T simd_max(T x) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) {
    T o = mgdn_prelude::shfl_xor(x, m);
    x = o > x ? o : x;
  }
  return x;
}
template <typename T>
__device__ __forceinline__ T simd_min(T x) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) {
    T o = mgdn_prelude::shfl_xor(x, m);
    x = o < x ? o : x;
  }
  return x;
}
template <typename T>
__device__ __forceinline__ T simd_shuffle_xor(T x, ushort m) { return mgdn_prelude::shfl_xor(x, m); }
template <typename T>
__device__ __forceinline__ T simd_shuffle(T x, ushort lane) { return mgdn_prelude::shfl(x, lane); }
template <typename T>
__device__ __forceinline__ T simd_broadcast(T x, ushort lane) { return mgdn_prelude::shfl(x, lane); }
template <typename T>
__device__ __forceinline__ T simd_broadcast_first(T x) { return mgdn_prelude::shfl(x, 0); }
template <typename T>
__device__ __forceinline__ T simd_shuffle_up(T x, ushort d) { return mgdn_prelude::shfl_up(x, d); }
template <typename T>
__device__ __forceinline__ T simd_shuffle_down(T x, ushort d) { return mgdn_prelude::shfl_down(x, d); }
template <typename T>
__device__ __forceinline__ T simd_prefix_inclusive_sum(T x) {
  const uint lane = mgdn_prelude::flat_tid() & 31u;
#pragma unroll
  for (unsigned d = 1; d < 32; d <<= 1) {
    T o = mgdn_prelude::shfl_up(x, d);
    if (lane >= d) x = x + o;
  }
  return x;
}
template <typename T>
__device__ __forceinline__ T simd_prefix_exclusive_sum(T x) {
  T inc = simd_prefix_inclusive_sum(x);
  T prev = mgdn_prelude::shfl_up(inc, 1u);
  return (mgdn_prelude::flat_tid() & 31u) == 0 ? T(0) : prev;
}
__device__ __forceinline__ bool simd_all(bool c) { return __all_sync(mgdn_prelude::kFull, c); }
__device__ __forceinline__ bool simd_any(bool c) { return __any_sync(mgdn_prelude::kFull, c); }
__device__ __forceinline__ unsigned simd_ballot(bool c) { return __ballot_sync(mgdn_prelude::kFull, c); }

// Address-space qualifiers: CUDA pointers are generic, so all but `threadgroup` vanish.
// `threadgroup T name[N];` declared in a body becomes one array per block, as in Metal.
// CUDA's own __device__ / __constant__ expand to __attribute__((device)) and
// __attribute__((constant)); they are respelled with the reserved attribute names so headers
// after this one (e.g. gates.h) can still use them.
#define device
#define constant
#define thread
#define threadgroup __shared__
#undef __device__
#define __device__ __attribute__((__device__))
#undef __constant__
#define __constant__ __attribute__((__constant__))

#endif  // GDN_CUDA_PRELUDE_H
