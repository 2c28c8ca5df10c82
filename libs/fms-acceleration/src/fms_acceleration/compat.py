"""Differences between the library releases we support, in one place.

We run on transformers from 4.55 (fms-hf-tuning's pinned stack) to the newest 5.x, peft from
0.18, accelerate from 1.9. Code that must behave differently across those releases asks here
instead of testing versions itself, so the next release that changes something is handled in
one module. Nothing here imports transformers at module import: the core stays light.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from functools import cache
from typing import Any

from packaging.version import Version

from .packages import installed_version

# the release that renamed `torch_dtype=` to `dtype=` in from_pretrained / from_config
_DTYPE_KEYWORD_SINCE = Version("4.56.0")
# the release line whose MoE experts are one module with fused 3-D parameters (4.x: a
# ModuleList of per-expert MLPs)
_FUSED_EXPERTS_SINCE = Version("5.0.0.dev0")


@cache
def package_version(package: str) -> Version | None:
    """The installed release of `package` (a distribution name), or None when absent."""
    found = installed_version(package)
    return Version(found) if found is not None else None


def at_least(package: str, version: str) -> bool:
    """Whether `package` is installed at `version` or newer (pre-releases count as that line)."""
    found = package_version(package)
    return found is not None and found >= Version(version)


def transformers_version() -> Version:
    """The installed transformers release (it must be installed to ask)."""
    found = package_version("transformers")
    if found is None:
        raise ModuleNotFoundError("transformers is not installed")
    return found


def uses_dtype_keyword() -> bool:
    """Whether model constructors take `dtype=` (transformers >= 4.56) or only `torch_dtype=`."""
    return transformers_version() >= _DTYPE_KEYWORD_SINCE


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """The keyword argument for the weights' dtype that this transformers understands."""
    return {"dtype": dtype} if uses_dtype_keyword() else {"torch_dtype": dtype}


def config_dtype(config: Any) -> Any:
    """The weights' dtype a model config records: `dtype` since 4.56, `torch_dtype` before (a
    config.json written by 5.x and read by 4.55 carries `dtype` as a string); None if absent."""
    if uses_dtype_keyword():
        return getattr(config, "dtype", None)
    return getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)


def pop_dtype(kwargs: MutableMapping[str, Any]) -> Any:
    """Remove and return the dtype a caller passed under either spelling (`dtype` wins)."""
    legacy = kwargs.pop("torch_dtype", None)
    requested = kwargs.pop("dtype", None)
    return requested if requested is not None else legacy


def model_dtype_kwargs(kwargs: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """`kwargs` with a dtype given under either spelling renamed for this transformers."""
    if "dtype" in kwargs or "torch_dtype" in kwargs:
        kwargs.update(dtype_kwargs(pop_dtype(kwargs)))
    return kwargs


def fused_moe_experts() -> bool:
    """Whether MoE blocks keep their experts as one module of fused 3-D parameters (5.x)."""
    return transformers_version() >= _FUSED_EXPERTS_SINCE
