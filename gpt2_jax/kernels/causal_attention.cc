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
// qkv projection, and only two numbers per row are kept. D is 16, 32, 48 or 64 (one to four 16-float vectors); T is
// padded to a multiple of 64 inside the kernel. float32 throughout. (b, h) pairs are shared out between the calling
// thread and tasks on XLA's intra-op thread pool (share_work.h).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "share_work.h"
#include "xla/ffi/api/ffi.h"

#ifndef __AVX512F__
#error "causal_attention needs AVX-512 (built with -march=native on a CPU without it)"
#endif

namespace ffi = xla::ffi;

namespace {

using Qkv = ffi::Buffer<ffi::F32, 5>;
using Heads = ffi::Buffer<ffi::F32, 4>;
using QkvResult = ffi::ResultBuffer<ffi::F32, 5>;
using HeadsResult = ffi::ResultBuffer<ffi::F32, 4>;
using Stats = ffi::Buffer<ffi::F32, 4>;
using StatsResult = ffi::ResultBuffer<ffi::F32, 4>;

// exp(x) for x <= 0 to about 1e-7 relative: x = n ln2 + r, |r| <= ln2 / 2, Taylor series of degree 7, times 2^n.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 Below(int64_t j, int64_t end) {  // lanes j .. j + 15 that are < end
  const int64_t n = end - j;
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// C[i, j0 .. j0 + 16 NV) = sum_d A[i, d] * B[j, d] for rows i of [i0, i0 + 4), B packed by PackColumns.
template <int ND, int NV>
inline void ABtBlock(const float* a, const float* bp, float* c, int64_t tp, int64_t i0, int64_t j0) {
  constexpr int D = 16 * ND;
  const float* panel = bp + (j0 / 64) * 64 * D + j0 % 64;  // within a [D, 64] panel
  __m512 acc[4][NV];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm512_loadu_ps(panel + d * 64 + 16 * v);
      asm("" : "+v"(bv[v]));  // keep it in a register: folded into each row's FMA it was loaded 4 times (2x slower)
    }
    for (int r = 0; r < 4; ++r) {
      const __m512 x = _mm512_set1_ps(a[(i0 + r) * D + d]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + (i0 + r) * tp + j0 + 16 * v, acc[r][v]);
}

// The lower triangle of C = A B^T: rows i of [i0, i0 + 4) get columns j < i0 + 4 rounded up to 16; A is [Tp, D],
// B [Tp, D] packed by PackColumns, C [Tp, Tp]. 64-column blocks (16 accumulators), then 16-column ones.
template <int ND>
void LowerABt(const float* a, const float* bp, float* c, int64_t tp) {
  for (int64_t i0 = 0; i0 < tp; i0 += 4) {
    int64_t j0 = 0;
    for (; j0 + 64 <= i0 + 4; j0 += 64) ABtBlock<ND, 4>(a, bp, c, tp, i0, j0);
    for (; j0 < i0 + 4; j0 += 16) ABtBlock<ND, 1>(a, bp, c, tp, i0, j0);
  }
}

// Y[i, :] = scale * sum_j W[i, j] X[j, :] over j <= i: W [Tp, Tp] lower triangular, X [Tp, D], Y [Tp, D].
template <int ND>
void LowerWX(const float* w, const float* x, float* y, int64_t tp, float scale) {
  constexpr int D = 16 * ND;
  for (int64_t i0 = 0; i0 < tp; i0 += 4) {
    __m512 acc[4][ND];
    for (auto& row : acc)
      for (auto& v : row) v = _mm512_setzero_ps();
    for (int64_t j = 0; j < i0 + 4; ++j) {
      __m512 xv[ND];
      for (int v = 0; v < ND; ++v) {
        xv[v] = _mm512_loadu_ps(x + j * D + 16 * v);
        asm("" : "+v"(xv[v]));
      }
      for (int r = 0; r < 4; ++r) {
        const __m512 wr = _mm512_set1_ps(w[(i0 + r) * tp + j]);
        for (int v = 0; v < ND; ++v) acc[r][v] = _mm512_fmadd_ps(wr, xv[v], acc[r][v]);
      }
    }
    const __m512 s = _mm512_set1_ps(scale);
    for (int r = 0; r < 4; ++r)
      for (int v = 0; v < ND; ++v) _mm512_storeu_ps(y + (i0 + r) * D + 16 * v, _mm512_mul_ps(s, acc[r][v]));
  }
}

// Y[j, :] = sum_i W[i, j] X[i, :] over i >= j: W^T X for W [Tp, Tp] lower triangular (read by rows, 4 columns at
// a time), X [Tp, D], Y [Tp, D].
template <int ND>
void LowerWtX(const float* w, const float* x, float* y, int64_t tp) {
  constexpr int D = 16 * ND;
  for (int64_t j0 = 0; j0 < tp; j0 += 4) {
    __m512 acc[4][ND];
    for (auto& row : acc)
      for (auto& v : row) v = _mm512_setzero_ps();
    for (int64_t i = j0; i < tp; ++i) {
      __m512 xv[ND];
      for (int v = 0; v < ND; ++v) {
        xv[v] = _mm512_loadu_ps(x + i * D + 16 * v);
        asm("" : "+v"(xv[v]));
      }
      for (int r = 0; r < 4; ++r) {
        const __m512 wr = _mm512_set1_ps(w[i * tp + j0 + r]);
        for (int v = 0; v < ND; ++v) acc[r][v] = _mm512_fmadd_ps(wr, xv[v], acc[r][v]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int v = 0; v < ND; ++v) _mm512_storeu_ps(y + (j0 + r) * D + 16 * v, acc[r][v]);
  }
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
    for (int64_t d = 0; d < sh.D; d += 16)
      _mm512_storeu_ps(dst + t * sh.D + d, _mm512_mul_ps(_mm512_set1_ps(scale), _mm512_loadu_ps(row + d)));
  }
}

void Scatter(const float* src, const Shape& sh, int64_t b, int64_t h, int which, float* dst) {
  for (int64_t t = 0; t < sh.T; ++t)
    std::memcpy(dst + (which < 0 ? sh.Head(b, t, h) : sh.Qkv(b, t, which, h)), src + t * sh.D,
                sh.D * sizeof(float));
}

// q (scaled by 1 / sqrt(D)), k and k^T of one (b, h) into the scratch buffers, and S = q k^T below the diagonal.
template <int ND>
void Scores(const Shape& sh, int64_t b, int64_t h, const float* qkv, Scratch& w) {
  Gather(qkv, sh, b, h, 0, w.q.data(), 1.0f / std::sqrt(float(sh.D)));
  Gather(qkv, sh, b, h, 1, w.k.data(), 1.0f);
  Gather(qkv, sh, b, h, 2, w.v.data(), 1.0f);
  PackColumns(w.k.data(), w.kt.data(), sh.Tp, sh.D);
  LowerABt<ND>(w.q.data(), w.kt.data(), w.s.data(), sh.Tp);
}

template <int ND>
void Forward(const Shape& sh, int64_t b, int64_t h, const float* qkv, float* y, float* stats, Scratch& w) {
  const int64_t T = sh.T, Tp = sh.Tp;
  Scores<ND>(sh, b, h, qkv, w);
  for (int64_t i = 0; i < Tp; ++i) {  // softmax of row i over j <= i; zeros elsewhere and in padding rows
    float* row = w.s.data() + i * Tp;
    if (i >= T) {
      std::memset(row, 0, Tp * sizeof(float));
      continue;
    }
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j <= i; j += 16) m = _mm512_mask_max_ps(m, Below(j, i + 1), m, _mm512_loadu_ps(row + j));
    const float mx = _mm512_reduce_max_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < Tp; j += 16) {
      const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(row + j), _mm512_set1_ps(mx));
      const __m512 e = _mm512_maskz_mov_ps(Below(j, i + 1), Exp(x));
      _mm512_storeu_ps(row + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(sum);
    for (int64_t j = 0; j <= i; j += 16)
      _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_set1_ps(inv), _mm512_loadu_ps(row + j)));
    stats[((b * sh.H + h) * T + i) * 2] = mx;
    stats[((b * sh.H + h) * T + i) * 2 + 1] = inv;
  }
  LowerWX<ND>(w.s.data(), w.v.data(), w.out.data(), Tp, 1.0f);
  Scatter(w.out.data(), sh, b, h, -1, y);
}

template <int ND>
void Backward(const Shape& sh, int64_t b, int64_t h, const float* qkv, const float* stats, const float* dy,
              float* dqkv, Scratch& w) {
  const int64_t T = sh.T, Tp = sh.Tp, D = sh.D;
  Scores<ND>(sh, b, h, qkv, w);
  Gather(dy, sh, b, h, -1, w.dy.data(), 1.0f);
  PackColumns(w.v.data(), w.vt.data(), Tp, D);
  for (int64_t i = 0; i < Tp; ++i) {  // P = exp(S - max) / sum below the diagonal, zero elsewhere and in padding
    const float* row_stats = stats + ((b * sh.H + h) * T + (i < T ? i : 0)) * 2;
    const __m512 mx = _mm512_set1_ps(row_stats[0]), inv = _mm512_set1_ps(row_stats[1]);
    const float* si = w.s.data() + i * Tp;
    float* pi = w.p.data() + i * Tp;
    for (int64_t j = 0; j < Tp; j += 16) {
      const __mmask16 keep = i < T ? Below(j, i + 1) : __mmask16(0);
      const __m512 e = Exp(_mm512_sub_ps(_mm512_loadu_ps(si + j), mx));
      _mm512_storeu_ps(pi + j, _mm512_maskz_mul_ps(keep, inv, e));
    }
  }
  LowerABt<ND>(w.dy.data(), w.vt.data(), w.s.data(), Tp);  // dP, over S
  for (int64_t i = 0; i < Tp; ++i) {  // dS = P * (dP - sum_j P dP), zero where P is
    const float* pi = w.p.data() + i * Tp;
    float* ds = w.s.data() + i * Tp;
    __m512 dot = _mm512_setzero_ps();
    for (int64_t j = 0; j <= i && i < T; j += 16)
      dot = _mm512_fmadd_ps(_mm512_loadu_ps(pi + j), _mm512_maskz_loadu_ps(Below(j, i + 1), ds + j), dot);
    const __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(dot));
    for (int64_t j = 0; j < Tp; j += 16) {
      const __m512 dpj = _mm512_maskz_loadu_ps(i < T ? Below(j, i + 1) : __mmask16(0), ds + j);
      _mm512_storeu_ps(ds + j, _mm512_mul_ps(_mm512_loadu_ps(pi + j), _mm512_sub_ps(dpj, delta)));
    }
  }
  LowerWX<ND>(w.s.data(), w.k.data(), w.out.data(), Tp, 1.0f / std::sqrt(float(D)));  // dq = dS k / sqrt(D)
  Scatter(w.out.data(), sh, b, h, 0, dqkv);
  LowerWtX<ND>(w.s.data(), w.q.data(), w.out.data(), Tp);  // dk = dS^T (q / sqrt(D))
  Scatter(w.out.data(), sh, b, h, 1, dqkv);
  LowerWtX<ND>(w.p.data(), w.dy.data(), w.out.data(), Tp);  // dv = P^T dy
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
      Forward<1>, Forward<2>, Forward<3>, Forward<4>};
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
                                Scratch&) = {Backward<1>, Backward<2>, Backward<3>, Backward<4>};
  const auto backward = kBackward[sh.D / 16 - 1];
  ForEachHead(pool, sh, [=](int64_t b, int64_t h, Scratch& w) { backward(sh, b, h, x, l, g, out, w); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Qkv>().Ret<Heads>().Ret<Stats>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Qkv>().Arg<Stats>().Arg<Heads>().Ret<Qkv>());
