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

// 1 / sqrt(mean of squares + eps) of a row of D values from their sum of squares (rms_norm's).
GDN_INLINE float gdn_inv_rms(float sumsq, int D, float eps) {
  return 1.0f / metal::sqrt(sumsq / static_cast<float>(D) + eps);
}

// One element of rms_norm(y) * weight, as mx.fast.rms_norm rounds it: the normalised value and its
// product with the weight each rounded to NormT (rms_norm's result type for y and the weight).
template <typename NormT>
GDN_INLINE float gdn_rms_weighted(float y, float inv_rms, float weight) {
  return gdn_round<NormT>(gdn_round<NormT>(y * inv_rms) * weight);
}

// One element of rms_norm(y) * weight * silu(z) (the Qwen layers' gated norm): the float32 silu
// gate times `gdn_rms_weighted`, the result in OutT.
template <typename NormT, typename OutT>
GDN_INLINE OutT gdn_gated_norm(float y, float inv_rms, float weight, float z) {
  return static_cast<OutT>(z * gdn_sigmoid(z) * gdn_rms_weighted<NormT>(y, inv_rms, weight));
}

#endif
