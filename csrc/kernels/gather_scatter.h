// Gather/scatter kernels between per-layer KV slabs and contiguous caches.
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/mlx.h"

namespace kvpool {

namespace mx = mlx::core;

// Slab layout: [num_blocks, n_kv_heads, block_tokens, head_dim]; block id b
// names slab[b] in every slab. A block table lists, for position p, the block
// block_table[p / block_tokens] (slot p % block_tokens).
//
// Example, block_tokens = 4, block_table = [7, 2], positions 0..5:
//   positions 0 1 2 3 -> slab[7][:, 0..3]   positions 4 5 -> slab[2][:, 0..1]

// Reads positions [start, stop) of every slab into one array per slab of
// shape [1, n_kv_heads, capacity, head_dim]: row t holds position start + t
// for t < stop - start; rows past that are zero. capacity >= stop - start.
// One multi-output primitive serves all slabs (slabs may differ in heads,
// head_dim and dtype; each must be 4-D fp32, fp16 or bf16 with the same
// num_blocks and block_tokens).
// Throws std::invalid_argument "[kvpool::gather] ..." on bad shapes or ids.
std::vector<mx::array> gather(
    const std::vector<mx::array>& slabs,
    const std::vector<int32_t>& block_table,
    int64_t start,
    int64_t stop,
    int64_t capacity,
    mx::StreamOrDevice s = {});

// Writes src [1, n_kv_heads, T, head_dim] (any strides) as positions
// [start, start + T) into slab through block_table, and returns the updated
// slab. The slab is 4-D of any dtype (float caches, and the uint32 codes and
// the scales and biases of quantized slabs); src has the slab's dtype. Only
// those positions change. The write is in place when MLX finds slab donatable
// at evaluation time (the caller drops every other reference and rebinds:
// slab = scatter(slab, ...)); otherwise the slab is copied first and the copy
// counter is bumped (or, in strict mode, the evaluation fails).
// Throws std::invalid_argument "[kvpool::scatter] ..." on bad shapes or ids.
mx::array scatter(
    const mx::array& slab,
    const mx::array& src,
    const std::vector<int32_t>& block_table,
    int64_t start,
    mx::StreamOrDevice s = {});

// Counts of scatter evaluations that wrote in place vs copied the slab.
struct ScatterStats {
  int64_t num_in_place = 0;
  int64_t num_copied = 0;
};
ScatterStats scatter_stats();
void reset_scatter_stats();
// When on, a scatter that would copy its slab fails instead.
void set_strict_in_place(bool strict);

} // namespace kvpool
