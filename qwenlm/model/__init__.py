"""The Qwen v1 model: config, math, KV cache and checkpoint loading."""

from .config import ContextLengthError, GenerationConfig, QwenConfig
from .kv_cache import KVCache
from .loading import CheckpointError, load_model
from .qwen import CausalLMOutput, QWenLMHeadModel

__all__ = [
    "CausalLMOutput", "CheckpointError", "ContextLengthError", "GenerationConfig", "KVCache",
    "QWenLMHeadModel", "QwenConfig", "load_model",
]  # fmt: skip
