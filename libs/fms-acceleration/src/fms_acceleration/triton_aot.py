"""Ahead-of-time compile of a package's Triton kernels for CUDA targets, with no GPU.

A package describes its kernels in an AOT spec (its own `aot` module): the modules holding
its @triton.jit kernels, and a function that runs its launch code on meta tensors at realistic
shapes while its launch seam records each launch (a `Launch`) instead of running it. This
module binds every recorded launch to Triton's own specialisation for the target (signature,
constexprs, divisibility attributes), compiles it with triton.compile (ptxas included), reads
registers and spills from ptxas's report, and lists kernels no launch reaches.

TRITON_INTERPRET must be unset before triton is imported: run a spec in a fresh process.
Nothing here imports triton at module import.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

DTYPE_NAMES = ("float16", "bfloat16", "float32")


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


# (dtype names of the large shape set, of the small one) -> [(dtype name, launch), ...]
Recorder = Callable[[list[str], list[str]], list[tuple[str, Launch]]]
# (name, run(torch dtype): the launch code on meta tensors, shape set: "large" or "small")
Workload = tuple[str, Callable[[Any], None], str]

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def refuse_interpreter(package: str) -> None:
    """Fail early when the Triton interpreter is on (it replaces every @triton.jit kernel)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            f"{package} compiles real kernels: unset TRITON_INTERPRET before starting Python "
            "(the interpreter replaces every @triton.jit kernel)"
        )


@contextlib.contextmanager
def _patched(patches: list[tuple[ModuleType, str, Any]]) -> Iterator[None]:
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def record_workloads(
    workloads: Sequence[Workload],
    dtypes: list[str],
    small_dtypes: list[str],
    launchers: Sequence[ModuleType],
    dispatchers: Sequence[ModuleType] = (),
) -> list[tuple[str, Launch]]:
    """Every launch the workloads make, with the dtype name each ran in: "large" workloads in
    `dtypes`, "small" ones in `small_dtypes`.

    Each module of `launchers` has the launch seam `launch(kernel, grid, device, *args,
    **meta)`, replaced by a recorder while the workloads run; each of `dispatchers` has a
    `use_triton(*tensors)`, made to say yes for meta tensors. Nothing else is patched: meta
    tensors have no values, so launch code that syncs on one (a label check, a count) fails.
    """
    import torch

    launches: list[tuple[str, Launch]] = []
    current = {"workload": "", "dtype": ""}

    def record(kernel: Any, grid: Any, device: Any, *args: Any, **meta: Any) -> None:
        launches.append((current["dtype"], Launch(kernel, args, meta, current["workload"])))

    patches: list[tuple[ModuleType, str, Any]] = [(m, "launch", record) for m in launchers]
    patches += [(module, "use_triton", lambda *tensors: True) for module in dispatchers]
    with _patched(patches):
        for name, run, shape_set in workloads:
            for dtype_name in dtypes if shape_set == "large" else small_dtypes:
                current.update(workload=name, dtype=dtype_name)
                run(getattr(torch, dtype_name))
    return launches


def _bind(launch: Launch, target: Any) -> tuple[dict, dict, dict, Any]:
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
    import triton
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


def jit_kernels(modules: Sequence[ModuleType]) -> dict[str, Any]:
    """Every @triton.jit function of the kernel modules, by name."""
    from triton.runtime.jit import JITFunction

    return {
        name: obj
        for module in modules
        for name, obj in vars(module).items()
        if isinstance(obj, JITFunction)
    }


def uncovered(modules: Sequence[ModuleType], launched: set[str]) -> list[str]:
    """Entry kernels never launched, and helpers that no launched kernel calls, directly or
    through other helpers."""
    kernels = jit_kernels(modules)
    reached = {name for name in launched if name in kernels}
    pending = list(reached)
    while pending:
        source = kernels[pending.pop()].src
        for name in kernels:
            if name not in reached and f"{name}(" in source:
                reached.add(name)
                pending.append(name)
    return sorted(name for name in kernels if name not in reached)


def compile_report(
    launches: list[tuple[str, Launch]], modules: Sequence[ModuleType], targets: list[int]
) -> dict:
    """Compile every distinct specialisation for every target; a JSON-able report."""
    import triton

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
        "uncovered": uncovered(modules, launched),
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


def main(
    description: str,
    record: Recorder,
    modules: Sequence[ModuleType],
    argv: list[str] | None = None,
    small_shape_set: str = "the second (smaller) shape set",
) -> int:
    """The command line of a package's AOT spec: compile, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--targets", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPE_NAMES, default=list(DTYPE_NAMES))
    parser.add_argument(
        "--small-dtypes",
        nargs="+",
        choices=DTYPE_NAMES,
        default=["bfloat16"],
        help=f"dtypes of {small_shape_set}",
    )
    parser.add_argument("--json", type=str, default=None, help="write the report here")
    args = parser.parse_args(argv)
    # a fresh cache, so ptxas really runs (and reports) for every kernel
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-aot-"))
    start = time.perf_counter()
    report = compile_report(record(args.dtypes, args.small_dtypes), modules, args.targets)
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
