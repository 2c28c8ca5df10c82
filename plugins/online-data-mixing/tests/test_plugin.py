"""The plugin: the client's YAML, the sample stanza, and training through a Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fms_acceleration import AccelerationFramework
from fms_acceleration_odm import OnlineDataMixingAccelerationPlugin, OnlineMixingDataset

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# what fms-hf-tuning's AccelerationFrameworkConfig.to_yaml writes for its ODM dataclass (its
# defaults, update_interval left null, num_categories as its data config spells it)
CLIENT_YAML = """\
plugins:
  training:
    odm:
      odm:
        auto_categorize_batch_size: 64
        auto_categorize_input_column: input
        auto_categorize_model_name: Qwen/Qwen3-Embedding-0.6B
        auto_categorize_num_categories: '3'
        eta: 0.2
        gamma: 0.1
        resume_from_checkpoint: false
        reward_type: validation_loss
        sampling_interval: 1
        update_interval: null
"""


def test_the_clients_odm_yaml_builds_a_framework(tmp_path):
    path = tmp_path / "accel.yaml"
    path.write_text(CLIENT_YAML)
    framework = AccelerationFramework(str(path))
    (plugin,) = [p for _, p in framework.active_plugins]
    assert isinstance(plugin, OnlineDataMixingAccelerationPlugin)
    assert framework.requires_augmentation and not framework.requires_custom_loading
    options = plugin.options
    assert (options.interval, options.sampling_interval, options.reward_type) == (
        1,
        1,
        "validation_loss",
    )
    assert (options.gamma, options.eta, options.auto_categorize_num_categories) == (0.1, 0.2, 3)
    assert options.dataset_kwargs()["auto_categorize_config"] == {
        "input_column": "input",
        "num_categories": 3,
        "batch_size": 64,
        "model_name": "Qwen/Qwen3-Embedding-0.6B",
    }


def test_the_sample_stanza_builds_a_framework_with_its_values():
    data = yaml.safe_load((CONFIGS / "odm.yaml").read_text())
    framework = AccelerationFramework(data)
    plugin = framework.plugins["odm"]
    assert plugin.options.model_dump() == {
        **type(plugin.options)().model_dump(),
        "update_interval": 2,
        "reward_type": "validation_loss",
        "eta": 0.1,
    }


def test_training_updates_the_weights_and_writes_log_plot_and_state(h, tmp_path):
    framework = h.odm_framework(update_interval=2, reward_type="entropy", eta=2.0)
    mixer = OnlineMixingDataset(
        h.categories(),
        None,
        h.categories(n=3, seed=50),
        {c: h.PadCollator() for c in ("count", "random", "repeat")},
        gamma=0.1,
        eta=2.0,
        output_dir=tmp_path,
        eval_batch_size=3,
    )
    trainer = h.train(tmp_path, mixer, framework, max_steps=6, save_strategy="steps", save_steps=3)
    assert trainer.state.global_step == 6
    records = [json.loads(x) for x in (tmp_path / "odm.jsonl").read_text().splitlines()]
    updates = [r for r in records if r["action"] == "update"]
    assert [r["step"] for r in updates] == [2, 4, 6]
    assert all(r["count"] == [3, 3, 3] for r in updates)
    samples = [r for r in records if r["action"] == "sample"]
    # 6 steps x 4 rows consumed, plus what the dataloader fetched ahead
    assert 24 <= len(samples) <= 28
    assert mixer.sampling_ratio != pytest.approx([1 / 3] * 3)
    plugin = framework.plugins["odm"]
    assert Path(plugin.artifacts["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for step in (3, 6):
        state = json.loads((tmp_path / f"checkpoint-{step}" / "odm_state.json").read_text())
        assert state["produced"] == step * 4
        assert sum(state["curr_cat_count"]) == step * 4
    framework.undo_patches()


@pytest.mark.parametrize(
    "reward",
    ["validation_loss", "train_loss", "gradnorm", "entropy3_varent1", "entropy_last_token"],
)
def test_every_reward_trains(h, tmp_path, reward):
    framework = h.odm_framework(update_interval=1, reward_type=reward)
    mixer = OnlineMixingDataset(
        h.categories(),
        None,
        h.categories(n=2, seed=9),
        {c: h.PadCollator() for c in ("count", "random", "repeat")},
        reward_type=reward,
        output_dir=tmp_path,
    )
    h.train(tmp_path, mixer, framework, max_steps=3)
    records = [json.loads(x) for x in (tmp_path / "odm.jsonl").read_text().splitlines()]
    updates = [r for r in records if r["action"] == "update"]
    assert [r["step"] for r in updates] == [1, 2, 3]
    assert all(any(x > 0 for x in r["rewards"]) for r in updates)
    framework.undo_patches()
