// y (rows, out) = x (rows, in) . W^T with W (out, in) in its raw GGUF block encoding
// (F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K), as an XLA FFI custom call.
//
// Why: llama.cpp's CPU speed comes from reading the weights once, in their few-bit
// encoding, and doing the arithmetic in int8: it quantizes each activation row (Q8_0 for
// Q8_0/Q4_0 weights, Q8_K for the K-quants) and takes integer dot products, scaling per
// block in float32 (ggml/src/ggml-cpu/arch/x86/quants.c, ggml_vec_dot_*). This file does
// the same with its own code: quant_core.inc (unpacking, quantizing, the tiled dot) is
// compiled twice, for AVX-512 VNNI (vpdpbusd) and for AVX2 (vpmaddubsw + vpmaddwd), and
// the copy is chosen per call with __builtin_cpu_supports, so the library (built without
// -mavx512f) loads on AVX2-only CPUs. F16/BF16 weights are widened to float32 in
// registers and multiplied with the float32 activations.
//
// Output rows are shared between the calling thread and the library's one worker pool
// (spin_pool.h) in chunks of whole four-row groups. Built by rustgpt_jax/native/build.py,
// called by rustgpt_jax/native/quant_matmul.py.
#include <immintrin.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "spin_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// gguf.GGMLQuantizationType values.
enum GgmlType : int64_t {
  kF16 = 1, kQ4_0 = 2, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kBF16 = 30
};

// Values and bytes per block, and the sub-block size of the unpacked form (the span of
// one weight scale; quant_core.inc).
struct Format {
  int64_t values, bytes, sub;
};

bool FormatOf(int64_t type, Format* f) {
  switch (type) {
    case kF16: case kBF16: *f = {1, 2, 1}; return true;
    case kQ8_0: *f = {32, 34, 32}; return true;
    case kQ4_0: *f = {32, 18, 32}; return true;
    case kQ4_K: *f = {256, 144, 32}; return true;
    case kQ5_K: *f = {256, 176, 32}; return true;
    case kQ6_K: *f = {256, 210, 16}; return true;
    default: return false;
  }
}

// Which copy of quant_core.inc runs (the `isa` attribute; 0 picks the best).
enum Isa : int64_t { kBestIsa = 0, kAvx2 = 1, kAvx512Vnni = 2 };

Isa BestIsa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return kAvx2;
  return kBestIsa;  // neither: the library loads, the handler refuses
}

struct Job {
  int64_t type, rows, in, out, row_bytes, n_sub;
  const float* x;     // (rows, in)
  const uint8_t* w;   // (out, row_bytes)
  const int8_t* q;    // (rows, in) quantized x
  const float* d;     // (rows, in / 4) x's block scale per int32 lane
  const float* sums;  // (rows, n_sub) d * sum(q) per weight sub-block
  const int8_t* qi;   // q interleaved by 16 rows (quant_prefill.inc), for PrefillRows;
                      // on AVX2, Q4_0's q by pairs of blocks (quant_fused_avx2.inc, PairQ4)
  const float* dx;    // d per activation block, interleaved likewise; AVX2 Q4_0: PairQ4's
  const void* pre;    // each lane's start per weight sub-block (quant_prefill.inc)
  const int32_t* starts;  // (rows, in / 4) each lane's start for Q8_0/Q4_0 (quant_fused.inc,
                          // and PairQ4's for AVX2 Q4_0)
  float* y;           // (rows, ldy): this job's out columns of y
  int64_t ldy;        // y's row stride (the sum of every part's out)
  int64_t chunk;      // weight rows per pool chunk
  void (*rows_fn)(const Job&, int64_t, int64_t);
  const float* xs;    // x interleaved by the ISA's lanes (quant_half_panel.inc), for
                      // HalfPrefillRows
};

}  // namespace

// ---- AVX-512 VNNI: 64 bytes (16 int32 lanes) per step. ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
namespace avx512 {
namespace {

struct Simd {
  using F = __m512;
  static constexpr int64_t kLanes = 16;
  static constexpr int kTile = 4;  // activation rows per tile: 4 x 4 accumulators
  static constexpr int kHalfO = 12;  // quant_half_panel.inc: 12 x 2 accumulators
  static F Zero() { return _mm512_setzero_ps(); }
  static F Set1(float v) { return _mm512_set1_ps(v); }
  static F Fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float Sum(F a) { return _mm512_reduce_add_ps(a); }
  static F LoadF(const float* p, int64_t n = kLanes) {
    return n == kLanes ? _mm512_loadu_ps(p)
                       : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  static void StoreF(float* p, F v, int64_t n = kLanes) {
    if (n == kLanes) {
      _mm512_storeu_ps(p, v);
    } else {
      _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
    }
  }
  template <bool kBf16>
  static F LoadHalf(const uint16_t* p, int64_t n) {
    const __m256i h = n == kLanes
                          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                          : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
    if (kBf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
};

#include "quant_core.inc"
#include "quant_fused.inc"
#include "quant_prefill.inc"
#include "quant_half_panel.inc"
#include "quant_half.inc"

}  // namespace
}  // namespace avx512
#pragma GCC pop_options

// ---- AVX2: 32 bytes (8 int32 lanes) per step. ----
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
namespace {

struct Simd {
  using F = __m256;
  static constexpr int64_t kLanes = 8;
  static constexpr int kTile = 2;  // 16 registers: 4 x 2 accumulators
  static constexpr int kHalfO = 6;  // quant_half_panel.inc: 6 x 2 accumulators
  static F Zero() { return _mm256_setzero_ps(); }
  static F Set1(float v) { return _mm256_set1_ps(v); }
  static F Fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float Sum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // The first n floats, zeros after them, by a masked load (a copy through the stack, the
  // first version, made each partial load wait on a store: the AVX2 integer tile, since
  // removed, loaded its scales so and prefilled Q4_K_M at 7 tokens/s on a Zen 3).
  static F LoadF(const float* p, int64_t n = kLanes) {
    if (n == kLanes) return _mm256_loadu_ps(p);
    const __m256i first = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_ps(p, first);
  }
  static void StoreF(float* p, F v, int64_t n = kLanes) {
    if (n == kLanes) {
      _mm256_storeu_ps(p, v);
    } else {
      _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), v);
    }
  }
  template <bool kBf16>
  static F LoadHalf(const uint16_t* p, int64_t n) {
    alignas(16) uint16_t tail[kLanes] = {};
    if (n != kLanes) {
      std::memcpy(tail, p, n * sizeof(uint16_t));
      p = tail;
    }
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if (kBf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
};

#include "quant_core.inc"
#include "quant_fused_avx2.inc"
#include "quant_half_panel.inc"

}  // namespace
}  // namespace avx2
#pragma GCC pop_options

namespace {

// The jobs of one call, one per weight, and their chunks numbered one after another.
struct Plan {
  std::vector<Job> jobs;
  std::vector<int64_t> first;  // first chunk of each job; the last entry is the total
};

void RunChunk(const void* context, int64_t index) {
  const Plan& plan = *static_cast<const Plan*>(context);
  size_t p = 0;
  while (plan.first[p + 1] <= index) ++p;  // a handful of parts: a scan is enough
  const Job& job = plan.jobs[p];
  const int64_t r0 = (index - plan.first[p]) * job.chunk;
  job.rows_fn(job, r0, r0 + job.chunk < job.out ? r0 + job.chunk : job.out);
}

// One weight of a call: its type and blocks (out, row_bytes).
struct Part {
  int64_t type;
  const uint8_t* w;
  int64_t out, row_bytes;
};

// y (rows, sum of outs) = [x . W_p^T for each part p], columns in part order. x is
// quantized once per activation format the parts need (Q8_0 or Q8_K; the sub-block sums
// once per sub-block size), and one pool dispatch runs the chunks of every part.
ffi::Error Run(const float* x, int64_t rows, int64_t in, const std::vector<Part>& parts,
               float* y, int64_t threads, int64_t spin_us, int64_t isa) {
  const Isa best = BestIsa();
  if (isa == kBestIsa) isa = best;
  if (best == kBestIsa || (isa == kAvx512Vnni && best != kAvx512Vnni))
    return ffi::Error::InvalidArgument("rgj_quant_matmul: this CPU lacks the requested ISA");
  int64_t total = 0;
  for (const Part& part : parts) {
    Format f;
    if (!FormatOf(part.type, &f))
      return ffi::Error::InvalidArgument("rgj_quant_matmul: unsupported ggml type");
    if (part.row_bytes % f.bytes != 0 || part.row_bytes / f.bytes * f.values != in)
      return ffi::Error::InvalidArgument(
          "rgj_quant_matmul: blocks' row bytes do not hold x's in");
    total += part.out;
  }
  if (rows == 0 || total == 0) return ffi::Error::Success();

  // Quantized x per activation format (0: Q8_0, 1: Q8_K), sums per sub-block size within
  // it (slot 0: Q8_0 by 32, 1: Q8_K by 32, 2: Q8_K by 16), filled on first use. The
  // caller fills them once for every chunk; workers only read them.
  thread_local std::vector<int8_t> q[2], qi[2];
  thread_local std::vector<float> d[2], sums[3], dx[2];
  thread_local std::vector<std::vector<int32_t>> pre;  // per part
  thread_local std::vector<int32_t> starts[2];          // decode lane starts: Q8_0, Q4_0
  thread_local std::vector<int8_t> q_k4;                // decode Q8_K in FusedK4's order
  thread_local std::vector<float> xs;                   // F16/BF16 prompt: x by lanes
  bool quantized[2] = {false, false}, summed[3] = {false, false, false};
  bool started[2] = {false, false}, permuted = false;
  bool interleaved[2] = {false, false}, spread = false, paired = false;
  const bool vnni = isa == kAvx512Vnni;
  const bool panel_rows = rows >= (vnni ? avx512::kHalfGemmRows : avx2::kHalfGemmRows);
  const bool prefill = vnni && rows > avx512::kFusedRows;
  if (pre.size() < parts.size()) pre.resize(parts.size());
  // About 32 chunks of whole four-row groups over all parts, at least 8 rows each.
  int64_t chunk = ((total + 31) / 32 + 3) / 4 * 4;
  chunk = chunk < 8 ? 8 : chunk;
  thread_local Plan plan;
  plan.jobs.clear();
  plan.first.assign(1, 0);
  int64_t column = 0;
  for (const Part& part : parts) {
    Format f;
    FormatOf(part.type, &f);
    const bool half = part.type == kF16 || part.type == kBF16;
    const bool panel = half && panel_rows;
    // HalfPrefillRows: chunks of whole register tiles of weight rows.
    const int64_t tile = vnni ? avx512::kHalfO : avx2::kHalfO;
    const int64_t part_chunk = panel ? (chunk + tile - 1) / tile * tile : chunk;
    Job job{part.type, rows, in, part.out, part.row_bytes, in / f.sub, x, part.w,
            nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, y + column, total,
            part_chunk, nullptr, nullptr};
    column += part.out;
    if (panel) {
      if (!spread) {
        const int64_t lanes = vnni ? avx512::Simd::kLanes : avx2::Simd::kLanes;
        xs.resize((rows + lanes - 1) / lanes * lanes * in);
        if (vnni) {
          avx512::InterleaveFloats(x, rows, in, xs.data());
        } else {
          avx2::InterleaveFloats(x, rows, in, xs.data());
        }
        spread = true;
      }
      job.xs = xs.data();
    }
    if (!half) {
      const int k = part.type == kQ8_0 || part.type == kQ4_0 ? 0 : 1;
      const int slot = k == 0 ? 0 : f.sub == 32 ? 1 : 2;
      if (!quantized[k]) {
        q[k].resize(rows * in);
        d[k].resize(rows * in / 4 + 1);
        if (vnni) {
          avx512::Quantize(k == 1, x, rows, in, q[k].data(), d[k].data());
        } else {
          avx2::Quantize(k == 1, x, rows, in, q[k].data(), d[k].data());
        }
        quantized[k] = true;
      }
      if (!summed[slot]) {
        sums[slot].resize(rows * job.n_sub);
        for (int64_t t = 0; t < rows; ++t)
          avx2::SubSums(q[k].data() + t * in, d[k].data() + t * in / 4, in, f.sub,
                        sums[slot].data() + t * job.n_sub);
        summed[slot] = true;
      }
      job.q = q[k].data();
      job.d = d[k].data();
      job.sums = sums[slot].data();
      if (vnni && !prefill && k == 0) {
        const int four = part.type == kQ4_0 ? 1 : 0;
        if (!started[four]) {
          starts[four].resize(rows * in / 4);
          avx512::LaneStarts(q[0].data(), rows, in, four ? 8 : 128, starts[four].data());
          started[four] = true;
        }
        job.starts = starts[four].data();
      }
      if (!vnni && part.type == kQ4_0) {  // AVX2 Q4_0 takes pairs of blocks
        if (!paired) {
          qi[0].resize(rows * in);
          dx[0].resize(rows * in / 4);
          starts[1].resize(rows * in / 4);
          avx2::PairQ4(q[0].data(), d[0].data(), rows, in, qi[0].data(), dx[0].data(),
                       starts[1].data());
          paired = true;
        }
        job.qi = qi[0].data();
        job.dx = dx[0].data();
        job.starts = starts[1].data();
      }
      if (vnni && !prefill && (part.type == kQ4_K || part.type == kQ5_K)) {
        if (!permuted) {
          q_k4.resize(rows * in);
          avx512::PermuteK4(q[1].data(), rows, in, q_k4.data());
          permuted = true;
        }
        job.q = q_k4.data();
      }
      if (prefill) {
        const int64_t tiles = (rows + avx512::kLaneRows - 1) / avx512::kLaneRows;
        const int64_t block = k == 0 ? 32 : 256;
        if (!interleaved[k]) {
          qi[k].resize(tiles * avx512::kLaneRows * in);
          dx[k].resize(tiles * in / block * avx512::kLaneRows);
          avx512::Interleave(q[k].data(), d[k].data(), rows, in, block, qi[k].data(),
                             dx[k].data());
          interleaved[k] = true;
        }
        std::vector<int32_t>& starts = pre[plan.jobs.size()];
        starts.resize(tiles * job.n_sub * avx512::kLaneRows);
        avx512::PrefillStarts(part.type, q[k].data(), rows, in, f.sub, starts.data());
        job.qi = qi[k].data();
        job.dx = dx[k].data();
        job.pre = starts.data();
      }
    }
    if (vnni) {
      job.rows_fn = half ? (panel       ? avx512::HalfPrefillRows
                            : rows == 1 ? avx512::HalfDecodeRows
                                        : avx512::HalfRows)
                         : rows <= avx512::kFusedRows ? avx512::FusedRows : avx512::PrefillRows;
    } else {
      job.rows_fn = half ? (panel       ? avx2::HalfPrefillRows
                            : rows == 1 ? avx2::HalfDecodeRows
                                        : avx2::HalfRows)
                         : rows <= avx2::kFusedRows ? avx2::FusedRows
                                                    : avx2::PrefillRows;
    }
    plan.jobs.push_back(job);
    plan.first.push_back(plan.first.back() + (part.out + part_chunk - 1) / part_chunk);
  }
  rgj::SpinPool& pool = rgj::Pool(threads, spin_us);
  const int64_t chunks = plan.first.back();
  if (pool.size() == 1 || chunks == 1 || !pool.TryRun(chunks, RunChunk, &plan))
    for (const Job& job : plan.jobs) job.rows_fn(job, 0, job.out);
  return ffi::Error::Success();
}

ffi::Error QuantMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t ggml_type, int64_t threads,
                       int64_t spin_us, int64_t isa) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("rgj_quant_matmul: x and blocks must be 2-D");
  return Run(x.typed_data(), xd[0], xd[1], {Part{ggml_type, w.typed_data(), wd[0], wd[1]}},
             y->typed_data(), threads, spin_us, isa);
}

// quant_matmul_multi: the weights are the arguments after x, their types an attribute.
ffi::Error QuantMatmulMulti(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights,
                            ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> ggml_types,
                            int64_t threads, int64_t spin_us, int64_t isa) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || weights.size() != ggml_types.size() || weights.empty())
    return ffi::Error::InvalidArgument(
        "rgj_quant_matmul_multi: x must be 2-D, with one ggml type per weight");
  std::vector<Part> parts;
  for (size_t p = 0; p < weights.size(); ++p) {
    auto w = weights.get<ffi::Buffer<ffi::U8>>(p);
    if (w.has_error()) return w.error();
    const auto wd = w->dimensions();
    if (wd.size() != 2)
      return ffi::Error::InvalidArgument("rgj_quant_matmul_multi: blocks must be 2-D");
    parts.push_back(Part{ggml_types[p], w->typed_data(), wd[0], wd[1]});
  }
  return Run(x.typed_data(), xd[0], xd[1], parts, y->typed_data(), threads, spin_us, isa);
}

}  // namespace

extern "C" int RgjQuantBestIsa() { return static_cast<int>(BestIsa()); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(RgjQuantMatmul, QuantMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ggml_type")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("spin_us")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RgjQuantMatmulMulti, QuantMatmulMulti,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("ggml_types")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("spin_us")
                                  .Attr<int64_t>("isa"));
