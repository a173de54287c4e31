// Device memory for the C++ CUDA tests (test_cuda, test_emulator, test_ptx), on a GPU or the emulator: a
// device copy of a host vector, freed with the object, and a check that ends the test on a failed call.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace conveyor_test {

// Ends the test (exit code 2) when a CUDA call failed, naming it.
inline void cuda_ok(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    std::printf("%s failed: %s (%s)\n", call, cudaGetErrorName(status), cudaGetErrorString(status));
    std::exit(2);
  }
}

// Whether a CUDA device is there (a GPU, or the emulator); without one a test prints why and skips.
inline bool cuda_device_present() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) return true;
  std::printf("no CUDA device: skipped\n");
  return false;
}

template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(const std::vector<T>& host) : size_(host.size()) {
    cuda_ok(cudaMalloc(reinterpret_cast<void**>(&data_), sizeof(T) * (size_ ? size_ : 1)), "cudaMalloc");
    cuda_ok(cudaMemcpy(data_, host.data(), sizeof(T) * size_, cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  ~DeviceArray() { cudaFree(data_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return data_; }
  std::vector<T> to_host() const {
    std::vector<T> out(size_);
    cuda_ok(cudaMemcpy(out.data(), data_, sizeof(T) * size_, cudaMemcpyDeviceToHost), "cudaMemcpy");
    return out;
  }

 private:
  T* data_ = nullptr;
  size_t size_;
};

}  // namespace conveyor_test
