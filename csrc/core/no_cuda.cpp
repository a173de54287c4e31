// Linked instead of cuda/ when the library is built without the CUDA backend.
#include "core/backends.h"

namespace conveyor::detail {
namespace {
[[noreturn]] void no_backend() { throw ArgumentError("device: this build of Conveyor has no CUDA backend"); }
}  // namespace

bool cuda_backend_built() { return false; }

bool cuda_backend_emulated() { return false; }

int cuda_device_count_or_zero() { return 0; }

double cuda_cell_check(int) { no_backend(); }

void cuda_forward(const CellOptions&, const WindowSizes&, const ForwardArgs&, void*) {
  throw ArgumentError("x: this build of Conveyor has no CUDA backend");
}

void cuda_backward(const CellOptions&, const WindowSizes&, const BackwardArgs&, void*) {
  throw ArgumentError("x: this build of Conveyor has no CUDA backend");
}

void cuda_dropout_mask(double, bool, uint64_t, uint64_t, const TensorView&, void*) {
  throw ArgumentError("out: this build of Conveyor has no CUDA backend");
}

PersistentFloorLaunch cuda_persistent_floor(const CellOptions&, int64_t, int64_t, int64_t, const std::string&, bool,
                                            void*) {
  no_backend();
}

uintptr_t cuda_test_malloc(int, size_t) { no_backend(); }
void cuda_test_gemm(const std::string&, const std::string&, int64_t, int64_t, int64_t, uintptr_t, bool, uintptr_t,
                    bool, uintptr_t, bool, bool, uintptr_t) {
  no_backend();
}
void cuda_test_free(int, uintptr_t) { no_backend(); }
void cuda_test_copy(int, uintptr_t, uintptr_t, size_t, bool) { no_backend(); }
uintptr_t cuda_test_stream_create(int) { no_backend(); }
void cuda_test_stream_destroy(int, uintptr_t) { no_backend(); }
void cuda_test_synchronize(int, uintptr_t) { no_backend(); }
uint64_t cuda_test_pool_release_threshold(int) { no_backend(); }

}  // namespace conveyor::detail
