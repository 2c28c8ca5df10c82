"""The acceleration the job runs with when the user names none: a YAML shipped in this package.

It is a file (not generated at run time) so that an installed job needs no checkout: the sample
configurations live in the repository, not in the wheel; a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fms_acceleration.packages import installed_version

from .errors import TrainJobError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "default_acceleration.yaml"
# what the default turns on, and the plugin packages it needs
DEFAULT_NAME = "padding-free, fused CE"
DEFAULT_PACKAGES = ("fms-acceleration-aadp", "fms-acceleration-foak")


@dataclass(frozen=True)
class DefaultAcceleration:
    """The built-in acceleration config, or why it cannot be used here."""

    path: str | None
    note: str


def default_acceleration() -> DefaultAcceleration:
    """The built-in config if its plugin packages are installed, else None with a note."""
    missing = [p for p in DEFAULT_PACKAGES if installed_version(p) is None]
    if missing:
        return DefaultAcceleration(
            None,
            f"the built-in acceleration ({DEFAULT_NAME}) needs {', '.join(missing)} "
            f"(pip install {' '.join(missing)}); training without acceleration",
        )
    return DefaultAcceleration(
        str(DEFAULT_CONFIG),
        f"built-in ({DEFAULT_NAME}); --no-acceleration trains without it, --compare runs both",
    )


def describe(acceleration_config: str | None) -> str:
    """How a summary names the acceleration config: the built-in default by name, else its path."""
    if acceleration_config is None:
        return "none"
    if Path(acceleration_config).resolve() == DEFAULT_CONFIG:
        return f"built-in ({DEFAULT_NAME})"
    return acceleration_config


def resolve_acceleration(
    explicit: str | None, disabled: bool, compare: bool
) -> tuple[str | None, str | None]:
    """(--acceleration-config to use, a note to print) for the command-line options given."""
    if disabled and explicit is not None:
        raise TrainJobError("--no-acceleration and --acceleration-config exclude each other")
    if disabled and compare:
        raise TrainJobError(
            "--compare runs the plain baseline and an accelerated run; drop --no-acceleration"
        )
    if disabled or explicit is not None:
        return explicit, None
    default = default_acceleration()
    if default.path is None and compare:
        raise TrainJobError(f"--compare: {default.note}")
    return default.path, default.note
