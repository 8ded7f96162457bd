"""Where each tensor of an original Qwen v1 checkpoint goes in the vLLM model (no vLLM needed).

The vLLM model keeps the checkpoint's module names (`transformer.h.N.attn.c_attn`, `lm_head`, ...) except
for the MLP, whose `w2` (the GATE: SiLU goes on it, spec 2.7) and `w1` (up) become shards 0 and 1 of one
merged `gate_up_proj`, the layout vLLM's SiluAndMul expects. `c_attn` is already fused Q|K|V on disk and
loads whole into vLLM's QKVParallelLinear, which splits it per tensor-parallel rank. GPTQ tensors
(`qweight`, `qzeros`, `scales`, `g_idx`) follow the same names.

    vllm_weight_name("transformer.h.0.mlp.w2.weight")   # ("transformer.h.0.mlp.gate_up_proj.weight", 0)
"""

from __future__ import annotations

from ...model.loading import _IGNORED_TENSORS

# checkpoint infix -> (vLLM infix, shard of the merged parameter)
STACKED: dict[str, tuple[str, int]] = {
    ".mlp.w2.": (".mlp.gate_up_proj.", 0),  # gate
    ".mlp.w1.": (".mlp.gate_up_proj.", 1),  # up
}
# vLLM module -> the checkpoint modules fused into it (what quantization configs name)
PACKED_MODULES: dict[str, list[str]] = {"c_attn": ["c_attn"], "gate_up_proj": ["w2", "w1"]}


def vllm_weight_name(name: str) -> tuple[str, int | None] | None:
    """(vLLM parameter name, shard id or None) for a checkpoint tensor, or None for buffers that some
    reference revisions saved and nothing reads (rotary `inv_freq`, `masked_bias`, the causal mask)."""
    if _IGNORED_TENSORS.match(name):
        return None
    for infix, (target, shard) in STACKED.items():
        if infix in name:
            return name.replace(infix, target, 1), shard
    return name, None
