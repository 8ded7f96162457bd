// One decoding step of a whole Qwen model as a single native call (batch 1, one token; a contiguous KV cache
// or the serving engine's paged one).
//
// The Python step runs ~15 tensor ops per layer (norm, fused QKV, head split, RoPE, LogN, cache write,
// attention, head merge, c_proj, residual, norm, w1/w2, SiLU-mul, c_proj, residual): at one token per step,
// their interpreter and dispatch costs add ~5 ms to a 1.8B step whose weight reads take 30-100 ms. Here the
// same sequence runs in C++: the matrix products through cpu_gemv.cpp's kernels (called through the
// dispatcher), everything between them as plain loops over buffers the plan owns (cpu_layer_ops.h's RMSNorm,
// RoPE and attention, the very code the Python forward's kernels run, plus the residual adds and SiLU here).
// No tensor is allocated between two matrix products: between two weight streams the caches are cold, and
// each ATen call there cost ~5x what it costs warm. Same order, same roundings: the outputs equal the Python
// step's bit for bit.
//
// DecodePlan (torch.classes.qwenlm_kernels.DecodePlan) holds the model's tensors; qwenlm/generation/fused.py
// builds it (once per generation, or per engine) and checks what it may run. It is a library of its own
// (kernels/step.py builds it), so it reaches cpu_gemv.cpp's kernels through the dispatcher.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <optional>
#include <vector>

// Built twice (kernels/step.py): with AVX-512 next to cpu_gemv.cpp, and with AVX2 next to cpu_gemv_avx2.cpp on
// CPUs without AVX-512. The layer pieces come from the matching header, the matrix products from the matching
// library's ops (the very ones the Python forward calls on that CPU), and the class is registered in that
// library's namespace.
#if defined(__AVX512F__)
#include "cpu_layer_ops.h"
#define QWENLM_STEP_OPS qwenlm_kernels
#else
#include "cpu_layer_ops_avx2.h"
#define QWENLM_STEP_OPS qwenlm_avx2
#endif

namespace {

using OptTensor = std::optional<at::Tensor>;

#if defined(__AVX512F__)
// The matrix kernels of cpu_gemv.cpp, looked up once (they may live in another shared object of the same build).
struct Ops {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)> dense;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      int64_t, int64_t, const OptTensor&)>
      int8, int4, int6;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                      int64_t, at::ScalarType)>
      dequantize;

  static const Ops& get() {
    static const Ops ops = [] {
      auto& d = c10::Dispatcher::singleton();
      auto find = [&](const char* name) { return d.findSchemaOrThrow(name, ""); };
      return Ops{
          find("qwenlm_kernels::linear_dense").typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>(),
          find("qwenlm_kernels::linear_int8")
              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                int64_t, const OptTensor&)>(),
          find("qwenlm_kernels::linear_int4")
              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                int64_t, const OptTensor&)>(),
          find("qwenlm_kernels::linear_int6")
              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                int64_t, const OptTensor&)>(),
          find("qwenlm_kernels::dequantize")
              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                                at::ScalarType)>(),
      };
    }();
    return ops;
  }
};
#else
// The AVX2 build's matrix kernels, the ones kernels.linear / linear_quantized / dequantize run for one row on
// these CPUs (cpu_gemv_avx2.cpp): linear_bf16 for bf16 weights, linear_quantized, dequantize_out; fp32 weights
// go to oneDNN's fp32 linear as kernels.linear's torch path calls it (at::linear where oneDNN is missing). The
// last two run boxed (one embedding row per step; fp32 models).
struct Ops {
  using Quantized = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, int64_t, int64_t, const OptTensor&, bool);
  using Dense = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&);
  c10::TypedOperatorHandle<Dense> bf16_dense;
  c10::TypedOperatorHandle<Quantized> quantized;
  c10::OperatorHandle dequantize_out;
  std::optional<c10::OperatorHandle> onednn_f32;

  static const Ops& get() {
    static const Ops ops = [] {
      auto& d = c10::Dispatcher::singleton();
      auto find = [&](const char* name) { return d.findSchemaOrThrow(name, ""); };
      std::optional<c10::OperatorHandle> onednn;
      if (at::hasMKLDNN()) onednn = d.findSchema({"mkldnn::_linear_pointwise", ""});
      return Ops{find("qwenlm_avx2::linear_bf16").typed<Dense>(),
                 find("qwenlm_avx2::linear_quantized").typed<Quantized>(), find("qwenlm_avx2::dequantize_out"), onednn};
    }();
    return ops;
  }
};

// Runs a boxed op on `args`; returns its (single tensor) result.
inline at::Tensor call_boxed(const c10::OperatorHandle& op, std::vector<c10::IValue> args) {
  torch::jit::Stack stack(std::make_move_iterator(args.begin()), std::make_move_iterator(args.end()));
  op.callBoxed(&stack);
  return stack.back().toTensor();
}
#endif

// A linear layer as the Python wrappers call it: dense (kernels.linear) or weight-only int8/int6/int4
// (kernels.linear_quantized), with QuantLinear's act-order input permutation and its bias in x's dtype.
struct LinearSpec {
  enum Kind : int64_t { kDense = 0, kInt8 = 1, kInt4 = 2, kInt6 = 3 };
  int64_t kind = kDense;
  at::Tensor weight;  // dense [N, K]; quantized: packed codes
  at::Tensor scales, zeros;
  at::Tensor order;  // AVX2: the codes' load order (cpu.py's _avx2_order)
  OptTensor bias, perm;
  int64_t group = 0, in_features = 0;

  at::Tensor operator()(const at::Tensor& x_in, const Ops& ops) const {
    const at::Tensor x = perm.has_value() ? x_in.index_select(-1, *perm) : x_in;
#if defined(__AVX512F__)
    switch (kind) {
      case kDense: return ops.dense.call(x, weight, bias);
      case kInt8: return ops.int8.call(x, weight, scales, zeros, group, in_features, bias);
      case kInt6: return ops.int6.call(x, weight, scales, zeros, group, in_features, bias);
      default: return ops.int4.call(x, weight, scales, zeros, group, in_features, bias);
    }
#else
    if (kind != kDense) {
      const int64_t bits = kind == kInt8 ? 8 : kind == kInt6 ? 6 : 4;
      return ops.quantized.call(x, order, weight, scales, zeros, bits, group, bias, false);
    }
    if (weight.scalar_type() == at::kBFloat16) return ops.bf16_dense.call(x, weight, bias);
    if (!ops.onednn_f32.has_value()) return at::linear(x, weight, bias);
    const c10::IValue b = bias.has_value() ? c10::IValue(*bias) : c10::IValue();
    return call_boxed(*ops.onednn_f32, {x, weight, b, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                                        std::string()});
#endif
  }
};

struct LayerSpec {
  at::Tensor ln_1, ln_2;
  LinearSpec c_attn, attn_proj, w1, w2, mlp_proj;
};

// The token embedding: a dense table [V, H] in the model dtype (nn.Embedding) or QuantEmbedding's int8/int4
// codes, one row dequantized per lookup by the same kernel its forward calls.
struct EmbeddingSpec {
  int64_t bits = 0;  // 0: dense
  at::Tensor table;  // dense [V, H]; quantized: packed codes [V, *]
  at::Tensor scales, zeros;
  at::Tensor order;  // AVX2: the codes' load order
  int64_t group = 0, in_features = 0;

  int64_t rows() const { return table.size(0); }

  // Row `token` into x [H] (model dtype).
  template <typename T>
  void lookup(int64_t token, T* x, const Ops& ops) const {
    if (bits == 0) {
      std::memcpy(x, table.data_ptr<T>() + token * table.stride(0), in_features * sizeof(T));
      return;
    }
#if defined(__AVX512F__)
    const at::Tensor row = ops.dequantize.call(table.narrow(0, token, 1), scales.narrow(0, token, 1),
                                               zeros.narrow(0, token, 1), bits, group, in_features,
                                               c10::CppTypeToScalarType<T>::value);
#else
    const at::Tensor row = at::empty({1, in_features}, table.options().dtype(c10::CppTypeToScalarType<T>::value));
    call_boxed(ops.dequantize_out, {order, table.narrow(0, token, 1), scales.narrow(0, token, 1),
                                    zeros.narrow(0, token, 1), bits, group, in_features, row});
#endif
    std::memcpy(x, row.data_ptr<T>(), in_features * sizeof(T));
  }
};

// Reads the flat (tensors, ints) description that fused_decode.py writes, front to back.
struct Reader {
  const std::vector<at::Tensor>& tensors;
  const std::vector<int64_t>& ints;
  size_t t = 0, i = 0;

  at::Tensor tensor() {
    TORCH_CHECK(t < tensors.size(), "DecodePlan: too few tensors");
    return tensors[t++];
  }
  int64_t integer() {
    TORCH_CHECK(i < ints.size(), "DecodePlan: too few ints");
    return ints[i++];
  }
  // ints: bits (0 dense), group, in_features; tensors: table | (codes, scales, zeros[, order on AVX2])
  EmbeddingSpec embedding() {
    EmbeddingSpec s;
    s.bits = integer();
    TORCH_CHECK(s.bits == 0 || s.bits == 4 || s.bits == 8, "DecodePlan: bad embedding bits");
    s.group = integer();
    s.in_features = integer();
    s.table = tensor();
    if (s.bits != 0) {
      s.scales = tensor();
      s.zeros = tensor();
#if !defined(__AVX512F__)
      s.order = tensor();
#endif
    }
    return s;
  }
  // ints: kind, has_bias, has_perm, group, in_features; tensors: weight | (codes, scales, zeros[, order on AVX2]),
  // bias?, perm?
  LinearSpec linear() {
    LinearSpec s;
    s.kind = integer();
    TORCH_CHECK(s.kind >= LinearSpec::kDense && s.kind <= LinearSpec::kInt6, "DecodePlan: bad linear kind");
    const bool has_bias = integer() != 0, has_perm = integer() != 0;
    s.group = integer();
    s.in_features = integer();
    s.weight = tensor();
    if (s.kind != LinearSpec::kDense) {
      s.scales = tensor();
      s.zeros = tensor();
#if !defined(__AVX512F__)
      s.order = tensor();
#endif
    }
    if (has_bias) s.bias = tensor();
    if (has_perm) s.perm = tensor();
    return s;
  }
};

// Seconds spent in each part of the step, summed over steps while profiling is on.
enum Part { kLinear = 0, kAttention = 1, kOther = 2, kParts = 3 };

// Where one layer's K/V rows live: a contiguous cache [1, n, capacity, D] (Strided) or the engine's pools
// [num_blocks, n, block_size, D] read through a block table (Paged).
struct StridedCache {
  int64_t pos;
  template <typename T>
  T* row(const at::Tensor& c, int64_t h) const {
    return reinterpret_cast<T*>(c.data_ptr()) + h * c.stride(1) + pos * c.stride(2);
  }
  template <typename T>
  attn::StridedRows<T> rows(const at::Tensor& c, int64_t h) const {
    return {reinterpret_cast<const T*>(c.data_ptr()) + h * c.stride(1), c.stride(2)};
  }
};
struct PagedCache {
  const int32_t* table;
  int64_t blocks, block, slot;
  int shift;
  template <typename T>
  T* row(const at::Tensor& c, int64_t h) const {
    return reinterpret_cast<T*>(c.data_ptr()) + block * c.stride(0) + h * c.stride(1) + slot * c.stride(2);
  }
  template <typename T>
  attn::PagedRows<T> rows(const at::Tensor& c, int64_t h) const {
    return {reinterpret_cast<const T*>(c.data_ptr()) + h * c.stride(1), table, c.stride(0), c.stride(2), shift, blocks};
  }
};

class DecodePlan : public torch::CustomClassHolder {
 public:
  // ints: num_layers, num_heads, head_dim, use_logn, seq_length, the embedding's 3 (see Reader), then one group
  // of 5 per linear; floats: the norms' epsilon. Tensors: the embedding's; per layer ln_1, c_attn, attn.c_proj,
  // ln_2, w1, w2, mlp.c_proj; then ln_f and lm_head.
  DecodePlan(std::vector<at::Tensor> tensors, std::vector<int64_t> ints, std::vector<double> floats) {
    Reader r{tensors, ints};
    const int64_t layers = r.integer();
    n_head_ = r.integer();
    head_dim_ = r.integer();
    use_logn_ = r.integer() != 0;
    seq_length_ = r.integer();
    TORCH_CHECK(floats.size() == 1, "DecodePlan: floats must be [eps]");
    eps_ = floats[0];
    embedding_ = r.embedding();
    for (int64_t l = 0; l < layers; ++l) {
      LayerSpec s;
      s.ln_1 = r.tensor();
      s.c_attn = r.linear();
      s.attn_proj = r.linear();
      s.ln_2 = r.tensor();
      s.w1 = r.linear();
      s.w2 = r.linear();
      s.mlp_proj = r.linear();
      layers_.push_back(std::move(s));
    }
    ln_f_ = r.tensor();
    lm_head_ = r.linear();
    TORCH_CHECK(r.t == tensors.size() && r.i == ints.size(), "DecodePlan: unused arguments");
    const at::ScalarType dtype = ln_f_.scalar_type();
    TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "DecodePlan: the model must be bf16 or fp32");
    for (const LayerSpec& s : layers_)
      TORCH_CHECK(s.ln_1.scalar_type() == dtype && s.ln_2.scalar_type() == dtype && s.ln_1.is_contiguous() &&
                      s.ln_2.is_contiguous() && s.ln_1.numel() == ln_f_.numel() && s.ln_2.numel() == ln_f_.numel(),
                  "DecodePlan: every norm weight must be a contiguous [H] vector in the model dtype");
    TORCH_CHECK(ln_f_.is_contiguous(), "DecodePlan: ln_f must be contiguous");
    TORCH_CHECK(embedding_.in_features == ln_f_.numel() && embedding_.table.dim() == 2 &&
                    (embedding_.bits != 0 || (embedding_.table.scalar_type() == dtype && embedding_.table.stride(1) == 1 &&
                                              embedding_.table.size(1) == ln_f_.numel())),
                "DecodePlan: the embedding must be [V, H] in the model dtype, rows contiguous, or quantized codes");
    // The buffers every step reuses: residual stream, normed input, merged heads and q (model dtype); the
    // attention output (fp32, as the kernel writes it).
    const at::TensorOptions opts = ln_f_.options();
    x_ = at::empty({1, ln_f_.numel()}, opts);
    h_ = at::empty({1, ln_f_.numel()}, opts);
    y_ = at::empty({1, n_head_ * head_dim_}, opts);
    q_ = at::empty({n_head_, head_dim_}, opts);
    att_ = at::empty({n_head_, head_dim_}, opts.dtype(at::kFloat));
  }

  // The caches the following steps run on, one key and one value buffer per layer: a contiguous KVCache's
  // [1, n, capacity, D] buffers, or the serving engine's pools [num_blocks, n, block_size, D]. Bound once (and
  // again when the cache grows into new buffers), not passed per step: converting 2 x layers tensors from
  // Python on every call cost ~0.2 ms per token.
  void bind(std::vector<at::Tensor> keys, std::vector<at::Tensor> values) {
    std::lock_guard<std::mutex> guard(mutex_);
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(),
                "DecodePlan.bind: one key and one value buffer per layer");
    for (size_t l = 0; l < keys.size(); ++l) {
      const at::Tensor &kc = keys[l], &vc = values[l];
      TORCH_CHECK(kc.dim() == 4 && kc.size(1) == n_head_ && kc.size(3) == head_dim_ && kc.sizes() == keys[0].sizes() &&
                      vc.sizes() == kc.sizes() && kc.strides() == keys[0].strides() &&
                      vc.strides() == keys[0].strides() && kc.scalar_type() == ln_f_.scalar_type() &&
                      vc.scalar_type() == kc.scalar_type() && kc.stride(3) == 1 && kc.device().is_cpu() &&
                      vc.device().is_cpu(),
                  "DecodePlan.bind: layer ", l, "'s cache does not fit (shape ", kc.sizes(), ", ", kc.scalar_type(),
                  "; expected [*, ", n_head_, ", *, ", head_dim_, "] in ", ln_f_.scalar_type(),
                  ", every layer alike, head dim contiguous)");
    }
    keys_ = std::move(keys);
    values_ = std::move(values);
  }

  // Logits [1, V] (model dtype) of `token` at cache position `pos` of the bound contiguous cache, whose K/V it
  // writes at `pos`. inv_freq: fp32 [1, rotary_dim / 2] with the prefill's NTK alpha.
  at::Tensor step(int64_t token, int64_t pos, at::Tensor inv_freq) {
    std::lock_guard<std::mutex> guard(mutex_);
    TORCH_CHECK(!keys_.empty() && keys_[0].size(0) == 1, "DecodePlan.step: bind a one-row cache first");
    TORCH_CHECK(pos >= 0 && pos < keys_[0].size(2), "DecodePlan.step: position ", pos, " is outside the cache (",
                keys_[0].size(2), " rows)");
    return run(token, pos, inv_freq, StridedCache{pos});
  }

  // Greedy decoding's step: the index of the largest of the first `limit` logits (all when limit <= 0 or past
  // the vocabulary), as argmax_last picks it from step's logits. Returning an int instead of the logits saves
  // greedy decoding the tensor ops that slice the logits and take their argmax from Python, each ~50 us on
  // caches the weight streams have just flushed.
  int64_t step_argmax(int64_t token, int64_t pos, at::Tensor inv_freq, int64_t limit) {
    return argmax_below(step(token, pos, inv_freq), limit);
  }

  // step_paged's greedy counterpart, as step_argmax is step's.
  int64_t step_paged_argmax(int64_t token, int64_t pos, at::Tensor inv_freq, at::Tensor table, int64_t limit) {
    return argmax_below(step_paged(token, pos, inv_freq, table), limit);
  }

  // The same step over the bound paged pools: the token's K/V go to slot pos % block_size of block
  // table[pos / block_size], and attention reads positions [0, pos] through `table` (int32 [1, blocks]), as
  // PagedBatch and paged_decode_attention do.
  at::Tensor step_paged(int64_t token, int64_t pos, at::Tensor inv_freq, at::Tensor table) {
    std::lock_guard<std::mutex> guard(mutex_);
    TORCH_CHECK(!keys_.empty(), "DecodePlan.step_paged: bind the pools first");
    TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == 1 && table.is_contiguous(),
                "DecodePlan.step_paged: table must be contiguous int32 [1, blocks]");
    const int64_t bs = keys_[0].size(2), num_blocks = keys_[0].size(0);
    TORCH_CHECK(bs > 0 && (bs & (bs - 1)) == 0, "DecodePlan.step_paged: block size must be a power of two");
    TORCH_CHECK(pos >= 0 && pos / bs < table.size(1), "DecodePlan.step_paged: position ", pos, " has no block");
    const int32_t* ids = table.data_ptr<int32_t>();
    for (int64_t j = 0; j <= pos / bs; ++j)
      TORCH_CHECK(ids[j] >= 0 && ids[j] < num_blocks, "DecodePlan.step_paged: block id ", ids[j], " out of range");
    const int shift = attn::block_shift(bs);
    return run(token, pos, inv_freq, PagedCache{ids, table.size(1), ids[pos / bs], pos % bs, shift});
  }

 private:
  // (Callers hold mutex_: the buffers and the bound cache are the plan's.)
  template <typename Cache>
  at::Tensor run(int64_t token, int64_t pos, const at::Tensor& inv_freq, const Cache& cache) {
    TORCH_CHECK(token >= 0 && token < embedding_.rows(), "DecodePlan: token id ", token, " is outside the embedding (",
                embedding_.rows(), " rows)");
    if (ln_f_.scalar_type() == at::kBFloat16) return run_typed<bf16>(token, pos, inv_freq, cache);
    return run_typed<float>(token, pos, inv_freq, cache);
  }

  static int64_t argmax_below(const at::Tensor& logits, int64_t limit) {
    const int64_t V = logits.size(-1), n = limit > 0 ? std::min(limit, V) : V;
    if (logits.scalar_type() == at::kBFloat16) return argmax_impl::argmax_row(logits.data_ptr<bf16>(), n);
    return argmax_impl::argmax_row(logits.data_ptr<float>(), n);
  }

  // RoPE's cos/sin rows [rot] at one position, and its LogN factor when LogN applies there (past seq_length).
  struct RopeRow {
    const float *cos, *sin;
    int64_t rot;
    bool use_logn;
    float logn;
  };

  // The rows at `pos`, from a table of kRopeBlock positions computed by qwen.py's rope_cos_sin_at and
  // logn_factors ops at once (torch's cos, sin and log give each element the same value whatever the tensor
  // around it, so a row of the table equals what those ops give for the one position). Seven ATen calls per
  // token between weight streams, on cold caches, cost ~0.1 ms; now one call every kRopeBlock tokens.
  RopeRow rope_at(int64_t pos, const at::Tensor& inv_freq) {
    TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 2 && inv_freq.size(0) == 1 &&
                    inv_freq.is_contiguous() && 2 * inv_freq.size(1) <= head_dim_,
                "DecodePlan: inv_freq must be contiguous fp32 [1, rotary_dim / 2] with rotary_dim <= head_dim");
    const int64_t half = inv_freq.size(1);
    const bool cached = rope_start_ >= 0 && pos >= rope_start_ && pos < rope_start_ + kRopeBlock &&
                        rope_inv_.numel() == half &&
                        std::memcmp(rope_inv_.data_ptr<float>(), inv_freq.data_ptr<float>(), half * sizeof(float)) == 0;
    if (!cached) {
      rope_inv_ = inv_freq.view({half}).clone();
      const at::Tensor positions = at::arange(pos, pos + kRopeBlock, at::kLong);
      const at::Tensor freqs = positions.to(at::kFloat).view({-1, 1}) * inv_freq;  // [block, rot / 2]
      const at::Tensor emb = at::cat({freqs, freqs}, -1);
      rope_cos_ = emb.cos().contiguous();
      rope_sin_ = emb.sin().contiguous();
      // LogN: log(p + 1) / log(seq_length) in double, to fp32, applied in the model dtype (q * logn.type_as(q))
      rope_logn_ = at::div(at::log(positions.to(at::kDouble) + 1), std::log(static_cast<double>(seq_length_)))
                       .to(at::kFloat)
                       .to(ln_f_.scalar_type())
                       .to(at::kFloat)
                       .contiguous();
      rope_start_ = pos;
    }
    const int64_t i = pos - rope_start_, rot = 2 * half;
    const bool use_logn = use_logn_ && pos + 1 > seq_length_;
    return {rope_cos_.data_ptr<float>() + i * rot, rope_sin_.data_ptr<float>() + i * rot, rot, use_logn,
            rope_logn_.data_ptr<float>()[i]};
  }

  // The layers, final norm and lm_head.
  template <typename T, typename Cache>
  at::Tensor run_typed(int64_t token, int64_t pos, const at::Tensor& inv_freq, const Cache& cache) {
    const Ops& ops = Ops::get();
    const int64_t n = n_head_, D = head_dim_, H = ln_f_.numel();
    auto clock = Clock(profiling_);

    const RopeRow rope = rope_at(pos, inv_freq);
    const float *cos = rope.cos, *sin = rope.sin;
    const int64_t rot = rope.rot;
    const size_t scores_len = static_cast<size_t>(n) * ((pos + 1 + 15) / 16 * 16);
    if (scores_.size() < scores_len) scores_.resize(scores_len);
    T *x = x_.data_ptr<T>(), *h = h_.data_ptr<T>(), *y = y_.data_ptr<T>(), *q = q_.data_ptr<T>();
    float* att = att_.data_ptr<float>();
    embedding_.lookup(token, x, ops);  // the residual stream, updated in place
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
    const float eps = static_cast<float>(eps_);
    // One thread attends to every head while the cache is short (an OpenMP fork costs more than the work).
    const int64_t head_grain = pos + 1 < 64 ? n : 1;
    clock.lap(kOther);

    for (size_t l = 0; l < layers_.size(); ++l) {
      const LayerSpec& s = layers_[l];
      rms_norm_row(x, s.ln_1.data_ptr<T>(), h, H, eps);
      clock.lap(kOther);
      const at::Tensor qkv_t = s.c_attn(h_, ops);  // [1, 3nD]: Q | K | V
      clock.lap(kLinear);
      const T* qkv = qkv_t.data_ptr<T>();
      const at::Tensor &kc = keys_[l], &vc = values_[l];
      for (int64_t i = 0; i < n; ++i) {  // RoPE on q (then LogN) and k; K post-RoPE and V go to the cache
        rope_row(qkv + i * D, cos, sin, rot, D, q + i * D);
        rope_row(qkv + (n + i) * D, cos, sin, rot, D, cache.template row<T>(kc, i));
        std::memcpy(cache.template row<T>(vc, i), qkv + (2 * n + i) * D, D * sizeof(T));
      }
      if (rope.use_logn) scale_into(q, rope.logn, n * D);
      clock.lap(kOther);
      const int64_t len = pos + 1;
      const float* qf = nullptr;
      if constexpr (std::is_same_v<T, float>) qf = q;
      at::parallel_for(0, n, head_grain, [&](int64_t h0, int64_t h1) {
        for (int64_t i = h0; i < h1; ++i) {
          // bf16 q and K: the dot products run on the bf16 values themselves, as decode_attention does
          const uint16_t* qb = std::is_same_v<T, bf16> ? reinterpret_cast<const uint16_t*>(q + i * D) : nullptr;
          attn::attend_head<T>(qf ? qf + i * D : nullptr, qb, cache.template rows<T>(kc, i),
                               cache.template rows<T>(vc, i), len, D, scale, nullptr,
                               scores_.data() + i * (scores_len / n), att + i * D);
        }
      });
      narrow_into(y, att, n * D);
      clock.lap(kAttention);
      const at::Tensor o = s.attn_proj(y_, ops);
      clock.lap(kLinear);
      add_into(x, o.data_ptr<T>(), H);
      rms_norm_row(x, s.ln_2.data_ptr<T>(), h, H, eps);
      clock.lap(kOther);
      at::Tensor a = s.w1(h_, ops);
      const at::Tensor g = s.w2(h_, ops);
      clock.lap(kLinear);
      if (a.numel() < 32768) {
        silu_mul_into(a.data_ptr<T>(), g.data_ptr<T>(), a.numel());
      } else {
        a.mul_(at::silu(g));
      }
      clock.lap(kOther);
      const at::Tensor mo = s.mlp_proj(a, ops);
      clock.lap(kLinear);
      add_into(x, mo.data_ptr<T>(), H);
    }
    rms_norm_row(x, ln_f_.data_ptr<T>(), h, H, eps);
    clock.lap(kOther);
    at::Tensor logits = lm_head_(h_, ops);
    clock.lap(kLinear);
    if (profiling_) {
      for (int p = 0; p < kParts; ++p) seconds_[p] += clock.seconds[p];
      ++steps_;
    }
    return logits;
  }

 public:
  void set_profiling(bool on) {
    profiling_ = on;
    seconds_ = {0.0, 0.0, 0.0};
    steps_ = 0;
  }
  // [steps, linear s, attention s, other s] since set_profiling(true).
  std::vector<double> profile() const { return {static_cast<double>(steps_), seconds_[0], seconds_[1], seconds_[2]}; }

 private:
  struct Clock {
    bool on;
    std::chrono::steady_clock::time_point last;
    std::vector<double> seconds = {0.0, 0.0, 0.0};
    explicit Clock(bool on) : on(on), last(on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{}) {}
    void lap(Part part) {
      if (!on) return;
      const auto now = std::chrono::steady_clock::now();
      seconds[part] += std::chrono::duration<double>(now - last).count();
      last = now;
    }
  };

  std::vector<LayerSpec> layers_;
  EmbeddingSpec embedding_;
  at::Tensor ln_f_;
  at::Tensor x_, h_, y_, q_, att_;  // per-step buffers (see the constructor)
  static constexpr int64_t kRopeBlock = 256;
  at::Tensor rope_inv_, rope_cos_, rope_sin_, rope_logn_;  // see rope_at: [rot / 2], [block, rot] x 2, [block]
  int64_t rope_start_ = -1;                                 // the table's first position (-1: none yet)
  std::vector<float> scores_;           // attention scores, one row per head
  std::vector<at::Tensor> keys_, values_;  // the bound cache (see bind)
  std::mutex mutex_;
  LinearSpec lm_head_;
  int64_t n_head_ = 0, head_dim_ = 0, seq_length_ = 0;
  bool use_logn_ = false;
  double eps_ = 1e-6;
  bool profiling_ = false;
  std::vector<double> seconds_ = {0.0, 0.0, 0.0};
  int64_t steps_ = 0;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(QWENLM_STEP_OPS, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("bind", &DecodePlan::bind)
      .def("step", &DecodePlan::step)
      .def("step_argmax", &DecodePlan::step_argmax)
      .def("step_paged", &DecodePlan::step_paged)
      .def("step_paged_argmax", &DecodePlan::step_paged_argmax)
      .def("set_profiling", &DecodePlan::set_profiling)
      .def("profile", &DecodePlan::profile);
}
