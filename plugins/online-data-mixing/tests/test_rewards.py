"""Rewards: entropy statistics against plain torch; loss / gradnorm credits in a RewardState."""

from __future__ import annotations

import math

import pytest
import torch

from fms_acceleration_odm import Reward, RewardState, compute_reward
from fms_acceleration_odm.odm.reward import UNOBSERVED, entropy_stats


def plain_entropy(logits, mask, vocab):
    """Token by token, in float64, with explicit loops over sequences."""
    out = []
    for b in range(logits.shape[0]):
        ents, vars_ = [], []
        last = None
        for t in range(logits.shape[1] - 1):
            p = torch.softmax(logits[b, t].double(), -1)
            e = -(p * p.log()).sum()
            v = (p * p.log() ** 2).sum() - e**2
            if mask[b, t + 1]:
                ents.append(e)
                vars_.append(v)
                last = e
        m = math.log(vocab)
        out.append(
            (
                min(1.0, float(sum(ents) / len(ents)) / m),
                min(1.0, float(sum(vars_) / len(vars_)) / m**2),
                min(1.0, float(last) / m),
            )
        )
    return out


@pytest.mark.parametrize(
    "seed,shape,vocab", [(1, (3, 7, 50), 50), (7, (5, 13, 1031), 1031), (13, (2, 9, 4096), 32000)]
)
def test_entropy_stats_match_plain_torch(seed, shape, vocab):
    g = torch.Generator().manual_seed(seed)
    # peaked logits so entropies stay below the clamp
    logits = torch.randn(shape, generator=g) * 6.0
    mask = torch.ones(shape[:2], dtype=torch.long)
    mask[0, shape[1] - 3 :] = 0  # right padding
    mask[-1, :2] = 0  # left padding
    stats = entropy_stats(logits, mask, vocab if vocab != shape[2] else None)
    expected = plain_entropy(logits, mask, vocab)
    assert stats.entropy.tolist() == pytest.approx([e[0] for e in expected], rel=1e-5)
    assert stats.varentropy.tolist() == pytest.approx([e[1] for e in expected], rel=1e-4)
    assert stats.last_token_entropy.tolist() == pytest.approx([e[2] for e in expected], rel=1e-5)


def test_entropy_is_normalised_by_the_models_own_vocabulary(h):
    model = h.tiny_model(3).eval()
    g = torch.Generator().manual_seed(4)
    batch = {
        "input_ids": torch.randint(4, 128, (3, 10), generator=g),
        "attention_mask": torch.ones(3, 10, dtype=torch.long),
    }
    ours = compute_reward(model, batch, None, Reward.ENTROPY)
    # a random-init model predicts almost uniformly: entropy close to ln(128), reward near 1
    assert 0.9 < ours / 3 <= 1.0
    with torch.no_grad():
        logits = model(**batch).logits
    expected = sum(e[0] for e in plain_entropy(logits, batch["attention_mask"], 128))
    assert ours == pytest.approx(expected, rel=1e-5)
    # the reference's fixed 32000 would have given a reward far below the real one
    assert compute_reward(model, batch, 32000, Reward.ENTROPY) < 0.5 * ours


def test_validation_loss_reward_is_the_models_loss_times_rows(h):
    model = h.tiny_model(5).eval()
    ids = torch.randint(4, 128, (4, 8), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert compute_reward(model, batch, None, "validation_loss") == pytest.approx(
        4 * loss, rel=1e-6
    )


TRAIN_LOSS = (
    [
        [{"loss": 3}],
        [{"loss": 3}, {"loss": 4}],
        [{"loss": 3}, {"loss": 4}, {"loss": 2}],
        [{"loss": 3}, {"loss": 4}, {"loss": 2}, {"loss": 1}],
    ],
    [0, 0, 1, 1],
    [[3, UNOBSERVED], [4, UNOBSERVED], [4, 2], [4, 1]],
)
GRADNORM = (
    [[{"grad_norm": 3}], [{"grad_norm": 4}], [{"grad_norm": 2}], [{"grad_norm": 1}]],
    [0, 1, 1, 0],
    [
        [1 / 3.0001, UNOBSERVED],
        [1 / 3.0001, 1 / 4.0001],
        [1 / 3.0001, 1 / 2.0001],
        [1 / 1.0001, 1 / 2.0001],
    ],
)


@pytest.mark.parametrize(
    "reward,key,table",
    [
        (Reward.TRAIN_LOSS, "train_loss_history", TRAIN_LOSS),
        (Reward.GRADNORM, "gradnorm_history", GRADNORM),
    ],
)
def test_logged_rewards_credit_the_last_sampled_category(reward, key, table):
    histories, last, expected = table
    state = RewardState(2)
    other = RewardState(2)  # a second mixer's state is never touched: no module-level buffers
    for history, arm, row in zip(histories, last, expected):
        got = [
            compute_reward(
                None,
                None,
                None,
                reward,
                last_sampled_category=arm,
                total_categories=2,
                current_category=c,
                reward_state=state,
                **{key: history},
            )
            for c in range(2)
        ]
        assert got == pytest.approx(row, rel=1e-12)
    assert other.state_dict() == RewardState(2).state_dict()
    restored = RewardState(2)
    restored.load_state_dict(state.state_dict())
    assert restored == state


def test_validation_loss_from_history_per_category():
    state = RewardState(2)
    for c, loss in ((0, 3.0), (1, 10.0)):
        assert (
            compute_reward(
                None,
                None,
                None,
                Reward.VALIDATION_LOSS,
                total_categories=2,
                current_category=c,
                reward_state=state,
                eval_loss_history=[{"loss": loss}],
            )
            == loss
        )
    assert state.validation_loss == [3.0, 10.0]
