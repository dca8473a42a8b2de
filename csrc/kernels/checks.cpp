#include "kernels/checks.h"

#include <algorithm>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace kvpool::detail {

std::string shape_str(const mx::array& a) {
  std::ostringstream msg;
  msg << "(";
  for (int i = 0; i < static_cast<int>(a.ndim()); ++i) {
    msg << (i ? ", " : "") << a.shape(i);
  }
  msg << (a.ndim() == 1 ? ",)" : ")");
  return msg.str();
}

void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("[kvpool::") + op + "] " + what);
}

void check_positions(
    const char* op,
    const std::vector<int32_t>& block_table,
    int64_t start,
    int64_t stop,
    int num_blocks,
    int block_tokens) {
  if (start < 0 || stop < start) {
    std::ostringstream msg;
    msg << "need 0 <= start <= stop; got start " << start << ", stop " << stop
        << ".";
    fail(op, msg.str());
  }
  if (stop == start) {
    return;
  }
  int64_t blocks_needed = (stop + block_tokens - 1) / block_tokens;
  if (static_cast<int64_t>(block_table.size()) < blocks_needed) {
    std::ostringstream msg;
    msg << "positions [" << start << ", " << stop << ") need " << blocks_needed
        << " block table entries of " << block_tokens << " tokens; got "
        << block_table.size() << ".";
    fail(op, msg.str());
  }
  for (int64_t i = start / block_tokens; i < blocks_needed; ++i) {
    if (block_table[i] < 0 || block_table[i] >= num_blocks) {
      std::ostringstream msg;
      msg << "block_table[" << i << "] = " << block_table[i]
          << " is out of range for a slab of " << num_blocks << " blocks.";
      fail(op, msg.str());
    }
  }
}

void check_capacity(
    const char* op,
    int64_t start,
    int64_t stop,
    int64_t capacity) {
  if (capacity < stop - start ||
      capacity > std::numeric_limits<int32_t>::max()) {
    std::ostringstream msg;
    msg << "capacity must hold stop - start = " << stop - start
        << " positions (and fit int32); got " << capacity << ".";
    fail(op, msg.str());
  }
}

void check_distinct_blocks(
    const char* op,
    const std::vector<int32_t>& block_ids,
    int64_t start,
    int64_t stop) {
  auto sorted_ids = block_ids;
  std::sort(sorted_ids.begin(), sorted_ids.end());
  if (auto dup = std::adjacent_find(sorted_ids.begin(), sorted_ids.end());
      dup != sorted_ids.end()) {
    std::ostringstream msg;
    msg << "block " << *dup << " appears twice in the block table entries "
        << "that positions [" << start << ", " << stop << ") write.";
    fail(op, msg.str());
  }
}

mx::Stream cpu_stream(const char* op, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s, mx::Device::cpu);
  if (stream.device != mx::Device::cpu) {
    fail(op, "only a CPU stream is supported (no GPU kernel yet).");
  }
  return stream;
}

} // namespace kvpool::detail
