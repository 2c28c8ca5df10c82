"""Installed packages: loading an entry-point group, and the versions of installed packages.

The one place that turns entry points into objects (plugins, CLI subcommands, strategy adapters)
and the one place that reads installed versions (summaries, benchmark CSVs, `plugins`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import Any

NOT_INSTALLED = "<not installed>"  # the version of a module no installed distribution ships


@dataclass(frozen=True)
class LoadedEntryPoint:
    """An entry point that imported, with the distribution that declares it."""

    name: str
    value: str
    package: str
    version: str
    obj: Any


@dataclass(frozen=True)
class BrokenEntryPoint:
    """An entry point that cannot be used: what it is, who declares it, and why."""

    name: str
    value: str
    package: str
    version: str
    problem: str  # e.g. "failed to import: ModuleNotFoundError: ..."

    def describe(self) -> str:
        where = f"from package '{self.package}' {self.version}"
        return f"'{self.name}' ({self.value}) {where} {self.problem}"


def _distribution(entry_point: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "<unknown>", "<unknown>"
    return dist.metadata["Name"], dist.version


def entry_points_of(group: str) -> list[metadata.EntryPoint]:
    """The entry points of `group`, sorted by package then name (a stable, documented order)."""
    return sorted(
        metadata.entry_points(group=group), key=lambda ep: (_distribution(ep)[0], ep.name)
    )


def load_entry_points(
    entry_points: Iterable[metadata.EntryPoint],
) -> tuple[list[LoadedEntryPoint], list[BrokenEntryPoint]]:
    """Import each entry point; a failure is recorded with its reason, never raised."""
    loaded: list[LoadedEntryPoint] = []
    broken: list[BrokenEntryPoint] = []
    for entry_point in entry_points:
        package, version = _distribution(entry_point)
        try:
            obj = entry_point.load()
        except Exception as err:  # a broken plugin must never take the others down
            broken.append(
                BrokenEntryPoint(
                    entry_point.name,
                    entry_point.value,
                    package,
                    version,
                    f"failed to import: {type(err).__name__}: {err}",
                )
            )
            continue
        loaded.append(LoadedEntryPoint(entry_point.name, entry_point.value, package, version, obj))
    return loaded, broken


def installed_version(package: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def installed_versions(packages: Sequence[str]) -> dict[str, str]:
    """package -> version for each installed package of `packages` (missing ones left out)."""
    found = {name: installed_version(name) for name in packages}
    return {name: version for name, version in found.items() if version is not None}


@cache
def _module_distributions() -> Mapping[str, list[str]]:
    return metadata.packages_distributions()


def distribution_of_module(module_name: str) -> tuple[str, str]:
    """(package, version) that ships the top-level package of `module_name`."""
    top = module_name.split(".")[0]
    names = _module_distributions().get(top) or []
    if not names and top in sys.modules:
        _module_distributions.cache_clear()  # installed after the first lookup
        names = _module_distributions().get(top) or []
    # editable installs are missing from packages_distributions(): try the usual spelling
    for name in [*names, top.replace("_", "-")]:
        version = installed_version(name)
        if version is not None:
            return name, version
    return top, NOT_INSTALLED
