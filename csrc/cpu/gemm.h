// Cache-blocked, multi-threaded matrix product for the CPU backend.
//
// C[M, N] = beta * C + alpha * A[M, K] * B[K, N], where A and B are read through (row, column) strides, so a
// transposed operand is the same matrix with its strides swapped and needs no copy. beta == 0 overwrites C
// without reading it (C may hold NaN poison).
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace conveyor::cpu {

// A vector aligned to a cache line, for arrays whose rows the threads of a recurrent step write by groups of
// units (whole lines of a row each): with malloc's 16-byte alignment the lines at a group's edges hold units
// of two groups, which two threads then write at every step.
template <typename T>
struct LineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kLine{64};
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kLine)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kLine); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAllocator<U>&) const { return false; }
};
template <typename T>
using LineVector = std::vector<T, LineAllocator<T>>;

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

// B[K, N] packed once into the kernel's strip layout, for many products with the same B: the recurrent
// weights, multiplied at every step of a window. Refers to (does not copy) the source for the products that
// read it directly; the source must outlive it, unchanged. Where a float B runs on AMX tiles (amx.h: decided
// here, from N and K, for every product with it), it holds B's bfloat16 parts instead of the strips.
template <typename T>
class PackedMatrix {
 public:
  PackedMatrix(int64_t K, int64_t N, MatrixRef<T> B);

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  const MatrixRef<T>& source() const { return source_; }
  // The packed strips of the K slice that starts at row k0, from column n0 (a multiple of the strip width).
  const T* slice(int64_t k0, int64_t n0) const;
  bool on_amx() const { return !parts_.empty(); }
  const uint16_t* parts() const { return parts_.data(); }

 private:
  int64_t rows_, cols_, padded_cols_;
  MatrixRef<T> source_;
  std::vector<T> packed_;
  LineVector<uint16_t> parts_;  // on AMX: amx.h's layout of B
};

// C[M, N] = beta * C + alpha * A[M, K] * B, with B packed; the same numbers as gemm() with B's source.
template <typename T>
void gemm(int64_t M, T alpha, MatrixRef<T> A, const PackedMatrix<T>& B, T beta, T* C, int64_t ldc);

// The columns of one packed strip of B: a column range of gemm_columns() starts at a multiple of it.
template <typename T>
int64_t packed_strip_width();

// A[M, K] packed once for products with several column ranges of one packed B, each on its own thread: the
// tasks of a recurrent step, which multiply the same h_{t-1} by their own columns of R^T. Refers to A (kept
// as it is for M <= 2, whose products read it directly); A must outlive it, unchanged. Packed for products
// with `B`: as bfloat16 parts where B is on AMX.
template <typename T>
class PackedRows {
 public:
  // Packs A[M, K] into the buffer of the previous call, grown as needed.
  void pack(int64_t M, int64_t K, MatrixRef<T> A, const PackedMatrix<T>& B) {
    reserve(M, K, A, B);
    pack_columns(0, K);
  }
  // Or in parts: reserve(), then pack_columns() over ranges that together cover [0, K), from any threads at
  // once (each writes only its own columns' places).
  void reserve(int64_t M, int64_t K, MatrixRef<T> A, const PackedMatrix<T>& B);
  void pack_columns(int64_t k_begin, int64_t k_end);

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  const MatrixRef<T>& source() const { return source_; }
  const T* data() const { return packed_.data(); }
  bool on_amx() const { return on_amx_; }
  const uint16_t* parts() const { return parts_.data(); }

 private:
  int64_t rows_ = 0, cols_ = 0;
  bool on_amx_ = false;
  MatrixRef<T> source_{nullptr, 0, 0};
  LineVector<T> packed_;  // each thread packs its own columns (pack_columns)
  LineVector<uint16_t> parts_;
};

// Columns [n0, n0 + nc) of C[M, N] = beta * C + alpha * A * B, on the calling thread; n0 a multiple of
// packed_strip_width(). The same numbers as gemm() gives those columns.
template <typename T>
void gemm_columns(const PackedRows<T>& A, const PackedMatrix<T>& B, int64_t n0, int64_t nc, T alpha, T beta, T* C,
                  int64_t ldc);

}  // namespace conveyor::cpu
