"""Which plugins exist, from one source: the entry points that installed plugin packages declare
(group `fms_acceleration.plugins`). Everything else that lists plugins is derived from them: the
installable short names, the packages of a checkout, the versions a summary reports.

The one hand-written table is REFERENCE_STANZAS: the stanzas of the reference project's plugins
and the packages that provide them, so a configuration naming one whose package is not installed
is told what to install (an entry point cannot describe a package that is not there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from .constants import PLUGIN_GROUP, PLUGIN_PREFIX
from .packages import entry_points_of

PACKAGE_PREFIX = "fms-acceleration-"

# stanza path -> the package publishing its plugin (foundation-model-stack/fms-acceleration; ours
# carry the same names, so a client's configuration resolves to them)
REFERENCE_STANZAS: Mapping[str, str] = MappingProxyType(
    {
        "peft.quantization.bitsandbytes": "fms-acceleration-peft",
        "peft.quantization.auto_gptq": "fms-acceleration-peft",
        "peft.quantization.fused_ops_and_kernels": "fms-acceleration-foak",
        "training.fused_ops_and_kernels": "fms-acceleration-foak",
        "training.attention.padding_free": "fms-acceleration-aadp",
        "training.dataloader.multipack": "fms-acceleration-aadp",
        "training.moe.scattermoe": "fms-acceleration-moe",
        "training.odm.odm": "fms-acceleration-odm",
        "training.mamba.cp": "fms-acceleration-mcp",
    }
)


@dataclass(frozen=True)
class PackageFolder:
    """A package of an fms-acceleration checkout."""

    folder: Path
    package: str  # the distribution name
    module: str  # its import name
    is_plugin: bool  # declares an entry point of the plugin group

    @property
    def short_name(self) -> str:
        """`peft` for fms-acceleration-peft (the name `cli install` takes)."""
        return self.package.removeprefix(PACKAGE_PREFIX)


def installed_plugin_packages() -> dict[str, str]:
    """Short name -> distribution of every installed plugin package (read from metadata; no
    plugin is imported)."""
    found = {}
    for entry_point in entry_points_of(PLUGIN_GROUP):
        module = entry_point.value.split(":")[0].split(".")[0]
        dist = getattr(entry_point, "dist", None)
        package = dist.metadata["Name"] if dist is not None else module.replace("_", "-")
        found[module.removeprefix(PLUGIN_PREFIX)] = package
    return found


def checkout_root(start: Path) -> Path | None:
    """The root of an fms-acceleration checkout at or above `start`."""
    for folder in [start, *start.parents]:
        if (folder / "libs" / "fms-acceleration" / "pyproject.toml").is_file():
            return folder
    return None


def checkout_packages(root: Path) -> list[PackageFolder]:
    """Every package of a checkout (libs/* and plugins/*), in path order: its import name is
    the folder under src/, its distribution name that with dashes."""
    table = f'[project.entry-points."{PLUGIN_GROUP}"]'
    packages = []
    for pyproject in sorted(
        [*root.glob("libs/*/pyproject.toml"), *root.glob("plugins/*/pyproject.toml")]
    ):
        (module,) = [p.name for p in (pyproject.parent / "src").iterdir() if p.is_dir()]
        is_plugin = table in pyproject.read_text(encoding="utf-8")
        packages.append(
            PackageFolder(
                pyproject.parent.relative_to(root), module.replace("_", "-"), module, is_plugin
            )
        )
    return packages


def plugin_short_names(root: Path | None = None) -> tuple[str, ...]:
    """Names `fms-acceleration install` knows: the reference's plugins, the installed ones, and
    a checkout's plugin packages."""
    names = {package.removeprefix(PACKAGE_PREFIX) for package in REFERENCE_STANZAS.values()}
    names |= set(installed_plugin_packages())
    if root is not None:
        names |= {p.short_name for p in checkout_packages(root) if p.folder.parts[0] == "plugins"}
    return tuple(sorted(names))
