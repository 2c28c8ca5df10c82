"""The accelerated-moe plugin: sparse MoE blocks through grouped expert GEMMs (Triton on GPU,
PyTorch on CPU), with optional expert parallelism."""

from __future__ import annotations

import os
from typing import Any

import torch
from pydantic import Field

from fms_acceleration import AccelerationPlugin, AccelerationPluginConfigError, StanzaModel

from .models import SUPPORTED_CAUSAL_LMS, arch_spec_for, build_moe_rules
from .models.architectures import STANZA, num_experts

SCATTERMOE_PATH = "training.moe.scattermoe"


class ScatterMoEOptions(StanzaModel):
    """The `training.moe.scattermoe` stanza."""

    ep_degree: int = Field(default=1, ge=1)
    """expert-parallel degree: experts are sharded over groups of this many processes; 1 keeps
    every expert on every process. Must divide the world size and the number of experts."""
    disable_distributed: bool = False
    """leave the experts to the outer sharding (e.g. FSDP) instead of placing them here; only
    with ep_degree 1"""


def check_ep_degree(ep_degree: int, world_size: int, experts: int | None = None) -> None:
    """Refuse an expert-parallel degree that does not divide the world size (or the experts)."""
    if world_size % ep_degree:
        raise AccelerationPluginConfigError(
            f"{STANZA}.ep_degree: {ep_degree} does not divide the world size {world_size}; "
            "the processes are split into groups of ep_degree that each hold all experts. Use a "
            f"divisor of {world_size}."
        )
    if experts is not None and experts % ep_degree:
        raise AccelerationPluginConfigError(
            f"{STANZA}.ep_degree: {ep_degree} does not divide the model's {experts} experts; "
            f"each process holds experts / ep_degree of them. Use a divisor of {experts}."
        )


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
        if self._ep_degree > 1:
            check_ep_degree(self._ep_degree, _world()[1])
        self._moe_component_module_names: set[str] = set()

    @property
    def requires_augmentation(self) -> bool:
        return True

    def augmentation(self, model: torch.nn.Module, train_args: Any, modifiable_args: tuple):
        """Swap or patch the experts of every MoE block (rules applied by the framework)."""
        spec = arch_spec_for(model)
        experts = num_experts(model, spec)
        world_size = _world()[1]
        check_ep_degree(self._ep_degree, world_size, experts)
        if self._ep_degree > 1:
            # refused rather than trained without it: every process would hold every expert
            raise AccelerationPluginConfigError(
                f"{STANZA}.ep_degree: {self._ep_degree} asks for expert parallelism, whose "
                "all-to-all token exchange this release of fms-acceleration-moe does not have; "
                "set ep_degree: 1 (experts replicated, grouped GEMMs still on)."
            )
        rules = build_moe_rules(model, spec)
        for rule in rules:
            self.model_patcher.register(rule)
        self._moe_component_module_names = {spec.block_name}
        return model, modifiable_args


AccelerationPlugin.register_plugin(
    ScatterMoEAccelerationPlugin,
    configuration_and_paths=[SCATTERMOE_PATH],
    plugin_id="scattermoe",
    schemas={SCATTERMOE_PATH: ScatterMoEOptions},
    package_name="fms-acceleration-moe",
)
