// The time-parallel matrix products of the CUDA backend (input projection, dx, dW, dR), a column sum for
// the bias gradients, and a converting copy. Declarations; cuda/gemm.cu defines and instantiates them for
// every storage type S with its compute type C: gemm<S, S, C>, gemm<C, S, S>, gemm<C, C, S>, gemm<C, S, C>,
// column_sums<C, S>, convert_copy<C, S> and convert_copy<S, C>.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace conveyor::cuda {

// A matrix operand of any layout: element (r, c) is data[r * row_stride + c * col_stride].
template <typename T>
struct Operand {
  const T* data;
  int64_t row_stride;
  int64_t col_stride;
};

// A row-major matrix with leading dimension ld.
template <typename T>
Operand<T> rows_of(const T* data, int64_t ld) {
  return {data, ld, 1};
}

// The transpose of a row-major matrix with leading dimension ld: element (r, c) is data[c * ld + r].
template <typename T>
Operand<T> transpose_of(const T* data, int64_t ld) {
  return {data, 1, ld};
}

// C[M, N] = A[M, K] B[K, N], or C += A B when `accumulate`; C is row-major with leading dimension ldc.
// Accumulates in float (double for double operands). Where the GPU has tensor cores (compute capability 8.0
// and up), float16 and bfloat16 operands multiply on them, and float32 ones too, in TF32, when
// `allow_tf32`; a float32 A with a float16 B (the gradient products of float16 storage) always multiplies in
// TF32, so that gradients below float16's range keep their value. Any M, N, K >= 0; K = 0 writes zeros (or
// leaves C as it is when accumulating).
template <typename TA, typename TB, typename TC>
void gemm(int64_t M, int64_t N, int64_t K, Operand<TA> A, Operand<TB> B, bool accumulate, TC* C, int64_t ldc,
          bool allow_tf32, cudaStream_t stream);

// out[c] = sum over r < rows of m[r * ld + c] for every c < cols (+= when `accumulate`). Deterministic.
template <typename TM, typename TO>
void column_sums(int64_t rows, int64_t cols, const TM* m, int64_t ld, bool accumulate, TO* out,
                 cudaStream_t stream);

// out[i] = in[i], converted and rounded to nearest, for i < count.
template <typename To, typename From>
void convert_copy(int64_t count, const From* in, To* out, cudaStream_t stream);

}  // namespace conveyor::cuda
