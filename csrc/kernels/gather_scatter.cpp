// Gather/scatter kernels between per-layer KV slabs and contiguous caches.
//
// Both ops are MLX primitives with a CPU kernel: the op validates and builds a
// lazy node; eval_cpu (run by mx.eval on the caller's thread) allocates or
// donates the outputs, plans one memcpy per (slab, head, block run) and
// dispatches the copies to the stream's worker, where they run split over a
// few threads.
#include "kernels/gather_scatter.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"

#include "kernels/checks.h"
#include "kernels/plan.h"

namespace kvpool {

namespace {

using detail::check_positions;
using detail::cpu_stream;
using detail::fail;
using detail::shape_str;

// Copy jobs ----------------------------------------------------------------

// One job: `rows` rows of `cols` elements into dense memory at dst (rows are
// cols * itemsize bytes apart). Source rows are src_row_stride elements
// apart, elements src_col_stride apart. src == nullptr zero-fills dst.
struct RowCopy {
  char* dst;
  const char* src;
  int64_t rows;
  int64_t cols;
  int64_t src_row_stride;
  int64_t src_col_stride;
  int64_t itemsize;

  size_t row_bytes() const {
    return static_cast<size_t>(cols * itemsize);
  }
  size_t nbytes() const {
    return static_cast<size_t>(rows * cols * itemsize);
  }
  // Rows [r, r + n).
  RowCopy slice(int64_t r, int64_t n) const {
    RowCopy piece = *this;
    piece.rows = n;
    piece.dst = dst + r * row_bytes();
    if (src != nullptr) {
      piece.src = src + r * src_row_stride * itemsize;
    }
    return piece;
  }
};

template <typename T>
void copy_strided_row(char* dst, const char* src, int64_t cols, int64_t step) {
  auto* d = reinterpret_cast<T*>(dst);
  auto* s = reinterpret_cast<const T*>(src);
  for (int64_t c = 0; c < cols; ++c) {
    d[c] = s[c * step];
  }
}

void run_job(const RowCopy& job) {
  size_t row_bytes = static_cast<size_t>(job.cols * job.itemsize);
  if (job.src == nullptr) {
    std::memset(job.dst, 0, job.nbytes());
    return;
  }
  if (job.src_col_stride == 1 &&
      (job.src_row_stride == job.cols || job.rows == 1)) {
    std::memcpy(job.dst, job.src, job.nbytes());
    return;
  }
  for (int64_t r = 0; r < job.rows; ++r) {
    char* dst = job.dst + r * row_bytes;
    const char* src = job.src + r * job.src_row_stride * job.itemsize;
    if (job.src_col_stride == 1) {
      std::memcpy(dst, src, row_bytes);
    } else if (job.itemsize == 1) {
      copy_strided_row<uint8_t>(dst, src, job.cols, job.src_col_stride);
    } else if (job.itemsize == 2) {
      copy_strided_row<uint16_t>(dst, src, job.cols, job.src_col_stride);
    } else if (job.itemsize == 4) {
      copy_strided_row<uint32_t>(dst, src, job.cols, job.src_col_stride);
    } else {
      copy_strided_row<uint64_t>(dst, src, job.cols, job.src_col_stride);
    }
  }
}

// Validation ---------------------------------------------------------------

// Gather reads float slabs; scatter writes any dtype (float slabs, and the
// uint32 codes, scales and biases of quantized ones).
void check_slab(
    const char* op,
    const std::string& name,
    const mx::array& a,
    bool any_dtype = false) {
  if (a.ndim() != 4) {
    fail(
        op,
        name +
            " must be 4-D [num_blocks, n_kv_heads, block_tokens, head_dim]; "
            "got shape " +
            shape_str(a) + ".");
  }
  auto dt = a.dtype();
  if (!any_dtype && dt != mx::float32 && dt != mx::float16 &&
      dt != mx::bfloat16) {
    std::ostringstream msg;
    msg << name << " must be float32, float16 or bfloat16; got " << dt
        << " with shape " << shape_str(a) << ".";
    fail(op, msg.str());
  }
}

// Scatter statistics -------------------------------------------------------

std::atomic<int64_t> num_in_place{0};
std::atomic<int64_t> num_copied{0};
std::atomic<bool> strict_in_place{false};

// Primitives ---------------------------------------------------------------

// Outputs: one [1, heads, capacity, head_dim] array per input slab.
// block_ids_ are the block table entries the copy reads; start_/stop_ are
// positions relative to the first of them.
class Gather : public mx::Primitive {
 public:
  Gather(
      mx::Stream stream,
      std::vector<int32_t> block_ids,
      int64_t start,
      int64_t stop,
      int64_t capacity)
      : mx::Primitive(stream),
        block_ids_(std::move(block_ids)),
        start_(start),
        stop_(stop),
        capacity_(capacity) {}

  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&)
      override {
    throw std::runtime_error(
        "[kvpool::Gather] no GPU kernel; use a CPU stream.");
  }

  const char* name() const override {
    return "KvpoolGather";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const Gather*>(&other);
    return o && block_ids_ == o->block_ids_ && start_ == o->start_ &&
        stop_ == o->stop_ && capacity_ == o->capacity_;
  }
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override {
    std::vector<mx::Shape> shapes;
    for (const auto& slab : inputs) {
      shapes.push_back(
          {1, slab.shape(1), static_cast<int>(capacity_), slab.shape(3)});
    }
    return shapes;
  }

 private:
  std::vector<int32_t> block_ids_;
  int64_t start_;
  int64_t stop_;
  int64_t capacity_;
};

void Gather::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  // Every slab has the same block_tokens (gather checks).
  BlockPlan plan(block_ids_, inputs[0].shape(2), start_, stop_, capacity_);
  std::vector<RowCopy> jobs;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& slab = inputs[i];
    auto& out = outputs[i];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_input_array(slab);
    encoder.set_output_array(out);

    int64_t heads = slab.shape(1);
    int64_t head_dim = slab.shape(3);
    int64_t itemsize = slab.itemsize();
    const auto& st = slab.strides();
    const char* base = slab.data<char>();
    char* dst = out.data<char>();
    for (int64_t h = 0; h < heads; ++h) {
      char* head_dst = dst + h * capacity_ * head_dim * itemsize;
      for (const BlockRun& run : plan.runs()) {
        const char* src = base +
            (run.block * st[0] + h * st[1] + run.slot * st[2]) * itemsize;
        char* row_dst = head_dst + run.cache_row * head_dim * itemsize;
        add_job(
            jobs, {row_dst, src, run.rows, head_dim, st[2], st[3], itemsize});
      }
      char* zeros = head_dst + plan.length() * head_dim * itemsize;
      add_job(
          jobs, {zeros, nullptr, plan.headroom(), head_dim, 0, 0, itemsize});
    }
  }
  // Buffers stay alive until the task ran: MLX holds the inputs' data until
  // the stream has finished this node's tasks.
  encoder.dispatch([jobs = std::move(jobs)] { run_jobs(jobs, run_job); });
}

// Output: the slab with positions [start_, start_ + src.shape(2)) rewritten.
class Scatter : public mx::UnaryPrimitive {
 public:
  Scatter(mx::Stream stream, std::vector<int32_t> block_ids, int64_t start)
      : mx::UnaryPrimitive(stream),
        block_ids_(std::move(block_ids)),
        start_(start) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(
        "[kvpool::Scatter] no GPU kernel; use a CPU stream.");
  }

  const char* name() const override {
    return "KvpoolScatter";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const Scatter*>(&other);
    return o && block_ids_ == o->block_ids_ && start_ == o->start_;
  }
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  std::vector<int32_t> block_ids_;
  int64_t start_;
};

void Scatter::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& slab = inputs[0];
  const auto& src = inputs[1];
  int64_t num_blocks = slab.shape(0);
  int64_t heads = slab.shape(1);
  int64_t block_tokens = slab.shape(2);
  int64_t head_dim = slab.shape(3);
  int64_t itemsize = slab.itemsize();

  // Decided here, on the thread running mx.eval, so that strict mode throws
  // to the caller before any work is queued.
  std::vector<RowCopy> copy_jobs;
  if (slab.is_donatable() && slab.flags().row_contiguous) {
    out.copy_shared_buffer(slab);
    num_in_place++;
  } else {
    if (strict_in_place) {
      std::ostringstream msg;
      msg << "[kvpool::scatter] strict in-place mode: the slab of shape "
          << shape_str(slab) << " (" << slab.nbytes()
          << " bytes) is not donatable, so the scatter would copy it. "
          << "Something else still references it (another Python name, a "
          << "view, an unevaluated gather, or another op in the same eval): "
          << "keep one reference and rebind, slab = scatter(slab, ...).";
      throw std::runtime_error(msg.str());
    }
    out.set_data(mx::allocator::malloc(out.nbytes()));
    num_copied++;
    const auto& st = slab.strides();
    const char* base = slab.data<char>();
    char* dst = out.data<char>();
    for (int64_t b = 0; b < num_blocks; ++b) {
      for (int64_t h = 0; h < heads; ++h) {
        add_job(
            copy_jobs,
            {dst + ((b * heads + h) * block_tokens) * head_dim * itemsize,
             base + (b * st[0] + h * st[1]) * itemsize,
             block_tokens,
             head_dim,
             st[2],
             st[3],
             itemsize});
      }
    }
  }
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(slab);
  encoder.set_input_array(src);
  encoder.set_output_array(out);

  std::vector<RowCopy> write_jobs;
  BlockPlan plan(block_ids_, block_tokens, start_, start_ + src.shape(2));
  const auto& ss = src.strides();
  const char* src_base = src.data<char>();
  char* dst = out.data<char>();
  for (int64_t h = 0; h < heads; ++h) {
    for (const BlockRun& run : plan.runs()) {
      char* row_dst = dst +
          ((run.block * heads + h) * block_tokens + run.slot) * head_dim *
              itemsize;
      const char* row_src =
          src_base + (h * ss[1] + run.cache_row * ss[2]) * itemsize;
      add_job(
          write_jobs,
          {row_dst, row_src, run.rows, head_dim, ss[2], ss[3], itemsize});
    }
  }
  // The slab copy must land before the rows overwrite parts of it.
  encoder.dispatch(
      [copy_jobs = std::move(copy_jobs), write_jobs = std::move(write_jobs)] {
        run_jobs(copy_jobs, run_job);
        run_jobs(write_jobs, run_job);
      });
}

} // namespace

// Ops ----------------------------------------------------------------------

std::vector<mx::array> gather(
    const std::vector<mx::array>& slabs,
    const std::vector<int32_t>& block_table,
    int64_t start,
    int64_t stop,
    int64_t capacity,
    mx::StreamOrDevice s) {
  constexpr const char* op = "gather";
  if (slabs.empty()) {
    fail(op, "need at least one slab; got 0.");
  }
  for (size_t i = 0; i < slabs.size(); ++i) {
    check_slab(op, "slab " + std::to_string(i), slabs[i]);
  }
  int num_blocks = slabs[0].shape(0);
  int block_tokens = slabs[0].shape(2);
  for (size_t i = 1; i < slabs.size(); ++i) {
    if (slabs[i].shape(0) != num_blocks || slabs[i].shape(2) != block_tokens) {
      std::ostringstream msg;
      msg << "every slab needs the same num_blocks and block_tokens as slab "
          << "0 " << shape_str(slabs[0]) << "; slab " << i << " got shape "
          << shape_str(slabs[i]) << ".";
      fail(op, msg.str());
    }
  }
  check_positions(op, block_table, start, stop, num_blocks, block_tokens);
  detail::check_capacity(op, start, stop, capacity);
  auto stream = cpu_stream(op, s);

  auto [block_ids, base] = used_blocks(block_table, start, stop, block_tokens);
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (const auto& slab : slabs) {
    shapes.push_back(
        {1, slab.shape(1), static_cast<int>(capacity), slab.shape(3)});
    dtypes.push_back(slab.dtype());
  }
  return mx::array::make_arrays(
      std::move(shapes),
      dtypes,
      std::make_shared<Gather>(
          stream, std::move(block_ids), start - base, stop - base, capacity),
      slabs);
}

mx::array scatter(
    const mx::array& slab,
    const mx::array& src,
    const std::vector<int32_t>& block_table,
    int64_t start,
    mx::StreamOrDevice s) {
  constexpr const char* op = "scatter";
  check_slab(op, "slab", slab, /* any_dtype= */ true);
  if (src.ndim() != 4 || src.shape(0) != 1 || src.shape(1) != slab.shape(1) ||
      src.shape(3) != slab.shape(3)) {
    std::ostringstream msg;
    msg << "src must be [1, " << slab.shape(1) << ", T, " << slab.shape(3)
        << "] to match the slab " << shape_str(slab) << "; got shape "
        << shape_str(src) << ".";
    fail(op, msg.str());
  }
  if (src.dtype() != slab.dtype()) {
    std::ostringstream msg;
    msg << "src dtype " << src.dtype() << " differs from the slab's "
        << slab.dtype() << ".";
    fail(op, msg.str());
  }
  int block_tokens = slab.shape(2);
  int64_t stop = start + src.shape(2);
  check_positions(op, block_table, start, stop, slab.shape(0), block_tokens);
  auto stream = cpu_stream(op, s);
  if (stop == start) {
    return slab;
  }
  auto [block_ids, base] = used_blocks(block_table, start, stop, block_tokens);
  detail::check_distinct_blocks(op, block_ids, start, stop);
  return mx::array(
      slab.shape(),
      slab.dtype(),
      std::make_shared<Scatter>(stream, std::move(block_ids), start - base),
      {slab, src});
}

ScatterStats scatter_stats() {
  return {num_in_place.load(), num_copied.load()};
}

void reset_scatter_stats() {
  num_in_place = 0;
  num_copied = 0;
}

void set_strict_in_place(bool strict) {
  strict_in_place = strict;
}

} // namespace kvpool
