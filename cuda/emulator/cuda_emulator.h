// The CUDA language for host C++: the emulated build (CONVEYOR_EMULATE_CUDA=ON) compiles the files of cuda/
// with the host compiler and includes this header first. It keeps the toolkit's own headers for what they
// already give the host (the runtime API's declarations and types, __half, __nv_bfloat16, dim3, NVTX) and
// supplies the rest: the execution-space keywords, the built-in variables, barriers, warp shuffles, votes,
// atomics, block-shared variables and kernel launches. emulator.cpp runs each CUDA thread as a fiber and
// implements the runtime API on host memory.
//
// Test infrastructure only: it never ships as a backend a user would pick. What it adds over the GPU is
// determinism control (CONVEYOR_EMULATOR_SEED shuffles the order in which threads run between barriers) and
// the diagnostics of docs/emulated-cuda.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#ifndef CONVEYOR_EMULATE_CUDA
#define CONVEYOR_EMULATE_CUDA 1
#endif

// Execution spaces mean nothing on the host: a kernel is an ordinary function run once per CUDA thread.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__  // block-shared variables are declared with CONVEYOR_SHARED (device.cuh)
#undef __constant__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __launch_bounds__(...)

namespace conveyor::emulator {

// Where the calling fiber stands in its launch.
struct ThreadContext {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned lane;       // threadIdx's linear index % 32
  unsigned warp;       // threadIdx's linear index / 32
  const char* kernel;  // the name given to the launch
};

// The calling fiber's context; outside a kernel, an emulator error is raised.
const ThreadContext& current_thread();

// __syncthreads(): waits for every thread of the block that has not exited.
void sync_block();
// The grid-wide barrier of cooperative_groups::this_grid().sync(), in a cooperative launch.
void sync_grid();

// A warp collective: the calling lane deposits `in` and gets `out` once every lane of `mask` has arrived at
// a collective of the same `op` with the same mask; the last to arrive runs `complete` over all of them.
// The lanes' `in`s stay valid until every lane has read its `out`.
using CollectiveCompletion = void (*)(const void* const* ins, void* const* outs, unsigned mask);
void warp_collective(const char* op, unsigned mask, const void* in, void* out, CollectiveCompletion complete);

// The block's shared variable at this point of the kernel: the k-th call of a thread returns the k-th
// variable of its block, allocated (and filled with 0xff bytes, as NaN or -1, so that reading before writing
// shows) by the first thread to get there.
void* block_shared(size_t bytes, size_t alignment, const char* name);
// The block's dynamic shared memory (the launch's shared-memory bytes).
void* dynamic_shared();

// A kernel's abnormal end (__trap, a misused collective): the launch fails with `error`, and the device keeps
// the error as a GPU keeps a sticky one.
[[noreturn]] void kernel_fault(cudaError_t error, const char* what);

// Runs `body` once for every thread of the grid on `stream`, in its order (`function`: the kernel, for the
// attributes cudaFuncSetAttribute gave it). Returns the launch's error
// (invalid configuration, too large for a cooperative launch, a bad stream), which also becomes the calling
// host thread's last error, as with <<<...>>>.
cudaError_t launch(const void* function, const char* kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes, cudaStream_t stream,
                   bool cooperative, std::function<void()> body);

// Yields the fiber to the others of its launch: spin loops on memory call it through __nanosleep.
void yield();

// The TF32 value a tensor core reads from a float: its 10 high mantissa bits, the 13 low ones ignored (the
// emulated wmma of mma.h and mma.sync of ptx.cuh).
inline float tf32_truncate(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits &= 0xffffe000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

// Whether this build is the emulator (the test suites ask through conveyor.cuda_emulated()).
inline constexpr bool kEmulated = true;

}  // namespace conveyor::emulator

// Built-in variables.
#define threadIdx (::conveyor::emulator::current_thread().thread_idx)
#define blockIdx (::conveyor::emulator::current_thread().block_idx)
#define blockDim (::conveyor::emulator::current_thread().block_dim)
#define gridDim (::conveyor::emulator::current_thread().grid_dim)
inline constexpr int warpSize = 32;

// Barriers, fences and the rest of the control of a thread.
inline void __syncthreads() { ::conveyor::emulator::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::conveyor::emulator::warp_collective("__syncwarp", mask, nullptr, nullptr,
                                        [](const void* const*, void* const*, unsigned) {});
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { ::conveyor::emulator::yield(); }
[[noreturn]] inline void __trap() { ::conveyor::emulator::kernel_fault(cudaErrorLaunchFailure, "__trap()"); }

// Warp shuffles: lane l reads `var` of the lane its operation names, within segments of `width` lanes.
namespace conveyor::emulator {
template <typename T>
struct ShuffleIn {
  T value;
  int source;  // the lane to read, or -1 to keep one's own value (out of the segment)
};
template <typename T>
T shuffle(const char* op, unsigned mask, T var, int source) {
  const ShuffleIn<T> in{var, source};
  T out;
  warp_collective(op, mask, &in, &out, [](const void* const* ins, void* const* outs, unsigned m) {
    for (int lane = 0; lane < 32; ++lane) {
      if (!(m >> lane & 1u)) continue;
      const auto* self = static_cast<const ShuffleIn<T>*>(ins[lane]);
      const int from = self->source;
      // Reading a lane outside the mask is undefined on the GPU; here it reads one's own value.
      const bool readable = from >= 0 && from < 32 && (m >> from & 1u);
      *static_cast<T*>(outs[lane]) = readable ? static_cast<const ShuffleIn<T>*>(ins[from])->value : self->value;
    }
  });
  return out;
}
inline int segment_base(int width) { return int(current_thread().lane) / width * width; }
}  // namespace conveyor::emulator

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  const int base = ::conveyor::emulator::segment_base(width);
  return ::conveyor::emulator::shuffle("__shfl_sync", mask, var, base + ((src_lane % width) + width) % width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = int(::conveyor::emulator::current_thread().lane), base = ::conveyor::emulator::segment_base(width);
  const int from = lane - int(delta);
  return ::conveyor::emulator::shuffle("__shfl_up_sync", mask, var, from >= base ? from : -1);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = int(::conveyor::emulator::current_thread().lane), base = ::conveyor::emulator::segment_base(width);
  const int from = lane + int(delta);
  return ::conveyor::emulator::shuffle("__shfl_down_sync", mask, var, from < base + width ? from : -1);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  const int lane = int(::conveyor::emulator::current_thread().lane), base = ::conveyor::emulator::segment_base(width);
  const int from = lane ^ lane_mask;
  return ::conveyor::emulator::shuffle("__shfl_xor_sync", mask, var, from >= base && from < base + width ? from : -1);
}

// Votes.
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const int in = predicate != 0;
  unsigned out = 0;
  ::conveyor::emulator::warp_collective("__ballot_sync", mask, &in, &out,
                                        [](const void* const* ins, void* const* outs, unsigned m) {
                                          unsigned ballot = 0;
                                          for (int l = 0; l < 32; ++l) {
                                            if ((m >> l & 1u) && *static_cast<const int*>(ins[l])) ballot |= 1u << l;
                                          }
                                          for (int l = 0; l < 32; ++l) {
                                            if (m >> l & 1u) *static_cast<unsigned*>(outs[l]) = ballot;
                                          }
                                        });
  return out;
}
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }

// Atomics: host atomics on the same memory, as every fiber of a launch may run on another host thread.
template <typename T>
T conveyor_emulator_atomic_update(T* address, T (*update)(T, T), T operand) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics on 4- and 8-byte values");
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits* bits = reinterpret_cast<Bits*>(address);
  Bits expected = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    T old;
    std::memcpy(&old, &expected, sizeof(T));
    const T updated = update(old, operand);
    Bits desired;
    std::memcpy(&desired, &updated, sizeof(T));
    if (__atomic_compare_exchange_n(bits, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return old;
  }
}
template <typename T>
T atomicAdd(T* address, T value) {
  return conveyor_emulator_atomic_update<T>(address, [](T a, T b) { return T(a + b); }, value);
}
template <typename T>
T atomicSub(T* address, T value) {
  return conveyor_emulator_atomic_update<T>(address, [](T a, T b) { return T(a - b); }, value);
}
template <typename T>
T atomicMax(T* address, T value) {
  return conveyor_emulator_atomic_update<T>(address, [](T a, T b) { return a < b ? b : a; }, value);
}
template <typename T>
T atomicMin(T* address, T value) {
  return conveyor_emulator_atomic_update<T>(address, [](T a, T b) { return b < a ? b : a; }, value);
}
template <typename T>
T atomicExch(T* address, T value) {
  return conveyor_emulator_atomic_update<T>(address, [](T, T b) { return b; }, value);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;  // the old value either way
}
inline unsigned atomicInc(unsigned* address, unsigned limit) {
  unsigned expected = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(address, &expected, expected >= limit ? 0u : expected + 1, false,
                                      __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
  return expected;
}

// Block-shared and dynamic shared memory, as device.cuh's macros name them.
#define CONVEYOR_EMULATED_SHARED(type, name, dims)                                                         \
  using name##_shared_type = type dims;                                                                    \
  name##_shared_type& name = *static_cast<name##_shared_type*>(                                             \
      ::conveyor::emulator::block_shared(sizeof(name##_shared_type), 128, #name))
#define CONVEYOR_EMULATED_DYNAMIC_SHARED(type, name) \
  type* name = static_cast<type*>(::conveyor::emulator::dynamic_shared())
