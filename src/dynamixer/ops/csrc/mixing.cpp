// Fused dynamic mixing on the CPU: generate, normalise and mix one sequence at a time.
//
// Layout (as in dynamixer's eager path): tokens x4 (B, N, L, C) are mixed along N for the B*L
// sequences (b, :, l); the reduced features r2 (B*L*S, N*d) hold, per (sequence, segment), the
// N tokens' d features token-major; the generator's weight (N*N, N*d) and bias (N*N) have rows
// [input token i, output token j].
//
// Per sequence, all S segments:
//   logits[s, i, j] = r2[seq*S + s] . W[i*N + j] + bias[i*N + j]       (S x N*d x N*N GEMM)
//   P[s, :, j]      = softmax over i of logits[s, :, j]
//   out[j, s-th channel block] = sum_i P[s, i, j] x[i, s-th channel block]
// One task of at::parallel_for takes a group of consecutive sequences (their S x N x N matrices
// about 128 KiB, e.g. 4 sequences for N = 32, S = 8), so that one generator GEMM serves the group
// and each panel of the generator's weight is read from L2 once per group, not per sequence. The
// matrices live in a per-thread scratch buffer reused from group to group; they are never
// written to a tensor. Backward recomputes them, and accumulates the generator's gradients in
// per-thread buffers that are summed at the end.
//
// GEMMs: a register-blocked micro-kernel (4 rows x 3 vectors of accumulators, broadcast A, vector
// B); the generator's weight is packed into column panels once per call.
//
// Vectorisation: GCC/Clang vector extensions of 32 bytes (vec.h). With -mavx2 -mfma they compile
// to AVX2 FMAs; without (the portable build) the compiler lowers them to SSE2 pairs or scalars.
// Which flags the module was built with is chosen in Python from the running CPU and is part of
// the module's cache name. The j axis (output tokens) is padded to a multiple of the vector width
// inside the scratch buffers, so N need not be a multiple of it; channel blocks (C/S) and the
// reduced width (N*d) are padded likewise.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace {

using namespace dynamixer_vec;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C[m, :] (=|+=) A[m, :] @ B for MB rows and NV vectors of columns: acc[MB][NV] in registers.
// A is read as A[m * a_rs + k * a_ks] (broadcast), B[k * ldb + v * W] (vector loads).
// init: 0 start from zero, 1 start from the row vector `bias`, 2 accumulate into C.
template <typename T, int MB, int NV>
inline void micro(int64_t K, const T* a, int64_t a_rs, int64_t a_ks, const T* b, int64_t ldb,
                  T* c, int64_t ldc, int init, const T* bias) {
  constexpr int W = kW<T>;
  vec<T> acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = init == 0 ? vsplat<T>(0) : init == 1 ? vload(bias + v * W) : vload(c + m * ldc + v * W);
  for (int64_t k = 0; k < K; ++k) {
    vec<T> bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + k * ldb + v * W);
    for (int m = 0; m < MB; ++m) {
      const vec<T> av = vsplat<T>(a[m * a_rs + k * a_ks]);
      for (int v = 0; v < NV; ++v) acc[m][v] += av * bv[v];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) vstore(c + m * ldc + v * W, acc[m][v]);
}

// B is either row-major with leading dimension ldb, or (ldb == kPacked) packed into panels of
// 3 vectors of columns (the last panel narrower), each panel K x width contiguous, panel at
// column `col` starting at b + col * K (`pack_panels`). Packing matters for the generator's weight:
// its rows are 4 KiB apart for N = 32, and reading a column block down them thrashes L1's sets.
constexpr int64_t kPacked = -1;
constexpr int64_t kKBlock = 256;   // 256 x 3 vectors of B: 24 KiB in float32

template <typename T, int MB>
inline void micro_any(int nv, int64_t K, const T* a, int64_t a_rs, int64_t a_ks, const T* b, int64_t ldb,
                      T* c, int64_t ldc, int init, const T* bias) {
  if (nv == 3) micro<T, MB, 3>(K, a, a_rs, a_ks, b, ldb, c, ldc, init, bias);
  else if (nv == 2) micro<T, MB, 2>(K, a, a_rs, a_ks, b, ldb, c, ldc, init, bias);
  else micro<T, MB, 1>(K, a, a_rs, a_ks, b, ldb, c, ldc, init, bias);
}

// C (M x ncols) (=|+=) A (M x K) @ B (K x ncols); ncols a multiple of the vector width.
// Column panels outside, rows inside: one panel of B (K x 3 vectors) stays in L1 while all rows
// of A pass over it.
template <typename T>
inline void gemm(int64_t M, int64_t K, int64_t ncols, const T* a, int64_t a_rs, int64_t a_ks, const T* b,
                 int64_t ldb, T* c, int64_t ldc, int init, const T* bias = nullptr) {
  constexpr int W = kW<T>;
  const bool packed = ldb == kPacked;
  for (int64_t col = 0; col < ncols; col += 3 * W) {
    const int64_t width = std::min<int64_t>(3 * W, ncols - col);
    const int nv = static_cast<int>(width / W);
    const T* bc = packed ? b + col * K : b + col;
    const int64_t lb = packed ? width : ldb;
    const T* bias_c = bias ? bias + col : nullptr;
    // long reductions (the backward's K = N*Np) in blocks whose panel part stays in L1
    for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
      const int64_t kb = std::min(kKBlock, K - k0);
      const T* ak = a + k0 * a_ks;
      const T* bk = bc + k0 * lb;
      const int ini = k0 == 0 ? init : 2;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4)
        micro_any<T, 4>(nv, kb, ak + m * a_rs, a_rs, a_ks, bk, lb, c + m * ldc + col, ldc, ini, bias_c);
      for (; m < M; ++m)
        micro_any<T, 1>(nv, kb, ak + m * a_rs, a_rs, a_ks, bk, lb, c + m * ldc + col, ldc, ini, bias_c);
    }
  }
}

// Row-major (K x ncols) -> the panel layout `gemm` reads with ldb == kPacked.
template <typename T>
std::vector<T> pack_panels(const std::vector<T>& src, int64_t K, int64_t ncols) {
  constexpr int W = kW<T>;
  std::vector<T> dst(K * ncols);
  for (int64_t col = 0; col < ncols; col += 3 * W) {
    const int64_t width = std::min<int64_t>(3 * W, ncols - col);
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(&dst[col * K + k * width], &src[k * ncols + col], width * sizeof(T));
  }
  return dst;
}

// Sizes of one call and the generator's weight in padded layouts.
template <typename T>
struct Problem {
  int64_t B, N, L, C, S, CS, ND, Np, NNp, CSp, NDp;
  int64_t group;        // sequences per task: their S x N x N matrices fill about 128 KiB
  int64_t ldP;          // row stride of the (S, N*Np) scratch matrices: not a multiple of 4 KiB
  std::vector<T> wt;    // (ND, N*Np): wt[k][i*Np + j] = W[i*N + j][k], j padded with 0; packed panels
  std::vector<T> bp;    // (N*Np):     bias, j padded with 0
  std::vector<T> wp;    // (N*Np, NDp): W, rows j and columns k padded with 0; packed panels (backward)

  Problem(const at::TensorBase& x4, const at::TensorBase& r2, const at::TensorBase& weight,
          const at::TensorBase& bias, int64_t s,
          bool backward) {
    constexpr int W = kW<T>;
    B = x4.size(0); N = x4.size(1); L = x4.size(2); C = x4.size(3); S = s;
    CS = C / S; ND = r2.size(1);
    Np = round_up(N, W); NNp = N * Np; CSp = round_up(CS, W); NDp = round_up(ND, W);
    ldP = NNp % 256 == 0 ? NNp + W : NNp;
    group = std::max<int64_t>(1, (int64_t(1) << 15) / (S * ldP));
    // but at least two groups per thread, so that small batches still use every thread
    group = std::max<int64_t>(1, std::min<int64_t>(group, B * L / (2 * std::max(1, at::get_num_threads()))));
    const T* w = weight.data_ptr<T>();
    const T* bb = bias.data_ptr<T>();
    wt.assign(ND * NNp, T(0));
    bp.assign(NNp, T(0));
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) {
        bp[i * Np + j] = bb[i * N + j];
        for (int64_t k = 0; k < ND; ++k) wt[k * NNp + i * Np + j] = w[(i * N + j) * ND + k];
      }
    wt = pack_panels(wt, ND, NNp);
    if (backward) {
      wp.assign(NNp * NDp, T(0));
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j)
          std::memcpy(&wp[(i * Np + j) * NDp], w + (i * N + j) * ND, ND * sizeof(T));
      wp = pack_panels(wp, NNp, NDp);
    }
  }
};

// P (G*S, N, Np) of sequences seq0 .. seq0+G-1: one generator GEMM for the group into P, then
// the softmax over i, vectorised along j. Padded columns j >= N hold softmax(0) and are never
// read back as results.
template <typename T>
void mixing_matrices(const Problem<T>& p, const T* r, int64_t seq0, int64_t G, T* P) {
  const int64_t N = p.N, Np = p.Np, NNp = p.NNp, ldP = p.ldP;
  gemm<T>(G * p.S, p.ND, NNp, r + seq0 * p.S * p.ND, p.ND, 1, p.wt.data(), kPacked, P, ldP, 1, p.bp.data());
  constexpr int W = kW<T>;
  for (int64_t s = 0; s < G * p.S; ++s) {
    T* Ps = P + s * ldP;
    for (int64_t j = 0; j < Np; j += W) {
      vec<T> mx = vload(Ps + j);
      for (int64_t i = 1; i < N; ++i) mx = vmax<T>(mx, vload(Ps + i * Np + j));
      vec<T> sum = vsplat<T>(0);
      for (int64_t i = 0; i < N; ++i) {
        const vec<T> e = vexp(vload(Ps + i * Np + j) - mx);
        vstore(Ps + i * Np + j, e);
        sum += e;
      }
      const vec<T> inv = T(1) / sum;
      for (int64_t i = 0; i < N; ++i) vstore(Ps + i * Np + j, vload(Ps + i * Np + j) * inv);
    }
  }
}

// Copy the (N x CS) channel block of one segment (rows `stride` apart) into a contiguous,
// zero-padded (N x CSp) buffer: the GEMMs read it once per block of 4 output rows, and in place
// its rows can be a multiple of 4 KiB apart (the height branch), which thrashes L1's sets.
template <typename T>
inline const T* block_in(const T* src, int64_t stride, const Problem<T>& p, T* buf, int64_t& ld) {
  for (int64_t i = 0; i < p.N; ++i) {
    std::memcpy(buf + i * p.CSp, src + i * stride, p.CS * sizeof(T));
    std::fill(buf + i * p.CSp + p.CS, buf + (i + 1) * p.CSp, T(0));
  }
  ld = p.CSp;
  return buf;
}

template <typename T>
inline void block_out(const T* buf, const Problem<T>& p, T* dst, int64_t stride) {
  if (p.CS == p.CSp) return;
  for (int64_t i = 0; i < p.N; ++i) std::memcpy(dst + i * stride, buf + i * p.CSp, p.CS * sizeof(T));
}

template <typename T>
void forward_impl(const at::TensorBase& x4, const at::TensorBase& r2, const at::TensorBase& weight,
                  const at::TensorBase& bias, int64_t s, const at::TensorBase& out) {
  const Problem<T> p(x4, r2, weight, bias, s, false);
  const T* x = x4.data_ptr<T>();
  const T* r = r2.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t sxb = x4.stride(0), sxn = x4.stride(1), sxl = x4.stride(2);
  const int64_t sob = out.stride(0), son = out.stride(1), sol = out.stride(2);
  const int64_t G = p.group, nseq = p.B * p.L;
  const int64_t scratch = G * p.S * p.ldP + 2 * p.N * p.CSp;
  at::parallel_for(0, (nseq + G - 1) / G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(scratch);
    T* P = buf.data();
    T* xbuf = P + G * p.S * p.ldP;
    T* obuf = xbuf + p.N * p.CSp;
    for (int64_t grp = begin; grp < end; ++grp) {
      const int64_t seq0 = grp * G, gn = std::min(G, nseq - seq0);
      mixing_matrices<T>(p, r, seq0, gn, P);
      for (int64_t q = 0; q < gn; ++q) {
        const int64_t b = (seq0 + q) / p.L, l = (seq0 + q) % p.L;
        for (int64_t s = 0; s < p.S; ++s) {
          int64_t ldx;
          const T* xs = block_in<T>(x + b * sxb + l * sxl + s * p.CS, sxn, p, xbuf, ldx);
          T* os = o + b * sob + l * sol + s * p.CS;
          const bool direct = p.CS == p.CSp;
          // out[j, :] = sum_i P[s, i, j] x[i, :]: rows j, reduction over i
          gemm<T>(p.N, p.N, p.CSp, P + (q * p.S + s) * p.ldP, 1, p.Np, xs, ldx, direct ? os : obuf,
                  direct ? son : p.CSp, 0);
          if (!direct) block_out<T>(obuf, p, os, son);
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const at::TensorBase& x4, const at::TensorBase& r2, const at::TensorBase& weight,
                   const at::TensorBase& bias, const at::TensorBase& grad, int64_t s, const at::TensorBase& dx,
                   const at::TensorBase& dr2, const at::TensorBase& dweight, const at::TensorBase& dbias) {
  const bool need_x = dx.defined(), need_params = dr2.defined();
  const Problem<T> p(x4, r2, weight, bias, s, true);
  const int64_t N = p.N, Np = p.Np, NNp = p.NNp, CS = p.CS, CSp = p.CSp, S = p.S, ND = p.ND, NDp = p.NDp, ldP = p.ldP;
  const T* x = x4.data_ptr<T>();
  const T* r = r2.data_ptr<T>();
  const T* g = grad.data_ptr<T>();
  T* dxp = need_x ? dx.data_ptr<T>() : nullptr;
  T* drp = need_params ? dr2.data_ptr<T>() : nullptr;
  const int64_t sxb = x4.stride(0), sxn = x4.stride(1), sxl = x4.stride(2);
  const int64_t sgb = grad.stride(0), sgn = grad.stride(1), sgl = grad.stride(2);
  const int64_t sdb = N * p.L * p.C, sdn = p.L * p.C, sdl = p.C;
  // per-thread accumulators of the generator's gradients, padded layout (N*Np, NDp) and (N*Np)
  const int nthreads = std::max(1, at::get_num_threads());
  std::vector<T> dw_acc(need_params ? nthreads * (NNp * NDp + NNp) : 0, T(0));
  const int64_t G = p.group, nseq = p.B * p.L;
  const int64_t scratch = 2 * G * S * ldP + 3 * N * CSp + CSp * Np + G * S * NDp;
  at::parallel_for(0, (nseq + G - 1) / G, 1, [&](int64_t begin, int64_t end) {
    const int tid = std::min(at::get_thread_num(), nthreads - 1);
    std::vector<T> buf(scratch, T(0));
    T* P = buf.data();
    T* dl = P + G * S * ldP;                // dP, then the logits' gradient, (G*S, N, Np)
    T* xbuf = dl + G * S * ldP;
    T* gbuf = xbuf + N * CSp;
    T* obuf = gbuf + N * CSp;
    T* gt = obuf + N * CSp;                 // (CSp, Np): one segment's gradient transposed
    T* rbuf = gt + CSp * Np;                // (G*S, NDp): the group's reduced features, padded
    T* dw = need_params ? dw_acc.data() + tid * (NNp * NDp + NNp) : nullptr;
    T* db = need_params ? dw + NNp * NDp : nullptr;
    for (int64_t grp = begin; grp < end; ++grp) {
      const int64_t seq0 = grp * G, gn = std::min(G, nseq - seq0), rows = gn * S;
      mixing_matrices<T>(p, r, seq0, gn, P);
      for (int64_t q = 0; q < gn; ++q) {
        const int64_t b = (seq0 + q) / p.L, l = (seq0 + q) % p.L;
        for (int64_t s = 0; s < S; ++s) {
          int64_t ldg, ldx;
          const T* gs = block_in<T>(g + b * sgb + l * sgl + s * CS, sgn, p, gbuf, ldg);
          const T* Ps = P + (q * S + s) * ldP;
          if (need_x) {   // dx[i, :] = sum_j P[s, i, j] g[j, :]
            T* ds = dxp + b * sdb + l * sdl + s * CS;
            const bool direct = CS == CSp;
            gemm<T>(N, N, CSp, Ps, Np, 1, gs, ldg, direct ? ds : obuf, direct ? sdn : CSp, 0);
            if (!direct) block_out<T>(obuf, p, ds, sdn);
          }
          if (need_params) {   // dP[i, j] = x[i, :] . g[j, :]; then the softmax's backward over i
            const T* xs = block_in<T>(x + b * sxb + l * sxl + s * CS, sxn, p, xbuf, ldx);
            for (int64_t c = 0; c < CS; ++c)
              for (int64_t j = 0; j < N; ++j) gt[c * Np + j] = gs[j * ldg + c];
            T* ds = dl + (q * S + s) * ldP;
            gemm<T>(N, CS, Np, xs, ldx, 1, gt, Np, ds, Np, 0);
            constexpr int W = kW<T>;
            for (int64_t j = 0; j < Np; j += W) {
              vec<T> dot = vsplat<T>(0);
              for (int64_t i = 0; i < N; ++i) dot += vload(Ps + i * Np + j) * vload(ds + i * Np + j);
              for (int64_t i = 0; i < N; ++i)
                vstore(ds + i * Np + j, vload(Ps + i * Np + j) * (vload(ds + i * Np + j) - dot));
            }
            for (int64_t i = 0; i < N; ++i)
              for (int64_t j = N; j < Np; ++j) ds[i * Np + j] = T(0);
          }
        }
      }
      if (need_params) {
        // dr2[seq*S + s, :] = dl[s] @ W for the group's rows (padded rows of wp are zero)
        const bool direct = ND == NDp;
        T* dr = drp + seq0 * S * ND;
        gemm<T>(rows, NNp, NDp, dl, ldP, 1, p.wp.data(), kPacked, direct ? dr : rbuf, direct ? ND : NDp, 0);
        if (!direct)
          for (int64_t s = 0; s < rows; ++s) std::memcpy(dr + s * ND, rbuf + s * NDp, ND * sizeof(T));
        // dW += dl^T @ R ; db += column sums of dl
        const T* rs = r + seq0 * S * ND;
        int64_t ldr = ND;
        if (!direct) {
          for (int64_t s = 0; s < rows; ++s) {
            std::memcpy(rbuf + s * NDp, rs + s * ND, ND * sizeof(T));
            std::fill(rbuf + s * NDp + ND, rbuf + (s + 1) * NDp, T(0));
          }
          rs = rbuf;
          ldr = NDp;
        }
        gemm<T>(NNp, rows, NDp, dl, 1, ldP, rs, ldr, dw, NDp, 2);
        for (int64_t s = 0; s < rows; ++s)
          for (int64_t n = 0; n < NNp; n += kW<T>) vstore(db + n, vload(db + n) + vload(dl + s * ldP + n));
      }
    }
  });
  if (need_params) {
    T* dwp = dweight.data_ptr<T>();
    T* dbp = dbias.data_ptr<T>();
    std::fill(dwp, dwp + N * N * ND, T(0));
    std::fill(dbp, dbp + N * N, T(0));
    for (int t = 0; t < nthreads; ++t) {
      const T* dw = dw_acc.data() + t * (NNp * NDp + NNp);
      const T* db = dw + NNp * NDp;
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) {
          dbp[i * N + j] += db[i * Np + j];
          T* row = dwp + (i * N + j) * ND;
          const T* src = dw + (i * Np + j) * NDp;
          for (int64_t k = 0; k < ND; ++k) row[k] += src[k];
        }
    }
  }
}

}  // namespace

namespace dynamixer {

void check_mix_inputs(const at::TensorBase& x4, const at::TensorBase& r2, const at::TensorBase& weight,
                      const at::TensorBase& bias, int64_t s) {
  TORCH_CHECK(x4.dim() == 4 && x4.device().is_cpu(), "x4 must be a (B, N, L, C) CPU tensor");
  // (strides of an empty tensor do not matter: an empty batch's gradient may come broadcast)
  TORCH_CHECK(x4.stride(3) == 1 || x4.numel() == 0, "x4's channels must be contiguous");
  const int64_t n = x4.size(1), c = x4.size(3);
  TORCH_CHECK(s > 0 && c % s == 0, "C must be divisible by the number of segments");
  TORCH_CHECK(n >= 1 && n <= 256, "sequences of 1 to 256 tokens");
  TORCH_CHECK(r2.is_contiguous() && r2.dim() == 2 && r2.size(0) == x4.size(0) * x4.size(2) * s,
              "r2 must be contiguous (B*L*S, N*d)");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2 && weight.size(0) == n * n && weight.size(1) == r2.size(1),
              "weight must be contiguous (N*N, N*d)");
  TORCH_CHECK(bias.is_contiguous() && bias.numel() == n * n, "bias must be contiguous (N*N)");
  for (const at::TensorBase* t : {&r2, &weight, &bias})
    TORCH_CHECK(t->scalar_type() == x4.scalar_type() && t->device().is_cpu(),
                "x4, r2, weight and bias must share one dtype and be on the CPU");
}

void mix_forward_cpu(const at::TensorBase& x4, const at::TensorBase& r2, const at::TensorBase& weight,
                     const at::TensorBase& bias, int64_t s, const at::TensorBase& out) {
  check_mix_inputs(x4, r2, weight, bias, s);
  TORCH_CHECK(out.sizes() == x4.sizes() && (out.stride(3) == 1 || out.numel() == 0) &&
                  out.scalar_type() == x4.scalar_type(),
              "out must be (B, N, L, C) with contiguous channels, in x4's dtype");
  AT_DISPATCH_FLOATING_TYPES(x4.scalar_type(), "dynamixer_mix_forward", [&] {
    forward_impl<scalar_t>(x4, r2, weight, bias, s, out);
  });
}

void mix_backward_cpu(const at::TensorBase& x4, const at::TensorBase& r2, const at::TensorBase& weight,
                      const at::TensorBase& bias, const at::TensorBase& grad, int64_t s, const at::TensorBase& dx,
                      const at::TensorBase& dr2, const at::TensorBase& dweight, const at::TensorBase& dbias) {
  check_mix_inputs(x4, r2, weight, bias, s);
  TORCH_CHECK(grad.sizes() == x4.sizes() && (grad.stride(3) == 1 || grad.numel() == 0) &&
                  grad.scalar_type() == x4.scalar_type(),
              "grad must be (B, N, L, C) with contiguous channels");
  TORCH_CHECK(!dx.defined() || (dx.sizes() == x4.sizes() && dx.is_contiguous()), "dx must be contiguous (B, N, L, C)");
  TORCH_CHECK(!dr2.defined() || (dr2.sizes() == r2.sizes() && dr2.is_contiguous() && dweight.defined() &&
                                 dweight.sizes() == weight.sizes() && dweight.is_contiguous() && dbias.defined() &&
                                 dbias.numel() == bias.numel() && dbias.is_contiguous()),
              "dr2, dweight and dbias must be contiguous and shaped as r2, weight and bias");
  AT_DISPATCH_FLOATING_TYPES(x4.scalar_type(), "dynamixer_mix_backward", [&] {
    backward_impl<scalar_t>(x4, r2, weight, bias, grad, s, dx, dr2, dweight, dbias);
  });
}

int64_t threads_used(int64_t tasks) {
  std::vector<int> seen(std::max(1, at::get_num_threads()), 0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    if (begin < end && tid >= 0 && tid < static_cast<int>(seen.size())) seen[tid] = 1;
  });
  int64_t n = 0;
  for (int v : seen) n += v;
  return n;
}

}  // namespace dynamixer
