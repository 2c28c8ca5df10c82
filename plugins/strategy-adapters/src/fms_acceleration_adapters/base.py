"""StrategyAdapter: how a client (e.g. the finetuning-schedule callback) meets one strategy.

A client names parameters by their *logical* names (those of the plain, unwrapped model, e.g.
``model.layers.0.self_attn.q_proj.weight``); the model it trains may be wrapped by DDP, FSDP,
torch.compile, activation checkpointing or PEFT, whose *actual* names differ. The adapter
translates between the two, validates schedules, generates a default one, translates
checkpoints, and does what its strategy needs when parameters thaw mid-training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field

from fms_acceleration import StanzaModel, validate_model
from fms_acceleration.validation import suggestion

from .errors import StrategyAdapterError
from .peft_names import PEFT_PREFIX, peft_logical_name


class AdapterOptions(StanzaModel):
    """Keyword options every adapter accepts from ``strategy_adapter_cfg``; an adapter adds its
    own by subclassing its parent's ``Options``."""

    peft: bool | None = None
    """translate PEFT names to base-model names; None: when the model is peft-wrapped"""
    peft_adapter_name: str = "default"
    """PEFT adapter whose name segment is dropped from logical names"""
    phase_size: Annotated[int, Field(ge=1)] = 2
    """tensors per phase in the generated schedule"""


class StrategyAdapter:
    """Adapts a client (e.g. the FTS callback) to one distributed strategy.

    The base class is the single-device adapter. Subclasses override the naming layer
    (``wrapper_segments`` or ``logical_param_name``/``actual_param_name``), the schedule layer
    (``schedule_param_names``, ``validate_schedule``, ``gen_default_schedule``), the checkpoint
    layer (``before_restore_model``, ``to_logical_state_dict``, ``from_logical_state_dict``) and
    the training layer (``on_params_thawed``, ``on_before_optimizer_step``).
    """

    strategy_name: ClassVar[str] = "single_device"
    # Name segments that wrappers insert and that logical names never contain. Stripped wherever
    # they occur as a whole dotted segment (``a.<seg>b`` -> ``a.b``).
    wrapper_segments: ClassVar[tuple[str, ...]] = ("_orig_mod.",)
    # Prefixes that outer wrappers put in front of every name (stripped only at the start).
    wrapper_prefixes: ClassVar[tuple[str, ...]] = ()
    # Options accepted as keyword arguments (a pydantic model; subclasses extend it).
    Options: ClassVar[type[AdapterOptions]] = AdapterOptions

    def __init__(self, **adapter_cfg: Any) -> None:
        try:
            options = validate_model(
                self.Options, adapter_cfg, "strategy_adapter_cfg", StrategyAdapterError
            )
        except StrategyAdapterError as err:
            raise StrategyAdapterError(
                f"{err} (adapter {self.strategy_name!r}, {type(self).__name__})"
            ) from None
        self.cfg: dict[str, Any] = options.model_dump()
        self.parent: Any = None
        self.accelerator: Any = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strategy_name={self.strategy_name!r}, cfg={self.cfg!r})"

    # ---------------------------------------------------------------- lifecycle
    def connect(self, parent: Any, accelerator: Any = None) -> None:
        """Attach the client object (and, optionally, the accelerate Accelerator)."""
        self.parent = parent
        if accelerator is not None:
            self.accelerator = accelerator

    def on_before_init_client(self, model: torch.nn.Module) -> None:
        """Called before the client sets up (e.g. before FTS freezes parameters)."""

    def on_after_init_client(self, model: torch.nn.Module) -> None:
        """Called after the client set up (e.g. once the first phase is thawed)."""

    # ---------------------------------------------------------------- naming layer
    def uses_peft_names(self, actual_name: str | None = None) -> bool:
        """Whether PEFT names are translated (``peft`` option, or detected from the name)."""
        if self.cfg["peft"] is not None:
            return bool(self.cfg["peft"])
        return actual_name is not None and actual_name.startswith(PEFT_PREFIX)

    def strip_wrapper_segments(self, name: str) -> str:
        """Remove the dotted segments that wrappers (DDP, FSDP, compile, ...) insert."""
        stripped = True
        while stripped:
            stripped = False
            for prefix in self.wrapper_prefixes:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix) :], True
        for seg in self.wrapper_segments:
            name = re.sub(rf"(^|(?<=\.)){re.escape(seg)}", "", name)
        return name

    def logical_param_name(self, actual_name: str) -> str:
        """Logical (unwrapped, base-model) name of a parameter or buffer of the trained model."""
        name = self.strip_wrapper_segments(actual_name)
        if self.uses_peft_names(name):
            name = peft_logical_name(name, self.cfg["peft_adapter_name"])
        return name

    def logical_name_map(self, model: torch.nn.Module, buffers: bool = False) -> dict[str, str]:
        """Map logical name -> actual name for every parameter (and buffer) of ``model``."""
        names = [n for n, _ in model.named_parameters()]
        if buffers:
            names += [n for n, _ in model.named_buffers()]
        mapping: dict[str, str] = {}
        for actual in names:
            logical = self.logical_param_name(actual)
            if logical in mapping and mapping[logical] != actual:
                raise StrategyAdapterError(
                    f"{type(self).__name__}: parameters {mapping[logical]!r} and {actual!r} "
                    f"both map to logical name {logical!r}"
                )
            mapping[logical] = actual
        return mapping

    def actual_param_name(self, logical_name: str, model: torch.nn.Module) -> str:
        """Actual name in ``model`` of the parameter with this logical name."""
        mapping = self.logical_name_map(model, buffers=True)
        if logical_name in mapping:
            return mapping[logical_name]
        # A name that already is actual is accepted as is.
        if logical_name in mapping.values():
            return logical_name
        raise StrategyAdapterError(self._unknown_name_message(logical_name, mapping))

    def _unknown_name_message(self, name: str, mapping: Mapping[str, str]) -> str:
        return (
            f"{type(self).__name__}: no parameter with logical name {name!r} in "
            f"{len(mapping)} model parameters{suggestion(name, list(mapping))}"
        )

    def named_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """``(logical_name, parameter)`` pairs in model order."""
        mapping = self.logical_name_map(model)
        params = dict(model.named_parameters())
        return [(logical, params[actual]) for logical, actual in mapping.items()]

    # ---------------------------------------------------------------- schedule layer
    def schedule_param_names(self, model: torch.nn.Module) -> list[str]:
        """Names a schedule may refer to, in model order."""
        return [name for name, _ in self.named_parameters(model)]

    def validate_schedule(self, schedule: Mapping[int, Mapping], model: torch.nn.Module) -> None:
        """Strategy-specific checks of a parsed schedule; raise StrategyAdapterError if invalid."""

    def gen_default_schedule(self, model: torch.nn.Module) -> dict[int, dict]:
        """Default schedule: parameters in reverse model order, ``phase_size`` per phase."""
        return self.phases_of(list(reversed(self.schedule_param_names(model))))

    def phases_of(self, names: list[str]) -> dict[int, dict]:
        """Split ``names`` into consecutive phases of ``phase_size`` names."""
        size = self.cfg["phase_size"]
        return {
            i: {"params": names[start : start + size]}
            for i, start in enumerate(range(0, len(names), size))
        }

    def params_for_names(
        self, names: Iterable[str], model: torch.nn.Module
    ) -> list[tuple[str, torch.nn.Parameter]]:
        """``(logical_name, parameter)`` for schedule names; unknown names raise, listing them."""
        params = dict(self.named_parameters(model))
        names = list(names)
        missing = [n for n in names if n not in params]
        if missing:
            raise StrategyAdapterError(self._unknown_name_message(missing[0], params))
        return [(n, params[n]) for n in names]

    # ---------------------------------------------------------------- checkpoint layer
    def before_restore_model(self, checkpoint: dict) -> dict:
        """Checkpoint keys for the unwrapped model: wrapper prefixes/segments are stripped.

        A state dict saved from a wrapped model (``module.``, ``_orig_mod.``, FSDP1 wrapper
        segments) then loads into the plain model the client holds.
        """
        out: dict = {}
        for key, value in checkpoint.items():
            clean = self.strip_wrapper_segments(key) if isinstance(key, str) else key
            if clean in out:
                raise StrategyAdapterError(
                    f"{type(self).__name__}: checkpoint keys {key!r} and another both restore "
                    f"{clean!r}"
                )
            out[clean] = value
        return out

    def to_logical_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """State dict with logical keys, for saving."""
        out: dict[str, Any] = {}
        for key, value in state_dict.items():
            logical = self.logical_param_name(key)
            if logical in out:
                raise StrategyAdapterError(
                    f"{type(self).__name__}: two state-dict keys map to logical key {logical!r}"
                )
            out[logical] = value
        return out

    def from_logical_state_dict(
        self, state_dict: Mapping[str, Any], model: torch.nn.Module
    ) -> dict[str, Any]:
        """State dict with ``model``'s actual keys, for loading; unknown keys raise."""
        mapping = self.logical_name_map(model, buffers=True)
        for key in model.state_dict():
            mapping.setdefault(self.logical_param_name(key), key)
        out: dict[str, Any] = {}
        for key, value in state_dict.items():
            if key in mapping:
                out[mapping[key]] = value
            elif key in mapping.values():
                out[key] = value
            else:
                raise StrategyAdapterError(self._unknown_name_message(key, mapping))
        return out

    # ---------------------------------------------------------------- training layer
    def on_params_thawed(self, model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
        """Called once ``params`` were set ``requires_grad=True`` mid-training."""

    def on_before_optimizer_step(self, model: torch.nn.Module) -> None:
        """Called before each optimizer step (after gradients were computed)."""
