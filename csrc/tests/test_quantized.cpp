// Tests of the quantized gather/scatter kernels against MLX's own
// mx::quantize / mx::dequantize, compared bit for bit. Built twice: with the
// SIMD kernels where the CPU has them, and with KVPOOL_SCALAR_KERNELS (the
// portable code every other CPU runs).
// Prints "N passed, M failed" and exits non-zero on any failure.
#include <cmath>
#include <cstdio>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/gather_scatter.h"
#include "kernels/quantized.h"

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

// Runs fn and checks that it throws std::invalid_argument containing `part`.
void check_throws(
    const char* what,
    const std::function<void()>& fn,
    const std::string& part) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
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

// The raw bits of every element (2- or 4-byte types), row-major.
std::vector<uint32_t> raw_bits(const mx::array& a) {
  auto raw =
      a.itemsize() == 2 ? mx::view(a, mx::uint16) : mx::view(a, mx::uint32);
  auto wide = mx::contiguous(mx::astype(raw, mx::uint32));
  wide.eval();
  const uint32_t* p = wide.data<uint32_t>();
  return std::vector<uint32_t>(p, p + wide.size());
}

std::vector<bool> nan_mask(const mx::array& a) {
  auto f = mx::contiguous(mx::astype(a, mx::float32));
  f.eval();
  std::vector<bool> mask(f.size());
  for (size_t i = 0; i < f.size(); ++i) {
    mask[i] = std::isnan(f.data<float>()[i]);
  }
  return mask;
}

const char* data_ptr(const mx::array& a) {
  return const_cast<mx::array&>(a).data<char>();
}

mx::array random_dense(const mx::Shape& shape, mx::Dtype dtype, uint64_t seed) {
  auto a = mx::astype(
      mx::multiply(
          mx::random::normal(
              shape, mx::float32, 0.0, 1.0, mx::random::key(seed)),
          mx::array(2.0f)),
      dtype);
  a.eval();
  return a;
}

kvpool::QuantizedSlab
quantize(const mx::array& dense, int bits, int group_size) {
  auto parts = mx::quantize(dense, group_size, bits);
  mx::eval(parts);
  return {parts[0], parts[1], parts[2]};
}

mx::array
dequantize(const kvpool::QuantizedSlab& slab, int bits, int group_size) {
  return mx::dequantize(
      slab.codes, slab.scales, slab.biases, group_size, bits, "affine");
}

// Expected gather [1, H, cap, D] of positions [start, stop) of a dense
// [N, H, BT, D] slab given by its bits.
std::vector<uint32_t> host_gather(
    const std::vector<uint32_t>& slab,
    const mx::Shape& shape,
    const std::vector<int32_t>& table,
    int start,
    int stop,
    int cap) {
  int heads = shape[1];
  int bt = shape[2];
  int d = shape[3];
  std::vector<uint32_t> out(static_cast<size_t>(heads) * cap * d, 0);
  for (int h = 0; h < heads; ++h) {
    for (int pos = start; pos < stop; ++pos) {
      int64_t from = ((static_cast<int64_t>(table[pos / bt]) * heads + h) * bt +
                      pos % bt) *
          d;
      int64_t to = (static_cast<int64_t>(h) * cap + pos - start) * d;
      for (int c = 0; c < d; ++c) {
        out[to + c] = slab[from + c];
      }
    }
  }
  return out;
}

void test_gather_matches_dequantize(
    mx::Dtype dtype,
    int bits,
    int group_size,
    int head_dim) {
  mx::Shape shape = {6, 2, 16, head_dim};
  auto slab = quantize(
      random_dense(shape, dtype, bits * 100 + head_dim), bits, group_size);
  auto expect_all = raw_bits(dequantize(slab, bits, group_size));
  // Entry 0 is a placeholder that [19, 70) never reads; 70 ends mid-block.
  std::vector<int32_t> table = {-1, 4, 0, 5, 2};
  auto outs =
      kvpool::gather_dequantized({slab}, table, 19, 70, 60, bits, group_size);
  CHECK(outs.size() == 1);
  CHECK(outs[0].shape() == mx::Shape({1, 2, 60, head_dim}));
  CHECK(outs[0].dtype() == dtype);
  auto got = raw_bits(outs[0]);
  CHECK(got == host_gather(expect_all, shape, table, 19, 70, 60));
}

// Random codes and random bit patterns as scales and biases: every non-NaN
// value matches MLX bit for bit, NaN where MLX has NaN.
void test_special_values(mx::Dtype dtype, int bits) {
  int width = dtype == mx::float32 ? 32 : 16;
  mx::Shape cshape = {3, 2, 8, 128 * bits / 32};
  mx::Shape sshape = {3, 2, 8, 128 / 32};
  std::mt19937 rng(bits + width);
  auto fill = [&](const mx::Shape& shape, int w) {
    size_t n = 1;
    for (int d : shape) {
      n *= d;
    }
    std::vector<uint32_t> v(n);
    for (auto& x : v) {
      x = w == 32 ? rng() : rng() & 0xFFFF;
    }
    return mx::array(v.data(), shape, mx::uint32);
  };
  auto as_dtype = [&](const mx::array& u) {
    return width == 32 ? mx::view(u, dtype)
                       : mx::view(mx::astype(u, mx::uint16), dtype);
  };
  kvpool::QuantizedSlab slab{
      fill(cshape, 32),
      as_dtype(fill(sshape, width)),
      as_dtype(fill(sshape, width))};
  mx::eval({slab.codes, slab.scales, slab.biases});
  std::vector<int32_t> table = {2, 0, 1};
  auto out = kvpool::gather_dequantized({slab}, table, 0, 24, 24, bits, 32)[0];
  auto ref = dequantize(slab, bits, 32);
  mx::Shape dshape = {3, 2, 8, 128};
  auto expect = host_gather(raw_bits(ref), dshape, table, 0, 24, 24);
  auto ref_nan = nan_mask(ref);
  std::vector<uint32_t> ref_nan_bits(ref_nan.begin(), ref_nan.end());
  auto expect_nan = host_gather(ref_nan_bits, dshape, table, 0, 24, 24);
  auto got = raw_bits(out);
  auto got_nan = nan_mask(out);
  size_t num_nan = 0;
  bool same = true;
  for (size_t i = 0; i < got.size(); ++i) {
    num_nan += expect_nan[i];
    same &= got_nan[i] == static_cast<bool>(expect_nan[i]);
    same &= expect_nan[i] || got[i] == expect[i];
  }
  CHECK(num_nan > 0 && num_nan < got.size() / 2);
  CHECK(same);
}

void test_multi_slab_and_headroom() {
  std::vector<kvpool::QuantizedSlab> slabs = {
      quantize(random_dense({5, 2, 8, 96}, mx::float16, 1), 4, 32),
      quantize(random_dense({5, 1, 8, 160}, mx::float32, 2), 4, 32),
      quantize(random_dense({5, 3, 8, 64}, mx::bfloat16, 3), 4, 32)};
  std::vector<int32_t> table = {3, 1, 4, 0};
  auto outs = kvpool::gather_dequantized(slabs, table, 5, 29, 40, 4, 32);
  CHECK(outs.size() == 3);
  for (size_t i = 0; i < slabs.size(); ++i) {
    auto dense_shape = slabs[i].codes.shape();
    dense_shape[3] = outs[i].shape(3);
    CHECK(outs[i].shape(2) == 40);
    CHECK(outs[i].dtype() == slabs[i].scales.dtype());
    CHECK(
        raw_bits(outs[i]) ==
        host_gather(
            raw_bits(dequantize(slabs[i], 4, 32)),
            dense_shape,
            table,
            5,
            29,
            40));
  }
  // All headroom: zeros.
  auto empty = kvpool::gather_dequantized({slabs[0]}, {}, 4, 4, 3, 4, 32)[0];
  CHECK(raw_bits(empty) == std::vector<uint32_t>(2 * 3 * 96, 0));
}

void test_large_threaded() {
  // About 8 MiB of output: split over threads and many jobs.
  auto slab = quantize(random_dense({16, 8, 64, 128}, mx::float16, 4), 8, 64);
  std::vector<int32_t> table = {9, 3, 15, 0, 7, 12, 1, 4, 8, 2};
  auto outs = kvpool::gather_dequantized(
      {slab, slab, slab, slab}, table, 5, 600, 700, 8, 64);
  auto expect = host_gather(
      raw_bits(dequantize(slab, 8, 64)), {16, 8, 64, 128}, table, 5, 600, 700);
  for (const auto& out : outs) {
    CHECK(raw_bits(out) == expect);
  }
}

kvpool::QuantizedSlab zero_slab(
    int n,
    int h,
    int bt,
    int d,
    mx::Dtype dtype,
    int bits,
    int group_size) {
  auto [codes_shape, scales_shape] =
      kvpool::quantized_shapes(n, h, bt, d, bits, group_size);
  kvpool::QuantizedSlab slab{
      mx::zeros(codes_shape, mx::uint32),
      mx::zeros(scales_shape, dtype),
      mx::zeros(scales_shape, dtype)};
  mx::eval({slab.codes, slab.scales, slab.biases});
  return slab;
}

void test_scatter_in_place(mx::Dtype dtype, int bits, int group_size) {
  int dense_dim = group_size == 32 ? 160 : 128;
  auto slab = zero_slab(6, 2, 256, dense_dim, dtype, bits, group_size);
  int head_dim = slab.codes.shape(3) * 32 / bits;
  const char* ptrs[3] = {
      data_ptr(slab.codes), data_ptr(slab.scales), data_ptr(slab.biases)};
  std::vector<int32_t> table = {4, 1, 3};
  auto src = random_dense({1, 2, 400, head_dim}, dtype, 7);
  kvpool::reset_scatter_stats();
  slab = kvpool::scatter_quantized(slab, src, table, 300, bits, group_size);
  mx::eval({slab.codes, slab.scales, slab.biases});
  CHECK(data_ptr(slab.codes) == ptrs[0]);
  CHECK(data_ptr(slab.scales) == ptrs[1]);
  CHECK(data_ptr(slab.biases) == ptrs[2]);
  CHECK(kvpool::scatter_stats().num_in_place == 3);
  CHECK(kvpool::scatter_stats().num_copied == 0);

  // Positions [300, 700) hold mx::quantize(src); every other slot is zero.
  auto want = mx::quantize(src, group_size, bits);
  const mx::array* parts[3] = {&slab.codes, &slab.scales, &slab.biases};
  for (int k = 0; k < 3; ++k) {
    auto shape = parts[k]->shape();
    std::vector<uint32_t> zeros(parts[k]->size(), 0);
    auto gathered =
        host_gather(raw_bits(*parts[k]), shape, table, 300, 700, 400);
    CHECK(gathered == raw_bits(want[k]));
    // Clearing the written slots leaves zeros only.
    auto all = raw_bits(*parts[k]);
    int bt = shape[2];
    int cols = shape[3];
    for (int h = 0; h < shape[1]; ++h) {
      for (int p = 300; p < 700; ++p) {
        int64_t at =
            ((static_cast<int64_t>(table[p / bt]) * shape[1] + h) * bt +
             p % bt) *
            cols;
        std::fill(all.begin() + at, all.begin() + at + cols, 0);
      }
    }
    CHECK(all == zeros);
  }
  auto out = kvpool::gather_dequantized(
      {slab}, table, 300, 700, 400, bits, group_size)[0];
  auto reference =
      mx::dequantize(want[0], want[1], want[2], group_size, bits, "affine");
  CHECK(raw_bits(out) == raw_bits(reference));
}

void test_scatter_copies_shared_slab() {
  auto slab = zero_slab(4, 1, 8, 64, mx::float16, 8, 64);
  auto old = slab;
  auto src = random_dense({1, 1, 3, 64}, mx::float16, 9);
  kvpool::reset_scatter_stats();
  auto fresh = kvpool::scatter_quantized(slab, src, {2}, 1, 8, 64);
  mx::eval({fresh.codes, fresh.scales, fresh.biases});
  CHECK(kvpool::scatter_stats().num_copied == 3);
  CHECK(data_ptr(fresh.codes) != data_ptr(old.codes));
  CHECK(raw_bits(old.scales) == std::vector<uint32_t>(old.scales.size(), 0));
  // T == 0 returns the slab itself.
  auto same = kvpool::scatter_quantized(
      fresh, mx::zeros({1, 1, 0, 64}, mx::float16), {}, 0, 8, 64);
  CHECK(same.codes.id() == fresh.codes.id());
  kvpool::reset_scatter_stats();
}

void test_errors() {
  auto q = quantize(mx::zeros({4, 2, 4, 64}), 8, 32);
  check_throws(
      "head_dim not divisible",
      [] { kvpool::quantized_shapes(4, 2, 16, 100, 4, 32); },
      "[kvpool::quantized_shapes] head_dim 100 is not a positive multiple of group_size 32");
  check_throws(
      "bits 3",
      [] { kvpool::quantized_shapes(4, 2, 16, 128, 3, 64); },
      "bits must be 4 or 8; got 3");
  check_throws(
      "group 128",
      [] { kvpool::quantized_shapes(4, 2, 16, 128, 4, 128); },
      "group_size must be 32 or 64; got 128");
  check_throws(
      "zero blocks",
      [] { kvpool::quantized_shapes(0, 2, 16, 128, 4, 64); },
      "must be positive; got 0, 2, 16");
  check_throws(
      "no slabs",
      [] { kvpool::gather_dequantized({}, {0}, 0, 1, 1, 8, 32); },
      "[kvpool::gather_dequantized] need at least one slab");
  check_throws(
      "wrong group size",
      [&] { kvpool::gather_dequantized({q}, {0}, 0, 1, 1, 8, 64); },
      "must have shape (4, 2, 4, 1) for group_size 64; got (4, 2, 4, 2)");
  check_throws(
      "int codes",
      [&] {
        kvpool::gather_dequantized(
            {{mx::astype(q.codes, mx::int32), q.scales, q.biases}},
            {0},
            0,
            1,
            1,
            8,
            32);
      },
      "slab 0 codes must be uint32; got int32");
  check_throws(
      "mixed dtypes",
      [&] {
        kvpool::gather_dequantized(
            {{q.codes, q.scales, mx::astype(q.biases, mx::float16)}},
            {0},
            0,
            1,
            1,
            8,
            32);
      },
      "got float32 and float16");
  check_throws(
      "id out of range",
      [&] { kvpool::gather_dequantized({q}, {0, 4}, 0, 6, 6, 8, 32); },
      "block_table[1] = 4 is out of range for a slab of 4 blocks");
  check_throws(
      "small capacity",
      [&] { kvpool::gather_dequantized({q}, {0, 1}, 1, 6, 4, 8, 32); },
      "stop - start = 5 positions (and fit int32); got 4");
  check_throws(
      "scatter src head_dim",
      [&] {
        kvpool::scatter_quantized(q, mx::zeros({1, 2, 3, 96}), {0}, 0, 8, 32);
      },
      "[kvpool::scatter_quantized] src must be [1, 2, T, 64]");
  check_throws(
      "scatter src dtype",
      [&] {
        kvpool::scatter_quantized(
            q, mx::zeros({1, 2, 3, 64}, mx::float16), {0}, 0, 8, 32);
      },
      "src dtype float16 differs from the slab's float32 scales and biases");
  check_throws(
      "scatter duplicate",
      [&] {
        kvpool::scatter_quantized(
            q, mx::zeros({1, 2, 6, 64}), {1, 1}, 0, 8, 32);
      },
      "block 1 appears twice");
}

} // namespace

int main() {
  for (auto dtype : {mx::float16, mx::bfloat16, mx::float32}) {
    for (int bits : {4, 8}) {
      for (int head_dim : {96, 128, 160}) {
        test_gather_matches_dequantize(dtype, bits, 32, head_dim);
      }
      for (int head_dim : {64, 128}) {
        test_gather_matches_dequantize(dtype, bits, 64, head_dim);
      }
      test_special_values(dtype, bits);
      test_scatter_in_place(dtype, bits, 32);
      test_scatter_in_place(dtype, bits, 64);
    }
  }
  test_multi_slab_and_headroom();
  test_large_threaded();
  test_scatter_copies_shared_slab();
  test_errors();
  std::printf("%d passed, %d failed\n", num_passed, num_failed);
  return num_failed == 0 ? 0 : 1;
}
