// The worker pool that every kernel of the native library shares: a job is a number of
// chunks and a function that computes one chunk; the calling thread and `threads - 1`
// workers take chunks from a shared ticket.
//
// Why one pool: two pools would put twice as many spinning threads on the same cores.
// Why a ticket: a worker that wakes late finds fewer chunks left (or none) instead of
// holding the caller up, so the worst case is the caller doing every chunk alone.
// Why spinning: XLA:CPU resumes after each custom call; workers that sleep between calls
// pay a wake-up per product (benchmarks/RESULTS.md, "decode"), so they spin, yielding,
// for `spin_us` before they sleep.
#ifndef RUSTGPT_JAX_NATIVE_SPIN_POOL_H_
#define RUSTGPT_JAX_NATIVE_SPIN_POOL_H_

#include <emmintrin.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

namespace rgj {

// Computes chunk `index` of the job described by `context`.
using ChunkFn = void (*)(const void* context, int64_t index);

class SpinPool {
 public:
  SpinPool(int threads, int64_t spin_us) : n_(threads), spin_us_(spin_us) {
    for (int i = 1; i < n_; ++i) std::thread([this] { Loop(); }).detach();
  }
  int size() const { return n_; }

  // Runs fn(context, i) for i in [0, chunks) with the workers; returns false without
  // running anything if another call holds the pool (XLA may run two custom calls at
  // once; the caller then computes alone). `context` must outlive the call.
  bool TryRun(int64_t chunks, ChunkFn fn, const void* context) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    fn_.store(fn, std::memory_order_relaxed);
    context_.store(context, std::memory_order_relaxed);
    chunks_.store(chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (ticket_.load(std::memory_order_relaxed) >> 32) + 1;
    ticket_.store(gen << 32, std::memory_order_release);  // publishes the job
    {
      std::lock_guard<std::mutex> lock(wake_mu_);
      generation_.store(gen, std::memory_order_release);
    }
    wake_cv_.notify_all();
    TakeChunks();
    // Chunks a worker took are in flight; yield so it gets the core if it shares ours.
    while (done_.load(std::memory_order_acquire) != chunks) {
      _mm_pause();
      sched_yield();
    }
    return true;
  }

 private:
  // Takes chunks of the current job until none are left.
  void TakeChunks() {
    for (;;) {
      uint64_t ticket = ticket_.load(std::memory_order_acquire);
      const int64_t index = static_cast<int64_t>(ticket & 0xffffffffu);
      // Read before the claim: if the claim succeeds, this job is not finished, so no
      // later job can have overwritten these fields (its caller waits for every chunk).
      const int64_t chunks = chunks_.load(std::memory_order_relaxed);
      const ChunkFn fn = fn_.load(std::memory_order_relaxed);
      const void* context = context_.load(std::memory_order_relaxed);
      if (index >= chunks) return;
      if (!ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel))
        continue;
      fn(context, index);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      for (int k = 1; generation_.load(std::memory_order_acquire) == seen; ++k) {
        // Yield while spinning: a spinner that keeps the core slowed XLA's own pool
        // thread so much that decoding got slower overall.
        _mm_pause();
        sched_yield();
        if (k % 64 == 0 &&
            std::chrono::steady_clock::now() - start > std::chrono::microseconds(spin_us_)) {
          std::unique_lock<std::mutex> lock(wake_mu_);
          wake_cv_.wait(lock, [&] { return generation_.load() != seen; });
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      TakeChunks();
    }
  }

  const int n_;
  const int64_t spin_us_;
  std::atomic<ChunkFn> fn_{nullptr};
  std::atomic<const void*> context_{nullptr};
  std::atomic<int64_t> chunks_{0};
  std::atomic<uint64_t> ticket_{0};  // (job generation << 32) | next chunk index
  std::atomic<int64_t> done_{0};     // chunks of the current job finished
  std::atomic<uint64_t> generation_{0};
  std::mutex run_mu_;
  std::mutex wake_mu_;
  std::condition_variable wake_cv_;
};

// The library's one pool. One per (process, settings): a forked child has none of its
// parent's workers, so it starts its own pool rather than wait forever on threads that
// do not exist, and new settings (`runtime.Execution.gemv_threads / gemv_spin_us`) start
// a new pool. Old pools are leaked on purpose (their workers may be parked on them).
// `inline`: one instance across the library's translation units.
inline SpinPool& Pool(int64_t threads, int64_t spin_us) {
  static std::mutex mu;
  static SpinPool* pool = nullptr;
  static pid_t owner = 0;
  static int64_t pool_threads = 0, pool_spin_us = 0;
  threads = threads < 1 ? 1 : threads;
  spin_us = spin_us < 0 ? 0 : spin_us;
  std::lock_guard<std::mutex> lock(mu);
  if (pool == nullptr || owner != getpid() || pool_threads != threads ||
      pool_spin_us != spin_us) {
    pool = new SpinPool(static_cast<int>(threads), spin_us);
    owner = getpid();
    pool_threads = threads;
    pool_spin_us = spin_us;
  }
  return *pool;
}

}  // namespace rgj

#endif  // RUSTGPT_JAX_NATIVE_SPIN_POOL_H_
