"""The client in CI: fms-hf-tuning's own entry point, `python -m tuning.sft_trainer`, trains a tiny
Llama (a tiny Mixtral for fast_moe) with every acceleration it documents that runs on a CPU, each
in its own process.

    python scripts/client/sft_matrix.py --output DIR [--only ROW ...] [--table PREFIX]

Writes the table (acceleration x trained/refused/crashed, first/last loss, ratio to the reference
run) to DIR/sft_matrix.{md,csv} and, with --table, to PREFIX.{md,csv}; each run's log goes under
DIR/runs/<row>/. Exits 1 when a row that should train does not, or its losses do not match its
reference run's.
Run it through `tox -e client`, which installs the client beside our packages.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from sft_fixtures import build_fixtures, quantize_gptq, save_moe_model
from sft_report import csv_text, judge, markdown, table_rows
from sft_rows import ROWS, STEPS, Row, rows_by_name
from sft_runs import RunResult, run_row

VERSIONS_OF = (
    "fms-hf-tuning",
    "transformers",
    "peft",
    "accelerate",
    "trl",
    "torch",
    "bitsandbytes",
    "fms-acceleration",
    "fms-acceleration-peft",
    "fms-acceleration-foak",
    "fms-acceleration-aadp",
    "fms-acceleration-moe",
    "fms-acceleration-odm",
)


def selected_rows(names: list[str] | None) -> tuple[Row, ...]:
    """The rows asked for with the rows they are checked against, in matrix order."""
    named = rows_by_name()
    if not names:
        return ROWS
    unknown = [n for n in names if n not in named]
    if unknown:
        raise SystemExit(f"--only {' '.join(unknown)}: no such row; rows: {', '.join(named)}")
    wanted: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            check = named[name].check
            if check is not None:
                pending.append(check.against)
    return tuple(r for r in ROWS if r.name in wanted)


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def run_context() -> dict[str, str]:
    """Date, device and versions of this run (CONTEXT_COLUMNS): each CSV row's last columns."""
    try:
        cpu_flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        cpu_flags = ""
    avx = " ".join(f for f in ("avx512f", "avx512_bf16") if f" {f}" in cpu_flags) or "neither"
    versions = ", ".join(f"{d} {_version(d)}" for d in VERSIONS_OF)
    return {
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "device": f"cpu: {platform.machine()}, {os.cpu_count()} cores, AVX-512 flags: {avx}",
        "versions": f"python {platform.python_version()}, {versions}",
    }


def header(context: dict[str, str]) -> str:
    """The markdown table's title, run context and how rows are compared."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        "# fms-hf-tuning's sft_trainer over our plugins\n\n"
        f"- date: {context['date']}\n"
        f"- device: {context['device']}; 1-minute load {load:.1f} at the end; "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}\n"
        f"- {context['versions']}\n"
        f"- {STEPS} optimizer steps per run, `python -m tuning.sft_trainer` in its own process; "
        "max deviation: the largest relative difference of a loss from the reference row's "
        "(every step, or the first and last loss only), failing above the tolerance\n\n"
    )


def _interpret_triton_without_cuda() -> None:
    # as the repository's conftest does: the fast kernels' Triton code runs in the interpreter
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"


def base_models(rows: tuple[Row, ...], output: Path) -> tuple[dict[str, Path | str], Path]:
    """({base: its model folder, or why it could not be made}, the dataset) for `rows`."""
    fixtures = output / "fixtures"
    model, data = build_fixtures(fixtures)
    builders = {
        "gptq": lambda: quantize_gptq(
            model, data, fixtures / "tiny-llama-gptq", output / "gptq.log"
        ),
        "mixtral": lambda: save_moe_model(fixtures),
    }
    bases: dict[str, Path | str] = {"llama": model}
    for base in sorted({r.base for r in rows} - set(bases)):
        try:
            bases[base] = builders[base]()
        except RuntimeError as err:
            bases[base] = str(err)
    return bases, data


def run_matrix(rows: tuple[Row, ...], output: Path) -> dict[str, RunResult]:
    """Build the models the rows train, then run every row; a row whose model could not be
    made crashed, with the reason."""
    bases, data = base_models(rows, output)
    results: dict[str, RunResult] = {}
    for row in rows:
        base = bases[row.base]
        if isinstance(base, str):
            results[row.name] = RunResult("crashed", reason=base)
        else:
            print(f"sft_matrix: {row.name} ...", flush=True)
            results[row.name] = run_row(row, base, data, output / "runs" / row.name, STEPS)
            print(f"sft_matrix: {row.name}: {results[row.name].outcome}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="a new or empty folder")
    parser.add_argument("--only", nargs="+", help="these rows (and their references) only")
    parser.add_argument(
        "--table",
        type=Path,
        help="also write the table to TABLE.md and TABLE.csv (e.g. "
        "scripts/benchmarks/refs/client_sft_matrix_cpu)",
    )
    args = parser.parse_args(argv)
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        parser.error(f"--output {args.output}: exists and is not an empty folder")
    rows = selected_rows(args.only)
    args.output.mkdir(parents=True, exist_ok=True)
    _interpret_triton_without_cuda()
    results = run_matrix(rows, args.output)
    verdicts = {}
    for row in rows:
        verdicts[row.name] = judge(row, results[row.name], results)
    table = table_rows(rows, results, verdicts)
    context = run_context()
    text = header(context) + markdown(table)
    for prefix in (args.output / "sft_matrix", *([args.table] if args.table else [])):
        prefix.with_suffix(".md").write_text(text, encoding="utf-8")
        prefix.with_suffix(".csv").write_text(csv_text(table, context), encoding="utf-8")
    print(text)
    failed = [name for name, v in verdicts.items() if v.verdict == "FAIL"]
    if failed:
        print(f"sft_matrix: FAILED: {', '.join(failed)} (logs under {args.output}/runs)")
        return 1
    print(f"sft_matrix: every row that runs trained and matched; table in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
