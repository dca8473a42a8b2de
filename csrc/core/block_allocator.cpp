// Block-table bookkeeping: see block_allocator.h for the contract.
//
// Free queue order. allocate() pops from the head. A block whose last
// reference goes is pushed at the head when it has no content (FREE: nothing
// worth keeping, hand it out first) and at the tail when it has content
// (CACHED: most recently used end). So the queue is always all FREE blocks
// followed by all CACHED ones, oldest first, and popping the head takes FREE
// blocks first and then evicts the least recently freed content, as vLLM's
// FreeKVCacheBlockQueue does. The queue is intrusive (two int32 links per
// block plus a sentinel) rather than a deque: no allocation per push/pop, and
// a CACHED block found by a lookup is unlinked from the middle in O(1)
// (share() of a CACHED block, vLLM's "touch").
//
// Prefix index. key_to_block_ maps a full block's key to its canonical block;
// parent_to_children_ lists every block with content under its parent_key,
// for best_child()'s token-granular match. Both lose a block's entries when
// its content is dropped (eviction by allocate(), or invalidate()).
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

BlockAllocator::BlockAllocator(int32_t num_blocks, int32_t block_tokens)
    : num_blocks_(num_blocks),
      block_tokens_(block_tokens),
      num_free_(num_blocks),
      num_cached_(0) {
  if (num_blocks <= 0) {
    throw std::invalid_argument(
        prefix("BlockAllocator") + "num_blocks must be > 0, got " +
        std::to_string(num_blocks));
  }
  if (block_tokens <= 0) {
    throw std::invalid_argument(
        prefix("BlockAllocator") + "block_tokens must be > 0, got " +
        std::to_string(block_tokens));
  }
  // A ring over num_blocks + 1 slots: sentinel -> 0 -> 1 -> ... -> sentinel.
  std::size_t num_slots = static_cast<std::size_t>(num_blocks) + 1;
  ref_cnt_.assign(num_blocks, 0);
  marked_.assign(num_blocks, 0);
  tokens_.resize(num_blocks);
  parent_key_.assign(num_blocks, 0);
  key_.assign(num_blocks, 0);
  has_key_.assign(num_blocks, 0);
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

int32_t BlockAllocator::block_tokens() const {
  return block_tokens_;
}

int32_t BlockAllocator::num_free() const {
  return num_free_;
}

int32_t BlockAllocator::num_used() const {
  return num_blocks_ - num_free_;
}

int32_t BlockAllocator::num_cached() const {
  return num_cached_;
}

int64_t BlockAllocator::num_evictions() const {
  return num_evictions_;
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
  // queue changes.
  std::vector<int32_t> block_ids;
  block_ids.reserve(n);
  std::vector<int32_t>& table = table_with_room(owner, n);
  for (int32_t i = 0; i < n; ++i) {
    int32_t b = pop_free_head();
    if (!tokens_[b].empty()) {
      drop_content(b);
      --num_cached_;
      ++num_evictions_;
    }
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
    if (ref_cnt_[b] == 0 && tokens_[b].empty()) {
      throw std::invalid_argument(
          prefix("share") + "block " + std::to_string(b) +
          " is free; only held or cached blocks can be shared");
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
    if (ref_cnt_[b]++ == 0) { // CACHED -> HELD: revive, content kept
      unlink_free(b);
      --num_cached_;
    }
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
      enqueue_released(b);
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
      enqueue_released(b);
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

int32_t BlockAllocator::publish(
    int32_t block_id,
    uint64_t parent_key,
    const std::vector<int32_t>& tokens,
    std::optional<uint64_t> key) {
  check_range("publish", block_id);
  const int32_t b = block_id;
  const std::string block = "block " + std::to_string(b);
  if (ref_cnt_[b] == 0) {
    throw std::invalid_argument(
        prefix("publish") + block + " is not held (ref_cnt 0" +
        (tokens_[b].empty() ? "" : ", cached") +
        "); only a held block can be published");
  }
  if (!tokens_[b].empty()) {
    throw std::invalid_argument(
        prefix("publish") + block + " already has content (" +
        std::to_string(tokens_[b].size()) + " tokens under parent_key " +
        std::to_string(parent_key_[b]) + "); invalidate it first");
  }
  const std::size_t num_tokens = tokens.size();
  const auto full = static_cast<std::size_t>(block_tokens_);
  if (num_tokens == 0 || num_tokens > full) {
    throw std::invalid_argument(
        prefix("publish") + block + ": tokens must hold 1 to " +
        std::to_string(block_tokens_) + " ids, got " +
        std::to_string(num_tokens));
  }
  if (key.has_value() && num_tokens != full) {
    throw std::invalid_argument(
        prefix("publish") + block + ": key given for a partial block (" +
        std::to_string(num_tokens) + " of " + std::to_string(block_tokens_) +
        " tokens); only full blocks have a key");
  }
  if (!key.has_value() && num_tokens == full) {
    throw std::invalid_argument(
        prefix("publish") + block + ": key missing for a full block (" +
        std::to_string(num_tokens) + " tokens)");
  }
  // Validated. The allocations come first, each undone if a later one
  // throws; the rest does not throw.
  tokens_[b].reserve(num_tokens);
  auto [kids, new_list] = parent_to_children_.try_emplace(parent_key);
  int32_t canonical = b;
  try {
    kids->second.reserve(kids->second.size() + 1);
    if (key.has_value()) {
      canonical = key_to_block_.try_emplace(*key, b).first->second;
    }
  } catch (...) {
    if (new_list) {
      parent_to_children_.erase(kids);
    }
    throw;
  }
  kids->second.push_back(b);
  tokens_[b].assign(tokens.begin(), tokens.end());
  parent_key_[b] = parent_key;
  key_[b] = key.value_or(0);
  has_key_[b] = key.has_value();
  return canonical;
}

int32_t BlockAllocator::lookup(uint64_t key, const std::vector<int32_t>& tokens)
    const {
  auto it = key_to_block_.find(key);
  if (it == key_to_block_.end() || tokens_[it->second] != tokens) {
    return -1;
  }
  return it->second;
}

std::pair<int32_t, int32_t> BlockAllocator::best_child(
    uint64_t parent_key,
    const std::vector<int32_t>& tokens) const {
  std::pair<int32_t, int32_t> best{-1, 0};
  auto it = parent_to_children_.find(parent_key);
  if (it == parent_to_children_.end()) {
    return best;
  }
  for (int32_t b : it->second) {
    const std::vector<int32_t>& stored = tokens_[b];
    std::size_t len = std::min(stored.size(), tokens.size());
    auto common = static_cast<int32_t>(
        std::mismatch(stored.begin(), stored.begin() + len, tokens.begin())
            .first -
        stored.begin());
    if (common > best.second ||
        (common > 0 && common == best.second && b < best.first)) {
      best = {b, common};
    }
  }
  return best;
}

std::vector<int32_t> BlockAllocator::content_tokens(int32_t block_id) const {
  check_range("content_tokens", block_id);
  return tokens_[block_id];
}

bool BlockAllocator::has_content(int32_t block_id) const {
  check_range("has_content", block_id);
  return !tokens_[block_id].empty();
}

std::optional<uint64_t> BlockAllocator::key_of(int32_t block_id) const {
  check_range("key_of", block_id);
  if (!has_key_[block_id]) {
    return std::nullopt;
  }
  return key_[block_id];
}

std::optional<uint64_t> BlockAllocator::parent_key_of(int32_t block_id) const {
  check_range("parent_key_of", block_id);
  if (tokens_[block_id].empty()) {
    return std::nullopt;
  }
  return parent_key_[block_id];
}

void BlockAllocator::invalidate(int32_t block_id) {
  check_range("invalidate", block_id);
  const int32_t b = block_id;
  if (tokens_[b].empty()) {
    return;
  }
  drop_content(b);
  if (ref_cnt_[b] == 0) { // CACHED -> FREE
    unlink_free(b);
    push_free_head(b);
    --num_cached_;
  }
}

int32_t BlockAllocator::num_free_tail() const {
  int32_t n = 0;
  while (n < num_blocks_ && ref_cnt_[num_blocks_ - 1 - n] == 0) {
    ++n;
  }
  return n;
}

void BlockAllocator::resize(int32_t new_num_blocks) {
  if (new_num_blocks <= 0) {
    throw std::invalid_argument(
        prefix("resize") + "num_blocks must be > 0, got " +
        std::to_string(new_num_blocks));
  }
  const int32_t old_n = num_blocks_;
  const int32_t new_n = new_num_blocks;
  for (int32_t b = new_n; b < old_n; ++b) {
    if (ref_cnt_[b] != 0) {
      throw std::invalid_argument(
          prefix("resize") + "cannot shrink to " + std::to_string(new_n) +
          " blocks: block " + std::to_string(b) + " is held");
    }
  }
  // Everything that can throw (allocations) happens before any state changes.
  std::vector<int32_t> queue;
  queue.reserve(
      static_cast<std::size_t>(num_free_) + std::max(0, new_n - old_n));
  for (int32_t b = old_n; b < new_n; ++b) {
    queue.push_back(b); // grown blocks: FREE, at the head, lowest id first
  }
  for (int32_t b = next_[old_n]; b != old_n; b = next_[b]) {
    if (b < new_n) {
      queue.push_back(b);
    }
  }
  const std::size_t num_slots = static_cast<std::size_t>(new_n) + 1;
  std::vector<int32_t> prev(num_slots, -1);
  std::vector<int32_t> next(num_slots, -1);
  const auto size = static_cast<std::size_t>(new_n);
  ref_cnt_.reserve(size);
  marked_.reserve(size);
  tokens_.reserve(size);
  parent_key_.reserve(size);
  key_.reserve(size);
  has_key_.reserve(size);
  // No allocation below: the vectors have room, erase and clear don't allocate.
  for (int32_t b = new_n; b < old_n; ++b) {
    if (!tokens_[b].empty()) {
      drop_content(b);
      --num_cached_;
      ++num_evictions_;
    }
  }
  ref_cnt_.resize(size, 0);
  marked_.resize(size, 0);
  tokens_.resize(size);
  parent_key_.resize(size, 0);
  key_.resize(size, 0);
  has_key_.resize(size, 0);
  int32_t last = new_n; // the sentinel
  for (int32_t b : queue) {
    next[last] = b;
    prev[b] = last;
    last = b;
  }
  next[last] = new_n;
  prev[new_n] = last;
  prev_.swap(prev);
  next_.swap(next);
  num_blocks_ = new_n;
  num_free_ = static_cast<int32_t>(queue.size());
}

void BlockAllocator::relocate(int32_t from, int32_t to) {
  check_range("relocate", from);
  check_range("relocate", to);
  if (ref_cnt_[from] == 0) {
    throw std::invalid_argument(
        prefix("relocate") + "block " + std::to_string(from) +
        " is not held: only a held block is moved");
  }
  if (ref_cnt_[to] != 0) {
    throw std::invalid_argument(
        prefix("relocate") + "block " + std::to_string(to) +
        " is held: a block moves to a free or cached one");
  }
  // No allocation below: ids are swapped in place, the index entry and the
  // child list entry are overwritten, token vectors are swapped.
  if (!tokens_[to].empty()) { // CACHED: its content goes
    drop_content(to);
    --num_cached_;
    ++num_evictions_;
  }
  unlink_free(to);
  for (auto& [owner, table] : owner_to_table_) {
    std::replace(table.begin(), table.end(), from, to);
  }
  ref_cnt_[to] = ref_cnt_[from];
  ref_cnt_[from] = 0;
  if (!tokens_[from].empty()) {
    tokens_[to].swap(tokens_[from]);
    parent_key_[to] = parent_key_[from];
    key_[to] = key_[from];
    has_key_[to] = has_key_[from];
    if (has_key_[to]) {
      auto it = key_to_block_.find(key_[to]);
      if (it != key_to_block_.end() && it->second == from) {
        it->second = to;
      }
    }
    auto& kids = parent_to_children_.find(parent_key_[to])->second;
    std::replace(kids.begin(), kids.end(), from, to);
    parent_key_[from] = 0;
    key_[from] = 0;
    has_key_[from] = 0;
  }
  push_free_head(from);
}

std::vector<int32_t> BlockAllocator::free_queue() const {
  std::vector<int32_t> out;
  out.reserve(num_free_);
  for (int32_t b = next_[num_blocks_]; b != num_blocks_; b = next_[b]) {
    out.push_back(b);
  }
  return out;
}

void BlockAllocator::check_invariants() const {
  auto fail = [](const std::string& what) {
    throw std::logic_error(
        prefix("check_invariants") + what + "; this indicates a bug");
  };
  auto str = [](auto v) { return std::to_string(v); };
  const int32_t n = num_blocks_;
  const int32_t sentinel = n;
  const auto un = static_cast<std::size_t>(n);
  std::size_t num_slots = un + 1;
  if (ref_cnt_.size() != un || marked_.size() != un || tokens_.size() != un ||
      parent_key_.size() != un || key_.size() != un || has_key_.size() != un ||
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

  // Walk the free queue: links agree, every block on it has ref_cnt 0, FREE
  // blocks all come before CACHED ones, it ends at the sentinel after exactly
  // num_free blocks of which num_cached have content.
  int32_t num_listed = 0;
  int32_t num_listed_cached = 0;
  for (int32_t cur = sentinel;;) {
    int32_t nxt = next_[cur];
    if (nxt < 0 || nxt > n) {
      fail("free queue link " + str(cur) + " -> " + str(nxt) + " out of range");
    }
    if (prev_[nxt] != cur) {
      fail(
          "free queue links disagree: next[" + str(cur) + "] = " + str(nxt) +
          ", prev[" + str(nxt) + "] = " + str(prev_[nxt]));
    }
    if (nxt == sentinel) {
      break;
    }
    if (ref_cnt_[nxt] != 0) {
      fail(
          "block " + str(nxt) + " is on the free queue with ref_cnt " +
          str(ref_cnt_[nxt]));
    }
    if (!tokens_[nxt].empty()) {
      ++num_listed_cached;
    } else if (num_listed_cached > 0) {
      fail("free block " + str(nxt) + " is queued behind a cached block");
    }
    if (++num_listed > n) {
      fail("free queue does not return to the sentinel (cycle)");
    }
    cur = nxt;
  }
  if (num_listed != num_free_) {
    fail(
        "free queue holds " + str(num_listed) + " blocks, num_free is " +
        str(num_free_));
  }
  if (num_listed_cached != num_cached_) {
    fail(
        "free queue holds " + str(num_listed_cached) +
        " cached blocks, num_cached is " + str(num_cached_));
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
  // Per block: references, queue links, content fields.
  int32_t num_zero = 0;
  std::size_t num_with_content = 0;
  for (int32_t b = 0; b < n; ++b) {
    if (ref_cnt_[b] != num_holders[b]) {
      fail(
          "block " + str(b) + " has ref_cnt " + str(ref_cnt_[b]) + " but " +
          str(num_holders[b]) + " tables hold it");
    }
    if (ref_cnt_[b] == 0) {
      ++num_zero;
      if (prev_[b] < 0 || next_[b] < 0) {
        fail("block " + str(b) + " has ref_cnt 0 but is not queued");
      }
    } else if (prev_[b] != -1 || next_[b] != -1) {
      fail("block " + str(b) + " is held but still queued");
    }
    const std::size_t len = tokens_[b].size();
    if (len > static_cast<std::size_t>(block_tokens_)) {
      fail("block " + str(b) + " holds " + str(len) + " tokens");
    }
    if (len == 0 && (has_key_[b] || key_[b] != 0 || parent_key_[b] != 0)) {
      fail("block " + str(b) + " has no content but a key or parent_key");
    }
    if (len > 0 &&
        (has_key_[b] != 0) !=
            (len == static_cast<std::size_t>(block_tokens_))) {
      fail(
          "block " + str(b) + " with " + str(len) + " tokens has_key " +
          str(int{has_key_[b]}));
    }
    if (!has_key_[b] && key_[b] != 0) {
      fail("block " + str(b) + " has no key but key_ " + str(key_[b]));
    }
    num_with_content += len > 0;
  }
  // With the walk above (num_free distinct blocks, all with ref_cnt 0) this
  // makes "ref_cnt 0 <=> on the free queue" exact, hence one state per block.
  if (num_zero != num_free_) {
    fail(
        str(num_zero) + " blocks have ref_cnt 0, num_free is " +
        str(num_free_));
  }

  // The key index points only at blocks with content under that key (a
  // block is canonical for its own key only, so at most once).
  for (const auto& [key, b] : key_to_block_) {
    if (b < 0 || b >= n) {
      fail("key " + str(key) + " maps to block id " + str(b) + " out of range");
    }
    if (!has_key_[b] || key_[b] != key) {
      fail(
          "key " + str(key) + " maps to block " + str(b) +
          (has_key_[b] ? " whose key is " + str(key_[b]) : " without a key"));
    }
  }
  // Every block with content is its parent's child exactly once: each listed
  // block has content under that parent, is listed once, and the lists hold
  // as many entries as there are blocks with content.
  std::vector<uint8_t> listed(n, 0);
  std::size_t num_children = 0;
  for (const auto& [parent, kids] : parent_to_children_) {
    if (kids.empty()) {
      fail("parent_key " + str(parent) + " has an empty child list");
    }
    for (int32_t b : kids) {
      if (b < 0 || b >= n) {
        fail(
            "parent_key " + str(parent) + " lists block id " + str(b) +
            " out of range");
      }
      if (tokens_[b].empty() || parent_key_[b] != parent) {
        fail(
            "parent_key " + str(parent) + " lists block " + str(b) +
            (tokens_[b].empty()
                 ? " without content"
                 : " whose parent_key is " + str(parent_key_[b])));
      }
      if (listed[b]++) {
        fail("block " + str(b) + " is listed as a child more than once");
      }
      ++num_children;
    }
  }
  if (num_children != num_with_content) {
    fail(
        str(num_with_content) + " blocks have content, " + str(num_children) +
        " are listed as children");
  }
}

int32_t BlockAllocator::pop_free_head() {
  int32_t b = next_[num_blocks_];
  unlink_free(b);
  return b;
}

void BlockAllocator::push_free_head(int32_t block_id) {
  const int32_t sentinel = num_blocks_;
  int32_t first = next_[sentinel];
  prev_[first] = block_id;
  next_[block_id] = first;
  prev_[block_id] = sentinel;
  next_[sentinel] = block_id;
  ++num_free_;
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

void BlockAllocator::unlink_free(int32_t block_id) {
  int32_t before = prev_[block_id];
  int32_t after = next_[block_id];
  next_[before] = after;
  prev_[after] = before;
  prev_[block_id] = -1;
  next_[block_id] = -1;
  --num_free_;
}

void BlockAllocator::enqueue_released(int32_t block_id) {
  if (tokens_[block_id].empty()) {
    push_free_head(block_id);
  } else {
    push_free_tail(block_id);
    ++num_cached_;
  }
}

void BlockAllocator::drop_content(int32_t block_id) {
  const int32_t b = block_id;
  if (has_key_[b]) {
    auto it = key_to_block_.find(key_[b]);
    if (it != key_to_block_.end() && it->second == b) {
      key_to_block_.erase(it);
    }
  }
  auto kids = parent_to_children_.find(parent_key_[b]);
  std::erase(kids->second, b);
  if (kids->second.empty()) {
    parent_to_children_.erase(kids);
  }
  tokens_[b].clear(); // keeps the capacity for the next publish
  parent_key_[b] = 0;
  key_[b] = 0;
  has_key_[b] = 0;
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
