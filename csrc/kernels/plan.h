// The copy plan the gather/scatter kernels share: which block runs a range of
// positions covers, and how the copies are cut into jobs and run on threads.
// Plain C++: no MLX, no Python.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/parallel.h"

namespace kvpool {

// Block runs ----------------------------------------------------------------

// Position p of a sequence lives in block block_ids[p / block_tokens], slot
// p % block_tokens. A run is a stretch of consecutive positions in one block,
// so it copies as one strided block of rows.
struct BlockRun {
  int64_t block; // the block id (a slab index)
  int64_t slot; // the run's first slot in the block
  int64_t rows; // positions in the run, >= 1
  int64_t cache_row; // position - start: row in the contiguous cache (where a
                     // gather writes the run, where a scatter reads it)

  bool operator==(const BlockRun&) const = default;
};

// Positions [start, stop) of a block table as block runs, in position order,
// plus the headroom: the rows of a capacity-row cache past stop - start, which
// a gather zero-fills.
//
// Example, block_tokens = 4, block_ids = [7, 2, 5], start = 2, stop = 9,
// capacity = 10:
//   position   0 1 2 3 | 4 5 6 7 | 8 9 10 11
//   block          7 7 | 2 2 2 2 | 5
//   cache row      0 1 | 2 3 4 5 | 6 7 8 9
//                                    ^^^^^ headroom 3
//   runs()  {block 7, slot 2, rows 2, cache_row 0}
//           {block 2, slot 0, rows 4, cache_row 2}
//           {block 5, slot 0, rows 1, cache_row 6}
class BlockPlan {
 public:
  // Throws std::invalid_argument "[kvpool::block_plan] ..." unless
  // block_tokens > 0, 0 <= start <= stop, stop - start <= capacity, and, for
  // a non-empty range, block_ids has the ceil(stop / block_tokens) entries
  // that positions up to stop index. The entries' values are not checked
  // (the kernels check them against the slab).
  BlockPlan(
      std::span<const int32_t> block_ids,
      int64_t block_tokens,
      int64_t start,
      int64_t stop,
      int64_t capacity);
  // No headroom: capacity = stop - start (a scatter).
  BlockPlan(
      std::span<const int32_t> block_ids,
      int64_t block_tokens,
      int64_t start,
      int64_t stop)
      : BlockPlan(block_ids, block_tokens, start, stop, stop - start) {}

  const std::vector<BlockRun>& runs() const {
    return runs_;
  }
  // stop - start: the rows the runs cover.
  int64_t length() const {
    return length_;
  }
  // capacity - length(): the zero rows after them.
  int64_t headroom() const {
    return capacity_ - length_;
  }

 private:
  std::vector<BlockRun> runs_; // sum of rows == length_
  int64_t length_;
  int64_t capacity_; // >= length_
};

// The block table entries that [start, stop) reads, and start rebased to the
// first of them (a multiple of block_tokens); nothing and 0 for an empty
// range. The kernels keep only these entries: positions start - base, stop -
// base through the result read what start, stop read through block_table.
// Expects block_tokens > 0 and a table that covers [start, stop).
std::pair<std::vector<int32_t>, int64_t> used_blocks(
    const std::vector<int32_t>& block_table,
    int64_t start,
    int64_t stop,
    int block_tokens);

// Jobs ----------------------------------------------------------------------

// A copy job writes `rows` rows of row_bytes() bytes each; slice(r, n) is the
// job of its rows [r, r + n).
template <typename Job>
concept RowJob = requires(const Job& job, int64_t r) {
  { job.rows } -> std::convertible_to<int64_t>;
  { job.row_bytes() } -> std::convertible_to<size_t>;
  { job.slice(r, r) } -> std::same_as<Job>;
};

template <RowJob Job>
size_t job_bytes(const Job& job) {
  return static_cast<size_t>(job.rows) * job.row_bytes();
}

// Appends job to jobs cut by rows, in row order, into pieces of at most
// max_bytes (at least one row each), so threads that take jobs from a shared
// counter end within one job of each other. A job without bytes adds nothing.
// (Job is deduced from jobs alone, so job may be a braced list.)
template <RowJob Job>
void add_job(
    std::vector<Job>& jobs,
    const std::type_identity_t<Job>& job,
    size_t max_bytes = detail::kMaxJobBytes) {
  size_t row_bytes = job.row_bytes();
  if (job.rows <= 0 || row_bytes == 0) {
    return;
  }
  int64_t rows_per_job =
      std::max<int64_t>(1, static_cast<int64_t>(max_bytes / row_bytes));
  for (int64_t r = 0; r < job.rows; r += rows_per_job) {
    jobs.push_back(job.slice(r, std::min(rows_per_job, job.rows - r)));
  }
}

// Runs run(job) once for every job, in any order (so jobs must not overlap),
// on up to detail::kMaxCopyThreads threads, the calling one included: one
// thread per detail::kMinBytesPerThread of output.
template <RowJob Job, typename Run>
void run_jobs(const std::vector<Job>& jobs, const Run& run) {
  size_t total = 0;
  for (const auto& job : jobs) {
    total += job_bytes(job);
  }
  detail::run_parallel(
      jobs.size(), total, [&jobs, &run](size_t i) { run(jobs[i]); });
}

} // namespace kvpool
