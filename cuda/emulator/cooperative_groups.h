// cooperative_groups for the emulated build: stands in for the toolkit's header with the groups Conveyor's
// kernels use: the thread block and the grid of a cooperative launch.
#pragma once

#include "cuda_emulator.h"

namespace cooperative_groups {

class thread_block {
 public:
  void sync() const { __syncthreads(); }
  unsigned thread_rank() const { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
  unsigned size() const { return blockDim.x * blockDim.y * blockDim.z; }
  dim3 group_index() const { return dim3(blockIdx.x, blockIdx.y, blockIdx.z); }
  dim3 thread_index() const { return dim3(threadIdx.x, threadIdx.y, threadIdx.z); }
};

class grid_group {
 public:
  // Waits for every thread of the grid; only in a cooperative launch (launch_cooperative()).
  void sync() const { ::conveyor::emulator::sync_grid(); }
  bool is_valid() const { return true; }
  unsigned long long size() const {
    return static_cast<unsigned long long>(gridDim.x) * gridDim.y * gridDim.z * blockDim.x * blockDim.y * blockDim.z;
  }
  unsigned long long thread_rank() const {
    const unsigned long long block = blockIdx.x + gridDim.x * (blockIdx.y + static_cast<unsigned long long>(gridDim.y) * blockIdx.z);
    return block * (blockDim.x * blockDim.y * blockDim.z) + thread_block().thread_rank();
  }
};

inline thread_block this_thread_block() { return {}; }
inline grid_group this_grid() { return {}; }

}  // namespace cooperative_groups
