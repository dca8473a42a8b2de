// nanobind bindings of the gather/scatter kernels on MLX arrays.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "kernels/gather_scatter.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_kernels, m) {
  // mx.array's Python type lives in mlx.core: load it first so this module
  // works whether or not the user imported mlx.core before us.
  nb::module_::import_("mlx.core");
  m.doc() = "Gather/scatter between per-layer KV slabs and contiguous caches.";

  m.def("gather", &kvpool::gather, "slabs"_a, "block_table"_a, "start"_a,
        "stop"_a, "capacity"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Read positions [start, stop) of every slab through block_table into "
        "one [1, heads, capacity, head_dim] array per slab (rows past "
        "stop - start are zero).");
  m.def("scatter", &kvpool::scatter, "slab"_a, "src"_a, "block_table"_a,
        "start"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Write src [1, heads, T, head_dim] as positions [start, start + T) of "
        "slab through block_table; returns the slab (in place when donated).");
  m.def(
      "scatter_stats",
      [] {
        auto s = kvpool::scatter_stats();
        return std::map<std::string, int64_t>{
            {"num_in_place", s.num_in_place}, {"num_copied", s.num_copied}};
      },
      "Counts of scatters that wrote in place vs copied the slab.");
  m.def("reset_scatter_stats", &kvpool::reset_scatter_stats);
  m.def("set_strict_in_place", &kvpool::set_strict_in_place, "strict"_a,
        "When on, a scatter that would copy its slab raises instead.");
}
