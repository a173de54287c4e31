// What a step of a window computes, shared by the per-step kernels (recurrence.cu) and the persistent ones
// (persistent.cu): a step's arguments (ForwardStep, BackwardStep), where they point at step t of a window
// (ForwardWindow, BackwardWindow), and the cell math applied to a unit once its recurrent product is formed
// (forward_epilogue, backward_epilogue). Device code for both builds, GPU and emulated.
//
// With the LSTM's projection (W_hr [P, H]), h has P units and the cell H: arrays over h (h_in, h_prev, h, y,
// dy, the masks, dh_carry, dh0) and R's rows are P wide, and the cell's arrays H wide. The projection's own
// products (h_t = m_t W_hr^T, and (dy_t + dh_t) W_hr back) run between the step's kernels (recurrence.cu);
// without one P = H.
//
// Zoneout (h_t = d h_{t-1} + (1 - d) h~_t, the LSTM's c likewise) is part of the epilogues, on both paths; where
// h~_t is formed after the step's kernel (a projection, layer normalisation's output), the kernel that forms it
// (regularisers.cu) applies it. Layer normalisation's row statistics span every unit of a row: on the per-step
// path row kernels (regularisers.cu) run between the step's kernels, and the forward's step kernel then takes
// the normalised recurrent pre-activations instead of forming the product (`recurrent`); the persistent kernels
// combine each block's part of a row after a grid barrier (persistent.cu). Both use layer_norm.cuh's math.
#pragma once

#include "cells/dropout.h"
#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "device.cuh"

namespace conveyor::cuda {

// ---------------------------------------------------------------------------------------------------------
// Zoneout

// Zoneout's draws (CellOptions::zoneout, zoneout_cell; cells::zoneout_keep): the keep factor d of unit `unit` of
// packed row b at `step`, drawn as the batch's row order[b]. z = 0: no zoneout of that state.
struct Zoneout {
  double h = 0, c = 0;  // z of h and of the LSTM's c
  bool sample = true;   // training: d is 0 or 1, drawn; evaluation: d = z
  uint64_t seed = 0, h_stream = 0, c_stream = 0;
  const int64_t* order = nullptr;  // [B] in device memory, or null: packed row b is row b
  int64_t step = 0;                // counted in the order the window runs

  __host__ __device__ double keep(double z, uint64_t stream, int64_t b, int64_t unit) const {
    return cells::zoneout_keep<double>(z, sample, seed, stream, uint64_t(order != nullptr ? order[b] : b),
                                       uint64_t(unit), uint64_t(step));
  }
  __host__ __device__ double keep_h(int64_t b, int64_t unit) const { return keep(h, h_stream, b, unit); }
  __host__ __device__ double keep_c(int64_t b, int64_t unit) const { return keep(c, c_stream, b, unit); }
};

// d previous + (1 - d) state: a state after zoneout.
template <typename C>
__host__ __device__ __forceinline__ C zone_out(C keep, C previous, C state) {
  return keep * previous + (C(1) - keep) * state;
}

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
  int64_t output_size;                 // P: the units of h_in, h and each row of R (H without a projection)
  const S* R;                          // [G*H, P]
  int64_t R_row0;                      // R's row of the product's first gate block (2H for the n block)
  const void* h_in;                    // [B, P] the product's vector: h_{t-1} (S) or r * h_{t-1} (C)
  const C* ax;                         // [B, G*H] x_t W^T, without bias
  const S* bW;                         // [G*H] or null
  const S* bR;                         // [G*H] or null
  const S* P;                          // [3, H] LSTM peephole weights p_i, p_f, p_o, or null
  cells::LstmOptions<C> lstm;          // LSTM options (relu and coupled are template constants)
  const C* mask;                       // [B, P] recurrent dropout mask m_t on the product's h, or null
  const S* h_prev;                     // [B, P] h_{t-1}
  C* cell_state;                       // [B, H] LSTM: c_{t-1} in, c_t out
  C* reset_hidden;                     // [B, H] GRU reset_before: r * h_{t-1}, out
  C* update_gate;                      // [B, H] GRU reset_before: z, from the gates pass to the output pass
  S* h;                                // [B, P] h_t (y_t); with a projection, formed after the step's kernel
  C* cell_output;  // [B, H] LSTM with a projection: o * act(c_t), written instead of h_t for W_hr; else null
  S* cache;                            // [B, cache_width * H] or null (inference)
  int64_t cache_stride;                // cache_width * H
  Zoneout zoneout;                     // of h_t (over P) and the LSTM's c_t
  // [B, G*H] layer normalisation: every gate's LN(R h_{t-1}; gamma_h), formed before the kernel, which then forms
  // no product and reads these instead; else null.
  const C* recurrent;
  // [B, 2H] the LSTM with layer normalisation: o and the cell's own c_t of each row, written instead of h_t (or
  // cell_output) for the row kernel that forms o * act(LN(c_t)); else null.
  C* norm_inputs;
};

// h~_t after zoneout, for unit j (of P) of row b: d h_{t-1} + (1 - d) h~_t, or h~_t without zoneout.
template <typename S>
__device__ __forceinline__ Compute<S> hidden_after_zoneout(const ForwardStep<S>& p, int64_t b, int64_t j,
                                                           Compute<S> h) {
  using C = Compute<S>;
  if (p.zoneout.h == 0) return h;
  return zone_out(C(p.zoneout.keep_h(b, j)), convert<C>(p.h_prev[b * p.output_size + j]), h);
}

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
    const C c_prev = p.cell_state[unit];
    const auto s = cells::lstm_forward(opt, a_i, input(kF) + (product[kF] + recurrent_bias(kF)),
                                       input(kG) + (product[kG] + recurrent_bias(kG)),
                                       input(kO) + (product[kO] + recurrent_bias(kO)), c_prev, peephole);
    // The state handed on: c_t, or with zoneout_cell d c_{t-1} + (1 - d) c_t.
    const C c_carried = p.zoneout.c > 0 ? zone_out(C(p.zoneout.keep_c(b, j)), c_prev, s.c) : s.c;
    p.cell_state[unit] = c_carried;
    if (p.norm_inputs != nullptr) {
      p.norm_inputs[b * 2 * H + j] = s.o;
      p.norm_inputs[b * 2 * H + H + j] = s.c;
    } else if (p.cell_output != nullptr) {
      p.cell_output[unit] = s.h;  // kept in C: the projection's product rounds once, to h_t
    } else {
      p.h[unit] = convert<S>(hidden_after_zoneout(p, b, j, s.h));
    }
    if (cache != nullptr) {
      cache[j] = convert<S>(s.i);
      cache[H + j] = convert<S>(s.f);
      cache[2 * H + j] = convert<S>(s.g);
      cache[3 * H + j] = convert<S>(s.o);
      cache[4 * H + j] = cell_state_for_cache<S>(s.c, opt.cell_clip);
      if (p.zoneout.c > 0) cache[5 * H + j] = convert<S>(c_carried);
    }
  } else if constexpr (kEpilogue == ForwardEpilogue::gru_reset_after) {
    const C r = cells::sigmoid(input(0) + (product[0] + recurrent_bias(0)));
    const C z = cells::sigmoid(input(1) + (product[1] + recurrent_bias(1)));
    const C ar_n = product[2] + recurrent_bias(2);
    const C n = cells::gru_candidate_reset_after(kRelu, input(2), r, ar_n);
    p.h[unit] = convert<S>(hidden_after_zoneout(p, b, j, cells::gru_output(z, n, convert<C>(p.h_prev[unit]))));
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
    p.h[unit] = convert<S>(
        hidden_after_zoneout(p, b, j, cells::gru_output(p.update_gate[unit], n, convert<C>(p.h_prev[unit]))));
    if (cache != nullptr) cache[2 * H + j] = convert<S>(n);
  } else {
    p.h[unit] = convert<S>(cells::rnn_forward(kRelu, input(0) + (product[0] + recurrent_bias(0))));
  }
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
  projection,               // dh_total = the product + the carried part + dy_t: what reaches h_t = W_hr m_t
};

// Whether an epilogue's units are h's (P, and the product's outputs), not the cell's (H).
__host__ __device__ constexpr bool over_hidden_state(BackwardEpilogue e) {
  return e == BackwardEpilogue::initial_state || e == BackwardEpilogue::projection;
}

// One step's arguments. The product is D[b, j] = sum_{k < K} A(b, k) R[R_row0 + k, j], where A(b, k) is
// a_first[b * a_first_ld + k] for k < K_first and a_second[b * a_second_ld + k - K_first] after, for the
// product_batch rows of step t+1 (0 past them: rows whose last step is t): the pre-activation gradients of
// step t+1 along R's rows (K = 0 at the window's last step).
template <typename S>
struct BackwardStep {
  using C = Compute<S>;
  int64_t batch, hidden, gate_stride;  // B, H, G*H
  int64_t output_size;                 // P: the units of h, and the columns of R (H without a projection)
  const S* R;                          // [G*H, P]
  int64_t R_row0, K, K_first, product_batch;
  const C* a_first;
  int64_t a_first_ld;
  const C* a_second;
  int64_t a_second_ld;
  const S* dy;           // [B, P] dy_t
  const S* cache;        // [B, cache_width * H] step t's cache
  int64_t cache_stride;  // cache_width * H
  const S* h;            // [B, P] h_t
  const S* h_prev;       // [B, P] h_{t-1}
  const S* c_prev;       // LSTM c_{t-1} from the cache (row b at c_prev[b * cache_stride]), or null at step 0
  const C* c0;           // [B, H] LSTM c0, read for c_{t-1} at step 0
  const S* P;                   // [3, H] LSTM peephole weights, or null
  cells::LstmOptions<C> lstm;   // LSTM options, coupled included (relu is a template constant)
  const C* product_mask;  // [B, P] recurrent dropout: the mask the product's h went through (m_{t+1}), or null
  const C* step_mask;     // [B, P] recurrent dropout: m_t (GRU reset_before's r gradient), or null
  C* dh_carry;  // [B, P] in: what reaches h_t other than through R and dy; out: the same for h_{t-1}
  C* dc;        // [B, H] LSTM: dc_t in, dc_{t-1} out
  C* dax;       // [B, G*H] step t's pre-activation gradients (input path), out
  C* dar_n;     // [B, H] GRU reset_after: the gradient of R_n h_{t-1} + bR_n, out
  S* dh0;       // [B, P] initial_state: out
  C* dh_total;  // [B, P] projection: out (dW_hr pairs it with m_t)
  // [B, H] LSTM with a projection: (dy_t + dh_t) W_hr, the gradient reaching m_t = o * act(c_t). The LSTM
  // epilogue then takes it as its whole dh: no product, and dy_t and dh_carry went into dh_total. Else null.
  const C* d_cell_output;
  // Zoneout: of the gradient reaching h_t (c_t), the part d * (.) goes straight on to h_{t-1} (c_{t-1}) in dh_carry
  // (dc), and the cell's backward (or the projection's) takes (1 - d) * (.).
  Zoneout zoneout;
};

// The units an epilogue runs over: h's for the gradients of h itself, else the cell's.
template <BackwardEpilogue kEpilogue, typename S>
__host__ __device__ int64_t epilogue_units(const BackwardStep<S>& p) {
  return over_hidden_state(kEpilogue) ? p.output_size : p.hidden;
}

// What the LSTM's backward at unit j of row b takes besides the cache: the peephole weights, c_{t-1}, and dc_t
// split by zoneout_cell into the cell's part (dc) and the part that goes straight on to c_{t-1} (dc_kept).
template <typename C>
struct LstmBackwardInputs {
  cells::Peephole<C> peephole;
  C c_prev, dc, dc_kept;
};

template <typename S>
__device__ __forceinline__ LstmBackwardInputs<Compute<S>> lstm_backward_inputs(const BackwardStep<S>& p, int64_t b,
                                                                               int64_t j) {
  using C = Compute<S>;
  const int64_t H = p.hidden, unit = b * H + j;
  LstmBackwardInputs<C> in;
  in.peephole = p.P != nullptr
                    ? cells::Peephole<C>{convert<C>(p.P[j]), convert<C>(p.P[H + j]), convert<C>(p.P[2 * H + j])}
                    : cells::Peephole<C>{C(0), C(0), C(0)};
  in.c_prev = p.c_prev != nullptr ? convert<C>(p.c_prev[b * p.cache_stride + j]) : p.c0[unit];
  in.dc = p.dc[unit];
  in.dc_kept = C(0);
  if (p.zoneout.c > 0) {
    const C keep = C(p.zoneout.keep_c(b, j));
    in.dc_kept = keep * in.dc;
    in.dc = (C(1) - keep) * in.dc;
  }
  return in;
}

template <typename S, BackwardEpilogue kEpilogue, bool kRelu>
__device__ __forceinline__ void backward_epilogue(const BackwardStep<S>& p, int64_t b, int64_t j,
                                                  Compute<S> product) {
  using C = Compute<S>;
  const int64_t H = p.hidden, unit = b * epilogue_units<kEpilogue>(p) + j;
  // The mask covers the product's rows only: a row past them (its last step is t) has no product.
  if (p.product_mask != nullptr && b < p.product_batch) product *= p.product_mask[unit];
  if constexpr (kEpilogue == BackwardEpilogue::initial_state) {
    p.dh0[unit] = convert<S>(product + p.dh_carry[unit]);
    return;
  } else if constexpr (kEpilogue == BackwardEpilogue::projection) {
    const C total = product + p.dh_carry[unit] + convert<C>(p.dy[unit]);
    if (p.zoneout.h > 0) {
      const C keep = C(p.zoneout.keep_h(b, j));
      p.dh_total[unit] = (C(1) - keep) * total;
      p.dh_carry[unit] = keep * total;
    } else {
      p.dh_total[unit] = total;
      p.dh_carry[unit] = C(0);
    }
    return;
  } else if constexpr (kEpilogue == BackwardEpilogue::gru_reset_before_reset) {
    const C r = convert<C>(p.cache[b * p.cache_stride + j]);
    const C m = p.step_mask != nullptr ? p.step_mask[unit] : C(1);
    p.dax[b * p.gate_stride + j] =
        cells::gru_reset_gate_grad_reset_before(r, convert<C>(p.h_prev[unit]) * m, product);
    p.dh_carry[unit] += product * r * m;
    return;
  } else {
    const bool projected = kEpilogue == BackwardEpilogue::lstm && p.d_cell_output != nullptr;
    C dh = projected ? p.d_cell_output[unit] : product + p.dh_carry[unit] + convert<C>(p.dy[unit]);
    C dh_kept = C(0);  // zoneout's part of dh, for dh_{t-1}
    if (!projected && p.zoneout.h > 0) {
      const C keep = C(p.zoneout.keep_h(b, j));
      dh_kept = keep * dh;
      dh = (C(1) - keep) * dh;
    }
    const S* saved = p.cache + b * p.cache_stride;
    C* dax = p.dax + b * p.gate_stride;
    if constexpr (kEpilogue == BackwardEpilogue::lstm) {
      cells::LstmOptions<C> opt = p.lstm;
      opt.relu = kRelu;
      const LstmBackwardInputs<C> in = lstm_backward_inputs(p, b, j);
      const auto d = cells::lstm_backward(opt, convert<C>(saved[j]), convert<C>(saved[H + j]),
                                          convert<C>(saved[2 * H + j]), convert<C>(saved[3 * H + j]),
                                          convert<C>(saved[4 * H + j]), in.c_prev, dh, in.dc, in.peephole);
      const cells::LstmBlocks blocks = cells::lstm_blocks(opt.coupled);
      if (!opt.coupled) dax[j] = d.da_i;
      dax[blocks.f * H + j] = d.da_f;
      dax[blocks.g * H + j] = d.da_g;
      dax[blocks.o * H + j] = d.da_o;
      p.dc[unit] = p.zoneout.c > 0 ? d.dc_prev + in.dc_kept : d.dc_prev;
      if (!projected) p.dh_carry[unit] = dh_kept;  // with a projection, dh_carry is P wide and spent already
    } else if constexpr (kEpilogue == BackwardEpilogue::gru_reset_after) {
      const auto d = cells::gru_backward_reset_after(kRelu, convert<C>(saved[j]), convert<C>(saved[H + j]),
                                                     convert<C>(saved[2 * H + j]), convert<C>(saved[3 * H + j]),
                                                     convert<C>(p.h_prev[unit]), dh);
      dax[j] = d.da_r;
      dax[H + j] = d.da_z;
      dax[2 * H + j] = d.dax_n;
      p.dar_n[unit] = d.dar_n;
      p.dh_carry[unit] = p.zoneout.h > 0 ? d.dh_prev + dh_kept : d.dh_prev;
    } else if constexpr (kEpilogue == BackwardEpilogue::gru_reset_before_update) {
      const auto d = cells::gru_backward_reset_before(kRelu, convert<C>(saved[H + j]), convert<C>(saved[2 * H + j]),
                                                      convert<C>(p.h_prev[unit]), dh);
      dax[H + j] = d.da_z;
      dax[2 * H + j] = d.dax_n;
      p.dh_carry[unit] = p.zoneout.h > 0 ? d.dh_prev + dh_kept : d.dh_prev;
    } else {
      dax[j] = cells::rnn_backward(kRelu, convert<C>(p.h[unit]), dh);
      p.dh_carry[unit] = C(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Windows: where step t's arguments point. The per-step path sets them on the host before each launch, the
// persistent kernels on the device at each step: one definition serves both.

// Where step t's rows lie in a window's per-step arrays. Without lengths, rows t * B .. (t + 1) * B - 1.
// With them (csrc/core/packing.h), the arrays are packed: rows offsets[t] .. offsets[t + 1] - 1, the
// batch's rows sorted by decreasing length, so that step t's rows are the first count(t) rows of step
// t - 1's. `offsets` must be readable where the window is used: host memory for the per-step path's host
// code, device memory for the persistent kernels.
struct StepRows {
  const int64_t* offsets;  // [steps + 1], or null
  int64_t batch;

  __host__ __device__ int64_t first(int64_t t) const { return offsets != nullptr ? offsets[t] : t * batch; }
  __host__ __device__ int64_t count(int64_t t) const {
    return offsets != nullptr ? offsets[t + 1] - offsets[t] : batch;
  }
  // The step of packed row `row` (binary search over offsets).
  __host__ __device__ int64_t step_of(int64_t row, int64_t steps) const {
    if (offsets == nullptr) return row / batch;
    int64_t low = 0, high = steps - 1;
    while (low < high) {
      const int64_t mid = (low + high + 1) / 2;
      if (offsets[mid] <= row) {
        low = mid;
      } else {
        high = mid - 1;
      }
    }
    return low;
  }
};

// m_t in a window's recurrent dropout masks over h (a row of `units` per packed row of every step; [B, units],
// one for every step, when variational), or null.
template <typename C>
__host__ __device__ inline const C* recurrent_mask_at(const C* masks, bool variational, const StepRows& rows,
                                                      int64_t t, int64_t units) {
  return masks != nullptr ? masks + (variational ? 0 : rows.first(t)) * units : nullptr;
}

// A forward window: `base` holds what every step shares; step(t) points the rest at step t.
template <typename S>
struct ForwardWindow {
  using C = Compute<S>;
  ForwardStep<S> base;       // base.batch: B
  int64_t steps;
  StepRows rows;
  const S* h0;               // [B, P]
  S* y;                      // [T, B, P]
  S* cache;                  // [T, B, cache_width * H] or null
  const C* ax;               // [T, B, G*H] x W^T
  const C* masks;            // [T or 1, B, P] recurrent dropout masks, or null
  bool variational;          // one mask for every step
  const S* W_hr;             // [P, H] the LSTM's projection, or null (the per-step path's host code reads it)
  // Layer normalisation (else null): the gains (gamma_x's norm ran before the steps), and one step's scratch:
  // every gate's R h_{t-1} [B, G*H] (on the per-step path normalised in place, and base.recurrent points at it;
  // the persistent kernel keeps it raw), and under recurrent dropout m_t * h_{t-1} [B, P], the per-step product's
  // input. The persistent kernel's part_moments: each block's moments (mean, sum of squared deviations) of its
  // part of every row, of R h_{t-1} [B][blocks][2] and then of the LSTM's c_t [B][blocks][2].
  const S* gamma_h;
  const S* gamma_c;
  const S* beta_c;
  C* recurrent;
  C* masked_hidden;
  C* part_moments;
  // R in the compute type, for that product under recurrent dropout when S is a 16-bit type (its product with a
  // float m_t * h_{t-1} then runs in float, as the step kernels' does; gemm.cuh would round m_t * h_{t-1} to 16
  // bits or TF32 for a 16-bit R); else null.
  const C* R_compute;
  // Zoneout with a projection (else null): one step's m_t W_hr^T [B, P], which zoneout then mixes with h_{t-1}.
  C* projected;

  // Step t's arguments, for the product over h_{t-1} (for the GRU with reset_before, the r and z gates').
  __host__ __device__ ForwardStep<S> step(int64_t t) const {
    ForwardStep<S> p = base;
    const int64_t P = base.output_size, first = rows.first(t);
    p.batch = rows.count(t);
    p.zoneout.step = t;
    p.h_prev = t == 0 ? h0 : y + rows.first(t - 1) * P;
    p.h_in = p.h_prev;
    p.mask = recurrent_mask_at(masks, variational, rows, t, P);
    p.R_row0 = 0;
    p.ax = ax + first * base.gate_stride;
    p.h = y + first * P;
    p.cache = cache != nullptr ? cache + first * base.cache_stride : nullptr;
    return p;
  }

  // The GRU with reset_before, second phase: the n block's product over r * m_t * h_{t-1} (masked already).
  __host__ __device__ static void to_output_phase(ForwardStep<S>& p) {
    p.h_in = p.reset_hidden;
    p.mask = nullptr;
    p.R_row0 = 2 * p.hidden;
  }
};

// A backward window: `base` holds what every step shares; step(t) points the rest at step t.
template <typename S>
struct BackwardWindow {
  using C = Compute<S>;
  BackwardStep<S> base;      // base.batch: B
  int64_t steps;
  StepRows rows;
  C* dax;                    // [T, B, G*H] pre-activation gradients, written step by step
  C* dar_n;                  // [T, B, H] GRU reset_after: the gradient of R_n h_{t-1} + bR_n, or null
  const C* masks;            // [T or 1, B, P] recurrent dropout masks, or null
  bool variational;
  bool lstm, gru, reset_after;
  const S* dy;               // [T, B, P]
  const S* cache;            // [T, B, cache_width * H]
  const S* y;                // [T, B, P]
  const S* h0;               // [B, P]
  // With the LSTM's projection (else null): W_hr [P, H], read by the per-step path's host code; every step's
  // dh_total [T, B, P], for dW_hr; and one step's (dy_t + dh_t) W_hr [B, H].
  const S* W_hr;
  C* dh_totals;
  C* d_cell_output;
  // Layer normalisation (else null): the gains; every step's gradient of R h_{t-1} before its norm [T, B, G*H],
  // which the products with R (and dR) take; and each row's parts of the gains' gradients, of gamma_h
  // [T, B, G*H], gamma_c and beta_c [T, B, H] (null where not wanted). The persistent kernel's too: every row's
  // statistics (mean, rstd) of its raw R h_{t-1} and of the LSTM's c_t [T, B][2], formed before its loop, and
  // each block's sums (of d * gamma and d * gamma * v_hat) over its part of every row, for LN(c_t)'s backward
  // [B][blocks][2] and then for LN(R h_{t-1})'s [B][blocks][2].
  const S* gamma_h;
  const S* gamma_c;
  const S* beta_c;
  C* d_recurrent;
  C* d_gamma_h;
  C* d_gamma_c;
  C* d_beta_c;
  const C* recurrent_statistics;
  const C* cell_statistics;
  C* part_sums;

  __host__ __device__ const C* mask(int64_t t) const {
    return recurrent_mask_at(masks, variational, rows, t, base.output_size);
  }

  // Points p's product at the pre-activation gradients of `step` (the recurrent path's, along R's rows).
  __host__ __device__ void product_of_step(BackwardStep<S>& p, int64_t step) const {
    const int64_t H = base.hidden, GH = base.gate_stride, first = rows.first(step);
    p.product_mask = mask(step);
    p.R_row0 = 0;
    p.product_batch = rows.count(step);
    p.a_first = dax + first * GH;
    p.a_first_ld = GH;
    p.a_second = gru && reset_after ? dar_n + first * H : nullptr;
    p.a_second_ld = H;
    p.K_first = gru ? 2 * H : GH;
    p.K = gru && !reset_after ? 2 * H : GH;
    if (d_recurrent != nullptr) {  // layer normalisation: every gate's gradient before the norm
      p.a_first = d_recurrent + first * GH;
      p.a_second = nullptr;
      p.K_first = p.K = GH;
    }
  }

  // Step t's arguments (for the GRU with reset_before, the phase of every gradient but r's).
  __host__ __device__ BackwardStep<S> step(int64_t t) const {
    BackwardStep<S> p = base;
    const int64_t H = base.hidden, P = base.output_size, first = rows.first(t);
    p.batch = rows.count(t);
    p.zoneout.step = t;
    p.step_mask = mask(t);
    if (t == steps - 1) {
      p.K = 0;
      p.product_batch = 0;
      p.product_mask = nullptr;
    } else {
      product_of_step(p, t + 1);
    }
    p.dy = dy + first * P;
    p.cache = cache != nullptr ? cache + first * base.cache_stride : nullptr;
    p.h = y + first * P;
    p.h_prev = t == 0 ? h0 : y + rows.first(t - 1) * P;
    p.dh_total = dh_totals != nullptr ? dh_totals + first * P : nullptr;
    // c_{t-1} as step t - 1 handed it on: c_t, or after zoneout (the cache's sixth column); null: c0.
    const int64_t carried = (base.zoneout.c > 0 ? 5 : 4) * H;
    if (lstm) p.c_prev = t == 0 ? nullptr : cache + rows.first(t - 1) * base.cache_stride + carried;
    p.dax = dax + first * base.gate_stride;
    p.dar_n = gru && reset_after ? dar_n + first * H : nullptr;
    return p;
  }

  // The GRU with reset_before, second phase: d(r * m_t * h_{t-1}) = dax_n R_n, which r's gradient needs.
  __host__ __device__ static void to_reset_phase(BackwardStep<S>& p) {
    p.R_row0 = 2 * p.hidden;
    p.a_first = p.dax + 2 * p.hidden;
    p.a_first_ld = p.gate_stride;
    p.K = p.K_first = p.hidden;
    p.product_batch = p.batch;  // step t's own rows
    p.product_mask = nullptr;  // d(r * m_t * h_{t-1}) itself
  }

  // With a projection, the LSTM's phase after dh_total and the projection's product: the cell's backward from
  // d_cell_output alone, with no product (step t+1's went into dh_total).
  __host__ __device__ void to_cell_phase(BackwardStep<S>& p) const {
    p.K = 0;
    p.product_batch = 0;
    p.product_mask = nullptr;
    p.d_cell_output = d_cell_output;
  }

  // The arguments of dh0 = (the product over step 0's gradients) + what dh_carry holds.
  __host__ __device__ BackwardStep<S> initial_state(S* dh0) const {
    BackwardStep<S> p = base;
    product_of_step(p, 0);
    p.dh0 = dh0;
    return p;
  }
};

}  // namespace conveyor::cuda
