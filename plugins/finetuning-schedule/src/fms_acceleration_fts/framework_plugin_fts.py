"""The finetuning_schedule plugin: freezes the model to phase 0 and returns the FTS callback."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from fms_acceleration import AccelerationPlugin, AccelerationPluginConfigError
from fms_acceleration_adapters import (
    StrategyAdapter,
    StrategyAdapterError,
    adapter_name_for,
    distributed_type_of,
    select_strategy_adapter,
)

from .fts_config import FTSConfig, FTSOptions
from .schedule import FTSScheduleError, read_schedule, unscheduled_params, validate_schedule

if TYPE_CHECKING:
    from .callback import FinetuningScheduleCallback

logger = logging.getLogger(__name__)

STANZA = "training.finetuning_schedule"
PATH = f"plugins.{STANZA}"


def _is_peft_config(arg: Any) -> bool:
    return hasattr(arg, "peft_type") and hasattr(arg, "target_modules")


def _is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


class FinetuningSchedulePlugin(AccelerationPlugin):
    """Fine-Tuning Scheduler for transformers.Trainer (param freezing, groups, LR scheduler)."""

    slots = frozenset({"param_freezing"})
    order = 90  # after loaders and patchers: it freezes the final model

    def __init__(self, configurations: dict) -> None:
        super().__init__(configurations)
        self.options = FTSOptions.model_validate(self.stanza(STANZA))
        self.ft_schedule = self.options.ft_schedule
        self.custom_strategy_adapters = dict(self.options.custom_strategy_adapters)
        self.strategy_adapter_cfg = dict(self.options.strategy_adapter_cfg)
        self.fts_config = FTSConfig.from_options(self.options)
        self.adapter: StrategyAdapter | None = None
        self.distributed_type: Any = "single_device"
        self.callback: Any = None  # FinetuningScheduleCallback once augmentation ran

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
        weight_decay = float(getattr(train_args, "weight_decay", 0.0) or 0.0)
        self.fts_config = FTSConfig.from_options(self.options, weight_decay)
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
            self._hook_prepare_optimizer()
        else:
            logger.warning(
                "%s: no accelerator passed; resuming a checkpoint taken after a phase transition "
                "needs it (get_callbacks_and_ready_for_train(model, trainer.accelerator))",
                PATH,
            )
        return [self.callback]

    def _hook_prepare_optimizer(self) -> None:
        """Through the framework's accelerator patcher, so undo_patches() reverts it."""
        callback = self.callback

        def builder(original: Any) -> Any:
            def prepare_optimizer(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
                # the Trainer loads optimizer.pt after prepare: the hook thaws saved phases first
                callback.install_resume_hook(optimizer)
                return original(optimizer, *args, **kwargs)

            return prepare_optimizer

        if "fts-resume-depth" not in {r.rule_id for r in self.accelerator_patcher.method_rules}:
            self.accelerator_patcher.wrap_method("fts-resume-depth", "prepare_optimizer", builder)


def _register() -> None:
    AccelerationPlugin.register_plugin(
        FinetuningSchedulePlugin,
        configuration_and_paths=[STANZA],
        plugin_id="finetuning_schedule",
        schemas={STANZA: FTSOptions},
        package_name="fms-acceleration-fts",
    )


_register()
