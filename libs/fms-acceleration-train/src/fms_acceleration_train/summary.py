"""The end-of-run summary: numbers measured during training, printed and written as JSON."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .acceleration_defaults import describe

SUMMARY_FILE = "train_summary.json"


def peak_memory_mib(device_type: str) -> tuple[float, str]:
    """Peak memory so far in MiB and what it measures (torch peak allocated on GPU, else RSS)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "process peak RSS"


@dataclass
class TrainSummary:
    """What a run measured; `to_json` is the content of OUTPUT_DIR/train_summary.json."""

    model: str
    dataset: str
    acceleration_config: str | None
    active_plugins: list[str]
    device: str
    dtype: str
    cpu_threads: int
    max_steps: int
    steps: int
    batch_size: int
    seq_len: int
    train_examples: int
    train_tokens: int
    train_runtime_s: float
    train_tokens_per_s: float
    peak_memory_mib: float
    peak_memory_kind: str
    first_loss: float
    last_loss: float
    losses: list[float]
    trainable_params: int
    saved_to: str | None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    eval_examples: int = 0
    eval_samples: list[dict[str, str]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    startup_s: float = 0.0  # from the process's start to the first training step
    # the built-in mixture (mixture_training.py): [step, mean, {domain: loss}] per evaluation,
    # and the mixture's mode, final ratios, samples per domain and files
    heldout_losses: list[list[Any]] = field(default_factory=list)
    data_mixing: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON-serializable dict."""
        return asdict(self)

    def write(self, output_dir: str | Path) -> Path:
        """Write OUTPUT_DIR/train_summary.json and return its path."""
        return write_json(Path(output_dir) / SUMMARY_FILE, self.to_json())

    def format(self) -> str:
        """Human-readable lines for the terminal."""
        plugins = ", ".join(self.active_plugins) or "none (plain transformers + peft)"
        device, threads = self.device, self.cpu_threads
        if threads:
            device += f" ({threads} thread{'s' * (threads != 1)})"
        lines = [
            "=" * 64,
            "fms-acceleration train: summary",
            f"  model             {self.model}",
            f"  dataset           {self.dataset} ({self.train_examples} examples)",
            f"  acceleration      {describe(self.acceleration_config)}",
            f"  active plugins    {plugins}",
            f"  device / dtype    {device} / {self.dtype}",
            f"  steps             {self.steps} x batch {self.batch_size}, "
            f"seq-len <= {self.seq_len}",
            f"  trainable params  {self.trainable_params:,}",
            f"  train tokens/s    {self.train_tokens_per_s:,.1f} "
            f"({self.train_tokens:,} tokens in {self.train_runtime_s:.1f} s)",
            f"  peak memory       {self.peak_memory_mib:,.0f} MiB ({self.peak_memory_kind})",
            f"  loss              {self.first_loss:.4f} (first step) -> "
            f"{self.last_loss:.4f} (last step)",
        ]
        if self.startup_s:
            lines.append(f"  start-up          {self.startup_s:.1f} s (command to first step)")
        if self.accuracy_before is not None and self.accuracy_after is not None:
            n = self.eval_examples
            lines.append(
                f"  answer accuracy   {self.accuracy_before:.1%} before -> "
                f"{self.accuracy_after:.1%} after ({n} held-out prompts, greedy, exact match)"
            )
            for s in self.eval_samples:
                prompt = s["prompt"].replace("\n", " ")
                lines.append(f"    {prompt[:60]!r}: expected {s['expected']!r}, got {s['after']!r}")
        lines += _mixture_lines(self)
        if self.saved_to:
            lines.append(f"  saved to          {self.saved_to}")
        lines.append("=" * 64)
        return "\n".join(lines)


def _mixture_lines(summary: TrainSummary) -> list[str]:
    """The held-out loss and the data mixture, for a run on the built-in mixture."""
    lines = []
    if summary.heldout_losses:
        first, last = summary.heldout_losses[0], summary.heldout_losses[-1]
        lines.append(
            f"  held-out loss     {first[1]:.4f} (step {first[0]}) -> {last[1]:.4f} (step "
            f"{last[0]}), mean over {len(last[2])} domains"
        )
    mixing = summary.data_mixing
    if mixing:
        shares = ", ".join(
            f"{c} {r:.2f}" for c, r in zip(mixing["categories"], mixing["final_sampling_ratio"])
        )
        lines.append(f"  data mixture      {mixing['mode']}: final ratio {shares}")
        for key, label in (("log", "mixing log"), ("plot", "mixing plot")):
            if key in mixing:
                lines.append(f"  {label:<17} {mixing[key]}")
    return lines


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON at `path` (creating its folder) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
