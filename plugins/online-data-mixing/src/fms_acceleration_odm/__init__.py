"""Online data mixing (plugin package fms-acceleration-odm): an EXP3 bandit learns, while
training, from which category (dataset) the next samples come."""

from .errors import AutoCategorizeInputError, ODMConfigError, UnsupportedDatasetError
from .framework_plugin_odm import ODM_PATH, ODMOptions, OnlineDataMixingAccelerationPlugin
from .odm import (
    AutoCategorizeConfig,
    DatasetAutoCategorizer,
    OnlineMixingDataset,
    Reward,
    RewardState,
    compute_reward,
)
from .plot import plot_sampling_weights

__all__ = [
    "ODM_PATH",
    "AutoCategorizeConfig",
    "AutoCategorizeInputError",
    "DatasetAutoCategorizer",
    "ODMConfigError",
    "ODMOptions",
    "OnlineDataMixingAccelerationPlugin",
    "OnlineDataMixingCallback",
    "OnlineMixingDataset",
    "Reward",
    "RewardState",
    "UnsupportedDatasetError",
    "compute_reward",
    "find_mixer",
    "plot_sampling_weights",
]


def __getattr__(name: str):
    # the callback subclasses transformers' TrainerCallback: imported when first asked for, so
    # that plugin discovery (which imports this package) does not load the Trainer
    if name in ("OnlineDataMixingCallback", "find_mixer"):
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
