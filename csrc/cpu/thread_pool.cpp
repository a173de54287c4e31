// The CPU worker pool: threads that sleep on a condition variable between calls, share each call's tasks
// through an atomic counter, and spin briefly before sleeping so that the per-step calls of a recurrence
// do not pay a wake-up each time.
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
  explicit Pool(int threads) {
    for (int w = 1; w < threads; ++w) workers_.emplace_back([this] { worker_loop(); });
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
      job_tasks_ = tasks;
      next_task_.store(0);
      unfinished_.store(tasks);
      ++generation_;
    }
    wake_.notify_all();
    run_tasks(fn, tasks);
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
  void run_tasks(const std::function<void(int64_t)>& fn, int64_t tasks) {
    for (int64_t t = next_task_.fetch_add(1); t < tasks; t = next_task_.fetch_add(1)) {
      fn(t);
      unfinished_.fetch_sub(1, std::memory_order_release);
    }
  }

  void worker_loop() {
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
      const int64_t tasks = job_tasks_;
      if (job == nullptr) continue;
      active_workers_.fetch_add(1);
      lock.unlock();
      run_tasks(*job, tasks);
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
  int64_t job_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
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
