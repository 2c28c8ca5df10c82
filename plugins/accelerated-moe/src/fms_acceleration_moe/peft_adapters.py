"""LoRA adapters that peft put on MoE experts, read as grouped updates (kernels.ExpertLoRA).

peft builds, initialises, saves and loads the adapters exactly as on the unpatched model; the
grouped GEMMs only read them (no peft import here: peft's layers are recognised by what they
hold).

- transformers 4.55: peft wraps each expert's nn.Linear (`w1`, `gate_proj`, ...) in a
  lora.Linear: per expert A (r, in), B (out, r), stacked to (E, r, in), (E, out, r) on each
  forward (LoRA weights are small; the base weights stay fused).
- transformers 5: `target_parameters` (or peft >= 0.21 converting the 4.x names) wraps the
  experts module in one ParamWrapper per 3-D parameter: lora_A (E * r, in), expert-major rows;
  lora_B (out, r * E), expert index fastest along its columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fms_acceleration import AccelerationPluginConfigError

from .errors import STANZA
from .kernels import ExpertLoRA


def is_lora_layer(module: torch.nn.Module) -> bool:
    """Whether `module` is a peft LoRA layer (lora.Linear, ParamWrapper, ...)."""
    return all(hasattr(module, a) for a in ("lora_A", "lora_B", "base_layer", "scaling"))


def is_param_wrapper(module: torch.nn.Module) -> bool:
    """Whether `module` is peft's LoRA wrapper of one parameter (transformers 5 experts)."""
    return is_lora_layer(module) and hasattr(module, "parameter_name")


def _refuse(what: str) -> AccelerationPluginConfigError:
    return AccelerationPluginConfigError(
        f"{STANZA}: LoRA on MoE experts: {what}; the grouped expert kernels cannot run it. Leave "
        "the experts out of target_modules / target_parameters, or remove the stanza."
    )


def _active_adapters(layer: torch.nn.Module) -> list[str]:
    if layer.disable_adapters:
        return []
    if getattr(layer, "merged", False):
        raise _refuse("the adapter is merged into the base weights (merge after training)")
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    for adapter in adapters:
        if getattr(layer, "use_dora", {}).get(adapter):
            raise _refuse(f"adapter '{adapter}' uses DoRA")
        if getattr(layer.lora_B[adapter], "bias", None) is not None:
            raise _refuse(f"adapter '{adapter}' has a LoRA bias (lora_bias=True)")
    return adapters


def _dropout(layer: torch.nn.Module, adapter: str):
    if adapter not in layer.lora_dropout:
        return None
    dropout = layer.lora_dropout[adapter]
    return None if isinstance(dropout, torch.nn.Identity) else dropout


def per_expert_loras(
    layers: Sequence[torch.nn.Module], columns: tuple[int, int] | None
) -> list[ExpertLoRA]:
    """The active adapters of one projection's E per-expert layers (transformers 4.55), as
    updates of output `columns` of the fused projection."""
    wrapped = [is_lora_layer(layer) for layer in layers]
    if not any(wrapped):
        return []
    if not all(wrapped):
        raise _refuse(f"only {sum(wrapped)} of {len(layers)} experts carry an adapter")
    first = layers[0]
    loras = []
    for adapter in _active_adapters(first):
        a = [layer.lora_A[adapter].weight for layer in layers]
        b = [layer.lora_B[adapter].weight for layer in layers]
        if len({t.shape for t in a}) > 1 or len({layer.scaling[adapter] for layer in layers}) > 1:
            raise _refuse(f"adapter '{adapter}' has different ranks or alphas per expert")
        scaling, dropout = first.scaling[adapter], _dropout(first, adapter)
        loras.append(ExpertLoRA(torch.stack(a), torch.stack(b), scaling, columns, dropout))
    return loras


def param_wrapper_loras(wrapper: torch.nn.Module) -> list[ExpertLoRA]:
    """The active adapters of a ParamWrapper on a 3-D (E, out, in) expert parameter."""
    if not getattr(wrapper, "_did_swap_in_out_features", False):
        raise _refuse(
            f"peft treats {wrapper.parameter_name} as (experts, in, out); the experts are "
            "(experts, out, in) in transformers"
        )
    experts = wrapper.num_experts
    loras = []
    for adapter in _active_adapters(wrapper):
        a = wrapper.lora_A[adapter].weight
        b = wrapper.lora_B[adapter].weight
        loras.append(
            ExpertLoRA(
                a.reshape(experts, -1, a.shape[-1]),
                b.reshape(b.shape[0], -1, experts).permute(2, 0, 1),
                wrapper.scaling[adapter],
            )
        )
    return loras


def unwrap_param_wrappers(
    module: torch.nn.Module,
) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """(the experts module inside nested ParamWrappers, {parameter name: its wrapper})."""
    wrappers = {}
    while is_param_wrapper(module):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return module, wrappers
