"""Benchmark the MoE experts: ours (grouped GEMMs) against transformers' own implementations.

One Mixtral-style experts layer at the width of SmolLM2-135M up-cycled into 8 experts (hidden
576, intermediate 1536 per expert, top-2 routing from a random router), forward + backward of
`--tokens` tokens. Implementations: `scattermoe` (this plugin; on CPU its PyTorch path, on
CUDA its Triton kernels) and transformers' `eager` experts, plus on transformers 5 its
`grouped_mm` and `batched_mm` experts implementations (config._experts_implementation).
transformers 4.55 has only its per-expert eager loop (MixtralSparseMoeBlock).

Each measurement runs in a fresh process. Each step starts without gradients, as a Trainer
step after zero_grad() does, so its backward allocates them. Memory is the peak added by the
first step, before anything was freed that an allocator could reuse: on CPU the resident-set
high-water mark (VmHWM, reset after the inputs are built), on CUDA the peak of allocated
memory. Time is the best of `--reps` later steps: CPU time with one thread on CPU, wall time
between synchronisations on CUDA. Rounds interleave the implementations; the best round
counts. `speedup_vs_default` compares with the experts a user gets without this plugin:
transformers 5's default `grouped_mm` (where it runs), else the per-expert eager loop
(transformers 4.55's only one).

    python scripts/benchmarks/benchmark_moe.py --out scripts/benchmarks/refs/moe_cpu.csv
    python scripts/benchmarks/benchmark_moe.py --device cuda --dtype bfloat16 --tokens 8192 \
        --hidden 4096 --intermediate 14336      # one Mixtral-8x7B experts layer
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

FIELDS = (
    "date",
    "device",
    "load_1min",
    "torch",
    "transformers",
    "impl",
    "tokens",
    "hidden",
    "intermediate",
    "experts",
    "top_k",
    "dtype",
    "ms",
    "tokens_per_s",
    "peak_mb",
    "speedup_vs_eager",
    "speedup_vs_default",
    "note",
)


def _vm_hwm_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")


def _experts(impl: str, args):
    """(the experts' call on (hidden, index, weights), the module whose parameters train)."""
    import torch
    from transformers import AutoConfig

    from fms_acceleration import compat

    config = AutoConfig.for_model(
        "mixtral",
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )
    torch.manual_seed(0)
    if not compat.fused_moe_experts():
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        block = MixtralSparseMoeBlock(config)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)
        if impl == "scattermoe":
            from fms_acceleration_moe.grouped_experts import GroupedExperts

            grouped = GroupedExperts.from_module_list(block.experts, ("w1", "w3", "w2"))
            return grouped, grouped
        # the 4.55 block routes itself: measured with its router
        return lambda hidden, index, weights: block(hidden.unsqueeze(0))[0], block
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config._experts_implementation = "eager" if impl == "scattermoe" else impl
    experts = MixtralExperts(config)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if impl == "scattermoe":
        from fms_acceleration_moe.models.blocks import run_experts

        # the patched experts' forward: the grouped GEMMs with the gating the plugin picks
        return lambda hidden, index, weights: run_experts(experts, hidden, index, weights), experts
    return experts, experts


class _Clock:
    """CPU time and resident-set peak on a CPU; synchronised wall time and allocator peak on
    CUDA."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device == "cuda"
        self.torch = torch

    def start_memory(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            return self.torch.cuda.memory_allocated() / 2**20
        _reset_hwm()
        return _vm_hwm_mb()

    def peak_memory(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**20
        return _vm_hwm_mb()

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()


def measure(impl: str, args) -> dict:
    """Best-of-reps time and added peak memory of one implementation (this process)."""
    import torch

    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    torch.set_default_device(args.device)
    experts, module = _experts(impl, args)
    generator = torch.Generator(args.device).manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, generator=generator).requires_grad_(True)
    router = torch.randn(args.experts, args.hidden, generator=generator) * 0.05
    probs = torch.softmax(x.detach() @ router.T, dim=-1)
    weights, index = probs.topk(args.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)

    def clear():
        # as a Trainer step after zero_grad(): the backward makes the gradients
        x.grad = None
        module.zero_grad(set_to_none=True)

    def step():
        clear()
        experts(x, index, weights).sum().backward()

    # the first step in this fresh process: its peak is the memory measured (every
    # implementation starts with no freed memory to reuse); the warm-up of the timing
    clock = _Clock(args.device)
    base = clock.start_memory()
    step()
    peak = clock.peak_memory() - base
    best = float("inf")
    for _ in range(args.reps):
        start = clock.now()
        step()
        best = min(best, clock.now() - start)
    return {"ms": best * 1000, "peak_mb": peak}


def implementations() -> list[str]:
    from fms_acceleration import compat

    if compat.fused_moe_experts():
        return ["scattermoe", "eager", "grouped_mm", "batched_mm"]
    return ["scattermoe", "eager"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--impls", nargs="+", default=None)
    parser.add_argument("--out", default=None, help="append rows to this CSV")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return 0
    import torch
    import transformers

    impls = args.impls or implementations()
    best: dict[str, dict] = {}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--out"]
    if args.out in forwarded:
        forwarded.remove(args.out)
    failed: dict[str, str] = {}
    for _ in range(args.rounds):
        for impl in impls:
            proc = subprocess.run(
                [sys.executable, __file__, *forwarded, "--device", args.device, "--measure", impl],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:  # e.g. grouped_mm on a GPU torch does not support
                failed[impl] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            if impl not in best or result["ms"] < best[impl]["ms"]:
                best[impl] = result
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.machine()}, {os.cpu_count()} cores, 1 thread)"
    default = "grouped_mm" if "grouped_mm" in best else "eager"
    rows = []
    for impl in impls:
        if impl not in best:
            print(f"{impl}: failed: {failed.get(impl)}", file=sys.stderr)
            continue
        ms = best[impl]["ms"]
        rows.append(
            {
                "date": date,
                "device": device,
                "load_1min": round(os.getloadavg()[0], 2),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "impl": impl,
                "tokens": args.tokens,
                "hidden": args.hidden,
                "intermediate": args.intermediate,
                "experts": args.experts,
                "top_k": args.top_k,
                "dtype": args.dtype,
                "ms": round(ms, 1),
                "tokens_per_s": round(args.tokens / (ms / 1000), 1),
                "peak_mb": round(best[impl]["peak_mb"], 1),
                "speedup_vs_eager": round(best["eager"]["ms"] / ms, 2) if "eager" in best else "",
                "speedup_vs_default": round(best[default]["ms"] / ms, 2) if default in best else "",
                "note": f"forward+backward of the experts; default: {default}; "
                + ("CUDA wall time" if args.device == "cuda" else "CPU time")
                + ", best of reps and rounds",
            }
        )
    writer = csv.DictWriter(sys.stdout, FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    if args.out:
        exists = os.path.exists(args.out)
        with open(args.out, "a", newline="", encoding="utf-8") as handle:
            out = csv.DictWriter(handle, FIELDS)
            if not exists:
                out.writeheader()
            out.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
