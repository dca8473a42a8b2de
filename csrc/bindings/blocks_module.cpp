// nanobind bindings of the block-table core (no MLX here: unit tests import
// this module without loading MLX).
#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "core/block_allocator.h"

namespace nb = nanobind;
using kvpool::BlockAllocator;

NB_MODULE(_blocks, m) {
  m.doc() = "Block-table bookkeeping: allocator, reference counts, tables.";

  nb::exception<kvpool::PoolExhausted>(m, "PoolExhausted", PyExc_RuntimeError);

  nb::class_<BlockAllocator>(m, "BlockAllocator",
                             "Fixed-capacity block allocator with reference "
                             "counts and per-owner block tables.")
      .def(nb::init<int32_t>(), nb::arg("num_blocks"))
      .def_prop_ro("num_blocks", &BlockAllocator::num_blocks)
      .def_prop_ro("num_free", &BlockAllocator::num_free)
      .def_prop_ro("num_used", &BlockAllocator::num_used)
      .def_prop_ro("num_owners", &BlockAllocator::num_owners)
      .def("ref_cnt", &BlockAllocator::ref_cnt, nb::arg("block_id"),
           "Reference count of one block (0 = free).")
      .def("allocate", &BlockAllocator::allocate, nb::arg("owner"),
           nb::arg("n"),
           "Take n free blocks for owner, all or nothing (PoolExhausted).")
      .def("share", &BlockAllocator::share, nb::arg("owner"),
           nb::arg("block_ids"),
           "Add owner's reference to blocks already in use.")
      .def("free", &BlockAllocator::free, nb::arg("owner"),
           nb::arg("block_ids"), "Drop owner's reference on these blocks.")
      .def("release", &BlockAllocator::release, nb::arg("owner"),
           "Drop all of owner's blocks; returns how many became free.")
      .def("table", &BlockAllocator::table, nb::arg("owner"),
           "Owner's block table in allocation order.")
      .def("has_owner", &BlockAllocator::has_owner, nb::arg("owner"))
      .def("check_invariants", &BlockAllocator::check_invariants,
           "Raise if an internal invariant fails (a bug).");
}
