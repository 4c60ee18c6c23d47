// Chunked gated delta rule on NVIDIA tensor cores (mma.sync), for mx.fast.cuda_kernel.
//
// Two launches per call, chunks of C = 64 tokens:
//   prep  (one block per batch, value head, chunk; all chunks in parallel):
//         G = within-chunk cumulative log-decay, A = strict_tril(diag(beta) K K^T * exp(G_i - G_j)),
//         T = (I + A)^-1, W = T diag(beta exp(G)) K, U = T diag(beta) V,
//         Aqk = tril(Q K^T * exp(G_i - G_j)) (diagonal included).
//   state (one block of 4 NH warps per batch, value head, slice of BV value rows; chunks in order):
//         delta = U - W S^T, y = diag(exp(G)) Q S^T + Aqk delta,
//         S <- exp(G_last) S + (delta * exp(G_last - G))^T K.
// Masked and padding steps get log-decay 0 and beta 0, which makes them leave S alone;
// their y is written as 0. The state stays float32 throughout.
//
// EXACT = false: bf16 operands (m16n8k16), float32 accumulation.
// EXACT = true:  float32 operands as three tf32 products (big*big + big*small + small*big,
//                m16n8k8), which keeps float32 inputs at float32-level error.
// The gate math comes from gates.h, which launchers put before this header.
#ifndef GDN_CHUNKED_TC_CUH
#define GDN_CHUNKED_TC_CUH

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

// Inclusive prefix sum of x over the 64 threads 0..63 (two warps), via `scratch[2]`.
__device__ __forceinline__ float scan64(float x, int tid, float* scratch) {
  const int lane = tid & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const float o = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x += o;
  }
  if (lane == 31 && tid < 64) scratch[tid >> 5] = x;
  __syncthreads();
  if (tid >= 32 && tid < 64) x += scratch[0];
  return x;
}

// Shared memory (bytes) each launch needs; cuda.py mirrors these formulas.
template <int Dk, int Dv, bool EXACT>
__host__ __device__ constexpr int prep_smem() {
  using ST = typename Operand<EXACT>::T;
  constexpr int LK = Ld<ST, Dk>::value, LV = Ld<ST, Dv>::value;
  return (C * LK + C * (LK > LV ? LK : LV)) * (int)sizeof(ST) + (2 * C * (C + 4) + 3 * C + 8) * 4;
}

// Tiles T_ij with i - j = DIST of the blocked inverse below (sA holds M_ik = T_ii A_ik):
// T_ij = -sum_{k=j}^{i-1} M_ik T_kj. Each thread's elements are independent sums of a
// compile-time length, interleaved so that their loads and multiply-adds overlap.
template <int DIST, int LA>
__device__ __forceinline__ void solve_tiles(const float* sA, float* sT, int tid) {
  constexpr int BT = 16, PER = (4 - DIST) * BT * BT / NTHREADS;
  static_assert((4 - DIST) * BT * BT % NTHREADS == 0, "whole elements per thread");
  int arow[PER], tcol[PER], kk0[PER];
  float acc[PER];
#pragma unroll
  for (int q = 0; q < PER; ++q) {
    const int e = tid + q * NTHREADS, j = e / (BT * BT), r = (e / BT) % BT, c = e % BT;
    arow[q] = ((j + DIST) * BT + r) * LA;
    tcol[q] = j * BT + c;
    kk0[q] = j * BT;
    acc[q] = 0.0f;
  }
#pragma unroll
  for (int kk = 0; kk < DIST * BT; ++kk)
#pragma unroll
    for (int q = 0; q < PER; ++q) acc[q] = fmaf(sA[arow[q] + kk0[q] + kk], sT[(kk0[q] + kk) * LA + tcol[q]], acc[q]);
#pragma unroll
  for (int q = 0; q < PER; ++q) sT[arow[q] + tcol[q]] = -acc[q];
  __syncthreads();
}

// T = (I + A)^-1 for A strictly lower [C][LA] in shared memory (C = 64), into sT; sA is
// overwritten. Blocked in 16 x 16 tiles so that no thread runs a long dependent chain:
// diagonal tiles by forward substitution (one column per thread, 16 rows), then
// M_ik = T_ii A_ik for every tile below the diagonal, then tile diagonals d = 1, 2, 3 in order:
// T_ij = -sum_{k=j}^{i-1} M_ik T_kj. All 128 threads; ends with a barrier.
template <int LA>
__device__ __forceinline__ void invert_unit_lower(float* sA, float* sT, int tid) {
  constexpr int BT = 16;
  if (tid < 4 * BT) {
    const int d = tid / BT, c = tid % BT, o = d * BT;
    float x[BT];
#pragma unroll
    for (int i = 0; i < BT; ++i) {
      float acc = i == c ? 1.0f : 0.0f;
#pragma unroll
      for (int j = 0; j < i; ++j) acc = fmaf(-sA[(o + i) * LA + o + j], x[j], acc);
      x[i] = acc;
    }
#pragma unroll
    for (int i = 0; i < BT; ++i) sT[(o + i) * LA + o + c] = x[i];
  } else {
    // Tiles above the diagonal are zero.
    for (int e = tid - 4 * BT; e < 6 * BT * BT; e += NTHREADS - 4 * BT) {
      const int blk = e / (BT * BT), r = (e / BT) % BT, c = e % BT;
      const int bi = blk < 3 ? 0 : (blk < 5 ? 1 : 2), bj = blk < 3 ? blk + 1 : (blk < 5 ? blk - 1 : 3);
      sT[(bi * BT + r) * LA + bj * BT + c] = 0.0f;
    }
  }
  __syncthreads();
  // Tiles below the diagonal, (i, k) = (1,0) (2,0) (3,0) (2,1) (3,1) (3,2): M_ik = T_ii A_ik.
  constexpr int PER = 6 * BT * BT / NTHREADS;
  float m[PER];
#pragma unroll
  for (int q = 0; q < PER; ++q) {
    const int e = tid + q * NTHREADS, blk = e / (BT * BT), r = (e / BT) % BT, c = e % BT;
    const int bi = blk < 3 ? blk + 1 : (blk < 5 ? blk - 1 : 3), bk = blk < 3 ? 0 : (blk < 5 ? 1 : 2);
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < BT; ++j) acc = fmaf(sT[(bi * BT + r) * LA + bi * BT + j], sA[(bi * BT + j) * LA + bk * BT + c], acc);
    m[q] = acc;
  }
  __syncthreads();
#pragma unroll
  for (int q = 0; q < PER; ++q) {
    const int e = tid + q * NTHREADS, blk = e / (BT * BT), r = (e / BT) % BT, c = e % BT;
    const int bi = blk < 3 ? blk + 1 : (blk < 5 ? blk - 1 : 3), bk = blk < 3 ? 0 : (blk < 5 ? 1 : 2);
    sA[(bi * BT + r) * LA + bk * BT + c] = m[q];
  }
  __syncthreads();
  solve_tiles<1, LA>(sA, sT, tid);
  solve_tiles<2, LA>(sA, sT, tid);
  solve_tiles<3, LA>(sA, sT, tid);
}

// ---------------------------------------------------------------------------------------
// Launch 1: per (chunk, value head, batch) block.
// ---------------------------------------------------------------------------------------
template <int Dk, int Dv, bool EXACT, bool FUSED, bool MASKED, bool HAS_LB, bool NEG, class TI, class TGA, class TGB,
          class TAL, class TDB, class TLB, class TM, class OT>
__device__ void prep(const TI* q, const TI* k, const TI* v, const TGA* ga, const TGB* gb, const TAL* A_log,
                     const TDB* dt_bias, const TLB* lb, const TM* mask, int T, int Hk, int Hv, OT* W, OT* U, OT* Aqk,
                     float* Gout) {
  using ST = typename Operand<EXACT>::T;
  constexpr int LK = Ld<ST, Dk>::value, LV = Ld<ST, Dv>::value, LA = C + 4;
  constexpr int LX = LK > LV ? LK : LV;
  GDN_EXTERN_SMEM(float4, smem_prep);
  if (dynamic_smem_bytes() < (unsigned)prep_smem<Dk, Dv, EXACT>()) __trap();
  ST* sK = reinterpret_cast<ST*>(smem_prep);
  ST* sX = sK + C * LK;  // Q, later V
  float* sA = reinterpret_cast<float*>(sX + C * LX);
  float* sT = sA + C * LA;
  float* sG = sT + C * LA;
  float* sBeta = sG + C;  // beta: U = T diag(beta) V
  float* sBw = sBeta + C;  // beta exp(G): W = T diag(beta exp(G)) K
  float* scratch = sBw + C;

  const int tid = threadIdx.x, warp = tid >> 5;
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int NTc = gridDim.x, Tp = NTc * C;
  const int hk = h / (Hv / Hk);
  const int t0 = c * C;
  const int rows = min(C, T - t0);

  const long qrow = (long)Hk * Dk;
  const TI* kc = k + (((long)b * T + t0) * Hk + hk) * Dk;
  const TI* qc = q + (((long)b * T + t0) * Hk + hk) * Dk;
  load_rows<Dk, LK>(sK, kc, qrow, rows, tid);
  load_rows<Dk, LX>(sX, qc, qrow, rows, tid);
  cp_async_commit();

  // Gates: log-decay and beta per step; masked and padding steps are identity steps.
  float gl = 0.0f, beta = 0.0f;
  if (tid < C && tid < rows) {
    const long gi = ((long)b * T + t0 + tid) * Hv + h;
    bool live = true;
    if constexpr (MASKED) live = static_cast<bool>(mask[(long)b * T + t0 + tid]);
    if (live) {
      if constexpr (FUSED) {
        const float log_rate = f32(A_log[h]);
        gl = gdn_log_decay(f32(ga[gi]), expf(log_rate), log_rate, f32(dt_bias[h]), HAS_LB ? f32(lb[0]) : 0.0f, HAS_LB);
        beta = gdn_beta(f32(gb[gi]), NEG);
      } else {
        gl = gdn_log_gate(f32(ga[gi]));
        beta = f32(gb[gi]);
      }
    }
  }
  const float G = scan64(gl, tid, scratch);
  if (tid < C) {
    sG[tid] = G;
    sBeta[tid] = beta;
    sBw[tid] = beta * expf(G);
    Gout[((long)b * Hv + h) * Tp + t0 + tid] = G;
  }
  cp_async_wait_all();
  __syncthreads();

  // A (strictly lower, into shared) and Aqk (lower with diagonal, to global). Warp w: rows 16w..16w+15.
  {
    const int r0 = 16 * warp;
    float acc[8][4];
    zero(acc);
    warp_mma<EXACT, Dk>(acc, ARows<ST>{sK + r0 * LK, LK}, BCols<ST>{sK, LK});
    for_acc(acc, [&](int r, int j, float x) {
      const int i = r0 + r;
      sA[i * LA + j] = i > j ? sBeta[i] * x * expf(sG[i] - sG[j]) : 0.0f;
    });
    zero(acc);
    warp_mma<EXACT, Dk>(acc, ARows<ST>{sX + r0 * LX, LX}, BCols<ST>{sK, LK});
    OT* aq = Aqk + (((long)b * Hv + h) * NTc + c) * C * C;
    for_acc_pairs(acc, [&](int r, int j, float x0, float x1) {
      const int i = r0 + r;
      store_pair(aq + i * C + j, i >= j ? x0 * expf(sG[i] - sG[j]) : 0.0f,
                 i >= j + 1 ? x1 * expf(sG[i] - sG[j + 1]) : 0.0f);
    });
  }
  __syncthreads();  // Q no longer read: V takes its place while T is solved
  const TI* vc = v + (((long)b * T + t0) * Hv + h) * Dv;
  load_rows<Dv, LX>(sX, vc, (long)Hv * Dv, rows, tid);
  cp_async_commit();
  invert_unit_lower<LA>(sA, sT, tid);
  cp_async_wait_all();
  __syncthreads();

  // W = T diag(beta exp(G)) K, U = T diag(beta) V, in column blocks of 64.
  {
    const int r0 = 16 * warp;
    OT* Wc = W + (((long)b * Hv + h) * Tp + t0) * Dk;
    OT* Uc = U + (((long)b * Hv + h) * Tp + t0) * Dv;
    const auto tw = a_fn([&](int r, int kk) { return sT[(r0 + r) * LA + kk] * sBw[kk]; });
    const auto tu = a_fn([&](int r, int kk) { return sT[(r0 + r) * LA + kk] * sBeta[kk]; });
#pragma unroll 1
    for (int n0 = 0; n0 < Dk; n0 += 64) {
      float acc[8][4];
      zero(acc);
      warp_mma<EXACT, C>(acc, tw, BRows<ST>{sK + n0, LK});
      for_acc_pairs(acc, [&](int r, int j, float x0, float x1) { store_pair(Wc + (long)(r0 + r) * Dk + n0 + j, x0, x1); });
    }
#pragma unroll 1
    for (int n0 = 0; n0 < Dv; n0 += 64) {
      float acc[8][4];
      zero(acc);
      warp_mma<EXACT, C>(acc, tu, BRows<ST>{sX + n0, LX});
      for_acc_pairs(acc, [&](int r, int j, float x0, float x1) { store_pair(Uc + (long)(r0 + r) * Dv + n0 + j, x0, x1); });
    }
  }
}

template <int Dk, int BV, bool EXACT, bool SHARE_WQ>
__host__ __device__ constexpr int state_smem() {
  using ST = typename Operand<EXACT>::T;
  constexpr int LK = Ld<ST, Dk>::value;
  constexpr int LA = Ld<ST, C>::value, LU = Ld<ST, BV>::value;
  return BV * (Dk + 8) * 4 + (SHARE_WQ ? 2 : 3) * C * LK * (int)sizeof(ST) + C * (BV + 4) * 4 +
         (C * LA + C * LU) * (int)sizeof(ST) + 3 * C * 4;
}

// ---------------------------------------------------------------------------------------
// Launch 2: per (value slice, value head, batch) block; walks the chunks in order.
// ---------------------------------------------------------------------------------------
template <int Dk, int Dv, int BV, bool EXACT, bool MASKED, bool SHARE_WQ, int NH, class TI, class OT, class TM>
__device__ void state_pass(const TI* q, const TI* k, const OT* W, const OT* U, const OT* Aqk, const float* Gc,
                           const float* S0, const TM* mask, int T, int Hk, int Hv, TI* y, float* S_out) {
  using ST = typename Operand<EXACT>::T;
  static_assert(same_type<ST, OT>::value, "W, U, Aqk are stored in the operand type");
  constexpr int LK = Ld<ST, Dk>::value, LS = Dk + 8, LD = BV + 4, LA = Ld<ST, C>::value, LU = Ld<ST, BV>::value;
  // S rows are padded by 8 floats so that the 8-byte B-fragment loads of S^T meet no bank twice.
  constexpr int MT = BV / 16;
  // 4 NH warps: warp w takes token strip w % 4 and value columns [cv, cv + BV / NH), cv = (w / 4) BV / NH.
  constexpr int NW = 4 * NH, NTH = 32 * NW, BVW = BV / NH;
  // S-update work: MT row strips x NB column blocks of UN columns, narrower when that keeps
  // every warp busy.
  constexpr int UN = MT * (Dk / 64) >= NW ? 64 : 32, NB = Dk / UN;
  static_assert(BV % 16 == 0 && Dk % 64 == 0 && BVW % 8 == 0, "BV multiple of 16 (8 per warp), Dk multiple of 64");
  GDN_EXTERN_SMEM(float4, smem_state);
  if (dynamic_smem_bytes() < (unsigned)state_smem<Dk, BV, EXACT, SHARE_WQ>()) __trap();
  float* sS = reinterpret_cast<float*>(smem_state);  // [BV][LS]
  ST* sK = reinterpret_cast<ST*>(sS + BV * LS);       // [C][LK]
  ST* sW = sK + C * LK;
  ST* sQ = SHARE_WQ ? sW : sW + C * LK;
  float* sD = reinterpret_cast<float*>(sQ + C * LK);  // delta [C][LD]
  ST* sA = reinterpret_cast<ST*>(sD + C * LD);        // Aqk [C][LA]
  ST* sU = sA + C * LA;                               // U slice [C][LU]
  float* sG = reinterpret_cast<float*>(sU + C * LU);
  float* sE = sG + C;
  float* sM = sE + C;

  const int tid = threadIdx.x, warp = tid >> 5;
  const int v0 = blockIdx.x * BV, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (Hv / Hk);
  const int NTc = (T + C - 1) / C, Tp = NTc * C;
  const long bh = (long)b * Hv + h;

  for (int idx = tid; idx < BV * Dk; idx += NTH) {
    const int r = idx / Dk, d = idx - r * Dk;
    sS[r * LS + d] = S0[(bh * Dv + v0 + r) * Dk + d];
  }

  const long qrow = (long)Hk * Dk;
  // Loads run one phase ahead of their use, as two groups of asynchronous copies:
  // W, Q, U slice and G of chunk c+1 are issued once chunk c no longer reads them (mid-step),
  // K and Aqk of chunk c at the top of step c, landing while delta and Q S^T are computed.
  auto issue_wqug = [&](int cc) {
    const int tn = cc * C, rn = min(C, T - tn);
    load_rows<Dk, LK, NTH>(sW, W + (bh * Tp + tn) * Dk, Dk, C, tid);
    if constexpr (!SHARE_WQ) load_rows<Dk, LK, NTH>(sQ, q + (((long)b * T + tn) * Hk + hk) * Dk, qrow, rn, tid);
    load_rows<BV, LU, NTH>(sU, U + (bh * Tp + tn) * Dv + v0, Dv, C, tid);
    if (tid < C / 4) cp_async16(sG + 4 * tid, Gc + bh * Tp + tn + 4 * tid, true);
    cp_async_commit();
  };
  auto issue_ka = [&](int cc) {
    const int tn = cc * C, rn = min(C, T - tn);
    load_rows<Dk, LK, NTH>(sK, k + (((long)b * T + tn) * Hk + hk) * Dk, qrow, rn, tid);
    load_rows<C, LA, NTH>(sA, Aqk + (bh * NTc + cc) * C * C, C, C, tid);
    cp_async_commit();
  };
  auto live_of = [&](int cc) {
    const int tn = cc * C, rn = min(C, T - tn);
    bool live = tid < rn;
    if constexpr (MASKED) live = live && static_cast<bool>(mask[(long)b * T + tn + min(tid, rn - 1)]);
    return live ? 1.0f : 0.0f;
  };

  issue_wqug(0);
  float mlive = tid < C ? live_of(0) : 0.0f;
#pragma unroll 1
  for (int c = 0; c < NTc; ++c) {
    const int t0 = c * C, rows = min(C, T - t0);
    __syncthreads();  // previous step done with sK, sA, sD, sE, sM; its S update written
    issue_ka(c);
    if (tid < C) sM[tid] = mlive;
    cp_async_wait_group<1>();  // W, Q, U, G of chunk c
    __syncthreads();
    const int r0 = 16 * (warp & 3), cv = (warp >> 2) * BVW;
    const float Gl = sG[C - 1];
    if (tid < C) sE[tid] = expf(Gl - sG[tid]);
    const int g8 = (tid & 31) >> 2;
    const float e0 = expf(sG[r0 + g8]), e1 = expf(sG[r0 + g8 + 8]);

    // delta = U - W S^T (rows r0.., columns cv..)
    float dl[BVW / 8][4];
    zero(dl);
    warp_mma<EXACT, Dk>(dl, ARows<ST>{sW + r0 * LK, LK}, BCols<float>{sS + cv * LS, LS});
    for_acc(dl, [&](int r, int j, float x) { sD[(r0 + r) * LD + cv + j] = f32(sU[(r0 + r) * LU + cv + j]) - x; });
    if constexpr (SHARE_WQ) {
      __syncthreads();  // every warp done with W, which Q replaces
      load_rows<Dk, LK, NTH>(sQ, q + (((long)b * T + t0) * Hk + hk) * Dk, qrow, rows, tid);
      cp_async_commit();
      cp_async_wait_group<0>();
      __syncthreads();
    }
    // y = diag(exp(G)) Q S^T + Aqk delta
    float yo[BVW / 8][4];
    zero(yo);
    warp_mma<EXACT, Dk>(yo, ARows<ST>{sQ + r0 * LK, LK}, BCols<float>{sS + cv * LS, LS});
#pragma unroll
    for (int n = 0; n < BVW / 8; ++n) {
      yo[n][0] *= e0;
      yo[n][1] *= e0;
      yo[n][2] *= e1;
      yo[n][3] *= e1;
    }
    __syncthreads();  // delta complete; W, Q, U, G and S no longer read this step
    if (c + 1 < NTc) {
      issue_wqug(c + 1);
      if (tid < C) mlive = live_of(c + 1);
    } else {
      cp_async_commit();  // an empty group keeps the wait counts uniform
    }
    cp_async_wait_group<1>();  // K, Aqk of chunk c
    __syncthreads();
    warp_mma<EXACT, C>(yo, ARows<ST>{sA + r0 * LA, LA}, BRows<float>{sD + cv, LD});
    TI* yc = y + (((long)b * T + t0) * Hv + h) * Dv + v0 + cv;
    for_acc_pairs(yo, [&](int r, int j, float x0, float x1) {
      const int i = r0 + r;
      const bool on = sM[i] != 0.0f;
      if (i < rows) store_pair(yc + (long)i * Hv * Dv + j, on ? x0 : 0.0f, on ? x1 : 0.0f);
    });

    // S <- exp(G_last) S + (delta * exp(G_last - G))^T K
    const float eG = expf(Gl);
#pragma unroll 1
    for (int item = warp; item < MT * NB; item += NW) {
      const int m0 = 16 * (item % MT), n0 = UN * (item / MT);
      float acc[UN / 8][4];
      for_acc(acc, [&](int r, int j, float& x) { x = eG * sS[(m0 + r) * LS + n0 + j]; });
      warp_mma<EXACT, C>(acc, a_fn([&](int r, int kk) { return sD[kk * LD + m0 + r] * sE[kk]; }),
                         BRows<ST>{sK + n0, LK});
      for_acc(acc, [&](int r, int j, float x) { sS[(m0 + r) * LS + n0 + j] = x; });
    }
  }
  __syncthreads();
  for (int idx = tid; idx < BV * Dk; idx += NTH) {
    const int r = idx / Dk, d = idx - r * Dk;
    S_out[(bh * Dv + v0 + r) * Dk + d] = sS[r * LS + d];
  }
}

// ---------------------------------------------------------------------------------------
// Launch 2, state in registers (bf16 operands; Dk <= 128): per (value slice, value head, batch)
// block of NW warps; warp w owns value rows v0 + 16 w .. + 15 for the whole call.
//
// Everything is computed transposed (value rows as the mma's M), so the warp's S rows, held in
// the accumulator layout, are also the A operand of every product that reads S (an accumulator
// tile (rows g, g + 8; columns 2t, 2t + 1) is an A fragment's half): no shared copy of S, and
// no barrier between the warps inside a step.
//   delta^T = U^T - S W^T,  y^T = (S Q^T) diag(exp(G)) + delta^T Aqk^T,
//   S <- exp(G_last) S + delta^T diag(exp(G_last - G)) K.
// Chunk loads (W, Q, K, Aqk, U slice, G) are double-buffered: chunk c + 1 lands during step c.
// ---------------------------------------------------------------------------------------
template <int Dk, int BV>
__host__ __device__ constexpr int state_regs_stage() {
  using ST = __nv_bfloat16;
  constexpr int LK = Ld<ST, Dk>::value, LA = Ld<ST, C>::value, LU = Ld<ST, BV>::value;
  return (3 * C * LK + C * LA + C * LU) * (int)sizeof(ST) + C * 4;
}
template <int Dk, int BV>
__host__ __device__ constexpr int state_regs_smem() {
  return 2 * state_regs_stage<Dk, BV>();
}

// The A fragments (k block k16) of a 16 x K matrix held as K / 8 accumulator tiles, as bf16.
template <int KT>
__device__ __forceinline__ void acc_a_frag(const float (&x)[KT][4], int k16, unsigned (&ra)[4]) {
  ra[0] = pack_bf16(x[2 * k16][0], x[2 * k16][1]);
  ra[1] = pack_bf16(x[2 * k16][2], x[2 * k16][3]);
  ra[2] = pack_bf16(x[2 * k16 + 1][0], x[2 * k16 + 1][1]);
  ra[3] = pack_bf16(x[2 * k16 + 1][2], x[2 * k16 + 1][3]);
}

// acc[n] (16 x 8 tile n, n < NT) += X B for X a 16 x K register matrix (K / 8 accumulator tiles)
// and B(k, 8n + j) = p[(8n + j) * ld + k] (bf16 rows of length >= K in shared memory).
template <int K, int NT>
__device__ __forceinline__ void mma_regs_cols(float (&acc)[NT][4], const float (&x)[K / 8][4],
                                              const __nv_bfloat16* p, int ld) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int k16 = 0; k16 < K / 16; ++k16) {
    unsigned ra[4];
    acc_a_frag(x, k16, ra);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const __nv_bfloat16* row = p + (8 * n + g) * ld + 16 * k16 + 2 * t;
      const unsigned rb[2] = {pair_at(row), pair_at(row + 8)};
      mma_bf16(acc[n], ra, rb);
    }
  }
}

template <int Dk, int Dv, int NW, bool MASKED, class TI, class TM>
__device__ void state_pass_regs(const TI* q, const TI* k, const __nv_bfloat16* W, const __nv_bfloat16* U,
                                const __nv_bfloat16* Aqk, const float* Gc, const float* S0, const TM* mask, int T,
                                int Hk, int Hv, TI* y, float* S_out) {
  using ST = __nv_bfloat16;
  constexpr int BV = 16 * NW, NTH = 32 * NW;
  constexpr int LK = Ld<ST, Dk>::value, LA = Ld<ST, C>::value, LU = Ld<ST, BV>::value;
  constexpr int KT = Dk / 8, TT = C / 8, STAGE = state_regs_stage<Dk, BV>();
  static_assert(Dk % 16 == 0 && Dk <= 128, "S rows are kept in registers: Dk <= 128");
  GDN_EXTERN_SMEM(float4, smem_regs);
  if (dynamic_smem_bytes() < (unsigned)state_regs_smem<Dk, BV>()) __trap();
  auto stage = [&](int st, int part) -> char* {
    char* base = reinterpret_cast<char*>(smem_regs) + st * STAGE;
    const int off[6] = {0, C * LK, 2 * C * LK, 3 * C * LK, 3 * C * LK + C * LA, 3 * C * LK + C * LA + C * LU};
    return base + off[part] * (int)sizeof(ST);
  };

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int v0 = blockIdx.x * BV, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (Hv / Hk);
  const int NTc = (T + C - 1) / C, Tp = NTc * C;
  const long bh = (long)b * Hv + h;
  const int vw = 16 * warp;  // this warp's rows within the slice

  // S rows vw + g (+ 8), columns 8j + 2t (+ 1): tile j, elements i.
  float s[KT][4];
  const float* s0 = S0 + (bh * Dv + v0 + vw + g) * Dk + 2 * t;
#pragma unroll
  for (int j = 0; j < KT; ++j) {
    const float2 lo = *reinterpret_cast<const float2*>(s0 + 8 * j);
    const float2 hi = *reinterpret_cast<const float2*>(s0 + 8 * Dk + 8 * j);
    s[j][0] = lo.x;
    s[j][1] = lo.y;
    s[j][2] = hi.x;
    s[j][3] = hi.y;
  }

  const long qrow = (long)Hk * Dk;
  auto issue = [&](int cc, int st) {
    const int tn = cc * C, rn = min(C, T - tn);
    load_rows<Dk, LK, NTH>(reinterpret_cast<ST*>(stage(st, 0)), W + (bh * Tp + tn) * Dk, Dk, C, tid);
    load_rows<Dk, LK, NTH>(reinterpret_cast<ST*>(stage(st, 1)), q + (((long)b * T + tn) * Hk + hk) * Dk, qrow, rn, tid);
    load_rows<Dk, LK, NTH>(reinterpret_cast<ST*>(stage(st, 2)), k + (((long)b * T + tn) * Hk + hk) * Dk, qrow, rn, tid);
    load_rows<C, LA, NTH>(reinterpret_cast<ST*>(stage(st, 3)), Aqk + (bh * NTc + cc) * C * C, C, C, tid);
    load_rows<BV, LU, NTH>(reinterpret_cast<ST*>(stage(st, 4)), U + (bh * Tp + tn) * Dv + v0, Dv, C, tid);
    if (tid < C / 4) cp_async16(reinterpret_cast<float*>(stage(st, 5)) + 4 * tid, Gc + bh * Tp + tn + 4 * tid, true);
    cp_async_commit();
  };

  issue(0, 0);
#pragma unroll 1
  for (int c = 0; c < NTc; ++c) {
    const int st = c & 1;
    // The other stage was last read in step c - 1, which ended with a barrier.
    if (c + 1 < NTc) {
      issue(c + 1, st ^ 1);
    } else {
      cp_async_commit();  // an empty group keeps the wait count uniform
    }
    cp_async_wait_group<1>();  // chunk c
    __syncthreads();
    const ST* sW = reinterpret_cast<const ST*>(stage(st, 0));
    const ST* sQ = reinterpret_cast<const ST*>(stage(st, 1));
    const ST* sK = reinterpret_cast<const ST*>(stage(st, 2));
    const ST* sA = reinterpret_cast<const ST*>(stage(st, 3));
    const ST* sU = reinterpret_cast<const ST*>(stage(st, 4));
    const float* sG = reinterpret_cast<const float*>(stage(st, 5));
    const int t0 = c * C, rows = min(C, T - t0);
    const float Gl = sG[C - 1];

    // delta^T (value rows vw.., token columns) = U^T - S W^T
    float dT[TT][4];
    zero(dT);
    mma_regs_cols<Dk, TT>(dT, s, sW, LK);
#pragma unroll
    for (int n = 0; n < TT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        dT[n][i] = f32(sU[(8 * n + 2 * t + (i & 1)) * LU + vw + g + 8 * (i >> 1)]) - dT[n][i];

    // y^T = (S Q^T) diag(exp(G)) + delta^T Aqk^T
    float yT[TT][4];
    zero(yT);
    mma_regs_cols<Dk, TT>(yT, s, sQ, LK);
#pragma unroll
    for (int n = 0; n < TT; ++n) {
      const float e0 = expf(sG[8 * n + 2 * t]), e1 = expf(sG[8 * n + 2 * t + 1]);
      yT[n][0] *= e0;
      yT[n][1] *= e1;
      yT[n][2] *= e0;
      yT[n][3] *= e1;
    }
    mma_regs_cols<C, TT>(yT, dT, sA, LA);
    TI* yc = y + (((long)b * T + t0) * Hv + h) * Dv + v0 + vw + g;
#pragma unroll
    for (int n = 0; n < TT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int tok = 8 * n + 2 * t + (i & 1);
        if (tok < rows) {
          bool live = true;
          if constexpr (MASKED) live = static_cast<bool>(mask[(long)b * T + t0 + tok]);
          yc[(long)tok * Hv * Dv + 8 * (i >> 1)] = cvt<TI>(live ? yT[n][i] : 0.0f);
        }
      }

    // S <- exp(G_last) S + delta^T diag(exp(G_last - G)) K
    const float eG = expf(Gl);
#pragma unroll
    for (int j = 0; j < KT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[j][i] *= eG;
#pragma unroll
    for (int n = 0; n < TT; ++n) {
      const float e0 = expf(Gl - sG[8 * n + 2 * t]), e1 = expf(Gl - sG[8 * n + 2 * t + 1]);
      dT[n][0] *= e0;
      dT[n][1] *= e1;
      dT[n][2] *= e0;
      dT[n][3] *= e1;
    }
    const BRows<ST> kv{sK, LK};
#pragma unroll
    for (int k16 = 0; k16 < C / 16; ++k16) {
      unsigned ra[4];
      acc_a_frag(dT, k16, ra);
      mma_bf16_frag2(s, ra, kv, 16 * k16);
    }
    __syncthreads();  // every warp done with this stage before step c + 1 refills it
  }

  float* so = S_out + (bh * Dv + v0 + vw + g) * Dk + 2 * t;
#pragma unroll
  for (int j = 0; j < KT; ++j) {
    *reinterpret_cast<float2*>(so + 8 * j) = make_float2(s[j][0], s[j][1]);
    *reinterpret_cast<float2*>(so + 8 * Dk + 8 * j) = make_float2(s[j][2], s[j][3]);
  }
}

}  // namespace gdn_tc

#endif  // GDN_CHUNKED_TC_CUH
