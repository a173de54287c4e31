// Checks the CPU matrix product conveyor::cpu::gemm<T> (csrc/cpu/gemm.h) against a naive triple loop in
// double precision.
//
// Covered: float and double; sizes 1, 2, 3, sizes that are not multiples of the register tile (6 rows,
// 8 or 16 columns), K past the K blocking (256), M past the row tile (96), N past the column tile; every
// transpose combination of A and B (MatrixRef::rows / MatrixRef::transposed), with padded leading
// dimensions; alpha != 1; beta = 0 over a C poisoned with NaN (every element must be overwritten); beta = 1
// accumulation and a general beta; a padded C whose padding must stay untouched; one and several threads; B
// packed once (PackedMatrix), and A too, for products by column ranges (PackedRows, gemm_columns).
//
// Tolerance: for each element, |C - ref| <= c * eps(T) * (K + 4) * (|alpha| * sum_k |a_mk||b_kn| + |beta||C0|),
// the standard bound for a sum of K products, so cancellation cannot hide a wrong result.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "conveyor/conveyor.h"
#include "cpu/gemm.h"

namespace {

using conveyor::cpu::gemm;
using conveyor::cpu::MatrixRef;
using conveyor::cpu::gemm_columns;
using conveyor::cpu::packed_strip_width;
using conveyor::cpu::PackedMatrix;
using conveyor::cpu::PackedRows;

struct Case {
  int64_t M, N, K;
};

const char* type_name(float) { return "float"; }
const char* type_name(double) { return "double"; }

// One product: A [M, K] (stored transposed when a_t), B [K, N] (stored transposed when b_t), C [M, N] with
// ldc = N + pad. Returns whether every element was within tolerance.
template <typename T>
bool check_one(const Case& c, bool a_t, bool b_t, T alpha, T beta, bool nan_poison, int64_t pad, uint32_t seed) {
  const int64_t M = c.M, N = c.N, K = c.K;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);

  // Storage with padded leading dimensions: A stored [M, K + pad] or (transposed) [K, M + pad].
  const int64_t lda = a_t ? M + pad : K + pad;
  const int64_t ldb = b_t ? K + pad : N + pad;
  const int64_t ldc = N + pad;
  std::vector<T> a(static_cast<size_t>((a_t ? K : M) * lda)), b(static_cast<size_t>((b_t ? N : K) * ldb));
  for (T& v : a) v = static_cast<T>(uniform(rng));
  for (T& v : b) v = static_cast<T>(uniform(rng));
  auto A_at = [&](int64_t m, int64_t k) { return a_t ? a[k * lda + m] : a[m * lda + k]; };
  auto B_at = [&](int64_t k, int64_t n) { return b_t ? b[n * ldb + k] : b[k * ldb + n]; };

  const T sentinel = static_cast<T>(12345.0);
  std::vector<T> C(static_cast<size_t>(M * ldc)), C0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < ldc; ++n) {
      T& v = C[m * ldc + n];
      if (n >= N) {
        v = sentinel;
      } else {
        v = nan_poison ? std::numeric_limits<T>::quiet_NaN() : static_cast<T>(uniform(rng));
      }
    }
  }
  C0 = C;

  const MatrixRef<T> A = a_t ? MatrixRef<T>::transposed(a.data(), lda) : MatrixRef<T>::rows(a.data(), lda);
  const MatrixRef<T> B = b_t ? MatrixRef<T>::transposed(b.data(), ldb) : MatrixRef<T>::rows(b.data(), ldb);
  gemm<T>(M, N, K, alpha, A, B, beta, C.data(), ldc);
  // The same product with B packed once (the recurrent weights' path): bit for bit the same numbers.
  std::vector<T> C_packed = C0;
  const PackedMatrix<T> packed_b(K, N, B);
  gemm<T>(M, alpha, A, packed_b, beta, C_packed.data(), ldc);
  const bool packed_same = std::memcmp(C.data(), C_packed.data(), sizeof(T) * C.size()) == 0;
  // And by column ranges, with A packed once (a recurrent step's tasks): A's columns packed in ranges of 7
  // (the last slice's ranges crossing the K blocking), then C's columns in ranges of whole strips, the last
  // range cut short by N.
  std::vector<T> C_columns = C0;
  PackedRows<T> rows_a;
  rows_a.reserve(M, K, A, packed_b);
  for (int64_t k = 0; k < K; k += 7) rows_a.pack_columns(k, std::min<int64_t>(K, k + 7));
  const int64_t strip = packed_strip_width<T>();
  for (int64_t n0 = 0; n0 < N; n0 += 2 * strip) {
    gemm_columns<T>(rows_a, packed_b, n0, std::min<int64_t>(2 * strip, N - n0), alpha, beta, C_columns.data(), ldc);
  }
  const bool columns_same = std::memcmp(C.data(), C_columns.data(), sizeof(T) * C.size()) == 0;

  const double eps = std::numeric_limits<T>::epsilon();
  int64_t bad = 0;
  double worst = 0;
  std::string first;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < ldc; ++n) {
      const T got = C[m * ldc + n];
      if (n >= N) {
        if (!(got == sentinel)) {
          if (bad++ == 0) first = "padding of C written at (" + std::to_string(m) + ", " + std::to_string(n) + ")";
        }
        continue;
      }
      double sum = 0, abs_sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(A_at(m, k)) * double(B_at(k, n));
        sum += p;
        abs_sum += std::fabs(p);
      }
      const double c0 = beta == T(0) ? 0.0 : double(C0[m * ldc + n]);
      const double ref = double(alpha) * sum + double(beta) * c0;
      const double scale = std::fabs(double(alpha)) * abs_sum + std::fabs(double(beta) * c0);
      const double tol = 2.0 * eps * double(K + 4) * scale + std::numeric_limits<T>::min();
      const double err = std::fabs(double(got) - ref);
      if (!(err <= tol)) {  // also catches NaN
        if (bad++ == 0) {
          first = "C(" + std::to_string(m) + ", " + std::to_string(n) + ") = " + std::to_string(double(got)) +
                  ", expected " + std::to_string(ref) + " (tolerance " + std::to_string(tol) + ")";
        }
      }
      if (scale > 0) worst = std::max(worst, err / scale);
    }
  }
  const std::string what = std::string("gemm<") + type_name(T()) + "> M=" + std::to_string(M) +
                           " N=" + std::to_string(N) + " K=" + std::to_string(K) + " A" + (a_t ? "^T" : "") +
                           " B" + (b_t ? "^T" : "") + " alpha=" + std::to_string(double(alpha)) +
                           " beta=" + std::to_string(double(beta)) + (nan_poison ? " (C poisoned with NaN)" : "") +
                           " pad=" + std::to_string(pad) + ": " + std::to_string(bad) + " bad elements; first: " +
                           first;
  CHECK_MSG(packed_same, what + " (the packed-B product differs from the plain one)");
  CHECK_MSG(columns_same, what + " (the product by column ranges differs from the whole one)");
  return CHECK_MSG(bad == 0, what);
}

template <typename T>
void run_all(const std::vector<Case>& cases, uint32_t seed) {
  struct Scalars {
    double alpha, beta;
    bool nan_poison;
  };
  const Scalars scalars[] = {
      {1.0, 0.0, true},     // overwrite a NaN-poisoned C
      {-1.75, 0.0, true},   // alpha != 1, still overwriting
      {1.0, 1.0, false},    // accumulate
      {0.625, 1.0, false},  // accumulate with alpha != 1
      {2.0, -0.5, false},   // general beta
  };
  for (const Case& c : cases) {
    for (int a_t = 0; a_t < 2; ++a_t) {
      for (int b_t = 0; b_t < 2; ++b_t) {
        for (const Scalars& s : scalars) {
          // Padded leading dimensions on every other combination.
          const int64_t pad = (a_t + b_t) % 2 == 0 ? 0 : 3;
          check_one<T>(c, a_t != 0, b_t != 0, static_cast<T>(s.alpha), static_cast<T>(s.beta), s.nan_poison, pad,
                       seed++);
        }
      }
    }
  }
}

}  // namespace

int main() {
  // Small, odd, blocking-crossing and few-row (M <= 2, the direct path) shapes.
  const std::vector<Case> cases = {
      {1, 1, 1},    {1, 2, 3},     {2, 1, 3},    {2, 3, 1},     {3, 3, 3},     {3, 2, 1},    {1, 17, 5},
      {2, 130, 7},  {1, 9, 300},   {2, 33, 513}, {5, 7, 11},    {6, 8, 16},    {7, 9, 17},   {13, 17, 19},
      {6, 16, 256}, {7, 17, 257},  {11, 23, 300}, {4, 5, 513},  {97, 9, 5},    {100, 33, 20}, {193, 19, 31},
      {97, 130, 7}, {50, 257, 13}, {23, 300, 9}, {101, 67, 259}, {130, 45, 600}, {3, 1, 1000}, {1, 1, 700},
      // The batches of 8, 20 and 32 (a last strip of 2 rows with AVX2, of 8 with AVX-512), K over two slices,
      // and a last MC-row block of 8 and of 2.
      {8, 40, 33},  {20, 400, 100}, {32, 50, 300}, {104, 20, 7},  {98, 17, 9},
  };

  // Several workers, then one (the tiling of C depends on the pool size).
  const int threads = conveyor::num_threads();
  conveyor::set_num_threads(std::max(threads, 3));
  run_all<float>(cases, 1000);
  run_all<double>(cases, 2000);
  conveyor::set_num_threads(1);
  run_all<float>(cases, 3000);
  run_all<double>(cases, 4000);
  conveyor::set_num_threads(threads);

  // Products that AMX takes where the processor has it (csrc/cpu/amx.h: at least 128 columns, a depth of at
  // least 128), edges of every kind: one and two rows, rows and columns not whole tiles, K not whole chunks.
  // With AMX on, then off (where there is none, both run on the AVX path, and the line below says so).
  {
    const std::vector<Case> amx_cases = {{1, 128, 128},  {2, 130, 200},  {17, 144, 130}, {33, 257, 300},
                                         {70, 300, 129}, {3, 1000, 128}, {40, 160, 1030}};
    std::printf("AMX %s\n", conveyor::using_amx() ? "present and on: the AMX cases run on its tiles, then without"
                                                  : "absent or off: the AMX cases run on the AVX path only");
    const bool was_on = conveyor::use_amx(true);
    conveyor::set_num_threads(std::max(threads, 3));
    run_all<float>(amx_cases, 5000);
    conveyor::set_num_threads(1);
    run_all<float>(amx_cases, 6000);
    conveyor::use_amx(false);
    CHECK_MSG(!conveyor::using_amx(), "use_amx(false): expected using_amx() false");
    run_all<float>(amx_cases, 7000);

    // The splits are exact: A times the identity is A and the identity times B is B, bit for bit, on the
    // tiles as on the AVX path (a part dropped or rounded shows here, where tolerances cannot see it). Values
    // from 2^-100 to 2^127 with full mantissas (below 2^-110 a value's last part is subnormal, which the tiles
    // flush). An infinity in A leaves its product non-finite.
    for (const bool on : {true, false}) {
      conveyor::use_amx(on);
      const int64_t n = 160, m = 37, wide = 200;
      std::mt19937 rng(99);
      std::uniform_real_distribution<float> mantissa(1.f, 2.f);
      std::uniform_int_distribution<int> exponent(-100, 126);
      const auto value = [&] { return std::ldexp(mantissa(rng), exponent(rng)) * (rng() % 2 ? 1.f : -1.f); };
      std::vector<float> a(static_cast<size_t>(m * n)), b(static_cast<size_t>(n * wide));
      std::vector<float> eye(static_cast<size_t>(n * n), 0.f), c(static_cast<size_t>(m * n)),
          d(static_cast<size_t>(n * wide));
      for (float& v : a) v = value();
      for (float& v : b) v = value();
      for (int64_t i = 0; i < n; ++i) eye[i * n + i] = 1.f;
      a[3 * n + 5] = std::numeric_limits<float>::infinity();
      gemm<float>(m, n, n, 1.f, MatrixRef<float>::rows(a.data(), n), MatrixRef<float>::rows(eye.data(), n), 0.f,
                  c.data(), n);
      gemm<float>(n, wide, n, 1.f, MatrixRef<float>::rows(eye.data(), n), MatrixRef<float>::rows(b.data(), wide), 0.f,
                  d.data(), wide);
      CHECK_MSG(!std::isfinite(c[3 * n + 5]), std::string("AMX ") + (on ? "on" : "off") + ": inf times 1 came out finite");
      c[3 * n + 5] = a[3 * n + 5];
      bool a_same = true;
      for (int64_t i = 0; i < m * n; ++i) a_same = a_same && (i / n == 3 || c[i] == a[i]);  // row 3: inf * 0
      CHECK_MSG(a_same, std::string("AMX ") + (on ? "on" : "off") + ": A times the identity is not A");
      CHECK_MSG(std::memcmp(b.data(), d.data(), sizeof(float) * b.size()) == 0,
                std::string("AMX ") + (on ? "on" : "off") + ": the identity times B is not B");
    }
    conveyor::use_amx(was_on);
    conveyor::set_num_threads(threads);
  }

  // K == 0 is a valid product: C = beta * C (and 0 when beta == 0, even over NaN).
  {
    std::vector<double> C(6, std::numeric_limits<double>::quiet_NaN());
    double dummy = 0;
    gemm<double>(2, 3, 0, 1.0, MatrixRef<double>::rows(&dummy, 1), MatrixRef<double>::rows(&dummy, 3), 0.0,
                 C.data(), 3);
    bool zeros = true;
    for (double v : C) zeros = zeros && v == 0.0;
    CHECK_MSG(zeros, "gemm<double> K=0, beta=0 over NaN: expected zeros");
  }

  return conveyor_test::report();
}
