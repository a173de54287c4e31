// The CUDA emulator: kernels run on the CPU with one fiber per CUDA thread, and the runtime API works on host
// memory. See cuda_emulator.h for what kernels see and docs/emulated-cuda.md for how to use it.
//
// Threads. A launch runs its blocks one after another (a cooperative launch: all at once) on the host thread
// of its stream. Each CUDA thread is a fiber that runs until it reaches a barrier, a warp collective or its
// end; the scheduler then picks the next fiber to run at random from those that can, with a generator seeded
// from CONVEYOR_EMULATOR_SEED, the launch and the block, so a run is reproducible and a missing barrier or a
// race between barriers changes the results. __syncthreads waits for every thread of the block that has not
// exited, as on Volta and later; warp collectives wait for every lane of their mask, and a lane that exits
// or calls another collective meanwhile is a fault; when nothing can run, the launch has deadlocked.
//
// Faults (__trap, a misused collective, a deadlock) end the launch with an error that every later call
// returns, as a GPU's sticky errors do, after printing the kernel, block and thread on standard error.
//
// Streams run their work in order on a host thread each; the legacy default stream (0) waits for the work
// of every blocking stream and they for it. Events mark a point in a stream's work.
//
// Built with -fsanitize=thread or -fsanitize=address (CONVEYOR_EMULATE_CUDA_CHECK), the fibers are announced
// to the sanitizer: ThreadSanitizer sees every CUDA thread as a thread of its own, synchronised only by the
// barriers and collectives, so it reports races in shared and global memory between barriers;
// AddressSanitizer reports out-of-bounds accesses of global memory (cudaMalloc) and of each shared variable
// (allocated on its own). Both reports name the CUDA thread.
#include "cuda_emulator.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define CONVEYOR_EMULATOR_TSAN 1
// ThreadSanitizer's dynamic annotations: its runtime defines them, no header declares them.
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CONVEYOR_EMULATOR_ASAN 1
#endif

namespace conveyor::emulator {
namespace {

// ---------------------------------------------------------------------------------------------------------
// The emulated device: one GPU shaped like an H100 (what occupancy and the launch limits are computed from).

constexpr int kDeviceCount = 1;
constexpr int kMultiprocessors = 132;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kMaxThreadsPerMultiprocessor = 2048;
constexpr int kMaxBlocksPerMultiprocessor = 32;
constexpr size_t kSharedPerBlock = 48 * 1024;
constexpr size_t kSharedPerBlockOptIn = 227 * 1024;
constexpr size_t kSharedPerMultiprocessor = 228 * 1024;
constexpr size_t kGlobalMemory = size_t(80) << 30;

#if defined(CONVEYOR_EMULATOR_TSAN) || defined(CONVEYOR_EMULATOR_ASAN)
constexpr size_t kStackBytes = 1 << 20;  // sanitizer frames are larger
#else
constexpr size_t kStackBytes = 128 << 10;
#endif

// ---------------------------------------------------------------------------------------------------------
// Execution contexts. On x86-64 a switch saves the callee-saved registers and the stack pointer (a few
// nanoseconds); elsewhere ucontext does it, with a system call per switch for the signal mask.

#if defined(__x86_64__)
extern "C" void conveyor_emulator_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .globl conveyor_emulator_switch
  .type conveyor_emulator_switch, @function
conveyor_emulator_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size conveyor_emulator_switch, .-conveyor_emulator_switch
)");

struct Context {
  void* sp = nullptr;
};

// Prepares `c` to enter `entry` (which never returns) on the given stack when first switched to.
void context_start(Context& c, void* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uintptr_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15));
  *--top = 0;                                  // entry's return address: none; leaves rsp = 8 mod 16 at entry
  *--top = reinterpret_cast<uintptr_t>(entry);  // where the first switch's ret goes
  for (int r = 0; r < 6; ++r) *--top = 0;       // rbp, rbx, r12..r15
  c.sp = top;
}
void context_switch(Context& from, Context& to) { conveyor_emulator_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

__attribute__((noinline)) void context_start(Context& c, void* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// `bytes` of memory aligned to `alignment`, not rounded up, so that AddressSanitizer sees its true end.
void* aligned_exactly(size_t alignment, size_t bytes) {
  void* p = nullptr;
  return posix_memalign(&p, alignment, bytes > 0 ? bytes : 1) == 0 ? p : nullptr;
}

struct KernelFault {
  cudaError_t error;
  std::string what;
};

uint64_t base_seed() {
  static const uint64_t seed = [] {
    const char* s = std::getenv("CONVEYOR_EMULATOR_SEED");
    return s != nullptr ? std::strtoull(s, nullptr, 0) : uint64_t(0);
  }();
  return seed;
}

// ---------------------------------------------------------------------------------------------------------
// Fibers and their scheduler

struct Block;
struct Group;

enum class FiberState { ready, at_block_barrier, at_warp_collective, at_grid_barrier, done };

struct Fiber {
  Context context;
  void* stack = nullptr;
  ThreadContext thread{};
  Block* block = nullptr;
  FiberState state = FiberState::ready;
  size_t shared_calls = 0;
  const void* collective_in = nullptr;
  void* collective_out = nullptr;
#ifdef CONVEYOR_EMULATOR_TSAN
  void* tsan_fiber = nullptr;
  char name[96];
#endif
};

struct SharedVariable {
  void* data;
  size_t bytes;
  const char* name;
};

// A warp collective under way: the lanes of `mask` that have arrived at `op`.
struct Collective {
  unsigned arrived = 0;
  unsigned mask = 0;
  const char* op = nullptr;
  unsigned generation = 0;
  char sync[2];  // ThreadSanitizer's synchronisation objects, alternating by generation
};

// Groups of lanes with disjoint masks may each be in a collective of their own at the same time (divergent
// branches under independent thread scheduling): one slot per group, at the lowest lane of its mask, which
// disjoint masks never share.
struct Warp {
  Collective by_lowest_lane[32];
  // The collective under way that waits for `lane`, if any.
  const Collective* waiting_for(unsigned lane) const {
    for (const Collective& c : by_lowest_lane) {
      if (c.arrived != 0 && (c.mask >> lane & 1u)) return &c;
    }
    return nullptr;
  }
};

struct Block {
  uint3 index{};
  std::vector<Fiber*> threads;
  int live = 0;
  int at_barrier = 0;
  unsigned barrier_generation = 0;
  char barrier_sync[2];
  std::vector<SharedVariable> shared;
  void* dynamic_shared = nullptr;
  std::vector<Warp> warps;
  unsigned live_lanes(unsigned warp) const {
    unsigned mask = 0;
    for (unsigned l = 0; l < 32; ++l) {
      const size_t t = size_t(warp) * 32 + l;
      if (t < threads.size() && threads[t]->state != FiberState::done) mask |= 1u << l;
    }
    return mask;
  }
};

struct Group {
  const char* kernel = nullptr;
  const std::function<void()>* body = nullptr;
  bool cooperative = false;
  std::vector<std::unique_ptr<Block>> blocks;
  std::vector<Fiber*> ready;
  std::mt19937_64 rng;
  int live = 0;
  int at_grid = 0;
  unsigned grid_generation = 0;
  char grid_sync[2];
  char start_sync = 0, end_sync = 0;
  Context scheduler;
  Fiber* running = nullptr;
  bool faulted = false;
  KernelFault fault{cudaSuccess, ""};
#ifdef CONVEYOR_EMULATOR_TSAN
  void* scheduler_tsan = nullptr;
#endif
#ifdef CONVEYOR_EMULATOR_ASAN
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

thread_local Group* tls_group = nullptr;

std::string describe(const ThreadContext& t) {
  char text[160];
  std::snprintf(text, sizeof text, "kernel %s, block (%u, %u, %u), thread (%u, %u, %u)", t.kernel, t.block_idx.x,
                t.block_idx.y, t.block_idx.z, t.thread_idx.x, t.thread_idx.y, t.thread_idx.z);
  return text;
}

Fiber* current_fiber() {
  Group* g = tls_group;
  if (g == nullptr || g->running == nullptr) {
    std::fprintf(stderr, "Conveyor CUDA emulator: a device function was called outside a kernel\n");
    std::abort();
  }
  return g->running;
}

[[noreturn]] void fault(cudaError_t error, const std::string& what) {
  throw KernelFault{error, describe(current_fiber()->thread) + ": " + what};
}

// ThreadSanitizer sees each fiber as a thread of its own, and the scheduler switches between them without
// synchronising (a synchronising switch would order every CUDA thread after the one before it and hide every
// race). The emulator's own state, which the fibers of a launch share (the running fiber, the ready list,
// barrier counts, warp collectives, shared-variable allocation), is therefore kept out of race detection
// while a fiber works on it (a Bookkeeping object in scope): only the kernels' own accesses count. A fiber
// leaves the region while it is switched out (switch_to_scheduler), so that none is destroyed inside one
// (after a fault), which ThreadSanitizer reports as an error.
void ignore_bookkeeping_begin() {
#ifdef CONVEYOR_EMULATOR_TSAN
  AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
  AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
#endif
}
void ignore_bookkeeping_end() {
#ifdef CONVEYOR_EMULATOR_TSAN
  AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
  AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
#endif
}
struct Bookkeeping {
  Bookkeeping() { ignore_bookkeeping_begin(); }
  ~Bookkeeping() { ignore_bookkeeping_end(); }
  Bookkeeping(const Bookkeeping&) = delete;
  Bookkeeping& operator=(const Bookkeeping&) = delete;
};

// Switches from the running fiber back to the scheduler; returns when the scheduler resumes this fiber.
// Called inside one Bookkeeping region (the caller's), which it leaves while switched out.
void switch_to_scheduler(Fiber* f) {
  Group* g = tls_group;
#ifdef CONVEYOR_EMULATOR_TSAN
  ignore_bookkeeping_end();
  __tsan_switch_to_fiber(g->scheduler_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef CONVEYOR_EMULATOR_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, g->scheduler_stack_bottom, g->scheduler_stack_size);
#endif
  context_switch(f->context, g->scheduler);
#ifdef CONVEYOR_EMULATOR_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
#ifdef CONVEYOR_EMULATOR_TSAN
  ignore_bookkeeping_begin();
#endif
}

void release(Fiber* f) {
  f->state = FiberState::ready;
  tls_group->ready.push_back(f);
}

void tsan_release(const void* sync) {
#ifdef CONVEYOR_EMULATOR_TSAN
  __tsan_release(const_cast<void*>(sync));
#else
  (void)sync;
#endif
}

void tsan_acquire(const void* sync) {
#ifdef CONVEYOR_EMULATOR_TSAN
  __tsan_acquire(const_cast<void*>(sync));
#else
  (void)sync;
#endif
}

void complete_block_barrier(Block* b) {
  b->at_barrier = 0;
  ++b->barrier_generation;
  for (Fiber* t : b->threads) {
    if (t->state == FiberState::at_block_barrier) release(t);
  }
}

void complete_grid_barrier(Group* g) {
  g->at_grid = 0;
  ++g->grid_generation;
  for (auto& b : g->blocks) {
    for (Fiber* t : b->threads) {
      if (t->state == FiberState::at_grid_barrier) release(t);
    }
  }
}

void fiber_exited(Fiber* f) {
  Group* g = tls_group;
  Block* b = f->block;
  f->state = FiberState::done;
  --b->live;
  --g->live;
  if (const Collective* c = b->warps[f->thread.warp].waiting_for(f->thread.lane)) {
    fault(cudaErrorLaunchFailure, std::string("exited while lanes of its warp wait for it at ") + c->op);
  }
  if (b->live > 0 && b->at_barrier == b->live) complete_block_barrier(b);
  if (g->live > 0 && g->at_grid == g->live) complete_grid_barrier(g);
}

void fiber_main() {
  Group* g = nullptr;
  Fiber* f = nullptr;
  {
    const Bookkeeping bookkeeping;
    g = tls_group;
    f = g->running;
  }
#ifdef CONVEYOR_EMULATOR_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g->scheduler_stack_bottom, &g->scheduler_stack_size);
#endif
  tsan_acquire(&g->start_sync);
  try {
    (*g->body)();
    const Bookkeeping bookkeeping;
    fiber_exited(f);
  } catch (const KernelFault& e) {
    const Bookkeeping bookkeeping;
    if (!g->faulted) {
      g->faulted = true;
      g->fault = e;
    }
    f->state = FiberState::done;
  } catch (const std::exception& e) {
    const Bookkeeping bookkeeping;
    if (!g->faulted) {
      g->faulted = true;
      g->fault = {cudaErrorLaunchFailure, describe(f->thread) + ": " + e.what()};
    }
    f->state = FiberState::done;
  }
  g = tls_group;  // the same group; reread after the body, which may have switched many times
#ifdef CONVEYOR_EMULATOR_TSAN
  void* const scheduler_fiber = g->scheduler_tsan;
#endif
  // After every read of the group: the scheduler acquires this once all fibers have ended, before it reuses
  // the group's memory.
  tsan_release(&g->end_sync);
#ifdef CONVEYOR_EMULATOR_TSAN
  __tsan_switch_to_fiber(scheduler_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef CONVEYOR_EMULATOR_ASAN
  __sanitizer_start_switch_fiber(nullptr, g->scheduler_stack_bottom, g->scheduler_stack_size);
#endif
  // A plain switch, never resumed: a noreturn jump would have AddressSanitizer unpoison this stack midway
  // through the announced switch.
  context_switch(f->context, g->scheduler);
}

#ifdef CONVEYOR_EMULATOR_ASAN
// AddressSanitizer's report names the host thread and the kernel's stack; this adds the CUDA thread.
void name_the_cuda_thread(const char*) {
  const Group* g = tls_group;
  if (g != nullptr && g->running != nullptr) {
    std::fprintf(stderr, "Conveyor CUDA emulator: the access above was made by %s\n",
                 describe(g->running->thread).c_str());
  }
}
const bool g_asan_names_cuda_threads = (__asan_set_error_report_callback(name_the_cuda_thread), true);
#endif

// Fiber stacks, reused from launch to launch by the host thread that ran them.
class StackPool {
 public:
  ~StackPool() {
    for (void* s : free_) munmap(s, kStackBytes);
  }
  void* take() {
    if (!free_.empty()) {
      void* s = free_.back();
      free_.pop_back();
      return s;
    }
    void* s = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED) throw KernelFault{cudaErrorMemoryAllocation, "no memory for the emulator's fiber stacks"};
    return s;
  }
  void give(void* s) { free_.push_back(s); }

 private:
  std::vector<void*> free_;
};

thread_local StackPool tls_stacks;

std::string describe_deadlock(const Group& g) {
  std::string text = "deadlock: no thread can run;";
  int shown = 0;
  for (const auto& b : g.blocks) {
    for (const Fiber* t : b->threads) {
      if (t->state == FiberState::done || shown >= 4) continue;
      ++shown;
      text += " " + describe(t->thread) + " waits at ";
      switch (t->state) {
        case FiberState::at_block_barrier: text += "__syncthreads;"; break;
        case FiberState::at_grid_barrier: text += "grid sync;"; break;
        case FiberState::at_warp_collective:
          text += std::string(b->warps[t->thread.warp].waiting_for(t->thread.lane)->op) + ";";
          break;
        default: text += "?;"; break;
      }
    }
  }
  return text;
}

// Runs the blocks of `g` until every thread has exited or one faulted.
void run_group(Group& g, dim3 block_dim, dim3 grid_dim, size_t dynamic_shared_bytes) {
  Group* outer = tls_group;
  tls_group = &g;
  const unsigned threads_per_block = block_dim.x * block_dim.y * block_dim.z;
  std::vector<Fiber> fibers(g.blocks.size() * threads_per_block);
  std::vector<void*> dynamic(g.blocks.size(), nullptr);
#ifdef CONVEYOR_EMULATOR_TSAN
  g.scheduler_tsan = __tsan_get_current_fiber();
#endif
  tsan_release(&g.start_sync);
  size_t next = 0;
  for (size_t bi = 0; bi < g.blocks.size(); ++bi) {
    Block& b = *g.blocks[bi];
    if (dynamic_shared_bytes > 0) {
      dynamic[bi] = aligned_exactly(128, dynamic_shared_bytes);
      std::memset(dynamic[bi], 0xff, dynamic_shared_bytes);
      b.dynamic_shared = dynamic[bi];
    }
    b.warps.resize((threads_per_block + 31) / 32);
    for (unsigned t = 0; t < threads_per_block; ++t) {
      Fiber& f = fibers[next++];
      f.block = &b;
      f.thread.thread_idx = uint3{t % block_dim.x, t / block_dim.x % block_dim.y, t / (block_dim.x * block_dim.y)};
      f.thread.block_idx = b.index;
      f.thread.block_dim = block_dim;
      f.thread.grid_dim = grid_dim;
      f.thread.lane = t % 32;
      f.thread.warp = t / 32;
      f.thread.kernel = g.kernel;
      f.stack = tls_stacks.take();
      context_start(f.context, f.stack, kStackBytes, fiber_main);
#ifdef CONVEYOR_EMULATOR_TSAN
      f.tsan_fiber = __tsan_create_fiber(0);
      std::snprintf(f.name, sizeof f.name, "CUDA %s block (%u,%u,%u) thread (%u,%u,%u)", g.kernel, b.index.x,
                    b.index.y, b.index.z, f.thread.thread_idx.x, f.thread.thread_idx.y, f.thread.thread_idx.z);
      __tsan_set_fiber_name(f.tsan_fiber, f.name);
#endif
      b.threads.push_back(&f);
      g.ready.push_back(&f);
    }
    b.live = int(threads_per_block);
    g.live += int(threads_per_block);
  }
  while (g.live > 0 && !g.faulted) {
    if (g.ready.empty()) {
      g.faulted = true;
      g.fault = {cudaErrorLaunchTimeout, std::string("kernel ") + g.kernel + ": " + describe_deadlock(g)};
      break;
    }
    const size_t pick = size_t(g.rng() % g.ready.size());
    Fiber* f = g.ready[pick];
    g.ready[pick] = g.ready.back();
    g.ready.pop_back();
    g.running = f;
#ifdef CONVEYOR_EMULATOR_TSAN
    __tsan_switch_to_fiber(f->tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef CONVEYOR_EMULATOR_ASAN
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(&fake_stack, f->stack, kStackBytes);
#endif
    context_switch(g.scheduler, f->context);
#ifdef CONVEYOR_EMULATOR_ASAN
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
    g.running = nullptr;
  }
  tsan_acquire(&g.end_sync);

  for (Fiber& f : fibers) {
    tls_stacks.give(f.stack);
#ifdef CONVEYOR_EMULATOR_TSAN
    __tsan_destroy_fiber(f.tsan_fiber);
#endif
  }
  for (auto& b : g.blocks) {
    for (SharedVariable& v : b->shared) std::free(v.data);
  }
  for (void* d : dynamic) std::free(d);
  tls_group = outer;
}

// ---------------------------------------------------------------------------------------------------------
// Device state: memory, the sticky error, streams and events

struct Allocation {
  size_t bytes;
};

std::mutex g_memory_mutex;
std::map<uintptr_t, Allocation> g_allocations;  // by start address
std::atomic<int> g_sticky_error{cudaSuccess};
thread_local cudaError_t tls_last_error = cudaSuccess;
thread_local int tls_device = 0;
std::atomic<uint64_t> g_launch_counter{0};

// The allocation holding [p, p + bytes), if any.
bool in_device_memory(const void* p, size_t bytes) {
  const std::lock_guard<std::mutex> lock(g_memory_mutex);
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = g_allocations.upper_bound(a);
  if (it == g_allocations.begin()) return false;
  --it;
  return a >= it->first && a + bytes <= it->first + it->second.bytes;
}

cudaError_t record(cudaError_t e) {
  if (e != cudaSuccess) tls_last_error = e;
  return e;
}

// Every call first reports the sticky error of an earlier kernel fault.
cudaError_t sticky() { return static_cast<cudaError_t>(g_sticky_error.load()); }

struct Stream;
std::mutex g_streams_mutex;
std::set<Stream*> g_streams;  // every live stream but the legacy default one

struct Stream {
  explicit Stream(unsigned flags_) : flags(flags_), worker([this] { work(); }) {}
  ~Stream() { stop(); }

  // Finishes the work enqueued so far and ends the worker thread.
  void stop() {
    {
      const std::lock_guard<std::mutex> lock(mutex);
      stopping = true;
    }
    changed.notify_all();
    if (worker.joinable()) worker.join();
  }

  // Appends `task` to the stream's work; returns the count of tasks enqueued so far (the task's number).
  uint64_t enqueue(std::function<void()> task) {
    const std::lock_guard<std::mutex> lock(mutex);
    tasks.push_back(std::move(task));
    changed.notify_all();
    return ++enqueued;
  }
  void wait_for(uint64_t count) {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return completed >= count; });
  }
  uint64_t enqueued_count() {
    const std::lock_guard<std::mutex> lock(mutex);
    return enqueued;
  }
  void synchronize() { wait_for(enqueued_count()); }

  void work() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mutex);
        changed.wait(lock, [&] { return stopping || !tasks.empty(); });
        if (tasks.empty()) return;
        task = std::move(tasks.front());
        tasks.pop_front();
      }
      task();
      {
        const std::lock_guard<std::mutex> lock(mutex);
        ++completed;
      }
      changed.notify_all();
    }
  }

  const unsigned flags;
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<std::function<void()>> tasks;
  uint64_t enqueued = 0, completed = 0;
  bool stopping = false;
  std::thread worker;
};

Stream& legacy_stream() {
  static Stream* s = new Stream(cudaStreamDefault);  // never destroyed: work may still reach it at exit
  return *s;
}

// The stream a handle names: 0 (and cudaStreamLegacy) the legacy default stream; null for a bad handle.
Stream* stream_of(cudaStream_t handle) {
  if (handle == nullptr || handle == cudaStreamLegacy || handle == cudaStreamPerThread) return &legacy_stream();
  Stream* s = reinterpret_cast<Stream*>(handle);
  const std::lock_guard<std::mutex> lock(g_streams_mutex);
  return g_streams.count(s) ? s : nullptr;
}

// Enqueues `task` on `s` behind what the legacy default stream semantics make it wait for.
uint64_t submit(Stream* s, std::function<void()> task) {
  std::vector<std::pair<Stream*, uint64_t>> waits;
  if (s == &legacy_stream()) {
    const std::lock_guard<std::mutex> lock(g_streams_mutex);
    for (Stream* other : g_streams) {
      if (!(other->flags & cudaStreamNonBlocking)) waits.emplace_back(other, other->enqueued_count());
    }
  } else if (!(s->flags & cudaStreamNonBlocking)) {
    waits.emplace_back(&legacy_stream(), legacy_stream().enqueued_count());
  }
  if (waits.empty()) return s->enqueue(std::move(task));
  return s->enqueue([waits, task = std::move(task)] {
    for (const auto& w : waits) w.first->wait_for(w.second);
    task();
  });
}

struct Event {
  std::mutex mutex;
  Stream* stream = nullptr;
  uint64_t target = 0;  // complete once stream has completed this many tasks
  std::chrono::steady_clock::time_point when;
  bool recorded = false;
};
std::mutex g_events_mutex;
std::set<Event*> g_events;

Event* event_of(cudaEvent_t handle) {
  Event* e = reinterpret_cast<Event*>(handle);
  const std::lock_guard<std::mutex> lock(g_events_mutex);
  return g_events.count(e) ? e : nullptr;
}

std::mutex g_functions_mutex;
std::map<const void*, int> g_max_dynamic_shared;  // cudaFuncAttributeMaxDynamicSharedMemorySize by kernel

int max_co_resident_blocks(unsigned threads_per_block, size_t dynamic_shared_bytes) {
  int per_sm = std::min<int>(kMaxBlocksPerMultiprocessor, kMaxThreadsPerMultiprocessor / int(threads_per_block));
  if (dynamic_shared_bytes > 0) per_sm = std::min<int>(per_sm, int(kSharedPerMultiprocessor / dynamic_shared_bytes));
  return per_sm * kMultiprocessors;
}

void print_fault(const KernelFault& f) {
  std::fprintf(stderr, "Conveyor CUDA emulator: %s (%s)\n", f.what.c_str(), cudaGetErrorName(f.error));
  std::fflush(stderr);
}

void run_grid(const void* function, const char* kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
              bool cooperative, const std::function<void()>& body, uint64_t launch_number) {
  (void)function;
  if (sticky() != cudaSuccess) return;  // a faulted device runs nothing more
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint3> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) {
    order[i] = uint3{unsigned(i % grid.x), unsigned(i / grid.x % grid.y), unsigned(i / (uint64_t(grid.x) * grid.y))};
  }
  std::mt19937_64 rng(base_seed() * 0x9E3779B97F4A7C15ull + launch_number);
  std::shuffle(order.begin(), order.end(), rng);
  auto run = [&](const std::vector<uint3>& indices, uint64_t seed) {
    Group g;
    g.kernel = kernel;
    g.body = &body;
    g.cooperative = cooperative;
    g.rng.seed(seed);
    for (const uint3& index : indices) {
      g.blocks.push_back(std::make_unique<Block>());
      g.blocks.back()->index = index;
    }
    run_group(g, block, grid, dynamic_shared_bytes);
    if (g.faulted) {
      print_fault(g.fault);
      int expected = cudaSuccess;
      g_sticky_error.compare_exchange_strong(expected, g.fault.error);
      return false;
    }
    return true;
  };
  if (cooperative) {
    run(order, rng());
    return;
  }
  for (const uint3& index : order) {
    if (!run({index}, rng())) return;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// What kernels call (cuda_emulator.h)

const ThreadContext& current_thread() {
  const Bookkeeping bookkeeping;
  return current_fiber()->thread;
}

void sync_block() {
  const Bookkeeping bookkeeping;
  Fiber* f = current_fiber();
  Block* b = f->block;
  const unsigned generation = b->barrier_generation;
  tsan_release(&b->barrier_sync[generation % 2]);
  f->state = FiberState::at_block_barrier;
  if (++b->at_barrier == b->live) complete_block_barrier(b);
  switch_to_scheduler(f);
  tsan_acquire(&b->barrier_sync[generation % 2]);
}

void sync_grid() {
  const Bookkeeping bookkeeping;
  Fiber* f = current_fiber();
  Group* g = tls_group;
  if (!g->cooperative) fault(cudaErrorLaunchFailure, "grid sync in a launch that is not cooperative");
  const unsigned generation = g->grid_generation;
  tsan_release(&g->grid_sync[generation % 2]);
  f->state = FiberState::at_grid_barrier;
  if (++g->at_grid == g->live) complete_grid_barrier(g);
  switch_to_scheduler(f);
  tsan_acquire(&g->grid_sync[generation % 2]);
}

void warp_collective(const char* op, unsigned mask, const void* in, void* out, CollectiveCompletion complete) {
  const Bookkeeping bookkeeping;
  Fiber* f = current_fiber();
  Block* b = f->block;
  Warp& warp = b->warps[f->thread.warp];
  const unsigned lane_bit = 1u << f->thread.lane;
  char text[200];
  if (!(mask & lane_bit)) {
    std::snprintf(text, sizeof text, "%s with mask 0x%08x, which leaves out the calling lane %u", op, mask,
                  f->thread.lane);
    fault(cudaErrorLaunchFailure, text);
  }
  const unsigned present = b->live_lanes(f->thread.warp);
  if ((mask & present) != mask) {
    std::snprintf(text, sizeof text, "%s with mask 0x%08x names lanes that have exited or do not exist (live: 0x%08x)",
                  op, mask, present);
    fault(cudaErrorLaunchFailure, text);
  }
  for (const Collective& other : warp.by_lowest_lane) {
    if (other.arrived != 0 && (other.mask & mask) != 0 && (other.mask != mask || std::strcmp(other.op, op) != 0)) {
      std::snprintf(text, sizeof text, "%s with mask 0x%08x while other lanes of the warp wait at %s with mask 0x%08x",
                    op, mask, other.op, other.mask);
      fault(cudaErrorLaunchFailure, text);
    }
  }
  Collective& w = warp.by_lowest_lane[__builtin_ctz(mask)];
  const unsigned generation = w.generation;
  if (w.arrived == 0) {
    w.op = op;
    w.mask = mask;
  }
  w.arrived |= lane_bit;
  f->collective_in = in;
  f->collective_out = out;
  f->state = FiberState::at_warp_collective;
  tsan_release(&w.sync[generation % 2]);
  if (w.arrived == mask) {
    tsan_acquire(&w.sync[generation % 2]);
    const void* ins[32] = {};
    void* outs[32] = {};
    for (unsigned l = 0; l < 32; ++l) {
      if (mask >> l & 1u) {
        Fiber* lane = b->threads[size_t(f->thread.warp) * 32 + l];
        ins[l] = lane->collective_in;
        outs[l] = lane->collective_out;
      }
    }
    complete(ins, outs, mask);
    tsan_release(&w.sync[generation % 2]);
    w.arrived = 0;
    ++w.generation;
    for (unsigned l = 0; l < 32; ++l) {
      if (mask >> l & 1u) release(b->threads[size_t(f->thread.warp) * 32 + l]);
    }
  }
  switch_to_scheduler(f);
  tsan_acquire(&w.sync[generation % 2]);
}

void* block_shared(size_t bytes, size_t alignment, const char* name) {
  const Bookkeeping bookkeeping;  // the allocating thread's fill too: the block's threads write the memory next
  Fiber* f = current_fiber();
  Block* b = f->block;
  const size_t k = f->shared_calls++;
  if (k == b->shared.size()) {
    void* data = aligned_exactly(alignment, bytes);
    std::memset(data, 0xff, bytes);
    b->shared.push_back({data, bytes, name});
  }
  const SharedVariable& v = b->shared[k];
  if (v.bytes != bytes || std::strcmp(v.name, name) != 0) {
    fault(cudaErrorLaunchFailure, std::string("shared variable ") + name + " declared where other threads of the "
                                  "block declared " + v.name + ": every thread must declare the same ones in order");
  }
  return v.data;
}

void* dynamic_shared() {
  const Bookkeeping bookkeeping;
  Fiber* f = current_fiber();
  if (f->block->dynamic_shared == nullptr) fault(cudaErrorLaunchFailure, "dynamic shared memory in a launch of 0 bytes");
  return f->block->dynamic_shared;
}

void kernel_fault(cudaError_t error, const char* what) {
  const Bookkeeping bookkeeping;
  fault(error, what);
}

void yield() {
  const Bookkeeping bookkeeping;
  Fiber* f = current_fiber();
  release(f);
  switch_to_scheduler(f);
}

cudaError_t launch(const void* function, const char* kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
                   cudaStream_t stream, bool cooperative, std::function<void()> body) {
  if (sticky() != cudaSuccess) return record(sticky());
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  // A block of more threads than the device has is an invalid argument (as an H200 with CUDA 13 answers, run
  // 1 of bench/results/h200-2026-11-28); other impossible shapes an invalid configuration.
  if (threads > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > 64) {
    return record(cudaErrorInvalidValue);
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0 ||
      grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    return record(cudaErrorInvalidConfiguration);
  }
  size_t shared_limit = kSharedPerBlock;
  {
    const std::lock_guard<std::mutex> lock(g_functions_mutex);
    auto it = g_max_dynamic_shared.find(function);
    if (it != g_max_dynamic_shared.end()) shared_limit = size_t(it->second);
  }
  if (dynamic_shared_bytes > shared_limit) return record(cudaErrorInvalidValue);
  if (cooperative &&
      uint64_t(grid.x) * grid.y * grid.z > uint64_t(max_co_resident_blocks(unsigned(threads), dynamic_shared_bytes))) {
    return record(cudaErrorCooperativeLaunchTooLarge);
  }
  Stream* s = stream_of(stream);
  if (s == nullptr) return record(cudaErrorInvalidResourceHandle);
  const uint64_t number = g_launch_counter++;
  submit(s, [=, body = std::move(body)] {
    run_grid(function, kernel, grid, block, dynamic_shared_bytes, cooperative, body, number);
  });
  return cudaSuccess;
}

}  // namespace conveyor::emulator

// ---------------------------------------------------------------------------------------------------------
// The runtime API, on host memory. Every call first returns the sticky error of a faulted kernel.

using conveyor::emulator::Event;
using conveyor::emulator::Stream;
namespace emu = conveyor::emulator;

namespace {

#define CONVEYOR_EMULATOR_STICKY()                                   \
  do {                                                               \
    if (emu::sticky() != cudaSuccess) return emu::record(emu::sticky()); \
  } while (0)

struct MemPool {
  uint64_t release_threshold = 0;
};
MemPool g_default_pool;

bool valid_device(int device) { return device >= 0 && device < emu::kDeviceCount; }

cudaError_t allocate(void** ptr, size_t bytes) {
  if (ptr == nullptr) return emu::record(cudaErrorInvalidValue);
  *ptr = nullptr;
  if (bytes == 0) return cudaSuccess;
  if (bytes > emu::kGlobalMemory) return emu::record(cudaErrorMemoryAllocation);
  void* p = emu::aligned_exactly(256, bytes);
  if (p == nullptr) return emu::record(cudaErrorMemoryAllocation);
  std::memset(p, 0xff, bytes);  // fresh device memory holds leftovers, never zeros to rely on
  const std::lock_guard<std::mutex> lock(emu::g_memory_mutex);
  emu::g_allocations[reinterpret_cast<uintptr_t>(p)] = {bytes};
  *ptr = p;
  return cudaSuccess;
}

// Takes `ptr` out of the allocations; false when it is not the start of one.
bool forget(void* ptr) {
  const std::lock_guard<std::mutex> lock(emu::g_memory_mutex);
  return emu::g_allocations.erase(reinterpret_cast<uintptr_t>(ptr)) == 1;
}

// Whether the sides of a copy that `kind` puts on the device lie within device allocations.
cudaError_t check_copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return cudaErrorInvalidValue;
  const bool dst_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind == cudaMemcpyDefault || kind == cudaMemcpyHostToHost) return cudaSuccess;
  if (kind != cudaMemcpyHostToDevice && kind != cudaMemcpyDeviceToHost && kind != cudaMemcpyDeviceToDevice) {
    return cudaErrorInvalidMemcpyDirection;
  }
  if ((dst_device && !emu::in_device_memory(dst, bytes)) || (src_device && !emu::in_device_memory(src, bytes))) {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t enqueue_and_maybe_wait(cudaStream_t stream, std::function<void()> task, bool wait) {
  Stream* s = emu::stream_of(stream);
  if (s == nullptr) return emu::record(cudaErrorInvalidResourceHandle);
  const uint64_t number = emu::submit(s, std::move(task));
  if (wait) {
    s->wait_for(number);
    if (emu::sticky() != cudaSuccess) return emu::record(emu::sticky());
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t cudaGetLastError() {
  const cudaError_t sticky = emu::sticky();
  if (sticky != cudaSuccess) return sticky;
  const cudaError_t e = emu::tls_last_error;
  emu::tls_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() {
  const cudaError_t sticky = emu::sticky();
  return sticky != cudaSuccess ? sticky : emu::tls_last_error;
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
#define CONVEYOR_EMULATOR_NAME(e) \
  case e: return #e;
    CONVEYOR_EMULATOR_NAME(cudaSuccess)
    CONVEYOR_EMULATOR_NAME(cudaErrorInvalidValue)
    CONVEYOR_EMULATOR_NAME(cudaErrorMemoryAllocation)
    CONVEYOR_EMULATOR_NAME(cudaErrorInvalidConfiguration)
    CONVEYOR_EMULATOR_NAME(cudaErrorInvalidMemcpyDirection)
    CONVEYOR_EMULATOR_NAME(cudaErrorInvalidDevice)
    CONVEYOR_EMULATOR_NAME(cudaErrorInvalidResourceHandle)
    CONVEYOR_EMULATOR_NAME(cudaErrorNotReady)
    CONVEYOR_EMULATOR_NAME(cudaErrorLaunchFailure)
    CONVEYOR_EMULATOR_NAME(cudaErrorLaunchTimeout)
    CONVEYOR_EMULATOR_NAME(cudaErrorIllegalAddress)
    CONVEYOR_EMULATOR_NAME(cudaErrorCooperativeLaunchTooLarge)
    CONVEYOR_EMULATOR_NAME(cudaErrorNoDevice)
    CONVEYOR_EMULATOR_NAME(cudaErrorNotSupported)
#undef CONVEYOR_EMULATOR_NAME
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorLaunchTimeout: return "the launch timed out and was terminated (emulator: deadlock)";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
    default: return "unknown error";
  }
}

cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return emu::record(cudaErrorInvalidValue);
  *count = emu::kDeviceCount;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  CONVEYOR_EMULATOR_STICKY();
  if (device == nullptr) return emu::record(cudaErrorInvalidValue);
  *device = emu::tls_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  CONVEYOR_EMULATOR_STICKY();
  if (!valid_device(device)) return emu::record(cudaErrorInvalidDevice);
  emu::tls_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  CONVEYOR_EMULATOR_STICKY();
  if (value == nullptr) return emu::record(cudaErrorInvalidValue);
  if (!valid_device(device)) return emu::record(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMultiProcessorCount: *value = emu::kMultiprocessors; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = emu::kMaxThreadsPerBlock; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = emu::kMaxThreadsPerMultiprocessor; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = emu::kMaxBlocksPerMultiprocessor; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = int(emu::kSharedPerBlock); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(emu::kSharedPerBlockOptIn); break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = int(emu::kSharedPerMultiprocessor); break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrCooperativeLaunch: *value = 1; break;
    case cudaDevAttrMemoryPoolsSupported: *value = 1; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY: case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxBlockDimX: case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    default: return emu::record(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  CONVEYOR_EMULATOR_STICKY();
  if (prop == nullptr) return emu::record(cudaErrorInvalidValue);
  if (!valid_device(device)) return emu::record(cudaErrorInvalidDevice);
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof prop->name, "Conveyor CUDA emulator (sm_90, on the CPU)");
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = emu::kMultiprocessors;
  prop->maxThreadsPerBlock = emu::kMaxThreadsPerBlock;
  prop->maxThreadsPerMultiProcessor = emu::kMaxThreadsPerMultiprocessor;
  prop->sharedMemPerBlock = emu::kSharedPerBlock;
  prop->sharedMemPerBlockOptin = emu::kSharedPerBlockOptIn;
  prop->sharedMemPerMultiprocessor = emu::kSharedPerMultiprocessor;
  prop->totalGlobalMem = emu::kGlobalMemory;
  prop->warpSize = 32;
  prop->cooperativeLaunch = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
  CONVEYOR_EMULATOR_STICKY();
  emu::legacy_stream().synchronize();
  std::vector<Stream*> streams;
  {
    const std::lock_guard<std::mutex> lock(emu::g_streams_mutex);
    streams.assign(emu::g_streams.begin(), emu::g_streams.end());
  }
  for (Stream* s : streams) s->synchronize();
  return emu::record(emu::sticky());
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  CONVEYOR_EMULATOR_STICKY();
  return allocate(ptr, bytes);
}

cudaError_t cudaFree(void* ptr) {
  CONVEYOR_EMULATOR_STICKY();
  if (ptr == nullptr) return cudaSuccess;
  if (!forget(ptr)) return emu::record(cudaErrorInvalidValue);
  cudaDeviceSynchronize();  // cudaFree waits for the device, as on a GPU
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t stream) {
  CONVEYOR_EMULATOR_STICKY();
  if (emu::stream_of(stream) == nullptr) return emu::record(cudaErrorInvalidResourceHandle);
  return allocate(ptr, bytes);
}

cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream) {
  CONVEYOR_EMULATOR_STICKY();
  if (ptr == nullptr) return cudaSuccess;
  if (emu::stream_of(stream) == nullptr) return emu::record(cudaErrorInvalidResourceHandle);
  if (!forget(ptr)) return emu::record(cudaErrorInvalidValue);
  return enqueue_and_maybe_wait(stream, [ptr] { std::free(ptr); }, false);
}

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
  CONVEYOR_EMULATOR_STICKY();
  if (pool == nullptr) return emu::record(cudaErrorInvalidValue);
  if (!valid_device(device)) return emu::record(cudaErrorInvalidDevice);
  *pool = reinterpret_cast<cudaMemPool_t>(&g_default_pool);
  return cudaSuccess;
}

cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value) {
  CONVEYOR_EMULATOR_STICKY();
  if (pool != reinterpret_cast<cudaMemPool_t>(&g_default_pool) || value == nullptr) {
    return emu::record(cudaErrorInvalidValue);
  }
  if (attr != cudaMemPoolAttrReleaseThreshold) return emu::record(cudaErrorNotSupported);
  g_default_pool.release_threshold = *static_cast<uint64_t*>(value);
  return cudaSuccess;
}

cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value) {
  CONVEYOR_EMULATOR_STICKY();
  if (pool != reinterpret_cast<cudaMemPool_t>(&g_default_pool) || value == nullptr) {
    return emu::record(cudaErrorInvalidValue);
  }
  if (attr != cudaMemPoolAttrReleaseThreshold) return emu::record(cudaErrorNotSupported);
  *static_cast<uint64_t*>(value) = g_default_pool.release_threshold;
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  CONVEYOR_EMULATOR_STICKY();
  if (const cudaError_t e = check_copy(dst, src, bytes, kind); e != cudaSuccess) return emu::record(e);
  // Pageable host memory (all host memory here: the emulator has no pinned allocations) as CUDA treats it: a
  // copy from it returns once the bytes are staged, so the caller may reuse or free the buffer at once; a copy
  // into it returns once the copy is complete.
  if (bytes > 0 && !emu::in_device_memory(src, bytes)) {
    auto staged = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char*>(src),
                                                                 static_cast<const unsigned char*>(src) + bytes);
    return enqueue_and_maybe_wait(stream, [=] { std::memmove(dst, staged->data(), bytes); },
                                  !emu::in_device_memory(dst, bytes));
  }
  return enqueue_and_maybe_wait(stream, [=] {
    if (bytes > 0) std::memmove(dst, src, bytes);
  }, bytes > 0 && !emu::in_device_memory(dst, bytes));
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  CONVEYOR_EMULATOR_STICKY();
  if (const cudaError_t e = check_copy(dst, src, bytes, kind); e != cudaSuccess) return emu::record(e);
  return enqueue_and_maybe_wait(nullptr, [=] {
    if (bytes > 0) std::memmove(dst, src, bytes);
  }, true);
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  CONVEYOR_EMULATOR_STICKY();
  if (bytes > 0 && (ptr == nullptr || !emu::in_device_memory(ptr, bytes))) return emu::record(cudaErrorInvalidValue);
  return enqueue_and_maybe_wait(stream, [=] {
    if (bytes > 0) std::memset(ptr, value, bytes);
  }, false);
}

cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  CONVEYOR_EMULATOR_STICKY();
  if (bytes > 0 && (ptr == nullptr || !emu::in_device_memory(ptr, bytes))) return emu::record(cudaErrorInvalidValue);
  return enqueue_and_maybe_wait(nullptr, [=] {
    if (bytes > 0) std::memset(ptr, value, bytes);
  }, true);
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  CONVEYOR_EMULATOR_STICKY();
  if (stream == nullptr || (flags & ~unsigned(cudaStreamNonBlocking)) != 0) return emu::record(cudaErrorInvalidValue);
  Stream* s = new Stream(flags);
  {
    const std::lock_guard<std::mutex> lock(emu::g_streams_mutex);
    emu::g_streams.insert(s);
  }
  *stream = reinterpret_cast<cudaStream_t>(s);
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  CONVEYOR_EMULATOR_STICKY();
  Stream* s = reinterpret_cast<Stream*>(stream);
  {
    const std::lock_guard<std::mutex> lock(emu::g_streams_mutex);
    if (stream == nullptr || emu::g_streams.erase(s) == 0) return emu::record(cudaErrorInvalidResourceHandle);
  }
  // Finishes its work first, as a GPU does before releasing the stream. The object is kept (among the
  // retired streams, so that leak checkers see it held): events recorded on the stream, and other streams'
  // waits for them, still point at it, as CUDA allows.
  s->stop();
  static std::mutex retired_mutex;
  static std::vector<Stream*>* retired = new std::vector<Stream*>;
  const std::lock_guard<std::mutex> lock(retired_mutex);
  retired->push_back(s);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  CONVEYOR_EMULATOR_STICKY();
  Stream* s = emu::stream_of(stream);
  if (s == nullptr) return emu::record(cudaErrorInvalidResourceHandle);
  if (s == &emu::legacy_stream()) return cudaDeviceSynchronize();
  s->synchronize();
  return emu::record(emu::sticky());
}

cudaError_t cudaStreamQuery(cudaStream_t stream) {
  CONVEYOR_EMULATOR_STICKY();
  Stream* s = emu::stream_of(stream);
  if (s == nullptr) return emu::record(cudaErrorInvalidResourceHandle);
  const std::lock_guard<std::mutex> lock(s->mutex);
  return s->completed == s->enqueued ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned) {
  CONVEYOR_EMULATOR_STICKY();
  if (event == nullptr) return emu::record(cudaErrorInvalidValue);
  Event* e = new Event;
  {
    const std::lock_guard<std::mutex> lock(emu::g_events_mutex);
    emu::g_events.insert(e);
  }
  *event = reinterpret_cast<cudaEvent_t>(e);
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  CONVEYOR_EMULATOR_STICKY();
  Event* e = reinterpret_cast<Event*>(event);
  {
    const std::lock_guard<std::mutex> lock(emu::g_events_mutex);
    if (emu::g_events.erase(e) == 0) return emu::record(cudaErrorInvalidResourceHandle);
  }
  if (e->stream != nullptr) e->stream->wait_for(e->target);  // its record task still points at it
  delete e;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  CONVEYOR_EMULATOR_STICKY();
  Event* e = emu::event_of(event);
  Stream* s = emu::stream_of(stream);
  if (e == nullptr || s == nullptr) return emu::record(cudaErrorInvalidResourceHandle);
  const std::lock_guard<std::mutex> lock(e->mutex);
  e->stream = s;
  e->recorded = true;
  e->target = emu::submit(s, [e] {
    const std::lock_guard<std::mutex> inner(e->mutex);
    e->when = std::chrono::steady_clock::now();
  });
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  CONVEYOR_EMULATOR_STICKY();
  Event* e = emu::event_of(event);
  if (e == nullptr) return emu::record(cudaErrorInvalidResourceHandle);
  if (e->stream != nullptr) e->stream->wait_for(e->target);
  return emu::record(emu::sticky());
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  CONVEYOR_EMULATOR_STICKY();
  Event* e = emu::event_of(event);
  if (e == nullptr) return emu::record(cudaErrorInvalidResourceHandle);
  if (e->stream == nullptr) return cudaSuccess;
  const std::lock_guard<std::mutex> lock(e->stream->mutex);
  return e->stream->completed >= e->target ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  CONVEYOR_EMULATOR_STICKY();
  Event* a = emu::event_of(start);
  Event* b = emu::event_of(end);
  if (ms == nullptr) return emu::record(cudaErrorInvalidValue);
  if (a == nullptr || b == nullptr) return emu::record(cudaErrorInvalidResourceHandle);
  if (!a->recorded || !b->recorded) return emu::record(cudaErrorInvalidResourceHandle);
  if (cudaEventQuery(start) != cudaSuccess || cudaEventQuery(end) != cudaSuccess) return emu::record(cudaErrorNotReady);
  *ms = std::chrono::duration<float, std::milli>(b->when - a->when).count();
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned) {
  CONVEYOR_EMULATOR_STICKY();
  Event* e = emu::event_of(event);
  Stream* s = emu::stream_of(stream);
  if (e == nullptr || s == nullptr) return emu::record(cudaErrorInvalidResourceHandle);
  if (e->stream == nullptr) return cudaSuccess;  // never recorded: nothing to wait for
  Stream* other = e->stream;
  const uint64_t target = e->target;
  return enqueue_and_maybe_wait(stream, [other, target] { other->wait_for(target); }, false);
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  CONVEYOR_EMULATOR_STICKY();
  if (func == nullptr) return emu::record(cudaErrorInvalidValue);  // cudaErrorInvalidDeviceFunction on a GPU
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || size_t(value) > emu::kSharedPerBlockOptIn) return emu::record(cudaErrorInvalidValue);
    const std::lock_guard<std::mutex> lock(emu::g_functions_mutex);
    emu::g_max_dynamic_shared[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func, int block_size,
                                                          size_t dynamic_shared_bytes) {
  CONVEYOR_EMULATOR_STICKY();
  if (blocks == nullptr || func == nullptr || block_size <= 0 || block_size > emu::kMaxThreadsPerBlock) {
    return emu::record(cudaErrorInvalidValue);
  }
  *blocks = emu::max_co_resident_blocks(unsigned(block_size), dynamic_shared_bytes) / emu::kMultiprocessors;
  return cudaSuccess;
}
