// Gate math and loop helpers shared by the recurrent kernel bodies (recurrent_decode.metal, recurrent_prefill.metal).
//
// Portable subset: plain C++ arithmetic plus metal::exp, metal::log and metal::fabs (float).
// The CUDA prelude must define those three in a `metal` namespace before this header.
// Everything is float32: the gates feed a float32 state.
#ifndef GDN_RECURRENT_GATES_H
#define GDN_RECURRENT_GATES_H

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

// Log of the decay g from the raw projection a (docs/design.md, section The math); log_rate = A_log and
// rate = exp(A_log), computed once per head by the caller.
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

#endif  // GDN_RECURRENT_GATES_H
