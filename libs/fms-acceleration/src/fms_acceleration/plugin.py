"""The plugin base class, its registration record and the requirements it may declare."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from .accelerator_patcher import AcceleratorPatcher
from .errors import AccelerationFrameworkError, AccelerationPluginConfigError
from .model_patcher import ModelPatcher
from .schema import Stanza

MODEL_LOADER_SLOT = "model_loader"
_REGISTRATION_ATTR = "_fms_acceleration_registration"


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
    schemas: Mapping[str, Stanza]
    package_name: str | None = None
    experimental: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> tuple[str, ...]:
        return self.configuration_and_paths + self.configuration_or_paths

    def is_activated_by(self, present_paths: set[str]) -> bool:
        """AND paths must all be present; if OR paths are given, at least one must be."""
        if not self.paths:
            return False
        if not all(p in present_paths for p in self.configuration_and_paths):
            return False
        return not self.configuration_or_paths or any(
            p in present_paths for p in self.configuration_or_paths
        )


def registration_of(plugin_class: type) -> PluginRegistration | None:
    """The registration made on exactly this class (subclasses do not inherit it)."""
    return plugin_class.__dict__.get(_REGISTRATION_ATTR)


def _normalise_paths(paths: Sequence[str] | None, argument: str) -> tuple[str, ...]:
    if paths is None:
        return ()
    if isinstance(paths, str):
        raise TypeError(f"{argument} must be a list of dotted paths, not the string {paths!r}")
    return tuple(paths)


class AccelerationPlugin:
    """Base class of every plugin; subclasses override the hooks they need."""

    require_packages: ClassVar[tuple[str, ...]] = ()
    install_hints: ClassVar[Mapping[str, str]] = MappingProxyType({})
    restricted_model_archs: ClassVar[frozenset[str] | None] = None
    slots: ClassVar[frozenset[str]] = frozenset()
    order: ClassVar[int] = 100

    @staticmethod
    def register_plugin(
        plugin: type[AccelerationPlugin],
        configuration_and_paths: Sequence[str] | None = None,
        configuration_or_paths: Sequence[str] | None = None,
        *,
        plugin_id: str | None = None,
        schemas: Mapping[str, Stanza] | None = None,
        package_name: str | None = None,
        experimental: bool = False,
        **kwargs: Any,
    ) -> PluginRegistration:
        """Record on `plugin` which stanza paths activate it and how each is validated."""
        if not (isinstance(plugin, type) and issubclass(plugin, AccelerationPlugin)):
            raise TypeError(
                f"register_plugin expects an AccelerationPlugin subclass, got {plugin!r}"
            )
        and_paths = _normalise_paths(configuration_and_paths, "configuration_and_paths")
        or_paths = _normalise_paths(configuration_or_paths, "configuration_or_paths")
        if not and_paths and not or_paths:
            raise TypeError(f"{plugin.__name__}: register_plugin needs at least one stanza path")
        schemas = dict(schemas or {})
        missing = [p for p in and_paths + or_paths if p not in schemas]
        if missing:
            raise TypeError(
                f"{plugin.__name__}: no schema declared for stanza path(s) {', '.join(missing)}; "
                "pass schemas={path: Stanza(...)}"
            )
        registration = PluginRegistration(
            plugin_class=plugin,
            plugin_id=plugin_id or plugin.__name__,
            configuration_and_paths=and_paths,
            configuration_or_paths=or_paths,
            schemas=schemas,
            package_name=package_name,
            experimental=experimental,
            extra=dict(kwargs),
        )
        previous = registration_of(plugin)
        if previous is not None and previous != registration:
            raise TypeError(f"{plugin.__name__} is already registered differently: {previous}")
        setattr(plugin, _REGISTRATION_ATTR, registration)
        return registration

    def __init__(self, configurations: dict[str, Any], require_packages_check: bool = True) -> None:
        self.configurations = configurations
        self.model_patcher = ModelPatcher()
        self.accelerator_patcher = AcceleratorPatcher()
        if require_packages_check:
            self.check_required_packages()

    @property
    def plugin_id(self) -> str:
        registration = registration_of(type(self))
        return registration.plugin_id if registration else type(self).__name__

    def check_required_packages(self) -> None:
        """Fail with a message naming what to install when a required package is missing."""
        for package in self.require_packages:
            if importlib.util.find_spec(package) is None:
                hint = self.install_hints.get(package, package)
                raise AccelerationPluginConfigError(
                    f"plugin '{self.plugin_id}' needs the package '{package}', which is not "
                    f"installed; install it with: pip install {hint}"
                )

    def stanza(self, path: str) -> dict[str, Any] | None:
        """The validated body of the stanza at dotted `path` (None when absent)."""
        node: Any = self.configurations
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node

    def _check_config_and_maybe_check_values(
        self, key: str, values: Sequence[Any] | None = None, default: Any = None
    ) -> Any:
        """fms-acceleration compatible lookup of a dotted key, optionally checked against values."""
        parent, _, leaf = key.rpartition(".")
        body = self.stanza(parent) if parent else self.configurations
        value = body.get(leaf, default) if isinstance(body, Mapping) else default
        if value is None and default is None:
            raise AccelerationPluginConfigError(f"plugins.{key}: required key is missing.")
        if values is not None and value not in values:
            allowed = ", ".join(map(str, values))
            raise AccelerationPluginConfigError(
                f"plugins.{key}: {value!r} is not an allowed value; allowed: {allowed}."
            )
        return value

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

    def model_loader(self, model_name: str, **kwargs: Any) -> Any:
        """Load the model; only called on a plugin that takes the model_loader slot."""
        raise AccelerationFrameworkError(
            f"plugin '{self.plugin_id}' declares requires_custom_loading but does not define "
            "model_loader()"
        )

    def augmentation(
        self, model: Any, train_args: Any, modifiable_args: tuple[Any, ...]
    ) -> tuple[Any, tuple[Any, ...]]:
        """Modify the model (and arguments such as a peft config) before the Trainer sees it."""
        return model, modifiable_args

    def get_callbacks_and_ready_for_train(self, model: Any = None, accelerator: Any = None) -> list:
        """Trainer callbacks to add; last chance to register accelerator patches."""
        return []
