"""GPTQ over a whole causal LM: decoder layer by decoder layer, on calibration activations.

Each decoder layer sees the hidden states the already-quantized layers before it produce. Inside
a layer, linears that read the same input (q/k/v, gate/up) form a stage; stages are quantized in
the order the layer runs them, each on inputs that the quantized stages before it produced
(gptqmodel's and auto_gptq's "true sequential"). A quantized linear keeps its dequantized
weight, so what follows sees the quantization error; the codes are returned for packing.

Works on any model whose decoder layers are one nn.ModuleList of `num_hidden_layers` modules
called with the hidden states first; only nn.Linear modules inside those layers are quantized.
Nothing here imports the framework or transformers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .gptq_quantizer import QuantizedWeight, quantize_gptq, quantize_rtn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQRecipe:
    """How to quantize: the settings gptqmodel's QuantizeConfig calls by the same names."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = 0.01
    min_zero: int = 0


class _Captured(Exception):
    """Stops the model's forward once the first decoder layer's inputs are recorded."""


@dataclass
class LayerCall:
    """One recorded call of a decoder layer: positional and keyword arguments."""

    args: tuple
    kwargs: dict[str, Any]

    def hidden(self) -> torch.Tensor:
        """The hidden states the layer is called with."""
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> LayerCall:
        """The same call on other hidden states."""
        if self.args:
            return LayerCall((hidden, *self.args[1:]), self.kwargs)
        return LayerCall(self.args, {**self.kwargs, "hidden_states": hidden})

    def run(self, layer: nn.Module) -> torch.Tensor:
        """The layer's output hidden states for this call."""
        out = layer(*self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the model's decoder layers."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError(
        f"{type(model).__name__}: found no list of num_hidden_layers={count} decoder layers to "
        "quantize"
    )


def capture_first_layer_calls(
    model: nn.Module, layers: nn.ModuleList, samples: Iterable[dict[str, torch.Tensor]]
) -> list[LayerCall]:
    """The calls the first decoder layer receives, one per calibration sample."""
    calls: list[LayerCall] = []

    def record(module, args, kwargs):
        calls.append(LayerCall(tuple(args), dict(kwargs)))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for sample in samples:
            with contextlib.suppress(_Captured):
                model(**sample, use_cache=False)
    finally:
        handle.remove()
    return calls


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if type(m) is nn.Linear}


def linear_stages(layer: nn.Module, calls: Sequence[LayerCall]) -> list[list[str]]:
    """The layer's linears grouped by shared input, in the order the layer runs them.

    A linear joins the group of the first call that reaches it (an expert a router skips in
    the first sample still gets its stage from a later one)."""
    groups: dict[tuple[int, int], list[str]] = {}
    placed: set[str] = set()
    current = {"call": 0}
    # the inputs seen in this call stay referenced, so no later input can reuse an address
    alive: list[torch.Tensor] = []
    handles = []

    def hook(name):
        def record(module, inputs):
            alive.append(inputs[0])
            if name in placed:
                return
            placed.add(name)
            groups.setdefault((current["call"], inputs[0].data_ptr()), []).append(name)

        return record

    for name, linear in _linears(layer).items():
        handles.append(linear.register_forward_pre_hook(hook(name)))
    try:
        for index, call in enumerate(calls):
            current["call"] = index
            call.run(layer)
            alive.clear()
            if len(placed) == len(handles):
                break
    finally:
        for handle in handles:
            handle.remove()
    return list(groups.values())  # dicts keep insertion order: the order the layer ran them


def accumulate_hessians(
    layer: nn.Module, names: Sequence[str], calls: Sequence[LayerCall]
) -> dict[str, torch.Tensor]:
    """H = 2/n * sum(x x^T) over the n tokens each named linear sees (absent: none seen)."""
    linears = _linears(layer)
    hessians: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = dict.fromkeys(names, 0)
    handles = []

    def hook(name):
        def accumulate(module, inputs):
            x = inputs[0].detach().reshape(-1, module.in_features).float()
            total = tokens[name] + x.shape[0]
            if name not in hessians:
                hessians[name] = torch.zeros(
                    module.in_features, module.in_features, device=x.device
                )
            hessians[name] *= tokens[name] / total
            x = x * (2 / total) ** 0.5
            hessians[name] += x.t() @ x
            tokens[name] = total

        return accumulate

    for name in names:
        handles.append(linears[name].register_forward_pre_hook(hook(name)))
    try:
        for call in calls:
            call.run(layer)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def quantize_decoder_layers(
    model: nn.Module,
    samples: Sequence[dict[str, torch.Tensor]],
    recipe: GPTQRecipe,
    progress: Callable[[str], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """GPTQ every linear of every decoder layer; returns codes by qualified module name.

    The model's linears keep their dequantized weights afterwards (the model computes what
    the quantized checkpoint will)."""
    prefix, layers = decoder_layers(model)
    results: dict[str, QuantizedWeight] = {}
    with torch.no_grad():
        calls = capture_first_layer_calls(model, layers, samples)
        if not calls:
            raise ValueError("no calibration sample reached the first decoder layer")
        for index, layer in enumerate(layers):
            linears = _linears(layer)
            for stage in linear_stages(layer, calls):
                hessians = accumulate_hessians(layer, stage, calls)
                for name in stage:
                    weight = linears[name].weight
                    quantized = quantize_gptq(
                        weight,
                        hessians[name],
                        recipe.bits,
                        recipe.group_size,
                        recipe.sym,
                        recipe.desc_act,
                        recipe.damp_percent,
                        min_zero=recipe.min_zero,
                    )
                    weight.copy_(quantized.dequantize().to(weight.dtype))
                    results[f"{prefix}.{index}.{name}"] = quantized
            # linears no calibration token reached (e.g. unrouted experts): round to nearest
            for name, linear in linears.items():
                qualified = f"{prefix}.{index}.{name}"
                if qualified not in results:
                    logger.warning("GPTQ: %s saw no calibration token; rounded to nearest", name)
                    quantized = quantize_rtn(
                        linear.weight, recipe.bits, recipe.group_size, recipe.sym, recipe.min_zero
                    )
                    linear.weight.copy_(quantized.dequantize().to(linear.weight.dtype))
                    results[qualified] = quantized
            calls = [call.with_hidden(call.run(layer)) for call in calls]
            if progress is not None:
                progress(f"quantized decoder layer {index + 1}/{len(layers)}")
    return results
