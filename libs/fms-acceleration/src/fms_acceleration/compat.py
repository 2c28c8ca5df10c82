"""Differences between the library releases we support, in one place.

We run on transformers from 4.55 (fms-hf-tuning's pinned stack) to the newest 5.x, peft from
0.18, accelerate from 1.9. Code that must behave differently across those releases asks here
instead of testing versions itself, so the next release that changes something is handled in
one module. Nothing here imports transformers at module import: the core stays light.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from functools import cache
from typing import Any

from packaging.version import Version

from .packages import installed_version

# the release that renamed `torch_dtype=` to `dtype=` in from_pretrained / from_config
_DTYPE_KEYWORD_SINCE = Version("4.56.0")
# the release whose Trainer counts num_items_in_batch over the shifted labels (`labels[..., 1:]`,
# the tokens a causal-LM loss scores); before it, over every label
_SHIFTED_LABEL_COUNT_SINCE = Version("5.11.0")
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


def trainer_counts_shifted_labels() -> bool:
    """Whether the Trainer's num_items_in_batch counts `labels[..., 1:]` (else all labels)."""
    return transformers_version() >= _SHIFTED_LABEL_COUNT_SINCE


def fused_moe_experts() -> bool:
    """Whether MoE blocks keep their experts as one module of fused 3-D parameters (5.x)."""
    return transformers_version() >= _FUSED_EXPERTS_SINCE


def is_silu(act: object) -> bool:
    """Whether an activation module is SiLU: torch.nn.SiLU (transformers' ACT2FN['silu']) or the
    SiLUActivation of older transformers."""
    import torch

    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


@cache  # asked on every MoE layer's forward
def default_experts_gate() -> Callable[..., Any] | None:
    """transformers' default gating of fused MoE experts, act_fn(gate) * up (the `_apply_gate`
    it gives an experts class that defines none), or None on a release without one."""
    try:
        from transformers.integrations import moe
    except ImportError:
        return None
    return getattr(moe, "_default_apply_gate", None)


def is_hub_kernel_layer(module: Any) -> bool:
    """Whether the module's class is decorated for the kernels hub (transformers 5.2x with the
    `kernels` package): `kernelize` resets the forward of such a module's instances."""
    return hasattr(type(module), "kernel_layer_name")


def stop_hub_kernels(model: Any) -> Callable[[], None] | None:
    """Turn a model's hub kernels off, so that its train()/eval() switches stop re-kernelizing
    (5.2x does that on every switch, dropping forwards set on instances, ours included).

    Returns how to turn them back on, or None when they were off.
    """
    if not getattr(model, "use_kernels", False):
        return None
    mode = getattr(model, "kernels_mode", None)
    model.use_kernels = False  # transformers' own reset: torch forwards, no re-kernelization

    def restore() -> None:
        model.set_use_kernels(True, mode=mode)

    return restore


def fsdp_plugin_kwargs(training_args: Any) -> dict[str, Any]:
    """Arguments of accelerate's FullyShardedDataParallelPlugin for these TrainingArguments:
    transformers 5 computes them (`fsdp_plugin_args`); 4.x hands its options over in FSDP_*
    environment variables, which the plugin reads itself, all but the FSDP version."""
    computed = getattr(training_args, "fsdp_plugin_args", None)
    if computed is not None:
        return dict(computed)
    return {"fsdp_version": int((training_args.fsdp_config or {}).get("version", 1))}
