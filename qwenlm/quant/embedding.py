"""`QuantEmbedding`: the token embedding table stored as int8/int4 codes, dequantized row by row.

Qwen's vocabulary is large (151,936 rows), so at the 1.8B shape the embedding is a sixth of the model and,
left in bf16, it alone keeps an int4 model above a third of its bf16 size. A lookup touches a handful of
rows, so they are dequantized on the fly (exactly the weights a QuantLinear of the same codes would use):

    emb = QuantEmbedding.from_float(wte.weight, bits=4, group_size=128, dtype=torch.bfloat16)
    x = emb(input_ids)                          # [..., hidden] in `dtype`
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels import QuantizedWeight, dequantize
from .onthefly import quantize_packed


class QuantEmbedding(nn.Module):
    """nn.Embedding look-alike over a weight-only quantized table (rows = token ids)."""

    def __init__(self, qweight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.out_features, qweight.in_features
        self.bits, self.group_size = qweight.bits, qweight.group_size
        self.dtype = dtype  # what lookups return: the model's compute dtype
        self.register_buffer("qdata", qweight.qdata)
        self.register_buffer("scales", qweight.scales)
        self.register_buffer("zeros", qweight.zeros)

    @classmethod
    def from_float(
        cls, weight: Tensor, bits: int, group_size: int, *, sym: bool = True, dtype: torch.dtype | None = None
    ) -> QuantEmbedding:
        """Round-to-nearest quantization of a float table [vocab, hidden], groups along the hidden size."""
        return cls(quantize_packed(weight, bits, group_size, sym), dtype or weight.dtype)

    def _rows(self, ids: Tensor) -> QuantizedWeight:
        return QuantizedWeight(
            self.qdata.index_select(0, ids),
            self.scales.index_select(0, ids).float(),  # float(): a no-op unless .to(dtype) converted it
            self.zeros.index_select(0, ids),
            self.bits,
            self.group_size,
            self.embedding_dim,
        )

    def forward(self, input_ids: Tensor) -> Tensor:
        flat = input_ids.reshape(-1).to(self.qdata.device)  # index_select rejects out-of-range ids itself
        rows = dequantize(self._rows(flat), self.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole table [num_embeddings, embedding_dim] as lookups see it (for tests and conversion)."""
        return dequantize(self._rows(torch.arange(self.num_embeddings, device=self.qdata.device)), dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"
