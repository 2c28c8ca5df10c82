"""Run the benchmark scenarios of scenarios.yaml, each training run in its own process.

    python scripts/benchmarks/run_benchmarks.py                      # scenarios for this device
    python scripts/benchmarks/run_benchmarks.py --only qlora-bnb --output-dir /tmp/bench

Each run is `python -m fms_acceleration_train` (the same job as `fms-acceleration train`)
with a sample configuration; its train_summary.json gives tokens/s, peak memory (process peak
RSS on CPU, torch peak allocated on GPU) and the final loss. A run that fails or times out is
recorded with its status and the rest go on. Results: a CSV, a markdown table with each
accelerated run's ratio to its scenario's baseline, and a PNG chart.

Then the file's kernel_benchmarks for the device run scripts/benchmarks/benchmark_kernels.py:
our kernels against peer libraries (Cut Cross-Entropy, Liger-Kernel; skipped with the reason
printed when not installed), all rows in one CSV (kernels_DEVICE.csv, device, versions and date
on each row) with a markdown table of our ratios to each peer (kernels_DEVICE.md).
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
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from fms_acceleration.yaml_loading import read_yaml_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SAMPLES = ROOT / "sample-configurations"
BASELINE = "none"  # label of a run without an acceleration config


@dataclass
class Run:
    """One training run of a scenario and what it measured."""

    scenario: str
    framework_config: str
    model: str
    status: str = "not run"
    train_tokens_per_s: float | None = None
    wall_time_s: float | None = None
    train_runtime_s: float | None = None
    peak_memory_mib: float | None = None
    final_loss: float | None = None
    first_loss: float | None = None
    error: str = ""
    log: str = ""


@dataclass(frozen=True)
class Scenario:
    """A named group of runs: the same arguments with each framework config and model."""

    name: str
    device: str
    framework_configs: tuple[str, ...]
    baseline: str
    arguments: dict[str, Any]
    models: tuple[str | None, ...]
    config_overrides: dict[str, dict[str, Any]]
    timeout_s: int


def load_scenarios(path: Path) -> list[Scenario]:
    """Parse scenarios.yaml; raise ValueError naming the scenario and key that is wrong."""
    data = read_yaml_file(path, "scenarios", ValueError) or {}
    out = []
    for index, raw in enumerate(data.get("scenarios") or []):
        name = raw.get("name") or f"#{index}"
        unknown = set(raw) - {
            "name", "device", "framework_config", "baseline", "arguments", "models",
            "config_overrides", "timeout_s", "description",
        }  # fmt: skip
        if unknown:
            raise ValueError(f"{path}: scenario {name}: unknown key(s) {sorted(unknown)}")
        if raw.get("device") not in ("cpu", "cuda"):
            raise ValueError(f"{path}: scenario {name}: device must be cpu or cuda")
        configs = tuple(c or BASELINE for c in (raw.get("framework_config") or [None]))
        baseline = raw.get("baseline") or BASELINE
        if baseline not in configs:
            raise ValueError(
                f"{path}: scenario {name}: baseline {baseline!r} is not one of {configs}"
            )
        out.append(
            Scenario(
                name=name,
                device=raw["device"],
                framework_configs=configs,
                baseline=baseline,
                arguments=dict(raw.get("arguments") or {}),
                models=tuple(raw.get("models") or [None]),
                config_overrides=dict(raw.get("config_overrides") or {}),
                timeout_s=int(raw.get("timeout_s", 600)),
            )
        )
    return out


@dataclass(frozen=True)
class KernelBenchmark:
    """A benchmark_kernels.py invocation: its options (without the leading "--")."""

    name: str
    device: str
    arguments: dict[str, Any]
    timeout_s: int


def load_kernel_benchmarks(path: Path) -> list[KernelBenchmark]:
    """The kernel_benchmarks of scenarios.yaml; ValueError naming the entry and key that is
    wrong (an option benchmark_kernels.py does not have included)."""
    import benchmark_kernels

    data = read_yaml_file(path, "scenarios", ValueError) or {}
    out = []
    for index, raw in enumerate(data.get("kernel_benchmarks") or []):
        name = raw.get("name") or f"#{index}"
        unknown = set(raw) - {"name", "device", "arguments", "timeout_s", "description"}
        if unknown:
            raise ValueError(f"{path}: kernel benchmark {name}: unknown key(s) {sorted(unknown)}")
        if raw.get("device") not in ("cpu", "cuda"):
            raise ValueError(f"{path}: kernel benchmark {name}: device must be cpu or cuda")
        arguments = dict(raw.get("arguments") or {})
        try:
            benchmark_kernels.parse_args(_cli_arguments(arguments))
        except SystemExit:
            raise ValueError(
                f"{path}: kernel benchmark {name}: arguments {arguments} are not options of "
                "benchmark_kernels.py (see its --help)"
            ) from None
        out.append(KernelBenchmark(name, raw["device"], arguments, int(raw.get("timeout_s", 1800))))
    return out


def run_kernel_benchmark(bench: KernelBenchmark, csv_path: Path, append: bool) -> str:
    """Run one kernel benchmark in a child process, its rows into csv_path; its status."""
    command = [sys.executable, str(HERE / "benchmark_kernels.py"), "--device", bench.device]
    command += [*_cli_arguments(bench.arguments), "--out", str(csv_path)]
    command += ["--append"] if append else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(command, env=env, timeout=bench.timeout_s)
    except subprocess.TimeoutExpired:
        return f"timeout after {bench.timeout_s} s"
    return "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def config_file(shortname: str, overrides: dict[str, Any], work: Path) -> Path:
    """The sample's YAML, or a copy with `overrides` (dotted paths under plugins:) applied."""
    sample = SAMPLES / f"{shortname}-sample-configuration.yaml"
    if not sample.is_file():
        raise FileNotFoundError(f"no sample configuration {sample.relative_to(ROOT)}")
    if not overrides:
        return sample
    data = read_yaml_file(sample, "sample configuration", ValueError)
    for dotted, value in overrides.items():
        _set_dotted(data["plugins"], dotted, value)
    path = work / f"{shortname}-override.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _cli_arguments(arguments: dict[str, Any]) -> list[str]:
    args = []
    for key, value in arguments.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return " | ".join(line.strip()[-200:] for line in text[-lines:])


def execute(
    scenario: Scenario, shortname: str, model: str | None, work: Path, threads: int | None = None
) -> Run:
    """Train once in a child process and read its train_summary.json."""
    run = Run(scenario.name, shortname, model or "SmolLM2-135M-Instruct (embedded)")
    out_dir = work / f"{scenario.name}--{shortname}--{len(list(work.iterdir()))}"
    out_dir.mkdir(parents=True)
    log = out_dir / "log.txt"
    run.log = str(log)
    train_dir = out_dir / "train"  # the job refuses a folder that already holds files (the log)
    command = [sys.executable, "-m", "fms_acceleration_train", "--output-dir", str(train_dir)]
    try:
        if shortname == BASELINE:
            # the job's own default is accelerated: the baseline must ask for none
            command.append("--no-acceleration")
        else:
            overrides = scenario.config_overrides.get(shortname, {})
            command += ["--acceleration-config", str(config_file(shortname, overrides, out_dir))]
    except FileNotFoundError as e:
        run.status, run.error = "missing config", str(e)
        return run
    if model:
        command += ["--model", model]
    command += _cli_arguments(scenario.arguments)
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        f.write(" ".join(command) + "\n")
        f.flush()
        try:
            proc = subprocess.run(
                command, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=scenario.timeout_s
            )
        except subprocess.TimeoutExpired:
            run.status, run.error = "timeout", f"no result after {scenario.timeout_s} s"
            run.wall_time_s = round(time.perf_counter() - start, 1)
            return run
    run.wall_time_s = round(time.perf_counter() - start, 1)
    summary_file = train_dir / "train_summary.json"
    if proc.returncode != 0 or not summary_file.is_file():
        run.status, run.error = f"failed (exit {proc.returncode})", _tail(log)
        return run
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    run.status = "ok"
    run.train_tokens_per_s = summary["train_tokens_per_s"]
    run.train_runtime_s = summary["train_runtime_s"]
    run.peak_memory_mib = summary["peak_memory_mib"]
    run.final_loss = summary["last_loss"]
    run.first_loss = summary["first_loss"]
    return run


def environment() -> dict[str, str]:
    """Device, versions and date recorded with the results."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "triton",
                 "fms-acceleration", "fms-acceleration-peft", "fms-acceleration-foak",
                 "fms-acceleration-fts", "fms-acceleration-aadp",
                 "fms-acceleration-moe"):  # fmt: skip
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "python": platform.python_version(),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def _fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def markdown(runs: list[Run], scenarios: list[Scenario], env: dict[str, str], note: str) -> str:
    """A markdown table; ratios are to the scenario's baseline run on the same model."""
    baselines = {s.name: s.baseline for s in scenarios}
    base_of = {
        (r.scenario, r.model): r
        for r in runs
        if r.framework_config == baselines[r.scenario] and r.status == "ok"
    }
    lines = [
        "# Benchmarks: `fms-acceleration train` per scenario",
        "",
        f"- date: {env['date']}",
        f"- device: {env['device']}",
        f"- python {env['python']}; {env['versions']}",
        "- tokens/s: non-padding training tokens / Trainer train_runtime; memory: "
        + ("torch peak allocated" if "cpu:" not in env["device"] else "process peak RSS"),
        "- ratio columns: this run / the scenario's baseline run (baseline marked *)",
    ]
    if "load" in env:
        lines.append(f"- machine load: {env['load']}")
    if note:
        lines.append(f"- note: {note}")
    lines += [
        "",
        "| scenario | framework config | model | status | train tokens/s | speed vs baseline "
        "| peak memory MiB | memory vs baseline | first loss | final loss | wall s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        base = base_of.get((r.scenario, r.model))
        mark = "*" if r.framework_config == baselines[r.scenario] else ""
        status = r.status if r.status == "ok" else f"{r.status}: {r.error[:120]}"
        lines.append(
            f"| {r.scenario} | {r.framework_config}{mark} | {r.model} | {status} "
            f"| {_fmt(r.train_tokens_per_s, '.1f')} "
            f"| {_ratio(r.train_tokens_per_s, base and base.train_tokens_per_s)} "
            f"| {_fmt(r.peak_memory_mib, '.0f')} "
            f"| {_ratio(r.peak_memory_mib, base and base.peak_memory_mib)} "
            f"| {_fmt(r.first_loss, '.4f')} | {_fmt(r.final_loss, '.4f')} "
            f"| {_fmt(r.wall_time_s, '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def chart(runs: list[Run], env: dict[str, str], path: Path) -> None:
    """Bar chart of tokens/s and peak memory per run (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if r.status == "ok"]
    labels = [f"{r.scenario}\n{r.framework_config}" for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(ok) + 4), 5.5))
    for ax, attr, title in (
        (axes[0], "train_tokens_per_s", "train tokens/s (higher is better)"),
        (axes[1], "peak_memory_mib", "peak memory MiB (lower is better)"),
    ):
        values = [getattr(r, attr) for r in ok]
        bars = ax.bar(range(len(ok)), values, color="tab:blue")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(ok)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
    fig.suptitle(f"fms-acceleration train: {env['device']}, {env['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(runs: list[Run], path: Path, env: dict[str, str]) -> None:
    """One row per run with every measured field, plus the date, device and versions."""
    # The log path points into a temporary folder: useful on screen, noise in a checked-in CSV.
    extra = {k: env[k] for k in ("date", "device", "versions")}
    fields = [f for f in Run.__dataclass_fields__ if f != "log"] + list(extra)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in runs:
            writer.writerow({**{k: v for k, v in asdict(r).items() if k != "log"}, **extra})


def run_kernel_benchmarks(
    benches: list[KernelBenchmark], args: argparse.Namespace, device: str, started: float
) -> None:
    """Run the kernel benchmarks into one CSV, then its table of ratios to the peers."""
    import benchmark_kernels

    stem = args.output_dir / (f"{args.name}_kernels" if args.name else f"kernels_{device}")
    csv_path = stem.with_suffix(".csv")
    done = 0
    for bench in benches:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            print(f"{bench.name}: skipped, time budget of {args.budget_s:.0f} s spent")
            continue
        status = run_kernel_benchmark(bench, csv_path, append=done > 0)
        print(f"{bench.name}: {status}")
        done += status == "ok"
    if not done:
        return
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    title = f"Kernels against peer libraries ({device})"
    stem.with_suffix(".md").write_text(benchmark_kernels.flce_markdown(rows, title))
    print(f"kernel benchmarks in {stem}.{{csv,md}}")


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios for this machine's device; write CSV, markdown and PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=Path, default=HERE / "scenarios.yaml")
    parser.add_argument("--output-dir", type=Path, default=HERE / "refs")
    parser.add_argument("--name", help="file name stem of the results (default: scenarios_DEVICE)")
    parser.add_argument("--work-dir", type=Path, help="run folders (default: a temp folder)")
    parser.add_argument("--only", nargs="+", metavar="SCENARIO", help="run only these scenarios")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--note", default="", help="a line added to the markdown")
    parser.add_argument(
        "--budget-s",
        type=float,
        help="stop starting runs after this many seconds; the rest are recorded as skipped",
    )
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS of each run (default: torch's choice)"
    )
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scenarios = [s for s in load_scenarios(args.scenarios) if s.device == device]
    kernel_benches = [k for k in load_kernel_benchmarks(args.scenarios) if k.device == device]
    if args.only:
        unknown = set(args.only) - {s.name for s in scenarios} - {k.name for k in kernel_benches}
        if unknown:
            print(f"error: no {device} scenario named {sorted(unknown)}", file=sys.stderr)
            return 2
        scenarios = [s for s in scenarios if s.name in args.only]
        kernel_benches = [k for k in kernel_benches if k.name in args.only]
    plan = [(s, c, m) for s in scenarios for m in s.models for c in s.framework_configs]
    if not plan and not kernel_benches:
        print(f"error: no {device} scenarios in {args.scenarios}", file=sys.stderr)
        return 2

    load_before = os.getloadavg()[0]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fms-acceleration-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    started = time.perf_counter()
    with tqdm(plan, desc=f"benchmarks ({device})", unit="run") as bar:
        for scenario, shortname, model in bar:
            bar.set_postfix_str(f"{scenario.name}: {shortname}")
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                run = Run(scenario.name, shortname, model or "SmolLM2-135M-Instruct (embedded)")
                run.status, run.error = "skipped", f"time budget of {args.budget_s:.0f} s spent"
            else:
                run = execute(scenario, shortname, model, work, args.threads)
            runs.append(run)
            tqdm.write(
                f"{scenario.name:<20} {shortname:<34} {run.status:<16} "
                f"tokens/s={_fmt(run.train_tokens_per_s, '.1f')} "
                f"peak={_fmt(run.peak_memory_mib, '.0f')}MiB loss={_fmt(run.final_loss, '.4f')}"
            )

    args.output_dir.mkdir(parents=True, exist_ok=True)
    if kernel_benches:
        run_kernel_benchmarks(kernel_benches, args, device, started)
    if not runs:
        return 0
    env = environment()
    # Shared machines make timings noisy: record how busy this one was.
    env["load"] = (
        f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
        f"end, on {os.cpu_count()} logical CPUs"
        + (f"; each run limited to {args.threads} thread(s)" if args.threads else "")
    )
    stem = args.output_dir / (args.name or f"scenarios_{device}")
    write_csv(runs, stem.with_suffix(".csv"), env)
    stem.with_suffix(".md").write_text(
        markdown(runs, scenarios, env, args.note) + f"\n![chart]({stem.name}.png)\n",
        encoding="utf-8",
    )
    try:
        chart(runs, env, stem.with_suffix(".png"))
    except ImportError:
        print("no chart: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    failed = [r for r in runs if r.status != "ok"]
    print(f"{len(runs) - len(failed)}/{len(runs)} runs ok; results in {stem}.{{csv,md,png}}")
    print(f"run logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
