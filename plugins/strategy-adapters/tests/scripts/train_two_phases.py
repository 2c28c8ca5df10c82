"""Launched by torchrun (2 processes, gloo): FTS through the framework under DDP or FSDP2.

Trains a tiny llama with transformers.Trainer and the finetuning_schedule plugin, whose schedule
thaws a second phase mid-training; the plugin picks the strategy adapter from the accelerator.
Each rank sees different data, so a thawed parameter whose gradient is not averaged makes the
replicas diverge. Rank 0 writes a JSON report (cross-rank differences, what changed, depth).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from fms_acceleration.compat import dtype_kwargs
from fms_acceleration.testing import build_framework, enable_fsdp_on_cpu, tiny_dataset
from fms_acceleration_fts.framework_plugin_fts import FinetuningSchedulePlugin

PHASE0 = ["lm_head.weight", "model.norm.weight"]
PHASE1 = [
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.mlp.gate_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
]


def full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an FSDP2 DTensor is all-gathered: collective, same order on all ranks)."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategy", choices=("ddp", "fsdp2"), required=True)
    ap.add_argument("--bf16", action="store_true", help="mixed precision (bf16 compute)")
    ap.add_argument("--adapter-cfg", default="{}", help="JSON strategy_adapter_cfg")
    args = ap.parse_args()

    fsdp = {}
    if args.strategy == "fsdp2":
        fsdp = dict(
            fsdp="full_shard auto_wrap",
            # sync_module_states: accelerate 1.9 looks for a GPU to sync on (every rank
            # builds the same weights here)
            fsdp_config={
                "version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "sync_module_states": False,
            },
        )
    train_args = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        save_strategy="no",
        report_to=[],
        logging_steps=100,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        use_cpu=True,
        bf16=args.bf16,
        ddp_backend="gloo",
        **fsdp,
    )
    config = {
        "plugins": {
            "training": {
                "finetuning_schedule": {
                    "ft_schedule": {
                        0: {"params": PHASE0, "max_transition_step": 3},
                        1: {"params": PHASE1, "lr": 5e-3},
                    },
                    "base_max_lr": 5e-3,
                    "strategy_adapter_cfg": json.loads(args.adapter_cfg),
                }
            }
        }
    }
    framework = build_framework(config, [FinetuningSchedulePlugin])
    model = AutoModelForCausalLM.from_pretrained(args.model, **dtype_kwargs(torch.float32))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, _ = framework.augmentation(model, train_args, modifiable_args=())

    trainer = Trainer(model=model, args=train_args, train_dataset=tiny_dataset(n=64, seq_len=16))
    if args.strategy == "fsdp2":
        enable_fsdp_on_cpu(trainer)  # fms_acceleration.testing: accelerate's FSDP2 on CPU
    for cb in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
        trainer.add_callback(cb)
    trainer.train()

    fts = framework.plugins["finetuning_schedule"]
    adapter = fts.adapter
    names = [n for n, _ in adapter.named_parameters(model)]
    final = {n: full(p).float() for n, p in adapter.named_parameters(model)}
    flat = torch.cat([final[n].reshape(-1) for n in names])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        offsets, start = {}, 0
        for n in names:
            offsets[n] = (start, start + final[n].numel())
            start += final[n].numel()
        report = {
            "world_size": dist.get_world_size(),
            "adapter": type(adapter).__name__,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "depth": fts.callback.depth,
            "transitions": fts.callback.state.transitions,
            "thawed": fts.callback.thawed_names(),
            "synced_param_count": getattr(adapter, "synced_param_count", None),
            "dtensor_params": sum(hasattr(p, "full_tensor") for p in model.parameters()),
            "rank_max_abs_diff": {
                n: float((gathered[0][a:b] - gathered[1][a:b]).abs().max())
                for n, (a, b) in offsets.items()
            },
            "changed": {n: float((final[n] - initial[n]).abs().max()) for n in names},
        }
        with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
    # Exiting with gloo process groups alive (the DDP adapter adds one) can abort the process in
    # teardown ("terminate called without an active exception"): shut them down explicitly.
    dist.barrier()
    dist.destroy_process_group()
