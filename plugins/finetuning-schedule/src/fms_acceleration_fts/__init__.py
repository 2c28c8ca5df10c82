"""Fine-Tuning Scheduler for transformers.Trainer: phased thawing of a model during training."""

from .fts_config import FTSConfig, FTSOptions
from .fts_state import FTSState
from .param_groups import FTSTransitionError
from .schedule import (
    ClassInit,
    FTSScheduleError,
    LrSchedulerReinit,
    OptimizerReinit,
    ParsedSchedule,
    Phase,
    PhaseSpec,
    default_schedule,
    load_schedule_yaml,
    parse_schedule,
    read_schedule,
    resolve_schedule,
    validate_schedule,
    write_schedule,
)

__all__ = [
    "ClassInit",
    "FTSConfig",
    "FTSOptions",
    "FTSScheduleError",
    "FTSState",
    "FTSTransitionError",
    "FinetuningScheduleCallback",
    "LrSchedulerReinit",
    "OptimizerReinit",
    "ParsedSchedule",
    "Phase",
    "PhaseSpec",
    "decay_parameter_names",
    "default_schedule",
    "load_schedule_yaml",
    "parse_schedule",
    "read_schedule",
    "resolve_schedule",
    "validate_schedule",
    "write_schedule",
]

_LAZY = {"FinetuningScheduleCallback", "decay_parameter_names", "load_checkpoint_weights"}


def __getattr__(name: str):
    # the callback imports transformers' Trainer stack: only when asked for
    if name in _LAZY:
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


try:  # the plugin registers itself when the framework is installed
    from .framework_plugin_fts import FinetuningSchedulePlugin  # noqa: F401

    __all__.append("FinetuningSchedulePlugin")
except ImportError as _err:  # pragma: no cover - framework not installed: pure modules still work
    if "fms_acceleration" not in str(_err):
        raise
