"""Which NTK alpha each vLLM engine runs, and which engine a request goes to (no vLLM needed).

Qwen's dynamic NTK picks alpha from the prompt length at prefill and keeps it while decoding (spec 2.5.4).
A vLLM forward sees only positions, so one engine cannot do that. An engine with a *fixed* alpha is exact
for every prompt whose own alpha is that one, so `qwenlm serve --backend vllm` runs one engine per alpha
that a prompt up to max_model_len can get, and sends each request to the engine of its prompt's alpha:

    buckets = alpha_buckets(seq_length=2048, max_model_len=8192)     # alphas 1, 3, 7
    prompt_alpha(3000, seq_length=2048, use_dynamic_ntk=True)          # 3
"""

from __future__ import annotations

from dataclasses import dataclass

from ...model.blocks import ntk_alpha

ALPHA_KEY = "qwenlm_ntk_alpha"  # hf_overrides key: an engine's fixed NTK alpha (default 1)
ROUTED_KEY = "qwenlm_alpha_routed"  # hf_overrides key: requests arrive routed by their prompt's alpha


@dataclass(frozen=True)
class AlphaBucket:
    """The prompts (by token count, both ends included) whose dynamic-NTK alpha is `alpha`."""

    alpha: int
    min_prompt: int
    max_prompt: int


def prompt_alpha(prompt_len: int, seq_length: int, use_dynamic_ntk: bool) -> int:
    """The alpha Qwen (and qwenlm's own engine) uses for a prompt of `prompt_len` tokens."""
    return ntk_alpha(prompt_len, seq_length) if use_dynamic_ntk else 1


def alpha_buckets(seq_length: int, max_model_len: int, use_dynamic_ntk: bool = True) -> list[AlphaBucket]:
    """Every alpha a prompt of 1 .. max_model_len - 1 tokens gets (one token is left to generate), in order.

    Built from `ntk_alpha` itself (a binary search for each bucket's last length), so the buckets can never
    disagree with the rule the engine applies per request.
    """
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be at least 2 (a prompt token and a new one), got {max_model_len}")
    longest = max_model_len - 1
    buckets: list[AlphaBucket] = []
    low = 1
    while low <= longest:
        alpha = prompt_alpha(low, seq_length, use_dynamic_ntk)
        lo, hi = low, longest  # invariant: prompt_alpha(lo) == alpha; find the largest such length
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if prompt_alpha(mid, seq_length, use_dynamic_ntk) == alpha:
                lo = mid
            else:
                hi = mid - 1
        buckets.append(AlphaBucket(alpha, low, lo))
        low = lo + 1
    return buckets


def check_engine_alpha(
    alpha: float, seq_length: int, max_model_len: int, use_dynamic_ntk: bool, routed: bool = False
) -> str | None:
    """What to warn about for an engine that applies NTK `alpha` to every request, or None when it is exact.

    Args:
        alpha: the engine's fixed NTK alpha (1 = plain RoPE).
        routed: requests reach this engine only when their prompt's alpha is `alpha` (qwenlm's router).

    Raises:
        ValueError: alpha < 1, or alpha != 1 for a checkpoint without dynamic NTK.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 1:
        raise ValueError(f"qwenlm_ntk_alpha must be a number >= 1 (1 = plain RoPE), got {alpha!r}")
    if alpha != 1 and not use_dynamic_ntk:
        raise ValueError(
            f"qwenlm_ntk_alpha={alpha} but this checkpoint's config has use_dynamic_ntk=false: Qwen never "
            "rescales its RoPE, so leave the alpha at 1"
        )
    buckets = alpha_buckets(seq_length, max_model_len, use_dynamic_ntk)
    own = [b for b in buckets if b.alpha == alpha]
    if routed or (own and len(buckets) == 1):
        return None
    qwen_uses = ", ".join(f"{b.alpha} for {b.min_prompt}-{b.max_prompt}" for b in buckets)
    fix = (
        "run one engine per alpha and route by prompt length (`qwenlm serve --backend vllm`, on by default), or "
        f"keep max_model_len <= seq_length ({seq_length})"
    )
    if not own:
        return (
            f"NTK alpha {alpha:g} is not one Qwen uses for prompts up to max_model_len={max_model_len} (it uses "
            f"alpha {qwen_uses} prompt tokens): no prompt gets Qwen's exact long-context behaviour; {fix}"
        )
    return (
        f"this engine applies NTK alpha {alpha:g} to every prompt, which matches Qwen only for prompts of "
        f"{own[0].min_prompt}-{own[0].max_prompt} tokens (Qwen uses alpha {qwen_uses} prompt tokens, "
        f"seq_length={seq_length}); other prompts get outputs that differ from Qwen's; {fix}"
    )
