"""The training.finetuning_schedule stanza (its one schema, with the defaults) and the settings
the callback reads, taken from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from fms_acceleration import StanzaModel, choice


def _positive(value: Any) -> Any:
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _depth(value: int) -> int:
    if value < -1:
        raise ValueError("must be -1 (all phases) or a phase index >= 0")
    return value


class EarlyStoppingOptions(StanzaModel):
    """Per-phase early stopping on an evaluation metric."""

    monitor: str = "eval_loss"
    """metric name from Trainer.evaluate"""
    patience: Annotated[int, AfterValidator(_positive)] = 3
    """evaluations without improvement"""
    min_delta: float = 0.0
    """smallest change counted as improvement"""
    mode: choice("min", "max") = "min"
    """min: lower is better"""


class FTSOptions(StanzaModel):
    """Fine-Tuning Scheduler: thaw the model phase by phase."""

    ft_schedule: str | dict | None = None
    """schedule YAML file or inline mapping; absent: generate the default and write it to
    output_dir/<ModelClass>_ft_schedule.yaml"""
    max_depth: Annotated[int, AfterValidator(_depth)] = -1
    """last phase to reach; -1: all"""
    base_max_lr: Annotated[float, AfterValidator(_positive)] = 1e-5
    """lr of phases without lr"""
    epoch_transitions_only: bool = False
    """transition on max_transition_epoch only (no early stopping)"""
    restore_best: bool = False
    """load the best checkpoint at each transition"""
    early_stopping: EarlyStoppingOptions = EarlyStoppingOptions()
    """per-phase early stopping on an evaluation metric"""
    custom_strategy_adapters: dict[str, str] = Field(default_factory=dict)
    """strategy name -> adapter ('module:Class' or entry-point name)"""
    strategy_adapter_cfg: dict[str, Any] = Field(default_factory=dict)
    """keyword options of the adapter"""


@dataclass(frozen=True)
class FTSConfig:
    """What drives transitions: the validated stanza, flattened, plus the Trainer's weight decay."""

    max_depth: int
    base_max_lr: float
    epoch_transitions_only: bool
    restore_best: bool
    monitor: str
    patience: int
    min_delta: float
    mode: str
    weight_decay: float  # TrainingArguments.weight_decay, for the decay groups of new phases

    @classmethod
    def from_options(cls, options: FTSOptions, weight_decay: float = 0.0) -> FTSConfig:
        stopping = options.early_stopping
        return cls(
            max_depth=options.max_depth,
            base_max_lr=options.base_max_lr,
            epoch_transitions_only=options.epoch_transitions_only,
            restore_best=options.restore_best,
            monitor=stopping.monitor,
            patience=stopping.patience,
            min_delta=stopping.min_delta,
            mode=stopping.mode,
            weight_decay=weight_decay,
        )
