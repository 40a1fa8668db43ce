// GroupNorm (+ SiLU) on the CPU, fused: y = silu((x - mean_g) * rstd_g * gamma_c + beta_c), the
// statistics of each (image, group) in fp32 / fp64, storage fp32 or bf16, the output in either
// (bf16 in, fp32 out for a VQGAN decoder's norm_out) and optionally in place.
//
// Two passes over x instead of torch's three or four (group_norm's statistics and its normalise,
// then silu_ reading and writing the result again), and no bf16 -> fp32 copy for the last norm:
//   1. per (image, channel): S1 = sum (x - K), S2 = sum (x - K)^2 with K = the channel's first
//      value (a shift, so that E[x^2] - mean^2 never cancels), 16 channels (NHWC) or 16 pixels
//      (NCHW) per vector, fp32 over blocks of 64 steps, then fp64; groups combine their channels'
//      shifted sums in fp64 (see group_stats);
//   2. y = (x - mean) * (gamma * rstd) + beta, silu(y) = y / (1 + exp(-y)) (exp: Cephes' degree-6
//      polynomial after range reduction, scaled by 2^n with vscalefps; ~2 ulp), rounded to the
//      output dtype (bf16: round to nearest even, NaN stays NaN, as torch does).
// Layouts: channels-last [B, H*W, C] (VQGAN's inference layout) and NCHW [B, C, H*W].
// Threads: pixel ranges (NHWC) or channel rows (NCHW) split over an OpenMP team, a barrier between
// the passes; one thread below kSerialElems. An OpenMP team here, unlike codebook.cpp's std::threads:
// this kernel runs between torch's convolutions, whose OpenMP threads (the same libgomp: torch loads
// it first) are still spinning when it starts, so joining their team costs nothing, while a fresh
// std::thread waited for a vCPU one of them held (measured: 2 threads no faster than 1).
#include <immintrin.h>
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

enum class Dt { f32, bf16 };
constexpr int kBlock = 64;                    // vector steps summed in fp32 before going to fp64
constexpr int64_t kSerialElems = int64_t(1) << 19;  // below, one thread (~0.2 ms of work: a
// second thread saves 0.1 ms on a quiet machine and can wait a whole time slice on a busy one)

inline __mmask16 first(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

template <Dt T> inline __m512 load16(const void* p, int64_t i, __mmask16 m) {
  if (m == 0xFFFF) {  // full vectors unmasked: AMD's masked loads / stores are much slower
    if constexpr (T == Dt::f32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  if constexpr (T == Dt::f32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // top half of fp32
  }
}

template <Dt T> inline float load1(const void* p, int64_t i) {
  if constexpr (T == Dt::f32) return static_cast<const float*>(p)[i];
  const uint32_t u = uint32_t(static_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <Dt T> inline void store16(void* p, int64_t i, __m512 v, __mmask16 m) {
  if constexpr (T == Dt::f32) {
    if (m == 0xFFFF) _mm512_storeu_ps(static_cast<float*>(p) + i, v);
    else _mm512_mask_storeu_ps(static_cast<float*>(p) + i, m, v);
  } else {
#ifdef __AVX512BF16__
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
#else  // round to nearest even by hand (Ice Lake has no vcvtneps2bf16); NaN -> quiet NaN
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    const __m256i h = _mm512_cvtepi32_epi16(r);
#endif
    if (m == 0xFFFF) _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), h);
    else _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m, h);
  }
}

// e^x: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf polynomial, times 2^n (vscalefps also
// gives inf / 0 past the fp32 range; the clamp only keeps r finite).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(89.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// y * sigmoid(y) = y / (1 + e^-y): -> -0 for very negative y, NaN stays NaN. (vrcp14ps and a
// Newton step instead of the division measured 1.3x slower on Zen 5, same accuracy.)
inline __m512 silu16(__m512 y) {
  return _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), y))));
}

struct Problem {
  const void* x;
  void* out;
  const float* gamma;
  const float* beta;
  int64_t B, P, C;  // images, pixels per image, channels
  int G;
  double eps;
  bool silu, nhwc;
};

// Pass 1, channels-last, channels [c0, c0 + 16 NV) of pixels [p0, p1) of image b: shifted sums in
// 2 NV registers over blocks of kBlock pixels, then added to s1 / s2 (fp64); the last vector is
// masked to `tail` lanes.
template <Dt T, int NV>
void sums_nhwc_chunk(const Problem& q, int64_t b, int64_t p0, int64_t p1, int64_t c0, __mmask16 tail,
                     const float* shift, double* s1, double* s2) {
  __m512 k[NV];
  for (int v = 0; v < NV; ++v) k[v] = _mm512_loadu_ps(shift + c0 + 16 * v);  // zero-padded
  for (int64_t blk = p0; blk < p1; blk += kBlock) {
    __m512 a1[NV], a2[NV];
    for (int v = 0; v < NV; ++v) a1[v] = a2[v] = _mm512_setzero_ps();
    const int64_t end = std::min(p1, blk + kBlock);
    for (int64_t p = blk; p < end; ++p) {
      const int64_t at = (b * q.P + p) * q.C + c0;
      for (int v = 0; v < NV; ++v) {
        const __m512 d = _mm512_sub_ps(load16<T>(q.x, at + 16 * v, v == NV - 1 ? tail : 0xFFFF), k[v]);
        a1[v] = _mm512_add_ps(a1[v], d), a2[v] = _mm512_fmadd_ps(d, d, a2[v]);
      }
    }
    alignas(64) float f1[16], f2[16];
    for (int v = 0; v < NV; ++v) {
      _mm512_store_ps(f1, a1[v]), _mm512_store_ps(f2, a2[v]);
      for (int l = 0; l < 16; ++l) s1[c0 + 16 * v + l] += f1[l], s2[c0 + 16 * v + l] += f2[l];
    }
  }
}

template <Dt T>
void sums_nhwc(const Problem& q, int64_t b, int64_t p0, int64_t p1, const float* shift, double* s1, double* s2) {
  for (int64_t c0 = 0; c0 < q.C; c0 += 128) {  // 8 vectors of channels at a time (16 registers)
    const int64_t n = std::min<int64_t>(128, q.C - c0);
    const __mmask16 tail = first(n - (n - 1) / 16 * 16);
    switch ((n + 15) / 16) {
      case 8: sums_nhwc_chunk<T, 8>(q, b, p0, p1, c0, tail, shift, s1, s2); break;
      case 7: sums_nhwc_chunk<T, 7>(q, b, p0, p1, c0, tail, shift, s1, s2); break;
      case 6: sums_nhwc_chunk<T, 6>(q, b, p0, p1, c0, tail, shift, s1, s2); break;
      case 5: sums_nhwc_chunk<T, 5>(q, b, p0, p1, c0, tail, shift, s1, s2); break;
      case 4: sums_nhwc_chunk<T, 4>(q, b, p0, p1, c0, tail, shift, s1, s2); break;
      case 3: sums_nhwc_chunk<T, 3>(q, b, p0, p1, c0, tail, shift, s1, s2); break;
      case 2: sums_nhwc_chunk<T, 2>(q, b, p0, p1, c0, tail, shift, s1, s2); break;
      default: sums_nhwc_chunk<T, 1>(q, b, p0, p1, c0, tail, shift, s1, s2); break;
    }
  }
}

// Pass 1, NCHW: shifted sums of channel row r (P contiguous values) into s1 / s2 (fp64).
template <Dt T> void sums_nchw(const Problem& q, int64_t r, float shift, double* s1, double* s2) {
  const __m512 k = _mm512_set1_ps(shift);
  const int64_t base = r * q.P;
  for (int64_t blk = 0; blk < q.P; blk += 16 * kBlock) {
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
    const int64_t end = std::min(q.P, blk + 16 * kBlock);
    for (int64_t p = blk; p < end; p += 16) {
      const __mmask16 m = first(end - p);
      const __m512 v = _mm512_maskz_sub_ps(m, load16<T>(q.x, base + p, m), k);
      a1 = _mm512_add_ps(a1, v), a2 = _mm512_fmadd_ps(v, v, a2);
    }
    *s1 += _mm512_reduce_add_ps(a1), *s2 += _mm512_reduce_add_ps(a2);
  }
}

// Per channel of one image: the group's mean, gamma * rstd, beta (fp32) from the channels' shifted
// sums: sum_p (x - m)^2 = S2 + 2 (K - m) S1 + P (K - m)^2 for each channel, m the group mean.
void group_stats(const Problem& q, const float* shift, const double* s1, const double* s2, float* mean,
                 float* scale, float* beta) {
  const int64_t cg = q.C / q.G;
  const double n = double(cg) * double(q.P);
  for (int g = 0; g < q.G; ++g) {
    double m = 0, v = 0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) m += double(q.P) * shift[c] + s1[c];
    m /= n;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      const double d = double(shift[c]) - m;
      v += s2[c] + 2 * d * s1[c] + double(q.P) * d * d;
    }
    const double rstd = 1.0 / std::sqrt(std::max(v / n, 0.0) + q.eps);
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      mean[c] = float(m), scale[c] = float(q.gamma[c] * rstd), beta[c] = q.beta[c];
    }
  }
}

template <Dt I, Dt O>
inline void apply16(const Problem& q, int64_t i, __mmask16 m, __m512 mean, __m512 scale, __m512 beta) {
  __m512 y = _mm512_fmadd_ps(_mm512_sub_ps(load16<I>(q.x, i, m), mean), scale, beta);
  if (q.silu) y = silu16(y);
  store16<O>(q.out, i, y, m);
}

template <Dt I, Dt O> void run(const Problem& q) {
  const int64_t units = q.nhwc ? q.P : q.B * q.C;  // what the threads split: each image's pixels, or rows
  int threads = q.B * q.P * q.C < kSerialElems ? 1 : std::max(1, omp_get_max_threads());
  threads = int(std::min<int64_t>(threads, std::max<int64_t>(1, units / 16)));
  // Per (image, channel) values at [b * Cp + c], zero-padded to whole vectors: the shift K, then
  // mean / scale / beta; fp64 sums per thread.
  const int64_t Cp = (q.C + 15) / 16 * 16, BC = q.B * Cp;
  std::vector<float> shift(BC, 0.f), mean(BC, 0.f), scale(BC, 0.f), beta(BC, 0.f);
  std::vector<double> s1(size_t(threads) * BC, 0.0), s2(size_t(threads) * BC, 0.0);
  for (int64_t b = 0; b < q.B; ++b)
    for (int64_t c = 0; c < q.C; ++c)
      shift[b * Cp + c] = load1<I>(q.x, q.nhwc ? b * q.P * q.C + c : (b * q.C + c) * q.P);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const int64_t u0 = units * t / threads, u1 = units * (t + 1) / threads;
    double* t1 = s1.data() + t * BC;
    double* t2 = s2.data() + t * BC;
    if (q.nhwc) {
      for (int64_t b = 0; b < q.B; ++b)
        sums_nhwc<I>(q, b, u0, u1, shift.data() + b * Cp, t1 + b * Cp, t2 + b * Cp);
    } else {
      for (int64_t r = u0; r < u1; ++r) {
        const int64_t at = r / q.C * Cp + r % q.C;
        sums_nchw<I>(q, r, shift[at], t1 + at, t2 + at);
      }
    }
#pragma omp barrier
    if (t == 0) {  // every partial sum is in: fold them into thread 0's, then the statistics
      for (int o = 1; o < threads; ++o)
        for (int64_t i = 0; i < BC; ++i) s1[i] += s1[o * BC + i], s2[i] += s2[o * BC + i];
      for (int64_t at = 0; at < BC; at += Cp)
        group_stats(q, shift.data() + at, s1.data() + at, s2.data() + at, mean.data() + at,
                    scale.data() + at, beta.data() + at);
    }
#pragma omp barrier
    if (q.nhwc) {  // pass 2 over the same pixels (still in this core's cache when they fit)
      for (int64_t b = 0; b < q.B; ++b) {
        const float *mb = mean.data() + b * Cp, *sb = scale.data() + b * Cp, *bb = beta.data() + b * Cp;
        for (int64_t p = u0; p < u1; ++p) {
          const int64_t row = (b * q.P + p) * q.C;
          for (int64_t c = 0; c < q.C; c += 16)
            apply16<I, O>(q, row + c, first(q.C - c), _mm512_loadu_ps(mb + c), _mm512_loadu_ps(sb + c),
                          _mm512_loadu_ps(bb + c));
        }
      }
    } else {
      for (int64_t r = u0; r < u1; ++r) {
        const int64_t at = r / q.C * Cp + r % q.C;
        const __m512 mr = _mm512_set1_ps(mean[at]), sr = _mm512_set1_ps(scale[at]), br = _mm512_set1_ps(beta[at]);
        for (int64_t p = 0; p < q.P; p += 16) apply16<I, O>(q, r * q.P + p, first(q.P - p), mr, sr, br);
      }
    }
  }
}

Dt dtype_of(const std::string& name) {
  if (name == "float32") return Dt::f32;
  if (name == "bfloat16") return Dt::bf16;
  throw std::invalid_argument("dtype: expected float32 or bfloat16, got " + name);
}

// ---- Python boundary: numpy views of torch tensors (no copies), checked in kernels/__init__.py
void group_norm_silu(py::array x, py::array out, py::array gamma, py::array beta, int groups, double eps,
                     bool silu, bool channels_last, const std::string& in_dtype, const std::string& out_dtype) {
  const Dt di = dtype_of(in_dtype), dout = dtype_of(out_dtype);
  if (x.ndim() != 3 || out.ndim() != 3 || !(x.flags() & py::array::c_style) || !(out.flags() & py::array::c_style))
    throw std::invalid_argument("x, out: expected C-contiguous 3-D arrays ([B, HW, C] or [B, C, HW])");
  for (int d = 0; d < 3; ++d)
    if (x.shape(d) != out.shape(d)) throw std::invalid_argument("x, out: shapes differ");
  if (x.itemsize() != (di == Dt::f32 ? 4 : 2) || out.itemsize() != (dout == Dt::f32 ? 4 : 2))
    throw std::invalid_argument("x, out: itemsize does not match in_dtype / out_dtype");
  Problem q{x.data(), out.mutable_data(), nullptr, nullptr, x.shape(0), x.shape(channels_last ? 1 : 2),
            x.shape(channels_last ? 2 : 1), groups, eps, silu, channels_last};
  if (groups <= 0 || q.C % groups) throw std::invalid_argument("groups must divide the channels");
  for (auto* a : {&gamma, &beta})
    if (a->ndim() != 1 || a->shape(0) != q.C || a->itemsize() != 4 || !(a->flags() & py::array::c_style))
      throw std::invalid_argument("gamma, beta: expected contiguous float32 arrays of C values");
  q.gamma = static_cast<const float*>(gamma.data()), q.beta = static_cast<const float*>(beta.data());
  if (q.B * q.P * q.C == 0) return;
  py::gil_scoped_release release;
  if (di == Dt::f32 && dout == Dt::f32) run<Dt::f32, Dt::f32>(q);
  else if (di == Dt::f32) run<Dt::f32, Dt::bf16>(q);
  else if (dout == Dt::f32) run<Dt::bf16, Dt::f32>(q);
  else run<Dt::bf16, Dt::bf16>(q);
}

}  // namespace

void register_group_norm(py::module_& m) {
  m.def("group_norm_silu", &group_norm_silu, py::arg("x"), py::arg("out"), py::arg("gamma"), py::arg("beta"),
        py::arg("groups"), py::arg("eps"), py::arg("silu"), py::arg("channels_last"), py::arg("in_dtype"),
        py::arg("out_dtype"),
        "out = [silu](group_norm(x)) (see kernels/cpu/group_norm.cpp); out may be x itself. bf16 arrays "
        "are passed as int16 views with in_dtype / out_dtype naming the real type.");
}
