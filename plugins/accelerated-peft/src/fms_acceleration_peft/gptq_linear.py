"""GPTQLinear: a frozen linear layer held in the GPTQ format, differentiable in its input.

Its buffers carry the checkpoint's names and layout (`qweight`, `qzeros`, `scales`, `g_idx`,
`bias`), so a state dict that auto_gptq, gptqmodel or transformers wrote loads into it as is
and one it saves loads there. LoRA trains on top of it through peft.

Nothing here imports the framework or transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from .gptq_format import GPTQLayout, dequantize, pack_columns, pack_rows
from .gptq_matmul import PATHS, gptq_matmul
from .gptq_quantizer import QuantizedWeight, quantize_rtn


class GPTQLinear(nn.Module):
    """y = x @ W + b with W decoded from GPTQ codes on the fly (Triton on CUDA, torch on CPU).

    Satisfies fms_acceleration.quantized_linear.DequantizableLinear, so fused LoRA kernels of
    other plugins can read its weight without importing this package."""

    quant_method = "gptq"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        *,
        zero_offset: int = 1,
        path: str = "auto",
        scales_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.layout = GPTQLayout(in_features, out_features, bits, group_size, zero_offset)
        if path not in PATHS:
            raise ValueError(f"path={path!r} is not one of {', '.join(PATHS)}")
        self.path = path
        shapes = self.layout.shapes()
        for name in ("qweight", "qzeros", "g_idx"):
            self.register_buffer(name, torch.zeros(shapes[name], dtype=torch.int32, device=device))
        floats = {"dtype": scales_dtype, "device": device}
        self.register_buffer("scales", torch.zeros(shapes["scales"], **floats))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, **floats))
        else:
            self.bias = None

    # the names peft and the GPTQ packages read
    @property
    def in_features(self) -> int:
        """Input width."""
        return self.layout.in_features

    @property
    def out_features(self) -> int:
        """Output width."""
        return self.layout.out_features

    infeatures = in_features
    outfeatures = out_features

    @property
    def bits(self) -> int:
        """Bits per code."""
        return self.layout.bits

    @property
    def group_size(self) -> int:
        """Input rows sharing a scale (-1: all)."""
        return self.layout.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x's dtype (the autocast dtype if on)."""
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = gptq_matmul(
            x,
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            self.layout.bits,
            self.layout.zero_offset,
            self.path,
        )
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The frozen weight as an fp32 (out_features, in_features) tensor."""
        weight = dequantize(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.layout.zero_offset
        )
        return weight.t()

    def load_quantized(self, quantized: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        """Pack `quantized` (and the bias) into this layer's buffers."""
        zeros = quantized.zeros - self.layout.zero_offset
        device = self.qweight.device
        self.qweight.copy_(pack_rows(quantized.codes, self.bits).to(device))
        self.qzeros.copy_(pack_columns(zeros, self.bits).to(device))
        self.scales.copy_(quantized.scales.to(device, self.scales.dtype))
        self.g_idx.copy_(quantized.g_idx.to(device))
        if bias is not None:
            if self.bias is None:
                raise ValueError("this GPTQLinear was built without a bias")
            self.bias.copy_(bias.detach().to(device, self.bias.dtype))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        path: str = "auto",
        scales_dtype: torch.dtype = torch.float16,
    ) -> GPTQLinear:
        """`linear` quantized by round-to-nearest per group (no calibration), e.g. for tests."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bits,
            group_size,
            bias=linear.bias is not None,
            path=path,
            scales_dtype=scales_dtype,
            device=linear.weight.device,
        )
        # the "gptq" format stores zero - 1, so an asymmetric zero of 0 cannot be written
        quantized = quantize_rtn(
            linear.weight, bits, group_size, sym, min_zero=layer.layout.zero_offset
        )
        layer.load_quantized(quantized, linear.bias)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, path={self.path}"
        )
