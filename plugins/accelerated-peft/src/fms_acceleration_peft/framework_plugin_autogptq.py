"""The `auto_gptq` plugin: GPTQ-LoRA on a 4-bit GPTQ checkpoint, through gptqmodel."""

from __future__ import annotations

import os
import tempfile
from types import MappingProxyType
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
from .gptq_kernels import REFERENCE_KERNEL, TRAINABLE_KERNELS, group_size_for
from .gptq_sharding import build_forward_with_original_views, quantized_tensors_as_parameters
from .peft_wrapping import QuantizedLoraPlugin, wrap_with_lora

GPTQ_STANZA = "peft.quantization.auto_gptq"


class GPTQOptions(StanzaModel):
    """The `peft.quantization.auto_gptq` stanza."""

    kernel: choice(*TRAINABLE_KERNELS) = REFERENCE_KERNEL
    """GPTQ kernel with a backward pass; on CPU the torch kernel is used"""
    from_quantized: bool = True
    """true: the model path is a GPTQ checkpoint; false: quantize it first (4-bit)"""
    use_external_lib: bool = False
    """reference-compatible key; only false is supported"""


def fsdp_requested(train_args: Any) -> bool:
    """True when the run shards the model with FSDP (TrainingArguments.fsdp or accelerate env)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return True
    return bool(getattr(train_args, "fsdp", None))


class AutoGPTQAccelerationPlugin(QuantizedLoraPlugin):
    """Loads a GPTQ checkpoint with a trainable kernel and trains LoRA on its quantized layers."""

    require_packages = ("gptqmodel", "peft")
    install_hints = MappingProxyType({"gptqmodel": "fms-acceleration-peft[gptq]"})

    def __init__(self, configurations: dict[str, Any]):
        super().__init__(configurations)
        stanza = self.stanza(GPTQ_STANZA)
        self.kernel: str = stanza["kernel"]
        self.from_quantized: bool = stanza["from_quantized"]
        if stanza["use_external_lib"]:
            raise AccelerationPluginConfigError(
                f"plugins.{GPTQ_STANZA}.use_external_lib: true is not supported: the external "
                "auto_gptq package needs CUDA and does not import with transformers 5; remove "
                "the key or set it to false (gptqmodel is used)"
            )

    def model_loader(self, model_name: str, **kwargs: Any):
        """Load the GPTQ checkpoint (quantizing it first when from_quantized is false)."""
        from .gptq_loading import load_gptq_model

        kwargs = dict(kwargs)
        requested = pop_requested_dtype(kwargs)
        try:
            dtype = resolve_dtype(requested, model_name, default=torch.bfloat16)
            if requested in (None, "auto") and dtype == torch.float32:
                # An fp32 checkpoint with no dtype asked for: the trainable kernels need half
                # precision. An explicit float32 is refused by the loader with a clear error.
                dtype = torch.bfloat16
            if self.from_quantized:
                return load_gptq_model(model_name, self.kernel, dtype, **kwargs)
            from .quantize import quantize_checkpoint

            # the quantized copy is read into memory by the loader, then removed
            with tempfile.TemporaryDirectory(prefix="fms_gptq_") as scratch:
                quantized = quantize_checkpoint(
                    model_name, scratch, bits=4, group_size=group_size_for(model_name), dtype=dtype
                )
                return load_gptq_model(str(quantized), self.kernel, dtype, **kwargs)
        except ValueError as err:
            raise AccelerationPluginConfigError(
                f"plugins.{GPTQ_STANZA}: model_loader: {err}"
            ) from None

    def augmentation(self, model, train_args, modifiable_args: tuple):
        """Apply modifiable_args[0] (a LoraConfig) on the GPTQ layers -> (None,)."""
        from .gptq_loading import is_gptq_quant_linear

        model, modifiable_args = wrap_with_lora(model, train_args, modifiable_args, GPTQ_STANZA)
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


AccelerationPlugin.register_plugin(
    AutoGPTQAccelerationPlugin,
    configuration_and_paths=[GPTQ_STANZA],
    plugin_id="auto_gptq",
    package_name="fms-acceleration-peft",
    schemas={GPTQ_STANZA: GPTQOptions},
)
