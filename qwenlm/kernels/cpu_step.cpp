// One decoding step of a whole Qwen model as a single native call (batch 1, one token; a contiguous KV cache
// or the serving engine's paged one).
//
// The Python step runs ~15 tensor ops per layer (norm, fused QKV, head split, RoPE, LogN, cache write,
// attention, head merge, c_proj, residual, norm, w1/w2, SiLU-mul, c_proj, residual): at one token per step,
// their interpreter and dispatch costs add ~5 ms to a 1.8B step whose weight reads take 30-100 ms. Here the
// same sequence runs in C++ over the same kernels (cpu_gemv.cpp's ops, called through the dispatcher) and the
// same ATen functions for the elementwise parts, in the same order with the same roundings, so its outputs
// equal the Python step's bit for bit.
//
// DecodePlan (torch.classes.qwenlm_kernels.DecodePlan) holds the model's tensors; qwenlm/generation/fused.py
// builds it (once per generation, or per engine) and checks what it may run. It is a library of its own
// (kernels/step.py builds it), so it reaches cpu_gemv.cpp's kernels through the dispatcher.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace {

using OptTensor = std::optional<at::Tensor>;

// The kernels of cpu_gemv.cpp, looked up once (they may live in another shared object of the same build).
struct Ops {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)> dense;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      int64_t, int64_t, const OptTensor&)>
      int8, int4;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                      const OptTensor&)>
      attention;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, double)>
      paged_attention;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rms_norm;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)> rope;

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
          find("qwenlm_kernels::decode_attention")
              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const OptTensor&)>(),
          find("qwenlm_kernels::paged_decode_attention")
              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, double)>(),
          find("qwenlm_kernels::rms_norm").typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(),
          find("qwenlm_kernels::rope").typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(),
      };
    }();
    return ops;
  }
};

// A linear layer as the Python wrappers call it: dense (kernels.linear) or weight-only int8/int4
// (kernels.linear_quantized), with QuantLinear's act-order input permutation and its bias in x's dtype.
struct LinearSpec {
  enum Kind : int64_t { kDense = 0, kInt8 = 1, kInt4 = 2 };
  int64_t kind = kDense;
  at::Tensor weight;  // dense [N, K]; quantized: packed codes
  at::Tensor scales, zeros;
  OptTensor bias, perm;
  int64_t group = 0, in_features = 0;

  at::Tensor operator()(const at::Tensor& x_in, const Ops& ops) const {
    const at::Tensor x = perm.has_value() ? x_in.index_select(-1, *perm) : x_in;
    switch (kind) {
      case kDense: return ops.dense.call(x, weight, bias);
      case kInt8: return ops.int8.call(x, weight, scales, zeros, group, in_features, bias);
      default: return ops.int4.call(x, weight, scales, zeros, group, in_features, bias);
    }
  }
};

struct LayerSpec {
  at::Tensor ln_1, ln_2;
  LinearSpec c_attn, attn_proj, w1, w2, mlp_proj;
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
  // ints: kind, has_bias, has_perm, group, in_features; tensors: weight | (codes, scales, zeros), bias?, perm?
  LinearSpec linear() {
    LinearSpec s;
    s.kind = integer();
    TORCH_CHECK(s.kind >= LinearSpec::kDense && s.kind <= LinearSpec::kInt4, "DecodePlan: bad linear kind");
    const bool has_bias = integer() != 0, has_perm = integer() != 0;
    s.group = integer();
    s.in_features = integer();
    s.weight = tensor();
    if (s.kind != LinearSpec::kDense) {
      s.scales = tensor();
      s.zeros = tensor();
    }
    if (has_bias) s.bias = tensor();
    if (has_perm) s.perm = tensor();
    return s;
  }
};

// Seconds spent in each part of the step, summed over steps while profiling is on.
enum Part { kLinear = 0, kAttention = 1, kOther = 2, kParts = 3 };

class DecodePlan : public torch::CustomClassHolder {
 public:
  // ints: num_layers, num_heads, head_dim, use_logn, seq_length, then one group of 5 per linear (see Reader);
  // floats: the norms' epsilon. Tensor order per layer: ln_1, c_attn, attn.c_proj, ln_2, w1, w2, mlp.c_proj;
  // then ln_f and lm_head.
  DecodePlan(std::vector<at::Tensor> tensors, std::vector<int64_t> ints, std::vector<double> floats) {
    Reader r{tensors, ints};
    const int64_t layers = r.integer();
    n_head_ = r.integer();
    head_dim_ = r.integer();
    use_logn_ = r.integer() != 0;
    seq_length_ = r.integer();
    TORCH_CHECK(floats.size() == 1, "DecodePlan: floats must be [eps]");
    eps_ = floats[0];
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
  }

  // Logits [1, V] (model dtype) of hidden state x [1, H] (the token's embedding) at cache position `pos`, whose
  // K/V are written into keys/values[layer] [1, n, capacity, D] at `pos`. inv_freq: fp32 [1, rotary_dim / 2]
  // with the prefill's NTK alpha.
  at::Tensor step(at::Tensor x, int64_t pos, at::Tensor inv_freq, std::vector<at::Tensor> keys,
                  std::vector<at::Tensor> values) {
    check_caches(keys, values, x, [&](const at::Tensor& kc) { return kc.size(0) == 1 && pos < kc.size(2); });
    const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
    return run(x, pos, inv_freq, [&](const Ops& ops, int64_t l, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v) {
      const at::Tensor &kc = keys[l], &vc = values[l];
      kc.select(2, pos).select(0, 0).copy_(k);  // keys post-RoPE, as in the reference
      vc.select(2, pos).select(0, 0).copy_(v);
      return ops.attention.call(q, kc.narrow(2, 0, pos + 1), vc.narrow(2, 0, pos + 1), scale, std::nullopt);
    });
  }

  // The same step over the serving engine's paged cache: the token's K/V go to slot pos % block_size of block
  // table[pos / block_size] of the pools [num_blocks, n, block_size, D], and attention reads positions [0, pos]
  // through `table` (int32 [1, blocks]), as PagedBatch and paged_decode_attention do.
  at::Tensor step_paged(at::Tensor x, int64_t pos, at::Tensor inv_freq, std::vector<at::Tensor> key_pools,
                        std::vector<at::Tensor> value_pools, at::Tensor table) {
    TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == 1 && table.is_contiguous(),
                "DecodePlan.step_paged: table must be contiguous int32 [1, blocks]");
    const int64_t bs = key_pools.empty() ? 1 : key_pools[0].size(2);
    TORCH_CHECK(pos >= 0 && pos / bs < table.size(1), "DecodePlan.step_paged: position ", pos, " has no block");
    const int64_t block = table.data_ptr<int32_t>()[pos / bs], slot = pos % bs;
    check_caches(key_pools, value_pools, x, [&](const at::Tensor& kc) { return block >= 0 && block < kc.size(0); });
    const at::Tensor lens = at::full({1}, pos + 1, table.options());
    const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
    return run(x, pos, inv_freq, [&](const Ops& ops, int64_t l, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v) {
      const at::Tensor &kp = key_pools[l], &vp = value_pools[l];
      kp.select(0, block).select(1, slot).copy_(k);
      vp.select(0, block).select(1, slot).copy_(v);
      return ops.paged_attention.call(q, kp, vp, table, lens, scale);
    });
  }

 private:
  // Shapes every layer's cache must have ([*, n, *, D], the model dtype, head dim contiguous) plus `fits`.
  template <typename Fits>
  void check_caches(const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values, const at::Tensor& x,
                    Fits fits) const {
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(),
                "DecodePlan: one key and one value buffer per layer");
    for (size_t l = 0; l < keys.size(); ++l) {
      const at::Tensor &kc = keys[l], &vc = values[l];
      TORCH_CHECK(kc.dim() == 4 && kc.size(1) == n_head_ && kc.size(3) == head_dim_ && kc.sizes() == vc.sizes() &&
                      kc.scalar_type() == x.scalar_type() && vc.scalar_type() == x.scalar_type() &&
                      kc.stride(3) == 1 && vc.stride(3) == 1 && fits(kc),
                  "DecodePlan: layer ", l, "'s cache does not fit (shape ", kc.sizes(), ", ", kc.scalar_type(), ")");
    }
  }

  // The layers, final norm and lm_head; attend(ops, layer, q, k, v) stores k, v [n, D] and returns the
  // attention output [1, n, 1, D] for q [1, n, 1, D].
  template <typename Attend>
  at::Tensor run(at::Tensor x, int64_t pos, const at::Tensor& inv_freq, Attend attend) {
    const Ops& ops = Ops::get();
    const int64_t n = n_head_, D = head_dim_;
    TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "DecodePlan: x must be [1, H]");
    auto clock = Clock(profiling_);

    // RoPE cos/sin at `pos` and the LogN factor: qwen.py's rope_cos_sin_at and logn_factors, op for op.
    const at::Tensor freqs = at::mul(at::full({1, 1, 1}, static_cast<double>(pos), inv_freq.options()),
                                     inv_freq.view({inv_freq.size(0), 1, inv_freq.size(-1)}));
    const at::Tensor emb = at::cat({freqs, freqs}, -1).unsqueeze(1);  // [1, 1, 1, rotary_dim]
    const at::Tensor cos = emb.cos(), sin = emb.sin();
    at::Tensor logn;
    if (use_logn_ && pos + 1 > seq_length_) {
      const at::Tensor p1 = at::full({1}, static_cast<double>(pos + 1), at::kDouble);
      logn = at::div(at::log(p1), std::log(static_cast<double>(seq_length_))).to(at::kFloat).to(x.scalar_type());
    }
    x = x.clone();  // the residual stream, updated in place
    clock.lap(kOther);

    for (size_t l = 0; l < layers_.size(); ++l) {
      const LayerSpec& s = layers_[l];
      const at::Tensor h = ops.rms_norm.call(x, s.ln_1, eps_);
      clock.lap(kOther);
      const at::Tensor qkv = s.c_attn(h, ops);  // [1, 3nD]: Q | K | V
      clock.lap(kLinear);
      // RoPE on Q and K in one call: they are adjacent, and rows are rotated independently.
      const at::Tensor qk = ops.rope.call(qkv.narrow(1, 0, 2 * n * D).view({1, 2 * n, 1, D}), cos, sin);
      at::Tensor q = qk.narrow(1, 0, n);
      if (logn.defined()) q = at::mul(q, logn);
      clock.lap(kOther);
      const at::Tensor y = attend(ops, static_cast<int64_t>(l), q, qk.narrow(1, n, n).view({n, D}),
                                  qkv.narrow(1, 2 * n * D, n * D).view({n, D}));
      clock.lap(kAttention);
      const at::Tensor o = s.attn_proj(y.view({1, n * D}), ops);
      clock.lap(kLinear);
      x.add_(o);
      const at::Tensor h2 = ops.rms_norm.call(x, s.ln_2, eps_);
      clock.lap(kOther);
      at::Tensor a = s.w1(h2, ops);
      const at::Tensor g = s.w2(h2, ops);
      clock.lap(kLinear);
      a.mul_(at::silu(g));
      clock.lap(kOther);
      const at::Tensor m = s.mlp_proj(a, ops);
      clock.lap(kLinear);
      x.add_(m);
    }
    const at::Tensor hf = ops.rms_norm.call(x, ln_f_, eps_);
    clock.lap(kOther);
    at::Tensor logits = lm_head_(hf, ops);
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
  at::Tensor ln_f_;
  LinearSpec lm_head_;
  int64_t n_head_ = 0, head_dim_ = 0, seq_length_ = 0;
  bool use_logn_ = false;
  double eps_ = 1e-6;
  bool profiling_ = false;
  std::vector<double> seconds_ = {0.0, 0.0, 0.0};
  int64_t steps_ = 0;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwenlm_kernels, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("step", &DecodePlan::step)
      .def("step_paged", &DecodePlan::step_paged)
      .def("set_profiling", &DecodePlan::set_profiling)
      .def("profile", &DecodePlan::profile);
}
