// Chunked gated delta rule, part 1 of 2: everything inside one chunk that does not depend on
// the state entering it. One threadgroup of NSG simdgroups per (chunk n, value head hv, batch b).
//
// Inputs (float32, padded to Tp = N*C steps; masked and padded steps already have q = k = v = 0,
// g = 1, beta = 0, which makes them identity steps with y = 0):
//   q, k: [B, Tp, Hk, Dk]   v: [B, Tp, Hv, Dv]   g, beta: [B, Tp, Hv]
// Outputs, per (b, hv, n):
//   wq: [B, Hv, N, 2C, Dk]  rows 0..C-1: -W = -T diag(beta*gamma) K; rows C..2C-1: Qe = diag(gamma) Q - P W
//   uy: [B, Hv, N, 2C, Dv]  rows 0..C-1: Uv = T diag(beta) V;        rows C..2C-1: Yv = P Uv
//   kd: [B, Hv, N, C, Dk]   (gamma_C / gamma_j) k_j
//   gc: [B, Hv, N]          gamma_C
// with T = (I + A)^-1, A_ij = beta_i (k_i.k_j) gamma_i/gamma_j (j < i), P_ij = (q_i.k_j) gamma_i/gamma_j (j <= i).
// Template: C (chunk, multiple of 8), Dk, Dv (multiples of 8), Hk, Hv, NSG.

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint NT = NSG * 32;
const uint n = threadgroup_position_in_grid.x;
const uint hv = threadgroup_position_in_grid.y;
const uint b = threadgroup_position_in_grid.z;
const uint hk = hv / (Hv / Hk);
const int Tp = q_shape[1];
const int N = Tp / C;
const int t0 = n * C;

threadgroup float lgs[C];
threadgroup float bet[C];
threadgroup float gam[C];
threadgroup float endd[C];
threadgroup float Am[C * C];   // A, then diag(gamma)
threadgroup float Pm[C * C];   // P
threadgroup float M1[C * C];   // -T diag(beta*gamma)
threadgroup float M2[C * C];   // T diag(beta)
threadgroup float PM1[C * C];  // P M1
threadgroup float PM2[C * C];  // P M2

// Row strides (in elements) of one head's rows of q/k and of v.
const uint ks = Hk * Dk;
const uint vs = Hv * Dv;
const device float* kc = k + ((b * Tp + t0) * Hk + hk) * Dk;
const device float* qc = q + ((b * Tp + t0) * Hk + hk) * Dk;
const device float* vc = v + ((b * Tp + t0) * Hv + hv) * Dv;

for (uint i = tid; i < C; i += NT) {
  float gi = g[(b * Tp + t0 + i) * Hv + hv];
  // log 0 = -inf: sums of -inf stay -inf and exp gives 0; no inf - inf ever forms.
  lgs[i] = gi > 0.0f ? metal::log(gi) : -INFINITY;
  bet[i] = beta[(b * Tp + t0 + i) * Hv + hv];
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

// A = K K^T and P = Q K^T, lower-triangular 8x8 tiles only.
constexpr uint TC = C / 8;
for (uint t = sg; t < TC * TC; t += NSG) {
  uint ti = t / TC, tj = t % TC;
  simdgroup_float8x8 a = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_float8x8 p = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  if (tj <= ti) {
    for (uint d = 0; d < Dk; d += 8) {
      simdgroup_float8x8 kl, ql, kr;
      simdgroup_load(kl, kc + ti * 8 * ks + d, ks);
      simdgroup_load(ql, qc + ti * 8 * ks + d, ks);
      simdgroup_load(kr, kc + tj * 8 * ks + d, ks, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(a, kl, kr, a);
      simdgroup_multiply_accumulate(p, ql, kr, p);
    }
  }
  simdgroup_store(a, Am + ti * 8 * C + tj * 8, C);
  simdgroup_store(p, Pm + ti * 8 * C + tj * 8, C);
}
threadgroup_barrier(mem_flags::mem_threadgroup);

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

const uint head = (b * Hv + hv) * N + n;
device float* wq_ = wq + head * (2 * C * Dk);
device float* uy_ = uy + head * (2 * C * Dv);
device float* kd_ = kd + head * (C * Dk);

// -W = M1 K and Qe = diag(gamma) Q + (P M1) K: [C, Dk] each.
for (uint t = sg; t < TC * (Dk / 8); t += NSG) {
  uint ti = t / (Dk / 8), d = (t % (Dk / 8)) * 8;
  simdgroup_float8x8 w = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_float8x8 qe = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (uint kk = 0; kk < TC; ++kk) {
    simdgroup_float8x8 m1, pm1, dg, kr, qr;
    simdgroup_load(m1, M1 + ti * 8 * C + kk * 8, C);
    simdgroup_load(pm1, PM1 + ti * 8 * C + kk * 8, C);
    simdgroup_load(dg, Am + ti * 8 * C + kk * 8, C);
    simdgroup_load(kr, kc + kk * 8 * ks + d, ks);
    simdgroup_load(qr, qc + kk * 8 * ks + d, ks);
    simdgroup_multiply_accumulate(w, m1, kr, w);
    simdgroup_multiply_accumulate(qe, pm1, kr, qe);
    simdgroup_multiply_accumulate(qe, dg, qr, qe);
  }
  simdgroup_store(w, wq_ + ti * 8 * Dk + d, Dk);
  simdgroup_store(qe, wq_ + (C + ti * 8) * Dk + d, Dk);
}
// Uv = M2 V and Yv = (P M2) V: [C, Dv] each.
for (uint t = sg; t < TC * (Dv / 8); t += NSG) {
  uint ti = t / (Dv / 8), d = (t % (Dv / 8)) * 8;
  simdgroup_float8x8 u = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_float8x8 yv = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (uint kk = 0; kk < TC; ++kk) {
    simdgroup_float8x8 m2, pm2, vr;
    simdgroup_load(m2, M2 + ti * 8 * C + kk * 8, C);
    simdgroup_load(pm2, PM2 + ti * 8 * C + kk * 8, C);
    simdgroup_load(vr, vc + kk * 8 * vs + d, vs);
    simdgroup_multiply_accumulate(u, m2, vr, u);
    simdgroup_multiply_accumulate(yv, pm2, vr, yv);
  }
  simdgroup_store(u, uy_ + ti * 8 * Dv + d, Dv);
  simdgroup_store(yv, uy_ + (C + ti * 8) * Dv + d, Dv);
}
for (uint e = tid; e < C * Dk; e += NT) {
  uint i = e / Dk, d = e % Dk;
  kd_[e] = endd[i] * kc[i * ks + d];
}
if (tid == 0) {
  gc[head] = gam[C - 1];
}
