"""The tensors of a phase: freezing and thawing them, and the param groups they join."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .callback_base import CallbackBase
from .param_groups import DECAY_KEY, PHASE_KEY, phase_groups


class PhaseThawing(CallbackBase):
    """Freezes the model to a phase, thaws the next one, and builds its param groups."""

    def freeze_to_phase(self, depth: int = 0) -> None:
        """Freeze every parameter, then thaw phases 0..depth (the state a run starts from)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for d in range(depth + 1):
            for _, p in self._named_actual(self.phases[d].params):
                p.requires_grad_(True)
        self._set_batchnorm_tracking(depth)

    def thawed_names(self) -> list[str]:
        """Logical names of the parameters that currently require grad, in model order."""
        return [n for n, p in self.adapter.named_parameters(self.model) if p.requires_grad]

    def _thaw(self, depth: int) -> list[torch.nn.Parameter]:
        params = [p for _, p in self._named_actual(self.phases[depth].params)]
        for p in params:
            p.requires_grad_(True)
        self._set_batchnorm_tracking(depth)
        self.adapter.on_params_thawed(self.model, params)
        return params

    def _set_batchnorm_tracking(self, depth: int) -> None:
        # FTS (frozen_bn_track_running_stats: false): a frozen BatchNorm stops updating its
        # running statistics until the phase that holds its parameters thaws.
        if self.config.frozen_bn_track_running_stats:
            return
        phase_of = {n: d for d, ph in enumerate(self.phases) for n in ph.params}
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                own = [
                    f"{name}.{pn}" if name else pn
                    for pn, _ in module.named_parameters(recurse=False)
                ]
                depths = [phase_of.get(self.adapter.logical_param_name(a)) for a in own]
                depths = [d for d in depths if d is not None]
                module.track_running_stats = bool(depths) and min(depths) <= depth

    def _no_decay_rule(self) -> Callable[[str], bool] | None:
        if self.config.no_decay is None:
            return lambda name: name not in self._decay_names
        if not self.config.no_decay:
            return None
        needles = self.config.no_decay
        return lambda name: any(needle in name for needle in needles)

    def _groups_for(
        self, depth: int, lr: float | None, weight_decay: float | None
    ) -> list[dict[str, Any]]:
        return phase_groups(
            self._named_actual(self.phases[depth].params),
            depth,
            self._phase_lr(depth) if lr is None else lr,
            self._no_decay_rule(),
            weight_decay,
        )

    def _tag_groups(self, optimizer: Any) -> None:
        """Phase 0 and decayed / no-decay flags for the groups the Trainer (or user) built."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        rule = self._no_decay_rule()
        for group in optimizer.param_groups:
            group.setdefault(PHASE_KEY, 0)
            if DECAY_KEY in group:
                continue
            members = [names.get(id(p), "") for p in group["params"]]
            if rule is None:
                group[DECAY_KEY] = True
            elif members:
                group[DECAY_KEY] = not all(rule(n) for n in members)
            else:
                group[DECAY_KEY] = group.get("weight_decay", 0.0) != 0.0
