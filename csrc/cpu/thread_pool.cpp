// The CPU worker pool: threads that sleep on a condition variable between calls, take each call's tasks
// through atomic counters (a share of them for each thread, which the others finish if it falls behind),
// and spin briefly before sleeping so that the per-step calls of a recurrence do not pay a wake-up each time.
// Or, on request (share_openmp_threads), the same shares on the threads of an OpenMP runtime already loaded.
#include "thread_pool.h"

#include <dlfcn.h>
#include <pthread.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "conveyor/conveyor.h"

namespace conveyor::cpu {
namespace {

int default_pool_size() {
  if (const char* env = std::getenv("CONVEYOR_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return std::min(n, kMaxPoolSize);
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// A thread's share of a call's tasks: [first, end), `next` the first not yet taken (by it or another thread).
struct alignas(64) Share {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

void divide(std::vector<Share>& shares, int64_t tasks) {
  const int64_t parts = static_cast<int64_t>(shares.size());
  for (int64_t p = 0; p < parts; ++p) {
    shares[p].next.store(p * tasks / parts, std::memory_order_relaxed);
    shares[p].end = (p + 1) * tasks / parts;
  }
}

// Each thread runs its own share of the tasks first, in order, then takes what is left of the others'
// (a thread that shares its core with another program falls behind, and the rest do its tasks). With
// the same share at every call, a thread works on the same data each step of a recurrence, which stays
// in its core's cache: R's columns of the step's task, for one. `done` is called after each task.
template <typename Done>
void run_shares(std::vector<Share>& shares, int participant, const std::function<void(int64_t)>& fn, Done done) {
  const int parts = static_cast<int>(shares.size());
  for (int i = 0; i < parts; ++i) {
    Share& share = shares[(participant + i) % parts];
    for (int64_t t = share.next.fetch_add(1); t < share.end; t = share.next.fetch_add(1)) {
      fn(t);
      done();
    }
  }
}

class Pool {
 public:
  explicit Pool(int threads) : shares_(static_cast<size_t>(threads)) {
    for (int w = 1; w < threads; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Returns false (running nothing) when another call holds the pool.
  bool try_run(int64_t tasks, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> owner(owner_, std::try_to_lock);
    if (!owner.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      divide(shares_, tasks);
      unfinished_.store(tasks);
      ++generation_;
    }
    wake_.notify_all();
    run_tasks(fn, 0);
    // The caller finished its share; wait for the workers' last tasks, then for every worker that took
    // this job to leave it, so that none can touch `fn` or the counters once the next job starts.
    while (unfinished_.load(std::memory_order_acquire) > 0) std::this_thread::yield();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = nullptr;
    }
    while (active_workers_.load(std::memory_order_acquire) > 0) std::this_thread::yield();
    return true;
  }

 private:
  void run_tasks(const std::function<void(int64_t)>& fn, int participant) {
    run_shares(shares_, participant, fn, [this] { unfinished_.fetch_sub(1, std::memory_order_release); });
  }

  void worker_loop(int participant) {
    uint64_t seen = 0;
    for (;;) {
      // Spin a little: the next step's call usually comes within microseconds.
      for (int spin = 0; spin < 20000 && generation_.load(std::memory_order_acquire) == seen; ++spin) {
        std::this_thread::yield();
      }
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
      seen = generation_.load();
      if (stopping_) return;
      const std::function<void(int64_t)>* job = job_;
      if (job == nullptr) continue;
      active_workers_.fetch_add(1);
      lock.unlock();
      run_tasks(*job, participant);
      active_workers_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex owner_;  // held by the caller whose tasks the pool is running
  std::mutex mutex_;  // guards the fields below
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};  // written under mutex_, read without it while spinning
  bool stopping_ = false;
  const std::function<void(int64_t)>* job_ = nullptr;
  std::vector<Share> shares_;
  std::atomic<int64_t> unfinished_{0};
  std::atomic<int> active_workers_{0};
};

std::mutex pool_mutex;
std::shared_ptr<Pool> current_pool;  // made at first use, so that the OpenMP runtime's users start no threads
std::atomic<int> threads_wanted{0};  // 0 until first asked: default_pool_size()

int threads_asked() {
  int n = threads_wanted.load(std::memory_order_relaxed);
  if (n == 0) {
    int unset = 0;
    threads_wanted.compare_exchange_strong(unset, default_pool_size());
    n = threads_wanted.load(std::memory_order_relaxed);
  }
  return n;
}

std::shared_ptr<Pool> pool() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (!current_pool || current_pool->size() != threads_asked()) {
    // Calls still running keep the old pool alive through their shared_ptr.
    current_pool = std::make_shared<Pool>(threads_asked());
  }
  return current_pool;
}

// GNU OpenMP's entry points (GCC's ABI since 4.9: what `#pragma omp parallel` compiles to), looked up in a
// copy of libgomp already loaded by another library of the process.
struct OpenMpRuntime {
  void (*parallel)(void (*body)(void*), void* data, unsigned threads, unsigned flags) = nullptr;
  int (*thread_num)() = nullptr;
};
std::atomic<const OpenMpRuntime*> openmp{nullptr};

const OpenMpRuntime* find_openmp() {
  static const OpenMpRuntime* const found = []() -> const OpenMpRuntime* {
    // RTLD_NOLOAD: only a copy already loaded (Python loads extension modules' libraries locally, so their
    // symbols are not in the global scope that dlsym(RTLD_DEFAULT) searches); it stays loaded from now on.
    void* library = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (library == nullptr) return nullptr;
    static OpenMpRuntime runtime;
    runtime.parallel = reinterpret_cast<decltype(runtime.parallel)>(dlsym(library, "GOMP_parallel"));
    runtime.thread_num = reinterpret_cast<decltype(runtime.thread_num)>(dlsym(library, "omp_get_thread_num"));
    return runtime.parallel != nullptr && runtime.thread_num != nullptr ? &runtime : nullptr;
  }();
  return found;
}

struct OpenMpCall {
  const OpenMpRuntime* runtime;
  const std::function<void(int64_t)>* fn;
  std::vector<Share> shares;
  std::vector<int> workers;  // the team's threads but the caller, as the kernel numbers them (Linux)
};

int kernel_thread_id() {
#if defined(__linux__)
  return static_cast<int>(syscall(SYS_gettid));
#else
  return 0;
#endif
}

// A thread of the team. A team smaller than the shares (nested inside another parallel region, it is the
// calling thread alone) still runs every task: each thread goes on to the others' shares after its own.
void openmp_body(void* data) {
  auto* call = static_cast<OpenMpCall*>(data);
  const int parts = static_cast<int>(call->shares.size());
  const int me = call->runtime->thread_num();
  if (me > 0 && me < parts) call->workers[me] = kernel_thread_id();
  run_shares(call->shares, me % parts, *call->fn, [] {});
}

// The workers of this thread's last team, and this window's choice of threads (WindowThreads).
thread_local std::vector<int> team_workers;
// A window's choice is made at its first parallel work, so that calls with none, or on one thread, do not
// pay for it. Outside windows, parallel work goes to the shared runtime when sharing.
enum class WindowChoice { no_window, undecided, pool, openmp };
thread_local WindowChoice window_choice = WindowChoice::no_window;
thread_local ParallelRuntime last_runtime = ParallelRuntime::none;
std::atomic<bool> check_team{true};  // false (tests): a window takes the shared runtime whatever its state

// Whether every worker of this thread's team is running (spinning after a parallel region), not asleep:
// /proc's state of each. A region started on sleeping workers waits for each to wake and join it; on the
// 2-core virtual machine of bench/NOTES.md (2026-12-06) that took 0.5-13 ms, and a worker often woke on the
// caller's own core, where the whole call then ran at half speed (LSTM T=64, B=32, H=256, calls 50 ms apart:
// 17-21 ms against 10 on the own pool; torch.nn's own calls did the same). Unknown workers (no team yet, or
// one gone) count as running, so that the next region learns them.
bool team_running() {
#if defined(__linux__)
  for (int tid : team_workers) {
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/self/task/%d/stat", tid);
    std::FILE* file = std::fopen(path, "r");
    if (file == nullptr) {
      team_workers.clear();
      return true;
    }
    char text[512];
    const size_t length = std::fread(text, 1, sizeof(text) - 1, file);
    std::fclose(file);
    text[length] = 0;
    const char* name_end = std::strrchr(text, ')');  // the state follows the thread's name, "(name) S ..."
    if (name_end == nullptr || name_end[1] == 0 || name_end[2] != 'R') return false;
  }
#endif
  return true;
}

}  // namespace

int pool_size() { return threads_asked(); }

void set_pool_size(int threads) {
  if (threads < 1 || threads > kMaxPoolSize) {
    throw ArgumentError("n: expected a number of threads from 1 to " + std::to_string(kMaxPoolSize) + ", got " +
                        std::to_string(threads));
  }
  threads_wanted.store(threads);
  std::lock_guard<std::mutex> lock(pool_mutex);
  current_pool.reset();  // the next call's pool has the new size
}

namespace {

// A child of fork() has only the thread that forked. The OpenMP runtime's threads are gone, and GNU OpenMP
// waits for them at the child's first parallel region forever (torch's own operators hang there too): the
// child goes back to the own pool. The pool's threads are gone as well: its object is left behind unfreed
// (its destructor would join them) and the child makes a pool of its own at its first parallel work.
// pool_mutex is held across fork() so that the child finds it free and current_pool whole.
void before_fork() { pool_mutex.lock(); }
void after_fork_in_parent() { pool_mutex.unlock(); }
void after_fork_in_child() {
  openmp.store(nullptr);
  team_workers.clear();
  new std::shared_ptr<Pool>(std::move(current_pool));  // NOLINT: left behind on purpose
  pool_mutex.unlock();
}
const bool fork_handlers_registered = [] {
  return pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child) == 0;
}();

}  // namespace

bool share_openmp_threads(bool share) {
  if (!share) {
    openmp.store(nullptr);
    return false;
  }
  const OpenMpRuntime* runtime = find_openmp();
  if (runtime == nullptr) return false;
  openmp.store(runtime);  // a pool already made stays, asleep, for share_openmp_threads(false)
  return true;
}

bool sharing_openmp_threads() { return openmp.load() != nullptr; }

ParallelRuntime last_parallel_runtime() { return last_runtime; }
void set_check_openmp_team(bool check) { check_team.store(check); }

WindowThreads::WindowThreads() : outer_(window_choice != WindowChoice::no_window) {
  if (!outer_) {
    window_choice = WindowChoice::undecided;
    last_runtime = ParallelRuntime::none;
  }
}

WindowThreads::~WindowThreads() {
  if (!outer_) window_choice = WindowChoice::no_window;
}

void parallel_for(int64_t tasks, const std::function<void(int64_t)>& fn) {
  if (tasks <= 0) return;
  const int threads = threads_asked();
  if (tasks > 1 && threads > 1) {
    const OpenMpRuntime* runtime = openmp.load(std::memory_order_acquire);
    if (runtime != nullptr && window_choice == WindowChoice::undecided) {
      window_choice = !check_team.load() || team_running() ? WindowChoice::openmp : WindowChoice::pool;
    }
    if (runtime != nullptr && window_choice != WindowChoice::pool) {
      last_runtime = ParallelRuntime::openmp;
      const size_t parts = static_cast<size_t>(std::min<int64_t>(threads, tasks));
      OpenMpCall call{runtime, &fn, std::vector<Share>(parts), std::vector<int>(parts, 0)};
      divide(call.shares, tasks);
      runtime->parallel(openmp_body, &call, static_cast<unsigned>(parts), 0);
      team_workers.clear();
      for (int tid : call.workers) {
        if (tid != 0) team_workers.push_back(tid);
      }
      return;
    }
    last_runtime = ParallelRuntime::pool;
    if (pool()->try_run(tasks, fn)) return;
  }
  for (int64_t t = 0; t < tasks; ++t) fn(t);
}

int64_t parallel_tasks_for(double work, int64_t max_tasks) {
  // Multiply-adds: about 3 us of the GEMM on one core (40 a nanosecond). With less per task, handing work
  // to a second thread cost more than it saved (measured: LSTM T=35, B=20, H=100 on 2 threads ran 1.5x
  // slower with a quarter of this).
  constexpr double kMinWorkPerTask = 131072.0;
  const int64_t by_work = static_cast<int64_t>(work / kMinWorkPerTask);
  return std::max<int64_t>(1, std::min(by_work, max_tasks));
}

}  // namespace conveyor::cpu

namespace conveyor {

int num_threads() { return cpu::pool_size(); }
void set_num_threads(int n) { cpu::set_pool_size(n); }
bool share_openmp_threads(bool share) { return cpu::share_openmp_threads(share); }
bool sharing_openmp_threads() { return cpu::sharing_openmp_threads(); }

}  // namespace conveyor
