// The ops over the per-token layer pieces (one-token attention over a contiguous or paged cache, RMSNorm and
// RoPE over many rows, the last-dim argmax): tensor checks and threading around the row functions of whichever
// instruction-set header was included first (cpu_layer_ops.h or cpu_layer_ops_avx2.h). cpu_gemv.cpp and
// cpu_gemv_avx2.cpp each register them, under their own namespace.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, double scale,
                            const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1, "decode_attention: q must be [B, n, 1, D]");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes(), "decode_attention: k, v must be [B, n, T, D]");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "decode_attention: k and v dtypes differ");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: head dim must be contiguous");
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3);
  TORCH_CHECK(q_in.size(0) == B && q_in.size(1) == H && q_in.size(3) == D, "decode_attention: q/k shapes differ");
  TORCH_CHECK(T > 0, "decode_attention: no keys");
  const bool bf16_kv = k.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16_kv || k.scalar_type() == at::kFloat, "decode_attention: k/v must be bf16 or fp32");
  // bf16 q and K: the dot products run on the bf16 values themselves (exact products).
  const bool bf16_dot = bf16_kv && q_in.scalar_type() == at::kBFloat16;
  // The bf16 dot reads q as it is; the fp32 one reads an fp32 copy (made only then).
  at::Tensor q = bf16_dot ? q_in.contiguous() : q_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) {  // [B or 1, 1, 1, T] additive mask
    bias = bias_in->to(at::kFloat).contiguous();
    TORCH_CHECK(bias.numel() == T || bias.numel() == B * T, "decode_attention: bias must be [B or 1, 1, 1, T]");
  }
  const int64_t bias_rows = bias.defined() ? bias.numel() / T : 0;
  at::Tensor out = at::empty({B, H, 1, D}, q.options().dtype(at::kFloat));
  const float* qp = bf16_dot ? nullptr : q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> scores((T + 15) / 16 * 16);
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* mask = bias.defined() ? bias.data_ptr<float>() + (bias_rows == 1 ? 0 : b) * T : nullptr;
      const float* qh = bf16_dot ? nullptr : qp + bh * D;
      const uint16_t* qbh = bf16_dot ? reinterpret_cast<const uint16_t*>(q.data_ptr()) + bh * D : nullptr;
      if (bf16_kv) {
        const bf16* kb = reinterpret_cast<const bf16*>(k.data_ptr()) + b * k.stride(0) + h * k.stride(1);
        const bf16* vb = reinterpret_cast<const bf16*>(v.data_ptr()) + b * v.stride(0) + h * v.stride(1);
        attn::attend_head<bf16>(qh, qbh, attn::StridedRows<bf16>{kb, k.stride(2)},
                                attn::StridedRows<bf16>{vb, v.stride(2)}, T, D, sc, mask, scores.data(), op + bh * D);
      } else {
        const float* kb = k.data_ptr<float>() + b * k.stride(0) + h * k.stride(1);
        const float* vb = v.data_ptr<float>() + b * v.stride(0) + h * v.stride(1);
        attn::attend_head<float>(qh, nullptr, attn::StridedRows<float>{kb, k.stride(2)},
                                 attn::StridedRows<float>{vb, v.stride(2)}, T, D, sc, mask, scores.data(), op + bh * D);
      }
    }
  });
  return out.to(q_in.scalar_type());
}

// One-token attention over a paged KV cache: row b attends to its first context_lens[b] tokens, token t being row
// t % block_size of block block_tables[b][t / block_size] in the pools k/v [num_blocks, n, block_size, D] (head dim
// contiguous; block_size a power of two). The same arithmetic as decode_attention; no mask (lengths say it all).
at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1, "paged_decode_attention: q must be [B, n, 1, D]");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), "paged_decode_attention: k, v pools must be [blocks, n, bs, D]");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "paged_decode_attention: k and v dtypes differ");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "paged_decode_attention: head dim must be contiguous");
  TORCH_CHECK(k.stride(0) == v.stride(0) && k.stride(1) == v.stride(1) && k.stride(2) == v.stride(2),
              "paged_decode_attention: k and v pools must have the same layout");
  const int64_t B = q_in.size(0), H = k.size(1), bs = k.size(2), D = k.size(3), NB = k.size(0);
  TORCH_CHECK(bs > 0 && (bs & (bs - 1)) == 0, "paged_decode_attention: block size must be a power of two");
  TORCH_CHECK(q_in.size(1) == H && q_in.size(3) == D, "paged_decode_attention: q/pool shapes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.size(0) == B &&
                  block_tables.is_contiguous(), "paged_decode_attention: block_tables must be contiguous int32 [B, M]");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.numel() == B,
              "paged_decode_attention: context_lens must be int32 [B]");
  const at::Tensor lens = context_lens.contiguous();
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t M = block_tables.size(1);
  int64_t T_max = 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] > 0 && lp[b] <= M * bs, "paged_decode_attention: context length ", lp[b], " of row ", b,
                " is not in [1, ", M * bs, "]");
    for (int64_t j = 0; j < (lp[b] + bs - 1) / bs; ++j)
      TORCH_CHECK(tables[b * M + j] >= 0 && tables[b * M + j] < NB, "paged_decode_attention: block id out of range");
    T_max = std::max<int64_t>(T_max, lp[b]);
  }
  const bool bf16_kv = k.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16_kv || k.scalar_type() == at::kFloat, "paged_decode_attention: k/v must be bf16 or fp32");
  const bool bf16_dot = bf16_kv && q_in.scalar_type() == at::kBFloat16;
  at::Tensor q = bf16_dot ? q_in.contiguous() : q_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, 1, D}, q.options().dtype(at::kFloat));
  const float* qp = bf16_dot ? nullptr : q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int shift = attn::block_shift(bs);
  at::parallel_for(0, B * H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> scores((T_max + 15) / 16 * 16);
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / H, h = bh % H, T = lp[b];
      const int32_t* table = tables + b * M;
      const float* qh = bf16_dot ? nullptr : qp + bh * D;
      const uint16_t* qbh = bf16_dot ? reinterpret_cast<const uint16_t*>(q.data_ptr()) + bh * D : nullptr;
      if (bf16_kv) {
        const bf16* kb = reinterpret_cast<const bf16*>(k.data_ptr()) + h * k.stride(1);
        const bf16* vb = reinterpret_cast<const bf16*>(v.data_ptr()) + h * v.stride(1);
        attn::attend_head<bf16>(qh, qbh, attn::PagedRows<bf16>{kb, table, k.stride(0), k.stride(2), shift, M},
                                attn::PagedRows<bf16>{vb, table, v.stride(0), v.stride(2), shift, M}, T, D, sc, nullptr,
                                scores.data(), op + bh * D);
      } else {
        const float* kb = k.data_ptr<float>() + h * k.stride(1);
        const float* vb = v.data_ptr<float>() + h * v.stride(1);
        attn::attend_head<float>(qh, nullptr, attn::PagedRows<float>{kb, table, k.stride(0), k.stride(2), shift, M},
                                 attn::PagedRows<float>{vb, table, v.stride(0), v.stride(2), shift, M}, T, D, sc, nullptr,
                                 scores.data(), op + bh * D);
      }
    }
  });
  return out.to(q_in.scalar_type());
}

// ---------------------------------------------------------------------------------------------------
// RMSNorm and RoPE over many rows (cpu_layer_ops.h has the row functions and why they are kernels).
// ---------------------------------------------------------------------------------------------------
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t H, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(x + r * H, w, y + r * H, H, eps);
  });
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == w_in.scalar_type(), "rms_norm: x and weight dtypes differ");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  TORCH_CHECK(w.numel() == H, "rms_norm: weight must have x.size(-1) elements");
  at::Tensor y = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16) {
    rms_norm_rows(x.data_ptr<bf16>(), w.data_ptr<bf16>(), y.data_ptr<bf16>(), rows, H, static_cast<float>(eps));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "rms_norm: x must be bf16 or fp32");
    rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, H, static_cast<float>(eps));
  }
  return y;
}

// x [B, n, S, D] (any strides, unit stride on D); cos/sin fp32 [Bc, 1, S, d] with Bc = 1 (shared) or B (per
// row). Output contiguous.
template <typename T>
void rope_rows(const at::Tensor& x, const float* cos, const float* sin, int64_t Bc, int64_t d, T* out) {
  const int64_t B = x.size(0), n = x.size(1), S = x.size(2), D = x.size(3);
  const T* base = reinterpret_cast<const T*>(x.data_ptr());
  at::parallel_for(0, B * n * S, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (n * S), h = i / S % n, s = i % S;
      const int64_t cs = ((Bc == 1 ? 0 : b) * S + s) * d;
      rope_row(base + b * x.stride(0) + h * x.stride(1) + s * x.stride(2), cos + cs, sin + cs, d, D,
               out + ((b * n + h) * S + s) * D);
    }
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rope: x must be [B, n, S, D] with a contiguous head dim");
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "rope: cos/sin must be fp32");
  TORCH_CHECK(cos.dim() == 4 && cos.sizes() == sin.sizes() && cos.size(2) == x.size(2), "rope: cos/sin [Bc,1,S,d]");
  const int64_t Bc = cos.size(0), d = cos.size(3);
  TORCH_CHECK((Bc == 1 || Bc == x.size(0)) && d % 2 == 0 && d <= x.size(3), "rope: bad cos/sin shape");
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.scalar_type() == at::kBFloat16) {
    rope_rows(x, cos.data_ptr<float>(), sin.data_ptr<float>(), Bc, d, out.data_ptr<bf16>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "rope: x must be bf16 or fp32");
    rope_rows(x, cos.data_ptr<float>(), sin.data_ptr<float>(), Bc, d, out.data_ptr<float>());
  }
  return out;
}

// Greedy decoding's argmax over the vocabulary: argmax_impl::argmax_row (cpu_layer_ops.h).

at::Tensor argmax_last(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) > 0, "argmax_last: x must have a non-empty last dimension");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "argmax_last: fp32 or bf16");
  const at::Tensor x = x_in.reshape({-1, x_in.size(-1)}).contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      o[r] = x.scalar_type() == at::kFloat ? argmax_impl::argmax_row(x.data_ptr<float>() + r * n, n)
                                           : argmax_impl::argmax_row(x.data_ptr<bf16>() + r * n, n);
  });
  std::vector<int64_t> shape = x_in.sizes().vec();
  shape.pop_back();
  return out.view(shape);
}

// The ops' schemas and CPU kernels, for each library's TORCH_LIBRARY and TORCH_LIBRARY_IMPL blocks.
inline void define_layer_ops(torch::Library& m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? bias=None) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k, Tensor v, Tensor block_tables, Tensor context_lens, float scale)"
        " -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("argmax_last(Tensor x) -> Tensor");
}

inline void impl_layer_ops(torch::Library& m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("argmax_last", &argmax_last);
}

}  // namespace
