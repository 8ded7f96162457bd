"""How many KV blocks the serving engine gets: `--kv-cache-memory` GiB, or a default share of free memory.

    num_blocks, max_model_len = plan_kv_blocks(model, block_size=16, kv_cache_memory=None, max_num_seqs=8,
                                               max_model_len=8192, max_model_len_given=False)

The pool is allocated (and zeroed, so resident) once at start-up: the server's memory is the weights plus
this budget plus a roughly constant overhead, whatever `--max-num-seqs` and `--max-model-len` say.
"""

from __future__ import annotations

import logging
import os

import torch

from ..model.paged_kv_cache import block_nbytes

logger = logging.getLogger(__name__)

GIB = 1 << 30
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default: of the GPU's whole memory, weights included
CPU_AVAILABLE_SHARE = 0.25  # of the RAM available once the weights are loaded
CPU_CAP_GIB = 4.0


def available_ram() -> int:
    """Bytes of RAM the kernel says can be allocated without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_kv_cache_memory(device: torch.device) -> int:
    """Bytes for the KV blocks when no budget is given. CUDA: 90% of the GPU's memory minus what is in use
    (the weights, other processes), as vLLM's gpu_memory_utilization=0.9. CPU: a quarter of the available
    RAM (measured after the weights are loaded), at most 4 GiB: the machine has other work to do."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(0, int(GPU_MEMORY_UTILIZATION * total) - (total - free))
    return int(min(CPU_AVAILABLE_SHARE * available_ram(), CPU_CAP_GIB * GIB))


def plan_kv_blocks(model, block_size: int, kv_cache_memory: float | None, max_num_seqs: int, max_model_len: int,
                   max_model_len_given: bool) -> tuple[int, int]:  # fmt: skip
    """(number of KV blocks, max_model_len) for `model`.

    With a budget (GiB): as many blocks as fit it. If they cannot hold one request of max_model_len tokens,
    that is an error when max_model_len was asked for, else max_model_len shrinks to what they hold.
    Without: the default share (`default_kv_cache_memory`), but no more than max_num_seqs requests of
    max_model_len tokens can use, and never less than one such request.

    Raises:
        ValueError: the budget holds no block, or fewer tokens than an explicit max_model_len.
    """
    config = model.config
    dtype = model.transformer.h[0].ln_1.weight.dtype
    block_bytes = block_nbytes(config, dtype, block_size, config.use_cache_quantization)
    per_request = -(-max_model_len // block_size)
    if kv_cache_memory is None:
        default = default_kv_cache_memory(model.transformer.h[0].ln_1.weight.device) // block_bytes
        return max(per_request, min(default, max_num_seqs * per_request)), max_model_len
    if kv_cache_memory <= 0:
        raise ValueError(f"--kv-cache-memory must be positive, got {kv_cache_memory:g} GiB")
    blocks = int(kv_cache_memory * GIB) // block_bytes
    what = f"--kv-cache-memory {kv_cache_memory:g} GiB"
    if blocks < 1:
        raise ValueError(f"{what} holds no KV block ({block_bytes / 2**20:.2f} MiB for {block_size} tokens)")
    if blocks < per_request:
        if max_model_len_given:
            raise ValueError(f"{what} holds {blocks * block_size} tokens of KV cache, fewer than one request of "
                             f"--max-model-len {max_model_len} needs; raise the one or lower the other")  # fmt: skip
        logger.warning("%s holds %d tokens: max_model_len lowered from %d", what, blocks * block_size, max_model_len)
        max_model_len = blocks * block_size
    return blocks, max_model_len
