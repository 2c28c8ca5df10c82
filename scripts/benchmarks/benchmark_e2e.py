"""End-to-end LoRA / QLoRA training throughput and peak memory: HF baseline vs our kernels.

Random-init models of a real architecture's shapes (default Llama-3-8B: hidden 4096, 32
layers, intermediate 14336, 32/8 heads, vocab 128256) train a few AdamW steps on random tokens
under bf16 autocast, as the Trainer does with bf16=True. No weights are downloaded: random
weights cost the same time and memory as real ones.

Runs, each in its own process (clean peak memory):
- lora/hf:     bf16 base + peft LoRA on all projections
- lora/foak:   the same + `training.fused_ops_and_kernels` (loss, RMSNorm, RoPE, SwiGLU)
- qlora/hf:    bitsandbytes nf4 base + LoRA through the accelerated-peft plugin (HF QLoRA)
- qlora/foak:  the same + `peft.quantization.fused_ops_and_kernels` (fused LoRA + kernels)

    python scripts/benchmarks/benchmark_e2e.py --out e2e_cuda.csv
    python scripts/benchmarks/benchmark_e2e.py --tiny --out /tmp/e2e.csv   # CPU plumbing check
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from fms_acceleration.compat import dtype_kwargs

RUNS = ("lora/hf", "lora/foak", "qlora/hf", "qlora/foak")
ROLES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
FIELDS = (
    "date",
    "device",
    "torch",
    "triton",
    "transformers",
    "peft",
    "bitsandbytes",
    "run",
    "model",
    "layers",
    "batch",
    "seq",
    "steps",
    "tokens_per_s",
    "step_ms",
    "peak_mb",
    "first_loss",
    "last_loss",
    "speedup_vs_hf",
    "memory_vs_hf",
    "status",
)


def _framework(run: str):
    """The acceleration framework of a run (None: plain HF)."""
    from fms_acceleration.testing import build_framework
    from fms_acceleration_foak import FastKernelsAccelerationPlugin

    kind, impl = run.split("/")
    kernels = {
        "fast_loss": True,
        "fast_rms_layernorm": True,
        "fast_rope_embeddings": True,
        "fast_swiglu": True,
    }
    if kind == "lora":
        if impl == "hf":
            return None
        stanza = {"training": {"fused_ops_and_kernels": kernels}}
        return build_framework({"plugins": stanza}, [FastKernelsAccelerationPlugin])
    from fms_acceleration_peft import BNBAccelerationPlugin

    quant = {"bitsandbytes": {"quant_type": "nf4"}}
    classes = [BNBAccelerationPlugin]
    if impl == "foak":
        quant["fused_ops_and_kernels"] = {
            "base_layer": "bitsandbytes",
            "fused_lora": True,
            **kernels,
        }
        classes.append(FastKernelsAccelerationPlugin)
    return build_framework({"plugins": {"peft": {"quantization": quant}}}, classes)


def _build(run: str, args: argparse.Namespace, device):
    """Random-init model of the run, on the device, wrapped in LoRA (and patched for foak)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.tiny:  # the dry run: the tests' tiny Llama
        from fms_acceleration.testing import tiny_model_config

        config = tiny_model_config("llama", tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
    else:
        shape = {**LLAMA3_8B, "num_hidden_layers": args.layers}
        config = LlamaConfig(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: seconds on a GPU for 8B
        model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.bfloat16))
    model.to(device)  # a no-op unless from_config ignored the device context
    if run.startswith("qlora"):
        from fms_acceleration_foak.lora.quantized_stand_ins import quantize_linears

        # the accelerated-peft loader's nf4 layers, made from the random weights in place
        quantize_linears(model, "bitsandbytes", compute_dtype=torch.bfloat16)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ROLES)
    framework = _framework(run)
    train_args = SimpleNamespace(bf16=True, fp16=False, gradient_checkpointing=False)
    if framework is not None:
        model, (lora,) = framework.augmentation(model, train_args, (lora,))
    if lora is not None:  # (None,): the plugin applied LoRA itself
        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, lora)
    if framework is not None:
        framework.get_callbacks_and_ready_for_train(model)
    return model, framework


def measure(run: str, args: argparse.Namespace) -> dict:
    """Train warmup + steps; tokens/s over the timed steps, peak memory over the whole run."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    model, framework = _build(run, args, device)
    model.train()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (args.batch, args.seq), generator=generator).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    losses, start = [], None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # the process's resident-set peak (imports included): a plumbing figure only
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if framework is not None:
        framework.undo_patches()
    return {
        "tokens_per_s": round(args.steps * args.batch * args.seq / seconds, 1),
        "step_ms": round(seconds / args.steps * 1e3, 1),
        "peak_mb": round(peak / 2**20, 1),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
    }


def _versions() -> dict:
    from fms_acceleration.packages import installed_version

    names = ("torch", "triton", "transformers", "peft", "bitsandbytes")
    return {name: installed_version(name) or "" for name in names}


def _write(path: Path, rows: list[dict]) -> None:
    """All rows so far, each accelerated run with its ratios to the HF run of its kind."""
    by_run = {r["run"]: r for r in rows if r["status"] == "ok"}
    for row in rows:
        base = by_run.get(row["run"].split("/")[0] + "/hf")
        if row["status"] == "ok" and base:
            row["speedup_vs_hf"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
            if base["peak_mb"]:
                row["memory_vs_hf"] = round(row["peak_mb"] / base["peak_mb"], 3)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-3-8B: 32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="2-layer toy model on CPU (dry run)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per run")
    parser.add_argument("--out", type=Path, default=Path("e2e.csv"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.warmup, args.steps = 2, 32, 1, 2
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return 0

    import torch

    on_cuda = torch.cuda.is_available() and not args.tiny
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {
        "date": date,
        "device": torch.cuda.get_device_name(0) if on_cuda else "cpu",
        **_versions(),
        "model": "tiny-llama" if args.tiny else "Llama-3-8B shape, random init",
        "layers": 2 if args.tiny else args.layers,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
    }
    rows = []
    forwarded = [f"--{k}={getattr(args, k)}" for k in ("layers", "batch", "seq", "warmup", "steps")]
    forwarded += ["--tiny"] if args.tiny else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        row = {**common, "run": run}
        try:
            proc = subprocess.run(
                [sys.executable, __file__, *forwarded, "--child", run],
                capture_output=True,
                text=True,
                timeout=args.timeout,
                env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
            )
            if proc.returncode != 0:
                lines = proc.stderr.strip().splitlines()
                raise RuntimeError(lines[-1] if lines else f"exit code {proc.returncode}")
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]), status="ok")
        except subprocess.TimeoutExpired:
            row["status"] = f"timeout after {args.timeout} s"
        except Exception as err:
            row["status"] = f"failed: {err}"[:300]
        print(", ".join(f"{k}={row.get(k)}" for k in ("run", "tokens_per_s", "peak_mb", "status")))
        rows.append(row)
        _write(args.out, rows)  # after every run: a suite stopped early keeps what it measured
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
