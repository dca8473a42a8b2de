// nanobind bindings of the gather/scatter kernels on MLX arrays.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <tuple>
#include <vector>

#include "kernels/gather_scatter.h"
#include "kernels/quantized.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

namespace mx = mlx::core;

// A quantized slab crosses into Python as a (codes, scales, biases) tuple.
using SlabTuple = std::tuple<mx::array, mx::array, mx::array>;

kvpool::QuantizedSlab from_tuple(const SlabTuple& t) {
  return {std::get<0>(t), std::get<1>(t), std::get<2>(t)};
}

SlabTuple to_tuple(const kvpool::QuantizedSlab& slab) {
  return {slab.codes, slab.scales, slab.biases};
}

using Shape4 = std::tuple<int, int, int, int>;

Shape4 shape4(const mx::Shape& shape) {
  return {shape[0], shape[1], shape[2], shape[3]};
}

} // namespace

NB_MODULE(_kernels, m) {
  // mx.array's Python type lives in mlx.core: load it first so this module
  // works whether or not the user imported mlx.core before us.
  nb::module_::import_("mlx.core");
  m.doc() = "Gather/scatter between per-layer KV slabs and contiguous caches.";

  m.def(
      "gather",
      &kvpool::gather,
      "slabs"_a,
      "block_table"_a,
      "start"_a,
      "stop"_a,
      "capacity"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Read positions [start, stop) of every slab through block_table into "
      "one [1, heads, capacity, head_dim] array per slab (rows past "
      "stop - start are zero).");
  m.def(
      "scatter",
      &kvpool::scatter,
      "slab"_a,
      "src"_a,
      "block_table"_a,
      "start"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Write src [1, heads, T, head_dim] as positions [start, start + T) of "
      "slab through block_table; returns the slab (in place when donated).");
  m.def(
      "gather_dequantized",
      [](const std::vector<SlabTuple>& slabs,
         const std::vector<int32_t>& block_table,
         int64_t start,
         int64_t stop,
         int64_t capacity,
         int bits,
         int group_size,
         mx::StreamOrDevice s) {
        std::vector<kvpool::QuantizedSlab> quantized;
        quantized.reserve(slabs.size());
        for (const auto& t : slabs) {
          quantized.push_back(from_tuple(t));
        }
        return kvpool::gather_dequantized(
            quantized, block_table, start, stop, capacity, bits, group_size, s);
      },
      "slabs"_a,
      "block_table"_a,
      "start"_a,
      "stop"_a,
      "capacity"_a,
      nb::kw_only(),
      "bits"_a,
      "group_size"_a = 64,
      "stream"_a = nb::none(),
      "Read positions [start, stop) of every quantized slab (codes, scales, "
      "biases) through block_table into one dense [1, heads, capacity, "
      "head_dim] array per slab in the scales' dtype (rows past stop - start "
      "are zero); values equal mx.dequantize's bit for bit.");
  m.def(
      "scatter_quantized",
      [](const SlabTuple& slab,
         const mx::array& src,
         const std::vector<int32_t>& block_table,
         int64_t start,
         int bits,
         int group_size,
         mx::StreamOrDevice s) {
        return to_tuple(
            kvpool::scatter_quantized(
                from_tuple(slab),
                src,
                block_table,
                start,
                bits,
                group_size,
                s));
      },
      "slab"_a,
      "src"_a,
      "block_table"_a,
      "start"_a,
      nb::kw_only(),
      "bits"_a,
      "group_size"_a = 64,
      "stream"_a = nb::none(),
      "Write dense src [1, heads, T, head_dim] as positions [start, start + T) "
      "of the quantized slab (codes, scales, biases) through block_table, "
      "quantized as mx.quantize does; returns the slab's three arrays (each "
      "in place when donated).");
  m.def(
      "quantized_shapes",
      [](int num_blocks,
         int n_kv_heads,
         int block_tokens,
         int head_dim,
         int bits,
         int group_size) {
        auto [codes, scales] = kvpool::quantized_shapes(
            num_blocks, n_kv_heads, block_tokens, head_dim, bits, group_size);
        return std::make_tuple(shape4(codes), shape4(scales));
      },
      "num_blocks"_a,
      "n_kv_heads"_a,
      "block_tokens"_a,
      "head_dim"_a,
      nb::kw_only(),
      "bits"_a,
      "group_size"_a = 64,
      "The shapes (codes, scales) of a quantized slab of dense shape "
      "[num_blocks, n_kv_heads, block_tokens, head_dim] (biases share the "
      "scales' shape); raises ValueError for bits other than 4/8, a group "
      "size other than 32/64 or a head_dim it does not divide.");
  m.def(
      "scatter_stats",
      [] {
        auto s = kvpool::scatter_stats();
        return std::map<std::string, int64_t>{
            {"num_in_place", s.num_in_place}, {"num_copied", s.num_copied}};
      },
      "Counts of scatters that wrote in place vs copied the slab.");
  m.def("reset_scatter_stats", &kvpool::reset_scatter_stats);
  m.def(
      "set_strict_in_place",
      &kvpool::set_strict_in_place,
      "strict"_a,
      "When on, a scatter that would copy its slab raises instead.");
}
