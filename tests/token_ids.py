"""Random token ids for model tests (a plain module: test files import it by name, which a conftest.py cannot
promise once tests/eval/ has its own)."""

import torch


def random_ids(batch: int, length: int, seed: int = 0, high: int = 151643) -> torch.Tensor:
    """Random regular-token ids [batch, length], reproducible."""
    return torch.randint(0, high, (batch, length), generator=torch.Generator().manual_seed(seed))
