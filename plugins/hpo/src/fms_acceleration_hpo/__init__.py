"""Hyper-parameter search with optuna for fms-acceleration: the `training.hpo` plugin
(OptunaPlugin) and `fms-acceleration search`."""

from importlib import import_module
from typing import Any

from .errors import SearchError
from .framework_plugin_hpo import OptunaPlugin, trial_name
from .options import STANZA, HPOOptions, PrunerOptions, SamplerOptions, SearchParameter
from .suggestions import suggest

# names whose modules import optuna: loaded on first use, so that plugin discovery (which
# imports every installed plugin) does not load optuna for a run that searches nothing
_LAZY = {
    "resume_study": ".resume",
    "checkpoint_sampler": ".sampler_state",
    "restore_sampler": ".sampler_state",
    "StudyStorage": ".storage",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "STANZA",
    "HPOOptions",
    "OptunaPlugin",
    "PrunerOptions",
    "SamplerOptions",
    "SearchError",
    "SearchParameter",
    "StudyStorage",
    "checkpoint_sampler",
    "restore_sampler",
    "resume_study",
    "suggest",
    "trial_name",
]


def _register() -> None:
    from fms_acceleration import AccelerationPlugin

    AccelerationPlugin.register_plugin(
        OptunaPlugin,
        configuration_and_paths=[STANZA],
        plugin_id="hpo",
        schemas={STANZA: HPOOptions},
        package_name="fms-acceleration-hpo",
    )


_register()
