// Stage wy of the CUDA chunked kernels (see common.cuh), in launch 1, which runs the gates,
// stage kkt_solve (helpers in kkt_solve.cuh) and this stage for one chunk.
#ifndef GDN_CHUNKED_WY_CUH
#define GDN_CHUNKED_WY_CUH

namespace gdn_tc {

// Shared memory (bytes) of launch 1; cuda/chunked.py mirrors the formula.
template <int Dk, int Dv, bool EXACT>
__host__ __device__ constexpr int kkt_solve_wy_smem() {
  using ST = typename Operand<EXACT>::T;
  constexpr int LK = Ld<ST, Dk>::value, LV = Ld<ST, Dv>::value;
  return (C * LK + C * (LK > LV ? LK : LV)) * (int)sizeof(ST) + (2 * C * (C + 4) + 3 * C + 8) * 4;
}


// KEYGATE, for the state pass: Qg = Q * gamma and Kd = K * gamma_C / gamma per column, rows < rows
// of the chunk to qg, kd (row stride `stride`), and gamma_C per column to gk [Dk]. Overwrites
// sLeft with gamma and sRight with gamma_C / gamma (each a sum of log-gates over its own steps).
template <int Dk, int LK, int LQ, class ST, class TI>
__device__ __forceinline__ void key_state_operands(const float* sLG, float* sLeft, float* sRight, const ST* sK,
                                                   const ST* sQ, TI* qg, TI* kd, long stride, float* gk, int rows,
                                                   int tid) {
  // One column per thread: running sums down the column, forward and backward.
  for (int d = tid; d < Dk; d += NTHREADS) {
    float to = 0.0f, from = 0.0f;
    for (int i = 0; i < C; ++i) {
      to += sLG[i * Dk + d];
      sLeft[i * Dk + d] = gdn_decay_factor(to);
    }
    gk[d] = gdn_decay_factor(to);
    for (int i = C - 1; i >= 0; --i) {
      sRight[i * Dk + d] = gdn_decay_factor(from);
      from += sLG[i * Dk + d];
    }
  }
  __syncthreads();
  for (int e = tid; e < rows * Dk; e += NTHREADS) {
    const int i = e / Dk, d = e - i * Dk;
    qg[i * stride + d] = cvt<TI>(f32(sQ[i * LQ + d]) * sLeft[e]);
    kd[i * stride + d] = cvt<TI>(f32(sK[i * LK + d]) * sRight[e]);
  }
}

// ---------------------------------------------------------------------------------------
// Launch 1, stages kkt_solve and wy: per (chunk, value head, batch) block.
// ---------------------------------------------------------------------------------------
//
// KEYGATE (one gate per key column): ga is g or a [B, T, Hv, Dk], dt_bias [Hv] or [Hv, Dk] (DT_KEY).
// The per-head log-decays G are then 0 and the decays enter per column: A and Aqk take them folded
// into their operands, split at the warps' 16-row strips so that every factor is a decay over steps
// in order, in [0, 1] (no overflow for gates near 0): for i in strip I and j in an earlier strip J,
//   exp(b_i - b_j) = exp(b_i - s_I) exp(s_I - e_J) exp(e_J - b_j)
// (b the cumulative log-gate, s_I its value before strip I, e_J at J's last step): row i of K or Q
// times the first, a Dk vector per strip pair the second, row j of K the third; pairs inside one
// strip are summed exactly. W takes gamma_i per column on K's rows, and the state pass gets its
// own operands: Qg = Q * gamma and Kd = K * gamma_C / gamma per column ([B, T, Hv, Dk], input dtype)
// and Gk = gamma_C per column ([B, Hv, NTc, Dk]). Factors below exp(GDN_LOG_DECAY_FLOOR) are 0.
template <int Dk, int Dv, bool EXACT, bool FUSED, bool MASKED, bool HAS_LB, bool NEG, bool KEYGATE = false,
          bool DT_KEY = false, class TI, class TGA, class TGB, class TAL, class TDB, class TLB, class TM, class OT>
__device__ void kkt_solve_wy(const TI* q, const TI* k, const TI* v, const TGA* ga, const TGB* gb, const TAL* A_log,
                             const TDB* dt_bias, const TLB* lb, const TM* mask, int T, int Hk, int Hv, OT* W, OT* U,
                             OT* Aqk, float* Gout, TI* Qg = nullptr, TI* Kd = nullptr, float* Gk = nullptr) {
  using ST = typename Operand<EXACT>::T;
  constexpr int LK = Ld<ST, Dk>::value, LV = Ld<ST, Dv>::value, LA = C + 4;
  constexpr int LX = LK > LV ? LK : LV;
  GDN_EXTERN_SMEM(float4, smem_prep);
  if (dynamic_smem_bytes() < (unsigned)(kkt_solve_wy_smem<Dk, Dv, EXACT>() + (KEYGATE ? key_smem<Dk>() : 0))) __trap();
  ST* sK = reinterpret_cast<ST*>(smem_prep);
  ST* sX = sK + C * LK;  // Q, later V
  float* sA = reinterpret_cast<float*>(sX + C * LX);
  float* sT = sA + C * LA;
  float* sG = sT + C * LA;
  float* sBeta = sG + C;  // beta: U = T diag(beta) V
  float* sBw = sBeta + C;  // beta exp(G): W = T diag(beta exp(G)) K
  float* scratch = sBw + C;
  float* sLG = scratch + 8;      // KEYGATE: log-gates [C][Dk]
  float* sLeft = sLG + C * Dk;   // KEYGATE: decay from the strip's start through step i, then gamma_i
  float* sRight = sLeft + C * Dk;  // KEYGATE: decay from step j to its strip's end, then gamma_C / gamma_j
  float* sMid = sRight + C * Dk;   // KEYGATE: decay between strips J < I, [6][Dk]

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
      if constexpr (KEYGATE) {
        if constexpr (FUSED) {
          beta = gdn_beta(f32(gb[gi]), NEG);
        } else {
          beta = f32(gb[gi]);
        }
      } else if constexpr (FUSED) {
        const float log_rate = f32(A_log[h]);
        gl = gdn_log_decay(f32(ga[gi]), expf(log_rate), log_rate, f32(dt_bias[h]), HAS_LB ? f32(lb[0]) : 0.0f, HAS_LB);
        beta = gdn_beta(f32(gb[gi]), NEG);
      } else {
        gl = gdn_log_gate(f32(ga[gi]));
        beta = f32(gb[gi]);
      }
    }
  }
  // A gate of exactly 0 (or a fused decay whose log overflows) has log-decay -inf, and the decays
  // below are differences of G (exp(G_i - G_j)), where -inf - -inf is NaN. -200 in its place
  // gives the same zero decay across that step (exp(-200) is 0 in float32, and no other step adds
  // anything positive) and leaves every finite log-decay as it is.
  if (!(gl > -GDN_INF)) gl = -200.0f;
  const float G = scan64(gl, tid, scratch);
  if (tid < C) {
    sG[tid] = G;
    sBeta[tid] = beta;
    sBw[tid] = beta * expf(G);
    Gout[((long)b * Hv + h) * Tp + t0 + tid] = G;
  }
  cp_async_wait_all();
  __syncthreads();

  if constexpr (KEYGATE) {
    key_log_gates<Dk, FUSED, MASKED, HAS_LB, DT_KEY>(sLG, sLeft, sRight, sMid, ga, A_log, dt_bias, lb, mask, b, h, Hv, T,
                                                    t0, rows, tid);
    key_kkt<EXACT, Dk, LK, LX, LA>(sK, sX, sLG, sLeft, sRight, sMid, sBeta, sA,
                                   Aqk + (((long)b * Hv + h) * NTc + c) * C * C, warp);
    __syncthreads();  // sLeft, sRight no longer read: gamma and gamma_C / gamma take their place
    key_state_operands<Dk, LK, LX>(sLG, sLeft, sRight, sK, sX, Qg + (((long)b * T + t0) * Hv + h) * Dk,
                                   Kd + (((long)b * T + t0) * Hv + h) * Dk, (long)Hv * Dk,
                                   Gk + (((long)b * Hv + h) * NTc + c) * Dk, rows, tid);
  } else {
    // Stage kkt_solve: A (strictly lower, into shared) and Aqk (lower with diagonal, to global).
    // Warp w: rows 16w..16w+15.
    const int r0 = 16 * warp;
    kkt_a<EXACT, Dk, LK, LA>(sK, sG, sBeta, sA, warp);
    float acc[8][4];
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
  invert_unit_lower<LA>(sA, sT, tid);  // T = (I + A)^-1, the end of stage kkt_solve
  cp_async_wait_all();
  __syncthreads();

  // Stage wy: W = T diag(beta exp(G)) K, U = T diag(beta) V, in column blocks of 64.
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
      if constexpr (KEYGATE) {
        warp_mma<EXACT, C>(acc, tw, b_fn([&](int kk, int n) { return f32(sK[kk * LK + n0 + n]) * sLeft[kk * Dk + n0 + n]; }));
      } else {
        warp_mma<EXACT, C>(acc, tw, BRows<ST>{sK + n0, LK});
      }
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

}  // namespace gdn_tc

#endif  // GDN_CHUNKED_WY_CUH
