// The kernels as PyTorch operators: torch.ops.<module name>.mix_forward, .mix_backward,
// .gelu_pair, .threads_used (registered with TORCH_LIBRARY, no pybind11: the one source that
// includes <torch/library.h>). Outputs are allocated here, the work is done in mixing.cpp and
// gelu.cpp (kernels.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "kernels.h"

namespace {

at::Tensor mix_forward(const at::Tensor& x4, const at::Tensor& r2, const at::Tensor& weight, const at::Tensor& bias,
                       int64_t s, const std::optional<at::Tensor>& out) {
  dynamixer::check_mix_inputs(x4, r2, weight, bias, s);
  at::Tensor o = out.has_value() ? *out : at::empty(x4.sizes(), x4.options());
  dynamixer::mix_forward_cpu(x4, r2, weight, bias, s, o);
  return o;
}

// (dx or None, dr2, dweight, dbias or None each): dx when need_x, the rest when need_params
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mix_backward(
    const at::Tensor& x4, const at::Tensor& r2, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& grad, int64_t s, bool need_x, bool need_params) {
  dynamixer::check_mix_inputs(x4, r2, weight, bias, s);
  at::Tensor dx, dr2, dweight, dbias;
  if (need_x) dx = at::empty(x4.sizes(), x4.options());
  if (need_params) {
    dr2 = at::empty_like(r2, at::MemoryFormat::Contiguous);
    dweight = at::empty_like(weight, at::MemoryFormat::Contiguous);
    dbias = at::empty_like(bias, at::MemoryFormat::Contiguous);
  }
  dynamixer::mix_backward_cpu(x4, r2, weight, bias, grad, s, dx, dr2, dweight, dbias);
  return {dx, dr2, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor> gelu_pair(const at::Tensor& h, const at::Tensor& dy) {
  TORCH_CHECK(h.sizes() == dy.sizes() && h.scalar_type() == dy.scalar_type(), "h and dy: one shape and dtype");
  const at::Tensor hc = h.contiguous(), dyc = dy.contiguous();
  at::Tensor g = at::empty_like(hc, at::MemoryFormat::Contiguous), dh = at::empty_like(hc, at::MemoryFormat::Contiguous);
  dynamixer::gelu_pair_cpu(hc, dyc, g, dh);
  return {g, dh};
}

int64_t threads_used(int64_t tasks) { return dynamixer::threads_used(tasks); }

}  // namespace

// the namespace is the module's name (ISA and source digest in it), so that two builds loaded into
// one process never register the same operators; the extra macro level expands the name
#define DYNAMIXER_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
DYNAMIXER_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("mix_forward", &mix_forward);
  m.def("mix_backward", &mix_backward);
  m.def("gelu_pair", &gelu_pair);
  m.def("threads_used", &threads_used);
}
