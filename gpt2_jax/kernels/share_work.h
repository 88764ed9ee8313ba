// Sharing a kernel's items between the calling thread and tasks on XLA's intra-op thread pool.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace gpt2_jax {

// Runs worker(i) for every i in [0, n): the calling thread and up to `helpers` pool tasks take items in turn
// through an atomic counter; each thread that gets an item first makes its own worker with make_worker() (so a
// worker may own scratch buffers, and a task that starts late allocates nothing). The caller waits only for items
// that a task has taken, so a task that starts late, or never (the pool busy with other calls), costs nothing and
// cannot deadlock it. make_worker and its workers may only capture what outlives the call by value.
template <typename MakeWorker>
void ShareWork(xla::ffi::ThreadPool& pool, int64_t n, int64_t helpers, MakeWorker make_worker) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto run = [counters, n, make_worker] {
    int64_t i = counters->next.fetch_add(1);
    if (i >= n) return;
    auto worker = make_worker();
    for (; i < n; i = counters->next.fetch_add(1)) {
      worker(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(run)(run));  // (Schedule takes an rvalue)
  run();
  while (counters->done.load(std::memory_order_acquire) < n) Pause();
}

}  // namespace gpt2_jax
