#include "kernels/parallel.h"

#include <algorithm>
#include <atomic>
#include <system_error>
#include <thread>
#include <vector>

namespace kvpool::detail {

void run_parallel(
    size_t num_jobs,
    size_t total_bytes,
    const std::function<void(size_t)>& work) {
  int num_threads = static_cast<int>(std::min<size_t>(
      {static_cast<size_t>(kMaxCopyThreads),
       std::max<size_t>(1, std::thread::hardware_concurrency()),
       std::max<size_t>(1, total_bytes / kMinBytesPerThread),
       num_jobs}));
  std::atomic<size_t> next{0};
  auto worker = [&work, &next, num_jobs] {
    for (size_t i = next++; i < num_jobs; i = next++) {
      work(i);
    }
  };
  if (num_threads <= 1) {
    worker();
    return;
  }
  std::vector<std::thread> helpers;
  helpers.reserve(num_threads - 1);
  for (int t = 1; t < num_threads; ++t) {
    try {
      helpers.emplace_back(worker);
    } catch (const std::system_error&) {
      break; // No thread to spare: the calling thread does the rest.
    }
  }
  worker();
  for (auto& helper : helpers) {
    helper.join();
  }
}

} // namespace kvpool::detail
