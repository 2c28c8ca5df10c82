"""Benchmark the fused-ops-and-kernels kernels against PyTorch eager, HF code and peer libraries.

For every kernel and implementation it measures the forward, the backward and the full step
(forward + backward): time, peak memory and, from the bytes the step must touch at least once,
achieved GB/s as a fraction of the device-to-device copy bandwidth measured in the same run.

Implementations: foak (ours), reference (our plain-PyTorch reference), hf_eager (the
transformers code the kernel replaces), liger (Liger-Kernel's op, when installed; CUDA only),
cce (Cut Cross-Entropy's linear_cross_entropy, fused linear CE only, when installed: its Triton
impl "cce" on CUDA, impl "torch_compile" on CPU), and for causal_lm_loss `previous`
(transformers' ForCausalLMLoss calling our CE kernel after its fp32 upcast: the fast_loss patch
before it took the model's loss function). A peer that is not installed is skipped with the
reason printed.

On CUDA every measurement runs in this process (peak memory from torch.cuda's allocator stats,
reset per measurement; times from CUDA events, the L2 cache flushed before each repetition). On
CPU each measurement runs in a fresh subprocess and peak memory is the resident-set high-water
mark (VmHWM, reset through /proc/self/clear_refs after the inputs are built), so `peak_mb` is
the memory the step added on top of its inputs. That figure also moves with how glibc reuses
freed memory and with buffers libraries keep outside torch (about +-1 MB run to run), so CPU
rows add `alloc_peak_mb`: the most torch's allocator held during one more step, above what it
held before it, from the profiler's memory events (exact, and the same from run to run). On a
shared machine, measure CPU time with one thread (--timer cpu --threads 1), repeat in
interleaved fresh processes (--rounds) and keep the best time (--stat min); the 1-minute load
average is recorded with every row.

    # every kernel on CUDA (bf16), Llama-3-8B shapes, with Liger where installed
    python scripts/benchmarks/benchmark_kernels.py --out kernels_cuda.csv
    # the committed CPU reference: fused linear CE vs unfused, fp32, 4096 tokens x 2048 hidden
    python scripts/benchmarks/benchmark_kernels.py --device cpu \\
        --kernels fused_linear_cross_entropy --passes full --warmup 0 --tokens 4096 \\
        --hidden 2048 --vocab 49152 128256 --out scripts/benchmarks/refs/kernels_cpu.csv
    # fused linear CE vs HF and Cut Cross-Entropy on CPU, both dtypes, all or half labelled
    python scripts/benchmarks/benchmark_kernels.py --device cpu --kernels \\
        fused_linear_cross_entropy --impls foak hf_eager cce --passes full --dtype float32 \\
        bfloat16 --tokens 1024 --hidden 576 --vocab 128256 --ignored-fraction 0 0.5 \\
        --threads 1 --timer cpu --stat min --warmup 1 --repeat 3 --rounds 2 \\
        --out flce_peers.csv --markdown flce_peers.md
    # fix 1 on CPU: loss memory of bf16 logits, ours (interpreter) vs previous vs HF
    python scripts/benchmarks/benchmark_kernels.py --device cpu --interpret \\
        --kernels causal_lm_loss --impls foak previous hf_eager --passes full --warmup 0 \\
        --dtype bfloat16 --tokens 2048 --vocab 128256 --out scripts/benchmarks/refs/loss_cpu.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

KERNELS = (
    "rms_norm",
    "rms_norm_head_dim",
    "rope",
    "cross_entropy",
    "causal_lm_loss",
    "fused_linear_cross_entropy",
    "swiglu",
)
LABELLED_KERNELS = ("cross_entropy", "causal_lm_loss", "fused_linear_cross_entropy")
IMPLS = ("foak", "reference", "hf_eager", "liger", "cce", "previous")
PASSES = ("forward", "backward", "full")
FIELDS = (
    "date",
    "device",
    "torch",
    "triton",
    "transformers",
    "liger",
    "cce",
    "kernel",
    "impl",
    "shape",
    "dtype",
    "ignored",
    "pass",
    "ms",
    "first_ms",
    "peak_mb",
    "alloc_peak_mb",
    "gbps",
    "copy_gbps",
    "bandwidth_fraction",
    "threads",
    "timer",
    "load",
    "note",
)


class NotApplicable(Exception):
    """This implementation does not exist for this kernel (or not on this device)."""


# --- workloads ----------------------------------------------------------------------------------


def _liger(module: str, name: str, device):
    if device.type != "cuda":
        raise NotApplicable("liger runs on CUDA only")
    try:
        mod = __import__(f"liger_kernel.ops.{module}", fromlist=[name])
    except ImportError as err:
        raise NotApplicable(f"liger-kernel not installed ({err})") from None
    return getattr(mod, name)


def cce_impl(device) -> str:
    """Which implementation of Cut Cross-Entropy runs on this device (its Triton one needs CUDA)."""
    return "cce" if device.type == "cuda" else "torch_compile"


def _cce(device):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as err:
        raise NotApplicable(f"cut-cross-entropy not installed ({err})") from None
    impl = cce_impl(device)
    return lambda h, w, target: linear_cross_entropy(h, w, target, impl=impl)


def _workload(kernel: str, impl: str, args: argparse.Namespace, device, dtype):
    """(leaves, fn() -> outputs, bytes touched by fwd, by bwd, shape); NotApplicable if none."""
    import torch
    import torch.nn.functional as F

    from fms_acceleration_foak import kernels as K

    tokens, hidden = args.tokens, args.hidden

    def rand(*shape, scale=1.0, grad=True):
        t = torch.randn(*shape, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(grad)

    size = torch.tensor([], dtype=dtype).element_size()
    if impl == "previous" and kernel != "causal_lm_loss":
        raise NotApplicable("previous is the old fast_loss path of causal_lm_loss")
    if impl == "cce" and kernel != "fused_linear_cross_entropy":
        raise NotApplicable("Cut Cross-Entropy has only a fused linear cross-entropy")
    if kernel in ("rms_norm", "rms_norm_head_dim"):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        rows, width = (tokens, hidden)
        if kernel == "rms_norm_head_dim":  # Qwen3 q_norm: one row per token and head
            rows, width = tokens * args.heads, args.head_dim
        x, w = rand(rows, width), rand(width)
        hf = LlamaRMSNorm(width).to(device, dtype)
        fns = {
            "foak": lambda: K.rms_norm(x, w, 1e-6),
            "reference": lambda: K.rms_norm_reference(x, w, 1e-6),
            "hf_eager": lambda: hf(x),
        }
        if impl == "liger":
            fn = _liger("rms_norm", "LigerRMSNormFunction", device)
            fns["liger"] = lambda: fn.apply(x, w, 1e-6)
        n = x.numel() * size
        return [x, w, *hf.parameters()], fns[impl], 2 * n, 3 * n, (rows, width)
    if kernel == "rope":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        heads, kv_heads, dim = args.heads, args.kv_heads, args.head_dim
        batch, seq = max(1, tokens // args.seq), args.seq
        q = rand(batch, seq, heads, dim).transpose(1, 2)
        k = rand(batch, seq, kv_heads, dim).transpose(1, 2)
        angles = torch.rand(1, seq, dim, device=device) * 6.28
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        fns = {
            "foak": lambda: K.rope(q, k, cos, sin),
            "reference": lambda: K.rope_reference(q, k, cos, sin),
            "hf_eager": lambda: apply_rotary_pos_emb(q, k, cos, sin),
        }
        if impl == "liger":
            fn = _liger("rope", "LigerRopeFunction", device)
            fns["liger"] = lambda: fn.apply(q, k, cos, sin)
        qk = (q.numel() + k.numel()) * size
        return [q, k], fns[impl], 2 * qk, 2 * qk, (batch, seq, heads, kv_heads, dim)
    target = torch.randint(0, args.vocab, (tokens,), device=device)
    target[torch.rand(tokens, device=device) < args.ignored_fraction] = -100
    if kernel == "cross_entropy":
        from transformers.loss.loss_utils import fixed_cross_entropy

        logits = rand(tokens, args.vocab, scale=2.0)
        fns = {
            "foak": lambda: K.cross_entropy(logits, target),
            "reference": lambda: K.cross_entropy_reference(logits, target),
            "hf_eager": lambda: fixed_cross_entropy(logits.float(), target),
        }
        if impl == "liger":
            fn = _liger("cross_entropy", "LigerCrossEntropyFunction", device)
            fns["liger"] = lambda: fn.apply(logits, target, None, -100)[0]
        n = logits.numel() * size
        return [logits], fns[impl], n, 2 * n, (tokens, args.vocab)
    if kernel == "causal_lm_loss":
        # the model's loss on its [batch, seq, vocab] logits, labels shifted inside
        from transformers.loss import loss_utils

        from fms_acceleration_foak.models.loss import fast_causal_lm_loss

        batch = max(1, tokens // args.seq)
        logits = rand(batch, tokens // batch, args.vocab, scale=2.0)
        labels = target[: logits.shape[0] * logits.shape[1]].view(logits.shape[:2])

        def previous():
            # ForCausalLMLoss with fixed_cross_entropy swapped for the kernel, as fast_loss was
            original = loss_utils.fixed_cross_entropy
            loss_utils.fixed_cross_entropy = lambda s, t, n=None, i=-100, **kw: K.cross_entropy(
                s, t, i, n
            )
            try:
                return loss_utils.ForCausalLMLoss(logits, labels, args.vocab)
            finally:
                loss_utils.fixed_cross_entropy = original

        fns = {
            "foak": lambda: fast_causal_lm_loss(logits, labels, args.vocab),
            "previous": previous,
            "hf_eager": lambda: loss_utils.ForCausalLMLoss(logits, labels, args.vocab),
        }
        if impl not in fns:
            raise NotApplicable(f"{impl} has no causal LM loss")
        n = logits.numel() * size
        return [logits], fns[impl], n, 2 * n, tuple(logits.shape)
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
        if impl == "liger":
            name = "LigerFusedLinearCrossEntropyFunction"
            fn = _liger("fused_linear_cross_entropy", name, device)
            fns["liger"] = lambda: fn.apply(h, w, target)[0]
        if impl == "cce":
            cce = _cce(device)
            fns["cce"] = lambda: cce(h, w, target)
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
        if impl == "liger":
            fn = _liger("swiglu", "LigerSiLUMulFunction", device)
            fns["liger"] = lambda: fn.apply(gate, up)
        n = gate.numel() * size
        return [gate, up], fns[impl], 3 * n, 5 * n, (tokens, inter)
    raise ValueError(f"unknown kernel {kernel!r}")


# --- timing and memory --------------------------------------------------------------------------


def copy_bandwidth(device) -> float:
    """Measured GB/s of a large device-to-device tensor copy (bytes read + written)."""
    import torch

    numel = (256 if device.type == "cuda" else 64) * 2**20
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10 if device.type == "cuda" else 3):
        best = min(best, _timed(device, lambda: dst.copy_(src)))
    return 2 * src.numel() * 4 / best / 1e9


def _timed(device, fn, timer: str = "wall") -> float:
    """Seconds of fn(): CUDA events on CUDA; elsewhere wall time, or with timer "cpu" this
    process's CPU time (user + system: page faults count), which other jobs on a shared
    machine disturb far less."""
    import torch

    if device.type != "cuda":
        clock = time.process_time if timer == "cpu" else time.perf_counter
        start = clock()
        fn()
        return clock() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1e3


def _rss_reset() -> int:
    """Reset the RSS high-water mark; return the current RSS in bytes (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status")


def _allocator_peak(step) -> float | None:
    """The most bytes torch's CPU allocator held during step(), above what it held at the
    start: the running sum of the profiler's memory events (None where it records none)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak if events else None


def measure(spec: dict) -> dict:
    """One measurement: build inputs, warm up, time `repeat` runs, report time and peak memory."""
    import gc

    import torch

    torch.manual_seed(0)
    args = argparse.Namespace(**spec["args"])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    inputs, fn, fwd_bytes, bwd_bytes, shape = _workload(
        spec["kernel"], spec["impl"], args, device, dtype
    )
    phase = spec["pass"]
    flush = None
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def outputs_and_grads():
        out = fn()
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        grads = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs]
        return outs, grads

    def step() -> float:
        for t in inputs:
            t.grad = None
        if flush is not None:
            flush.zero_()  # a cold L2: bandwidth from memory, not from cache
        if phase == "forward":
            return _timed(device, fn, args.timer)
        if phase == "full":
            full = lambda: torch.autograd.backward(*outputs_and_grads())  # noqa: E731
            return _timed(device, full, args.timer)
        outs, grads = outputs_and_grads()
        return _timed(device, lambda: torch.autograd.backward(outs, grads), args.timer)

    # the first call: with torch.compile (Cut Cross-Entropy on CPU) it includes compiling
    first = step() if args.warmup else None
    for _ in range(args.warmup - 1):
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
    alloc_peak = None
    if device.type == "cpu":
        for t in inputs:
            t.grad = None
        alloc_peak = _allocator_peak(step)
    seconds = times[0] if args.stat == "min" else times[len(times) // 2]
    nbytes = {"forward": fwd_bytes, "backward": bwd_bytes, "full": fwd_bytes + bwd_bytes}[phase]
    return {
        "shape": "x".join(map(str, shape)),
        "ms": round(seconds * 1e3, 3),
        "first_ms": None if first is None else round(first * 1e3, 1),
        "peak_mb": round(peak / 2**20, 1),
        "alloc_peak_mb": None if alloc_peak is None else round(alloc_peak / 2**20, 2),
        "gbps": round(nbytes / seconds / 1e9, 2),
    }


def combine(results: list[dict]) -> dict:
    """One row from the same measurement in several fresh processes: the best time (the run
    least disturbed by other jobs), the median peak memories, the first (coldest) first call."""
    best = min(results, key=lambda r: r["ms"])
    peak = statistics.median(r["peak_mb"] for r in results)
    allocs = [r["alloc_peak_mb"] for r in results if r.get("alloc_peak_mb") is not None]
    alloc = round(statistics.median(allocs), 2) if allocs else None
    return {
        **best,
        "peak_mb": round(peak, 1),
        "alloc_peak_mb": alloc,
        "first_ms": results[0]["first_ms"],
    }


# --- driver -------------------------------------------------------------------------------------


def versions() -> dict:
    """Package versions for the CSV rows."""
    import torch
    import transformers
    import triton

    from fms_acceleration.packages import installed_version

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "liger": installed_version("liger-kernel") or "",
        "cce": installed_version("cut-cross-entropy") or "",
    }


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument(
        "--dtype", nargs="+", default=None, help="float32 / float16 / bfloat16 (one or more)"
    )
    # defaults: Llama-3-8B, 16k tokens per step
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256])
    parser.add_argument(
        "--zip-shapes",
        action="store_true",
        help="pair --tokens with --vocab element-wise instead of measuring every combination",
    )
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument(
        "--stat", choices=("median", "min"), default="median", help="of the repeats' times"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each shape this many times, the impls interleaved, each in a fresh "
        "process off CUDA; keep the best time and the median peak",
    )
    parser.add_argument(
        "--timer",
        choices=("wall", "cpu"),
        default="wall",
        help="off CUDA: wall-clock or this process's CPU time (steadier on a shared machine)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--frozen-lm-head",
        action="store_true",
        help="fused_linear_cross_entropy: lm_head weight without grad (LoRA training)",
    )
    parser.add_argument(
        "--ignored-fraction",
        type=float,
        nargs="+",
        default=[0.1],
        help="share of labels set to -100 (instruction data: the prompt's tokens); one or more",
    )
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="CPU: run our Triton kernels through the interpreter (for memory, not speed)",
    )
    parser.add_argument(
        "--subprocess",
        action="store_true",
        help="one fresh process per measurement (the default on CPU: RSS peaks)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="CPU: measure in this process (fast; peak memory then means little)",
    )
    parser.add_argument("--append", action="store_true", help="append rows to --out")
    parser.add_argument("--out", type=Path, default=Path("kernels.csv"))
    parser.add_argument(
        "--markdown", type=Path, help="also write fused linear CE's rows as a table of ratios"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _child(spec: dict, interpret: bool) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run(spec: dict, in_process: bool, interpret: bool) -> dict:
    """Measure one spec here or in a fresh process; {"not_applicable": why} if it cannot run."""
    if not in_process:
        return _child(spec, interpret)
    try:
        return measure(spec)
    except NotApplicable as why:
        return {"not_applicable": str(why)}


def _grid(args: argparse.Namespace):
    """(kernel, dtype, tokens, vocab, ignored fraction, pass) of every row to measure."""
    for kernel in args.kernels:
        labelled = kernel in LABELLED_KERNELS
        vocabs = args.vocab if labelled else args.vocab[:1]
        fractions = args.ignored_fraction if labelled else args.ignored_fraction[:1]
        if args.zip_shapes:
            shapes = list(zip(args.tokens, vocabs, strict=True))
        else:
            shapes = [(tokens, vocab) for tokens in args.tokens for vocab in vocabs]
        for dtype in args.dtype:
            for tokens, vocab in shapes:
                for ignored in fractions:
                    for phase in args.passes:
                        yield kernel, dtype, tokens, vocab, ignored, phase


def flce_markdown(rows: list[dict], title: str, command: str | None = None) -> str:
    """Fused linear CE, forward + backward: each impl's time and peak, and ours over each peer's
    (below 1.00 is ours faster or smaller); `command` (default: this process's) made the rows."""
    flce = "fused_linear_cross_entropy"
    picked = [r for r in rows if r["kernel"] == flce and r["pass"] == "full"]
    impls = list(dict.fromkeys(r["impl"] for r in picked))
    peers = [i for i in impls if i != "foak"]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in picked:
        frozen = "lm_head frozen" in r["note"]
        groups.setdefault((r["dtype"], r["shape"], r["ignored"], frozen), {})[r["impl"]] = r
    # the allocator's peak where the rows have one (CPU): exact, where the RSS peak is +-1 MB
    allocator = all(r.get("alloc_peak_mb") not in (None, "") for r in picked)
    memories = {"peak_mb": "MB"} | ({"alloc_peak_mb": "allocator MB"} if allocator else {})
    header = ["dtype", "tokens x hidden x vocab", "labels ignored"]
    header += [f"{i} ms" for i in impls]
    header += [f"{i} {unit}" for unit in memories.values() for i in impls]
    ratios = {"ms": "time", "peak_mb": "memory", "alloc_peak_mb": "allocator memory"}
    keys = ["ms", *memories]
    header += [f"foak/{p} {ratios[k]}" for p in peers for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for (dtype, shape, ignored, frozen), by_impl in groups.items():
        ours = by_impl.get("foak")
        cells = [dtype, shape + (", lm_head frozen" if frozen else ""), f"{float(ignored):.0%}"]
        cells += [str(by_impl[i]["ms"]) if i in by_impl else "-" for i in impls]
        for key in memories:
            cells += [str(by_impl[i][key]) if i in by_impl else "-" for i in impls]
        for peer in peers:
            theirs = by_impl.get(peer)
            for key in keys:
                ok = ours and theirs and float(theirs[key]) > 0
                cells.append(f"{float(ours[key]) / float(theirs[key]):.2f}" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    meta = picked[0] if picked else {}
    about = [
        f"# {title}",
        "",
        f"- date: {meta.get('date', '?')}; device: {meta.get('device', '?')}",
        f"- torch {meta.get('torch', '?')}, transformers {meta.get('transformers', '?')}, "
        f"liger-kernel {meta.get('liger') or 'absent'}, cut-cross-entropy "
        f"{meta.get('cce') or 'absent'}",
        f"- time: {meta.get('timer', '?')} time, {meta.get('threads') or 'default'} thread(s); "
        "peak: memory the step adds on top of its inputs (resident set"
        + ("; allocator: the most torch's allocator held during one step" if allocator else "")
        + "); 1-minute load average per row in the CSV",
        f"- made by: `{command or ' '.join(['python', *sys.argv])}`",
        "",
    ]
    return "\n".join(about + lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        try:
            print(json.dumps(measure(spec)))
        except NotApplicable as why:
            print(json.dumps({"not_applicable": str(why)}))
        return 0

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    in_process = (device == "cuda" and not args.subprocess) or args.in_process
    if args.interpret and in_process:
        parser_error = "--interpret needs fresh processes (the interpreter is chosen at import)"
        print(parser_error, file=sys.stderr)
        return 2
    if args.zip_shapes and len(args.tokens) != len(args.vocab):
        print("--zip-shapes needs as many --tokens as --vocab values", file=sys.stderr)
        return 2
    args.dtype = args.dtype or ["bfloat16" if device == "cuda" else "float32"]
    warmup = args.warmup if args.warmup is not None else (3 if device == "cuda" else 1)
    repeat = args.repeat if args.repeat is not None else (10 if device == "cuda" else 1)
    timer = "cuda events" if device == "cuda" else args.timer
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    copy_gbps = copy_bandwidth(torch.device(device))
    common = {"date": date, "device": device_name(device), **versions(), "timer": timer}
    common.update(copy_gbps=round(copy_gbps, 1), threads=args.threads or "")
    print(f"{common['device']}: device-to-device copy {copy_gbps:.0f} GB/s", flush=True)
    notes = {"foak": []}
    if device != "cuda":
        notes["foak"].append(
            "cpu: foak = Triton interpreter" if args.interpret else "cpu: foak = torch path"
        )
    notes["cce"] = [f"cce impl={cce_impl(torch.device(device))}"]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    append = args.append and args.out.exists()
    if append:
        with args.out.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if tuple(header) != FIELDS:
            print(f"{args.out} has other columns ({header}); not appending", file=sys.stderr)
            return 1
    handle = args.out.open("a" if append else "w", newline="")
    writer = csv.DictWriter(handle, fieldnames=FIELDS)
    if not append:
        writer.writeheader()
    rows, skipped, said = [], {}, set()
    for kernel, dtype, tokens, vocab, ignored, phase in _grid(args):
        results: dict[str, list[dict]] = {}
        for _ in range(args.rounds):  # impls interleaved: a busy spell hits them all alike
            for impl in args.impls:
                if (kernel, impl) in skipped:
                    continue
                child_args = {**vars(args), "vocab": vocab, "warmup": warmup, "tokens": tokens}
                child_args.update(repeat=repeat, out=None, child=None, markdown=None)
                child_args.update(ignored_fraction=ignored, dtype=dtype, timer=args.timer)
                spec = {"kernel": kernel, "impl": impl, "pass": phase, "device": device}
                spec.update(dtype=dtype, args=child_args)
                try:
                    result = _run(spec, in_process, args.interpret)
                except Exception as err:  # one failure must not lose the other rows
                    print(f"{kernel}/{impl}/{phase} failed: {err}", file=sys.stderr)
                    if in_process and device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if "not_applicable" in result:
                    why = skipped[(kernel, impl)] = result["not_applicable"]
                    if impl in ("liger", "cce") and (impl, why) not in said:  # a peer: say why
                        print(f"skipping {impl}: {why}")
                        said.add((impl, why))
                    continue
                results.setdefault(impl, []).append(result)
                if in_process and device == "cuda":
                    torch.cuda.empty_cache()
        for impl, measured in results.items():
            row = {**common, "kernel": kernel, "impl": impl, "pass": phase, "dtype": dtype}
            row.update(combine(measured), ignored=ignored if kernel in LABELLED_KERNELS else "")
            row["bandwidth_fraction"] = round(row["gbps"] / copy_gbps, 3)
            row["load"] = round(os.getloadavg()[0], 2)
            note = list(notes.get(impl, []))
            if args.frozen_lm_head and kernel == "fused_linear_cross_entropy":
                note.append("lm_head frozen")
            if args.rounds > 1:
                note.append(f"best of {args.rounds} processes x {repeat} ({args.stat})")
            row["note"] = "; ".join(note)
            rows.append(row)
            writer.writerow(row)  # as it comes: a run stopped early keeps its rows
            handle.flush()
            shown = ("kernel", "impl", "dtype", "pass", "shape", "ignored", "ms", "peak_mb")
            print(", ".join(f"{k}={row[k]}" for k in shown), flush=True)
    handle.close()
    print(f"wrote {len(rows)} rows to {args.out}")
    if args.markdown:  # every row of the CSV: with --append, earlier runs' rows too
        with args.out.open(newline="") as handle:
            all_rows = list(csv.DictReader(handle))
        args.markdown.write_text(flce_markdown(all_rows, "Fused linear cross-entropy vs peers"))
        print(f"wrote {args.markdown}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
