"""qwenlm: the Qwen (v1) language models in plain PyTorch, faithful to the original release.

from qwenlm import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("Qwen-1_8B-Chat")
model = AutoModelForCausalLM.from_pretrained("Qwen-1_8B-Chat", device_map="cpu")
"""

from .auto import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from .engine import AsyncEngine, Engine, EngineArgs
from .generation import SamplingParams
from .model import (
    CheckpointError,
    ContextLengthError,
    GenerationConfig,
    KVCache,
    QwenConfig,
    QWenLMHeadModel,
    load_model,
)
from .tokenizer import QwenTokenizer

__version__ = "0.1.0"

__all__ = [
    "AsyncEngine", "AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "CheckpointError", "ContextLengthError",
    "Engine", "EngineArgs", "SamplingParams",
    "GenerationConfig", "KVCache", "QWenLMHeadModel", "QwenConfig", "QwenTokenizer", "load_model",
]  # fmt: skip
