"""Shared helpers: variable-length rows, padded and flattened batches, frameworks, tiny models."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fms_acceleration.testing import build_framework, tiny_model_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

PADDING_FREE = {"training": {"attention": {"padding_free": {"method": "huggingface"}}}}
MULTIPACK = {
    "training": {
        "attention": {"padding_free": {"method": "huggingface"}},
        "dataloader": {"multipack": {"num_processes": 2}},
    }
}
PAD_ID = 1


def make_rows(lengths: list[int], seed: int = 0, prompt: int = 2) -> list[dict[str, list[int]]]:
    """Tokenized rows of the given lengths; labels -100 on the first `prompt` tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(4, 128, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def padded_batch(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (the plain-PyTorch reference batch)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = (
            torch.tensor(r["input_ids"]),
            1,
            torch.tensor(r["labels"]),
        )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_causal_lm(arch: str = "llama", attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A seeded fp32 tiny model of `arch` with the given attention implementation."""
    from transformers import AutoModelForCausalLM

    config = tiny_model_config(arch)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()


def train_args(output_dir: Any, **overrides: Any):
    """Seeded CPU TrainingArguments for short runs (no checkpoints, no reports)."""
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**defaults, **overrides})


def framework_for(config: dict[str, Any]):
    """A framework over this package's two plugins (no entry-point discovery)."""
    from fms_acceleration_aadp import (
        MultipackDataloaderAccelerationPlugin,
        PaddingFreeAccelerationPlugin,
    )

    return build_framework(
        {"plugins": config},
        [PaddingFreeAccelerationPlugin, MultipackDataloaderAccelerationPlugin],
    )


class RecordedRows(list):
    """A list dataset that records the indices a dataloader reads."""

    def __init__(self, rows: list) -> None:
        super().__init__(rows)
        self.read: list[int] = []

    def __getitem__(self, index):
        self.read.append(index)
        return super().__getitem__(index)


@pytest.fixture(scope="session")
def h() -> SimpleNamespace:
    """The helpers of this module, for test files (conftest cannot be imported by name)."""
    return SimpleNamespace(
        PADDING_FREE=PADDING_FREE,
        MULTIPACK=MULTIPACK,
        make_rows=make_rows,
        padded_batch=padded_batch,
        tiny_causal_lm=tiny_causal_lm,
        framework_for=framework_for,
        RecordedRows=RecordedRows,
        train_args=train_args,
    )


@pytest.fixture()
def padding_free():
    """A padding-free framework whose patches are undone after the test."""
    framework = framework_for(PADDING_FREE)
    yield framework
    framework.undo_patches()
