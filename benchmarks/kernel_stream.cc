// One-process timing of the native kernels (rows = 1: decode; more: a prompt's product)
// for kernel_stream.py.
//
// Usage: kernel_stream TYPE MODE THREADS SPIN_US [ROWS]
//   TYPE: a gguf.GGMLQuantizationType value (1 F16, 30 BF16, 8 Q8_0, 2 Q4_0, 12 Q4_K,
//         13 Q5_K, 14 Q6_K); MODE: cache (a 256-row matrix, repeated: the arithmetic
//         rate) or stream (a 512 MB matrix: the rate from memory); THREADS: 1 or 2 (the
//         library's pool); SPIN_US: the pool's spin (native.cpu_gemv.spin_setting);
//         ROWS: activation rows per product (default 1).
// Prints one JSON object: the kernel's weight GB/s and, as the reference measured in the
// same process over the same buffer and threads, a plain read (a sum of every 64-byte
// line in AVX-512 or AVX2, as the library's kernels here: ReadLines), best of 7 trials
// each, alternating.
//
// It includes the library's source (quant_matmul.cc and its .inc files) and calls its
// `Run`, so it times exactly what a product costs in the library (activation set-up,
// pool dispatch, kernels), without JAX or the FFI call around it.
#include "quant_matmul.cc"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>

namespace {

double Seconds(const std::chrono::steady_clock::time_point& t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Every f16 block scale set to 0.01 (0x211f), so that the sums stay finite.
void FiniteScales(int64_t type, const Format& f, std::vector<uint8_t>& w) {
  const int64_t blocks = static_cast<int64_t>(w.size()) / f.bytes;
  std::vector<int> at;
  if (type == kQ8_0 || type == kQ4_0) at = {0};
  if (type == kQ4_K || type == kQ5_K) at = {0, 2};
  if (type == kQ6_K) at = {208};
  if (type == kF16) {
    for (size_t i = 0; i + 1 < w.size(); i += 2) w[i] = 0x1f, w[i + 1] = 0x21;
    return;
  }
  for (int64_t b = 0; b < blocks; ++b)
    for (int o : at) w[b * f.bytes + o] = 0x1f, w[b * f.bytes + o + 1] = 0x21;
}

// The reference: every 64-byte line read into four independent sums, with the fused
// kernels' software prefetch distance (quant_fused.inc and quant_fused_avx2.inc, kAhead),
// so that it differs from them only in doing no arithmetic on what it reads. In the
// widest vectors the kernels themselves use: AVX-512, or AVX2 where the library runs its
// AVX2 copy.
__attribute__((target("avx512f"))) float ReadLines512(const uint8_t* p, int64_t n) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    for (int j = 0; j < 4; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(p + i + 64 * j + avx512::kAhead),
                   _MM_HINT_T0);
      acc[j] = _mm512_add_ps(acc[j],
                             _mm512_loadu_ps(reinterpret_cast<const float*>(p + i + 64 * j)));
    }
  }
  for (; i + 64 <= n; i += 64)
    acc[0] = _mm512_add_ps(acc[0], _mm512_loadu_ps(reinterpret_cast<const float*>(p + i)));
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]),
                                            _mm512_add_ps(acc[2], acc[3])));
}

__attribute__((target("avx2"))) float ReadLines256(const uint8_t* p, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
#define AT(k) _mm256_loadu_ps(reinterpret_cast<const float*>(p + (k)))
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    for (int j = 0; j < 4; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(p + i + 64 * j + avx2::kAhead), _MM_HINT_T0);
      acc[j] = _mm256_add_ps(acc[j], _mm256_add_ps(AT(i + 64 * j), AT(i + 64 * j + 32)));
    }
  }
  for (; i + 64 <= n; i += 64) acc[0] = _mm256_add_ps(acc[0], _mm256_add_ps(AT(i), AT(i + 32)));
#undef AT
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]),
                                       _mm256_add_ps(acc[2], acc[3])));
  float total = 0;
  for (float v : lanes) total += v;
  return total;
}

float ReadLines(const uint8_t* p, int64_t n) {
  return BestIsa() == kAvx512Vnni ? ReadLines512(p, n) : ReadLines256(p, n);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5 && argc != 6) {
    std::fprintf(stderr, "usage: kernel_stream TYPE cache|stream THREADS SPIN_US [ROWS]\n");
    return 2;
  }
  const int64_t type = std::atoll(argv[1]);
  const bool stream = std::string(argv[2]) == "stream";
  const int threads = std::atoi(argv[3]);
  const int64_t spin_us = std::atoll(argv[4]);
  const int64_t rows = argc == 6 ? std::atoll(argv[5]) : 1;
  Format f;
  if (!FormatOf(type, &f) || BestIsa() == kBestIsa || threads < 1 || threads > 2 ||
      rows < 1) {
    std::fprintf(stderr, "kernel_stream: unsupported type, CPU or thread count\n");
    return 2;
  }
  const int64_t in = 2048, row_bytes = in / f.values * f.bytes;
  const int64_t out = stream ? (int64_t{512} << 20) / row_bytes / 2 * 2 : 256;
  std::vector<uint8_t> w(out * row_bytes);
  std::mt19937 rng(0);
  for (auto& b : w) b = static_cast<uint8_t>(rng());
  FiniteScales(type, f, w);

  // Each call is the library's own `Run` (quant_matmul.cc): the activation's
  // quantization and the pool dispatch over `threads` included, as one product of a
  // decode step. The read reference splits the rows in two halves, one per thread.
  std::vector<float> x(rows * in), y(rows * out);
  std::normal_distribution<float> normal;
  for (auto& v : x) v = normal(rng);
  const std::vector<Part> parts = {Part{type, w.data(), out, row_bytes}};
  volatile float sink = 0;
  const int reps = stream ? 3 : static_cast<int>(400 / rows > 3 ? 400 / rows : 3);
  double best_kernel = 1e30, best_read = 1e30;
  for (int trial = 0; trial < 7; ++trial) {
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) {
      if (!Run(x.data(), rows, in, parts, y.data(), threads, spin_us, kBestIsa).success()) {
        std::fprintf(stderr, "kernel_stream: the library refused the call\n");
        return 2;
      }
    }
    best_kernel = std::min(best_kernel, Seconds(t0) / reps);
    t0 = std::chrono::steady_clock::now();
    auto read = [&](int64_t r0, int64_t r1) {
      for (int r = 0; r < reps; ++r)
        sink = sink + ReadLines(w.data() + r0 * row_bytes, (r1 - r0) * row_bytes);
    };
    if (threads == 1) {
      read(0, out);
    } else {
      std::thread other([&] { read(out / 2, out); });
      read(0, out / 2);
      other.join();
    }
    best_read = std::min(best_read, Seconds(t0) / reps);
  }
  const double bytes = static_cast<double>(w.size());
  std::printf("{\"type\": %lld, \"mode\": \"%s\", \"threads\": %d, \"rows\": %lld, "
              "\"isa\": \"%s\", \"kernel_gbps\": %.4f, \"read_gbps\": %.2f, \"y0\": %g}\n",
              static_cast<long long>(type), stream ? "stream" : "cache", threads,
              static_cast<long long>(rows),
              BestIsa() == kAvx512Vnni ? "avx512_vnni" : "avx2", bytes / best_kernel / 1e9,
              bytes / best_read / 1e9, static_cast<double>(y[0]));
  return 0;
}
