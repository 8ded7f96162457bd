"""Serving engine: continuous batching over a paged KV cache (a memory budget), with prefix caching.

engine = Engine.from_pretrained("Qwen-1_8B-Chat", EngineArgs(max_num_seqs=4))   # offline batch jobs
results = engine.generate_batch(["text", prompt_ids, ...], SamplingParams(max_new_tokens=64))
"""

from ..generation.params import SamplingParams
from .async_engine import AsyncEngine
from .engine import EngineArgs, LLMEngine
from .protocol import EngineBusyError, EngineClient, EngineStats, RequestOutput, TokenLogprob

Engine = LLMEngine

__all__ = [
    "AsyncEngine", "Engine", "EngineArgs", "EngineBusyError", "EngineClient", "EngineStats", "LLMEngine",
    "RequestOutput", "SamplingParams", "TokenLogprob",
]  # fmt: skip
