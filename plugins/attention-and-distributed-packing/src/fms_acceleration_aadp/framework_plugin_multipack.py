"""The multipack plugin: the training dataloader samples token-balanced steps per process."""

from __future__ import annotations

from collections.abc import Callable
from statistics import fmean
from typing import Annotated, Any

from pydantic import Field
from torch.utils.data import DataLoader, SequentialSampler

from fms_acceleration import (
    AccelerationPlugin,
    AccelerationPluginConfigError,
    AcceleratorPatcherComponent,
    Requirement,
    StanzaModel,
)

from .framework_plugin_padding_free import PADDING_FREE_PATH, PaddingFreeOptions
from .multipack import MultipackBatchSampler, MultipackDataLoader, token_lengths

MULTIPACK_PATH = "training.dataloader.multipack"


class MultipackOptions(StanzaModel):
    """The `training.dataloader.multipack` stanza."""

    num_processes: Annotated[int, Field(ge=1)] = 1
    """processes that measure the examples' token lengths (datasets.Dataset only)"""


class MultipackDataloaderAccelerationPlugin(AccelerationPlugin):
    """Replaces the training dataloader's sampler with a multipack batch sampler."""

    slots = frozenset({"dataloader", "sampler"})

    def __init__(self, configurations: dict[str, Any]):
        super().__init__(configurations)
        self.num_processes = self.stanza(MULTIPACK_PATH)["num_processes"]

    @property
    def requires_augmentation(self) -> bool:
        return True

    def requirements(self) -> list[Requirement]:
        """Steps of variable example counts only make sense as padding-free rows."""
        return [
            Requirement(
                slot="data_collator",
                providers=("padding_free",),
                reason=f"plugins.{MULTIPACK_PATH} packs examples into padding-free rows",
            )
        ]

    def augmentation(self, model: Any, train_args: Any, modifiable_args: tuple):
        """Register the dataloader replacement (made when the Trainer prepares its loader)."""
        # transformers 5 names the sampler train_sampling_strategy; 4.x has group_by_length
        strategy = getattr(train_args, "train_sampling_strategy", "random")
        asked = (
            f"train_sampling_strategy={strategy!r} asks for another one (use 'random')"
            if strategy != "random"
            else "group_by_length=True asks for another one (set it to False)"
            if getattr(train_args, "group_by_length", False)
            else None
        )
        if asked is not None:
            raise AccelerationPluginConfigError(
                f"plugins.{MULTIPACK_PATH}: multipack replaces the training sampler; {asked}"
            )
        data_seed = getattr(train_args, "data_seed", None)
        seed = getattr(train_args, "seed", 42) if data_seed is None else data_seed
        self.accelerator_patcher.replace(
            "multipack-dataloader",
            AcceleratorPatcherComponent.data_loader,
            replacement_builder=self._builder(int(seed)),
            skip_prepare=True,
        )
        return model, modifiable_args

    def _builder(self, seed: int) -> Callable[[DataLoader, Any], DataLoader]:
        num_processes = self.num_processes

        def build(loader: DataLoader, accelerator: Any) -> DataLoader:
            if isinstance(loader.sampler, SequentialSampler):
                # an evaluation or prediction loader: ordered, left to accelerate
                return type(accelerator).prepare(accelerator, loader)
            lengths = token_lengths(loader.dataset, num_processes)
            sampler = MultipackBatchSampler(
                lengths,
                num_replicas=accelerator.num_processes,
                rank=accelerator.process_index,
                tokens_per_rank=(loader.batch_size or 1) * fmean(lengths),
                seed=seed,
            )
            return MultipackDataLoader(
                loader.dataset,
                batch_sampler=sampler,
                collate_fn=loader.collate_fn,
                num_workers=loader.num_workers,
                pin_memory=loader.pin_memory,
                worker_init_fn=loader.worker_init_fn,
            )

        return build


AccelerationPlugin.register_plugin(
    MultipackDataloaderAccelerationPlugin,
    # as in the reference, multipack is active only together with padding-free
    configuration_and_paths=[MULTIPACK_PATH, PADDING_FREE_PATH],
    plugin_id="multipack",
    schemas={MULTIPACK_PATH: MultipackOptions, PADDING_FREE_PATH: PaddingFreeOptions},
    package_name="fms-acceleration-aadp",
)
