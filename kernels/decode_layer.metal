// One decode step (T = 1) of the Qwen3.5 / Qwen3-Next Gated DeltaNet layer between its
// projections, in one launch: conv-state shift, depthwise causal conv, SiLU, split into q/k/v,
// q/k L2 normalisation (Dk**-0.5 folded into q), fused gating and the recurrence step.
//
// Inputs (InT is qkv's dtype; the others are read through static_cast<float>):
//   qkv        [B, 1, C]      InT   projection output, C = 2 * Hk * Dk + Hv * Dv (q | k | v)
//   conv_state [B, K - 1, C]  InT   the last K - 1 projection outputs
//   w          [C, K, 1]            depthwise conv weight (mlx Conv1d layout)
//   a, b       [B, 1, Hv]           gate projections
//   A_log, dt_bias [Hv]
//   state_in   [B, Hv, Dv, Dk] float32
//   mask       [B, 1] bool          only with GDN_MASKED
// Outputs: y [B, 1, Hv, Dv] InT; conv_out [B, K - 1, C] InT; state_out [B, Hv, Dv, Dk] float32.
// A masked row (mask false) shifts a zero input into its conv state, keeps its recurrent state
// and writes y = 0, as the unfused layer does.
// Template: InT, Dk, Dv, Hk, Hv, K, L, R. Geometry is recurrent_decode.metal's: threadgroup
// R * L threads, grid (R * L * ceil(Dv / R), 1, B * Hv); rows, lanes and state columns as there.
//
// Rounding follows the unfused layer: the conv output, SiLU output and normalised q and k are
// rounded to InT (no-ops for float); everything else, and the state, stays float32.
//
// Each threadgroup needs its key head's whole normalised q and k, but owns only R value rows,
// so every threadgroup recomputes the conv of those 2 * Dk channels (K multiply-adds each) into
// threadgroup memory rather than taking a second launch; the norms then come out of the same
// L-lane shuffles the recurrence uses, since a row's L lanes together hold all Dk columns.
// Each conv-state channel is written by exactly one threadgroup: q/k channels by the first row
// block of the first value head of each key head, v channels by the block owning that row.
//
// Vocabulary used (the CUDA prelude maps it): thread_position_in_threadgroup,
// threadgroup_position_in_grid, simd_shuffle_xor, threadgroup arrays, threadgroup_barrier,
// static_cast; metal::exp, metal::log, metal::fabs, metal::sqrt, GDN_UNROLL and the gate
// helpers of gates.h.

constexpr int PER = Dk / L;  // state columns per lane
constexpr int NT = R * L;    // threads per threadgroup
constexpr int KEY_DIM = Hk * Dk;
constexpr int C = 2 * KEY_DIM + Hv * Dv;
constexpr int G = Hv / Hk;
constexpr float QK_EPS = 1e-6f;  // added to the sum of squares, as mlx-lm's l2norm

const int tid = static_cast<int>(thread_position_in_threadgroup.x);
const int blk = static_cast<int>(threadgroup_position_in_grid.x);
const int n = static_cast<int>(threadgroup_position_in_grid.z);  // bi * Hv + hv
const int bi = n / Hv;
const int hv = n - bi * Hv;
const int hk = hv / G;
const int r_loc = tid / L;
const int j = tid - r_loc * L;
const int row = blk * R + r_loc;
const bool live = row < Dv;
const int row_c = live ? row : 0;  // rows past Dv compute on row 0's inputs and store nothing

#if GDN_MASKED
const bool on = mask[bi];  // uniform over the threadgroup
#else
const bool on = true;
#endif

const int x_base = bi * C;              // qkv[bi, 0, :]
const int cs_base = bi * (K - 1) * C;  // conv_state[bi, 0, :], conv_out[bi, 0, :]

// Conv + SiLU of this key head's q and k channels, staged once per threadgroup. The conv output
// and SiLU are rounded to InT where the unfused layer holds them in the model dtype.
threadgroup float qk_tg[2 * Dk];
const bool writes_qk = blk == 0 && hv - hk * G == 0;
for (int i = tid; i < 2 * Dk; i += NT) {
  const int c = (i < Dk ? hk * Dk + i : KEY_DIM + hk * Dk + (i - Dk));
  const InT x_in = on ? qkv[x_base + c] : static_cast<InT>(0.0f);
  float acc = 0.0f;
  GDN_UNROLL
  for (int t = 0; t < K - 1; ++t) {
    acc += static_cast<float>(conv_state[cs_base + t * C + c]) * static_cast<float>(w[c * K + t]);
  }
  acc += static_cast<float>(x_in) * static_cast<float>(w[c * K + K - 1]);
  const float xr = static_cast<float>(static_cast<InT>(acc));
  qk_tg[i] = static_cast<float>(static_cast<InT>(xr * gdn_sigmoid(xr)));
  if (writes_qk) {
    GDN_UNROLL
    for (int t = 0; t < K - 2; ++t) {
      conv_out[cs_base + t * C + c] = conv_state[cs_base + (t + 1) * C + c];
    }
    conv_out[cs_base + (K - 2) * C + c] = x_in;
  }
}

// This row's v channel (each of the row's L lanes computes it; K loads of one address).
const int cv = 2 * KEY_DIM + hv * Dv + row_c;
const InT xv_in = on ? qkv[x_base + cv] : static_cast<InT>(0.0f);
float vacc = 0.0f;
GDN_UNROLL
for (int t = 0; t < K - 1; ++t) {
  vacc += static_cast<float>(conv_state[cs_base + t * C + cv]) * static_cast<float>(w[cv * K + t]);
}
vacc += static_cast<float>(xv_in) * static_cast<float>(w[cv * K + K - 1]);
const float vr0 = static_cast<float>(static_cast<InT>(vacc));
const float vt = static_cast<float>(static_cast<InT>(vr0 * gdn_sigmoid(vr0)));
if (live) {
  for (int t = j; t < K - 1; t += L) {
    conv_out[cs_base + t * C + cv] = (t < K - 2) ? conv_state[cs_base + (t + 1) * C + cv] : xv_in;
  }
}

float s[PER];
const int s_base = (n * Dv + row_c) * Dk + j;
GDN_UNROLL
for (int i = 0; i < PER; ++i) {
  s[i] = live ? state_in[s_base + i * L] : 0.0f;
}

threadgroup_barrier(mem_flags::mem_threadgroup);

// Normalise: each lane holds columns j, j + L, ...; the row's L lanes sum their squares.
float kr[PER];
float qr[PER];
float ssk = 0.0f;
float ssq = 0.0f;
GDN_UNROLL
for (int i = 0; i < PER; ++i) {
  qr[i] = qk_tg[j + i * L];
  kr[i] = qk_tg[Dk + j + i * L];
  ssq += qr[i] * qr[i];
  ssk += kr[i] * kr[i];
}
for (int o = 1; o < L; o <<= 1) {
  ssq += simd_shuffle_xor(ssq, o);
  ssk += simd_shuffle_xor(ssk, o);
}
const float rk = 1.0f / metal::sqrt(ssk + QK_EPS);
const float rq = 1.0f / (metal::sqrt(ssq + QK_EPS) * metal::sqrt(static_cast<float>(Dk)));

const int y_off = n * Dv + row;  // y[bi, 0, hv, row]
if (!on) {
  if (live) {
    GDN_UNROLL
    for (int i = 0; i < PER; ++i) {
      state_out[s_base + i * L] = s[i];
    }
    if (j == 0) {
      y[y_off] = static_cast<InT>(0.0f);
    }
  }
} else {
  const int gi = bi * Hv + hv;
  const float log_rate = static_cast<float>(A_log[hv]);
  const float gt = gdn_decay(static_cast<float>(a[gi]), metal::exp(log_rate), log_rate,
                             static_cast<float>(dt_bias[hv]), 0.0f, false);
  const float bt = gdn_beta(static_cast<float>(b[gi]), false);

  // Normalised q and k are rounded to InT where the unfused layer (and mlx-lm's) stores them,
  // so a bf16 step matches those layers rather than a more precise variant of them.
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  GDN_UNROLL
  for (int i = 0; i < PER; ++i) {
    kr[i] = static_cast<float>(static_cast<InT>(kr[i] * rk));
    qr[i] = static_cast<float>(static_cast<InT>(qr[i] * rq));
    s[i] *= gt;
    acc[i & 3] += s[i] * kr[i];
  }
  float kv = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (int o = 1; o < L; o <<= 1) {
    kv += simd_shuffle_xor(kv, o);
  }
  const float delta = bt * (vt - kv);
  acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
  GDN_UNROLL
  for (int i = 0; i < PER; ++i) {
    s[i] += kr[i] * delta;
    acc[i & 3] += s[i] * qr[i];
  }
  float out = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (int o = 1; o < L; o <<= 1) {
    out += simd_shuffle_xor(out, o);
  }
  if (live) {
    GDN_UNROLL
    for (int i = 0; i < PER; ++i) {
      state_out[s_base + i * L] = s[i];
    }
    if (j == 0) {
      y[y_off] = static_cast<InT>(out);
    }
  }
}
