"""The contract between a plugin that loads quantized linear layers and one that computes with
their weights itself.

Fused LoRA needs a frozen base layer's weight as floats. Two ways in, and neither plugin imports
the other, nor does the core import (or name) any quantization library:

- a layer of a plugin satisfies the `DequantizableLinear` protocol and hands back its weight;
- a layer of a third-party library is described by a `QuantizedLayerKind` that the plugin which
  loads such layers registers when it is imported (`register_quantized_layer`); its matcher
  reads the layer's class hierarchy (`class_paths`), so the library is imported only by the
  dequantizer, when one of its layers is actually met.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


def _always_supported(layer: torch.nn.Module) -> str | None:
    return None


@dataclass(frozen=True)
class QuantizedLayerKind:
    """How to recognise one family of a library's quantized linear layers and read W as floats.

    `name` is the value of the `base_layer` option that selects these layers. `dequantizer` is
    called once per layer and returns a function giving W as a floating (out_features,
    in_features) tensor each time it is called (the weight may be replaced between calls).
    `unsupported_reason` says why a matched layer cannot be read that way, or None.
    """

    name: str
    matches: Callable[[torch.nn.Module], bool]
    dequantizer: Callable[[torch.nn.Module], Callable[[], torch.Tensor]]
    unsupported_reason: Callable[[torch.nn.Module], str | None] = _always_supported


# name -> kind; filled by plugins at import. It describes classes of installed libraries (like
# peft's custom-module dispatch), not the state of a run, so one table serves the process.
_KINDS: dict[str, QuantizedLayerKind] = {}


def register_quantized_layer(kind: QuantizedLayerKind) -> None:
    """Make `kind` known to `quantized_layer_kind`; registering a name again replaces it."""
    _KINDS[kind.name] = kind


def quantized_layer_kinds() -> tuple[QuantizedLayerKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_KINDS.values())


def quantized_layer_kind(layer: torch.nn.Module) -> QuantizedLayerKind | None:
    """The first registered kind whose matcher accepts `layer`, or None."""
    return next((kind for kind in _KINDS.values() if kind.matches(layer)), None)


def class_paths(layer: torch.nn.Module) -> frozenset[str]:
    """`module.QualName` of every class in the layer's hierarchy (matching without importing)."""
    return frozenset(f"{c.__module__}.{c.__qualname__}" for c in type(layer).__mro__)
