"""The mixer and its parts (no framework objects here: usable in any training loop)."""

from .auto_categorizer import AutoCategorizeConfig, DatasetAutoCategorizer
from .dataset import OnlineMixingDataset
from .reward import Reward, RewardState, compute_reward

__all__ = [
    "AutoCategorizeConfig",
    "DatasetAutoCategorizer",
    "OnlineMixingDataset",
    "Reward",
    "RewardState",
    "compute_reward",
]
