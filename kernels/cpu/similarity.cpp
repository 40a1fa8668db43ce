// Fused similarity on CPU: scores = queries . gallery^T (queries already L2-normalised and scaled
// by the caller), with an exact top-k epilogue, in one pass over the gallery.
//
// Think of it as a GEMM whose output is never stored: each thread owns a contiguous slice of the
// gallery and streams it tile by tile; a register-blocked micro-kernel computes R rows x C queries
// of dot products (R * C = 16 accumulators), and the epilogue offers each score to that query's
// running top-k heap (a compare against the current k-th best; a heap update is rare).
//   few queries  -> memory-bound: the gallery is read once, converted to fp32 in registers.
//   many queries -> compute-bound: a 16-bit / int8 tile is converted to fp32 once into an
//                   L2-resident buffer and reused by every block of 8 queries.
//   int8 x many queries (AVX512_VNNI) -> integer dot products on repacked tiles, exact by
//                   rescoring the few rows whose error bound reaches the k-th best (see below).
// Gallery storage: fp32, fp16, bf16 (passed as 16-bit integer views) or int8 with a per-row fp32
// scale (score = scale[row] * (q . row)). Every path computes a reported score with the same fp32
// micro-kernel, so a query's scores do not depend on the batch it came in or on the thread count;
// ties go to the smaller row id. A NaN score (NaN in the gallery) ranks as -inf.
// AVX512_BF16 (vdpbf16ps) is not used: the bf16 path widens to fp32, exact against fp32 queries.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MMFAST_SIM_AVX512 1
#endif

namespace py = pybind11;
using mmfast_simd::hsum16;

namespace {

struct f16 { uint16_t bits; };   // IEEE half, stored as raw bits
struct bf16 { uint16_t bits; };  // bfloat16, stored as raw bits

constexpr int kAcc = 16;  // accumulators per micro-kernel (R rows x C queries)
constexpr int kQBlock = 8;  // queries per block in the compute-bound path

// ---- scalar conversions (portable path and row tails) ----------------------------------------
inline float to_f32(float x) { return x; }
inline float to_f32(int8_t x) { return static_cast<float>(x); }
inline float to_f32(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f32(f16 x) {
  uint32_t h = x.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    u = sign | ((112 - e) << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#ifdef MMFAST_SIM_AVX512
// ---- 16 gallery elements -> fp32 lanes; the masked form reads only the valid ones -------------
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline __m512 load16(const f16* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 widen_bf16(__m256i v) {  // bf16 is the top half of an fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const bf16* p) { return widen_bf16(_mm256_loadu_si256((const __m256i*)p)); }
inline __m512 load16(const bf16* p, __mmask16 m) { return widen_bf16(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load16(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline __m512 load16(const int8_t* p, __mmask16 m) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p))); }

// out[r * C + c] = dot(g[r], q[c]) over D for R gallery rows x C queries; lanes past R * C are 0.
// Per 16 elements of D: R gallery loads (converted once, used C times), C query loads (used R
// times), R * C FMAs. With R * C = 16 the loads stay under the FMA ports' pace.
template <int R, int C, class T>
inline void micro_kernel(const T* g, int64_t ldg, const float* q, int64_t ldq, int64_t D, float* out) {
  static_assert(R * C <= kAcc, "the reduction takes at most 16 accumulators");
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    __m512 gv[R];
    if (C <= 2)  // memory-bound: fetch these columns of the next R rows early (+20% GB/s measured)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(g + (r + R) * ldg + d), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) gv[r] = load16(g + r * ldg + d);
    for (int c = 0; c < C; ++c) {
      __m512 qv = _mm512_loadu_ps(q + c * ldq + d);
      for (int r = 0; r < R; ++r) acc[r * C + c] = _mm512_fmadd_ps(gv[r], qv, acc[r * C + c]);
    }
  }
  if (d < D) {  // ragged D: masked loads read only the valid elements (zeros elsewhere)
    __mmask16 m = static_cast<__mmask16>((1u << (D - d)) - 1);
    __m512 gv[R];
    for (int r = 0; r < R; ++r) gv[r] = load16(g + r * ldg + d, m);
    for (int c = 0; c < C; ++c) {
      __m512 qv = _mm512_maskz_loadu_ps(m, q + c * ldq + d);
      for (int r = 0; r < R; ++r) acc[r * C + c] = _mm512_fmadd_ps(gv[r], qv, acc[r * C + c]);
    }
  }
  _mm512_storeu_ps(out, hsum16(acc));
}

// Convert rows [0, n) of a tile to fp32 once (compute-bound path); ld of dst is D.
template <class T>
inline void widen_tile(const T* g, int64_t ldg, int64_t n, int64_t D, float* dst) {
  for (int64_t r = 0; r < n; ++r) {
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) _mm512_storeu_ps(dst + r * D + d, load16(g + r * ldg + d));
    if (d < D) {
      __mmask16 m = static_cast<__mmask16>((1u << (D - d)) - 1);
      _mm512_mask_storeu_ps(dst + r * D + d, m, load16(g + r * ldg + d, m));
    }
  }
}
#else
// Portable fallback (no AVX-512 at build time): same blocking, plain loops the compiler vectorises.
template <int R, int C, class T>
inline void micro_kernel(const T* g, int64_t ldg, const float* q, int64_t ldq, int64_t D, float* out) {
  float acc[kAcc] = {};
  for (int64_t d = 0; d < D; ++d)
    for (int r = 0; r < R; ++r) {
      float gv = to_f32(g[r * ldg + d]);
      for (int c = 0; c < C; ++c) acc[r * C + c] += gv * q[c * ldq + d];
    }
  for (int i = 0; i < kAcc; ++i) out[i] = acc[i];
}
template <class T>
inline void widen_tile(const T* g, int64_t ldg, int64_t n, int64_t D, float* dst) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t d = 0; d < D; ++d) dst[r * D + d] = to_f32(g[r * ldg + d]);
}
#endif

// The k best (score, id) pairs of one query seen so far, as a binary heap whose root is the worst.
// "Worse" = lower score, or equal score and larger id (so the smaller id wins a tie).
struct TopK {
  float* s;
  int64_t* id;
  int64_t k, n = 0;
  static bool worse(float sa, int64_t ia, float sb, int64_t ib) { return sa < sb || (sa == sb && ia > ib); }
  inline bool wants(float v, int64_t i) const { return n < k || worse(s[0], id[0], v, i); }
  void push(float v, int64_t i) {
    int64_t j;
    if (n < k) {  // sift up
      j = n++;
      while (j > 0) {
        int64_t p = (j - 1) / 2;
        if (!worse(v, i, s[p], id[p])) break;
        s[j] = s[p], id[j] = id[p], j = p;
      }
    } else {  // replace the root, sift down
      j = 0;
      for (;;) {
        int64_t l = 2 * j + 1, w = j;
        float ws = v;
        int64_t wi = i;
        if (l < k && worse(s[l], id[l], ws, wi)) w = l, ws = s[l], wi = id[l];
        if (l + 1 < k && worse(s[l + 1], id[l + 1], ws, wi)) w = l + 1;
        if (w == j) break;
        s[j] = s[w], id[j] = id[w], j = w;
      }
    }
    s[j] = v, id[j] = i;
  }
};

inline float sanitize(float v) { return v != v ? -INFINITY : v; }  // a NaN score ranks last

// A sink receives the micro-kernel's 16-lane score blocks: lane i = (row i / C, query c0 + i % C).
// The top-k sink first compares the block with each lane's threshold (the k-th best score of its
// query; -inf and "always" while the heap is not full) in one vector compare; only the rare lanes
// that pass reach the heap. Thresholds are refreshed only after a heap changed.
struct TopKSink {
  TopK* heaps;  // [Q], this thread's
  template <int C>
  inline void thresholds(int64_t c0, float* thr, uint32_t& open) const {
    open = 0;
    for (int i = 0; i < kAcc; ++i) {
      const TopK& h = heaps[c0 + i % C];
      thr[i] = h.n < h.k ? -INFINITY : h.s[0];
      open |= static_cast<uint32_t>(h.n < h.k) << i;
    }
  }
  // Returns whether a heap changed (so the caller refreshes its thresholds).
  template <int C>
  inline bool block(const float* v, const float* thr, uint32_t open, int nrows, int64_t row, int64_t c0) {
    const uint32_t valid = (1u << (nrows * C)) - 1;
#ifdef MMFAST_SIM_AVX512
    // >= rather than >: a tie with the k-th best still wins when its id is smaller (chunks of
    // the gallery reach a thread in any order).
    uint32_t cand = (_mm512_cmp_ps_mask(_mm512_loadu_ps(v), _mm512_loadu_ps(thr), _CMP_GE_OQ) | open) & valid;
#else
    uint32_t cand = valid;
    (void)thr, (void)open;
#endif
    bool changed = false;
    while (cand) {
      const int i = __builtin_ctz(cand);
      cand &= cand - 1;
      const float s = sanitize(v[i]);
      TopK& h = heaps[c0 + i % C];
      if (h.wants(s, row + i / C)) h.push(s, row + i / C), changed = true;
    }
    return changed;
  }
};

struct DenseSink {
  float* out;  // [Q, N]
  int64_t N;
  template <int C>
  inline void thresholds(int64_t, float*, uint32_t&) const {}
  template <int C>
  inline bool block(const float* v, const float*, uint32_t, int nrows, int64_t row, int64_t c0) {
    for (int r = 0; r < nrows; ++r)
      for (int c = 0; c < C; ++c) out[(c0 + c) * N + row + r] = v[r * C + c];
    return false;
  }
};

// C queries [c0, c0 + C) against `nrows` rows of a tile (`g`, row stride ld; global ids from row0).
template <int C, class U, class Sink>
void query_block(const U* g, int64_t ld, int64_t row0, int64_t nrows, const float* gscale,
                 const float* q, int64_t D, int64_t c0, Sink& sink) {
  constexpr int R = kAcc / C;
  alignas(64) float v[kAcc], thr[kAcc];
  uint32_t open;
  sink.template thresholds<C>(c0, thr, open);
  int64_t r = 0;
  auto emit = [&](int nr) {
    if (gscale)  // int8: the dot products of row r are in units of that row's scale
      for (int i = 0; i < nr * C; ++i) v[i] *= gscale[row0 + r + i / C];
    if (sink.template block<C>(v, thr, open, nr, row0 + r, c0)) sink.template thresholds<C>(c0, thr, open);
  };
  for (; r + R <= nrows; r += R) {
    micro_kernel<R, C>(g + r * ld, ld, q + c0 * D, D, D, v);
    emit(R);
  }
  for (; r < nrows; ++r) {  // ragged rows at the end of the gallery
    micro_kernel<1, C>(g + r * ld, ld, q + c0 * D, D, D, v);
    emit(1);
  }
}

template <class U, class Sink>
void all_query_blocks(const U* g, int64_t ld, int64_t row0, int64_t nrows, const float* gscale,
                      const float* q, int64_t Q, int64_t D, Sink& sink) {
  int64_t c0 = 0;
  for (; c0 + kQBlock <= Q; c0 += kQBlock) query_block<kQBlock>(g, ld, row0, nrows, gscale, q, D, c0, sink);
  switch (Q - c0) {
    case 1: query_block<1>(g, ld, row0, nrows, gscale, q, D, c0, sink); break;
    case 2: query_block<2>(g, ld, row0, nrows, gscale, q, D, c0, sink); break;
    case 3: query_block<3>(g, ld, row0, nrows, gscale, q, D, c0, sink); break;
    case 4: query_block<4>(g, ld, row0, nrows, gscale, q, D, c0, sink); break;
    case 5: query_block<5>(g, ld, row0, nrows, gscale, q, D, c0, sink); break;
    case 6: query_block<6>(g, ld, row0, nrows, gscale, q, D, c0, sink); break;
    case 7: query_block<7>(g, ld, row0, nrows, gscale, q, D, c0, sink); break;
    default: break;
  }
}

// Rows [row0, row1) of the gallery, tile by tile. Tiles stay in L2 while every block of queries
// passes over them; 16-bit/int8 tiles are widened to fp32 once (into `buf`, tile_rows(D) * D floats)
// when more than one query block will read them.
inline int64_t tile_rows(int64_t D) { return std::max<int64_t>(16, std::min<int64_t>(1024, (128 * 1024) / (4 * D)) / 16 * 16); }

template <class T>
constexpr bool widens(int64_t Q) { return !std::is_same<T, float>::value && Q > kQBlock; }

template <class T, class Sink>
void scan(const T* gallery, int64_t ldg, const float* gscale, const float* q, int64_t Q, int64_t D,
          int64_t row0, int64_t row1, float* buf, Sink& sink) {
  const int64_t tile = tile_rows(D);
  for (int64_t t0 = row0; t0 < row1; t0 += tile) {
    const int64_t n = std::min(tile, row1 - t0);
    if (widens<T>(Q)) {
      widen_tile(gallery + t0 * ldg, ldg, n, D, buf);
      all_query_blocks(buf, D, t0, n, gscale, q, Q, D, sink);
    } else {
      all_query_blocks(gallery + t0 * ldg, ldg, t0, n, gscale, q, Q, D, sink);
    }
  }
}

#if defined(MMFAST_SIM_AVX512) && defined(__AVX512VNNI__)
// ---- int8 gallery x many queries: VNNI integer dot products, made exact by rescoring ------------
// vpdpbusd multiplies 64 u8 x s8 pairs per instruction (4x the lanes of an fp32 FMA). The queries
// are quantised to int8 (q ~ sq * qi); the gallery bytes are biased to u8 (g + 128, undone with the
// query's sum), and each tile is repacked into panels of 16 rows x 4 bytes so that lane r of an
// accumulator holds row r's whole dot product (no horizontal sums). The integer score
// a = sg * sq * <qi, g> differs from the exact one e = sg * <q, g> by at most
// sg * max|q - sq * qi| * |g|_1 <= sg * (sq / 2) * |g|_1; only rows whose upper bound reaches the
// current k-th best are rescored exactly (with the fp32 micro-kernel, bit-identical to the other
// paths), so the result is the exact top-k of the dequantised gallery.
constexpr int kPanel = 16;  // rows per panel = int32 lanes
constexpr int kVnniC = 8;  // queries per block: 2 panels x 8 queries = 16 accumulators (GCC keeps 16 in registers)

struct QuantQueries {
  int64_t Dp;                 // D rounded up to whole 4-byte groups (zero padding)
  std::vector<int8_t> v;      // [Q, Dp]
  std::vector<float> scale;   // [Q] sq
  std::vector<int32_t> bias;  // [Q] 128 * sum(qi): removes the gallery's +128
};

QuantQueries quantize_queries(const float* q, int64_t Q, int64_t D) {
  QuantQueries qq{(D + 3) / 4 * 4, {}, {}, {}};
  qq.v.assign(Q * qq.Dp, 0), qq.scale.resize(Q), qq.bias.resize(Q);
  for (int64_t c = 0; c < Q; ++c) {
    float amax = 0.f;
    for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(q[c * D + d]));
    const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t d = 0; d < D; ++d) {
      const int v = static_cast<int>(std::nearbyint(q[c * D + d] * inv));
      qq.v[c * qq.Dp + d] = static_cast<int8_t>(std::max(-127, std::min(127, v)));
      sum += qq.v[c * qq.Dp + d];
    }
    qq.scale[c] = s, qq.bias[c] = 128 * sum;
  }
  return qq;
}

// Rows [0, n) of a tile -> panels [n/16][Dp/4][16] of biased dwords, and each row's |g|_1.
void pack_panels(const int8_t* g, int64_t ldg, int64_t n, int64_t D, int64_t Dp, int32_t* panels, float* l1) {
  const int64_t groups = Dp / 4, full = D / 4, npanels = (n + kPanel - 1) / kPanel;
  const __m512i bias = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  for (int64_t p = 0; p < npanels; ++p) {
    const int rows = static_cast<int>(std::min<int64_t>(kPanel, n - p * kPanel));
    const __mmask16 m = static_cast<__mmask16>((1u << rows) - 1);
    const __m512i off = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(static_cast<int32_t>(ldg)));
    const int8_t* base = g + p * kPanel * ldg;
    int32_t* out = panels + p * groups * kPanel;
    for (int64_t j = 0; j < full; ++j) {  // one gather = 4 bytes of 16 rows
      __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, off, base + 4 * j, 1);
      _mm512_storeu_si512(out + j * kPanel, _mm512_xor_si512(w, bias));
    }
    for (int64_t j = full; j < groups; ++j)  // ragged last group: bytes past D are 0 (+128)
      for (int r = 0; r < kPanel; ++r) {
        uint32_t w = 0;
        for (int64_t d = 4 * j; d < D && r < rows; ++d)
          w |= static_cast<uint32_t>(static_cast<uint8_t>(base[r * ldg + d])) << (8 * (d - 4 * j));
        out[j * kPanel + r] = static_cast<int32_t>(w ^ 0x80808080u);
      }
  }
  for (int64_t r = 0; r < n; ++r) {
    __m512i acc = _mm512_setzero_si512();
    int64_t d = 0;
    for (; d + 64 <= D; d += 64)
      acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_abs_epi8(_mm512_loadu_si512(g + r * ldg + d)), _mm512_setzero_si512()));
    if (d < D) {
      const __mmask64 m = (D - d) == 64 ? ~0ull : ((1ull << (D - d)) - 1);
      acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_abs_epi8(_mm512_maskz_loadu_epi8(m, g + r * ldg + d)), _mm512_setzero_si512()));
    }
    l1[r] = static_cast<float>(_mm512_reduce_add_epi64(acc));
  }
}

// acc[p * C + c] lane r = <qi[c], biased row (p*16 + r)>, for P panels x C queries.
template <int P, int C>
__attribute__((noinline)) void vnni_kernel(const int32_t* panels, int64_t groups, const int8_t* qv, int64_t Dp, __m512i* out) {
  __m512i acc[P * C];  // local, so that it lives in registers (the caller's array is in memory)
  for (int i = 0; i < P * C; ++i) acc[i] = _mm512_setzero_si512();
  for (int64_t j = 0; j < groups; ++j) {
    __m512i a[P];
    for (int p = 0; p < P; ++p) a[p] = _mm512_loadu_si512(panels + (p * groups + j) * kPanel);
    for (int c = 0; c < C; ++c) {
      int32_t w;
      std::memcpy(&w, qv + c * Dp + 4 * j, 4);
      const __m512i b = _mm512_set1_epi32(w);
      for (int p = 0; p < P; ++p) acc[p * C + c] = _mm512_dpbusd_epi32(acc[p * C + c], a[p], b);
    }
  }
  for (int i = 0; i < P * C; ++i) out[i] = acc[i];
}

// The hot 2 panels x 8 queries case with named accumulators and in-place vpdpbusd: GCC 12 copies
// the accumulator around the intrinsic (and spills), which costs ~40% here.
#define MMFAST_DP(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))
#define MMFAST_Q(c)                                                             \
  {                                                                             \
    int32_t w;                                                                  \
    std::memcpy(&w, qv + c * Dp + 4 * j, 4);                                    \
    const __m512i b = _mm512_set1_epi32(w);                                     \
    MMFAST_DP(x##c, a0, b);                                                     \
    MMFAST_DP(y##c, a1, b);                                                     \
  }
template <>
__attribute__((noinline)) void vnni_kernel<2, 8>(const int32_t* panels, int64_t groups, const int8_t* qv,
                                                 int64_t Dp, __m512i* out) {
  __m512i x0, x1, x2, x3, x4, x5, x6, x7, y0, y1, y2, y3, y4, y5, y6, y7;
  x0 = x1 = x2 = x3 = x4 = x5 = x6 = x7 = y0 = y1 = y2 = y3 = y4 = y5 = y6 = y7 = _mm512_setzero_si512();
  for (int64_t j = 0; j < groups; ++j) {
    const __m512i a0 = _mm512_loadu_si512(panels + j * kPanel);
    const __m512i a1 = _mm512_loadu_si512(panels + (groups + j) * kPanel);
    MMFAST_Q(0) MMFAST_Q(1) MMFAST_Q(2) MMFAST_Q(3) MMFAST_Q(4) MMFAST_Q(5) MMFAST_Q(6) MMFAST_Q(7)
  }
  const __m512i all[16] = {x0, x1, x2, x3, x4, x5, x6, x7, y0, y1, y2, y3, y4, y5, y6, y7};
  for (int i = 0; i < 16; ++i) out[i] = all[i];
}
#undef MMFAST_Q
#undef MMFAST_DP

// T: the gallery rows are rescored from. Plain int8 search: T = int8_t, rg = g, rscale = gscale,
// err = nullptr. Prefilter ("shadow" int8 copy of an fp16/bf16 gallery): rg is the 16-bit gallery,
// rscale = nullptr, and err[row] * |q|_2 widens the bound by the distance between the fp16 row and
// its dequantised int8 copy (plus the fp32 rounding of the rescoring), see prefilter_topk below.
template <class T>
struct VnniScan {
  const int8_t* g;
  int64_t ldg;
  const float* gscale;
  const float* q;  // [Q, D] fp32, for exact rescoring
  const QuantQueries* qq;
  int64_t Q, D;
  const T* rg;
  int64_t ldr;
  const float* rscale;
  const float* err = nullptr;  // [N] or null
  const float* qnorm = nullptr;  // [Q] |q|_2 (rounded up), with err

  template <int P, int C>
  void block(const int32_t* panels, const float* l1, int64_t row0, int64_t nrows, int64_t c0, TopK* heaps) const {
    const int64_t groups = qq->Dp / 4;
    __m512i acc[P * C];
    vnni_kernel<P, C>(panels, groups, qq->v.data() + c0 * qq->Dp, qq->Dp, acc);
    for (int p = 0; p < P; ++p) {
      const int rows = static_cast<int>(std::min<int64_t>(kPanel, nrows - p * kPanel));
      if (rows <= 0) break;
      const __mmask16 valid = static_cast<__mmask16>((1u << rows) - 1);
      const __m512 gs = _mm512_maskz_loadu_ps(valid, gscale + row0 + p * kPanel);
      const __m512 gl1 = _mm512_mul_ps(gs, _mm512_maskz_loadu_ps(valid, l1 + p * kPanel));
      for (int c = 0; c < C; ++c) {
        TopK& h = heaps[c0 + c];
        const float sq = qq->scale[c0 + c];
        const __m512i dot = _mm512_sub_epi32(acc[p * C + c], _mm512_set1_epi32(qq->bias[c0 + c]));
        const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(gs, _mm512_set1_ps(sq)));
        // Upper bound, with slack for the fp32 rounding of a and of the exact rescoring.
        __m512 ub = _mm512_add_ps(_mm512_fmadd_ps(gl1, _mm512_set1_ps(0.505f * sq), a),
                                  _mm512_mul_ps(_mm512_abs_ps(a), _mm512_set1_ps(1e-5f)));
        if (err)  // rounded up by 1.0001 (the fp32 product and sum above round too)
          ub = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, err + row0 + p * kPanel),
                               _mm512_set1_ps(qnorm[c0 + c] * 1.0001f), ub);
        uint32_t cand = h.n < h.k ? valid
                                  : _mm512_mask_cmp_ps_mask(valid, ub, _mm512_set1_ps(h.s[0]), _CMP_NLT_UQ);
        while (cand) {
          const int r = __builtin_ctz(cand);
          cand &= cand - 1;
          const int64_t row = row0 + p * kPanel + r;
          alignas(64) float v[kAcc];
          micro_kernel<1, 1>(rg + row * ldr, ldr, q + (c0 + c) * D, D, D, v);
          const float e = sanitize(rscale ? v[0] * rscale[row] : v[0]);
          if (h.wants(e, row)) h.push(e, row);
        }
      }
    }
  }

  template <int C>
  void blocks(const int32_t* panels, const float* l1, int64_t row0, int64_t nrows, int64_t c0, TopK* heaps) const {
    const int64_t groups = qq->Dp / 4;
    for (int64_t r = 0; r < nrows; r += 2 * kPanel)
      block<2, C>(panels + (r / kPanel) * groups * kPanel, l1 + r, row0 + r, nrows - r, c0, heaps);
  }

  // Rows [row0, row1): pack each tile once, then every query block runs over it.
  void operator()(int64_t row0, int64_t row1, TopK* heaps, std::vector<int32_t>& panels, std::vector<float>& l1) const {
    const int64_t tile = 4 * kPanel, groups = qq->Dp / 4;
    panels.resize(tile * groups + kPanel * groups);  // + one zero panel: blocks read panels in pairs
    l1.resize(tile + kPanel);
    for (int64_t t0 = row0; t0 < row1; t0 += tile) {
      const int64_t n = std::min(tile, row1 - t0);
      pack_panels(g + t0 * ldg, ldg, n, D, qq->Dp, panels.data(), l1.data());
      int64_t c0 = 0;
      for (; c0 + kVnniC <= Q; c0 += kVnniC) blocks<kVnniC>(panels.data(), l1.data(), t0, n, c0, heaps);
      for (; c0 + 4 <= Q; c0 += 4) blocks<4>(panels.data(), l1.data(), t0, n, c0, heaps);
      for (; c0 < Q; ++c0) blocks<1>(panels.data(), l1.data(), t0, n, c0, heaps);
    }
  }
};
#define MMFAST_SIM_VNNI 1
#endif

// Each thread takes chunks of rows dynamically (a shared, busy machine makes static slices finish
// unevenly); chunks are whole tiles, several per thread.
struct Plan {
  int threads;
  int64_t chunk, nchunks;
};
Plan plan(int64_t N, int64_t Q, int64_t D) {
  Plan p{1, N, 1};
#ifdef _OPENMP
  const int64_t want = std::max<int64_t>(1, N * Q * D / (int64_t(1) << 22));  // ~4M MACs per thread
  p.threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), want));
#endif
  const int64_t tile = tile_rows(D);
  p.chunk = std::max<int64_t>(tile, (N + 8 * p.threads - 1) / (8 * p.threads) / tile * tile);
  p.nchunks = (N + p.chunk - 1) / p.chunk;
  return p;
}
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Top-k driver: per-thread heaps filled by `scan_chunk(row0, row1, heaps)` over dynamically
// scheduled chunks, then merged per query (best first, ties to the smaller id).
template <class ScanChunk>
void run_topk(int64_t N, int64_t Q, int64_t D, int64_t k, float* out_s, int64_t* out_i, const ScanChunk& scan_chunk) {
  const Plan p = plan(N, Q, D);
  const int nt = p.threads;
  std::vector<float> hs(static_cast<size_t>(nt) * Q * k);
  std::vector<int64_t> hi(hs.size()), hn(static_cast<size_t>(nt) * Q);
#pragma omp parallel num_threads(nt)
  {
    const int t = thread_id();
    std::vector<TopK> heaps(Q);
    for (int64_t c = 0; c < Q; ++c) {
      const size_t off = (static_cast<size_t>(t) * Q + c) * k;
      heaps[c].s = hs.data() + off, heaps[c].id = hi.data() + off, heaps[c].k = k;
    }
    auto state = scan_chunk.thread_state();
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < p.nchunks; ++j)
      scan_chunk(j * p.chunk, std::min(N, (j + 1) * p.chunk), heaps.data(), state);
    for (int64_t c = 0; c < Q; ++c) hn[t * Q + c] = heaps[c].n;
  }
#pragma omp parallel for num_threads(std::min<int64_t>(nt, Q)) schedule(static)
  for (int64_t c = 0; c < Q; ++c) {
    std::vector<std::pair<float, int64_t>> all;
    for (int t = 0; t < nt; ++t) {
      const size_t off = (static_cast<size_t>(t) * Q + c) * k;
      for (int64_t j = 0; j < hn[t * Q + c]; ++j) all.emplace_back(hs[off + j], hi[off + j]);
    }
    auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return TopK::worse(b.first, b.second, a.first, a.second);
    };
    const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(all.size()));
    std::partial_sort(all.begin(), all.begin() + m, all.end(), better);
    for (int64_t j = 0; j < k; ++j) {
      out_s[c * k + j] = j < m ? all[j].first : -INFINITY;
      out_i[c * k + j] = j < m ? all[j].second : -1;
    }
  }
}

template <class T>
struct FloatChunks {  // the fp32 micro-kernel path, any storage dtype
  const T* g;
  int64_t ldg;
  const float* gscale;
  const float* q;
  int64_t Q, D;
  std::vector<float> thread_state() const { return std::vector<float>(widens<T>(Q) ? tile_rows(D) * D : 0); }
  void operator()(int64_t row0, int64_t row1, TopK* heaps, std::vector<float>& buf) const {
    TopKSink sink{heaps};
    scan(g, ldg, gscale, q, Q, D, row0, row1, buf.data(), sink);
  }
};

#ifdef MMFAST_SIM_VNNI
template <class T>
struct VnniChunks {
  VnniScan<T> scan;
  struct State {
    std::vector<int32_t> panels;
    std::vector<float> l1;
  };
  State thread_state() const { return {}; }
  void operator()(int64_t row0, int64_t row1, TopK* heaps, State& s) const { scan(row0, row1, heaps, s.panels, s.l1); }
};
#endif

template <class T>
void topk_impl(const T* g, int64_t ldg, const float* gscale, int64_t N, const float* q, int64_t Q,
               int64_t D, int64_t k, float* out_s, int64_t* out_i) {
#ifdef MMFAST_SIM_VNNI
  if constexpr (std::is_same<T, int8_t>::value) {
    if (Q > kQBlock) {  // compute-bound: integer dot products (few queries stay memory-bound)
      const QuantQueries qq = quantize_queries(q, Q, D);
      run_topk(N, Q, D, k, out_s, out_i, VnniChunks<T>{VnniScan<T>{g, ldg, gscale, q, &qq, Q, D, g, ldg, gscale}});
      return;
    }
  }
#endif
  run_topk(N, Q, D, k, out_s, out_i, FloatChunks<T>{g, ldg, gscale, q, Q, D});
}

// Prefilter: top-k over a 16-bit gallery `g`, scanning its int8 copy (`c8`, per-row scale `cscale`)
// with VNNI and rescoring candidates from `g`. The result is that of topk_impl on `g` alone: a row
// is skipped only when an upper bound of its fp32 score against `g` stays below the k-th best.
// The bound adds to the int8 one (|a - <q, c>| with c = cscale * c8, see VnniScan) the term
// |<q, g> - <q, c>| + fp32 rounding of the rescored <q, g>  <=  |q|_2 * err[row], where the caller
// passes err[row] >= |g - c|_2 + (D + 2) * 2^-24 * |g|_2 (Cauchy-Schwarz; the classic bound on a
// length-D fp32 dot product). Few queries are memory-bound: they read `g` directly, as topk_impl.
template <class T>
void prefilter_topk_impl(const T* g, int64_t ldg, const int8_t* c8, int64_t ldc, const float* cscale,
                         const float* err, int64_t N, const float* q, int64_t Q, int64_t D, int64_t k,
                         float* out_s, int64_t* out_i) {
#ifdef MMFAST_SIM_VNNI
  if (Q > kQBlock) {
    const QuantQueries qq = quantize_queries(q, Q, D);
    std::vector<float> qnorm(Q);
    for (int64_t c = 0; c < Q; ++c) {
      double s = 0;
      for (int64_t d = 0; d < D; ++d) s += static_cast<double>(q[c * D + d]) * q[c * D + d];
      qnorm[c] = static_cast<float>(std::sqrt(s) * (1 + 1e-6));
    }
    VnniScan<T> sc{c8, ldc, cscale, q, &qq, Q, D, g, ldg, nullptr, err, qnorm.data()};
    run_topk(N, Q, D, k, out_s, out_i, VnniChunks<T>{sc});
    return;
  }
#else
  (void)c8, (void)ldc, (void)cscale, (void)err;
#endif
  run_topk(N, Q, D, k, out_s, out_i, FloatChunks<T>{g, ldg, nullptr, q, Q, D});
}

template <class T>
void dense_impl(const T* g, int64_t ldg, const float* gscale, int64_t N, const float* q, int64_t Q,
                int64_t D, float* out) {
  const Plan p = plan(N, Q, D);
#pragma omp parallel num_threads(p.threads)
  {
    std::vector<float> buf(widens<T>(Q) ? tile_rows(D) * D : 0);
    DenseSink sink{out, N};
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < p.nchunks; ++j)
      scan(g, ldg, gscale, q, Q, D, j * p.chunk, std::min(N, (j + 1) * p.chunk), buf.data(), sink);
  }
}

// ---- Python boundary: numpy views of torch tensors, no copies; the caller validated shapes ----
enum class Kind { F32, F16, BF16, I8 };

Kind parse_kind(const std::string& s) {
  if (s == "fp32") return Kind::F32;
  if (s == "fp16") return Kind::F16;
  if (s == "bf16") return Kind::BF16;
  if (s == "int8") return Kind::I8;
  throw std::invalid_argument("gallery kind must be fp32, fp16, bf16 or int8, got " + s);
}

struct Args {
  Kind kind;
  const void* g;
  int64_t N, D, ldg, Q;
  const float* q;
  const float* gscale = nullptr;
};

Args check(const py::array& queries, const py::array& gallery, const std::string& kind,
           const py::object& gallery_scale) {
  Args a{};
  a.kind = parse_kind(kind);
  const int64_t want_item = a.kind == Kind::F32 ? 4 : a.kind == Kind::I8 ? 1 : 2;
  if (queries.ndim() != 2 || gallery.ndim() != 2) throw std::invalid_argument("queries and gallery must be 2-D");
  if (!py::isinstance<py::array_t<float>>(queries) || !(queries.flags() & py::array::c_style))
    throw std::invalid_argument("queries must be a C-contiguous float32 array");
  if (gallery.itemsize() != want_item || gallery.strides(1) != want_item || gallery.strides(0) % want_item)
    throw std::invalid_argument("gallery must hold " + kind + " elements with unit stride along D");
  a.Q = queries.shape(0), a.D = queries.shape(1), a.N = gallery.shape(0);
  if (gallery.shape(1) != a.D) throw std::invalid_argument("queries and gallery differ in D");
  a.ldg = gallery.strides(0) / want_item;
  a.q = static_cast<const float*>(queries.data());
  a.g = gallery.data();
  if (a.kind == Kind::I8) {
    if (gallery_scale.is_none()) throw std::invalid_argument("an int8 gallery needs gallery_scale");
    auto s = gallery_scale.cast<py::array>();
    if (!py::isinstance<py::array_t<float>>(s) || s.ndim() != 1 || s.shape(0) != a.N || s.strides(0) != 4)
      throw std::invalid_argument("gallery_scale must be a contiguous float32 array of N elements");
    a.gscale = static_cast<const float*>(s.data());
  }
  return a;
}

template <class F>
void with_type(const Args& a, F&& f) {
  switch (a.kind) {
    case Kind::F32: f(static_cast<const float*>(a.g)); break;
    case Kind::F16: f(static_cast<const f16*>(a.g)); break;
    case Kind::BF16: f(static_cast<const bf16*>(a.g)); break;
    case Kind::I8: f(static_cast<const int8_t*>(a.g)); break;
  }
}

// k in [1, N] and the outputs writable C-contiguous float32 / int64 arrays of Q*k; their pointers.
static std::pair<float*, int64_t*> check_outputs(const Args& a, int64_t k, py::array& scores, py::array& ids) {
  if (k < 1 || k > a.N) throw std::invalid_argument("k must be in [1, N]");
  if (!py::isinstance<py::array_t<float>>(scores) || !py::isinstance<py::array_t<int64_t>>(ids) ||
      scores.size() != a.Q * k || ids.size() != a.Q * k || !(scores.flags() & py::array::c_style) ||
      !(ids.flags() & py::array::c_style) || !scores.writeable() || !ids.writeable())
    throw std::invalid_argument("scores / ids must be writable C-contiguous float32 / int64 arrays of Q*k");
  return {static_cast<float*>(scores.mutable_data()), static_cast<int64_t*>(ids.mutable_data())};
}

void similarity_topk(const py::array& queries, const py::array& gallery, const std::string& kind,
                     const py::object& gallery_scale, int64_t k, py::array scores, py::array ids) {
  Args a = check(queries, gallery, kind, gallery_scale);
  const auto outs = check_outputs(a, k, scores, ids);
  float* out_s = outs.first;
  int64_t* out_i = outs.second;
  py::gil_scoped_release nogil;  // pure compute from here: other Python threads may run
  with_type(a, [&](const auto* g) { topk_impl(g, a.ldg, a.gscale, a.N, a.q, a.Q, a.D, k, out_s, out_i); });
}

void similarity_topk_prefilter(const py::array& queries, const py::array& gallery, const std::string& kind,
                               const py::array& codes, const py::array& code_scale, const py::array& code_err,
                               int64_t k, py::array scores, py::array ids) {
  Args a = check(queries, gallery, kind, py::none());
  if (a.kind != Kind::F16 && a.kind != Kind::BF16) throw std::invalid_argument("prefilter: kind must be fp16 or bf16");
  Args c = check(queries, codes, "int8", code_scale);
  if (c.N != a.N) throw std::invalid_argument("prefilter: codes and gallery differ in N");
  if (!py::isinstance<py::array_t<float>>(code_err) || code_err.ndim() != 1 || code_err.shape(0) != a.N ||
      code_err.strides(0) != 4)
    throw std::invalid_argument("code_err must be a contiguous float32 array of N elements");
  const auto outs = check_outputs(a, k, scores, ids);
  float* out_s = outs.first;
  int64_t* out_i = outs.second;
  const int8_t* c8 = static_cast<const int8_t*>(c.g);
  const float* err = static_cast<const float*>(code_err.data());
  py::gil_scoped_release nogil;
  if (a.kind == Kind::F16)
    prefilter_topk_impl(static_cast<const f16*>(a.g), a.ldg, c8, c.ldg, c.gscale, err, a.N, a.q, a.Q, a.D, k, out_s, out_i);
  else
    prefilter_topk_impl(static_cast<const bf16*>(a.g), a.ldg, c8, c.ldg, c.gscale, err, a.N, a.q, a.Q, a.D, k, out_s, out_i);
}

void similarity_dense(const py::array& queries, const py::array& gallery, const std::string& kind,
                      const py::object& gallery_scale, py::array out) {
  Args a = check(queries, gallery, kind, gallery_scale);
  if (!py::isinstance<py::array_t<float>>(out) || out.size() != a.Q * a.N || !(out.flags() & py::array::c_style) ||
      !out.writeable())
    throw std::invalid_argument("out must be a writable C-contiguous float32 array of Q*N");
  float* o = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release nogil;
  with_type(a, [&](const auto* g) { dense_impl(g, a.ldg, a.gscale, a.N, a.q, a.Q, a.D, o); });
}

}  // namespace

void register_similarity(py::module_& m) {
  m.def("similarity_topk", &similarity_topk, py::arg("queries"), py::arg("gallery"), py::arg("kind"),
        py::arg("gallery_scale"), py::arg("k"), py::arg("scores"), py::arg("ids"),
        "Exact top-k of queries . gallery^T into scores [Q,k] / ids [Q,k] (queries pre-normalised).");
  m.def("similarity_topk_prefilter", &similarity_topk_prefilter, py::arg("queries"), py::arg("gallery"),
        py::arg("kind"), py::arg("codes"), py::arg("code_scale"), py::arg("code_err"), py::arg("k"),
        py::arg("scores"), py::arg("ids"),
        "similarity_topk of a fp16/bf16 gallery, prefiltered by its int8 copy (same result).");
  m.def("similarity", &similarity_dense, py::arg("queries"), py::arg("gallery"), py::arg("kind"),
        py::arg("gallery_scale"), py::arg("out"), "queries . gallery^T into out [Q,N] (queries pre-normalised).");
}
