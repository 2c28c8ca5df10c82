"""The PNG of the sampling ratios over training, drawn from odm.jsonl (matplotlib, Agg)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

PLOT_FILE = "odm_sampling_weights.png"


def ratio_history(log_path: str | Path) -> tuple[list[str], list[int], list[list[float]]]:
    """(categories, x, ratios): the mixture at the start and after every update in the log.

    x is the training step of an update when logged, else the update's number.
    """
    categories: list[str] = []
    xs: list[int] = []
    ratios: list[list[float]] = []
    with open(log_path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if not ratios:
                categories = record.get("categories") or [
                    str(i) for i in range(record["total_categories"])
                ]
                xs.append(0)
                ratios.append(record["current_sampling_ratio"])
            if record.get("action") == "update":
                step = record.get("step")
                xs.append(int(step) if step is not None else len(xs))
                ratios.append(record["current_sampling_ratio"])
    return categories, xs, ratios


def plot_sampling_weights(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Draw each category's sampling ratio over training; None if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", png_path)
        return None
    categories, xs, ratios = ratio_history(log_path)
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)  # an Agg canvas of its own: no global pyplot backend is touched
    axes = figure.add_subplot(1, 1, 1)
    for index, name in enumerate(categories):
        axes.plot(xs, [r[index] for r in ratios], label=name, drawstyle="steps-post")
    axes.set_xlabel("training step")
    axes.set_ylabel("sampling ratio")
    axes.set_ylim(0.0, 1.0)
    axes.set_title("online data mixing: sampling ratio per category")
    axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path)
    return png_path
