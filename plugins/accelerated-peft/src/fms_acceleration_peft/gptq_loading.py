"""Loading a GPTQ checkpoint as a transformers causal LM whose quantized linears can train LoRA.

Our loader needs no GPTQ package: it builds the model from its config with empty weights,
puts a GPTQLinear wherever the checkpoint holds a `.qweight`, and assigns the checkpoint's
tensors (transformers 4.55 through 5.x). gptqmodel (its trainable backends) and auto_gptq
(the reference's `use_external_lib: true`) load through their own APIs when asked for.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fms_acceleration import compat

from .gptq_checkpoint import (
    GPTQCheckpointError,
    GPTQSettings,
    quantized_prefixes,
    read_settings,
    read_tensors,
)
from .gptq_format import QUANTIZED_TENSORS, GPTQFormatError, GPTQLayout
from .gptq_linear import GPTQLinear

# gptqmodel's trainable kernels compute in half precision only (TorchLinear.SUPPORTS_DTYPES)
GPTQ_DTYPES = (torch.bfloat16, torch.float16)
OWN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# keyword arguments of from_pretrained that say where the checkpoint is, not how to build it
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")
_REFUSED = ("quantization_config", "device_map")
# quantized layer classes of the GPTQ packages, by module prefix (recognised without importing)
_PACKAGE_QUANT_LINEARS = ("gptqmodel.nn_modules.qlinear", "auto_gptq.nn_modules.qlinear")


def ensure_gptqmodel_cpu_workers() -> None:
    """Give gptqmodel's CPU thread pool at least 2 workers before it is first built.

    gptqmodel 7.6 defaults to ceil(cpus/2) CPU workers but its model-loader sub-pool asks for 2,
    so on a 2-core machine every load/quantize fails with "requests 2 workers but parent 'cpu'
    only has 1".
    """
    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, ((os.cpu_count() or 1) + 1) // 2))


def default_device() -> torch.device:
    """This process's accelerator when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def is_gptq_quant_linear(module: nn.Module) -> bool:
    """True for our GPTQLinear and for gptqmodel's and auto_gptq's quantized linear layers."""
    if isinstance(module, GPTQLinear):
        return True
    return any(c.__module__.startswith(_PACKAGE_QUANT_LINEARS) for c in type(module).__mro__)


def checkpoint_directory(model_name: str, **hub_kwargs: Any) -> Path:
    """A local directory holding `model_name` (a path, or a Hub id fetched into the cache)."""
    if Path(model_name).is_dir():
        return Path(model_name)
    if Path(model_name).exists() or model_name.startswith((".", "/")):
        raise GPTQCheckpointError(f"{model_name}: not a checkpoint directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_name, **hub_kwargs))
    except Exception as err:  # the hub client raises many kinds (offline, 404, auth)
        raise GPTQCheckpointError(
            f"{model_name}: neither a local directory nor a model on the Hugging Face Hub that "
            f"can be fetched ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from None


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(hub kwargs, model-construction kwargs, config overrides) of a from_pretrained call."""
    for key in _REFUSED:
        if kwargs.get(key) is not None:
            raise ValueError(f"{key} must not be passed to the GPTQ loader")
    kwargs = {k: v for k, v in kwargs.items() if k not in _REFUSED}
    kwargs.pop("low_cpu_mem_usage", None)  # the loader never materialises float weights
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    build = {}
    if kwargs.get("attn_implementation") is not None:
        build["attn_implementation"] = kwargs["attn_implementation"]
    kwargs.pop("attn_implementation", None)
    if "trust_remote_code" in kwargs:
        hub["trust_remote_code"] = build["trust_remote_code"] = kwargs.pop("trust_remote_code")
    return hub, build, kwargs


def _swap_in_gptq_linears(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    origin: dict[str, Path],
    settings: GPTQSettings,
    path: str,
) -> int:
    """Replace each module the checkpoint quantizes by an empty (meta) GPTQLinear."""
    prefixes = quantized_prefixes(tensors)
    if not prefixes:
        raise GPTQCheckpointError(
            f"{next(iter(origin.values()), 'checkpoint')}: no '.qweight' tensor: the weights "
            "are not GPTQ-quantized"
        )
    for prefix in prefixes:
        where = f"{origin[prefix + '.qweight']}: {prefix}"
        try:
            linear = model.get_submodule(prefix)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            found = "nothing" if linear is None else type(linear).__name__
            raise GPTQCheckpointError(
                f"{where}: the checkpoint quantizes this module, but the model transformers "
                f"builds from config.json has {found} there, not a linear layer"
            )
        try:
            layout = GPTQLayout(
                linear.in_features,
                linear.out_features,
                settings.bits,
                settings.group_size,
                settings.zero_offset,
            )
        except GPTQFormatError as err:
            raise GPTQCheckpointError(f"{where}: {err}") from None
        if prefix + ".g_idx" not in tensors and not settings.desc_act:
            # GPTQ-for-LLaMa era checkpoints: groups in column order, g_idx not stored
            tensors[prefix + ".g_idx"] = layout.default_g_idx()
        parts = {name: tensors.get(f"{prefix}.{name}") for name in QUANTIZED_TENSORS}
        try:
            layout.check(parts, prefix)
        except GPTQFormatError as err:
            raise GPTQCheckpointError(f"{origin[prefix + '.qweight']}: {err}") from None
        tensors[prefix + ".g_idx"] = parts["g_idx"].to(torch.int32)
        layer = GPTQLinear(
            linear.in_features,
            linear.out_features,
            settings.bits,
            settings.group_size,
            bias=linear.bias is not None,
            zero_offset=settings.zero_offset,
            path=path,
            scales_dtype=parts["scales"].dtype,
            device="meta",
        )
        model.set_submodule(prefix, layer)
    return len(prefixes)


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    expected = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (" ..." if len(unexpected) > 3 else "")
        raise GPTQCheckpointError(
            f"{directory}: {len(unexpected)} tensors fit no module of the model built from "
            f"config.json: {shown}"
        )
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        shown = ", ".join(empty[:3]) + (" ..." if len(empty) > 3 else "")
        raise GPTQCheckpointError(f"{directory}: the checkpoint has no tensor for {shown}")


def load_gptq_model(
    model_name: str,
    kernel_path: str,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a GPTQ checkpoint with our GPTQLinear layers (`kernel_path`: auto/triton/torch)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if dtype not in OWN_DTYPES:
        raise ValueError(f"dtype={dtype} is not one of float32, bfloat16, float16")
    hub, build, overrides = _split_kwargs(dict(kwargs))
    directory = checkpoint_directory(model_name, **hub)
    settings = read_settings(directory)
    config, unused = AutoConfig.from_pretrained(
        str(directory), return_unused_kwargs=True, **overrides, **hub
    )
    if unused:
        raise ValueError(f"unexpected keyword arguments for the GPTQ loader: {', '.join(unused)}")
    # the model is built plain; its quantized layers are ours, not an HfQuantizer's
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tensors, origin = read_tensors(directory)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, **compat.dtype_kwargs(dtype), **build)
    _swap_in_gptq_linears(model, tensors, origin, settings, kernel_path)
    quantized = {n for n, m in model.named_modules() if isinstance(m, GPTQLinear)}
    for key, tensor in tensors.items():
        owner = key.rsplit(".", 1)[0]
        if tensor.is_floating_point() and owner not in quantized:
            tensors[key] = tensor.to(dtype)
    _assign(model, tensors, directory)
    with contextlib.suppress(OSError):  # no generation_config.json: keep the one built
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    model.config.quantization_config = settings.as_config()
    model.eval()
    return model.to(torch.device(device) if device is not None else default_device())


def load_with_gptqmodel(
    model_name: str,
    backend: str,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a GPTQ checkpoint through gptqmodel with one of its trainable backends."""
    if dtype not in GPTQ_DTYPES:
        raise ValueError(
            f"dtype={dtype} is not supported by gptqmodel's trainable kernels; use bfloat16 or "
            "float16 (or our kernels: triton_v2, torch)"
        )
    ensure_gptqmodel_cpu_workers()
    from gptqmodel import GPTQModel

    device = torch.device(device) if device is not None else default_device()
    for refused in _REFUSED:
        if refused in kwargs:
            raise ValueError(f"{refused} must not be passed to the GPTQ loader")
    wrapper = GPTQModel.load(model_name, backend=backend, device=device, dtype=dtype, **kwargs)
    return wrapper.model


def load_with_auto_gptq(
    model_name: str,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a GPTQ checkpoint through auto_gptq's trainable Triton v2 kernel (the reference's
    `use_external_lib: true`); auto_gptq itself needs CUDA."""
    from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig

    hub, build, overrides = _split_kwargs(dict(kwargs))
    if build.pop("attn_implementation", None) is not None:
        warnings.warn(
            "attn_implementation is not passed to auto_gptq's loader; the model keeps the "
            "attention its config names",
            stacklevel=2,
        )
    directory = checkpoint_directory(model_name, **hub)
    read_settings(directory)  # our clear errors first; auto_gptq's are asserts
    device = torch.device(device) if device is not None else default_device()
    wrapper = AutoGPTQForCausalLM.from_quantized(
        str(directory),
        quantize_config=BaseQuantizeConfig.from_pretrained(str(directory)),
        device=str(device),
        torch_dtype=dtype,
        use_triton=False,
        use_tritonv2=True,  # the one auto_gptq kernel with a backward pass
        trainable=True,
        disable_exllama=True,  # exllama and marlin have no backward
        disable_exllamav2=True,
        use_marlin=False,
        warmup_triton=False,
        **build,
    )
    model = wrapper.model
    for key, value in overrides.items():  # e.g. use_cache=False, as from_pretrained applies it
        setattr(model.config, key, value)
    return model
