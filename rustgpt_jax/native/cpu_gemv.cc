// y (B, out) = x (B, in) . W in float32 for B <= 8, W output-major (out, in) or
// input-major (in, out): the decode-step matrix-vector products of packed kernels and of
// the output head, as XLA FFI custom calls.
//
// Why: XLA:CPU shares each such product over its pool threads and resumes the step as a
// new pool task; on a small VM the other vCPU has usually halted by then, so every
// product pays a wake-up (benchmarks/RESULTS.md, "decode"). Here the output rows are
// split between the calling thread and the workers of the library's one pool
// (spin_pool.h), which spin briefly between calls before they sleep.
// Built and loaded by rustgpt_jax/native/build.py; needs AVX-512F (cpu_gemv.py checks).
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

// One product's operands, shared with the pool's workers; chunk `i` is outputs
// [i % per_matrix * chunk, +chunk) of matrix i / per_matrix.
struct Job {
  bool input_major;
  const float* x;
  const float* w;
  float* y;
  int64_t nb, in, out, chunk, per_matrix;
};

void Part(bool input_major, const float* x, const float* w, float* y, int64_t nb, int64_t in,
          int64_t out, int64_t r0, int64_t r1);

void RunChunk(const void* context, int64_t index) {
  const Job& j = *static_cast<const Job*>(context);
  const int64_t matrix = index / j.per_matrix;
  const int64_t r0 = index % j.per_matrix * j.chunk;
  const int64_t r1 = r0 + j.chunk < j.out ? r0 + j.chunk : j.out;
  Part(j.input_major, j.x + matrix * j.nb * j.in, j.w + matrix * j.in * j.out,
       j.y + matrix * j.nb * j.out, j.nb, j.in, j.out, r0, r1);
}

// The kernels below need AVX-512F; the library is built without it (the quantized
// kernels must load on AVX2-only CPUs), and Python only calls these where the CPU has it.
#pragma GCC push_options
#pragma GCC target("avx512f,fma")

// Rows [r0, r1) of y, four weight rows at a time (four streams from memory).
template <int NB>
void RowsT(const float* x, const float* w, float* y, int64_t in, int64_t out, int64_t r0,
           int64_t r1) {
  const int64_t full = in / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (in - full)) - 1);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const float* rows[4] = {w + r * in, w + (r + 1) * in, w + (r + 2) * in, w + (r + 3) * in};
    __m512 acc[4][NB];
    for (int k = 0; k < 4; ++k)
      for (int b = 0; b < NB; ++b) acc[k][b] = _mm512_setzero_ps();
    for (int64_t i = 0; i < full; i += 16) {
      for (int k = 0; k < 4; ++k) {
        const __m512 wv = _mm512_loadu_ps(rows[k] + i);
        for (int b = 0; b < NB; ++b)
          acc[k][b] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + b * in + i), acc[k][b]);
      }
    }
    if (tail) {
      for (int k = 0; k < 4; ++k) {
        const __m512 wv = _mm512_maskz_loadu_ps(tail, rows[k] + full);
        for (int b = 0; b < NB; ++b)
          acc[k][b] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, x + b * in + full),
                                      acc[k][b]);
      }
    }
    for (int k = 0; k < 4; ++k)
      for (int b = 0; b < NB; ++b) y[b * out + r + k] = _mm512_reduce_add_ps(acc[k][b]);
  }
  for (; r < r1; ++r) {
    const float* row = w + r * in;
    for (int b = 0; b < NB; ++b) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < full; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(row + i), _mm512_loadu_ps(x + b * in + i), acc);
      if (tail)
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, row + full),
                              _mm512_maskz_loadu_ps(tail, x + b * in + full), acc);
      y[b * out + r] = _mm512_reduce_add_ps(acc);
    }
  }
}

// Calls f(std::integral_constant<int, nb>) for nb in 1..kMaxRows: the kernels keep one
// accumulator per x row in registers, so the row count is a template parameter.
template <typename F>
void WithRows(int64_t nb, F&& f) {
  switch (nb) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 5: return f(std::integral_constant<int, 5>());
    case 6: return f(std::integral_constant<int, 6>());
    case 7: return f(std::integral_constant<int, 7>());
    default: return f(std::integral_constant<int, 8>());
  }
}

// Columns [c0, c1) of y for an input-major W (in, out): y[:, c] += x[:, i] * W[i, c],
// four rows of W at a time, so each pass streams contiguous segments of four rows; the
// partial sums of at most kColumns columns per x row stay in cache. Long segments (about
// 8 chunks per product) matter: 1,000-column chunks streamed the 768 x 32,000 output
// head at ~26 GB/s, 4,000-column chunks at ~29.5.
constexpr int64_t kColumns = 4096;

template <int NB>
void ColsT(const float* x, const float* w, float* y, int64_t in, int64_t out, int64_t c0,
           int64_t c1) {
  // Partial sums, NB x kColumns: per thread and off the stack (up to 128 KB).
  struct alignas(64) Lanes { float v[16]; };  // aligned by C++17's operator new
  thread_local std::vector<Lanes> scratch(kMaxRows * kColumns / 16);
  float* const sums = reinterpret_cast<float*>(scratch.data());
  float* acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = sums + b * kColumns;
  for (int64_t s0 = c0; s0 < c1; s0 += kColumns) {
    const int64_t width = c1 - s0 < kColumns ? c1 - s0 : kColumns;
    const int64_t full = width / 16 * 16;
    const __mmask16 tail = static_cast<__mmask16>((1u << (width - full)) - 1);
    for (int b = 0; b < NB; ++b)
      for (int64_t c = 0; c < width; ++c) acc[b][c] = 0.0f;
    // Four rows of W per pass (four streams, one update of the partial sums), then the
    // rows left over one at a time.
    int64_t i = 0;
    for (; i + 4 <= in; i += 4) {
      const float* r0 = w + i * out + s0;
      const float* r1 = r0 + out;
      const float* r2 = r1 + out;
      const float* r3 = r2 + out;
      __m512 xb[NB][4];
      for (int b = 0; b < NB; ++b)
        for (int k = 0; k < 4; ++k) xb[b][k] = _mm512_set1_ps(x[b * in + i + k]);
      for (int64_t c = 0; c < full; c += 16) {
        const __m512 w0 = _mm512_loadu_ps(r0 + c), w1 = _mm512_loadu_ps(r1 + c);
        const __m512 w2 = _mm512_loadu_ps(r2 + c), w3 = _mm512_loadu_ps(r3 + c);
        for (int b = 0; b < NB; ++b) {
          __m512 a = _mm512_load_ps(acc[b] + c);
          a = _mm512_fmadd_ps(w0, xb[b][0], a);
          a = _mm512_fmadd_ps(w1, xb[b][1], a);
          a = _mm512_fmadd_ps(w2, xb[b][2], a);
          _mm512_store_ps(acc[b] + c, _mm512_fmadd_ps(w3, xb[b][3], a));
        }
      }
      if (tail) {
        const __m512 w0 = _mm512_maskz_loadu_ps(tail, r0 + full);
        const __m512 w1 = _mm512_maskz_loadu_ps(tail, r1 + full);
        const __m512 w2 = _mm512_maskz_loadu_ps(tail, r2 + full);
        const __m512 w3 = _mm512_maskz_loadu_ps(tail, r3 + full);
        for (int b = 0; b < NB; ++b) {
          __m512 a = _mm512_load_ps(acc[b] + full);
          a = _mm512_fmadd_ps(w0, xb[b][0], a);
          a = _mm512_fmadd_ps(w1, xb[b][1], a);
          a = _mm512_fmadd_ps(w2, xb[b][2], a);
          _mm512_mask_store_ps(acc[b] + full, tail, _mm512_fmadd_ps(w3, xb[b][3], a));
        }
      }
    }
    for (; i < in; ++i) {
      const float* row = w + i * out + s0;
      __m512 xb[NB];
      for (int b = 0; b < NB; ++b) xb[b] = _mm512_set1_ps(x[b * in + i]);
      for (int64_t c = 0; c < full; c += 16) {
        const __m512 wv = _mm512_loadu_ps(row + c);
        for (int b = 0; b < NB; ++b)
          _mm512_store_ps(acc[b] + c, _mm512_fmadd_ps(wv, xb[b], _mm512_load_ps(acc[b] + c)));
      }
      if (tail) {
        const __m512 wv = _mm512_maskz_loadu_ps(tail, row + full);
        for (int b = 0; b < NB; ++b)
          _mm512_mask_store_ps(acc[b] + full, tail,
                               _mm512_fmadd_ps(wv, xb[b], _mm512_load_ps(acc[b] + full)));
      }
    }
    for (int b = 0; b < NB; ++b)
      for (int64_t c = 0; c < width; ++c) y[b * out + s0 + c] = acc[b][c];
  }
}


// Outputs [r0, r1) of y: rows of an output-major W, or columns of an input-major one.
void Part(bool input_major, const float* x, const float* w, float* y, int64_t nb, int64_t in,
          int64_t out, int64_t r0, int64_t r1) {
  WithRows(nb, [&](auto rows) {
    if (input_major) {
      ColsT<decltype(rows)::value>(x, w, y, in, out, r0, r1);
    } else {
      RowsT<decltype(rows)::value>(x, w, y, in, out, r0, r1);
    }
  });
}

#pragma GCC pop_options

// y (P, B, out) = x (P, B, in) . W[p] for P independent matrices W (P, out, in)
// (`input_major` false) or (P, in, out) (true); P is 1 when the operands are 2-D.
ffi::Error Gemv(bool input_major, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                ffi::ResultBuffer<ffi::F32> y, int64_t threads, int64_t spin_us) {
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
  // columns (whole 16-lane vectors); whole matrices when there are several.
  const int64_t unit = input_major ? 16 : 4, least = input_major ? 256 : 32;
  int64_t chunk = (out / (input_major ? 8 : 32) + unit - 1) / unit * unit;
  if (batch > 1) {
    chunk = out;
  } else if (chunk < least) {
    chunk = least;
  }
  const Job job{input_major, xp, wp, yp, nb, in, out, chunk, (out + chunk - 1) / chunk};
  if (pool.size() == 1 || batch * out <= chunk ||
      !pool.TryRun(batch * job.per_matrix, RunChunk, &job)) {
    for (int64_t p = 0; p < batch; ++p)
      Part(input_major, xp + p * nb * in, wp + p * in * out, yp + p * nb * out, nb, in, out, 0,
           out);
  }
  return ffi::Error::Success();
}

ffi::Error GemvOutputMajor(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, int64_t threads,
                           int64_t spin_us) {
  return Gemv(false, x, w, y, threads, spin_us);
}

ffi::Error GemvInputMajor(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> y, int64_t threads,
                          int64_t spin_us) {
  return Gemv(true, x, w, y, threads, spin_us);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RgjGemv, GemvOutputMajor,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("spin_us"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RgjGemvInputMajor, GemvInputMajor,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("spin_us"));
