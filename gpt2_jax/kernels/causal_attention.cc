// Causal self-attention of a training step on CPU, forward and backward, one (batch row, head) at a time.
//
// Forward:  qkv [B, T, 3, H, D] -> y [B, T, H, D] = P v with P = softmax(q k^T / sqrt(D), causal), and
//           stats [B, H, T, 2]: each row's max and the reciprocal of its sum of exponentials.
// Backward: qkv, stats, dy [B, T, H, D] -> dqkv [B, T, 3, H, D]: P = exp(q k^T / sqrt(D) - max) / sum again (the
//           forward's very bits: a log-sum-exp of scores in the hundreds would round P by 1e-5), then
//           dP = dy v^T, dS = P * (dP - rowsum(P * dP)), dq = dS k / sqrt(D), dk = dS^T q / sqrt(D), dv = P^T dy.
// XLA computes the same with batched matmuls of B * H small [T, T] problems and several passes of masked softmax
// over [B, H, T, T], and keeps P [B, H, T, T] of every layer for the backward pass. Here each (b, h) works in
// buffers that stay in cache, blocks above the diagonal are skipped, q, k and v are read straight from the fused
// qkv projection, and only two numbers per row are kept. D is 16, 32, 48 or 64; T is padded to a multiple of 64
// inside the kernel. float32 throughout, in vectors as wide as the CPU's (simd.h): register blocks of 4 rows times
// kBlock vectors (4 with AVX-512 and NEON, 2 with AVX2's 16 registers). (b, h) pairs are shared out between the
// calling thread and tasks on XLA's intra-op thread pool (share_work.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "share_work.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using gpt2_jax::Below;
using gpt2_jax::Exp;
using gpt2_jax::Fma;
using gpt2_jax::kLanes;
using gpt2_jax::Load;
using gpt2_jax::Mask;
using gpt2_jax::Select;
using gpt2_jax::Splat;
using gpt2_jax::Store;
using gpt2_jax::Vec;

// Vectors of columns in a register block of 4 rows: 4 kBlock accumulators, kBlock operands and a broadcast value
// fit the registers, and kBlock * kLanes columns divide the 64 of a PackColumns panel.
constexpr int kBlock = gpt2_jax::kRegisters >= 32 ? 4 : 2;
static_assert(5 * kBlock + 1 <= gpt2_jax::kRegisters && 64 % (kBlock * kLanes) == 0, "kBlock does not fit");
static_assert(16 % kLanes == 0, "a head of 16 floats must hold whole vectors");

using Qkv = ffi::Buffer<ffi::F32, 5>;
using Heads = ffi::Buffer<ffi::F32, 4>;
using QkvResult = ffi::ResultBuffer<ffi::F32, 5>;
using HeadsResult = ffi::ResultBuffer<ffi::F32, 4>;
using Stats = ffi::Buffer<ffi::F32, 4>;
using StatsResult = ffi::ResultBuffer<ffi::F32, 4>;

// C[i, j0 .. j0 + NV kLanes) = sum_d A[i, d] * B[j, d] for rows i of [i0, i0 + 4), B packed by PackColumns.
template <int D, int NV>
inline void ABtBlock(const float* a, const float* bp, float* c, int64_t tp, int64_t i0, int64_t j0) {
  const float* panel = bp + (j0 / 64) * 64 * D + j0 % 64;  // within a [D, 64] panel
  Vec acc[4][NV] = {};
  for (int d = 0; d < D; ++d) {
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = Load(panel + d * 64 + kLanes * v);
      GPT2_JAX_IN_REGISTER(bv[v]);  // folded into each row's FMA it was loaded 4 times (2x slower on AVX-512)
    }
    for (int r = 0; r < 4; ++r) {
      const Vec x = Splat(a[(i0 + r) * D + d]);
      for (int v = 0; v < NV; ++v) acc[r][v] = Fma(x, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) Store(c + (i0 + r) * tp + j0 + kLanes * v, acc[r][v]);
}

// The lower triangle of C = A B^T: rows i of [i0, i0 + 4) get columns j < i0 + 4 rounded up to a vector; A is
// [Tp, D], B [Tp, D] packed by PackColumns, C [Tp, Tp]. Blocks of kBlock vectors of columns, then single vectors.
template <int D>
void LowerABt(const float* a, const float* bp, float* c, int64_t tp) {
  for (int64_t i0 = 0; i0 < tp; i0 += 4) {
    int64_t j0 = 0;
    for (; j0 + kBlock * kLanes <= i0 + 4; j0 += kBlock * kLanes) ABtBlock<D, kBlock>(a, bp, c, tp, i0, j0);
    for (; j0 < i0 + 4; j0 += kLanes) ABtBlock<D, 1>(a, bp, c, tp, i0, j0);
  }
}

// Columns [c0, c0 + NV kLanes) of Y[i, :] = scale * sum_j W[i, j] X[j, :] over j <= i for rows i of [i0, i0 + 4):
// W [Tp, Tp] lower triangular, X [Tp, D], Y [Tp, D].
template <int D, int NV>
inline void WXBlock(const float* w, const float* x, float* y, int64_t tp, float scale, int64_t i0, int c0) {
  Vec acc[4][NV] = {};
  for (int64_t j = 0; j < i0 + 4; ++j) {
    Vec xv[NV];
    for (int v = 0; v < NV; ++v) {
      xv[v] = Load(x + j * D + c0 + kLanes * v);
      GPT2_JAX_IN_REGISTER(xv[v]);
    }
    for (int r = 0; r < 4; ++r) {
      const Vec wr = Splat(w[(i0 + r) * tp + j]);
      for (int v = 0; v < NV; ++v) acc[r][v] = Fma(wr, xv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) Store(y + (i0 + r) * D + c0 + kLanes * v, Splat(scale) * acc[r][v]);
}

// Columns [c0, c0 + NV kLanes) of Y[j, :] = sum_i W[i, j] X[i, :] over i >= j for rows j of [j0, j0 + 4): W^T X
// for W [Tp, Tp] lower triangular (read by rows, 4 columns at a time), X [Tp, D], Y [Tp, D].
template <int D, int NV>
inline void WtXBlock(const float* w, const float* x, float* y, int64_t tp, int64_t j0, int c0) {
  Vec acc[4][NV] = {};
  int64_t i = j0;
  do {  // (j0 < tp: a for loop that might not run left GCC 12 storing the sums to memory every row on ARM)
    Vec xv[NV];
    for (int v = 0; v < NV; ++v) {
      xv[v] = Load(x + i * D + c0 + kLanes * v);
      GPT2_JAX_IN_REGISTER(xv[v]);
    }
    for (int r = 0; r < 4; ++r) {
      const Vec wr = Splat(w[i * tp + j0 + r]);
      for (int v = 0; v < NV; ++v) acc[r][v] = Fma(wr, xv[v], acc[r][v]);
    }
  } while (++i < tp);
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) Store(y + (j0 + r) * D + c0 + kLanes * v, acc[r][v]);
}

// Vectors of a head's D columns in one WXBlock or WtXBlock: all of them where they fit, else kBlock at a time.
template <int D>
constexpr int kHeadBlock = D / kLanes <= kBlock ? D / kLanes : kBlock;

// Y = scale * W X for W [Tp, Tp] lower triangular, X [Tp, D], Y [Tp, D].
template <int D>
void LowerWX(const float* w, const float* x, float* y, int64_t tp, float scale) {
  constexpr int NV = kHeadBlock<D>;
  static_assert(D % (NV * kLanes) == 0, "a head must hold whole blocks");
  for (int64_t i0 = 0; i0 < tp; i0 += 4)
    for (int c0 = 0; c0 < D; c0 += NV * kLanes) WXBlock<D, NV>(w, x, y, tp, scale, i0, c0);
}

// Y = W^T X for W [Tp, Tp] lower triangular, X [Tp, D], Y [Tp, D].
template <int D>
void LowerWtX(const float* w, const float* x, float* y, int64_t tp) {
  constexpr int NV = kHeadBlock<D>;
  for (int64_t j0 = 0; j0 < tp; j0 += 4)
    for (int c0 = 0; c0 < D; c0 += NV * kLanes) WtXBlock<D, NV>(w, x, y, tp, j0, c0);
}

// B [Tp, D] -> panels [Tp / 64, D, 64]: B^T in 64-column strips, each one contiguous stream for LowerABt (rows of
// a plain [D, Tp] transpose lie a power of two apart and evict each other from the L1 cache).
void PackColumns(const float* b, float* bp, int64_t tp, int64_t D) {
  for (int64_t j = 0; j < tp; ++j)
    for (int64_t d = 0; d < D; ++d) bp[((j / 64) * D + d) * 64 + j % 64] = b[j * D + d];
}

struct Shape {
  int64_t B, T, H, D, Tp;
  // element (b, t, which, h, 0) of qkv / (b, t, h, 0) of y
  int64_t Qkv(int64_t b, int64_t t, int which, int64_t h) const { return (((b * T + t) * 3 + which) * H + h) * D; }
  int64_t Head(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * D; }
};

// Per-thread scratch for one (b, h): [Tp, D] q (scaled), k, v, dy, out; k and v packed by PackColumns; [Tp, Tp] s, p.
struct Scratch {
  std::vector<float> q, k, v, dy, out, kt, vt, s, p;
  explicit Scratch(const Shape& sh)
      : q(sh.Tp * sh.D), k(sh.Tp * sh.D), v(sh.Tp * sh.D), dy(sh.Tp * sh.D), out(sh.Tp * sh.D), kt(sh.D * sh.Tp),
        vt(sh.D * sh.Tp), s(sh.Tp * sh.Tp), p(sh.Tp * sh.Tp) {}
};

void Gather(const float* src, const Shape& sh, int64_t b, int64_t h, int which, float* dst, float scale) {
  std::memset(dst, 0, sh.Tp * sh.D * sizeof(float));
  for (int64_t t = 0; t < sh.T; ++t) {
    const float* row = src + (which < 0 ? sh.Head(b, t, h) : sh.Qkv(b, t, which, h));
    for (int64_t d = 0; d < sh.D; d += kLanes) Store(dst + t * sh.D + d, Splat(scale) * Load(row + d));
  }
}

void Scatter(const float* src, const Shape& sh, int64_t b, int64_t h, int which, float* dst) {
  for (int64_t t = 0; t < sh.T; ++t)
    std::memcpy(dst + (which < 0 ? sh.Head(b, t, h) : sh.Qkv(b, t, which, h)), src + t * sh.D,
                sh.D * sizeof(float));
}

// q (scaled by 1 / sqrt(D)), k and k^T of one (b, h) into the scratch buffers, and S = q k^T below the diagonal.
template <int D>
void Scores(const Shape& sh, int64_t b, int64_t h, const float* qkv, Scratch& w) {
  Gather(qkv, sh, b, h, 0, w.q.data(), 1.0f / std::sqrt(float(sh.D)));
  Gather(qkv, sh, b, h, 1, w.k.data(), 1.0f);
  Gather(qkv, sh, b, h, 2, w.v.data(), 1.0f);
  PackColumns(w.k.data(), w.kt.data(), sh.Tp, sh.D);
  LowerABt<D>(w.q.data(), w.kt.data(), w.s.data(), sh.Tp);
}

template <int D>
void Forward(const Shape& sh, int64_t b, int64_t h, const float* qkv, float* y, float* stats, Scratch& w) {
  const int64_t T = sh.T, Tp = sh.Tp;
  Scores<D>(sh, b, h, qkv, w);
  for (int64_t i = 0; i < Tp; ++i) {  // softmax of row i over j <= i; zeros elsewhere and in padding rows
    float* row = w.s.data() + i * Tp;
    if (i >= T) {
      std::memset(row, 0, Tp * sizeof(float));
      continue;
    }
    Vec m = Splat(-INFINITY);
    for (int64_t j = 0; j <= i; j += kLanes) m = gpt2_jax::Max(m, gpt2_jax::Blend(Below(j, i + 1), Load(row + j), m));
    const float mx = gpt2_jax::ReduceMax(m);
    Vec sum = {};
    for (int64_t j = 0; j < Tp; j += kLanes) {
      const Vec e = Select(Below(j, i + 1), Exp(Load(row + j) - Splat(mx)));
      Store(row + j, e);
      sum += e;
    }
    const float inv = 1.0f / gpt2_jax::ReduceAdd(sum);
    for (int64_t j = 0; j <= i; j += kLanes) Store(row + j, Splat(inv) * Load(row + j));
    stats[((b * sh.H + h) * T + i) * 2] = mx;
    stats[((b * sh.H + h) * T + i) * 2 + 1] = inv;
  }
  LowerWX<D>(w.s.data(), w.v.data(), w.out.data(), Tp, 1.0f);
  Scatter(w.out.data(), sh, b, h, -1, y);
}

template <int D>
void Backward(const Shape& sh, int64_t b, int64_t h, const float* qkv, const float* stats, const float* dy,
              float* dqkv, Scratch& w) {
  const int64_t T = sh.T, Tp = sh.Tp;
  Scores<D>(sh, b, h, qkv, w);
  Gather(dy, sh, b, h, -1, w.dy.data(), 1.0f);
  PackColumns(w.v.data(), w.vt.data(), Tp, D);
  for (int64_t i = 0; i < Tp; ++i) {  // P = exp(S - max) / sum below the diagonal, zero elsewhere and in padding
    const float* row_stats = stats + ((b * sh.H + h) * T + (i < T ? i : 0)) * 2;
    const Vec mx = Splat(row_stats[0]), inv = Splat(row_stats[1]);
    const float* si = w.s.data() + i * Tp;
    float* pi = w.p.data() + i * Tp;
    for (int64_t j = 0; j < Tp; j += kLanes) {
      const Mask keep = i < T ? Below(j, i + 1) : Mask{};
      Store(pi + j, Select(keep, inv * Exp(Load(si + j) - mx)));
    }
  }
  LowerABt<D>(w.dy.data(), w.vt.data(), w.s.data(), Tp);  // dP, over S
  for (int64_t i = 0; i < Tp; ++i) {  // dS = P * (dP - sum_j P dP), zero where P is
    const float* pi = w.p.data() + i * Tp;
    float* ds = w.s.data() + i * Tp;
    Vec dot = {};
    for (int64_t j = 0; j <= i && i < T; j += kLanes)
      dot = Fma(Load(pi + j), Select(Below(j, i + 1), Load(ds + j)), dot);
    const Vec delta = Splat(gpt2_jax::ReduceAdd(dot));
    for (int64_t j = 0; j < Tp; j += kLanes) {
      const Vec dpj = Select(i < T ? Below(j, i + 1) : Mask{}, Load(ds + j));
      Store(ds + j, Load(pi + j) * (dpj - delta));
    }
  }
  LowerWX<D>(w.s.data(), w.k.data(), w.out.data(), Tp, 1.0f / std::sqrt(float(D)));  // dq = dS k / sqrt(D)
  Scatter(w.out.data(), sh, b, h, 0, dqkv);
  LowerWtX<D>(w.s.data(), w.q.data(), w.out.data(), Tp);  // dk = dS^T (q / sqrt(D))
  Scatter(w.out.data(), sh, b, h, 1, dqkv);
  LowerWtX<D>(w.p.data(), w.dy.data(), w.out.data(), Tp);  // dv = P^T dy
  Scatter(w.out.data(), sh, b, h, 2, dqkv);
}

// Runs fn(b, h, scratch) for every (b, h) on the calling thread and up to (pool threads - 1) pool tasks, each
// thread with its own scratch.
template <typename Fn>
void ForEachHead(ffi::ThreadPool& pool, const Shape& sh, Fn fn) {
  const int64_t n = sh.B * sh.H;
  gpt2_jax::ShareWork(pool, n, std::min<int64_t>(pool.num_threads(), n) - 1, [=] {
    return [=, scratch = Scratch(sh)](int64_t c) mutable { fn(c / sh.H, c % sh.H, scratch); };
  });
}

ffi::Error CheckShape(const Qkv& qkv, Shape& sh) {
  const auto dims = qkv.dimensions();
  sh = Shape{dims[0], dims[1], dims[3], dims[4], (dims[1] + 63) / 64 * 64};
  if (dims[2] != 3 || sh.D % 16 || sh.D < 16 || sh.D > 64)
    return ffi::Error::InvalidArgument("causal_attention: qkv must be [B, T, 3, H, D] with D in 16, 32, 48, 64");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, Qkv qkv, HeadsResult y, StatsResult stats) {
  Shape sh;
  if (ffi::Error e = CheckShape(qkv, sh); e.failure()) return e;
  const float* x = qkv.typed_data();
  float *out = y->typed_data(), *l = stats->typed_data();
  constexpr void (*kForward[])(const Shape&, int64_t, int64_t, const float*, float*, float*, Scratch&) = {
      Forward<16>, Forward<32>, Forward<48>, Forward<64>};
  const auto forward = kForward[sh.D / 16 - 1];
  ForEachHead(pool, sh, [=](int64_t b, int64_t h, Scratch& w) { forward(sh, b, h, x, out, l, w); });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, Qkv qkv, Stats stats, Heads dy, QkvResult dqkv) {
  Shape sh;
  if (ffi::Error e = CheckShape(qkv, sh); e.failure()) return e;
  const float *x = qkv.typed_data(), *l = stats.typed_data(), *g = dy.typed_data();
  float* out = dqkv->typed_data();
  constexpr void (*kBackward[])(const Shape&, int64_t, int64_t, const float*, const float*, const float*, float*,
                                Scratch&) = {Backward<16>, Backward<32>, Backward<48>, Backward<64>};
  const auto backward = kBackward[sh.D / 16 - 1];
  ForEachHead(pool, sh, [=](int64_t b, int64_t h, Scratch& w) { backward(sh, b, h, x, l, g, out, w); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Qkv>().Ret<Heads>().Ret<Stats>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Qkv>().Arg<Stats>().Arg<Heads>().Ret<Qkv>());
