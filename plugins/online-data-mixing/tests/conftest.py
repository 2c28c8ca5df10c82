"""Shared helpers: categories of token rows, a padding collator, tiny models, Trainer runs."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fms_acceleration.testing import build_framework, tiny_model_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

VOCAB = 128


def category_rows(kind: str, n: int, seed: int, length: int = 12) -> list[dict[str, list[int]]]:
    """Rows of one kind: 'count' (ids count up), 'repeat' (one id repeated), 'random'."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(4, VOCAB, (1,), generator=generator))
        if kind == "count":
            ids = [4 + (start - 4 + i) % (VOCAB - 4) for i in range(length)]
        elif kind == "repeat":
            ids = [start] * length
        else:
            ids = torch.randint(4, VOCAB, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * length})
    return rows


def categories(n: int = 12, seed: int = 0) -> dict[str, list[dict[str, list[int]]]]:
    """Three categories of distinct difficulty."""
    return {
        kind: category_rows(kind, n, seed + i)
        for i, kind in enumerate(("count", "random", "repeat"))
    }


class PadCollator:
    """Right-pads rows (lists or tensors) to the longest; labels -100 on padding."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def as_list(value: Any) -> list[int]:
            return value.tolist() if isinstance(value, torch.Tensor) else list(value)

        width = max(len(as_list(r["input_ids"])) for r in rows)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for r in rows:
            ids = as_list(r["input_ids"])
            labels = as_list(r.get("labels", ids))
            pad = width - len(ids)
            out["input_ids"].append(ids + [1] * pad)
            out["labels"].append(labels + [-100] * pad)
            out["attention_mask"].append([1] * len(ids) + [0] * pad)
        return {k: torch.tensor(v) for k, v in out.items()}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A seeded fp32 tiny Llama (vocab 128)."""
    from transformers import AutoModelForCausalLM

    config = tiny_model_config("llama")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()


def train_args(output_dir: Any, **overrides: Any):
    """Seeded CPU TrainingArguments for short runs."""
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**defaults, **overrides})


def odm_framework(**options: Any):
    """A framework over the ODM plugin alone, from stanza options."""
    from fms_acceleration_odm import OnlineDataMixingAccelerationPlugin

    return build_framework(
        {"plugins": {"training": {"odm": {"odm": options}}}},
        [OnlineDataMixingAccelerationPlugin],
    )


def train(
    output_dir: Any,
    mixer: Any,
    framework: Any,
    model_seed: int = 0,
    resume: Any = None,
    model: Any = None,
    **overrides: Any,
):
    """Train a tiny model (or `model`) on `mixer` through the framework; return the Trainer."""
    from transformers import Trainer

    model = model if model is not None else tiny_model(model_seed)
    args = train_args(output_dir, **overrides)
    model, _ = framework.augmentation(model, args, modifiable_args=(None,))
    trainer = Trainer(model=model, args=args, train_dataset=mixer, data_collator=PadCollator())
    for callback in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="session")
def h() -> SimpleNamespace:
    """The helpers of this module, for test files."""
    return SimpleNamespace(
        VOCAB=VOCAB,
        category_rows=category_rows,
        categories=categories,
        PadCollator=PadCollator,
        tiny_model=tiny_model,
        train_args=train_args,
        odm_framework=odm_framework,
        train=train,
    )
