// The persistent kernels (persistent.cu): a window's whole recurrence in one cooperative launch. Each block
// owns `units` hidden units and keeps the rows of R that produce them (forward: every gate's row of each unit;
// backward: each unit's column of every row) in shared memory for all T steps; the grid synchronises once
// per step (twice for the GRU with reset_after = false), and h_t (forward) or the pre-activation gradients
// (backward) pass between blocks through global memory, where the next step reads them.
#pragma once

#include <string>

#include "conveyor/conveyor.h"
#include "step.cuh"

namespace conveyor::cuda {

// How the persistent kernel would run a window's recurrence on the current device, or why it cannot. The LSTM's
// projection (W_hr) it cannot: its h_t = W_hr m_t needs every block's m_t, one more grid barrier a step, and its
// backward splits R's columns by P, not H: such a window runs on the per-step kernels. DropConnect (the window's R
// is R * M), zoneout (in the epilogues, step.cuh) and layer normalisation (its row statistics combined across the
// blocks after a grid barrier, persistent.cu) it runs.
struct PersistentPlan {
  bool fits = false;
  int units = 0;            // hidden units per block
  unsigned blocks = 0;      // ceil(H / units), all co-resident
  size_t shared_bytes = 0;  // the block's slice of R (dynamic shared memory)
  std::string why;          // when it does not fit: what does not
};

template <typename S, bool kRelu>
PersistentPlan persistent_forward_plan(const CellOptions& options, int64_t hidden, bool projection);
template <typename S, bool kRelu>
PersistentPlan persistent_backward_plan(const CellOptions& options, int64_t hidden, bool projection);

// The window's recurrence (every step's kernel of the per-step path) in one launch; `plan` fits.
template <typename S, bool kRelu>
void forward_persistent(const CellOptions& options, const PersistentPlan& plan, const ForwardWindow<S>& window,
                        cudaStream_t stream);
// Also dh0 (= the initial_state step) when not null.
template <typename S, bool kRelu>
void backward_persistent(const CellOptions& options, const PersistentPlan& plan, const BackwardWindow<S>& window,
                         S* dh0, cudaStream_t stream);

}  // namespace conveyor::cuda
