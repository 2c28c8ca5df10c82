"""Shared fixtures: tiny random-init checkpoints, LoRA configs and a short Trainer run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fms_acceleration.testing import save_tiny_model, tiny_dataset


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A saved random-init tiny llama (fp32) with its tokenizer."""
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", seed=0))


@pytest.fixture(scope="session")
def gptq_dir(tiny_llama_dir, tmp_path_factory) -> str:
    """The tiny llama quantized to 4 bits (group 32) by the module's command line."""
    output = tmp_path_factory.mktemp("gptq") / "tiny-gptq"
    calibration = tmp_path_factory.mktemp("calib") / "calib.txt"
    # tiny tokenizer words, so calibration activations are not all <unk>
    rows = [" ".join(f"tok{(s + i) % 120}" for i in range(24)) for s in range(0, 96, 6)]
    calibration.write_text("\n".join(rows), encoding="utf-8")
    command = [sys.executable, "-m", "fms_acceleration_peft.quantize", "--model", tiny_llama_dir]
    command += ["--output", str(output), "--bits", "4", "--group-size", "32"]
    command += ["--calibration", str(calibration)]
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1"}  # inductor is slow on shared CPUs
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(output)
    return str(output)


@pytest.fixture
def lora_config():
    """A LoRA config on the attention projections (r=8) for a causal LM."""
    from peft import LoraConfig

    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )


@pytest.fixture
def all_linear_lora_config():
    """LoRA (r=8) on every linear layer of the blocks: learns the tiny task in a few steps."""
    from peft import LoraConfig

    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        task_type="CAUSAL_LM",
    )


@pytest.fixture
def train_args(tmp_path):
    """A factory of CPU TrainingArguments for short seeded runs."""
    from transformers import TrainingArguments

    def make(**overrides):
        defaults = dict(
            output_dir=str(tmp_path / "out"),
            max_steps=12,
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        return TrainingArguments(**{**defaults, **overrides})

    return make


@pytest.fixture
def run_trainer():
    """Train `model` with `args` on one repeated batch of 8 rows; return the per-step losses."""
    from transformers import Trainer, default_data_collator

    def run(model, args, framework=None, n=8):
        torch.manual_seed(0)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=tiny_dataset(n=n, seq_len=16),
            data_collator=default_data_collator,
        )
        if framework is not None:
            for callback in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
                trainer.add_callback(callback)
        trainer.train()
        return [row["loss"] for row in trainer.state.log_history if "loss" in row]

    return run
