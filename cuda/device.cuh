// What every CUDA source of the backend shares: the storage and compute types, conversions between them,
// the device guard, stream-ordered workspace memory, and NVTX ranges.
//
// Kernels declare block-shared memory with CONVEYOR_SHARED and are launched with launch() (or
// launch_cooperative()): the one place where the GPU build and the emulated build (CONVEYOR_EMULATE_CUDA,
// cuda/emulator/) differ, so that every kernel body is the same source in both.
//
// Storage types are what arrays hold: float, double, __half, __nv_bfloat16. Every kernel computes in
// Compute<S>: double for double, float for the rest (docs/math.md: float16/bfloat16 storage, float32 accumulation
// and a float32 cell state).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "check.cuh"

// CONVEYOR_SHARED(float, tile, [16][33]) declares the block's shared array `float tile[16][33]`, aligned to
// 128 bytes; CONVEYOR_DYNAMIC_SHARED(float, buffer) points `float* buffer` at the launch's dynamic shared
// memory.
#ifdef CONVEYOR_EMULATE_CUDA
#define CONVEYOR_SHARED(type, name, dims) CONVEYOR_EMULATED_SHARED(type, name, dims)
#define CONVEYOR_DYNAMIC_SHARED(type, name) CONVEYOR_EMULATED_DYNAMIC_SHARED(type, name)
#else
#define CONVEYOR_SHARED(type, name, dims) __shared__ __align__(128) type name dims
#define CONVEYOR_DYNAMIC_SHARED(type, name)                                    \
  extern __shared__ __align__(128) unsigned char conveyor_dynamic_shared[]; \
  type* name = reinterpret_cast<type*>(conveyor_dynamic_shared)
#endif

namespace conveyor::cuda {

// Launches kernel<<<grid, block, shared_bytes, stream>>>(args...) and throws CudaError naming `kernel_name`
// when the launch fails.
template <typename... Params, typename... Args>
void launch(const char* kernel_name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            cudaStream_t stream, Args&&... args) {
#ifdef CONVEYOR_EMULATE_CUDA
  emulator::launch(reinterpret_cast<const void*>(kernel), kernel_name, grid, block, shared_bytes, stream, false,
                   [kernel, values = std::tuple<Params...>(std::forward<Args>(args)...)] {
                     std::apply(kernel, values);
                   });
#else
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
#endif
  check_launch(cudaGetLastError(), kernel_name);
}

// The same as a cooperative launch (cudaLaunchCooperativeKernel): every block is resident at once, so the
// kernel may synchronise the whole grid; refused when the grid exceeds what the device holds at once.
template <typename... Params, typename... Args>
void launch_cooperative(const char* kernel_name, void (*kernel)(Params...), dim3 grid, dim3 block,
                        size_t shared_bytes, cudaStream_t stream, Args&&... args) {
  std::tuple<Params...> values(std::forward<Args>(args)...);
#ifdef CONVEYOR_EMULATE_CUDA
  emulator::launch(reinterpret_cast<const void*>(kernel), kernel_name, grid, block, shared_bytes, stream, true,
                   [kernel, values] { std::apply(kernel, values); });
  check_launch(cudaGetLastError(), kernel_name);
#else
  void* pointers[sizeof...(Params) + 1] = {};
  std::apply([&](auto&... v) {
    int i = 0;
    ((pointers[i++] = &v), ...);
  }, values);
  check_launch(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, pointers,
                                           shared_bytes, stream),
               kernel_name);
#endif
}

using bfloat16 = __nv_bfloat16;

template <typename S>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};
template <typename S>
using Compute = typename ComputeOf<S>::type;

// Converts between any two of float, double, __half and __nv_bfloat16, rounding to nearest.
template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<From, __half>) {
    return convert<To>(__half2float(v));
  } else if constexpr (std::is_same_v<From, bfloat16>) {
    return convert<To>(__bfloat162float(v));
  } else if constexpr (std::is_same_v<To, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<To, bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

// Makes `device` current for the lifetime of the guard, then restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    CONVEYOR_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) CONVEYOR_CUDA_CHECK(cudaSetDevice(device));
    changed_ = previous_ != device;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);  // a destructor cannot throw; the next checked call reports
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

// Raises the release threshold of `device`'s default memory pool, which Workspace allocates from, from the
// driver's 0 to "never": with 0, every synchronisation hands the pool's free memory back to the driver and
// the next call maps it again. PyTorch and CuPy configure the pool the same way; cudaMemPoolTrimTo still
// releases it. Does so once per device and process, thread-safely, and leaves a threshold that the
// application has set (anything but 0) as it is. backend.cu defines it.
void keep_pool_memory_between_calls(int device);

// Device memory for one call, allocated and freed in the order of `stream` (cudaMallocAsync), so that
// neither waits for the GPU and the pool reuses the memory at the next call (keep_pool_memory_between_calls).
template <typename T>
class Workspace {
 public:
  Workspace(int64_t count, cudaStream_t stream) : stream_(stream) {
    if (count > 0) {
      CONVEYOR_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&data_), sizeof(T) * size_t(count), stream));
    }
  }
  ~Workspace() {
    if (data_ != nullptr) cudaFreeAsync(data_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  T* get() const { return data_; }

 private:
  T* data_ = nullptr;
  cudaStream_t stream_;
};

// An NVTX range, visible in Nsight Systems' timeline under `name`, open for the lifetime of the object.
class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

inline unsigned blocks_for(int64_t count, int64_t per_block) {
  return static_cast<unsigned>((count + per_block - 1) / per_block);
}

// The compute capability's major number of the current device.
int current_device_major();

}  // namespace conveyor::cuda
