"""What every part of the FTS callback shares: the model, its phases, the adapter, the config,
the run's FTSState, and the map from a phase's logical names to the model's tensors.

The callback is split by concern (as Fine-Tuning Scheduler splits its callback into mixins), in
layers that each build on the ones before: `phase_thawing` (the tensors and param groups of a
phase), `reinitialization` (a phase joining the optimizer, rebuilding optimizer or LR scheduler),
`phase_transitions` (when and how the next phase begins, early stopping, restore_best),
`checkpoint_state` (saving and resuming the schedule state), `train_start` (the checks and files
before step 0), and `callback` (the Trainer events).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.trainer_pt_utils import get_parameter_names

from .fts_config import FTSConfig
from .fts_state import FTSState
from .param_groups import STATE_GROUP_KEY
from .schedule import Phase, final_depth

logger = logging.getLogger(__name__)


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names that get weight decay, by the same rule as Trainer.get_decay_parameter_names."""
    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return set(get_parameter_names(model, [torch.nn.LayerNorm], forbidden))


@dataclass(frozen=True)
class ScheduleFiles:
    """What the callback writes to log_dir before step 0 (FTS's schedule artifacts)."""

    schedule: dict  # the schedule as given (or generated), phase keys as integers
    generated: bool = False  # the default schedule: written so the user can edit it
    keys_converted: bool = False  # string phase keys: also written as `_ft_schedule_valid`


class CallbackBase:
    """The inputs of a scheduled run and its state; the mixins of the callback build on it."""

    def __init__(
        self,
        model: torch.nn.Module,
        phases: Sequence[Phase],
        adapter: Any,
        config: FTSConfig,
        files: ScheduleFiles | None = None,
    ) -> None:
        self.model = model
        self.phases = list(phases)
        self.adapter = adapter
        self.config = config
        self.files = files
        self.final_depth = final_depth(self.phases, config.max_depth)
        self.state = FTSState()
        self._decay_names = decay_parameter_names(model)
        self._hooked_optimizers: set[int] = set()
        self._warned: set[str] = set()

    @property
    def depth(self) -> int:
        """The deepest phase thawed so far."""
        return self.state.depth

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable schedule state, as checkpoints carry it (fts_state.json)."""
        return self.state.to_checkpoint(len(self.phases), self.final_depth)

    def _publish(self, optimizer: Any) -> None:
        # optimizer.pt then carries the state too, so resuming from a copied checkpoint works
        if optimizer is not None and optimizer.param_groups:
            optimizer.param_groups[0][STATE_GROUP_KEY] = json.dumps(self.state_dict())

    def _named_actual(self, logical: Sequence[str]) -> list[tuple[str, torch.nn.Parameter]]:
        # one logical -> actual map per call (actual_param_name would rebuild it for every name)
        mapping = self.adapter.logical_name_map(self.model)
        params = dict(self.model.named_parameters())
        out = []
        for name in logical:
            actual = mapping.get(name) or self.adapter.actual_param_name(name, self.model)
            out.append((actual, params[actual]))
        return out

    def _phase_lr(self, depth: int) -> float:
        lr = self.phases[depth].lr
        return self.config.base_max_lr if lr is None else lr

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)
