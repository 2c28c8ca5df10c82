"""Quantized LoRA plugins for fms-acceleration: bitsandbytes QLoRA and GPTQ-LoRA.

Importing this package registers both plugins (ids "bitsandbytes" and "auto_gptq"), and the
quantized layers they load (bitsandbytes Linear4bit, gptqmodel's layers) with the core, for
plugins that read those layers' weights (fused LoRA). GPTQ runs on this package's own kernels,
loader and quantizer; gptqmodel and auto_gptq are imported only when a stanza asks for them.
"""

from .bnb_cpu_repack import (
    disable_cpu_weight_repacking,
    is_repacked_for_cpu,
    unpack_cpu_repacked,
)
from .framework_plugin_autogptq import GPTQ_STANZA, AutoGPTQAccelerationPlugin
from .framework_plugin_bnb import BNB_STANZA, BNBAccelerationPlugin
from .gptq_linear import GPTQLinear
from .kbit_training import prepare_for_kbit_training
from .peft_wrapping import PEFT_WRAPPING_SLOT
from .quantized_layer_kinds import register_quantized_layer_kinds

register_quantized_layer_kinds()

__all__ = [
    "BNB_STANZA",
    "GPTQ_STANZA",
    "PEFT_WRAPPING_SLOT",
    "AutoGPTQAccelerationPlugin",
    "BNBAccelerationPlugin",
    "GPTQLinear",
    "disable_cpu_weight_repacking",
    "is_repacked_for_cpu",
    "prepare_for_kbit_training",
    "unpack_cpu_repacked",
]
