// The kernels' C++ entry points, shared by the kernel sources and the op registration (ops.cpp).
//
// They take at::TensorBase (sizes, strides, data pointers) and write into outputs the caller has
// allocated, so that the kernel sources include only ATen's light headers (TensorBase, Parallel,
// Dispatch): <torch/extension.h> alone took 38 s to compile per source file on the project's
// machine, these take about 3 s; only ops.cpp pays for <torch/library.h>.
#pragma once

#include <ATen/core/TensorBase.h>

#include <cstdint>

namespace dynamixer {

// Throws (TORCH_CHECK) unless x4 (B, N, L, C) with contiguous channels, r2 (B*L*S, N*d)
// contiguous, weight (N*N, N*d) and bias (N*N) contiguous, one floating dtype, CPU, C % S == 0.
void check_mix_inputs(const at::TensorBase& x4, const at::TensorBase& r2, const at::TensorBase& weight,
                      const at::TensorBase& bias, int64_t s);

// out (B, N, L, C), channels contiguous, any other strides: the mixed tokens.
void mix_forward_cpu(const at::TensorBase& x4, const at::TensorBase& r2, const at::TensorBase& weight,
                     const at::TensorBase& bias, int64_t s, const at::TensorBase& out);

// grad (B, N, L, C), channels contiguous. Writes dx (contiguous (B, N, L, C)) when it is defined,
// and dr2, dweight, dbias (contiguous, shaped as r2, weight, bias) when dr2 is defined.
void mix_backward_cpu(const at::TensorBase& x4, const at::TensorBase& r2, const at::TensorBase& weight,
                      const at::TensorBase& bias, const at::TensorBase& grad, int64_t s, const at::TensorBase& dx,
                      const at::TensorBase& dr2, const at::TensorBase& dweight, const at::TensorBase& dbias);

// g = GELU(h), dh = dy * GELU'(h); all four contiguous, one shape and floating dtype.
void gelu_pair_cpu(const at::TensorBase& h, const at::TensorBase& dy, const at::TensorBase& g,
                   const at::TensorBase& dh);

// How many distinct threads at::parallel_for gives `tasks` tasks (tests: the build is parallel).
int64_t threads_used(int64_t tasks);

}  // namespace dynamixer
