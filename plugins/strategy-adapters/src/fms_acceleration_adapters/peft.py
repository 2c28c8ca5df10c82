"""PEFT adapter: schedules written with the base model's names drive a peft-wrapped model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from .base import AdapterOptions, StrategyAdapter
from .errors import StrategyAdapterError
from .peft_names import PEFT_PREFIX


class PeftStrategyAdapter(StrategyAdapter):
    """Single-device adapter for peft models.

    Logical names are the base model's: ``...q_proj.base_layer.weight`` -> ``...q_proj.weight``,
    ``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``,
    ``lm_head.modules_to_save.default.weight`` -> ``lm_head.weight``. (DDP/FSDP adapters do the
    same translation automatically when the model is peft-wrapped; see option ``peft``.)
    """

    strategy_name: ClassVar[str] = "peft"

    class Options(AdapterOptions):
        peft: bool | None = True
        """translate PEFT names (always on here)"""
        default_schedule_trainable_only: bool = True
        """generated schedule lists only the parameters trainable when it is generated (the
        adapter weights), so frozen base weights stay frozen"""

    def validate_schedule(self, schedule: Mapping[int, Mapping], model: torch.nn.Module) -> None:
        """Refuse actual peft names in a schedule, pointing at the logical name to use."""
        for phase, spec in schedule.items():
            for name in spec.get("params", ()) or ():
                if isinstance(name, str) and name.startswith(PEFT_PREFIX):
                    raise StrategyAdapterError(
                        f"finetuning schedule phase {phase}: {name!r} is a peft-wrapped name; "
                        f"write the base model's name {self.logical_param_name(name)!r}"
                    )

    def gen_default_schedule(self, model: torch.nn.Module) -> dict[int, dict]:
        """Reverse model order, ``phase_size`` per phase; by default only trainable parameters."""
        names = [
            n
            for n, p in self.named_parameters(model)
            if p.requires_grad or not self.cfg["default_schedule_trainable_only"]
        ]
        return self.phases_of(list(reversed(names)))
