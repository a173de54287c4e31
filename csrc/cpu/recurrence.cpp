// The CPU backend: forward and backward over a window for every cell.
//
// Forward: one matrix product projects the whole window's input (x W^T + bW, all T*B rows at once), then the
// time loop does, per step, the recurrent product h_{t-1} R^T and the fused per-element cell math of
// csrc/cells/. Backward walks the steps in reverse, keeping the gradients of the pre-activations of every
// step, and afterwards forms dx, dW and dR each with one product over the whole window. Nothing of the
// forward pass is recomputed: backward reads the cache that forward wrote.
//
// All views have been checked by api.cpp: shapes, one dtype, C-contiguous, on the CPU.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cells/dropout.h"
#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "core/backends.h"
#include "core/packing.h"
#include "gemm.h"
#include "thread_pool.h"

namespace conveyor::detail {
namespace {

using cpu::gemm;
using cpu::MatrixRef;
using cpu::PackedMatrix;

template <typename T>
const T* data_or_null(const TensorView& v) {
  return v.present() ? static_cast<const T*>(v.data) : nullptr;
}
template <typename T>
T* mutable_or_null(const TensorView& v) {
  return v.present() ? static_cast<T*>(v.data) : nullptr;
}

// Runs fn(b) for every batch row, split over the pool when the rows carry enough work.
template <typename Fn>
void for_each_row(int64_t rows, double work_per_row, const Fn& fn) {
  const int64_t tasks = cpu::parallel_tasks_for(work_per_row * rows, rows);
  const int64_t per_task = (rows + tasks - 1) / tasks;
  cpu::parallel_for(tasks, [&](int64_t task) {
    const int64_t end = std::min(rows, (task + 1) * per_task);
    for (int64_t b = task * per_task; b < end; ++b) fn(b);
  });
}

// Calls fn with std::true_type or std::false_type, so that a run-time flag becomes a compile-time constant
// in fn's body (the per-element loops then have no branch in them and vectorise).
template <typename Fn>
void bool_switch(bool flag, Fn&& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// A row's element loop, kUnits(n, args...) over units [0, n): where the processor has AVX-512 (and GCC compiles),
// the whole 64-byte vectors' worth of units go to a copy of the loop built for 512-bit vectors, and the rest to
// one built for 256-bit ones. GCC builds loops for 256-bit vectors by default, and the cell math is most of a
// row's work: a plain LSTM's forward row took 3.4-3.9 ns a unit in 512-bit vectors against 5.0-5.5 in 256-bit ones
// (H = 32 to 112, Ice Lake Xeon). One copy of 512-bit vectors for the whole row is no good: the units past its
// last whole vector (4 of them at H = 36 or 100) ran one at a time through branches, 30 ns a unit, where the
// 256-bit copy takes them in 128-bit vectors. Every copy computes an element with the same operations: the same
// bits whichever ran it. kUnits is inlined into each copy (CONVEYOR_INLINE_LOOP); its first argument is the
// number of units, and every pointer argument starts at the first unit (the rest's pointers move on by as many).
//
// Inlined, a loop's __restrict arguments lose their meaning to GCC 12, and the runtime checks of every pair of
// arrays it would then need are more than it makes: the loop stays scalar. Iteration j reads and writes only
// unit j of arrays that do not overlap (__restrict said it before): no iteration depends on another, which
// CONVEYOR_INDEPENDENT_ITERATIONS tells the compiler. Without it, on an AVX2 build (Zen 3) the LSTM's backward
// row ran one unit at a time, 11 ns a unit, 7% of a forward + backward at T=64, B=32, H=256.
#if defined(__GNUC__) && !defined(__clang__)
#define CONVEYOR_INDEPENDENT_ITERATIONS _Pragma("GCC ivdep")
#elif defined(__clang__)
#define CONVEYOR_INDEPENDENT_ITERATIONS _Pragma("clang loop vectorize(assume_safety)")
#else
#define CONVEYOR_INDEPENDENT_ITERATIONS
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#define CONVEYOR_INLINE_LOOP __attribute__((always_inline)) inline
template <auto kUnits, typename... Args>
__attribute__((noinline, target("prefer-vector-width=512"))) void in_wide_vectors(int64_t n, Args... args) {
  kUnits(n, args...);
}
template <auto kUnits, typename... Args>
__attribute__((noinline, target("prefer-vector-width=256"))) void in_narrow_vectors(int64_t n, Args... args) {
  kUnits(n, args...);
}
template <typename A>
A moved_on(A arg, int64_t units) {
  if constexpr (std::is_pointer_v<A>) {
    return arg + units;
  } else {
    return arg;
  }
}
template <typename T, auto kUnits, typename... Args>
void over_units(int64_t n, Args... args) {
  const int64_t whole = n / (64 / sizeof(T)) * (64 / sizeof(T));
  if (whole > 0) in_wide_vectors<kUnits>(whole, args...);
  if (whole < n) in_narrow_vectors<kUnits>(n - whole, moved_on(args, whole)...);
}
#else
#define CONVEYOR_INLINE_LOOP inline
template <typename T, auto kUnits, typename... Args>
void over_units(int64_t n, Args... args) {
  kUnits(n, args...);
}
#endif

// Per-element work is weighted as this many multiply-adds when deciding whether to split it.
constexpr double kElementCost = 16.0;

// out[r, :] (=|+=) sum over rows of m[rows, cols] with leading dimension ld.
template <typename T>
void column_sums(int64_t rows, int64_t cols, const T* m, int64_t ld, bool accumulate, T* out) {
  std::vector<T> sum(static_cast<size_t>(cols), T(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = m + r * ld;
    for (int64_t c = 0; c < cols; ++c) sum[c] += row[c];
  }
  for (int64_t c = 0; c < cols; ++c) out[c] = accumulate ? out[c] + sum[c] : sum[c];
}

// Large scratch blocks released by one window, kept for the next. Fresh from the system, a block this large is
// mapped anew by each call, and its page faults and the kernel's zeroing of the pages took 9% of a training
// window (LSTM T=64, B=32, I=H=256: forward + backward 77 -> 70 ms once no block went back to the system). A
// block serves a request of at least half its size, so that a small request does not take a large block; past
// kHeld bytes the oldest blocks go back first, so that blocks of sizes no longer asked for do not stay.
class ScratchCache {
 public:
  static constexpr size_t kSmallest = size_t(1) << 16;  // below it, malloc's own free lists serve (no mmap)
  static constexpr size_t kHeld = size_t(256) << 20;    // at most this many bytes kept
  // Blocks start on a cache line (cpu::LineAllocator), as the arrays threads write by groups of units must.
  struct Free {
    void operator()(std::byte* block) const { cpu::LineAllocator<std::byte>().deallocate(block, 0); }
  };

  static ScratchCache& instance() {
    static ScratchCache cache;
    return cache;
  }

  // A block of at least `bytes` (its size into `capacity`): the smallest kept one that fits, else a new one.
  std::byte* take(size_t bytes, size_t& capacity) {
    if (bytes >= kSmallest) {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = blocks_.end();
      for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
        if (it->capacity >= bytes && it->capacity / 2 <= bytes &&
            (best == blocks_.end() || it->capacity < best->capacity)) {
          best = it;
        }
      }
      if (best != blocks_.end()) {
        capacity = best->capacity;
        std::byte* block = best->data.release();
        blocks_.erase(best);
        held_ -= capacity;
        return block;
      }
    }
    capacity = bytes;
    return cpu::LineAllocator<std::byte>().allocate(bytes);
  }

  // Keeps the block (newest last), then frees the oldest while more than kHeld bytes are kept.
  void give(std::byte* block, size_t capacity) {
    std::unique_ptr<std::byte, Free> owned(block);
    if (capacity < kSmallest) return;
    std::lock_guard<std::mutex> lock(mutex_);
    blocks_.push_back({capacity, std::move(owned)});
    held_ += capacity;
    while (held_ > kHeld) {
      held_ -= blocks_.front().capacity;
      blocks_.erase(blocks_.begin());
    }
  }

 private:
  struct Block {
    size_t capacity;
    std::unique_ptr<std::byte, Free> data;
  };
  std::mutex mutex_;
  std::vector<Block> blocks_;  // oldest first; a window's handful of blocks, so a scan is cheap
  size_t held_ = 0;
};

// n elements left uninitialised, for the outputs of products that overwrite them whole (beta = 0): a zeroing
// std::vector spent 2% of a window clearing memory the products then overwrote. Large ones come from, and go
// back to, the ScratchCache.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) {
    if (n > 0) data_ = reinterpret_cast<T*>(ScratchCache::instance().take(sizeof(T) * size_t(n), capacity_));
  }
  ~Scratch() {
    if (data_ != nullptr) ScratchCache::instance().give(reinterpret_cast<std::byte*>(data_), capacity_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](int64_t i) { return data_[i]; }

 private:
  T* data_ = nullptr;
  size_t capacity_ = 0;
};

// The recurrent dropout masks of the window in its packed rows (core/packing.h): m_t of every step's rows,
// [tokens, H], or one [B, H] for every step when variational (empty without recurrent dropout). Packed row k
// draws the mask of the batch's row order[k].
template <typename T>
std::vector<T> recurrent_masks(const CellOptions& options, const PackedBatch& rows, int64_t H) {
  if (options.recurrent_dropout == 0) return {};
  const int64_t mask_steps = options.variational ? 1 : rows.steps;
  std::vector<T> m(static_cast<size_t>((options.variational ? rows.batch : rows.tokens()) * H));
  for (int64_t t = 0; t < mask_steps; ++t) {
    const int64_t count = options.variational ? rows.batch : rows.rows_at(t);
    const int64_t first = options.variational ? 0 : rows.offsets[t];
    for (int64_t k = 0; k < count; ++k) {
      for (int64_t u = 0; u < H; ++u) {
        m[(first + k) * H + u] = cells::dropout_mask_value<T>(options.recurrent_dropout, options.dropout_seed,
                                                               options.dropout_stream, rows.order[k], u, t);
      }
    }
  }
  return m;
}

// Between the caller's padded arrays ([T, B, width], row b in place) and the packed ones ([tokens, width]):
// packed row offsets[t] + k is step t of the batch's row order[k].
template <typename T>
void pack_rows(const PackedBatch& rows, int64_t width, const T* padded, T* packed) {
  for (int64_t t = 0; t < rows.steps; ++t) {
    for (int64_t k = 0; k < rows.rows_at(t); ++k) {
      std::memcpy(packed + (rows.offsets[t] + k) * width, padded + (t * rows.batch + rows.order[k]) * width,
                  sizeof(T) * width);
    }
  }
}

// The inverse, over all `steps` of the padded array: zeros at the steps past a row's length.
template <typename T>
void unpack_rows(const PackedBatch& rows, int64_t steps, int64_t width, const T* packed, T* padded) {
  for (int64_t t = 0; t < steps; ++t) {
    for (int64_t b = 0; b < rows.batch; ++b) {
      T* out = padded + (t * rows.batch + b) * width;
      const int64_t k = rows.rank[b];
      if (t < rows.steps && k < rows.rows_at(t)) {
        std::memcpy(out, packed + (rows.offsets[t] + k) * width, sizeof(T) * width);
      } else {
        std::fill(out, out + width, T(0));
      }
    }
  }
}

// [B, width] states into packed order (out[k] = in[order[k]]), and back.
template <typename T>
void rows_to_packed(const PackedBatch& rows, int64_t width, const T* in, T* out) {
  for (int64_t k = 0; k < rows.batch; ++k) std::memcpy(out + k * width, in + rows.order[k] * width, sizeof(T) * width);
}
template <typename T>
void rows_from_packed(const PackedBatch& rows, int64_t width, const T* in, T* out) {
  for (int64_t k = 0; k < rows.batch; ++k) std::memcpy(out + rows.order[k] * width, in + k * width, sizeof(T) * width);
}

// A padded [T, B, width] input in packed rows: the array itself when the caller's layout is the window's
// (a dense batch, or arrays given packed), else a packed copy.
template <typename T>
class PackedInput {
 public:
  PackedInput(const PackedBatch& rows, int64_t width, const T* padded)
      : copy_(rows.in_place ? 0 : rows.tokens() * width) {
    if (!rows.in_place) pack_rows(rows, width, padded, copy_.data());
    data_ = rows.in_place ? padded : copy_.data();
  }
  const T* get() const { return data_; }

 private:
  Scratch<T> copy_;
  const T* data_;
};

// A [B, width] state in packed order, or zeros where the state is absent.
template <typename T>
cpu::LineVector<T> packed_state(const PackedBatch& rows, int64_t width, const TensorView& state) {
  cpu::LineVector<T> out(static_cast<size_t>(rows.batch * width), T(0));
  if (state.present()) rows_to_packed(rows, width, static_cast<const T*>(state.data), out.data());
  return out;
}

// The rows a window runs (window_batch).
PackedBatch window_rows(const WindowSizes& s, const TensorView& lengths, bool packed) {
  const std::vector<int64_t> values = lengths.present() ? host_lengths(lengths) : std::vector<int64_t>{};
  return window_batch(lengths.present() ? &values : nullptr, s.steps, s.batch, packed);
}

// out = m * h, elementwise over n.
template <typename T>
void masked(int64_t n, const T* __restrict m, const T* __restrict h, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = m[i] * h[i];
}

// DropConnect's mask value M[r, k] (CellOptions::weight_dropout): one mask for the whole window.
template <typename T>
T weight_mask(const CellOptions& options, int64_t r, int64_t k) {
  return cells::dropout_mask_value<T>(options.weight_dropout, options.dropout_seed, options.weight_dropout_stream,
                                      r, k, 0);
}

// R * M under DropConnect, or R itself without it ([rows, cols]).
template <typename T>
class DroppedWeights {
 public:
  DroppedWeights(const CellOptions& options, int64_t rows, int64_t cols, const T* R)
      : copy_(options.weight_dropout > 0 ? rows * cols : 0) {
    data_ = R;
    if (options.weight_dropout == 0) return;
    for_each_row(rows, kElementCost * cols, [&](int64_t r) {
      for (int64_t k = 0; k < cols; ++k) copy_[r * cols + k] = R[r * cols + k] * weight_mask<T>(options, r, k);
    });
    data_ = copy_.data();
  }
  const T* get() const { return data_; }

 private:
  Scratch<T> copy_;
  const T* data_;
};

// Zoneout's keep factors (cells::zoneout_keep) of step t's rows in packed order, [rows_at(t), width].
template <typename T>
void keep_factors(const CellOptions& options, double z, uint64_t stream, const PackedBatch& rows, int64_t t,
                  int64_t width, T* out) {
  for (int64_t k = 0; k < rows.rows_at(t); ++k) {
    for (int64_t u = 0; u < width; ++u) {
      out[k * width + u] =
          cells::zoneout_keep<T>(z, options.zoneout_sample, options.dropout_seed, stream, rows.order[k], u, t);
    }
  }
}

// state (=) keep * previous + (1 - keep) * state, over n elements: zoneout of a new state.
template <typename T>
void zone_out(int64_t n, const T* __restrict keep, const T* __restrict previous, T* __restrict state) {
  for (int64_t i = 0; i < n; ++i) state[i] = keep[i] * previous[i] + (T(1) - keep[i]) * state[i];
}

// Layer normalisation (CellOptions::layer_norm) of one row of n values: out = gamma * (v - mean) * rstd + beta
// (beta absent: 0), rstd = 1 / sqrt(var + 1e-5) of the biased variance; the statistics in double. out may be v.
constexpr double kLayerNormEpsilon = 1e-5;

struct RowStatistics {
  double mean, rstd;
};

// Sums over a row in double, in kLanes independent partial sums, so that the loop vectorises without
// reassociating a single sum (the build does not allow the compiler to).
constexpr int kLanes = 8;

template <typename T, typename Term>
double row_sum(int64_t n, const Term& term) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += double(term(i + l));
  }
  double sum = 0;
  for (; i < n; ++i) sum += double(term(i));
  for (double lane : lanes) sum += lane;
  return sum;
}

template <typename T>
RowStatistics row_statistics(int64_t n, const T* v) {
  const double mean = row_sum<T>(n, [&](int64_t i) { return double(v[i]); }) / double(n);
  const double var = row_sum<T>(n, [&](int64_t i) { return (v[i] - mean) * (v[i] - mean); }) / double(n);
  return {mean, 1.0 / std::sqrt(var + kLayerNormEpsilon)};
}

template <typename T>
void layer_norm_row(int64_t n, const T* v, const T* gamma, const T* beta, T* out) {
  const RowStatistics s = row_statistics(n, v);
  const T mean = static_cast<T>(s.mean), rstd = static_cast<T>(s.rstd);
  for (int64_t i = 0; i < n; ++i) out[i] = gamma[i] * ((v[i] - mean) * rstd) + (beta != nullptr ? beta[i] : T(0));
}

// Its backward for one row, from the raw v: dv (=) the gradient of v given d_out, the gradient of out (dv may
// be d_out); and the row's part of dgamma, d_out * v_hat, into d_gamma.
template <typename T>
void layer_norm_backward_row(int64_t n, const T* v, const T* gamma, const T* d_out, T* dv, T* __restrict d_gamma) {
  const RowStatistics s = row_statistics(n, v);
  const T mean = static_cast<T>(s.mean), rstd = static_cast<T>(s.rstd);
  // One pass for d_gamma = d_out * v_hat and the sums of d_hat = d_out * gamma and of d_hat * v_hat.
  double sum_d[kLanes] = {}, sum_dv[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      d_gamma[i + l] = d_out[i + l] * ((v[i + l] - mean) * rstd);
      sum_d[l] += double(d_out[i + l] * gamma[i + l]);
      sum_dv[l] += double(d_gamma[i + l] * gamma[i + l]);
    }
  }
  double total_d = 0, total_dv = 0;
  for (; i < n; ++i) {
    d_gamma[i] = d_out[i] * ((v[i] - mean) * rstd);
    total_d += double(d_out[i] * gamma[i]);
    total_dv += double(d_gamma[i] * gamma[i]);
  }
  for (int l = 0; l < kLanes; ++l) {
    total_d += sum_d[l];
    total_dv += sum_dv[l];
  }
  const T mean_d = static_cast<T>(total_d / double(n)), mean_dv = static_cast<T>(total_dv / double(n));
  for (i = 0; i < n; ++i) dv[i] = rstd * (d_out[i] * gamma[i] - mean_d - ((v[i] - mean) * rstd) * mean_dv);
}

// The layer-normalised LSTM's output of one row, o * act(LN(c_t; gamma_c, beta_c)), from the cache's o and c_t.
template <typename T, bool kRelu>
void lstm_layer_norm_output_row(int64_t H, const T* saved, const T* gamma_c, const T* beta_c, T* out) {
  const T* o = saved + 3 * H;
  const T* c = saved + 4 * H;
  const RowStatistics s = row_statistics(H, c);
  const T mean = static_cast<T>(s.mean), rstd = static_cast<T>(s.rstd);
  for (int64_t j = 0; j < H; ++j) {
    out[j] = o[j] * cells::activate(kRelu, gamma_c[j] * ((c[j] - mean) * rstd) + beta_c[j]);
  }
}

struct Window {
  int64_t steps, batch, input_size, hidden_size, gates;
  int64_t gh() const { return gates * hidden_size; }
  int64_t rows() const { return steps * batch; }
};

Window make_window(const CellOptions& options, const WindowSizes& s) {
  return {s.steps, s.batch, s.input_size, s.hidden_size, gate_count(options)};
}

// dP (=|+=) the peephole gradients: dp_i = sum da_i c_{t-1}, dp_f = sum da_f c_{t-1}, dp_o = sum da_o c_t,
// over steps and batch rows (packed); da holds the LSTM's pre-activation gradients (leading dimension ld), c0
// the initial cell state in packed order.
template <typename T>
void peephole_grads(const CellOptions& options, const PackedBatch& rows, int64_t H, const T* da, int64_t ld,
                    const T* cache, const T* c0, bool accumulate, T* dP) {
  const int64_t cw = cache_width(options) * H;
  const int64_t carried = options.zoneout_cell > 0 ? 5 * H : 4 * H;  // c_{t-1} as the step received it
  const int64_t bf = options.coupled_gates ? 0 : 1, bo = options.coupled_gates ? 2 : 3;
  std::vector<T> sum(static_cast<size_t>(3 * H), T(0));
  for (int64_t t = 0; t < rows.steps; ++t) {
    for (int64_t b = 0; b < rows.rows_at(t); ++b) {
      const int64_t row = rows.offsets[t] + b;
      const T* c = cache + row * cw + 4 * H;
      const T* c_prev = t == 0 ? c0 + b * H : cache + (rows.offsets[t - 1] + b) * cw + carried;
      const T* d = da + row * ld;
      for (int64_t j = 0; j < H; ++j) {
        if (!options.coupled_gates) sum[j] += d[j] * c_prev[j];
        sum[H + j] += d[bf * H + j] * c_prev[j];
        sum[2 * H + j] += d[bo * H + j] * c[j];
      }
    }
  }
  for (int64_t k = 0; k < 3 * H; ++k) dP[k] = accumulate ? dP[k] + sum[k] : sum[k];
}

// ---------------------------------------------------------------------------------------------------------
// One batch row of one step. Every pointer is that row's slice of a distinct buffer, hence __restrict:
// with it the compiler vectorises the loop over hidden units (without it, the alias checks it would need
// exceed its limit and the loop stays scalar). ax: W x_t + bW; ar: R h_{t-1} (no bias); bR: the bias.

// The LSTM's gate blocks in W, R, the biases and da: i, f, g, o, or f, g, o with coupled gates.
template <bool kCoupled>
struct Blocks {
  static constexpr int64_t f = kCoupled ? 0 : 1, g = kCoupled ? 1 : 2, o = kCoupled ? 2 : 3;
};

// Calls fn(coupled, peephole, clip) with the LSTM's options as compile-time constants, so that the row loops
// below have no branch in them and vectorise.
template <typename T, typename Fn>
void lstm_switch(const cells::LstmOptions<T>& opt, bool coupled, const Fn& fn) {
  bool_switch(coupled, [&](auto kCoupled) {
    bool_switch(opt.peephole, [&](auto kPeephole) {
      bool_switch(opt.cell_clip > T(0), [&](auto kClip) { fn(kCoupled, kPeephole, kClip); });
    });
  });
}

// The options with lstm_switch's compile-time constants in them, for the row loops below.
template <bool kRelu, bool kCoupled, bool kPeephole, bool kClip, typename T>
cells::LstmOptions<T> fixed_options(cells::LstmOptions<T> opt) {
  opt.relu = kRelu;
  opt.coupled = kCoupled;
  opt.peephole = kPeephole;
  if (!kClip) opt.cell_clip = T(0);
  return opt;
}

// Units [u0, u0 + n) of a row: every pointer starts at unit u0 (ar at the group's first column), and the gate
// blocks are H apart, but in ar ar_H apart (a group's gates side by side: its width; or H, one group).
// P: [3, H] peephole weights (zeros without peephole).
template <typename T, bool kRelu, bool kCoupled, bool kPeephole, bool kClip>
CONVEYOR_INLINE_LOOP void lstm_forward_units(int64_t n, int64_t H, int64_t ar_H, cells::LstmOptions<T> opt,
                                             const T* __restrict P, const T* __restrict ax, const T* __restrict ar,
                                             const T* __restrict bR, T* __restrict c, T* __restrict h,
                                             T* __restrict saved) {
  using K = Blocks<kCoupled>;
  opt = fixed_options<kRelu, kCoupled, kPeephole, kClip>(opt);
  if constexpr (!kPeephole) {
    // Without peepholes the gates do not wait for the cell, and two loops run them: the gates into the
    // cache, then the cell and the output from there. Each loop's chain of dependent operations is about
    // half the single loop's, so the processor overlaps more units; cells::lstm_forward's arithmetic, in its
    // order, so the results are the same bits.
    CONVEYOR_INDEPENDENT_ITERATIONS
    for (int64_t j = 0; j < n; ++j) {
      const T f =
          cells::sigmoid(ax[K::f * H + j] + ar[K::f * ar_H + j] + bR[K::f * H + j] + T(0) + opt.forget_bias);
      saved[H + j] = f;
      saved[j] = kCoupled ? T(1) - f : cells::sigmoid(ax[j] + ar[j] + bR[j] + T(0));
      saved[2 * H + j] = cells::activate(kRelu, ax[K::g * H + j] + ar[K::g * ar_H + j] + bR[K::g * H + j]);
      saved[3 * H + j] = cells::sigmoid(ax[K::o * H + j] + ar[K::o * ar_H + j] + bR[K::o * H + j] + T(0));
    }
    CONVEYOR_INDEPENDENT_ITERATIONS
    for (int64_t j = 0; j < n; ++j) {
      T c_new = saved[H + j] * c[j] + saved[j] * saved[2 * H + j];
      if (kClip) {
        c_new = c_new > opt.cell_clip ? opt.cell_clip : c_new;
        c_new = c_new < -opt.cell_clip ? -opt.cell_clip : c_new;
      }
      c[j] = c_new;
      h[j] = cells::lstm_output(kRelu, saved[3 * H + j], c_new);
      saved[4 * H + j] = c_new;
    }
    return;
  }
  CONVEYOR_INDEPENDENT_ITERATIONS
  for (int64_t j = 0; j < n; ++j) {
    const T a_i = kCoupled ? T(0) : ax[j] + ar[j] + bR[j];
    const auto s = cells::lstm_forward(opt, a_i, ax[K::f * H + j] + ar[K::f * ar_H + j] + bR[K::f * H + j],
                                       ax[K::g * H + j] + ar[K::g * ar_H + j] + bR[K::g * H + j],
                                       ax[K::o * H + j] + ar[K::o * ar_H + j] + bR[K::o * H + j], c[j],
                                       cells::Peephole<T>{P[j], P[H + j], P[2 * H + j]});
    c[j] = s.c;
    h[j] = s.h;
    saved[j] = s.i;
    saved[H + j] = s.f;
    saved[2 * H + j] = s.g;
    saved[3 * H + j] = s.o;
    saved[4 * H + j] = s.c;
  }
}

template <typename T, bool kRelu, bool kCoupled, bool kPeephole, bool kClip>
void lstm_forward_row(int64_t n, int64_t H, int64_t ar_H, cells::LstmOptions<T> opt, const T* P, const T* ax,
                      const T* ar, const T* bR, T* c, T* h, T* saved) {
  over_units<T, lstm_forward_units<T, kRelu, kCoupled, kPeephole, kClip>>(n, H, ar_H, opt, P, ax, ar, bR, c, h, saved);
}

template <typename T, bool kRelu>
CONVEYOR_INLINE_LOOP void gru_reset_after_forward_units(int64_t n, int64_t H, int64_t ar_H, const T* __restrict ax,
                                                        const T* __restrict ar, const T* __restrict bR,
                                                        const T* __restrict h_prev, T* __restrict h,
                                                        T* __restrict saved) {
  CONVEYOR_INDEPENDENT_ITERATIONS
  for (int64_t j = 0; j < n; ++j) {
    const T r = cells::sigmoid(ax[j] + ar[j] + bR[j]);
    const T z = cells::sigmoid(ax[H + j] + ar[ar_H + j] + bR[H + j]);
    const T ar_n = ar[2 * ar_H + j] + bR[2 * H + j];
    const T n = cells::gru_candidate_reset_after(kRelu, ax[2 * H + j], r, ar_n);
    h[j] = cells::gru_output(z, n, h_prev[j]);
    saved[j] = r;
    saved[H + j] = z;
    saved[2 * H + j] = n;
    saved[3 * H + j] = ar_n;
  }
}

// Units [u0, u0 + n), as lstm_forward_row.
template <typename T, bool kRelu>
void gru_reset_after_forward_row(int64_t n, int64_t H, int64_t ar_H, const T* ax, const T* ar, const T* bR,
                                 const T* h_prev, T* h, T* saved) {
  over_units<T, gru_reset_after_forward_units<T, kRelu>>(n, H, ar_H, ax, ar, bR, h_prev, h, saved);
}

// reset_after=false, before the n block's product: r, z and r * h_{t-1} (into `reset_hidden` and the cache).
template <typename T>
void gru_reset_before_gates_row(int64_t H, const T* __restrict ax, const T* __restrict ar, const T* __restrict bR,
                                const T* __restrict h_prev, T* __restrict reset_hidden, T* __restrict saved) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = cells::sigmoid(ax[j] + ar[j] + bR[j]);
    saved[j] = r;
    saved[H + j] = cells::sigmoid(ax[H + j] + ar[H + j] + bR[H + j]);
    reset_hidden[j] = r * h_prev[j];
    saved[3 * H + j] = reset_hidden[j];
  }
}

// reset_after=false, after it: ar_n = R_n (r * h_{t-1}).
template <typename T, bool kRelu>
void gru_reset_before_output_row(int64_t H, const T* __restrict ax_n, const T* __restrict ar_n,
                                 const T* __restrict bR_n, const T* __restrict h_prev, T* __restrict h,
                                 T* __restrict saved) {
  for (int64_t j = 0; j < H; ++j) {
    const T n = cells::gru_candidate_reset_before(kRelu, ax_n[j], ar_n[j] + bR_n[j]);
    h[j] = cells::gru_output(saved[H + j], n, h_prev[j]);
    saved[2 * H + j] = n;
  }
}

template <typename T, bool kRelu>
CONVEYOR_INLINE_LOOP void rnn_forward_units(int64_t n, const T* __restrict ax, const T* __restrict ar,
                                            const T* __restrict bR, T* __restrict h) {
  CONVEYOR_INDEPENDENT_ITERATIONS
  for (int64_t j = 0; j < n; ++j) h[j] = cells::rnn_forward(kRelu, ax[j] + ar[j] + bR[j]);
}

template <typename T, bool kRelu>
void rnn_forward_row(int64_t n, const T* ax, const T* ar, const T* bR, T* h) {
  over_units<T, rnn_forward_units<T, kRelu>>(n, ax, ar, bR, h);
}

// Backward rows. dh: the gradient reaching h_t from step t+1, replaced by the part of dh_{t-1} that does not
// go through R; dy: this step's output gradient; da: the pre-activation gradients (input path).

// Unit j's gradients into da's gate blocks (no i block with coupled gates) and dc.
template <bool kCoupled, typename T>
void store_lstm_grads(int64_t H, int64_t j, const cells::LstmGrads<T>& d, T* __restrict da, T* __restrict dc) {
  using K = Blocks<kCoupled>;
  if (!kCoupled) da[j] = d.da_i;
  da[K::f * H + j] = d.da_f;
  da[K::g * H + j] = d.da_g;
  da[K::o * H + j] = d.da_o;
  dc[j] = d.dc_prev;
}

template <typename T, bool kRelu, bool kCoupled, bool kPeephole, bool kClip>
CONVEYOR_INLINE_LOOP void lstm_backward_units(int64_t n, int64_t H, cells::LstmOptions<T> opt, const T* __restrict P,
                                              const T* __restrict saved, const T* __restrict c_prev,
                                              const T* __restrict dy, const T* __restrict dh, T* __restrict dc,
                                              T* __restrict da) {
  opt = fixed_options<kRelu, kCoupled, kPeephole, kClip>(opt);
  CONVEYOR_INDEPENDENT_ITERATIONS
  for (int64_t j = 0; j < n; ++j) {
    const auto d = cells::lstm_backward(opt, saved[j], saved[H + j], saved[2 * H + j], saved[3 * H + j],
                                        saved[4 * H + j], c_prev[j], dh[j] + dy[j], dc[j],
                                        cells::Peephole<T>{P[j], P[H + j], P[2 * H + j]});
    store_lstm_grads<kCoupled>(H, j, d, da, dc);
  }
}

// Units [u0, u0 + n) of a row, every pointer starting at unit u0. Not inlined, as lstm_layer_norm_backward_row:
// inlined into the row lambdas of backward_window, GCC 12 left this loop scalar (in 30 of its 32 instantiations,
// with cell_tanh called out of line, a call per unit); compiled on its own, with CONVEYOR_INDEPENDENT_ITERATIONS,
// it vectorises (24 of 32: all but those of double that call exp).
template <typename T, bool kRelu, bool kCoupled, bool kPeephole, bool kClip>
__attribute__((noinline)) void lstm_backward_row(int64_t n, int64_t H, cells::LstmOptions<T> opt, const T* P,
                                                 const T* saved, const T* c_prev, const T* dy, const T* dh, T* dc,
                                                 T* da) {
  over_units<T, lstm_backward_units<T, kRelu, kCoupled, kPeephole, kClip>>(n, H, opt, P, saved, c_prev, dy, dh, dc, da);
}

// The layer-normalised LSTM (output o * act(LN(c_t))): as lstm_backward_row, with LN(c_t)'s backward between the
// output and c_t; d_gamma_c, d_beta_c (=) the row's parts of the gain's and bias's gradients.
template <typename T, bool kRelu, bool kCoupled, bool kPeephole, bool kClip>
__attribute__((noinline)) void lstm_layer_norm_backward_row(int64_t H, cells::LstmOptions<T> opt,
                                                            const T* __restrict P, const T* __restrict saved,
                                                            const T* __restrict c_prev, const T* __restrict dy,
                                                            const T* __restrict dh, const T* __restrict gamma_c,
                                                            const T* __restrict beta_c, T* __restrict dc,
                                                            T* __restrict da, T* __restrict d_gamma_c,
                                                            T* __restrict d_beta_c) {
  opt = fixed_options<kRelu, kCoupled, kPeephole, kClip>(opt);
  const T* o = saved + 3 * H;
  const T* c = saved + 4 * H;
  const RowStatistics s = row_statistics(H, c);
  const T mean = static_cast<T>(s.mean), rstd = static_cast<T>(s.rstd);
  // d_beta_c holds the gradient reaching LN(c_t), then d_gamma_c its product with the normalised c_t; da's
  // first H entries keep act(LN(c_t)) until the second pass overwrites each with its own gradient.
  T* act = da;
  for (int64_t j = 0; j < H; ++j) {
    const T c_hat = (c[j] - mean) * rstd;
    act[j] = cells::activate(kRelu, gamma_c[j] * c_hat + beta_c[j]);
    d_beta_c[j] = (dh[j] + dy[j]) * o[j] * cells::activation_grad_from_output(kRelu, act[j]);
    d_gamma_c[j] = d_beta_c[j] * c_hat;
  }
  const T mean_d = static_cast<T>(row_sum<T>(H, [&](int64_t j) { return d_beta_c[j] * gamma_c[j]; }) / double(H));
  const T mean_dv = static_cast<T>(row_sum<T>(H, [&](int64_t j) { return d_gamma_c[j] * gamma_c[j]; }) / double(H));
  for (int64_t j = 0; j < H; ++j) {
    const T c_hat = (c[j] - mean) * rstd;
    const T dc_output = rstd * (d_beta_c[j] * gamma_c[j] - mean_d - c_hat * mean_dv);
    const auto d = cells::lstm_backward_from_output(opt, saved[j], saved[H + j], saved[2 * H + j], o[j], c[j],
                                                    c_prev[j], (dh[j] + dy[j]) * act[j], dc_output, dc[j],
                                                    cells::Peephole<T>{P[j], P[H + j], P[2 * H + j]});
    store_lstm_grads<kCoupled>(H, j, d, da, dc);
  }
}

template <typename T, bool kRelu>
CONVEYOR_INLINE_LOOP void gru_reset_after_backward_units(int64_t n, int64_t H, const T* __restrict saved,
                                                         const T* __restrict h_prev, const T* __restrict dy,
                                                         T* __restrict dh, T* __restrict da, T* __restrict dar_n) {
  CONVEYOR_INDEPENDENT_ITERATIONS
  for (int64_t j = 0; j < n; ++j) {
    const auto d = cells::gru_backward_reset_after(kRelu, saved[j], saved[H + j], saved[2 * H + j],
                                                   saved[3 * H + j], h_prev[j], dh[j] + dy[j]);
    da[j] = d.da_r;
    da[H + j] = d.da_z;
    da[2 * H + j] = d.dax_n;
    dar_n[j] = d.dar_n;
    dh[j] = d.dh_prev;
  }
}

// Units [u0, u0 + n), as lstm_backward_row.
template <typename T, bool kRelu>
void gru_reset_after_backward_row(int64_t n, int64_t H, const T* saved, const T* h_prev, const T* dy, T* dh, T* da,
                                  T* dar_n) {
  over_units<T, gru_reset_after_backward_units<T, kRelu>>(n, H, saved, h_prev, dy, dh, da, dar_n);
}

// reset_after=false, first half: all but r's gradient, which needs d(r * h_{t-1}) = dar_n R_n.
template <typename T, bool kRelu>
void gru_reset_before_backward_row(int64_t H, const T* __restrict saved, const T* __restrict h_prev,
                                   const T* __restrict dy, T* __restrict dh, T* __restrict da) {
  for (int64_t j = 0; j < H; ++j) {
    const auto d = cells::gru_backward_reset_before(kRelu, saved[H + j], saved[2 * H + j], h_prev[j], dh[j] + dy[j]);
    da[H + j] = d.da_z;
    da[2 * H + j] = d.dax_n;
    dh[j] = d.dh_prev;
  }
}

// h_product: m * h_{t-1}, what the n block's product saw through r; mask: m (ones without recurrent dropout).
template <typename T>
void gru_reset_before_reset_grad_row(int64_t H, const T* __restrict saved, const T* __restrict h_product,
                                     const T* __restrict mask, const T* __restrict d_reset_hidden, T* __restrict dh,
                                     T* __restrict da) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = saved[j];
    da[j] = cells::gru_reset_gate_grad_reset_before(r, h_product[j], d_reset_hidden[j]);
    dh[j] += d_reset_hidden[j] * r * mask[j];
  }
}

template <typename T, bool kRelu>
CONVEYOR_INLINE_LOOP void rnn_backward_units(int64_t n, const T* __restrict h, const T* __restrict dy,
                                             const T* __restrict dh, T* __restrict da) {
  CONVEYOR_INDEPENDENT_ITERATIONS
  for (int64_t j = 0; j < n; ++j) da[j] = cells::rnn_backward(kRelu, h[j], dh[j] + dy[j]);
}

template <typename T, bool kRelu>
void rnn_backward_row(int64_t n, const T* h, const T* dy, const T* dh, T* da) {
  over_units<T, rnn_backward_units<T, kRelu>>(n, h, dy, dh, da);
}

// ---------------------------------------------------------------------------------------------------------
// The windows

// A window runs over its rows in packed order (core/packing.h): step t's rows are rows offsets[t] ..
// offsets[t + 1] - 1 of every per-step array, the first rows_at(t) rows of the step before, so each step's
// products and cell math cover only the rows still running. Without lengths that is the caller's own
// layout (offsets t * B) and nothing is copied; with them, x (and backward's y and dy) are packed first and
// the outputs unpacked after.

// The units split into groups, each a task of every step. Forward, the task multiplies h_{t-1} by its units'
// columns of R^T (all their gates) and runs the cell on those units; backward, it finishes its units' columns
// of dh_t = da_{t+1} R, runs the cell's backward on them and packs their gradients for the next product. A
// step is then one pass over the threads, where the product split over them and the cell rows after it were
// two, with a wait between, and the cell ran on one thread wherever the rows were too little work to split.
// Forward, with more than one group, R's rows are reordered so that each group's gates lie side by side
// (group q, then gate g, then unit).
struct UnitGroups {
  int64_t width = 0;  // the units of a group; the last may have fewer
  int64_t count = 1;

  int64_t units(int64_t q, int64_t H) const { return std::min(width, H - q * width); }
};

// Groups of whole strips of R^T (G * width columns; the backward's product has G = 1) and of whole 64-byte
// lines of a row's units, a few a thread (the threads that finish first take the rest: a thread can share its
// core with another program); one on one thread, or where a step is too little work to split. The lines are
// whole only where H is a multiple of a line's units: elsewhere two threads would write one line of h, c and
// the cache at every group's edge, and the callers keep the product and the cell apart.
template <typename T>
UnitGroups unit_groups(int64_t B, int64_t K, int64_t G, int64_t H) {
  constexpr int64_t kLineUnits = 64 / sizeof(T);
  const int64_t strip = cpu::packed_strip_width<T>();
  const int64_t quantum = std::lcm(strip / std::gcd(G, strip), kLineUnits);
  const int64_t most = (H + quantum - 1) / quantum;
  const int64_t threads = cpu::pool_size();
  const int64_t wanted =
      threads == 1 ? 1 : std::min<int64_t>(4 * threads, cpu::parallel_tasks_for(double(B) * K * G * H, most));
  UnitGroups groups;
  groups.width = ((H + wanted - 1) / wanted + quantum - 1) / quantum * quantum;
  groups.count = (H + groups.width - 1) / groups.width;
  return groups;
}

// Units [u0, u0 + n) of the G gate blocks (H apart) of `rows` rows `ld` apart, fetched into L2. A group's units
// of ax_t are G runs of two to eight lines in each row, rows 4 KB apart at H = 256: too short for the hardware's
// prefetcher to find, so the cell rows waited on each line. Fetched while the step's product runs, a forward's
// cell rows took 25-30% less time with 8 groups (LSTM T=64, B=32, I=H=256, timers in a scratch build).
template <typename T>
void prefetch_units(const T* rows, int64_t count, int64_t ld, int64_t G, int64_t H, int64_t u0, int64_t n) {
  constexpr int64_t kLineUnits = 64 / sizeof(T);
  for (int64_t b = 0; b < count; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      const T* run = rows + b * ld + g * H + u0;
      for (int64_t j = 0; j < n; j += kLineUnits) __builtin_prefetch(run + j, 0, 2);
    }
  }
}

// R [G * H, K] with its rows in the order of the groups.
template <typename T>
void group_rows(const UnitGroups& groups, int64_t G, int64_t H, int64_t K, const T* R, T* grouped) {
  for (int64_t q = 0; q < groups.count; ++q) {
    const int64_t u0 = q * groups.width, n = groups.units(q, H);
    for (int64_t g = 0; g < G; ++g) {
      std::memcpy(grouped + (G * u0 + g * n) * K, R + (g * H + u0) * K, sizeof(T) * n * K);
    }
  }
}

template <typename T, bool kRelu>
void forward_window(const CellOptions& options, const WindowSizes& sizes, const ForwardArgs& args) {
  const Window w = make_window(options, sizes);
  const PackedBatch rows = window_rows(sizes, args.lengths, args.packed);
  const int64_t B = w.batch, H = w.hidden_size, GH = w.gh(), N = rows.tokens();
  const int64_t O = sizes.output_size;  // the units of h and y: P with a projection, else H
  const int64_t cw = cache_width(options) * H;
  const T* W = static_cast<const T*>(args.W.data);
  const DroppedWeights<T> dropped(options, GH, O, static_cast<const T*>(args.R.data));
  const T* R = dropped.get();
  const T* bW = data_or_null<T>(args.bW);
  const T* W_hr = data_or_null<T>(args.W_hr);
  const PackedInput<T> x(rows, w.input_size, static_cast<const T*>(args.x.data));
  Scratch<T> y_packed(rows.in_place ? 0 : N * O);
  T* y = rows.in_place ? static_cast<T*>(args.y.data) : y_packed.data();
  // Absent biases and cache become zeros and a one-step scratch cache, so that the per-element loops have
  // no branches.
  std::vector<T> zero_bias(args.bR.present() ? 0 : static_cast<size_t>(GH), T(0));
  const T* bR = args.bR.present() ? static_cast<const T*>(args.bR.data) : zero_bias.data();
  T* cache = mutable_or_null<T>(args.cache);
  cpu::LineVector<T> step_cache(cache != nullptr ? 0 : static_cast<size_t>(B * cw));

  // Layer normalisation: the gains, and where the cache keeps W x_t and R h_{t-1} before it, for the backward.
  const bool layer_norm = options.layer_norm;
  const T* gamma_x = data_or_null<T>(args.gamma_x);
  const T* gamma_h = data_or_null<T>(args.gamma_h);
  const T* gamma_c = data_or_null<T>(args.gamma_c);
  const T* beta_c = data_or_null<T>(args.beta_c);
  const int64_t raw_x = cw - 2 * GH, raw_h = cw - GH;

  // ax = x W^T + bW for every step at once (LN(x W^T) + bW with layer normalisation).
  // With layer normalisation and a cache, the product goes straight into the cache's raw columns.
  Scratch<T> ax(N * GH);
  const bool raw_in_cache = layer_norm && cache != nullptr;
  gemm<T>(N, GH, w.input_size, T(1), MatrixRef<T>::rows(x.get(), w.input_size),
          MatrixRef<T>::transposed(W, w.input_size), T(0), raw_in_cache ? cache + raw_x : ax.data(),
          raw_in_cache ? cw : GH);
  if (layer_norm) {
    for_each_row(N, kElementCost * GH, [&](int64_t r) {
      const T* raw = raw_in_cache ? cache + r * cw + raw_x : ax.data() + r * GH;
      layer_norm_row(GH, raw, gamma_x, static_cast<const T*>(nullptr), ax.data() + r * GH);
    });
  }
  if (bW != nullptr) {
    for_each_row(N, double(GH), [&](int64_t r) {
      T* row = ax.data() + r * GH;
      for (int64_t j = 0; j < GH; ++j) row[j] += bW[j];
    });
  }

  const cpu::LineVector<T> h0 = packed_state<T>(rows, O, args.h0);
  const cells::LstmOptions<T> lstm = lstm_options<T>(options);
  std::vector<T> no_peephole(args.P.present() ? 0 : static_cast<size_t>(3 * H), T(0));
  const T* peephole = args.P.present() ? static_cast<const T*>(args.P.data) : no_peephole.data();
  // Recurrent dropout: the product reads h_product = m_t * h_{t-1} instead of h_{t-1}.
  const std::vector<T> masks = recurrent_masks<T>(options, rows, O);
  const bool dropout = !masks.empty();
  cpu::LineVector<T> h_masked(dropout ? static_cast<size_t>(B * O) : 0);
  Scratch<T> ar(B * GH);  // the recurrent pre-activations of one step
  cpu::LineVector<T> cell_state;    // LSTM: c_{t-1}, then c_t, in place
  cpu::LineVector<T> reset_hidden;  // GRU reset_before: r * h_{t-1}
  if (options.cell == CellType::lstm) cell_state = packed_state<T>(rows, H, args.c0);
  if (options.cell == CellType::gru && !options.reset_after) reset_hidden.resize(static_cast<size_t>(B * H));

  // The recurrent weights, packed once for the T per-step products h_{t-1} R^T (the GRU without reset_after
  // multiplies its r, z rows and its n rows separately).
  const bool split_n = options.cell == CellType::gru && !options.reset_after;
  // Layer normalisation needs all of a row's gates for its statistics, and the GRU without reset_after two
  // products: their steps keep the product and the cell apart.
  const int64_t G = GH / H;
  const UnitGroups split = unit_groups<T>(B, O, G, H);
  const bool one_pass = !split_n && !layer_norm && (split.count == 1 || H % (64 / sizeof(T)) == 0);
  const UnitGroups groups = one_pass ? split : UnitGroups{H, 1};
  Scratch<T> grouped_R(groups.count > 1 ? GH * O : 0);
  if (groups.count > 1) group_rows(groups, G, H, O, R, grouped_R.data());
  const T* R_steps = groups.count > 1 ? grouped_R.data() : R;
  const PackedMatrix<T> recurrent(O, split_n ? 2 * H : GH, MatrixRef<T>::transposed(R_steps, O));
  // h_{t-1} packed for step t's product: each pass packs its units' columns of h_t for the next step (as the
  // backward packs its gradients), where h_t is the cell's own output; else it is packed before the pass.
  // Packed by the calling thread before every pass, it took 0.25-0.3 ms of a 2-thread forward of 8-9 ms
  // (LSTM T=64, B=32, I=H=256) while the other thread waited.
  cpu::PackedRows<T> step_rows[2];
  const bool pack_in_pass = one_pass && !dropout && W_hr == nullptr && options.zoneout == 0;
  const PackedMatrix<T> recurrent_n(split_n ? H : 0, H, MatrixRef<T>::transposed(R + 2 * H * H, H));
  // A projection: the cell writes o * act(c_t) of a step's rows here, and their product with W_hr^T is h_t.
  Scratch<T> unprojected(W_hr != nullptr ? B * H : 0);
  const PackedMatrix<T> projection(W_hr != nullptr ? H : 0, O, MatrixRef<T>::transposed(W_hr, H));
  // Zoneout: a step's keep factors of h (and c), and the LSTM's c_{t-1}, which the cell overwrites in place.
  Scratch<T> keep_h(options.zoneout > 0 ? B * O : 0), keep_c(options.zoneout_cell > 0 ? B * H : 0);
  Scratch<T> c_prev(options.zoneout_cell > 0 ? B * H : 0);
  auto zone_out_h = [&](int64_t t, int64_t Bt, const T* h_prev, T* h) {
    if (options.zoneout == 0) return;
    keep_factors(options, options.zoneout, options.zoneout_stream, rows, t, O, keep_h.data());
    zone_out(Bt * O, keep_h.data(), h_prev, h);
  };

  for (int64_t t = 0; t < rows.steps; ++t) {
    const int64_t Bt = rows.rows_at(t), first = rows.offsets[t];
    const T* h_prev = t == 0 ? h0.data() : y + rows.offsets[t - 1] * O;
    const T* h_product = h_prev;
    if (dropout) {
      masked(Bt * O, masks.data() + (options.variational ? 0 : first) * O, h_prev, h_masked.data());
      h_product = h_masked.data();
    }
    T* h = y + first * O;
    T* cell_output = W_hr != nullptr ? unprojected.data() : h;  // o * act(c_t), [Bt, H]
    const T* ax_t = ax.data() + first * GH;
    T* cache_t = cache != nullptr ? cache + first * cw : step_cache.data();

    if (options.cell == CellType::gru && !options.reset_after) {
      // r and z first: the n block's recurrent product reads r * h_{t-1}.
      gemm<T>(Bt, T(1), MatrixRef<T>::rows(h_product, H), recurrent, T(0), ar.data(), GH);
      for_each_row(Bt, kElementCost * H, [&](int64_t b) {
        gru_reset_before_gates_row<T>(H, ax_t + b * GH, ar.data() + b * GH, bR, h_product + b * H,
                                      reset_hidden.data() + b * H, cache_t + b * cw);
      });
      gemm<T>(Bt, T(1), MatrixRef<T>::rows(reset_hidden.data(), H), recurrent_n, T(0), ar.data() + 2 * H, GH);
      for_each_row(Bt, kElementCost * H, [&](int64_t b) {
        gru_reset_before_output_row<T, kRelu>(H, ax_t + b * GH + 2 * H, ar.data() + b * GH + 2 * H, bR + 2 * H,
                                              h_prev + b * H, h + b * H, cache_t + b * cw);
      });
      zone_out_h(t, Bt, h_prev, h);
      continue;
    }

    if (options.zoneout_cell > 0) std::memcpy(c_prev.data(), cell_state.data(), sizeof(T) * Bt * H);
    // Units [u0, u0 + n) of row b, their pre-activations in ar from column G * u0, their gates n apart.
    const auto cell_units = [&](int64_t b, int64_t u0, int64_t n) {
      const T* ax_b = ax_t + b * GH + u0;
      const T* ar_b = ar.data() + b * GH + G * u0;
      const int64_t ar_H = groups.count > 1 ? n : H;
      T* saved = cache_t + b * cw + u0;
      switch (options.cell) {
        case CellType::lstm:
          lstm_switch(lstm, options.coupled_gates, [&](auto kCoupled, auto kPeephole, auto kClip) {
            lstm_forward_row<T, kRelu, kCoupled, kPeephole, kClip>(n, H, ar_H, lstm, peephole + u0, ax_b, ar_b,
                                                                   bR + u0, cell_state.data() + b * H + u0,
                                                                   cell_output + b * H + u0, saved);
          });
          break;
        case CellType::gru:  // reset_after
          gru_reset_after_forward_row<T, kRelu>(n, H, ar_H, ax_b, ar_b, bR + u0, h_prev + b * H + u0,
                                                h + b * H + u0, saved);
          break;
        case CellType::rnn:
          rnn_forward_row<T, kRelu>(n, ax_b, ar_b, bR + u0, h + b * H + u0);
          break;
      }
    };
    if (one_pass) {
      cpu::PackedRows<T>& packed_h = step_rows[t % 2];
      cpu::PackedRows<T>& packed_next = step_rows[(t + 1) % 2];
      if (!pack_in_pass || t == 0) packed_h.pack(Bt, O, MatrixRef<T>::rows(h_product, O), recurrent);
      const bool pack_next = pack_in_pass && t + 1 < rows.steps;
      if (pack_next) packed_next.reserve(rows.rows_at(t + 1), O, MatrixRef<T>::rows(h, O), recurrent);
      cpu::parallel_for(groups.count, [&](int64_t q) {
        const int64_t u0 = q * groups.width, n = groups.units(q, H);
        if (groups.count > 1) prefetch_units(ax_t, Bt, GH, G, H, u0, n);
        cpu::gemm_columns(packed_h, recurrent, G * u0, G * n, T(1), T(0), ar.data(), GH);
        for (int64_t b = 0; b < Bt; ++b) cell_units(b, u0, n);
        if (pack_next) packed_next.pack_columns(u0, u0 + n);
      });
    } else {
      gemm<T>(Bt, T(1), MatrixRef<T>::rows(h_product, O), recurrent, T(0),
              raw_in_cache ? cache_t + raw_h : ar.data(), raw_in_cache ? cw : GH);
      if (layer_norm) {
        for_each_row(Bt, kElementCost * GH, [&](int64_t b) {
          const T* raw = raw_in_cache ? cache_t + b * cw + raw_h : ar.data() + b * GH;
          layer_norm_row(GH, raw, gamma_h, static_cast<const T*>(nullptr), ar.data() + b * GH);
        });
      }
      for_each_row(Bt, kElementCost * H, [&](int64_t b) { cell_units(b, 0, H); });
    }
    if (layer_norm && options.cell == CellType::lstm) {  // the output is o * act(LN(c_t)), not o * act(c_t)
      for_each_row(Bt, kElementCost * H, [&](int64_t b) {
        lstm_layer_norm_output_row<T, kRelu>(H, cache_t + b * cw, gamma_c, beta_c, cell_output + b * H);
      });
    }
    if (W_hr != nullptr) gemm<T>(Bt, T(1), MatrixRef<T>::rows(cell_output, H), projection, T(0), h, O);
    zone_out_h(t, Bt, h_prev, h);
    if (options.zoneout_cell > 0) {  // the cache keeps both: the cell's own c_t (column 4) and the state carried
      keep_factors(options, options.zoneout_cell, options.zoneout_cell_stream, rows, t, H, keep_c.data());
      zone_out(Bt * H, keep_c.data(), c_prev.data(), cell_state.data());
      for (int64_t b = 0; b < Bt; ++b) {
        std::memcpy(cache_t + b * cw + 5 * H, cell_state.data() + b * H, sizeof(T) * H);
      }
    }
  }

  // A row's final state is its output at its last step; the cell state stopped where the row did.
  if (!rows.in_place) unpack_rows(rows, w.steps, O, y, static_cast<T*>(args.y.data));
  if (args.h_T.present()) {
    T* h_T = static_cast<T*>(args.h_T.data);
    for (int64_t k = 0; k < B; ++k) std::memcpy(h_T + rows.order[k] * O, y + rows.last_row(k) * O, sizeof(T) * O);
  }
  if (args.c_T.present()) rows_from_packed(rows, H, cell_state.data(), static_cast<T*>(args.c_T.data));
}

template <typename T, bool kRelu>
void backward_window(const CellOptions& options, const WindowSizes& sizes, const BackwardArgs& args) {
  const Window w = make_window(options, sizes);
  const PackedBatch rows = window_rows(sizes, args.lengths, args.packed);
  const int64_t B = w.batch, H = w.hidden_size, I = w.input_size, GH = w.gh(), N = rows.tokens();
  const int64_t O = sizes.output_size;  // the units of h and y: P with a projection, else H
  const int64_t cw = cache_width(options) * H;
  const T* W = static_cast<const T*>(args.W.data);
  const DroppedWeights<T> dropped(options, GH, O, static_cast<const T*>(args.R.data));
  const T* R = dropped.get();
  const T* W_hr = data_or_null<T>(args.W_hr);
  const PackedInput<T> x(rows, I, static_cast<const T*>(args.x.data));
  const PackedInput<T> y(rows, O, static_cast<const T*>(args.y.data));
  const PackedInput<T> dy(rows, O, static_cast<const T*>(args.dy.data));
  const T* cache = data_or_null<T>(args.cache);
  const bool reset_after_gru = options.cell == CellType::gru && options.reset_after;
  const bool reset_before_gru = options.cell == CellType::gru && !options.reset_after;

  const cpu::LineVector<T> h0 = packed_state<T>(rows, O, args.h0);
  const cpu::LineVector<T> c0 = packed_state<T>(rows, options.cell == CellType::lstm ? H : 0, args.c0);
  const cells::LstmOptions<T> lstm = lstm_options<T>(options);
  std::vector<T> no_peephole(args.P.present() ? 0 : static_cast<size_t>(3 * H), T(0));
  const T* peephole = args.P.present() ? static_cast<const T*>(args.P.data) : no_peephole.data();

  // Gradients of the pre-activations of every step: dax for the input path (and, but for the GRU's n block
  // when reset_after, the recurrent path too); dar_n for that n block.
  // Not zeroed: each step's cell rows write all GH values of their rows before anything reads them (the CPU
  // suite passes with the block filled with NaN here), and zeroing it cost 1% of a training window.
  Scratch<T> dax(N * GH);
  cpu::LineVector<T> dar_n(reset_after_gru ? static_cast<size_t>(N * H) : 0);
  // The gradient reaching h_t (and c_t) from later steps, carried backwards. A row that stops before the
  // window's end keeps dh_T (dc_T) here untouched until its own last step.
  cpu::LineVector<T> dh = packed_state<T>(rows, O, args.dh_T);
  cpu::LineVector<T> dc = packed_state<T>(rows, options.cell == CellType::lstm ? H : 0, args.dc_T);
  cpu::LineVector<T> d_reset_hidden(reset_before_gru ? static_cast<size_t>(B * H) : 0);

  // Recurrent dropout: step t's product read h_products[t] = m_t * h_{t-1}, so the gradient it sends back to
  // h_{t-1} is m_t * (da_t R), and dR pairs da_t with h_products[t]. With lengths, dR needs every step's
  // h_{t-1} in one array too (step t's rows of y_{t-1} are not step t-1's whole block).
  const std::vector<T> masks = recurrent_masks<T>(options, rows, O);
  const bool dropout = !masks.empty();
  const std::vector<T> ones(dropout ? 0 : static_cast<size_t>(B * O), T(1));
  auto mask_of = [&](int64_t t) {
    return dropout ? masks.data() + (options.variational ? 0 : rows.offsets[t]) * O : ones.data();
  };
  auto h_prev_of = [&](int64_t t) { return t == 0 ? h0.data() : y.get() + rows.offsets[t - 1] * O; };
  const bool gather_products = dropout || !rows.dense;
  Scratch<T> h_products(gather_products ? N * O : 0);
  for (int64_t t = 0; gather_products && t < rows.steps; ++t) {
    masked(rows.rows_at(t) * O, mask_of(t), h_prev_of(t), h_products.data() + rows.offsets[t] * O);
  }
  // dh (=, or += when `add`) m_t * product, the product of one step's gradients with R, over its Bt rows.
  Scratch<T> product(B * O);
  auto fold_product = [&](int64_t t, int64_t Bt, bool add) {
    const T* m = mask_of(t);
    for_each_row(Bt, 2.0 * O, [&](int64_t b) {
      for (int64_t j = b * O; j < (b + 1) * O; ++j) dh[j] = add ? dh[j] + m[j] * product[j] : m[j] * product[j];
    });
  };

  // R packed once for the T per-step products dh_{t-1} = da R (the GRU's r, z rows apart from its n rows).
  const bool gru = options.cell == CellType::gru;
  const PackedMatrix<T> recurrent(gru ? 2 * H : GH, O, MatrixRef<T>::rows(R, O));
  const PackedMatrix<T> recurrent_n(gru ? H : 0, H, MatrixRef<T>::rows(R + 2 * H * H, H));
  // A projection (h_t = W_hr m_t, m_t = o * act(c_t)): every step's gradient reaching h_t, dy_t + dh, kept for
  // dW_hr, and the gradient it sends to m_t, (dy_t + dh) W_hr, which the cell's backward takes as its dh with
  // no further dy.
  Scratch<T> dh_total(W_hr != nullptr ? N * O : 0);
  Scratch<T> d_unprojected(W_hr != nullptr ? B * H : 0);
  const std::vector<T> no_dy(W_hr != nullptr || options.zoneout > 0 ? static_cast<size_t>(B * std::max(H, O)) : 0,
                             T(0));
  const PackedMatrix<T> projection(W_hr != nullptr ? O : 0, H, MatrixRef<T>::rows(W_hr, H));
  // Zoneout (h_t = d h_{t-1} + (1 - d) h~_t, likewise c): a step's keep factors, and the parts of the gradients
  // reaching h_t and c_t that go straight on to h_{t-1} and c_{t-1}. The cell's backward gets the rest.
  Scratch<T> keep_h(options.zoneout > 0 ? B * O : 0), kept_h(options.zoneout > 0 ? B * O : 0);
  Scratch<T> keep_c(options.zoneout_cell > 0 ? B * H : 0), kept_c(options.zoneout_cell > 0 ? B * H : 0);
  // Where the cache holds the cell state a step hands on: c_t, or c_t after zoneout in column 5.
  const int64_t carried = options.zoneout_cell > 0 ? 5 * H : 4 * H;
  // Layer normalisation: the gains, where the cache keeps W x_t and R h_{t-1} before it, the gradients of R h
  // before it (for the products with R and dR), and every row's parts of the gains' gradients.
  const bool layer_norm = options.layer_norm;
  const T* gamma_x = data_or_null<T>(args.gamma_x);
  const T* gamma_h = data_or_null<T>(args.gamma_h);
  const T* gamma_c = data_or_null<T>(args.gamma_c);
  const T* beta_c = data_or_null<T>(args.beta_c);
  const int64_t raw_x = cw - 2 * GH, raw_h = cw - GH;
  const bool lstm_layer_norm = layer_norm && options.cell == CellType::lstm;
  Scratch<T> dar_raw(layer_norm ? N * GH : 0);
  // The gains' gradients: sums over the rows, formed a step (or B rows) at a time from each row's parts.
  std::vector<T> d_gains[4];  // gamma_x, gamma_h, gamma_c, beta_c
  for (int k = 0; k < 4; ++k) d_gains[k].assign(layer_norm && (k < 2 || lstm_layer_norm) ? (k < 2 ? GH : H) : 0, T(0));
  Scratch<T> gain_rows(layer_norm ? B * GH : 0), bias_rows(lstm_layer_norm ? B * H : 0);
  Scratch<T> d_recurrent(reset_after_gru && layer_norm ? B * GH : 0);  // [da_r, da_z, dar_n] of a step
  const PackedMatrix<T> recurrent_all(reset_after_gru && layer_norm ? GH : 0, O, MatrixRef<T>::rows(R, O));
  // The gradients of a step's R h before its layer norm from those after it (`da`, leading dimension lda).
  auto recurrent_layer_norm_backward = [&](int64_t t, int64_t Bt, const T* da, int64_t lda) {
    const int64_t first = rows.offsets[t];
    for_each_row(Bt, kElementCost * GH, [&](int64_t b) {
      layer_norm_backward_row(GH, cache + (first + b) * cw + raw_h, gamma_h, da + b * lda,
                              dar_raw.data() + (first + b) * GH, gain_rows.data() + b * GH);
    });
    column_sums(Bt, GH, gain_rows.data(), GH, true, d_gains[1].data());
    return dar_raw.data() + first * GH;
  };

  // One pass over the threads a step, as in the forward, where the cells are plain: groups of units, each task
  // finishing the product of step t+1's gradients with its units' columns of R (dh_t, through the dropout
  // mask), running step t's cell on its units, and packing their gradients for the next pass's product. The
  // same arithmetic as the steps below, in the same order: the same bits.
  const UnitGroups groups = unit_groups<T>(B, GH, 1, H);
  const bool one_pass = !layer_norm && W_hr == nullptr && options.zoneout == 0 && options.zoneout_cell == 0 &&
                        !reset_before_gru && (groups.count == 1 || H % (64 / sizeof(T)) == 0);
  if (one_pass) {
    const int64_t K = gru ? 2 * H : GH;  // the GRU's n block goes through recurrent_n, from dar_n
    cpu::PackedRows<T> grads[2], grads_n[2];  // a step's gradients, packed by its pass for the next one's product
    const auto cell_units = [&](int64_t t, int64_t b, int64_t u0, int64_t n) {
      const int64_t first = rows.offsets[t], row = first + b;
      const T* dy_b = dy.get() + row * O + u0;
      T* dh_b = dh.data() + b * H + u0;
      T* da = dax.data() + row * GH + u0;
      switch (options.cell) {
        case CellType::lstm: {
          const T* c_prev = t == 0 ? c0.data() + b * H : cache + (rows.offsets[t - 1] + b) * cw + carried;
          lstm_switch(lstm, options.coupled_gates, [&](auto kCoupled, auto kPeephole, auto kClip) {
            lstm_backward_row<T, kRelu, kCoupled, kPeephole, kClip>(n, H, lstm, peephole + u0, cache + row * cw + u0,
                                                                    c_prev + u0, dy_b, dh_b, dc.data() + b * H + u0,
                                                                    da);
          });
          break;
        }
        case CellType::rnn:
          rnn_backward_row<T, kRelu>(n, y.get() + row * H + u0, dy_b, dh_b, da);
          break;
        case CellType::gru:
          gru_reset_after_backward_row<T, kRelu>(n, H, cache + row * cw + u0, h_prev_of(t) + b * H + u0, dy_b, dh_b,
                                                 da, dar_n.data() + row * H + u0);
          break;
      }
    };
    // Pass t finishes step t + 1's product; pass -1 is that of step 0 alone (dh_0).
    for (int64_t t = rows.steps - 1; t >= -1; --t) {
      const int64_t later = t + 1;
      const bool has_later = later < rows.steps;
      const int64_t B_later = has_later ? rows.rows_at(later) : 0, Bt = t >= 0 ? rows.rows_at(t) : 0;
      const cpu::PackedRows<T>& in = grads[later % 2];
      const cpu::PackedRows<T>& in_n = grads_n[later % 2];
      cpu::PackedRows<T>& out = grads[(later + 1) % 2];
      cpu::PackedRows<T>& out_n = grads_n[(later + 1) % 2];
      if (t >= 0) {
        out.reserve(Bt, K, MatrixRef<T>::rows(dax.data() + rows.offsets[t] * GH, GH), recurrent);
        if (gru) out_n.reserve(Bt, H, MatrixRef<T>::rows(dar_n.data() + rows.offsets[t] * H, H), recurrent_n);
      }
      const T* m = has_later ? mask_of(later) : nullptr;
      cpu::parallel_for(groups.count, [&](int64_t q) {
        const int64_t u0 = q * groups.width, n = groups.units(q, H);
        if (t >= 0 && groups.count > 1) {  // what the cell rows read, fetched while the product runs
          const int64_t first = rows.offsets[t];
          prefetch_units(cache + first * cw, Bt, cw, cw / H, H, u0, n);
          prefetch_units(dy.get() + first * O, Bt, O, 1, O, u0, n);
          if (options.cell == CellType::lstm && t > 0) {
            prefetch_units(cache + rows.offsets[t - 1] * cw + carried, Bt, cw, 1, H, u0, n);
          }
        }
        if (has_later) {
          cpu::gemm_columns(in, recurrent, u0, n, T(1), T(0), product.data(), O);
          if (gru) cpu::gemm_columns(in_n, recurrent_n, u0, n, T(1), T(1), product.data(), O);
          for (int64_t b = 0; b < B_later; ++b) {
            for (int64_t j = b * H + u0; j < b * H + u0 + n; ++j) {
              dh[j] = gru ? dh[j] + m[j] * product[j] : m[j] * product[j];
            }
          }
        }
        if (t < 0) return;
        for (int64_t b = 0; b < Bt; ++b) cell_units(t, b, u0, n);
        for (int64_t k = u0; k < K; k += H) out.pack_columns(k, k + n);
        if (gru) out_n.pack_columns(u0, u0 + n);
      });
    }
  } else {
    for (int64_t t = rows.steps - 1; t >= 0; --t) {
      const int64_t Bt = rows.rows_at(t), first = rows.offsets[t];
      const T* h_prev = h_prev_of(t);
      const T* h_product = dropout ? h_products.data() + first * O : h_prev;
      const T* dy_t = dy.get() + first * O;
      const T* cache_t = cache + first * cw;
      T* dax_t = dax.data() + first * GH;
      if (options.zoneout > 0) {  // dh becomes the cell's whole output gradient, (1 - d) (dy_t + dh)
        keep_factors(options, options.zoneout, options.zoneout_stream, rows, t, O, keep_h.data());
        for (int64_t j = 0; j < Bt * O; ++j) {
          const T total = dy_t[j] + dh[j];
          kept_h[j] = keep_h[j] * total;
          dh[j] = (T(1) - keep_h[j]) * total;
        }
        dy_t = no_dy.data();
      }
      if (options.zoneout_cell > 0) {
        keep_factors(options, options.zoneout_cell, options.zoneout_cell_stream, rows, t, H, keep_c.data());
        for (int64_t j = 0; j < Bt * H; ++j) {
          kept_c[j] = keep_c[j] * dc[j];
          dc[j] = (T(1) - keep_c[j]) * dc[j];
        }
      }

      switch (options.cell) {
        case CellType::lstm: {
          const T* d_output = dy_t;  // the cell's two gradients reaching o * act(c_t): these and dh
          const T* d_later = dh.data();
          if (W_hr != nullptr) {
            T* total = dh_total.data() + first * O;
            for (int64_t j = 0; j < Bt * O; ++j) total[j] = dy_t[j] + dh[j];
            gemm<T>(Bt, T(1), MatrixRef<T>::rows(total, O), projection, T(0), d_unprojected.data(), H);
            d_output = d_unprojected.data();
            d_later = no_dy.data();
          }
          for_each_row(Bt, kElementCost * H, [&](int64_t b) {
            const T* c_prev = t == 0 ? c0.data() + b * H : cache + (rows.offsets[t - 1] + b) * cw + carried;
            lstm_switch(lstm, options.coupled_gates, [&](auto kCoupled, auto kPeephole, auto kClip) {
              if (lstm_layer_norm) {
                lstm_layer_norm_backward_row<T, kRelu, kCoupled, kPeephole, kClip>(
                    H, lstm, peephole, cache_t + b * cw, c_prev, d_output + b * H, d_later + b * H, gamma_c, beta_c,
                    dc.data() + b * H, dax_t + b * GH, gain_rows.data() + b * H, bias_rows.data() + b * H);
              } else {
                lstm_backward_row<T, kRelu, kCoupled, kPeephole, kClip>(H, H, lstm, peephole, cache_t + b * cw, c_prev,
                                                                        d_output + b * H, d_later + b * H,
                                                                        dc.data() + b * H, dax_t + b * GH);
              }
            });
          });
          if (lstm_layer_norm) {
            column_sums(Bt, H, gain_rows.data(), H, true, d_gains[2].data());
            column_sums(Bt, H, bias_rows.data(), H, true, d_gains[3].data());
          }
          const T* d_product = layer_norm ? recurrent_layer_norm_backward(t, Bt, dax_t, GH) : dax_t;
          gemm<T>(Bt, T(1), MatrixRef<T>::rows(d_product, GH), recurrent, T(0), product.data(), O);
          fold_product(t, Bt, false);
          if (options.zoneout_cell > 0) {
            for (int64_t j = 0; j < Bt * H; ++j) dc[j] += kept_c[j];
          }
          break;
        }
        case CellType::rnn:
          for_each_row(Bt, kElementCost * H, [&](int64_t b) {
            rnn_backward_row<T, kRelu>(H, y.get() + (first + b) * H, dy_t + b * H, dh.data() + b * H, dax_t + b * H);
          });
          gemm<T>(Bt, T(1), MatrixRef<T>::rows(dax_t, GH), recurrent, T(0), product.data(), H);
          fold_product(t, Bt, false);
          break;
        case CellType::gru:
          if (options.reset_after) {
            T* dar_n_t = dar_n.data() + first * H;
            for_each_row(Bt, kElementCost * H, [&](int64_t b) {
              gru_reset_after_backward_row<T, kRelu>(H, H, cache_t + b * cw, h_prev + b * H, dy_t + b * H,
                                                     dh.data() + b * H, dax_t + b * GH, dar_n_t + b * H);
            });
            if (layer_norm) {  // one layer norm over the three blocks of R h: its backward sees them together
              for (int64_t b = 0; b < Bt; ++b) {
                std::memcpy(d_recurrent.data() + b * GH, dax_t + b * GH, sizeof(T) * 2 * H);
                std::memcpy(d_recurrent.data() + b * GH + 2 * H, dar_n_t + b * H, sizeof(T) * H);
              }
              const T* d_product = recurrent_layer_norm_backward(t, Bt, d_recurrent.data(), GH);
              gemm<T>(Bt, T(1), MatrixRef<T>::rows(d_product, GH), recurrent_all, T(0), product.data(), H);
            } else {
              gemm<T>(Bt, T(1), MatrixRef<T>::rows(dax_t, GH), recurrent, T(0), product.data(), H);
              gemm<T>(Bt, T(1), MatrixRef<T>::rows(dar_n_t, H), recurrent_n, T(1), product.data(), H);
            }
            fold_product(t, Bt, true);
          } else {
            for_each_row(Bt, kElementCost * H, [&](int64_t b) {
              gru_reset_before_backward_row<T, kRelu>(H, cache_t + b * cw, h_prev + b * H, dy_t + b * H,
                                                      dh.data() + b * H, dax_t + b * GH);
            });
            // d(r * h_{t-1}) = dar_n R_n, which r's gradient needs.
            gemm<T>(Bt, T(1), MatrixRef<T>::rows(dax_t + 2 * H, GH), recurrent_n, T(0), d_reset_hidden.data(), H);
            for_each_row(Bt, kElementCost * H, [&](int64_t b) {
              gru_reset_before_reset_grad_row<T>(H, cache_t + b * cw, h_product + b * H, mask_of(t) + b * H,
                                                 d_reset_hidden.data() + b * H, dh.data() + b * H, dax_t + b * GH);
            });
            gemm<T>(Bt, T(1), MatrixRef<T>::rows(dax_t, GH), recurrent, T(0), product.data(), H);
            fold_product(t, Bt, true);
          }
          break;
      }
      if (options.zoneout > 0) {
        for (int64_t j = 0; j < Bt * O; ++j) dh[j] += kept_h[j];
      }
    }
  }

  if (args.dh0.present()) rows_from_packed(rows, O, dh.data(), static_cast<T*>(args.dh0.data));
  if (args.dc0.present()) rows_from_packed(rows, H, dc.data(), static_cast<T*>(args.dc0.data));

  const T beta = args.accumulate ? T(1) : T(0);
  // The bias and peephole gradients read the pre-activations' gradients, which layer normalisation then turns
  // in place into those of x W^T before it, for dx and dW.
  if (args.dbW.present()) column_sums(N, GH, dax.data(), GH, args.accumulate, static_cast<T*>(args.dbW.data));
  if (args.dP.present()) {
    peephole_grads(options, rows, H, dax.data(), GH, cache, c0.data(), args.accumulate,
                   static_cast<T*>(args.dP.data));
  }
  if (args.dbR.present()) {
    T* dbR = static_cast<T*>(args.dbR.data);
    if (reset_after_gru) {
      column_sums(N, 2 * H, dax.data(), GH, args.accumulate, dbR);
      column_sums(N, H, dar_n.data(), H, args.accumulate, dbR + 2 * H);
    } else {
      column_sums(N, GH, dax.data(), GH, args.accumulate, dbR);
    }
  }
  for (int64_t r0 = 0; layer_norm && r0 < N; r0 += B) {
    const int64_t count = std::min(B, N - r0);
    for_each_row(count, kElementCost * GH, [&](int64_t b) {
      T* row = dax.data() + (r0 + b) * GH;
      layer_norm_backward_row(GH, cache + (r0 + b) * cw + raw_x, gamma_x, row, row, gain_rows.data() + b * GH);
    });
    column_sums(count, GH, gain_rows.data(), GH, true, d_gains[0].data());
  }
  const T* d_input = dax.data();
  if (args.dx.present()) {
    Scratch<T> dx_packed(rows.in_place ? 0 : N * I);
    T* dx = rows.in_place ? static_cast<T*>(args.dx.data) : dx_packed.data();
    gemm<T>(N, I, GH, T(1), MatrixRef<T>::rows(d_input, GH), MatrixRef<T>::rows(W, I), T(0), dx, I);
    if (!rows.in_place) unpack_rows(rows, w.steps, I, dx, static_cast<T*>(args.dx.data));
  }
  if (args.dW.present()) {
    gemm<T>(GH, I, N, T(1), MatrixRef<T>::transposed(d_input, GH), MatrixRef<T>::rows(x.get(), I), beta,
            static_cast<T*>(args.dW.data), I);
  }

  if (args.dW_hr.present()) {
    // dW_hr = sum over steps of (dy_t + dh)^T m_t, with m_t = o * act(c_t) (act(LN(c_t)) with layer
    // normalisation) recomputed from the cache.
    Scratch<T> unprojected(N * H);
    for_each_row(N, kElementCost * H, [&](int64_t r) {
      const T* saved = cache + r * cw;
      if (lstm_layer_norm) {
        lstm_layer_norm_output_row<T, kRelu>(H, saved, gamma_c, beta_c, unprojected.data() + r * H);
        return;
      }
      for (int64_t j = 0; j < H; ++j) {
        unprojected[r * H + j] = cells::lstm_output(kRelu, saved[3 * H + j], saved[4 * H + j]);
      }
    });
    gemm<T>(O, H, N, T(1), MatrixRef<T>::transposed(dh_total.data(), O), MatrixRef<T>::rows(unprojected.data(), H),
            beta, static_cast<T*>(args.dW_hr.data), H);
  }

  // DropConnect: the products used R * M, so dR = M * (their gradient), formed in a scratch first.
  const bool weight_dropout = options.weight_dropout > 0 && args.dR.present();
  Scratch<T> dR_dropped(weight_dropout ? GH * O : 0);
  T* dR_out = weight_dropout ? dR_dropped.data() : static_cast<T*>(args.dR.data);
  const T beta_R = weight_dropout ? T(0) : beta;
  // dR[rows] = sum over steps of da^T h_{t-1}, for a block of R's rows whose pre-activation gradients are
  // `da` (leading dimension lda). Dense and without dropout, step 0 reads h0 and later steps read y: two
  // products; otherwise one over h_products.
  auto recurrent_weight_grad = [&](int64_t row0, int64_t count, const T* da, int64_t lda) {
    T* out = dR_out + row0 * O;
    if (gather_products) {
      gemm<T>(count, O, N, T(1), MatrixRef<T>::transposed(da, lda), MatrixRef<T>::rows(h_products.data(), O),
              beta_R, out, O);
      return;
    }
    gemm<T>(count, O, N - B, T(1), MatrixRef<T>::transposed(da + B * lda, lda), MatrixRef<T>::rows(y.get(), O),
            beta_R, out, O);
    if (args.h0.present()) {
      gemm<T>(count, O, B, T(1), MatrixRef<T>::transposed(da, lda), MatrixRef<T>::rows(h0.data(), O), T(1), out, O);
    }
  };
  if (args.dR.present()) {
    if (layer_norm) {  // every block's product took the gradients of R h before its layer norm
      recurrent_weight_grad(0, GH, dar_raw.data(), GH);
    } else if (options.cell != CellType::gru) {
      recurrent_weight_grad(0, GH, dax.data(), GH);
    } else {
      recurrent_weight_grad(0, 2 * H, dax.data(), GH);
      if (options.reset_after) {
        recurrent_weight_grad(2 * H, H, dar_n.data(), H);
      } else {
        // The n block's recurrent product read r * h_{t-1}, saved in the cache's fourth column block.
        gemm<T>(H, H, N, T(1), MatrixRef<T>::transposed(dax.data() + 2 * H, GH),
                MatrixRef<T>::rows(cache + 3 * H, cw), beta_R, dR_out + 2 * H * H, H);
      }
    }
  }
  if (weight_dropout) {
    T* dR = static_cast<T*>(args.dR.data);
    for_each_row(GH, kElementCost * O, [&](int64_t r) {
      for (int64_t k = r * O; k < (r + 1) * O; ++k) {
        const T masked_grad = weight_mask<T>(options, r, k - r * O) * dR_dropped[k];
        dR[k] = args.accumulate ? dR[k] + masked_grad : masked_grad;
      }
    });
  }
  const TensorView* gain_grads[] = {&args.dgamma_x, &args.dgamma_h, &args.dgamma_c, &args.dbeta_c};
  for (int k = 0; k < 4; ++k) {
    if (!gain_grads[k]->present()) continue;
    T* out = static_cast<T*>(gain_grads[k]->data);
    for (size_t j = 0; j < d_gains[k].size(); ++j) out[j] = args.accumulate ? out[j] + d_gains[k][j] : d_gains[k][j];
  }
}

}  // namespace

void cpu_dropout_mask(double p, bool variational, uint64_t seed, uint64_t mask_stream, const TensorView& out) {
  const int64_t steps = out.shape[0], rows = out.shape[1], units = out.shape[2];
  auto fill = [&](auto* data) {
    using T = std::remove_pointer_t<decltype(data)>;
    for (int64_t t = 0; t < steps; ++t) {
      for (int64_t b = 0; b < rows; ++b) {
        for (int64_t u = 0; u < units; ++u) {
          data[(t * rows + b) * units + u] =
              cells::dropout_mask_value<T>(p, seed, mask_stream, b, u, variational ? 0 : t);
        }
      }
    }
  };
  if (out.dtype == DType::float64) {
    fill(static_cast<double*>(out.data));
  } else {
    fill(static_cast<float*>(out.data));
  }
}

void cpu_forward(const CellOptions& options, const WindowSizes& sizes, const ForwardArgs& args) {
  const cpu::WindowThreads threads;
  bool_switch(options.activation == Activation::relu, [&](auto relu) {
    if (args.x.dtype == DType::float64) {
      forward_window<double, decltype(relu)::value>(options, sizes, args);
    } else {
      forward_window<float, decltype(relu)::value>(options, sizes, args);
    }
  });
}

void cpu_backward(const CellOptions& options, const WindowSizes& sizes, const BackwardArgs& args) {
  const cpu::WindowThreads threads;
  bool_switch(options.activation == Activation::relu, [&](auto relu) {
    if (args.x.dtype == DType::float64) {
      backward_window<double, decltype(relu)::value>(options, sizes, args);
    } else {
      backward_window<float, decltype(relu)::value>(options, sizes, args);
    }
  });
}

}  // namespace conveyor::detail
