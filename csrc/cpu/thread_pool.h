// A small pool of worker threads for the CPU backend.
//
// parallel_for(n, fn) runs fn(0) ... fn(n-1) across the workers and the calling thread and returns when all
// are done. One caller owns the pool at a time; a caller that finds it busy (another thread's call, or a
// nested parallel_for) runs its tasks itself, so concurrent calls stay correct and never deadlock.
#pragma once

#include <cstdint>
#include <functional>

namespace conveyor::cpu {

constexpr int kMaxPoolSize = 1024;

int pool_size();
void set_pool_size(int threads);
// conveyor::share_openmp_threads: parallel_for on a loaded OpenMP runtime's threads, or (false) the pool's.
bool share_openmp_threads(bool share);
bool sharing_openmp_threads();

// For tests: what ran the parallel work of this thread's last window (none: it had none, or one thread), and
// whether a window reads its OpenMP team's state (false: it always takes the shared runtime when sharing).
enum class ParallelRuntime { none, pool, openmp };
ParallelRuntime last_parallel_runtime();
void set_check_openmp_team(bool check);

// Open for the parallel_for calls of one window (a forward or backward call) on this thread: where the
// threads of a shared OpenMP runtime are asleep when it opens, the window runs on the own pool instead; a
// window inside another keeps the outer one's choice.
class WindowThreads {
 public:
  WindowThreads();
  ~WindowThreads();
  WindowThreads(const WindowThreads&) = delete;
  WindowThreads& operator=(const WindowThreads&) = delete;

 private:
  bool outer_;  // inside another window, whose choice it keeps
};

void parallel_for(int64_t tasks, const std::function<void(int64_t)>& fn);

// The number of tasks worth splitting `work` (a rough count of multiply-adds) into: 1 below the size where
// waking the workers costs more than it saves.
int64_t parallel_tasks_for(double work, int64_t max_tasks);

}  // namespace conveyor::cpu
