"""Settings of the training.finetuning_schedule stanza that drive phase transitions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FTSConfig:
    """Settings of the training.finetuning_schedule stanza that drive transitions."""

    max_depth: int = -1
    base_max_lr: float = 1e-5
    epoch_transitions_only: bool = False
    restore_best: bool = False
    monitor: str = "eval_loss"
    patience: int = 3
    min_delta: float = 0.0
    mode: str = "min"
    weight_decay: float = 0.0  # TrainingArguments.weight_decay, for the decay groups of new phases
