// CPU runtime for simulated Metal compute kernels.
//
// A generated translation unit includes this header, then the (rewritten)
// kernel header and body.  Everything a Metal kernel body may name lives in
// namespace `metal` (made visible with `using namespace metal`, as MLX's own
// preamble does); the machinery lives in namespace `metal_sim`.
//
// Execution model: each threadgroup runs on one OS thread.  When the kernel
// uses simd collectives or barriers every GPU thread ("lane") is a fiber with
// its own small stack; lanes yield to a scheduler at each collective/barrier,
// and the scheduler releases a collective only once every live lane of the
// simdgroup has arrived, so no lane sees a result before all contributed.
#pragma once

#include <atomic>
#include <cfloat>
#include <climits>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <new>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>

#if !defined(__x86_64__) && !defined(__aarch64__) && !defined(MSIM_UCONTEXT)
#define MSIM_UCONTEXT 1
#endif
#ifdef MSIM_UCONTEXT
#include <ucontext.h>
#endif

#undef isnan
#undef isinf
#undef isfinite
#undef signbit

// ---------------------------------------------------------------------------
// C ABI shared with the Python driver (mlx_gdn/sim/_core.py mirrors it).
extern "C" {
struct msim_buf {
  void* data;
  int64_t nbytes;
  const char* name;
  const char* tname;  // element type as written in the signature
  int64_t elem_size;
};
struct msim_launch {
  int32_t nbufs;
  msim_buf* bufs;
  uint32_t grid[3];
  uint32_t tg[3];
  int32_t fibers;    // 0: run lanes one after another (no collectives)
  int32_t nthreads;  // OS threads over threadgroups
  int64_t stack_size;
  char* err;
  int32_t errcap;
  int32_t errkind;   // 1: out of bounds, 2: other
};
}

namespace metal_sim {
struct Lane;
}

// ---------------------------------------------------------------------------
// Scalar types.
namespace metal {

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;
typedef _Float16 float16_t;

struct bfloat16_t {
  uint16_t bits;
  static constexpr uint16_t from_float(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
  bfloat16_t() = default;
  constexpr bfloat16_t(float f) : bits(from_float(f)) {}
  template <class U,
            std::enable_if_t<std::is_arithmetic_v<U> || std::is_same_v<U, _Float16>, int> = 0>
  constexpr bfloat16_t(U u) : bits(from_float(float(u))) {}
  constexpr operator float() const { return __builtin_bit_cast(float, uint32_t(bits) << 16); }
  static constexpr bfloat16_t from_bits(uint16_t b) {
    bfloat16_t r{};
    r.bits = b;
    return r;
  }
};
typedef bfloat16_t bfloat;

}  // namespace metal

namespace metal_sim {
using metal::bfloat16_t;
using metal::half;

template <class T>
struct is_fp : std::bool_constant<std::is_floating_point_v<T> || std::is_same_v<T, _Float16> ||
                                  std::is_same_v<T, bfloat16_t>> {};
template <class T>
struct is_num : std::bool_constant<is_fp<T>::value || std::is_integral_v<T>> {};
template <class T>
inline constexpr bool is_fp_v = is_fp<T>::value;
template <class T>
inline constexpr bool is_num_v = is_num<T>::value;
}  // namespace metal_sim

namespace metal {
// bf16 arithmetic: bf op bf -> bf; bf op float/double -> that; bf op int -> bf;
// bf op half -> float.  Templates give exact matches so builtin candidates
// reached through the implicit float conversion never tie.
template <class U>
using bf_res = std::conditional_t<
    std::is_same_v<U, bfloat16_t> || std::is_integral_v<U>, bfloat16_t,
    std::conditional_t<std::is_same_v<U, _Float16>, float, U>>;
#define MSIM_BF_BINOP(op)                                                              \
  template <class U, std::enable_if_t<metal_sim::is_num_v<U>, int> = 0>                \
  constexpr bf_res<U> operator op(bfloat16_t a, U b) {                                 \
    using R = bf_res<U>;                                                               \
    using C = std::conditional_t<std::is_same_v<R, double>, double, float>;            \
    return R(C(float(a)) op C(b));                                                     \
  }                                                                                    \
  template <class U, std::enable_if_t<metal_sim::is_num_v<U> &&                        \
                                          !std::is_same_v<U, bfloat16_t>, int> = 0>    \
  constexpr bf_res<U> operator op(U a, bfloat16_t b) {                                 \
    using R = bf_res<U>;                                                               \
    using C = std::conditional_t<std::is_same_v<R, double>, double, float>;            \
    return R(C(a) op C(float(b)));                                                     \
  }                                                                                    \
  template <class U, std::enable_if_t<metal_sim::is_num_v<U>, int> = 0>                \
  constexpr bfloat16_t& operator op##=(bfloat16_t & a, U b) {                          \
    a = bfloat16_t(float(a) op float(b));                                              \
    return a;                                                                          \
  }
MSIM_BF_BINOP(+)
MSIM_BF_BINOP(-)
MSIM_BF_BINOP(*)
MSIM_BF_BINOP(/)
#undef MSIM_BF_BINOP
#define MSIM_BF_CMP(op)                                                                \
  template <class U, std::enable_if_t<metal_sim::is_num_v<U>, int> = 0>                \
  constexpr bool operator op(bfloat16_t a, U b) { return float(a) op float(b); }       \
  template <class U, std::enable_if_t<metal_sim::is_num_v<U> &&                        \
                                          !std::is_same_v<U, bfloat16_t>, int> = 0>    \
  constexpr bool operator op(U a, bfloat16_t b) { return float(a) op float(b); }
MSIM_BF_CMP(<)
MSIM_BF_CMP(>)
MSIM_BF_CMP(<=)
MSIM_BF_CMP(>=)
MSIM_BF_CMP(==)
MSIM_BF_CMP(!=)
#undef MSIM_BF_CMP
constexpr bfloat16_t operator-(bfloat16_t a) { return bfloat16_t::from_bits(a.bits ^ 0x8000u); }
constexpr bfloat16_t operator+(bfloat16_t a) { return a; }
inline bfloat16_t& operator++(bfloat16_t& a) { return a = bfloat16_t(float(a) + 1.0f); }
inline bfloat16_t& operator--(bfloat16_t& a) { return a = bfloat16_t(float(a) - 1.0f); }

// ---------------------------------------------------------------------------
// Vector types.
template <class T, int N>
struct vec;

#define MSIM_VEC_COMMON(N)                                                           \
  using value_type = T;                                                              \
  static constexpr int size = N;                                                     \
  T& operator[](int i) { return (&x)[i]; }                                           \
  const T& operator[](int i) const { return (&x)[i]; }                               \
  template <class U, std::enable_if_t<!std::is_same_v<U, T>, int> = 0>               \
  explicit vec(const vec<U, N>& o) {                                                 \
    for (int i = 0; i < N; ++i) (*this)[i] = T(o[i]);                                \
  }

template <class T>
struct alignas(2 * sizeof(T)) vec<T, 2> {
  T x, y;
  vec() = default;
  vec(T s) : x(s), y(s) {}
  vec(T a, T b) : x(a), y(b) {}
  MSIM_VEC_COMMON(2)
};
template <class T>
struct alignas(4 * sizeof(T)) vec<T, 3> {
  T x, y, z;
  T pad_;
  vec() = default;
  vec(T s) : x(s), y(s), z(s) {}
  vec(T a, T b, T c) : x(a), y(b), z(c) {}
  vec(vec<T, 2> a, T c) : x(a.x), y(a.y), z(c) {}
  vec(T a, vec<T, 2> b) : x(a), y(b.x), z(b.y) {}
  vec<T, 2> xy() const { return {x, y}; }
  MSIM_VEC_COMMON(3)
};
template <class T>
struct alignas(4 * sizeof(T)) vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  vec(T s) : x(s), y(s), z(s), w(s) {}
  vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  vec(vec<T, 2> a, T c, T d) : x(a.x), y(a.y), z(c), w(d) {}
  vec(T a, T b, vec<T, 2> c) : x(a), y(b), z(c.x), w(c.y) {}
  vec(vec<T, 2> a, vec<T, 2> b) : x(a.x), y(a.y), z(b.x), w(b.y) {}
  vec(vec<T, 3> a, T d) : x(a.x), y(a.y), z(a.z), w(d) {}
  vec(T a, vec<T, 3> b) : x(a), y(b.x), z(b.y), w(b.z) {}
  MSIM_VEC_COMMON(4)
};
#undef MSIM_VEC_COMMON

#define MSIM_VEC_BINOP(op)                                                           \
  template <class T, int N>                                                          \
  vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {                    \
    vec<T, N> r;                                                                     \
    for (int i = 0; i < N; ++i) r[i] = T(a[i] op b[i]);                              \
    return r;                                                                        \
  }                                                                                  \
  template <class T, int N, class U, std::enable_if_t<metal_sim::is_num_v<U>, int> = 0> \
  vec<T, N> operator op(const vec<T, N>& a, U b) {                                   \
    vec<T, N> r;                                                                     \
    for (int i = 0; i < N; ++i) r[i] = T(a[i] op T(b));                              \
    return r;                                                                        \
  }                                                                                  \
  template <class T, int N, class U, std::enable_if_t<metal_sim::is_num_v<U>, int> = 0> \
  vec<T, N> operator op(U a, const vec<T, N>& b) {                                   \
    vec<T, N> r;                                                                     \
    for (int i = 0; i < N; ++i) r[i] = T(T(a) op b[i]);                              \
    return r;                                                                        \
  }                                                                                  \
  template <class T, int N, class U>                                                 \
  vec<T, N>& operator op##=(vec<T, N>& a, const U& b) {                              \
    a = a op b;                                                                      \
    return a;                                                                        \
  }
MSIM_VEC_BINOP(+)
MSIM_VEC_BINOP(-)
MSIM_VEC_BINOP(*)
MSIM_VEC_BINOP(/)
MSIM_VEC_BINOP(%)
MSIM_VEC_BINOP(&)
MSIM_VEC_BINOP(|)
MSIM_VEC_BINOP(^)
MSIM_VEC_BINOP(<<)
MSIM_VEC_BINOP(>>)
#undef MSIM_VEC_BINOP
#define MSIM_VEC_CMP(op)                                                             \
  template <class T, int N>                                                          \
  vec<bool, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {                 \
    vec<bool, N> r;                                                                  \
    for (int i = 0; i < N; ++i) r[i] = a[i] op b[i];                                 \
    return r;                                                                        \
  }                                                                                  \
  template <class T, int N, class U, std::enable_if_t<metal_sim::is_num_v<U>, int> = 0> \
  vec<bool, N> operator op(const vec<T, N>& a, U b) {                                \
    vec<bool, N> r;                                                                  \
    for (int i = 0; i < N; ++i) r[i] = a[i] op T(b);                                 \
    return r;                                                                        \
  }
MSIM_VEC_CMP(<)
MSIM_VEC_CMP(>)
MSIM_VEC_CMP(<=)
MSIM_VEC_CMP(>=)
MSIM_VEC_CMP(==)
MSIM_VEC_CMP(!=)
#undef MSIM_VEC_CMP
template <class T, int N>
vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = -a[i];
  return r;
}
template <class T, int N>
vec<T, N> operator+(const vec<T, N>& a) { return a; }
template <int N>
vec<bool, N> operator!(const vec<bool, N>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r[i] = !a[i];
  return r;
}

#define MSIM_VEC_TYPES(T, name) \
  typedef vec<T, 2> name##2;    \
  typedef vec<T, 3> name##3;    \
  typedef vec<T, 4> name##4;
MSIM_VEC_TYPES(float, float)
MSIM_VEC_TYPES(half, half)
MSIM_VEC_TYPES(bfloat16_t, bfloat)
MSIM_VEC_TYPES(int, int)
MSIM_VEC_TYPES(uint, uint)
MSIM_VEC_TYPES(short, short)
MSIM_VEC_TYPES(ushort, ushort)
MSIM_VEC_TYPES(char, char)
MSIM_VEC_TYPES(uchar, uchar)
MSIM_VEC_TYPES(long, long)
MSIM_VEC_TYPES(ulong, ulong)
MSIM_VEC_TYPES(bool, bool)
#undef MSIM_VEC_TYPES
typedef vec<int64_t, 2> int64_t2;

template <int N>
bool all(const vec<bool, N>& v) {
  for (int i = 0; i < N; ++i)
    if (!v[i]) return false;
  return true;
}
template <int N>
bool any(const vec<bool, N>& v) {
  for (int i = 0; i < N; ++i)
    if (v[i]) return true;
  return false;
}
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }
template <class T, int N>
T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = T(0);
  for (int i = 0; i < N; ++i) s += a[i] * b[i];
  return s;
}

// ---------------------------------------------------------------------------
// Math.  One template per function over all floating scalars (exact match,
// so no ambiguity with glibc's global overloads), integers go through float.
template <class T>
struct fcomp {
  using type = std::conditional_t<std::is_same_v<T, double>, double, float>;
};
#define MSIM_UNARY(name, ff, fd)                                                     \
  template <class T, std::enable_if_t<metal_sim::is_fp_v<T>, int> = 0>               \
  inline T name(T x) {                                                               \
    if constexpr (std::is_same_v<T, double>)                                         \
      return fd(x);                                                                  \
    else                                                                             \
      return T(ff(float(x)));                                                        \
  }                                                                                  \
  template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>               \
  inline float name(T x) { return ff(float(x)); }                                    \
  template <class T, int N>                                                          \
  inline vec<T, N> name(const vec<T, N>& v) {                                        \
    vec<T, N> r;                                                                     \
    for (int i = 0; i < N; ++i) r[i] = name(v[i]);                                   \
    return r;                                                                        \
  }

#define MSIM_MATH_UNARIES                                        \
  MSIM_UNARY(exp, __builtin_expf, __builtin_exp)                 \
  MSIM_UNARY(exp2, __builtin_exp2f, __builtin_exp2)              \
  MSIM_UNARY(exp10, msim_exp10f, msim_exp10)                     \
  MSIM_UNARY(log, __builtin_logf, __builtin_log)                 \
  MSIM_UNARY(log2, __builtin_log2f, __builtin_log2)              \
  MSIM_UNARY(log10, __builtin_log10f, __builtin_log10)           \
  MSIM_UNARY(log1p, __builtin_log1pf, __builtin_log1p)           \
  MSIM_UNARY(expm1, __builtin_expm1f, __builtin_expm1)           \
  MSIM_UNARY(sqrt, __builtin_sqrtf, __builtin_sqrt)              \
  MSIM_UNARY(rsqrt, msim_rsqrtf, msim_rsqrt)                     \
  MSIM_UNARY(sin, __builtin_sinf, __builtin_sin)                 \
  MSIM_UNARY(cos, __builtin_cosf, __builtin_cos)                 \
  MSIM_UNARY(tan, __builtin_tanf, __builtin_tan)                 \
  MSIM_UNARY(asin, __builtin_asinf, __builtin_asin)              \
  MSIM_UNARY(acos, __builtin_acosf, __builtin_acos)              \
  MSIM_UNARY(atan, __builtin_atanf, __builtin_atan)              \
  MSIM_UNARY(sinh, __builtin_sinhf, __builtin_sinh)              \
  MSIM_UNARY(cosh, __builtin_coshf, __builtin_cosh)              \
  MSIM_UNARY(tanh, __builtin_tanhf, __builtin_tanh)              \
  MSIM_UNARY(erf, __builtin_erff, __builtin_erf)                 \
  MSIM_UNARY(floor, __builtin_floorf, __builtin_floor)           \
  MSIM_UNARY(ceil, __builtin_ceilf, __builtin_ceil)              \
  MSIM_UNARY(round, __builtin_roundf, __builtin_round)           \
  MSIM_UNARY(rint, __builtin_rintf, __builtin_rint)              \
  MSIM_UNARY(trunc, __builtin_truncf, __builtin_trunc)           \
  MSIM_UNARY(fabs, __builtin_fabsf, __builtin_fabs)              \
  MSIM_UNARY(fract, msim_fractf, msim_fract)                     \
  MSIM_UNARY(saturate, msim_saturatef, msim_saturate)            \
  MSIM_UNARY(sign, msim_signf, msim_sign)                        \
  MSIM_UNARY(recip, msim_recipf, msim_recip)

inline float msim_exp10f(float x) { return __builtin_powf(10.0f, x); }
inline double msim_exp10(double x) { return __builtin_pow(10.0, x); }
inline float msim_rsqrtf(float x) { return 1.0f / __builtin_sqrtf(x); }
inline double msim_rsqrt(double x) { return 1.0 / __builtin_sqrt(x); }
inline float msim_fractf(float x) {
  float r = x - __builtin_floorf(x);
  return r < 0x1.fffffep-1f ? r : 0x1.fffffep-1f;
}
inline double msim_fract(double x) { return x - __builtin_floor(x); }
inline float msim_saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline double msim_saturate(double x) { return x < 0.0 ? 0.0 : (x > 1.0 ? 1.0 : x); }
inline float msim_signf(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x * 0.0f); }
inline double msim_sign(double x) { return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : x * 0.0); }
inline float msim_recipf(float x) { return 1.0f / x; }
inline double msim_recip(double x) { return 1.0 / x; }

MSIM_MATH_UNARIES

template <class T, std::enable_if_t<metal_sim::is_fp_v<T>, int> = 0>
inline T abs(T x) { return T(__builtin_fabs(double(x))); }
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T abs(T x) { return x < 0 ? T(-x) : x; }
template <class T, int N>
inline vec<T, N> abs(const vec<T, N>& v) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = abs(v[i]);
  return r;
}

#define MSIM_BINARY(name, expr)                                                      \
  template <class T, std::enable_if_t<metal_sim::is_num_v<T>, int> = 0>              \
  inline T name(T a, T b) {                                                          \
    using C = std::conditional_t<std::is_integral_v<T>, T, typename fcomp<T>::type>; \
    C x = C(a), y = C(b);                                                            \
    return T(expr);                                                                  \
  }                                                                                  \
  template <class A, class B,                                                        \
            std::enable_if_t<metal_sim::is_num_v<A> && metal_sim::is_num_v<B> &&     \
                                 !std::is_same_v<A, B>, int> = 0>                    \
  inline auto name(A a, B b) {                                                       \
    using R = decltype(a + b);                                                       \
    return name(R(a), R(b));                                                         \
  }                                                                                  \
  template <class T, int N>                                                          \
  inline vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b) {                    \
    vec<T, N> r;                                                                     \
    for (int i = 0; i < N; ++i) r[i] = name(a[i], b[i]);                             \
    return r;                                                                        \
  }                                                                                  \
  template <class T, int N, class U, std::enable_if_t<metal_sim::is_num_v<U>, int> = 0> \
  inline vec<T, N> name(const vec<T, N>& a, U b) {                                   \
    return name(a, vec<T, N>(T(b)));                                                 \
  }

template <class C>
inline C msim_max(C x, C y) {
  if constexpr (std::is_floating_point_v<C>) {
    if (x != x) return y;
    if (y != y) return x;
  }
  return x > y ? x : y;
}
template <class C>
inline C msim_min(C x, C y) {
  if constexpr (std::is_floating_point_v<C>) {
    if (x != x) return y;
    if (y != y) return x;
  }
  return x < y ? x : y;
}
template <class C>
inline C msim_pow(C x, C y) {
  if constexpr (std::is_same_v<C, double>) return __builtin_pow(x, y);
  else if constexpr (std::is_integral_v<C>) return C(__builtin_pow(double(x), double(y)));
  else return __builtin_powf(x, y);
}
template <class C>
inline C msim_fmod(C x, C y) {
  if constexpr (std::is_same_v<C, double>) return __builtin_fmod(x, y);
  else if constexpr (std::is_integral_v<C>) return x % y;
  else return __builtin_fmodf(x, y);
}
template <class C>
inline C msim_atan2(C x, C y) {
  if constexpr (std::is_same_v<C, double>) return __builtin_atan2(x, y);
  else return C(__builtin_atan2f(float(x), float(y)));
}
template <class C>
inline C msim_copysign(C x, C y) {
  if constexpr (std::is_same_v<C, double>) return __builtin_copysign(x, y);
  else return C(__builtin_copysignf(float(x), float(y)));
}

MSIM_BINARY(max, msim_max(x, y))
MSIM_BINARY(min, msim_min(x, y))
MSIM_BINARY(fmax, msim_max(x, y))
MSIM_BINARY(fmin, msim_min(x, y))
MSIM_BINARY(pow, msim_pow(x, y))
MSIM_BINARY(powr, msim_pow(x, y))
MSIM_BINARY(fmod, msim_fmod(x, y))
MSIM_BINARY(atan2, msim_atan2(x, y))
MSIM_BINARY(copysign, msim_copysign(x, y))
MSIM_BINARY(step, (y < x ? C(0) : C(1)))
MSIM_BINARY(divide, x / y)
#undef MSIM_BINARY

template <class T, std::enable_if_t<metal_sim::is_num_v<T>, int> = 0>
inline T fma(T a, T b, T c) {
  if constexpr (std::is_same_v<T, double>) return __builtin_fma(a, b, c);
  else return T(__builtin_fmaf(float(a), float(b), float(c)));
}
template <class A, class B, class C,
          std::enable_if_t<!(std::is_same_v<A, B> && std::is_same_v<B, C>) &&
                               metal_sim::is_num_v<A> && metal_sim::is_num_v<B> &&
                               metal_sim::is_num_v<C>, int> = 0>
inline auto fma(A a, B b, C c) {
  using R = decltype(a * b + c);
  return fma(R(a), R(b), R(c));
}
template <class T, int N>
inline vec<T, N> fma(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = fma(a[i], b[i], c[i]);
  return r;
}
template <class T, class L, class H>
inline T clamp(T x, L lo, H hi) { return min(max(x, T(lo)), T(hi)); }
template <class T, class U>
inline T mix(T x, T y, U a) { return x + (y - x) * a; }
template <class T>
inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N>
inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = c[i] ? b[i] : a[i];
  return r;
}
template <class T, std::enable_if_t<metal_sim::is_fp_v<T>, int> = 0>
inline bool isnan(T x) { return float(x) != float(x); }
template <class T, std::enable_if_t<metal_sim::is_fp_v<T>, int> = 0>
inline bool isinf(T x) { return __builtin_isinf(float(x)); }
template <class T, std::enable_if_t<metal_sim::is_fp_v<T>, int> = 0>
inline bool isfinite(T x) { return __builtin_isfinite(float(x)); }
template <class T, std::enable_if_t<metal_sim::is_fp_v<T>, int> = 0>
inline bool signbit(T x) { return __builtin_signbit(float(x)); }
template <class T, int N>
inline vec<bool, N> isnan(const vec<T, N>& v) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r[i] = isnan(v[i]);
  return r;
}
template <class T, int N>
inline T length(const vec<T, N>& v) { return sqrt(dot(v, v)); }

// precise:: and fast:: name the same functions: the simulator computes both in full precision.
#define MSIM_MATH_BINARIES \
  using metal::abs;        \
  using metal::atan2;      \
  using metal::divide;     \
  using metal::fma;        \
  using metal::fmax;       \
  using metal::fmin;       \
  using metal::fmod;       \
  using metal::max;        \
  using metal::min;        \
  using metal::pow;        \
  using metal::powr;
namespace precise {
#undef MSIM_UNARY
#define MSIM_UNARY(name, ff, fd) using metal::name;
MSIM_MATH_UNARIES
MSIM_MATH_BINARIES
}  // namespace precise
namespace fast {
MSIM_MATH_UNARIES
MSIM_MATH_BINARIES
}  // namespace fast
#undef MSIM_MATH_BINARIES
#undef MSIM_UNARY
#undef MSIM_MATH_UNARIES

template <class To, class From>
inline To as_type(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}

template <class T>
struct numeric_limits : std::numeric_limits<T> {};
template <>
struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr half max() { return half(65504.0f); }
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half min() { return half(6.103515625e-05f); }
  static constexpr half epsilon() { return half(0.0009765625f); }
  static constexpr half infinity() { return half(__builtin_inff()); }
  static constexpr half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <>
struct numeric_limits<bfloat16_t> {
  static constexpr bool is_specialized = true;
  static constexpr bfloat16_t max() { return bfloat16_t::from_bits(0x7f7f); }
  static constexpr bfloat16_t lowest() { return bfloat16_t::from_bits(0xff7f); }
  static constexpr bfloat16_t min() { return bfloat16_t::from_bits(0x0080); }
  static constexpr bfloat16_t epsilon() { return bfloat16_t::from_bits(0x3c00); }
  static constexpr bfloat16_t infinity() { return bfloat16_t::from_bits(0x7f80); }
  static constexpr bfloat16_t quiet_NaN() { return bfloat16_t::from_bits(0x7fc0); }
};

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

}  // namespace metal

#ifndef INFINITY
#define INFINITY (__builtin_inff())
#endif
#ifndef NAN
#define NAN (__builtin_nanf(""))
#endif
#define MAXFLOAT FLT_MAX
#define HALF_MAX 65504.0f
#define HALF_MIN 6.103515625e-05f
#define M_PI_F 3.14159265358979323846f
#define M_E_F 2.71828182845904523536f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LN2_F 0.693147180559945309417f
#define M_LN10_F 2.30258509299404568402f
#define M_SQRT2_F 1.41421356237309504880f

// ---------------------------------------------------------------------------
// Launch state, errors, checked device pointers.
namespace metal_sim {

struct SimAbort {};

struct BufInfo {
  const char* name;
  char* base;
  size_t nbytes;
  const char* tname;
  size_t elem;
};

struct Launch;
static Launch* g_launch = nullptr;
static thread_local Lane* t_cur = nullptr;

struct Launch {
  msim_launch* c;
  std::vector<BufInfo> bufs;
  std::atomic<int> failed{0};
  void (*thread_fn)(Lane*) = nullptr;
};

static BufInfo g_unchecked = {"<unregistered pointer>", nullptr, SIZE_MAX, "?", 1};

inline void where(char* out, size_t cap);

// Records the first error of the launch.  Returns true if this call won.
__attribute__((format(printf, 2, 3))) inline bool record_error(int kind, const char* fmt, ...) {
  Launch* A = g_launch;
  int expected = 0;
  if (!A->failed.compare_exchange_strong(expected, 1)) return false;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(A->c->err, size_t(A->c->errcap), fmt, ap);
  va_end(ap);
  // kind 3: raised by the scheduler itself, outside any lane.
  if (kind != 3 && n >= 0 && n < A->c->errcap) where(A->c->err + n, size_t(A->c->errcap - n));
  A->c->errkind = kind == 3 ? 2 : kind;
  return true;
}

[[noreturn]] __attribute__((noinline, cold)) inline void oob(const BufInfo* b, const void* q,
                                                             size_t tsize, bool is_const) {
  ptrdiff_t off = (const char*)q - b->base;
  const char* what = is_const ? "read" : "access";
  if (tsize == b->elem && off % ptrdiff_t(tsize) == 0) {
    record_error(1, "out-of-bounds %s of buffer '%s' at index %lld (buffer has %lld elements of %s)",
                 what, b->name, (long long)(off / ptrdiff_t(tsize)),
                 (long long)(b->nbytes / b->elem), b->tname);
  } else {
    record_error(1,
                 "out-of-bounds %s of buffer '%s' at byte offset %lld, %zu bytes wide "
                 "(element index %lld; buffer has %lld elements of %s)",
                 what, b->name, (long long)off, tsize,
                 (long long)(off >= 0 ? off / ptrdiff_t(b->elem) : -((-off + ptrdiff_t(b->elem) - 1) / ptrdiff_t(b->elem))),
                 (long long)(b->nbytes / b->elem), b->tname);
  }
  throw SimAbort{};
}

[[noreturn]] __attribute__((noinline, cold, format(printf, 1, 2))) inline void fail(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  record_error(2, "%s", buf);
  throw SimAbort{};
}

inline const BufInfo* find_buf(const void* p) {
  Launch* A = g_launch;
  if (A && p) {
    for (auto& b : A->bufs)
      if ((const char*)p >= b.base && (const char*)p <= b.base + b.nbytes) return &b;
  }
  return &g_unchecked;
}

// A device (or constant) pointer that knows its buffer and checks every
// dereference.  Arithmetic never checks: only the element touched matters.
template <class T>
struct dptr {
  T* p;
  const BufInfo* b;

  dptr() : p(nullptr), b(&g_unchecked) {}
  dptr(std::nullptr_t) : p(nullptr), b(&g_unchecked) {}
  dptr(T* q) : p(q), b(find_buf(q)) {}
  dptr(T* q, const BufInfo* bi) : p(q), b(bi) {}
  template <class U, std::enable_if_t<std::is_convertible_v<U*, T*>, int> = 0>
  dptr(const dptr<U>& o) : p(o.p), b(o.b) {}
  template <class U, std::enable_if_t<!std::is_convertible_v<U*, T*>, int> = 0>
  explicit dptr(const dptr<U>& o) : p((T*)(o.p)), b(o.b) {}

  T* chk(T* q) const {
    if (__builtin_expect((const char*)q < b->base ||
                             (const char*)q + sizeof(T) > b->base + b->nbytes, 0))
      oob(b, q, sizeof(T), std::is_const_v<T>);
    return q;
  }
  T& operator[](ptrdiff_t i) const { return *chk(p + i); }
  T& operator*() const { return *chk(p); }
  T* operator->() const { return chk(p); }
  dptr operator+(ptrdiff_t i) const { return dptr(p + i, b); }
  dptr operator-(ptrdiff_t i) const { return dptr(p - i, b); }
  template <class U>
  ptrdiff_t operator-(const dptr<U>& o) const { return p - o.p; }
  dptr& operator+=(ptrdiff_t i) { p += i; return *this; }
  dptr& operator-=(ptrdiff_t i) { p -= i; return *this; }
  dptr& operator++() { ++p; return *this; }
  dptr& operator--() { --p; return *this; }
  dptr operator++(int) { dptr r = *this; ++p; return r; }
  dptr operator--(int) { dptr r = *this; --p; return r; }
  explicit operator bool() const { return p != nullptr; }
  template <class U>
  bool operator==(const dptr<U>& o) const { return (const void*)p == (const void*)o.p; }
  template <class U>
  bool operator!=(const dptr<U>& o) const { return (const void*)p != (const void*)o.p; }
  template <class U>
  bool operator<(const dptr<U>& o) const { return (const void*)p < (const void*)o.p; }
  bool operator==(std::nullptr_t) const { return p == nullptr; }
  bool operator!=(std::nullptr_t) const { return p != nullptr; }
};
template <class T>
inline dptr<T> operator+(ptrdiff_t i, const dptr<T>& d) { return d + i; }

// ---------------------------------------------------------------------------
// Lanes, simdgroups, fibers.
//
// Lanes switch directly to the next runnable lane of their simdgroup when
// they block; the lane completing a collective releases it and carries on,
// so a collective costs each lane about one context switch.  A simdgroup
// hands control back to the per-OS-thread scheduler only when all of its lanes
// have finished or wait at a threadgroup barrier.
struct Ctx {
  void* sp;
#ifdef MSIM_UCONTEXT
  ucontext_t uc;
#endif
};

struct SG;
struct Lane {
  Ctx ctx;
  uint32_t lane;
  SG* sg;
  metal::vec<uint32_t, 3> tpig, tgpig, tpitg, tptg, tgpg, tpg, dtptg;
  uint32_t linear, sgidx, nsg;
};

struct alignas(64) SG {
  Lane* lanes[32];
  Ctx* sched;
  uint32_t n;
  uint32_t phase;
  uint32_t runmask;   // runnable or running
  uint32_t waitmask;  // blocked at the pending simd collective
  uint32_t tgmask;    // blocked at a threadgroup barrier
  uint32_t donemask;
  uint32_t nactive;   // lanes neither finished nor at a threadgroup barrier
  uint32_t nwait;
  int cur_op;
  uint32_t pmask[2];  // lanes that took part, per phase
  uint32_t res_valid[2];
  alignas(16) unsigned char res[2][64];  // a result every lane shares, per phase
  alignas(16) unsigned char buf[2][32][64];
};

static const char* const op_names[] = {
    "?", "simd_sum", "simd_product", "simd_max", "simd_min", "simd_and", "simd_or", "simd_xor",
    "simd_all", "simd_any", "simd_prefix_inclusive_sum", "simd_prefix_exclusive_sum",
    "simd_prefix_inclusive_product", "simd_prefix_exclusive_product", "simd_shuffle",
    "simd_shuffle_xor", "simd_shuffle_up", "simd_shuffle_down", "simd_broadcast",
    "simd_broadcast_first", "simdgroup_barrier", "simdgroup_multiply", "simd_ballot",
    "simd_shuffle_rotate_up", "simd_shuffle_rotate_down", "simd_is_first", "mma.sync", "ldmatrix"};
enum : int {
  OP_SUM = 1, OP_PRODUCT, OP_MAX, OP_MIN, OP_AND, OP_OR, OP_XOR, OP_ALL, OP_ANY, OP_PINC_SUM,
  OP_PEXC_SUM, OP_PINC_PROD, OP_PEXC_PROD, OP_SHUFFLE, OP_SHUFFLE_XOR, OP_SHUFFLE_UP,
  OP_SHUFFLE_DOWN, OP_BROADCAST, OP_BROADCAST_FIRST, OP_SG_BARRIER, OP_MATMUL, OP_BALLOT,
  OP_ROT_UP, OP_ROT_DOWN, OP_IS_FIRST, OP_MMA, OP_LDMATRIX  // the last two: CUDA warp operations (cuda_vocab.h)
};

// Fiber stacks are aligned blocks of g_stack_block bytes whose first word
// points at the lane, so the running lane is found from the stack pointer
// without thread-local storage (slow in dlopen'ed code).
static size_t g_stack_block = 0;
static int g_fibers = 0;

inline Lane* cur_lane() {
  if (g_fibers) {
    uintptr_t sp = (uintptr_t)__builtin_frame_address(0);
    return *(Lane**)(sp & ~(uintptr_t)(g_stack_block - 1));
  }
  return t_cur;
}

inline void where(char* out, size_t cap) {
  Lane* L = cur_lane();
  if (!L || cap < 2) return;
  snprintf(out, cap, " [thread_position_in_grid=(%u,%u,%u), threadgroup_position_in_grid=(%u,%u,%u)]",
           L->tpig.x, L->tpig.y, L->tpig.z, L->tgpig.x, L->tgpig.y, L->tgpig.z);
}

extern "C" __attribute__((visibility("hidden"))) void msim_swap(void** save, void* next);
extern "C" __attribute__((visibility("hidden"))) void msim_trampoline();

#if defined(__x86_64__) && !defined(MSIM_UCONTEXT)
asm(R"(
  .text
  .p2align 4
  .globl msim_swap
  .hidden msim_swap
  .type msim_swap,@function
msim_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size msim_swap,.-msim_swap
  .p2align 4
  .globl msim_trampoline
  .hidden msim_trampoline
  .type msim_trampoline,@function
msim_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size msim_trampoline,.-msim_trampoline
)");
#elif defined(__aarch64__) && !defined(MSIM_UCONTEXT)
asm(R"(
  .text
  .p2align 4
  .globl msim_swap
  .hidden msim_swap
  .type msim_swap,%function
msim_swap:
  sub sp, sp, #160
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x9, sp
  str x9, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #160
  ret
  .size msim_swap,.-msim_swap
  .p2align 4
  .globl msim_trampoline
  .hidden msim_trampoline
  .type msim_trampoline,%function
msim_trampoline:
  mov x0, x19
  blr x20
  brk #0
  .size msim_trampoline,.-msim_trampoline
)");
#endif

inline void ctx_switch(Ctx* from, Ctx* to) {
#ifdef MSIM_UCONTEXT
  swapcontext(&from->uc, &to->uc);
#else
  msim_swap(&from->sp, to->sp);
#endif
}

inline uint32_t popc(uint32_t m) { return uint32_t(__builtin_popcount(m)); }

// Next runnable lane after `me`, round robin.
inline Lane* next_lane(SG* g, uint32_t me) {
  uint32_t above = g->runmask & ~((2u << me) - 1u);
  uint32_t m = above ? above : g->runmask;
  return g->lanes[__builtin_ctz(m)];
}

inline void release(SG* g) {
  g->pmask[g->phase & 1u] = g->waitmask;
  g->res_valid[g->phase & 1u] = 0;
  g->runmask |= g->waitmask;
  g->waitmask = 0;
  g->nwait = 0;
  g->phase++;
}

// Called by a lane that stops being active (finished or at a threadgroup barrier).
inline void leave(Lane* L) {
  SG* g = L->sg;
  g->nactive--;
  if (g->nactive == 0) {
    ctx_switch(&L->ctx, g->sched);
    return;
  }
  if (g->nwait == g->nactive) release(g);
  ctx_switch(&L->ctx, &next_lane(g, L->lane)->ctx);
}

[[noreturn]] inline void abandon(Lane* L) {
  // After an error nothing of this threadgroup runs again.
  for (;;) ctx_switch(&L->ctx, L->sg->sched);
}

inline void lane_entry(Lane* L) {
  try {
    g_launch->thread_fn(L);
  } catch (SimAbort&) {
  } catch (...) {
    record_error(2, "unexpected C++ exception in kernel");
  }
  if (g_launch->failed.load(std::memory_order_relaxed)) abandon(L);
  SG* g = L->sg;
  uint32_t bit = 1u << L->lane;
  g->runmask &= ~bit;
  g->donemask |= bit;
  leave(L);
  abandon(L);  // never resumed
}

#ifdef MSIM_UCONTEXT
inline void lane_entry_uc(int lo, int hi) {
  lane_entry((Lane*)(((uintptr_t)(uint32_t)hi << 32) | (uintptr_t)(uint32_t)lo));
}
#endif

inline void init_fiber(Lane* L, char* stack, size_t size) {
#ifdef MSIM_UCONTEXT
  getcontext(&L->ctx.uc);
  L->ctx.uc.uc_stack.ss_sp = stack;
  L->ctx.uc.uc_stack.ss_size = size;
  L->ctx.uc.uc_link = nullptr;
  uintptr_t u = (uintptr_t)L;
  makecontext(&L->ctx.uc, (void (*)())lane_entry_uc, 2, int(uint32_t(u)), int(uint32_t(u >> 32)));
#elif defined(__x86_64__)
  uintptr_t top = ((uintptr_t)(stack + size) & ~uintptr_t(15)) - 16;
  void** sp = (void**)top;
  sp[-1] = (void*)msim_trampoline;
  sp[-2] = nullptr;             // rbp
  sp[-3] = nullptr;             // rbx
  sp[-4] = (void*)L;            // r12
  sp[-5] = (void*)&lane_entry;  // r13
  sp[-6] = nullptr;             // r14
  sp[-7] = nullptr;             // r15
  L->ctx.sp = (void*)&sp[-7];
#else
  uintptr_t top = ((uintptr_t)(stack + size) & ~uintptr_t(15)) - 16;
  void** f = (void**)(top - 160);
  std::memset(f, 0, 160);
  f[0] = (void*)L;                 // x19
  f[1] = (void*)&lane_entry;       // x20
  f[11] = (void*)msim_trampoline;  // x30
  L->ctx.sp = (void*)f;
#endif
}

inline Lane* cur_fiber(int op) {
  if (__builtin_expect(!g_fibers, 0))
    fail("%s reached in sequential mode (internal error: collective not detected)", op_names[op]);
  return cur_lane();
}

// Each lane writes its value into its slot of the simdgroup's exchange buffer
// for the current phase, then blocks; the collective is released once every
// active lane has arrived, and pmask records which lanes took part.  Two
// phases alternate so a fast lane writing the next collective's value cannot
// clobber a slot others still have to read.
template <class T>
struct Xch {
  const unsigned char* base;
  uint32_t mask;
  uint32_t me;
  SG* g;
  uint32_t ph;
  // A lane-independent result (a reduction) is computed by the first lane
  // that asks and copied by the others.
  template <class F>
  T shared(F compute) const {
    T r;
    if (!g->res_valid[ph]) {
      r = compute();
      std::memcpy(g->res[ph], (const void*)&r, sizeof(T));
      g->res_valid[ph] = 1;
    } else {
      std::memcpy((void*)&r, g->res[ph], sizeof(T));
    }
    return r;
  }
  // Pairwise (butterfly-order) combination over the lanes that took part.
  template <class Op>
  T tree(T identity, Op op) const {
    T v[32];
    for (uint32_t l = 0; l < 32; ++l) v[l] = has(l) ? at(l) : identity;
    for (uint32_t off = 16; off > 0; off >>= 1)
      for (uint32_t l = 0; l < off; ++l) v[l] = op(v[l], v[l + off]);
    return v[0];
  }
  T at(uint32_t l) const {
    T v;
    std::memcpy((void*)&v, base + size_t(l) * 64, sizeof(T));
    return v;
  }
  bool has(uint32_t l) const { return l < 32 && ((mask >> l) & 1u); }
};

[[noreturn]] __attribute__((noinline, cold)) inline void divergence(Lane* L, int op) {
  record_error(2,
               "divergent simd collectives in simdgroup %u: lane %u is at %s while other lanes "
               "are at %s",
               L->sgidx, L->lane, op_names[op], op_names[L->sg->cur_op]);
  abandon(L);
}

template <class T>
inline Xch<T> exchange(const T& v, int op) {
  static_assert(sizeof(T) <= 64, "simd collective on a type wider than 64 bytes");
  Lane* L = cur_fiber(op);
  SG* g = L->sg;
  uint32_t ph = g->phase & 1u, bit = 1u << L->lane;
  std::memcpy(g->buf[ph][L->lane], (const void*)&v, sizeof(T));
  if (g->nwait == 0)
    g->cur_op = op;
  else if (__builtin_expect(g->cur_op != op, 0))
    divergence(L, op);
  g->runmask &= ~bit;
  g->waitmask |= bit;
  g->nwait++;
  if (g->nwait == g->nactive)
    release(g);
  else
    ctx_switch(&L->ctx, &next_lane(g, L->lane)->ctx);
  return Xch<T>{&g->buf[ph][0][0], g->pmask[ph], L->lane, g, ph};
}

inline void tg_barrier() {
  if (!g_fibers) return;  // sequential mode: one lane at a time anyway
  Lane* L = cur_lane();
  SG* g = L->sg;
  uint32_t bit = 1u << L->lane;
  g->runmask &= ~bit;
  g->tgmask |= bit;
  leave(L);
}

template <class T>
inline T poison() {
  T v;
  std::memset((void*)&v, 0xff, sizeof(T));
  return v;
}

// Per-threadgroup storage for `threadgroup T name[...]` declared in a body.
// All lanes of a threadgroup run on one OS thread, one threadgroup at a
// time, so a thread_local per declaration site is exactly one array per
// threadgroup.  It is refilled with 0xff (NaN / -1) whenever a new
// threadgroup first reaches it, so reading unwritten shared memory shows.
static thread_local uint64_t t_tg_gen = 0;
// Apple GPUs give a threadgroup at most 32 KiB of threadgroup memory; a body that declares more
// cannot run there, so the simulator refuses it as well.
constexpr size_t kThreadgroupMemoryLimit = 32768;
static thread_local size_t t_tg_bytes = 0;
template <class T, int Site>
inline T& tg_var() {
  alignas(64) static thread_local unsigned char storage[sizeof(T)];
  static thread_local uint64_t gen = 0;
  if (gen != t_tg_gen) {
    gen = t_tg_gen;
    std::memset(storage, 0xff, sizeof(T));
    t_tg_bytes += sizeof(T);
    if (t_tg_bytes > kThreadgroupMemoryLimit)
      fail("threadgroup memory of %zu bytes exceeds the %zu bytes an Apple GPU threadgroup has", t_tg_bytes,
           kThreadgroupMemoryLimit);
  }
  return *reinterpret_cast<T*>(storage);
}

// ---------------------------------------------------------------------------
// ---------------------------------------------------------------------------
// Scheduler.
struct Stacks {
  char* map = nullptr;
  char* base = nullptr;
  size_t block = 0, count = 0, total = 0;
  static constexpr size_t page = 4096;
  // Block layout: [header page: Lane*][guard page][stack ...]
  bool ensure(size_t n, size_t sz) {
    size_t b = 4 * page;
    while (b < sz + 2 * page) b <<= 1;
    release();
    block = b;
    total = block * (n + 1);
    void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return false;
    map = (char*)m;
    base = (char*)(((uintptr_t)map + block - 1) & ~(uintptr_t)(block - 1));
    count = n;
    for (size_t i = 0; i < n; ++i) mprotect(base + i * block + page, page, PROT_NONE);
    return true;
  }
  void set_owner(size_t i, Lane* L) { *(Lane**)(base + i * block) = L; }
  char* stack(size_t i) { return base + i * block + 2 * page; }
  size_t usable() const { return block - 2 * page; }
  void release() {
    if (map) munmap(map, total);
    map = base = nullptr;
    count = 0;
  }
  ~Stacks() { release(); }
};

// Runs one threadgroup to completion.  Returns false on error.
inline bool run_threadgroup(Launch* A, const uint32_t tgpos[3], std::vector<Lane>& lanes,
                            std::vector<SG>& sgs, Stacks& stacks, Ctx* sched) {
  msim_launch* c = A->c;
  uint32_t d[3], sz[3];
  for (int k = 0; k < 3; ++k) {
    d[k] = c->tg[k] < c->grid[k] ? c->tg[k] : c->grid[k];
    uint32_t start = tgpos[k] * d[k];
    sz[k] = (c->grid[k] - start) < d[k] ? (c->grid[k] - start) : d[k];
  }
  uint32_t n = sz[0] * sz[1] * sz[2];
  uint32_t nsg = (n + 31) / 32;
  t_tg_gen++;
  t_tg_bytes = 0;
  for (uint32_t i = 0; i < n; ++i) {
    Lane& L = lanes[i];
    uint32_t px = i % sz[0], py = (i / sz[0]) % sz[1], pz = i / (sz[0] * sz[1]);
    L.lane = i % 32;
    L.linear = i;
    L.sgidx = i / 32;
    L.nsg = nsg;
    L.tpitg = {px, py, pz};
    L.tgpig = {tgpos[0], tgpos[1], tgpos[2]};
    L.tpig = {tgpos[0] * d[0] + px, tgpos[1] * d[1] + py, tgpos[2] * d[2] + pz};
    L.tptg = {sz[0], sz[1], sz[2]};
    L.dtptg = {d[0], d[1], d[2]};
    L.tgpg = {(c->grid[0] + d[0] - 1) / d[0], (c->grid[1] + d[1] - 1) / d[1],
              (c->grid[2] + d[2] - 1) / d[2]};
    L.tpg = {c->grid[0], c->grid[1], c->grid[2]};
    L.sg = c->fibers ? &sgs[i / 32] : nullptr;
  }
  if (!c->fibers) {
    bool ok = true;
    for (uint32_t i = 0; i < n && ok; ++i) {
      t_cur = &lanes[i];
      try {
        A->thread_fn(&lanes[i]);
      } catch (SimAbort&) {
        ok = false;
      } catch (...) {
        record_error(2, "unexpected C++ exception in kernel");
        ok = false;
      }
    }
    t_cur = nullptr;
    return ok;
  }
  for (uint32_t s = 0; s < nsg; ++s) {
    SG& g = sgs[s];
    g.n = (n - s * 32) < 32 ? (n - s * 32) : 32;
    g.sched = sched;
    g.phase = 0;
    g.runmask = g.n == 32 ? 0xffffffffu : ((1u << g.n) - 1u);
    g.waitmask = g.tgmask = g.donemask = 0;
    g.nwait = 0;
    g.cur_op = 0;
    g.pmask[0] = g.pmask[1] = 0;
    g.res_valid[0] = g.res_valid[1] = 0;
    for (uint32_t l = 0; l < g.n; ++l) g.lanes[l] = &lanes[s * 32 + l];
  }
  for (uint32_t i = 0; i < n; ++i) {
    stacks.set_owner(i, &lanes[i]);
    init_fiber(&lanes[i], stacks.stack(i), stacks.usable());
  }
  for (;;) {
    for (uint32_t s = 0; s < nsg; ++s) {
      SG& g = sgs[s];
      if (!g.runmask) continue;
      g.nactive = popc(g.runmask);
      ctx_switch(sched, &g.lanes[__builtin_ctz(g.runmask)]->ctx);
      if (A->failed.load(std::memory_order_relaxed)) return false;
    }
    bool any = false;
    for (uint32_t s = 0; s < nsg; ++s) {
      SG& g = sgs[s];
      if (g.tgmask) {
        g.runmask = g.tgmask;
        g.tgmask = 0;
        any = true;
      }
    }
    if (!any) break;
  }
  return true;
}

inline int run(msim_launch* c, void (*thread_fn)(Lane*)) {
  Launch A;
  A.c = c;
  A.thread_fn = thread_fn;
  for (int i = 0; i < c->nbufs; ++i) {
    msim_buf& b = c->bufs[i];
    A.bufs.push_back(BufInfo{b.name, (char*)b.data, size_t(b.nbytes), b.tname, size_t(b.elem_size)});
  }
  g_launch = &A;
  g_fibers = c->fibers;
  uint32_t d[3], ng[3];
  for (int k = 0; k < 3; ++k) {
    d[k] = c->tg[k] < c->grid[k] ? c->tg[k] : c->grid[k];
    if (d[k] == 0) d[k] = 1;
    ng[k] = (c->grid[k] + d[k] - 1) / d[k];
  }
  uint64_t total = uint64_t(ng[0]) * ng[1] * ng[2];
  uint32_t tgn = d[0] * d[1] * d[2];
  size_t block = 0;
  {
    size_t b = 4 * Stacks::page;
    while (b < size_t(c->stack_size) + 2 * Stacks::page) b <<= 1;
    block = b;
  }
  g_stack_block = block;
  std::atomic<uint64_t> next{0};
  auto worker = [&]() {
    std::vector<Lane> lanes(tgn);
    std::vector<SG> sgs((tgn + 31) / 32);
    Stacks stacks;
    Ctx sched;
    if (c->fibers && !stacks.ensure(tgn, size_t(c->stack_size))) {
      record_error(3, "could not allocate fiber stacks");
      return;
    }
    for (;;) {
      uint64_t t = next.fetch_add(1);
      if (t >= total || A.failed.load(std::memory_order_relaxed)) break;
      uint32_t pos[3] = {uint32_t(t % ng[0]), uint32_t((t / ng[0]) % ng[1]),
                         uint32_t(t / (uint64_t(ng[0]) * ng[1]))};
      if (!run_threadgroup(&A, pos, lanes, sgs, stacks, &sched)) break;
    }
  };
  int nt = c->nthreads > 1 ? c->nthreads : 1;
  if (uint64_t(nt) > total) nt = int(total ? total : 1);
  if (nt == 1) {
    worker();
  } else {
    std::vector<std::thread> ts;
    for (int i = 0; i < nt; ++i) ts.emplace_back(worker);
    for (auto& t : ts) t.join();
  }
  g_launch = nullptr;
  return A.failed.load() ? 1 : 0;
}
}  // namespace metal_sim

// ---------------------------------------------------------------------------
// Collectives and barriers (Metal names).
namespace metal {
using metal_sim::Xch;
using metal_sim::exchange;

template <class T>
inline T simd_sum(T v) {
  auto x = exchange(v, metal_sim::OP_SUM);
  return x.shared([&] { return x.tree(T(0), [](T a, T b) { return T(a + b); }); });
}
template <class T>
inline T simd_product(T v) {
  auto x = exchange(v, metal_sim::OP_PRODUCT);
  return x.shared([&] { return x.tree(T(1), [](T a, T b) { return T(a * b); }); });
}
template <class T>
inline T simd_max(T v) {
  auto x = exchange(v, metal_sim::OP_MAX);
  return x.shared([&] { return x.tree(v, [](T a, T b) { return T(max(a, b)); }); });
}
template <class T>
inline T simd_min(T v) {
  auto x = exchange(v, metal_sim::OP_MIN);
  return x.shared([&] { return x.tree(v, [](T a, T b) { return T(min(a, b)); }); });
}
#define MSIM_BITRED(name, OP, op)                                                  \
  template <class T>                                                               \
  inline T name(T v) {                                                             \
    auto x = exchange(v, metal_sim::OP);                                           \
    return x.shared([&] { return x.tree(v, [](T a, T b) { return T(a op b); }); }); \
  }
MSIM_BITRED(simd_and, OP_AND, &)
MSIM_BITRED(simd_or, OP_OR, |)
MSIM_BITRED(simd_xor, OP_XOR, ^)
#undef MSIM_BITRED
inline bool simd_all(bool v) {
  auto x = exchange(v, metal_sim::OP_ALL);
  for (uint32_t l = 0; l < 32; ++l)
    if (x.has(l) && !x.at(l)) return false;
  return true;
}
inline bool simd_any(bool v) {
  auto x = exchange(v, metal_sim::OP_ANY);
  for (uint32_t l = 0; l < 32; ++l)
    if (x.has(l) && x.at(l)) return true;
  return false;
}
template <class T>
inline T simd_prefix_inclusive_sum(T v) {
  auto x = exchange(v, metal_sim::OP_PINC_SUM);
  T acc = T(0);
  for (uint32_t l = 0; l <= x.me; ++l)
    if (x.has(l)) acc += x.at(l);
  return acc;
}
template <class T>
inline T simd_prefix_exclusive_sum(T v) {
  auto x = exchange(v, metal_sim::OP_PEXC_SUM);
  T acc = T(0);
  for (uint32_t l = 0; l < x.me; ++l)
    if (x.has(l)) acc += x.at(l);
  return acc;
}
template <class T>
inline T simd_prefix_inclusive_product(T v) {
  auto x = exchange(v, metal_sim::OP_PINC_PROD);
  T acc = T(1);
  for (uint32_t l = 0; l <= x.me; ++l)
    if (x.has(l)) acc *= x.at(l);
  return acc;
}
template <class T>
inline T simd_prefix_exclusive_product(T v) {
  auto x = exchange(v, metal_sim::OP_PEXC_PROD);
  T acc = T(1);
  for (uint32_t l = 0; l < x.me; ++l)
    if (x.has(l)) acc *= x.at(l);
  return acc;
}
// Reading an inactive (returned or non-existent) lane is undefined on the
// GPU; the simulator returns an all-ones pattern (NaN for floats).
template <class T>
inline T msim_pick(const Xch<T>& x, uint32_t src) {
  return x.has(src) ? x.at(src) : metal_sim::poison<T>();
}
template <class T>
inline T simd_shuffle(T v, ushort src) {
  auto x = exchange(v, metal_sim::OP_SHUFFLE);
  return msim_pick(x, src);
}
template <class T>
inline T simd_broadcast(T v, ushort src) {
  auto x = exchange(v, metal_sim::OP_BROADCAST);
  return msim_pick(x, src);
}
template <class T>
inline T simd_broadcast_first(T v) {
  auto x = exchange(v, metal_sim::OP_BROADCAST_FIRST);
  return x.at(uint32_t(__builtin_ctz(x.mask)));
}
template <class T>
inline T simd_shuffle_xor(T v, ushort mask) {
  auto x = exchange(v, metal_sim::OP_SHUFFLE_XOR);
  return msim_pick(x, (x.me ^ mask) & 31u);
}
template <class T>
inline T simd_shuffle_up(T v, ushort delta) {
  auto x = exchange(v, metal_sim::OP_SHUFFLE_UP);
  if (delta > x.me) return v;
  return msim_pick(x, x.me - delta);
}
template <class T>
inline T simd_shuffle_down(T v, ushort delta) {
  auto x = exchange(v, metal_sim::OP_SHUFFLE_DOWN);
  if (x.me + delta >= 32) return v;
  return msim_pick(x, x.me + delta);
}
template <class T>
inline T simd_shuffle_rotate_up(T v, ushort delta) {
  auto x = exchange(v, metal_sim::OP_ROT_UP);
  return msim_pick(x, (x.me + 32 - (delta & 31u)) & 31u);
}
template <class T>
inline T simd_shuffle_rotate_down(T v, ushort delta) {
  auto x = exchange(v, metal_sim::OP_ROT_DOWN);
  return msim_pick(x, (x.me + delta) & 31u);
}
// A collective here: "first active lane" only means something at a point
// where the simdgroup's lanes are together.
inline bool simd_is_first() {
  auto x = exchange(char(0), metal_sim::OP_IS_FIRST);
  return uint32_t(__builtin_ctz(x.mask)) == x.me;
}
inline void simdgroup_barrier(mem_flags = mem_flags::mem_none) {
  exchange(char(0), metal_sim::OP_SG_BARRIER);
}
inline void threadgroup_barrier(mem_flags = mem_flags::mem_none) { metal_sim::tg_barrier(); }

// ---------------------------------------------------------------------------
// simdgroup matrices: each lane holds two elements of the 8x8 tile, laid out
// as in Apple's hardware (see MLX steel MMAFrag::get_coord).
inline void msim_frag_coord(uint32_t lane, int& row, int& col) {
  int qid = int(lane / 4);
  row = (qid & 4) + int((lane / 2) % 4);
  col = (qid & 2) * 2 + int(lane % 2) * 2;
}

template <class T, int R, int C>
struct simdgroup_matrix {
  static_assert(R == 8 && C == 8, "only 8x8 simdgroup matrices are simulated");
  vec<T, 2> e;
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diag) {
    int r, c;
    msim_frag_coord(metal_sim::cur_lane()->lane, r, c);
    e.x = (r == c) ? diag : T(0);
    e.y = (r == c + 1) ? diag : T(0);
  }
  vec<T, 2>& thread_elements() { return e; }
  const vec<T, 2>& thread_elements() const { return e; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat16_t, 8, 8> simdgroup_bfloat8x8;

template <class T, int R = 8, int C = 8>
inline simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, R, C> m;
  m.e = vec<T, 2>(v, v);
  return m;
}

template <class T, class P>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, P src, ulong elements_per_row = 8,
                           vec<ulong, 2> origin = vec<ulong, 2>(0), bool transpose = false) {
  int r, c;
  msim_frag_coord(metal_sim::cur_lane()->lane, r, c);
  for (int j = 0; j < 2; ++j) {
    ulong rr = ulong(transpose ? c + j : r), cc = ulong(transpose ? r : c + j);
    d.e[j] = T(src[ptrdiff_t((origin.y + rr) * elements_per_row + origin.x + cc)]);
  }
}
template <class T, class P>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& s, P dst, ulong elements_per_row = 8,
                            vec<ulong, 2> origin = vec<ulong, 2>(0), bool transpose = false) {
  int r, c;
  msim_frag_coord(metal_sim::cur_lane()->lane, r, c);
  for (int j = 0; j < 2; ++j) {
    ulong rr = ulong(transpose ? c + j : r), cc = ulong(transpose ? r : c + j);
    using E = std::remove_reference_t<decltype(dst[0])>;
    dst[ptrdiff_t((origin.y + rr) * elements_per_row + origin.x + cc)] = E(s.e[j]);
  }
}

// The product needs every lane's fragments: exchange them, rebuild the full
// tiles, and let each lane compute its own two output elements.
template <class TA, class TB, class TC>
struct msim_mma_payload {
  vec<TA, 2> a;
  vec<TB, 2> b;
  vec<TC, 2> c;
};
template <class TD, class TA, class TB, class TC>
inline void msim_mma(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                     const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>* c) {
  msim_mma_payload<TA, TB, TC> mine{a.e, b.e, c ? c->e : vec<TC, 2>(TC(0))};
  auto x = exchange(mine, metal_sim::OP_MATMUL);
  float A[8][8], B[8][8], Cm[8][8];
  const float nan = __builtin_nanf("");
  for (uint32_t l = 0; l < 32; ++l) {
    int r, cc;
    msim_frag_coord(l, r, cc);
    bool ok = x.has(l);
    auto p = x.at(l);
    for (int j = 0; j < 2; ++j) {
      A[r][cc + j] = ok ? float(p.a[j]) : nan;
      B[r][cc + j] = ok ? float(p.b[j]) : nan;
      Cm[r][cc + j] = ok ? float(p.c[j]) : nan;
    }
  }
  int r, cc;
  msim_frag_coord(x.me, r, cc);
  for (int j = 0; j < 2; ++j) {
    float s = Cm[r][cc + j];
    for (int k = 0; k < 8; ++k) s = __builtin_fmaf(A[r][k], B[k][cc + j], s);
    d.e[j] = TD(s);
  }
}
template <class TD, class TA, class TB>
inline void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                               const simdgroup_matrix<TB, 8, 8>& b) {
  msim_mma(d, a, b, (const simdgroup_matrix<TD, 8, 8>*)nullptr);
}
template <class TD, class TA, class TB, class TC>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d,
                                          const simdgroup_matrix<TA, 8, 8>& a,
                                          const simdgroup_matrix<TB, 8, 8>& b,
                                          const simdgroup_matrix<TC, 8, 8>& c) {
  msim_mma(d, a, b, &c);
}
}  // namespace metal

using namespace metal;

// Metal address-space qualifiers.  Device/constant pointers have already been
// rewritten to metal_sim::dptr by the source rewriter; what is left here
// (references, thread/threadgroup pointers) needs no qualifier on the CPU.
#define device
#define constant
#define thread
#define threadgroup
#define METAL_FUNC inline __attribute__((always_inline))
