// Row-wise argmax of fp32 scores, the greedy sampler's one pass over [rows, vocab] logits.
// numpy's argmax is SIMD but single-threaded; torch's is several times slower on CPU. This one splits
// the rows between threads and scans each row with AVX2 (8 lanes x 4 accumulators). The result is
// torch.argmax's: the first index of the maximum, and the first NaN if a row holds one.
// argmax_logprob_rows adds each pick's log-probability (log_softmax of the row at the pick).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "simd.h"

namespace {

int64_t first_nan(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(x[i])) return i;
  return -1;
}

int64_t row_argmax(const float* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if HF_PAGED_AVX2
  __m256 m0 = _mm256_set1_ps(best), m1 = m0, m2 = m0, m3 = m0;
  __m256 nan = _mm256_setzero_ps();  // lanes that saw a NaN (x != x)
  for (; i + 32 <= n; i += 32) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    const __m256 c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
    nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    m2 = _mm256_max_ps(m2, c);
    m3 = _mm256_max_ps(m3, d);
  }
  if (_mm256_movemask_ps(nan)) return first_nan(x, n);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  for (float v : lanes) best = v > best ? v : best;
#endif
  for (int64_t j = i; j < n; ++j) {
    if (std::isnan(x[j])) return first_nan(x, n);
    if (x[j] > best) best = x[j];
  }
  // Second pass from the start for the first index holding the maximum (the row is in cache now).
  int64_t k = 0;
#if HF_PAGED_AVX2
  const __m256 target = _mm256_set1_ps(best);
  for (; k + 8 <= n; k += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + k), target, _CMP_EQ_OQ));
    if (mask) return k + __builtin_ctz(mask);
  }
#endif
  for (; k < n; ++k)
    if (x[k] == best) return k;
  return 0;  // n == 0 is refused by the caller; an all -inf row ends at index 0 above
}

// log_softmax(x)[argmax] = -log(sum_j exp(x_j - max)): one more pass over a row that is in cache now.
// A row whose maximum is not finite (a NaN, +inf, or all -inf) gives NaN, as log_softmax does.
float row_max_logprob(const float* x, int64_t n, float mx) {
  if (!std::isfinite(mx)) return std::numeric_limits<float>::quiet_NaN();
  float s = 0.0f;
  int64_t j = 0;
#if HF_PAGED_AVX2
  using hf_paged_simd::exp8_nonpositive;
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (; j + 32 <= n; j += 32) {
    s0 = _mm256_add_ps(s0, exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm)));
    s1 = _mm256_add_ps(s1, exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), vm)));
    s2 = _mm256_add_ps(s2, exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j + 16), vm)));
    s3 = _mm256_add_ps(s3, exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j + 24), vm)));
  }
  s = hf_paged_simd::hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#endif
  for (; j < n; ++j) s += hf_paged_simd::exp_nonpositive(x[j] - mx);
  return -std::log(s);
}

void check_scores(const at::Tensor& scores, const char* op) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 2,
              op, ": a 2-D float32 CPU tensor expected");
  TORCH_CHECK(scores.size(1) > 0, op, ": rows must not be empty");
  TORCH_CHECK(scores.stride(1) == 1, op, ": rows must be contiguous");
}

// The greedy pick of every row and its log-probability under log_softmax of the row, in one call: what
// a greedy row that asks for logprobs (every TGI stream) needs, without a [rows, vocab] log_softmax.
std::tuple<at::Tensor, at::Tensor> argmax_logprob_rows(const at::Tensor& scores) {
  check_scores(scores, "argmax_logprob_rows");
  const int64_t rows = scores.size(0), n = scores.size(1), stride = scores.stride(0);
  at::Tensor ids = at::empty({rows}, scores.options().dtype(at::kLong));
  at::Tensor lps = at::empty({rows}, scores.options());
  const float* base = scores.data_ptr<float>();
  int64_t* o = ids.data_ptr<int64_t>();
  float* lp = lps.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = base + r * stride;
      o[r] = row_argmax(x, n);
      lp[r] = row_max_logprob(x, n, x[o[r]]);
    }
  });
  return {ids, lps};
}

at::Tensor argmax_rows(const at::Tensor& scores) {
  check_scores(scores, "argmax_rows");
  const int64_t rows = scores.size(0), n = scores.size(1), stride = scores.stride(0);
  at::Tensor out = at::empty({rows}, scores.options().dtype(at::kLong));
  const float* base = scores.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) o[r] = row_argmax(base + r * stride, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_paged_cpu, m) {
  m.def("argmax_rows(Tensor scores) -> Tensor");
  m.def("argmax_logprob_rows(Tensor scores) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hf_paged_cpu, CPU, m) {
  m.impl("argmax_rows", &argmax_rows);
  m.impl("argmax_logprob_rows", &argmax_logprob_rows);
}
