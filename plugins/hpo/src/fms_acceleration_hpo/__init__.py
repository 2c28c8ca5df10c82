"""Hyper-parameter search with optuna for fms-acceleration: the `training.hpo` plugin
(OptunaPlugin) and `fms-acceleration search`."""

from .errors import SearchError
from .framework_plugin_hpo import OptunaPlugin, trial_name
from .options import STANZA, HPOOptions, PrunerOptions, SamplerOptions, SearchParameter
from .resume import resume_study
from .sampler_state import checkpoint_sampler, restore_sampler
from .storage import StudyStorage
from .suggestions import suggest

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
