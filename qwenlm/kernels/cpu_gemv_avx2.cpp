// Matrix-vector products for CPUs with AVX2 + FMA but no AVX-512 BF16 (AMD Zen 2/3, most desktop Intel parts),
// where cpu_gemv.cpp cannot run: PyTorch would dequantize every quantized weight at every step, and its bf16
// matrix-vector product is slower. Two ops, torch.ops.qwenlm_avx2.*, each for 1-4 rows, returning x's dtype:
//
//   linear_bf16(x [M, K] f32/bf16, w [N, K] bf16, bias?) -> [M, N]: fp32 products and sums.
//   linear_quantized(x [M, K] f32/bf16, order, q, scales [N, G] f32, zeros [N, G] i16, bits, group, bias?)
//     -> [M, N]. q is the kernel layout of quant.py (pack_quantized). The activations are first copied, in fp32,
//     into the order the code bytes are stored in (`order`, per chunk: cpu.py's _avx2_order), so each row's bytes
//     are walked front to back. Each group's sum of (q - z) * x (q - z exact in fp32) is scaled by the group's s
//     once and added into fp32 accumulators: the reference's W = (q - z) * s, x @ W.T, up to the order of the
//     roundings.
//
// Rows of the weight are split over torch's intra-op threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

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
  const int64_t chunks = a.Kp / C::kChunk, chunks_per_group = GC == 1 ? a.group / C::kChunk : 1;
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* chunk = q + c * C::kBytes;
    const float* x = a.x + c * C::kChunk;
    const int64_t g0 = c * C::kChunk / a.group;  // the chunk's first group
#pragma GCC unroll 4
    for (int gi = 0; gi < GC; ++gi) {
      const __m256 zv = offset_zero(z[g0 + gi]);
#pragma GCC unroll 8
      for (int j = gi * (8 / GC); j < (gi + 1) * (8 / GC); ++j) {  // unrolled: each chain index is a constant
        __m256i codes[2];
        C::load(chunk, j, codes);
        accumulate<M>(centred(codes[0], zv), x + 8 * j, a.Kp, (C::kParts * j) % kChains<M>, group);
        if (C::kParts == 2) accumulate<M>(centred(codes[1], zv), x + 64 + 8 * j, a.Kp, (2 * j + 1) % kChains<M>, group);
      }
      if (GC > 1 || (c + 1) % chunks_per_group == 0) flush<M>(group, s[g0 + gi], acc);
    }
  }
  for (int m = 0; m < M; ++m) a.out[m * a.N + n] = hsum(acc[m]) + (a.bias ? a.bias[n] : 0.0f);
}

template <int BITS, int M, int GC>
void run(const Args& a) {
  at::parallel_for(0, a.N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) row<BITS, M, GC>(a, n);
  });
}

template <int BITS, int M>
void run_groups(const Args& a, int GC) {
  if (GC == 1) run<BITS, M, 1>(a);
  else if (GC == 2) run<BITS, M, 2>(a);
  else run<BITS, M, 4>(a);
}

template <int M>
void run_bits(const Args& a, int bits, int GC) {
  if (bits == 8) run_groups<8, M>(a, GC);
  else if (bits == 6) run_groups<6, M>(a, GC);
  else run_groups<4, M>(a, GC);
}

// x [M, K] (f32 or bf16) -> the kernel's activations [M, Kp] f32: position p of chunk c is logical weight
// c * chunk + order[p], zero past K.
at::Tensor activations_in_load_order(const at::Tensor& x, const at::Tensor& order, int64_t Kp) {
  const int64_t M = x.size(0), K = x.size(1), chunk = order.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor xk = at::empty({M, Kp}, xf.options());
  const float* src = xf.data_ptr<float>();
  const int64_t* idx = order.data_ptr<int64_t>();
  float* dst = xk.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < Kp; c += chunk)
      for (int64_t p = 0; p < chunk; ++p) {
        const int64_t k = c + idx[p];
        dst[m * Kp + c + p] = k < K ? src[m * K + k] : 0.0f;
      }
  return xk;
}

at::Tensor linear_quantized(const at::Tensor& x, const at::Tensor& order, const at::Tensor& q,
                            const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t group,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "bits must be 4, 6 or 8");
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be f32 or bf16 [M, K]");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(), "q must be contiguous uint8 [N, bytes]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kShort && scales.is_contiguous() &&
                  zeros.is_contiguous(), "scales must be f32 and zeros int16, contiguous [N, G]");
  const int64_t chunk = bits == 8 ? 64 : 128, bytes = bits == 8 ? 64 : bits == 6 ? 96 : 64;
  const int64_t M = x.size(0), N = q.size(0), G = scales.size(1), Kp = q.size(1) / bytes * chunk;
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "1 to 4 rows");
  TORCH_CHECK(q.size(1) % bytes == 0 && x.size(1) <= Kp, "q does not match x's features");
  TORCH_CHECK(order.scalar_type() == at::kLong && order.dim() == 1 && order.size(0) == chunk, "order must be [chunk]");
  TORCH_CHECK(group > 0 && Kp % group == 0 && G == Kp / group && zeros.size(1) == G && scales.size(0) == N,
              "scales/zeros do not match the groups");
  const int GC = group % chunk == 0 ? 1 : static_cast<int>(chunk / group);
  TORCH_CHECK(GC == 1 || ((GC == 2 || GC == 4) && chunk % group == 0), "groups of 1/4, 1/2 or whole chunks only");
  const c10::optional<at::Tensor> b = bias_as_f32(bias, N);
  const at::Tensor xk = activations_in_load_order(x, order, Kp);
  at::Tensor out = at::empty({M, N}, xk.options());
  const Args a{xk.data_ptr<float>(), q.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<int16_t>(),
               b.has_value() ? b->data_ptr<float>() : nullptr, out.data_ptr<float>(), N, Kp, G, group, q.size(1)};
  switch (M) {
    case 1: run_bits<1>(a, bits, GC); break;
    case 2: run_bits<2>(a, bits, GC); break;
    case 3: run_bits<3>(a, bits, GC); break;
    default: run_bits<4>(a, bits, GC); break;
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
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
#pragma GCC unroll 4
    for (int c = 0; c < A; ++c) step(k + 8 * c, c);
  }
  for (; k + 8 <= K; k += 8) step(k, 0);
  for (int m = 0; m < M; ++m) {
    __m256 sum = acc[m][0];
    for (int c = 1; c < A; ++c) sum = _mm256_add_ps(sum, acc[m][c]);
    float total = hsum(sum);
    for (int64_t t = k; t < K; ++t) {
      uint32_t bits = static_cast<uint32_t>(row[t]) << 16;
      float wt;
      std::memcpy(&wt, &bits, sizeof wt);
      total += wt * x[m * K + t];
    }
    out[m * N + n] = total + (bias ? bias[n] : 0.0f);
  }
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be f32 or bf16 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "w must be contiguous bf16 [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows && w.size(1) == K, "1 to 4 rows of w's K features");
  const c10::optional<at::Tensor> b = bias_as_f32(bias, N);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      switch (M) {
        case 1: dense_row<1>(xp, wp, K, op, N, bp, n); break;
        case 2: dense_row<2>(xp, wp, K, op, N, bp, n); break;
        case 3: dense_row<3>(xp, wp, K, op, N, bp, n); break;
        default: dense_row<4>(xp, wp, K, op, N, bp, n); break;
      }
    }
  });
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(qwenlm_avx2, m) {
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_quantized(Tensor x, Tensor order, Tensor q, Tensor scales, Tensor zeros, int bits, int group, "
        "Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwenlm_avx2, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_quantized", &linear_quantized);
}
