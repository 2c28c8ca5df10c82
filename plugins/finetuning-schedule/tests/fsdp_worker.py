"""FTS under FSDP2 (torchrun, 2 processes, gloo, CPU) and its single-process references.

`python -m torch.distributed.run --nproc_per_node 2 fsdp_worker.py OUT` trains the tiny llama
with a 3-phase schedule (a new optimizer at phase 1, a new LR scheduler at phase 2) under FSDP2
and writes OUT/fsdp.json; `train(OUT, fsdp=False)` is the same run in one process, batch 4, and
`train(OUT, fsdp=False, grad_accum=2)` the same with two micro-batches of 2 per step. The rows
are read in order (no shuffling), so every run sees the same 4 rows per optimizer step.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_model

SCHEDULE = {
    0: {"params": ["lm_head.weight", "model.norm.weight"], "max_transition_step": 2},
    1: {
        "params": [r"model\.layers\.0\.mlp\..*"],
        "lr": 5e-3,
        "max_transition_step": 4,
        "new_optimizer": {
            "optimizer_init": {
                "class_path": "torch.optim.SGD",
                "init_args": {"lr": 2e-2, "momentum": 0.9},
            }
        },
    },
    2: {
        "params": [r"model\.layers\.0\.self_attn\..*"],
        "lr": 1e-2,
        "new_lr_scheduler": {
            "lr_scheduler_init": {
                "class_path": "torch.optim.lr_scheduler.StepLR",
                "init_args": {"step_size": 1, "gamma": 0.5},
            },
            "pl_lrs_cfg": {"interval": "step"},
        },
    },
}
STEPS = 6


class InOrder(Trainer):
    """Rows in dataset order: the 2-process and the 1-process runs see the same rows per step."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


class Lrs(TrainerCallback):
    """lr of every param group after each optimizer step (after the scheduler stepped)."""

    def __init__(self) -> None:
        self.rows: list[list[float]] = []

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        self.rows.append([g["lr"] for g in optimizer.param_groups])


def train(out: str, fsdp: bool, grad_accum: int = 1) -> dict:
    """Train the schedule (4 rows per optimizer step: 2 per rank under FSDP, 4 // grad_accum
    per micro-batch otherwise); return what the tests compare (rank 0's view under FSDP)."""
    from fms_acceleration.testing import build_framework, enable_fsdp_on_cpu, tiny_dataset
    from fms_acceleration_fts import FinetuningSchedulePlugin

    extra = {}
    if fsdp:
        extra = dict(
            fsdp="full_shard auto_wrap",
            # every rank builds the same seeded model, so nothing needs broadcasting; and
            # accelerate 1.9 refuses sync_module_states (transformers 4.55's default) without
            # a GPU
            fsdp_config={
                "version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "sync_module_states": False,
            },
            ddp_backend="gloo",
        )
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=2 if fsdp else 4 // grad_accum,
        gradient_accumulation_steps=grad_accum,
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        **extra,
    )
    stanza = {"ft_schedule": SCHEDULE, "epoch_transitions_only": False}
    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": stanza}}}, [FinetuningSchedulePlugin]
    )
    model = tiny_model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, _ = framework.augmentation(model, args, modifiable_args=())
    trainer = InOrder(model=model, args=args, train_dataset=tiny_dataset(n=4 * STEPS, seq_len=8))
    if fsdp:
        enable_fsdp_on_cpu(trainer)
    for cb in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
        trainer.add_callback(cb)
    lrs = Lrs()
    trainer.add_callback(lrs)
    trainer.train()
    fts = framework.plugins["finetuning_schedule"]
    final = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).float()
        for n, p in model.named_parameters()
    }
    optimizer = trainer.optimizer.optimizer
    return {
        "adapter": type(fts.adapter).__name__,
        "dtensors": sum(hasattr(p, "full_tensor") for p in model.parameters()),
        "transitions": [(t["depth"], t["global_step"]) for t in fts.callback.state.transitions],
        "optimizer": type(optimizer).__name__,
        "scheduler": type(trainer.lr_scheduler).__name__,
        "groups": [(g["fts_phase"], len(g["params"])) for g in optimizer.param_groups],
        "lrs": lrs.rows,
        "changed": {n: float((final[n] - initial[n]).abs().max()) for n in final},
        "final": {n: t.tolist() for n, t in final.items()},
    }


def main(out: str) -> None:
    import torch.distributed as dist

    result = train(os.path.join(out, "fsdp"), fsdp=True)
    flat = torch.tensor(
        [
            v
            for n in sorted(result["final"])
            for v in torch.tensor(result["final"][n]).flatten().tolist()
        ]
    )
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    result["rank_spread"] = float((gathered[0] - gathered[1]).abs().max())
    result["world"] = dist.get_world_size()
    if dist.get_rank() == 0:
        with open(os.path.join(out, "fsdp.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1])
    import torch.distributed as dist

    # gloo process groups alive at exit can abort the process in teardown: shut them down
    dist.barrier()
    dist.destroy_process_group()
