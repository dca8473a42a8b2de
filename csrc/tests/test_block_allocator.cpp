// Tests of kvpool::BlockAllocator (csrc/core/block_allocator.h). No test
// framework: CHECK* macros count passes and failures, main() returns non-zero
// if anything failed. Expected states are drawn in comments as
//   queue: <free queue, head first; C marks a cached block>
//   ref: <ref_cnt of block 0, 1, ...>
#include <algorithm>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <exception>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "core/block_allocator.h"

namespace kvpool {

// Friend of BlockAllocator (see the header): reads and corrupts private state.
struct BlockAllocatorTestPeer {
  static std::vector<int32_t>& ref_cnt(BlockAllocator& a) {
    return a.ref_cnt_;
  }
  static std::vector<int32_t>& next(BlockAllocator& a) {
    return a.next_;
  }
  static int32_t& num_free(BlockAllocator& a) {
    return a.num_free_;
  }
  static int32_t& num_cached(BlockAllocator& a) {
    return a.num_cached_;
  }
  static std::vector<uint8_t>& marked(BlockAllocator& a) {
    return a.marked_;
  }
  static auto& owner_to_table(BlockAllocator& a) {
    return a.owner_to_table_;
  }
  static const auto& owner_to_table(const BlockAllocator& a) {
    return a.owner_to_table_;
  }
  static std::vector<std::vector<int32_t>>& tokens(BlockAllocator& a) {
    return a.tokens_;
  }
  static std::vector<uint8_t>& has_key(BlockAllocator& a) {
    return a.has_key_;
  }
  static auto& key_to_block(BlockAllocator& a) {
    return a.key_to_block_;
  }
  static const auto& key_to_block(const BlockAllocator& a) {
    return a.key_to_block_;
  }
  static auto& parent_to_children(BlockAllocator& a) {
    return a.parent_to_children_;
  }
  static const auto& parent_to_children(const BlockAllocator& a) {
    return a.parent_to_children_;
  }
};

} // namespace kvpool

namespace {

using kvpool::BlockAllocator;
using kvpool::PoolExhausted;
using Peer = kvpool::BlockAllocatorTestPeer;
using Ids = std::vector<int32_t>;
using Key = std::optional<uint64_t>;
using Child = std::pair<int32_t, int32_t>;
constexpr Key kNoKey = std::nullopt;

int num_passed = 0;
int num_failed = 0;

template <std::integral T>
std::string show(T v) {
  return std::to_string(v);
}

std::string show(const Ids& v) {
  std::ostringstream os;
  os << "[";
  for (std::size_t i = 0; i < v.size(); ++i) {
    os << (i ? ", " : "") << v[i];
  }
  os << "]";
  return os.str();
}

std::string show(const Key& k) {
  return k ? std::to_string(*k) : "nullopt";
}

std::string show(const Child& c) {
  return "(" + std::to_string(c.first) + ", " + std::to_string(c.second) + ")";
}

void record(bool ok, const char* file, int line, const std::string& what) {
  if (ok) {
    ++num_passed;
  } else {
    ++num_failed;
    std::fprintf(stderr, "%s:%d: FAILED %s\n", file, line, what.c_str());
  }
}

#define CHECK(cond) record((cond), __FILE__, __LINE__, "CHECK(" #cond ")")

#define CHECK_EQ(a, b)                                                  \
  do {                                                                  \
    auto va_ = (a);                                                     \
    auto vb_ = (b);                                                     \
    record(                                                             \
        va_ == vb_,                                                     \
        __FILE__,                                                       \
        __LINE__,                                                       \
        "CHECK_EQ(" #a ", " #b "): " + show(va_) + " != " + show(vb_)); \
  } while (0)

// expr must throw exactly ExType (not a subclass) with a message containing
// substr.
#define CHECK_THROWS(ExType, expr, substr)                                 \
  do {                                                                     \
    std::string got_ = "no exception";                                     \
    bool ok_ = false;                                                      \
    try {                                                                  \
      (void)(expr);                                                        \
    } catch (const ExType& e) {                                            \
      got_ = std::string(typeid(e).name()) + ": " + e.what();              \
      ok_ = typeid(e) == typeid(ExType) &&                                 \
          std::string(e.what()).find(substr) != std::string::npos;         \
    } catch (const std::exception& e) {                                    \
      got_ = std::string(typeid(e).name()) + ": " + e.what();              \
    }                                                                      \
    record(                                                                \
        ok_,                                                               \
        __FILE__,                                                          \
        __LINE__,                                                          \
        "CHECK_THROWS(" #ExType ", " #expr ", " #substr "), got " + got_); \
  } while (0)

// check_invariants() must pass.
#define CHECK_OK(a)                                                        \
  do {                                                                     \
    std::string err_;                                                      \
    try {                                                                  \
      (a).check_invariants();                                              \
    } catch (const std::exception& e) {                                    \
      err_ = e.what();                                                     \
    }                                                                      \
    record(err_.empty(), __FILE__, __LINE__, "check_invariants: " + err_); \
  } while (0)

Ids ref_cnts(const BlockAllocator& a) {
  Ids out;
  for (int32_t b = 0; b < a.num_blocks(); ++b) {
    out.push_back(a.ref_cnt(b));
  }
  return out;
}

// n ids starting at first: iota(3, 2) == [2, 3, 4].
Ids iota(int32_t n, int32_t first = 0) {
  Ids out;
  for (int32_t i = 0; i < n; ++i) {
    out.push_back(first + i);
  }
  return out;
}

struct Content {
  uint64_t parent_key = 0;
  Ids tokens;
  Key key;
  bool operator==(const Content&) const = default;
};

// Everything observable (plus the index maps), for "a call that throws
// changes nothing" and for the comparison with the model.
struct Snapshot {
  Ids free_queue;
  Ids ref_cnt;
  std::map<int64_t, Ids> tables;
  int32_t num_free;
  int32_t num_owners;
  int32_t num_cached;
  int64_t num_evictions;
  std::vector<std::optional<Content>> content;
  std::map<uint64_t, int32_t> key_to_block;
  std::map<uint64_t, std::set<int32_t>> parent_to_children;
  bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot(const BlockAllocator& a) {
  Snapshot s{
      a.free_queue(),
      ref_cnts(a),
      {},
      a.num_free(),
      a.num_owners(),
      a.num_cached(),
      a.num_evictions(),
      {},
      {},
      {}};
  for (const auto& [owner, table] : Peer::owner_to_table(a)) {
    s.tables[owner] = table;
  }
  for (int32_t b = 0; b < a.num_blocks(); ++b) {
    if (a.has_content(b)) {
      s.content.push_back(
          Content{*a.parent_key_of(b), a.content_tokens(b), a.key_of(b)});
    } else {
      s.content.push_back(std::nullopt);
    }
  }
  for (const auto& [key, b] : Peer::key_to_block(a)) {
    s.key_to_block[key] = b;
  }
  for (const auto& [parent, kids] : Peer::parent_to_children(a)) {
    s.parent_to_children[parent].insert(kids.begin(), kids.end());
  }
  return s;
}

#define CHECK_UNCHANGED(a, before) \
  record(snapshot(a) == (before), __FILE__, __LINE__, "state changed")

// ---------------------------------------------------------------------------
// Allocation, sharing, freeing (blocks without content).

void test_constructor() {
  CHECK_THROWS(
      std::invalid_argument,
      BlockAllocator(0),
      "[kvpool::BlockAllocator] num_blocks must be > 0, got 0");
  CHECK_THROWS(std::invalid_argument, BlockAllocator(-3), "got -3");
  CHECK_THROWS(
      std::invalid_argument,
      BlockAllocator(4, 0),
      "[kvpool::BlockAllocator] block_tokens must be > 0, got 0");

  BlockAllocator a(5);
  // queue: 0 1 2 3 4   ref: 0 0 0 0 0
  CHECK_EQ(a.num_blocks(), 5);
  CHECK_EQ(a.block_tokens(), 256);
  CHECK_EQ(a.num_free(), 5);
  CHECK_EQ(a.num_used(), 0);
  CHECK_EQ(a.num_cached(), 0);
  CHECK_EQ(a.num_evictions(), int64_t{0});
  CHECK_EQ(a.num_owners(), 0);
  CHECK_EQ(a.free_queue(), (Ids{0, 1, 2, 3, 4}));
  CHECK_EQ(ref_cnts(a), (Ids{0, 0, 0, 0, 0}));
  CHECK_OK(a);
  CHECK_EQ(BlockAllocator(3, 16).block_tokens(), 16);

  BlockAllocator one(1);
  CHECK_EQ(one.free_queue(), (Ids{0}));
  CHECK_EQ(one.allocate(1, 1), (Ids{0}));
  CHECK_EQ(one.free_queue(), (Ids{}));
  CHECK_OK(one);
}

void test_allocate_takes_from_head() {
  BlockAllocator a(8);
  CHECK_EQ(a.allocate(1, 3), (Ids{0, 1, 2}));
  CHECK_OK(a);
  // queue: 3 4 5 6 7   ref: 1 1 1 0 0 0 0 0
  CHECK_EQ(a.free_queue(), (Ids{3, 4, 5, 6, 7}));
  CHECK_EQ(ref_cnts(a), (Ids{1, 1, 1, 0, 0, 0, 0, 0}));
  CHECK_EQ(a.allocate(2, 2), (Ids{3, 4}));
  CHECK_OK(a);
  // More blocks for an existing owner are appended to its table.
  CHECK_EQ(a.allocate(1, 1), (Ids{5}));
  CHECK_OK(a);
  // queue: 6 7   tables: 1 -> [0 1 2 5], 2 -> [3 4]
  CHECK_EQ(a.free_queue(), (Ids{6, 7}));
  CHECK_EQ(a.table(1), (Ids{0, 1, 2, 5}));
  CHECK_EQ(a.table(2), (Ids{3, 4}));
  CHECK_EQ(a.num_free(), 2);
  CHECK_EQ(a.num_used(), 6);
  CHECK_EQ(a.num_owners(), 2);
  CHECK(a.has_owner(1));
  CHECK(a.has_owner(2));
  CHECK(!a.has_owner(3));
  CHECK_EQ(a.table(3), (Ids{}));
}

void test_allocate_zero_and_negative() {
  BlockAllocator a(4);
  CHECK_EQ(a.allocate(1, 0), (Ids{}));
  CHECK(!a.has_owner(1)); // n == 0 registers nothing
  CHECK_EQ(a.num_owners(), 0);
  CHECK_OK(a);
  Snapshot before = snapshot(a);
  CHECK_THROWS(
      std::invalid_argument,
      a.allocate(1, -1),
      "[kvpool::allocate] n must be >= 0, got -1");
  CHECK_UNCHANGED(a, before);
  CHECK_OK(a);
}

void test_exhaustion_is_all_or_nothing() {
  BlockAllocator a(64);
  a.allocate(1, 61);
  CHECK_OK(a);
  // queue: 61 62 63
  Snapshot before = snapshot(a);
  CHECK_THROWS(
      PoolExhausted,
      a.allocate(2, 12),
      "[kvpool::allocate] need 12 blocks, 3 free (pool of 64)");
  CHECK_UNCHANGED(a, before);
  CHECK(!a.has_owner(2));
  CHECK_OK(a);
  // An existing owner is not touched either.
  CHECK_THROWS(PoolExhausted, a.allocate(1, 4), "need 4 blocks, 3 free");
  CHECK_UNCHANGED(a, before);
  // Exactly what is left succeeds; then the pool is empty.
  CHECK_EQ(a.allocate(2, 3), (Ids{61, 62, 63}));
  CHECK_EQ(a.num_free(), 0);
  CHECK_EQ(a.free_queue(), (Ids{}));
  CHECK_THROWS(
      PoolExhausted, a.allocate(3, 1), "need 1 blocks, 0 free (pool of 64)");
  CHECK_EQ(a.allocate(3, 0), (Ids{})); // n == 0 is fine on an empty pool
  CHECK_OK(a);
}

void test_free_without_content_goes_to_head() {
  BlockAllocator a(6);
  CHECK_EQ(a.allocate(1, 4), (Ids{0, 1, 2, 3}));
  // queue: 4 5
  a.free(1, {2, 0});
  CHECK_OK(a);
  // Each block is pushed at the head in argument order (2, then 0):
  // queue: 0 2 4 5   ref: 0 1 0 1 0 0   table 1: [1 3]
  CHECK_EQ(a.free_queue(), (Ids{0, 2, 4, 5}));
  CHECK_EQ(ref_cnts(a), (Ids{0, 1, 0, 1, 0, 0}));
  CHECK_EQ(a.table(1), (Ids{1, 3}));
  CHECK_EQ(a.num_free(), 4);
  CHECK_EQ(a.num_cached(), 0);
  // So blocks without content are reused first, most recently freed first.
  CHECK_EQ(a.allocate(2, 3), (Ids{0, 2, 4}));
  CHECK_OK(a);
  // queue: 5
  CHECK_EQ(a.free_queue(), (Ids{5}));
  CHECK_EQ(a.num_evictions(), int64_t{0});
}

void test_free_keeps_table_order_and_forgets_empty_owner() {
  BlockAllocator a(6);
  a.allocate(7, 4); // table 7: [0 1 2 3]
  a.free(7, {1});
  CHECK_OK(a);
  CHECK_EQ(a.table(7), (Ids{0, 2, 3}));
  a.free(7, {3, 0});
  CHECK_EQ(a.table(7), (Ids{2}));
  CHECK(a.has_owner(7));
  a.free(7, {2});
  CHECK_OK(a);
  // The table emptied: the owner is gone.
  CHECK(!a.has_owner(7));
  CHECK_EQ(a.num_owners(), 0);
  // queue: 2 0 3 1 4 5
  CHECK_EQ(a.free_queue(), (Ids{2, 0, 3, 1, 4, 5}));
  // Freeing nothing is a no-op, also for an unknown owner.
  Snapshot before = snapshot(a);
  a.free(7, {});
  a.free(99, {});
  CHECK_UNCHANGED(a, before);
  CHECK_OK(a);
}

void test_free_errors() {
  BlockAllocator a(64);
  a.allocate(7, 3); // [0 1 2]
  a.allocate(8, 2); // [3 4]
  Snapshot before = snapshot(a);

  CHECK_THROWS(
      std::out_of_range,
      a.free(7, {99}),
      "[kvpool::free] block id 99 out of range [0, 64)");
  CHECK_THROWS(
      std::out_of_range, a.free(7, {-1}), "block id -1 out of range [0, 64)");
  CHECK_THROWS(
      std::invalid_argument,
      a.free(7, {10}),
      "[kvpool::free] block 10 is already free (double free)");
  CHECK_THROWS(
      std::invalid_argument,
      a.free(7, {3}),
      "[kvpool::free] owner 7 does not hold block 3");
  CHECK_THROWS(
      std::invalid_argument,
      a.free(9, {3}),
      "owner 9 does not hold block 3"); // unknown owner
  CHECK_THROWS(
      std::invalid_argument,
      a.free(7, {1, 1}),
      "[kvpool::free] block 1 appears more than once in block_ids");
  // A bad id late in the list: the valid ones before it are not freed.
  CHECK_THROWS(std::out_of_range, a.free(7, {0, 1, 64}), "block id 64");
  CHECK_THROWS(
      std::invalid_argument,
      a.free(7, {0, 2, 3}),
      "owner 7 does not hold block 3");
  CHECK_THROWS(
      std::invalid_argument,
      a.free(7, {0, 2, 0}),
      "block 0 appears more than once");
  CHECK_UNCHANGED(a, before);
  CHECK_OK(a);

  // A real double free: the second call fails and changes nothing.
  a.free(7, {1});
  Snapshot after_first = snapshot(a);
  CHECK_THROWS(
      std::invalid_argument,
      a.free(7, {1}),
      "block 1 is already free (double free)");
  CHECK_UNCHANGED(a, after_first);
  CHECK_OK(a);
}

void test_share_and_release() {
  BlockAllocator a(4);
  CHECK_EQ(a.allocate(7, 2), (Ids{0, 1}));
  // queue: 2 3
  a.share(9, {1});
  CHECK_OK(a);
  // ref: 1 2 0 0   table 9: [1]
  CHECK_EQ(ref_cnts(a), (Ids{1, 2, 0, 0}));
  CHECK_EQ(a.table(9), (Ids{1}));
  CHECK_EQ(a.num_used(), 2); // sharing takes no block
  CHECK_EQ(a.release(7), 1); // only block 0 reached ref_cnt 0
  CHECK_OK(a);
  // ref: 0 1 0 0   queue: 0 2 3
  CHECK_EQ(ref_cnts(a), (Ids{0, 1, 0, 0}));
  CHECK_EQ(a.free_queue(), (Ids{0, 2, 3}));
  CHECK(!a.has_owner(7));
  CHECK_EQ(a.table(7), (Ids{}));
  CHECK_EQ(a.release(9), 1);
  CHECK_OK(a);
  // queue: 1 0 2 3
  CHECK_EQ(a.free_queue(), (Ids{1, 0, 2, 3}));
  CHECK_EQ(a.num_owners(), 0);
  CHECK_EQ(a.release(9), 0); // unknown owner
  CHECK_EQ(a.release(12345), 0);
  CHECK_OK(a);
}

void test_share_then_free_by_each_owner() {
  BlockAllocator a(5);
  a.allocate(1, 3); // table 1: [0 1 2]
  a.share(2, {2, 0}); // table 2: [2 0]
  a.allocate(2, 1); // table 2: [2 0 3]
  CHECK_OK(a);
  // ref: 2 1 2 1 0   queue: 4
  CHECK_EQ(ref_cnts(a), (Ids{2, 1, 2, 1, 0}));
  CHECK_EQ(a.table(2), (Ids{2, 0, 3}));
  a.free(1, {0, 2});
  CHECK_OK(a);
  // Still held by owner 2: nothing joins the queue.
  // ref: 1 1 1 1 0   queue: 4
  CHECK_EQ(ref_cnts(a), (Ids{1, 1, 1, 1, 0}));
  CHECK_EQ(a.free_queue(), (Ids{4}));
  CHECK_EQ(a.table(1), (Ids{1}));
  a.free(2, {0});
  CHECK_OK(a);
  // queue: 0 4
  CHECK_EQ(a.free_queue(), (Ids{0, 4}));
  // Owner 1 may share a block again after freeing its reference.
  a.share(1, {2});
  CHECK_EQ(a.table(1), (Ids{1, 2}));
  CHECK_EQ(a.ref_cnt(2), 2);
  // release counts only the blocks that reached ref_cnt 0: 1 (2 is held).
  CHECK_EQ(a.release(1), 1);
  CHECK_OK(a);
  // queue: 1 0 4   ref: 0 0 1 1 0
  CHECK_EQ(a.free_queue(), (Ids{1, 0, 4}));
  CHECK_EQ(ref_cnts(a), (Ids{0, 0, 1, 1, 0}));
  CHECK_EQ(a.release(2), 2); // table 2 was [2 3]
  // queue: 3 2 1 0 4
  CHECK_EQ(a.free_queue(), (Ids{3, 2, 1, 0, 4}));
  CHECK_OK(a);
}

void test_share_errors() {
  BlockAllocator a(64);
  a.allocate(7, 3); // [0 1 2]
  a.allocate(8, 1); // [3]
  Snapshot before = snapshot(a);
  CHECK_THROWS(
      std::out_of_range,
      a.share(9, {64}),
      "[kvpool::share] block id 64 out of range [0, 64)");
  CHECK_THROWS(
      std::invalid_argument,
      a.share(9, {5}),
      "[kvpool::share] block 5 is free; only held or cached blocks can be "
      "shared");
  CHECK_THROWS(
      std::invalid_argument,
      a.share(9, {0, 0}),
      "[kvpool::share] block 0 appears more than once in block_ids");
  CHECK_THROWS(
      std::invalid_argument,
      a.share(7, {3, 1}),
      "[kvpool::share] owner 7 already holds block 1");
  CHECK_THROWS(std::invalid_argument, a.share(9, {0, 1, 40}), "block 40");
  CHECK_UNCHANGED(a, before);
  CHECK(!a.has_owner(9));
  // Sharing nothing registers nothing.
  a.share(9, {});
  CHECK(!a.has_owner(9));
  CHECK_UNCHANGED(a, before);
  CHECK_OK(a);
}

void test_range_checks() {
  BlockAllocator a(64);
  CHECK_THROWS(
      std::out_of_range,
      a.ref_cnt(64),
      "[kvpool::ref_cnt] block id 64 out of range [0, 64)");
  CHECK_THROWS(std::out_of_range, a.ref_cnt(-1), "block id -1");
  CHECK_THROWS(
      std::out_of_range,
      a.publish(64, 0, {1}, kNoKey),
      "[kvpool::publish] block id 64 out of range [0, 64)");
  CHECK_THROWS(
      std::out_of_range,
      a.content_tokens(-1),
      "[kvpool::content_tokens] block id -1 out of range");
  CHECK_THROWS(
      std::out_of_range,
      a.has_content(64),
      "[kvpool::has_content] block id 64");
  CHECK_THROWS(std::out_of_range, a.key_of(64), "[kvpool::key_of] block id 64");
  CHECK_THROWS(
      std::out_of_range,
      a.parent_key_of(64),
      "[kvpool::parent_key_of] block id 64");
  CHECK_THROWS(
      std::out_of_range,
      a.invalidate(-5),
      "[kvpool::invalidate] block id -5 out of range [0, 64)");
}

// ---------------------------------------------------------------------------
// Prefix-cache bookkeeping.

void test_header_example() {
  BlockAllocator a(4);
  CHECK_EQ(a.allocate(7, 3), (Ids{0, 1, 2}));
  // queue: 3
  CHECK_EQ(a.publish(0, 5, iota(256, 1000), 11), 0);
  CHECK_EQ(a.release(7), 3);
  CHECK_OK(a);
  // queue: 2 1 3 0C
  CHECK_EQ(a.free_queue(), (Ids{2, 1, 3, 0}));
  CHECK_EQ(a.lookup(11, iota(256, 1000)), 0);
  CHECK_EQ(a.allocate(8, 4), (Ids{2, 1, 3, 0}));
  CHECK_EQ(a.num_evictions(), int64_t{1});
  CHECK_EQ(a.lookup(11, iota(256, 1000)), -1);
  CHECK_OK(a);
}

void test_publish_and_content() {
  BlockAllocator a(4, 2); // 2 tokens per block
  CHECK_EQ(a.allocate(1, 3), (Ids{0, 1, 2}));
  // Allocated blocks have no content.
  CHECK(!a.has_content(0));
  CHECK_EQ(a.content_tokens(0), (Ids{}));
  CHECK_EQ(a.key_of(0), kNoKey);
  CHECK_EQ(a.parent_key_of(0), kNoKey);
  // A full block with its key becomes the key's canonical block.
  CHECK_EQ(a.publish(0, 7, {10, 11}, 50), 0);
  // A partial block: no key, returns itself.
  CHECK_EQ(a.publish(1, 50, {12}, kNoKey), 1);
  CHECK_OK(a);
  CHECK(a.has_content(0));
  CHECK_EQ(a.content_tokens(0), (Ids{10, 11}));
  CHECK_EQ(a.key_of(0), Key{50});
  CHECK_EQ(a.parent_key_of(0), Key{7});
  CHECK_EQ(a.content_tokens(1), (Ids{12}));
  CHECK_EQ(a.key_of(1), kNoKey);
  CHECK_EQ(a.parent_key_of(1), Key{50});
  CHECK_EQ(a.lookup(50, {10, 11}), 0);
  CHECK_EQ(a.lookup(50, {10}), -1); // tokens must match exactly
  CHECK_EQ(a.lookup(50, {10, 11, 12}), -1);
  CHECK_EQ(a.lookup(51, {10, 11}), -1); // unknown key
  // Publishing does not change references or the queue.
  CHECK_EQ(ref_cnts(a), (Ids{1, 1, 1, 0}));
  CHECK_EQ(a.free_queue(), (Ids{3}));
  CHECK_EQ(a.num_cached(), 0);
  // The full uint64 range is a valid key.
  CHECK_EQ(a.publish(2, UINT64_MAX, {1, 2}, UINT64_MAX), 2);
  CHECK_EQ(a.lookup(UINT64_MAX, {1, 2}), 2);
  CHECK_EQ(a.best_child(UINT64_MAX, {1, 2}), (Child{2, 2}));
  CHECK_OK(a);
}

void test_publish_duplicate_and_collision() {
  BlockAllocator a(4, 2);
  a.allocate(1, 3); // [0 1 2]
  CHECK_EQ(a.publish(0, 7, {1, 2}, 50), 0);
  // Same key, same tokens (computed twice): 0 stays canonical, 1 keeps its
  // content unindexed.
  CHECK_EQ(a.publish(1, 7, {1, 2}, 50), 0);
  // Same key, different tokens (a hash collision): also not indexed.
  CHECK_EQ(a.publish(2, 7, {3, 4}, 50), 0);
  CHECK_OK(a);
  CHECK_EQ(a.key_of(1), Key{50});
  CHECK_EQ(a.key_of(2), Key{50});
  CHECK_EQ(a.lookup(50, {1, 2}), 0);
  // The collision never hands out a block whose tokens differ.
  CHECK_EQ(a.lookup(50, {3, 4}), -1);
  // All three are children of 7; best_child finds the colliding one by
  // tokens, and breaks the 0 / 1 tie by the lower id.
  CHECK_EQ(a.best_child(7, {3, 4}), (Child{2, 2}));
  CHECK_EQ(a.best_child(7, {1, 9}), (Child{0, 1}));
  // The canonical block loses its content: the key is no longer indexed
  // (duplicates are not promoted), block 1 is still found token-wise.
  a.invalidate(0);
  CHECK_OK(a);
  CHECK_EQ(a.lookup(50, {1, 2}), -1);
  CHECK_EQ(a.best_child(7, {1, 2}), (Child{1, 2}));
  // Now the key is free: 0 can be published again and becomes canonical.
  CHECK_EQ(a.publish(0, 7, {1, 2}, 50), 0);
  CHECK_EQ(a.lookup(50, {1, 2}), 0);
  CHECK_OK(a);
}

void test_publish_errors() {
  BlockAllocator a(8, 4);
  a.allocate(1, 2); // [0 1]
  a.publish(0, 3, {1, 2, 3, 4}, 9);
  a.publish(1, 3, {5}, kNoKey);
  a.release(1);
  // queue: 2 3 4 5 6 7 0C 1C
  a.allocate(2, 1); // [2]
  Snapshot before = snapshot(a);
  CHECK_THROWS(
      std::invalid_argument,
      a.publish(3, 0, {1}, kNoKey),
      "[kvpool::publish] block 3 is not held (ref_cnt 0); only a held block "
      "can be published");
  CHECK_THROWS(
      std::invalid_argument,
      a.publish(0, 0, {1}, kNoKey),
      "[kvpool::publish] block 0 is not held (ref_cnt 0, cached)");
  a.share(3, {0});
  before = snapshot(a);
  CHECK_THROWS(
      std::invalid_argument,
      a.publish(0, 0, {1}, kNoKey),
      "[kvpool::publish] block 0 already has content (4 tokens under "
      "parent_key 3); invalidate it first");
  CHECK_THROWS(
      std::invalid_argument,
      a.publish(2, 0, {}, kNoKey),
      "[kvpool::publish] block 2: tokens must hold 1 to 4 ids, got 0");
  CHECK_THROWS(
      std::invalid_argument,
      a.publish(2, 0, {1, 2, 3, 4, 5}, 8),
      "tokens must hold 1 to 4 ids, got 5");
  CHECK_THROWS(
      std::invalid_argument,
      a.publish(2, 0, {1, 2, 3}, 8),
      "[kvpool::publish] block 2: key given for a partial block (3 of 4 "
      "tokens); only full blocks have a key");
  CHECK_THROWS(
      std::invalid_argument,
      a.publish(2, 0, {1, 2, 3, 4}, kNoKey),
      "[kvpool::publish] block 2: key missing for a full block (4 tokens)");
  CHECK_UNCHANGED(a, before);
  CHECK_OK(a);
}

void test_release_queues_cached_at_tail() {
  BlockAllocator a(6, 2);
  CHECK_EQ(a.allocate(1, 4), (Ids{0, 1, 2, 3}));
  // queue: 4 5
  a.publish(1, 0, {10, 11}, 101);
  a.publish(3, 101, {12}, kNoKey);
  CHECK_EQ(a.release(1), 4);
  CHECK_OK(a);
  // In table order: 0 -> head, 1 -> tail, 2 -> head, 3 -> tail.
  // queue: 2 0 4 5 1C 3C
  CHECK_EQ(a.free_queue(), (Ids{2, 0, 4, 5, 1, 3}));
  CHECK_EQ(a.num_free(), 6);
  CHECK_EQ(a.num_used(), 0);
  CHECK_EQ(a.num_cached(), 2);
  // Cached blocks are still findable.
  CHECK_EQ(a.lookup(101, {10, 11}), 1);
  CHECK_EQ(a.best_child(101, {12, 13}), (Child{3, 1}));

  // free() in argument order: 5 then 4, both with content -> tail.
  CHECK_EQ(a.allocate(2, 4), (Ids{2, 0, 4, 5}));
  a.publish(4, 7, {1, 1}, 201);
  a.publish(5, 7, {1, 2}, 202);
  a.free(2, {5, 4, 0});
  CHECK_OK(a);
  // queue: 0 1C 3C 5C 4C
  CHECK_EQ(a.free_queue(), (Ids{0, 1, 3, 5, 4}));
  CHECK_EQ(a.num_cached(), 4);
  CHECK_EQ(a.num_evictions(), int64_t{0});
}

void test_allocate_takes_free_first_then_lru_cached() {
  BlockAllocator a(6, 2);
  a.allocate(1, 4); // [0 1 2 3]
  a.publish(1, 0, {10, 11}, 101);
  a.publish(3, 101, {12}, kNoKey);
  a.release(1);
  // queue: 2 0 4 5 1C 3C
  CHECK_EQ(a.allocate(2, 5), (Ids{2, 0, 4, 5, 1}));
  CHECK_OK(a);
  // Taking block 1 evicted it: content, index entry and child entry gone.
  // queue: 3C   ref: 1 1 1 0 1 1
  CHECK_EQ(a.free_queue(), (Ids{3}));
  CHECK_EQ(a.num_evictions(), int64_t{1});
  CHECK_EQ(a.num_cached(), 1);
  CHECK(!a.has_content(1));
  CHECK_EQ(a.key_of(1), kNoKey);
  CHECK_EQ(a.lookup(101, {10, 11}), -1);
  CHECK_EQ(a.best_child(0, {10, 11}), (Child{-1, 0}));
  CHECK_EQ(a.best_child(101, {12}), (Child{3, 1}));
  // Evicting the last cached block.
  CHECK_EQ(a.allocate(3, 1), (Ids{3}));
  CHECK_EQ(a.num_evictions(), int64_t{2});
  CHECK_EQ(a.num_cached(), 0);
  CHECK_EQ(a.best_child(101, {12}), (Child{-1, 0}));
  CHECK(Peer::key_to_block(a).empty());
  CHECK(Peer::parent_to_children(a).empty());
  CHECK_OK(a);
  // Exhaustion counts cached blocks as free and evicts nothing on failure.
  a.release(3); // block 3, no content -> head
  Snapshot before = snapshot(a);
  CHECK_THROWS(PoolExhausted, a.allocate(4, 2), "need 2 blocks, 1 free");
  CHECK_UNCHANGED(a, before);
}

void test_touch_revives_from_middle() {
  BlockAllocator a(5, 1); // 1 token per block: every block is full
  a.allocate(1, 5); // [0 1 2 3 4]
  for (int32_t b = 0; b < 5; ++b) {
    a.publish(b, 0, {b}, 100 + b);
  }
  a.release(1);
  // queue: 0C 1C 2C 3C 4C
  CHECK_EQ(a.free_queue(), (Ids{0, 1, 2, 3, 4}));
  CHECK_EQ(a.num_cached(), 5);
  a.share(2, {2});
  CHECK_OK(a);
  // queue: 0C 1C 3C 4C   ref: 0 0 1 0 0   content kept
  CHECK_EQ(a.free_queue(), (Ids{0, 1, 3, 4}));
  CHECK_EQ(a.num_free(), 4);
  CHECK_EQ(a.num_cached(), 4);
  CHECK_EQ(a.ref_cnt(2), 1);
  CHECK_EQ(a.lookup(102, {2}), 2);
  CHECK_EQ(a.table(2), (Ids{2}));
  // Freed again: back at the tail (most recently used).
  a.free(2, {2});
  // queue: 0C 1C 3C 4C 2C
  CHECK_EQ(a.free_queue(), (Ids{0, 1, 3, 4, 2}));
  // Touch the head and the tail, plus a block someone already holds.
  a.share(3, {0, 2});
  a.share(4, {2, 1});
  CHECK_OK(a);
  // queue: 3C 4C   ref: 1 1 2 0 0
  CHECK_EQ(a.free_queue(), (Ids{3, 4}));
  CHECK_EQ(ref_cnts(a), (Ids{1, 1, 2, 0, 0}));
  CHECK_EQ(a.num_cached(), 2);
  CHECK_EQ(a.num_evictions(), int64_t{0});
  // A touched block is not evicted by allocate.
  CHECK_EQ(a.allocate(5, 2), (Ids{3, 4}));
  CHECK_EQ(a.num_evictions(), int64_t{2});
  CHECK_EQ(a.lookup(100, {0}), 0);
  CHECK_EQ(a.lookup(103, {3}), -1);
  CHECK_OK(a);
}

void test_invalidate() {
  BlockAllocator a(5, 2);
  a.allocate(1, 4); // [0 1 2 3]
  a.publish(0, 0, {1, 2}, 10);
  a.publish(1, 10, {3, 4}, 11);
  a.publish(2, 11, {5}, kNoKey);
  a.share(2, {1});
  a.release(1);
  // queue: 3 4 0C 2C   ref: 0 1 0 0 0 (owner 2 holds 1)
  CHECK_EQ(a.free_queue(), (Ids{3, 4, 0, 2}));
  // A cached block becomes free and moves to the head.
  a.invalidate(2);
  CHECK_OK(a);
  // queue: 2 3 4 0C
  CHECK_EQ(a.free_queue(), (Ids{2, 3, 4, 0}));
  CHECK_EQ(a.num_cached(), 1);
  CHECK_EQ(a.num_free(), 5 - 1);
  CHECK(!a.has_content(2));
  CHECK_EQ(a.best_child(11, {5}), (Child{-1, 0}));
  // A held block loses its content and stays held.
  a.invalidate(1);
  CHECK_OK(a);
  CHECK_EQ(a.ref_cnt(1), 1);
  CHECK_EQ(a.lookup(11, {3, 4}), -1);
  CHECK_EQ(a.free_queue(), (Ids{2, 3, 4, 0}));
  // ... and may be published again.
  CHECK_EQ(a.publish(1, 10, {3, 9}, 12), 1);
  // No-op on blocks without content, FREE or HELD.
  a.invalidate(1);
  Snapshot before = snapshot(a);
  a.invalidate(1);
  a.invalidate(3);
  CHECK_UNCHANGED(a, before);
  // Released without content now: to the head.
  a.release(2);
  // queue: 1 2 3 4 0C
  CHECK_EQ(a.free_queue(), (Ids{1, 2, 3, 4, 0}));
  CHECK_EQ(a.num_evictions(), int64_t{0}); // invalidation is not eviction
  CHECK_OK(a);
}

void test_best_child() {
  BlockAllocator a(8, 4);
  a.allocate(1, 6); // [0 .. 5]
  a.publish(0, 5, {1, 2, 3, 4}, 100);
  a.publish(1, 5, {1, 2, 7, 7}, 101);
  a.publish(2, 5, {1, 2}, kNoKey); // partial
  a.publish(3, 6, {1, 2, 3, 4}, 102); // another parent
  a.publish(4, 5, {9, 9, 9, 9}, 103);
  a.release(1); // HELD or CACHED makes no difference
  a.share(2, {4});
  CHECK_EQ(a.best_child(5, {1, 2, 3, 4}), (Child{0, 4}));
  CHECK_EQ(a.best_child(5, {1, 2, 3}), (Child{0, 3})); // shorter query
  CHECK_EQ(a.best_child(5, {1, 2, 7, 8}), (Child{1, 3}));
  // 0, 1 and 2 (partial) all share 2 tokens: the lowest id wins.
  CHECK_EQ(a.best_child(5, {1, 2, 8}), (Child{0, 2}));
  CHECK_EQ(a.best_child(5, {9, 9}), (Child{4, 2}));
  CHECK_EQ(a.best_child(5, {9, 9, 9, 9, 9}), (Child{4, 4})); // longer query
  CHECK_EQ(a.best_child(5, {8}), (Child{-1, 0})); // no common token
  CHECK_EQ(a.best_child(5, {}), (Child{-1, 0}));
  CHECK_EQ(a.best_child(4, {1, 2}), (Child{-1, 0})); // unknown parent
  CHECK_EQ(a.best_child(6, {1, 2, 3, 4}), (Child{3, 4}));
  a.invalidate(0);
  CHECK_EQ(a.best_child(5, {1, 2, 8}), (Child{1, 2}));
  CHECK_EQ(a.best_child(5, {1, 2, 3, 4}), (Child{1, 2}));
  CHECK_OK(a);
}

// Negative controls: each corruption must be caught by check_invariants().
void test_resize() {
  BlockAllocator a(6, 2);
  CHECK_EQ(a.num_free_tail(), 6);
  CHECK_EQ(a.allocate(1, 3), (Ids{0, 1, 2}));
  a.publish(1, 0, {10, 11}, 101);
  a.publish(2, 101, {12}, kNoKey);
  CHECK_EQ(a.allocate(2, 2), (Ids{3, 4}));
  a.publish(4, 0, {20, 21}, 201);
  a.free(2, {4, 3});
  // queue: 3 5 4C   ref: 1 1 1 0 0 0
  CHECK_EQ(a.free_queue(), (Ids{3, 5, 4}));
  CHECK_EQ(a.num_free_tail(), 3);

  // Shrinking past a held block changes nothing.
  Snapshot before = snapshot(a);
  CHECK_THROWS(std::invalid_argument, a.resize(2), "block 2 is held");
  CHECK_UNCHANGED(a, before);
  CHECK_THROWS(std::invalid_argument, a.resize(0), "must be > 0");
  CHECK_UNCHANGED(a, before);

  // Shrinking to 4 drops 4 (cached: content and index entry go, counted as an
  // eviction) and 5 (free); the rest keep their state and queue order.
  a.resize(4);
  CHECK_OK(a);
  CHECK_EQ(a.num_blocks(), 4);
  CHECK_EQ(a.free_queue(), (Ids{3}));
  CHECK_EQ(a.num_cached(), 0);
  CHECK_EQ(a.num_evictions(), int64_t{1});
  CHECK_EQ(a.lookup(201, {20, 21}), -1);
  CHECK_EQ(a.lookup(101, {10, 11}), 1);
  CHECK_EQ(a.table(1), (Ids{0, 1, 2}));
  CHECK_THROWS(std::out_of_range, a.ref_cnt(4), "out of range");

  // Growing adds free blocks at the head, lowest id first.
  a.resize(7);
  CHECK_OK(a);
  CHECK_EQ(a.free_queue(), (Ids{4, 5, 6, 3}));
  CHECK_EQ(a.num_free(), 4);
  CHECK_EQ(a.num_free_tail(), 4);
  CHECK_EQ(a.allocate(3, 2), (Ids{4, 5}));
  CHECK_EQ(a.num_free_tail(), 1);
  // Cached blocks survive a resize that does not reach them.
  a.release(1);
  // queue: 0 6 3 1C 2C
  CHECK_EQ(a.free_queue(), (Ids{0, 6, 3, 1, 2}));
  a.resize(6);
  CHECK_OK(a);
  CHECK_EQ(a.free_queue(), (Ids{0, 3, 1, 2}));
  CHECK_EQ(a.num_cached(), 2);
  CHECK_EQ(a.lookup(101, {10, 11}), 1);
  CHECK_EQ(a.best_child(101, {12}), (Child{2, 1}));
  // A resize to the same size changes nothing.
  before = snapshot(a);
  a.resize(6);
  CHECK_UNCHANGED(a, before);
}

void test_relocate() {
  BlockAllocator a(6, 2);
  CHECK_EQ(a.allocate(1, 3), (Ids{0, 1, 2}));
  a.publish(1, 0, {10, 11}, 101);
  a.publish(2, 101, {12}, kNoKey);
  a.share(2, {1, 2});
  CHECK_EQ(a.allocate(3, 2), (Ids{3, 4}));
  a.publish(4, 0, {20, 21}, 201);
  a.free(3, {4});
  // queue: 5 4C   ref: 1 2 2 1 0 0   tables: 1 [0 1 2], 2 [1 2], 3 [3]

  // Errors change nothing: from not held, to held, unknown ids.
  Snapshot before = snapshot(a);
  CHECK_THROWS(std::invalid_argument, a.relocate(5, 4), "is not held");
  CHECK_UNCHANGED(a, before);
  CHECK_THROWS(std::invalid_argument, a.relocate(1, 0), "is held");
  CHECK_UNCHANGED(a, before);
  CHECK_THROWS(std::invalid_argument, a.relocate(1, 1), "is held");
  CHECK_UNCHANGED(a, before);
  CHECK_THROWS(std::out_of_range, a.relocate(1, 6), "out of range");
  CHECK_THROWS(std::out_of_range, a.relocate(-1, 5), "out of range");
  CHECK_UNCHANGED(a, before);

  // A shared block with content moves to a free id: both tables, its
  // references, its key and its child entry follow; 1 is free at the head.
  a.relocate(1, 5);
  CHECK_OK(a);
  CHECK_EQ(a.table(1), (Ids{0, 5, 2}));
  CHECK_EQ(a.table(2), (Ids{5, 2}));
  CHECK_EQ(a.ref_cnt(5), 2);
  CHECK_EQ(a.ref_cnt(1), 0);
  CHECK_EQ(a.lookup(101, {10, 11}), 5);
  CHECK_EQ(a.best_child(0, {10, 11}), (Child{5, 2}));
  CHECK(!a.has_content(1));
  CHECK_EQ(a.free_queue(), (Ids{1, 4}));
  CHECK_EQ(a.num_evictions(), int64_t{0});

  // Onto a cached block: its content goes (an eviction).
  a.relocate(2, 4);
  CHECK_OK(a);
  CHECK_EQ(a.table(1), (Ids{0, 5, 4}));
  CHECK_EQ(a.lookup(201, {20, 21}), -1);
  CHECK_EQ(a.best_child(101, {12}), (Child{4, 1}));
  CHECK_EQ(a.num_cached(), 0);
  CHECK_EQ(a.num_evictions(), int64_t{1});
  CHECK_EQ(a.free_queue(), (Ids{2, 1}));

  // What it is for: the held blocks at the top move down, then a resize
  // takes the top away.
  CHECK_THROWS(std::invalid_argument, a.resize(4), "is held");
  a.relocate(5, 1);
  a.relocate(4, 2);
  CHECK_EQ(a.num_free_tail(), 2);
  a.resize(4);
  CHECK_OK(a);
  CHECK_EQ(a.table(1), (Ids{0, 1, 2}));
  CHECK_EQ(a.table(2), (Ids{1, 2}));
  CHECK_EQ(a.lookup(101, {10, 11}), 1);
  // Releasing every owner leaves content cached, nothing held.
  a.release(1);
  a.release(2);
  a.release(3);
  CHECK_OK(a);
  CHECK_EQ(a.num_used(), 0);
  CHECK_EQ(a.num_cached(), 2);
}

void test_check_invariants_can_fail() {
  auto expect_bug = [](BlockAllocator& a, const char* what) {
    CHECK_THROWS(
        std::logic_error, a.check_invariants(), "this indicates a bug");
    CHECK_THROWS(std::logic_error, a.check_invariants(), what);
  };
  // A pool of 4 (2 tokens per block) with content: 0 held and canonical for
  // key 10, 1 cached under parent 10.   queue: 2 3 1C
  auto with_content = [] {
    BlockAllocator a(4, 2);
    a.allocate(1, 2);
    a.publish(0, 0, {1, 2}, 10);
    a.publish(1, 10, {3}, kNoKey);
    a.free(1, {1});
    return a;
  };
  {
    BlockAllocator a(4);
    a.allocate(1, 2);
    Peer::ref_cnt(a)[0] = 2; // no second holder
    expect_bug(a, "block 0 has ref_cnt 2 but 1 tables hold it");
  }
  {
    BlockAllocator a(4);
    a.allocate(1, 2);
    Peer::ref_cnt(a)[3] = 1; // queued with a reference
    expect_bug(a, "block 3 is on the free queue with ref_cnt 1");
  }
  {
    BlockAllocator a(4);
    Peer::num_free(a) = 3;
    expect_bug(a, "free queue holds 4 blocks, num_free is 3");
  }
  {
    BlockAllocator a(4);
    Peer::next(a)[1] = 3; // skips block 2
    expect_bug(a, "free queue links disagree");
  }
  {
    BlockAllocator a(4);
    a.allocate(1, 1);
    Peer::owner_to_table(a)[5] = {};
    expect_bug(a, "owner 5 has an empty table");
  }
  {
    BlockAllocator a(4);
    a.allocate(1, 1);
    Peer::owner_to_table(a)[1].push_back(0);
    Peer::ref_cnt(a)[0] = 2;
    expect_bug(a, "owner 1 holds a block more than once");
  }
  {
    BlockAllocator a(4);
    Peer::marked(a)[2] = 1;
    expect_bug(a, "scratch bitmap not cleared");
  }
  {
    BlockAllocator a = with_content();
    CHECK_OK(a); // the baseline is fine
    Peer::num_cached(a) = 0;
    expect_bug(a, "free queue holds 1 cached blocks, num_cached is 0");
  }
  {
    BlockAllocator a = with_content();
    // Block 2 gains content in place: queue 2C 3 1C.
    Peer::tokens(a)[2] = {5};
    Peer::parent_to_children(a)[0].push_back(2);
    Peer::num_cached(a) = 2;
    expect_bug(a, "free block 3 is queued behind a cached block");
  }
  {
    BlockAllocator a = with_content();
    Peer::key_to_block(a)[11] = 1; // block 1 is partial: no key
    expect_bug(a, "key 11 maps to block 1 without a key");
  }
  {
    BlockAllocator a = with_content();
    Peer::key_to_block(a)[11] = 0; // block 0's key is 10
    expect_bug(a, "key 11 maps to block 0 whose key is 10");
  }
  {
    BlockAllocator a = with_content();
    Peer::has_key(a)[0] = 0; // a full block without its key
    expect_bug(a, "block 0 with 2 tokens has_key 0");
  }
  {
    BlockAllocator a = with_content();
    Peer::parent_to_children(a)[10].push_back(3); // 3 has no content
    expect_bug(a, "parent_key 10 lists block 3 without content");
  }
  {
    BlockAllocator a = with_content();
    Peer::parent_to_children(a)[7].push_back(1); // 1's parent is 10
    expect_bug(a, "parent_key 7 lists block 1 whose parent_key is 10");
  }
  {
    BlockAllocator a = with_content();
    Peer::parent_to_children(a)[10].push_back(1);
    expect_bug(a, "block 1 is listed as a child more than once");
  }
  {
    BlockAllocator a = with_content();
    Peer::parent_to_children(a).erase(10);
    expect_bug(a, "2 blocks have content, 1 are listed as children");
  }
  {
    BlockAllocator a = with_content();
    Peer::parent_to_children(a)[3] = {};
    expect_bug(a, "parent_key 3 has an empty child list");
  }
  std::string message;
  try {
    BlockAllocator a(4);
    Peer::num_free(a) = 3;
    a.check_invariants();
  } catch (const std::logic_error& e) {
    message = e.what();
  }
  const std::string tail = "this indicates a bug";
  CHECK(
      message.size() >= tail.size() &&
      message.compare(message.size() - tail.size(), tail.size(), tail) == 0);
}

// ---------------------------------------------------------------------------
// Model-based randomized test.

// Deliberate model bugs, for the negative controls of the randomized test.
enum class Mutant {
  kNone,
  kFreeToTail, // blocks without content queued at the tail (the old order)
  kTieToHighestId, // best_child ties go to the highest block id
};

// A plain reference model: a deque as the free queue (linear search for a
// touch), optional content per block, a map as the key index, best_child by
// scanning every block.
struct Model {
  int32_t block_tokens;
  Mutant mutant = Mutant::kNone;
  std::deque<int32_t> queue;
  Ids ref_cnt;
  std::map<int64_t, Ids> tables;
  std::vector<std::optional<Content>> content;
  std::map<uint64_t, int32_t> key_to_block;
  int64_t num_evictions = 0;

  Model(int32_t n, int32_t bt) : block_tokens(bt), ref_cnt(n, 0), content(n) {
    for (int32_t b = 0; b < n; ++b) {
      queue.push_back(b);
    }
  }
  int32_t num_blocks() const {
    return static_cast<int32_t>(ref_cnt.size());
  }
  bool holds(int64_t owner, int32_t b) const {
    auto it = tables.find(owner);
    return it != tables.end() &&
        std::find(it->second.begin(), it->second.end(), b) != it->second.end();
  }
  bool in_range(int32_t b) const {
    return b >= 0 && b < num_blocks();
  }
  static bool distinct(Ids ids) {
    std::sort(ids.begin(), ids.end());
    return std::adjacent_find(ids.begin(), ids.end()) == ids.end();
  }
  bool can_share(int64_t owner, const Ids& ids) const {
    for (int32_t b : ids) {
      if (!in_range(b) || (ref_cnt[b] == 0 && !content[b]) || holds(owner, b)) {
        return false;
      }
    }
    return distinct(ids);
  }
  bool can_free(int64_t owner, const Ids& ids) const {
    for (int32_t b : ids) {
      if (!in_range(b) || !holds(owner, b)) {
        return false;
      }
    }
    return distinct(ids);
  }
  bool can_publish(int32_t b, const Ids& tokens, Key key) const {
    auto n = static_cast<int32_t>(tokens.size());
    return in_range(b) && ref_cnt[b] > 0 && !content[b] && n >= 1 &&
        n <= block_tokens && key.has_value() == (n == block_tokens);
  }
  void unqueue(int32_t b) {
    queue.erase(std::find(queue.begin(), queue.end(), b));
  }
  void drop_content(int32_t b) {
    Key key = content[b]->key;
    auto it = key ? key_to_block.find(*key) : key_to_block.end();
    if (it != key_to_block.end() && it->second == b) {
      key_to_block.erase(it);
    }
    content[b].reset();
  }
  Ids allocate(int64_t owner, int32_t n) {
    Ids out;
    for (int32_t i = 0; i < n; ++i) {
      int32_t b = queue.front();
      queue.pop_front();
      if (content[b]) {
        drop_content(b);
        ++num_evictions;
      }
      ref_cnt[b] = 1;
      tables[owner].push_back(b);
      out.push_back(b);
    }
    return out;
  }
  void share(int64_t owner, const Ids& ids) {
    for (int32_t b : ids) {
      if (ref_cnt[b]++ == 0) {
        unqueue(b);
      }
      tables[owner].push_back(b);
    }
  }
  void drop_ref(int32_t b) {
    if (--ref_cnt[b] == 0) {
      if (content[b] || mutant == Mutant::kFreeToTail) {
        queue.push_back(b);
      } else {
        queue.push_front(b);
      }
    }
  }
  void free(int64_t owner, const Ids& ids) {
    Ids& t = tables[owner];
    for (int32_t b : ids) {
      t.erase(std::find(t.begin(), t.end(), b));
      drop_ref(b);
    }
    if (t.empty()) {
      tables.erase(owner);
    }
  }
  int32_t release(int64_t owner) {
    auto it = tables.find(owner);
    if (it == tables.end()) {
      return 0;
    }
    int32_t num_freed = 0;
    for (int32_t b : it->second) {
      num_freed += ref_cnt[b] == 1;
      drop_ref(b);
    }
    tables.erase(it);
    return num_freed;
  }
  int32_t publish(int32_t b, uint64_t parent, const Ids& tokens, Key key) {
    content[b] = Content{parent, tokens, key};
    if (!key) {
      return b;
    }
    return key_to_block.try_emplace(*key, b).first->second;
  }
  int32_t lookup(uint64_t key, const Ids& tokens) const {
    auto it = key_to_block.find(key);
    return it != key_to_block.end() && content[it->second]->tokens == tokens
        ? it->second
        : -1;
  }
  Child best_child(uint64_t parent, const Ids& tokens) const {
    Child best{-1, 0};
    for (int32_t b = 0; b < num_blocks(); ++b) {
      if (!content[b] || content[b]->parent_key != parent) {
        continue;
      }
      const Ids& t = content[b]->tokens;
      int32_t common = 0;
      while (common < static_cast<int32_t>(std::min(t.size(), tokens.size())) &&
             t[common] == tokens[common]) {
        ++common;
      }
      if (common > best.second ||
          (mutant == Mutant::kTieToHighestId && common > 0 &&
           common == best.second)) {
        best = {b, common};
      }
    }
    return best;
  }
  void invalidate(int32_t b) {
    if (!content[b]) {
      return;
    }
    drop_content(b);
    if (ref_cnt[b] == 0) {
      unqueue(b);
      queue.push_front(b);
    }
  }
  int32_t free_tail() const {
    int32_t n = 0;
    while (n < num_blocks() && ref_cnt[num_blocks() - 1 - n] == 0) {
      ++n;
    }
    return n;
  }
  bool can_resize(int32_t n) const {
    return n > 0 && n >= num_blocks() - free_tail();
  }
  void resize(int32_t n) {
    const int32_t old = num_blocks();
    for (int32_t b = n; b < old; ++b) {
      if (content[b]) {
        drop_content(b);
        ++num_evictions;
      }
      unqueue(b);
    }
    ref_cnt.resize(n, 0);
    content.resize(n);
    for (int32_t b = n - 1; b >= old; --b) {
      queue.push_front(b);
    }
  }
  bool can_relocate(int32_t from, int32_t to) const {
    return in_range(from) && in_range(to) && ref_cnt[from] > 0 &&
        ref_cnt[to] == 0;
  }
  void relocate(int32_t from, int32_t to) {
    if (content[to]) {
      drop_content(to);
      ++num_evictions;
    }
    unqueue(to);
    for (auto& [owner, t] : tables) {
      std::replace(t.begin(), t.end(), from, to);
    }
    ref_cnt[to] = ref_cnt[from];
    ref_cnt[from] = 0;
    content[to] = content[from];
    content[from].reset();
    Key key = content[to] ? content[to]->key : kNoKey;
    auto it = key ? key_to_block.find(*key) : key_to_block.end();
    if (it != key_to_block.end() && it->second == from) {
      it->second = to;
    }
    queue.push_front(from);
  }
  Snapshot snapshot() const {
    Snapshot s{
        Ids(queue.begin(), queue.end()),
        ref_cnt,
        tables,
        static_cast<int32_t>(queue.size()),
        static_cast<int32_t>(tables.size()),
        0,
        num_evictions,
        content,
        key_to_block,
        {}};
    for (int32_t b = 0; b < num_blocks(); ++b) {
      if (content[b]) {
        s.parent_to_children[content[b]->parent_key].insert(b);
        s.num_cached += ref_cnt[b] == 0;
      }
    }
    return s;
  }
};

// What the random mix exercised; checked to be non-zero so that the test
// cannot pass by never reaching a path.
struct Coverage {
  int num_errors = 0;
  int num_exhausted = 0;
  int num_touches = 0; // share() of a cached block
  int num_published = 0;
  int num_duplicates = 0; // publish() returned another block
  int num_lookup_hits = 0;
  int num_collision_misses = 0; // key indexed, tokens differ
  int num_best_child_hits = 0;
  int num_invalidated = 0;
  int num_shrunk = 0; // resize() that took blocks away
  int num_grown = 0;
  int num_relocated = 0;
};

// Random ops against the model; every op (valid or not) is followed by a full
// state comparison, a lookup of every indexed key, and check_invariants().
// With a mutant model, returns whether a mismatch was found (and checks
// nothing else).
bool stress(
    int32_t initial_blocks,
    int32_t bt,
    int num_ops,
    uint32_t seed,
    Mutant mutant = Mutant::kNone) {
  std::mt19937 rng(seed);
  auto uniform = [&rng](int32_t lo, int32_t hi) { // [lo, hi]
    return lo +
        static_cast<int32_t>(rng() % static_cast<uint32_t>(hi - lo + 1));
  };
  int32_t num_blocks = initial_blocks; // follows resize()
  BlockAllocator a(num_blocks, bt);
  Model m(num_blocks, bt);
  m.mutant = mutant;
  const int64_t num_owner_ids = 6;
  // Few keys and parents, tokens from {1, 2, 3}: collisions, duplicates and
  // shared prefixes are common. Parents are drawn from the keys plus 0.
  const int32_t num_keys = 6;
  auto random_key = [&] { return uint64_t{100} + uniform(0, num_keys - 1); };
  auto random_parent = [&] {
    return uniform(0, 2) == 0 ? uint64_t{0} : random_key();
  };
  auto random_tokens = [&](int32_t len) {
    Ids t;
    for (int32_t i = 0; i < len; ++i) {
      t.push_back(uniform(1, 3));
    }
    return t;
  };
  int num_mismatch = 0;
  Coverage c;

  // Random ids: mostly from `pool`, sometimes any id incl. out of range, and
  // sometimes a duplicate.
  auto pick_ids = [&](const Ids& pool) {
    Ids ids;
    int32_t k = uniform(0, 4);
    for (int32_t i = 0; i < k; ++i) {
      int32_t r = uniform(0, 19);
      if (r == 0) {
        ids.push_back(uniform(-2, num_blocks + 1));
      } else if (r == 1 && !ids.empty()) {
        ids.push_back(ids[0]);
      } else if (!pool.empty()) {
        int32_t b = pool[uniform(0, static_cast<int32_t>(pool.size()) - 1)];
        if (std::find(ids.begin(), ids.end(), b) == ids.end()) {
          ids.push_back(b);
        }
      }
    }
    return ids;
  };
  auto blocks_where = [&](auto pred) {
    Ids out;
    for (int32_t b = 0; b < num_blocks; ++b) {
      if (pred(b)) {
        out.push_back(b);
      }
    }
    return out;
  };
  auto pick_one = [&](const Ids& pool) {
    if (pool.empty() || uniform(0, 19) == 0) {
      return uniform(-1, num_blocks);
    }
    return pool[uniform(0, static_cast<int32_t>(pool.size()) - 1)];
  };
  // Tokens for a query: a canonical block's tokens (a hit), or a
  // modification of them, or random ones.
  auto query_tokens = [&](int32_t b) {
    Ids t = b >= 0 && m.content[b] ? m.content[b]->tokens
                                   : random_tokens(uniform(0, bt + 1));
    int32_t r = uniform(0, 3);
    if (r == 1 && !t.empty()) {
      t[uniform(0, static_cast<int32_t>(t.size()) - 1)] = uniform(1, 3);
    } else if (r == 2) {
      t.resize(uniform(0, bt + 1), 1);
    }
    return t;
  };

  for (int op = 0; op < num_ops; ++op) {
    int64_t owner = uniform(0, num_owner_ids - 1);
    int32_t kind = uniform(0, 21);
    // What the model says the call must do: succeed, throw PoolExhausted, or
    // throw a caller-mistake error (invalid_argument / out_of_range).
    enum class Expect { kOk, kExhausted, kMistake } expect = Expect::kOk;
    bool threw_exhausted = false;
    bool threw_mistake = false;
    try {
      if (kind <= 3) { // allocate
        int32_t n = uniform(-1, 6);
        if (n < 0) {
          expect = Expect::kMistake;
        } else if (n > static_cast<int32_t>(m.queue.size())) {
          expect = Expect::kExhausted;
        }
        Ids got = a.allocate(owner, n);
        num_mismatch += expect != Expect::kOk || got != m.allocate(owner, n);
      } else if (kind <= 6) { // share: held and cached blocks (touch)
        Ids pool = blocks_where(
            [&](int32_t b) { return m.ref_cnt[b] > 0 || m.content[b]; });
        if (uniform(0, 9) == 0) { // also free blocks
          pool = iota(num_blocks);
        }
        Ids ids = pick_ids(pool);
        expect = m.can_share(owner, ids) ? Expect::kOk : Expect::kMistake;
        int num_cached_shared = 0;
        for (int32_t b : ids) {
          num_cached_shared += m.in_range(b) && m.ref_cnt[b] == 0;
        }
        a.share(owner, ids);
        num_mismatch += expect != Expect::kOk;
        m.share(owner, ids);
        c.num_touches += num_cached_shared;
      } else if (kind <= 8) { // free
        auto it = m.tables.find(owner);
        Ids held = it == m.tables.end() ? Ids{} : it->second;
        if (uniform(0, 9) == 0) { // also other owners' and free blocks
          for (int32_t b = 0; b < num_blocks; ++b) {
            held.push_back(b);
          }
        }
        Ids ids = pick_ids(held);
        expect = m.can_free(owner, ids) ? Expect::kOk : Expect::kMistake;
        a.free(owner, ids);
        num_mismatch += expect != Expect::kOk;
        m.free(owner, ids);
      } else if (kind == 9) { // release
        num_mismatch += a.release(owner) != m.release(owner);
      } else if (kind <= 12) { // publish
        Ids pool = blocks_where(
            [&](int32_t b) { return m.ref_cnt[b] > 0 && !m.content[b]; });
        int32_t b = pick_one(pool);
        int32_t r = uniform(0, 19);
        int32_t len = r == 0 ? uniform(0, 1) * (bt + 1) // 0 or too long
            : r <= 8         ? uniform(1, bt) // partial, maybe full
                             : bt;
        Ids tokens = random_tokens(len);
        Key key = len == bt ? Key{random_key()} : kNoKey;
        if (uniform(0, 19) == 0) { // key rule broken on purpose (mostly)
          key = key ? kNoKey : Key{random_key()};
        }
        uint64_t parent = random_parent();
        expect = m.can_publish(b, tokens, key) ? Expect::kOk : Expect::kMistake;
        int32_t got = a.publish(b, parent, tokens, key);
        int32_t want = m.publish(b, parent, tokens, key);
        num_mismatch += expect != Expect::kOk || got != want;
        ++c.num_published;
        c.num_duplicates += got != b;
      } else if (kind <= 14) { // lookup
        uint64_t key = random_key();
        auto it = m.key_to_block.find(key);
        Ids tokens = query_tokens(it == m.key_to_block.end() ? -1 : it->second);
        int32_t got = a.lookup(key, tokens);
        num_mismatch += got != m.lookup(key, tokens);
        c.num_lookup_hits += got >= 0;
        c.num_collision_misses += got < 0 && it != m.key_to_block.end();
      } else if (kind <= 16) { // best_child
        Ids with_content =
            blocks_where([&](int32_t b) { return m.content[b].has_value(); });
        int32_t b = with_content.empty() || uniform(0, 4) == 0
            ? -1
            : with_content[uniform(
                  0, static_cast<int32_t>(with_content.size()) - 1)];
        uint64_t parent = b >= 0 ? m.content[b]->parent_key : random_parent();
        Ids tokens = query_tokens(b);
        Child got = a.best_child(parent, tokens);
        num_mismatch += got != m.best_child(parent, tokens);
        c.num_best_child_hits += got.first >= 0;
      } else if (kind == 20) { // resize: mostly within the free tail
        int32_t tail = m.free_tail();
        num_mismatch += a.num_free_tail() != tail;
        int32_t n = uniform(0, 3) == 0
            ? uniform(-1, num_blocks + 4)
            : std::max(1, num_blocks - uniform(0, tail)) +
                uniform(0, 1) * uniform(0, 4);
        n = std::min(n, 2 * initial_blocks + 4);
        expect = m.can_resize(n) ? Expect::kOk : Expect::kMistake;
        c.num_shrunk += expect == Expect::kOk && n < num_blocks;
        c.num_grown += expect == Expect::kOk && n > num_blocks;
        a.resize(n);
        num_mismatch += expect != Expect::kOk;
        m.resize(n);
        num_blocks = n;
      } else if (kind == 21) { // relocate: mostly a held block to a free one
        Ids held = blocks_where([&](int32_t b) { return m.ref_cnt[b] > 0; });
        Ids free = blocks_where([&](int32_t b) { return m.ref_cnt[b] == 0; });
        int32_t from = uniform(0, 9) == 0 ? pick_one(free) : pick_one(held);
        int32_t to = uniform(0, 9) == 0 ? pick_one(held) : pick_one(free);
        expect = m.can_relocate(from, to) ? Expect::kOk : Expect::kMistake;
        a.relocate(from, to);
        num_mismatch += expect != Expect::kOk;
        m.relocate(from, to);
        ++c.num_relocated;
      } else { // invalidate (rarer: it undoes the cache)
        if (kind == 17) {
          Ids pool =
              blocks_where([&](int32_t b) { return m.content[b].has_value(); });
          int32_t b = pick_one(pool);
          expect = m.in_range(b) ? Expect::kOk : Expect::kMistake;
          c.num_invalidated += m.in_range(b) && m.content[b];
          a.invalidate(b);
          num_mismatch += expect != Expect::kOk;
          m.invalidate(b);
        } else { // reads of content; out_of_range outside the pool
          int32_t b = uniform(-1, num_blocks);
          expect = m.in_range(b) ? Expect::kOk : Expect::kMistake;
          Ids tokens = a.content_tokens(b);
          Key key = a.key_of(b);
          Key parent = a.parent_key_of(b);
          const auto& want = m.content[b];
          num_mismatch += a.has_content(b) != want.has_value() ||
              tokens != (want ? want->tokens : Ids{}) ||
              key != (want ? want->key : kNoKey) ||
              parent != (want ? Key{want->parent_key} : kNoKey);
        }
      }
    } catch (const PoolExhausted&) {
      threw_exhausted = true;
    } catch (const std::logic_error&) {
      threw_mistake = true;
    }
    num_mismatch += threw_exhausted != (expect == Expect::kExhausted);
    num_mismatch += threw_mistake != (expect == Expect::kMistake);
    c.num_errors += threw_exhausted || threw_mistake;
    c.num_exhausted += threw_exhausted;
    // A call that threw left the model untouched: the allocator must match it
    // (queue order, references, tables, contents, index, children).
    num_mismatch += !(snapshot(a) == m.snapshot());
    // The index points only at blocks whose tokens match: every indexed key
    // finds its block with its tokens, and nothing with one token changed.
    for (const auto& [key, b] : m.key_to_block) {
      Ids tokens = m.content[b]->tokens;
      num_mismatch += a.lookup(key, tokens) != b;
      tokens.back() += 10;
      num_mismatch += a.lookup(key, tokens) != -1;
    }
    try {
      a.check_invariants();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "op %d: %s\n", op, e.what());
      ++num_mismatch;
    }
    if (num_mismatch && mutant != Mutant::kNone) {
      return true;
    }
    if (num_mismatch) {
      std::fprintf(
          stderr,
          "stress(seed %u): first mismatch at op %d (kind %d, expected %d, "
          "threw %d/%d)\n",
          seed,
          op,
          kind,
          static_cast<int>(expect),
          threw_exhausted,
          threw_mistake);
      break;
    }
  }
  if (mutant != Mutant::kNone) {
    return false;
  }
  CHECK_EQ(num_mismatch, 0);

  // Nothing leaks: once every owner is released nothing is held, and after
  // invalidating every block nothing is cached or indexed.
  for (int64_t owner = 0; owner < num_owner_ids; ++owner) {
    CHECK_EQ(a.release(owner), m.release(owner));
  }
  CHECK_EQ(a.num_used(), 0);
  CHECK_EQ(a.num_free(), num_blocks);
  CHECK_EQ(a.num_owners(), 0);
  CHECK(snapshot(a) == m.snapshot());
  CHECK_OK(a);
  for (int32_t b = 0; b < num_blocks; ++b) {
    a.invalidate(b);
  }
  CHECK_EQ(a.num_cached(), 0);
  CHECK(Peer::key_to_block(a).empty());
  CHECK(Peer::parent_to_children(a).empty());
  CHECK_EQ(static_cast<int32_t>(a.free_queue().size()), num_blocks);
  CHECK_OK(a);

  // The mix exercised every path (guards against a stress test that only ever
  // throws, or never does).
  std::printf(
      "stress(%d blocks x %d tokens, seed %u): %d ops, %d errors (%d "
      "exhausted), %d touches, %lld evictions, %d published (%d not "
      "canonical), %d lookup hits, %d collision misses, %d best_child hits, "
      "%d invalidated, %d shrunk, %d grown, %d relocated\n",
      num_blocks,
      bt,
      seed,
      num_ops,
      c.num_errors,
      c.num_exhausted,
      c.num_touches,
      static_cast<long long>(m.num_evictions),
      c.num_published,
      c.num_duplicates,
      c.num_lookup_hits,
      c.num_collision_misses,
      c.num_best_child_hits,
      c.num_invalidated,
      c.num_shrunk,
      c.num_grown,
      c.num_relocated);
  CHECK(c.num_errors > num_ops / 20);
  CHECK(c.num_errors < num_ops / 2);
  CHECK(c.num_exhausted > 0);
  if (num_blocks > 1) { // a pool of 1 is only an edge case
    CHECK(c.num_touches > 0);
    CHECK(m.num_evictions > 0);
    CHECK(c.num_duplicates > 0);
    CHECK(c.num_lookup_hits > 0);
    CHECK(c.num_collision_misses > 0);
    CHECK(c.num_best_child_hits > 0);
    CHECK(c.num_invalidated > 0);
    CHECK(c.num_shrunk > 0);
    CHECK(c.num_relocated > 0);
  }
  CHECK(c.num_grown > 0);
  return num_mismatch > 0;
}

void test_stress() {
  stress(16, 4, 20000, 1);
  stress(64, 2, 20000, 2);
  stress(8, 1, 10000, 3);
  stress(1, 3, 2000, 4);
  // Negative controls: a model with a bug must be caught.
  CHECK(stress(16, 4, 20000, 1, Mutant::kFreeToTail));
  CHECK(stress(16, 4, 20000, 1, Mutant::kTieToHighestId));
}

} // namespace

int main() {
  test_constructor();
  test_allocate_takes_from_head();
  test_allocate_zero_and_negative();
  test_exhaustion_is_all_or_nothing();
  test_free_without_content_goes_to_head();
  test_free_keeps_table_order_and_forgets_empty_owner();
  test_free_errors();
  test_share_and_release();
  test_share_then_free_by_each_owner();
  test_share_errors();
  test_range_checks();
  test_header_example();
  test_publish_and_content();
  test_publish_duplicate_and_collision();
  test_publish_errors();
  test_release_queues_cached_at_tail();
  test_allocate_takes_free_first_then_lru_cached();
  test_touch_revives_from_middle();
  test_invalidate();
  test_best_child();
  test_resize();
  test_relocate();
  test_check_invariants_can_fail();
  test_stress();
  std::printf("%d passed, %d failed\n", num_passed, num_failed);
  return num_failed == 0 ? 0 : 1;
}
