"""Worker for test_ddp.py (run by torchrun): FTS under DDP on CPU/gloo, synced and unsynced."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from conftest import SCHEDULE, run_fts, train_args


def replica_spread(model: torch.nn.Module) -> dict[str, float]:
    """Largest difference between the two ranks' copies of each parameter."""
    spread = {}
    for name, p in model.named_parameters():
        gathered = [torch.empty_like(p.data) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, p.data.contiguous())
        spread[name] = max((g - gathered[0]).abs().max().item() for g in gathered)
    return spread


def main(out: str) -> None:
    results = {}
    for label, sync in (("synced", True), ("unsynced", False)):
        run_dir = os.path.join(out, label)
        stanza = {"ft_schedule": SCHEDULE, "strategy_adapter_cfg": {"sync_thawed_grads": sync}}
        args = train_args(
            run_dir,
            num_train_epochs=3,
            save_strategy="no",
            eval_strategy="no",
            per_device_train_batch_size=2,
        )
        trainer, plugin, recorder = run_fts(run_dir, stanza, args=args)
        results[label] = {
            "adapter": type(plugin.adapter).__name__,
            "depths": [r["depth"] for r in recorder.rows],
            "spread": replica_spread(trainer.model),
            "world": dist.get_world_size(),
        }
    if dist.get_rank() == 0:
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main(sys.argv[1])
    # Exiting with gloo process groups alive (the DDP adapter adds one) can abort the process in
    # teardown ("terminate called without an active exception"): shut them down explicitly.
    dist.barrier()
    dist.destroy_process_group()
