"""The mixer on its own: draws, counts, the log, and state that resumes exactly."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from fms_acceleration_odm import OnlineMixingDataset


def mixer(h, tmp_path, **kwargs):
    data = h.categories(n=7)
    evals = h.categories(n=4, seed=100)
    defaults = dict(
        sampling_weights={"count": 1.0, "random": 3.0, "repeat": 1.0},
        gamma=0.2,
        eta=0.5,
        output_dir=tmp_path,
        reward_type="validation_loss",
        eval_batch_size=3,
    )
    return OnlineMixingDataset(
        data, {}, evals, {c: h.PadCollator() for c in evals}, **{**defaults, **kwargs}
    )


def draws(m, n):
    out = []
    for _ in range(n):
        sample = next(m)
        out.append((m.arm_idx, tuple(sample["input_ids"])))
    return out


def test_draws_follow_the_ratio_and_the_seed(h, tmp_path):
    a = draws(mixer(h, tmp_path / "a"), 3000)
    b = draws(mixer(h, tmp_path / "b"), 3000)
    assert a == b
    c = draws(mixer(h, tmp_path / "c", seed=7), 3000)
    assert [x[0] for x in a] != [x[0] for x in c]
    counts = Counter(arm for arm, _ in a)
    # (1 - 0.2) * [1, 3, 1] / 5 + 0.2 / 3
    expected = [0.2267, 0.5467, 0.2267]
    assert [counts[i] / 3000 for i in range(3)] == pytest.approx(expected, abs=0.03)


def test_each_category_is_read_in_order_and_restarted(h, tmp_path):
    m = mixer(h, tmp_path)
    data = h.categories(n=7)
    seen = {c: [] for c in data}
    for arm, ids in draws(m, 200):
        seen[m.id2cat[arm]].append(list(ids))
    for c, rows in seen.items():
        assert rows == [data[c][i % 7]["input_ids"] for i in range(len(rows))]
    assert sum(m.curr_cat_count) == m.produced == 200


def test_sampling_interval_keeps_a_category_for_n_samples(h, tmp_path):
    arms = [a for a, _ in draws(mixer(h, tmp_path, sampling_interval=4), 64)]
    assert all(len(set(arms[i : i + 4])) == 1 for i in range(0, 64, 4))
    assert len(set(arms)) > 1


def test_update_uses_every_categorys_eval_loss(h, tmp_path):
    m = mixer(h, tmp_path)
    model = h.tiny_model(1)
    before = m.sampling_ratio
    m.update_sampling_weights(model, None, None)
    evals = h.categories(n=4, seed=100)
    losses = []
    with torch.no_grad():
        for c in m.category_list:
            rows = evals[c]
            total = 0.0
            for start in range(0, 4, 3):
                batch = h.PadCollator()(rows[start : start + 3])
                total += model(**batch).loss.item() * len(rows[start : start + 3])
            losses.append(total / 4)
    assert m.reward_state.validation_loss == pytest.approx(losses, rel=1e-5)
    assert m.sampling_ratio != before
    records = [json.loads(line) for line in (tmp_path / "odm.jsonl").read_text().splitlines()]
    update = records[-1]
    assert update["action"] == "update"
    assert update["current_sampling_ratio"] == pytest.approx(m.sampling_ratio)
    assert update["count"] == [4, 4, 4]
    for key in (
        "samples_produced_so_far",
        "sampling_interval",
        "total_categories",
        "current_sampling_weights",
        "arm_idx",
        "category_level_counts_so_far",
        "rewards",
    ):
        assert key in update


def test_state_round_trip_continues_identically(h, tmp_path):
    model = h.tiny_model(2)
    m = mixer(h, tmp_path / "a", sampling_interval=3)
    draws(m, 20)
    m.update_sampling_weights(model, None, None)
    draws(m, 11)
    state = json.loads(json.dumps(m.state_dict()))  # what a checkpoint holds
    expected = draws(m, 40)
    restored = mixer(h, tmp_path / "b", sampling_interval=3)
    restored.load_state_dict(state)
    assert draws(restored, 40) == expected
    assert restored.sampling_ratio == m.sampling_ratio
    assert restored.curr_cat_count == m.curr_cat_count


def test_state_at_a_consumed_sample_replays_the_prefetched_ones(h, tmp_path):
    """Saved at sample 24 while 30 were drawn and an update happened after 27: the restored
    mixer draws samples 24.. exactly as the live one did, switching ratio at sample 27."""
    model = h.tiny_model(2)
    live = mixer(h, tmp_path / "a")
    reference = draws(live, 27)
    live.update_sampling_weights(model, None, None)
    reference += draws(live, 20)
    replay = mixer(h, tmp_path / "b")
    draws(replay, 27)
    replay.update_sampling_weights(model, None, None)
    draws(replay, 3)
    replay.mark_consumed(24)
    state = json.loads(json.dumps(replay.state_dict_at(24)))
    fresh = mixer(h, tmp_path / "c")
    fresh.load_state_dict(state)
    assert draws(fresh, 23) == reference[24:]
    assert fresh.sampling_ratio == live.sampling_ratio
    with pytest.raises(ValueError, match="only positions from the last consumed sample"):
        replay.state_dict_at(10)


def test_iterable_categories_resume_by_skipping(h, tmp_path):
    class Rows(torch.utils.data.IterableDataset):
        def __init__(self, rows):
            self.rows = rows

        def __iter__(self):
            return iter(self.rows)

    data = {c: Rows(rows) for c, rows in h.categories(n=5).items()}
    m = OnlineMixingDataset(data, None, None, None, reward_type="train_loss", output_dir=tmp_path)
    draws(m, 37)
    state = m.state_dict()
    expected = draws(m, 30)
    restored = OnlineMixingDataset(
        data, None, None, None, reward_type="train_loss", output_dir=tmp_path
    )
    restored.load_state_dict(state)
    assert draws(restored, 30) == expected


def test_reference_learning_table(tmp_path):
    """The reference's test: big rewards for one category move the draws to it."""

    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                ids = torch.rand(6)
                yield {"input_ids": ids, "attention_mask": torch.ones(6), "labels": ids}

    data = {f"data_{i}": Endless() for i in (1, 2, 3)}
    m = OnlineMixingDataset(
        data,
        dict.fromkeys(data),
        data,
        dict.fromkeys(data),
        {"data_1": 1, "data_2": 100, "data_3": 2},
        0.1,
        0.3,
        1,
        100,
        output_dir=tmp_path,
    )
    chosen = []
    for rewards in ([1, 100, 1], [1, 200, 1], [1, 100, 1], [1, 1, 1000], [1, 1, 2000]):
        m._update_weights([100] * 3, rewards)
        next(m)
        chosen.append(m.arm_idx)
    assert chosen[-2:] == [2, 2]
    assert m.sampling_ratio[2] == pytest.approx(1 - 0.1 + 0.1 / 3, abs=1e-6)
