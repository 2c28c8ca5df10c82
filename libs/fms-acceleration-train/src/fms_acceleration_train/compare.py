"""`--compare`: the plain baseline and the accelerated run, each in a fresh process, side by side.

Fresh processes, because peak RSS only grows within a process and because the accelerated run's
patches must not touch the baseline. Both get the same data, steps and seed.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .acceleration_defaults import describe
from .mixture_training import configures_odm, mixture_rows, steps_to_target
from .quiet import quiet_third_party_start
from .runner import TrainJobConfig, run_train_job, with_run_folder
from .summary import TrainSummary, write_json

COMPARISON_FILE = "comparison.json"
RUNS = ("baseline", "accelerated")


@dataclass
class Comparison:
    """The two runs' summaries and the ratios accelerated / baseline."""

    baseline: TrainSummary
    accelerated: TrainSummary

    @property
    def speedup(self) -> float:
        """Non-padding train tokens/s, accelerated over baseline."""
        return _ratio(self.accelerated.train_tokens_per_s, self.baseline.train_tokens_per_s)

    @property
    def memory_ratio(self) -> float:
        """Peak memory, accelerated over baseline."""
        return _ratio(self.accelerated.peak_memory_mib, self.baseline.peak_memory_mib)

    @property
    def steps_to_target(self) -> dict[str, Any]:
        """For runs on the built-in mixture: steps to the baseline's final held-out loss."""
        return steps_to_target(self.baseline.heldout_losses, self.accelerated.heldout_losses)

    def to_json(self) -> dict[str, Any]:
        """Both summaries and the ratios, as written to OUTPUT_DIR/comparison.json."""
        return {
            "speedup_tokens_per_s": round(self.speedup, 4),
            "peak_memory_ratio": round(self.memory_ratio, 4),
            "steps_to_target": self.steps_to_target,
            "baseline": asdict(self.baseline),
            "accelerated": asdict(self.accelerated),
        }

    def format(self) -> str:
        """The side-by-side table printed after both runs."""
        base, fast = self.baseline, self.accelerated
        rows = [
            ("acceleration", describe(base.acceleration_config),
             describe(fast.acceleration_config), ""),
            ("active plugins", ", ".join(base.active_plugins) or "none",
             ", ".join(fast.active_plugins) or "none", ""),
            ("train tokens/s", f"{base.train_tokens_per_s:,.1f}", f"{fast.train_tokens_per_s:,.1f}",
             f"{self.speedup:.2f}x"),
            ("peak memory MiB", f"{base.peak_memory_mib:,.0f}", f"{fast.peak_memory_mib:,.0f}",
             f"{self.memory_ratio:.2f}x"),
            ("loss first -> last", _loss(base), _loss(fast), ""),
            ("held-out accuracy", _accuracy(base), _accuracy(fast), ""),
            *mixture_rows(base, fast, self.steps_to_target),
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in [("", "baseline", "accelerated", "ratio"), *rows])
                  for i in range(4)]  # fmt: skip
        line = "  ".join
        out = [
            "=" * 64,
            "fms-acceleration train --compare "
            f"({base.steps} steps x batch {base.batch_size}, same data and seed)",
            "  "
            + line(h.ljust(w) for h, w in zip(("", "baseline", "accelerated", "ratio"), widths)),
        ]
        out += ["  " + line(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        out.append("  tokens/s counts non-padding tokens; memory: " + fast.peak_memory_kind)
        out.append("=" * 64)
        return "\n".join(out)

    def write(self, output_dir: str | Path) -> Path:
        """Write OUTPUT_DIR/comparison.json and return its path."""
        return write_json(Path(output_dir) / COMPARISON_FILE, self.to_json())


def _ratio(value: float, base: float) -> float:
    return value / base if base else float("nan")


def _loss(summary: TrainSummary) -> str:
    return f"{summary.first_loss:.4f} -> {summary.last_loss:.4f}"


def _accuracy(summary: TrainSummary) -> str:
    if summary.accuracy_before is None or summary.accuracy_after is None:
        return "-"
    return f"{summary.accuracy_before:.1%} -> {summary.accuracy_after:.1%}"


def run_in_fresh_process(config: TrainJobConfig) -> TrainSummary:
    """run_train_job in a new (spawned) Python process; its errors are raised here."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_run_quietly, config).result()


def _run_quietly(config: TrainJobConfig) -> TrainSummary:
    quiet_third_party_start()  # a spawned process starts with Python's defaults
    return run_train_job(config)


def run_comparison(config: TrainJobConfig) -> Comparison:
    """Train without acceleration, then with `config.acceleration_config`; outputs go to
    OUTPUT_DIR/baseline and OUTPUT_DIR/accelerated, the comparison to OUTPUT_DIR."""
    config = with_run_folder(config)
    summaries = {}
    # online data mixing is measured against the uniform mixture of the same domains
    mixing = configures_odm(config.acceleration_config)
    for index, name in enumerate(RUNS, start=1):
        acceleration = None if name == "baseline" else config.acceleration_config
        run = config.model_copy(
            update={
                "output_dir": str(Path(config.output_dir) / name),
                "acceleration_config": acceleration,
                "uniform_mixture": mixing and name == "baseline",
            }
        )
        what = (
            "the uniform mixture"
            if run.uniform_mixture
            else f"acceleration {describe(acceleration)}"
        )
        print(f"[{index}/2] {name}: {what}", flush=True)
        summaries[name] = run_in_fresh_process(run)
    comparison = Comparison(**summaries)
    comparison.write(config.output_dir)
    return comparison
