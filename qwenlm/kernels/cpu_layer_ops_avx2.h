// cpu_layer_ops.h for CPUs with AVX2 + FMA but no AVX-512 (AMD Zen 2/3, most desktop Intel parts): RMSNorm,
// RoPE, one-token attention, the decode step's elementwise glue and the argmax, with the same names, arguments
// and arithmetic. cpu_gemv_avx2.cpp wraps them as ops (the Python forward's, on these CPUs) and cpu_step.cpp,
// built for AVX2, calls them directly: one source for both keeps the two paths bit-equal, as on AVX-512.
//
// What is bit-equal to the AVX-512 header: RMSNorm (the same fp64 sums in the same order), RoPE, the glue and the
// argmax (elementwise or exact). The attention's sums run in another order (8 lanes, not 16), so its output can
// differ from the AVX-512 kernel's in the last bits, as it differs from torch's SDPA.
// Internal linkage (anonymous namespace), as cpu_layer_ops.h.

#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sleef.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_layer_common.h"

namespace {

using bf16 = c10::BFloat16;

template <typename T>
inline float as_float(T v) {
  return static_cast<float>(v);
}

// Lanes [0, n) set (n may be <= 0 or >= 8).
inline __m256i lanes_below(int64_t n) {
  const int32_t m = static_cast<int32_t>(std::max<int64_t>(0, std::min<int64_t>(8, n)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m256 from_bf16_bits(__m128i b) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16)); }

// fp32 -> bf16 rounded to nearest even, bit for bit as c10::BFloat16(float) (subnormals kept); NaN becomes 0x7fc0.
inline __m128i round_to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
  rounded = _mm256_blendv_epi8(_mm256_set1_epi32(0x7fc0), rounded, ordered);
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

// Eight elements of a T row as fp32 (elements from n on read as 0), and back, rounded to T (only [0, n) written).
inline __m256 load8(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  return _mm256_maskload_ps(p, lanes_below(n));
}
inline __m256 load8(const bf16* p, int64_t n) {
  if (n >= 8) return from_bf16_bits(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (n > 0) std::memcpy(part, p, static_cast<size_t>(n) * sizeof(bf16));
  return from_bf16_bits(_mm_load_si128(reinterpret_cast<const __m128i*>(part)));
}
inline void store8(float* p, __m256 v, int64_t n) {
  if (n >= 8) {
    _mm256_storeu_ps(p, v);
  } else if (n > 0) {
    _mm256_maskstore_ps(p, lanes_below(n), v);
  }
}
inline void store8(bf16* p, __m256 v, int64_t n) {
  const __m128i r = round_to_bf16(v);
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), r);
  } else if (n > 0) {
    alignas(16) uint16_t part[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(part), r);
    std::memcpy(p, part, static_cast<size_t>(n) * sizeof(bf16));
  }
}
// v rounded to T and widened back (what torch computes when it stores an fp32 result in a T tensor and reads it).
template <typename T>
inline __m256 round_through(__m256 v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return from_bf16_bits(round_to_bf16(v));
  } else {
    return v;
  }
}

// RMSNorm (spec 2.3) of one row, as cpu_layer_ops.h's: y = T(x * rsqrt(mean(x^2) + eps)) * w, the sum of squares
// in fp64 with the AVX-512 kernel's lanes and reduction order (sixteen elements per step into two 8-lane fp64
// sums, here four 4-lane ones), so the two give the same bits.
template <typename T>
inline void rms_norm_row(const T* xr, const T* w, T* y, int64_t H, float eps) {
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd(), a2 = _mm256_setzero_pd(), a3 = _mm256_setzero_pd();
  for (int64_t h = 0; h < H; h += 16) {
    const __m256 v = load8(xr + h, H - h), u = load8(xr + h + 8, H - h - 8);
    const __m256d v0 = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), v1 = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    const __m256d u0 = _mm256_cvtps_pd(_mm256_castps256_ps128(u)), u1 = _mm256_cvtps_pd(_mm256_extractf128_ps(u, 1));
    a0 = _mm256_fmadd_pd(v0, v0, a0);  // exact square, one rounding: the same as an add of the square
    a1 = _mm256_fmadd_pd(v1, v1, a1);
    a2 = _mm256_fmadd_pd(u0, u0, a2);
    a3 = _mm256_fmadd_pd(u1, u1, a3);
  }
  // _mm512_reduce_add_pd(s0 + s1) with s0 = [a0 a1], s1 = [a2 a3]: high half + low half, then 2 + 2, then 1 + 1
  const __m256d half = _mm256_add_pd(_mm256_add_pd(a1, a3), _mm256_add_pd(a0, a2));
  const __m128d quarter = _mm_add_pd(_mm256_extractf128_pd(half, 1), _mm256_castpd256_pd128(half));
  const double ss = _mm_cvtsd_f64(quarter) + _mm_cvtsd_f64(_mm_unpackhi_pd(quarter, quarter));
  const __m256 inv = _mm256_set1_ps(1.0f / std::sqrt(static_cast<float>(ss / H) + eps));
  for (int64_t h = 0; h < H; h += 8) {
    const __m256 normed = round_through<T>(_mm256_mul_ps(load8(xr + h, H - h), inv));
    store8(y + h, _mm256_mul_ps(normed, load8(w + h, H - h)), H - h);
  }
}

// RoPE (NeoX halves) of one head row on its first d dims, in fp32: o = x*cos + rotate_half(x)*sin, then one
// rounding to T; dims d..D pass through. cos/sin: fp32 [d].
template <typename T>
inline void rope_row(const T* xr, const float* cos, const float* sin, int64_t d, int64_t D, T* o) {
  const int64_t half = d / 2;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t j = 0; j < half; j += 8) {
    const int64_t n = half - j;
    const __m256 lo = load8(xr + j, n), hi = load8(xr + half + j, n);
    const __m256 neg_hi = _mm256_xor_ps(hi, sign);
    store8(o + j, _mm256_add_ps(_mm256_mul_ps(lo, load8(cos + j, n)), _mm256_mul_ps(neg_hi, load8(sin + j, n))), n);
    store8(o + half + j,
           _mm256_add_ps(_mm256_mul_ps(hi, load8(cos + half + j, n)), _mm256_mul_ps(lo, load8(sin + half + j, n))), n);
  }
  for (int64_t j = d; j < D; ++j) o[j] = xr[j];
}

// ---------------------------------------------------------------------------------------------------
// The decode step's elementwise glue (cpu_step.cpp), each reproducing the Python forward's torch op.
// ---------------------------------------------------------------------------------------------------

// x <- T(x + o): a residual add in the model dtype (torch adds in fp32 and rounds once).
template <typename T>
void add_into(T* x, const T* o, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) store8(x + i, _mm256_add_ps(load8(x + i, n - i), load8(o + i, n - i)), n - i);
}

// x <- T(x * f) for a factor f already rounded to T (the LogN factor as `q * logn.type_as(q)` applies it).
template <typename T>
void scale_into(T* x, float f, int64_t n) {
  const __m256 vf = _mm256_set1_ps(f);
  for (int64_t i = 0; i < n; i += 8) store8(x + i, _mm256_mul_ps(load8(x + i, n - i), vf), n - i);
}

// a <- T(a * T(silu(g))), as the Python MLP's `w1(x) * F.silu(w2(x))`. ATen's AVX2 silu is g / (1 + exp(-g)) in
// fp32 with Sleef's 8-lane expf (1-ulp) over whole runs of two vectors of T (16 fp32 or 32 bf16 elements) and
// std::exp on the rest of the row; reproduced that way (cpu_step.cpp keeps torch's ops for rows of 32768+).
template <typename T>
void silu_mul_into(T* a, const T* g, int64_t n) {
  constexpr int64_t kRun = 2 * 32 / static_cast<int64_t>(sizeof(T));
  const int64_t vector_end = n / kRun * kRun;
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < vector_end; i += 8) {
    const __m256 x = load8(g + i, 8);
    const __m256 e = Sleef_expf8_u10(_mm256_xor_ps(x, sign));
    const __m256 silu = round_through<T>(_mm256_div_ps(x, _mm256_add_ps(one, e)));
    store8(a + i, _mm256_mul_ps(load8(a + i, 8), silu), 8);
  }
  silu_mul_tail(a, g, vector_end, n);
}

// y <- T(x): fp32 to the model dtype, as Tensor.to rounds (the attention output, merged heads).
template <typename T>
void narrow_into(T* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) store8(y + i, load8(x + i, n - i), n - i);
}

// ---------------------------------------------------------------------------------------------------
// One-token attention over a KV cache: softmax(scale * q.k_t + bias_t) v per (row, head), cpu_layer_ops.h's
// algorithm in 8 lanes: scores eight tokens at a time (eight dot products reduced by a transpose-add), softmax
// in fp32 with the same exp, then sum_t p_t v_t over blocks of kAhead tokens. Sixteen fp32 accumulators would
// fill every register, so a block's weighted sum runs over 64 dims at a time from L1, its accumulators kept in
// a buffer between blocks: V is read from memory once, as on AVX-512.
// bf16 K and V are widened as even/odd halves of each 16-element load (a shift and a mask); for the scores q
// is split the same way, so a bf16 q gives exact products and fp32 sums, as vdpbf16ps does.
// ---------------------------------------------------------------------------------------------------
namespace attn {

// Sixteen bf16 of a row at d as 32-bit lanes (elements from D on read as 0).
inline __m256i load16_bf16(const bf16* row, int64_t d, int64_t D) {
  if (D - d >= 16) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d));
  alignas(32) uint16_t part[16] = {};
  if (D > d) std::memcpy(part, row + d, static_cast<size_t>(D - d) * sizeof(bf16));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
}
inline __m256 even_half(__m256i x) { return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)); }
inline __m256 odd_half(__m256i x) {
  return _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// Eight vectors -> one vector whose lane i is the sum of v[i]'s lanes.
inline __m256 transpose_sum8(const __m256 v[8]) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [0..3 | 0..3] of each 128-bit half
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// e^x for x <= 0, cpu_layer_ops.h's exp_nonpositive: 2^n e^r, e^r by its Taylor series to r^7. 2^n is applied as
// two exact powers of two (n reaches -150, below the normal range), so the result is rounded once, as
// vscalefps rounds it.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);  // NaN in x passes through (second operand)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2 split in two: r is exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // p in [0.7, 1.42]: p * 2^max(n, -125) stays normal (exact), then * 2^(n - that) in [2^-25, 1] rounds once
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_max_epi32(ni, _mm256_set1_epi32(-125));
  const auto pow2 = [](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(n1)), pow2(_mm256_sub_epi32(ni, n1)));
}

// The query as the dot products read it: fp32 [D] for fp32 K; for bf16 K, per 16 dims its 8 even elements then
// its 8 odd ones (matching even_half/odd_half of a K load), zeros past D.
template <typename KV>
void query_lanes(const float* q, const uint16_t* qb, int64_t D, std::vector<float>& out) {
  const int64_t padded = (D + 15) / 16 * 16;
  out.assign(static_cast<size_t>(padded), 0.0f);
  const auto at = [&](int64_t d) {
    if (qb == nullptr) return q[d];
    uint32_t bits = static_cast<uint32_t>(qb[d]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  };
  for (int64_t d = 0; d < D; ++d) {
    if constexpr (std::is_same_v<KV, float>) {
      out[d] = at(d);
    } else {
      out[d / 16 * 16 + (d % 2) * 8 + (d % 16) / 2] = at(d);
    }
  }
}

// scores[t] = scale * q.k_t (+ bias[t]) for t in [0, T), with q from query_lanes.
template <typename KV, typename Rows>
void scores_of(const float* q, const Rows& k, const Rows& v, bool v_along, int64_t T, int64_t D, float scale,
               const float* bias, float* scores) {
  prefetch_rows(k, 0, std::min<int64_t>(kAhead, T), D, 1);
  for (int64_t t0 = 0; t0 < T; t0 += 8) {
    const int64_t nt = std::min<int64_t>(8, T - t0);
    if (t0 + kAhead < T) prefetch_rows(k, t0 + kAhead, std::min<int64_t>(8, T - t0 - kAhead), D, 1);
    if (v_along) prefetch_rows(v, t0, nt, D, 1);
    const KV* row[8];
    for (int i = 0; i < 8; ++i) row[i] = k(t0 + std::min<int64_t>(i, nt - 1));
    __m256 acc[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    if constexpr (std::is_same_v<KV, float>) {
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);  // zero-padded to 16
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i)
          if (i < nt) acc[i] = _mm256_fmadd_ps(qv, load8(row[i] + d, D - d), acc[i]);
      }
    } else {
      for (int64_t d = 0; d < D; d += 16) {
        const __m256 qe = _mm256_loadu_ps(q + d), qo = _mm256_loadu_ps(q + d + 8);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          if (i >= nt) continue;
          const __m256i x = load16_bf16(row[i], d, D);
          acc[i] = _mm256_fmadd_ps(qo, odd_half(x), _mm256_fmadd_ps(qe, even_half(x), acc[i]));
        }
      }
    }
    __m256 s = _mm256_mul_ps(transpose_sum8(acc), _mm256_set1_ps(scale));
    if (bias) s = _mm256_add_ps(s, load8(bias + t0, nt));
    store8(scores + t0, s, nt);
  }
}

// In place: scores -> exp(scores - max); returns their sum.
inline float exp_shifted(float* scores, int64_t T) {
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < T; t += 8) {
    const __m256i m = lanes_below(T - t);
    best = _mm256_blendv_ps(best, _mm256_max_ps(best, _mm256_maskload_ps(scores + t, m)), _mm256_castsi256_ps(m));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, best);
  float top = lanes[0];
  for (int i = 1; i < 8; ++i) top = std::max(top, lanes[i]);
  const __m256 vtop = _mm256_set1_ps(top);
  __m256 total = _mm256_setzero_ps();
  for (int64_t t = 0; t < T; t += 8) {
    const __m256i m = lanes_below(T - t);
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_maskload_ps(scores + t, m), vtop));
    _mm256_maskstore_ps(scores + t, m, e);
    total = _mm256_add_ps(total, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
  }
  _mm256_store_ps(lanes, total);
  float sum = 0.0f;
  for (int i = 0; i < 8; ++i) sum += lanes[i];
  return sum;
}

// acc[0:8] += sum over the block's tokens of w_t * (64 dims of v_t from d0), fp32 or bf16 (even/odd lanes).
template <typename KV, bool kWhole>
inline void weigh_part(const float* w, const KV* const* rows, int64_t count, int64_t d0, int64_t D, __m256 (&acc)[8]) {
  for (int64_t i = 0; i < count; ++i) {
    const __m256 p = _mm256_set1_ps(w[i]);
    const KV* vt = rows[i];
    if constexpr (std::is_same_v<KV, float>) {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m256 x = kWhole ? _mm256_loadu_ps(vt + d0 + 8 * j) : load8(vt + d0 + 8 * j, D - d0 - 8 * j);
        acc[j] = _mm256_fmadd_ps(p, x, acc[j]);
      }
    } else {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int64_t d = d0 + 16 * j;
        const __m256i x = kWhole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vt + d)) : load16_bf16(vt, d, D);
        acc[2 * j] = _mm256_fmadd_ps(p, even_half(x), acc[2 * j]);
        acc[2 * j + 1] = _mm256_fmadd_ps(p, odd_half(x), acc[2 * j + 1]);
      }
    }
  }
}

// out[0:D] = (sum_t w[t] v_t) / total. Unless V came into L2 with the scores, each block prefetches the next.
template <typename KV, typename Rows>
void weighted_values(const float* w, const Rows& v, bool v_in_cache, int64_t T, int64_t D, float total, float* out) {
  const int64_t padded = (D + 63) / 64 * 64;
  thread_local std::vector<float> sums;
  sums.assign(static_cast<size_t>(padded), 0.0f);  // per 64 dims, the 8 accumulators (bf16: even/odd per 16)
  if (!v_in_cache) prefetch_rows(v, 0, std::min<int64_t>(kAhead, T), D, 1);
  const KV* rows[kAhead];
  for (int64_t t0 = 0; t0 < T; t0 += kAhead) {
    const int64_t count = std::min<int64_t>(kAhead, T - t0);
    if (!v_in_cache && t0 + kAhead < T) prefetch_rows(v, t0 + kAhead, std::min<int64_t>(kAhead, T - t0 - kAhead), D, 1);
    for (int64_t i = 0; i < count; ++i) rows[i] = v(t0 + i);
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      __m256 acc[8];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_loadu_ps(sums.data() + d0 + 8 * j);
      if (d0 + 64 <= D) {
        weigh_part<KV, true>(w + t0, rows, count, d0, D, acc);
      } else {
        weigh_part<KV, false>(w + t0, rows, count, d0, D, acc);
      }
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(sums.data() + d0 + 8 * j, acc[j]);
    }
  }
  const __m256 inv = _mm256_set1_ps(1.0f / total);
  for (int64_t d = 0; d < D; d += 16) {
    const __m256 a = _mm256_loadu_ps(sums.data() + d), b = _mm256_loadu_ps(sums.data() + d + 8);
    if constexpr (std::is_same_v<KV, float>) {
      store8(out + d, _mm256_mul_ps(a, inv), D - d);
      store8(out + d + 8, _mm256_mul_ps(b, inv), D - d - 8);
    } else {  // a: even elements of these 16 dims, b: odd ones
      const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);  // [0-3 | 8-11], [4-7 | 12-15]
      store8(out + d, _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x20), inv), D - d);
      store8(out + d + 8, _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x31), inv), D - d - 8);
    }
  }
}

// One (row, head) of one-token attention over T tokens whose K/V rows `k`/`v` locate: out[0:D] (fp32).
// q: fp32 query, or qb: its bf16 bits (bf16 K only).
template <typename KV, typename Rows>
void attend_head(const float* q, const uint16_t* qb, const Rows& k, const Rows& v, int64_t T, int64_t D, float scale,
                 const float* bias, float* scores, float* out) {
  const bool v_along = T * D * static_cast<int64_t>(sizeof(KV)) <= kVWithScoresBytes;
  thread_local std::vector<float> lanes;
  query_lanes<KV>(q, qb, D, lanes);
  scores_of<KV>(lanes.data(), k, v, v_along, T, D, scale, bias, scores);
  const float total = exp_shifted(scores, T);
  weighted_values<KV>(scores, v, v_along, T, D, total, out);
}

}  // namespace attn

// Greedy decoding's argmax over the vocabulary, as cpu_layer_ops.h's: the first maximal index, and a NaN counts
// as the maximum (the first NaN's index), as torch's.
namespace argmax_impl {

template <typename T>
int64_t argmax_row(const T* p, int64_t n) {
  __m256 mx = _mm256_set1_ps(-INFINITY);
  bool nan = false;
  for (int64_t k = 0; k < n && !nan; k += 8) {
    __m256 v = load8(p + k, n - k);
    if (n - k < 8) v = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, _mm256_castsi256_ps(lanes_below(n - k)));
    nan = _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0;
    mx = _mm256_max_ps(mx, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float m = lanes[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, lanes[i]);
  for (int64_t k = 0; k < n; k += 8) {
    const __m256 v = load8(p + k, n - k);
    const __m256 hit = nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, _mm256_set1_ps(m), _CMP_EQ_OQ);
    const int bits = _mm256_movemask_ps(hit) & ((1 << std::min<int64_t>(8, n - k)) - 1);
    if (bits) return k + __builtin_ctz(bits);
  }
  return 0;  // n == 0 is rejected before
}

}  // namespace argmax_impl

}  // namespace
