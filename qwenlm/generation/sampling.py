"""Pure next-token selection: logits processors, sampling, and logprobs.

Every function takes logits [B, V] (rows are independent requests) and returns new tensors; the
only randomness is the `torch.Generator` the caller passes in.

next_ids = sample_next(logits, params, token_ids, make_generator(params.seed, logits.device))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ..kernels import argmax
from .params import MAX_LOGIT_BIAS, SamplingParams


def apply_repetition_penalty(logits: Tensor, token_ids: Tensor, penalty: float) -> Tensor:
    """CTRL / Hugging Face repetition penalty over the ids already in each row.

    A seen token's score is divided by `penalty` when positive and multiplied by it when negative,
    so `penalty > 1` always makes it less likely. Each id is penalised once however often it occurs.

    Args:
        logits: [B, V] scores.
        token_ids: [B, T] ids seen so far in each row (prompt + generated). Negative entries are
            ignored, so ragged rows can be padded with -1 (a real pad id would be penalised).
        penalty: > 0; 1.0 returns `logits` unchanged.
    """
    if penalty <= 0:
        raise ValueError(f"repetition penalty must be > 0, got {penalty}")
    if penalty == 1.0 or token_ids.numel() == 0:
        return logits
    B, V = logits.shape
    if token_ids.dim() != 2 or token_ids.shape[0] != B:
        raise ValueError(f"token_ids must be [B={B}, T], got shape {tuple(token_ids.shape)}")
    return penalize_seen(logits, seen_mask(token_ids, V, logits.device), penalty)


def seen_mask(token_ids: Tensor, vocab_size: int, device: torch.device | str | None = None) -> Tensor:
    """[B, vocab_size + 1] bool: True where a row's `token_ids` [B, T] hold the id; -1 padding (and ids
    past the kept logits, which no penalty can reach) land in the extra last column. A decode loop can
    keep it and mark each new token (`scatter_`) instead of rebuilding it from the whole history every step."""
    # A "seen" mask rather than gather/scatter of logits: duplicate ids then cannot race.
    token_ids = token_ids.to(device=token_ids.device if device is None else device, dtype=torch.long)
    ids = torch.where((token_ids < 0) | (token_ids >= vocab_size), vocab_size, token_ids)
    seen = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    return seen.scatter_(1, ids, True)


def penalize_seen(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """The repetition penalty for the ids marked in `seen` ([B, >= V] bool, as `seen_mask` makes it)."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen[:, : logits.shape[-1]], penalised, logits)


def apply_logit_bias(logits: Tensor, bias: Sequence[tuple[int, float]]) -> Tensor:
    """OpenAI's `logit_bias`: add each bias to its token's logit in every row; -100 bans the token.

    OpenAI documents -100 as "a ban"; adding -100 only makes a token very unlikely, so it becomes -inf.
    Ids at or past V (the kept logits) are ignored. An empty `bias` returns `logits` unchanged.
    """
    kept = [(token, value) for token, value in bias if token < logits.shape[-1]]
    if not kept:
        return logits
    ids = torch.tensor([token for token, _ in kept], device=logits.device)
    values = torch.tensor([value for _, value in kept], dtype=logits.dtype, device=logits.device)
    values = values.masked_fill(values <= -MAX_LOGIT_BIAS, float("-inf"))
    return logits.index_add(-1, ids, values.expand(logits.shape[0], -1))


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide by `temperature` (> 0): below 1 sharpens, above 1 flattens. Greedy is the caller's job."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here (0 means greedy; handle it before), got {temperature}")
    if temperature == 1.0:
        return logits
    return logits / temperature


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep each row's `k` largest logits, set the rest to -inf.

    Like transformers, tokens tied with the k-th largest value are all kept (only values strictly
    below it are removed), so a row may keep more than `k`. `k == 0` or `k >= V` is a no-op.
    """
    if k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {k}")
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Set to -inf every logit whose probability is below `min_p` times the row's largest (transformers'
    MinP: the most likely token always stays). `min_p == 0` is a no-op."""
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1] (0 = off), got {min_p}")
    if min_p == 0:
        return logits
    probs = logits.float().softmax(dim=-1)
    floor = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < floor, float("-inf"))


# Candidates looked at before sorting a whole row: an LM's nucleus is usually tens to hundreds of tokens, and
# sorting Qwen's 151,936 logits costs ~10 ms per row on a CPU core, against ~0.7 ms for the top 1024.
TOP_P_CANDIDATES = 1024


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter with transformers' TopP semantics; set the removed logits to -inf.

    Sorting ascending, a token is removed when the cumulative probability up to and including it is
    <= 1 - p; the most likely token is always kept. Ties are resolved by value, not by sort order:
    tokens whose logit equals the smallest kept logit are kept too (transformers keeps an arbitrary
    subset of them), which makes the result independent of how `torch.sort` orders equal values.
    `p >= 1` is a no-op.

    When every row's tokens outside its TOP_P_CANDIDATES most likely hold at most 1 - p of the mass (all
    of them are removed), only those candidates are sorted, starting the cumulative sum at the rest's mass;
    otherwise (flat rows) the whole row is sorted.
    """
    if p <= 0:
        raise ValueError(f"top_p must be > 0, got {p}")
    if p >= 1.0:
        return logits
    threshold = _top_p_threshold_from_candidates(logits, p)
    if threshold is None:
        sorted_logits = torch.sort(logits, dim=-1).values  # ascending, [B, V]
        cum_probs = sorted_logits.float().softmax(dim=-1).cumsum(dim=-1)
        # cum_probs is non-decreasing, so the removed tokens are a prefix of the sorted row.
        n_removed = (cum_probs <= 1 - p).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
        threshold = sorted_logits.gather(-1, n_removed)  # smallest kept logit, [B, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def _top_p_threshold_from_candidates(logits: Tensor, p: float) -> Tensor | None:
    """The smallest kept logit per row [B, 1] from each row's top TOP_P_CANDIDATES, or None when some row's
    nucleus may reach outside them (or the row is no longer than that, where a full sort is as cheap)."""
    k = TOP_P_CANDIDATES
    if logits.shape[-1] <= k:
        return None
    probs = logits.float().softmax(dim=-1)
    top = torch.topk(probs, k, dim=-1)  # descending
    rest = (1 - top.values.sum(dim=-1, keepdim=True)).clamp(min=0)  # the mass of every other token
    if bool((rest > 1 - p).any()):
        return None
    ascending = top.values.flip(-1)
    cum_probs = rest + ascending.cumsum(dim=-1)
    n_removed = (cum_probs <= 1 - p).sum(dim=-1, keepdim=True).clamp(max=k - 1)
    return logits.gather(-1, top.indices.flip(-1).gather(-1, n_removed))


def process_logits(
    logits: Tensor, params: SamplingParams, token_ids: Tensor | None = None, seen: Tensor | None = None
) -> Tensor:
    """Apply the processors in transformers' order: repetition penalty, temperature, top-k, top-p, min-p,
    after the client's logit bias (OpenAI adds it to the raw logits).

    Greedy params only get the bias and the repetition penalty (the warpers cannot change the argmax).
    The penalty reads `seen` (a `seen_mask`) when given, else `token_ids`.

    Raises:
        ValueError: if a repetition penalty is set but neither `token_ids` nor `seen` is given.
    """
    if params.is_plain_argmax:
        return logits
    logits = apply_logit_bias(logits, params.logit_bias)
    if params.repetition_penalty != 1.0:
        if seen is not None:
            logits = penalize_seen(logits, seen, params.repetition_penalty)
        elif token_ids is None:
            raise ValueError("repetition_penalty is set, so process_logits needs the token_ids seen so far")
        else:
            logits = apply_repetition_penalty(logits, token_ids, params.repetition_penalty)
    if params.is_greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k)
    return apply_min_p(apply_top_p(logits, params.top_p), params.min_p)


def sample_next(
    logits: Tensor,
    params: SamplingParams,
    token_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one next token per row: argmax when greedy, else a draw from the processed distribution.

    Args:
        logits: [B, V] scores for the next position (processed in fp32 whatever their dtype).
        params: the request's sampling settings.
        token_ids: [B, T] ids seen so far; needed only for a repetition penalty.
        generator: the request's RNG on `logits.device`; required when sampling, so that a seed
            is set once per request rather than per step.

    Returns:
        LongTensor [B]. A token whose processed logit is -inf has probability 0 and is never drawn.
    """
    if params.is_plain_argmax:
        return argmax(logits)  # nothing to process: 16-bit logits need no fp32 copy to find their maximum
    logits = process_logits(logits.float(), params, token_ids)
    if params.is_greedy:
        return argmax(logits)
    if generator is None:
        raise ValueError("sampling needs an explicit torch.Generator (see make_generator)")
    probs = logits.float().softmax(dim=-1)  # softmax in fp32: bf16 probabilities are too coarse
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_next_on_device(
    logits: Tensor, params: SamplingParams, seen: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """`sample_next` with no host sync, for decode loops that keep tokens on the device between reads.

    Every op is queued on `logits.device` (the processors already are; the draw is `draw`), and the
    repetition penalty reads a kept `seen` mask. For the same logits and generator state it picks the
    same tokens as `sample_next`.
    """
    logits = process_logits(logits, params, seen=seen)
    if params.is_greedy:
        return argmax(logits)
    if generator is None:
        raise ValueError("sampling needs an explicit torch.Generator (see make_generator)")
    return draw(logits.float().softmax(dim=-1), generator)


def draw(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row of probs [B, V], exactly as `torch.multinomial(probs, 1)` draws it, without its
    validity check (a host sync on CUDA).

    multinomial draws one sample as argmax(p / q) with q ~ Exp(1) (the exponential form of the Gumbel-max
    trick); doing the same from the same generator gives the same tokens. p = 0 is never drawn.
    """
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return argmax(probs / q)


def with_torch_seed(params: SamplingParams) -> SamplingParams:
    """`params`, given a seed drawn from torch's global RNG when they sample without one.

    For the transformers-style entry points (`model.generate`, `model.chat`): there `torch.manual_seed` /
    `transformers.set_seed` make sampling reproducible, as users of transformers expect. The engine and the
    server never call this: their unseeded requests draw from OS entropy and leave the global RNG alone.
    """
    if params.seed is not None or params.is_greedy:
        return params
    return dataclasses.replace(params, seed=int(torch.randint(0, 2**63 - 1, (1,)).item()))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh RNG for one request: seeded with `seed`, or from OS entropy when it is None.

    Unseeded requests still get their own generator, so no code path touches torch's global RNG.
    """
    generator = torch.Generator(device=device)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1  # 63 bits: always a valid manual_seed
    generator.manual_seed(seed)
    return generator


def token_logprobs(
    logits: Tensor, token_ids_chosen: Tensor, top_n: int = 0, top_limit: int | None = None
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Log-probabilities under the raw model distribution (before any processor), for logprob APIs.

    Args:
        logits: [B, V] unprocessed scores over the model's whole output vocabulary, so the values are
            the model's own (what a plain `log_softmax` of its logits gives, as lm-eval's hf backend).
        token_ids_chosen: [B] the tokens that were picked.
        top_n: also return the `top_n` most likely tokens per row (0 = don't; capped at V).
        top_limit: alternatives come only from ids below this (the tokenizer's ids: Qwen pads its
            output vocabulary past them, and a padding id has no text); None = all of V.

    Returns:
        (chosen logprobs [B] fp32, (top ids [B, n], top logprobs [B, n]) or None).
    """
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    logits = logits.float()
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # log_softmax without writing a [B, V] result
    ids = token_ids_chosen.to(device=logits.device, dtype=torch.long).view(-1, 1)
    chosen = (logits.gather(-1, ids) - norm).squeeze(-1)
    if top_n == 0:
        return chosen, None
    candidates = logits[:, :top_limit] if top_limit is not None else logits
    top = torch.topk(candidates, min(top_n, candidates.shape[-1]), dim=-1)
    return chosen, (top.indices, top.values - norm)
