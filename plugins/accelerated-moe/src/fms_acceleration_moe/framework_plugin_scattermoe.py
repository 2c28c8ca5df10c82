"""The accelerated-moe plugin: sparse MoE blocks through grouped expert GEMMs (Triton on GPU,
PyTorch on CPU), with optional expert parallelism."""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from pydantic import Field

from fms_acceleration import (
    AccelerationPlugin,
    AccelerationPluginConfigError,
    ModelPatcherRule,
    StanzaModel,
)

from .expert_parallel import (
    EP_RULE,
    expert_mesh,
    expert_shard,
    refuse_fsdp1,
    setting_aside_expert_shards,
    shard_experts,
)
from .grad_norm import clip_grad_norm_
from .kernels.expert_parallel import ExpertShard
from .lora_targets import refuse_lora_on_expert_shards, refuse_parallel_experts_lora
from .models import SUPPORTED_CAUSAL_LMS, arch_spec_for, build_moe_rules
from .models.architectures import STANZA, MoeArchSpec, num_experts
from .models.blocks import experts_modules, experts_rule, peft_experts_rule

# accelerate's FSDP2 preparation, looked up by name where Accelerator.prepare calls it
FSDP2_PREPARE = "accelerate.accelerator.fsdp2_prepare_model"

SCATTERMOE_PATH = "training.moe.scattermoe"


class ScatterMoEOptions(StanzaModel):
    """The `training.moe.scattermoe` stanza."""

    ep_degree: int = Field(default=1, ge=1)
    """expert-parallel degree: experts are sharded over groups of this many processes; 1 keeps
    every expert on every process. Must divide the world size and the number of experts."""
    disable_distributed: bool = False
    """leave the experts to the outer sharding (e.g. FSDP) instead of placing them here; only
    with ep_degree 1"""


class EPDegreeError(AccelerationPluginConfigError, AssertionError):
    """ep_degree does not divide the world size or the experts (an AssertionError in the
    reference, which fms-hf-tuning's tests expect, so it is one here too)."""


def check_ep_degree(ep_degree: int, world_size: int, experts: int | None = None) -> None:
    """Refuse an expert-parallel degree that does not divide the world size (or the experts)."""
    if world_size % ep_degree:
        # the parenthesis is the reference's wording, which fms-hf-tuning's tests match
        raise EPDegreeError(
            f"{STANZA}.ep_degree: {ep_degree} does not divide the world size {world_size} "
            f"(world size ({world_size}) not divisible by ep_size ({ep_degree})); the processes "
            "are split into groups of ep_degree that each hold all experts. Use a divisor of "
            f"{world_size}."
        )
    if experts is not None and experts % ep_degree:
        raise EPDegreeError(
            f"{STANZA}.ep_degree: {ep_degree} does not divide the model's {experts} experts; "
            f"each process holds experts / ep_degree of them. Use a divisor of {experts}."
        )


def _world_size() -> int | None:
    """The number of processes, or None outside a launcher (e.g. `fms-acceleration check`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    size = os.environ.get("WORLD_SIZE")
    return int(size) if size else None


class ScatterMoEAccelerationPlugin(AccelerationPlugin):
    """Replaces the experts of every sparse MoE block with grouped GEMMs that gather and
    scatter tokens in place (ScatterMoE-style), optionally sharding experts over processes."""

    slots = frozenset({"moe_experts"})
    supported_architectures = SUPPORTED_CAUSAL_LMS
    order = 40

    def __init__(self, configurations: dict[str, Any]):
        super().__init__(configurations)
        self._ep_degree = self._check_config_and_maybe_check_values(
            key=SCATTERMOE_PATH + ".ep_degree", default=1
        )
        self._disable_distributed = self._check_config_and_maybe_check_values(
            key=SCATTERMOE_PATH + ".disable_distributed", default=False
        )
        if self._disable_distributed and self._ep_degree > 1:
            raise AccelerationPluginConfigError(
                f"{STANZA}.disable_distributed: true cannot go with ep_degree: "
                f"{self._ep_degree}; sharding experts over processes is this plugin's job, so "
                "it cannot be left to the outer sharding (FSDP). Set ep_degree: 1 or "
                "disable_distributed: false."
            )
        world = _world_size()
        if self._ep_degree > 1 and world is not None:
            check_ep_degree(self._ep_degree, world)
        self._moe_component_module_names: set[str] = set()
        self._spec: MoeArchSpec | None = None
        self._shard: ExpertShard | None = None

    @property
    def requires_augmentation(self) -> bool:
        return True

    def augmentation(self, model: torch.nn.Module, train_args: Any, modifiable_args: tuple):
        """Swap (4.55) or patch the experts of every MoE block, sharded over the expert-parallel
        group when ep_degree > 1 (the rules are applied by the framework)."""
        spec = arch_spec_for(model)
        experts = num_experts(model, spec)
        check_ep_degree(self._ep_degree, _world_size() or 1, experts)
        refuse_parallel_experts_lora(model, spec, modifiable_args)
        rules = build_moe_rules(model, spec, self.model_patcher)
        if self._ep_degree > 1:
            mesh = expert_mesh(self._ep_degree)
            self._shard = expert_shard(mesh, experts)
            shard_experts(self.model_patcher, experts_modules(model, spec), mesh, self._shard)
        rules.append(experts_rule(model, spec, self._shard))
        for rule in rules:
            self.model_patcher.register(rule)
        self._spec = spec
        self._moe_component_module_names = {spec.block_name}
        return model, modifiable_args

    def get_callbacks_and_ready_for_train(
        self, model: torch.nn.Module | None = None, accelerator: Any = None
    ) -> list:
        """peft's adapters on transformers 5 experts run in the grouped GEMMs; with expert
        parallelism, DDP / FSDP2 leave the shards alone and the grad norm covers them."""
        if model is not None and self._spec is not None:
            rule = peft_experts_rule(model, self._spec, self._shard)
            if rule is not None and rule.rule_id not in self.model_patcher.rules:
                self.model_patcher.register(rule)
        if self._shard is None:
            return []
        if model is not None and self._spec is not None:  # set with the shard
            refuse_lora_on_expert_shards(model, self._spec, self._ep_degree)
        if accelerator is not None:
            refuse_fsdp1(accelerator, self._ep_degree)
            wrapped = {rule.rule_id for rule in self.accelerator_patcher.method_rules}
            for method, builder in (
                ("prepare_model", setting_aside_expert_shards),
                ("clip_grad_norm_", _mesh_aware_clip),
            ):
                if f"{EP_RULE}.{method}" not in wrapped:
                    self.accelerator_patcher.wrap_method(f"{EP_RULE}.{method}", method, builder)
        if f"{EP_RULE}.fsdp2_prepare_model" not in self.model_patcher.rules:
            self.model_patcher.register(
                ModelPatcherRule(
                    rule_id=f"{EP_RULE}.fsdp2_prepare_model",
                    import_and_maybe_reload=(
                        FSDP2_PREPARE,
                        setting_aside_expert_shards(_resolve(FSDP2_PREPARE)),
                        None,
                    ),
                    applies_to_any_model=True,
                )
            )
        return []


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _mesh_aware_clip(original: Any) -> Any:
    accelerator = original.__self__

    def clip(parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        accelerator.unscale_gradients()
        return clip_grad_norm_(parameters, max_norm, norm_type)

    return clip


AccelerationPlugin.register_plugin(
    ScatterMoEAccelerationPlugin,
    configuration_and_paths=[SCATTERMOE_PATH],
    plugin_id="scattermoe",
    schemas={SCATTERMOE_PATH: ScatterMoEOptions},
    package_name="fms-acceleration-moe",
)
