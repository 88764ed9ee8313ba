// One AdamW step of one float32 parameter, in place: optim.fused_update's arithmetic, element by element.
//
// XLA:CPU splits that update into one loop per output (m, v, p), each recomputing what it needs from g, m and v,
// so it reads g three times and m and v twice; here every element of g, m, v and p is read once and m, v and p
// are written once (their results alias the inputs). The same operations in the same order as the Python code,
// each rounded to float32 (IEEE, no multiply and add contracted into an FMA): what numpy computes, bit for bit.
// XLA contracts multiply-adds and multiplies by a reciprocal instead of dividing by a scalar, so the two paths
// differ in the last bit of some elements.
// Vectors as wide as the CPU's (simd.h); chunks of the arrays are shared between the calling thread and XLA's
// intra-op thread pool (share_work.h).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "share_work.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off", "no-math-errno")
#endif

namespace ffi = xla::ffi;

namespace {

using Array = ffi::Buffer<ffi::F32>;  // any rank (aliases: commas inside the handler macro would split it)
using Scalars = ffi::Buffer<ffi::F32, 1>;
using ArrayResult = ffi::ResultBuffer<ffi::F32>;

constexpr int64_t kChunk = 1 << 15;  // elements per work item: 128 KB of each of the four arrays

// The scalars of the step, in this order (optim.py builds them).
enum Hyper { kScale, kBeta1, kOneMinusBeta1, kBeta2, kOneMinusBeta2, kCorrection1, kCorrection2, kEps, kLr,
             kDecay, kNumHyper };

void Update(const float* g, float* m, float* v, float* p, const float* h, int64_t first, int64_t last) {
  const float scale = h[kScale], b1 = h[kBeta1], c1 = h[kOneMinusBeta1], b2 = h[kBeta2], c2 = h[kOneMinusBeta2];
  const float bc1 = h[kCorrection1], bc2 = h[kCorrection2], eps = h[kEps], lr = h[kLr], decay = h[kDecay];
  // a vector at a time (the compiler does not vectorize the loop below: std::sqrt may set errno)
  using gpt2_jax::kLanes;
  using gpt2_jax::Load;
  using gpt2_jax::Splat;
  using gpt2_jax::Store;
  using gpt2_jax::Vec;
  const Vec vscale = Splat(scale), vb1 = Splat(b1), vc1 = Splat(c1), vb2 = Splat(b2), vc2 = Splat(c2);
  const Vec vbc1 = Splat(bc1), vbc2 = Splat(bc2), veps = Splat(eps), vlr = Splat(lr), vdecay = Splat(decay);
  int64_t i = first;
  for (; i + kLanes <= last; i += kLanes) {
    const Vec gi = Load(g + i) * vscale;
    const Vec mi = vb1 * Load(m + i) + vc1 * gi;
    const Vec vi = vb2 * Load(v + i) + vc2 * (gi * gi);
    Vec u = (mi / vbc1) / (gpt2_jax::Sqrt(vi / vbc2) + veps);
    const Vec pi = Load(p + i);
    if (decay != 0.0f) u = u + vdecay * pi;
    Store(m + i, mi);
    Store(v + i, vi);
    Store(p + i, pi - vlr * u);
  }
  for (; i < last; ++i) {
    const float gi = g[i] * scale;
    const float mi = b1 * m[i] + c1 * gi;
    const float vi = b2 * v[i] + c2 * (gi * gi);
    float u = (mi / bc1) / (std::sqrt(vi / bc2) + eps);
    if (decay != 0.0f) u = u + decay * p[i];
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] - lr * u;
  }
}

ffi::Error AdamWImpl(ffi::ThreadPool pool, Array g, Array m, Array v, Array p, Scalars hyper, ArrayResult m_out,
                     ArrayResult v_out, ArrayResult p_out) {
  const int64_t n = g.element_count();
  if (m.element_count() != n || v.element_count() != n || p.element_count() != n)
    return ffi::Error::InvalidArgument("adamw: g, m, v and p must have the same number of elements");
  if (hyper.element_count() != kNumHyper)
    return ffi::Error::InvalidArgument("adamw: hyper must hold 10 scalars");
  if (m_out->typed_data() != m.typed_data() || v_out->typed_data() != v.typed_data() ||
      p_out->typed_data() != p.typed_data())
    return ffi::Error::InvalidArgument("adamw: m, v and p must be aliased to the results");
  const float* gp = g.typed_data();
  float *mp = m_out->typed_data(), *vp = v_out->typed_data(), *pp = p_out->typed_data();
  const float* h = hyper.typed_data();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  gpt2_jax::ShareWork(pool, chunks, std::min<int64_t>(pool.num_threads(), chunks) - 1, [=] {
    return [=](int64_t c) { Update(gp, mp, vp, pp, h, c * kChunk, std::min(n, c * kChunk + kChunk)); };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamW, AdamWImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Array>()
                                  .Arg<Array>()
                                  .Arg<Array>()
                                  .Arg<Array>()
                                  .Arg<Scalars>()
                                  .Ret<Array>()
                                  .Ret<Array>()
                                  .Ret<Array>());
