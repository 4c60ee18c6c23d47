// Chunked gated delta rule, launch 2 of 2, stages state and output: the pass over chunks, in order. One threadgroup
// of NSG simdgroups per (tile of RV state rows, value head hv, batch b); the tile S [RV, Dk]
// stays in threadgroup memory for the whole sequence. Per chunk, from kkt_solve_wy's operands:
//   U = Uv + (-W) S^T          [C, RV]
//   Y = Yv + Qe S^T            [C, RV]  -> y
//   S = gamma_C S + U^T Kd     [RV, Dk]
// Inputs: wq [B, Hv, N, 2C, Dk], uy [B, Hv, N, 2C, Dv], kd [B, Hv, N, C, Dk], gc [B, Hv, N],
// state_in [B, Hv, Dv, Dk] (float32), steps [B, T, ...] (any array whose shape gives T; its data
// is not read). Outputs: y [B, T, Hv, Dv] (InT; rows past T are not written), state_out (float32).
// Template: InT, C, Dk, Dv, Hv, RV (rows per tile, multiple of 8 dividing Dv), NSG, KEYGATE
// (gc [B, Hv, N, Dk]: the chunk's decay per key column), SAVE_EVERY (E).
// GDN_SAVE (define; left undefined, 0 in #if, by plain launches): output states
// [B, T // (E * C), Hv, Dv, Dk] float32, the state after chunks E, 2E, ... (after tokens E*C,
// 2E*C, ...; return_states=E*C). A boundary past T is not written: the tail chunk's identity
// steps make its end state the state after token T, not after a multiple of E*C.

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint NT = NSG * 32;
const uint dv0 = threadgroup_position_in_grid.x * RV;
const uint hv = threadgroup_position_in_grid.y;
const uint b = threadgroup_position_in_grid.z;
const int N = gc_shape[2];
const int T = steps_shape[1];

threadgroup float S[RV * Dk];
threadgroup float Us[C * RV];
threadgroup float Ys[C * RV];

const uint bh = b * Hv + hv;
const device float* s_in = state_in + (bh * Dv + dv0) * Dk;
for (uint e = tid; e < RV * Dk; e += NT) S[e] = s_in[e];
threadgroup_barrier(mem_flags::mem_threadgroup);

constexpr uint TC = C / 8;
constexpr uint TR = RV / 8;
for (int n = 0; n < N; ++n) {
  const uint head = bh * N + n;
  const device float* wq_ = wq + head * (2 * C * Dk);
  const device float* uy_ = uy + head * (2 * C * Dv);
  const device float* kd_ = kd + head * (C * Dk);

  // Rows 0..C-1 give U, rows C..2C-1 give Y: one product with S^T for both.
  for (uint t = sg; t < 2 * TC * TR; t += NSG) {
    uint ti = t / TR, tj = t % TR;
    simdgroup_float8x8 acc;
    simdgroup_load(acc, uy_ + ti * 8 * Dv + dv0 + tj * 8, Dv);
    for (uint d = 0; d < Dk; d += 8) {
      simdgroup_float8x8 l, r;
      simdgroup_load(l, wq_ + ti * 8 * Dk + d, Dk);
      simdgroup_load(r, S + tj * 8 * Dk + d, Dk, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(acc, l, r, acc);
    }
    if (ti < TC) {
      simdgroup_store(acc, Us + ti * 8 * RV + tj * 8, RV);
    } else {
      simdgroup_store(acc, Ys + (ti - TC) * 8 * RV + tj * 8, RV);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const float gcn = KEYGATE ? 0.0f : gc[head];
  const int rows = min(C, T - n * C);
  for (uint e = tid; e < uint(rows) * RV; e += NT) {
    uint i = e / RV, c = e % RV;
    y[((b * T + n * C + i) * Hv + hv) * Dv + dv0 + c] = static_cast<InT>(Ys[e]);
  }
  for (uint e = tid; e < RV * Dk; e += NT) S[e] *= KEYGATE ? gc[head * Dk + e % Dk] : gcn;
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // S += U^T Kd; each simdgroup owns its tiles of S.
  for (uint t = sg; t < TR * (Dk / 8); t += NSG) {
    uint ti = t / (Dk / 8), d = (t % (Dk / 8)) * 8;
    simdgroup_float8x8 acc;
    simdgroup_load(acc, S + ti * 8 * Dk + d, Dk);
    for (uint kk = 0; kk < TC; ++kk) {
      simdgroup_float8x8 ut, kr;
      simdgroup_load(ut, Us + kk * 8 * RV + ti * 8, RV, ulong2(0, 0), true);
      simdgroup_load(kr, kd_ + kk * 8 * Dk + d, Dk);
      simdgroup_multiply_accumulate(acc, ut, kr, acc);
    }
    simdgroup_store(acc, S + ti * 8 * Dk + d, Dk);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
#if GDN_SAVE
  const int saved = T / (SAVE_EVERY * C);
  if ((n + 1) % SAVE_EVERY == 0 && (n + 1) / SAVE_EVERY <= saved) {
    device float* s_at = states + ((size_t(b) * saved + (n + 1) / SAVE_EVERY - 1) * Hv + hv) * (Dv * Dk) + dv0 * Dk;
    for (uint e = tid; e < RV * Dk; e += NT) s_at[e] = S[e];
  }
#endif
}

device float* s_out = state_out + (bh * Dv + dv0) * Dk;
for (uint e = tid; e < RV * Dk; e += NT) s_out[e] = S[e];
