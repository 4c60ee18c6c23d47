// The chunked backward on tensor cores (scalar gates), after the forward's launch 1 (kkt_solve_wy:
// W, U = T diag(beta) V, Aqk, G) and its state pass with SAVE_EVERY = 1 (the state entering each
// chunk) have been recomputed. Per (batch, value head, chunk), with S the state entering the chunk,
// dS' the adjoint of the state leaving it, gam = exp(G), Gam = gam_C, Kd = diag(exp(G_C - G)) K:
//   state_backward (one block per batch, value head, slice of BV value rows; chunks last to first):
//     dU = Kd dS'^T + Aqk^T dY,   dS = Gam dS' + dY^T diag(gam) Q - dU^T W
//   chunk_grads (every chunk in parallel), U = Uv - W S^T, T = (I + A)^-1 (stage kkt_solve's code):
//     dQe = dY S, dAqk = tril(dY U^T), R = dAqk * exp(G_i - G_j): dQ = diag(gam) dQe + R K
//     dKd = U dS', dW = -dU S, dKb = T^T dW, dVb = T^T dU, dA = strict_tril(-(dKb W^T + dVb Uv^T)),
//     P = dA * beta_i exp(G_i - G_j):
//     dK = R^T Q + diag(exp(G_C - G)) dKd + diag(beta gam) dKb + P K + P^T K,  dV = diag(beta) dVb
//     dbeta_i = dVb_i.v_i + gam_i dKb_i.k_i + sum_j dA_ij A_ij / beta_i
//     dG_i = gam_i dQe_i.q_i + gam_i beta_i dKb_i.k_i + sum_j (dA_ij A_ij - dA_ji A_ji)
//            + sum_j (dAqk_ij Aqk_ij - dAqk_ji Aqk_ji) - exp(G_C - G_i) dKd_i.k_i,
//     dG_C += Gam <dS', S> + sum_i exp(G_C - G_i) dKd_i.k_i; the log-decay gradient is the reverse
//     cumulative sum of dG within the chunk.
// Masked and padding steps: dY is 0 there, and every gradient of the step is written as 0.
#ifndef GDN_CHUNKED_BACKWARD_CUH
#define GDN_CHUNKED_BACKWARD_CUH

namespace gdn_tc {

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// Sums over a warp's accumulator columns of acc(r, c) * f(r, c): (row g, row g + 8), the same in
// each of a row's four lanes.
template <int NT, class F>
__device__ __forceinline__ float2 row_dots(const float (&acc)[NT][4], F f) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int c = 8 * n + 2 * t;
    s0 += acc[n][0] * f(g, c) + acc[n][1] * f(g, c + 1);
    s1 += acc[n][2] * f(g + 8, c) + acc[n][3] * f(g + 8, c + 1);
  }
  s0 += __shfl_xor_sync(0xffffffffu, s0, 1);
  s0 += __shfl_xor_sync(0xffffffffu, s0, 2);
  s1 += __shfl_xor_sync(0xffffffffu, s1, 1);
  s1 += __shfl_xor_sync(0xffffffffu, s1, 2);
  return make_float2(s0, s1);
}

template <int Dk, int BV, bool EXACT>
__host__ __device__ constexpr int state_backward_smem() {
  using ST = typename Operand<EXACT>::T;
  constexpr int LK = Ld<ST, Dk>::value, LA = Ld<ST, C>::value;
  return BV * (Dk + 8) * 4 + (3 * C * LK + C * LA) * (int)sizeof(ST) + 2 * C * (BV + 4) * 4 + 3 * C * 4;
}

// ---------------------------------------------------------------------------------------
// Stage state_backward: per (value slice, value head, batch) block of 4 warps; chunks last to first.
// dS_out [B, NTc, Hv, Dv, Dk]: dS' of every chunk; dU [B, Hv, Tp, Dv]; dS0 [B, Hv, Dv, Dk].
// ---------------------------------------------------------------------------------------
template <int Dk, int Dv, int BV, bool EXACT, bool MASKED, class TI, class TD, class OT, class TM>
__device__ void state_backward(const TI* q, const TI* k, const OT* W, const OT* Aqk, const float* Gc, const TD* dy,
                               const TM* mask, const float* dS_end, int T, int Hk, int Hv, float* dU_out,
                               float* dS_out, float* dS0) {
  using ST = typename Operand<EXACT>::T;
  static_assert(same_type<ST, OT>::value, "W, Aqk are stored in the operand type");
  constexpr int LK = Ld<ST, Dk>::value, LS = Dk + 8, LD = BV + 4, LA = Ld<ST, C>::value;
  constexpr int MT = BV / 16, UN = 64, NB = Dk / UN, NTH = NTHREADS;
  static_assert(BV % 16 == 0 && Dk % 64 == 0, "BV multiple of 16, Dk multiple of 64");
  GDN_EXTERN_SMEM(float4, smem_sbwd);
  if (dynamic_smem_bytes() < (unsigned)state_backward_smem<Dk, BV, EXACT>()) __trap();
  float* sS = reinterpret_cast<float*>(smem_sbwd);  // dS [BV][LS]
  ST* sK = reinterpret_cast<ST*>(sS + BV * LS);
  ST* sQ = sK + C * LK;
  ST* sW = sQ + C * LK;
  ST* sA = sW + C * LK;                               // Aqk [C][LA]
  float* sY = reinterpret_cast<float*>(sA + C * LA);  // dY slice [C][LD]
  float* sU = sY + C * LD;                            // dU slice [C][LD]
  float* sG = sU + C * LD;
  float* sE = sG + C;
  float* sGam = sE + C;

  const int tid = threadIdx.x, warp = tid >> 5;
  const int v0 = blockIdx.x * BV, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (Hv / Hk);
  const int NTc = (T + C - 1) / C, Tp = NTc * C;
  const long bh = (long)b * Hv + h;
  const long qrow = (long)Hk * Dk;

  for (int idx = tid; idx < BV * Dk; idx += NTH) {
    const int r = idx / Dk, d = idx - r * Dk;
    sS[r * LS + d] = dS_end[(bh * Dv + v0 + r) * Dk + d];
  }
#pragma unroll 1
  for (int c = NTc - 1; c >= 0; --c) {
    const int t0 = c * C, rows = min(C, T - t0);
    __syncthreads();  // the previous step's dS written; its operands no longer read
    float* out = dS_out + ((((long)b * NTc + c) * Hv + h) * Dv + v0) * Dk;
    for (int idx = tid; idx < BV * Dk; idx += NTH) {
      const int r = idx / Dk, d = idx - r * Dk;
      out[idx] = sS[r * LS + d];
    }
    load_rows<Dk, LK, NTH>(sK, k + (((long)b * T + t0) * Hk + hk) * Dk, qrow, rows, tid);
    load_rows<Dk, LK, NTH>(sQ, q + (((long)b * T + t0) * Hk + hk) * Dk, qrow, rows, tid);
    load_rows<Dk, LK, NTH>(sW, W + (bh * Tp + t0) * Dk, Dk, C, tid);
    load_rows<C, LA, NTH>(sA, Aqk + (bh * NTc + c) * C * C, C, C, tid);
    cp_async_commit();
    for (int idx = tid; idx < C * BV; idx += NTH) {
      const int r = idx / BV, d = idx - r * BV;
      bool live = r < rows;
      if constexpr (MASKED) live = live && static_cast<bool>(mask[(long)b * T + t0 + (live ? r : 0)]);
      sY[r * LD + d] = live ? f32(dy[(((long)b * T + t0 + r) * Hv + h) * Dv + v0 + d]) : 0.0f;
    }
    if (tid < C) sG[tid] = Gc[bh * Tp + t0 + tid];
    cp_async_wait_all();
    __syncthreads();
    if (tid < C) {
      sE[tid] = expf(sG[C - 1] - sG[tid]);
      sGam[tid] = expf(sG[tid]);
    }
    __syncthreads();

    // dU (token rows r0.., the slice's columns) = Kd dS^T + Aqk^T dY
    const int r0 = 16 * warp;
    float acc[BV / 8][4];
    zero(acc);
    warp_mma<EXACT, Dk>(acc, a_fn([&](int r, int kk) { return sE[r0 + r] * f32(sK[(r0 + r) * LK + kk]); }),
                        BCols<float>{sS, LS});
    warp_mma<EXACT, C>(acc, a_fn([&](int r, int kk) { return f32(sA[kk * LA + r0 + r]); }), BRows<float>{sY, LD});
    float* du = dU_out + (bh * Tp + t0) * Dv + v0;
    for_acc_pairs(acc, [&](int r, int j, float x0, float x1) {
      sU[(r0 + r) * LD + j] = x0;
      sU[(r0 + r) * LD + j + 1] = x1;
      store_pair(du + (long)(r0 + r) * Dv + j, x0, x1);
    });
    __syncthreads();

    // dS <- Gam dS + dY^T diag(gam) Q - dU^T W
    const float Gam = expf(sG[C - 1]);
#pragma unroll 1
    for (int item = warp; item < MT * NB; item += 4) {
      const int m0 = 16 * (item % MT), n0 = UN * (item / MT);
      float sacc[UN / 8][4];
      for_acc(sacc, [&](int r, int j, float& x) { x = Gam * sS[(m0 + r) * LS + n0 + j]; });
      warp_mma<EXACT, C>(sacc, a_fn([&](int r, int kk) { return sY[kk * LD + m0 + r] * sGam[kk]; }),
                         BRows<ST>{sQ + n0, LK});
      warp_mma<EXACT, C>(sacc, a_fn([&](int r, int kk) { return -sU[kk * LD + m0 + r]; }), BRows<ST>{sW + n0, LK});
      for_acc(sacc, [&](int r, int j, float x) { sS[(m0 + r) * LS + n0 + j] = x; });
    }
  }
  __syncthreads();
  for (int idx = tid; idx < BV * Dk; idx += NTH) {
    const int r = idx / Dk, d = idx - r * Dk;
    dS0[(bh * Dv + v0 + r) * Dk + d] = sS[r * LS + d];
  }
}

template <int Dk, int Dv, bool EXACT>
__host__ __device__ constexpr int chunk_grads_smem() {
  using ST = typename Operand<EXACT>::T;
  constexpr int LK = Ld<ST, Dk>::value, LX = (Dk > Dv ? Dk : Dv) + 4;
  return 2 * C * LK * (int)sizeof(ST) + 4 * C * (C + 4) * 4 + 2 * C * LX * 4 + 9 * C * 4 + 4 * 4;
}

// ---------------------------------------------------------------------------------------
// Stage chunk_grads: per (chunk, value head, batch) block of 4 warps; warp w owns token rows 16 w ..
// S0 [B, Hv, Dv, Dk] and saved [B, T / C, Hv, Dv, Dk] give the state entering each chunk; dS_out and
// dU from state_backward. Outputs per value head, float32: dq, dk [B, T, Hv, Dk], dv [B, T, Hv, Dv],
// dbeta and the log-decay gradient dl [B, T, Hv].
// ---------------------------------------------------------------------------------------
template <int Dk, int Dv, bool EXACT, bool MASKED, class TI, class TB, class TD, class OT, class TM>
__device__ void chunk_grads(const TI* q, const TI* k, const TI* v, const TB* beta, const OT* W, const OT* Uv,
                            const OT* Aqk, const float* Gc, const float* S0, const float* saved, const float* dS_out,
                            const float* dU, const TD* dy, const TM* mask, int T, int Hk, int Hv, float* dq, float* dk,
                            float* dv, float* dbeta, float* dl) {
  using ST = typename Operand<EXACT>::T;
  static_assert(same_type<ST, OT>::value, "W, U, Aqk are stored in the operand type");
  constexpr int LK = Ld<ST, Dk>::value, LA = C + 4, LX = (Dk > Dv ? Dk : Dv) + 4;
  static_assert(Dk % 64 == 0 && Dv % 64 == 0, "Dk, Dv multiples of 64");
  GDN_EXTERN_SMEM(float4, smem_cg);
  if (dynamic_smem_bytes() < (unsigned)chunk_grads_smem<Dk, Dv, EXACT>()) __trap();
  ST* sK = reinterpret_cast<ST*>(smem_cg);
  ST* sQ = sK + C * LK;
  float* sAkk = reinterpret_cast<float*>(sQ + C * LK);  // K K^T exp(G_i - G_j), strictly lower; later dA * it
  float* sT = sAkk + C * LA;                            // T = (I + A)^-1
  float* sM = sT + C * LA;                              // A (consumed by the solve), then R, then P
  float* sAq = sM + C * LA;                             // Aqk, then dAqk * Aqk
  float* X1 = sAq + C * LA;                             // U, then dW, then dVb [C][LX]
  float* X2 = X1 + C * LX;                              // dKb
  float* sG = X2 + C * LX;
  float* sGam = sG + C;
  float* sE = sGam + C;
  float* sBeta = sE + C;
  float* sLive = sBeta + C;
  float* sdG = sLive + C;
  float* sdB = sdG + C;
  float* sEK = sdB + C;
  float* sX = sEK + C;    // the decay pairs' part of dl
  float* sRed = sX + C;   // [4] per-warp partial sums of <dS', S>

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g8 = lane >> 2, t4 = lane & 3;
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int NTc = gridDim.x, Tp = NTc * C;
  const int hk = h / (Hv / Hk);
  const int t0 = c * C, rows = min(C, T - t0);
  const long bh = (long)b * Hv + h;
  const long qrow = (long)Hk * Dk;
  const int r0 = 16 * warp;

  load_rows<Dk, LK>(sK, k + (((long)b * T + t0) * Hk + hk) * Dk, qrow, rows, tid);
  load_rows<Dk, LK>(sQ, q + (((long)b * T + t0) * Hk + hk) * Dk, qrow, rows, tid);
  cp_async_commit();
  if (tid < C) {
    bool live = tid < rows;
    if constexpr (MASKED) live = live && static_cast<bool>(mask[(long)b * T + t0 + (live ? tid : 0)]);
    sLive[tid] = live ? 1.0f : 0.0f;
    sBeta[tid] = live ? f32(beta[((long)b * T + t0 + tid) * Hv + h]) : 0.0f;
    const float G = Gc[bh * Tp + t0 + tid];
    sG[tid] = G;
    sGam[tid] = expf(G);
    sdG[tid] = 0.0f;
    sdB[tid] = 0.0f;
    sEK[tid] = 0.0f;
  }
  const float* Sn = c == 0 ? S0 + bh * Dv * Dk : saved + (((long)b * (T / C) + c - 1) * Hv + h) * (long)Dv * Dk;
  const float* dSp = dS_out + (((long)b * NTc + c) * Hv + h) * (long)Dv * Dk;
  {
    float s = 0.0f;
    for (int idx = tid; idx < Dv * Dk; idx += NTHREADS) s += Sn[idx] * dSp[idx];
    s = warp_sum(s);
    if (lane == 0) sRed[warp] = s;
  }
  const OT* aqc = Aqk + (bh * NTc + c) * C * C;
  for (int idx = tid; idx < C * C; idx += NTHREADS) sAq[(idx / C) * LA + idx % C] = f32(aqc[idx]);
  cp_async_wait_all();
  __syncthreads();
  if (tid < C) sE[tid] = expf(sG[C - 1] - sG[tid]);
  kkt_a<EXACT, Dk, LK, LA>(sK, sG, sBeta, sM, warp, sAkk);
  __syncthreads();
  invert_unit_lower<LA>(sM, sT, tid);  // ends with a barrier

  const OT* Wc = W + (bh * Tp + t0) * Dk;
  const OT* Uvc = Uv + (bh * Tp + t0) * Dv;
  const float* dUc = dU + (bh * Tp + t0) * Dv;
  const TD* dYc = dy + (((long)b * T + t0) * Hv + h) * Dv;
  const auto dYv = a_fn([&](int r, int kk) {
    const int i = r0 + r;
    return sLive[i] != 0.0f ? f32(dYc[(long)i * Hv * Dv + kk]) : 0.0f;
  });
  const auto Tt = a_fn([&](int r, int kk) { return sT[kk * LA + r0 + r]; });  // T^T

  // U = Uv - W S^T -> X1
#pragma unroll 1
  for (int n0 = 0; n0 < Dv; n0 += 64) {
    float acc[8][4];
    zero(acc);
    warp_mma<EXACT, Dk>(acc, ARows<OT>{Wc + r0 * Dk, Dk}, BCols<float>{Sn + (long)n0 * Dk, Dk});
    for_acc(acc, [&](int r, int j, float x) {
      X1[(r0 + r) * LX + n0 + j] = f32(Uvc[(r0 + r) * Dv + n0 + j]) - x;
    });
  }
  __syncthreads();
  // dAqk = tril(dY U^T): R into sM, dAqk * Aqk into sAq
  {
    float acc[8][4];
    zero(acc);
    warp_mma<EXACT, Dv>(acc, dYv, BCols<float>{X1, LX});
    for_acc(acc, [&](int r, int j, float x) {
      const int i = r0 + r;
      const bool on = i >= j;
      sM[i * LA + j] = on ? x * expf(sG[i] - sG[j]) : 0.0f;
      sAq[i * LA + j] = on ? x * sAq[i * LA + j] : 0.0f;
    });
  }
  // dQ = diag(gam) dY S + R K
  {
    float dqa[Dk / 8][4];
    zero(dqa);
    warp_mma<EXACT, Dv>(dqa, dYv, BRows<float>{Sn, Dk});
    const float2 s = row_dots(dqa, [&](int r, int j) { return f32(sQ[(r0 + r) * LK + j]); });
    const float ga = sGam[r0 + g8], gb = sGam[r0 + g8 + 8];
    if (t4 == 0) {
      sdG[r0 + g8] += ga * s.x;
      sdG[r0 + g8 + 8] += gb * s.y;
    }
#pragma unroll
    for (int n = 0; n < Dk / 8; ++n) {
      dqa[n][0] *= ga;
      dqa[n][1] *= ga;
      dqa[n][2] *= gb;
      dqa[n][3] *= gb;
    }
    __syncthreads();  // R complete
    warp_mma<EXACT, C>(dqa, ARows<float>{sM + r0 * LA, LA}, BRows<ST>{sK, LK});
    float* dqc = dq + (((long)b * T + t0) * Hv + h) * Dk;
    for_acc_pairs(dqa, [&](int r, int j, float x0, float x1) {
      const int i = r0 + r;
      const float on = sLive[i];
      if (i < rows) store_pair(dqc + (long)i * Hv * Dk + j, on * x0, on * x1);
    });
  }
  float dka[Dk / 8][4];
  zero(dka);
  // dK += diag(exp(G_C - G)) U dS' + R^T Q
  {
    float ek0 = 0.0f, ek1 = 0.0f;
    const float ea = sE[r0 + g8], eb = sE[r0 + g8 + 8];
#pragma unroll
    for (int n0 = 0; n0 < Dk; n0 += 64) {
      float acc[8][4];
      zero(acc);
      warp_mma<EXACT, Dv>(acc, ARows<float>{X1 + r0 * LX, LX}, BRows<float>{dSp + n0, Dk});
      const float2 s = row_dots(acc, [&](int r, int j) { return f32(sK[(r0 + r) * LK + n0 + j]); });
      ek0 += s.x;
      ek1 += s.y;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        dka[n0 / 8 + n][0] += ea * acc[n][0];
        dka[n0 / 8 + n][1] += ea * acc[n][1];
        dka[n0 / 8 + n][2] += eb * acc[n][2];
        dka[n0 / 8 + n][3] += eb * acc[n][3];
      }
    }
    if (t4 == 0) {
      sEK[r0 + g8] = ea * ek0;
      sEK[r0 + g8 + 8] = eb * ek1;
    }
  }
  warp_mma<EXACT, C>(dka, a_fn([&](int r, int kk) { return sM[kk * LA + r0 + r]; }), BRows<ST>{sQ, LK});
  __syncthreads();  // U and R no longer read
  // dW = -dU S -> X1
#pragma unroll 1
  for (int n0 = 0; n0 < Dk; n0 += 64) {
    float acc[8][4];
    zero(acc);
    warp_mma<EXACT, Dv>(acc, ARows<float>{dUc + r0 * Dv, Dv}, BRows<float>{Sn + n0, Dk});
    for_acc(acc, [&](int r, int j, float x) { X1[(r0 + r) * LX + n0 + j] = -x; });
  }
  __syncthreads();
  // dKb = T^T dW -> X2; dK += diag(beta gam) dKb
  {
    float kb0 = 0.0f, kb1 = 0.0f;
    const float ba = sBeta[r0 + g8] * sGam[r0 + g8], bb = sBeta[r0 + g8 + 8] * sGam[r0 + g8 + 8];
#pragma unroll
    for (int n0 = 0; n0 < Dk; n0 += 64) {
      float acc[8][4];
      zero(acc);
      warp_mma<EXACT, C>(acc, Tt, BRows<float>{X1 + n0, LX});
      const float2 s = row_dots(acc, [&](int r, int j) { return f32(sK[(r0 + r) * LK + n0 + j]); });
      kb0 += s.x;
      kb1 += s.y;
      for_acc(acc, [&](int r, int j, float x) { X2[(r0 + r) * LX + n0 + j] = x; });
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        dka[n0 / 8 + n][0] += ba * acc[n][0];
        dka[n0 / 8 + n][1] += ba * acc[n][1];
        dka[n0 / 8 + n][2] += bb * acc[n][2];
        dka[n0 / 8 + n][3] += bb * acc[n][3];
      }
    }
    if (t4 == 0) {
      const int ia = r0 + g8, ib = r0 + g8 + 8;
      sdB[ia] += sGam[ia] * kb0;
      sdB[ib] += sGam[ib] * kb1;
      sdG[ia] += ba * kb0;
      sdG[ib] += bb * kb1;
    }
  }
  __syncthreads();  // dW no longer read
  // dVb = T^T dU -> X1; dV = diag(beta) dVb
  {
    float vb0 = 0.0f, vb1 = 0.0f;
    const TI* vrow = v + (((long)b * T + t0) * Hv + h) * Dv;
    float* dvc = dv + (((long)b * T + t0) * Hv + h) * Dv;
#pragma unroll 1
    for (int n0 = 0; n0 < Dv; n0 += 64) {
      float acc[8][4];
      zero(acc);
      warp_mma<EXACT, C>(acc, Tt, BRows<float>{dUc + n0, Dv});
      const float2 s = row_dots(acc, [&](int r, int j) {
        const int i = r0 + r;
        return i < rows ? f32(vrow[(long)i * Hv * Dv + n0 + j]) : 0.0f;
      });
      vb0 += s.x;
      vb1 += s.y;
      for_acc_pairs(acc, [&](int r, int j, float x0, float x1) {
        const int i = r0 + r;
        X1[i * LX + n0 + j] = x0;
        X1[i * LX + n0 + j + 1] = x1;
        const float bi = sBeta[i];  // 0 on masked steps
        if (i < rows) store_pair(dvc + (long)i * Hv * Dv + n0 + j, bi * x0, bi * x1);
      });
    }
    if (t4 == 0) {
      sdB[r0 + g8] += vb0;
      sdB[r0 + g8 + 8] += vb1;
    }
  }
  __syncthreads();
  // dA = strict_tril(-(dKb W^T + dVb Uv^T)): P into sM, dA * Akk into sAkk
  {
    float acc[8][4];
    zero(acc);
    warp_mma<EXACT, Dk>(acc, ARows<float>{X2 + r0 * LX, LX}, BCols<OT>{Wc, Dk});
    warp_mma<EXACT, Dv>(acc, ARows<float>{X1 + r0 * LX, LX}, BCols<OT>{Uvc, Dv});
    for_acc(acc, [&](int r, int j, float x) {
      const int i = r0 + r;
      const bool on = i > j;
      sM[i * LA + j] = on ? -x * sBeta[i] * expf(sG[i] - sG[j]) : 0.0f;
      sAkk[i * LA + j] = on ? -x * sAkk[i * LA + j] : 0.0f;
    });
  }
  __syncthreads();
  // dK += P K + P^T K
  warp_mma<EXACT, C>(dka, ARows<float>{sM + r0 * LA, LA}, BRows<ST>{sK, LK});
  warp_mma<EXACT, C>(dka, a_fn([&](int r, int kk) { return sM[kk * LA + r0 + r]; }), BRows<ST>{sK, LK});
  {
    float* dkc = dk + (((long)b * T + t0) * Hv + h) * Dk;
    for_acc_pairs(dka, [&](int r, int j, float x0, float x1) {
      const int i = r0 + r;
      const float on = sLive[i];
      if (i < rows) store_pair(dkc + (long)i * Hv * Dk + j, on * x0, on * x1);
    });
  }
  // The log-decay gradient dl_m = sum_{i >= m} dG_i, summed without cancellation: each decay
  // exp(G_i - G_j) (i > j) adds its term to dl_m for j < m <= i only, and exp(G_C - G_i) for i < m.
  // So dl_m = sum_{i >= m} (the exp(G_i) terms) + Gam <dS', S> + sum_{i < m} exp(G_C - G_i) dKd_i.k_i
  //         + sum_{i >= m > j} (dA_ij A_ij + dAqk_ij Aqk_ij).
  // (Forming dG_i first and summing it loses the small dl behind a tiny gate to rounding.)
  if (tid < C) {
    float rowE = 0.0f;
    for (int j = 0; j < C; ++j) rowE += sAkk[tid * LA + j];
    sdB[tid] += rowE;
  }
  __syncthreads();
  if (tid < C) {  // column j: suffix sums over i of dA * A + dAqk * Aqk, in place in sAq
    const int j = tid;
    float f = 0.0f;
    for (int i = C - 1; i > j; --i) {
      f += sBeta[i] * sAkk[i * LA + j] + sAq[i * LA + j];
      sAq[i * LA + j] = f;
    }
  }
  __syncthreads();
  if (tid < C) {
    float s = 0.0f;
    for (int j = 0; j < tid; ++j) s += sAq[tid * LA + j];
    sX[tid] = s;
  }
  __syncthreads();
  if (tid == 0) {
    float pre = 0.0f;
    for (int i = 0; i < C; ++i) {  // sEK becomes its prefix sums before i
      const float e = sEK[i];
      sEK[i] = pre;
      pre += e;
    }
    const float end = expf(sG[C - 1]) * (sRed[0] + sRed[1] + sRed[2] + sRed[3]);
    float suf = 0.0f;
    for (int i = C - 1; i >= 0; --i) {
      suf += sdG[i];
      sdG[i] = suf + end + sEK[i] + sX[i];
    }
  }
  __syncthreads();
  if (tid < rows) {
    const long o = ((long)b * T + t0 + tid) * Hv + h;
    dl[o] = sLive[tid] * sdG[tid];
    dbeta[o] = sLive[tid] * sdB[tid];
  }
}

}  // namespace gdn_tc

#endif  // GDN_CHUNKED_BACKWARD_CUH
