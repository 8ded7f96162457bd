"""`QuantLinear`: a weight-only int8/int4 linear layer over the `qwenlm.kernels` weight layout.

It replaces an `nn.Linear` (same in/out features, same call), holds about bits/8 bytes per weight
plus per-group scales and zero points, and has no float `.weight`:

    layer = QuantLinear.from_float(linear.weight, linear.bias, bits=4, group_size=128)
    layer = QuantLinear.from_gptq(tensors, bits=4, group_size=128)      # a GPTQ checkpoint's tensors
    y = layer(x)                                                         # x [..., in_features]
    w = layer.dequantized_weight(torch.float32)                          # [out, in], for tests/conversion
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import QuantizedWeight, dequantize, linear_quantized, pack_quantized
from .formats import default_g_idx, read_gptq
from .onthefly import quantize_packed


class QuantLinear(nn.Module):
    """y = x[..., perm] @ Wq^T + bias, with Wq the dequantized kernel-layout weight.

    `perm` is set for act-order (desc_act) GPTQ weights: their input columns are permuted at load time
    so that every group is contiguous, and the input is gathered the same way in `forward`.
    """

    use_kernels: bool = True  # False: dequantize + F.linear, for comparisons (as qwenlm.model.blocks.Linear)

    def __init__(self, qweight: QuantizedWeight, bias: Tensor | None = None, perm: Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.bits, self.group_size = qweight.bits, qweight.group_size
        # Buffers, so .to(device) and state_dict() see them; the ints stay Python attributes (no device sync).
        self.register_buffer("qdata", qweight.qdata)
        self.register_buffer("scales", qweight.scales)
        self.register_buffer("zeros", qweight.zeros)
        self.register_buffer("bias", bias)
        self.register_buffer("perm", None if perm is None else perm.to(device=qweight.device, dtype=torch.long))

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        bits: int,
        group_size: int,
        *,
        sym: bool = True,
        dtype: torch.dtype | None = None,
    ) -> QuantLinear:
        """Round-to-nearest quantization of a float weight [N, K]; the bias is kept in `dtype`."""
        dtype = dtype or weight.dtype
        bias = None if bias is None else bias.to(device=weight.device, dtype=dtype)
        return cls(quantize_packed(weight, bits, group_size, sym), bias)

    @classmethod
    def from_gptq(
        cls,
        tensors: dict[str, Tensor],
        bits: int,
        group_size: int,
        checkpoint_format: str = "gptq",
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        name: str = "",
    ) -> QuantLinear:
        """From one module's GPTQ checkpoint tensors (qweight, qzeros, scales, g_idx?, bias?).

        An all-zero bias (GPTQ writers store one for every linear) is dropped; any other is kept in
        `dtype`. Act-order g_idx is turned into a column permutation; it needs groups of equal size.
        """
        q, scales, zeros, g_idx = read_gptq(tensors, bits, group_size, checkpoint_format, name=name)
        k = q.shape[1]
        size = k if group_size == -1 else group_size
        perm = None
        if not torch.equal(g_idx, default_g_idx(k, group_size)):
            counts = torch.bincount(g_idx.long(), minlength=k // size)
            if not bool((counts == size).all()):
                raise ValueError(
                    f"{name}.g_idx puts {counts.min().item()} to {counts.max().item()} input features in a group; "
                    f"qwenlm runs act-order weights only when every group has group_size={size} features"
                )
            perm = torch.argsort(g_idx.long(), stable=True)  # group g becomes columns [g*size, (g+1)*size)
            q = q[:, perm]
        bias = tensors.get("bias")
        bias = bias.to(device=device, dtype=dtype) if bias is not None and bool(bias.any()) else None
        device = torch.device(device)
        qweight = pack_quantized(q.to(device), scales.t().float().to(device), zeros.t().to(device), bits, size)
        return cls(qweight, bias, perm)

    # ---- use ------------------------------------------------------------------------------------
    def qweight(self) -> QuantizedWeight:
        """The kernel-layout weight around this module's buffers (rebuilt when .to() replaced them).

        Kept between calls: a fresh QuantizedWeight recomputes its cached layout properties, which cost
        about as much per decode step as the small ops of a layer.
        """
        buffers = self._buffers  # direct: nn.Module.__getattr__ costs ~1 us a lookup, per layer per token
        qdata, scales, zeros = buffers["qdata"], buffers["scales"], buffers["zeros"]
        cached = self.__dict__.get("_qweight")
        if cached is not None and cached.qdata is qdata and cached.scales is scales and cached.zeros is zeros:
            return cached
        # .float() is a no-op unless model.half() / .to(dtype) converted the buffer; only a weight that
        # shares this module's tensors is kept (an in-place load into the buffers then still shows).
        qw = QuantizedWeight(qdata, scales.float(), zeros, self.bits, self.group_size, self.in_features)
        if qw.scales is scales:
            self.__dict__["_qweight"] = qw
        return qw

    def forward(self, x: Tensor) -> Tensor:
        perm, bias = self._buffers["perm"], self._buffers["bias"]
        if perm is not None:
            x = x.index_select(-1, perm)
        bias = None if bias is None else bias.to(x.dtype)
        if not self.use_kernels:
            return F.linear(x, dequantize(self.qweight(), x.dtype), bias)
        return linear_quantized(x, self.qweight(), bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight [out_features, in_features] this layer computes with, in the original column order."""
        w = dequantize(self.qweight(), dtype)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w  # forward uses x[perm[j]] with column j
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, act_order={self.perm is not None}"
        )
