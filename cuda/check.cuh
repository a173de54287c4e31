// Turns CUDA errors into conveyor::CudaError exceptions that name the failing call, file and line.
// Every runtime call goes through CONVEYOR_CUDA_CHECK, every launch is followed by CONVEYOR_CUDA_CHECK_LAUNCH.
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

}  // namespace conveyor::cuda

#define CONVEYOR_CUDA_CHECK(call) ::conveyor::cuda::check((call), #call, __FILE__, __LINE__)
#define CONVEYOR_CUDA_CHECK_LAUNCH(kernel_name) \
  ::conveyor::cuda::check(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)
