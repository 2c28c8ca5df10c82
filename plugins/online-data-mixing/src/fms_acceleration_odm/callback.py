"""The TrainerCallback that drives the mixer from the Trainer: weight updates, checkpoints,
resume, the plot. Its own module so that discovering the plugin does not import transformers'
Trainer (and, through it, peft and bitsandbytes)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .errors import ODMConfigError
from .framework_plugin_odm import ODM_PATH, ODMOptions
from .odm.dataset import OnlineMixingDataset
from .odm.reward import Reward
from .plot import PLOT_FILE, plot_sampling_weights

logger = logging.getLogger(__name__)

STATE_FILE = "odm_state.json"


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
