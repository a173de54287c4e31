// The CUDA backend's queries: the device count, and a launch check that runs the shared cell math of
// csrc/cells/ on the device and compares it with the same functions run on the host. The check proves that
// this build has code for the GPU present and that the formulas the CPU tests check give the same numbers
// there. Also the one-time configuration of each device's memory pool. The windows are in recurrence.cu.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "core/backends.h"
#include "device.cuh"

namespace conveyor::cuda {

void keep_pool_memory_between_calls(int device) {
  static std::mutex mutex;
  static std::vector<bool> configured;  // by device index
  const std::lock_guard<std::mutex> lock(mutex);
  if (device < int(configured.size()) && configured[device]) return;
  int pools_supported = 0;
  CONVEYOR_CUDA_CHECK(cudaDeviceGetAttribute(&pools_supported, cudaDevAttrMemoryPoolsSupported, device));
  if (pools_supported != 0) {
    cudaMemPool_t pool = nullptr;
    CONVEYOR_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
    uint64_t threshold = 0;
    CONVEYOR_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    if (threshold == 0) {
      threshold = UINT64_MAX;
      CONVEYOR_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    }
  }
  if (device >= int(configured.size())) configured.resize(device + 1, false);
  configured[device] = true;
}

}  // namespace conveyor::cuda

namespace conveyor::detail {
namespace {

constexpr int kCellCheckOutputs = 8;

// Evaluates every cell function once on inputs derived from `seed`; the same code runs on host and device.
__host__ __device__ void cell_check_values(float seed, float* out) {
  const float a = 0.3f * seed, b = -0.7f * seed, c = 1.1f * seed, d = -0.2f * seed, c_prev = 0.5f - seed;
  const auto lstm = cells::lstm_forward(false, a, b, c, d, c_prev);
  const auto dlstm = cells::lstm_backward(false, lstm.i, lstm.f, lstm.g, lstm.o, lstm.c, c_prev, 0.9f, -0.4f);
  const float n = cells::gru_candidate_reset_after(false, a, cells::sigmoid(b), c);
  const auto dgru = cells::gru_backward_reset_after(false, cells::sigmoid(b), cells::sigmoid(d), n, c, c_prev, 0.9f);
  out[0] = lstm.h;
  out[1] = lstm.c;
  out[2] = dlstm.da_f + dlstm.da_g;
  out[3] = dlstm.dc_prev;
  out[4] = cells::gru_output(cells::sigmoid(d), n, c_prev);
  out[5] = dgru.da_r + dgru.da_z + dgru.dar_n;
  out[6] = cells::rnn_forward(true, a + b);
  out[7] = cells::rnn_backward(false, cells::rnn_forward(false, c), 0.9f);
}

__global__ void cell_check_kernel(int count, float* out) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k < count) cell_check_values(0.25f * (k - count / 2), out + k * kCellCheckOutputs);
}

}  // namespace

bool cuda_backend_built() { return true; }

bool cuda_backend_emulated() {
#ifdef CONVEYOR_EMULATE_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count_or_zero() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: an answer to the query, not an error, so clear it
    return 0;
  }
  return count;
}

double cuda_cell_check(int device) {
  constexpr int kCount = 64;
  const cuda::DeviceGuard guard(device);
  float* out = nullptr;
  CONVEYOR_CUDA_CHECK(cudaMalloc(&out, sizeof(float) * kCount * kCellCheckOutputs));
  std::vector<float> got(kCount * kCellCheckOutputs);
  try {
    cuda::launch("cell_check_kernel", cell_check_kernel, 1, kCount, 0, nullptr, kCount, out);
    CONVEYOR_CUDA_CHECK(cudaMemcpy(got.data(), out, sizeof(float) * got.size(), cudaMemcpyDeviceToHost));
  } catch (...) {
    cudaFree(out);
    throw;
  }
  CONVEYOR_CUDA_CHECK(cudaFree(out));
  double worst = 0;
  float expected[kCellCheckOutputs];
  for (int k = 0; k < kCount; ++k) {
    cell_check_values(0.25f * (k - kCount / 2), expected);
    for (int v = 0; v < kCellCheckOutputs; ++v) {
      const double diff = std::fabs(double(got[k * kCellCheckOutputs + v]) - double(expected[v]));
      worst = std::isnan(diff) || diff > worst ? diff : worst;
    }
  }
  return worst;
}

uintptr_t cuda_test_malloc(int device, size_t bytes) {
  const cuda::DeviceGuard guard(device);
  void* p = nullptr;
  CONVEYOR_CUDA_CHECK(cudaMalloc(&p, bytes));
  return reinterpret_cast<uintptr_t>(p);
}

void cuda_test_free(int device, uintptr_t address) {
  const cuda::DeviceGuard guard(device);
  CONVEYOR_CUDA_CHECK(cudaFree(reinterpret_cast<void*>(address)));
}

void cuda_test_copy(int device, uintptr_t dst, uintptr_t src, size_t bytes, bool to_device) {
  const cuda::DeviceGuard guard(device);
  CONVEYOR_CUDA_CHECK(cudaMemcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes,
                                 to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost));
}

uintptr_t cuda_test_stream_create(int device) {
  const cuda::DeviceGuard guard(device);
  cudaStream_t stream = nullptr;
  CONVEYOR_CUDA_CHECK(cudaStreamCreate(&stream));
  return reinterpret_cast<uintptr_t>(stream);
}

void cuda_test_stream_destroy(int device, uintptr_t stream) {
  const cuda::DeviceGuard guard(device);
  CONVEYOR_CUDA_CHECK(cudaStreamDestroy(reinterpret_cast<cudaStream_t>(stream)));
}

void cuda_test_synchronize(int device, uintptr_t stream) {
  const cuda::DeviceGuard guard(device);
  if (stream == 0) {
    CONVEYOR_CUDA_CHECK(cudaDeviceSynchronize());
  } else {
    CONVEYOR_CUDA_CHECK(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)));
  }
}

uint64_t cuda_test_pool_release_threshold(int device) {
  const cuda::DeviceGuard guard(device);
  cudaMemPool_t pool = nullptr;
  CONVEYOR_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t threshold = 0;
  CONVEYOR_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  return threshold;
}

}  // namespace conveyor::detail
