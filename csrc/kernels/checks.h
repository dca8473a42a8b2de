// Argument checks the gather/scatter ops share. Every failure throws
// std::invalid_argument "[kvpool::<op>] ..." with the numbers in the message.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "mlx/mlx.h"

namespace kvpool::detail {

namespace mx = mlx::core;

// "(4, 2, 8, 3)"; a 1-D shape reads "(5,)".
std::string shape_str(const mx::array& a);

[[noreturn]] void fail(const char* op, const std::string& what);

// Checks that block_table covers [start, stop) and that the entries it reads
// name blocks of the slab. Entries outside that range are not read (they may
// be placeholders, e.g. for blocks a sliding window dropped).
void check_positions(
    const char* op,
    const std::vector<int32_t>& block_table,
    int64_t start,
    int64_t stop,
    int num_blocks,
    int block_tokens);

// Checks 0 <= stop - start <= capacity <= INT32_MAX.
void check_capacity(
    const char* op,
    int64_t start,
    int64_t stop,
    int64_t capacity);

// Two table entries naming one block would race to write the same slot.
void check_distinct_blocks(
    const char* op,
    const std::vector<int32_t>& block_ids,
    int64_t start,
    int64_t stop);

// The CPU stream of s; throws for a GPU stream (no GPU kernel yet).
mx::Stream cpu_stream(const char* op, mx::StreamOrDevice s);

} // namespace kvpool::detail
