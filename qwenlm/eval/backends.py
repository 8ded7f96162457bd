"""Where the numbers come from: the model in this process, or an OpenAI-compatible server (`--endpoint`).

Both answer the same four questions, so every task runs unchanged on either:

    backend.choice_logprobs(prefix, suffixes, choice_ids)  # log p(choice | prefix + suffix), full-vocab softmax
    backend.complete(prompts, max_new_tokens, cuts)        # raw continuation text (base models)
    backend.chat(queries, max_new_tokens, ...)             # chat replies (ChatML, default system prompt)
    backend.window_nlls(windows)                           # sum of -log p(token) for tokens 2..L of each window

Exact batching (in-process): rows are RIGHT-padded, so every real token sits at the position it has in a
batch of one (Qwen v1 counts positions from the first slot, padded or not, which is why the reference's left
padding changes scores), and each row's logits are read at its own last real token (`logits_positions`).
The few-shot prefix of a subject is run once into a KVCache and copied into every row of a batch.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..chat_format import DEFAULT_SYSTEM, make_context
from ..model.kv_cache import KVCache
from ..tokenizer import SPECIAL_START_ID
from .extract import cut_at

PAD_ID = SPECIAL_START_ID  # <|endoftext|>; never attended to (right padding, causal attention)
NLL_CHUNK = 1024  # positions per lm_head call when scoring a long window (a 32K x 152K fp32 logit is 20 GB)


# --------------------------------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------------------------------
class InProcessBackend:
    """The loaded model itself."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generation_config = model.generation_config
        self._cached_prefix: list[int] | None = None  # the last subject's few-shot prefix, and its KV
        self._prefix_kv: KVCache | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _prefix_cache(self, prefix: list[int], rows: int, total: int) -> KVCache | None:
        """The prefix's keys/values copied into `rows` rows, or None where reusing them would not equal a
        fresh run: an int8 cache (quantised per chunk), or dynamic NTK switching on past the prefix."""
        config = self.model.config
        if not prefix or config.use_cache_quantization or (config.use_dynamic_ntk and total > config.seq_length):
            return None
        if self._cached_prefix != prefix:
            one = KVCache.for_model(self.model, batch_size=1, capacity=len(prefix))
            ids = torch.tensor([prefix], device=self.device)
            self.model(ids, attention_mask=torch.ones_like(ids), past_key_values=one, logits_to_keep=1)
            self._cached_prefix, self._prefix_kv = list(prefix), one
        one, cache = self._prefix_kv, KVCache.for_model(self.model, batch_size=rows, capacity=total, quantized=False)
        P = len(prefix)
        for layer in range(len(cache)):
            cache.keys[layer][:, :, :P] = one.keys[layer][:, :, :P]  # broadcast row 0 to every row
            cache.values[layer][:, :, :P] = one.values[layer][:, :, :P]
        cache.length = P
        return cache

    @torch.no_grad()
    def choice_logprobs(
        self, prefix: list[int], suffixes: Sequence[list[int]], choice_ids: Sequence[int]
    ) -> list[list[float]]:
        """Per row, log_softmax over the whole vocabulary at the last token of prefix + suffix, at choice_ids."""
        lengths = [len(s) for s in suffixes]
        if min(lengths) < 1:
            raise ValueError("every item needs at least one token after the shared prefix")
        B, P, S = len(suffixes), len(prefix), max(lengths)
        cache = self._prefix_cache(prefix, B, P + S)
        if cache is None and prefix:  # no reuse: run the whole prompts, still right-padded
            return self.choice_logprobs([], [prefix + list(s) for s in suffixes], choice_ids)
        ids = torch.full((B, S), PAD_ID, dtype=torch.long)
        mask = torch.zeros((B, P + S), dtype=torch.long)
        mask[:, :P] = 1
        for row, suffix in enumerate(suffixes):
            ids[row, : len(suffix)] = torch.tensor(suffix)
            mask[row, P : P + len(suffix)] = 1
        logits = self.model(
            ids.to(self.device), attention_mask=mask.to(self.device), past_key_values=cache, use_cache=False,
            logits_positions=[n - 1 for n in lengths],
        ).logits[:, 0]  # fmt: skip
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return logprobs[:, list(choice_ids)].tolist()

    @torch.no_grad()
    def complete(
        self, prompts: Sequence[list[int]], max_new_tokens: int, cuts: tuple[str, ...] = (),
        temperature: float = 0.0, seed: int | None = None,
    ) -> list[str]:  # fmt: skip
        """Continue each prompt as the reference's base scripts do (`model.generate` with the checkpoint's
        generation config, greedy unless a temperature is given) and decode the new tokens special tokens
        included; a row stops early once its text holds one of `cuts` (the caller cuts there anyway)."""
        from ..generation.generate import generate_steps
        from ..generation.params import SamplingParams

        params = SamplingParams.from_generation_config(
            self.generation_config, do_sample=temperature > 0, temperature=temperature or None,
            max_new_tokens=max_new_tokens, seed=seed,
        )  # fmt: skip
        tokens: list[list[int]] = [[] for _ in prompts]
        decoders = [self.tokenizer.stream_decoder() for _ in prompts]
        texts = [""] * len(prompts)
        done = [False] * len(prompts)
        for step in generate_steps(self.model, [list(p) for p in prompts], params, vocab_limit=len(self.tokenizer)):
            for row, token in enumerate(step.token_ids):
                if done[row]:
                    continue
                tokens[row].append(token)
                texts[row] += decoders[row].add(token)
                done[row] = step.finished[row] or any(cut in texts[row] for cut in cuts)
            if all(done):
                break
        return [self.tokenizer.decode(row) for row in tokens]

    def chat(
        self, queries: Sequence[str], max_new_tokens: int, repetition_penalty: float | None = 1.0,
        temperature: float = 0.0, seed: int | None = None,
    ) -> list[str]:  # fmt: skip
        """`chat()` per query (history None, default system prompt), as the reference's chat scripts call it.
        repetition_penalty None keeps the checkpoint's (the plugin script does)."""
        from ..chat import batch_chat

        replies = batch_chat(
            self.model, self.tokenizer, list(queries), None, DEFAULT_SYSTEM, do_sample=temperature > 0,
            temperature=temperature or None, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
            seed=seed,
        )  # fmt: skip
        return [response for response, _ in replies]

    @torch.no_grad()
    def window_nlls(self, windows: Sequence[list[int]]) -> list[float]:
        """-sum log p(x_t | x_<t) for t = 2..L of each window (all windows the same length L)."""
        ids = torch.tensor([list(w) for w in windows], device=self.device)
        hidden = self.model(ids, use_cache=False, logits_to_keep=1).hidden_states  # [B, L, H] after ln_f
        total = torch.zeros(len(windows), dtype=torch.float64)
        for start in range(0, ids.shape[1] - 1, NLL_CHUNK):
            end = min(start + NLL_CHUNK, ids.shape[1] - 1)
            logits = self.model.lm_head(hidden[:, start:end]).float()
            targets = ids[:, start + 1 : end + 1]
            picked = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
            total -= picked.double().sum(dim=1).cpu()
        return total.tolist()


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible server
# --------------------------------------------------------------------------------------------------
class EndpointError(RuntimeError):
    """The server did not answer, refused a request, or cannot give what a protocol needs."""


class EndpointBackend:
    """An OpenAI-compatible server: choices and perplexity from echoed prompt logprobs on /v1/completions (the
        legacy `logprobs.token_logprobs` list), generation through /v1/completions with token-id prompts (chat models:
    the ChatML context, stopped at <|im_end|>)."""

    def __init__(self, url: str, tokenizer, api_key: str | None = None, model_name: str | None = None,
                 timeout: float = 600.0, concurrency: int = 1) -> None:  # fmt: skip
        base = url.rstrip("/")
        self.base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self.echo_max_tokens = 0  # lowered to 1 for servers that refuse max_tokens=0
        self.model_name = model_name or self._first_model()
        self.generation_config = None

    # ---- HTTP --------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise EndpointError(f"{self.base}{path} answered HTTP {err.code}: {detail[:500]}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise EndpointError(f"endpoint {self.base} does not answer ({reason}); is the server running?") from None
        except ValueError:
            raise EndpointError(f"{self.base}{path} did not answer with JSON") from None

    def _first_model(self) -> str:
        models = self._request("GET", "/v1/models").get("data") or []
        if not models:
            raise EndpointError(f"{self.base}/v1/models lists no model; pass --model-name")
        return models[0]["id"]

    def _map(self, fn, items: Sequence) -> list:
        if self.concurrency == 1 or len(items) == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    # ---- prompt logprobs ---------------------------------------------------------------------------
    def _prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float | None]]:
        """token_logprobs of each prompt's own tokens (echo=true, logprobs=1, no or one new token)."""
        body = {"model": self.model_name, "prompt": prompts, "echo": True, "logprobs": 1, "temperature": 0,
                "max_tokens": self.echo_max_tokens}  # fmt: skip
        try:
            response = self._request("POST", "/v1/completions", body)
        except EndpointError as err:
            if self.echo_max_tokens == 0 and "max_tokens" in str(err):
                self.echo_max_tokens = 1  # the legacy servers' minimum; the extra token is ignored
                return self._prompt_logprobs(prompts)
            raise
        choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise EndpointError(f"{self.base}/v1/completions returned {len(choices)} choices for {len(prompts)} "
                                "prompts")  # fmt: skip
        out = []
        for prompt, choice in zip(prompts, choices, strict=True):
            values = ((choice.get("logprobs") or {}).get("token_logprobs")) or []
            if len(values) < len(prompt):
                raise EndpointError(
                    f"{self.base} echoed {len(values)} token logprobs for a {len(prompt)}-token prompt: it does not "
                    "return prompt logprobs (echo=true with logprobs), which multiple choice and perplexity need"
                )
            out.append(values[: len(prompt)])
        return out

    def _need(self, value: float | None) -> float:
        if value is None:
            raise EndpointError(
                f"{self.base} returned null logprobs for echoed prompt tokens: the server lists the prompt but does "
                "not score it, so multiple choice and perplexity cannot be computed through it"
            )
        return float(value)

    def choice_logprobs(
        self, prefix: list[int], suffixes: Sequence[list[int]], choice_ids: Sequence[int]
    ) -> list[list[float]]:
        """Each prompt sent once per choice with the choice token appended; its echoed logprob is
        log_softmax(logits)[choice] at the prompt's last position, what the in-process path computes."""
        prompts = [prefix + list(s) + [c] for s in suffixes for c in choice_ids]
        values = self._prompt_logprobs(prompts)
        flat = [self._need(v[-1]) for v in values]
        k = len(choice_ids)
        return [flat[i * k : (i + 1) * k] for i in range(len(suffixes))]

    def window_nlls(self, windows: Sequence[list[int]]) -> list[float]:
        values = self._prompt_logprobs([list(w) for w in windows])
        return [-math.fsum(self._need(v) for v in row[1:]) for row in values]

    # ---- generation ----------------------------------------------------------------------------------
    def complete(
        self, prompts: Sequence[list[int]], max_new_tokens: int, cuts: tuple[str, ...] = (),
        temperature: float = 0.0, seed: int | None = None,
    ) -> list[str]:  # fmt: skip
        stop = [c for c in cuts if c != "<|endoftext|>"][:4]  # eos ends generation anyway; OpenAI allows 4

        def one(prompt: list[int]) -> str:
            body: dict[str, Any] = {"model": self.model_name, "prompt": list(prompt), "max_tokens": max_new_tokens,
                                    "temperature": temperature, "stop": stop or None}  # fmt: skip
            if seed is not None:
                body["seed"] = seed
            return self._request("POST", "/v1/completions", body)["choices"][0]["text"]

        return self._map(one, list(prompts))

    def chat(
        self, queries: Sequence[str], max_new_tokens: int, repetition_penalty: float | None = 1.0,
        temperature: float = 0.0, seed: int | None = None,
    ) -> list[str]:  # fmt: skip
        """The reference's `model.chat(query)` context (make_context: default system prompt, ChatML) sent as token
        ids to /v1/completions. Not /v1/chat/completions: servers normalise messages there (Qwen's own server
        strips trailing newlines, which changes e.g. every C-Eval chat prompt)."""
        stops = [self.tokenizer.im_end_id, self.tokenizer.im_start_id]

        def one(query: str) -> str:
            ids = make_context(self.tokenizer, query, None, DEFAULT_SYSTEM)[1]
            body: dict[str, Any] = {"model": self.model_name, "prompt": ids, "max_tokens": max_new_tokens,
                                    "temperature": temperature, "stop_token_ids": stops}  # fmt: skip
            if repetition_penalty is not None:
                body["repetition_penalty"] = repetition_penalty  # an extension (qwenlm, vLLM); 1.0 = off
            if seed is not None:
                body["seed"] = seed
            text = self._request("POST", "/v1/completions", body)["choices"][0]["text"]
            return cut_at(text, ("<|im_end|>", "<|im_start|>")).strip()

        return self._map(one, list(queries))
