"""Test helpers with the reference fms-acceleration's names and behaviour.

Plugin authors' tests (and fms-hf-tuning's) call these. Where the reference swapped class-level
lists in and out, these open a scope instead: registrations made inside
`build_framework_and_maybe_instantiate` are visible only there, and the patchers of
`instantiate_model_patcher` / `instantiate_accel_patcher` receive the class-level calls made
inside them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from ..accelerator_patcher import AcceleratorPatcher
from ..constants import KEY_PLUGINS
from ..errors import PluginRegistrationError
from ..framework import AccelerationFramework
from ..framework_plugin import AccelerationPlugin, isolated_registrations
from ..model_patcher import ModelPatcher
from ..yaml_loading import read_yaml_file

__all__ = [
    "build_framework_and_instantiate",
    "build_framework_and_maybe_instantiate",
    "configure_framework_from_json",
    "create_noop_model_with_archs",
    "create_plugin_cls",
    "dummy_augmentation",
    "dummy_custom_loader",
    "instantiate_accel_patcher",
    "instantiate_framework",
    "instantiate_model_patcher",
    "read_configuration",
    "update_configuration_contents",
]


def update_configuration_contents(
    configuration_contents: dict, augment_at_path: str, augmented_contents: Any
) -> dict:
    """Set the value at dotted `augment_at_path`; where that value is a mapping, rename its key
    to `augmented_contents` instead (the reference's semantics). Changes the dict in place."""
    *parents, key = augment_at_path.split(".")
    node = configuration_contents
    for part in parents:
        node = node[part]
    if isinstance(node[key], dict):
        node[augmented_contents] = node.pop(key)
    else:
        node[key] = augmented_contents
    return configuration_contents


def read_configuration(path: str) -> dict:
    """A YAML configuration file as a dict."""
    return read_yaml_file(path, "configuration")


class _ReferenceViewFramework(AccelerationFramework):
    """A framework as these helpers' callers knew it: in the reference, `active_plugins` and
    `plugins_require_custom_loading` were class-level lists that each block emptied and refilled,
    so a framework kept from an earlier block reports the plugins of the newest open block (the
    reference's own tests read it that way). Only frameworks built by these helpers; a framework
    built directly keeps its state on its instance."""

    def _shown(self) -> _ReferenceViewFramework:
        return _OPEN_BLOCKS[-1] if _OPEN_BLOCKS else self

    @property  # a plain attribute upstream
    def active_plugins(self) -> list[tuple[str, AccelerationPlugin]]:
        return self._shown().__dict__["_active_plugins"]

    @active_plugins.setter
    def active_plugins(self, value: list[tuple[str, AccelerationPlugin]]) -> None:
        self.__dict__["_active_plugins"] = value

    @property  # a plain attribute upstream
    def plugins_require_custom_loading(self) -> list[str]:
        return self._shown().__dict__["_plugins_require_custom_loading"]

    @plugins_require_custom_loading.setter
    def plugins_require_custom_loading(self, value: list[str]) -> None:
        self.__dict__["_plugins_require_custom_loading"] = value

    @property
    def requires_augmentation(self) -> bool:
        shown = self._shown()
        return shown.requires_augmentation if shown is not self else super().requires_augmentation

    @property
    def requires_custom_loading(self) -> bool:
        shown = self._shown()
        return (
            shown.requires_custom_loading if shown is not self else super().requires_custom_loading
        )


# The frameworks of the open build_framework_and_maybe_instantiate blocks, innermost last.
_OPEN_BLOCKS: list[_ReferenceViewFramework] = []


def configure_framework_from_json(
    configuration_contents: Mapping[str, Any], require_packages_check: bool = True
) -> AccelerationFramework:
    """A framework from the contents of `plugins:` given as a dict."""
    return _ReferenceViewFramework(
        {KEY_PLUGINS: dict(configuration_contents)}, require_packages_check
    )


@contextmanager
def build_framework_and_maybe_instantiate(
    plugins_to_be_registered: Iterable[tuple],
    configuration_contents: Mapping[str, Any] | None = None,
    instantiate: bool = True,
    reset_registrations: bool = True,
    require_packages_check: bool = True,
) -> Iterator[AccelerationFramework | None]:
    """Register `(and_paths, cls)` or `(and_paths, or_paths, cls)` and build a framework.

    With reset_registrations (the default) only those plugins exist inside the block; without
    it they join this process's registrations, beside the installed plugins.
    """
    scope = isolated_registrations() if reset_registrations else nullcontext()
    with scope:
        not_plugins = []
        for entry in plugins_to_be_registered:
            if len(entry) == 2:
                (and_paths, plugin), or_paths = entry, None
            else:
                and_paths, or_paths, plugin = entry
            if not (isinstance(plugin, type) and issubclass(plugin, AccelerationPlugin)):
                # the reference recorded anything here (a client's test registers a config
                # object to reach its own argument check); a framework over it is refused below
                not_plugins.append(f"{plugin!r} at {list(and_paths) or list(or_paths or [])}")
                continue
            AccelerationPlugin.register_plugin(
                plugin, configuration_and_paths=and_paths, configuration_or_paths=or_paths
            )
        if not instantiate:
            yield None
            return
        if not_plugins:
            raise PluginRegistrationError(
                "build_framework_and_maybe_instantiate: not AccelerationPlugin subclasses, so no "
                f"framework can be built over them: {'; '.join(not_plugins)}"
            )
        framework = _ReferenceViewFramework(
            {KEY_PLUGINS: dict(configuration_contents or {})}, require_packages_check
        )
        _OPEN_BLOCKS.append(framework)
        try:
            yield framework
        finally:
            _OPEN_BLOCKS.remove(framework)


build_framework_and_instantiate = build_framework_and_maybe_instantiate


def instantiate_framework(
    configuration_contents: Mapping[str, Any], require_packages_check: bool = True
):
    """A context manager yielding a framework over the plugins already registered."""
    return build_framework_and_instantiate(
        [],
        configuration_contents,
        reset_registrations=False,
        require_packages_check=require_packages_check,
    )


def create_noop_model_with_archs(class_name: str = "ModelNoop", archs: list[str] | None = None):
    """A torch.nn.Module subclass whose `config.architectures` is `archs`."""
    config = type("Config", (object,), {"architectures": list(archs or [])})
    return type(class_name, (torch.nn.Module,), {"config": config})


def create_plugin_cls(
    class_name: str = "PluginNoop",
    restricted_models: set | None = None,
    require_pkgs: set | None = None,
    requires_custom_loading: bool = False,
    requires_augmentation: bool = False,
    augmentation: Callable | None = None,
    model_loader: Callable | None = None,
) -> type[AccelerationPlugin]:
    """An AccelerationPlugin subclass with the given declarations and hooks."""
    attributes: dict[str, Any] = {
        "restricted_model_archs": set(restricted_models or ()),
        "require_packages": set(require_pkgs or ()),
        "requires_custom_loading": requires_custom_loading,
        "requires_augmentation": requires_augmentation,
    }
    if augmentation is not None:
        attributes["augmentation"] = augmentation
    if model_loader is not None:
        attributes["model_loader"] = model_loader
    return type(class_name, (AccelerationPlugin,), attributes)


def dummy_augmentation(self, model, train_args, modifiable_args):
    """An augmentation that changes nothing."""
    return model, modifiable_args


def dummy_custom_loader(self, model_name, **kwargs):
    """A model loader returning a no-op model class."""
    return create_noop_model_with_archs(archs=["DummyModel"])


@contextmanager
def instantiate_model_patcher() -> Iterator[ModelPatcher]:
    """A fresh ModelPatcher that receives `ModelPatcher.register / patch / ...` in the block."""
    with ModelPatcher().activated() as patcher:
        yield patcher


@contextmanager
def instantiate_accel_patcher() -> Iterator[AcceleratorPatcher]:
    """A fresh AcceleratorPatcher that receives `AcceleratorPatcher.replace / patch / ...`."""
    with AcceleratorPatcher().activated() as patcher:
        yield patcher
