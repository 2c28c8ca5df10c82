"""The training.finetuning_schedule stanza (its one schema, with the defaults) and the settings
the callback reads, taken from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from fms_acceleration import StanzaModel, choice

from .schedule import LrSchedulerReinit, OptimizerReinit


def _depth(value: int) -> int:
    if value < -1:
        raise ValueError("must be -1 (all phases) or a phase index >= 0")
    return value


class EarlyStoppingOptions(StanzaModel):
    """Early stopping on an evaluation metric (FTSEarlyStopping): its best score is kept across
    phases; in a phase that is not the last, running out of patience moves to the next phase."""

    monitor: str = "eval_loss"
    """metric name from Trainer.evaluate"""
    patience: Annotated[int, Field(gt=0)] = 3
    """evaluations without improvement"""
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    """smallest change counted as improvement"""
    mode: choice("min", "max") = "min"
    """min: lower is better"""
    check_finite: bool = True
    """stop training when the monitored metric is NaN or infinite"""
    stopping_threshold: float | None = None
    """stop training once the metric is better than this"""
    divergence_threshold: float | None = None
    """stop training once the metric is worse than this"""
    strict: bool = True
    """a monitored metric missing from an evaluation is an error (false: a warning)"""


class FTSOptions(StanzaModel):
    """Fine-Tuning Scheduler: thaw the model phase by phase."""

    ft_schedule: str | dict | None = None
    """schedule YAML file or inline mapping; absent: generate the default and write it to
    log_dir/<ModelClass>_ft_schedule.yaml"""
    max_depth: Annotated[int, AfterValidator(_depth)] = -1
    """last phase to reach; -1: all"""
    base_max_lr: Annotated[float, Field(gt=0)] = 1e-5
    """lr of phases without lr"""
    epoch_transitions_only: bool = False
    """transition on max_transition_epoch only (no early stopping)"""
    restore_best: bool = False
    """load the best checkpoint (weights and optimizer state) at each transition"""
    early_stopping: EarlyStoppingOptions = EarlyStoppingOptions()
    """early stopping on an evaluation metric"""
    reinit_optim_cfg: OptimizerReinit | None = None
    """implicit mode: rebuild the optimizer with this config at every transition"""
    reinit_lr_cfg: LrSchedulerReinit | None = None
    """implicit mode: rebuild the LR scheduler with this config at every transition"""
    apply_lambdas_new_pgs: bool = False
    """new groups start at phase lr times the scheduler's current lambda"""
    no_decay: list[str] | None = None
    """names containing one of these get weight decay 0 in new groups; null: the Trainer's
    rule (biases and norm weights); []: one group per phase"""
    enforce_phase0_params: bool = True
    """rebuild a user optimizer that does not hold exactly phase 0"""
    frozen_bn_track_running_stats: bool = True
    """frozen BatchNorm layers keep updating their running statistics"""
    allow_untested: bool = False
    """try LR schedulers and distributed strategies FTS does not support"""
    allow_partial_resume: bool = False
    """resume from a checkpoint without optimizer or schedule state"""
    log_dir: str | None = None
    """folder of FTS files (schedule copies); default: TrainingArguments.output_dir"""
    custom_strategy_adapters: dict[str, str] = Field(default_factory=dict)
    """strategy name -> adapter ('module:Class' or entry-point name)"""
    strategy_adapter_cfg: dict[str, Any] = Field(default_factory=dict)
    """keyword options of the adapter"""


@dataclass(frozen=True)
class FTSConfig:
    """What drives transitions: the validated stanza, flattened."""

    max_depth: int
    base_max_lr: float
    epoch_transitions_only: bool
    restore_best: bool
    monitor: str
    patience: int
    min_delta: float
    mode: str
    check_finite: bool = True
    stopping_threshold: float | None = None
    divergence_threshold: float | None = None
    strict: bool = True
    reinit_optim_cfg: OptimizerReinit | None = None
    reinit_lr_cfg: LrSchedulerReinit | None = None
    apply_lambdas_new_pgs: bool = False
    no_decay: tuple[str, ...] | None = None
    enforce_phase0_params: bool = True
    frozen_bn_track_running_stats: bool = True
    allow_untested: bool = False
    allow_partial_resume: bool = False
    log_dir: str | None = None

    @classmethod
    def from_options(cls, options: FTSOptions) -> FTSConfig:
        """Flatten a validated stanza."""
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
            check_finite=stopping.check_finite,
            stopping_threshold=stopping.stopping_threshold,
            divergence_threshold=stopping.divergence_threshold,
            strict=stopping.strict,
            reinit_optim_cfg=options.reinit_optim_cfg,
            reinit_lr_cfg=options.reinit_lr_cfg,
            apply_lambdas_new_pgs=options.apply_lambdas_new_pgs,
            no_decay=None if options.no_decay is None else tuple(options.no_decay),
            enforce_phase0_params=options.enforce_phase0_params,
            frozen_bn_track_running_stats=options.frozen_bn_track_running_stats,
            allow_untested=options.allow_untested,
            allow_partial_resume=options.allow_partial_resume,
            log_dir=options.log_dir,
        )
