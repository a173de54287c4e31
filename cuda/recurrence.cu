// The CUDA backend's windows: forward and backward over T steps for every cell, in float32, float64,
// float16 and bfloat16 storage (float32 accumulation and cell state for the 16-bit types). The LSTM's
// cell-state arrays (c0, c_T, dc_T, dc0) are of Compute<S>, which is cell_state_dtype(x) (conveyor.h): the
// state enters and leaves a window unrounded, so windows chained through (h_T, c_T) equal one call. The cache
// keeps each step's c_t in S.
//
// Forward: one product projects the whole window's input (ax = x W^T, all T*B rows at once, gemm.cu); then
// one kernel per step computes, for a tile of batch rows and hidden units, the recurrent product of every
// gate of those units (h_{t-1} R^T) and applies the cell math of csrc/cells/ to it in the same kernel, so
// that the pre-activations never leave the chip. The GRU with reset_after=false needs r before its n block's
// product, so it takes two kernels per step.
//
// Backward walks the steps in reverse with one kernel per step, which forms the gradient reaching h_t
// through R (da_{t+1} R, a product over the gate rows) and applies the cell's backward math to it at once.
// dx, dW and dR are then one product each over the whole window, and the bias gradients column sums.
//
// All views have been checked by api.cpp: shapes, x's dtype (Compute<S> for the cell-state arrays),
// C-contiguous, on one CUDA device. Kernels end in _kernel; the launchers that follow them have the kernel's
// name without it.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "cells/dropout.h"
#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "core/backends.h"
#include "core/packing.h"
#include "device.cuh"
#include "gemm.cuh"
#include "persistent.cuh"
#include "regularisers.cuh"
#include "step.cuh"

namespace conveyor::cuda {

// A step kernel's block covers kStepRows batch rows and kStepUnits hidden units with 256 threads: thread
// (tx, ty) owns unit tx of rows ty and ty + 8. The product's K advances in slices of kStepK.
constexpr int kStepRows = 16;
constexpr int kStepUnits = 32;
constexpr int kStepK = 32;
constexpr int kStepThreads = 256;
static_assert(kStepThreads == kStepUnits * kStepRows / 2, "two rows per thread");

// ---------------------------------------------------------------------------------------------------------
// Forward step (its arguments and cell math: step.cuh)

// For the block's tile of (batch row, hidden unit), every gate's recurrent product
// sum_{k < P} h_in[b, k] R[R_row0 + g*H + j, k] (with layer normalisation, read from p.recurrent instead), then
// the cell math.
template <typename S, ForwardEpilogue kEpilogue, bool kRelu, bool kComputeInput>
__global__ void __launch_bounds__(kStepThreads) forward_step_kernel(ForwardStep<S> p) {
  using C = Compute<S>;
  using Input = std::conditional_t<kComputeInput, C, S>;
  constexpr int G = product_gates(kEpilogue);
  CONVEYOR_SHARED(C, h_tile, [kStepRows][kStepK + 1]);
  CONVEYOR_SHARED(C, r_tile, [G * kStepUnits][kStepK + 1]);
  const int tid = threadIdx.x, tx = tid % kStepUnits, ty = tid / kStepUnits;
  const int64_t B = p.batch, H = p.hidden, K = p.recurrent != nullptr ? 0 : p.output_size;
  const int64_t b0 = int64_t(blockIdx.y) * kStepRows, j0 = int64_t(blockIdx.x) * kStepUnits;
  const Input* h_in = static_cast<const Input*>(p.h_in);
  C acc[2][G] = {};

  for (int64_t k0 = 0; k0 < K; k0 += kStepK) {
    for (int e = tid; e < kStepRows * kStepK; e += kStepThreads) {
      const int kk = e % kStepK, bb = e / kStepK;
      const int64_t b = b0 + bb, k = k0 + kk;
      h_tile[bb][kk] = b < B && k < K ? convert<C>(h_in[b * K + k]) * (p.mask != nullptr ? p.mask[b * K + k] : C(1))
                                      : C(0);
    }
    for (int e = tid; e < G * kStepUnits * kStepK; e += kStepThreads) {
      const int kk = e % kStepK, row = e / kStepK;
      const int64_t j = j0 + row % kStepUnits, k = k0 + kk;
      const int64_t r_row = p.R_row0 + (row / kStepUnits) * H + j;
      r_tile[row][kk] = j < H && k < K ? convert<C>(p.R[r_row * K + k]) : C(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kStepK; ++kk) {
      const C h0 = h_tile[ty][kk], h1 = h_tile[ty + 8][kk];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const C w = r_tile[g * kStepUnits + tx][kk];
        acc[0][g] += h0 * w;
        acc[1][g] += h1 * w;
      }
    }
    __syncthreads();
  }

  const int64_t j = j0 + tx;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t b = b0 + ty + 8 * i;
    if (b >= B || j >= H) continue;
    if (p.recurrent != nullptr) {
#pragma unroll
      for (int g = 0; g < G; ++g) acc[i][g] = p.recurrent[b * p.gate_stride + p.R_row0 + g * H + j];
    }
    forward_epilogue<S, kEpilogue, kRelu>(p, b, j, acc[i]);
  }
}

template <ForwardEpilogue kEpilogue, bool kRelu, bool kComputeInput = false, typename S>
void forward_step(const ForwardStep<S>& p, cudaStream_t stream) {
  const dim3 grid(blocks_for(p.hidden, kStepUnits), blocks_for(p.batch, kStepRows));
  launch("forward_step_kernel", forward_step_kernel<S, kEpilogue, kRelu, kComputeInput>, grid, kStepThreads, 0, stream,
         p);
}

// ---------------------------------------------------------------------------------------------------------
// Backward step (its arguments and cell math: step.cuh)

// For the block's tile of (batch row, unit: h's P or the cell's H, epilogue_units), the product
// sum_k A(b, k) R[R_row0 + k, j] (step.cuh, BackwardStep), then the epilogue.
template <typename S, BackwardEpilogue kEpilogue, bool kRelu>
__global__ void __launch_bounds__(kStepThreads) backward_step_kernel(BackwardStep<S> p) {
  using C = Compute<S>;
  CONVEYOR_SHARED(C, a_tile, [kStepRows][kStepK + 1]);
  CONVEYOR_SHARED(C, r_tile, [kStepK][kStepUnits]);
  const int tid = threadIdx.x, tx = tid % kStepUnits, ty = tid / kStepUnits;
  // R's rows are P wide; a cell epilogue with a product runs without a projection, where its H units are P.
  const int64_t B = p.batch, units = epilogue_units<kEpilogue>(p), R_ld = p.output_size;
  const int64_t b0 = int64_t(blockIdx.y) * kStepRows, j0 = int64_t(blockIdx.x) * kStepUnits;
  C acc[2] = {C(0), C(0)};

  for (int64_t k0 = 0; k0 < p.K; k0 += kStepK) {
    for (int e = tid; e < kStepRows * kStepK; e += kStepThreads) {
      const int kk = e % kStepK, bb = e / kStepK;
      const int64_t b = b0 + bb, k = k0 + kk;
      C v = C(0);
      if (b < p.product_batch && k < p.K) {
        v = k < p.K_first ? p.a_first[b * p.a_first_ld + k] : p.a_second[b * p.a_second_ld + (k - p.K_first)];
      }
      a_tile[bb][kk] = v;
    }
    for (int e = tid; e < kStepK * kStepUnits; e += kStepThreads) {
      const int jj = e % kStepUnits, kk = e / kStepUnits;
      const int64_t j = j0 + jj, k = k0 + kk;
      r_tile[kk][jj] = j < units && k < p.K ? convert<C>(p.R[(p.R_row0 + k) * R_ld + j]) : C(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kStepK; ++kk) {
      const C w = r_tile[kk][tx];
      acc[0] += a_tile[ty][kk] * w;
      acc[1] += a_tile[ty + 8][kk] * w;
    }
    __syncthreads();
  }

  const int64_t j = j0 + tx;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t b = b0 + ty + 8 * i;
    if (b < B && j < units) backward_epilogue<S, kEpilogue, kRelu>(p, b, j, acc[i]);
  }
}

template <BackwardEpilogue kEpilogue, bool kRelu, typename S>
void backward_step(const BackwardStep<S>& p, cudaStream_t stream) {
  const dim3 grid(blocks_for(epilogue_units<kEpilogue>(p), kStepUnits), blocks_for(p.batch, kStepRows));
  launch("backward_step_kernel", backward_step_kernel<S, kEpilogue, kRelu>, grid, kStepThreads, 0, stream, p);
}

// ---------------------------------------------------------------------------------------------------------
// Dropout masks (cells/dropout.h): out[t, b, u] = 0 or 1 / (1 - p); and the recurrent products' inputs
// h_products[t] = m_t * h_{t-1} for dR.

template <typename T>
__global__ void dropout_mask_kernel(int64_t steps, int64_t rows, int64_t units, double p, bool variational,
                                    uint64_t seed, uint64_t mask_stream, T* out) {
  const int64_t count = steps * rows * units;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t u = e % units, b = (e / units) % rows, t = e / (units * rows);
    out[e] = convert<T>(cells::dropout_mask_value<Compute<T>>(p, seed, mask_stream, b, u, variational ? 0 : t));
  }
}

template <typename T>
void dropout_mask(int64_t steps, int64_t rows, int64_t units, double p, bool variational, uint64_t seed,
                  uint64_t mask_stream, T* out, cudaStream_t stream) {
  const NvtxRange range("conveyor::dropout_mask");
  const int64_t count = steps * rows * units;
  const unsigned blocks = count / 256 + 1 < 4096 ? unsigned(count / 256 + 1) : 4096u;
  launch("dropout_mask_kernel", dropout_mask_kernel<T>, blocks, 256, 0, stream, steps, rows, units, p, variational,
         seed, mask_stream, out);
}

// The inputs of every step's recurrent product, for dR: h_products[r] = m * h_{t-1} for packed row r of step
// t (m = 1 without masks; h_{t-1} from h0 at step 0, else from y), each of h's `units` (P).
template <typename S>
__global__ void previous_states_kernel(int64_t steps, StepRows rows, int64_t tokens, int64_t units,
                                       bool variational, const Compute<S>* masks, const S* h0, const S* y,
                                       Compute<S>* h_products) {
  const int64_t count = tokens * units;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / units, u = e % units, t = rows.step_of(r, steps), k = r - rows.first(t);
    const Compute<S> h = convert<Compute<S>>(t == 0 ? h0[k * units + u] : y[(rows.first(t - 1) + k) * units + u]);
    h_products[e] = masks != nullptr ? masks[(variational ? k : r) * units + u] * h : h;
  }
}

// ---------------------------------------------------------------------------------------------------------
// The projection's gradient: dW_hr pairs every step's dh_total with m_t = o * act(c_t) (act(LN(c_t)) with layer
// normalisation), which the cache does not hold; this recomputes it from the cached o and c_t (as the CPU
// backend does), for every packed row.

template <typename S, bool kRelu>
__global__ void cell_outputs_kernel(int64_t tokens, int64_t hidden, const S* cache, int64_t cache_stride,
                                    Compute<S>* out) {
  using C = Compute<S>;
  const int64_t H = hidden, cw = cache_stride, count = tokens * H;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / H, j = e % H;
    const S* saved = cache + row * cw;
    out[e] = cells::lstm_output(kRelu, convert<C>(saved[3 * H + j]), convert<C>(saved[4 * H + j]));
  }
}

// dW_hr (=, or += when `accumulate`) = sum over packed rows of dh_total^T m, m recomputed from the cache (rows of
// cache_stride); with layer normalisation's gamma_c and beta_c (else null), from LN(c_t).
template <typename S, bool kRelu>
void projection_grad(int64_t tokens, int64_t hidden, int64_t output_size, const Compute<S>* dh_totals,
                     const S* cache, int64_t cache_stride, const S* gamma_c, const S* beta_c, bool accumulate,
                     bool allow_tf32, S* dW_hr, cudaStream_t stream) {
  using C = Compute<S>;
  const NvtxRange range("conveyor::projection_grad");
  Workspace<C> cell_outputs(tokens * hidden, stream);
  const int64_t count = tokens * hidden;
  const unsigned blocks = count / 256 + 1 < 4096 ? unsigned(count / 256 + 1) : 4096u;
  if (gamma_c != nullptr) {
    lstm_norm_outputs_from_cache<S, kRelu>(tokens, hidden, cache, cache_stride, gamma_c, beta_c, cell_outputs.get(),
                                           stream);
  } else {
    launch("cell_outputs_kernel", cell_outputs_kernel<S, kRelu>, blocks, 256, 0, stream, tokens, hidden, cache,
           cache_stride, cell_outputs.get());
  }
  gemm<C, C, S>(output_size, hidden, tokens, transpose_of<C>(dh_totals, output_size),
                rows_of<C>(cell_outputs.get(), hidden), accumulate, dW_hr, hidden, allow_tf32, stream);
}

// ---------------------------------------------------------------------------------------------------------
// Peephole gradients: products[r, :] = (da_i c_{t-1}, da_f c_{t-1}, da_o c_t) per packed row r of step t,
// summed over the rows afterwards by column_sums (dp_i stays 0 with coupled gates). c_t comes from the cache
// (S, rows of cache_stride), c_{t-1} from its column `carried` (c_t, or after zoneout), and at step 0 from c0
// (Compute<S>), as in the backward's steps.

template <typename S>
__global__ void peephole_products_kernel(int64_t steps, StepRows rows, int64_t tokens, int64_t hidden, bool coupled,
                                         const Compute<S>* da, int64_t da_ld, const S* cache, int64_t cache_stride,
                                         int64_t carried, const Compute<S>* c0, Compute<S>* products) {
  using C = Compute<S>;
  const int64_t H = hidden, cw = cache_stride, count = tokens * H;
  const int64_t f = coupled ? 0 : 1, o = coupled ? 2 : 3;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / H, j = e % H, t = rows.step_of(row, steps), b = row - rows.first(t);
    const C c = convert<C>(cache[row * cw + 4 * H + j]);
    const C c_prev = t == 0 ? c0[b * H + j] : convert<C>(cache[(rows.first(t - 1) + b) * cw + carried + j]);
    const C* d = da + row * da_ld;
    C* out = products + row * 3 * H;
    out[j] = coupled ? C(0) : d[j] * c_prev;
    out[H + j] = d[f * H + j] * c_prev;
    out[2 * H + j] = d[o * H + j] * c;
  }
}

template <typename S>
void peephole_grads(int64_t steps, StepRows rows, int64_t tokens, int64_t hidden, bool coupled, const Compute<S>* da,
                    int64_t da_ld, const S* cache, int64_t cache_stride, int64_t carried, const Compute<S>* c0,
                    bool accumulate, S* dP, cudaStream_t stream) {
  const NvtxRange range("conveyor::peephole_grads");
  Workspace<Compute<S>> products(tokens * 3 * hidden, stream);
  const int64_t count = tokens * hidden;
  const unsigned blocks = count / 256 + 1 < 4096 ? unsigned(count / 256 + 1) : 4096u;
  launch("peephole_products_kernel", peephole_products_kernel<S>, blocks, 256, 0, stream, steps, rows, tokens, hidden,
         coupled, da, da_ld, cache, cache_stride, carried, c0, products.get());
  column_sums(tokens, 3 * hidden, products.get(), 3 * hidden, accumulate, dP, stream);
}

// ---------------------------------------------------------------------------------------------------------
// Batches with lengths (csrc/core/packing.h): moving rows between the caller's padded arrays and the packed
// ones the windows run on.

// out[dst(i)] = in[src(i)] converted, for `count` rows of `width`, where src(i) = src_rows[i] (i when null)
// and dst(i) likewise.
template <typename To, typename From>
__global__ void copy_rows_kernel(int64_t count, int64_t width, const int64_t* src_rows, const int64_t* dst_rows,
                                 const From* in, To* out) {
  const int64_t total = count * width;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / width, u = e % width;
    const int64_t src = src_rows != nullptr ? src_rows[i] : i, dst = dst_rows != nullptr ? dst_rows[i] : i;
    out[dst * width + u] = convert<To>(in[src * width + u]);
  }
}

template <typename To, typename From>
void copy_rows(int64_t count, int64_t width, const int64_t* src_rows, const int64_t* dst_rows, const From* in, To* out,
               cudaStream_t stream) {
  const int64_t total = count * width;
  if (total == 0) return;
  const unsigned blocks = total / 256 + 1 < 4096 ? unsigned(total / 256 + 1) : 4096u;
  launch("copy_rows_kernel", copy_rows_kernel<To, From>, blocks, 256, 0, stream, count, width, src_rows, dst_rows, in,
         out);
}

// The values of `lengths` on the host: read in place there, else copied from the device (waiting for the
// work queued on `stream` before them).
std::vector<int64_t> lengths_on_host(const TensorView& lengths, cudaStream_t stream) {
  if (lengths.device.kind == DeviceKind::cpu) return detail::host_lengths(lengths);
  const size_t bytes = size_t(lengths.shape[0]) * (lengths.dtype == DType::int32 ? 4 : 8);
  std::vector<int64_t> buffer(size_t(lengths.shape[0]) + 1);
  CONVEYOR_CUDA_CHECK(cudaMemcpyAsync(buffer.data(), lengths.data, bytes, cudaMemcpyDeviceToHost, stream));
  CONVEYOR_CUDA_CHECK(cudaStreamSynchronize(stream));
  TensorView host = lengths;
  host.data = buffer.data();
  host.device = Device{};
  return detail::host_lengths(host);
}

// The rows a window runs (detail::window_batch).
detail::PackedBatch window_rows(const WindowSizes& s, const TensorView& lengths, bool packed, cudaStream_t stream) {
  const std::vector<int64_t> values = lengths.present() ? lengths_on_host(lengths, stream) : std::vector<int64_t>{};
  return detail::window_batch(lengths.present() ? &values : nullptr, s.steps, s.batch, packed);
}

// A packed batch's index arrays on the device, uploaded at once: step offsets, each packed row's row in the
// padded [T*B] arrays, the packed order of the [B] states, and each row's last step's packed row. A dense batch
// uploads nothing and its windows use StepRows without offsets.
class DeviceRows {
 public:
  DeviceRows(const detail::PackedBatch& rows, cudaStream_t stream)
      : rows_(rows), indices_(rows.dense ? 0 : rows.steps + 1 + rows.tokens() + 2 * rows.batch, stream) {
    if (rows.dense) return;
    std::vector<int64_t> host(rows.offsets);
    for (int64_t t = 0; t < rows.steps; ++t) {
      for (int64_t k = 0; k < rows.rows_at(t); ++k) host.push_back(t * rows.batch + rows.order[k]);
    }
    host.insert(host.end(), rows.order.begin(), rows.order.end());
    for (int64_t k = 0; k < rows.batch; ++k) host.push_back(rows.last_row(k));
    // From pageable memory: returns once `host` is staged, so it may go when this returns.
    CONVEYOR_CUDA_CHECK(cudaMemcpyAsync(indices_.get(), host.data(), sizeof(int64_t) * host.size(),
                                        cudaMemcpyHostToDevice, stream));
  }
  bool packed() const { return !rows_.dense; }
  // Whether the caller's per-step arrays are laid out as the window runs (dense, or given packed).
  bool in_place() const { return rows_.in_place; }
  // Where the windows' steps read their rows: on the device for the persistent kernels and the
  // time-parallel kernels, on the host for the per-step path's host code.
  StepRows on_device() const { return {packed() ? indices_.get() : nullptr, rows_.batch}; }
  StepRows on_host() const { return {packed() ? rows_.offsets.data() : nullptr, rows_.batch}; }
  const int64_t* padded_rows() const { return indices_.get() + rows_.steps + 1; }
  const int64_t* order() const { return padded_rows() + rows_.tokens(); }
  const int64_t* last_rows() const { return order() + rows_.batch; }

 private:
  const detail::PackedBatch& rows_;
  Workspace<int64_t> indices_;
};

// A padded [T, B, width] input in packed rows: the input itself when the caller's layout is the window's, else a
// packed copy.
template <typename T>
class PackedInput {
 public:
  PackedInput(const DeviceRows& rows, int64_t tokens, int64_t width, const T* padded, cudaStream_t stream)
      : copy_(!rows.in_place() && padded != nullptr ? tokens * width : 0, stream) {
    data_ = copy_.get() != nullptr ? copy_.get() : padded;
    if (copy_.get() != nullptr) copy_rows(tokens, width, rows.padded_rows(), nullptr, padded, copy_.get(), stream);
  }
  const T* get() const { return data_; }

 private:
  Workspace<T> copy_;
  const T* data_;
};

// Writes the packed [tokens, width] array into the caller's padded [T, B, width] one, zeros at padded steps.
template <typename T>
void unpack_rows(const DeviceRows& rows, int64_t tokens, int64_t padded_count, int64_t width, const T* packed,
                 T* padded, cudaStream_t stream) {
  CONVEYOR_CUDA_CHECK(cudaMemsetAsync(padded, 0, sizeof(T) * size_t(padded_count * width), stream));
  copy_rows(tokens, width, nullptr, rows.padded_rows(), packed, padded, stream);
}

// ---------------------------------------------------------------------------------------------------------
// Windows

template <typename T>
const T* data_or_null(const TensorView& v) {
  return v.present() ? static_cast<const T*>(v.data) : nullptr;
}

// Sets `count` elements of `out` to the value of `in` converted, or to zero when `in` is absent.
template <typename To, typename From>
void init_from(int64_t count, const From* in, To* out, cudaStream_t stream) {
  if (in != nullptr) {
    convert_copy(count, in, out, stream);
  } else {
    CONVEYOR_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(To) * size_t(count), stream));
  }
}

struct Sizes {
  int64_t T, B, I, H, G, GH, cw;
  int64_t P;  // the units of h: the projection's size, or H without one
};

Sizes sizes_of(const CellOptions& options, const WindowSizes& s) {
  const int64_t G = gate_count(options);
  return {s.steps,     s.batch, s.input_size, s.hidden_size, G, G * s.hidden_size, cache_width(options) * s.hidden_size,
          s.output_size};
}

// A zero [B, H] array standing in for an absent initial state, or the state itself; T is the state's element
// type (S for h0, Compute<S> for the LSTM's c0).
template <typename T>
class StateOrZeros {
 public:
  StateOrZeros(const TensorView& state, int64_t count, cudaStream_t stream)
      : zeros_(state.present() ? 0 : count, stream) {
    if (!state.present() && count > 0) {
      CONVEYOR_CUDA_CHECK(cudaMemsetAsync(zeros_.get(), 0, sizeof(T) * size_t(count), stream));
    }
    data_ = state.present() ? static_cast<const T*>(state.data) : zeros_.get();
  }
  const T* get() const { return data_; }

 private:
  Workspace<T> zeros_;
  const T* data_;
};

// The recurrent dropout masks m_t of the window, a row per packed row of every step ([B, H] for all steps when
// variational; none without recurrent dropout). Drawn for the padded [T or 1, B, H] and packed after, so
// that each row keeps its own masks.
template <typename C>
class RecurrentMasks {
 public:
  RecurrentMasks(const CellOptions& options, int64_t steps, int64_t batch, int64_t hidden, const DeviceRows& rows,
                 int64_t tokens, cudaStream_t stream)
      : masks_(options.recurrent_dropout > 0 ? (options.variational ? 1 : steps) * batch * hidden : 0, stream),
        packed_(options.recurrent_dropout > 0 && rows.packed() ? (options.variational ? batch : tokens) * hidden : 0,
                stream) {
    if (options.recurrent_dropout > 0) {
      dropout_mask(options.variational ? 1 : steps, batch, hidden, options.recurrent_dropout, options.variational,
                   options.dropout_seed, options.dropout_stream, masks_.get(), stream);
    }
    if (packed_.get() != nullptr) {
      copy_rows(options.variational ? batch : tokens, hidden, options.variational ? rows.order() : rows.padded_rows(),
                nullptr, masks_.get(), packed_.get(), stream);
    }
  }
  bool active() const { return masks_.get() != nullptr; }
  // m_t of a step: the windows' mask(t) (step.cuh)
  const C* all() const { return packed_.get() != nullptr ? packed_.get() : masks_.get(); }

 private:
  Workspace<C> masks_;
  Workspace<C> packed_;
};

// R * M under DropConnect (CellOptions::weight_dropout; regularisers.cuh), formed once for the window, or R
// itself without it ([rows, cols]).
template <typename S>
class DroppedWeights {
 public:
  DroppedWeights(const CellOptions& options, int64_t rows, int64_t cols, const S* R, cudaStream_t stream)
      : copy_(options.weight_dropout > 0 ? rows * cols : 0, stream) {
    data_ = R;
    if (copy_.get() == nullptr) return;
    dropped_weights(options, rows, cols, R, copy_.get(), stream);
    data_ = copy_.get();
  }
  const S* get() const { return data_; }

 private:
  Workspace<S> copy_;
  const S* data_;
};

// The window's zoneout draws (step.cuh): packed row k draws as the batch's row order[k].
Zoneout zoneout_of(const CellOptions& options, const DeviceRows& rows) {
  Zoneout z;
  z.h = options.zoneout;
  z.c = options.zoneout_cell;
  z.sample = options.zoneout_sample;
  z.seed = options.dropout_seed;
  z.h_stream = options.zoneout_stream;
  z.c_stream = options.zoneout_cell_stream;
  z.order = rows.packed() ? rows.order() : nullptr;
  return z;
}

// The largest batch for which algorithm=auto takes the persistent kernels. Measured on an H200 (bench/results/
// h200-2026-11-28, run 2, every cell and dtype at H = 256, 768, 1024): at B <= 16 they take 0.4-0.6x the
// per-step path's time for forward + backward, at B = 64 1.6-1.9x, at B = 256 3-4.7x.
constexpr int64_t kAutoPersistentMaxBatch = 32;

// The persistent kernel's plan when the window runs on it (fits), else a plan that does not fit: per_step
// asked for, auto at a batch the per-step kernels win, or auto where the persistent kernel cannot run the window
// (its slices do not fit on the device, or a projection; persistent asked for there throws an ArgumentError
// saying why). The device is asked only when the persistent kernel is a candidate.
// CONVEYOR_LOG_ALGORITHM=1 prints the choice and why.
template <typename S, bool kRelu>
PersistentPlan persistent_plan_to_run(const CellOptions& options, int64_t batch, int64_t hidden, bool projection,
                                      bool forward) {
  const char* direction = forward ? "forward" : "backward";
  PersistentPlan plan;
  std::string why_not;
  if (options.algorithm == Algorithm::per_step) {
    why_not = "asked for";
  } else if (options.algorithm == Algorithm::automatic && batch > kAutoPersistentMaxBatch) {
    why_not = "B = " + std::to_string(batch) + " > " + std::to_string(kAutoPersistentMaxBatch) +
              ", where the per-step kernels are faster";
  } else {
    plan = forward ? persistent_forward_plan<S, kRelu>(options, hidden, projection)
                   : persistent_backward_plan<S, kRelu>(options, hidden, projection);
    if (!plan.fits && options.algorithm == Algorithm::persistent) {
      throw ArgumentError(std::string("algorithm: 'persistent' cannot run this ") + cell_name(options.cell) + " " +
                          direction + " window: " + plan.why + " (use 'auto' or 'per_step')");
    }
    if (!plan.fits) why_not = "persistent does not fit: " + plan.why;
  }
  static const bool log = [] {
    const char* v = std::getenv("CONVEYOR_LOG_ALGORITHM");
    return v != nullptr && *v != '\0' && std::string(v) != "0";
  }();
  if (log && plan.fits) {
    std::fprintf(stderr, "conveyor: %s %s: persistent (%u blocks of %d units, %zu bytes of R each)\n",
                 cell_name(options.cell), direction, plan.blocks, plan.units, plan.shared_bytes);
  } else if (log) {
    std::fprintf(stderr, "conveyor: %s %s: per_step (%s)\n", cell_name(options.cell), direction, why_not.c_str());
  }
  return plan;
}

// Layer normalisation's recurrent pre-activations of a forward step, before its step kernel: every gate's
// R h_{t-1} (R (m_t * h_{t-1}) under recurrent dropout) into w.recurrent, saved in the cache's last G*H columns,
// then normalised in place with gamma_h. The product stays in the compute type, as the step kernels' does.
template <typename S>
void recurrent_layer_norm(const ForwardWindow<S>& w, const ForwardStep<S>& p, cudaStream_t stream) {
  using C = Compute<S>;
  const int64_t B = p.batch, P = p.output_size, GH = p.gate_stride;
  if (p.mask != nullptr) {
    masked_hidden<S>(B * P, p.mask, p.h_prev, w.masked_hidden, stream);
    const C* R = nullptr;
    if constexpr (std::is_same_v<S, C>) {
      R = p.R;
    } else {
      R = w.R_compute;
    }
    gemm<C, C, C>(B, GH, P, rows_of<C>(w.masked_hidden, P), transpose_of(R, P), false, w.recurrent, GH, false,
                  stream);
  } else {
    gemm<S, S, C>(B, GH, P, rows_of(p.h_prev, P), transpose_of(p.R, P), false, w.recurrent, GH, false, stream);
  }
  S* raw = p.cache != nullptr ? p.cache + p.cache_stride - GH : nullptr;
  layer_norm<S>(B, GH, w.gamma_h, w.recurrent, GH, raw, p.cache_stride, stream);
}

// Step t of a forward window on the per-step path: one kernel (two for the GRU with reset_before); with the
// LSTM's projection, the kernel writes m_t = o * act(c_t) and a product forms h_t = m_t W_hr^T from it (then
// zoneout of h_t, when on). With layer normalisation, the recurrent pre-activations are formed and normalised
// first, and the LSTM's output o * act(LN(c_t)) after the kernel, by row kernels (regularisers.cuh).
template <typename S, bool kRelu>
void forward_steps(const CellOptions& options, const ForwardWindow<S>& w, int64_t t, cudaStream_t stream) {
  using C = Compute<S>;
  ForwardStep<S> p = w.step(t);
  if (w.recurrent != nullptr) recurrent_layer_norm(w, p, stream);
  switch (options.cell) {
    case CellType::lstm:
      if (options.coupled_gates) {
        forward_step<ForwardEpilogue::lstm_coupled, kRelu>(p, stream);
      } else {
        forward_step<ForwardEpilogue::lstm, kRelu>(p, stream);
      }
      if (p.norm_inputs != nullptr) lstm_norm_output<S, kRelu>(p, w.gamma_c, w.beta_c, stream);
      if (w.W_hr != nullptr && w.projected != nullptr) {  // h~_t = m_t W_hr^T, then zoneout
        gemm<C, S, C>(p.batch, p.output_size, p.hidden, rows_of<C>(p.cell_output, p.hidden),
                      transpose_of(w.W_hr, p.hidden), false, w.projected, p.output_size, options.allow_tf32, stream);
        hidden_zoneout(p, w.projected, stream);
      } else if (w.W_hr != nullptr) {
        gemm<C, S, S>(p.batch, p.output_size, p.hidden, rows_of<C>(p.cell_output, p.hidden),
                      transpose_of(w.W_hr, p.hidden), false, p.h, p.output_size, options.allow_tf32, stream);
      }
      return;
    case CellType::rnn:
      return forward_step<ForwardEpilogue::rnn, kRelu>(p, stream);
    case CellType::gru:
      if (options.reset_after) return forward_step<ForwardEpilogue::gru_reset_after, kRelu>(p, stream);
      forward_step<ForwardEpilogue::gru_reset_before_gates, kRelu>(p, stream);
      ForwardWindow<S>::to_output_phase(p);
      return forward_step<ForwardEpilogue::gru_reset_before_output, kRelu, true>(p, stream);
  }
}

// Layer normalisation's backward through LN(R h_{t-1}) of a backward step, after its cell's: the gradients of
// R h_{t-1} before the norm into w.d_recurrent (and the rows' parts of gamma_h's gradient), from those after it,
// d_first's first `split` columns and then d_second's (H wide).
template <typename S>
void recurrent_layer_norm_backward(const BackwardWindow<S>& w, const BackwardStep<S>& p, int64_t t,
                                   const Compute<S>* d_first, int64_t split, const Compute<S>* d_second,
                                   cudaStream_t stream) {
  const int64_t GH = p.gate_stride, first = w.rows.first(t);
  layer_norm_backward<S>(p.batch, GH, p.cache + p.cache_stride - GH, p.cache_stride, w.gamma_h, d_first, GH, split,
                         d_second, p.hidden, w.d_recurrent + first * GH,
                         w.d_gamma_h != nullptr ? w.d_gamma_h + first * GH : nullptr, stream);
}

// A backward step of the layer-normalised LSTM: dh_total, the gradient reaching h_t (the projection's epilogue:
// the product with R, dh_carry, dy_t, zoneout); with a projection its product with W_hr; the cell's backward
// through LN(c_t) (a row kernel); LN(R h_{t-1})'s backward.
template <typename S, bool kRelu>
void lstm_layer_norm_backward_steps(const CellOptions& options, const BackwardWindow<S>& w, BackwardStep<S> p,
                                    int64_t t, cudaStream_t stream) {
  using C = Compute<S>;
  backward_step<BackwardEpilogue::projection, kRelu>(p, stream);
  const C* d_output = p.dh_total;
  if (w.W_hr != nullptr) {
    gemm<C, S, C>(p.batch, p.hidden, p.output_size, rows_of<C>(p.dh_total, p.output_size), rows_of(w.W_hr, p.hidden),
                  false, w.d_cell_output, p.hidden, options.allow_tf32, stream);
    d_output = w.d_cell_output;
  }
  const int64_t rows = w.rows.first(t) * p.hidden;
  lstm_norm_backward<S, kRelu>(p, d_output, w.gamma_c, w.beta_c,
                               w.d_gamma_c != nullptr ? w.d_gamma_c + rows : nullptr,
                               w.d_beta_c != nullptr ? w.d_beta_c + rows : nullptr, stream);
  recurrent_layer_norm_backward(w, p, t, p.dax, p.gate_stride, static_cast<const C*>(nullptr), stream);
}

// Step t of a backward window on the per-step path. With the LSTM's projection, three launches: dh_total
// (the gradient reaching h_t, over the product with R), its product with W_hr (the gradient reaching m_t),
// and the cell's backward from that. With layer normalisation, row kernels between (regularisers.cuh).
template <typename S, bool kRelu>
void backward_steps(const CellOptions& options, const BackwardWindow<S>& w, int64_t t, cudaStream_t stream) {
  using C = Compute<S>;
  BackwardStep<S> p = w.step(t);
  switch (options.cell) {
    case CellType::lstm:
      if (w.d_recurrent != nullptr) return lstm_layer_norm_backward_steps<S, kRelu>(options, w, p, t, stream);
      if (w.W_hr != nullptr) {
        backward_step<BackwardEpilogue::projection, kRelu>(p, stream);
        gemm<C, S, C>(p.batch, p.hidden, p.output_size, rows_of<C>(p.dh_total, p.output_size),
                      rows_of(w.W_hr, p.hidden), false, w.d_cell_output, p.hidden, options.allow_tf32, stream);
        w.to_cell_phase(p);
      }
      return backward_step<BackwardEpilogue::lstm, kRelu>(p, stream);
    case CellType::rnn:
      return backward_step<BackwardEpilogue::rnn, kRelu>(p, stream);
    case CellType::gru:
      if (options.reset_after) {
        backward_step<BackwardEpilogue::gru_reset_after, kRelu>(p, stream);
        // One layer norm over the three blocks of R h: its backward sees [da_r, da_z, dar_n] together.
        if (w.d_recurrent != nullptr) recurrent_layer_norm_backward(w, p, t, p.dax, 2 * p.hidden, p.dar_n, stream);
        return;
      }
      backward_step<BackwardEpilogue::gru_reset_before_update, kRelu>(p, stream);
      BackwardWindow<S>::to_reset_phase(p);
      return backward_step<BackwardEpilogue::gru_reset_before_reset, kRelu>(p, stream);
  }
}

// A window runs over its rows in packed order (csrc/core/packing.h, StepRows): without lengths that is the
// caller's own layout and nothing moves; with them x (and backward's y and dy) are packed first, the [B, P]
// and [B, H] states put in packed order, and the outputs unpacked after. P is h's units: the projection's
// size with W_hr, else H.
template <typename S, bool kRelu>
void forward_window(const CellOptions& options, const WindowSizes& sizes, const ForwardArgs& args,
                    cudaStream_t stream) {
  using C = Compute<S>;
  const Sizes z = sizes_of(options, sizes);
  const detail::PackedBatch batch = window_rows(sizes, args.lengths, args.packed, stream);
  const DeviceRows rows(batch, stream);
  const int64_t N = batch.tokens(), B = z.B, H = z.H, P = z.P;
  const S* W = static_cast<const S*>(args.W.data);
  const DroppedWeights<S> dropped(options, z.GH, P, static_cast<const S*>(args.R.data), stream);
  const S* R = dropped.get();
  const S* W_hr = data_or_null<S>(args.W_hr);
  S* cache = args.cache.present() ? static_cast<S*>(args.cache.data) : nullptr;
  const bool lstm = options.cell == CellType::lstm;
  const bool reset_before = options.cell == CellType::gru && !options.reset_after;
  const PackedInput<S> x(rows, N, z.I, static_cast<const S*>(args.x.data), stream);
  Workspace<S> y_packed(rows.in_place() ? 0 : N * P, stream);
  S* y = rows.in_place() ? static_cast<S*>(args.y.data) : y_packed.get();

  Workspace<C> ax(N * z.GH, stream);
  {
    NvtxRange range("conveyor::input_projection");
    gemm<S, S, C>(N, z.GH, z.I, rows_of(x.get(), z.I), transpose_of(W, z.I), false, ax.get(), z.GH,
                  options.allow_tf32, stream);
  }
  if (options.layer_norm) {  // LN(x W^T; gamma_x), the raw product saved in the cache's G*H columns before R h's
    layer_norm<S>(N, z.GH, data_or_null<S>(args.gamma_x), ax.get(), z.GH,
                  cache != nullptr ? cache + z.cw - 2 * z.GH : nullptr, z.cw, stream);
  }
  const StateOrZeros<S> h0_given(args.h0, B * P, stream);
  Workspace<S> h0_packed(rows.packed() ? B * P : 0, stream);
  if (rows.packed()) copy_rows(B, P, rows.order(), nullptr, h0_given.get(), h0_packed.get(), stream);
  Workspace<C> cell_state(lstm ? B * H : 0, stream);
  if (lstm && rows.packed() && args.c0.present()) {
    copy_rows(B, H, rows.order(), nullptr, static_cast<const C*>(args.c0.data), cell_state.get(), stream);
  } else if (lstm) {
    init_from(B * H, data_or_null<C>(args.c0), cell_state.get(), stream);  // c0 is of C
  }
  Workspace<C> reset_hidden(reset_before ? B * H : 0, stream);
  Workspace<C> update_gate(reset_before ? B * H : 0, stream);
  Workspace<C> cell_output(W_hr != nullptr ? B * H : 0, stream);
  const PersistentPlan plan = persistent_plan_to_run<S, kRelu>(options, B, H, W_hr != nullptr, true);
  // Layer normalisation's and zoneout's scratch of one step (ForwardWindow); the persistent kernel's moments of
  // each block's part of every row.
  const bool masked_product = options.layer_norm && options.recurrent_dropout > 0 && !plan.fits;
  Workspace<C> recurrent(options.layer_norm ? B * z.GH : 0, stream);
  Workspace<C> masked_hidden(masked_product ? B * P : 0, stream);
  Workspace<C> R_compute(masked_product && !std::is_same_v<S, C> ? z.GH * P : 0, stream);
  if (R_compute.get() != nullptr) convert_copy(z.GH * P, R, R_compute.get(), stream);
  Workspace<C> norm_inputs(options.layer_norm && lstm ? B * 2 * H : 0, stream);
  Workspace<C> projected(W_hr != nullptr && options.zoneout > 0 ? B * P : 0, stream);
  Workspace<C> part_moments(plan.fits && options.layer_norm ? 2 * B * int64_t(plan.blocks) * 2 : 0, stream);

  const RecurrentMasks<C> masks(options, z.T, B, P, rows, N, stream);
  NvtxRange range("conveyor::recurrence");
  ForwardWindow<S> w{};
  ForwardStep<S>& p = w.base;
  p.batch = B;
  p.hidden = H;
  p.output_size = P;
  p.gate_stride = z.GH;
  p.R = R;
  p.bW = data_or_null<S>(args.bW);
  p.bR = data_or_null<S>(args.bR);
  p.P = data_or_null<S>(args.P);
  p.lstm = detail::lstm_options<C>(options);
  p.cell_state = cell_state.get();
  p.reset_hidden = reset_hidden.get();
  p.update_gate = update_gate.get();
  p.cell_output = cell_output.get();
  p.cache_stride = z.cw;
  p.zoneout = zoneout_of(options, rows);
  p.recurrent = recurrent.get();
  p.norm_inputs = norm_inputs.get();
  w.steps = batch.steps;
  w.rows = rows.on_device();
  w.h0 = rows.packed() ? h0_packed.get() : h0_given.get();
  w.y = y;
  w.cache = cache;
  w.ax = ax.get();
  w.masks = masks.all();
  w.variational = options.variational;
  w.W_hr = W_hr;
  w.gamma_h = data_or_null<S>(args.gamma_h);
  w.gamma_c = data_or_null<S>(args.gamma_c);
  w.beta_c = data_or_null<S>(args.beta_c);
  w.recurrent = recurrent.get();
  w.masked_hidden = masked_hidden.get();
  w.R_compute = R_compute.get();
  w.projected = projected.get();
  w.part_moments = part_moments.get();
  if (plan.fits) {
    forward_persistent<S, kRelu>(options, plan, w, stream);
  } else {
    ForwardWindow<S> host_window = w;  // its steps computed on the host, from the host's offsets
    host_window.rows = rows.on_host();
    for (int64_t t = 0; t < batch.steps; ++t) forward_steps<S, kRelu>(options, host_window, t, stream);
  }

  // A row's final state is its output at its last step; its cell state stopped where the row did.
  if (rows.packed()) {
    if (!rows.in_place()) unpack_rows(rows, N, z.T * B, P, y, static_cast<S*>(args.y.data), stream);
    if (args.h_T.present()) copy_rows(B, P, rows.last_rows(), rows.order(), y, static_cast<S*>(args.h_T.data), stream);
    if (args.c_T.present()) {
      copy_rows(B, H, nullptr, rows.order(), cell_state.get(), static_cast<C*>(args.c_T.data), stream);
    }
    return;
  }
  if (args.h_T.present()) {
    CONVEYOR_CUDA_CHECK(cudaMemcpyAsync(args.h_T.data, y + (z.T - 1) * B * P, sizeof(S) * size_t(B * P),
                                        cudaMemcpyDeviceToDevice, stream));
  }
  if (args.c_T.present()) {  // c_T is of C: the state as the window carried it, unrounded
    CONVEYOR_CUDA_CHECK(cudaMemcpyAsync(args.c_T.data, cell_state.get(), sizeof(C) * size_t(B * H),
                                        cudaMemcpyDeviceToDevice, stream));
  }
}

// A [B, H] state of type From into `out` in packed order (the state itself when dense), or zeros when absent.
template <typename To, typename From>
void packed_state_into(const DeviceRows& rows, int64_t batch, int64_t hidden, const TensorView& state, To* out,
                       cudaStream_t stream) {
  if (rows.packed() && state.present()) {
    copy_rows(batch, hidden, rows.order(), nullptr, static_cast<const From*>(state.data), out, stream);
  } else {
    init_from(batch * hidden, data_or_null<From>(state), out, stream);
  }
}

template <typename S, bool kRelu>
void backward_window(const CellOptions& options, const WindowSizes& sizes, const BackwardArgs& args,
                     cudaStream_t stream) {
  using C = Compute<S>;
  const Sizes z = sizes_of(options, sizes);
  const detail::PackedBatch batch = window_rows(sizes, args.lengths, args.packed, stream);
  const DeviceRows rows(batch, stream);
  const int64_t B = z.B, H = z.H, P = z.P, GH = z.GH, N = batch.tokens();
  const S* W = static_cast<const S*>(args.W.data);
  const DroppedWeights<S> dropped(options, GH, P, static_cast<const S*>(args.R.data), stream);
  const S* R = dropped.get();
  const S* W_hr = data_or_null<S>(args.W_hr);
  const S* cache = data_or_null<S>(args.cache);
  const bool lstm = options.cell == CellType::lstm;
  const bool gru = options.cell == CellType::gru;
  const bool reset_after_gru = gru && options.reset_after;
  const bool layer_norm = options.layer_norm;
  const bool lstm_layer_norm = layer_norm && lstm;
  const PackedInput<S> y(rows, N, P, static_cast<const S*>(args.y.data), stream);
  const PackedInput<S> dy(rows, N, P, static_cast<const S*>(args.dy.data), stream);

  Workspace<C> dax(N * GH, stream);
  Workspace<C> dar_n(reset_after_gru ? N * H : 0, stream);
  // The gradient reaching h_t (c_t) from later steps; a row that stops early keeps dh_T (dc_T) here untouched
  // until its own last step.
  Workspace<C> dh_carry(B * P, stream);
  Workspace<C> dc(lstm ? B * H : 0, stream);
  packed_state_into<C, S>(rows, B, P, args.dh_T, dh_carry.get(), stream);
  if (lstm) packed_state_into<C, C>(rows, B, H, args.dc_T, dc.get(), stream);  // dc_T, c0 and dc0 are of C
  const StateOrZeros<S> h0_given(args.h0, B * P, stream);
  Workspace<S> h0_packed(rows.packed() ? B * P : 0, stream);
  if (rows.packed()) copy_rows(B, P, rows.order(), nullptr, h0_given.get(), h0_packed.get(), stream);
  const S* h0 = rows.packed() ? h0_packed.get() : h0_given.get();
  Workspace<C> c0(lstm ? B * H : 0, stream);
  if (lstm) packed_state_into<C, C>(rows, B, H, args.c0, c0.get(), stream);
  // The projection's gradients: every step's dh_total (for dW_hr; the layer-normalised LSTM's cell backward
  // starts from it too) and one step's d_cell_output (step.cuh).
  Workspace<C> dh_totals(W_hr != nullptr || lstm_layer_norm ? N * P : 0, stream);
  Workspace<C> d_cell_output(W_hr != nullptr ? B * H : 0, stream);
  // Layer normalisation: every step's gradient of R h_{t-1} before its norm, and the rows' parts of the gains'
  // gradients that were asked for (BackwardWindow).
  Workspace<C> d_recurrent(layer_norm ? N * GH : 0, stream);
  Workspace<C> d_gamma_h(args.dgamma_h.present() ? N * GH : 0, stream);
  Workspace<C> d_gamma_c(args.dgamma_c.present() ? N * H : 0, stream);
  Workspace<C> d_beta_c(args.dbeta_c.present() ? N * H : 0, stream);

  const RecurrentMasks<C> masks(options, z.T, B, P, rows, N, stream);
  BackwardWindow<S> w{};
  BackwardStep<S>& p = w.base;
  p.batch = B;
  p.hidden = H;
  p.output_size = P;
  p.gate_stride = GH;
  p.R = R;
  p.cache_stride = z.cw;
  p.dh_carry = dh_carry.get();
  p.dc = dc.get();
  p.P = data_or_null<S>(args.P);
  p.lstm = detail::lstm_options<C>(options);
  p.c0 = c0.get();
  p.zoneout = zoneout_of(options, rows);
  w.steps = batch.steps;
  w.rows = rows.on_device();
  w.dax = dax.get();
  w.dar_n = dar_n.get();
  w.masks = masks.all();
  w.variational = options.variational;
  w.lstm = lstm;
  w.gru = gru;
  w.reset_after = options.reset_after;
  w.dy = dy.get();
  w.cache = cache;
  w.y = y.get();
  w.h0 = h0;
  w.W_hr = W_hr;
  w.dh_totals = dh_totals.get();
  w.d_cell_output = d_cell_output.get();
  w.gamma_h = data_or_null<S>(args.gamma_h);
  w.gamma_c = data_or_null<S>(args.gamma_c);
  w.beta_c = data_or_null<S>(args.beta_c);
  w.d_recurrent = d_recurrent.get();
  w.d_gamma_h = d_gamma_h.get();
  w.d_gamma_c = d_gamma_c.get();
  w.d_beta_c = d_beta_c.get();
  Workspace<S> dh0_packed(rows.packed() && args.dh0.present() ? B * P : 0, stream);
  S* dh0 = dh0_packed.get() != nullptr ? dh0_packed.get() : args.dh0.present() ? static_cast<S*>(args.dh0.data)
                                                                                : nullptr;

  {
    NvtxRange range("conveyor::recurrence");
    const PersistentPlan plan = persistent_plan_to_run<S, kRelu>(options, B, H, W_hr != nullptr, false);
    // The persistent kernel's layer normalisation: every row's statistics of the raw R h_{t-1} and of c_t, from the
    // cache before the loop, and each block's sums over its part of every row (BackwardWindow).
    const bool persistent_norm = plan.fits && layer_norm;
    Workspace<C> recurrent_statistics(persistent_norm ? 2 * N : 0, stream);
    Workspace<C> cell_statistics(persistent_norm && lstm ? 2 * N : 0, stream);
    Workspace<C> part_sums(persistent_norm ? 2 * B * int64_t(plan.blocks) * 2 : 0, stream);
    if (persistent_norm) {
      layer_norm_statistics<S>(N, GH, cache + z.cw - GH, z.cw, recurrent_statistics.get(), stream);
      if (lstm) layer_norm_statistics<S>(N, H, cache + 4 * H, z.cw, cell_statistics.get(), stream);
    }
    w.recurrent_statistics = recurrent_statistics.get();
    w.cell_statistics = cell_statistics.get();
    w.part_sums = part_sums.get();
    if (plan.fits) {
      backward_persistent<S, kRelu>(options, plan, w, dh0, stream);
    } else {
      BackwardWindow<S> host_window = w;  // its steps computed on the host, from the host's offsets
      host_window.rows = rows.on_host();
      for (int64_t t = batch.steps - 1; t >= 0; --t) backward_steps<S, kRelu>(options, host_window, t, stream);
      if (dh0 != nullptr) {
        backward_step<BackwardEpilogue::initial_state, kRelu>(host_window.initial_state(dh0), stream);
      }
    }
    if (dh0_packed.get() != nullptr) {
      copy_rows(B, P, nullptr, rows.order(), dh0_packed.get(), static_cast<S*>(args.dh0.data), stream);
    }
    if (args.dc0.present() && rows.packed()) {
      copy_rows(B, H, nullptr, rows.order(), dc.get(), static_cast<C*>(args.dc0.data), stream);
    } else if (args.dc0.present()) {
      CONVEYOR_CUDA_CHECK(cudaMemcpyAsync(args.dc0.data, dc.get(), sizeof(C) * size_t(B * H),
                                          cudaMemcpyDeviceToDevice, stream));
    }
  }

  NvtxRange range("conveyor::weight_gradients");
  const bool acc = args.accumulate;
  const bool tf32 = options.allow_tf32;
  // With layer normalisation dx and dW take the gradients of x W^T before its norm.
  Workspace<C> dax_raw(layer_norm ? N * GH : 0, stream);
  Workspace<C> d_gamma_x(args.dgamma_x.present() ? N * GH : 0, stream);
  if (layer_norm) {
    layer_norm_backward<S>(N, GH, cache + z.cw - 2 * GH, z.cw, data_or_null<S>(args.gamma_x), dax.get(), GH, GH,
                           static_cast<const C*>(nullptr), 0, dax_raw.get(), d_gamma_x.get(), stream);
  }
  const C* d_input = layer_norm ? dax_raw.get() : dax.get();
  if (args.dx.present()) {
    Workspace<S> dx_packed(rows.in_place() ? 0 : N * z.I, stream);
    S* dx = rows.in_place() ? static_cast<S*>(args.dx.data) : dx_packed.get();
    gemm<C, S, S>(N, z.I, GH, rows_of<C>(d_input, GH), rows_of(W, z.I), false, dx, z.I, tf32, stream);
    if (!rows.in_place()) unpack_rows(rows, N, z.T * B, z.I, dx, static_cast<S*>(args.dx.data), stream);
  }
  if (args.dW.present()) {
    const PackedInput<S> x(rows, N, z.I, static_cast<const S*>(args.x.data), stream);
    gemm<C, S, S>(GH, z.I, N, transpose_of<C>(d_input, GH), rows_of(x.get(), z.I), acc,
                  static_cast<S*>(args.dW.data), z.I, tf32, stream);
  }
  if (args.dbW.present()) column_sums(N, GH, dax.get(), GH, acc, static_cast<S*>(args.dbW.data), stream);
  if (args.dP.present()) {
    const int64_t carried = (options.zoneout_cell > 0 ? 5 : 4) * H;  // c_{t-1} as the step received it
    peephole_grads(batch.steps, rows.on_device(), N, H, options.coupled_gates, dax.get(), GH, cache, z.cw, carried,
                   c0.get(), acc, static_cast<S*>(args.dP.data), stream);
  }
  if (args.dW_hr.present()) {
    projection_grad<S, kRelu>(N, H, P, dh_totals.get(), cache, z.cw, data_or_null<S>(args.gamma_c),
                              data_or_null<S>(args.beta_c), acc, tf32, static_cast<S*>(args.dW_hr.data), stream);
  }

  // dR[row0 : row0 + count] = sum over steps of da_t^T h_{t-1}, where da (leading dimension lda) holds the
  // gradients of those rows' pre-activations. Dense and unmasked, step 0 reads h0 and later steps read y: two
  // products; otherwise one over every step's (masked) h_{t-1} gathered in h_products.
  const bool gather_products = (masks.active() || rows.packed()) && args.dR.present();
  Workspace<C> h_products(gather_products ? N * P : 0, stream);
  if (gather_products) {
    const unsigned blocks = N * P / 256 + 1 < 4096 ? unsigned(N * P / 256 + 1) : 4096u;
    launch("previous_states_kernel", previous_states_kernel<S>, blocks, 256, 0, stream, batch.steps, rows.on_device(),
           N, P, options.variational, masks.all(), h0, y.get(), h_products.get());
  }
  // Into dR_out (S, or under DropConnect the gradient of R * M in C, which M then turns into dR), added to when
  // `add`.
  auto recurrent_weight_grad = [&](auto* dR_out, bool add, int64_t row0, int64_t count, const C* da, int64_t lda) {
    auto* out = dR_out + row0 * P;
    if (gather_products) {
      gemm(count, P, N, transpose_of(da, lda), rows_of<C>(h_products.get(), P), add, out, P, tf32, stream);
      return;
    }
    gemm(count, P, N - B, transpose_of(da + B * lda, lda), rows_of(y.get(), P), add, out, P, tf32, stream);
    if (args.h0.present()) gemm(count, P, B, transpose_of(da, lda), rows_of(h0, P), true, out, P, tf32, stream);
  };
  auto recurrent_weight_grads = [&](auto* dR_out, bool add) {
    if (layer_norm) {  // every block's product took the gradients of R h before its layer norm
      recurrent_weight_grad(dR_out, add, 0, GH, d_recurrent.get(), GH);
    } else if (!gru) {
      recurrent_weight_grad(dR_out, add, 0, GH, dax.get(), GH);
    } else {
      recurrent_weight_grad(dR_out, add, 0, 2 * H, dax.get(), GH);
      if (options.reset_after) {
        recurrent_weight_grad(dR_out, add, 2 * H, H, dar_n.get(), H);
      } else {
        // The n block's product read r * h_{t-1}, saved in the cache's fourth column block.
        gemm(H, H, N, transpose_of<C>(dax.get() + 2 * H, GH), rows_of(cache + 3 * H, z.cw), add, dR_out + 2 * H * H,
             H, tf32, stream);
      }
    }
  };
  if (args.dR.present() && options.weight_dropout > 0) {  // DropConnect: the products used R * M
    Workspace<C> dR_dropped(GH * P, stream);
    recurrent_weight_grads(dR_dropped.get(), false);
    dropped_weight_grads<S>(options, GH, P, dR_dropped.get(), acc, static_cast<S*>(args.dR.data), stream);
  } else if (args.dR.present()) {
    recurrent_weight_grads(static_cast<S*>(args.dR.data), acc);
  }
  const std::pair<const TensorView*, const C*> gain_grads[] = {{&args.dgamma_x, d_gamma_x.get()},
                                                               {&args.dgamma_h, d_gamma_h.get()},
                                                               {&args.dgamma_c, d_gamma_c.get()},
                                                               {&args.dbeta_c, d_beta_c.get()}};
  for (int k = 0; k < 4; ++k) {  // the gains' gradients: sums over the rows' parts
    if (!gain_grads[k].first->present()) continue;
    const int64_t width = k < 2 ? GH : H;
    column_sums(N, width, gain_grads[k].second, width, acc, static_cast<S*>(gain_grads[k].first->data), stream);
  }
  if (args.dbR.present()) {
    S* dbR = static_cast<S*>(args.dbR.data);
    if (reset_after_gru) {
      column_sums(N, 2 * H, dax.get(), GH, acc, dbR, stream);
      column_sums(N, H, dar_n.get(), H, acc, dbR + 2 * H, stream);
    } else {
      column_sums(N, GH, dax.get(), GH, acc, dbR, stream);
    }
  }
}

template <typename S>
void run_window(const CellOptions& options, const WindowSizes& sizes, const ForwardArgs& args, cudaStream_t stream) {
  if (options.activation == Activation::relu) {
    forward_window<S, true>(options, sizes, args, stream);
  } else {
    forward_window<S, false>(options, sizes, args, stream);
  }
}

template <typename S>
void run_window(const CellOptions& options, const WindowSizes& sizes, const BackwardArgs& args, cudaStream_t stream) {
  if (options.activation == Activation::relu) {
    backward_window<S, true>(options, sizes, args, stream);
  } else {
    backward_window<S, false>(options, sizes, args, stream);
  }
}

// Runs the window in the storage type of x, on x's device (api.cpp opens the operation's NVTX range).
template <typename Args>
void run_on_device(const CellOptions& options, const WindowSizes& sizes, const Args& args,
                   void* stream_handle) {
  if (blocks_for(sizes.batch, kStepRows) > 65535) {
    throw ArgumentError("x: B = " + std::to_string(sizes.batch) + " batch rows exceed the CUDA backend's limit of " +
                        std::to_string(65535 * kStepRows));
  }
  const DeviceGuard guard(args.x.device.index);
  keep_pool_memory_between_calls(args.x.device.index);
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (args.x.dtype) {
    case DType::float32: return run_window<float>(options, sizes, args, stream);
    case DType::float64: return run_window<double>(options, sizes, args, stream);
    case DType::float16: return run_window<__half>(options, sizes, args, stream);
    case DType::bfloat16: return run_window<bfloat16>(options, sizes, args, stream);
    case DType::int32:
    case DType::int64: break;  // refused by api.cpp: x is floating-point
  }
  throw DTypeError("x: unknown dtype " + std::to_string(static_cast<int>(args.x.dtype)));
}

}  // namespace conveyor::cuda

namespace conveyor::detail {

void cuda_forward(const CellOptions& options, const WindowSizes& sizes, const ForwardArgs& args, void* stream) {
  cuda::run_on_device(options, sizes, args, stream);
}

void cuda_backward(const CellOptions& options, const WindowSizes& sizes, const BackwardArgs& args, void* stream) {
  cuda::run_on_device(options, sizes, args, stream);
}

void cuda_dropout_mask(double p, bool variational, uint64_t seed, uint64_t mask_stream, const TensorView& out,
                       void* stream) {
  const cuda::DeviceGuard guard(out.device.index);
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t T = out.shape[0], B = out.shape[1], H = out.shape[2];
  switch (out.dtype) {
    case DType::float32:
      return cuda::dropout_mask(T, B, H, p, variational, seed, mask_stream, static_cast<float*>(out.data), s);
    case DType::float64:
      return cuda::dropout_mask(T, B, H, p, variational, seed, mask_stream, static_cast<double*>(out.data), s);
    case DType::float16:
      return cuda::dropout_mask(T, B, H, p, variational, seed, mask_stream, static_cast<__half*>(out.data), s);
    case DType::bfloat16:
      return cuda::dropout_mask(T, B, H, p, variational, seed, mask_stream, static_cast<cuda::bfloat16*>(out.data),
                                s);
    case DType::int32:
    case DType::int64: break;  // refused by api.cpp: a mask is floating-point
  }
  throw DTypeError("out: unknown dtype " + std::to_string(static_cast<int>(out.dtype)));
}

}  // namespace conveyor::detail
