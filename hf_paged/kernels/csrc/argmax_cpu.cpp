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
#include <vector>

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

// sum_j exp(x_j - mx) over a row that is in cache (mx: its finite maximum, or an upper bound of it).
float row_sum_exp(const float* x, int64_t n, float mx) {
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
  return s;
}

// log_softmax(x)[argmax] = -log(sum_j exp(x_j - max)): one more pass over a row that is in cache now.
// A row whose maximum is not finite (a NaN, +inf, or all -inf) gives NaN, as log_softmax does.
float row_max_logprob(const float* x, int64_t n, float mx) {
  if (!std::isfinite(mx)) return std::numeric_limits<float>::quiet_NaN();
  return -std::log(row_sum_exp(x, n, mx));
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

// The LM head and the greedy pick in one pass: `x` [rows, hidden] against the output layer `weight`
// [>= vocab, hidden] (and `bias`), one chunk of the vocabulary at a time, each chunk's logits scanned
// while they are in cache. The [rows, vocab] logits are never written to memory and read back, which at
// 256 rows and a 49152-token vocabulary is 50 MB each way a step. Chunks go to threads; each chunk's
// product is one single-threaded GEMM. Returns argmax_rows' ids over the first `vocab` columns (the first
// maximum, the first NaN) and, with `logprob`, argmax_logprob_rows' log-probabilities (from per-chunk
// sums rescaled to the row maximum, so they agree with it to float rounding, not bit for bit).
std::tuple<at::Tensor, at::Tensor> head_argmax(const at::Tensor& x, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& bias, int64_t vocab,
                                               bool logprob) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && x.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat && x.dim() == 2 && weight.dim() == 2,
              "head_argmax: 2-D float32 CPU tensors expected");
  TORCH_CHECK(x.size(1) == weight.size(1), "head_argmax: x is [rows, ", weight.size(1), "] for this weight, got ",
              x.sizes());
  TORCH_CHECK(vocab > 0 && vocab <= weight.size(0), "head_argmax: vocab must be in [1, ", weight.size(0), "]");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == weight.size(0),
                "head_argmax: a float32 bias of ", weight.size(0), " values expected");
  const int64_t rows = x.size(0);
  at::Tensor ids = at::empty({rows}, x.options().dtype(at::kLong));
  at::Tensor lps = at::empty({logprob ? rows : 0}, x.options());
  if (rows == 0) return {ids, lps};
  at::NoGradGuard no_grad;  // the GEMMs write into views of a buffer: autograd must not see them
  const at::Tensor xc = x.detach().contiguous(), wd = weight.detach();
  // About 1 MiB of logits per chunk (fits the cache next to its weight rows), 256..8192 columns.
  const int64_t width = std::min<int64_t>(8192, std::max<int64_t>(256, ((1 << 18) / rows + 63) / 64 * 64));
  const int64_t chunks = (vocab + width - 1) / width;
  std::vector<float> best(chunks * rows), sums(logprob ? chunks * rows : 0);
  std::vector<int64_t> where(chunks * rows);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    at::Tensor buf = at::empty({rows, width}, xc.options());
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t v0 = c * width, n = std::min(width, vocab - v0);
      at::Tensor out = buf.narrow(1, 0, n);
      const at::Tensor w = wd.narrow(0, v0, n).t();
      if (has_bias)
        at::addmm_out(out, bias->detach().narrow(0, v0, n), xc, w);
      else
        at::mm_out(out, xc, w);
      const float* base = out.data_ptr<float>();
      const int64_t stride = out.stride(0);
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = base + r * stride;
        const int64_t i = row_argmax(row, n);
        best[c * rows + r] = row[i];
        where[c * rows + r] = v0 + i;
        if (logprob) sums[c * rows + r] = std::isfinite(row[i]) ? row_sum_exp(row, n, row[i]) : 0.0f;
      }
    }
  });
  int64_t* o = ids.data_ptr<int64_t>();
  float* lp = logprob ? lps.data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    // Chunks in vocabulary order, a later one only when strictly greater: the first maximum overall. A
    // NaN ends the scan (its chunk's scan already stopped at its first NaN).
    float m = best[r];
    int64_t at_ = where[r];
    for (int64_t c = 1; c < chunks && !std::isnan(m); ++c) {
      const float v = best[c * rows + r];
      if (std::isnan(v) || v > m) m = v, at_ = where[c * rows + r];
    }
    o[r] = at_;
    if (lp) {
      if (!std::isfinite(m)) {
        lp[r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      float s = 0.0f;
      for (int64_t c = 0; c < chunks; ++c)
        if (sums[c * rows + r] > 0.0f) s += sums[c * rows + r] * std::exp(best[c * rows + r] - m);
      lp[r] = -std::log(s);
    }
  }
  return {ids, lps};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_paged_cpu, m) {
  m.def("argmax_rows(Tensor scores) -> Tensor");
  m.def("argmax_logprob_rows(Tensor scores) -> (Tensor, Tensor)");
  m.def("head_argmax(Tensor x, Tensor weight, Tensor? bias, int vocab, bool logprob) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hf_paged_cpu, CPU, m) {
  m.impl("argmax_rows", &argmax_rows);
  m.impl("argmax_logprob_rows", &argmax_logprob_rows);
  m.impl("head_argmax", &head_argmax);
}
