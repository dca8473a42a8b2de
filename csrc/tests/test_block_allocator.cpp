// Tests of kvpool::BlockAllocator (csrc/core/block_allocator.h). No test
// framework: CHECK* macros count passes and failures, main() returns non-zero
// if anything failed. Expected states are drawn in comments as
//   free: <free list, head first>   ref: <ref_cnt of block 0, 1, ...>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <exception>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <typeinfo>
#include <vector>

#include "core/block_allocator.h"

namespace kvpool {

// Friend of BlockAllocator (see the header): reads private state.
struct BlockAllocatorTestPeer {
  static std::vector<int32_t> free_list(const BlockAllocator& a) {
    std::vector<int32_t> out;
    for (int32_t b = a.next_[a.num_blocks_]; b != a.num_blocks_;
         b = a.next_[b]) {
      out.push_back(b);
    }
    return out;
  }
  static std::vector<int32_t>& ref_cnt(BlockAllocator& a) {
    return a.ref_cnt_;
  }
  static std::vector<int32_t>& next(BlockAllocator& a) {
    return a.next_;
  }
  static int32_t& num_free(BlockAllocator& a) {
    return a.num_free_;
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
};

} // namespace kvpool

namespace {

using kvpool::BlockAllocator;
using kvpool::PoolExhausted;
using Peer = kvpool::BlockAllocatorTestPeer;
using Ids = std::vector<int32_t>;

int num_passed = 0;
int num_failed = 0;

std::string show(int64_t v) {
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

std::string show(const std::string& s) {
  return "\"" + s + "\"";
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

// Everything observable, for "a call that throws changes nothing".
struct Snapshot {
  Ids free_list;
  Ids ref_cnt;
  std::map<int64_t, Ids> tables;
  int32_t num_free;
  int32_t num_owners;
  bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot(const BlockAllocator& a) {
  Snapshot s{Peer::free_list(a), ref_cnts(a), {}, a.num_free(), a.num_owners()};
  for (const auto& [owner, table] : Peer::owner_to_table(a)) {
    s.tables[owner] = table;
  }
  return s;
}

#define CHECK_UNCHANGED(a, before) \
  record(snapshot(a) == (before), __FILE__, __LINE__, "state changed")

void test_constructor() {
  CHECK_THROWS(
      std::invalid_argument,
      BlockAllocator(0),
      "[kvpool::BlockAllocator] num_blocks must be > 0, got 0");
  CHECK_THROWS(std::invalid_argument, BlockAllocator(-3), "got -3");

  BlockAllocator a(5);
  // free: 0 1 2 3 4   ref: 0 0 0 0 0
  CHECK_EQ(a.num_blocks(), 5);
  CHECK_EQ(a.num_free(), 5);
  CHECK_EQ(a.num_used(), 0);
  CHECK_EQ(a.num_owners(), 0);
  CHECK_EQ(Peer::free_list(a), (Ids{0, 1, 2, 3, 4}));
  CHECK_EQ(ref_cnts(a), (Ids{0, 0, 0, 0, 0}));
  CHECK_OK(a);

  BlockAllocator one(1);
  CHECK_EQ(Peer::free_list(one), (Ids{0}));
  CHECK_EQ(one.allocate(1, 1), (Ids{0}));
  CHECK_EQ(Peer::free_list(one), (Ids{}));
  CHECK_OK(one);
}

void test_allocate_takes_from_head() {
  BlockAllocator a(8);
  CHECK_EQ(a.allocate(1, 3), (Ids{0, 1, 2}));
  CHECK_OK(a);
  // free: 3 4 5 6 7   ref: 1 1 1 0 0 0 0 0
  CHECK_EQ(Peer::free_list(a), (Ids{3, 4, 5, 6, 7}));
  CHECK_EQ(ref_cnts(a), (Ids{1, 1, 1, 0, 0, 0, 0, 0}));
  CHECK_EQ(a.allocate(2, 2), (Ids{3, 4}));
  CHECK_OK(a);
  // More blocks for an existing owner are appended to its table.
  CHECK_EQ(a.allocate(1, 1), (Ids{5}));
  CHECK_OK(a);
  // free: 6 7   tables: 1 -> [0 1 2 5], 2 -> [3 4]
  CHECK_EQ(Peer::free_list(a), (Ids{6, 7}));
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
  // free: 61 62 63
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
  CHECK_EQ(Peer::free_list(a), (Ids{}));
  CHECK_THROWS(
      PoolExhausted, a.allocate(3, 1), "need 1 blocks, 0 free (pool of 64)");
  CHECK_EQ(a.allocate(3, 0), (Ids{})); // n == 0 is fine on an empty pool
  CHECK_OK(a);
}

void test_free_goes_to_tail() {
  BlockAllocator a(6);
  CHECK_EQ(a.allocate(1, 4), (Ids{0, 1, 2, 3}));
  // free: 4 5
  a.free(1, {2, 0});
  CHECK_OK(a);
  // Freed blocks are appended in argument order, behind the never-used ones:
  // free: 4 5 2 0   ref: 0 1 0 1 0 0   table 1: [1 3]
  CHECK_EQ(Peer::free_list(a), (Ids{4, 5, 2, 0}));
  CHECK_EQ(ref_cnts(a), (Ids{0, 1, 0, 1, 0, 0}));
  CHECK_EQ(a.table(1), (Ids{1, 3}));
  CHECK_EQ(a.num_free(), 4);
  // So the freshly freed ones are reused last.
  CHECK_EQ(a.allocate(2, 3), (Ids{4, 5, 2}));
  CHECK_OK(a);
  // free: 0
  CHECK_EQ(Peer::free_list(a), (Ids{0}));
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
  // free: 4 5 1 3 0 2
  CHECK_EQ(Peer::free_list(a), (Ids{4, 5, 1, 3, 0, 2}));
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

void test_share_and_release_header_example() {
  BlockAllocator a(4);
  CHECK_EQ(a.allocate(7, 2), (Ids{0, 1}));
  // free: 2 3
  a.share(9, {1});
  CHECK_OK(a);
  // ref: 1 2 0 0   table 9: [1]
  CHECK_EQ(ref_cnts(a), (Ids{1, 2, 0, 0}));
  CHECK_EQ(a.table(9), (Ids{1}));
  CHECK_EQ(a.num_used(), 2); // sharing takes no block
  CHECK_EQ(a.release(7), 1); // only block 0 became free
  CHECK_OK(a);
  // ref: 0 1 0 0   free: 2 3 0
  CHECK_EQ(ref_cnts(a), (Ids{0, 1, 0, 0}));
  CHECK_EQ(Peer::free_list(a), (Ids{2, 3, 0}));
  CHECK(!a.has_owner(7));
  CHECK_EQ(a.table(7), (Ids{}));
  CHECK_EQ(a.release(9), 1);
  CHECK_OK(a);
  // free: 2 3 0 1
  CHECK_EQ(Peer::free_list(a), (Ids{2, 3, 0, 1}));
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
  // ref: 2 1 2 1 0   free: 4
  CHECK_EQ(ref_cnts(a), (Ids{2, 1, 2, 1, 0}));
  CHECK_EQ(a.table(2), (Ids{2, 0, 3}));
  a.free(1, {0, 2});
  CHECK_OK(a);
  // Still held by owner 2: nothing returns to the free list.
  // ref: 1 1 1 1 0   free: 4
  CHECK_EQ(ref_cnts(a), (Ids{1, 1, 1, 1, 0}));
  CHECK_EQ(Peer::free_list(a), (Ids{4}));
  CHECK_EQ(a.table(1), (Ids{1}));
  a.free(2, {0});
  CHECK_OK(a);
  // free: 4 0
  CHECK_EQ(Peer::free_list(a), (Ids{4, 0}));
  // Owner 1 may share a block again after freeing its reference.
  a.share(1, {2});
  CHECK_EQ(a.table(1), (Ids{1, 2}));
  CHECK_EQ(a.ref_cnt(2), 2);
  // release returns only the blocks that became free: 1 (2 is still held).
  CHECK_EQ(a.release(1), 1);
  CHECK_OK(a);
  // free: 4 0 1   ref: 0 0 1 1 0
  CHECK_EQ(Peer::free_list(a), (Ids{4, 0, 1}));
  CHECK_EQ(ref_cnts(a), (Ids{0, 0, 1, 1, 0}));
  CHECK_EQ(a.release(2), 2); // table 2 was [2 3]
  // free: 4 0 1 2 3
  CHECK_EQ(Peer::free_list(a), (Ids{4, 0, 1, 2, 3}));
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
      "[kvpool::share] block 5 is free; only blocks in use can be "
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

void test_ref_cnt_range() {
  BlockAllocator a(64);
  CHECK_THROWS(
      std::out_of_range,
      a.ref_cnt(64),
      "[kvpool::ref_cnt] block id 64 out of range [0, 64)");
  CHECK_THROWS(std::out_of_range, a.ref_cnt(-1), "block id -1");
}

// Negative controls: each corruption must be caught by check_invariants().
void test_check_invariants_can_fail() {
  auto expect_bug = [](BlockAllocator& a, const char* what) {
    CHECK_THROWS(
        std::logic_error, a.check_invariants(), "this indicates a bug");
    CHECK_THROWS(std::logic_error, a.check_invariants(), what);
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
    Peer::ref_cnt(a)[3] = 1; // on the free list with a reference
    expect_bug(a, "block 3 is on the free list with ref_cnt 1");
  }
  {
    BlockAllocator a(4);
    Peer::num_free(a) = 3;
    expect_bug(a, "free list holds 4 blocks, num_free is 3");
  }
  {
    BlockAllocator a(4);
    Peer::next(a)[1] = 3; // skips block 2
    expect_bug(a, "free list links disagree");
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

// A plain reference model: a deque as the free list, maps for the rest.
struct Model {
  std::deque<int32_t> free_list;
  Ids ref_cnt;
  std::map<int64_t, Ids> tables;

  explicit Model(int32_t n) : ref_cnt(n, 0) {
    for (int32_t b = 0; b < n; ++b) {
      free_list.push_back(b);
    }
  }
  bool holds(int64_t owner, int32_t b) const {
    auto it = tables.find(owner);
    return it != tables.end() &&
        std::find(it->second.begin(), it->second.end(), b) != it->second.end();
  }
  bool in_range(int32_t b) const {
    return b >= 0 && b < static_cast<int32_t>(ref_cnt.size());
  }
  static bool distinct(Ids ids) {
    std::sort(ids.begin(), ids.end());
    return std::adjacent_find(ids.begin(), ids.end()) == ids.end();
  }
  bool can_share(int64_t owner, const Ids& ids) const {
    for (int32_t b : ids) {
      if (!in_range(b) || ref_cnt[b] == 0 || holds(owner, b)) {
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
  Ids allocate(int64_t owner, int32_t n) {
    Ids out;
    for (int32_t i = 0; i < n; ++i) {
      out.push_back(free_list.front());
      free_list.pop_front();
      ref_cnt[out.back()] = 1;
      tables[owner].push_back(out.back());
    }
    return out;
  }
  void share(int64_t owner, const Ids& ids) {
    for (int32_t b : ids) {
      ++ref_cnt[b];
      tables[owner].push_back(b);
    }
  }
  void drop(int32_t b) {
    if (--ref_cnt[b] == 0) {
      free_list.push_back(b);
    }
  }
  void free(int64_t owner, const Ids& ids) {
    Ids& t = tables[owner];
    for (int32_t b : ids) {
      t.erase(std::find(t.begin(), t.end(), b));
      drop(b);
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
      drop(b);
    }
    tables.erase(it);
    return num_freed;
  }
  Snapshot snapshot() const {
    return Snapshot{
        Ids(free_list.begin(), free_list.end()),
        ref_cnt,
        tables,
        static_cast<int32_t>(free_list.size()),
        static_cast<int32_t>(tables.size())};
  }
};

// Random ops against the model; every op (valid or not) is followed by a full
// state comparison and check_invariants().
void stress(int32_t num_blocks, int num_ops, uint32_t seed) {
  std::mt19937 rng(seed);
  auto uniform = [&rng](int32_t lo, int32_t hi) { // [lo, hi]
    return lo +
        static_cast<int32_t>(rng() % static_cast<uint32_t>(hi - lo + 1));
  };
  BlockAllocator a(num_blocks);
  Model m(num_blocks);
  const int64_t num_owner_ids = 6;
  int num_mismatch = 0;
  int num_errors = 0;
  int num_exhausted = 0;

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

  for (int op = 0; op < num_ops; ++op) {
    int64_t owner = uniform(0, num_owner_ids - 1);
    int32_t kind = uniform(0, 9);
    // What the model says the call must do: succeed, throw PoolExhausted, or
    // throw a caller-mistake error (invalid_argument / out_of_range).
    enum class Expect { kOk, kExhausted, kMistake } expect = Expect::kOk;
    bool threw_exhausted = false;
    bool threw_mistake = false;
    try {
      if (kind <= 3) {
        int32_t n = uniform(-1, 10);
        if (n < 0) {
          expect = Expect::kMistake;
        } else if (n > static_cast<int32_t>(m.free_list.size())) {
          expect = Expect::kExhausted;
        }
        Ids got = a.allocate(owner, n);
        num_mismatch += expect != Expect::kOk || got != m.allocate(owner, n);
      } else if (kind <= 5) {
        Ids in_use;
        for (int32_t b = 0; b < num_blocks; ++b) {
          if (m.ref_cnt[b] > 0) {
            in_use.push_back(b);
          }
        }
        Ids ids = pick_ids(in_use);
        expect = m.can_share(owner, ids) ? Expect::kOk : Expect::kMistake;
        a.share(owner, ids);
        num_mismatch += expect != Expect::kOk;
        m.share(owner, ids);
      } else if (kind <= 8) {
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
      } else {
        num_mismatch += a.release(owner) != m.release(owner);
      }
    } catch (const PoolExhausted&) {
      threw_exhausted = true;
    } catch (const std::logic_error&) {
      threw_mistake = true;
    }
    num_mismatch += threw_exhausted != (expect == Expect::kExhausted);
    num_mismatch += threw_mistake != (expect == Expect::kMistake);
    num_errors += threw_exhausted || threw_mistake;
    num_exhausted += threw_exhausted;
    // A call that threw left the model untouched: the allocator must match it.
    num_mismatch += !(snapshot(a) == m.snapshot());
    try {
      a.check_invariants();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "op %d: %s\n", op, e.what());
      ++num_mismatch;
    }
    if (num_mismatch) {
      std::fprintf(
          stderr, "stress(seed %u): first mismatch at op %d\n", seed, op);
      break;
    }
  }
  CHECK_EQ(num_mismatch, 0);
  // The mix exercised both paths (guards against a stress test that only ever
  // throws, or never does).
  CHECK(num_errors > num_ops / 20);
  CHECK(num_errors < num_ops / 2);
  CHECK(num_exhausted > 0);
}

void test_stress() {
  stress(16, 20000, 1);
  stress(64, 20000, 2);
  stress(1, 2000, 3);
}

} // namespace

int main() {
  test_constructor();
  test_allocate_takes_from_head();
  test_allocate_zero_and_negative();
  test_exhaustion_is_all_or_nothing();
  test_free_goes_to_tail();
  test_free_keeps_table_order_and_forgets_empty_owner();
  test_free_errors();
  test_share_and_release_header_example();
  test_share_then_free_by_each_owner();
  test_share_errors();
  test_ref_cnt_range();
  test_check_invariants_can_fail();
  test_stress();
  std::printf("%d passed, %d failed\n", num_passed, num_failed);
  return num_failed == 0 ? 0 : 1;
}
