// Cache-blocked, multi-threaded matrix product for the CPU backend.
//
// C[M, N] = beta * C + alpha * A[M, K] * B[K, N], where A and B are read through (row, column) strides, so a
// transposed operand is the same matrix with its strides swapped and needs no copy. beta == 0 overwrites C
// without reading it (C may hold NaN poison).
#pragma once

#include <cstdint>

namespace conveyor::cpu {

template <typename T>
struct MatrixRef {
  const T* data;
  int64_t row_stride;  // elements between (m, k) and (m + 1, k)
  int64_t col_stride;  // elements between (m, k) and (m, k + 1)

  // A row-major matrix with `ld` elements per row, or its transpose.
  static MatrixRef rows(const T* data, int64_t ld) { return {data, ld, 1}; }
  static MatrixRef transposed(const T* data, int64_t ld) { return {data, 1, ld}; }
};

// C is row-major with ldc elements per row.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, T alpha, MatrixRef<T> A, MatrixRef<T> B, T beta, T* C, int64_t ldc);

}  // namespace conveyor::cpu
