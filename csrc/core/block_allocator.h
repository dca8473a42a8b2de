// Block-table bookkeeping for the KV pool: plain C++, no MLX, no Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvpool {

// Raised when an allocation cannot be satisfied. Nothing was taken.
class PoolExhausted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Fixed-capacity allocator of block ids [0, num_blocks) with reference
// counts and per-owner block tables.
//
// Invariants (checked by check_invariants(), asserted in tests):
//   * a block is free  <=>  ref_cnt == 0  <=>  it is on the free list;
//   * ref_cnt(b) == number of owner tables that hold b (an owner holds a block
//     at most once);
//   * num_free() + num_used() == num_blocks().
// Every mutating call validates all of its arguments before changing state:
// a call that throws leaves the allocator exactly as it was.
//
// Example, a pool of 4 blocks:
//   allocate(owner=7, n=2) -> [0, 1]      free list: 2 3
//   share(owner=9, [1])                   ref_cnt: 1 2 0 0
//   release(owner=7)                      ref_cnt: 0 1 0 0, free list: 2 3 0
class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks);

  int32_t num_blocks() const;
  int32_t num_free() const;
  int32_t num_used() const;
  // Throws std::out_of_range for an id outside [0, num_blocks).
  int32_t ref_cnt(int32_t block_id) const;

  // Takes n free blocks (ref_cnt 0 -> 1) and appends them to owner's table.
  // All-or-nothing: throws PoolExhausted (nothing taken) if fewer than n are
  // free; std::invalid_argument for n < 0. n == 0 returns {} and registers
  // nothing.
  std::vector<int32_t> allocate(int64_t owner, int32_t n);

  // Adds one reference per block (each must be in use, i.e. ref_cnt > 0) and
  // appends them to owner's table. Throws std::out_of_range for unknown ids,
  // std::invalid_argument for a free block, a duplicate in ids, or a block
  // owner already holds.
  void share(int64_t owner, const std::vector<int32_t>& block_ids);

  // Drops owner's reference on each block and removes it from owner's table;
  // a block whose ref_cnt reaches 0 returns to the free list. Throws
  // std::out_of_range for unknown ids, std::invalid_argument for a free block
  // ("double free"), a block owner does not hold, or a duplicate in ids.
  void free(int64_t owner, const std::vector<int32_t>& block_ids);

  // Drops every reference owner holds and forgets the owner. Returns how
  // many blocks went back to the free list. Unknown owner: returns 0.
  int32_t release(int64_t owner);

  // Owner's block table in allocation order; empty for an unknown owner.
  std::vector<int32_t> table(int64_t owner) const;
  bool has_owner(int64_t owner) const;
  int32_t num_owners() const;

  // Throws std::logic_error("... this indicates a bug") if an invariant fails.
  void check_invariants() const;

 private:
  // Test access (csrc/tests/test_block_allocator.cpp): reads the free list in
  // order and corrupts state to show that check_invariants() can fail.
  friend struct BlockAllocatorTestPeer;

  // Intrusive doubly linked free list over block ids with a sentinel at index
  // num_blocks_: O(1) push, pop and removal from the middle. allocate() pops
  // from the head, freed blocks are pushed at the tail (see the .cpp).
  int32_t pop_free_head();
  void push_free_tail(int32_t block_id);
  // Throws std::out_of_range("[kvpool::<op>] block id ... out of range ...").
  void check_range(const char* op, int32_t block_id) const;
  // Owner's table (created if new) with capacity for n more ids. If the
  // reservation throws, a table it created is removed again.
  std::vector<int32_t>& table_with_room(int64_t owner, std::size_t n);

  int32_t num_blocks_;
  int32_t num_free_;  // in [0, num_blocks_]
  std::vector<int32_t> ref_cnt_;  // [num_blocks_], 0 = free
  // Links, [num_blocks_ + 1] each; the last slot is the sentinel, a block in
  // use has both links at -1.
  std::vector<int32_t> prev_;
  std::vector<int32_t> next_;
  // Every table is non-empty: an owner whose table empties is forgotten.
  std::unordered_map<int64_t, std::vector<int32_t>> owner_to_table_;
  // Scratch bitmap for duplicate / membership checks in share() and free();
  // all zero between calls.
  std::vector<uint8_t> marked_;
};

}  // namespace kvpool
