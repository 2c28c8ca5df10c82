"""Patching the accelerator: replace the dataloader or its collator where `accelerator.prepare`
receives them, and wrap accelerator methods (e.g. `prepare_optimizer`).

Names follow the reference fms-acceleration (`AcceleratorPatcher.replace(...)`,
`AcceleratorPatcherComponent`, `AcceleratorRuleReplace` with `skip_prepare`); each framework owns
its patcher and class-level calls reach the running framework's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch.utils.data import DataLoader

from .errors import PatchError, PatchTypeError
from .model_patcher import PatchRecord
from .routing import routed_attribute, routed_method, routed_reader
from .trainer_patcher import MethodPatcher

RULE_KIND_REPLACEMENT = "replacement"
RULE_SPECIAL_KWARGS = {RULE_KIND_REPLACEMENT: frozenset({"skip_prepare"})}
_PREPARE_RULE = "accelerator-prepare-replacements"


class AcceleratorPatcherComponent(Enum):
    """What a replacement rule replaces at `accelerator.prepare`."""

    data_loader = 1
    data_collator = 2


@dataclass
class AcceleratorRuleReplace:
    """Replace one component, with an object or a builder, after an optional pre-check."""

    rule_id: str
    component: AcceleratorPatcherComponent
    replacement: Any = None
    replacement_builder: Callable[..., Any] | None = None
    pre_req: Callable[[Any], Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.replacement is None) == (self.replacement_builder is None):
            raise PatchError(
                f"Rule '{self.rule_id}': either replacement or replacement_builder should be "
                "specified"
            )
        self.kwargs = dict(self.kwargs or {})
        unknown = set(self.kwargs) - RULE_SPECIAL_KWARGS[RULE_KIND_REPLACEMENT]
        if unknown:
            raise PatchError(
                f"Invalid special behavior kwargs in '{sorted(unknown)}' of rule "
                f"'{self.rule_id}'; allowed: {sorted(RULE_SPECIAL_KWARGS[RULE_KIND_REPLACEMENT])}"
            )

    def pre_req_check(self, to_be_replaced: Any) -> None:
        if self.pre_req is not None and not self.pre_req(to_be_replaced):
            raise PatchError(
                f"Rule '{self.rule_id}' failed pre-requisite check for type "
                f"'{type(to_be_replaced).__name__}'."
            )

    def build(self, old: Any, *args: Any) -> Any:
        if self.replacement is not None:
            return self.replacement
        return self.replacement_builder(old, *args)  # type: ignore[misc]


class AcceleratorPatcher(MethodPatcher):
    """Component replacements and method rules for the accelerator; undo restores it."""

    kind = "accelerator"
    replacement_rules = routed_attribute("_replacement_rules")

    def __init__(self) -> None:
        super().__init__()
        self._replacement_rules: dict[int, AcceleratorRuleReplace] = {}

    @routed_method
    def replace(
        self,
        rule_id: str,
        component: AcceleratorPatcherComponent,
        replacement: Any = None,
        replacement_builder: Callable[..., Any] | None = None,
        pre_requisite_check: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Replace the dataloader (`builder(dataloader, accelerator)`) or its collator
        (`builder(collate_fn)`) of every DataLoader passed to `accelerator.prepare`.

        `skip_prepare=True` (dataloader only) returns the replacement without preparing it.
        """
        if not isinstance(component, AcceleratorPatcherComponent):
            raise PatchTypeError(
                f"Rule '{rule_id}': component must be an AcceleratorPatcherComponent, got "
                f"{component!r}"
            )
        if rule_id in self._rule_ids():
            raise PatchError(f"Rule '{rule_id}' has already been added")
        if component.value in self._replacement_rules:
            raise PatchError(
                f"replace has already been called once on component '{component.name}' (rule "
                f"'{self._replacement_rules[component.value].rule_id}'); rule '{rule_id}' would "
                "replace it again"
            )
        if component is AcceleratorPatcherComponent.data_loader and not (
            replacement is None or isinstance(replacement, DataLoader)
        ):
            raise PatchTypeError(
                f"Rule '{rule_id}' replacing component '{component.name}' with wrong type "
                f"'{type(replacement).__name__}'"
            )
        if component is AcceleratorPatcherComponent.data_collator and not (
            replacement is None or callable(replacement)
        ):
            raise PatchTypeError(
                f"Rule '{rule_id}' replacing component '{component.name}' with wrong type "
                f"'{type(replacement).__name__}'"
            )
        self._replacement_rules[component.value] = AcceleratorRuleReplace(
            rule_id, component, replacement, replacement_builder, pre_requisite_check, kwargs
        )

    def _rule_ids(self) -> set[str]:
        return super()._rule_ids() | {r.rule_id for r in self._replacement_rules.values()}

    def unused_replacements(self) -> list[AcceleratorRuleReplace]:
        """Replacement rules that no DataLoader given to `prepare` has gone through yet."""
        used = {record.rule_id for record in self._history}
        return [r for r in self._replacement_rules.values() if r.rule_id not in used]

    @routed_method
    def patch(self, accelerator: Any) -> list[PatchRecord]:
        """The reference's name for `install`."""
        return self.install(accelerator)

    def install(self, accelerator: Any) -> list[PatchRecord]:
        """Wrap `accelerator.prepare` (when replacements exist) and apply the method rules."""
        if self._replacement_rules and _PREPARE_RULE not in self._method_rules:
            self.wrap_method(_PREPARE_RULE, "prepare", self._prepare_builder(accelerator))
        return super().install(accelerator)

    @routed_reader
    def summary(self) -> str:
        """The reference's text summary of the accelerator rules."""
        lines = ["***************** Accelerator Patching *************"]
        for rule in self._replacement_rules.values():
            lines.append(
                f"Rule: {rule.rule_id:25s} Kind: {RULE_KIND_REPLACEMENT:10s} "
                f"Component: {rule.component.name:20s}"
            )
        for method_rule in self._method_rules.values():
            if method_rule.rule_id != _PREPARE_RULE:
                lines.append(
                    f"Rule: {method_rule.rule_id:25s} Kind: {'method':10s} "
                    f"Method: {method_rule.method}"
                )
        return "\n".join(lines)

    def undo(self) -> None:
        super().undo()
        self._method_rules.pop(_PREPARE_RULE, None)

    def transform(self, dataloader: DataLoader, accelerator: Any = None) -> tuple[Any, bool]:
        """Apply the dataloader rule, then the collator rule; never changes `dataloader`.

        Returns the result and whether `prepare` must be skipped for it.
        """
        result: Any = dataloader
        loader_rule = self._replacement_rules.get(AcceleratorPatcherComponent.data_loader.value)
        if loader_rule is not None:
            loader_rule.pre_req_check(result)
            result = loader_rule.build(result, accelerator)
            self._record(loader_rule, result)
        collator_rule = self._replacement_rules.get(AcceleratorPatcherComponent.data_collator.value)
        if collator_rule is not None:
            collator_rule.pre_req_check(result.collate_fn)
            if result is dataloader:
                # a DataLoader's sampler is fixed after init, but collate_fn may change
                result = copy.copy(dataloader)
            result.collate_fn = collator_rule.build(result.collate_fn)
            self._record(collator_rule, result.collate_fn)
        skip = bool(loader_rule is not None and loader_rule.kwargs.get("skip_prepare"))
        return result, skip

    def _record(self, rule: AcceleratorRuleReplace, new: Any) -> None:
        self._history.append(
            PatchRecord(
                rule.rule_id,
                RULE_KIND_REPLACEMENT,
                f"{rule.component.name} -> {type(new).__name__}",
                cls=type(new).__name__,
                module_name=rule.component.name,
            )
        )

    def _prepare_builder(self, accelerator: Any) -> Callable[[Callable[..., Any]], Callable]:
        def builder(original: Callable[..., Any]) -> Callable[..., Any]:
            def prepare(*args: Any, **kwargs: Any) -> Any:
                skipped: dict[int, Any] = {}
                passed = []
                for index, arg in enumerate(args):
                    if isinstance(arg, DataLoader):
                        arg, skip = self.transform(arg, accelerator)
                        if skip:
                            skipped[index] = arg
                            continue
                    passed.append(arg)
                prepared = original(*passed, **kwargs) if passed else ()
                if not skipped:
                    return prepared
                prepared = list(prepared) if len(passed) > 1 else [prepared] * bool(passed)
                for index in sorted(skipped):
                    prepared.insert(index, skipped[index])
                return prepared[0] if len(args) == 1 else tuple(prepared)

            return prepare

        return builder
