// Microbenchmark of the gather/scatter kernels at EXP-006 size: 48 layers of
// K and V slabs [64, 8, 256, 128] fp16 (3 GiB), 32 blocks gathered into
// contiguous caches and scattered back; then the same gather out of 8-bit and
// 4-bit quantized slabs (group size 64, dequantized in the gather), timed in
// alternation with the dense gather of the same output. Prints one JSON
// object.
//
//   bench_gather_scatter [--iters N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/gather_scatter.h"
#include "kernels/quantized.h"

namespace mx = mlx::core;

namespace {

constexpr int kLayers = 48;
constexpr int kSlabBlocks = 64;
constexpr int kHeads = 8;
constexpr int kBlockTokens = 256;
constexpr int kHeadDim = 128;
constexpr int kBlocks = 32;
constexpr int kTokens = kBlocks * kBlockTokens;
constexpr int kGroupSize = 64;

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  double idx = q * (v.size() - 1);
  size_t lo = static_cast<size_t>(idx);
  size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (idx - lo);
}

std::string summary(const std::vector<double>& ms, double bytes) {
  double p50 = percentile(ms, 0.5);
  char buf[256];
  std::snprintf(
      buf,
      sizeof(buf),
      "{\"p50_ms\": %.2f, \"p95_ms\": %.2f, \"gb_per_s\": %.2f}",
      p50,
      percentile(ms, 0.95),
      bytes / (p50 * 1e-3) / 1e9);
  return buf;
}

// Bytes of every layer's K and V slabs at `bits` (16: dense fp16).
double slab_bytes(int bits) {
  double elems = 2.0 * kLayers * kSlabBlocks * kHeads * kBlockTokens * kHeadDim;
  if (bits == 16) {
    return elems * 2;
  }
  return elems * bits / 8 + elems / kGroupSize * 2 * 2;
}

// Dense gather vs gather_dequantized from 8-bit and 4-bit slabs, in
// alternation (load from elsewhere hits all three alike). Returns the JSON
// of the three timings and the ratios of their medians.
std::string bench_quantized(
    const std::vector<mx::array>& slabs,
    const std::vector<int32_t>& table,
    int iters,
    double bytes) {
  std::vector<std::vector<kvpool::QuantizedSlab>> quantized(2);
  const int bit_widths[2] = {8, 4};
  for (int q = 0; q < 2; ++q) {
    for (const auto& slab : slabs) {
      auto parts = mx::quantize(slab, kGroupSize, bit_widths[q]);
      mx::eval(parts);
      quantized[q].push_back({parts[0], parts[1], parts[2]});
    }
  }
  std::vector<double> ms[3];
  for (int i = 0; i < iters + 1; ++i) {
    for (int m = 0; m < 3; ++m) {
      auto t0 = Clock::now();
      {
        auto caches = m == 0 ? kvpool::gather(slabs, table, 0, kTokens, kTokens)
                             : kvpool::gather_dequantized(
                                   quantized[m - 1],
                                   table,
                                   0,
                                   kTokens,
                                   kTokens,
                                   bit_widths[m - 1],
                                   kGroupSize);
        mx::eval(caches);
      }
      if (i > 0) {
        ms[m].push_back(ms_since(t0));
      }
    }
  }
  double dense = percentile(ms[0], 0.5);
  char buf[1024];
  std::snprintf(
      buf,
      sizeof(buf),
      "{\"group_size\": %d, \"dense\": %s, \"q8\": %s, \"q4\": %s, "
      "\"q8_vs_dense\": %.3f, \"q4_vs_dense\": %.3f, "
      "\"slab_bytes\": {\"dense\": %.0f, \"q8\": %.0f, \"q4\": %.0f}}",
      kGroupSize,
      summary(ms[0], bytes).c_str(),
      summary(ms[1], bytes).c_str(),
      summary(ms[2], bytes).c_str(),
      percentile(ms[1], 0.5) / dense,
      percentile(ms[2], 0.5) / dense,
      slab_bytes(16),
      slab_bytes(8),
      slab_bytes(4));
  return buf;
}

} // namespace

int main(int argc, char** argv) {
  int iters = 10;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--iters") {
      iters = std::max(1, std::atoi(argv[i + 1]));
    }
  }
  mx::set_cache_limit(size_t{8} << 30);

  std::vector<mx::array> slabs;
  for (int i = 0; i < 2 * kLayers; ++i) {
    slabs.push_back(
        mx::full(
            {kSlabBlocks, kHeads, kBlockTokens, kHeadDim},
            mx::array(static_cast<float>(i % 7)),
            mx::float16));
  }
  mx::eval(slabs);

  std::vector<int32_t> table(kSlabBlocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(0));
  table.resize(kBlocks);

  const double bytes = 2.0 * kLayers * kHeads * kTokens * kHeadDim * 2;

  // Gather: every layer's K and V in one call, no headroom.
  std::vector<double> gather_ms;
  std::vector<mx::array> caches;
  for (int i = 0; i < iters + 1; ++i) {
    caches.clear(); // Returns last round's buffers to MLX's cache.
    auto t0 = Clock::now();
    caches = kvpool::gather(slabs, table, 0, kTokens, kTokens);
    mx::eval(caches);
    if (i > 0) {
      gather_ms.push_back(ms_since(t0));
    }
  }

  // Scatter: write each cache back into its slab in place.
  kvpool::reset_scatter_stats();
  std::vector<double> scatter_ms;
  for (int i = 0; i < iters + 1; ++i) {
    auto t0 = Clock::now();
    for (size_t l = 0; l < slabs.size(); ++l) {
      slabs[l] = kvpool::scatter(slabs[l], caches[l], table, 0);
    }
    mx::eval(slabs);
    if (i > 0) {
      scatter_ms.push_back(ms_since(t0));
    }
  }
  auto stats = kvpool::scatter_stats();

  caches.clear();
  auto quantized = bench_quantized(slabs, table, iters, bytes);

  // Physical limit: one memcpy of the same bytes, single-threaded.
  std::vector<char> src(static_cast<size_t>(bytes), 1);
  std::vector<char> dst(static_cast<size_t>(bytes), 0);
  std::vector<double> memcpy_ms;
  for (int i = 0; i < iters + 1; ++i) {
    auto t0 = Clock::now();
    std::memcpy(dst.data(), src.data(), src.size());
    if (i > 0) {
      memcpy_ms.push_back(ms_since(t0));
    }
  }

  std::printf(
      "{\"bench\": \"gather_scatter_cpp\", \"layers\": %d, "
      "\"slab_shape\": [%d, %d, %d, %d], \"dtype\": \"float16\", "
      "\"blocks\": %d, \"iters\": %d, \"bytes\": %.0f,\n"
      " \"gather\": %s,\n \"scatter\": %s,\n \"memcpy\": %s,\n"
      " \"gather_quantized\": %s,\n"
      " \"scatter_in_place\": %lld, \"scatter_copied\": %lld}\n",
      kLayers,
      kSlabBlocks,
      kHeads,
      kBlockTokens,
      kHeadDim,
      kBlocks,
      iters,
      bytes,
      summary(gather_ms, bytes).c_str(),
      summary(scatter_ms, bytes).c_str(),
      summary(memcpy_ms, bytes).c_str(),
      quantized.c_str(),
      static_cast<long long>(stats.num_in_place),
      static_cast<long long>(stats.num_copied));
  return stats.num_copied == 0 ? 0 : 1;
}
