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
//
// "prefix" (ns per block, median over repetitions), the prefix-cache
// bookkeeping with full blocks of 256 tokens: one owner takes the whole pool,
// publishes every block as one chain (each block's parent is the previous
// block's key), looks every block up by key and tokens (all hits), asks
// best_child for every block's tokens under its parent, and releases all of
// them (every block becomes cached). The next repetition's allocate evicts
// them all again:
//   publish         publish(block, parent_key, tokens, key)
//   lookup          lookup(key, tokens), a hit (compares 256 tokens)
//   best_child      best_child(parent_key, tokens), one child per parent
//   allocate_evict  allocate(owner, num_blocks) of cached blocks
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

constexpr int32_t kBlockTokens = 256;
constexpr int kNumPrefixReps = 11;

// splitmix64: distinct, well-mixed keys.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

struct PrefixResult {
  int32_t num_blocks;
  std::vector<double> publish, lookup, best_child, allocate_evict;
};

PrefixResult run_prefix(int32_t num_blocks) {
  PrefixResult r{num_blocks, {}, {}, {}, {}};
  BlockAllocator a(num_blocks, kBlockTokens);
  std::vector<std::vector<int32_t>> tokens(num_blocks);
  for (int32_t b = 0; b < num_blocks; ++b) {
    for (int32_t i = 0; i < kBlockTokens; ++i) {
      tokens[b].push_back(b * kBlockTokens + i);
    }
  }
  std::vector<uint64_t> keys(num_blocks + 1);
  for (int rep = 0; rep < kNumPrefixReps; ++rep) {
    std::vector<int32_t> ids;
    {
      Timer t;
      ids = a.allocate(0, num_blocks);
      if (rep > 0) { // the first repetition takes never-used blocks
        r.allocate_evict.push_back(t.ns_per(num_blocks));
      }
    }
    keys[0] = 0; // root parent
    for (int32_t i = 0; i < num_blocks; ++i) {
      keys[i + 1] = mix(uint64_t(rep) * uint64_t(num_blocks) + uint64_t(i));
    }
    {
      Timer t;
      for (int32_t i = 0; i < num_blocks; ++i) {
        sink = sink + a.publish(ids[i], keys[i], tokens[i], keys[i + 1]);
      }
      r.publish.push_back(t.ns_per(num_blocks));
    }
    {
      Timer t;
      for (int32_t i = 0; i < num_blocks; ++i) {
        sink = sink + a.lookup(keys[i + 1], tokens[i]);
      }
      r.lookup.push_back(t.ns_per(num_blocks));
    }
    {
      Timer t;
      for (int32_t i = 0; i < num_blocks; ++i) {
        sink = sink + a.best_child(keys[i], tokens[i]).second;
      }
      r.best_child.push_back(t.ns_per(num_blocks));
    }
    if (a.lookup(keys[num_blocks], tokens[num_blocks - 1]) != ids.back() ||
        a.release(0) != num_blocks || a.num_cached() != num_blocks) {
      throw std::logic_error("prefix bench: publish or lookup failed");
    }
  }
  if (a.num_evictions() != int64_t{num_blocks} * (kNumPrefixReps - 1)) {
    throw std::logic_error("prefix bench: allocate did not evict every block");
  }
  a.check_invariants();
  return r;
}

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
  out += "\n], \"prefix\": {\"block_tokens\": " + std::to_string(kBlockTokens) +
      ", \"reps\": " + std::to_string(kNumPrefixReps) + ", \"results\": [";
  first = true;
  for (int32_t num_blocks : pool_sizes) {
    PrefixResult r = run_prefix(num_blocks);
    char buf[512];
    std::snprintf(
        buf,
        sizeof(buf),
        "%s\n  {\"num_blocks\": %d, \"publish\": %.2f, \"lookup\": %.2f, "
        "\"best_child\": %.2f, \"allocate_evict\": %.2f}",
        first ? "" : ",",
        r.num_blocks,
        median(r.publish),
        median(r.lookup),
        median(r.best_child),
        median(r.allocate_evict));
    out += buf;
    first = false;
  }
  out += "\n]}}\n";
  std::fputs(out.c_str(), stdout);
  return 0;
}
