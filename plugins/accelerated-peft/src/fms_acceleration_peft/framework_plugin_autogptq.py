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
    Option,
    Stanza,
)

from .dtypes import pop_requested_dtype, resolve_dtype
from .gptq_kernels import REFERENCE_KERNEL, TRAINABLE_KERNELS, group_size_for
from .gptq_sharding import quantized_tensors_as_parameters
from .peft_wrapping import QuantizedLoraPlugin, wrap_with_lora

GPTQ_STANZA = "peft.quantization.auto_gptq"


def fsdp_requested(train_args: Any) -> bool:
    """True when the run shards the model with FSDP (TrainingArguments.fsdp or accelerate env)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return True
    return bool(getattr(train_args, "fsdp", None))


class AutoGPTQAccelerationPlugin(QuantizedLoraPlugin):
    """Loads a GPTQ checkpoint with a trainable kernel and trains LoRA on its quantized layers."""

    require_packages = ("gptqmodel", "peft")
    install_hints = MappingProxyType({"gptqmodel": "fms-acceleration-peft[gptq]"})

    def __init__(self, configurations: dict[str, Any], require_packages_check: bool = True):
        super().__init__(configurations, require_packages_check)
        stanza = self.stanza(GPTQ_STANZA)
        self.kernel: str = stanza["kernel"]
        self.from_quantized: bool = stanza["from_quantized"]
        if stanza["use_external_lib"]:
            raise AccelerationPluginConfigError(
                f"plugins.{GPTQ_STANZA}.use_external_lib: true is not supported: the external "
                "auto_gptq package needs CUDA and does not import with transformers 5; remove "
                "the key or set it to false (gptqmodel is used)"
            )
        self.dtype: torch.dtype | None = None
        self.quantized_checkpoint: str | None = None

    def model_loader(self, model_name: str, **kwargs: Any):
        """Load the GPTQ checkpoint (quantizing it first when from_quantized is false)."""
        from .gptq_loading import load_gptq_model

        kwargs = dict(kwargs)
        requested = pop_requested_dtype(kwargs)
        try:
            self.dtype = resolve_dtype(requested, model_name, default=torch.bfloat16)
            if requested in (None, "auto") and self.dtype == torch.float32:
                # An fp32 checkpoint with no dtype asked for: the trainable kernels need half
                # precision. An explicit float32 is refused by the loader with a clear error.
                self.dtype = torch.bfloat16
            if not self.from_quantized:
                model_name = self._quantize_on_the_fly(model_name)
            return load_gptq_model(model_name, self.kernel, self.dtype, **kwargs)
        except ValueError as err:
            raise AccelerationPluginConfigError(
                f"plugins.{GPTQ_STANZA}: model_loader: {err}"
            ) from None

    def _quantize_on_the_fly(self, model_name: str) -> str:
        from .quantize import quantize_checkpoint

        output = tempfile.mkdtemp(prefix="fms_gptq_")
        group_size = group_size_for(model_name)
        self.quantized_checkpoint = str(
            quantize_checkpoint(model_name, output, bits=4, group_size=group_size, dtype=self.dtype)
        )
        return self.quantized_checkpoint

    def augmentation(self, model, train_args, modifiable_args: tuple):
        """Apply modifiable_args[0] (a LoraConfig) on the GPTQ layers -> (None,)."""
        from .gptq_loading import is_gptq_quant_linear

        model, modifiable_args = wrap_with_lora(model, train_args, modifiable_args, GPTQ_STANZA)
        if fsdp_requested(train_args):
            dtype = self.dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
            quantized_tensors_as_parameters(model, dtype, is_gptq_quant_linear)
        return model, modifiable_args


AccelerationPlugin.register_plugin(
    AutoGPTQAccelerationPlugin,
    configuration_and_paths=[GPTQ_STANZA],
    plugin_id="auto_gptq",
    package_name="fms-acceleration-peft",
    schemas={
        GPTQ_STANZA: Stanza(
            kernel=Option(
                str,
                default=REFERENCE_KERNEL,
                choices=tuple(TRAINABLE_KERNELS),
                doc="GPTQ kernel with a backward pass; on CPU the torch kernel is used",
            ),
            from_quantized=Option(
                bool,
                default=True,
                doc="true: the model path is a GPTQ checkpoint; false: quantize it first (4-bit)",
            ),
            use_external_lib=Option(
                bool, default=False, doc="reference-compatible key; only false is supported"
            ),
        )
    },
)
