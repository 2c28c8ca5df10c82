"""EXP3 arithmetic against a plain-torch float64 re-statement of the reference's update."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fms_acceleration_odm.odm import bandit


def reference_run(weights, rewards_seq, counts_seq, gamma, eta):
    """The reference's raw-weight EXP3 (tensor of float64 weights multiplied in place)."""
    w = torch.tensor(weights, dtype=torch.float64)
    k = len(weights)

    def ratio():
        return (1 - gamma) * w / w.sum() + gamma / k

    p = ratio()
    for rewards, counts in zip(rewards_seq, counts_seq):
        for arm in range(k):
            w[arm] *= math.exp(eta * (rewards[arm] / counts[arm]) / p[arm].item() / k)
        p = ratio()
    return p.tolist()


@pytest.mark.parametrize("seed,k", [(3, 2), (11, 5), (29, 7)])
def test_updates_match_the_reference_arithmetic(seed, k):
    rng = random.Random(seed)
    weights = [rng.uniform(0.5, 50) for _ in range(k)]
    rewards = [[rng.uniform(0, 3) * 4 for _ in range(k)] for _ in range(25)]
    counts = [[rng.randint(1, 6) for _ in range(k)] for _ in range(25)]
    gamma, eta = 0.13, 0.21
    log_w = [math.log(x) for x in weights]
    ratio = bandit.mixing_ratio(log_w, gamma)
    for r, n in zip(rewards, counts):
        log_w = bandit.exp3_update(log_w, ratio, r, n, eta)
        ratio = bandit.mixing_ratio(log_w, gamma)
    expected = reference_run(weights, rewards, counts, gamma, eta)
    assert ratio == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert math.fsum(ratio) == pytest.approx(1.0, abs=1e-12)


def test_many_loss_sized_updates_stay_finite_and_settle_proportional_to_rewards():
    k, gamma, eta = 3, 0.1, 0.3
    rewards = [3.0, 2.5, 1.0]
    log_w = [0.0] * k
    ratio = bandit.mixing_ratio(log_w, gamma)
    raw = torch.ones(k, dtype=torch.float64)
    for _ in range(3000):
        for arm in range(k):
            raw[arm] *= math.exp(min(700.0, eta * rewards[arm] / ratio[arm] / k))
        log_w = bandit.exp3_update(log_w, ratio, rewards, [1] * k, eta)
        ratio = bandit.mixing_ratio(log_w, gamma)
    assert not torch.isfinite(raw).all()  # the reference's representation overflowed
    assert all(math.isfinite(x) for x in ratio)
    # with every arm observed, r / p is equalised: the mixture settles proportional to the
    # rewards (a category with twice the loss gets twice the samples)
    assert ratio == pytest.approx([r / sum(rewards) for r in rewards], rel=1e-6)


def test_an_arm_observed_zero_times_keeps_its_weight():
    log_w = bandit.exp3_update([0.0, math.log(2.0)], [0.4, 0.6], [1.0, 5.0], [0, 2], 0.5)
    # arm 1 gained eta * (5 / 2) / 0.6 / 2; normalised so the largest is 0
    assert log_w[1] == 0.0
    assert log_w[0] == pytest.approx(-(math.log(2.0) + 0.5 * 2.5 / 0.6 / 2), rel=1e-12)


@pytest.mark.parametrize(
    "k,t,expected",
    [
        (3, 0, 1.0),
        (3, 100, math.sqrt(3 * math.log(3) / 101)),
        (8, 5000, math.sqrt(8 * math.log(8) / 5001)),
        (1, 9, 0.0),
    ],
)
def test_decaying_exploration_is_the_papers_schedule(k, t, expected):
    assert bandit.exploration_rate("decaying", 0.1, k, t) == pytest.approx(expected, rel=1e-12)
    assert bandit.exploration_rate("constant", 0.1, k, t) == 0.1


def test_draw_is_the_inverse_cdf_random_choices_uses():
    ratio = [0.2, 0.5, 0.3]
    rng = random.Random(5)
    for _ in range(2000):
        u = rng.random()
        expected = random.Random(0)
        expected.random = lambda u=u: u  # choices() reads one uniform number per draw
        assert bandit.draw(ratio, u) == expected.choices(range(3), weights=ratio)[0]
