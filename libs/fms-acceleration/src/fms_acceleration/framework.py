"""AccelerationFramework: reads one YAML, activates plugins and drives them around a Trainer."""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from types import MappingProxyType
from typing import Any

from .accelerator_patcher import AcceleratorPatcher
from .batch_hooks import (
    TRAINING_BATCH_RULE,
    VALIDATION_BATCH_RULE,
    BatchCounter,
    check_hook_slots,
    hooks_callback,
    overrides,
    training_batch_builder,
    validation_batch_builder,
)
from .compatibility import check_requirements, refuse_duplicate_ids, run_order, slot_owners
from .config_file import load_configuration, resolve_configuration_source
from .constants import KEY_PLUGINS
from .discovery import plugin_catalogue
from .errors import (
    AccelerationFrameworkError,
    AccelerationPluginConfigError,
    ModelWithoutConfigError,
    NoPluginsConfiguredError,
    PatchNotInEffectError,
    PluginHookMissingError,
)
from .framework_plugin import (
    MODEL_LOADER_SLOT,
    TRAINING_BATCH_SLOT,
    VALIDATION_BATCH_SLOT,
    AccelerationPlugin,
    PluginRegistration,
    relevant_sections,
)
from .model_patcher import ModelPatcher
from .packages import installed_version
from .patch_effect import IneffectivePatch, ineffective_patches
from .stanzas import ValidatedPlugins, validate_plugins_tree
from .summary import active_plugin_lines, ready_for_train_table
from .trainer_patcher import TrainerPatcher

__all__ = ["KEY_PLUGINS", "AccelerationFramework"]

logger = logging.getLogger("fms_acceleration")

_NO_PLUGINS = (
    "No plugins could be configured. Please check the acceleration framework configuration file"
)


def _model_architectures(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    archs = set(getattr(base.config, "architectures", None) or [])
    return archs | {type(base).__name__ if not isinstance(base, type) else base.__name__}


def _accepts(function: Any, parameter: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return parameter in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


class AccelerationFramework:
    """Activates the plugins a configuration asks for and applies them in declared order.

    Everything lives on the instance: two frameworks in one process never see each other, and
    a class-level assignment (the reference's `AccelerationFramework.active_plugins = []`)
    changes nothing an instance reports.
    """

    def __init__(
        self,
        configuration_file: str | os.PathLike | Mapping | None = None,
        require_packages_check: bool = True,
        *,
        plugin_classes: Sequence[type[AccelerationPlugin]] | None = None,
        strict_stanzas: bool = False,
    ) -> None:
        """`strict_stanzas`: a stanza no plugin claims is an error (as `fms-acceleration check`
        reports it), not a warning naming it (the reference ignored it silently)."""
        configuration = load_configuration(resolve_configuration_source(configuration_file))
        body, self.source = configuration.plugins, configuration.source
        self.strict = configuration.strict
        self.not_in_effect: list[IneffectivePatch] = []
        self.model_patcher = ModelPatcher()
        self.accelerator_patcher = AcceleratorPatcher()
        self.trainer_patcher = TrainerPatcher()
        self._validation_batches = BatchCounter()
        self._strict_stanzas = strict_stanzas
        try:
            catalogue = plugin_catalogue(plugin_classes)
            validated = validate_plugins_tree(body, catalogue.registrations, catalogue.broken)
            chosen = self._choose(catalogue.registrations, validated)
            with self._running():
                plugins = [
                    self._construct(reg, validated, require_packages_check) for reg in chosen
                ]
            refuse_duplicate_ids(plugins)
            check_hook_slots(plugins)
            owners = slot_owners(plugins)
            check_requirements(plugins, owners)
        except NoPluginsConfiguredError:
            raise
        except AccelerationPluginConfigError as err:
            raise type(err)(f"{self.source}: {err}") from None
        self.configurations = validated.tree
        self.passed_through = dict(validated.passed_through)
        self._ordered = run_order(plugins)
        self._slot_owners = MappingProxyType(owners)
        for plugin in self._ordered:
            plugin.model_patcher = self.model_patcher
            plugin.accelerator_patcher = self.accelerator_patcher
            plugin.trainer_patcher = self.trainer_patcher
        # the reference's public attributes, as plain per-instance lists
        self.active_plugins: list[tuple[str, AccelerationPlugin]] = [
            (type(p).__name__, p) for p in self._ordered
        ]
        self.plugins_require_custom_loading: list[str] = [
            type(p).__name__ for p in self._ordered if p.requires_custom_loading
        ]

    # --- construction --------------------------------------------------------------------------

    def _choose(
        self, registrations: Sequence[PluginRegistration], validated: ValidatedPlugins
    ) -> list[PluginRegistration]:
        chosen: list[PluginRegistration] = []
        for registration in registrations:
            if not registration.is_activated_by(validated.present):
                continue
            twin = next(
                (c for c in chosen if c.plugin.__name__ == registration.plugin.__name__), None
            )
            if twin is not None:
                warnings.warn(
                    f"plugin class {registration.plugin.__name__} from "
                    f"{registration.plugin.__module__} is not activated: a plugin class of that "
                    f"name from {twin.plugin.__module__} already is",
                    stacklevel=3,
                )
                continue
            chosen.append(registration)
        if validated.unknown:
            if not chosen:
                raise NoPluginsConfiguredError(
                    f"{_NO_PLUGINS} '{self.source}': {validated.unknown[0]}"
                )
            if self._strict_stanzas:
                raise AccelerationPluginConfigError(validated.unknown[0])
            for message in validated.unknown:
                warnings.warn(
                    f"{self.source}: {message} It is ignored; `fms-acceleration check` reports "
                    "it as an error.",
                    stacklevel=4,
                )
        if not chosen:
            raise NoPluginsConfiguredError(f"{_NO_PLUGINS} '{self.source}': {_why_none(validated)}")
        _refuse_ignored_stanzas(registrations, validated.present)
        return chosen

    def _construct(
        self,
        registration: PluginRegistration,
        validated: ValidatedPlugins,
        require_packages_check: bool,
    ) -> AccelerationPlugin:
        cls = registration.plugin_class
        sections = relevant_sections(validated.tree, registration.paths)
        try:
            plugin = cls(sections)
        except (AccelerationPluginConfigError, AccelerationFrameworkError):
            raise
        except Exception as err:
            raise AccelerationPluginConfigError(
                f"plugin '{registration.plugin_id}' ({cls.__name__} from package "
                f"'{registration.package_name}') failed to start: {type(err).__name__}: {err}"
            ) from err
        plugin._registration = registration
        if not registration.validated:
            unchecked = [p for p in registration.paths if p not in registration.schemas]
            warnings.warn(
                f"plugin '{registration.plugin_id}' ({cls.__name__}) declares no schema: its "
                f"stanzas {', '.join('plugins.' + p for p in unchecked)} reach it unvalidated",
                stacklevel=4,
            )
        if require_packages_check:
            plugin.check_required_packages()
        return plugin

    @contextmanager
    def _running(self) -> Iterator[None]:
        """Make this framework's patchers the target of class-level patcher calls."""
        with ExitStack() as stack:
            stack.enter_context(self.model_patcher.activated())
            stack.enter_context(self.accelerator_patcher.activated())
            stack.enter_context(self.trainer_patcher.activated())
            yield

    # --- what a client asks -------------------------------------------------------------------

    @property
    def plugins(self) -> Mapping[str, AccelerationPlugin]:
        """Active plugin instances by id, in run order."""
        return MappingProxyType({p.plugin_id: p for p in self._ordered})

    @property
    def slot_owners(self) -> Mapping[str, str]:
        """Which plugin id holds each slot."""
        return MappingProxyType({slot: p.plugin_id for slot, p in self._slot_owners.items()})

    @property
    def requires_custom_loading(self) -> bool:
        return MODEL_LOADER_SLOT in self._slot_owners

    @property
    def requires_augmentation(self) -> bool:
        return any(p.requires_augmentation for p in self._ordered)

    def model_loader(self, model_name: str, **kwargs: Any) -> Any:
        """Load the model through the one plugin holding the model_loader slot."""
        loader = self._slot_owners.get(MODEL_LOADER_SLOT)
        if loader is None:
            names = ", ".join(type(p).__name__ for p in self._ordered)
            raise PluginHookMissingError(
                f"Attempted model loading, but none of activated plugins ({names}) require "
                "custom loading: load the model yourself, e.g. "
                "AutoModelForCausalLM.from_pretrained(...)"
            )
        with self._running():
            return loader.model_loader(model_name, **kwargs)

    def augmentation(
        self, model: Any, train_args: Any, modifiable_args: tuple[Any, ...] | None
    ) -> tuple[Any, Any]:
        """Let each plugin modify the model and the modifiable args, then apply model patches."""
        if modifiable_args is not None and not isinstance(modifiable_args, tuple):
            raise AccelerationFrameworkError(
                f"modifiable_args must be a tuple, got {type(modifiable_args).__name__}"
            )
        augmenting = [p for p in self._ordered if p.requires_augmentation]
        if augmenting and not hasattr(
            model.get_base_model() if hasattr(model, "get_base_model") else model, "config"
        ):
            raise ModelWithoutConfigError(
                f"augmentation needs a transformers model (one with a `config`); got "
                f"{type(model).__name__}"
            )
        with self._running():
            for plugin in augmenting:
                self._check_architecture(plugin, model)
                model, returned = plugin.augmentation(model, train_args, modifiable_args)
                if isinstance(modifiable_args, tuple) and (
                    not isinstance(returned, tuple) or len(returned) != len(modifiable_args)
                ):
                    raise AccelerationFrameworkError(
                        f"plugin '{plugin.plugin_id}' returned modifiable_args {returned!r}; "
                        f"expected a tuple of {len(modifiable_args)} item(s)"
                    )
                modifiable_args = returned
            self.model_patcher.patch(model)
        return model, modifiable_args

    def get_callbacks_and_ready_for_train(
        self, model: Any = None, accelerator: Any = None, trainer: Any = None
    ) -> list:
        """Collect every plugin's callbacks (and the one applying their stop requests), install
        all patches (batch hooks on `trainer`), log the summary."""
        callbacks: list = []
        with self._running():
            for plugin in self._ordered:
                # an override may take `trainer` too (checked below)
                hook: Callable[..., list] = plugin.get_callbacks_and_ready_for_train
                if trainer is not None and _accepts(hook, "trainer"):
                    callbacks.extend(hook(model, accelerator, trainer=trainer))
                else:
                    callbacks.extend(hook(model, accelerator))
            callbacks.extend(self._plugin_hooks(trainer))
            if model is not None:
                self.model_patcher.patch(model)
            if accelerator is not None:
                self.accelerator_patcher.install(accelerator)
            if trainer is not None:
                self.trainer_patcher.install(trainer)
        self.check_patches(call_sites=True)
        if self._patch_records():
            callbacks.append(patch_watch_callback(self))
        if accelerator is None or getattr(accelerator, "is_main_process", True):
            logger.info("\n%s", self.summary())
        return callbacks

    def _patch_records(self) -> list:
        patchers = (self.model_patcher, self.accelerator_patcher, self.trainer_patcher)
        return [record for patcher in patchers for record in patcher.history]

    def check_patches(self, *, call_sites: bool = False, trained: bool = False) -> None:
        """Confirm every applied patch is what the model (Trainer, accelerator) will call; with
        `trained` (after a training step), also that every collator/dataloader replacement was
        used. Not in effect: an error naming the patch, or with `strict: false` a warning and a
        "not applied" line in the summary."""
        found = ineffective_patches(self._patch_records(), call_sites=call_sites)
        if trained:
            found += [
                IneffectivePatch(
                    rule.rule_id,
                    rule.component.name,
                    "no DataLoader went through accelerator.prepare, so it was never replaced",
                )
                for rule in self.accelerator_patcher.unused_replacements()
            ]
        new = [problem for problem in found if problem not in self.not_in_effect]
        if not new:
            return
        versions = ", ".join(
            f"{name} {installed_version(name) or 'not installed'}"
            for name in ("transformers", "peft", "accelerate")
        )
        lines = "; ".join(problem.describe() for problem in new)
        if self.strict:
            raise PatchNotInEffectError(
                f"{self.source}: {lines} ({versions}). Training would run without it. Set "
                "'strict: false' at the top of the configuration to train anyway with a warning."
            )
        self.not_in_effect.extend(new)
        warnings.warn(
            f"{self.source}: not applied (strict: false): {lines} ({versions})", stacklevel=2
        )

    def _plugin_hooks(self, trainer: Any) -> list:
        """Register the batch-hook rules of the slot owners; the callback for stop requests."""
        batch_owners = {
            slot: self._slot_owners[slot]
            for slot in (TRAINING_BATCH_SLOT, VALIDATION_BATCH_SLOT)
            if slot in self._slot_owners
        }
        if batch_owners and trainer is None:
            owner = next(iter(batch_owners.values()))
            raise AccelerationFrameworkError(
                f"plugin '{owner.plugin_id}' processes batches (slot "
                f"'{next(iter(batch_owners))}'): pass the Trainer, "
                "get_callbacks_and_ready_for_train(model, trainer.accelerator, trainer=trainer)"
            )
        registered = {rule.rule_id for rule in self.trainer_patcher.method_rules}
        rules = {
            TRAINING_BATCH_SLOT: (TRAINING_BATCH_RULE, "get_batch_samples", training_batch_builder),
            VALIDATION_BATCH_SLOT: (
                VALIDATION_BATCH_RULE,
                "prediction_step",
                lambda plugin: validation_batch_builder(plugin, self._validation_batches),
            ),
        }
        for slot, owner in batch_owners.items():
            rule_id, method, make_builder = rules[slot]
            if rule_id not in registered:
                self.trainer_patcher.wrap_method(rule_id, method, make_builder(owner))
        stoppers = [p for p in self._ordered if overrides(p, "should_training_stop")]
        validating = VALIDATION_BATCH_SLOT in batch_owners
        if not stoppers and not validating:
            return []
        return [hooks_callback(stoppers, self._validation_batches if validating else None)]

    def undo_patches(self) -> None:
        """Revert every model, accelerator and Trainer patch the plugins applied."""
        self.trainer_patcher.undo()
        self.accelerator_patcher.undo()
        self.model_patcher.undo()

    def summary(self) -> str:
        """The ready-for-train table: plugins, versions, slots, applied patches."""
        plugin_rows = []
        for index, plugin in enumerate(self._ordered, start=1):
            registration: PluginRegistration = plugin._registration
            plugin_rows.append(
                (
                    str(index),
                    plugin.plugin_id,
                    registration.package_name,
                    registration.package_version,
                    ", ".join(sorted(plugin.taken_slots())) or "-",
                    ", ".join(registration.paths),
                )
            )
        counts: dict[tuple[str, str], list[str]] = {}
        patchers = (self.model_patcher, self.accelerator_patcher, self.trainer_patcher)
        for patcher in patchers:
            for record in patcher.history:
                counts.setdefault((record.rule_id, record.kind), []).append(record.target)
        for rule in self.accelerator_patcher.replacement_rules.values():
            counts.setdefault((rule.rule_id, rule.component.name), [])
        patch_rows = [
            (rule_id, kind, str(len(targets)), _abbreviate(targets))
            for (rule_id, kind), targets in counts.items()
        ]
        header = active_plugin_lines([(type(p).__name__, p._registration) for p in self._ordered])
        table = ready_for_train_table(plugin_rows, patch_rows, sorted(self.passed_through))
        not_applied = "".join(f"\nnot applied: {p.describe()}" for p in self.not_in_effect)
        return header + "\n" + table + not_applied

    def _check_architecture(self, plugin: AccelerationPlugin, model: Any) -> None:
        restricted = type(plugin).restricted_model_archs
        if not restricted:
            return
        archs = _model_architectures(model)
        if not archs & set(restricted):
            raise AccelerationPluginConfigError(
                f"Model architectures in {sorted(archs)} are not supported for "
                f"'{plugin.plugin_id}'; supported: {', '.join(sorted(restricted))}."
            )


def patch_watch_callback(framework: AccelerationFramework) -> Any:
    """A Trainer callback that re-checks the patches after every training step: a layer that
    transformers resets on a train()/eval() switch would otherwise train unpatched."""
    from transformers import TrainerCallback

    class PatchWatchCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            framework.check_patches(trained=True)

    return PatchWatchCallback()


def _refuse_ignored_stanzas(
    registrations: Sequence[PluginRegistration], present: frozenset[str]
) -> None:
    """A stanza the user wrote whose plugin stays inactive (another stanza it needs is missing)
    would be ignored while the others train: name what it needs instead."""
    # a plugin left out only as a same-named duplicate was activated: it was warned about
    activated = [r for r in registrations if r.is_activated_by(present)]
    claimed = {path for registration in activated for path in registration.paths}
    for path in sorted(present - claimed):
        registration = next(r for r in registrations if path in r.paths)
        missing = [f"plugins.{p}" for p in registration.configuration_and_paths if p not in present]
        if registration.configuration_or_paths and not present & set(
            registration.configuration_or_paths
        ):
            missing.append(
                "one of " + ", ".join(f"plugins.{p}" for p in registration.configuration_or_paths)
            )
        raise AccelerationPluginConfigError(
            f"plugins.{path}: plugin '{registration.plugin_id}' needs {' and '.join(missing)} as "
            f"well; without it this stanza would be ignored. Add it, or remove plugins.{path}."
        )


def _why_none(validated: ValidatedPlugins) -> str:
    if validated.passed_through:
        return "its stanzas belong to plugins that are not installed: " + ", ".join(
            f"{p} (pip install {pkg})" for p, pkg in validated.passed_through.items()
        )
    if not validated.present:
        return f"there is no plugin stanza under '{KEY_PLUGINS}:'."
    return "no plugin has all the stanzas it needs; present: " + ", ".join(
        f"plugins.{p}" for p in sorted(validated.present)
    )


def _abbreviate(targets: list[str], limit: int = 2) -> str:
    if not targets:
        return "(at accelerator.prepare)"
    shown = ", ".join(targets[:limit])
    return shown + (f", ... (+{len(targets) - limit})" if len(targets) > limit else "")
