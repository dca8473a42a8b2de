// nanobind bindings of the block-table core (no MLX here: unit tests import
// this module without loading MLX).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include "core/block_allocator.h"

namespace nb = nanobind;
using kvpool::BlockAllocator;

NB_MODULE(_blocks, m) {
  m.doc() =
      "Block-table bookkeeping: allocator, reference counts, tables, and the "
      "prefix cache's free queue and hash index.";

  nb::exception<kvpool::PoolExhausted>(m, "PoolExhausted", PyExc_RuntimeError);

  nb::class_<BlockAllocator>(
      m,
      "BlockAllocator",
      "Fixed-capacity block allocator with reference counts, per-owner block "
      "tables, cached-free blocks (LRU free queue) and a prefix-hash index.\n\n"
      "Each block is FREE (ref_cnt 0, no content), CACHED (ref_cnt 0, has "
      "content: evictable, still findable) or HELD (ref_cnt > 0). Keys are "
      "ints in [0, 2**64).")
      .def(
          nb::init<int32_t, int32_t>(),
          nb::arg("num_blocks"),
          nb::arg("block_tokens") = 256)
      .def_prop_ro("num_blocks", &BlockAllocator::num_blocks)
      .def_prop_ro(
          "block_tokens",
          &BlockAllocator::block_tokens,
          "Tokens in a full block.")
      .def_prop_ro(
          "num_free",
          &BlockAllocator::num_free,
          "Allocatable blocks: FREE + CACHED.")
      .def_prop_ro("num_used", &BlockAllocator::num_used, "HELD blocks.")
      .def_prop_ro("num_cached", &BlockAllocator::num_cached, "CACHED blocks.")
      .def_prop_ro(
          "num_evictions",
          &BlockAllocator::num_evictions,
          "CACHED blocks whose content allocate() dropped, cumulative.")
      .def_prop_ro("num_owners", &BlockAllocator::num_owners)
      .def(
          "ref_cnt",
          &BlockAllocator::ref_cnt,
          nb::arg("block_id"),
          "Reference count of one block (0 = FREE or CACHED).")
      .def(
          "allocate",
          &BlockAllocator::allocate,
          nb::arg("owner"),
          nb::arg("n"),
          "Take n blocks for owner, all or nothing (PoolExhausted): FREE ones "
          "first, then CACHED ones least recently freed first (evicted).")
      .def(
          "share",
          &BlockAllocator::share,
          nb::arg("owner"),
          nb::arg("block_ids"),
          "Add owner's reference to HELD or CACHED blocks (a CACHED one leaves "
          "the free queue, content kept).")
      .def(
          "free",
          &BlockAllocator::free,
          nb::arg("owner"),
          nb::arg("block_ids"),
          "Drop owner's reference on these blocks, in order; one reaching "
          "ref_cnt 0 is queued at the tail with content, at the head without.")
      .def(
          "release",
          &BlockAllocator::release,
          nb::arg("owner"),
          "Drop all of owner's blocks (table order, queued as by free); "
          "returns how many reached ref_cnt 0.")
      .def(
          "table",
          &BlockAllocator::table,
          nb::arg("owner"),
          "Owner's block table in allocation order.")
      .def("has_owner", &BlockAllocator::has_owner, nb::arg("owner"))
      .def(
          "publish",
          &BlockAllocator::publish,
          nb::arg("block_id"),
          nb::arg("parent_key"),
          nb::arg("tokens"),
          nb::arg("key") = nb::none(),
          "Record the content of a HELD block without content; key is given "
          "exactly for a full block. Returns key's canonical block (block_id "
          "unless another block already holds key, or key is None).")
      .def(
          "lookup",
          &BlockAllocator::lookup,
          nb::arg("key"),
          nb::arg("tokens"),
          "The canonical block for key if its tokens equal tokens, else -1.")
      .def(
          "best_child",
          &BlockAllocator::best_child,
          nb::arg("parent_key"),
          nb::arg("tokens"),
          "(block_id, num_common): the block with content under parent_key "
          "sharing the longest token prefix with tokens (lowest id on ties); "
          "(-1, 0) if none shares a token.")
      .def(
          "content_tokens",
          &BlockAllocator::content_tokens,
          nb::arg("block_id"),
          "The block's tokens; empty without content.")
      .def("has_content", &BlockAllocator::has_content, nb::arg("block_id"))
      .def(
          "key_of",
          &BlockAllocator::key_of,
          nb::arg("block_id"),
          "The block's key; None without content or for a partial block.")
      .def(
          "parent_key_of",
          &BlockAllocator::parent_key_of,
          nb::arg("block_id"),
          "The block's parent key; None without content.")
      .def(
          "invalidate",
          &BlockAllocator::invalidate,
          nb::arg("block_id"),
          "Drop the block's content; a CACHED block becomes FREE (queue "
          "head). No-op without content.")
      .def(
          "num_free_tail",
          &BlockAllocator::num_free_tail,
          "How many of the highest ids no one holds (the most resize() can "
          "take away).")
      .def(
          "resize",
          &BlockAllocator::resize,
          nb::arg("num_blocks"),
          "Grow (new FREE blocks, taken next) or shrink (the ids taken away "
          "must be FREE or CACHED; their content is dropped). ValueError, "
          "nothing changed, otherwise.")
      .def(
          "relocate",
          &BlockAllocator::relocate,
          nb::arg("from_id"),
          nb::arg("to_id"),
          "Move HELD block from_id to FREE or CACHED to_id (whose content is "
          "dropped): references, owners' tables and content go with it; "
          "from_id becomes FREE. The caller moves the bytes. ValueError, "
          "nothing changed, otherwise.")
      .def(
          "free_queue",
          &BlockAllocator::free_queue,
          "The free queue, head (taken first) to tail.")
      .def(
          "check_invariants",
          &BlockAllocator::check_invariants,
          "Raise if an internal invariant fails (a bug).");
}
