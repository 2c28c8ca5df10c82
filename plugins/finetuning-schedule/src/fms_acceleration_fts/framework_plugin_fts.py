"""The finetuning_schedule plugin: freezes the model to phase 0 and returns the FTS callback."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from fms_acceleration import AccelerationPlugin, AccelerationPluginConfigError, Option, Stanza
from fms_acceleration_adapters import (
    StrategyAdapter,
    StrategyAdapterError,
    adapter_name_for,
    distributed_type_of,
    select_strategy_adapter,
)

from .fts_config import FTSConfig
from .schedule import FTSScheduleError, read_schedule, unscheduled_params, validate_schedule

if TYPE_CHECKING:
    from .callback import FinetuningScheduleCallback

logger = logging.getLogger(__name__)

STANZA = "training.finetuning_schedule"
PATH = f"plugins.{STANZA}"


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _min_depth(value: Any) -> str | None:
    return None if value >= -1 else "must be -1 (all phases) or a phase index >= 0"


FTS_SCHEMA = Stanza(
    doc="Fine-Tuning Scheduler: thaw the model phase by phase",
    ft_schedule=Option(
        (str, dict),
        default=None,
        nullable=True,
        doc="schedule YAML file or inline mapping; absent: generate the default and write it "
        "to output_dir/<ModelClass>_ft_schedule.yaml",
    ),
    max_depth=Option(int, default=-1, check=_min_depth, doc="last phase to reach; -1: all"),
    base_max_lr=Option(float, default=1e-5, check=_positive, doc="lr of phases without lr"),
    epoch_transitions_only=Option(
        bool, default=False, doc="transition on max_transition_epoch only (no early stopping)"
    ),
    restore_best=Option(bool, default=False, doc="load the best checkpoint at each transition"),
    early_stopping=Stanza(
        doc="per-phase early stopping on an evaluation metric",
        monitor=Option(str, default="eval_loss", doc="metric name from Trainer.evaluate"),
        patience=Option(int, default=3, check=_positive, doc="evaluations without improvement"),
        min_delta=Option(float, default=0.0, doc="smallest change counted as improvement"),
        mode=Option(str, default="min", choices=("min", "max"), doc="min: lower is better"),
    ),
    custom_strategy_adapters=Option(
        dict, default={}, doc="strategy name -> adapter ('module:Class' or entry-point name)"
    ),
    strategy_adapter_cfg=Option(dict, default={}, doc="keyword options of the adapter"),
)


def _is_peft_config(arg: Any) -> bool:
    return hasattr(arg, "peft_type") and hasattr(arg, "target_modules")


def _is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


class FinetuningSchedulePlugin(AccelerationPlugin):
    """Fine-Tuning Scheduler for transformers.Trainer (param freezing, groups, LR scheduler)."""

    slots = frozenset({"param_freezing"})
    order = 90  # after loaders and patchers: it freezes the final model

    def __init__(self, configurations: dict, require_packages_check: bool = True) -> None:
        super().__init__(configurations, require_packages_check)
        cfg = self.stanza(STANZA)
        es = cfg.get("early_stopping") or {}
        self.ft_schedule = cfg.get("ft_schedule")
        self.custom_strategy_adapters = dict(cfg.get("custom_strategy_adapters") or {})
        self.strategy_adapter_cfg = dict(cfg.get("strategy_adapter_cfg") or {})
        self.fts_config = FTSConfig(
            max_depth=cfg.get("max_depth", -1),
            base_max_lr=float(cfg.get("base_max_lr", 1e-5)),
            epoch_transitions_only=cfg.get("epoch_transitions_only", False),
            restore_best=cfg.get("restore_best", False),
            monitor=es.get("monitor", "eval_loss"),
            patience=es.get("patience", 3),
            min_delta=float(es.get("min_delta", 0.0)),
            mode=es.get("mode", "min"),
        )
        self.adapter: StrategyAdapter | None = None
        self.distributed_type: Any = "single_device"
        self.callback: Any = None  # FinetuningScheduleCallback once augmentation ran
        self._undo: list = []

    @property
    def requires_augmentation(self) -> bool:
        return True

    # ------------------------------------------------------------------ adapter
    def _select_adapter(self, distributed_type: Any, model: torch.nn.Module) -> StrategyAdapter:
        name = adapter_name_for(distributed_type)
        if (
            name == "single_device"
            and _is_peft_model(model)
            and name not in self.custom_strategy_adapters
        ):
            name = "peft"
        try:
            return select_strategy_adapter(
                name, self.custom_strategy_adapters or None, **self.strategy_adapter_cfg
            )
        except StrategyAdapterError as err:
            raise AccelerationPluginConfigError(f"{PATH}: {err}") from err

    @staticmethod
    def _distributed_type(train_args: Any) -> str:
        if getattr(train_args, "fsdp", None):
            return "fsdp"
        state = getattr(train_args, "distributed_state", None)
        return distributed_type_of(state) if state is not None else "single_device"

    # ------------------------------------------------------------------ framework hooks
    def augmentation(self, model: Any, train_args: Any, modifiable_args: tuple) -> tuple:
        """Validate the schedule against the model and freeze it to phase 0."""
        self.distributed_type = self._distributed_type(train_args)
        self.fts_config.weight_decay = float(getattr(train_args, "weight_decay", 0.0) or 0.0)
        if any(_is_peft_config(arg) for arg in modifiable_args):
            # The client applies PEFT after augmentation (get_peft_model resets requires_grad),
            # so the schedule is validated and frozen against the wrapped model later.
            logger.info(
                "%s: a peft config is still to be applied; scheduling at ready-for-train", PATH
            )
            return model, modifiable_args
        self.adapter = self._select_adapter(self.distributed_type, model)
        self.callback = self._build_callback(model, self.adapter)
        return model, modifiable_args

    def _build_callback(
        self, model: torch.nn.Module, adapter: StrategyAdapter
    ) -> FinetuningScheduleCallback:
        generated = None
        try:
            if self.ft_schedule is None:
                raw = generated = adapter.gen_default_schedule(model)
            else:
                raw = read_schedule(self.ft_schedule)
            names = adapter.schedule_param_names(model)
            phases = validate_schedule(raw, names, self.fts_config.epoch_transitions_only)
            adapter.validate_schedule(raw, model)
        except (FTSScheduleError, StrategyAdapterError) as err:
            raise AccelerationPluginConfigError(f"{PATH}.ft_schedule: {err}") from err
        if self.fts_config.max_depth >= len(phases):
            logger.warning(
                "%s.max_depth=%d but the schedule has %d phases: running all of them",
                PATH,
                self.fts_config.max_depth,
                len(phases),
            )
        frozen = unscheduled_params(phases, names)
        if frozen:
            logger.warning(
                "fine-tuning schedule: %d parameters are in no phase and stay frozen, e.g. %s",
                len(frozen),
                frozen[:3],
            )
        if _is_peft_model(model):
            trainable = {n for n, p in adapter.named_parameters(model) if p.requires_grad}
            base = [n for ph in phases for n in ph.params if n not in trainable]
            if base:
                logger.warning(
                    "fine-tuning schedule: %d scheduled tensors are base weights of the peft model "
                    "(e.g. %s); they train, but peft checkpoints save only adapter weights, so "
                    "resume_from_checkpoint restores them to their base values",
                    len(base),
                    base[:2],
                )
        # imported here: transformers' Trainer stack is heavy and noisy for `fms-acceleration check`
        from .callback import FinetuningScheduleCallback

        adapter.on_before_init_client(model)
        callback = FinetuningScheduleCallback(model, phases, adapter, self.fts_config, generated)
        callback.freeze_to_phase(0)
        adapter.connect(callback)
        adapter.on_after_init_client(model)
        return callback

    def get_callbacks_and_ready_for_train(self, model: Any = None, accelerator: Any = None) -> list:
        """The FTS callback; hooks accelerator.prepare_optimizer so resuming restores the depth."""
        if model is not None and (self.callback is None or model is not self.callback.model):
            # The client wrapped the model after augmentation (e.g. get_peft_model, which also
            # resets requires_grad): validate and freeze against the model that will train.
            self.adapter = self._select_adapter(self.distributed_type, model)
            self.callback = self._build_callback(model, self.adapter)
        if self.callback is None:
            raise AccelerationPluginConfigError(
                f"{PATH}: pass the model to get_callbacks_and_ready_for_train(model, accelerator)"
                " (augmentation() alone does not schedule a model still to be wrapped by PEFT)"
            )
        if accelerator is not None:
            wanted = self._select_adapter(distributed_type_of(accelerator), self.callback.model)
            if type(wanted) is not type(self.adapter):
                self.adapter = wanted
                self.callback.adapter = wanted
                wanted.connect(self.callback)
            self.adapter.connect(self.callback, accelerator)
            self._hook_prepare_optimizer(accelerator)
        else:
            logger.warning(
                "%s: no accelerator passed; resuming a checkpoint taken after a phase transition "
                "needs it (get_callbacks_and_ready_for_train(model, trainer.accelerator))",
                PATH,
            )
        return [self.callback]

    def _hook_prepare_optimizer(self, accelerator: Any) -> None:
        original = accelerator.prepare_optimizer
        callback = self.callback

        def prepare_optimizer(optimizer, *args, **kwargs):
            # the Trainer loads optimizer.pt after prepare: the hook thaws saved phases first
            callback.install_resume_hook(optimizer)
            return original(optimizer, *args, **kwargs)

        accelerator.prepare_optimizer = prepare_optimizer
        self._undo.append(lambda: accelerator.__dict__.pop("prepare_optimizer", None))

    def undo(self) -> None:
        """Remove the accelerator hook installed by get_callbacks_and_ready_for_train."""
        while self._undo:
            self._undo.pop()()


def _register() -> None:
    AccelerationPlugin.register_plugin(
        FinetuningSchedulePlugin,
        configuration_and_paths=[STANZA],
        plugin_id="finetuning_schedule",
        schemas={STANZA: FTS_SCHEMA},
        package_name="fms-acceleration-fts",
    )


_register()
