"""The study's picture: optimization history, intermediate values (the pruned curves stop early)
and the timeline of trials, drawn by optuna.visualization.matplotlib on the Agg backend and
stacked into one PNG. matplotlib is optional: `pip install fms-acceleration-hpo[plot]`."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna

from .errors import SearchError

_PANELS = ("plot_optimization_history", "plot_intermediate_values", "plot_timeline")


def write_study_plot(study: optuna.Study, path: str | Path, dpi: int = 100) -> Path:
    """Draw the three panels of `study` into one PNG at `path`."""
    try:
        import matplotlib
    except ImportError as err:
        raise SearchError(
            "--plot needs matplotlib: pip install 'fms-acceleration-hpo[plot]'"
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as optuna_plots

    images = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name in _PANELS:
            axes = getattr(optuna_plots, name)(study)
            figure = axes.figure
            figure.set_size_inches(9, 4)
            figure.tight_layout()
            figure.set_dpi(dpi)
            figure.canvas.draw()
            images.append(np.array(figure.canvas.buffer_rgba()))
            plt.close(figure)
    height = sum(image.shape[0] for image in images) / dpi
    width = max(image.shape[1] for image in images) / dpi
    canvas = plt.figure(figsize=(width, height), dpi=dpi)
    top = 1.0
    for image in images:
        share = image.shape[0] / dpi / height
        axes = canvas.add_axes((0, top - share, 1, share))
        axes.imshow(image)
        axes.set_axis_off()
        top -= share
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.savefig(path, dpi=dpi)
    plt.close(canvas)
    return path
