"""The OptunaPlugin API (Helios names on the Trainer) and where suggested values go."""

from __future__ import annotations

import optuna
import pytest

from fms_acceleration.testing import build_framework
from fms_acceleration_hpo import HPOOptions, OptunaPlugin, SearchError, trial_name
from fms_acceleration_hpo.suggestions import apply_values

STANZA = {
    "metric": "loss",
    "pruner": {"type": "threshold", "upper": 4.0},
    "search_space": [
        {"name": "lr", "type": "float", "low": 1e-4, "high": 1e-2, "log": True,
         "target": "learning_rate"},
        {"name": "rank", "type": "categorical", "choices": [4, 8], "target": "lora_r"},
        {"name": "fts_lr", "type": "float", "low": 1e-6, "high": 1e-4,
         "target": "training.finetuning_schedule.base_max_lr"},
    ],
}  # fmt: skip


@pytest.fixture
def plugin() -> OptunaPlugin:
    framework = build_framework({"plugins": {"training": {"hpo": STANZA}}}, [OptunaPlugin])
    return framework.plugins["hpo"]


def _trial(pruner=None) -> optuna.Trial:
    study = optuna.create_study(
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=pruner or optuna.pruners.ThresholdPruner(upper=4.0),
    )
    return study.ask()


def test_suggest_wraps_the_trial_suggestions(plugin):
    with pytest.raises(SearchError) as err:
        plugin.suggest("float", "x", low=0.0, high=1.0)
    assert str(err.value) == (
        "plugins.training.hpo: suggest needs a trial: plugin.attach_trial(trial) "
        "(fms-acceleration search does this for each trial)"
    )
    trial = plugin.attach_trial(_trial())
    assert 0.0 <= plugin.suggest("float", "x", low=0.0, high=1.0) <= 1.0
    assert plugin.suggest("int", "n", low=2, high=6, step=2) in (2, 4, 6)
    assert plugin.suggest("categorical", "c", choices=["a", "b"]) in ("a", "b")
    with pytest.raises(SearchError) as err:
        plugin.suggest("flaot", "y", low=0.0, high=1.0)
    assert str(err.value) == (
        "suggest: 'flaot' is not a suggestion type (did you mean 'float'?); use one of "
        "categorical, float, int"
    )
    values = plugin.suggest_search_space()
    assert set(values) == {"lr", "rank", "fts_lr"} and values["rank"] in (4, 8)
    assert set(trial.params) == {"x", "n", "c", "lr", "rank", "fts_lr"}


def test_report_prune_and_check_pruned(plugin):
    trial = plugin.attach_trial(_trial())
    with pytest.raises(SearchError) as err:
        plugin.report_metrics({"eval_runtime": 0.1, "eval_accuracy": 0.5}, step=1)
    assert str(err.value) == (
        "plugins.training.hpo.metric: 'loss' is not among the evaluation metrics "
        "(eval_accuracy, eval_runtime)"
    )
    plugin.report_metrics({"eval_loss": 3.5}, step=2)  # "loss" finds eval_loss
    assert not plugin.should_training_stop(None)
    plugin.check_pruned()  # not pruned: nothing raised
    plugin.report_metrics({"eval_loss": 4.5}, step=4)
    assert plugin.should_training_stop(None) and plugin.pruned_at == 4
    assert trial.study.trials[0].intermediate_values == {2: 3.5, 4: 4.5}
    assert trial.study.trials[0].user_attrs == {"pruned_at_step": 4}
    with pytest.raises(optuna.TrialPruned, match=r"^pruned at step 4 \(loss 4\.5\)$"):
        plugin.check_pruned()


def test_the_framework_stops_training_through_the_plugin(plugin):
    framework = build_framework({"plugins": {"training": {"hpo": STANZA}}}, [OptunaPlugin])
    framework.plugins["hpo"].attach_trial(_trial())
    callbacks = framework.get_callbacks_and_ready_for_train()
    assert [type(c).__name__ for c in callbacks] == ["TrialCallback", "PluginHooksCallback"]
    assert OptunaPlugin.train_exceptions == (optuna.TrialPruned,)
    assert trial_name("study", 7) == "study_trial-7"


def test_values_go_to_train_options_and_other_stanzas():
    options = HPOOptions.model_validate(STANZA)
    config = {"plugins": {"training": {"hpo": STANZA, "finetuning_schedule": {"max_depth": 2}}}}
    train, patched = apply_values(
        {"lr": 0.002, "rank": 8, "fts_lr": 3e-5}, options.search_space, {"lora_r": 16}, config
    )
    assert train == {"lora_r": 8, "learning_rate": 0.002}
    assert patched["plugins"]["training"]["finetuning_schedule"] == {
        "max_depth": 2,
        "base_max_lr": 3e-5,
    }
    assert "base_max_lr" not in config["plugins"]["training"]["finetuning_schedule"]
