// Tests of the gather/scatter kernels against a host-side reference.
// Prints "N passed, M failed" and exits non-zero on any failure.
#include <cstdio>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/gather_scatter.h"

namespace mx = mlx::core;

namespace {

int num_passed = 0;
int num_failed = 0;

#define CHECK(cond)                                               \
  do {                                                            \
    if (cond) {                                                   \
      ++num_passed;                                               \
    } else {                                                      \
      ++num_failed;                                               \
      std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
    }                                                             \
  } while (0)

// Runs fn and checks that it throws E whose message contains `part`.
template <typename E>
void check_throws(
    const char* what,
    const std::function<void()>& fn,
    const std::string& part) {
  try {
    fn();
  } catch (const E& e) {
    if (std::string(e.what()).find(part) != std::string::npos) {
      ++num_passed;
      return;
    }
    ++num_failed;
    std::printf(
        "FAIL %s: message lacks '%s': %s\n", what, part.c_str(), e.what());
    return;
  } catch (const std::exception& e) {
    ++num_failed;
    std::printf("FAIL %s: wrong exception type: %s\n", what, e.what());
    return;
  }
  ++num_failed;
  std::printf("FAIL %s: did not throw\n", what);
}

// Values as float32, row-major.
std::vector<float> values(const mx::array& a) {
  auto f = mx::contiguous(mx::astype(a, mx::float32));
  f.eval();
  const float* p = f.data<float>();
  return std::vector<float>(p, p + f.size());
}

// Small integers: exact in fp16 and bf16. seed shifts the pattern.
mx::array pattern(const mx::Shape& shape, mx::Dtype dtype, int seed) {
  int64_t n = 1;
  for (int d : shape) {
    n *= d;
  }
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) {
    v[i] = static_cast<float>((i * 7 + seed * 13) % 251 - 125);
  }
  auto a = mx::astype(mx::array(v.data(), shape, mx::float32), dtype);
  a.eval();
  return a;
}

const char* data_ptr(const mx::array& a) {
  return const_cast<mx::array&>(a).data<char>();
}

// Host model of a slab [N, H, BT, D] as a flat float vector.
struct HostSlab {
  int n, h, bt, d;
  std::vector<float> v;
  float& at(int b, int head, int slot, int c) {
    return v[((static_cast<int64_t>(b) * h + head) * bt + slot) * d + c];
  }
};

// Writes src [1, H, T, D] (row-major values) at positions [start, start+T).
void host_scatter(
    HostSlab& slab,
    const std::vector<float>& src,
    int t_len,
    const std::vector<int32_t>& table,
    int start) {
  for (int head = 0; head < slab.h; ++head) {
    for (int t = 0; t < t_len; ++t) {
      int pos = start + t;
      for (int c = 0; c < slab.d; ++c) {
        slab.at(table[pos / slab.bt], head, pos % slab.bt, c) =
            src[(static_cast<int64_t>(head) * t_len + t) * slab.d + c];
      }
    }
  }
}

// Expected gather [1, H, cap, D] of positions [start, stop).
std::vector<float> host_gather(
    HostSlab& slab,
    const std::vector<int32_t>& table,
    int start,
    int stop,
    int cap) {
  std::vector<float> out(static_cast<int64_t>(slab.h) * cap * slab.d, 0.0f);
  for (int head = 0; head < slab.h; ++head) {
    for (int pos = start; pos < stop; ++pos) {
      for (int c = 0; c < slab.d; ++c) {
        out[(static_cast<int64_t>(head) * cap + pos - start) * slab.d + c] =
            slab.at(table[pos / slab.bt], head, pos % slab.bt, c);
      }
    }
  }
  return out;
}

HostSlab host_of(const mx::array& slab) {
  return {
      slab.shape(0), slab.shape(1), slab.shape(2), slab.shape(3), values(slab)};
}

void test_roundtrip(mx::Dtype dtype) {
  // 6 blocks of 4 tokens, 2 heads, head_dim 3. Table [4, 0, 5]: positions
  // 2..8 land in block 4 slots 2-3, block 0 slots 0-3, block 5 slot 0.
  auto slab = pattern({6, 2, 4, 3}, dtype, 1);
  HostSlab ref = host_of(slab);
  std::vector<int32_t> table = {4, 0, 5};
  auto src = pattern({1, 2, 7, 3}, dtype, 2);
  host_scatter(ref, values(src), 7, table, 2);

  slab = kvpool::scatter(slab, src, table, 2);
  CHECK(values(slab) == ref.v); // other slots untouched, targets written

  // Non-aligned start and stop, partial last block, headroom.
  auto out = kvpool::gather({slab}, table, 3, 9, 10);
  CHECK(out.size() == 1);
  CHECK(out[0].shape() == mx::Shape({1, 2, 10, 3}));
  CHECK(out[0].dtype() == dtype);
  CHECK(values(out[0]) == host_gather(ref, table, 3, 9, 10));

  // Exactly the scattered range comes back as src.
  auto back = kvpool::gather({slab}, table, 2, 9, 7);
  CHECK(values(back[0]) == values(src));
}

void test_multi_slab_gather() {
  // Slabs of one group may differ in heads, head_dim and dtype.
  std::vector<mx::array> slabs = {
      pattern({5, 2, 4, 3}, mx::float32, 3),
      pattern({5, 1, 4, 8}, mx::float16, 4),
      pattern({5, 4, 4, 2}, mx::bfloat16, 5)};
  // Entries 0-1 are placeholders (dropped blocks): not read from start 8.
  std::vector<int32_t> table = {-1, 99, 3, 1, 2};
  auto outs = kvpool::gather(slabs, table, 9, 19, 12);
  CHECK(outs.size() == 3);
  for (size_t i = 0; i < slabs.size(); ++i) {
    HostSlab ref = host_of(slabs[i]);
    CHECK(outs[i].dtype() == slabs[i].dtype());
    CHECK(
        outs[i].shape() ==
        mx::Shape({1, slabs[i].shape(1), 12, slabs[i].shape(3)}));
    CHECK(values(outs[i]) == host_gather(ref, table, 9, 19, 12));
  }
}

void test_empty_ranges() {
  auto slab = pattern({3, 2, 4, 3}, mx::float32, 6);
  // stop == start: all headroom, all zero, table may be empty.
  auto outs = kvpool::gather({slab}, {}, 5, 5, 4);
  CHECK(values(outs[0]) == std::vector<float>(2 * 4 * 3, 0.0f));
  // T == 0 scatter returns the slab itself.
  auto same = kvpool::scatter(slab, mx::zeros({1, 2, 0, 3}), {}, 0);
  CHECK(same.id() == slab.id());
}

void test_strided_inputs() {
  // src is a slice of a bigger cache: [1, 2, 20, 3][:, :, 3:10, :].
  auto cache = pattern({1, 2, 20, 3}, mx::float16, 7);
  auto src = mx::slice(cache, {0, 0, 3, 0}, {1, 2, 10, 3});
  auto slab = mx::zeros({4, 2, 4, 3}, mx::float16);
  slab.eval();
  HostSlab ref = host_of(slab);
  std::vector<int32_t> table = {2, 0};
  host_scatter(ref, values(src), 7, table, 1);
  slab = kvpool::scatter(slab, src, table, 1);
  CHECK(values(slab) == ref.v);

  // src with a non-unit last stride: transpose of [1, 2, 3, 7].
  auto src_t =
      mx::transpose(pattern({1, 2, 3, 7}, mx::float16, 8), {0, 1, 3, 2});
  host_scatter(ref, values(src_t), 7, table, 1);
  slab = kvpool::scatter(slab, src_t, table, 1);
  CHECK(values(slab) == ref.v);

  // A slab that is a transposed view: gather reads it through its strides.
  auto slab_t =
      mx::transpose(pattern({4, 2, 3, 4}, mx::float32, 9), {0, 1, 3, 2});
  slab_t.eval();
  HostSlab ref_t = host_of(slab_t);
  auto outs = kvpool::gather({slab_t}, {3, 1}, 1, 7, 8);
  CHECK(values(outs[0]) == host_gather(ref_t, {3, 1}, 1, 7, 8));

  // Scatter into a non-contiguous slab copies it first (never in place).
  kvpool::reset_scatter_stats();
  auto src2 = pattern({1, 2, 2, 3}, mx::float32, 10);
  host_scatter(ref_t, values(src2), 2, {0, 2}, 3);
  slab_t = kvpool::scatter(slab_t, src2, {0, 2}, 3);
  CHECK(values(slab_t) == ref_t.v);
  CHECK(kvpool::scatter_stats().num_copied == 1);
}

void test_large_threaded() {
  // About 5 MiB per gather and 1 MiB per scatter: split over threads.
  auto slab = pattern({16, 8, 64, 128}, mx::float16, 11);
  std::vector<int32_t> table = {9, 3, 15, 0, 7, 12, 1, 4, 8, 2};
  HostSlab ref = host_of(slab);
  auto outs = kvpool::gather({slab, slab, slab, slab}, table, 5, 600, 700);
  auto expect = host_gather(ref, table, 5, 600, 700);
  for (const auto& out : outs) {
    CHECK(values(out) == expect);
  }

  auto src = pattern({1, 8, 595, 128}, mx::float16, 12);
  host_scatter(ref, values(src), 595, table, 5);
  slab = kvpool::scatter(slab, src, table, 5);
  CHECK(values(slab) == ref.v);
}

void test_in_place() {
  auto slab = mx::zeros({8, 2, 4, 3}, mx::float32);
  slab.eval();
  const char* before = data_ptr(slab);
  auto src = pattern({1, 2, 5, 3}, mx::float32, 13);
  kvpool::reset_scatter_stats();

  // One reference, rebound: written in place.
  slab = kvpool::scatter(slab, src, {6, 2}, 2);
  slab.eval();
  CHECK(data_ptr(slab) == before);
  CHECK(kvpool::scatter_stats().num_in_place == 1);
  CHECK(kvpool::scatter_stats().num_copied == 0);

  // Many turns stay in the same buffer.
  for (int i = 0; i < 10; ++i) {
    slab = kvpool::scatter(slab, src, {i % 8, (i + 3) % 8}, i % 3);
    slab.eval();
  }
  CHECK(data_ptr(slab) == before);
  CHECK(kvpool::scatter_stats().num_in_place == 11);

  // Another reference holds the old slab: copied, and the old one unchanged.
  auto old = slab;
  auto old_values = values(old);
  auto src2 = pattern({1, 2, 3, 3}, mx::float32, 14);
  slab = kvpool::scatter(slab, src2, {1}, 0);
  slab.eval();
  CHECK(data_ptr(slab) != before);
  CHECK(data_ptr(old) == before);
  CHECK(values(old) == old_values);
  CHECK(values(slab) != old_values);
  CHECK(kvpool::scatter_stats().num_copied == 1);

  kvpool::reset_scatter_stats();
  CHECK(kvpool::scatter_stats().num_in_place == 0);
  CHECK(kvpool::scatter_stats().num_copied == 0);
}

void test_strict_mode() {
  auto slab = mx::zeros({4, 2, 4, 3}, mx::float32);
  slab.eval();
  auto src = pattern({1, 2, 2, 3}, mx::float32, 15);
  kvpool::reset_scatter_stats();
  kvpool::set_strict_in_place(true);
  {
    auto keep = slab;
    auto out = kvpool::scatter(slab, src, {3}, 1);
    check_throws<std::runtime_error>(
        "strict eval", [&] { out.eval(); }, "strict in-place");
    // The failed node fails again, and MLX keeps working.
    check_throws<std::runtime_error>(
        "strict eval again", [&] { out.eval(); }, "not donatable");
    auto ok = mx::ones({3}) + mx::ones({3});
    CHECK(values(ok) == std::vector<float>(3, 2.0f));
  }
  // With the extra references gone the same scatter writes in place.
  const char* before = data_ptr(slab);
  slab = kvpool::scatter(slab, src, {3}, 1);
  slab.eval();
  CHECK(data_ptr(slab) == before);
  CHECK(kvpool::scatter_stats().num_in_place == 1);
  CHECK(kvpool::scatter_stats().num_copied == 0);
  kvpool::set_strict_in_place(false);
}

void test_errors() {
  auto slab = mx::zeros({4, 2, 4, 3}, mx::float32);
  auto src = mx::zeros({1, 2, 3, 3}, mx::float32);
  using IA = std::invalid_argument;
  check_throws<IA>(
      "no slabs",
      [&] { kvpool::gather({}, {0}, 0, 1, 1); },
      "[kvpool::gather] need at least one slab");
  check_throws<IA>(
      "3-D slab",
      [&] { kvpool::gather({mx::zeros({4, 2, 4})}, {0}, 0, 1, 1); },
      "got shape (4, 2, 4)");
  check_throws<IA>(
      "int dtype",
      [&] {
        kvpool::gather({mx::zeros({4, 2, 4, 3}, mx::int32)}, {0}, 0, 1, 1);
      },
      "float32, float16 or bfloat16; got int32");
  check_throws<IA>(
      "num_blocks differ",
      [&] { kvpool::gather({slab, mx::zeros({5, 2, 4, 3})}, {0}, 0, 1, 1); },
      "slab 1 got shape (5, 2, 4, 3)");
  check_throws<IA>(
      "block_tokens differ",
      [&] { kvpool::gather({slab, mx::zeros({4, 2, 8, 3})}, {0}, 0, 1, 1); },
      "slab 1 got shape (4, 2, 8, 3)");
  check_throws<IA>(
      "id too big",
      [&] { kvpool::gather({slab}, {0, 4}, 0, 6, 6); },
      "block_table[1] = 4 is out of range for a slab of 4 blocks");
  check_throws<IA>(
      "negative id",
      [&] { kvpool::gather({slab}, {-1}, 0, 2, 2); },
      "block_table[0] = -1");
  check_throws<IA>(
      "start > stop",
      [&] { kvpool::gather({slab}, {0}, 3, 2, 2); },
      "got start 3, stop 2");
  check_throws<IA>(
      "negative start",
      [&] { kvpool::gather({slab}, {0}, -1, 2, 3); },
      "got start -1");
  check_throws<IA>(
      "small capacity",
      [&] { kvpool::gather({slab}, {0, 1}, 1, 6, 4); },
      "stop - start = 5 positions (and fit int32); got 4");
  check_throws<IA>(
      "short table",
      [&] { kvpool::gather({slab}, {0}, 0, 5, 5); },
      "need 2 block table entries of 4 tokens; got 1");
  check_throws<IA>(
      "scatter short table",
      [&] { kvpool::scatter(slab, src, {0}, 2); },
      "[kvpool::scatter] positions [2, 5) need 2 block table entries");
  check_throws<IA>(
      "scatter heads",
      [&] { kvpool::scatter(slab, mx::zeros({1, 3, 3, 3}), {0}, 0); },
      "src must be [1, 2, T, 3] to match the slab (4, 2, 4, 3); got shape "
      "(1, 3, 3, 3)");
  check_throws<IA>(
      "scatter batch",
      [&] { kvpool::scatter(slab, mx::zeros({2, 2, 3, 3}), {0}, 0); },
      "got shape (2, 2, 3, 3)");
  check_throws<IA>(
      "scatter dtype",
      [&] {
        kvpool::scatter(slab, mx::zeros({1, 2, 3, 3}, mx::float16), {0}, 0);
      },
      "src dtype float16 differs from the slab's float32");
  check_throws<IA>(
      "scatter id",
      [&] { kvpool::scatter(slab, src, {7}, 0); },
      "block_table[0] = 7 is out of range");
  check_throws<IA>(
      "scatter duplicate",
      [&] { kvpool::scatter(slab, src, {1, 1}, 2); },
      "block 1 appears twice");
  check_throws<IA>(
      "scatter negative start",
      [&] { kvpool::scatter(slab, src, {1}, -1); },
      "got start -1");
}

} // namespace

int main() {
  for (auto dtype : {mx::float32, mx::float16, mx::bfloat16}) {
    test_roundtrip(dtype);
  }
  test_multi_slab_gather();
  test_empty_ranges();
  test_strided_inputs();
  test_large_threaded();
  test_in_place();
  test_strict_mode();
  test_errors();
  std::printf("%d passed, %d failed\n", num_passed, num_failed);
  return num_failed == 0 ? 0 : 1;
}
