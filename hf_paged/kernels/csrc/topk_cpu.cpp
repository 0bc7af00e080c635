// Row-wise top-k of fp32 scores: the sampler's TopK candidates (k ~ 50 of a 50K-150K vocabulary) and the
// nucleus' best scores. torch.topk on CPU takes ~90 us a row of 49152 scores (a partial sort), the bulk
// of a sampled decode step. Here a row takes two passes (see row_topk): the maxima of ~8k segments, then
// only the segments that can hold a top-k score, whose candidates are selected and sorted. Rows are split
// between threads.
//
// Result: torch.topk(scores, k, dim=-1, sorted=True)'s values (copies of the row's scores; of equal scores
// -0.0 and +0.0, the one at the lower index). Among equal scores the lower index comes first and is the
// one kept at the boundary (torch leaves that order unspecified). A row holding a NaN takes a sort in which
// NaN ranks above everything, as torch.topk ranks it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "simd.h"

namespace {

using Entry = std::pair<float, int64_t>;

// Best first: the higher score and, among equal scores, the lower index.
inline bool better(const Entry& a, const Entry& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// A row with a NaN: rank NaN above every number (as torch does), then by score, ties by index.
void row_topk_nan(const float* x, int64_t n, int64_t k, float* ov, int64_t* oi, std::vector<Entry>& all) {
  all.resize(n);
  for (int64_t i = 0; i < n; ++i) all[i] = {x[i], i};
  std::partial_sort(all.begin(), all.begin() + k, all.end(), [](const Entry& a, const Entry& b) {
    const bool na = std::isnan(a.first), nb = std::isnan(b.first);
    if (na != nb) return na;
    if (na) return a.second < b.second;
    return better(a, b);
  });
  for (int64_t j = 0; j < k; ++j) ov[j] = all[j].first, oi[j] = all[j].second;
}

// The k best of one row into ov/oi, best first. Returns false (writing nothing) if the row holds a NaN.
//
// Two passes, without a data-dependent branch per score. The row is cut into m segments (about 8k, fewer
// for a short row) and the first pass takes each segment's maximum (a streaming pass, as fast as the
// argmax). T, the k-th best of those m maxima, is a floor: the k segments it ranks hold k scores >= T, so
// every score of the top k is >= T. The second pass reads only the segments whose maximum reaches T (in
// cache by then) and collects their scores >= T, little more than k of them on a row in random order; the
// k best of those are the answer. With m < k, or T = -inf, see below.
bool row_topk(const float* x, int64_t n, int64_t k, float* ov, int64_t* oi, std::vector<float>& maxima,
              std::vector<float>& order, std::vector<Entry>& cand) {
  const int64_t vecs = (n + 7) / 8, want = std::min(vecs, std::max<int64_t>(8 * k, 64));
  const int64_t len = (vecs + want - 1) / want * 8, segs = (n + len - 1) / len;  // len: a multiple of 8
  maxima.resize(segs);
  for (int64_t s = 0; s < segs; ++s) {
    const float* p = x + s * len;
    const int64_t m = std::min(len, n - s * len);
    float best = -std::numeric_limits<float>::infinity();
    int64_t i = 0;
#if HF_PAGED_AVX2
    __m256 a = _mm256_set1_ps(best), b = a, unord = _mm256_setzero_ps();
    for (; i + 16 <= m; i += 16) {
      const __m256 u = _mm256_loadu_ps(p + i), v = _mm256_loadu_ps(p + i + 8);
      unord = _mm256_or_ps(unord, _mm256_cmp_ps(u, v, _CMP_UNORD_Q));
      a = _mm256_max_ps(a, u);
      b = _mm256_max_ps(b, v);
    }
    if (_mm256_movemask_ps(unord)) return false;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_max_ps(a, b));
    for (float l : lanes) best = std::max(best, l);
#endif
    for (; i < m; ++i) {
      if (std::isnan(p[i])) return false;
      best = std::max(best, p[i]);
    }
    maxima[s] = best;
  }
  float t = -std::numeric_limits<float>::infinity();
  if (k <= segs) {
    order.assign(maxima.begin(), maxima.end());
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), std::greater<float>());
    t = order[k - 1];
  }
  // With T = -inf (fewer than k segments hold a finite score: a row mostly masked out) every score passes
  // ">= T"; take the finite ones, then as many -inf entries as the list lacks, lowest index first.
  const float neg = -std::numeric_limits<float>::infinity();
  const bool masked = t == neg;
  if (masked) t = std::numeric_limits<float>::lowest();  // ">= the lowest finite float": "> -inf"
  cand.clear();
  for (int64_t s = 0; s < segs; ++s) {
    if (!(maxima[s] >= t)) continue;
    const int64_t lo = s * len, hi = std::min(n, lo + len);
    int64_t i = lo;
#if HF_PAGED_AVX2
    const __m256 vt = _mm256_set1_ps(t);
    for (; i + 8 <= hi; i += 8)
      for (uint32_t hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vt, _CMP_GE_OQ)); hits;
           hits &= hits - 1) {
        const int64_t j = i + __builtin_ctz(hits);
        cand.push_back({x[j], j});
      }
#endif
    for (; i < hi; ++i)
      if (x[i] >= t) cand.push_back({x[i], i});
  }
  for (int64_t i = 0; masked && static_cast<int64_t>(cand.size()) < k; ++i)
    if (x[i] == neg) cand.push_back({x[i], i});
  std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), better);
  std::sort(cand.begin(), cand.begin() + k, better);
  for (int64_t j = 0; j < k; ++j) ov[j] = cand[j].first, oi[j] = cand[j].second;
  return true;
}

std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 2,
              "topk_rows: a 2-D float32 CPU tensor expected");
  TORCH_CHECK(scores.stride(1) == 1 || scores.size(1) <= 1, "topk_rows: rows must be contiguous");
  const int64_t rows = scores.size(0), n = scores.size(1), stride = scores.stride(0);
  TORCH_CHECK(k >= 1 && k <= n, "topk_rows: k must be in [1, ", n, "], got ", k);
  at::Tensor vals = at::empty({rows, k}, scores.options());
  at::Tensor idx = at::empty({rows, k}, scores.options().dtype(at::kLong));
  const float* base = scores.data_ptr<float>();
  float* ov = vals.data_ptr<float>();
  int64_t* oi = idx.data_ptr<int64_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t r0, int64_t r1) {
    std::vector<float> maxima, order;
    std::vector<Entry> buf;
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = base + r * stride;
      if (!row_topk(x, n, k, ov + r * k, oi + r * k, maxima, order, buf))
        row_topk_nan(x, n, k, ov + r * k, oi + r * k, buf);
    }
  });
  return {vals, idx};
}

// sort_rows: each row in ascending order, stable (equal scores keep their index order), as
// torch.sort(scores, stable=True) gives it, by LSD radix sort: passes of 11, 11 and 10 bits over keys
// that order as the floats do (-0.0 just before +0.0, which torch ranks equal). torch.sort takes ~2-3 ms
// a row of 49152 scores on a CPU core; the nucleus needs HF's own sort only for the rows whose boundary
// is within HF's rounding. ok[r] is false for a row holding a NaN, which is returned unsorted: the
// caller sorts it.
void row_sort(const float* x, int64_t n, float* ov, int64_t* oi, bool* ok, std::vector<uint32_t>& keys,
              std::vector<int32_t>& idx) {
  keys.resize(2 * n);
  idx.resize(2 * n);
  uint32_t* k0 = keys.data();
  uint32_t* k1 = k0 + n;
  int32_t* i0 = idx.data();
  int32_t* i1 = i0 + n;
  uint32_t hist[3 * 2048] = {};  // the three passes' digit counts, all taken in the first read
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: the row as given, flagged
      for (int64_t j = 0; j < n; ++j) ov[j] = x[j], oi[j] = j;
      *ok = false;
      return;
    }
    u ^= (u >> 31) ? 0xffffffffu : 0x80000000u;  // negative: all bits flipped; else the sign bit set
    k0[i] = u;
    i0[i] = static_cast<int32_t>(i);
    ++hist[u & 2047];
    ++hist[2048 + ((u >> 11) & 2047)];
    ++hist[4096 + (u >> 22)];
  }
  for (int pass = 0; pass < 3; ++pass) {
    uint32_t* h = hist + 2048 * pass;
    const int shift = 11 * pass;
    if (h[(k0[0] >> shift) & 2047] == static_cast<uint32_t>(n)) continue;  // one bucket: already in order
    uint32_t sum = 0;
    for (int b = 0; b < 2048; ++b) {
      const uint32_t c = h[b];
      h[b] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t d = h[(k0[i] >> shift) & 2047]++;
      k1[d] = k0[i];
      i1[d] = i0[i];
    }
    std::swap(k0, k1);
    std::swap(i0, i1);
  }
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t key = k0[j], u = key ^ ((key >> 31) ? 0x80000000u : 0xffffffffu);  // the float's bits again
    std::memcpy(ov + j, &u, sizeof(u));
    oi[j] = i0[j];
  }
  *ok = true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_rows(const at::Tensor& scores) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 2,
              "sort_rows: a 2-D float32 CPU tensor expected");
  TORCH_CHECK(scores.stride(1) == 1 || scores.size(1) <= 1, "sort_rows: rows must be contiguous");
  const int64_t rows = scores.size(0), n = scores.size(1), stride = scores.stride(0);
  TORCH_CHECK(n < (int64_t(1) << 31), "sort_rows: rows of at most 2^31 - 1 scores expected, got ", n);
  at::Tensor vals = at::empty({rows, n}, scores.options());
  at::Tensor idx = at::empty({rows, n}, scores.options().dtype(at::kLong));
  at::Tensor ok = at::empty({rows}, scores.options().dtype(at::kBool));
  const float* base = scores.data_ptr<float>();
  float* ov = vals.data_ptr<float>();
  int64_t* oi = idx.data_ptr<int64_t>();
  bool* good = ok.data_ptr<bool>();
  if (n == 0) {
    ok.fill_(true);
    return {vals, idx, ok};
  }
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    // Kept between calls (16 bytes a column per thread, never shrunk): fresh pages each call cost more than the sort.
    thread_local std::vector<uint32_t> keys;
    thread_local std::vector<int32_t> order;
    for (int64_t r = r0; r < r1; ++r) row_sort(base + r * stride, n, ov + r * n, oi + r * n, good + r, keys, order);
  });
  return {vals, idx, ok};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_paged_cpu, m) {
  m.def("topk_rows(Tensor scores, int k) -> (Tensor, Tensor)");
  m.def("sort_rows(Tensor scores) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hf_paged_cpu, CPU, m) {
  m.impl("topk_rows", &topk_rows);
  m.impl("sort_rows", &sort_rows);
}
