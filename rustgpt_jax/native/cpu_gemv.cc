// y (B, out) = x (B, in) . W in float32 for B <= 8, W output-major (out, in) or
// input-major (in, out): the decode-step matrix-vector products of packed kernels and of
// the output head, as XLA FFI custom calls.
//
// Why: XLA:CPU shares each such product over its pool threads and resumes the step as a
// new pool task; on a small VM the other vCPU has usually halted by then, so every
// product pays a wake-up (benchmarks/RESULTS.md, "decode"). Here the output rows are
// split between the calling thread and the workers of the library's one pool
// (spin_pool.h), which spin briefly between calls before they sleep.
// Built and loaded by rustgpt_jax/native/build.py; runs its AVX-512F copy of the kernels
// where the CPU has it, else its AVX2 + FMA copy (cpu_gemv.py checks for one of them).
// The thread count and spin time are attributes of each call (runtime.Execution), not
// environment reads.
#include <immintrin.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "spin_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;  // rows of x; kernels are instantiated for 1..8

// The kernels (gemv_core.inc) in two copies: AVX-512F and AVX2 + FMA. The library is built
// without either flag (the quantized kernels must load on AVX2-only CPUs); `Gemv` picks
// the copy per call.
}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace avx512 {
namespace {

struct V {
  using F = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kLanes = 16;
  static F Zero() { return _mm512_setzero_ps(); }
  static F Load(const float* p) { return _mm512_loadu_ps(p); }
  static F LoadAligned(const float* p) { return _mm512_load_ps(p); }
  static Mask Tail(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
  static F LoadMasked(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void StoreAligned(float* p, F v) { _mm512_store_ps(p, v); }
  static void StoreMasked(float* p, Mask m, F v) { _mm512_mask_store_ps(p, m, v); }
  static F Set1(float v) { return _mm512_set1_ps(v); }
  static F Fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float Sum(F a) { return _mm512_reduce_add_ps(a); }
  // For attend_core.inc.
  static void Store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F Add(F a, F b) { return _mm512_add_ps(a, b); }
  static F Sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F Max(F a, F b) { return _mm512_max_ps(a, b); }
  static float MaxAll(F a) { return _mm512_reduce_max_ps(a); }
  // (sum a, sum b, sum c, sum d): halves added, then AVX2's pairwise tree.
  static __m128 Sum4(F a, F b, F c, F d) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(Halves(a), Halves(b)),
                                    _mm256_hadd_ps(Halves(c), Halves(d)));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  }
  static __m256 Halves(F x) {  // the low and high 256 bits added
    return _mm256_add_ps(_mm512_castps512_ps256(x),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  }
  static F Select(Mask m, F a) { return _mm512_maskz_mov_ps(m, a); }
  static F Min(F a, F b) { return _mm512_min_ps(a, b); }
  static F Round(F a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static F Pow2(F n) {  // 2^n for integral n in [-126, 127], through the exponent bits
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static Mask AtLeast(F a, float b) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(b), _CMP_GE_OQ); }
};
#include "gemv_core.inc"
#include "attend_core.inc"

}  // namespace
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
namespace {

struct V {
  using F = __m256;
  using Mask = __m256i;  // lanes < n all ones
  static constexpr int64_t kLanes = 8;
  static F Zero() { return _mm256_setzero_ps(); }
  static F Load(const float* p) { return _mm256_loadu_ps(p); }
  static F LoadAligned(const float* p) { return _mm256_load_ps(p); }
  static Mask Tail(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static F LoadMasked(Mask m, const float* p) { return _mm256_maskload_ps(p, m); }
  static void StoreAligned(float* p, F v) { _mm256_store_ps(p, v); }
  static void StoreMasked(float* p, Mask m, F v) { _mm256_maskstore_ps(p, m, v); }
  static F Set1(float v) { return _mm256_set1_ps(v); }
  static F Fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float Sum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // For attend_core.inc.
  static void Store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F Add(F a, F b) { return _mm256_add_ps(a, b); }
  static F Sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F Mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F Max(F a, F b) { return _mm256_max_ps(a, b); }
  static float MaxAll(F a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static F Select(Mask m, F a) { return _mm256_and_ps(a, _mm256_castsi256_ps(m)); }
  // (sum a, sum b, sum c, sum d): pairwise adds within 128-bit lanes, then the lanes.
  static __m128 Sum4(F a, F b, F c, F d) {
    const F t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  }
  static F Min(F a, F b) { return _mm256_min_ps(a, b); }
  static F Round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F Pow2(F n) {  // 2^n for integral n in [-126, 127], through the exponent bits
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static Mask AtLeast(F a, float b) {
    return _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(b), _CMP_GE_OQ));
  }
};
#include "gemv_core.inc"
#include "attend_core.inc"

}  // namespace
}  // namespace avx2
#pragma GCC pop_options

namespace {

using PartFn = void (*)(bool, const float*, const float*, float*, int64_t, int64_t, int64_t,
                        int64_t, int64_t);

// A kernel's copy for the `isa` attribute: 0 = the best here (AVX-512F where the CPU has
// it, else AVX2 + FMA; cpu_gemv.py checks for one of them), 1 = AVX2, 2 = AVX-512F (tests
// force each copy). nullptr: the CPU lacks the one asked for.
template <typename Fn>
Fn ForIsa(int64_t isa, Fn avx2_copy, Fn avx512_copy) {
  __builtin_cpu_init();
  const bool wide = __builtin_cpu_supports("avx512f");
  if (isa == 1) return avx2_copy;
  if (isa == 2) return wide ? avx512_copy : nullptr;
  return wide ? avx512_copy : avx2_copy;
}

// One product's operands, shared with the pool's workers; chunk `i` is outputs
// [i % per_matrix * chunk, +chunk) of matrix i / per_matrix.
struct Job {
  bool input_major;
  const float* x;
  const float* w;
  float* y;
  int64_t nb, in, out, chunk, per_matrix;
  PartFn part;  // the ISA's kernels
};

void RunChunk(const void* context, int64_t index) {
  const Job& j = *static_cast<const Job*>(context);
  const int64_t matrix = index / j.per_matrix;
  const int64_t r0 = index % j.per_matrix * j.chunk;
  const int64_t r1 = r0 + j.chunk < j.out ? r0 + j.chunk : j.out;
  j.part(j.input_major, j.x + matrix * j.nb * j.in, j.w + matrix * j.in * j.out,
         j.y + matrix * j.nb * j.out, j.nb, j.in, j.out, r0, r1);
}

// y (P, B, out) = x (P, B, in) . W[p] for P independent matrices W (P, out, in)
// (`input_major` false) or (P, in, out) (true); P is 1 when the operands are 2-D.
ffi::Error Gemv(bool input_major, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                ffi::ResultBuffer<ffi::F32> y, int64_t threads, int64_t spin_us, int64_t isa) {
  const auto wd = w.dimensions();
  const auto xd = x.dimensions();
  const size_t rank = wd.size();
  if ((rank != 2 && rank != 3) || xd.size() != rank)
    return ffi::Error::InvalidArgument("rgj_gemv: x and W must both be 2-D or both 3-D");
  const int64_t batch = rank == 3 ? wd[0] : 1;
  const int64_t out = input_major ? wd[rank - 1] : wd[rank - 2];
  const int64_t in = input_major ? wd[rank - 2] : wd[rank - 1];
  if (xd[rank - 1] != in || (rank == 3 && xd[0] != batch))
    return ffi::Error::InvalidArgument("rgj_gemv: x must be ([P,] rows, in) with W's P and in");
  const int64_t nb = xd[rank - 2];
  if (nb < 1 || nb > kMaxRows) return ffi::Error::InvalidArgument("rgj_gemv: 1 to 8 rows of x");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  rgj::SpinPool& pool = rgj::Pool(threads, spin_us);
  // About 32 chunks per product: at least 32 rows (whole four-row groups), or 256
  // columns (whole 16-lane vectors, whole 8-lane ones on AVX2); whole matrices when there
  // are several.
  const int64_t unit = input_major ? 16 : 4, least = input_major ? 256 : 32;
  int64_t chunk = (out / (input_major ? 8 : 32) + unit - 1) / unit * unit;
  if (batch > 1) {
    chunk = out;
  } else if (chunk < least) {
    chunk = least;
  }
  const PartFn part = ForIsa<PartFn>(isa, avx2::Part, avx512::Part);
  if (part == nullptr) return ffi::Error::InvalidArgument("rgj_gemv: this CPU has no AVX-512F");
  const Job job{input_major, xp, wp, yp, nb, in, out, chunk, (out + chunk - 1) / chunk,
                part};
  if (pool.size() == 1 || batch * out <= chunk ||
      !pool.TryRun(batch * job.per_matrix, RunChunk, &job)) {
    for (int64_t p = 0; p < batch; ++p)
      part(input_major, xp + p * nb * in, wp + p * in * out, yp + p * nb * out, nb, in, out, 0,
           out);
  }
  return ffi::Error::Success();
}

ffi::Error GemvOutputMajor(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, int64_t threads, int64_t spin_us,
                           int64_t isa) {
  return Gemv(false, x, w, y, threads, spin_us, isa);
}

ffi::Error GemvInputMajor(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> y, int64_t threads, int64_t spin_us,
                          int64_t isa) {
  return Gemv(true, x, w, y, threads, spin_us, isa);
}

using AttendFn = void (*)(const float*, const float*, const float*, const float*,
                         const float*, const int32_t*, int64_t, int64_t, int64_t, float, float*,
                         float*);

// One decode step's attention, shared with the pool's workers: chunk i is KV head
// i % heads of batch row i / heads.
struct AttendJob {
  const float *q, *kn, *vn, *kc, *vc;
  float* out;
  const int32_t* idx;   // (B, C): each row's kept slots, first kept[b] entries
  const int64_t* kept;  // (B,)
  int64_t heads, g, c, h;
  float scale;
  AttendFn attend;
};

void RunHead(const void* context, int64_t index) {
  const AttendJob& j = *static_cast<const AttendJob*>(context);
  const int64_t b = index / j.heads;
  thread_local std::vector<float> scores;
  if (static_cast<int64_t>(scores.size()) < 2 * (j.c + 1)) scores.resize(2 * (j.c + 1));
  j.attend(j.q + index * j.g * j.h, j.kn + index * j.h, j.vn + index * j.h,
           j.kc + index * j.c * j.h, j.vc + index * j.c * j.h, j.idx + b * j.c, j.kept[b], j.g,
           j.h, j.scale, scores.data(), j.out + index * j.g * j.h);
}

// out (B, K, G, H): the new token's G query rows per KV head attend over the cache slots
// `mask` keeps and the token itself (attend_core.inc).
ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kn,
                           ffi::Buffer<ffi::F32> vn, ffi::Buffer<ffi::F32> kc,
                           ffi::Buffer<ffi::F32> vc, ffi::Buffer<ffi::PRED> mask,
                           ffi::ResultBuffer<ffi::F32> out, float scale, int64_t threads,
                           int64_t spin_us, int64_t isa) {
  const auto qd = q.dimensions(), kd = kc.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 2 || kn.dimensions().size() != 3 ||
      vn.dimensions().size() != 3 || vc.dimensions().size() != 4)
    return ffi::Error::InvalidArgument(
        "rgj_decode_attention: q (B, K, G, H), k and v (B, K, H), caches (B, K, C, H), "
        "mask (B, C)");
  const int64_t b = qd[0], heads = qd[1], g = qd[2], h = qd[3], c = kd[2];
  for (int i = 0; i < 4; ++i)
    if (vc.dimensions()[i] != kd[i])
      return ffi::Error::InvalidArgument("rgj_decode_attention: the caches differ in shape");
  for (int i = 0; i < 3; ++i)
    if (kn.dimensions()[i] != vn.dimensions()[i])
      return ffi::Error::InvalidArgument("rgj_decode_attention: k and v differ in shape");
  if (kd[0] != b || kd[1] != heads || kd[3] != h || kn.dimensions()[0] != b ||
      kn.dimensions()[1] != heads || kn.dimensions()[2] != h || md[0] != b || md[1] != c)
    return ffi::Error::InvalidArgument("rgj_decode_attention: operand shapes disagree");
  const AttendFn attend = ForIsa<AttendFn>(isa, avx2::Attend, avx512::Attend);
  if (attend == nullptr)
    return ffi::Error::InvalidArgument("rgj_decode_attention: this CPU has no AVX-512F");
  thread_local std::vector<int32_t> idx;
  thread_local std::vector<int64_t> kept;
  idx.resize(b * c);
  kept.assign(b, 0);
  const bool* m = mask.typed_data();
  for (int64_t r = 0; r < b; ++r)
    for (int64_t i = 0; i < c; ++i)
      if (m[r * c + i]) idx[r * c + kept[r]++] = static_cast<int32_t>(i);
  const AttendJob job{q.typed_data(), kn.typed_data(), vn.typed_data(), kc.typed_data(),
                      vc.typed_data(), out->typed_data(), idx.data(), kept.data(), heads, g,
                      c, h, scale, attend};
  rgj::SpinPool& pool = rgj::Pool(threads, spin_us);
  if (pool.size() == 1 || b * heads == 1 || !pool.TryRun(b * heads, RunHead, &job)) {
    for (int64_t i = 0; i < b * heads; ++i) RunHead(&job, i);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RgjGemv, GemvOutputMajor,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("spin_us")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RgjGemvInputMajor, GemvInputMajor,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("spin_us")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RgjDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("spin_us")
                                  .Attr<int64_t>("isa"));
