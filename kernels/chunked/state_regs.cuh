// Stages state and output of the CUDA chunked kernels (see common.cuh), with S in registers:
// launch 2 for bf16 operands and Dk <= 128.
#ifndef GDN_CHUNKED_STATE_REGS_CUH
#define GDN_CHUNKED_STATE_REGS_CUH

namespace gdn_tc {

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

// SAVE_EVERY: as state_output (state.cuh).
template <int Dk, int Dv, int NW, bool MASKED, int SAVE_EVERY = 0, class TI, class TM>
__device__ void state_output_regs(const TI* q, const TI* k, const __nv_bfloat16* W, const __nv_bfloat16* U,
                                  const __nv_bfloat16* Aqk, const float* Gc, const float* S0, const TM* mask, int T,
                                  int Hk, int Hv, TI* y, float* S_out, float* saved = nullptr) {
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

    // Stage output: y^T = (S Q^T) diag(exp(G)) + delta^T Aqk^T
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

    // Stage state: S <- exp(G_last) S + delta^T diag(exp(G_last - G)) K
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
    if constexpr (SAVE_EVERY > 0) {
      if ((c + 1) % SAVE_EVERY == 0 && t0 + C <= T) {
        const long ns = T / (C * SAVE_EVERY);
        float* sv = saved + ((((long)b * ns + (c + 1) / SAVE_EVERY - 1) * Hv + h) * Dv + v0 + vw + g) * Dk + 2 * t;
#pragma unroll
        for (int j = 0; j < KT; ++j) {
          *reinterpret_cast<float2*>(sv + 8 * j) = make_float2(s[j][0], s[j][1]);
          *reinterpret_cast<float2*>(sv + 8 * Dk + 8 * j) = make_float2(s[j][2], s[j][3]);
        }
      }
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

#endif  // GDN_CHUNKED_STATE_REGS_CUH
