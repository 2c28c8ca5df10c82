"""The main job a user runs first: LoRA fine-tuning through the framework, with a summary.

The names below are the public API; other packages (e.g. fms-acceleration-hpo, whose search
runs this job per trial) import only these, never the modules behind them.
"""

from .errors import MissingDependencyError, TrainJobError, user_errors
from .eval_and_checkpoints import last_complete_checkpoint
from .flags import Flag, FlagModel
from .runner import TrainJobConfig, run_train_job
from .summary import TrainSummary

__all__ = [
    "Flag",
    "FlagModel",
    "MissingDependencyError",
    "TrainJobConfig",
    "TrainJobError",
    "TrainSummary",
    "last_complete_checkpoint",
    "run_train_job",
    "user_errors",
]
