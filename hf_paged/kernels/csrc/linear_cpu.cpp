// Dense layers of a decode step on CPU, fp32: skinny linear layers, y[M, N] = x[M, K] . w[N, K]^T
// (+ bias) with M small.
//
// A decode step multiplies 1-48 rows by every weight matrix of the model, and the weights stream
// from DRAM. BLAS libraries tune for large M; at 8-24 rows with cold weights, oneDNN and MKL reached
// only 5 GB/s and 55-60 GFLOP/s on the 2-core development machine (docs/benchmarks.md).
// This kernel needs no packing: it works on nn.Linear's own [N, K] row-major weight. Each
// register tile holds 2 rows of x by 6 rows of w as 12 running 8-wide dot products over K, so one
// pass over the tile's six weight rows serves two input rows. The next tile's weight rows are
// prefetched while the current one is used by every input row, and threads split N into
// contiguous halves (each thread streams its own part of the weight once).
//
// Results differ from BLAS only in the order of the K summation (fp32 accumulation throughout).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "simd.h"

#define HF_PAGED_SIMD_GEMM HF_PAGED_AVX2

namespace {

constexpr int kRows = 2;  // rows of x per register tile
constexpr int kCols = 6;  // rows of w (output columns) per register tile

#if HF_PAGED_SIMD_GEMM
using hf_paged_simd::hsum8;

// y[i, j] = x[i, :] . w[j, :] (+ bias[j]) for i < MR, j < NR. The bytes [pf, pf_end) (a slice of the
// next tile's weight rows) are prefetched into L1, spread evenly over the K loop.
template <int MR, int NR>
inline void tile(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t K,
                 float* __restrict y, int64_t ldy, const float* __restrict bias, const char* pf, const char* pf_end) {
  __m256 acc[MR][NR];
  const int64_t lines = (pf_end - pf) / 64;
  const int64_t per_iter = (lines + K / 8 - 1) / std::max<int64_t>(K / 8, 1);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    for (int64_t p = 0; p < per_iter && pf < pf_end; ++p, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
    __m256 xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = _mm256_loadu_ps(w + j * K + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum8(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += x[i * ldx + kk] * w[j * K + kk];
      y[i * ldy + j] = bias != nullptr ? s + bias[j] : s;
    }
}
#else
// Portable version of the same tile (the compiler vectorises the inner loop where it can).
template <int MR, int NR>
inline void tile(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t K,
                 float* __restrict y, int64_t ldy, const float* __restrict bias, const char*, const char*) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[i * ldx + k] * w[j * K + k];
      y[i * ldy + j] = bias != nullptr ? s + bias[j] : s;
    }
}
#endif

// All M rows of x against NR weight rows. The next tile's weight rows (`pf`, contiguous since w is
// row-major) are prefetched in equal slices by the row tiles, so the misses overlap with the compute
// of the whole column tile instead of bunching up at its start (5-10% faster on cold weights).
template <int NR>
void column_tile(const float* x, int64_t M, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                 const float* bias, const float* pf, int64_t pf_floats) {
  const int64_t blocks = (M + kRows - 1) / kRows;
  const char* p0 = reinterpret_cast<const char*>(pf);
  const int64_t bytes = pf ? pf_floats * 4 : 0;
  int64_t m = 0, b = 0;
  for (; m + kRows <= M; m += kRows, ++b) {
    const char* s = p0 + (bytes * b / blocks & ~int64_t(63));
    const char* e = p0 + (bytes * (b + 1) / blocks & ~int64_t(63));
    tile<kRows, NR>(x + m * ldx, ldx, w, K, y + m * ldy, ldy, bias, s, e);
  }
  if (m < M) tile<1, NR>(x + m * ldx, ldx, w, K, y + m * ldy, ldy, bias, p0 + (bytes * b / blocks & ~int64_t(63)), p0 + bytes);
}

using ColumnTileFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, const float*,
                              const float*, int64_t);
constexpr ColumnTileFn kColumnTiles[kCols + 1] = {nullptr, column_tile<1>, column_tile<2>, column_tile<3>,
                                                  column_tile<4>, column_tile<5>, column_tile<6>};

at::Tensor skinny_linear(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "skinny_linear: CPU tensors expected");
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "skinny_linear: float32 tensors expected");
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "skinny_linear: input [M, K] and weight [N, K] expected, got ", input.sizes(), " and ", weight.sizes());
  const at::Tensor x = input.stride(1) == 1 ? input : input.contiguous();
  const at::Tensor w = weight.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N, "skinny_linear: bias [N] float32 expected");
    b = bias->contiguous();
    bp = b.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const int64_t tiles = (N + kCols - 1) / kCols;
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * kCols;
      const int64_t nr = std::min<int64_t>(kCols, N - n);
      const float* pf = t + 1 < t1 ? wp + (n + kCols) * K : nullptr;
      const int64_t pf_floats = pf ? std::min<int64_t>(kCols, N - n - kCols) * K : 0;
      kColumnTiles[nr](xp, M, ldx, wp + n * K, K, yp + n, N, bp != nullptr ? bp + n : nullptr, pf, pf_floats);
    }
  });
  return y;
}

bool skinny_linear_vectorized() { return HF_PAGED_SIMD_GEMM != 0; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_paged_cpu, m) {
  m.def("skinny_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("skinny_linear_vectorized() -> bool", &skinny_linear_vectorized);
}

TORCH_LIBRARY_IMPL(hf_paged_cpu, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
}
