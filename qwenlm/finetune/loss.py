"""The training forward: hidden states -> chunked lm_head + cross-entropy, with gradient checkpointing.

The loss is a module (`CausalLMLoss`) so that FSDP/DDP/DeepSpeed wrap it as their root and lm_head's
parameters are gathered while the loss runs. Full logits are never held at once: only the positions
with a target go through lm_head, in chunks of `chunk_size` tokens, each recomputed in backward when
there are several (8192 tokens x 151,936 vocab would be 4.98 GB of fp32 logits per sequence):

    loss_fn = CausalLMLoss(model, chunk_size=1024)
    loss_sum, n_tokens = loss_fn(input_ids, labels)          # sum of token losses, trained-token count
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..model.blocks import _Step, attention_bias, rope_cos_sin_at, rope_inv_freqs
from ..model.qwen import QWenLMHeadModel
from .data import IGNORE_INDEX


def enable_gradient_checkpointing(model: QWenLMHeadModel) -> None:
    """Recompute every block's activations in backward (torch.utils.checkpoint, non-reentrant).

    The block's `forward` is wrapped on the instance, so module names, state dicts and wrappers put around
    the block (FSDP, peft's layers inside it) are unchanged. Dropout masks are replayed (RNG state kept).
    """
    for block in model.transformer.h:
        if not getattr(block, "_qwenlm_checkpointed", False):
            block.forward = functools.partial(_checkpointed, block.forward)
            block._qwenlm_checkpointed = True


def _checkpointed(forward, x: Tensor, step) -> Tensor:
    if not torch.is_grad_enabled():
        return forward(x, step)
    return checkpoint(forward, x, step, use_reentrant=False)


def _chunk_loss(hidden: Tensor, targets: Tensor, head: nn.Module) -> Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, labels: Tensor, head: nn.Module, chunk_size: int) -> tuple[Tensor, int]:
    """Sum of next-token cross-entropies (fp32) over positions whose shifted label is not -100.

    Args:
        hidden: [B, S, H] final-norm hidden states.
        labels: [B, S] aligned with the inputs (label i is predicted at position i - 1), -100 = ignored.
        head: lm_head (any module mapping [N, H] -> [N, V]).

    Returns:
        (loss sum, number of trained tokens). With no trained token the sum is a zero that still depends on
        `hidden`, so every process runs the same backward (distributed training needs that).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h, y = hidden[:, :-1][keep], targets[keep]  # [N, H], [N]
    count = int(y.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    # With several chunks, each chunk's logits are recomputed in backward instead of all being kept; one chunk
    # is kept as is (backward starts with it right away, so recomputing would only cost time).
    recompute = torch.is_grad_enabled() and count > chunk_size
    for start in range(0, count, chunk_size):
        part = (h[start : start + chunk_size], y[start : start + chunk_size], head)
        total = total + (checkpoint(_chunk_loss, *part, use_reentrant=False) if recompute else _chunk_loss(*part))
    return total, count


def packed_hidden_states(model: QWenLMHeadModel, input_ids: Tensor, segments: Tensor) -> Tensor:
    """Final-norm hidden states of packed rows: attention stays inside a segment, positions restart at each.

    `segments` [B, S] numbers the samples of each row (1, 2, ...; 0 = padding). The same block math as
    `QWenLMHeadModel.forward` in training (no NTK, no LogN), with per-row positions and a block-diagonal
    causal mask; a row holding one sample gives exactly the model's own hidden states.
    """
    B, S = input_ids.shape
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    index = torch.arange(S, device=segments.device).expand(B, S)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    positions = (index - first).cpu()  # (B, S): 0 at each sample's first token
    cos, sin = rope_cos_sin_at(positions, rope_inv_freqs(model.config, torch.ones(1)))
    x = model.transformer.drop(model.transformer.wte(input_ids))
    same = segments[:, :, None] == segments[:, None, :]  # (B, S, S)
    bias = attention_bias(None, 0, S, x.dtype, x.device)  # causal (1, 1, S, S)
    bias = bias.masked_fill(~same[:, None], torch.finfo(x.dtype).min)
    step = _Step(cos=cos.to(x.device), sin=sin.to(x.device), bias=bias, logn=None, start=0, cache=None)
    for block in model.transformer.h:
        x = block(x, step)
    return model.transformer.ln_f(x)


class CausalLMLoss(nn.Module):
    """`forward(input_ids, labels, segments=None) -> (loss sum, trained tokens)` around a Qwen model."""

    def __init__(self, model: QWenLMHeadModel, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: Tensor, labels: Tensor, segments: Tensor | None = None) -> tuple[Tensor, int]:
        if segments is None:
            # Right-padded rows need no attention mask (causal: no real token sees a pad), so SDPA takes its
            # is_causal path. The loss runs lm_head itself, in chunks: the model's own does not run.
            hidden = self.model(input_ids, use_cache=False, return_logits=False).hidden_states
        else:
            hidden = packed_hidden_states(self.model, input_ids, segments)
        return chunked_cross_entropy(hidden, labels, self.model.lm_head, self.chunk_size)
