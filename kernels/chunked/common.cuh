// Chunked gated delta rule on NVIDIA tensor cores (mma.sync), for mx.fast.cuda_kernel: what
// every stage uses. Chunks of C = 64 tokens and the stages of the ops form (mlx_gdn/ops/chunked.py)
// and the Metal kernels, in these files:
//   kkt_solve.cuh  G = within-chunk cumulative log-decay, T = (I + A)^-1; the products
//                  A = strict_tril(diag(beta) K K^T * exp(G_i - G_j)) and Aqk = tril(Q K^T * exp(G_i - G_j))
//                  (diagonal included) run inside launch 1.
//   wy.cuh         launch 1 (`kkt_solve_wy`, one block per batch, value head, chunk; all chunks in
//                  parallel): gates, stage kkt_solve, then W = T diag(beta exp(G)) K, U = T diag(beta) V.
//   state.cuh      launch 2 (`state_output`, one block of 4 NH warps per batch, value head, slice of BV
//                  value rows; chunks in order): delta = U - W S^T, y = diag(exp(G)) Q S^T + Aqk delta
//                  (stage output, which needs the state entering its chunk),
//                  S <- exp(G_last) S + (delta * exp(G_last - G))^T K (stage state).
//   state_regs.cuh launch 2 with S in registers (`state_output_regs`).
//   backward.cuh   the backward (scalar gates; cuda/chunked_backward.py): stages state_backward
//                  (chunks last to first) and chunk_grads (every chunk in parallel), after launch 1
//                  and launch 2 with SAVE_EVERY = 1 are recomputed.
// Per-key gates (KEYGATE; launch bodies kkt_solve_wy_key.cu, state_output_key.cu) take the same
// stages with the decays per key column: see kkt_solve_wy in wy.cuh.
// Launchers concatenate gates.h, this file, then the stage files in that order (cuda/chunked.py, HEADERS).
// Masked and padding steps get log-decay 0 and beta 0, which makes them leave S alone;
// their y is written as 0. The state stays float32 throughout.
//
// EXACT = false: bf16 operands (m16n8k16), float32 accumulation.
// EXACT = true:  float32 operands as three tf32 products (big*big + big*small + small*big,
//                m16n8k8), which keeps float32 inputs at float32-level error.
#ifndef GDN_CHUNKED_COMMON_CUH
#define GDN_CHUNKED_COMMON_CUH

// GDN_CUDA_SIM: compiled on the CPU by mlx_gdn.sim.simulated_cuda() (mlx_gdn/sim/cuda_vocab.h
// provides the CUDA names); the PTX below then has CPU equivalents of the same semantics.
#ifndef GDN_CUDA_SIM
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define GDN_EXTERN_SMEM(T, name) extern __shared__ T name[]
#endif

namespace gdn_tc {

constexpr int C = 64;         // tokens per chunk
constexpr int NTHREADS = 128;

__device__ __forceinline__ float f32(float x) { return x; }
__device__ __forceinline__ float f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T cvt(float x);
template <>
__device__ __forceinline__ float cvt<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half cvt<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 cvt<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Operand type kept in shared memory and between the two launches.
template <bool EXACT>
struct Operand {
  using T = __nv_bfloat16;
};
template <>
struct Operand<true> {
  using T = float;
};

// Row stride (elements) of a [C][D] operand tile: padded so fragment loads spread over banks.
template <class T, int D>
struct Ld {
  static constexpr int value = D + (sizeof(T) == 4 ? 4 : 8);
};

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

__device__ __forceinline__ unsigned tf32(float x) {
#ifdef GDN_CUDA_SIM
  return cuda_sim::tf32(x);
#else
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#endif
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#ifdef GDN_CUDA_SIM
  cuda_sim::mma_bf16(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#ifdef GDN_CUDA_SIM
  cuda_sim::mma_tf32(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <class A, class B>
struct same_type {
  static constexpr bool value = false;
};
template <class A>
struct same_type<A, A> {
  static constexpr bool value = true;
};

// Operand views for warp_mma. An A operand is indexed (row, k), a B operand (k, col). A view
// gives one element as float (operator(), the tf32 path) and, for bf16 products, `pair`: the
// elements k and k + 1 packed as bf16 (low half first). Where k is the contiguous index of a
// bf16 tile the pair is one 32-bit shared load; elsewhere it is packed from two elements.
__device__ __forceinline__ unsigned pair_at(const __nv_bfloat16* p) { return *reinterpret_cast<const unsigned*>(p); }
__device__ __forceinline__ unsigned pair_at(const float* p) {
  const float2 v = *reinterpret_cast<const float2*>(p);
  return pack_bf16(v.x, v.y);
}
__device__ __forceinline__ unsigned pair_of(const __nv_bfloat16* lo, const __nv_bfloat16* hi) {
  return (unsigned)*reinterpret_cast<const unsigned short*>(lo) |
         ((unsigned)*reinterpret_cast<const unsigned short*>(hi) << 16);
}
__device__ __forceinline__ unsigned pair_of(const float* lo, const float* hi) { return pack_bf16(*lo, *hi); }

// B views with `ldm` true also give two adjacent 8-column tiles' fragments at once (`frag2`).
template <class ST>
struct ARows {  // A(r, k) = p[r * ld + k]
  const ST* p;
  int ld;
  __device__ __forceinline__ float operator()(int r, int k) const { return f32(p[r * ld + k]); }
  __device__ __forceinline__ unsigned pair(int r, int k) const { return pair_at(p + r * ld + k); }
};
template <class ST>
struct BCols {  // B(k, n) = p[n * ld + k]
  static constexpr bool ldm = false;
  const ST* p;
  int ld;
  __device__ __forceinline__ float operator()(int k, int n) const { return f32(p[n * ld + k]); }
  __device__ __forceinline__ unsigned pair(int k, int n) const { return pair_at(p + n * ld + k); }
};
template <class ST>
struct BRows {  // B(k, n) = p[k * ld + n]
  // bf16 tiles: one ldmatrix.trans brings 4 fragments (rows 16-byte aligned: ld, n multiples of 8).
  static constexpr bool ldm = same_type<ST, __nv_bfloat16>::value;
  const ST* p;
  int ld;
  __device__ __forceinline__ float operator()(int k, int n) const { return f32(p[k * ld + n]); }
  __device__ __forceinline__ unsigned pair(int k, int n) const { return pair_of(p + k * ld + n, p + (k + 1) * ld + n); }
  // r[0], r[1]: the B fragment of columns n0..n0+7 for k0..k0+15; r[2], r[3]: columns n0+8..n0+15.
  __device__ __forceinline__ void frag2(int k0, int n0, unsigned (&r)[4]) const {
    const int lane = threadIdx.x & 31, m = lane >> 3;
    const ST* row = p + (k0 + (m & 1) * 8 + (lane & 7)) * ld + n0 + (m >> 1) * 8;
#ifdef GDN_CUDA_SIM
    cuda_sim::ldmatrix_x4_trans(r, row);
#else
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
  }
};
template <class F>
struct AFn {  // A(r, k) = f(r, k)
  F f;
  __device__ __forceinline__ float operator()(int r, int k) const { return f(r, k); }
  __device__ __forceinline__ unsigned pair(int r, int k) const { return pack_bf16(f(r, k), f(r, k + 1)); }
};
template <class F>
struct BFn {  // B(k, n) = f(k, n)
  static constexpr bool ldm = false;
  F f;
  __device__ __forceinline__ float operator()(int k, int n) const { return f(k, n); }
  __device__ __forceinline__ unsigned pair(int k, int n) const { return pack_bf16(f(k, n), f(k + 1, n)); }
};
template <class F>
__device__ __forceinline__ AFn<F> a_fn(F f) { return AFn<F>{f}; }
template <class F>
__device__ __forceinline__ BFn<F> b_fn(F f) { return BFn<F>{f}; }

// acc[n] (n < NT, NT even) += A B over k0..k0+15 for the bf16 A fragments ra and a B view with
// `frag2` (two adjacent 8-column tiles per ldmatrix).
template <int NT, class FB>
__device__ __forceinline__ void mma_bf16_frag2(float (&acc)[NT][4], const unsigned (&ra)[4], const FB& b, int k0) {
  static_assert(NT % 2 == 0, "tiles come in pairs");
#pragma unroll
  for (int n = 0; n < NT; n += 2) {
    unsigned rb[4];
    b.frag2(k0, 8 * n, rb);
    const unsigned b0[2] = {rb[0], rb[1]}, b1[2] = {rb[2], rb[3]};
    mma_bf16(acc[n], ra, b0);
    mma_bf16(acc[n + 1], ra, b1);
  }
}

// One warp: acc[n] (16 x 8 tile n) += sum_k a(r, k) * b(k, 8n + c) for r < 16, k < K.
// Accumulator element i of tile n sits at row g + 8 (i >> 1), column 8n + 2t + (i & 1),
// with g = lane / 4, t = lane % 4 (PTX's m16n8 C layout).
template <bool EXACT, int K, int NT, class FA, class FB>
__device__ __forceinline__ void warp_mma(float (&acc)[NT][4], const FA& a, const FB& b) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll 2
  for (int k0 = 0; k0 < K; k0 += 16) {
    if constexpr (!EXACT) {
      const int ka = k0 + 2 * t;
      unsigned ra[4] = {a.pair(g, ka), a.pair(g + 8, ka), a.pair(g, ka + 8), a.pair(g + 8, ka + 8)};
      if constexpr (FB::ldm && NT % 2 == 0) {
        mma_bf16_frag2(acc, ra, b, k0);
      } else {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const int c = 8 * n + g;
          unsigned rb[2] = {b.pair(ka, c), b.pair(ka + 8, c)};
          mma_bf16(acc[n], ra, rb);
        }
      }
    } else {
#pragma unroll
      for (int kk = k0; kk < k0 + 16; kk += 8) {
        const float fa[4] = {a(g, kk + t), a(g + 8, kk + t), a(g, kk + t + 4), a(g + 8, kk + t + 4)};
        unsigned ab[4], as[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          ab[i] = tf32(fa[i]);
          as[i] = tf32(fa[i] - __uint_as_float(ab[i]));
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const int c = 8 * n + g;
          const float fb[2] = {b(kk + t, c), b(kk + t + 4, c)};
          unsigned bb[2], bs[2];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            bb[i] = tf32(fb[i]);
            bs[i] = tf32(fb[i] - __uint_as_float(bb[i]));
          }
          mma_tf32(acc[n], as, bb);
          mma_tf32(acc[n], ab, bs);
          mma_tf32(acc[n], ab, bb);
        }
      }
    }
  }
}

// Calls f(row, col, acc value) for every accumulator element a warp holds.
template <int NT, class F>
__device__ __forceinline__ void for_acc(float (&acc)[NT][4], F f) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) f(g + 8 * (i >> 1), 8 * n + 2 * t + (i & 1), acc[n][i]);
}

// Calls f(row, col, x0, x1) for each pair of adjacent accumulator elements (col even).
template <int NT, class F>
__device__ __forceinline__ void for_acc_pairs(float (&acc)[NT][4], F f) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    f(g, 8 * n + 2 * t, acc[n][0], acc[n][1]);
    f(g + 8, 8 * n + 2 * t, acc[n][2], acc[n][3]);
  }
}

// Stores two adjacent elements with one access (p even-aligned).
__device__ __forceinline__ void store_pair(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void store_pair(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
}

// 16-byte asynchronous copy global -> shared; with `valid` false the destination is zero-filled.
#ifdef GDN_CUDA_SIM
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) { cuda_sim::cp_async16(dst, src, valid); }
__device__ __forceinline__ void cp_async_wait_all() { cuda_sim::cp_async_wait_all(); }
__device__ __forceinline__ void cp_async_commit() { cuda_sim::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  cuda_sim::cp_async_wait_group(N);
}
#else
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// Copies C rows of D elements, row r from src + r * stride, into shared dst[r * LD + d] as ST;
// rows at or past `rows` become zeros. Same types go as 16-byte asynchronous copies, all in
// flight at once (rows start 16-byte aligned: D, LD and strides are multiples of 8 elements);
// the caller waits with cp_async_wait_all() and a barrier. Other types convert one by one.
template <int D, int LD, int NTH = NTHREADS, class ST, class SRC>
__device__ __forceinline__ void load_rows(ST* dst, const SRC* src, long stride, int rows, int tid) {
  if constexpr (same_type<ST, SRC>::value) {
    constexpr int V = 16 / (int)sizeof(ST), VPR = D / V, TOTAL = C * VPR;
    static_assert(D % V == 0 && (LD * sizeof(ST)) % 16 == 0, "rows must be whole 16-byte vectors");
#pragma unroll
    for (int it = 0; it < (TOTAL + NTH - 1) / NTH; ++it) {
      const int idx = tid + it * NTH;
      if (TOTAL % NTH == 0 || idx < TOTAL) {
        const int r = idx / VPR, cv = idx - r * VPR;
        const bool ok = r < rows;
        cp_async16(dst + r * LD + cv * V, ok ? src + r * stride + cv * V : src, ok);
      }
    }
  } else {
#pragma unroll 4
    for (int idx = tid; idx < C * D; idx += NTH) {
      const int r = idx / D, d = idx - r * D;
      const float x = r < rows ? f32(src[r * stride + d]) : 0.0f;
      dst[r * LD + d] = cvt<ST>(x);
    }
  }
}

// Bytes of dynamic shared memory this launch got: a launcher that asked for too little traps
// instead of writing past the end.
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
#ifdef GDN_CUDA_SIM
  return GDN_SIM_SMEM;
#else
  unsigned r;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
#endif
}


}  // namespace gdn_tc

#endif  // GDN_CHUNKED_COMMON_CUH
