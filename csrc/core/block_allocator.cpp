// Block-table bookkeeping: see block_allocator.h for the contract.
//
// Free list order. allocate() pops from the head and free()/release() push
// at the tail, so the initial order is 0, 1, 2, ... and a freshly freed block
// is the last one to be handed out again. That keeps recently freed KV data
// intact for as long as possible (a later prefix-reuse pass can still claim
// it) and matches vLLM's FreeKVCacheBlockQueue. The list is intrusive (two
// int32 links per block plus a sentinel) rather than a deque: no allocation
// per push/pop, and a block can be unlinked from the middle in O(1).
#include "core/block_allocator.h"

#include <algorithm>
#include <string>

namespace kvpool {

namespace {

std::string prefix(const char* op) {
  return std::string("[kvpool::") + op + "] ";
}

// Marks block ids in a scratch bitmap for the duration of one call and clears
// them again on scope exit, also when the call throws, so the bitmap is all
// zero between calls. Only ids that were range-checked are ever marked.
class ScopedMarks {
 public:
  ScopedMarks(std::vector<uint8_t>& marked, const std::vector<int32_t>& ids)
      : marked_(marked), ids_(ids) {}
  ~ScopedMarks() {
    for (std::size_t i = 0; i < num_marked_; ++i) {
      marked_[ids_[i]] = 0;
    }
  }
  ScopedMarks(const ScopedMarks&) = delete;
  ScopedMarks& operator=(const ScopedMarks&) = delete;

  // Marks ids_[num_marked_]; returns false if it was marked already (a
  // duplicate). Must be called for ids_ in order.
  bool mark_next() {
    int32_t id = ids_[num_marked_++];
    bool fresh = marked_[id] == 0;
    marked_[id] = 1;
    return fresh;
  }

 private:
  std::vector<uint8_t>& marked_;
  const std::vector<int32_t>& ids_;
  std::size_t num_marked_ = 0;
};

} // namespace

BlockAllocator::BlockAllocator(int32_t num_blocks)
    : num_blocks_(num_blocks), num_free_(num_blocks) {
  if (num_blocks <= 0) {
    throw std::invalid_argument(
        prefix("BlockAllocator") + "num_blocks must be > 0, got " +
        std::to_string(num_blocks));
  }
  // A ring over num_blocks + 1 slots: sentinel -> 0 -> 1 -> ... -> sentinel.
  std::size_t num_slots = static_cast<std::size_t>(num_blocks) + 1;
  ref_cnt_.assign(num_blocks, 0);
  marked_.assign(num_blocks, 0);
  prev_.resize(num_slots);
  next_.resize(num_slots);
  for (std::size_t i = 0; i < num_slots; ++i) {
    next_[i] = static_cast<int32_t>((i + 1) % num_slots);
    prev_[i] = static_cast<int32_t>((i + num_slots - 1) % num_slots);
  }
}

int32_t BlockAllocator::num_blocks() const {
  return num_blocks_;
}

int32_t BlockAllocator::num_free() const {
  return num_free_;
}

int32_t BlockAllocator::num_used() const {
  return num_blocks_ - num_free_;
}

int32_t BlockAllocator::ref_cnt(int32_t block_id) const {
  check_range("ref_cnt", block_id);
  return ref_cnt_[block_id];
}

std::vector<int32_t> BlockAllocator::allocate(int64_t owner, int32_t n) {
  if (n < 0) {
    throw std::invalid_argument(
        prefix("allocate") + "n must be >= 0, got " + std::to_string(n));
  }
  if (n > num_free_) {
    throw PoolExhausted(
        prefix("allocate") + "need " + std::to_string(n) + " blocks, " +
        std::to_string(num_free_) + " free (pool of " +
        std::to_string(num_blocks_) + ")");
  }
  if (n == 0) {
    return {};
  }
  // Everything that can throw (the two allocations) happens before the free
  // list changes.
  std::vector<int32_t> block_ids;
  block_ids.reserve(n);
  std::vector<int32_t>& table = table_with_room(owner, n);
  for (int32_t i = 0; i < n; ++i) {
    int32_t b = pop_free_head();
    ref_cnt_[b] = 1;
    block_ids.push_back(b);
    table.push_back(b);
  }
  return block_ids;
}

void BlockAllocator::share(
    int64_t owner,
    const std::vector<int32_t>& block_ids) {
  ScopedMarks marks(marked_, block_ids);
  for (int32_t b : block_ids) {
    check_range("share", b);
    if (ref_cnt_[b] == 0) {
      throw std::invalid_argument(
          prefix("share") + "block " + std::to_string(b) +
          " is free; only blocks in use can be shared");
    }
    if (!marks.mark_next()) {
      throw std::invalid_argument(
          prefix("share") + "block " + std::to_string(b) +
          " appears more than once in block_ids");
    }
  }
  if (block_ids.empty()) {
    return;
  }
  auto it = owner_to_table_.find(owner);
  if (it != owner_to_table_.end()) {
    for (int32_t b : it->second) {
      if (marked_[b]) {
        throw std::invalid_argument(
            prefix("share") + "owner " + std::to_string(owner) +
            " already holds block " + std::to_string(b));
      }
    }
  }
  std::vector<int32_t>& table = table_with_room(owner, block_ids.size());
  for (int32_t b : block_ids) {
    ++ref_cnt_[b];
    table.push_back(b);
  }
}

void BlockAllocator::free(
    int64_t owner,
    const std::vector<int32_t>& block_ids) {
  ScopedMarks marks(marked_, block_ids);
  for (int32_t b : block_ids) {
    check_range("free", b);
    if (ref_cnt_[b] == 0) {
      throw std::invalid_argument(
          prefix("free") + "block " + std::to_string(b) +
          " is already free (double free)");
    }
    if (!marks.mark_next()) {
      throw std::invalid_argument(
          prefix("free") + "block " + std::to_string(b) +
          " appears more than once in block_ids");
    }
  }
  if (block_ids.empty()) {
    return;
  }
  // One pass over the table: it must hold every marked id (ids are distinct
  // and a table holds a block at most once, so counting is enough).
  auto it = owner_to_table_.find(owner);
  std::size_t num_held = 0;
  if (it != owner_to_table_.end()) {
    for (int32_t b : it->second) {
      num_held += marked_[b];
    }
  }
  if (num_held != block_ids.size()) {
    for (int32_t b : block_ids) {
      if (it == owner_to_table_.end() ||
          std::find(it->second.begin(), it->second.end(), b) ==
              it->second.end()) {
        throw std::invalid_argument(
            prefix("free") + "owner " + std::to_string(owner) +
            " does not hold block " + std::to_string(b));
      }
    }
  }
  // Validated; nothing below throws.
  std::vector<int32_t>& table = it->second;
  std::erase_if(table, [this](int32_t b) { return marked_[b] != 0; });
  for (int32_t b : block_ids) {
    if (--ref_cnt_[b] == 0) {
      push_free_tail(b);
    }
  }
  if (table.empty()) {
    owner_to_table_.erase(it);
  }
}

int32_t BlockAllocator::release(int64_t owner) {
  auto it = owner_to_table_.find(owner);
  if (it == owner_to_table_.end()) {
    return 0;
  }
  int32_t num_freed = 0;
  for (int32_t b : it->second) {
    if (--ref_cnt_[b] == 0) {
      push_free_tail(b);
      ++num_freed;
    }
  }
  owner_to_table_.erase(it);
  return num_freed;
}

std::vector<int32_t> BlockAllocator::table(int64_t owner) const {
  auto it = owner_to_table_.find(owner);
  if (it == owner_to_table_.end()) {
    return {};
  }
  return it->second;
}

bool BlockAllocator::has_owner(int64_t owner) const {
  return owner_to_table_.contains(owner);
}

int32_t BlockAllocator::num_owners() const {
  return static_cast<int32_t>(owner_to_table_.size());
}

void BlockAllocator::check_invariants() const {
  auto fail = [](const std::string& what) {
    throw std::logic_error(
        prefix("check_invariants") + what + "; this indicates a bug");
  };
  auto str = [](auto v) { return std::to_string(v); };
  const int32_t n = num_blocks_;
  const int32_t sentinel = n;
  std::size_t num_slots = static_cast<std::size_t>(n) + 1;
  if (ref_cnt_.size() != static_cast<std::size_t>(n) ||
      marked_.size() != static_cast<std::size_t>(n) ||
      prev_.size() != num_slots || next_.size() != num_slots) {
    fail("internal arrays do not match num_blocks " + str(n));
  }
  if (num_free_ < 0 || num_free_ > n) {
    fail("num_free " + str(num_free_) + " outside [0, " + str(n) + "]");
  }
  if (std::any_of(
          marked_.begin(), marked_.end(), [](uint8_t m) { return m != 0; })) {
    fail("scratch bitmap not cleared between calls");
  }

  // Walk the free list: links agree, every block on it has ref_cnt 0, it
  // ends at the sentinel after exactly num_free blocks.
  int32_t num_listed = 0;
  for (int32_t cur = sentinel;;) {
    int32_t nxt = next_[cur];
    if (nxt < 0 || nxt > n) {
      fail("free list link " + str(cur) + " -> " + str(nxt) + " out of range");
    }
    if (prev_[nxt] != cur) {
      fail(
          "free list links disagree: next[" + str(cur) + "] = " + str(nxt) +
          ", prev[" + str(nxt) + "] = " + str(prev_[nxt]));
    }
    if (nxt == sentinel) {
      break;
    }
    if (ref_cnt_[nxt] != 0) {
      fail(
          "block " + str(nxt) + " is on the free list with ref_cnt " +
          str(ref_cnt_[nxt]));
    }
    if (++num_listed > n) {
      fail("free list does not return to the sentinel (cycle)");
    }
    cur = nxt;
  }
  if (num_listed != num_free_) {
    fail(
        "free list holds " + str(num_listed) + " blocks, num_free is " +
        str(num_free_));
  }

  // Recount references from the tables.
  std::vector<int32_t> num_holders(n, 0);
  for (const auto& [owner, table] : owner_to_table_) {
    if (table.empty()) {
      fail("owner " + str(owner) + " has an empty table");
    }
    for (int32_t b : table) {
      if (b < 0 || b >= n) {
        fail(
            "owner " + str(owner) + " holds block id " + str(b) +
            " out of range");
      }
      ++num_holders[b];
    }
    std::vector<int32_t> sorted = table;
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
      fail("owner " + str(owner) + " holds a block more than once");
    }
  }
  int32_t num_zero = 0;
  for (int32_t b = 0; b < n; ++b) {
    if (ref_cnt_[b] != num_holders[b]) {
      fail(
          "block " + str(b) + " has ref_cnt " + str(ref_cnt_[b]) + " but " +
          str(num_holders[b]) + " tables hold it");
    }
    if (ref_cnt_[b] == 0) {
      ++num_zero;
      if (prev_[b] < 0 || next_[b] < 0) {
        fail("free block " + str(b) + " is not linked");
      }
    } else if (prev_[b] != -1 || next_[b] != -1) {
      fail("block " + str(b) + " is in use but still linked");
    }
  }
  // With the walk above (num_free distinct blocks, all with ref_cnt 0) this
  // makes "free <=> ref_cnt == 0 <=> on the free list" exact.
  if (num_zero != num_free_) {
    fail(
        str(num_zero) + " blocks have ref_cnt 0, num_free is " +
        str(num_free_));
  }
}

int32_t BlockAllocator::pop_free_head() {
  const int32_t sentinel = num_blocks_;
  int32_t b = next_[sentinel];
  int32_t after = next_[b];
  next_[sentinel] = after;
  prev_[after] = sentinel;
  prev_[b] = -1;
  next_[b] = -1;
  --num_free_;
  return b;
}

void BlockAllocator::push_free_tail(int32_t block_id) {
  const int32_t sentinel = num_blocks_;
  int32_t last = prev_[sentinel];
  next_[last] = block_id;
  prev_[block_id] = last;
  next_[block_id] = sentinel;
  prev_[sentinel] = block_id;
  ++num_free_;
}

void BlockAllocator::check_range(const char* op, int32_t block_id) const {
  if (block_id < 0 || block_id >= num_blocks_) {
    throw std::out_of_range(
        prefix(op) + "block id " + std::to_string(block_id) +
        " out of range [0, " + std::to_string(num_blocks_) + ")");
  }
}

std::vector<int32_t>& BlockAllocator::table_with_room(
    int64_t owner,
    std::size_t n) {
  auto [it, inserted] = owner_to_table_.try_emplace(owner);
  try {
    it->second.reserve(it->second.size() + n);
  } catch (...) {
    if (inserted) {
      owner_to_table_.erase(it);
    }
    throw;
  }
  return it->second;
}

} // namespace kvpool
