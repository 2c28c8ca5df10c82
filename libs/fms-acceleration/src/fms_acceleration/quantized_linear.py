"""The contract between a plugin that loads quantized linear layers and one that computes with
their weights itself.

accelerated-peft's GPTQLinear keeps its weight packed; fused-ops-and-kernels' fused LoRA needs
that weight as floats. Neither plugin imports the other: the loader's layer satisfies this
protocol, and the fusing plugin asks `isinstance(layer, DequantizableLinear)`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DequantizableLinear(Protocol):
    """A frozen quantized linear layer y = x @ W^T + bias that can hand back W as floats."""

    quant_method: str  # as in a checkpoint's quantization_config, e.g. "gptq"
    in_features: int
    out_features: int
    bias: torch.Tensor | None  # frozen

    def dequantized_weight(self) -> torch.Tensor:
        """W as a floating (out_features, in_features) tensor."""
        ...
