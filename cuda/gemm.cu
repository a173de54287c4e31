// The time-parallel matrix products: a tiled SIMT kernel for any operand type, and a tensor-core kernel
// (WMMA: float16, bfloat16, TF32) for GPUs of compute capability 8.0 and up. Both stage their tiles through
// shared memory, converting to the multiply type on the way, so operands may be of any layout and type and
// the sizes need not divide the tiles. Then the column sum, the converting copy, and the entry point of the
// products' tests and benchmark (core/backends.h, cuda_test_gemm).
//
// Contract: see gemm.cuh. Out-of-range tile elements load as zero; C is read only when accumulating, so
// an uninitialised (or NaN-poisoned) output is never read.
#include <mma.h>

#include <string>

#include "core/backends.h"
#include "device.cuh"
#include "gemm.cuh"

namespace conveyor::cuda {

// ---------------------------------------------------------------------------------------------------------
// SIMT: a 64 x 64 tile per block of 256 threads, each thread 4 x 4 outputs strided by 16 (so that a warp's
// shared-memory reads fall in distinct banks), K in slices of 16.

constexpr int kSimtTile = 64;
constexpr int kSimtK = 16;
constexpr int kSimtThreads = 256;

template <typename Acc, typename TA, typename TB, typename TC>
__global__ void __launch_bounds__(kSimtThreads)
    gemm_simt_kernel(int64_t M, int64_t N, int64_t K, Operand<TA> A, Operand<TB> B, bool accumulate, TC* C,
                     int64_t ldc) {
  CONVEYOR_SHARED(Acc, a_tile, [kSimtK][kSimtTile + 1]);
  CONVEYOR_SHARED(Acc, b_tile, [kSimtK][kSimtTile + 1]);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = int64_t(blockIdx.x) * kSimtTile, n0 = int64_t(blockIdx.y) * kSimtTile;
  // Walk the operand's contiguous direction with consecutive threads, so that global loads coalesce.
  const bool a_k_contiguous = A.col_stride == 1;
  const bool b_n_contiguous = B.col_stride == 1;
  Acc acc[4][4] = {};

  for (int64_t k0 = 0; k0 < K; k0 += kSimtK) {
    for (int e = tid; e < kSimtTile * kSimtK; e += kSimtThreads) {
      const int kk = a_k_contiguous ? e % kSimtK : e / kSimtTile;
      const int mm = a_k_contiguous ? e / kSimtK : e % kSimtTile;
      const int64_t m = m0 + mm, k = k0 + kk;
      a_tile[kk][mm] = m < M && k < K ? convert<Acc>(A.data[m * A.row_stride + k * A.col_stride]) : Acc(0);
    }
    for (int e = tid; e < kSimtTile * kSimtK; e += kSimtThreads) {
      const int nn = b_n_contiguous ? e % kSimtTile : e / kSimtK;
      const int kk = b_n_contiguous ? e / kSimtTile : e % kSimtK;
      const int64_t n = n0 + nn, k = k0 + kk;
      b_tile[kk][nn] = n < N && k < K ? convert<Acc>(B.data[k * B.row_stride + n * B.col_stride]) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtK; ++kk) {
      Acc a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = a_tile[kk][ty + 16 * i];
        b[i] = b_tile[kk][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < M && n < N) {
        TC* c = C + m * ldc + n;
        *c = convert<TC>(accumulate ? acc[i][j] + convert<Acc>(*c) : acc[i][j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor cores (WMMA): a 64 x 64 tile per block of 8 warps, each warp a 16 x 32 strip (two 16 x 16
// accumulators), K in slices of 32. Tiles are stored k-contiguous with a leading dimension of 40 elements:
// a multiple of 8 (WMMA's requirement for 16-bit types, and of 4 for TF32) whose fragment offsets stay
// 32-byte aligned, and padded against bank conflicts.

struct Tf32 {};  // tag: float operands multiplied in TF32

template <typename MmaInput>
struct MmaTraits;
template <>
struct MmaTraits<__half> {
  using Tile = __half;
  using Fragment = __half;
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<bfloat16> {
  using Tile = bfloat16;
  using Fragment = bfloat16;
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<Tf32> {
  using Tile = float;
  using Fragment = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8;
};

constexpr int kMmaTile = 64;
constexpr int kMmaK = 32;
constexpr int kMmaLd = kMmaK + 8;
constexpr int kMmaOutLd = kMmaTile + 4;
constexpr int kMmaThreads = 256;

template <typename MmaInput, typename TA, typename TB, typename TC>
__global__ void __launch_bounds__(kMmaThreads)
    gemm_tensor_core_kernel(int64_t M, int64_t N, int64_t K, Operand<TA> A, Operand<TB> B, bool accumulate,
                            TC* C, int64_t ldc) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using Traits = MmaTraits<MmaInput>;
  using Tile = typename Traits::Tile;
  using Fragment = typename Traits::Fragment;
  constexpr int kK = Traits::kK;
  constexpr bool kTf32 = std::is_same_v<MmaInput, Tf32>;

  CONVEYOR_SHARED(Tile, a_tile, [kMmaTile * kMmaLd]);  // (m, k) at m * kMmaLd + k
  CONVEYOR_SHARED(Tile, b_tile, [kMmaTile * kMmaLd]);  // (k, n) at n * kMmaLd + k
  CONVEYOR_SHARED(float, out_tile, [kMmaTile * kMmaOutLd]);

  const int tid = threadIdx.x, warp = tid / 32;
  const int warp_m = warp % 4, warp_n = warp / 4;
  const int64_t m0 = int64_t(blockIdx.x) * kMmaTile, n0 = int64_t(blockIdx.y) * kMmaTile;
  const bool a_k_contiguous = A.col_stride == 1;
  const bool b_n_contiguous = B.col_stride == 1;
  const Tile zero = convert<Tile>(0.0f);

  wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);

  for (int64_t k0 = 0; k0 < K; k0 += kMmaK) {
    for (int e = tid; e < kMmaTile * kMmaK; e += kMmaThreads) {
      const int kk = a_k_contiguous ? e % kMmaK : e / kMmaTile;
      const int mm = a_k_contiguous ? e / kMmaK : e % kMmaTile;
      const int64_t m = m0 + mm, k = k0 + kk;
      a_tile[mm * kMmaLd + kk] = m < M && k < K ? convert<Tile>(A.data[m * A.row_stride + k * A.col_stride]) : zero;
    }
    for (int e = tid; e < kMmaTile * kMmaK; e += kMmaThreads) {
      const int nn = b_n_contiguous ? e % kMmaTile : e / kMmaK;
      const int kk = b_n_contiguous ? e / kMmaTile : e % kMmaK;
      const int64_t n = n0 + nn, k = k0 + kk;
      b_tile[nn * kMmaLd + kk] = n < N && k < K ? convert<Tile>(B.data[k * B.row_stride + n * B.col_stride]) : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMmaK; kk += kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kK, Fragment, wmma::row_major> a;
      wmma::load_matrix_sync(a, a_tile + warp_m * 16 * kMmaLd + kk, kMmaLd);
      if constexpr (kTf32) {
        for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
      }
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, kK, Fragment, wmma::col_major> b;
        wmma::load_matrix_sync(b, b_tile + (warp_n * 32 + f * 16) * kMmaLd + kk, kMmaLd);
        if constexpr (kTf32) {
          for (int t = 0; t < b.num_elements; ++t) b.x[t] = wmma::__float_to_tf32(b.x[t]);
        }
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();
  }

  for (int f = 0; f < 2; ++f) {
    wmma::store_matrix_sync(out_tile + warp_m * 16 * kMmaOutLd + warp_n * 32 + f * 16, acc[f], kMmaOutLd,
                            wmma::mem_row_major);
  }
  __syncthreads();
  for (int e = tid; e < kMmaTile * kMmaTile; e += kMmaThreads) {
    const int mm = e / kMmaTile, nn = e % kMmaTile;
    const int64_t m = m0 + mm, n = n0 + nn;
    if (m < M && n < N) {
      TC* c = C + m * ldc + n;
      const float v = out_tile[mm * kMmaOutLd + nn];
      *c = convert<TC>(accumulate ? v + convert<float>(*c) : v);
    }
  }
#else
  __trap();  // never launched: gemm() takes the SIMT kernel below compute capability 8.0
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Column sums: 32 columns per block, 8 row groups summed in a fixed order.

template <typename Acc, typename TM, typename TO>
__global__ void column_sums_kernel(int64_t rows, int64_t cols, const TM* m, int64_t ld, bool accumulate, TO* out) {
  CONVEYOR_SHARED(Acc, partial, [8][33]);
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t c = int64_t(blockIdx.x) * 32 + tx;
  Acc sum = 0;
  if (c < cols) {
    for (int64_t r = ty; r < rows; r += 8) sum += convert<Acc>(m[r * ld + c]);
  }
  partial[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && c < cols) {
    Acc total = 0;
    for (int g = 0; g < 8; ++g) total += partial[g][tx];
    out[c] = convert<TO>(accumulate ? total + convert<Acc>(out[c]) : total);
  }
}

template <typename To, typename From>
__global__ void convert_copy_kernel(int64_t count, const From* in, To* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = convert<To>(in[i]);
  }
}

template <typename MmaInput, typename TA, typename TB, typename TC>
void launch_tensor_core(dim3 grid, int64_t M, int64_t N, int64_t K, Operand<TA> A, Operand<TB> B,
                        bool accumulate, TC* C, int64_t ldc, cudaStream_t stream) {
  launch("gemm_tensor_core_kernel", gemm_tensor_core_kernel<MmaInput, TA, TB, TC>, grid, kMmaThreads, 0, stream, M,
         N, K, A, B, accumulate, C, ldc);
}



int current_device_major() {
  int device = 0, major = 0;
  CONVEYOR_CUDA_CHECK(cudaGetDevice(&device));
  CONVEYOR_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

template <typename TA, typename TB, typename TC>
void gemm(int64_t M, int64_t N, int64_t K, Operand<TA> A, Operand<TB> B, bool accumulate, TC* C, int64_t ldc,
          bool allow_tf32, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  const NvtxRange range("conveyor::gemm");
  const dim3 grid(blocks_for(M, kSimtTile), blocks_for(N, kSimtTile));
  if (grid.y > 65535) throw ArgumentError("gemm: N = " + std::to_string(N) + " columns exceed the grid limit");
  // TB is the storage type in every product the backend forms; it decides the multiply type. A float A
  // beside float16 is a gradient (dx, dW, dR): float16's range would flush the small ones to zero (below
  // 6e-8) or leave them a few bits, so those products multiply in TF32, float16's precision with float's
  // range. bfloat16 has float's range already.
  const bool tensor_cores = current_device_major() >= 8;
  if constexpr (std::is_same_v<TA, float> && std::is_same_v<TB, __half>) {
    if (tensor_cores) return launch_tensor_core<Tf32>(grid, M, N, K, A, B, accumulate, C, ldc, stream);
  } else if constexpr (std::is_same_v<TB, __half> || std::is_same_v<TB, bfloat16>) {
    if (tensor_cores) return launch_tensor_core<TB>(grid, M, N, K, A, B, accumulate, C, ldc, stream);
  } else if constexpr (std::is_same_v<TA, float> && std::is_same_v<TB, float>) {
    if (tensor_cores && allow_tf32) return launch_tensor_core<Tf32>(grid, M, N, K, A, B, accumulate, C, ldc, stream);
  }
  using Acc = std::conditional_t<std::is_same_v<TA, double> || std::is_same_v<TB, double>, double, float>;
  launch("gemm_simt_kernel", gemm_simt_kernel<Acc, TA, TB, TC>, grid, kSimtThreads, 0, stream, M, N, K, A, B,
         accumulate, C, ldc);
}

template <typename TM, typename TO>
void column_sums(int64_t rows, int64_t cols, const TM* m, int64_t ld, bool accumulate, TO* out, cudaStream_t stream) {
  if (cols <= 0) return;
  const NvtxRange range("conveyor::column_sums");
  using Acc = std::conditional_t<std::is_same_v<TM, double>, double, float>;
  launch("column_sums_kernel", column_sums_kernel<Acc, TM, TO>, blocks_for(cols, 32), 256, 0, stream, rows, cols, m,
         ld, accumulate, out);
}

template <typename To, typename From>
void convert_copy(int64_t count, const From* in, To* out, cudaStream_t stream) {
  if (count <= 0) return;
  const unsigned blocks = count / 256 + 1 < 4096 ? unsigned(count / 256 + 1) : 4096u;
  launch("convert_copy_kernel", convert_copy_kernel<To, From>, blocks, 256, 0, stream, count, in, out);
}

// float and double compute in their own type, so their two products and conversions coincide.
#define CONVEYOR_INSTANTIATE_SAME(S)                                                                     \
  template void gemm<S, S, S>(int64_t, int64_t, int64_t, Operand<S>, Operand<S>, bool, S*, int64_t, bool, \
                              cudaStream_t);                                                              \
  template void column_sums<S, S>(int64_t, int64_t, const S*, int64_t, bool, S*, cudaStream_t);          \
  template void convert_copy<S, S>(int64_t, const S*, S*, cudaStream_t);

#define CONVEYOR_INSTANTIATE_MIXED(S)                                                                        \
  template void gemm<S, S, float>(int64_t, int64_t, int64_t, Operand<S>, Operand<S>, bool, float*, int64_t,   \
                                  bool, cudaStream_t);                                                        \
  template void gemm<float, S, S>(int64_t, int64_t, int64_t, Operand<float>, Operand<S>, bool, S*, int64_t,   \
                                  bool, cudaStream_t);                                                        \
  template void gemm<float, float, S>(int64_t, int64_t, int64_t, Operand<float>, Operand<float>, bool, S*,     \
                                      int64_t, bool, cudaStream_t);                                           \
  template void gemm<float, S, float>(int64_t, int64_t, int64_t, Operand<float>, Operand<S>, bool, float*,    \
                                      int64_t, bool, cudaStream_t);                                           \
  template void column_sums<float, S>(int64_t, int64_t, const float*, int64_t, bool, S*, cudaStream_t);      \
  template void convert_copy<float, S>(int64_t, const S*, float*, cudaStream_t);                             \
  template void convert_copy<S, float>(int64_t, const float*, S*, cudaStream_t);

CONVEYOR_INSTANTIATE_SAME(float)
CONVEYOR_INSTANTIATE_SAME(double)
CONVEYOR_INSTANTIATE_MIXED(__half)
CONVEYOR_INSTANTIATE_MIXED(bfloat16)

}  // namespace conveyor::cuda

namespace conveyor::detail {
namespace {

template <typename S>
void test_gemm(const std::string& kind, int64_t M, int64_t N, int64_t K, uintptr_t a, bool a_transposed,
               uintptr_t b, bool b_transposed, uintptr_t c, bool accumulate, bool allow_tf32, cudaStream_t stream) {
  using C = cuda::Compute<S>;
  auto operand = [](auto* data, bool transposed, int64_t rows, int64_t cols) {
    return transposed ? cuda::transpose_of(data, rows) : cuda::rows_of(data, cols);
  };
  const auto B = operand(reinterpret_cast<const S*>(b), b_transposed, K, N);
  if (kind == "projection") {
    cuda::gemm(M, N, K, operand(reinterpret_cast<const S*>(a), a_transposed, M, K), B, accumulate,
               reinterpret_cast<C*>(c), N, allow_tf32, stream);
  } else {
    cuda::gemm(M, N, K, operand(reinterpret_cast<const C*>(a), a_transposed, M, K), B, accumulate,
               reinterpret_cast<S*>(c), N, allow_tf32, stream);
  }
}

}  // namespace

void cuda_test_gemm(const std::string& kind, const std::string& dtype_name, int64_t M, int64_t N, int64_t K,
                    uintptr_t a, bool a_transposed, uintptr_t b, bool b_transposed, uintptr_t c, bool accumulate,
                    bool allow_tf32, uintptr_t stream) {
  if (kind != "projection" && kind != "gradient") {
    throw ArgumentError("kind: expected 'projection' or 'gradient', got '" + kind + "'");
  }
  for (const auto& [name, value] : {std::pair{"M", M}, std::pair{"N", N}, std::pair{"K", K}}) {
    if (value < 0) throw ArgumentError(std::string(name) + ": expected at least 0, got " + std::to_string(value));
  }
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto args = std::tuple{kind, M, N, K, a, a_transposed, b, b_transposed, c, accumulate, allow_tf32, s};
  if (dtype_name == "float32") return std::apply(test_gemm<float>, args);
  if (dtype_name == "float64") return std::apply(test_gemm<double>, args);
  if (dtype_name == "float16") return std::apply(test_gemm<__half>, args);
  if (dtype_name == "bfloat16") return std::apply(test_gemm<cuda::bfloat16>, args);
  throw ArgumentError("dtype_name: expected float32, float64, float16 or bfloat16, got '" + dtype_name + "'");
}

}  // namespace conveyor::detail
