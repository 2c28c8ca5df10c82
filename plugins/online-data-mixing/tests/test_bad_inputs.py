"""Bad input: each a clear error of our type naming the key and the value."""

from __future__ import annotations

import pytest
import torch

from fms_acceleration import AccelerationPluginConfigError
from fms_acceleration_odm import (
    AutoCategorizeInputError,
    ODMConfigError,
    OnlineMixingDataset,
    UnsupportedDatasetError,
)


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield {"text": "a"}


def rows(n):
    return [{"input_ids": [4, 5, 6], "labels": [4, 5, 6], "text": f"row {i}"} for i in range(n)]


BASE = dict(
    collators_dict=None, eval_dataset_dict={"a": rows(2), "b": rows(2)}, eval_collators_dict=None
)
DATASET_CASES = [
    (
        "unknown reward",
        dict(reward_type="perplexity"),
        ODMConfigError,
        "reward_type: 'perplexity' is not a reward type; allowed: entropy, ",
    ),
    ("gamma zero", dict(gamma=0.0), ODMConfigError, "gamma: 0.0 is out of range; 0 < gamma <= 1"),
    ("gamma above one", dict(gamma=1.5), ODMConfigError, "gamma: 1.5 is out of range"),
    (
        "gamma not a number",
        dict(gamma="0.1"),
        ODMConfigError,
        "gamma: '0.1' is not a finite number",
    ),
    ("eta negative", dict(eta=-0.1), ODMConfigError, "eta: -0.1 is out of range; eta > 0"),
    ("eta nan", dict(eta=float("nan")), ODMConfigError, "eta: nan is not a finite number"),
    (
        "sampling_interval zero",
        dict(sampling_interval=0),
        ODMConfigError,
        "sampling_interval: 0 must be an integer >= 1",
    ),
    (
        "exploration",
        dict(exploration="linear"),
        ODMConfigError,
        "exploration: 'linear' is not allowed; allowed: constant, decaying",
    ),
    (
        "empty category",
        dict(dataset_dict={"a": rows(3), "b": []}),
        ODMConfigError,
        "dataset_dict['b']: the category has no data (0 rows)",
    ),
    (
        "no eval set for entropy",
        dict(eval_dataset_dict={"a": rows(2)}),
        ODMConfigError,
        "eval_dataset_dict['b']: reward_type entropy computes the reward of each category on its "
        "evaluation set, and that of 'b' is missing",
    ),
    (
        "empty eval set for validation loss",
        dict(eval_dataset_dict={"a": rows(2), "b": []}, reward_type="VALIDATION_LOSS"),
        ODMConfigError,
        "eval_dataset_dict['b']: reward_type validation_loss",
    ),
    (
        "weights missing a category",
        dict(sampling_weights={"a": 1.0}),
        ODMConfigError,
        "sampling_weights: no weight for categories ['b']",
    ),
    (
        "collator missing a category",
        dict(collators_dict={"a": None}),
        ODMConfigError,
        "collators_dict: no collator for categories ['b']",
    ),
    (
        "iterable where auto-categorisation needs a sized one",
        dict(dataset_dict={"all": Stream()}),
        UnsupportedDatasetError,
        "dataset_dict['all']: Stream is an iterable (streaming) dataset; "
        "auto-categorisation of iterable datasets is not yet supported",
    ),
    (
        "unknown auto-categorize key",
        dict(dataset_dict={"all": rows(4)}, auto_categorize_config={"num_clusters": 3}),
        ODMConfigError,
        "auto_categorize_config: unknown key 'num_clusters'",
    ),
    (
        "auto-categorize column missing",
        dict(
            dataset_dict={"all": rows(4)},
            auto_categorize_config={"input_column": "txt", "model": "set below"},
        ),
        ODMConfigError,
        "auto_categorize_config['input_column']: row 0 of dataset_dict['all'] has no 'txt'",
    ),
    (
        "text without a tokenizer for hidden states",
        dict(
            dataset_dict={"all": rows(4)},
            auto_categorize_config={"input_column": "text", "model": "set below"},
        ),
        AutoCategorizeInputError,
        "auto_categorize_config['tokenizer']: column 'text' of dataset_dict['all'] holds text",
    ),
]


@pytest.mark.parametrize(
    "name,overrides,error,message", DATASET_CASES, ids=[c[0] for c in DATASET_CASES]
)
def test_dataset_bad_input(h, tmp_path, name, overrides, error, message):
    kwargs = {
        **BASE,
        "dataset_dict": {"a": rows(3), "b": rows(3)},
        "output_dir": tmp_path,
        **overrides,
    }
    config = kwargs.get("auto_categorize_config")
    if config and config.get("model") == "set below":
        kwargs["auto_categorize_config"] = {**config, "model": h.tiny_model(), "model_name": None}
    with pytest.raises(error) as caught:
        OnlineMixingDataset(**kwargs)
    assert message in str(caught.value)
    assert isinstance(caught.value, AccelerationPluginConfigError)


STANZA_CASES = [
    (
        {"reward_type": "perplexity"},
        "plugins.training.odm.odm.reward_type: 'perplexity' is not an allowed value",
    ),
    ({"gamma": 0}, "plugins.training.odm.odm.gamma: 0 must be greater than 0"),
    ({"gamma": 2.0}, "plugins.training.odm.odm.gamma: 2.0 must be less than or equal to 1"),
    ({"eta": -1}, "plugins.training.odm.odm.eta: -1 must be greater than 0"),
    (
        {"update_interval": 0},
        "plugins.training.odm.odm.update_interval: 0 must be greater than or equal to 1",
    ),
    (
        {"sampling_interval": "2"},
        "plugins.training.odm.odm.sampling_interval: expected an integer, got str '2'",
    ),
    ({"exploraton": "decaying"}, "unknown key 'exploraton' (did you mean 'exploration'?)"),
    (
        {"auto_categorize_num_categories": "three"},
        "plugins.training.odm.odm.auto_categorize_num_categories: expected an integer",
    ),
]


@pytest.mark.parametrize("options,message", STANZA_CASES, ids=[str(c[0]) for c in STANZA_CASES])
def test_stanza_bad_input(h, options, message):
    with pytest.raises(AccelerationPluginConfigError) as caught:
        h.odm_framework(**options)
    assert message in str(caught.value)


def test_dataloader_workers_are_refused(h, tmp_path):
    framework = h.odm_framework()
    args = h.train_args(tmp_path, dataloader_num_workers=2)
    with pytest.raises(ODMConfigError, match="dataloader_num_workers=2: the mixer must draw"):
        framework.augmentation(h.tiny_model(), args, modifiable_args=(None,))


def test_no_eval_sets_for_an_entropy_reward_is_refused_before_training(h, tmp_path):
    # the reference accepted the dataset without evaluation sets; training with them is refused
    mixer = OnlineMixingDataset(h.categories(), None, {}, None, output_dir=tmp_path)
    with pytest.raises(ODMConfigError, match=r"eval_dataset_dict\['count'\]: reward_type entropy"):
        h.train(tmp_path, mixer, h.odm_framework())
    assert mixer.produced == 0


def test_training_without_a_mixer_is_refused(h, tmp_path):
    framework = h.odm_framework()
    data = rows(8)
    with pytest.raises(ODMConfigError, match="training data is list, not an OnlineMixingDataset"):
        h.train(tmp_path, data, framework)
