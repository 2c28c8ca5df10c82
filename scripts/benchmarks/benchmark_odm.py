"""Online data mixing against the uniform mixture: steps to the uniform run's final held-out loss.

    python scripts/benchmarks/benchmark_odm.py --seeds 1 2 3 --output-dir /tmp/odm-bench

Each seed runs the main job, `python -m fms_acceleration_train --acceleration-config
sample-configurations/odm-sample-configuration.yaml --compare`, on the built-in mixture of five
domains: the baseline trains on the uniform mixture, the accelerated run on the mixture online
data mixing learns; both evaluate every domain's held-out rows every --eval-every steps. The
model is `--model-size tiny` (default: a 2-layer random-init Llama with SmolLM2's tokenizer,
trained in full, as the paper pre-trains from scratch) or `smollm2` (the embedded 135M model with
LoRA; about 100 s per step on a loaded 2-core machine). Writes refs/odm_steps_to_target_cpu.md
(and .csv): per seed the target, the steps each run needed and the saving.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from statistics import fmean
from typing import Any

from fms_acceleration.packages import installed_versions

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SAMPLE = ROOT / "sample-configurations" / "odm-sample-configuration.yaml"
REFS = HERE / "refs"
VERSIONS = ("torch", "transformers", "fms-acceleration", "fms-acceleration-odm")


def tiny_model(folder: Path) -> Path:
    """A random-init 2-layer Llama with the embedded SmolLM2 tokenizer, saved under `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fms_acceleration_train.model_source import resolve_model

    if (folder / "config.json").is_file():
        return folder
    source, _ = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def job_command(args: argparse.Namespace, seed: int, model: Path | None, out: Path) -> list[str]:
    """The main job's command line for one seed."""
    command = [
        sys.executable, "-m", "fms_acceleration_train", "--acceleration-config", str(args.config),
        "--compare", "--max-steps", str(args.max_steps), "--seed", str(seed),
        "--log-every", str(args.eval_every), "--batch-size", str(args.batch_size),
        "--cpu-threads", "1", "--no-eval", "--overwrite", "--output-dir", str(out),
    ]  # fmt: skip
    if model is not None:
        command += ["--model", str(model), "--full-finetuning"]
        command += ["--learning-rate", str(args.learning_rate)]
    return command


def one_minute_load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    """Run every seed, print and write the steps-to-target table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=SAMPLE, help="ODM acceleration config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--model-size", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/odm-bench"))
    parser.add_argument("--refs", type=Path, default=REFS)
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    args = parser.parse_args(argv)

    model = tiny_model(args.output_dir / "tiny-model") if args.model_size == "tiny" else None
    rows: list[dict[str, Any]] = []
    versions = installed_versions(VERSIONS)
    for seed in args.seeds:
        out = args.output_dir / f"seed{seed}"
        command = job_command(args, seed, model, out)
        print("$", " ".join(command), flush=True)
        load = one_minute_load()
        subprocess.run(command, check=True, cwd=ROOT)
        comparison = json.loads((out / "comparison.json").read_text())
        target = comparison["steps_to_target"]
        rows.append(
            {
                "seed": seed,
                "config": str(args.config.resolve().relative_to(ROOT))
                if args.config.resolve().is_relative_to(ROOT)
                else str(args.config),
                "model": args.model_size,
                "max_steps": args.max_steps,
                "eval_every": args.eval_every,
                "target_heldout_loss": target["target_heldout_loss"],
                "uniform_steps": target["baseline_steps"],
                "odm_steps": target["odm_steps"],
                "fewer_steps": target["fewer_steps"],
                "odm_final_heldout_loss": target["final_heldout_loss"]["odm"],
                "odm_final_ratio": comparison["accelerated"]["data_mixing"]["final_sampling_ratio"],
                "device": f"cpu ({platform.processor() or platform.machine()})",
                "load_1min": round(load, 2),
                "date": dt.date.today().isoformat(),
                **{f"v_{k}": v for k, v in versions.items()},
            }
        )
    write(args.refs, rows, comparison["accelerated"]["data_mixing"]["categories"], args.tag)
    return 0


def write(refs: Path, rows: list[dict[str, Any]], categories: list[str], tag: str = "") -> None:
    """refs/odm_steps_to_target_cpu.csv and .md (with the mean over seeds)."""
    refs.mkdir(parents=True, exist_ok=True)
    name = "odm_steps_to_target_cpu" + (f"_{tag}" if tag else "")
    with open(refs / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| seed | target (uniform's final held-out loss) | uniform steps | ODM steps | fewer "
        "steps | ODM final held-out loss | ODM final ratio (" + ", ".join(categories) + ") |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        odm = "not reached" if r["odm_steps"] is None else str(r["odm_steps"])
        fewer = "-" if r["fewer_steps"] is None else f"{r['fewer_steps']:.0%}"
        ratio = ", ".join(f"{x:.2f}" for x in r["odm_final_ratio"])
        lines.append(
            f"| {r['seed']} | {r['target_heldout_loss']:.4f} | {r['uniform_steps']} | {odm} | "
            f"{fewer} | {r['odm_final_heldout_loss']:.4f} | {ratio} |"
        )
    reached = [r["fewer_steps"] for r in rows if r["fewer_steps"] is not None]
    mean = f"{fmean(reached):.0%}" if len(reached) == len(rows) else "-"
    lines.append(f"| mean | | | | {mean} | | |")
    first = rows[0]
    lines.append("")
    lines.append(
        f"{first['config']}; {first['model']} model, {first['max_steps']} steps, held-out loss "
        f"every {first['eval_every']} steps; {first['device']}, 1-minute load "
        + ", ".join(str(r["load_1min"]) for r in rows)
        + f"; {first['date']}; "
        + ", ".join(f"{k[2:]} {v}" for k, v in first.items() if k.startswith("v_"))
    )
    name = "odm_steps_to_target_cpu" + (f"_{tag}" if tag else "")
    (refs / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
