// Skinny linear layers of bf16 models on CPU: y[M, N] = x[M, K] . w[N, K]^T (+ bias), bf16 in and out,
// fp32 accumulation, M small (a decode step's rows).
//
// Decode streams every weight once per step, so bf16 halves the bytes fp32 moves. Paths, the best the
// build has (csrc is built with -march=native, so that is what the host CPU has):
//   avx512_bf16: vdpbf16ps multiplies 32 bf16 pairs and adds them pairwise into 16 fp32 lanes;
//   avx2:        bf16 widened to fp32 (a bf16 is the top half of an fp32's bits), 8-lane FMA;
//   scalar:      the same arithmetic one value at a time.
// `allow_dpbf16=false` takes the avx2 path even where avx512_bf16 exists (tests compare the two).
// Register tiles hold 2 rows of x by 4 rows of w; threads split N into column tiles.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "simd.h"

namespace {

constexpr int kRows = 2;
constexpr int kCols = 4;

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// out[i * NR + j] = x_i . w_j over K, for the tile's MR x NR pairs.
template <int MR, int NR>
void tile_scalar(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, float* out) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += bf16_to_float(x[i * ldx + k]) * bf16_to_float(w[j * K + k]);
      out[i * NR + j] = s;
    }
}

#if HF_PAGED_AVX2
inline __m256 widen8(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

template <int MR, int NR>
void tile_avx2(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, float* out) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = widen8(x + i * ldx + k);
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = widen8(w + j * K + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hf_paged_simd::hsum8(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += bf16_to_float(x[i * ldx + kk]) * bf16_to_float(w[j * K + kk]);
      out[i * NR + j] = s;
    }
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HF_PAGED_DPBF16 1
template <int MR, int NR>
void tile_dpbf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, float* out) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    // The tail loads zeros past K (masked), which add nothing.
    const __mmask32 m = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    __m512bh xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = (__m512bh)_mm512_maskz_loadu_epi16(m, x + i * ldx + k);
    for (int j = 0; j < NR; ++j) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w + j * K + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], wv);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * NR + j] = _mm512_reduce_add_ps(acc[i][j]);
}
#else
#define HF_PAGED_DPBF16 0
#endif

enum class Path { kScalar, kAvx2, kDpbf16 };

template <int MR, int NR>
void tile(Path path, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, float* out) {
#if HF_PAGED_DPBF16
  if (path == Path::kDpbf16) return tile_dpbf16<MR, NR>(x, ldx, w, K, out);
#endif
#if HF_PAGED_AVX2
  if (path != Path::kScalar) return tile_avx2<MR, NR>(x, ldx, w, K, out);
#endif
  tile_scalar<MR, NR>(x, ldx, w, K, out);
}

// All M rows of x against NR weight rows, written to y (bf16, rounded to nearest even) with the bias.
template <int NR>
void column_tile(Path path, const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* w, int64_t K,
                 at::BFloat16* y, int64_t ldy, const at::BFloat16* bias) {
  float out[kRows * NR];
  for (int64_t m = 0; m < M; m += kRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kRows, M - m));
    if (mr == kRows)
      tile<kRows, NR>(path, x + m * ldx, ldx, w, K, out);
    else
      tile<1, NR>(path, x + m * ldx, ldx, w, K, out);
    for (int i = 0; i < mr; ++i)
      for (int j = 0; j < NR; ++j)
        y[(m + i) * ldy + j] = at::BFloat16(out[i * NR + j] + (bias != nullptr ? static_cast<float>(bias[j]) : 0.f));
  }
}

using ColumnTileFn = void (*)(Path, const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, at::BFloat16*,
                              int64_t, const at::BFloat16*);
constexpr ColumnTileFn kColumnTiles[kCols + 1] = {nullptr, column_tile<1>, column_tile<2>, column_tile<3>,
                                                  column_tile<4>};

Path best_path(bool allow_dpbf16) {
  if (HF_PAGED_DPBF16 && allow_dpbf16) return Path::kDpbf16;
  return HF_PAGED_AVX2 ? Path::kAvx2 : Path::kScalar;
}

at::Tensor skinny_linear_bf16(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              bool allow_dpbf16) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "skinny_linear_bf16: CPU tensors expected");
  TORCH_CHECK(input.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "skinny_linear_bf16: bfloat16 tensors expected");
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "skinny_linear_bf16: input [M, K] and weight [N, K] expected, got ", input.sizes(), " and ",
              weight.sizes());
  const at::Tensor x = input.stride(1) == 1 ? input : input.contiguous();
  const at::Tensor w = weight.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor b;
  const at::BFloat16* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == N,
                "skinny_linear_bf16: bias [N] bfloat16 expected");
    b = bias->contiguous();
    bp = b.data_ptr<at::BFloat16>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t ldx = x.stride(0);
  const Path path = best_path(allow_dpbf16);
  const int64_t tiles = (N + kCols - 1) / kCols;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * kCols;
      const int64_t nr = std::min<int64_t>(kCols, N - n);
      kColumnTiles[nr](path, xp, M, ldx, wp + n * K, K, yp + n, N, bp != nullptr ? bp + n : nullptr);
    }
  });
  return y;
}

std::string skinny_linear_bf16_path() {
  switch (best_path(true)) {
    case Path::kDpbf16: return "avx512_bf16";
    case Path::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_paged_cpu, m) {
  m.def("skinny_linear_bf16(Tensor input, Tensor weight, Tensor? bias, bool allow_dpbf16=True) -> Tensor");
  m.def("skinny_linear_bf16_path() -> str", &skinny_linear_bf16_path);
}

TORCH_LIBRARY_IMPL(hf_paged_cpu, CPU, m) {
  m.impl("skinny_linear_bf16", &skinny_linear_bf16);
}
