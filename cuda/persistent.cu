// The persistent kernels: a window's recurrence in one cooperative launch (contract: persistent.cuh).
//
// Block b owns hidden units [b U, (b + 1) U). Forward, it loads once the G U rows of R that produce them
// (every gate of each unit) into shared memory; at each step it stages h_{t-1} for 16 batch rows at a time
// (read from global memory, where every block wrote its units of it the step before), forms its units'
// recurrent products, applies the cell math of step.cuh to them (the very epilogue of the per-step kernels),
// writes its units of h_t, and waits at the grid barrier. Backward mirrors it over R's columns: the block keeps
// column j of every row for its units, and each step forms da_{t+1} R for them, staging da_{t+1} in slices.
//
// The products run on tensor cores (mma.sync, float accumulation) for the 16-bit types and for float32 with
// allow_tf32 (tensor_core_forward, tensor_core_backward), else in the compute type with FMAs, register-blocked:
// a warp owns an 8-row x 4-column tile of outputs, each lane sums a share of K for all 32 of them (a 16-byte
// chunk of each operand row per k step, so that 12 vector shared loads feed 32 V FMAs), and the lanes' sums
// meet in a butterfly of shuffles that leaves each lane one output. Where a product has fewer tiles than the
// block has warps, warps split K as well and add their parts in a fixed order: results never depend on the
// schedule, and two runs agree bit for bit. Layer normalisation adds passes and grid barriers to a step, the
// blocks combining their parts of each row's statistics between them ("Layer normalisation" below). Kernels end
// in _kernel; the launchers follow them.
#include "persistent.cuh"

#include <cooperative_groups.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "layer_norm.cuh"
#include "ptx.cuh"

namespace conveyor::cuda {

constexpr int kPersistentThreads = 256;
constexpr int kPersistentWarps = kPersistentThreads / 32;
constexpr int kPersistentRows = 16;        // batch rows per pass
constexpr int kPersistentMaxColumns = 64;  // gates x units of one pass: at most 4 x 16
constexpr int kPersistentUnitChoices[] = {4, 8, 16};
constexpr int kTileRows = 8, kTileColumns = 4, kTileOutputs = kTileRows * kTileColumns;  // a warp's tile
constexpr size_t kBackwardStageBytes = 32 * 1024;  // the backward's slice of da_{t+1}: 16 rows

// Elements of the compute type C in one 16-byte shared load: a lane's share of K per step of its loop.
template <typename C>
constexpr int kChunk = int(16 / sizeof(C));

// Whether the forward's products over h_{t-1} run on tensor cores, with float accumulation: for float16 and
// bfloat16 (mma.sync m16n8k16; h_{t-1} is stored in that type already, so its operand loses nothing), and for
// float32 with allow_tf32 (m16n8k8, both operands rounded to TF32). The rest run in FMAs of the compute type.
template <typename S>
__host__ __device__ constexpr bool tensor_core_forward(bool tf32) {
  return std::is_same_v<S, __half> || std::is_same_v<S, bfloat16> || (tf32 && std::is_same_v<S, float>);
}

// K of one tensor-core product: 16 for the 16-bit types, 8 in TF32.
template <typename S>
constexpr int kMmaK = sizeof(S) == 2 ? 16 : 8;

// K padded to 16: the products' operand rows (h_{t-1}, and each gate block of da_{t+1} and of R's columns)
// hold zeros from H on, so that the vector loads and MMA K steps never leave them and every row starts
// 16-byte aligned.
__host__ __device__ inline int padded_hidden(int64_t hidden) { return int((hidden + 15) / 16 * 16); }

// Elements of T that the rows of a shared operand add past their data: 16 bytes for the types whose products
// may run on tensor cores, a stagger across the 32 shared-memory banks, since the 8 lanes of an MMA fragment
// that share a column read the same k of 8 rows, and rows a multiple of 128 bytes apart would fall in one bank
// (measured on an H200: float32 at H = 768 ran 16 ways serialised in an earlier version that read it so). The
// FMA products read one row per warp-wide load and need none: float64 has no tensor-core path.
template <typename T>
__host__ __device__ constexpr int bank_stagger() {
  return sizeof(T) == 8 ? 0 : 16 / int(sizeof(T));
}

// The forward slice's row length.
template <typename S>
__host__ __device__ inline int forward_slice_ld(int64_t hidden) {
  return padded_hidden(hidden) + bank_stagger<S>();
}

// Columns of the backward's stage of da_{t+1}: a slice of at most kBackwardStageBytes, or all of the padded
// gate blocks when they take less.
template <typename C>
__host__ __device__ inline int backward_stage_width(int gates, int64_t hidden) {
  const int most = int(kBackwardStageBytes / (kPersistentRows * sizeof(C)));
  const int all = gates * padded_hidden(hidden);
  return all < most ? all : most;
}

// Whether the backward's products run on tensor cores, m16n8k8 in TF32 with float accumulation: for float16
// and bfloat16, whose R every TF32 value holds exactly (da_{t+1}, in float, rounds to TF32: finer than the
// storage type), and for float32 with allow_tf32. The rest run in FMAs of the compute type.
template <typename S>
__host__ __device__ constexpr bool tensor_core_backward(bool tf32) {
  return sizeof(S) == 2 || (tf32 && std::is_same_v<S, float>);
}

// Row lengths of the backward's stage of da_{t+1} (in the compute type C) and of the block's columns of R (in
// S).
template <typename C>
__host__ __device__ inline int backward_stage_ld(int width) {
  return width + bank_stagger<C>();
}
template <typename S>
__host__ __device__ inline int backward_columns_ld(int gates, int64_t hidden) {
  return gates * padded_hidden(hidden) + bank_stagger<S>();
}

template <typename C>
constexpr size_t persistent_static_shared_bytes() {
  return sizeof(C) * (kPersistentThreads + kPersistentRows * kPersistentMaxColumns);
}

// The block's shared work areas besides the slice of R: the warps' parts of a split product, and the product.
template <typename C>
struct PassTiles {
  C (&partial)[kPersistentThreads];
  C (&product)[kPersistentRows][kPersistentMaxColumns];
};

// V consecutive elements at `at` (16-byte aligned for 4-byte types and wider, 8-byte for 16-bit ones), as C.
template <typename T, int V>
struct alignas(sizeof(T) * V) Chunk {
  T v[V];
};
template <typename C, typename T>
__device__ __forceinline__ void load_chunk(const T* at, C (&out)[kChunk<C>]) {
  const Chunk<T, kChunk<C>> chunk = *reinterpret_cast<const Chunk<T, kChunk<C>>*>(at);
#pragma unroll
  for (int i = 0; i < kChunk<C>; ++i) out[i] = convert<C>(chunk.v[i]);
}

// acc = 0. (Written out: `= {}` on the array compiled to a loop of stores, which put it in local memory.)
template <typename C>
__device__ __forceinline__ void clear_tile(C (&acc)[kTileOutputs]) {
#pragma unroll
  for (int i = 0; i < kTileOutputs; ++i) acc[i] = C(0);
}

// acc[r * 4 + c] += sum over the chunks first, first + stride, ... < chunks of a[r * a_ld + k] w[c * w_ld + k]
// (k over the chunk's V elements), for the tile's 8 rows of a and 4 rows of w.
template <typename C, typename W>
__device__ __forceinline__ void accumulate_tile(C (&acc)[kTileOutputs], const C* a, int a_ld, const W* w, int w_ld,
                                                int first, int stride, int chunks) {
  constexpr int V = kChunk<C>;
  for (int chunk = first; chunk < chunks; chunk += stride) {
    C x[kTileRows][V], y[kTileColumns][V];
#pragma unroll
    for (int r = 0; r < kTileRows; ++r) load_chunk(a + r * a_ld + chunk * V, x[r]);
#pragma unroll
    for (int c = 0; c < kTileColumns; ++c) load_chunk(w + c * w_ld + chunk * V, y[c]);
#pragma unroll
    for (int v = 0; v < V; ++v) {
#pragma unroll
      for (int r = 0; r < kTileRows; ++r) {
#pragma unroll
        for (int c = 0; c < kTileColumns; ++c) acc[r * kTileColumns + c] += x[r][v] * y[c][v];
      }
    }
  }
}

// The sums of acc over the warp's 32 lanes, one to a lane: lane L returns output L's (recursive halving: at
// each round, kHalf, a lane keeps the half of its values its side of the pair owns and adds the partner's copy).
// The rounds recurse rather than loop: nvcc would not unroll a loop over them, and acc went to local memory.
template <int kHalf, typename C>
__device__ __forceinline__ C reduce_tile(C (&acc)[kTileOutputs]) {
  const bool upper = (threadIdx.x & kHalf) != 0;
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const C send = upper ? acc[i] : acc[i + kHalf];
    const C keep = upper ? acc[i + kHalf] : acc[i];
    acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, kHalf);
  }
  if constexpr (kHalf > 1) {
    return reduce_tile<kHalf / 2>(acc);
  } else {
    return acc[0];
  }
}

// How a product of 16 rows x `columns` outputs spreads over the warps: tile i covers rows 8 (i % 2) + [0, 8)
// and columns 4 (i / 2) + [0, 4); with fewer tiles than warps, `parts` warps share each tile's K.
struct TileWork {
  int tiles, parts;
  __device__ explicit TileWork(int columns)
      : tiles(kPersistentRows / kTileRows * (columns / kTileColumns)),
        parts(tiles >= kPersistentWarps ? 1 : kPersistentWarps / tiles) {}
  __device__ static int row(int tile) { return tile % (kPersistentRows / kTileRows) * kTileRows; }
  __device__ static int column(int tile) { return tile / (kPersistentRows / kTileRows) * kTileColumns; }
};

// Where a warp's reduced tile goes: straight into the product, or into its part's place for combine_parts.
template <typename C>
__device__ __forceinline__ void store_tile(const TileWork& work, int tile, int part, C sum, const PassTiles<C>& tiles) {
  const int lane = threadIdx.x % 32;
  if (work.parts == 1) {
    tiles.product[TileWork::row(tile) + lane / kTileColumns][TileWork::column(tile) + lane % kTileColumns] = sum;
  } else {
    tiles.partial[(part * work.tiles + tile) * 32 + lane] = sum;
  }
}

// With split K: each output is its parts' sum, in the order of the parts. Every thread of the block calls it,
// after a barrier that follows the stores; it ends with one.
template <typename C>
__device__ __forceinline__ void combine_parts(const TileWork& work, const PassTiles<C>& tiles) {
  if (work.parts == 1) return;
  const int tid = threadIdx.x;
  if (tid < work.tiles * 32) {
    C sum = tiles.partial[tid];
    for (int part = 1; part < work.parts; ++part) sum += tiles.partial[part * work.tiles * 32 + tid];
    const int tile = tid / 32, lane = tid % 32;
    tiles.product[TileWork::row(tile) + lane / kTileColumns][TileWork::column(tile) + lane % kTileColumns] = sum;
  }
  __syncthreads();
}

// The tensor-core products' partial tiles: warp `part` of those that split a tile's K stores its m16n8
// accumulator fragment (d0, d1: row g, columns 2t and 2t + 1; d2, d3: row g + 8) in slot part * n_tiles +
// n_tile of tiles.product, 128 floats a slot, row-major; after a barrier, element (r, c) of the product is the
// sum of its slots in the order of the parts.
__device__ __forceinline__ void store_mma_tile(const float (&d)[4], int slot, const PassTiles<float>& tiles) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float* out = &tiles.product[0][0] + slot * 128;
  out[g * 8 + 2 * t] = d[0];
  out[g * 8 + 2 * t + 1] = d[1];
  out[(g + 8) * 8 + 2 * t] = d[2];
  out[(g + 8) * 8 + 2 * t + 1] = d[3];
}
__device__ __forceinline__ float sum_mma_parts(const PassTiles<float>& tiles, int parts, int n_tiles, int r, int c) {
  const float* slots = &tiles.product[0][0] + c / 8 * 128 + r * 8 + c % 8;
  float sum = 0.0f;
  for (int part = 0; part < parts; ++part) sum += slots[part * n_tiles * 128];
  return sum;
}

// ---------------------------------------------------------------------------------------------------------
// Forward

// Stages rows b0 + [0, 16) of the product's input (zeros past the batch and past H) into `stage` [16][ld], in
// type T, masked by p.mask when there is one: consecutive threads take consecutive k, each for all 16 rows.
template <typename T, typename S, typename Input>
__device__ void stage_hidden(const ForwardStep<S>& p, int64_t b0, T* stage, int ld) {
  using C = Compute<S>;
  const int64_t B = p.batch, H = p.hidden;
  const Input* h_in = static_cast<const Input*>(p.h_in);
  for (int k = threadIdx.x; k < ld; k += kPersistentThreads) {
    const bool inside = k < H;
#pragma unroll
    for (int r = 0; r < kPersistentRows; ++r) {
      const int64_t b = b0 + r;
      T v = convert<T>(0.0f);
      if (inside && b < B) {
        if (p.mask != nullptr) {
          v = convert<T>(convert<C>(h_in[b * H + k]) * p.mask[b * H + k]);
        } else {
          v = convert<T>(h_in[b * H + k]);
        }
      }
      stage[r * ld + k] = v;
    }
  }
}

// What a pass does with each unit's product, `finish(p, b, j, product)`: the cell's epilogue (CellEpilogue), or
// under layer normalisation keeping the raw product (RawRecurrentProduct). A Finish with kFollowsRows also has
// rows_done(p, b0), which every thread calls once the pass has finished its units of rows b0 + [0, 16): the block
// sees what they wrote.
template <typename S, ForwardEpilogue kEpilogue, bool kRelu>
struct CellEpilogue {
  static constexpr bool kFollowsRows = false;
  __device__ void operator()(const ForwardStep<S>& p, int64_t b, int64_t j, const Compute<S>* product) const {
    forward_epilogue<S, kEpilogue, kRelu>(p, b, j, product);
  }
};

template <typename Step, typename Finish>
__device__ __forceinline__ void finish_rows(const Step& p, int64_t b0, const Finish& finish) {
  if constexpr (Finish::kFollowsRows) {
    __syncthreads();
    finish.rows_done(p, b0);
  }
}

// The units of the block that starts at unit j0 (the last block's may stop short of `units`).
__device__ __forceinline__ int units_of_block(int units, int64_t j0, int64_t hidden) {
  return hidden - j0 < units ? int(hidden - j0) : units;
}

// Layer normalisation's statistics of a row whose units every block holds a part of: each block stores the
// moments of its part (store_part_moments: the mean and the sum of squared deviations from it, in two passes
// over the part), and after a grid barrier every block combines all parts (combined_statistics, Chan et al.'s
// pairwise update). The backward's row sums go the same way (store_part_sums, combined_sums). One warp serves a
// row (for_rows_by_warps): its lanes take every 32nd element of the part, or every 32nd block's part, so their
// loads are in flight together, and meet in a butterfly of shuffles. The butterfly adds in a fixed pattern, and
// both lanes of a pair combine their moments in lane order, so every lane of every block gets the same bits,
// and two runs agree bit for bit. `moments` and `sums` are [B][blocks][2].

// fn(r) for rows r of [0, 16) with b0 + r < batch, one warp to a row (warp w takes rows w and w + 8); every lane
// of the warp calls it.
template <typename Fn>
__device__ __forceinline__ void for_rows_by_warps(int64_t b0, int64_t batch, const Fn& fn) {
  for (int r = int(threadIdx.x) / 32; r < kPersistentRows && b0 + r < batch; r += kPersistentWarps) fn(r);
}

// The sum of every lane's value, in every lane (addition commutes exactly, so both lanes of a pair agree).
template <typename C>
__device__ __forceinline__ C warp_sum(C value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename C, typename Load>
__device__ void store_part_moments(C* moments, int64_t b, int count, const Load& load) {
  const int lane = threadIdx.x % 32;
  C sum = C(0);
  for (int i = lane; i < count; i += 32) sum += load(i);
  const C mean = warp_sum(sum) / C(count);
  C squares = C(0);
  for (int i = lane; i < count; i += 32) {
    const C d = load(i) - mean;
    squares += d * d;
  }
  squares = warp_sum(squares);
  if (lane == 0) {
    C* part = moments + (b * gridDim.x + blockIdx.x) * 2;
    part[0] = mean;
    part[1] = squares;
  }
}

// Moments of a set of values: how many, their mean, and the sum of their squared deviations from it.
template <typename C>
struct Moments {
  C count, mean, squares;
};

// The moments of the union of a and b (Chan et al.).
template <typename C>
__device__ __forceinline__ Moments<C> merged(const Moments<C>& a, const Moments<C>& b) {
  if (b.count == C(0)) return a;
  if (a.count == C(0)) return b;
  const C count = a.count + b.count, delta = b.mean - a.mean;
  const C squares = a.squares + b.squares + delta * delta * (a.count * b.count / count);
  return {count, a.mean + delta * (b.count / count), squares};
}

template <typename C>
__device__ RowStatistics<C> combined_statistics(const C* moments, int64_t b, int units, int64_t hidden,
                                                int per_unit) {
  const int lane = threadIdx.x % 32;
  Moments<C> m{C(0), C(0), C(0)};
  for (unsigned block = lane; block < gridDim.x; block += 32) {
    const C* part = moments + (b * gridDim.x + block) * 2;
    m = merged(m, {C(per_unit * units_of_block(units, int64_t(block) * units, hidden)), part[0], part[1]});
  }
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const Moments<C> other{__shfl_xor_sync(0xffffffffu, m.count, offset), __shfl_xor_sync(0xffffffffu, m.mean, offset),
                           __shfl_xor_sync(0xffffffffu, m.squares, offset)};
    m = (lane & offset) == 0 ? merged(m, other) : merged(other, m);
  }
  return statistics_from_moments(m.mean, m.squares, m.count);
}

// Lane 0 stores the part's two sums (each already summed over the warp).
template <typename C>
__device__ void store_part_sums(C* sums, int64_t b, C first, C second) {
  if (threadIdx.x % 32 != 0) return;
  C* part = sums + (b * gridDim.x + blockIdx.x) * 2;
  part[0] = first;
  part[1] = second;
}

template <typename C>
struct RowSums {
  C first, second;
};

template <typename C>
__device__ RowSums<C> combined_sums(const C* sums, int64_t b) {
  RowSums<C> total{C(0), C(0)};
  for (unsigned block = threadIdx.x % 32; block < gridDim.x; block += 32) {
    total.first += sums[(b * gridDim.x + block) * 2];
    total.second += sums[(b * gridDim.x + block) * 2 + 1];
  }
  return {warp_sum(total.first), warp_sum(total.second)};
}

// One product and epilogue over every batch row for the block's units: the product of gate blocks
// [gate_first, gate_first + gates) over p.h_in (of type Input, masked by p.mask), then kEpilogue.
// The same on tensor cores (tensor_core_forward) for an input of type S: the block stages 16 rows of h_{t-1}
// (masked, rounded to S as the per-step kernels' inputs are not: they multiply the mask in float) in h_stage;
// warp w takes the n8 tile w % n_tiles of the gate-unit columns and every (8 / n_tiles)-th K step of kMmaK;
// the warps' partial tiles meet in tiles.product, and each unit's thread adds them in a fixed order.
template <typename S, typename Finish>
__device__ void forward_pass_tensor_cores(const ForwardStep<S>& p, int units, int64_t j0, const S* r_slice, int ld,
                                          S* h_stage, int gate_first, int gates, const PassTiles<float>& tiles,
                                          const Finish& finish) {
  const int64_t B = p.batch, H = p.hidden;
  const int columns = gates * units, n_tiles = (columns + 7) / 8;
  const int warps_per_tile = kPersistentWarps / n_tiles, k_steps = ld / kMmaK<S>;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const S* weights = r_slice + gate_first * units * ld;
  // A 32-bit register of two consecutive 16-bit elements (their pairs start at even, 4-byte aligned offsets).
  auto pair = [](const S* at) { return *reinterpret_cast<const uint32_t*>(at); };
  // A float32 operand rounded to TF32 to nearest, as the time-parallel products' TF32 operands are.
  auto tf32 = [](S value) { return nvcuda::wmma::__float_to_tf32(float(value)); };
  for (int64_t b0 = 0; b0 < B; b0 += kPersistentRows) {
    stage_hidden<S, S, S>(p, b0, h_stage, ld);
    __syncthreads();
    if (warp < n_tiles * warps_per_tile) {
      const int n_tile = warp % n_tiles, part = warp / n_tiles;
      const int column = n_tile * 8 + g;  // the B fragment's n of this lane
      const S* w = weights + (column < columns ? column : 0) * ld;
      float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int step = part; step < k_steps; step += warps_per_tile) {
        const int k0 = step * kMmaK<S>;
        if constexpr (sizeof(S) == 2) {
          const uint32_t a[4] = {pair(h_stage + g * ld + k0 + 2 * t), pair(h_stage + (g + 8) * ld + k0 + 2 * t),
                                 pair(h_stage + g * ld + k0 + 8 + 2 * t),
                                 pair(h_stage + (g + 8) * ld + k0 + 8 + 2 * t)};
          const uint32_t b[2] = {column < columns ? pair(w + k0 + 2 * t) : 0u,
                                 column < columns ? pair(w + k0 + 8 + 2 * t) : 0u};
          ptx::mma_m16n8k16<S>(d, a, b, d);
        } else {
          // a0..a3: (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4); b0, b1: (t, g), (t + 4, g).
          const float a[4] = {tf32(h_stage[g * ld + k0 + t]), tf32(h_stage[(g + 8) * ld + k0 + t]),
                              tf32(h_stage[g * ld + k0 + t + 4]), tf32(h_stage[(g + 8) * ld + k0 + t + 4])};
          const float b[2] = {column < columns ? tf32(w[k0 + t]) : 0.0f,
                              column < columns ? tf32(w[k0 + t + 4]) : 0.0f};
          ptx::mma_m16n8k8_tf32(d, a, b, d);
        }
      }
      store_mma_tile(d, part * n_tiles + n_tile, tiles);
    }
    __syncthreads();
    if (tid < kPersistentRows * units) {
      const int r = tid / units, u = tid % units;
      const int64_t b = b0 + r, j = j0 + u;
      if (b < B && j < H) {
        float product[4];
        for (int gate = 0; gate < gates; ++gate) {
          product[gate] = sum_mma_parts(tiles, warps_per_tile, n_tiles, r, gate * units + u);
        }
        finish(p, b, j, product);
      }
    }
    finish_rows(p, b0, finish);
    __syncthreads();
  }
}

// The FMA product: 16 rows of the input staged in the compute type (a_stage [16][padded H]), times the slice's
// gate-unit rows.
template <typename S, typename Input, bool kTensorCores, typename Finish>
__device__ void forward_pass(const ForwardStep<S>& p, int units, int64_t j0, const S* r_slice, int ld, S* h_stage,
                             Compute<S>* a_stage, int gate_first, int gates, const PassTiles<Compute<S>>& tiles,
                             const Finish& finish) {
  using C = Compute<S>;
  if constexpr (kTensorCores && std::is_same_v<Input, S>) {
    return forward_pass_tensor_cores<S>(p, units, j0, r_slice, ld, h_stage, gate_first, gates, tiles, finish);
  }
  const int64_t B = p.batch, H = p.hidden;
  const int a_ld = padded_hidden(H), chunks = a_ld / kChunk<C>;
  const int columns = gates * units, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const S* weights = r_slice + gate_first * units * ld;
  const TileWork work(columns);
  for (int64_t b0 = 0; b0 < B; b0 += kPersistentRows) {
    stage_hidden<C, S, Input>(p, b0, a_stage, a_ld);
    __syncthreads();
    for (int slot = warp; slot < work.tiles * work.parts; slot += kPersistentWarps) {
      const int tile = slot % work.tiles, part = slot / work.tiles;
      C acc[kTileOutputs];
      clear_tile(acc);
      accumulate_tile(acc, a_stage + TileWork::row(tile) * a_ld, a_ld, weights + TileWork::column(tile) * ld, ld,
                      part * 32 + lane, work.parts * 32, chunks);
      store_tile(work, tile, part, reduce_tile<kTileOutputs / 2>(acc), tiles);
    }
    __syncthreads();
    combine_parts(work, tiles);
    if (int(threadIdx.x) < kPersistentRows * units) {
      const int r = threadIdx.x / units, u = threadIdx.x % units;
      const int64_t b = b0 + r, j = j0 + u;
      if (b < B && j < H) {
        C product[4];
        for (int g = 0; g < gates; ++g) product[g] = tiles.product[r][g * units + u];
        finish(p, b, j, product);
      }
    }
    finish_rows(p, b0, finish);
    __syncthreads();
  }
}

// Whether the forward kernel runs FMA products (and needs their stage): all of them where its products over
// h_{t-1} do not run on tensor cores; with the 16-bit types, the GRU with reset_before's over r * h_{t-1},
// which is in float.
template <typename S>
__host__ __device__ constexpr bool forward_fma_products(bool tensor_cores, bool reset_before) {
  return !tensor_cores || (reset_before && !std::is_same_v<S, Compute<S>>);
}

// Layer normalisation in the forward (ForwardWindow: recurrent, part_moments). A step takes three passes
// with a grid barrier between each (two for the GRU): the product, kept raw (in w.recurrent, and in the cache's
// last G*H columns) while each block stores the moments of its part of every row; the norm of each unit's
// product with the combined statistics and the cell's epilogue (the LSTM's writes o and c_t for the output, and
// the block stores the moments of its part of c_t); the LSTM's output o * act(LN(c_t)).
template <typename S>
struct RawRecurrentProduct {
  static constexpr bool kFollowsRows = true;
  Compute<S>* raw;
  Compute<S>* moments;
  int gates, units;
  int64_t j0;

  __device__ void operator()(const ForwardStep<S>& p, int64_t b, int64_t j, const Compute<S>* product) const {
    const int64_t H = p.hidden, GH = p.gate_stride;
    for (int g = 0; g < gates; ++g) {
      raw[b * GH + g * H + j] = product[g];
      if (p.cache != nullptr) p.cache[b * p.cache_stride + p.cache_stride - GH + g * H + j] = convert<S>(product[g]);
    }
  }
  __device__ void rows_done(const ForwardStep<S>& p, int64_t b0) const {
    const int64_t H = p.hidden, GH = p.gate_stride;
    const int own = units_of_block(units, j0, H);
    for_rows_by_warps(b0, p.batch, [&](int r) {
      const Compute<S>* row = raw + (b0 + r) * GH + j0;
      store_part_moments(moments, b0 + r, gates * own, [&](int i) { return row[i / own * H + i % own]; });
    });
  }
};

// Every row's statistics (of `per_unit` values a unit, from every block's moments) for rows b0 + [0, 16), into
// stats [16][2] in shared memory; a barrier follows.
template <typename C>
__device__ void stage_statistics(const C* moments, int64_t b0, int64_t batch, int units, int64_t hidden,
                                 int per_unit, C* stats) {
  for_rows_by_warps(b0, batch, [&](int r) {
    const RowStatistics<C> s = combined_statistics(moments, b0 + r, units, hidden, per_unit);
    if (threadIdx.x % 32 == 0) {
      stats[2 * r] = s.mean;
      stats[2 * r + 1] = s.rstd;
    }
  });
  __syncthreads();
}

template <typename S, ForwardEpilogue kEpilogue, bool kRelu, int kGates>
__device__ void normalised_recurrent_pass(const ForwardWindow<S>& w, const ForwardStep<S>& p, int units, int64_t j0,
                                          Compute<S>* stats) {
  using C = Compute<S>;
  constexpr bool kLstm = kEpilogue == ForwardEpilogue::lstm || kEpilogue == ForwardEpilogue::lstm_coupled;
  const int64_t B = p.batch, H = p.hidden, GH = p.gate_stride;
  C* cell_moments = w.part_moments + w.base.batch * gridDim.x * 2;
  for (int64_t b0 = 0; b0 < B; b0 += kPersistentRows) {
    stage_statistics(w.part_moments, b0, B, units, H, kGates, stats);
    if (int(threadIdx.x) < kPersistentRows * units) {
      const int r = threadIdx.x / units, u = threadIdx.x % units;
      const int64_t b = b0 + r, j = j0 + u;
      if (b < B && j < H) {
        C product[kGates];
        for (int g = 0; g < kGates; ++g) {
          const C value = w.recurrent[b * GH + g * H + j];
          product[g] = convert<C>(w.gamma_h[g * H + j]) * ((value - stats[2 * r]) * stats[2 * r + 1]);
        }
        forward_epilogue<S, kEpilogue, kRelu>(p, b, j, product);
      }
    }
    if constexpr (kLstm) {
      __syncthreads();
      for_rows_by_warps(b0, B, [&](int r) {
        const C* c = p.norm_inputs + (b0 + r) * 2 * H + H + j0;
        store_part_moments(cell_moments, b0 + r, units_of_block(units, j0, H), [c](int i) { return c[i]; });
      });
    }
    __syncthreads();
  }
}

template <typename S, bool kRelu>
__device__ void lstm_norm_output_pass(const ForwardWindow<S>& w, const ForwardStep<S>& p, int units, int64_t j0,
                                      Compute<S>* stats) {
  const int64_t B = p.batch, H = p.hidden;
  for (int64_t b0 = 0; b0 < B; b0 += kPersistentRows) {
    stage_statistics(w.part_moments + w.base.batch * gridDim.x * 2, b0, B, units, H, 1, stats);
    if (int(threadIdx.x) < kPersistentRows * units) {
      const int r = threadIdx.x / units, u = threadIdx.x % units;
      const int64_t b = b0 + r, j = j0 + u;
      if (b < B && j < H) {
        lstm_norm_output_unit<S, kRelu>(p, b, j, {stats[2 * r], stats[2 * r + 1]}, w.gamma_c, w.beta_c);
      }
    }
    __syncthreads();
  }
}

template <typename S, ForwardEpilogue kEpilogue, bool kRelu, bool kTf32, bool kLayerNorm>
__global__ void __launch_bounds__(kPersistentThreads, sizeof(Compute<S>) == 4 ? 2 : 1)
    forward_persistent_kernel(ForwardWindow<S> w, int units) {
  using C = Compute<S>;
  constexpr bool kTensorCores = tensor_core_forward<S>(kTf32);
  constexpr bool kResetBefore = kEpilogue == ForwardEpilogue::gru_reset_before_gates;
  constexpr int kGates = kResetBefore ? 3 : product_gates(kEpilogue);
  CONVEYOR_SHARED(C, partial, [kPersistentThreads]);
  CONVEYOR_SHARED(C, product, [kPersistentRows][kPersistentMaxColumns]);
  // (gate g, unit u, k) at (g * units + u) * ld + k; then h_stage [16][ld] for tensor-core products, and
  // a_stage [16][padded H] for FMA ones.
  CONVEYOR_DYNAMIC_SHARED(S, r_slice);
  const PassTiles<C> tiles{partial, product};
  const int64_t H = w.base.hidden, j0 = int64_t(blockIdx.x) * units;
  const int ld = forward_slice_ld<S>(H);
  S* h_stage = r_slice + kGates * units * ld;
  C* a_stage = reinterpret_cast<C*>(h_stage + (kTensorCores ? kPersistentRows * ld : 0));
  for (int e = threadIdx.x; e < kGates * units * ld; e += kPersistentThreads) {
    const int k = e % ld, u = e / ld % units, g = e / (ld * units);
    const int64_t j = j0 + u;
    r_slice[e] = j < H && k < H ? w.base.R[(g * H + j) * H + k] : convert<S>(0.0f);
  }
  __syncthreads();
  const cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int64_t t = 0; t < w.steps; ++t) {
    ForwardStep<S> p = w.step(t);
    if constexpr (kResetBefore) {
      forward_pass<S, S, kTensorCores>(p, units, j0, r_slice, ld, h_stage, a_stage, 0, 2, tiles,
                                       CellEpilogue<S, ForwardEpilogue::gru_reset_before_gates, kRelu>{});
      grid.sync();  // every unit's r * h_{t-1} before the n block's product reads them
      ForwardWindow<S>::to_output_phase(p);
      forward_pass<S, C, kTensorCores>(p, units, j0, r_slice, ld, h_stage, a_stage, 2, 1, tiles,
                                       CellEpilogue<S, ForwardEpilogue::gru_reset_before_output, kRelu>{});
    } else if constexpr (kLayerNorm) {
      forward_pass<S, S, kTensorCores>(p, units, j0, r_slice, ld, h_stage, a_stage, 0, kGates, tiles,
                                       RawRecurrentProduct<S>{w.recurrent, w.part_moments, kGates, units, j0});
      grid.sync();  // every block's moments of each row of R h_{t-1} before the norm
      normalised_recurrent_pass<S, kEpilogue, kRelu, kGates>(w, p, units, j0, tiles.partial);
      if constexpr (kEpilogue == ForwardEpilogue::lstm || kEpilogue == ForwardEpilogue::lstm_coupled) {
        grid.sync();  // every block's moments of each row of c_t before LN(c_t)
        lstm_norm_output_pass<S, kRelu>(w, p, units, j0, tiles.partial);
      }
    } else {
      forward_pass<S, S, kTensorCores>(p, units, j0, r_slice, ld, h_stage, a_stage, 0, kGates, tiles,
                                       CellEpilogue<S, kEpilogue, kRelu>{});
    }
    grid.sync();  // every unit of h_t before the next step reads it
  }
}

template <typename S, bool kRelu>
using ForwardPersistentKernel = void (*)(ForwardWindow<S>, int);

// Layer normalisation (the LSTM's and the GRU's with reset_after: the options refuse it elsewhere) has kernels of
// its own.
template <typename S, bool kRelu, bool kTf32>
ForwardPersistentKernel<S, kRelu> forward_persistent_kernel_of(const CellOptions& options) {
  const bool norm = options.layer_norm;
  switch (options.cell) {
    case CellType::lstm:
      if (options.coupled_gates) {
        return norm ? forward_persistent_kernel<S, ForwardEpilogue::lstm_coupled, kRelu, kTf32, true>
                    : forward_persistent_kernel<S, ForwardEpilogue::lstm_coupled, kRelu, kTf32, false>;
      }
      return norm ? forward_persistent_kernel<S, ForwardEpilogue::lstm, kRelu, kTf32, true>
                  : forward_persistent_kernel<S, ForwardEpilogue::lstm, kRelu, kTf32, false>;
    case CellType::gru:
      if (options.reset_after) {
        return norm ? forward_persistent_kernel<S, ForwardEpilogue::gru_reset_after, kRelu, kTf32, true>
                    : forward_persistent_kernel<S, ForwardEpilogue::gru_reset_after, kRelu, kTf32, false>;
      }
      return forward_persistent_kernel<S, ForwardEpilogue::gru_reset_before_gates, kRelu, kTf32, false>;
    case CellType::rnn:
      break;
  }
  return forward_persistent_kernel<S, ForwardEpilogue::rnn, kRelu, kTf32, false>;
}

// kernel_of(std::bool_constant<kTf32>) with kTf32 = options.allow_tf32 for float32, the one type it concerns,
// and false for the others (which instantiate no TF32 kernels).
template <typename S, typename KernelOf>
auto with_tf32(const CellOptions& options, const KernelOf& kernel_of) {
  if constexpr (std::is_same_v<S, float>) {
    if (options.allow_tf32) return kernel_of(std::true_type{});
  }
  return kernel_of(std::false_type{});
}

template <typename S, bool kRelu>
ForwardPersistentKernel<S, kRelu> forward_persistent_kernel_for(const CellOptions& options) {
  return with_tf32<S>(options, [&](auto tf32) {
    return forward_persistent_kernel_of<S, kRelu, decltype(tf32)::value>(options);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward

// The product P[b, j] = sum_{k < K} A(b, k) R[R_row0 + k, j] (BackwardStep) over every batch row for the
// block's units, then kEpilogue. K and R_row0 are whole gate blocks of H; the block's columns of R hold each
// gate block padded to 16 (r_columns: unit u's gate block g at u * ld + g * padded H), and the product stages
// A the same way, `width` padded columns at a time, in a_stage [16][backward_stage_ld(width)].
// On tensor cores the 16 staged rows are the MMA's M and the block's units its N, 8 to an n8 tile (those past
// `units` zero): warp w takes tile w % n_tiles and every (8 / n_tiles)-th K step of 8 of each slice, and the
// warps' partial tiles meet in tiles.product, where each unit's thread adds them in a fixed order.
template <typename S, bool kTensorCores, typename Finish>
__device__ void backward_pass(const BackwardStep<S>& p, int units, int64_t j0, const S* r_columns, int ld,
                              Compute<S>* a_stage, int width, const PassTiles<Compute<S>>& tiles,
                              const Finish& finish) {
  using C = Compute<S>;
  const int64_t B = p.batch, H = p.hidden;
  const int Hp = padded_hidden(H), K = int(p.K / H) * Hp, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int a_ld = backward_stage_ld<C>(width);
  const S* weights = r_columns + int(p.R_row0 / H) * Hp;
  const TileWork work(units);
  // The tensor-core product's share of the warp: (g, t) place the lane's fragment elements.
  const int n_tiles = (units + 7) / 8, warps_per_tile = kPersistentWarps / n_tiles;
  const int n_tile = warp % n_tiles, mma_part = warp / n_tiles, g = lane / 4, t = lane % 4;
  const int column = n_tile * 8 + g;
  const S* w_column = weights + (column < units ? column : 0) * ld;
  auto tf32 = [](auto value) { return nvcuda::wmma::__float_to_tf32(convert<float>(value)); };
  for (int64_t b0 = 0; b0 < B; b0 += kPersistentRows) {
    const int tile = warp % work.tiles, part = warp / work.tiles;  // at most one tile a warp: units <= 16
    const bool working = warp < work.tiles * work.parts;
    C acc[kTileOutputs];
    clear_tile(acc);
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < K; k0 += width) {
      const int columns = K - k0 < width ? K - k0 : width;
      for (int kk = threadIdx.x; kk < columns; kk += kPersistentThreads) {
        const int gate = (k0 + kk) / Hp, within = k0 + kk - gate * Hp;
        const int64_t k = int64_t(gate) * H + within;  // A's column
        const bool first = k < p.K_first;
        const C* source = first ? p.a_first + k : p.a_second + (k - p.K_first);
        const int64_t source_ld = first ? p.a_first_ld : p.a_second_ld;
#pragma unroll
        for (int r = 0; r < kPersistentRows; ++r) {
          const int64_t b = b0 + r;
          a_stage[r * a_ld + kk] = within < H && b < p.product_batch ? source[b * source_ld] : C(0);
        }
      }
      __syncthreads();
      if constexpr (kTensorCores) {
        for (int step = mma_part; step < columns / 8; step += warps_per_tile) {
          const int k = step * 8;
          // a0..a3: (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4); b0, b1: (t, g), (t + 4, g).
          const float a[4] = {tf32(a_stage[g * a_ld + k + t]), tf32(a_stage[(g + 8) * a_ld + k + t]),
                              tf32(a_stage[g * a_ld + k + t + 4]), tf32(a_stage[(g + 8) * a_ld + k + t + 4])};
          const float b[2] = {column < units ? tf32(w_column[k0 + k + t]) : 0.0f,
                              column < units ? tf32(w_column[k0 + k + t + 4]) : 0.0f};
          ptx::mma_m16n8k8_tf32(d, a, b, d);
        }
      } else if (working) {
        accumulate_tile(acc, a_stage + TileWork::row(tile) * a_ld, a_ld, weights + TileWork::column(tile) * ld + k0,
                        ld, part * 32 + lane, work.parts * 32, columns / kChunk<C>);
      }
      __syncthreads();
    }
    if constexpr (kTensorCores) {
      store_mma_tile(d, mma_part * n_tiles + n_tile, tiles);
      __syncthreads();
      if (int(threadIdx.x) < kPersistentRows * units) {
        const int r = threadIdx.x / units, u = threadIdx.x % units;
        const int64_t b = b0 + r, j = j0 + u;
        const float sum = sum_mma_parts(tiles, warps_per_tile, n_tiles, r, u);
        if (b < B && j < H) finish(p, b, j, sum);
      }
    } else {
      if (working) store_tile(work, tile, part, reduce_tile<kTileOutputs / 2>(acc), tiles);
      __syncthreads();
      combine_parts(work, tiles);
      if (int(threadIdx.x) < kPersistentRows * units) {
        const int r = threadIdx.x / units, u = threadIdx.x % units;
        const int64_t b = b0 + r, j = j0 + u;
        if (b < B && j < H) finish(p, b, j, tiles.product[r][u]);
      }
    }
    finish_rows(p, b0, finish);
    __syncthreads();
  }
}

template <typename S, BackwardEpilogue kEpilogue, bool kRelu>
struct BackwardCellEpilogue {
  static constexpr bool kFollowsRows = false;
  __device__ void operator()(const BackwardStep<S>& p, int64_t b, int64_t j, Compute<S> product) const {
    backward_epilogue<S, kEpilogue, kRelu>(p, b, j, product);
  }
};

// Layer normalisation in the backward (BackwardWindow: recurrent_statistics, cell_statistics, part_sums). A
// step takes three passes with a grid barrier between each (two for the GRU): the product and the epilogue
// before the norms (the LSTM's: dh_total, the gradient reaching h_t), while each block stores its sums over its
// part of every row for the next norm's backward; for the LSTM, LN(c_t)'s backward and the cell's
// (lstm_norm_cell_backward), then the sums for LN(R h_{t-1})'s; LN(R h_{t-1})'s backward into d_recurrent, which
// the next step's product and dR take.

// The gradient reaching LN(R h_{t-1}) at gate block g, unit j of row b: dax's, or the GRU's dar_n for the n block.
template <typename S>
__device__ __forceinline__ Compute<S> recurrent_norm_grad(const BackwardWindow<S>& w, const BackwardStep<S>& p,
                                                          int64_t b, int g, int64_t j) {
  return w.gru && g == 2 ? p.dar_n[b * p.hidden + j] : p.dax[b * p.gate_stride + g * p.hidden + j];
}

// R h_{t-1}'s normalised value at gate block g, unit j of row b, from the cache's raw product.
template <typename S>
__device__ __forceinline__ Compute<S> recurrent_norm_value(const BackwardStep<S>& p, RowStatistics<Compute<S>> s,
                                                           int64_t b, int g, int64_t j) {
  const S* raw = p.cache + b * p.cache_stride + p.cache_stride - p.gate_stride;
  return (convert<Compute<S>>(raw[g * p.hidden + j]) - s.mean) * s.rstd;
}

template <typename C>
__device__ __forceinline__ RowStatistics<C> saved_statistics(const C* statistics, int64_t row) {
  return {statistics[2 * row], statistics[2 * row + 1]};
}

// Each block's sums over its part of rows b0 + [0, 16) for LN(R h_{t-1})'s backward, once the cell's gradients
// of those rows are written.
template <typename S>
__device__ void store_recurrent_norm_sums(const BackwardWindow<S>& w, const BackwardStep<S>& p, int64_t t,
                                          int64_t b0, int units, int64_t j0) {
  using C = Compute<S>;
  const int64_t H = p.hidden;
  const int own = units_of_block(units, j0, H), count = int(p.gate_stride / H) * own;
  for_rows_by_warps(b0, p.batch, [&](int r) {
    const int64_t b = b0 + r;
    const RowStatistics<C> s = saved_statistics(w.recurrent_statistics, w.rows.first(t) + b);
    C sum_d = C(0), sum_dv = C(0);
    for (int i = threadIdx.x % 32; i < count; i += 32) {
      const int g = i / own;
      const int64_t j = j0 + i % own;
      const C d_hat = recurrent_norm_grad(w, p, b, g, j) * convert<C>(w.gamma_h[g * H + j]);
      sum_d += d_hat;
      sum_dv += d_hat * recurrent_norm_value(p, s, b, g, j);
    }
    store_part_sums(w.part_sums + w.base.batch * gridDim.x * 2, b, warp_sum(sum_d), warp_sum(sum_dv));
  });
}

// What a pass that stores a norm's row sums after its epilogue knows: the window, the step, and its block's
// units.
template <typename S>
struct NormSumsPass {
  static constexpr bool kFollowsRows = true;
  const BackwardWindow<S>& w;
  int64_t t;
  int units;
  int64_t j0;
};

// The GRU's pass: its epilogue, then the sums for LN(R h_{t-1})'s backward.
template <typename S, BackwardEpilogue kEpilogue, bool kRelu>
struct RecurrentNormSums : NormSumsPass<S> {
  __device__ void operator()(const BackwardStep<S>& p, int64_t b, int64_t j, Compute<S> product) const {
    backward_epilogue<S, kEpilogue, kRelu>(p, b, j, product);
  }
  __device__ void rows_done(const BackwardStep<S>& p, int64_t b0) const {
    store_recurrent_norm_sums(this->w, p, this->t, b0, this->units, this->j0);
  }
};

// The LSTM's first pass: dh_total (the projection epilogue's work), then the sums for LN(c_t)'s backward.
template <typename S, bool kRelu>
struct CellNormSums : NormSumsPass<S> {
  __device__ void operator()(const BackwardStep<S>& p, int64_t b, int64_t j, Compute<S> product) const {
    backward_epilogue<S, BackwardEpilogue::projection, kRelu>(p, b, j, product);
  }
  __device__ void rows_done(const BackwardStep<S>& p, int64_t b0) const {
    using C = Compute<S>;
    const NormSumsPass<S>& pass = *this;
    const BackwardWindow<S>& w = pass.w;
    const int64_t H = p.hidden, j0 = pass.j0;
    const int own = units_of_block(pass.units, j0, H);
    for_rows_by_warps(b0, p.batch, [&](int r) {
      const int64_t b = b0 + r;
      const RowStatistics<C> s = saved_statistics(w.cell_statistics, w.rows.first(pass.t) + b);
      C sum_d = C(0), sum_dv = C(0);
      for (int u = threadIdx.x % 32; u < own; u += 32) {
        const int64_t j = j0 + u;
        const LstmNormUnit<C> unit = lstm_norm_unit<S, kRelu>(p.cache + b * p.cache_stride, H, j, s, w.gamma_c,
                                                              w.beta_c, p.dh_total[b * H + j]);
        const C d_hat = unit.d_ln * convert<C>(w.gamma_c[j]);
        sum_d += d_hat;
        sum_dv += d_hat * unit.c_hat;
      }
      store_part_sums(w.part_sums, b, warp_sum(sum_d), warp_sum(sum_dv));
    });
  }
};

// Rows b0 + [0, 16)'s statistics (from `statistics`, packed rows from `first`) and means of the two sums over n
// values (from every block's `sums`), into stats [16][4] in shared memory; a barrier follows.
template <typename C>
__device__ void stage_sums(const C* statistics, int64_t first, const C* sums, int64_t b0, int64_t batch, int64_t n,
                           C* stats) {
  for_rows_by_warps(b0, batch, [&](int r) {
    const RowSums<C> total = combined_sums(sums, b0 + r);
    if (threadIdx.x % 32 == 0) {
      const RowStatistics<C> s = saved_statistics(statistics, first + b0 + r);
      C* out = stats + 4 * r;
      out[0] = s.mean;
      out[1] = s.rstd;
      out[2] = total.first / C(n);
      out[3] = total.second / C(n);
    }
  });
  __syncthreads();
}

template <typename S, bool kRelu>
__device__ void lstm_norm_cell_pass(const BackwardWindow<S>& w, const BackwardStep<S>& p, int64_t t, int units,
                                    int64_t j0, Compute<S>* stats) {
  const int64_t B = p.batch, H = p.hidden, first = w.rows.first(t);
  Compute<S>* d_gamma_c = w.d_gamma_c != nullptr ? w.d_gamma_c + first * H : nullptr;
  Compute<S>* d_beta_c = w.d_beta_c != nullptr ? w.d_beta_c + first * H : nullptr;
  for (int64_t b0 = 0; b0 < B; b0 += kPersistentRows) {
    stage_sums(w.cell_statistics, first, w.part_sums, b0, B, H, stats);
    if (int(threadIdx.x) < kPersistentRows * units) {
      const int r = threadIdx.x / units, u = threadIdx.x % units;
      const int64_t b = b0 + r, j = j0 + u;
      const Compute<S>* row = stats + 4 * r;
      if (b < B && j < H) {
        lstm_norm_cell_backward<S, kRelu>(p, b, j, {row[0], row[1]}, row[2], row[3], p.dh_total[b * H + j],
                                          w.gamma_c, w.beta_c, d_gamma_c, d_beta_c);
      }
    }
    __syncthreads();
    store_recurrent_norm_sums(w, p, t, b0, units, j0);
    __syncthreads();
  }
}

template <typename S>
__device__ void recurrent_norm_gradient_pass(const BackwardWindow<S>& w, const BackwardStep<S>& p, int64_t t,
                                             int units, int64_t j0, Compute<S>* stats) {
  using C = Compute<S>;
  const int64_t B = p.batch, H = p.hidden, GH = p.gate_stride, first = w.rows.first(t);
  const int gates = int(GH / H);
  for (int64_t b0 = 0; b0 < B; b0 += kPersistentRows) {
    stage_sums(w.recurrent_statistics, first, w.part_sums + w.base.batch * gridDim.x * 2, b0, B, GH, stats);
    for (int e = threadIdx.x; e < kPersistentRows * gates * units; e += kPersistentThreads) {
      const int r = e / (gates * units), g = e / units % gates, u = e % units;
      const int64_t b = b0 + r, j = j0 + u;
      if (b >= B || j >= H) continue;
      const C* row = stats + 4 * r;
      const C d = recurrent_norm_grad(w, p, b, g, j), v_hat = recurrent_norm_value(p, {row[0], row[1]}, b, g, j);
      const int64_t at = (first + b) * GH + g * H + j;
      w.d_recurrent[at] = layer_norm_input_grad(d, convert<C>(w.gamma_h[g * H + j]), v_hat, row[1], row[2], row[3]);
      if (w.d_gamma_h != nullptr) w.d_gamma_h[at] = d * v_hat;
    }
    __syncthreads();
  }
}

template <typename S, BackwardEpilogue kEpilogue, bool kRelu, bool kTf32, bool kLayerNorm>
__global__ void __launch_bounds__(kPersistentThreads, sizeof(Compute<S>) == 4 ? 2 : 1)
    backward_persistent_kernel(BackwardWindow<S> w, int units, S* dh0) {
  using C = Compute<S>;
  constexpr bool kTensorCores = tensor_core_backward<S>(kTf32);
  constexpr bool kResetBefore = kEpilogue == BackwardEpilogue::gru_reset_before_update;
  CONVEYOR_SHARED(C, partial, [kPersistentThreads]);
  CONVEYOR_SHARED(C, product, [kPersistentRows][kPersistentMaxColumns]);
  CONVEYOR_DYNAMIC_SHARED(S, r_columns);  // (unit u, gate g, k) at u * ld + g * padded H + k; then a_stage
  const PassTiles<C> tiles{partial, product};
  const int64_t H = w.base.hidden, j0 = int64_t(blockIdx.x) * units;
  const int gates = int(w.base.gate_stride / H), Hp = padded_hidden(H), ld = backward_columns_ld<S>(gates, H);
  const int width = backward_stage_width<C>(gates, H);
  C* a_stage = reinterpret_cast<C*>(r_columns + units * ld);
  for (int e = threadIdx.x; e < units * ld; e += kPersistentThreads) {
    const int u = e / ld, gate = e % ld / Hp, k = e % ld % Hp;
    const int64_t j = j0 + u;
    r_columns[e] = j < H && gate < gates && k < H ? w.base.R[(gate * H + k) * H + j] : convert<S>(0.0f);
  }
  __syncthreads();
  const cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int64_t t = w.steps - 1; t >= 0; --t) {
    BackwardStep<S> p = w.step(t);
    if constexpr (kLayerNorm && kEpilogue == BackwardEpilogue::lstm) {
      backward_pass<S, kTensorCores>(p, units, j0, r_columns, ld, a_stage, width, tiles,
                                     CellNormSums<S, kRelu>{{w, t, units, j0}});
      grid.sync();  // every block's sums of each row for LN(c_t)'s backward
      lstm_norm_cell_pass<S, kRelu>(w, p, t, units, j0, tiles.partial);
      grid.sync();  // every block's sums of each row for LN(R h_{t-1})'s backward
      recurrent_norm_gradient_pass(w, p, t, units, j0, tiles.partial);
    } else if constexpr (kLayerNorm) {
      backward_pass<S, kTensorCores>(p, units, j0, r_columns, ld, a_stage, width, tiles,
                                     RecurrentNormSums<S, kEpilogue, kRelu>{{w, t, units, j0}});
      grid.sync();  // every block's sums of each row for LN(R h_{t-1})'s backward
      recurrent_norm_gradient_pass(w, p, t, units, j0, tiles.partial);
    } else {
      backward_pass<S, kTensorCores>(p, units, j0, r_columns, ld, a_stage, width, tiles,
                                     BackwardCellEpilogue<S, kEpilogue, kRelu>{});
    }
    if constexpr (kResetBefore) {
      grid.sync();  // every unit's dax_n of step t before d(r * h_{t-1}) = dax_n R_n reads them
      BackwardWindow<S>::to_reset_phase(p);
      backward_pass<S, kTensorCores>(p, units, j0, r_columns, ld, a_stage, width, tiles,
                                     BackwardCellEpilogue<S, BackwardEpilogue::gru_reset_before_reset, kRelu>{});
    }
    grid.sync();  // step t's gradients before step t - 1's product reads them
  }
  if (dh0 != nullptr) {
    backward_pass<S, kTensorCores>(w.initial_state(dh0), units, j0, r_columns, ld, a_stage, width, tiles,
                                   BackwardCellEpilogue<S, BackwardEpilogue::initial_state, kRelu>{});
  }
}

template <typename S, bool kRelu>
using BackwardPersistentKernel = void (*)(BackwardWindow<S>, int, S*);

template <typename S, bool kRelu, bool kTf32>
BackwardPersistentKernel<S, kRelu> backward_persistent_kernel_of(const CellOptions& options) {
  const bool norm = options.layer_norm;
  switch (options.cell) {
    case CellType::lstm:
      return norm ? backward_persistent_kernel<S, BackwardEpilogue::lstm, kRelu, kTf32, true>
                  : backward_persistent_kernel<S, BackwardEpilogue::lstm, kRelu, kTf32, false>;
    case CellType::gru:
      if (options.reset_after) {
        return norm ? backward_persistent_kernel<S, BackwardEpilogue::gru_reset_after, kRelu, kTf32, true>
                    : backward_persistent_kernel<S, BackwardEpilogue::gru_reset_after, kRelu, kTf32, false>;
      }
      return backward_persistent_kernel<S, BackwardEpilogue::gru_reset_before_update, kRelu, kTf32, false>;
    case CellType::rnn:
      break;
  }
  return backward_persistent_kernel<S, BackwardEpilogue::rnn, kRelu, kTf32, false>;
}

template <typename S, bool kRelu>
BackwardPersistentKernel<S, kRelu> backward_persistent_kernel_for(const CellOptions& options) {
  return with_tf32<S>(options, [&](auto tf32) {
    return backward_persistent_kernel_of<S, kRelu, decltype(tf32)::value>(options);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Plans and launchers

// CONVEYOR_PERSISTENT_UNITS=4, 8 or 16 asks for that many units per block, where they fit (tests run every
// tiling at small H with it; benchmarks compare them); 0 when unset.
int units_asked_for() {
  const char* value = std::getenv("CONVEYOR_PERSISTENT_UNITS");
  if (value == nullptr || *value == '\0') return 0;
  for (const int units : kPersistentUnitChoices) {
    if (std::to_string(units) == value) return units;
  }
  throw std::invalid_argument(std::string("CONVEYOR_PERSISTENT_UNITS: expected 4, 8 or 16, got '") + value + "'");
}

// Units per block: the fewest whose blocks fit one to a multiprocessor, else the fewest that fit at all. Every
// block reads the whole of the step's input from L2, so the blocks set the broadcast's traffic; a
// multiprocessor's share of the products is the same either way (two blocks of 4 units or one of 8), so the
// fewer blocks cost nothing there. A choice fits when its slices fit in a block's shared memory (a slice is
// `bytes_per_unit` for each unit, plus `bytes_per_block`) and the device holds all its blocks at once.
template <typename C>
PersistentPlan plan_for(const void* kernel, int64_t hidden, size_t bytes_per_unit, size_t bytes_per_block) {
  int device = 0, multiprocessors = 0, shared_optin = 0;
  CONVEYOR_CUDA_CHECK(cudaGetDevice(&device));
  CONVEYOR_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  CONVEYOR_CUDA_CHECK(cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t static_bytes = persistent_static_shared_bytes<C>();
  const int asked = units_asked_for();
  PersistentPlan plan, fallback;
  for (const int units : kPersistentUnitChoices) {
    if (asked != 0 && units != asked) continue;
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
    if (int64_t(blocks) > resident) {
      plan.why = std::to_string(blocks) + " blocks of " + std::to_string(units) + " units must be resident at once, " +
                 "and the device holds " + std::to_string(resident);
      continue;
    }
    plan.fits = true;
    plan.units = units;
    plan.blocks = blocks;
    plan.shared_bytes = bytes;
    plan.why.clear();
    if (int64_t(blocks) <= multiprocessors) return plan;
    if (!fallback.fits) fallback = plan;
    plan = PersistentPlan();
  }
  return fallback.fits ? fallback : plan;
}

// Why the kernels cannot run a window whatever the device (persistent.cuh), or null when they can: a projection.
const char* per_step_only(bool projection) {
  return projection ? "a projection (W_hr) runs on the per-step kernels" : nullptr;
}

PersistentPlan refused_plan(const char* why) {
  PersistentPlan plan;
  plan.why = why;
  return plan;
}

template <typename S, bool kRelu>
PersistentPlan persistent_forward_plan(const CellOptions& options, int64_t hidden, bool projection) {
  if (const char* why = per_step_only(projection)) return refused_plan(why);
  const void* kernel = reinterpret_cast<const void*>(forward_persistent_kernel_for<S, kRelu>(options));
  const size_t ld = size_t(forward_slice_ld<S>(hidden));
  const bool reset_before = options.cell == CellType::gru && !options.reset_after;
  const bool tensor_cores = tensor_core_forward<S>(options.allow_tf32);
  const size_t h_stage = tensor_cores ? sizeof(S) * kPersistentRows * ld : 0;
  const size_t a_stage = forward_fma_products<S>(tensor_cores, reset_before)
                             ? sizeof(Compute<S>) * kPersistentRows * size_t(padded_hidden(hidden))
                             : 0;
  return plan_for<Compute<S>>(kernel, hidden, sizeof(S) * size_t(gate_count(options)) * ld, h_stage + a_stage);
}

template <typename S, bool kRelu>
PersistentPlan persistent_backward_plan(const CellOptions& options, int64_t hidden, bool projection) {
  if (const char* why = per_step_only(projection)) return refused_plan(why);
  const void* kernel = reinterpret_cast<const void*>(backward_persistent_kernel_for<S, kRelu>(options));
  using C = Compute<S>;
  const int gates = gate_count(options);
  const size_t ld = size_t(backward_columns_ld<S>(gates, hidden));
  const int stage_ld = backward_stage_ld<C>(backward_stage_width<C>(gates, hidden));
  const size_t a_stage = sizeof(C) * kPersistentRows * size_t(stage_ld);
  return plan_for<C>(kernel, hidden, sizeof(S) * ld, a_stage);
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
