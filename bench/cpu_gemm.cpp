// The CPU backend's matrix product (csrc/cpu/gemm.cpp) on the shapes a recurrent layer runs, in GFLOP/s,
// beside the core's own ceiling: a loop of independent vector multiply-adds on registers only.
//
//   cmake -S . -B build -DCONVEYOR_BUILD_BENCH=ON && cmake --build build --target cpu_gemm
//   build/bench/cpu_gemm [threads] [seconds per shape] [only the shapes whose name contains this]
//
// Each shape runs for the given time (0.3 s by default) after a warm-up; the median of its timed batches is
// printed. "packed" products read B from a PackedMatrix (the recurrent weights, packed once per window), as
// the per-step products do. Where the processor has AMX, float32 products run on its tiles too (csrc/cpu/
// amx.h: at least 128 columns and a depth of 128), and both paths are printed, each with its worst error
// against float64 over 256 elements, in units of sum_k |a_mk b_kn| (what a float32 sum's rounding scales with),
// and the tiles' own ceiling: their kernel on parts held in L1.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#include "conveyor/conveyor.h"
#include "cpu/amx.h"
#include "cpu/gemm.h"
#include "cpu/thread_pool.h"

namespace {

using conveyor::cpu::gemm;
using conveyor::cpu::MatrixRef;
using conveyor::cpu::PackedMatrix;
using Clock = std::chrono::steady_clock;

#if defined(__AVX512F__)
using Vector = __m512;
constexpr int kLanes = 16;
Vector fma(Vector a, Vector b, Vector c) { return _mm512_fmadd_ps(a, b, c); }
Vector broadcast(float x) { return _mm512_set1_ps(x); }
#elif defined(__FMA__)
using Vector = __m256;
constexpr int kLanes = 8;
Vector fma(Vector a, Vector b, Vector c) { return _mm256_fmadd_ps(a, b, c); }
Vector broadcast(float x) { return _mm256_set1_ps(x); }
#endif

#if defined(__AVX512F__) || defined(__FMA__)
// Independent accumulator chains: enough to cover the latency of two pipes (4 cycles x 2), and with a and b
// no more than the registers hold: 16 chains of the 16 AVX2 registers spilled, and the loop read 59 GFLOP/s
// on a Zen 3 core where 12 read 104 (and the GEMM itself reached 81).
#if defined(__AVX512F__)
constexpr int kChains = 16;
#else
constexpr int kChains = 12;
#endif

// `iterations` steps of every chain, summed into one vector at the end. A function of its own with no call
// inside, so that the chains stay in registers (around the clock's calls GCC kept them in memory and stored
// every chain at every step: half the ceiling).
__attribute__((noinline)) Vector multiply_add_chains(Vector seed, Vector a, Vector b, int64_t iterations) {
  Vector acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = fma(seed, broadcast(float(i)), b);
  for (int64_t it = 0; it < iterations; ++it) {
    for (int i = 0; i < kChains; ++i) acc[i] = fma(acc[i], a, b);
  }
  Vector all = acc[0];
  for (int i = 1; i < kChains; ++i) all = fma(all, a, acc[i]);
  return all;
}
#endif

// The core's float32 multiply-add ceiling in GFLOP/s (2 flops per lane per multiply-add), the best of
// batches of 2^20 steps over `seconds`.
double fma_ceiling(double seconds) {
#if defined(__AVX512F__) || defined(__FMA__)
  constexpr int64_t kIterations = 1 << 20;
  const Vector a = broadcast(0.999999f), b = broadcast(1e-7f);
  Vector seed = broadcast(1e-3f);
  double best = 0.0;
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < until) {
    const auto start = Clock::now();
    seed = multiply_add_chains(seed, a, b, kIterations);
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    best = std::max(best, 2.0 * kLanes * kChains * kIterations / elapsed * 1e-9);
  }
  float lanes[kLanes], total = 0;
  std::memcpy(lanes, &seed, sizeof(lanes));
  for (float x : lanes) total += x;
  if (total == 12345.f) std::printf(" ");  // keeps the chains live
  return best;
#else
  (void)seconds;
  return 0.0;
#endif
}

// The tiles' float32-equivalent ceiling in GFLOP/s: amx::tile_sums over 32 x 32 of C and 256 of K, its parts
// in L1, repeated (the kernel's own loads included; 0 where the products do not run on AMX).
double amx_ceiling(double seconds) {
  if (!conveyor::using_amx()) return 0.0;
  constexpr int64_t K = 256;
  const int64_t block = conveyor::cpu::amx::block_size(K);
  conveyor::cpu::LineVector<uint16_t> a(static_cast<size_t>(2 * block), 0x3F80), b(static_cast<size_t>(2 * block), 0x3F80);
  alignas(64) float sums[32 * 32];
  conveyor::cpu::amx::configure_tiles();
  constexpr int64_t kCalls = 4096;
  double best = 0.0;
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < until) {
    const auto start = Clock::now();
    for (int64_t i = 0; i < kCalls; ++i) {
      conveyor::cpu::amx::tile_sums(a.data(), block, b.data(), block, K / 32, 32, 32, nullptr, sums, 32);
    }
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    best = std::max(best, 2.0 * 32 * 32 * K * kCalls / elapsed * 1e-9);
  }
  conveyor::cpu::amx::release_tiles();
  return best;
}

struct Shape {
  const char* what;
  int64_t M, N, K;
  bool a_transposed, b_transposed, packed;
};

struct Result {
  double gflops, error;
};

Result time_shape(const Shape& s, double seconds) {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::vector<float> a(static_cast<size_t>(s.M * s.K)), b(static_cast<size_t>(s.K * s.N)),
      c(static_cast<size_t>(s.M * s.N));
  for (auto& x : a) x = uniform(rng);
  for (auto& x : b) x = uniform(rng);
  const auto A = s.a_transposed ? MatrixRef<float>::transposed(a.data(), s.M) : MatrixRef<float>::rows(a.data(), s.K);
  const auto B = s.b_transposed ? MatrixRef<float>::transposed(b.data(), s.K) : MatrixRef<float>::rows(b.data(), s.N);
  const PackedMatrix<float> packed(s.K, s.N, B);
  const auto run = [&] {
    if (s.packed) {
      gemm<float>(s.M, 1.f, A, packed, 0.f, c.data(), s.N);
    } else {
      gemm<float>(s.M, s.N, s.K, 1.f, A, B, 0.f, c.data(), s.N);
    }
  };
  // Batches of about 5 ms each, so that the clock's resolution does not matter for the small shapes.
  const double flops = 2.0 * s.M * s.N * s.K;
  int64_t repeats = 1;
  for (;;) {
    const auto start = Clock::now();
    for (int64_t r = 0; r < repeats; ++r) run();
    if (std::chrono::duration<double>(Clock::now() - start).count() > 5e-3) break;
    repeats *= 2;
  }
  std::vector<double> rates;
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < until || rates.size() < 3) {
    const auto start = Clock::now();
    for (int64_t r = 0; r < repeats; ++r) run();
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    rates.push_back(flops * repeats / elapsed * 1e-9);
  }
  std::nth_element(rates.begin(), rates.begin() + rates.size() / 2, rates.end());
  double error = 0;
  for (int sample = 0; sample < 256; ++sample) {
    const int64_t m = rng() % s.M, n = rng() % s.N;
    double exact = 0, scale = 0;
    for (int64_t k = 0; k < s.K; ++k) {
      const double p = double(A.data[m * A.row_stride + k * A.col_stride]) * B.data[k * B.row_stride + n * B.col_stride];
      exact += p;
      scale += std::fabs(p);
    }
    error = std::max(error, std::fabs(c[m * s.N + n] - exact) / scale);
  }
  return {rates[rates.size() / 2], error};
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const double seconds = argc > 2 ? std::atof(argv[2]) : 0.3;
  const std::string only = argc > 3 ? argv[3] : "";
  if (threads < 1 || seconds <= 0) {
    std::fprintf(stderr, "usage: cpu_gemm [threads >= 1] [seconds per shape > 0] [name filter]\n");
    return 2;
  }
  conveyor::cpu::set_pool_size(threads);
  std::printf("float32, %d thread(s); one core's multiply-add ceiling %.0f GFLOP/s\n", threads, fma_ceiling(0.3));
  // x W^T is A row-major times B transposed (the weights stored [4H, I]); dA R and dA W are A times B
  // row-major; dW = dA^T x is A transposed. T B rows for the time-parallel products, B rows per step.
  const Shape shapes[] = {
      {"per step, LSTM B=32 H=256 (h R^T)", 32, 1024, 256, false, true, true},
      {"per step, LSTM B=64 H=1024", 64, 4096, 1024, false, true, true},
      {"per step, PTB small B=20 H=100", 20, 400, 100, false, true, true},
      {"per step, JSB B=8 H=36", 8, 144, 36, false, true, true},
      {"per step backward, B=32 H=256 (dA R)", 32, 256, 1024, false, false, true},
      {"per step backward, B=64 H=1024", 64, 1024, 4096, false, false, true},
      {"input projection, T B=2048 I=256 (x W^T)", 2048, 1024, 256, false, true, false},
      {"input projection, T B=4096 I=1024", 4096, 4096, 1024, false, true, false},
      {"backward dx, T B=2048 (dA W)", 2048, 256, 1024, false, false, false},
      {"backward dx, T B=4096 I=1024", 4096, 1024, 4096, false, false, false},
      {"backward dW, 4H=1024 (dA^T x)", 1024, 256, 2048, true, false, false},
      {"backward dW, 4H=4096 I=1024", 4096, 1024, 4096, true, false, false},
  };
  const bool was_on = conveyor::use_amx(true);
  const bool amx = conveyor::using_amx();
  if (amx) std::printf("one core's AMX tiles, float32 in six bfloat16 passes: ceiling %.0f GFLOP/s\n", amx_ceiling(0.3));
  std::printf("\n");
  std::printf("| product | M, N, K | AVX GFLOP/s | AVX error | AMX GFLOP/s | AMX error |\n"
              "| --- | --- | ---: | ---: | ---: | ---: |\n");
  for (const Shape& s : shapes) {
    if (std::string(s.what).find(only) == std::string::npos) continue;
    conveyor::use_amx(false);
    const Result avx = time_shape(s, seconds);
    std::printf("| %s | %lld, %lld, %lld | %.0f | %.1e |", s.what, static_cast<long long>(s.M),
                static_cast<long long>(s.N), static_cast<long long>(s.K), avx.gflops, avx.error);
    if (amx && s.N >= 128 && s.K >= 128) {
      conveyor::use_amx(true);
      const Result tiles = time_shape(s, seconds);
      std::printf(" %.0f | %.1e |\n", tiles.gflops, tiles.error);
    } else {
      std::printf(" %s | |\n", amx ? "(under 128: AVX)" : "(no AMX here)");
    }
    std::fflush(stdout);
  }
  conveyor::use_amx(was_on);
  return 0;
}
