// Checks the CUDA emulator (cuda/emulator/) through kernels of its own, compiled like the files of cuda/: by
// nvcc in CUDA builds, as host C++ on the emulator with CONVEYOR_EMULATE_CUDA=ON. Every result is computed
// again on the host from random inputs into outputs poisoned with NaN (or 0xdeadbeef for integers), so the
// same checks hold on a GPU. Covered: block barriers (a shared-memory reduction over several blocks, the last
// one partial; a transpose through a shared tile in 2-D blocks; the built-in variables and a barrier in 3-D
// blocks and grids), __syncwarp with full and partial masks, __shfl_sync/_up/_down/_xor at widths 32, 16 and 8
// over float, int and double (butterfly and tree reductions, a prefix scan, a broadcast), __ballot_sync,
// __all_sync and __any_sync with a partial mask, both halves of a warp in collectives of their own at once,
// atomicAdd on int, float and double from many blocks (with the old values it returns), dynamic shared
// memory above 48 KiB (cudaFuncSetAttribute), a cooperative launch whose grid syncs several times and the
// refusal of one too large, wmma products (half and bf16 16x16x16, tf32 16x16x8, both operand layouts),
// streams ordered by events, an event outliving its stream, the legacy default stream's ordering,
// cudaMallocAsync/cudaMemcpyAsync/cudaMemsetAsync, events and their elapsed time, device and memory-pool
// attributes, and the runtime's error codes. Emulated only (they fault, and faults are sticky for the process,
// or they look at the emulator's own schedule): a deadlock, a lane exiting while its warp waits in a shuffle,
// a grid sync in a launch that is not cooperative and __trap, each in a child process that must see the
// error from cudaDeviceSynchronize and a message naming the kernel, block and thread; a racy kernel whose
// results differ between two CONVEYOR_EMULATOR_SEED values and repeat for the same one; and, built with
// ThreadSanitizer, a race that it reports naming the CUDA thread. Without a CUDA device: exit code 77.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "device_array.h"
#include "device.cuh"

#ifdef CONVEYOR_EMULATE_CUDA
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

#if defined(__SANITIZE_THREAD__)
#define CONVEYOR_TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CONVEYOR_TEST_TSAN 1
#endif
#endif

// ---------------------------------------------------------------------------------------------------------
// Kernels. Identical source for nvcc and the emulator: only the host code below asks which build it is.

namespace emulator_test {

namespace cg = cooperative_groups;
namespace wmma = nvcuda::wmma;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kReduceThreads = 256;
constexpr int kTile = 16;
constexpr int kBuiltinFields = 13;
constexpr int kWarpsPerBlock = 4;
constexpr int kRacyThreads = 256;

// Each block sums its slice of x by halving in shared memory, one barrier per step; threads past the end
// (the last block is partial) add zeros but must still reach every barrier.
template <typename T>
__global__ void block_sum_kernel(int n, const T* x, T* block_sums) {
  CONVEYOR_SHARED(T, partial, [kReduceThreads]);
  const unsigned t = threadIdx.x;
  const int i = int(blockIdx.x * blockDim.x + t);
  partial[t] = i < n ? x[i] : T(0);
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (t < half) partial[t] += partial[t + half];
    __syncthreads();
  }
  if (t == 0) block_sums[blockIdx.x] = partial[0];
}

// out (cols x rows) = in (rows x cols) transposed through a shared tile: each thread writes an element that
// another thread of its 2-D block loaded, so the barrier between is what makes it right.
__global__ void transpose_kernel(int rows, int cols, const float* in, float* out) {
  CONVEYOR_SHARED(float, tile, [kTile][kTile + 1]);
  const int col = int(blockIdx.x * kTile + threadIdx.x), row = int(blockIdx.y * kTile + threadIdx.y);
  if (row < rows && col < cols) tile[threadIdx.y][threadIdx.x] = in[row * cols + col];
  __syncthreads();
  const int out_row = int(blockIdx.x * kTile + threadIdx.y), out_col = int(blockIdx.y * kTile + threadIdx.x);
  if (out_row < cols && out_col < rows) out[out_row * rows + out_col] = tile[threadIdx.x][threadIdx.y];
}

// Every thread of a 3-D grid of 3-D blocks records its built-in variables in its own slot, and the linear
// index of the thread mirrored through the block's centre, read from shared memory after a barrier.
__global__ void builtins_kernel(int* out) {
  CONVEYOR_SHARED(int, linear_of, [1024]);
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  linear_of[thread] = int(thread);
  __syncthreads();
  const unsigned mirrored = (blockDim.x - 1 - threadIdx.x) +
                            blockDim.x * ((blockDim.y - 1 - threadIdx.y) + blockDim.y * (blockDim.z - 1 - threadIdx.z));
  int* slot = out + (size_t(block) * threads + thread) * kBuiltinFields;
  const unsigned fields[kBuiltinFields] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y,
                                           blockIdx.z,  blockDim.x,  blockDim.y,  blockDim.z, gridDim.x,
                                           gridDim.y,   gridDim.z,   unsigned(linear_of[mirrored])};
  for (int f = 0; f < kBuiltinFields; ++f) slot[f] = int(fields[f]);
}

// Lanes exchange values through shared memory with only __syncwarp between writing and reading: reversed
// across the warp, then across its low half alone under a partial mask (the high half writes nothing).
__global__ void warp_reverse_kernel(const float* x, float* reversed, float* half_reversed) {
  CONVEYOR_SHARED(float, lanes, [kWarpsPerBlock][32]);
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  lanes[warp][lane] = x[i];
  __syncwarp();
  reversed[i] = lanes[warp][31 - lane];
  __syncwarp();  // every lane has read its partner before the low half writes again
  if (lane < 16) {
    lanes[warp][lane] = 2 * x[i];
    __syncwarp(0x0000ffffu);
    half_reversed[i] = lanes[warp][15 - lane];
  }
}

// The four shuffles within segments of kWidth lanes: a butterfly reduction (every lane gets its segment's
// sum), a tree reduction (out-of-segment reads return the lane's own value, which the host replays), an
// inclusive prefix scan and a broadcast whose source lane lies beyond the width (it wraps).
template <typename T, int kWidth>
__global__ void shuffle_kernel(const T* x, T* xor_sums, T* down_sums, T* scans, T* broadcasts) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  const int lane_in_segment = int(threadIdx.x % kWidth);
  const T v = x[i];
  T butterfly = v;
  for (int m = kWidth / 2; m > 0; m /= 2) butterfly += __shfl_xor_sync(kFullMask, butterfly, m, kWidth);
  xor_sums[i] = butterfly;
  T down = v;
  for (int d = kWidth / 2; d > 0; d /= 2) down += __shfl_down_sync(kFullMask, down, unsigned(d), kWidth);
  down_sums[i] = down;
  T scan = v;
  for (int d = 1; d < kWidth; d *= 2) {
    const T up = __shfl_up_sync(kFullMask, scan, unsigned(d), kWidth);
    if (lane_in_segment >= d) scan += up;
  }
  scans[i] = scan;
  broadcasts[i] = __shfl_sync(kFullMask, v, kWidth + 3, kWidth);
}

constexpr int kVoteFields = 5;
constexpr int kVoteHuge = 1 << 20;

// Only the lanes of `mask` vote, on three predicates: x > threshold (mixed), x > 0 (true for every input)
// and x > kVoteHuge (false for every input). Lanes outside the mask write nothing.
__global__ void vote_kernel(unsigned mask, int threshold, const int* x, unsigned* out) {
  const unsigned lane = threadIdx.x % 32;
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (mask >> lane & 1u) {
    const int v = x[i];
    unsigned* slot = out + size_t(i) * kVoteFields;
    slot[0] = __ballot_sync(mask, v > threshold);
    slot[1] = unsigned(__all_sync(mask, v > threshold));
    slot[2] = unsigned(__any_sync(mask, v > threshold));
    slot[3] = unsigned(__all_sync(mask, v > 0));
    slot[4] = unsigned(__any_sync(mask, v > kVoteHuge));
  }
}

// The two halves of each warp vote and reduce at the same time in divergent branches, each half naming only
// itself in its masks: legal under independent thread scheduling, so the halves' collectives must not be
// mistaken for one misused collective.
__global__ void split_warp_kernel(const int* x, int* out) {
  const unsigned lane = threadIdx.x % 32;
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  const int v = x[i];
  unsigned ballot;
  int sum = v;
  if (lane < 16) {
    ballot = __ballot_sync(0x0000ffffu, v > 500);
    for (int m = 8; m > 0; m /= 2) sum += __shfl_xor_sync(0x0000ffffu, sum, m);
  } else {
    ballot = __ballot_sync(0xffff0000u, v > 500);
    for (int m = 8; m > 0; m /= 2) sum += __shfl_xor_sync(0xffff0000u, sum, m);
  }
  out[2 * i] = int(ballot);
  out[2 * i + 1] = sum;
}

// Many blocks add into the same words; each element also takes a ticket (atomicAdd's old value), so the
// tickets must come out as a permutation.
__global__ void atomic_sums_kernel(int n, const int* xi, const float* xf, const double* xd, int* sum_i, float* sum_f,
                                   double* sum_d, int* histogram, int* next_ticket, int* ticket_owner) {
  for (int i = int(blockIdx.x * blockDim.x + threadIdx.x); i < n; i += int(gridDim.x * blockDim.x)) {
    atomicAdd(sum_i, xi[i]);
    atomicAdd(sum_f, xf[i]);
    atomicAdd(sum_d, xd[i]);
    atomicAdd(&histogram[xi[i] & 15], 1);
    ticket_owner[atomicAdd(next_ticket, 1)] = i;
  }
}

// Each block loads its whole slice into dynamic shared memory, then every thread sums the elements that the
// mirrored thread (blockDim - 1 - t) loaded.
__global__ void dynamic_shared_kernel(int per_thread, const float* x, float* out) {
  CONVEYOR_DYNAMIC_SHARED(float, buffer);
  const unsigned t = threadIdx.x, n = blockDim.x * unsigned(per_thread);
  const float* slice = x + size_t(blockIdx.x) * n;
  for (unsigned k = t; k < n; k += blockDim.x) buffer[k] = slice[k];
  __syncthreads();
  float sum = 0;
  for (unsigned k = blockDim.x - 1 - t; k < n; k += blockDim.x) sum += buffer[k];
  out[blockIdx.x * blockDim.x + t] = sum;
}

// A cooperative grid: each phase reads the element one block further on, written by that other block in the
// previous phase, so only the grid-wide barrier makes it right. At the end every block's thread 0 sums the
// whole result.
__global__ void grid_phases_kernel(int phases, const unsigned* x, unsigned* ping, unsigned* pong, unsigned* result,
                                   unsigned* block_totals) {
  const cg::grid_group grid = cg::this_grid();
  const unsigned n = gridDim.x * blockDim.x, g = blockIdx.x * blockDim.x + threadIdx.x;
  ping[g] = x[g];
  for (int phase = 1; phase <= phases; ++phase) {
    grid.sync();
    const unsigned* from = phase % 2 ? ping : pong;
    unsigned* to = phase % 2 ? pong : ping;
    to[g] = from[(g + blockDim.x) % n] * 3u + unsigned(phase);
  }
  grid.sync();
  const unsigned* last = phases % 2 ? pong : ping;
  result[g] = last[g];
  if (threadIdx.x == 0) {
    unsigned total = 0;
    for (unsigned k = 0; k < n; ++k) total += last[k];
    block_totals[blockIdx.x] = total;
  }
}

// d = a b + c on one warp's tensor-core fragments, c loaded row-major and d stored column-major. tf32
// operands are rounded with __float_to_tf32 first, as the host's reference rounds them.
template <typename Fragment, typename Element, int K, typename LayoutA, typename LayoutB>
__global__ void wmma_kernel(const Element* a, int lda, const Element* b, int ldb, const float* c, int ldc, float* d,
                            int ldd) {
  wmma::fragment<wmma::matrix_a, 16, 16, K, Fragment, LayoutA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, K, Fragment, LayoutB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, K, float> acc;
  wmma::load_matrix_sync(fa, a, unsigned(lda));
  wmma::load_matrix_sync(fb, b, unsigned(ldb));
  if constexpr (std::is_same_v<Fragment, wmma::precision::tf32>) {
    for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
    for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
  }
  wmma::load_matrix_sync(acc, c, unsigned(ldc), wmma::mem_row_major);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(d, acc, unsigned(ldd), wmma::mem_col_major);
}

// y = 2 x + 1 after a few rounds of busy work, so that a consumer not ordered after it would read too early.
__global__ void slow_affine_kernel(int n, const float* x, float* y) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  float v = x[i];
  for (int r = 0; r < 64; ++r) v = v * 1.0001f - 0.0001f * v;  // stays close to x; replayed on the host
  y[i] = 2 * v + 1;
}

__global__ void square_kernel(int n, const float* y, float* z) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) z[i] = y[i] * y[i];
}

__global__ void fill_kernel(int n, int base, int* out) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) out[i] = base + 7 * i;
}

// Kernels that fault. They compile for a GPU too, but only the emulated build runs them (in a child process).
__global__ void deadlock_kernel(float* out) {
  // Half a warp waits at the block barrier while the other half waits at __syncwarp for it: nothing can move.
  if (threadIdx.x < 16) __syncthreads();
  __syncwarp();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_after_exit_kernel(const float* x, float* out) {
  if (threadIdx.x == 5) return;  // lane 5 leaves; the rest of the warp still names it in the shuffle's mask
  out[threadIdx.x] = __shfl_sync(kFullMask, x[threadIdx.x], 0);
}

__global__ void grid_sync_without_cooperative_launch_kernel(float* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
  cg::this_grid().sync();
}

__global__ void trap_kernel(float* out) {
  if (blockIdx.x == 1 && threadIdx.x == 3) __trap();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

// Threads write shared memory and read their neighbour's element with no barrier between: the result
// depends on the order the threads run in.
__global__ void racy_shared_kernel(const int* x, int* out) {
  CONVEYOR_SHARED(int, values, [kRacyThreads]);
  const unsigned t = threadIdx.x;
  values[t] = x[t];
  out[t] = values[(t + 1) % blockDim.x];
}

}  // namespace emulator_test

// ---------------------------------------------------------------------------------------------------------
// Host side

namespace {

using namespace emulator_test;
using conveyor::CudaError;
using conveyor::cuda::launch;
using conveyor::cuda::launch_cooperative;

constexpr int kSkipped = 77;

using conveyor_test::cuda_ok;
using conveyor_test::DeviceArray;
#define OK(call) cuda_ok((call), #call)

template <typename T>
T poison() {
  if constexpr (std::is_floating_point_v<T>) {
    return std::numeric_limits<T>::quiet_NaN();
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(std::nanf(""));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(std::nanf(""));
  } else {
    return static_cast<T>(0xdeadbeefu);
  }
}

template <typename T>
std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, poison<T>());
}


std::mt19937 gen(20240613);

template <typename T>
std::vector<T> random_values(size_t n, double low, double high) {
  std::vector<T> v(n);
  if constexpr (std::is_integral_v<T>) {
    std::uniform_int_distribution<long long> u(static_cast<long long>(low), static_cast<long long>(high));
    for (T& e : v) e = static_cast<T>(u(gen));
  } else {
    std::uniform_real_distribution<double> u(low, high);
    for (T& e : v) e = static_cast<T>(u(gen));
  }
  return v;
}

template <typename T>
std::string show(T v) {
  if constexpr (std::is_floating_point_v<T>) {
    char text[40];
    std::snprintf(text, sizeof text, "%.9g", double(v));
    return text;
  } else {
    return std::to_string(v);
  }
}

// One check for a whole array: equal element by element (NaN never equals), naming the first difference.
template <typename T>
void check_equal(const std::string& what, const std::vector<T>& got, const std::vector<T>& expected) {
  size_t bad = got.size() == expected.size() ? got.size() : 0;
  for (size_t i = 0; i < got.size() && i < expected.size(); ++i) {
    if (!(got[i] == expected[i])) {
      bad = i;
      break;
    }
  }
  CHECK_MSG(bad == got.size() && got.size() == expected.size(),
            what + ": differs at " + std::to_string(bad) +
                (bad < got.size() ? ": " + show(got[bad]) + " vs " + show(expected[bad]) : " (sizes)"));
}

template <typename T>
void check_close(const std::string& what, const std::vector<T>& got, const std::vector<double>& expected, double atol,
                 double rtol) {
  size_t bad = got.size() == expected.size() ? got.size() : 0;
  for (size_t i = 0; i < got.size() && i < expected.size(); ++i) {
    if (!conveyor_test::near(double(got[i]), expected[i], atol, rtol)) {
      bad = i;
      break;
    }
  }
  CHECK_MSG(bad == got.size() && got.size() == expected.size(),
            what + ": differs at " + std::to_string(bad) +
                (bad < got.size() ? ": " + show(double(got[bad])) + " vs " + show(expected[bad]) : " (sizes)"));
}

// -- Block barriers ----------------------------------------------------------------------------------------

template <typename T>
void block_sums_over_several_blocks(const char* type, double low, double high, double atol) {
  const int n = 1000;  // four blocks of 256, the last one with 232 threads past the end
  const int blocks = int(conveyor::cuda::blocks_for(n, kReduceThreads));
  const std::vector<T> x = random_values<T>(n, low, high);
  DeviceArray<T> dx(x), dsums(poisoned<T>(blocks));
  launch("block_sum_kernel", block_sum_kernel<T>, blocks, kReduceThreads, 0, nullptr, n, dx.get(), dsums.get());
  std::vector<double> expected(blocks, 0.0);
  for (int i = 0; i < n; ++i) expected[i / kReduceThreads] += double(x[i]);
  check_close(std::string("block sums (") + type + ")", dsums.to_host(), expected, atol, 1e-6);
}

void transpose_in_2d_blocks() {
  const int rows = 40, cols = 24;  // neither a multiple of the 16 x 16 tile
  const std::vector<float> in = random_values<float>(size_t(rows) * cols, -1, 1);
  DeviceArray<float> din(in), dout(poisoned<float>(in.size()));
  const dim3 grid(unsigned(conveyor::cuda::blocks_for(cols, kTile)), unsigned(conveyor::cuda::blocks_for(rows, kTile)));
  launch("transpose_kernel", transpose_kernel, grid, dim3(kTile, kTile), 0, nullptr, rows, cols, din.get(), dout.get());
  std::vector<float> expected(in.size());
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) expected[size_t(c) * rows + r] = in[size_t(r) * cols + c];
  }
  check_equal("transpose (2-D blocks)", dout.to_host(), expected);
}

void builtins_in_3d_blocks() {
  const dim3 block(8, 3, 2), grid(2, 3, 2);
  const unsigned threads = block.x * block.y * block.z, total = threads * grid.x * grid.y * grid.z;
  DeviceArray<int> dout(poisoned<int>(size_t(total) * kBuiltinFields));
  launch("builtins_kernel", builtins_kernel, grid, block, 0, nullptr, dout.get());
  std::vector<int> expected;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        for (unsigned tz = 0; tz < block.z; ++tz) {
          for (unsigned ty = 0; ty < block.y; ++ty) {
            for (unsigned tx = 0; tx < block.x; ++tx) {
              const unsigned mirrored =
                  (block.x - 1 - tx) + block.x * ((block.y - 1 - ty) + block.y * (block.z - 1 - tz));
              const unsigned fields[kBuiltinFields] = {tx,      ty,      tz,      bx,      by,      bz,      block.x,
                                                       block.y, block.z, grid.x, grid.y, grid.z, mirrored};
              for (unsigned f : fields) expected.push_back(int(f));
            }
          }
        }
      }
    }
  }
  check_equal("built-in variables (3-D blocks and grid)", dout.to_host(), expected);
}

// -- Warps -------------------------------------------------------------------------------------------------

void syncwarp_exchanges() {
  const int blocks = 3, n = blocks * kWarpsPerBlock * 32;
  const std::vector<float> x = random_values<float>(n, -1, 1);
  DeviceArray<float> dx(x), dreversed(poisoned<float>(n)), dhalf(poisoned<float>(n));
  launch("warp_reverse_kernel", warp_reverse_kernel, blocks, kWarpsPerBlock * 32, 0, nullptr, dx.get(),
         dreversed.get(), dhalf.get());
  std::vector<float> reversed(n), half(n);
  for (int i = 0; i < n; ++i) {
    const int lane = i % 32, warp_start = i - lane;
    reversed[i] = x[warp_start + 31 - lane];
    half[i] = lane < 16 ? 2 * x[warp_start + 15 - lane] : poison<float>();
  }
  check_equal("__syncwarp exchange", dreversed.to_host(), reversed);
  const std::vector<float> got_half = dhalf.to_host();
  bool high_half_untouched = true;
  std::vector<float> got_low, expected_low;
  for (int i = 0; i < n; ++i) {
    if (i % 32 < 16) {
      got_low.push_back(got_half[i]);
      expected_low.push_back(half[i]);
    } else if (!std::isnan(got_half[i])) {
      high_half_untouched = false;
    }
  }
  check_equal("__syncwarp(0x0000ffff) exchange", got_low, expected_low);
  CHECK_MSG(high_half_untouched, "lanes outside the __syncwarp mask wrote");
}

// Replays shuffle_kernel on the host with the same arithmetic in the same order, so even float sums must be
// equal bit for bit.
template <typename T, int kWidth>
void shuffles(const char* type, double low, double high) {
  const int n = 64;  // two warps
  const std::vector<T> x = random_values<T>(n, low, high);
  DeviceArray<T> dx(x), dxor(poisoned<T>(n)), ddown(poisoned<T>(n)), dscan(poisoned<T>(n)), dcast(poisoned<T>(n));
  launch("shuffle_kernel", shuffle_kernel<T, kWidth>, 1, n, 0, nullptr, dx.get(), dxor.get(), ddown.get(), dscan.get(),
         dcast.get());
  std::vector<T> xor_sums(n), down_sums(n), scans(n), broadcasts(n);
  for (int base = 0; base < n; base += kWidth) {
    std::vector<T> butterfly(x.begin() + base, x.begin() + base + kWidth), down = butterfly, scan = butterfly;
    for (int m = kWidth / 2; m > 0; m /= 2) {
      std::vector<T> next = butterfly;
      for (int l = 0; l < kWidth; ++l) next[l] = butterfly[l] + butterfly[l ^ m];
      butterfly = next;
    }
    for (int d = kWidth / 2; d > 0; d /= 2) {
      std::vector<T> next = down;
      for (int l = 0; l < kWidth; ++l) next[l] = down[l] + (l + d < kWidth ? down[l + d] : down[l]);
      down = next;
    }
    for (int d = 1; d < kWidth; d *= 2) {
      std::vector<T> next = scan;
      for (int l = d; l < kWidth; ++l) next[l] = scan[l] + scan[l - d];
      scan = next;
    }
    for (int l = 0; l < kWidth; ++l) {
      xor_sums[base + l] = butterfly[l];
      down_sums[base + l] = down[l];
      scans[base + l] = scan[l];
      broadcasts[base + l] = x[base + 3];
    }
  }
  const std::string what = std::string(" (") + type + ", width " + std::to_string(kWidth) + ")";
  check_equal("__shfl_xor_sync butterfly sum" + what, dxor.to_host(), xor_sums);
  check_equal("__shfl_down_sync tree sum" + what, ddown.to_host(), down_sums);
  check_equal("__shfl_up_sync prefix scan" + what, dscan.to_host(), scans);
  check_equal("__shfl_sync broadcast" + what, dcast.to_host(), broadcasts);
}

template <typename T>
void shuffles_at_every_width(const char* type, double low, double high) {
  shuffles<T, 32>(type, low, high);
  shuffles<T, 16>(type, low, high);
  shuffles<T, 8>(type, low, high);
}

void votes_with_a_partial_mask() {
  const unsigned mask = 0x5a5af00fu;
  const int threshold = 500, n = 96;  // three warps
  const std::vector<int> x = random_values<int>(n, 1, 1000);
  DeviceArray<int> dx(x);
  DeviceArray<unsigned> dout(poisoned<unsigned>(size_t(n) * kVoteFields));
  launch("vote_kernel", vote_kernel, 1, n, 0, nullptr, mask, threshold, dx.get(), dout.get());
  std::vector<unsigned> expected = poisoned<unsigned>(size_t(n) * kVoteFields);
  for (int warp_start = 0; warp_start < n; warp_start += 32) {
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l) {
      if ((mask >> l & 1u) && x[warp_start + l] > threshold) ballot |= 1u << l;
    }
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      unsigned* slot = &expected[size_t(warp_start + l) * kVoteFields];
      slot[0] = ballot;
      slot[1] = ballot == mask;
      slot[2] = ballot != 0;
      slot[3] = 1;
      slot[4] = 0;
    }
  }
  check_equal("__ballot_sync/__all_sync/__any_sync with mask 0x5a5af00f", dout.to_host(), expected);
}

void split_warp_collectives() {
  const int n = 128;  // four warps
  const std::vector<int> x = random_values<int>(n, 1, 1000);
  DeviceArray<int> dx(x), dout(poisoned<int>(2 * n));
  launch("split_warp_kernel", split_warp_kernel, 1, n, 0, nullptr, dx.get(), dout.get());
  std::vector<int> expected(2 * n);
  for (int half_start = 0; half_start < n; half_start += 16) {
    unsigned ballot = 0;
    int sum = 0;
    for (int l = 0; l < 16; ++l) {
      const int lane = (half_start + l) % 32;
      if (x[half_start + l] > 500) ballot |= 1u << lane;
      sum += x[half_start + l];
    }
    for (int l = 0; l < 16; ++l) {
      expected[2 * (half_start + l)] = int(ballot);
      expected[2 * (half_start + l) + 1] = sum;
    }
  }
  check_equal("collectives of both warp halves at once, disjoint masks", dout.to_host(), expected);
}

// -- Atomics, dynamic shared memory, cooperative launches ---------------------------------------------------

void atomics_from_many_blocks() {
  const int n = 20000, blocks = 40, threads = 128;
  const std::vector<int> xi = random_values<int>(n, -1000, 1000);
  const std::vector<float> xf = random_values<float>(n, 0.5, 1.5);
  const std::vector<double> xd = random_values<double>(n, -1, 1);
  const std::vector<int> start_i = random_values<int>(1, 1, 1000);
  const std::vector<float> start_f = random_values<float>(1, 1, 2);
  const std::vector<double> start_d = random_values<double>(1, 1, 2);
  DeviceArray<int> dxi(xi), dsum_i(start_i), dhistogram(std::vector<int>(16, 0)), dnext(std::vector<int>(1, 0)),
      downer(poisoned<int>(n));
  DeviceArray<float> dxf(xf), dsum_f(start_f);
  DeviceArray<double> dxd(xd), dsum_d(start_d);
  launch("atomic_sums_kernel", atomic_sums_kernel, blocks, threads, 0, nullptr, n, dxi.get(), dxf.get(), dxd.get(),
         dsum_i.get(), dsum_f.get(), dsum_d.get(), dhistogram.get(), dnext.get(), downer.get());
  int sum_i = start_i[0];
  double sum_f = start_f[0], sum_d = start_d[0];
  std::vector<int> histogram(16, 0);
  for (int i = 0; i < n; ++i) {
    sum_i += xi[i];
    sum_f += xf[i];
    sum_d += xd[i];
    ++histogram[xi[i] & 15];
  }
  check_equal("atomicAdd int sum (exact)", dsum_i.to_host(), {sum_i});
  check_equal("atomicAdd int histogram (exact)", dhistogram.to_host(), histogram);
  check_close("atomicAdd float sum", dsum_f.to_host(), {sum_f}, 0.0, 1e-4);  // float rounding, any order
  check_close("atomicAdd double sum", dsum_d.to_host(), {sum_d}, 1e-9, 1e-12);
  check_equal("atomicAdd tickets handed out", dnext.to_host(), {n});
  std::vector<int> owners = downer.to_host(), seen(n, 0);
  bool permutation = true;
  for (int owner : owners) {
    if (owner < 0 || owner >= n || seen[owner]++) permutation = false;
  }
  CHECK_MSG(permutation, "atomicAdd's old values are not a permutation of the tickets");
}

void dynamic_shared_above_48k() {
  const int threads = 256, per_thread = 64, blocks = 3;
  const size_t bytes = sizeof(float) * threads * per_thread;  // 64 KiB
  const std::vector<float> x = random_values<float>(size_t(blocks) * threads * per_thread, -1, 1);
  DeviceArray<float> dx(x), dout(poisoned<float>(size_t(blocks) * threads));
  // Above 48 KiB the kernel must opt in first; without it the launch is refused.
  CHECK_THROWS(launch("dynamic_shared_kernel", dynamic_shared_kernel, blocks, threads, bytes, nullptr, per_thread,
                      dx.get(), dout.get()),
               CudaError, "dynamic_shared_kernel");
  cudaGetLastError();
  OK(cudaFuncSetAttribute(reinterpret_cast<const void*>(dynamic_shared_kernel),
                          cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  launch("dynamic_shared_kernel", dynamic_shared_kernel, blocks, threads, bytes, nullptr, per_thread, dx.get(),
         dout.get());
  std::vector<double> expected(size_t(blocks) * threads);
  for (int b = 0; b < blocks; ++b) {
    for (int t = 0; t < threads; ++t) {
      float sum = 0;
      for (int k = threads - 1 - t; k < threads * per_thread; k += threads) {
        sum += x[size_t(b) * threads * per_thread + k];
      }
      expected[size_t(b) * threads + t] = sum;
    }
  }
  check_close("dynamic shared memory (64 KiB)", dout.to_host(), expected, 1e-5, 1e-6);
}

void cooperative_grid_syncs() {
  const int blocks = 8, threads = 128, n = blocks * threads, phases = 5;
  const std::vector<unsigned> x = random_values<unsigned>(n, 1, 1u << 30);
  DeviceArray<unsigned> dx(x), dping(poisoned<unsigned>(n)), dpong(poisoned<unsigned>(n)),
      dresult(poisoned<unsigned>(n)), dtotals(poisoned<unsigned>(blocks));
  launch_cooperative("grid_phases_kernel", grid_phases_kernel, blocks, threads, 0, nullptr, phases, dx.get(),
                     dping.get(), dpong.get(), dresult.get(), dtotals.get());
  std::vector<unsigned> values = x;
  for (int phase = 1; phase <= phases; ++phase) {
    std::vector<unsigned> next(n);
    for (int g = 0; g < n; ++g) next[g] = values[(g + threads) % n] * 3u + unsigned(phase);
    values.swap(next);
  }
  unsigned total = 0;
  for (unsigned v : values) total += v;
  check_equal("cooperative launch, grid synced between phases", dresult.to_host(), values);
  check_equal("cooperative launch, every block's sum of the result", dtotals.to_host(),
              std::vector<unsigned>(blocks, total));

  // One block more than the device holds at once is refused, on a GPU as here.
  int per_multiprocessor = 0, multiprocessors = 0;
  OK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor,
                                                   reinterpret_cast<const void*>(grid_phases_kernel), 256, 0));
  OK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, 0));
  const unsigned too_many = unsigned(per_multiprocessor * multiprocessors + 1);
  CHECK(per_multiprocessor > 0);
  CHECK_THROWS(launch_cooperative("grid_phases_kernel", grid_phases_kernel, too_many, 256, 0, nullptr, phases,
                                  static_cast<const unsigned*>(nullptr), static_cast<unsigned*>(nullptr),
                                  static_cast<unsigned*>(nullptr), static_cast<unsigned*>(nullptr),
                                  static_cast<unsigned*>(nullptr)),
               CudaError, "cudaErrorCooperativeLaunchTooLarge");
  cudaGetLastError();  // the GPU path returns the error without taking it from the last-error slot
}

// -- wmma --------------------------------------------------------------------------------------------------

// The TF32 value cvt.rna.tf32.f32 gives (nearest, ties away from zero), as the kernel rounds its operands.
float round_to_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

template <typename Element>
Element from_float(float v) {
  if constexpr (std::is_same_v<Element, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

template <typename Element>
float operand_value(Element v) {
  if constexpr (std::is_same_v<Element, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return round_to_tf32(v);
  }
}

template <typename Fragment, typename Element, int K, typename LayoutA, typename LayoutB>
void wmma_product(const std::string& what) {
  constexpr int M = 16, N = 16, ld = 24, ldc = 20, ldd = 20;  // padded: the padding holds NaN and must not be read
  constexpr bool a_row = std::is_same_v<LayoutA, wmma::row_major>, b_row = std::is_same_v<LayoutB, wmma::row_major>;
  std::vector<Element> a(size_t(M) * ld, poison<Element>()), b(size_t(N) * ld, poison<Element>());
  std::vector<float> c = poisoned<float>(size_t(M) * ldc);
  std::vector<float> A(M * K), B(K * N), C(M * N);
  std::uniform_real_distribution<float> u(-1, 1);
  for (int m = 0; m < M; ++m) {
    for (int k = 0; k < K; ++k) {
      const Element e = from_float<Element>(u(gen));
      a[a_row ? size_t(m) * ld + k : size_t(k) * ld + m] = e;
      A[m * K + k] = operand_value(e);
    }
  }
  for (int k = 0; k < K; ++k) {
    for (int n = 0; n < N; ++n) {
      const Element e = from_float<Element>(u(gen));
      b[b_row ? size_t(k) * ld + n : size_t(n) * ld + k] = e;
      B[k * N + n] = operand_value(e);
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) C[m * N + n] = c[size_t(m) * ldc + n] = u(gen);
  }
  DeviceArray<Element> da(a), db(b);
  DeviceArray<float> dc(c), dd(poisoned<float>(size_t(N) * ldd));
  launch("wmma_kernel", wmma_kernel<Fragment, Element, K, LayoutA, LayoutB>, 1, 32, 0, nullptr, da.get(), ld, db.get(),
         ld, dc.get(), ldc, dd.get(), ldd);
  std::vector<double> expected(size_t(N) * ldd, std::nan(""));
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      double sum = C[m * N + n];
      for (int k = 0; k < K; ++k) sum += double(A[m * K + k]) * B[k * N + n];
      expected[size_t(n) * ldd + m] = sum;  // d is stored column-major
    }
  }
  const std::vector<float> d = dd.to_host();
  std::vector<float> got;
  std::vector<double> wanted;
  bool padding_untouched = true;
  for (size_t i = 0; i < d.size(); ++i) {
    if (int(i % ldd) < M) {
      got.push_back(d[i]);
      wanted.push_back(expected[i]);
    } else if (!std::isnan(d[i])) {
      padding_untouched = false;
    }
  }
  // Operands are exact in float; only the order and precision of the tensor cores' sums differ.
  check_close("wmma " + what, got, wanted, 1e-3, 1e-3);
  CHECK_MSG(padding_untouched, "wmma " + what + ": store_matrix_sync wrote past the 16 rows of its leading dimension");
}

void wmma_products() {
  using wmma::col_major;
  using wmma::row_major;
  wmma_product<__half, __half, 16, row_major, col_major>("half 16x16x16, A row-major, B col-major");
  wmma_product<__half, __half, 16, col_major, row_major>("half 16x16x16, A col-major, B row-major");
  wmma_product<__nv_bfloat16, __nv_bfloat16, 16, row_major, col_major>("bf16 16x16x16, A row-major, B col-major");
  wmma_product<__nv_bfloat16, __nv_bfloat16, 16, col_major, row_major>("bf16 16x16x16, A col-major, B row-major");
  wmma_product<wmma::precision::tf32, float, 8, row_major, col_major>("tf32 16x16x8, A row-major, B col-major");
  wmma_product<wmma::precision::tf32, float, 8, col_major, row_major>("tf32 16x16x8, A col-major, B row-major");
}

// -- Streams, events, memory ---------------------------------------------------------------------------------

void streams_ordered_by_an_event() {
  const int n = 16384, threads = 256, blocks = int(conveyor::cuda::blocks_for(n, threads));
  const std::vector<float> x = random_values<float>(n, -1, 1);
  std::vector<float> z = poisoned<float>(n);
  // Non-blocking streams: nothing but the event orders the consumer after the producer.
  cudaStream_t producer = nullptr, consumer = nullptr;
  OK(cudaStreamCreateWithFlags(&producer, cudaStreamNonBlocking));
  OK(cudaStreamCreateWithFlags(&consumer, cudaStreamNonBlocking));
  cudaEvent_t start = nullptr, produced = nullptr, stop = nullptr;
  OK(cudaEventCreate(&start));
  OK(cudaEventCreate(&produced));
  OK(cudaEventCreate(&stop));
  float *dx = nullptr, *dy = nullptr, *dz = nullptr;
  OK(cudaMallocAsync(reinterpret_cast<void**>(&dx), sizeof(float) * n, producer));
  OK(cudaMallocAsync(reinterpret_cast<void**>(&dy), sizeof(float) * n, producer));
  OK(cudaMallocAsync(reinterpret_cast<void**>(&dz), sizeof(float) * n, consumer));
  OK(cudaMemsetAsync(dz, 0xff, sizeof(float) * n, consumer));  // NaN until the consumer writes
  OK(cudaEventRecord(start, producer));
  OK(cudaMemcpyAsync(dx, x.data(), sizeof(float) * n, cudaMemcpyHostToDevice, producer));
  launch("slow_affine_kernel", slow_affine_kernel, blocks, threads, 0, producer, n, dx, dy);
  OK(cudaEventRecord(produced, producer));
  OK(cudaStreamWaitEvent(consumer, produced, 0));
  launch("square_kernel", square_kernel, blocks, threads, 0, consumer, n, dy, dz);
  OK(cudaMemcpyAsync(z.data(), dz, sizeof(float) * n, cudaMemcpyDeviceToHost, consumer));
  OK(cudaEventRecord(stop, consumer));
  OK(cudaEventSynchronize(stop));
  CHECK(cudaEventQuery(stop) == cudaSuccess);
  float ms = -1;
  OK(cudaEventElapsedTime(&ms, start, stop));
  CHECK_MSG(ms >= 0, "cudaEventElapsedTime gave " + std::to_string(ms) + " ms");
  OK(cudaStreamSynchronize(consumer));
  CHECK(cudaStreamQuery(consumer) == cudaSuccess);
  std::vector<double> expected(n);
  for (int i = 0; i < n; ++i) {
    float v = x[i];
    for (int r = 0; r < 64; ++r) v = v * 1.0001f - 0.0001f * v;
    const float y = 2 * v + 1;
    expected[i] = double(y) * y;
  }
  check_close("two streams ordered by cudaStreamWaitEvent", z, expected, 1e-5, 1e-5);

  // cudaMemsetAsync on its own: every byte set.
  OK(cudaMemsetAsync(dz, 0x3c, sizeof(float) * n, consumer));
  std::vector<unsigned char> bytes(sizeof(float) * n, 0);
  OK(cudaMemcpyAsync(bytes.data(), dz, bytes.size(), cudaMemcpyDeviceToHost, consumer));
  OK(cudaStreamSynchronize(consumer));
  check_equal("cudaMemsetAsync", bytes, std::vector<unsigned char>(bytes.size(), 0x3c));

  OK(cudaFreeAsync(dx, consumer));
  OK(cudaFreeAsync(dy, consumer));
  OK(cudaFreeAsync(dz, consumer));
  OK(cudaStreamSynchronize(consumer));
  for (cudaEvent_t e : {start, produced, stop}) OK(cudaEventDestroy(e));
  OK(cudaStreamDestroy(producer));
  OK(cudaStreamDestroy(consumer));
}

// An event stays valid after the stream it was recorded on is destroyed (the stream's resources go once its
// work is done): it can still be synchronised, timed, waited for by another stream and destroyed.
void event_outlives_its_stream() {
  const int n = 4096, threads = 256, blocks = int(conveyor::cuda::blocks_for(n, threads));
  DeviceArray<int> a(poisoned<int>(n)), b(poisoned<int>(n));
  cudaStream_t short_lived = nullptr, waiting = nullptr;
  OK(cudaStreamCreateWithFlags(&short_lived, cudaStreamNonBlocking));
  OK(cudaStreamCreateWithFlags(&waiting, cudaStreamNonBlocking));
  cudaEvent_t start = nullptr, stop = nullptr;
  OK(cudaEventCreate(&start));
  OK(cudaEventCreate(&stop));
  OK(cudaEventRecord(start, short_lived));
  launch("fill_kernel", fill_kernel, blocks, threads, 0, short_lived, n, 5, a.get());
  OK(cudaEventRecord(stop, short_lived));
  OK(cudaStreamDestroy(short_lived));
  OK(cudaStreamWaitEvent(waiting, stop, 0));
  OK(cudaMemcpyAsync(b.get(), a.get(), sizeof(int) * n, cudaMemcpyDeviceToDevice, waiting));
  OK(cudaEventSynchronize(stop));
  CHECK(cudaEventQuery(stop) == cudaSuccess);
  float ms = -1;
  OK(cudaEventElapsedTime(&ms, start, stop));
  CHECK_MSG(ms >= 0, "cudaEventElapsedTime after the stream's end gave " + std::to_string(ms) + " ms");
  OK(cudaStreamSynchronize(waiting));
  std::vector<int> expected(n);
  for (int i = 0; i < n; ++i) expected[i] = 5 + 7 * i;
  check_equal("work ordered after an event of a destroyed stream", b.to_host(), expected);
  OK(cudaEventDestroy(start));
  OK(cudaEventDestroy(stop));
  OK(cudaStreamDestroy(waiting));
}

// The legacy default stream (0) waits for blocking streams and they for it, with no event between them.
void legacy_default_stream_ordering() {
  const int n = 5000, threads = 128, blocks = int(conveyor::cuda::blocks_for(n, threads));
  cudaStream_t blocking = nullptr;
  OK(cudaStreamCreate(&blocking));
  DeviceArray<int> a(poisoned<int>(n)), b(poisoned<int>(n));
  std::vector<int> expected_a(n), expected_b(n), got_a = poisoned<int>(n);
  for (int i = 0; i < n; ++i) {
    expected_a[i] = 11 + 7 * i;
    expected_b[i] = -3 + 7 * i;
  }
  launch("fill_kernel", fill_kernel, blocks, threads, 0, nullptr, n, 11, a.get());
  OK(cudaMemcpyAsync(got_a.data(), a.get(), sizeof(int) * n, cudaMemcpyDeviceToHost, blocking));
  OK(cudaStreamSynchronize(blocking));
  check_equal("a blocking stream after the legacy default stream", got_a, expected_a);
  launch("fill_kernel", fill_kernel, blocks, threads, 0, blocking, n, -3, b.get());
  check_equal("the legacy default stream after a blocking stream", b.to_host(), expected_b);  // cudaMemcpy on 0
  OK(cudaStreamDestroy(blocking));
}

void device_and_pool_attributes() {
  int warp = 0, cooperative = 0, max_threads = 0;
  OK(cudaDeviceGetAttribute(&warp, cudaDevAttrWarpSize, 0));
  OK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, 0));
  OK(cudaDeviceGetAttribute(&max_threads, cudaDevAttrMaxThreadsPerBlock, 0));
  CHECK(warp == 32);
  CHECK(cooperative == 1);
  CHECK(max_threads == 1024);
  cudaMemPool_t pool = nullptr;
  OK(cudaDeviceGetDefaultMemPool(&pool, 0));
  uint64_t previous = 0, threshold = uint64_t(64) << 20, read_back = 0;
  OK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &previous));
  OK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  OK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &read_back));
  CHECK(read_back == threshold);
  OK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &previous));
}

// -- Runtime errors ------------------------------------------------------------------------------------------

// `status` is `expected`, and so is the last error, which reading clears.
void check_error(const char* what, cudaError_t status, cudaError_t expected) {
  CHECK_MSG(status == expected,
            std::string(what) + ": " + cudaGetErrorName(status) + ", expected " + cudaGetErrorName(expected));
  const cudaError_t last = cudaGetLastError();
  CHECK_MSG(last == expected, std::string(what) + ": last error " + cudaGetErrorName(last));
  CHECK_MSG(cudaGetLastError() == cudaSuccess, std::string(what) + ": the last error was not cleared");
}

void runtime_errors() {
  std::vector<float> host(64, 1.0f), other(64, 2.0f);
  check_error("cudaFree of host memory", cudaFree(host.data()), cudaErrorInvalidValue);
  check_error("cudaMemcpy HostToDevice into host memory",
              cudaMemcpy(other.data(), host.data(), sizeof(float) * 64, cudaMemcpyHostToDevice), cudaErrorInvalidValue);
  check_error("cudaSetDevice(99)", cudaSetDevice(99), cudaErrorInvalidDevice);
  DeviceArray<int> sums(poisoned<int>(1));
  // An H200 with CUDA 13 answers a block of 2048 threads with cudaErrorInvalidValue (bench/results/h200-2026-11-28).
  CHECK_THROWS(launch("block_sum_kernel", block_sum_kernel<int>, 1, 2048, 0, nullptr, 1, sums.get(), sums.get()),
               CudaError, "cudaErrorInvalidValue");
  CHECK(cudaGetLastError() == cudaSuccess);
#ifdef CONVEYOR_EMULATE_CUDA
  // A destroyed stream's handle dangles on a GPU (undefined there); the emulator recognises it.
  cudaStream_t stream = nullptr;
  OK(cudaStreamCreate(&stream));
  OK(cudaStreamDestroy(stream));
  check_error("cudaStreamSynchronize of a destroyed stream", cudaStreamSynchronize(stream),
              cudaErrorInvalidResourceHandle);
  CHECK_THROWS(launch("fill_kernel", fill_kernel, 1, 32, 0, stream, 1, 0, sums.get()), CudaError,
               "cudaErrorInvalidResourceHandle");
#endif
  // None of these is sticky: the device still works.
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
  launch("fill_kernel", fill_kernel, 1, 32, 0, nullptr, 1, 42, sums.get());
  check_equal("a launch after the errors", sums.to_host(), {42});
}

// -- Emulated only: faults, the schedule, ThreadSanitizer ----------------------------------------------------

#ifdef CONVEYOR_EMULATE_CUDA

struct ChildOutcome {
  int status = -1;       // waitpid's
  std::string output;    // what the child's body returned
  std::string errors;    // its standard error
};

void write_all(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n <= 0) return;
    done += size_t(n);
  }
}

// Runs `body` in a child process (with CONVEYOR_EMULATOR_SEED set to `seed` when given) and collects what it
// returns and what it writes on standard error. A fault is sticky for the whole process, so each one needs
// a process of its own; the emulator's seed is read once per process. Every child forks from a parent that
// has not yet used the emulator (no stream threads, no seed read), as a CUDA context cannot cross fork().
ChildOutcome run_in_child(const char* seed, const std::function<std::string()>& body) {
  std::fflush(stdout);
  std::fflush(stderr);
  int out_pipe[2], err_pipe[2];
  if (pipe(out_pipe) != 0 || pipe(err_pipe) != 0) {
    std::perror("pipe");
    std::exit(2);
  }
  const pid_t pid = fork();
  if (pid < 0) {
    std::perror("fork");
    std::exit(2);
  }
  if (pid == 0) {
    close(out_pipe[0]);
    close(err_pipe[0]);
    dup2(err_pipe[1], STDERR_FILENO);
    close(err_pipe[1]);
    alarm(300);  // a hang becomes a signal the parent reports instead of a stuck test
    if (seed != nullptr) setenv("CONVEYOR_EMULATOR_SEED", seed, 1);
    std::string text;
    try {
      text = body();
    } catch (const std::exception& e) {
      text = std::string("exception: ") + e.what();
    }
    write_all(out_pipe[1], text);
    close(out_pipe[1]);
    std::fflush(stderr);
    _exit(0);
  }
  close(out_pipe[1]);
  close(err_pipe[1]);
  ChildOutcome outcome;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&outcome.output, &outcome.errors};
  int open_pipes = 2;
  while (open_pipes > 0) {
    if (poll(fds, 2, -1) < 0) continue;
    for (int p = 0; p < 2; ++p) {
      if (fds[p].fd < 0 || !(fds[p].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buffer[4096];
      const ssize_t n = read(fds[p].fd, buffer, sizeof buffer);
      if (n > 0) {
        sinks[p]->append(buffer, size_t(n));
      } else {
        close(fds[p].fd);
        fds[p].fd = -1;
        --open_pipes;
      }
    }
  }
  waitpid(pid, &outcome.status, 0);
  return outcome;
}

bool exited_cleanly(const ChildOutcome& child) {
#ifdef CONVEYOR_TEST_TSAN
  // ThreadSanitizer turns the exit code into 66 when it reported a race, which the racy children do.
  return WIFEXITED(child.status) && (WEXITSTATUS(child.status) == 0 || WEXITSTATUS(child.status) == 66);
#else
  return WIFEXITED(child.status) && WEXITSTATUS(child.status) == 0;
#endif
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Launches a faulting kernel in a child: its cudaDeviceSynchronize must return `expected`, so must a later
// call (the error is sticky), and standard error must contain every one of `messages`.
void fault_in_child(const char* what, cudaError_t expected, const std::function<void(float*)>& launch_faulting,
                    const std::vector<std::string>& messages) {
  const ChildOutcome child = run_in_child(nullptr, [&] {
    float* out = nullptr;
    OK(cudaMalloc(reinterpret_cast<void**>(&out), sizeof(float) * 1024));
    try {
      launch_faulting(out);
    } catch (const CudaError&) {
      // The kernel runs on its stream's host thread and may have faulted already: the launch's own check
      // (cudaGetLastError) then reports the sticky error, as it may on a GPU.
    }
    const cudaError_t synced = cudaDeviceSynchronize();
    void* later = nullptr;
    const cudaError_t after = cudaMalloc(&later, 16);
    return std::string(cudaGetErrorName(synced)) + " " + cudaGetErrorName(after);
  });
  const std::string wanted = std::string(cudaGetErrorName(expected)) + " " + cudaGetErrorName(expected);
  CHECK_MSG(exited_cleanly(child), std::string(what) + ": the child ended with status " + std::to_string(child.status) +
                                       ", standard error: " + child.errors);
  CHECK_MSG(child.output == wanted, std::string(what) + ": the child saw \"" + child.output + "\", expected \"" +
                                        wanted + "\" (synchronize, then a later call)");
  for (const std::string& m : messages) {
    CHECK_MSG(contains(child.errors, m), std::string(what) + ": standard error lacks \"" + m + "\": " + child.errors);
  }
}

void faults_in_child_processes() {
  fault_in_child("deadlock", cudaErrorLaunchTimeout,
                 [](float* out) { launch("deadlock_kernel", deadlock_kernel, 1, 32, 0, nullptr, out); },
                 {"kernel deadlock_kernel", "deadlock", "block (0, 0, 0), thread (", "waits at __syncthreads"});
  // Whether lane 5 leaves before or after the others reach the shuffle depends on the schedule; either way
  // the launch fails naming the shuffle.
  fault_in_child("a lane exits while its warp waits in __shfl_sync", cudaErrorLaunchFailure,
                 [](float* out) {
                   launch("shuffle_after_exit_kernel", shuffle_after_exit_kernel, 1, 32, 0, nullptr, out, out);
                 },
                 {"kernel shuffle_after_exit_kernel, block (0, 0, 0), thread (", "__shfl_sync"});
  fault_in_child("grid sync in a launch that is not cooperative", cudaErrorLaunchFailure,
                 [](float* out) {
                   launch("grid_sync_without_cooperative_launch_kernel", grid_sync_without_cooperative_launch_kernel,
                          2, 32, 0, nullptr, out);
                 },
                 {"kernel grid_sync_without_cooperative_launch_kernel, block (", ", thread (", "not cooperative"});
  fault_in_child("__trap", cudaErrorLaunchFailure,
                 [](float* out) { launch("trap_kernel", trap_kernel, 4, 32, 0, nullptr, out); },
                 {"kernel trap_kernel, block (1, 0, 0), thread (3, 0, 0): __trap()"});
}

// The racy kernel's output in a child run with `seed`, as text.
ChildOutcome racy_run(const char* seed, const std::vector<int>& x) {
  return run_in_child(seed, [&] {
    DeviceArray<int> dx(x), dout(poisoned<int>(kRacyThreads));
    launch("racy_shared_kernel", racy_shared_kernel, 1, kRacyThreads, 0, nullptr, dx.get(), dout.get());
    std::string text;
    for (int v : dout.to_host()) text += std::to_string(v) + " ";
    return text;
  });
}

// A race between barriers gives results that depend on the schedule: different for two seeds, the same again
// for the same seed. Each thread reads either its neighbour's value (the neighbour ran first) or the 0xff
// bytes that fresh shared memory holds (-1).
void seeds_change_the_schedule() {
  const std::vector<int> x = random_values<int>(kRacyThreads, 1, 1000000);
  const ChildOutcome first = racy_run("1", x), again = racy_run("1", x), other = racy_run("2", x);
  for (const ChildOutcome* run : {&first, &again, &other}) {
    CHECK_MSG(exited_cleanly(*run) && !run->output.empty(),
              "racy kernel child: status " + std::to_string(run->status) + ", output " + run->output);
  }
  CHECK_MSG(first.output == again.output, "the same seed gave different schedules");
  CHECK_MSG(first.output != other.output, "seeds 1 and 2 gave the same results from a racy kernel");
  std::vector<int> values;
  for (size_t p = 0; p < first.output.size();) {
    size_t end = first.output.find(' ', p);
    if (end == std::string::npos) break;
    values.push_back(std::atoi(first.output.substr(p, end - p).c_str()));
    p = end + 1;
  }
  int neighbours = 0, unwritten = 0, other_values = 0;
  for (int t = 0; t < int(values.size()); ++t) {
    if (values[t] == x[(t + 1) % kRacyThreads]) {
      ++neighbours;
    } else if (values[t] == -1) {
      ++unwritten;
    } else {
      ++other_values;
    }
  }
  CHECK_MSG(values.size() == size_t(kRacyThreads) && neighbours > 0 && unwritten > 0 && other_values == 0,
            "racy kernel: " + std::to_string(neighbours) + " neighbour values, " + std::to_string(unwritten) +
                " unwritten, " + std::to_string(other_values) + " others");
}

#ifdef CONVEYOR_TEST_TSAN
// Under ThreadSanitizer every CUDA thread is a fiber of its own: the racy kernel must be reported, naming it.
void thread_sanitizer_reports_a_race() {
  const std::vector<int> x = random_values<int>(kRacyThreads, 1, 1000000);
  const ChildOutcome child = racy_run(nullptr, x);
  CHECK_MSG(contains(child.errors, "ThreadSanitizer: data race"),
            "no ThreadSanitizer report for the racy kernel: " + child.errors);
  CHECK_MSG(contains(child.errors, "CUDA racy_shared_kernel block (0,0,0) thread ("),
            "the ThreadSanitizer report does not name the CUDA thread: " + child.errors);
}
#endif

#endif  // CONVEYOR_EMULATE_CUDA

}  // namespace

int main() {
  if (!conveyor_test::cuda_device_present()) return kSkipped;
#ifdef CONVEYOR_EMULATE_CUDA
  // First, while this process has not used the emulator: the children fork from it (run_in_child).
  faults_in_child_processes();
  seeds_change_the_schedule();
#ifdef CONVEYOR_TEST_TSAN
  thread_sanitizer_reports_a_race();
#endif
#endif
  try {
    block_sums_over_several_blocks<float>("float", -1, 1, 1e-4);
    block_sums_over_several_blocks<int>("int", -1000, 1000, 0);
    block_sums_over_several_blocks<double>("double", -1, 1, 1e-12);
    transpose_in_2d_blocks();
    builtins_in_3d_blocks();
    syncwarp_exchanges();
    shuffles_at_every_width<float>("float", -1, 1);
    shuffles_at_every_width<int>("int", -1000, 1000);
    shuffles_at_every_width<double>("double", -1, 1);
    votes_with_a_partial_mask();
    split_warp_collectives();
    atomics_from_many_blocks();
    dynamic_shared_above_48k();
    cooperative_grid_syncs();
    wmma_products();
    streams_ordered_by_an_event();
    event_outlives_its_stream();
    legacy_default_stream_ordering();
    device_and_pool_attributes();
    runtime_errors();
    CHECK(cudaDeviceSynchronize() == cudaSuccess);
  } catch (const std::exception& e) {
    CHECK_MSG(false, std::string("unexpected exception: ") + e.what());
  }
  return conveyor_test::report();
}
