// Gated delta rule, recurrent form, for decoding (T = 1, or a few tokens): no staging.
//
// At T = 1 every input is read once whatever the layout, and the state (read and written once)
// is nearly all the traffic, so this body skips threadgroup memory and barriers and reads k, q,
// v and the gates straight from device memory. One threadgroup owns R value rows of one
// (batch, value head); each row is owned by L adjacent lanes, lane j keeping state columns
// j, j + L, ... (Dk / L floats) in registers, so a row's L lanes load L adjacent floats of the
// state at a time. The dot products reduce over L lanes: log2(L) shuffles each, after each
// lane's part adds into 4 independent partial sums (acc) to shorten its dependent chain.
//
// Inputs (strided views allowed), outputs, template arguments and launch geometry: as
// recurrent_prefill.metal, except that TB is not used; of the serving variants, GDN_POOL only
// (state_idx [B] int32 picks each sequence's row of a state pool, negative = zeros).
//
// Vocabulary used (the CUDA prelude maps it): thread_position_in_threadgroup,
// threadgroup_position_in_grid, simd_shuffle_xor, static_cast; metal::exp, metal::log,
// metal::fabs and the GDN_UNROLL macro (in gates.h).

constexpr int PER = Dk / L;  // state columns per lane

// Which columns lane j keeps. GDN_VEC4 = 0: j, j + L, j + 2L, ... (a row's L lanes read L
// adjacent floats per load). GDN_VEC4 = 1 (PER a multiple of 4): groups of four adjacent
// columns, 4j + 4L m + c, so that on CUDA a lane moves its state in 16-byte loads and stores.
// The launcher sets it; either way each lane holds PER distinct columns and the row's L lanes
// hold all Dk.
#ifndef GDN_VEC4
#define GDN_VEC4 0
#endif
#define GDN_COL(i) (GDN_VEC4 ? (4 * L * ((i) >> 2) + ((i) & 3)) : (L * (i)))
// GDN_DT_KEY (fused per-key gates only): dt_bias is [Hv, Dk], one value per key column.
#ifndef GDN_DT_KEY
#define GDN_DT_KEY 0
#endif
#undef GDN_DT
constexpr int LANE_COL = GDN_VEC4 ? 4 : 1;  // lane j's first column is LANE_COL * j
// The 16-byte moves themselves are CUDA's (the Metal layout is unmeasured on Apple GPUs).
#undef GDN_VEC4_MOVES
#if GDN_VEC4 && defined(GDN_CUDA_PRELUDE_H)
#define GDN_VEC4_MOVES 1
#else
#define GDN_VEC4_MOVES 0
#endif

const int T = q_shape[1];
const int tid = static_cast<int>(thread_position_in_threadgroup.x);
const int n = static_cast<int>(threadgroup_position_in_grid.z);  // bi * Hv + hv
const int bi = n / Hv;
const int hv = n - bi * Hv;
#if GDN_POOL
const int slot = state_idx[bi * state_idx_strides[0]];
const bool has_state = slot >= 0;
const int srow = has_state ? slot : 0;
#else
const bool has_state = true;
const int srow = bi;
#endif
const int hk = hv / (Hv / Hk);
const int r_loc = tid / L;
const int j = tid - r_loc * L;
const int row = static_cast<int>(threadgroup_position_in_grid.x) * R + r_loc;
const bool live = row < Dv;
const int row_c = live ? row : 0;  // rows past Dv compute on row 0's inputs and store nothing

// Inputs are read through their strides (in elements), so views need no copy: X0 is the
// offset of token 0 of this sequence and head (and of this lane's first column), XT the step
// between tokens, XC the element step of one column (this lane's i-th column is GDN_COL(i)
// columns past its first).
const int64_t q0 = bi * q_strides[0] + hk * q_strides[2] + LANE_COL * j * q_strides[3];
const int64_t qT = q_strides[1], qC = q_strides[3];
const int64_t k0 = bi * k_strides[0] + hk * k_strides[2] + LANE_COL * j * k_strides[3];
const int64_t kT = k_strides[1], kC = k_strides[3];
const int64_t v0 = bi * v_strides[0] + hv * v_strides[2] + row_c * v_strides[3], vT = v_strides[1];
#if GDN_FUSED
// KEYGATE: a [B, T, Hv, Dk], one gate per key column, computed per column at each step.
const int64_t a0 = bi * a_strides[0] + hv * a_strides[2] + (KEYGATE ? LANE_COL * j * a_strides[3] : 0);
const int64_t aT = a_strides[1], aC = KEYGATE ? a_strides[3] : 0;
const int64_t b0 = bi * b_strides[0] + hv * b_strides[2], bT = b_strides[1];
#else
const int64_t g0 = bi * g_strides[0] + hv * g_strides[2] + (KEYGATE ? LANE_COL * j * g_strides[3] : 0);
const int64_t gT = g_strides[1], gC = KEYGATE ? g_strides[3] : 0;
const int64_t beta0 = bi * beta_strides[0] + hv * beta_strides[2], betaT = beta_strides[1];
#endif
#if GDN_MASKED
const int64_t m0 = bi * mask_strides[0], mT = mask_strides[1];
#endif
// Outputs are allocated row-contiguous.
const int64_t y0 = (static_cast<int64_t>(bi) * T * Hv + hv) * Dv + row;

float s[PER];
const int64_t s_in = srow * state_in_strides[0] + hv * state_in_strides[1] +
                     row_c * state_in_strides[2] + LANE_COL * j * state_in_strides[3];
const int64_t s_inC = state_in_strides[3];
#if GDN_VEC4_MOVES
// 16-byte loads where this lane's groups of four are adjacent and aligned (any row-contiguous
// state MLX allocated); other views take the element loads below.
if (s_inC == 1 && (reinterpret_cast<size_t>(state_in + s_in) & 15) == 0) {
  GDN_UNROLL
  for (int m = 0; m < PER / 4; ++m) {
    float4 f;
    f.x = f.y = f.z = f.w = 0.0f;
    if (live && has_state) {
      f = *reinterpret_cast<const float4*>(state_in + s_in + 4 * L * m);
    }
    s[4 * m] = f.x;
    s[4 * m + 1] = f.y;
    s[4 * m + 2] = f.z;
    s[4 * m + 3] = f.w;
  }
} else
#endif
{
  GDN_UNROLL
  for (int i = 0; i < PER; ++i) {
    s[i] = (live && has_state) ? state_in[s_in + GDN_COL(i) * s_inC] : 0.0f;
  }
}

#if GDN_FUSED
const float log_rate_h = static_cast<float>(A_log[hv * A_log_strides[0]]);
const float rate_h = metal::exp(log_rate_h);
#if GDN_DT_KEY
// dt_bias [Hv, Dk]: this lane's columns, kept in registers.
float dt_k[PER];
GDN_UNROLL
for (int i = 0; i < PER; ++i) {
  dt_k[i] = static_cast<float>(dt_bias[hv * dt_bias_strides[0] + (LANE_COL * j + GDN_COL(i)) * dt_bias_strides[1]]);
}
#define GDN_DT(i) dt_k[i]
#else
const float dt_bias_h = static_cast<float>(dt_bias[hv * dt_bias_strides[0]]);
#define GDN_DT(i) dt_bias_h
#endif
#if GDN_LOWER
const float lower_bound_v = lower_bound[0];
#else
const float lower_bound_v = 0.0f;  // unused: LOWER is false
#endif
#endif

for (int t = 0; t < T; ++t) {
  const int64_t y_off = y0 + static_cast<int64_t>(t) * (Hv * Dv);
#if GDN_MASKED
  // Uniform over the threadgroup, so a row's lanes stay together for the shuffles.
  if (!mask[m0 + t * mT]) {
    if (live && j == 0) {
      y[y_off] = static_cast<InT>(0.0f);
    }
    continue;
  }
#endif
#if GDN_FUSED
  const float gt = KEYGATE ? 1.0f
                           : gdn_decay(static_cast<float>(a[a0 + t * aT]), rate_h, log_rate_h, GDN_DT(0), lower_bound_v, LOWER);
  const float bt = gdn_beta(static_cast<float>(b[b0 + t * bT]), NEG);
#else
  const float gt = KEYGATE ? 1.0f : static_cast<float>(g[g0 + t * gT]);
  const float bt = static_cast<float>(beta[beta0 + t * betaT]);
#endif
  const int64_t kt = k0 + t * kT, qt = q0 + t * qT;
  float kr[PER];
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  GDN_UNROLL
  for (int i = 0; i < PER; ++i) {
    kr[i] = static_cast<float>(k[kt + GDN_COL(i) * kC]);
#if !GDN_FUSED
    if (KEYGATE) {
      s[i] *= static_cast<float>(g[g0 + t * gT + GDN_COL(i) * gC]);
    } else {
      s[i] *= gt;
    }
#else
    if (KEYGATE) {
      s[i] *= gdn_decay(static_cast<float>(a[a0 + t * aT + GDN_COL(i) * aC]), rate_h, log_rate_h, GDN_DT(i),
                        lower_bound_v, LOWER);
    } else {
      s[i] *= gt;
    }
#endif
    acc[i & 3] += s[i] * kr[i];
  }
  float kv = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (int o = 1; o < L; o <<= 1) {
    kv += simd_shuffle_xor(kv, o);
  }
  const float delta = bt * (static_cast<float>(v[v0 + t * vT]) - kv);
  acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
  GDN_UNROLL
  for (int i = 0; i < PER; ++i) {
    s[i] += kr[i] * delta;
    acc[i & 3] += s[i] * static_cast<float>(q[qt + GDN_COL(i) * qC]);
  }
  float out = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (int o = 1; o < L; o <<= 1) {
    out += simd_shuffle_xor(out, o);
  }
  if (live && j == 0) {
    y[y_off] = static_cast<InT>(out);
  }
}

if (live) {
  const int64_t s_out = (static_cast<int64_t>(n) * Dv + row) * Dk + LANE_COL * j;
#if GDN_VEC4_MOVES
  // state_out is MLX's own row-contiguous allocation: every group of four is 16-byte aligned.
  GDN_UNROLL
  for (int m = 0; m < PER / 4; ++m) {
    float4 f;
    f.x = s[4 * m];
    f.y = s[4 * m + 1];
    f.z = s[4 * m + 2];
    f.w = s[4 * m + 3];
    *reinterpret_cast<float4*>(state_out + s_out + 4 * L * m) = f;
  }
#else
  GDN_UNROLL
  for (int i = 0; i < PER; ++i) {
    state_out[s_out + GDN_COL(i)] = s[i];
  }
#endif
}
