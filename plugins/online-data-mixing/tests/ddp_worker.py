"""One of two torchrun processes (gloo, CPU): train a tiny model on a mixer through the ODM
plugin; each process's log lands in OUTPUT_DIR (odm.jsonl, odm_rank_1.jsonl)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import PadCollator, categories, odm_framework, train

from fms_acceleration_odm import OnlineMixingDataset


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    evals = categories(n=5, seed=40)
    mixer = OnlineMixingDataset(
        categories(n=9),
        None,
        evals,
        {c: PadCollator() for c in evals},
        gamma=0.1,
        eta=3.0,
        reward_type="validation_loss",
        output_dir=output_dir,
        eval_batch_size=2,
    )
    framework = odm_framework(update_interval=1, reward_type="validation_loss")
    trainer = train(
        output_dir,
        mixer,
        framework,
        max_steps=5,
        per_device_train_batch_size=2,
        accelerator_config={"dispatch_batches": False},
    )
    rank = torch.distributed.get_rank()
    result = {
        "rank": rank,
        "world": torch.distributed.get_world_size(),
        "steps": trainer.state.global_step,
        "ratio": mixer.sampling_ratio,
        "validation_loss": mixer.reward_state.validation_loss,
    }
    Path(output_dir, f"result_{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
