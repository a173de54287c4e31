// Batches with lengths (conveyor.h, ForwardArgs::lengths): the packed order both backends run them in.
//
// Rows are ordered by decreasing length (ties in their original order), so that the rows still running at
// step t are the first rows_at(t) rows of step t - 1's, and the window's arrays are packed as PyTorch's
// PackedSequence is: step t's rows are rows offsets[t] .. offsets[t + 1] - 1, nothing stored for a padded
// step. A product over step t then has rows_at(t) rows, and the window's work is proportional to the tokens
// present. Internal: not installed.
#pragma once

#include <cstdint>
#include <vector>

#include "conveyor/conveyor.h"

namespace conveyor::detail {

struct PackedBatch {
  int64_t steps = 0;            // the longest length: steps past it have no rows
  int64_t batch = 0;            // B
  std::vector<int64_t> order;   // packed row k is the batch's row order[k]
  std::vector<int64_t> rank;    // row b is packed row rank[b] (order's inverse)
  std::vector<int64_t> length;  // length[k]: packed row k's length, non-increasing in k
  std::vector<int64_t> offsets; // [steps + 1]: step t's first packed row; offsets[steps] = sum of lengths
  bool dense = false;           // every row runs every step in its own place: packed arrays are the padded ones
  bool in_place = false;        // the caller's arrays are laid out as the window runs: dense, or given packed

  int64_t rows_at(int64_t t) const { return offsets[t + 1] - offsets[t]; }
  int64_t tokens() const { return offsets[steps]; }
  // Where row k's last step lies in the packed arrays.
  int64_t last_row(int64_t k) const { return offsets[length[k] - 1] + k; }
};

// The packed order of a batch of `lengths` (B values) in a window of `steps` steps. Throws ArgumentError
// naming the first length outside [1, steps].
PackedBatch pack_batch(const std::vector<int64_t>& lengths, int64_t steps);

// A batch without lengths: B rows that all run `steps` steps (offsets t * B, dense).
PackedBatch dense_batch(int64_t steps, int64_t batch);

// The rows of a window: packed by `lengths` when given (their values on the host), in the caller's layout
// when `packed` (ForwardArgs::packed: the lengths non-increasing, the arrays packed already), else every
// row for all `steps` steps.
PackedBatch window_batch(const std::vector<int64_t>* lengths, int64_t steps, int64_t batch, bool packed);

// The values of a lengths view in host memory (int32 or int64, checked by api.cpp).
std::vector<int64_t> host_lengths(const TensorView& lengths);

}  // namespace conveyor::detail
