"""The Qwen v1 model: token embedding -> blocks (`blocks.py`) -> final norm -> lm_head.

Module and parameter names equal the checkpoint's tensor names (`transformer.h.0.attn.c_attn`,
`mlp.w1`, ...), so a released state dict loads strictly with no renaming:

    model = QWenLMHeadModel(config)
    logits = model(input_ids).logits                  # [B, T, vocab_size]
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import (
    Linear,
    QWenBlock,
    RMSNorm,
    _Step,
    attention_bias,
    logn_scale,
    needs_bias,
    ntk_alphas,
    rope_cos_sin,
)
from .config import ContextLengthError, QwenConfig
from .kv_cache import KVCache


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
@dataclass
class CausalLMOutput:
    """What `forward` returns; field names follow transformers so existing code keeps working."""

    logits: Tensor | None  # [B, S or logits_to_keep, vocab_size], in the model dtype; None with return_logits=False
    past_key_values: KVCache | None = None
    hidden_states: Tensor | None = None  # final-norm output, [B, S, H]
    loss: Tensor | None = None  # with `labels`: the mean next-token cross-entropy, as the reference computes it

    def __getitem__(self, index: int):  # as a transformers ModelOutput: (loss if any, logits, past_key_values)
        fields = (self.logits, self.past_key_values)
        return ((self.loss, *fields) if self.loss is not None else fields)[index]


class QWenModel(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


def _device_of(module: nn.Module) -> torch.device:
    """Where a module's tensors live (a quantized linear has buffers rather than a `weight`)."""
    return next(itertools.chain(module.parameters(), module.buffers())).device


class QWenLMHeadModel(nn.Module):
    """Qwen v1 causal LM. `forward` follows the transformers calling convention."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = QWenModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)  # untied
        self.generation_config = None  # set by the loader from generation_config.json

    @property
    def device(self) -> torch.device:
        return _device_of(self.transformer.wte)  # a quantized embedding holds buffers, not a `weight`

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (read from a norm: quantized linears hold integer weights)."""
        return self.transformer.ln_f.weight.dtype

    def use_kernels(self, enabled: bool = True) -> None:
        """Turn qwenlm's CPU decode kernels on or off (off: plain F.linear everywhere, for comparisons)."""
        for module in self.modules():
            if hasattr(module, "use_kernels") and module is not self:  # Linear and quantized linears
                module.use_kernels = enabled

    def set_attn_implementation(self, name: str) -> None:
        """'sdpa' (default, torch's fused kernels) or 'eager' (the plain reference path)."""
        if name not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {name!r}")
        for block in self.transformer.h:
            block.attn.use_sdpa = name == "sdpa"

    def _embed(self, input_ids: Tensor) -> Tensor:
        """The token embedding; an id the table lacks (a tokenizer from another checkpoint, a config.json whose
        vocab_size was cut) is a ValueError naming the ids and the limit, not IndexError from deep in torch."""
        try:
            return self.transformer.wte(input_ids)
        except IndexError:
            low, high, size = int(input_ids.min()), int(input_ids.max()), self.config.vocab_size
            raise ValueError(
                f"token ids {low}..{high} do not fit this model's embedding of {size} tokens (config.json "
                f"vocab_size); the tokenizer does not match the checkpoint (Qwen's has 151,851 tokens)"
            ) from None

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int = 0,
        cache_positions: Tensor | list[int] | None = None,
        logits_positions: Tensor | list[int] | None = None,
        return_logits: bool = True,
        labels: Tensor | None = None,
        **ignored,  # position_ids, token_type_ids, return_dict...: accepted, unused (as in the reference)
    ) -> CausalLMOutput:
        """Run S new tokens on top of `past_key_values` (which is filled in place).

        Args:
            input_ids: [B, S] token ids (or `inputs_embeds` [B, S, H]).
            attention_mask: [B, P+S], 1 for real tokens and 0 for padding, covering cached tokens too.
            past_key_values: a KVCache holding P tokens, or None.
            use_cache: make a cache when none is given (default: config.use_cache).
            logits_to_keep: if > 0, compute logits only for the last N positions.
            cache_positions: per-row count of tokens already in the cache, for a continuous batch whose
                rows sit at different positions (the caller tracks them; `cache.length` is left alone).
            logits_positions: per-row index in [0, S) whose logits to compute (right-padded chunks of
                different lengths); logits come back as [B, 1, V].
            return_logits: False skips lm_head (logits None): training computes its loss from
                `hidden_states` in chunks, and even one position's logits cost a pass over the 151,936-row head.
            labels: [B, S] targets (-100 = ignored): `loss` is the cross-entropy of position t's logits
                against label t+1, as in the reference (qwenlm's finetuning uses a chunked loss instead).
        """
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(input_ids.shape)} "
                             "(one sequence: ids[None])")  # fmt: skip
        if labels is not None and (logits_to_keep or logits_positions is not None or not return_logits):
            raise ValueError("labels need the logits of every position (no logits_to_keep / logits_positions)")
        x = self._embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        cache = past_key_values
        if cache is None and (self.config.use_cache if use_cache is None else use_cache) and not self.training:
            cache = KVCache.for_model(self, batch_size=B, capacity=S)
        start: int | Tensor
        if cache_positions is not None:
            if cache is None:
                raise ValueError("cache_positions needs past_key_values")
            rows = torch.as_tensor(cache_positions, dtype=torch.long).cpu()
            start = int(rows[0]) if bool((rows == rows[0]).all()) else rows
        else:
            start = cache.length if cache is not None else 0
        total = start + S if isinstance(start, int) else int(start.max()) + S
        self._check_lengths(B, total, attention_mask, cache)
        if cache is not None:
            cache.reserve(total)

        # NTK alpha is chosen at prefill and kept while decoding; training never uses NTK or LogN.
        # A cache carries the alpha of its prefill (or one preset by a caller doing chunked prefill).
        inference = not self.training
        if cache is not None and cache.ntk_alpha is not None:
            alphas = cache.ntk_alpha
        elif inference and self.config.use_dynamic_ntk:
            alphas = ntk_alphas(self.config, total, attention_mask, B)
        else:
            alphas = torch.ones(B)
        if cache is not None:
            cache.ntk_alpha = alphas
        use_logn = inference and self.config.use_logn_attn and total > self.config.seq_length
        cos, sin = rope_cos_sin(self.config, alphas, start, S)
        logn = logn_scale(start, S, self.config.seq_length).view(-1, 1, S, 1) if use_logn else None

        with_bias = needs_bias(attention_mask, start, S)
        steps: dict[torch.device, _Step] = {}
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            device = block.ln_1.weight.device  # layers may sit on different GPUs (device_map="auto")
            if device not in steps:
                steps[device] = _Step(
                    cos=cos.to(device), sin=sin.to(device),
                    bias=attention_bias(attention_mask, start, S, x.dtype, device) if with_bias else None,
                    logn=logn.to(device) if logn is not None else None, start=start, cache=cache,
                )  # fmt: skip
            x = block(x.to(device), steps[device])
        if cache is not None and cache_positions is None:
            cache.length = total

        x = self.transformer.ln_f(x.to(self.transformer.ln_f.weight.device))
        if not return_logits:
            return CausalLMOutput(logits=None, past_key_values=cache, hidden_states=x)
        if logits_positions is not None:
            rows = torch.arange(B, device=x.device)
            kept = x[rows, torch.as_tensor(logits_positions, device=x.device)][:, None]
        else:
            kept = x[:, -logits_to_keep:] if logits_to_keep > 0 else x
        logits = self.lm_head(kept.to(_device_of(self.lm_head)))
        loss = None
        if labels is not None:  # the reference's loss: shift by one, CrossEntropyLoss in the logits' dtype
            shifted = labels.to(logits.device)[..., 1:].reshape(-1)
            loss = F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), shifted, ignore_index=-100)
        return CausalLMOutput(logits=logits, past_key_values=cache, hidden_states=x, loss=loss)

    def _check_lengths(self, batch: int, total: int, attention_mask: Tensor | None, cache: KVCache | None) -> None:
        limit = self.config.max_context_length
        if total > limit:
            raise ContextLengthError(
                f"sequence of {total} tokens does not fit the model's context of {limit} tokens "
                f"(seq_length={self.config.seq_length}, dynamic NTK "
                f"{'on' if self.config.use_dynamic_ntk else 'off'})"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, total):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({batch}, {total}): "
                "one entry per cached plus new token"
            )
        if cache is not None and cache.batch_size != batch:
            raise ValueError(f"past_key_values holds {cache.batch_size} rows but the input has {batch}")

    # ---- transformers / reference conveniences; the work lives in generation/ and chat.py ------
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, generation_config=None,
                 **overrides) -> Tensor:  # fmt: skip
        """Prompt + continuation ids, as transformers returns them, sampling per `generation_config`
        (default: the checkpoint's) with `overrides` (max_new_tokens, do_sample, temperature, top_k,
        top_p, repetition_penalty, eos_token_id, pad_token_id, stop_words_ids, seed)."""
        from ..generation.generate import hf_generate  # generation sits above the model

        return hf_generate(self, input_ids, attention_mask, generation_config, **overrides)

    def chat(self, tokenizer, query: str, history=None, system: str = "You are a helpful assistant.", **kwargs):
        """`(response, new_history)` for one turn; see `qwenlm.chat.chat`."""
        from ..chat import chat

        return chat(self, tokenizer, query, history, system, **kwargs)

    def chat_stream(self, tokenizer, query: str, history=None, system: str = "You are a helpful assistant.",
                    **kwargs):  # fmt: skip
        """Yield the growing response; see `qwenlm.chat.chat_stream`."""
        from ..chat import chat_stream

        return chat_stream(self, tokenizer, query, history, system, **kwargs)

    def batch_chat(self, tokenizer, queries, histories=None, system: str = "You are a helpful assistant.", **kwargs):
        """Several conversations in one batch; see `qwenlm.chat.batch_chat`."""
        from ..chat import batch_chat

        return batch_chat(self, tokenizer, queries, histories, system, **kwargs)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init of spec 2.13 (N(0, 0.02); c_proj scaled by 1/sqrt(2L); norms 1; biases 0)."""
        std = self.config.initializer_range
        proj_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, param in self.named_parameters():
            with torch.no_grad():
                if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, proj_std if name.endswith("c_proj.weight") else std, generator=generator)
