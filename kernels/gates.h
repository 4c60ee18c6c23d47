// Gate math for every kernel: the recurrent bodies (recurrent_decode.metal, recurrent_prefill.metal),
// the decode layer body (decode_layer.metal) and both chunked kernel families (Metal and CUDA).
//
// The same math as mlx_gdn/gating.py (the one Python definition, for the ops paths): decay
// g = exp(-exp(A_log) * softplus(a + dt_bias)), or exp(lower_bound * sigmoid(exp(A_log) * (a + dt_bias)))
// with lower_bound, formed in log space where exp(A_log) overflows float32; write strength
// beta = sigmoid(b), doubled with allow_neg_eigval. What pins the two together: every path is
// compared with the float64 reference (mlx_gdn/reference.py) on fused gates, mild and trained-like,
// lower_bound and allow_neg_eigval included (tests/test_ops_recurrent.py, test_metal_recurrent.py,
// test_metal_chunked.py, test_cuda_sim.py, test_decode_layer.py).
//
// Per head and per key: a gate per head reads a[b, t, hv] and dt_bias[hv]; a gate per key column
// reads a[b, t, hv, d] and dt_bias[hv] or dt_bias[hv, d] (`gdn_dt_bias_index`); A_log is per head
// either way, so rate and log_rate are computed once per head by the caller.
//
// Written in the Metal vocabulary: plain C++ arithmetic plus metal::exp, metal::log and metal::fabs
// (float). Metal has them; the CUDA prelude (cuda_prelude.h) and both simulators define them; the
// CUDA-only chunked kernels, which go without the prelude, get the three from the block below.
// Everything is float32: the gates feed a float32 state.
#ifndef GDN_GATES_H
#define GDN_GATES_H

#ifndef GDN_INLINE
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GDN_INLINE __device__ __forceinline__
#else
#define GDN_INLINE inline
#endif
#endif

// Full unrolling keeps the per-lane state arrays in registers.
#ifndef GDN_UNROLL
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GDN_UNROLL _Pragma("unroll")
#elif defined(__METAL_VERSION__)
#define GDN_UNROLL _Pragma("clang loop unroll(full)")
#else
#define GDN_UNROLL
#endif
#endif

#if (defined(__CUDACC__) || defined(__CUDACC_RTC__)) && !defined(GDN_CUDA_PRELUDE_H)
namespace metal {
__device__ __forceinline__ float exp(float x) { return expf(x); }
__device__ __forceinline__ float log(float x) { return logf(x); }
__device__ __forceinline__ float fabs(float x) { return fabsf(x); }
}  // namespace metal
#endif

// +inf as a float; NVRTC does not promise the INFINITY macro.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GDN_INF __int_as_float(0x7f800000)
#else
#define GDN_INF INFINITY
#endif

// 1 / (1 + exp(-z)); exp only ever sees a non-positive argument, so nothing overflows.
GDN_INLINE float gdn_sigmoid(float z) {
  float e = metal::exp(-metal::fabs(z));
  float p = 1.0f / (1.0f + e);
  return z >= 0.0f ? p : e * p;
}

// log(1 + exp(x)). log1p is not in Metal's library, so log1p(u) is recovered from log(1 + u)
// with the (1 + u) - 1 correction; without it, softplus of a very negative x loses all its digits.
GDN_INLINE float gdn_softplus(float x) {
  float u = metal::exp(-metal::fabs(x));
  float w = 1.0f + u;
  float l1p = (w == 1.0f) ? u : metal::log(w) * (u / (w - 1.0f));
  return (x > 0.0f ? x : 0.0f) + l1p;
}

// exp(A_log) overflows float32 above this, and inf * 0 is NaN; past it rate * z is formed as
// exp(A_log + log z), which is finite (or a clean inf) wherever the true product is.
#define GDN_LOG_RATE_MAX 88.0f

// rate * softplus(x), with rate = exp(log_rate). Below x = -20, log softplus(x) equals x to float
// precision, and using x keeps the product right where softplus itself underflows to 0.
GDN_INLINE float gdn_rate_softplus(float rate, float log_rate, float x) {
  if (log_rate <= GDN_LOG_RATE_MAX) return rate * gdn_softplus(x);
  return metal::exp(log_rate + (x < -20.0f ? x : metal::log(gdn_softplus(x))));
}

// rate * x for x of either sign, rate = exp(log_rate).
GDN_INLINE float gdn_rate_times(float rate, float log_rate, float x) {
  if (log_rate <= GDN_LOG_RATE_MAX) return rate * x;
  if (x == 0.0f) return 0.0f;
  float m = metal::exp(log_rate + metal::log(metal::fabs(x)));
  return x > 0.0f ? m : -m;
}

// Log of the decay g from the raw projection a; log_rate = A_log and rate = exp(A_log), computed
// once per head by the caller. Per key column: call it per column with that column's a and dt_bias.
// lower: log g = lower_bound * sigmoid(rate * (a + dt_bias));
// else:  log g = -rate * softplus(a + dt_bias).
GDN_INLINE float gdn_log_decay(float a, float rate, float log_rate, float dt_bias, float lower_bound, bool lower) {
  float x = a + dt_bias;
  return lower ? lower_bound * gdn_sigmoid(gdn_rate_times(rate, log_rate, x)) : -gdn_rate_softplus(rate, log_rate, x);
}

// Decay g in (0, 1]: exp of gdn_log_decay.
GDN_INLINE float gdn_decay(float a, float rate, float log_rate, float dt_bias, float lower_bound, bool lower) {
  return metal::exp(gdn_log_decay(a, rate, log_rate, dt_bias, lower_bound, lower));
}

// Write strength: sigmoid(b), doubled when negative eigenvalues are allowed.
GDN_INLINE float gdn_beta(float b, bool neg) {
  float s = gdn_sigmoid(b);
  return neg ? 2.0f * s : s;
}

// log g of a precomputed gate, with log 0 = -inf: sums of -inf stay -inf and exp gives 0, and
// no inf - inf ever forms where decays are sums over steps.
GDN_INLINE float gdn_log_gate(float g) { return g > 0.0f ? metal::log(g) : -GDN_INF; }

// Decays below exp(GDN_LOG_DECAY_FLOOR) (about 4e-18) are formed as exact zeros where a kernel
// folds per-key decays into its operands (the chunked kernels): every such factor is at most 1,
// so the product it belongs to is below the floor too, invisible next to the identity of
// (I + A), while carrying it would put subnormal floats into the products. The ops form's
// threshold is the same (ops/chunked.py, FOLD_LOG_FLOOR).
#define GDN_LOG_DECAY_FLOOR -40.0f

// exp(x) for a log-decay x <= 0 (-inf allowed), exactly 0 below GDN_LOG_DECAY_FLOOR.
GDN_INLINE float gdn_decay_factor(float x) { return x >= GDN_LOG_DECAY_FLOOR ? metal::exp(x) : 0.0f; }

// Element of dt_bias for key column d of value head hv: [Hv] (one per head) or [Hv, Dk].
GDN_INLINE int gdn_dt_bias_index(int hv, int d, int Dk, bool dt_key) { return dt_key ? hv * Dk + d : hv; }

#endif  // GDN_GATES_H
