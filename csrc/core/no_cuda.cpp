// Linked instead of cuda/ when the library is built without the CUDA backend.
#include "core/backends.h"

namespace conveyor::detail {

bool cuda_backend_built() { return false; }

bool cuda_backend_emulated() { return false; }

int cuda_device_count_or_zero() { return 0; }

double cuda_cell_check(int) { throw ArgumentError("device: this build of Conveyor has no CUDA backend"); }

void cuda_forward(const CellOptions&, const WindowSizes&, const ForwardArgs&, void*) {
  throw ArgumentError("x: this build of Conveyor has no CUDA backend");
}

void cuda_backward(const CellOptions&, const WindowSizes&, const BackwardArgs&, void*) {
  throw ArgumentError("x: this build of Conveyor has no CUDA backend");
}

void cuda_dropout_mask(double, bool, uint64_t, uint64_t, const TensorView&, void*) {
  throw ArgumentError("out: this build of Conveyor has no CUDA backend");
}

}  // namespace conveyor::detail
