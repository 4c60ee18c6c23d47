// Chunked gated delta rule, backward, stage chunk_grads: the gradients of one chunk's inputs, every
// chunk in parallel. One threadgroup of NSG simdgroups per (chunk n, value head hv, batch bz).
// Scalar gates. With S = S_n (the state entering the chunk), dS' = dS_{n+1} (the adjoint of the
// state leaving it), dU (state_backward.metal) and kkt_solve_wy's operands (GDN_BACKWARD):
//   U   = Uv - W S^T            dQe = dY S           dW = -dU S        dKd = U dS'
//   dKb = T^T dW                dVb = T^T dU          dAqk = tril_incl(dY U^T)
//   dA  = strict_tril(-(dKb W^T + dVb Uv^T))
//   dq  = diag(gamma) dQe + R K,                       R  = dAqk (.) decay
//   dk  = R^T Q + diag(gamma_C/gamma) dKd + diag(beta gamma) dKb + Pa K + Pa^T K,  Pa = dA (.) beta_i decay
//   dv  = diag(beta) dVb
//   dbeta_i = dVb_i.v_i + gamma_i dKb_i.k_i + sum_j dA_ij akk_ij
//   dlog g_l = sum_{i>=l} gamma_i (dQe_i.q_i + beta_i dKb_i.k_i) + sum_{i<l} (gamma_C/gamma_i) dKd_i.k_i
//              + gamma_C <dS', S> + sum_{i>=l} sum_{j<l} (dA_ij A_ij + dAqk_ij Aqk_ij)
// Each term of dlog g_l is a product that carries the decay of step l itself (a pair spanning l, a
// gamma_i with i >= l, ...), never a difference of such sums, so dlog g_l keeps its precision
// relative to g_l when g_l is tiny and dg = dlog g / g stays accurate (the caller divides).
// The kernel keeps -dKb (nKb) rather than dKb, which lets dA be one accumulated product:
// dA = -(nKb (-W)^T + dVb Uv^T).
// Inputs: q, k [B, T, Hk, Dk], v [B, T, Hv, Dv] (any float dtype); wq, uy, akk, aqk, decay, tin, gts
// (kkt_solve_wy.metal, GDN_BACKWARD); state_in [B, Hv, Dv, Dk] (S_0) and saved [B, M, Hv, Dv, Dk]
// (S_n = saved[n - 1] for n >= 1: the state pass of state_output.metal with SAVE_EVERY 1; M >= N - 1);
// dsn [B, Hv, N, Dv, Dk] (dS_{n+1}); du, dyc [B, Hv, N, C, Dv] (state_backward.metal). All but
// q, k, v float32.
// Outputs (float32): dq, dk [B, T, Hv, Dk] (per value head: the caller sums a key head's R value
// heads), dv [B, T, Hv, Dv], dbeta, dlg [B, T, Hv] (zero on masked steps; rows past T are not
// written); wk [B, Hv, N, C (2 Dv + 4 Dk)]: this chunk's wide intermediates (U, dVb, dQe, -dW,
// dKd, -dKb), kept in device memory because at Dk = Dv = 128 they would not fit the 32 KiB of
// threadgroup memory.
// Template: C, Dk, Dv, Hk, Hv, NSG.

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
constexpr uint NT = NSG * 32;
constexpr uint TC = C / 8;
const uint n = threadgroup_position_in_grid.x;
const uint hv = threadgroup_position_in_grid.y;
const uint bz = threadgroup_position_in_grid.z;
const uint hk = hv / (Hv / Hk);
const int T = q_shape[1];
const int N = (T + C - 1) / C;
const int t0 = n * C;
const uint head = (bz * Hv + hv) * N + n;

threadgroup float bet[C];
threadgroup float liv[C];
threadgroup float gam[C];
threadgroup float endd[C];
threadgroup float ra[C];       // gamma_i (dQe_i.q_i + beta_i dKb_i.k_i)
threadgroup float re[C];       // (gamma_C / gamma_i) dKd_i.k_i
threadgroup float red[NSG];    // partial sums of <dS', S>
threadgroup float Rm[C * C];   // dAqk, then R
threadgroup float Pa[C * C];   // nKb (-W)^T + dVb Uv^T, then Pa
threadgroup float Mm[C * C];   // dA (.) A + dAqk (.) Aqk, then its running sums along rows
threadgroup float Db[C * C];   // dA (.) akk
threadgroup float Ks[C * 8];   // staged slab of k
threadgroup float Qs[C * 8];   // staged slab of q
threadgroup float Os[2 * C * 8];

const device float* gts_ = gts + head * (5 * C);
for (uint i = tid; i < C; i += NT) {
  bet[i] = gts_[C + i];
  liv[i] = gts_[2 * C + i];
  gam[i] = gts_[3 * C + i];
  endd[i] = gts_[4 * C + i];
}

const device float* mW = wq + head * (2 * C * Dk);   // -W [C, Dk]
const device float* Uv = uy + head * (2 * C * Dv);   // [C, Dv]
const device float* akk_ = akk + head * (C * C);
const device float* aqk_ = aqk + head * (C * C);
const device float* dec_ = decay + head * (C * C);
const device float* tin_ = tin + head * (C * C);
const device float* S = n == 0 ? state_in + (bz * Hv + hv) * (Dv * Dk)
                                : saved + ((bz * saved_shape[1] + n - 1) * Hv + hv) * (Dv * Dk);
const device float* dSp = dsn + head * (Dv * Dk);
const device float* dU = du + head * (C * Dv);
const device float* dY = dyc + head * (C * Dv);
device float* wk_ = wk + head * (C * (2 * Dv + 4 * Dk));
device float* U = wk_;                 // [C, Dv]
device float* dVb = U + C * Dv;        // [C, Dv]
device float* dQe = dVb + C * Dv;      // [C, Dk]
device float* nW = dQe + C * Dk;       // -dW = dU S [C, Dk]
device float* dKd = nW + C * Dk;       // [C, Dk]
device float* nKb = dKd + C * Dk;      // -dKb [C, Dk]

constexpr uint TV = Dv / 8;
constexpr uint TK = Dk / 8;
// U = Uv + (-W) S^T; dQe = dY S; -dW = dU S.
for (uint t = sg; t < TC * (TV + 2 * TK); t += NSG) {
  uint ti = t % TC, w = t / TC;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  if (w < TV) {
    simdgroup_load(acc, Uv + ti * 8 * Dv + w * 8, Dv);
    for (uint d = 0; d < Dk; d += 8) {
      simdgroup_float8x8 l, r;
      simdgroup_load(l, mW + ti * 8 * Dk + d, Dk);
      simdgroup_load(r, S + w * 8 * Dk + d, Dk, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(acc, l, r, acc);
    }
    simdgroup_store(acc, U + ti * 8 * Dv + w * 8, Dv);
  } else {
    uint tj = (w - TV) % TK;
    const device float* lhs = (w - TV) < TK ? dY : dU;
    for (uint e = 0; e < Dv; e += 8) {
      simdgroup_float8x8 l, r;
      simdgroup_load(l, lhs + ti * 8 * Dv + e, Dv);
      simdgroup_load(r, S + e * Dk + tj * 8, Dk);
      simdgroup_multiply_accumulate(acc, l, r, acc);
    }
    simdgroup_store(acc, ((w - TV) < TK ? dQe : nW) + ti * 8 * Dk + tj * 8, Dk);
  }
}
threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);

// dKd = U dS'; -dKb = T^T (-dW); dVb = T^T dU; dAqk = dY U^T (lower tiles).
for (uint t = sg; t < TC * (2 * TK + TV + TC); t += NSG) {
  uint ti = t % TC, w = t / TC;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  if (w < TK) {
    for (uint e = 0; e < Dv; e += 8) {
      simdgroup_float8x8 l, r;
      simdgroup_load(l, U + ti * 8 * Dv + e, Dv);
      simdgroup_load(r, dSp + e * Dk + w * 8, Dk);
      simdgroup_multiply_accumulate(acc, l, r, acc);
    }
    simdgroup_store(acc, dKd + ti * 8 * Dk + w * 8, Dk);
  } else if (w < 2 * TK + TV) {
    const bool key = w < 2 * TK;
    const uint tj = key ? w - TK : w - 2 * TK;
    const uint ld = key ? Dk : Dv;
    const device float* rhs = key ? (const device float*)nW : dU;
    for (uint kk = ti; kk < TC; ++kk) {  // T^T is upper triangular
      simdgroup_float8x8 l, r;
      simdgroup_load(l, tin_ + kk * 8 * C + ti * 8, C, ulong2(0, 0), true);
      simdgroup_load(r, rhs + kk * 8 * ld + tj * 8, ld);
      simdgroup_multiply_accumulate(acc, l, r, acc);
    }
    simdgroup_store(acc, (key ? nKb : dVb) + ti * 8 * ld + tj * 8, ld);
  } else {
    const uint tj = w - 2 * TK - TV;
    if (tj <= ti) {
      for (uint e = 0; e < Dv; e += 8) {
        simdgroup_float8x8 l, r;
        simdgroup_load(l, dY + ti * 8 * Dv + e, Dv);
        simdgroup_load(r, (const device float*)U + tj * 8 * Dv + e, Dv, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(acc, l, r, acc);
      }
    }
    simdgroup_store(acc, Rm + ti * 8 * C + tj * 8, C);
  }
}
threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);

// nKb (-W)^T + dVb Uv^T = -dA on and below the diagonal tiles.
for (uint t = sg; t < TC * TC; t += NSG) {
  uint ti = t / TC, tj = t % TC;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  if (tj <= ti) {
    for (uint d = 0; d < Dk; d += 8) {
      simdgroup_float8x8 l, r;
      simdgroup_load(l, (const device float*)nKb + ti * 8 * Dk + d, Dk);
      simdgroup_load(r, mW + tj * 8 * Dk + d, Dk, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(acc, l, r, acc);
    }
    for (uint e = 0; e < Dv; e += 8) {
      simdgroup_float8x8 l, r;
      simdgroup_load(l, (const device float*)dVb + ti * 8 * Dv + e, Dv);
      simdgroup_load(r, Uv + tj * 8 * Dv + e, Dv, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(acc, l, r, acc);
    }
  }
  simdgroup_store(acc, Pa + ti * 8 * C + tj * 8, C);
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (uint e = tid; e < C * C; e += NT) {
  uint i = e / C, j = e % C;
  float dAqk = i >= j ? Rm[e] : 0.0f;
  float dA = i > j ? -Pa[e] : 0.0f;
  float de = dec_[e];
  float da = dA * akk_[e];
  Db[e] = da;
  Mm[e] = bet[i] * da + dAqk * aqk_[e];
  Pa[e] = dA * bet[i] * de;
  Rm[e] = dAqk * de;
}
// <dS', S>, for the chunk's total decay.
{
  float s = 0.0f;
  for (uint e = tid; e < Dv * Dk; e += NT) s += dSp[e] * S[e];
  s = simd_sum(s);
  if (lane == 0) red[sg] = s;
}
threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);

// Per step: the row dot products, dbeta, and the running sums of M along each row.
const device InT* qc = q + ((bz * T + t0) * Hk + hk) * Dk;
const device InT* kc = k + ((bz * T + t0) * Hk + hk) * Dk;
const device InT* vc = v + ((bz * T + t0) * Hv + hv) * Dv;
for (uint i = tid; i < C; i += NT) {
  float qd = 0.0f, kb = 0.0f, kdd = 0.0f, vb = 0.0f, db = 0.0f;
  if (liv[i] != 0.0f) {
    for (uint c = 0; c < Dk; ++c) {
      float kx = float(kc[i * Hk * Dk + c]);
      qd += float(qc[i * Hk * Dk + c]) * dQe[i * Dk + c];
      kb += kx * nKb[i * Dk + c];
      kdd += kx * dKd[i * Dk + c];
    }
    for (uint c = 0; c < Dv; ++c) vb += float(vc[i * Hv * Dv + c]) * dVb[i * Dv + c];
  }
  float run = 0.0f;
  for (uint j = 0; j < C; ++j) {
    db += Db[i * C + j];
    run += Mm[i * C + j];
    Mm[i * C + j] = run;
  }
  ra[i] = gam[i] * (qd - bet[i] * kb);
  re[i] = endd[i] * kdd;
  const int t = t0 + int(i);
  if (t < T) dbeta[(bz * T + t) * Hv + hv] = liv[i] * (vb - gam[i] * kb + db);
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (uint l = tid; l < C; l += NT) {
  float s = 0.0f;
  for (uint g = 0; g < NSG; ++g) s += red[g];
  s *= gam[C - 1];
  for (uint i = l; i < C; ++i) s += ra[i] + (l > 0 ? Mm[i * C + l - 1] : 0.0f);
  for (uint i = 0; i < l; ++i) s += re[i];
  const int t = t0 + int(l);
  if (t < T) dlg[(bz * T + t) * Hv + hv] = liv[l] * s;
}

// dq and dk, one slab of 8 key columns at a time.
for (uint d = 0; d < Dk; d += 8) {
  for (uint e = tid; e < C * 8; e += NT) {
    uint i = e / 8, c = e % 8;
    bool live = liv[i] != 0.0f;
    Ks[e] = live ? float(kc[i * Hk * Dk + d + c]) : 0.0f;
    Qs[e] = live ? float(qc[i * Hk * Dk + d + c]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint t = sg; t < 2 * TC; t += NSG) {
    uint ti = t % TC;
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (uint kk = 0; kk < TC; ++kk) {
      simdgroup_float8x8 l, r;
      simdgroup_load(r, Ks + kk * 64, 8);
      if (t < TC) {
        simdgroup_load(l, Rm + ti * 8 * C + kk * 8, C);
        simdgroup_multiply_accumulate(acc, l, r, acc);
      } else {
        simdgroup_load(l, Pa + ti * 8 * C + kk * 8, C);
        simdgroup_multiply_accumulate(acc, l, r, acc);
        simdgroup_load(l, Pa + kk * 8 * C + ti * 8, C, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(acc, l, r, acc);
        simdgroup_load(l, Rm + kk * 8 * C + ti * 8, C, ulong2(0, 0), true);
        simdgroup_load(r, Qs + kk * 64, 8);
        simdgroup_multiply_accumulate(acc, l, r, acc);
      }
    }
    simdgroup_store(acc, Os + (t < TC ? 0 : C * 8) + ti * 64, 8);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint e = tid; e < C * 8; e += NT) {
    uint i = e / 8, c = e % 8;
    const int t = t0 + int(i);
    if (t < T) {
      const uint o = ((bz * T + t) * Hv + hv) * Dk + d + c;
      const uint w = i * Dk + d + c;
      dq[o] = liv[i] * (Os[e] + gam[i] * dQe[w]);
      dk[o] = liv[i] * (Os[C * 8 + e] + endd[i] * dKd[w] - bet[i] * gam[i] * nKb[w]);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

for (uint e = tid; e < C * Dv; e += NT) {
  uint i = e / Dv, c = e % Dv;
  const int t = t0 + int(i);
  if (t < T) dv[((bz * T + t) * Hv + hv) * Dv + c] = liv[i] * bet[i] * dVb[e];
}
