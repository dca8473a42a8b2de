// Microbenchmark of kvpool::BlockAllocator: nanoseconds per block for each
// operation, at a few pool sizes and per-owner batch sizes. One repetition
// fills the whole pool with num_blocks / batch owners, shares every table with
// a second owner, then drops both references. Prints one JSON object.
//
// Keys (ns per block, median over repetitions):
//   allocate        allocate(owner, batch)
//   share           share(sharer, owner's table)
//   free_shared     free(...) of a reference that is not the last one
//   release_shared  release(...) of such references
//   free            free(...) of the last reference (block -> free list)
//   release         release(...) of the last references
// Even repetitions drop the shared references with free() and the last ones
// with release(); odd repetitions the other way round.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/block_allocator.h"

namespace {

using Clock = std::chrono::steady_clock;
using kvpool::BlockAllocator;

constexpr int kNumReps = 31;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Timer {
  Clock::time_point start = Clock::now();
  // Nanoseconds per block since construction.
  double ns_per(int64_t num_blocks) const {
    std::chrono::duration<double, std::nano> d = Clock::now() - start;
    return d.count() / static_cast<double>(num_blocks);
  }
};

struct Result {
  int32_t num_blocks;
  int32_t batch;
  std::vector<double> allocate, share, free_shared, release_shared, free,
      release;
};

volatile int64_t sink = 0; // keeps results observable

// Drops one reference per block of owners [first, first + num_owners).
void drop_all(
    BlockAllocator& a,
    const std::vector<std::vector<int32_t>>& tables,
    int64_t first,
    bool use_free) {
  for (std::size_t i = 0; i < tables.size(); ++i) {
    int64_t owner = first + static_cast<int64_t>(i);
    if (use_free) {
      a.free(owner, tables[i]);
    } else {
      sink = sink + a.release(owner);
    }
  }
}

Result run(int32_t num_blocks, int32_t batch) {
  Result r{num_blocks, batch, {}, {}, {}, {}, {}, {}};
  BlockAllocator a(num_blocks);
  const int32_t num_owners = num_blocks / batch;
  const int64_t num_ids = int64_t{num_owners} * batch;
  std::vector<std::vector<int32_t>> tables(num_owners);
  for (int rep = 0; rep < kNumReps; ++rep) {
    {
      Timer t;
      for (int32_t i = 0; i < num_owners; ++i) {
        tables[i] = a.allocate(i, batch);
      }
      r.allocate.push_back(t.ns_per(num_ids));
    }
    {
      Timer t;
      for (int32_t i = 0; i < num_owners; ++i) {
        a.share(num_owners + i, tables[i]);
      }
      r.share.push_back(t.ns_per(num_ids));
    }
    bool free_first = rep % 2 == 0;
    {
      Timer t;
      drop_all(a, tables, num_owners, free_first);
      (free_first ? r.free_shared : r.release_shared)
          .push_back(t.ns_per(num_ids));
    }
    {
      Timer t;
      drop_all(a, tables, 0, !free_first);
      (free_first ? r.release : r.free).push_back(t.ns_per(num_ids));
    }
    if (a.num_free() != num_blocks || a.num_owners() != 0) {
      throw std::logic_error("bench did not return every block");
    }
  }
  a.check_invariants();
  return r;
}

} // namespace

int main() {
  const int32_t pool_sizes[] = {256, 4096, 65536};
  const int32_t batches[] = {1, 32, 256};
  std::string out =
      "{\"bench\": \"block_allocator\", \"unit\": "
      "\"ns_per_block\", \"stat\": \"median\", \"reps\": " +
      std::to_string(kNumReps) + ", \"results\": [";
  bool first = true;
  for (int32_t num_blocks : pool_sizes) {
    for (int32_t batch : batches) {
      if (batch > num_blocks) {
        continue;
      }
      Result r = run(num_blocks, batch);
      char buf[512];
      std::snprintf(
          buf,
          sizeof(buf),
          "%s\n  {\"num_blocks\": %d, \"batch\": %d, \"allocate\": %.2f, "
          "\"share\": %.2f, \"free_shared\": %.2f, \"release_shared\": %.2f, "
          "\"free\": %.2f, \"release\": %.2f}",
          first ? "" : ",",
          r.num_blocks,
          r.batch,
          median(r.allocate),
          median(r.share),
          median(r.free_shared),
          median(r.release_shared),
          median(r.free),
          median(r.release));
      out += buf;
      first = false;
    }
  }
  out += "\n]}\n";
  std::fputs(out.c_str(), stdout);
  return 0;
}
