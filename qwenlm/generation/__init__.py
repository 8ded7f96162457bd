"""Decoding: sampling parameters, pure logits processing, stopping, and the decode loop."""

from .generate import Chunk, GenerationResult, generate, generate_batch, generate_steps, stream, stream_batch
from .params import SamplingParams

__all__ = [
    "Chunk", "GenerationResult", "SamplingParams", "generate", "generate_batch", "generate_steps", "stream",
    "stream_batch",
]  # fmt: skip
