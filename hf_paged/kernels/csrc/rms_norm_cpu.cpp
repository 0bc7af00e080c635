// RMSNorm on CPU, fp32 and bf16: one pass per row where transformers' eager module runs ~8 small ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace {

// Both ops take CPU input [..., D] and weight [D] of one dtype.
void check_args(const char* op, const at::Tensor& input, const at::Tensor& weight, at::ScalarType dtype,
                const char* dtype_name) {
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == dtype && weight.scalar_type() == dtype, op, ": ",
              dtype_name, " CPU tensors expected");
  TORCH_CHECK(input.dim() >= 1 && weight.dim() == 1 && weight.size(0) == input.size(-1), op,
              ": weight [D] for input [..., D] expected, got ", weight.sizes(), " and ", input.sizes());
}

// RMSNorm over the last dim, as transformers' fp32 RMSNorm modules compute it, in one pass per row:
// r = 1 / sqrt(sum(x^2) / D + eps), y = (x * r) * (weight + offset). offset 0 is the Llama family's
// `weight * (x * r)`, offset 1 Gemma's `(x * r) * (1 + weight)`; the products are rounded in that
// order, so only the order of the sum of squares differs from the eager module.
at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps, double offset) {
  check_args("rms_norm", input, weight, at::kFloat, "float32");
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t D = x.size(-1);
  const int64_t rows = D > 0 ? x.numel() / D : 0;
  if (rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float feps = static_cast<float>(eps), foff = static_cast<float>(offset), fd = static_cast<float>(D);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * D;
      float* yr = yp + r * D;
      int64_t i = 0;
      float ss = 0.f;
#if HF_PAGED_AVX2
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (; i + 16 <= D; i += 16) {
        const __m256 a = _mm256_loadu_ps(xr + i), b = _mm256_loadu_ps(xr + i + 8);
        acc0 = _mm256_fmadd_ps(a, a, acc0);
        acc1 = _mm256_fmadd_ps(b, b, acc1);
      }
      ss = hf_paged_simd::hsum8(_mm256_add_ps(acc0, acc1));
#endif
      for (; i < D; ++i) ss += xr[i] * xr[i];
      const float rinv = 1.0f / std::sqrt(ss / fd + feps);
      for (int64_t j = 0; j < D; ++j) {
        const float t = xr[j] * rinv;
        yr[j] = t * (wp[j] + foff);
      }
    }
  });
  return y;
}

// bf16 input and weight, fp32 inside, as transformers' bf16 RMSNorm modules compute it: the row is widened
// to fp32, r = 1 / sqrt(sum(x^2) / D + eps), then either
//   round_first (the Llama family: `weight * (x * r).to(bf16)`): y = bf16((weight + offset) * bf16(x * r)),
//   or not (Gemma: `((x * r) * (1 + weight.float())).to(bf16)`):  y = bf16((x * r) * (weight + offset)).
at::Tensor rms_norm_bf16(const at::Tensor& input, const at::Tensor& weight, double eps, double offset,
                         bool round_first) {
  check_args("rms_norm_bf16", input, weight, at::kBFloat16, "bfloat16");
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t D = x.size(-1);
  const int64_t rows = D > 0 ? x.numel() / D : 0;
  if (rows == 0) return y;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const float feps = static_cast<float>(eps), foff = static_cast<float>(offset), fd = static_cast<float>(D);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / D), [&](int64_t r0, int64_t r1) {
    std::vector<float> xf(D);
    for (int64_t r = r0; r < r1; ++r) {
      const at::BFloat16* xr = xp + r * D;
      at::BFloat16* yr = yp + r * D;
      int64_t i = 0;
      float ss = 0.f;
#if HF_PAGED_AVX2
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (; i + 16 <= D; i += 16) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + i));
        const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
        const __m256 b =
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
        _mm256_storeu_ps(xf.data() + i, a);
        _mm256_storeu_ps(xf.data() + i + 8, b);
        acc0 = _mm256_fmadd_ps(a, a, acc0);
        acc1 = _mm256_fmadd_ps(b, b, acc1);
      }
      ss = hf_paged_simd::hsum8(_mm256_add_ps(acc0, acc1));
#endif
      for (; i < D; ++i) {
        xf[i] = static_cast<float>(xr[i]);
        ss += xf[i] * xf[i];
      }
      const float rinv = 1.0f / std::sqrt(ss / fd + feps);
      if (round_first) {
        for (int64_t j = 0; j < D; ++j)
          yr[j] = at::BFloat16((static_cast<float>(wp[j]) + foff) * static_cast<float>(at::BFloat16(xf[j] * rinv)));
      } else {
        for (int64_t j = 0; j < D; ++j) yr[j] = at::BFloat16((xf[j] * rinv) * (static_cast<float>(wp[j]) + foff));
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_paged_cpu, m) {
  m.def("rms_norm(Tensor input, Tensor weight, float eps, float offset) -> Tensor");
  m.def("rms_norm_bf16(Tensor input, Tensor weight, float eps, float offset, bool round_first) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_paged_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_bf16", &rms_norm_bf16);
}
