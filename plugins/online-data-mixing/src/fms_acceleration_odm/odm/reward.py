"""Rewards of the data-mixing bandit: what makes a category worth more samples.

Entropy rewards run the model on a batch of a category's evaluation set; loss and gradnorm
rewards read what the Trainer logged. The latest loss/gradnorm seen for each category lives in
a `RewardState` the caller owns (the mixer keeps it in its state_dict); the reference kept those
buffers in module-level globals, shared by every mixer of the process and lost on resume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ODMConfigError

# what a category's buffer holds before it was ever observed (the reference's value)
UNOBSERVED = 1e-100


class Reward(str, Enum):
    """The reward types; values are the lower-case names the YAML uses."""

    ENTROPY = "entropy"
    ENTROPY3_VARENT1 = "entropy3_varent1"
    ENTROPY_LAST_TOKEN = "entropy_last_token"
    TRAIN_LOSS = "train_loss"
    VALIDATION_LOSS = "validation_loss"
    GRADNORM = "gradnorm"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Reward | str, key: str = "reward_type") -> Reward:
        """A Reward from itself or its name in any case; else an error naming `key`."""
        if isinstance(value, Reward):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        allowed = ", ".join(r.value for r in cls)
        raise ODMConfigError(f"{key}: {value!r} is not a reward type; allowed: {allowed}.")

    @property
    def uses_entropy(self) -> bool:
        """Computed from the model's predictions on the categories' evaluation sets."""
        return self in (Reward.ENTROPY, Reward.ENTROPY3_VARENT1, Reward.ENTROPY_LAST_TOKEN)

    @property
    def needs_eval_data(self) -> bool:
        """Whether every category needs an evaluation set for this reward."""
        return self.uses_entropy or self is Reward.VALIDATION_LOSS

    @property
    def logged_key(self) -> str | None:
        """The Trainer log entry this reward reads, if any."""
        return {Reward.TRAIN_LOSS: "loss", Reward.GRADNORM: "grad_norm"}.get(self)


@dataclass
class RewardState:
    """The last observed train loss / validation loss / inverse gradnorm of each category."""

    total_categories: int
    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    gradnorm: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("train_loss", "validation_loss", "gradnorm"):
            if not getattr(self, name):
                setattr(self, name, [UNOBSERVED] * self.total_categories)

    def state_dict(self) -> dict[str, Any]:
        """Plain lists (JSON-serialisable)."""
        return {
            "train_loss": list(self.train_loss),
            "validation_loss": list(self.validation_loss),
            "gradnorm": list(self.gradnorm),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        for name in ("train_loss", "validation_loss", "gradnorm"):
            setattr(self, name, [float(x) for x in state[name]])


@dataclass(frozen=True)
class EntropyStats:
    """Per sequence: mean entropy and varentropy over its tokens, entropy of its last token."""

    entropy: torch.Tensor
    varentropy: torch.Tensor
    last_token_entropy: torch.Tensor


def entropy_stats(
    logits: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int | None = None
) -> EntropyStats:
    """Normalised predictive entropy statistics of a batch (values in [0, 1]).

    Position t predicts token t + 1, so it counts when token t + 1 is attended. Entropies are
    divided by ln(vocab_size) (varentropy by its square) and clamped to [0, 1]; `vocab_size`
    None means the logits' width, the model's own vocabulary (the reference used 32000 for
    every model). The last token is each sequence's last attended one, not the last column
    (which is padding in a right-padded batch).
    """
    shift = logits[:, :-1, :].float()
    mask = attention_mask[:, 1:].to(shift.dtype)
    log_probs = F.log_softmax(shift, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(dim=-1)
    varentropy = (probs * log_probs.square()).sum(dim=-1) - entropy.square()
    tokens = mask.sum(dim=-1).clamp_min(1.0)
    mean_entropy = (entropy * mask).sum(dim=-1) / tokens
    mean_varentropy = (varentropy * mask).sum(dim=-1) / tokens
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).amax(dim=-1)
    last = last.clamp_min(0)
    last_entropy = entropy.gather(1, last[:, None]).squeeze(1)
    max_entropy = math.log(vocab_size if vocab_size is not None else shift.shape[-1])
    return EntropyStats(
        entropy=(mean_entropy / max_entropy).clamp(0.0, 1.0),
        varentropy=(mean_varentropy / max_entropy**2).clamp(0.0, 1.0),
        last_token_entropy=(last_entropy / max_entropy).clamp(0.0, 1.0),
    )


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


def batch_entropy_reward(
    model: Any, batch: Mapping[str, torch.Tensor], reward_type: Reward, vocab_size: int | None
) -> float:
    """The sum over the batch's sequences of the entropy reward `reward_type`."""
    inputs = _model_inputs(batch)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
        inputs["attention_mask"] = mask
    inputs.pop("labels", None)
    with torch.inference_mode():
        logits = model(**inputs).logits
    stats = entropy_stats(logits, mask, vocab_size)
    if reward_type is Reward.ENTROPY:
        return float(stats.entropy.sum())
    if reward_type is Reward.ENTROPY3_VARENT1:
        return float(0.75 * stats.entropy.sum() + 0.25 * stats.varentropy.sum())
    return float(stats.last_token_entropy.sum())


def batch_loss_reward(model: Any, batch: Mapping[str, torch.Tensor]) -> float:
    """The model's mean loss on the batch times its number of sequences (a sum, like the
    entropy rewards, so that dividing by the sequence count gives the mean)."""
    inputs = _model_inputs(batch)
    if "labels" not in inputs:
        inputs["labels"] = inputs["input_ids"]
    with torch.inference_mode():
        loss = model(**inputs).loss
    return float(loss) * int(inputs["input_ids"].shape[0])


def _latest(history: Sequence[Mapping[str, Any]] | None, key: str, what: str) -> float:
    if not history:
        raise ODMConfigError(
            f"{what} cannot be an empty list or None: the {key!r} the Trainer logs is needed "
            "before the first weight update"
        )
    return float(history[-1][key])


def compute_reward(
    model: Any,
    batch: Mapping[str, torch.Tensor] | None,
    vocab_size: int | None,
    reward_type: Reward | str,
    train_loss_history: Sequence[Mapping[str, Any]] | None = None,
    eval_loss_history: Sequence[Mapping[str, Any]] | None = None,
    gradnorm_history: Sequence[Mapping[str, Any]] | None = None,
    last_sampled_category: int | None = None,
    total_categories: int | None = None,
    current_category: int | None = None,
    *,
    reward_state: RewardState | None = None,
) -> float:
    """The reward of `current_category` (the reference's signature).

    ENTROPY / ENTROPY3_VARENT1 / ENTROPY_LAST_TOKEN: summed over the batch's sequences (0.75
    entropy + 0.25 varentropy for the second). VALIDATION_LOSS: the model's loss on `batch`,
    or with no batch the latest of `eval_loss_history`. TRAIN_LOSS / GRADNORM: the latest
    logged loss / 1 / (grad_norm + 1e-4) is credited to `last_sampled_category`, and the value
    last credited to `current_category` is returned; the credits live in `reward_state` (a fresh
    one when None, so a call without it sees only its own credit).
    """
    reward_type = Reward.parse(reward_type)
    if reward_type.uses_entropy:
        if batch is None:
            raise ODMConfigError(
                f"reward_type {reward_type.value}: needs a batch of the category's evaluation "
                "set (none was given)"
            )
        return batch_entropy_reward(model, batch, reward_type, vocab_size)
    if reward_type is Reward.VALIDATION_LOSS and batch is not None:
        return batch_loss_reward(model, batch)
    if total_categories is None or current_category is None:
        raise ODMConfigError(
            f"reward_type {reward_type.value}: total_categories and current_category are needed"
        )
    state = reward_state if reward_state is not None else RewardState(total_categories)
    if reward_type is Reward.VALIDATION_LOSS:
        latest = _latest(eval_loss_history, "loss", "eval_loss_history")
        state.validation_loss[current_category] = latest
        return state.validation_loss[current_category]
    if last_sampled_category is None:
        raise ODMConfigError(f"reward_type {reward_type.value}: last_sampled_category is needed")
    if reward_type is Reward.TRAIN_LOSS:
        latest = _latest(train_loss_history, "loss", "train_loss_history")
        state.train_loss[last_sampled_category] = latest
        return state.train_loss[current_category]
    norm = _latest(gradnorm_history, "grad_norm", "gradnorm_history")
    state.gradnorm[last_sampled_category] = 1.0 / (norm + 0.0001)
    return state.gradnorm[current_category]
