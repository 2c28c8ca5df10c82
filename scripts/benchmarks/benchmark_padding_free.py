"""Padded vs padding-free training steps on SmolLM2-135M with the built-in dataset, by CPU time.

    python scripts/benchmarks/benchmark_padding_free.py
    python scripts/benchmarks/benchmark_padding_free.py \
        --output scripts/benchmarks/refs/padding_free_steps_cpu.csv

The train-job scenarios (run_benchmarks.py) report wall-clock tokens/s, which on a shared CPU
machine moves with whatever else runs there. This component benchmark times the same LoRA
training steps (forward, backward) of both variants alternately, batch by batch, in one process,
and reports process CPU time as well as wall time: CPU time is what padding-free saves, and it
is far less disturbed by other load. Batches are consecutive groups of `--batch-size` examples
of the shuffled built-in dataset (as the job's Trainer draws them); tokens are non-padding.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import os
import platform
import random
import sys
import time
from pathlib import Path

from fms_acceleration.compat import dtype_kwargs

COLUMNS = [
    "variant", "batches_timed", "batch_size", "tokens", "slots", "cpu_s", "wall_s",
    "tokens_per_cpu_s", "tokens_per_s", "speedup_cpu", "speedup_wall", "mean_loss", "device",
    "threads", "load_1min", "torch", "transformers", "fms-acceleration-aadp", "date",
]  # fmt: skip


def _versions() -> dict[str, str]:
    from fms_acceleration.packages import installed_version

    return {
        n: installed_version(n) or "" for n in ("torch", "transformers", "fms-acceleration-aadp")
    }


def measure(batches: int, batch_size: int, seed: int) -> list[dict[str, object]]:
    """Time padded and padding-free steps on the same batches; one row per variant."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fms_acceleration.testing import build_framework
    from fms_acceleration_aadp import PaddingFreeAccelerationPlugin
    from fms_acceleration_aadp.flattening import FlatteningCollator
    from fms_acceleration_train.data import PaddingCollator, pad_token_id, tokenize
    from fms_acceleration_train.default_dataset import default_splits
    from fms_acceleration_train.model_source import resolve_model

    model_dir, _ = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = tokenize(default_splits()[0], tokenizer, 128)
    random.Random(seed).shuffle(rows)
    groups = [rows[i : i + batch_size] for i in range(0, batch_size * (batches + 1), batch_size)]
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    base = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwargs(torch.float32))
    framework = build_framework(
        {"plugins": {"training": {"attention": {"padding_free": {"method": "huggingface"}}}}},
        [PaddingFreeAccelerationPlugin],
    )
    packed_model, _ = framework.augmentation(copy.deepcopy(base), None, (None,))
    flattening = FlatteningCollator(return_flash_attn_kwargs=True)
    variants = {
        "padded": (get_peft_model(base, lora), PaddingCollator(pad_token_id(tokenizer))),
        "padding-free": (get_peft_model(packed_model, lora), flattening),
    }
    totals = {name: {"cpu_s": 0.0, "wall_s": 0.0, "losses": []} for name in variants}
    for index, group in enumerate(groups):
        for name, (model, collate) in variants.items():
            batch = collate(group)
            batch["use_cache"] = False
            cpu, wall = time.process_time(), time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if index == 0:
                continue  # warm-up
            totals[name]["cpu_s"] += cpu
            totals[name]["wall_s"] += wall
            totals[name]["losses"].append(float(loss))
    framework.undo_patches()
    timed = groups[1:]
    tokens = sum(len(r["input_ids"]) for g in timed for r in g)
    slots = sum(len(g) * max(len(r["input_ids"]) for r in g) for g in timed)
    common = {
        "batches_timed": len(timed), "batch_size": batch_size, "tokens": tokens,
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(), "load_1min": round(os.getloadavg()[0], 1),
        **_versions(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip
    base_cpu, base_wall = totals["padded"]["cpu_s"], totals["padded"]["wall_s"]
    out = []
    for name, t in totals.items():
        out.append(
            {
                "variant": name,
                **common,
                "slots": slots if name == "padded" else tokens,
                "cpu_s": round(t["cpu_s"], 2),
                "wall_s": round(t["wall_s"], 2),
                "tokens_per_cpu_s": round(tokens / t["cpu_s"], 1),
                "tokens_per_s": round(tokens / t["wall_s"], 1),
                "speedup_cpu": round(base_cpu / t["cpu_s"], 3),
                "speedup_wall": round(base_wall / t["wall_s"], 3),
                "mean_loss": round(sum(t["losses"]) / len(t["losses"]), 5),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure and print CSV; with --output also write it there."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="batches timed (after 1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="shuffle of the dataset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", type=Path, help="CSV file to write")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows = measure(args.batches, args.batch_size, args.seed)
    targets = [sys.stdout] + ([args.output.open("w", newline="")] if args.output else [])
    for target in targets:
        writer = csv.DictWriter(target, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if args.output:
        targets[-1].close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
