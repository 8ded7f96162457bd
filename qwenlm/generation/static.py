"""Static decoding: one token per row over a fixed-shape KV cache with no host work per step, so that
`torch.compile(mode="reduce-overhead")` can capture the step as a CUDA graph.

    decoder = acquire_decoder(model, batch_size=1, length=T + max_new_tokens, compiled=True)
    for tokens in decoder.token_steps(ids, None, params, vocab_limit, generator, sync_every=4): ...
    decoder.release()

`generate_steps` picks this path by itself (on CUDA, or when asked); the host-side stop logic stays there.
What the step does differently from `QWenLMHeadModel.forward` on a growing `KVCache`, with the same math:
- the position is a device tensor; RoPE cos/sin and the LogN factor are computed from it on the device
  (dynamic-NTK alphas are fixed per row at prefill, as the model fixes them: inv_freq is set once then);
- the new K/V go in with `index_copy_` at the position, and attention (SDPA) runs over the whole
  capacity with a mask built on the device: slot <= position, minus the row's left padding;
- the next token is sampled on the device (no host sync) into a buffer that the host reads once every
  `sync_every` steps; on CUDA the next step is queued before each read, so the GPU never waits for it.
The prefill is the model's own forward, writing into the same buffers through a `KVCache` over them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.blocks import logn_factors, rope_cos_sin_at, rope_inv_freqs
from ..model.kv_cache import KVCache
from .params import SamplingParams
from .sampling import sample_next_on_device, seen_mask

logger = logging.getLogger(__name__)

MIN_CAPACITY = 256  # capacities are powers of two from here: few distinct shapes, so few compilations


def capacity_for(length: int, max_context_length: int) -> int:
    """The cache capacity for `length` tokens: the next power of two >= length (at least MIN_CAPACITY),
    but no more than the model's context rounded up to MIN_CAPACITY. Attention reads the whole capacity
    every step, so it is kept within 2x of what is needed; static shapes mean one compilation each."""
    power = max(MIN_CAPACITY, 1 << (max(length, 1) - 1).bit_length())
    ceiling = -(-max(length, max_context_length) // MIN_CAPACITY) * MIN_CAPACITY
    return min(power, ceiling)


def unsupported_reason(model) -> str | None:
    """Why the static step cannot run `model` (None: it can)."""
    layers = model.transformer.h
    if model.training:
        return "the model is in training mode"
    if model.config.use_cache_quantization:
        return "the int8 KV cache (use_cache_quantization) is not supported"
    if not all(block.attn.use_sdpa for block in layers):
        return "the eager attention implementation was selected"
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) != 1:
        return f"the model is spread over several devices ({', '.join(sorted(map(str, devices)))})"
    if next(iter(devices)).type not in ("cpu", "cuda"):
        return f"device {next(iter(devices))} is not supported"
    return None


# --------------------------------------------------------------------------------------------------
# The step: pure tensor math over static buffers
# --------------------------------------------------------------------------------------------------
def _attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    if q.device.type == "cpu" and q.dtype != torch.float32:  # torch's 16-bit CPU SDPA is ~4x slower: upcast
        return F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def decode_step(
    model,
    keys: list[Tensor],
    values: list[Tensor],
    slots: Tensor,
    pad_mask: Tensor,
    inv_freq: Tensor,
    input_ids: Tensor,
    position: Tensor,
) -> Tensor:
    """Logits [B, V] (fp32) of input_ids [B, 1] at cache slot `position` ([1] long, the same for every
    row: prompts are left-padded), whose K/V are written into keys/values[layer] [B, n, capacity, D].

    slots: arange(capacity); pad_mask [B, capacity] bool: False at each row's left padding;
    inv_freq [B, rotary_dim/2]: RoPE inverse frequencies with each row's NTK alpha.
    """
    x = model.transformer.wte(input_ids)  # (B, 1, H)
    cos, sin = rope_cos_sin_at(position, inv_freq)  # (B, 1, 1, d)
    mask = ((slots <= position) & pad_mask)[:, None, None, :]  # (B, 1, 1, capacity): True = may attend
    # LogN (inference only): exactly 1 up to seq_length, so computing it at every position is the same
    logn = logn_factors(position, model.config.seq_length).view(1, 1, 1, 1) if model.config.use_logn_attn else None
    for block, k_cache, v_cache in zip(model.transformer.h, keys, values, strict=True):
        attn = block.attn
        q, k, v = attn.project(block.ln_1(x), cos, sin)  # each (B, n, 1, D)
        k_cache.index_copy_(2, position, k)
        v_cache.index_copy_(2, position, v)
        if logn is not None:
            q = q * logn.type_as(q)
        x = x + attn.merge(_attend(q, k_cache, v_cache, mask))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x))[:, -1].float()


_compiled_steps: dict[str, Callable] = {}


def compiled_decode_step(device_type: str) -> Callable:
    """`decode_step` under torch.compile: CUDA graphs on CUDA ("reduce-overhead"), inductor's default on
    the CPU, where qwenlm's kernels get fake implementations so that the linears keep using them.
    One compiled function per mode, shared by every decoder (it recompiles per model and shape)."""
    mode = "reduce-overhead" if device_type == "cuda" else "default"
    if mode not in _compiled_steps:
        if device_type == "cpu":
            from ..kernels import fake

            fake.register()
        _compiled_steps[mode] = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
    return _compiled_steps[mode]


# --------------------------------------------------------------------------------------------------
# The decoder: static buffers, prefill, the token loop
# --------------------------------------------------------------------------------------------------
class StaticDecoder:
    """Static buffers for one model, batch size and capacity, reused across generations (one at a time:
    `acquire_decoder` hands it out, `release` gives it back)."""

    def __init__(self, model, batch_size: int, capacity: int, compiled: bool = False) -> None:
        self.model = model
        self.compile = compiled  # asked for; `compiled` says whether it is in use
        # Ordinary tensors even when made under inference_mode: a later generation outside it writes them too.
        with torch.inference_mode(False):
            self.cache = KVCache.for_model(model, batch_size=batch_size, capacity=capacity, quantized=False)
            device = self.device = self.cache.keys[0].device
            capacity = self.cache.capacity
            self.slots = torch.arange(capacity, device=device)
            self.pad_mask = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)
            self.inv_freq = torch.zeros(batch_size, model.config.rotary_dim // 2, device=device)
            self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            self.position = torch.zeros(1, dtype=torch.long, device=device)
        self._lock = threading.Lock()
        self._step: Callable | None = None  # the compiled step, once it is known to work
        self._compile_failed = False
        if compiled:
            for t in (*self.cache.keys, *self.cache.values, self.slots, self.pad_mask, self.inv_freq,
                      self.input_ids, self.position):  # fmt: skip
                # fixed addresses: CUDA graphs read them in place (and may write the cache); no id guard, so a
                # new decoder of the same shape reuses the compiled code (its graphs are recorded again)
                torch._dynamo.mark_static_address(t, guard=False)

    @property
    def compiled(self) -> bool:
        """Whether steps run compiled (True before the first step too, unless compiling failed)."""
        return self.compile and not self._compile_failed

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def fits(self, model, batch_size: int, length: int, compiled: bool) -> bool:
        """Can this decoder serve a generation of `length` tokens (prompt + new) for `batch_size` rows?"""
        layer = model.transformer.h[0].ln_1.weight
        return (model is self.model and batch_size == self.batch_size and compiled == self.compile
                and length <= self.capacity < 2 * capacity_for(length, model.config.max_context_length)
                and (layer.device, layer.dtype) == (self.device, self.cache.dtype))  # fmt: skip

    def try_acquire(self) -> bool:
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        self._lock.release()

    # ---- the two kinds of forward -----------------------------------------------------------------
    def prefill(self, ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """The prompt [B, T] through the model's own forward, into this decoder's buffers; returns the last
        position's logits [B, V] (fp32) and leaves the position at T."""
        B, T = ids.shape
        self.cache.reset()
        out = self.model(ids, attention_mask=attention_mask, past_key_values=self.cache, logits_to_keep=1)
        # the alphas the forward chose (per row, from each row's real length): fixed from here on
        self.inv_freq.copy_(rope_inv_freqs(self.model.config, self.cache.ntk_alpha).expand(B, -1))
        self.pad_mask.fill_(True)
        if attention_mask is not None:
            self.pad_mask[:, :T] = attention_mask.bool()
        self.position.fill_(T)
        return out.logits[:, -1].float()

    def step(self) -> Tensor:
        """Logits [B, V] (fp32) of `input_ids` at `position` (compiled when asked; if compiling fails, the
        first call says why and runs the same step eagerly from then on)."""
        args = (self.model, self.cache.keys, self.cache.values, self.slots, self.pad_mask, self.inv_freq,
                self.input_ids, self.position)  # fmt: skip
        if self._step is not None:
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
            return self._step(*args)
        if self.compiled:
            step = compiled_decode_step(self.device.type)
            logger.info("compiling the decode step for batch %d, capacity %d (once per shape; may take a while)",
                        self.batch_size, self.capacity)  # fmt: skip
            try:
                logits = step(*args)  # the first call compiles (writes at the same slot are idempotent)
                self._step = step
                return logits
            except Exception as err:  # any compiler failure means "decode without it"
                logger.warning("torch.compile of the decode step failed, decoding with the uncompiled static "
                               "step instead: %s: %s", type(err).__name__, err)  # fmt: skip
                self._compile_failed = True
        return decode_step(*args)

    # ---- the token loop ---------------------------------------------------------------------------
    def token_steps(
        self,
        ids: Tensor,
        attention_mask: Tensor | None,
        params: SamplingParams,
        vocab_limit: int | None,
        generator: torch.Generator | None,
        sync_every: int = 1,
        run_ahead: bool | None = None,
    ) -> Iterator[list[int]]:
        """Prefill, then decode `params.max_new_tokens` steps, yielding each step's sampled token per row.

        Tokens are raw: a row that has finished goes on producing tokens, which the caller ignores (rows are
        independent). They reach the host in chunks of `sync_every` steps, one copy per chunk; stop checks
        are the caller's, made as the steps are yielded, and it may stop iterating at any point.
        `run_ahead` (default: on CUDA) queues one more step before each read, so the device is busy while the
        host waits for the chunk and handles it; that step is wasted if every row turns out to be finished.
        """
        B, _ = ids.shape
        n_max = params.max_new_tokens
        cuda = self.device.type == "cuda"
        run_ahead = cuda if run_ahead is None else run_ahead
        logits = self.prefill(ids, attention_mask)
        V = logits.shape[-1] if vocab_limit is None else min(vocab_limit, logits.shape[-1])
        seen = None
        if params.repetition_penalty != 1.0:  # penalise the prompt's ids (not its padding) and every new one
            history = torch.where(attention_mask.bool(), ids, -1) if attention_mask is not None else ids
            seen = seen_mask(history, V)
        tokens = torch.empty(B, n_max, dtype=torch.long, device=self.device)
        host = torch.empty(B, n_max, dtype=torch.long, pin_memory=cuda)
        ready = torch.cuda.Event() if cuda else None

        def sample(logits: Tensor, column: int) -> None:
            next_ids = sample_next_on_device(logits[:, :V], params, seen, generator)
            if seen is not None:
                seen.scatter_(1, next_ids[:, None], True)
            tokens[:, column] = next_ids
            self.input_ids.copy_(next_ids[:, None])

        sample(logits, 0)
        del logits
        sampled, reported = 1, 0
        while True:
            chunk_done = sampled == n_max or sampled - reported >= sync_every
            if chunk_done:  # queue the chunk's copy to the host now, before any further step
                end = sampled
                host[:, reported:end].copy_(tokens[:, reported:end], non_blocking=cuda)
                if ready is not None:
                    ready.record(torch.cuda.current_stream(self.device))
            if sampled < n_max and (run_ahead or not chunk_done):  # queued before the read: overlaps it
                sample(self.step(), sampled)
                self.position.add_(1)
                sampled += 1
            if chunk_done:
                if ready is not None:
                    ready.synchronize()
                rows = host[:, reported:end].tolist()
                for j in range(end - reported):
                    yield [row[j] for row in rows]
                reported = end
                if reported == n_max:
                    return


# --------------------------------------------------------------------------------------------------
# One decoder per model, reused
# --------------------------------------------------------------------------------------------------
_DECODER_ATTR = "_qwenlm_static_decoder"  # on the model: a cycle the GC collects with the model


def acquire_decoder(model, batch_size: int, length: int, compiled: bool) -> StaticDecoder | None:
    """The model's static decoder for this batch, made (or remade) when the kept one does not fit; None
    when the kept one is in use by another generation. The caller must `release()` it."""
    decoder: StaticDecoder | None = getattr(model, _DECODER_ATTR, None)
    if decoder is not None and decoder.fits(model, batch_size, length, compiled):
        return decoder if decoder.try_acquire() else None
    if decoder is not None:
        if not decoder.try_acquire():
            return None
        decoder.release()
        setattr(model, _DECODER_ATTR, None)  # free its buffers before allocating new ones
    capacity = capacity_for(length, model.config.max_context_length)
    decoder = StaticDecoder(model, batch_size, capacity, compiled)
    decoder.try_acquire()
    setattr(model, _DECODER_ATTR, decoder)
    return decoder


def release_decoder(model) -> None:
    """Drop the model's kept static decoder (its KV buffers) if it is not in use."""
    decoder: StaticDecoder | None = getattr(model, _DECODER_ATTR, None)
    if decoder is not None and decoder.try_acquire():
        decoder.release()
        setattr(model, _DECODER_ATTR, None)
