"""Print (and write as markdown) the GPU suite's figures from its CSVs, against the issue's goals.

    python scripts/gpu/summarize.py scripts/benchmarks/refs   # reads gpu_*.csv there

Goals (benchmarks, not tests): each kernel at >= 85% of the copy bandwidth and no slower than
Liger-Kernel; fused linear CE at <= 1/10 of the unfused peak memory and >= 1.0x its speed, and
at least the speed of Liger-Kernel's and Cut Cross-Entropy's at no more memory (issue 24);
QLoRA + our kernels at >= 1.5x the tokens/s of HF QLoRA; the MoE experts at >= 3x the tokens/s
of transformers' default experts.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

BANDWIDTH_KERNELS = ("rms_norm", "rms_norm_head_dim", "rope", "cross_entropy", "swiglu")


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _f(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _variant(row: dict) -> str:
    """What distinguishes rows of one kernel and impl besides the pass (a frozen lm_head)."""
    return "lm_head frozen" if "lm_head frozen" in row.get("note", "") else ""


def _table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    value = _div(a, b)
    return "-" if value is None else f"{value:.{digits}f}x"


def kernels_section(rows: list[dict], goals: list[tuple[str, bool | None, str]]) -> str:
    """Bandwidth per kernel and pass: ours, Liger, HF eager, as % of the copy bandwidth."""
    index = {(r["kernel"], r["impl"], r["pass"], _variant(r)): r for r in rows}
    out = []
    for kernel in BANDWIDTH_KERNELS:
        for phase in ("forward", "backward", "full"):
            ours = index.get((kernel, "foak", phase, ""))
            if ours is None:
                continue
            liger = index.get((kernel, "liger", phase, ""))
            hf = index.get((kernel, "hf_eager", phase, ""))
            frac = _f(ours["bandwidth_fraction"])
            vs_liger = _div(_f(liger["ms"]), _f(ours["ms"])) if liger else None
            out.append(
                [
                    kernel,
                    phase,
                    ours["shape"],
                    ours["ms"],
                    ours["gbps"],
                    _pct(frac),
                    _pct(_f(liger["bandwidth_fraction"])) if liger else "-",
                    _pct(_f(hf["bandwidth_fraction"])) if hf else "-",
                    f"{vs_liger:.2f}x" if vs_liger else "-",
                ]
            )
            if phase == "full":
                goals.append(
                    (
                        f"{kernel}: >= 85% of copy bandwidth",
                        frac is not None and frac >= 0.85,
                        _pct(frac),
                    )
                )
                goals.append(
                    (
                        f"{kernel}: no slower than Liger",
                        None if vs_liger is None else vs_liger >= 1.0,
                        "-" if vs_liger is None else f"{vs_liger:.2f}x Liger's speed",
                    )
                )
    copy = rows[0]["copy_gbps"] if rows else "?"
    header = [
        "kernel",
        "pass",
        "shape",
        "ms",
        "GB/s",
        "% copy",
        "Liger % copy",
        "HF % copy",
        "speed vs Liger",
    ]
    return f"Device-to-device copy: {copy} GB/s.\n\n" + _table(header, out)


def loss_section(rows: list[dict]) -> str:
    """Fix 1: the causal LM loss on bf16 logits, ours vs the previous patch vs HF."""
    out = []
    hf = {r["pass"]: r for r in rows if r["kernel"] == "causal_lm_loss" and r["impl"] == "hf_eager"}
    for r in rows:
        if r["kernel"] != "causal_lm_loss":
            continue
        base = hf.get(r["pass"])
        memory = _ratio(_f(r["peak_mb"]), _f(base["peak_mb"])) if base else "-"
        speed = _ratio(_f(base["ms"]), _f(r["ms"])) if base else "-"
        out.append([r["impl"], r["pass"], r["shape"], r["ms"], r["peak_mb"], memory, speed])
    header = ["impl", "pass", "shape", "ms", "peak MB", "memory vs HF", "speed vs HF"]
    return _table(header, out)


PEERS = {"liger": "Liger", "cce": "Cut Cross-Entropy"}


def flce_section(rows: list[dict], goals: list[tuple[str, bool | None, str]]) -> str:
    """Fused linear CE: peak memory and time vs the unfused HF path, and ours vs each peer."""
    out = []
    picked = [
        r for r in rows if r["kernel"] == "fused_linear_cross_entropy" and r["pass"] == "full"
    ]
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in picked:
        groups.setdefault((r["shape"], _variant(r)), {})[r["impl"]] = r
    for (shape, note), impls in groups.items():
        unfused = impls.get("hf_eager") or impls.get("reference")
        ours = impls.get("foak")
        label = f"fused linear CE {shape} ({note or 'lm_head trained'})"
        for impl, r in impls.items():
            mem = _div(_f(r["peak_mb"]), _f(unfused["peak_mb"])) if unfused else None
            speed = _div(_f(unfused["ms"]), _f(r["ms"])) if unfused else None
            ours_time = _div(_f(ours["ms"]), _f(r["ms"])) if ours else None
            ours_mem = _div(_f(ours["peak_mb"]), _f(r["peak_mb"])) if ours else None
            out.append(
                [
                    shape,
                    note or "lm_head trained",
                    impl,
                    r["ms"],
                    r["peak_mb"],
                    "-" if mem is None else f"{mem:.3f}",
                    "-" if speed is None else f"{speed:.2f}x",
                    "-" if ours_time is None else f"{ours_time:.2f}",
                    "-" if ours_mem is None else f"{ours_mem:.2f}",
                ]
            )
            if impl == "foak" and unfused:
                goals.append(
                    (
                        f"{label}: <= 1/10 unfused memory",
                        None if mem is None else mem <= 0.1,
                        "-" if mem is None else f"{mem:.3f}",
                    )
                )
                goals.append(
                    (
                        f"{label}: >= 1.0x unfused speed",
                        None if speed is None else speed >= 1.0,
                        "-" if speed is None else f"{speed:.2f}x",
                    )
                )
            if impl in PEERS and ours:
                goals.append(
                    (
                        f"{label}: at least {PEERS[impl]}'s speed at no more memory",
                        ours_time is not None
                        and ours_mem is not None
                        and ours_time <= 1.0
                        and ours_mem <= 1.0,
                        f"time {_ratio(_f(ours['ms']), _f(r['ms']))}, memory "
                        f"{_ratio(_f(ours['peak_mb']), _f(r['peak_mb']))} of theirs",
                    )
                )
    header = ["tokens x hidden x vocab", "lm_head", "impl", "ms", "peak MB", "mem / unfused"]
    return _table([*header, "speed vs unfused", "ours' time / this", "ours' memory / this"], out)


def e2e_section(rows: list[dict], goals: list[tuple[str, bool | None, str]]) -> str:
    out = [
        [
            r["run"],
            r["model"],
            f"{r['batch']}x{r['seq']}",
            r["tokens_per_s"],
            r["peak_mb"],
            r.get("speedup_vs_hf") or "-",
            r.get("memory_vs_hf") or "-",
            r["status"],
        ]
        for r in rows
    ]
    for r in rows:
        if r["run"] == "qlora/foak":
            speedup = _f(r.get("speedup_vs_hf"))
            goals.append(
                (
                    "QLoRA + kernels: >= 1.5x HF QLoRA tokens/s",
                    None if speedup is None else speedup >= 1.5,
                    "-" if speedup is None else f"{speedup:.2f}x",
                )
            )
    header = ["run", "model", "batch x seq", "tokens/s", "peak MB", "speed vs HF", "mem vs HF"]
    return _table([*header, "status"], out)


def moe_section(rows: list[dict], goals: list[tuple[str, bool | None, str]]) -> str:
    """MoE experts layer: tokens/s of each implementation, ours vs transformers' default."""
    out = [
        [
            r["impl"],
            f"{r['tokens']} x {r['hidden']} x {r['intermediate']}, {r['experts']} experts "
            f"top-{r['top_k']}",
            r["dtype"],
            r["ms"],
            r["tokens_per_s"],
            r["peak_mb"],
            r.get("speedup_vs_default") or "-",
            r.get("speedup_vs_eager") or "-",
        ]
        for r in rows
    ]
    for r in rows:
        if r["impl"] == "scattermoe":
            speedup = _f(r.get("speedup_vs_default"))
            default = r.get("note", "").partition("default: ")[2].partition(";")[0] or "?"
            goals.append(
                (
                    f"MoE experts: >= 3x the tokens/s of transformers' default ({default})",
                    None if speedup is None else speedup >= 3.0,
                    "-" if speedup is None else f"{speedup:.2f}x",
                )
            )
    header = ["impl", "tokens x hidden x intermediate", "dtype", "ms", "tokens/s", "peak MB"]
    return _table([*header, "speed vs default", "speed vs eager"], out)


def tests_section(rows: list[dict]) -> str:
    header = ["passed", "failed", "errors", "skipped", "seconds", "failures"]
    return _table(header, [[r.get(k, "") for k in header] for r in rows])


def summarize(folder: Path) -> str:
    goals: list[tuple[str, bool | None, str]] = []
    kernels = _read(folder / "gpu_kernels.csv")
    e2e = _read(folder / "gpu_e2e.csv")
    tests = _read(folder / "gpu_tests.csv")
    moe = _read(folder / "gpu_moe.csv")
    meta = (kernels or e2e or moe or tests or [{}])[0]
    parts = [
        f"# GPU suite: {meta.get('device', '?')}, {meta.get('date', '?')}",
        f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, transformers "
        f"{meta.get('transformers', '?')}, liger-kernel {meta.get('liger') or 'absent'}, "
        f"cut-cross-entropy {meta.get('cce') or 'absent'}",
    ]
    if tests:
        parts += ["## Tests on CUDA", tests_section(tests)]
    if kernels:
        parts += ["## Kernels (bandwidth)", kernels_section(kernels, goals)]
        parts += ["## Causal LM loss on bf16 logits (fix 1)", loss_section(kernels)]
        parts += ["## Fused linear cross-entropy", flce_section(kernels, goals)]
    if e2e:
        parts += ["## End to end", e2e_section(e2e, goals)]
    if moe:
        parts += ["## MoE experts (accelerated-moe)", moe_section(moe, goals)]
    if goals:
        mark = {True: "met", False: "NOT met", None: "not measured"}
        rows = [[name, mark[ok], value] for name, ok, value in goals]
        parts += ["## Goals", _table(["goal", "status", "measured"], rows)]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--write", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    text = summarize(args.folder)
    print(text)
    if args.write:
        args.write.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
