// Chunked gated delta rule, launch 1 of 2, stages kkt_solve and wy (named as in ops/chunked.py
// and the CUDA kernels): everything inside one chunk that does not depend on the state entering it. One threadgroup of NSG simdgroups per (chunk n, value head hv, batch bz).
//
// Inputs as the public API takes them: q, k: [B, T, Hk, Dk], v: [B, T, Hv, Dv] (InT); gates
// g, beta: [B, T, Hv] (GDN_FUSED 0), or a, b: [B, T, Hv], A_log, dt_bias: [Hv], lower_bound: [4] (element 0 used)
// (GDN_FUSED 1, template LOWER, NEG); mask: [B, T] (GDN_MASKED 1). Steps past T (the last chunk's
// tail) and masked steps are identity steps: staged as q = k = v = 0, log-gate 0, beta 0, which
// also makes their y exactly 0.
// Outputs (float32), per (bz, hv, n), with N = ceil(T / C):
//   wq: [B, Hv, N, 2C, Dk]  rows 0..C-1: -W = -T diag(beta*gamma) K; rows C..2C-1: Qe = diag(gamma) Q - P W
//   uy: [B, Hv, N, 2C, Dv]  rows 0..C-1: Uv = T diag(beta) V;        rows C..2C-1: Yv = P Uv
//   kd: [B, Hv, N, C, Dk]   (gamma_C / gamma_j) k_j
//   gc: [B, Hv, N]          gamma_C
// with T = (I + A)^-1, A_ij = beta_i (k_i.k_j) gamma_i/gamma_j (j < i), P_ij = (q_i.k_j) gamma_i/gamma_j (j <= i).
// q, k, v are staged through threadgroup memory as float32 slabs of C x 8, the width of one
// simdgroup matrix, so any input dtype feeds the float32 products.
// Template: C (chunk, multiple of 8), Dk, Dv (multiples of 8), Hk, Hv, NSG, LOWER, NEG, KEYGATE.
// GDN_VARLEN (define): packed sequences, chunks from the table `chunks` (below) instead of n * C.
//
// KEYGATE (one gate per key column): g: [B, T, Hv, Dk], or a: [B, T, Hv, Dk] with dt_bias [Hv] or
// [Hv, Dk] (GDN_DT_KEY); gc: [B, Hv, N, Dk]. The per-head log-gates above are then 0 (gamma = 1),
// and the decays enter column by column, per slab of 8 key columns: kd = (gamma_C / gamma_j) k_j
// and the Q, K slabs of W and Qe carry gamma_i per column, and A, P take their decays folded into
// the operands, split at the 8-step tile boundaries so that every factor is a decay over steps in
// order, in [0, 1] (never overflowing for gates near 0): for i in tile I and j in an earlier tile J,
//   exp(b_i - b_j) = exp(b_i - e_J) exp(e_J - b_j),  e_J the cumulative log-gate at J's last step,
// the left factor on row i of K (or Q), a copy per pair (I, J); the right on row j of K. Pairs
// inside one tile are summed exactly, one decay per column. Factors below exp(GDN_LOG_DECAY_FLOOR)
// are exact zeros (gates.h).
//
// GDN_BACKWARD 1 (scalar gates given as g, beta; the recompute of the chunked backward,
// chunk_grads.metal): the same outputs, each g floored at GDN_G_FLOOR before its log (the ops
// backward's convention, so that dg = dlog g / g stays finite at g = 0), and five more, per (bz, hv, n):
//   akk: [B, Hv, N, C, C]  (k_i.k_j) gamma_i/gamma_j for j < i, else 0 (A without beta)
//   aqk: [B, Hv, N, C, C]  P
//   decay: [B, Hv, N, C, C]  gamma_i/gamma_j for j <= i, else 0
//   tin: [B, Hv, N, C, C]  T = (I + A)^-1
//   gts: [B, Hv, N, 5, C]  rows: log-gate, beta, live (1 or 0), gamma_i, gamma_C/gamma_i

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
constexpr uint NT = NSG * 32;
constexpr uint TC = C / 8;
const uint n = threadgroup_position_in_grid.x;
const uint hv = threadgroup_position_in_grid.y;
const uint bz = threadgroup_position_in_grid.z;
const uint hk = hv / (Hv / Hk);
const int T = q_shape[1];
#if GDN_VARLEN
// Packed sequences (B = 1): chunk n covers tokens chunks[n][0] .. chunks[n][1] - 1 (int32
// [N, 2], at most C tokens, never across a sequence's end); the rest of it are identity steps.
const int N = chunks_shape[0];
const int t0 = chunks[2 * n];
const int t_end = chunks[2 * n + 1];
#else
const int N = (T + C - 1) / C;
const int t0 = n * C;
const int t_end = T;
#endif

threadgroup float lgs[C];      // log-gate (0 for identity steps)
threadgroup float bet[C];
threadgroup float liv[C];      // 1 for a live step, 0 for masked or past T
threadgroup float gam[C];
threadgroup float endd[C];
threadgroup float Am[C * C];   // A, then diag(gamma)
threadgroup float Pm[C * C];   // P
threadgroup float M1[C * C];   // -T diag(beta*gamma)
threadgroup float M2[C * C];   // T diag(beta)
threadgroup float PM1[C * C];  // P M1
threadgroup float PM2[C * C];  // P M2
threadgroup float Xs[C * 8];   // staged slab of k (or v)
threadgroup float Zs[C * 8];   // staged slab of q
threadgroup float LGs[KEYGATE ? C * 8 : 1];  // KEYGATE: log-gates of the staged slab of columns
// KEYGATE scratch while A and P are formed (the arrays are free until the solve): left operands per
// tile pair (K in M1, Q in M2), right operands (K in PM1), exact in-tile sums (A, P in PM2).
threadgroup float* KLs = M1;
threadgroup float* QLs = M2;
threadgroup float* KRs = PM1;
threadgroup float* DAs = PM2;
threadgroup float* DPs = PM2 + TC * 64;

for (uint i = tid; i < C; i += NT) {
  const int t = t0 + int(i);
  bool live = t < t_end;
#if GDN_MASKED
  if (live) live = bool(mask[bz * T + t]);
#endif
  float lg = 0.0f, be = 0.0f;
  if (live) {
    const uint gi = (bz * T + t) * Hv + hv;
#if GDN_FUSED
    if (!KEYGATE) {
      // The log of the decay directly: exact for decays that would underflow as exp().
      float log_rate = float(A_log[hv]);
      lg = gdn_log_decay(float(a[gi]), metal::exp(log_rate), log_rate, float(dt_bias[hv]), lower_bound[0], LOWER);
    }
    be = gdn_beta(float(b[gi]), NEG);
#else
#if GDN_BACKWARD
    if (!KEYGATE) lg = gdn_log_gate(metal::max(float(g[gi]), GDN_G_FLOOR));
#else
    if (!KEYGATE) lg = gdn_log_gate(float(g[gi]));
#endif
    be = float(beta[gi]);
#endif
  }
  lgs[i] = lg;
  bet[i] = be;
  liv[i] = live ? 1.0f : 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (uint i = tid; i < C; i += NT) {
  float s = 0.0f;
  for (uint l = 0; l <= i; ++l) s += lgs[l];
  gam[i] = metal::exp(s);
  float e = 0.0f;
  for (uint l = i + 1; l < C; ++l) e += lgs[l];
  endd[i] = metal::exp(e);
}

// Rows of this chunk for one head: element (i, c) of a slab starting at column d.
const device InT* kc = k + ((bz * T + t0) * Hk + hk) * Dk;
const device InT* qc = q + ((bz * T + t0) * Hk + hk) * Dk;
const device InT* vc = v + ((bz * T + t0) * Hv + hv) * Dv;

// Stage kkt_solve. A = K K^T and P = Q K^T (lower-triangular 8x8 tiles), accumulated over slabs of Dk.
constexpr uint NJ = (TC * TC + NSG - 1) / NSG;
simdgroup_float8x8 acc_a[NJ];
simdgroup_float8x8 acc_p[NJ];
for (uint j = 0; j < NJ; ++j) {
  acc_a[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  acc_p[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}
if (KEYGATE) {
  for (uint e = tid; e < 2 * TC * 64; e += NT) DAs[e] = 0.0f;
}
for (uint d = 0; d < Dk; d += 8) {
  for (uint e = tid; e < C * 8; e += NT) {
    uint i = e / 8, c = e % 8;
    bool live = liv[i] != 0.0f;
    Xs[e] = live ? float(kc[i * Hk * Dk + d + c]) : 0.0f;
    Zs[e] = live ? float(qc[i * Hk * Dk + d + c]) : 0.0f;
  }
  if (KEYGATE) {
    for (uint e = tid; e < C * 8; e += NT) {
      uint i = e / 8, c = e % 8;
      float lg = 0.0f;
      if (liv[i] != 0.0f) {
        const uint gk = ((bz * T + t0 + i) * Hv + hv) * Dk + d + c;
#if GDN_FUSED
        float log_rate = float(A_log[hv]);
        float dtb = float(dt_bias[GDN_DT_KEY ? hv * Dk + d + c : hv]);
        lg = gdn_log_decay(float(a[gk]), metal::exp(log_rate), log_rate, dtb, lower_bound[0], LOWER);
#else
        lg = gdn_log_gate(float(g[gk]));
#endif
      }
      LGs[e] = lg;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (KEYGATE) {
    // Right operands: row j of K times its decay to the end of its tile.
    for (uint e = tid; e < C * 8; e += NT) {
      uint j = e / 8, c = e % 8;
      float x = 0.0f;
      for (uint l = j + 1; l < (j / 8 + 1) * 8; ++l) x += LGs[l * 8 + c];
      KRs[e] = Xs[e] * gdn_decay_factor(x);
    }
    // Left operands of tile pair (I, J), J < I: row i of K and Q times the decay from J's end to i.
    for (uint e = tid; e < TC * TC * 64; e += NT) {
      uint t = e / 64, r = (e / 8) % 8, c = e % 8;
      uint ti = t / TC, tj = t % TC;
      if (tj < ti) {
        uint i = ti * 8 + r;
        float x = 0.0f;
        for (uint l = (tj + 1) * 8; l <= i; ++l) x += LGs[l * 8 + c];
        float f = gdn_decay_factor(x);
        KLs[e] = Xs[i * 8 + c] * f;
        QLs[e] = Zs[i * 8 + c] * f;
      }
    }
    // Pairs j <= i inside one tile, exactly: one decay per column.
    for (uint e = tid; e < TC * 64; e += NT) {
      uint ti = e / 64, r = (e / 8) % 8, s8 = e % 8;
      if (s8 <= r) {
        uint i = ti * 8 + r, j = ti * 8 + s8;
        float sa = 0.0f, sp = 0.0f;
        for (uint c = 0; c < 8; ++c) {
          float x = 0.0f;
          for (uint l = j + 1; l <= i; ++l) x += LGs[l * 8 + c];
          float f = gdn_decay_factor(x) * Xs[j * 8 + c];
          sa += Xs[i * 8 + c] * f;
          sp += Zs[i * 8 + c] * f;
        }
        DAs[e] += sa;
        DPs[e] += sp;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint j = 0; j < NJ; ++j) {
    uint t = sg + j * NSG;
    uint ti = t / TC, tj = t % TC;
    if (KEYGATE) {
      if (t < TC * TC && tj < ti) {
        simdgroup_float8x8 kl, ql, kr;
        simdgroup_load(kl, KLs + t * 64, 8);
        simdgroup_load(ql, QLs + t * 64, 8);
        simdgroup_load(kr, KRs + tj * 64, 8, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(acc_a[j], kl, kr, acc_a[j]);
        simdgroup_multiply_accumulate(acc_p[j], ql, kr, acc_p[j]);
      }
    } else if (t < TC * TC && tj <= ti) {
      simdgroup_float8x8 kl, ql, kr;
      simdgroup_load(kl, Xs + ti * 64, 8);
      simdgroup_load(ql, Zs + ti * 64, 8);
      simdgroup_load(kr, Xs + tj * 64, 8, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(acc_a[j], kl, kr, acc_a[j]);
      simdgroup_multiply_accumulate(acc_p[j], ql, kr, acc_p[j]);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
for (uint j = 0; j < NJ; ++j) {
  uint t = sg + j * NSG;
  if (t < TC * TC) {
    uint ti = t / TC, tj = t % TC;
    simdgroup_store(acc_a[j], Am + ti * 8 * C + tj * 8, C);
    simdgroup_store(acc_p[j], Pm + ti * 8 * C + tj * 8, C);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (KEYGATE) {
  // The in-tile pairs, decays included (the per-head decays below are all 1).
  for (uint e = tid; e < TC * 64; e += NT) {
    uint ti = e / 64, r = (e / 8) % 8, s8 = e % 8;
    Am[(ti * 8 + r) * C + ti * 8 + s8] = DAs[e];
    Pm[(ti * 8 + r) * C + ti * 8 + s8] = DPs[e];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// Decay factors, as sums of log-gates over steps j+1..i (never a difference of prefix sums,
// so a near-zero gate early in the chunk costs later pairs no precision).
for (uint e = tid; e < C * C; e += NT) {
  uint i = e / C, j = e % C;
  float dec = 0.0f;
  if (i >= j) {
    float s = 0.0f;
    for (uint l = j + 1; l <= i; ++l) s += lgs[l];
    dec = metal::exp(s);
  }
#if GDN_BACKWARD
  {
    const uint cc = ((bz * Hv + hv) * N + n) * (C * C) + e;
    akk[cc] = i > j ? Am[e] * dec : 0.0f;
    aqk[cc] = Pm[e] * dec;
    decay[cc] = dec;
  }
#endif
  Am[e] = i > j ? bet[i] * Am[e] * dec : 0.0f;
  Pm[e] = Pm[e] * dec;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// T = (I + A)^-1 by forward substitution, one column per thread: column c of T only reads
// A (shared, read-only) and its own earlier entries, so no barrier inside.
for (uint c = tid; c < C; c += NT) {
  for (uint i = 0; i < C; ++i) {
    float x = (i == c) ? 1.0f : 0.0f;
    if (i > c) {
      for (uint j = c; j < i; ++j) x -= Am[i * C + j] * M2[j * C + c];
    }
    M2[i * C + c] = x;
  }
  for (uint i = 0; i < C; ++i) {
    float x = M2[i * C + c];
#if GDN_BACKWARD
    tin[((bz * Hv + hv) * N + n) * (C * C) + i * C + c] = x;
#endif
    M1[i * C + c] = -x * bet[c] * gam[c];
    M2[i * C + c] = x * bet[c];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (uint e = tid; e < C * C; e += NT) {
  uint i = e / C, j = e % C;
  Am[e] = i == j ? gam[i] : 0.0f;
}
for (uint t = sg; t < TC * TC; t += NSG) {
  uint ti = t / TC, tj = t % TC;
  simdgroup_float8x8 x1 = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_float8x8 x2 = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (uint kk = 0; kk < TC; ++kk) {
    simdgroup_float8x8 pl, r1, r2;
    simdgroup_load(pl, Pm + ti * 8 * C + kk * 8, C);
    simdgroup_load(r1, M1 + kk * 8 * C + tj * 8, C);
    simdgroup_load(r2, M2 + kk * 8 * C + tj * 8, C);
    simdgroup_multiply_accumulate(x1, pl, r1, x1);
    simdgroup_multiply_accumulate(x2, pl, r2, x2);
  }
  simdgroup_store(x1, PM1 + ti * 8 * C + tj * 8, C);
  simdgroup_store(x2, PM2 + ti * 8 * C + tj * 8, C);
}
threadgroup_barrier(mem_flags::mem_threadgroup);

const uint head = (bz * Hv + hv) * N + n;
device float* wq_ = wq + head * (2 * C * Dk);
device float* uy_ = uy + head * (2 * C * Dv);
device float* kd_ = kd + head * (C * Dk);

// Stage wy (and output's chunk-local terms). Per slab of Dk: -W = M1 K and Qe = diag(gamma) Q + (P M1) K, and Kd.
for (uint d = 0; d < Dk; d += 8) {
  if (KEYGATE) {
    for (uint e = tid; e < C * 8; e += NT) {
      uint i = e / 8, c = e % 8;
      float lg = 0.0f;
      if (liv[i] != 0.0f) {
        const uint gk = ((bz * T + t0 + i) * Hv + hv) * Dk + d + c;
#if GDN_FUSED
        float log_rate = float(A_log[hv]);
        float dtb = float(dt_bias[GDN_DT_KEY ? hv * Dk + d + c : hv]);
        lg = gdn_log_decay(float(a[gk]), metal::exp(log_rate), log_rate, dtb, lower_bound[0], LOWER);
#else
        lg = gdn_log_gate(float(g[gk]));
#endif
      }
      LGs[e] = lg;
    }
  }
  if (KEYGATE) threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint e = tid; e < C * 8; e += NT) {
    uint i = e / 8, c = e % 8;
    bool live = liv[i] != 0.0f;
    float kx = live ? float(kc[i * Hk * Dk + d + c]) : 0.0f;
    float qx = live ? float(qc[i * Hk * Dk + d + c]) : 0.0f;
    if (KEYGATE) {
      // Per column: gamma_i on K (for W) and Q (for Qe), gamma_C / gamma_i on what row i writes.
      float to = 0.0f, from = 0.0f;
      for (uint l = 0; l <= i; ++l) to += LGs[l * 8 + c];
      for (uint l = i + 1; l < C; ++l) from += LGs[l * 8 + c];
      float gi = gdn_decay_factor(to);
      Xs[e] = gi * kx;
      Zs[e] = gi * qx;
      kd_[i * Dk + d + c] = gdn_decay_factor(from) * kx;
    } else {
      Xs[e] = kx;
      Zs[e] = qx;
      kd_[i * Dk + d + c] = endd[i] * kx;
    }
  }
  if (KEYGATE && tid < 8) {
    float all = 0.0f;
    for (uint l = 0; l < C; ++l) all += LGs[l * 8 + tid];
    gc[head * Dk + d + tid] = gdn_decay_factor(all);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint t = sg; t < 2 * TC; t += NSG) {
    uint ti = t % TC;
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (uint kk = 0; kk < TC; ++kk) {
      simdgroup_float8x8 l, r;
      simdgroup_load(r, Xs + kk * 64, 8);
      simdgroup_load(l, (t < TC ? M1 : PM1) + ti * 8 * C + kk * 8, C);
      simdgroup_multiply_accumulate(acc, l, r, acc);
      if (t >= TC) {
        simdgroup_load(r, Zs + kk * 64, 8);
        simdgroup_load(l, Am + ti * 8 * C + kk * 8, C);
        simdgroup_multiply_accumulate(acc, l, r, acc);
      }
    }
    simdgroup_store(acc, wq_ + ((t < TC ? 0 : C) + ti * 8) * Dk + d, Dk);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
// Per slab of Dv: Uv = M2 V and Yv = (P M2) V.
for (uint d = 0; d < Dv; d += 8) {
  for (uint e = tid; e < C * 8; e += NT) {
    uint i = e / 8, c = e % 8;
    Xs[e] = liv[i] != 0.0f ? float(vc[i * Hv * Dv + d + c]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint t = sg; t < 2 * TC; t += NSG) {
    uint ti = t % TC;
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (uint kk = 0; kk < TC; ++kk) {
      simdgroup_float8x8 l, r;
      simdgroup_load(r, Xs + kk * 64, 8);
      simdgroup_load(l, (t < TC ? M2 : PM2) + ti * 8 * C + kk * 8, C);
      simdgroup_multiply_accumulate(acc, l, r, acc);
    }
    simdgroup_store(acc, uy_ + ((t < TC ? 0 : C) + ti * 8) * Dv + d, Dv);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
if (!KEYGATE && tid == 0) {
  gc[head] = gam[C - 1];
}
#if GDN_BACKWARD
for (uint i = tid; i < C; i += NT) {
  device float* gt = gts + head * (5 * C) + i;
  gt[0] = lgs[i];
  gt[C] = bet[i];
  gt[2 * C] = liv[i];
  gt[3 * C] = gam[i];
  gt[4 * C] = endd[i];
}
#endif
