"""Greedy decoding with a KV cache: the `model.generate` of the core API.

out = greedy_generate(model, input_ids, max_new_tokens=32)      # [B, T + new]
for ids in greedy_steps(model, input_ids, max_new_tokens=32):   # [B] per step, as made
    ...
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..model.kv_cache import KVCache
from ..model.qwen import ContextLengthError


def _defaults(model, max_new_tokens, eos_token_id, pad_token_id):
    gen = model.generation_config
    if max_new_tokens is None:
        max_new_tokens = gen.max_new_tokens if gen is not None and gen.max_new_tokens else 512
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if eos_token_id is None and gen is not None:
        eos_token_id = gen.eos_token_id
    if pad_token_id is None and gen is not None:
        pad_token_id = gen.pad_token_id
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    return max_new_tokens, eos, pad_token_id


@torch.no_grad()
def greedy_steps(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    vocab_limit: int | None = None,
) -> Iterator[Tensor]:
    """Yield the next token ids [B] step by step until every row hit eos or the budget is spent.

    Rows that finished early get `pad_token_id` (else their eos), like transformers. `vocab_limit`
    keeps argmax below the tokenizer's size: the embedding is padded past it (151851 -> 151936),
    and an id there could not be decoded.
    """
    max_new_tokens, eos, pad_token_id = _defaults(model, max_new_tokens, eos_token_id, pad_token_id)
    device = model.device
    input_ids = input_ids.to(device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, T = input_ids.shape
    limit = model.config.max_context_length
    if T + max_new_tokens > limit:
        raise ContextLengthError(
            f"prompt of {T} tokens + max_new_tokens {max_new_tokens} exceeds the model's context of {limit}"
        )
    mask = attention_mask.to(device) if attention_mask is not None else None
    if mask is not None and bool(mask.all()):
        mask = None  # no padding: the unmasked path gives the same result, faster
    cache = KVCache.for_model(model, batch_size=B, capacity=T + max_new_tokens)
    eos_ids = torch.tensor(eos, device=device, dtype=input_ids.dtype)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    fill = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)

    step_ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(step_ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]
        next_ids = logits.argmax(dim=-1)
        next_ids = torch.where(finished, torch.full_like(next_ids, fill), next_ids)
        yield next_ids
        finished |= torch.isin(next_ids, eos_ids)
        if bool(finished.all()):
            return
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        step_ids = next_ids[:, None]


def greedy_generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """Prompt + greedy continuation, [B, T + new], as transformers' `generate` returns it."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    steps = [ids[:, None].to(input_ids.device) for ids in greedy_steps(model, input_ids, attention_mask, **kwargs)]
    return torch.cat([input_ids, *steps], dim=1)
