// Chunked gated delta rule on NVIDIA tensor cores (mma.sync), for mx.fast.cuda_kernel.
//
// Two launches per call, chunks of C = 64 tokens:
//   prep  (one block per batch, value head, chunk; all chunks in parallel):
//         G = within-chunk cumulative log-decay, A = strict_tril(diag(beta) K K^T * exp(G_i - G_j)),
//         T = (I + A)^-1, W = T diag(beta exp(G)) K, U = T diag(beta) V,
//         Aqk = tril(Q K^T * exp(G_i - G_j)) (diagonal included).
//   state (one block per batch, value head, slice of BV value rows; chunks in order):
//         delta = U - W S^T, y = diag(exp(G)) Q S^T + Aqk delta,
//         S <- exp(G_last) S + (delta * exp(G_last - G))^T K.
// Masked and padding steps get log-decay 0 and beta 0, which makes them leave S alone;
// their y is written as 0. The state stays float32 throughout.
//
// EXACT = false: bf16 operands (m16n8k16), float32 accumulation.
// EXACT = true:  float32 operands as three tf32 products (big*big + big*small + small*big,
//                m16n8k8), which keeps float32 inputs at float32-level error.
#ifndef GDN_CHUNKED_TC_CUH
#define GDN_CHUNKED_TC_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace gdn_tc {

constexpr int C = 64;         // tokens per chunk
constexpr int NWARPS = 4;     // warps per block
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
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One warp: acc[n] (16 x 8 tile n) += sum_k a(r, k) * b(k, 8n + c) for r < 16, k < K.
// Accumulator element i of tile n sits at row g + 8 (i >> 1), column 8n + 2t + (i & 1),
// with g = lane / 4, t = lane % 4 (PTX's m16n8 C layout).
template <bool EXACT, int K, int NT, class FA, class FB>
__device__ __forceinline__ void warp_mma(float (&acc)[NT][4], FA a, FB b) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll 2
  for (int k0 = 0; k0 < K; k0 += 16) {
    if constexpr (!EXACT) {
      const int ka = k0 + 2 * t;
      unsigned ra[4] = {pack_bf16(a(g, ka), a(g, ka + 1)), pack_bf16(a(g + 8, ka), a(g + 8, ka + 1)),
                        pack_bf16(a(g, ka + 8), a(g, ka + 9)), pack_bf16(a(g + 8, ka + 8), a(g + 8, ka + 9))};
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int c = 8 * n + g;
        unsigned rb[2] = {pack_bf16(b(ka, c), b(ka + 1, c)), pack_bf16(b(ka + 8, c), b(ka + 9, c))};
        mma_bf16(acc[n], ra, rb);
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

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
}

template <class A, class B>
struct same_type {
  static constexpr bool value = false;
};
template <class A>
struct same_type<A, A> {
  static constexpr bool value = true;
};

// 16-byte asynchronous copy global -> shared; with `valid` false the destination is zero-filled.
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

// Copies C rows of D elements, row r from src + r * stride, into shared dst[r * LD + d] as ST;
// rows at or past `rows` become zeros. Same types go as 16-byte asynchronous copies, all in
// flight at once (rows start 16-byte aligned: D, LD and strides are multiples of 8 elements);
// the caller waits with cp_async_wait_all() and a barrier. Other types convert one by one.
template <int D, int LD, class ST, class SRC>
__device__ __forceinline__ void load_rows(ST* dst, const SRC* src, long stride, int rows, int tid) {
  if constexpr (same_type<ST, SRC>::value) {
    constexpr int V = 16 / (int)sizeof(ST), VPR = D / V, TOTAL = C * VPR;
    static_assert(D % V == 0 && (LD * sizeof(ST)) % 16 == 0, "rows must be whole 16-byte vectors");
#pragma unroll
    for (int it = 0; it < (TOTAL + NTHREADS - 1) / NTHREADS; ++it) {
      const int idx = tid + it * NTHREADS;
      if (TOTAL % NTHREADS == 0 || idx < TOTAL) {
        const int r = idx / VPR, cv = idx - r * VPR;
        const bool ok = r < rows;
        cp_async16(dst + r * LD + cv * V, ok ? src + r * stride + cv * V : src, ok);
      }
    }
  } else {
#pragma unroll 4
    for (int idx = tid; idx < C * D; idx += NTHREADS) {
      const int r = idx / D, d = idx - r * D;
      const float x = r < rows ? f32(src[r * stride + d]) : 0.0f;
      dst[r * LD + d] = cvt<ST>(x);
    }
  }
}

// Bytes of dynamic shared memory this launch got: a launcher that asked for too little traps
// instead of writing past the end.
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
  unsigned r;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
}

__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// exp(A_log) overflows float32 above 88, and inf * 0 is NaN; past it rate * z is formed as
// exp(A_log + log z). Below x = -20, log softplus(x) equals x to float precision.
__device__ __forceinline__ float rate_softplus(float rate, float log_rate, float x) {
  if (log_rate <= 88.0f) return rate * softplus(x);
  return expf(log_rate + (x < -20.0f ? x : logf(softplus(x))));
}
__device__ __forceinline__ float rate_times(float rate, float log_rate, float x) {
  if (log_rate <= 88.0f) return rate * x;
  if (x == 0.0f) return 0.0f;
  const float m = expf(log_rate + logf(fabsf(x)));
  return x > 0.0f ? m : -m;
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
  return (C * LK + C * (LK > LV ? LK : LV)) * (int)sizeof(ST) + (C * (C + 4) + 2 * C + 8) * 4;
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
  extern __shared__ float4 smem_prep[];
  if (dynamic_smem_bytes() < (unsigned)prep_smem<Dk, Dv, EXACT>()) __trap();
  ST* sK = reinterpret_cast<ST*>(smem_prep);
  ST* sX = sK + C * LK;  // Q, later V
  float* sA = reinterpret_cast<float*>(sX + C * LX);
  float* sG = sA + C * LA;
  float* sBeta = sG + C;
  float* scratch = sBeta + C;

  const int tid = threadIdx.x, warp = tid >> 5;
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int NTc = gridDim.x, Tp = NTc * C;
  const int hk = h / (Hv / Hk);
  const int t0 = c * C;
  const int rows = min(C, T - t0);

  // Gates: log-decay and beta per step; masked and padding steps are identity steps.
  float gl = 0.0f, beta = 0.0f;
  if (tid < C && tid < rows) {
    const long gi = ((long)b * T + t0 + tid) * Hv + h;
    bool live = true;
    if constexpr (MASKED) live = static_cast<bool>(mask[(long)b * T + t0 + tid]);
    if (live) {
      if constexpr (FUSED) {
        const float x = f32(ga[gi]) + f32(dt_bias[h]);
        const float log_rate = f32(A_log[h]);
        const float rate = expf(log_rate);
        if constexpr (HAS_LB) {
          gl = f32(lb[0]) * sigmoid(rate_times(rate, log_rate, x));
        } else {
          gl = -rate_softplus(rate, log_rate, x);
        }
        beta = sigmoid(f32(gb[gi]));
        if constexpr (NEG) beta *= 2.0f;
      } else {
        gl = logf(f32(ga[gi]));
        beta = f32(gb[gi]);
      }
    }
  }
  const float G = scan64(gl, tid, scratch);
  if (tid < C) {
    sG[tid] = G;
    sBeta[tid] = beta;
    Gout[((long)b * Hv + h) * Tp + t0 + tid] = G;
  }

  const long qrow = (long)Hk * Dk;
  const TI* kc = k + (((long)b * T + t0) * Hk + hk) * Dk;
  const TI* qc = q + (((long)b * T + t0) * Hk + hk) * Dk;
  load_rows<Dk, LK>(sK, kc, qrow, rows, tid);
  load_rows<Dk, LX>(sX, qc, qrow, rows, tid);
  cp_async_wait_all();
  __syncthreads();

  // A (strictly lower, into shared) and Aqk (lower with diagonal, to global). Warp w: rows 16w..16w+15.
  {
    const int r0 = 16 * warp;
    float acc[8][4];
    zero(acc);
    warp_mma<EXACT, Dk>(acc, [&](int r, int kk) { return f32(sK[(r0 + r) * LK + kk]); },
                        [&](int kk, int n) { return f32(sK[n * LK + kk]); });
    for_acc(acc, [&](int r, int j, float x) {
      const int i = r0 + r;
      sA[i * LA + j] = i > j ? sBeta[i] * x * expf(sG[i] - sG[j]) : 0.0f;
    });
    zero(acc);
    warp_mma<EXACT, Dk>(acc, [&](int r, int kk) { return f32(sX[(r0 + r) * LX + kk]); },
                        [&](int kk, int n) { return f32(sK[n * LK + kk]); });
    OT* aq = Aqk + (((long)b * Hv + h) * NTc + c) * C * C;
    for_acc(acc, [&](int r, int j, float x) {
      const int i = r0 + r;
      aq[i * C + j] = cvt<OT>(i >= j ? x * expf(sG[i] - sG[j]) : 0.0f);
    });
  }
  __syncthreads();

  // T = (I + A)^-1 by forward substitution, one column per thread (threads 0..63), while
  // threads 64..127 bring V (scaled by beta) into sX.
  float col[C];
  if (tid < C) {
#pragma unroll
    for (int i = 0; i < C; ++i) {
      float s = i == tid ? 1.0f : 0.0f;
#pragma unroll
      for (int j = 0; j < i; ++j) s = fmaf(-sA[i * LA + j], col[j], s);
      col[i] = s;
    }
  } else {
    const TI* vc = v + (((long)b * T + t0) * Hv + h) * Dv;
    for (int idx = tid - C; idx < C * Dv; idx += NTHREADS - C) {
      const int r = idx / Dv, d = idx - r * Dv;
      const float x = r < rows ? f32(vc[(long)r * Hv * Dv + d]) * sBeta[r] : 0.0f;
      sX[r * LX + d] = cvt<ST>(x);
    }
  }
  __syncthreads();  // every column solved before T overwrites A
  if (tid < C) {
#pragma unroll
    for (int i = 0; i < C; ++i) sA[i * LA + tid] = col[i];
  }
  // K rows scaled by beta * exp(G) for W.
  for (int idx = tid; idx < C * Dk; idx += NTHREADS) {
    const int r = idx / Dk, d = idx - r * Dk;
    sK[r * LK + d] = cvt<ST>(f32(sK[r * LK + d]) * sBeta[r] * expf(sG[r]));
  }
  __syncthreads();

  // W = T K', U = T V', in column blocks of 64.
  {
    const int r0 = 16 * warp;
    auto ta = [&](int r, int kk) { return sA[(r0 + r) * LA + kk]; };
    OT* Wc = W + (((long)b * Hv + h) * Tp + t0) * Dk;
    OT* Uc = U + (((long)b * Hv + h) * Tp + t0) * Dv;
#pragma unroll 1
    for (int n0 = 0; n0 < Dk; n0 += 64) {
      float acc[8][4];
      zero(acc);
      warp_mma<EXACT, C>(acc, ta, [&](int kk, int n) { return f32(sK[kk * LK + n0 + n]); });
      for_acc(acc, [&](int r, int j, float x) { Wc[(long)(r0 + r) * Dk + n0 + j] = cvt<OT>(x); });
    }
#pragma unroll 1
    for (int n0 = 0; n0 < Dv; n0 += 64) {
      float acc[8][4];
      zero(acc);
      warp_mma<EXACT, C>(acc, ta, [&](int kk, int n) { return f32(sX[kk * LX + n0 + n]); });
      for_acc(acc, [&](int r, int j, float x) { Uc[(long)(r0 + r) * Dv + n0 + j] = cvt<OT>(x); });
    }
  }
}

template <int Dk, int BV, bool EXACT, bool SHARE_WQ>
__host__ __device__ constexpr int state_smem() {
  using ST = typename Operand<EXACT>::T;
  constexpr int LK = Ld<ST, Dk>::value;
  constexpr int LA = Ld<ST, C>::value, LU = Ld<ST, BV>::value;
  return BV * (Dk + 4) * 4 + (SHARE_WQ ? 2 : 3) * C * LK * (int)sizeof(ST) + C * (BV + 4) * 4 +
         (C * LA + C * LU) * (int)sizeof(ST) + 3 * C * 4;
}

// ---------------------------------------------------------------------------------------
// Launch 2: per (value slice, value head, batch) block; walks the chunks in order.
// ---------------------------------------------------------------------------------------
template <int Dk, int Dv, int BV, bool EXACT, bool MASKED, bool SHARE_WQ, class TI, class OT, class TM>
__device__ void state_pass(const TI* q, const TI* k, const OT* W, const OT* U, const OT* Aqk, const float* Gc,
                           const float* S0, const TM* mask, int T, int Hk, int Hv, TI* y, float* S_out) {
  using ST = typename Operand<EXACT>::T;
  static_assert(same_type<ST, OT>::value, "W, U, Aqk are stored in the operand type");
  constexpr int LK = Ld<ST, Dk>::value, LS = Dk + 4, LD = BV + 4, LA = Ld<ST, C>::value, LU = Ld<ST, BV>::value;
  constexpr int MT = BV / 16, NB = Dk / 64;  // S-update work: MT row strips x NB column blocks
  static_assert(BV % 16 == 0 && Dk % 64 == 0, "BV multiple of 16, Dk multiple of 64");
  extern __shared__ float4 smem_state[];
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

  for (int idx = tid; idx < BV * Dk; idx += NTHREADS) {
    const int r = idx / Dk, d = idx - r * Dk;
    sS[r * LS + d] = S0[(bh * Dv + v0 + r) * Dk + d];
  }

  const long qrow = (long)Hk * Dk;
  // Loads run one phase ahead of their use, as two groups of asynchronous copies:
  // W, Q, U slice and G of chunk c+1 are issued once chunk c no longer reads them (mid-step),
  // K and Aqk of chunk c at the top of step c, landing while delta and Q S^T are computed.
  auto issue_wqug = [&](int cc) {
    const int tn = cc * C, rn = min(C, T - tn);
    load_rows<Dk, LK>(sW, W + (bh * Tp + tn) * Dk, Dk, C, tid);
    if constexpr (!SHARE_WQ) load_rows<Dk, LK>(sQ, q + (((long)b * T + tn) * Hk + hk) * Dk, qrow, rn, tid);
    load_rows<BV, LU>(sU, U + (bh * Tp + tn) * Dv + v0, Dv, C, tid);
    if (tid < C / 4) cp_async16(sG + 4 * tid, Gc + bh * Tp + tn + 4 * tid, true);
    cp_async_commit();
  };
  auto issue_ka = [&](int cc) {
    const int tn = cc * C, rn = min(C, T - tn);
    load_rows<Dk, LK>(sK, k + (((long)b * T + tn) * Hk + hk) * Dk, qrow, rn, tid);
    load_rows<C, LA>(sA, Aqk + (bh * NTc + cc) * C * C, C, C, tid);
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
    const int r0 = 16 * warp;
    const float Gl = sG[C - 1];
    if (tid < C) sE[tid] = expf(Gl - sG[tid]);
    const int g8 = (tid & 31) >> 2;
    const float e0 = expf(sG[r0 + g8]), e1 = expf(sG[r0 + g8 + 8]);

    // delta = U - W S^T (rows r0.., all BV columns)
    float dl[BV / 8][4];
    zero(dl);
    warp_mma<EXACT, Dk>(dl, [&](int r, int kk) { return f32(sW[(r0 + r) * LK + kk]); },
                        [&](int kk, int n) { return sS[n * LS + kk]; });
    for_acc(dl, [&](int r, int j, float x) { sD[(r0 + r) * LD + j] = f32(sU[(r0 + r) * LU + j]) - x; });
    if constexpr (SHARE_WQ) {
      __syncthreads();  // every warp done with W, which Q replaces
      load_rows<Dk, LK>(sQ, q + (((long)b * T + t0) * Hk + hk) * Dk, qrow, rows, tid);
      cp_async_commit();
      cp_async_wait_group<0>();
      __syncthreads();
    }
    // y = diag(exp(G)) Q S^T + Aqk delta
    float yo[BV / 8][4];
    zero(yo);
    warp_mma<EXACT, Dk>(yo, [&](int r, int kk) { return f32(sQ[(r0 + r) * LK + kk]); },
                        [&](int kk, int n) { return sS[n * LS + kk]; });
#pragma unroll
    for (int n = 0; n < BV / 8; ++n) {
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
    warp_mma<EXACT, C>(yo, [&](int r, int kk) { return f32(sA[(r0 + r) * LA + kk]); },
                       [&](int kk, int n) { return sD[kk * LD + n]; });
    TI* yc = y + (((long)b * T + t0) * Hv + h) * Dv + v0;
    for_acc(yo, [&](int r, int j, float x) {
      const int i = r0 + r;
      if (i < rows) yc[(long)i * Hv * Dv + j] = cvt<TI>(sM[i] != 0.0f ? x : 0.0f);
    });

    // S <- exp(G_last) S + (delta * exp(G_last - G))^T K
    const float eG = expf(Gl);
#pragma unroll 1
    for (int item = warp; item < MT * NB; item += NWARPS) {
      const int m0 = 16 * (item % MT), n0 = 64 * (item / MT);
      float acc[8][4];
      for_acc(acc, [&](int r, int j, float& x) { x = eG * sS[(m0 + r) * LS + n0 + j]; });
      warp_mma<EXACT, C>(acc, [&](int r, int kk) { return sD[kk * LD + m0 + r] * sE[kk]; },
                         [&](int kk, int n) { return f32(sK[kk * LK + n0 + n]); });
      for_acc(acc, [&](int r, int j, float x) { sS[(m0 + r) * LS + n0 + j] = x; });
    }
  }
  __syncthreads();
  for (int idx = tid; idx < BV * Dk; idx += NTHREADS) {
    const int r = idx / Dk, d = idx - r * Dk;
    S_out[(bh * Dv + v0 + r) * Dk + d] = sS[r * LS + d];
  }
}

}  // namespace gdn_tc

#endif  // GDN_CHUNKED_TC_CUH
