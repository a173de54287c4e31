// Turns CUDA errors into conveyor::CudaError exceptions that name the failing call, file and line.
// Every runtime call goes through CONVEYOR_CUDA_CHECK; launches (device.cuh's launch()) check themselves.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "conveyor/conveyor.h"

namespace conveyor::cuda {

inline void check(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess) {
    throw CudaError(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                    cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
  }
}

// A launch's status (cudaGetLastError() after it): throws naming the kernel.
inline void check_launch(cudaError_t status, const char* kernel) {
  if (status != cudaSuccess) {
    throw CudaError(std::string("launch of ") + kernel + " failed: " + cudaGetErrorName(status) + " (" +
                    cudaGetErrorString(status) + ")");
  }
}

}  // namespace conveyor::cuda

#define CONVEYOR_CUDA_CHECK(call) ::conveyor::cuda::check((call), #call, __FILE__, __LINE__)
