// Segmented LoRA on CPU, fp32, in one call per layer and step:
//   out[t, :] += scale[s] * (A[s, :r] . x[t, :]) . Bt[s, :r, :]     for every token t whose adapter slot is s
// (token_slot[t] = s; -1 = the base model, left alone; a slot of rank 0 does not target this layer).
//
// A decode step's LoRA products are tiny ([a few rows, 576] x [576, 16]): as BLAS calls, one pair per
// adapter segment and layer, they cost their call overhead (20-60 us each), not their arithmetic. Here
// all segments of a layer run in one call: consecutive tokens of one adapter form tiles of up to four
// rows, so every A row and Bt row loaded from cache serves four tokens, and threads split the tiles.
// Shrink: four 8-wide dot products per A row; expand: out's eight-column chunks stay in registers
// while the rank loop streams Bt. Results differ from PEFT's two matmuls only in summation order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace {

constexpr int kTile = 4;  // tokens per register tile

struct Tile {
  int64_t start;
  int m;
  int slot;
};

template <int M>
void run_tile(const float* __restrict x, int64_t ldx, const float* __restrict a, const float* __restrict bt,
              float* __restrict out, int64_t ldo, int64_t K, int64_t N, int r, float scale) {
  float v[M][64 * 4];  // rank <= 256
  for (int j = 0; j < r; ++j) {
    const float* arow = a + j * K;
#if HF_PAGED_AVX2
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 av = _mm256_loadu_ps(arow + k);
      for (int i = 0; i < M; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + k), av, acc[i]);
    }
    for (int i = 0; i < M; ++i) {
      float s = hf_paged_simd::hsum8(acc[i]);
      for (int64_t kk = k; kk < K; ++kk) s += x[i * ldx + kk] * arow[kk];
      v[i][j] = s * scale;
    }
#else
    for (int i = 0; i < M; ++i) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[i * ldx + k] * arow[k];
      v[i][j] = s * scale;
    }
#endif
  }
  int64_t n = 0;
#if HF_PAGED_AVX2
  for (; n + 8 <= N; n += 8) {
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_loadu_ps(out + i * ldo + n);
    for (int j = 0; j < r; ++j) {
      const __m256 bv = _mm256_loadu_ps(bt + j * N + n);
      for (int i = 0; i < M; ++i) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(v[i][j]), bv, acc[i]);
    }
    for (int i = 0; i < M; ++i) _mm256_storeu_ps(out + i * ldo + n, acc[i]);
  }
#endif
  for (; n < N; ++n)
    for (int i = 0; i < M; ++i) {
      float s = out[i * ldo + n];
      for (int j = 0; j < r; ++j) s += v[i][j] * bt[j * N + n];
      out[i * ldo + n] = s;
    }
}

using TileFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t, int64_t, int,
                        float);
constexpr TileFn kTiles[kTile + 1] = {nullptr, run_tile<1>, run_tile<2>, run_tile<3>, run_tile<4>};

void lora_sgmv(at::Tensor out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, const at::Tensor& ranks,
               const at::Tensor& scales, const at::Tensor& token_slot) {
  TORCH_CHECK(out.dtype() == at::kFloat && x.dtype() == at::kFloat && a.dtype() == at::kFloat &&
                  bt.dtype() == at::kFloat && scales.dtype() == at::kFloat,
              "lora_sgmv: fp32 tensors only");
  TORCH_CHECK(ranks.dtype() == at::kInt && token_slot.dtype() == at::kInt, "lora_sgmv: int32 ranks and token_slot");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0) && x.stride(1) == 1 && out.stride(1) == 1,
              "lora_sgmv: x [T, K] and out [T, N] with unit column stride");
  TORCH_CHECK(a.dim() == 3 && bt.dim() == 3 && a.is_contiguous() && bt.is_contiguous() && a.size(0) == bt.size(0) &&
                  a.size(1) == bt.size(1) && a.size(2) == x.size(1) && bt.size(2) == out.size(1),
              "lora_sgmv: a [S, R, K] and bt [S, R, N] contiguous, fitting x and out");
  TORCH_CHECK(a.size(1) <= 256, "lora_sgmv: rank above 256");
  TORCH_CHECK(token_slot.numel() == x.size(0) && token_slot.is_contiguous() && ranks.is_contiguous() &&
                  scales.is_contiguous() && ranks.numel() == a.size(0) && scales.numel() == a.size(0),
              "lora_sgmv: token_slot [T], ranks and scales [S]");
  const int64_t T = x.size(0), K = x.size(1), N = out.size(1), R = a.size(1), S = a.size(0);
  const int* slot_of = token_slot.data_ptr<int>();
  const int* rank_of = ranks.data_ptr<int>();
  std::vector<Tile> tiles;
  for (int64_t t = 0; t < T;) {
    const int s = slot_of[t];
    int64_t e = t + 1;
    while (e < T && slot_of[e] == s) ++e;
    if (s >= 0) {
      TORCH_CHECK(s < S, "lora_sgmv: token slot ", s, " outside the ", S, " stacked adapters");
      if (rank_of[s] > 0)
        for (int64_t u = t; u < e; u += kTile) tiles.push_back({u, static_cast<int>(std::min<int64_t>(kTile, e - u)), s});
    }
    t = e;
  }
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = bt.data_ptr<float>();
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 2, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Tile& tl = tiles[i];
      kTiles[tl.m](xp + tl.start * ldx, ldx, ap + tl.slot * R * K, bp + tl.slot * R * N, op + tl.start * ldo, ldo, K,
                   N, rank_of[tl.slot], sp[tl.slot]);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_paged_cpu, m) {
  m.def("lora_sgmv(Tensor(a!) out, Tensor x, Tensor a, Tensor bt, Tensor ranks, Tensor scales, Tensor token_slot) -> ()");
}

TORCH_LIBRARY_IMPL(hf_paged_cpu, CPU, m) {
  m.impl("lora_sgmv", &lora_sgmv);
}
