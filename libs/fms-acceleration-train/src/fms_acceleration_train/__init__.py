"""The main job a user runs first: LoRA fine-tuning through the framework, with a summary."""

from .errors import MissingDependencyError, TrainJobError
from .runner import TrainJobConfig, run_train_job
from .summary import TrainSummary

__all__ = [
    "MissingDependencyError",
    "TrainJobConfig",
    "TrainJobError",
    "TrainSummary",
    "run_train_job",
]
