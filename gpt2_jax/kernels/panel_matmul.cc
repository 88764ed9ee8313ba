// y[B, N] = x[B, K] @ W for the few rows of a decode step (B <= 8): x and y float32, W float32 or bfloat16
// (widened to float32 as it is read; float32 sums either way).
//
// W is packed in panels [N / 48, K, 48]: panel p holds columns 48p..48p+47 of W, row after row, so each panel is
// one contiguous stream that is read once for all B rows (three 16-float vectors per row of W, 3 * B accumulators).
// The panels are shared out in chunks between the calling thread and one task on XLA's intra-op thread pool
// (share_work.h).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "share_work.h"
#include "xla/ffi/api/ffi.h"

#ifndef __AVX512F__
#error "panel_matmul needs AVX-512 (built with -march=native on a CPU without it)"
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kWidth = 48;
using Matrix = ffi::Buffer<ffi::F32, 2>;  // (commas inside the handler macro's arguments would split them)
using PanelStack = ffi::Buffer<ffi::F32, 3>;
using PanelStackBf16 = ffi::Buffer<ffi::BF16, 3>;
using MatrixResult = ffi::ResultBuffer<ffi::F32, 2>;

inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 Load16(const uint16_t* p) {  // bfloat16 is the top half of a float32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <int B, typename W>
void Panels(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t first, int64_t last) {
  for (int64_t p = first; p < last; ++p) {
    const W* panel = w + p * K * kWidth;
    __m512 a0[B], a1[B], a2[B];
    for (int b = 0; b < B; ++b) a0[b] = a1[b] = a2[b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const W* row = panel + k * kWidth;
      const __m512 w0 = Load16(row), w1 = Load16(row + 16), w2 = Load16(row + 32);
      for (int b = 0; b < B; ++b) {
        const __m512 xb = _mm512_set1_ps(x[b * K + k]);
        a0[b] = _mm512_fmadd_ps(xb, w0, a0[b]);
        a1[b] = _mm512_fmadd_ps(xb, w1, a1[b]);
        a2[b] = _mm512_fmadd_ps(xb, w2, a2[b]);
      }
    }
    for (int b = 0; b < B; ++b) {
      float* out = y + b * N + p * kWidth;
      _mm512_storeu_ps(out, a0[b]);
      _mm512_storeu_ps(out + 16, a1[b]);
      _mm512_storeu_ps(out + 32, a2[b]);
    }
  }
}

template <typename W>
constexpr decltype(&Panels<1, W>) kPanels[] = {Panels<1, W>, Panels<2, W>, Panels<3, W>, Panels<4, W>,
                                               Panels<5, W>, Panels<6, W>, Panels<7, W>, Panels<8, W>};

template <typename WeightBuffer>
ffi::Error PanelMatmulImpl(ffi::ThreadPool pool, Matrix x, WeightBuffer w, MatrixResult y) {
  using W = std::remove_const_t<std::remove_pointer_t<decltype(w.typed_data())>>;
  const int64_t B = x.dimensions()[0], K = x.dimensions()[1];
  const int64_t num_panels = w.dimensions()[0], N = num_panels * kWidth;
  if (B < 1 || B > 8) return ffi::Error::InvalidArgument("panel_matmul: x must have 1 to 8 rows");
  if (w.dimensions()[1] != K || w.dimensions()[2] != kWidth)
    return ffi::Error::InvalidArgument("panel_matmul: w must be [N / 48, K, 48] for x [B, K]");
  if (y->dimensions()[0] != B || y->dimensions()[1] != N)
    return ffi::Error::InvalidArgument("panel_matmul: y must be [B, N]");
  const auto panels = kPanels<W>[B - 1];
  const float* xp = x.typed_data();
  const W* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t chunk = num_panels >= 32 ? 4 : 1, num_chunks = (num_panels + chunk - 1) / chunk;
  gpt2_jax::ShareWork(pool, num_chunks, num_chunks > 1 ? 1 : 0, [=] {
    return [=](int64_t c) { panels(xp, wp, yp, K, N, c * chunk, std::min(c * chunk + chunk, num_panels)); };
  });
  return ffi::Error::Success();
}

template <typename WeightBuffer>
auto Binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Matrix>().Arg<WeightBuffer>().template Ret<Matrix>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PanelMatmul, PanelMatmulImpl<PanelStack>, Binding<PanelStack>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PanelMatmulBf16, PanelMatmulImpl<PanelStackBf16>, Binding<PanelStackBf16>());
