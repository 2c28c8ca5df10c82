"""OnlineMixingDataset: an endless stream over named categories whose mixture a bandit learns.

Which category sample j comes from is a pure function of (seed, j, the mixing ratio in effect
at j): a uniform number derived from the seed and j's draw index selects through the ratio's
cumulative sum. So every process draws the same category at every sample without exchanging
anything, and the mixer can tell, for any sample index it has passed, which categories the
samples after it came from. That is how `state_dict_at(consumed)` hands back the state as it was
when the Trainer had consumed `consumed` samples, although the dataloader had already fetched
more: a resumed run then draws exactly what the uninterrupted one drew.

Weight updates take effect at the sample index where they happen (`ratio_schedule`), so a
restored mixer switches to a later update at the same sample as the uninterrupted run did.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from ..errors import ODMConfigError
from . import bandit
from .auto_categorizer import AutoCategorizeConfig, DatasetAutoCategorizer, require_sized
from .category_stream import CategoryStream, sized_length
from .reward import Reward, RewardState, compute_reward

logger = logging.getLogger(__name__)

STATE_VERSION = 1
LOG_FILE = "odm.jsonl"


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ODMConfigError(f"{key}: {value!r} is not a finite number")
    return float(value)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ODMConfigError(f"{key}: {value!r} must be an integer >= 1")
    return value


def check_gamma(value: Any, key: str = "gamma") -> float:
    """gamma in (0, 1]: the uniform share of the mixture."""
    gamma = _number(value, key)
    if not 0.0 < gamma <= 1.0:
        raise ODMConfigError(f"{key}: {value!r} is out of range; 0 < gamma <= 1")
    return gamma


def check_eta(value: Any, key: str = "eta") -> float:
    """eta > 0: the step size of the weight updates."""
    eta = _number(value, key)
    if eta <= 0.0:
        raise ODMConfigError(f"{key}: {value!r} is out of range; eta > 0")
    return eta


def _uniform(seed: int, draw_index: int) -> float:
    # string seeding hashes with sha512: the same number in every process, whatever
    # PYTHONHASHSEED is
    return random.Random(f"odm:{seed}:{draw_index}").random()


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), 1


class OnlineMixingDataset(IterableDataset):
    """Mixes named datasets with ratios an EXP3 bandit learns from rewards while training."""

    def __init__(
        self,
        dataset_dict: Mapping[str, Any],
        collators_dict: Mapping[str, Any] | None,
        eval_dataset_dict: Mapping[str, Any] | None,
        eval_collators_dict: Mapping[str, Any] | None,
        sampling_weights: Mapping[str, float] | None = None,
        gamma: float = 0.1,
        eta: float = 0.3,
        sampling_interval: int = 1,
        eval_batch_size: int = 5,
        output_dir: str | os.PathLike = "odm",
        reward_type: Reward | str = Reward.ENTROPY,
        auto_categorize_config: AutoCategorizeConfig | Mapping[str, Any] | None = None,
        seed: int | None = 42,
        *,
        exploration: str = "constant",
    ) -> None:
        self.gamma = check_gamma(gamma)
        self.eta = check_eta(eta)
        self.sampling_interval = _positive_int(sampling_interval, "sampling_interval")
        self.eval_batch_size = _positive_int(eval_batch_size, "eval_batch_size")
        self.reward_type = Reward.parse(reward_type)
        if exploration not in bandit.EXPLORATION_SCHEDULES:
            raise ODMConfigError(
                f"exploration: {exploration!r} is not allowed; allowed: "
                f"{', '.join(bandit.EXPLORATION_SCHEDULES)}"
            )
        self.exploration = exploration
        self.seed = 42 if seed is None else int(seed)
        self.output_dir = str(output_dir)
        self.rank = str(_distributed()[0])
        self._initial_weights = dict(sampling_weights) if sampling_weights else None
        if not isinstance(dataset_dict, Mapping) or not dataset_dict:
            raise ODMConfigError(
                "dataset_dict: expected a non-empty mapping of category name -> dataset, got "
                f"{dataset_dict!r}"
            )
        self.collators_dict: dict[str, Any] = dict(collators_dict or {})
        self.eval_collators_dict: dict[str, Any] = dict(eval_collators_dict or {})
        self.eval_dataset_dict: dict[str, Any] = dict(eval_dataset_dict or {})
        self.dataset_dict: dict[str, Any] = dict(dataset_dict)
        # one dataset: split it into pseudo categories (the reference's rule)
        self.auto_categorize = len(self.dataset_dict) == 1
        self._categorizer: DatasetAutoCategorizer | None = None
        self.category_list: list[str] = []
        if self.auto_categorize:
            config = AutoCategorizeConfig.from_value(auto_categorize_config)
            self._categorizer = DatasetAutoCategorizer(config)
            source_key = f"dataset_dict[{next(iter(self.dataset_dict))!r}]"
            require_sized(next(iter(self.dataset_dict.values())), source_key)
            if self._categorizer.can_embed():
                self.categorize()
            else:
                logger.info(
                    "auto-categorisation waits for the model being trained (no local "
                    "sentence-transformers model %r)",
                    config.model_name,
                )
        else:
            self._setup_categories()

    # --- categories ---------------------------------------------------------------------------

    @property
    def needs_model_for_categories(self) -> bool:
        """True while auto-categorisation waits for a model to embed with."""
        return self.auto_categorize and not self.category_list

    def categorize(self, model: Any = None, tokenizer: Any = None) -> None:
        """Split the single dataset into categories (embedding with `model` if needed)."""
        if not self.needs_model_for_categories:
            return
        assert self._categorizer is not None
        if model is not None and self._categorizer.config.model is None:
            self._categorizer.config.model = model
        if tokenizer is not None and self._categorizer.config.tokenizer is None:
            self._categorizer.config.tokenizer = tokenizer
        name, source = next(iter(self.dataset_dict.items()))
        categories = self._categorizer.fit(source, f"dataset_dict[{name!r}]", _same_on_all_ranks)
        if len(self.eval_dataset_dict) == 1:
            eval_name, eval_source = next(iter(self.eval_dataset_dict.items()))
            self.eval_dataset_dict = self._categorizer.assign(
                eval_source, f"eval_dataset_dict[{eval_name!r}]", _same_on_all_ranks
            )
            self.eval_collators_dict = self._broadcast(
                self.eval_collators_dict, list(self.eval_dataset_dict), "eval_collators_dict"
            )
        self.collators_dict = self._broadcast(
            self.collators_dict, list(categories), "collators_dict"
        )
        if self._initial_weights and not set(categories) <= set(self._initial_weights):
            # a weight for the one source dataset says nothing about its clusters
            self._initial_weights = None
        self.dataset_dict = categories
        self._categorizer.config.model = None  # do not keep a reference to the trained model
        logger.info("auto-categorised into %d categories: %s", len(categories), list(categories))
        self._setup_categories()

    @staticmethod
    def _broadcast(collators: dict[str, Any], names: list[str], key: str) -> dict[str, Any]:
        if not collators:
            return {}
        if set(collators) == set(names):
            return collators
        if len(collators) == 1:
            only = next(iter(collators.values()))
            return {name: only for name in names}
        raise ODMConfigError(
            f"{key}: cannot map collators {sorted(collators)} onto the auto-categorised "
            f"categories {names}; give one collator, or one per category"
        )

    def _setup_categories(self) -> None:
        self.category_list = sorted(self.dataset_dict)
        self.id2cat = dict(enumerate(self.category_list))
        self.cat2id = {c: i for i, c in enumerate(self.category_list)}
        self.total_categories = len(self.category_list)
        missing = [c for c in self.category_list if c not in self.collators_dict]
        if self.collators_dict and missing:
            raise ODMConfigError(
                f"collators_dict: no collator for categories {missing}; give one per category "
                "(None for rows the Trainer's collator takes as they are), or none"
            )
        self._streams = {
            c: CategoryStream(c, self.dataset_dict[c], self.collators_dict.get(c))
            for c in self.category_list
        }
        if self.eval_dataset_dict:
            # none at all may still come (the reference allowed it until the first update);
            # some but not all is a mistake now
            self.check_eval_sets()
        if self._initial_weights:
            missing = [c for c in self.category_list if c not in self._initial_weights]
            if missing:
                raise ODMConfigError(
                    f"sampling_weights: no weight for categories {missing}; give one per category"
                )
            raw = [
                _number(self._initial_weights[c], f"sampling_weights[{c!r}]")
                for c in self.category_list
            ]
            bad = [c for c, w in zip(self.category_list, raw) if w <= 0]
            if bad:
                raise ODMConfigError(f"sampling_weights: weights of {bad} must be > 0")
            log_weights = [math.log(w) for w in raw]
        else:
            log_weights = [0.0] * self.total_categories
        self._log_weights = [x - max(log_weights) for x in log_weights]
        self._updates = 0
        self.reward_state = RewardState(self.total_categories)
        self._last_rewards = [0.0] * self.total_categories
        self._last_counts = [0.0] * self.total_categories
        # (first sample index, ratio) for every ratio still needed to replay draws
        self._ratio_schedule: list[tuple[int, list[float]]] = [(0, self._current_ratio())]
        self.curr_cat_count = [0] * self.total_categories
        self.produced = 0
        self.arm_idx = 0
        self._consumed = 0
        self._current_epoch = 0
        self._log_header()

    def check_eval_sets(self) -> None:
        """Every category has evaluation rows, if the reward is computed on them."""
        if not self.reward_type.needs_eval_data:
            return
        for c in self.category_list:
            data = self.eval_dataset_dict.get(c)
            if data is None or sized_length(data) == 0:
                state = "is empty" if data is not None else "is missing"
                raise ODMConfigError(
                    f"eval_dataset_dict[{c!r}]: reward_type {self.reward_type.value} computes "
                    f"the reward of each category on its evaluation set, and that of {c!r} "
                    f"{state}; give every category evaluation rows (or use reward_type "
                    "train_loss or gradnorm)"
                )

    # --- the mixture --------------------------------------------------------------------------

    def _current_ratio(self) -> list[float]:
        rate = bandit.exploration_rate(
            self.exploration, self.gamma, self.total_categories, self._updates
        )
        return bandit.mixing_ratio(self._log_weights, rate)

    @property
    def sampling_ratio(self) -> list[float]:
        """The mixture the latest weights give (what the next draws use)."""
        return list(self._ratio_schedule[-1][1])

    @property
    def sampling_weights(self) -> torch.Tensor:
        """The bandit's weights, scaled so that the largest is 1."""
        return torch.tensor(bandit.normalised_weights(self._log_weights), dtype=torch.float64)

    def _ratio_at(self, index: int) -> list[float]:
        chosen = self._ratio_schedule[0][1]
        for start, ratio in self._ratio_schedule:
            if start > index:
                break
            chosen = ratio
        return chosen

    def _arm_of(self, index: int) -> int:
        """The category of sample `index` (replayed from the seed and the ratio schedule)."""
        block = index // self.sampling_interval
        start = block * self.sampling_interval
        return bandit.draw(self._ratio_at(start), _uniform(self.seed, block))

    def __iter__(self) -> OnlineMixingDataset:
        return self

    def __next__(self) -> Any:
        if self.needs_model_for_categories:
            raise ODMConfigError(
                "OnlineMixingDataset: the single dataset is not split into categories yet: "
                "call categorize(model) first (the ODM plugin does at the start of training), "
                "or give auto_categorize_config a local sentence-transformers model_name"
            )
        index = self.produced
        self.arm_idx = self._arm_of(index)
        category = self.id2cat[self.arm_idx]
        sample, position = self._streams[category].next()
        self.curr_cat_count[self.arm_idx] += 1
        self.produced += 1
        self.log_to_file(
            {
                "arm_idx": self.arm_idx,
                "samples_produced_so_far": self.produced,
                "category_level_counts_so_far": self.curr_cat_count,
                "sample_index": position,
                "action": "sample",
            }
        )
        return sample

    def set_epoch(self, epoch: int) -> None:
        """Recorded only: the stream is one endless sequence keyed by sample index."""
        self._current_epoch = int(epoch)

    # --- updates ------------------------------------------------------------------------------

    def _update_weights(self, count: Any, rewards: Any) -> list[float]:
        """Apply one EXP3 update from per-category reward sums and counts; return the ratio.

        It takes effect from the next sample drawn.
        """
        count = [float(x) for x in (count.tolist() if hasattr(count, "tolist") else count)]
        rewards = [float(x) for x in (rewards.tolist() if hasattr(rewards, "tolist") else rewards)]
        self._log_weights = bandit.exp3_update(
            self._log_weights, self.sampling_ratio, rewards, count, self.eta
        )
        self._updates += 1
        self._last_rewards, self._last_counts = rewards, count
        self._ratio_schedule.append((self.produced, self._current_ratio()))
        return self.sampling_ratio

    def mark_consumed(self, consumed: int) -> None:
        """The Trainer has consumed the first `consumed` samples: forget what only the draws
        before them needed."""
        self._consumed = min(int(consumed), self.produced)
        keep_from = self._consumed - self._consumed % self.sampling_interval
        while len(self._ratio_schedule) > 1 and self._ratio_schedule[1][0] <= keep_from:
            self._ratio_schedule.pop(0)

    def last_consumed_category(self) -> int:
        """The category of the last sample the Trainer consumed (else of the last drawn)."""
        if self._consumed > 0:
            return self._arm_of(self._consumed - 1)
        return self.arm_idx

    def _reward_histories(self, state: Any, category: str) -> dict[str, Any]:
        """The Trainer log entries a reward reads (the reference's extraction)."""
        if state is None or self.reward_type.logged_key is None:
            return {}
        history = [d for d in getattr(state, "log_history", []) if self.reward_type.logged_key in d]
        key = "train_loss_history" if self.reward_type is Reward.TRAIN_LOSS else "gradnorm_history"
        return {key: history}

    def _eval_batches(self, category: str, rank: int, world: int):
        data = self.eval_dataset_dict[category]
        collator = self.eval_collators_dict.get(category) or torch.utils.data.default_collate
        length = sized_length(data)
        rows = (
            (data[i] for i in range(rank, length, world))
            if length is not None
            else (row for i, row in enumerate(data) if i % world == rank)
        )
        chunk: list[Any] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == self.eval_batch_size:
                yield collator(chunk)
                chunk = []
        if chunk:
            yield collator(chunk)

    def update_sampling_weights(
        self, model: Any, accelerator: Any = None, state: Any = None
    ) -> None:
        """Compute every category's reward, sum it over processes, update the weights.

        Entropy and validation-loss rewards run `model` (in eval mode, without gradients) on
        this process's share of each category's evaluation set; train-loss and gradnorm
        rewards read the Trainer's `state.log_history`.
        """
        self.check_eval_sets()
        rank, world = _distributed()
        parameter = next(iter(model.parameters()), None) if model is not None else None
        device = parameter.device if parameter is not None else torch.device("cpu")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        rewards = [0.0] * self.total_categories
        counts = [0.0] * self.total_categories
        was_training = bool(getattr(model, "training", False))
        if model is not None and self.reward_type.needs_eval_data:
            model.eval()
        try:
            for c, category in self.id2cat.items():
                if self.reward_type.needs_eval_data:
                    for batch in self._eval_batches(category, rank, world):
                        batch = {k: v.to(device) for k, v in batch.items() if hasattr(v, "to")}
                        rewards[c] += compute_reward(
                            model,
                            batch,
                            vocab,
                            self.reward_type,
                            total_categories=self.total_categories,
                            current_category=c,
                        )
                        counts[c] += int(batch["input_ids"].shape[0])
                else:
                    rewards[c] += compute_reward(
                        model,
                        None,
                        vocab,
                        self.reward_type,
                        last_sampled_category=self.last_consumed_category(),
                        total_categories=self.total_categories,
                        current_category=c,
                        reward_state=self.reward_state,
                        **self._reward_histories(state, category),
                    )
                    counts[c] += 1
        finally:
            if model is not None:
                model.train(was_training)
        rewards, counts = _sum_over_processes(rewards, counts, device)
        if self.reward_type is Reward.VALIDATION_LOSS:
            self.reward_state.validation_loss = [
                r / n if n else v
                for r, n, v in zip(rewards, counts, self.reward_state.validation_loss)
            ]
        self._update_weights(counts, rewards)
        self._log_weights = _same_on_all_ranks(self._log_weights)
        self._ratio_schedule[-1] = (self._ratio_schedule[-1][0], self._current_ratio())
        self.log_to_file(
            {
                "current_sampling_weights": self.sampling_weights.tolist(),
                "current_sampling_ratio": self.sampling_ratio,
                "rewards": rewards,
                "count": counts,
                "action": "update",
                "step": getattr(state, "global_step", None),
            }
        )

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the mixer knows, at the current draw position (JSON-serialisable)."""
        return self.state_dict_at(self.produced)

    def state_dict_at(self, consumed: int) -> dict[str, Any]:
        """The state as it was before sample `consumed` was drawn, with the weight updates made
        since then scheduled at the samples where they took effect."""
        if (
            not self._consumed - self._consumed % self.sampling_interval
            <= consumed
            <= self.produced
        ):
            raise ODMConfigError(
                f"state_dict_at({consumed}): only positions from the last consumed sample "
                f"({self._consumed}) to the last drawn one ({self.produced}) can be saved"
            )
        counts = list(self.curr_cat_count)
        taken = {c: s.taken for c, s in self._streams.items()}
        for index in range(consumed, self.produced):
            arm = self._arm_of(index)
            counts[arm] -= 1
            taken[self.id2cat[arm]] -= 1
        block_start = consumed - consumed % self.sampling_interval
        schedule = [(s, r) for s, r in self._ratio_schedule if s > block_start]
        schedule.insert(0, (block_start, self._ratio_at(block_start)))
        return {
            "version": STATE_VERSION,
            "categories": list(self.category_list),
            "seed": self.seed,
            "sampling_interval": self.sampling_interval,
            "gamma": self.gamma,
            "eta": self.eta,
            "exploration": self.exploration,
            "reward_type": self.reward_type.value,
            "produced": consumed,
            "arm_idx": self._arm_of(consumed - 1) if consumed > 0 else 0,
            "curr_cat_count": counts,
            "taken": taken,
            "pass_lengths": {c: s.pass_length for c, s in self._streams.items()},
            "log_weights": list(self._log_weights),
            "updates": self._updates,
            "ratio_schedule": [[s, list(r)] for s, r in schedule],
            "last_rewards": list(self._last_rewards),
            "last_counts": list(self._last_counts),
            "reward_state": self.reward_state.state_dict(),
            "epoch": self._current_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict` / `state_dict_at` result."""
        if self.needs_model_for_categories:
            raise ODMConfigError(
                "load_state_dict: categorize() the dataset before restoring its state"
            )
        if state.get("version") != STATE_VERSION:
            raise ODMConfigError(
                f"odm state: version {state.get('version')!r} is not {STATE_VERSION} (saved by "
                "another fms-acceleration-odm)"
            )
        if list(state["categories"]) != self.category_list:
            raise ODMConfigError(
                f"odm state: its categories {list(state['categories'])} differ from this "
                f"dataset's {self.category_list}"
            )
        self.seed = int(state["seed"])
        self.sampling_interval = int(state["sampling_interval"])
        self.gamma, self.eta = float(state["gamma"]), float(state["eta"])
        self.exploration = state["exploration"]
        self.reward_type = Reward.parse(state["reward_type"])
        self.produced = int(state["produced"])
        self._consumed = self.produced
        self.arm_idx = int(state["arm_idx"])
        self.curr_cat_count = [int(x) for x in state["curr_cat_count"]]
        for c, stream in self._streams.items():
            stream.restore(int(state["taken"][c]), state["pass_lengths"].get(c))
        self._log_weights = [float(x) for x in state["log_weights"]]
        self._updates = int(state["updates"])
        self._ratio_schedule = [(int(s), [float(x) for x in r]) for s, r in state["ratio_schedule"]]
        self._last_rewards = [float(x) for x in state["last_rewards"]]
        self._last_counts = [float(x) for x in state["last_counts"]]
        self.reward_state.load_state_dict(state["reward_state"])
        self._current_epoch = int(state["epoch"])

    # --- the log ------------------------------------------------------------------------------

    @property
    def log_file_path(self) -> str:
        """odm.jsonl in output_dir (process 0); odm_rank_N.jsonl for process N."""
        name = LOG_FILE if self.rank == "0" else f"odm_rank_{self.rank}.jsonl"
        return os.path.join(self.output_dir, name)

    def _log_header(self) -> None:
        self.log: dict[str, Any] = {
            "samples_produced_so_far": 0,
            "sampling_interval": self.sampling_interval,
            "total_categories": self.total_categories,
            "categories": self.category_list,
            "current_sampling_weights": self.sampling_weights.tolist(),
            "current_sampling_ratio": self.sampling_ratio,
            "arm_idx": self.arm_idx,
            "category_level_counts_so_far": self.curr_cat_count,
            "rewards": [0.0] * self.total_categories,
            "count": 0,
            "action": "",
            "rank": self.rank,
        }

    def log_to_file(self, data: Mapping[str, Any]) -> None:
        """Append the log record, updated with `data`, as one JSON line."""
        self.log.update(data)
        Path(self.output_dir).mkdir(parents=True, exist_ok=True)
        with open(self.log_file_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(self.log) + "\n")


def _sum_over_processes(
    rewards: list[float], counts: list[float], device: torch.device
) -> tuple[list[float], list[float]]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rewards, counts
    if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    values = torch.tensor(rewards + counts, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    k = len(rewards)
    out = values.cpu().tolist()
    return out[:k], out[k:]


def _same_on_all_ranks(values: Any) -> Any:
    """Process 0's values on every process (a no-op outside torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    import numpy as np

    as_list = np.asarray(values).tolist()
    box: list[Any] = [as_list]
    torch.distributed.broadcast_object_list(box, src=0)
    return np.asarray(box[0]) if isinstance(values, np.ndarray) else box[0]
