// Gather/scatter between affine-quantized per-layer KV slabs and dense caches.
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/mlx.h"

namespace kvpool {

namespace mx = mlx::core;

// A quantized slab: MLX's affine format (mx::quantize along head_dim) of a
// dense slab [num_blocks, n_kv_heads, block_tokens, head_dim]:
//   codes   [num_blocks, n_kv_heads, block_tokens, head_dim * bits / 32]
//           uint32; element j of a row sits in word j / (32 / bits), bits
//           [(j % (32 / bits)) * bits, + bits)
//   scales  [num_blocks, n_kv_heads, block_tokens, head_dim / group_size]
//   biases  the same shape; scales and biases in the cache dtype (float32,
//           float16 or bfloat16), which is the dtype of the dense values.
// Element j of a row stands for scale[g] * q + bias[g], g = j / group_size,
// computed as mx::dequantize does on the CPU: q converted to the cache dtype,
// times the scale (rounded to the cache dtype), plus the bias (rounded).
struct QuantizedSlab {
  mx::array codes;
  mx::array scales;
  mx::array biases;
};

// The quantizations supported: bits 4 or 8, group_size 32 or 64, and a
// head_dim > 0 that group_size divides. Throws std::invalid_argument
// "[kvpool::<op>] ..." otherwise.
void check_quantization(const char* op, int head_dim, int bits, int group_size);

// The shapes of codes and of scales (= biases) of a quantized slab of dense
// shape [num_blocks, n_kv_heads, block_tokens, head_dim]; checks the
// quantization (check_quantization) and that every size is positive.
std::pair<mx::Shape, mx::Shape> quantized_shapes(
    int num_blocks,
    int n_kv_heads,
    int block_tokens,
    int head_dim,
    int bits,
    int group_size);

// Like gather(): reads positions [start, stop) of every quantized slab through
// block_table into one dense [1, n_kv_heads, capacity, head_dim] array per
// slab in the cache dtype, rows past stop - start zero. Dequantizes in the
// copy (no dense temporary of a slab); the values are bit for bit those of
// mx::dequantize(codes, scales, biases, group_size, bits) on the CPU. One
// multi-output primitive serves all slabs; slabs may differ in heads,
// head_dim and dtype but share num_blocks, block_tokens, bits and group_size.
// Throws std::invalid_argument "[kvpool::gather_dequantized] ..." on bad
// shapes, dtypes, quantization or ids.
std::vector<mx::array> gather_dequantized(
    const std::vector<QuantizedSlab>& slabs,
    const std::vector<int32_t>& block_table,
    int64_t start,
    int64_t stop,
    int64_t capacity,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

// Like scatter(): writes dense src [1, n_kv_heads, T, head_dim] (cache dtype,
// any strides) as positions [start, start + T) of the quantized slab through
// block_table, quantized as mx::quantize(src, group_size, bits) does (a
// temporary of the T rows only), and returns the updated slab. Only those
// positions change. Each of codes, scales and biases goes through its own
// scatter node, so each is written in place when donated (the caller drops
// every other reference and rebinds: slab = scatter_quantized(slab, ...)) and
// counts in scatter_stats() like any scatter.
// Throws std::invalid_argument "[kvpool::scatter_quantized] ..." on bad
// shapes, dtypes, quantization or ids.
QuantizedSlab scatter_quantized(
    const QuantizedSlab& slab,
    const mx::array& src,
    const std::vector<int32_t>& block_table,
    int64_t start,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

} // namespace kvpool
