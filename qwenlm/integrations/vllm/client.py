"""`VLLMEngineClient`: qwenlm's `EngineClient` over vLLM's async engine, one engine per NTK alpha.

`qwenlm serve --backend vllm` puts qwenlm's FastAPI front end (OpenAI schema, ChatML and ReAct prompts,
usage, auth, errors) in front of this client. vLLM runs the model (tensor/pipeline/data parallel, Ray);
qwenlm keeps the text: vLLM returns token ids only, and the same `TextStream` and stop-word check as
qwenlm's own engine turn them into text deltas and finish reasons, so replies end exactly where they
would on `--backend qwenlm`.

Exact long context: Qwen's NTK alpha depends on the prompt length (1 up to seq_length, then 3, 7, ...),
so the client starts one vLLM engine per alpha a prompt up to max_model_len can get and sends each
request to the engine of its prompt's alpha (routing.py).

    client = VLLMEngineClient.start("Qwen-7B-Chat", max_model_len=16384, engine_kwargs={"tensor_parallel_size": 2})
    async for out in client.generate(prompt_ids, params, request_id="r1"): ...
"""

from __future__ import annotations

import collections
import copy
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...engine.protocol import (
    EngineBusyError,
    EngineStats,
    RequestOutput,
    TokenConstraint,
    TokenLogprob,
    check_request_fits,
)
from ...generation.generate import TextStream
from ...generation.params import SamplingParams
from ...generation.stopping import StopWordTail
from ...model.config import GenerationConfig, QwenConfig
from ...tokenizer import QwenTokenizer
from .routing import ALPHA_KEY, ROUTED_KEY, alpha_buckets, prompt_alpha


@dataclass
class _Running:
    """qwenlm's view of one request that vLLM is generating."""

    params: SamplingParams
    text: TextStream
    stop_words: StopWordTail
    output_ids: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.perf_counter)

    def push(self, token: int) -> tuple[str, str | None]:
        """(text to show, finish reason or None) after `token`: qwenlm engine's rules in its order (stop
        string, eos, Qwen stop word, length); the text is flushed when the request ends."""
        self.output_ids.append(token)
        text, hit_stop = self.text.push(token)
        reason = None
        if self.stop_words.push(token) or hit_stop or token in self.params.eos_token_ids:
            reason = "stop"
        elif len(self.output_ids) >= self.params.max_new_tokens:
            reason = "length"
        if reason is not None and not hit_stop:
            text += self.text.finish()
            reason = "stop" if self.text.stopped else reason
        return text, reason


def vllm_sampling_params(params: SamplingParams, logprobs: int | None = None, prompt_logprobs: int | None = None):
    """vLLM `SamplingParams` for qwenlm's: the same sampling, token ids only (qwenlm detokenizes), deltas.

    vLLM stops on the eos ids and the single-token Qwen stop words (`ignore_eos`: none of its own); stop
    strings and multi-token stop words are qwenlm's to find, and it aborts the request when they hit.
    """
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    stop_ids = sorted({*params.eos_token_ids, *(seq[0] for seq in params.stop_words_ids if len(seq) == 1)})
    return VLLMSamplingParams(
        n=1,
        temperature=0.0 if params.is_greedy else params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        seed=params.seed,
        max_tokens=params.max_new_tokens,
        stop_token_ids=stop_ids,
        ignore_eos=True,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=dict(params.logit_bias) or None,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


def _token_logprob(token: int, entry: Any, top_n: int) -> TokenLogprob:
    """qwenlm's TokenLogprob from vLLM's {token id: Logprob(logprob, rank)} at one position."""
    ranked = sorted(entry.items(), key=lambda item: item[1].rank if item[1].rank is not None else sys.maxsize)
    top = [(tid, float(lp.logprob)) for tid, lp in ranked if lp.rank is not None and lp.rank <= top_n][:top_n]
    return TokenLogprob(token, float(entry[token].logprob), top)


class VLLMEngineClient:
    """The `EngineClient` the HTTP server talks to, over one vLLM `AsyncLLM` per NTK alpha."""

    def __init__(self, engines: dict[int, Any], tokenizer: QwenTokenizer, config: QwenConfig,
                 generation_config: GenerationConfig, model_name: str, max_model_len: int,
                 capacity: int) -> None:  # fmt: skip
        """engines: alpha -> AsyncLLM (one entry: it takes every request); capacity: requests in flight
        beyond which new ones get EngineBusyError."""
        self.engines, self.tokenizer, self.config = engines, tokenizer, config
        self.generation_config, self.model_name, self.max_model_len = generation_config, model_name, max_model_len
        self.capacity = capacity
        self._running: dict[str, _Running] = {}
        self._stats = EngineStats()
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)

    # ---- start-up --------------------------------------------------------------------------------
    @classmethod
    def start(cls, model: str, *, model_name: str | None = None, max_model_len: int | None = None,
              exact_long_context: bool | None = None, max_queue: int = 256,
              engine_kwargs: dict[str, Any] | None = None) -> VLLMEngineClient:  # fmt: skip
        """Start the vLLM engines for checkpoint folder `model`.

        Args:
            max_model_len: prompt + completion tokens per request; default seq_length without exact long
                context, else min(Qwen's context, 8192) as qwenlm's own engine.
            exact_long_context: one engine per NTK alpha up to max_model_len; default on when the config
                enables dynamic NTK.
            engine_kwargs: vLLM engine arguments (tensor_parallel_size, pipeline_parallel_size,
                data_parallel_size, distributed_executor_backend, dtype, gpu_memory_utilization (shared
                by all engines), max_num_seqs, enforce_eager, ...).
        """
        from . import register

        register()  # the entry point does this too; doing it here makes it independent of installed metadata
        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--backend vllm needs a checkpoint folder with config.json; {folder} has none")
        config = QwenConfig.from_pretrained(folder)
        exact = config.use_dynamic_ntk if exact_long_context is None else exact_long_context
        if max_model_len is None:
            max_model_len = min(config.max_context_length, 8192) if exact else config.seq_length
        if max_model_len > config.max_context_length:
            raise ValueError(f"--max-model-len {max_model_len} exceeds Qwen's context of {config.max_context_length}")
        if exact:
            alphas = [b.alpha for b in alpha_buckets(config.seq_length, max_model_len, config.use_dynamic_ntk)]
        else:
            alphas = [1]
        kwargs = dict(engine_kwargs or {})
        share = kwargs.pop("gpu_memory_utilization", 0.9) / len(alphas)  # the engines share the GPUs
        if max_model_len > min(config.seq_length, config.max_position_embeddings):
            # vLLM caps max_model_len at seq_length unless told otherwise; NTK + LogN make longer contexts
            # valid up to Qwen's limit, checked above.
            os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        engines = {}
        try:
            for alpha in alphas:
                print(f"starting vLLM engine {len(engines) + 1}/{len(alphas)} (NTK alpha {alpha})", file=sys.stderr)
                overrides = {ALPHA_KEY: alpha, ROUTED_KEY: exact}
                engines[alpha] = _start_engine(str(folder), max_model_len, overrides, share, kwargs)
        except BaseException:
            for engine in engines.values():
                engine.shutdown()
            raise
        tokenizer = QwenTokenizer.from_pretrained(folder)
        gen_file = folder / "generation_config.json"
        generation = GenerationConfig.from_pretrained(gen_file) if gen_file.is_file() else GenerationConfig()
        per_engine = kwargs.get("max_num_seqs", 256)
        return cls(engines, tokenizer, config, generation, model_name or folder.name, max_model_len,
                   per_engine * len(engines) + max_queue)  # fmt: skip

    def shutdown(self, timeout: float | None = None) -> None:
        for engine in self.engines.values():
            engine.shutdown()

    # ---- EngineClient ----------------------------------------------------------------------------
    def engine_for(self, prompt_len: int) -> Any:
        """The engine whose NTK alpha is the prompt's (the only engine without exact long context)."""
        if len(self.engines) == 1:
            return next(iter(self.engines.values()))
        return self.engines[prompt_alpha(prompt_len, self.config.seq_length, self.config.use_dynamic_ntk)]

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, logprobs: int | None = None,
        *, prompt_logprobs: int | None = None, constraint: TokenConstraint | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Stream one request's outputs (see `EngineClient.generate`); leaving early aborts it in vLLM."""
        if constraint is not None:
            raise ValueError("grammar-constrained output (response_format, guided decoding) is not supported "
                             "with --backend vllm; use --backend qwenlm")  # fmt: skip
        check_request_fits(prompt_ids, params.max_new_tokens, self.max_model_len)
        if request_id in self._running:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(self._running) >= self.capacity:
            raise EngineBusyError(f"{len(self._running)} requests are in flight (the limit); retry later")
        engine = self.engine_for(len(prompt_ids))
        state = _Running(params, TextStream(self.tokenizer, params), StopWordTail(params.stop_words_ids, prompt_ids))
        self._running[request_id] = state
        self._stats.requests_total += 1
        self._stats.prompt_tokens_total += len(prompt_ids)
        vllm_params = vllm_sampling_params(params, logprobs, prompt_logprobs)
        stream = engine.generate({"prompt_token_ids": list(prompt_ids)}, vllm_params, request_id)
        vllm_done = False
        try:
            async for out in stream:
                vllm_done = out.finished
                result = self._convert(request_id, prompt_ids, state, out, logprobs, prompt_logprobs)
                yield result
                if result.finished:
                    break
        finally:  # finished here (a stop string, a stop word), client gone or an error: vLLM stops too
            self._running.pop(request_id, None)
            await stream.aclose()
            if not vllm_done:
                await engine.abort(request_id)

    def _convert(self, request_id: str, prompt_ids: list[int], state: _Running, out: Any, logprobs: int | None,
                 prompt_logprobs: int | None) -> RequestOutput:  # fmt: skip
        """One vLLM delta -> one qwenlm RequestOutput (tokens past a qwenlm-side stop are dropped)."""
        completion = out.outputs[0]
        tokens, texts, lps, reason = [], [], [], None
        for i, token in enumerate(completion.token_ids):
            text, reason = state.push(int(token))
            tokens.append(int(token))
            texts.append(text)
            if logprobs is not None and completion.logprobs is not None:
                lps.append(_token_logprob(int(token), completion.logprobs[i], logprobs))
            if reason is not None:
                break
        if reason is None and out.finished:  # vLLM ended it without a token of ours saying so (an abort)
            reason = completion.finish_reason if completion.finish_reason in ("length", "abort") else "abort"
            texts.append(state.text.finish() if reason == "length" else "")
        now = time.perf_counter()
        if tokens and len(state.output_ids) == len(tokens):
            self._stats.record_first_token(now - state.arrival)
            self._stats.cached_prompt_tokens_total += out.num_cached_tokens or 0
        self._stats.generation_tokens_total += len(tokens)
        self._recent.append((now, len(tokens)))
        first_prompt_lps = None
        if prompt_logprobs is not None and out.prompt_logprobs is not None:
            first_prompt_lps = [
                None if entry is None else _token_logprob(prompt_ids[i], entry, prompt_logprobs)
                for i, entry in enumerate(out.prompt_logprobs)
            ]
        return RequestOutput(
            request_id=request_id, token_ids=tokens, text="".join(texts), finish_reason=reason,
            logprobs=lps if logprobs is not None else None, prompt_tokens=len(prompt_ids),
            completion_tokens=len(state.output_ids), cached_tokens=out.num_cached_tokens or 0,
            prompt_logprobs=first_prompt_lps,
        )  # fmt: skip

    async def abort(self, request_id: str) -> None:
        self._running.pop(request_id, None)
        for engine in self.engines.values():
            await engine.abort(request_id)

    def stats(self) -> EngineStats:
        stats = copy.copy(self._stats)
        stats.requests_running = len(self._running)
        if len(self._recent) >= 2:
            span = self._recent[-1][0] - self._recent[0][0]
            stats.tokens_per_second = sum(n for _, n in list(self._recent)[1:]) / span if span > 0 else 0.0
        return stats


def _start_engine(model: str, max_model_len: int, overrides: dict[str, Any], memory_share: float,
                  kwargs: dict[str, Any]) -> Any:  # fmt: skip
    """One vLLM AsyncLLM over the checkpoint; qwenlm does the tokenizing, so vLLM skips its tokenizer."""
    from vllm import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM

    args = {"gpu_memory_utilization": memory_share} if not current_platform.is_cpu() else {}
    engine_args = AsyncEngineArgs(model=model, skip_tokenizer_init=True, max_model_len=max_model_len,
                                  hf_overrides=overrides, disable_log_stats=True, **{**args, **kwargs})  # fmt: skip
    return AsyncLLM.from_engine_args(engine_args)
