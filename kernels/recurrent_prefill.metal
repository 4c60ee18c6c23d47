// Gated delta rule, recurrent form, for prompts: blocks of TB tokens staged in threadgroup memory.
//
// One threadgroup owns R value rows of one (batch, value head); each row is owned by L adjacent
// lanes, lane j keeping state columns j, j + L, j + 2L, ... (Dk / L floats) in registers.
// Per block, the threadgroup reads each token's k, q, gates and its rows' v from device memory
// once, converted to float32, and every row then reads them from threadgroup memory (mlx-lm's
// kernels read k and q from device memory once per value row). The two per-token dot
// products reduce over L lanes only: log2(L) shuffles each.
//
// Each lane's part of a dot product adds into 4 independent partial sums (acc), so its chain of
// dependent additions is Dk / L / 4 long rather than Dk / L; loops are unrolled (GDN_UNROLL)
// so the per-lane arrays stay in registers.
//
// Inputs (names set by mlx_gdn/launch.py):
//   q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; state_in [B, Hv, Dv, Dk] float32;
//   GDN_FUSED:  a [B, T, Hv] (KEYGATE false) or [B, T, Hv, Dk] (KEYGATE true); b [B, T, Hv]; A_log [Hv];
//               dt_bias [Hv], or [Hv, Dk] with GDN_DT_KEY (KEYGATE only);
//               lower_bound [4] float32 (element 0 used) only with GDN_LOWER
//   otherwise:  g [B, T, Hv] (KEYGATE false) or [B, T, Hv, Dk] (KEYGATE true); beta [B, T, Hv]
//   GDN_MASKED: mask [B, T] (bool or integer; false/0 = skip the step, y = 0)
// Inputs may be strided views (read through *_strides); outputs are row-contiguous.
// Outputs: y [B, T, Hv, Dv] (InT), state_out [B, Hv, Dv, Dk] float32.
// Template: InT, Dk, Dv, Hk, Hv, L (lanes per row, divides 32), R (rows per threadgroup, R * L a
// multiple of 32), TB (tokens per block), KEYGATE, LOWER, NEG.
// Launch: threadgroup (R * L, 1, 1); grid (R * L * ceil(Dv / R), 1, N * Hv) threads, N = B
// sequences (or N packed ones with GDN_VARLEN).
//
// Serving variants (each off unless its macro is 1; the launcher defines them for serving calls):
//   GDN_POOL:   input state_idx [N] int32; sequence n starts from state_in row state_idx[n] (state_in
//               is a pool [S, Hv, Dv, Dk]), or from zeros where it is negative. state_out is [N, ...].
//   GDN_VARLEN: input cu_seqlens [N + 1] int32; B = 1 and sequence n is tokens cu[n] .. cu[n+1] - 1.
//   GDN_STEPS:  output states [B, NS, Hv, Dv, Dk] float32, template CS: the state after every CS-th
//               token of each sequence (a masked token's state is the one before it). Without
//               GDN_VARLEN slot m of batch b is the state after token (m + 1) CS. With it, sequence n
//               fills slots off[n] .. off[n] + len_n / CS - 1, off[n] = sum over m < n of len_m / CS
//               (so CS = 1 gives the state after every packed token), and slots past the last
//               sequence's are zero.
//
// Vocabulary used (the CUDA prelude maps it): thread_position_in_threadgroup,
// threadgroup_position_in_grid, simd_shuffle_xor, threadgroup arrays,
// threadgroup_barrier(mem_flags::mem_threadgroup), static_cast; metal::exp, metal::log,
// metal::fabs and the GDN_UNROLL macro (in gates.h).

constexpr int NT = R * L;      // threads per threadgroup
constexpr int PER = Dk / L;    // state columns per lane
constexpr int GS = KEYGATE ? TB * Dk : TB;
#ifndef GDN_DT_KEY
#define GDN_DT_KEY 0
#endif
// GDN_POOL, GDN_VARLEN and GDN_STEPS are left undefined (0 in #if) by plain launches.

threadgroup float k_s[TB * Dk];
threadgroup float q_s[TB * Dk];
threadgroup float g_s[GS];
threadgroup float beta_s[TB];
threadgroup float v_s[TB * R];
threadgroup int m_s[TB];

const int T = q_shape[1];
const int tid = static_cast<int>(thread_position_in_threadgroup.x);
const int row0 = static_cast<int>(threadgroup_position_in_grid.x) * R;
const int n = static_cast<int>(threadgroup_position_in_grid.z);  // seq * Hv + hv
const int seq = n / Hv;
const int hv = n - seq * Hv;
#if GDN_VARLEN
const int bi = 0;
const int t_begin = cu_seqlens[seq];
const int t_end = cu_seqlens[seq + 1];
#else
const int bi = seq;
const int t_begin = 0;
const int t_end = T;
#endif
#if GDN_POOL
const int slot = state_idx[seq * state_idx_strides[0]];
const bool has_state = slot >= 0;
const int srow = has_state ? slot : 0;
#else
const bool has_state = true;
const int srow = seq;
#endif
#if GDN_STEPS
// First slot of this sequence in `states`.
#if GDN_VARLEN
int st_base = 0;
for (int m = 0; m < seq; ++m) {
  st_base += (cu_seqlens[m + 1] - cu_seqlens[m]) / CS;
}
const int st_slots = T / CS;  // B = 1 with packed sequences
#else
const int st_base = bi * (T / CS);
#endif
#endif
const int hk = hv / (Hv / Hk);
const int r_loc = tid / L;
const int j = tid - r_loc * L;
const int row = row0 + r_loc;
const bool live = row < Dv;

// Inputs are read through their strides (in elements), so views such as slices of a fused
// projection need no copy: X0 is the offset of token 0 of this sequence and head, XT the step
// between tokens, XC the step along the last axis.
const int64_t q0 = bi * q_strides[0] + hk * q_strides[2], qT = q_strides[1], qC = q_strides[3];
const int64_t k0 = bi * k_strides[0] + hk * k_strides[2], kT = k_strides[1], kC = k_strides[3];
const int64_t v0 = bi * v_strides[0] + hv * v_strides[2], vT = v_strides[1], vC = v_strides[3];
#if GDN_FUSED
const int64_t a0 = bi * a_strides[0] + hv * a_strides[2], aT = a_strides[1];
const int64_t aC = KEYGATE ? a_strides[3] : 0;  // a per key column (KEYGATE)
const int64_t b0 = bi * b_strides[0] + hv * b_strides[2], bT = b_strides[1];
#else
const int64_t g0 = bi * g_strides[0] + hv * g_strides[2], gT = g_strides[1];
const int64_t gC = KEYGATE ? g_strides[3] : 0;
const int64_t beta0 = bi * beta_strides[0] + hv * beta_strides[2], betaT = beta_strides[1];
#endif
#if GDN_MASKED
const int64_t m0 = bi * mask_strides[0], mT = mask_strides[1];
#endif
// Outputs are allocated row-contiguous.
const int64_t y0 = (static_cast<int64_t>(bi) * T * Hv + hv) * Dv + row;

float s[PER];
const int64_t s_in = srow * state_in_strides[0] + hv * state_in_strides[1] +
                     (live ? row : 0) * state_in_strides[2] + j * state_in_strides[3];
const int64_t s_inC = L * state_in_strides[3];
GDN_UNROLL
for (int i = 0; i < PER; ++i) {
  s[i] = (live && has_state) ? state_in[s_in + i * s_inC] : 0.0f;
}

// After token t (absolute index) of this sequence: store the state where GDN_STEPS asks for it.
#undef GDN_KEEP_STATE
#if GDN_STEPS
#define GDN_KEEP_STATE(t)                                                                        \
  if (((t) - t_begin + 1) % CS == 0 && live) {                                                   \
    const int64_t st_off =                                                                       \
        ((static_cast<int64_t>(st_base + ((t) - t_begin + 1) / CS - 1) * Hv + hv) * Dv + row) * Dk + j; \
    GDN_UNROLL                                                                                   \
    for (int i = 0; i < PER; ++i) {                                                              \
      states[st_off + i * L] = s[i];                                                             \
    }                                                                                            \
  }
#else
#define GDN_KEEP_STATE(t)
#endif

#if GDN_FUSED
const float log_rate_h = static_cast<float>(A_log[hv * A_log_strides[0]]);
const float rate_h = metal::exp(log_rate_h);
const float dt_bias_h = GDN_DT_KEY ? 0.0f : static_cast<float>(dt_bias[hv * dt_bias_strides[0]]);
#if GDN_DT_KEY
const int64_t dt0 = hv * dt_bias_strides[0], dtC = dt_bias_strides[1];
#endif
#if GDN_LOWER
const float lower_bound_v = lower_bound[0];
#else
const float lower_bound_v = 0.0f;  // unused: LOWER is false
#endif
#endif

for (int t0 = t_begin; t0 < t_end; t0 += TB) {
  const int nb = (t_end - t0) < TB ? (t_end - t0) : TB;
  // The previous block's readers are done before the block is overwritten.
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = tid; i < nb * Dk; i += NT) {
    const int tt = i / Dk;
    const int c = i - tt * Dk;
    k_s[i] = static_cast<float>(k[k0 + (t0 + tt) * kT + c * kC]);
    q_s[i] = static_cast<float>(q[q0 + (t0 + tt) * qT + c * qC]);
#if GDN_FUSED
    if (KEYGATE) {
      // Each (token, column) gate once per threadgroup; every row then reads it staged.
#if GDN_DT_KEY
      const float dtb = static_cast<float>(dt_bias[dt0 + c * dtC]);
#else
      const float dtb = dt_bias_h;
#endif
      g_s[i] = gdn_decay(static_cast<float>(a[a0 + (t0 + tt) * aT + c * aC]), rate_h, log_rate_h, dtb, lower_bound_v, LOWER);
    }
#else
    if (KEYGATE) {
      g_s[i] = static_cast<float>(g[g0 + (t0 + tt) * gT + c * gC]);
    }
#endif
  }
  for (int i = tid; i < nb * R; i += NT) {
    const int tt = i / R;
    const int rr = row0 + (i - tt * R);
    v_s[i] = rr < Dv ? static_cast<float>(v[v0 + (t0 + tt) * vT + rr * vC]) : 0.0f;
  }
  for (int i = tid; i < nb; i += NT) {
    const int t = t0 + i;
#if GDN_FUSED
    if (!KEYGATE) {
      g_s[i] = gdn_decay(static_cast<float>(a[a0 + t * aT]), rate_h, log_rate_h, dt_bias_h, lower_bound_v, LOWER);
    }
    beta_s[i] = gdn_beta(static_cast<float>(b[b0 + t * bT]), NEG);
#else
    if (!KEYGATE) {
      g_s[i] = static_cast<float>(g[g0 + t * gT]);
    }
    beta_s[i] = static_cast<float>(beta[beta0 + t * betaT]);
#endif
#if GDN_MASKED
    m_s[i] = mask[m0 + t * mT] ? 1 : 0;
#else
    m_s[i] = 1;
#endif
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int tt = 0; tt < nb; ++tt) {
    const int64_t y_off = y0 + static_cast<int64_t>(t0 + tt) * (Hv * Dv);
    // The mask is uniform over the threadgroup, so skipping keeps every row's lanes together.
    if (m_s[tt] == 0) {
      if (live && j == 0) {
        y[y_off] = static_cast<InT>(0.0f);
      }
      GDN_KEEP_STATE(t0 + tt);
      continue;
    }
    const int kq = tt * Dk + j;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (KEYGATE) {
      GDN_UNROLL
      for (int i = 0; i < PER; ++i) {
        s[i] *= g_s[kq + i * L];
        acc[i & 3] += s[i] * k_s[kq + i * L];
      }
    } else {
      const float gt = g_s[tt];
      GDN_UNROLL
      for (int i = 0; i < PER; ++i) {
        s[i] *= gt;
        acc[i & 3] += s[i] * k_s[kq + i * L];
      }
    }
    float kv = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int o = 1; o < L; o <<= 1) {
      kv += simd_shuffle_xor(kv, o);
    }
    const float delta = beta_s[tt] * (v_s[tt * R + r_loc] - kv);
    acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
    GDN_UNROLL
    for (int i = 0; i < PER; ++i) {
      s[i] += k_s[kq + i * L] * delta;
      acc[i & 3] += s[i] * q_s[kq + i * L];
    }
    float out = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int o = 1; o < L; o <<= 1) {
      out += simd_shuffle_xor(out, o);
    }
    if (live && j == 0) {
      y[y_off] = static_cast<InT>(out);
    }
    GDN_KEEP_STATE(t0 + tt);
  }
}
#if GDN_STEPS && GDN_VARLEN
// The last sequence zeroes the slots no sequence fills (sum of len / CS can be below T / CS).
if (seq == static_cast<int>(threadgroups_per_grid.z) / Hv - 1 && live) {
  for (int m = st_base + (t_end - t_begin) / CS; m < st_slots; ++m) {
    const int64_t st_off = ((static_cast<int64_t>(m) * Hv + hv) * Dv + row) * Dk + j;
    GDN_UNROLL
    for (int i = 0; i < PER; ++i) {
      states[st_off + i * L] = 0.0f;
    }
  }
}
#endif

if (live) {
  const int64_t s_out = (static_cast<int64_t>(n) * Dv + row) * Dk + j;
  GDN_UNROLL
  for (int i = 0; i < PER; ++i) {
    state_out[s_out + i * L] = s[i];
  }
}
