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
#include <cstring>
#include <vector>

#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "core/backends.h"
#include "gemm.h"
#include "thread_pool.h"

namespace conveyor::detail {
namespace {

using cpu::gemm;
using cpu::MatrixRef;

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

struct Window {
  int64_t steps, batch, input_size, hidden_size, gates;
  bool relu;
  int64_t gh() const { return gates * hidden_size; }
  int64_t rows() const { return steps * batch; }
};

Window make_window(const CellOptions& options, const WindowSizes& s) {
  return {s.steps, s.batch, s.input_size, s.hidden_size, gate_count(options), options.activation == Activation::relu};
}

template <typename T>
void forward_window(const CellOptions& options, const WindowSizes& sizes, const ForwardArgs& args) {
  const Window w = make_window(options, sizes);
  const int64_t B = w.batch, H = w.hidden_size, GH = w.gh();
  const int64_t cw = cache_width(options) * H;
  const T* x = static_cast<const T*>(args.x.data);
  const T* W = static_cast<const T*>(args.W.data);
  const T* R = static_cast<const T*>(args.R.data);
  const T* bW = data_or_null<T>(args.bW);
  const T* bR = data_or_null<T>(args.bR);
  T* y = static_cast<T*>(args.y.data);
  T* cache = mutable_or_null<T>(args.cache);
  const bool relu = w.relu;

  // ax = x W^T + bW for every step at once.
  std::vector<T> ax(static_cast<size_t>(w.rows() * GH));
  gemm<T>(w.rows(), GH, w.input_size, T(1), MatrixRef<T>::rows(x, w.input_size),
          MatrixRef<T>::transposed(W, w.input_size), T(0), ax.data(), GH);
  if (bW != nullptr) {
    for_each_row(w.rows(), double(GH), [&](int64_t r) {
      T* row = ax.data() + r * GH;
      for (int64_t j = 0; j < GH; ++j) row[j] += bW[j];
    });
  }
  auto bias_r = [&](int64_t j) { return bR != nullptr ? bR[j] : T(0); };

  std::vector<T> zeros(static_cast<size_t>(B * H), T(0));
  const T* h0 = args.h0.present() ? static_cast<const T*>(args.h0.data) : zeros.data();
  std::vector<T> ar(static_cast<size_t>(B * GH));  // the recurrent pre-activations of one step
  std::vector<T> cell_state;                        // LSTM: c_{t-1}, then c_t, in place
  std::vector<T> reset_hidden;                      // GRU reset_before: r * h_{t-1}
  if (options.cell == CellType::lstm) {
    cell_state.assign(static_cast<size_t>(B * H), T(0));
    if (args.c0.present()) std::memcpy(cell_state.data(), args.c0.data, sizeof(T) * B * H);
  }
  if (options.cell == CellType::gru && !options.reset_after) reset_hidden.resize(static_cast<size_t>(B * H));

  for (int64_t t = 0; t < w.steps; ++t) {
    const T* h_prev = t == 0 ? h0 : y + (t - 1) * B * H;
    T* h = y + t * B * H;
    const T* ax_t = ax.data() + t * B * GH;
    T* cache_t = cache != nullptr ? cache + t * B * cw : nullptr;

    if (options.cell == CellType::gru && !options.reset_after) {
      // r and z first: the n block's recurrent product reads r * h_{t-1}.
      gemm<T>(B, 2 * H, H, T(1), MatrixRef<T>::rows(h_prev, H), MatrixRef<T>::transposed(R, H), T(0), ar.data(),
              GH);
      for_each_row(B, kElementCost * H, [&](int64_t b) {
        for (int64_t j = 0; j < H; ++j) {
          const T* a = ax_t + b * GH;
          const T* q = ar.data() + b * GH;
          const T r = cells::sigmoid(a[j] + q[j] + bias_r(j));
          const T z = cells::sigmoid(a[H + j] + q[H + j] + bias_r(H + j));
          reset_hidden[b * H + j] = r * h_prev[b * H + j];
          if (cache_t != nullptr) {
            cache_t[b * cw + j] = r;
            cache_t[b * cw + H + j] = z;
            cache_t[b * cw + 3 * H + j] = reset_hidden[b * H + j];
          }
          ar[b * GH + j] = r;  // the pre-activation is spent; keep r and z for the second pass
          ar[b * GH + H + j] = z;
        }
      });
      gemm<T>(B, H, H, T(1), MatrixRef<T>::rows(reset_hidden.data(), H), MatrixRef<T>::transposed(R + 2 * H * H, H),
              T(0), ar.data() + 2 * H, GH);
      for_each_row(B, kElementCost * H, [&](int64_t b) {
        for (int64_t j = 0; j < H; ++j) {
          const T* q = ar.data() + b * GH;
          const T n = cells::gru_candidate_reset_before(relu, ax_t[b * GH + 2 * H + j], q[2 * H + j] + bias_r(2 * H + j));
          h[b * H + j] = cells::gru_output(q[H + j], n, h_prev[b * H + j]);
          if (cache_t != nullptr) cache_t[b * cw + 2 * H + j] = n;
        }
      });
      continue;
    }

    gemm<T>(B, GH, H, T(1), MatrixRef<T>::rows(h_prev, H), MatrixRef<T>::transposed(R, H), T(0), ar.data(), GH);
    switch (options.cell) {
      case CellType::lstm:
        for_each_row(B, kElementCost * H, [&](int64_t b) {
          const T* a = ax_t + b * GH;
          const T* q = ar.data() + b * GH;
          for (int64_t j = 0; j < H; ++j) {
            T& c = cell_state[b * H + j];
            const auto s = cells::lstm_forward(relu, a[j] + q[j] + bias_r(j), a[H + j] + q[H + j] + bias_r(H + j),
                                               a[2 * H + j] + q[2 * H + j] + bias_r(2 * H + j),
                                               a[3 * H + j] + q[3 * H + j] + bias_r(3 * H + j), c);
            c = s.c;
            h[b * H + j] = s.h;
            if (cache_t != nullptr) {
              T* saved = cache_t + b * cw;
              saved[j] = s.i;
              saved[H + j] = s.f;
              saved[2 * H + j] = s.g;
              saved[3 * H + j] = s.o;
              saved[4 * H + j] = s.c;
            }
          }
        });
        break;
      case CellType::gru:  // reset_after
        for_each_row(B, kElementCost * H, [&](int64_t b) {
          const T* a = ax_t + b * GH;
          const T* q = ar.data() + b * GH;
          for (int64_t j = 0; j < H; ++j) {
            const T r = cells::sigmoid(a[j] + q[j] + bias_r(j));
            const T z = cells::sigmoid(a[H + j] + q[H + j] + bias_r(H + j));
            const T ar_n = q[2 * H + j] + bias_r(2 * H + j);
            const T n = cells::gru_candidate_reset_after(relu, a[2 * H + j], r, ar_n);
            h[b * H + j] = cells::gru_output(z, n, h_prev[b * H + j]);
            if (cache_t != nullptr) {
              T* saved = cache_t + b * cw;
              saved[j] = r;
              saved[H + j] = z;
              saved[2 * H + j] = n;
              saved[3 * H + j] = ar_n;
            }
          }
        });
        break;
      case CellType::rnn:
        for_each_row(B, kElementCost * H, [&](int64_t b) {
          for (int64_t j = 0; j < H; ++j) {
            h[b * H + j] = cells::rnn_forward(relu, ax_t[b * H + j] + ar[b * H + j] + bias_r(j));
          }
        });
        break;
    }
  }

  if (args.h_T.present()) std::memcpy(args.h_T.data, y + (w.steps - 1) * B * H, sizeof(T) * B * H);
  if (args.c_T.present()) std::memcpy(args.c_T.data, cell_state.data(), sizeof(T) * B * H);
}

template <typename T>
void backward_window(const CellOptions& options, const WindowSizes& sizes, const BackwardArgs& args) {
  const Window w = make_window(options, sizes);
  const int64_t B = w.batch, H = w.hidden_size, I = w.input_size, GH = w.gh(), TB = w.rows();
  const int64_t cw = cache_width(options) * H;
  const T* x = static_cast<const T*>(args.x.data);
  const T* W = static_cast<const T*>(args.W.data);
  const T* R = static_cast<const T*>(args.R.data);
  const T* y = static_cast<const T*>(args.y.data);
  const T* cache = data_or_null<T>(args.cache);
  const T* dy = static_cast<const T*>(args.dy.data);
  const bool relu = w.relu;
  const bool reset_after_gru = options.cell == CellType::gru && options.reset_after;
  const bool reset_before_gru = options.cell == CellType::gru && !options.reset_after;

  std::vector<T> zeros(static_cast<size_t>(B * H), T(0));
  const T* h0 = args.h0.present() ? static_cast<const T*>(args.h0.data) : zeros.data();
  const T* c0 = args.c0.present() ? static_cast<const T*>(args.c0.data) : zeros.data();

  // Gradients of the pre-activations of every step: dax for the input path (and, but for the GRU's n block
  // when reset_after, the recurrent path too); dar_n for that n block.
  std::vector<T> dax(static_cast<size_t>(TB * GH));
  std::vector<T> dar_n(reset_after_gru ? static_cast<size_t>(TB * H) : 0);
  // The gradient reaching h_t (and c_t) from later steps, carried backwards.
  std::vector<T> dh(static_cast<size_t>(B * H), T(0));
  std::vector<T> dc(options.cell == CellType::lstm ? static_cast<size_t>(B * H) : 0, T(0));
  std::vector<T> d_reset_hidden(reset_before_gru ? static_cast<size_t>(B * H) : 0);
  if (args.dh_T.present()) std::memcpy(dh.data(), args.dh_T.data, sizeof(T) * B * H);
  if (args.dc_T.present()) std::memcpy(dc.data(), args.dc_T.data, sizeof(T) * B * H);

  for (int64_t t = w.steps - 1; t >= 0; --t) {
    const T* h_prev = t == 0 ? h0 : y + (t - 1) * B * H;
    const T* dy_t = dy + t * B * H;
    const T* cache_t = cache + t * B * cw;
    T* dax_t = dax.data() + t * B * GH;

    switch (options.cell) {
      case CellType::lstm:
        for_each_row(B, kElementCost * H, [&](int64_t b) {
          const T* saved = cache_t + b * cw;
          const T* c_prev = t == 0 ? c0 + b * H : cache_t - B * cw + b * cw + 4 * H;
          T* da = dax_t + b * GH;
          for (int64_t j = 0; j < H; ++j) {
            const auto d = cells::lstm_backward(relu, saved[j], saved[H + j], saved[2 * H + j], saved[3 * H + j],
                                                saved[4 * H + j], c_prev[j], dh[b * H + j] + dy_t[b * H + j],
                                                dc[b * H + j]);
            da[j] = d.da_i;
            da[H + j] = d.da_f;
            da[2 * H + j] = d.da_g;
            da[3 * H + j] = d.da_o;
            dc[b * H + j] = d.dc_prev;
          }
        });
        gemm<T>(B, H, GH, T(1), MatrixRef<T>::rows(dax_t, GH), MatrixRef<T>::rows(R, H), T(0), dh.data(), H);
        break;
      case CellType::rnn:
        for_each_row(B, kElementCost * H, [&](int64_t b) {
          for (int64_t j = 0; j < H; ++j) {
            dax_t[b * H + j] = cells::rnn_backward(relu, y[(t * B + b) * H + j], dh[b * H + j] + dy_t[b * H + j]);
          }
        });
        gemm<T>(B, H, GH, T(1), MatrixRef<T>::rows(dax_t, GH), MatrixRef<T>::rows(R, H), T(0), dh.data(), H);
        break;
      case CellType::gru:
        if (options.reset_after) {
          T* dar_n_t = dar_n.data() + t * B * H;
          for_each_row(B, kElementCost * H, [&](int64_t b) {
            const T* saved = cache_t + b * cw;
            T* da = dax_t + b * GH;
            for (int64_t j = 0; j < H; ++j) {
              const auto d = cells::gru_backward_reset_after(relu, saved[j], saved[H + j], saved[2 * H + j],
                                                             saved[3 * H + j], h_prev[b * H + j],
                                                             dh[b * H + j] + dy_t[b * H + j]);
              da[j] = d.da_r;
              da[H + j] = d.da_z;
              da[2 * H + j] = d.dax_n;
              dar_n_t[b * H + j] = d.dar_n;
              dh[b * H + j] = d.dh_prev;
            }
          });
          gemm<T>(B, H, 2 * H, T(1), MatrixRef<T>::rows(dax_t, GH), MatrixRef<T>::rows(R, H), T(1), dh.data(), H);
          gemm<T>(B, H, H, T(1), MatrixRef<T>::rows(dar_n_t, H), MatrixRef<T>::rows(R + 2 * H * H, H), T(1),
                  dh.data(), H);
        } else {
          for_each_row(B, kElementCost * H, [&](int64_t b) {
            const T* saved = cache_t + b * cw;
            T* da = dax_t + b * GH;
            for (int64_t j = 0; j < H; ++j) {
              const auto d = cells::gru_backward_reset_before(relu, saved[H + j], saved[2 * H + j],
                                                              h_prev[b * H + j], dh[b * H + j] + dy_t[b * H + j]);
              da[H + j] = d.da_z;
              da[2 * H + j] = d.dax_n;
              dh[b * H + j] = d.dh_prev;
            }
          });
          // d(r * h_{t-1}) = dar_n R_n, which r's gradient needs.
          gemm<T>(B, H, H, T(1), MatrixRef<T>::rows(dax_t + 2 * H, GH), MatrixRef<T>::rows(R + 2 * H * H, H), T(0),
                  d_reset_hidden.data(), H);
          for_each_row(B, kElementCost * H, [&](int64_t b) {
            const T* saved = cache_t + b * cw;
            for (int64_t j = 0; j < H; ++j) {
              const T r = saved[j];
              const T d_rh = d_reset_hidden[b * H + j];
              dax_t[b * GH + j] = cells::gru_reset_gate_grad_reset_before(r, h_prev[b * H + j], d_rh);
              dh[b * H + j] += d_rh * r;
            }
          });
          gemm<T>(B, H, 2 * H, T(1), MatrixRef<T>::rows(dax_t, GH), MatrixRef<T>::rows(R, H), T(1), dh.data(), H);
        }
        break;
    }
  }

  if (args.dh0.present()) std::memcpy(args.dh0.data, dh.data(), sizeof(T) * B * H);
  if (args.dc0.present()) std::memcpy(args.dc0.data, dc.data(), sizeof(T) * B * H);

  const T beta = args.accumulate ? T(1) : T(0);
  if (args.dx.present()) {
    gemm<T>(TB, I, GH, T(1), MatrixRef<T>::rows(dax.data(), GH), MatrixRef<T>::rows(W, I), T(0),
            static_cast<T*>(args.dx.data), I);
  }
  if (args.dW.present()) {
    gemm<T>(GH, I, TB, T(1), MatrixRef<T>::transposed(dax.data(), GH), MatrixRef<T>::rows(x, I), beta,
            static_cast<T*>(args.dW.data), I);
  }
  if (args.dbW.present()) column_sums(TB, GH, dax.data(), GH, args.accumulate, static_cast<T*>(args.dbW.data));

  // dR[rows] = sum over steps of da^T h_{t-1}, for a block of R's rows whose pre-activation gradients are
  // `da` (leading dimension lda). Step 0 reads h0 and later steps read y, so it is two products.
  auto recurrent_weight_grad = [&](int64_t row0, int64_t rows, const T* da, int64_t lda) {
    T* out = static_cast<T*>(args.dR.data) + row0 * H;
    gemm<T>(rows, H, TB - B, T(1), MatrixRef<T>::transposed(da + B * lda, lda), MatrixRef<T>::rows(y, H), beta, out,
            H);
    if (args.h0.present()) {
      gemm<T>(rows, H, B, T(1), MatrixRef<T>::transposed(da, lda), MatrixRef<T>::rows(h0, H), T(1), out, H);
    }
  };
  if (args.dR.present()) {
    if (options.cell != CellType::gru) {
      recurrent_weight_grad(0, GH, dax.data(), GH);
    } else {
      recurrent_weight_grad(0, 2 * H, dax.data(), GH);
      T* out_n = static_cast<T*>(args.dR.data) + 2 * H * H;
      if (options.reset_after) {
        recurrent_weight_grad(2 * H, H, dar_n.data(), H);
      } else {
        // The n block's recurrent product read r * h_{t-1}, saved in the cache's fourth column block.
        gemm<T>(H, H, TB, T(1), MatrixRef<T>::transposed(dax.data() + 2 * H, GH),
                MatrixRef<T>::rows(cache + 3 * H, cw), beta, out_n, H);
      }
    }
  }
  if (args.dbR.present()) {
    T* dbR = static_cast<T*>(args.dbR.data);
    if (reset_after_gru) {
      column_sums(TB, 2 * H, dax.data(), GH, args.accumulate, dbR);
      column_sums(TB, H, dar_n.data(), H, args.accumulate, dbR + 2 * H);
    } else {
      column_sums(TB, GH, dax.data(), GH, args.accumulate, dbR);
    }
  }
}

}  // namespace

void cpu_forward(const CellOptions& options, const WindowSizes& sizes, const ForwardArgs& args) {
  if (args.x.dtype == DType::float64) {
    forward_window<double>(options, sizes, args);
  } else {
    forward_window<float>(options, sizes, args);
  }
}

void cpu_backward(const CellOptions& options, const WindowSizes& sizes, const BackwardArgs& args) {
  if (args.x.dtype == DType::float64) {
    backward_window<double>(options, sizes, args);
  } else {
    backward_window<float>(options, sizes, args);
  }
}

}  // namespace conveyor::detail
