// The thread pool-free job runner the copy kernels share.
#pragma once

#include <cstddef>
#include <functional>

namespace kvpool::detail {

// Memory bandwidth saturates early: on the 2-core dev CPU two threads beat one
// memcpy (DESIGN.md), and a copy kernel rarely gains from more.
constexpr int kMaxCopyThreads = 2;
// Below this many bytes per thread, starting a thread costs more than it buys.
constexpr size_t kMinBytesPerThread = size_t{1} << 20;
// Jobs are cut to at most this many output bytes so threads that take jobs
// from a shared counter end within one job of each other.
constexpr size_t kMaxJobBytes = size_t{256} << 10;

// Runs work(i) once for every i in [0, num_jobs), in any order (so jobs must
// not overlap), on up to kMaxCopyThreads threads, the calling one included:
// one thread per kMinBytesPerThread of total_bytes, at least one.
void run_parallel(
    size_t num_jobs,
    size_t total_bytes,
    const std::function<void(size_t)>& work);

} // namespace kvpool::detail
