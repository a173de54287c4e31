// NVTX ranges for the launchers of both backends, so that Nsight Systems shows every call by name
// ("conveyor::lstm_forward", ...). NVTX 3 is header-only; the build defines CONVEYOR_NVTX where the CUDA
// toolkit's headers are found. Elsewhere the range is an empty object. Internal: not installed.
#pragma once

#if defined(CONVEYOR_NVTX)
#include <nvtx3/nvToolsExt.h>
#endif

namespace conveyor::detail {

class NvtxRange {
 public:
#if defined(CONVEYOR_NVTX)
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
#else
  explicit NvtxRange(const char*) {}
#endif
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace conveyor::detail
