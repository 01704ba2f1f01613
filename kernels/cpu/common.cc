// SPDX-License-Identifier: Apache-2.0
#include "common.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>

namespace msk {

int g_threads = 1;

namespace {
// A persistent pool: a decoding step runs about 50 kernels of tens of microseconds each, and starting threads
// for every one of them cost more than the work it split. Workers spin for a while after a region (the next
// kernel usually follows within microseconds), then sleep on a condition variable. One parallel region at a
// time: a kernel called while another holds the pool (MindSpore may run two kernels at once) runs inline.
struct Pool {
  std::mutex submit, m;
  std::condition_variable wake, done;
  // (region number << 16) | workers taking part: one word, so a worker decides whether it takes part from the
  // same value that told it a region began (a region's fn and n stay put until every participant is done)
  std::atomic<uint64_t> job{0};
  const std::function<void(int64_t)> *fn = nullptr;
  int64_t n = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int> pending{0};        // taking part and not yet done
  int started = 0;
};

Pool *g_pool = nullptr;
std::mutex g_pool_create;
thread_local bool t_in_region = false;  // a parallel_for inside a region's task runs inline
constexpr auto kSpin = std::chrono::microseconds(200);
constexpr uint64_t kActiveBits = 16;

// Waiting without holding the core: MindSpore's own kernels (an Add between two of ours) run on threads of its
// pool that may need this core.
inline void relax() { std::this_thread::yield(); }

void run_tasks(Pool *p) {
  for (int64_t i = p->next++; i < p->n; i = p->next++) (*p->fn)(i);
}

void worker(Pool *p, int index, uint64_t seen) {      // seen: the job word when it was started
  t_in_region = true;
  for (;;) {
    auto until = std::chrono::steady_clock::now() + kSpin;
    uint64_t job;
    for (int spins = 0; (job = p->job.load(std::memory_order_acquire)) == seen; ++spins) {
      relax();
      if ((spins & 63) == 63 && std::chrono::steady_clock::now() > until) {
        std::unique_lock<std::mutex> lock(p->m);
        p->wake.wait(lock, [&] { return p->job.load(std::memory_order_acquire) != seen; });
      }
    }
    seen = job;
    if (static_cast<uint64_t>(index) < (job & ((uint64_t{1} << kActiveBits) - 1))) {
      run_tasks(p);
      if (p->pending.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(p->m);
        p->done.notify_one();
      }
    }
  }
}

void register_fork_handlers() {
  // the child of a fork has none of the workers: it starts a pool of its own; the lock is held across the fork
  // so the child's copy of it is never left locked by a thread that does not exist there
  pthread_atfork([] { g_pool_create.lock(); }, [] { g_pool_create.unlock(); },
                 [] {
                   g_pool = nullptr;
                   g_pool_create.unlock();
                 });
}

Pool *pool(int workers) {
  static std::once_flag registered;
  std::call_once(registered, register_fork_handlers);
  std::lock_guard<std::mutex> lock(g_pool_create);
  if (g_pool == nullptr) g_pool = new Pool();     // never freed: its threads live as long as the process
  while (g_pool->started < workers)
    std::thread(worker, g_pool, g_pool->started++, g_pool->job.load(std::memory_order_acquire)).detach();
  return g_pool;
}
}  // namespace

void parallel_for(int64_t n, const std::function<void(int64_t)> &fn) {
  int workers = static_cast<int>(std::min<int64_t>(g_threads, n)) - 1;     // besides the calling thread
  if (workers < 1 || t_in_region) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  Pool *p = pool(workers);
  std::unique_lock<std::mutex> region(p->submit, std::try_to_lock);
  if (!region.owns_lock()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  t_in_region = true;
  p->fn = &fn;
  p->n = n;
  p->next.store(0);
  p->pending.store(workers);
  {
    std::lock_guard<std::mutex> lock(p->m);
    uint64_t number = (p->job.load(std::memory_order_relaxed) >> kActiveBits) + 1;
    p->job.store((number << kActiveBits) | static_cast<uint64_t>(workers), std::memory_order_release);
  }
  p->wake.notify_all();
  run_tasks(p);
  auto until = std::chrono::steady_clock::now() + kSpin;
  for (int spins = 0; p->pending.load(std::memory_order_acquire) != 0; ++spins) {
    relax();
    if ((spins & 63) == 63 && std::chrono::steady_clock::now() > until) {
      std::unique_lock<std::mutex> lock(p->m);
      p->done.wait(lock, [&] { return p->pending.load(std::memory_order_acquire) == 0; });
    }
  }
  t_in_region = false;
}

// Batch invariance: a row of C must come out bitwise the same whatever else is in the batch, so that a batch
// equals its accumulated micro-batches and data-parallel ranks equal one process. OpenBLAS computes a row
// differently depending on where it sits in its tiles (measured: slices of a product differ unless they
// start and end on the kernel's tile grid), so each sequence gets its own calls, from its own row 0, and
// the columns go in fixed panels: an element then depends on the sequence length, the width and its own
// position only, never on the batch size.
void gemm_seq(bool tb, int nseq, int s, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb,
              float beta, float *c, int ldc) {
  int panels = (n + kPanel - 1) / kPanel;
  parallel_for(static_cast<int64_t>(nseq) * panels, [&](int64_t t) {
    int q = static_cast<int>(t / panels), c0 = static_cast<int>(t % panels) * kPanel;
    int cols = std::min(kPanel, n - c0);
    const float *bp = tb ? b + static_cast<int64_t>(c0) * ldb : b + c0;
    gemm(false, tb, s, cols, k, alpha, a + static_cast<int64_t>(q) * s * lda, lda, bp, ldb, beta,
         c + static_cast<int64_t>(q) * s * ldc + c0, ldc);
  });
}

// C = A^T B with A [k, m]: a weight's gradient (a sum over every row of the batch); its rows are split across
// threads in panels.
void gemm_tn(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta, float *c,
             int ldc) {
  int panels = (m + kPanel - 1) / kPanel;
  parallel_for(panels, [&](int64_t p) {
    int r0 = static_cast<int>(p) * kPanel, rows = std::min(kPanel, m - r0);
    gemm(true, false, rows, n, k, alpha, a + r0, lda, b, ldb, beta, c + static_cast<int64_t>(r0) * ldc, ldc);
  });
}

}  // namespace msk

extern "C" __attribute__((visibility("default"))) void MsLlmSetThreads(int n) {
  msk::g_threads = n < 1 ? 1 : n;
  scipy_openblas_set_num_threads(1);
}

extern "C" __attribute__((visibility("default"))) int MsLlmThreads() { return msk::g_threads; }
