"""Worker for test_ddp.py (run by torchrun, 2 processes, gloo): multipack + padding-free under
DDP through the Trainer; records which examples and how many tokens each process trained on."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import Trainer

sys.path.insert(0, os.path.dirname(__file__))
from conftest import (
    MULTIPACK,
    RecordedRows,
    framework_for,
    make_rows,
    padded_batch,
    tiny_causal_lm,
    train_args,
)

LENGTHS = [3 + (11 * i) % 37 for i in range(64)]  # 3..39 tokens


def main(out: str) -> None:
    rows = RecordedRows(make_rows(LENGTHS, seed=9))
    framework = framework_for(MULTIPACK)
    args = train_args(out, num_train_epochs=1, seed=3, ddp_backend="gloo")
    model, _ = framework.augmentation(tiny_causal_lm(), args, (None,))
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=padded_batch)
    seen_tokens: list[int] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen_tokens.append(int(kwargs["input_ids"].numel())),
        with_kwargs=True,
    )
    for callback in framework.get_callbacks_and_ready_for_train(
        model, trainer.accelerator, trainer=trainer
    ):
        trainer.add_callback(callback)
    trainer.train()
    mine = {
        "rank": dist.get_rank(),
        # each process first reads every example once, in order, to measure its length
        "measured": rows.read[: len(rows)],
        "read": rows.read[len(rows) :],
        "tokens": seen_tokens,
        "steps": trainer.state.global_step,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "weights": float(sum(p.detach().sum() for p in model.parameters())),
    }
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump({"lengths": LENGTHS, "ranks": gathered}, fh)
    framework.undo_patches()


if __name__ == "__main__":
    main(sys.argv[1])
    # exiting with the gloo group alive can abort in teardown: shut it down explicitly
    dist.barrier()
    dist.destroy_process_group()
    del torch
