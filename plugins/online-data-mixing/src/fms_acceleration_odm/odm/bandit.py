"""EXP3 over data categories: mixing ratios from weights, exploration schedules, weight updates.

Pure arithmetic on Python floats (no torch, no framework), so every rank computes bit-identical
ratios from identical inputs. Weights are kept as logarithms: the reference multiplied raw
float64 weights by exp(eta * reward / (p K)) at every update, which overflows to inf (and the
ratios to nan) after a few hundred updates with loss-sized rewards; subtracting the largest
log-weight keeps the same ratios finite forever.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

EXPLORATION_SCHEDULES = ("constant", "decaying")


def exploration_rate(schedule: str, gamma: float, categories: int, updates: int) -> float:
    """The share of the mixture spread uniformly after `updates` weight updates.

    constant: `gamma`. decaying: the paper's epsilon_t = min(1/K, sqrt(ln K / (K t))) times K,
    i.e. min(1, sqrt(K ln K / t)) with t = updates + 1: uniform at first, then less and less.
    """
    if schedule == "constant":
        return gamma
    if schedule == "decaying":
        k = categories
        return min(1.0, math.sqrt(k * math.log(k) / (updates + 1))) if k > 1 else 0.0
    raise ValueError(f"unknown exploration schedule {schedule!r}; one of {EXPLORATION_SCHEDULES}")


def mixing_ratio(log_weights: Sequence[float], gamma: float) -> list[float]:
    """p = (1 - gamma) w / sum(w) + gamma / K for w = exp(log_weights)."""
    k = len(log_weights)
    top = max(log_weights)
    w = [math.exp(x - top) for x in log_weights]
    total = math.fsum(w)
    return [(1.0 - gamma) * x / total + gamma / k for x in w]


def normalised_weights(log_weights: Sequence[float]) -> list[float]:
    """The weights scaled so that the largest is 1 (what the logs show as sampling weights)."""
    top = max(log_weights)
    return [math.exp(x - top) for x in log_weights]


def exp3_update(
    log_weights: Sequence[float],
    ratio: Sequence[float],
    rewards: Sequence[float],
    counts: Sequence[float],
    eta: float,
) -> list[float]:
    """One EXP3 step: w_a <- w_a exp(eta (r_a / n_a) / (p_a K)) for every arm with n_a > 0.

    `rewards` are sums over `counts` observations; an arm observed zero times keeps its weight
    (the reference divided by zero there).
    """
    k = len(log_weights)
    out = list(log_weights)
    for arm in range(k):
        if counts[arm] > 0:
            estimate = (rewards[arm] / counts[arm]) / ratio[arm]
            out[arm] += eta * estimate / k
    top = max(out)
    return [x - top for x in out]


def draw(ratio: Sequence[float], uniform: float) -> int:
    """The category a uniform number in [0, 1) selects under `ratio` (inverse CDF, as
    random.choices does with cumulative weights)."""
    total = math.fsum(ratio)
    target = uniform * total
    running = 0.0
    for arm, share in enumerate(ratio):
        running += share
        if target < running:
            return arm
    return len(ratio) - 1
