// The parts of the layer kernels that are the same for every instruction set (cpu_layer_ops.h for AVX-512 and
// cpu_layer_ops_avx2.h for AVX2 include it): where a one-token attention kernel finds token t's K/V row of one
// head and how it prefetches those rows, and SiLU-mul's scalar tail. Internal linkage, as the headers that
// include it.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace {
namespace attn {

// One head's K (and V) rows are a single stream each, too few loads in flight to reach DRAM bandwidth
// (~21 GB/s measured without this, against ~30 for the gemv kernels). So K is prefetched kAhead tokens ahead
// of the scores. A short head's V (up to kVWithScoresBytes: 256 tokens of bf16 at D = 128) is prefetched into
// L2 along with the scores and read from there right after. A longer one is prefetched kAhead tokens ahead of
// the weighted sum instead: along with the scores, V lines had left L2 before they were summed from ~1k tokens
// on (read from DRAM twice), and even at 512 tokens the second stream slowed the scores more than it saved
// (benchmarks/bench_attention.py, 2 threads, Zen 4: 1.07-1.11x at 512-16k tokens; V along with the scores
// stayed 6-10% faster at 32-128 tokens, hence the limit).
// Where token t's row of one head lives: StridedRows for a [B, n, T, D] view, PagedRows through a block table.
template <typename KV>
struct StridedRows {
  using type = KV;
  const KV* base;
  int64_t stride;
  inline const KV* operator()(int64_t t) const { return base + t * stride; }
  inline int64_t run(int64_t) const { return std::numeric_limits<int64_t>::max(); }  // rows from t on, `step` apart
  inline int64_t stream(int64_t) const { return std::numeric_limits<int64_t>::max(); }
  inline int64_t step() const { return stride; }
};
// log2 of a paged cache's block size (a power of two), PagedRows' `shift`.
inline int block_shift(int64_t block_size) {
  int shift = 0;
  while ((int64_t{1} << shift) < block_size) ++shift;
  return shift;
}
template <typename KV>
struct PagedRows {
  using type = KV;
  const KV* base;        // the pool, offset to this head
  const int32_t* table;  // this row's block ids
  int64_t block_stride;  // elements between blocks
  int64_t row_stride;    // elements between a block's tokens
  int shift;             // log2(block_size)
  int64_t blocks;        // entries in the table
  inline const KV* operator()(int64_t t) const {
    return base + table[t >> shift] * block_stride + (t & ((int64_t{1} << shift) - 1)) * row_stride;
  }
  inline int64_t run(int64_t t) const { return (int64_t{1} << shift) - (t & ((int64_t{1} << shift) - 1)); }
  // like run, and on through the following blocks while they follow in memory (blocks allocated in order)
  inline int64_t stream(int64_t t) const {
    int64_t n = run(t);
    if (block_stride != (int64_t{1} << shift) * row_stride) return n;
    for (int64_t j = t >> shift; j + 1 < blocks && table[j + 1] == table[j] + 1; ++j) n += int64_t{1} << shift;
    return n;
  }
  inline int64_t step() const { return row_stride; }
};

constexpr int64_t kAhead = 64;                    // tokens
constexpr int64_t kVWithScoresBytes = 64 * 1024;  // per head

template <typename Rows>
inline void prefetch_rows(const Rows& rows, int64_t first, int64_t count, int64_t D, int hint) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(typename Rows::type));
  const char* r = nullptr;
  int64_t left = 0;  // rows left in the current evenly spaced run
  for (int64_t i = 0; i < count; ++i, --left, r += rows.step() * static_cast<int64_t>(sizeof(typename Rows::type))) {
    if (left == 0) {
      r = reinterpret_cast<const char*>(rows(first + i));
      left = rows.run(first + i);
    }
    // asm, not _mm_prefetch: GCC 12 at -O2/-O3 drops prefetch builtins whose address depends on a load (the
    // paged rows' block table), leaving the paged kernel with no prefetching at all
    for (int64_t b = 0; b < row_bytes; b += 64) {
      if (hint == 0) {
        asm volatile("prefetcht0 %0" : : "m"(r[b]));
      } else {
        asm volatile("prefetcht1 %0" : : "m"(r[b]));
      }
    }
  }
}

}  // namespace attn

// a[i] <- T(a[i] * T(silu(g[i]))) for i in [from, n): ATen's scalar silu (std::exp), which it runs past the last
// whole run of vectors; silu_mul_into's tail in both headers.
template <typename T>
inline void silu_mul_tail(T* a, const T* g, int64_t from, int64_t n) {
  for (int64_t i = from; i < n; ++i) {
    const float x = static_cast<float>(g[i]);
    const T silu = static_cast<T>(x / (1.0f + std::exp(-x)));
    a[i] = static_cast<T>(static_cast<float>(a[i]) * static_cast<float>(silu));
  }
}

}  // namespace
