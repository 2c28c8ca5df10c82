"""Fine-tuning schedule: reading, validation (pydantic models, the core's translator), defaults.

Pure module: it knows parameter *names* only (logical names, as a strategy adapter reports them);
it uses the core's validation and YAML helpers and error type, and imports neither the framework
object nor torch or transformers.
Validation has two stages: `parse_schedule` checks everything that needs no model (structure,
phase keys, types, values, regex syntax) and `resolve_schedule` matches the params entries
against a model's parameter names.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import regex
import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, model_validator

from fms_acceleration import StanzaModel, choice, validate_model
from fms_acceleration.errors import AccelerationPluginConfigError
from fms_acceleration.validation import show, suggestion
from fms_acceleration.yaml_loading import load_yaml, read_yaml_file

logger = logging.getLogger(__name__)

# Wall-clock budget for matching one params entry against every parameter name. The `regex`
# engine resists most catastrophic patterns by itself; its timeout bounds the rest (it overshoots
# by up to ~3x, so the worst case stays around a second).
REGEX_BUDGET_S = 0.25


class FTSScheduleError(AccelerationPluginConfigError):
    """A fine-tuning schedule is malformed or does not fit the model (a ValueError)."""


# --------------------------------------------------------------------------------- field types
def _float_like(value: Any) -> Any:
    # FTS reads lrs with float(), so '1e-5' (a string for YAML 1.1) is a number there too
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise ValueError("is not a number") from None
    return value


def _limit(value: int) -> int:
    if value < -1:
        raise ValueError("must be >= 0, or -1 for no limit")
    return value


def _name_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _non_empty(value: list) -> list:
    if not value:
        raise ValueError("must be a non-empty list of parameter names or regexes")
    return value


PositiveLr = Annotated[float, BeforeValidator(_float_like), Field(gt=0)]
TransitionLimit = Annotated[int, AfterValidator(_limit)]


# ------------------------------------------------------------------------------------ models
class ClassInit(StanzaModel):
    """A class to instantiate at a phase transition: import path and keyword arguments."""

    model_config = ConfigDict(frozen=True)

    class_path: str
    """dotted import path, e.g. torch.optim.AdamW"""
    init_args: dict[str, Any] = Field(default_factory=dict)
    """keyword arguments of the class"""

    def resolve(self) -> type:
        """Import and return the class named by class_path."""
        return import_class(self.class_path)


def _nest(value: Any, key: str) -> Any:
    # FTS nests the directive one level down (new_optimizer.optimizer_init); the flat form
    # {class_path, init_args} is accepted as a shorthand for it.
    if isinstance(value, Mapping) and key not in value and {"class_path", "init_args"} & set(value):
        return {key: dict(value)}
    return value


class LrsConfig(StanzaModel):
    """How the Trainer steps a reinitialized LR scheduler (Lightning's LRSchedulerConfig keys)."""

    interval: choice("epoch", "step") = "epoch"
    """step the scheduler once per epoch (FTS's default) or once per optimizer step"""
    frequency: Annotated[int, Field(ge=1)] = 1
    """step every `frequency` intervals"""
    monitor: str | None = None
    """ReduceLROnPlateau: metric it reduces on (must be TrainingArguments.metric_for_best_model)"""
    name: str | None = None
    """label only; the Trainer logs one learning_rate"""
    strict: choice(True) = True
    """the Trainer always fails when the monitored metric is missing"""
    reduce_on_plateau: bool | None = None
    """derived from the scheduler class when omitted"""


class OptimizerReinit(StanzaModel):
    """`new_optimizer` / `reinit_optim_cfg`: the optimizer to rebuild at a transition."""

    model_config = ConfigDict(frozen=True)

    optimizer_init: ClassInit
    """class_path and init_args of the new optimizer"""

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, value: Any) -> Any:
        return _nest(value, "optimizer_init")


class LrSchedulerReinit(StanzaModel):
    """`new_lr_scheduler` / `reinit_lr_cfg`: the LR scheduler to rebuild at a transition."""

    model_config = ConfigDict(frozen=True)

    lr_scheduler_init: ClassInit
    """class_path and init_args of the new scheduler"""
    pl_lrs_cfg: LrsConfig = LrsConfig()
    """interval, frequency and monitor of the new scheduler"""
    use_current_optimizer_pg_lrs: bool = False
    """existing groups restart from their current lr instead of their initial_lr"""
    init_pg_lrs: list[PositiveLr] | None = None
    """lr (and initial_lr) of the first param groups, in order"""

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, value: Any) -> Any:
        return _nest(value, "lr_scheduler_init")


class PhaseSpec(StanzaModel):
    """One phase of a fine-tuning schedule, as written."""

    params: Annotated[list[str], BeforeValidator(_name_list), AfterValidator(_non_empty)]
    """parameter names or regexes matched from the start of the name"""
    max_transition_epoch: TransitionLimit = -1
    """transition after this many epochs (-1: no limit)"""
    max_transition_step: TransitionLimit = -1
    """transition after this global step (-1: no limit)"""
    lr: PositiveLr | None = None
    """lr of this phase's groups (default base_max_lr)"""
    new_optimizer: OptimizerReinit | None = None
    """rebuild the optimizer at this phase"""
    new_lr_scheduler: LrSchedulerReinit | None = None
    """rebuild the LR scheduler at this phase"""


PHASE_KEYS = tuple(PhaseSpec.model_fields)
REINIT_KEYS = {"new_optimizer": "optimizer_init", "new_lr_scheduler": "lr_scheduler_init"}


@dataclass(frozen=True)
class Phase:
    """One validated phase: the logical parameter names it thaws and how it ends."""

    depth: int
    params: tuple[str, ...]
    max_transition_epoch: int = -1
    max_transition_step: int = -1
    lr: float | None = None
    new_optimizer: ClassInit | None = None
    new_lr_scheduler: LrSchedulerReinit | None = None


@dataclass(frozen=True)
class ParsedSchedule:
    """A schedule checked without a model: its phases by depth, and what was normalized."""

    phases: tuple[PhaseSpec, ...]
    raw: dict[int, dict]  # int keys, as written otherwise: what FTS saves as the schedule copy
    converted_keys: tuple[Any, ...] = ()  # phase keys given as strings ('1')
    notes: tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------------------- YAML
def load_schedule_yaml(text: str, source: str = "fine-tuning schedule") -> Any:
    """Parse schedule YAML text with the core's strict loader (duplicate keys, aliases, depth)."""
    return load_yaml(text, source, FTSScheduleError)


def read_schedule(source: str | os.PathLike | Mapping) -> Any:
    """Return the raw schedule mapping from a YAML file path or an inline mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    raw = read_yaml_file(path, "ft_schedule", FTSScheduleError)
    if raw is None:
        raise FTSScheduleError(f"{path}: the ft_schedule file is empty.")
    return raw


def dump_schedule(schedule: Mapping[Any, Mapping[str, Any]]) -> str:
    """Serialize a raw schedule mapping (phase -> settings) to YAML text."""
    return yaml.safe_dump(
        {int(k): _plain(v) for k, v in schedule.items()}, sort_keys=False, default_flow_style=False
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_schedule(schedule: Mapping[Any, Mapping[str, Any]], path: str | os.PathLike) -> str:
    """Write a raw schedule to a YAML file and return its path (overwrites: see write_new_file)."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(dump_schedule(schedule))
    return path


def write_new_file(text: str, path: str | os.PathLike) -> tuple[str, bool]:
    """Write `text` to `path` unless a different file is there: then to `stem_1.ext`, `stem_2...`.

    Returns (the path written or found identical, whether a new name had to be chosen). A file
    that already holds exactly `text` is left alone, so reruns and resumes do not multiply copies.
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    stem, ext = os.path.splitext(path)
    candidate, index = path, 0
    while os.path.exists(candidate):
        if os.path.isfile(candidate) and _same_text(candidate, text):
            return candidate, index > 0
        index += 1
        candidate = f"{stem}_{index}{ext}"
    with open(candidate, "x", encoding="utf-8") as fh:
        fh.write(text)
    return candidate, index > 0


def _same_text(path: str, text: str) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read() == text
    except (OSError, UnicodeDecodeError):
        return False


def default_schedule(param_names: Sequence[str], per_phase: int = 2) -> dict[int, dict]:
    """FTS's implicit schedule: parameters in reverse order, `per_phase` tensors per phase."""
    if per_phase < 1:
        raise FTSScheduleError(f"phase_size must be >= 1 (tensors per phase), got {per_phase}")
    names = list(reversed(list(param_names)))
    return {
        i // per_phase: {"params": names[i : i + per_phase]}
        for i in range(0, len(names), per_phase)
    }


def default_schedule_filename(model_class_name: str, suffix: str = "") -> str:
    """File name FTS uses for a schedule of this model (`_valid` for the renumbered one)."""
    return f"{model_class_name}_ft_schedule{suffix}.yaml"


def import_class(class_path: str) -> type:
    """Import `pkg.module.Class`; raise FTSScheduleError naming the path when it fails."""
    module_name, _, attr = class_path.rpartition(".")
    if not module_name or not attr:
        raise FTSScheduleError(
            f"class_path {class_path!r} is not a dotted path 'package.module.Class'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise FTSScheduleError(
            f"cannot import module {module_name!r} of class_path {class_path!r}: {err}"
        ) from err
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        same = [n for n in public if n.lower() == attr.lower()]
        close = f" (did you mean '{same[0]}'?)" if same else suggestion(attr, public)
        raise FTSScheduleError(
            f"module {module_name!r} has no attribute {attr!r}{close} (class_path {class_path!r})"
        )
    found = getattr(module, attr)
    if not isinstance(found, type):
        raise FTSScheduleError(f"class_path {class_path!r} names {found!r}, which is not a class")
    return found


# ------------------------------------------------------------------------------ phase keys
def _phase_key(key: Any) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and re.fullmatch(r"\s*[+-]?\d+\s*", key):
        return int(key)
    return None


def _convert_keys(raw: Mapping) -> tuple[dict[int, Any], tuple[Any, ...]]:
    converted: dict[int, Any] = {}
    strings = []
    for key, value in raw.items():
        depth = _phase_key(key)
        if depth is None:
            raise FTSScheduleError(
                f"phase key {show(key)} is not an integer: phases are keyed 0, 1, 2, ... "
                "(strings of digits such as '1' are read as integers)"
            )
        if depth in converted:
            raise FTSScheduleError(
                f"phase keys {show(key)} and {depth} both name phase {depth}: each phase may "
                "appear only once"
            )
        if not (isinstance(key, int) and not isinstance(key, bool)):
            strings.append(key)
        converted[depth] = value
    return converted, tuple(strings)


def convert_phase_keys(raw: Mapping) -> dict[int, Any]:
    """Phase keys as integers ('1' is read as 1); a key that is no integer is an error."""
    return _convert_keys(raw)[0]


def renumbered(raw: Mapping[int, Any]) -> dict[int, Any]:
    """The schedule with its phases renumbered 0..N-1 in order (FTS's `_ft_schedule_valid`)."""
    return {i: raw[k] for i, k in enumerate(sorted(raw))}


def _check_contiguous(raw: Mapping[int, Any]) -> None:
    keys = sorted(raw)
    if keys == list(range(len(keys))):
        return
    if keys[0] < 0:
        detail = f"phase {keys[0]} is negative"
    else:
        missing = sorted(set(range(keys[-1] + 1)) - set(keys))
        detail = f"phase {missing[0]} is missing"
    mapping = ", ".join(f"{k} -> {i}" for i, k in enumerate(keys) if k != i)
    raise FTSScheduleError(
        f"phase keys must be contiguous integers starting at 0, got {keys}: {detail}; "
        f"renumbered in order ({mapping}) the schedule would be valid"
    )


# ---------------------------------------------------------------------------------- parsing
def parse_schedule(raw: Any, epoch_transitions_only: bool = False) -> ParsedSchedule:
    """Validate everything about a raw schedule that needs no model; return its phases."""
    if not isinstance(raw, Mapping) or not raw:
        raise FTSScheduleError(
            "a fine-tuning schedule must be a non-empty mapping of phase -> settings, got "
            f"{type(raw).__name__} {show(raw)}"
        )
    converted, strings = _convert_keys(raw)
    _check_contiguous(converted)
    phases = []
    for depth in range(len(converted)):
        spec = converted[depth]
        if not isinstance(spec, Mapping):
            raise FTSScheduleError(
                f"phase {depth} must be a mapping with a params list, got "
                f"{type(spec).__name__} {show(spec)}"
            )
        phases.append(validate_model(PhaseSpec, spec, f"phase {depth}", FTSScheduleError))
    _check_phases(phases, epoch_transitions_only)
    notes = []
    if phases[0].lr is not None:
        # FTS accepts it with a warning and drops it: the initial optimizer sets phase 0's lr
        notes.append(
            f"phase 0: lr {phases[0].lr} is not used: phase 0 trains at the lr the Trainer's "
            "optimizer has (TrainingArguments.learning_rate, or your optimizer's); set it there"
        )
    if strings:
        notes.append(f"phase keys {', '.join(show(k) for k in strings)} were read as integers")
    return ParsedSchedule(
        phases=tuple(phases),
        raw={d: _plain(converted[d]) for d in range(len(converted))},
        converted_keys=strings,
        notes=tuple(notes),
    )


def _check_phases(phases: Sequence[PhaseSpec], epoch_transitions_only: bool) -> None:
    last = len(phases) - 1
    for depth, spec in enumerate(phases):
        for index, entry in enumerate(spec.params):
            _check_entry_syntax(entry, depth, index)
        set_keys = spec.model_fields_set
        if depth == 0:
            for key in REINIT_KEYS:
                if getattr(spec, key) is not None:
                    raise FTSScheduleError(
                        f"phase 0: {key} is a reinitialization directive for the initial phase, "
                        "which is not allowed: the Trainer builds the initial optimizer and LR "
                        "scheduler; reinitialization applies to phases >= 1 only"
                    )
        if epoch_transitions_only:
            if "max_transition_step" in set_keys:
                raise FTSScheduleError(
                    f"phase {depth}: max_transition_step is not allowed with epoch_transitions_only"
                )
            if depth < last and spec.max_transition_epoch < 0:
                raise FTSScheduleError(
                    f"phase {depth}: epoch_transitions_only is set, so every phase but the last "
                    "needs max_transition_epoch >= 0"
                )
        if depth:
            _note_shrinking_limits(phases[depth - 1], spec, depth)


def _note_shrinking_limits(previous: PhaseSpec, spec: PhaseSpec, depth: int) -> None:
    # FTS accepts a limit below an earlier phase's and only says so: the phase then lasts one
    # epoch (or step), because the limit is already reached when it begins.
    for unit in ("epoch", "step"):
        limit = getattr(spec, f"max_transition_{unit}")
        before = getattr(previous, f"max_transition_{unit}")
        if 0 <= limit <= before:
            logger.info(
                "fine-tuning schedule: phase %d's max_transition_%s (%d) is not above phase %d's "
                "(%d): phase %d may last a single %s",
                depth,
                unit,
                limit,
                depth - 1,
                before,
                depth,
                unit,
            )


def _quoted(entry: str) -> str:
    # as written in YAML (repr would double every backslash of a regex)
    return f"'{entry}'"


def _check_entry_syntax(entry: str, depth: int, index: int) -> None:
    if not entry.strip():
        raise FTSScheduleError(
            f"phase {depth}: params entry {index} is {show(entry)}: an empty name would match "
            "every parameter; write a parameter name or a regex"
        )
    try:
        regex.compile(entry, flags=regex.V0)
    except regex.error as err:
        raise FTSScheduleError(
            f"phase {depth}: params entry {_quoted(entry)} is neither a parameter name nor a valid "
            f"regex ({err})"
        ) from None


# -------------------------------------------------------------------------------- resolving
_PLAIN_NAME = re.compile(r"[\w.]+")


def _regex_matches(entry: str, names: Sequence[str], depth: int) -> list[tuple[str, int]]:
    """(name, match end) for every name the entry matches from the start, within the budget."""
    pattern = regex.compile(entry, flags=regex.V0)
    deadline = time.monotonic() + REGEX_BUDGET_S
    found = []
    for name in names:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            match = pattern.match(name, timeout=remaining)
        except TimeoutError:
            raise FTSScheduleError(
                f"phase {depth}: params entry {_quoted(entry)} takes too long to match (more than "
                f"{REGEX_BUDGET_S}s for {len(names)} parameter names; nested repetition such as "
                "'(a*)*' backtracks exponentially): simplify the regex"
            ) from None
        if match:
            found.append((name, match.end()))
    return found


def _truncated(entry: str, hits: Sequence[tuple[str, int]]) -> str | None:
    """A plain-looking entry whose match stops inside a name segment: the first such name."""
    if not _PLAIN_NAME.fullmatch(entry):
        return None
    for name, end in hits:
        if end < len(name) and name[end] != "." and name[end - 1] != ".":
            return name
    return None


def _match_entry(entry: str, names: Sequence[str], name_set: set[str], depth: int) -> list[str]:
    if entry in name_set:
        return [entry]
    hits = _regex_matches(entry, names, depth)
    partial = _truncated(entry, hits)
    if partial is not None:
        if any(n.startswith(entry + ".") for n in names):
            anchored = regex.escape(entry) + r"\."
            advice = (
                f"; to thaw everything under {_quoted(entry)}, end the regex at the dot: "
                f"{_quoted(anchored)}"
            )
        else:
            advice = f"{suggestion(entry, list(names))}; write the full parameter name"
        raise FTSScheduleError(
            f"phase {depth}: params entry {_quoted(entry)} is not a parameter name, and as a "
            f"regex it stops in the middle of {_quoted(partial)}: it looks truncated{advice}"
        )
    return [name for name, _ in hits]


def resolve_schedule(
    parsed: ParsedSchedule,
    param_names: Sequence[str],
    shared_aliases: Mapping[str, str] | None = None,
) -> list[Phase]:
    """Match every params entry against the model's (logical) names; return the phases.

    `shared_aliases` maps the second name of a tied parameter (e.g. ``lm_head.weight`` when it is
    ``model.embed_tokens.weight``) to its first: FTS drops such an entry with a warning, since
    the tensor thaws with the name it is registered under.
    """
    names = list(param_names)
    name_set = set(names)
    aliases = dict(shared_aliases or {})
    order = {n: i for i, n in enumerate(names)}
    owner: dict[str, int] = {}
    phases: list[Phase] = []
    for depth, spec in enumerate(parsed.phases):
        matched: list[str] = []
        for entry in spec.params:
            hits = _match_entry(entry, names, name_set, depth)
            if not hits:
                if entry in aliases:
                    logger.warning(
                        "fine-tuning schedule: phase %d: %r is a tied (shared) parameter; it is "
                        "dropped from the schedule and thaws with %r",
                        depth,
                        entry,
                        aliases[entry],
                    )
                    continue
                raise FTSScheduleError(
                    f"phase {depth}: params entry {_quoted(entry)} matches no parameter of the "
                    f"model{suggestion(entry, names)}"
                )
            for name in hits:
                if name in owner:
                    where = "twice in" if owner[name] == depth else f"in phase {owner[name]} and in"
                    raise FTSScheduleError(
                        f"parameter {name!r} is scheduled {where} phase {depth} "
                        f"(entry {_quoted(entry)}): each parameter may be thawed by one phase only"
                    )
                owner[name] = depth
                matched.append(name)
        if not matched:
            logger.warning(
                "fine-tuning schedule: phase %d thaws no parameter (all its entries were tied "
                "aliases)",
                depth,
            )
        new_optimizer = spec.new_optimizer.optimizer_init if spec.new_optimizer else None
        phases.append(
            Phase(
                depth=depth,
                params=tuple(sorted(matched, key=order.__getitem__)),
                max_transition_epoch=spec.max_transition_epoch,
                max_transition_step=spec.max_transition_step,
                lr=spec.lr,
                new_optimizer=new_optimizer,
                new_lr_scheduler=spec.new_lr_scheduler,
            )
        )
    return phases


def validate_schedule(
    raw: Any,
    param_names: Sequence[str],
    epoch_transitions_only: bool = False,
    shared_aliases: Mapping[str, str] | None = None,
) -> list[Phase]:
    """Validate a raw schedule against the model's (logical) parameter names; return its phases."""
    return resolve_schedule(
        parse_schedule(raw, epoch_transitions_only), param_names, shared_aliases
    )


def unscheduled_params(phases: Sequence[Phase], param_names: Sequence[str]) -> list[str]:
    """Names of parameters no phase thaws (they stay frozen for the whole run)."""
    scheduled = {n for p in phases for n in p.params}
    return [n for n in param_names if n not in scheduled]


def schedule_epochs(phases: Sequence[PhaseSpec]) -> int | None:
    """Epochs the schedule asks the run to last, or None (FTS's `max_epochs` extension).

    When the last phase has a max_transition_epoch, FTS runs at least as many epochs as the
    largest max_transition_epoch of phases 1.. (phase 0's and max_depth play no part).
    """
    if len(phases) < 2 or phases[-1].max_transition_epoch < 0:
        return None
    return max(spec.max_transition_epoch for spec in phases[1:])


def final_depth(phases: Sequence[Phase], max_depth: int) -> int:
    """Deepest phase the run may reach: the last phase, or max_depth if that is smaller."""
    if max_depth < 0:
        return len(phases) - 1
    return min(max_depth, len(phases) - 1)
