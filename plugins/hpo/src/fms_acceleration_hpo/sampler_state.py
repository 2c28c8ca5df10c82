"""Building the sampler and pruner from the stanza, and checkpointing the sampler's state.

A checkpoint is the pickled sampler with the optuna version that wrote it and a hash of the
sampler configuration. It is restored only when both match; otherwise (or when the file cannot
be read) a new sampler is seeded with `seed + finished trials`, so that a resumed study does not
replay the suggestions it already made.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import optuna

from .options import PrunerOptions, SamplerOptions

_FILE = re.compile(r"^sampler_trial-(\d+)\.pkl$")
_SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
_PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "nop": optuna.pruners.NopPruner,
}


class SamplerCheckpointWarning(UserWarning):
    """A sampler checkpoint was not restored (other optuna version or sampler configuration)."""


def build_sampler(options: SamplerOptions, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler; its seed (if any) moved on by `seed_offset`."""
    kwargs = options.optuna_kwargs()
    if options.seed is not None:
        kwargs["seed"] = options.seed + seed_offset
    return _SAMPLERS[options.type](**kwargs)


def build_pruner(options: PrunerOptions) -> optuna.pruners.BasePruner:
    """The configured pruner."""
    return _PRUNERS[options.type](**options.optuna_kwargs())


def sampler_config_hash(options: SamplerOptions) -> str:
    """A short stable hash of the sampler configuration."""
    text = json.dumps(options.model_dump(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_path(root: str | Path, trial_number: int) -> Path:
    """Where the sampler state after trial `trial_number`'s suggestions is kept."""
    return Path(root) / f"sampler_trial-{trial_number}.pkl"


def checkpoint_sampler(trial: optuna.Trial, root: str | Path, config_hash: str) -> Path:
    """Pickle the study's sampler (atomically) with the optuna version and `config_hash`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    payload = {
        "optuna_version": optuna.__version__,
        "config_hash": config_hash,
        "trial": trial.number,
        "sampler": trial.study.sampler,
    }
    target = checkpoint_path(root, trial.number)
    fd, staging = tempfile.mkstemp(prefix=target.name + ".", dir=root)
    try:
        with os.fdopen(fd, "wb") as handle:
            pickle.dump(payload, handle)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return target


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint of the highest trial number under `root`, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _FILE.match(p.name))]
    return max(found)[1] if found else None


def restore_sampler(
    root: str | Path, options: SamplerOptions, finished_trials: int
) -> tuple[optuna.samplers.BaseSampler, str]:
    """(sampler, how it was obtained): the latest checkpoint under `root` when its optuna
    version and configuration hash match; otherwise a new sampler seeded with
    seed + `finished_trials` (a warning says why)."""
    checkpoint = latest_checkpoint(root)
    fresh = f"new sampler (seed {options.seed} + {finished_trials} finished trials)"
    if checkpoint is None:
        return build_sampler(options, finished_trials), fresh
    why = ""
    try:
        # the file is this search's own output (written by checkpoint_sampler)
        with checkpoint.open("rb") as handle:
            payload = pickle.load(handle)
    except Exception as err:  # a truncated or foreign file: start over, say why
        payload, why = None, f"cannot be read ({type(err).__name__}: {err})"
    if payload is not None:
        if payload.get("optuna_version") != optuna.__version__:
            why = (
                f"was written by optuna {payload.get('optuna_version')}, this is optuna "
                f"{optuna.__version__}"
            )
        elif payload.get("config_hash") != sampler_config_hash(options):
            why = "was written for another sampler configuration"
    if why:
        warnings.warn(
            f"sampler checkpoint {checkpoint} {why}; using a {fresh}",
            SamplerCheckpointWarning,
            stacklevel=2,
        )
        return build_sampler(options, finished_trials), fresh
    return payload["sampler"], f"restored from {checkpoint.name}"
