// Stages state and output of the CUDA chunked kernels (see common.cuh), with S in shared memory:
// launch 2. The readout (output) of a chunk needs the state entering it, so it runs here.
#ifndef GDN_CHUNKED_STATE_CUH
#define GDN_CHUNKED_STATE_CUH

namespace gdn_tc {

template <int Dk, int BV, bool EXACT, bool SHARE_WQ>
__host__ __device__ constexpr int state_smem() {
  using ST = typename Operand<EXACT>::T;
  constexpr int LK = Ld<ST, Dk>::value;
  constexpr int LA = Ld<ST, C>::value, LU = Ld<ST, BV>::value;
  return BV * (Dk + 8) * 4 + (SHARE_WQ ? 2 : 3) * C * LK * (int)sizeof(ST) + C * (BV + 4) * 4 +
         (C * LA + C * LU) * (int)sizeof(ST) + 3 * C * 4;
}

// ---------------------------------------------------------------------------------------
// Launch 2, stages state and output: per (value slice, value head, batch) block; walks the chunks in order.
// ---------------------------------------------------------------------------------------
// KEYGATE: q and k are launch 1's Qg and Kd ([B, T, Hv, Dk], decays applied; Hk = Hv), Gc is 0,
// and Gk [B, Hv, NTc, Dk] gives the chunk's decay per key column, which S takes column by column.
// SAVE_EVERY = E > 0: the state after every E-th full chunk (after tokens 64 E, 128 E, ...) also goes
// to saved [B, T / (64 E), Hv, Dv, Dk] (the backward's chunk states; serving's return_states).
template <int Dk, int Dv, int BV, bool EXACT, bool MASKED, bool SHARE_WQ, int NH, bool KEYGATE = false,
          int SAVE_EVERY = 0, class TI, class OT, class TM>
__device__ void state_output(const TI* q, const TI* k, const OT* W, const OT* U, const OT* Aqk, const float* Gc,
                             const float* S0, const TM* mask, int T, int Hk, int Hv, TI* y, float* S_out,
                             const float* Gk = nullptr, float* saved = nullptr) {
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
  if (dynamic_smem_bytes() < (unsigned)(state_smem<Dk, BV, EXACT, SHARE_WQ>() + (KEYGATE ? Dk * 4 : 0))) __trap();
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
  float* sGk = sM + C;  // KEYGATE: the chunk's decay per key column

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
    if constexpr (KEYGATE) {
      for (int idx = tid; idx < Dk; idx += NTH) sGk[idx] = Gk[(bh * NTc + c) * Dk + idx];
    }
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
    // Stage output: y = diag(exp(G)) Q S^T + Aqk delta
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

    // Stage state: S <- exp(G_last) S + (delta * exp(G_last - G))^T K
    const float eG = expf(Gl);
#pragma unroll 1
    for (int item = warp; item < MT * NB; item += NW) {
      const int m0 = 16 * (item % MT), n0 = UN * (item / MT);
      float acc[UN / 8][4];
      for_acc(acc, [&](int r, int j, float& x) { x = (KEYGATE ? sGk[n0 + j] : eG) * sS[(m0 + r) * LS + n0 + j]; });
      warp_mma<EXACT, C>(acc, a_fn([&](int r, int kk) { return sD[kk * LD + m0 + r] * sE[kk]; }),
                         BRows<ST>{sK + n0, LK});
      for_acc(acc, [&](int r, int j, float x) { sS[(m0 + r) * LS + n0 + j] = x; });
    }
    if constexpr (SAVE_EVERY > 0) {
      // The next write of S is past two barriers of step c + 1, so this read needs only this one.
      if ((c + 1) % SAVE_EVERY == 0 && t0 + C <= T) {
        __syncthreads();
        const long ns = T / (C * SAVE_EVERY);
        float* sv = saved + (((long)b * ns + (c + 1) / SAVE_EVERY - 1) * Hv + h) * (long)Dv * Dk + (long)v0 * Dk;
        for (int idx = tid; idx < BV * Dk; idx += NTH) {
          const int r = idx / Dk, d = idx - r * Dk;
          sv[idx] = sS[r * LS + d];
        }
      }
    }
  }
  __syncthreads();
  for (int idx = tid; idx < BV * Dk; idx += NTH) {
    const int r = idx / Dk, d = idx - r * Dk;
    S_out[(bh * Dv + v0 + r) * Dk + d] = sS[r * LS + d];
  }
}

}  // namespace gdn_tc

#endif  // GDN_CHUNKED_STATE_CUH
