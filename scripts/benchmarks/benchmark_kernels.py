"""Benchmark the fused-ops-and-kernels kernels against their PyTorch reference and HF eager code.

For every kernel and implementation it measures the forward, the backward and the full step
(forward + backward): time, peak memory and, from the bytes the step must touch at least once,
achieved GB/s as a fraction of the device's measured copy bandwidth. Each measurement runs in a
fresh subprocess so one measurement's allocations cannot hide another's peak.

Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the process's resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs after the inputs are built), so
`peak_mb` is the memory the step added on top of its inputs.

    # every kernel on CUDA (bf16)
    python scripts/benchmarks/benchmark_kernels.py --out kernels_cuda.csv
    # the committed CPU reference: fused linear CE vs unfused, fp32, 4096 tokens x 2048 hidden
    python scripts/benchmarks/benchmark_kernels.py --device cpu \
        --kernels fused_linear_cross_entropy --passes full --warmup 0 \
        --vocab 49152 128256 --out scripts/benchmarks/refs/kernels_cpu.csv
    # ... plus a frozen lm_head (LoRA), appended to the same file
    python scripts/benchmarks/benchmark_kernels.py --device cpu \
        --kernels fused_linear_cross_entropy --passes full --warmup 0 --impls foak reference \
        --vocab 128256 --frozen-lm-head --append --out scripts/benchmarks/refs/kernels_cpu.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

KERNELS = ("rms_norm", "rope", "cross_entropy", "fused_linear_cross_entropy", "swiglu")
IMPLS = ("foak", "reference", "hf_eager")
PASSES = ("forward", "backward", "full")
FIELDS = (
    "date",
    "device",
    "torch",
    "triton",
    "transformers",
    "kernel",
    "impl",
    "shape",
    "dtype",
    "pass",
    "ms",
    "peak_mb",
    "gbps",
    "bandwidth_fraction",
    "note",
)


# --- workloads (run in the child) ---------------------------------------------------------------


def _workload(kernel: str, impl: str, args: argparse.Namespace, device, dtype):
    """(inputs requiring grad, fn(inputs) -> scalar to backprop, bytes touched by fwd, by bwd)."""
    import torch
    import torch.nn.functional as F

    from fms_acceleration_foak import kernels as K

    tokens, hidden = args.tokens, args.hidden

    def rand(*shape, scale=1.0, grad=True):
        t = torch.randn(*shape, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(grad)

    size = torch.tensor([], dtype=dtype).element_size()
    if kernel == "rms_norm":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        x, w = rand(tokens, hidden), rand(hidden)
        hf = LlamaRMSNorm(hidden).to(device, dtype)
        fns = {
            "foak": lambda: K.rms_norm(x, w, 1e-6),
            "reference": lambda: K.rms_norm_reference(x, w, 1e-6),
            "hf_eager": lambda: hf(x),
        }
        nbytes = 2 * x.numel() * size
        return [x, w, *hf.parameters()], fns[impl], nbytes, 3 * x.numel() * size, (tokens, hidden)
    if kernel == "rope":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        heads, kv_heads, dim = args.heads, args.kv_heads, args.head_dim
        batch, seq = max(1, tokens // args.seq), args.seq
        q = rand(batch, seq, heads, dim).transpose(1, 2)
        k = rand(batch, seq, kv_heads, dim).transpose(1, 2)
        angles = torch.rand(batch, seq, dim, device=device) * 6.28
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        fns = {
            "foak": lambda: K.rope(q, k, cos, sin),
            "reference": lambda: K.rope_reference(q, k, cos, sin),
            "hf_eager": lambda: apply_rotary_pos_emb(q, k, cos, sin),
        }
        qk = (q.numel() + k.numel()) * size
        return [q, k], fns[impl], 2 * qk, 2 * qk, (batch, seq, heads, kv_heads, dim)
    target = torch.randint(0, args.vocab, (tokens,), device=device)
    target[torch.rand(tokens, device=device) < 0.1] = -100
    if kernel == "cross_entropy":
        from transformers.loss.loss_utils import fixed_cross_entropy

        logits = rand(tokens, args.vocab, scale=2.0)
        fns = {
            "foak": lambda: K.cross_entropy(logits, target),
            "reference": lambda: K.cross_entropy_reference(logits, target),
            "hf_eager": lambda: fixed_cross_entropy(logits.float(), target),
        }
        nbytes = logits.numel() * size
        return [logits], fns[impl], nbytes, 2 * nbytes, (tokens, args.vocab)
    if kernel == "fused_linear_cross_entropy":
        from transformers.loss.loss_utils import ForCausalLMLoss

        h = rand(tokens, hidden)
        w = rand(args.vocab, hidden, scale=hidden**-0.5, grad=not args.frozen_lm_head)
        labels = F.pad(target, (1, 0), value=-100)[:-1]  # HF shifts labels itself
        fns = {
            "foak": lambda: K.fused_linear_cross_entropy(h, w, target),
            "reference": lambda: K.fused_linear_cross_entropy_reference(h, w, target),
            "hf_eager": lambda: ForCausalLMLoss(F.linear(h, w)[None], labels[None], args.vocab),
        }
        nbytes = (h.numel() + w.numel()) * size
        return [h, w], fns[impl], nbytes, 2 * nbytes, (tokens, hidden, args.vocab)
    if kernel == "swiglu":
        inter = args.intermediate
        gate, up = rand(tokens, inter), rand(tokens, inter)
        fns = {
            "foak": lambda: K.swiglu(gate, up),
            "reference": lambda: K.swiglu_reference(gate, up),
            "hf_eager": lambda: F.silu(gate) * up,
        }
        n = gate.numel() * size
        return [gate, up], fns[impl], 3 * n, 5 * n, (tokens, inter)
    raise ValueError(f"unknown kernel {kernel!r}")


def _copy_bandwidth(device) -> float:
    """Measured GB/s of a large tensor copy (read + write) on this device."""
    import torch

    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = _now(device)
        dst.copy_(src)
        best = min(best, _now(device) - start)
    return 2 * src.numel() * 4 / best / 1e9


def _now(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _rss_reset() -> int:
    """Reset the RSS high-water mark; return the current RSS in bytes (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status")


def run_child(spec: dict) -> dict:
    """One measurement: build inputs, warm up, time `repeat` runs, report time and peak memory."""
    import gc

    import torch

    torch.manual_seed(0)
    args = argparse.Namespace(**spec["args"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    inputs, fn, fwd_bytes, bwd_bytes, shape = _workload(
        spec["kernel"], spec["impl"], args, device, dtype
    )
    phase = spec["pass"]

    def scalar(out):
        outs = out if isinstance(out, tuple) else (out,)
        return sum(o.float().sum() if o.dim() else o for o in outs)

    def step() -> float:
        for t in inputs:
            t.grad = None
        if phase == "forward":
            start = _now(device)
            fn()
            return _now(device) - start
        if phase == "full":
            start = _now(device)
            scalar(fn()).backward()
            return _now(device) - start
        loss = scalar(fn())
        start = _now(device)
        loss.backward()
        return _now(device) - start

    for _ in range(args.warmup):
        step()
    gc.collect()
    for t in inputs:
        t.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_reset()
    times = sorted(step() for _ in range(args.repeat))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kb("VmHWM") * 1024 - base
    seconds = times[len(times) // 2]
    nbytes = {"forward": fwd_bytes, "backward": bwd_bytes, "full": fwd_bytes + bwd_bytes}[phase]
    gbps = nbytes / seconds / 1e9
    return {
        "shape": "x".join(map(str, shape)),
        "ms": round(seconds * 1e3, 3),
        "peak_mb": round(peak / 2**20, 1),
        "gbps": round(gbps, 2),
        "bandwidth_fraction": round(gbps / _copy_bandwidth(device), 3),
    }


# --- driver -----------------------------------------------------------------------------------


def _versions() -> dict:
    import torch
    import transformers
    import triton

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
    }


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument(
        "--frozen-lm-head",
        action="store_true",
        help="fused_linear_cross_entropy: lm_head weight without grad (LoRA training)",
    )
    parser.add_argument("--append", action="store_true", help="append rows to --out")
    parser.add_argument("--out", type=Path, default=Path("kernels.csv"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    warmup = args.warmup if args.warmup is not None else (3 if device == "cuda" else 1)
    repeat = args.repeat if args.repeat is not None else (20 if device == "cuda" else 1)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {"date": date, "device": _device_name(device), **_versions(), "dtype": dtype}
    note = "" if device == "cuda" else "cpu: foak = torch path (Triton needs CUDA)"

    rows = []
    for kernel in args.kernels:
        vocabs = args.vocab if "cross_entropy" in kernel else args.vocab[:1]
        for vocab in vocabs:
            for impl in args.impls:
                for phase in args.passes:
                    child_args = {**vars(args), "vocab": vocab, "warmup": warmup}
                    child_args.update(repeat=repeat, out=None, child=None)
                    spec = {
                        "kernel": kernel,
                        "impl": impl,
                        "pass": phase,
                        "device": device,
                        "dtype": dtype,
                        "args": child_args,
                    }
                    proc = subprocess.run(
                        [sys.executable, __file__, "--child", json.dumps(spec)],
                        capture_output=True,
                        text=True,
                        env={**os.environ, "TRITON_INTERPRET": "0"},
                    )
                    if proc.returncode != 0:
                        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                        print(f"{kernel}/{impl}/{phase} failed: {tail[0]}", file=sys.stderr)
                        continue
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    row = {**common, "kernel": kernel, "impl": impl, "pass": phase, **result}
                    notes = [note] if impl == "foak" and note else []
                    if args.frozen_lm_head and kernel == "fused_linear_cross_entropy":
                        notes.append("lm_head frozen")
                    row["note"] = "; ".join(notes)
                    rows.append(row)
                    shown = ("kernel", "impl", "pass", "shape", "ms", "peak_mb")
                    print(", ".join(f"{k}={row[k]}" for k in shown), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    append = args.append and args.out.exists()
    with args.out.open("a" if append else "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if not append:
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
