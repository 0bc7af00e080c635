// CPU paged attention for decode rows: reads K/V blocks in place through the block table.
//
// The torch path gathers every sequence's blocks into a dense buffer and then runs SDPA over it, so
// the fp32 context crosses memory three times (gather read, gather write, SDPA read). Decode is
// bound by that traffic. Here each (sequence, KV head) pair reads its keys and values once, straight
// from the pool, for all query heads of its GQA group at the same time.
//
// Layout as in hf_paged/kernels/reference.py: caches [num_blocks, block_size, kv_heads, head_dim],
// queries packed [tokens, heads, head_dim] with cu_seqlens_q [S+1], seq_lens [S] (tokens including
// the new one), block_tables [S, max_blocks] int32. Rows whose q_len is not 1 are left untouched: the
// caller computes prefill rows with matrix products, where they are faster.
//
// Math per head: s_j = scale * q.k_j (then softcap * tanh(s_j / softcap) if softcap > 0), softmax
// over the keys in the causal (and sliding) window, o = sum_j p_j v_j; accumulated in fp32, exactly
// two passes (scores, then values), no online rescaling.
//
// bf16 caches: the AVX2 blocks widen eight values at a time to fp32. Where the compiler targets AVX-512 BF16
// (-march=native on such a CPU), the scores are vdpbf16ps products instead (the query rounded to bf16, which
// is exact when the model runs in bf16), summed sixteen tokens at a time, and the values' sums are 16 lanes
// wide, each V row widened once for all query heads of its group (K rows are read again per head, from L1).
// set_paged_decode_dpbf16(false) keeps the AVX2 blocks (the switch, not the path a shape ends up taking).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "simd.h"

#if HF_PAGED_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define HF_PAGED_AVX512_BF16 1
#else
#define HF_PAGED_AVX512_BF16 0
#endif
// Register budgets of the AVX-512 bf16 blocks: 32-value chunks of a head (head_dim up to 256) and
// 16-value accumulators of a GQA group (group * head_dim / 16); larger shapes take the AVX2 blocks.
constexpr int64_t kMaxHeadChunks = 8;
constexpr int64_t kMaxAccumulators = 32;
// Whether bf16 decode takes the AVX-512 BF16 blocks (where built with them); tests and benchmarks switch it.
// Read once per call (a call runs one path), so a switch while another thread decodes is harmless.
static std::atomic<bool> g_decode_dpbf16{true};

namespace {

template <typename T>
inline float load(const T& x) {
  return static_cast<float>(x);
}

using hf_paged_simd::exp_nonpositive;

// x[j] = exp(x[j] - max(x)) in place.
inline void exp_shifted(float* x, int64_t n) {
  const float mx = *std::max_element(x, x + n);
  int64_t j = 0;
#if HF_PAGED_AVX2
  const __m256 vmx = _mm256_set1_ps(mx);
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(x + j, hf_paged_simd::exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), vmx)));
#endif
  for (; j < n; ++j) x[j] = exp_nonpositive(x[j] - mx);
}

inline void prefetch_block(const char* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 1);
}

// Greedy longest-first assignment of sequences to lanes (one lane per thread), so one long context
// does not leave the other threads idle at the end of a static split.
std::vector<std::vector<int64_t>> balance(const std::vector<std::pair<int64_t, int64_t>>& cost_seq, int64_t lanes) {
  std::vector<std::pair<int64_t, int64_t>> items(cost_seq);
  std::sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<std::vector<int64_t>> out(lanes);
  std::vector<int64_t> total(lanes, 0);
  for (const auto& [cost, seq] : items) {
    int64_t best = std::min_element(total.begin(), total.end()) - total.begin();
    out[best].push_back(seq);
    total[best] += cost;
  }
  return out;
}

// Scores of tokens [t0, t1) of one block for every head: out[h * n + (t - t0)] = scale * q_h . k_t.
template <typename scalar_t>
void qk_block_generic(const float* qf, const scalar_t* base, int64_t t0, int64_t t1, int64_t c_tok,
                      int64_t kv_heads, int64_t group, int64_t head_dim, float scale, float* out, int64_t n) {
  for (int64_t kh = 0; kh < kv_heads; ++kh)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = kh * group + g;
      const float* qh = qf + h * head_dim;
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* k = base + t * c_tok + kh * head_dim;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * load(k[d]);
        out[h * n + (t - t0)] = dot * scale;
      }
    }
}

// acc[h] += sum over tokens [t0, t1) of p[h * n + (t - t0)] * v_t, for every head.
template <typename scalar_t>
void pv_block_generic(const float* p, int64_t n, const scalar_t* base, int64_t t0, int64_t t1, int64_t c_tok,
                      int64_t kv_heads, int64_t group, int64_t head_dim, float* acc) {
  for (int64_t kh = 0; kh < kv_heads; ++kh)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = kh * group + g;
      float* ah = acc + h * head_dim;
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* v = base + t * c_tok + kh * head_dim;
        const float w = p[h * n + (t - t0)];
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) ah[d] += w * load(v[d]);
      }
    }
}

template <typename scalar_t>
void qk_block(const float* qf, const scalar_t* base, int64_t t0, int64_t t1, int64_t c_tok, int64_t kv_heads,
              int64_t group, int64_t head_dim, float scale, float* out, int64_t n, bool /*dp*/) {
  qk_block_generic(qf, base, t0, t1, c_tok, kv_heads, group, head_dim, scale, out, n);
}

template <typename scalar_t>
void pv_block(const float* p, int64_t n, const scalar_t* base, int64_t t0, int64_t t1, int64_t c_tok,
              int64_t kv_heads, int64_t group, int64_t head_dim, float* acc, bool /*dp*/) {
  pv_block_generic(p, n, base, t0, t1, c_tok, kv_heads, group, head_dim, acc);
}

#if HF_PAGED_AVX2
inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Eight cache values as fp32 lanes: fp32 as is, bf16 widened (a bf16 is the top half of an fp32's bits).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// fp32 or bf16 caches (loads widened to fp32; fp32 accumulation), head_dim a multiple of 8: eight
// tokens per step, so eight independent FMA chains hide the FMA latency a single dot product is bound by.
template <typename scalar_t>
void qk_block_widened(const float* qf, const scalar_t* base, int64_t t0, int64_t t1, int64_t c_tok, int64_t kv_heads,
                      int64_t group, int64_t head_dim, float scale, float* out, int64_t n) {
  if (head_dim % 8) return qk_block_generic(qf, base, t0, t1, c_tok, kv_heads, group, head_dim, scale, out, n);
  for (int64_t kh = 0; kh < kv_heads; ++kh)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = kh * group + g;
      const float* qh = qf + h * head_dim;
      float* o = out + h * n - t0;
      const scalar_t* k = base + kh * head_dim;
      int64_t t = t0;
      for (; t + 8 <= t1; t += 8) {
        __m256 a[8];
        for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < head_dim; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qh + d);
          for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, load8(k + (t + i) * c_tok + d), a[i]);
        }
        for (int i = 0; i < 8; ++i) o[t + i] = hsum8(a[i]) * scale;
      }
      for (; t < t1; ++t) {
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t d = 0; d < head_dim; d += 8)
          a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), load8(k + t * c_tok + d), a0);
        o[t] = hsum8(a0) * scale;
      }
    }
}

// head_dim a multiple of 8: the accumulator of up to 64 lanes stays in registers over the tokens.
template <typename scalar_t>
void pv_block_widened(const float* p, int64_t n, const scalar_t* base, int64_t t0, int64_t t1, int64_t c_tok,
                      int64_t kv_heads, int64_t group, int64_t head_dim, float* acc) {
  if (head_dim % 8) return pv_block_generic(p, n, base, t0, t1, c_tok, kv_heads, group, head_dim, acc);
  for (int64_t kh = 0; kh < kv_heads; ++kh)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = kh * group + g;
      const float* ph = p + h * n - t0;
      for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
        const int nv = static_cast<int>(std::min<int64_t>(64, head_dim - d0) / 8);
        float* ah = acc + h * head_dim + d0;
        const scalar_t* v = base + kh * head_dim + d0;
        __m256 a[8];
        for (int i = 0; i < nv; ++i) a[i] = _mm256_loadu_ps(ah + 8 * i);
        for (int64_t t = t0; t < t1; ++t) {
          const __m256 w = _mm256_set1_ps(ph[t]);
          const scalar_t* vt = v + t * c_tok;
          for (int i = 0; i < nv; ++i) a[i] = _mm256_fmadd_ps(w, load8(vt + 8 * i), a[i]);
        }
        for (int i = 0; i < nv; ++i) _mm256_storeu_ps(ah + 8 * i, a[i]);
      }
    }
}

template <>
void qk_block<float>(const float* qf, const float* base, int64_t t0, int64_t t1, int64_t c_tok, int64_t kv_heads,
                     int64_t group, int64_t head_dim, float scale, float* out, int64_t n, bool /*dp*/) {
  qk_block_widened(qf, base, t0, t1, c_tok, kv_heads, group, head_dim, scale, out, n);
}

template <>
void pv_block<float>(const float* p, int64_t n, const float* base, int64_t t0, int64_t t1, int64_t c_tok,
                     int64_t kv_heads, int64_t group, int64_t head_dim, float* acc, bool /*dp*/) {
  pv_block_widened(p, n, base, t0, t1, c_tok, kv_heads, group, head_dim, acc);
}

#if HF_PAGED_AVX512_BF16
// Lane t of the result: the sum of the 16 lanes of v[t] (16 horizontal sums at once: halves, quarters, pairs
// and single lanes of two vectors are added in four rounds, then one permutation puts token t in lane t).
inline __m512 sum16x16(const __m512* v) {
  __m512 w[8], z[4], u[2];
  for (int j = 0; j < 8; ++j)  // w[j]: lanes 0-7 partial sums of v[2j], lanes 8-15 of v[2j+1]
    w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // z[j]: quarter q holds 4 partial sums of v[4j + q]
    z[j] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0xDD));
  for (int j = 0; j < 2; ++j)  // u[j]: quarter q holds 2 of v[8j + q], then 2 of v[8j + 4 + q]
    u[j] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * j], z[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(z[2 * j], z[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // Lane 4q + m holds the sum of v[q + 4m].
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

// bf16 caches on AVX-512 BF16 (see the top of the file): scores by vdpbf16ps, 32 bf16 products an
// instruction, of the query rounded to bf16 (exact for a bf16 model, whose queries are bf16) and the keys as
// stored; fp32 accumulation. Sixteen tokens at a time per head, summed together (sum16x16) and stored as one
// vector. head_dim a multiple of 32.
void qk_block_dpbf16(const float* qf, const c10::BFloat16* base, int64_t t0, int64_t t1, int64_t c_tok,
                     int64_t kv_heads, int64_t group, int64_t head_dim, float scale, float* out, int64_t n) {
  const int64_t nd = head_dim / 32;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t h = 0; h < kv_heads * group; ++h) {
    __m512bh qv[kMaxHeadChunks];
    for (int64_t j = 0; j < nd; ++j) {
      const float* qh = qf + h * head_dim + 32 * j;
      qv[j] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qh + 16), _mm512_loadu_ps(qh));
    }
    const c10::BFloat16* k = base + (h / group) * head_dim;
    float* o = out + h * n - t0;
    for (int64_t t = t0; t < t1; t += 16) {
      const int64_t m = std::min<int64_t>(16, t1 - t);
      __m512 a[16];
      for (int64_t i = 0; i < 16; ++i) {
        a[i] = _mm512_setzero_ps();
        if (i >= m) continue;
        const c10::BFloat16* kt = k + (t + i) * c_tok;
        for (int64_t j = 0; j < nd; ++j)
          a[i] = _mm512_dpbf16_ps(a[i], qv[j], (__m512bh)_mm512_loadu_si512(kt + 32 * j));
      }
      _mm512_mask_storeu_ps(o + t, static_cast<__mmask16>((1u << m) - 1), _mm512_mul_ps(sum16x16(a), vscale));
    }
  }
}

inline __m512 widen16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Values: fp32 weights times the values widened to fp32 (the weights stay fp32), 16 lanes; a value row is
// widened once for the heads of its group. head_dim a multiple of 16, at most 32 * kMaxHeadChunks.
void pv_block_avx512(const float* p, int64_t n, const c10::BFloat16* base, int64_t t0, int64_t t1, int64_t c_tok,
                     int64_t kv_heads, int64_t group, int64_t head_dim, float* acc) {
  const int64_t nv = head_dim / 16;
  for (int64_t kh = 0; kh < kv_heads; ++kh) {
    __m512 a[kMaxAccumulators];
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < nv; ++i) a[g * nv + i] = _mm512_loadu_ps(acc + (kh * group + g) * head_dim + 16 * i);
    const c10::BFloat16* v = base + kh * head_dim;
    for (int64_t t = t0; t < t1; ++t) {
      __m512 vv[kMaxHeadChunks * 2];
      for (int64_t i = 0; i < nv; ++i) vv[i] = widen16(v + t * c_tok + 16 * i);
      for (int64_t g = 0; g < group; ++g) {
        const __m512 w = _mm512_set1_ps(p[(kh * group + g) * n + t - t0]);
        for (int64_t i = 0; i < nv; ++i) a[g * nv + i] = _mm512_fmadd_ps(w, vv[i], a[g * nv + i]);
      }
    }
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < nv; ++i) _mm512_storeu_ps(acc + (kh * group + g) * head_dim + 16 * i, a[g * nv + i]);
  }
}
#endif

template <>
void qk_block<c10::BFloat16>(const float* qf, const c10::BFloat16* base, int64_t t0, int64_t t1, int64_t c_tok,
                             int64_t kv_heads, int64_t group, int64_t head_dim, float scale, float* out, int64_t n,
                             [[maybe_unused]] bool dp) {
#if HF_PAGED_AVX512_BF16
  if (dp && head_dim % 32 == 0 && head_dim / 32 <= kMaxHeadChunks)
    return qk_block_dpbf16(qf, base, t0, t1, c_tok, kv_heads, group, head_dim, scale, out, n);
#endif
  qk_block_widened(qf, base, t0, t1, c_tok, kv_heads, group, head_dim, scale, out, n);
}

template <>
void pv_block<c10::BFloat16>(const float* p, int64_t n, const c10::BFloat16* base, int64_t t0, int64_t t1,
                             int64_t c_tok, int64_t kv_heads, int64_t group, int64_t head_dim, float* acc,
                             [[maybe_unused]] bool dp) {
#if HF_PAGED_AVX512_BF16
  if (dp && head_dim % 16 == 0 && head_dim / 16 <= 2 * kMaxHeadChunks &&
      group * (head_dim / 16) <= kMaxAccumulators)
    return pv_block_avx512(p, n, base, t0, t1, c_tok, kv_heads, group, head_dim, acc);
#endif
  pv_block_widened(p, n, base, t0, t1, c_tok, kv_heads, group, head_dim, acc);
}
#endif

// One sequence: every head at once, so each token's K (then V) row of all KV heads is read as one
// contiguous run and a block is one contiguous stretch of memory; the next block is prefetched.
template <typename scalar_t>
void decode_one(const scalar_t* qrow, int64_t q_head, const scalar_t* kc, const scalar_t* vc, const int32_t* table,
                int64_t len, int64_t start, int64_t block_size, int64_t c_blk, int64_t c_tok, int64_t kv_heads,
                int64_t group, int64_t head_dim, float scale, float cap, scalar_t* orow, int64_t o_head,
                std::vector<float>& qf, std::vector<float>& acc, std::vector<float>& scores, bool dp) {
  const int64_t heads = kv_heads * group;
  const int64_t n = len - start;
  const int64_t block_bytes = block_size * c_tok * static_cast<int64_t>(sizeof(scalar_t));
  qf.resize(heads * head_dim);
  acc.assign(heads * head_dim, 0.f);
  scores.resize(heads * n);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t d = 0; d < head_dim; ++d) qf[h * head_dim + d] = load(qrow[h * q_head + d]);
  const int64_t first_blk = start / block_size, last_blk = (len - 1) / block_size;
  for (int pass = 0; pass < 2; ++pass) {
    const scalar_t* cache = pass == 0 ? kc : vc;
    for (int64_t b = first_blk; b <= last_blk; ++b) {
      const scalar_t* base = cache + table[b] * c_blk;
      if (b < last_blk) prefetch_block(reinterpret_cast<const char*>(cache + table[b + 1] * c_blk), block_bytes);
      const int64_t t0 = std::max<int64_t>(start, b * block_size) - b * block_size;
      const int64_t t1 = std::min<int64_t>(len, (b + 1) * block_size) - b * block_size;
      const int64_t j0 = b * block_size + t0 - start;
      if (pass == 0)
        qk_block(qf.data(), base, t0, t1, c_tok, kv_heads, group, head_dim, scale, scores.data() + j0, n, dp);
      else
        pv_block(scores.data() + j0, n, base, t0, t1, c_tok, kv_heads, group, head_dim, acc.data(), dp);
    }
    if (pass == 1) break;
    // Softmax per head, left unnormalised (the sum is divided out at the end).
    for (int64_t h = 0; h < heads; ++h) {
      float* sh = scores.data() + h * n;
      if (cap > 0.f)
        for (int64_t j = 0; j < n; ++j) sh[j] = cap * std::tanh(sh[j] / cap);
      exp_shifted(sh, n);
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    const float* sh = scores.data() + h * n;
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) sum += sh[j];
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t d = 0; d < head_dim; ++d) orow[h * o_head + d] = static_cast<scalar_t>(acc[h * head_dim + d] * inv);
  }
}

template <typename scalar_t>
void decode_kernel(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                   const at::Tensor& out, double scale, int64_t window, double softcap) {
  const int64_t num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = num_heads / kv_heads;
  const int64_t num_seqs = seq_lens.size(0);
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  const scalar_t* q = query.data_ptr<scalar_t>();
  const scalar_t* kc = k_cache.data_ptr<scalar_t>();
  const scalar_t* vc = v_cache.data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t q_tok = query.stride(0), q_head = query.stride(1);
  const int64_t o_tok = out.stride(0), o_head = out.stride(1);
  const int64_t c_blk = k_cache.stride(0), c_tok = k_cache.stride(1);
  TORCH_CHECK(k_cache.stride(2) == head_dim, "cache heads must be contiguous");

  const int64_t num_blocks = k_cache.size(0);
  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (cu[s + 1] - cu[s] != 1 || lens[s] <= 0) continue;
    const int64_t len = lens[s];
    const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    // Every block the walk will read must exist: checked here, before the threads start.
    TORCH_CHECK((len - 1) / block_size < block_tables.size(1), "sequence ", s, " has ", len,
                " tokens but its block table holds ", block_tables.size(1), " blocks");
    for (int64_t b = start / block_size; b <= (len - 1) / block_size; ++b) {
      const int32_t blk = tables[s * table_stride + b];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "sequence ", s, " maps block ", b, " to ", blk,
                  ", outside the cache (", num_blocks, " blocks)");
    }
    items.emplace_back(len - start, s);
  }
  if (items.empty()) return;
  const int64_t lanes = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items.size()));
  const auto plan = balance(items, lanes);
  const bool dp = g_decode_dpbf16.load(std::memory_order_relaxed);  // one path for the whole call

  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, acc, scores;
    for (int64_t lane = begin; lane < end; ++lane) {
      for (const int64_t s : plan[lane]) {
        const int64_t len = lens[s];
        const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
        decode_one<scalar_t>(q + cu[s] * q_tok, q_head, kc, vc, tables + s * table_stride, len, start, block_size,
                             c_blk, c_tok, kv_heads, group, head_dim, static_cast<float>(scale),
                             static_cast<float>(softcap), o + cu[s] * o_tok, o_head, qf, acc, scores, dp);
      }
    }
  });
}

void paged_decode(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                  const at::Tensor& out, double scale, int64_t window, double softcap) {
  TORCH_CHECK(query.device().is_cpu(), "paged_decode runs on CPU tensors");
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "query [T, H, D] and caches [N, block_size, KVH, D] expected");
  TORCH_CHECK(query.size(2) == k_cache.size(3), "head_dim of query and cache differ");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              "query, caches and out must share a dtype");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "unit-stride head_dim and contiguous caches expected");
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the query's shape");
  for (const at::Tensor* t : {&block_tables, &cu_seqlens_q, &seq_lens}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->device().is_cpu(), "index tensors must be int32 on CPU");
  }
  TORCH_CHECK(block_tables.stride(1) == 1 && cu_seqlens_q.is_contiguous() && seq_lens.is_contiguous(),
              "index tensors must be contiguous");
  TORCH_CHECK(cu_seqlens_q.size(0) == seq_lens.size(0) + 1 && block_tables.size(0) >= seq_lens.size(0),
              "cu_seqlens_q [S+1], seq_lens [S] and block_tables [>=S, M] expected");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "paged_decode", [&] {
    decode_kernel<scalar_t>(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale, window,
                            softcap);
  });
}

template <typename scalar_t, typename index_t>
void write_kv_kernel(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  const int64_t tokens = key.size(0), kv_heads = key.size(1), head_dim = key.size(2);
  const int64_t block_size = k_cache.size(1), num_slots = k_cache.size(0) * block_size;
  const index_t* slots = slot_mapping.data_ptr<index_t>();
  const int64_t slot_stride = kv_heads * head_dim;  // contiguous caches: slot s starts at s * slot_stride
  scalar_t* kc = k_cache.mutable_data_ptr<scalar_t>();
  scalar_t* vc = v_cache.mutable_data_ptr<scalar_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = static_cast<int64_t>(slots[t]);
    if (slot < 0) continue;
    TORCH_CHECK(slot < num_slots, "slot ", slot, " is outside the cache (", num_slots, " slots)");
    for (int64_t h = 0; h < kv_heads; ++h) {
      const scalar_t* ks = key.data_ptr<scalar_t>() + t * key.stride(0) + h * key.stride(1);
      const scalar_t* vs = value.data_ptr<scalar_t>() + t * value.stride(0) + h * value.stride(1);
      std::memcpy(kc + slot * slot_stride + h * head_dim, ks, head_dim * sizeof(scalar_t));
      std::memcpy(vc + slot * slot_stride + h * head_dim, vs, head_dim * sizeof(scalar_t));
    }
  }
}

void write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.device().is_cpu() && k_cache.device().is_cpu() && slot_mapping.device().is_cpu(),
              "write_kv runs on CPU tensors");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && k_cache.dim() == 4 &&
                  v_cache.sizes() == k_cache.sizes() && key.size(1) == k_cache.size(2) &&
                  key.size(2) == k_cache.size(3),
              "key/value [T, KVH, D] and caches [N, block_size, KVH, D] expected");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "key, value and caches must share a dtype");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "unit-stride head_dim and contiguous caches expected");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) && slot_mapping.is_contiguous(),
              "slot_mapping [T] expected");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "write_kv", [&] {
    if (slot_mapping.scalar_type() == at::kLong)
      write_kv_kernel<scalar_t, int64_t>(key, value, k_cache, v_cache, slot_mapping);
    else if (slot_mapping.scalar_type() == at::kInt)
      write_kv_kernel<scalar_t, int32_t>(key, value, k_cache, v_cache, slot_mapping);
    else
      TORCH_CHECK(false, "slot_mapping must be int32 or int64");
  });
}

// "avx512_bf16" where bf16 decode takes the AVX-512 BF16 blocks, else "avx2" (or "scalar" without AVX2).
std::string paged_decode_bf16_path() {
  if (HF_PAGED_AVX512_BF16 && g_decode_dpbf16) return "avx512_bf16";
  return HF_PAGED_AVX2 ? "avx2" : "scalar";
}

// Turn the AVX-512 BF16 blocks on or off (tests compare the paths); returns the path now taken.
std::string set_paged_decode_dpbf16(bool on) {
  g_decode_dpbf16 = on;
  return paged_decode_bf16_path();
}

}  // namespace

TORCH_LIBRARY(hf_paged_cpu, m) {
  m.def("paged_decode_bf16_path() -> str", &paged_decode_bf16_path);
  m.def("set_paged_decode_dpbf16(bool on) -> str", &set_paged_decode_dpbf16);
  m.def("write_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_decode(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor cu_seqlens_q, "
      "Tensor seq_lens, Tensor(a!) out, float scale, int window, float softcap) -> ()");
}

TORCH_LIBRARY_IMPL(hf_paged_cpu, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("write_kv", &write_kv);
}
