// AVX-512 helpers shared by the kernels in this folder (header-only, one copy per translation unit).
#pragma once

#include <immintrin.h>

namespace mmfast_simd {

// 16 accumulators -> their 16 horizontal sums in one vector (45 shuffles/adds instead of 16
// separate reductions). After the 4 levels lane 4L+m holds sum(v[4m+L]); the permute restores order.
inline __m512 hsum16(const __m512* v) {
  __m512 s[8], t[4], w[2];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_ps(t[2 * i], t[2 * i + 1]));
  __m512d a = _mm512_castps_pd(w[0]), b = _mm512_castps_pd(w[1]);
  __m512 r = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

}  // namespace mmfast_simd
