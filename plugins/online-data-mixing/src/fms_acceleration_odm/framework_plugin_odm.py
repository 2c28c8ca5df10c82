"""The online-data-mixing plugin: stanza `training.odm.odm`, and the callback that drives the
mixer from the Trainer (weight updates, checkpoints, resume, the plot).

The reference forced `eval_steps=1`, replaced `Trainer._evaluate`, `_get_dataloader`,
`get_train_dataloader` and accelerate's `skip_first_batches`; everything here goes through a
TrainerCallback and one documented TrainingArguments field (`ignore_data_skip`, because the
mixer restores its own position on resume).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from fms_acceleration import AccelerationPlugin, StanzaModel, choice

from .errors import ODMConfigError
from .odm.bandit import EXPLORATION_SCHEDULES
from .odm.dataset import LOG_FILE
from .odm.reward import Reward

ODM_PATH = "training.odm.odm"


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


class OnlineDataMixingAccelerationPlugin(AccelerationPlugin):
    """Drives an OnlineMixingDataset training set from the Trainer (weights, checkpoints)."""

    # which samples each step sees is the mixer's choice: no other sampler may decide
    slots = frozenset({"sampler"})

    def __init__(self, configurations: dict[str, Any]) -> None:
        super().__init__(configurations)
        self.options = ODMOptions.model_validate(self.stanza(ODM_PATH) or {})
        from .callback import OnlineDataMixingCallback  # transformers' Trainer: only when used

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

__all__ = ["LOG_FILE", "ODM_PATH", "ODMOptions", "OnlineDataMixingAccelerationPlugin"]
