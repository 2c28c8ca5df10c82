"""DDP adapter: parameters that thaw mid-training still get their gradients averaged."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .base import AdapterOptions, StrategyAdapter


class DDPStrategyAdapter(StrategyAdapter):
    """Adapter for ``torch.nn.parallel.DistributedDataParallel`` (accelerate MULTI_CPU/GPU/...).

    DDP's reducer only averages the parameters that required grad when DDP was built; a
    parameter thawed later would train on each rank's local gradient and the replicas would
    drift apart. For every thawed parameter this adapter registers a gradient hook that averages
    the incoming gradient over the process group. A hook (rather than ``on_before_optimizer_step``)
    is needed because the HF Trainer clips gradients before its pre-optimizer-step callback, and
    clipping unsynchronised gradients gives each rank a different clip coefficient. Averaging is
    idempotent, so a thawed parameter that DDP syncs as well keeps the same gradient.
    """

    strategy_name: ClassVar[str] = "ddp"
    wrapper_prefixes: ClassVar[tuple[str, ...]] = ("module.",)

    class Options(AdapterOptions):
        sync_thawed_grads: bool = True
        """average gradients of parameters thawed after DDP was built"""
        separate_process_group: bool = True
        """average on a dedicated process group, apart from DDP's bucket traffic"""

    def __init__(self, **adapter_cfg: Any) -> None:
        super().__init__(**adapter_cfg)
        self._hooked: dict[int, Any] = {}
        self._group: Any = None

    @property
    def synced_param_count(self) -> int:
        """Number of parameters whose gradients this adapter averages."""
        return len(self._hooked)

    def _process_group(self) -> Any:
        # new_group is collective: called on every rank from on_params_thawed, which the client
        # calls at the same point of training on all ranks.
        if self._group is None:
            self._group = dist.new_group() if self.cfg["separate_process_group"] else False
        return self._group or None

    def on_params_thawed(self, model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
        """Register gradient-averaging hooks on the thawed parameters (multi-process only)."""
        if not self.cfg["sync_thawed_grads"]:
            return
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        group = self._process_group()
        world = dist.get_world_size(group)
        for param in params:
            if id(param) in self._hooked or not param.requires_grad:
                continue

            def _average(grad: torch.Tensor, _group: Any = group) -> torch.Tensor:
                grad = grad.clone()
                dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=_group)
                return grad.div_(world)

            self._hooked[id(param)] = param.register_hook(_average)

    def remove_hooks(self) -> None:
        """Remove every gradient hook this adapter registered."""
        for handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()
