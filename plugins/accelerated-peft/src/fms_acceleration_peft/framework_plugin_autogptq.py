"""The `auto_gptq` plugin: GPTQ-LoRA on a GPTQ checkpoint, with our own kernels by default."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Any

import torch

from fms_acceleration import (
    AccelerationPlugin,
    AccelerationPluginConfigError,
    ModelPatcherRule,
    ModelPatcherTrigger,
    StanzaModel,
    choice,
)

from .dtypes import pop_requested_dtype, resolve_dtype
from .gptq_kernels import GPTQMODEL_KERNELS, KERNELS, REFERENCE_KERNEL, group_size_for
from .gptq_sharding import build_forward_with_original_views, quantized_tensors_as_parameters
from .peft_wrapping import QuantizedLoraPlugin, wrap_with_lora

GPTQ_STANZA = "peft.quantization.auto_gptq"
USE_EXTERNAL_LIB_KEY = f"plugins.{GPTQ_STANZA}.use_external_lib"
KERNEL_KEY = f"plugins.{GPTQ_STANZA}.kernel"
# the reference's words for a missing auto_gptq; clients and its tests match them
_REFERENCE_MISSING_AUTO_GPTQ = (
    "Unable to use external library, auto_gptq module not found. Refer to README for "
    "installation instructions  as a specific version might be required."
)


class GPTQOptions(StanzaModel):
    """The `peft.quantization.auto_gptq` stanza."""

    kernel: choice(*KERNELS) = REFERENCE_KERNEL
    """GPTQ kernel with a backward pass: triton_v2 (ours; Triton on CUDA, torch on CPU), torch
    (ours), or a gptqmodel backend (gptq_triton, gptq_torch, gptq_torch_fused, gptq_torch_aten,
    auto_trainable; needs gptqmodel)"""
    from_quantized: bool = True
    """true: the model path is a GPTQ checkpoint; false: quantize it first (4-bit)"""
    use_external_lib: bool = False
    """true: load through the external auto_gptq package (CUDA only) instead of our kernels"""


class ExternalLibraryMissingError(AccelerationPluginConfigError, AssertionError):
    """use_external_lib asks for auto_gptq, which is not installed (an AssertionError in the
    reference, so it is one here too)."""


def fsdp_requested(train_args: Any) -> bool:
    """True when the run shards the model with FSDP (TrainingArguments.fsdp or accelerate env)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return True
    return bool(getattr(train_args, "fsdp", None))


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class AutoGPTQAccelerationPlugin(QuantizedLoraPlugin):
    """Loads a GPTQ checkpoint with a trainable kernel and trains LoRA on its quantized layers."""

    require_packages = ("peft",)

    def __init__(self, configurations: dict[str, Any]):
        super().__init__(configurations)
        stanza = self.stanza(GPTQ_STANZA)
        self.kernel: str = stanza["kernel"]
        self.from_quantized: bool = stanza["from_quantized"]
        self.use_external_lib: bool = stanza["use_external_lib"]
        if self.use_external_lib:
            if self.kernel != REFERENCE_KERNEL:
                raise AccelerationPluginConfigError(
                    f"{USE_EXTERNAL_LIB_KEY}: true loads through auto_gptq's triton_v2 kernel, "
                    f"but {KERNEL_KEY} is {self.kernel!r}; set kernel: {REFERENCE_KERNEL} or "
                    "use_external_lib: false"
                )
            if not _installed("auto_gptq"):
                raise ExternalLibraryMissingError(
                    f"{USE_EXTERNAL_LIB_KEY}: true needs the package 'auto_gptq' (pip install "
                    "auto-gptq; it builds for CUDA only), or set it to false to use our own "
                    f"GPTQ kernels. {_REFERENCE_MISSING_AUTO_GPTQ}"
                )
        elif self.kernel in GPTQMODEL_KERNELS and not _installed("gptqmodel"):
            raise AccelerationPluginConfigError(
                f"{KERNEL_KEY}: {self.kernel!r} is a gptqmodel kernel and needs the package "
                "'gptqmodel' (pip install 'fms-acceleration-peft[gptq]'; gptqmodel 7.6 needs "
                f"transformers>=5.14), or use our own kernels: {REFERENCE_KERNEL} or torch"
            )

    def model_loader(self, model_name: str, **kwargs: Any):
        """Load the GPTQ checkpoint (quantizing it first when from_quantized is false)."""
        kwargs = dict(kwargs)
        requested = pop_requested_dtype(kwargs)
        try:
            dtype = resolve_dtype(requested, model_name, default=torch.bfloat16)
            if requested in (None, "auto") and dtype == torch.float32:
                # An fp32 checkpoint with no dtype asked for: train in bf16, as GPTQ kernels are
                # meant to. An explicit float32 runs on our kernels (not on gptqmodel's).
                dtype = torch.bfloat16
            if self.from_quantized:
                return self._load(model_name, dtype, **kwargs)
            from .quantize import quantize_checkpoint

            # the quantized copy is read into memory by the loader, then removed
            with tempfile.TemporaryDirectory(prefix="fms_gptq_") as scratch:
                quantized = quantize_checkpoint(
                    model_name, scratch, bits=4, group_size=group_size_for(model_name), dtype=dtype
                )
                return self._load(str(quantized), dtype, **kwargs)
        except ValueError as err:
            raise AccelerationPluginConfigError(
                f"plugins.{GPTQ_STANZA}: model_loader: {err}"
            ) from None

    def _load(self, model_name: str, dtype: torch.dtype, **kwargs: Any):
        from . import gptq_loading
        from .gptq_kernels import gptqmodel_backend, own_path

        device = gptq_loading.default_device()
        if self.use_external_lib:
            return gptq_loading.load_with_auto_gptq(model_name, dtype, device, **kwargs)
        if self.kernel in GPTQMODEL_KERNELS:
            backend = gptqmodel_backend(self.kernel, device)
            return gptq_loading.load_with_gptqmodel(model_name, backend, dtype, device, **kwargs)
        path = own_path(self.kernel, device)
        return gptq_loading.load_gptq_model(model_name, path, dtype, device, **kwargs)

    def augmentation(self, model, train_args, modifiable_args: tuple):
        """Apply modifiable_args[0] (a LoraConfig) on the GPTQ layers -> (None,)."""
        from .gptq_loading import is_gptq_quant_linear

        model, modifiable_args = wrap_with_lora(
            model, train_args, modifiable_args, GPTQ_STANZA, lora_layers=self._lora_layers()
        )
        if fsdp_requested(train_args):
            # the compute dtype the loader chose is the dtype of the non-quantized weights
            dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
            converted = quantized_tensors_as_parameters(model, dtype, is_gptq_quant_linear)
            ids = {id(m) for m in converted}
            self.model_patcher.register(
                ModelPatcherRule(
                    "gptq-integer-views-for-fsdp",
                    trigger=ModelPatcherTrigger(check=lambda m: id(m) in ids),
                    forward_builder=build_forward_with_original_views,
                )
            )
        return model, modifiable_args

    def _lora_layers(self) -> dict[type, type]:
        """peft's GPTQ LoRA layer for the quantized layers peft does not dispatch by itself."""
        from peft.tuners.lora.gptq import GPTQLoraLinear

        from .gptq_linear import GPTQLinear

        layers: dict[type, type] = {GPTQLinear: GPTQLoraLinear}
        if self.use_external_lib:
            from auto_gptq.nn_modules.qlinear.qlinear_tritonv2 import QuantLinear

            layers[QuantLinear] = GPTQLoraLinear
        return layers


AccelerationPlugin.register_plugin(
    AutoGPTQAccelerationPlugin,
    configuration_and_paths=[GPTQ_STANZA],
    plugin_id="auto_gptq",
    package_name="fms-acceleration-peft",
    schemas={GPTQ_STANZA: GPTQOptions},
)
