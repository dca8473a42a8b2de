#include "kernels/plan.h"

#include <sstream>
#include <stdexcept>
#include <string>

namespace kvpool {

namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("[kvpool::block_plan] " + what);
}

} // namespace

BlockPlan::BlockPlan(
    std::span<const int32_t> block_ids,
    int64_t block_tokens,
    int64_t start,
    int64_t stop,
    int64_t capacity)
    : length_(stop - start), capacity_(capacity) {
  if (block_tokens <= 0) {
    std::ostringstream msg;
    msg << "block_tokens must be positive. Received " << block_tokens << ".";
    fail(msg.str());
  }
  if (start < 0 || stop < start) {
    std::ostringstream msg;
    msg << "need 0 <= start <= stop. Received start " << start << ", stop "
        << stop << ".";
    fail(msg.str());
  }
  if (capacity < length_) {
    std::ostringstream msg;
    msg << "capacity must hold the stop - start = " << length_
        << " positions. Received capacity " << capacity << ".";
    fail(msg.str());
  }
  if (length_ == 0) {
    return;
  }
  int64_t blocks_needed = (stop + block_tokens - 1) / block_tokens;
  if (static_cast<int64_t>(block_ids.size()) < blocks_needed) {
    std::ostringstream msg;
    msg << "positions [" << start << ", " << stop << ") need " << blocks_needed
        << " block table entries of " << block_tokens << " tokens. Received "
        << block_ids.size() << " entries.";
    fail(msg.str());
  }
  runs_.reserve(blocks_needed - start / block_tokens);
  for (int64_t pos = start; pos < stop;) {
    int64_t slot = pos % block_tokens;
    int64_t rows = std::min(block_tokens - slot, stop - pos);
    runs_.push_back({block_ids[pos / block_tokens], slot, rows, pos - start});
    pos += rows;
  }
}

std::pair<std::vector<int32_t>, int64_t> used_blocks(
    const std::vector<int32_t>& block_table,
    int64_t start,
    int64_t stop,
    int block_tokens) {
  if (stop == start) {
    return {{}, 0};
  }
  int64_t first = start / block_tokens;
  int64_t last = (stop - 1) / block_tokens;
  return {
      std::vector<int32_t>(
          block_table.begin() + first, block_table.begin() + last + 1),
      first * block_tokens};
}

} // namespace kvpool
