"""Sampler checkpoints: a restored sampler continues exactly where the interrupted study was."""

from __future__ import annotations

import pickle

import optuna
import pytest

from fms_acceleration_hpo import HPOOptions, StudyStorage, checkpoint_sampler, restore_sampler
from fms_acceleration_hpo.sampler_state import (
    SamplerCheckpointWarning,
    build_sampler,
    latest_checkpoint,
    sampler_config_hash,
)
from fms_acceleration_hpo.suggestions import suggest_search_space
from fms_acceleration_hpo.worker import open_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

OPTIONS = HPOOptions.model_validate(
    {
        "sampler": {"type": "tpe", "seed": 3, "n_startup_trials": 2},
        "pruner": {"type": "nop"},
        "search_space": [
            {"name": "x", "type": "float", "low": -5.0, "high": 5.0},
            {"name": "lr", "type": "float", "low": 1e-5, "high": 1e-1, "log": True},
            {"name": "r", "type": "categorical", "choices": [4, 8, 16]},
        ],
    }
)


def _objective(root=None):
    def objective(trial: optuna.Trial) -> float:
        after = None
        if root is not None:
            config_hash = sampler_config_hash(OPTIONS.sampler)

            def after():
                checkpoint_sampler(trial, root, config_hash)

        p = suggest_search_space(trial, OPTIONS.search_space, after)
        return (p["x"] - 1) ** 2 + abs(p["lr"] - 1e-3) + p["r"] / 100

    return objective


def _uninterrupted_next(trials: int) -> dict:
    study = optuna.create_study(sampler=build_sampler(OPTIONS.sampler))
    study.optimize(_objective(), n_trials=trials)
    return suggest_search_space(study.ask(), OPTIONS.search_space)


def test_restored_sampler_gives_the_uninterrupted_next_suggestion(tmp_path):
    storage = StudyStorage.parse(f"sqlite:///{tmp_path / 'study.db'}")
    first = open_study(storage, "s", OPTIONS, tmp_path)
    assert first.notes[-1] == "sampler: new sampler (seed 3)"
    first.study.optimize(_objective(first.sampler_root), n_trials=5)
    assert latest_checkpoint(first.sampler_root).name == "sampler_trial-4.pkl"

    # a new process: the study is loaded and its sampler restored from the checkpoint
    again = open_study(storage, "s", OPTIONS, tmp_path)
    assert again.notes[-1] == "sampler: restored from sampler_trial-4.pkl"
    restored = suggest_search_space(again.study.ask(), OPTIONS.search_space)
    expected = _uninterrupted_next(5)
    assert restored == expected

    # without the checkpoint the same seed proposes something else (the test can fail)
    fresh = optuna.load_study(
        study_name="s", storage=storage.url, sampler=build_sampler(OPTIONS.sampler)
    )
    assert suggest_search_space(fresh.ask(), OPTIONS.search_space) != expected


def test_a_checkpoint_of_another_version_or_configuration_is_not_restored(tmp_path):
    study = optuna.create_study(sampler=build_sampler(OPTIONS.sampler))
    trial = study.ask()
    path = checkpoint_sampler(trial, tmp_path, sampler_config_hash(OPTIONS.sampler))
    payload = pickle.loads(path.read_bytes())
    assert payload["optuna_version"] == optuna.__version__ and payload["trial"] == 0

    other = OPTIONS.sampler.model_copy(update={"n_startup_trials": 5})
    with pytest.warns(SamplerCheckpointWarning) as caught:
        sampler, how = restore_sampler(tmp_path, other, finished_trials=4)
    assert str(caught[0].message) == (
        f"sampler checkpoint {path} was written for another sampler configuration; using a new "
        "sampler (seed 3 + 4 finished trials)"
    )
    assert how == "new sampler (seed 3 + 4 finished trials)"
    # reseeded with seed + finished: the same as a sampler built with seed 7
    probe = optuna.create_study(sampler=sampler).ask().suggest_float("v", 0, 1)
    seven = other.model_copy(update={"seed": 7})
    assert probe == optuna.create_study(sampler=build_sampler(seven)).ask().suggest_float("v", 0, 1)

    payload["optuna_version"] = "3.0.0"
    path.write_bytes(pickle.dumps(payload))
    with pytest.warns(SamplerCheckpointWarning, match=r"was written by optuna 3\.0\.0, this is"):
        restore_sampler(tmp_path, OPTIONS.sampler, finished_trials=1)

    path.write_bytes(b"not a pickle")
    with pytest.warns(SamplerCheckpointWarning, match="cannot be read"):
        _, how = restore_sampler(tmp_path, OPTIONS.sampler, finished_trials=1)
    assert how == "new sampler (seed 3 + 1 finished trials)"
