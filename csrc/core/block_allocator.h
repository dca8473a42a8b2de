// Block-table bookkeeping for the KV pool: plain C++, no MLX, no Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace kvpool {

// Raised when an allocation cannot be satisfied. Nothing was taken.
class PoolExhausted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Fixed-capacity allocator of block ids [0, num_blocks) with reference
// counts, per-owner block tables and the prefix-cache bookkeeping: which
// blocks hold which tokens, an index from prefix hash to block, and a free
// queue that keeps released blocks' contents until an allocation needs them.
//
// Every block is in exactly one state:
//   FREE    ref_cnt 0, no content      on the free queue, head part
//   CACHED  ref_cnt 0, has content     on the free queue, tail part (LRU)
//   HELD    ref_cnt > 0, with or without content; not on the free queue
// The content of a block is (parent_key, tokens, key): tokens are 1 to
// block_tokens ids, key is present exactly when the block is full (len(tokens)
// == block_tokens). Keys are computed by the caller (a hash of parent key,
// tokens and salt); this class only stores and indexes them.
//
// Invariants (checked by check_invariants(), asserted in tests):
//   * ref_cnt(b) == number of owner tables that hold b (an owner holds a block
//     at most once);
//   * the free queue holds exactly the FREE and CACHED blocks, every FREE one
//     before every CACHED one; num_free() is its length, num_cached() the
//     number of CACHED blocks, num_free() + num_used() == num_blocks();
//   * the key index maps a key only to a block with content under that key
//     (its "canonical" block; at most one per key);
//   * every block with content is a child of its parent_key exactly once.
// Every mutating call validates all of its arguments before changing state:
// a call that throws leaves the allocator exactly as it was.
//
// Example, a pool of 4 blocks (queue drawn head first, C = cached):
//   allocate(owner=7, n=3) -> [0, 1, 2]   queue: 3
//   publish(0, parent_key=5, <block_tokens ids>, key=11) -> 0
//   release(owner=7) -> 3                 queue: 2 1 3 0C
//   allocate(owner=8, n=4) -> [2, 1, 3, 0]  (0 last; its content is dropped)
class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks, int32_t block_tokens = 256);

  int32_t num_blocks() const;
  int32_t block_tokens() const;
  // Allocatable blocks: FREE + CACHED.
  int32_t num_free() const;
  // HELD blocks.
  int32_t num_used() const;
  // CACHED blocks (ref_cnt 0 with content).
  int32_t num_cached() const;
  // Cumulative number of CACHED blocks whose content allocate() or resize()
  // dropped.
  int64_t num_evictions() const;
  // Throws std::out_of_range for an id outside [0, num_blocks).
  int32_t ref_cnt(int32_t block_id) const;

  // Takes n blocks from the head of the free queue (ref_cnt 0 -> 1): FREE
  // ones first, then CACHED ones least recently freed first, whose content is
  // dropped (num_evictions += 1 each). Appends them to owner's table; they
  // have no content. All-or-nothing: throws PoolExhausted (nothing taken) if
  // n > num_free(); std::invalid_argument for n < 0. n == 0 returns {} and
  // registers nothing.
  std::vector<int32_t> allocate(int64_t owner, int32_t n);

  // Adds one reference per block (each HELD or CACHED) and appends them to
  // owner's table. A CACHED block is revived: taken out of the free queue in
  // O(1), content kept. Throws std::out_of_range for unknown ids,
  // std::invalid_argument for a FREE block, a duplicate in ids, or a block
  // owner already holds.
  void share(int64_t owner, const std::vector<int32_t>& block_ids);

  // Drops owner's reference on each block (in argument order) and removes it
  // from owner's table. A block whose ref_cnt reaches 0 joins the free queue:
  // at the tail if it has content (CACHED, most recently used), at the head
  // if not (FREE, taken first). Throws std::out_of_range for unknown ids,
  // std::invalid_argument for a block with ref_cnt 0 ("double free"), a block
  // owner does not hold, or a duplicate in ids.
  void free(int64_t owner, const std::vector<int32_t>& block_ids);

  // Drops every reference owner holds (in table order, queued as in free())
  // and forgets the owner. Returns how many blocks reached ref_cnt 0.
  // Unknown owner: returns 0.
  int32_t release(int64_t owner);

  // Owner's block table in allocation order; empty for an unknown owner.
  std::vector<int32_t> table(int64_t owner) const;
  bool has_owner(int64_t owner) const;
  int32_t num_owners() const;

  // How many of the highest ids, [num_blocks - n, num_blocks), no one holds
  // (FREE or CACHED): the most resize() can take away. O(n).
  int32_t num_free_tail() const;

  // Changes the capacity to new_num_blocks (> 0). Growing adds FREE blocks
  // [num_blocks, new_num_blocks), queued at the head in id order (taken
  // next). Shrinking takes away [new_num_blocks, num_blocks), which must all
  // be FREE or CACHED: their content is dropped (num_evictions += 1 for each
  // CACHED one). Every other block keeps its state, content, tables and
  // queue position. Throws std::invalid_argument for new_num_blocks <= 0 or
  // a HELD block in the range taken away (nothing changed; also when an
  // allocation throws).
  void resize(int32_t new_num_blocks);

  // Moves HELD block `from` to id `to`, which must be FREE or CACHED (a
  // CACHED one's content is dropped: num_evictions += 1): `to` takes over
  // from's reference count, its place in every owner's table and its content
  // (index and child entries included); `from` becomes FREE at the head of
  // the free queue. The caller moves the block's bytes and every block id it
  // keeps outside this class. Lets resize() take away the top ids of a pool
  // whose held blocks sit there. O(owners x table length). Throws
  // std::out_of_range for an unknown id, std::invalid_argument if `from` is
  // not HELD, `to` is HELD or from == to (nothing changed).
  void relocate(int32_t from, int32_t to);

  // Records the content of a HELD block that has none yet. key must be given
  // exactly when tokens.size() == block_tokens. If no block is indexed under
  // key, this block becomes key's canonical block; if one is, this block
  // keeps its content without being indexed (the first stays canonical, and
  // is not replaced when it later loses its content). Returns the canonical
  // block for key (block_id itself when it became canonical or key is
  // absent). Throws std::out_of_range for an unknown id,
  // std::invalid_argument for a block that is not HELD or already has
  // content, empty or too many tokens, or a key that is missing / given
  // against the rule above.
  int32_t publish(
      int32_t block_id,
      uint64_t parent_key,
      const std::vector<int32_t>& tokens,
      std::optional<uint64_t> key);

  // The canonical block for key if its tokens equal `tokens` exactly, else
  // -1 (a hash collision never returns a block). Changes nothing.
  int32_t lookup(uint64_t key, const std::vector<int32_t>& tokens) const;

  // Among the blocks with content (HELD or CACHED) whose parent_key matches,
  // the one whose tokens share the longest common prefix with `tokens`
  // (compared up to the shorter length); ties go to the lowest block id.
  // Returns (block_id, num_common), or (-1, 0) when none shares a token.
  // Changes nothing.
  std::pair<int32_t, int32_t> best_child(
      uint64_t parent_key,
      const std::vector<int32_t>& tokens) const;

  // Content accessors; each throws std::out_of_range for an unknown id.
  // content_tokens is empty, key_of / parent_key_of nullopt, for a block
  // without content (key_of also for a partial block).
  std::vector<int32_t> content_tokens(int32_t block_id) const;
  bool has_content(int32_t block_id) const;
  std::optional<uint64_t> key_of(int32_t block_id) const;
  std::optional<uint64_t> parent_key_of(int32_t block_id) const;

  // Drops the content of a block (and its index and child entries); a
  // CACHED block becomes FREE and moves to the head of the free queue. No-op
  // for a block without content. Throws std::out_of_range for an unknown id.
  void invalidate(int32_t block_id);

  // The free queue, head (taken first) to tail.
  std::vector<int32_t> free_queue() const;

  // Throws std::logic_error("... this indicates a bug") if an invariant fails.
  // Checks: the free queue's links agree and return to the sentinel; it holds
  // num_free blocks, all with ref_cnt 0, FREE ones before CACHED ones, and
  // num_cached of them have content; every block with ref_cnt 0 is queued and
  // every other one is not (so each block is in exactly one state); ref_cnt
  // equals the number of tables holding the block, no table is empty or holds
  // a block twice; a block's content has 0..block_tokens tokens, a key
  // exactly when full, zeroed fields without content; the key index maps each
  // key to a block whose key equals it; every child list is non-empty, names
  // only blocks with content under that parent, each once, and the lists
  // together name every block with content; the scratch bitmap is clear.
  void check_invariants() const;

 private:
  // Test access (csrc/tests/test_block_allocator.cpp): corrupts state to show
  // that check_invariants() can fail.
  friend struct BlockAllocatorTestPeer;

  // Intrusive doubly linked free queue over block ids with a sentinel at
  // index num_blocks_: O(1) push at either end, pop and removal from the
  // middle (see the .cpp).
  int32_t pop_free_head();
  void push_free_head(int32_t block_id);
  void push_free_tail(int32_t block_id);
  void unlink_free(int32_t block_id);
  // Queues a block whose ref_cnt just reached 0 (tail if it has content).
  void enqueue_released(int32_t block_id);
  // Forgets block_id's content, its index entry and its child entry. Does not
  // touch the free queue or num_cached_. Never throws.
  void drop_content(int32_t block_id);
  // Throws std::out_of_range("[kvpool::<op>] block id ... out of range ...").
  void check_range(const char* op, int32_t block_id) const;
  // Owner's table (created if new) with capacity for n more ids. If the
  // reservation throws, a table it created is removed again.
  std::vector<int32_t>& table_with_room(int64_t owner, std::size_t n);

  int32_t num_blocks_;
  int32_t block_tokens_; // > 0
  int32_t num_free_; // free queue length, in [0, num_blocks_]
  int32_t num_cached_; // CACHED blocks, in [0, num_free_]
  int64_t num_evictions_ = 0;
  std::vector<int32_t> ref_cnt_; // [num_blocks_]
  // Links, [num_blocks_ + 1] each; the last slot is the sentinel, a block not
  // on the queue has both links at -1.
  std::vector<int32_t> prev_;
  std::vector<int32_t> next_;
  // Every table is non-empty: an owner whose table empties is forgotten.
  std::unordered_map<int64_t, std::vector<int32_t>> owner_to_table_;
  // Scratch bitmap for duplicate / membership checks in share() and free();
  // all zero between calls.
  std::vector<uint8_t> marked_;

  // Content, [num_blocks_] each. A block has content <=> its tokens are
  // non-empty; without content, parent_key_ and key_ are 0 and has_key_ 0.
  std::vector<std::vector<int32_t>> tokens_;
  std::vector<uint64_t> parent_key_;
  std::vector<uint64_t> key_;
  std::vector<uint8_t> has_key_; // 1 <=> full block with content
  // key -> canonical block (has content, key_ == key).
  std::unordered_map<uint64_t, int32_t> key_to_block_;
  // parent_key -> blocks with content under it, each once; no empty lists.
  std::unordered_map<uint64_t, std::vector<int32_t>> parent_to_children_;
};

} // namespace kvpool
