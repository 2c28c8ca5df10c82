"""The Trainer callback of the hpo plugin: reports each evaluation to the trial, evaluates at the
last step (the trial's value), and raises TrialPruned at the end of a pruned single-process run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from .framework_plugin_hpo import OptunaPlugin


class TrialCallback(TrainerCallback):
    """Connects one Trainer run to the plugin's optuna trial."""

    def __init__(self, plugin: OptunaPlugin) -> None:
        self.plugin = plugin

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the trial's value is the metric at the final step, whatever eval_steps is
        if state.global_step >= state.max_steps and args.eval_strategy != "no":
            control.should_evaluate = True

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        metrics = kwargs.get("metrics") or {}
        self.plugin.report_metrics(metrics, state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from .framework_plugin_hpo import distributed_world

        if distributed_world()[1] == 1:
            self.plugin.check_pruned()
