// Thin wrappers for the inline-PTX instructions of the persistent kernels: warp-level tensor-core products
// (mma.sync m16n8k16 for float16 and bfloat16, m16n8k8 for TF32), shared-memory fragment loads (ldmatrix)
// and asynchronous global-to-shared copies (cp.async). Each wrapper has two bodies: the GPU's, one asm
// statement, and the emulated build's (CONVEYOR_EMULATE_CUDA), which implements what the PTX ISA documents
// for the instruction, fragment layouts included, so that a kernel written against these wrappers computes
// the same thing on the emulator as on the GPU, and kernel bodies that call them stay one source.
//
// Fragments, as in the PTX ISA ("Matrix fragments for mma.m16n8k16 / mma.m16n8k8", "ldmatrix"): a warp's
// lane holds g = lane / 4 (its group) and t = lane % 4 (its place in the group); 16-bit elements are packed
// two to a uint32_t, the lower-numbered element in the low half.
//
// Needs compute capability 8.0 or later (bfloat16 mma, cp.async); the build targets 9.0 unless told otherwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#ifdef CONVEYOR_EMULATE_CUDA
#include <cstring>
#endif

namespace conveyor::cuda::ptx {

#ifdef CONVEYOR_EMULATE_CUDA
namespace emulated {

struct Place {
  int row, col;
};

// (row, col) of fragment element e of `lane`, as the PTX ISA's figures for mma.m16n8k16 (16-bit inputs)
// and mma.m16n8k8 (TF32) place it. A is M x K (row), B is K x N (col), C and D are M x N.
inline Place a_m16n8k16(int lane, int e) {  // a0,a1: (g, 2t..+1); a2,a3: (g+8, ..); a4..a7: the same, cols +8
  return {lane / 4 + 8 * (e / 2 % 2), 2 * (lane % 4) + e % 2 + 8 * (e / 4)};
}
inline Place b_m16n8k16(int lane, int e) {  // b0,b1: (2t..+1, g); b2,b3: (2t+8..+9, g)
  return {2 * (lane % 4) + e % 2 + 8 * (e / 2), lane / 4};
}
inline Place a_m16n8k8_tf32(int lane, int e) {  // a0: (g, t), a1: (g+8, t), a2: (g, t+4), a3: (g+8, t+4)
  return {lane / 4 + 8 * (e % 2), lane % 4 + 4 * (e / 2)};
}
inline Place b_m16n8k8_tf32(int lane, int e) {  // b0: (t, g), b1: (t+4, g)
  return {lane % 4 + 4 * e, lane / 4};
}
inline Place c_m16n8(int lane, int e) {  // c0,c1: (g, 2t..+1); c2,c3: (g+8, 2t..+1)
  return {lane / 4 + 8 * (e / 2), 2 * (lane % 4) + e % 2};
}

// Element e (0 or 1) of a register of two packed 16-bit values, as a float.
template <typename T>
float unpack(uint32_t reg, int e) {
  const uint16_t bits = uint16_t(reg >> (16 * e));
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t widened = uint32_t(bits) << 16;  // bfloat16 is the high half of a float
    float v;
    std::memcpy(&v, &widened, 4);
    return v;
  } else {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
}

// The TF32 value the tensor cores read from a 32-bit register: its low 13 mantissa bits are ignored.
using ::conveyor::emulator::tf32_truncate;

// What one lane hands to an mma collective: pointers to its fragments (D may be C).
template <typename Register>
struct MmaLane {
  const Register* a;
  const Register* b;
  const float* c;
  float* d;
};

// D = A B + C for one m16n8 tile, K = 16 (16-bit inputs) or 8 (TF32), rebuilt from every lane's fragments.
// Each product is exact in float (11- and 8-bit significands); the sum starts at C and runs in order of k.
template <int K, typename Lane, typename ReadA, typename ReadB>
void mma_complete(const void* const* ins, ReadA read_a, ReadB read_b) {
  float A[16][K], B[K][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const auto* in = static_cast<const Lane*>(ins[lane]);
    read_a(lane, in->a, A);
    read_b(lane, in->b, B);
    for (int e = 0; e < 4; ++e) {
      const Place p = c_m16n8(lane, e);
      C[p.row][p.col] = in->c[e];
    }
  }
  // Every lane's fragments are read before any D is written: D may be C.
  for (int lane = 0; lane < 32; ++lane) {
    const auto* in = static_cast<const Lane*>(ins[lane]);
    for (int e = 0; e < 4; ++e) {
      const Place p = c_m16n8(lane, e);
      float sum = C[p.row][p.col];
      for (int k = 0; k < K; ++k) sum += A[p.row][k] * B[k][p.col];
      in->d[e] = sum;
    }
  }
}

// ldmatrix .m8n8.x4 .b16 over the warp: lane 8i + r names row r of matrix i; each lane receives, for
// matrix i, elements (lane / 4, 2 (lane % 4) + {0, 1}) — of the transpose when `transposed`.
template <bool transposed>
void ldmatrix_complete(const void* const* ins, void* const* outs, unsigned) {
  for (int lane = 0; lane < 32; ++lane) {
    auto* out = static_cast<uint32_t*>(outs[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      uint16_t half[2];
      for (int e = 0; e < 2; ++e) {
        const int row = transposed ? 2 * t + e : g, col = transposed ? g : 2 * t + e;
        const void* row_address = *static_cast<const void* const*>(ins[8 * i + row]);
        half[e] = static_cast<const uint16_t*>(row_address)[col];
      }
      out[i] = uint32_t(half[0]) | uint32_t(half[1]) << 16;
    }
  }
}

// The GPU faults on a misaligned address (ldmatrix rows and cp.async chunks are 16 bytes, 16-aligned).
inline void require_16_byte_aligned(const void* p, const char* instruction) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    ::conveyor::emulator::kernel_fault(cudaErrorMisalignedAddress, instruction);
  }
}

}  // namespace emulated
#endif

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, T = __nv_bfloat16 or __half:
// d = a b + c over the warp, a: a0..a7 in 4 registers, b: b0..b3 in 2, c and d: c0..c3 (see emulated::).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "bfloat16 or float16 inputs");
#ifndef CONVEYOR_EMULATE_CUDA
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
#else
  using Lane = emulated::MmaLane<uint32_t>;
  const Lane in{a, b, c, d};
  ::conveyor::emulator::warp_collective(
      std::is_same_v<T, __nv_bfloat16> ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16", 0xffffffffu, &in,
      nullptr, [](const void* const* ins, void* const*, unsigned) {
        emulated::mma_complete<16, Lane>(
            ins,
            [](int lane, const uint32_t* a, float (&A)[16][16]) {
              for (int e = 0; e < 8; ++e) {
                const emulated::Place p = emulated::a_m16n8k16(lane, e);
                A[p.row][p.col] = emulated::unpack<T>(a[e / 2], e % 2);
              }
            },
            [](int lane, const uint32_t* b, float (&B)[16][8]) {
              for (int e = 0; e < 4; ++e) {
                const emulated::Place p = emulated::b_m16n8k16(lane, e);
                B[p.row][p.col] = emulated::unpack<T>(b[e / 2], e % 2);
              }
            });
      });
#endif
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: d = a b + c over the warp, a: a0..a3, b: b0..b1 (float
// registers of which the tensor cores read the TF32 bits), c and d: c0..c3 (see emulated::).
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2],
                                                 const float (&c)[4]) {
#ifndef CONVEYOR_EMULATE_CUDA
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#else
  using Lane = emulated::MmaLane<float>;
  const Lane in{a, b, c, d};
  ::conveyor::emulator::warp_collective(
      "mma.sync.m16n8k8.tf32", 0xffffffffu, &in, nullptr, [](const void* const* ins, void* const*, unsigned) {
        emulated::mma_complete<8, Lane>(
            ins,
            [](int lane, const float* a, float (&A)[16][8]) {
              for (int e = 0; e < 4; ++e) {
                const emulated::Place p = emulated::a_m16n8k8_tf32(lane, e);
                A[p.row][p.col] = emulated::tf32_truncate(a[e]);
              }
            },
            [](int lane, const float* b, float (&B)[8][8]) {
              for (int e = 0; e < 2; ++e) {
                const emulated::Place p = emulated::b_m16n8k8_tf32(lane, e);
                B[p.row][p.col] = emulated::tf32_truncate(b[e]);
              }
            });
      });
#endif
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane 8i + r passes the shared address of row r of matrix i
// (8 16-bit elements, 16-byte aligned); fragment[i] receives matrix i's (lane / 4, 2 (lane % 4) + {0, 1}).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&fragment)[4], const void* row) {
#ifndef CONVEYOR_EMULATE_CUDA
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(row))));
#else
  emulated::require_16_byte_aligned(row, "ldmatrix.x4 with a row address that is not 16-byte aligned");
  ::conveyor::emulator::warp_collective("ldmatrix.x4", 0xffffffffu, &row, fragment, emulated::ldmatrix_complete<false>);
#endif
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: as ldmatrix_x4, of the transposed matrices: fragment[i]
// receives matrix i's (2 (lane % 4) + {0, 1}, lane / 4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&fragment)[4], const void* row) {
#ifndef CONVEYOR_EMULATE_CUDA
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(row))));
#else
  emulated::require_16_byte_aligned(row, "ldmatrix.x4.trans with a row address that is not 16-byte aligned");
  ::conveyor::emulator::warp_collective("ldmatrix.x4.trans", 0xffffffffu, &row, fragment,
                                        emulated::ldmatrix_complete<true>);
#endif
}

// Asynchronous copies. cp.async's writes to shared memory are only guaranteed to have happened once a
// cp_async_wait<N>() returns that leaves at most N newer groups pending; the hardware may complete them any
// time before that. The emulator completes each copy when it is issued: one of the orders the GPU allows, so
// a kernel that waits before reading is correct on both (one that reads early is caught only on the GPU).

// cp.async.cg.shared.global 16 bytes: shared_destination <- global_source, both 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* shared_destination, const void* global_source) {
#ifndef CONVEYOR_EMULATE_CUDA
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
               :
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(shared_destination))), "l"(global_source)
               : "memory");
#else
  emulated::require_16_byte_aligned(shared_destination, "cp.async to a shared address that is not 16-byte aligned");
  emulated::require_16_byte_aligned(global_source, "cp.async from a global address that is not 16-byte aligned");
  std::memcpy(shared_destination, global_source, 16);
#endif
}

// cp.async.cg.shared.global 16 bytes with src-size = copy ? 16 : 0: copies as cp_async_16, or else fills the
// 16 bytes with zeros and reads nothing from global_source (the way to load a tile's out-of-range chunks).
__device__ __forceinline__ void cp_async_16_or_zero(void* shared_destination, const void* global_source, bool copy) {
#ifndef CONVEYOR_EMULATE_CUDA
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(shared_destination))), "l"(global_source),
                 "r"(copy ? 16 : 0)
               : "memory");
#else
  emulated::require_16_byte_aligned(shared_destination, "cp.async to a shared address that is not 16-byte aligned");
  if (copy) {
    emulated::require_16_byte_aligned(global_source, "cp.async from a global address that is not 16-byte aligned");
    std::memcpy(shared_destination, global_source, 16);
  } else {
    std::memset(shared_destination, 0, 16);
  }
#endif
}

// cp.async.commit_group: closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifndef CONVEYOR_EMULATE_CUDA
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// cp.async.wait_group N: waits until at most the N most recent committed groups of this thread are pending.
// (Other threads see the copies after a barrier, as with ordinary stores.)
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0, "a count of pending groups");
#ifndef CONVEYOR_EMULATE_CUDA
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace conveyor::cuda::ptx
