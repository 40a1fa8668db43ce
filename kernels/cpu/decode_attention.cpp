// Decode attention on the CPU: out[b, h] = softmax(scale * q[b, h] . K[b, h, :L].T) V[b, h, :L],
// L = lengths[b], one query per (row, head) against a static KV cache; positions >= L are never read.
//
// The CPU default of mmfast.kernels.decode_attention, chosen by measurement against torch 2.13's
// SDPA (F.scaled_dot_product_attention) on the 2-vCPU Zen 5 machine: DALL-E mini's decoder step
// (B = 2 and 8 rows = 1 and 4 images, H = 16, D = 64, T = 256), lengths 32 / 128 / 256, one thread
// each, thread CPU time (this machine is shared), a different layer's cold cache every call:
//   fp32: 1.5-2.1x faster than SDPA on the sliced cache k[:, :, :L] (which needs L on the host),
//         1.8-6x faster than SDPA over all T with a boolean mask;
//   bf16: 2.2-5.8x faster than the slice, 4.6-17x than the mask (torch's bf16 SDPA on this CPU
//         runs at a fraction of its fp32 speed). benchmarks/suites/decode_attention.py has the sweeps.
//
// Memory-bound: a call reads the 2*L*D valid cache elements of every (row, head) once for 4*L*D
// FLOPs, so the job is to stream K and V at memory speed with no detour through temporaries.
// Per (row, head), D in slabs of up to 128 (8 zmm):
//   1. scores, 16 positions at a time: one zmm accumulator per position over the slab, the 16
//      horizontal sums folded into one vector (hsum16), scaled to base 2, into an L-float buffer;
//   2. softmax in place over the L scores (vector exp2: 2^n * p(f), a few ulp);
//   3. out = sum_t p_t v_t with two interleaved sets of accumulators (FMA latency), divided by
//      sum_t p_t and rounded to the storage dtype.
// Storage fp32 / fp16 / bf16, all math fp32 (a 16-bit value widens exactly). AVX512_BF16's
// vdpbf16ps for the bf16 scores was measured on Zen 5 (which has it) and gained nothing over
// widening (same time within noise at every DALL-E size: the kernel waits on memory, not on
// FMAs), so the kernel is the same on CPUs with and without it (Ice Lake).
// Threads: one, up to 32 MiB of cache read per call (every DALL-E mini size). Measured on the
// 2-vCPU Zen 5 machine with cold caches (a different layer's cache every call), one thread reads
// 29-31 GB/s (16 MiB in 0.54 ms, 32 MiB in 1.16 ms), and a second std::thread never helped: a tie
// at 32 MiB, 5-15% slower at 4-16 MiB, 2x slower at 1 MiB (+25 us to start it), and milliseconds
// when the other vCPU was busy (this machine is shared). Larger calls hand out (row, head) pairs
// through an atomic counter to std::threads (not an OpenMP team: see the Team note in codebook.cpp).
// Lengths outside [0, T] are clamped (mmfast.kernels checks them unless told not to); L = 0 gives
// a zero row.
#include <immintrin.h>
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "simd.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace py = pybind11;
using mmfast_simd::hsum16;

namespace {

enum class Dt { f32, f16, bf16 };
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kSlab = 128;                   // D per slab: 8 zmm of q, 8 (x2) of accumulators
constexpr int64_t kParallelBytes = int64_t(32) << 20;  // below, one thread (see the top)

inline __mmask16 first(int n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? 0 : __mmask16((1u << n) - 1); }

// 16 elements from p[i] as fp32; lanes outside m are zero and never read.
template <Dt T> inline __m512 load16(const void* p, int64_t i, __mmask16 m) {
  if constexpr (T == Dt::f32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
    if constexpr (T == Dt::f16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // top half of fp32
  }
}

template <Dt T> inline float load1(const void* p, int64_t i) {
  if constexpr (T == Dt::f32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if constexpr (T == Dt::f16) return _cvtsh_ss(h);
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <Dt T> inline void store1(void* p, int64_t i, float f) {
  if constexpr (T == Dt::f32) {
    static_cast<float*>(p)[i] = f;
  } else if constexpr (T == Dt::f16) {
    static_cast<uint16_t*>(p)[i] = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
  } else {  // round to nearest even, like torch's .to(torch.bfloat16); NaN stays a quiet NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    static_cast<uint16_t*>(p)[i] = (u & 0x7fffffffu) > 0x7f800000u
                                       ? uint16_t((u >> 16) | 0x40)
                                       : uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
  }
}

// 2^x for the softmax (x <= 0): 2^round(x) * p(x - round(x)), p of degree 6; -inf -> 0.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-160.f));  // also maps -inf (and a NaN from -inf - -inf) to 0
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5353362e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398874e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6182986e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503406e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Software prefetch, kPrefetchBytes ahead in each of the K and V streams: a (row, head) is a
// short stream (L rows of D elements) that the hardware prefetcher picks up late; measured with
// cold caches, prefetching 4 KiB ahead cut a DALL-E mini call's time by 10-30% (fp32 and bf16;
// nothing at L = 32), 2 KiB and 8 KiB ahead did about as well.
constexpr int kPrefetchBytes = 4096;

template <Dt T, int NV> constexpr int64_t ahead_rows() {  // cache rows kPrefetchBytes ahead
  return std::max(4, kPrefetchBytes / (NV * 16 * (T == Dt::f32 ? 4 : 2)));
}

// Prefetch the slab's bytes of the cache row at element offset i.
template <Dt T, int NV> inline void prefetch_row(const void* p, int64_t i) {
  constexpr int bytes = NV * 16 * (T == Dt::f32 ? 4 : 2);
  const char* c = static_cast<const char*>(p) + i * (T == Dt::f32 ? 4 : 2);
#pragma GCC unroll 8
  for (int o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

// One slab of one (row, head): dims [d0, d0 + w) of q, K and V, w <= kSlab.
struct Slab {
  const float* q;      // w fp32 values, zero-padded to kSlab
  const void* k;       // K[b, h, 0, d0]
  const void* v;
  int64_t skt, svt;    // elements between positions
  int w;
};

// s[t] (+)= scale2 * q . k[t] over the slab, t < L (s has room for L rounded up to 16).
template <Dt T, int NV>
void slab_scores(const Slab& sl, int L, float scale2, float* s, bool accumulate) {
  const __mmask16 tail = first(sl.w - 16 * (NV - 1));
  const __m512 sc = _mm512_set1_ps(scale2);
  constexpr int64_t ahead = ahead_rows<T, NV>();
  const int64_t pf = ahead * sl.skt;
  __m512 qv[NV];
  for (int c = 0; c < NV; ++c) qv[c] = _mm512_loadu_ps(sl.q + 16 * c);
  for (int t0 = 0; t0 < L; t0 += 16) {
    const int n = std::min(16, L - t0);
    __m512 acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      acc[j] = _mm512_setzero_ps();
      if (j >= n) continue;
      const int64_t row = int64_t(t0 + j) * sl.skt;
      if (t0 + j + ahead < L) prefetch_row<T, NV>(sl.k, row + pf);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c)
        acc[j] = _mm512_fmadd_ps(qv[c], load16<T>(sl.k, row + 16 * c, c == NV - 1 ? tail : __mmask16(0xFFFF)),
                                 acc[j]);
    }
    __m512 r = _mm512_mul_ps(hsum16(acc), sc);
    if (accumulate) r = _mm512_add_ps(r, _mm512_loadu_ps(s + t0));
    _mm512_storeu_ps(s + t0, r);
  }
}

// o[0, w) = sum_{t < L} p[t] * v[t] over the slab.
template <Dt T, int NV>
void slab_pv(const Slab& sl, int L, const float* p, float* o) {
  const __mmask16 tail = first(sl.w - 16 * (NV - 1));
  __m512 a0[NV], a1[NV];
  for (int c = 0; c < NV; ++c) a0[c] = a1[c] = _mm512_setzero_ps();
  auto mask = [&](int c) { return c == NV - 1 ? tail : __mmask16(0xFFFF); };
  constexpr int64_t ahead = ahead_rows<T, NV>();
  const int64_t pf = ahead * sl.svt;
  int t = 0;
  for (; t + 2 <= L; t += 2) {  // two independent chains per vector: hides the FMA latency
    const __m512 p0 = _mm512_set1_ps(p[t]), p1 = _mm512_set1_ps(p[t + 1]);
    const int64_t r0 = int64_t(t) * sl.svt, r1 = r0 + sl.svt;
    if (t + 1 + ahead < L) prefetch_row<T, NV>(sl.v, r0 + pf), prefetch_row<T, NV>(sl.v, r1 + pf);
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
      a0[c] = _mm512_fmadd_ps(p0, load16<T>(sl.v, r0 + 16 * c, mask(c)), a0[c]);
      a1[c] = _mm512_fmadd_ps(p1, load16<T>(sl.v, r1 + 16 * c, mask(c)), a1[c]);
    }
  }
  if (t < L) {
    const __m512 p0 = _mm512_set1_ps(p[t]);
    for (int c = 0; c < NV; ++c)
      a0[c] = _mm512_fmadd_ps(p0, load16<T>(sl.v, int64_t(t) * sl.svt + 16 * c, mask(c)), a0[c]);
  }
  for (int c = 0; c < NV; ++c) _mm512_mask_storeu_ps(o + 16 * c, mask(c), _mm512_add_ps(a0[c], a1[c]));
}

// s[0, L) -> 2^(s - max); returns their sum.
float softmax2(float* s, int L) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = ninf;
  for (int t = 0; t < L; t += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(ninf, first(L - t), s + t));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (int t = 0; t < L; t += 16) {
    const __mmask16 k = first(L - t);
    const __m512 e = _mm512_maskz_mov_ps(k, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + t), mx)));
    _mm512_storeu_ps(s + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

template <Dt T, int NV> void scores_fn(const Slab& sl, int L, float sc, float* s, bool acc) { slab_scores<T, NV>(sl, L, sc, s, acc); }
template <Dt T, int NV> void pv_fn(const Slab& sl, int L, const float* p, float* o) { slab_pv<T, NV>(sl, L, p, o); }
using ScoresFn = void (*)(const Slab&, int, float, float*, bool);
using PvFn = void (*)(const Slab&, int, const float*, float*);
template <Dt T, int... N> constexpr std::array<ScoresFn, 8> scores_fns(std::integer_sequence<int, N...>) {
  return {&scores_fn<T, N + 1>...};
}
template <Dt T, int... N> constexpr std::array<PvFn, 8> pv_fns(std::integer_sequence<int, N...>) {
  return {&pv_fn<T, N + 1>...};
}

struct Problem {
  const void *q, *k, *v;
  void* out;                                       // [B, H, D] contiguous, the storage dtype
  int64_t sqb, sqh, skb, skh, skt, svb, svh, svt;  // element strides; unit stride along D
  const int32_t* len32;                            // one of the two, [B]
  const int64_t* len64;
  int B, H, T, D;
  float scale;
  int length(int b) const {
    const int64_t l = len32 ? len32[b] : len64[b];
    return int(std::clamp<int64_t>(l, 0, T));
  }
};

// Per-thread buffers: scores for T positions, q in fp32 (zero-padded by a slab), one output row.
struct Scratch {
  std::vector<float> s, q, o;
  explicit Scratch(const Problem& p) : s(size_t(p.T + 16)), q(size_t(p.D + kSlab)), o(size_t(p.D)) {}
};

template <Dt T>
void one_row(const Problem& p, int b, int h, Scratch& w) {
  static constexpr auto kScores = scores_fns<T>(std::make_integer_sequence<int, 8>{});
  static constexpr auto kPv = pv_fns<T>(std::make_integer_sequence<int, 8>{});
  const int L = p.length(b), D = p.D;
  const int64_t out0 = (int64_t(b) * p.H + h) * D;
  if (L == 0) {
    for (int d = 0; d < D; ++d) store1<T>(p.out, out0 + d, 0.f);
    return;
  }
  const int64_t q0 = b * p.sqb + h * p.sqh, k0 = b * p.skb + h * p.skh, v0 = b * p.svb + h * p.svh;
  // q once in fp32, zero past D (the scratch is zeroed there once) so a slab reads whole vectors
  for (int d = 0; d < D; ++d) w.q[d] = load1<T>(p.q, q0 + d);
  auto slab = [&](int d0) {
    const int n = std::min(kSlab, D - d0);
    const void* kp = T == Dt::f32 ? static_cast<const void*>(static_cast<const float*>(p.k) + k0 + d0)
                                  : static_cast<const void*>(static_cast<const uint16_t*>(p.k) + k0 + d0);
    const void* vp = T == Dt::f32 ? static_cast<const void*>(static_cast<const float*>(p.v) + v0 + d0)
                                  : static_cast<const void*>(static_cast<const uint16_t*>(p.v) + v0 + d0);
    return std::make_pair(Slab{w.q.data() + d0, kp, vp, p.skt, p.svt, n}, (n + 15) / 16 - 1);
  };
  const float scale2 = p.scale * kLog2e;
  for (int d0 = 0; d0 < D; d0 += kSlab) {
    const auto [sl, nv] = slab(d0);
    kScores[nv](sl, L, scale2, w.s.data(), d0 > 0);
  }
  const float inv = 1.f / softmax2(w.s.data(), L);
  for (int d0 = 0; d0 < D; d0 += kSlab) {
    const auto [sl, nv] = slab(d0);
    kPv[nv](sl, L, w.s.data(), w.o.data() + d0);
  }
  for (int d = 0; d < D; ++d) store1<T>(p.out, out0 + d, w.o[d] * inv);
}

template <Dt T>
void attend(const Problem& p) {
  const int rows = p.B * p.H;
  int64_t positions = 0;
  for (int b = 0; b < p.B; ++b) positions += p.length(b);
  const int64_t bytes = positions * p.H * p.D * 2 * (T == Dt::f32 ? 4 : 2);
  const int threads = bytes < kParallelBytes ? 1 : std::max(1, std::min(omp_get_max_threads(), rows));
  std::atomic<int> next{0};
  auto work = [&] {
    Scratch w(p);
    for (int r; (r = next.fetch_add(1, std::memory_order_relaxed)) < rows;) one_row<T>(p, r / p.H, r % p.H, w);
  };
  std::vector<std::thread> others;
  for (int t = 1; t < threads; ++t) others.emplace_back(work);
  work();
  for (auto& th : others) th.join();
}

// ---- Python boundary: numpy views of torch tensors (no copies), checked in kernels/__init__.py
int64_t stride_of(const py::array& a, int dim) { return a.strides(dim) / int64_t(a.itemsize()); }

void decode_attention(py::array q, py::array k, py::array v, py::array lengths, double scale, py::array out,
                      const std::string& dtype) {
  Dt dt;
  if (dtype == "float32") dt = Dt::f32;
  else if (dtype == "float16") dt = Dt::f16;
  else if (dtype == "bfloat16") dt = Dt::bf16;
  else throw std::invalid_argument("dtype: expected float32, float16 or bfloat16, got " + dtype);
  const py::ssize_t item = dt == Dt::f32 ? 4 : 2;
  if (q.ndim() != 3 || k.ndim() != 4 || v.ndim() != 4 || out.ndim() != 3)
    throw std::invalid_argument("q, out: expected [B, H, D]; k, v: expected [B, H, T, D]");
  const int B = int(q.shape(0)), H = int(q.shape(1)), D = int(q.shape(2)), T = int(k.shape(2));
  for (const py::array* a : {&k, &v})
    if (a->shape(0) != B || a->shape(1) != H || a->shape(3) != D || a->shape(2) != T)
      throw std::invalid_argument("k, v: expected [B, H, T, D] matching q [B, H, D]");
  for (const py::array* a : {&q, &k, &v, &out})
    if (a->itemsize() != item || (a->shape(a->ndim() - 1) > 1 && a->strides(a->ndim() - 1) != item) ||
        a->strides(0) % item || a->strides(1) % item || (a->ndim() == 4 && a->strides(2) % item))
      throw std::invalid_argument("q, k, v, out: itemsize must match dtype " + dtype +
                                  ", with unit stride along D");
  if (out.shape(0) != B || out.shape(1) != H || out.shape(2) != D || !(out.flags() & py::array::c_style) ||
      !out.writeable())
    throw std::invalid_argument("out: expected a writable C-contiguous [B, H, D] array");
  if (lengths.ndim() != 1 || lengths.shape(0) != B || (lengths.itemsize() != 4 && lengths.itemsize() != 8) ||
      !(lengths.flags() & py::array::c_style))
    throw std::invalid_argument("lengths: expected a contiguous int32 or int64 array of B");
  if (T < 1 || D < 1) throw std::invalid_argument("k, v: T and D must be >= 1");
  const Problem p{q.data(), k.data(), v.data(), out.mutable_data(),
                  stride_of(q, 0), stride_of(q, 1), stride_of(k, 0), stride_of(k, 1), stride_of(k, 2),
                  stride_of(v, 0), stride_of(v, 1), stride_of(v, 2),
                  lengths.itemsize() == 4 ? static_cast<const int32_t*>(lengths.data()) : nullptr,
                  lengths.itemsize() == 8 ? static_cast<const int64_t*>(lengths.data()) : nullptr,
                  B, H, T, D, float(scale)};
  if (B == 0 || H == 0) return;
  py::gil_scoped_release release;
  switch (dt) {
    case Dt::f32: attend<Dt::f32>(p); break;
    case Dt::f16: attend<Dt::f16>(p); break;
    case Dt::bf16: attend<Dt::bf16>(p); break;
  }
}

}  // namespace

void register_decode_attention(py::module_& m) {
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("lengths"),
        py::arg("scale"), py::arg("out"), py::arg("dtype"),
        "out[b, h] = softmax(scale * q[b, h] . k[b, h, :L].T) @ v[b, h, :L], L = lengths[b] clamped to "
        "[0, T] (see kernels/cpu/decode_attention.cpp). fp16/bf16 arrays are passed as int16 views with "
        "dtype naming their real type.");
}
