// The nucleus' (warpers.nucleus) full-vocabulary passes on fp32 rows, each one call with rows split
// between threads. A top-p row of 49152 scores went through ~12 torch passes, ~20 ms a step at 64 rows here;
// the normaliser took four of them and the mask five (a copy of the rows, a compare, a fill, a write back).
//
// - cut_below: a row with every score below its threshold set to -inf (the nucleus once its threshold is
//   known). Comparisons only: bit for bit what masked_fill gives.
// - max_sum_exp: each row's maximum and sum of exp(score - max) in float64, the nucleus' normaliser (its
//   decisions keep a margin for such a sum: warpers.NUCLEUS_OWN_ERROR).
// - cdf_draw: sampler._draw's inverse-CDF pick from softmax probabilities, bit for bit, without writing the
//   CDF, skipping the zeros a nucleus leaves.
// - nucleus_bins: the nucleus of a flat row (warpers._cut_by_bins' method, its own float rounding: the
//   decision keeps the same margins) in two passes and a sort of one bin, instead of ~15 torch passes over
//   float64 copies of the rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

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

// The nucleus of rows whose top_p mass spreads past the best candidates (warpers._cut_by_bins' method and
// margins; its bin edges and masses may differ from torch's by float rounding, which the margins cover):
// each token's probability exp(x - lse) goes into one of `nb` bins by its score (the bins span best - min,
// at most `span_max`, the last bin taking everything further down); the bin where the mass passes top_p
// is ordered and cut as nucleus_cut does with exhaustive=True. Returns per row whether it is
// decided (both masses around the cut farther from top_p than `margin`, the two scores there distinct) and
// its threshold (the last kept score). A crossing bin of more than `max_bin` tokens leaves the row open.
std::tuple<at::Tensor, at::Tensor> nucleus_bins(const at::Tensor& scores, const at::Tensor& best,
                                                const at::Tensor& lse, double top_p, double margin, int64_t nb,
                                                double span_max, int64_t max_bin) {
  check_rows(scores, "nucleus_bins");
  const int64_t rows = scores.size(0), n = scores.size(1), stride = scores.stride(0);
  TORCH_CHECK(best.scalar_type() == at::kFloat && best.numel() == rows && lse.scalar_type() == at::kDouble &&
                  lse.numel() == rows, "nucleus_bins: a float32 best and a float64 lse per row expected");
  TORCH_CHECK(best.device().is_cpu() && lse.device().is_cpu(), "nucleus_bins: CPU tensors expected");
  TORCH_CHECK(nb >= 2 && max_bin >= 1 && span_max > 0,
              "nucleus_bins: nb >= 2, max_bin >= 1, span_max > 0 expected");
  const at::Tensor bc = best.contiguous(), lc = lse.contiguous();
  at::Tensor ok = at::empty({rows}, scores.options().dtype(at::kBool));
  at::Tensor last = at::empty({rows}, scores.options());
  const float* base = scores.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  const double* lp = lc.data_ptr<double>();
  bool* okp = ok.data_ptr<bool>();
  float* outp = last.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<double> mass(nb);
    std::vector<int32_t> bins(n);
    std::vector<float> vals;
    std::vector<double> before;
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = base + r * stride;
      const float b = bp[r];
      const double l = lp[r];
      okp[r] = false;
      outp[r] = b;
      float mn = std::numeric_limits<float>::infinity();
      int64_t j0 = 0;
#if HF_PAGED_AVX2
      __m256 vmn = _mm256_set1_ps(mn);
      for (; j0 + 8 <= n; j0 += 8) vmn = _mm256_min_ps(vmn, _mm256_loadu_ps(x + j0));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vmn);
      for (float v : lanes) mn = std::min(mn, v);
#endif
      for (; j0 < n; ++j0) mn = std::min(mn, x[j0]);
      const float span = std::min(std::max(b - mn, 1e-6f), static_cast<float>(span_max));
      const float scale = static_cast<float>(nb - 1) / span;
      const float top = static_cast<float>(nb - 1);
      std::fill(mass.begin(), mass.end(), 0.0);
      const double inv_z = std::exp(static_cast<double>(b) - l);  // 1 / sum exp(x - b)
      int64_t j = 0;
#if HF_PAGED_AVX2
      const __m256 vb = _mm256_set1_ps(b), vs = _mm256_set1_ps(scale), vt = _mm256_set1_ps(top);
      alignas(32) float e[8];
      for (; j + 8 <= n; j += 8) {  // bins and exps 8 at a time; the adds into the bins one by one
        const __m256 v = _mm256_loadu_ps(x + j);
        const __m256 f =
            _mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(_mm256_sub_ps(vb, v), vs), vt), _mm256_setzero_ps());
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(bins.data() + j), _mm256_cvttps_epi32(f));
        _mm256_store_ps(e, hf_paged_simd::exp8_nonpositive(_mm256_sub_ps(v, vb)));
        for (int i = 0; i < 8; ++i) mass[bins[j + i]] += static_cast<double>(e[i]) * inv_z;
      }
#endif
      for (; j < n; ++j) {
        const int32_t k = static_cast<int32_t>(std::max(std::min((b - x[j]) * scale, top), 0.0f));
        bins[j] = k;
        mass[k] += static_cast<double>(hf_paged_simd::exp_nonpositive(x[j] - b)) * inv_z;  // as torch's rel / z
      }
      // The first bin where the cumulative mass reaches top_p (the last one if none does), and the mass
      // of the bins before it.
      double before_bin = 0.0;
      int64_t crossing = nb - 1;
      for (int64_t k = 0; k < nb - 1; ++k) {
        if (before_bin + mass[k] >= top_p) {
          crossing = k;
          break;
        }
        before_bin += mass[k];
      }
      vals.clear();
      for (int64_t j = 0; j < n; ++j)
        if (bins[j] == crossing) vals.push_back(x[j]);
      const int64_t count = static_cast<int64_t>(vals.size());
      if (count == 0 || count > max_bin) continue;
      std::sort(vals.begin(), vals.end(), std::greater<float>());
      // nucleus_cut over this bin, exhaustive: S_j, the mass before each listed token.
      double run = before_bin;
      int64_t n_keep = 0;
      before.resize(count);
      for (int64_t j = 0; j < count; ++j) {
        before[j] = run;
        if (run < top_p) n_keep = j + 1;
        run += std::exp(static_cast<double>(vals[j]) - l);
      }
      if (n_keep < 1) continue;
      const int64_t at = n_keep;
      const double s_next = at < count ? before[at] : run;
      const double s_last = before[at - 1];
      const float lastv = vals[at - 1];
      const bool untied = at >= count || lastv > vals[at];
      outp[r] = lastv;
      okp[r] = s_next >= top_p + margin && s_last <= top_p - margin && untied && std::isfinite(lastv);
    }
  });
  return {ok, last};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_paged_cpu, m) {
  m.def("cut_below(Tensor scores, Tensor thr) -> Tensor");
  m.def("cdf_draw(Tensor probs, Tensor u) -> Tensor");
  m.def("max_sum_exp(Tensor scores) -> (Tensor, Tensor)");
  m.def("nucleus_bins(Tensor scores, Tensor best, Tensor lse, float top_p, float margin, int nb, float span_max, "
        "int max_bin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hf_paged_cpu, CPU, m) {
  m.impl("cut_below", &cut_below);
  m.impl("cdf_draw", &cdf_draw);
  m.impl("max_sum_exp", &max_sum_exp);
  m.impl("nucleus_bins", &nucleus_bins);
}
