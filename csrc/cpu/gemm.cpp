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
#include <vector>

#include <unistd.h>

#if defined(__FMA__)
#include <immintrin.h>
#endif

#include "thread_pool.h"

namespace conveyor::cpu {
namespace {

// MR x NR: the register tile of the micro-kernel. With AVX-512, 8 rows of two 64-byte vectors: 16
// accumulators of the 32 registers, and 8 rows fit the batch sizes recurrent layers use (8, 16, 32, 64) with
// no padded rows; with AVX2, 6 rows of two 32-byte vectors, 12 of the 16 registers.
template <typename T>
struct Blocking;
#if defined(__AVX512F__)
template <>
struct Blocking<float> {
  static constexpr int MR = 8, NR = 32, KC = 256, MC = 96, NC = 256;
};
template <>
struct Blocking<double> {
  static constexpr int MR = 8, NR = 16, KC = 256, MC = 96, NC = 128;
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

template <typename T>
void pack_a(const MatrixRef<T>& A, int64_t m0, int64_t mc, int64_t k0, int64_t kc, T* packed) {
  constexpr int MR = Blocking<T>::MR;
  for (int64_t strip = 0; strip < mc; strip += MR) {
    const int64_t rows = std::min<int64_t>(MR, mc - strip);
    if (rows == MR) {
      // A whole strip, with MR a constant: rows read along their length where A is row-major, columns
      // copied whole where it is column-major (a transposed operand).
      const T* src = A.data + (m0 + strip) * A.row_stride + k0 * A.col_stride;
      if (A.col_stride == 1) {
        for (int r = 0; r < MR; ++r)
          for (int64_t k = 0; k < kc; ++k) packed[k * MR + r] = src[r * A.row_stride + k];
      } else if (A.row_stride == 1) {
        for (int64_t k = 0; k < kc; ++k)
          for (int r = 0; r < MR; ++r) packed[k * MR + r] = src[k * A.col_stride + r];
      } else {
        for (int64_t k = 0; k < kc; ++k)
          for (int r = 0; r < MR; ++r) packed[k * MR + r] = src[k * A.col_stride + r * A.row_stride];
      }
      packed += kc * MR;
      continue;
    }
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = A.data + (m0 + strip) * A.row_stride + (k0 + k) * A.col_stride;
      for (int64_t r = 0; r < rows; ++r) packed[r] = src[r * A.row_stride];
      for (int64_t r = rows; r < MR; ++r) packed[r] = T(0);
      packed += MR;
    }
  }
}

template <typename T>
void pack_b(const MatrixRef<T>& B, int64_t k0, int64_t kc, int64_t n0, int64_t nc, T* packed) {
  constexpr int NR = Blocking<T>::NR;
  for (int64_t strip = 0; strip < nc; strip += NR) {
    const int64_t cols = std::min<int64_t>(NR, nc - strip);
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

// acc[MR][NR] = sum over k of a[k][:] outer b[k][:], each element one fused multiply-add per k, in k order,
// for the first kRows rows of the strip (a strip of A is MR wide whatever kRows is; kRows < MR serves a
// last strip of few rows without the arithmetic of its padded ones, each row's sums the same). A strip of B
// is two vectors, held in two named variables: as an array GCC kept them on the stack.
template <typename T, int kRows = Blocking<T>::MR>
__attribute__((noinline)) void micro_kernel(int64_t kc, const T* __restrict a, const T* __restrict b,
                                            T* __restrict acc) {
  using S = Simd<T>;
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NR, L = S::kLanes;
  static_assert(NR == 2 * L, "a strip of B is two vectors");
  static_assert(kRows <= MR, "a strip of A has MR rows");
  typename S::Vector c0[kRows], c1[kRows];
  for (int r = 0; r < kRows; ++r) c0[r] = c1[r] = S::zero();
  for (int64_t k = 0; k < kc; ++k) {
    const typename S::Vector b0 = S::load(b), b1 = S::load(b + L);
    for (int r = 0; r < kRows; ++r) {
      const typename S::Vector ar = S::broadcast(a + r);
      c0[r] = S::multiply_add(ar, b0, c0[r]);
      c1[r] = S::multiply_add(ar, b1, c1[r]);
    }
    a += MR;
    b += NR;
  }
  for (int r = 0; r < kRows; ++r) {
    S::store(acc + r * NR, c0[r]);
    S::store(acc + r * NR + L, c1[r]);
  }
}

// A whole MR x NR tile of C (ldc elements per row) from acc, as accumulate_into() does element by element,
// in vectors: the same operations, so the same roundings.
template <typename T>
void store_tile(const T* __restrict acc, T alpha, T beta, bool first_slice, T* __restrict C, int64_t ldc) {
  using S = Simd<T>;
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NR, L = S::kLanes;
  const typename S::Vector alpha_v = S::set(alpha), beta_v = S::set(beta);
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NR / L; ++v) {
      T* c = C + r * ldc + v * L;
      const typename S::Vector s = S::load(acc + r * NR + v * L);
      if (!first_slice) {
        S::store(c, S::multiply_add(alpha_v, s, S::load(c)));
      } else if (beta == T(0)) {
        S::store(c, S::multiply(alpha_v, s));
      } else {
        S::store(c, S::multiply_add(alpha_v, s, S::multiply(beta_v, S::load(c))));
      }
    }
  }
}
#else
// Without FMA: a multiply then an add, as multiply_add() does, through GCC/Clang vector extensions.
template <typename T, int kRows = Blocking<T>::MR>
void micro_kernel(int64_t kc, const T* __restrict a, const T* __restrict b, T* __restrict acc) {
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
  std::memcpy(acc, c, sizeof(c));
}
#endif

// One task's block of C: rows [m0, m1), columns [n0, n0 + nc). Each K slice of B's panel is packed once and
// serves every MC-row block of the task's rows, so packing B costs 1/(m1 - m0) of the arithmetic, not 1/MC.
// `packed`, when given, holds B already packed and the task packs nothing of it.
template <typename T>
void gemm_block(int64_t m0, int64_t m1, int64_t n0, int64_t nc, int64_t K, T alpha, const MatrixRef<T>& A,
                const MatrixRef<T>& B, const PackedMatrix<T>* packed, T beta, T* C, int64_t ldc) {
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NR, KC = Blocking<T>::KC, MC = Blocking<T>::MC;
  thread_local std::vector<T> packed_a, packed_b;
  packed_a.resize(static_cast<size_t>(MC * KC));
  if (packed == nullptr) packed_b.resize(static_cast<size_t>(((nc + NR - 1) / NR) * NR * KC));
  T acc[MR * NR];
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min<int64_t>(KC, K - k0);
    const bool first = k0 == 0;
    const T* strips_b = packed_b.data();
    if (packed != nullptr) {
      strips_b = packed->slice(k0, n0);
    } else {
      pack_b(B, k0, kc, n0, nc, packed_b.data());
    }
    for (int64_t mb = m0; mb < m1; mb += MC) {
      const int64_t mc = std::min<int64_t>(MC, m1 - mb);
      pack_a(A, mb, mc, k0, kc, packed_a.data());
      const auto tile = [&](int64_t ms, int64_t ns) {
        const int64_t rows = std::min<int64_t>(MR, mc - ms), cols = std::min<int64_t>(NR, nc - ns);
        if (rows <= MR / 2) {  // a last strip of few rows (a batch not a multiple of MR, a packed step's)
          micro_kernel<T, MR / 2>(kc, packed_a.data() + ms * kc, strips_b + ns * kc, acc);
        } else {
          micro_kernel<T>(kc, packed_a.data() + ms * kc, strips_b + ns * kc, acc);
        }
#if defined(__FMA__)
        if (rows == MR && cols == NR) {
          store_tile(acc, alpha, beta, first, C + (mb + ms) * ldc + n0 + ns, ldc);
          return;
        }
#endif
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

// Few rows: each row of C is a combination of rows of B (B row-contiguous) or a set of dot products
// (B column-contiguous). Tasks split the columns. K is walked in the same KC slices, and each slice's sum
// added to C in the same order, as the blocked path, so that a row of C comes out bit-for-bit the same
// whichever path computed it (a window split in two gives exactly the outputs of the whole window).
template <typename T>
void gemm_few_rows(int64_t M, int64_t N, int64_t K, T alpha, const MatrixRef<T>& A, const MatrixRef<T>& B,
                   T beta, T* C, int64_t ldc) {
  constexpr int64_t kColumnsPerChunk = 64, KC = Blocking<T>::KC;
  const int64_t chunks = (N + kColumnsPerChunk - 1) / kColumnsPerChunk;
  const int64_t tasks = parallel_tasks_for(double(M) * N * K, chunks);
  const int64_t per_task = (chunks + tasks - 1) / tasks * kColumnsPerChunk;
  parallel_for(tasks, [&](int64_t task) {
    const int64_t n0 = task * per_task, n1 = std::min(N, n0 + per_task);
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
  });
}

#if defined(__FMA__)
// Few rows with B packed (the per-step recurrent products at batch 1 or 2): each row of C is built strip by
// strip from the packed strips of B, vectors across the columns and k in order, so that every element sees
// the same fused multiply-adds in the same order as on the other paths. (Dot products along k would be one
// dependent chain of scalar multiply-adds per element, which the fixed order keeps from vectorising.)
template <typename T>
void gemm_few_rows_packed(int64_t M, int64_t N, int64_t K, T alpha, const MatrixRef<T>& A,
                          const PackedMatrix<T>& packed, T beta, T* C, int64_t ldc) {
  using S = Simd<T>;
  constexpr int NR = Blocking<T>::NR, KC = Blocking<T>::KC, L = S::kLanes;
  constexpr int kStripsAtOnce = 4;  // 8 independent accumulator chains hide the multiply-add latency
  const int64_t strips = (N + NR - 1) / NR;
  const int64_t groups = (strips + kStripsAtOnce - 1) / kStripsAtOnce;
  const int64_t tasks = parallel_tasks_for(double(M) * N * K, groups);
  const int64_t per_task = (groups + tasks - 1) / tasks;
  parallel_for(tasks, [&](int64_t task) {
    alignas(64) T sum[kStripsAtOnce * NR];
    for (int64_t group = task * per_task; group < std::min(groups, (task + 1) * per_task); ++group) {
      const int64_t s0 = group * kStripsAtOnce, count = std::min<int64_t>(kStripsAtOnce, strips - s0);
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
          const int64_t n0 = s0 * NR, n1 = std::min(N, (s0 + count) * NR);
          for (int64_t n = n0; n < n1; ++n) accumulate_into(c_row[n], sum[n - n0], alpha, beta, k0 == 0);
        }
      }
    }
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
  constexpr int MC = Blocking<T>::MC, NR = Blocking<T>::NR;
  // Tasks are (row group, column panel) blocks: as few row groups as keep every worker busy (each group
  // repacks B), and narrower panels when N alone cannot give enough of them.
  const int64_t row_blocks = (M + MC - 1) / MC;
  const int64_t wanted = 2 * static_cast<int64_t>(pool_size());
  int64_t nc = column_panel<T>();
  while (nc > NR && row_blocks * ((N + nc - 1) / nc) < wanted) nc /= 2;
  const int64_t col_panels = (N + nc - 1) / nc;
  const int64_t row_groups = std::min(row_blocks, std::max<int64_t>(1, (wanted + col_panels - 1) / col_panels));
  const int64_t blocks_per_group = (row_blocks + row_groups - 1) / row_groups;
  const int64_t tiles = row_groups * col_panels;
  const int64_t tasks = parallel_tasks_for(double(M) * N * K, tiles);
  parallel_for(tasks, [&](int64_t task) {
    for (int64_t tile = task; tile < tiles; tile += tasks) {
      const int64_t m0 = (tile / col_panels) * blocks_per_group * MC, n0 = (tile % col_panels) * nc;
      if (m0 >= M) continue;
      gemm_block<T>(m0, std::min(M, m0 + blocks_per_group * MC), n0, std::min<int64_t>(nc, N - n0), K, alpha, A, B,
                    packed, beta, C, ldc);
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
PackedMatrix<T>::PackedMatrix(int64_t K, int64_t N, MatrixRef<T> B)
    : rows_(K), cols_(N), padded_cols_((N + Blocking<T>::NR - 1) / Blocking<T>::NR * Blocking<T>::NR), source_(B) {
  constexpr int KC = Blocking<T>::KC;
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

}  // namespace conveyor::cpu
