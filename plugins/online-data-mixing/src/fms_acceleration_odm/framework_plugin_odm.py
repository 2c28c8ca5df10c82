"""The online-data-mixing plugin: stanza `training.odm.odm`, and the callback that drives the
mixer from the Trainer (weight updates, checkpoints, resume, the plot).

The reference forced `eval_steps=1`, replaced `Trainer._evaluate`, `_get_dataloader`,
`get_train_dataloader` and accelerate's `skip_first_batches`; everything here goes through a
TrainerCallback and one documented TrainingArguments field (`ignore_data_skip`, because the
mixer restores its own position on resume).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field
from transformers import TrainerCallback

from fms_acceleration import AccelerationPlugin, StanzaModel, choice

from .errors import ODMConfigError
from .odm.bandit import EXPLORATION_SCHEDULES
from .odm.dataset import LOG_FILE, OnlineMixingDataset
from .odm.reward import Reward
from .plot import PLOT_FILE, plot_sampling_weights

logger = logging.getLogger(__name__)

ODM_PATH = "training.odm.odm"
STATE_FILE = "odm_state.json"


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _digits_as_int(value: Any) -> Any:
    # the client's data config may write `auto_categorize_num_categories: "3"`
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


class ODMOptions(StanzaModel):
    """The `training.odm.odm` stanza (the reference's keys, the client's, and `exploration`)."""

    update_interval: Annotated[int, Field(ge=1)] | None = 1
    """update the sampling weights every N optimizer steps (null: 1)"""
    sampling_interval: Annotated[int, Field(ge=1)] = 1
    """draw a category for every N samples"""
    reward_type: Annotated[choice(*(r.value for r in Reward)), BeforeValidator(_lower)] = "entropy"
    """what rewards a category (any letter case)"""
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    """uniform share of the mixture (0 < gamma <= 1)"""
    eta: Annotated[float, Field(gt=0.0)] = 0.3
    """step size of the weight updates (> 0)"""
    resume_from_checkpoint: bool | str = False
    """a checkpoint folder to restore the mixer from (else checkpoint-<step> in output_dir)"""
    exploration: choice(*EXPLORATION_SCHEDULES) = "constant"
    """constant gamma, or the paper's decaying schedule min(1, sqrt(K ln K / t))"""
    auto_categorize_input_column: str | None = None
    """the column clustered when one dataset is split into categories"""
    auto_categorize_num_categories: Annotated[
        Annotated[int, Field(ge=1)] | None, BeforeValidator(_digits_as_int)
    ] = None
    """number of categories (default: sqrt(rows) within 2..15)"""
    auto_categorize_model_name: str | None = None
    """a local sentence-transformers model (else the trained model's hidden states)"""
    auto_categorize_batch_size: Annotated[int, Field(ge=1)] = 64
    """rows embedded per batch"""

    @property
    def interval(self) -> int:
        """update_interval with null read as 1."""
        return self.update_interval or 1

    def dataset_kwargs(self) -> dict[str, Any]:
        """OnlineMixingDataset keyword arguments these options set."""
        kwargs: dict[str, Any] = dict(
            gamma=self.gamma,
            eta=self.eta,
            sampling_interval=self.sampling_interval,
            reward_type=self.reward_type,
            exploration=self.exploration,
        )
        if self.auto_categorize_input_column:
            config: dict[str, Any] = {
                "input_column": self.auto_categorize_input_column,
                "num_categories": self.auto_categorize_num_categories,
                "batch_size": self.auto_categorize_batch_size,
            }
            if self.auto_categorize_model_name:
                config["model_name"] = self.auto_categorize_model_name
            kwargs["auto_categorize_config"] = config
        return kwargs


def find_mixer(obj: Any, depth: int = 5) -> OnlineMixingDataset | None:
    """The OnlineMixingDataset under a (prepared) dataloader or dataset wrapper, if any."""
    frontier = [obj]
    for _ in range(depth):
        found = []
        for item in frontier:
            if isinstance(item, OnlineMixingDataset):
                return item
            for attribute in ("dataset", "base_dataloader", "_dataset"):
                child = getattr(item, attribute, None)
                if child is not None and child is not item:
                    found.append(child)
        frontier = found
    return None


def samples_per_step(args: Any) -> int:
    """Samples of the common stream one optimizer step consumes over all processes."""
    return (
        args.per_device_train_batch_size
        * max(1, getattr(args, "n_gpu", 1))
        * args.gradient_accumulation_steps
        * max(1, args.world_size)
    )


class OnlineDataMixingCallback(TrainerCallback):
    """Updates the mixer's weights, saves and restores its state, draws the plot."""

    def __init__(self, options: ODMOptions) -> None:
        self.options = options
        self.mixer: OnlineMixingDataset | None = None
        self._updated_at = -1
        self._warned_unlogged = False
        self.artifacts: dict[str, str] = {}

    # --- start ---------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        mixer = find_mixer(train_dataloader)
        if mixer is None:
            raise ODMConfigError(
                f"plugins.{ODM_PATH} is set, but the Trainer's training data is "
                f"{type(getattr(train_dataloader, 'dataset', train_dataloader)).__name__}, not "
                "an OnlineMixingDataset: build one (fms_acceleration_odm.OnlineMixingDataset) "
                "and pass it as train_dataset"
            )
        self.mixer = mixer
        if mixer.needs_model_for_categories:
            mixer.categorize(model, kwargs.get("processing_class"))
        mixer.check_eval_sets()
        if "exploration" in self.options.model_fields_set:
            mixer.exploration = self.options.exploration
        if state.global_step > 0:
            self._restore(args, state)

    def _checkpoint_dir(self, args: Any, step: int) -> Path:
        given = self.options.resume_from_checkpoint
        if isinstance(given, str) and given:
            return Path(given)
        return Path(args.output_dir) / f"checkpoint-{step}"

    def _restore(self, args: Any, state: Any) -> None:
        if not args.ignore_data_skip:
            raise ODMConfigError(
                f"plugins.{ODM_PATH}: resuming needs TrainingArguments(ignore_data_skip=True): "
                "the mixer restores its own position, and skipping batches would draw again"
            )
        path = self._checkpoint_dir(args, state.global_step) / STATE_FILE
        if not path.is_file():
            raise ODMConfigError(
                f"plugins.{ODM_PATH}.resume_from_checkpoint: no {STATE_FILE} in {path.parent}, "
                f"where the mixer's state of step {state.global_step} should be; set "
                "resume_from_checkpoint to the checkpoint folder the Trainer resumes from"
            )
        assert self.mixer is not None
        self.mixer.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
        logger.info("online data mixing: restored the mixer from %s", path)

    # --- every step ----------------------------------------------------------------------------

    def _due(self, state: Any) -> bool:
        step = state.global_step
        return step > 0 and step % self.options.interval == 0 and step != self._updated_at

    def _update(self, model: Any, state: Any) -> None:
        assert self.mixer is not None
        self.mixer.update_sampling_weights(model, None, state)
        self._updated_at = state.global_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.mixer is None:
            return
        self.mixer.mark_consumed(state.global_step * samples_per_step(args))
        reward = Reward.parse(self.mixer.reward_type)
        if reward.logged_key is None and self._due(state):
            self._update(model, state)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self.mixer is None:
            return
        key = Reward.parse(self.mixer.reward_type).logged_key
        if key is None or not self._due(state):
            return
        if logs and key in logs:
            self._update(model, state)
        elif not self._warned_unlogged:
            self._warned_unlogged = True
            warnings.warn(
                f"plugins.{ODM_PATH}: reward {self.mixer.reward_type} reads the logged {key!r}, "
                f"and step {state.global_step} (an update step) logged none: updates happen "
                "only at steps that log it; make update_interval a multiple of logging_steps",
                stacklevel=2,
            )

    # --- checkpoints and the end ---------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        # process 0 draws for everyone when accelerate dispatches batches (the others' mixers
        # then never draw), and draws what every process draws otherwise: its state is the one
        if self.mixer is None or not state.is_world_process_zero:
            return
        saved = self.mixer.state_dict_at(state.global_step * samples_per_step(args))
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATE_FILE).write_text(json.dumps(saved), encoding="utf-8")

    def on_train_end(self, args, state, control, **kwargs):
        if self.mixer is None or not state.is_world_process_zero:
            return
        log = Path(self.mixer.log_file_path)
        self.artifacts["log"] = str(log)
        if log.is_file():
            png = plot_sampling_weights(log, Path(args.output_dir) / PLOT_FILE)
            if png is not None:
                self.artifacts["plot"] = str(png)


class OnlineDataMixingAccelerationPlugin(AccelerationPlugin):
    """Drives an OnlineMixingDataset training set from the Trainer (weights, checkpoints)."""

    # which samples each step sees is the mixer's choice: no other sampler may decide
    slots = frozenset({"sampler"})

    def __init__(self, configurations: dict[str, Any]) -> None:
        super().__init__(configurations)
        self.options = ODMOptions.model_validate(self.stanza(ODM_PATH) or {})
        self.callback = OnlineDataMixingCallback(self.options)

    @property
    def requires_augmentation(self) -> bool:
        return True

    def augmentation(self, model: Any, train_args: Any, modifiable_args: Any) -> tuple[Any, Any]:
        """Check the training arguments the mixer depends on; let it restore its own position."""
        workers = getattr(train_args, "dataloader_num_workers", 0)
        if workers:
            raise ODMConfigError(
                f"plugins.{ODM_PATH}: dataloader_num_workers={workers}: the mixer must draw in "
                "the training process, where its weights are updated; set it to 0"
            )
        # the mixer restores its own position on resume; skipping would draw those batches again
        train_args.ignore_data_skip = True
        return model, modifiable_args

    def get_callbacks_and_ready_for_train(self, model: Any = None, accelerator: Any = None) -> list:
        """The callback that drives the mixer."""
        return [self.callback]

    @property
    def artifacts(self) -> dict[str, str]:
        """Files written at the end of training: `log` (odm.jsonl) and `plot` (the PNG)."""
        return dict(self.callback.artifacts)


AccelerationPlugin.register_plugin(
    OnlineDataMixingAccelerationPlugin,
    configuration_and_paths=[ODM_PATH],
    plugin_id="odm",
    schemas={ODM_PATH: ODMOptions},
    package_name="fms-acceleration-odm",
)

__all__ = [
    "LOG_FILE",
    "ODM_PATH",
    "PLOT_FILE",
    "STATE_FILE",
    "ODMOptions",
    "OnlineDataMixingAccelerationPlugin",
    "OnlineDataMixingCallback",
    "find_mixer",
]
