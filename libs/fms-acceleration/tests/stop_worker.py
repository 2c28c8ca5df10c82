"""Worker for test_batch_hooks.py (run by torchrun, gloo): a stop asked on rank 1 only."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

from fms_acceleration import AccelerationPlugin, StanzaModel
from fms_acceleration.compat import dtype_kwargs
from fms_acceleration.framework_plugin import isolated_registrations
from fms_acceleration.testing import build_framework, tiny_dataset


class NoOptions(StanzaModel):
    pass


class StopOnRankOne(AccelerationPlugin):
    def __init__(self, configurations):
        super().__init__(configurations)
        self.asked: list[int] = []

    def should_training_stop(self, state):
        self.asked.append(state.global_step)
        return dist.get_rank() == 1 and state.global_step >= 2


def main(model_dir: str, out: str) -> None:
    with isolated_registrations():
        AccelerationPlugin.register_plugin(
            StopOnRankOne,
            configuration_and_paths=["training.stop_on_rank_one"],
            plugin_id="stop_on_rank_one",
            schemas={"training.stop_on_rank_one": NoOptions},
        )
        framework = build_framework(
            {"plugins": {"training": {"stop_on_rank_one": {}}}}, [StopOnRankOne]
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwargs(torch.float32))
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=6, per_device_train_batch_size=2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=tiny_dataset(n=32, seq_len=8),
        data_collator=default_data_collator,
    )  # fmt: skip
    for callback in framework.get_callbacks_and_ready_for_train(
        model, trainer.accelerator, trainer=trainer
    ):
        trainer.add_callback(callback)
    trainer.train()
    rank = dist.get_rank()
    result = {
        "global_step": trainer.state.global_step,
        "asked": framework.plugins["stop_on_rank_one"].asked,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()
