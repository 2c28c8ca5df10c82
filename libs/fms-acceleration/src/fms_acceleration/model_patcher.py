"""Rule-based model patching: new forwards on matching modules and attribute swaps in imported
modules, each recorded so it can be listed and undone.

Names and semantics follow the reference fms-acceleration (`ModelPatcher.register(rule)` on the
class, `ModelPatcherRule`, `ModelPatcherTrigger`, `patch_target_module`, ...), but every patcher
is an instance owned by one framework; class-level calls go to the running framework's.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from . import compat
from .errors import PatchError, PatchTypeError
from .module_members import CarryBack, MemberRecord, replace_member
from .patch_records import PatchRecord, install, swap_attribute
from .routing import Routable, routed_attribute, routed_method, routed_reader

SETTING = "setting"  # the kind of a record that changed a setting, not a forward or attribute
HUB_KERNELS_OFF = "hub-kernels-off"


class ModelPatcherTriggerType(Enum):
    """How a trigger selects modules: by class (isinstance) or by a predicate."""

    module = 1
    callable = 2


def _is_module_class(check: Any) -> bool:
    if isinstance(check, tuple):
        return bool(check) and all(_is_module_class(c) for c in check)
    return inspect.isclass(check) and issubclass(check, torch.nn.Module)


@dataclass
class ModelPatcherTrigger:
    """Selects modules by class (or tuple of classes) or by predicate, optionally by exact name.

    `module_name` must equal the module's full dotted name or its last component
    (`submodule_1` does not select `submodule_10`).
    """

    check: Any
    type: ModelPatcherTriggerType | None = None
    module_name: str | None = None

    def __post_init__(self) -> None:
        if _is_module_class(self.check):
            kind = ModelPatcherTriggerType.module
        elif callable(self.check) and not inspect.isclass(self.check):
            kind = ModelPatcherTriggerType.callable
        else:
            raise PatchTypeError(
                f"check argument needs to be torch.nn.Module or Callable; got {self.check!r}"
            )
        if self.type is not None and self.type != kind:
            raise PatchError(
                "type argument passed but `check` argument does not match type specified: "
                f"type={self.type.name}, check={self.check!r}"
            )
        self.type = kind

    def is_triggered(self, module: torch.nn.Module, module_name: str | None = None) -> bool:
        """Whether this trigger selects `module` (named `module_name` in its model); a predicate
        that raises does not select it (the reference's semantics)."""
        try:
            return self.selects(module, module_name)
        except Exception:
            return False

    def selects(self, module: torch.nn.Module, module_name: str | None = None) -> bool:
        """Like is_triggered, but a predicate's exception propagates (the patcher reports a
        predicate that never judged a module without raising)."""
        if self.module_name is not None:
            name = module_name or ""
            if self.module_name not in (name, name.rpartition(".")[2]):
                return False
        if self.type == ModelPatcherTriggerType.module:
            return isinstance(module, self.check)
        return bool(self.check(module))


@dataclass
class ModelPatcherRule:
    """One patch: a forward (or a forward builder) for triggered modules, or an attribute swap.

    `import_and_maybe_reload=(target, replacement, reload)` replaces the object at dotted path
    `target`. Without `reload` the replacement stays until undone. With `reload`, that module is
    reloaded to pick the replacement up and `target` gets its original back (the reference's
    semantics). Such a rule applies to a model whose module path starts `target` or `reload`
    (so per-architecture rules only touch their architecture) unless `applies_to_any_model`.
    """

    rule_id: str
    trigger: ModelPatcherTrigger | None = None
    forward: Callable[..., Any] | None = None
    forward_builder: Callable[..., Any] | None = None
    forward_builder_args: Sequence[str] | None = None
    import_and_maybe_reload: tuple[str, Any, str | None] | None = None
    applies_to_any_model: bool = False

    def __post_init__(self) -> None:
        given = [
            self.forward is not None,
            self.forward_builder is not None,
            self.import_and_maybe_reload is not None,
        ]
        if sum(given) > 1:
            raise PatchError(
                f"Rule '{self.rule_id}' must only have at most one of forward, forward builder, "
                "or import_and_maybe_reload, specified."
            )
        if self.import_and_maybe_reload is not None and self.trigger is not None:
            raise PatchError(
                f"Rule '{self.rule_id}' has import_and_maybe_reload specified, and trigger must "
                "be None."
            )
        if self.forward_builder_args is not None and self.forward_builder is None:
            raise PatchError(
                f"Rule '{self.rule_id}' has forward_builder_args but no forward_builder."
            )
        if self.import_and_maybe_reload is not None:
            self._check_import_rule()

    def check_complete(self) -> None:
        """PatchError unless the rule can be applied: a forward rule needs a trigger.

        Checked when the rule is registered, not built: the reference let a rule be built
        without one (its tests filter such rules by id), so building one stays allowed."""
        if self.import_and_maybe_reload is None and self.trigger is None:
            raise PatchError(
                f"Rule '{self.rule_id}' needs a trigger with its forward / forward_builder (or "
                "import_and_maybe_reload alone)"
            )

    def _check_import_rule(self) -> None:
        spec = self.import_and_maybe_reload
        if not (isinstance(spec, tuple) and len(spec) == 3 and isinstance(spec[0], str)):
            raise PatchError(
                f"Rule '{self.rule_id}': import_and_maybe_reload must be a tuple "
                f"(target path, replacement, module to reload or None), got {spec!r}"
            )
        target, _, reload_name = spec
        if "." not in target:
            raise PatchError(f"Rule '{self.rule_id}': target '{target}' has no object to patch")
        if reload_name is not None and reload_name == target.rpartition(".")[0]:
            raise PatchError(
                f"Rule '{self.rule_id}': reloading '{reload_name}' would undo the patch of "
                f"'{target}'; name the module that imports it instead"
            )

    @property
    def is_import_rule(self) -> bool:
        return self.import_and_maybe_reload is not None


def forward_like(
    original: Callable[..., Any],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a new forward `f(self, ...)` so that, once bound to the module, it shows the
    signature of `original` (a bound forward): the Trainer reads it to pick dataset columns."""

    def decorate(forward: Callable[..., Any]) -> Callable[..., Any]:
        functools.update_wrapper(forward, original)
        signature = inspect.signature(original)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        forward.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[self_param, *signature.parameters.values()]
        )
        return forward

    return decorate


def patch_target_module(to_patch: str, replace_with: Any, target_module: str | None = None) -> None:
    """Replace `to_patch` with `replace_with`; with `target_module`, reload that module so it
    picks the replacement up, then restore `to_patch` (the reference's semantics)."""
    if "." not in to_patch:
        raise PatchError(f"must have an object to patch: '{to_patch}'")
    record = swap_attribute("patch_target_module", to_patch, replace_with)
    if target_module is not None:
        importlib.reload(importlib.import_module(target_module))
        record.undo()


def _module_path(model: torch.nn.Module) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__module__ if not isinstance(base, type) else base.__module__


class RecordingPatcher(Routable):
    """What every patcher shares: the record of the patches it applied, reverted by undo."""

    history = routed_attribute("_history")

    def __init__(self) -> None:
        self._history: list[PatchRecord] = []

    def undo(self) -> None:
        """Revert every recorded patch, newest first."""
        while self._history:
            self._history.pop().undo()


class ModelPatcher(RecordingPatcher):
    """Holds rules, applies them to a model and to imported modules, and can undo them all."""

    rules = routed_attribute("_rules")

    def __init__(self) -> None:
        super().__init__()
        self._rules: dict[str, ModelPatcherRule] = {}
        self._applied: set[str] = set()

    @routed_method
    def register(self, rule: ModelPatcherRule) -> None:
        """Add a rule; its id must be unique in this patcher."""
        if not isinstance(rule, ModelPatcherRule):
            raise PatchTypeError(f"register expects a ModelPatcherRule, got {rule!r}")
        rule.check_complete()
        if rule.rule_id in self._rules:
            raise PatchError(f"patch rule '{rule.rule_id}' already exists")
        self._rules[rule.rule_id] = rule

    @staticmethod
    def load_patches(module_names: Sequence[str], reload: bool = False) -> None:
        """Import (optionally reload) modules whose import registers patch rules."""
        for name in module_names:
            if importlib.util.find_spec(name):
                module = importlib.import_module(name)
                if reload:
                    importlib.reload(module)

    @routed_method
    def patch(self, model: torch.nn.Module | None = None, **kwargs: Any) -> list[PatchRecord]:
        """Apply every rule not applied yet: attribute swaps, then forwards on `model`.

        Keyword arguments reach the forward builders that name them in forward_builder_args.
        """
        pending = [r for r in self._rules.values() if r.rule_id not in self._applied]
        records = self._apply_import_rules([r for r in pending if r.is_import_rule], model)
        forward_rules = [r for r in pending if not r.is_import_rule]
        if model is not None and forward_rules:
            judged = _TriggerOutcomes()
            records += self._patch_forwards(model, forward_rules, kwargs, judged=judged)
            judged.refuse_predicates_that_never_judged(forward_rules)
            self._applied.update(r.rule_id for r in forward_rules)
        self._history.extend(records)
        return records

    def undo(self) -> None:
        """Revert every recorded patch, newest first, and forget the applied state."""
        super().undo()
        self._applied.clear()

    @routed_method
    def replace_member(
        self,
        rule_id: str,
        module: torch.nn.Module,
        name: str,
        replacement: torch.nn.Module | torch.nn.Parameter | None,
        *,
        where: str = "",
        carry_back: CarryBack | None = None,
    ) -> MemberRecord:
        """Replace submodule or parameter `name` of `module` now (None removes it), recorded
        with the other patches: undo calls `carry_back(original, replacement)`, then puts the
        original back (see fms_acceleration.module_members)."""
        record = replace_member(
            rule_id, module, name, replacement, where=where, carry_back=carry_back
        )
        self._history.append(record)
        return record

    def counts(self) -> dict[str, int]:
        """How many targets each applied rule patched (settings the patcher changed for a
        rule's sake, such as hub kernels turned off, are in the history, not here)."""
        out: dict[str, int] = {}
        for record in self._history:
            if record.kind != SETTING:
                out[record.rule_id] = out.get(record.rule_id, 0) + 1
        return out

    @routed_reader
    def summary(self, raw: bool = False) -> Any:
        """The reference's text summary (raw=True: one dict per patched target)."""
        rows = [record.as_row() for record in self._history]
        if raw:
            return rows
        if not rows:
            return ""
        grouped: dict[tuple[str, str, str], int] = {}
        for row in rows:
            key = (row["rule_id"], row["module_name"], row["cls"])
            grouped[key] = grouped.get(key, 0) + 1
        lines = ["***************** Module Forwards Patching *************"]
        for (rule_id, module_name, cls), count in sorted(grouped.items()):
            lines.append(
                f"Rule: {rule_id:15s} Module: {module_name:25s} Class: {cls:15s} Num: {count:2d}"
            )
        return "\n".join(lines)

    # --- attribute swaps -------------------------------------------------------------------

    def _apply_import_rules(
        self, rules: list[ModelPatcherRule], model: torch.nn.Module | None
    ) -> list[PatchRecord]:
        if model is not None:
            prefix = _module_path(model)
            rules = [r for r in rules if r.applies_to_any_model or _touches(r, prefix)]
        if not rules:
            return []
        by_reload: dict[str | None, list[ModelPatcherRule]] = {}
        for rule in rules:
            by_reload.setdefault(rule.import_and_maybe_reload[2], []).append(rule)  # type: ignore[index]
        _refuse_nested_reloads(by_reload)
        records: list[PatchRecord] = []
        for rule in by_reload.pop(None, []):
            target, replacement, _ = rule.import_and_maybe_reload  # type: ignore[misc]
            records.append(swap_attribute(rule.rule_id, target, replacement))
            self._applied.add(rule.rule_id)
        for reload_name, group in by_reload.items():
            swaps = [
                swap_attribute(
                    r.rule_id, r.import_and_maybe_reload[0], r.import_and_maybe_reload[1]
                )  # type: ignore[index]
                for r in group
            ]
            importlib.reload(importlib.import_module(reload_name))  # type: ignore[arg-type]
            for swap in reversed(swaps):
                swap.undo()
                records.append(
                    PatchRecord(swap.rule_id, "attribute", swap.target, _reload=reload_name)
                )
            self._applied.update(r.rule_id for r in group)
        return records

    # --- forwards ----------------------------------------------------------------------------

    def _patch_forwards(
        self,
        model: torch.nn.Module,
        rules: list[ModelPatcherRule],
        kwargs: dict[str, Any],
        prefix: str = "",
        done: set[int] | None = None,
        root: torch.nn.Module | None = None,
        judged: _TriggerOutcomes | None = None,
    ) -> list[PatchRecord]:
        done = set() if done is None else done
        root = model if root is None else root
        judged = _TriggerOutcomes() if judged is None else judged
        records: list[PatchRecord] = []
        for local_name, module in model.named_modules():
            if id(module) in done:
                continue
            name = ".".join(p for p in (prefix, local_name) if p)
            hits = [r for r in rules if judged.selects(r, module, name)]
            if not hits:
                continue
            rule = hits[0]
            for ignored in hits[1:]:
                warnings.warn(
                    f"rule {ignored.rule_id} is ignored on {name or '<root>'} as an earlier rule "
                    f"{rule.rule_id} has been applied",
                    stacklevel=3,
                )
            forward = rule.forward
            if rule.forward_builder is not None:
                wanted = rule.forward_builder_args or ()
                forward = rule.forward_builder(
                    module, **{k: v for k, v in kwargs.items() if k in wanted}
                )
            if isinstance(forward, list):
                sub_rules = [
                    ModelPatcherRule(f"{rule.rule_id}-{i + 1}", trigger=trigger, forward=fwd)
                    for i, (trigger, fwd) in enumerate(forward)
                ]
                records += self._patch_forwards(module, sub_rules, kwargs, name, done, root, judged)
                continue
            if compat.is_hub_kernel_layer(module):
                records += _keep_instance_forwards(root)
            records.append(self._set_forward(rule.rule_id, model, module, name, forward))
            done.add(id(module))
        return records

    @staticmethod
    def _set_forward(
        rule_id: str, root: torch.nn.Module, module: torch.nn.Module, name: str, forward: Any
    ) -> PatchRecord:
        if not callable(forward):
            raise PatchTypeError(
                f"rule '{rule_id}' built a forward that is not callable: {forward!r}"
            )
        parent_name, _, leaf = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        record = PatchRecord(
            rule_id,
            "forward",
            f"{name or '<root>'} ({type(module).__name__})",
            cls=type(module).__name__,
            module_name=leaf or name,
            parent_cls=type(parent).__name__ if parent is not module else "",
            parent_module_name=parent_name,
            instance=id(module),
            _owner=module,
            _name="forward",
        )
        return install(record, types.MethodType(forward, module))


class _TriggerOutcomes:
    """What each rule's trigger said over one model: a predicate that raised for every module
    it was asked about (a typo such as `m.wieght`) judged nothing, and is reported."""

    def __init__(self) -> None:
        self.judged: set[str] = set()
        self.first_error: dict[str, tuple[str, Exception]] = {}

    def selects(self, rule: ModelPatcherRule, module: torch.nn.Module, name: str) -> bool:
        try:
            selected = rule.trigger.selects(module, name)  # type: ignore[union-attr]
        except Exception as err:  # the reference's semantics: not selected
            self.first_error.setdefault(rule.rule_id, (name or "<root>", err))
            return False
        self.judged.add(rule.rule_id)
        return selected

    def refuse_predicates_that_never_judged(self, rules: Sequence[ModelPatcherRule]) -> None:
        for rule in rules:
            if rule.rule_id in self.first_error and rule.rule_id not in self.judged:
                name, err = self.first_error[rule.rule_id]
                raise PatchError(
                    f"rule '{rule.rule_id}': its trigger raised on every module it was asked "
                    f"about, so it selects nothing; on {name}: {type(err).__name__}: {err}"
                )


def _keep_instance_forwards(root: torch.nn.Module) -> list[PatchRecord]:
    """Hub kernels off for a model whose hub-decorated layers get our forwards: otherwise its
    next train()/eval() switch re-kernelizes them and drops ours (transformers 5.2x)."""
    base = root.get_base_model() if hasattr(root, "get_base_model") else root
    restore = compat.stop_hub_kernels(base)
    if restore is None:
        return []
    record = PatchRecord(
        HUB_KERNELS_OFF,
        SETTING,
        f"{type(base).__name__}.use_kernels",
        cls=type(base).__name__,
        module_name="use_kernels",
        instance=id(base),
        _restore=restore,
    )
    return [record]


def _touches(rule: ModelPatcherRule, prefix: str) -> bool:
    target, _, reload_name = rule.import_and_maybe_reload  # type: ignore[misc]
    return target.startswith(prefix) or bool(reload_name and reload_name.startswith(prefix))


def _refuse_nested_reloads(by_reload: dict[str | None, list[ModelPatcherRule]]) -> None:
    names = sorted((n for n in by_reload if n), key=len)
    for i, short in enumerate(names):
        for long in names[i + 1 :]:
            if long.startswith(short + "."):
                raise PatchError(
                    f"Attempting to reload a subpath `{short}` multiple times in "
                    f"{by_reload[short][0].rule_id} and {by_reload[long][0].rule_id}: reloading "
                    f"'{short}' could undo the patch that reloads '{long}'"
                )


# --- the reference's module-level helpers -------------------------------------------------------


def patch_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """Apply the current patcher's rules to `model` and return it."""
    ModelPatcher.patch(model, **kwargs)
    return model


def patch_model_summary() -> str:
    """The current patcher's summary."""
    return ModelPatcher.summary()


def combine_triggers(*triggers: ModelPatcherTrigger, logic: str = "OR") -> ModelPatcherTrigger:
    """One trigger that is the AND / OR of `triggers`."""
    if logic not in ("AND", "OR"):
        raise PatchError(
            f"Only `AND`, `OR` logic implemented for combining triggers, got {logic!r}"
        )
    combine = all if logic == "AND" else any

    def check(module: torch.nn.Module, module_name: str | None = None) -> bool:
        return combine(t.is_triggered(module, module_name) for t in triggers)

    return ModelPatcherTrigger(check=check)


def combine_functions(*funcs: Callable[..., list], logic: str = "APPEND") -> Callable[..., list]:
    """One function returning the concatenated lists of `funcs` (e.g. rule builders)."""
    if logic != "APPEND":
        raise PatchError(f"only APPEND logic implemented for combining functions, got {logic!r}")

    def append(*args: Any, **kwargs: Any) -> list:
        results: list = []
        for func in funcs:
            results += func(*args, **kwargs)
        return results

    return append
