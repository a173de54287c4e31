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
#include <string>

#include "cells/dropout.h"
#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "core/backends.h"
#include "device.cuh"
#include "gemm.cuh"

namespace conveyor::cuda {

// A step kernel's block covers kStepRows batch rows and kStepUnits hidden units with 256 threads: thread
// (tx, ty) owns unit tx of rows ty and ty + 8. The product's K advances in slices of kStepK.
constexpr int kStepRows = 16;
constexpr int kStepUnits = 32;
constexpr int kStepK = 32;
constexpr int kStepThreads = 256;
static_assert(kStepThreads == kStepUnits * kStepRows / 2, "two rows per thread");

// ---------------------------------------------------------------------------------------------------------
// Forward step

enum class ForwardEpilogue {
  lstm,
  lstm_coupled,             // CIFG: three gate blocks f, g, o
  gru_reset_after,
  gru_reset_before_gates,   // r, z and r * h_{t-1}
  gru_reset_before_output,  // n and h_t, after the n block's product over r * h_{t-1}
  rnn,
};

__host__ __device__ constexpr int product_gates(ForwardEpilogue e) {
  switch (e) {
    case ForwardEpilogue::lstm: return 4;
    case ForwardEpilogue::lstm_coupled: return 3;
    case ForwardEpilogue::gru_reset_after: return 3;
    case ForwardEpilogue::gru_reset_before_gates: return 2;
    default: return 1;
  }
}

// One step's arguments. Step-indexed pointers point at step t's slice.
template <typename S>
struct ForwardStep {
  using C = Compute<S>;
  int64_t batch, hidden, gate_stride;  // B, H, G*H
  const S* R;                          // [G*H, H]
  int64_t R_row0;                      // R's row of the product's first gate block (2H for the n block)
  const void* h_in;                    // [B, H] the product's vector: h_{t-1} (S) or r * h_{t-1} (C)
  const C* ax;                         // [B, G*H] x_t W^T, without bias
  const S* bW;                         // [G*H] or null
  const S* bR;                         // [G*H] or null
  const S* P;                          // [3, H] LSTM peephole weights p_i, p_f, p_o, or null
  cells::LstmOptions<C> lstm;          // LSTM options (relu and coupled are template constants)
  const C* mask;                       // [B, H] recurrent dropout mask m_t on the product's h, or null
  const S* h_prev;                     // [B, H] h_{t-1}
  C* cell_state;                       // [B, H] LSTM: c_{t-1} in, c_t out
  C* reset_hidden;                     // [B, H] GRU reset_before: r * h_{t-1}, out
  C* update_gate;                      // [B, H] GRU reset_before: z, from the gates pass to the output pass
  S* h;                                // [B, H] h_t (y_t)
  S* cache;                            // [B, cache_width * H] or null (inference)
  int64_t cache_stride;                // cache_width * H
};

// c_t rounded to S for the cache, on the same side of the clip bound as c_t itself. The backward
// (cells::lstm_backward) stops the gradient where the cached |c_t| >= cell_clip; rounded to nearest, a c_t
// just inside the bound can land on it (so an unclipped unit would lose its gradient), and a clipped c_t =
// +-cell_clip that S does not hold can fall inside it (so a clipped one would keep it). There, rounding the
// other way (toward zero to stay inside, away from zero to stay on or beyond) keeps the forward's float32
// decision at the cost of one unit in the last place. float and double hold c_t exactly.
template <typename S, typename C>
__device__ __forceinline__ S cell_state_for_cache(C c, C cell_clip) {
  const S nearest = convert<S>(c);
  if constexpr (std::is_same_v<S, __half> || std::is_same_v<S, bfloat16>) {
    auto clipped = [cell_clip](C v) { return cell_clip > C(0) && (v >= cell_clip || v <= -cell_clip); };
    if (clipped(convert<C>(nearest)) == clipped(c)) return nearest;
    const bool round_up = clipped(c) == (c > C(0));
    if constexpr (std::is_same_v<S, __half>) {
      return round_up ? __float2half_ru(c) : __float2half_rd(c);
    } else {
      return round_up ? __float2bfloat16_ru(c) : __float2bfloat16_rd(c);
    }
  } else {
    return nearest;
  }
}

template <typename S, ForwardEpilogue kEpilogue, bool kRelu>
__device__ __forceinline__ void forward_epilogue(const ForwardStep<S>& p, int64_t b, int64_t j,
                                                 const Compute<S>* product) {
  using C = Compute<S>;
  const int64_t H = p.hidden, unit = b * H + j;
  // Gate block g's input part (x W^T + bW) and recurrent bias.
  auto input = [&](int g) {
    const int64_t col = g * H + j;
    return p.ax[b * p.gate_stride + col] + (p.bW != nullptr ? convert<C>(p.bW[col]) : C(0));
  };
  auto recurrent_bias = [&](int g) { return p.bR != nullptr ? convert<C>(p.bR[g * H + j]) : C(0); };
  S* cache = p.cache != nullptr ? p.cache + b * p.cache_stride : nullptr;

  if constexpr (kEpilogue == ForwardEpilogue::lstm || kEpilogue == ForwardEpilogue::lstm_coupled) {
    constexpr bool kCoupled = kEpilogue == ForwardEpilogue::lstm_coupled;
    constexpr int kF = kCoupled ? 0 : 1, kG = kF + 1, kO = kF + 2;
    cells::LstmOptions<C> opt = p.lstm;
    opt.relu = kRelu;
    opt.coupled = kCoupled;
    const C a_i = kCoupled ? C(0) : input(0) + (product[0] + recurrent_bias(0));
    const cells::Peephole<C> peephole =
        p.P != nullptr ? cells::Peephole<C>{convert<C>(p.P[j]), convert<C>(p.P[H + j]), convert<C>(p.P[2 * H + j])}
                       : cells::Peephole<C>{C(0), C(0), C(0)};
    const auto s = cells::lstm_forward(opt, a_i, input(kF) + (product[kF] + recurrent_bias(kF)),
                                       input(kG) + (product[kG] + recurrent_bias(kG)),
                                       input(kO) + (product[kO] + recurrent_bias(kO)), p.cell_state[unit], peephole);
    p.cell_state[unit] = s.c;
    p.h[unit] = convert<S>(s.h);
    if (cache != nullptr) {
      cache[j] = convert<S>(s.i);
      cache[H + j] = convert<S>(s.f);
      cache[2 * H + j] = convert<S>(s.g);
      cache[3 * H + j] = convert<S>(s.o);
      cache[4 * H + j] = cell_state_for_cache<S>(s.c, opt.cell_clip);
    }
  } else if constexpr (kEpilogue == ForwardEpilogue::gru_reset_after) {
    const C r = cells::sigmoid(input(0) + (product[0] + recurrent_bias(0)));
    const C z = cells::sigmoid(input(1) + (product[1] + recurrent_bias(1)));
    const C ar_n = product[2] + recurrent_bias(2);
    const C n = cells::gru_candidate_reset_after(kRelu, input(2), r, ar_n);
    p.h[unit] = convert<S>(cells::gru_output(z, n, convert<C>(p.h_prev[unit])));
    if (cache != nullptr) {
      cache[j] = convert<S>(r);
      cache[H + j] = convert<S>(z);
      cache[2 * H + j] = convert<S>(n);
      cache[3 * H + j] = convert<S>(ar_n);
    }
  } else if constexpr (kEpilogue == ForwardEpilogue::gru_reset_before_gates) {
    const C r = cells::sigmoid(input(0) + (product[0] + recurrent_bias(0)));
    const C z = cells::sigmoid(input(1) + (product[1] + recurrent_bias(1)));
    const C h_product = convert<C>(p.h_prev[unit]) * (p.mask != nullptr ? p.mask[unit] : C(1));
    const C reset_hidden = r * h_product;
    p.reset_hidden[unit] = reset_hidden;
    p.update_gate[unit] = z;
    if (cache != nullptr) {
      cache[j] = convert<S>(r);
      cache[H + j] = convert<S>(z);
      cache[3 * H + j] = convert<S>(reset_hidden);
    }
  } else if constexpr (kEpilogue == ForwardEpilogue::gru_reset_before_output) {
    const C n = cells::gru_candidate_reset_before(kRelu, input(2), product[0] + recurrent_bias(2));
    p.h[unit] = convert<S>(cells::gru_output(p.update_gate[unit], n, convert<C>(p.h_prev[unit])));
    if (cache != nullptr) cache[2 * H + j] = convert<S>(n);
  } else {
    p.h[unit] = convert<S>(cells::rnn_forward(kRelu, input(0) + (product[0] + recurrent_bias(0))));
  }
}

// For the block's tile of (batch row, hidden unit), every gate's recurrent product
// sum_k h_in[b, k] R[R_row0 + g*H + j, k], then the cell math.
template <typename S, ForwardEpilogue kEpilogue, bool kRelu, bool kComputeInput>
__global__ void __launch_bounds__(kStepThreads) forward_step_kernel(ForwardStep<S> p) {
  using C = Compute<S>;
  using Input = std::conditional_t<kComputeInput, C, S>;
  constexpr int G = product_gates(kEpilogue);
  CONVEYOR_SHARED(C, h_tile, [kStepRows][kStepK + 1]);
  CONVEYOR_SHARED(C, r_tile, [G * kStepUnits][kStepK + 1]);
  const int tid = threadIdx.x, tx = tid % kStepUnits, ty = tid / kStepUnits;
  const int64_t B = p.batch, H = p.hidden;
  const int64_t b0 = int64_t(blockIdx.y) * kStepRows, j0 = int64_t(blockIdx.x) * kStepUnits;
  const Input* h_in = static_cast<const Input*>(p.h_in);
  C acc[2][G] = {};

  for (int64_t k0 = 0; k0 < H; k0 += kStepK) {
    for (int e = tid; e < kStepRows * kStepK; e += kStepThreads) {
      const int kk = e % kStepK, bb = e / kStepK;
      const int64_t b = b0 + bb, k = k0 + kk;
      h_tile[bb][kk] = b < B && k < H ? convert<C>(h_in[b * H + k]) * (p.mask != nullptr ? p.mask[b * H + k] : C(1))
                                      : C(0);
    }
    for (int e = tid; e < G * kStepUnits * kStepK; e += kStepThreads) {
      const int kk = e % kStepK, row = e / kStepK;
      const int64_t j = j0 + row % kStepUnits, k = k0 + kk;
      const int64_t r_row = p.R_row0 + (row / kStepUnits) * H + j;
      r_tile[row][kk] = j < H && k < H ? convert<C>(p.R[r_row * H + k]) : C(0);
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
    if (b < B && j < H) forward_epilogue<S, kEpilogue, kRelu>(p, b, j, acc[i]);
  }
}

template <ForwardEpilogue kEpilogue, bool kRelu, bool kComputeInput = false, typename S>
void forward_step(const ForwardStep<S>& p, cudaStream_t stream) {
  const dim3 grid(blocks_for(p.hidden, kStepUnits), blocks_for(p.batch, kStepRows));
  launch("forward_step_kernel", forward_step_kernel<S, kEpilogue, kRelu, kComputeInput>, grid, kStepThreads, 0, stream,
         p);
}

// ---------------------------------------------------------------------------------------------------------
// Backward step

enum class BackwardEpilogue {
  lstm,
  gru_reset_after,
  gru_reset_before_update,  // everything but r's gradient
  gru_reset_before_reset,   // r's gradient, after the product d(r * h_{t-1}) = dax_n R_n
  rnn,
  initial_state,            // dh0 = the product + the carried part
};

// One step's arguments. The product is P[b, j] = sum_{k < K} A(b, k) R[R_row0 + k, j], where A(b, k) is
// a_first[b * a_first_ld + k] for k < K_first and a_second[b * a_second_ld + k - K_first] after: the
// pre-activation gradients of step t+1 along R's rows (K = 0 at the window's last step).
template <typename S>
struct BackwardStep {
  using C = Compute<S>;
  int64_t batch, hidden, gate_stride;  // B, H, G*H
  const S* R;                          // [G*H, H]
  int64_t R_row0, K, K_first;
  const C* a_first;
  int64_t a_first_ld;
  const C* a_second;
  int64_t a_second_ld;
  const S* dy;           // [B, H] dy_t
  const S* cache;        // [B, cache_width * H] step t's cache
  int64_t cache_stride;  // cache_width * H
  const S* h;            // [B, H] h_t
  const S* h_prev;       // [B, H] h_{t-1}
  const S* c_prev;       // LSTM c_{t-1} from the cache (row b at c_prev[b * cache_stride]), or null at step 0
  const C* c0;           // [B, H] LSTM c0, read for c_{t-1} at step 0
  const S* P;                   // [3, H] LSTM peephole weights, or null
  cells::LstmOptions<C> lstm;   // LSTM options, coupled included (relu is a template constant)
  const C* product_mask;  // [B, H] recurrent dropout: the mask the product's h went through (m_{t+1}), or null
  const C* step_mask;     // [B, H] recurrent dropout: m_t (GRU reset_before's r gradient), or null
  C* dh_carry;  // [B, H] in: what reaches h_t other than through R and dy; out: the same for h_{t-1}
  C* dc;        // [B, H] LSTM: dc_t in, dc_{t-1} out
  C* dax;       // [B, G*H] step t's pre-activation gradients (input path), out
  C* dar_n;     // [B, H] GRU reset_after: the gradient of R_n h_{t-1} + bR_n, out
  S* dh0;       // [B, H] initial_state: out
};

template <typename S, BackwardEpilogue kEpilogue, bool kRelu>
__device__ __forceinline__ void backward_epilogue(const BackwardStep<S>& p, int64_t b, int64_t j,
                                                  Compute<S> product) {
  using C = Compute<S>;
  const int64_t H = p.hidden, unit = b * H + j;
  if (p.product_mask != nullptr) product *= p.product_mask[unit];
  if constexpr (kEpilogue == BackwardEpilogue::initial_state) {
    p.dh0[unit] = convert<S>(product + p.dh_carry[unit]);
    return;
  } else if constexpr (kEpilogue == BackwardEpilogue::gru_reset_before_reset) {
    const C r = convert<C>(p.cache[b * p.cache_stride + j]);
    const C m = p.step_mask != nullptr ? p.step_mask[unit] : C(1);
    p.dax[b * p.gate_stride + j] =
        cells::gru_reset_gate_grad_reset_before(r, convert<C>(p.h_prev[unit]) * m, product);
    p.dh_carry[unit] += product * r * m;
    return;
  } else {
    const C dh = product + p.dh_carry[unit] + convert<C>(p.dy[unit]);
    const S* saved = p.cache + b * p.cache_stride;
    C* dax = p.dax + b * p.gate_stride;
    if constexpr (kEpilogue == BackwardEpilogue::lstm) {
      cells::LstmOptions<C> opt = p.lstm;
      opt.relu = kRelu;
      const cells::Peephole<C> peephole =
          p.P != nullptr ? cells::Peephole<C>{convert<C>(p.P[j]), convert<C>(p.P[H + j]), convert<C>(p.P[2 * H + j])}
                         : cells::Peephole<C>{C(0), C(0), C(0)};
      const C c_prev = p.c_prev != nullptr ? convert<C>(p.c_prev[b * p.cache_stride + j]) : p.c0[unit];
      const auto d = cells::lstm_backward(opt, convert<C>(saved[j]), convert<C>(saved[H + j]),
                                          convert<C>(saved[2 * H + j]), convert<C>(saved[3 * H + j]),
                                          convert<C>(saved[4 * H + j]), c_prev, dh, p.dc[unit], peephole);
      const cells::LstmBlocks blocks = cells::lstm_blocks(opt.coupled);
      if (!opt.coupled) dax[j] = d.da_i;
      dax[blocks.f * H + j] = d.da_f;
      dax[blocks.g * H + j] = d.da_g;
      dax[blocks.o * H + j] = d.da_o;
      p.dc[unit] = d.dc_prev;
      p.dh_carry[unit] = C(0);
    } else if constexpr (kEpilogue == BackwardEpilogue::gru_reset_after) {
      const auto d = cells::gru_backward_reset_after(kRelu, convert<C>(saved[j]), convert<C>(saved[H + j]),
                                                     convert<C>(saved[2 * H + j]), convert<C>(saved[3 * H + j]),
                                                     convert<C>(p.h_prev[unit]), dh);
      dax[j] = d.da_r;
      dax[H + j] = d.da_z;
      dax[2 * H + j] = d.dax_n;
      p.dar_n[unit] = d.dar_n;
      p.dh_carry[unit] = d.dh_prev;
    } else if constexpr (kEpilogue == BackwardEpilogue::gru_reset_before_update) {
      const auto d = cells::gru_backward_reset_before(kRelu, convert<C>(saved[H + j]), convert<C>(saved[2 * H + j]),
                                                      convert<C>(p.h_prev[unit]), dh);
      dax[H + j] = d.da_z;
      dax[2 * H + j] = d.dax_n;
      p.dh_carry[unit] = d.dh_prev;
    } else {
      dax[j] = cells::rnn_backward(kRelu, convert<C>(p.h[unit]), dh);
      p.dh_carry[unit] = C(0);
    }
  }
}

template <typename S, BackwardEpilogue kEpilogue, bool kRelu>
__global__ void __launch_bounds__(kStepThreads) backward_step_kernel(BackwardStep<S> p) {
  using C = Compute<S>;
  CONVEYOR_SHARED(C, a_tile, [kStepRows][kStepK + 1]);
  CONVEYOR_SHARED(C, r_tile, [kStepK][kStepUnits]);
  const int tid = threadIdx.x, tx = tid % kStepUnits, ty = tid / kStepUnits;
  const int64_t B = p.batch, H = p.hidden;
  const int64_t b0 = int64_t(blockIdx.y) * kStepRows, j0 = int64_t(blockIdx.x) * kStepUnits;
  C acc[2] = {C(0), C(0)};

  for (int64_t k0 = 0; k0 < p.K; k0 += kStepK) {
    for (int e = tid; e < kStepRows * kStepK; e += kStepThreads) {
      const int kk = e % kStepK, bb = e / kStepK;
      const int64_t b = b0 + bb, k = k0 + kk;
      C v = C(0);
      if (b < B && k < p.K) {
        v = k < p.K_first ? p.a_first[b * p.a_first_ld + k] : p.a_second[b * p.a_second_ld + (k - p.K_first)];
      }
      a_tile[bb][kk] = v;
    }
    for (int e = tid; e < kStepK * kStepUnits; e += kStepThreads) {
      const int jj = e % kStepUnits, kk = e / kStepUnits;
      const int64_t j = j0 + jj, k = k0 + kk;
      r_tile[kk][jj] = j < H && k < p.K ? convert<C>(p.R[(p.R_row0 + k) * H + j]) : C(0);
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
    if (b < B && j < H) backward_epilogue<S, kEpilogue, kRelu>(p, b, j, acc[i]);
  }
}

template <BackwardEpilogue kEpilogue, bool kRelu, typename S>
void backward_step(const BackwardStep<S>& p, cudaStream_t stream) {
  const dim3 grid(blocks_for(p.hidden, kStepUnits), blocks_for(p.batch, kStepRows));
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
  launch("dropout_mask_kernel", dropout_mask_kernel<T>, blocks, 256, 0, stream, steps, rows, units, p, variational, seed,
         mask_stream, out);
}

template <typename S>
__global__ void masked_inputs_kernel(int64_t steps, int64_t batch, int64_t hidden, bool variational,
                                     const Compute<S>* masks, const S* h0, const S* y, Compute<S>* h_products) {
  const int64_t step_size = batch * hidden, count = steps * step_size;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / step_size, i = e % step_size;
    const Compute<S> h = convert<Compute<S>>(t == 0 ? h0[i] : y[e - step_size]);
    h_products[e] = masks[(variational ? 0 : t) * step_size + i] * h;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Peephole gradients: products[tb, :] = (da_i c_{t-1}, da_f c_{t-1}, da_o c_t) per (step, batch row), summed
// over the rows afterwards by column_sums (dp_i stays 0 with coupled gates). c_t comes from the cache (S), and
// c_{t-1} at step 0 from c0 (Compute<S>), as in the backward's steps.

template <typename S>
__global__ void peephole_products_kernel(int64_t steps, int64_t batch, int64_t hidden, bool coupled,
                                         const Compute<S>* da, int64_t da_ld, const S* cache,
                                         const Compute<S>* c0, Compute<S>* products) {
  using C = Compute<S>;
  const int64_t H = hidden, cw = 5 * H, count = steps * batch * H;
  const int64_t f = coupled ? 0 : 1, o = coupled ? 2 : 3;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / H, j = e % H, t = row / batch, b = row % batch;
    const C c = convert<C>(cache[row * cw + 4 * H + j]);
    const C c_prev = t == 0 ? c0[b * H + j] : convert<C>(cache[(row - batch) * cw + 4 * H + j]);
    const C* d = da + row * da_ld;
    C* out = products + row * 3 * H;
    out[j] = coupled ? C(0) : d[j] * c_prev;
    out[H + j] = d[f * H + j] * c_prev;
    out[2 * H + j] = d[o * H + j] * c;
  }
}

template <typename S>
void peephole_grads(int64_t steps, int64_t batch, int64_t hidden, bool coupled, const Compute<S>* da, int64_t da_ld,
                    const S* cache, const Compute<S>* c0, bool accumulate, S* dP, cudaStream_t stream) {
  const NvtxRange range("conveyor::peephole_grads");
  const int64_t rows = steps * batch;
  Workspace<Compute<S>> products(rows * 3 * hidden, stream);
  const int64_t count = rows * hidden;
  const unsigned blocks = count / 256 + 1 < 4096 ? unsigned(count / 256 + 1) : 4096u;
  launch("peephole_products_kernel", peephole_products_kernel<S>, blocks, 256, 0, stream, steps, batch, hidden, coupled,
         da, da_ld, cache, c0, products.get());
  column_sums(rows, 3 * hidden, products.get(), 3 * hidden, accumulate, dP, stream);
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
};

Sizes sizes_of(const CellOptions& options, const WindowSizes& s) {
  const int64_t G = gate_count(options);
  return {s.steps, s.batch, s.input_size, s.hidden_size, G, G * s.hidden_size, cache_width(options) * s.hidden_size};
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

// The recurrent dropout masks m_t of the window, [T or 1, B, H] (none without recurrent dropout).
template <typename C>
class RecurrentMasks {
 public:
  RecurrentMasks(const CellOptions& options, int64_t steps, int64_t batch, int64_t hidden, cudaStream_t stream)
      : step_size_(batch * hidden),
        variational_(options.variational),
        masks_(options.recurrent_dropout > 0 ? (options.variational ? 1 : steps) * batch * hidden : 0, stream) {
    if (options.recurrent_dropout > 0) {
      dropout_mask(options.variational ? 1 : steps, batch, hidden, options.recurrent_dropout, options.variational,
                   options.dropout_seed, options.dropout_stream, masks_.get(), stream);
    }
  }
  bool active() const { return masks_.get() != nullptr; }
  const C* all() const { return masks_.get(); }
  // m_t, or null without dropout.
  const C* step(int64_t t) const {
    return masks_.get() == nullptr ? nullptr : masks_.get() + (variational_ ? 0 : t) * step_size_;
  }

 private:
  int64_t step_size_;
  bool variational_;
  Workspace<C> masks_;
};

template <typename S, bool kRelu>
void forward_window(const CellOptions& options, const WindowSizes& sizes, const ForwardArgs& args,
                    cudaStream_t stream) {
  using C = Compute<S>;
  const Sizes z = sizes_of(options, sizes);
  const S* x = static_cast<const S*>(args.x.data);
  const S* W = static_cast<const S*>(args.W.data);
  const S* R = static_cast<const S*>(args.R.data);
  S* y = static_cast<S*>(args.y.data);
  S* cache = args.cache.present() ? static_cast<S*>(args.cache.data) : nullptr;
  const bool lstm = options.cell == CellType::lstm;
  const bool reset_before = options.cell == CellType::gru && !options.reset_after;

  Workspace<C> ax(z.T * z.B * z.GH, stream);
  {
    NvtxRange range("conveyor::input_projection");
    gemm<S, S, C>(z.T * z.B, z.GH, z.I, rows_of(x, z.I), transpose_of(W, z.I), false, ax.get(), z.GH,
                  options.allow_tf32, stream);
  }
  const StateOrZeros<S> h0(args.h0, z.B * z.H, stream);
  Workspace<C> cell_state(lstm ? z.B * z.H : 0, stream);
  if (lstm) init_from(z.B * z.H, data_or_null<C>(args.c0), cell_state.get(), stream);  // c0 is of C
  Workspace<C> reset_hidden(reset_before ? z.B * z.H : 0, stream);
  Workspace<C> update_gate(reset_before ? z.B * z.H : 0, stream);

  const RecurrentMasks<C> masks(options, z.T, z.B, z.H, stream);
  NvtxRange range("conveyor::recurrence");
  ForwardStep<S> p{};
  p.batch = z.B;
  p.hidden = z.H;
  p.gate_stride = z.GH;
  p.R = R;
  p.bW = data_or_null<S>(args.bW);
  p.bR = data_or_null<S>(args.bR);
  p.P = data_or_null<S>(args.P);
  p.lstm = detail::lstm_options<C>(options);
  p.cell_state = cell_state.get();
  p.reset_hidden = reset_hidden.get();
  p.update_gate = update_gate.get();
  p.cache_stride = z.cw;
  for (int64_t t = 0; t < z.T; ++t) {
    p.h_prev = t == 0 ? h0.get() : y + (t - 1) * z.B * z.H;
    p.h_in = p.h_prev;
    p.mask = masks.step(t);
    p.R_row0 = 0;
    p.ax = ax.get() + t * z.B * z.GH;
    p.h = y + t * z.B * z.H;
    p.cache = cache != nullptr ? cache + t * z.B * z.cw : nullptr;
    switch (options.cell) {
      case CellType::lstm:
        if (options.coupled_gates) {
          forward_step<ForwardEpilogue::lstm_coupled, kRelu>(p, stream);
        } else {
          forward_step<ForwardEpilogue::lstm, kRelu>(p, stream);
        }
        break;
      case CellType::rnn:
        forward_step<ForwardEpilogue::rnn, kRelu>(p, stream);
        break;
      case CellType::gru:
        if (options.reset_after) {
          forward_step<ForwardEpilogue::gru_reset_after, kRelu>(p, stream);
        } else {
          forward_step<ForwardEpilogue::gru_reset_before_gates, kRelu>(p, stream);
          p.h_in = reset_hidden.get();  // r * m_t * h_{t-1}: masked already
          p.mask = nullptr;
          p.R_row0 = 2 * z.H;
          forward_step<ForwardEpilogue::gru_reset_before_output, kRelu, true>(p, stream);
        }
        break;
    }
  }

  if (args.h_T.present()) {
    CONVEYOR_CUDA_CHECK(cudaMemcpyAsync(args.h_T.data, y + (z.T - 1) * z.B * z.H, sizeof(S) * size_t(z.B * z.H),
                                        cudaMemcpyDeviceToDevice, stream));
  }
  if (args.c_T.present()) {  // c_T is of C: the state as the window carried it, unrounded
    CONVEYOR_CUDA_CHECK(cudaMemcpyAsync(args.c_T.data, cell_state.get(), sizeof(C) * size_t(z.B * z.H),
                                        cudaMemcpyDeviceToDevice, stream));
  }
}

template <typename S, bool kRelu>
void backward_window(const CellOptions& options, const WindowSizes& sizes, const BackwardArgs& args,
                     cudaStream_t stream) {
  using C = Compute<S>;
  const Sizes z = sizes_of(options, sizes);
  const int64_t B = z.B, H = z.H, GH = z.GH, TB = z.T * z.B;
  const S* x = static_cast<const S*>(args.x.data);
  const S* W = static_cast<const S*>(args.W.data);
  const S* R = static_cast<const S*>(args.R.data);
  const S* y = static_cast<const S*>(args.y.data);
  const S* cache = data_or_null<S>(args.cache);
  const S* dy = static_cast<const S*>(args.dy.data);
  const bool lstm = options.cell == CellType::lstm;
  const bool gru = options.cell == CellType::gru;
  const bool reset_after_gru = gru && options.reset_after;
  const bool reset_before_gru = gru && !options.reset_after;

  Workspace<C> dax(TB * GH, stream);
  Workspace<C> dar_n(reset_after_gru ? TB * H : 0, stream);
  Workspace<C> dh_carry(B * H, stream);
  Workspace<C> dc(lstm ? B * H : 0, stream);
  init_from(B * H, data_or_null<S>(args.dh_T), dh_carry.get(), stream);
  if (lstm) init_from(B * H, data_or_null<C>(args.dc_T), dc.get(), stream);  // dc_T, c0 and dc0 are of C
  const StateOrZeros<S> h0(args.h0, B * H, stream);
  const StateOrZeros<C> c0(lstm ? args.c0 : TensorView{}, lstm ? B * H : 0, stream);

  const RecurrentMasks<C> masks(options, z.T, B, H, stream);
  BackwardStep<S> p{};
  p.batch = B;
  p.hidden = H;
  p.gate_stride = GH;
  p.R = R;
  p.cache_stride = z.cw;
  p.dh_carry = dh_carry.get();
  p.dc = dc.get();
  p.P = data_or_null<S>(args.P);
  p.lstm = detail::lstm_options<C>(options);
  p.c0 = c0.get();
  // The product over the pre-activation gradients of `step` (the recurrent path's, along R's rows).
  auto product_of_step = [&](int64_t step) {
    p.product_mask = masks.step(step);
    p.R_row0 = 0;
    p.a_first = dax.get() + step * B * GH;
    p.a_first_ld = GH;
    p.a_second = reset_after_gru ? dar_n.get() + step * B * H : nullptr;
    p.a_second_ld = H;
    p.K_first = gru ? 2 * H : GH;
    p.K = reset_before_gru ? 2 * H : GH;
  };

  {
    NvtxRange range("conveyor::recurrence");
    for (int64_t t = z.T - 1; t >= 0; --t) {
      p.step_mask = masks.step(t);
      if (t == z.T - 1) {
        p.K = 0;
        p.product_mask = nullptr;
      } else {
        product_of_step(t + 1);
      }
      p.dy = dy + t * B * H;
      p.cache = cache != nullptr ? cache + t * B * z.cw : nullptr;
      p.h = y + t * B * H;
      p.h_prev = t == 0 ? h0.get() : y + (t - 1) * B * H;
      if (lstm) p.c_prev = t == 0 ? nullptr : cache + (t - 1) * B * z.cw + 4 * H;  // null: c0
      p.dax = dax.get() + t * B * GH;
      p.dar_n = reset_after_gru ? dar_n.get() + t * B * H : nullptr;
      switch (options.cell) {
        case CellType::lstm:
          backward_step<BackwardEpilogue::lstm, kRelu>(p, stream);
          break;
        case CellType::rnn:
          backward_step<BackwardEpilogue::rnn, kRelu>(p, stream);
          break;
        case CellType::gru:
          if (options.reset_after) {
            backward_step<BackwardEpilogue::gru_reset_after, kRelu>(p, stream);
          } else {
            backward_step<BackwardEpilogue::gru_reset_before_update, kRelu>(p, stream);
            // d(r * h_{t-1}) = dax_n R_n, which r's gradient needs.
            p.R_row0 = 2 * H;
            p.a_first = p.dax + 2 * H;
            p.a_first_ld = GH;
            p.K = p.K_first = H;
            p.product_mask = nullptr;  // d(r * m_t * h_{t-1}) itself
            backward_step<BackwardEpilogue::gru_reset_before_reset, kRelu>(p, stream);
          }
          break;
      }
    }
    if (args.dh0.present()) {
      product_of_step(0);
      p.dh0 = static_cast<S*>(args.dh0.data);
      backward_step<BackwardEpilogue::initial_state, kRelu>(p, stream);
    }
    if (args.dc0.present()) {
      CONVEYOR_CUDA_CHECK(cudaMemcpyAsync(args.dc0.data, dc.get(), sizeof(C) * size_t(B * H),
                                          cudaMemcpyDeviceToDevice, stream));
    }
  }

  NvtxRange range("conveyor::weight_gradients");
  const bool acc = args.accumulate;
  const bool tf32 = options.allow_tf32;
  if (args.dx.present()) {
    gemm<C, S, S>(TB, z.I, GH, rows_of<C>(dax.get(), GH), rows_of(W, z.I), false, static_cast<S*>(args.dx.data), z.I,
                  tf32, stream);
  }
  if (args.dW.present()) {
    gemm<C, S, S>(GH, z.I, TB, transpose_of<C>(dax.get(), GH), rows_of(x, z.I), acc, static_cast<S*>(args.dW.data),
                  z.I, tf32, stream);
  }
  if (args.dbW.present()) column_sums(TB, GH, dax.get(), GH, acc, static_cast<S*>(args.dbW.data), stream);
  if (args.dP.present()) {
    peephole_grads(z.T, B, H, options.coupled_gates, dax.get(), GH, cache, c0.get(), acc,
                   static_cast<S*>(args.dP.data), stream);
  }

  // dR[row0 : row0 + rows] = sum over steps of da_t^T h_{t-1}, where da (leading dimension lda) holds the
  // gradients of those rows' pre-activations. Step 0 reads h0 and later steps read y: two products.
  Workspace<C> h_products(masks.active() && args.dR.present() ? TB * H : 0, stream);
  if (h_products.get() != nullptr) {
    const unsigned blocks = TB * H / 256 + 1 < 4096 ? unsigned(TB * H / 256 + 1) : 4096u;
    launch("masked_inputs_kernel", masked_inputs_kernel<S>, blocks, 256, 0, stream, z.T, B, H, options.variational,
           masks.all(), h0.get(), y, h_products.get());
  }
  auto recurrent_weight_grad = [&](int64_t row0, int64_t rows, const C* da, int64_t lda) {
    S* out = static_cast<S*>(args.dR.data) + row0 * H;
    if (h_products.get() != nullptr) {
      gemm<C, C, S>(rows, H, TB, transpose_of(da, lda), rows_of<C>(h_products.get(), H), acc, out, H, tf32, stream);
      return;
    }
    gemm<C, S, S>(rows, H, TB - B, transpose_of(da + B * lda, lda), rows_of(y, H), acc, out, H, tf32, stream);
    if (args.h0.present()) {
      gemm<C, S, S>(rows, H, B, transpose_of(da, lda), rows_of(h0.get(), H), true, out, H, tf32, stream);
    }
  };
  if (args.dR.present()) {
    if (!gru) {
      recurrent_weight_grad(0, GH, dax.get(), GH);
    } else {
      recurrent_weight_grad(0, 2 * H, dax.get(), GH);
      if (options.reset_after) {
        recurrent_weight_grad(2 * H, H, dar_n.get(), H);
      } else {
        // The n block's product read r * h_{t-1}, saved in the cache's fourth column block.
        gemm<C, S, S>(H, H, TB, transpose_of<C>(dax.get() + 2 * H, GH), rows_of(cache + 3 * H, z.cw), acc,
                      static_cast<S*>(args.dR.data) + 2 * H * H, H, tf32, stream);
      }
    }
  }
  if (args.dbR.present()) {
    S* dbR = static_cast<S*>(args.dbR.data);
    if (reset_after_gru) {
      column_sums(TB, 2 * H, dax.get(), GH, acc, dbR, stream);
      column_sums(TB, H, dar_n.get(), H, acc, dbR + 2 * H, stream);
    } else {
      column_sums(TB, GH, dax.get(), GH, acc, dbR, stream);
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
  }
  throw DTypeError("out: unknown dtype " + std::to_string(static_cast<int>(out.dtype)));
}

}  // namespace conveyor::detail
