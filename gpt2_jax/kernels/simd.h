// The vector of floats that the kernels compute with, as wide as the CPU that compiles them (-march=native): GCC and
// Clang vector extensions, so one source serves AVX-512 (16 floats), AVX2 + FMA (8) and 64-bit ARM NEON (4).
// kRegisters is how many such vectors the CPU holds in registers; each kernel sizes its register blocks from it so
// that no variant spills.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#define GPT2_JAX_LANES 16
#define GPT2_JAX_REGISTERS 32
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GPT2_JAX_LANES 8
#define GPT2_JAX_REGISTERS 16
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define GPT2_JAX_LANES 4
#define GPT2_JAX_REGISTERS 32
#else
#error "the gpt2_jax CPU kernels need AVX2 and FMA, AVX-512, or 64-bit ARM with NEON"
#endif

namespace gpt2_jax {

constexpr int kLanes = GPT2_JAX_LANES;
constexpr int kRegisters = GPT2_JAX_REGISTERS;

typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef int32_t Mask __attribute__((vector_size(4 * kLanes)));  // a comparison's lanes: all ones or all zeros

inline Vec Load(const float* p) {  // memcpy: an unaligned vector load
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline Vec Load(const uint16_t* p) {  // bfloat16 is the top half of a float32
#if GPT2_JAX_LANES == 4
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));  // GCC 12 widens a 4-lane vector lane by lane
#elif GPT2_JAX_LANES == 8
  // GCC 12 widens an 8-lane vector in two halves (four instructions where vpmovzxwd is one)
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
#else
  // and a 16-lane one in two 8-lane halves (five instructions a vector, on the port of the second FMA unit)
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
#endif
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

template <std::size_t... I>
inline Vec SplatLanes(float x, std::index_sequence<I...>) {
  return Vec{((void)I, x)...};
}

inline Vec Splat(float x) { return SplatLanes(x, std::make_index_sequence<kLanes>()); }

// a * b + c rounded once. The compiler would contract the expression only in GNU mode or with -ffp-contract, and
// adamw.cc must never contract, so the fused instruction is named here.
inline Vec Fma(Vec a, Vec b, Vec c) {
#if GPT2_JAX_LANES == 16
  return _mm512_fmadd_ps(a, b, c);
#elif GPT2_JAX_LANES == 8
  return _mm256_fmadd_ps(a, b, c);
#else
  return vfmaq_f32(c, a, b);
#endif
}

// a in the lanes of keep, b elsewhere.
inline Vec Blend(Mask keep, Vec a, Vec b) {
  return reinterpret_cast<Vec>((keep & reinterpret_cast<Mask>(a)) | (~keep & reinterpret_cast<Mask>(b)));
}

inline Vec Sqrt(Vec v) {  // correctly rounded, as IEEE requires
#if GPT2_JAX_LANES == 16
  return _mm512_sqrt_ps(v);
#elif GPT2_JAX_LANES == 8
  return _mm256_sqrt_ps(v);
#else
  return vsqrtq_f32(v);
#endif
}

inline Vec Select(Mask keep, Vec v) { return reinterpret_cast<Vec>(keep & reinterpret_cast<Mask>(v)); }

inline Vec Max(Vec a, Vec b) { return Blend(a > b, a, b); }

// Keeps v in a register from here on: a compiler that folds its load into each use would load it once per use.
#if GPT2_JAX_LANES == 4
#define GPT2_JAX_IN_REGISTER(v) asm("" : "+w"(v))
#else
#define GPT2_JAX_IN_REGISTER(v) asm("" : "+v"(v))
#endif

template <std::size_t... I>
inline Mask LaneIndices(std::index_sequence<I...>) {
  return Mask{static_cast<int32_t>(I)...};
}

// The lanes j .. j + kLanes - 1 that are < end.
inline Mask Below(int64_t j, int64_t end) {
  const int64_t n = end - j;
  const int32_t limit = n >= kLanes ? kLanes : n <= 0 ? 0 : static_cast<int32_t>(n);
  return LaneIndices(std::make_index_sequence<kLanes>()) < limit;
}

inline float ReduceAdd(Vec v) {
  float sum = v[0];
  for (int i = 1; i < kLanes; ++i) sum += v[i];
  return sum;
}

inline float ReduceMax(Vec v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) for x <= 0 to about 1e-7 relative: x = n ln2 + r, |r| <= ln2 / 2, Taylor series of degree 7, times 2^n.
// n is rounded to nearest by adding and subtracting 1.5 * 2^23, and 2^n applied in two halves so that the result
// rounds once even where it is subnormal (n >= -150), as AVX-512's scalef does.
inline Vec Exp(Vec x) {
  x = Max(x, Splat(-104.0f));
  const Vec t = x * Splat(1.44269504088896341f), magic = Splat(12582912.0f);
  const Vec n = (t + magic) - magic;
  Vec r = Fma(-n, Splat(0.693145751953125f), x);
  r = Fma(-n, Splat(1.428606765330187e-06f), r);
  Vec p = Splat(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = Fma(p, r, Splat(c));
  const Mask ni = __builtin_convertvector(n, Mask), half = ni >> 1;
  const Vec scale_a = reinterpret_cast<Vec>((half + 127) << 23);
  const Vec scale_b = reinterpret_cast<Vec>((ni - half + 127) << 23);
  return p * scale_a * scale_b;
}

// While waiting for other threads' work items.
inline void Pause() {
#if GPT2_JAX_LANES == 4
  asm volatile("yield");
#else
  _mm_pause();
#endif
}

}  // namespace gpt2_jax
