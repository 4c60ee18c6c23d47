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
// Inputs, outputs, template arguments and launch geometry: as recurrent_prefill.metal, except
// that TB is not used.
//
// Vocabulary used (the CUDA prelude maps it): thread_position_in_threadgroup,
// threadgroup_position_in_grid, simd_shuffle_xor, static_cast; metal::exp, metal::log,
// metal::fabs and the GDN_UNROLL macro (in recurrent_gates.h).

constexpr int PER = Dk / L;  // state columns per lane

const int T = q_shape[1];
const int tid = static_cast<int>(thread_position_in_threadgroup.x);
const int n = static_cast<int>(threadgroup_position_in_grid.z);  // bi * Hv + hv
const int bi = n / Hv;
const int hv = n - bi * Hv;
const int hk = hv / (Hv / Hk);
const int r_loc = tid / L;
const int j = tid - r_loc * L;
const int row = static_cast<int>(threadgroup_position_in_grid.x) * R + r_loc;
const bool live = row < Dv;
const int row_c = live ? row : 0;  // rows past Dv compute on row 0's inputs and store nothing

const int qk_base = bi * T * Hk * Dk + hk * Dk + j;
const int v_base = bi * T * Hv * Dv + hv * Dv;
const int gate_base = bi * T * Hv + hv;

float s[PER];
const int s_base = (n * Dv + row_c) * Dk + j;
GDN_UNROLL
for (int i = 0; i < PER; ++i) {
  s[i] = live ? state_in[s_base + i * L] : 0.0f;
}

#if GDN_FUSED
const float rate_h = metal::exp(static_cast<float>(A_log[hv]));
const float dt_bias_h = static_cast<float>(dt_bias[hv]);
const float lower_bound_v = lower_bound[0];
#endif

for (int t = 0; t < T; ++t) {
  const int y_off = v_base + t * (Hv * Dv) + row;
#if GDN_MASKED
  // Uniform over the threadgroup, so a row's lanes stay together for the shuffles.
  if (!mask[bi * T + t]) {
    if (live && j == 0) {
      y[y_off] = static_cast<InT>(0.0f);
    }
    continue;
  }
#endif
  const int gi = gate_base + t * Hv;
#if GDN_FUSED
  const float gt = gdn_decay(static_cast<float>(a[gi]), rate_h, dt_bias_h, lower_bound_v, LOWER);
  const float bt = gdn_beta(static_cast<float>(b[gi]), NEG);
#else
  const float gt = KEYGATE ? 1.0f : static_cast<float>(g[gi]);
  const float bt = static_cast<float>(beta[gi]);
#endif
  const int kq = qk_base + t * (Hk * Dk);
  float kr[PER];
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  GDN_UNROLL
  for (int i = 0; i < PER; ++i) {
    kr[i] = static_cast<float>(k[kq + i * L]);
#if !GDN_FUSED
    if (KEYGATE) {
      s[i] *= static_cast<float>(g[gi * Dk + j + i * L]);
    } else {
      s[i] *= gt;
    }
#else
    s[i] *= gt;
#endif
    acc[i & 3] += s[i] * kr[i];
  }
  float kv = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (int o = 1; o < L; o <<= 1) {
    kv += simd_shuffle_xor(kv, o);
  }
  const float delta = bt * (static_cast<float>(v[v_base + t * (Hv * Dv) + row_c]) - kv);
  acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
  GDN_UNROLL
  for (int i = 0; i < PER; ++i) {
    s[i] += kr[i] * delta;
    acc[i & 3] += s[i] * static_cast<float>(q[kq + i * L]);
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
  GDN_UNROLL
  for (int i = 0; i < PER; ++i) {
    state_out[s_base + i * L] = s[i];
  }
}
