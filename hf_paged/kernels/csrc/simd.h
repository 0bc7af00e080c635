// SIMD helpers shared by the CPU kernels (AVX2 + FMA where the build targets them).
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HF_PAGED_AVX2 1

namespace hf_paged_simd {
// Sum of the 8 lanes of v.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 sh = _mm_movehdup_ps(s);
  s = _mm_add_ps(s, sh);
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}
}  // namespace hf_paged_simd
#else
#define HF_PAGED_AVX2 0
#endif
