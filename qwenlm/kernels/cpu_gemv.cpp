// Matrix-vector kernels for small-batch CPU decoding (AVX-512 + AVX512_BF16).
//
// Decoding one sequence reads every weight once per token, so these kernels are written to stream the
// weight matrix at memory bandwidth: the weight is walked tile by tile (NB output rows at a time), the
// few activation rows are applied to each tile while it is hot in L1/L2 (each weight byte comes from DRAM
// once per call, whatever M), and the tiles are split across torch's intra-op thread pool
// (at::parallel_for), so torch.set_num_threads controls them. All arithmetic accumulates in fp32.
//
// Ops (registered as torch.ops.qwenlm_kernels.*; the Python wrappers in cpu.py own validation/dispatch):
//   linear_dense(x [M,K], w [N,K], bias?)            bf16 x bf16 (dpbf16), fp32 x bf16, fp32 x fp32
//   linear_int8(x, q [N,Kp] u8, scales [N,G] f32, zeros [N,G] i16, group, K, bias?)
//   linear_int4(x, q [N,Kp/2] u8, scales, zeros, group, K, bias?)
//   linear_int6(x, q [N,3Kp/4] u8, scales, zeros, group, K, bias?)
//   dequantize(q, scales, zeros, bits, group, K, dtype) -> [N, K]; dequantize_out(..., out) writes into out
// The quantized layouts are produced by qwenlm/kernels/quant.py (pack_quantized), which documents them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "cpu_layer_ops.h"
#include "cpu_layer_ops_torch.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

// A tile is NB weight rows processed together (several independent row streams keep enough loads in flight
// to saturate DRAM bandwidth) times MB <= Tile::kMB activation rows per pass over it (larger M re-reads the
// tile from L1/L2, not DRAM); the MB*NB accumulators must fit in the 32 zmm registers.
#ifndef QWENLM_PREFETCH
#define QWENLM_PREFETCH 1
#endif
#ifndef QWENLM_NB
#define QWENLM_NB 4
#endif
#ifndef QWENLM_NB_FEW
#define QWENLM_NB_FEW 8
#endif
#ifndef QWENLM_NB_FEW_DENSE
#define QWENLM_NB_FEW_DENSE 1
#endif
constexpr bool kPrefetch = QWENLM_PREFETCH;
constexpr int kNBMany = QWENLM_NB;
// One or two activation rows: quantized tiles interleave 8 rows (their integer dot products need that many
// independent chains to keep up with DRAM; 4 and 16 measured slower). Dense tiles read one row after another:
// with the weights on 2 MiB pages (model/huge_pages.py) one sequential stream ran 1.8B decode 15% (bf16) and
// 10% (fp32) faster than 8 interleaved rows on the AMX host, while a single dpbf16 chain still outruns DRAM.
// The tile shape does not change any row's summation order, so outputs are the same bit for bit.
constexpr int kNBFewQuant = QWENLM_NB_FEW;
constexpr int kNBFewDense = QWENLM_NB_FEW_DENSE;


// Software prefetch of the next tile. A tile's NB rows are adjacent in memory, so the weight a thread reads
// is one contiguous region, but each row is a short stream (1-8 KB) that the hardware prefetchers barely
// learn before it ends (quantized rows at DRAM sizes ran at ~1/3 of the bandwidth without this). While a
// tile consumes 64 bytes of each of its NB rows, we request the same fraction of the next tile, NB cache
// lines at offset k_bytes * NB, into L2; over the tile that sweeps the whole next tile exactly once.
// A tile whose rows advance by more than 64 bytes per step (int6: 96) requests LINES = that many lines.
template <int NB, int LINES = NB>
__attribute__((always_inline)) inline void prefetch_next_tile(const void* next_tile, int64_t k_bytes) {
  if constexpr (kPrefetch) {
    const char* p = static_cast<const char*>(next_tile) + k_bytes * NB;
#pragma GCC unroll 16
    for (int j = 0; j < LINES; ++j) _mm_prefetch(p + 64 * j, _MM_HINT_T1);
  }
}

// How far ahead the quantized tiles prefetch (QuantPrefetch), in whole tiles of NB rows: at least
// kPrefetchAhead bytes. The next tile alone is too close to cover DRAM latency at full bandwidth when rows are
// short (a tile of 8 int4 rows of K = 2048 is 8 KB): 16 KB ahead streamed int8 10-15% and int4 ~8% faster on
// the AMD host, 32 KB no better. (Dense tiles read one 4+ KB row at a time; 16 KB ahead was slower there.)
constexpr int64_t kPrefetchAhead = 16384;
template <int NB>
inline int64_t prefetch_rows_ahead(int64_t row_bytes) {
  return NB * std::max<int64_t>(1, (kPrefetchAhead + NB * row_bytes - 1) / (NB * row_bytes));
}

// Rows per block in the one-row decode paths over whole groups (run_groups, run_int_groups below): their
// accumulators must fit in registers. Measured: the integer path runs the same with 1, 2 or 4; the dpbf16 one
// needs 4 independent chains (2 ran at 0.71x).
#ifndef QWENLM_INT_ROWS
#define QWENLM_INT_ROWS 4
#endif
#ifndef QWENLM_GROUP_ROWS
#define QWENLM_GROUP_ROWS 4
#endif
constexpr int kIntRows = QWENLM_INT_ROWS, kGroupRows = QWENLM_GROUP_ROWS;

// The output is written in x's dtype; bias (already fp32) is added before the single final rounding.
struct Output {
  void* data;
  bool is_bf16;
  const float* bias;  // nullptr when there is none
  int64_t N;

  inline void store(int64_t m, int64_t n, float v) const {
    if (bias) v += bias[n];
    if (is_bf16) {
      static_cast<bf16*>(data)[m * N + n] = bf16(v);  // round-to-nearest-even, like torch
    } else {
      static_cast<float*>(data)[m * N + n] = v;
    }
  }
  // store(m, n0 + i, v[i]) for the first `count` lanes, rounded the same way (store16).
  inline void store_run(int64_t m, int64_t n0, __m512 v, int64_t count) const {
    const __mmask16 mk = tail_mask16(count);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + n0));
    if (is_bf16) {
      store16(static_cast<bf16*>(data) + m * N + n0, v, mk);
    } else {
      store16(static_cast<float*>(data) + m * N + n0, v, mk);
    }
  }
};

// A tile's MB x NB fp32 accumulators, zeroed.
template <int MB, int NB>
inline void zero_acc(__m512 (&acc)[MB][NB]) {
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
}

// The dpbf16 quantized tiles (kScheduledOneRow) for one activation row (decoding), their code scheduled before
// register allocation with an eye on register pressure (GCC's -fschedule-insns -fsched-pressure, off by default on
// x86). Without it GCC 12 spills a tile's weight vectors and row pointers to the stack every row. Measured
// (BENCHMARKS.md): from cache int4 1.10x, int8 1.03x, streaming within noise; the several-row tiles ran up to
// 10% slower with the flags, and the VNNI int8 tile 1.45x faster from cache but 0.82x streaming from DRAM, so
// neither takes them.
template <class Tile, int NB>
__attribute__((noinline, optimize("schedule-insns", "sched-pressure")))
void run_one_row(const typename Tile::Args& a, int64_t m0, int64_t n0) {
  Tile::template run<1, NB>(a, m0, n0);
}

// Dispatches the runtime row count mb (1..Tile::kMB) to the matching compile-time MB.
template <class Tile, int NB, int MB = 1>
inline void run_mblock(const typename Tile::Args& a, int64_t mb, int64_t m0, int64_t n0) {
  if constexpr (MB < Tile::kMB) {
    if (mb > MB) return run_mblock<Tile, NB, MB + 1>(a, mb, m0, n0);
  }
  if constexpr (MB == 1 && Tile::kScheduledOneRow) return run_one_row<Tile, NB>(a, m0, n0);
  Tile::template run<MB, NB>(a, m0, n0);
}

// Runs Tile::run<MB, NB>(args, m0, n0) over all (m-block, n-tile) pairs, tiles split across threads.
// Each thread owns a contiguous range of output rows, so it streams a contiguous slice of the weight.
template <class Tile, int NB>
void parallel_tiles_nb(const typename Tile::Args& a, int64_t M, int64_t N, int64_t rows_per_block) {
  const int64_t n_tiles = (N + NB - 1) / NB;
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NB;
      const int64_t nb = std::min<int64_t>(NB, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += rows_per_block) {
        const int64_t mb = std::min<int64_t>(rows_per_block, M - m0);
        if (nb == NB) {
          run_mblock<Tile, NB>(a, mb, m0, n0);
        } else {
          for (int64_t j = 0; j < nb; ++j) run_mblock<Tile, 1>(a, mb, m0, n0 + j);
        }
      }
    }
  });
}

// One or two activation rows take the tile's own row count (Tile::kNBFew, see kNBFewDense); more rows need
// their MB*NB accumulators (kNBMany).
template <class Tile>
void parallel_tiles(const typename Tile::Args& a, int64_t M, int64_t N, int64_t rows_per_block = Tile::kMB) {
  if (M <= 2) {
    parallel_tiles_nb<Tile, Tile::kNBFew>(a, M, N, rows_per_block);
  } else {
    parallel_tiles_nb<Tile, kNBMany>(a, M, N, rows_per_block);
  }
}

// ------------------------------------------------------------------------------------------------
// Dense: x bf16, w bf16. vdpbf16ps multiplies bf16 pairs exactly and accumulates in fp32, which is what
// torch's bf16 matmul computes up to summation order.
struct DenseBf16Tile {
  static constexpr int kMB = 4;
  static constexpr bool kScheduledOneRow = false;
  static constexpr int kNBFew = kNBFewDense;
  struct Args {
    const uint16_t* x;
    const uint16_t* w;
    int64_t K;
    Output out;
  };

  template <int MB, int NB>
  static void run(const Args& a, int64_t m0, int64_t n0) {
    const int64_t K = a.K;
    __m512 acc[MB][NB];
    const uint16_t* wr[NB];
    const uint16_t* xr[MB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) wr[j] = a.w + (n0 + j) * K;
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) xr[i] = a.x + (m0 + i) * K;
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();

    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m512i wv[NB];
      prefetch_next_tile<NB>(a.w + (n0 + NB) * K, 2 * k);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(wr[j] + k);
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        const __m512i xv = _mm512_loadu_si512(xr[i] + k);
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)wv[j], (__m512bh)xv);
      }
    }
    if (k < K) {  // ragged K: masked loads read zeros past the end
      const __mmask32 mk = tail_mask32(K - k);
      __m512i wv[NB];
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_epi16(mk, wr[j] + k);
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        const __m512i xv = _mm512_maskz_loadu_epi16(mk, xr[i] + k);
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)wv[j], (__m512bh)xv);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) a.out.store(m0 + i, n0 + j, _mm512_reduce_add_ps(acc[i][j]));
  }
};

// ------------------------------------------------------------------------------------------------
// Dense: x fp32, w bf16 ("weights stored bf16, math in fp32"). A bf16 value is the top half of an fp32,
// so widening is exact and costs one integer op per 16 weights: of a 64-byte load, the even elements
// become fp32 by a left shift and the odd ones by masking the low half. x is pre-permuted so that each
// 32-element block holds its 16 even elements first, then its 16 odd ones (see permute_even_odd).
struct DenseF32Bf16Tile {
  static constexpr int kMB = 4;
  static constexpr bool kScheduledOneRow = false;
  static constexpr int kNBFew = kNBFewDense;
  struct Args {
    const float* xp;  // [M, K32], even/odd permuted, zero padded
    const uint16_t* w;
    int64_t K, K32;
    Output out;
  };

  template <int MB, int NB>
  static void run(const Args& a, int64_t m0, int64_t n0) {
    const int64_t K = a.K;
    __m512 acc[MB][NB];
    const uint16_t* wr[NB];
    const float* xr[MB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) wr[j] = a.w + (n0 + j) * K;
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) xr[i] = a.xp + (m0 + i) * a.K32;
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
    const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));

    for (int64_t k = 0; k < K; k += 32) {
      __m512 we[NB], wo[NB];
      const bool full = k + 32 <= K;
      prefetch_next_tile<NB>(a.w + (n0 + NB) * K, 2 * k);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        const __m512i v = full ? _mm512_loadu_si512(wr[j] + k) : _mm512_maskz_loadu_epi16(tail_mask32(K - k), wr[j] + k);
        we[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        wo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
      }
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        const __m512 xe = _mm512_loadu_ps(xr[i] + k);
        const __m512 xo = _mm512_loadu_ps(xr[i] + k + 16);
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) {
          acc[i][j] = _mm512_fmadd_ps(we[j], xe, acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(wo[j], xo, acc[i][j]);
        }
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) a.out.store(m0 + i, n0 + j, _mm512_reduce_add_ps(acc[i][j]));
  }
};

// ------------------------------------------------------------------------------------------------
// Dense: x fp32, w fp32. Plain FMA; the only work is keeping enough rows in flight.
struct DenseF32Tile {
  static constexpr int kMB = 4;
  static constexpr bool kScheduledOneRow = false;
  static constexpr int kNBFew = kNBFewDense;
  struct Args {
    const float* x;
    const float* w;
    int64_t K;
    Output out;
  };

  template <int MB, int NB>
  static void run(const Args& a, int64_t m0, int64_t n0) {
    const int64_t K = a.K;
    __m512 acc[MB][NB];
    const float* wr[NB];
    const float* xr[MB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) wr[j] = a.w + (n0 + j) * K;
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) xr[i] = a.x + (m0 + i) * K;
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();

    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = tail_mask16(K - k);
      __m512 wv[NB];
      prefetch_next_tile<NB>(a.w + (n0 + NB) * K, 4 * k);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_ps(mk, wr[j] + k);
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        const __m512 xv = _mm512_maskz_loadu_ps(mk, xr[i] + k);
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) a.out.store(m0 + i, n0 + j, _mm512_reduce_add_ps(acc[i][j]));
  }
};

// ------------------------------------------------------------------------------------------------
// Weight-only quantized linears, W[n,k] = (q[n,k] - z[n,g]) * s[n,g].
//
// Both kernels walk each weight row in 64-byte chunks (64 int8 or 128 int4 weights), turn a chunk into four
// vectors with 16 fp32 lanes of partial dot products, and scale the chunk's sum t by the group scale:
//   acc += t * s.
// The zero point is not subtracted per weight (that costs an op per 16 weights); it comes back out once
// per row from per-group activation sums: y = sum_g s[g] * sum_{k in g} q[k] x[k] - sum_g s[g] z[g] xsum[g].
//
// Small groups (GC = 2 or 4 groups per chunk) would need a scale per vector; instead pack_quantized permutes
// the weights inside each chunk so that lane p of every vector belongs to group p / (16 / GC), and one
// vector of per-lane scales serves the whole chunk. The activations get the same permutation (prepare_row).
//   element e of vector v (E elements per vector) holds chunk weight  g*(e / per) + per*v + e % per,
//   with g = chunk / GC the group size and per = E / GC.
// quant.py implements the same formula (_chunk_order); keep them in sync.

// Bytes of stored codes for the first k weights of a row (k a multiple of the chunk): int8 one byte a weight,
// int4 half, int6 three quarters (each 128-weight chunk is its 64 nibble bytes, then 32 bytes of high bits).
template <int BITS>
constexpr int64_t code_bytes(int64_t k) {
  static_assert(BITS == 8 || BITS == 4 || BITS == 6, "bits must be 8, 6 or 4");
  return BITS == 8 ? k : BITS == 4 ? k / 2 : k / 4 * 3;
}
inline int64_t code_bytes(int bits, int64_t k) {
  return bits == 8 ? code_bytes<8>(k) : bits == 4 ? code_bytes<4>(k) : code_bytes<6>(k);
}

struct QuantArgs {
  const void* x;      // int8: fp32 [Mv, Kp]; int4/int6: bf16 [Mv, Kp]; chunk-permuted, zero padded
  const float* xsum;  // [Mv, G] per-group sums of x (natural order)
  const uint8_t* q;   // [N, code_bytes(Kp)]
  const float* scales;
  const int16_t* zeros;
  int64_t Kp, G, group;
  int parts;  // int4/int6 only: 1 (bf16 x) or 3 (fp32 x split in three bf16 parts)
  Output out;
  const float* xscale = nullptr;  // VNNI path: per-row factor 2^-S of the fixed-point activations (else 1)
};

// Per-lane scales for one chunk: lane p gets s[p / (16 / GC)].
template <int GC>
inline __m512 lane_scales(const float* s) {
  if constexpr (GC == 1) {
    return _mm512_set1_ps(*s);
  } else {
    const __m512i idx = _mm512_set_epi32(15 / (16 / GC), 14 / (16 / GC), 13 / (16 / GC), 12 / (16 / GC),
                                         11 / (16 / GC), 10 / (16 / GC), 9 / (16 / GC), 8 / (16 / GC),
                                         7 / (16 / GC), 6 / (16 / GC), 5 / (16 / GC), 4 / (16 / GC),
                                         3 / (16 / GC), 2 / (16 / GC), 1 / (16 / GC), 0);
    return _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps((__mmask16)((1u << GC) - 1u), s));
  }
}

// Group index of each chunk, advanced chunk by chunk (no division in the loop).
template <int GC>
struct ChunkGroups {
  int64_t chunks_per_group, g = 0, left;
  explicit ChunkGroups(int64_t group, int64_t chunk) : chunks_per_group(GC == 1 ? group / chunk : 1), left(chunks_per_group) {}
  inline int64_t next() {  // first group of the current chunk, then advance
    const int64_t cur = g;
    if constexpr (GC > 1) {
      g += GC;
    } else if (--left == 0) {
      left = chunks_per_group;
      ++g;
    }
    return cur;
  }
};

// Software prefetch for a quantized tile: the weights, scales and zeros of the tile prefetch_rows_ahead rows
// on. At chunk offset k (elements) it requests the same fraction of that tile's weights (prefetch_next_tile)
// and of its scales and zeros, so over the tile each is swept once. Small groups have up to 128 bytes of
// scales per chunk iteration (NB = 8, 4 groups per chunk), hence two lines of scales and one of zeros. The
// fraction is a fixed-point product, not an integer division per chunk as before. Everything here and in
// prefetch_next_tile is forced inline: GCC 12 left one of these out of line, judged it free of side effects
// and deleted its calls, so the loop lost its prefetches and ran at half the bandwidth.
template <int NB, int BITS>
struct QuantPrefetch {
  const uint8_t* q;
  const char* s;
  const char* z;
  int64_t meta_per_k;  // bytes of scales per element of the row, in 1/65536ths

  __attribute__((always_inline)) QuantPrefetch(const QuantArgs& a, int64_t n0) {
    const int64_t row_bytes = code_bytes<BITS>(a.Kp), n = n0 + prefetch_rows_ahead<NB>(row_bytes);
    q = a.q + n * row_bytes;
    s = reinterpret_cast<const char*>(a.scales + n * a.G);
    z = reinterpret_cast<const char*>(a.zeros + n * a.G);
    meta_per_k = (int64_t{NB} * a.G * 4 << 16) / a.Kp;
  }

  __attribute__((always_inline)) inline void at(int64_t k) const {
    if constexpr (kPrefetch) {
      prefetch_next_tile<NB, BITS == 6 ? NB * 3 / 2 : NB>(q, code_bytes<BITS>(k));  // int6: 96-byte chunks
      const int64_t off = (k * meta_per_k) >> 16;
      _mm_prefetch(s + off, _MM_HINT_T1);
      _mm_prefetch(s + off + 64, _MM_HINT_T1);
      _mm_prefetch(z + off / 2, _MM_HINT_T1);
    }
  }
};

// The lane sums of sixteen vectors at once: lane i of the result is the sum of v[i]'s lanes, added in the order
// GCC's _mm512_reduce_add_ps adds them (lane j with j + 8, then j with j + 4, then {0, 2} and {1, 3}, then those
// two), so each equals that call's result bit for bit, for a fraction of its shuffles and none of its latency.
inline __m512 reduce_add16(const __m512 (&v)[16]) {
  __m512 a[8], b[4], c[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // [v[2i]: j + (j + 8), j < 8 | v[2i + 1]: the same]
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // 128-bit lane L: v[4i + L]'s four sums of j + (j + 4)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // lane L: {0 + 2, 1 + 3} of v[8i + L], then of v[8i + 4 + L]
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  // element 4L + m: the sum of v[4m + L]; the permutation puts v[i]'s sum in lane i
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), sums);
}

// Final step shared by both kernels: subtract sum_g s*(z + offset)*xsum (16 groups per step), then store.
// With parts == 3 the block holds the three bf16 parts of one fp32 row; they are summed into that row.
// One activation row (decoding) sums its NB dot products and NB corrections in one reduce_add16.
template <int MB, int NB>
inline void finish_quant_tile(const QuantArgs& a, __m512 (&acc)[MB][NB], int64_t m0, int64_t n0, float offset) {
  constexpr bool kTogether = MB == 1 && NB >= 4 && NB <= 8;
  float res[MB][NB];
  __m512 sums_of[16];
  if constexpr (kTogether) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) sums_of[i] = _mm512_setzero_ps();
  }
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j) {
    const float* s = a.scales + (n0 + j) * a.G;
    const int16_t* z = a.zeros + (n0 + j) * a.G;
    __m512 corr[MB];
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) corr[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < a.G; g += 16) {
      const __mmask16 mk = tail_mask16(a.G - g);
      const __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(mk, z + g)));
      const __m512 c = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, s + g), _mm512_add_ps(zf, _mm512_set1_ps(offset)));
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i)
        corr[i] = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(mk, a.xsum + (m0 + i) * a.G + g), corr[i]);
    }
    if constexpr (kTogether) {
      sums_of[j] = acc[0][j];
      sums_of[8 + j] = corr[0];
    } else {
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        const float dot = _mm512_reduce_add_ps(acc[i][j]);
        res[i][j] = (a.xscale ? dot * a.xscale[m0 + i] : dot) - _mm512_reduce_add_ps(corr[i]);
      }
    }
  }
  if constexpr (kTogether) {  // lanes 0..NB-1: the dot products, lanes 8..8+NB-1: the corrections
    const __m512 sums = reduce_add16(sums_of);
    const __m512 dots = a.xscale ? _mm512_mul_ps(sums, _mm512_set1_ps(a.xscale[m0])) : sums;
    const __m512 r = _mm512_sub_ps(dots, _mm512_shuffle_f32x4(sums, sums, 0x4E));
    if (a.parts == 1) return a.out.store_run(m0, n0, r, NB);
    _mm512_mask_storeu_ps(res[0], tail_mask16(NB), r);
  }
  if (a.parts == 1) {
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) a.out.store(m0 + i, n0 + j, res[i][j]);
  } else {
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      float v = 0.0f;
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) v += res[i][j];
      a.out.store(m0 / 3, n0 + j, v);
    }
  }
}

// The codes of one 128-weight chunk of an int4 or int6 row as two byte vectors: lo[j] is the weight in the low
// nibble of byte j, hi[j] the one in its high nibble (pack_int4's order). int6 adds each weight's top two bits
// from the chunk's 32 bytes after its nibbles (quant.pack_int6): high byte i holds, from bit 0, the top bits of
// lo[i], hi[i], lo[i + 32] and hi[i + 32]. Codes are below 64, so the bf16 pattern 0x4300|v is still 128 + v.
template <int BITS>
__attribute__((always_inline)) inline void nibble_codes(const uint8_t* p, __m512i& lo, __m512i& hi) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i b = _mm512_loadu_si512(p);
  if constexpr (BITS == 4) {
    lo = _mm512_and_si512(b, nibble);
    hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
  } else {
    static_assert(BITS == 6, "nibble_codes: int4 or int6");
    // The 32 high bytes in both halves: nibble byte j < 32 takes its top bits from bits 0-3 of high byte j,
    // byte j >= 32 from bits 4-7 of high byte j - 32. Each code's two go to bits 4-5, the rest zero.
    const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64)));
#if defined(__GFNI__) && !defined(QWENLM_NO_GFNI)  // QWENLM_NO_GFNI: tests build the other branch too
    // One GF(2) affine map per 8 bytes moves the bits; the lower and upper halves get different matrices
    // (row 7 - o of a matrix is the mask of input bits that make output bit o).
    const int64_t lo_upper = 0x10200000, lo_lower = 0x01020000;  // bits 4, 5 -> 4, 5 and bits 0, 1 -> 4, 5
    const int64_t hi_upper = 0x40800000, hi_lower = 0x04080000;  // bits 6, 7 -> 4, 5 and bits 2, 3 -> 4, 5
    const __m512i lo_top = _mm512_gf2p8affine_epi64_epi8(
        h, _mm512_set_epi64(lo_upper, lo_upper, lo_upper, lo_upper, lo_lower, lo_lower, lo_lower, lo_lower), 0);
    const __m512i hi_top = _mm512_gf2p8affine_epi64_epi8(
        h, _mm512_set_epi64(hi_upper, hi_upper, hi_upper, hi_upper, hi_lower, hi_lower, hi_lower, hi_lower), 0);
#else
    const int64_t by4 = 0x0004000400040004;  // the upper half's 16-bit lanes shift right by 4
    const __m512i top = _mm512_srlv_epi16(h, _mm512_set_epi64(by4, by4, by4, by4, 0, 0, 0, 0));
    const __m512i bits54 = _mm512_set1_epi8(0x30);
    const __m512i lo_top = _mm512_and_si512(_mm512_slli_epi16(top, 4), bits54);
    const __m512i hi_top = _mm512_and_si512(_mm512_slli_epi16(top, 2), bits54);
#endif
    // (x & 0x0F) | top: ternary-logic table 0xEA is (A & B) | C.
    lo = _mm512_ternarylogic_epi32(b, nibble, lo_top, 0xEA);
    hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 4), nibble, hi_top, 0xEA);
  }
}

// A chunk's codes as four vectors of 32 bf16: each code is unpacked beside a constant high byte, magic_lo for
// the low-nibble codes and magic_hi for the high ones (0x43|v is the bf16 number 128 + v for v < 128, 0x45|v is
// 2048 + 16v for v < 16). out: low-nibble codes unpacklo, unpackhi, then high ones (per 128-bit lane).
template <int BITS = 4>
inline void nibbles_to_bf16(const uint8_t* p, __m512i magic_lo, __m512i magic_hi, __m512i out[4]) {
  __m512i lo, hi;
  nibble_codes<BITS>(p, lo, hi);
  out[0] = _mm512_unpacklo_epi8(lo, magic_lo);
  out[1] = _mm512_unpackhi_epi8(lo, magic_lo);
  out[2] = _mm512_unpacklo_epi8(hi, magic_hi);
  out[3] = _mm512_unpackhi_epi8(hi, magic_hi);
}

// int8 with fp32 activations: codes are widened to fp32 exactly and FMA'd with x. pack_int8 stores element
// p of vector v of a chunk in byte v of dword p, so the widening is shifts and masks within dwords (no
// cross-lane shuffles).
template <int GC>
struct Int8Tile {
  static constexpr int kMB = 4;
  static constexpr bool kScheduledOneRow = true;  // run_one_row
  static constexpr int kNBFew = kNBFewQuant;
  static constexpr int64_t kChunk = 64;
  using Args = QuantArgs;

  template <int MB, int NB>
  __attribute__((always_inline)) static inline void run(const Args& a, int64_t m0, int64_t n0) {
    __m512 acc[MB][NB];
    zero_acc(acc);
    const float* x = static_cast<const float*>(a.x);
    ChunkGroups<GC> groups(a.group, kChunk);
    const QuantPrefetch<NB, 8> prefetch(a, n0);

    for (int64_t k = 0; k < a.Kp; k += kChunk) {
      const int64_t g = groups.next();
      prefetch.at(k);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        const uint8_t* p = a.q + (n0 + j) * a.Kp + k;
        const __m512i d = _mm512_loadu_si512(p);
        const __m512i byte_mask = _mm512_set1_epi32(0xFF);
        __m512 w[4];
        w[0] = _mm512_cvtepi32_ps(_mm512_and_si512(d, byte_mask));
        w[1] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(d, 8), byte_mask));
        w[2] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(d, 16), byte_mask));
        w[3] = _mm512_cvtepi32_ps(_mm512_srli_epi32(d, 24));
        const __m512 sv = lane_scales<GC>(a.scales + (n0 + j) * a.G + g);
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) {
          const float* xr = x + (m0 + i) * a.Kp + k;
          __m512 t = _mm512_mul_ps(w[0], _mm512_loadu_ps(xr));
#pragma GCC unroll 4
          for (int v = 1; v < 4; ++v) t = _mm512_fmadd_ps(w[v], _mm512_loadu_ps(xr + 16 * v), t);
          acc[i][j] = _mm512_fmadd_ps(t, sv, acc[i][j]);
        }
      }
    }
    finish_quant_tile<MB, NB>(a, acc, m0, n0, 0.0f);
  }
};

// int8 with bf16 activations: ~15% faster than the fp32 path (fewer vector ops per byte). Each byte is split into its nibbles,
// and each nibble becomes an exact bf16 by a byte unpack against a constant high byte: 0x43|l is 128 + l
// and 0x45|h is 2048 + 16h. Both planes are dotted with the same activations into one accumulator, so
// t = sum (2176 + q) x, and the 2176 joins the zero point in the correction term.
// Word order after the unpacks (per 128-bit lane L, word i): byte i of lane L (unpacklo) or byte 8 + i
// (unpackhi); int8_bf16_order gives x the same order. Output lane 4L + i/2 only sees dwords of lane L's
// half, so the per-lane group scales of the fp32 path apply unchanged.
template <int GC>
struct Int8Bf16Tile {
  static constexpr int kMB = 4;
  static constexpr bool kScheduledOneRow = true;  // run_one_row
  static constexpr int kNBFew = kNBFewQuant;
  static constexpr int64_t kChunk = 64;
  using Args = QuantArgs;

  // A 64-byte chunk as four vectors of 32 bf16 (nibbles_to_bf16: 128 + low nibble, 2048 + 16 * high nibble).
  static inline void decode(const uint8_t* p, __m512i w[4]) {
    nibbles_to_bf16(p, _mm512_set1_epi8(0x43), _mm512_set1_epi8(0x45), w);
  }

  // t + the chunk's dot product with its activations: the unpacklo words pair with x0 (the chunk's first 32
  // activations in int8_bf16_order), the unpackhi words with x1.
  static inline __m512 dot(__m512 t, const __m512i w[4], __m512i x0, __m512i x1) {
    t = _mm512_dpbf16_ps(t, (__m512bh)w[0], (__m512bh)x0);
    t = _mm512_dpbf16_ps(t, (__m512bh)w[2], (__m512bh)x0);
    t = _mm512_dpbf16_ps(t, (__m512bh)w[1], (__m512bh)x1);
    return _mm512_dpbf16_ps(t, (__m512bh)w[3], (__m512bh)x1);
  }

  template <int MB, int NB>
  __attribute__((always_inline)) static inline void run(const Args& a, int64_t m0, int64_t n0) {
    if constexpr (GC == 1 && MB == 1 && NB % kGroupRows == 0) {
      if (a.group > kChunk) {
        for (int r = 0; r < NB; r += kGroupRows) run_groups<kGroupRows>(a, m0, n0 + r);
        return;
      }
    }
    __m512 acc[MB][NB];
    zero_acc(acc);
    const uint16_t* x = static_cast<const uint16_t*>(a.x);
    ChunkGroups<GC> groups(a.group, kChunk);
    const QuantPrefetch<NB, 8> prefetch(a, n0);

    for (int64_t k = 0; k < a.Kp; k += kChunk) {
      const int64_t g = groups.next();
      prefetch.at(k);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        __m512i w[4];
        decode(a.q + (n0 + j) * a.Kp + k, w);
        const __m512 sv = lane_scales<GC>(a.scales + (n0 + j) * a.G + g);
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) {
          const uint16_t* xr = x + (m0 + i) * a.Kp + k;
          const __m512 t = dot(_mm512_setzero_ps(), w, _mm512_loadu_si512(xr), _mm512_loadu_si512(xr + 32));
          acc[i][j] = _mm512_fmadd_ps(t, sv, acc[i][j]);
        }
      }
    }
    finish_quant_tile<MB, NB>(a, acc, m0, n0, 2176.0f);
  }

  // Decode with groups spanning several chunks (per-channel int8, g128+): the dot products of a whole group
  // accumulate in one fp32 register per row and are scaled once per group, not once per chunk.
  template <int NB>
  __attribute__((always_inline)) static inline void run_groups(const Args& a, int64_t m0, int64_t n0) {
    alignas(64) float part[NB][16] = {};
    const uint16_t* x = static_cast<const uint16_t*>(a.x) + m0 * a.Kp;
    const QuantPrefetch<NB, 8> prefetch(a, n0);
    for (int64_t k0 = 0, g = 0; k0 < a.Kp; k0 += a.group, ++g) {
      __m512 t[NB];
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) t[j] = _mm512_setzero_ps();
      for (int64_t k = k0; k < k0 + a.group; k += kChunk) {
        prefetch.at(k);
        const __m512i x0 = _mm512_loadu_si512(x + k), x1 = _mm512_loadu_si512(x + k + 32);
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) {
          __m512i w[4];
          decode(a.q + (n0 + j) * a.Kp + k, w);
          t[j] = dot(t[j], w, x0, x1);
        }
      }
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j)
        _mm512_store_ps(part[j], _mm512_fmadd_ps(t[j], _mm512_set1_ps(a.scales[(n0 + j) * a.G + g]),
                                                 _mm512_load_ps(part[j])));
    }
    __m512 acc[1][NB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[0][j] = _mm512_load_ps(part[j]);
    finish_quant_tile<1, NB>(a, acc, m0, n0, 2176.0f);
  }
};

// int4 / int6: a code v (< 128) becomes the bf16 bit pattern 0x4300|v, which is exactly the number 128+v, in
// one byte unpack against a constant 0x43 byte (no lookup, no int->float convert). vdpbf16ps multiplies these
// exactly with bf16 activations, accumulating in fp32; the +128 joins the zero point in the correction term.
// fp32 activations are split exactly into three bf16 parts (hi + mid + lo) that run as three virtual rows
// and are summed, so no activation precision is lost. int6 differs only in where the codes come from.
template <int GC, int BITS>
struct NibbleTile {
  static constexpr int kMB = 4;  // >= 3: an fp32 row's three parts go in one block
  static constexpr bool kScheduledOneRow = true;  // run_one_row
  static constexpr int kNBFew = kNBFewQuant;
  static constexpr int64_t kChunk = 128;
  using Args = QuantArgs;

  // Four vectors of 32 bf16 (128 + v) from one chunk: the low-nibble codes unpacklo, unpackhi, then the high
  // ones. quant.pack_int4 stores the nibbles so that these per-128-bit-lane unpacks yield the chunk's
  // (permuted) weight order without any cross-lane shuffle.
  static inline void decode(const uint8_t* p, __m512i out[4]) {
    const __m512i magic = _mm512_set1_epi8(0x43);
    nibbles_to_bf16<BITS>(p, magic, magic, out);
  }

  template <int MB, int NB>
  __attribute__((always_inline)) static inline void run(const Args& a, int64_t m0, int64_t n0) {
    __m512 acc[MB][NB];
    zero_acc(acc);
    const uint16_t* x = static_cast<const uint16_t*>(a.x);
    const int64_t row_bytes = code_bytes<BITS>(a.Kp);
    ChunkGroups<GC> groups(a.group, kChunk);
    const QuantPrefetch<NB, BITS> prefetch(a, n0);

    for (int64_t k = 0; k < a.Kp; k += kChunk) {
      const int64_t g = groups.next();
      prefetch.at(k);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        const uint8_t* p = a.q + (n0 + j) * row_bytes + code_bytes<BITS>(k);
        __m512i w[4];
        decode(p, w);
        const __m512 sv = lane_scales<GC>(a.scales + (n0 + j) * a.G + g);
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) {
          const uint16_t* xr = x + (m0 + i) * a.Kp + k;
          __m512 t = _mm512_setzero_ps();
#pragma GCC unroll 4
          for (int v = 0; v < 4; ++v) t = _mm512_dpbf16_ps(t, (__m512bh)w[v], (__m512bh)_mm512_loadu_si512(xr + 32 * v));
          acc[i][j] = _mm512_fmadd_ps(t, sv, acc[i][j]);
        }
      }
    }
    finish_quant_tile<MB, NB>(a, acc, m0, n0, 128.0f);
  }
};
template <int GC>
using Int4Tile = NibbleTile<GC, 4>;
template <int GC>
using Int6Tile = NibbleTile<GC, 6>;

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define QWENLM_HAVE_VNNI 1
// Integer path for bf16 activations (int8, int6 and int4), for CPUs where vdpbf16ps is slow: on Sapphire
// Rapids-class cores it issues every 2 cycles, while vpdpbusd (u8 x s8, four products per lane) issues ~1.5 per
// cycle, so the dpbf16 kernels above are compute-bound there at ~60% of DRAM bandwidth.
// Each activation row is written as a fixed-point integer x * 2^S (S per row, |x * 2^S| < 2^22) in three signed
// base-256 digits d2 d1 d0 ("planes", int8, each in [-128, 127]). Every bf16 element within 2^15 of the row's
// largest is represented exactly; smaller ones are rounded at 2^-23 of that largest (below the fp32 rounding
// of the dot product they join). The weight codes are the unsigned operand, as stored: int8 bytes directly,
// int4/int6 codes as nibble_codes gives them (the low-nibble and high-nibble planes of x pair with them). Per
// chunk and row, the three plane sums are exact int32s, combined as 65536 t2 + 256 t1 + t0 in fp32 and scaled by
// the group scale as in the kernels above; finish_quant_tile multiplies by 2^-S. Codes carry no offset (offset 0).
// x planes: int8 [Mv, 3, Kp], plane p holding digit p of every element in vnni_order within each chunk.
template <int GC, int BITS>
struct VnniTile {
  static constexpr int kMB = 4;
  static constexpr bool kScheduledOneRow = false;
  static constexpr int kNBFew = kNBFewQuant;
  static constexpr int64_t kChunk = BITS == 8 ? 64 : 128;
  using Args = QuantArgs;

  template <int MB, int NB>
  static void run(const Args& a, int64_t m0, int64_t n0) {
    if constexpr (BITS == 8 && GC == 1 && MB == 1) {
      if (a.group / kChunk > 1 && a.group / kChunk <= kMaxIntChunks) {
        if constexpr (NB % kIntRows == 0) {
          for (int r = 0; r < NB; r += kIntRows) run_int_groups<kIntRows>(a, m0, n0 + r);
          return;
        } else {
          return run_int_groups<1>(a, m0, n0);
        }
      }
    }
    __m512 acc[MB][NB];
    zero_acc(acc);
    const int8_t* x = static_cast<const int8_t*>(a.x);
    const int64_t row_bytes = code_bytes<BITS>(a.Kp), plane = a.Kp;
    const __m512 base2 = _mm512_set1_ps(65536.0f);
    ChunkGroups<GC> groups(a.group, kChunk);
    const QuantPrefetch<NB, BITS> prefetch(a, n0);

    for (int64_t k = 0; k < a.Kp; k += kChunk) {
      const int64_t g = groups.next(), kb = code_bytes<BITS>(k);
      prefetch.at(k);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        const uint8_t* p = a.q + (n0 + j) * row_bytes + kb;
        __m512i w0, w1;
        if constexpr (BITS == 8) {
          w0 = _mm512_loadu_si512(p);
        } else {
          nibble_codes<BITS>(p, w0, w1);
        }
        const __m512 sv = lane_scales<GC>(a.scales + (n0 + j) * a.G + g);
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) {
          const int8_t* xr = x + (m0 + i) * 3 * plane + k;
          __m512i t[3];
#pragma GCC unroll 3
          for (int p = 0; p < 3; ++p) {
            t[p] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xr + p * plane));
            if constexpr (BITS != 8) t[p] = _mm512_dpbusd_epi32(t[p], w1, _mm512_loadu_si512(xr + p * plane + 64));
          }
          if constexpr (BITS == 4) {
            // |t2| <= 8 * 15 * 128 per lane: 65536 t2 + 256 t1 + t0 fits in int32, one conversion.
            const __m512i T = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(_mm512_slli_epi32(t[2], 8), t[1]), 8), t[0]);
            acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(T), sv, acc[i][j]);
          } else {
            // |t1| <= 4 * 255 * 128 (int8) or 8 * 63 * 128 (int6) per lane: t1 * 256 + t0 stays inside int32.
            const __m512i t10 = _mm512_add_epi32(_mm512_slli_epi32(t[1], 8), t[0]);
            const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[2]), base2, _mm512_cvtepi32_ps(t10));
            acc[i][j] = _mm512_fmadd_ps(f, sv, acc[i][j]);
          }
        }
      }
    }
    finish_quant_tile<MB, NB>(a, acc, m0, n0, 0.0f);
  }

  // Decode (one activation row) with int8 groups spanning several chunks (per-channel int8, g128+): the three
  // plane sums stay int32 across the whole group and are converted and scaled once per group, so a chunk costs
  // its three vpdpbusd and nothing else (the per-chunk path spends as many ops again on conversions). Each
  // chunk adds at most 4 * 255 * 128 per lane, so kMaxIntChunks chunks cannot overflow. The group's integer sums
  // are exact, so this rounds less than the per-chunk path (it is not bit-identical to it).
  static constexpr int64_t kMaxIntChunks = (int64_t{1} << 31) / (4 * 255 * 128) - 1;

  template <int NB>
  static void run_int_groups(const Args& a, int64_t m0, int64_t n0) {
    alignas(64) float part[NB][16] = {};  // per-row fp32 partials, in memory: the registers hold the int32 sums
    const int8_t* x = static_cast<const int8_t*>(a.x) + m0 * 3 * a.Kp;
    const QuantPrefetch<NB, 8> prefetch(a, n0);
    const int64_t plane = a.Kp, chunks = a.group / kChunk;
    for (int64_t k0 = 0, g = 0; k0 < a.Kp; k0 += a.group, ++g) {
      __m512i t0[NB], t1[NB], t2[NB];  // separate arrays: GCC keeps these in registers, a [NB][3] one in memory
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) t0[j] = t1[j] = t2[j] = _mm512_setzero_si512();
      for (int64_t c = 0, k = k0; c < chunks; ++c, k += kChunk) {
        prefetch.at(k);
        const __m512i x0 = _mm512_loadu_si512(x + k), x1 = _mm512_loadu_si512(x + plane + k),
                      x2 = _mm512_loadu_si512(x + 2 * plane + k);
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) {
          const __m512i b = _mm512_loadu_si512(a.q + (n0 + j) * a.Kp + k);
          t0[j] = _mm512_dpbusd_epi32(t0[j], b, x0);
          t1[j] = _mm512_dpbusd_epi32(t1[j], b, x1);
          t2[j] = _mm512_dpbusd_epi32(t2[j], b, x2);
        }
      }
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        const __m512 f = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(t2[j]), _mm512_set1_ps(65536.0f),
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(t1[j]), _mm512_set1_ps(256.0f), _mm512_cvtepi32_ps(t0[j])));
        _mm512_store_ps(part[j], _mm512_fmadd_ps(f, _mm512_set1_ps(a.scales[(n0 + j) * a.G + g]),
                                                 _mm512_load_ps(part[j])));
      }
    }
    __m512 acc[1][NB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[0][j] = _mm512_load_ps(part[j]);
    finish_quant_tile<1, NB>(a, acc, m0, n0, 0.0f);
  }
};
template <int GC>
using Int8VnniTile = VnniTile<GC, 8>;
template <int GC>
using Int4VnniTile = VnniTile<GC, 4>;
template <int GC>
using Int6VnniTile = VnniTile<GC, 6>;
#endif

// ------------------------------------------------------------------------------------------------
// Activation preparation (small: M*K elements, done once per call).

// fp32 [M, K] -> [M, K32] where each 32-block is (even elements, odd elements), zero padded.
at::Tensor permute_even_odd(const at::Tensor& x, int64_t K32) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xp = at::empty({M, K32}, x.options().dtype(at::kFloat));
  const float* src = x.data_ptr<float>();
  float* dst = xp.data_ptr<float>();
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K32; k += 32) {
      const __m512 lo = _mm512_maskz_loadu_ps(tail_mask16(K - k), src + m * K + k);
      const __m512 hi = _mm512_maskz_loadu_ps(tail_mask16(K - k - 16), src + m * K + k + 16);
      _mm512_storeu_ps(dst + m * K32 + k, _mm512_permutex2var_ps(lo, even, hi));
      _mm512_storeu_ps(dst + m * K32 + k + 16, _mm512_permutex2var_ps(lo, odd, hi));
    }
  return xp;
}

// Round fp32 -> bf16 bits (nearest-even) for 16 lanes, and back.

// Source index (within a chunk) of each stored position, for GC groups per chunk (see the comment above
// QuantArgs). chunk = 4 vectors of E elements.
std::vector<int64_t> chunk_order(int64_t chunk, int GC) {
  const int64_t E = chunk / 4, per = E / GC, g = chunk / GC;
  std::vector<int64_t> order(chunk);
  for (int64_t v = 0; v < 4; ++v)
    for (int64_t e = 0; e < E; ++e) order[v * E + e] = g * (e / per) + per * v + e % per;
  return order;
}

// The word order Int8Bf16Tile's unpacks produce (see there): word 32u + 8L + i of a chunk is stored byte
// 16L + 8u + i, i.e. element 4L + 2u + i/4 of vector i%4 of the fp32 path's chunk order.
std::vector<int64_t> int8_bf16_order(int GC) {
  const std::vector<int64_t> order = chunk_order(64, GC);
  std::vector<int64_t> src_of(64);
  for (int64_t u = 0; u < 2; ++u)
    for (int64_t L = 0; L < 4; ++L)
      for (int64_t i = 0; i < 8; ++i) src_of[32 * u + 8 * L + i] = order[(i % 4) * 16 + 4 * L + 2 * u + i / 4];
  return src_of;
}

inline float sum_span(const float* p, int64_t n) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(tail_mask16(n - k), p + k));
  return _mm512_reduce_add_ps(s);
}

inline float sum_span(const bf16* p, int64_t n) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16)
    s = _mm512_add_ps(s, from_bf16_bits(_mm256_maskz_loadu_epi16(tail_mask16(n - k), p + k)));
  return _mm512_reduce_add_ps(s);
}

// One activation row for the quantized kernels: per-group sums of the natural row [K] into sums[G], and
// (unless dst is null) the row in kernel order into dst[Kp]: dst[c + e] = row[c + order[e]] per chunk,
// zero past K. An empty order means the natural order.
template <typename T>
void prepare_row(const T* row, int64_t K, int64_t Kp, int64_t group, const std::vector<int64_t>& order, T* dst,
                 float* sums) {
  for (int64_t g = 0, lo = 0; lo < Kp; ++g, lo += group) sums[g] = lo < K ? sum_span(row + lo, std::min(group, K - lo)) : 0.0f;
  if (dst == nullptr) return;
  if (order.empty()) {
    std::memcpy(dst, row, K * sizeof(T));
    std::memset(static_cast<void*>(dst + K), 0, (Kp - K) * sizeof(T));
    return;
  }
  const int64_t chunk = static_cast<int64_t>(order.size());
  for (int64_t c = 0; c < Kp; c += chunk)
    for (int64_t e = 0; e < chunk; ++e) {
      const int64_t src = c + order[e];
      dst[c + e] = src < K ? row[src] : T(0);
    }
}

// fp32 row -> three bf16 rows (hi, mid, lo) with hi + mid + lo == row exactly (each residual has at most 16,
// then 8, significant bits).
void split_three_bf16(const float* row, int64_t K, bf16* parts /* [3, K] */) {
  uint16_t* dst = reinterpret_cast<uint16_t*>(parts);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = tail_mask16(K - k);
    __m512 r = _mm512_maskz_loadu_ps(mk, row + k);
    for (int p = 0; p < 3; ++p) {
      const __m256i b = to_bf16_bits(r);
      _mm256_mask_storeu_epi16(dst + p * K + k, mk, b);
      r = _mm512_sub_ps(r, from_bf16_bits(b));
    }
  }
}

#ifdef QWENLM_HAVE_VNNI
// Position j of a chunk's activation plane pairs with chunk weight order[j] (see VnniTile). int8: byte 4p+v of
// a chunk is stored element 16v+p (pack_int8). int4: plane positions 0..63 pair with the low nibbles of bytes
// 0..63 and 64..127 with the high ones; byte 16L+8h+i holds stored elements 32h+8L+i and 64+32h+8L+i (pack_int4).
// Returned as the byte indices vpermb/vpermi2b take (every index < 128).
std::vector<uint8_t> vnni_order(int bits, int GC) {
  const int64_t chunk = bits == 8 ? 64 : 128;
  const std::vector<int64_t> stored = chunk_order(chunk, GC);
  std::vector<uint8_t> order(chunk);
  if (bits == 8) {
    for (int64_t p = 0; p < 16; ++p)
      for (int64_t v = 0; v < 4; ++v) order[4 * p + v] = stored[16 * v + p];
  } else {
    for (int64_t L = 0; L < 4; ++L)
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t i = 0; i < 8; ++i) {
          order[16 * L + 8 * h + i] = stored[32 * h + 8 * L + i];
          order[64 + 16 * L + 8 * h + i] = stored[64 + 32 * h + 8 * L + i];
        }
  }
  return order;
}

// One bf16 row -> its three digit planes (planes[p * Kp + ...], vnni_order within each chunk, zero past K), its
// per-group sums and the factor 2^-S that undoes the fixed-point scale.
void prepare_vnni_row(const bf16* row, int64_t K, int64_t Kp, int64_t group, const std::vector<uint8_t>& order,
                      int8_t* planes, std::vector<int8_t>& natural, float* sums, float* xscale) {
  prepare_row(row, K, Kp, group, {}, static_cast<bf16*>(nullptr), sums);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(row);
  __m512 mx = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16)
    mx = _mm512_max_ps(mx, _mm512_abs_ps(from_bf16_bits(_mm256_maskz_loadu_epi16(tail_mask16(K - k), src + k))));
  const float amax = _mm512_reduce_max_ps(mx);
  int e = 0;
  std::frexp(amax, &e);  // amax < 2^e
  const int S = std::clamp(22 - e, -126, 126);  // a NaN/inf row gives garbage, as any finite-math kernel would
  *xscale = std::ldexp(1.0f, -S);
  const __m512 mult = _mm512_set1_ps(std::ldexp(1.0f, S));
  natural.resize(3 * Kp);
  int8_t* nat = natural.data();
  for (int64_t k = 0; k < Kp; k += 16) {
    const __m512 v = from_bf16_bits(_mm256_maskz_loadu_epi16(tail_mask16(K - k), src + k));
    const __m512i xi = _mm512_cvtps_epi32(_mm512_mul_ps(v, mult));  // round to nearest even
    const __m512i d0 = _mm512_srai_epi32(_mm512_slli_epi32(xi, 24), 24);
    const __m512i r1 = _mm512_srai_epi32(_mm512_sub_epi32(xi, d0), 8);
    const __m512i d1 = _mm512_srai_epi32(_mm512_slli_epi32(r1, 24), 24);
    const __m512i d2 = _mm512_srai_epi32(_mm512_sub_epi32(r1, d1), 8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(nat + k), _mm512_cvtepi32_epi8(d0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(nat + Kp + k), _mm512_cvtepi32_epi8(d1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(nat + 2 * Kp + k), _mm512_cvtepi32_epi8(d2));
  }
  // Chunk order by byte permutes: 64 output bytes from one (int8) or two (int4) 64-byte sources.
  const int64_t chunk = static_cast<int64_t>(order.size());
  const __m512i idx0 = _mm512_loadu_si512(order.data());
  const __m512i idx1 = chunk == 128 ? _mm512_loadu_si512(order.data() + 64) : idx0;
  for (int p = 0; p < 3; ++p)
    for (int64_t c = 0; c < Kp; c += chunk) {
      const int8_t* from = nat + p * Kp + c;
      int8_t* to = planes + p * Kp + c;
      const __m512i lo = _mm512_loadu_si512(from);
      if (chunk == 64) {
        _mm512_storeu_si512(to, _mm512_permutexvar_epi8(idx0, lo));
      } else {
        const __m512i hi = _mm512_loadu_si512(from + 64);
        _mm512_storeu_si512(to, _mm512_permutex2var_epi8(lo, idx0, hi));
        _mm512_storeu_si512(to + 64, _mm512_permutex2var_epi8(lo, idx1, hi));
      }
    }
}
#endif

// Kp (padded weights per row) of packed codes q [N, code_bytes(Kp)].
int64_t padded_k(int bits, const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2, "q must be [N, bytes]");
  const int64_t bytes = q.size(1);
  TORCH_CHECK(bits != 6 || bytes % 3 == 0, "int6 rows are whole 96-byte chunks");
  return bits == 8 ? bytes : bits == 4 ? bytes * 2 : bytes / 3 * 4;
}

int groups_per_chunk(int64_t group, int64_t chunk) { return group >= chunk ? 1 : static_cast<int>(chunk / group); }

// ------------------------------------------------------------------------------------------------
// Op entry points. Shapes and dtypes are validated in Python; the TORCH_CHECKs guard memory safety.

Output make_output(at::Tensor& out, const c10::optional<at::Tensor>& bias_f32) {
  return Output{out.data_ptr(), out.scalar_type() == at::kBFloat16,
                bias_f32.has_value() ? bias_f32->data_ptr<float>() : nullptr, out.size(1)};
}

c10::optional<at::Tensor> bias_as_f32(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return c10::nullopt;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [N]");
  return bias->to(at::kFloat).contiguous();
}

// The ops take x as [..., K] and return [..., N]: flattening here is cheaper than in Python.
at::Tensor flatten_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "x must have a feature dimension");
  return x.reshape({-1, x.size(-1)}).contiguous();
}

at::Tensor unflatten_rows(const at::Tensor& out, const at::Tensor& x_in) {
  std::vector<int64_t> shape = x_in.sizes().vec();
  shape.back() = out.size(1);
  return out.view(shape);
}

at::Tensor linear_dense(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const at::Tensor x = flatten_rows(x_in);
  TORCH_CHECK(w.dim() == 2 && x.size(1) == w.size(1), "linear_dense: x [..., K], w [N, K]");
  TORCH_CHECK(w.is_contiguous(), "linear_dense: contiguous weight required");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  const auto b = bias_as_f32(bias, N);
  const Output o = make_output(out, b);
  if (M == 0 || N == 0) return unflatten_rows(out, x_in);
  if (x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16) {
    DenseBf16Tile::Args a{reinterpret_cast<const uint16_t*>(x.data_ptr<bf16>()),
                          reinterpret_cast<const uint16_t*>(w.data_ptr<bf16>()), K, o};
    parallel_tiles<DenseBf16Tile>(a, M, N);
  } else if (x.scalar_type() == at::kFloat && w.scalar_type() == at::kBFloat16) {
    const int64_t K32 = (K + 31) / 32 * 32;
    const at::Tensor xp = permute_even_odd(x, K32);
    DenseF32Bf16Tile::Args a{xp.data_ptr<float>(), reinterpret_cast<const uint16_t*>(w.data_ptr<bf16>()), K, K32, o};
    parallel_tiles<DenseF32Bf16Tile>(a, M, N);
  } else if (x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat) {
    DenseF32Tile::Args a{x.data_ptr<float>(), w.data_ptr<float>(), K, o};
    parallel_tiles<DenseF32Tile>(a, M, N);
  } else {
    TORCH_CHECK(false, "linear_dense: unsupported dtypes x=", x.scalar_type(), " w=", w.scalar_type());
  }
  return unflatten_rows(out, x_in);
}

void check_quantized(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros,
                     int64_t group, int64_t K, int64_t Kp) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), "x must be contiguous [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous(), "q must be contiguous uint8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "scales must be contiguous fp32");
  TORCH_CHECK(zeros.scalar_type() == at::kShort && zeros.is_contiguous(), "zeros must be contiguous int16");
  TORCH_CHECK(Kp >= K && group > 0 && Kp % group == 0, "bad padded K / group size");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == q.size(0) && scales.size(1) == Kp / group, "scales [N, G]");
  TORCH_CHECK(zeros.sizes() == scales.sizes(), "zeros must match scales");
}

// ------------------------------------------------------------------------------------------------
// Dequantisation to a dense [N, K] weight (the large-M path: dequantize, then torch's GEMM). Values are
// exactly the reference's fp32 (q - z) * s, then one rounding if the output is bf16.

// Codes of one chunk as floats, in stored order.
inline void decode_chunk_int8(const uint8_t* p, float* buf) {
  const __m512i d = _mm512_loadu_si512(p);
  const __m512i byte_mask = _mm512_set1_epi32(0xFF);
  for (int v = 0; v < 4; ++v)
    _mm512_storeu_ps(buf + 16 * v, _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(d, 8 * v), byte_mask)));
}

template <int BITS>
inline void decode_chunk_nibbles(const uint8_t* p, float* buf) {
  __m512i w[4];
  NibbleTile<1, BITS>::decode(p, w);  // bf16 words holding 128 + code
  const __m512 offset = _mm512_set1_ps(128.0f);
  for (int u = 0; u < 4; ++u)
    for (int h = 0; h < 2; ++h) {
      const __m256i words = h ? _mm512_extracti64x4_epi64(w[u], 1) : _mm512_castsi512_si256(w[u]);
      _mm512_storeu_ps(buf + 32 * u + 16 * h, _mm512_sub_ps(from_bf16_bits(words), offset));
    }
}

inline void decode_chunk(int bits, const uint8_t* p, float* buf) {
  switch (bits) {
    case 8: return decode_chunk_int8(p, buf);
    case 6: return decode_chunk_nibbles<6>(p, buf);
    default: return decode_chunk_nibbles<4>(p, buf);
  }
}

// The common layout (groups of whole chunks, K a multiple of the chunk: every Qwen linear at g128 or per
// channel) in one pass: a chunk's stored order is its natural order, so the decoded codes go straight to
// (q - z) * s and out. This is the large-M path's cost (a prefill dequantizes every weight once per
// forward): ~3.5x faster than the general loop below, same values.
template <typename Out>
void dequantize_rows_contiguous(const QuantArgs& a, int bits, Out* dst_all, int64_t N) {
  const int64_t chunk = bits == 8 ? 64 : 128, row_bytes = code_bytes(bits, a.Kp);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    alignas(64) float buf[128];
    for (int64_t n = n0; n < n1; ++n) {
      ChunkGroups<1> groups(a.group, chunk);
      Out* dst = dst_all + n * a.Kp;
      for (int64_t c = 0; c < a.Kp; c += chunk) {
        const int64_t g = groups.next();
        decode_chunk(bits, a.q + n * row_bytes + code_bytes(bits, c), buf);
        const __m512 zf = _mm512_set1_ps(static_cast<float>(a.zeros[n * a.G + g])), sf = _mm512_set1_ps(a.scales[n * a.G + g]);
        for (int64_t e = 0; e < chunk; e += 16) {
          const __m512 wv = _mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(buf + e), zf), sf);
          if constexpr (std::is_same_v<Out, float>) {
            _mm512_storeu_ps(dst + c + e, wv);
          } else {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c + e), to_bf16_bits(wv));
          }
        }
      }
    }
  });
}

// Stored element v*E + a*per + i of a chunk is weight g*a + per*v + i (see chunk_order): copy each piece of
// `per` elements to its natural place, dequantising with its group's zero and scale.
template <typename Out>
void dequantize_rows(const QuantArgs& a, int bits, at::Tensor& out, int64_t K) {
  const int64_t chunk = bits == 8 ? 64 : 128, E = chunk / 4, N = out.size(0);
  const int GC = groups_per_chunk(a.group, chunk);
  const int64_t per = E / GC, g_in_chunk = chunk / GC, row_bytes = code_bytes(bits, a.Kp);
  Out* dst_all = out.data_ptr<Out>();
  if (GC == 1 && K == a.Kp) {  // whole chunks per group, no padding: stored order is natural order
    dequantize_rows_contiguous<Out>(a, bits, dst_all, N);
    return;
  }
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    alignas(64) float buf[128];
    for (int64_t n = n0; n < n1; ++n) {
      const float* s = a.scales + n * a.G;
      const int16_t* z = a.zeros + n * a.G;
      Out* dst = dst_all + n * K;
      for (int64_t c = 0; c < a.Kp; c += chunk) {
        decode_chunk(bits, a.q + n * row_bytes + code_bytes(bits, c), buf);
        for (int64_t grp = 0; grp < GC; ++grp) {
          const int64_t g = GC > 1 ? c / a.group + grp : c / a.group;
          const __m512 zf = _mm512_set1_ps(static_cast<float>(z[g])), sf = _mm512_set1_ps(s[g]);
          for (int64_t v = 0; v < 4; ++v)
            for (int64_t i = 0; i < per; i += 16) {
              const int64_t natural = c + g_in_chunk * grp + per * v + i;
              if (natural >= K) continue;  // padding
              const int64_t cnt = std::min<int64_t>({16, per - i, K - natural});
              const __mmask16 mk = tail_mask16(cnt);
              const __m512 wv = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, buf + v * E + grp * per + i), zf), sf);
              if constexpr (std::is_same_v<Out, float>) {
                _mm512_mask_storeu_ps(dst + natural, mk, wv);
              } else {
                _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(dst + natural), mk, to_bf16_bits(wv));
              }
            }
        }
      }
    }
  });
}

// dequantize into `out` [N, K] (contiguous, fp32 or bf16): dequantized_linear reuses one buffer for its slabs.
at::Tensor& dequantize_out(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                           int64_t group, int64_t K, at::Tensor& out) {
  TORCH_CHECK(bits == 8 || bits == 6 || bits == 4, "bits must be 4, 6 or 8");
  const int64_t Kp = padded_k(static_cast<int>(bits), q), N = q.size(0);
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous(), "q must be contiguous uint8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && zeros.scalar_type() == at::kShort &&
                  zeros.is_contiguous() && scales.sizes() == zeros.sizes() && scales.size(0) == N &&
                  group > 0 && Kp % group == 0 && scales.size(1) == Kp / group && K <= Kp,
              "bad scales/zeros/group");
  const int64_t chunk = bits == 8 ? 64 : 128;
  const int GC = groups_per_chunk(group, chunk);
  TORCH_CHECK(Kp % chunk == 0 && (group % chunk == 0 || GC == 2 || GC == 4), "layout not supported by the kernel");
  const at::ScalarType dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype must be float32 or bfloat16");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == N && out.size(1) == K && out.is_contiguous() &&
                  out.device() == q.device(),
              "out must be a contiguous [N, K] tensor beside q");
  const QuantArgs a{nullptr, nullptr, q.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<int16_t>(),
                    Kp, Kp / group, group, 1, Output{}};
  if (dtype == at::kFloat) {
    dequantize_rows<float>(a, static_cast<int>(bits), out, K);
  } else {
    dequantize_rows<bf16>(a, static_cast<int>(bits), out, K);
  }
  return out;
}

at::Tensor dequantize_op(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                         int64_t group, int64_t K, at::ScalarType dtype) {
  at::Tensor out = at::empty({q.size(0), K}, q.options().dtype(dtype));
  return dequantize_out(q, scales, zeros, bits, group, K, out);
}

template <template <int> class Tile>
void run_quant(const QuantArgs& a, int64_t rows, int64_t N, int GC, int64_t rows_per_block) {
  switch (GC) {
    case 1: parallel_tiles<Tile<1>>(a, rows, N, rows_per_block); break;
    case 2: parallel_tiles<Tile<2>>(a, rows, N, rows_per_block); break;
    case 4: parallel_tiles<Tile<4>>(a, rows, N, rows_per_block); break;
    default: TORCH_CHECK(false, "unsupported groups per chunk ", GC);
  }
}

// Which kernels run quantized linears with bf16 activations: 0 = the dpbf16 tiles, 1 = the VNNI tiles (only
// where compiled). Chosen once per process by kernels/cpu.py from the CPU (set_quant_kernel); tests flip it to
// compare the two.
std::atomic<int64_t> g_quant_kernel{0};

int64_t set_quant_kernel(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 1, "set_quant_kernel: mode is -1 (query), 0 (dpbf16) or 1 (vnni)");
#ifndef QWENLM_HAVE_VNNI
  TORCH_CHECK(mode != 1, "set_quant_kernel: this build has no VNNI path (needs AVX512_VNNI and AVX512_VBMI)");
#endif
  return mode < 0 ? g_quant_kernel.load() : g_quant_kernel.exchange(mode);
}

bool use_vnni(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 && g_quant_kernel.load(std::memory_order_relaxed) == 1;
}

#ifdef QWENLM_HAVE_VNNI
// linear_int8/int4 for bf16 x on the VNNI path (x already validated, out allocated).
void linear_vnni(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros,
                 int64_t group, int64_t K, int64_t Kp, int bits, at::Tensor& out, const c10::optional<at::Tensor>& b) {
  const int64_t M = x.size(0), N = q.size(0), chunk = bits == 8 ? 64 : 128;
  const int GC = groups_per_chunk(group, chunk);
  const int64_t G = Kp / group;
  at::Tensor xsum = at::empty({M, G}, x.options().dtype(at::kFloat));
  at::Tensor xscale = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor planes = at::empty({M, 3, Kp}, x.options().dtype(at::kChar));
  const std::vector<uint8_t> order = vnni_order(bits, GC);
  std::vector<int8_t> natural;
  for (int64_t m = 0; m < M; ++m)
    prepare_vnni_row(x.data_ptr<bf16>() + m * K, K, Kp, group, order, planes.data_ptr<int8_t>() + m * 3 * Kp, natural,
                     xsum.data_ptr<float>() + m * G, xscale.data_ptr<float>() + m);
  QuantArgs a{planes.data_ptr<int8_t>(), xsum.data_ptr<float>(), q.data_ptr<uint8_t>(), scales.data_ptr<float>(),
              zeros.data_ptr<int16_t>(), Kp, G, group, 1, make_output(out, b)};
  a.xscale = xscale.data_ptr<float>();
  if (bits == 8) {
    run_quant<Int8VnniTile>(a, M, N, GC, Int8VnniTile<1>::kMB);
  } else if (bits == 6) {
    run_quant<Int6VnniTile>(a, M, N, GC, Int6VnniTile<1>::kMB);
  } else {
    run_quant<Int4VnniTile>(a, M, N, GC, Int4VnniTile<1>::kMB);
  }
}
#endif

at::Tensor linear_int8(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t group, int64_t K, const c10::optional<at::Tensor>& bias) {
  const at::Tensor x = flatten_rows(x_in);
  const int64_t Kp = q.size(1), N = q.size(0), M = x.size(0), chunk = Int8Tile<1>::kChunk;
  check_quantized(x, q, scales, zeros, group, K, Kp);
  TORCH_CHECK(Kp % chunk == 0 && (group % chunk == 0 || group == 32 || group == 16), "int8 kernel: bad group/Kp");
  at::Tensor out = at::empty({M, N}, x.options());
  const auto b = bias_as_f32(bias, N);
  if (M == 0 || N == 0) return unflatten_rows(out, x_in);
  const int GC = groups_per_chunk(group, chunk);
  const int64_t G = Kp / group;
#ifdef QWENLM_HAVE_VNNI
  if (use_vnni(x)) {
    linear_vnni(x, q, scales, zeros, group, K, Kp, 8, out, b);
    return unflatten_rows(out, x_in);
  }
#endif
  at::Tensor xsum = at::empty({M, G}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kBFloat16) {  // nibble-plane dpbf16 path
    at::Tensor xp = at::empty({M, Kp}, x.options());
    const std::vector<int64_t> order = int8_bf16_order(GC);
    for (int64_t m = 0; m < M; ++m)
      prepare_row(x.data_ptr<bf16>() + m * K, K, Kp, group, order, xp.data_ptr<bf16>() + m * Kp,
                  xsum.data_ptr<float>() + m * G);
    const QuantArgs a{xp.data_ptr<bf16>(), xsum.data_ptr<float>(), q.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                      zeros.data_ptr<int16_t>(), Kp, G, group, 1, make_output(out, b)};
    run_quant<Int8Bf16Tile>(a, M, N, GC, Int8Bf16Tile<1>::kMB);
  } else {  // exact fp32 path
    const bool as_is = GC == 1 && Kp == K;
    at::Tensor xp = as_is ? x : at::empty({M, Kp}, x.options());
    const std::vector<int64_t> order = GC > 1 ? chunk_order(chunk, GC) : std::vector<int64_t>{};
    for (int64_t m = 0; m < M; ++m)
      prepare_row(x.data_ptr<float>() + m * K, K, Kp, group, order, as_is ? nullptr : xp.data_ptr<float>() + m * Kp,
                  xsum.data_ptr<float>() + m * G);
    const QuantArgs a{xp.data_ptr<float>(), xsum.data_ptr<float>(), q.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                      zeros.data_ptr<int16_t>(), Kp, G, group, 1, make_output(out, b)};
    run_quant<Int8Tile>(a, M, N, GC, Int8Tile<1>::kMB);
  }
  return unflatten_rows(out, x_in);
}

// int4 and int6 (the same chunks, activations and tiles; int6 reads two more bits per code).
template <int BITS>
at::Tensor linear_nibbles(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t group, int64_t K, const c10::optional<at::Tensor>& bias) {
  using Tile = NibbleTile<1, BITS>;
  const at::Tensor x = flatten_rows(x_in);
  const int64_t Kp = padded_k(BITS, q), N = q.size(0), M = x.size(0), chunk = Tile::kChunk;
  check_quantized(x, q, scales, zeros, group, K, Kp);
  TORCH_CHECK(Kp % chunk == 0 && (group % chunk == 0 || group == 64 || group == 32), "int4/int6 kernel: bad group/Kp");
  at::Tensor out = at::empty({M, N}, x.options());
  const auto b = bias_as_f32(bias, N);
  if (M == 0 || N == 0) return unflatten_rows(out, x_in);
#ifdef QWENLM_HAVE_VNNI
  if (use_vnni(x)) {
    linear_vnni(x, q, scales, zeros, group, K, Kp, BITS, out, b);
    return unflatten_rows(out, x_in);
  }
#endif
  const int parts = x.scalar_type() == at::kFloat ? 3 : 1;
  const int GC = groups_per_chunk(group, chunk);
  const int64_t G = Kp / group, R = M * parts;
  const std::vector<int64_t> order = GC > 1 ? chunk_order(chunk, GC) : std::vector<int64_t>{};
  at::Tensor xsum = at::empty({R, G}, x.options().dtype(at::kFloat));
  const bool as_is = parts == 1 && GC == 1 && Kp == K;  // the kernel can read x itself
  at::Tensor xp = as_is ? x : at::empty({R, Kp}, x.options().dtype(at::kBFloat16));
  std::vector<bf16> split(parts == 3 ? 3 * K : 0);
  for (int64_t m = 0; m < M; ++m) {
    const bf16* rows = x.scalar_type() == at::kBFloat16 ? x.data_ptr<bf16>() + m * K : split.data();
    if (parts == 3) split_three_bf16(x.data_ptr<float>() + m * K, K, split.data());
    for (int p = 0; p < parts; ++p)
      prepare_row(rows + p * K, K, Kp, group, order, as_is ? nullptr : xp.data_ptr<bf16>() + (m * parts + p) * Kp,
                  xsum.data_ptr<float>() + (m * parts + p) * G);
  }
  const QuantArgs a{xp.data_ptr<bf16>(), xsum.data_ptr<float>(), q.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                    zeros.data_ptr<int16_t>(), Kp, G, group, parts, make_output(out, b)};
  // With three parts, one m-block is exactly the three parts of one output row.
  if constexpr (BITS == 4) {
    run_quant<Int4Tile>(a, R, N, GC, parts == 3 ? 3 : Tile::kMB);
  } else {
    run_quant<Int6Tile>(a, R, N, GC, parts == 3 ? 3 : Tile::kMB);
  }
  return unflatten_rows(out, x_in);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t group, int64_t K, const c10::optional<at::Tensor>& bias) {
  return linear_nibbles<4>(x, q, scales, zeros, group, K, bias);
}

at::Tensor linear_int6(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t group, int64_t K, const c10::optional<at::Tensor>& bias) {
  return linear_nibbles<6>(x, q, scales, zeros, group, K, bias);
}

}  // namespace

TORCH_LIBRARY(qwenlm_kernels, m) {
  m.def("linear_dense(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor q, Tensor scales, Tensor zeros, int group, int K, Tensor? bias) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor q, Tensor scales, Tensor zeros, int group, int K, Tensor? bias) -> Tensor");
  m.def("linear_int6(Tensor x, Tensor q, Tensor scales, Tensor zeros, int group, int K, Tensor? bias) -> Tensor");
  m.def("dequantize(Tensor q, Tensor scales, Tensor zeros, int bits, int group, int K, ScalarType dtype) -> Tensor");
  m.def("dequantize_out(Tensor q, Tensor scales, Tensor zeros, int bits, int group, int K, Tensor(a!) out)"
        " -> Tensor(a!)");
  define_layer_ops(m);  // cpu_layer_ops_torch.h
  m.def("set_quant_kernel(int mode) -> int", &set_quant_kernel);  // no tensors: one kernel for every backend
}

TORCH_LIBRARY_IMPL(qwenlm_kernels, CPU, m) {
  m.impl("linear_dense", &linear_dense);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("linear_int6", &linear_int6);
  m.impl("dequantize", &dequantize_op);
  m.impl("dequantize_out", &dequantize_out);
  impl_layer_ops(m);
}
