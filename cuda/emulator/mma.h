// nvcuda::wmma for the emulated build: stands in for the toolkit's <mma.h> (this directory comes first on
// the emulated build's include path). Fragments are spread over the warp's lanes as the PTX ISA documents
// for mma.sync (m16n8k16 for float16 and bfloat16, m16n8k8 for TF32; a 16 x 16 matrix is two n8 halves), so
// code that walks a fragment's elements sees each lane hold what a GPU lane holds of the same mma. Loads and
// stores are warp-synchronous (every lane must call them, as on the GPU); mma_sync is a warp collective that
// multiplies the whole matrices in float. TF32 operands are truncated to TF32, as the tensor cores read
// them, unless __float_to_tf32 rounded them first.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_emulator.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace emulated {

template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};

template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return static_cast<float>(v);
  }
}

template <typename T>
T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

using ::conveyor::emulator::tf32_truncate;

struct Position {
  int row, col;
};

// Element e of lane `lane` of a 16-row (A, accumulator) or 16-column (B) fragment, as (row, col) of the
// matrix: A is M x K, B is K x N, the accumulator M x N. g = lane / 4 is the lane's group, t = lane % 4 its
// place in it (PTX ISA, "Matrix fragments for mma.m16n8k16" and "mma.m16n8k8").
template <typename Use, int K>
Position position(int lane, int e) {
  const int g = lane / 4, t = lane % 4;
  if constexpr (std::is_same_v<Use, accumulator>) {
    const int half = e / 4, i = e % 4;  // c0..c3 of the n8 half
    return {g + 8 * (i / 2), 8 * half + 2 * t + i % 2};
  } else if constexpr (K == 16 && std::is_same_v<Use, matrix_a>) {
    // a0,a1: (g, 2t..2t+1); a2,a3: (g+8, ..); a4,a5: (g, 2t+8..); a6,a7: (g+8, 2t+8..)
    return {g + 8 * (e / 2 % 2), 2 * t + e % 2 + 8 * (e / 4)};
  } else if constexpr (K == 16) {
    // each n8 half: b0,b1: (2t..2t+1, g); b2,b3: (2t+8.., g)
    const int half = e / 4, i = e % 4;
    return {2 * t + i % 2 + 8 * (i / 2), g + 8 * half};
  } else if constexpr (std::is_same_v<Use, matrix_a>) {  // K == 8, TF32: a0: (g, t), a1: (g+8, t), a2: (g, t+4), a3: (g+8, t+4)
    return {g + 8 * (e % 2), t + 4 * (e / 2)};
  } else {  // K == 8, TF32: each n8 half: b0: (t, g), b1: (t+4, g)
    const int half = e / 2, i = e % 2;
    return {t + 4 * i, g + 8 * half};
  }
}

template <typename Use, int K>
constexpr int element_count() {
  if constexpr (std::is_same_v<Use, accumulator>) return 8;
  return K == 16 ? 8 : 4;
}

}  // namespace emulated

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || K == 8), "the emulator has the 16 x 16 x 16 and 16 x 16 x 8 shapes");
  using element_type = T;
  using storage_element_type = typename emulated::Storage<T>::type;
  static constexpr int num_elements = emulated::element_count<Use, K>();
  storage_element_type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const typename fragment<Use, M, N, K, T, Layout>::storage_element_type& v) {
  for (auto& e : f.x) e = v;
}

namespace emulated {
// Element (row, col) of a matrix in memory with leading dimension ldm.
inline size_t offset(Position p, unsigned ldm, bool row_major_layout) {
  return row_major_layout ? size_t(p.row) * ldm + p.col : size_t(p.col) * ldm + p.row;
}
}  // namespace emulated

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator's load takes its layout");
  const int lane = int(::conveyor::emulator::current_thread().lane);
  for (int e = 0; e < f.num_elements; ++e) {
    const auto pos = emulated::position<Use, K>(lane, e);
    f.x[e] = p[emulated::offset(pos, ldm, std::is_same_v<Layout, row_major>)];
  }
  __syncwarp();
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
  const int lane = int(::conveyor::emulator::current_thread().lane);
  for (int e = 0; e < f.num_elements; ++e) {
    f.x[e] = p[emulated::offset(emulated::position<accumulator, K>(lane, e), ldm, layout == mem_row_major)];
  }
  __syncwarp();
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  const int lane = int(::conveyor::emulator::current_thread().lane);
  for (int e = 0; e < f.num_elements; ++e) {
    p[emulated::offset(emulated::position<accumulator, K>(lane, e), ldm, layout == mem_row_major)] = f.x[e];
  }
  __syncwarp();
}

inline float __float_to_tf32(float v) {
  // cvt.rna.tf32.f32: to nearest, ties away from zero, on the 13 low mantissa bits; infinities and NaN kept.
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

namespace emulated {
template <typename A, typename B, typename Acc>
struct MmaOperands {
  const A* a;
  const B* b;
  const Acc* c;
  Acc* d;
};
}  // namespace emulated

// d = a b + c over the warp: every lane gives its fragments; the product of the whole matrices is formed in
// float (each product exact, summed in order of k) and handed back in the lanes' d fragments.
template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB, typename Acc>
void mma_sync(fragment<accumulator, M, N, K, Acc>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, Acc>& c) {
  using FA = fragment<matrix_a, M, N, K, T, LayoutA>;
  using FB = fragment<matrix_b, M, N, K, T, LayoutB>;
  using FC = fragment<accumulator, M, N, K, Acc>;
  const emulated::MmaOperands<FA, FB, FC> in{&a, &b, &c, &d};
  ::conveyor::emulator::warp_collective("wmma::mma_sync", 0xffffffffu, &in, nullptr,
                                        [](const void* const* ins, void* const*, unsigned) {
    float A[M][K], B[K][N], C[M][N];
    for (int lane = 0; lane < 32; ++lane) {
      const auto* op = static_cast<const emulated::MmaOperands<FA, FB, FC>*>(ins[lane]);
      for (int e = 0; e < FA::num_elements; ++e) {
        const auto p = emulated::position<matrix_a, K>(lane, e);
        float v = emulated::to_float(op->a->x[e]);
        A[p.row][p.col] = std::is_same_v<T, precision::tf32> ? emulated::tf32_truncate(v) : v;
      }
      for (int e = 0; e < FB::num_elements; ++e) {
        const auto p = emulated::position<matrix_b, K>(lane, e);
        float v = emulated::to_float(op->b->x[e]);
        B[p.row][p.col] = std::is_same_v<T, precision::tf32> ? emulated::tf32_truncate(v) : v;
      }
      for (int e = 0; e < FC::num_elements; ++e) {
        const auto p = emulated::position<accumulator, K>(lane, e);
        C[p.row][p.col] = emulated::to_float(op->c->x[e]);
      }
    }
    // Every lane's inputs are read before any d is written: d may be c.
    for (int lane = 0; lane < 32; ++lane) {
      const auto* op = static_cast<const emulated::MmaOperands<FA, FB, FC>*>(ins[lane]);
      for (int e = 0; e < FC::num_elements; ++e) {
        const auto p = emulated::position<accumulator, K>(lane, e);
        float sum = C[p.row][p.col];
        for (int k = 0; k < K; ++k) sum += A[p.row][k] * B[k][p.col];
        op->d->x[e] = emulated::from_float<Acc>(sum);
      }
    }
  });
}

}  // namespace nvcuda::wmma
