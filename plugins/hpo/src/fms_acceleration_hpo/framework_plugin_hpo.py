"""The `training.hpo` plugin (OptunaPlugin): reports evaluations to an optuna trial and stops
training when its pruner says so, on every rank at the same step.

Helios' OptunaPlugin, adapted to transformers.Trainer:
- `suggest(type, name, **kwargs)` wraps `trial.suggest_<type>`;
- `report_metrics(metrics, step)` runs at each evaluation (step = `state.global_step`): the
  metric goes to the trial and, if the pruner says so, training stops (through the framework's
  `should_training_stop`, reduced across ranks);
- in a single process the plugin's callback raises `optuna.TrialPruned` at the end of training,
  after the other callbacks' end-of-training hooks (its `order` puts it last); under
  torch.distributed nothing is raised inside the Trainer and every rank calls `check_pruned()`
  after `trainer.train()`. `train_exceptions` names the exception a caller lets through to
  optuna (which records the trial as PRUNED);
- under torchrun the trial lives on rank 0 and the other ranks follow it through
  optuna-integration's TorchDistributedTrial (`attach_trial` wraps it), so every suggestion and
  every prune decision is the same on all ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fms_acceleration import AccelerationPlugin

from .errors import SearchError
from .options import PATH, STANZA, HPOOptions
from .suggestions import suggest, suggest_search_space

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)
PRUNED_AT_ATTR = "pruned_at_step"


class _PrunedExceptions:
    """`(optuna.TrialPruned,)`, read on first use: optuna loads only when a search runs, not
    whenever plugin discovery imports this package."""

    def __get__(self, instance: Any, owner: type) -> tuple[type[BaseException], ...]:
        import optuna

        return (optuna.TrialPruned,)


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of an initialized torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def trial_name(prefix: str, number: int) -> str:
    """The name of a trial's model and output folder: `<prefix>_trial-<n>`."""
    return f"{prefix}_trial-{number}"


class OptunaPlugin(AccelerationPlugin):
    """Reports evaluations to an optuna trial; stops training when the trial is pruned."""

    order = 1000  # last, so that its end-of-training hook runs after the others'
    train_exceptions = _PrunedExceptions()

    def __init__(self, configurations: dict) -> None:
        super().__init__(configurations)
        self.options = HPOOptions.model_validate(self.stanza(STANZA))
        self.trial: Any = None
        self.last_value: float | None = None
        self.last_step: int | None = None
        self.pruned_at: int | None = None
        # the search prints one line per trial: it turns the Trainer's progress bar off
        self.quiet_progress = False

    # --- the trial -------------------------------------------------------------------------

    def attach_trial(self, trial: optuna.trial.BaseTrial | None) -> Any:
        """Use `trial` (rank 0; None on the other ranks under torch.distributed)."""
        _, world = distributed_world()
        if world > 1:
            from optuna_integration import TorchDistributedTrial

            if not isinstance(trial, TorchDistributedTrial):
                trial = TorchDistributedTrial(trial)
        elif trial is None:
            raise SearchError(f"{PATH}: attach_trial(None) outside torch.distributed")
        self.trial = trial
        self.last_value = self.last_step = self.pruned_at = None
        return trial

    def _require_trial(self, what: str) -> Any:
        if self.trial is None:
            raise SearchError(
                f"{PATH}: {what} needs a trial: plugin.attach_trial(trial) (fms-acceleration "
                "search does this for each trial)"
            )
        return self.trial

    def suggest(self, type_name: str, name: str, **kwargs: Any) -> Any:
        """`trial.suggest_<type_name>(name, **kwargs)` (float, int or categorical)."""
        return suggest(self._require_trial("suggest"), type_name, name, **kwargs)

    def suggest_search_space(self) -> dict[str, Any]:
        """A value for every entry of the stanza's search space, by name."""
        return suggest_search_space(self._require_trial("suggest"), self.options.search_space)

    # --- reporting and pruning ---------------------------------------------------------------

    def metric_value(self, metrics: Mapping[str, Any]) -> float:
        """The configured metric from Trainer.evaluate's metrics (`eval_` prefix optional)."""
        name = self.options.metric
        for key in (name, f"eval_{name}"):
            if key in metrics:
                return float(metrics[key])
        raise SearchError(
            f"{PATH}.metric: '{name}' is not among the evaluation metrics "
            f"({', '.join(sorted(metrics))})"
        )

    def report_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Report the metric at `step` and ask the pruner (every rank calls this together)."""
        value = self.metric_value(metrics)
        self.last_value, self.last_step = value, step
        if self.trial is None:
            return
        self.trial.report(value, step)
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = step
            self.trial.set_user_attr(PRUNED_AT_ATTR, step)

    def should_training_stop(self, state: Any) -> bool:
        """Stop once the trial is pruned."""
        return self.pruned_at is not None

    def check_pruned(self) -> None:
        """Raise optuna.TrialPruned if the trial was pruned (call it after trainer.train())."""
        if self.pruned_at is not None:
            import optuna

            raise optuna.TrialPruned(
                f"pruned at step {self.pruned_at} ({self.options.metric} {self.last_value:.6g})"
            )

    # --- framework hooks ---------------------------------------------------------------------

    def get_callbacks_and_ready_for_train(
        self, model: Any = None, accelerator: Any = None, trainer: Any = None
    ) -> list:
        """The callback that reports evaluations (and forces one at the last step)."""
        if self.trial is None:
            logger.warning(
                "%s: no optuna trial attached: evaluations are not reported and nothing is "
                "pruned (run `fms-acceleration search`)",
                PATH,
            )
        from .trial_callback import TrialCallback

        if self.quiet_progress and trainer is not None:
            from transformers import ProgressCallback

            trainer.remove_callback(ProgressCallback)  # a subclass too (the train job's)
        return [TrialCallback(self)]
