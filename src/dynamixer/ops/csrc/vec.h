// 32-byte vectors (8 floats, 4 doubles) through GCC/Clang vector extensions, and a vectorised exp.
// With -mavx2 -mfma they compile to AVX2 instructions; in the portable build the compiler lowers
// them to SSE2 pairs or scalars.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dynamixer_vec {

template <typename T> struct VecOf { typedef T type __attribute__((vector_size(32))); };
template <typename T> using vec = typename VecOf<T>::type;
template <typename T> constexpr int kW = 32 / sizeof(T);

template <typename T> inline vec<T> vload(const T* p) { vec<T> v; std::memcpy(&v, p, sizeof(v)); return v; }
template <typename T> inline void vstore(T* p, vec<T> v) { std::memcpy(p, &v, sizeof(v)); }
// x - 0 is x exactly (also -0), and GCC compiles it to one vbroadcastss; x + 0 or a lane loop do not.
template <typename T> inline vec<T> vsplat(T x) { return x - vec<T>{}; }
template <typename T> inline vec<T> vmax(vec<T> a, vec<T> b) { return a > b ? a : b; }

// exp for the softmax (arguments <= 0), 8 lanes at once. float: Cephes' polynomial on
// [-ln2/2, ln2/2] after range reduction, branch-free (about 1 ulp). double: std::exp per lane
// (float64 is for gradcheck; its speed does not matter).
inline vec<float> vexp(vec<float> x) {
  typedef int32_t ivec __attribute__((vector_size(32)));
  x = vmax<float>(x, vsplat(-87.0f));
  const vec<float> t = x * 1.44269504088896341f;
  const vec<float> fn = (t + 12582912.0f) - 12582912.0f;      // round to nearest (|t| < 2^22)
  vec<float> r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  vec<float> p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const ivec bits = (__builtin_convertvector(fn, ivec) + 127) << 23;
  vec<float> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline vec<double> vexp(vec<double> x) {
  for (int i = 0; i < kW<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

}  // namespace dynamixer_vec
