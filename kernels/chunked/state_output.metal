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
// GDN_VARLEN (define): packed sequences (B = 1, cu_seqlens), one threadgroup per (tile, hv,
// sequence b). The operands' chunks come from kkt_solve_wy's chunk table: inputs chunks [NC, 2]
// int32 (chunk j covers tokens chunks[j][0] .. chunks[j][1] - 1, never across a sequence's end)
// and seq_chunks [N + 1] int32 (sequence b's chunks are seq_chunks[b] .. seq_chunks[b + 1] - 1,
// in order); operands [1, Hv, NC, ...]; state_out [N, Hv, Dv, Dk]. With GDN_SAVE also seq_saved
// [N + 1] int32: sequence b's states go to slots seq_saved[b] .. (boundaries counted within the
// sequence), and the last sequence's threadgroups zero the slots past seq_saved[N].
// GDN_POOL (define): input state_idx [N] int32; sequence b starts from row state_idx[b] of
// state_in (the pool [S, Hv, Dv, Dk]), or from zeros where it is negative.

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint NT = NSG * 32;
const uint dv0 = threadgroup_position_in_grid.x * RV;
const uint hv = threadgroup_position_in_grid.y;
const uint b = threadgroup_position_in_grid.z;
const int N = gc_shape[2];  // chunks in the operands (per batch row)
const int T = steps_shape[1];
#if GDN_VARLEN
const int c_begin = seq_chunks[b];
const int c_end = seq_chunks[b + 1];
const uint ob = 0;  // the operands' batch row
#else
const int c_begin = 0;
const int c_end = N;
const uint ob = b;
#endif

threadgroup float S[RV * Dk];
threadgroup float Us[C * RV];
threadgroup float Ys[C * RV];

const uint bh = b * Hv + hv;
#if GDN_POOL
const int row = state_idx[b];
const device float* s_in = state_in + ((size_t(max(row, 0)) * Hv + hv) * Dv + dv0) * Dk;
for (uint e = tid; e < RV * Dk; e += NT) S[e] = row >= 0 ? s_in[e] : 0.0f;
#else
const device float* s_in = state_in + (bh * Dv + dv0) * Dk;
for (uint e = tid; e < RV * Dk; e += NT) S[e] = s_in[e];
#endif
threadgroup_barrier(mem_flags::mem_threadgroup);

constexpr uint TC = C / 8;
constexpr uint TR = RV / 8;
for (int n = c_begin; n < c_end; ++n) {
  const uint head = (ob * Hv + hv) * N + n;
#if GDN_VARLEN
  const int t0 = chunks[2 * n];
  const int rows = chunks[2 * n + 1] - t0;
#else
  const int t0 = n * C;
  const int rows = min(C, T - t0);
#endif
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
  for (uint e = tid; e < uint(rows) * RV; e += NT) {
    uint i = e / RV, c = e % RV;
    y[((ob * T + t0 + i) * Hv + hv) * Dv + dv0 + c] = static_cast<InT>(Ys[e]);
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
  {
    // Boundaries count within the sequence: local chunk m ends token (m + 1) * C of it, and only
    // whole chunks end a boundary (the last one may be short).
    const int m = n - c_begin + 1;
    const int slots = T / (SAVE_EVERY * C);  // return_states=E*C: T // (E*C) slots
#if GDN_VARLEN
    const int first = seq_saved[b];
    const int mine = seq_saved[b + 1] - first;
#else
    const int first = 0;
    const int mine = slots;
#endif
    if (m % SAVE_EVERY == 0 && m / SAVE_EVERY <= mine) {
      device float* s_at = states + ((size_t(ob) * slots + first + m / SAVE_EVERY - 1) * Hv + hv) * (Dv * Dk) + dv0 * Dk;
      for (uint e = tid; e < RV * Dk; e += NT) s_at[e] = S[e];
    }
  }
#endif
}
#if GDN_SAVE && GDN_VARLEN
if (int(b) + 2 == int(seq_chunks_shape[0])) {  // the last sequence
  for (int slot = seq_saved[b + 1]; slot < T / (SAVE_EVERY * C); ++slot) {
    device float* s_at = states + (size_t(slot) * Hv + hv) * (Dv * Dk) + dv0 * Dk;
    for (uint e = tid; e < RV * Dk; e += NT) s_at[e] = 0.0f;
  }
}
#endif

device float* s_out = state_out + (bh * Dv + dv0) * Dk;
for (uint e = tid; e < RV * Dk; e += NT) s_out[e] = S[e];
