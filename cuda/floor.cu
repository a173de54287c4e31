// The floor of the persistent kernels (bench/NOTES.md): a persistent loop with
// their synchronisation and broadcast and none of their arithmetic, for the benchmark to time next to them.
//
// One cooperative launch of as many blocks as the persistent kernel would use for the window (its plan for
// that cell, dtype, direction and H, with the same dynamic shared memory, so that the blocks spread over the
// multiprocessors as the kernel's do). At each of T steps every block reads all of the step's input, writes
// its units of the output, and the grid synchronises: forward, h_t [B, H] in the storage type; backward, the
// pre-activation gradients [B, G H] in the compute type, which is what the backward kernel reads every step.
// A kernel's time per step over this one says how far it is from what its structure allows on this device.
#include <cooperative_groups.h>

#include <string>

#include "core/backends.h"
#include "persistent.cuh"

namespace conveyor::cuda {
namespace {

constexpr int kFloorThreads = 256;  // the persistent kernels' block size
constexpr int kFloorLoadsInFlight = 4;

// h holds two buffers of [B, gates H] values (step t reads one and writes the other, so a step's writes never
// meet the reads of the step before, which all end at that step's grid barrier). Block b owns units
// [b units, (b + 1) units) of each of the `gates` column blocks. What a thread writes depends on what it read,
// scaled by `scale` (1 / the buffer's size) so the values stay bounded, which keeps the reads in the program.
template <typename V>
__global__ void __launch_bounds__(kFloorThreads)
    persistent_floor_kernel(V* h, int64_t steps, int64_t batch, int64_t hidden, int gates, int units, float scale) {
  const int64_t width = int64_t(gates) * hidden, size = batch * width, j0 = int64_t(blockIdx.x) * units;
  const int64_t owned = batch * gates * units;
  const cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int64_t t = 0; t < steps; ++t) {
    const V* h_in = h + (t % 2) * size;
    V* h_out = h + (1 - t % 2) * size;
    float sum[kFloorLoadsInFlight] = {};
    int64_t e = threadIdx.x;
    for (; e + (kFloorLoadsInFlight - 1) * kFloorThreads < size; e += kFloorLoadsInFlight * kFloorThreads) {
#pragma unroll
      for (int i = 0; i < kFloorLoadsInFlight; ++i) sum[i] += convert<float>(h_in[e + i * kFloorThreads]);
    }
    for (; e < size; e += kFloorThreads) sum[0] += convert<float>(h_in[e]);
    const float value = 1.0f + (sum[0] + sum[1] + sum[2] + sum[3]) * scale;
    for (int64_t o = threadIdx.x; o < owned; o += kFloorThreads) {
      const int64_t b = o / (gates * units), g = o / units % gates, j = j0 + o % units;
      if (j < hidden) h_out[b * width + g * hidden + j] = convert<V>(value);
    }
    grid.sync();  // every block's units of step t before any block reads them at step t + 1
  }
}

// Queues the floor's launch on `stream`: V is what the kernel reads and writes, `plan` the persistent kernel's.
template <typename V>
void launch_floor(const PersistentPlan& plan, int64_t steps, int64_t batch, int64_t hidden, int gates,
                  cudaStream_t stream) {
  const int64_t size = batch * gates * hidden;
  const auto kernel = persistent_floor_kernel<V>;
  Workspace<V> h(2 * size, stream);
  CONVEYOR_CUDA_CHECK(cudaMemsetAsync(h.get(), 0, sizeof(V) * size_t(2 * size), stream));
  CONVEYOR_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.shared_bytes)));
  launch_cooperative("persistent_floor_kernel", kernel, plan.blocks, kFloorThreads, plan.shared_bytes, stream,
                     h.get(), steps, batch, hidden, gates, plan.units, float(1.0 / double(size)));
}

template <typename S>
detail::PersistentFloorLaunch persistent_floor(const CellOptions& options, int64_t steps, int64_t batch, int64_t hidden,
                                       bool backward, cudaStream_t stream) {
  const PersistentPlan plan = backward ? persistent_backward_plan<S, false>(options, hidden, false)
                                       : persistent_forward_plan<S, false>(options, hidden, false);
  if (!plan.fits) {
    throw ArgumentError("hidden: the persistent " + std::string(backward ? "backward" : "forward") +
                        " kernel cannot run H=" + std::to_string(hidden) + " on this device: " + plan.why);
  }
  int device = 0, multiprocessors = 0;
  CONVEYOR_CUDA_CHECK(cudaGetDevice(&device));
  CONVEYOR_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  keep_pool_memory_between_calls(device);
  if (backward) {  // the backward kernel reads every gate's gradients, in the compute type
    launch_floor<Compute<S>>(plan, steps, batch, hidden, gate_count(options), stream);
  } else {  // the forward kernel reads h_{t-1}, in the storage type
    launch_floor<S>(plan, steps, batch, hidden, 1, stream);
  }
  return {plan.blocks, plan.units, plan.shared_bytes, multiprocessors};
}

}  // namespace
}  // namespace conveyor::cuda

namespace conveyor::detail {

PersistentFloorLaunch cuda_persistent_floor(const CellOptions& options, int64_t steps, int64_t batch, int64_t hidden,
                                            const std::string& dtype_name, bool backward, void* stream) {
  if (steps < 1) throw ArgumentError("steps: expected at least 1, got " + std::to_string(steps));
  if (batch < 1) throw ArgumentError("batch: expected at least 1, got " + std::to_string(batch));
  if (hidden < 1) throw ArgumentError("hidden: expected at least 1, got " + std::to_string(hidden));
  const auto s = static_cast<cudaStream_t>(stream);
  if (dtype_name == "float32") return cuda::persistent_floor<float>(options, steps, batch, hidden, backward, s);
  if (dtype_name == "float64") return cuda::persistent_floor<double>(options, steps, batch, hidden, backward, s);
  if (dtype_name == "float16") return cuda::persistent_floor<__half>(options, steps, batch, hidden, backward, s);
  if (dtype_name == "bfloat16") {
    return cuda::persistent_floor<cuda::bfloat16>(options, steps, batch, hidden, backward, s);
  }
  throw ArgumentError("dtype_name: expected float32, float64, float16 or bfloat16, got '" + dtype_name + "'");
}

}  // namespace conveyor::detail
