// The CPU matrix product, after the BLIS/GotoBLAS design: C is cut into blocks of (a group of rows) x (a
// panel of up to column_panel() columns), one task each for the worker pool; a task walks K in slices of KC,
// packs its slice of B into NR-column strips once, then for each MC-row block packs that slice of A into MR-row
// strips (contiguous, zero-padded) and runs an MR x NR register-blocked kernel over them. Packing makes every
// operand layout (plain or transposed) read the same way. Tasks share nothing.
//
// Products with fewer rows than a strip (the per-step recurrent products at batch 1 or 2) take a direct
// path: with one or two rows, packing would waste most of the kernel on padding.
#include "gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include <unistd.h>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "amx.h"
#include "thread_pool.h"

namespace conveyor::cpu {
namespace {

// MR x NR: the register tile of the micro-kernel. With AVX-512, 12 rows of two 64-byte vectors: 24
// accumulators of the 32 registers, 24 multiply-adds for every two vectors of B read (8 rows, 16 of them,
// ran the large products of the Xeon 10-18% slower: the B strips stream from L2). Strips of 8 and 4 rows
// have kernels of their own, so the batch sizes recurrent layers use (8, 16, 32, 64) carry no padded rows.
// With AVX2, 6 rows of two 32-byte vectors, 12 of the 16 registers (and kernels of 4 and 2 rows).
template <typename T>
struct Blocking;
#if defined(__AVX512F__)
template <>
struct Blocking<float> {
  static constexpr int MR = 12, NR = 32, KC = 256, MC = 96, NC = 256;
};
template <>
struct Blocking<double> {
  static constexpr int MR = 12, NR = 16, KC = 256, MC = 96, NC = 128;
};
#else
template <>
struct Blocking<float> {
  static constexpr int MR = 6, NR = 16, KC = 256, MC = 96, NC = 256;
};
template <>
struct Blocking<double> {
  static constexpr int MR = 6, NR = 8, KC = 256, MC = 96, NC = 128;
};
#endif

// The widest column panel a task takes: the largest power of two of columns whose packed K slice of B (KC rows)
// fills at most half of the core's L2, where it stays while the task's blocks of A stream past it; at most 1024,
// and NC where the L2's size is unknown. A 2 MB L2 (Xeon, Sapphire Rapids) gets 1024 columns of float: the
// largest products went from 87-104 to 111-118 GFLOP/s on one core with them (256 before); on a 1 MB L2 (AMD
// EPYC, Zen 4) a 1024-column panel, the whole L2, was slower than 256, and the rule gives 512.
template <typename T>
int64_t column_panel() {
  static const int64_t width = [] {
    int64_t l2 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (l2 <= 0) return int64_t(Blocking<T>::NC);
    int64_t columns = Blocking<T>::NR;
    const auto panel_bytes = [](int64_t n) { return n * Blocking<T>::KC * int64_t(sizeof(T)); };
    while (columns < 1024 && panel_bytes(2 * columns) <= l2 / 2) columns *= 2;
    return columns;
  }();
  return width;
}

// Every multiply-add of every path goes through these, so that each product is rounded the same way on
// every path: one fused rounding where the processor has FMA, a multiply then an add where it has not. (The
// library is compiled without automatic contraction, which the compiler applied to some loops and not
// others.)
#if defined(__FMA__)
template <typename T>
inline T multiply_add(T a, T b, T c) {
  return std::fma(a, b, c);
}
#else
template <typename T>
inline T multiply_add(T a, T b, T c) {
  return a * b + c;
}
#endif

// C = alpha * s (first K slice, beta == 0), beta * C + alpha * s (first slice), or C + alpha * s (later).
template <typename T>
inline void accumulate_into(T& c, T s, T alpha, T beta, bool first_slice) {
  if (!first_slice) {
    c = multiply_add(alpha, s, c);
  } else if (beta == T(0)) {
    c = alpha * s;
  } else {
    c = multiply_add(alpha, s, beta * c);
  }
}

// The rows of the micro-kernel that runs a strip of `rows` rows of A: MR, or for the last strip of a batch
// that is not a multiple of MR, the next multiple of MR / 3 (its padded rows are computed, then dropped).
template <typename T>
constexpr int kernel_height(int rows) {
  constexpr int MR = Blocking<T>::MR;
  return rows <= MR / 3 ? MR / 3 : rows <= 2 * MR / 3 ? 2 * MR / 3 : MR;
}

#if defined(__SSE__)
// Four lines of an operand (kc values each, contiguous, `line_stride` apart: rows of a row-major A, columns of
// a column-major B) across a strip `width` values wide, value k of line r to packed[k * width + r]; four
// values of k at a time: a 4 x 4 transpose in registers, then four 16-byte stores. Value by value, each was a
// store of its own, and packing A took 9% of an LSTM's forward + backward on the Xeon (T=64, B=32, H=256,
// one thread); this cut that by a quarter.
inline void pack_four_lines(const float* src, int64_t line_stride, int64_t kc, float* packed, int width) {
  int64_t k = 0;
  for (; k + 4 <= kc; k += 4) {
    __m128 k0 = _mm_loadu_ps(src + k), k1 = _mm_loadu_ps(src + line_stride + k);
    __m128 k2 = _mm_loadu_ps(src + 2 * line_stride + k), k3 = _mm_loadu_ps(src + 3 * line_stride + k);
    _MM_TRANSPOSE4_PS(k0, k1, k2, k3);
    _mm_storeu_ps(packed + k * width, k0);
    _mm_storeu_ps(packed + (k + 1) * width, k1);
    _mm_storeu_ps(packed + (k + 2) * width, k2);
    _mm_storeu_ps(packed + (k + 3) * width, k3);
  }
  for (; k < kc; ++k)
    for (int r = 0; r < 4; ++r) packed[k * width + r] = src[r * line_stride + k];
}
#endif

// A scratch buffer grown to hold at least `size` values, never shrunk: resized down for one product and up
// for the next, a vector zero-fills the regrown part, and products of alternating widths (x W^T, then dA W)
// spent 1-2% of an LSTM's forward + backward in memset.
template <typename T>
void grow(std::vector<T>& buffer, int64_t size) {
  if (buffer.size() < static_cast<size_t>(size)) buffer.resize(static_cast<size_t>(size));
}

template <typename T>
void pack_a(const MatrixRef<T>& A, int64_t m0, int64_t mc, int64_t k0, int64_t kc, T* packed) {
  constexpr int MR = Blocking<T>::MR;
  // Rows read along their length where A is row-major, columns copied whole where it is column-major (a
  // transposed operand); with the row count a constant, the compiler unrolls the column copies.
  const auto copy_strip = [&](const T* src, auto rows) {
    if (A.col_stride == 1) {
      int r = 0;
#if defined(__SSE__)
      if constexpr (std::is_same_v<T, float>) {
        for (; r + 4 <= rows; r += 4) pack_four_lines(src + r * A.row_stride, A.row_stride, kc, packed + r, MR);
      }
#endif
      for (; r < rows; ++r)
        for (int64_t k = 0; k < kc; ++k) packed[k * MR + r] = src[r * A.row_stride + k];
    } else if (A.row_stride == 1) {
      for (int64_t k = 0; k < kc; ++k)
        for (int r = 0; r < rows; ++r) packed[k * MR + r] = src[k * A.col_stride + r];
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int r = 0; r < rows; ++r) packed[k * MR + r] = src[k * A.col_stride + r * A.row_stride];
    }
    // Zeros in the rows that the strip's kernel reads beyond A's (kernel_height()), row by row: a loop over
    // a row's few padded elements became a call of memset for every k, 10% of a product at batch 8.
    for (int r = rows; r < kernel_height<T>(rows); ++r)
      for (int64_t k = 0; k < kc; ++k) packed[k * MR + r] = T(0);
  };
  for (int64_t strip = 0; strip < mc; strip += MR) {
    const T* src = A.data + (m0 + strip) * A.row_stride + k0 * A.col_stride;
    const int rows = static_cast<int>(std::min<int64_t>(MR, mc - strip));
    if (rows == MR) {
      copy_strip(src, std::integral_constant<int, MR>());
    } else {  // a last strip of a batch that is not a multiple of MR (8 of 12 at batch 8: every step's)
      copy_strip(src, rows);
    }
    packed += kc * MR;
  }
}

template <typename T>
void pack_b(const MatrixRef<T>& B, int64_t k0, int64_t kc, int64_t n0, int64_t nc, T* packed) {
  constexpr int NR = Blocking<T>::NR;
  for (int64_t strip = 0; strip < nc; strip += NR) {
    const int64_t cols = std::min<int64_t>(NR, nc - strip);
    // Whole strips, the most of every product: a row-major B's rows copied at a constant width (two vector
    // moves, where the general loop below spent a third of its time in its own bookkeeping); a column-major
    // B's columns transposed four at a time.
    const T* first = B.data + k0 * B.row_stride + (n0 + strip) * B.col_stride;
    if (cols == NR && B.col_stride == 1) {
      for (int64_t k = 0; k < kc; ++k) std::memcpy(packed + k * NR, first + k * B.row_stride, sizeof(T) * NR);
      packed += kc * NR;
      continue;
    }
#if defined(__SSE__)
    if constexpr (std::is_same_v<T, float>) {
      if (cols == NR && B.row_stride == 1) {
        for (int c = 0; c < NR; c += 4) pack_four_lines(first + c * B.col_stride, B.col_stride, kc, packed + c, NR);
        packed += kc * NR;
        continue;
      }
    }
#endif
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = B.data + (k0 + k) * B.row_stride + (n0 + strip) * B.col_stride;
      if (B.col_stride == 1) {
        for (int64_t c = 0; c < cols; ++c) packed[c] = src[c];
      } else {
        for (int64_t c = 0; c < cols; ++c) packed[c] = src[c * B.col_stride];
      }
      for (int64_t c = cols; c < NR; ++c) packed[c] = T(0);
      packed += NR;
    }
  }
}

// How a micro-kernel call leaves its sums s: raw in an MR x NR buffer (a tile cut by C's edges, finished
// element by element), or finished into a whole tile of C as accumulate_into() does.
enum class TileStore { kRaw, kOverwrite, kScaleAdd, kAdd };

template <typename T>
TileStore tile_store(T beta, bool first_slice) {
  if (!first_slice) return TileStore::kAdd;
  return beta == T(0) ? TileStore::kOverwrite : TileStore::kScaleAdd;
}

#if defined(__FMA__)
// One SIMD register of T and the four operations the micro-kernel needs, as intrinsics: with the GCC vector
// extensions the compiler kept B's vectors on the stack and fed every FMA from memory (about 45% of the
// peak); with intrinsics the whole tile stays in registers.
template <typename T>
struct Simd;
#if defined(__AVX512F__)
template <>
struct Simd<float> {
  using Vector = __m512;
  static constexpr int kLanes = 16;
  static Vector zero() { return _mm512_setzero_ps(); }
  static Vector load(const float* p) { return _mm512_loadu_ps(p); }
  static Vector broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Vector multiply_add(Vector a, Vector b, Vector c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, Vector v) { _mm512_storeu_ps(p, v); }
  static Vector multiply(Vector a, Vector b) { return _mm512_mul_ps(a, b); }
  static Vector set(float value) { return _mm512_set1_ps(value); }
};
template <>
struct Simd<double> {
  using Vector = __m512d;
  static constexpr int kLanes = 8;
  static Vector zero() { return _mm512_setzero_pd(); }
  static Vector load(const double* p) { return _mm512_loadu_pd(p); }
  static Vector broadcast(const double* p) { return _mm512_set1_pd(*p); }
  static Vector multiply_add(Vector a, Vector b, Vector c) { return _mm512_fmadd_pd(a, b, c); }
  static void store(double* p, Vector v) { _mm512_storeu_pd(p, v); }
  static Vector multiply(Vector a, Vector b) { return _mm512_mul_pd(a, b); }
  static Vector set(double value) { return _mm512_set1_pd(value); }
};
#else
template <>
struct Simd<float> {
  using Vector = __m256;
  static constexpr int kLanes = 8;
  static Vector zero() { return _mm256_setzero_ps(); }
  static Vector load(const float* p) { return _mm256_loadu_ps(p); }
  static Vector broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Vector multiply_add(Vector a, Vector b, Vector c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, Vector v) { _mm256_storeu_ps(p, v); }
  static Vector multiply(Vector a, Vector b) { return _mm256_mul_ps(a, b); }
  static Vector set(float value) { return _mm256_set1_ps(value); }
};
template <>
struct Simd<double> {
  using Vector = __m256d;
  static constexpr int kLanes = 4;
  static Vector zero() { return _mm256_setzero_pd(); }
  static Vector load(const double* p) { return _mm256_loadu_pd(p); }
  static Vector broadcast(const double* p) { return _mm256_broadcast_sd(p); }
  static Vector multiply_add(Vector a, Vector b, Vector c) { return _mm256_fmadd_pd(a, b, c); }
  static void store(double* p, Vector v) { _mm256_storeu_pd(p, v); }
  static Vector multiply(Vector a, Vector b) { return _mm256_mul_pd(a, b); }
  static Vector set(double value) { return _mm256_set1_pd(value); }
};
#endif

// s[MR][NR] = sum over k of a[k][:] outer b[k][:], each element one fused multiply-add per k, in k order,
// for the first kRows rows of the strip (a strip of A is MR wide whatever kRows is; kRows < MR serves a
// last strip of few rows without the arithmetic of its padded ones, each row's sums the same). A strip of B
// is two vectors, held in two named variables: as an array GCC kept them on the stack. The sums go to `out`
// (ld elements a row) as `store` says, with accumulate_into()'s operations in vectors (the same roundings):
// a whole tile straight into C, without a round trip through a buffer.
template <typename T, int kRows = Blocking<T>::MR>
__attribute__((noinline)) void micro_kernel(int64_t kc, const T* __restrict a, const T* __restrict b,
                                            T* __restrict out, int64_t ld, TileStore store, T alpha, T beta) {
  using S = Simd<T>;
  using V = typename S::Vector;
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NR, L = S::kLanes;
  static_assert(NR == 2 * L, "a strip of B is two vectors");
  static_assert(kRows <= MR, "a strip of A has MR rows");
  // Unrolled whole, so that the accumulators are registers only: with the loops kept, GCC also gave the
  // arrays stack space, zeroed by two calls of memset in every call (a tile at batch 8 and H=36 is 36 steps
  // of k; those products ran 8-10% faster without them).
  V c0[kRows], c1[kRows];
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) c0[r] = c1[r] = S::zero();
  for (int64_t k = 0; k < kc; ++k) {
    // B's strip streams from L2 where many rows of A pass it (the time-parallel products); the hardware's
    // next-line prefetch left the kernel waiting on it, and fetching 8 steps of k ahead took those products
    // from 85-100 to 97-113 GFLOP/s on one core of the Xeon. (A prefetch never faults past the strip's end.)
    _mm_prefetch(reinterpret_cast<const char*>(b + 8 * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + 8 * NR + L), _MM_HINT_T0);
    const V b0 = S::load(b), b1 = S::load(b + L);
    for (int r = 0; r < kRows; ++r) {
      const V ar = S::broadcast(a + r);
      c0[r] = S::multiply_add(ar, b0, c0[r]);
      c1[r] = S::multiply_add(ar, b1, c1[r]);
    }
    a += MR;
    b += NR;
  }
  const V alpha_v = S::set(alpha), beta_v = S::set(beta);
  const auto finish = [&](T* c, V s) {
    switch (store) {
      case TileStore::kRaw: S::store(c, s); break;
      case TileStore::kOverwrite: S::store(c, S::multiply(alpha_v, s)); break;
      case TileStore::kScaleAdd: S::store(c, S::multiply_add(alpha_v, s, S::multiply(beta_v, S::load(c)))); break;
      case TileStore::kAdd: S::store(c, S::multiply_add(alpha_v, s, S::load(c))); break;
    }
  };
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) {
    finish(out + r * ld, c0[r]);
    finish(out + r * ld + L, c1[r]);
  }
}
#else
// Without FMA: a multiply then an add, as multiply_add() does, through GCC/Clang vector extensions.
template <typename T, int kRows = Blocking<T>::MR>
void micro_kernel(int64_t kc, const T* __restrict a, const T* __restrict b, T* __restrict out, int64_t ld,
                  TileStore store, T alpha, T beta) {
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NR;
  constexpr int kLanes = 32 / sizeof(T), kVectors = NR / kLanes;
  static_assert(NR % kLanes == 0, "a strip of B is a whole number of vectors");
  typedef T Vector __attribute__((vector_size(32)));
  typedef T UnalignedVector __attribute__((vector_size(32), aligned(sizeof(T)), may_alias));
  Vector c[MR][kVectors] = {};
  for (int64_t k = 0; k < kc; ++k) {
    Vector bv[kVectors];
    for (int v = 0; v < kVectors; ++v) bv[v] = *reinterpret_cast<const UnalignedVector*>(b + v * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const Vector ar = a[r] - Vector{};  // broadcast
      for (int v = 0; v < kVectors; ++v) c[r][v] = ar * bv[v] + c[r][v];
    }
    a += MR;
    b += NR;
  }
  T sums[MR][NR];
  std::memcpy(sums, c, sizeof(c));
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < NR; ++j) {
      if (store == TileStore::kRaw) {
        out[r * ld + j] = sums[r][j];
      } else {
        accumulate_into(out[r * ld + j], sums[r][j], alpha, beta, store != TileStore::kAdd);
      }
    }
  }
}
#endif

// One task's block of C: rows [m0, m1), columns [n0, n0 + nc). Each K slice of B's panel is packed once and
// serves every MC-row block of the task's rows, so packing B costs 1/(m1 - m0) of the arithmetic, not 1/MC.
// `packed`, when given, holds B already packed and the task packs nothing of it.
// `rows`, when given, holds all of A's rows packed (PackedRows: m0 is 0) and the task packs none of them.
template <typename T>
void gemm_block(int64_t m0, int64_t m1, int64_t n0, int64_t nc, int64_t K, T alpha, const MatrixRef<T>& A,
                const MatrixRef<T>& B, const PackedMatrix<T>* packed, T beta, T* C, int64_t ldc,
                const T* rows = nullptr) {
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NR, KC = Blocking<T>::KC, MC = Blocking<T>::MC;
  thread_local std::vector<T> packed_a, packed_b;
  if (rows == nullptr) grow(packed_a, MC * KC);
  const int64_t padded_m = (m1 + MR - 1) / MR * MR;
  if (packed == nullptr) grow(packed_b, ((nc + NR - 1) / NR) * NR * KC);
  T acc[MR * NR];
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min<int64_t>(KC, K - k0);
    const bool first = k0 == 0;
    const TileStore store = tile_store(beta, first);
    const T* strips_b = packed_b.data();
    if (packed != nullptr) {
      strips_b = packed->slice(k0, n0);
    } else {
      pack_b(B, k0, kc, n0, nc, packed_b.data());
    }
    for (int64_t mb = m0; mb < m1; mb += MC) {
      const int64_t mc = std::min<int64_t>(MC, m1 - mb);
      // A packed slice by slice, strip by strip (PackedRows::pack): block mb's strips start mb * kc into
      // slice k0's.
      const T* block_a = rows != nullptr ? rows + k0 * padded_m + mb * kc : packed_a.data();
      if (rows == nullptr) pack_a(A, mb, mc, k0, kc, packed_a.data());
      const auto tile = [&](int64_t ms, int64_t ns) {
        const int64_t rows = std::min<int64_t>(MR, mc - ms), cols = std::min<int64_t>(NR, nc - ns);
        const T* strip_a = block_a + ms * kc;
        const T* strip_b = strips_b + ns * kc;
        // A strip of fewer rows (a batch not a multiple of MR) runs a lower kernel, without most of the
        // arithmetic of its padded rows; each row's sums are the same at every height.
        constexpr int kLow = MR / 3, kMid = 2 * MR / 3;
        const int height = kernel_height<T>(static_cast<int>(rows));
        const bool direct = rows == height && cols == NR;
        T* out = direct ? C + (mb + ms) * ldc + n0 + ns : acc;
        const int64_t ld = direct ? ldc : NR;
        const TileStore how = direct ? store : TileStore::kRaw;
        if (height == kLow) {
          micro_kernel<T, kLow>(kc, strip_a, strip_b, out, ld, how, alpha, beta);
        } else if (height == kMid) {
          micro_kernel<T, kMid>(kc, strip_a, strip_b, out, ld, how, alpha, beta);
        } else {
          micro_kernel<T>(kc, strip_a, strip_b, out, ld, how, alpha, beta);
        }
        if (direct) return;
        for (int64_t r = 0; r < rows; ++r) {
          T* c = C + (mb + ms + r) * ldc + n0 + ns;
          const T* s = acc + r * NR;
          for (int64_t j = 0; j < cols; ++j) accumulate_into(c[j], s[j], alpha, beta, first);
        }
      };
      // Which operand a micro-kernel call streams from L2: a strip of B (32 KB of float) with the strips of A
      // outside, or a strip of A (8 KB) with those of B outside. The second reads a quarter of the bytes, and
      // took a task of at most MC rows (the per-step products, batch <= 96) from 108-138 to 122-148 GFLOP/s
      // on one core of the Xeon; with many rows it was slower (93 against 130 for x W^T at 2048 rows): there
      // its tiles of C, a whole MC-row block apart at a leading dimension of 4 KB, fall into one set of L1.
      if (m1 - m0 <= MC) {
        for (int64_t ns = 0; ns < nc; ns += NR)
          for (int64_t ms = 0; ms < mc; ms += MR) tile(ms, ns);
      } else {
        for (int64_t ms = 0; ms < mc; ms += MR)
          for (int64_t ns = 0; ns < nc; ns += NR) tile(ms, ns);
      }
    }
  }
}

// A float product on AMX tiles (amx.h): B's parts from its PackedMatrix, or split here over the threads for
// this product alone; then tasks of (row group, column panel), rows first, so that each row of A is split
// once. A task walks its rows in blocks and K in slices, the block's parts of a slice in L2 while B's pass
// them; the sums of a slice continue those of the one before (kept exact in float32 between slices), so
// every element's sum runs in k order whatever the blocking, the task or the path.
void amx_driver(int64_t M, int64_t N, int64_t K, float alpha, const MatrixRef<float>& A, const MatrixRef<float>& B,
                const PackedMatrix<float>* packed, float beta, float* C, int64_t ldc) {
  constexpr int64_t kSliceChunks = 16, kBlockRows = 256;  // 512 of K; a block's parts of a slice: 768 KB
  const int64_t block_b = amx::block_size(K), block_a = kSliceChunks * amx::kChunkValues;
  // The calling thread's scratch, grown and kept (no allocation a call in steady state); the tasks on other
  // threads read it while the caller waits in parallel_for.
  thread_local LineVector<uint16_t> own_parts, all_rows;
  const auto grow_parts = [](LineVector<uint16_t>& parts, int64_t size) {
    if (parts.size() < static_cast<size_t>(size)) parts.resize(static_cast<size_t>(size));
  };
  const uint16_t* parts_b = nullptr;
  if (packed != nullptr) {
    parts_b = packed->parts();
  } else {
    grow_parts(own_parts, amx::parts_size(N, K));
    uint16_t* const split_b = own_parts.data();  // the caller's: a task naming own_parts gets its thread's
    const int64_t col_blocks = (N + 15) / 16;
    const int64_t split_tasks = parallel_tasks_for(double(N) * K * 8, col_blocks);
    parallel_for(split_tasks, [&](int64_t task) {
      const int64_t n0 = task * col_blocks / split_tasks * 16;
      const int64_t n1 = std::min(N, (task + 1) * col_blocks / split_tasks * 16);
      if (n0 < n1) amx::split_columns(B, K, N, n0, n1, split_b);
    });
    parts_b = split_b;
  }
  const int64_t row_tiles = (M + 31) / 32, col_tiles = (N + 31) / 32;
  const int64_t wanted = pool_size() > 1 ? 2 * static_cast<int64_t>(pool_size()) : 1;
  int64_t panel = col_tiles;  // tiles of 32 columns
  while (panel > 1 && row_tiles * ((col_tiles + panel - 1) / panel) < wanted) panel = (panel + 1) / 2;
  const int64_t col_panels = (col_tiles + panel - 1) / panel;
  const int64_t row_groups = std::min(row_tiles, std::max<int64_t>(1, (wanted + col_panels - 1) / col_panels));
  const int64_t tiles = row_groups * col_panels;
  const int64_t tasks = parallel_tasks_for(double(M) * N * K, tiles);
  struct Block {
    int64_t m0, m1, n0, n1;  // rows [m0, m1), columns [n0, n1) of C
  };
  const auto block_of = [&](int64_t tile) {
    const int64_t group = tile / col_panels, n0 = (tile % col_panels) * panel * 32;
    return Block{group * row_tiles / row_groups * 32, std::min(M, (group + 1) * row_tiles / row_groups * 32), n0,
                 std::min(N, n0 + panel * 32)};
  };
  if (col_panels > 1) {
    // Too few rows for the threads (a step's product): A split once, all of K, for every task's columns (each
    // task splitting its own copy took longer than its product: dA R at B = 32, H = 256 on 2 threads).
    grow_parts(all_rows, amx::parts_size(M, K));
    const uint16_t* const parts_a = all_rows.data();
    amx::split_rows(A, M, K, 0, M, 0, K, all_rows.data(), 0, block_b);
    parallel_for(tasks, [&](int64_t task) {
      amx::configure_tiles();
      for (int64_t tile = task; tile < tiles; tile += tasks) {
        const auto [m0, m1, n0, n1] = block_of(tile);
        for (int64_t n = n0; n < n1; n += 32) {
          for (int64_t m = m0; m < m1; m += 32) {
            amx::tile_product(parts_a + m / 16 * block_b, parts_b + n / 16 * block_b, K,
                              std::min<int64_t>(32, m1 - m), std::min<int64_t>(32, n1 - n), alpha, beta,
                              C + m * ldc + n, ldc);
          }
        }
      }
      amx::release_tiles();
    });
    return;
  }
  parallel_for(tasks, [&](int64_t task) {
    amx::configure_tiles();
    thread_local LineVector<uint16_t> parts_a;
    thread_local LineVector<float> sums;  // a block's sums so far, `width` floats a row
    for (int64_t tile = task; tile < tiles; tile += tasks) {
      const auto [m0, m1, n0, n1] = block_of(tile);
      const int64_t width = (n1 - n0 + 31) / 32 * 32;
      for (int64_t mb = m0; mb < m1; mb += kBlockRows) {
        const int64_t me = std::min(m1, mb + kBlockRows), height = (me - mb + 31) / 32 * 32;
        if (parts_a.size() < static_cast<size_t>(height / 16 * block_a)) parts_a.resize(height / 16 * block_a);
        if (sums.size() < static_cast<size_t>(height * width)) sums.resize(height * width);
        // With one slice of K, whole tiles whose sums are C as they stand go straight into C.
        const bool one_slice = K <= kSliceChunks * 32;
        for (int64_t k0 = 0; k0 < K; k0 += kSliceChunks * 32) {
          const int64_t k1 = std::min(K, k0 + kSliceChunks * 32), count = amx::chunks(k1 - k0);
          amx::split_rows(A, M, K, mb, me, k0, k1, parts_a.data(), k0, block_a);
          for (int64_t n = n0; n < n1; n += 32) {
            for (int64_t m = mb; m < me; m += 32) {
              const int64_t rows = std::min<int64_t>(32, me - m), cols = std::min<int64_t>(32, n1 - n);
              const bool into_c = one_slice && amx::stores_sums(rows, cols, alpha, beta);
              float* s = into_c ? C + m * ldc + n : sums.data() + (m - mb) * width + (n - n0);
              amx::tile_sums(parts_a.data() + (m - mb) / 16 * block_a, block_a,
                             parts_b + n / 16 * block_b + k0 / 32 * amx::kChunkValues, block_b, count, rows, cols,
                             k0 == 0 ? nullptr : s, s, into_c ? ldc : width);
              if (into_c || k1 < K) continue;
              amx::finish(s, width, rows, cols, alpha, beta, C + m * ldc + n, ldc);
            }
          }
        }
      }
    }
    amx::release_tiles();
  });
}

// Few rows: each row of C is a combination of rows of B (B row-contiguous) or a set of dot products
// (B column-contiguous). Tasks split the columns. K is walked in the same KC slices, and each slice's sum
// added to C in the same order, as the blocked path, so that a row of C comes out bit-for-bit the same
// whichever path computed it (a window split in two gives exactly the outputs of the whole window).
template <typename T>
void few_rows_columns(int64_t M, int64_t n0, int64_t n1, int64_t K, T alpha, const MatrixRef<T>& A,
                      const MatrixRef<T>& B, T beta, T* C, int64_t ldc) {
  constexpr int64_t KC = Blocking<T>::KC;
  if (n0 >= n1) return;
  std::vector<T> sum(static_cast<size_t>(n1 - n0));
  for (int64_t m = 0; m < M; ++m) {
    T* c = C + m * ldc;
    const T* a = A.data + m * A.row_stride;
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t k1 = std::min(K, k0 + KC);
      std::fill(sum.begin(), sum.end(), T(0));
      if (B.col_stride == 1) {
        for (int64_t k = k0; k < k1; ++k) {
          const T ak = a[k * A.col_stride];
          const T* b = B.data + k * B.row_stride;
          for (int64_t n = n0; n < n1; ++n) sum[n - n0] = multiply_add(ak, b[n], sum[n - n0]);
        }
      } else {
        for (int64_t n = n0; n < n1; ++n) {
          const T* b = B.data + n * B.col_stride;
          T dot = T(0);
          for (int64_t k = k0; k < k1; ++k) dot = multiply_add(a[k * A.col_stride], b[k * B.row_stride], dot);
          sum[n - n0] = dot;
        }
      }
      for (int64_t n = n0; n < n1; ++n) accumulate_into(c[n], sum[n - n0], alpha, beta, k0 == 0);
    }
  }
}

template <typename T>
void gemm_few_rows(int64_t M, int64_t N, int64_t K, T alpha, const MatrixRef<T>& A, const MatrixRef<T>& B,
                   T beta, T* C, int64_t ldc) {
  constexpr int64_t kColumnsPerChunk = 64;
  const int64_t chunks = (N + kColumnsPerChunk - 1) / kColumnsPerChunk;
  const int64_t tasks = parallel_tasks_for(double(M) * N * K, chunks);
  const int64_t per_task = (chunks + tasks - 1) / tasks * kColumnsPerChunk;
  parallel_for(tasks, [&](int64_t task) {
    const int64_t n0 = task * per_task;
    few_rows_columns(M, n0, std::min(N, n0 + per_task), K, alpha, A, B, beta, C, ldc);
  });
}

#if defined(__FMA__)
// Few rows with B packed (the per-step recurrent products at batch 1 or 2): each row of C is built strip by
// strip from the packed strips of B, vectors across the columns and k in order, so that every element sees
// the same fused multiply-adds in the same order as on the other paths. (Dot products along k would be one
// dependent chain of scalar multiply-adds per element, which the fixed order keeps from vectorising.)
template <typename T>
void few_rows_packed_columns(int64_t M, int64_t n0, int64_t n1, int64_t K, T alpha, const MatrixRef<T>& A,
                             const PackedMatrix<T>& packed, T beta, T* C, int64_t ldc) {
  using S = Simd<T>;
  constexpr int NR = Blocking<T>::NR, KC = Blocking<T>::KC, L = S::kLanes;
  constexpr int kStripsAtOnce = 4;  // 8 independent accumulator chains hide the multiply-add latency
  alignas(64) T sum[kStripsAtOnce * NR];
  const int64_t strips_end = (n1 + NR - 1) / NR;
  for (int64_t s0 = n0 / NR; s0 < strips_end; s0 += kStripsAtOnce) {
    const int64_t count = std::min<int64_t>(kStripsAtOnce, strips_end - s0);
    for (int64_t m = 0; m < M; ++m) {
      const T* a = A.data + m * A.row_stride;
      T* c_row = C + m * ldc;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min<int64_t>(KC, K - k0);
        typename S::Vector acc[2 * kStripsAtOnce];
        for (auto& v : acc) v = S::zero();
        const T* b = packed.slice(k0, s0 * NR);  // the group's strips follow one another, kc * NR each
        for (int64_t k = 0; k < kc; ++k) {
          const typename S::Vector ak = S::broadcast(a + (k0 + k) * A.col_stride);
          for (int s = 0; s < kStripsAtOnce; ++s) {
            if (s < count) {
              const T* strip = b + s * kc * NR + k * NR;
              acc[2 * s] = S::multiply_add(ak, S::load(strip), acc[2 * s]);
              acc[2 * s + 1] = S::multiply_add(ak, S::load(strip + L), acc[2 * s + 1]);
            }
          }
        }
        for (int s = 0; s < 2 * kStripsAtOnce; ++s) S::store(sum + s * L, acc[s]);
        const int64_t c0 = s0 * NR, c1 = std::min(n1, (s0 + count) * NR);
        for (int64_t n = c0; n < c1; ++n) accumulate_into(c_row[n], sum[n - c0], alpha, beta, k0 == 0);
      }
    }
  }
}

template <typename T>
void gemm_few_rows_packed(int64_t M, int64_t N, int64_t K, T alpha, const MatrixRef<T>& A,
                          const PackedMatrix<T>& packed, T beta, T* C, int64_t ldc) {
  constexpr int64_t kColumnsPerGroup = 4 * Blocking<T>::NR;  // few_rows_packed_columns' strips at once
  const int64_t groups = (N + kColumnsPerGroup - 1) / kColumnsPerGroup;
  const int64_t tasks = parallel_tasks_for(double(M) * N * K, groups);
  const int64_t per_task = (groups + tasks - 1) / tasks * kColumnsPerGroup;
  parallel_for(tasks, [&](int64_t task) {
    const int64_t n0 = task * per_task;
    if (n0 < N) few_rows_packed_columns(M, n0, std::min(N, n0 + per_task), K, alpha, A, packed, beta, C, ldc);
  });
}
#endif

// Both entry points: B is read through `B`, or from `packed` when given.
template <typename T>
void gemm_driver(int64_t M, int64_t N, int64_t K, T alpha, const MatrixRef<T>& A, const MatrixRef<T>& B,
                 const PackedMatrix<T>* packed, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == T(0) ? T(0) : beta * C[m * ldc + n];
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (packed != nullptr ? packed->on_amx() : amx::eligible(N, K)) {
      amx_driver(M, N, K, alpha, A, B, packed, beta, C, ldc);
      return;
    }
  }
  if (M <= 2) {
#if defined(__FMA__)
    if (packed != nullptr) {
      gemm_few_rows_packed(M, N, K, alpha, A, *packed, beta, C, ldc);
      return;
    }
#endif
    gemm_few_rows(M, N, K, alpha, A, B, beta, C, ldc);
    return;
  }
  constexpr int MR = Blocking<T>::MR, MC = Blocking<T>::MC, NR = Blocking<T>::NR;
  // Tasks are (row group, column panel) blocks: as few row groups as keep every worker busy (each group
  // repacks B), and narrower panels when N alone cannot give enough of them.
  const int64_t row_blocks = (M + MC - 1) / MC;
  // (One thread gets one row group: with two, it packed each K slice of B twice.)
  const int64_t wanted = pool_size() > 1 ? 2 * static_cast<int64_t>(pool_size()) : 1;
  int64_t nc = column_panel<T>();
  while (nc > NR && row_blocks * ((N + nc - 1) / nc) < wanted) nc /= 2;
  const int64_t col_panels = (N + nc - 1) / nc;
  const int64_t row_groups = std::min(row_blocks, std::max<int64_t>(1, (wanted + col_panels - 1) / col_panels));
  // Row groups of nearly equal rows (whole strips of MR), not of whole MC-row blocks: 1024 rows in 4 groups of
  // whole blocks were 288, 288, 288 and 160, and of two threads one had 576 rows to the other's 448 and
  // waited for it (the backward's dW and dR at H = 256, x W^T where one panel holds all of N).
  const auto group_start = [&](int64_t group) {
    return group == row_groups ? M : group * M / row_groups / MR * MR;
  };
  const int64_t tiles = row_groups * col_panels;
  const int64_t tasks = parallel_tasks_for(double(M) * N * K, tiles);
  parallel_for(tasks, [&](int64_t task) {
    for (int64_t tile = task; tile < tiles; tile += tasks) {
      const int64_t group = tile / col_panels, n0 = (tile % col_panels) * nc;
      const int64_t m0 = group_start(group), m1 = group_start(group + 1);
      if (m0 >= m1) continue;
      gemm_block<T>(m0, m1, n0, std::min<int64_t>(nc, N - n0), K, alpha, A, B, packed, beta, C, ldc);
    }
  });
}

}  // namespace

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, T alpha, MatrixRef<T> A, MatrixRef<T> B, T beta, T* C, int64_t ldc) {
  gemm_driver<T>(M, N, K, alpha, A, B, nullptr, beta, C, ldc);
}

template <typename T>
void gemm(int64_t M, T alpha, MatrixRef<T> A, const PackedMatrix<T>& B, T beta, T* C, int64_t ldc) {
  gemm_driver<T>(M, B.cols(), B.rows(), alpha, A, B.source(), &B, beta, C, ldc);
}

template <typename T>
int64_t packed_strip_width() {
  return Blocking<T>::NR;
}

template <typename T>
void PackedRows<T>::reserve(int64_t M, int64_t K, MatrixRef<T> A, const PackedMatrix<T>& B) {
  constexpr int MR = Blocking<T>::MR;
  rows_ = M;
  cols_ = K;
  source_ = A;
  on_amx_ = B.on_amx();
  if (on_amx_) {
    const auto size = static_cast<size_t>(amx::parts_size(M, K));
    if (parts_.size() < size) parts_.resize(size);
    return;
  }
  if (M <= 2) return;  // few-rows products read A as it is
  const int64_t padded_m = (M + MR - 1) / MR * MR;
  if (packed_.size() < static_cast<size_t>(padded_m * K)) packed_.resize(static_cast<size_t>(padded_m * K));
}

template <typename T>
void PackedRows<T>::pack_columns(int64_t k_begin, int64_t k_end) {
  constexpr int MR = Blocking<T>::MR, KC = Blocking<T>::KC;
  if constexpr (std::is_same_v<T, float>) {
    if (on_amx_) {
      amx::split_rows(source_, rows_, cols_, 0, rows_, k_begin, k_end, parts_.data(), 0, amx::block_size(cols_));
      return;
    }
  }
  if (rows_ <= 2) return;
  // Slice by slice of KC columns, each slice all the strips of MR rows, as gemm_block reads them: column k of
  // slice k0 (kc wide) is at k0 * padded_m + strip * MR * kc + (k - k0) * MR. pack_a packs a whole slice; a
  // part of one is packed as a slice of its own width, then moved to its place.
  const int64_t padded_m = (rows_ + MR - 1) / MR * MR;
  for (int64_t k0 = k_begin / KC * KC; k0 < k_end; k0 += KC) {
    const int64_t kc = std::min<int64_t>(KC, cols_ - k0);
    const int64_t lo = std::max(k_begin, k0), hi = std::min(k_end, k0 + kc);
    T* slice = packed_.data() + k0 * padded_m;
    if (lo == k0 && hi == k0 + kc) {
      pack_a(source_, 0, rows_, k0, kc, slice);
      continue;
    }
    thread_local std::vector<T> part;
    grow(part, padded_m * (hi - lo));
    pack_a(source_, 0, rows_, lo, hi - lo, part.data());
    for (int64_t strip = 0; strip < padded_m / MR; ++strip) {
      std::memcpy(slice + strip * MR * kc + (lo - k0) * MR, part.data() + strip * MR * (hi - lo),
                  sizeof(T) * MR * (hi - lo));
    }
  }
}

template <typename T>
void gemm_columns(const PackedRows<T>& A, const PackedMatrix<T>& B, int64_t n0, int64_t nc, T alpha, T beta, T* C,
                  int64_t ldc) {
  const int64_t M = A.rows(), K = A.cols();
  if (M <= 0 || nc <= 0) return;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n0 + nc; ++n) C[m * ldc + n] = beta == T(0) ? T(0) : beta * C[m * ldc + n];
    return;
  }
  if (A.on_amx() != B.on_amx()) throw std::logic_error("gemm_columns: A was packed for another B");
  if constexpr (std::is_same_v<T, float>) {
    if (B.on_amx()) {
      amx::configure_tiles();
      const int64_t block = amx::block_size(K);
      for (int64_t n = n0; n < n0 + nc; n += 32) {
        for (int64_t m = 0; m < M; m += 32) {
          amx::tile_product(A.parts() + m / 16 * block, B.parts() + n / 16 * block, K, std::min<int64_t>(32, M - m),
                            std::min<int64_t>(32, n0 + nc - n), alpha, beta, C + m * ldc + n, ldc);
        }
      }
      amx::release_tiles();
      return;
    }
  }
  if (M <= 2) {
#if defined(__FMA__)
    few_rows_packed_columns(M, n0, n0 + nc, K, alpha, A.source(), B, beta, C, ldc);
#else
    few_rows_columns(M, n0, n0 + nc, K, alpha, A.source(), B.source(), beta, C, ldc);
#endif
    return;
  }
  // A panel at a time, as gemm() takes them: its tiles of C stay in cache while K's slices pass.
  const int64_t panel = column_panel<T>();
  for (int64_t n = n0; n < n0 + nc; n += panel) {
    gemm_block<T>(0, M, n, std::min(panel, n0 + nc - n), K, alpha, A.source(), B.source(), &B, beta, C, ldc,
                  A.data());
  }
}

template <typename T>
PackedMatrix<T>::PackedMatrix(int64_t K, int64_t N, MatrixRef<T> B)
    : rows_(K), cols_(N), padded_cols_((N + Blocking<T>::NR - 1) / Blocking<T>::NR * Blocking<T>::NR), source_(B) {
  constexpr int KC = Blocking<T>::KC;
  if constexpr (std::is_same_v<T, float>) {
    if (amx::eligible(N, K)) {
      parts_.resize(static_cast<size_t>(amx::parts_size(N, K)));
      const int64_t col_blocks = (N + 15) / 16;
      const int64_t tasks = parallel_tasks_for(double(N) * K * 8, col_blocks);
      parallel_for(tasks, [&](int64_t task) {
        const int64_t n0 = task * col_blocks / tasks * 16, n1 = std::min(N, (task + 1) * col_blocks / tasks * 16);
        if (n0 < n1) amx::split_columns(B, K, N, n0, n1, parts_.data());
      });
      return;
    }
  }
  packed_.resize(static_cast<size_t>(std::max<int64_t>(K, 0) * padded_cols_));
  const int64_t slices = (K + KC - 1) / KC;
  parallel_for(slices, [&](int64_t slice) {
    const int64_t k0 = slice * KC;
    pack_b(B, k0, std::min<int64_t>(KC, K - k0), 0, N, packed_.data() + k0 * padded_cols_);
  });
}

template <typename T>
const T* PackedMatrix<T>::slice(int64_t k0, int64_t n0) const {
  // Slices before k0 are all KC rows deep; within a slice, strips of NR columns follow one another.
  const int64_t kc = std::min<int64_t>(Blocking<T>::KC, rows_ - k0);
  return packed_.data() + k0 * padded_cols_ + (n0 / Blocking<T>::NR) * kc * Blocking<T>::NR;
}

template void gemm<float>(int64_t, int64_t, int64_t, float, MatrixRef<float>, MatrixRef<float>, float, float*,
                          int64_t);
template void gemm<double>(int64_t, int64_t, int64_t, double, MatrixRef<double>, MatrixRef<double>, double,
                           double*, int64_t);
template void gemm<float>(int64_t, float, MatrixRef<float>, const PackedMatrix<float>&, float, float*, int64_t);
template void gemm<double>(int64_t, double, MatrixRef<double>, const PackedMatrix<double>&, double, double*,
                           int64_t);
template class PackedMatrix<float>;
template class PackedMatrix<double>;
template class PackedRows<float>;
template class PackedRows<double>;
template int64_t packed_strip_width<float>();
template int64_t packed_strip_width<double>();
template void gemm_columns<float>(const PackedRows<float>&, const PackedMatrix<float>&, int64_t, int64_t, float,
                                  float, float*, int64_t);
template void gemm_columns<double>(const PackedRows<double>&, const PackedMatrix<double>&, int64_t, int64_t,
                                   double, double, double*, int64_t);

}  // namespace conveyor::cpu
