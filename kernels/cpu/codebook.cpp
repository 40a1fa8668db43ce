// Nearest codebook vector on the CPU: ids[m] = argmin_k ||x_m - e_k||^2, never an M x K matrix.
//
// argmin_k ||x - e_k||^2 = argmax_k (x.e_k - ||e_k||^2 / 2): a GEMM whose epilogue is a running
// arg-max. Two regimes, one file:
//   * D > 8 (VQGAN: 64, 256) is compute-bound like a GEMM. A 6-row x 64-code register tile
//     (24 zmm accumulators) walks a chunk of the codebook, packed [D][64] per tile into a
//     256 KiB buffer that stays in L2; x is broadcast from its rows (converted per row block when
//     stored as fp16/bf16). The running arg-max is kept per row and lane (16 lanes, in L1) and
//     reduced to one id per row at the end of each chunk. Measured here: ~145 GFLOP/s on one
//     vCPU (88% of its FMA peak, 165), 180-205 on both (their peak together is ~230: they
//     share FMA units); faster than the bare x @ e.T in MKL that every matmul-based peer runs.
//   * D <= 8 (LDM's f8 VQ: D = 3, 4) is bound by evaluating distances, not by FLOPs: 32..64 rows
//     sit transposed in registers, codes are broadcast one at a time, and the running arg-max
//     stays in registers: D FMAs + compare + 2 masked moves per 16 (row, code) pairs.
// Storage fp32 / fp16 / bf16, accumulation always fp32 (a 16-bit value converts to fp32 exactly;
// no AVX512_BF16 dot is used: this Ice Lake host lacks it, and its VNNI int8 dot was measured at
// only 1.15x the fp32 FMA rate, so low-precision screening would not pay).
// Ties go to the lowest index (strict '>' everywhere, in code order). Codes whose norm is not
// finite never win; a row whose squared distance to its chosen code is not finite (NaN/Inf in
// x, or fp32 overflow) gets id -1 and distance NaN.
#include <immintrin.h>
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

enum class Dt { f32, f16, bf16 };
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- element access: everything becomes fp32 on load -----------------------------------------
template <Dt T> inline float load1(const void* p, int64_t i) {
  if constexpr (T == Dt::f32) {
    return static_cast<const float*>(p)[i];
  } else {
    const uint16_t h = static_cast<const uint16_t*>(p)[i];
    if constexpr (T == Dt::f16) return _cvtsh_ss(h);
    const uint32_t u = uint32_t(h) << 16;  // bf16 is the top half of an fp32
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
}

inline __mmask16 first(int n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// n (<= 16) consecutive elements from p[i] as fp32 lanes, zeros beyond n.
template <Dt T> inline __m512 loadn(const void* p, int64_t i, int n) {
  if constexpr (T == Dt::f32) {
    return _mm512_maskz_loadu_ps(first(n), static_cast<const float*>(p) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(first(n), static_cast<const uint16_t*>(p) + i);
    if constexpr (T == Dt::f16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// ||x - e||^2 in fp32: the distance handed back, and the finiteness check behind id -1.
template <Dt T> float sqdist(const void* x, int64_t xo, const void* e, int64_t eo, int D) {
  __m512 acc = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 16) {
    const int n = std::min(16, D - d);
    const __m512 t = _mm512_sub_ps(loadn<T>(x, xo + d, n), loadn<T>(e, eo + d, n));
    acc = _mm512_fmadd_ps(t, t, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// -|e_k|^2 / 2, or -inf for a code whose norm is not finite (it can never be the nearest).
inline float neg_half(float sq) { return std::isfinite(sq) ? -0.5f * sq : kNegInf; }

struct Problem {
  const void* x;
  int64_t ldx;  // elements between rows of x
  const void* e;
  int64_t lde;
  const float* sqnorm;  // [K] |e_k|^2 or nullptr
  int D;
};

// The running best of a set of rows over the codes seen so far: score x.e - |e|^2/2 and code id.
struct Best {
  float* score;
  int64_t* id;
  void merge(int64_t row, float s, int64_t k) const {
    if (s > score[row]) {  // strict: an earlier chunk keeps a tie
      score[row] = s;
      id[row] = k;
    }
  }
};

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <class V> std::unique_ptr<V[], AlignedFree> aligned(size_t n) {
  const size_t bytes = (n * sizeof(V) + 63) / 64 * 64;
  return std::unique_ptr<V[], AlignedFree>(static_cast<V*>(std::aligned_alloc(64, bytes ? bytes : 64)));
}

// ---- large D: 6 x 64 register tile over a packed codebook chunk --------------------------------
// Rows x codes of the register tile: 6 x 64 (24 accumulators + 4 codebook vectors + 1 broadcast)
// measured 5-10% faster than 12 x 32 and 8 x 48: each row's lane state is loaded and stored once
// per 4 accumulators, and a step over d needs 10 loads for 24 FMAs instead of 14.
constexpr int kVec = 4;               // zmm per row of the tile
constexpr int kTile = 16 * kVec;      // codes per tile
constexpr int kRows = 6;              // rows per tile
constexpr int64_t kChunkBytes = 256 << 10;  // packed chunk: two of them (double buffer) fit L2

int large_chunk(int D, int64_t codes) {  // codes per packed chunk, a multiple of the tile
  const int64_t fit = std::max<int64_t>(kTile, kChunkBytes / (4 * D) / kTile * kTile);
  return int(std::min(fit, (codes + kTile - 1) / kTile * kTile));
}

// Tile t of the chunk of codes [k0, k0 + n): packed[t] = [D][64] fp32, nh[64t + j] = -|e|^2/2;
// codes past n get -inf so they never win.
template <Dt T>
void pack_tile(const Problem& p, int64_t k0, int n, int t, float* packed, float* nh) {
  const int D = p.D;
  float* dst = packed + int64_t(t) * D * kTile;
  for (int j = 0; j < kTile; ++j) {
    const int c = t * kTile + j;
    if (c >= n) {
      for (int d = 0; d < D; ++d) dst[d * kTile + j] = 0.f;
      nh[c] = kNegInf;
      continue;
    }
    const int64_t row = (k0 + c) * p.lde;
    float ss = 0.f;
    for (int d = 0; d < D; ++d) {
      const float v = load1<T>(p.e, row + d);
      dst[d * kTile + j] = v;
      ss += v * v;
    }
    nh[c] = neg_half(p.sqnorm ? p.sqnorm[k0 + c] : ss);
  }
}

template <int R>
void tile_kernel(const float* x, int64_t ldx, const float* bt, int D, const float* nh, int32_t k,
                 float* lane_best, int32_t* lane_id) {
  __m512 acc[R][kVec];
  __m512 h[kVec];
#pragma GCC unroll 4
  for (int v = 0; v < kVec; ++v) h[v] = _mm512_loadu_ps(nh + 16 * v);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVec; ++v) acc[r][v] = h[v];
#pragma GCC unroll 2
  for (int d = 0; d < D; ++d) {
    __m512 b[kVec];
#pragma GCC unroll 4
    for (int v = 0; v < kVec; ++v) b[v] = _mm512_load_ps(bt + d * kTile + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + d]);
#pragma GCC unroll 4
      for (int v = 0; v < kVec; ++v) acc[r][v] = _mm512_fmadd_ps(xv, b[v], acc[r][v]);
    }
  }
  const __m512i id0 = _mm512_add_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(k));
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    __m512 b = _mm512_load_ps(lane_best + r * 16);
    __m512i i = _mm512_load_si512(lane_id + r * 16);
#pragma GCC unroll 4
    for (int v = 0; v < kVec; ++v) {  // lane l sees codes 64t+l, 64t+16+l, ... in order; an
      // ordered '>' keeps the lower index on a tie and is false for NaN
      const __mmask16 m = _mm512_cmp_ps_mask(acc[r][v], b, _CMP_GT_OQ);
      b = _mm512_mask_mov_ps(b, m, acc[r][v]);
      i = _mm512_mask_mov_epi32(i, m, _mm512_add_epi32(id0, _mm512_set1_epi32(16 * v)));
    }
    _mm512_store_ps(lane_best + r * 16, b);
    _mm512_store_si512(lane_id + r * 16, i);
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int, const float*, int32_t, float*,
                        int32_t*);
template <int... Rs> constexpr std::array<TileFn, kRows + 1> tile_fns(std::integer_sequence<int, Rs...>) {
  return {nullptr, &tile_kernel<Rs + 1>...};
}
constexpr auto kTileFns = tile_fns(std::make_integer_sequence<int, kRows>{});

// One call's threads. The caller is member 0; the others are std::threads, joined at the end.
// Not an OpenMP team: libgomp's waiting threads spin for milliseconds (GOMP_SPINCOUNT) before
// they sleep, and on this machine, shared with other processes, that turned a 1.2 ms call into
// 36 ms (the spinning thread holds the core its preempted partner needs). Here a barrier sleeps
// on a condition variable, and work is handed out through atomic counters.
class Team {
 public:
  explicit Team(int n) : n_(n) {}
  int size() const { return n_; }
  template <class F> void run(F f) {  // f(member) on every member
    std::vector<std::thread> others;
    for (int t = 1; t < n_; ++t) others.emplace_back(f, t);
    f(0);
    for (auto& th : others) th.join();
  }
  void barrier() {
    if (n_ == 1) return;
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0, ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  int n_, arrived_ = 0;
  int64_t gen_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
};

// What a member of a team needs to walk a regime's chunks: the team, which member it is, the
// shared double buffer, one row-block counter per chunk, and its own scratch.
struct Walk {
  Team& team;
  int member;
  float* buf;
  std::atomic<int64_t>* next;
  float* scratch;
};

// Member's share of chunk i + 1 is packed into the other half of the double buffer while the row
// blocks of chunk i are handed out one at a time (a preempted thread holds the others back by
// one block, not by its share): one barrier per chunk.
template <class Pack, class Block>
void sweep(const Walk& w, int64_t chunks, int64_t blocks, Pack pack, Block block) {
  pack(int64_t(0));
  w.team.barrier();
  for (int64_t i = 0; i < chunks; ++i) {
    if (i + 1 < chunks) pack(i + 1);
    for (int64_t b; (b = w.next[i].fetch_add(1, std::memory_order_relaxed)) < blocks;) block(i, b);
    w.team.barrier();  // chunk i + 1 is packed; half i % 2 is free again
  }
}

// Rows [m0, m1) against codes [k0, k1), folded into best (each row in exactly one block).
template <Dt T>
void large_d(const Problem& p, int64_t m0, int64_t m1, int64_t k0, int64_t k1, Best best,
             const Walk& w) {
  const int D = p.D, kc = large_chunk(D, k1 - k0);
  const int64_t half = int64_t(kc) * (D + 1), chunks = (k1 - k0 + kc - 1) / kc;
  const int64_t blocks = (m1 - m0 + kRows - 1) / kRows;
  alignas(64) float lane_best[kRows * 16];
  alignas(64) int32_t lane_id[kRows * 16];
  auto pack = [&](int64_t i) {  // chunk i -> half i % 2: tiles, then -|e|^2/2
    const int64_t c0 = k0 + i * kc;
    const int n = int(std::min<int64_t>(kc, k1 - c0)), tiles = (n + kTile - 1) / kTile;
    float* packed = w.buf + (i % 2) * half;
    for (int t = w.member; t < tiles; t += w.team.size())
      pack_tile<T>(p, c0, n, t, packed, packed + int64_t(kc) * D);
  };
  auto block = [&](int64_t i, int64_t b) {
    const int64_t c0 = k0 + i * kc, r0 = m0 + b * kRows;
    const int n = int(std::min<int64_t>(kc, k1 - c0)), tiles = (n + kTile - 1) / kTile;
    const int R = int(std::min<int64_t>(kRows, m1 - r0));
    const float* packed = w.buf + (i % 2) * half;
    const float* nh = packed + int64_t(kc) * D;
    const float* xr;
    int64_t ldx;
    if constexpr (T == Dt::f32) {
      xr = static_cast<const float*>(p.x) + r0 * p.ldx, ldx = p.ldx;
    } else {  // 16-bit rows -> fp32 once per block and chunk (cheap next to the tiles)
      for (int r = 0; r < R; ++r)
        for (int d = 0; d < D; d += 16)
          _mm512_mask_storeu_ps(w.scratch + r * D + d, first(D - d),
                                loadn<T>(p.x, (r0 + r) * p.ldx + d, std::min(16, D - d)));
      xr = w.scratch, ldx = D;
    }
    for (int r = 0; r < R; ++r) {
      _mm512_store_ps(lane_best + r * 16, _mm512_set1_ps(kNegInf));
      _mm512_store_si512(lane_id + r * 16, _mm512_setzero_si512());
    }
    for (int t = 0; t < tiles; ++t)
      kTileFns[R](xr, ldx, packed + int64_t(t) * D * kTile, D, nh + t * kTile,
                  int32_t(c0) + t * kTile, lane_best, lane_id);
    for (int r = 0; r < R; ++r) {  // 16 lanes -> one (score, lowest id) per row
      const __m512 lb = _mm512_load_ps(lane_best + r * 16);
      const float mx = _mm512_reduce_max_ps(lb);
      if (mx > best.score[r0 + r]) {
        const __mmask16 eq = _mm512_cmp_ps_mask(lb, _mm512_set1_ps(mx), _CMP_EQ_OQ);
        best.merge(r0 + r, mx, _mm512_mask_reduce_min_epi32(eq, _mm512_load_si512(lane_id + r * 16)));
      }
    }
  };
  sweep(w, chunks, blocks, pack, block);
}

// ---- small D: rows transposed in registers, codes broadcast -----------------------------------
constexpr int kSmallD = 8;  // measured: below, the register-transposed rows win; above, the tiles
constexpr int kSmallChunk = 4096;  // codes per chunk: (D+1) * 4096 * 4 B <= 272 KiB

int small_chunk(int64_t codes) { return int(std::min<int64_t>(kSmallChunk, codes)); }

template <int D> constexpr int small_vecs() { return D <= 4 ? 4 : D <= 8 ? 2 : 1; }

// One block of 16*V rows (xt: [D][16V] fp32) against n packed codes [n][D+1] = (e, -|e|^2/2).
template <int D>
void small_block(const float* xt, const float* pk, int n, int32_t c0, float* out_best,
                 int32_t* out_id) {
  constexpr int V = small_vecs<D>();
  __m512 xv[D][V], best[V];
  __m512i id[V];
#pragma GCC unroll 16
  for (int d = 0; d < D; ++d)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) xv[d][v] = _mm512_load_ps(xt + d * 16 * V + 16 * v);
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) best[v] = _mm512_set1_ps(kNegInf), id[v] = _mm512_setzero_si512();
  __m512i code = _mm512_set1_epi32(c0);
  const __m512i one = _mm512_set1_epi32(1);
  for (int c = 0; c < n; ++c, pk += D + 1) {
    __m512 s[V];
    const __m512 h = _mm512_set1_ps(pk[D]);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) s[v] = h;
#pragma GCC unroll 16
    for (int d = 0; d < D; ++d) {
      const __m512 ed = _mm512_set1_ps(pk[d]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) s[v] = _mm512_fmadd_ps(xv[d][v], ed, s[v]);
    }
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {  // per lane = per row: codes come in order, strict '>'
      const __mmask16 m = _mm512_cmp_ps_mask(s[v], best[v], _CMP_GT_OQ);
      best[v] = _mm512_mask_mov_ps(best[v], m, s[v]);
      id[v] = _mm512_mask_mov_epi32(id[v], m, code);
    }
    code = _mm512_add_epi32(code, one);
  }
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    _mm512_storeu_ps(out_best + 16 * v, best[v]);
    _mm512_storeu_si512(out_id + 16 * v, id[v]);
  }
}

template <Dt T, int D>
void small_d(const Problem& p, int64_t m0, int64_t m1, int64_t k0, int64_t k1, Best best,
             const Walk& w) {
  constexpr int V = small_vecs<D>(), RB = 16 * V;
  const int kc = small_chunk(k1 - k0);
  const int64_t blocks = (m1 - m0 + RB - 1) / RB, chunks = (k1 - k0 + kc - 1) / kc;
  const int64_t half = int64_t(kc) * (D + 1);
  alignas(64) float xt[D * RB], bb[RB];
  alignas(64) int32_t bi[RB];
  auto pack = [&](int64_t i) {  // chunk i -> half i % 2: [n][D + 1] = (e, -|e|^2/2)
    const int64_t c0 = k0 + i * kc;
    const int n = int(std::min<int64_t>(kc, k1 - c0));
    float* pk = w.buf + (i % 2) * half;
    for (int c = w.member; c < n; c += w.team.size()) {
      float* dst = pk + int64_t(c) * (D + 1);
      float ss = 0.f;
      for (int d = 0; d < D; ++d) dst[d] = load1<T>(p.e, (c0 + c) * p.lde + d), ss += dst[d] * dst[d];
      dst[D] = neg_half(p.sqnorm ? p.sqnorm[c0 + c] : ss);
    }
  };
  auto block = [&](int64_t i, int64_t b) {
    const int64_t c0 = k0 + i * kc, r0 = m0 + b * RB;
    const int n = int(std::min<int64_t>(kc, k1 - c0)), R = int(std::min<int64_t>(RB, m1 - r0));
    for (int d = 0; d < D; ++d)
      for (int r = 0; r < RB; ++r) xt[d * RB + r] = r < R ? load1<T>(p.x, (r0 + r) * p.ldx + d) : 0.f;
    small_block<D>(xt, w.buf + (i % 2) * half, n, int32_t(c0), bb, bi);
    for (int r = 0; r < R; ++r) best.merge(r0 + r, bb[r], bi[r]);
  };
  sweep(w, chunks, blocks, pack, block);
}

// Floats of the shared double buffer a regime needs for `codes` codes, and its chunk count.
size_t buffer_floats(int D, int64_t codes) {
  if (D <= kSmallD) return size_t(2) * small_chunk(codes) * (D + 1);
  return size_t(2) * large_chunk(D, codes) * (D + 1);
}
int64_t chunk_count(int D, int64_t codes) {
  const int64_t kc = D <= kSmallD ? small_chunk(codes) : large_chunk(D, codes);
  return (codes + kc - 1) / kc;
}
size_t scratch_floats(int D, bool f32) { return f32 || D <= kSmallD ? 0 : size_t(kRows) * D; }

template <Dt T, int... Ds>
void run_regime(const Problem& p, int64_t m0, int64_t m1, int64_t k0, int64_t k1, Best best,
                const Walk& w, std::integer_sequence<int, Ds...>) {
  if (p.D > kSmallD) return large_d<T>(p, m0, m1, k0, k1, best, w);
  ((p.D == Ds + 1 ? small_d<T, Ds + 1>(p, m0, m1, k0, k1, best, w) : void()), ...);
}

// Threads for a problem: the caller's OpenMP setting (OMP_NUM_THREADS, torch.set_num_threads),
// and one thread for small problems, where starting threads costs more than it saves.
int thread_count(int64_t M, int64_t K, int D) {
  const double macs = double(M) * double(K) * std::max(D, 8);
  return macs < double(1 << 22) ? 1 : std::max(1, omp_get_max_threads());
}

// Rows are split between the threads when there are enough of them; a few rows split the codes
// instead (each thread walks its own range alone) and the winners are merged in code order, so a
// tie still goes to the lowest index.
bool split_rows(int64_t M, int D, int threads) {
  return threads == 1 || M >= 4 * threads * (D > kSmallD ? kRows : 64);
}

// Bytes nearest() allocates besides its outputs (the benchmark reports them next to the 4*M*K
// bytes of the distance matrix the peers build). Mirrors the allocations below.
int64_t temp_bytes(int64_t M, int64_t K, int D, bool f32) {
  const int threads = thread_count(M, K, D);
  const int64_t scratch = int64_t(threads) * scratch_floats(D, f32) * 4;
  if (split_rows(M, D, threads)) return M * 4 + int64_t(buffer_floats(D, K)) * 4 + scratch;
  int64_t bufs = 0;
  for (int t = 0; t < threads; ++t)
    bufs += int64_t(buffer_floats(D, K * (t + 1) / threads - K * t / threads)) * 4;
  return M * 4 + M * threads * 12 + bufs + scratch;
}

template <Dt T>
void nearest(const Problem& p, int64_t M, int64_t K, int64_t* ids, float* dist) {
  const int threads = thread_count(M, K, p.D);
  const auto seq = std::make_integer_sequence<int, kSmallD>{};
  const bool by_rows = split_rows(M, p.D, threads);
  auto score = aligned<float>(size_t(M));
  auto scratch = aligned<float>(threads * scratch_floats(p.D, T == Dt::f32));
  const size_t scratch_step = scratch_floats(p.D, T == Dt::f32);
  // by rows: one shared buffer and counter set; by codes: one of each per thread, plus its winners
  const int parts = by_rows ? 1 : threads;
  std::vector<int64_t> k_lo(parts), k_hi(parts), buf_at(parts + 1, 0), next_at(parts + 1, 0);
  for (int t = 0; t < parts; ++t) {
    k_lo[t] = K * t / parts, k_hi[t] = K * (t + 1) / parts;
    buf_at[t + 1] = buf_at[t] + int64_t(buffer_floats(p.D, std::max<int64_t>(1, k_hi[t] - k_lo[t])));
    next_at[t + 1] = next_at[t] + chunk_count(p.D, k_hi[t] - k_lo[t]);
  }
  auto buf = aligned<float>(size_t(buf_at[parts]));
  std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[size_t(next_at[parts]) + 1]);
  for (int64_t i = 0; i <= next_at[parts]; ++i) next[i].store(0);
  auto part_score = aligned<float>(by_rows ? 0 : size_t(M) * parts);
  auto part_id = aligned<int64_t>(by_rows ? 0 : size_t(M) * parts);
  if (!score || !buf || (!scratch && scratch_step) || (!by_rows && (!part_score || !part_id)))
    throw std::bad_alloc();
  for (int64_t m = 0; m < M; ++m) score[m] = kNegInf, ids[m] = -1;

  Team team(threads);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  team.run([&](int member) {
    const int64_t mine0 = M * member / threads, mine1 = M * (member + 1) / threads;  // own rows
    float* own_scratch = scratch.get() + member * scratch_step;
    if (by_rows) {
      const Walk w{team, member, buf.get(), next.get(), own_scratch};
      run_regime<T>(p, 0, M, 0, K, Best{score.get(), ids}, w, seq);
    } else {
      const Best part{part_score.get() + M * member, part_id.get() + M * member};
      for (int64_t m = 0; m < M; ++m) part.score[m] = kNegInf, part.id[m] = -1;
      if (k_lo[member] < k_hi[member]) {
        Team one(1);
        const Walk w{one, 0, buf.get() + buf_at[member], next.get() + next_at[member], own_scratch};
        run_regime<T>(p, 0, M, k_lo[member], k_hi[member], part, w, seq);
      }
      team.barrier();
      const Best b{score.get(), ids};
      for (int64_t m = mine0; m < mine1; ++m)  // merge in code order: ties -> lowest id
        for (int t = 0; t < parts; ++t) b.merge(m, part_score[M * t + m], part_id[M * t + m]);
    }
    // the distance to the chosen code, directly; id -1 where it is not finite
    for (int64_t m = mine0; m < mine1; ++m) {
      float d2 = ids[m] >= 0 ? sqdist<T>(p.x, m * p.ldx, p.e, ids[m] * p.lde, p.D) : nan;
      if (!std::isfinite(d2)) ids[m] = -1, d2 = nan;
      if (dist) dist[m] = d2;
    }
  });
}

// ---- Python boundary: numpy views of torch tensors (no copies), checked in kernels/__init__.py
int64_t row_stride(const py::array& a, const char* name) {
  const auto item = a.itemsize();
  if (a.ndim() != 2 || (a.shape(1) > 1 && a.strides(1) != item) || a.strides(0) % item)
    throw std::invalid_argument(std::string(name) + ": expected a 2-D array with unit-stride rows");
  return a.shape(0) > 1 ? a.strides(0) / item : a.shape(1);
}

// The data of a contiguous 1-D array of n elements of V.
template <class V> V* vector_of(py::array& a, int64_t n, const char* what) {
  if (a.ndim() != 1 || a.shape(0) != n || a.itemsize() != sizeof(V) || !(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(what) + ": expected a contiguous array of " + std::to_string(n));
  return static_cast<V*>(a.mutable_data());
}

void nearest_code(py::array x, py::array codebook, std::optional<py::array> sqnorm, py::array ids,
                  std::optional<py::array> dist, const std::string& dtype) {
  Dt dt;
  if (dtype == "float32") dt = Dt::f32;
  else if (dtype == "float16") dt = Dt::f16;
  else if (dtype == "bfloat16") dt = Dt::bf16;
  else throw std::invalid_argument("dtype: expected float32, float16 or bfloat16, got " + dtype);
  if (x.itemsize() != (dt == Dt::f32 ? 4 : 2) || codebook.itemsize() != x.itemsize())
    throw std::invalid_argument("x, codebook: itemsize does not match dtype " + dtype);
  const int64_t M = x.shape(0), K = codebook.shape(0);
  const int D = int(x.shape(1));
  if (codebook.shape(1) != D || K < 1 || D < 1 || K > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("codebook: expected [K >= 1, D] with D matching x");
  int64_t* ip = vector_of<int64_t>(ids, M, "ids (int64)");
  float* dp = dist ? vector_of<float>(*dist, M, "dist (float32)") : nullptr;
  const float* sq = sqnorm ? vector_of<float>(*sqnorm, K, "codebook_sqnorm (float32)") : nullptr;
  const Problem p{x.data(), row_stride(x, "x"), codebook.data(), row_stride(codebook, "codebook"),
                  sq, D};
  if (M == 0) return;
  py::gil_scoped_release release;
  switch (dt) {
    case Dt::f32: nearest<Dt::f32>(p, M, K, ip, dp); break;
    case Dt::f16: nearest<Dt::f16>(p, M, K, ip, dp); break;
    case Dt::bf16: nearest<Dt::bf16>(p, M, K, ip, dp); break;
  }
}

}  // namespace

void register_codebook(py::module_& m) {
  m.def("nearest_code_temp_bytes",
        [](int64_t M, int64_t K, int D, const std::string& dtype) {
          return temp_bytes(M, K, D, dtype == "float32");
        },
        py::arg("M"), py::arg("K"), py::arg("D"), py::arg("dtype"),
        "Bytes of temporaries nearest_code allocates for [M, D] x [K, D] (outputs excluded).");
  m.def("nearest_code", &nearest_code, py::arg("x"), py::arg("codebook"), py::arg("sqnorm"),
        py::arg("ids"), py::arg("dist"), py::arg("dtype"),
        "ids[m] = argmin_k |x[m] - codebook[k]|^2 (see kernels/cpu/codebook.cpp); writes ids "
        "(int64 [M]) and, if given, dist (float32 [M]). fp16/bf16 arrays are passed as 16-bit "
        "integer views with dtype naming their real type.");
}
