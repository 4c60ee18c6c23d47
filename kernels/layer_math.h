// Elementwise math of the Gated DeltaNet layer around its recurrence, for the fused layer bodies:
// decode_layer.metal (T = 1), prefill_prep.metal and gated_norm.metal (T > 1). The rounding points
// are the unfused layer's (mlx_gdn/models/layers.py: causal_conv, normalize_qk, RMSNormGated), which
// holds the conv output, its SiLU, the normalised q and k and the norm's results in the model dtype;
// a bf16 layer fused here then matches that layer, not a more precise variant of it.
// Metal vocabulary (included after gates.h, which defines GDN_INLINE and gdn_sigmoid).
#ifndef GDN_LAYER_MATH_H
#define GDN_LAYER_MATH_H

// Added to q's and k's sums of squares, as mlx-lm's l2 normalisation does.
#define GDN_QK_EPS 1e-6f

template <typename T>
GDN_INLINE float gdn_round(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// SiLU of a depthwise-conv output, conv output and SiLU each rounded to T.
template <typename T>
GDN_INLINE float gdn_conv_silu(float acc) {
  const float x = gdn_round<T>(acc);
  return gdn_round<T>(x * gdn_sigmoid(x));
}

// Multiplier of k from its sum of squares: 1 / sqrt(sum + eps). q's is this times Dk**-0.5 (the
// readout scale folded into q).
GDN_INLINE float gdn_l2_inv(float sumsq) {
  return 1.0f / metal::sqrt(sumsq + GDN_QK_EPS);
}

// One element of rms_norm(y) * weight * silu(z), from inv_rms = 1 / sqrt(mean(y^2) + eps): the
// normalised value and its product with the weight rounded to NormT (mx.fast.rms_norm's result
// type), the float32 silu gate, the result in OutT.
template <typename NormT, typename OutT>
GDN_INLINE OutT gdn_gated_norm(float y, float inv_rms, float weight, float z) {
  const float nw = gdn_round<NormT>(gdn_round<NormT>(y * inv_rms) * weight);
  return static_cast<OutT>(z * gdn_sigmoid(z) * nw);
}

#endif
