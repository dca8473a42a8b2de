// Tests of the kernels' copy plan (csrc/kernels/plan.h): block runs, the
// used-block window, job splitting and the threaded job runner. No MLX. Block
// tables are drawn in comments as
//   position  0 1 2 3 | 4 5 ...   (| marks a block boundary)
//   block     7 7 7 7 | 2 2 ...
#include <atomic>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "kernels/plan.h"

namespace {

using kvpool::BlockPlan;
using kvpool::BlockRun;
using Ids = std::vector<int32_t>;
using Runs = std::vector<BlockRun>;

int num_passed = 0;
int num_failed = 0;

template <std::integral T>
std::string show(T v) {
  return std::to_string(v);
}

std::string show(const Ids& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) {
    os << (i ? ", " : "") << v[i];
  }
  os << "]";
  return os.str();
}

std::string show(const Runs& runs) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    os << (i ? ", " : "") << "{block " << r.block << ", slot " << r.slot
       << ", rows " << r.rows << ", cache_row " << r.cache_row << "}";
  }
  os << "]";
  return os.str();
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

// expr must throw std::invalid_argument with a message containing every one
// of the substrings.
#define CHECK_INVALID(expr, ...)                                          \
  do {                                                                    \
    std::string got_ = "no exception";                                    \
    bool ok_ = false;                                                     \
    try {                                                                 \
      (void)(expr);                                                       \
    } catch (const std::invalid_argument& e) {                            \
      got_ = e.what();                                                    \
      ok_ = true;                                                         \
      for (const char* part : {__VA_ARGS__}) {                            \
        ok_ = ok_ && got_.find(part) != std::string::npos;                \
      }                                                                   \
    } catch (const std::exception& e) {                                   \
      got_ = std::string(typeid(e).name()) + ": " + e.what();             \
    }                                                                     \
    record(ok_, __FILE__, __LINE__, "CHECK_INVALID(" #expr "): " + got_); \
  } while (0)

// The plan's header example:
//   position   0 1 2 3 | 4 5 6 7 | 8 9 10 11
//   block          7 7 | 2 2 2 2 | 5
//   cache row      0 1 | 2 3 4 5 | 6 7 8 9
//                                    ^^^^^ headroom 3
void test_header_example() {
  Ids ids{7, 2, 5};
  BlockPlan plan(ids, 4, 2, 9, 10);
  CHECK_EQ(plan.runs(), (Runs{{7, 2, 2, 0}, {2, 0, 4, 2}, {5, 0, 1, 6}}));
  CHECK_EQ(plan.length(), 7);
  CHECK_EQ(plan.headroom(), 3);
}

// Nothing to copy: no runs, and the table is not read (it may be empty).
void test_empty_range() {
  BlockPlan none(Ids{}, 4, 0, 0, 0);
  CHECK_EQ(none.runs(), Runs{});
  CHECK_EQ(none.length(), 0);
  CHECK_EQ(none.headroom(), 0);
  // An empty range past the table's end, in a cache of 5 zero rows.
  BlockPlan zeros(Ids{3}, 4, 9, 9, 5);
  CHECK_EQ(zeros.runs(), Runs{});
  CHECK_EQ(zeros.length(), 0);
  CHECK_EQ(zeros.headroom(), 5);
}

//   position  0 1 2 3 4 5 6 7
//   block     3 3 3 3 3 3 3 3
//   range         [2,   5)       one run, mid-block at both ends
void test_start_and_stop_mid_block() {
  BlockPlan plan(Ids{3}, 8, 2, 5);
  CHECK_EQ(plan.runs(), (Runs{{3, 2, 3, 0}}));
  CHECK_EQ(plan.length(), 3);
  CHECK_EQ(plan.headroom(), 0);
  // Mid-block start and stop in different blocks:
  //   position  0 1 2 3 | 4 5 6 7 | 8 9 10 11
  //   block     4 4 4 4 | 0 0 0 0 | 6 6 6  6
  //   range           [3,                10)
  BlockPlan wide(Ids{4, 0, 6}, 4, 3, 10);
  CHECK_EQ(wide.runs(), (Runs{{4, 3, 1, 0}, {0, 0, 4, 1}, {6, 0, 2, 5}}));
}

// One whole block; then whole blocks only (runs start at slot 0 and fill it).
void test_whole_blocks() {
  BlockPlan one(Ids{9}, 4, 0, 4);
  CHECK_EQ(one.runs(), (Runs{{9, 0, 4, 0}}));
  //   position  0 1 2 3 | 4 5 6 7 | 8 9 10 11
  //   block     1 1 1 1 | 2 2 2 2 | 3 3 3  3
  //   range             [4,                 12)
  BlockPlan two(Ids{1, 2, 3}, 4, 4, 12);
  CHECK_EQ(two.runs(), (Runs{{2, 0, 4, 0}, {3, 0, 4, 4}}));
  CHECK_EQ(two.length(), 8);
}

// block_tokens = 1: a run per position. The same block twice in a row still
// makes two runs (the walk never merges across entries).
void test_one_token_blocks() {
  BlockPlan plan(Ids{5, 5, 0}, 1, 0, 3, 4);
  CHECK_EQ(plan.runs(), (Runs{{5, 0, 1, 0}, {5, 0, 1, 1}, {0, 0, 1, 2}}));
  CHECK_EQ(plan.headroom(), 1);
}

// Entries past the range's last block, and before its first, are not read:
// placeholders (-1) there are fine.
void test_unread_entries() {
  BlockPlan plan(Ids{-1, 8, -1, -1}, 4, 5, 7);
  CHECK_EQ(plan.runs(), (Runs{{8, 1, 2, 0}}));
}

// Capacity: equal to the length leaves no headroom; more leaves zero rows.
void test_capacity_and_headroom() {
  Ids ids{1, 2};
  CHECK_EQ(BlockPlan(ids, 4, 1, 6, 5).headroom(), 0);
  CHECK_EQ(BlockPlan(ids, 4, 1, 6, 6).headroom(), 1);
  CHECK_EQ(BlockPlan(ids, 4, 1, 6, 1000).headroom(), 995);
  // The runs do not depend on the capacity.
  CHECK_EQ(
      BlockPlan(ids, 4, 1, 6, 1000).runs(), BlockPlan(ids, 4, 1, 6).runs());
}

void test_errors() {
  Ids ids{7, 2, 5};
  CHECK_INVALID(
      BlockPlan(ids, 0, 0, 1),
      "[kvpool::block_plan]",
      "block_tokens must be positive. Received 0.");
  CHECK_INVALID(
      BlockPlan(ids, -4, 0, 1), "block_tokens must be positive. Received -4.");
  CHECK_INVALID(
      BlockPlan(ids, 4, -1, 3),
      "need 0 <= start <= stop. Received start -1, stop 3.");
  CHECK_INVALID(
      BlockPlan(ids, 4, 5, 3),
      "need 0 <= start <= stop. Received start 5, stop 3.");
  CHECK_INVALID(
      BlockPlan(ids, 4, 2, 9, 6),
      "capacity must hold the stop - start = 7 positions. Received capacity 6.");
  // Positions [2, 13) need entries 0..3 of 4 tokens; the table has 3.
  CHECK_INVALID(
      BlockPlan(ids, 4, 2, 13),
      "positions [2, 13) need 4 block table entries of 4 tokens. Received 3 "
      "entries.");
  // An empty range needs no entries, wherever it is.
  CHECK(BlockPlan(ids, 4, 100, 100).runs().empty());
}

// Expands runs back into positions, checks each against the table, and that
// runs are maximal: each ends at its block's end or at stop.
void check_against_positions(
    const Ids& ids,
    int64_t block_tokens,
    int64_t start,
    int64_t stop,
    const BlockPlan& plan) {
  int64_t pos = start;
  bool ok = true;
  for (const BlockRun& run : plan.runs()) {
    ok = ok && run.rows >= 1 && run.cache_row == pos - start;
    ok = ok && run.block == ids[pos / block_tokens];
    ok = ok && run.slot == pos % block_tokens;
    ok = ok && run.slot + run.rows <= block_tokens;
    pos += run.rows;
    ok = ok && (pos == stop || pos % block_tokens == 0);
  }
  ok = ok && pos == stop;
  record(
      ok,
      __FILE__,
      __LINE__,
      "runs of [" + show(start) + ", " + show(stop) + ") through " + show(ids) +
          " in blocks of " + show(block_tokens) + ": " + show(plan.runs()));
}

// Random tables and ranges against the position-by-position reference.
void test_random_against_positions() {
  std::mt19937 rng(19);
  for (int trial = 0; trial < 500; ++trial) {
    int64_t block_tokens = std::uniform_int_distribution<int64_t>(1, 9)(rng);
    int64_t num_entries = std::uniform_int_distribution<int64_t>(0, 6)(rng);
    Ids ids(num_entries);
    for (auto& id : ids) {
      id = std::uniform_int_distribution<int32_t>(0, 63)(rng);
    }
    int64_t positions = num_entries * block_tokens;
    auto pick = std::uniform_int_distribution<int64_t>(0, positions);
    int64_t start = pick(rng);
    int64_t stop = pick(rng);
    if (stop < start) {
      std::swap(start, stop);
    }
    BlockPlan plan(ids, block_tokens, start, stop);
    check_against_positions(ids, block_tokens, start, stop, plan);
  }
}

//   entry     0         1         2         3
//   position  0 1 2 3 | 4 5 6 7 | 8 9 10 11 | 12 ...
//   block     7 7 7 7 | 2 2 2 2 | 5 5 5  5  | 4
//   range               [5,        10)
// reads entries 1..2; base 4, so the range is [1, 6) of the window.
void test_used_blocks() {
  Ids table{7, 2, 5, 4};
  auto [ids, base] = kvpool::used_blocks(table, 5, 10, 4);
  CHECK_EQ(ids, (Ids{2, 5}));
  CHECK_EQ(base, 4);
  // The window's plan reads what the full table's plan reads.
  CHECK_EQ(
      BlockPlan(ids, 4, 5 - base, 10 - base).runs(),
      BlockPlan(table, 4, 5, 10).runs());
  // Range ends on a block boundary: the next entry is not used.
  CHECK_EQ(kvpool::used_blocks(table, 4, 8, 4).first, (Ids{2}));
  CHECK_EQ(kvpool::used_blocks(table, 0, 16, 4).first, table);
  auto [none, zero] = kvpool::used_blocks(table, 6, 6, 4);
  CHECK_EQ(none, Ids{});
  CHECK_EQ(zero, 0);
}

// A job of `rows` rows starting at row `first` of some larger copy.
struct FakeJob {
  int64_t rows;
  size_t row_bytes_;
  int64_t first = 0;

  size_t row_bytes() const {
    return row_bytes_;
  }
  FakeJob slice(int64_t r, int64_t n) const {
    return {n, row_bytes_, first + r};
  }
};
static_assert(kvpool::RowJob<FakeJob>);

// (first, rows) of each piece.
using Pieces = std::vector<std::pair<int64_t, int64_t>>;

std::string show(const Pieces& pieces) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < pieces.size(); ++i) {
    os << (i ? ", " : "") << pieces[i].first << "+" << pieces[i].second;
  }
  os << "]";
  return os.str();
}

Pieces pieces_of(const std::vector<FakeJob>& jobs) {
  Pieces out;
  for (const auto& job : jobs) {
    out.emplace_back(job.first, job.rows);
  }
  return out;
}

void test_add_job_splits_by_bytes() {
  // 10 rows of 100 bytes, at most 300 bytes a piece: 3 + 3 + 3 + 1 rows.
  std::vector<FakeJob> jobs;
  kvpool::add_job(jobs, FakeJob{10, 100}, 300);
  CHECK_EQ(pieces_of(jobs), (Pieces{{0, 3}, {3, 3}, {6, 3}, {9, 1}}));
  // Appends after what is there; exact multiples leave no short piece.
  kvpool::add_job(jobs, FakeJob{4, 150, 20}, 300);
  CHECK_EQ(
      pieces_of(jobs),
      (Pieces{{0, 3}, {3, 3}, {6, 3}, {9, 1}, {20, 2}, {22, 2}}));
  // A row over the limit still goes whole, one row per piece.
  jobs.clear();
  kvpool::add_job(jobs, FakeJob{3, 1000}, 300);
  CHECK_EQ(pieces_of(jobs), (Pieces{{0, 1}, {1, 1}, {2, 1}}));
  // Under the limit: one piece, unchanged.
  jobs.clear();
  kvpool::add_job(jobs, FakeJob{2, 100}, 300);
  CHECK_EQ(pieces_of(jobs), (Pieces{{0, 2}}));
  // No rows, or rows of no bytes: nothing.
  jobs.clear();
  kvpool::add_job(jobs, FakeJob{0, 100}, 300);
  kvpool::add_job(jobs, FakeJob{5, 0}, 300);
  CHECK_EQ(jobs.size(), size_t{0});
  // The default limit, kMaxJobBytes = 256 KiB: 256 rows of 1 KiB a piece.
  kvpool::add_job(jobs, FakeJob{600, 1024});
  CHECK_EQ(pieces_of(jobs), (Pieces{{0, 256}, {256, 256}, {512, 88}}));
}

// Every job runs exactly once, with threads (64 MiB in all) and without.
void test_run_jobs_runs_each_once() {
  for (int64_t row_bytes : {int64_t{1}, int64_t{1} << 20}) {
    std::vector<FakeJob> jobs;
    kvpool::add_job(jobs, FakeJob{64, static_cast<size_t>(row_bytes)}, 1);
    std::vector<std::atomic<int>> counts(64);
    kvpool::run_jobs(jobs, [&counts](const FakeJob& job) {
      counts[job.first].fetch_add(1);
    });
    int64_t once = 0;
    for (auto& c : counts) {
      once += c.load() == 1;
    }
    CHECK_EQ(once, 64);
  }
  // No jobs: nothing runs, nothing breaks.
  std::vector<FakeJob> none;
  int calls = 0;
  kvpool::run_jobs(none, [&calls](const FakeJob&) { ++calls; });
  CHECK_EQ(calls, 0);
}

} // namespace

int main() {
  test_header_example();
  test_empty_range();
  test_start_and_stop_mid_block();
  test_whole_blocks();
  test_one_token_blocks();
  test_unread_entries();
  test_capacity_and_headroom();
  test_errors();
  test_random_against_positions();
  test_used_blocks();
  test_add_job_splits_by_bytes();
  test_run_jobs_runs_each_once();
  std::printf("%d passed, %d failed\n", num_passed, num_failed);
  return num_failed == 0 ? 0 : 1;
}
