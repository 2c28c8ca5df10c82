"""The `training.hpo` stanza: what to optimize, how to sample and prune, and the search space.

Search-space entries follow optuna's own rules for its distributions (low <= high; a log scale
needs low > 0 and no step; an int range has whole bounds and step >= 1; choices are a non-empty
list of scalars), checked field by field so that every error names the offending key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from fms_acceleration import StanzaModel, choice
from fms_acceleration.discovery import known_stanza_paths
from fms_acceleration.validation import suggestion

STANZA = "training.hpo"
PATH = f"plugins.{STANZA}"

# train-job options a search may not set per trial: where things go and what runs
FIXED_TRAIN_OPTIONS = frozenset(
    {"output_dir", "acceleration_config", "model", "dataset", "resume_from_checkpoint",
     "eval_split", "eval_steps", "save_steps", "evaluate", "eval_max_new_tokens", "log_every",
     "cpu_threads"}
)  # fmt: skip
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_SCALARS = (str, int, float, bool, type(None))


def tunable_train_options() -> list[str]:
    """Options of `fms-acceleration train` that a search-space entry may target."""
    from fms_acceleration_train import TrainJobConfig

    return sorted(set(TrainJobConfig.model_fields) - FIXED_TRAIN_OPTIONS)


Positive = Field(gt=0)


def _kind(info: ValidationInfo) -> str | None:
    return info.data.get("type")


def _range_bound(value: float | None, info: ValidationInfo) -> float | None:
    kind = _kind(info)
    if kind == "categorical":
        if value is not None:
            raise ValueError("is not used by type categorical (list the values in choices)")
        return value
    if value is None:
        raise ValueError(f"required for type {kind}")
    if kind == "int" and not float(value).is_integer():
        raise ValueError("must be a whole number for type int")
    return value


def _high(value: float | None, info: ValidationInfo) -> float | None:
    value = _range_bound(value, info)
    low = info.data.get("low")
    if value is not None and low is not None and value < low:
        raise ValueError(f"must be >= low ({low})")
    return value


def _step(value: float | None, info: ValidationInfo) -> float | None:
    kind = _kind(info)
    if value is None:
        return value
    if kind == "categorical":
        raise ValueError("is not used by type categorical")
    if kind == "int" and not float(value).is_integer():
        raise ValueError("must be a whole number for type int")
    return value


def _log(value: bool, info: ValidationInfo) -> bool:
    if not value:
        return value
    kind, low, step = _kind(info), info.data.get("low"), info.data.get("step")
    if kind == "categorical":
        raise ValueError("is not used by type categorical")
    floor = 1 if kind == "int" else 0
    if low is not None and (low < floor if kind == "int" else low <= floor):
        raise ValueError(f"needs low {'>= 1' if kind == 'int' else '> 0'} (low is {low})")
    if step is not None and not (kind == "int" and step == 1):
        raise ValueError(f"cannot be combined with step ({step}); remove one of them")
    return value


def _choices(value: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
    kind = _kind(info)
    if kind != "categorical":
        if value is not None:
            raise ValueError(f"is only for type categorical (type {kind} uses low/high)")
        return value
    if not value:
        raise ValueError("needs at least one value for type categorical")
    for index, item in enumerate(value):
        if not isinstance(item, _SCALARS) or (isinstance(item, float) and not math.isfinite(item)):
            raise ValueError(f"item {index} ({item!r}) is not a string, number, boolean or null")
    return value


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("must start with a letter or _ and hold only letters, digits, _ . -")
    return value


def _target(value: str | None) -> str | None:
    if value is None:
        return value
    if "." not in value:
        options = tunable_train_options()
        if value not in options:
            raise ValueError(
                f"is not a train option a search may set{suggestion(value, options)}; "
                f"tunable: {', '.join(options)}; or give a dotted key of another plugin's "
                "stanza (e.g. training.finetuning_schedule.base_max_lr)"
            )
        return value
    stanzas = sorted(p for p in known_stanza_paths() if p != STANZA)
    stanza = next((p for p in stanzas if value.startswith(p + ".")), None)
    if stanza is None:
        prefix = ".".join(value.split(".")[:-1])
        raise ValueError(
            f"does not name a key of a plugin stanza{suggestion(prefix, stanzas)}; "
            f"stanzas: {', '.join(stanzas)}"
        )
    return value


class SearchParameter(StanzaModel):
    """One hyper-parameter: its optuna distribution and where its value goes."""

    name: Annotated[str, AfterValidator(_name)]
    """parameter name in the study (and the default target)"""
    type: choice("float", "int", "categorical")
    """optuna distribution: suggest_float, suggest_int or suggest_categorical"""
    low: Annotated[float | None, AfterValidator(_range_bound)] = Field(None, validate_default=True)
    """lower bound (float and int)"""
    high: Annotated[float | None, AfterValidator(_high)] = Field(None, validate_default=True)
    """upper bound, inclusive (float and int)"""
    step: Annotated[float | None, Positive, AfterValidator(_step)] = None
    """discretization step (float and int; not with log)"""
    log: Annotated[bool, AfterValidator(_log)] = False
    """sample on a log scale (low > 0)"""
    choices: Annotated[list[Any] | None, AfterValidator(_choices)] = Field(
        None, validate_default=True
    )
    """the values of a categorical parameter (strings, numbers, booleans, null)"""
    target: Annotated[str | None, AfterValidator(_target)] = None
    """a train option (lora_r, learning_rate, ...) or a dotted key of another plugin's stanza
    (training.finetuning_schedule.base_max_lr); default: the name"""

    @property
    def destination(self) -> str:
        """Where the suggested value goes."""
        return self.target or self.name

    def suggest_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the matching optuna `suggest_<type>`."""
        if self.type == "categorical":
            return {"choices": list(self.choices or [])}
        if self.type == "int":
            kwargs: dict[str, Any] = {"low": int(self.low), "high": int(self.high), "log": self.log}
            return {**kwargs, "step": int(self.step or 1)}
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step}


def _for(*kinds: str, label: str) -> Callable[[Any, ValidationInfo], Any]:
    """Validator: an option given for a `type` that does not use it is refused by name."""

    def check(value: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("type")
        if value is not None and kind not in kinds:
            raise ValueError(f"is not an option of the {kind} {label}")
        return value

    return check


def _sampler(*kinds: str) -> Any:
    return AfterValidator(_for(*kinds, label="sampler"))


def _pruner(*kinds: str) -> Any:
    return AfterValidator(_for(*kinds, label="pruner"))


class SamplerOptions(StanzaModel):
    """How optuna proposes the next trial's parameters."""

    type: choice("tpe", "random") = "tpe"
    """tpe (Tree-structured Parzen Estimator) or random"""
    seed: Annotated[int, Field(ge=0)] | None = 0
    """seed of the sampler's random numbers (null: a new seed each run)"""
    n_startup_trials: Annotated[int | None, Positive, _sampler("tpe")] = None
    """tpe: random trials before the model is used (optuna's default 10)"""
    n_ei_candidates: Annotated[int | None, Positive, _sampler("tpe")] = None
    """tpe: candidates scored per suggestion"""
    multivariate: Annotated[bool | None, _sampler("tpe")] = None
    """tpe: model the parameters jointly"""
    constant_liar: Annotated[bool | None, _sampler("tpe")] = None
    """tpe: avoid proposing what running trials already try (several workers)"""

    def optuna_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the optuna sampler class."""
        return {k: v for k, v in self.model_dump(exclude={"type"}).items() if v is not None}


class PrunerOptions(StanzaModel):
    """How optuna stops unpromising trials early, from their reported values."""

    type: choice("median", "percentile", "successive_halving", "hyperband", "threshold", "nop") = (
        "median"
    )
    """median, percentile, successive_halving, hyperband, threshold or nop (never prune)"""
    n_startup_trials: Annotated[int | None, Field(ge=0), _pruner("median", "percentile")] = None
    """median/percentile: finished trials before pruning starts"""
    n_warmup_steps: Annotated[
        int | None, Field(ge=0), _pruner("median", "percentile", "threshold")
    ] = None
    """median/percentile/threshold: steps of a trial before it can be pruned"""
    interval_steps: Annotated[
        int | None, Positive, _pruner("median", "percentile", "threshold")
    ] = None
    """median/percentile/threshold: check every N reported steps"""
    n_min_trials: Annotated[int | None, Positive, _pruner("median", "percentile")] = None
    """median/percentile: trials that must have reported at a step to compare"""
    percentile: Annotated[float | None, Field(ge=0.0, le=100.0), _pruner("percentile")] = None
    """percentile: prune below this percentile of the other trials (0-100)"""
    min_resource: Annotated[int | None, Positive, _pruner("successive_halving", "hyperband")] = None
    """successive_halving/hyperband: steps every trial gets"""
    max_resource: Annotated[int | None, Positive, _pruner("hyperband")] = None
    """hyperband: steps of a full trial (default: inferred)"""
    reduction_factor: Annotated[
        int | None, Field(ge=2), _pruner("successive_halving", "hyperband")
    ] = None
    """successive_halving/hyperband: keep 1 of every N at each rung"""
    lower: Annotated[float | None, _pruner("threshold")] = None
    """threshold: prune when the value falls below"""
    upper: Annotated[float | None, _pruner("threshold")] = None
    """threshold: prune when the value rises above"""

    @model_validator(mode="after")
    def _percentile_needed(self) -> PrunerOptions:
        if self.type == "percentile" and self.percentile is None:
            raise ValueError("type percentile needs the option percentile (0-100)")
        if self.type == "threshold" and self.lower is None and self.upper is None:
            raise ValueError("type threshold needs lower, upper or both")
        return self

    def optuna_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the optuna pruner class."""
        return {k: v for k, v in self.model_dump(exclude={"type"}).items() if v is not None}


class HPOOptions(StanzaModel):
    """Hyper-parameter search with optuna (`fms-acceleration search`)."""

    metric: str = "eval_loss"
    """evaluation metric reported to the trial (the eval_ prefix may be left out)"""
    direction: choice("minimize", "maximize") = "minimize"
    """minimize or maximize the metric"""
    eval_every: Annotated[int, Positive] = 10
    """evaluate (and report to the pruner) every N optimizer steps, and at the last step"""
    checkpoint_every: Annotated[int | None, Positive] = None
    """save a checkpoint every N steps, so a killed trial resumes (default: eval_every)"""
    sampler: SamplerOptions = SamplerOptions()
    """optuna sampler"""
    pruner: PrunerOptions = PrunerOptions()
    """optuna pruner"""
    search_space: Annotated[list[SearchParameter], Field(min_length=1)]
    """the hyper-parameters to search"""

    @model_validator(mode="after")
    def _distinct(self) -> HPOOptions:
        names: dict[str, int] = {}
        targets: dict[str, str] = {}
        for index, entry in enumerate(self.search_space):
            if entry.name in names:
                raise ValueError(
                    f"search_space[{index}].name '{entry.name}' is also the name of "
                    f"search_space[{names[entry.name]}]; names must be unique"
                )
            names[entry.name] = index
            if entry.destination in targets:
                raise ValueError(
                    f"search_space[{index}] sets '{entry.destination}', which "
                    f"'{targets[entry.destination]}' already sets"
                )
            targets[entry.destination] = entry.name
        return self

    @property
    def save_steps(self) -> int:
        """Checkpoint interval in steps."""
        return self.checkpoint_every or self.eval_every
