// Stage kkt_solve of the CUDA chunked kernels (see common.cuh): the cumulative log-decay of a
// chunk, T = (I + A)^-1, and for per-key gates the folded decays and the products (key_*). The
// products for a gate per head (A = K K^T and Aqk = Q K^T with their decays) run inside launch 1
// (wy.cuh), between the gates and the solve.
#ifndef GDN_CHUNKED_KKT_SOLVE_CUH
#define GDN_CHUNKED_KKT_SOLVE_CUH

namespace gdn_tc {

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


// Stage kkt_solve's product for a gate per head, warp `warp`'s rows 16 warp ..: A =
// strict_tril(diag(beta) K K^T * exp(G_i - G_j)) into sA [C][LA]; where sAkk is given, also the same
// without beta (the backward's dbeta). Launch 1 (wy.cuh) and the backward (backward.cuh) share it.
template <bool EXACT, int Dk, int LK, int LA, class ST>
__device__ __forceinline__ void kkt_a(const ST* sK, const float* sG, const float* sBeta, float* sA, int warp,
                                      float* sAkk = nullptr) {
  const int r0 = 16 * warp;
  float acc[8][4];
  zero(acc);
  warp_mma<EXACT, Dk>(acc, ARows<ST>{sK + r0 * LK, LK}, BCols<ST>{sK, LK});
  for_acc(acc, [&](int r, int j, float x) {
    const int i = r0 + r;
    const float a = i > j ? x * expf(sG[i] - sG[j]) : 0.0f;
    sA[i * LA + j] = sBeta[i] * a;
    if (sAkk != nullptr) sAkk[i * LA + j] = a;
  });
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


// KEYGATE: shared memory (bytes) launch 1 adds for per-key gates: log-gates and two factor
// arrays [C][Dk], and the decays between the 6 pairs of 16-row strips [6][Dk].
template <int Dk>
__host__ __device__ constexpr int key_smem() {
  return (3 * C * Dk + 6 * Dk) * 4;
}

// KEYGATE: the chunk's per-key log-gates into sLG [C][Dk] (0 for masked and padding steps), then
// the factors of the folded decays: sLeft [C][Dk], the decay from row i's 16-row strip's start
// through i; sRight [C][Dk], from row j to its strip's end; sMid [6][Dk], over the strips strictly
// between strip pair (I, J), J < I, stored at I (I - 1) / 2 + J. All 128 threads; ends with a barrier.
template <int Dk, bool FUSED, bool MASKED, bool HAS_LB, bool DT_KEY, class TGA, class TAL, class TDB, class TLB, class TM>
__device__ __forceinline__ void key_log_gates(float* sLG, float* sLeft, float* sRight, float* sMid, const TGA* ga,
                                              const TAL* A_log, const TDB* dt_bias, const TLB* lb, const TM* mask,
                                              int b, int h, int Hv, int T, int t0, int rows, int tid) {
  for (int e = tid; e < C * Dk; e += NTHREADS) {
    const int i = e / Dk, d = e - i * Dk;
    float lg = 0.0f;
    bool live = i < rows;
    if constexpr (MASKED) live = live && static_cast<bool>(mask[(long)b * T + t0 + (i < rows ? i : 0)]);
    if (live) {
      const long gk = (((long)b * T + t0 + i) * Hv + h) * Dk + d;
      if constexpr (FUSED) {
        const float log_rate = f32(A_log[h]);
        lg = gdn_log_decay(f32(ga[gk]), expf(log_rate), log_rate, f32(dt_bias[DT_KEY ? h * Dk + d : h]),
                           HAS_LB ? f32(lb[0]) : 0.0f, HAS_LB);
      } else {
        lg = gdn_log_gate(f32(ga[gk]));
      }
    }
    sLG[e] = lg;
  }
  __syncthreads();
  // One column per thread, running sums down the column that restart at each strip.
  for (int d = tid; d < Dk; d += NTHREADS) {
    float l = 0.0f, r = 0.0f;
    for (int i = 0; i < C; ++i) {
      if ((i & 15) == 0) l = 0.0f;
      l += sLG[i * Dk + d];
      sLeft[i * Dk + d] = gdn_decay_factor(l);
    }
    for (int i = C - 1; i >= 0; --i) {
      if ((i & 15) == 15) r = 0.0f;
      sRight[i * Dk + d] = gdn_decay_factor(r);
      r += sLG[i * Dk + d];
    }
  }
  for (int e = tid; e < 6 * Dk; e += NTHREADS) {
    const int pr = e / Dk, d = e - pr * Dk;
    const int I = pr < 1 ? 1 : (pr < 3 ? 2 : 3), J = pr - I * (I - 1) / 2;
    float x = 0.0f;
    for (int m = 16 * (J + 1); m < 16 * I; ++m) x += sLG[m * Dk + d];
    sMid[e] = gdn_decay_factor(x);
  }
  __syncthreads();
}

// KEYGATE, the products of stage kkt_solve for warp `warp`'s strip I (rows 16 I ..): for earlier
// strips J, A = beta_i (K_I * left * mid(I, J)) (K_J * right)^T and Aqk the same with Q_I, as
// tensor-core products; inside strip I every pair j <= i exactly (one decay per column); zero
// above the diagonal. A into sA [C][LA], Aqk to aq [C][C].
template <bool EXACT, int Dk, int LK, int LQ, int LA, class ST, class OT>
__device__ __forceinline__ void key_kkt(const ST* sK, const ST* sQ, const float* sLG, const float* sLeft,
                                        const float* sRight, const float* sMid, const float* sBeta, float* sA, OT* aq,
                                        int warp) {
  const int I = warp, r0 = 16 * warp, lane = threadIdx.x & 31;
#pragma unroll 1
  for (int J = 0; J < 4; ++J) {
    if (J < I) {
      const float* mid = sMid + (I * (I - 1) / 2 + J) * Dk;
      const auto kr = b_fn([&](int kk, int n) { return f32(sK[(16 * J + n) * LK + kk]) * sRight[(16 * J + n) * Dk + kk]; });
      float acc[2][4];
      zero(acc);
      warp_mma<EXACT, Dk>(acc, a_fn([&](int r, int kk) {
        return f32(sK[(r0 + r) * LK + kk]) * sLeft[(r0 + r) * Dk + kk] * mid[kk];
      }), kr);
      for_acc(acc, [&](int r, int j, float x) { sA[(r0 + r) * LA + 16 * J + j] = sBeta[r0 + r] * x; });
      zero(acc);
      warp_mma<EXACT, Dk>(acc, a_fn([&](int r, int kk) {
        return f32(sQ[(r0 + r) * LQ + kk]) * sLeft[(r0 + r) * Dk + kk] * mid[kk];
      }), kr);
      for_acc(acc, [&](int r, int j, float x) { aq[(r0 + r) * C + 16 * J + j] = cvt<OT>(x); });
    } else {
      for (int e = lane; e < 256; e += 32) {
        const int r = e / 16, s = e % 16, i = r0 + r, j = 16 * J + s;
        float sa = 0.0f, sp = 0.0f;
        if (J == I && s <= r) {
          for (int d = 0; d < Dk; ++d) {
            float x = 0.0f;
            for (int m = j + 1; m <= i; ++m) x += sLG[m * Dk + d];
            const float f = gdn_decay_factor(x) * f32(sK[j * LK + d]);
            sa += f32(sK[i * LK + d]) * f;
            sp += f32(sQ[i * LQ + d]) * f;
          }
        }
        sA[i * LA + j] = s < r && J == I ? sBeta[i] * sa : 0.0f;
        aq[i * C + j] = cvt<OT>(sp);
      }
    }
  }
}

}  // namespace gdn_tc

#endif  // GDN_CHUNKED_KKT_SOLVE_CUH
