// GELU and its backward in one pass (RecomputeGeluMlp's backward needs both, from fc1's output h):
//   gelu(h) = h * Phi(h),  dh = dy * (Phi(h) + h * phi(h)),  Phi(h) = (1 + erf(h / sqrt 2)) / 2,
// with one exp(-h^2 / 2) serving both erf and phi. float: erf by Abramowitz & Stegun 7.1.26
// (absolute error <= 1.5e-7), vectorised; double: std::erf / std::exp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "kernels.h"
#include "vec.h"

using namespace dynamixer_vec;

namespace {

inline void gelu_pair_vec(const float* h, const float* dy, float* g, float* dh) {
  const vec<float> x = vload(h);
  const vec<float> z = x * 0.70710678118654752f;
  const vec<float> az = z < 0.0f ? -z : z;
  const vec<float> e = vexp(-(z * z));                         // exp(-h^2 / 2)
  const vec<float> t = 1.0f / (1.0f + 0.3275911f * az);
  vec<float> poly = vsplat(1.061405429f);
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const vec<float> erf_abs = 1.0f - poly * t * e;
  const vec<float> erf = z < 0.0f ? -erf_abs : erf_abs;
  const vec<float> cdf = 0.5f + 0.5f * erf;
  vstore(g, x * cdf);
  vstore(dh, vload(dy) * (cdf + x * e * 0.39894228040143268f));
}

// Whole vectors of a float range; returns how many elements it did (double: none, see below).
inline int64_t gelu_pair_vectors(const float* h, const float* dy, float* g, float* dh, int64_t n) {
  int64_t i = 0;
  for (; i + kW<float> <= n; i += kW<float>) gelu_pair_vec(h + i, dy + i, g + i, dh + i);
  return i;
}
inline int64_t gelu_pair_vectors(const double*, const double*, double*, double*, int64_t) { return 0; }

template <typename T>
inline void gelu_pair_scalar(const T* h, const T* dy, T* g, T* dh, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T x = h[i];
    const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752)));
    g[i] = x * cdf;
    dh[i] = dy[i] * (cdf + x * std::exp(T(-0.5) * x * x) * T(0.39894228040143268));
  }
}

}  // namespace

namespace dynamixer {

void gelu_pair_cpu(const at::TensorBase& h, const at::TensorBase& dy, const at::TensorBase& g,
                   const at::TensorBase& dh) {
  for (const at::TensorBase* t : {&dy, &g, &dh})
    TORCH_CHECK(t->sizes() == h.sizes() && t->scalar_type() == h.scalar_type() && t->is_contiguous() &&
                t->device().is_cpu(), "h, dy, g and dh must be contiguous CPU tensors of one shape and dtype");
  TORCH_CHECK(h.is_contiguous() && h.device().is_cpu(), "h must be a contiguous CPU tensor");
  const int64_t n = h.numel();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "dynamixer_gelu_pair", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* dp = dy.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = dh.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
      const int64_t i = begin + gelu_pair_vectors(hp + begin, dp + begin, gp + begin, op + begin, end - begin);
      gelu_pair_scalar<scalar_t>(hp + i, dp + i, gp + i, op + i, end - i);
    });
  });
}

}  // namespace dynamixer
