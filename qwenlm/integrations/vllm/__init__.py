"""Qwen v1 on vLLM: a plugin (`pip install "qwenlm[vllm]"`), and the engine behind `qwenlm serve --backend vllm`.

With qwenlm installed, vLLM finds `register` through the `vllm.general_plugins` entry point in every one of
its processes, and then loads original Qwen v1 checkpoints as they are:

    vllm serve ~/models/Qwen-7B-Chat                                   # no --trust-remote-code, no --chat-template
    vllm serve ~/models/Qwen-7B-Chat --hf-overrides '{"qwenlm_ntk_alpha": 3}' --max-model-len 16384

Nothing here imports vLLM until vLLM calls `register` (or `qwenlm serve --backend vllm` starts an engine).
"""

from __future__ import annotations


def register() -> None:
    """Make vLLM load Qwen v1: the transformers classes (below) and the model class, registered by name so that
    each vLLM process imports it only when it builds a model."""
    from vllm import ModelRegistry

    register_transformers()
    ModelRegistry.register_model("QWenLMHeadModel", "qwenlm.integrations.vllm.model:QWenLMHeadModel")


def register_transformers() -> None:
    """The `qwen` config and tokenizer for transformers' AutoConfig / AutoTokenizer (no remote code needed)."""
    from transformers import AutoConfig, AutoTokenizer

    from .hf_config import QWenConfig
    from .hf_tokenizer import QWenTokenizer

    AutoConfig.register("qwen", QWenConfig, exist_ok=True)
    AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)
