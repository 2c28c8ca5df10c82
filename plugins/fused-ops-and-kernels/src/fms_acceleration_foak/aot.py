"""Ahead-of-time compile of every Triton kernel for CUDA targets, on a machine with no GPU.

    python -m fms_acceleration_foak.aot                       # sm_80 + sm_90, table on stdout
    python -m fms_acceleration_foak.aot --targets 90 --json aot.json

The kernels' own launch code runs on meta tensors at realistic shapes (Llama-3-8B and
SmolLM2-135M: hidden 4096 / 576, head_dim 128 / 64, vocab 128256 / 49152, intermediate
14336 / 1536, and a 16384-wide RMSNorm row) in fp16, bf16 and fp32, forward and backward. Each
launch is recorded instead of run, bound to Triton's own specialisation for the target (the
signature, constexprs and divisibility attributes a real launch would produce) and compiled by
triton.compile, ptxas included; ptxas's -v report gives registers and spills.

A kernel that only works in the Triton interpreter fails here. TRITON_INTERPRET must be unset
before triton is imported, so run this in a fresh process (the test suite does).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise RuntimeError(
        "fms_acceleration_foak.aot compiles real kernels: unset TRITON_INTERPRET before "
        "starting Python (the interpreter replaces every @triton.jit kernel)"
    )

import torch
import triton

from . import kernels as K


def _module(name: str) -> ModuleType:
    # the package re-exports functions under the submodules' names: import the modules
    return importlib.import_module(f"{__package__}.kernels.{name}")


KERNEL_MODULES: tuple[ModuleType, ...] = tuple(
    _module(n) for n in ("rms_norm", "rope", "cross_entropy", "swiglu")
)
FLCE_MODULE = _module("fused_linear_cross_entropy")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENS = 16384


@dataclass
class Launch:
    """One recorded launch: the kernel, its arguments and its launch options."""

    kernel: Any
    args: tuple
    meta: dict
    workload: str


@dataclass
class Compiled:
    """One compiled specialisation and what ptxas reported for it."""

    kernel: str
    target: str
    dtype: str
    workload: str
    num_warps: int
    constexprs: str
    registers: int
    spill_stores: int
    spill_loads: int
    seconds: float


# --- recording the launch code ------------------------------------------------------------------


@contextlib.contextmanager
def recording() -> Iterator[tuple[list[Launch], dict[str, str]]]:
    """Route every kernel launch into a list; Triton paths on for meta tensors.

    Nothing is patched to avoid host syncs: meta tensors have no values, so a launch path that
    read one (a label check, a count) would fail here."""
    launches: list[Launch] = []
    current = {"workload": ""}

    def record(kernel, grid, device, *args, **meta):
        launches.append(Launch(kernel, args, meta, current["workload"]))

    saved = []
    patches = [(m, "launch", record) for m in KERNEL_MODULES]
    patches += [(m, "use_triton", lambda *t: True) for m in (*KERNEL_MODULES, FLCE_MODULE)]
    for module, name, value in patches:
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)
    try:
        yield launches, current
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def _meta(*shape: int, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)


def _backward(*outputs: torch.Tensor) -> None:
    torch.autograd.backward(list(outputs), [torch.empty_like(o) for o in outputs])


def _rms(hidden: int, rows: int) -> Callable[[torch.dtype], None]:
    def run(dtype):
        _backward(K.rms_norm(_meta(rows, hidden, dtype=dtype), _meta(hidden, dtype=dtype)))

    return run


def _rope(heads: int, kv_heads: int, head_dim: int, table_fp32: bool = False):
    def run(dtype):
        batch, seq = 4, TOKENS // 4
        q = _meta(batch, seq, heads, head_dim, dtype=dtype).transpose(1, 2)
        k = _meta(batch, seq, kv_heads, head_dim, dtype=dtype).transpose(1, 2)
        table = torch.float32 if table_fp32 else dtype
        cos = _meta(1, seq, head_dim, dtype=table, grad=False)
        _backward(*K.rope(q, k, cos, cos.clone()))

    return run


def _cross_entropy(vocab: int):
    def run(dtype):
        target = torch.empty(TOKENS, device="meta", dtype=torch.long)
        _backward(K.cross_entropy(_meta(TOKENS, vocab, dtype=dtype), target))

    return run


def _fused_linear_ce(hidden: int, vocab: int):
    def run(dtype):
        target = torch.empty(TOKENS, device="meta", dtype=torch.long)
        h, w = _meta(TOKENS, hidden, dtype=dtype), _meta(vocab, hidden, dtype=dtype)
        divisor = torch.empty((), device="meta")
        # the Function itself: autocast has no meta device for the public wrapper to ask
        apply = FLCE_MODULE.FusedLinearCrossEntropyFunction.apply
        _backward(apply(h, w, target, None, -100, divisor, None, True))

    return run


def _swiglu(intermediate: int, packed: bool = False):
    def run(dtype):
        if packed:
            _backward(K.swiglu_packed(_meta(TOKENS, 2 * intermediate, dtype=dtype)))
            return
        gate, up = (_meta(TOKENS, intermediate, dtype=dtype) for _ in range(2))
        _backward(K.swiglu(gate, up))
        # the fused LoRA MLP's backward: h, dgate and dup in one pass
        KERNEL_MODULES[3].swiglu_backward(gate.detach(), gate.detach(), up.detach(), want_h=True)

    return run


# (name, run, shape set): "llama" runs in every dtype, "small" in bf16 only (fewer compiles)
WORKLOADS: tuple[tuple[str, Callable[[torch.dtype], None], str], ...] = (
    ("rms_norm hidden 4096", _rms(4096, TOKENS), "llama"),
    ("rms_norm head_dim 128 rows", _rms(128, TOKENS * 32), "llama"),
    ("rms_norm hidden 576", _rms(576, TOKENS), "small"),
    ("rms_norm head_dim 64 rows", _rms(64, TOKENS * 9), "small"),
    ("rms_norm hidden 8192", _rms(8192, TOKENS), "small"),
    ("rms_norm hidden 16384 (chunked)", _rms(16384, 2048), "llama"),
    ("rope 32/8 heads x 128", _rope(32, 8, 128), "llama"),
    ("rope 32/8 heads x 128, fp32 tables (autocast)", _rope(32, 8, 128, True), "small"),
    ("rope 9/3 heads x 64", _rope(9, 3, 64), "small"),
    ("cross_entropy vocab 128256", _cross_entropy(128256), "llama"),
    ("cross_entropy vocab 49152", _cross_entropy(49152), "small"),
    ("fused_linear_ce 4096 x 128256", _fused_linear_ce(4096, 128256), "llama"),
    ("fused_linear_ce 576 x 49152", _fused_linear_ce(576, 49152), "small"),
    ("swiglu intermediate 14336", _swiglu(14336), "llama"),
    ("swiglu intermediate 1536", _swiglu(1536), "small"),
    ("swiglu packed experts 14336", _swiglu(14336, packed=True), "llama"),
)


def record_launches(dtypes: list[str], small_dtypes: list[str]) -> list[tuple[str, Launch]]:
    """Every launch the launch code makes for the workloads, with the dtype it ran in."""
    out: list[tuple[str, Launch]] = []
    with recording() as (launches, current):
        for name, run, shape_set in WORKLOADS:
            for dtype_name in dtypes if shape_set == "llama" else small_dtypes:
                current["workload"] = name
                start = len(launches)
                run(DTYPES[dtype_name])
                out += [(dtype_name, launch) for launch in launches[start:]]
    return out


# --- compiling ----------------------------------------------------------------------------------

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _bind(launch: Launch, target) -> tuple[dict, dict, dict, Any]:
    """Triton's specialisation of this launch for `target`: signature, constexprs, attrs."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.meta)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return signature, constexprs, attrs, options


def compile_launch(
    launch: Launch, capability: int, dtype: str, seen: set[tuple]
) -> Compiled | None:
    """Compile one launch for sm_<capability> (None when that specialisation was compiled)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    signature, constexprs, attrs, options = _bind(launch, target)
    name = launch.kernel.fn.__name__
    key = (
        name,
        capability,
        tuple(signature.items()),
        tuple(sorted((str(k), repr(v)) for k, v in constexprs.items())),
        tuple(sorted((str(k), repr(v)) for k, v in attrs.items())),
        options.num_warps,
    )
    if key in seen:
        return None
    seen.add(key)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        triton.compile(
            ASTSource(launch.kernel, signature, constexprs, attrs),
            target=target,
            options=options.__dict__,
        )
    seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = [int(m) for m in _REGS.findall(text)]
    spills = [(int(a), int(b)) for a, b in _SPILLS.findall(text)]
    if not regs:
        raise RuntimeError(f"{name} sm_{capability}: no ptxas report in:\n{text}")
    named = {
        launch.kernel.arg_names[k[0]] if isinstance(k, tuple) else k: v
        for k, v in constexprs.items()
    }
    return Compiled(
        kernel=name,
        target=f"sm_{capability}",
        dtype=dtype,
        workload=launch.workload,
        num_warps=options.num_warps,
        constexprs=", ".join(f"{k}={v}" for k, v in named.items()),
        registers=max(regs),
        spill_stores=sum(s for s, _ in spills),
        spill_loads=sum(lo for _, lo in spills),
        seconds=round(seconds, 2),
    )


def jit_kernels() -> dict[str, Any]:
    """Every @triton.jit function of the kernel modules, by name."""
    from triton.runtime.jit import JITFunction

    return {
        name: obj
        for module in KERNEL_MODULES
        for name, obj in vars(module).items()
        if isinstance(obj, JITFunction)
    }


def uncovered(launched: set[str]) -> list[str]:
    """Entry kernels never launched, and helpers that no launched kernel calls, directly or
    through other helpers."""
    kernels = jit_kernels()
    reached = {name for name in launched if name in kernels}
    pending = list(reached)
    while pending:
        source = kernels[pending.pop()].src
        for name in kernels:
            if name not in reached and f"{name}(" in source:
                reached.add(name)
                pending.append(name)
    return sorted(name for name in kernels if name not in reached)


def run(targets: list[int], dtypes: list[str], small_dtypes: list[str]) -> dict:
    """Record, compile every distinct specialisation for every target; a JSON-able report."""
    launches = record_launches(dtypes, small_dtypes)
    seen: set[tuple] = set()
    results: list[Compiled] = []
    failures: list[str] = []
    for capability in targets:
        for dtype, launch in launches:
            try:
                result = compile_launch(launch, capability, dtype, seen)
            except Exception as err:  # report every failing kernel, not just the first
                failures.append(
                    f"{launch.kernel.fn.__name__} sm_{capability} {dtype} ({launch.workload}): "
                    f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
                )
                continue
            if result is not None:
                results.append(result)
    launched = {launch.kernel.fn.__name__ for _, launch in launches}
    return {
        "triton": triton.__version__,
        "targets": [f"sm_{t}" for t in targets],
        "compiled": [asdict(r) for r in results],
        "failures": failures,
        "uncovered": uncovered(launched),
    }


def format_table(report: dict) -> str:
    """The report as an aligned text table, one row per compiled specialisation."""
    header = ("kernel", "target", "dtype", "warps", "regs", "spill st/ld", "workload", "constexprs")
    rows = [
        (
            r["kernel"],
            r["target"],
            r["dtype"],
            str(r["num_warps"]),
            str(r["registers"]),
            f"{r['spill_stores']}/{r['spill_loads']}",
            r["workload"],
            r["constexprs"],
        )
        for r in report["compiled"]
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in (header, *rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument(
        "--small-dtypes",
        nargs="+",
        choices=list(DTYPES),
        default=["bfloat16"],
        help="dtypes of the second (SmolLM2-sized, 8192-wide) shape set",
    )
    parser.add_argument("--json", type=str, default=None, help="write the report here")
    args = parser.parse_args(argv)
    # a fresh cache, so ptxas really runs (and reports) for every kernel
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="foak-aot-"))
    start = time.perf_counter()
    report = run(args.targets, args.dtypes, args.small_dtypes)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(format_table(report))
    spilled = [r for r in report["compiled"] if r["spill_stores"] or r["spill_loads"]]
    print(
        f"\n{len(report['compiled'])} specialisations compiled for {', '.join(report['targets'])} "
        f"with triton {report['triton']} in {report['seconds']} s; {len(spilled)} spill; "
        f"{len(report['failures'])} failed; uncovered: {report['uncovered'] or 'none'}"
    )
    for failure in report["failures"]:
        print(f"FAILED {failure}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
    return 1 if report["failures"] or report["uncovered"] else 0


if __name__ == "__main__":
    sys.exit(main())
