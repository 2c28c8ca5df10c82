"""The plugin base class, its registration record, and the registrations made in this process.

`AccelerationPlugin.register_plugin` works as in the reference fms-acceleration: a plugin module
registers its class when imported, and every framework built afterwards finds it (besides the
plugins found through entry points). A registration may declare pydantic schemas for its stanzas;
without them the stanza reaches the plugin unvalidated.
"""

from __future__ import annotations

import importlib.util
import itertools
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from pydantic import BaseModel

from .accelerator_patcher import AcceleratorPatcher
from .dotted_paths import lookup, set_at
from .errors import (
    AccelerationPluginConfigError,
    PluginHookMissingError,
    PluginRegistrationError,
)
from .model_patcher import ModelPatcher
from .packages import NOT_INSTALLED, distribution_of_module, installed_version
from .trainer_patcher import TrainerPatcher

MODEL_LOADER_SLOT = "model_loader"
TRAINING_BATCH_SLOT = "training_batch"
VALIDATION_BATCH_SLOT = "validation_batch"
_REGISTRATION_ATTR = "_fms_acceleration_registration"
_SEQUENCE = itertools.count()

__all__ = [
    "PLUGIN_REGISTRATIONS",
    "AccelerationPlugin",
    "AccelerationPluginConfigError",
    "PluginRegistration",
    "Requirement",
    "get_relevant_configuration_sections",
]


@dataclass(frozen=True)
class Requirement:
    """Something a plugin needs from another active plugin: a slot, optionally by given ids."""

    slot: str
    providers: tuple[str, ...] | None = None
    reason: str = ""

    def describe(self) -> str:
        who = f" by one of {', '.join(self.providers)}" if self.providers else ""
        why = f" ({self.reason})" if self.reason else ""
        return f"slot '{self.slot}' taken{who}{why}"


@dataclass(frozen=True)
class PluginRegistration:
    """How a plugin class is activated: which stanza paths, with which schemas, under which id."""

    plugin_class: type[AccelerationPlugin]
    plugin_id: str
    configuration_and_paths: tuple[str, ...]
    configuration_or_paths: tuple[str, ...]
    schemas: Mapping[str, type[BaseModel]]
    package_name: str
    package_version: str
    sequence: int

    # --- the reference's field names ---------------------------------------------------------
    @property
    def plugin(self) -> type[AccelerationPlugin]:
        return self.plugin_class

    @property
    def AND(self) -> list[str]:
        return list(self.configuration_and_paths)

    @property
    def OR(self) -> list[str]:
        return list(self.configuration_or_paths)

    @property
    def paths(self) -> tuple[str, ...]:
        return self.configuration_and_paths + self.configuration_or_paths

    @property
    def validated(self) -> bool:
        """Whether every stanza path has a schema (schema-less is the reference's style)."""
        return all(path in self.schemas for path in self.paths)

    def is_activated_by(self, present_paths: set[str] | frozenset[str]) -> bool:
        """AND paths must all be present; if OR paths are given, at least one must be."""
        if not all(p in present_paths for p in self.configuration_and_paths):
            return False
        return not self.configuration_or_paths or any(
            p in present_paths for p in self.configuration_or_paths
        )


def registration_of(plugin_class: type) -> PluginRegistration | None:
    """The latest registration made on exactly this class (subclasses do not inherit it)."""
    return plugin_class.__dict__.get(_REGISTRATION_ATTR)


def _registered_ancestor(plugin_class: type) -> PluginRegistration | None:
    """The registration of the nearest registered base class, if any."""
    for base in plugin_class.__mro__[1:]:
        registration = registration_of(base)
        if registration is not None:
            return registration
    return None


# --- the registrations of this process ----------------------------------------------------------


class _Registry:
    """Registrations in registration order; re-registering a class replaces its record."""

    def __init__(self, use_entry_points: bool) -> None:
        self.use_entry_points = use_entry_points
        self._items: list[PluginRegistration] = []
        self._lock = threading.Lock()

    def add(self, registration: PluginRegistration) -> None:
        with self._lock:
            for index, existing in enumerate(self._items):
                if existing.plugin_class is registration.plugin_class:
                    self._items[index] = registration
                    return
            self._items.append(registration)

    def snapshot(self) -> tuple[PluginRegistration, ...]:
        with self._lock:
            return tuple(self._items)


_PROCESS_REGISTRY = _Registry(use_entry_points=True)
_SCOPED_REGISTRY: ContextVar[_Registry | None] = ContextVar(
    "fms_acceleration_scoped_registry", default=None
)


def active_registry() -> _Registry:
    """The registry register_plugin writes to here: the process one, or a test's scoped one."""
    return _SCOPED_REGISTRY.get() or _PROCESS_REGISTRY


@contextmanager
def isolated_registrations(use_entry_points: bool = False) -> Iterator[None]:
    """Within the block, registrations go to a registry of its own, dropped at the end; only
    those exist, plus the installed plugins if `use_entry_points`."""
    token = _SCOPED_REGISTRY.set(_Registry(use_entry_points=use_entry_points))
    try:
        yield
    finally:
        _SCOPED_REGISTRY.reset(token)


class _RegistrationsView(Sequence):
    """Read-only live view of the registrations visible here (the reference's list)."""

    def __getitem__(self, index: Any) -> Any:
        return active_registry().snapshot()[index]

    def __len__(self) -> int:
        return len(active_registry().snapshot())

    def __repr__(self) -> str:
        return f"PLUGIN_REGISTRATIONS({list(active_registry().snapshot())!r})"


PLUGIN_REGISTRATIONS: Sequence[PluginRegistration] = _RegistrationsView()


def _paths(paths: Sequence[str] | None, argument: str, plugin: type) -> tuple[str, ...]:
    if paths is None:
        return ()
    if isinstance(paths, str):
        raise PluginRegistrationError(
            f"{plugin.__name__}: {argument} must be a list of dotted paths, not the string "
            f"{paths!r}"
        )
    for path in paths:
        parts = path.split(".") if isinstance(path, str) else [""]
        if not all(parts):
            raise PluginRegistrationError(
                f"{plugin.__name__}: {argument} entry {path!r} is not a dotted path"
            )
    return tuple(paths)


def _schemas(
    schemas: Mapping[str, type[BaseModel]] | None, paths: tuple[str, ...], plugin: type
) -> dict[str, type[BaseModel]]:
    schemas = dict(schemas or {})
    for path, schema in schemas.items():
        if path not in paths:
            raise PluginRegistrationError(
                f"{plugin.__name__}: schema given for '{path}', which is not one of its stanza "
                f"paths ({', '.join(paths)})"
            )
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            raise PluginRegistrationError(
                f"{plugin.__name__}: the schema of '{path}' must be a pydantic model class "
                f"(e.g. a fms_acceleration.StanzaModel subclass), got {schema!r}"
            )
    return schemas


class AccelerationPlugin:
    """Base class of every plugin; subclasses override the hooks they need."""

    require_packages: ClassVar[Sequence[str] | None] = ()
    install_hints: ClassVar[Mapping[str, str]] = MappingProxyType({})
    restricted_model_archs: ClassVar[Sequence[str] | frozenset[str] | None] = None
    slots: ClassVar[frozenset[str]] = frozenset()
    order: ClassVar[int | None] = None
    # the framework's record of this instance (id, package, stanza paths), set when it builds it
    _registration: PluginRegistration

    @staticmethod
    def register_plugin(
        plugin: type[AccelerationPlugin],
        configuration_and_paths: Sequence[str] | None = None,
        configuration_or_paths: Sequence[str] | None = None,
        *,
        plugin_id: str | None = None,
        schemas: Mapping[str, type[BaseModel]] | None = None,
        package_name: str | None = None,
    ) -> PluginRegistration:
        """Record which stanza paths activate `plugin`, and how each stanza is validated."""
        if not (isinstance(plugin, type) and issubclass(plugin, AccelerationPlugin)):
            raise PluginRegistrationError(
                f"register_plugin expects an AccelerationPlugin subclass, got {plugin!r}"
            )
        and_paths = _paths(configuration_and_paths, "configuration_and_paths", plugin)
        or_paths = _paths(configuration_or_paths, "configuration_or_paths", plugin)
        if not and_paths and not or_paths:
            raise PluginRegistrationError(
                f"{plugin.__name__}: Specify at least one AND or OR path (register_plugin needs "
                "at least one stanza path)"
            )
        parent = _registered_ancestor(plugin)
        package, version = distribution_of_module(plugin.__module__)
        if package_name is not None:
            package, version = package_name, installed_version(package_name) or version
        elif parent is not None and version == NOT_INSTALLED:
            # a subclass made at run time (a client's test spy) ships in its parent's package
            package, version = parent.package_name, parent.package_version
        if schemas is None and parent is not None:
            # the reference's style (no schema) on a subclass of ours: its stanzas keep the
            # parent's validation and defaults, which the parent's code reads
            schemas = {p: parent.schemas[p] for p in and_paths + or_paths if p in parent.schemas}
        registration = PluginRegistration(
            plugin_class=plugin,
            plugin_id=plugin_id or plugin.__name__,
            configuration_and_paths=and_paths,
            configuration_or_paths=or_paths,
            schemas=MappingProxyType(_schemas(schemas, and_paths + or_paths, plugin)),
            package_name=package,
            package_version=version,
            sequence=next(_SEQUENCE),
        )
        setattr(plugin, _REGISTRATION_ATTR, registration)
        active_registry().add(registration)
        return registration

    def __init__(self, configurations: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        # extra arguments: our own plugins were once built with require_packages_check
        self.configurations = configurations
        # built by a framework: its patchers (rules registered in __init__ reach them)
        self.model_patcher = ModelPatcher.current() or ModelPatcher()
        self.accelerator_patcher = AcceleratorPatcher.current() or AcceleratorPatcher()
        self.trainer_patcher = TrainerPatcher.current() or TrainerPatcher()

    @property
    def plugin_id(self) -> str:
        registration = self.__dict__.get("_registration") or registration_of(type(self))
        return registration.plugin_id if registration else type(self).__name__

    def missing_packages(self) -> list[str]:
        """Required packages that are not installed."""
        return [p for p in self.require_packages or () if importlib.util.find_spec(p) is None]

    def check_required_packages(self) -> None:
        """Fail with a message naming what to install when a required package is missing."""
        for package in self.missing_packages():
            hint = self.install_hints.get(package, package)
            raise AccelerationPluginConfigError(
                f"plugin '{self.plugin_id}' needs the package '{package}', which is not "
                f"installed; install it with: pip install {hint}"
            )

    def stanza(self, path: str) -> Any:
        """The (validated) body of the stanza at dotted `path`, or None when absent."""
        return stanza_at(self.configurations, path)

    def _check_config_and_maybe_check_values(
        self, key: str, values: Sequence[Any] | None = None, default: Any = None
    ) -> Any:
        """The reference's lookup of a dotted key in this plugin's stanzas, optionally checked
        against a list of allowed values (a one-key mapping counts as its key)."""
        value = self.stanza(key)
        if values is not None:
            if isinstance(value, Mapping):
                if len(value) > 1:
                    raise AccelerationPluginConfigError(
                        f"plugins.{key}: expected one of {list(values)}, found several keys "
                        f"{sorted(value)}."
                    )
                value = next(iter(value), None)
            if value not in values:
                if value is not None or default is None:
                    raise AccelerationPluginConfigError(
                        f"plugins.{key}: {value!r} is not an allowed value; allowed: "
                        f"{', '.join(map(repr, values))}."
                    )
                value = default
        elif value is None:
            if default is None:
                raise AccelerationPluginConfigError(f"plugins.{key}: required key is missing.")
            value = default
        return value

    def _check_config_equal(self, key: str, value: Any, **kwargs: Any) -> Any:
        return self._check_config_and_maybe_check_values(key, [value], **kwargs)

    # --- what the framework asks of a plugin -------------------------------------------------

    @property
    def requires_custom_loading(self) -> bool:
        return False

    @property
    def requires_augmentation(self) -> bool:
        return False

    def taken_slots(self) -> frozenset[str]:
        """Unique responsibilities this plugin takes over; two active plugins may not share one."""
        extra = {MODEL_LOADER_SLOT} if self.requires_custom_loading else set()
        return frozenset(self.slots) | extra

    def requirements(self) -> Sequence[Requirement]:
        """What this plugin needs other active plugins to provide."""
        return ()

    def is_one_of(self, plugin_ids: Collection[str]) -> bool:
        """Whether this plugin is one of `plugin_ids`: by its own id or by that of a registered
        class it extends (fms-hf-tuning's tests register spy subclasses under their own names)."""
        lineage = (registration_of(c) for c in type(self).__mro__[1:])
        ids = {self.plugin_id} | {r.plugin_id for r in lineage if r is not None}
        return not ids.isdisjoint(plugin_ids)

    def model_loader(self, model_name: str, **kwargs: Any) -> Any:
        """Load the model; only called on a plugin that takes the model_loader slot."""
        raise PluginHookMissingError(
            f"plugin '{self.plugin_id}' declares requires_custom_loading but does not define "
            "model_loader()"
        )

    def augmentation(self, model: Any, train_args: Any, modifiable_args: Any) -> tuple[Any, Any]:
        """Modify the model (and arguments such as a peft config) before the Trainer sees it."""
        raise PluginHookMissingError(
            f"plugin '{self.plugin_id}' declares requires_augmentation but does not define "
            "augmentation()"
        )

    def get_callbacks_and_ready_for_train(self, model: Any = None, accelerator: Any = None) -> list:
        """Trainer callbacks to add; last chance to register accelerator patches."""
        return []

    # --- batch hooks (Helios-style); a plugin overriding one must declare its slot -----------

    def process_training_batch(self, batch: Any, state: Any) -> Any:
        """Change a training batch before the model sees it (slot `training_batch`)."""
        return batch

    def process_validation_batch(self, batch: Any, step: int) -> Any:
        """Change an evaluation batch before the model sees it (slot `validation_batch`)."""
        return batch

    def should_training_stop(self, state: Any) -> bool:
        """Ask the Trainer to stop; answers of all plugins are OR-ed (and across ranks)."""
        return False


def stanza_at(configuration: Mapping[str, Any], path: str) -> Any:
    """The body at dotted `path` of a `plugins:` body, or None when absent."""
    return lookup(configuration, path)[1]


def relevant_sections(configuration: Mapping[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """The nested sub-tree holding only `paths` (those present) of `configuration`."""
    out: dict[str, Any] = {}
    for path in paths:
        body = stanza_at(configuration, path)
        if body is not None:
            set_at(out, path, body)
    return out


def get_relevant_configuration_sections(
    configuration: Mapping[str, Any],
) -> list[tuple[dict[str, Any], type[AccelerationPlugin]]]:
    """(sections, plugin class) for each registration here that `configuration` activates,
    in registration order (the reference's helper)."""
    results = []
    for registration in sorted(active_registry().snapshot(), key=lambda r: r.sequence):
        present = {p for p in registration.paths if stanza_at(configuration, p) is not None}
        if registration.is_activated_by(present):
            results.append(
                (relevant_sections(configuration, registration.paths), registration.plugin)
            )
    return results
