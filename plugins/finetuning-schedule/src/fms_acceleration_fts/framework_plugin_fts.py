"""The finetuning_schedule plugin: freezes the model to phase 0 and returns the FTS callback.

Everything that can be checked without a model is checked when the framework is built (so
`fms-acceleration check` reports it): the schedule file and its contents, every
reinitialization config (trial-instantiated), the strategy-adapter options and custom adapter
references. The rest (parameter names, TrainingArguments, param-group counts) is checked at
augmentation, ready-for-train and before step 0.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from fms_acceleration import AccelerationPlugin, AccelerationPluginConfigError, validate_model
from fms_acceleration.validation import suggestion
from fms_acceleration_adapters import (
    BUILTIN_ADAPTERS,
    StrategyAdapter,
    StrategyAdapterError,
    adapter_name_for,
    check_custom_strategy_adapters,
    distributed_type_of,
    has_strategy_adapter,
    resolve_strategy_adapter,
    strategy_adapter_class,
)

from .fts_config import FTSConfig, FTSOptions
from .reinit_checks import check_lr_scheduler_reinit, check_optimizer_reinit, check_reinit_config
from .schedule import (
    FTSScheduleError,
    ParsedSchedule,
    convert_phase_keys,
    dump_schedule,
    parse_schedule,
    read_schedule,
    renumbered,
    resolve_schedule,
    schedule_epochs,
    unscheduled_params,
    write_new_file,
)

if TYPE_CHECKING:
    from .callback import FinetuningScheduleCallback

logger = logging.getLogger(__name__)

STANZA = "training.finetuning_schedule"
PATH = f"plugins.{STANZA}"


def _is_peft_config(arg: Any) -> bool:
    return hasattr(arg, "peft_type") and hasattr(arg, "target_modules")


def _is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value))


def _metric_key(name: str) -> str:
    return name if name.startswith("eval_") else f"eval_{name}"


def shared_aliases(model: torch.nn.Module, adapter: StrategyAdapter) -> dict[str, str]:
    """Logical names under which a tied parameter appears again -> its first logical name."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        logical = adapter.logical_param_name(name)
        if id(param) not in first:
            first[id(param)] = logical
        elif logical != first[id(param)]:
            aliases[logical] = first[id(param)]
    return aliases


class FinetuningSchedulePlugin(AccelerationPlugin):
    """Fine-Tuning Scheduler for transformers.Trainer (param freezing, groups, LR scheduler)."""

    slots = frozenset({"param_freezing"})
    order = 90  # after loaders and patchers: it freezes the final model

    def __init__(self, configurations: dict) -> None:
        super().__init__(configurations)
        self.options = FTSOptions.model_validate(self.stanza(STANZA) or {})
        self.ft_schedule = self.options.ft_schedule
        self.custom_strategy_adapters = dict(self.options.custom_strategy_adapters)
        self.strategy_adapter_cfg = dict(self.options.strategy_adapter_cfg)
        self.fts_config = FTSConfig.from_options(self.options)
        self.parsed: ParsedSchedule | None = self._parse_given_schedule()
        self._check_reinit_configs()
        self._check_adapter_options()
        self.adapter: StrategyAdapter | None = None
        self.distributed_type: Any = "single_device"
        self.callback: Any = None  # FinetuningScheduleCallback once augmentation ran

    @property
    def requires_augmentation(self) -> bool:
        return True

    # ------------------------------------------------------------------ checks without a model
    def _source(self) -> str:
        return f"{self.ft_schedule}: " if isinstance(self.ft_schedule, str) else ""

    def _parse_given_schedule(self) -> ParsedSchedule | None:
        if self.ft_schedule is not None and self.options.reinit_lr_cfg is not None:
            raise AccelerationPluginConfigError(
                f"{PATH}: ft_schedule and reinit_lr_cfg cannot be combined: reinit_lr_cfg "
                "rebuilds one LR scheduler config at every phase of the implicit (generated) "
                "schedule; with an explicit schedule, put new_lr_scheduler in its phases instead"
            )
        if self.ft_schedule is None:
            return None
        try:
            raw = read_schedule(self.ft_schedule)
        except FTSScheduleError as err:
            raise AccelerationPluginConfigError(f"{PATH}.ft_schedule: {err}") from None
        try:
            parsed = parse_schedule(raw, self.fts_config.epoch_transitions_only)
        except FTSScheduleError as err:
            written = self._write_renumbered(raw)
            where = f"; the renumbered schedule is in {written}" if written else ""
            raise AccelerationPluginConfigError(
                f"{PATH}.ft_schedule: {self._source()}{err}{where}"
            ) from None
        for note in parsed.notes:
            logger.warning("%s.ft_schedule: %s%s", PATH, self._source(), note)
        return parsed

    def _write_renumbered(self, raw: Any) -> str | None:
        # FTS writes a non-contiguous schedule renumbered (`_ft_schedule_valid.yaml`) to its
        # log_dir for the user to check. The model class and output_dir are not known yet: the
        # copy is named after the schedule file and goes to log_dir, else beside that file.
        folder = self.fts_config.log_dir
        if folder is None and isinstance(self.ft_schedule, str):
            folder = os.path.dirname(os.path.abspath(self.ft_schedule))
        if folder is None or not isinstance(raw, dict):
            return None
        try:
            keys = convert_phase_keys(raw)
        except FTSScheduleError:
            return None
        if sorted(keys) == list(range(len(keys))):
            return None
        stem = "ft_schedule"
        if isinstance(self.ft_schedule, str):
            stem = os.path.splitext(os.path.basename(self.ft_schedule))[0]
        try:
            path, _ = write_new_file(
                dump_schedule(renumbered(keys)), os.path.join(folder, f"{stem}_valid.yaml")
            )
        except OSError as err:
            logger.warning("%s.ft_schedule: the renumbered copy was not written: %s", PATH, err)
            return None
        return path

    def _check_reinit_configs(self) -> None:
        cfg = self.fts_config
        try:
            if cfg.reinit_optim_cfg is not None:
                check_optimizer_reinit(cfg.reinit_optim_cfg, "reinit_optim_cfg")
            if cfg.reinit_lr_cfg is not None:
                check_lr_scheduler_reinit(
                    cfg.reinit_lr_cfg,
                    "reinit_lr_cfg",
                    implicit=True,
                    allow_untested=cfg.allow_untested,
                )
        except FTSScheduleError as err:
            raise AccelerationPluginConfigError(f"{PATH}.{err}") from None
        if self.parsed is None:
            return
        try:
            check_reinit_config(self.parsed.phases, None, None, cfg.allow_untested)
        except FTSScheduleError as err:
            raise AccelerationPluginConfigError(
                f"{PATH}.ft_schedule: {self._source()}{err}"
            ) from None

    def _candidate_adapters(self) -> dict[str, type[StrategyAdapter]]:
        """Adapters this stanza could select: the built-ins and every custom reference."""
        try:
            check_custom_strategy_adapters(self.custom_strategy_adapters)
        except StrategyAdapterError as err:
            raise AccelerationPluginConfigError(f"{PATH}.{err}") from None
        found: dict[str, type[StrategyAdapter]] = {}
        for name in BUILTIN_ADAPTERS:
            found[name] = resolve_strategy_adapter(name)
        for key, ref in self.custom_strategy_adapters.items():
            try:
                found[adapter_name_for(key)] = resolve_strategy_adapter(ref)
            except StrategyAdapterError as err:
                raise AccelerationPluginConfigError(
                    f"{PATH}.custom_strategy_adapters.{key}: {err}"
                ) from None
        return found

    def _check_adapter_options(self) -> None:
        candidates = self._candidate_adapters()
        known = sorted({f for cls in candidates.values() for f in cls.Options.model_fields})
        for key in self.strategy_adapter_cfg:
            if key not in known:
                raise AccelerationPluginConfigError(
                    f"{PATH}.strategy_adapter_cfg.{key}: unknown key '{key}'"
                    f"{suggestion(key, known)}; allowed keys (adapters "
                    f"{', '.join(sorted(candidates))}): {', '.join(known)}."
                )
        for cls in {id(c): c for c in candidates.values()}.values():
            subset = {
                k: v for k, v in self.strategy_adapter_cfg.items() if k in cls.Options.model_fields
            }
            validate_model(
                cls.Options, subset, f"{PATH}.strategy_adapter_cfg", AccelerationPluginConfigError
            )

    # ------------------------------------------------------------------ adapter
    def _select_adapter(self, distributed_type: Any, model: torch.nn.Module) -> StrategyAdapter:
        name = adapter_name_for(distributed_type)
        custom = self.custom_strategy_adapters
        if name == "single_device" and _is_peft_model(model) and name not in custom:
            name = "peft"
        try:
            if has_strategy_adapter(name, custom):
                cls = strategy_adapter_class(name, custom or None)
            elif self.fts_config.allow_untested:
                logger.warning(
                    "%s: allowing untested strategy %r because allow_untested is true: the "
                    "single-device adapter is used",
                    PATH,
                    name,
                )
                cls = StrategyAdapter
            else:
                raise AccelerationPluginConfigError(
                    f"{PATH}: the fine-tuning schedule has not been adapted to or tested with the "
                    f"distributed strategy {name!r} (no strategy adapter; built-in: "
                    f"{', '.join(BUILTIN_ADAPTERS)}); map an adapter with "
                    f"custom_strategy_adapters: {{{name}: 'package.module:Adapter'}}, or set "
                    "allow_untested: true to try the single-device adapter"
                )
        except StrategyAdapterError as err:
            raise AccelerationPluginConfigError(f"{PATH}: {err}") from err
        options = cls.Options.model_fields
        cfg = {k: v for k, v in self.strategy_adapter_cfg.items() if k in options}
        ignored = sorted(set(self.strategy_adapter_cfg) - set(cfg))
        if ignored:
            logger.info(
                "%s.strategy_adapter_cfg: %s not used by %s (options of other adapters)",
                PATH,
                ", ".join(ignored),
                cls.__name__,
            )
        try:
            return cls(**cfg)
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
        self._check_training_arguments(train_args)
        self._extend_epochs(train_args)
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

    def _check_training_arguments(self, args: Any) -> None:
        cfg = self.fts_config
        eval_strategy = _strategy(getattr(args, "eval_strategy", "no"))
        save_strategy = _strategy(getattr(args, "save_strategy", "no"))
        if cfg.restore_best and "no" in (eval_strategy, save_strategy):
            raise AccelerationPluginConfigError(
                f"{PATH}.restore_best: true needs a checkpoint of the best evaluation to restore, "
                f"but TrainingArguments has eval_strategy={eval_strategy!r} and "
                f"save_strategy={save_strategy!r}: evaluate and save on the same cadence, or set "
                "restore_best: false"
            )
        if not cfg.epoch_transitions_only and eval_strategy == "no":
            logger.warning(
                "%s: early stopping needs evaluations, but eval_strategy is 'no': phases change "
                "only at max_transition_epoch / max_transition_step",
                PATH,
            )
        reinits = [("reinit_lr_cfg", cfg.reinit_lr_cfg)]
        if self.parsed is not None:
            reinits += [
                (f"ft_schedule: phase {d}.new_lr_scheduler", spec.new_lr_scheduler)
                for d, spec in enumerate(self.parsed.phases)
            ]
        for where, reinit in reinits:
            if reinit is None or not issubclass(
                reinit.lr_scheduler_init.resolve(), torch.optim.lr_scheduler.ReduceLROnPlateau
            ):
                continue
            wanted = getattr(args, "metric_for_best_model", None)
            monitor = reinit.pl_lrs_cfg.monitor
            if wanted is None or _metric_key(wanted) != _metric_key(monitor):
                raise AccelerationPluginConfigError(
                    f"{PATH}.{where}.pl_lrs_cfg.monitor: {monitor!r}, but the Trainer steps "
                    "ReduceLROnPlateau with TrainingArguments.metric_for_best_model, which is "
                    f"{wanted!r}: set metric_for_best_model={monitor!r}"
                )

    def _extend_epochs(self, args: Any) -> None:
        """FTS raises max_epochs to what the schedule needs; the Trainer reads num_train_epochs
        when train() starts, so raising it here lengthens the run (and its LR schedule)."""
        needed = schedule_epochs(self.parsed.phases) if self.parsed is not None else None
        if needed is None or not hasattr(args, "num_train_epochs"):
            return
        current = args.num_train_epochs
        last = len(self.parsed.phases) - 1
        logger.warning(
            "%s.ft_schedule: the final phase's max_transition_epoch (%d) is not a transition; "
            "the run lasts the greater of num_train_epochs (%s) and the largest "
            "max_transition_epoch of phases 1..%d (%d) epochs, as in FTS",
            PATH,
            self.parsed.phases[last].max_transition_epoch,
            current,
            last,
            needed,
        )
        if needed > current:
            args.num_train_epochs = float(needed)
            if getattr(args, "max_steps", -1) > 0:
                logger.warning(
                    "%s: num_train_epochs is now %d, but TrainingArguments.max_steps=%d still "
                    "ends the run at that step",
                    PATH,
                    needed,
                    args.max_steps,
                )

    def _build_callback(
        self, model: torch.nn.Module, adapter: StrategyAdapter
    ) -> FinetuningScheduleCallback:
        parsed = self.parsed
        source = self._source()
        try:
            if parsed is None:
                source = "(the generated default schedule) "
                parsed = parse_schedule(
                    adapter.gen_default_schedule(model), self.fts_config.epoch_transitions_only
                )
            names = adapter.schedule_param_names(model)
            phases = resolve_schedule(parsed, names, shared_aliases(model, adapter))
            adapter.validate_schedule(parsed.raw, model)
        except (FTSScheduleError, StrategyAdapterError) as err:
            raise AccelerationPluginConfigError(f"{PATH}.ft_schedule: {source}{err}") from err
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
        from .callback import FinetuningScheduleCallback, ScheduleFiles

        files = ScheduleFiles(
            schedule=parsed.raw,
            generated=self.parsed is None,
            keys_converted=bool(parsed.converted_keys),
        )
        adapter.on_before_init_client(model)
        callback = FinetuningScheduleCallback(model, phases, adapter, self.fts_config, files)
        callback.freeze_to_phase(0)
        adapter.connect(callback)
        adapter.on_after_init_client(model)
        return callback

    def get_callbacks_and_ready_for_train(
        self, model: Any = None, accelerator: Any = None, trainer: Any = None
    ) -> list:
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
        if trainer is not None:
            self._hook_checkpoint_loading()
        return [self.callback]

    def _hook_prepare_optimizer(self) -> None:
        """Through the framework's accelerator patcher, so undo_patches() reverts it."""
        callback = self.callback

        def builder(original: Any) -> Any:
            def prepare_optimizer(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
                # the Trainer loads optimizer.pt after prepare: the hook thaws saved phases first.
                # Installed after prepare, whose device placement reloads the optimizer's own state
                prepared = original(optimizer, *args, **kwargs)
                callback.install_resume_hook(prepared)
                return prepared

            return prepare_optimizer

        if "fts-resume-depth" not in {r.rule_id for r in self.accelerator_patcher.method_rules}:
            self.accelerator_patcher.wrap_method("fts-resume-depth", "prepare_optimizer", builder)

    def _hook_checkpoint_loading(self) -> None:
        """Record which checkpoint the Trainer resumes from (its fts_state.json is read there)."""
        plugin = self

        def builder(original: Any) -> Any:
            def load_optimizer_and_scheduler(checkpoint: Any, *args: Any, **kwargs: Any) -> Any:
                if checkpoint is not None and plugin.callback is not None:
                    plugin.callback.state.resume_dir = str(checkpoint)
                return original(checkpoint, *args, **kwargs)

            return load_optimizer_and_scheduler

        if "fts-resume-checkpoint" not in {r.rule_id for r in self.trainer_patcher.method_rules}:
            self.trainer_patcher.wrap_method(
                "fts-resume-checkpoint", "_load_optimizer_and_scheduler", builder
            )


def _register() -> None:
    AccelerationPlugin.register_plugin(
        FinetuningSchedulePlugin,
        configuration_and_paths=[STANZA],
        plugin_id="finetuning_schedule",
        schemas={STANZA: FTSOptions},
        package_name="fms-acceleration-fts",
    )


_register()
