// Gather/scatter between affine-quantized KV slabs and dense caches.
//
// gather_dequantized is one MLX primitive with a CPU kernel, built like
// Gather: eval_cpu allocates the dense outputs, plans one job per (slab, head,
// block run) that reads codes, scales and biases and writes dequantized rows,
// plus one zero-fill per headroom, and dispatches the jobs to the stream's
// worker, where they run split over a few threads. scatter_quantized is
// mx::quantize of the new rows followed by one scatter node per slab array.
//
// Bit-exactness: mx::dequantize on the CPU is a chain of MLX ops: the codes
// are cast to the cache dtype T, multiplied by the scales (a T op: computed in
// float, rounded to T) and the biases added (the same). dequant_value does
// exactly that. The AVX2 path does it sixteen lanes at a time with the same
// roundings (round to nearest even: F16C for float16, integer rounding for
// bfloat16); for 4-bit float16/bfloat16 it dequantizes the sixteen possible
// codes of a group that way and looks the rest up. Groups whose scale or
// bias is NaN or infinite go through dequant_value, so NaNs get MLX's bit
// patterns too (except the sign of a NaN made from two NaNs, which neither
// IEEE nor MLX fixes). This file is built with -ffp-contract=off: a fused
// multiply-add would skip the rounding of the product.
#include "kernels/quantized.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"

#include "kernels/checks.h"
#include "kernels/gather_scatter.h"
#include "kernels/plan.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(KVPOOL_SCALAR_KERNELS)
#include <immintrin.h>
#define KVPOOL_X86_SIMD 1
#endif

namespace kvpool {

namespace {

using detail::fail;
using detail::shape_str;

// Dequantization ------------------------------------------------------------

// One job: `rows` dense rows of head_dim elements of T at dst (rows are
// contiguous). Row r reads codes + r * codes_row words apart (words
// codes_col apart), and its group scales and biases likewise. codes ==
// nullptr zero-fills dst.
struct DequantJob {
  char* dst;
  const uint32_t* codes;
  const char* scales;
  const char* biases;
  int64_t rows;
  int64_t codes_row;
  int64_t codes_col;
  int64_t scales_row;
  int64_t scales_col;
  int64_t biases_row;
  int64_t biases_col;
  int head_dim;
  int itemsize;
  mx::Dtype dtype = mx::float32;

  size_t row_bytes() const {
    return static_cast<size_t>(head_dim) * itemsize;
  }
  size_t nbytes() const {
    return static_cast<size_t>(rows) * row_bytes();
  }
  // Rows [r, r + n).
  DequantJob slice(int64_t r, int64_t n) const {
    DequantJob piece = *this;
    piece.rows = n;
    piece.dst = dst + r * row_bytes();
    if (codes != nullptr) {
      piece.codes = codes + r * codes_row;
      piece.scales = scales + r * scales_row * itemsize;
      piece.biases = biases + r * biases_row * itemsize;
    }
    return piece;
  }
};

// The quantization parameters every job of one gather shares.
struct Quantization {
  int bits;
  int group_size;
};

// scale * q + bias exactly as mx::dequantize computes it for dtype T.
template <typename T>
inline T dequant_value(uint32_t q, float scale, float bias) {
  auto product = static_cast<T>(static_cast<float>(q) * scale);
  return static_cast<T>(static_cast<float>(product) + bias);
}

// Elements [j0, j1) of a row, all in one group (of scale, bias); j0 and j1
// are multiples of the 32 / kBits codes a word holds.
template <typename T, int kBits>
inline void dequant_span_scalar(
    T* out,
    const uint32_t* codes,
    int64_t codes_col,
    int j0,
    int j1,
    float scale,
    float bias) {
  constexpr int kPerWord = 32 / kBits;
  constexpr uint32_t kMask = (uint32_t{1} << kBits) - 1;
  for (int w = j0 / kPerWord; w < j1 / kPerWord; ++w) {
    uint32_t word = codes[w * codes_col];
    T* o = out + w * kPerWord;
    for (int k = 0; k < kPerWord; ++k) {
      o[k] = dequant_value<T>((word >> (k * kBits)) & kMask, scale, bias);
    }
  }
}

// The portable kernel: every row of the job, group by group.
template <typename T, int kBits>
void dequant_job_scalar(const DequantJob& job, Quantization qz) {
  auto* dst = reinterpret_cast<T*>(job.dst);
  auto* scales = reinterpret_cast<const T*>(job.scales);
  auto* biases = reinterpret_cast<const T*>(job.biases);
  for (int64_t r = 0; r < job.rows; ++r) {
    const T* row_scales = scales + r * job.scales_row;
    const T* row_biases = biases + r * job.biases_row;
    for (int g = 0, j0 = 0; j0 < job.head_dim; ++g, j0 += qz.group_size) {
      dequant_span_scalar<T, kBits>(
          dst + r * job.head_dim,
          job.codes + r * job.codes_row,
          job.codes_col,
          j0,
          j0 + qz.group_size,
          static_cast<float>(row_scales[g * job.scales_col]),
          static_cast<float>(row_biases[g * job.biases_col]));
    }
  }
}

#ifdef KVPOOL_X86_SIMD

bool have_avx2_f16c() {
  static const bool have = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return have;
}

// 4-bit codes of elements [j, j + 16) of contiguous codes as 16 bytes, in
// element order (j a multiple of 16).
__attribute__((target("avx2,f16c"))) inline __m128i nibbles16(
    const uint32_t* codes,
    int j) {
  // Byte i of the two words holds element 2i (low nibble) and 2i + 1.
  __m128i bytes =
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j / 8));
  const __m128i mask = _mm_set1_epi8(0xF);
  __m128i low = _mm_and_si128(bytes, mask);
  __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  return _mm_unpacklo_epi8(low, high);
}

// Codes of elements [j, j + 16) as two vectors of eight int32 lanes (j a
// multiple of 16).
template <int kBits, bool kContiguous>
__attribute__((target("avx2,f16c"))) inline void load_codes16(
    const uint32_t* codes,
    int64_t codes_col,
    int j,
    __m256i& lo,
    __m256i& hi) {
  if constexpr (kBits == 8) {
    __m128i bytes;
    if constexpr (kContiguous) {
      bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j / 4));
    } else {
      bytes = _mm_setr_epi32(
          static_cast<int>(codes[(j / 4) * codes_col]),
          static_cast<int>(codes[(j / 4 + 1) * codes_col]),
          static_cast<int>(codes[(j / 4 + 2) * codes_col]),
          static_cast<int>(codes[(j / 4 + 3) * codes_col]));
    }
    lo = _mm256_cvtepu8_epi32(bytes);
    hi = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
  } else if constexpr (kContiguous) {
    __m128i ordered = nibbles16(codes, j);
    lo = _mm256_cvtepu8_epi32(ordered);
    hi = _mm256_cvtepu8_epi32(_mm_srli_si128(ordered, 8));
  } else {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i mask = _mm256_set1_epi32(0xF);
    auto w0 = static_cast<int>(codes[(j / 8) * codes_col]);
    auto w1 = static_cast<int>(codes[(j / 8 + 1) * codes_col]);
    lo = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(w0), shifts), mask);
    hi = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(w1), shifts), mask);
  }
}

// The bits of bfloat16(x) (round to nearest even, like _MLX_BFloat16) in the
// high halves of the lanes, low halves zero; right for every x but NaN.
__attribute__((target("avx2,f16c"))) inline __m256i round_bf16(__m256 x) {
  __m256i u = _mm256_castps_si256(x);
  __m256i odd =
      _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
  return _mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
}

// static_cast<float>(x) without MLX's branchy software conversion (the same
// value: both conversions are exact).
template <typename T>
__attribute__((target("avx2,f16c"))) inline float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    uint16_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    if constexpr (std::is_same_v<T, mx::float16_t>) {
      return _cvtsh_ss(bits);
    } else {
      uint32_t wide = uint32_t{bits} << 16;
      float f;
      std::memcpy(&f, &wide, sizeof(f));
      return f;
    }
  }
}

// dequant_value<T> of eight lanes, as floats (exact in T).
template <typename T>
__attribute__((target("avx2,f16c"))) inline __m256
dequant8(__m256i q, __m256 scale, __m256 bias) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m256 product = _mm256_mul_ps(_mm256_cvtepi32_ps(q), scale);
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_add_ps(product, bias);
  } else if constexpr (std::is_same_v<T, mx::float16_t>) {
    __m256 rounded = _mm256_cvtph_ps(_mm256_cvtps_ph(product, kRound));
    return _mm256_add_ps(rounded, bias);
  } else {
    __m256 rounded = _mm256_castsi256_ps(round_bf16(product));
    return _mm256_add_ps(rounded, bias);
  }
}

// Stores sixteen floats lo, hi (lanes 0-7, 8-15) at out as T.
template <typename T>
__attribute__((target("avx2,f16c"))) inline void
store16(T* out, __m256 lo, __m256 hi) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(out, lo);
    _mm256_storeu_ps(out + 8, hi);
  } else if constexpr (std::is_same_v<T, mx::float16_t>) {
    __m256i both = _mm256_set_m128i(
        _mm256_cvtps_ph(hi, kRound), _mm256_cvtps_ph(lo, kRound));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), both);
  } else {
    __m256i lo_bits = _mm256_srli_epi32(round_bf16(lo), 16);
    __m256i hi_bits = _mm256_srli_epi32(round_bf16(hi), 16);
    // packus packs within 128-bit lanes (lo 0-3, hi 8-11 | lo 4-7, hi
    // 12-15): the permute restores element order.
    __m256i packed =
        _mm256_permute4x64_epi64(_mm256_packus_epi32(lo_bits, hi_bits), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), packed);
  }
}

// run_dequant_job_typed sixteen lanes at a time. With a finite scale and
// bias no lane can be NaN (q * scale and the sum may overflow to inf, never
// to NaN), and for non-NaN values the vector roundings equal MLX's scalar
// ones; a group with a NaN or infinite scale or bias goes through the scalar
// code, so NaNs get MLX's bit patterns too. Group sizes are multiples of 16.
template <typename T, int kBits, bool kContiguous>
__attribute__((target("avx2,f16c"))) void dequant_job_avx2(
    const DequantJob& job,
    Quantization qz) {
  auto* dst = reinterpret_cast<T*>(job.dst);
  auto* scales = reinterpret_cast<const T*>(job.scales);
  auto* biases = reinterpret_cast<const T*>(job.biases);
  int head_dim = job.head_dim;
  int group_size = qz.group_size;
  for (int64_t r = 0; r < job.rows; ++r) {
    T* out = dst + r * head_dim;
    const uint32_t* codes = job.codes + r * job.codes_row;
    const T* row_scales = scales + r * job.scales_row;
    const T* row_biases = biases + r * job.biases_row;
    for (int g = 0, j0 = 0; j0 < head_dim; ++g, j0 += group_size) {
      float scale = to_float(row_scales[g * job.scales_col]);
      float bias = to_float(row_biases[g * job.biases_col]);
      if (!std::isfinite(scale) || !std::isfinite(bias)) {
        dequant_span_scalar<T, kBits>(
            out, codes, job.codes_col, j0, j0 + group_size, scale, bias);
        continue;
      }
      __m256 vscale = _mm256_set1_ps(scale);
      __m256 vbias = _mm256_set1_ps(bias);
      if constexpr (kBits == 4 && kContiguous && sizeof(T) == 2) {
        // Sixteen possible values per group: dequantize q = 0..15 once and
        // look the rest up (pshufb on the low and the high bytes).
        alignas(32) T table[16];
        store16<T>(
            table,
            dequant8<T>(
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), vscale, vbias),
            dequant8<T>(
                _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15),
                vscale,
                vbias));
        __m128i t0 = _mm_load_si128(reinterpret_cast<const __m128i*>(table));
        __m128i t1 =
            _mm_load_si128(reinterpret_cast<const __m128i*>(table + 8));
        const __m128i low_byte = _mm_set1_epi16(0xFF);
        __m128i table_lo = _mm_packus_epi16(
            _mm_and_si128(t0, low_byte), _mm_and_si128(t1, low_byte));
        __m128i table_hi =
            _mm_packus_epi16(_mm_srli_epi16(t0, 8), _mm_srli_epi16(t1, 8));
        for (int j = j0; j < j0 + group_size; j += 16) {
          __m128i q = nibbles16(codes, j);
          __m128i lo_bytes = _mm_shuffle_epi8(table_lo, q);
          __m128i hi_bytes = _mm_shuffle_epi8(table_hi, q);
          __m256i values = _mm256_set_m128i(
              _mm_unpackhi_epi8(lo_bytes, hi_bytes),
              _mm_unpacklo_epi8(lo_bytes, hi_bytes));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), values);
        }
        continue;
      }
      for (int j = j0; j < j0 + group_size; j += 16) {
        __m256i lo;
        __m256i hi;
        load_codes16<kBits, kContiguous>(codes, job.codes_col, j, lo, hi);
        store16<T>(
            out + j,
            dequant8<T>(lo, vscale, vbias),
            dequant8<T>(hi, vscale, vbias));
      }
    }
  }
}

template <typename T>
auto avx2_job_fn(int bits, bool contiguous) {
  if (bits == 8) {
    return contiguous ? &dequant_job_avx2<T, 8, true>
                      : &dequant_job_avx2<T, 8, false>;
  }
  return contiguous ? &dequant_job_avx2<T, 4, true>
                    : &dequant_job_avx2<T, 4, false>;
}

#endif // KVPOOL_X86_SIMD

template <typename T>
void run_dequant_job_typed(const DequantJob& job, Quantization qz) {
#ifdef KVPOOL_X86_SIMD
  if (have_avx2_f16c()) {
    avx2_job_fn<T>(qz.bits, job.codes_col == 1)(job, qz);
    return;
  }
#endif
  if (qz.bits == 8) {
    dequant_job_scalar<T, 8>(job, qz);
  } else {
    dequant_job_scalar<T, 4>(job, qz);
  }
}

void run_dequant_job(const DequantJob& job, Quantization qz) {
  if (job.codes == nullptr) {
    std::memset(job.dst, 0, job.nbytes());
  } else if (job.dtype == mx::float32) {
    run_dequant_job_typed<float>(job, qz);
  } else if (job.dtype == mx::float16) {
    run_dequant_job_typed<mx::float16_t>(job, qz);
  } else {
    run_dequant_job_typed<mx::bfloat16_t>(job, qz);
  }
}

// Validation ----------------------------------------------------------------

bool is_float(mx::Dtype dt) {
  return dt == mx::float32 || dt == mx::float16 || dt == mx::bfloat16;
}

// Checks one quantized slab: 4-D uint32 codes, and scales and biases of one
// float dtype with the matching shape. Returns its dense head_dim.
int check_quantized_slab(
    const char* op,
    const std::string& name,
    const QuantizedSlab& slab,
    Quantization qz) {
  const auto& codes = slab.codes;
  const auto& scales = slab.scales;
  const auto& biases = slab.biases;
  for (auto [part, a] :
       {std::pair{"codes", &codes},
        std::pair{"scales", &scales},
        std::pair{"biases", &biases}}) {
    if (a->ndim() != 4) {
      fail(
          op,
          name + " " + part +
              " must be 4-D [num_blocks, n_kv_heads, block_tokens, n]; got "
              "shape " +
              shape_str(*a) + ".");
    }
  }
  if (codes.dtype() != mx::uint32) {
    std::ostringstream msg;
    msg << name << " codes must be uint32; got " << codes.dtype() << ".";
    fail(op, msg.str());
  }
  if (!is_float(scales.dtype()) || biases.dtype() != scales.dtype()) {
    std::ostringstream msg;
    msg << name << " scales and biases must share one dtype of float32, "
        << "float16 or bfloat16; got " << scales.dtype() << " and "
        << biases.dtype() << ".";
    fail(op, msg.str());
  }
  int head_dim = codes.shape(3) * 32 / qz.bits;
  check_quantization(op, head_dim, qz.bits, qz.group_size);
  mx::Shape expect = codes.shape();
  expect[3] = head_dim / qz.group_size;
  if (scales.shape() != expect || biases.shape() != expect) {
    std::ostringstream msg;
    msg << name << " codes " << shape_str(codes) << " hold head_dim "
        << head_dim << " at " << qz.bits << " bits, so scales and biases "
        << "must have shape (" << expect[0] << ", " << expect[1] << ", "
        << expect[2] << ", " << expect[3] << ") for group_size "
        << qz.group_size << "; got " << shape_str(scales) << " and "
        << shape_str(biases) << ".";
    fail(op, msg.str());
  }
  return head_dim;
}

// Primitive -----------------------------------------------------------------

// Inputs: codes, scales, biases of slab 0, then of slab 1, ...
// Outputs: one dense [1, heads, capacity, head_dim] array per slab.
// block_ids_ are the block table entries the copy reads; start_/stop_ are
// positions relative to the first of them.
class GatherDequantized : public mx::Primitive {
 public:
  GatherDequantized(
      mx::Stream stream,
      std::vector<int32_t> block_ids,
      int64_t start,
      int64_t stop,
      int64_t capacity,
      Quantization qz)
      : mx::Primitive(stream),
        block_ids_(std::move(block_ids)),
        start_(start),
        stop_(stop),
        capacity_(capacity),
        qz_(qz) {}

  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&)
      override {
    throw std::runtime_error(
        "[kvpool::GatherDequantized] no GPU kernel; use a CPU stream.");
  }

  const char* name() const override {
    return "KvpoolGatherDequantized";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const GatherDequantized*>(&other);
    return o && block_ids_ == o->block_ids_ && start_ == o->start_ &&
        stop_ == o->stop_ && capacity_ == o->capacity_ &&
        qz_.bits == o->qz_.bits && qz_.group_size == o->qz_.group_size;
  }
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override {
    std::vector<mx::Shape> shapes;
    for (size_t i = 0; i < inputs.size(); i += 3) {
      const auto& codes = inputs[i];
      shapes.push_back(
          {1,
           codes.shape(1),
           static_cast<int>(capacity_),
           codes.shape(3) * 32 / qz_.bits});
    }
    return shapes;
  }

 private:
  std::vector<int32_t> block_ids_;
  int64_t start_;
  int64_t stop_;
  int64_t capacity_;
  Quantization qz_;
};

void GatherDequantized::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  // Every slab has the same block_tokens (gather_dequantized checks).
  BlockPlan plan(block_ids_, inputs[0].shape(2), start_, stop_, capacity_);
  std::vector<DequantJob> jobs;
  for (size_t i = 0; i < outputs.size(); ++i) {
    const auto& codes = inputs[3 * i];
    const auto& scales = inputs[3 * i + 1];
    const auto& biases = inputs[3 * i + 2];
    auto& out = outputs[i];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_input_array(codes);
    encoder.set_input_array(scales);
    encoder.set_input_array(biases);
    encoder.set_output_array(out);

    int64_t heads = codes.shape(1);
    int head_dim = out.shape(3);
    int itemsize = static_cast<int>(out.itemsize());
    const auto& cst = codes.strides();
    const auto& sst = scales.strides();
    const auto& bst = biases.strides();
    const uint32_t* codes_base = codes.data<uint32_t>();
    const char* scales_base = scales.data<char>();
    const char* biases_base = biases.data<char>();
    char* dst = out.data<char>();
    for (int64_t h = 0; h < heads; ++h) {
      char* head_dst = dst + h * capacity_ * head_dim * itemsize;
      for (const BlockRun& run : plan.runs()) {
        int64_t b = run.block;
        int64_t slot = run.slot;
        add_job(
            jobs,
            {head_dst + run.cache_row * head_dim * itemsize,
             codes_base + b * cst[0] + h * cst[1] + slot * cst[2],
             scales_base + (b * sst[0] + h * sst[1] + slot * sst[2]) * itemsize,
             biases_base + (b * bst[0] + h * bst[1] + slot * bst[2]) * itemsize,
             run.rows,
             cst[2],
             cst[3],
             sst[2],
             sst[3],
             bst[2],
             bst[3],
             head_dim,
             itemsize,
             out.dtype()});
      }
      DequantJob zeros{}; // codes == nullptr: zero-fill
      zeros.dst = head_dst + plan.length() * head_dim * itemsize;
      zeros.rows = plan.headroom();
      zeros.head_dim = head_dim;
      zeros.itemsize = itemsize;
      zeros.dtype = out.dtype();
      add_job(jobs, zeros);
    }
  }
  // Buffers stay alive until the task ran: MLX holds the inputs' data until
  // the stream has finished this node's tasks.
  encoder.dispatch([jobs = std::move(jobs), qz = qz_] {
    run_jobs(jobs, [qz](const DequantJob& job) { run_dequant_job(job, qz); });
  });
}

} // namespace

// Ops -----------------------------------------------------------------------

void check_quantization(
    const char* op,
    int head_dim,
    int bits,
    int group_size) {
  if (bits != 4 && bits != 8) {
    std::ostringstream msg;
    msg << "bits must be 4 or 8; got " << bits << ".";
    fail(op, msg.str());
  }
  if (group_size != 32 && group_size != 64) {
    std::ostringstream msg;
    msg << "group_size must be 32 or 64; got " << group_size << ".";
    fail(op, msg.str());
  }
  if (head_dim <= 0 || head_dim % group_size != 0) {
    std::ostringstream msg;
    msg << "head_dim " << head_dim << " is not a positive multiple of "
        << "group_size " << group_size << " (quantization groups run along "
        << "head_dim).";
    fail(op, msg.str());
  }
}

std::pair<mx::Shape, mx::Shape> quantized_shapes(
    int num_blocks,
    int n_kv_heads,
    int block_tokens,
    int head_dim,
    int bits,
    int group_size) {
  constexpr const char* op = "quantized_shapes";
  check_quantization(op, head_dim, bits, group_size);
  if (num_blocks <= 0 || n_kv_heads <= 0 || block_tokens <= 0) {
    std::ostringstream msg;
    msg << "num_blocks, n_kv_heads and block_tokens must be positive; got "
        << num_blocks << ", " << n_kv_heads << ", " << block_tokens << ".";
    fail(op, msg.str());
  }
  return {
      {num_blocks, n_kv_heads, block_tokens, head_dim * bits / 32},
      {num_blocks, n_kv_heads, block_tokens, head_dim / group_size}};
}

std::vector<mx::array> gather_dequantized(
    const std::vector<QuantizedSlab>& slabs,
    const std::vector<int32_t>& block_table,
    int64_t start,
    int64_t stop,
    int64_t capacity,
    int bits,
    int group_size,
    mx::StreamOrDevice s) {
  constexpr const char* op = "gather_dequantized";
  if (slabs.empty()) {
    fail(op, "need at least one slab; got 0.");
  }
  // bits first: head_dim is read off the codes through it.
  check_quantization(op, group_size, bits, group_size);
  Quantization qz{bits, group_size};
  std::vector<int> head_dims;
  for (size_t i = 0; i < slabs.size(); ++i) {
    head_dims.push_back(
        check_quantized_slab(op, "slab " + std::to_string(i), slabs[i], qz));
  }
  int num_blocks = slabs[0].codes.shape(0);
  int block_tokens = slabs[0].codes.shape(2);
  for (size_t i = 1; i < slabs.size(); ++i) {
    if (slabs[i].codes.shape(0) != num_blocks ||
        slabs[i].codes.shape(2) != block_tokens) {
      std::ostringstream msg;
      msg << "every slab needs the same num_blocks and block_tokens as slab "
          << "0 " << shape_str(slabs[0].codes) << "; slab " << i
          << " codes got shape " << shape_str(slabs[i].codes) << ".";
      fail(op, msg.str());
    }
  }
  detail::check_positions(
      op, block_table, start, stop, num_blocks, block_tokens);
  detail::check_capacity(op, start, stop, capacity);
  auto stream = detail::cpu_stream(op, s);

  auto [block_ids, base] = used_blocks(block_table, start, stop, block_tokens);
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  std::vector<mx::array> inputs;
  for (size_t i = 0; i < slabs.size(); ++i) {
    const auto& slab = slabs[i];
    shapes.push_back(
        {1, slab.codes.shape(1), static_cast<int>(capacity), head_dims[i]});
    dtypes.push_back(slab.scales.dtype());
    inputs.push_back(slab.codes);
    inputs.push_back(slab.scales);
    inputs.push_back(slab.biases);
  }
  return mx::array::make_arrays(
      std::move(shapes),
      dtypes,
      std::make_shared<GatherDequantized>(
          stream,
          std::move(block_ids),
          start - base,
          stop - base,
          capacity,
          qz),
      std::move(inputs));
}

QuantizedSlab scatter_quantized(
    const QuantizedSlab& slab,
    const mx::array& src,
    const std::vector<int32_t>& block_table,
    int64_t start,
    int bits,
    int group_size,
    mx::StreamOrDevice s) {
  constexpr const char* op = "scatter_quantized";
  check_quantization(op, group_size, bits, group_size);
  Quantization qz{bits, group_size};
  int head_dim = check_quantized_slab(op, "slab", slab, qz);
  const auto& codes = slab.codes;
  if (src.ndim() != 4 || src.shape(0) != 1 || src.shape(1) != codes.shape(1) ||
      src.shape(3) != head_dim) {
    std::ostringstream msg;
    msg << "src must be [1, " << codes.shape(1) << ", T, " << head_dim
        << "] to match the slab's codes " << shape_str(codes) << " at " << bits
        << " bits; got shape " << shape_str(src) << ".";
    fail(op, msg.str());
  }
  if (src.dtype() != slab.scales.dtype()) {
    std::ostringstream msg;
    msg << "src dtype " << src.dtype() << " differs from the slab's "
        << slab.scales.dtype() << " scales and biases.";
    fail(op, msg.str());
  }
  int block_tokens = codes.shape(2);
  int64_t stop = start + src.shape(2);
  detail::check_positions(
      op, block_table, start, stop, codes.shape(0), block_tokens);
  auto stream = detail::cpu_stream(op, s);
  if (stop == start) {
    return slab;
  }
  auto block_ids = used_blocks(block_table, start, stop, block_tokens).first;
  detail::check_distinct_blocks(op, block_ids, start, stop);

  auto parts =
      mx::quantize(src, group_size, bits, "affine", std::nullopt, stream);
  return {
      scatter(slab.codes, parts[0], block_table, start, stream),
      scatter(slab.scales, parts[1], block_table, start, stream),
      scatter(slab.biases, parts[2], block_table, start, stream)};
}

} // namespace kvpool
