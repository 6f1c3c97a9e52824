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
};

#include "gemv_core.inc"

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
};

#include "gemv_core.inc"

}  // namespace
}  // namespace avx2
#pragma GCC pop_options

namespace {

using PartFn = void (*)(bool, const float*, const float*, float*, int64_t, int64_t, int64_t,
                        int64_t, int64_t);

// The `isa` attribute: 0 = the best here (AVX-512F where the CPU has it, else AVX2 + FMA;
// cpu_gemv.py checks for one of them), 1 = AVX2, 2 = AVX-512F (tests force each copy).
// nullptr: the CPU lacks the one asked for.
PartFn PartFor(int64_t isa) {
  __builtin_cpu_init();
  const bool wide = __builtin_cpu_supports("avx512f");
  if (isa == 1) return avx2::Part;
  if (isa == 2) return wide ? avx512::Part : nullptr;
  return wide ? avx512::Part : avx2::Part;
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
  const PartFn part = PartFor(isa);
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
