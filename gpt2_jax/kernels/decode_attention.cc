// The attention of a decode step over the KV cache, float32: for each row b and head h,
//   y[b, h] = sum over s < n of softmax_s(q[b, h] . k[b, h, :, s] / sqrt(D)) v[b, h, s, :],  n = min(last[b] + 1, S),
// with the cache as model.KVCache holds it: keys [B, H, D, S] (slots minor), values [B, H, S, D].
// XLA reads every slot of every row (a slice of the slots in use is a copy that costs more than the matmuls); here
// each (row, head) reads only its own row's n slots. Every sum is in an order that n alone fixes (q . k one FMA per
// d in turn; the softmax's sum lane by lane, then across the lanes; p v one slot after another), so a row's result
// never depends on the other rows or on the cache's length. D is 16, 32, 48 or 64. The (row, head) pairs are shared
// out between the calling thread and tasks on XLA's intra-op thread pool (share_work.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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
using gpt2_jax::Select;
using gpt2_jax::Splat;
using gpt2_jax::Store;
using gpt2_jax::Vec;

static_assert(16 % kLanes == 0, "a head of 16 floats must hold whole vectors");

using DecodeHeads = ffi::Buffer<ffi::F32, 3>;  // [B, H, D]
using DecodeCache = ffi::Buffer<ffi::F32, 4>;
using DecodeLasts = ffi::Buffer<ffi::S32, 1>;
using DecodeHeadsResult = ffi::ResultBuffer<ffi::F32, 3>;

// One (row, head): q [D], k [D, S], v [S, D] -> y [D]; p holds n + kLanes floats of scratch.
template <int D>
void DecodeHead(const float* q, const float* k, const float* v, int64_t S, int64_t n, float scale, float* p,
                float* y) {
  const int64_t whole = n / kLanes * kLanes;
  // Scores, one row of keys at a time (each a contiguous stream; p stays in the L1 cache).
  for (int64_t s = 0; s < whole; s += kLanes) Store(p + s, Splat(q[0]) * Load(k + s));
  for (int64_t s = whole; s < n; ++s) p[s] = q[0] * k[s];
  for (int d = 1; d < D; ++d) {
    const float* kd = k + d * S;
    const Vec qd = Splat(q[d]);
    for (int64_t s = 0; s < whole; s += kLanes) Store(p + s, Fma(qd, Load(kd + s), Load(p + s)));
    for (int64_t s = whole; s < n; ++s) p[s] = std::fma(q[d], kd[s], p[s]);  // as a vector lane's FMA rounds
  }
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < n; ++s) {
    p[s] *= scale;
    max = std::max(max, p[s]);
  }
  // exp(score - max), zero past n (the lanes there read max: no overflow); their sum lane by lane, then across.
  std::fill(p + n, p + (n + kLanes - 1) / kLanes * kLanes, max);
  Vec sums = Splat(0.0f);
  for (int64_t s = 0; s < n; s += kLanes) {
    const Vec e = Select(Below(s, n), Exp(Load(p + s) - Splat(max)));
    Store(p + s, e);
    sums += e;
  }
  const float sum = gpt2_jax::ReduceAdd(sums);
  constexpr int kVectors = D / kLanes;
  Vec acc[kVectors] = {};
  for (int64_t s = 0; s < n; ++s) {
    const Vec ps = Splat(p[s]);
    for (int j = 0; j < kVectors; ++j) acc[j] = Fma(ps, Load(v + s * D + j * kLanes), acc[j]);
  }
  for (int j = 0; j < kVectors; ++j) Store(y + j * kLanes, acc[j] / Splat(sum));
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, DecodeHeads q, DecodeCache k, DecodeCache v, DecodeLasts last,
                               DecodeHeadsResult y) {
  const auto dims = k.dimensions();
  const int64_t B = dims[0], H = dims[1], D = dims[2], S = dims[3];
  const auto qd = q.dimensions(), vd = v.dimensions(), yd = y->dimensions();
  if (D % 16 || D < 16 || D > 64)
    return ffi::Error::InvalidArgument("decode_attention: the head size must be 16, 32, 48 or 64");
  if (qd[0] != B || qd[1] != H || qd[2] != D || vd[0] != B || vd[1] != H || vd[2] != S || vd[3] != D ||
      last.dimensions()[0] != B || yd[0] != B || yd[1] != H || yd[2] != D)
    return ffi::Error::InvalidArgument("decode_attention: q, y [B, H, D], k [B, H, D, S], v [B, H, S, D], last [B]");
  constexpr void (*kDecodeHeads[])(const float*, const float*, const float*, int64_t, int64_t, float, float*,
                                   float*) = {DecodeHead<16>, DecodeHead<32>, DecodeHead<48>, DecodeHead<64>};
  const auto head = kDecodeHeads[D / 16 - 1];
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* lp = last.typed_data();
  float* yp = y->typed_data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t n_items = B * H;
  gpt2_jax::ShareWork(pool, n_items, std::min<int64_t>(pool.num_threads(), n_items) - 1, [=] {
    return [=, p = std::vector<float>(S + kLanes)](int64_t i) mutable {
      const int64_t b = i / H, n = std::clamp<int64_t>(int64_t{lp[b]} + 1, 1, S);
      head(qp + i * D, kp + i * D * S, vp + i * S * D, S, n, scale, p.data(), yp + i * D);
    };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<DecodeHeads>()
                                  .Arg<DecodeCache>()
                                  .Arg<DecodeCache>()
                                  .Arg<DecodeLasts>()
                                  .Ret<DecodeHeads>());
