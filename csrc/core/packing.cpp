#include "core/packing.h"

#include <algorithm>
#include <numeric>
#include <string>

namespace conveyor::detail {

PackedBatch pack_batch(const std::vector<int64_t>& lengths, int64_t steps) {
  PackedBatch p;
  p.batch = static_cast<int64_t>(lengths.size());
  for (int64_t b = 0; b < p.batch; ++b) {
    if (lengths[b] < 1 || lengths[b] > steps) {
      throw ArgumentError("lengths: expected every length in [1, T] = [1, " + std::to_string(steps) +
                          "], got lengths[" + std::to_string(b) + "] = " + std::to_string(lengths[b]));
    }
  }
  p.order.resize(lengths.size());
  std::iota(p.order.begin(), p.order.end(), int64_t(0));
  std::stable_sort(p.order.begin(), p.order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  p.rank.resize(lengths.size());
  p.length.resize(lengths.size());
  for (int64_t k = 0; k < p.batch; ++k) {
    p.rank[p.order[k]] = k;
    p.length[k] = lengths[p.order[k]];
  }
  p.steps = p.batch > 0 ? p.length[0] : 0;
  p.offsets.assign(static_cast<size_t>(p.steps + 1), 0);
  // rows_at(t) = the number of rows longer than t; with the lengths sorted, a pointer walks down them.
  int64_t running = p.batch;
  for (int64_t t = 0; t < p.steps; ++t) {
    while (running > 0 && p.length[running - 1] <= t) --running;
    p.offsets[t + 1] = p.offsets[t] + running;
  }
  p.dense = p.steps == steps && p.tokens() == steps * p.batch;  // all of length T: order is the identity
  p.in_place = p.dense;
  return p;
}

PackedBatch dense_batch(int64_t steps, int64_t batch) {
  PackedBatch p;
  p.steps = steps;
  p.batch = batch;
  p.order.resize(static_cast<size_t>(batch));
  std::iota(p.order.begin(), p.order.end(), int64_t(0));
  p.rank = p.order;
  p.length.assign(static_cast<size_t>(batch), steps);
  p.offsets.resize(static_cast<size_t>(steps + 1));
  for (int64_t t = 0; t <= steps; ++t) p.offsets[t] = t * batch;
  p.dense = p.in_place = true;
  return p;
}

PackedBatch window_batch(const std::vector<int64_t>* lengths, int64_t steps, int64_t batch, bool packed) {
  if (lengths == nullptr) return dense_batch(steps, batch);
  PackedBatch p = pack_batch(*lengths, steps);
  p.in_place = p.in_place || packed;  // sorted lengths (checked by api.cpp): the packed order is theirs
  return p;
}

std::vector<int64_t> host_lengths(const TensorView& lengths) {
  const int64_t n = lengths.shape[0];
  std::vector<int64_t> out(static_cast<size_t>(n));
  if (lengths.dtype == DType::int32) {
    const auto* v = static_cast<const int32_t*>(lengths.data);
    for (int64_t b = 0; b < n; ++b) out[b] = v[b];
  } else {
    const auto* v = static_cast<const int64_t*>(lengths.data);
    for (int64_t b = 0; b < n; ++b) out[b] = v[b];
  }
  return out;
}

}  // namespace conveyor::detail
