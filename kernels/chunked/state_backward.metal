// Chunked gated delta rule, backward, stage state_backward: the adjoint of the state pass
// (state_output.metal), chunks last to first. One threadgroup of NSG simdgroups per (tile of RV
// state rows, value head hv, batch b); the adjoint tile dS [RV, Dk] stays in threadgroup memory.
// Per chunk n, with dS = dS_{n+1} (the adjoint of the state leaving it) and kkt_solve_wy's operands:
//   X    = Kd dS^T                       [C, RV]  (the state write's share of dU)
//   dU   = X + P^T dY                    [C, RV]  -> du
//   dS_n = gamma_C dS + dY^T Qe + X^T (-W)          (Qe = diag(gamma) Q - P W carries dY's share
//                                                    of dU^T W, so only X meets -W here)
// Inputs: wq [B, Hv, N, 2C, Dk] (rows -W, then Qe), kd [B, Hv, N, C, Dk], gc [B, Hv, N],
// aqk [B, Hv, N, C, C] (P), gts [B, Hv, N, 5, C] (row 2: 1 for a live step), all float32 from
// kkt_solve_wy.metal with GDN_BACKWARD; dy [B, T, Hv, Dv] (any float dtype), dstate [B, Hv, Dv, Dk]
// float32 (the final state's cotangent).
// Outputs (float32): dsn [B, Hv, N, Dv, Dk] (dS_{n+1} per chunk), du [B, Hv, N, C, Dv],
// dyc [B, Hv, N, C, Dv] (dY in chunk layout, zero on masked steps and past T), dstate0 [B, Hv, Dv, Dk].
// Template: C, Dk, Dv, Hv, RV (rows per tile, multiple of 8 dividing Dv), NSG.

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint NT = NSG * 32;
const uint dv0 = threadgroup_position_in_grid.x * RV;
const uint hv = threadgroup_position_in_grid.y;
const uint b = threadgroup_position_in_grid.z;
const int N = gc_shape[2];
const int T = dy_shape[1];

threadgroup float dS[RV * Dk];
threadgroup float Ys[C * RV];
threadgroup float Xs[C * RV];

const uint bh = b * Hv + hv;
const device float* ds_in = dstate + (bh * Dv + dv0) * Dk;
for (uint e = tid; e < RV * Dk; e += NT) dS[e] = ds_in[e];
threadgroup_barrier(mem_flags::mem_threadgroup);

constexpr uint TC = C / 8;
constexpr uint TR = RV / 8;
for (int n = N - 1; n >= 0; --n) {
  const uint head = bh * N + n;
  const device float* wq_ = wq + head * (2 * C * Dk);
  const device float* kd_ = kd + head * (C * Dk);
  const device float* aqk_ = aqk + head * (C * C);
  const device float* live = gts + head * (5 * C) + 2 * C;
  device float* dsn_ = dsn + (head * Dv + dv0) * Dk;
  device float* du_ = du + head * (C * Dv) + dv0;
  device float* dyc_ = dyc + head * (C * Dv) + dv0;

  for (uint e = tid; e < RV * Dk; e += NT) dsn_[e] = dS[e];
  for (uint e = tid; e < C * RV; e += NT) {
    uint i = e / RV, c = e % RV;
    const int t = n * C + int(i);
    float x = (t < T && live[i] != 0.0f) ? float(dy[((b * T + t) * Hv + hv) * Dv + dv0 + c]) : 0.0f;
    Ys[e] = x;
    dyc_[i * Dv + c] = x;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (uint t = sg; t < TC * TR; t += NSG) {
    uint ti = t / TR, tj = t % TR;
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (uint d = 0; d < Dk; d += 8) {
      simdgroup_float8x8 l, r;
      simdgroup_load(l, kd_ + ti * 8 * Dk + d, Dk);
      simdgroup_load(r, dS + tj * 8 * Dk + d, Dk, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(acc, l, r, acc);
    }
    simdgroup_store(acc, Xs + ti * 8 * RV + tj * 8, RV);
    for (uint kk = 0; kk < TC; ++kk) {
      simdgroup_float8x8 l, r;
      simdgroup_load(l, aqk_ + kk * 8 * C + ti * 8, C, ulong2(0, 0), true);
      simdgroup_load(r, Ys + kk * 8 * RV + tj * 8, RV);
      simdgroup_multiply_accumulate(acc, l, r, acc);
    }
    simdgroup_store(acc, du_ + ti * 8 * Dv + tj * 8, Dv);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const float gcn = gc[head];
  for (uint e = tid; e < RV * Dk; e += NT) dS[e] *= gcn;
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // dS += dY^T Qe + X^T (-W); each simdgroup owns its tiles of dS.
  for (uint t = sg; t < TR * (Dk / 8); t += NSG) {
    uint ti = t / (Dk / 8), d = (t % (Dk / 8)) * 8;
    simdgroup_float8x8 acc;
    simdgroup_load(acc, dS + ti * 8 * Dk + d, Dk);
    for (uint kk = 0; kk < TC; ++kk) {
      simdgroup_float8x8 l, r;
      simdgroup_load(l, Ys + kk * 8 * RV + ti * 8, RV, ulong2(0, 0), true);
      simdgroup_load(r, wq_ + (C + kk * 8) * Dk + d, Dk);
      simdgroup_multiply_accumulate(acc, l, r, acc);
      simdgroup_load(l, Xs + kk * 8 * RV + ti * 8, RV, ulong2(0, 0), true);
      simdgroup_load(r, wq_ + kk * 8 * Dk + d, Dk);
      simdgroup_multiply_accumulate(acc, l, r, acc);
    }
    simdgroup_store(acc, dS + ti * 8 * Dk + d, Dk);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

device float* s_out = dstate0 + (bh * Dv + dv0) * Dk;
for (uint e = tid; e < RV * Dk; e += NT) s_out[e] = dS[e];
