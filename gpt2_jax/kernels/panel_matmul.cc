// y[B, N] = x[B, K] @ W: the few rows of a decode step (B <= 8) and the many of a prefill; x and y float32, W
// float32 or bfloat16 (widened to float32 as it is read; float32 sums either way).
//
// W is packed in panels [N / 48, K, 48]: panel p holds columns 48p..48p+47 of W, row after row, so each panel is
// one contiguous stream. A register block is a whole row of a panel (kGroup vectors: three with AVX-512, six with
// AVX2, twelve with NEON; simd.h) times kRows rows of x, as many as the registers hold with the accumulators: all 8
// with AVX-512 (the panel's three weight vectors stay in registers), 2 with AVX2 (each weight vector loaded once
// into a register for the FMAs of both rows: with the load folded into each FMA, the FMAs of blocks that find W in
// the L1 cache wait on the load ports), 1 with NEON (whose FMAs take no memory operand: 8 registers for loads in
// flight). Where the B rows of x need several blocks, the panel is walked kBlockRows rows of W at a time: the first
// block reads them from memory, the others find them in the L1 cache, and each block's sums wait in y between turns
// (added in the same order as in one pass). Meanwhile every block prefetches its share of the next kBlockRows rows,
// so that memory keeps streaming while the later blocks compute (the hardware prefetcher sees no misses then, and
// stops at each 4 KB page). Past 8 rows, each panel serves every group of 8 rows of x in turn, so the weights are
// read from memory once a call, not once per 8 rows. A row's sums are the same in every case: its own, in the order
// of k.
// The panels are shared out in chunks between the calling thread and one task on XLA's intra-op thread pool
// (share_work.h).
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "share_work.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using gpt2_jax::Fma;
using gpt2_jax::kLanes;
using gpt2_jax::Load;
using gpt2_jax::Splat;
using gpt2_jax::Store;
using gpt2_jax::Vec;

constexpr int64_t kWidth = 48;
constexpr int kGroup = kWidth / kLanes;  // vectors in a row of a panel
// Registers for weights on their way from memory to the FMAs: one on x86 (out-of-order execution renames it); on ARM
// the compiler keeps several loads in flight.
#if GPT2_JAX_LANES == 4
constexpr int kWeightRegisters = 8;
#else
constexpr int kWeightRegisters = 1;
#endif
// Rows of x in one register block: accumulators, weights in flight and the rows' values fit the registers.
constexpr int kRows = std::min(8, (gpt2_jax::kRegisters - kWeightRegisters - 1) / kGroup);
constexpr bool kWeightsInRegisters = kRows * kGroup + kGroup + 1 <= gpt2_jax::kRegisters;
// Rows of W walked at a time when several blocks take turns: 12 KB of float32, so that they and the next rows on
// their way in fit a 32 KB L1 cache.
constexpr int64_t kBlockRows = 64;
static_assert(kWidth % kLanes == 0, "a panel row must hold whole vectors");
static_assert(kRows >= 1, "a register block must fit the registers");

using Matrix = ffi::Buffer<ffi::F32, 2>;  // (commas inside the handler macro's arguments would split them)
using PanelStack = ffi::Buffer<ffi::F32, 3>;
using PanelStackBf16 = ffi::Buffer<ffi::BF16, 3>;
using MatrixResult = ffi::ResultBuffer<ffi::F32, 2>;

// y[r, 0 .. 48) += x[r, k] W[k, :] for r < R and k in [k0, k1): W one panel, x rows K apart, y rows N apart; the
// sums start from zero when k0 is 0. With `ahead`, the step for row k prefetches ahead + (k - k0) * ahead_step.
template <int R, typename W>
inline void Block(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t k0, int64_t k1,
                  const char* ahead, int64_t ahead_step) {
  Vec acc[R][kGroup];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kGroup; ++v) acc[r][v] = k0 == 0 ? Vec{} : Load(y + r * N + v * kLanes);
  for (int64_t k = k0; k < k1; ++k) {
    const W* row = w + k * kWidth;
    if (ahead) __builtin_prefetch(ahead + (k - k0) * ahead_step);
    if constexpr (kWeightsInRegisters) {
      Vec wv[kGroup];
      for (int v = 0; v < kGroup; ++v) wv[v] = Load(row + v * kLanes);
      for (int r = 0; r < R; ++r) {
        const Vec xr = Splat(x[r * K + k]);
        for (int v = 0; v < kGroup; ++v) acc[r][v] = Fma(xr, wv[v], acc[r][v]);
      }
    } else {
      Vec xr[R];
      for (int r = 0; r < R; ++r) xr[r] = Splat(x[r * K + k]);
      for (int v = 0; v < kGroup; ++v) {
        Vec wv = Load(row + v * kLanes);
        GPT2_JAX_IN_REGISTER(wv);
        for (int r = 0; r < R; ++r) acc[r][v] = Fma(xr[r], wv, acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kGroup; ++v) Store(y + r * N + v * kLanes, acc[r][v]);
}

// Block for all B rows, kRows at a time, each prefetching the next share of `ahead`.
template <int B, typename W>
inline void RowBlocks(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t k0, int64_t k1,
                      const char* ahead, int64_t ahead_step) {
  constexpr int R = B < kRows ? B : kRows;
  Block<R>(x, w, y, K, N, k0, k1, ahead, ahead_step);
  if constexpr (B > R)
    RowBlocks<B - R>(x + R * K, w, y + R * N, K, N, k0, k1, ahead ? ahead + (k1 - k0) * ahead_step : ahead,
                     ahead_step);
}

template <int B, typename W>
void Panels(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t first, int64_t last) {
  constexpr int kBlocks = (B + kRows - 1) / kRows;
  if constexpr (kBlocks == 1) {  // one pass over each panel: a stream that the hardware prefetcher follows
    for (int64_t p = first; p < last; ++p)
      RowBlocks<B>(x, w + p * K * kWidth, y + p * kWidth, K, N, 0, K, nullptr, 0);
  } else {
    // The panels are contiguous, so the rows after [k0, k1) are the next rows of W in memory, across panels.
    const int64_t ahead_step = int64_t(kWidth * sizeof(W)) / kBlocks;
    const W* end = w + last * K * kWidth;
    for (int64_t p = first; p < last; ++p)
      for (int64_t k0 = 0; k0 < K; k0 += kBlockRows) {
        const int64_t k1 = std::min(K, k0 + kBlockRows);
        const W* next = w + (p * K + k1) * kWidth;
        const char* ahead = next < end ? reinterpret_cast<const char*>(next) : nullptr;
        RowBlocks<B>(x, w + p * K * kWidth, y + p * kWidth, K, N, k0, k1, ahead, ahead_step);
      }
  }
}

template <typename W>
constexpr decltype(&Panels<1, W>) kPanels[] = {Panels<1, W>, Panels<2, W>, Panels<3, W>, Panels<4, W>,
                                               Panels<5, W>, Panels<6, W>, Panels<7, W>, Panels<8, W>};

// Panels for B > 8 rows: each panel, once in the L2 cache, goes through every group of 8 rows of x in turn.
template <typename W>
void ManyRowPanels(const float* x, const W* w, float* y, int64_t B, int64_t K, int64_t N, int64_t first,
                   int64_t last) {
  for (int64_t p = first; p < last; ++p)
    for (int64_t r = 0; r < B; r += 8)
      kPanels<W>[std::min<int64_t>(8, B - r) - 1](x + r * K, w, y + r * N, K, N, p, p + 1);
}

// y's columns of panels [first, last) for all B rows of x.
template <typename W>
void PanelRange(const float* x, const W* w, float* y, int64_t B, int64_t K, int64_t N, int64_t first, int64_t last) {
  if (B <= 8)
    kPanels<W>[B - 1](x, w, y, K, N, first, last);
  else
    ManyRowPanels(x, w, y, B, K, N, first, last);
}

template <typename WeightBuffer>
ffi::Error PanelMatmulImpl(ffi::ThreadPool pool, Matrix x, WeightBuffer w, MatrixResult y) {
  using W = std::remove_const_t<std::remove_pointer_t<decltype(w.typed_data())>>;
  const int64_t B = x.dimensions()[0], K = x.dimensions()[1];
  const int64_t num_panels = w.dimensions()[0], N = num_panels * kWidth;
  if (B < 1) return ffi::Error::InvalidArgument("panel_matmul: x must have at least one row");
  if (w.dimensions()[1] != K || w.dimensions()[2] != kWidth)
    return ffi::Error::InvalidArgument("panel_matmul: w must be [N / 48, K, 48] for x [B, K]");
  if (y->dimensions()[0] != B || y->dimensions()[1] != N)
    return ffi::Error::InvalidArgument("panel_matmul: y must be [B, N]");
  const float* xp = x.typed_data();
  const W* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t chunk = num_panels >= 32 ? 4 : 1, num_chunks = (num_panels + chunk - 1) / chunk;
  gpt2_jax::ShareWork(pool, num_chunks, num_chunks > 1 ? 1 : 0, [=] {
    return [=](int64_t c) { PanelRange(xp, wp, yp, B, K, N, c * chunk, std::min(c * chunk + chunk, num_panels)); };
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
