"""Errors the training job raises for bad input or a missing optional package."""

from __future__ import annotations


class TrainJobError(ValueError):
    """Bad input to the training job (a path, a dataset line, an option value)."""


class MissingDependencyError(ImportError):
    """An optional package the training job needs is not installed."""


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean the input was wrong: a command prints them as one line (exit 2)."""
    from fms_acceleration import AccelerationFrameworkError, AccelerationPluginConfigError

    return (
        TrainJobError,
        MissingDependencyError,
        AccelerationPluginConfigError,
        AccelerationFrameworkError,
    )


def require(import_name: str, pip_name: str | None = None, purpose: str = "") -> None:
    """Raise MissingDependencyError, saying what to pip install, if `import_name` is missing."""
    import importlib.util

    if importlib.util.find_spec(import_name) is not None:
        return
    what = f" (needed for {purpose})" if purpose else ""
    raise MissingDependencyError(
        f"the package '{import_name}' is not installed{what}; "
        f"install it with: pip install {pip_name or import_name}"
    )
