"""FSDP adapter: FSDP2 ``fully_shard`` and accelerate's FSDP (FSDP1, use_orig_params)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from .base import StrategyAdapter
from .errors import StrategyAdapterError


def _fsdp2_states(model: torch.nn.Module) -> list[Any]:
    """FSDP2 param groups of every ``fully_shard``-ed module in ``model``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    groups = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                groups.append(group)
    return groups


def _fsdp1_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def _strip_segments(name: str, segments: tuple[str, ...]) -> str:
    for seg in segments:
        name = re.sub(rf"(^|(?<=\.)){re.escape(seg)}", "", name)
    return name


class FSDPStrategyAdapter(StrategyAdapter):
    """Adapter for FSDP.

    Logical names drop the wrapper segments FSDP1 and activation checkpointing insert
    (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``) and a leading ``module.``;
    FSDP2 keeps the original names. When parameters thaw mid-training:

    - FSDP2 fixes a param group's original/reduce dtypes from the parameters that were trainable
      at lazy init; a group that was entirely frozen then has none, and with a
      ``MixedPrecisionPolicy`` its thawed parameters' low-precision gradients are refused
      ("attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype
      Float"). The dtypes are re-derived for the groups that hold thawed parameters. FSDP2
      copies ``requires_grad`` from the sharded to the unsharded parameter at every all-gather,
      so nothing else is needed.
    - FSDP1 flattens parameters; only with ``use_orig_params=True`` (accelerate:
      ``fsdp_use_orig_params: true``) are the original parameters visible to thaw. FSDP1 then
      follows their ``requires_grad`` by itself (checked on torch 2.13: a thawed parameter's
      gradient equals the cross-rank average), so nothing is done at thaw time.
    """

    strategy_name: ClassVar[str] = "fsdp"
    wrapper_prefixes: ClassVar[tuple[str, ...]] = ("module.",)
    wrapper_segments: ClassVar[tuple[str, ...]] = (
        "_fsdp_wrapped_module.",
        "_checkpoint_wrapped_module.",
        "_orig_mod.",
    )

    def validate_schedule(self, schedule: Mapping[int, Mapping], model: torch.nn.Module) -> None:
        """FSDP1 without ``use_orig_params`` cannot thaw part of a flat parameter."""
        for module in _fsdp1_modules(model):
            if not getattr(module, "_use_orig_params", True) and len(schedule) > 1:
                raise StrategyAdapterError(
                    "FSDP (version 1) without use_orig_params cannot thaw parameters phase by "
                    "phase: set fsdp_use_orig_params: true (accelerate FSDP plugin) or use FSDP2 "
                    "(fsdp_version: 2)"
                )

    def from_logical_state_dict(
        self, state_dict: Mapping[str, Any], model: torch.nn.Module
    ) -> dict[str, Any]:
        """Keys FSDP's ``load_state_dict`` expects: FSDP1 wants them free of wrapper segments."""
        out = super().from_logical_state_dict(state_dict, model)
        if not _fsdp1_modules(model):
            return out
        # FSDP1's state-dict hooks strip its own and the checkpoint wrapper's segments
        fsdp1 = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
        return {_strip_segments(k, fsdp1): v for k, v in out.items()}

    def on_params_thawed(self, model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
        """Make FSDP2's per-group dtypes follow the new ``requires_grad`` flags."""
        thawed = {id(p) for p in params}
        for group in _fsdp2_states(model):
            if any(id(fp.sharded_param) in thawed for fp in group.fsdp_params):
                reinit = getattr(group, "_init_mp_dtypes", None)
                if reinit is None:  # a torch whose FSDP2 internals moved
                    warnings.warn(
                        f"FSDPStrategyAdapter: torch {torch.__version__} FSDP2 param groups have "
                        "no _init_mp_dtypes; a shard group frozen at the first forward may not "
                        "train in mixed precision after it thaws",
                        stacklevel=2,
                    )
                    return
                reinit()

    def connect(self, parent: Any, accelerator: Any = None) -> None:
        """Attach the client; refuse accelerate's FSDP1 without ``use_orig_params``."""
        super().connect(parent, accelerator)
        plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
        if (
            plugin is not None
            and getattr(plugin, "fsdp_version", 1) == 1
            and not getattr(plugin, "use_orig_params", True)
        ):
            raise StrategyAdapterError(
                "FSDP (version 1) with use_orig_params=false flattens parameters, so a schedule "
                "cannot thaw them phase by phase: set fsdp_use_orig_params: true (accelerate "
                "FSDP plugin) or use FSDP2 (fsdp_version: 2)"
            )
