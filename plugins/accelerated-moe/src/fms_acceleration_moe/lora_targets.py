"""LoRA targets this plugin refuses rather than leave silently untrained.

- transformers 4.55 Granite keeps its experts as `ParallelExperts` (input_linear,
  output_linear), which peft cannot wrap on the original model either; after the swap peft
  would not find them and, with other targets present, skip them without a word.
- Expert shards (ep_degree > 1) carry no adapters: each process would hold adapters for
  experts it never runs.
"""

from __future__ import annotations

from typing import Any

import torch

from fms_acceleration import AccelerationPluginConfigError, compat

from .errors import STANZA
from .models.architectures import MoeArchSpec
from .models.blocks import moe_blocks
from .peft_adapters import is_lora_layer

GRANITE_EXPERTS = ("input_linear", "output_linear")


def lora_config(modifiable_args: Any) -> Any:
    """The peft LoRA config among the modifiable args (fms-hf-tuning passes it first)."""
    for arg in modifiable_args if isinstance(modifiable_args, tuple) else ():
        if hasattr(arg, "target_modules"):
            return arg
    return None


def refuse_parallel_experts_lora(
    model: torch.nn.Module, spec: MoeArchSpec, modifiable_args: Any
) -> None:
    """On transformers 4.55, refuse a LoRA config that names Granite's ParallelExperts."""
    config = lora_config(modifiable_args)
    if config is None or spec.per_expert_names is not None or compat.fused_moe_experts():
        return
    from peft.tuners.tuners_utils import check_target_module_exists

    for name, block in moe_blocks(model, spec):
        for leaf in GRANITE_EXPERTS:
            key = f"{name}.{leaf}"
            if hasattr(block, leaf) and check_target_module_exists(config, key):
                raise AccelerationPluginConfigError(
                    f"{STANZA}: the LoRA target_modules {config.target_modules!r} name {key}, "
                    f"a {type(getattr(block, leaf)).__name__} peft cannot adapt on transformers "
                    "4.55 (nor on the unpatched model); leave input_linear / output_linear out "
                    "of target_modules, or use transformers 5 with target_parameters."
                )


def refuse_lora_on_expert_shards(model: torch.nn.Module, spec: MoeArchSpec, ep: int) -> None:
    """With expert parallelism, refuse adapters that peft put on the experts."""
    for name, block in moe_blocks(model, spec):
        # transformers 5: ParamWrappers around the experts; 4.55: lora.Linear inside them
        if any(is_lora_layer(module) for module in block.experts.modules()):
            raise AccelerationPluginConfigError(
                f"{STANZA}.ep_degree: {ep} shards the experts over processes, which cannot "
                f"carry LoRA adapters ({name}.experts has some); leave the experts out of the "
                "LoRA targets (attention and router adapters are fine), or set ep_degree: 1."
            )
