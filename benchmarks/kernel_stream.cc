// One-process timing of the native decode kernels (rows = 1) for kernel_stream.py.
//
// Usage: kernel_stream TYPE MODE THREADS
//   TYPE: a gguf.GGMLQuantizationType value (1 F16, 30 BF16, 8 Q8_0, 2 Q4_0, 12 Q4_K,
//         13 Q5_K, 14 Q6_K); MODE: cache (a 256-row matrix, repeated: the arithmetic
//         rate) or stream (a 512 MB matrix: the rate from memory); THREADS: 1 or 2, each
//         thread taking half of the rows as the library's pool does at batch 1.
// Prints one JSON object: the kernel's weight GB/s and, as the reference measured in the
// same process over the same buffer and threads, a plain AVX-512 read (a sum of every
// 64-byte line, ReadLines), best of 7 trials each, alternating.
//
// It includes the library's source (quant_matmul.cc and its .inc files) so that it times
// exactly the kernels the library runs, without JAX or the FFI call around them.
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
// kernels' software prefetch distance (quant_fused.inc, kAhead), so that it differs from
// them only in doing no arithmetic on what it reads.
__attribute__((target("avx512f"))) float ReadLines(const uint8_t* p, int64_t n) {
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

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: kernel_stream TYPE cache|stream THREADS\n");
    return 2;
  }
  const int64_t type = std::atoll(argv[1]);
  const bool stream = std::string(argv[2]) == "stream";
  const int threads = std::atoi(argv[3]);
  Format f;
  if (!FormatOf(type, &f) || BestIsa() != kAvx512Vnni || threads < 1 || threads > 2) {
    std::fprintf(stderr, "kernel_stream: unsupported type, CPU or thread count\n");
    return 2;
  }
  const int64_t in = 2048, row_bytes = in / f.values * f.bytes;
  const int64_t out = stream ? (int64_t{512} << 20) / row_bytes / 2 * 2 : 256;
  std::vector<uint8_t> w(out * row_bytes);
  std::mt19937 rng(0);
  for (auto& b : w) b = static_cast<uint8_t>(rng());
  FiniteScales(type, f, w);

  // The call's set-up, as quant_matmul.cc's Run does for rows = 1.
  std::vector<float> x(in), d(in / 4), sums(in / 16), y(out);
  std::vector<int8_t> q(in), permuted(in);
  std::vector<int32_t> starts(in / 4);
  std::normal_distribution<float> normal;
  for (auto& v : x) v = normal(rng);
  const bool k_quant = type == kQ4_K || type == kQ5_K || type == kQ6_K;
  Job job{};
  job.type = type, job.rows = 1, job.in = in, job.out = out, job.row_bytes = row_bytes;
  job.x = x.data(), job.w = w.data(), job.d = d.data(), job.sums = sums.data();
  job.y = y.data(), job.ldy = out, job.starts = starts.data(), job.q = q.data();
  const bool half = type == kF16 || type == kBF16;
  if (!half) {
    avx512::Quantize(k_quant, x.data(), 1, in, q.data(), d.data());
    if (k_quant) avx512::SubSums(q.data(), d.data(), in, f.sub, sums.data());
    if (type == kQ4_K || type == kQ5_K) {
      avx512::PermuteK4(q.data(), 1, in, permuted.data());
      job.q = permuted.data();
    }
    if (type == kQ8_0 || type == kQ4_0)
      avx512::LaneStarts(q.data(), 1, in, type == kQ8_0 ? 128 : 8, starts.data());
  }
  auto kernel = half ? avx512::HalfDecodeRows : avx512::FusedRows;
  volatile float sink = 0;
  // fn(r0, r1) `reps` times over the rows, one half per thread: each thread loops on its
  // own half, with no synchronisation between repetitions.
  const int reps = stream ? 3 : 400;
  auto split = [&](auto&& fn) {
    auto loop = [&](int64_t r0, int64_t r1) {
      for (int r = 0; r < reps; ++r) fn(r0, r1);
    };
    if (threads == 1) return loop(int64_t{0}, out);
    std::thread other([&] { loop(out / 2, out); });
    loop(int64_t{0}, out / 2);
    other.join();
  };
  double best_kernel = 1e30, best_read = 1e30;
  for (int trial = 0; trial < 7; ++trial) {
    auto t0 = std::chrono::steady_clock::now();
    split([&](int64_t r0, int64_t r1) { kernel(job, r0, r1); });
    best_kernel = std::min(best_kernel, Seconds(t0) / reps);
    t0 = std::chrono::steady_clock::now();
    split([&](int64_t r0, int64_t r1) {
      sink = sink + ReadLines(w.data() + r0 * row_bytes, (r1 - r0) * row_bytes);
    });
    best_read = std::min(best_read, Seconds(t0) / reps);
  }
  const double bytes = static_cast<double>(w.size());
  std::printf("{\"type\": %lld, \"mode\": \"%s\", \"threads\": %d, \"kernel_gbps\": %.2f, "
              "\"read_gbps\": %.2f, \"y0\": %g}\n", static_cast<long long>(type),
              stream ? "stream" : "cache", threads, bytes / best_kernel / 1e9,
              bytes / best_read / 1e9, static_cast<double>(y[0]));
  return 0;
}
