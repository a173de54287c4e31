// The persistent kernels: a window's recurrence in one cooperative launch (contract: persistent.cuh).
//
// Block b owns hidden units [b U, (b + 1) U). Forward, it loads once the G U rows of R that produce them
// (every gate of each unit) into shared memory; at each step it forms, for 16 batch rows at a time, the
// recurrent products of its units from h_{t-1} (read from global memory, where every block wrote its units
// of it the step before), applies the cell math of step.cuh to them (the very epilogue of the per-step
// kernels), writes its units of h_t, and waits at the grid barrier. Backward mirrors it over R's columns: the
// block keeps column j of every row for its units, and each step forms da_{t+1} R for them.
//
// The products run in the compute type with FMAs: threads split the outputs of a tile, and where a tile has
// fewer outputs than threads, the K dimension too, summing the parts in a fixed order (results never depend on
// the schedule: two runs agree bit for bit). Kernels end in _kernel; the launchers follow them.
#include "persistent.cuh"

#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "ptx.cuh"

namespace conveyor::cuda {

constexpr int kPersistentThreads = 256;
constexpr int kPersistentRows = 16;        // batch rows per pass
constexpr int kPersistentK = 32;           // K slice of a pass's input tile
constexpr int kPersistentMaxColumns = 64;  // gates x units of one pass: at most 4 x 16
constexpr int kPersistentUnitChoices[] = {4, 8, 16};

// float16 and bfloat16 forward products run on tensor cores (mma.sync m16n8k16, float accumulation): h_{t-1}
// is stored in that type already, so its operand loses nothing; the rest run in FMAs of the compute type.
template <typename S>
constexpr bool kTensorCoreForward = std::is_same_v<S, __half> || std::is_same_v<S, bfloat16>;

// The slices' row lengths. Forward: H rounded up to the MMA's K of 16 (zeros past H), so that an MMA's K step
// never leaves a row, plus a pad that staggers the rows across the 32 shared-memory banks: the threads (or
// MMA lanes) of a warp read the same k of different rows at once, and rows a multiple of 128 bytes apart would
// all fall in one bank (measured on an H200: float32 at H = 768 ran 16 ways serialised). An odd number of
// words for 4- and 8-byte types; for 16-bit ones 4 words past a multiple of 32 (even, for the 32-bit pairs
// the MMA reads), which puts the 8 rows of a B fragment in distinct banks. Backward: the G H rows of R plus
// one word's worth, for the same reason.
template <typename S>
__host__ __device__ inline int64_t forward_slice_ld(int64_t hidden) {
  return (hidden + 15) / 16 * 16 + (sizeof(S) == 2 ? 8 : 1);
}
template <typename S>
__host__ __device__ inline int64_t backward_slice_ld(int64_t rows) {
  return rows + (sizeof(S) == 2 ? 2 : 1);
}

template <typename C>
constexpr size_t persistent_static_shared_bytes() {
  return sizeof(C) *
         (kPersistentRows * (kPersistentK + 1) + kPersistentThreads + kPersistentRows * kPersistentMaxColumns);
}

// The block's shared work areas.
template <typename C>
struct PassTiles {
  C (&a)[kPersistentRows][kPersistentK + 1];
  C (&partial)[kPersistentThreads];
  C (&product)[kPersistentRows][kPersistentMaxColumns];
};

// product[r][c] = sum over k < K of a(r, k) weights[c * weights_ld + k], for r < 16 and c < columns, where
// load_a(r, k) reads a (zero for rows past the batch). Every thread of the block calls it.
template <typename C, typename W, typename LoadA>
__device__ void tile_product(int columns, int64_t K, const LoadA& load_a, const W* weights, int64_t weights_ld,
                             const PassTiles<C>& tiles) {
  const int tid = threadIdx.x;
  const int outputs = kPersistentRows * columns;
  const int groups = outputs >= kPersistentThreads ? 1 : kPersistentThreads / outputs;
  const int group = groups > 1 ? tid / outputs : 0;
  C acc[kPersistentRows * kPersistentMaxColumns / kPersistentThreads] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kPersistentK) {
    for (int e = tid; e < kPersistentRows * kPersistentK; e += kPersistentThreads) {
      const int r = e / kPersistentK, kk = e % kPersistentK;
      tiles.a[r][kk] = k0 + kk < K ? load_a(r, k0 + kk) : C(0);
    }
    __syncthreads();
    const int k_end = int(K - k0 < kPersistentK ? K - k0 : kPersistentK);
    if (groups > 1) {
      if (group < groups) {
        const int o = tid % outputs, r = o / columns, c = o % columns;
        const W* w = weights + c * weights_ld + k0;
        for (int kk = group; kk < k_end; kk += groups) acc[0] += tiles.a[r][kk] * convert<C>(w[kk]);
      }
    } else {
      for (int i = 0; i * kPersistentThreads + tid < outputs; ++i) {
        const int o = i * kPersistentThreads + tid, r = o / columns, c = o % columns;
        const W* w = weights + c * weights_ld + k0;
        for (int kk = 0; kk < k_end; ++kk) acc[i] += tiles.a[r][kk] * convert<C>(w[kk]);
      }
    }
    __syncthreads();
  }
  if (groups > 1) {
    tiles.partial[tid] = group < groups ? acc[0] : C(0);
    __syncthreads();
    if (tid < outputs) {
      C sum = tiles.partial[tid];
      for (int g = 1; g < groups; ++g) sum += tiles.partial[g * outputs + tid];
      tiles.product[tid / columns][tid % columns] = sum;
    }
  } else {
    for (int i = 0; i * kPersistentThreads + tid < outputs; ++i) {
      const int o = i * kPersistentThreads + tid;
      tiles.product[o / columns][o % columns] = acc[i];
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------------------
// Forward

// One product and epilogue over every batch row for the block's units: the product of gate blocks
// [gate_first, gate_first + gates) over p.h_in (of type Input, masked by p.mask), then kEpilogue.
// The same on tensor cores, for 16-bit S and an input of type S: the block stages 16 rows of h_{t-1} (masked,
// rounded to S as the per-step kernels' inputs are not: they multiply the mask in float) in h_stage; warp w
// takes the n8 tile w % n_tiles of the gate-unit columns and every (8 / n_tiles)-th K step of 16; the warps'
// partial tiles meet in tiles.product, and each unit's thread adds them in a fixed order.
template <typename S, ForwardEpilogue kEpilogue, bool kRelu>
__device__ void forward_pass_tensor_cores(const ForwardStep<S>& p, int units, int64_t j0, const S* r_slice, int64_t ld,
                                          S* h_stage, int gate_first, int gates, const PassTiles<float>& tiles) {
  const int64_t B = p.batch, H = p.hidden;
  const S* h_in = static_cast<const S*>(p.h_in);
  const int columns = gates * units, n_tiles = (columns + 7) / 8;
  const int warps_per_tile = 8 / n_tiles, k_steps = int(ld / 16);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const S* weights = r_slice + int64_t(gate_first) * units * ld;
  const S zero = convert<S>(0.0f);
  // A 32-bit register of two consecutive 16-bit elements (their pairs start at even, 4-byte aligned offsets).
  auto pair = [](const S* at) { return *reinterpret_cast<const uint32_t*>(at); };
  for (int64_t b0 = 0; b0 < B; b0 += kPersistentRows) {
    for (int64_t e = tid; e < kPersistentRows * ld; e += kPersistentThreads) {
      const int64_t r = e / ld, k = e % ld, b = b0 + r;
      S v = zero;
      if (b < B && k < H) {
        v = p.mask != nullptr ? convert<S>(convert<float>(h_in[b * H + k]) * p.mask[b * H + k]) : h_in[b * H + k];
      }
      h_stage[e] = v;
    }
    __syncthreads();
    if (warp < n_tiles * warps_per_tile) {
      const int n_tile = warp % n_tiles, part = warp / n_tiles;
      const int column = n_tile * 8 + g;  // the B fragment's n of this lane
      const S* w = weights + int64_t(column < columns ? column : 0) * ld;
      float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int step = part; step < k_steps; step += warps_per_tile) {
        const int64_t k0 = int64_t(step) * 16;
        const uint32_t a[4] = {pair(h_stage + g * ld + k0 + 2 * t), pair(h_stage + (g + 8) * ld + k0 + 2 * t),
                               pair(h_stage + g * ld + k0 + 8 + 2 * t), pair(h_stage + (g + 8) * ld + k0 + 8 + 2 * t)};
        const uint32_t b[2] = {column < columns ? pair(w + k0 + 2 * t) : 0u,
                               column < columns ? pair(w + k0 + 8 + 2 * t) : 0u};
        ptx::mma_m16n8k16<S>(d, a, b, d);
      }
      // d0, d1: (row g, columns 2t, 2t + 1) of the tile; d2, d3: row g + 8.
      float* out = &tiles.product[0][0] + (part * n_tiles + n_tile) * 128;
      out[g * 8 + 2 * t] = d[0];
      out[g * 8 + 2 * t + 1] = d[1];
      out[(g + 8) * 8 + 2 * t] = d[2];
      out[(g + 8) * 8 + 2 * t + 1] = d[3];
    }
    __syncthreads();
    if (tid < kPersistentRows * units) {
      const int r = tid / units, u = tid % units;
      const int64_t b = b0 + r, j = j0 + u;
      if (b < B && j < H) {
        float product[4];
        for (int gate = 0; gate < gates; ++gate) {
          const int c = gate * units + u;
          float sum = 0.0f;
          for (int part = 0; part < warps_per_tile; ++part) {
            sum += (&tiles.product[0][0])[(part * n_tiles + c / 8) * 128 + r * 8 + c % 8];
          }
          product[gate] = sum;
        }
        forward_epilogue<S, kEpilogue, kRelu>(p, b, j, product);
      }
    }
    __syncthreads();
  }
}

template <typename S, ForwardEpilogue kEpilogue, bool kRelu, typename Input>
__device__ void forward_pass(const ForwardStep<S>& p, int units, int64_t j0, const S* r_slice, int64_t ld,
                             S* h_stage, int gate_first, int gates, const PassTiles<Compute<S>>& tiles) {
  using C = Compute<S>;
  if constexpr (kTensorCoreForward<S> && std::is_same_v<Input, S>) {
    return forward_pass_tensor_cores<S, kEpilogue, kRelu>(p, units, j0, r_slice, ld, h_stage, gate_first, gates,
                                                          tiles);
  }
  const int64_t B = p.batch, H = p.hidden;
  const Input* h_in = static_cast<const Input*>(p.h_in);
  for (int64_t b0 = 0; b0 < B; b0 += kPersistentRows) {
    auto load_h = [&](int r, int64_t k) {
      const int64_t b = b0 + r;
      if (b >= B) return C(0);
      return convert<C>(h_in[b * H + k]) * (p.mask != nullptr ? p.mask[b * H + k] : C(1));
    };
    tile_product(gates * units, H, load_h, r_slice + int64_t(gate_first) * units * ld, ld, tiles);
    if (int(threadIdx.x) < kPersistentRows * units) {
      const int r = threadIdx.x / units, u = threadIdx.x % units;
      const int64_t b = b0 + r, j = j0 + u;
      if (b < B && j < H) {
        C product[4];
        for (int g = 0; g < gates; ++g) product[g] = tiles.product[r][g * units + u];
        forward_epilogue<S, kEpilogue, kRelu>(p, b, j, product);
      }
    }
    __syncthreads();
  }
}

template <typename S, ForwardEpilogue kEpilogue, bool kRelu>
__global__ void __launch_bounds__(kPersistentThreads) forward_persistent_kernel(ForwardWindow<S> w, int units) {
  using C = Compute<S>;
  constexpr bool kResetBefore = kEpilogue == ForwardEpilogue::gru_reset_before_gates;
  constexpr int kGates = kResetBefore ? 3 : product_gates(kEpilogue);
  CONVEYOR_SHARED(C, a_tile, [kPersistentRows][kPersistentK + 1]);
  CONVEYOR_SHARED(C, partial, [kPersistentThreads]);
  CONVEYOR_SHARED(C, product, [kPersistentRows][kPersistentMaxColumns]);
  CONVEYOR_DYNAMIC_SHARED(S, r_slice);  // (gate g, unit u, k) at (g * units + u) * ld + k; then h_stage
  const PassTiles<C> tiles{a_tile, partial, product};
  const int64_t H = w.base.hidden, ld = forward_slice_ld<S>(H), j0 = int64_t(blockIdx.x) * units;
  S* h_stage = r_slice + kGates * units * ld;  // [16][ld], tensor-core passes only
  for (int64_t e = threadIdx.x; e < kGates * units * ld; e += kPersistentThreads) {
    const int64_t k = e % ld, u = e / ld % units, g = e / (ld * units), j = j0 + u;
    r_slice[e] = j < H && k < H ? w.base.R[(g * H + j) * H + k] : convert<S>(0.0f);
  }
  __syncthreads();
  const cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int64_t t = 0; t < w.steps; ++t) {
    ForwardStep<S> p = w.step(t);
    if constexpr (kResetBefore) {
      forward_pass<S, ForwardEpilogue::gru_reset_before_gates, kRelu, S>(p, units, j0, r_slice, ld, h_stage, 0, 2,
                                                                         tiles);
      grid.sync();  // every unit's r * h_{t-1} before the n block's product reads them
      ForwardWindow<S>::to_output_phase(p);
      forward_pass<S, ForwardEpilogue::gru_reset_before_output, kRelu, C>(p, units, j0, r_slice, ld, h_stage, 2, 1,
                                                                          tiles);
    } else {
      forward_pass<S, kEpilogue, kRelu, S>(p, units, j0, r_slice, ld, h_stage, 0, kGates, tiles);
    }
    grid.sync();  // every unit of h_t before the next step reads it
  }
}

template <typename S, bool kRelu>
using ForwardPersistentKernel = void (*)(ForwardWindow<S>, int);

template <typename S, bool kRelu>
ForwardPersistentKernel<S, kRelu> forward_persistent_kernel_for(const CellOptions& options) {
  switch (options.cell) {
    case CellType::lstm:
      if (options.coupled_gates) return forward_persistent_kernel<S, ForwardEpilogue::lstm_coupled, kRelu>;
      return forward_persistent_kernel<S, ForwardEpilogue::lstm, kRelu>;
    case CellType::gru:
      if (options.reset_after) return forward_persistent_kernel<S, ForwardEpilogue::gru_reset_after, kRelu>;
      return forward_persistent_kernel<S, ForwardEpilogue::gru_reset_before_gates, kRelu>;
    case CellType::rnn:
      break;
  }
  return forward_persistent_kernel<S, ForwardEpilogue::rnn, kRelu>;
}

// ---------------------------------------------------------------------------------------------------------
// Backward

// The product P[b, j] = sum_{k < K} A(b, k) R[R_row0 + k, j] (BackwardStep) over every batch row for the
// block's units, then kEpilogue.
template <typename S, BackwardEpilogue kEpilogue, bool kRelu>
__device__ void backward_pass(const BackwardStep<S>& p, int units, int64_t j0, const S* r_columns,
                              const PassTiles<Compute<S>>& tiles) {
  using C = Compute<S>;
  const int64_t B = p.batch, H = p.hidden;
  for (int64_t b0 = 0; b0 < B; b0 += kPersistentRows) {
    auto load_a = [&](int r, int64_t k) {
      const int64_t b = b0 + r;
      if (b >= p.product_batch) return C(0);
      return k < p.K_first ? p.a_first[b * p.a_first_ld + k] : p.a_second[b * p.a_second_ld + (k - p.K_first)];
    };
    tile_product(units, p.K, load_a, r_columns + p.R_row0, backward_slice_ld<S>(p.gate_stride), tiles);
    if (int(threadIdx.x) < kPersistentRows * units) {
      const int r = threadIdx.x / units, u = threadIdx.x % units;
      const int64_t b = b0 + r, j = j0 + u;
      if (b < B && j < H) backward_epilogue<S, kEpilogue, kRelu>(p, b, j, tiles.product[r][u]);
    }
    __syncthreads();
  }
}

template <typename S, BackwardEpilogue kEpilogue, bool kRelu>
__global__ void __launch_bounds__(kPersistentThreads)
    backward_persistent_kernel(BackwardWindow<S> w, int units, S* dh0) {
  using C = Compute<S>;
  constexpr bool kResetBefore = kEpilogue == BackwardEpilogue::gru_reset_before_update;
  CONVEYOR_SHARED(C, a_tile, [kPersistentRows][kPersistentK + 1]);
  CONVEYOR_SHARED(C, partial, [kPersistentThreads]);
  CONVEYOR_SHARED(C, product, [kPersistentRows][kPersistentMaxColumns]);
  CONVEYOR_DYNAMIC_SHARED(S, r_columns);  // (unit u, row k of R) at u * ld + k
  const PassTiles<C> tiles{a_tile, partial, product};
  const int64_t H = w.base.hidden, rows = w.base.gate_stride, ld = backward_slice_ld<S>(rows);
  const int64_t j0 = int64_t(blockIdx.x) * units;
  for (int64_t e = threadIdx.x; e < units * ld; e += kPersistentThreads) {
    const int64_t k = e % ld, u = e / ld, j = j0 + u;
    r_columns[e] = j < H && k < rows ? w.base.R[k * H + j] : convert<S>(0.0f);
  }
  __syncthreads();
  const cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int64_t t = w.steps - 1; t >= 0; --t) {
    BackwardStep<S> p = w.step(t);
    backward_pass<S, kEpilogue, kRelu>(p, units, j0, r_columns, tiles);
    if constexpr (kResetBefore) {
      grid.sync();  // every unit's dax_n of step t before d(r * h_{t-1}) = dax_n R_n reads them
      BackwardWindow<S>::to_reset_phase(p);
      backward_pass<S, BackwardEpilogue::gru_reset_before_reset, kRelu>(p, units, j0, r_columns, tiles);
    }
    grid.sync();  // step t's gradients before step t - 1's product reads them
  }
  if (dh0 != nullptr) {
    backward_pass<S, BackwardEpilogue::initial_state, kRelu>(w.initial_state(dh0), units, j0, r_columns, tiles);
  }
}

template <typename S, bool kRelu>
using BackwardPersistentKernel = void (*)(BackwardWindow<S>, int, S*);

template <typename S, bool kRelu>
BackwardPersistentKernel<S, kRelu> backward_persistent_kernel_for(const CellOptions& options) {
  switch (options.cell) {
    case CellType::lstm:
      return backward_persistent_kernel<S, BackwardEpilogue::lstm, kRelu>;
    case CellType::gru:
      if (options.reset_after) return backward_persistent_kernel<S, BackwardEpilogue::gru_reset_after, kRelu>;
      return backward_persistent_kernel<S, BackwardEpilogue::gru_reset_before_update, kRelu>;
    case CellType::rnn:
      break;
  }
  return backward_persistent_kernel<S, BackwardEpilogue::rnn, kRelu>;
}

// ---------------------------------------------------------------------------------------------------------
// Plans and launchers

// The fewest units per block (the most blocks) whose slices fit in a block's shared memory and whose blocks
// the device holds at once; a slice is `bytes_per_unit` for each unit.
template <typename C>
PersistentPlan plan_for(const void* kernel, int64_t hidden, size_t bytes_per_unit, size_t bytes_per_block) {
  int device = 0, multiprocessors = 0, shared_optin = 0;
  CONVEYOR_CUDA_CHECK(cudaGetDevice(&device));
  CONVEYOR_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  CONVEYOR_CUDA_CHECK(cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t static_bytes = persistent_static_shared_bytes<C>();
  PersistentPlan plan;
  for (const int units : kPersistentUnitChoices) {
    const size_t bytes = bytes_per_unit * size_t(units) + bytes_per_block;
    const unsigned blocks = blocks_for(hidden, units);
    if (bytes + static_bytes > size_t(shared_optin)) {
      plan.why = "a block's slice of R for " + std::to_string(units) + " units takes " + std::to_string(bytes) +
                 " bytes of shared memory, more than the " + std::to_string(size_t(shared_optin) - static_bytes) +
                 " a block may use on this device";
      break;
    }
    CONVEYOR_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    int per_multiprocessor = 0;
    CONVEYOR_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel, kPersistentThreads, bytes));
    const int64_t resident = int64_t(per_multiprocessor) * multiprocessors;
    if (int64_t(blocks) <= resident) {
      plan.fits = true;
      plan.units = units;
      plan.blocks = blocks;
      plan.shared_bytes = bytes;
      plan.why.clear();
      return plan;
    }
    plan.why = std::to_string(blocks) + " blocks of " + std::to_string(units) + " units must be resident at once, " +
               "and the device holds " + std::to_string(resident);
  }
  return plan;
}

// Why the kernels cannot run a window whatever the device (persistent.cuh), or null when they can: a projection,
// or layer normalisation, whose row statistics span every block's units.
const char* per_step_only(const CellOptions& options, bool projection) {
  if (projection) return "a projection (W_hr) runs on the per-step kernels";
  if (options.layer_norm) return "layer normalisation (layer_norm) runs on the per-step kernels";
  return nullptr;
}

PersistentPlan refused_plan(const char* why) {
  PersistentPlan plan;
  plan.why = why;
  return plan;
}

template <typename S, bool kRelu>
PersistentPlan persistent_forward_plan(const CellOptions& options, int64_t hidden, bool projection) {
  if (const char* why = per_step_only(options, projection)) return refused_plan(why);
  const void* kernel = reinterpret_cast<const void*>(forward_persistent_kernel_for<S, kRelu>(options));
  const size_t ld = size_t(forward_slice_ld<S>(hidden));
  const size_t h_stage = kTensorCoreForward<S> ? sizeof(S) * kPersistentRows * ld : 0;
  return plan_for<Compute<S>>(kernel, hidden, sizeof(S) * size_t(gate_count(options)) * ld, h_stage);
}

template <typename S, bool kRelu>
PersistentPlan persistent_backward_plan(const CellOptions& options, int64_t hidden, bool projection) {
  if (const char* why = per_step_only(options, projection)) return refused_plan(why);
  const void* kernel = reinterpret_cast<const void*>(backward_persistent_kernel_for<S, kRelu>(options));
  const size_t ld = size_t(backward_slice_ld<S>(int64_t(gate_count(options)) * hidden));
  return plan_for<Compute<S>>(kernel, hidden, sizeof(S) * ld, 0);
}

template <typename S, bool kRelu>
void forward_persistent(const CellOptions& options, const PersistentPlan& plan, const ForwardWindow<S>& window,
                        cudaStream_t stream) {
  const auto kernel = forward_persistent_kernel_for<S, kRelu>(options);
  CONVEYOR_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.shared_bytes)));
  launch_cooperative("forward_persistent_kernel", kernel, plan.blocks, kPersistentThreads, plan.shared_bytes, stream,
                     window, plan.units);
}

template <typename S, bool kRelu>
void backward_persistent(const CellOptions& options, const PersistentPlan& plan, const BackwardWindow<S>& window,
                         S* dh0, cudaStream_t stream) {
  const auto kernel = backward_persistent_kernel_for<S, kRelu>(options);
  CONVEYOR_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.shared_bytes)));
  launch_cooperative("backward_persistent_kernel", kernel, plan.blocks, kPersistentThreads, plan.shared_bytes, stream,
                     window, plan.units, dh0);
}

#define CONVEYOR_INSTANTIATE_PERSISTENT(S, RELU)                                                                   \
  template PersistentPlan persistent_forward_plan<S, RELU>(const CellOptions&, int64_t, bool);                    \
  template PersistentPlan persistent_backward_plan<S, RELU>(const CellOptions&, int64_t, bool);                   \
  template void forward_persistent<S, RELU>(const CellOptions&, const PersistentPlan&, const ForwardWindow<S>&,   \
                                            cudaStream_t);                                                         \
  template void backward_persistent<S, RELU>(const CellOptions&, const PersistentPlan&, const BackwardWindow<S>&, \
                                             S*, cudaStream_t);

CONVEYOR_INSTANTIATE_PERSISTENT(float, false)
CONVEYOR_INSTANTIATE_PERSISTENT(float, true)
CONVEYOR_INSTANTIATE_PERSISTENT(double, false)
CONVEYOR_INSTANTIATE_PERSISTENT(double, true)
CONVEYOR_INSTANTIATE_PERSISTENT(__half, false)
CONVEYOR_INSTANTIATE_PERSISTENT(__half, true)
CONVEYOR_INSTANTIATE_PERSISTENT(bfloat16, false)
CONVEYOR_INSTANTIATE_PERSISTENT(bfloat16, true)

}  // namespace conveyor::cuda
