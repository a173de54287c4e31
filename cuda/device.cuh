// What every CUDA source of the backend shares: the storage and compute types, conversions between them,
// the device guard, stream-ordered workspace memory, and NVTX ranges.
//
// Storage types are what arrays hold: float, double, __half, __nv_bfloat16. Every kernel computes in
// Compute<S>: double for double, float for the rest (SPEC.md: float16/bfloat16 storage, float32 accumulation
// and a float32 cell state).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "check.cuh"

namespace conveyor::cuda {

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

// Device memory for one call, allocated and freed in the order of `stream` (cudaMallocAsync), so that
// neither waits for the GPU and the pool reuses the memory at the next call.
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
