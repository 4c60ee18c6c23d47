// The output norm of the Gated DeltaNet layer over many rows: out = rms_norm(y) * weight * silu(z)
// per row of Dv (one value head of one token), one launch in place of rms_norm and the gate. The
// unfused module is RMSNormGated in mlx_gdn/models/layers.py; the element math is gdn_gated_norm
// (layer_math.h), the one decode_layer.metal applies at T = 1.
//
// Inputs: y [N, Dv] (InT, the recurrence output), z [N, Dv] (ZT, the gate), weight [Dv] (read
// through static_cast<float>). Output: out [N, Dv] InT.
// Template: InT, ZT, NormT (mx.fast.rms_norm's result type for y and the weight), Dv, RPT (rows per
// threadgroup). GDN_NORM_EPS: rms_norm's eps.
// Grid (32 * RPT * ceil(N / RPT), 1, 1), threadgroup (32 * RPT, 1, 1): one simdgroup per row, lane j
// holding elements j, j + 32, ...; a row's sum of squares is one simd_sum.

constexpr int PER = (Dv + 31) / 32;

const int lane = static_cast<int>(thread_position_in_threadgroup.x) & 31;
const size_t row = static_cast<size_t>(threadgroup_position_in_grid.x) * RPT +
                   (static_cast<int>(thread_position_in_threadgroup.x) >> 5);
const size_t N = static_cast<size_t>(y_shape[0]);

if (row < N) {  // uniform over the simdgroup: simd_sum below sees whole simdgroups
  const size_t base = row * Dv;
  float ys[PER];
  float ss = 0.0f;
  GDN_UNROLL
  for (int p = 0; p < PER; ++p) {
    const int i = lane + 32 * p;
    ys[p] = i < Dv ? static_cast<float>(y[base + i]) : 0.0f;
    ss += ys[p] * ys[p];
  }
  ss = simd_sum(ss);
  const float inv_rms = gdn_inv_rms(ss, Dv, GDN_NORM_EPS);
  GDN_UNROLL
  for (int p = 0; p < PER; ++p) {
    const int i = lane + 32 * p;
    if (i < Dv) {
      out[base + i] = gdn_gated_norm<NormT, InT>(ys[p], inv_rms, static_cast<float>(weight[i]),
                                                static_cast<float>(z[base + i]));
    }
  }
}
