// The CPU worker pool: threads that sleep on a condition variable between calls, take each call's tasks
// through atomic counters (a share of them for each thread, which the others finish if it falls behind),
// and spin briefly before sleeping so that the per-step calls of a recurrence do not pay a wake-up each time.
#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
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
      const int64_t parts = static_cast<int64_t>(shares_.size());
      for (int64_t p = 0; p < parts; ++p) {
        shares_[p].next.store(p * tasks / parts, std::memory_order_relaxed);
        shares_[p].end = (p + 1) * tasks / parts;
      }
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
  // Each thread runs its own share of the tasks first, in order, then takes what is left of the others'
  // (a thread that shares its core with another program falls behind, and the rest do its tasks). With
  // the same share at every call, a thread works on the same data each step of a recurrence, which stays
  // in its core's cache: R's columns of the step's task, for one.
  void run_tasks(const std::function<void(int64_t)>& fn, int participant) {
    const int parts = static_cast<int>(shares_.size());
    for (int i = 0; i < parts; ++i) {
      Share& share = shares_[(participant + i) % parts];
      for (int64_t t = share.next.fetch_add(1); t < share.end; t = share.next.fetch_add(1)) {
        fn(t);
        unfinished_.fetch_sub(1, std::memory_order_release);
      }
    }
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
  // A thread's share of the tasks: [first, end), `next` the first not yet taken (by it or another thread).
  struct alignas(64) Share {
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  std::vector<Share> shares_;
  std::atomic<int64_t> unfinished_{0};
  std::atomic<int> active_workers_{0};
};

std::mutex pool_mutex;
std::shared_ptr<Pool> current_pool;

std::shared_ptr<Pool> pool() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (!current_pool) current_pool = std::make_shared<Pool>(default_pool_size());
  return current_pool;
}

}  // namespace

int pool_size() { return pool()->size(); }

void set_pool_size(int threads) {
  if (threads < 1 || threads > kMaxPoolSize) {
    throw ArgumentError("n: expected a number of threads from 1 to " + std::to_string(kMaxPoolSize) + ", got " +
                        std::to_string(threads));
  }
  std::lock_guard<std::mutex> lock(pool_mutex);
  // Calls still running keep the old pool alive through their shared_ptr.
  current_pool = std::make_shared<Pool>(threads);
}

void parallel_for(int64_t tasks, const std::function<void(int64_t)>& fn) {
  if (tasks <= 0) return;
  if (tasks > 1) {
    const std::shared_ptr<Pool> p = pool();
    if (p->size() > 1 && p->try_run(tasks, fn)) return;
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

}  // namespace conveyor
