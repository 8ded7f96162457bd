// The per-token pieces of a decoder layer besides its matrix products: RMSNorm, RoPE and one-token attention
// over a KV cache, the decode step's elementwise glue, the argmax. cpu_gemv.cpp wraps them as ops (the Python
// forward's kernels, through cpu_layer_ops_torch.h) and cpu_step.cpp's fused decode step calls them directly; one
// source for both keeps the two paths bit-equal. AVX-512 code; cpu_layer_ops_avx2.h is the same for AVX2.
// Everything here has internal linkage (anonymous namespace): each library gets its own copy.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sleef.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu_layer_common.h"

namespace {

using bf16 = c10::BFloat16;

inline __mmask16 tail_mask16(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}
inline __mmask32 tail_mask32(int64_t n) {
  return n >= 32 ? (__mmask32)0xFFFFFFFFu : n <= 0 ? (__mmask32)0 : (__mmask32)((1u << n) - 1u);
}
inline __m256i to_bf16_bits(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
inline __m512 from_bf16_bits(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

// ---------------------------------------------------------------------------------------------------
// Per-token elementwise steps of a decoding layer, fused: each is a handful of tiny torch ops per call
// (upcast, reduce, scale, downcast...): at one token per step their dispatch costs more than the math, and for
// a long prefill one threaded pass beats several (RoPE 8x).
// Both reproduce qwenlm.model.blocks' torch formulas operation for operation (same roundings; contraction
// into FMAs is switched off for the whole file by -ffp-contract=off, see kernels/cpu.py), so the fused and
// unfused paths agree bit for bit.
// ---------------------------------------------------------------------------------------------------
template <typename T>
inline float as_float(T v) {
  return static_cast<float>(v);
}

// fp32 -> bf16 rounded to nearest even, bit for bit as c10::BFloat16(float) and ATen's vectorised conversion for
// every value, subnormals included (vcvtneps2bf16 would flush those); NaN becomes 0x7fc0.
inline __m256i round_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 ordered = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(ordered, _mm512_set1_epi32(0x7fc0), rounded));
}

// Sixteen elements of a T row as fp32 (lanes outside `m` read as 0), and back, rounded to T.
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m) { return from_bf16_bits(_mm256_maskz_loadu_epi16(m, p)); }
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(bf16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, round_to_bf16(v)); }
// v rounded to T and widened back (what torch computes when it stores an fp32 result in a T tensor and reads it).
template <typename T>
inline __m512 round_through(__m512 v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return from_bf16_bits(round_to_bf16(v));
  } else {
    return v;
  }
}

// RMSNorm (spec 2.3) of one row: y = T(x * rsqrt(mean(x^2) + eps)) * w, normalised in fp32, product rounded to T
// once. The sum of squares is taken in fp64 (squares of fp32 values are exact there; a wider sum than torch's
// fp32 one, so the result differs from torch's by at most an fp32 ulp).
template <typename T>
inline void rms_norm_row(const T* xr, const T* w, T* y, int64_t H, float eps) {
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  for (int64_t h = 0; h < H; h += 16) {
    const __m512 v = load16(xr + h, tail_mask16(H - h));
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    s0 = _mm512_fmadd_pd(lo, lo, s0);  // exact square, one rounding: the same as an add of the square
    s1 = _mm512_fmadd_pd(hi, hi, s1);
  }
  const double ss = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(ss / H) + eps));
  for (int64_t h = 0; h < H; h += 16) {
    const __mmask16 m = tail_mask16(H - h);
    const __m512 normed = round_through<T>(_mm512_mul_ps(load16(xr + h, m), inv));
    store16(y + h, _mm512_mul_ps(normed, load16(w + h, m)), m);
  }
}

// RoPE (NeoX halves) of one head row on its first d dims, in fp32: o = x*cos + rotate_half(x)*sin, then one
// rounding to T; dims d..D pass through. cos/sin: fp32 [d].
template <typename T>
inline void rope_row(const T* xr, const float* cos, const float* sin, int64_t d, int64_t D, T* o) {
  const int64_t half = d / 2;
  for (int64_t j = 0; j < half; j += 16) {
    const __mmask16 m = tail_mask16(half - j);
    const __m512 lo = load16(xr + j, m), hi = load16(xr + half + j, m);
    // first half: x*cos + (-x_hi)*sin; second half: x_hi*cos + x_lo*sin
    const __m512 neg_hi = _mm512_xor_ps(hi, _mm512_set1_ps(-0.0f));
    store16(o + j, _mm512_add_ps(_mm512_mul_ps(lo, load16(cos + j, m)), _mm512_mul_ps(neg_hi, load16(sin + j, m))), m);
    store16(o + half + j,
            _mm512_add_ps(_mm512_mul_ps(hi, load16(cos + half + j, m)), _mm512_mul_ps(lo, load16(sin + half + j, m))),
            m);
  }
  for (int64_t j = d; j < D; ++j) o[j] = xr[j];
}

// The decode step's elementwise glue (cpu_step.cpp), each reproducing the Python forward's torch op.

// x <- T(x + o): a residual add in the model dtype (torch adds in fp32 and rounds once).
template <typename T>
void add_into(T* x, const T* o, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask16(n - i);
    store16(x + i, _mm512_add_ps(load16(x + i, m), load16(o + i, m)), m);
  }
}

// x <- T(x * f) for a factor f already rounded to T (the LogN factor as `q * logn.type_as(q)` applies it).
template <typename T>
void scale_into(T* x, float f, int64_t n) {
  const __m512 vf = _mm512_set1_ps(f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask16(n - i);
    store16(x + i, _mm512_mul_ps(load16(x + i, m), vf), m);
  }
}

// a <- T(a * T(silu(g))), as the Python MLP's `w1(x) * F.silu(w2(x))`. ATen's CPU silu is g / (1 + exp(-g)) in
// fp32, with Sleef's expf (1-ulp) over whole runs of two vectors of T and std::exp on the rest of the row; it is
// reproduced that way here, so the two agree bit for bit. (ATen splits rows of 32768+ elements across threads,
// each piece with its own tail: run_typed keeps torch's ops for those.)
template <typename T>
void silu_mul_into(T* a, const T* g, int64_t n) {
  constexpr int64_t kRun = 2 * 64 / static_cast<int64_t>(sizeof(T));
  const int64_t vector_end = n / kRun * kRun;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < vector_end; i += 16) {
    const __m512 x = load16(g + i, 0xFFFF);
    const __m512 e = Sleef_expf16_u10(_mm512_xor_ps(x, _mm512_set1_ps(-0.0f)));
    const __m512 silu = round_through<T>(_mm512_div_ps(x, _mm512_add_ps(one, e)));
    store16(a + i, _mm512_mul_ps(load16(a + i, 0xFFFF), silu), 0xFFFF);
  }
  silu_mul_tail(a, g, vector_end, n);
}

// y <- T(x): fp32 to the model dtype, as Tensor.to rounds (the attention output, merged heads).
template <typename T>
void narrow_into(T* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask16(n - i);
    store16(y + i, load16(x + i, m), m);
  }
}

// ---------------------------------------------------------------------------------------------------
// One-token attention over a KV cache (decoding): softmax(scale * q.k_t + bias_t) v, per (row, head).
// torch's SDPA takes ~1 ms (bf16) / ~0.3 ms (fp32) per layer at 576 cached tokens here, several times the
// time it takes to read K and V. This reads each K and V row once, sixteen tokens at a time:
//  - scores: sixteen independent dot products, reduced into one vector of sixteen scores by a transpose-add;
//    bf16 q and K use vdpbf16ps (exact products, fp32 sums), anything else widens to fp32 FMAs;
//  - softmax in fp32 with a vectorised exp (fp32-accurate, see exp_nonpositive);
//  - out = sum_t p_t v_t accumulated in registers, 128 head dims per pass, divided by sum_t p_t once.
// K/V are [B, n, T, D] views whose rows (tokens) are contiguous (stride D) but whose heads may sit apart
// (a slice of a larger cache). bias, if given, is an additive fp32 mask [B or 1, T] (continuous batching).
// paged_decode_attention runs the same code over a paged cache (the serving engine's): K/V pools
// [num_blocks, n, block_size, D] and one block table per row; a token's row is found through the table
// (cpu_layer_common.h's Rows accessors), so nothing is gathered.
// ---------------------------------------------------------------------------------------------------
namespace attn {

// Sixteen vectors -> one vector whose lane i is the sum of v[i]'s lanes.
inline __m512 transpose_sum16(__m512 v[16]) {
  __m512 a[8], b[4], c[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // per 128-bit lane L: partial sums of v[4i..4i+3] over lane L
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // [b0: L0+L1, L2+L3 | b1: L0+L1, L2+L3]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// e^x for x <= 0 (scores minus their maximum): e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln2/2, and e^r
// by its Taylor series to r^7 (truncation < 2e-9 relative, below fp32 rounding). Below -104 the result is
// 0 in fp32 anyway (vscalefps flushes it); NaN stays NaN.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  // NaN in x passes through (second operand)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 split in two: r is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Up to 32 bf16 (or 16 fp32) elements of a row at d, zeros past D.
inline __m512i load_bf16(const bf16* row, int64_t d, int64_t D) {
  return _mm512_maskz_loadu_epi16(tail_mask32(D - d), row + d);
}
inline __m512 load_f32(const float* row, int64_t d, int64_t D) { return _mm512_maskz_loadu_ps(tail_mask16(D - d), row + d); }

// scores[t] = scale * q.k_t (+ bias[t]) for t in [0, T). KV = bf16 with bf16 q (qb, exact) or fp32 math.
// v: the head's V rows, prefetched as the scores are computed when v_along (see kVWithScoresBytes).
template <typename KV, bool kBf16Dot, typename Rows>
void scores_of(const float* q, const uint16_t* qb, const Rows& k, const Rows& v, bool v_along, int64_t T, int64_t D,
               float scale, const float* bias, float* scores) {
  prefetch_rows(k, 0, std::min<int64_t>(kAhead, T), D, 1);
  for (int64_t t0 = 0; t0 < T; t0 += 16) {
    const int64_t nt = std::min<int64_t>(16, T - t0);
    if (t0 + kAhead < T) prefetch_rows(k, t0 + kAhead, std::min<int64_t>(16, T - t0 - kAhead), D, 1);
    if (v_along) prefetch_rows(v, t0, nt, D, 1);
    const typename Rows::type* row[16];  // located once per group, not once per load (a paged row costs a lookup)
    if (k.run(t0) >= nt) {  // the group's rows are evenly spaced (always, unless blocks are under 16 tokens)
      const typename Rows::type* first = k(t0);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) row[i] = first + std::min<int64_t>(i, nt - 1) * k.step();
    } else {
      for (int i = 0; i < 16; ++i) row[i] = k(t0 + std::min<int64_t>(i, nt - 1));
    }
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    if constexpr (kBf16Dot) {
      for (int64_t d = 0; d < D; d += 32) {
        const __m512i qv = _mm512_maskz_loadu_epi16(tail_mask32(D - d), qb + d);
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i)
          if (i < nt) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)load_bf16(row[i], d, D), (__m512bh)qv);
      }
    } else {
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 qv = load_f32(q, d, D);
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          if (i >= nt) continue;
          __m512 kv;
          if constexpr (std::is_same_v<KV, float>) {
            kv = load_f32(row[i], d, D);
          } else {
            kv = from_bf16_bits(_mm256_maskz_loadu_epi16(tail_mask16(D - d), row[i] + d));
          }
          acc[i] = _mm512_fmadd_ps(qv, kv, acc[i]);
        }
      }
    }
    __m512 s = _mm512_mul_ps(transpose_sum16(acc), _mm512_set1_ps(scale));
    const __mmask16 mt = tail_mask16(nt);
    if (bias) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(mt, bias + t0));
    _mm512_mask_storeu_ps(scores + t0, mt, s);
  }
}

// In place: scores -> exp(scores - max); returns their sum.
inline float exp_shifted(float* scores, int64_t T) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < T; t += 16)
    best = _mm512_mask_max_ps(best, tail_mask16(T - t), best, _mm512_loadu_ps(scores + t));
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(best));
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; t += 16) {
    const __mmask16 mt = tail_mask16(T - t);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mt, scores + t), top));
    _mm512_mask_storeu_ps(scores + t, mt, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mt, e));
  }
  return _mm512_reduce_add_ps(total);
}

// out[0:D] = (sum_t w[t] v_t) / total, 128 dims (8 accumulators) per pass over the tokens. bf16 rows are
// widened as even/odd halves (a shift and a mask) and re-interleaved once at the end. Unless V came into L2
// with the scores, each pass prefetches the rows kAhead tokens ahead.
template <typename KV, typename Rows>
void weighted_values(const float* w, const Rows& v, bool v_in_cache, int64_t T, int64_t D, float total, float* out) {
  const __m512 inv = _mm512_set1_ps(1.0f / total);
  // End of the group of sixteen tokens that t starts in a run [t0, t0 + n); prefetches kAhead tokens further.
  const auto group = [&](int64_t t0, int64_t n, int64_t t) {
    if (!v_in_cache && t % 16 == 0 && t + kAhead < T)
      prefetch_rows(v, t + kAhead, std::min<int64_t>(16, T - t - kAhead), D, 1);
    return std::min(t0 + n, (t / 16 + 1) * 16);
  };
  for (int64_t d0 = 0; d0 < D; d0 += 128) {
    if (!v_in_cache) prefetch_rows(v, 0, std::min<int64_t>(kAhead, T), D, 1);
    __m512 acc[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
    if constexpr (std::is_same_v<KV, float>) {
      for (int64_t t0 = 0; t0 < T;) {  // runs of evenly spaced rows (a paged cache: one block)
        const int64_t n = std::min(T - t0, v.stream(t0));
        const KV* vt = v(t0);
        for (int64_t t = t0; t < t0 + n;) {
          for (const int64_t end = group(t0, n, t); t < end; ++t, vt += v.step()) {
            const __m512 p = _mm512_set1_ps(w[t]);
#pragma GCC unroll 8
            for (int i = 0; i < 8; ++i) acc[i] = _mm512_fmadd_ps(p, load_f32(vt, d0 + 16 * i, D), acc[i]);
          }
        }
        t0 += n;
      }
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i)
        _mm512_mask_storeu_ps(out + d0 + 16 * i, tail_mask16(D - d0 - 16 * i), _mm512_mul_ps(acc[i], inv));
    } else {
      const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
      for (int64_t t0 = 0; t0 < T;) {  // runs of evenly spaced rows (a paged cache: one block)
        const int64_t n = std::min(T - t0, v.stream(t0));
        const KV* vt = v(t0);
        for (int64_t t = t0; t < t0 + n;) {
          for (const int64_t end = group(t0, n, t); t < end; ++t, vt += v.step()) {
            const __m512 p = _mm512_set1_ps(w[t]);
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) {  // acc[2i]: even elements of block i, acc[2i+1]: odd ones
              const __m512i x = load_bf16(vt, d0 + 32 * i, D);
              acc[2 * i] = _mm512_fmadd_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), acc[2 * i]);
              acc[2 * i + 1] = _mm512_fmadd_ps(p, _mm512_castsi512_ps(_mm512_and_si512(x, hi_mask)), acc[2 * i + 1]);
            }
          }
        }
        t0 += n;
      }
      const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
      const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const int64_t d = d0 + 32 * i;
        _mm512_mask_storeu_ps(out + d, tail_mask16(D - d),
                              _mm512_mul_ps(_mm512_permutex2var_ps(acc[2 * i], lo_idx, acc[2 * i + 1]), inv));
        _mm512_mask_storeu_ps(out + d + 16, tail_mask16(D - d - 16),
                              _mm512_mul_ps(_mm512_permutex2var_ps(acc[2 * i], hi_idx, acc[2 * i + 1]), inv));
      }
    }
  }
}

// One (row, head) of one-token attention over T tokens whose K/V rows `k`/`v` locate: out[0:D] (fp32).
// q: fp32 query (fp32 math) or qb: its bf16 bits (bf16 K only: exact bf16 products).
template <typename KV, typename Rows>
void attend_head(const float* q, const uint16_t* qb, const Rows& k, const Rows& v, int64_t T, int64_t D, float scale,
                 const float* bias, float* scores, float* out) {
  const bool v_along = T * D * static_cast<int64_t>(sizeof(KV)) <= kVWithScoresBytes;
  if constexpr (std::is_same_v<KV, bf16>) {
    if (qb != nullptr) {
      scores_of<KV, true>(q, qb, k, v, v_along, T, D, scale, bias, scores);
    } else {
      scores_of<KV, false>(q, qb, k, v, v_along, T, D, scale, bias, scores);
    }
  } else {
    scores_of<KV, false>(q, qb, k, v, v_along, T, D, scale, bias, scores);
  }
  const float total = exp_shifted(scores, T);
  weighted_values<KV>(scores, v, v_along, T, D, total, out);
}

}  // namespace attn

// Greedy decoding's argmax over the vocabulary. torch's CPU argmax carries an index with every element and
// takes ~0.2 ms per 151,936-logit fp32 row (~0.5 ms in bf16) here, as long as the rest of a token's Python.
// Two vectorised passes instead: the row's maximum, then the first element equal to it. Same result as torch:
// the first maximal index, and a NaN counts as the maximum (the first NaN's index).
namespace argmax_impl {

inline __m512 load16(const float* p, __mmask16 mk) { return _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), mk, p); }
inline __m512 load16(const bf16* p, __mmask16 mk) {
  const __m256i neg_inf = _mm256_set1_epi16(static_cast<int16_t>(0xFF80));
  return from_bf16_bits(_mm256_mask_loadu_epi16(neg_inf, mk, reinterpret_cast<const uint16_t*>(p)));
}

template <typename T>
int64_t argmax_row(const T* p, int64_t n) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (int64_t k = 0; k < n && !nan; k += 16) {
    const __m512 v = load16(p + k, tail_mask16(n - k));
    nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, v);
  }
  const float m = _mm512_reduce_max_ps(mx);
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 v = load16(p + k, tail_mask16(n - k));
    const __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)
                              : (_mm512_cmp_ps_mask(v, _mm512_set1_ps(m), _CMP_EQ_OQ) & tail_mask16(n - k));
    if (hit) return k + __builtin_ctz(hit);
  }
  return 0;  // n == 0 is rejected before
}

}  // namespace argmax_impl

}  // namespace
