// What the device-independent API layer (api.cpp) calls once every argument has been checked: one entry
// point per backend and direction. Internal: not installed.
#pragma once

#include <string>

#include "cells/lstm.h"
#include "conveyor/conveyor.h"

namespace conveyor::detail {

void cpu_forward(const CellOptions& options, const WindowSizes& sizes, const ForwardArgs& args);
void cpu_backward(const CellOptions& options, const WindowSizes& sizes, const BackwardArgs& args);

// Defined in cuda/ when the CUDA backend is built, else by stubs that throw.
void cuda_forward(const CellOptions& options, const WindowSizes& sizes, const ForwardArgs& args, void* stream);
void cuda_backward(const CellOptions& options, const WindowSizes& sizes, const BackwardArgs& args, void* stream);
int cuda_device_count_or_zero();
// dropout_mask() for checked arguments.
void cpu_dropout_mask(double p, bool variational, uint64_t seed, uint64_t mask_stream, const TensorView& out);
void cuda_dropout_mask(double p, bool variational, uint64_t seed, uint64_t mask_stream, const TensorView& out,
                       void* stream);
bool cuda_backend_built();
// Whether that backend is the CPU emulation of cuda/emulator (a test build), not a GPU's.
bool cuda_backend_emulated();
// Runs the shared cell math on `device` and on the host and returns the largest difference (NaN if a
// result is NaN). Throws CudaError when the kernel cannot run (no code for this GPU, no driver).
double cuda_cell_check(int device);

// The persistent kernels' floor (cuda/floor.cu), for the benchmarks: queues on `stream` of the current device
// one cooperative launch of `steps` steps with the persistent kernel's synchronisation and broadcast and no
// arithmetic, as many blocks as its plan for `options`' cell, `dtype_name` ("float32", "float64", "float16",
// "bfloat16") and `hidden` (the forward's, or with `backward` the backward's), and says what it launched.
// Throws ArgumentError naming a bad argument, or `hidden` where that kernel cannot run.
struct PersistentFloorLaunch {
  unsigned blocks = 0;
  int units = 0;            // hidden units per block
  size_t shared_bytes = 0;  // dynamic shared memory per block, as the kernel's slice of R takes
  int multiprocessors = 0;  // the device's, which the plan's choice of units depends on
};
PersistentFloorLaunch cuda_persistent_floor(const CellOptions& options, int64_t steps, int64_t batch, int64_t hidden,
                                            const std::string& dtype_name, bool backward, void* stream);

// Device memory and streams for the test suites' device arrays (tests/device_arrays.py), which must run the
// same tests on a GPU and on the emulated build without CuPy or PyTorch: the CUDA runtime's calls, checked
// (CudaError). Addresses and stream handles travel as integers. Not part of the public API.
uintptr_t cuda_test_malloc(int device, size_t bytes);
void cuda_test_free(int device, uintptr_t address);
// Copies `bytes` between host and device memory (`to_device`: from host `src` to device `dst`), after the
// work queued before it on the legacy default stream, as cudaMemcpy does.
void cuda_test_copy(int device, uintptr_t dst, uintptr_t src, size_t bytes, bool to_device);
uintptr_t cuda_test_stream_create(int device);
void cuda_test_stream_destroy(int device, uintptr_t stream);
// Waits for `stream`'s work; for stream 0, for the whole device's.
void cuda_test_synchronize(int device, uintptr_t stream);
// The release threshold of the device's default stream-ordered memory pool (cudaMallocAsync's), in bytes.
uint64_t cuda_test_pool_release_threshold(int device);
// The time-parallel products (cuda/gemm.cuh) on device arrays, for their tests and bench/gemm.py: C[M, N] =
// A B (+= with `accumulate`), as the backend forms them for the storage type `dtype_name` with its compute
// type: kind "projection" (x W^T) takes A and B in the storage type and writes C in the compute type;
// "gradient" (dx, dW, dR) takes A in the compute type, B in the storage type, and writes C in the storage
// type. A is [M, K] row-major, or with `a_transposed` its transpose stored [K, M]; B [K, N], or stored [N, K];
// C [M, N]. Queued on `stream`.
void cuda_test_gemm(const std::string& kind, const std::string& dtype_name, int64_t M, int64_t N, int64_t K,
                    uintptr_t a, bool a_transposed, uintptr_t b, bool b_transposed, uintptr_t c, bool accumulate,
                    bool allow_tf32, uintptr_t stream);

// The LSTM options of `options` in the form the cell math takes (csrc/cells/lstm.h), in compute type T.
template <typename T>
cells::LstmOptions<T> lstm_options(const CellOptions& options) {
  cells::LstmOptions<T> o;
  o.relu = options.activation == Activation::relu;
  o.coupled = options.coupled_gates;
  o.peephole = options.peephole;
  o.forget_bias = static_cast<T>(options.forget_bias);
  o.cell_clip = static_cast<T>(options.cell_clip);
  return o;
}

}  // namespace conveyor::detail
