// Matrix-vector products for CPUs with AVX2 + FMA but no AVX-512 BF16 (AMD Zen 2/3, most desktop Intel parts),
// where cpu_gemv.cpp cannot run: PyTorch would dequantize every quantized weight at every step, and its bf16
// matrix-vector product is slower. Ops in torch.ops.qwenlm_avx2, the linears returning x's dtype:
//
//   linear_bf16(x [M, K] f32/bf16, w [N, K] bf16, bias?) -> [M, N], any M, 4 rows at a time per weight row:
//     fp32 products and sums.
//   linear_quantized(x [M, K] f32/bf16, order, q, scales [N, G] f32, zeros [N, G] i16, bits, group, bias?,
//     fp32_out) -> [M, N] (fp32 if fp32_out: for tests of the integer path's precision), any M, 4 rows at a
//     time per weight row. q is the kernel layout
//     of quant.py (pack_quantized). The activations are first copied into the order the code bytes are stored
//     in (`order`, per chunk: cpu.py's _avx2_order), so each row's bytes are walked front to back. fp32 x: each
//     group's sum of (q - z) * x (q - z exact in fp32) is scaled by the group's s once and added into fp32
//     accumulators: the reference's W = (q - z) * s, x @ W.T, up to the order of the roundings. bf16 x with int4
//     or int6 codes: integer products of the codes with a fixed-point copy of x (see IntArgs), about twice the
//     speed, as the AVX-512 "vnni" kernel does it.
//   gemm_bf16(x, w, bias?), gemm_quantized(x, order, q, scales, zeros, bits, group, bias?): the products above
//     for a prompt's rows, a blocked GEMM (see there); fp32 products and sums, the weight's values as
//     dequantize_out makes them.
//   dequantize_out(order, q, scales, zeros, bits, group, K, out [N, K] f32/bf16): the dense weight, for torch's
//     GEMM of a prompt's rows past what gemm_* take.
//   decode_attention, paged_decode_attention, rms_norm, rope, argmax_last: cpu_gemv.cpp's per-token layer ops,
//     the same wrappers (cpu_layer_ops_torch.h) over cpu_layer_ops_avx2.h's rows.
//
// Rows of the weight are split over torch's intra-op threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "cpu_layer_ops_avx2.h"
#include "cpu_layer_ops_torch.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kMaxRows = 4;

struct Args {
  const float* x;       // [M, Kp], kernel order
  const uint8_t* q;     // [N, row_bytes]
  const float* scales;  // [N, G]
  const int16_t* zeros; // [N, G]
  const float* bias;    // [N] or nullptr
  float* out;           // [M, N]
  int64_t N, Kp, G, group, row_bytes;
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Software prefetch kAhead bytes ahead of the weight stream (into L2, as cpu_gemv.cpp does): a thread reads its
// rows front to back, but each row is a short stream (1-11 KB) that the hardware prefetchers follow too late to
// keep DRAM busy; without it a streamed int8 linear ran at half the read bandwidth.
constexpr int64_t kAhead = 16384;

inline void prefetch_ahead(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(static_cast<const char*>(p) + kAhead + i, _MM_HINT_T1);
}

c10::optional<at::Tensor> bias_as_f32(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return c10::nullopt;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [N]");
  return bias->to(at::kFloat).contiguous();
}

// Eight codes (int32 lanes, < 2^8) -> q - z, fp32, exact: a code's bits under 2^23's exponent are the float
// 2^23 + q, and z arrives as 2^23 + z (`offset_zero`), so one subtraction replaces an integer subtract and a
// conversion.
inline __m256 centred(__m256i codes, __m256 z) {
  return _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(codes, _mm256_set1_epi32(0x4B000000))), z);
}

inline __m256 offset_zero(int16_t z) { return _mm256_set1_ps(8388608.0f + static_cast<float>(z)); }

// Independent sums per row, so that consecutive FMAs do not wait on each other (4-cycle latency): rows already
// give M chains, and 16 ymm registers hold at most ~12 accumulators.
template <int M>
constexpr int kChains = M == 1 ? 4 : M == 2 ? 2 : 1;

template <int M>
inline void accumulate(__m256 w, const float* x, int64_t Kp, int chain, __m256 (&acc)[kMaxRows][4]) {
  for (int m = 0; m < M; ++m) acc[m][chain] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * Kp), acc[m][chain]);
}

// One group's sums (q - z) . x, scaled once into the row's accumulators: acc += group * s.
template <int M>
inline void flush(__m256 (&group)[kMaxRows][4], float s, __m256 (&acc)[kMaxRows]) {
  const __m256 sv = _mm256_set1_ps(s);
  for (int m = 0; m < M; ++m) {
    __m256 sum = group[m][0];
    for (int k = 1; k < kChains<M>; ++k) sum = _mm256_add_ps(sum, group[m][k]);
    acc[m] = _mm256_fmadd_ps(sum, sv, acc[m]);
    for (int k = 0; k < kChains<M>; ++k) group[m][k] = _mm256_setzero_ps();
  }
}

// Eight codes of a load: int8 (one byte each), or the low / high nibbles of eight int4 / int6 bytes (int6: with
// their top two bits, from the chunk's high bytes).
template <int BITS>
struct Codes {
  static constexpr int64_t kChunk = BITS == 8 ? 64 : 128;                    // weights per chunk
  static constexpr int64_t kBytes = BITS == 8 ? 64 : BITS == 6 ? 96 : 64;    // bytes per chunk
  static constexpr int kParts = BITS == 8 ? 1 : 2;                           // code vectors per load
  static inline void load(const uint8_t* chunk, int j, __m256i (&out)[2]) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(chunk + 8 * j));
    if (BITS == 8) {
      out[0] = _mm256_cvtepu8_epi32(bytes);
      return;
    }
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
    if (BITS == 6) {  // nibble bytes 0-31 use bits 0-3 of their high byte (i % 32), bytes 32-63 bits 4-7
      const __m128i top = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(chunk + 64 + (8 * j) % 32));
      const __m128i low2 = _mm_set1_epi8(0x03);
      const int shift = j < 4 ? 0 : 4;
      lo = _mm_or_si128(lo, _mm_slli_epi16(_mm_and_si128(_mm_srl_epi16(top, _mm_cvtsi32_si128(shift)), low2), 4));
      hi = _mm_or_si128(hi, _mm_slli_epi16(_mm_and_si128(_mm_srl_epi16(top, _mm_cvtsi32_si128(shift + 2)), low2), 4));
    }
    out[0] = _mm256_cvtepu8_epi32(lo);
    out[1] = _mm256_cvtepu8_epi32(hi);
  }
};

// One output row. Loads are eight bytes, j = 0..7 per chunk, each in one group (GC groups per chunk, 8 / GC
// loads each): int8 byte b is lane b / 4 of vector b % 4 (pack_int8), so load j holds lanes 2j and 2j + 1, group
// j / (8 / GC); int4 byte 16L + 8h + i holds lane 8L + i of vectors h (low nibble) and 2 + h (high), so load j
// is L = j / 2, group j / (8 / GC) too. xk holds, per chunk, the activations in load order (int4 / int6: the low
// nibbles' 64, then the high nibbles').
template <int BITS, int M, int GC>
void row(const Args& a, int64_t n) {
  using C = Codes<BITS>;
  const uint8_t* q = a.q + n * a.row_bytes;
  const float* s = a.scales + n * a.G;
  const int16_t* z = a.zeros + n * a.G;
  __m256 acc[kMaxRows], group[kMaxRows][4];
  for (int m = 0; m < M; ++m) {
    acc[m] = _mm256_setzero_ps();
    for (int k = 0; k < kChains<M>; ++k) group[m][k] = _mm256_setzero_ps();
  }
  // Loads j0..j1-1 of chunk c, each group's codes centred on zv, into the group sums.
  const auto products = [&](int64_t c, int j0, int j1, __m256 zv) {
    const uint8_t* chunk = q + c * C::kBytes;
    const float* x = a.x + c * C::kChunk;
#pragma GCC unroll 8
    for (int j = j0; j < j1; ++j) {  // unrolled: each chain index is a constant
      __m256i codes[2];
      C::load(chunk, j, codes);
      accumulate<M>(centred(codes[0], zv), x + 8 * j, a.Kp, (C::kParts * j) % kChains<M>, group);
      if (C::kParts == 2) accumulate<M>(centred(codes[1], zv), x + 64 + 8 * j, a.Kp, (2 * j + 1) % kChains<M>, group);
    }
  };
  if constexpr (GC == 1) {  // groups of whole chunks: the group loop outside (a counter per chunk was slower)
    const int64_t chunks_per_group = a.group / C::kChunk;
    for (int64_t g = 0, c = 0; g < a.G; ++g) {
      const __m256 zv = offset_zero(z[g]);
      for (const int64_t end = c + chunks_per_group; c < end; ++c) {
        prefetch_ahead(q + c * C::kBytes, C::kBytes);
        products(c, 0, 8, zv);
      }
      flush<M>(group, s[g], acc);
    }
  } else {  // GC groups per chunk, 8 / GC loads each
    for (int64_t c = 0; c < a.Kp / C::kChunk; ++c) {
      prefetch_ahead(q + c * C::kBytes, C::kBytes);
#pragma GCC unroll 4
      for (int gi = 0; gi < GC; ++gi) {
        products(c, gi * (8 / GC), (gi + 1) * (8 / GC), offset_zero(z[c * GC + gi]));
        flush<M>(group, s[c * GC + gi], acc);
      }
    }
  }
  for (int m = 0; m < M; ++m) a.out[m * a.N + n] = hsum(acc[m]) + (a.bias ? a.bias[n] : 0.0f);
}

// For every weight row n (or pair of rows, linear_bf16's; split over the threads) and each block of up to kMaxRows
// of the M activation rows: fn(std::integral_constant<int, rows>, n, m0). A prompt's rows go through the kernels 4
// at a time, per weight row, while that row is in L1: the weight is streamed once whatever M.
template <typename Fn>
void over_rows(int64_t N, int64_t M, Fn fn) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        switch (std::min<int64_t>(M - m0, kMaxRows)) {
          case 1: fn(std::integral_constant<int, 1>{}, n, m0); break;
          case 2: fn(std::integral_constant<int, 2>{}, n, m0); break;
          case 3: fn(std::integral_constant<int, 3>{}, n, m0); break;
          default: fn(std::integral_constant<int, 4>{}, n, m0); break;
        }
      }
  });
}

template <int BITS, int GC>
void run(const Args& a, int64_t M) {
  over_rows(a.N, M, [&](auto rows, int64_t n, int64_t m0) {
    Args b = a;
    b.x += m0 * a.Kp;
    b.out += m0 * a.N;
    row<BITS, decltype(rows)::value, GC>(b, n);
  });
}

// fn(std::integral_constant<int, GC>) for the groups per chunk, 1, 2 or 4, as a compile-time constant.
template <typename Fn>
void with_groups(int GC, Fn fn) {
  if (GC == 1) fn(std::integral_constant<int, 1>{});
  else if (GC == 2) fn(std::integral_constant<int, 2>{});
  else fn(std::integral_constant<int, 4>{});
}

template <int BITS>
void run_groups(const Args& a, int GC, int64_t M) {
  with_groups(GC, [&](auto gc) { run<BITS, decltype(gc)::value>(a, M); });
}

void run_bits(const Args& a, int bits, int GC, int64_t M) {
  if (bits == 8) run_groups<8>(a, GC, M);
  else if (bits == 6) run_groups<6>(a, GC, M);
  else run_groups<4>(a, GC, M);
}

// One row [K] -> dst [Kp] in load order: position p of chunk c is logical element c + order[p], zero past K.
template <typename T>
void to_load_order(const T* src, int64_t K, int64_t Kp, const int64_t* order, int64_t chunk, T* dst) {
  for (int64_t c = 0; c < Kp; c += chunk)
    for (int64_t p = 0; p < chunk; ++p) {
      const int64_t k = c + order[p];
      dst[c + p] = k < K ? src[k] : T(0);
    }
}

// x [M, K] (f32 or bf16) -> the kernel's activations [M, Kp] f32, each row in load order.
at::Tensor activations_in_load_order(const at::Tensor& x, const at::Tensor& order, int64_t Kp) {
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor xk = at::empty({M, Kp}, xf.options());
  for (int64_t m = 0; m < M; ++m)
    to_load_order(xf.data_ptr<float>() + m * K, K, Kp, order.data_ptr<int64_t>(), order.size(0),
                  xk.data_ptr<float>() + m * Kp);
  return xk;
}

// ------------------------------------------------------------------------------------------------
// Integer path for bf16 activations and int4/int6 codes. The fp32 path above spends about six instructions on
// every eight codes (widen, offset, subtract, FMA) and is compute-bound on int4: ~6 GB/s of codes on two Zen 3
// cores, where the memory gives ~20. Here each activation row is written as a fixed-point integer xi = x * 2^S
// (S per row, |xi| <= 2^22) in three signed base-256 digits ("planes", int8), and vpmaddubsw multiplies 32 codes
// (the unsigned operand, as stored) by 32 digits at once; a pair of products is at most 2 * 63 * 128, so the
// 16-bit sums of two instructions cannot saturate. A bf16 element within 2^14 of its row's largest is represented
// exactly, a smaller one is rounded at 2^-22 of that largest, below the rounding of the bf16 output. Per group
// the plane sums are exact int32s, combined in fp32 as 2^16 t2 + 2^8 t1 + t0 and scaled by s; the zero points
// come off once per output, as s * z * (the group's sum of xi), and 2^-S undoes the fixed point.
// int8 stays on the exact fp32 path: its codes need 7-bit digits (2 * 255 * 64 < 2^15) and, streamed from
// memory, that ran no faster than the fp32 path at one row and slower at four (bench_kernels.py avx2_int8*).

struct IntArgs {
  const int8_t* planes;   // [M, 3, Kp]: digit p of xi, load order
  const float* xsums;     // [M, G]: each group's sum of xi
  const float* unscale;   // [M]: 2^-S
  const uint8_t* q;       // [N, row_bytes]
  const float* scales;    // [N, G]
  const int16_t* zeros;   // [N, G]
  const float* bias;      // [N] or nullptr
  float* out;             // [M, N], or nullptr and:
  at::BFloat16* out_bf16; // [M, N] (rounded here: a separate conversion cost ~10 us a call)
  int64_t N, Kp, G, group, row_bytes;
};

constexpr int kDigitBits = 8;

// Half t (32 bytes) of an int4/int6 chunk's codes as unsigned bytes: the low nibbles (lo, load positions
// 32t..) and high nibbles (hi, positions 64 + 32t..), int6 with their top two bits from the chunk's last 32
// bytes (bits 0-3 of byte i for nibble byte i < 32, bits 4-7 for nibble byte 32 + i).
template <int BITS>
inline void half_codes(const uint8_t* chunk, int t, __m256i& lo, __m256i& hi) {
  static_assert(BITS == 4 || BITS == 6, "nibble codes only");
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 * t));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  lo = _mm256_and_si256(bytes, low4);
  hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
  if (BITS == 6) {
    const __m256i top = _mm256_srl_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 64)),
                                         _mm_cvtsi32_si128(4 * t));
    const __m256i low2 = _mm256_set1_epi8(0x03);
    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(top, low2), 4));
    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(top, 2), low2), 4));
  }
}

// The three plane sums scaled by s (per lane: GC = 4 splits a half's lanes between two groups) into acc.
template <int M>
inline void flush_int(const __m256i (&t)[kMaxRows][3], __m256 sv, __m256 (&acc)[kMaxRows]) {
  constexpr float base = static_cast<float>(1 << kDigitBits);
  for (int m = 0; m < M; ++m) {
    const __m256 f = _mm256_fmadd_ps(
        _mm256_cvtepi32_ps(t[m][2]), _mm256_set1_ps(base * base),
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[m][1]), _mm256_set1_ps(base), _mm256_cvtepi32_ps(t[m][0])));
    acc[m] = _mm256_fmadd_ps(f, sv, acc[m]);
  }
}

// The zero points' part of a row's sum: over groups g of s_g z_g (the group's sum of xi), 8 groups per step. One
// group at a time it was a chain of dependent adds at the end of every row (16 groups for K = 2048), ~5% of an
// int4 row in a stand-alone copy of the loop.
inline float zero_terms(const float* s, const int16_t* z, const float* xs, int64_t G) {
  __m256 v = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m128i zi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(z + g));
    const __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(zi));
    v = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + g), zf), _mm256_loadu_ps(xs + g), v);
  }
  float total = hsum(v);
  for (; g < G; ++g) total += s[g] * static_cast<float>(z[g]) * xs[g];
  return total;
}

// Half h (32 bytes of codes, 64 weights) of a chunk against rows 0..M-1's digit planes: the 16-bit sums of its
// two vpmaddubsw per plane (2 * 2 * 63 * 128 < 2^15 for int6 too), one vpmaddwd each to int32, into t (assigned).
template <int BITS, int M>
inline void half_sums(const IntArgs& a, const uint8_t* chunk, int64_t c, int h, __m256i (&t)[kMaxRows][3]) {
  constexpr int64_t kChunk = 128;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i lo, hi;
  half_codes<BITS>(chunk, h, lo, hi);
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 3
    for (int p = 0; p < 3; ++p) {
      const int8_t* x = a.planes + (m * 3 + p) * a.Kp + c * kChunk + 32 * h;
      const __m256i s16 =
          _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                           _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64))));
      t[m][p] = _mm256_madd_epi16(s16, ones);
    }
}

// A whole chunk's plane sums into t (assigned). int4: its four 16-bit sums per plane fit (4 * 2 * 15 * 128 <
// 2^15), so they are added before the one widening vpmaddwd (which shares the multipliers with vpmaddubsw);
// int6 widens each half's.
template <int BITS, int M>
inline void chunk_sums(const IntArgs& a, const uint8_t* chunk, int64_t c, __m256i (&t)[kMaxRows][3]) {
  if constexpr (BITS == 4) {
    constexpr int64_t kChunk = 128;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i lo0, hi0, lo1, hi1;
    half_codes<BITS>(chunk, 0, lo0, hi0);
    half_codes<BITS>(chunk, 1, lo1, hi1);
    const auto at = [](const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 3
      for (int p = 0; p < 3; ++p) {
        const int8_t* x = a.planes + (m * 3 + p) * a.Kp + c * kChunk;
        const __m256i s16 = _mm256_add_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(lo0, at(x)), _mm256_maddubs_epi16(hi0, at(x + 64))),
            _mm256_add_epi16(_mm256_maddubs_epi16(lo1, at(x + 32)), _mm256_maddubs_epi16(hi1, at(x + 96))));
        t[m][p] = _mm256_madd_epi16(s16, ones);
      }
  } else {
    __m256i u[kMaxRows][3];
    half_sums<BITS, M>(a, chunk, c, 0, t);
    half_sums<BITS, M>(a, chunk, c, 1, u);
    for (int m = 0; m < M; ++m)
      for (int p = 0; p < 3; ++p) t[m][p] = _mm256_add_epi32(t[m][p], u[m][p]);
  }
}

template <int BITS, int M, int GC>
void int_row(const IntArgs& a, int64_t n) {
  constexpr int64_t kChunk = 128, kBytes = BITS == 6 ? 96 : 64;
  const uint8_t* q = a.q + n * a.row_bytes;
  const float* s = a.scales + n * a.G;
  __m256 acc[kMaxRows];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  __m256i t[kMaxRows][3];
  // One chunk per group (g128, the default) has a loop of its own: within the general one below GCC kept acc on
  // the stack, and the loop ran ~25% slower (the kernel is compute-bound on int4).
  if (GC == 1 && a.group == kChunk) {
    for (int64_t g = 0; g < a.G; ++g) {
      prefetch_ahead(q + g * kBytes, kBytes);
      chunk_sums<BITS, M>(a, q + g * kBytes, g, t);
      flush_int<M>(t, _mm256_set1_ps(s[g]), acc);
    }
  } else if constexpr (GC == 1) {  // groups of whole chunks: per group, its chunks' exact int32 sums, one flush
    const int64_t chunks_per_group = a.group / kChunk;
    for (int64_t g = 0, c = 0; g < a.G; ++g) {
      prefetch_ahead(q + c * kBytes, kBytes);
      chunk_sums<BITS, M>(a, q + c * kBytes, c, t);
      for (const int64_t end = ++c + chunks_per_group - 1; c < end; ++c) {  // the group's other chunks
        __m256i u[kMaxRows][3];
        prefetch_ahead(q + c * kBytes, kBytes);
        chunk_sums<BITS, M>(a, q + c * kBytes, c, u);
        for (int m = 0; m < M; ++m)
          for (int p = 0; p < 3; ++p) t[m][p] = _mm256_add_epi32(t[m][p], u[m][p]);
      }
      flush_int<M>(t, _mm256_set1_ps(s[g]), acc);
    }
  } else {  // groups of half or a quarter chunk: each half flushed with its scales (chunk c's first group is c * GC)
    for (int64_t c = 0; c < a.Kp / kChunk; ++c) {
      prefetch_ahead(q + c * kBytes, kBytes);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        half_sums<BITS, M>(a, q + c * kBytes, c, h, t);
        const int64_t g0 = c * GC;
        if (GC == 2) flush_int<M>(t, _mm256_set1_ps(s[g0 + h]), acc);
        if (GC == 4) flush_int<M>(t, _mm256_setr_m128(_mm_set1_ps(s[g0 + 2 * h]), _mm_set1_ps(s[g0 + 2 * h + 1])), acc);
      }
    }
  }
  const int16_t* z = a.zeros + n * a.G;
  for (int m = 0; m < M; ++m) {
    const float zx = zero_terms(s, z, a.xsums + m * a.G, a.G);
    const float y = (hsum(acc[m]) - zx) * a.unscale[m] + (a.bias ? a.bias[n] : 0.0f);
    if (a.out != nullptr) a.out[m * a.N + n] = y;
    else a.out_bf16[m * a.N + n] = at::BFloat16(y);  // round to nearest even, as Tensor.to does
  }
}

template <int BITS, int GC>
void run_int(const IntArgs& a, int64_t M) {
  over_rows(a.N, M, [&](auto rows, int64_t n, int64_t m0) {
    IntArgs b = a;
    b.planes += m0 * 3 * a.Kp;
    b.xsums += m0 * a.G;
    b.unscale += m0;
    if (b.out != nullptr) b.out += m0 * a.N;
    else b.out_bf16 += m0 * a.N;
    int_row<BITS, decltype(rows)::value, GC>(b, n);
  });
}

template <int BITS>
void run_int_groups(const IntArgs& a, int GC, int64_t M) {
  with_groups(GC, [&](auto gc) { run_int<BITS, decltype(gc)::value>(a, M); });
}

// Eight int32 lanes -> their low bytes, in order, into dst[0..7] for four vectors at once (dst: 32 bytes).
inline void store_bytes(int8_t* dst, __m256i v0, __m256i v1, __m256i v2, __m256i v3) {
  const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(v0, v1), _mm256_packs_epi32(v2, v3));  // exact: |v| < 128
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

// Signed base-2^B digits of 8 lanes (B = kDigitBits): v = d2 2^2B + d1 2^B + d0, each in [-2^(B-1), 2^(B-1)).
inline void digits(__m256i v, __m256i& d0, __m256i& d1, __m256i& d2) {
  constexpr int B = kDigitBits;
  d0 = _mm256_srai_epi32(_mm256_slli_epi32(v, 32 - B), 32 - B);
  const __m256i r = _mm256_srai_epi32(_mm256_sub_epi32(v, d0), B);
  d1 = _mm256_srai_epi32(_mm256_slli_epi32(r, 32 - B), 32 - B);
  d2 = _mm256_srai_epi32(_mm256_sub_epi32(r, d1), B);
}

// One bf16 row -> planes [3, Kp] in load order, each group's sum of xi, and 2^-S. False if the row is not finite
// (the caller then takes the fp32 path, which carries the NaN/inf through as the reference does).
bool prepare_int_row(const uint16_t* row, int64_t K, int64_t Kp, int64_t group, const int64_t* order,
                     int64_t chunk, std::vector<int32_t>& xi, int8_t* planes, float* xsums, float* unscale) {
  const auto widen = [](const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  };
  const auto value = [](uint16_t bits) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  };
  __m256 mx = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(widen(row + k), abs_mask));
  float amax = 0.0f;
  {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx);
    for (float v : lanes) amax = std::max(amax, v);  // max_ps drops a NaN lane: checked below on every element
    for (; k < K; ++k) amax = std::max(amax, std::fabs(value(row[k])));
  }
  if (!std::isfinite(amax)) return false;
  int e = 0;
  std::frexp(amax, &e);  // amax < 2^e
  const int S = std::clamp(3 * kDigitBits - 2 - e, -126, 126);
  *unscale = std::ldexp(1.0f, -S);
  const float mult = std::ldexp(1.0f, S);
  const __m256 mv = _mm256_set1_ps(mult);
  xi.resize(K);
  bool finite = true;
  for (int64_t g = 0, lo = 0; lo < Kp; ++g, lo += group) {
    const int64_t hi = std::min(lo + group, K);
    __m256i sum_lo = _mm256_setzero_si256(), sum_hi = _mm256_setzero_si256();
    int64_t j = lo, total = 0;
    for (; j + 8 <= hi; j += 8) {
      const __m256 v = widen(row + j);
      finite &= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) == 0;
      const __m256i iv = _mm256_cvtps_epi32(_mm256_mul_ps(v, mv));  // round to nearest even
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xi.data() + j), iv);
      sum_lo = _mm256_add_epi64(sum_lo, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(iv)));
      sum_hi = _mm256_add_epi64(sum_hi, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(iv, 1)));
    }
    for (; j < hi; ++j) {
      const float v = value(row[j]);
      finite &= !std::isnan(v);
      xi[j] = static_cast<int32_t>(std::nearbyint(v * mult));
      total += xi[j];
    }
    alignas(32) int64_t parts[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(parts), _mm256_add_epi64(sum_lo, sum_hi));
    xsums[g] = static_cast<float>(total + parts[0] + parts[1] + parts[2] + parts[3]);
  }
  if (!finite) return false;
  thread_local std::vector<int32_t> ordered;
  ordered.resize(Kp);
  to_load_order(xi.data(), K, Kp, order, chunk, ordered.data());
  for (int64_t j = 0; j < Kp; j += 32) {  // Kp is a multiple of the chunk (64 or 128)
    __m256i d[3][4];
    for (int v = 0; v < 4; ++v)
      digits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ordered.data() + j + 8 * v)), d[0][v], d[1][v], d[2][v]);
    for (int p = 0; p < 3; ++p) store_bytes(planes + p * Kp + j, d[p][0], d[p][1], d[p][2], d[p][3]);
  }
  return true;
}

// The integer path (bf16 x, int4/int6) into out (f32 or bf16 [M, N]); false where a row is not finite and nothing was written.
// Its buffers are kept per thread: a decode step makes ~100 of these calls with the same few sizes.
bool linear_int(const at::Tensor& x, const at::Tensor& order, const at::Tensor& q, const at::Tensor& scales,
                const at::Tensor& zeros, int64_t bits, int64_t group, int GC, const float* bias, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = scales.size(1), chunk = order.size(0);
  const int64_t Kp = G * group;
  const at::Tensor xc = x.contiguous();
  thread_local std::vector<int8_t> planes;
  thread_local std::vector<float> xsums, unscale;
  thread_local std::vector<int32_t> xi;
  planes.resize(M * 3 * Kp);
  xsums.resize(M * G);
  unscale.resize(M);
  const auto* src = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; ++m) {
    if (!prepare_int_row(src + m * K, K, Kp, group, order.data_ptr<int64_t>(), chunk, xi, planes.data() + m * 3 * Kp,
                         xsums.data() + m * G, unscale.data() + m))
      return false;
  }
  const IntArgs a{planes.data(), xsums.data(), unscale.data(), q.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                  zeros.data_ptr<int16_t>(), bias,
                  out.scalar_type() == at::kFloat ? out.data_ptr<float>() : nullptr,
                  out.scalar_type() == at::kFloat ? nullptr : out.data_ptr<at::BFloat16>(), N, Kp, G, group, q.size(1)};
  if (bits == 6) run_int_groups<6>(a, GC, M);
  else run_int_groups<4>(a, GC, M);
  return true;
}

// The quantized ops' arguments, checked (x [M >= 1, K] f32/bf16; q, scales, zeros, order as linear_quantized
// takes them): N, G, the padded K (Kp) and the groups per chunk (GC).
struct QuantizedShape {
  int64_t N, G, Kp;
  int GC;
};

QuantizedShape check_quantized(const at::Tensor& x, const at::Tensor& order, const at::Tensor& q,
                               const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "bits must be 4, 6 or 8");
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be f32 or bf16 [M, K]");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(), "q must be contiguous uint8 [N, bytes]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kShort && scales.is_contiguous() &&
                  zeros.is_contiguous(), "scales must be f32 and zeros int16, contiguous [N, G]");
  const int64_t chunk = bits == 8 ? 64 : 128, bytes = bits == 6 ? 96 : 64;
  const int64_t N = q.size(0), G = scales.size(1), Kp = q.size(1) / bytes * chunk;
  TORCH_CHECK(x.size(0) >= 1, "x has no rows");
  TORCH_CHECK(q.size(1) % bytes == 0 && x.size(1) <= Kp, "q does not match x's features");
  TORCH_CHECK(order.scalar_type() == at::kLong && order.dim() == 1 && order.size(0) == chunk, "order must be [chunk]");
  TORCH_CHECK(group > 0 && Kp % group == 0 && G == Kp / group && zeros.size(1) == G && scales.size(0) == N,
              "scales/zeros do not match the groups");
  const int GC = group % chunk == 0 ? 1 : static_cast<int>(chunk / group);
  TORCH_CHECK(GC == 1 || ((GC == 2 || GC == 4) && chunk % group == 0), "groups of 1/4, 1/2 or whole chunks only");
  return {N, G, Kp, GC};
}

at::Tensor linear_quantized(const at::Tensor& x, const at::Tensor& order, const at::Tensor& q,
                            const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t group,
                            const c10::optional<at::Tensor>& bias, bool fp32_out) {
  const QuantizedShape shape = check_quantized(x, order, q, scales, zeros, bits, group);
  const int64_t M = x.size(0), N = shape.N, G = shape.G, Kp = shape.Kp;
  const int GC = shape.GC;
  const c10::optional<at::Tensor> b = bias_as_f32(bias, N);
  if (x.scalar_type() == at::kBFloat16 && bits != 8) {
    at::Tensor out = at::empty({M, N}, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
    if (linear_int(x, order, q, scales, zeros, bits, group, GC, b.has_value() ? b->data_ptr<float>() : nullptr, out))
      return out;
  }
  const at::Tensor xk = activations_in_load_order(x, order, Kp);
  at::Tensor out = at::empty({M, N}, xk.options());
  const Args a{xk.data_ptr<float>(), q.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<int16_t>(),
               b.has_value() ? b->data_ptr<float>() : nullptr, out.data_ptr<float>(), N, Kp, G, group, q.size(1)};
  run_bits(a, bits, GC, M);
  return x.scalar_type() == at::kFloat || fp32_out ? out : out.to(x.scalar_type());
}

// total + sum over t in [from, K) of w[t] x[t], one element at a time: the dense loops' last K % 8 weights.
inline float dot_tail(const uint16_t* w, const float* x, int64_t from, int64_t K, float total) {
  for (int64_t t = from; t < K; ++t) {
    const uint32_t bits = static_cast<uint32_t>(w[t]) << 16;
    float wt;
    std::memcpy(&wt, &bits, sizeof wt);
    total += wt * x[t];
  }
  return total;
}

// Dense bf16 weights: a bf16 value is the top half of its fp32, so widening to 32 bits and shifting left by 16
// gives the weight exactly; products and sums in fp32, as reference.linear_reference defines them.
template <int M>
void dense_row(const float* x, const uint16_t* w, int64_t K, float* out, int64_t N, const float* bias, int64_t n) {
  constexpr int A = kChains<M>;
  __m256 acc[kMaxRows][4];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < A; ++c) acc[m][c] = _mm256_setzero_ps();
  const uint16_t* row = w + n * K;
  const auto step = [&](int64_t k, int c) {  // c must be a constant after unrolling: acc stays in registers
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
    const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    for (int m = 0; m < M; ++m) acc[m][c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m][c]);
  };
  int64_t k = 0;
  for (; k + 8 * A <= K; k += 8 * A) {
    if (k % 32 == 0) prefetch_ahead(row + k, 64);  // 32 weights: one cache line
#pragma GCC unroll 4
    for (int c = 0; c < A; ++c) step(k + 8 * c, c);
  }
  for (; k + 8 <= K; k += 8) step(k, 0);
  for (int m = 0; m < M; ++m) {
    __m256 sum = acc[m][0];
    for (int c = 1; c < A; ++c) sum = _mm256_add_ps(sum, acc[m][c]);
    out[m * N + n] = dot_tail(row, x + m * K, k, K, hsum(sum)) + (bias ? bias[n] : 0.0f);
  }
}

// Two weight rows n, n + 1 against M activation rows (a prompt's): each step's M activation loads feed 2M
// independent FMA chains, twice dense_row's work per load, which is what bounds it from 4 rows on.
template <int M>
void dense_pair(const float* x, const uint16_t* w, int64_t K, float* out, int64_t N, const float* bias, int64_t n) {
  __m256 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const uint16_t* rows[2] = {w + n * K, w + (n + 1) * K};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (k % 32 == 0) {
      prefetch_ahead(rows[0] + k, 64);
      prefetch_ahead(rows[1] + k, 64);
    }
    __m256 wv[2];
    for (int r = 0; r < 2; ++r) {
      const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + k));
      wv[r] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    }
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      acc[m][0] = _mm256_fmadd_ps(wv[0], xv, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(wv[1], xv, acc[m][1]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 2; ++r)
      out[m * N + n + r] = dot_tail(rows[r], x + m * K, k, K, hsum(acc[m][r])) + (bias ? bias[n + r] : 0.0f);
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be f32 or bf16 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "w must be contiguous bf16 [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && w.size(1) == K, "x must have rows of w's K features");
  const c10::optional<at::Tensor> b = bias_as_f32(bias, N);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  if (M == 1) {  // decoding: one weight row at a time, four FMA chains (memory-bound)
    over_rows(N, 1, [&](auto, int64_t n, int64_t) { dense_row<1>(xp, wp, K, op, N, bp, n); });
  } else {  // pairs of weight rows, 4 activation rows at a time while the pair is in L1; an odd last row alone
    over_rows((N + 1) / 2, M, [&](auto rows, int64_t pair, int64_t m0) {
      constexpr int R = decltype(rows)::value;
      const int64_t n = 2 * pair;
      if (n + 1 < N) {
        dense_pair<R>(xp + m0 * K, wp, K, op + m0 * N, N, bp, n);
      } else {
        dense_row<R>(xp + m0 * K, wp, K, op + m0 * N, N, bp, n);
      }
    });
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// ------------------------------------------------------------------------------------------------
// Dequantization for many rows (a prompt): linear_quantized's rows stop at 4, and above that cpu.py multiplies a
// dequantized copy with torch's GEMM. Without this, that copy was made in PyTorch (~150 ms for one 5504 x 2048
// weight), and a 16-token int4 prompt ran at 1 token/s.
//
// out [N, K] (f32 or bf16) = (q - z) * s in fp32, one rounding to out's dtype: reference.dequantize_codes.

// Chunk c's codes in load order (as the linear kernels pair them with activations) into codes[chunk].
template <int BITS>
inline void chunk_codes(const uint8_t* chunk, uint8_t* codes) {
  if constexpr (BITS == 8) {
    std::memcpy(codes, chunk, 64);
  } else {
    for (int h = 0; h < 2; ++h) {
      __m256i lo, hi;
      half_codes<BITS>(chunk, h, lo, hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 32 * h), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 64 + 32 * h), hi);
    }
  }
}

template <typename T>
inline void put(T* out, float v) {
  if constexpr (std::is_same_v<T, float>) *out = v;
  else *out = at::BFloat16(v);  // round to nearest even, as Tensor.to does
}

// One row: per chunk its codes in load order, then the chunk's weights in natural order (source position
// from_load[e]) group by group, so the stores run front to back.
template <int BITS, typename T>
void dequantize_row(const uint8_t* q, const float* s, const int16_t* z, const int64_t* from_load, int64_t K,
                    int64_t Kp, int64_t group, T* out) {
  constexpr int64_t kChunk = BITS == 8 ? 64 : 128, kBytes = BITS == 6 ? 96 : 64;
  alignas(32) uint8_t codes[kChunk];
  for (int64_t c = 0; c < Kp && c < K; c += kChunk) {
    chunk_codes<BITS>(q + c / kChunk * kBytes, codes);
    for (int64_t lo = c; lo < c + kChunk && lo < K;) {  // one group (or the part of it in this chunk) at a time
      const int64_t g = lo / group, hi = std::min({(g + 1) * group, c + kChunk, K});
      const float sv = s[g], zv = static_cast<float>(z[g]);
      for (int64_t k = lo; k < hi; ++k) put(out + k, (static_cast<float>(codes[from_load[k - c]]) - zv) * sv);
      lo = hi;
    }
  }
}

at::Tensor dequantize_out(const at::Tensor& order, const at::Tensor& q, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t bits, int64_t group, int64_t K, at::Tensor out) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "bits must be 4, 6 or 8");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(), "q must be contiguous uint8 [N, bytes]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kShort && scales.is_contiguous() &&
                  zeros.is_contiguous(), "scales must be f32 and zeros int16, contiguous [N, G]");
  const int64_t chunk = bits == 8 ? 64 : 128, bytes = bits == 6 ? 96 : 64;
  const int64_t N = q.size(0), G = scales.size(1), Kp = q.size(1) / bytes * chunk;
  TORCH_CHECK(q.size(1) % bytes == 0 && K <= Kp && group > 0 && G * group == Kp && zeros.size(1) == G &&
                  scales.size(0) == N, "q/scales/zeros do not match K and the groups");
  TORCH_CHECK(order.scalar_type() == at::kLong && order.dim() == 1 && order.size(0) == chunk, "order must be [chunk]");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == N && out.size(1) == K && out.is_contiguous() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out must be contiguous f32 or bf16 [N, K]");
  std::vector<int64_t> from_load(chunk);  // natural position e of a chunk -> its load position
  const int64_t* idx = order.data_ptr<int64_t>();
  for (int64_t p = 0; p < chunk; ++p) from_load[idx[p]] = p;
  const auto* qp = q.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const int16_t* zp = zeros.data_ptr<int16_t>();
  const int64_t row_bytes = q.size(1);
  const bool f32 = out.scalar_type() == at::kFloat;
  float* of = f32 ? out.data_ptr<float>() : nullptr;
  at::BFloat16* ob = f32 ? nullptr : out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* qr = qp + n * row_bytes;
      const float* s = sp + n * G;
      const int16_t* z = zp + n * G;
      if (bits == 8) f32 ? dequantize_row<8>(qr, s, z, from_load.data(), K, Kp, group, of + n * K)
                         : dequantize_row<8>(qr, s, z, from_load.data(), K, Kp, group, ob + n * K);
      else if (bits == 6) f32 ? dequantize_row<6>(qr, s, z, from_load.data(), K, Kp, group, of + n * K)
                              : dequantize_row<6>(qr, s, z, from_load.data(), K, Kp, group, ob + n * K);
      else f32 ? dequantize_row<4>(qr, s, z, from_load.data(), K, Kp, group, of + n * K)
               : dequantize_row<4>(qr, s, z, from_load.data(), K, Kp, group, ob + n * K);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// A prompt's rows: a blocked fp32 GEMM. The row kernels above re-read (and for quantized weights re-decode) a
// weight row for every 4 activation rows, and torch's fp32 GEMM needs the whole weight made dense in memory
// first; both ran at 25-40% of these cores' FMA peak. Here each thread takes panels of kPanelRows weight rows; a
// panel is made dense in fp32 (dequantized or widened: `fill`) kBlockK weights at a time into a buffer that
// stays in cache, and every activation row is multiplied against it there, in register tiles of 4 activation
// rows by 3 weight rows (12 accumulators of 8 lanes: each step's 7 loads feed 12 FMAs). The weight values are
// dequantize_out's ((q - z) * s in fp32; bf16 widened exactly), products and sums in fp32: the reference's
// x @ W.T up to the order of the sums, which depends on neither M nor a row's place in the tile (each output's
// lanes and blocks are summed in one fixed order), so a row's result is the same in any batch.
// Both operands are stored tile by tile, 8 weights of each row in turn ([K / 8][rows][8]: `Tiled`), so that a
// tile reads two streams front to back; 7 row streams (4 activation rows, 3 weight rows) ran 4-12% slower.

constexpr int64_t kPanelRows = 24, kBlockK = 1024, kPassRows = 256;
constexpr int kTileM = 4, kTileN = 3;

// Four vectors' lane sums, in one fixed order per vector: ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)).
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Rows r0.. (a tile of `rows`) of a [rows_total, K] operand stored as tiles of `tile` rows, each [K / 8][rows
// in the tile][8]: where the 8 values from (r, k) on (k a multiple of 8) go.
struct Tiled {
  float* base;
  int64_t K, rows_total, tile;
  float* at(int64_t r, int64_t k) const {
    const int64_t t = r / tile, in_tile = std::min(tile, rows_total - t * tile);
    return base + t * tile * K + k * in_tile + (r - t * tile) * 8;
  }
};

// acc[MR, NR] (=, first block; else +=) the products of a tile of MR activation rows (x: [kc / 8][MR][8]) and
// one of NR weight rows (w: [kc / 8][NR][8]) over kc weights (a multiple of 8).
template <int MR, int NR>
void gemm_tile(const float* x, const float* w, int64_t kc, float* acc, int64_t ldc, bool first) {
  __m256 t[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) t[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + k * NR + 8 * j);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + k * MR + 8 * m);
      for (int j = 0; j < NR; ++j) t[m][j] = _mm256_fmadd_ps(xv, wv[j], t[m][j]);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  for (int m = 0; m < MR; ++m) {
    alignas(16) float sums[4];
    _mm_store_ps(sums, hsum4(t[m][0], NR > 1 ? t[m][1] : zero, NR > 2 ? t[m][2] : zero, zero));
    for (int j = 0; j < NR; ++j) acc[m * ldc + j] = first ? sums[j] : acc[m * ldc + j] + sums[j];
  }
}

using TileFn = void (*)(const float*, const float*, int64_t, float*, int64_t, bool);
constexpr TileFn kTiles[kTileM][kTileN] = {
    {gemm_tile<1, 1>, gemm_tile<1, 2>, gemm_tile<1, 3>}, {gemm_tile<2, 1>, gemm_tile<2, 2>, gemm_tile<2, 3>},
    {gemm_tile<3, 1>, gemm_tile<3, 2>, gemm_tile<3, 3>}, {gemm_tile<4, 1>, gemm_tile<4, 2>, gemm_tile<4, 3>}};

// out [M, N] (f32 or bf16) = x [M, Kp] (fp32, tiles of kTileM rows: `Tiled`; zero past the weight's K) @ W.T +
// bias. A panel is kPanelRows weight rows n0.., made dense kBlockK weights at a time by panel.fill(n0, rows, k0,
// kc, Tiled{buffer, kc, rows, kTileN}, ahead) (zero past K), which prefetches the same weights of the next
// `ahead` rows (the next panel's) as it reads these.
template <typename Panel>
void gemm(const float* x, int64_t M, int64_t N, int64_t Kp, const Panel& panel, const float* bias, float* out,
          at::BFloat16* out_bf16) {
  constexpr int64_t rows_max = kPanelRows;
  const int64_t panels = (N + rows_max - 1) / rows_max;
  for (int64_t r0 = 0; r0 < M; r0 += kPassRows) {  // passes of rows whose activations stay in cache
    const int64_t rows = std::min(kPassRows, M - r0);
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      thread_local std::vector<float> w, acc;
      w.resize(rows_max * kBlockK);
      acc.resize(kPassRows * rows_max);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * rows_max, np = std::min(rows_max, N - n0);
        for (int64_t k0 = 0; k0 < Kp; k0 += kBlockK) {
          const int64_t kc = std::min(kBlockK, Kp - k0);
          // The next panel's rows are prefetched as this one's are read, byte for byte: the weight streams at
          // the memory's pace, where reading it only here, panel by panel, left the fill waiting on each load.
          panel.fill(n0, np, k0, kc, Tiled{w.data(), kc, np, kTileN}, p + 1 < p1 ? std::min(np, N - n0 - np) : 0);
          for (int64_t m = 0; m < rows; m += kTileM) {
            const int64_t mr = std::min<int64_t>(kTileM, rows - m);
            const float* xm = x + (r0 + m) * Kp + k0 * mr;
            for (int64_t j = 0; j < np; j += kTileN) {
              const int64_t nr = std::min<int64_t>(kTileN, np - j);
              kTiles[mr - 1][nr - 1](xm, w.data() + j * kc, kc, acc.data() + m * rows_max + j, rows_max, k0 == 0);
            }
          }
        }
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t j = 0; j < np; ++j) {
            const float y = acc[m * rows_max + j] + (bias ? bias[n0 + j] : 0.0f);
            const int64_t i = (r0 + m) * N + n0 + j;
            if (out != nullptr) out[i] = y;
            else out_bf16[i] = at::BFloat16(y);  // round to nearest even, as Tensor.to does
          }
      }
    });
  }
}

// Panels of a quantized weight, in load order: (q - z) * s in fp32 per code, dequantize_out's values.
template <int BITS>
struct QuantizedPanel {
  static constexpr int64_t kChunk = BITS == 8 ? 64 : 128, kBytes = BITS == 6 ? 96 : 64;
  const uint8_t* q;
  const float* scales;
  const int16_t* zeros;
  int64_t row_bytes, G, group, GC;

  void fill(int64_t n0, int64_t rows, int64_t k0, int64_t kc, const Tiled& w, int64_t ahead) const {
    if (GC == 1) fill_groups<1>(n0, rows, k0, kc, w, ahead);
    else if (GC == 2) fill_groups<2>(n0, rows, k0, kc, w, ahead);
    else fill_groups<4>(n0, rows, k0, kc, w, ahead);
  }

  // GC groups per chunk (1: a group is whole chunks), as a constant: per chunk, its one scale and zero go in
  // registers; looked up per load (as `row` pairs them), they cost as much as the dequantization itself.
  template <int GCT>
  void fill_groups(int64_t n0, int64_t rows, int64_t k0, int64_t kc, const Tiled& w, int64_t ahead) const {
    alignas(32) uint8_t codes[kChunk];
    const int64_t chunks_per_group = GCT == 1 ? group / kChunk : 1;
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* qr = q + (n0 + r) * row_bytes;
      const float* s = scales + (n0 + r) * G;
      const int16_t* z = zeros + (n0 + r) * G;
      const uint8_t* next = r < ahead ? qr + rows * row_bytes : nullptr;  // row r of the next panel
      const int64_t step = 8 * std::min(w.tile, w.rows_total - r / w.tile * w.tile);  // floats per 8 weights
      const int64_t c0 = k0 / kChunk;
      int64_t g = GCT == 1 ? c0 / chunks_per_group : 0, in_group = GCT == 1 ? c0 % chunks_per_group : 0;
      for (int64_t c = c0; c < (k0 + kc) / kChunk; ++c) {
        if (next != nullptr)
          for (int64_t b = 0; b < kBytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(next + c * kBytes + b), _MM_HINT_T1);
        chunk_codes<BITS>(qr + c * kBytes, codes);
        float* o = w.at(r, c * kChunk - k0);
        if constexpr (GCT == 1) {
          const __m256 zv = offset_zero(z[g]), sv = _mm256_set1_ps(s[g]);
#pragma GCC unroll 16
          for (int v = 0; v < kChunk / 8; ++v) {
            const __m256i ci = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * v)));
            _mm256_storeu_ps(o + step * v, _mm256_mul_ps(centred(ci, zv), sv));
          }
          if (++in_group == chunks_per_group) ++g, in_group = 0;
        } else {  // load j (and, int4/int6, load 8 + j) is in the chunk's group j / (8 / GC), as `row` pairs them
          __m256 zv[GCT], sv[GCT];
          for (int i = 0; i < GCT; ++i) zv[i] = offset_zero(z[c * GCT + i]), sv[i] = _mm256_set1_ps(s[c * GCT + i]);
#pragma GCC unroll 16
          for (int v = 0; v < kChunk / 8; ++v) {
            const int i = (v % 8) / (8 / GCT);
            const __m256i ci = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * v)));
            _mm256_storeu_ps(o + step * v, _mm256_mul_ps(centred(ci, zv[i]), sv[i]));
          }
        }
      }
    }
  }
};

// Panels of a bf16 weight [N, K], widened exactly; zero from K to the next multiple of 8.
struct Bf16Panel {
  const uint16_t* w;
  int64_t K;

  void fill(int64_t n0, int64_t rows, int64_t k0, int64_t kc, const Tiled& out, int64_t ahead) const {
    const auto widen = [](const uint16_t* p) {
      const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    };
    for (int64_t r = 0; r < rows; ++r) {
      const uint16_t* row = w + (n0 + r) * K + k0;
      float* o = out.at(r, 0);
      const int64_t step = 8 * std::min(out.tile, out.rows_total - r / out.tile * out.tile);  // floats per 8 weights
      const int64_t end = std::min(kc, K - k0);
      int64_t k = 0;
      for (; k + 32 <= end; k += 32) {  // a cache line of weights
        if (r < ahead) _mm_prefetch(reinterpret_cast<const char*>(row + rows * K + k), _MM_HINT_T1);
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) _mm256_storeu_ps(o + step * (k / 8 + v), widen(row + k + 8 * v));
      }
      for (; k + 8 <= end; k += 8) _mm256_storeu_ps(o + step * (k / 8), widen(row + k));
      for (; k < kc; ++k) {
        const uint32_t bits = k < end ? static_cast<uint32_t>(row[k]) << 16 : 0u;
        std::memcpy(o + step * (k / 8) + k % 8, &bits, sizeof bits);
      }
    }
  }
};

// x [M, K] (f32 or bf16) -> fp32 [M, Kp] in tiles of kTileM rows (`Tiled`), each row in load order (`order`, per
// chunk) or, with no order, as is; zero from K on.
at::Tensor gemm_activations(const at::Tensor& x, const c10::optional<at::Tensor>& order, int64_t Kp) {
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor xk = at::empty({M, Kp}, xf.options());
  const Tiled tiles{xk.data_ptr<float>(), Kp, M, kTileM};
  std::vector<float> row(Kp);
  for (int64_t m = 0; m < M; ++m) {
    const float* src = xf.data_ptr<float>() + m * K;
    if (order.has_value()) {
      to_load_order(src, K, Kp, order->data_ptr<int64_t>(), order->size(0), row.data());
    } else {
      std::memcpy(row.data(), src, K * sizeof(float));
      std::fill(row.begin() + K, row.end(), 0.0f);
    }
    for (int64_t k = 0; k < Kp; k += 8) std::memcpy(tiles.at(m, k), row.data() + k, 8 * sizeof(float));
  }
  return xk;
}

at::Tensor gemm_out(const at::Tensor& x, int64_t N) {
  return at::empty({x.size(0), N}, x.options().dtype(x.scalar_type() == at::kFloat ? at::kFloat : at::kBFloat16));
}

template <typename Panel>
void run_gemm(const at::Tensor& xk, int64_t Kp, const Panel& panel, const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  const bool f32 = out.scalar_type() == at::kFloat;
  gemm(xk.data_ptr<float>(), xk.size(0), out.size(1), Kp, panel, bias.has_value() ? bias->data_ptr<float>() : nullptr,
       f32 ? out.data_ptr<float>() : nullptr, f32 ? nullptr : out.data_ptr<at::BFloat16>());
}

// linear_quantized's product for many rows (same arguments, same results up to the order of the sums): the
// blocked GEMM above over the dequantized weight.
at::Tensor gemm_quantized(const at::Tensor& x, const at::Tensor& order, const at::Tensor& q, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t bits, int64_t group, const c10::optional<at::Tensor>& bias) {
  const QuantizedShape shape = check_quantized(x, order, q, scales, zeros, bits, group);
  const int64_t N = shape.N, G = shape.G, Kp = shape.Kp, GC = shape.GC;
  const c10::optional<at::Tensor> b = bias_as_f32(bias, N);
  const at::Tensor xk = gemm_activations(x, order, Kp);
  at::Tensor out = gemm_out(x, N);
  const auto run = [&](auto panel) { run_gemm(xk, Kp, panel, b, out); };
  const auto* qp = q.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const int16_t* zp = zeros.data_ptr<int16_t>();
  if (bits == 8) run(QuantizedPanel<8>{qp, sp, zp, q.size(1), G, group, GC});
  else if (bits == 6) run(QuantizedPanel<6>{qp, sp, zp, q.size(1), G, group, GC});
  else run(QuantizedPanel<4>{qp, sp, zp, q.size(1), G, group, GC});
  return out;
}

// linear_bf16's product for many rows (same arguments, same results up to the order of the sums).
at::Tensor gemm_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be f32 or bf16 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "w must be contiguous bf16 [N, K]");
  const int64_t K = x.size(1), N = w.size(0), Kp = (K + 7) / 8 * 8;
  TORCH_CHECK(w.size(1) == K, "x must have rows of w's K features");
  const c10::optional<at::Tensor> b = bias_as_f32(bias, N);
  const at::Tensor xk = gemm_activations(x, c10::nullopt, Kp);
  at::Tensor out = gemm_out(x, N);
  run_gemm(xk, Kp, Bf16Panel{reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), K}, b, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(qwenlm_avx2, m) {
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("dequantize_out(Tensor order, Tensor q, Tensor scales, Tensor zeros, int bits, int group, int K, "
        "Tensor(a!) out) -> Tensor(a!)");
  m.def("linear_quantized(Tensor x, Tensor order, Tensor q, Tensor scales, Tensor zeros, int bits, int group, "
        "Tensor? bias, bool fp32_out=False) -> Tensor");
  m.def("gemm_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("gemm_quantized(Tensor x, Tensor order, Tensor q, Tensor scales, Tensor zeros, int bits, int group, "
        "Tensor? bias) -> Tensor");
  define_layer_ops(m);  // the per-token layer ops (cpu_layer_ops_torch.h over cpu_layer_ops_avx2.h)
}

TORCH_LIBRARY_IMPL(qwenlm_avx2, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_quantized", &linear_quantized);
  m.impl("dequantize_out", &dequantize_out);
  m.impl("gemm_bf16", &gemm_bf16);
  m.impl("gemm_quantized", &gemm_quantized);
  impl_layer_ops(m);
}
