// Checks the PTX wrappers of cuda/ptx.cuh: kernels of this file call them the way the persistent kernels
// will, and the host compares what they wrote with plain host products and copies. The mma checks build
// their fragments straight from global memory with the PTX ISA's layout formulas (written out here, apart
// from the emulator's), over one m16n8 tile and over several tiles and k-steps, so that every lane and
// every fragment element carries a value of its own; the ldmatrix checks load a 16 x 16 shared tile plainly
// and transposed, with rows given in the usual and in a scrambled order, and feed it to the mma; the
// cp.async check copies in two commit groups, with zero-filled chunks, and reads each group after its wait.
// Inputs are random and never zero; outputs are poisoned with NaN first, so an element never written shows.
//
// Compiled by nvcc in CUDA builds and as host C++ on the emulator (CONVEYOR_EMULATE_CUDA), from this one
// source: on a GPU it checks the asm, on the emulator the emulated twins. Without a CUDA device (or with one
// older than compute capability 8.0, which lacks these instructions) it exits 77: skipped.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "device_array.h"
#include "device.cuh"
#include "ptx.cuh"

namespace {

using conveyor::cuda::launch;
namespace ptx = conveyor::cuda::ptx;

constexpr int kSkipped = 77;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

using conveyor_test::cuda_ok;
using conveyor_test::DeviceArray;


// ---------------------------------------------------------------------------------------------------------
// Host values: 16-bit inputs as their bits, TF32 inputs with noise below TF32 precision.

// A nonzero value in [-1, -1/8) or [1/8, 1): never zero, so that every element of a product counts.
float random_nonzero(std::mt19937& gen) {
  std::uniform_real_distribution<float> magnitude(0.125f, 1.0f);
  return (gen() & 1u ? -1.0f : 1.0f) * magnitude(gen);
}

template <typename T>
uint16_t bits_of(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return static_cast<__half_raw>(__float2half_rn(v)).x;
  } else {
    return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(v)).x;
  }
}

template <typename T>
float value_of(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  } else {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  }
}

template <typename T>
std::vector<uint16_t> random_16bit(size_t n, std::mt19937& gen) {
  std::vector<uint16_t> v(n);
  for (uint16_t& e : v) e = bits_of<T>(random_nonzero(gen));
  return v;
}

std::vector<float> random_floats(size_t n, std::mt19937& gen) {
  std::vector<float> v(n);
  for (float& e : v) e = random_nonzero(gen);
  return v;
}

float with_mantissa_mask(float v, uint32_t keep, uint32_t add) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits & keep) | add;
  std::memcpy(&v, &bits, 4);
  return v;
}

// A TF32 value (low 13 mantissa bits clear) plus noise in the low 12 bits: a tensor core that reads only the
// TF32 bits sees the TF32 value, whether it truncates or rounds to nearest (bit 12 is clear), and one that
// read all 32 bits would be off by up to 2^-11 relative.
std::vector<float> random_tf32_with_noise(size_t n, std::mt19937& gen, std::vector<float>& tf32_value) {
  std::vector<float> v(n);
  tf32_value.resize(n);
  for (size_t i = 0; i < n; ++i) {
    tf32_value[i] = with_mantissa_mask(random_nonzero(gen), 0xffffe000u, 0);
    v[i] = with_mantissa_mask(tf32_value[i], 0xffffffffu, 1u + uint32_t(gen() % 0xfffu));
  }
  return v;
}

// D = A B + C in double; scale[i] = |C| + sum |A B|, the size that float rounding is relative to.
void host_product(int M, int N, int K, const std::vector<float>& A, const std::vector<float>& B,
                  const std::vector<float>& C, std::vector<double>& D, std::vector<double>& scale) {
  D.assign(size_t(M) * N, 0.0);
  scale.assign(size_t(M) * N, 0.0);
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      double sum = C[m * N + n], size = std::fabs(C[m * N + n]);
      for (int k = 0; k < K; ++k) {
        sum += double(A[m * K + k]) * B[k * N + n];
        size += std::fabs(double(A[m * K + k]) * B[k * N + n]);
      }
      D[m * N + n] = sum;
      scale[m * N + n] = size;
    }
  }
}

// Every element of `got` within 1e-5 of its scale of `expected` (float sums in any order, far below one
// wrong product); reports the first that is not.
void check_product(const std::string& what, const std::vector<float>& got, const std::vector<double>& expected,
                   const std::vector<double>& scale, int N) {
  bool ok = got.size() == expected.size();
  std::string where;
  for (size_t i = 0; ok && i < got.size(); ++i) {
    if (!conveyor_test::near(got[i], expected[i], 1e-5 * scale[i], 0.0)) {
      ok = false;
      where = " at (" + std::to_string(i / N) + ", " + std::to_string(i % N) + "): " + std::to_string(got[i]) +
              " vs " + std::to_string(expected[i]);
    }
  }
  CHECK_MSG(ok, what + where);
}

template <typename T>
std::vector<float> values_of(const std::vector<uint16_t>& bits) {
  std::vector<float> v(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) v[i] = value_of<T>(bits[i]);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// Fragments from global memory, by the PTX ISA's formulas ("Matrix fragments for mma.m16n8k16 with
// floating point type" and "for mma.m16n8k8 with .tf32"), g = lane / 4 and t = lane % 4:
//   m16n8k16 a_i: row g for i in {0, 1, 4, 5}, else g + 8; col 2t + (i & 1), + 8 for i >= 4
//            b_i: row 2t + (i & 1), + 8 for i >= 2; col g
//   m16n8k8  a_i: row g for i in {0, 2}, else g + 8; col t for i < 2, else t + 4
//            b_i: row t for i = 0, t + 4 for i = 1; col g
//   c_i (both): row g for i < 2, else g + 8; col 2t + (i & 1)

__device__ int a16_row(int lane, int i) { return (i == 0 || i == 1 || i == 4 || i == 5) ? lane / 4 : lane / 4 + 8; }
__device__ int a16_col(int lane, int i) { return 2 * (lane % 4) + (i & 1) + (i >= 4 ? 8 : 0); }
__device__ int b16_row(int lane, int i) { return 2 * (lane % 4) + (i & 1) + (i >= 2 ? 8 : 0); }
__device__ int a8_row(int lane, int i) { return (i == 0 || i == 2) ? lane / 4 : lane / 4 + 8; }
__device__ int a8_col(int lane, int i) { return i < 2 ? lane % 4 : lane % 4 + 4; }
__device__ int b8_row(int lane, int i) { return i == 0 ? lane % 4 : lane % 4 + 4; }
__device__ int c_row(int lane, int i) { return i < 2 ? lane / 4 : lane / 4 + 8; }
__device__ int c_col(int lane, int i) { return 2 * (lane % 4) + (i & 1); }

// D (M x N) = A (M x K) B (K x N) + C, all row-major, 16-bit inputs as bits: warp w computes the m16n8 tile
// (w / (N / 8), w % (N / 8)) over K / 16 k-steps, accumulating in place.
template <typename T>
__global__ void mma_m16n8k16_kernel(int N, int K, const uint16_t* A, const uint16_t* B, const float* C, float* D) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int m0 = warp / (N / 8) * 16, n0 = warp % (N / 8) * 8;
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[(m0 + c_row(lane, i)) * N + n0 + c_col(lane, i)];
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t a[4], b[2];
    for (int r = 0; r < 4; ++r) {
      const uint16_t low = A[(m0 + a16_row(lane, 2 * r)) * K + k0 + a16_col(lane, 2 * r)];
      const uint16_t high = A[(m0 + a16_row(lane, 2 * r + 1)) * K + k0 + a16_col(lane, 2 * r + 1)];
      a[r] = uint32_t(low) | uint32_t(high) << 16;
    }
    for (int r = 0; r < 2; ++r) {
      const int col = n0 + lane / 4;
      const uint16_t low = B[(k0 + b16_row(lane, 2 * r)) * N + col];
      const uint16_t high = B[(k0 + b16_row(lane, 2 * r + 1)) * N + col];
      b[r] = uint32_t(low) | uint32_t(high) << 16;
    }
    ptx::mma_m16n8k16<T>(acc, a, b, acc);
  }
  for (int i = 0; i < 4; ++i) D[(m0 + c_row(lane, i)) * N + n0 + c_col(lane, i)] = acc[i];
}

// The same with TF32 inputs and k-steps of 8.
__global__ void mma_m16n8k8_tf32_kernel(int N, int K, const float* A, const float* B, const float* C, float* D) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int m0 = warp / (N / 8) * 16, n0 = warp % (N / 8) * 8;
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[(m0 + c_row(lane, i)) * N + n0 + c_col(lane, i)];
  for (int k0 = 0; k0 < K; k0 += 8) {
    float a[4], b[2];
    for (int i = 0; i < 4; ++i) a[i] = A[(m0 + a8_row(lane, i)) * K + k0 + a8_col(lane, i)];
    for (int i = 0; i < 2; ++i) b[i] = B[(k0 + b8_row(lane, i)) * N + n0 + lane / 4];
    ptx::mma_m16n8k8_tf32(acc, a, b, acc);
  }
  for (int i = 0; i < 4; ++i) D[(m0 + c_row(lane, i)) * N + n0 + c_col(lane, i)] = acc[i];
}

template <typename T>
void check_mma_m16n8k16(const char* type, int M, int N, int K, std::mt19937& gen) {
  const std::vector<uint16_t> A = random_16bit<T>(size_t(M) * K, gen), B = random_16bit<T>(size_t(K) * N, gen);
  const std::vector<float> C = random_floats(size_t(M) * N, gen);
  DeviceArray<uint16_t> dA(A), dB(B);
  DeviceArray<float> dC(C), dD(std::vector<float>(size_t(M) * N, kNaN));
  launch("mma_m16n8k16_kernel", mma_m16n8k16_kernel<T>, dim3(1), dim3(32 * (M / 16) * (N / 8)), 0, nullptr, N, K,
         dA.get(), dB.get(), dC.get(), dD.get());
  std::vector<double> expected, scale;
  host_product(M, N, K, values_of<T>(A), values_of<T>(B), C, expected, scale);
  check_product(std::string("mma_m16n8k16 ") + type + " " + std::to_string(M) + "x" + std::to_string(N) + "x" +
                    std::to_string(K),
                dD.to_host(), expected, scale, N);
}

void check_mma_m16n8k8_tf32(int M, int N, int K, std::mt19937& gen) {
  std::vector<float> A_tf32, B_tf32;
  const std::vector<float> A = random_tf32_with_noise(size_t(M) * K, gen, A_tf32);
  const std::vector<float> B = random_tf32_with_noise(size_t(K) * N, gen, B_tf32);
  const std::vector<float> C = random_floats(size_t(M) * N, gen);
  DeviceArray<float> dA(A), dB(B), dC(C), dD(std::vector<float>(size_t(M) * N, kNaN));
  launch("mma_m16n8k8_tf32_kernel", mma_m16n8k8_tf32_kernel, dim3(1), dim3(32 * (M / 16) * (N / 8)), 0, nullptr, N,
         K, dA.get(), dB.get(), dC.get(), dD.get());
  std::vector<double> expected, scale;
  host_product(M, N, K, A_tf32, B_tf32, C, expected, scale);
  check_product("mma_m16n8k8_tf32 " + std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K) +
                    " (inputs read as TF32)",
                dD.to_host(), expected, scale, N);
}

// ---------------------------------------------------------------------------------------------------------
// ldmatrix: one warp, a 16 x 16 tile of 16-bit values in shared memory.

// Copies a row-major 16 x 16 tile from global to shared memory, 8 elements per lane.
__device__ void stage_tile(uint16_t (&shared)[16][16], const uint16_t* global) {
  const int lane = threadIdx.x % 32;
  for (int e = 0; e < 8; ++e) shared[lane / 2][(lane % 2) * 8 + e] = global[lane * 8 + e];
}

// Lane l passes the address of shared (lane_row[l], lane_col[l]); writes each lane's 4 registers, plainly
// and transposed, at [lane * 4 + i].
__global__ void ldmatrix_kernel(const uint16_t* tile, const int* lane_row, const int* lane_col, uint32_t* plain,
                                uint32_t* transposed) {
  CONVEYOR_SHARED(uint16_t, shared_tile, [16][16]);
  const int lane = threadIdx.x % 32;
  stage_tile(shared_tile, tile);
  __syncwarp();
  uint32_t fragment[4];
  ptx::ldmatrix_x4(fragment, &shared_tile[lane_row[lane]][lane_col[lane]]);
  for (int i = 0; i < 4; ++i) plain[lane * 4 + i] = fragment[i];
  ptx::ldmatrix_x4_trans(fragment, &shared_tile[lane_row[lane]][lane_col[lane]]);
  for (int i = 0; i < 4; ++i) transposed[lane * 4 + i] = fragment[i];
}

// What ldmatrix gives `lane` as register i: matrix i's rows are those lanes 8i..8i+7 point at; the lane
// gets row lane / 4, columns 2 (lane % 4) and + 1 (transposed: rows 2 (lane % 4) and + 1, column lane / 4).
uint32_t expected_ldmatrix(const std::vector<uint16_t>& tile, const std::vector<int>& lane_row,
                           const std::vector<int>& lane_col, int lane, int i, bool transposed) {
  uint32_t reg = 0;
  for (int e = 0; e < 2; ++e) {
    const int row_in_matrix = transposed ? 2 * (lane % 4) + e : lane / 4;
    const int col_in_matrix = transposed ? lane / 4 : 2 * (lane % 4) + e;
    const int pointing_lane = 8 * i + row_in_matrix;
    reg |= uint32_t(tile[lane_row[pointing_lane] * 16 + lane_col[pointing_lane] + col_in_matrix]) << (16 * e);
  }
  return reg;
}

void check_ldmatrix(const char* order, const std::vector<int>& lane_row, const std::vector<int>& lane_col,
                    std::mt19937& gen) {
  const std::vector<uint16_t> tile = random_16bit<__nv_bfloat16>(256, gen);
  DeviceArray<uint16_t> dtile(tile);
  DeviceArray<int> drow(lane_row), dcol(lane_col);
  const std::vector<uint32_t> poisoned(128, 0xffffffffu);  // two 16-bit NaNs per register
  DeviceArray<uint32_t> dplain(poisoned), dtrans(poisoned);
  launch("ldmatrix_kernel", ldmatrix_kernel, dim3(1), dim3(32), 0, nullptr, dtile.get(), drow.get(), dcol.get(),
         dplain.get(), dtrans.get());
  for (int transposed = 0; transposed < 2; ++transposed) {
    const std::vector<uint32_t> got = (transposed ? dtrans : dplain).to_host();
    std::string where;
    for (int lane = 0; lane < 32 && where.empty(); ++lane) {
      for (int i = 0; i < 4 && where.empty(); ++i) {
        const uint32_t expected = expected_ldmatrix(tile, lane_row, lane_col, lane, i, transposed);
        if (got[lane * 4 + i] != expected) {
          char text[120];
          std::snprintf(text, sizeof text, ": lane %d register %d is 0x%08x, expected 0x%08x", lane, i,
                        unsigned(got[lane * 4 + i]), unsigned(expected));
          where = text;
        }
      }
    }
    CHECK_MSG(where.empty(), std::string(transposed ? "ldmatrix_x4_trans" : "ldmatrix_x4") + ", rows in " + order +
                                 " order" + where);
  }
}

// D (16 x 16) = A B + C with A from ldmatrix_x4 of a row-major [m][k] tile and B loaded two ways: ldmatrix_x4_trans
// of a row-major [k][n] tile into d_from_trans, and ldmatrix_x4 of the same B stored [n][k] into d_from_plain.
// Each x4 load gives both n8 halves' b fragments: registers 0, 1 for columns 0-7, 2, 3 for columns 8-15.
template <typename T>
__global__ void ldmatrix_mma_kernel(const uint16_t* A, const uint16_t* B, const uint16_t* B_transposed,
                                    const float* C, float* d_from_trans, float* d_from_plain) {
  CONVEYOR_SHARED(uint16_t, a_tile, [16][16]);
  CONVEYOR_SHARED(uint16_t, b_tile, [16][16]);
  CONVEYOR_SHARED(uint16_t, bt_tile, [16][16]);
  const int lane = threadIdx.x % 32;
  stage_tile(a_tile, A);
  stage_tile(b_tile, B);
  stage_tile(bt_tile, B_transposed);
  __syncwarp();
  // Matrices 0..3 of A: rows 0-7 / 8-15 of columns 0-7, then of columns 8-15, as a0a1, a2a3, a4a5, a6a7.
  uint32_t a[4], b_kn[4], b_nk[4];
  ptx::ldmatrix_x4(a, &a_tile[lane % 16][lane / 16 * 8]);
  // [k][n], transposed: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
  ptx::ldmatrix_x4_trans(b_kn, &b_tile[lane % 16][lane / 16 * 8]);
  // [n][k], plain: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
  ptx::ldmatrix_x4(b_nk, &bt_tile[lane / 16 * 8 + lane % 8][lane / 8 % 2 * 8]);
  for (int half = 0; half < 2; ++half) {
    float c[4], d[4];
    for (int i = 0; i < 4; ++i) c[i] = C[c_row(lane, i) * 16 + half * 8 + c_col(lane, i)];
    const uint32_t from_trans[2] = {b_kn[2 * half], b_kn[2 * half + 1]};
    ptx::mma_m16n8k16<T>(d, a, from_trans, c);
    for (int i = 0; i < 4; ++i) d_from_trans[c_row(lane, i) * 16 + half * 8 + c_col(lane, i)] = d[i];
    const uint32_t from_plain[2] = {b_nk[2 * half], b_nk[2 * half + 1]};
    ptx::mma_m16n8k16<T>(d, a, from_plain, c);
    for (int i = 0; i < 4; ++i) d_from_plain[c_row(lane, i) * 16 + half * 8 + c_col(lane, i)] = d[i];
  }
}

template <typename T>
void check_ldmatrix_mma(const char* type, std::mt19937& gen) {
  const std::vector<uint16_t> A = random_16bit<T>(256, gen), B = random_16bit<T>(256, gen);
  std::vector<uint16_t> B_transposed(256);
  for (int k = 0; k < 16; ++k) {
    for (int n = 0; n < 16; ++n) B_transposed[n * 16 + k] = B[k * 16 + n];
  }
  const std::vector<float> C = random_floats(256, gen);
  DeviceArray<uint16_t> dA(A), dB(B), dBt(B_transposed);
  DeviceArray<float> dC(C), d_trans(std::vector<float>(256, kNaN)), d_plain(std::vector<float>(256, kNaN));
  launch("ldmatrix_mma_kernel", ldmatrix_mma_kernel<T>, dim3(1), dim3(32), 0, nullptr, dA.get(), dB.get(),
         dBt.get(), dC.get(), d_trans.get(), d_plain.get());
  std::vector<double> expected, scale;
  host_product(16, 16, 16, values_of<T>(A), values_of<T>(B), C, expected, scale);
  check_product(std::string("ldmatrix_x4 A, ldmatrix_x4_trans B [k][n], mma_m16n8k16 ") + type, d_trans.to_host(),
                expected, scale, 16);
  check_product(std::string("ldmatrix_x4 A, ldmatrix_x4 B [n][k], mma_m16n8k16 ") + type, d_plain.to_host(),
                expected, scale, 16);
}

// ---------------------------------------------------------------------------------------------------------
// cp.async: 64 threads stage 128 chunks of 16 bytes (4 floats) in two commit groups. Group 0 (chunks 0-63)
// uses cp_async_16_or_zero, every chunk c with c % 5 == 3 zero-filled; group 1 (chunks 64-127) cp_async_16.
// after_group_0 gets the staged chunks 0-63 once cp_async_wait<1> returned, after_both all 128 after
// cp_async_wait<0>.

constexpr int kChunks = 128, kCopyThreads = 64;

__host__ __device__ bool zero_filled(int chunk) { return chunk < kCopyThreads && chunk % 5 == 3; }

__global__ void cp_async_kernel(const float* source, float poison, float* after_group_0, float* after_both) {
  CONVEYOR_SHARED(float, staged, [kChunks * 4]);
  const int tid = threadIdx.x;
  // NaN first, so that a zero-filled chunk must have been written by cp.async to read as 0.
  for (int i = tid; i < kChunks * 4; i += kCopyThreads) staged[i] = poison;
  __syncthreads();
  const int first = tid, second = tid + kCopyThreads;
  ptx::cp_async_16_or_zero(&staged[first * 4], source + first * 4, !zero_filled(first));
  ptx::cp_async_commit();
  ptx::cp_async_16(&staged[second * 4], source + second * 4);
  ptx::cp_async_commit();
  ptx::cp_async_wait<1>();  // group 0 done; group 1 may still be in flight
  __syncthreads();
  for (int i = tid; i < kCopyThreads * 4; i += kCopyThreads) after_group_0[i] = staged[i];
  ptx::cp_async_wait<0>();
  __syncthreads();
  for (int i = tid; i < kChunks * 4; i += kCopyThreads) after_both[i] = staged[i];
}

void check_cp_async(std::mt19937& gen) {
  const std::vector<float> source = random_floats(kChunks * 4, gen);
  DeviceArray<float> dsource(source), d_group_0(std::vector<float>(kCopyThreads * 4, kNaN)),
      d_both(std::vector<float>(kChunks * 4, kNaN));
  launch("cp_async_kernel", cp_async_kernel, dim3(1), dim3(kCopyThreads), 0, nullptr, dsource.get(), kNaN,
         d_group_0.get(), d_both.get());
  const std::vector<float> group_0 = d_group_0.to_host(), both = d_both.to_host();
  for (int pass = 0; pass < 2; ++pass) {
    const std::vector<float>& got = pass == 0 ? group_0 : both;
    std::string where;
    for (size_t i = 0; i < got.size() && where.empty(); ++i) {
      const int chunk = int(i / 4);
      const float expected = zero_filled(chunk) ? 0.0f : source[i];
      // Bitwise, so that NaN never equals and -0 never passes for a copied +0.
      if (std::memcmp(&got[i], &expected, 4) != 0) {
        where = ": float " + std::to_string(i) + " (chunk " + std::to_string(chunk) + ") is " + std::to_string(got[i]) +
                ", expected " + std::to_string(expected);
      }
    }
    CHECK_MSG(where.empty(), std::string(pass == 0 ? "cp.async group 0 after cp_async_wait<1>"
                                                   : "cp.async both groups after cp_async_wait<0>") +
                                 where);
  }
}

}  // namespace

int main() {
  if (!conveyor_test::cuda_device_present()) return kSkipped;
  int major = 0;
  cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "cudaDeviceGetAttribute");
  if (major < 8) {
    std::printf("compute capability %d.x has no bfloat16 mma or cp.async: skipped\n", major);
    return kSkipped;
  }
  try {
    std::mt19937 gen(2024);
    // One m16n8 tile, one k-step; then 2 x 2 tiles (4 warps) over 4 k-steps, accumulating in place.
    check_mma_m16n8k16<__nv_bfloat16>("bf16", 16, 8, 16, gen);
    check_mma_m16n8k16<__nv_bfloat16>("bf16", 32, 16, 64, gen);
    check_mma_m16n8k16<__half>("f16", 16, 8, 16, gen);
    check_mma_m16n8k16<__half>("f16", 32, 16, 64, gen);
    check_mma_m16n8k8_tf32(16, 8, 8, gen);
    check_mma_m16n8k8_tf32(32, 16, 32, gen);

    std::vector<int> row(32), col(32), scrambled_row(32), scrambled_col(32);
    for (int lane = 0; lane < 32; ++lane) {
      row[lane] = lane % 16;  // matrices: rows 0-7 / 8-15 of columns 0-7, then of columns 8-15
      col[lane] = lane / 16 * 8;
      // Any row of the tile, in any order, each a 16-byte aligned address: lane 8i + r gives row r of matrix i.
      scrambled_row[lane] = (lane * 7 + 3) % 16;
      scrambled_col[lane] = (lane / 4 % 2) * 8;
    }
    check_ldmatrix("the usual", row, col, gen);
    check_ldmatrix("a scrambled", scrambled_row, scrambled_col, gen);
    check_ldmatrix_mma<__nv_bfloat16>("bf16", gen);
    check_ldmatrix_mma<__half>("f16", gen);

    check_cp_async(gen);
    cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  } catch (const std::exception& e) {
    CHECK_MSG(false, std::string("exception: ") + e.what());
  }
  return conveyor_test::report();
}
