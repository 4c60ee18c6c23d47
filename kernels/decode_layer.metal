// One decode step (T = 1) of a gated delta rule layer with one depthwise conv over q | k | v
// (Qwen3.5 / Qwen3-Next, Kimi K3; Kimi Linear and Bailing with their three convs side by side)
// between its projections, in one launch: conv-state shift, depthwise causal conv, SiLU, split
// into q/k/v, q/k L2 normalisation (Dk**-0.5 folded into q), fused gating and the recurrence
// step; with GDN_NORM also the layer's output norm (RMS norm over Dv times silu(z), the Qwen
// layers'; with GDN_NORM_SIGMOID times sigmoid(z), the Kimi and Bailing layers'), so the next
// launch is out_proj.
//
// Inputs (InT is qkv's dtype; the others are read through static_cast<float>):
//   qkv        [B, 1, C]      InT   projection output, C = 2 * Hk * Dk + Hv * Dv (q | k | v)
//   conv_state [B, K - 1, C]  InT   the last K - 1 projection outputs
//   w          [C, K, 1]            depthwise conv weight (mlx Conv1d layout)
//   a          [B, 1, Hv], or [B, 1, Hv, Dk] with KEYGATE (one decay per key column)
//   b          [B, 1, Hv]           gate projections
//   A_log      [Hv]
//   dt_bias    [Hv], or [Hv, Dk] with GDN_DT_KEY (KEYGATE only)
//   state_in   [B, Hv, Dv, Dk] float32
//   z          [B, 1, Hv, Dv]       output gate (only with GDN_NORM)
//   norm_weight [Dv]                output norm weight (only with GDN_NORM)
//   mask       [B, 1] bool          only with GDN_MASKED
// Outputs: y [B, 1, Hv, Dv] InT (with GDN_NORM the normed, gated output; OutT with
// GDN_NORM_SIGMOID); conv_out [B, K - 1, C] InT; state_out [B, Hv, Dv, Dk] float32.
// Gates: gates.h's, per head or (KEYGATE) per key column; LOWER: the lower_bound form with the
// constant GDN_LOWER_BOUND (a model constant, so it is compiled in rather than passed per call);
// NEG: allow_neg_eigval (beta doubled).
// A masked row (mask false) shifts a zero input into its conv state, keeps its recurrent state
// and writes y = 0, as the unfused layer does (the norm of a zero row is zero).
// Template: InT, Dk, Dv, Hk, Hv, K, L, R, P, KEYGATE, LOWER, NEG (and NormT with GDN_NORM, GateT
// and OutT with GDN_NORM_SIGMOID). A
// threadgroup has R * L threads and walks P passes of R value rows; grid (R * L * ceil(Dv / (R * P)), 1, B * Hv).
// Rows, lanes and state columns are as in recurrent_decode.metal. Without GDN_NORM, P = 1 and R
// is recurrent_decode's (several threadgroups per head); with it, one threadgroup holds a whole
// head (R * P >= Dv), since the norm reduces over all Dv outputs of the head.
//
// Rounding follows the unfused layer (the element math is kernels/layer_math.h, shared with the T > 1
// bodies prefill_prep.metal and gated_norm.metal): the conv output, SiLU output, normalised q and k and y are
// rounded to InT (no-ops for float); everything else, and the state, stays float32. The norm
// rounds as mx.fast.rms_norm then the float32 silu gate do: x * rsqrt(mean(x^2) + eps) to NormT
// (the result type of y and the weight), times the weight to NormT, times silu(z) to InT; with
// GDN_NORM_SIGMOID times sigmoid(z) rounded to GateT, the product to OutT (the Kimi layers round
// the sigmoid to z's dtype, Bailing's to NormT; OutT is the product's result type).
//
// Each threadgroup needs its key head's whole normalised q and k, but owns only some value rows,
// so every threadgroup recomputes the conv of those 2 * Dk channels (K multiply-adds each) into
// threadgroup memory rather than taking a second launch; the norms then come out of the same
// L-lane shuffles the recurrence uses, since a row's L lanes together hold all Dk columns.
// Each conv-state channel is written by exactly one threadgroup: q/k channels by the first row
// block of the first value head of each key head, v channels by the block owning that row.
//
// Vocabulary used (the CUDA prelude maps it): thread_position_in_threadgroup,
// threadgroup_position_in_grid, simd_shuffle_xor, simd_sum, threadgroup arrays,
// threadgroup_barrier, static_cast; metal::exp, metal::log, metal::fabs, metal::sqrt,
// GDN_UNROLL and the gate helpers of gates.h.

#ifndef GDN_DT_KEY
#define GDN_DT_KEY 0
#endif
#ifndef GDN_LOWER_BOUND
#define GDN_LOWER_BOUND 0.0f  // unused: LOWER is false
#endif

constexpr int PER = Dk / L;  // state columns per lane
constexpr int NT = R * L;    // threads per threadgroup
constexpr int KEY_DIM = Hk * Dk;
constexpr int C = 2 * KEY_DIM + Hv * Dv;
constexpr int G = Hv / Hk;

const int tid = static_cast<int>(thread_position_in_threadgroup.x);
const int blk = static_cast<int>(threadgroup_position_in_grid.x);
const int n = static_cast<int>(threadgroup_position_in_grid.z);  // bi * Hv + hv
const int bi = n / Hv;
const int hv = n - bi * Hv;
const int hk = hv / G;
const int r_loc = tid / L;
const int j = tid - r_loc * L;

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
  qk_tg[i] = gdn_conv_silu<InT>(acc);
  if (writes_qk) {
    GDN_UNROLL
    for (int t = 0; t < K - 2; ++t) {
      conv_out[cs_base + t * C + c] = conv_state[cs_base + (t + 1) * C + c];
    }
    conv_out[cs_base + (K - 2) * C + c] = x_in;
  }
}

#if GDN_NORM
threadgroup float y_tg[R * P];  // the head's y, rounded to InT, for the norm
#endif

// Gates of an active row: one decay per head, or (KEYGATE) one per key column, of which lane j
// keeps its columns' in registers for every pass (a column's decay is the same for all rows).
// A masked row's stay 1 and 0; its state is not touched anyway.
const int gi = bi * Hv + hv;
const float log_rate = static_cast<float>(A_log[hv]);
const float rate = metal::exp(log_rate);
float gt = 1.0f;
float bt = 0.0f;
float gk[PER];
GDN_UNROLL
for (int i = 0; i < PER; ++i) {
  gk[i] = 1.0f;
}
if (on) {
  bt = gdn_beta(static_cast<float>(b[gi]), NEG);
  if (KEYGATE) {
    GDN_UNROLL
    for (int i = 0; i < PER; ++i) {
      const int d = j + i * L;
      gk[i] = gdn_decay(static_cast<float>(a[gi * Dk + d]), rate, log_rate,
                        static_cast<float>(dt_bias[gdn_dt_bias_index(hv, d, Dk, GDN_DT_KEY)]), GDN_LOWER_BOUND, LOWER);
    }
  } else {
    gt = gdn_decay(static_cast<float>(a[gi]), rate, log_rate, static_cast<float>(dt_bias[hv]), GDN_LOWER_BOUND,
                   LOWER);
  }
}

float kr[PER];
float qr[PER];
for (int pass = 0; pass < P; ++pass) {
  const int row = (blk * P + pass) * R + r_loc;
  const bool live = row < Dv;
  const int row_c = live ? row : 0;  // rows past Dv compute on row 0's inputs and store nothing

  // This row's v channel (each of the row's L lanes computes it; K loads of one address).
  const int cv = 2 * KEY_DIM + hv * Dv + row_c;
  const InT xv_in = on ? qkv[x_base + cv] : static_cast<InT>(0.0f);
  float vacc = 0.0f;
  GDN_UNROLL
  for (int t = 0; t < K - 1; ++t) {
    vacc += static_cast<float>(conv_state[cs_base + t * C + cv]) * static_cast<float>(w[cv * K + t]);
  }
  vacc += static_cast<float>(xv_in) * static_cast<float>(w[cv * K + K - 1]);
  const float vt = gdn_conv_silu<InT>(vacc);
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

  if (pass == 0) {  // uniform: the first pass's loads are in flight across the barrier
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // Normalise: each lane holds columns j, j + L, ...; the row's L lanes sum their squares.
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
    const float rk = gdn_l2_inv(ssk);
    const float rq = gdn_l2_inv(ssq) / metal::sqrt(static_cast<float>(Dk));
    // Normalised q and k are rounded to InT where the unfused layer (and mlx-lm's) stores them,
    // so a bf16 step matches those layers rather than a more precise variant of them.
    GDN_UNROLL
    for (int i = 0; i < PER; ++i) {
      kr[i] = static_cast<float>(static_cast<InT>(kr[i] * rk));
      qr[i] = static_cast<float>(static_cast<InT>(qr[i] * rq));
    }
  }

  float out = 0.0f;
  if (on) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    GDN_UNROLL
    for (int i = 0; i < PER; ++i) {
      s[i] *= KEYGATE ? gk[i] : gt;
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
    out = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int o = 1; o < L; o <<= 1) {
      out += simd_shuffle_xor(out, o);
    }
  }
  if (live) {
    GDN_UNROLL
    for (int i = 0; i < PER; ++i) {
      state_out[s_base + i * L] = s[i];
    }
    if (j == 0) {
#if GDN_NORM
      y_tg[row] = static_cast<float>(static_cast<InT>(out));
#else
      y[n * Dv + row] = static_cast<InT>(out);  // y[bi, 0, hv, row]
#endif
    }
  }
}

#if GDN_NORM
// out = rms_norm(y) * weight * silu(z) over the head's Dv outputs: per-thread partial sums of
// squares, one simd_sum per simdgroup, the simdgroups' partials through threadgroup memory.
threadgroup float ss_tg[NT / 32];
threadgroup_barrier(mem_flags::mem_threadgroup);
float ssy = 0.0f;
for (int i = tid; i < Dv; i += NT) {
  ssy += y_tg[i] * y_tg[i];
}
ssy = simd_sum(ssy);
if ((tid & 31) == 0) {
  ss_tg[tid >> 5] = ssy;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float tot = 0.0f;
for (int i = 0; i < NT / 32; ++i) {
  tot += ss_tg[i];
}
const float inv_rms = gdn_inv_rms(tot, Dv, GDN_NORM_EPS);
for (int i = tid; i < Dv; i += NT) {
  const float zg = static_cast<float>(z[n * Dv + i]);
#if GDN_NORM_SIGMOID
  const float nw = gdn_rms_weighted<NormT>(y_tg[i], inv_rms, static_cast<float>(norm_weight[i]));
  y[n * Dv + i] = static_cast<OutT>(nw * gdn_round<GateT>(gdn_sigmoid(zg)));
#else
  y[n * Dv + i] = gdn_gated_norm<NormT, InT>(y_tg[i], inv_rms, static_cast<float>(norm_weight[i]), zg);
#endif
}
#endif
