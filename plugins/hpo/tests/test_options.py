"""The training.hpo stanza: bad search spaces get one clear error each, with optuna's rules."""

from __future__ import annotations

import pytest
import yaml
from optuna.distributions import FloatDistribution, IntDistribution

from fms_acceleration import AccelerationPluginConfigError, validate_model
from fms_acceleration.yaml_loading import load_yaml
from fms_acceleration_hpo import HPOOptions

PATH = "plugins.training.hpo"


def _validate(search_space: list | None = None, **stanza) -> HPOOptions:
    if search_space is None:
        search_space = [{"name": "lr", "type": "float", "low": 0.1, "high": 1.0}]
    body = {"search_space": search_space, **stanza}
    return validate_model(HPOOptions, body, PATH)


def _error(*args, **kwargs) -> str:
    with pytest.raises(AccelerationPluginConfigError) as err:
        _validate(*args, **kwargs)
    return str(err.value)


def _entry(**kw) -> dict:
    return {"name": "x", "type": "float", "low": 0.1, "high": 1.0, **kw}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (_entry(low=1.0, high=0.1), "search_space[0].high: 0.1 must be >= low (1.0)."),
        (_entry(low=0.0, log=True), "search_space[0].log: true needs low > 0 (low is 0.0)."),
        (_entry(log=True, step=0.1),
         "search_space[0].log: true cannot be combined with step (0.1); remove one of them."),
        (_entry(step=0.0), "search_space[0].step: 0.0 must be greater than 0."),
        (_entry(type="int", low=1.5, high=8), "search_space[0].low: 1.5 must be a whole number "
                                               "for type int."),
        (_entry(type="int", low=0, high=8, log=True),
         "search_space[0].log: true needs low >= 1 (low is 0.0)."),
        (_entry(type="int", low=1, high=8, log=True, step=2),
         "search_space[0].log: true cannot be combined with step (2.0); remove one of them."),
        ({"name": "x", "type": "float", "low": 0.1}, "search_space[0].high: null required for "
                                                      "type float."),
        ({"name": "x", "type": "categorical", "choices": []},
         "search_space[0].choices: [] needs at least one value for type categorical."),
        ({"name": "x", "type": "categorical"},
         "search_space[0].choices: null needs at least one value for type categorical."),
        ({"name": "x", "type": "categorical", "choices": [1, [2, 3]]},
         "search_space[0].choices: [1, [2, 3]] item 1 ([2, 3]) is not a string, number, boolean "
         "or null."),
        ({"name": "x", "type": "categorical", "choices": [1], "low": 0.0},
         "search_space[0].low: 0.0 is not used by type categorical (list the values in "
         "choices)."),
        (_entry(choices=[1, 2]), "search_space[0].choices: [1, 2] is only for type categorical "
                                 "(type float uses low/high)."),
        (_entry(type="flaot"), "search_space[0].type: 'flaot' is not an allowed value (did you "
                               "mean 'float'?); allowed: 'float', 'int', 'categorical'."),
        (_entry(hihg=2.0), "search_space[0].hihg: unknown key 'hihg' (did you mean 'high'?); "
                           "allowed keys: choices, high, log, low, name, step, target, type."),
        (_entry(name="learning rate"), "search_space[0].name: 'learning rate' must start with a "
                                       "letter or _ and hold only letters, digits, _ . -."),
    ],
)  # fmt: skip
def test_bad_entry_names_the_key(entry, message):
    assert _error([entry]) == f"{PATH}.{message}"


def test_yaml_number_read_as_string_gets_a_hint():
    text = "search_space:\n  - {name: lr, type: float, low: 1e-5, high: 1.0e-2, log: true}\n"
    body = load_yaml(text, "hpo.yaml", AccelerationPluginConfigError)
    with pytest.raises(AccelerationPluginConfigError) as err:
        validate_model(HPOOptions, body, PATH)
    assert str(err.value) == (
        f"{PATH}.search_space[0].low: expected a number, got str '1e-5'; YAML read 1e-5 as a "
        "string (write 1.0e-5)."
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("lora_rank", "'lora_rank' is not a train option a search may set (did you mean "
                      "'lora_r'?); tunable: "),
        ("output_dir", "'output_dir' is not a train option a search may set; tunable: "),
        ("training.finetuning_schedul.base_max_lr",
         "'training.finetuning_schedul.base_max_lr' does not name a key of a plugin stanza (did "
         "you mean 'training.finetuning_schedule'?); stanzas: "),
        ("training.hpo.metric", "'training.hpo.metric' does not name a key of a plugin stanza"),
    ],
)  # fmt: skip
def test_bad_target_is_named_with_a_suggestion(target, message):
    error = _error([_entry(target=target)])
    assert error.startswith(f"{PATH}.search_space[0].target: {message}")


def test_names_and_targets_are_unique():
    assert _error([_entry(name="a"), _entry(name="a")]) == (
        f"{PATH}: search_space[1].name 'a' is also the name of search_space[0]; names must be "
        "unique."
    )
    assert _error([_entry(name="a", target="lora_r"), _entry(name="b", target="lora_r")]) == (
        f"{PATH}: search_space[1] sets 'lora_r', which 'a' already sets."
    )


def test_sampler_and_pruner_options_belong_to_their_type():
    assert _error(sampler={"type": "random", "n_startup_trials": 3}) == (
        f"{PATH}.sampler.n_startup_trials: 3 is not an option of the random sampler."
    )
    assert _error(pruner={"type": "median", "percentile": 25.0}) == (
        f"{PATH}.pruner.percentile: 25.0 is not an option of the median pruner."
    )
    assert _error(pruner={"type": "percentile"}) == (
        f"{PATH}.pruner: type percentile needs the option percentile (0-100)."
    )
    assert _error(pruner={"type": "hyperband", "reduction_factor": 1}) == (
        f"{PATH}.pruner.reduction_factor: 1 must be greater than or equal to 2."
    )
    assert _error(search_space=[]) == (f"{PATH}.search_space: [] has 0 entries; at least 1 needed.")


def test_the_sample_configuration_is_valid():
    from pathlib import Path

    sample = Path(__file__).parent.parent / "configs" / "hpo.yaml"
    body = yaml.safe_load(sample.read_text())["plugins"]["training"]["hpo"]
    options = _validate(**body)
    assert [e.name for e in options.search_space] == ["learning_rate", "lora_r"]
    assert options.save_steps == 2 and options.pruner.type == "median"


# (low, high, log, step) combinations: our validation agrees with optuna's distributions
_CASES = [
    (0.1, 1.0, False, None), (1.0, 0.1, False, None), (0.0, 1.0, True, None),
    (-1.0, 1.0, True, None), (1e-5, 1.0, True, None), (1e-3, 1.0, True, 0.1),
    (0.0, 1.0, False, 0.0), (0.0, 1.0, False, 0.25), (0.5, 0.5, False, None),
]  # fmt: skip
_INT_CASES = [
    (1, 8, False, 1), (8, 1, False, 1), (0, 8, True, 1), (1, 8, True, 1), (1, 8, True, 2),
    (1, 8, False, 0), (1, 9, False, 2), (3, 3, True, None),
]  # fmt: skip


def _accepted_by_optuna(distribution, *args) -> bool:
    try:
        distribution(*args)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("low", "high", "log", "step"), _CASES)
def test_float_rules_match_optuna(low, high, log, step):
    ours = _entry(low=low, high=high, log=log, step=step)
    try:
        _validate([ours])
        accepted = True
    except AccelerationPluginConfigError:
        accepted = False
    assert accepted == _accepted_by_optuna(FloatDistribution, low, high, log, step)


@pytest.mark.parametrize(("low", "high", "log", "step"), _INT_CASES)
def test_int_rules_match_optuna(low, high, log, step):
    ours = _entry(type="int", low=low, high=high, log=log, step=step)
    try:
        _validate([ours])
        accepted = True
    except AccelerationPluginConfigError:
        accepted = False
    assert accepted == _accepted_by_optuna(
        IntDistribution, low, high, log, 1 if step is None else step
    )
