// The dropout masks of docs/math.md, from a counter-based generator: the keep/drop decision for one element is a
// pure function of (seed, stream, batch row, unit, step), computed with 64-bit integer arithmetic only, so
// that the CPU, the GPU and the NumPy reference (tests/reference.py) draw exactly the same masks.
//
// `stream` distinguishes the masks of one call: the layer, the direction, and which mask (a layer's input
// or its recurrent state). `step` is the time step, or 0 for every step of a variational mask.
#pragma once

#include <cstdint>

#include "common.h"

namespace conveyor::cells {

// SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijection of 64-bit words with good avalanche.
CONVEYOR_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// A uniform number in [0, 1) with 53 random bits.
CONVEYOR_HOST_DEVICE double dropout_uniform(uint64_t seed, uint64_t stream, uint64_t row, uint64_t unit,
                                            uint64_t step) {
  uint64_t z = mix64(seed + 0x9e3779b97f4a7c15ULL);
  z = mix64(z ^ stream);
  z = mix64(z ^ row);
  z = mix64(z ^ unit);
  z = mix64(z ^ step);
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

// The inverted-dropout mask value for probability p of dropping: 0 or 1 / (1 - p).
template <typename T>
CONVEYOR_HOST_DEVICE T dropout_mask_value(double p, uint64_t seed, uint64_t stream, uint64_t row, uint64_t unit,
                                          uint64_t step) {
  return dropout_uniform(seed, stream, row, unit, step) < p ? T(0) : static_cast<T>(1.0 / (1.0 - p));
}

// Zoneout's keep factor d of one element (Krueger et al. 2017), in h_t = d h_{t-1} + (1 - d) h~_t: when sampled
// (training) 1 with probability z, from the draw dropout uses, else 0; otherwise (evaluation) the expectation z.
template <typename T>
CONVEYOR_HOST_DEVICE T zoneout_keep(double z, bool sample, uint64_t seed, uint64_t stream, uint64_t row, uint64_t unit,
                                    uint64_t step) {
  if (!sample) return static_cast<T>(z);
  return dropout_uniform(seed, stream, row, unit, step) < z ? T(1) : T(0);
}

}  // namespace conveyor::cells
