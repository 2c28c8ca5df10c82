"""Fine-tuning schedule: YAML loading, validation against a model's parameter names, defaults.

Pure module: it knows parameter *names* only (logical names, as a strategy adapter reports them)
and never imports the framework, torch or transformers.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

PHASE_KEYS = (
    "params",
    "max_transition_epoch",
    "max_transition_step",
    "lr",
    "new_optimizer",
    "new_lr_scheduler",
)
REINIT_KEYS = {"new_optimizer": "optimizer_init", "new_lr_scheduler": "lr_scheduler_init"}


class FTSScheduleError(ValueError):
    """A fine-tuning schedule is malformed or does not fit the model."""


@dataclass(frozen=True)
class ClassInit:
    """A class to instantiate at a phase transition: import path and keyword arguments."""

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> type:
        """Import and return the class named by class_path."""
        return import_class(self.class_path)


@dataclass(frozen=True)
class Phase:
    """One validated phase: the logical parameter names it thaws and how it ends."""

    depth: int
    params: tuple[str, ...]
    max_transition_epoch: int = -1
    max_transition_step: int = -1
    lr: float | None = None
    new_optimizer: ClassInit | None = None
    new_lr_scheduler: ClassInit | None = None


# --------------------------------------------------------------------------------------- YAML
class _ScheduleLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads `1e-5` as a float (YAML 1.1: `1.0e-5`)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise FTSScheduleError(
                    f"duplicate key {key!r} in the fine-tuning schedule (line {line}; "
                    f"first defined on line {seen[key]}): each phase and each phase setting "
                    "may appear only once"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_ScheduleLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_schedule_yaml(text: str) -> Any:
    """Parse schedule YAML text, rejecting duplicate keys."""
    try:
        return yaml.load(text, Loader=_ScheduleLoader)
    except yaml.YAMLError as err:
        raise FTSScheduleError(f"the fine-tuning schedule is not valid YAML: {err}") from err


def read_schedule(source: str | os.PathLike | Mapping) -> Any:
    """Return the raw schedule mapping from a YAML file path or an inline mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FTSScheduleError(f"ft_schedule file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        raw = load_schedule_yaml(fh.read())
    if raw is None:
        raise FTSScheduleError(f"ft_schedule file {path!r} is empty")
    return raw


def dump_schedule(schedule: Mapping[int, Mapping[str, Any]]) -> str:
    """Serialize a raw schedule mapping (phase -> settings) to YAML text."""
    return yaml.safe_dump(
        {int(k): dict(v) for k, v in schedule.items()}, sort_keys=False, default_flow_style=False
    )


def write_schedule(schedule: Mapping[int, Mapping[str, Any]], path: str | os.PathLike) -> str:
    """Write a raw schedule to a YAML file and return its path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(dump_schedule(schedule))
    return path


def default_schedule(param_names: Sequence[str], per_phase: int = 2) -> dict[int, dict]:
    """FTS's implicit schedule: parameters in reverse order, `per_phase` tensors per phase."""
    names = list(reversed(list(param_names)))
    return {
        i // per_phase: {"params": names[i : i + per_phase]}
        for i in range(0, len(names), per_phase)
    }


def default_schedule_filename(model_class_name: str) -> str:
    """File name FTS uses for a generated schedule."""
    return f"{model_class_name}_ft_schedule.yaml"


def import_class(class_path: str) -> type:
    """Import `pkg.module.Class`; raise FTSScheduleError naming the path when it fails."""
    module_name, _, attr = class_path.rpartition(".")
    if not module_name:
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
        raise FTSScheduleError(
            f"module {module_name!r} has no attribute {attr!r} (class_path {class_path!r})"
        )
    return getattr(module, attr)


# --------------------------------------------------------------------------------- validation
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _match_entry(entry: str, names: Sequence[str], depth: int) -> list[str]:
    if entry in names:
        return [entry]
    try:
        pattern = re.compile(entry)
    except re.error as err:
        raise FTSScheduleError(
            f"phase {depth}: params entry {entry!r} is neither a parameter name nor a valid "
            f"regex ({err})"
        ) from err
    return [n for n in names if pattern.match(n)]


def _parse_class_init(value: Any, key: str, depth: int) -> ClassInit:
    where = f"phase {depth}: {key}"
    if not isinstance(value, Mapping):
        raise FTSScheduleError(
            f"{where} must be a mapping with class_path and init_args, got {value!r}"
        )
    # FTS nests the directive one level down (new_optimizer.optimizer_init); accept both forms.
    nested = REINIT_KEYS[key]
    if nested in value:
        extra = sorted(set(value) - {nested})
        if extra:
            raise FTSScheduleError(
                f"{where} has unsupported key(s) {extra}; only {nested!r} is read"
            )
        value = value[nested]
        where = f"{where}.{nested}"
        if not isinstance(value, Mapping):
            raise FTSScheduleError(f"{where} must be a mapping with class_path and init_args")
    unknown = sorted(set(value) - {"class_path", "init_args"})
    if unknown:
        raise FTSScheduleError(
            f"{where} has unknown key {unknown[0]!r}"
            f"{_suggest(str(unknown[0]), ('class_path', 'init_args'))}"
        )
    if "class_path" not in value:
        raise FTSScheduleError(
            f"{where} has no class_path: name the class to build, e.g. torch.optim.AdamW"
        )
    class_path = value["class_path"]
    if not isinstance(class_path, str):
        raise FTSScheduleError(f"{where}.class_path must be a string, got {class_path!r}")
    init_args = value.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise FTSScheduleError(f"{where}.init_args must be a mapping, got {init_args!r}")
    try:
        import_class(class_path)
    except FTSScheduleError as err:
        raise FTSScheduleError(f"{where}: {err}") from err
    return ClassInit(class_path, dict(init_args))


def _parse_transition(value: Any, key: str, depth: int) -> int:
    if not _is_int(value) or value < -1:
        raise FTSScheduleError(
            f"phase {depth}: {key} must be an integer >= 0 (or -1 for no limit), got {value!r}"
        )
    return value


def validate_schedule(
    raw: Any,
    param_names: Sequence[str],
    epoch_transitions_only: bool = False,
) -> list[Phase]:
    """Validate a raw schedule against the model's (logical) parameter names; return its phases."""
    if not isinstance(raw, Mapping) or not raw:
        raise FTSScheduleError(
            f"a fine-tuning schedule must be a non-empty mapping of phase -> settings, got {raw!r}"
        )
    bad_keys = [k for k in raw if not _is_int(k)]
    if bad_keys:
        raise FTSScheduleError(
            f"phase key {bad_keys[0]!r} is not an integer: phases are keyed 0, 1, 2, ..."
        )
    keys = sorted(raw)
    if keys != list(range(len(keys))):
        missing = sorted(set(range(max(keys) + 1)) - set(keys))
        detail = f"phase {missing[0]} is missing" if missing else f"phase {keys[0]} is negative"
        raise FTSScheduleError(
            f"phase keys must be contiguous integers starting at 0, got {keys}: {detail}"
        )

    names = list(param_names)
    owner: dict[str, int] = {}
    phases: list[Phase] = []
    last = len(keys) - 1
    for depth in keys:
        spec = raw[depth]
        if not isinstance(spec, Mapping):
            raise FTSScheduleError(
                f"phase {depth} must be a mapping with a params list, got {spec!r}"
            )
        unknown = [k for k in spec if k not in PHASE_KEYS]
        if unknown:
            raise FTSScheduleError(
                f"phase {depth}: unknown key {unknown[0]!r}"
                f"{_suggest(str(unknown[0]), PHASE_KEYS)}; "
                f"allowed: {', '.join(PHASE_KEYS)}"
            )
        entries = spec.get("params")
        if isinstance(entries, str):
            entries = [entries]
        if not entries or not isinstance(entries, list):
            raise FTSScheduleError(
                f"phase {depth}: params must be a non-empty list of names or regexes"
            )
        matched: list[str] = []
        for entry in entries:
            if not isinstance(entry, str):
                raise FTSScheduleError(f"phase {depth}: params entry {entry!r} is not a string")
            hits = _match_entry(entry, names, depth)
            if not hits:
                raise FTSScheduleError(
                    f"phase {depth}: params entry {entry!r} matches no parameter of the model"
                    f"{_suggest(entry, names)}"
                )
            for name in hits:
                if name in owner:
                    where = "twice in" if owner[name] == depth else f"in phase {owner[name]} and in"
                    raise FTSScheduleError(
                        f"parameter {name!r} is scheduled {where} phase {depth} "
                        f"(entry {entry!r}): each parameter may be thawed by one phase only"
                    )
                owner[name] = depth
                matched.append(name)

        mte = _parse_transition(spec.get("max_transition_epoch", -1), "max_transition_epoch", depth)
        mts = _parse_transition(spec.get("max_transition_step", -1), "max_transition_step", depth)
        if epoch_transitions_only:
            if "max_transition_step" in spec:
                raise FTSScheduleError(
                    f"phase {depth}: max_transition_step is not allowed with epoch_transitions_only"
                )
            if depth < last and mte < 0:
                raise FTSScheduleError(
                    f"phase {depth}: epoch_transitions_only is set, so every phase but the last "
                    "needs max_transition_epoch >= 0"
                )
        if phases:
            previous = phases[-1]
            for unit, limit, previous_limit in (
                ("epoch", mte, previous.max_transition_epoch),
                ("step", mts, previous.max_transition_step),
            ):
                if limit >= 0 and previous_limit >= 0 and limit < previous_limit:
                    raise FTSScheduleError(
                        f"phase {depth}: max_transition_{unit} {limit} is smaller than phase "
                        f"{depth - 1}'s ({previous_limit}); transition {unit}s must not decrease"
                    )

        lr = spec.get("lr")
        if lr is not None:
            if depth == 0:
                raise FTSScheduleError(
                    "phase 0: lr is taken from the Trainer (TrainingArguments.learning_rate); "
                    "set it there and remove lr from phase 0"
                )
            if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
                raise FTSScheduleError(f"phase {depth}: lr must be a positive float, got {lr!r}")
            lr = float(lr)

        reinit: dict[str, ClassInit | None] = {}
        for key in REINIT_KEYS:
            if key in spec and spec[key] is not None:
                if depth == 0:
                    raise FTSScheduleError(
                        f"phase 0: {key} is not allowed: the Trainer builds the initial "
                        "optimizer and LR scheduler; reinitialization applies to phases >= 1 only"
                    )
                reinit[key] = _parse_class_init(spec[key], key, depth)
            else:
                reinit[key] = None

        order = {n: i for i, n in enumerate(names)}
        phases.append(
            Phase(
                depth=depth,
                params=tuple(sorted(matched, key=order.__getitem__)),
                max_transition_epoch=mte,
                max_transition_step=mts,
                lr=lr,
                new_optimizer=reinit["new_optimizer"],
                new_lr_scheduler=reinit["new_lr_scheduler"],
            )
        )
    return phases


def unscheduled_params(phases: Sequence[Phase], param_names: Sequence[str]) -> list[str]:
    """Names of parameters no phase thaws (they stay frozen for the whole run)."""
    scheduled = {n for p in phases for n in p.params}
    return [n for n in param_names if n not in scheduled]


def final_depth(phases: Sequence[Phase], max_depth: int) -> int:
    """Deepest phase the run may reach: the last phase, or max_depth if that is smaller."""
    if max_depth < 0:
        return len(phases) - 1
    return min(max_depth, len(phases) - 1)
