// Two of the nucleus' (warpers.nucleus) full-vocabulary passes on fp32 rows, each one call with rows split
// between threads. A top-p row of 49152 scores went through ~12 torch passes, ~20 ms a step at 64 rows here;
// the normaliser took four of them and the mask five (a copy of the rows, a compare, a fill, a write back).
//
// - cut_below: a row with every score below its threshold set to -inf (the nucleus once its threshold is
//   known). Comparisons only: bit for bit what masked_fill gives.
// - max_sum_exp: each row's maximum and sum of exp(score - max) in float64, the nucleus' normaliser (its
//   decisions keep a margin for such a sum: warpers.NUCLEUS_OWN_ERROR).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "simd.h"

namespace {

void check_rows(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2, op,
              ": a 2-D float32 CPU tensor expected");
  TORCH_CHECK(t.size(1) > 0, op, ": rows must not be empty");
  TORCH_CHECK(t.stride(1) == 1, op, ": rows must be contiguous");
}

int64_t grain(int64_t n) { return std::max<int64_t>(1, 16384 / n); }

at::Tensor cut_below(const at::Tensor& scores, const at::Tensor& thr) {
  check_rows(scores, "cut_below");
  const int64_t rows = scores.size(0), n = scores.size(1), stride = scores.stride(0);
  TORCH_CHECK(thr.device().is_cpu() && thr.scalar_type() == at::kFloat && thr.numel() == rows,
              "cut_below: one float32 threshold per row expected");
  const at::Tensor t = thr.contiguous();
  at::Tensor out = at::empty({rows, n}, scores.options());
  const float* base = scores.data_ptr<float>();
  const float* th = t.data_ptr<float>();
  float* ob = out.data_ptr<float>();
  const float neg = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, rows, grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = base + r * stride;
      float* o = ob + r * n;
      const float c = th[r];
      int64_t j = 0;
#if HF_PAGED_AVX2
      const __m256 vc = _mm256_set1_ps(c), vn = _mm256_set1_ps(neg);
      for (; j + 8 <= n; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        _mm256_storeu_ps(o + j, _mm256_blendv_ps(v, vn, _mm256_cmp_ps(v, vc, _CMP_LT_OQ)));
      }
#endif
      for (; j < n; ++j) o[j] = x[j] < c ? neg : x[j];
    }
  });
  return out;
}

// Calls f(j) for each j in [0, n) with p[j] != 0 (NaN included), in order, until f returns true; 8 at a time.
template <typename F>
inline void for_nonzero(const float* p, int64_t n, F f) {
  int64_t j = 0;
#if HF_PAGED_AVX2
  const __m256 zero = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    uint32_t m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j), zero, _CMP_NEQ_UQ));
    if (m == 0xFF) {  // a dense block (a row no warper cut): in order, without the bit scan
      for (int64_t i = j; i < j + 8; ++i)
        if (f(i)) return;
      continue;
    }
    for (; m; m &= m - 1)
      if (f(j + __builtin_ctz(m))) return;
  }
#endif
  for (; j < n; ++j)
    if (!(p[j] == 0.0f) && f(j)) return;
}

// sampler._draw's pick on fp32 probabilities: searchsorted(cdf, u * total, right=True), capped at
// searchsorted(cdf, total, right=False) and at n - 1, where cdf = probs.cumsum(-1) in float32 as torch makes it
// on CPU (each prefix a double sum rounded to float) and total its last entry; u is rounded to float first.
// A prefix changes only at a nonzero probability, so both searches land on one (or on 0 for an all-zero row),
// and the zeros a nucleus leaves are skipped 8 at a time: on such rows this is a fraction of cumsum's time,
// on dense ones about twice it. -1 for a row whose total is NaN (the caller leaves those to torch).
at::Tensor cdf_draw(const at::Tensor& probs, const at::Tensor& u) {
  check_rows(probs, "cdf_draw");
  const int64_t rows = probs.size(0), n = probs.size(1), stride = probs.stride(0);
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kDouble && u.numel() == rows,
              "cdf_draw: one float64 uniform per row expected");
  const at::Tensor uc = u.contiguous();
  at::Tensor out = at::empty({rows}, probs.options().dtype(at::kLong));
  const float* base = probs.data_ptr<float>();
  const double* ud = uc.data_ptr<double>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* p = base + r * stride;
      double acc = 0.0;
      for_nonzero(p, n, [&](int64_t j) {
        acc += p[j];
        return false;
      });
      const float total = static_cast<float>(acc);
      if (std::isnan(total)) {
        o[r] = -1;
        continue;
      }
      const float target = static_cast<float>(ud[r]) * total;
      int64_t pick = 0;  // an all-zero row: the first prefix (0) already reaches the total (0)
      acc = 0.0;
      for_nonzero(p, n, [&](int64_t j) {
        acc += p[j];
        const float c = static_cast<float>(acc);
        if (c > target || c >= total) {
          pick = j;
          return true;
        }
        return false;
      });
      o[r] = std::min(pick, n - 1);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> max_sum_exp(const at::Tensor& scores) {
  check_rows(scores, "max_sum_exp");
  const int64_t rows = scores.size(0), n = scores.size(1), stride = scores.stride(0);
  at::Tensor best = at::empty({rows}, scores.options());
  at::Tensor sums = at::empty({rows}, scores.options().dtype(at::kDouble));
  const float* base = scores.data_ptr<float>();
  float* bo = best.data_ptr<float>();
  double* so = sums.data_ptr<double>();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  at::parallel_for(0, rows, grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = base + r * stride;
      float m = -std::numeric_limits<float>::infinity();
      bool has_nan = false;
      int64_t j = 0;
#if HF_PAGED_AVX2
      __m256 vm = _mm256_set1_ps(m), unord = _mm256_setzero_ps();
      for (; j + 8 <= n; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vm = _mm256_max_ps(vm, v);
      }
      has_nan = _mm256_movemask_ps(unord) != 0;
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vm);
      for (float l : lanes) m = std::max(m, l);
#endif
      for (; j < n; ++j) {
        has_nan |= std::isnan(x[j]);
        m = std::max(m, x[j]);
      }
      if (has_nan) m = nan;
      bo[r] = m;
      if (!std::isfinite(m)) {  // as torch: NaN (a NaN score, or a row of +inf or -inf)
        so[r] = nan;
        continue;
      }
      double s = 0.0;
      j = 0;
#if HF_PAGED_AVX2
      const __m256 vb = _mm256_set1_ps(m);
      __m256d s0 = _mm256_setzero_pd(), s1 = s0;
      for (; j + 8 <= n; j += 8) {
        const __m256 e = hf_paged_simd::exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), vb));
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
      }
      alignas(32) double d[4];
      _mm256_store_pd(d, _mm256_add_pd(s0, s1));
      s = (d[0] + d[1]) + (d[2] + d[3]);
#endif
      for (; j < n; ++j) s += hf_paged_simd::exp_nonpositive(x[j] - m);
      so[r] = s;
    }
  });
  return {best, sums};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_paged_cpu, m) {
  m.def("cut_below(Tensor scores, Tensor thr) -> Tensor");
  m.def("cdf_draw(Tensor probs, Tensor u) -> Tensor");
  m.def("max_sum_exp(Tensor scores) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hf_paged_cpu, CPU, m) {
  m.impl("cut_below", &cut_below);
  m.impl("cdf_draw", &cdf_draw);
  m.impl("max_sum_exp", &max_sum_exp);
}
