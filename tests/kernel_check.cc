// The kernels' arithmetic without XLA, against references computed here: the panel matmul (float32 and bfloat16
// weights, 1 to 8 rows), causal attention forward and backward and a decode step's attention (D = 16 to 64) against
// double precision, and
// the AdamW update bit for bit against the same float32 operations one element at a time. Built by
// tests/test_cpu_kernels.py for the machine at hand and, with a cross compiler, for 64-bit ARM to run under
// qemu. Prints one line per check and exits with 1 if any fails.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../gpt2_jax/kernels/causal_attention.cc"
#include "../gpt2_jax/kernels/decode_attention.cc"
#include "../gpt2_jax/kernels/panel_matmul.cc"
#include "../gpt2_jax/kernels/adamw.cc"  // last: its no-contraction pragma holds to the end of this file

namespace {

std::mt19937 rng(0);

std::vector<float> Random(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

bool Report(const char* what, double error, double tolerance) {
  std::printf("%-44s max error %.3g (tolerance %.3g) %s\n", what, error, tolerance, error <= tolerance ? "ok" : "FAIL");
  return error <= tolerance;
}

// x [B, K] @ W [K, N] through the panels, W float32 or (bf16) rounded down to bfloat16.
bool CheckMatmul(int B, int64_t K, int64_t N, bool bf16) {
  const int64_t P = (N + kWidth - 1) / kWidth;
  std::vector<float> x = Random(B * K), w = Random(K * N), packed(P * K * kWidth, 0.0f);
  std::vector<uint16_t> packed16(P * K * kWidth, 0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) {
      uint32_t bits;
      std::memcpy(&bits, &w[k * N + n], 4);
      if (bf16) {
        bits &= 0xffff0000u;
        std::memcpy(&w[k * N + n], &bits, 4);
      }
      packed[((n / kWidth) * K + k) * kWidth + n % kWidth] = w[k * N + n];
      packed16[((n / kWidth) * K + k) * kWidth + n % kWidth] = uint16_t(bits >> 16);
    }
  std::vector<float> y(B * P * kWidth);
  if (bf16)
    PanelRange(x.data(), packed16.data(), y.data(), B, K, P * kWidth, 0, P);
  else
    PanelRange(x.data(), packed.data(), y.data(), B, K, P * kWidth, 0, P);
  double error = 0, largest = 0;
  for (int b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0;
      for (int64_t k = 0; k < K; ++k) ref += double(x[b * K + k]) * w[k * N + n];
      error = std::max(error, std::fabs(y[b * P * kWidth + n] - ref));
      largest = std::max(largest, std::fabs(ref));
    }
  char what[80];
  std::snprintf(what, sizeof what, "panel matmul %s B=%d K=%lld N=%lld", bf16 ? "bf16" : "f32", B, (long long)K,
                (long long)N);
  return Report(what, error, 2e-6 * largest);
}

// Attention of qkv [B, T, 3, H, D] and its gradient for dy, by the kernel and in double precision.
template <int D>
bool CheckAttention(int64_t B, int64_t T, int64_t H) {
  const Shape sh{B, T, H, D, (T + 63) / 64 * 64};
  std::vector<float> qkv = Random(B * T * 3 * H * D, 2.0f), dy = Random(B * T * H * D);
  std::vector<float> y(B * T * H * D), stats(B * H * T * 2), dqkv(qkv.size());
  Scratch scratch(sh);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) Forward<D>(sh, b, h, qkv.data(), y.data(), stats.data(), scratch);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) Backward<D>(sh, b, h, qkv.data(), stats.data(), dy.data(), dqkv.data(), scratch);
  double y_error = 0, y_largest = 0, g_error = 0, g_largest = 0;
  const double scale = 1.0 / std::sqrt(double(D));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      auto q = [&](int64_t t, int d) { return double(qkv[sh.Qkv(b, t, 0, h) + d]); };
      auto k = [&](int64_t t, int d) { return double(qkv[sh.Qkv(b, t, 1, h) + d]); };
      auto v = [&](int64_t t, int d) { return double(qkv[sh.Qkv(b, t, 2, h) + d]); };
      auto g = [&](int64_t t, int d) { return double(dy[sh.Head(b, t, h) + d]); };
      std::vector<double> p(T * T, 0.0), ds(T * T, 0.0), grad(3 * T * D, 0.0);
      for (int64_t i = 0; i < T; ++i) {
        double mx = -INFINITY, sum = 0, dot = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int d = 0; d < D; ++d) s += q(i, d) * k(j, d);
          p[i * T + j] = s * scale;
          mx = std::max(mx, s * scale);
        }
        for (int64_t j = 0; j <= i; ++j) sum += p[i * T + j] = std::exp(p[i * T + j] - mx);
        for (int64_t j = 0; j <= i; ++j) p[i * T + j] /= sum;
        for (int d = 0; d < D; ++d) {
          double out = 0;
          for (int64_t j = 0; j <= i; ++j) out += p[i * T + j] * v(j, d);
          y_error = std::max(y_error, std::fabs(y[sh.Head(b, i, h) + d] - out));
          y_largest = std::max(y_largest, std::fabs(out));
        }
        for (int64_t j = 0; j <= i; ++j) {
          double dp = 0;
          for (int d = 0; d < D; ++d) dp += g(i, d) * v(j, d);
          ds[i * T + j] = dp;
          dot += p[i * T + j] * dp;
        }
        for (int64_t j = 0; j <= i; ++j) ds[i * T + j] = p[i * T + j] * (ds[i * T + j] - dot);
      }
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = 0; j <= i; ++j)
          for (int d = 0; d < D; ++d) {
            grad[(0 * T + i) * D + d] += ds[i * T + j] * k(j, d) * scale;
            grad[(1 * T + j) * D + d] += ds[i * T + j] * q(i, d) * scale;
            grad[(2 * T + j) * D + d] += p[i * T + j] * g(i, d);
          }
      for (int which = 0; which < 3; ++which)
        for (int64_t t = 0; t < T; ++t)
          for (int d = 0; d < D; ++d) {
            const double ref = grad[(which * T + t) * D + d];
            g_error = std::max(g_error, std::fabs(dqkv[sh.Qkv(b, t, which, h) + d] - ref));
            g_largest = std::max(g_largest, std::fabs(ref));
          }
    }
  char what[80];
  std::snprintf(what, sizeof what, "attention B=%lld T=%lld H=%lld D=%d", (long long)B, (long long)T, (long long)H,
                D);
  const bool forward = Report(what, y_error, 2e-6 * y_largest);
  std::snprintf(what, sizeof what, "attention gradient B=%lld T=%lld H=%lld D=%d", (long long)B, (long long)T,
                (long long)H, D);
  return Report(what, g_error, 4e-6 * g_largest) && forward;
}

// Update() against its own arithmetic one element at a time (this file compiles without contraction).
bool CheckAdamW(int64_t n, float decay) {
  std::vector<float> g = Random(n), m = Random(n), v = Random(n, 0.01f), p = Random(n);
  for (float& x : v) x = x * x;
  const float h[kNumHyper] = {0.25f, 0.9f, 0.1f, 0.95f, 0.05f, 0.271f, 0.142625f, 1e-8f, 3e-4f, decay};
  std::vector<float> m2 = m, v2 = v, p2 = p;
  Update(g.data(), m2.data(), v2.data(), p2.data(), h, 0, n);
  int64_t differ = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * h[kScale];
    const float mi = h[kBeta1] * m[i] + h[kOneMinusBeta1] * gi;
    const float vi = h[kBeta2] * v[i] + h[kOneMinusBeta2] * (gi * gi);
    float u = (mi / h[kCorrection1]) / (std::sqrt(vi / h[kCorrection2]) + h[kEps]);
    if (decay != 0.0f) u = u + decay * p[i];
    const float pi = p[i] - h[kLr] * u;
    differ += std::memcmp(&mi, &m2[i], 4) != 0 || std::memcmp(&vi, &v2[i], 4) != 0 || std::memcmp(&pi, &p2[i], 4) != 0;
  }
  char what[80];
  std::snprintf(what, sizeof what, "adamw n=%lld decay=%g (elements that differ)", (long long)n, decay);
  return Report(what, double(differ), 0);
}

}  // namespace

// A decode step's attention for one (row, head) over the first n of S cache slots, against double precision.
template <int D>
bool CheckDecodeAttention(int64_t S, int64_t n) {
  std::vector<float> q = Random(D, 2.0f), k = Random(D * S), v = Random(S * D), y(D), p(S + gpt2_jax::kLanes);
  DecodeHead<D>(q.data(), k.data(), v.data(), S, n, 1.0f / std::sqrt(float(D)), p.data(), y.data());
  std::vector<double> e(n);
  double max = -INFINITY, sum = 0, error = 0;
  for (int64_t s = 0; s < n; ++s) {
    for (int d = 0; d < D; ++d) e[s] += double(q[d]) * k[d * S + s] / std::sqrt(double(D));
    max = std::max(max, e[s]);
  }
  for (int64_t s = 0; s < n; ++s) sum += e[s] = std::exp(e[s] - max);
  for (int d = 0; d < D; ++d) {
    double ref = 0;
    for (int64_t s = 0; s < n; ++s) ref += e[s] / sum * v[s * D + d];
    error = std::max(error, std::fabs(y[d] - ref));
  }
  char what[80];
  std::snprintf(what, sizeof what, "decode attention D=%d, %lld of %lld slots", D, (long long)n, (long long)S);
  return Report(what, error, 2e-6);
}

int main() {
  std::printf("vectors of %d floats, %d registers\n", gpt2_jax::kLanes, gpt2_jax::kRegisters);
  bool ok = true;
  for (bool bf16 : {false, true})
    for (int B : {1, 2, 3, 4, 5, 6, 7, 8, 13, 40}) ok &= CheckMatmul(B, B % 2 ? 37 : 300, B < 4 ? 5 : 100, bf16);
  ok &= CheckAttention<16>(2, 7, 2);
  ok &= CheckAttention<32>(1, 33, 3);
  ok &= CheckAttention<48>(1, 64, 2);
  ok &= CheckAttention<64>(1, 100, 2);
  ok &= CheckAttention<64>(1, 1, 1);
  ok &= CheckDecodeAttention<16>(64, 1);
  ok &= CheckDecodeAttention<32>(100, 37);
  ok &= CheckDecodeAttention<48>(256, 256);
  ok &= CheckDecodeAttention<64>(512, 301);
  for (float decay : {0.0f, 0.1f}) ok &= CheckAdamW(1000 + gpt2_jax::kLanes / 2, decay);
  std::printf("%s\n", ok ? "all ok" : "FAILED");
  return ok ? 0 : 1;
}
